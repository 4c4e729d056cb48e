//! AVX2 + FMA + F16C kernels for every weight format.
//!
//! Every function here is a `#[target_feature]` function: it may run only after
//! [`crate::features::cpu_level`] reported [`crate::features::SimdLevel::Avx2`] or above. The
//! parent module checks the matrix and the activation length before calling [`matmul_block`], so
//! the kernels index with unchecked unaligned loads whose bounds follow from the loop limits; each
//! loop states why it stays inside its slices.
//!
//! # Kernels
//! - Decode (one token): one row at a time, four independent accumulators so that the FMA latency
//!   never limits a row; affine rows keep per-group accumulators and apply the group's scale once
//!   (`acc += scale · Σ q·x`), and the loop over a group is unrolled for group sizes 32, 64, 128.
//! - Prefill: tiles of 8 (then 4, 2, 1) tokens; eight weights are decoded (and, for affine,
//!   multiplied by their scale) once into a register and applied to every token of the tile. The
//!   tile's activations are interleaved once per task ([`pack_tile`]) so that the eight tokens'
//!   values for one vector of weights lie side by side, and the columns are walked in blocks of
//!   [`PREFILL_BLOCK_COLS`], so that they stay in L1 while the block passes over all rows of the
//!   task (whose weights stay in L2).
//! - Affine codes are decoded 32 at a time ([`decode32`]): 4-bit codes are widened byte by byte
//!   and split into low and high nibbles (the activations come in [`super::ColumnOrder::NibbleSplit`]
//!   order to match), 8-bit codes are widened directly, and 2/3/5/6-bit codes, which straddle bytes,
//!   go through a byte shuffle, a per-lane variable shift and a mask.
//! - The bias term `Σ_g bias_g · Σ_{i∈g} x_i` is a short dot product over groups per row and token.

use std::arch::x86_64::*;
use std::ops::Range;

use super::{centre_biases, code_centre, scalar::read_float, Activations};
use crate::{FloatKind, Matrix, Weights};

/// Float kinds as const-generic parameters (monomorphised kernels, no per-load branch).
pub(super) const F32: u8 = 0;
pub(super) const F16: u8 = 1;
pub(super) const BF16: u8 = 2;

pub(super) const fn kind_of(k: u8) -> FloatKind {
    match k {
        F32 => FloatKind::F32,
        F16 => FloatKind::F16,
        _ => FloatKind::BF16,
    }
}

/// Columns per prefill block: a tile of 8 tokens of them (16 KiB of activations) stays in L1
/// while it passes over every row of the task.
pub(super) const PREFILL_BLOCK_COLS: usize = 512;

/// Groups per prefill block: about [`PREFILL_BLOCK_COLS`] columns, at least one group.
pub(super) fn prefill_block_groups(group_size: usize) -> usize {
    (PREFILL_BLOCK_COLS / group_size).max(1)
}

/// Rows whose affine scales and biases are widened together in decode.
pub(super) const DECODE_ROW_BATCH: usize = 16;

/// Tokens per prefill tile: the largest of 8, 4, 2, 1 that fits in `left` tokens.
pub(super) fn tile_len(left: usize) -> usize {
    match left {
        8.. => 8,
        4..=7 => 4,
        2..=3 => 2,
        _ => 1,
    }
}

/// Interleaves a tile of `tile` tokens (`xs`: token after token, `cols` values each) in runs of
/// `LANES` columns, `packed[(c / LANES) * tile * LANES + t * LANES + c % LANES] = xs[t * cols + c]`,
/// for the columns of whole runs. A prefill kernel then finds the activations of every token of
/// the tile for one vector of weights side by side, at fixed offsets from one pointer.
pub(super) fn pack_tile<const LANES: usize>(
    xs: &[f32],
    cols: usize,
    tile: usize,
    packed: &mut Vec<f32>,
) {
    let runs = cols / LANES;
    packed.clear();
    packed.reserve(runs * LANES * tile);
    for r in 0..runs {
        for t in 0..tile {
            let start = t * cols + r * LANES;
            packed.extend_from_slice(&xs[start..start + LANES]);
        }
    }
}

