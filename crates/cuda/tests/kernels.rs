//! Every CUDA kernel against the CPU kernels (moestream-kernels) on fresh random inputs. Needs a
//! GPU: where none is present each test prints why it is skipped and passes, so CI (no GPU)
//! stays green while building and linking all of this.
use moestream_cuda::{devices, ops, Gpu};
use moestream_kernels::ggml::BlockFormat;
use moestream_kernels::ops::{AttentionShape, Rope};
use moestream_kernels::{dequantize_row, FloatKind, Matrix, Weights};

fn gpu() -> Option<Gpu> {
    if devices() == 0 {
        eprintln!("skipped: no CUDA device (libcuda or a GPU is missing)");
        return None;
    }
    Some(Gpu::open(0).expect("opening GPU 0"))
}

/// xorshift64*, so every run draws the same "fresh" numbers per seed without a dependency.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545F4914F6CDD1D)
    }
    fn uniform(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
    fn floats(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.uniform()).collect()
    }
}

fn encode(kind: FloatKind, v: &[f32]) -> Vec<u8> {
    match kind {
        FloatKind::F32 => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        FloatKind::F16 => v
            .iter()
            .flat_map(|x| half::f16::from_f32(*x).to_le_bytes())
            .collect(),
        FloatKind::BF16 => v
            .iter()
            .flat_map(|x| half::bf16::from_f32(*x).to_le_bytes())
            .collect(),
    }
}

/// Random blocks with finite scales at the offsets each format keeps its f16 scales.
fn ggml_blocks(rng: &mut Rng, format: BlockFormat, blocks: usize) -> Vec<u8> {
    let bb = format.block_bytes();
    let mut data = rng.bytes(blocks * bb);
    let scale_offsets = format.f16_offsets();
    for b in 0..blocks {
        for &o in scale_offsets {
            let d = half::f16::from_f32(rng.uniform() * 0.05).to_le_bytes();
            data[b * bb + o..b * bb + o + 2].copy_from_slice(&d);
        }
    }
    data
}

/// Checks `W x` on the GPU against f64 sums of the CPU's dequantized rows, for 1, 3, 11 and 20
/// tokens (the decode kernel, inside one token tile and across two, and cuBLAS on dequantized
/// rows), within 1e-5 of Σ|w·x| per output; then `y += W x` doubles y.
fn check_matrix(gpu: &Gpu, m: &Matrix, what: &str, rng: &mut Rng) {
    let w = moestream_cuda::matrix::GpuMatrix::upload(gpu, m).expect("upload");
    let mut rows = vec![vec![0f32; m.cols]; m.rows];
    for (r, row) in rows.iter_mut().enumerate() {
        dequantize_row(m, r, row);
    }
    for n in [1usize, 3, 11, 20] {
        let x = rng.floats(n * m.cols);
        let xd = gpu.upload(&x).unwrap();
        let y = gpu.alloc_f32(n * m.rows).unwrap();
        // Poison the output so an unwritten element cannot pass.
        gpu.write(&y, 0, &vec![f32::NAN; n * m.rows]).unwrap();
        w.forward(gpu, xd.ptr, n, y.ptr).unwrap();
        let mut got = vec![0f32; n * m.rows];
        gpu.read(y.ptr, &mut got).unwrap();
        let mut worst = 0f64;
        for t in 0..n {
            for (r, row) in rows.iter().enumerate() {
                let xs = &x[t * m.cols..(t + 1) * m.cols];
                let exact: f64 = row.iter().zip(xs).map(|(a, b)| *a as f64 * *b as f64).sum();
                let mag: f64 = row
                    .iter()
                    .zip(xs)
                    .map(|(a, b)| (*a as f64 * *b as f64).abs())
                    .sum();
                let g = got[t * m.rows + r] as f64;
                let err = (g - exact).abs() / mag.max(1e-30);
                assert!(
                    err <= 1e-5,
                    "{what} n={n} token {t} row {r}: GPU {g} vs {exact} (relative to Σ|w·x| {err:.2e})"
                );
                worst = worst.max(err);
            }
        }
        eprintln!("{what} n={n}: worst error {worst:.2e} of Σ|w·x|");
        w.forward_add(gpu, xd.ptr, n, y.ptr).unwrap();
        let mut twice = vec![0f32; n * m.rows];
        gpu.read(y.ptr, &mut twice).unwrap();
        for (i, (a, b)) in twice.iter().zip(&got).enumerate() {
            assert!(
                (a - 2.0 * b).abs() <= 1e-5 * b.abs().max(1e-3),
                "{what} n={n}: y += W x gave {a} at {i}, want {}",
                2.0 * b
            );
        }
    }
}

