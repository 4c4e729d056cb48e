//! Tests of the int8 path for llama.cpp blocks; fresh random inputs on every run, replayable
//! with `MOESTREAM_TEST_SEED=<seed>`.
//!
//! Weights are decomposed as `w_i = a_i·q_i − m_i` independently of the kernels (the int16
//! tests' `decompose`), so that
//! - the AVX2 kernels and the scalar twin are shown to add the same integer sums: on inputs where
//!   every f32 operation is exact (scales 1, integer activations with a largest value of 127 per
//!   span, so steps of 1 and no residuals) their outputs are equal, bit for bit;
//! - on random inputs the AVX2 kernel stays within `4e-6 · T_o` of the twin,
//!   `T_o = Σ_i (|a_i·q_i·x_i| + |m_i·x_i|)` (the same sums, scaled and added in another order);
//! - a token's result has the same bits whatever the tokens computed beside it;
//! - the int8 path stays within the rounding bound `E_o = Σ_i |a_i|·|q_i − z|·dx_i / 2`
//!   (`dx = max|x| / 127` per span of 32) plus f32 rounding of the exact f32 path, on
//!   activations without and with outliers; the worst `|error| / Σ|w·x|` is reported.
use super::{supports, Int8Row};
use crate::features::{cpu_level, ActivationPrecision, SimdLevel};
use crate::ggml::BlockFormat;
use crate::matmul::ggml_blocks::int16::tests::{activations_with_outliers, data_of, decompose};
use crate::matmul::ggml_blocks::int16::SPAN;
use crate::matmul::ggml_blocks::tests::random_blocks;
use crate::matmul::tests::{fresh_seed, report, Rng, TestMatrix};
use crate::matmul::{matmul_scalar, matmul_with_precision};
use crate::Matrix;

const INT8: ActivationPrecision = ActivationPrecision::Int8;

fn formats() -> impl Iterator<Item = BlockFormat> {
    BlockFormat::ALL.into_iter().filter(|&f| supports(f))
}

fn has_avx2() -> bool {
    cpu_level() >= SimdLevel::Avx2
}

/// `out[r * xs.len() + t]` by the scalar twin, or by the AVX2 kernel with `avx2`.
fn product(format: BlockFormat, data: &[u8], cols: usize, xs: &[&Int8Row], avx2: bool) -> Vec<f32> {
    let rows = data.len() / format.row_bytes(cols);
    let mut out = vec![f32::NAN; rows * xs.len()];
    if avx2 {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: callers check AVX2+FMA+F16C; `data` holds whole rows of `format` blocks for
        // `cols` columns and every row of `xs` was quantized from `cols` values for `format`.
        unsafe {
            super::avx2::matmul_block(format, data, cols, xs, 0..rows, &mut out)
        };
    } else {
        super::matmul_block(format, data, cols, xs, 0..rows, &mut out);
    }
    out
}

/// Offsets of the f16 scales of a block (`d`, and `dmin` for Q4_K/Q5_K).
fn scale_offsets(format: BlockFormat) -> &'static [usize] {
    match format {
        BlockFormat::Q4_K | BlockFormat::Q5_K => &[0, 2],
        BlockFormat::Q6_K => &[208],
        _ => &[0],
    }
}