/// Computes `out[(o - rows.start) * tokens.len() + (t - tokens.start)]` for the given rows and
/// tokens (see the parent module for the contract).
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C. `m` must have passed [`Matrix::validate`]; `act` must
/// be prepared for `m` (activation order [`super::ColumnOrder::NibbleSplit`] for 4-bit affine,
/// natural otherwise); `rows` must lie in `0..m.rows`, `tokens` in the tokens of `act`, and
/// `out.len() == rows.len() * tokens.len()`.
#[target_feature(enable = "avx2,fma,f16c")]
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
        Weights::Affine { bits: 2, .. } => affine_block::<2>(m, act, rows, tokens, out),
        Weights::Affine { bits: 3, .. } => affine_block::<3>(m, act, rows, tokens, out),
        Weights::Affine { bits: 4, .. } => affine_block::<4>(m, act, rows, tokens, out),
        Weights::Affine { bits: 5, .. } => affine_block::<5>(m, act, rows, tokens, out),
        Weights::Affine { bits: 6, .. } => affine_block::<6>(m, act, rows, tokens, out),
        Weights::Affine { bits: 8, .. } => affine_block::<8>(m, act, rows, tokens, out),
        Weights::Affine { bits, .. } => unreachable!("validated matrix with {bits}-bit codes"),
        Weights::Ggml { format, data } => {
            super::ggml_blocks::avx2::matmul_block(format, data, m.cols, act, rows, tokens, out)
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Float weights

/// Eight weights of kind `K` at `p` as f32.
///
/// # Safety
/// AVX2+FMA+F16C; `p` must be readable for `8 * size` bytes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn load8<const K: u8>(p: *const u8) -> __m256 {
    match K {
        F32 => _mm256_loadu_ps(p.cast()),
        F16 => _mm256_cvtph_ps(_mm_loadu_si128(p.cast())),
        // bf16 is the high half of an f32.
        _ => _mm256_castsi256_ps(_mm256_slli_epi32(
            _mm256_cvtepu16_epi32(_mm_loadu_si128(p.cast())),
            16,
        )),
    }
}

/// Horizontal sum of the eight lanes.
///
/// # Safety
/// AVX2+FMA+F16C.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)))
}

/// # Safety
/// As [`matmul_block`], with `data` the weights of a `[_, cols]` matrix of kind `K`.
#[target_feature(enable = "avx2,fma,f16c")]
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
    if nt == 1 {
        for (y, o) in out.iter_mut().zip(rows) {
            *y = float_dot::<K>(&data[o * row_bytes..(o + 1) * row_bytes], x);
        }
        return;
    }
    out.fill(0.0);
    let mut x_tile = Vec::new();
    let mut t = 0;
    while t < nt {
        let tile = tile_len(nt - t);
        let xs = &x[t * cols..(t + tile) * cols];
        pack_tile::<8>(xs, cols, tile, &mut x_tile);
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

/// `Σ_i w[i]·x[i]` for one row `w` of kind `K` and one token `x`.
///
/// # Safety
/// AVX2+FMA+F16C; `w.len() == x.len() * size_of(K)`.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn float_dot<const K: u8>(w: &[u8], x: &[f32]) -> f32 {
    let size = kind_of(K).size_bytes();
    let n = x.len();
    debug_assert_eq!(w.len(), n * size);
    let (wp, xp) = (w.as_ptr(), x.as_ptr());
    let mut acc = [_mm256_setzero_ps(); 4];
    let mut i = 0;
    // Loads cover [i, i + 32) and [i, i + 8) below, inside both slices by the loop conditions.
    while i + 32 <= n {
        for (k, a) in acc.iter_mut().enumerate() {
            let c = i + 8 * k;
            *a = _mm256_fmadd_ps(load8::<K>(wp.add(c * size)), _mm256_loadu_ps(xp.add(c)), *a);
        }
        i += 32;
    }
    while i + 8 <= n {
        acc[0] = _mm256_fmadd_ps(
            load8::<K>(wp.add(i * size)),
            _mm256_loadu_ps(xp.add(i)),
            acc[0],
        );
        i += 8;
    }
    let mut sum = hsum(_mm256_add_ps(
        _mm256_add_ps(acc[0], acc[1]),
        _mm256_add_ps(acc[2], acc[3]),
    ));
    for j in i..n {
        sum += read_float(kind_of(K), &w[j * size..]) * x[j];
    }
    sum
}

