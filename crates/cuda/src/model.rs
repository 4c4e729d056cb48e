//! The decoder on the GPU: the same pre-norm layers as `moestream_engine::models`, with every
//! weight except the routed experts in VRAM, experts in the [`ExpertCache`], and the KV cache of
//! each sequence in VRAM ([`GpuSequence`], kept in the engine's `SequenceCache`).
//!
//! ```text
//! h   = x + Attention(RMSNorm(x))
//! out = h + FeedForward(RMSNorm(h))          dense SwiGLU, or routed experts (+ shared expert)
//! logits = lm_head(RMSNorm(out_L))
//! ```
//!
//! Routing runs on the host from the router's logits (the same f32 softmax and top-k code as the
//! CPU path, so both choose the same experts), because the host must know the experts to fill
//! the cache. A one-token step applies its experts with grouped launches (one kernel for every
//! expert's gate, one for up, one for down); a prompt applies each chosen expert to the rows
//! that chose it.
use crate::device::{DeviceBuffer, Gpu, GpuError};
use crate::experts::{Eviction, ExpertCache};
use crate::matrix::GpuMatrix;
use crate::ops::{self, Q8Buffer, Q8View};
use cudarc::driver::CudaGraph;
use moestream_engine::accelerator::{Accelerator, DeviceState};
use moestream_engine::cache::SequenceCache;
use moestream_engine::models::blocks::{
    Attention, DeltaProjections, FeedForward, GatedDeltaNet, Mlp, RmsNorm, SparseMoe,
};
use moestream_engine::models::{Logits, Mixer, Model};
use moestream_engine::store::StoreError;
use moestream_kernels::deltanet::ValueHeadOrder;
use moestream_kernels::features::{ActivationPrecision, ProductMode};
use std::any::Any;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

struct Norm {
    w: DeviceBuffer,
    eps: f32,
    width: usize,
}

impl Norm {
    fn upload(gpu: &Gpu, n: &RmsNorm) -> Result<Norm, GpuError> {
        Ok(Norm {
            w: gpu.upload(&n.weight)?,
            eps: n.eps,
            width: n.weight.len(),
        })
    }

    /// `out = RMSNorm(x)` over `rows` rows; with `q8` (one row), `out` also in int8 there.
    fn forward(
        &self,
        gpu: &Gpu,
        x: u64,
        out: u64,
        rows: usize,
        q8: Option<&Q8Buffer>,
    ) -> Result<(), GpuError> {
        match q8 {
            Some(q) if rows == 1 => {
                ops::rms_norm_q8(gpu, x, self.w.ptr, out, self.width, self.eps, q)
            }
            _ => ops::rms_norm(gpu, x, self.w.ptr, out, rows, self.width, self.eps),
        }
    }
}

struct GpuAttention {
    q: GpuMatrix,
    k: GpuMatrix,
    v: GpuMatrix,
    o: GpuMatrix,
    q_norm: Option<Norm>,
    k_norm: Option<Norm>,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    output_gate: bool,
}

impl GpuAttention {
    fn upload(
        gpu: &Gpu,
        a: &Attention,
        widths: &mut [usize; BUFS],
    ) -> Result<GpuAttention, GpuError> {
        let s = a.shape;
        let qd = s.n_heads * s.head_dim;
        let grow = |w: &mut [usize; BUFS], b: Buf, v: usize| w[b as usize] = w[b as usize].max(v);
        grow(widths, Buf::Q, qd);
        grow(widths, Buf::Attn, qd);
        if a.output_gate {
            grow(widths, Buf::QGate, 2 * qd);
            grow(widths, Buf::Gate, qd);
        }
        let kvd = s.n_kv_heads * s.head_dim;
        grow(widths, Buf::K, kvd);
        grow(widths, Buf::V, kvd);
        let norm = |n: &Option<RmsNorm>| n.as_ref().map(|n| Norm::upload(gpu, n)).transpose();
        Ok(GpuAttention {
            q: GpuMatrix::upload(gpu, &a.q_proj.matrix())?,
            k: GpuMatrix::upload(gpu, &a.k_proj.matrix())?,
            v: GpuMatrix::upload(gpu, &a.v_proj.matrix())?,
            o: GpuMatrix::upload(gpu, &a.o_proj.matrix())?,
            q_norm: norm(&a.q_norm)?,
            k_norm: norm(&a.k_norm)?,
            heads: s.n_heads,
            kv_heads: s.n_kv_heads,
            head_dim: s.head_dim,
            output_gate: a.output_gate,
        })
    }
}

impl GpuDelta {
    fn upload(
        gpu: &Gpu,
        d: &GatedDeltaNet,
        widths: &mut [usize; BUFS],
    ) -> Result<GpuDelta, GpuError> {
        let sh = d.shape;
        let (nk, nv, dk, dv) = (sh.n_k_heads, sh.n_v_heads, sh.k_dim, sh.v_dim);
        let channels = 2 * nk * dk + nv * dv;
        let grow = |w: &mut [usize; BUFS], b: Buf, v: usize| w[b as usize] = w[b as usize].max(v);
        grow(widths, Buf::Mixed, channels);
        grow(widths, Buf::Conv, channels);
        grow(widths, Buf::Z, nv * dv);
        grow(widths, Buf::DeltaOut, nv * dv);
        for b in [Buf::DeltaB, Buf::DeltaA, Buf::Beta, Buf::Decay] {
            grow(widths, b, nv);
        }
        let up = |l: &moestream_engine::weights::Linear| GpuMatrix::upload(gpu, &l.matrix());
        let proj = match &d.proj {
            DeltaProjections::Separate { qkv, z, b, a } => GpuDeltaProjections::Separate {
                qkv: up(qkv)?,
                z: up(z)?,
                b: up(b)?,
                a: up(a)?,
            },
            DeltaProjections::Fused { qkvz, ba } => {
                grow(widths, Buf::Raw, qkvz.rows);
                grow(widths, Buf::RawBa, ba.rows);
                GpuDeltaProjections::Fused {
                    qkvz: up(qkvz)?,
                    ba: up(ba)?,
                }
            }
        };
        Ok(GpuDelta {
            proj,
            conv_w: gpu.upload(&d.conv_weight)?,
            taps: d.conv_kernel,
            dt_bias: gpu.upload(&d.dt_bias)?,
            neg_a: gpu.upload(&d.neg_a)?,
            norm: Norm::upload(gpu, &d.norm)?,
            out: up(&d.out_proj)?,
            shape: (nk, nv, dk, dv),
            tiled: sh.order == ValueHeadOrder::Tiled,
            channels,
        })
    }

