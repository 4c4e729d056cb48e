//! The Gated DeltaNet mixer's kernels (Yang, Kautz, Hatamizadeh, "Gated Delta Networks", 2024),
//! as Qwen3-Next and Qwen3.5 use them in three of every four layers.
//!
//! Per value head, a state `S ∈ R^{dk×dv}` (f32) is decayed and corrected by a delta rule at each
//! token, then read with the query:
//!
//! ```text
//! S ← exp(g_t) S                 kv = Sᵀ k_t
//! S ← S + k_t ⊗ β_t (v_t − kv)   o_t = Sᵀ q_t
//! ```
//!
//! Decode uses that recurrence ([`gated_delta_step`]), fused into two passes over `S`. Prefill uses
//! the chunked form ([`gated_delta_chunked`]): within a chunk of 64 tokens the corrections are
//! solved together (the UT transform: a unit lower-triangular system), and the state is read and
//! written once per chunk instead of twice per token, which turns the work into small matrix
//! products. Both give the same result up to f32 rounding; the tests hold them to each other.
//!
//! Speed (`examples/deltanet_speed.rs`, Qwen3.5-35B-A3B geometry: 32 value heads, dk = dv = 128,
//! 2-vCPU AVX2 VM, 2026-12-03): the chunked form runs 0.09-0.10 ms per token and layer, 1.3-1.4x
//! faster than the step (0.12-0.15 ms). It does more arithmetic than the step (~69k against ~48k
//! multiply-adds per token and head: three `dk×dv` products per token, `W S`, `q S` and the state
//! update, plus the `C/2`-wide intra-chunk terms), so it wins only by doing it as matrix products
//! in registers ([`add_products`]: FMA tiles that load each row of `S` once per four tokens)
//! where the step streams `S` through memory twice per token. Written as plain row loops with a
//! running-sum dot product it was 4x slower than the step.
//!
//! The causal depthwise convolution that precedes the rule keeps its last `K − 1` input rows as
//! state ([`causal_conv1d_silu`]).
use rayon::prelude::*;

/// Which key head each value head reads, when there are more value heads than key heads.
///
/// Hugging Face checkpoints group the value heads by key head (`g·r + j` for key head `g`, with
/// `r = nv / nk`). llama.cpp's converter reorders the value heads of Qwen3.5 GGUF files to tiled
/// order (`j·nk + g`), so that ggml can broadcast the key heads instead of repeating them; every
/// per-value-head tensor of such a file follows that order, so the kernels only need to pair
/// the heads the same way.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ValueHeadOrder {
    /// Value head `h` reads key head `h / r`.
    #[default]
    Grouped,
    /// Value head `h` reads key head `h % nk`.
    Tiled,
}

/// Head geometry of a Gated DeltaNet layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeltaShape {
    /// Query/key heads `nk`.
    pub n_k_heads: usize,
    /// Value heads `nv` (a multiple of `nk`).
    pub n_v_heads: usize,
    /// Query/key width `dk`.
    pub k_dim: usize,
    /// Value width `dv`.
    pub v_dim: usize,
    /// Which key head a value head reads.
    pub order: ValueHeadOrder,
}

impl DeltaShape {
    /// The key head value head `h` reads.
    pub fn key_head(&self, h: usize) -> usize {
        match self.order {
            ValueHeadOrder::Grouped => h / (self.n_v_heads / self.n_k_heads),
            ValueHeadOrder::Tiled => h % self.n_k_heads,
        }
    }

    /// Floats of one sequence's recurrent state: `nv · dk · dv`.
    pub fn state_len(&self) -> usize {
        self.n_v_heads * self.k_dim * self.v_dim
    }
}

/// Tokens per chunk of the chunked form (transformers and the FLA kernels use 64 too).
pub const CHUNK: usize = 64;

