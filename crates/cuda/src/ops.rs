//! Typed launchers of the element-wise, normalisation and attention kernels (kernels.cu). All
//! take device addresses of f32 arrays and queue work on the GPU's stream.
use crate::device::{DeviceBuffer, Gpu, GpuError};

/// `out[r] = w · x[r] / rms(x[r])` over `rows` rows of `width`.
pub fn rms_norm(
    gpu: &Gpu,
    x: u64,
    w: u64,
    out: u64,
    rows: usize,
    width: usize,
    eps: f32,
) -> Result<(), GpuError> {
    let (mut x, mut w, mut out, mut width, mut eps) = (x, w, out, width as u32, eps);
    if rows == 0 {
        return Ok(());
    }
    gpu.launch(
        "rms_norm",
        (rows as u32, 1, 1),
        256,
        args!(x, w, out, width, eps),
    )
}

/// NeoX rotary embedding of `n_tokens × n_heads` heads, token t at position `start + t`.
#[allow(clippy::too_many_arguments)]
pub fn rope(
    gpu: &Gpu,
    x: u64,
    n_tokens: usize,
    n_heads: usize,
    head_dim: usize,
    rot: usize,
    inv_freq: u64,
    start: usize,
) -> Result<(), GpuError> {
    let n = n_tokens * n_heads * (rot / 2);
    let (mut x, mut nt, mut nh, mut hd, mut rot, mut f, mut start) = (
        x,
        n_tokens as u32,
        n_heads as u32,
        head_dim as u32,
        rot as u32,
        inv_freq,
        start as u32,
    );
    gpu.launch_elements("rope", n, args!(x, nt, nh, hd, rot, f, start))
}

/// Causal attention of `n` queries (positions `start..start + n`) over the cache.
#[allow(clippy::too_many_arguments)]
pub fn attention(
    gpu: &Gpu,
    q: u64,
    k: u64,
    v: u64,
    out: u64,
    n: usize,
    start: usize,
    n_heads: usize,
    n_kv: usize,
    head_dim: usize,
    start_at: u64,
    split: Option<AttentionSplit>,
) -> Result<bool, GpuError> {
    if !head_dim.is_multiple_of(32) || head_dim > 256 || !n_heads.is_multiple_of(n_kv) {
        return Err(GpuError(format!(
            "attention with {n_heads} heads of {head_dim} over {n_kv} kv heads is not supported on the GPU (head_dim must be a multiple of 32 up to 256)"
        )));
    }
    let split = split.filter(|s| n == 1 && s.splits > 1 && s.fits(n_heads, head_dim));
    let scale = 1.0 / (head_dim as f32).sqrt();
    let mut at = start_at;
    let mut part = split.map_or(0, |s| s.part);
    let (mut q, mut k, mut v, mut out, mut start, mut nh, mut nkv, mut hd, mut scale) = (
        q,
        k,
        v,
        out,
        start as u32,
        n_heads as u32,
        n_kv as u32,
        head_dim as u32,
        scale,
    );
    let splits = split.map_or(1, |s| s.splits as u32);
    gpu.launch(
        "attention",
        (n_heads as u32, n as u32, splits),
        512, // ATT_WARPS warps
        args!(q, k, v, out, start, nh, nkv, hd, scale, at, part),
    )?;
    if let Some(s) = split {
        let mut sp = splits;
        let (quantized, mut q8) = match s.q8 {
            Some(q) => (true, q),
            None => (false, Q8View::NONE),
        };
        gpu.launch(
            "attention_combine",
            (n_heads as u32, 1, 1),
            128,
            args!(part, out, sp, hd, q8),
        )?;
        return Ok(quantized);
    }
    Ok(false)
}

/// Decode attention split over the positions: `splits` blocks per head, each writing a partial
/// softmax into `part` (`heads · splits · (head_dim + 2)` floats), merged by a second kernel.
#[derive(Clone, Copy, Debug)]
pub struct AttentionSplit {
    /// Device address of the partial results.
    pub part: u64,
    /// Blocks per head.
    pub splits: usize,
    /// Floats at `part`.
    pub floats: usize,
    /// Where the merge also writes the output in int8 (o_proj's input), if anywhere.
    pub q8: Option<Q8View>,
}

impl AttentionSplit {
    fn fits(&self, heads: usize, head_dim: usize) -> bool {
        heads * self.splits * (head_dim + 2) <= self.floats
    }
}

