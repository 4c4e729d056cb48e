//! Tests of the matrix products with f32 activations ([`ActivationPrecision::F32`]); the int16
//! decode path has its own tests (`int16/tests.rs`), which share the helpers here.
//!
//! - The scalar path against an independent naive reference (bits read one at a time from the u32
//!   words, as the MLX spec states them; products in f64), and against hand-computed codes (at
//!   both precisions).
//! - Every SIMD level against the scalar path, on fresh random inputs, for every format, bit
//!   width, group size and scale type, on shapes that are not multiples of the vector width or of
//!   the task size, with every weight slice misaligned. A level the CPU lacks is reported as
//!   skipped on stderr (visible without `--nocapture`).
//!
//! The random inputs are fresh on every run; a failure names its seed, and
//! `MOESTREAM_TEST_SEED=<seed>` replays it.
//!
//! Tolerance, for every comparison of two f32 results `got` and `want` of output (o, t):
//! `|got - want| <= 1e-5 · Σ_i |W[o,i]·x[t,i]| + 1e-6`. Both sides add the same products (for
//! affine: the same `scale·Σq·x + bias·Σx` terms) in a different order (vector lanes, tiles,
//! partial sums), and f32 reordering error stays far below `1e-5` of the absolute sum for rows
//! of a few thousand terms; the `1e-6` covers outputs whose terms all vanish.

use std::io::Write;

use super::ggml_blocks::tests::random_blocks;
use super::{matmul_in_mode, matmul_scalar, matmul_with, matmul_with_precision, Backend};
use crate::features::{cpu_level, ActivationPrecision, ProductMode, SimdLevel};
use crate::ggml::BlockFormat;
use crate::{dequantize_row, FloatKind, Matrix, Weights};

pub(super) const KINDS: [FloatKind; 3] = [FloatKind::F32, FloatKind::F16, FloatKind::BF16];
pub(super) const BITS: [u32; 6] = [2, 3, 4, 5, 6, 8];
const ROWS: [usize; 4] = [1, 3, 17, 100];
const AFFINE_COLS: [usize; 5] = [32, 96, 160, 384, 2048];
const FLOAT_COLS: [usize; 10] = [1, 3, 7, 8, 17, 32, 100, 160, 257, 2048];
const TOKENS: [usize; 5] = [1, 2, 5, 9, 33];

/// The seed of a test's random inputs: `MOESTREAM_TEST_SEED` when set, else the clock.
pub(super) fn fresh_seed() -> u64 {
    if let Some(seed) = std::env::var("MOESTREAM_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        return seed;
    }
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
    now.map(|d| d.as_nanos() as u64).unwrap_or(1)
}

/// xorshift64*: small, deterministic per seed, good enough for test data.
pub(super) struct Rng(u64);

impl Rng {
    pub(super) fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub(super) fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Uniform in [-1, 1).
    pub(super) fn signed(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
    pub(super) fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next_u64() as u8).collect()
    }
    pub(super) fn floats(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.signed()).collect()
    }
}

fn encode(kind: FloatKind, values: &[f32]) -> Vec<u8> {
    values
        .iter()
        .flat_map(|&v| match kind {
            FloatKind::F32 => v.to_le_bytes().to_vec(),
            FloatKind::F16 => half::f16::from_f32(v).to_le_bytes().to_vec(),
            FloatKind::BF16 => half::bf16::from_f32(v).to_le_bytes().to_vec(),
        })
        .collect()
}

/// Bytes stored one past the start of their buffer, so that slices of them are misaligned.
struct Misaligned(Vec<u8>);

impl Misaligned {
    fn new(bytes: &[u8]) -> Self {
        let mut v = Vec::with_capacity(bytes.len() + 1);
        v.push(0xAA);
        v.extend_from_slice(bytes);
        Misaligned(v)
    }
    fn get(&self) -> &[u8] {
        &self.0[1..]
    }
}

