//! AVX2 int16 decode products of llama.cpp blocks (method in [`super`]).
//!
//! Codes are brought into i16 lanes (bytes widened by `vpmovsxbw`/`vpmovzxbw`, 16 at a time) and
//! multiplied with the int16 activations by `vpmaddwd` (16 products into 8 i32 pair sums). The
//! eight i32 vectors of one super-block's spans (Q4_K, Q5_K: its 8 sub-blocks; Q6_K: 8 groups of
//! 16, twice; Q8_0, Q4_0: 8 consecutive blocks) are reduced together by a tree of horizontal
//! additions ([`lane_sums`]) into one vector holding the eight sums, converted to f32 once, and
//! scaled by a vector of the eight factors: the f32 work is per span, not per weight.
//!
//! Every function here is a `#[target_feature]` function: it may run only after
//! [`crate::features::cpu_level`] reported AVX2 or above. The parent modules check the matrix
//! and the activation length before [`matvec_block`] runs, so the kernels use unchecked
//! unaligned loads whose bounds follow from the block sizes.
use std::arch::x86_64::*;
use std::ops::Range;

use super::{has_mins, SPAN};
use crate::ggml::BlockFormat;
use crate::matmul::avx2::hsum;
use crate::matmul::int16::QuantizedRow;

/// `Σ_i w_i·x_i` for one row of blocks (`row`), from the quantized activations and span sums.
///
/// # Safety
/// AVX2+FMA+F16C; `row` holds whole blocks of the function's format for `xq.values.len()`
/// columns; `sums` holds `cols / 32` values when the format has minimums.
type RowDot = unsafe fn(row: &[u8], xq: &QuantizedRow, sums: &[f32]) -> f32;

/// Computes `out[o - rows.start]` for the given rows (scalar twin: [`super::matvec_block`]).
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C. `data` holds a validated `[_, cols]` matrix of
/// `format` blocks, `rows` lies inside it, `xq` is [`super::quantize_activations`] of a row of
/// `cols` values, `sums` its `cols / 32` span sums when [`has_mins`]`(format)`, and
/// `out.len() == rows.len()`.
#[target_feature(enable = "avx2,fma,f16c")]
pub(in crate::matmul) unsafe fn matvec_block(
    format: BlockFormat,
    data: &[u8],
    cols: usize,
    xq: &QuantizedRow,
    sums: &[f32],
    rows: Range<usize>,
    out: &mut [f32],
) {
    debug_assert!(xq.span == SPAN && xq.values.len() == cols && out.len() == rows.len());
    debug_assert!(!has_mins(format) || sums.len() == cols / SPAN);
    let rb = format.row_bytes(cols);
    let row_dot: RowDot = match format {
        // Fallback formats of a few tensors per file: the scalar twin.
        BlockFormat::Q4_1 | BlockFormat::Q5_0 => {
            return super::matvec_block(format, data, cols, xq, sums, rows, out)
        }
        BlockFormat::Q8_0 => row_dot_q8_0::<false>,
        BlockFormat::Q4_0 => row_dot_q8_0::<true>,
        BlockFormat::Q4_K => row_dot_q4_k::<false>,
        BlockFormat::Q5_K => row_dot_q4_k::<true>,
        BlockFormat::Q6_K => row_dot_q6_k,
    };
    for (y, o) in out.iter_mut().zip(rows) {
        *y = row_dot(&data[o * rb..(o + 1) * rb], xq, sums);
    }
}

/// Lane `k` of the result: the sum of the eight i32 lanes of `v[k]`.
///
/// # Safety
/// AVX2.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(in crate::matmul::ggml_blocks) unsafe fn lane_sums(v: &[__m256i; 8]) -> __m256i {
    // hadd(a, b) = [a0+a1, a2+a3, b0+b1, b2+b3 | a4+a5, a6+a7, b4+b5, b6+b7]: two levels leave,
    // in each 128-bit half, the half sums of four vectors; adding the halves finishes them.
    let h01 = _mm256_hadd_epi32(v[0], v[1]);
    let h23 = _mm256_hadd_epi32(v[2], v[3]);
    let h45 = _mm256_hadd_epi32(v[4], v[5]);
    let h67 = _mm256_hadd_epi32(v[6], v[7]);
    let a = _mm256_hadd_epi32(h01, h23);
    let b = _mm256_hadd_epi32(h45, h67);
    _mm256_add_epi32(
        _mm256_permute2x128_si256(a, b, 0x20),
        _mm256_permute2x128_si256(a, b, 0x31),
    )
}

