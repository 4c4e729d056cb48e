//! Decode products (one token) of affine weights with the activations rounded to int16
//! ([`ActivationPrecision::Int16`](crate::features::ActivationPrecision::Int16)): integer codes
//! times integer activations, 16 products per AVX2 instruction (`vpmaddwd`), where the f32 path
//! converts every code to f32 first.
//!
//! # Method
//! The activation row is cut into spans of [`span_columns`] columns (32, 64 or 128: the weight
//! group, or for other group sizes the largest of 128, 64, 32 that divides the group, so that a
//! span never straddles two groups). Span `j` gets a step and int16 values
//!
//! ```text
//! dx_j = max_{i∈j} |x_i| / 32767,    xq_i = round(x_i / dx_j)   (ties to even; |xq_i| ≤ 32767)
//! ```
//!
//! With the rounding residuals `r_i = x_i − dx_j·xq_i`, an affine row `w_i = s_g·q_i + b_g` is
//! exactly `Σ_g s_g·Σ_{i∈g} (dx_j·q_i·xq_i + q_i·r_i) + b_g·Σ_{i∈g} x_i`. Writing
//! `q_i·r_i = z·r_i + (q_i − z)·r_i` with the centre code `z = (2^bits − 1) / 2` and dropping the
//! last term, the only approximation, gives
//!
//! ```text
//! y = Σ_j (s_g(j)·dx_j) · Σ_{i∈j} q_i·xq_i  +  Σ_g (b_g · Σ_{i∈g} x_i  +  s_g · c_g)
//! c_g = z · Σ_{i∈g} r_i
//! ```
//!
//! The inner sums are exact in i32 (`q_i·|xq_i| ≤ 255·32767`, so a span of at most 128 columns
//! stays below 2^31); the bias term uses the f32 group sums of the f32 path, and the corrections
//! `c_g` are computed with the quantization, once per call. The correction halves the error for
//! codes spread over their range (the root mean square of `q − z` is half that of `q` for
//! uniform codes) at the cost of one more dot product per row over the groups. The row is
//! quantized once per call ([`QuantizedRow::new`], shared by every task), with the same integer
//! values for every backend, laid out in the order in which the backend unpacks codes
//! ([`ValueOrder`]); the backends then differ from the scalar twin ([`matvec_block`]) only in
//! the order of the f32 operations that scale and add the per-span sums.
//!
//! # Error
//! Rounding moves `x_i` by at most `dx_j / 2 = max_{i∈j}|x_i| / 65534`, so
//! `|y_int16 − y_f32| ≤ Σ_i |s_g|·|q_i − z|·dx_j / 2` plus f32 rounding: the error is relative
//! to the largest activation of each span, not to each activation, and grows where a span holds
//! an outlier. The measured error is in the `matmul` module docs.
//!
//! # Spans that cannot be scaled
//! An all-zero span gets `dx = 0` and zero values (no division by zero). A span whose largest
//! value is below `32767 · f32::MIN_POSITIVE` (~4e-34) is rounded to zero (its residuals, the
//! values themselves, still enter the correction). A span holding a NaN or an infinity gets
//! `dx = NaN`, so that the outputs become NaN as they would on the f32 path.

#[cfg(target_arch = "x86_64")]
pub(super) mod avx2;
#[cfg(target_arch = "x86_64")]
pub(super) mod avx512;
#[cfg(test)]
mod tests;

use std::ops::Range;

use super::scalar::{read_float, unpack_codes, BLOCK};
use super::Backend;
#[cfg(target_arch = "x86_64")]
use crate::features::{cpu_level, SimdLevel};
use crate::{Matrix, Weights};

/// The largest int16 value used; symmetric, so that the rounding error bound is the same for
/// both signs (and `vpmaddwd` never meets `-32768 · -32768`).
const XQ_MAX: f32 = 32767.0;