#[test]
fn products_match_the_cpu_for_every_format() {
    let Some(gpu) = gpu() else { return };
    let mut rng = Rng(0x5eed_1234_abcd_0001);
    let (rows, cols) = (37, 512);
    for kind in [FloatKind::F32, FloatKind::F16, FloatKind::BF16] {
        let data = encode(kind, &rng.floats(rows * cols));
        let m = Matrix {
            rows,
            cols,
            weights: Weights::Float { kind, data: &data },
        };
        check_matrix(&gpu, &m, &format!("{kind:?}"), &mut rng);
    }
    for bits in [2u32, 3, 4, 5, 6, 8] {
        for (gs, scale_kind) in [
            (32, FloatKind::BF16),
            (64, FloatKind::F16),
            (128, FloatKind::F32),
        ] {
            let packed = rng.bytes(rows * cols * bits as usize / 8);
            let groups = rows * cols / gs;
            let scales = encode(
                scale_kind,
                &rng.floats(groups)
                    .iter()
                    .map(|v| v * 0.1)
                    .collect::<Vec<_>>(),
            );
            let biases = encode(scale_kind, &rng.floats(groups));
            let m = Matrix {
                rows,
                cols,
                weights: Weights::Affine {
                    bits,
                    group_size: gs,
                    packed: &packed,
                    scales: &scales,
                    biases: &biases,
                    scale_kind,
                },
            };
            check_matrix(
                &gpu,
                &m,
                &format!("affine {bits}-bit gs{gs} {scale_kind:?}"),
                &mut rng,
            );
        }
    }
    for format in BlockFormat::ALL {
        let data = ggml_blocks(&mut rng, format, rows * cols / format.block_elements());
        let m = Matrix {
            rows,
            cols,
            weights: Weights::Ggml {
                format,
                data: &data,
            },
        };
        check_matrix(&gpu, &m, format.name(), &mut rng);
    }
}

