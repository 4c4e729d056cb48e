//! Decode products (one token) of affine weights with the activations rounded to int16
//! ([`ActivationPrecision::Int16`](crate::features::ActivationPrecision::Int16)): integer codes
//! times integer activations, 16 products per AVX2 instruction (`vpmaddwd`), where the f32 path
//! converts every code to f32 first.
//!
//! # Method
//! The activation row is cut into spans of [`span_columns`] columns: the weight group, or for
//! groups of more than 128 columns the largest of 128, 64, 32 that divides it, so that a span never
//! straddles two groups. Span `j` gets a step and int16 values
//!
//! ```text
//! dx_j = max_{i∈j} |x_i| / 32767,    xq_i = round(x_i / dx_j)   (ties to even; |xq_i| ≤ 32767)
//! ```
//!
//! and an affine row `w_i = s_g·q_i + b_g` becomes
//!
//! ```text
//! y = Σ_j (s_g(j)·dx_j) · Σ_{i∈j} q_i·xq_i  +  Σ_g b_g · Σ_{i∈g} x_i
//! ```
//!
//! The inner sums are exact in i32 (`q_i·|xq_i| ≤ 255·32767`, so a span of at most 128 columns
//! stays below 2^31); the bias term uses the f32 group sums of the f32 path. The row is
//! quantized once per call ([`QuantizedRow::new`], shared by every backend and task); the
//! backends then differ from the scalar twin ([`matvec_block`]) only in the order of the f32
//! operations that scale and add the per-span sums.
//!
//! # Error
//! Rounding moves `x_i` by at most `dx_j / 2 = max_{i∈j}|x_i| / 65534`, so
//! `|y_int16 − y_f32| ≤ Σ_i |s_g|·q_i·dx_j / 2` plus f32 rounding: the error is relative to the
//! largest activation of each span, not to each activation, and grows where a span holds an
//! outlier. The error bound and the measured error are in the `matmul` module docs.
//!
//! # Spans that cannot be scaled
//! An all-zero span gets `dx = 0` and zero values (no division by zero). A span whose largest
//! value is below `32767 · f32::MIN_POSITIVE` (~4e-34) is treated as zero. A span holding a NaN or
//! an infinity gets `dx = NaN`, so that the outputs become NaN as they would on the f32 path.

#[cfg(target_arch = "x86_64")]
pub(super) mod avx2;
#[cfg(target_arch = "x86_64")]
pub(super) mod avx512;
#[cfg(test)]
mod tests;

use std::ops::Range;

use super::scalar::{read_float, unpack_codes, BLOCK};
use super::ColumnOrder;
#[cfg(target_arch = "x86_64")]
use crate::features::{cpu_level, SimdLevel};
use crate::{Matrix, Weights};

/// The largest int16 value used; symmetric, so that `-32768` never occurs (`vpmaddwd` would
/// overflow on `-32768 · -32768` pairs, which codes ≥ 0 never form, but symmetry keeps the
/// rounding error bound the same for both signs).
const XQ_MAX: f32 = 32767.0;

/// Columns per span of activations that share one step: the group size when it is at most 128
/// (a span's integer sum must stay below 2^31 for 8-bit codes), else the largest of 128, 64, 32
/// dividing it. `group_size` is a multiple of 32 ([`Matrix::validate`]).
pub(super) fn span_columns(group_size: usize) -> usize {
    if group_size <= 128 {
        return group_size;
    }
    [128, 64, 32]
        .into_iter()
        .find(|s| group_size.is_multiple_of(*s))
        .unwrap_or(BLOCK)
}

/// The activation row of a decode product, rounded to int16 span by span (module docs).
pub(super) struct QuantizedRow {
    /// `cols` values; within each 32-column block, in the backend's [`ColumnOrder`].
    pub values: Vec<i16>,
    /// `cols / span` steps `dx_j`.
    pub steps: Vec<f32>,
    /// Columns per span: a multiple of 32 of at most 128 columns dividing the group size.
    pub span: usize,
}