    /// `x += out_proj(GatedDeltaNet(Normed))`, the layer's states advanced in place.
    /// `xq`: `Normed` in int8 for a decode step ([`Q8View`]).
    fn forward(
        &self,
        gpu: &Gpu,
        state: &(DeviceBuffer, DeviceBuffer),
        b: &impl Fn(Buf) -> u64,
        n: usize,
        xq: Option<Q8View>,
    ) -> Result<(), GpuError> {
        let (nk, nv, dk, dv) = self.shape;
        let x = b(Buf::Normed);
        let (mixed, z, bb, ab) = (b(Buf::Mixed), b(Buf::Z), b(Buf::DeltaB), b(Buf::DeltaA));
        match &self.proj {
            GpuDeltaProjections::Separate {
                qkv,
                z: wz,
                b: wb,
                a: wa,
            } => {
                let list = [(qkv, mixed), (wz, z), (wb, bb), (wa, ab)];
                GpuMatrix::products(gpu, &list, x, xq, n)?;
            }
            GpuDeltaProjections::Fused { qkvz, ba } => {
                let list = [(qkvz, b(Buf::Raw)), (ba, b(Buf::RawBa))];
                GpuMatrix::products(gpu, &list, x, xq, n)?;
                ops::unfuse_qkvz(
                    gpu,
                    b(Buf::Raw),
                    b(Buf::RawBa),
                    mixed,
                    z,
                    bb,
                    ab,
                    n,
                    self.shape,
                )?;
            }
        }
        let c = self.channels;
        let xc = b(Buf::Conv);
        ops::conv1d_silu(
            gpu,
            mixed,
            self.conv_w.ptr,
            state.0.ptr,
            xc,
            n,
            c,
            self.taps,
        )?;
        ops::l2norm_heads(gpu, xc, n, nk, dk, c, 1.0 / (dk as f32).sqrt())?;
        ops::l2norm_heads(gpu, xc + 4 * (nk * dk) as u64, n, nk, dk, c, 1.0)?;
        let (beta, g) = (b(Buf::Beta), b(Buf::Decay));
        ops::delta_gates(
            gpu,
            bb,
            ab,
            self.neg_a.ptr,
            self.dt_bias.ptr,
            beta,
            g,
            n,
            nv,
        )?;
        let o = b(Buf::DeltaOut);
        ops::gated_delta(
            gpu,
            state.1.ptr,
            xc,
            c,
            g,
            beta,
            o,
            n,
            self.shape,
            self.tiled,
        )?;
        ops::gated_rms_norm(gpu, o, z, self.norm.w.ptr, self.norm.eps, n * nv, dv)?;
        self.out.forward_add(gpu, o, n, b(Buf::X))
    }
}

struct GpuMlp {
    gate: GpuMatrix,
    up: GpuMatrix,
    down: GpuMatrix,
}

impl GpuMlp {
    fn upload(gpu: &Gpu, m: &Mlp) -> Result<GpuMlp, GpuError> {
        Ok(GpuMlp {
            gate: GpuMatrix::upload(gpu, &m.gate_proj.matrix())?,
            up: GpuMatrix::upload(gpu, &m.up_proj.matrix())?,
            down: GpuMatrix::upload(gpu, &m.down_proj.matrix())?,
        })
    }

    /// `out (+)= down(silu(gate x) · up x)` with `g`, `u` scratch of `n × F` floats; `add`
    /// for a residual connection. For a decode step in int8, `q8` holds `x` in int8 and a
    /// buffer for `g`'s.
    #[allow(clippy::too_many_arguments)]
    fn forward(
        &self,
        gpu: &Gpu,
        x: u64,
        n: usize,
        g: u64,
        u: u64,
        out: u64,
        add: bool,
        q8: Option<(Q8View, &Q8Buffer)>,
    ) -> Result<(), GpuError> {
        let f = self.gate.rows();
        let xq = q8.map(|q| q.0);
        GpuMatrix::products(gpu, &[(&self.gate, g), (&self.up, u)], x, xq, n)?;
        match q8 {
            Some((_, gq)) => ops::silu_mul_q8(gpu, g, u, g, n * f, gq)?,
            None => ops::silu_mul(gpu, g, u, g, n * f)?,
        }
        self.down
            .product(gpu, g, q8.map(|q| q.1.view()), n, out, add)
    }
}

#[allow(clippy::large_enum_variant)] // one per layer
enum GpuFfn {
    Dense(GpuMlp),
    Sparse {
        router: GpuMatrix,
        shared: Option<(GpuMlp, GpuMatrix)>,
    },
}

/// The input projections of a Gated DeltaNet layer, in either checkpoint layout.
#[allow(clippy::large_enum_variant)] // one per layer
enum GpuDeltaProjections {
    /// Qwen3.5: `[Q | K | V]`, z, b, a.
    Separate {
        qkv: GpuMatrix,
        z: GpuMatrix,
        b: GpuMatrix,
        a: GpuMatrix,
    },
    /// Qwen3-Next: grouped by key head.
    Fused { qkvz: GpuMatrix, ba: GpuMatrix },
}

/// Gated DeltaNet (see `moestream_engine::models::blocks::GatedDeltaNet`).
struct GpuDelta {
    proj: GpuDeltaProjections,
    conv_w: DeviceBuffer,
    taps: usize,
    dt_bias: DeviceBuffer,
    neg_a: DeviceBuffer,
    norm: Norm,
    out: GpuMatrix,
    /// (nk, nv, dk, dv).
    shape: (usize, usize, usize, usize),
    tiled: bool,
    channels: usize,
}

#[allow(clippy::large_enum_variant)] // one per layer
enum GpuMixer {
    Attention(GpuAttention),
    Delta(GpuDelta),
}

struct GpuLayer {
    input_norm: Norm,
    mixer: GpuMixer,
    post_norm: Norm,
    ffn: GpuFfn,
}

/// Per-sequence state on the GPU: keys and values of every attention layer
/// (`[capacity, kv_width]`), and the convolution and recurrent states of every Gated DeltaNet
/// layer, which a pass advances in place.
#[derive(Debug)]
pub struct GpuSequence {
    k: Vec<DeviceBuffer>,
    v: Vec<DeviceBuffer>,
    /// Per layer: None for attention, else (convolution state, recurrent state).
    linear: Vec<Option<(DeviceBuffer, DeviceBuffer)>>,
    capacity: usize,
    kv_width: usize,
    /// Tokens the device state holds.
    len: usize,
    /// A pass failed after changing recurrent state in place.
    poisoned: bool,
    gpu: Arc<Gpu>,
}

impl GpuSequence {
    /// An empty sequence for layers of `kinds` (None: attention; Some(conv, recurrent) floats).
    fn new(
        gpu: Arc<Gpu>,
        kinds: &[Option<(usize, usize)>],
        kv_width: usize,
    ) -> Result<GpuSequence, GpuError> {
        let mut linear = Vec::with_capacity(kinds.len());
        for kind in kinds {
            linear.push(match kind {
                None => None,
                Some((c, r)) => {
                    let conv = gpu.alloc_f32(*c)?;
                    let rec = gpu.alloc_f32(*r)?;
                    gpu.zero(conv.ptr, *c)?;
                    gpu.zero(rec.ptr, *r)?;
                    Some((conv, rec))
                }
            });
        }
        gpu.synchronize()?;
        Ok(GpuSequence {
            k: Vec::new(),
            v: Vec::new(),
            linear,
            capacity: 0,
            kv_width,
            len: 0,
            poisoned: false,
            gpu,
        })
    }