/// [`float_dot`] for `T` tokens at once (`T <= 3`, so that the `4·T` accumulators and one
/// widened weight vector fit in the 16 registers): each weight is loaded and widened once for
/// all of them, and each token's sums are formed in exactly [`float_dot`]'s order, so each
/// result has the bits [`float_dot`] gives that token alone (token-wise decode products,
/// `matmul` module docs).
///
/// # Safety
/// As [`float_dot`], for every `xs[t]`.
#[target_feature(enable = "avx2,fma,f16c")]
#[allow(clippy::needless_range_loop)] // acc[t][k]: two indices, as float_dot's acc[k]
unsafe fn float_dot_tokens<const K: u8, const T: usize>(w: &[u8], xs: [&[f32]; T]) -> [f32; T] {
    let size = kind_of(K).size_bytes();
    let n = w.len() / size;
    debug_assert!(xs.iter().all(|x| x.len() == n));
    let wp = w.as_ptr();
    let mut acc = [[_mm256_setzero_ps(); 4]; T];
    let mut i = 0;
    // Loads cover [i, i + 32) and [i, i + 8) below, inside every slice.
    while i + 32 <= n {
        for k in 0..4 {
            let c = i + 8 * k;
            let wv = load8::<K>(wp.add(c * size));
            for t in 0..T {
                acc[t][k] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(xs[t].as_ptr().add(c)), acc[t][k]);
            }
        }
        i += 32;
    }
    while i + 8 <= n {
        let wv = load8::<K>(wp.add(i * size));
        for t in 0..T {
            acc[t][0] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(xs[t].as_ptr().add(i)), acc[t][0]);
        }
        i += 8;
    }
    let mut out = [0f32; T];
    for t in 0..T {
        let a = acc[t];
        let mut sum = hsum(_mm256_add_ps(
            _mm256_add_ps(a[0], a[1]),
            _mm256_add_ps(a[2], a[3]),
        ));
        for j in i..n {
            sum += read_float(kind_of(K), &w[j * size..]) * xs[t][j];
        }
        out[t] = sum;
    }
    out
}

/// Token-wise decode product of float weights: `out[t * rows.len() + r]` for every token `t` of
/// `xs`, each with the bits of a one-token product ([`float_dot`]), tokens taken in threes and
/// pairs that share each weight load.
///
/// # Safety
/// AVX2+FMA+F16C; `m` validated float weights, every `xs[t].len() == m.cols`, `rows` inside
/// the matrix, `out.len() == xs.len() * rows.len()`.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn float_rows_token_wise(
    m: &Matrix,
    xs: &[&[f32]],
    rows: Range<usize>,
    out: &mut [f32],
) {
    let Weights::Float { kind, data } = m.weights else {
        unreachable!("float_rows_token_wise called with quantized weights")
    };
    match kind {
        FloatKind::F32 => float_rows::<F32>(data, m.cols, xs, rows, out),
        FloatKind::F16 => float_rows::<F16>(data, m.cols, xs, rows, out),
        FloatKind::BF16 => float_rows::<BF16>(data, m.cols, xs, rows, out),
    }
}

/// # Safety
/// As [`float_rows_token_wise`], with `data` the weights of a `[_, cols]` matrix of kind `K`.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn float_rows<const K: u8>(
    data: &[u8],
    cols: usize,
    xs: &[&[f32]],
    rows: Range<usize>,
    out: &mut [f32],
) {
    let row_bytes = cols * kind_of(K).size_bytes();
    let len = rows.len();
    for (r, o) in rows.enumerate() {
        let w = &data[o * row_bytes..(o + 1) * row_bytes];
        let mut t = 0;
        // Threes, then a pair or a single: 4 tokens go as two pairs.
        while xs.len() - t >= 3 && xs.len() - t != 4 {
            let y = float_dot_tokens::<K, 3>(w, [xs[t], xs[t + 1], xs[t + 2]]);
            for (j, v) in y.into_iter().enumerate() {
                out[(t + j) * len + r] = v;
            }
            t += 3;
        }
        while t + 2 <= xs.len() {
            let y = float_dot_tokens::<K, 2>(w, [xs[t], xs[t + 1]]);
            out[t * len + r] = y[0];
            out[(t + 1) * len + r] = y[1];
            t += 2;
        }
        if t < xs.len() {
            out[t * len + r] = float_dot::<K>(w, xs[t]);
        }
    }
}

