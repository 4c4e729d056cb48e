//! AVX2 int16 matvec for every affine bit width (module docs of [`super`] for the method).
//!
//! Every function here is a `#[target_feature]` function: it may run only after
//! [`crate::features::cpu_level`] reported [`crate::features::SimdLevel::Avx2`] or above. The
//! parent modules check the matrix and the activation length before [`matvec_block`] runs, so the
//! kernels index with unchecked unaligned loads whose bounds follow from the loop limits.
//!
//! Codes are brought into i16 lanes and multiplied with the activations by `vpmaddwd` (16
//! products into 8 i32 pair sums); the i32 sums of a span are converted to f32 once and scaled by
//! `s_g·dx_j`.
//! - 4-bit: 64 codes at a time (32 bytes, [`madd64_quad`]): the four nibbles of each 16-bit word,
//!   masked and shifted in place, give four vectors of 16 codes, for columns `4k + r`
//!   ([`super::ValueOrder::NibbleQuad`]). The i32 lanes 0..4 then hold the first 32 columns and
//!   lanes 4..8 the last 32, so that spans of 32 columns take one factor per half vector
//!   ([`row_dot_4bit_span32`]).
//! - 8-bit: 16 bytes widened to 16 lanes, twice per 32 codes ([`super::ValueOrder::Natural`]).
//! - 2/3/5/6-bit codes, which straddle bytes, are gathered two bytes per lane by a byte shuffle,
//!   lifted to the top of the lane by a multiplication with a power of two, and shifted down
//!   (natural order).

use std::arch::x86_64::*;
use std::ops::Range;

use super::QuantizedRow;
use crate::matmul::avx2::{hsum, widen_floats, DECODE_ROW_BATCH};
use crate::{Matrix, Weights};

/// `Σ_j factors[j] · Σ_{i∈span j} q_i·xq_i` for the row whose codes start at byte `start` of
/// `packed`, for the span length and bit width the function was chosen for.
///
/// # Safety
/// The CPU supports the function's instruction sets; the row's `cols = factors.len() * span`
/// codes lie in `packed` (`start + cols * bits / 8 <= packed.len()`); `xq.len() == cols`, in the
/// order the function decodes codes.
pub(in crate::matmul) type RowDot =
    unsafe fn(packed: &[u8], start: usize, factors: &[f32], xq: &[i16]) -> f32;

/// Computes `out[o - rows.start]` for the given rows of an affine `m` of `bits`-bit codes.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C. `m` must have passed [`Matrix::validate`] with affine
/// weights; `xq` must be the quantized row for `m` in the order
/// [`super::ValueOrder::of`]`(Backend::Avx2, m)`; `sums` holds the row's `cols / group_size`
/// group sums; `rows` lies in `0..m.rows` and `out.len() == rows.len()`.
#[target_feature(enable = "avx2,fma,f16c")]
pub(in crate::matmul) unsafe fn matvec_block(
    m: &Matrix,
    xq: &QuantizedRow,
    sums: &[f32],
    rows: Range<usize>,
    out: &mut [f32],
) {
    let Weights::Affine { bits, .. } = m.weights else {
        unreachable!("int16 matvec called with float weights")
    };
    let row_dot: RowDot = match (bits, xq.span) {
        (4, 32) => row_dot_4bit_span32,
        (4, 64) => row_dot_4bit::<1>,
        (4, _) => row_dot_4bit::<2>,
        (2, _) => row_dot_for::<2>(xq.span),
        (3, _) => row_dot_for::<3>(xq.span),
        (5, _) => row_dot_for::<5>(xq.span),
        (6, _) => row_dot_for::<6>(xq.span),
        (8, _) => row_dot_for::<8>(xq.span),
        _ => unreachable!("validated matrix with {bits}-bit codes"),
    };
    matvec_rows(m, xq, sums, rows, out, row_dot);
}

/// The row kernel for `BITS`-bit codes in natural order and spans of `span` columns (32, 64,
/// 128).
fn row_dot_for<const BITS: usize>(span: usize) -> RowDot {
    match span {
        32 => row_dot::<BITS, 1>,
        64 => row_dot::<BITS, 2>,
        _ => row_dot::<BITS, 4>,
    }
}