    /// Makes room for `need` positions, keeping the first `keep`.
    fn reserve(&mut self, need: usize, keep: usize) -> Result<(), GpuError> {
        let layers = self.linear.len();
        if need <= self.capacity && self.k.len() == layers {
            return Ok(());
        }
        let cap = need.max(2 * self.capacity).max(256);
        let bytes = keep * self.kv_width * 4;
        let mut k = Vec::with_capacity(layers);
        let mut v = Vec::with_capacity(layers);
        for l in 0..layers {
            // Gated DeltaNet layers keep no keys: a placeholder keeps the indices.
            let floats = if self.linear[l].is_some() {
                1
            } else {
                cap * self.kv_width
            };
            let nk = self.gpu.alloc_f32(floats)?;
            let nv = self.gpu.alloc_f32(floats)?;
            if let (Some(ok), Some(ov), None) = (self.k.get(l), self.v.get(l), &self.linear[l]) {
                self.gpu.copy(nk.ptr, ok.ptr, bytes)?;
                self.gpu.copy(nv.ptr, ov.ptr, bytes)?;
            }
            k.push(nk);
            v.push(nv);
        }
        self.gpu.synchronize()?;
        self.k = k;
        self.v = v;
        self.capacity = cap;
        Ok(())
    }

    fn try_clone(&self) -> Result<GpuSequence, GpuError> {
        self.gpu.bind()?;
        let kinds: Vec<_> = self
            .linear
            .iter()
            .map(|l| l.as_ref().map(|(c, r)| (c.bytes / 4, r.bytes / 4)))
            .collect();
        let mut copy = GpuSequence::new(self.gpu.clone(), &kinds, self.kv_width)?;
        copy.reserve(self.capacity, 0)?;
        for l in 0..self.linear.len() {
            match (&self.linear[l], &copy.linear[l]) {
                (Some((c, r)), Some((cc, cr))) => {
                    self.gpu.copy(cc.ptr, c.ptr, c.bytes)?;
                    self.gpu.copy(cr.ptr, r.ptr, r.bytes)?;
                }
                _ => {
                    let bytes = self.len * self.kv_width * 4;
                    self.gpu.copy(copy.k[l].ptr, self.k[l].ptr, bytes)?;
                    self.gpu.copy(copy.v[l].ptr, self.v[l].ptr, bytes)?;
                }
            }
        }
        self.gpu.synchronize()?;
        copy.len = self.len;
        copy.poisoned = self.poisoned;
        Ok(copy)
    }
}

impl DeviceState for GpuSequence {
    fn clone_box(&self) -> Box<dyn DeviceState> {
        match self.try_clone() {
            Ok(c) => Box::new(c),
            // A copy that cannot be made is a poisoned one: its next pass fails cleanly.
            Err(_) => Box::new(GpuSequence {
                k: Vec::new(),
                v: Vec::new(),
                linear: Vec::new(),
                capacity: 0,
                kv_width: self.kv_width,
                len: self.len,
                poisoned: true,
                gpu: self.gpu.clone(),
            }),
        }
    }

    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}

/// Scratch activations, grown to the largest pass seen.
#[derive(Default)]
struct Scratch {
    tokens: usize,
    bufs: Vec<DeviceBuffer>,
    /// The position word a recorded decode step reads.
    step: Option<Result<DeviceBuffer, GpuError>>,
    /// A decode step's activations in int8: the normed input of the mixer and the feed-forward
    /// (kept for a shared expert after the routed ones), and the other products' inputs.
    q8: Option<Result<[Q8Buffer; 2], GpuError>>,
}

/// Scratch buffer names (indices into `Scratch::bufs`) and their widths per token.
#[derive(Clone, Copy)]
enum Buf {
    X,
    Normed,
    Delta,
    Q,
    QGate,
    K,
    V,
    Attn,
    Gate,
    Up,
    Router,
    Gathered,
    ExpertOut,
    Table,
    Mixed,
    Conv,
    Z,
    DeltaB,
    DeltaA,
    Beta,
    Decay,
    DeltaOut,
    Raw,
    RawBa,
}
const BUFS: usize = 24;

/// Widths (floats per token) of the scratch buffers, from the model's shapes.
struct Widths([usize; BUFS]);

struct State {
    scratch: Scratch,
    experts: Option<ExpertCache>,
    /// Per layer, its E slot addresses when every expert is resident (GPU routing).
    slot_tables: Vec<Option<DeviceBuffer>>,
    /// Logits of the last pass.
    logits: Option<DeviceBuffer>,
    /// Decode steps recorded as CUDA graphs, by the buffers they use.
    graphs: HashMap<[u64; 6], Graph>,
    tokens: u64,
}

/// A model's weights on the GPU and the means to run it; plugs into the engine as its
/// [`Accelerator`].
pub struct CudaModel {
    gpu: Arc<Gpu>,
    layers: Vec<GpuLayer>,
    norm: Norm,
    lm_head: GpuMatrix,
    inv_freq: DeviceBuffer,
    /// Partial results of decode attention split over positions ([`ATTENTION_SPLITS`] a head).
    attention_part: DeviceBuffer,
    rot: usize,
    widths: Widths,
    hidden: usize,
    vocab: usize,
    kv_width: usize,
    state: Mutex<State>,
    /// Bytes of non-expert weights in VRAM.
    pub weight_bytes: usize,
    /// Layers with routed experts.
    sparse_layers: usize,
}

/// How much VRAM the routed experts may take.
#[derive(Clone, Copy, Debug)]
pub enum ExpertBudget {
    /// What is free after the other weights and a reserve for KV caches and scratch.
    Auto,
    /// At most this many bytes.
    Bytes(usize),
}

/// Blocks per head of a decode step's attention, each over an equal share of the positions: 32
/// heads alone would leave most of a large GPU's SMs idle while one block walks the whole cache.
const ATTENTION_SPLITS: usize = 16;

/// Device memory kept free for KV caches and activations when the expert cache is sized
/// automatically.
const AUTO_RESERVE: usize = 2 << 30;