/// `dst[t] += Σ_{i∈span} w[i]·x[t * cols + i]` for a tile of `T` tokens (`cols = w.len() / size`),
/// reading the activations of whole runs of 8 columns from `packed` ([`pack_tile`]) and those of
/// the last `cols % 8` columns from `xs`.
///
/// # Safety
/// AVX2+FMA+F16C; `span.start` is a multiple of 8, `span.end <= cols`, `xs.len() == T * cols`,
/// `packed` is `xs` packed with 8 lanes, and `dst.len() == T`.
#[target_feature(enable = "avx2,fma,f16c")]
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
    debug_assert!(span.start.is_multiple_of(8) && packed.len() == cols / 8 * 8 * T);
    let (wp, pp) = (w.as_ptr(), packed.as_ptr());
    let mut acc = [_mm256_setzero_ps(); T];
    let mut i = span.start;
    // Weight loads cover [i, i + 8) of the row, activation loads [i * T + 8t, .. + 8) of the
    // packed tile (the run of columns i..i + 8, token t < T): inside both while i + 8 <= cols.
    while i + 8 <= span.end {
        let wv = load8::<K>(wp.add(i * size));
        for (t, a) in acc.iter_mut().enumerate() {
            *a = _mm256_fmadd_ps(wv, _mm256_loadu_ps(pp.add(i * T + 8 * t)), *a);
        }
        i += 8;
    }
    for (d, a) in dst.iter_mut().zip(acc) {
        *d += hsum(a);
    }
    for j in i..span.end {
        let wj = read_float(kind_of(K), &w[j * size..]);
        for (t, d) in dst.iter_mut().enumerate() {
            *d += wj * xs[t * cols + j];
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Affine weights

/// The shuffle and shift tables that extract eight `BITS`-bit codes starting at a byte boundary.
struct Unpack<const BITS: usize>;

impl<const BITS: usize> Unpack<BITS> {
    /// For the two runs of eight codes in 16 broadcast bytes (at byte 0 and at byte `BITS`): dword
    /// `j` receives the one or two bytes that hold code `j` of the run.
    const SHUFFLE: [[u8; 32]; 2] = [shuffle_table(BITS, 0), shuffle_table(BITS, 1)];
    /// Dword `j` shifts right by the bit offset of code `j` within its first byte.
    const SHIFT: [u32; 8] = shift_table(BITS);
}

const fn shuffle_table(bits: usize, run: usize) -> [u8; 32] {
    let mut table = [0x80u8; 32]; // high bit set: the byte becomes zero
    let mut j = 0;
    while j < 8 {
        let first = run * bits + j * bits / 8;
        // Both 128-bit lanes hold the same 16 bytes; dwords 0..4 live in lane 0, 4..8 in lane 1.
        let at = (j / 4) * 16 + (j % 4) * 4;
        table[at] = first as u8;
        if (j * bits) % 8 + bits > 8 {
            table[at + 1] = (first + 1) as u8;
        }
        j += 1;
    }
    table
}

const fn shift_table(bits: usize) -> [u32; 8] {
    let mut table = [0u32; 8];
    let mut j = 0;
    while j < 8 {
        table[j] = ((j * bits) % 8) as u32;
        j += 1;
    }
    table
}

/// The 32 codes that start at byte `at` of `packed`, centred (`q − 2^(BITS−1)`, parent module
/// docs), as f32, in four vectors of eight. For 4-bit
/// codes the vectors hold the low nibbles of bytes 0..8 and 8..16, then the high nibbles of the
/// same bytes ([`super::ColumnOrder::NibbleSplit`]); otherwise codes 0..8, 8..16, 16..24, 24..32.
///
/// # Safety
/// AVX2+FMA+F16C; `at + 4 * BITS <= packed.len()`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn decode32<const BITS: usize>(packed: &[u8], at: usize) -> [__m256; 4] {
    debug_assert!(at + 4 * BITS <= packed.len());
    let centre = _mm256_set1_epi32(code_centre(BITS));
    match BITS {
        4 => {
            let p = packed.as_ptr().add(at);
            // Reads bytes [at, at + 16): the block's 16 bytes.
            let v0 = _mm256_cvtepu8_epi32(_mm_loadl_epi64(p.cast()));
            let v1 = _mm256_cvtepu8_epi32(_mm_loadl_epi64(p.add(8).cast()));
            let low = _mm256_set1_epi32(0x0f);
            [
                _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_and_si256(v0, low), centre)),
                _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_and_si256(v1, low), centre)),
                _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_srli_epi32(v0, 4), centre)),
                _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_srli_epi32(v1, 4), centre)),
            ]
        }
        8 => {
            let p = packed.as_ptr().add(at);
            // Reads bytes [at, at + 32): the block's 32 bytes.
            let mut codes = [_mm256_setzero_ps(); 4];
            for (k, c) in codes.iter_mut().enumerate() {
                let v = _mm256_cvtepu8_epi32(_mm_loadl_epi64(p.add(8 * k).cast()));
                *c = _mm256_cvtepi32_ps(_mm256_sub_epi32(v, centre));
            }
            codes
        }
        _ => {
            // Each half of the block (16 codes, 2·BITS bytes) is read with a 16-byte load, which
            // may run past the block. Within the slice that is harmless; in the last 32 bytes of
            // the slice the block is copied to a zero-padded buffer first.
            let mut spare = [0u8; 32];
            let p = if at + 32 <= packed.len() {
                packed.as_ptr().add(at)
            } else {
                spare[..4 * BITS].copy_from_slice(&packed[at..at + 4 * BITS]);
                spare.as_ptr()
            };
            let shuffle = Unpack::<BITS>::SHUFFLE;
            let shift = _mm256_loadu_si256(Unpack::<BITS>::SHIFT.as_ptr().cast());
            let mask = _mm256_set1_epi32((1 << BITS) - 1);
            let mut codes = [_mm256_setzero_ps(); 4];
            for half in 0..2 {
                // Reads [p + 2·BITS·half, .. + 16) ⊂ [p, p + 28): inside the slice or `spare`.
                let bytes =
                    _mm256_broadcastsi128_si256(_mm_loadu_si128(p.add(2 * BITS * half).cast()));
                for (run, table) in shuffle.iter().enumerate() {
                    let gathered =
                        _mm256_shuffle_epi8(bytes, _mm256_loadu_si256(table.as_ptr().cast()));
                    let code = _mm256_and_si256(_mm256_srlv_epi32(gathered, shift), mask);
                    codes[2 * half + run] = _mm256_cvtepi32_ps(_mm256_sub_epi32(code, centre));
                }
            }
            codes
        }
    }
}