#[test]
fn int8_blocks_avx2_integer_sums_equal_scalar_twin() {
    if !has_avx2() {
        report("SKIPPED int8_blocks_avx2_integer_sums_equal_scalar_twin: no AVX2+FMA+F16C");
        return;
    }
    let seed = fresh_seed();
    let mut rng = Rng::new(seed);
    // One super-block per row: with |x| ≤ 8 but one ±127 per span every partial sum stays below
    // 2^24 (Q6_K, the largest: 16 groups · 128 · 16 · (15·8 + 127)·2 < 2^24), so both sides are
    // exact and must agree to the bit.
    let (rows, cols) = (37, 256);
    for format in formats() {
        let mut data = random_blocks(&mut rng, format, rows, cols);
        for block in data.chunks_exact_mut(format.block_bytes()) {
            for &at in scale_offsets(format) {
                block[at..at + 2].copy_from_slice(&half::f16::ONE.to_le_bytes());
            }
        }
        let rows_x: Vec<Vec<f32>> = (0..6)
            .map(|_| {
                let mut x: Vec<f32> = (0..cols)
                    .map(|_| (rng.next_u64() % 17) as f32 - 8.0)
                    .collect();
                for span in x.chunks_exact_mut(SPAN) {
                    let i = (rng.next_u64() % SPAN as u64) as usize;
                    span[i] = if rng.signed() < 0.0 { -127.0 } else { 127.0 };
                }
                x
            })
            .collect();
        let quantized: Vec<Int8Row> = rows_x.iter().map(|x| Int8Row::new(x, format)).collect();
        for q in &quantized {
            assert!(q.steps.iter().all(|&s| s == 1.0));
        }
        let xs: Vec<&Int8Row> = quantized.iter().collect();
        let want = product(format, &data, cols, &xs, false);
        let got = product(format, &data, cols, &xs, true);
        assert!(
            got.iter()
                .zip(&want)
                .all(|(g, w)| g.to_bits() == w.to_bits()),
            "{}: AVX2 {:?}… vs twin {:?}… (seed {seed})",
            format.name(),
            &got[..6],
            &want[..6]
        );
    }
}

/// Random blocks and activations: the AVX2 kernel within `4e-6 · T_o` of the twin, and every
/// token with the bits it has alone, for 1 to 9 tokens per call (groups of 4, 3, 2, 1).
#[test]
fn int8_blocks_avx2_match_twin_and_tokens_keep_their_bits() {
    if !has_avx2() {
        report("SKIPPED int8_blocks_avx2_match_twin_and_tokens_keep_their_bits: no AVX2");
        return;
    }
    let seed = fresh_seed();
    let mut rng = Rng::new(seed);
    let mut worst = 0f64;
    for format in formats() {
        let mut shapes = vec![(3, 256), (19, 2048)];
        if format.block_elements() == 32 {
            shapes.push((5, 352));
        }
        for (rows, cols) in shapes {
            let tm = TestMatrix::ggml(&mut rng, format, rows, cols);
            let m = tm.matrix();
            let (format, data) = data_of(&m);
            let rows_x: Vec<Vec<f32>> = (0..9).map(|_| rng.floats(cols)).collect();
            let quantized: Vec<Int8Row> = rows_x.iter().map(|x| Int8Row::new(x, format)).collect();
            let alone: Vec<Vec<f32>> = quantized
                .iter()
                .map(|q| product(format, data, cols, &[q], true))
                .collect();
            for nt in 1..=9 {
                let xs: Vec<&Int8Row> = quantized[..nt].iter().collect();
                let got = product(format, data, cols, &xs, true);
                let want = product(format, data, cols, &xs, false);
                for t in 0..nt {
                    let mags = magnitudes(&m, data, format, &rows_x[t]);
                    for (o, (terms, _, _)) in mags.into_iter().enumerate() {
                        let (g, w) = (got[o * nt + t], want[o * nt + t]);
                        assert_eq!(
                            g.to_bits(),
                            alone[t][o].to_bits(),
                            "{} {rows}x{cols}: token {t} of {nt}, row {o} differs from the \
                             token alone (seed {seed})",
                            format.name()
                        );
                        let err = (g as f64 - w as f64).abs();
                        let bound = 4e-6 * terms + 1e-7;
                        assert!(
                            err <= bound,
                            "{} {rows}x{cols} y[{o}] token {t}/{nt}: {g} vs twin {w}, error \
                             {err:e} > {bound:e} (seed {seed})",
                            format.name()
                        );
                        worst = worst.max(err / terms.max(1e-30));
                    }
                }
            }
        }
    }
    report(&format!(
        "int8_blocks_avx2_match_twin_and_tokens_keep_their_bits: worst |error| / T = {worst:.1e}"
    ));
}

