//! Products of llama.cpp block weights with the activations rounded to int8
//! ([`ActivationPrecision::Int8`](crate::features::ActivationPrecision::Int8)), for one token
//! (decode) and for many (prefill): the method of llama.cpp's `vec_dot_q4_K_q8_K` and kin, with
//! one step per 32 columns instead of per 256, and the exact f32 sums for the minimum terms.
//!
//! # Method
//! Each token's activation row is quantized once per call ([`Int8Row::new`]): span `j` of 32
//! columns (a Q4_0/Q8_0 block, a Q4_K/Q5_K sub-block, two Q6_K groups of 16) gets
//!
//! ```text
//! dx_j = max_{i∈j}|x_i| / 127,   xq_i = round(x_i / dx_j) ∈ [-127, 127],   r_i = x_i − dx_j·xq_i
//! ```
//!
//! With a block's weights `w_i = a·q_i − m` (integer codes as the formats store them, as in
//! `int16.rs`), the product is, per super-block or block:
//!
//! ```text
//! Q8_0, Q4_0 (block b):     y += (d_b·dx_b) · Σ q·xq                 q ∈ [-128,127], [-8,7]
//! Q4_K, Q5_K (sub-block j): y += (d·sc_j) · (dx_j · Σ q·xq + c_j) − (dmin·m_j) · Σ_{i∈j} x_i
//! Q6_K (group g of 16):     y += (d·sc_g) · (dx_{g/2} · Σ q·xq)             q ∈ [-32,31]
//! ```
//!
//! with `c_j = z·Σ_{i∈j} r_i` the code-centre correction of the int16 path (`z` = 7.5 for Q4_K,
//! 15.5 for Q5_K) and `Σ x_i` the f32 sums of the exact activations: the minimum term is not
//! rounded at all. The integer sums are exact: the AVX2 kernels ([`avx2`]) multiply unsigned
//! codes with signed activations by `vpmaddubsw` (32 products into 16 i16 pair sums, at most
//! `2·63·127 < 2^15`: no saturation), widen the pairs with `vpmaddwd` by ones, and reduce the
//! spans' i32 vectors of a super-block together; Q6_K's codes `0..63` give `Σ (q−32)·xq` as
//! `Σ q·xq − 32·Σ xq`, with the per-16 sums `Σ xq` computed with the quantization; Q8_0 and
//! Q4_0's signed codes go through `vpsignb` (`|q|` times `x` with `q`'s sign: `128·127·2 < 2^15`).
//!
//! Tokens share each weight load: a prefill product takes up to four tokens per pass over a row,
//! each with its own accumulators and the f32 operations of a one-token product in the same
//! order, so every token's result has the bits of its decode product whatever the tokens beside
//! it (tested). This is what lets prefill use the int8 path: a prompt's log-probabilities do not
//! depend on how its tokens were routed, and speculative verification (token-wise decode
//! products) equals decoding token by token.
//!
//! # Error
//! Rounding moves `x_i` by at most `dx_j / 2 = max_{i∈j}|x_i| / 254`, so
//! `|y_int8 − y_f32| ≤ Σ_i |a_i|·|q_i − z|·dx_j / 2` plus f32 rounding (`z = 0` for Q8_0, Q4_0,
//! Q6_K): the int16 path's bound with a step 258 times larger (32767 / 127), relative to the
//! largest activation of each span of 32 (llama.cpp's Q8_K: of each 256).
//!
//! Measured (`int8/tests.rs`, rows of 2048 columns, `|y_int8 − y_f32| / Σ_i |w_i·x_i|`, worst
//! output of one run, one and three tokens, two runs): 1.8e-4 (Q5_K) to 5.1e-4 (Q6_K) for
//! activations without outliers, 2.3e-3 to 7.2e-3 with 4 or 32 activations 50 times larger
//! (always within the rounding bound above, tested; tested ceiling 2e-2). End to end on the GGUF
//! fixtures (`crates/cli/tests/gguf.rs`, 80 tokens): log-probabilities within 2.5e-2 to 0.24 of
//! f32 (mean 6.8e-3 to 7.0e-2), against 8.5e-4 for int16 decode.
//!
//! # Speed
//! `examples/matmul_speed.rs --ggml --quick --rounds 2` (log: `scripts/bench/last_ggml_matmul_speed.log`;
//! AMD EPYC VM, 2 vCPUs, AVX2 kernels, weights streamed from memory, 22.8-23.5 GB/s one thread;
//! commit db37369; another engineer's build ran during the later two-thread rows, which are left
//! out), milliseconds per product, f32 path → int16 decode → int8, one thread:
//!
//! | format | 768x2048, 1 token | 2048x768, 1 token | 768x2048, 3 tokens | 768x2048, 128 tokens |
//! |---|---|---|---|---|
//! | Q4_K | 0.230 → 0.071 → 0.058 | 0.216 → 0.072 → 0.054 | 0.339 → 0.114 (3.0x) | 10.7 → 5.12 (2.1x) |
//! | Q5_K | 0.249 → 0.081 → 0.072 | 0.235 → 0.084 → 0.071 | 0.348 → 0.139 (2.5x) | 9.82 → 5.29 (1.9x) |
//! | Q6_K | 0.216 → 0.090 → 0.068 | 0.208 → 0.094 → 0.068 | 0.369 → 0.125 (3.0x) | 10.1 → 4.47 (2.3x) |
//! | Q8_0 | 0.227 → 0.088 → 0.081 | 0.209 → 0.085 → 0.082 | 0.445 → 0.143 (3.1x) | 10.3 → 5.55 (1.9x) |
//!
//! Decode: int8 is 1.04-1.38x int16 and 2.5-4.0x f32, at 64-88% of the one-thread bandwidth
//! (Q6_K, Q8_0: 80-88%; Q4_K, Q5_K 64-70%: still bound by instructions, ~27 cycles per super-block,
//! the same with the weights in cache). With the weights in cache (`--hot`) Q4_K decode took
//! 0.055 ms with the `vphaddd` reduction of the int16 kernels and 0.047-0.052 ms with the
//! unpack-and-add one used here. Several tokens: a token costs 0.038-0.048 ms at 3 tokens and
//! 0.035-0.043 ms at 128 (Q4_K 768x2048: 0.038 and 0.040), against 0.054-0.082 ms alone: each
//! row's unpacked codes and scales serve every token, the integer products and the f32 epilogue
//! stay per token. End to end this brought GGUF prefill from 0.45-0.55x llama.cpp to 0.81-0.95x
//! and decode from 0.81-0.92x to 0.93-1.03x (`BENCHMARKS.md`).
//!
//! # Formats
//! Q4_K, Q5_K, Q6_K, Q8_0 and Q4_0 ([`supports`]); Q4_1 and Q5_0, the fallbacks of a few tensors
//! per file, keep the int16 decode path and f32 prefill.
//!
//! The scalar twin here ([`matmul_block`]) and the AVX2 kernels compute the same integer sums;
//! they differ only in the order of the f32 operations that scale and add them.
#[cfg(target_arch = "x86_64")]
pub(in crate::matmul) mod avx2;
#[cfg(test)]
mod tests;

