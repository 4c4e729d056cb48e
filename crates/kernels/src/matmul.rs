//! Matrix products `y = W·x` over every weight format, with dequantization fused into the product.
//!
//! # Structure
//! - this file: argument checks, activation preparation ([`Activations`]), the split of the work
//!   into rayon tasks, and the choice of backend ([`Backend`]);
//! - [`scalar`]: the portable reference twin of every kernel;
//! - `avx2` (AVX2+FMA+F16C, every format) and `avx512` (AVX-512F/BW: float formats and 4-/8-bit
//!   affine; other formats use `avx2` on such CPUs), chosen at run time;
//! - [`int16`]: decode products of affine weights with int16 activations, its scalar twin and its
//!   AVX2 and AVX-512 kernels (see "Activation precision");
//! - `ggml_blocks`: llama.cpp block formats, f32 activations (decode each row, then FMAs); in
//!   `ggml_blocks/int16`, int16 decode products (integer dot products per 32 columns); in
//!   `ggml_blocks/int8`, int8 products of any token count (llama.cpp's method).
//!
//! # Activation precision
//! A decode product (one token) with affine weights rounds the activation row to int16, with one
//! step per span of 32 to 128 columns, and multiplies the integer codes with the integer
//! activations, exactly, in i32 ([`ActivationPrecision::Int16`]; the method and its error bound
//! are in [`int16`]); with llama.cpp blocks likewise, with spans of 32 columns
//! (`ggml_blocks/int16.rs`). The block formats with an int8 kernel (Q4_K, Q5_K, Q6_K, Q8_0, Q4_0)
//! go further at [`ActivationPrecision::Int8`], the default: every token's row is rounded to int8
//! per 32 columns and multiplied as llama.cpp does, in decode and in prefill
//! (`ggml_blocks/int8.rs`); its kernels give each token the bits of its one-token product
//! whatever the tokens beside it, which is what makes it usable in a prefill. Prefill of other
//! weights, float weights, and every product when `MOESTREAM_EXACT_MATMUL=1`
//! ([`activation_precision`], read once) use f32 activations, as do [`matmul_scalar`] and
//! [`matmul_with_precision`] with [`ActivationPrecision::F32`]. "One token" means the forward
//! pass, not the product: model code calls [`matmul_at`] with [`ProductMode::for_pass`], so a
//! one-row product inside a prefill (an expert one token chose, the last-token logits) stays f32
//! (or int8, with the bits of that token's decode product) and a prompt's log-probabilities do
//! not depend on its routing.
//!
//! # Token-wise decode products
//! [`ProductMode::Decode`] over several tokens (speculative verification) computes every token
//! with the one-token kernels, so each token's result has the same bits as if it had been alone:
//! every one-token kernel computes each row on its own, whatever block of rows it was given (the
//! int8 block kernels take several tokens per pass over a row, each with its own bits).
//! The rows are cut into blocks of [`TOKENWISE_BLOCK_BYTES`] of weights and every token passes
//! over a block while it is in L2, so the weights are read from memory once per pass, not once
//! per token.
//!
//! What int16 costs end to end: on the small random reference models (logits up to ~18), decode
//! log-probabilities move by up to ~1.5e-3 from the f32 ones (mean ~2.5e-4), against ~1e-5 for
//! f32 activations; greedy tokens stay the same. The activation rounding is 2^-15 of each
//! group's largest value, far finer than the bf16 activations (2^-8) other engines decode with.
//!
//! Measured error, `|y_int16 − y_f32| / Σ_i |W[o,i]·x_i|` over rows of 2048 columns, every bit
//! width, group sizes 32/64/128 (the tests in `int16/tests.rs`, worst of 16 runs): 2.3e-6 for
//! activations without outliers, 5.3e-5 with 4 or 32 activations 50 times larger than the rest
//! (tested bound 1e-4). The error is relative to the largest activation of each group, so it
//! grows where a group holds an outlier.
//!
//! Measured speed (`examples/matmul_speed.rs`, AVX2 on a shared 2-core Zen 3 VM, gs64 with bf16
//! scales, weights streamed from memory, three runs): 4-bit decode 1.40 to 1.56 times as fast as
//! with f32 activations on one thread (58-74% of the measured memory bandwidth) and 1.36 to 1.42
//! times on two threads for the lm_head (65-84%); 8-bit 1.05 to 1.19 times (68-95%).
//!
//! # Invariants the backends rely on
//! - The matrix passed [`Matrix::validate`] and `x` holds `n_tokens * cols` values: checked on every
//!   call (O(1)) before any backend runs, because the SIMD backends use unchecked loads.
//! - A backend computes a block of rows × tokens into a task-local buffer,
//!   `out[(o - rows.start) * tokens.len() + (t - tokens.start)]`; this file scatters it into `y`.
//! - Affine products with f32 activations use codes centred on `c = 2^(bits-1)`:
//!   `y = Σ_g (scale_g · Σ_{i∈g} (q_i − c)·x_i + (bias_g + c·scale_g) · Σ_{i∈g} x_i)`
//!   ([`centre_biases`]). With raw codes (all ≥ 0) the two terms are large and cancel, which
//!   tripled the f32 rounding error (measured: a quantized reference fixture 1.5e-4 off, 4e-5
//!   through dequantized weights). The per-group sums of x are computed once per call, here,
//!   and shared by all rows.
//! - A SIMD backend may want x reordered within each 32-column block to match the order in which
//!   it unpacks codes ([`ColumnOrder`]); the reordered copy is made once per call, here (for the
//!   int16 path: the quantized row, in [`int16::ValueOrder`]).
//! - Weight bytes come from memory maps at arbitrary offsets: every load is unaligned.
//!
//! # Threads
//! Decode (one token) splits the rows into tasks of at most a few MiB of weights; prefill splits
//! them into tasks of ~128 KiB of weights, so that a task's rows stay in L2 while every tile of
//! tokens passes over them, and also splits the tokens when there are too few row tasks. Products
//! smaller than [`SERIAL_WORK_BYTES`] run on the calling thread. Calling from inside a rayon
//! parallel iterator (experts in parallel) is fine: the tasks join the same pool.

