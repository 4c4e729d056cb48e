//! AVX2 decoding of llama.cpp blocks, and the products over them (see the parent module).
//!
//! Each decoder is a transcription of [`crate::ggml::dequantize_block`] with the same f32
//! operations in the same order (per-block scale products computed as scalars, then
//! `ds · q − dm` as a multiply and a subtract, never fused), so its output is bit-identical to
//! the scalar decoder's (tested). Codes are widened byte → i32 → f32 eight at a time.
use std::arch::x86_64::*;
use std::ops::Range;

use super::super::avx2::hsum;
use super::super::Activations;
use crate::ggml::{scale_min_k4, BlockFormat};

/// Computes `out[(o - rows.start) * tokens.len() + (t - tokens.start)]` (parent module contract).
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C; `data` must hold the rows of a validated `[_, cols]`
/// matrix of `format` blocks, `rows` must lie inside it, `tokens` in the tokens of `act`, and
/// `out.len() == rows.len() * tokens.len()`.
#[target_feature(enable = "avx2,fma,f16c")]
pub(in super::super) unsafe fn matmul_block(
    format: BlockFormat,
    data: &[u8],
    cols: usize,
    act: &Activations,
    rows: Range<usize>,
    tokens: Range<usize>,
    out: &mut [f32],
) {
    let rb = format.row_bytes(cols);
    let nt = tokens.len();
    let x = act.tokens(tokens);
    let xs: Vec<&[f32]> = x.chunks_exact(cols).collect();
    let mut w = vec![0f32; cols];
    for (row_out, o) in out.chunks_exact_mut(nt).zip(rows) {
        decode_row(format, &data[o * rb..(o + 1) * rb], &mut w);
        // Tokens in threes and pairs share each load of the decoded row (the dot products are
        // bound by loads, not FMAs), each with `dot`'s bits.
        let mut t = 0;
        while t + 3 <= nt {
            row_out[t..t + 3].copy_from_slice(&dot_tokens(&w, [xs[t], xs[t + 1], xs[t + 2]]));
            t += 3;
        }
        if t + 2 <= nt {
            row_out[t..t + 2].copy_from_slice(&dot_tokens(&w, [xs[t], xs[t + 1]]));
            t += 2;
        }
        if t < nt {
            row_out[t] = dot(&w, xs[t]);
        }
    }
}

/// [`dot`] of `a` with each of `T` vectors, every result with `dot`'s exact bits (the same four
/// accumulators, the same reduction, the same tail), sharing each load of `a`.
///
/// # Safety
/// AVX2+FMA; every `b[t].len() == a.len()`.
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::needless_range_loop)] // acc[t][k]: two indices, as dot's acc[k]
unsafe fn dot_tokens<const T: usize>(a: &[f32], b: [&[f32]; T]) -> [f32; T] {
    let n = a.len();
    debug_assert!(b.iter().all(|x| x.len() == n));
    let pa = a.as_ptr();
    let mut acc = [[_mm256_setzero_ps(); 4]; T];
    let mut i = 0;
    // SAFETY: loads read [i, i + 32) or [i, i + 8), inside every slice by the loop conditions.
    while i + 32 <= n {
        for k in 0..4 {
            let j = i + 8 * k;
            let av = _mm256_loadu_ps(pa.add(j));
            for t in 0..T {
                acc[t][k] = _mm256_fmadd_ps(av, _mm256_loadu_ps(b[t].as_ptr().add(j)), acc[t][k]);
            }
        }
        i += 32;
    }
    while i + 8 <= n {
        let av = _mm256_loadu_ps(pa.add(i));
        for t in 0..T {
            acc[t][0] = _mm256_fmadd_ps(av, _mm256_loadu_ps(b[t].as_ptr().add(i)), acc[t][0]);
        }
        i += 8;
    }
    let mut out = [0f32; T];
    for t in 0..T {
        let c = acc[t];
        let mut s = hsum(_mm256_add_ps(
            _mm256_add_ps(c[0], c[1]),
            _mm256_add_ps(c[2], c[3]),
        ));
        for j in i..n {
            s += a[j] * b[t][j];
        }
        out[t] = s;
    }
    out
}