/// The sum of the eight i32 lanes of `v`.
///
/// # Safety
/// AVX2.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(in crate::matmul::ggml_blocks) unsafe fn hsum_i32(v: __m256i) -> i32 {
    let s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b01_00_11_10));
    _mm_cvtsi128_si32(_mm_add_epi32(s, _mm_shuffle_epi32(s, 0b10_11_00_01)))
}

/// 16 signed bytes times the 16 int16 values at `x`: eight i32 pair sums.
///
/// # Safety
/// AVX2; `x` readable for 16 values.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn madd_i8(bytes: __m128i, x: *const i16) -> __m256i {
    _mm256_madd_epi16(_mm256_cvtepi8_epi16(bytes), _mm256_loadu_si256(x.cast()))
}

/// As [`madd_i8`] for unsigned bytes.
///
/// # Safety
/// AVX2; `x` readable for 16 values.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn madd_u8(bytes: __m128i, x: *const i16) -> __m256i {
    _mm256_madd_epi16(_mm256_cvtepu8_epi16(bytes), _mm256_loadu_si256(x.cast()))
}

/// 32 bytes (signed or not) times the 32 int16 values at `x`: eight i32 sums.
///
/// # Safety
/// AVX2; `x` readable for 32 values.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn madd32<const SIGNED: bool>(bytes: __m256i, x: *const i16) -> __m256i {
    let (lo, hi) = (
        _mm256_castsi256_si128(bytes),
        _mm256_extracti128_si256(bytes, 1),
    );
    if SIGNED {
        _mm256_add_epi32(madd_i8(lo, x), madd_i8(hi, x.add(16)))
    } else {
        _mm256_add_epi32(madd_u8(lo, x), madd_u8(hi, x.add(16)))
    }
}

/// The f16 at `p` as f32.
///
/// # Safety
/// F16C; `p` readable for 2 bytes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(in crate::matmul::ggml_blocks) unsafe fn f16_at(p: *const u8) -> f32 {
    let bits = p.cast::<u16>().read_unaligned();
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(bits))))
}

/// The 32 codes of a Q8_0 block (`Q4 = false`) or a Q4_0 block (`Q4 = true`, minus 8) starting
/// at `p`, as signed bytes in column order.
///
/// # Safety
/// AVX2; `p` readable for one block (34 or 18 bytes).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(in crate::matmul::ggml_blocks) unsafe fn codes_q8_0<const Q4: bool>(p: *const u8) -> __m256i {
    if Q4 {
        let qs = _mm_loadu_si128(p.add(2).cast());
        let m = _mm_set1_epi8(15);
        let lo = _mm_and_si128(qs, m);
        let hi = _mm_and_si128(_mm_srli_epi16(qs, 4), m);
        _mm256_sub_epi8(_mm256_set_m128i(hi, lo), _mm256_set1_epi8(8))
    } else {
        _mm256_loadu_si256(p.add(2).cast())
    }
}

/// Q8_0 (`Q4 = false`) or Q4_0 (`Q4 = true`) rows: eight blocks at a time, their f16 scales
/// converted together.
///
/// # Safety
/// As [`RowDot`].
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn row_dot_q8_0<const Q4: bool>(row: &[u8], xq: &QuantizedRow, _sums: &[f32]) -> f32 {
    let bb = if Q4 { 18 } else { 34 };
    let blocks = row.len() / bb;
    let (p, x, steps) = (row.as_ptr(), xq.values.as_ptr(), xq.steps.as_ptr());
    let mut acc = _mm256_setzero_ps();
    let mut b = 0;
    // SAFETY (every load below): block `b + k < blocks` lies in `row`, its 32 activations and its
    // step in `xq` (one step per block of 32 columns).
    while b + 8 <= blocks {
        let mut v = [_mm256_setzero_si256(); 8];
        let mut d = [0u16; 8];
        for (k, (v, d)) in v.iter_mut().zip(&mut d).enumerate() {
            let block = p.add((b + k) * bb);
            *d = block.cast::<u16>().read_unaligned();
            *v = madd32::<true>(codes_q8_0::<Q4>(block), x.add(SPAN * (b + k)));
        }
        let s = _mm256_cvtepi32_ps(lane_sums(&v));
        let d = _mm256_cvtph_ps(_mm_loadu_si128(d.as_ptr().cast()));
        acc = _mm256_fmadd_ps(_mm256_mul_ps(d, _mm256_loadu_ps(steps.add(b))), s, acc);
        b += 8;
    }
    let mut y = hsum(acc);
    while b < blocks {
        let block = p.add(b * bb);
        let s = hsum_i32(madd32::<true>(codes_q8_0::<Q4>(block), x.add(SPAN * b)));
        y += f16_at(block) * *steps.add(b) * s as f32;
        b += 1;
    }
    y
}