// The SIMD backends are mostly `unsafe`: make clippy hold every block and function to its
// `SAFETY:` comment or `# Safety` section.
#![warn(clippy::undocumented_unsafe_blocks, clippy::missing_safety_doc)]

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
mod ggml_blocks;
mod int16;
mod scalar;
#[cfg(test)]
mod tests;

use std::borrow::Cow;
use std::ops::Range;

use rayon::prelude::*;

use crate::features::{
    activation_precision, cpu_level, simd_level, ActivationPrecision, ProductMode, SimdLevel,
};
use crate::{Matrix, Weights};

/// Below this many bytes of weight traffic (matrix bytes × tokens) a product runs on the calling
/// thread: a rayon fork/join costs a few microseconds, about the time of a 64 KiB matvec.
const SERIAL_WORK_BYTES: usize = 256 << 10;
/// Decode task size bounds: large enough to amortise scheduling, small enough to balance.
const DECODE_MIN_TASK_BYTES: usize = 64 << 10;
const DECODE_MAX_TASK_BYTES: usize = 2 << 20;
/// Weight bytes per prefill task: fits in L2 next to a tile of activations.
const PREFILL_TASK_BYTES: usize = 128 << 10;
/// Weight bytes per block of a token-wise decode product: all the pass's tokens go over a block
/// while it stays in L2.
const TOKENWISE_BLOCK_BYTES: usize = 64 << 10;

