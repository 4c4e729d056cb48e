//! The portable reference twin of every kernel: plain Rust, no intrinsics, no `unsafe`.
//!
//! It follows the same arithmetic as the SIMD backends (per-block dequantization reused across
//! all tokens; affine rows as `Σ_g scale_g·Σ (q − c)·x + (bias_g + c·scale_g)·Σ x` with centred
//! codes, see the parent module), so that the two differ only in
//! the order of f32 additions. Columns are processed in blocks of [`BLOCK`] values: the weights
//! of a block are decoded once into a small buffer and applied to every token.

use std::ops::Range;

use super::Activations;
use crate::{FloatKind, Matrix, Weights};

/// Values decoded at a time; also the smallest group size, so an affine block never straddles
/// groups, and a whole number of bytes for every bit width (`32 * bits / 8`).
pub(super) const BLOCK: usize = 32;

/// Computes `out[(o - rows.start) * tokens.len() + (t - tokens.start)]` for the given rows and
/// tokens (see the parent module for the contract).
pub(super) fn matmul_block(
    m: &Matrix,
    act: &Activations,
    rows: Range<usize>,
    tokens: Range<usize>,
    out: &mut [f32],
) {
    match m.weights {
        Weights::Float { kind, data } => float_block(kind, data, m.cols, act, rows, tokens, out),
        Weights::Affine { .. } => affine_block(m, act, rows, tokens, out),
        Weights::Ggml { format, data } => {
            super::ggml_blocks::matmul_block(format, data, m.cols, act, rows, tokens, out)
        }
    }
}

fn float_block(
    kind: FloatKind,
    data: &[u8],
    cols: usize,
    act: &Activations,
    rows: Range<usize>,
    tokens: Range<usize>,
    out: &mut [f32],
) {
    let size = kind.size_bytes();
    let nt = tokens.len();
    let x = act.tokens(tokens);
    let mut w = [0f32; BLOCK];
    for (row_out, o) in out.chunks_exact_mut(nt).zip(rows) {
        row_out.fill(0.0);
        let row = &data[o * cols * size..(o + 1) * cols * size];
        for c0 in (0..cols).step_by(BLOCK) {
            let len = BLOCK.min(cols - c0);
            widen_floats(kind, &row[c0 * size..(c0 + len) * size], &mut w[..len]);
            for (acc, xt) in row_out.iter_mut().zip(x.chunks_exact(cols)) {
                *acc += dot(&w[..len], &xt[c0..c0 + len]);
            }
        }
    }
}

fn affine_block(
    m: &Matrix,
    act: &Activations,
    rows: Range<usize>,
    tokens: Range<usize>,
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
        unreachable!("affine_block called with float weights")
    };
    let (cols, bits) = (m.cols, bits as usize);
    let groups = cols / group_size;
    let row_bytes = cols * bits / 8;
    let size = scale_kind.size_bytes();
    let nt = tokens.len();
    let x = act.tokens(tokens.clone());
    let sums = act.group_sums(tokens);
    let mut q = [0f32; BLOCK];
    let centre = super::code_centre(bits) as f32;
    let mut group_acc = vec![0f32; nt];
    for (row_out, o) in out.chunks_exact_mut(nt).zip(rows) {
        row_out.fill(0.0);
        let row = &packed[o * row_bytes..(o + 1) * row_bytes];
        for g in 0..groups {
            let scale = read_float(scale_kind, &scales[(o * groups + g) * size..]);
            let mut bias = [read_float(scale_kind, &biases[(o * groups + g) * size..])];
            super::centre_biases(bits, &[scale], &mut bias);
            let bias = bias[0];
            group_acc.fill(0.0);
            for c0 in (g * group_size..(g + 1) * group_size).step_by(BLOCK) {
                unpack_block(&row[c0 * bits / 8..(c0 + BLOCK) * bits / 8], bits, &mut q);
                q.iter_mut().for_each(|v| *v -= centre);
                for (acc, xt) in group_acc.iter_mut().zip(x.chunks_exact(cols)) {
                    *acc += dot(&q, &xt[c0..c0 + BLOCK]);
                }
            }
            for ((acc, ga), st) in row_out
                .iter_mut()
                .zip(&group_acc)
                .zip(sums.chunks_exact(groups))
            {
                *acc += scale * ga + bias * st[g];
            }
        }
    }
}

