//! Tests of the int16 decode path ([`ActivationPrecision::Int16`]), with the helpers of the f32
//! tests (`matmul/tests.rs`); fresh random inputs on every run, replayable with
//! `MOESTREAM_TEST_SEED=<seed>`.
//!
//! - Every SIMD level against the scalar twin, over the f32 tests' affine shapes plus group sizes
//!   whose spans are not the group (96, 160, 256, 2048). Both sides add the same exact integer
//!   sums; they differ in the order of the f32 operations that scale and add them, so for output
//!   `o` the bound is `|got − want| ≤ 4e-6 · T_o + 1e-7` with `T_o = Σ_i |s_g·q_i·x_i| +
//!   Σ_g |b_g·Σ_{i∈g} x_i|`, the magnitude of the terms added (4e-6 ≈ 64 f32 roundings).
//! - Accuracy against the exact f32 path on activations with outliers, for the bound of the
//!   `matmul` module docs.
//! - Spans of zeros, of tiny values and of non-finite values.
//! - Small products at the best level against the scalar path at both precisions, sized to run
//!   under Miri, which checks the unchecked loads and, given the target features, emulates a
//!   SIMD level the CPU lacks ([`small_products_match_scalar_at_both_precisions`]).

use super::span_columns;
use crate::features::ActivationPrecision::F32;
use crate::features::{cpu_level, ActivationPrecision, SimdLevel};
use crate::matmul::tests::{
    affine_cases, fresh_seed, naive_code, naive_dequantize, naive_float, report, Rng, TestMatrix,
    BITS, KINDS,
};
use crate::matmul::{matmul_scalar, matmul_with_precision, Backend};
use crate::{FloatKind, Matrix, Weights};

const INT16: ActivationPrecision = ActivationPrecision::Int16;

/// Per output of one token `x`: `(T_o, E_o)`, with `T_o` the magnitude of the terms of the module
/// docs and `E_o = Σ_i |s_g|·|q_i − z|·dx_j / 2` the most that rounding the activations can move
/// the output (`dx_j` the step of `x_i`'s span, `z` the centre code).
fn magnitudes(m: &Matrix, x: &[f32]) -> Vec<(f64, f64)> {
    let Weights::Affine {
        bits,
        group_size,
        packed,
        scales,
        biases,
        scale_kind,
    } = m.weights
    else {
        unreachable!("affine matrices only")
    };
    let size = scale_kind.size_bytes();
    let span = span_columns(group_size);
    let center = ((1u32 << bits) - 1) as f64 / 2.0;
    let steps: Vec<f64> = x
        .chunks_exact(span)
        .map(|s| s.iter().fold(0f64, |a, v| a.max(v.abs() as f64)) / 32767.0)
        .collect();
    let groups = m.cols / group_size;
    (0..m.rows)
        .map(|o| {
            let (mut terms, mut rounding) = (0f64, 0f64);
            for g in 0..groups {
                let p = (o * groups + g) * size;
                let (s, b) = (
                    naive_float(scale_kind, &scales[p..]) as f64,
                    naive_float(scale_kind, &biases[p..]) as f64,
                );
                let mut sum = 0f64;
                for i in g * group_size..(g + 1) * group_size {
                    let q = naive_code(packed, bits, (o * m.cols + i) * bits as usize) as f64;
                    terms += (s * q * x[i] as f64).abs();
                    rounding += s.abs() * (q - center).abs() * steps[i / span] / 2.0;
                    sum += x[i] as f64;
                }
                terms += (b * sum).abs();
            }
            (terms, rounding)
        })
        .collect()
}

/// `Σ_i |W[o,i]·x_i|` per output.
fn abs_products(w: &[f32], x: &[f32], rows: usize) -> Vec<f64> {
    let cols = x.len();
    (0..rows)
        .map(|o| {
            (0..cols)
                .map(|i| (w[o * cols + i] as f64 * x[i] as f64).abs())
                .sum()
        })
        .collect()
}