/// The owned bytes behind a test [`Matrix`].
enum TestWeights {
    Float {
        kind: FloatKind,
        data: Misaligned,
    },
    Affine {
        bits: u32,
        group_size: usize,
        packed: Misaligned,
        scales: Misaligned,
        biases: Misaligned,
        kind: FloatKind,
    },
    Ggml {
        format: BlockFormat,
        data: Misaligned,
    },
}

pub(super) struct TestMatrix {
    rows: usize,
    cols: usize,
    weights: TestWeights,
}

impl TestMatrix {
    pub(super) fn float(rng: &mut Rng, kind: FloatKind, rows: usize, cols: usize) -> Self {
        let data = Misaligned::new(&encode(kind, &rng.floats(rows * cols)));
        TestMatrix {
            rows,
            cols,
            weights: TestWeights::Float { kind, data },
        }
    }

    /// Random codes; scales of either sign and biases near `-scale · (2^bits - 1) / 2`, like the
    /// MLX quantizer's output for centred weights.
    pub(super) fn affine(
        rng: &mut Rng,
        bits: u32,
        group_size: usize,
        kind: FloatKind,
        rows: usize,
        cols: usize,
    ) -> Self {
        let groups = rows * cols / group_size;
        let scales: Vec<f32> = (0..groups).map(|_| 0.05 * rng.signed()).collect();
        let half_range = ((1u32 << bits) - 1) as f32 / 2.0;
        let biases: Vec<f32> = scales
            .iter()
            .map(|s| -s * half_range * (1.0 + 0.2 * rng.signed()))
            .collect();
        TestMatrix {
            rows,
            cols,
            weights: TestWeights::Affine {
                bits,
                group_size,
                packed: Misaligned::new(&rng.bytes(rows * cols * bits as usize / 8)),
                scales: Misaligned::new(&encode(kind, &scales)),
                biases: Misaligned::new(&encode(kind, &biases)),
                kind,
            },
        }
    }

    /// Random llama.cpp blocks with finite scales ([`random_blocks`]).
    pub(super) fn ggml(rng: &mut Rng, format: BlockFormat, rows: usize, cols: usize) -> Self {
        TestMatrix {
            rows,
            cols,
            weights: TestWeights::Ggml {
                format,
                data: Misaligned::new(&random_blocks(rng, format, rows, cols)),
            },
        }
    }

    pub(super) fn matrix(&self) -> Matrix<'_> {
        let weights = match &self.weights {
            TestWeights::Float { kind, data } => Weights::Float {
                kind: *kind,
                data: data.get(),
            },
            TestWeights::Affine {
                bits,
                group_size,
                packed,
                scales,
                biases,
                kind,
            } => Weights::Affine {
                bits: *bits,
                group_size: *group_size,
                packed: packed.get(),
                scales: scales.get(),
                biases: biases.get(),
                scale_kind: *kind,
            },
            TestWeights::Ggml { format, data } => Weights::Ggml {
                format: *format,
                data: data.get(),
            },
        };
        Matrix {
            rows: self.rows,
            cols: self.cols,
            weights,
        }
    }
}

/// Element `i` of the codes of `packed` straight from the MLX spec: bit `n` of the stream is bit
/// `n % 32` of little-endian u32 word `n / 32`; element `i` holds stream bits `[i·b, (i+1)·b)`,
/// lowest first. Rows start at stream bit `row · cols · b`.
pub(super) fn naive_code(packed: &[u8], bits: u32, first_bit: usize) -> u32 {
    let mut code = 0;
    for k in 0..bits as usize {
        let n = first_bit + k;
        let w = &packed[4 * (n / 32)..4 * (n / 32) + 4];
        let word = u32::from_le_bytes([w[0], w[1], w[2], w[3]]);
        code |= ((word >> (n % 32)) & 1) << k;
    }
    code
}

pub(super) fn naive_float(kind: FloatKind, b: &[u8]) -> f32 {
    match kind {
        FloatKind::F32 => f32::from_bits(u32::from_le_bytes([b[0], b[1], b[2], b[3]])),
        FloatKind::F16 => half::f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32(),
        FloatKind::BF16 => f32::from_bits(u32::from(u16::from_le_bytes([b[0], b[1]])) << 16),
    }
}

