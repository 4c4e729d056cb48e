//! AVX2 int8 products of llama.cpp blocks, for one token or several (method in [`super`]).
//!
//! A kernel takes `T` tokens (1 to 4) per pass over a row: it unpacks each (super-)block's codes
//! into byte vectors once and multiplies them with every token's int8 values
//! (`vpmaddubsw` then `vpmaddwd` by ones); the eight i32 vectors of a super-block's spans are
//! reduced together ([`lane_sums`]), converted to f32 once and scaled by a vector of the spans'
//! factors, in the token's own accumulator. A token's f32 operations do not depend on `T` or on
//! the other tokens, so its result has the same bits in every grouping (tested).
//!
//! Every function here is a `#[target_feature]` function: it may run only after
//! [`crate::features::cpu_level`] reported AVX2 or above. The parent modules check the matrix
//! and the activation length before [`matmul_block`] runs, so the kernels use unchecked
//! unaligned loads whose bounds follow from the block sizes.
use std::arch::x86_64::*;
use std::ops::Range;

use super::{supports, Int8Row};
use crate::ggml::BlockFormat;
use crate::matmul::avx2::hsum;
use crate::matmul::ggml_blocks::int16::avx2::{
    codes_q8_0, f16_at, high_bits, hsum_i32, scales_mins,
};

