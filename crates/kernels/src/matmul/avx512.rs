//! AVX-512F/BW kernels for float weights and 4-/8-bit affine weights: the AVX2 kernels with
//! 16-lane vectors. Other formats run on the AVX2 backend on such CPUs ([`supports`]).
//!
//! Every function here is a `#[target_feature]` function that may run only after
//! [`crate::features::cpu_level`] reported [`crate::features::SimdLevel::Avx512`], which also
//! guarantees the AVX2 set: the row preparation (scale widening, bias dot) is shared with
//! [`super::avx2`]. Bounds reasoning as in `avx2`.
//!
//! A 32-code block is two 16-lane vectors: for 4-bit codes the low nibbles of its 16 bytes, then
//! the high nibbles ([`super::ColumnOrder::NibbleSplit`], the same order as AVX2); for 8-bit codes
//! codes 0..16 and 16..32.

use std::arch::x86_64::*;
use std::ops::Range;

use super::avx2::{
    dot, kind_of, pack_tile, prefill_block_groups, tile_len, widen_floats, AffineRow, BF16,
    DECODE_ROW_BATCH, F16, F32, PREFILL_BLOCK_COLS,
};
use super::{centre_biases, code_centre, scalar::read_float, Activations};
use crate::{FloatKind, Matrix, Weights};

/// Whether this backend has kernels for `m`.
pub(super) fn supports(m: &Matrix) -> bool {
    matches!(
        m.weights,
        Weights::Float { .. } | Weights::Affine { bits: 4 | 8, .. }
    )
}

/// Computes `out[(o - rows.start) * tokens.len() + (t - tokens.start)]` for the given rows and
/// tokens (see the parent module for the contract).
///
/// # Safety
/// The CPU must support AVX-512F/BW, AVX2, FMA and F16C, and [`supports`]`(m)` must hold; the rest
/// as [`super::avx2::matmul_block`].
#[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
pub(super) unsafe fn matmul_block(
    m: &Matrix,
    act: &Activations,
    rows: Range<usize>,
    tokens: Range<usize>,
    out: &mut [f32],
) {
    match m.weights {
        Weights::Float {
            kind: FloatKind::F32,
            data,
        } => float_block::<F32>(data, m.cols, act, rows, tokens, out),
        Weights::Float {
            kind: FloatKind::F16,
            data,
        } => float_block::<F16>(data, m.cols, act, rows, tokens, out),
        Weights::Float {
            kind: FloatKind::BF16,
            data,
        } => float_block::<BF16>(data, m.cols, act, rows, tokens, out),
        Weights::Affine { bits: 4, .. } => affine_block::<4>(m, act, rows, tokens, out),
        Weights::Affine { bits: 8, .. } => affine_block::<8>(m, act, rows, tokens, out),
        Weights::Affine { bits, .. } => unreachable!("avx512 backend called for {bits}-bit codes"),
        Weights::Ggml { format, .. } => {
            unreachable!("avx512 backend called for {}", format.name())
        }
    }
}

/// Sixteen weights of kind `K` at `p` as f32.
///
/// # Safety
/// AVX-512F/BW; `p` must be readable for `16 * size` bytes.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
unsafe fn load16<const K: u8>(p: *const u8) -> __m512 {
    match K {
        F32 => _mm512_loadu_ps(p.cast()),
        F16 => _mm512_cvtph_ps(_mm256_loadu_si256(p.cast())),
        _ => _mm512_castsi512_ps(_mm512_slli_epi32(
            _mm512_cvtepu16_epi32(_mm256_loadu_si256(p.cast())),
            16,
        )),
    }
}

