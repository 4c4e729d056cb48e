//! Decode products (one token) of llama.cpp block weights with the activations rounded to int16
//! ([`ActivationPrecision::Int16`](crate::features::ActivationPrecision::Int16)): the integer
//! codes of each block times integer activations, summed exactly in i32, where the f32 path
//! decodes every weight to f32 first. This is the method of the affine int16 path
//! (`matmul/int16.rs`), applied to the block formats; the activation row is quantized by the same
//! code ([`QuantizedRow`]).
//!
//! # Method
//! The activation row is cut into spans of 32 columns, the unit every block format shares (a
//! Q4_0/Q8_0 block, a Q4_K/Q5_K sub-block, two Q6_K groups of 16). Span `j` gets a step and int16
//! values `dx_j = max_{i∈j}|x_i| / 32767`, `xq_i = round(x_i / dx_j)`, and the residuals
//! `r_i = x_i − dx_j·xq_i`. With a block's weights written `w_i = a·q_i − m` (integer code `q_i`
//! as the formats store it; `a`, `m` per block, sub-block or group of 16):
//!
//! ```text
//! Q8_0, Q4_0, Q5_0 (block b): y += (d_b·dx_b) · Σ q·xq              q ∈ [-128,127], [-8,7], [-16,15]
//! Q4_1 (block b):            y += d_b · (dx_b · Σ q·xq + c_b) + m_b · Σ_{i∈b} x_i
//! Q4_K, Q5_K (sub-block j):  y += (d·sc_j) · (dx_j · Σ q·xq + c_j) − (dmin·m_j) · Σ_{i∈j} x_i
//! Q6_K (group g of 16):      y += (d·sc_g) · (dx_{g/2} · Σ q·xq)            q ∈ [-32,31]
//! ```
//!
//! `Σ q·xq` is exact in i32 (at most `32·128·32767 < 2^28`). The sums `Σ x_i` are the f32 sums of
//! the exact activations (the `dmin` term is not rounded at all), and `c_j = z·Σ_{i∈j} r_i` is the
//! correction of the affine path for the codes' centre `z` (7.5 for Q4_K, 15.5 for Q5_K): of the
//! dropped term `a·Σ q_i·r_i` it keeps `a·z·Σ r_i`, which halves the error for codes spread over
//! `0..2^bits`. The signed formats have codes centred on −0.5 and go without. The steps, the
//! values, the corrections and the span sums are computed once per call, shared by every task.
//!
//! # Error
//! `|y_int16 − y_f32| ≤ Σ_i |a_i|·|q_i − z|·dx_j / 2` plus f32 rounding (`z = 0` for the signed
//! formats), the bound of the affine path: relative to the largest activation of each span of
//! 32.
//!
//! Measured (`int16/tests.rs`, rows of 2048 columns, `|y_int16 − y_f32| / Σ_i |w_i·x_i|`, worst
//! output of one run): 0.7e-6 (Q4_K, Q5_K) to 2.1e-6 (Q6_K) for activations without outliers,
//! 0.8e-5 to 1.7e-5 with 4 or 32 activations 50 times larger (tested bound 1e-4, and always within
//! the rounding bound above); Q4_1 0.7e-6 / 0.9e-5, Q5_0 1.4e-6 / 1.9e-5. Q4_1 and Q5_0, the
//! fallbacks of a few tensors per file, have no AVX2 kernel: both backends run the scalar twin. The K-quants with minimums gain most from the correction `c_j`.
//!
//! # Speed
//! `examples/matmul_speed.rs --decode --ggml --rounds 2` (log: `scripts/bench/last_ggml_matmul_speed.log`;
//! AMD EPYC VM, 2 vCPUs, AVX2 kernels, weights streamed from memory: 23.7 GB/s one thread,
//! 32.6 GB/s two; another engineer's benchmark shared the machine), milliseconds per decode product,
//! f32 path (decode each row to f32, then FMAs) → int16 path:
//!
//! | format | 2048x768, 1 thread | 2048x768, 2 threads | 151936x2048, 1 thread | 151936x2048, 2 threads |
//! |---|---|---|---|---|
//! | Q4_K | 0.243 → 0.072 (3.4x) | 0.134 → 0.053 (2.5x) | 53.0 → 15.3 (3.5x) | 27.2 → 8.4 (3.2x) |
//! | Q5_K | 0.278 → 0.088 (3.2x) | 0.188 → 0.070 (2.7x) | 61.1 → 21.5 (2.8x) | 32.0 → 12.1 (2.7x) |
//! | Q6_K | 0.250 → 0.113 (2.2x) | 0.188 → 0.092 (2.0x) | 54.4 → 18.6 (2.9x) | 30.8 → 11.4 (2.7x) |
//! | Q8_0 | 0.253 → 0.099 (2.6x) | 0.194 → 0.103 (1.9x) | 54.8 → 19.3 (2.8x) | 31.3 → 12.7 (2.5x) |
//!
//! The int16 path reads 42-80% of the memory bandwidth (the f32 path 13-32%): it is still bound
//! by its instructions more than by memory, most for Q4_K/Q5_K (bytes widened to i16 before
//! `vpmaddwd`). The int8 path (`int8.rs`, `vpmaddubsw` as llama.cpp does, at 258 times the
//! activation rounding error) is the default now; this path stays selectable with
//! `--decode-activations int16` and serves Q4_1 and Q5_0. The scalar twin is slower than the scalar f32 path
//! (1.13 against 0.74 ms for Q4_K 768x2048): it is the reference, not a fallback worth tuning.
//!
//! The scalar twin here ([`matvec_block`]) and the AVX2 kernels ([`avx2`]) compute the same
//! integer sums; they differ only in the order of the f32 operations that scale and add them.
#[cfg(target_arch = "x86_64")]
pub(in crate::matmul) mod avx2;
#[cfg(test)]
pub(super) mod tests;

