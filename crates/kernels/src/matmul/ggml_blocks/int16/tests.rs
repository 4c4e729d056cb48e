//! Tests of the int16 decode path for llama.cpp blocks; fresh random inputs on every run,
//! replayable with `MOESTREAM_TEST_SEED=<seed>`.
//!
//! Every weight is decomposed here, independently of the kernels, as `w_i = a_i·q_i − m_i` with
//! the integer code `q_i` of the module docs (MODELS.md 10.2 read anew), so that
//! - the AVX2 kernel is checked against the scalar twin with the bound of the affine int16 tests,
//!   `|got − want| ≤ 4e-6 · T_o + 1e-7`, `T_o = Σ_i (|a_i·q_i·x_i| + |m_i·x_i|)`: both add the
//!   same exact integer sums, scaled and added in another order;
//! - the int16 path is checked against the exact f32 path within the rounding bound
//!   `E_o = Σ_i |a_i|·|q_i − z|·dx_i / 2` plus f32 rounding, and within `1e-4 · Σ|w·x|`, on
//!   activations without and with outliers; the worst `|error| / Σ|w·x|` is reported.
use super::SPAN;
use crate::features::{cpu_level, ActivationPrecision, SimdLevel};
use crate::ggml::{BlockFormat, QK_K};
use crate::matmul::tests::{fresh_seed, report, Rng, TestMatrix};
use crate::matmul::{matmul_scalar, matmul_with_precision};
use crate::Matrix;

const INT16: ActivationPrecision = ActivationPrecision::Int16;

fn f16(b: &[u8]) -> f64 {
    half::f16::from_le_bytes([b[0], b[1]]).to_f64()
}

/// `(a_i, q_i, m_i)` for every weight of the `rows × cols` matrix `data`, and the centre `z` the
/// path uses for the format's codes.
pub(in crate::matmul::ggml_blocks) fn decompose(
    format: BlockFormat,
    data: &[u8],
) -> (Vec<(f64, f64, f64)>, f64) {
    let mut w = Vec::new();
    for b in data.chunks_exact(format.block_bytes()) {
        match format {
            BlockFormat::Q8_0 => w.extend(b[2..34].iter().map(|&q| (f16(b), q as i8 as f64, 0.0))),
            BlockFormat::Q4_0 => {
                let q = |l: usize| {
                    let byte = b[2 + l % 16];
                    f64::from(if l < 16 { byte & 15 } else { byte >> 4 }) - 8.0
                };
                w.extend((0..32).map(|l| (f16(b), q(l), 0.0)));
            }
            BlockFormat::Q4_1 => {
                let q = |l: usize| {
                    let byte = b[4 + l % 16];
                    f64::from(if l < 16 { byte & 15 } else { byte >> 4 })
                };
                // w = d·q + m: the subtracted minimum is −m.
                w.extend((0..32).map(|l| (f16(b), q(l), -f16(&b[2..]))));
            }
            BlockFormat::Q5_0 => {
                let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
                let q = |l: usize| {
                    let byte = b[6 + l % 16];
                    let low = if l < 16 { byte & 15 } else { byte >> 4 };
                    f64::from(u32::from(low) | (((qh >> l) & 1) << 4)) - 16.0
                };
                w.extend((0..32).map(|l| (f16(b), q(l), 0.0)));
            }
            BlockFormat::Q4_K | BlockFormat::Q5_K => {
                let five = format == BlockFormat::Q5_K;
                let qs = if five { &b[48..176] } else { &b[16..144] };
                let s = &b[4..16];
                for j in 0..8 {
                    // get_scale_min_k4, as MODELS.md states it.
                    let (sc, m) = if j < 4 {
                        (s[j] & 63, s[j + 4] & 63)
                    } else {
                        (
                            (s[j + 4] & 15) | ((s[j - 4] >> 6) << 4),
                            (s[j + 4] >> 4) | ((s[j] >> 6) << 4),
                        )
                    };
                    for l in 0..32 {
                        let byte = qs[32 * (j / 2) + l];
                        let mut q = if j % 2 == 0 { byte & 15 } else { byte >> 4 };
                        if five {
                            q += ((b[16 + l] >> j) & 1) << 4;
                        }
                        w.push((
                            f16(b) * f64::from(sc),
                            f64::from(q),
                            f16(&b[2..]) * f64::from(m),
                        ));
                    }
                }
            }
            BlockFormat::Q6_K => {
                let mut block = vec![(0.0, 0.0, 0.0); QK_K];
                for h in 0..2 {
                    for l in 0..32 {
                        let (lo, hi) = (b[64 * h + l], b[64 * h + l + 32]);
                        let qh = b[128 + 32 * h + l];
                        let q = [
                            (lo & 15) | ((qh & 3) << 4),
                            (hi & 15) | (((qh >> 2) & 3) << 4),
                            (lo >> 4) | (((qh >> 4) & 3) << 4),
                            (hi >> 4) | (((qh >> 6) & 3) << 4),
                        ];
                        for (k, q) in q.into_iter().enumerate() {
                            let sc = b[192 + 8 * h + l / 16 + 2 * k] as i8;
                            block[128 * h + 32 * k + l] =
                                (f16(&b[208..]) * f64::from(sc), f64::from(q) - 32.0, 0.0);
                        }
                    }
                }
                w.extend(block);
            }
        }
    }
    let z = match format {
        BlockFormat::Q4_K | BlockFormat::Q4_1 => 7.5,
        BlockFormat::Q5_K => 15.5,
        _ => 0.0,
    };
    (w, z)
}