/// `y[t * rows + o] = Σ_i W[o, i] · x[t * cols + i]` for `t in 0..n_tokens`, with the best SIMD
/// path ([`simd_level`]) and the activation precision of [`activation_precision`]: by default a
/// decode product (one token) with affine weights rounds x to int16 (module docs); everything
/// else uses f32 activations. Accumulation is f32.
///
/// # Panics
/// If `m` fails [`Matrix::validate`], `x.len() != n_tokens * m.cols` or
/// `y.len() != n_tokens * m.rows`.
pub fn matmul(m: &Matrix, x: &[f32], n_tokens: usize, y: &mut [f32]) {
    matmul_with(simd_level(), m, x, n_tokens, y)
}

/// [`matmul`] with the best SIMD path in an explicit [`ProductMode`] (model code passes
/// [`ProductMode::for_pass`], or [`ProductMode::Decode`] for a pass whose tokens must come out
/// as if decoded one by one).
///
/// # Panics
/// As [`matmul`].
pub fn matmul_at(mode: ProductMode, m: &Matrix, x: &[f32], n_tokens: usize, y: &mut [f32]) {
    matmul_in_mode(simd_level(), mode, m, x, n_tokens, y)
}

/// [`matmul_at`] with an explicit SIMD level.
///
/// # Panics
/// As [`matmul`].
pub fn matmul_in_mode(
    level: SimdLevel,
    mode: ProductMode,
    m: &Matrix,
    x: &[f32],
    n_tokens: usize,
    y: &mut [f32],
) {
    match mode {
        ProductMode::Prefill(p) => {
            // Only the int8 block kernels give a token the bits of its decode product in a
            // prefill; everything else stays f32 there (module docs).
            let p = if p == ActivationPrecision::Int8 && has_int8_kernel(m) {
                ActivationPrecision::Int8
            } else {
                ActivationPrecision::F32
            };
            matmul_with_precision(level, p, m, x, n_tokens, y)
        }
        ProductMode::Decode(p) if n_tokens <= 1 => {
            matmul_with_precision(level, p, m, x, n_tokens, y)
        }
        ProductMode::Decode(p) => matmul_token_wise(level, p, m, x, n_tokens, y),
    }
}

/// Every token as a one-token product at precision `precision` (module docs, "Token-wise
/// decode products").
fn matmul_token_wise(
    level: SimdLevel,
    precision: ActivationPrecision,
    m: &Matrix,
    x: &[f32],
    n_tokens: usize,
    y: &mut [f32],
) {
    check_arguments(m, x, n_tokens, y);
    let (rows, cols) = (m.rows, m.cols);
    if n_tokens == 0 || rows == 0 {
        return;
    }
    if cols == 0 {
        y.fill(0.0);
        return;
    }
    let backend = Backend::select(level, m);
    let int8 = precision == ActivationPrecision::Int8 && has_int8_kernel(m);
    let int16 = (!int8 && precision != ActivationPrecision::F32 && has_int16_kernel(m))
        .then(|| int16::ValueOrder::of(backend, m));
    let acts: Vec<Activations> = x
        .chunks_exact(cols)
        .map(|xt| Activations::new(m, xt, 1, backend.column_order(m), int16, int8))
        .collect();
    let bytes = m.size_bytes();
    let block_rows = (TOKENWISE_BLOCK_BYTES / (bytes / rows).max(1)).clamp(1, rows);
    let blocks = rows.div_ceil(block_rows);
    let block = |b: usize| {
        let r = b * block_rows..((b + 1) * block_rows).min(rows);
        let mut out = vec![0f32; r.len() * n_tokens];
        if !backend.run_token_wise(m, &acts, r.clone(), &mut out) {
            for (act, o) in acts.iter().zip(out.chunks_exact_mut(r.len())) {
                backend.run(m, act, r.clone(), 0..1, o);
            }
        }
        out
    };
    let parallel = rayon::current_num_threads() > 1
        && blocks > 1
        && bytes.saturating_mul(n_tokens) >= SERIAL_WORK_BYTES;
    let outs: Vec<Vec<f32>> = if parallel {
        (0..blocks).into_par_iter().map(block).collect()
    } else {
        (0..blocks).map(block).collect()
    };
    for (b, out) in outs.iter().enumerate() {
        let r0 = b * block_rows;
        let len = out.len() / n_tokens;
        for (t, o) in out.chunks_exact(len).enumerate() {
            y[t * rows + r0..t * rows + r0 + len].copy_from_slice(o);
        }
    }
}