/// Runs the int16 path at `level` and the int16 scalar twin on one token and compares them with
/// the bound of the module docs; returns the largest `|got − want| / T_o` seen.
fn compare_with_twin(level: SimdLevel, m: &Matrix, x: &[f32], what: &str) -> f64 {
    let (mut got, mut want) = (vec![f32::NAN; m.rows], vec![f32::NAN; m.rows]);
    matmul_with_precision(level, INT16, m, x, 1, &mut got);
    matmul_with_precision(SimdLevel::Scalar, INT16, m, x, 1, &mut want);
    let mut worst = 0f64;
    for (o, ((g, e), (terms, _))) in got.iter().zip(&want).zip(magnitudes(m, x)).enumerate() {
        let err = (*g as f64 - *e as f64).abs();
        let bound = 4e-6 * terms + 1e-7;
        assert!(
            err <= bound,
            "{what}: y[{o}] = {g}, twin {e} (error {err:e} > bound {bound:e})"
        );
        worst = worst.max(err / terms.max(1e-30));
    }
    worst
}

/// Every affine decode case of the f32 tests, plus spans that are not the group.
fn compare_level_with_twin(level: SimdLevel, seed: u64) -> (usize, f64) {
    let mut rng = Rng::new(seed);
    let extra_groups = [(96, 384), (160, 320), (256, 512), (2048, 2048)];
    let extra = BITS.into_iter().flat_map(|bits| {
        extra_groups.into_iter().flat_map(move |(gs, cols)| {
            [(FloatKind::BF16, 17), (FloatKind::F32, 3)]
                .into_iter()
                .map(move |(kind, rows)| (bits, gs, kind, rows, cols, 1))
        })
    });
    let (mut cases, mut worst) = (0, 0f64);
    for (bits, gs, kind, rows, cols, _) in affine_cases().filter(|c| c.5 == 1).chain(extra) {
        let tm = TestMatrix::affine(&mut rng, bits, gs, kind, rows, cols);
        let x = rng.floats(cols);
        let what =
            format!("{level:?} int16 {bits}-bit gs{gs} {kind:?} {rows}x{cols} (seed {seed})");
        worst = worst.max(compare_with_twin(level, &tm.matrix(), &x, &what));
        cases += 1;
    }
    (cases, worst)
}

#[test]
fn int16_avx2_matches_scalar_twin() {
    if cpu_level() < SimdLevel::Avx2 {
        report("SKIPPED int16_avx2_matches_scalar_twin: this CPU lacks AVX2+FMA+F16C");
        return;
    }
    let (cases, worst) = compare_level_with_twin(SimdLevel::Avx2, fresh_seed());
    report(&format!(
        "int16_avx2_matches_scalar_twin: {cases} cases, worst |error| / T = {worst:.1e}"
    ));
}

#[test]
fn int16_avx512_matches_scalar_twin() {
    #[cfg(target_arch = "x86_64")]
    let has = is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bw");
    #[cfg(not(target_arch = "x86_64"))]
    let has = false;
    if !has {
        report("SKIPPED int16_avx512_matches_scalar_twin: this CPU lacks AVX-512F/BW");
        return;
    }
    #[cfg(target_arch = "x86_64")]
    {
        let tm = TestMatrix::affine(&mut Rng::new(5), 8, 32, FloatKind::F16, 2, 64);
        assert_eq!(
            Backend::select(SimdLevel::Avx512, &tm.matrix()),
            Backend::Avx512
        );
    }
    let (cases, worst) = compare_level_with_twin(SimdLevel::Avx512, fresh_seed());
    report(&format!(
        "int16_avx512_matches_scalar_twin: {cases} cases (2/3/5/6-bit through the AVX2 kernel), worst |error| / T = {worst:.1e}"
    ));
}

/// Big enough for the parallel decode split: the row tasks and their batches of rows must meet.
#[test]
fn int16_parallel_matches_scalar_twin() {
    let seed = fresh_seed();
    let mut rng = Rng::new(seed);
    let level = cpu_level();
    for (bits, gs, kind, rows, cols) in [
        (4, 64, FloatKind::BF16, 1000, 2048),
        (3, 64, FloatKind::F16, 301, 1024),
        (8, 128, FloatKind::BF16, 333, 2048),
    ] {
        let tm = TestMatrix::affine(&mut rng, bits, gs, kind, rows, cols);
        let x = rng.floats(cols);
        let what = format!("parallel {level:?} int16 {bits}-bit {rows}x{cols} (seed {seed})");
        compare_with_twin(level, &tm.matrix(), &x, &what);
    }
}