/// The eight 6-bit scales and mins of a Q4_K/Q5_K block's 12 scale bytes at `q`, as f32 vectors
/// (the unpacking of [`crate::ggml::scale_min_k4`] done on 32-bit words: bytes `0..4` hold the
/// low six bits of scales 0..4, bytes `4..8` those of mins 0..4, bytes `8..12` the low four bits
/// of scales and mins 4..8, whose top two bits are the top bits of bytes `0..8`).
///
/// # Safety
/// AVX2; `q` readable for 12 bytes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(in crate::matmul::ggml_blocks) unsafe fn scales_mins(q: *const u8) -> (__m256, __m256) {
    let word = |i: usize| q.add(4 * i).cast::<u32>().read_unaligned();
    let (a, b, c) = (word(0), word(1), word(2));
    let sc = u64::from(a & 0x3f3f_3f3f)
        | (u64::from((c & 0x0f0f_0f0f) | ((a >> 2) & 0x3030_3030)) << 32);
    let mn = u64::from(b & 0x3f3f_3f3f)
        | (u64::from(((c >> 4) & 0x0f0f_0f0f) | ((b >> 2) & 0x3030_3030)) << 32);
    let widen = |v: u64| _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_cvtsi64_si128(v as i64)));
    (widen(sc), widen(mn))
}

/// Q4_K rows, or Q5_K rows with `FIFTH_BIT`.
///
/// # Safety
/// As [`RowDot`].
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn row_dot_q4_k<const FIFTH_BIT: bool>(row: &[u8], xq: &QuantizedRow, sums: &[f32]) -> f32 {
    let (bb, qs_at) = if FIFTH_BIT { (176, 48) } else { (144, 16) };
    let m4 = _mm256_set1_epi8(15);
    let one = _mm256_set1_epi8(1);
    let x = xq.values.as_ptr();
    let (steps, corrections, sums) = (xq.steps.as_ptr(), xq.corrections.as_ptr(), sums.as_ptr());
    let mut acc = _mm256_setzero_ps();
    // SAFETY (every load below): super-block `sb` lies in `row` (144 or 176 bytes), its 256
    // activations and 8 spans' steps, corrections and sums in `xq` and `sums`.
    for sb in 0..row.len() / bb {
        let p = row.as_ptr().add(sb * bb);
        let (d, dmin) = (f16_at(p), f16_at(p.add(2)));
        let (scales, mins) = scales_mins(p.add(4));
        let mut qh = if FIFTH_BIT {
            _mm256_loadu_si256(p.add(16).cast())
        } else {
            _mm256_setzero_si256()
        };
        let xs = x.add(256 * sb);
        let mut v = [_mm256_setzero_si256(); 8];
        for i in 0..4 {
            // Byte l of the 32: column 64i + l in its low nibble, 64i + 32 + l in its high one.
            let bytes = _mm256_loadu_si256(p.add(qs_at + 32 * i).cast());
            let mut lo = _mm256_and_si256(bytes, m4);
            let mut hi = _mm256_and_si256(_mm256_srli_epi16(bytes, 4), m4);
            if FIFTH_BIT {
                // Bits 2i and 2i + 1 of qh[l], brought to bits 0 and 1 by the shifts of earlier
                // iterations (a 16-bit shift by less than 8 keeps each byte's own low bits).
                lo = _mm256_or_si256(lo, _mm256_slli_epi16(_mm256_and_si256(qh, one), 4));
                let bit1 = _mm256_and_si256(_mm256_srli_epi16(qh, 1), one);
                hi = _mm256_or_si256(hi, _mm256_slli_epi16(bit1, 4));
                qh = _mm256_srli_epi16(qh, 2);
            }
            v[2 * i] = madd32::<false>(lo, xs.add(64 * i));
            v[2 * i + 1] = madd32::<false>(hi, xs.add(64 * i + 32));
        }
        let s = _mm256_cvtepi32_ps(lane_sums(&v));
        let k = 8 * sb;
        let ds = _mm256_mul_ps(_mm256_set1_ps(d), scales);
        let dm = _mm256_mul_ps(_mm256_set1_ps(dmin), mins);
        let t = _mm256_fmadd_ps(
            _mm256_loadu_ps(steps.add(k)),
            s,
            _mm256_loadu_ps(corrections.add(k)),
        );
        acc = _mm256_fmadd_ps(ds, t, acc);
        acc = _mm256_fnmadd_ps(dm, _mm256_loadu_ps(sums.add(k)), acc);
    }
    hsum(acc)
}