/// [`matmul`] with the portable scalar path and f32 activations, whatever
/// [`activation_precision`] says: the reference every SIMD path is tested against.
///
/// # Panics
/// As [`matmul`].
pub fn matmul_scalar(m: &Matrix, x: &[f32], n_tokens: usize, y: &mut [f32]) {
    matmul_with_precision(
        SimdLevel::Scalar,
        ActivationPrecision::F32,
        m,
        x,
        n_tokens,
        y,
    )
}

/// [`matmul`] with an explicit SIMD level. A level above what the CPU supports falls back to the
/// best one it does support; a format without a kernel at `level` uses the next level down.
///
/// # Panics
/// As [`matmul`].
pub fn matmul_with(level: SimdLevel, m: &Matrix, x: &[f32], n_tokens: usize, y: &mut [f32]) {
    matmul_with_precision(level, activation_precision(), m, x, n_tokens, y)
}

/// [`matmul_with`] with an explicit activation precision. [`ActivationPrecision::Int16`] applies
/// to decode products (`n_tokens == 1`) with affine weights and block formats, at every level
/// (the scalar level runs the int16 kernels' scalar twin); [`ActivationPrecision::Int8`] to
/// products of any token count with the block formats that have an int8 kernel, and as
/// [`ActivationPrecision::Int16`] to other quantized weights; other products use f32
/// activations.
///
/// # Panics
/// As [`matmul`].
pub fn matmul_with_precision(
    level: SimdLevel,
    precision: ActivationPrecision,
    m: &Matrix,
    x: &[f32],
    n_tokens: usize,
    y: &mut [f32],
) {
    check_arguments(m, x, n_tokens, y);
    if n_tokens == 0 || m.rows == 0 {
        return;
    }
    if m.cols == 0 {
        y.fill(0.0);
        return;
    }
    let backend = Backend::select(level, m);
    let int8 = precision == ActivationPrecision::Int8 && has_int8_kernel(m);
    let int16 =
        (!int8 && precision != ActivationPrecision::F32 && n_tokens == 1 && has_int16_kernel(m))
            .then(|| int16::ValueOrder::of(backend, m));
    let act = Activations::new(m, x, n_tokens, backend.column_order(m), int16, int8);
    run_tasks(m, n_tokens, y, &|rows, tokens, out| {
        backend.run(m, &act, rows, tokens, out)
    });
}

/// Whether decode products of `m` have an int16 kernel: affine weights and llama.cpp blocks.
fn has_int16_kernel(m: &Matrix) -> bool {
    matches!(m.weights, Weights::Affine { .. } | Weights::Ggml { .. })
}

/// Whether products of `m` have an int8 kernel: the block formats of
/// [`ggml_blocks::int8::supports`].
fn has_int8_kernel(m: &Matrix) -> bool {
    matches!(m.weights, Weights::Ggml { format, .. } if ggml_blocks::int8::supports(format))
}

/// The value `bits`-bit affine codes are centred on in the f32 kernels (module docs).
pub(crate) const fn code_centre(bits: usize) -> i32 {
    1 << (bits - 1)
}

/// Turns widened biases into those of centred codes: `bias += centre · scale`.
pub(crate) fn centre_biases(bits: usize, scales: &[f32], biases: &mut [f32]) {
    let c = code_centre(bits) as f32;
    for (b, s) in biases.iter_mut().zip(scales) {
        *b += c * s;
    }
}

