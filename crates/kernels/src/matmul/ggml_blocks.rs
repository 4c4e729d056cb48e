//! Products with llama.cpp block-quantized weights ([`crate::ggml`]): the scalar twin here, the
//! AVX2 kernel in [`avx2`].
//!
//! Both decode each row once into a buffer of f32 weights (with the reference arithmetic, so the
//! decoded weights are bit-identical between the two) and apply it to every token of the task:
//! the decode is paid once per row and task whatever the number of tokens, and the dot products
//! are plain f32 FMAs. A row of the largest matrices (`cols` ≤ a few tens of thousands) fits in
//! L2. The two paths differ only in the order of the f32 additions of the dot products.
//!
//! Integer paths: [`int16`] (decode products with int16 activations) and [`int8`] (decode and
//! prefill products with int8 activations, llama.cpp's method, the default).
#[cfg(target_arch = "x86_64")]
pub(super) mod avx2;
pub(super) mod int16;
pub(super) mod int8;
#[cfg(test)]
pub(super) mod tests;

use std::ops::Range;

use super::Activations;
use crate::ggml::{dequantize_row, BlockFormat};

/// Computes `out[(o - rows.start) * tokens.len() + (t - tokens.start)]` (parent module contract)
/// for a validated `[_, cols]` matrix of `format` blocks whose bytes are `data`.
pub(super) fn matmul_block(
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
    let mut w = vec![0f32; cols];
    for (row_out, o) in out.chunks_exact_mut(nt).zip(rows) {
        dequantize_row(format, &data[o * rb..(o + 1) * rb], &mut w);
        for (y, xt) in row_out.iter_mut().zip(x.chunks_exact(cols)) {
            *y = super::scalar::dot(&w, xt);
        }
    }
}