/// Columns per span of activations that share one step: the group size when it is 32, 64 or
/// 128, else the largest of 128, 64, 32 dividing it (a span's integer sum must stay below 2^31
/// for 8-bit codes, and the kernels are unrolled for these three). `group_size` is a multiple of
/// 32 ([`Matrix::validate`]).
pub(super) fn span_columns(group_size: usize) -> usize {
    [128, 64]
        .into_iter()
        .find(|s| group_size.is_multiple_of(*s))
        .unwrap_or(BLOCK)
}

/// Order of the int16 values, matching the order in which a backend unpacks codes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum ValueOrder {
    /// As the columns: the scalar twin; 8-bit and 2/3/5/6-bit codes.
    Natural,
    /// Within each 32 columns: the even columns, then the odd ones, as the low and high nibbles
    /// of 16 bytes (4-bit codes on AVX-512).
    NibbleSplit,
    /// Within each 64 columns: columns `4k`, then `4k + 1`, `4k + 2`, `4k + 3` (`k` in 0..16), as
    /// the four nibbles of the 16-bit words of 32 bytes (4-bit codes on AVX2); a last 32 columns
    /// (`cols % 64 == 32`) in [`ValueOrder::NibbleSplit`] order.
    NibbleQuad,
}

impl ValueOrder {
    /// The order `backend` unpacks the codes of `m` in.
    pub(super) fn of(backend: Backend, m: &Matrix) -> Self {
        match (backend, m.weights) {
            (Backend::Scalar, _) => ValueOrder::Natural,
            #[cfg(target_arch = "x86_64")]
            (Backend::Avx2, Weights::Affine { bits: 4, .. }) => ValueOrder::NibbleQuad,
            #[cfg(target_arch = "x86_64")]
            (Backend::Avx512, Weights::Affine { bits: 4, .. }) => ValueOrder::NibbleSplit,
            #[cfg(target_arch = "x86_64")]
            _ => ValueOrder::Natural,
        }
    }
}

/// The activation row of a decode product, rounded to int16 span by span (module docs).
pub(super) struct QuantizedRow {
    /// `cols` values in a [`ValueOrder`].
    pub values: Vec<i16>,
    /// `cols / span` steps `dx_j`.
    pub steps: Vec<f32>,
    /// Columns per span: 32, 64 or 128, dividing the group size.
    pub span: usize,
    /// `cols / group_size` corrections `c_g`.
    pub corrections: Vec<f32>,
}

impl QuantizedRow {
    /// Quantizes the single row `x` of a product with `bits`-bit affine weights of `group_size`;
    /// the column count `x.len()` is a multiple of the group size ([`Matrix::validate`]).
    pub(super) fn new(x: &[f32], bits: u32, group_size: usize, order: ValueOrder) -> Self {
        Self::with_centre(x, group_size, ((1u32 << bits) - 1) as f32 / 2.0, order)
    }

    /// [`Self::new`] for codes centred on `center` (the llama.cpp block formats, whose codes are
    /// signed or carry a fifth bit: `matmul/ggml_blocks/int16.rs`).
    pub(super) fn with_centre(
        x: &[f32],
        group_size: usize,
        center: f32,
        order: ValueOrder,
    ) -> Self {
        let span = span_columns(group_size);
        debug_assert!(x.len().is_multiple_of(group_size));
        let mut row = QuantizedRow {
            values: vec![0; x.len()],
            steps: vec![0.0; x.len() / span],
            span,
            corrections: vec![0.0; x.len() / group_size],
        };
        #[cfg(target_arch = "x86_64")]
        if cpu_level() >= SimdLevel::Avx2 {
            // SAFETY: the CPU supports AVX2, FMA and F16C.
            unsafe { quantize_avx2(x, center, order, &mut row) };
            return row;
        }
        quantize(x, center, order, &mut row);
        row
    }
}

/// [`quantize`] compiled for AVX2, where it runs in vector registers. Rust never contracts or
/// reorders f32 operations, so both compilations give the same results.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn quantize_avx2(x: &[f32], center: f32, order: ValueOrder, row: &mut QuantizedRow) {
    quantize(x, center, order, row)
}