/// Per output of token `x`: `(T_o, E_o, Σ|w·x|)` (module docs).
fn magnitudes(m: &Matrix, data: &[u8], format: BlockFormat, x: &[f32]) -> Vec<(f64, f64, f64)> {
    let (w, z) = decompose(format, data);
    let steps: Vec<f64> = x
        .chunks_exact(SPAN)
        .map(|s| s.iter().fold(0f64, |a, v| a.max(v.abs() as f64)) / 32767.0)
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

pub(in crate::matmul::ggml_blocks) fn data_of<'a>(m: &Matrix<'a>) -> (BlockFormat, &'a [u8]) {
    match m.weights {
        crate::Weights::Ggml { format, data } => (format, data),
        _ => unreachable!("block matrices only"),
    }
}

#[test]
fn int16_blocks_avx2_match_scalar_twin() {
    if cpu_level() < SimdLevel::Avx2 {
        report("SKIPPED int16_blocks_avx2_match_scalar_twin: this CPU lacks AVX2+FMA+F16C");
        return;
    }
    let seed = fresh_seed();
    let mut rng = Rng::new(seed);
    let mut worst = 0f64;
    for format in BlockFormat::ALL {
        // 1 and 3 rows: the whole row on the calling thread; 300 × 2048: parallel row tasks;
        // Q8_0/Q4_0 with 256 + 96 columns: blocks left over after the groups of eight.
        let mut shapes = vec![(1, 256), (3, 768), (300, 2048)];
        if format.block_elements() == 32 {
            shapes.push((5, 352));
        }
        for (rows, cols) in shapes {
            let tm = TestMatrix::ggml(&mut rng, format, rows, cols);
            let m = tm.matrix();
            let (format, data) = data_of(&m);
            let x = rng.floats(cols);
            let (mut got, mut want) = (vec![f32::NAN; rows], vec![f32::NAN; rows]);
            matmul_with_precision(SimdLevel::Avx2, INT16, &m, &x, 1, &mut got);
            matmul_with_precision(SimdLevel::Scalar, INT16, &m, &x, 1, &mut want);
            for (o, ((g, e), (terms, _, _))) in got
                .iter()
                .zip(&want)
                .zip(magnitudes(&m, data, format, &x))
                .enumerate()
            {
                let err = (*g as f64 - *e as f64).abs();
                let bound = 4e-6 * terms + 1e-7;
                assert!(
                    err <= bound,
                    "{} {rows}x{cols} y[{o}]: {g} vs twin {e}, error {err:e} > {bound:e} (seed {seed})",
                    format.name()
                );
                worst = worst.max(err / terms.max(1e-30));
            }
        }
    }
    report(&format!(
        "int16_blocks_avx2_match_scalar_twin: worst |error| / T = {worst:.1e}"
    ));
}