/// The whole matrix as f32, written independently of the kernels.
pub(super) fn naive_dequantize(m: &Matrix) -> Vec<f32> {
    let (rows, cols) = (m.rows, m.cols);
    match m.weights {
        Weights::Float { kind, data } => data
            .chunks_exact(kind.size_bytes())
            .map(|b| naive_float(kind, b))
            .collect(),
        Weights::Affine {
            bits,
            group_size,
            packed,
            scales,
            biases,
            scale_kind,
        } => {
            let size = scale_kind.size_bytes();
            let mut w = Vec::with_capacity(rows * cols);
            for o in 0..rows {
                for i in 0..cols {
                    let g = (o * cols + i) / group_size;
                    let s = naive_float(scale_kind, &scales[g * size..]);
                    let b = naive_float(scale_kind, &biases[g * size..]);
                    let q = naive_code(packed, bits, (o * cols + i) * bits as usize);
                    w.push(s * q as f32 + b);
                }
            }
            w
        }
        Weights::Ggml { format, data } => {
            let mut w = vec![0f32; rows * cols];
            for (row, out) in data
                .chunks_exact(format.row_bytes(cols))
                .zip(w.chunks_exact_mut(cols))
            {
                crate::ggml::dequantize_row(format, row, out);
            }
            w
        }
    }
}

/// Checks `got` against `want` with the tolerance of the module docs; `w` is the dequantized
/// matrix, used for the magnitude `Σ_i |W[o,i]·x[t,i]|`.
fn assert_close(
    got: &[f32],
    want: &[f32],
    w: &[f32],
    x: &[f32],
    rows: usize,
    cols: usize,
    what: &str,
) {
    assert_eq!(got.len(), want.len());
    for (idx, (g, e)) in got.iter().zip(want).enumerate() {
        let (t, o) = (idx / rows, idx % rows);
        let magnitude: f64 = (0..cols)
            .map(|i| (w[o * cols + i] as f64 * x[t * cols + i] as f64).abs())
            .sum();
        let bound = 1e-5 * magnitude + 1e-6;
        let err = (*g as f64 - *e as f64).abs();
        assert!(
            err <= bound,
            "{what}: y[t={t}, o={o}] = {g}, expected {e} (error {err:e} > bound {bound:e})"
        );
    }
}

/// Every affine case: (bits, group size, scale kind, rows, cols, tokens).
pub(super) fn affine_cases() -> impl Iterator<Item = (u32, usize, FloatKind, usize, usize, usize)> {
    BITS.into_iter().flat_map(|bits| {
        [32usize, 64, 128].into_iter().flat_map(move |gs| {
            KINDS.into_iter().flat_map(move |kind| {
                ROWS.into_iter().flat_map(move |rows| {
                    AFFINE_COLS
                        .into_iter()
                        .filter(move |cols| cols % gs == 0)
                        .flat_map(move |cols| {
                            TOKENS
                                .into_iter()
                                .map(move |n| (bits, gs, kind, rows, cols, n))
                        })
                })
            })
        })
    })
}

fn float_cases() -> impl Iterator<Item = (FloatKind, usize, usize, usize)> {
    KINDS.into_iter().flat_map(|kind| {
        ROWS.into_iter().flat_map(move |rows| {
            FLOAT_COLS
                .into_iter()
                .flat_map(move |cols| TOKENS.into_iter().map(move |n| (kind, rows, cols, n)))
        })
    })
}