/// Per output of token `x`: `(T_o, E_o, Σ|w·x|)` with the int8 steps (module docs).
fn magnitudes(m: &Matrix, data: &[u8], format: BlockFormat, x: &[f32]) -> Vec<(f64, f64, f64)> {
    let (w, z) = decompose(format, data);
    let steps: Vec<f64> = x
        .chunks_exact(SPAN)
        .map(|s| s.iter().fold(0f64, |a, v| a.max(v.abs() as f64)) / 127.0)
        .collect();
    w.chunks_exact(m.cols)
        .map(|row| {
            let (mut terms, mut rounding, mut abs) = (0f64, 0f64, 0f64);
            for (i, &(a, q, mn)) in row.iter().enumerate() {
                let x = x[i] as f64;
                terms += (a * q * x).abs() + (mn * x).abs();
                rounding += a.abs() * (q - z).abs() * steps[i / SPAN] / 2.0;
                abs += ((a * q - mn) * x).abs();
            }
            (terms, rounding, abs)
        })
        .collect()
}

/// The accuracy contract of the module docs, at the scalar level and the best level of this CPU,
/// for one token and for three at once.
#[test]
fn int8_blocks_match_f32_path() {
    let seed = fresh_seed();
    let mut rng = Rng::new(seed);
    let (rows, cols) = (64, 2048);
    let cases = [(0, 1.0), (4, 50.0), (32, 50.0)];
    let mut lines = Vec::new();
    for format in formats() {
        let tm = TestMatrix::ggml(&mut rng, format, rows, cols);
        let m = tm.matrix();
        let (format, data) = data_of(&m);
        let mut worst = [0f64; 3];
        for (case, (outliers, scale)) in cases.into_iter().enumerate() {
            let x: Vec<f32> = (0..3)
                .flat_map(|_| activations_with_outliers(&mut rng, cols, outliers, scale))
                .collect();
            let mut want = vec![f32::NAN; 3 * rows];
            matmul_scalar(&m, &x, 3, &mut want);
            for level in [SimdLevel::Scalar, cpu_level()] {
                for n in [1, 3] {
                    let mut got = vec![f32::NAN; n * rows];
                    matmul_with_precision(level, INT8, &m, &x[..n * cols], n, &mut got);
                    for t in 0..n {
                        let xt = &x[t * cols..(t + 1) * cols];
                        let mags = magnitudes(&m, data, format, xt);
                        for (o, (terms, rounding, abs)) in mags.into_iter().enumerate() {
                            let (g, e) = (got[t * rows + o], want[t * rows + o]);
                            let what = format!(
                                "{level:?} {} {outliers} outliers ×{scale}, token {t} of {n}, \
                                 y[{o}] = {g}, f32 path {e} (seed {seed})",
                                format.name()
                            );
                            let err = (g as f64 - e as f64).abs();
                            assert!(
                                err <= rounding + 1e-5 * terms + 1e-6,
                                "{what}: error {err:e} above the rounding bound {rounding:e}"
                            );
                            let bound = 2e-2 * abs + 1e-6;
                            assert!(err <= bound, "{what}: error {err:e} > {bound:e}");
                            worst[case] = worst[case].max(err / abs);
                        }
                    }
                }
            }
        }
        lines.push(format!(
            "{} {:.1e} / {:.1e} / {:.1e}",
            format.name(),
            worst[0],
            worst[1],
            worst[2]
        ));
    }
    report(&format!(
        "int8_blocks_match_f32_path ({rows}x{cols}): worst |error| / Σ|w·x| without outliers / 4 ×50 / 32 ×50: {}",
        lines.join(", ")
    ));
}