/// Activations of a few tenths with `outliers` values `scale` times larger.
pub(in crate::matmul::ggml_blocks) fn activations_with_outliers(
    rng: &mut Rng,
    cols: usize,
    outliers: usize,
    scale: f32,
) -> Vec<f32> {
    let mut x: Vec<f32> = (0..cols).map(|_| 0.3 * rng.signed()).collect();
    for _ in 0..outliers {
        let i = (rng.next_u64() % cols as u64) as usize;
        x[i] = scale * 0.3 * if rng.signed() < 0.0 { -1.0 } else { 1.0 };
    }
    x
}

/// The accuracy contract of the module docs, at the scalar level and the best level of this CPU.
#[test]
fn int16_blocks_match_f32_path() {
    let seed = fresh_seed();
    let mut rng = Rng::new(seed);
    let (rows, cols) = (64, 2048);
    let cases = [(0, 1.0), (4, 50.0), (32, 50.0)];
    let mut lines = Vec::new();
    for format in BlockFormat::ALL {
        let tm = TestMatrix::ggml(&mut rng, format, rows, cols);
        let m = tm.matrix();
        let (format, data) = data_of(&m);
        let mut worst = [0f64; 3];
        for (case, (outliers, scale)) in cases.into_iter().enumerate() {
            let x = activations_with_outliers(&mut rng, cols, outliers, scale);
            let mut want = vec![f32::NAN; rows];
            matmul_scalar(&m, &x, 1, &mut want);
            let mags = magnitudes(&m, data, format, &x);
            for level in [SimdLevel::Scalar, cpu_level()] {
                let mut got = vec![f32::NAN; rows];
                matmul_with_precision(level, INT16, &m, &x, 1, &mut got);
                for (o, ((g, e), (terms, rounding, abs))) in
                    got.iter().zip(&want).zip(&mags).enumerate()
                {
                    let what = format!(
                        "{level:?} {} {outliers} outliers ×{scale}, y[{o}] = {g}, f32 path {e} (seed {seed})",
                        format.name()
                    );
                    let err = (*g as f64 - *e as f64).abs();
                    assert!(
                        err <= rounding + 1e-5 * terms + 1e-6,
                        "{what}: error {err:e} above the rounding bound {rounding:e}"
                    );
                    let bound = 1e-4 * abs + 1e-6;
                    assert!(err <= bound, "{what}: error {err:e} > {bound:e}");
                    worst[case] = worst[case].max(err / abs);
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
        "int16_blocks_match_f32_path ({rows}x{cols}): worst |error| / Σ|w·x| without outliers / 4 ×50 / 32 ×50: {}",
        lines.join(", ")
    ));
}

/// Zero rows give zero, spans of zeros and tiny values stay within the bound, NaN and infinities
/// reach every output.
#[test]
fn int16_blocks_zero_and_nonfinite_spans() {
    let seed = fresh_seed();
    let mut rng = Rng::new(seed);
    for format in BlockFormat::ALL {
        let tm = TestMatrix::ggml(&mut rng, format, 5, 512);
        let m = tm.matrix();
        let (format, data) = data_of(&m);
        for level in [SimdLevel::Scalar, cpu_level()] {
            let run = |x: &[f32]| {
                let mut y = vec![f32::NAN; 5];
                matmul_with_precision(level, INT16, &m, x, 1, &mut y);
                y
            };
            let what = format!("{level:?} {} (seed {seed})", format.name());
            assert_eq!(run(&[0.0; 512]), [0.0; 5], "{what}: zero row");
            let mut x = rng.floats(512);
            x[..64].fill(0.0);
            for v in &mut x[256..320] {
                *v *= 1e-36;
            }
            let got = run(&x);
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
                let mut x = rng.floats(512);
                x[70] = bad;
                assert!(
                    run(&x).iter().all(|y| y.is_nan()),
                    "{what}: {bad} in x must give NaN"
                );
            }
        }
    }
}