use std::ops::Range;

use crate::ggml::{scale_min_k4, BlockFormat, QK_K};
use crate::matmul::int16::{QuantizedRow, ValueOrder};

/// Columns per span of activations that share one step.
pub(in crate::matmul) const SPAN: usize = 32;

/// Whether the format's weights add a per-(sub-)block offset (`−dmin·m`, Q4_1's `+m`), whose
/// product needs the f32 sums of the activations over each span.
pub(in crate::matmul) fn has_mins(format: BlockFormat) -> bool {
    matches!(
        format,
        BlockFormat::Q4_K | BlockFormat::Q5_K | BlockFormat::Q4_1
    )
}

/// The centre `z` of the format's codes used by the correction (module docs): zero for the
/// signed formats, which go without.
fn code_centre(format: BlockFormat) -> f32 {
    match format {
        BlockFormat::Q4_K | BlockFormat::Q4_1 => 7.5,
        BlockFormat::Q5_K => 15.5,
        BlockFormat::Q4_0 | BlockFormat::Q5_0 | BlockFormat::Q8_0 | BlockFormat::Q6_K => 0.0,
    }
}

/// Rounds the single activation row `x` of a product with `format` weights (module docs). The
/// values are in natural order for every backend.
pub(in crate::matmul) fn quantize_activations(x: &[f32], format: BlockFormat) -> QuantizedRow {
    QuantizedRow::with_centre(x, SPAN, code_centre(format), ValueOrder::Natural)
}

/// Writes the integer codes of one `format` block (module docs: `q` with `w = a·q − m`) into
/// `out` (`format.block_elements()` values), in column order.
pub(super) fn block_codes(format: BlockFormat, block: &[u8], out: &mut [i8]) {
    match format {
        BlockFormat::Q8_0 => {
            for (q, &b) in out.iter_mut().zip(&block[2..34]) {
                *q = b as i8;
            }
        }
        BlockFormat::Q4_0 => {
            for (l, &b) in block[2..18].iter().enumerate() {
                out[l] = (b & 15) as i8 - 8;
                out[l + 16] = (b >> 4) as i8 - 8;
            }
        }
        BlockFormat::Q4_1 => {
            for (l, &b) in block[4..20].iter().enumerate() {
                out[l] = (b & 15) as i8;
                out[l + 16] = (b >> 4) as i8;
            }
        }
        BlockFormat::Q5_0 => {
            let qh = u32::from_le_bytes([block[2], block[3], block[4], block[5]]);
            let high = |bit: usize| (((qh >> bit) & 1) << 4) as u8;
            for (l, &b) in block[6..22].iter().enumerate() {
                out[l] = ((b & 15) | high(l)) as i8 - 16;
                out[l + 16] = ((b >> 4) | high(l + 16)) as i8 - 16;
            }
        }
        BlockFormat::Q4_K | BlockFormat::Q5_K => {
            let (qh, qs) = if format == BlockFormat::Q5_K {
                (Some(&block[16..48]), &block[48..176])
            } else {
                (None, &block[16..144])
            };
            for j in 0..8 {
                for l in 0..32 {
                    let byte = qs[32 * (j / 2) + l];
                    let mut q = if j % 2 == 1 { byte >> 4 } else { byte & 15 };
                    if let Some(qh) = qh {
                        q |= ((qh[l] >> j) & 1) << 4;
                    }
                    out[32 * j + l] = q as i8;
                }
            }
        }
        BlockFormat::Q6_K => {
            let (ql, qh) = (&block[0..128], &block[128..192]);
            for h in 0..2 {
                let (l_, h_) = (&ql[64 * h..], &qh[32 * h..]);
                for l in 0..32 {
                    let q = [
                        (l_[l] & 15) | ((h_[l] & 3) << 4),
                        (l_[l + 32] & 15) | (((h_[l] >> 2) & 3) << 4),
                        (l_[l] >> 4) | (((h_[l] >> 4) & 3) << 4),
                        (l_[l + 32] >> 4) | (((h_[l] >> 6) & 3) << 4),
                    ];
                    for (k, q) in q.into_iter().enumerate() {
                        out[128 * h + 32 * k + l] = q as i8 - 32;
                    }
                }
            }
        }
    }
}