/// The one-token products with int8 activations (Q4_K, Q6_K) against the CPU's int8 path on
/// the same activations: the same rounding, so they differ only by the order of f32 additions
/// (bound 1e-5 of Σ|w·x| per output); and against the exact f32 product within the rounding's
/// error (CPU module docs: measured up to 7.2e-3 with outliers; bound 2e-2). Activations come
/// from `quantize_q8`, `rms_norm_q8` and `silu_mul_q8`, which must give the same codes (the
/// same bits of output). Shapes with 2, 3 (a part-idle warp) and 9 super-blocks (over three
/// passes of a warp) per row; one span of activations with outliers 50 times larger.
#[test]
fn int8_products_match_the_cpu_int8_path() {
    use moestream_cuda::matrix::GpuMatrix;
    use moestream_kernels::features::{ActivationPrecision, SimdLevel};
    let Some(gpu) = gpu() else { return };
    let mut rng = Rng(0x0188_dead_beef_0003);
    for format in [BlockFormat::Q4_K, BlockFormat::Q6_K] {
        for (rows, cols) in [(37usize, 512usize), (19, 768), (6, 2304)] {
            let data = ggml_blocks(&mut rng, format, rows * cols / 256);
            let m = Matrix {
                rows,
                cols,
                weights: Weights::Ggml {
                    format,
                    data: &data,
                },
            };
            let w = GpuMatrix::upload(&gpu, &m).unwrap();
            let mut x = rng.floats(cols);
            for v in &mut x[64..96] {
                *v *= 50.0;
            }
            let mut cpu = vec![0f32; rows];
            moestream_kernels::matmul_with_precision(
                SimdLevel::Scalar,
                ActivationPrecision::Int8,
                &m,
                &x,
                1,
                &mut cpu,
            );
            let mut exact = vec![0f32; rows];
            moestream_kernels::matmul_with_precision(
                SimdLevel::Scalar,
                ActivationPrecision::F32,
                &m,
                &x,
                1,
                &mut exact,
            );
            let mut dense = vec![0f32; cols];
            let magnitude: Vec<f64> = (0..rows)
                .map(|r| {
                    dequantize_row(&m, r, &mut dense);
                    dense
                        .iter()
                        .zip(&x)
                        .map(|(a, b)| (*a as f64 * *b as f64).abs())
                        .sum()
                })
                .collect();
            let q8 = ops::Q8Buffer::new(&gpu, cols).unwrap();
            let xd = gpu.upload(&x).unwrap();
            let y = gpu.alloc_f32(rows).unwrap();
            gpu.write(&y, 0, &vec![f32::NAN; rows]).unwrap();
            ops::quantize_q8(&gpu, xd.ptr, &q8, cols).unwrap();
            w.product(&gpu, xd.ptr, Some(q8.view()), 1, y.ptr, false)
                .unwrap();
            let mut got = vec![0f32; rows];
            gpu.read(y.ptr, &mut got).unwrap();
            let (mut worst_cpu, mut worst_f32) = (0f64, 0f64);
            for r in 0..rows {
                let mag = magnitude[r].max(1e-30);
                let e_cpu = (got[r] as f64 - cpu[r] as f64).abs() / mag;
                let e_f32 = (got[r] as f64 - exact[r] as f64).abs() / mag;
                assert!(
                    e_cpu <= 1e-5 && e_f32 <= 2e-2,
                    "{} {rows}x{cols} row {r}: GPU {} vs CPU int8 {} / f32 {} ({e_cpu:.2e}, {e_f32:.2e} of Σ|w·x|)",
                    format.name(),
                    got[r],
                    cpu[r],
                    exact[r]
                );
                worst_cpu = worst_cpu.max(e_cpu);
                worst_f32 = worst_f32.max(e_f32);
            }
            eprintln!(
                "{} {rows}x{cols} int8: {worst_cpu:.2e} from the CPU's int8, {worst_f32:.2e} from f32",
                format.name()
            );
            // y += W x doubles it.
            w.product(&gpu, xd.ptr, Some(q8.view()), 1, y.ptr, true)
                .unwrap();
            let mut twice = vec![0f32; rows];
            gpu.read(y.ptr, &mut twice).unwrap();
            for (a, b) in twice.iter().zip(&got) {
                assert!(
                    (a - 2.0 * b).abs() <= 1e-5 * b.abs().max(1e-3),
                    "{a} vs 2 x {b}"
                );
            }
            // The fused producers round the same values to the same codes: the same bits.
            let same = |what: &str, out: u64, q: &ops::Q8Buffer| {
                let y2 = gpu.alloc_f32(rows).unwrap();
                w.product(&gpu, out, Some(q.view()), 1, y2.ptr, false)
                    .unwrap();
                let mut want = vec![0f32; rows];
                ops::quantize_q8(&gpu, out, &q8, cols).unwrap();
                w.product(&gpu, out, Some(q8.view()), 1, y.ptr, false)
                    .unwrap();
                gpu.read(y.ptr, &mut want).unwrap();
                let mut got2 = vec![0f32; rows];
                gpu.read(y2.ptr, &mut got2).unwrap();
                assert!(
                    got2.iter()
                        .zip(&want)
                        .all(|(a, b)| a.to_bits() == b.to_bits()),
                    "{what}: {got2:?} vs {want:?}"
                );
            };
            let nw = gpu.upload(&rng.floats(cols)).unwrap();
            let (normed, q_norm) = (
                gpu.alloc_f32(cols).unwrap(),
                ops::Q8Buffer::new(&gpu, cols).unwrap(),
            );
            ops::rms_norm_q8(&gpu, xd.ptr, nw.ptr, normed.ptr, cols, 1e-6, &q_norm).unwrap();
            same("rms_norm_q8", normed.ptr, &q_norm);
            let u = gpu.upload(&rng.floats(cols)).unwrap();
            let (h, q_silu) = (
                gpu.alloc_f32(cols).unwrap(),
                ops::Q8Buffer::new(&gpu, cols).unwrap(),
            );
            ops::silu_mul_q8(&gpu, xd.ptr, u.ptr, h.ptr, cols, &q_silu).unwrap();
            same("silu_mul_q8", h.ptr, &q_silu);
        }
    }
}