impl CudaModel {
    /// Uploads `model`'s weights to `gpu`, with the routed experts in a cache of `budget`
    /// (all of them when they fit, copied in now).
    pub fn new(
        gpu: Gpu,
        model: &Model,
        budget: ExpertBudget,
        eviction: Eviction,
    ) -> Result<CudaModel, GpuError> {
        gpu.bind()?;
        let gpu = Arc::new(gpu);
        let c = &model.config;
        let mut layers = Vec::with_capacity(model.layers.len());
        let mut widths = [0usize; BUFS];
        let h = c.hidden_size;
        for w in [
            Buf::X,
            Buf::Normed,
            Buf::Delta,
            Buf::Gathered,
            Buf::ExpertOut,
        ] {
            widths[w as usize] = h;
        }
        for l in &model.layers {
            let mixer = match &l.mixer {
                Mixer::Attention(a) => {
                    GpuMixer::Attention(GpuAttention::upload(&gpu, a, &mut widths)?)
                }
                Mixer::Linear(d) => GpuMixer::Delta(GpuDelta::upload(&gpu, d, &mut widths)?),
            };
            let ffn = match &l.mlp {
                FeedForward::Dense(m) => {
                    widths[Buf::Gate as usize] = widths[Buf::Gate as usize].max(m.gate_proj.rows);
                    GpuFfn::Dense(GpuMlp::upload(&gpu, m)?)
                }
                FeedForward::Sparse(m) => {
                    let e = m.router.rows;
                    widths[Buf::Router as usize] = widths[Buf::Router as usize].max(e);
                    let shared = match &m.shared {
                        Some(s) => {
                            widths[Buf::Gate as usize] =
                                widths[Buf::Gate as usize].max(s.mlp.gate_proj.rows);
                            Some((
                                GpuMlp::upload(&gpu, &s.mlp)?,
                                GpuMatrix::upload(&gpu, &s.gate.matrix())?,
                            ))
                        }
                        None => None,
                    };
                    GpuFfn::Sparse {
                        router: GpuMatrix::upload(&gpu, &m.router.matrix())?,
                        shared,
                    }
                }
            };
            layers.push(GpuLayer {
                input_norm: Norm::upload(&gpu, &l.input_layernorm)?,
                mixer,
                post_norm: Norm::upload(&gpu, &l.post_attention_layernorm)?,
                ffn,
            });
        }
        widths[Buf::Up as usize] = widths[Buf::Gate as usize];
        let lm_head = GpuMatrix::upload(&gpu, &model.lm_head.matrix())?;
        let norm = Norm::upload(&gpu, &model.norm)?;
        let rope = model.rope();
        let inv_freq = gpu.upload(rope.inv_freq())?;
        let attention_part = {
            let floats = layers
                .iter()
                .filter_map(|l| match &l.mixer {
                    GpuMixer::Attention(a) => Some(a.heads * (a.head_dim + 2)),
                    _ => None,
                })
                .max()
                .unwrap_or(0)
                * ATTENTION_SPLITS;
            gpu.alloc_f32(floats.max(1))?
        };
        gpu.synchronize()?;

        let weight_bytes = lm_head.size_bytes()
            + layers
                .iter()
                .map(|l| {
                    let mixer: usize = match &l.mixer {
                        GpuMixer::Attention(a) => [&a.q, &a.k, &a.v, &a.o]
                            .iter()
                            .map(|m| m.size_bytes())
                            .sum(),
                        GpuMixer::Delta(d) => {
                            d.out.size_bytes()
                                + match &d.proj {
                                    GpuDeltaProjections::Separate { qkv, z, b, a } => {
                                        qkv.size_bytes()
                                            + z.size_bytes()
                                            + b.size_bytes()
                                            + a.size_bytes()
                                    }
                                    GpuDeltaProjections::Fused { qkvz, ba } => {
                                        qkvz.size_bytes() + ba.size_bytes()
                                    }
                                }
                        }
                    };
                    let ffn = match &l.ffn {
                        GpuFfn::Dense(m) => {
                            m.gate.size_bytes() + m.up.size_bytes() + m.down.size_bytes()
                        }
                        GpuFfn::Sparse { router, shared } => {
                            router.size_bytes()
                                + shared.as_ref().map_or(0, |(m, g)| {
                                    m.gate.size_bytes()
                                        + m.up.size_bytes()
                                        + m.down.size_bytes()
                                        + g.size_bytes()
                                })
                        }
                    };
                    mixer + ffn
                })
                .sum::<usize>();

        let experts = if model
            .layers
            .iter()
            .any(|l| matches!(l.mlp, FeedForward::Sparse(_)))
        {
            let layouts = ExpertCache::layouts(&model.experts, model.layers.len())?;
            let slot = layouts.iter().flatten().map(|l| l.bytes).max().unwrap_or(1);
            let total: usize = (0..model.layers.len())
                .filter(|&l| layouts[l].is_some())
                .map(|l| model.experts.experts_in(l))
                .sum();
            let bytes = match budget {
                ExpertBudget::Bytes(b) => b,
                ExpertBudget::Auto => {
                    let (free, _) = gpu.memory()?;
                    free.saturating_sub(AUTO_RESERVE)
                }
            };
            let k = model.config.num_experts_per_tok.max(1);
            let slots = (bytes / slot).min(total);
            if slots < k {
                return Err(GpuError(format!(
                    "the GPU expert cache holds {slots} experts of {} MiB: at least {k} (one token's) are needed",
                    slot >> 20
                )));
            }
            // Widths of the grouped step: up to top-k experts of one token.
            // [k gate bases: u64][k up bases: u64][k weights: f32]
            widths[Buf::Table as usize] = 5 * k;
            let mut cache = ExpertCache::new(layouts, slots, k.max(16).min(slots), eviction)?;
            if slots == total {
                cache
                    .preload(&gpu, &model.experts)
                    .map_err(|e| GpuError(e.to_string()))?;
            }
            let fe = cache
                .layouts
                .iter()
                .flatten()
                .map(|l| l.gate.rows)
                .max()
                .unwrap_or(0);
            // Gate scratch holds one token's k gate and k up outputs (grouped) or n rows of one
            // expert's gate.
            widths[Buf::Gate as usize] = widths[Buf::Gate as usize].max(2 * k * fe).max(fe);
            widths[Buf::Up as usize] = widths[Buf::Gate as usize];
            widths[Buf::ExpertOut as usize] = widths[Buf::ExpertOut as usize].max(k * h);
            // A prompt's rows gathered per expert: k per token.
            widths[Buf::Gathered as usize] = widths[Buf::Gathered as usize].max(k * h);
            Some(cache)
        } else {
            None
        };
        let slot_tables = match &experts {
            Some(c) if c.all_resident() => (0..model.layers.len())
                .map(|l| {
                    let n = model.experts.experts_in(l);
                    match c.layer_addresses(l, n) {
                        Some(a) if n > 0 => gpu.upload(&a).map(Some),
                        _ => Ok(None),
                    }
                })
                .collect::<Result<_, _>>()?,
            _ => Vec::new(),
        };
        let sparse_layers = model
            .layers
            .iter()
            .filter(|l| matches!(l.mlp, FeedForward::Sparse(_)))
            .count();
        Ok(CudaModel {
            sparse_layers,
            gpu,
            layers,
            norm,
            lm_head,
            inv_freq,
            attention_part,
            rot: rope.rotary_dim(),
            widths: Widths(widths),
            hidden: h,
            vocab: c.vocab_size,
            kv_width: c.num_key_value_heads * c.head_dim,
            state: Mutex::new(State {
                scratch: Scratch::default(),
                slot_tables,
                experts,
                logits: None,
                graphs: HashMap::new(),
                tokens: 0,
            }),
            weight_bytes,
        })
    }