/// Decodes a row of `format` blocks into `out` (`out.len()` a multiple of the block size).
///
/// # Safety
/// AVX2+FMA+F16C; `row.len() == format.row_bytes(out.len())`.
#[target_feature(enable = "avx2,fma,f16c")]
pub(in super::super) unsafe fn decode_row(format: BlockFormat, row: &[u8], out: &mut [f32]) {
    debug_assert_eq!(row.len(), format.row_bytes(out.len()));
    let (bb, be) = (format.block_bytes(), format.block_elements());
    for (block, y) in row.chunks_exact(bb).zip(out.chunks_exact_mut(be)) {
        // SAFETY (for each call): `block` has `bb` bytes and `y` has `be` values, the sizes
        // every decoder reads and writes.
        match format {
            BlockFormat::Q8_0 => q8_0(block, y),
            BlockFormat::Q4_0 => q4_0(block, y),
            BlockFormat::Q4_K => q4_k::<false>(block, y),
            BlockFormat::Q5_K => q4_k::<true>(block, y),
            BlockFormat::Q6_K => q6_k(block, y),
            // Fallback formats of a few tensors per file: the scalar decoder.
            BlockFormat::Q4_1 | BlockFormat::Q5_0 => {
                crate::ggml::dequantize_block(format, block, y)
            }
        }
    }
}

/// `Σ a[i]·b[i]` with four vector accumulators.
///
/// # Safety
/// AVX2+FMA+F16C; `a.len() == b.len()`.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot(a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    let n = a.len();
    let (pa, pb) = (a.as_ptr(), b.as_ptr());
    let mut acc = [_mm256_setzero_ps(); 4];
    let mut i = 0;
    // SAFETY: every load reads [i, i + 32) or [i, i + 8) with the loop conditions keeping the
    // end inside both slices.
    while i + 32 <= n {
        for (k, a_k) in acc.iter_mut().enumerate() {
            let j = i + 8 * k;
            *a_k = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(j)), _mm256_loadu_ps(pb.add(j)), *a_k);
        }
        i += 32;
    }
    while i + 8 <= n {
        acc[0] = _mm256_fmadd_ps(
            _mm256_loadu_ps(pa.add(i)),
            _mm256_loadu_ps(pb.add(i)),
            acc[0],
        );
        i += 8;
    }
    let sum = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
    let mut s = hsum(sum);
    while i < n {
        s += a[i] * b[i];
        i += 1;
    }
    s
}

#[inline]
fn f16_at(b: &[u8], at: usize) -> f32 {
    half::f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// Writes `ds · q − dm` (or `ds · q` when `dm` is `None`) for the 32 byte codes of `q` (as u8,
/// or as i8 with `SIGNED`) into `out[0..32]`.
///
/// # Safety
/// AVX2+FMA+F16C; `out` must have at least 32 values.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn scale32<const SIGNED: bool>(q: __m256i, ds: [f32; 4], dm: Option<f32>, out: &mut [f32]) {
    debug_assert!(out.len() >= 32);
    let halves = [_mm256_castsi256_si128(q), _mm256_extracti128_si256(q, 1)];
    for (k, ds_k) in ds.into_iter().enumerate() {
        let h = halves[k / 2];
        let bytes = if k % 2 == 0 { h } else { _mm_srli_si128(h, 8) };
        let wide = if SIGNED {
            _mm256_cvtepi8_epi32(bytes)
        } else {
            _mm256_cvtepu8_epi32(bytes)
        };
        let mut v = _mm256_mul_ps(_mm256_set1_ps(ds_k), _mm256_cvtepi32_ps(wide));
        if let Some(dm) = dm {
            v = _mm256_sub_ps(v, _mm256_set1_ps(dm));
        }
        // SAFETY: out has at least 32 values; this writes [8k, 8k + 8).
        _mm256_storeu_ps(out.as_mut_ptr().add(8 * k), v);
    }
}

/// # Safety
/// AVX2+FMA+F16C; `b` is one Q8_0 block (34 bytes), `out` 32 values.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q8_0(b: &[u8], out: &mut [f32]) {
    let d = f16_at(b, 0);
    // SAFETY: bytes [2, 34) of the block.
    let q = _mm256_loadu_si256(b.as_ptr().add(2).cast());
    // gguf-py computes x · d; f32 multiplication commutes exactly.
    scale32::<true>(q, [d; 4], None, out);
}

/// # Safety
/// AVX2+FMA+F16C; `b` is one Q4_0 block (18 bytes), `out` 32 values.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q4_0(b: &[u8], out: &mut [f32]) {
    let d = f16_at(b, 0);
    // SAFETY: bytes [2, 18) of the block.
    let qs = _mm_loadu_si128(b.as_ptr().add(2).cast());
    let m = _mm_set1_epi8(15);
    let lo = _mm_and_si128(qs, m);
    let hi = _mm_and_si128(_mm_srli_epi16(qs, 4), m);
    // Low nibbles are values 0..16, high nibbles 16..32; minus 8 as signed bytes.
    let q = _mm256_sub_epi8(_mm256_set_m128i(hi, lo), _mm256_set1_epi8(8));
    scale32::<true>(q, [d; 4], None, out);
}