#[inline]
pub(super) fn f16_at(b: &[u8], at: usize) -> f32 {
    half::f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

fn int_dot(q: &[i8], xq: &[i16]) -> i32 {
    q.iter()
        .zip(xq)
        .map(|(&q, &x)| i32::from(q) * i32::from(x))
        .sum()
}

/// The scalar twin: `out[o - rows.start]` for the given rows of a validated `[_, cols]` matrix of
/// `format` blocks `data`, from the quantized row `xq` ([`quantize_activations`]) and, for
/// formats with minimums ([`has_mins`]), the f32 sums `sums` of the activations over each span.
pub(in crate::matmul) fn matvec_block(
    format: BlockFormat,
    data: &[u8],
    cols: usize,
    xq: &QuantizedRow,
    sums: &[f32],
    rows: Range<usize>,
    out: &mut [f32],
) {
    debug_assert_eq!(xq.span, SPAN);
    debug_assert!(xq.values.len() == cols && out.len() == rows.len());
    debug_assert!(!has_mins(format) || sums.len() == cols / SPAN);
    let (rb, bb, be) = (
        format.row_bytes(cols),
        format.block_bytes(),
        format.block_elements(),
    );
    let mut codes = [0i8; QK_K];
    for (y, o) in out.iter_mut().zip(rows) {
        let row = &data[o * rb..(o + 1) * rb];
        let mut acc = 0f32;
        for (b, block) in row.chunks_exact(bb).enumerate() {
            let codes = &mut codes[..be];
            block_codes(format, block, codes);
            let xs = &xq.values[b * be..(b + 1) * be];
            match format {
                BlockFormat::Q8_0 | BlockFormat::Q4_0 | BlockFormat::Q5_0 => {
                    let d = f16_at(block, 0);
                    acc += d * xq.steps[b] * int_dot(codes, xs) as f32;
                }
                BlockFormat::Q4_1 => {
                    let (d, m) = (f16_at(block, 0), f16_at(block, 2));
                    let s = int_dot(codes, xs);
                    acc += d * (xq.steps[b] * s as f32 + xq.corrections[b]) + m * sums[b];
                }
                BlockFormat::Q4_K | BlockFormat::Q5_K => {
                    let (d, dmin) = (f16_at(block, 0), f16_at(block, 2));
                    for j in 0..8 {
                        let k = 8 * b + j;
                        let (sc, m) = scale_min_k4(j, &block[4..16]);
                        let s = int_dot(&codes[32 * j..32 * j + 32], &xs[32 * j..32 * j + 32]);
                        acc += d * f32::from(sc) * (xq.steps[k] * s as f32 + xq.corrections[k])
                            - dmin * f32::from(m) * sums[k];
                    }
                }
                BlockFormat::Q6_K => {
                    let d = f16_at(block, 208);
                    for g in 0..16 {
                        let sc = block[192 + g] as i8;
                        let s = int_dot(&codes[16 * g..16 * g + 16], &xs[16 * g..16 * g + 16]);
                        acc += d * f32::from(sc) * (xq.steps[8 * b + g / 2] * s as f32);
                    }
                }
            }
        }
        *y = acc;
    }
}