/// Widens `src` (`dst.len()` numbers of kind `kind`) into `dst`.
///
/// # Safety
/// AVX2+FMA+F16C; `src.len() == dst.len() * kind.size_bytes()`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn widen_floats(kind: FloatKind, src: &[u8], dst: &mut [f32]) {
    match kind {
        FloatKind::F32 => widen::<F32>(src, dst),
        FloatKind::F16 => widen::<F16>(src, dst),
        FloatKind::BF16 => widen::<BF16>(src, dst),
    }
}

/// # Safety
/// As [`widen_floats`].
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn widen<const K: u8>(src: &[u8], dst: &mut [f32]) {
    let size = kind_of(K).size_bytes();
    let n = dst.len();
    debug_assert_eq!(src.len(), n * size);
    let mut i = 0;
    // Reads [i, i + 8) numbers of `src`, writes [i, i + 8) of `dst`: inside both while i + 8 <= n.
    while i + 8 <= n {
        _mm256_storeu_ps(
            dst.as_mut_ptr().add(i),
            load8::<K>(src.as_ptr().add(i * size)),
        );
        i += 8;
    }
    for j in i..n {
        dst[j] = read_float(kind_of(K), &src[j * size..]);
    }
}

/// `Σ_i a[i]·b[i]` over `a.len()` values.
///
/// # Safety
/// AVX2+FMA+F16C; `a.len() == b.len()`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn dot(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len();
    debug_assert_eq!(n, b.len());
    let mut acc = _mm256_setzero_ps();
    let mut i = 0;
    // Reads [i, i + 8) of both slices while i + 8 <= n.
    while i + 8 <= n {
        acc = _mm256_fmadd_ps(
            _mm256_loadu_ps(a.as_ptr().add(i)),
            _mm256_loadu_ps(b.as_ptr().add(i)),
            acc,
        );
        i += 8;
    }
    let mut sum = hsum(acc);
    for j in i..n {
        sum += a[j] * b[j];
    }
    sum
}