use std::ops::Range;

use super::int16::{block_codes, f16_at, SPAN};
#[cfg(target_arch = "x86_64")]
use crate::features::{cpu_level, SimdLevel};
use crate::ggml::{scale_min_k4, BlockFormat, QK_K};
use crate::matmul::int16::{round, span_step_to};
use crate::matmul::scalar;

/// The largest int8 value used: symmetric, so that `vpsignb` never meets −128.
const XQ_MAX: f32 = 127.0;

/// Columns of a Q6_K half super-block, the unit of [`Int8Row::q6_offsets`].
const Q6_HALF: usize = 128;

/// Whether products with `format` weights have an int8 kernel.
pub(in crate::matmul) fn supports(format: BlockFormat) -> bool {
    matches!(
        format,
        BlockFormat::Q4_K
            | BlockFormat::Q5_K
            | BlockFormat::Q6_K
            | BlockFormat::Q8_0
            | BlockFormat::Q4_0
    )
}

/// The centre `z` of the codes used by the correction `c_j` (module docs), for the formats with
/// minimums; `None` for the others, which need neither corrections nor span sums.
fn code_centre(format: BlockFormat) -> Option<f32> {
    match format {
        BlockFormat::Q4_K => Some(7.5),
        BlockFormat::Q5_K => Some(15.5),
        _ => None,
    }
}

/// One token's activation row rounded to int8 for products with one block format (module docs).
pub(in crate::matmul) struct Int8Row {
    /// `cols` values, in column order.
    pub values: Vec<i8>,
    /// `cols / 32` steps `dx_j`.
    pub steps: Vec<f32>,
    /// Q4_K, Q5_K: `cols / 32` f32 sums of the activations over each span; else empty.
    pub sums: Vec<f32>,
    /// Q4_K, Q5_K: `cols / 32` corrections `c_j`; else empty.
    pub corrections: Vec<f32>,
    /// Q6_K: per 128 columns, `32·Σ xq` over its 8 groups of 16 in the order
    /// `0, 2, 4, 6, 1, 3, 5, 7` (the lanes in which the AVX2 kernel finds the groups' sums); else
    /// empty.
    pub q6_offsets: Vec<i32>,
}

impl Int8Row {
    /// Quantizes the row `x` (a multiple of 256 columns for the K-quants, of 32 for the others:
    /// [`crate::Matrix::validate`]) for products with `format` weights.
    pub(in crate::matmul) fn new(x: &[f32], format: BlockFormat) -> Self {
        #[cfg(target_arch = "x86_64")]
        if cpu_level() >= SimdLevel::Avx2 {
            // SAFETY: the CPU supports AVX2, FMA and F16C.
            return unsafe { quantize_avx2(x, format) };
        }
        quantize(x, format)
    }
}

