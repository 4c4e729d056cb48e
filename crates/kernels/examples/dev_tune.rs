// TEMPORARY tuning bench (not for commit): CPU-time per call on the calling thread.
use moestream_kernels::features::SimdLevel;
use moestream_kernels::{matmul_with, FloatKind, Matrix, Weights};
fn cpu_ns() -> u64 {
    let s = std::fs::read_to_string("/proc/thread-self/schedstat").unwrap();
    s.split_whitespace().next().unwrap().parse().unwrap()
}
fn next(s: &mut u64) -> u64 {
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    *s
}
fn main() {
    let args: Vec<String> = std::env::args().collect();
    let what = args[1].as_str();
    let rows: usize = args[2].parse().unwrap();
    let cols: usize = args[3].parse().unwrap();
    let n: usize = args[4].parse().unwrap();
    let level = if args.get(5).map(|s| s.as_str()) == Some("scalar") {
        SimdLevel::Scalar
    } else {
        SimdLevel::Avx512
    };
    let mut s = 99u64;
    let bf = |n: usize, s: &mut u64| -> Vec<u8> {
        (0..n / 2)
            .flat_map(|_| (((next(s) as u16) & 0x807f) | (0x78 << 7)).to_le_bytes())
            .collect()
    };
    let (bits, kind) = match what {
        "q2" => (2, None),
        "q3" => (3, None),
        "q4" => (4, None),
        "q5" => (5, None),
        "q6" => (6, None),
        "q8" => (8, None),
        "bf16" => (0, Some(FloatKind::BF16)),
        "f16" => (0, Some(FloatKind::F16)),
        _ => (0, Some(FloatKind::F32)),
    };
    let packed: Vec<u8> = (0..rows * cols * bits / 8)
        .map(|_| next(&mut s) as u8)
        .collect();
    let sc = bf(rows * cols / 64 * 2, &mut s);
    let bi = bf(rows * cols / 64 * 2, &mut s);
    let data: Vec<u8> = match kind {
        Some(FloatKind::F32) => (0..rows * cols)
            .flat_map(|_| ((next(&mut s) >> 40) as f32 / 1e7).to_le_bytes())
            .collect(),
        Some(FloatKind::F16) => (0..rows * cols)
            .flat_map(|_| half::f16::from_f32((next(&mut s) >> 40) as f32 / 1e7).to_le_bytes())
            .collect(),
        _ => bf(rows * cols * 2, &mut s),
    };
    let m = match kind {
        None => Matrix {
            rows,
            cols,
            weights: Weights::Affine {
                bits: bits as u32,
                group_size: 64,
                packed: &packed,
                scales: &sc,
                biases: &bi,
                scale_kind: FloatKind::BF16,
            },
        },
        Some(k) => Matrix {
            rows,
            cols,
            weights: Weights::Float {
                kind: k,
                data: &data,
            },
        },
    };
    let x: Vec<f32> = (0..n * cols).map(|i| (i % 7) as f32 * 0.1).collect();
    let mut y = vec![0f32; n * rows];
    matmul_with(level, &m, &x, n, &mut y);
    let t0 = cpu_ns();
    let w0 = std::time::Instant::now();
    let mut calls = 0;
    while cpu_ns() - t0 < 1_000_000_000 {
        for _ in 0..20 {
            matmul_with(level, &m, &x, n, &mut y);
        }
        calls += 20;
    }
    let ns = (cpu_ns() - t0) as f64 / calls as f64;
    let wall = w0.elapsed().as_nanos() as f64 / calls as f64;
    println!("{what} {rows}x{cols} n={n} {level:?}: {:.1} us/call cpu ({:.1} wall), {:.2} GB/s cpu, {:.2} Gelem*tok/s", ns / 1e3, wall / 1e3, m.size_bytes() as f64 / ns, (rows * cols * n) as f64 / ns);
}