/// Runs `level` and the scalar path on every case and compares; returns the number of cases.
fn compare_with_scalar(level: SimdLevel, seed: u64) -> usize {
    let mut rng = Rng::new(seed);
    let mut cases = 0;
    for (bits, gs, kind, rows, cols, n) in affine_cases() {
        let tm = TestMatrix::affine(&mut rng, bits, gs, kind, rows, cols);
        cases += compare_one(
            level,
            &tm.matrix(),
            n,
            &mut rng,
            &format!("{level:?} {bits}-bit gs{gs} {kind:?} {rows}x{cols} n={n} (seed {seed})"),
        );
    }
    for (kind, rows, cols, n) in float_cases() {
        let tm = TestMatrix::float(&mut rng, kind, rows, cols);
        cases += compare_one(
            level,
            &tm.matrix(),
            n,
            &mut rng,
            &format!("{level:?} {kind:?} {rows}x{cols} n={n} (seed {seed})"),
        );
    }
    cases
}

fn compare_one(level: SimdLevel, m: &Matrix, n: usize, rng: &mut Rng, what: &str) -> usize {
    let x = rng.floats(n * m.cols);
    let (mut got, mut want) = (vec![f32::NAN; n * m.rows], vec![f32::NAN; n * m.rows]);
    matmul_with_precision(level, ActivationPrecision::F32, m, &x, n, &mut got);
    matmul_scalar(m, &x, n, &mut want);
    assert_close(&got, &want, &naive_dequantize(m), &x, m.rows, m.cols, what);
    1
}

/// Writes to the real stderr, past the test harness's capture, so a skip is always visible.
pub(super) fn report(line: &str) {
    let _ = writeln!(std::io::stderr(), "{line}");
}

#[test]
fn scalar_matches_naive_reference() {
    let seed = fresh_seed();
    let mut rng = Rng::new(seed);
    let mut check = |m: &Matrix, n: usize, what: String| {
        let x = rng.floats(n * m.cols);
        let w = naive_dequantize(m);
        let mut got = vec![f32::NAN; n * m.rows];
        matmul_scalar(m, &x, n, &mut got);
        let want: Vec<f32> = (0..n * m.rows)
            .map(|idx| {
                let (t, o) = (idx / m.rows, idx % m.rows);
                (0..m.cols)
                    .map(|i| w[o * m.cols + i] as f64 * x[t * m.cols + i] as f64)
                    .sum::<f64>() as f32
            })
            .collect();
        assert_close(&got, &want, &w, &x, m.rows, m.cols, &what);
    };
    let mut data_rng = Rng::new(seed ^ 0x5555);
    for (bits, gs, kind, rows, cols, n) in affine_cases().filter(|c| c.3 <= 17 && c.5 <= 5) {
        let tm = TestMatrix::affine(&mut data_rng, bits, gs, kind, rows, cols);
        check(
            &tm.matrix(),
            n,
            format!("scalar {bits}-bit gs{gs} {kind:?} {rows}x{cols} n={n} (seed {seed})"),
        );
    }
    for (kind, rows, cols, n) in float_cases().filter(|c| c.1 <= 17 && c.3 <= 5) {
        let tm = TestMatrix::float(&mut data_rng, kind, rows, cols);
        check(
            &tm.matrix(),
            n,
            format!("scalar {kind:?} {rows}x{cols} n={n} (seed {seed})"),
        );
    }
}

#[test]
fn dequantize_row_matches_naive_reference() {
    let seed = fresh_seed();
    let mut rng = Rng::new(seed);
    for bits in BITS {
        for gs in [32, 64, 128] {
            for kind in KINDS {
                let tm = TestMatrix::affine(&mut rng, bits, gs, kind, 5, 384);
                let m = tm.matrix();
                let w = naive_dequantize(&m);
                let mut row = vec![0f32; m.cols];
                for o in 0..m.rows {
                    dequantize_row(&m, o, &mut row);
                    assert_eq!(
                        row,
                        w[o * m.cols..(o + 1) * m.cols],
                        "{bits}-bit gs{gs} {kind:?} row {o} (seed {seed})"
                    );
                }
            }
        }
    }
    for kind in KINDS {
        let tm = TestMatrix::float(&mut rng, kind, 3, 17);
        let m = tm.matrix();
        let w = naive_dequantize(&m);
        let mut row = vec![0f32; 17];
        dequantize_row(&m, 2, &mut row);
        assert_eq!(row, w[34..51], "{kind:?} (seed {seed})");
    }
}