/// Writes row `row` of `m` as f32 into `out`; used for embedding lookups.
///
/// # Panics
/// If `m` fails [`Matrix::validate`], `row >= m.rows` or `out.len() != m.cols`.
pub fn dequantize_row(m: &Matrix, row: usize, out: &mut [f32]) {
    if let Err(e) = m.validate() {
        panic!("dequantize_row: {e}");
    }
    assert!(
        row < m.rows,
        "dequantize_row: row {row} of a {}-row matrix",
        m.rows
    );
    assert_eq!(
        out.len(),
        m.cols,
        "dequantize_row: output length vs columns"
    );
    scalar::dequantize_row(m, row, out);
}

fn check_arguments(m: &Matrix, x: &[f32], n_tokens: usize, y: &[f32]) {
    if let Err(e) = m.validate() {
        panic!("matmul: {e}");
    }
    let x_len = n_tokens.checked_mul(m.cols);
    let y_len = n_tokens.checked_mul(m.rows);
    assert!(
        x_len == Some(x.len()),
        "matmul: x holds {} values, {n_tokens} tokens of {} columns need {x_len:?}",
        x.len(),
        m.cols
    );
    assert!(
        y_len == Some(y.len()),
        "matmul: y holds {} values, {n_tokens} tokens of {} rows need {y_len:?}",
        y.len(),
        m.rows
    );
}

/// The implementation a product runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Backend {
    Scalar,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    #[cfg(target_arch = "x86_64")]
    Avx512,
}

impl Backend {
    /// The best backend at or below `level` that this CPU runs and that has a kernel for `m`.
    fn select(level: SimdLevel, m: &Matrix) -> Backend {
        match level.min(cpu_level()) {
            SimdLevel::Scalar => Backend::Scalar,
            #[cfg(target_arch = "x86_64")]
            SimdLevel::Avx512 if avx512::supports(m) => Backend::Avx512,
            #[cfg(target_arch = "x86_64")]
            SimdLevel::Avx2 | SimdLevel::Avx512 => Backend::Avx2,
            #[cfg(not(target_arch = "x86_64"))]
            _ => {
                let _ = m;
                Backend::Scalar
            }
        }
    }

    fn column_order(self, m: &Matrix) -> ColumnOrder {
        match (self, m.weights) {
            (Backend::Scalar, _) => ColumnOrder::Natural,
            (_, Weights::Affine { bits: 4, .. }) => ColumnOrder::NibbleSplit,
            _ => ColumnOrder::Natural,
        }
    }

    /// A token-wise decode product of rows `rows` for every token of `acts` (one-token
    /// activations each) into `out[t * rows.len() + r]`, by a kernel that shares weight loads
    /// between tokens while giving each token the bits of [`Backend::run`] alone. `false` where
    /// no such kernel exists (the caller runs the tokens one by one).
    fn run_token_wise(
        self,
        m: &Matrix,
        acts: &[Activations],
        rows: Range<usize>,
        out: &mut [f32],
    ) -> bool {
        debug_assert_eq!(out.len(), rows.len() * acts.len());
        if let (Weights::Ggml { format, data }, Some(first)) = (m.weights, acts.first()) {
            if !first.int8.is_empty() {
                // The int8 kernels give every token the bits of its one-token product; they
                // write token after token within each row, `out` wants row after row per token.
                let xs: Vec<&ggml_blocks::int8::Int8Row> =
                    acts.iter().map(|a| &a.int8[0]).collect();
                let mut by_row = vec![0f32; out.len()];
                self.run_int8(format, data, m.cols, &xs, rows.clone(), &mut by_row);
                let nt = acts.len();
                for (t, o) in out.chunks_exact_mut(rows.len()).enumerate() {
                    for (r, v) in o.iter_mut().enumerate() {
                        *v = by_row[r * nt + t];
                    }
                }
                return true;
            }
        }
        match (self, m.weights) {
            #[cfg(target_arch = "x86_64")]
            (Backend::Avx2, Weights::Float { .. }) => {
                let xs: Vec<&[f32]> = acts.iter().map(|a| a.tokens(0..1)).collect();
                // SAFETY: as for `run` (Avx2 only on an AVX2+FMA+F16C CPU, validated matrix,
                // rows inside it); each activation holds one token of `m.cols` values.
                unsafe { avx2::float_rows_token_wise(m, &xs, rows, out) };
                true
            }
            _ => false,
        }
    }