/// Zero rows give zero, spans of zeros and tiny values stay within the bound, NaN and infinities
/// reach every output, for one token and several.
#[test]
fn int8_blocks_zero_and_nonfinite_spans() {
    let seed = fresh_seed();
    let mut rng = Rng::new(seed);
    for format in formats() {
        let tm = TestMatrix::ggml(&mut rng, format, 5, 512);
        let m = tm.matrix();
        let (format, data) = data_of(&m);
        for level in [SimdLevel::Scalar, cpu_level()] {
            let run = |x: &[f32], n: usize| {
                let mut y = vec![f32::NAN; 5 * n];
                matmul_with_precision(level, INT8, &m, x, n, &mut y);
                y
            };
            let what = format!("{level:?} {} (seed {seed})", format.name());
            assert_eq!(run(&[0.0; 1024], 2), [0.0; 10], "{what}: zero rows");
            let mut x = rng.floats(512);
            x[..64].fill(0.0);
            for v in &mut x[256..320] {
                *v *= 1e-36;
            }
            let got = run(&x, 1);
            let mut want = vec![0f32; 5];
            matmul_scalar(&m, &x, 1, &mut want);
            for ((g, e), (terms, rounding, _)) in
                got.iter().zip(&want).zip(magnitudes(&m, data, format, &x))
            {
                let err = (*g as f64 - *e as f64).abs();
                assert!(
                    err <= rounding + 1e-5 * terms + 1e-6,
                    "{what}: {g} vs f32 {e}, error {err:e} above {rounding:e}"
                );
            }
            for bad in [f32::NAN, f32::INFINITY] {
                let mut x = rng.floats(1024);
                x[512 + 70] = bad;
                let y = run(&x, 2);
                assert!(
                    y.chunks_exact(5)
                        .nth(1)
                        .is_some_and(|t| t.iter().all(|y| y.is_nan())),
                    "{what}: {bad} in x must give NaN"
                );
                assert!(
                    y[..5].iter().all(|y| y.is_finite()),
                    "{what}: {bad} in one token must not reach another"
                );
            }
        }
    }
}

/// The AVX-512 VNNI kernels (`vpdpbusd`) give the AVX2 kernels' bits: the same exact integer
/// sums, then the same f32 operations. Every format, 1 to 9 tokens, two shapes.
#[test]
fn int8_blocks_vnni_give_the_avx2_bits() {
    if !crate::features::avx512_vnni() {
        report("SKIPPED int8_blocks_vnni_give_the_avx2_bits: no AVX-512 VNNI");
        return;
    }
    let seed = fresh_seed();
    let mut rng = Rng::new(seed);
    for format in formats() {
        for (rows, cols) in [(3, 256), (19, 2048)] {
            let tm = TestMatrix::ggml(&mut rng, format, rows, cols);
            let m = tm.matrix();
            let (format, data) = data_of(&m);
            let quantized: Vec<Int8Row> = (0..9)
                .map(|_| Int8Row::new(&rng.floats(cols), format))
                .collect();
            for nt in 1..=9 {
                let xs: Vec<&Int8Row> = quantized[..nt].iter().collect();
                let avx2 = product(format, data, cols, &xs, true);
                let mut vnni = vec![f32::NAN; rows * nt];
                // SAFETY: AVX-512 VNNI + VL checked above (with AVX2, FMA, F16C: avx512_vnni
                // requires the AVX-512 level); `data` holds whole rows of `format` blocks and
                // every token was quantized from `cols` values for `format`.
                unsafe {
                    super::avx2::vnni::matmul_block(format, data, cols, &xs, 0..rows, &mut vnni)
                };
                for (i, (a, v)) in avx2.iter().zip(&vnni).enumerate() {
                    assert_eq!(
                        a.to_bits(),
                        v.to_bits(),
                        "{} {rows}x{cols}, {nt} tokens, output {i}: AVX2 {a} vs VNNI {v} (seed {seed})",
                        format.name()
                    );
                }
            }
        }
    }
}