/// `out = silu(g) · u` over `n` floats.
pub fn silu_mul(gpu: &Gpu, g: u64, u: u64, out: u64, n: usize) -> Result<(), GpuError> {
    let (mut g, mut u, mut out, mut len) = (g, u, out, n as u64);
    gpu.launch_elements("silu_mul", n, args!(g, u, out, len))
}

/// One token's activations rounded to int8 per span of 32 (kernels.cu `Q8`, the CPU's
/// `ActivationPrecision::Int8` method): device addresses of the codes and of the spans' steps,
/// f32 sums and rounding residual sums.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Q8View {
    q: u64,
    step: u64,
    sum: u64,
    res: u64,
}

impl Q8View {
    /// No buffer: kernels with an optional int8 output skip it.
    const NONE: Q8View = Q8View {
        q: 0,
        step: 0,
        sum: 0,
        res: 0,
    };
}

/// Device memory for up to `capacity` activations in int8 ([`Q8View`]).
pub struct Q8Buffer {
    buf: DeviceBuffer,
    capacity: usize,
}

impl Q8Buffer {
    /// Room for `capacity` activations (rounded up to a span of 32).
    pub fn new(gpu: &Gpu, capacity: usize) -> Result<Q8Buffer, GpuError> {
        let capacity = capacity.max(32).next_multiple_of(32);
        let floats = (capacity / 32).next_multiple_of(64);
        let buf = gpu.alloc_f32(capacity.next_multiple_of(256) / 4 + 3 * floats)?;
        Ok(Q8Buffer { buf, capacity })
    }

    /// The codes, then the steps, sums and residuals, each at a 256-byte boundary.
    pub fn view(&self) -> Q8View {
        let q = self.buf.ptr;
        let step = q + self.capacity.next_multiple_of(256) as u64;
        let span_bytes = (4 * (self.capacity / 32).next_multiple_of(64)) as u64;
        Q8View {
            q,
            step,
            sum: step + span_bytes,
            res: step + 2 * span_bytes,
        }
    }

    fn check(&self, what: &str, n: usize) -> Result<Q8View, GpuError> {
        if n > self.capacity || !n.is_multiple_of(32) {
            return Err(GpuError(format!(
                "{what}: {n} activations do not fit int8 spans of 32 in room for {}",
                self.capacity
            )));
        }
        Ok(self.view())
    }
}

/// `q = int8(x)` for `n` floats (a multiple of 32).
pub fn quantize_q8(gpu: &Gpu, x: u64, q: &Q8Buffer, n: usize) -> Result<(), GpuError> {
    let mut v = q.check("quantize_q8", n)?;
    let (mut x, mut len) = (x, n as u64);
    gpu.launch_elements("quantize_q8", n, args!(x, v, len))
}

/// [`rms_norm`] of one row, its output also rounded to int8 into `q`.
pub fn rms_norm_q8(
    gpu: &Gpu,
    x: u64,
    w: u64,
    out: u64,
    width: usize,
    eps: f32,
    q: &Q8Buffer,
) -> Result<(), GpuError> {
    let mut v = q.check("rms_norm_q8", width)?;
    if width > 4096 {
        // kernels.cu's NORM_Q8_PER_THREAD × 1024 threads.
        rms_norm(gpu, x, w, out, 1, width, eps)?;
        return quantize_q8(gpu, out, q, width);
    }
    let (mut x, mut w, mut out, mut width, mut eps) = (x, w, out, width as u32, eps);
    gpu.launch(
        "rms_norm_q8",
        (1, 1, 1),
        1024,
        args!(x, w, out, width, eps, v),
    )
}

/// [`silu_mul`], its output also rounded to int8 into `q` (`n` a multiple of 32).
pub fn silu_mul_q8(
    gpu: &Gpu,
    g: u64,
    u: u64,
    out: u64,
    n: usize,
    q: &Q8Buffer,
) -> Result<(), GpuError> {
    let mut v = q.check("silu_mul_q8", n)?;
    let (mut g, mut u, mut out, mut len) = (g, u, out, n as u64);
    gpu.launch_elements("silu_mul_q8", n, args!(g, u, out, len, v))
}

/// `x += d` over `n` floats.
pub fn add_into(gpu: &Gpu, x: u64, d: u64, n: usize) -> Result<(), GpuError> {
    let (mut x, mut d, mut len) = (x, d, n as u64);
    gpu.launch_elements("add_into", n, args!(x, d, len))
}