/// Activations like the inputs of real projections: values of a few tenths, and a few outliers
/// `scale` times larger (hidden states and SwiGLU outputs have such channels).
fn activations_with_outliers(rng: &mut Rng, cols: usize, outliers: usize, scale: f32) -> Vec<f32> {
    let mut x: Vec<f32> = (0..cols).map(|_| 0.3 * rng.signed()).collect();
    for _ in 0..outliers {
        let i = (rng.next_u64() % cols as u64) as usize;
        x[i] = scale * 0.3 * if rng.signed() < 0.0 { -1.0 } else { 1.0 };
    }
    x
}

/// The accuracy of the int16 path against the exact f32 path, at the best level of this CPU:
/// `|y_int16 − y_f32| ≤ 1e-4 · Σ_i |W[o,i]·x_i| + 1e-6` on activations without outliers and with
/// 4 or 32 outliers 50× larger than the rest, and always within the rounding bound `E_o` of
/// [`magnitudes`] (plus f32 rounding). Reports the worst `|error| / Σ|w·x|` per case.
#[test]
fn int16_matches_f32_path_on_outliers() {
    let seed = fresh_seed();
    let mut rng = Rng::new(seed);
    let level = cpu_level();
    let (rows, cols) = (64, 2048);
    let cases = [(0, 1.0), (4, 50.0), (32, 50.0)];
    let mut worst = [0f64; 3];
    for bits in BITS {
        for gs in [32, 64, 128] {
            for kind in KINDS {
                let tm = TestMatrix::affine(&mut rng, bits, gs, kind, rows, cols);
                let m = tm.matrix();
                let w = naive_dequantize(&m);
                for (case, (outliers, scale)) in cases.into_iter().enumerate() {
                    let x = activations_with_outliers(&mut rng, cols, outliers, scale);
                    let (mut got, mut want) = (vec![f32::NAN; rows], vec![f32::NAN; rows]);
                    matmul_with_precision(level, INT16, &m, &x, 1, &mut got);
                    matmul_scalar(&m, &x, 1, &mut want);
                    let abs = abs_products(&w, &x, rows);
                    for (o, (((g, e), a), (terms, rounding))) in got
                        .iter()
                        .zip(&want)
                        .zip(&abs)
                        .zip(magnitudes(&m, &x))
                        .enumerate()
                    {
                        let what = format!(
                            "{level:?} {bits}-bit gs{gs} {kind:?} {outliers} outliers ×{scale}, y[{o}] = {g}, f32 path {e} (seed {seed})"
                        );
                        let err = (*g as f64 - *e as f64).abs();
                        assert!(
                            err <= rounding + 1e-5 * terms + 1e-6,
                            "{what}: error {err:e} above the rounding bound {rounding:e}"
                        );
                        let bound = 1e-4 * a + 1e-6;
                        assert!(err <= bound, "{what}: error {err:e} > {bound:e}");
                        worst[case] = worst[case].max(err / a);
                    }
                }
            }
        }
    }
    report(&format!(
        "int16_matches_f32_path_on_outliers ({rows}x{cols}, every bit width, gs 32/64/128): worst |error| / Σ|w·x| = {:.1e} without outliers, {:.1e} with 4 outliers ×50, {:.1e} with 32 (bound 1e-4)",
        worst[0], worst[1], worst[2]
    ));
}