/// Writes row `row` of a validated `m` as f32 into `out` (`out.len() == m.cols`).
pub(super) fn dequantize_row(m: &Matrix, row: usize, out: &mut [f32]) {
    let cols = m.cols;
    match m.weights {
        Weights::Float { kind, data } => {
            let size = kind.size_bytes();
            widen_floats(kind, &data[row * cols * size..(row + 1) * cols * size], out);
        }
        Weights::Affine {
            bits,
            group_size,
            packed,
            scales,
            biases,
            scale_kind,
        } => {
            let bits = bits as usize;
            let groups = cols / group_size;
            let row_bytes = cols * bits / 8;
            let size = scale_kind.size_bytes();
            let packed_row = &packed[row * row_bytes..(row + 1) * row_bytes];
            let mut q = [0f32; BLOCK];
            for (c0, block_out) in (0..cols).step_by(BLOCK).zip(out.chunks_exact_mut(BLOCK)) {
                let g = row * groups + c0 / group_size;
                let scale = read_float(scale_kind, &scales[g * size..]);
                let bias = read_float(scale_kind, &biases[g * size..]);
                unpack_block(
                    &packed_row[c0 * bits / 8..(c0 + BLOCK) * bits / 8],
                    bits,
                    &mut q,
                );
                for (v, &code) in block_out.iter_mut().zip(&q) {
                    *v = scale * code + bias;
                }
            }
        }
        Weights::Ggml { format, data } => {
            let rb = format.row_bytes(cols);
            crate::ggml::dequantize_row(format, &data[row * rb..(row + 1) * rb], out);
        }
    }
}

/// Decodes the 32 codes of `bytes` (`4 * bits` bytes of the little-endian bitstream, starting at
/// a code boundary) into `out` as f32.
fn unpack_block(bytes: &[u8], bits: usize, out: &mut [f32; BLOCK]) {
    let mut codes = [0u8; BLOCK];
    unpack_codes(bytes, bits, &mut codes);
    for (q, c) in out.iter_mut().zip(codes) {
        *q = f32::from(c);
    }
}

/// Decodes the 32 codes of `bytes` (`4 * bits` bytes of the little-endian bitstream, starting at
/// a code boundary) into `out`. The u32 words of the format are little-endian, so stream bit `n`
/// is bit `n % 8` of byte `n / 8`; codes of at most 8 bits need at most one new byte each.
pub(super) fn unpack_codes(bytes: &[u8], bits: usize, out: &mut [u8; BLOCK]) {
    debug_assert_eq!(bytes.len(), BLOCK * bits / 8);
    // The two common widths without the bit window (same result, fewer operations).
    if bits == 8 {
        out.copy_from_slice(bytes);
        return;
    }
    if bits == 4 {
        for (q, &b) in out.chunks_exact_mut(2).zip(bytes) {
            q[0] = b & 0x0f;
            q[1] = b >> 4;
        }
        return;
    }
    let mask = (1u32 << bits) - 1;
    let (mut window, mut held, mut next) = (0u32, 0usize, 0usize);
    for q in out.iter_mut() {
        if held < bits {
            window |= u32::from(bytes[next]) << held;
            next += 1;
            held += 8;
        }
        *q = (window & mask) as u8;
        window >>= bits;
        held -= bits;
    }
}

/// `Σ a[i]·b[i]` in eight interleaved partial sums, which the compiler can keep in vector
/// registers of any target (strictly sequential f32 sums cannot be vectorised).
pub(super) fn dot(a: &[f32], b: &[f32]) -> f32 {
    let (a8, b8) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = a8
        .remainder()
        .iter()
        .zip(b8.remainder())
        .map(|(a, b)| a * b)
        .sum();
    let mut lanes = [0f32; 8];
    for (a, b) in a8.zip(b8) {
        for k in 0..8 {
            lanes[k] += a[k] * b[k];
        }
    }
    lanes.iter().sum::<f32>() + tail
}

/// `Σ v[i]` in eight interleaved partial sums, like [`dot`].
pub(super) fn sum(v: &[f32]) -> f32 {
    let v8 = v.chunks_exact(8);
    let tail: f32 = v8.remainder().iter().sum();
    let mut lanes = [0f32; 8];
    for v in v8 {
        for k in 0..8 {
            lanes[k] += v[k];
        }
    }
    lanes.iter().sum::<f32>() + tail
}

/// Widens `src` (`dst.len()` little-endian numbers of type `kind`) into `dst`.
fn widen_floats(kind: FloatKind, src: &[u8], dst: &mut [f32]) {
    debug_assert_eq!(src.len(), dst.len() * kind.size_bytes());
    match kind {
        FloatKind::F32 => {
            for (v, b) in dst.iter_mut().zip(src.chunks_exact(4)) {
                *v = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
        }
        FloatKind::F16 => {
            for (v, b) in dst.iter_mut().zip(src.chunks_exact(2)) {
                *v = half::f16::from_le_bytes([b[0], b[1]]).to_f32();
            }
        }
        FloatKind::BF16 => {
            // bf16 is the high half of an f32: exact for every value.
            for (v, b) in dst.iter_mut().zip(src.chunks_exact(2)) {
                *v = f32::from_bits(u32::from(u16::from_le_bytes([b[0], b[1]])) << 16);
            }
        }
    }
}

/// The little-endian number of type `kind` at the start of `b`.
#[inline]
pub(super) fn read_float(kind: FloatKind, b: &[u8]) -> f32 {
    match kind {
        FloatKind::F32 => f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
        FloatKind::F16 => half::f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32(),
        FloatKind::BF16 => f32::from_bits(u32::from(u16::from_le_bytes([b[0], b[1]])) << 16),
    }
}