/// `silu(conv(x))` over time for `n` rows of `channels` features, with a depthwise causal kernel
/// `weight[c · k + j]` (`k` taps, tap `k − 1` on the current token). `state` holds the `k − 1`
/// input rows before `x` (oldest first; zeros at the start of a sequence); `new_state` receives
/// the last `k − 1` rows after it.
#[allow(clippy::too_many_arguments)] // the kernel's inputs and outputs, each a plain slice
pub fn causal_conv1d_silu(
    x: &[f32],
    n: usize,
    channels: usize,
    weight: &[f32],
    k: usize,
    state: &[f32],
    new_state: &mut [f32],
    out: &mut [f32],
) {
    let hist = k - 1;
    debug_assert_eq!(state.len(), hist * channels);
    // Row r of [state; x].
    let row = |r: usize| -> &[f32] {
        if r < hist {
            &state[r * channels..(r + 1) * channels]
        } else {
            &x[(r - hist) * channels..(r - hist + 1) * channels]
        }
    };
    for t in 0..n {
        let o = &mut out[t * channels..(t + 1) * channels];
        o.fill(0.0);
        for j in 0..k {
            let xr = row(t + j);
            for (c, (oc, &xc)) in o.iter_mut().zip(xr).enumerate() {
                *oc += weight[c * k + j] * xc;
            }
        }
        for v in o.iter_mut() {
            *v = silu(*v);
        }
    }
    for r in 0..hist {
        new_state[r * channels..(r + 1) * channels].copy_from_slice(row(n + r));
    }
}

/// `x · sigmoid(x)`.
pub fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

/// `1 / (1 + exp(−x))`.
pub fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// `ln(1 + exp(x))`, linear above 20 as torch's `softplus` is.
pub fn softplus(x: f32) -> f32 {
    if x > 20.0 {
        x
    } else {
        x.exp().ln_1p()
    }
}

/// Scales each `dim`-wide row of `x` to unit L2 norm: `x · rsqrt(Σx² + 1e-6)` (transformers'
/// `l2norm`), then by `scale`.
pub fn l2_normalize_rows(x: &mut [f32], dim: usize, scale: f32) {
    for r in x.chunks_exact_mut(dim) {
        let ss: f32 = r.iter().map(|v| v * v).sum();
        let inv = scale / (ss + 1e-6).sqrt();
        r.iter_mut().for_each(|v| *v *= inv);
    }
}

/// Inputs of the delta rule for `n` tokens: `q`, `k` are `[n, nk·dk]` (already L2-normalised,
/// `q` scaled by `dk^-1/2`), `v` is `[n, nv·dv]`, `g` (log decay) and `beta` are `[n, nv]`.
#[derive(Clone, Copy)]
pub struct DeltaInputs<'a> {
    /// Queries.
    pub q: &'a [f32],
    /// Keys.
    pub k: &'a [f32],
    /// Values.
    pub v: &'a [f32],
    /// Log decay per token and value head (≤ 0).
    pub g: &'a [f32],
    /// Write strength per token and value head, in (0, 1).
    pub beta: &'a [f32],
}

impl<'a> DeltaInputs<'a> {
    /// The inputs of token `t` of a pass of several.
    pub fn token(self, shape: DeltaShape, t: usize) -> DeltaInputs<'a> {
        let qk = shape.n_k_heads * shape.k_dim;
        let vv = shape.n_v_heads * shape.v_dim;
        let nv = shape.n_v_heads;
        DeltaInputs {
            q: &self.q[t * qk..(t + 1) * qk],
            k: &self.k[t * qk..(t + 1) * qk],
            v: &self.v[t * vv..(t + 1) * vv],
            g: &self.g[t * nv..(t + 1) * nv],
            beta: &self.beta[t * nv..(t + 1) * nv],
        }
    }
}