/// One row of an affine matrix, with its scales widened to f32.
pub(super) struct AffineRow<'a> {
    /// The whole packed slice (the generic decoder needs to know where it ends).
    pub packed: &'a [u8],
    /// Byte offset of the row in `packed`.
    pub start: usize,
    pub cols: usize,
    pub group_size: usize,
    pub scales: &'a [f32],
}

/// # Safety
/// As [`matmul_block`], with an affine `m` of `BITS`-bit codes.
#[target_feature(enable = "avx2,fma,f16c")]
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

    // Prefill: the block's scales and biases once, the bias terms first, then tiles of tokens
    // over blocks of columns small enough for the tile's activations to stay in L1.
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
        pack_tile::<8>(&x[t * cols..(t + tile) * cols], cols, tile, &mut x_tile);
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

/// `Σ_g (scale_g · Σ_{i∈g} q_i·x_i + bias_g · sums_g)` for one row and one token, `sums` being
/// the token's group sums. `GROUP_BLOCKS` is the group size in 32-code blocks when known at
/// compile time (1, 2, 4), so that the loop over a group unrolls; 0 reads it from `row`.
///
/// # Safety
/// AVX2+FMA+F16C; `row` lies inside its packed slice (`start + cols * BITS / 8 <= packed.len()`),
/// `group_size` is a multiple of 32 dividing `cols` (and equal to `32 * GROUP_BLOCKS` unless that
/// is 0), `row.scales`, `biases` and `sums` hold `cols / group_size` values, and `x.len() == cols`
/// in the order [`decode32`] produces.
#[target_feature(enable = "avx2,fma,f16c")]
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
    let mut acc = _mm256_setzero_ps();
    let mut bias_term = 0f32;
    for ((scale, bias), sum) in row.scales.iter().zip(biases).zip(sums) {
        bias_term += bias * sum;
        let mut part = [_mm256_setzero_ps(); 4];
        for _ in 0..blocks {
            let codes = decode32::<BITS>(row.packed, at);
            for (k, p) in part.iter_mut().enumerate() {
                // Reads x[c + 8k, c + 8k + 8) for the block's first column c, c + 32 <= cols.
                *p = _mm256_fmadd_ps(codes[k], _mm256_loadu_ps(xp.add(8 * k)), *p);
            }
            at += 4 * BITS;
            xp = xp.add(32);
        }
        let part = _mm256_add_ps(
            _mm256_add_ps(part[0], part[1]),
            _mm256_add_ps(part[2], part[3]),
        );
        acc = _mm256_fmadd_ps(_mm256_set1_ps(*scale), part, acc);
    }
    hsum(acc) + bias_term
}

/// `dst[t] += Σ_{g∈groups} scale_g · Σ_{i∈g} q_i·x[t * cols + i]` for a tile of `T` tokens:
/// each block of codes is decoded and scaled once, then applied to every token.
///
/// The activations come packed in runs of 8 columns ([`pack_tile`]).
///
/// # Safety
/// As [`affine_dot`], with `groups.end <= row.scales.len()`, `packed.len() == T * cols` and
/// `dst.len() == T`.
#[target_feature(enable = "avx2,fma,f16c")]
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
    let mut acc = [_mm256_setzero_ps(); T];
    for (g, scale) in row.scales[groups.clone()].iter().enumerate() {
        let scale = _mm256_set1_ps(*scale);
        let g = groups.start + g;
        for c0 in (g * row.group_size..(g + 1) * row.group_size).step_by(32) {
            let codes = decode32::<BITS>(row.packed, row.start + c0 * BITS / 8);
            for (k, code) in codes.iter().enumerate() {
                let w = _mm256_mul_ps(*code, scale);
                for (t, a) in acc.iter_mut().enumerate() {
                    // Reads the run of columns c0 + 8k.. of token t < T: packed[(c0 + 8k) * T
                    // + 8t, .. + 8) with c0 + 32 <= cols.
                    *a = _mm256_fmadd_ps(w, _mm256_loadu_ps(pp.add((c0 + 8 * k) * T + 8 * t)), *a);
                }
            }
        }
    }
    for (d, a) in dst.iter_mut().zip(acc) {
        *d += hsum(a);
    }
}