/// Splits per-head `[query | gate]` rows into `q` and `gate` (`heads` heads in all).
pub fn split_query_gate(
    gpu: &Gpu,
    qg: u64,
    q: u64,
    gate: u64,
    heads: usize,
    head_dim: usize,
) -> Result<(), GpuError> {
    let (mut qg, mut q, mut gate, mut h, mut d) = (qg, q, gate, heads as u64, head_dim as u32);
    gpu.launch_elements(
        "split_query_gate",
        heads * head_dim,
        args!(qg, q, gate, h, d),
    )
}

/// `o *= sigmoid(gate)` over `n` floats.
pub fn mul_sigmoid(gpu: &Gpu, o: u64, gate: u64, n: usize) -> Result<(), GpuError> {
    let (mut o, mut g, mut len) = (o, gate, n as u64);
    gpu.launch_elements("mul_sigmoid", n, args!(o, g, len))
}

/// `out[t] (+)= Σ_g weights[t][g] · y[t][g]` in ascending g.
#[allow(clippy::too_many_arguments)]
pub fn combine_experts(
    gpu: &Gpu,
    y: u64,
    weights: u64,
    out: u64,
    groups: usize,
    h: usize,
    n: usize,
    accumulate: bool,
) -> Result<(), GpuError> {
    let (mut y, mut w, mut out, mut g, mut hh, mut nn, mut acc) = (
        y,
        weights,
        out,
        groups as u32,
        h as u32,
        n as u32,
        accumulate as u32,
    );
    gpu.launch_elements("combine_experts", n * h, args!(y, w, out, g, hh, nn, acc))
}

/// One token's routing on the GPU (every expert resident): softmax, top-k, optional
/// renormalisation, chosen experts in ascending order into `table` =
/// `[k gate bases][k up bases][k weights]` (`slot_bases`: the layer's E slot addresses).
#[allow(clippy::too_many_arguments)]
pub fn route_top_k(
    gpu: &Gpu,
    logits: u64,
    experts: usize,
    k: usize,
    renormalize: bool,
    slot_bases: u64,
    up_delta: u64,
    table: u64,
) -> Result<(), GpuError> {
    if experts > 1024 || k > 64 || k > experts {
        return Err(GpuError(format!(
            "GPU routing takes up to 1024 experts and top-k 64, not {experts} and {k}"
        )));
    }
    let (mut l, mut e, mut kk, mut r, mut b, mut d, mut t) = (
        logits,
        experts as u32,
        k as u32,
        renormalize as u32,
        slot_bases,
        up_delta,
        table,
    );
    gpu.launch("route_top_k", (1, 1, 1), 32, args!(l, e, kk, r, b, d, t))
}

/// Per-head RMSNorm (with weight `w`, 0 for none) then RoPE, in place, for `n` tokens.
#[allow(clippy::too_many_arguments)]
pub fn head_norm_rope(
    gpu: &Gpu,
    x: u64,
    n: usize,
    n_heads: usize,
    head_dim: usize,
    w: u64,
    eps: f32,
    rot: usize,
    inv_freq: u64,
    start: usize,
    start_at: u64,
) -> Result<(), GpuError> {
    if head_dim > 256 || rot > head_dim {
        return Err(GpuError(format!(
            "heads of {head_dim} (rotary {rot}) are not supported on the GPU"
        )));
    }
    let mut at = start_at;
    let (mut x, mut nh, mut hd, mut w, mut eps, mut rot, mut f, mut start) = (
        x,
        n_heads as u32,
        head_dim as u32,
        w,
        eps,
        rot as u32,
        inv_freq,
        start as u32,
    );
    gpu.launch(
        "head_norm_rope",
        (n_heads as u32, n as u32, 1),
        128,
        args!(x, nh, hd, w, eps, rot, f, start, at),
    )
}

/// `out[t] (+)= Σ_j weights[t·k+j] · y[at[t·k+j]]` for `n` tokens and their `k` experts (rows of
/// `h`), each token's experts in ascending order.
#[allow(clippy::too_many_arguments)]
pub fn combine_rows(
    gpu: &Gpu,
    y: u64,
    at: u64,
    weights: u64,
    out: u64,
    k: usize,
    h: usize,
    n: usize,
    accumulate: bool,
) -> Result<(), GpuError> {
    let (mut y, mut at, mut w, mut out, mut kk, mut hh, mut nn, mut acc) = (
        y,
        at,
        weights,
        out,
        k as u32,
        h as u32,
        n as u32,
        accumulate as u32,
    );
    gpu.launch_elements("combine_rows", n * h, args!(y, at, w, out, kk, hh, nn, acc))
}