/// The launch-saving forms of the int8 decode path give the bits of the plain ones: several
/// matrices over the same activations in one launch (`GpuMatrix::products`), and split
/// attention's merge writing o_proj's int8 input (against `quantize_q8` of its output).
#[test]
fn int8_fused_launches_give_the_bits_of_single_ones() {
    use moestream_cuda::matrix::GpuMatrix;
    let Some(gpu) = gpu() else { return };
    let mut rng = Rng(0x0188_f00d_0004);
    let cols = 512;
    let shapes = [
        (BlockFormat::Q4_K, 37usize),
        (BlockFormat::Q6_K, 19),
        (BlockFormat::Q4_K, 5),
    ];
    let data: Vec<Vec<u8>> = shapes
        .iter()
        .map(|&(f, rows)| ggml_blocks(&mut rng, f, rows * cols / 256))
        .collect();
    let mats: Vec<GpuMatrix> = shapes
        .iter()
        .zip(&data)
        .map(|(&(format, rows), d)| {
            let m = Matrix {
                rows,
                cols,
                weights: Weights::Ggml { format, data: d },
            };
            GpuMatrix::upload(&gpu, &m).unwrap()
        })
        .collect();
    let x = gpu.upload(&rng.floats(cols)).unwrap();
    let q8 = ops::Q8Buffer::new(&gpu, cols).unwrap();
    ops::quantize_q8(&gpu, x.ptr, &q8, cols).unwrap();
    let outs: Vec<_> = shapes
        .iter()
        .map(|&(_, rows)| gpu.alloc_f32(rows).unwrap())
        .collect();
    let list: Vec<(&GpuMatrix, u64)> = mats.iter().zip(&outs).map(|(m, o)| (m, o.ptr)).collect();
    GpuMatrix::products(&gpu, &list, x.ptr, Some(q8.view()), 1).unwrap();
    for ((m, o), &(format, rows)) in mats.iter().zip(&outs).zip(&shapes) {
        let fused = read(&gpu, o.ptr, rows);
        m.product(&gpu, x.ptr, Some(q8.view()), 1, o.ptr, false)
            .unwrap();
        let single = read(&gpu, o.ptr, rows);
        assert!(
            same_bits(&fused, &single),
            "{} in a multi launch: {fused:?} vs {single:?}",
            format.name()
        );
    }

    // Split attention over 8 heads of 64 (o_proj's input: 512 columns), its merge writing int8.
    let (heads, kv, head_dim, start) = (8usize, 2usize, 64usize, 300usize);
    let q = gpu.upload(&rng.floats(heads * head_dim)).unwrap();
    let k = gpu
        .upload(&rng.floats((start + 1) * kv * head_dim))
        .unwrap();
    let v = gpu
        .upload(&rng.floats((start + 1) * kv * head_dim))
        .unwrap();
    let out = gpu.alloc_f32(heads * head_dim).unwrap();
    let part = gpu.alloc_f32(heads * 16 * (head_dim + 2)).unwrap();
    let merged_q8 = ops::Q8Buffer::new(&gpu, cols).unwrap();
    let split = ops::AttentionSplit {
        part: part.ptr,
        splits: 16,
        floats: heads * 16 * (head_dim + 2),
        q8: Some(merged_q8.view()),
    };
    let quantized = ops::attention(
        &gpu,
        q.ptr,
        k.ptr,
        v.ptr,
        out.ptr,
        1,
        start,
        heads,
        kv,
        head_dim,
        0,
        Some(split),
    )
    .unwrap();
    assert!(quantized, "the split merge reports its int8 output");
    ops::quantize_q8(&gpu, out.ptr, &q8, cols).unwrap();
    let y = gpu.alloc_f32(37).unwrap();
    mats[0]
        .product(&gpu, out.ptr, Some(merged_q8.view()), 1, y.ptr, false)
        .unwrap();
    let from_merge = read(&gpu, y.ptr, 37);
    mats[0]
        .product(&gpu, out.ptr, Some(q8.view()), 1, y.ptr, false)
        .unwrap();
    let from_quantize = read(&gpu, y.ptr, 37);
    assert!(
        same_bits(&from_merge, &from_quantize),
        "attention_combine's int8 output"
    );
}