/// One token of the recurrence for every head: reads `state` (`[nv, dk, dv]`), writes the
/// updated state to `new_state` and `o_t = Sᵀ q` to `out` (`[nv·dv]`).
pub fn gated_delta_step(
    shape: DeltaShape,
    x: DeltaInputs<'_>,
    state: &[f32],
    new_state: &mut [f32],
    out: &mut [f32],
) {
    let DeltaShape {
        n_v_heads,
        k_dim: dk,
        v_dim: dv,
        ..
    } = shape;
    let per_head = |(h, (s_new, o)): (usize, (&mut [f32], &mut [f32]))| {
        let kh = shape.key_head(h);
        let q = &x.q[kh * dk..(kh + 1) * dk];
        let k = &x.k[kh * dk..(kh + 1) * dk];
        let v = &x.v[h * dv..(h + 1) * dv];
        let decay = x.g[h].exp();
        let beta = x.beta[h];
        let s = &state[h * dk * dv..(h + 1) * dk * dv];
        // Pass 1: kv = (e^g S)ᵀ k.
        let mut kv = vec![0f32; dv];
        for (srow, &ki) in s.chunks_exact(dv).zip(k) {
            for (a, &b) in kv.iter_mut().zip(srow) {
                *a += b * ki;
            }
        }
        let delta: Vec<f32> = v
            .iter()
            .zip(&kv)
            .map(|(&vj, &kvj)| beta * (vj - decay * kvj))
            .collect();
        // Pass 2: S' = e^g S + k ⊗ δ, o = S'ᵀ q.
        o.fill(0.0);
        for ((srow, nrow), (&ki, &qi)) in s
            .chunks_exact(dv)
            .zip(s_new.chunks_exact_mut(dv))
            .zip(k.iter().zip(q))
        {
            for ((n, &sv), (&d, oj)) in nrow
                .iter_mut()
                .zip(srow)
                .zip(delta.iter().zip(o.iter_mut()))
            {
                *n = decay * sv + ki * d;
                *oj += qi * *n;
            }
        }
    };
    let heads = new_state
        .chunks_exact_mut(dk * dv)
        .zip(out.chunks_exact_mut(dv))
        .enumerate();
    if dk * dv * n_v_heads >= 1 << 16 {
        heads.collect::<Vec<_>>().into_par_iter().for_each(per_head);
    } else {
        heads.for_each(per_head);
    }
}

/// The delta rule over `n` tokens in chunks of [`CHUNK`], for every head: reads `state`, writes
/// the state after the last token to `new_state` and the outputs to `out` (`[n, nv·dv]`).
pub fn gated_delta_chunked(
    shape: DeltaShape,
    n: usize,
    x: DeltaInputs<'_>,
    state: &[f32],
    new_state: &mut [f32],
    out: &mut [f32],
) {
    let DeltaShape {
        n_v_heads, v_dim, ..
    } = shape;
    new_state.copy_from_slice(state);
    let per = shape.k_dim * v_dim;
    // Each head owns its state and a column block of `out`: compute heads apart, then scatter.
    let results: Vec<Vec<f32>> = new_state
        .par_chunks_exact_mut(per)
        .enumerate()
        .map(|(h, s)| chunked_head(shape, h, n, x, s))
        .collect();
    for (h, o) in results.iter().enumerate() {
        for t in 0..n {
            out[t * n_v_heads * v_dim + h * v_dim..][..v_dim]
                .copy_from_slice(&o[t * v_dim..(t + 1) * v_dim]);
        }
    }
}

/// One value head of [`gated_delta_chunked`]; `s` (`[dk, dv]`) is updated in place, the outputs
/// are returned as `[n, dv]`. The body is compiled twice, for the baseline target and with AVX2
/// enabled (chosen at run time): the same arithmetic in the same order (Rust does not fuse
/// multiply-adds on its own), so both give identical results, eight lanes at a time with AVX2.
fn chunked_head(
    shape: DeltaShape,
    h: usize,
    n: usize,
    x: DeltaInputs<'_>,
    s: &mut [f32],
) -> Vec<f32> {
    #[cfg(target_arch = "x86_64")]
    if crate::features::simd_level() != crate::features::SimdLevel::Scalar {
        // SAFETY: a level above scalar means the CPU has AVX2 (features::simd_level).
        return unsafe { chunked_head_avx2(shape, h, n, x, s) };
    }
    chunked_head_body(shape, h, n, x, s)
}

/// [`chunked_head_body`] compiled with AVX2.
///
/// # Safety
/// The CPU must support AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn chunked_head_avx2(
    shape: DeltaShape,
    h: usize,
    n: usize,
    x: DeltaInputs<'_>,
    s: &mut [f32],
) -> Vec<f32> {
    chunked_head_body(shape, h, n, x, s)
}