    /// The int8 block product of `rows` for the quantized tokens `xs`, into
    /// `out[(o - rows.start) * xs.len() + t]`.
    fn run_int8(
        self,
        format: crate::ggml::BlockFormat,
        data: &[u8],
        cols: usize,
        xs: &[&ggml_blocks::int8::Int8Row],
        rows: Range<usize>,
        out: &mut [f32],
    ) {
        match self {
            Backend::Scalar => ggml_blocks::int8::matmul_block(format, data, cols, xs, rows, out),
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `select` returns Avx2 or Avx512 only on an AVX2+FMA+F16C CPU; the matrix
            // was validated, `rows` lies inside it, and `Activations::new` quantized every token
            // from `cols` values for `format`, which has an int8 kernel (`has_int8_kernel`).
            Backend::Avx2 | Backend::Avx512 => unsafe {
                if crate::features::avx512_vnni() {
                    // The same bits with `vpdpbusd` (AVX-512 VNNI + VL, checked).
                    ggml_blocks::int8::avx2::vnni::matmul_block(format, data, cols, xs, rows, out)
                } else {
                    ggml_blocks::int8::avx2::matmul_block(format, data, cols, xs, rows, out)
                }
            },
        }
    }

    fn run(
        self,
        m: &Matrix,
        act: &Activations,
        rows: Range<usize>,
        tokens: Range<usize>,
        out: &mut [f32],
    ) {
        debug_assert_eq!(out.len(), rows.len() * tokens.len());
        if let (Weights::Ggml { format, data }, false) = (m.weights, act.int8.is_empty()) {
            let xs: Vec<&ggml_blocks::int8::Int8Row> = act.int8[tokens].iter().collect();
            self.run_int8(format, data, m.cols, &xs, rows, out);
            return;
        }
        if let Some(xq) = &act.int16 {
            debug_assert_eq!(tokens, 0..1);
            let sums = act.group_sums(0..1);
            if let Weights::Ggml { format, data } = m.weights {
                let cols = m.cols;
                match self {
                    Backend::Scalar => {
                        ggml_blocks::int16::matvec_block(format, data, cols, xq, sums, rows, out)
                    }
                    #[cfg(target_arch = "x86_64")]
                    // SAFETY: as for the f32 kernels below (`select` never returns Avx512 for
                    // block weights); `Activations::new` quantized the single token's row with
                    // `quantize_activations` and, for formats with minimums, its span sums.
                    Backend::Avx2 | Backend::Avx512 => unsafe {
                        ggml_blocks::int16::avx2::matvec_block(
                            format, data, cols, xq, sums, rows, out,
                        )
                    },
                }
                return;
            }
            match self {
                Backend::Scalar => int16::matvec_block(m, xq, sums, rows, out),
                #[cfg(target_arch = "x86_64")]
                // SAFETY: as for the f32 kernels below; `Activations::new` quantized the single
                // token's row for `m` in this backend's column order.
                Backend::Avx2 => unsafe { int16::avx2::matvec_block(m, xq, sums, rows, out) },
                #[cfg(target_arch = "x86_64")]
                // SAFETY: as for Avx2, and `select` returns Avx512 only for 4-/8-bit affine
                // weights (`avx512::supports`) on a CPU with AVX-512F/BW.
                Backend::Avx512 => unsafe { int16::avx512::matvec_block(m, xq, sums, rows, out) },
            }
            return;
        }
        match self {
            Backend::Scalar => scalar::matmul_block(m, act, rows, tokens, out),
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `select` returns Avx2 only when `cpu_level()` reports AVX2+FMA+F16C (Avx512
            // implies them); `matmul_with` checked the matrix and the activation length, and
            // `run_tasks` passes row and token ranges inside the matrix and the call.
            Backend::Avx2 => unsafe { avx2::matmul_block(m, act, rows, tokens, out) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `select` returns Avx512 only when `cpu_level()` reports AVX-512F/BW plus the
            // AVX2 set and `avx512::supports(m)`; arguments checked as for Avx2.
            Backend::Avx512 => unsafe { avx512::matmul_block(m, act, rows, tokens, out) },
        }
    }
}

/// Order of the columns of the prepared activations within each 32-column block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ColumnOrder {
    /// As given.
    Natural,
    /// Even columns, then odd columns: 4-bit codes come out of a byte as (low, high) nibble pairs,
    /// and the SIMD kernels unpack all low nibbles of a block, then all high nibbles.
    NibbleSplit,
}

/// The activations of one call, prepared once and shared by every task.
struct Activations<'a> {
    /// `n_tokens × cols` values, columns in the backend's [`ColumnOrder`] (in natural order, and
    /// unused, when `int16` is set).
    x: Cow<'a, [f32]>,
    cols: usize,
    /// `n_tokens × groups` sums of x over each quantization group (affine weights only).
    group_sums: Vec<f32>,
    groups: usize,
    /// The single token's row rounded to int16, in the backend's order, when the call is an
    /// int16 decode product.
    int16: Option<int16::QuantizedRow>,
    /// Every token's row rounded to int8 when the call is an int8 block product; else empty.
    int8: Vec<ggml_blocks::int8::Int8Row>,
}