/// # Safety
/// As [`matmul_block`], with `data` the weights of a `[_, cols]` matrix of kind `K`.
#[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
unsafe fn float_block<const K: u8>(
    data: &[u8],
    cols: usize,
    act: &Activations,
    rows: Range<usize>,
    tokens: Range<usize>,
    out: &mut [f32],
) {
    let row_bytes = cols * kind_of(K).size_bytes();
    let nt = tokens.len();
    let x = act.tokens(tokens);
    out.fill(0.0);
    if nt == 1 {
        for (y, o) in out.iter_mut().zip(rows) {
            // With one token the packed layout is the activations themselves.
            float_tile::<K, 1>(
                &data[o * row_bytes..(o + 1) * row_bytes],
                0..cols,
                x,
                x,
                std::slice::from_mut(y),
            );
        }
        return;
    }
    let mut x_tile = Vec::new();
    let mut t = 0;
    while t < nt {
        let tile = tile_len(nt - t);
        let xs = &x[t * cols..(t + tile) * cols];
        pack_tile::<16>(xs, cols, tile, &mut x_tile);
        for c0 in (0..cols).step_by(PREFILL_BLOCK_COLS) {
            let span = c0..(c0 + PREFILL_BLOCK_COLS).min(cols);
            for (r, o) in rows.clone().enumerate() {
                let w = &data[o * row_bytes..(o + 1) * row_bytes];
                let dst = &mut out[r * nt + t..r * nt + t + tile];
                match tile {
                    8 => float_tile::<K, 8>(w, span.clone(), xs, &x_tile, dst),
                    4 => float_tile::<K, 4>(w, span.clone(), xs, &x_tile, dst),
                    2 => float_tile::<K, 2>(w, span.clone(), xs, &x_tile, dst),
                    _ => float_tile::<K, 1>(w, span.clone(), xs, &x_tile, dst),
                }
            }
        }
        t += tile;
    }
}

/// `dst[t] += Σ_{i∈span} w[i]·x[t * cols + i]` for a tile of `T` tokens (`cols = w.len() / size`),
/// reading the activations of whole runs of 16 columns from `packed` ([`pack_tile`]) and those
/// of the last `cols % 16` columns from `xs`; a single token uses two accumulators to halve the
/// FMA dependency chain.
///
/// # Safety
/// AVX-512F/BW; `span.start` is a multiple of 16, `span.end <= cols`, `xs.len() == T * cols`,
/// `packed` starts with `xs` packed with 16 lanes (for one token: `xs` itself), and
/// `dst.len() == T`.
#[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
unsafe fn float_tile<const K: u8, const T: usize>(
    w: &[u8],
    span: Range<usize>,
    xs: &[f32],
    packed: &[f32],
    dst: &mut [f32],
) {
    let size = kind_of(K).size_bytes();
    let cols = w.len() / size;
    debug_assert!(span.end <= cols && xs.len() == T * cols && dst.len() == T);
    debug_assert!(span.start.is_multiple_of(16) && packed.len() >= cols / 16 * 16 * T);
    let (wp, pp) = (w.as_ptr(), packed.as_ptr());
    let mut acc = [_mm512_setzero_ps(); T];
    let mut extra = _mm512_setzero_ps();
    let mut i = span.start;
    if T == 1 {
        // Reads [i, i + 32) of the row and of the single token while i + 32 <= span.end.
        while i + 32 <= span.end {
            acc[0] = _mm512_fmadd_ps(
                load16::<K>(wp.add(i * size)),
                _mm512_loadu_ps(pp.add(i)),
                acc[0],
            );
            extra = _mm512_fmadd_ps(
                load16::<K>(wp.add((i + 16) * size)),
                _mm512_loadu_ps(pp.add(i + 16)),
                extra,
            );
            i += 32;
        }
    }
    // Weight loads cover [i, i + 16) of the row, activation loads [i * T + 16t, .. + 16) of the
    // packed tile (the run of columns i..i + 16, token t < T): inside both while i + 16 <= cols.
    while i + 16 <= span.end {
        let wv = load16::<K>(wp.add(i * size));
        for (t, a) in acc.iter_mut().enumerate() {
            *a = _mm512_fmadd_ps(wv, _mm512_loadu_ps(pp.add(i * T + 16 * t)), *a);
        }
        i += 16;
    }
    acc[0] = _mm512_add_ps(acc[0], extra);
    for (d, a) in dst.iter_mut().zip(acc) {
        *d += _mm512_reduce_add_ps(a);
    }
    for j in i..span.end {
        let wj = read_float(kind_of(K), &w[j * size..]);
        for (t, d) in dst.iter_mut().enumerate() {
            *d += wj * xs[t * cols + j];
        }
    }
}