    /// Expert slots in VRAM and the number of experts in the model.
    pub fn expert_slots(&self) -> Option<usize> {
        self.lock().experts.as_ref().map(|c| c.slots())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn run(
        &self,
        model: &Model,
        mode: ProductMode,
        tokens: &[u32],
        cache: &mut SequenceCache,
        want: Logits,
    ) -> Result<Vec<f32>, StoreError> {
        let dev = |e: GpuError| StoreError::Device(e.0);
        let gpu = &*self.gpu;
        gpu.bind().map_err(dev)?;
        model.check_tokens(tokens).map_err(StoreError::Device)?;
        let n = tokens.len();
        let h = self.hidden;
        let start = cache.len();
        if cache.device.is_none() {
            let kinds = model.layer_states();
            let seq = GpuSequence::new(self.gpu.clone(), &kinds, self.kv_width).map_err(dev)?;
            cache.device = Some(Box::new(seq));
        }
        let seq = cache
            .device
            .as_mut()
            .and_then(|d| d.as_any_mut().downcast_mut::<GpuSequence>())
            .ok_or_else(|| StoreError::Device("the cache belongs to another device".into()))?;
        let recurrent = seq.linear.iter().any(|l| l.is_some());
        if seq.poisoned {
            return Err(StoreError::Device(
                "an earlier pass failed part-way through this sequence's recurrent state on the GPU; start the sequence again".into(),
            ));
        }
        if recurrent && seq.len != start {
            // Attention caches go back by their length alone; recurrent states do not.
            return Err(StoreError::Device(format!(
                "the GPU's Gated DeltaNet state holds {} tokens, the sequence {start}: going back (speculative decoding, prefix reuse) is not supported for hybrid models on the GPU",
                seq.len
            )));
        }
        seq.reserve(start + n, start).map_err(dev)?;
        // A failure from here on may leave recurrent state half-advanced.
        seq.poisoned = recurrent;

        let mut state = self.lock();
        let State {
            scratch,
            experts,
            slot_tables,
            logits: logits_buf,
            graphs,
            tokens: counted,
        } = &mut *state;
        if scratch.tokens < n {
            let t = n.max(scratch.tokens * 2).max(16);
            scratch.bufs = self
                .widths
                .0
                .iter()
                .map(|&w| gpu.alloc_f32(t * w.max(1)))
                .collect::<Result<_, _>>()
                .map_err(dev)?;
            scratch.tokens = t;
        }
        let (first, rows) = match want {
            Logits::All => (0, n),
            Logits::Last => (n - 1, 1),
        };
        if logits_buf
            .as_ref()
            .is_none_or(|b| b.bytes < rows * self.vocab * 4)
        {
            *logits_buf = None; // free before allocating the larger one
            *logits_buf = Some(gpu.alloc_f32(rows * self.vocab).map_err(dev)?);
        }
        // A decode step at int8 precision multiplies the K-quant weights with int8 activations
        // (the CPU's method), quantized once per input by the kernel that writes it.
        let int8 = n == 1 && mode == ProductMode::Decode(ActivationPrecision::Int8);
        if int8 && scratch.q8.is_none() {
            let w = &self.widths.0;
            let cap = [Buf::Normed, Buf::Attn, Buf::Gate]
                .iter()
                .map(|&k| w[k as usize])
                .max()
                .unwrap_or(0);
            scratch.q8 = Some((|| {
                Ok([Q8Buffer::new(gpu, cap)?, Q8Buffer::new(gpu, cap)?])
            })());
        }
        let q8 = match (&scratch.q8, int8) {
            (Some(Ok(q)), true) => Some(q),
            (Some(Err(e)), true) => return Err(dev(e.clone())),
            _ => None,
        };
        let b = |w: Buf| scratch.bufs[w as usize].ptr;
        let mut keep_alive = Vec::new();

        // Embeddings on the host (one row each), then up.
        let mut x0 = vec![0f32; n * h];
        for (t, &id) in tokens.iter().enumerate() {
            moestream_kernels::dequantize_row(
                &model.embed_tokens.matrix(),
                id as usize,
                &mut x0[t * h..(t + 1) * h],
            );
        }
        gpu.write(&scratch.bufs[Buf::X as usize], 0, &x0)
            .map_err(dev)?;

        let lb = logits_buf
            .as_ref()
            .ok_or_else(|| StoreError::Device("no logits buffer".into()))?;
        let sparse_layers = slot_tables.iter().filter(|t| t.is_some()).count();
        let graphable = n == 1
            && matches!(want, Logits::Last)
            && !gpu.profiling()
            && experts.as_ref().is_none_or(|c| c.all_resident())
            && sparse_layers == self.sparse_layers
            && std::env::var_os("MOESTREAM_CUDA_GRAPHS").is_none_or(|v| v != "0");
        let mut pass = |pos, first, rows, keep: &mut Vec<DeviceBuffer>| {
            self.pass(
                gpu,
                model,
                seq,
                experts,
                slot_tables,
                &b,
                lb,
                n,
                pos,
                first,
                rows,
                q8,
                keep,
            )
        };
        if graphable {
            // A decode step: replay the graph of this sequence's buffers, or record it once.
            let step = scratch.step.get_or_insert_with(|| gpu.alloc_f32(1));
            let step = step.as_ref().map_err(|e| dev(e.clone()))?;
            gpu.write(step, 0, &[start as u32]).map_err(dev)?;
            let key = [
                seq.k.first().map_or(0, |b| b.ptr),
                seq.capacity as u64,
                b(Buf::X),
                lb.ptr,
                model.top_k() as u64,
                int8 as u64,
            ];
            if !graphs.contains_key(&key) {
                if graphs.len() >= 8 {
                    graphs.clear();
                }
                let pos = Position {
                    start,
                    at: step.ptr,
                };
                gpu.begin_capture().map_err(dev)?;
                let recorded = pass(pos, 0, 1, &mut keep_alive);
                // The capture must end whatever happened inside it.
                let graph = gpu.end_capture();
                recorded?;
                graphs.insert(key, Graph(graph.map_err(dev)?));
            } else if let Some(c) = experts.as_mut() {
                c.count_resident_uses((model.top_k() * sparse_layers) as u64);
            }
            graphs[&key]
                .0
                .launch()
                .map_err(|e| StoreError::Device(format!("replaying the decode graph: {e:?}")))?;
        } else {
            pass(Position { start, at: 0 }, first, rows, &mut keep_alive)?;
        }
        let mut logits = vec![0f32; rows * self.vocab];
        gpu.read(lb.ptr, &mut logits).map_err(dev)?;
        drop(keep_alive);
        *counted += n as u64;
        drop(state);
        seq.len = start + n;
        seq.poisoned = false;
        cache.advance(n);
        Ok(logits)
    }

    /// The layers and the output head for `n` tokens in `X`, logits of `rows` rows from row
    /// `first` into `lb`. Only queues GPU work (no host round trip when every expert is
    /// resident), so a decode step can be recorded as a CUDA graph.
    #[allow(clippy::too_many_arguments)]
    fn pass(
        &self,
        gpu: &Gpu,
        model: &Model,
        seq: &GpuSequence,
        experts: &mut Option<ExpertCache>,
        slot_tables: &[Option<DeviceBuffer>],
        b: &impl Fn(Buf) -> u64,
        lb: &DeviceBuffer,
        n: usize,
        pos: Position,
        first: usize,
        rows: usize,
        q8: Option<&[Q8Buffer; 2]>,
        keep_alive: &mut Vec<DeviceBuffer>,
    ) -> Result<(), StoreError> {
        let dev = |e: GpuError| StoreError::Device(e.0);
        let h = self.hidden;
        let table = b(Buf::Table);
        // int8 activations: `Normed` in q8[0], every other product input in q8[1].
        let (normed_q8, other_q8) = (q8.map(|q| &q[0]), q8.map(|q| &q[1]));
        let xq = normed_q8.map(Q8Buffer::view);
        let ffn_q8 = xq.zip(other_q8);
        for (l, layer) in self.layers.iter().enumerate() {
            // h = x + Attention(RMSNorm(x))    (o_proj adds into x)
            layer
                .input_norm
                .forward(gpu, b(Buf::X), b(Buf::Normed), n, normed_q8)
                .map_err(dev)?;
            match &layer.mixer {
                GpuMixer::Attention(a) => self.attention(gpu, a, seq, l, b, n, pos, xq, other_q8),
                GpuMixer::Delta(d) => match &seq.linear[l] {
                    Some(state) => d.forward(gpu, state, b, n, xq),
                    None => Err(GpuError("a Gated DeltaNet layer without its state".into())),
                },
            }
            .map_err(dev)?;
            // out = h + FeedForward(RMSNorm(h))
            layer
                .post_norm
                .forward(gpu, b(Buf::X), b(Buf::Normed), n, normed_q8)
                .map_err(dev)?;
            match &layer.ffn {
                GpuFfn::Dense(m) => {
                    let (x, g, u) = (b(Buf::Normed), b(Buf::Gate), b(Buf::Up));
                    m.forward(gpu, x, n, g, u, b(Buf::X), true, ffn_q8)
                        .map_err(dev)?
                }
                GpuFfn::Sparse { router, shared } => {
                    let moe = match &model.layers[l].mlp {
                        FeedForward::Sparse(m) => m,
                        FeedForward::Dense(_) => {
                            return Err(StoreError::Device("layer kinds changed".into()))
                        }
                    };
                    let cache = experts
                        .as_mut()
                        .ok_or_else(|| StoreError::Device("no expert cache".into()))?;
                    // Without a shared expert the routed sum goes straight into x.
                    let target = if shared.is_some() { Buf::Delta } else { Buf::X };
                    let routed = Routed {
                        router,
                        table,
                        slot_table: slot_tables.get(l).and_then(|t| t.as_ref()),
                        out: b(target),
                        accumulate: shared.is_none(),
                    };
                    self.moe(gpu, model, moe, cache, l, n, b, routed, ffn_q8, keep_alive)?;
                    if let Some((mlp, gate)) = shared {
                        let (x, g, u) = (b(Buf::Normed), b(Buf::Gate), b(Buf::Up));
                        mlp.forward(gpu, x, n, g, u, b(Buf::ExpertOut), false, ffn_q8)
                            .map_err(dev)?;
                        gate.forward(gpu, b(Buf::Normed), n, b(Buf::Router))
                            .map_err(dev)?;
                        ops::add_gated(gpu, b(Buf::Delta), b(Buf::ExpertOut), b(Buf::Router), h, n)
                            .map_err(dev)?;
                        ops::add_into(gpu, b(Buf::X), b(Buf::Delta), n * h).map_err(dev)?;
                    }
                }
            }
        }
        self.norm
            .forward(
                gpu,
                b(Buf::X) + (first * h * 4) as u64,
                b(Buf::Normed),
                rows,
                normed_q8,
            )
            .map_err(dev)?;
        self.lm_head
            .product(gpu, b(Buf::Normed), xq, rows, lb.ptr, false)
            .map_err(dev)?;
        Ok(())
    }

    /// `x += o_proj(Attention(Normed))`, the new keys and values appended to the cache. For
    /// a decode step in int8, `xq` is `Normed` in int8 and `attn_q8` a buffer for o_proj's
    /// input.
    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        gpu: &Gpu,
        a: &GpuAttention,
        seq: &GpuSequence,
        layer: usize,
        b: &impl Fn(Buf) -> u64,
        n: usize,
        pos: Position,
        xq: Option<Q8View>,
        attn_q8: Option<&Q8Buffer>,
    ) -> Result<(), GpuError> {
        let d = a.head_dim;
        let x = b(Buf::Normed);
        let q = if a.output_gate { Buf::QGate } else { Buf::Q };
        let qkv = [(&a.q, b(q)), (&a.k, b(Buf::K)), (&a.v, b(Buf::V))];
        GpuMatrix::products(gpu, &qkv, x, xq, n)?;
        if a.output_gate {
            ops::split_query_gate(gpu, b(Buf::QGate), b(Buf::Q), b(Buf::Gate), n * a.heads, d)?;
        }
        let norm = |nm: &Option<Norm>| nm.as_ref().map_or((0, 0.0), |nm| (nm.w.ptr, nm.eps));
        let (qw, qe) = norm(&a.q_norm);
        let (kw, ke) = norm(&a.k_norm);
        let (f, rot) = (self.inv_freq.ptr, self.rot);
        let Position { start, at } = pos;
        let (kc, vc) = (&seq.k[layer], &seq.v[layer]);
        ops::qk_norm_rope_append(
            gpu,
            (b(Buf::Q), b(Buf::K), b(Buf::V)),
            n,
            (a.heads, a.kv_heads, d),
            (qw, qe),
            (kw, ke),
            rot,
            f,
            (start, at),
            (kc.ptr, vc.ptr),
        )?;
        let quantized = ops::attention(
            gpu,
            b(Buf::Q),
            kc.ptr,
            vc.ptr,
            b(Buf::Attn),
            n,
            start,
            a.heads,
            a.kv_heads,
            d,
            at,
            Some(ops::AttentionSplit {
                part: self.attention_part.ptr,
                splits: ATTENTION_SPLITS,
                floats: self.attention_part.bytes / 4,
                // o_proj's int8 input from the merge, unless a gate still multiplies it.
                q8: attn_q8
                    .filter(|_| !a.output_gate && a.o.layout.has_int8())
                    .map(Q8Buffer::view),
            }),
        )?;
        if a.output_gate {
            ops::mul_sigmoid(gpu, b(Buf::Attn), b(Buf::Gate), n * a.heads * d)?;
        }
        let oq = match attn_q8 {
            Some(q) if quantized => Some(q.view()),
            Some(q) if n == 1 && a.o.layout.has_int8() => {
                ops::quantize_q8(gpu, b(Buf::Attn), q, a.heads * d)?;
                Some(q.view())
            }
            _ => None,
        };
        a.o.product(gpu, b(Buf::Attn), oq, n, b(Buf::X), true)
    }