/// Fills `row` (allocated for `x`) from `x`: steps, values in `order`, and corrections for the
/// centre code `center` (module docs).
#[inline(always)]
fn quantize(x: &[f32], center: f32, order: ValueOrder, row: &mut QuantizedRow) {
    let span = row.span;
    for (xs, step) in x.chunks_exact(span).zip(row.steps.iter_mut()) {
        *step = span_step(xs);
    }
    let steps = &row.steps;
    // The step of 32-column block `b`, and the factor that takes its values to int16: zero for
    // spans that round to zero (step 0) and for non-finite spans (step NaN, whose output is NaN
    // anyway).
    let step_and_inverse = |b: usize| {
        let step = steps[b * BLOCK / span];
        (step, if step > 0.0 { 1.0 / step } else { 0.0 })
    };
    let values = &mut row.values;
    match order {
        ValueOrder::Natural => {
            for (b, (q, xs)) in values
                .chunks_exact_mut(BLOCK)
                .zip(x.chunks_exact(BLOCK))
                .enumerate()
            {
                let inv = step_and_inverse(b).1;
                for (q, v) in q.iter_mut().zip(xs) {
                    *q = round(*v, inv);
                }
            }
        }
        ValueOrder::NibbleSplit => {
            for (b, (q, xs)) in values
                .chunks_exact_mut(BLOCK)
                .zip(x.chunks_exact(BLOCK))
                .enumerate()
            {
                nibble_split(q, xs, step_and_inverse(b).1);
            }
        }
        ValueOrder::NibbleQuad => {
            let mut q64 = values.chunks_exact_mut(2 * BLOCK);
            let mut x64 = x.chunks_exact(2 * BLOCK);
            for (c, (q, xs)) in (&mut q64).zip(&mut x64).enumerate() {
                // Column 4k + r goes to value 16r + k; the first 8 k are the chunk's first
                // block, the last 8 its second.
                let mut inv = [step_and_inverse(2 * c).1; 16];
                inv[8..].fill(step_and_inverse(2 * c + 1).1);
                let (q0, q) = q.split_at_mut(16);
                let (q1, q) = q.split_at_mut(16);
                let (q2, q3) = q.split_at_mut(16);
                for (k, quad) in xs.chunks_exact(4).enumerate() {
                    q0[k] = round(quad[0], inv[k]);
                    q1[k] = round(quad[1], inv[k]);
                    q2[k] = round(quad[2], inv[k]);
                    q3[k] = round(quad[3], inv[k]);
                }
            }
            let (q, xs) = (q64.into_remainder(), x64.remainder());
            if !q.is_empty() {
                nibble_split(q, xs, step_and_inverse(x.len() / BLOCK - 1).1);
            }
        }
    }
    // The residuals, in eight interleaved partial sums per group (the values are rounded again
    // here, in column order, rather than read back in the backend's order).
    let blocks_per_group = x.len() / row.corrections.len() / BLOCK;
    for (g, (xs, correction)) in x
        .chunks_exact(blocks_per_group * BLOCK)
        .zip(row.corrections.iter_mut())
        .enumerate()
    {
        let mut lanes = [0f32; 8];
        for (b, xb) in xs.chunks_exact(BLOCK).enumerate() {
            let (step, inv) = step_and_inverse(g * blocks_per_group + b);
            for x8 in xb.chunks_exact(8) {
                for (lane, v) in lanes.iter_mut().zip(x8) {
                    *lane += v - step * f32::from(round(*v, inv));
                }
            }
        }
        *correction = center * lanes.iter().sum::<f32>();
    }
}

