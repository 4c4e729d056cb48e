//! AVX-512BW int16 matvec for 4- and 8-bit affine weights: the AVX2 kernel with one 32-lane
//! `vpmaddwd` per block of 32 codes. Other widths run on the AVX2 kernel on such CPUs, as in the
//! f32 path ([`crate::matmul::avx512::supports`]).
//!
//! Every function here is a `#[target_feature]` function that may run only after
//! [`crate::features::cpu_level`] reported [`crate::features::SimdLevel::Avx512`], which also
//! guarantees the AVX2 set: the row batching is [`super::avx2::matvec_rows`]. Bounds reasoning
//! as in [`super::avx2`].
//!
//! A 4-bit block's 16 bytes are loaded into both halves of a 256-bit register and widened to
//! 32 i16 lanes; shifting the upper 16 lanes right by 4 (a masked shift) and masking every lane
//! to 4 bits gives the low nibbles (even columns), then the high nibbles (odd columns): the
//! [`super::ValueOrder::NibbleSplit`] order. 8-bit codes are widened directly.

use std::arch::x86_64::*;
use std::ops::Range;

use super::avx2::{matvec_rows, RowDot};
use super::QuantizedRow;
use crate::{Matrix, Weights};

/// The upper 16 of 32 i16 lanes: those that take the high nibbles.
const HIGH_LANES: __mmask32 = 0xFFFF_0000;

/// Computes `out[o - rows.start]` for the given rows of an affine `m` of 4- or 8-bit codes.
///
/// # Safety
/// The CPU must support AVX-512F/BW, AVX2, FMA and F16C, and `m` must have 4- or 8-bit codes; the
/// rest as [`super::avx2::matvec_block`].
#[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
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
    let row_dot: RowDot = match bits {
        4 => row_dot_for::<4>(xq.span),
        8 => row_dot_for::<8>(xq.span),
        _ => unreachable!("avx512 int16 matvec called for {bits}-bit codes"),
    };
    matvec_rows(m, xq, sums, rows, out, row_dot);
}

/// The row kernel for `BITS`-bit codes and spans of `span` columns (32, 64, 128).
fn row_dot_for<const BITS: usize>(span: usize) -> RowDot {
    match span {
        32 => row_dot::<BITS, 1>,
        64 => row_dot::<BITS, 2>,
        _ => row_dot::<BITS, 4>,
    }
}

/// [`RowDot`] for 4- or 8-bit codes and spans of `SPAN_BLOCKS` 32-code blocks.
///
/// # Safety
/// As [`RowDot`], on a CPU with AVX-512F/BW.
#[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
unsafe fn row_dot<const BITS: usize, const SPAN_BLOCKS: usize>(
    packed: &[u8],
    start: usize,
    factors: &[f32],
    xq: &[i16],
) -> f32 {
    let blocks = SPAN_BLOCKS;
    debug_assert!(start + factors.len() * blocks * 4 * BITS <= packed.len());
    debug_assert_eq!(xq.len(), factors.len() * blocks * 32);
    let mut at = start;
    let mut xp = xq.as_ptr();
    let mut acc = [_mm512_setzero_ps(); 2];
    let pairs = factors.chunks_exact(2);
    let last = pairs.remainder();
    for pair in pairs {
        for (a, f) in acc.iter_mut().zip(pair) {
            let mut sum = _mm512_setzero_si512();
            for _ in 0..blocks {
                // Reads the block's codes [at, at + 4·BITS) and xq[c, c + 32) for its first
                // column c: inside both slices by the preconditions.
                sum = _mm512_add_epi32(sum, madd32::<BITS>(packed, at, xp));
                at += 4 * BITS;
                xp = xp.add(32);
            }
            *a = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), _mm512_set1_ps(*f), *a);
        }
    }
    for f in last {
        let mut sum = _mm512_setzero_si512();
        for _ in 0..blocks {
            // As above.
            sum = _mm512_add_epi32(sum, madd32::<BITS>(packed, at, xp));
            at += 4 * BITS;
            xp = xp.add(32);
        }
        acc[0] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), _mm512_set1_ps(*f), acc[0]);
    }
    _mm512_reduce_add_ps(_mm512_add_ps(acc[0], acc[1]))
}

/// The 32 codes that start at byte `at` of `packed` times the 32 activations at `xp`, as 16 i32
/// sums of adjacent pairs of products (module docs for the order of 4-bit codes).
///
/// # Safety
/// AVX-512F/BW; `BITS` is 4 or 8; `at + 4 * BITS <= packed.len()`; `xp` is readable for 32
/// values.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
unsafe fn madd32<const BITS: usize>(packed: &[u8], at: usize, xp: *const i16) -> __m512i {
    debug_assert!(at + 4 * BITS <= packed.len());
    let p = packed.as_ptr().add(at);
    let codes = if BITS == 4 {
        // Reads bytes [at, at + 16): the block's 16 bytes.
        let bytes = _mm512_cvtepu8_epi16(_mm256_broadcastsi128_si256(_mm_loadu_si128(p.cast())));
        _mm512_and_si512(
            _mm512_mask_srli_epi16::<4>(bytes, HIGH_LANES, bytes),
            _mm512_set1_epi16(0x0f),
        )
    } else {
        // Reads bytes [at, at + 32): the block's 32 bytes.
        _mm512_cvtepu8_epi16(_mm256_loadu_si256(p.cast()))
    };
    _mm512_madd_epi16(codes, _mm512_loadu_si512(xp.cast()))
}