/// The kernels, instantiated for AVX2 (here) and AVX-512 VNNI ([`vnni`]): the same code with
/// `$features` enabled and `$dot32`, the product of 32 code bytes by 32 activation bytes summed
/// in fours into eight i32.
macro_rules! int8_kernels {
    ($features:literal, $dot32:item) => {
    /// Computes `out[(o - rows.start) * xs.len() + t]` (scalar twin: [`super::matmul_block`]):
        /// tokens four at a time (then three, two, one), and for each group every row.
        ///
        /// # Safety
        /// The CPU must support AVX2, FMA and F16C. `data` holds a validated `[_, cols]` matrix of
        /// `format` blocks ([`supports`]), `rows` lies inside it, every `xs[t]` is [`Int8Row::new`] of a
        /// row of `cols` values for `format`, and `out.len() == rows.len() * xs.len()`.
        #[target_feature(enable = $features)]
        pub(in crate::matmul) unsafe fn matmul_block(
            format: BlockFormat,
            data: &[u8],
            cols: usize,
            xs: &[&Int8Row],
            rows: Range<usize>,
            out: &mut [f32],
        ) {
            debug_assert!(supports(format) && out.len() == rows.len() * xs.len());
            debug_assert!(xs.iter().all(|x| x.values.len() == cols));
            let nt = xs.len();
            let mut t = 0;
            while t < nt {
                // SAFETY (each call): as this function's contract, for tokens t..t + T.
                match nt - t {
                    1 => tokens::<1>(format, data, cols, &[xs[t]], rows.clone(), t, nt, out),
                    2 => tokens::<2>(
                        format,
                        data,
                        cols,
                        &[xs[t], xs[t + 1]],
                        rows.clone(),
                        t,
                        nt,
                        out,
                    ),
                    3 => {
                        let x = [xs[t], xs[t + 1], xs[t + 2]];
                        tokens::<3>(format, data, cols, &x, rows.clone(), t, nt, out)
                    }
                    _ => {
                        let x = [xs[t], xs[t + 1], xs[t + 2], xs[t + 3]];
                        tokens::<4>(format, data, cols, &x, rows.clone(), t, nt, out)
                    }
                }
                t += (nt - t).min(4);
            }
        }

        /// `out[(o - rows.start) * nt + t0 + t]` for the `T` tokens `xs` over every row.
        ///
        /// # Safety
        /// As [`matmul_block`], with `t0 + T ≤ nt`.
        #[allow(clippy::too_many_arguments)]
        #[target_feature(enable = $features)]
        unsafe fn tokens<const T: usize>(
            format: BlockFormat,
            data: &[u8],
            cols: usize,
            xs: &[&Int8Row; T],
            rows: Range<usize>,
            t0: usize,
            nt: usize,
            out: &mut [f32],
        ) {
            let rb = format.row_bytes(cols);
            let row_dot: unsafe fn(&[u8], &[&Int8Row; T]) -> [f32; T] = match format {
                BlockFormat::Q8_0 => dot_q8_0::<false, T>,
                BlockFormat::Q4_0 => dot_q8_0::<true, T>,
                BlockFormat::Q4_K => dot_q4_k::<false, T>,
                BlockFormat::Q5_K => dot_q4_k::<true, T>,
                BlockFormat::Q6_K => dot_q6_k::<T>,
                BlockFormat::Q4_1 | BlockFormat::Q5_0 => {
                    unreachable!("no int8 kernel for {}", format.name())
                }
            };
            for (r, o) in rows.enumerate() {
                let y = row_dot(&data[o * rb..(o + 1) * rb], xs);
                out[r * nt + t0..r * nt + t0 + T].copy_from_slice(&y);
            }
        }

        /// Lane `k` of the result: the sum of the eight i32 lanes of `v[k]`. Unpacks and additions
        /// rather than `vphaddd` (as the int16 kernels' reduction): the same exact integer sums with
        /// single-uop shuffles, which measured faster here.
        ///
        /// # Safety
        /// AVX2.
        #[inline]
        #[target_feature(enable = $features)]
        unsafe fn lane_sums(v: &[__m256i; 8]) -> __m256i {
            let low = quarter_sums(v[0], v[1], v[2], v[3]);
            let high = quarter_sums(v[4], v[5], v[6], v[7]);
            _mm256_add_epi32(
                _mm256_permute2x128_si256(low, high, 0x20),
                _mm256_permute2x128_si256(low, high, 0x31),
            )
        }

        /// In each 128-bit half, lane `k` holds the sum of the four lanes of that half of `k`-th
        /// argument (`a`, `b`, `c`, `d`).
        ///
        /// # Safety
        /// AVX2.
        #[inline]
        #[target_feature(enable = $features)]
        unsafe fn quarter_sums(a: __m256i, b: __m256i, c: __m256i, d: __m256i) -> __m256i {
            // [a0+a2, b0+b2, a1+a3, b1+b3] per half, then the two pairs of each.
            let ab = _mm256_add_epi32(_mm256_unpacklo_epi32(a, b), _mm256_unpackhi_epi32(a, b));
            let cd = _mm256_add_epi32(_mm256_unpacklo_epi32(c, d), _mm256_unpackhi_epi32(c, d));
            _mm256_add_epi32(_mm256_unpacklo_epi64(ab, cd), _mm256_unpackhi_epi64(ab, cd))
        }


        /// Q8_0 (`Q4 = false`) or Q4_0 (`Q4 = true`) rows: eight blocks at a time, their f16 scales
        /// converted together; the signed codes as `|q|` times the activations with `q`'s sign.
        ///
        /// # Safety
        /// AVX2+FMA+F16C; `row` holds whole blocks for `xs[t].values.len()` columns.
        #[target_feature(enable = $features)]
        unsafe fn dot_q8_0<const Q4: bool, const T: usize>(row: &[u8], xs: &[&Int8Row; T]) -> [f32; T] {
            let bb = if Q4 { 18 } else { 34 };
            let blocks = row.len() / bb;
            let p = row.as_ptr();
            let mut acc = [_mm256_setzero_ps(); T];
            let mut b = 0;
            // SAFETY (every load below): block `b + k < blocks` lies in `row`, its 32 activations and its
            // step in every `xs[t]` (one step per block of 32 columns).
            while b + 8 <= blocks {
                let mut q = [_mm256_setzero_si256(); 8];
                let mut a = [_mm256_setzero_si256(); 8];
                let mut d = [0u16; 8];
                for k in 0..8 {
                    let block = p.add((b + k) * bb);
                    d[k] = block.cast::<u16>().read_unaligned();
                    q[k] = codes_q8_0::<Q4>(block);
                    a[k] = _mm256_sign_epi8(q[k], q[k]);
                }
                let d = _mm256_cvtph_ps(_mm_loadu_si128(d.as_ptr().cast()));
                for (acc, xq) in acc.iter_mut().zip(xs) {
                    let x = xq.values.as_ptr().add(32 * b);
                    let mut v = [_mm256_setzero_si256(); 8];
                    for k in 0..8 {
                        let xk = _mm256_sign_epi8(_mm256_loadu_si256(x.add(32 * k).cast()), q[k]);
                        v[k] = _mm256_madd_epi16(_mm256_maddubs_epi16(a[k], xk), _mm256_set1_epi16(1));
                    }
                    let s = _mm256_cvtepi32_ps(lane_sums(&v));
                    let dx = _mm256_loadu_ps(xq.steps.as_ptr().add(b));
                    *acc = _mm256_fmadd_ps(_mm256_mul_ps(d, dx), s, *acc);
                }
                b += 8;
            }
            let mut y = [0f32; T];
            for (y, acc) in y.iter_mut().zip(acc) {
                *y = hsum(acc);
            }
            while b < blocks {
                let block = p.add(b * bb);
                let q = codes_q8_0::<Q4>(block);
                let a = _mm256_sign_epi8(q, q);
                let d = f16_at(block);
                for (y, xq) in y.iter_mut().zip(xs) {
                    let x = _mm256_loadu_si256(xq.values.as_ptr().add(32 * b).cast());
                    let v = _mm256_madd_epi16(
                        _mm256_maddubs_epi16(a, _mm256_sign_epi8(x, q)),
                        _mm256_set1_epi16(1),
                    );
                    *y += d * *xq.steps.as_ptr().add(b) * hsum_i32(v) as f32;
                }
                b += 1;
            }
            y
        }

        /// Q4_K rows, or Q5_K rows with `FIFTH_BIT`.
        ///
        /// # Safety
        /// AVX2+FMA+F16C; `row` holds whole blocks for `xs[t].values.len()` columns; every `xs[t]` has
        /// its span sums and corrections.
        #[target_feature(enable = $features)]
        unsafe fn dot_q4_k<const FIFTH_BIT: bool, const T: usize>(
            row: &[u8],
            xs: &[&Int8Row; T],
        ) -> [f32; T] {
            let (bb, qs_at) = if FIFTH_BIT { (176, 48) } else { (144, 16) };
            let m4 = _mm256_set1_epi8(15);
            let one = _mm256_set1_epi8(1);
            let mut acc = [_mm256_setzero_ps(); T];
            // SAFETY (every load below): super-block `sb` lies in `row` (144 or 176 bytes), its 256
            // activations and its 8 spans' steps, corrections and sums in every `xs[t]`.
            for sb in 0..row.len() / bb {
                let p = row.as_ptr().add(sb * bb);
                let (d, dmin) = (f16_at(p), f16_at(p.add(2)));
                let (scales, mins) = scales_mins(p.add(4));
                let ds = _mm256_mul_ps(_mm256_set1_ps(d), scales);
                let dm = _mm256_mul_ps(_mm256_set1_ps(dmin), mins);
                let mut qh = if FIFTH_BIT {
                    _mm256_loadu_si256(p.add(16).cast())
                } else {
                    _mm256_setzero_si256()
                };
                // Sub-block 2i: the low nibbles of bytes 32i..32i + 32, sub-block 2i + 1 the high ones.
                let mut q = [_mm256_setzero_si256(); 8];
                for i in 0..4 {
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
                    q[2 * i] = lo;
                    q[2 * i + 1] = hi;
                }
                let k = 8 * sb;
                for (acc, xq) in acc.iter_mut().zip(xs) {
                    let x = xq.values.as_ptr().add(256 * sb);
                    let mut v = [_mm256_setzero_si256(); 8];
                    for j in 0..8 {
                        v[j] = dot32(q[j], x.add(32 * j));
                    }
                    let s = _mm256_cvtepi32_ps(lane_sums(&v));
                    let t = _mm256_fmadd_ps(
                        _mm256_loadu_ps(xq.steps.as_ptr().add(k)),
                        s,
                        _mm256_loadu_ps(xq.corrections.as_ptr().add(k)),
                    );
                    *acc = _mm256_fmadd_ps(ds, t, *acc);
                    *acc = _mm256_fnmadd_ps(dm, _mm256_loadu_ps(xq.sums.as_ptr().add(k)), *acc);
                }
            }
            let mut y = [0f32; T];
            for (y, acc) in y.iter_mut().zip(acc) {
                *y = hsum(acc);
            }
            y
        }

        /// Q6_K rows: per half super-block, the unsigned codes (0..63) of 128 columns in four vectors of
        /// 32 bytes; the sums of each 128-bit half of their four i32 vectors ([`quarter_sums`]) are
        /// those of the eight groups of 16 in the lane order `0, 2, 4, 6, 1, 3, 5, 7`, the order of
        /// [`Int8Row::q6_offsets`], which take the codes' offset 32 off.
        ///
        /// # Safety
        /// AVX2+FMA+F16C; `row` holds whole blocks for `xs[t].values.len()` columns; every `xs[t]` has
        /// its Q6_K offsets.
        #[target_feature(enable = $features)]
        unsafe fn dot_q6_k<const T: usize>(row: &[u8], xs: &[&Int8Row; T]) -> [f32; T] {
            let m4 = _mm256_set1_epi8(15);
            let m2 = _mm256_set1_epi8(3);
            let lanes = _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7);
            let mut acc = [_mm256_setzero_ps(); T];
            // SAFETY (every load below): super-block `sb` lies in `row` (210 bytes: ql 0..128,
            // qh 128..192, scales 192..208, d 208..210), its 256 activations, 8 steps and 16 offsets in
            // every `xs[t]`.
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
                    let scales = _mm256_cvtepi8_epi32(_mm_loadl_epi64(p.add(192 + 8 * h).cast()));
                    let scales = _mm256_permutevar8x32_epi32(scales, lanes);
                    let ds = _mm256_mul_ps(d, _mm256_cvtepi32_ps(scales));
                    let half = 2 * sb + h;
                    for (acc, xq) in acc.iter_mut().zip(xs) {
                        let x = xq.values.as_ptr().add(128 * half);
                        let sums = quarter_sums(
                            dot32(q[0], x),
                            dot32(q[1], x.add(32)),
                            dot32(q[2], x.add(64)),
                            dot32(q[3], x.add(96)),
                        );
                        let offsets = _mm256_loadu_si256(xq.q6_offsets.as_ptr().add(8 * half).cast());
                        let s = _mm256_sub_epi32(sums, offsets);
                        // Group g uses the step of span g / 2: lanes 0..4 and 4..8 both spans 0..4.
                        let dx4 = _mm_loadu_ps(xq.steps.as_ptr().add(4 * half));
                        let dx = _mm256_set_m128(dx4, dx4);
                        *acc = _mm256_fmadd_ps(ds, _mm256_mul_ps(dx, _mm256_cvtepi32_ps(s)), *acc);
                    }
                }
            }
            let mut y = [0f32; T];
            for (y, acc) in y.iter_mut().zip(acc) {
                *y = hsum(acc);
            }
            y
        }

        $dot32
    };
}