/// The 32 codes that start at byte `at` of `packed`, centred (`q − 2^(BITS−1)`), as f32, in two
/// vectors of sixteen (module
/// docs for the order).
///
/// # Safety
/// AVX-512F/BW; `BITS` is 4 or 8; `at + 4 * BITS <= packed.len()`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
unsafe fn decode32<const BITS: usize>(packed: &[u8], at: usize) -> [__m512; 2] {
    debug_assert!(at + 4 * BITS <= packed.len());
    let p = packed.as_ptr().add(at);
    let centre = _mm512_set1_epi32(code_centre(BITS));
    let (lo, hi) = if BITS == 4 {
        // Reads bytes [at, at + 16): the block's 16 bytes.
        let v = _mm512_cvtepu8_epi32(_mm_loadu_si128(p.cast()));
        (
            _mm512_and_si512(v, _mm512_set1_epi32(0x0f)),
            _mm512_srli_epi32(v, 4),
        )
    } else {
        // Reads bytes [at, at + 32): the block's 32 bytes.
        (
            _mm512_cvtepu8_epi32(_mm_loadu_si128(p.cast())),
            _mm512_cvtepu8_epi32(_mm_loadu_si128(p.add(16).cast())),
        )
    };
    [
        _mm512_cvtepi32_ps(_mm512_sub_epi32(lo, centre)),
        _mm512_cvtepi32_ps(_mm512_sub_epi32(hi, centre)),
    ]
}

/// # Safety
/// As [`matmul_block`], with an affine `m` of `BITS`-bit codes, `BITS` 4 or 8.
#[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
unsafe fn affine_block<const BITS: usize>(
    m: &Matrix,
    act: &Activations,
    rows: Range<usize>,
    tokens: Range<usize>,
    out: &mut [f32],
) {
    let Weights::Affine {
        group_size,
        packed,
        scales,
        biases,
        scale_kind,
        ..
    } = m.weights
    else {
        unreachable!("affine_block called with float weights")
    };
    let cols = m.cols;
    let groups = cols / group_size;
    let row_bytes = cols * BITS / 8;
    let size = scale_kind.size_bytes();
    let nt = tokens.len();
    let x = act.tokens(tokens.clone());
    let sums = act.group_sums(tokens);
    let params = rows.start * groups * size..rows.end * groups * size;

    if nt == 1 {
        // Scales and biases widened a batch of rows at a time: one pass for many short rows, and
        // they stay in L1 next to the streamed codes.
        let batch = DECODE_ROW_BATCH.min(rows.len());
        let mut batch_scales = vec![0f32; batch * groups];
        let mut batch_biases = vec![0f32; batch * groups];
        for (b0, ys) in rows.step_by(batch).zip(out.chunks_mut(batch)) {
            let params = b0 * groups * size..(b0 + ys.len()) * groups * size;
            let (batch_scales, batch_biases) = (
                &mut batch_scales[..ys.len() * groups],
                &mut batch_biases[..ys.len() * groups],
            );
            widen_floats(scale_kind, &scales[params.clone()], batch_scales);
            widen_floats(scale_kind, &biases[params], batch_biases);
            centre_biases(BITS, batch_scales, batch_biases);
            for ((r, y), (s, b)) in ys.iter_mut().enumerate().zip(
                batch_scales
                    .chunks_exact(groups)
                    .zip(batch_biases.chunks_exact(groups)),
            ) {
                let row = AffineRow {
                    packed,
                    start: (b0 + r) * row_bytes,
                    cols,
                    group_size,
                    scales: s,
                };
                *y = match group_size {
                    32 => affine_dot::<BITS, 1>(&row, b, x, sums),
                    64 => affine_dot::<BITS, 2>(&row, b, x, sums),
                    128 => affine_dot::<BITS, 4>(&row, b, x, sums),
                    _ => affine_dot::<BITS, 0>(&row, b, x, sums),
                };
            }
        }
        return;
    }

    let (mut task_scales, mut task_biases) = (
        vec![0f32; rows.len() * groups],
        vec![0f32; rows.len() * groups],
    );
    widen_floats(scale_kind, &scales[params.clone()], &mut task_scales);
    widen_floats(scale_kind, &biases[params], &mut task_biases);
    centre_biases(BITS, &task_scales, &mut task_biases);
    for (row_out, b) in out
        .chunks_exact_mut(nt)
        .zip(task_biases.chunks_exact(groups))
    {
        for (y, s) in row_out.iter_mut().zip(sums.chunks_exact(groups)) {
            *y = dot(b, s);
        }
    }
    let block_groups = prefill_block_groups(group_size);
    let mut x_tile = Vec::new();
    let mut t = 0;
    while t < nt {
        let tile = tile_len(nt - t);
        pack_tile::<16>(&x[t * cols..(t + tile) * cols], cols, tile, &mut x_tile);
        for g0 in (0..groups).step_by(block_groups) {
            let span = g0..(g0 + block_groups).min(groups);
            for (r, o) in rows.clone().enumerate() {
                let row_scales = &task_scales[r * groups..(r + 1) * groups];
                let row = AffineRow {
                    packed,
                    start: o * row_bytes,
                    cols,
                    group_size,
                    scales: row_scales,
                };
                let dst = &mut out[r * nt + t..r * nt + t + tile];
                match tile {
                    8 => affine_tile::<BITS, 8>(&row, span.clone(), &x_tile, dst),
                    4 => affine_tile::<BITS, 4>(&row, span.clone(), &x_tile, dst),
                    2 => affine_tile::<BITS, 2>(&row, span.clone(), &x_tile, dst),
                    _ => affine_tile::<BITS, 1>(&row, span.clone(), &x_tile, dst),
                }
            }
        }
        t += tile;
    }
}