/// Rounds the 32 values `x` into `q` in [`ValueOrder::NibbleSplit`] order.
#[inline(always)]
fn nibble_split(q: &mut [i16], x: &[f32], inverse: f32) {
    let (even, odd) = q.split_at_mut(BLOCK / 2);
    for ((e, o), pair) in even.iter_mut().zip(odd).zip(x.chunks_exact(2)) {
        *e = round(pair[0], inverse);
        *o = round(pair[1], inverse);
    }
}

/// The step of the span `x` (module docs): 0 for a span that rounds to zero, NaN for a span
/// with a NaN or an infinity.
#[inline(always)]
fn span_step(x: &[f32]) -> f32 {
    span_step_to(x, XQ_MAX)
}

/// The step that takes the largest `|x|` of the span `x` to the integer `top_code` (32767 here, 127
/// for the int8 block path): 0 for a span whose step would be below `f32::MIN_POSITIVE` (it
/// rounds to zero), NaN for a span with a NaN or an infinity.
#[inline(always)]
pub(super) fn span_step_to(x: &[f32], top_code: f32) -> f32 {
    // The largest |x| through the bit patterns: an integer maximum vectorises, and the patterns of
    // NaN and ±inf exceed those of every finite value.
    let top = x.iter().fold(0u32, |m, v| m.max(v.to_bits() & 0x7fff_ffff));
    let largest = f32::from_bits(top);
    if !largest.is_finite() {
        return f32::NAN;
    }
    let step = largest / top_code;
    if step < f32::MIN_POSITIVE {
        return 0.0;
    }
    step
}

/// `round(v · inverse)` for `|v · inverse| ≤ 32767` plus a few ulps: adding 1.5·2^23 rounds to
/// an integer n (to nearest, ties to even) and leaves the f32 whose bit pattern is that of
/// 1.5·2^23 plus n. Integer operations, which vectorise, where a float-to-int conversion would
/// not on baseline x86-64.
#[inline(always)]
pub(super) fn round(v: f32, inverse: f32) -> i16 {
    const ROUND: f32 = 12_582_912.0;
    const ROUND_BITS: i32 = 0x4B40_0000;
    ((v * inverse + ROUND).to_bits() as i32 - ROUND_BITS) as i16
}

/// The scalar twin of the SIMD kernels: `out[o - rows.start]` for the given rows of an affine `m`,
/// from the natural-order quantized row `xq` and the f32 group sums `sums` of the same token.
pub(super) fn matvec_block(
    m: &Matrix,
    xq: &QuantizedRow,
    sums: &[f32],
    rows: Range<usize>,
    out: &mut [f32],
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
    let (cols, bits) = (m.cols, bits as usize);
    let groups = cols / group_size;
    let row_bytes = cols * bits / 8;
    let size = scale_kind.size_bytes();
    debug_assert!(xq.values.len() == cols && sums.len() == groups && out.len() == rows.len());
    let mut codes = [0u8; BLOCK];
    for (y, o) in out.iter_mut().zip(rows) {
        let row = &packed[o * row_bytes..(o + 1) * row_bytes];
        let param =
            |params: &[u8], g: usize| read_float(scale_kind, &params[(o * groups + g) * size..]);
        let mut products = 0f32;
        for (j, (step, xs)) in xq
            .steps
            .iter()
            .zip(xq.values.chunks_exact(xq.span))
            .enumerate()
        {
            let c0 = j * xq.span;
            let mut sum = 0i32;
            for (b, xb) in xs.chunks_exact(BLOCK).enumerate() {
                let c = c0 + b * BLOCK;
                unpack_codes(&row[c * bits / 8..(c + BLOCK) * bits / 8], bits, &mut codes);
                sum += codes
                    .iter()
                    .zip(xb)
                    .map(|(&q, &v)| i32::from(q) * i32::from(v))
                    .sum::<i32>();
            }
            products += param(scales, c0 / group_size) * step * sum as f32;
        }
        let bias_term: f32 = (0..groups)
            .map(|g| param(biases, g) * sums[g] + param(scales, g) * xq.corrections[g])
            .sum();
        *y = products + bias_term;
    }
}