/// Known u32 words and the 32 codes they hold, worked out by hand from the bitstream definition
/// (element i at stream bits [i·b, (i+1)·b), bit n in bit n % 32 of word n / 32).
const HAND_CASES: [(u32, &[u32]); 6] = [
    (2, &[0xE4E4_E4E4, 0xE4E4_E4E4]),              // codes i % 4
    (3, &[0x88FA_C688, 0xC688_FAC6, 0xFAC6_88FA]), // codes i % 8: 0xFAC688 per 8 codes
    (4, &[0x7654_3210, 0xFEDC_BA98, 0x7654_3210, 0xFEDC_BA98]), // codes i % 16
    (
        5,
        &[
            0x8A41_8820,
            0xC5A9_2839,
            0xCA30_7B9A,
            0x38BD_AB49,
            0xFFBB_CDEB,
        ],
    ), // codes i
    (
        6,
        &[
            0xC91C_50C1,
            0x54D1_3CD2,
            0x7DD6_D95D,
            0xE99E_58E1,
            0x5CF1_BEDA,
            0xFFDE_F9DF,
        ],
    ), // 2i + 1
    (
        8,
        &[
            0x1811_0A03,
            0x342D_261F,
            0x5049_423B,
            0x6C65_5E57,
            0x8881_7A73,
            0xA49D_968F,
            0xC0B9_B2AB,
            0xDCD5_CEC7,
        ],
    ), // (7i + 3) % 256
];

fn hand_code(bits: u32, i: u32) -> u32 {
    match bits {
        2 => i % 4,
        3 => i % 8,
        4 => i % 16,
        5 => i,
        6 => 2 * i + 1,
        _ => (7 * i + 3) % 256,
    }
}

#[test]
fn hand_computed_codes_every_level() {
    for (bits, words) in HAND_CASES {
        let packed: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
        let (scales, biases) = (
            encode(FloatKind::F32, &[0.5]),
            encode(FloatKind::F32, &[-3.0]),
        );
        let m = Matrix {
            rows: 1,
            cols: 32,
            weights: Weights::Affine {
                bits,
                group_size: 32,
                packed: &packed,
                scales: &scales,
                biases: &biases,
                scale_kind: FloatKind::F32,
            },
        };
        let expected: Vec<f32> = (0..32)
            .map(|i| 0.5 * hand_code(bits, i) as f32 - 3.0)
            .collect();
        let naive: Vec<f32> = (0..32)
            .map(|i| naive_code(&packed, bits, (i * bits) as usize) as f32 * 0.5 - 3.0)
            .collect();
        assert_eq!(naive, expected, "naive reference, {bits}-bit");
        let mut row = vec![0f32; 32];
        dequantize_row(&m, 0, &mut row);
        assert_eq!(row, expected, "dequantize_row, {bits}-bit");
        // One-hot activations pick out single weights. The hot value 32767 is its own int16
        // code with step 1, so that both precisions give 32767·w exactly.
        let levels = [SimdLevel::Scalar, SimdLevel::Avx2, SimdLevel::Avx512];
        let precisions = [ActivationPrecision::F32, ActivationPrecision::Int16];
        for (level, precision) in levels.into_iter().flat_map(|l| precisions.map(|p| (l, p))) {
            for i in 0..32 {
                let mut x = [0f32; 32];
                x[i] = 32767.0;
                let mut y = [f32::NAN];
                matmul_with_precision(level, precision, &m, &x, 1, &mut y);
                assert_eq!(
                    y[0],
                    32767.0 * expected[i],
                    "{level:?} {precision:?} {bits}-bit element {i}"
                );
            }
        }
    }
}

#[test]
fn avx2_matches_scalar() {
    if cpu_level() < SimdLevel::Avx2 {
        report("SKIPPED avx2_matches_scalar: this CPU lacks AVX2+FMA+F16C");
        return;
    }
    let cases = compare_with_scalar(SimdLevel::Avx2, fresh_seed());
    report(&format!("avx2_matches_scalar: {cases} cases compared"));
}