impl QuantizedRow {
    /// Quantizes the single row `x` of a product with affine weights of `group_size`.
    pub(super) fn new(x: &[f32], group_size: usize, order: ColumnOrder) -> Self {
        let span = span_columns(group_size);
        debug_assert!(x.len().is_multiple_of(span));
        let mut values = vec![0i16; x.len()];
        let mut steps = vec![0f32; x.len() / span];
        #[cfg(target_arch = "x86_64")]
        if cpu_level() >= SimdLevel::Avx2 {
            // SAFETY: the CPU supports AVX2, FMA and F16C.
            unsafe { quantize_avx2(x, span, order, &mut values, &mut steps) };
        } else {
            quantize(x, span, order, &mut values, &mut steps);
        }
        #[cfg(not(target_arch = "x86_64"))]
        quantize(x, span, order, &mut values, &mut steps);
        QuantizedRow {
            values,
            steps,
            span,
        }
    }
}

/// [`quantize`] compiled for AVX2, where it runs in vector registers. Rust never contracts or
/// reorders f32 operations, so both compilations give the same values and steps.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn quantize_avx2(
    x: &[f32],
    span: usize,
    order: ColumnOrder,
    values: &mut [i16],
    steps: &mut [f32],
) {
    quantize(x, span, order, values, steps)
}

/// Rounds `x` span by span into `values` (in `order`) and `steps` (module docs).
#[inline(always)]
fn quantize(x: &[f32], span: usize, order: ColumnOrder, values: &mut [i16], steps: &mut [f32]) {
    for ((xs, qs), step) in x
        .chunks_exact(span)
        .zip(values.chunks_exact_mut(span))
        .zip(steps.iter_mut())
    {
        *step = quantize_span(xs, qs, order);
    }
}

/// Rounds the span `x` into `out` in `order` (module docs) and returns its step.
#[inline(always)]
fn quantize_span(x: &[f32], out: &mut [i16], order: ColumnOrder) -> f32 {
    // The largest |x| through the bit patterns: an integer maximum vectorises, and the patterns of
    // NaN and ±inf exceed those of every finite value.
    let top = x.iter().fold(0u32, |m, v| m.max(v.to_bits() & 0x7fff_ffff));
    let largest = f32::from_bits(top);
    if !largest.is_finite() {
        out.fill(0);
        return f32::NAN;
    }
    let step = largest / XQ_MAX;
    if step < f32::MIN_POSITIVE {
        out.fill(0);
        return 0.0;
    }
    let inverse = 1.0 / step;
    // Adding 1.5·2^23 rounds v to an integer n (to nearest, ties to even) for |v| ≤ 2^22 (here
    // |v| ≤ 32767 plus a few ulps) and leaves the f32 whose bit pattern is that of 1.5·2^23
    // plus n: integer operations, which vectorise, where a float-to-int conversion would not on
    // baseline x86-64.
    const ROUND: f32 = 12_582_912.0;
    const ROUND_BITS: i32 = 0x4B40_0000;
    let round = |v: f32| ((v * inverse + ROUND).to_bits() as i32 - ROUND_BITS) as i16;
    match order {
        ColumnOrder::Natural => {
            for (q, v) in out.iter_mut().zip(x) {
                *q = round(*v);
            }
        }
        ColumnOrder::NibbleSplit => {
            for (q, xs) in out.chunks_exact_mut(BLOCK).zip(x.chunks_exact(BLOCK)) {
                let (even, odd) = q.split_at_mut(BLOCK / 2);
                for ((e, o), pair) in even.iter_mut().zip(odd).zip(xs.chunks_exact(2)) {
                    *e = round(pair[0]);
                    *o = round(pair[1]);
                }
            }
        }
    }
    step
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
        let param = |params: &[u8], g: usize| read_float(scale_kind, &params[(o * groups + g) * size..]);
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
        let bias_term: f32 = (0..groups).map(|g| param(biases, g) * sums[g]).sum();
        *y = products + bias_term;
    }
}