/// `len` floats at device address `ptr`.
fn read(gpu: &Gpu, ptr: u64, len: usize) -> Vec<f32> {
    let mut out = vec![0f32; len];
    gpu.read(ptr, &mut out).unwrap();
    out
}

fn same_bits(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
}

fn max_rel(a: &[f32], b: &[f32]) -> f32 {
    let scale = b.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-30);
    a.iter()
        .zip(b)
        .fold(0f32, |m, (x, y)| m.max((x - y).abs() / scale))
}

#[test]
fn norm_rope_attention_and_element_wise_match_the_cpu() {
    let Some(gpu) = gpu() else { return };
    let mut rng = Rng(0xfeed_0002);
    // RMSNorm.
    let (rows, width) = (5, 384);
    let x = rng.floats(rows * width);
    let w = rng.floats(width);
    let mut want = vec![0f32; rows * width];
    for (xr, or) in x.chunks_exact(width).zip(want.chunks_exact_mut(width)) {
        moestream_kernels::ops::rms_norm(xr, &w, 1e-6, or);
    }
    let (xd, wd, od) = (
        gpu.upload(&x).unwrap(),
        gpu.upload(&w).unwrap(),
        gpu.alloc_f32(rows * width).unwrap(),
    );
    ops::rms_norm(&gpu, xd.ptr, wd.ptr, od.ptr, rows, width, 1e-6).unwrap();
    let mut got = vec![0f32; rows * width];
    gpu.read(od.ptr, &mut got).unwrap();
    let e = max_rel(&got, &want);
    eprintln!("rms_norm: {e:.2e}");
    assert!(e < 1e-5, "rms_norm off by {e}");

    // RoPE, full and partial rotary, at a far position.
    for (head_dim, rot) in [(128usize, 128usize), (256, 64)] {
        let (n, heads, start) = (3usize, 4usize, 1000usize);
        let rope = Rope::new(rot, 1e6);
        let x = rng.floats(n * heads * head_dim);
        let mut want = x.clone();
        for t in 0..n {
            rope.apply(
                &mut want[t * heads * head_dim..(t + 1) * heads * head_dim],
                head_dim,
                start + t,
            );
        }
        let xd = gpu.upload(&x).unwrap();
        let fd = gpu.upload(rope.inv_freq()).unwrap();
        ops::rope(&gpu, xd.ptr, n, heads, head_dim, rot, fd.ptr, start).unwrap();
        let mut got = vec![0f32; x.len()];
        gpu.read(xd.ptr, &mut got).unwrap();
        let e = max_rel(&got, &want);
        eprintln!("rope d={head_dim} rot={rot}: {e:.2e}");
        assert!(e < 1e-4, "rope off by {e}");
        // The fused per-head norm + RoPE, its position read from device memory (the CUDA graph
        // path), with and without a norm weight.
        let w = rng.floats(head_dim);
        let mut normed = x.clone();
        for head in normed.chunks_exact_mut(head_dim) {
            let src = head.to_vec();
            moestream_kernels::ops::rms_norm(&src, &w, 1e-6, head);
        }
        for t in 0..n {
            rope.apply(
                &mut normed[t * heads * head_dim..(t + 1) * heads * head_dim],
                head_dim,
                start + t,
            );
        }
        let at = gpu.upload(&[start as u32]).unwrap();
        let wd = gpu.upload(&w).unwrap();
        for (weight, want) in [(0u64, &want), (wd.ptr, &normed)] {
            let xd = gpu.upload(&x).unwrap();
            ops::head_norm_rope(
                &gpu, xd.ptr, n, heads, head_dim, weight, 1e-6, rot, fd.ptr, 0, at.ptr,
            )
            .unwrap();
            let mut got = vec![0f32; x.len()];
            gpu.read(xd.ptr, &mut got).unwrap();
            let e = max_rel(&got, want);
            eprintln!(
                "head_norm_rope d={head_dim} rot={rot} norm={}: {e:.2e}",
                weight != 0
            );
            assert!(e < 1e-4, "head_norm_rope off by {e}");
        }
        // Queries and keys in one launch, the keys and values appended to the caches: the
        // bits of head_norm_rope for each (and of the plain copy for the values).
        let kv = 2usize;
        let (k, v) = (rng.floats(n * kv * head_dim), rng.floats(n * kv * head_dim));
        let kw = gpu.upload(&rng.floats(head_dim)).unwrap();
        let (qd, kd, vd) = (
            gpu.upload(&x).unwrap(),
            gpu.upload(&k).unwrap(),
            gpu.upload(&v).unwrap(),
        );
        let cache = (start + n) * kv * head_dim;
        let (kc, vc) = (gpu.alloc_f32(cache).unwrap(), gpu.alloc_f32(cache).unwrap());
        ops::qk_norm_rope_append(
            &gpu,
            (qd.ptr, kd.ptr, vd.ptr),
            n,
            (heads, kv, head_dim),
            (wd.ptr, 1e-6),
            (kw.ptr, 1e-5),
            rot,
            fd.ptr,
            (0, at.ptr),
            (kc.ptr, vc.ptr),
        )
        .unwrap();
        let (rq, rk) = (gpu.upload(&x).unwrap(), gpu.upload(&k).unwrap());
        ops::head_norm_rope(
            &gpu, rq.ptr, n, heads, head_dim, wd.ptr, 1e-6, rot, fd.ptr, start, 0,
        )
        .unwrap();
        ops::head_norm_rope(
            &gpu, rk.ptr, n, kv, head_dim, kw.ptr, 1e-5, rot, fd.ptr, start, 0,
        )
        .unwrap();
        let tail = start * kv * head_dim;
        let (kc_all, vc_all) = (read(&gpu, kc.ptr, cache), read(&gpu, vc.ptr, cache));
        assert!(
            same_bits(&read(&gpu, qd.ptr, x.len()), &read(&gpu, rq.ptr, x.len())),
            "fused queries"
        );
        assert!(
            same_bits(&kc_all[tail..], &read(&gpu, rk.ptr, k.len())),
            "fused keys in the cache"
        );
        assert!(same_bits(&vc_all[tail..], &v), "fused values in the cache");
    }

    // Causal grouped-query attention: a prompt after a cached prefix, and one decode step.
    for (n, start, head_dim) in [
        (7usize, 50usize, 128usize),
        (1, 300, 64),
        (1, 5, 128),
        (4, 0, 256),
    ] {
        let shape = AttentionShape {
            n_heads: 8,
            n_kv_heads: 2,
            head_dim,
        };
        let kvw = 2 * head_dim;
        let q = rng.floats(n * 8 * head_dim);
        let k = rng.floats((start + n) * kvw);
        let v = rng.floats((start + n) * kvw);
        let mut want = vec![0f32; n * 8 * head_dim];
        moestream_kernels::ops::attention(shape, &q, &k, &v, start, n, &mut want);
        let (qd, kd, vd) = (
            gpu.upload(&q).unwrap(),
            gpu.upload(&k).unwrap(),
            gpu.upload(&v).unwrap(),
        );
        let od = gpu.alloc_f32(want.len()).unwrap();
        // Whole, and (one token) split over 16 blocks a head: more blocks than positions too.
        let part = gpu.alloc_f32(8 * 16 * (head_dim + 2)).unwrap();
        for splits in [None, Some(16)] {
            let split = splits.map(|splits| ops::AttentionSplit {
                part: part.ptr,
                splits,
                floats: 8 * 16 * (head_dim + 2),
                q8: None,
            });
            ops::attention(
                &gpu, qd.ptr, kd.ptr, vd.ptr, od.ptr, n, start, 8, 2, head_dim, 0, split,
            )
            .unwrap();
            let mut got = vec![0f32; want.len()];
            gpu.read(od.ptr, &mut got).unwrap();
            let e = max_rel(&got, &want);
            eprintln!("attention n={n} start={start} d={head_dim} split {splits:?}: {e:.2e}");
            assert!(e < 1e-5, "attention off by {e}");
        }
    }

    // silu(g)·u.
    let g = rng.floats(1000);
    let u = rng.floats(1000);
    let mut want = g.clone();
    moestream_kernels::ops::silu_mul(&mut want, &u);
    let (gd, ud) = (gpu.upload(&g).unwrap(), gpu.upload(&u).unwrap());
    ops::silu_mul(&gpu, gd.ptr, ud.ptr, gd.ptr, 1000).unwrap();
    let mut got = vec![0f32; 1000];
    gpu.read(gd.ptr, &mut got).unwrap();
    let e = max_rel(&got, &want);
    assert!(e < 1e-6, "silu_mul off by {e}");
}