#[test]
fn avx512_matches_scalar() {
    #[cfg(target_arch = "x86_64")]
    let has = is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bw");
    #[cfg(not(target_arch = "x86_64"))]
    let has = false;
    if !has {
        report("SKIPPED avx512_matches_scalar: this CPU lacks AVX-512F/BW");
        return;
    }
    assert_eq!(cpu_level(), SimdLevel::Avx512);
    // The formats with AVX-512 kernels must really run on them.
    #[cfg(target_arch = "x86_64")]
    {
        let mut rng = Rng::new(11);
        for tm in [
            TestMatrix::affine(&mut rng, 4, 64, FloatKind::BF16, 2, 64),
            TestMatrix::float(&mut rng, FloatKind::F16, 2, 64),
        ] {
            assert_eq!(
                Backend::select(SimdLevel::Avx512, &tm.matrix()),
                Backend::Avx512
            );
        }
    }
    let cases = compare_with_scalar(SimdLevel::Avx512, fresh_seed());
    report(&format!(
        "avx512_matches_scalar: {cases} cases compared (2/3/5/6-bit through the AVX2 kernels)"
    ));
}

#[test]
fn level_above_cpu_falls_back_to_best() {
    let seed = fresh_seed();
    let mut rng = Rng::new(seed);
    let matrices = [
        TestMatrix::affine(&mut rng, 5, 32, FloatKind::BF16, 9, 96),
        TestMatrix::affine(&mut rng, 4, 32, FloatKind::BF16, 9, 96),
        TestMatrix::float(&mut rng, FloatKind::BF16, 9, 96),
    ];
    for tm in &matrices {
        let m = tm.matrix();
        assert_eq!(
            Backend::select(SimdLevel::Avx512, &m),
            Backend::select(cpu_level(), &m)
        );
        assert_eq!(Backend::select(SimdLevel::Scalar, &m), Backend::Scalar);
        for n in [1, 3] {
            let x = rng.floats(n * 96);
            let (mut a, mut b) = (vec![0f32; 9 * n], vec![0f32; 9 * n]);
            matmul_with(SimdLevel::Avx512, &m, &x, n, &mut a);
            matmul_with(cpu_level(), &m, &x, n, &mut b);
            assert_eq!(a, b, "same backend, same bits, n={n} (seed {seed})");
        }
    }
}

/// Shapes big enough for the parallel paths: many row tasks (decode and prefill), and few rows with
/// many tokens (token tasks).
#[test]
fn parallel_paths_match_scalar() {
    let seed = fresh_seed();
    let mut rng = Rng::new(seed);
    let level = cpu_level();
    let big = [
        TestMatrix::affine(&mut rng, 4, 64, FloatKind::BF16, 1000, 2048),
        TestMatrix::affine(&mut rng, 3, 64, FloatKind::F16, 301, 1024),
        TestMatrix::affine(&mut rng, 8, 64, FloatKind::BF16, 8, 2048),
        TestMatrix::float(&mut rng, FloatKind::BF16, 257, 1000),
    ];
    for tm in &big {
        let m = tm.matrix();
        for n in [1, 40] {
            compare_one(
                level,
                &m,
                n,
                &mut rng,
                &format!(
                    "parallel {level:?} {}x{} n={n} (seed {seed})",
                    m.rows, m.cols
                ),
            );
        }
    }
}

#[test]
fn empty_products() {
    let m = Matrix {
        rows: 3,
        cols: 0,
        weights: Weights::Float {
            kind: FloatKind::F32,
            data: &[],
        },
    };
    let mut y = [f32::NAN; 6];
    crate::matmul(&m, &[], 2, &mut y);
    assert_eq!(y, [0.0; 6]);
    let mut none: [f32; 0] = [];
    crate::matmul(&m, &[], 0, &mut none);
}