/// [`quantize`] compiled for AVX2, where it vectorises. Rust never contracts or reorders f32
/// operations, so both compilations give the same results.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn quantize_avx2(x: &[f32], format: BlockFormat) -> Int8Row {
    quantize(x, format)
}

#[inline(always)]
fn quantize(x: &[f32], format: BlockFormat) -> Int8Row {
    debug_assert!(x.len().is_multiple_of(SPAN));
    let spans = x.len() / SPAN;
    let centre = code_centre(format);
    let mut row = Int8Row {
        values: vec![0; x.len()],
        steps: Vec::with_capacity(spans),
        sums: Vec::with_capacity(if centre.is_some() { spans } else { 0 }),
        corrections: Vec::with_capacity(if centre.is_some() { spans } else { 0 }),
        q6_offsets: Vec::new(),
    };
    for (xs, q) in x.chunks_exact(SPAN).zip(row.values.chunks_exact_mut(SPAN)) {
        let step = span_step_to(xs, XQ_MAX);
        // Zero for spans that round to zero (step 0) and for non-finite spans (step NaN, whose
        // outputs are NaN through the step anyway).
        let inverse = if step > 0.0 { 1.0 / step } else { 0.0 };
        for (q, v) in q.iter_mut().zip(xs) {
            *q = round(*v, inverse) as i8;
        }
        row.steps.push(step);
        if let Some(z) = centre {
            row.sums.push(scalar::sum(xs));
            let mut lanes = [0f32; 8];
            for (x8, q8) in xs.chunks_exact(8).zip(q.chunks_exact(8)) {
                for ((lane, v), q) in lanes.iter_mut().zip(x8).zip(q8) {
                    *lane += v - step * f32::from(*q);
                }
            }
            row.corrections.push(z * lanes.iter().sum::<f32>());
        }
    }
    if format == BlockFormat::Q6_K {
        row.q6_offsets.reserve(x.len() / Q6_HALF * 8);
        for half in row.values.chunks_exact(Q6_HALF) {
            let group = |g: usize| {
                32 * half[16 * g..16 * g + 16]
                    .iter()
                    .map(|&v| i32::from(v))
                    .sum::<i32>()
            };
            row.q6_offsets.extend([0, 2, 4, 6, 1, 3, 5, 7].map(group));
        }
    }
    row
}

fn int_dot(q: &[i8], xq: &[i8]) -> i32 {
    q.iter()
        .zip(xq)
        .map(|(&q, &x)| i32::from(q) * i32::from(x))
        .sum()
}

/// `Σ_i w_i·x_i` over one row of `format` blocks, from the token's quantized row `xq`.
fn row_dot(format: BlockFormat, row: &[u8], xq: &Int8Row, codes: &mut [i8; QK_K]) -> f32 {
    let (bb, be) = (format.block_bytes(), format.block_elements());
    let mut acc = 0f32;
    for (b, block) in row.chunks_exact(bb).enumerate() {
        let codes = &mut codes[..be];
        block_codes(format, block, codes);
        let xs = &xq.values[b * be..(b + 1) * be];
        match format {
            BlockFormat::Q8_0 | BlockFormat::Q4_0 => {
                acc += f16_at(block, 0) * xq.steps[b] * int_dot(codes, xs) as f32;
            }
            BlockFormat::Q4_K | BlockFormat::Q5_K => {
                let (d, dmin) = (f16_at(block, 0), f16_at(block, 2));
                for j in 0..8 {
                    let k = 8 * b + j;
                    let (sc, m) = scale_min_k4(j, &block[4..16]);
                    let s = int_dot(&codes[32 * j..32 * j + 32], &xs[32 * j..32 * j + 32]);
                    acc += d * f32::from(sc) * (xq.steps[k] * s as f32 + xq.corrections[k])
                        - dmin * f32::from(m) * xq.sums[k];
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
            BlockFormat::Q4_1 | BlockFormat::Q5_0 => {
                unreachable!("no int8 path for {}", format.name())
            }
        }
    }
    acc
}

/// The scalar twin: `out[(o - rows.start) * xs.len() + t]` for the given rows of a validated
/// `[_, cols]` matrix of `format` blocks `data` ([`supports`]) and the tokens' quantized rows
/// `xs` ([`Int8Row::new`] with this format).
pub(in crate::matmul) fn matmul_block(
    format: BlockFormat,
    data: &[u8],
    cols: usize,
    xs: &[&Int8Row],
    rows: Range<usize>,
    out: &mut [f32],
) {
    debug_assert!(supports(format) && out.len() == rows.len() * xs.len());
    debug_assert!(xs.iter().all(|x| x.values.len() == cols));
    let rb = format.row_bytes(cols);
    let mut codes = [0i8; QK_K];
    for (row_out, o) in out.chunks_exact_mut(xs.len()).zip(rows) {
        let row = &data[o * rb..(o + 1) * rb];
        for (y, xq) in row_out.iter_mut().zip(xs) {
            *y = row_dot(format, row, xq, &mut codes);
        }
    }
}