#[test]
fn gated_deltanet_kernels_match_the_cpu() {
    use moestream_kernels::deltanet::{self, DeltaInputs, DeltaShape, ValueHeadOrder};
    let Some(gpu) = gpu() else { return };
    let mut rng = Rng(0x000d_e17a_0003);
    for order in [ValueHeadOrder::Grouped, ValueHeadOrder::Tiled] {
        let shape = DeltaShape {
            n_k_heads: 2,
            n_v_heads: 4,
            k_dim: 64,
            v_dim: 32,
            order,
        };
        let (nk, nv, dk, dv) = (2usize, 4usize, 64usize, 32usize);
        let c = 2 * nk * dk + nv * dv;
        let (n, taps) = (5usize, 4usize);
        // Convolution + SiLU with a carried state, then the state after the pass.
        let x = rng.floats(n * c);
        let w = rng.floats(c * taps);
        let state = rng.floats((taps - 1) * c);
        let mut want = vec![0f32; n * c];
        let mut want_state = vec![0f32; state.len()];
        deltanet::causal_conv1d_silu(&x, n, c, &w, taps, &state, &mut want_state, &mut want);
        let (xd, wd, sd, od) = (
            gpu.upload(&x).unwrap(),
            gpu.upload(&w).unwrap(),
            gpu.upload(&state).unwrap(),
            gpu.alloc_f32(n * c).unwrap(),
        );
        ops::conv1d_silu(&gpu, xd.ptr, wd.ptr, sd.ptr, od.ptr, n, c, taps).unwrap();
        let mut got = vec![0f32; n * c];
        gpu.read(od.ptr, &mut got).unwrap();
        let mut got_state = vec![0f32; state.len()];
        gpu.read(sd.ptr, &mut got_state).unwrap();
        let (e, es) = (max_rel(&got, &want), max_rel(&got_state, &want_state));
        eprintln!("conv1d_silu {order:?}: {e:.2e}, state {es:.2e}");
        assert!(e < 1e-5 && es == 0.0, "conv1d_silu off by {e} (state {es})");

        // L2 norms in place on the convolution output, gates, then the delta rule token by
        // token against gated_delta_step from the same state.
        let xc = want.clone();
        let (qk, kk) = (nk * dk, 2 * nk * dk);
        let mut q = Vec::new();
        let mut k = Vec::new();
        let mut v = Vec::new();
        for row in xc.chunks_exact(c) {
            q.extend_from_slice(&row[..qk]);
            k.extend_from_slice(&row[qk..kk]);
            v.extend_from_slice(&row[kk..]);
        }
        deltanet::l2_normalize_rows(&mut q, dk, 1.0 / (dk as f32).sqrt());
        deltanet::l2_normalize_rows(&mut k, dk, 1.0);
        let (b, a) = (rng.floats(n * nv), rng.floats(n * nv));
        let (neg_a, dt_bias) = (rng.floats(nv), rng.floats(nv));
        let beta: Vec<f32> = b.iter().map(|&x| deltanet::sigmoid(x)).collect();
        let g: Vec<f32> = a
            .iter()
            .enumerate()
            .map(|(i, &x)| -neg_a[i % nv].abs() * deltanet::softplus(x + dt_bias[i % nv]))
            .collect();
        let s0 = rng.floats(shape.state_len());
        let mut s = s0.clone();
        let mut next = vec![0f32; s.len()];
        let mut want_o = vec![0f32; n * nv * dv];
        let inputs = DeltaInputs {
            q: &q,
            k: &k,
            v: &v,
            g: &g,
            beta: &beta,
        };
        for t in 0..n {
            let o = &mut want_o[t * nv * dv..(t + 1) * nv * dv];
            deltanet::gated_delta_step(shape, inputs.token(shape, t), &s, &mut next, o);
            std::mem::swap(&mut s, &mut next);
        }
        let xcd = gpu.upload(&xc).unwrap();
        ops::l2norm_heads(&gpu, xcd.ptr, n, nk, dk, c, 1.0 / (dk as f32).sqrt()).unwrap();
        ops::l2norm_heads(&gpu, xcd.ptr + 4 * qk as u64, n, nk, dk, c, 1.0).unwrap();
        let neg: Vec<f32> = neg_a.iter().map(|x| -x.abs()).collect();
        let (bd, ad, nd, dd) = (
            gpu.upload(&b).unwrap(),
            gpu.upload(&a).unwrap(),
            gpu.upload(&neg).unwrap(),
            gpu.upload(&dt_bias).unwrap(),
        );
        let (betad, gd) = (
            gpu.alloc_f32(n * nv).unwrap(),
            gpu.alloc_f32(n * nv).unwrap(),
        );
        ops::delta_gates(
            &gpu, bd.ptr, ad.ptr, nd.ptr, dd.ptr, betad.ptr, gd.ptr, n, nv,
        )
        .unwrap();
        let sd = gpu.upload(&s0).unwrap();
        let od = gpu.alloc_f32(n * nv * dv).unwrap();
        let tiled = order == ValueHeadOrder::Tiled;
        ops::gated_delta(
            &gpu,
            sd.ptr,
            xcd.ptr,
            c,
            gd.ptr,
            betad.ptr,
            od.ptr,
            n,
            (nk, nv, dk, dv),
            tiled,
        )
        .unwrap();
        let mut got_o = vec![0f32; want_o.len()];
        gpu.read(od.ptr, &mut got_o).unwrap();
        let mut got_s = vec![0f32; s.len()];
        gpu.read(sd.ptr, &mut got_s).unwrap();
        let (eo, es) = (max_rel(&got_o, &want_o), max_rel(&got_s, &s));
        eprintln!("gated_delta {order:?}: output {eo:.2e}, state {es:.2e}");
        assert!(
            eo < 1e-5 && es < 1e-5,
            "gated_delta off by {eo} (state {es})"
        );
    }
}