#[test]
fn validate_rejects_bad_layouts() {
    let bytes = vec![0u8; 4096];
    let affine = |bits, group_size, packed_len, params_len| Matrix {
        rows: 2,
        cols: 128,
        weights: Weights::Affine {
            bits,
            group_size,
            packed: &bytes[..packed_len],
            scales: &bytes[..params_len],
            biases: &bytes[..params_len],
            scale_kind: FloatKind::BF16,
        },
    };
    assert!(affine(4, 64, 128, 8).validate().is_ok());
    assert!(affine(3, 32, 96, 16).validate().is_ok());
    assert!(affine(4, 64, 127, 8).validate().is_err(), "short packed");
    assert!(
        affine(4, 64, 128, 6).validate().is_err(),
        "short scales and biases"
    );
    assert!(affine(7, 64, 224, 8).validate().is_err(), "7-bit codes");
    assert!(affine(4, 48, 128, 12).validate().is_err(), "group size 48");
    assert!(affine(4, 0, 128, 8).validate().is_err(), "group size 0");
    assert!(
        affine(4, 256, 128, 2).validate().is_err(),
        "group size larger than the row"
    );
    let float = |kind, len| Matrix {
        rows: 3,
        cols: 5,
        weights: Weights::Float {
            kind,
            data: &bytes[..len],
        },
    };
    assert!(float(FloatKind::BF16, 30).validate().is_ok());
    assert!(float(FloatKind::BF16, 31).validate().is_err());
    assert!(float(FloatKind::F32, 30).validate().is_err());
    let wrapping = Matrix {
        rows: usize::MAX / 4,
        cols: 16,
        weights: Weights::Float {
            kind: FloatKind::F32,
            data: &[],
        },
    };
    assert!(wrapping.validate().is_err(), "byte count overflows usize");
}

#[test]
#[should_panic(expected = "matmul: x holds")]
fn matmul_rejects_short_activations() {
    let data = [0u8; 24];
    let m = Matrix {
        rows: 2,
        cols: 3,
        weights: Weights::Float {
            kind: FloatKind::F32,
            data: &data,
        },
    };
    let mut y = [0f32; 2];
    crate::matmul(&m, &[1.0, 2.0], 1, &mut y);
}

#[test]
#[should_panic(expected = "needs")]
fn matmul_rejects_invalid_matrix() {
    let data = [0u8; 20];
    let m = Matrix {
        rows: 2,
        cols: 3,
        weights: Weights::Float {
            kind: FloatKind::F32,
            data: &data,
        },
    };
    let mut y = [0f32; 2];
    crate::matmul(&m, &[1.0, 2.0, 3.0], 1, &mut y);
}

/// A token-wise decode product ([`ProductMode::Decode`] over several tokens) gives every token
/// the same bits as a product of that token alone, at every precision and level, on small
/// shapes (one block, serial) and large ones (many blocks, in parallel).
#[test]
fn token_wise_decode_equals_one_token_products() {
    let seed = fresh_seed();
    let mut rng = Rng::new(seed);
    let mut matrices: Vec<TestMatrix> = affine_cases()
        .filter(|&(_, _, _, _, _, n)| n == 1)
        .map(|(bits, gs, kind, rows, cols, _)| {
            TestMatrix::affine(&mut rng, bits, gs, kind, rows, cols)
        })
        .collect();
    matrices.extend(
        float_cases()
            .filter(|&(_, _, _, n)| n == 1)
            .map(|(kind, rows, cols, _)| TestMatrix::float(&mut rng, kind, rows, cols)),
    );
    matrices.push(TestMatrix::affine(
        &mut rng,
        4,
        64,
        FloatKind::BF16,
        1000,
        2048,
    ));
    matrices.push(TestMatrix::affine(
        &mut rng,
        8,
        32,
        FloatKind::F16,
        333,
        1024,
    ));
    matrices.push(TestMatrix::float(&mut rng, FloatKind::BF16, 257, 1000));
    for format in BlockFormat::ALL {
        matrices.push(TestMatrix::ggml(&mut rng, format, 3, 256));
        matrices.push(TestMatrix::ggml(&mut rng, format, 700, 2048));
    }
    let levels = [SimdLevel::Scalar, SimdLevel::Avx2, SimdLevel::Avx512];
    for tm in &matrices {
        let m = tm.matrix();
        for n in [2, 5, 9] {
            let x = rng.floats(n * m.cols);
            for level in levels.into_iter().filter(|&l| l <= cpu_level()) {
                for precision in [
                    ActivationPrecision::F32,
                    ActivationPrecision::Int16,
                    ActivationPrecision::Int8,
                ] {
                    let mode = ProductMode::Decode(precision);
                    let mut together = vec![f32::NAN; n * m.rows];
                    matmul_in_mode(level, mode, &m, &x, n, &mut together);
                    for t in 0..n {
                        let mut alone = vec![f32::NAN; m.rows];
                        let xt = &x[t * m.cols..(t + 1) * m.cols];
                        matmul_in_mode(level, mode, &m, xt, 1, &mut alone);
                        let got = &together[t * m.rows..(t + 1) * m.rows];
                        assert!(
                            got.iter()
                                .zip(&alone)
                                .all(|(a, b)| a.to_bits() == b.to_bits()),
                            "{level:?} {precision:?} {}x{} token {t} of {n} differs from the \
                             token alone (seed {seed})",
                            m.rows,
                            m.cols
                        );
                    }
                }
            }
        }
    }
}