/// `Σ_g (scale_g · Σ_{i∈g} q_i·x_i + bias_g · sums_g)` for one row and one token;
/// `GROUP_BLOCKS` as in [`super::avx2`]'s `affine_dot`.
///
/// # Safety
/// AVX-512F/BW; the rest as [`super::avx2`]'s `affine_dot`.
#[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
unsafe fn affine_dot<const BITS: usize, const GROUP_BLOCKS: usize>(
    row: &AffineRow,
    biases: &[f32],
    x: &[f32],
    sums: &[f32],
) -> f32 {
    debug_assert!(row.start + row.cols * BITS / 8 <= row.packed.len() && x.len() == row.cols);
    debug_assert!(GROUP_BLOCKS == 0 || row.group_size == 32 * GROUP_BLOCKS);
    debug_assert!(row.scales.len() == biases.len() && biases.len() == sums.len());
    let blocks = if GROUP_BLOCKS == 0 {
        row.group_size / 32
    } else {
        GROUP_BLOCKS
    };
    let mut at = row.start;
    let mut xp = x.as_ptr();
    let mut acc = [_mm512_setzero_ps(); 2];
    let mut bias_term = 0f32;
    for ((scale, bias), sum) in row.scales.iter().zip(biases).zip(sums) {
        bias_term += bias * sum;
        let mut part = [_mm512_setzero_ps(); 2];
        for _ in 0..blocks {
            let codes = decode32::<BITS>(row.packed, at);
            for (k, p) in part.iter_mut().enumerate() {
                // Reads x[c + 16k, c + 16k + 16) for the block's first column c, c + 32 <= cols.
                *p = _mm512_fmadd_ps(codes[k], _mm512_loadu_ps(xp.add(16 * k)), *p);
            }
            at += 4 * BITS;
            xp = xp.add(32);
        }
        let scale = _mm512_set1_ps(*scale);
        for (a, p) in acc.iter_mut().zip(part) {
            *a = _mm512_fmadd_ps(scale, p, *a);
        }
    }
    _mm512_reduce_add_ps(_mm512_add_ps(acc[0], acc[1])) + bias_term
}

/// `dst[t] += Σ_{g∈groups} scale_g · Σ_{i∈g} q_i·x[t * cols + i]` for a tile of `T` tokens.
///
/// The activations come packed in runs of 16 columns ([`pack_tile`]).
///
/// # Safety
/// As [`affine_dot`], with `groups.end <= row.scales.len()`, `packed.len() == T * cols` and
/// `dst.len() == T`.
#[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
unsafe fn affine_tile<const BITS: usize, const T: usize>(
    row: &AffineRow,
    groups: Range<usize>,
    packed: &[f32],
    dst: &mut [f32],
) {
    let cols = row.cols;
    debug_assert!(
        row.start + cols * BITS / 8 <= row.packed.len()
            && packed.len() == T * cols
            && dst.len() == T
    );
    let pp = packed.as_ptr();
    let mut acc = [_mm512_setzero_ps(); T];
    for (g, scale) in row.scales[groups.clone()].iter().enumerate() {
        let scale = _mm512_set1_ps(*scale);
        let g = groups.start + g;
        for c0 in (g * row.group_size..(g + 1) * row.group_size).step_by(32) {
            let codes = decode32::<BITS>(row.packed, row.start + c0 * BITS / 8);
            for (k, code) in codes.iter().enumerate() {
                let w = _mm512_mul_ps(*code, scale);
                for (t, a) in acc.iter_mut().enumerate() {
                    // Reads the run of columns c0 + 16k.. of token t < T: packed[(c0 + 16k) * T
                    // + 16t, .. + 16) with c0 + 32 <= cols.
                    *a =
                        _mm512_fmadd_ps(w, _mm512_loadu_ps(pp.add((c0 + 16 * k) * T + 16 * t)), *a);
                }
            }
        }
    }
    for (d, a) in dst.iter_mut().zip(acc) {
        *d += _mm512_reduce_add_ps(a);
    }
}