/// Q6_K rows: per half super-block, the codes of 128 columns in four vectors of 32 bytes (as the
/// f32 decoder in `ggml_blocks/avx2.rs` builds them), whose halves are the 8 groups of 16.
///
/// # Safety
/// As [`RowDot`].
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn row_dot_q6_k(row: &[u8], xq: &QuantizedRow, _sums: &[f32]) -> f32 {
    let m4 = _mm256_set1_epi8(15);
    let m2 = _mm256_set1_epi8(3);
    let c32 = _mm256_set1_epi8(32);
    // Group g of a half uses the step of span g / 2.
    let pairs = _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3);
    let (x, steps) = (xq.values.as_ptr(), xq.steps.as_ptr());
    let mut acc = _mm256_setzero_ps();
    // SAFETY (every load below): super-block `sb` lies in `row` (210 bytes: ql 0..128,
    // qh 128..192, scales 192..208, d 208..210), its 256 activations and 8 steps in `xq`.
    for sb in 0..row.len() / 210 {
        let p = row.as_ptr().add(sb * 210);
        let d = _mm256_set1_ps(f16_at(p.add(208)));
        for h in 0..2 {
            let l0 = _mm256_loadu_si256(p.add(64 * h).cast());
            let l1 = _mm256_loadu_si256(p.add(64 * h + 32).cast());
            let hh = _mm256_loadu_si256(p.add(128 + 32 * h).cast());
            let q = [
                _mm256_or_si256(_mm256_and_si256(l0, m4), high_bits(hh, 0, m2)),
                _mm256_or_si256(_mm256_and_si256(l1, m4), high_bits(hh, 2, m2)),
                _mm256_or_si256(
                    _mm256_and_si256(_mm256_srli_epi16(l0, 4), m4),
                    high_bits(hh, 4, m2),
                ),
                _mm256_or_si256(
                    _mm256_and_si256(_mm256_srli_epi16(l1, 4), m4),
                    high_bits(hh, 6, m2),
                ),
            ];
            let xs = x.add(256 * sb + 128 * h);
            let mut v = [_mm256_setzero_si256(); 8];
            for (k, q) in q.into_iter().enumerate() {
                let q = _mm256_sub_epi8(q, c32);
                v[2 * k] = madd_i8(_mm256_castsi256_si128(q), xs.add(32 * k));
                v[2 * k + 1] = madd_i8(_mm256_extracti128_si256(q, 1), xs.add(32 * k + 16));
            }
            let s = _mm256_cvtepi32_ps(lane_sums(&v));
            let scales = _mm_loadl_epi64(p.add(192 + 8 * h).cast());
            let ds = _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(scales)));
            let dx4 = _mm_loadu_ps(steps.add(8 * sb + 4 * h));
            let dx = _mm256_permutevar8x32_ps(_mm256_castps128_ps256(dx4), pairs);
            acc = _mm256_fmadd_ps(ds, _mm256_mul_ps(dx, s), acc);
        }
    }
    hsum(acc)
}

/// Bits `[shift, shift + 2)` of each byte of `hh`, moved to bits 4 and 5.
///
/// # Safety
/// AVX2.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(in crate::matmul::ggml_blocks) unsafe fn high_bits(
    hh: __m256i,
    shift: i32,
    m2: __m256i,
) -> __m256i {
    let s = _mm256_srl_epi16(hh, _mm_cvtsi32_si128(shift));
    _mm256_slli_epi16(_mm256_and_si256(s, m2), 4)
}