#[test]
fn routing_on_the_gpu_chooses_what_the_cpu_chooses() {
    let Some(gpu) = gpu() else { return };
    let mut rng = Rng(0x0707_0004);
    for (e, k) in [(128usize, 8usize), (512, 10), (64, 4)] {
        for renormalize in [true, false] {
            let logits: Vec<f32> = rng.floats(e).iter().map(|v| v * 8.0).collect();
            let mut p = logits.clone();
            moestream_kernels::ops::softmax(&mut p);
            let mut chosen = moestream_kernels::ops::top_k(&p, k);
            if renormalize {
                let s: f32 = chosen.iter().map(|c| c.1).sum();
                chosen.iter_mut().for_each(|c| c.1 /= s);
            }
            chosen.sort_unstable_by_key(|c| c.0);
            let bases: Vec<u64> = (0..e as u64).map(|i| 0x1000 * (i + 1)).collect();
            let (ld, bd, td) = (
                gpu.upload(&logits).unwrap(),
                gpu.upload(&bases).unwrap(),
                gpu.alloc_f32(5 * k).unwrap(),
            );
            ops::route_top_k(&gpu, ld.ptr, e, k, renormalize, bd.ptr, 8, td.ptr).unwrap();
            let mut table = vec![0f32; 5 * k];
            gpu.read(td.ptr, &mut table).unwrap();
            let words: Vec<u64> = table[..4 * k]
                .chunks_exact(2)
                .map(|w| w[0].to_bits() as u64 | (w[1].to_bits() as u64) << 32)
                .collect();
            for (j, &(id, weight)) in chosen.iter().enumerate() {
                assert_eq!(words[j], bases[id], "E={e} k={k}: expert {j}");
                assert_eq!(words[k + j], bases[id] + 8, "E={e} k={k}: up base {j}");
                let got = table[4 * k + j];
                assert!(
                    (got - weight).abs() <= 1e-6 * weight.abs().max(1e-3),
                    "weight {got} vs {weight}"
                );
            }
        }
    }
}