/// A prefill at [`ActivationPrecision::Int8`] gives every token of a block-format product the
/// bits of its decode product alone (so a prompt's log-probabilities do not depend on routing,
/// and prefill equals decoding); at the other precisions a prefill is the f32 product, and a
/// one-token prefill product stays f32 too.
#[test]
fn int8_prefill_equals_one_token_decode_products() {
    let seed = fresh_seed();
    let mut rng = Rng::new(seed);
    let levels = [SimdLevel::Scalar, SimdLevel::Avx2, SimdLevel::Avx512];
    for format in BlockFormat::ALL {
        for (rows, cols) in [(3, 256), (700, 2048)] {
            let tm = TestMatrix::ggml(&mut rng, format, rows, cols);
            let m = tm.matrix();
            for n in [1, 2, 7, 33] {
                let x = rng.floats(n * cols);
                for level in levels.into_iter().filter(|&l| l <= cpu_level()) {
                    let mut prefill = vec![f32::NAN; n * rows];
                    let mode = ProductMode::Prefill(ActivationPrecision::Int8);
                    matmul_in_mode(level, mode, &m, &x, n, &mut prefill);
                    let mut exact = vec![f32::NAN; n * rows];
                    let f32_mode = ProductMode::Prefill(ActivationPrecision::Int16);
                    matmul_in_mode(level, f32_mode, &m, &x, n, &mut exact);
                    let mut want = vec![f32::NAN; n * rows];
                    matmul_with_precision(level, ActivationPrecision::F32, &m, &x, n, &mut want);
                    assert!(
                        exact
                            .iter()
                            .zip(&want)
                            .all(|(a, b)| a.to_bits() == b.to_bits()),
                        "{level:?} {} prefill at int16 is the f32 product (seed {seed})",
                        format.name()
                    );
                    let int8 = super::ggml_blocks::int8::supports(format);
                    for t in 0..n {
                        let xt = &x[t * cols..(t + 1) * cols];
                        let mut alone = vec![f32::NAN; rows];
                        let decode = if int8 {
                            ProductMode::Decode(ActivationPrecision::Int8)
                        } else {
                            ProductMode::Prefill(ActivationPrecision::F32)
                        };
                        matmul_in_mode(level, decode, &m, xt, 1, &mut alone);
                        let got = &prefill[t * rows..(t + 1) * rows];
                        assert!(
                            got.iter()
                                .zip(&alone)
                                .all(|(a, b)| a.to_bits() == b.to_bits()),
                            "{level:?} {} {rows}x{cols} token {t} of {n}: prefill differs from \
                             its decode product (seed {seed})",
                            format.name()
                        );
                    }
                }
            }
        }
    }
}