    /// The routed experts of layer `l` applied to `Normed`, into `routed.out`.
    #[allow(clippy::too_many_arguments)]
    fn moe(
        &self,
        gpu: &Gpu,
        model: &Model,
        moe: &SparseMoe,
        cache: &mut ExpertCache,
        l: usize,
        n: usize,
        b: &impl Fn(Buf) -> u64,
        routed: Routed,
        q8: Option<(Q8View, &Q8Buffer)>,
        keep_alive: &mut Vec<DeviceBuffer>,
    ) -> Result<(), StoreError> {
        let dev = |e: GpuError| StoreError::Device(e.0);
        let h = self.hidden;
        let e = routed.router.rows();
        let k = model.top_k();
        let layout = cache.layouts[l]
            .ok_or_else(|| StoreError::Device(format!("layer {l} has no expert layout")))?;
        let f = layout.gate.rows;
        let up_delta = layout.up.offset().wrapping_sub(layout.gate.offset());
        routed
            .router
            .forward(gpu, b(Buf::Normed), n, b(Buf::Router))
            .map_err(dev)?;
        let tb = routed.table;
        if n == 1 {
            // One token: its k experts in ascending order (the CPU's summation order), applied
            // by grouped launches. Table: [k gate bases][k up bases][k weights].
            match routed.slot_table {
                Some(slots) if e <= 1024 && k <= 64 => {
                    // Every expert resident: route on the GPU, no round trip to the host.
                    ops::route_top_k(
                        gpu,
                        b(Buf::Router),
                        e,
                        k,
                        moe.rule.renormalize,
                        slots.ptr,
                        up_delta,
                        tb,
                    )
                    .map_err(dev)?;
                    cache.count_resident_uses(k as u64);
                }
                _ => {
                    let mut logits = vec![0f32; e];
                    gpu.read(b(Buf::Router), &mut logits).map_err(dev)?;
                    let mut chosen = moe.choose(&mut logits, k).remove(0);
                    chosen.sort_unstable_by_key(|c| c.0);
                    let ids: Vec<usize> = chosen.iter().map(|c| c.0).collect();
                    let bases = cache.ensure(gpu, &model.experts, l, &ids)?;
                    let mut table = Vec::with_capacity(20 * k);
                    table.extend(bases.iter().flat_map(|b| b.to_le_bytes()));
                    table.extend(bases.iter().flat_map(|b| (b + up_delta).to_le_bytes()));
                    table.extend(chosen.iter().flat_map(|c| c.1.to_le_bytes()));
                    gpu.write_to(routed.table, &table).map_err(dev)?;
                }
            }
            let (x, g, y) = (b(Buf::Normed), b(Buf::Gate), b(Buf::ExpertOut));
            let kf = k * f;
            let xq = q8.map(|q| q.0);
            if layout.gate.same_kind(&layout.up) {
                // Gate and up in one launch: the up bases are the gate bases moved by up_delta.
                layout
                    .gate
                    .launch_grouped(gpu, tb, 2 * k, x, xq, 0, 1, g, f)
                    .map_err(dev)?;
            } else {
                layout
                    .gate
                    .launch_grouped(gpu, tb, k, x, xq, 0, 1, g, f)
                    .map_err(dev)?;
                let up = g + 4 * kf as u64;
                layout
                    .up
                    .launch_grouped(gpu, tb, k, x, xq, 0, 1, up, f)
                    .map_err(dev)?;
            }
            let gq = match q8 {
                Some((_, gq)) if layout.down.has_int8() => {
                    ops::silu_mul_q8(gpu, g, g + 4 * kf as u64, g, kf, gq).map_err(dev)?;
                    Some(gq.view())
                }
                _ => {
                    ops::silu_mul(gpu, g, g + 4 * kf as u64, g, kf).map_err(dev)?;
                    None
                }
            };
            let weights = tb + 16 * k as u64;
            if let Some(gq) = gq {
                // The experts' down products and their weighted sum in one launch.
                let (out, acc) = (routed.out, routed.accumulate);
                let done = layout
                    .down
                    .launch_combined(gpu, tb, k, gq, f, weights, out, acc)
                    .map_err(dev)?;
                if done {
                    return Ok(());
                }
            }
            layout
                .down
                .launch_grouped(gpu, tb, k, g, gq, f, 1, y, h)
                .map_err(dev)?;
            ops::combine_experts(gpu, y, weights, routed.out, k, h, 1, routed.accumulate)
                .map_err(dev)?;
            return Ok(());
        }
        // A prompt: the rows that chose each expert gathered one expert after the other (experts
        // in ascending order, tokens in order), each projection one launch over every expert of
        // a chunk of the cache, then each token's k outputs combined in ascending expert order.
        let mut logits = vec![0f32; n * e];
        gpu.read(b(Buf::Router), &mut logits).map_err(dev)?;
        let mut routing = moe.choose(&mut logits, k);
        let mut count = vec![0u32; e];
        for r in &mut routing {
            r.sort_unstable_by_key(|c| c.0);
            for &(ex, _) in r.iter() {
                count[ex] += 1;
            }
        }
        let active: Vec<usize> = (0..e).filter(|&x| count[x] > 0).collect();
        let mut first = vec![0u32; e + 1];
        for x in 0..e {
            first[x + 1] = first[x] + count[x];
        }
        let total = first[e] as usize;
        // [rows of the gathered order: u32...][per (token, j): its row there, u32...][weights]
        let mut rows = vec![0u32; total];
        let mut at = vec![0u32; n * k];
        let mut weights = vec![0f32; n * k];
        let mut filled = first.clone();
        for (t, r) in routing.iter().enumerate() {
            for (j, &(ex, w)) in r.iter().take(k).enumerate() {
                let row = filled[ex];
                filled[ex] += 1;
                rows[row as usize] = t as u32;
                at[t * k + j] = row;
                weights[t * k + j] = w;
            }
        }
        let mut table = Vec::with_capacity(4 * (total + 2 * n * k));
        table.extend(rows.iter().flat_map(|r| r.to_le_bytes()));
        table.extend(at.iter().flat_map(|r| r.to_le_bytes()));
        table.extend(weights.iter().flat_map(|w| w.to_le_bytes()));
        let idx = gpu.upload(&table).map_err(dev)?;
        let (xs, g, u, y) = (
            b(Buf::Gathered),
            b(Buf::Gate),
            b(Buf::Up),
            b(Buf::ExpertOut),
        );
        ops::gather_rows(gpu, b(Buf::Normed), idx.ptr, xs, total, h).map_err(dev)?;
        for chunk in active.chunks(cache.capacity()) {
            let bases = cache.ensure(gpu, &model.experts, l, chunk)?;
            let start = first[chunk[0]];
            let end = first[chunk[chunk.len() - 1] + 1];
            let mut spans_table = Vec::with_capacity(12 * chunk.len() + 4);
            spans_table.extend(bases.iter().flat_map(|b| b.to_le_bytes()));
            spans_table.extend(chunk.iter().flat_map(|&x| (first[x] - start).to_le_bytes()));
            spans_table.extend((end - start).to_le_bytes());
            let spans = gpu.upload(&spans_table).map_err(dev)?;
            let (bp, sp) = (spans.ptr, spans.ptr + 8 * chunk.len() as u64);
            let rows_in = |buf: u64, width: usize| buf + 4 * (start as usize * width) as u64;
            let c = chunk.len();
            let (xs, g, u, y) = (rows_in(xs, h), rows_in(g, f), rows_in(u, f), rows_in(y, h));
            layout
                .gate
                .launch_spans(gpu, bp, sp, c, xs, g)
                .map_err(dev)?;
            layout.up.launch_spans(gpu, bp, sp, c, xs, u).map_err(dev)?;
            ops::silu_mul(gpu, g, u, g, (end - start) as usize * f).map_err(dev)?;
            layout
                .down
                .launch_spans(gpu, bp, sp, c, g, y)
                .map_err(dev)?;
            keep_alive.push(spans);
        }
        let (at_p, w_p) = (
            idx.ptr + 4 * total as u64,
            idx.ptr + 4 * (total + n * k) as u64,
        );
        ops::combine_rows(gpu, y, at_p, w_p, routed.out, k, h, n, routed.accumulate)
            .map_err(dev)?;
        keep_alive.push(idx);
        Ok(())
    }
}