/// All-zero spans must not divide by zero; spans too small to scale count as zero; NaN and
/// infinities reach the output as on the f32 path.
#[test]
fn int16_zero_tiny_and_nonfinite_spans() {
    let seed = fresh_seed();
    let mut rng = Rng::new(seed);
    let levels = [SimdLevel::Scalar, cpu_level()];
    for bits in BITS {
        let tm = TestMatrix::affine(&mut rng, bits, 64, FloatKind::BF16, 9, 256);
        let m = tm.matrix();
        let run = |level: SimdLevel, x: &[f32]| {
            let mut y = vec![f32::NAN; 9];
            matmul_with_precision(level, INT16, &m, x, 1, &mut y);
            y
        };
        for level in levels {
            let what = format!("{level:?} {bits}-bit (seed {seed})");
            assert_eq!(run(level, &[0.0; 256]), [0.0; 9], "{what}: zero row");

            // Spans of zeros and of tiny values among ordinary ones: close to the f32 path.
            let mut x = rng.floats(256);
            x[..64].fill(0.0);
            for v in &mut x[128..192] {
                *v *= 1e-36;
            }
            let got = run(level, &x);
            let mut want = vec![0f32; 9];
            matmul_scalar(&m, &x, 1, &mut want);
            for ((g, e), (terms, rounding)) in got.iter().zip(&want).zip(magnitudes(&m, &x)) {
                let err = (*g as f64 - *e as f64).abs();
                assert!(
                    err <= rounding + 1e-5 * terms + 1e-6,
                    "{what}: {g} vs f32 {e}, error {err:e} above the rounding bound {rounding:e}"
                );
            }

            for bad in [f32::NAN, f32::INFINITY] {
                let mut x = rng.floats(256);
                x[70] = bad;
                assert!(
                    run(level, &x).iter().all(|y| y.is_nan()),
                    "{what}: {bad} in x must give NaN"
                );
            }
        }
    }
}

#[test]
fn spans_divide_groups_and_stay_short() {
    for (gs, span) in [
        (32, 32),
        (64, 64),
        (96, 32),
        (128, 128),
        (160, 32),
        (192, 64),
        (256, 128),
        (2048, 128),
    ] {
        assert_eq!(span_columns(gs), span, "group size {gs}");
    }
}

/// A few small products of every affine bit width, both precisions, one and two tokens, at the
/// best level this CPU (or Miri) has, against the scalar path at the same precision. Small
/// enough for Miri, which checks every unchecked load of the kernels for bounds and alignment
/// and, given target features, emulates a SIMD level this CPU lacks. On an AVX2-only machine:
///
/// ```text
/// CARGO_TARGET_DIR=/tmp/miri RUSTFLAGS="-C target-feature=+avx512f,+avx512bw,+avx2,+fma,+f16c" \
///   MIRIFLAGS="-Zmiri-disable-isolation -Zmiri-tree-borrows -Zmiri-ignore-leaks" \
///   cargo +nightly miri test -p moestream-kernels --lib small_products
/// ```
///
/// (the clock, for the seed; tree borrows and ignored leaks, for rayon's crossbeam-epoch; a few
/// minutes per level).
#[test]
fn small_products_match_scalar_at_both_precisions() {
    let level = cpu_level();
    let mut rng = Rng::new(fresh_seed());
    for bits in BITS {
        for (gs, cols) in [(32, 96), (32, 128), (64, 128), (128, 256), (256, 256)] {
            for kind in [FloatKind::BF16, FloatKind::F32] {
                let tm = TestMatrix::affine(&mut rng, bits, gs, kind, 3, cols);
                let m = tm.matrix();
                let w = naive_dequantize(&m);
                for (precision, n) in [(INT16, 1), (F32, 1), (F32, 2)] {
                    let x = rng.floats(n * cols);
                    let (mut got, mut want) = (vec![f32::NAN; 3 * n], vec![f32::NAN; 3 * n]);
                    matmul_with_precision(level, precision, &m, &x, n, &mut got);
                    matmul_with_precision(SimdLevel::Scalar, precision, &m, &x, n, &mut want);
                    // The bounds of the twin test (int16) and of the f32 tests, per token.
                    let bounds: Vec<f64> = x
                        .chunks_exact(cols)
                        .flat_map(|xt| match precision {
                            INT16 => magnitudes(&m, xt)
                                .into_iter()
                                .map(|(terms, _)| 4e-6 * terms + 1e-7)
                                .collect::<Vec<_>>(),
                            F32 => abs_products(&w, xt, 3)
                                .into_iter()
                                .map(|a| 1e-5 * a + 1e-6)
                                .collect(),
                            ActivationPrecision::Int8 => unreachable!("not tested here"),
                        })
                        .collect();
                    for ((g, e), bound) in got.iter().zip(&want).zip(bounds) {
                        assert!(
                            (*g as f64 - *e as f64).abs() <= bound,
                            "{level:?} {precision:?} {bits}-bit gs{gs} {kind:?} 3x{cols} n={n}: {g} vs scalar {e}"
                        );
                    }
                }
            }
        }
    }
}