/// `dst[j] = src[rows[j]]`.
pub fn gather_rows(
    gpu: &Gpu,
    src: u64,
    rows: u64,
    dst: u64,
    count: usize,
    h: usize,
) -> Result<(), GpuError> {
    let (mut s, mut r, mut d, mut c, mut hh) = (src, rows, dst, count as u32, h as u32);
    gpu.launch_elements("gather_rows", count * h, args!(s, r, d, c, hh))
}

/// `out[t] += sigmoid(g[t]) · y[t]` over `n` rows of `h`.
pub fn add_gated(gpu: &Gpu, out: u64, y: u64, g: u64, h: usize, n: usize) -> Result<(), GpuError> {
    let (mut o, mut y, mut g, mut hh, mut nn) = (out, y, g, h as u32, n as u32);
    gpu.launch_elements("add_gated", n * h, args!(o, y, g, hh, nn))
}

/// The queries' and keys' [`head_norm_rope`] and [`append_kv`] in one launch (a head's norm
/// weight 0: no norm).
#[allow(clippy::too_many_arguments)]
pub fn qk_norm_rope_append(
    gpu: &Gpu,
    (q, k, v): (u64, u64, u64),
    n: usize,
    (n_heads, n_kv, head_dim): (usize, usize, usize),
    (qw, qe): (u64, f32),
    (kw, ke): (u64, f32),
    rot: usize,
    inv_freq: u64,
    (start, start_at): (usize, u64),
    (k_cache, v_cache): (u64, u64),
) -> Result<(), GpuError> {
    if head_dim > 256 || rot > head_dim {
        return Err(GpuError(format!(
            "heads of {head_dim} (rotary {rot}) are not supported on the GPU"
        )));
    }
    let (mut q, mut k, mut v, mut nh, mut nkv, mut hd) =
        (q, k, v, n_heads as u32, n_kv as u32, head_dim as u32);
    let (mut qw, mut qe, mut kw, mut ke, mut rot, mut f) = (qw, qe, kw, ke, rot as u32, inv_freq);
    let (mut start, mut at, mut kc, mut vc) = (start as u32, start_at, k_cache, v_cache);
    gpu.launch(
        "qk_norm_rope_append",
        ((n_heads + n_kv) as u32, n as u32, 1),
        128,
        args!(q, k, v, nh, nkv, hd, qw, qe, kw, ke, rot, f, start, at, kc, vc),
    )
}

/// Appends `n` rows of keys and values (`width` floats each) to the caches at position
/// `start` (or the u32 at device address `start_at`, when not 0).
#[allow(clippy::too_many_arguments)]
pub fn append_kv(
    gpu: &Gpu,
    k: u64,
    v: u64,
    k_cache: u64,
    v_cache: u64,
    width: usize,
    n: usize,
    start: usize,
    start_at: u64,
) -> Result<(), GpuError> {
    let (mut k, mut v, mut kc, mut vc, mut w, mut nn, mut s, mut sa) = (
        k,
        v,
        k_cache,
        v_cache,
        width as u32,
        n as u32,
        start as u32,
        start_at,
    );
    gpu.launch_elements("append_kv", n * width, args!(k, v, kc, vc, w, nn, s, sa))
}

/// `silu(causal conv)` of `n` rows of `channels`, advancing `state` (`[K − 1, channels]`).
#[allow(clippy::too_many_arguments)]
pub fn conv1d_silu(
    gpu: &Gpu,
    x: u64,
    w: u64,
    state: u64,
    out: u64,
    n: usize,
    channels: usize,
    taps: usize,
) -> Result<(), GpuError> {
    if taps == 0 || taps > 9 {
        return Err(GpuError(format!(
            "a convolution of {taps} taps is not supported on the GPU"
        )));
    }
    let (mut x, mut w, mut s, mut o, mut nn, mut c, mut k) =
        (x, w, state, out, n as u32, channels as u32, taps as u32);
    gpu.launch_elements("conv1d_silu", channels, args!(x, w, s, o, nn, c, k))
}

