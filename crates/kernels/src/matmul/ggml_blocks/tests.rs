//! The block kernels with f32 activations: SIMD decoding bit-identical to the scalar decoder,
//! products against the scalar twin (tolerance of `matmul/tests.rs`), and the quantizer's round
//! trip. (The int16 decode path: `int16/tests.rs`.)
//! (Bit-exactness against gguf-py is `crates/kernels/tests/ggml_blocks.rs`.)
use super::super::tests::{fresh_seed, report, Rng};
use super::super::{matmul_scalar, matmul_with_precision};
use crate::features::{cpu_level, ActivationPrecision, SimdLevel};
use crate::ggml::{dequantize_row, quantize_row, BlockFormat};
use crate::{Matrix, Weights};

/// Random blocks whose f16 scales are finite (random bytes elsewhere).
pub(crate) fn random_blocks(
    rng: &mut Rng,
    format: BlockFormat,
    rows: usize,
    cols: usize,
) -> Vec<u8> {
    let mut data = rng.bytes(rows * format.row_bytes(cols));
    for block in data.chunks_exact_mut(format.block_bytes()) {
        for &at in format.f16_offsets() {
            let v = half::f16::from_f32(rng.signed() * 0.05);
            block[at..at + 2].copy_from_slice(&v.to_le_bytes());
        }
    }
    data
}

fn decoded(format: BlockFormat, data: &[u8], rows: usize, cols: usize) -> Vec<f32> {
    let mut w = vec![0f32; rows * cols];
    for (row, out) in data
        .chunks_exact(format.row_bytes(cols))
        .zip(w.chunks_exact_mut(cols))
    {
        dequantize_row(format, row, out);
    }
    w
}

#[test]
fn avx2_decoding_is_bit_identical_to_scalar() {
    if cpu_level() < SimdLevel::Avx2 {
        report("skipped: no AVX2");
        return;
    }
    let seed = fresh_seed();
    let mut rng = Rng::new(seed);
    for format in BlockFormat::ALL {
        let cols = 4 * 256;
        let data = random_blocks(&mut rng, format, 3, cols);
        let want = decoded(format, &data, 3, cols);
        let mut got = vec![0f32; 3 * cols];
        for (row, out) in data
            .chunks_exact(format.row_bytes(cols))
            .zip(got.chunks_exact_mut(cols))
        {
            // SAFETY: AVX2 checked above; the row has row_bytes(cols) bytes.
            unsafe { super::avx2::decode_row(format, row, out) };
        }
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_eq!(
                g.to_bits(),
                w.to_bits(),
                "{} value {i}: {g} vs {w} (seed {seed})",
                format.name()
            );
        }
    }
}

#[test]
fn avx2_products_match_scalar() {
    let seed = fresh_seed();
    let mut rng = Rng::new(seed);
    for format in BlockFormat::ALL {
        for (rows, cols) in [(1, 256), (3, 512), (17, 768), (70, 2048)] {
            let data = random_blocks(&mut rng, format, rows, cols);
            let m = Matrix {
                rows,
                cols,
                weights: Weights::Ggml {
                    format,
                    data: &data,
                },
            };
            m.validate().unwrap();
            let w = decoded(format, &data, rows, cols);
            for n in [1, 2, 9, 33] {
                let x = rng.floats(n * cols);
                let mut got = vec![f32::NAN; n * rows];
                let mut want = vec![f32::NAN; n * rows];
                matmul_with_precision(
                    SimdLevel::Avx512,
                    ActivationPrecision::F32,
                    &m,
                    &x,
                    n,
                    &mut got,
                );
                matmul_scalar(&m, &x, n, &mut want);
                for (idx, (g, e)) in got.iter().zip(&want).enumerate() {
                    let (t, o) = (idx / rows, idx % rows);
                    let mag: f64 = (0..cols)
                        .map(|i| (w[o * cols + i] as f64 * x[t * cols + i] as f64).abs())
                        .sum();
                    let exact: f64 = (0..cols)
                        .map(|i| w[o * cols + i] as f64 * x[t * cols + i] as f64)
                        .sum();
                    let bound = 1e-5 * mag + 1e-6;
                    assert!(
                        (*g as f64 - *e as f64).abs() <= bound,
                        "{} {rows}x{cols} n={n} y[{t},{o}]: {g} vs {e} (seed {seed})",
                        format.name()
                    );
                    assert!(
                        (*e as f64 - exact).abs() <= bound,
                        "{} scalar vs f64: {e} vs {exact} (seed {seed})",
                        format.name()
                    );
                }
            }
        }
    }
}

#[test]
fn quantizer_round_trips_within_its_step() {
    let seed = fresh_seed();
    let mut rng = Rng::new(seed);
    for format in BlockFormat::ALL {
        let cols = 1024;
        let x: Vec<f32> = rng.floats(cols).into_iter().map(|v| v * 0.1).collect();
        let q = quantize_row(format, &x);
        assert_eq!(q.len(), format.row_bytes(cols));
        let mut y = vec![0f32; cols];
        dequantize_row(format, &q, &mut y);
        // Worst step: 4-bit formats span each block's range in 15 steps (Q4_0: 16 over twice the
        // largest magnitude, Q4_K: 15 plus 6-bit scale rounding).
        let bound = match format {
            BlockFormat::Q8_0 => 0.1 / 127.0,
            BlockFormat::Q6_K => 0.1 / 31.0 * 1.2,
            BlockFormat::Q5_K => 0.2 / 31.0 * 1.5,
            // 32 levels over twice the largest magnitude.
            BlockFormat::Q5_0 => 0.2 / 31.0 * 1.2,
            _ => 0.2 / 15.0 * 1.5,
        };
        for (i, (a, b)) in x.iter().zip(&y).enumerate() {
            assert!(
                (a - b).abs() <= bound,
                "{} value {i}: {a} -> {b} (seed {seed})",
                format.name()
            );
        }
    }
}

#[test]
fn validate_checks_block_layouts() {
    let data = vec![0u8; 144];
    let ok = Matrix {
        rows: 1,
        cols: 256,
        weights: Weights::Ggml {
            format: BlockFormat::Q4_K,
            data: &data,
        },
    };
    assert!(ok.validate().is_ok());
    let bad_cols = Matrix {
        rows: 1,
        cols: 128,
        ..ok
    };
    assert!(bad_cols
        .validate()
        .unwrap_err()
        .0
        .contains("not whole Q4_K blocks"));
    let bad_len = Matrix { rows: 2, ..ok };
    assert!(bad_len
        .validate()
        .unwrap_err()
        .0
        .contains("needs 288 bytes"));
}