impl<'a> Activations<'a> {
    fn new(
        m: &Matrix,
        x: &'a [f32],
        n_tokens: usize,
        order: ColumnOrder,
        int16: Option<int16::ValueOrder>,
        int8: bool,
    ) -> Self {
        let cols = m.cols;
        if let (Weights::Ggml { format, .. }, true) = (m.weights, int8) {
            return Activations {
                x: Cow::Borrowed(x),
                cols,
                group_sums: Vec::new(),
                groups: 0,
                int16: None,
                int8: x
                    .chunks_exact(cols)
                    .map(|xt| ggml_blocks::int8::Int8Row::new(xt, format))
                    .collect(),
            };
        }
        let (group_sums, groups) = match m.weights {
            Weights::Affine { group_size, .. } => {
                let sums: Vec<f32> = x.chunks_exact(group_size).map(scalar::sum).collect();
                debug_assert_eq!(sums.len(), n_tokens * (cols / group_size));
                (sums, cols / group_size)
            }
            Weights::Ggml { format, .. }
                if int16.is_some() && ggml_blocks::int16::has_mins(format) =>
            {
                let span = ggml_blocks::int16::SPAN;
                (x.chunks_exact(span).map(scalar::sum).collect(), cols / span)
            }
            Weights::Float { .. } | Weights::Ggml { .. } => (Vec::new(), 0),
        };
        let int16 = match (m.weights, int16) {
            (
                Weights::Affine {
                    bits, group_size, ..
                },
                Some(int16_order),
            ) => {
                debug_assert_eq!(n_tokens, 1);
                Some(int16::QuantizedRow::new(x, bits, group_size, int16_order))
            }
            (Weights::Ggml { format, .. }, Some(_)) => {
                debug_assert_eq!(n_tokens, 1);
                Some(ggml_blocks::int16::quantize_activations(x, format))
            }
            _ => None,
        };
        let x = match order {
            _ if int16.is_some() => Cow::Borrowed(x),
            ColumnOrder::Natural => Cow::Borrowed(x),
            ColumnOrder::NibbleSplit => {
                // Affine column counts are multiples of 32 (validated), so blocks never straddle tokens.
                let mut split = vec![0f32; x.len()];
                for (dst, src) in split.chunks_exact_mut(32).zip(x.chunks_exact(32)) {
                    for p in 0..16 {
                        dst[p] = src[2 * p];
                        dst[16 + p] = src[2 * p + 1];
                    }
                }
                Cow::Owned(split)
            }
        };
        Activations {
            x,
            cols,
            group_sums,
            groups,
            int16,
            int8: Vec::new(),
        }
    }