/// Scales each `dim`-wide head of `n` rows (row stride `stride` floats) to unit L2 norm, times
/// `scale`, in place.
pub fn l2norm_heads(
    gpu: &Gpu,
    x: u64,
    n: usize,
    heads: usize,
    dim: usize,
    stride: usize,
    scale: f32,
) -> Result<(), GpuError> {
    let (mut x, mut nn, mut h, mut d, mut st, mut sc) =
        (x, n as u32, heads as u32, dim as u32, stride as u64, scale);
    gpu.launch_elements("l2norm_heads", n * heads * 32, args!(x, nn, h, d, st, sc))
}

/// `beta = sigmoid(b)`, `g = neg_a · softplus(a + dt_bias)` for `n × nv`.
#[allow(clippy::too_many_arguments)]
pub fn delta_gates(
    gpu: &Gpu,
    b: u64,
    a: u64,
    neg_a: u64,
    dt_bias: u64,
    beta: u64,
    g: u64,
    n: usize,
    nv: usize,
) -> Result<(), GpuError> {
    let (mut b, mut a, mut na, mut dt, mut be, mut g, mut nn, mut v) =
        (b, a, neg_a, dt_bias, beta, g, n as u32, nv as u32);
    gpu.launch_elements("delta_gates", n * nv, args!(b, a, na, dt, be, g, nn, v))
}

/// The gated delta rule over `n` tokens for every value head, `state` (`[nv, dk, dv]`)
/// advanced in place; q, k, v read from the convolution output `xc` (row stride `stride`).
#[allow(clippy::too_many_arguments)]
pub fn gated_delta(
    gpu: &Gpu,
    state: u64,
    xc: u64,
    stride: usize,
    g: u64,
    beta: u64,
    out: u64,
    n: usize,
    shape: (usize, usize, usize, usize),
    tiled: bool,
) -> Result<(), GpuError> {
    let (nk, nv, dk, dv) = shape;
    if dk > 128 || dv > 256 || nk == 0 || !nv.is_multiple_of(nk) {
        return Err(GpuError(format!(
            "Gated DeltaNet heads of {dk}x{dv} ({nk} key, {nv} value heads) are not supported on the GPU"
        )));
    }
    let (mut s, mut x, mut st, mut g, mut b, mut o, mut nn) =
        (state, xc, stride as u64, g, beta, out, n as u32);
    let (mut k1, mut v1, mut dk1, mut dv1, mut t) =
        (nk as u32, nv as u32, dk as u32, dv as u32, tiled as u32);
    let block = dv.div_ceil(32) * 32;
    gpu.launch(
        "gated_delta",
        (nv as u32, 1, 1),
        block as u32,
        args!(s, x, st, g, b, o, nn, k1, v1, dk1, dv1, t),
    )
}

/// `o = (w · o / rms(o)) · silu(z)` over `rows` rows of `dv`.
pub fn gated_rms_norm(
    gpu: &Gpu,
    o: u64,
    z: u64,
    w: u64,
    eps: f32,
    rows: usize,
    dv: usize,
) -> Result<(), GpuError> {
    let (mut o, mut z, mut w, mut e, mut r, mut d) = (o, z, w, eps, rows as u32, dv as u32);
    gpu.launch_elements("gated_rms_norm", rows * 32, args!(o, z, w, e, r, d))
}

/// Qwen3-Next's key-head-grouped `qkvz` and `ba` rows into `[Q | K | V]`, z, b and a.
#[allow(clippy::too_many_arguments)]
pub fn unfuse_qkvz(
    gpu: &Gpu,
    raw: u64,
    raw_ba: u64,
    mixed: u64,
    z: u64,
    b: u64,
    a: u64,
    n: usize,
    shape: (usize, usize, usize, usize),
) -> Result<(), GpuError> {
    let (nk, nv, dk, dv) = shape;
    let r = nv / nk;
    let total = (n * nk * (2 * dk + 2 * r * dv)).max(n * nk * 2 * r);
    let (mut raw, mut rb, mut m, mut z, mut b, mut a) = (raw, raw_ba, mixed, z, b, a);
    let (mut nn, mut k1, mut dk1, mut r1, mut dv1) =
        (n as u32, nk as u32, dk as u32, r as u32, dv as u32);
    gpu.launch_elements(
        "unfuse_qkvz",
        total,
        args!(raw, rb, m, z, b, a, nn, k1, dk1, r1, dv1),
    )
}