/// Q4_K, or Q5_K with `FIFTH_BIT`.
///
/// # Safety
/// AVX2+FMA+F16C; `b` is one block (144 or 176 bytes), `out` 256 values.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q4_k<const FIFTH_BIT: bool>(b: &[u8], out: &mut [f32]) {
    let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
    let scales = &b[4..16];
    let (qh, qs) = if FIFTH_BIT {
        (&b[16..48], &b[48..176])
    } else {
        (&b[16..16], &b[16..144])
    };
    let m = _mm256_set1_epi8(15);
    let one = _mm256_set1_epi8(1);
    let qh = if FIFTH_BIT {
        // SAFETY: qh has 32 bytes when FIFTH_BIT.
        Some(_mm256_loadu_si256(qh.as_ptr().cast()))
    } else {
        None
    };
    for i in 0..4 {
        // SAFETY: qs has 128 bytes; this reads [32i, 32i + 32).
        let bytes = _mm256_loadu_si256(qs.as_ptr().add(32 * i).cast());
        for half in 0..2 {
            let j = 2 * i + half;
            let (sc, mn) = scale_min_k4(j, scales);
            let ds = d * f32::from(sc);
            let dm = dmin * f32::from(mn);
            let mut q = if half == 0 {
                _mm256_and_si256(bytes, m)
            } else {
                _mm256_and_si256(_mm256_srli_epi16(bytes, 4), m)
            };
            if let Some(qh) = qh {
                // Bit j of each byte: a 16-bit shift by j < 8 brings each byte's own bit j to
                // its bit 0; the mask drops what came from the neighbouring byte.
                let bit = _mm256_and_si256(_mm256_srl_epi16(qh, _mm_cvtsi32_si128(j as i32)), one);
                q = _mm256_or_si256(q, _mm256_slli_epi16(bit, 4));
            }
            scale32::<false>(q, [ds; 4], Some(dm), &mut out[32 * j..32 * j + 32]);
        }
    }
}

/// # Safety
/// AVX2+FMA+F16C; `b` is one Q6_K block (210 bytes), `out` 256 values.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q6_k(b: &[u8], out: &mut [f32]) {
    let d = f16_at(b, 208);
    let scales = &b[192..208];
    let m4 = _mm256_set1_epi8(15);
    let m2 = _mm256_set1_epi8(3);
    let c32 = _mm256_set1_epi8(32);
    for h in 0..2 {
        // SAFETY: ql = b[0..128], qh = b[128..192]; these read [64h, 64h + 64) of ql and
        // [32h, 32h + 32) of qh.
        let l0 = _mm256_loadu_si256(b.as_ptr().add(64 * h).cast());
        let l1 = _mm256_loadu_si256(b.as_ptr().add(64 * h + 32).cast());
        let hh = _mm256_loadu_si256(b.as_ptr().add(128 + 32 * h).cast());
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
        for (k, q) in q.into_iter().enumerate() {
            let s = &scales[8 * h + 2 * k..];
            let (a, c) = (d * f32::from(s[0] as i8), d * f32::from(s[1] as i8));
            let start = 128 * h + 32 * k;
            scale32::<true>(
                _mm256_sub_epi8(q, c32),
                [a, a, c, c],
                None,
                &mut out[start..start + 32],
            );
        }
    }
}

/// Bits `[shift, shift + 2)` of each byte of `hh`, moved to bits 4 and 5.
///
/// # Safety
/// AVX2+FMA+F16C.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn high_bits(hh: __m256i, shift: i32, m2: __m256i) -> __m256i {
    let s = _mm256_srl_epi16(hh, _mm_cvtsi32_si128(shift));
    _mm256_slli_epi16(_mm256_and_si256(s, m2), 4)
}

#[cfg(test)]
mod tests {
    /// Tokens sharing the decoded row's loads get `dot`'s bits exactly, tails included.
    #[test]
    fn dot_tokens_has_dots_bits() {
        if !(is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")) {
            eprintln!("skipped: no AVX2+FMA");
            return;
        }
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        };
        for n in [7usize, 37, 256, 2053] {
            let a: Vec<f32> = (0..n).map(|_| next()).collect();
            let b: Vec<Vec<f32>> = (0..3).map(|_| (0..n).map(|_| next()).collect()).collect();
            // SAFETY: AVX2+FMA checked above; every slice has n values.
            unsafe {
                let three = super::dot_tokens(&a, [&b[0], &b[1], &b[2]]);
                let two = super::dot_tokens(&a, [&b[1], &b[2]]);
                for t in 0..3 {
                    assert_eq!(
                        three[t].to_bits(),
                        super::dot(&a, &b[t]).to_bits(),
                        "n={n} t={t}"
                    );
                }
                assert_eq!(two[0].to_bits(), super::dot(&a, &b[1]).to_bits());
                assert_eq!(two[1].to_bits(), super::dot(&a, &b[2]).to_bits());
            }
        }
    }
}