/// `Σ a_i b_i` in eight interleaved partial sums (lane `i mod 8`), added pairwise at the end:
/// a fixed order that vectorizes, unlike a single running sum (which made the chunked form's
/// dot products scalar and the form 4x slower than it is now).
#[inline(always)]
fn dot8(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    for (l, (x, y)) in ra.iter().zip(rb).enumerate() {
        acc[l] += x * y;
    }
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]))
}

/// The coefficient matrix of [`add_products`]: entry `(i, p)` at `data[i·row + p·column]`.
#[derive(Clone, Copy)]
struct Operand<'a> {
    data: &'a [f32],
    row: usize,
    column: usize,
}

impl<'a> Operand<'a> {
    /// Row-major with rows `stride` apart.
    fn rows(data: &'a [f32], stride: usize) -> Operand<'a> {
        Operand {
            data,
            row: stride,
            column: 1,
        }
    }

    /// The transpose of a row-major matrix with rows `stride` apart.
    fn columns(data: &'a [f32], stride: usize) -> Operand<'a> {
        Operand {
            data,
            row: 1,
            column: stride,
        }
    }

    #[inline(always)]
    fn at(&self, i: usize, p: usize) -> f32 {
        self.data[i * self.row + p * self.column]
    }
}

/// `out[i·os + c] += Σ_{p < depth} a(i, p) · b[p·bs + c]` for `i < rows`, `c < cols`: the small
/// matrix products of the chunked form. With AVX2+FMA, tiles of 4 rows × 16 columns accumulate
/// in eight registers, so each row of `b` is loaded once per four rows of `out` (a row-by-row
/// loop loads and stores `out` for every term); elsewhere a plain loop.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn add_products(
    out: &mut [f32],
    os: usize,
    rows: usize,
    cols: usize,
    a: Operand,
    b: &[f32],
    bs: usize,
    depth: usize,
) {
    if rows == 0 || cols == 0 || depth == 0 {
        return;
    }
    assert!(
        (rows - 1) * os + cols <= out.len()
            && (depth - 1) * bs + cols <= b.len()
            && (rows - 1) * a.row + (depth - 1) * a.column < a.data.len(),
        "add_products: operands too short"
    );
    #[cfg(target_arch = "x86_64")]
    if crate::features::simd_level() != crate::features::SimdLevel::Scalar {
        // SAFETY: AVX2+FMA (simd_level above scalar); the bounds were checked above.
        unsafe { add_products_fma(out, os, rows, cols, a, b, bs, depth) };
        return;
    }
    add_products_rows(out, os, 0..rows, 0..cols, a, b, bs, depth);
}

/// [`add_products`] for the rows and columns given, one row at a time.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn add_products_rows(
    out: &mut [f32],
    os: usize,
    rows: std::ops::Range<usize>,
    cols: std::ops::Range<usize>,
    a: Operand,
    b: &[f32],
    bs: usize,
    depth: usize,
) {
    for i in rows {
        let o = &mut out[i * os + cols.start..i * os + cols.end];
        for p in 0..depth {
            let k = a.at(i, p);
            for (x, &y) in o.iter_mut().zip(&b[p * bs + cols.start..p * bs + cols.end]) {
                *x += k * y;
            }
        }
    }
}