/// The part shared by the SIMD backends: scales and biases widened a batch of rows at a time (one
/// pass for many short rows, and they stay in L1 next to the streamed codes), the factors
/// `s_g·dx_j` formed per row, then `row_dot` plus the bias term per row.
///
/// # Safety
/// As [`matvec_block`], and `row_dot` must be safe to call on this CPU with `xq` in its order.
#[target_feature(enable = "avx2,fma,f16c")]
pub(in crate::matmul) unsafe fn matvec_rows(
    m: &Matrix,
    xq: &QuantizedRow,
    sums: &[f32],
    rows: Range<usize>,
    out: &mut [f32],
    row_dot: RowDot,
) {
    let Weights::Affine {
        bits,
        group_size,
        packed,
        scales,
        biases,
        scale_kind,
    } = m.weights
    else {
        unreachable!("int16 matvec called with float weights")
    };
    let cols = m.cols;
    let groups = cols / group_size;
    let row_bytes = cols * bits as usize / 8;
    let size = scale_kind.size_bytes();
    let (spans, spans_per_group) = (xq.steps.len(), group_size / xq.span);
    debug_assert!(xq.values.len() == cols && spans * xq.span == cols && sums.len() == groups);
    let batch = DECODE_ROW_BATCH.min(rows.len());
    let mut batch_scales = vec![0f32; batch * groups];
    let mut batch_biases = vec![0f32; batch * groups];
    let mut factors = vec![0f32; spans];
    for (b0, ys) in rows.step_by(batch).zip(out.chunks_mut(batch)) {
        let params = b0 * groups * size..(b0 + ys.len()) * groups * size;
        let (batch_scales, batch_biases) = (
            &mut batch_scales[..ys.len() * groups],
            &mut batch_biases[..ys.len() * groups],
        );
        widen_floats(scale_kind, &scales[params.clone()], batch_scales);
        widen_floats(scale_kind, &biases[params], batch_biases);
        for ((r, y), (s, b)) in ys.iter_mut().enumerate().zip(
            batch_scales
                .chunks_exact(groups)
                .zip(batch_biases.chunks_exact(groups)),
        ) {
            // `factors[j] = s_g·dx_j` for the spans j of each group g.
            if spans_per_group == 1 {
                for ((f, s), dx) in factors.iter_mut().zip(s).zip(&xq.steps) {
                    *f = s * dx;
                }
            } else {
                for ((f, dx), s) in factors
                    .chunks_exact_mut(spans_per_group)
                    .zip(xq.steps.chunks_exact(spans_per_group))
                    .zip(s)
                {
                    for (f, dx) in f.iter_mut().zip(dx) {
                        *f = s * dx;
                    }
                }
            }
            // The row's codes are `row_bytes` bytes at `(b0 + r) * row_bytes`, inside the
            // validated `packed` since `b0 + r < rows.end <= m.rows`; `factors` has one value
            // per span, and `xq.values` `cols` values.
            let products = row_dot(packed, (b0 + r) * row_bytes, &factors, &xq.values);
            *y = products + bias_terms(b, sums, s, &xq.corrections);
        }
    }
}

/// `Σ_g b_g·sums_g + s_g·corrections_g` for one row (module docs of [`super`]).
///
/// # Safety
/// AVX2+FMA+F16C; the four slices have the same length.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn bias_terms(biases: &[f32], sums: &[f32], scales: &[f32], corrections: &[f32]) -> f32 {
    let n = biases.len();
    debug_assert!(sums.len() == n && scales.len() == n && corrections.len() == n);
    let (bp, sp, cp, qp) = (
        biases.as_ptr(),
        sums.as_ptr(),
        scales.as_ptr(),
        corrections.as_ptr(),
    );
    let mut acc = _mm256_setzero_ps();
    let mut g = 0;
    // Reads [g, g + 8) of the four slices while g + 8 <= n.
    while g + 8 <= n {
        acc = _mm256_fmadd_ps(_mm256_loadu_ps(bp.add(g)), _mm256_loadu_ps(sp.add(g)), acc);
        acc = _mm256_fmadd_ps(_mm256_loadu_ps(cp.add(g)), _mm256_loadu_ps(qp.add(g)), acc);
        g += 8;
    }
    let mut sum = hsum(acc);
    for j in g..n {
        sum += biases[j] * sums[j] + scales[j] * corrections[j];
    }
    sum
}