/// Most tokens in one pass on the GPU (`MOESTREAM_CUDA_MAX_PASS`, default 512).
fn max_pass() -> usize {
    std::env::var("MOESTREAM_CUDA_MAX_PASS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n: &usize| n > 0)
        .unwrap_or(512)
}

/// A recorded decode step.
struct Graph(CudaGraph);

// SAFETY: a graph executable is a driver handle usable from any thread with the context bound;
// it is only launched under the model's state mutex.
unsafe impl Send for Graph {}

/// The position of a pass's first token: by value, or (`at` != 0) the u32 at that device
/// address, for a step replayed from a CUDA graph.
#[derive(Clone, Copy)]
struct Position {
    start: usize,
    at: u64,
}

/// Where a sparse layer's routing and output go.
struct Routed<'a> {
    router: &'a GpuMatrix,
    /// Scratch for the one-token table (device address; 5k floats).
    table: u64,
    /// The layer's E slot addresses when every expert is resident.
    slot_table: Option<&'a DeviceBuffer>,
    out: u64,
    /// Add to `out` (x itself) rather than write it.
    accumulate: bool,
}

impl Accelerator for CudaModel {
    fn describe(&self) -> String {
        self.gpu.describe()
    }

    fn forward(
        &self,
        model: &Model,
        mode: ProductMode,
        tokens: &[u32],
        cache: &mut SequenceCache,
        want: Logits,
    ) -> Result<Vec<f32>, StoreError> {
        if tokens.is_empty() {
            return Err(StoreError::Device("a forward pass needs tokens".into()));
        }
        if matches!(mode, ProductMode::Decode(_)) && tokens.len() > 1 {
            // Speculative verification: every token must come out with the bits of a decode
            // step (so that greedy output with a draft is the output without), and a pass of
            // several tokens here multiplies them differently (tiles, cuBLAS, f32 activations).
            // So the tokens go through as decode steps, one after another.
            let start = cache.len();
            let mut logits = Vec::new();
            for (i, &t) in tokens.iter().enumerate() {
                match self.run(model, mode, &[t], cache, Logits::Last) {
                    Ok(l) if want == Logits::All || i + 1 == tokens.len() => logits.extend(l),
                    Ok(_) => {}
                    Err(e) => {
                        let _ = cache.truncate(start);
                        return Err(e);
                    }
                }
            }
            return Ok(logits);
        }
        // A long prompt runs in passes of at most `max_pass` tokens, so that its scratch
        // activations (and, for scoring, its logits) stay a bounded size in VRAM.
        let max = max_pass();
        if tokens.len() <= max {
            return self.run(model, mode, tokens, cache, want);
        }
        let start = cache.len();
        let mut logits = Vec::new();
        let passes = tokens.len().div_ceil(max);
        for (i, chunk) in tokens.chunks(max).enumerate() {
            match self.run(model, mode, chunk, cache, want) {
                Ok(l) if want == Logits::All || i + 1 == passes => logits.extend(l),
                Ok(_) => {}
                Err(e) => {
                    // Attention caches go back by length; a hybrid's cannot (its GPU state is
                    // marked poisoned by the failed pass, so it is not used again).
                    let _ = cache.truncate(start);
                    return Err(e);
                }
            }
        }
        Ok(logits)
    }