    /// The prepared values of tokens `tokens`, token after token.
    fn tokens(&self, tokens: Range<usize>) -> &[f32] {
        &self.x[tokens.start * self.cols..tokens.end * self.cols]
    }

    /// The group sums of tokens `tokens`, token after token (empty for float weights).
    fn group_sums(&self, tokens: Range<usize>) -> &[f32] {
        &self.group_sums[tokens.start * self.groups..tokens.end * self.groups]
    }
}

/// A block of the product, `(rows, tokens, out)` with `out` as described in the module docs.
type BlockFn<'a> = dyn Fn(Range<usize>, Range<usize>, &mut [f32]) + Sync + 'a;

/// One prefill task: a block of rows × tokens and the pieces of `y` it fills, one per token.
struct Task<'y> {
    rows: Range<usize>,
    tokens: Range<usize>,
    pieces: Vec<&'y mut [f32]>,
}

/// Splits the product into tasks (module docs, "Threads") and runs them.
fn run_tasks(m: &Matrix, n_tokens: usize, y: &mut [f32], block: &BlockFn) {
    let rows = m.rows;
    let bytes = m.size_bytes();
    let row_bytes = (bytes / rows).max(1);
    let threads = rayon::current_num_threads();
    let parallel = threads > 1 && bytes.saturating_mul(n_tokens) >= SERIAL_WORK_BYTES;

    if n_tokens == 1 {
        if !parallel {
            return block(0..rows, 0..1, y);
        }
        let task_bytes =
            (bytes / (threads * 4)).clamp(DECODE_MIN_TASK_BYTES, DECODE_MAX_TASK_BYTES);
        let task_rows = (task_bytes / row_bytes).clamp(1, rows);
        y.par_chunks_mut(task_rows).enumerate().for_each(|(i, ys)| {
            let r0 = i * task_rows;
            block(r0..r0 + ys.len(), 0..1, ys)
        });
        return;
    }

    let task_rows = (PREFILL_TASK_BYTES / row_bytes).clamp(1, rows);
    let row_tasks = rows.div_ceil(task_rows);
    let task_tokens = if parallel && row_tasks < 2 * threads {
        let parts = (2 * threads).div_ceil(row_tasks);
        n_tokens.div_ceil(parts).next_multiple_of(8).min(n_tokens)
    } else {
        n_tokens
    };
    let token_tasks = n_tokens.div_ceil(task_tokens);
    let mut tasks: Vec<Task> = (0..token_tasks * row_tasks)
        .map(|i| {
            let (tt, rt) = (i / row_tasks, i % row_tasks);
            Task {
                rows: rt * task_rows..((rt + 1) * task_rows).min(rows),
                tokens: tt * task_tokens..((tt + 1) * task_tokens).min(n_tokens),
                pieces: Vec::with_capacity(task_tokens),
            }
        })
        .collect();
    for (t, y_token) in y.chunks_mut(rows).enumerate() {
        for (rt, piece) in y_token.chunks_mut(task_rows).enumerate() {
            tasks[(t / task_tokens) * row_tasks + rt].pieces.push(piece);
        }
    }
    let run = |task: Task| {
        let nt = task.tokens.len();
        let mut out = vec![0f32; task.rows.len() * nt];
        block(task.rows, task.tokens, &mut out);
        for (k, piece) in task.pieces.into_iter().enumerate() {
            for (r, v) in piece.iter_mut().enumerate() {
                *v = out[r * nt + k];
            }
        }
    };
    if parallel {
        tasks.into_par_iter().for_each(run);
    } else {
        tasks.into_iter().for_each(run);
    }
}