/// [`RowDot`] for `BITS`-bit codes in natural order, spans of `SPAN_BLOCKS` 32-code blocks.
///
/// # Safety
/// As [`RowDot`], on an AVX2+FMA+F16C CPU.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn row_dot<const BITS: usize, const SPAN_BLOCKS: usize>(
    packed: &[u8],
    start: usize,
    factors: &[f32],
    xq: &[i16],
) -> f32 {
    debug_assert!(start + factors.len() * SPAN_BLOCKS * 4 * BITS <= packed.len());
    debug_assert_eq!(xq.len(), factors.len() * SPAN_BLOCKS * 32);
    let mut at = start;
    let mut xp = xq.as_ptr();
    // Two f32 accumulators, alternating between spans, so that a span of one block is not held
    // up by the latency of the previous span's FMA.
    let mut acc = [_mm256_setzero_ps(); 2];
    let pairs = factors.chunks_exact(2);
    let last = pairs.remainder();
    for pair in pairs {
        for (a, f) in acc.iter_mut().zip(pair) {
            let mut sum = _mm256_setzero_si256();
            for _ in 0..SPAN_BLOCKS {
                // Reads the block's codes [at, at + 4·BITS) and xq[c, c + 32) for its first
                // column c: inside both slices by the preconditions.
                sum = _mm256_add_epi32(sum, madd32::<BITS>(packed, at, xp));
                at += 4 * BITS;
                xp = xp.add(32);
            }
            *a = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum), _mm256_set1_ps(*f), *a);
        }
    }
    for f in last {
        let mut sum = _mm256_setzero_si256();
        for _ in 0..SPAN_BLOCKS {
            // As above.
            sum = _mm256_add_epi32(sum, madd32::<BITS>(packed, at, xp));
            at += 4 * BITS;
            xp = xp.add(32);
        }
        acc[0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum), _mm256_set1_ps(*f), acc[0]);
    }
    hsum(_mm256_add_ps(acc[0], acc[1]))
}

/// [`RowDot`] for 4-bit codes in [`super::ValueOrder::NibbleQuad`] order and spans of `CHUNKS`
/// times 64 columns (`cols` is then a multiple of 64).
///
/// # Safety
/// As [`RowDot`], on an AVX2+FMA+F16C CPU.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn row_dot_4bit<const CHUNKS: usize>(
    packed: &[u8],
    start: usize,
    factors: &[f32],
    xq: &[i16],
) -> f32 {
    debug_assert!(start + factors.len() * CHUNKS * 32 <= packed.len());
    debug_assert_eq!(xq.len(), factors.len() * CHUNKS * 64);
    let mut p = packed.as_ptr().add(start);
    let mut xp = xq.as_ptr();
    let mut acc = [_mm256_setzero_ps(); 2];
    let pairs = factors.chunks_exact(2);
    let last = pairs.remainder();
    for pair in pairs {
        for (a, f) in acc.iter_mut().zip(pair) {
            let mut sum = _mm256_setzero_si256();
            for _ in 0..CHUNKS {
                // Reads the chunk's 32 bytes of codes and its 64 values: inside both slices by
                // the preconditions.
                sum = _mm256_add_epi32(sum, madd64_quad(p, xp));
                p = p.add(32);
                xp = xp.add(64);
            }
            *a = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum), _mm256_set1_ps(*f), *a);
        }
    }
    for f in last {
        let mut sum = _mm256_setzero_si256();
        for _ in 0..CHUNKS {
            // As above.
            sum = _mm256_add_epi32(sum, madd64_quad(p, xp));
            p = p.add(32);
            xp = xp.add(64);
        }
        acc[0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum), _mm256_set1_ps(*f), acc[0]);
    }
    hsum(_mm256_add_ps(acc[0], acc[1]))
}