/// [`add_products`] with AVX2+FMA register tiles; the rows and columns that do not fill a tile
/// go through [`add_products_rows`].
///
/// # Safety
/// AVX2+FMA; the operands hold what [`add_products`] asserts.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn add_products_fma(
    out: &mut [f32],
    os: usize,
    rows: usize,
    cols: usize,
    a: Operand,
    b: &[f32],
    bs: usize,
    depth: usize,
) {
    use std::arch::x86_64::*;
    let (full_rows, full_cols) = (rows / 4 * 4, cols / 16 * 16);
    for i0 in (0..full_rows).step_by(4) {
        for c0 in (0..full_cols).step_by(16) {
            let mut acc = [_mm256_setzero_ps(); 8];
            for p in 0..depth {
                // In bounds: p < depth, c0 + 16 <= cols (asserted in add_products).
                let bp = b.as_ptr().add(p * bs + c0);
                let (b0, b1) = (_mm256_loadu_ps(bp), _mm256_loadu_ps(bp.add(8)));
                for r in 0..4 {
                    let k = _mm256_set1_ps(*a.data.get_unchecked((i0 + r) * a.row + p * a.column));
                    acc[2 * r] = _mm256_fmadd_ps(k, b0, acc[2 * r]);
                    acc[2 * r + 1] = _mm256_fmadd_ps(k, b1, acc[2 * r + 1]);
                }
            }
            for r in 0..4 {
                // In bounds: i0 + r < rows, c0 + 16 <= cols.
                let op = out.as_mut_ptr().add((i0 + r) * os + c0);
                _mm256_storeu_ps(op, _mm256_add_ps(_mm256_loadu_ps(op), acc[2 * r]));
                let op = op.add(8);
                _mm256_storeu_ps(op, _mm256_add_ps(_mm256_loadu_ps(op), acc[2 * r + 1]));
            }
        }
    }
    add_products_rows(out, os, 0..full_rows, full_cols..cols, a, b, bs, depth);
    add_products_rows(out, os, full_rows..rows, 0..cols, a, b, bs, depth);
}