int8_kernels!(
    "avx2,fma,f16c",
    /// Eight i32 pair sums of 32 unsigned bytes `q` times 32 signed bytes at `x`.
    ///
    /// # Safety
    /// AVX2; `x` readable for 32 bytes.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn dot32(q: __m256i, x: *const i8) -> __m256i {
        let pairs = _mm256_maddubs_epi16(q, _mm256_loadu_si256(x.cast()));
        _mm256_madd_epi16(pairs, _mm256_set1_epi16(1))
    }
);

/// The same kernels with AVX-512 VNNI (`vpdpbusd`: unsigned by signed bytes summed in fours,
/// one instruction where AVX2 needs `vpmaddubsw` and `vpmaddwd`). The codes are at most 63 and
/// the activations at most 127 in magnitude, so AVX2's i16 pair sums never saturate and both
/// give the same exact i32 sums: the same bits (tested). Used when the CPU has VNNI and
/// `MOESTREAM_SIMD` allows AVX-512. Measured (`matmul_speed --ggml --quick --rounds 2`, the
/// default against `MOESTREAM_SIMD=avx2`, alternated, this 2-vCPU EPYC VM, ms per call, 768x2048):
/// Q4_K 1 token 0.051 / 0.055 (1 thread), 0.046 / 0.057 (2); 3 tokens 0.096 / 0.120; 128 tokens
/// 3.60 / 5.35 and 2.50 / 3.52; Q6_K 128 tokens 3.71 / 4.74. An earlier, noisier pair was mixed
/// at one token (0.060 / 0.070 and 0.060 / 0.053), 1.25x at 128.
pub(in crate::matmul) mod vnni {
    use super::*;

    int8_kernels!(
        "avx2,fma,f16c,avx512f,avx512vnni,avx512vl",
        /// Eight i32 sums of four products of unsigned bytes `q` by signed bytes at `x`.
        ///
        /// # Safety
        /// AVX-512 VNNI + VL; `x` readable for 32 bytes.
        #[inline]
        #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vnni,avx512vl")]
        unsafe fn dot32(q: __m256i, x: *const i8) -> __m256i {
            _mm256_dpbusd_epi32(_mm256_setzero_si256(), q, _mm256_loadu_si256(x.cast()))
        }
    );
}