/// [`RowDot`] for 4-bit codes in [`super::ValueOrder::NibbleQuad`] order and spans of 32
/// columns: the two halves of each chunk's i32 sums take the factors of its two spans; a last
/// 32 columns (`cols % 64 == 32`) are one block in nibble-split order.
///
/// # Safety
/// As [`RowDot`], on an AVX2+FMA+F16C CPU.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn row_dot_4bit_span32(packed: &[u8], start: usize, factors: &[f32], xq: &[i16]) -> f32 {
    debug_assert!(start + factors.len() * 16 <= packed.len());
    debug_assert_eq!(xq.len(), factors.len() * 32);
    let chunks = factors.len() / 2;
    let (p, xp, fp) = (packed.as_ptr().add(start), xq.as_ptr(), factors.as_ptr());
    let mut acc = [_mm256_setzero_ps(); 2];
    let mut c = 0;
    // Chunk c reads 32 bytes of codes at 32c, 64 values at 64c and 2 factors at 2c: inside the
    // slices while c < chunks.
    while c + 2 <= chunks {
        for (k, a) in acc.iter_mut().enumerate() {
            let at = c + k;
            *a = fmadd_span32_chunk(p.add(32 * at), xp.add(64 * at), fp.add(2 * at), *a);
        }
        c += 2;
    }
    if c < chunks {
        acc[0] = fmadd_span32_chunk(p.add(32 * c), xp.add(64 * c), fp.add(2 * c), acc[0]);
    }
    if factors.len() % 2 == 1 {
        // The last 16 bytes of the row's codes, the last 32 values and the last factor.
        let sum = madd32::<4>(packed, start + chunks * 32, xp.add(64 * chunks));
        let f = _mm256_set1_ps(factors[2 * chunks]);
        acc[1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum), f, acc[1]);
    }
    hsum(_mm256_add_ps(acc[0], acc[1]))
}

/// `acc + Σ` of one chunk of [`row_dot_4bit_span32`]: the chunk's eight i32 sums, lanes 0..4
/// times the factor at `fp` and lanes 4..8 times the next one.
///
/// # Safety
/// AVX2+FMA+F16C; `p` is readable for 32 bytes, `xp` for 64 values and `fp` for 2 factors.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn fmadd_span32_chunk(p: *const u8, xp: *const i16, fp: *const f32, acc: __m256) -> __m256 {
    let halves = _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1);
    let pair = _mm256_castps128_ps256(_mm_castsi128_ps(_mm_loadl_epi64(fp.cast())));
    let f = _mm256_permutevar8x32_ps(pair, halves);
    _mm256_fmadd_ps(_mm256_cvtepi32_ps(madd64_quad(p, xp)), f, acc)
}

/// The 64 4-bit codes of the 32 bytes at `p` times the 64 values at `xp` in
/// [`super::ValueOrder::NibbleQuad`] order, as eight i32 sums: lanes 0..4 over the first 32
/// columns, lanes 4..8 over the last 32.
///
/// # Safety
/// AVX2+FMA+F16C; `p` is readable for 32 bytes and `xp` for 64 values.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn madd64_quad(p: *const u8, xp: *const i16) -> __m256i {
    let words = _mm256_loadu_si256(p.cast());
    let nibble = _mm256_set1_epi16(0x0f);
    // Lane k of `codes[r]` holds nibble r of word k: the code of column 4k + r.
    let codes = [
        _mm256_and_si256(words, nibble),
        _mm256_and_si256(_mm256_srli_epi16::<4>(words), nibble),
        _mm256_and_si256(_mm256_srli_epi16::<8>(words), nibble),
        _mm256_srli_epi16::<12>(words),
    ];
    let mut sums = [_mm256_setzero_si256(); 4];
    for (r, (s, c)) in sums.iter_mut().zip(codes).enumerate() {
        *s = _mm256_madd_epi16(c, _mm256_loadu_si256(xp.add(16 * r).cast()));
    }
    _mm256_add_epi32(
        _mm256_add_epi32(sums[0], sums[1]),
        _mm256_add_epi32(sums[2], sums[3]),
    )
}

/// The shuffle and multiplier tables that extract 16 `BITS`-bit codes (2, 3, 5, 6 bits) starting
/// at a byte boundary into i16 lanes.
struct Unpack16<const BITS: usize>;