    fn stats(&self) -> Vec<(String, String)> {
        let s = self.lock();
        let mut out = vec![("device".to_string(), self.gpu.describe())];
        let profile = self.gpu.profile();
        if !profile.is_empty() {
            let total: f64 = profile.iter().map(|p| p.1).sum();
            let per = |ms: f64| ms / s.tokens.max(1) as f64;
            let top: Vec<String> = profile
                .iter()
                .map(|(k, ms, n)| {
                    format!(
                        "{k} {:.3} ms/tok ({:.1} µs × {n})",
                        per(*ms),
                        1e3 * ms / *n as f64
                    )
                })
                .collect();
            out.push((
                "gpu kernel time".into(),
                format!("{:.3} ms/tok: {}", per(total), top.join(", ")),
            ));
        }
        if let Some(c) = &s.experts {
            let st = c.stats;
            let hit = if st.lookups > 0 {
                format!("{:.1}%", 100.0 * st.hits as f64 / st.lookups as f64)
            } else {
                "-".into()
            };
            out.push((
                "vram expert cache".into(),
                format!(
                    "{} slots of {:.1} MiB",
                    c.slots(),
                    c.slot_bytes() as f64 / 1048576.0
                ),
            ));
            out.push(("vram cache hit rate".into(), hit));
            if c.preloaded_bytes > 0 {
                out.push((
                    "experts copied in at load".into(),
                    format!("{:.2} GiB", c.preloaded_bytes as f64 / (1u64 << 30) as f64),
                ));
            }
            let per_token = if s.tokens > 0 {
                st.bytes_copied as f64 / s.tokens as f64
            } else {
                0.0
            };
            out.push((
                "pcie expert bytes/token".into(),
                format!("{:.2} MiB", per_token / 1048576.0),
            ));
        }
        out
    }
}