#[inline(always)]
fn chunked_head_body(
    shape: DeltaShape,
    h: usize,
    n: usize,
    x: DeltaInputs<'_>,
    s: &mut [f32],
) -> Vec<f32> {
    let DeltaShape {
        n_k_heads,
        n_v_heads,
        k_dim: dk,
        v_dim: dv,
        ..
    } = shape;
    let kh = shape.key_head(h);
    let qk_stride = n_k_heads * dk;
    let v_stride = n_v_heads * dv;
    let mut out = vec![0f32; n * dv];
    let mut start = 0;
    // Chunk scratch.
    let mut q = vec![0f32; CHUNK * dk];
    let mut k = vec![0f32; CHUNK * dk];
    let mut kb = vec![0f32; CHUNK * dk];
    let mut vb = vec![0f32; CHUNK * dv];
    let mut gc = [0f32; CHUNK];
    let mut t_mat = vec![0f32; CHUNK * CHUNK];
    let mut decay = vec![0f32; CHUNK * CHUNK];
    let mut a_row = [0f32; CHUNK];
    let mut kbe = vec![0f32; CHUNK * dk];
    let mut w_neg = vec![0f32; CHUNK * dk];
    let mut eg = [0f32; CHUNK];
    let mut q_dec = vec![0f32; CHUNK * dk];
    let mut qk = vec![0f32; CHUNK * CHUNK];
    let mut u = vec![0f32; CHUNK * dv];
    while start < n {
        let l = CHUNK.min(n - start);
        let mut acc = 0f32;
        for i in 0..l {
            let t = start + i;
            q[i * dk..(i + 1) * dk].copy_from_slice(&x.q[t * qk_stride + kh * dk..][..dk]);
            k[i * dk..(i + 1) * dk].copy_from_slice(&x.k[t * qk_stride + kh * dk..][..dk]);
            let b = x.beta[t * n_v_heads + h];
            for (o, &v) in kb[i * dk..(i + 1) * dk]
                .iter_mut()
                .zip(&k[i * dk..(i + 1) * dk])
            {
                *o = v * b;
            }
            for (o, &v) in vb[i * dv..(i + 1) * dv]
                .iter_mut()
                .zip(&x.v[t * v_stride + h * dv..][..dv])
            {
                *o = v * b;
            }
            acc += x.g[t * n_v_heads + h];
            gc[i] = acc;
        }
        // T = (I − A)⁻¹ with A[i][j] = −(β_i k_i · k_j) e^{g_i − g_j} (j < i): forward
        // substitution row by row, T[i][j] = A[i][j] + Σ_{j<m<i} A[i][m] T[m][j].
        // Decays between positions of the chunk, e^{g_i − g_j} (j ≤ i), shared by T and the
        // outputs below.
        for i in 0..l {
            for j in 0..=i {
                decay[i * CHUNK + j] = (gc[i] - gc[j]).exp();
            }
        }
        t_mat[..l * CHUNK].fill(0.0);
        for i in 0..l {
            for j in 0..i {
                let dot = dot8(&kb[i * dk..(i + 1) * dk], &k[j * dk..(j + 1) * dk]);
                t_mat[i * CHUNK + j] = -dot * decay[i * CHUNK + j];
            }
            // Row i of T from row i of A and the rows above: T_i = A_i + Σ_m A[i][m] T_m, the
            // coefficients being A's (kept in `a_row`); T_m is zero right of its diagonal, so
            // row m adds into columns < m only. Row by row, so that the adds vectorize.
            a_row[..i].copy_from_slice(&t_mat[i * CHUNK..i * CHUNK + i]);
            let (above, row) = t_mat.split_at_mut(i * CHUNK);
            for (m, &aim) in a_row[..i].iter().enumerate() {
                for (t, &tm) in row[..m].iter_mut().zip(&above[m * CHUNK..m * CHUNK + m]) {
                    *t += aim * tm;
                }
            }
            t_mat[i * CHUNK + i] = 1.0;
        }
        // U = T (β v) and −W = T (−β k e^{g}) (T is zero right of its diagonal); W is kept
        // negated so that v_new = U − W S is one more accumulating product.
        for (e, &g) in eg[..l].iter_mut().zip(&gc[..l]) {
            *e = g.exp();
        }
        for (j, row) in kbe[..l * dk].chunks_exact_mut(dk).enumerate() {
            for (a, &b) in row.iter_mut().zip(&kb[j * dk..(j + 1) * dk]) {
                *a = -b * eg[j];
            }
        }
        u[..l * dv].fill(0.0);
        w_neg[..l * dk].fill(0.0);
        let t = Operand::rows(&t_mat, CHUNK);
        add_products(&mut u, dv, l, dv, t, &vb, dv, l);
        add_products(&mut w_neg, dk, l, dk, t, &kbe, dk, l);
        // v_new = U − W S; o_i = e^{g_i} q_i S + Σ_{j ≤ i} (q_i · k_j) e^{g_i − g_j} v_new_j.
        for (i, qe) in q_dec[..l * dk].chunks_exact_mut(dk).enumerate() {
            for (c, &qv) in qe.iter_mut().zip(&q[i * dk..(i + 1) * dk]) {
                *c = qv * eg[i];
            }
        }
        add_products(&mut u, dv, l, dv, Operand::rows(&w_neg, dk), s, dv, dk);
        let o = &mut out[start * dv..(start + l) * dv];
        add_products(o, dv, l, dv, Operand::rows(&q_dec, dk), s, dv, dk);
        for i in 0..l {
            for j in 0..=i {
                let dot = dot8(&q[i * dk..(i + 1) * dk], &k[j * dk..(j + 1) * dk]);
                qk[i * CHUNK + j] = dot * decay[i * CHUNK + j];
            }
            qk[i * CHUNK + i + 1..(i + 1) * CHUNK].fill(0.0);
        }
        add_products(o, dv, l, dv, Operand::rows(&qk, CHUNK), &u, dv, l);
        // S ← e^{g_last} S + Σ_j (k_j e^{g_last − g_j}) ⊗ v_new_j.
        let g_last = gc[l - 1];
        let e_last = g_last.exp();
        s.iter_mut().for_each(|v| *v *= e_last);
        for (j, row) in kbe[..l * dk].chunks_exact_mut(dk).enumerate() {
            let f = (g_last - gc[j]).exp();
            for (a, &b) in row.iter_mut().zip(&k[j * dk..(j + 1) * dk]) {
                *a = b * f;
            }
        }
        // S[r] += Σ_j kbe[j][r] u_j: the coefficients are kbe transposed.
        add_products(s, dv, dk, dv, Operand::columns(&kbe, dk), &u, dv, l);
        start += l;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rand_vec(seed: &mut u64, n: usize, scale: f32) -> Vec<f32> {
        (0..n)
            .map(|_| {
                *seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((*seed >> 33) as f32 / (1u64 << 31) as f32 - 0.5) * 2.0 * scale
            })
            .collect()
    }

    /// The textbook recurrence in f64, token by token, one head at a time.
    fn reference(
        shape: DeltaShape,
        n: usize,
        x: DeltaInputs<'_>,
        s0: &[f32],
    ) -> (Vec<f64>, Vec<f64>) {
        let DeltaShape {
            n_k_heads,
            n_v_heads,
            k_dim: dk,
            v_dim: dv,
            order,
        } = shape;
        let r = n_v_heads / n_k_heads;
        let mut s: Vec<f64> = s0.iter().map(|&v| v as f64).collect();
        let mut out = vec![0f64; n * n_v_heads * dv];
        for t in 0..n {
            for h in 0..n_v_heads {
                // Written out rather than through `key_head`, so that the test checks it.
                let kh = match order {
                    ValueHeadOrder::Grouped => h / r,
                    ValueHeadOrder::Tiled => h % n_k_heads,
                };
                let q = &x.q[t * n_k_heads * dk + kh * dk..][..dk];
                let k = &x.k[t * n_k_heads * dk + kh * dk..][..dk];
                let v = &x.v[t * n_v_heads * dv + h * dv..][..dv];
                let st = &mut s[h * dk * dv..(h + 1) * dk * dv];
                let e = (x.g[t * n_v_heads + h] as f64).exp();
                st.iter_mut().for_each(|a| *a *= e);
                for j in 0..dv {
                    let kv: f64 = (0..dk).map(|i| st[i * dv + j] * k[i] as f64).sum();
                    let d = x.beta[t * n_v_heads + h] as f64 * (v[j] as f64 - kv);
                    for i in 0..dk {
                        st[i * dv + j] += k[i] as f64 * d;
                    }
                }
                for j in 0..dv {
                    out[t * n_v_heads * dv + h * dv + j] =
                        (0..dk).map(|i| st[i * dv + j] * q[i] as f64).sum();
                }
            }
        }
        (out, s)
    }

    struct Case {
        n: usize,
        q: Vec<f32>,
        k: Vec<f32>,
        v: Vec<f32>,
        g: Vec<f32>,
        beta: Vec<f32>,
        s0: Vec<f32>,
    }

    impl Case {
        fn new(seed: u64, shape: DeltaShape, n: usize) -> Case {
            let mut sd = seed;
            let DeltaShape {
                n_k_heads,
                n_v_heads,
                k_dim: dk,
                v_dim: dv,
                ..
            } = shape;
            let mut q = rand_vec(&mut sd, n * n_k_heads * dk, 1.0);
            let mut k = rand_vec(&mut sd, n * n_k_heads * dk, 1.0);
            l2_normalize_rows(&mut q, dk, 1.0 / (dk as f32).sqrt());
            l2_normalize_rows(&mut k, dk, 1.0);
            let v = rand_vec(&mut sd, n * n_v_heads * dv, 1.0);
            let g: Vec<f32> = rand_vec(&mut sd, n * n_v_heads, 1.0)
                .iter()
                .map(|a| -softplus(*a) * 0.5)
                .collect();
            let beta: Vec<f32> = rand_vec(&mut sd, n * n_v_heads, 3.0)
                .iter()
                .map(|&a| sigmoid(a))
                .collect();
            let s0 = rand_vec(&mut sd, shape.state_len(), 0.5);
            Case {
                n,
                q,
                k,
                v,
                g,
                beta,
                s0,
            }
        }
        fn inputs(&self) -> DeltaInputs<'_> {
            DeltaInputs {
                q: &self.q,
                k: &self.k,
                v: &self.v,
                g: &self.g,
                beta: &self.beta,
            }
        }
    }

    fn max_diff(a: &[f32], b: &[f64]) -> f64 {
        a.iter()
            .zip(b)
            .map(|(&x, &y)| (x as f64 - y).abs())
            .fold(0.0, f64::max)
    }

    const SHAPE: DeltaShape = DeltaShape {
        n_k_heads: 2,
        n_v_heads: 4,
        k_dim: 16,
        v_dim: 24,
        order: ValueHeadOrder::Grouped,
    };

    /// Both pairings of value heads with key heads.
    const SHAPES: [DeltaShape; 2] = [
        SHAPE,
        DeltaShape {
            order: ValueHeadOrder::Tiled,
            ..SHAPE
        },
    ];

    #[test]
    fn step_matches_the_f64_recurrence() {
        for shape in SHAPES {
            let c = Case::new(7, shape, 9);
            let (want_out, want_s) = reference(shape, c.n, c.inputs(), &c.s0);
            let mut s = c.s0.clone();
            let mut out = vec![0f32; c.n * 4 * 24];
            let (nq, nv) = (2 * 16, 4 * 24);
            for t in 0..c.n {
                let x = DeltaInputs {
                    q: &c.q[t * nq..(t + 1) * nq],
                    k: &c.k[t * nq..(t + 1) * nq],
                    v: &c.v[t * nv..(t + 1) * nv],
                    g: &c.g[t * 4..(t + 1) * 4],
                    beta: &c.beta[t * 4..(t + 1) * 4],
                };
                let mut next = vec![0f32; s.len()];
                gated_delta_step(shape, x, &s, &mut next, &mut out[t * nv..(t + 1) * nv]);
                s = next;
            }
            let d = max_diff(&out, &want_out);
            assert!(d < 1e-5, "{:?}: {d}", shape.order);
            assert!(max_diff(&s, &want_s) < 1e-5);
        }
    }

    #[test]
    fn chunked_matches_the_f64_recurrence_across_chunk_boundaries() {
        for shape in SHAPES {
            for n in [1, 5, 63, 64, 65, 150] {
                let c = Case::new(100 + n as u64, shape, n);
                let (want_out, want_s) = reference(shape, n, c.inputs(), &c.s0);
                let mut s = vec![0f32; c.s0.len()];
                let mut out = vec![0f32; n * 4 * 24];
                gated_delta_chunked(shape, n, c.inputs(), &c.s0, &mut s, &mut out);
                let (d_out, d_s) = (max_diff(&out, &want_out), max_diff(&s, &want_s));
                assert!(
                    d_out < 2e-5 && d_s < 2e-5,
                    "{:?} n={n}: out {d_out:e}, state {d_s:e}",
                    shape.order
                );
            }
        }
    }

    #[test]
    fn conv_state_carries_across_calls() {
        let (ch, k, n) = (5, 4, 7);
        let mut sd = 3;
        let x = rand_vec(&mut sd, n * ch, 1.0);
        let w = rand_vec(&mut sd, ch * k, 1.0);
        let zero = vec![0f32; (k - 1) * ch];
        let mut st = vec![0f32; (k - 1) * ch];
        let mut whole = vec![0f32; n * ch];
        causal_conv1d_silu(&x, n, ch, &w, k, &zero, &mut st, &mut whole);
        // Direct formula.
        for t in 0..n {
            for c in 0..ch {
                let mut acc = 0f32;
                for j in 0..k {
                    let src = t as isize - (k as isize - 1) + j as isize;
                    if src >= 0 {
                        acc += w[c * k + j] * x[src as usize * ch + c];
                    }
                }
                assert!((whole[t * ch + c] - silu(acc)).abs() < 1e-6);
            }
        }
        // Split 3 + 4 with the state in between.
        let mut s1 = vec![0f32; (k - 1) * ch];
        let mut s2 = vec![0f32; (k - 1) * ch];
        let mut parts = vec![0f32; n * ch];
        causal_conv1d_silu(
            &x[..3 * ch],
            3,
            ch,
            &w,
            k,
            &zero,
            &mut s1,
            &mut parts[..3 * ch],
        );
        causal_conv1d_silu(
            &x[3 * ch..],
            4,
            ch,
            &w,
            k,
            &s1,
            &mut s2,
            &mut parts[3 * ch..],
        );
        assert_eq!(parts, whole);
        assert_eq!(s2, st);
    }
}