impl<const BITS: usize> Unpack16<BITS> {
    /// Lane `j` (word `j % 8` of 128-bit half `j / 8`; both halves hold the same 16 bytes)
    /// receives the byte where code `j` starts and the next one.
    const SHUFFLE: [u8; 32] = shuffle16(BITS);
    /// Lane `j` multiplies by `2^(16 − BITS − offset_j)`, `offset_j` being the bit offset of code
    /// `j` in its first byte: the code moves to the top `BITS` bits of the lane.
    const LIFT: [u16; 16] = lift16(BITS);
}

const fn shuffle16(bits: usize) -> [u8; 32] {
    let mut table = [0u8; 32];
    let mut j = 0;
    while j < 16 {
        // At most 15·6/8 + 1 = 12: inside the 16 bytes loaded.
        let first = j * bits / 8;
        table[2 * j] = first as u8;
        table[2 * j + 1] = (first + 1) as u8;
        j += 1;
    }
    table
}

const fn lift16(bits: usize) -> [u16; 16] {
    let mut table = [0u16; 16];
    let mut j = 0;
    while j < 16 {
        table[j] = 1 << (16 - bits - (j * bits) % 8);
        j += 1;
    }
    table
}

/// The 32 codes that start at byte `at` of `packed` times the 32 activations at `xp`, as eight
/// i32 sums of adjacent pairs of products; 4-bit codes in [`super::ValueOrder::NibbleSplit`]
/// order, others in natural order. Codes are at most 255 and `|xq| ≤ 32767`, so no pair sum
/// overflows.
///
/// # Safety
/// AVX2+FMA+F16C; `at + 4 * BITS <= packed.len()`; `xp` is readable for 32 values.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn madd32<const BITS: usize>(packed: &[u8], at: usize, xp: *const i16) -> __m256i {
    debug_assert!(at + 4 * BITS <= packed.len());
    let x0 = _mm256_loadu_si256(xp.cast());
    let x1 = _mm256_loadu_si256(xp.add(16).cast());
    let p = packed.as_ptr().add(at);
    let [c0, c1] = match BITS {
        4 => {
            // Reads bytes [at, at + 16): the block's 16 bytes.
            let v = _mm256_cvtepu8_epi16(_mm_loadu_si128(p.cast()));
            [
                _mm256_and_si256(v, _mm256_set1_epi16(0x0f)),
                _mm256_srli_epi16::<4>(v),
            ]
        }
        // Reads bytes [at, at + 32): the block's 32 bytes.
        8 => [
            _mm256_cvtepu8_epi16(_mm_loadu_si128(p.cast())),
            _mm256_cvtepu8_epi16(_mm_loadu_si128(p.add(16).cast())),
        ],
        _ => {
            // Each half of the block (16 codes, 2·BITS bytes) is read with a 16-byte load, which
            // may run past the block. Within the slice that is harmless; in the last 32 bytes of
            // the slice the block is copied to a zero-padded buffer first.
            let mut spare = [0u8; 32];
            let p = if at + 32 <= packed.len() {
                p
            } else {
                spare[..4 * BITS].copy_from_slice(&packed[at..at + 4 * BITS]);
                spare.as_ptr()
            };
            let shuffle = _mm256_loadu_si256(Unpack16::<BITS>::SHUFFLE.as_ptr().cast());
            let lift = _mm256_loadu_si256(Unpack16::<BITS>::LIFT.as_ptr().cast());
            let mut halves = [_mm256_setzero_si256(); 2];
            for (h, codes) in halves.iter_mut().enumerate() {
                // Reads [p + 2·BITS·h, .. + 16) ⊂ [p, p + 28): inside the slice or `spare`.
                let bytes =
                    _mm256_broadcastsi128_si256(_mm_loadu_si128(p.add(2 * BITS * h).cast()));
                let lifted = _mm256_mullo_epi16(_mm256_shuffle_epi8(bytes, shuffle), lift);
                *codes = match BITS {
                    2 => _mm256_srli_epi16::<14>(lifted),
                    3 => _mm256_srli_epi16::<13>(lifted),
                    5 => _mm256_srli_epi16::<11>(lifted),
                    6 => _mm256_srli_epi16::<10>(lifted),
                    _ => unreachable!("{BITS}-bit codes"),
                };
            }
            halves
        }
    };
    _mm256_add_epi32(_mm256_madd_epi16(c0, x0), _mm256_madd_epi16(c1, x1))
}
