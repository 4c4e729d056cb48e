//! The blocks every supported decoder is built from: RMSNorm, grouped-query attention with RoPE
//! (optionally with the sigmoid output gate of Qwen3-Next/Qwen3.5), the Gated DeltaNet mixer, the
//! SwiGLU MLP, and the sparse mixture-of-experts block with its router and optional shared expert.
//!
//! Activations are f32 row-major `[n_tokens, width]`; every block processes a batch of tokens at
//! once (prefill) or one (decode) through the same code. Each takes the pass's [`ProductMode`]:
//! in [`ProductMode::Decode`] every token of a batch comes out with the bits it would have had
//! alone (speculative verification), which the Gated DeltaNet gets by stepping token by token.
use crate::cache::{alternate_steps, DeltaTrail, LayerKv, LinearState, StateBuffers};
use crate::store::{ExpertStore, ExpertWeights, StoreError};
use crate::weights::Linear;
use moestream_kernels::deltanet::{self, DeltaInputs, DeltaShape};
use moestream_kernels::features::ProductMode;
use moestream_kernels::ops::{self, AttentionShape, Rope};

/// `y = w * x / rms(x)`.
#[derive(Clone, Debug)]
pub struct RmsNorm {
    /// Per-feature weight.
    pub weight: Vec<f32>,
    /// Epsilon inside the square root.
    pub eps: f32,
}

impl RmsNorm {
    /// Normalises each row of `x` into `out`.
    pub fn forward(&self, x: &[f32], out: &mut [f32]) {
        let n = self.weight.len();
        for (xr, or) in x.chunks_exact(n).zip(out.chunks_exact_mut(n)) {
            ops::rms_norm(xr, &self.weight, self.eps, or);
        }
    }
}

/// Multi-head attention with grouped key/value heads, optional per-head q/k RMSNorm (Qwen3).
pub struct Attention {
    /// `[n_heads * head_dim, H]`.
    pub q_proj: Linear,
    /// `[n_kv_heads * head_dim, H]`.
    pub k_proj: Linear,
    /// `[n_kv_heads * head_dim, H]`.
    pub v_proj: Linear,
    /// `[H, n_heads * head_dim]`.
    pub o_proj: Linear,
    /// RMSNorm over each query head before RoPE (Qwen3).
    pub q_norm: Option<RmsNorm>,
    /// RMSNorm over each key head before RoPE (Qwen3).
    pub k_norm: Option<RmsNorm>,
    /// Head geometry.
    pub shape: AttentionShape,
    /// Qwen3-Next/Qwen3.5: `q_proj` yields `[query | gate]` per head (`2·head_dim` rows each)
    /// and the attention output is multiplied by `sigmoid(gate)` before `o_proj`.
    pub output_gate: bool,
}

impl Attention {
    /// The same attention with its weights copied into process memory.
    pub fn to_resident(&self) -> Attention {
        Attention {
            q_proj: self.q_proj.to_resident(),
            k_proj: self.k_proj.to_resident(),
            v_proj: self.v_proj.to_resident(),
            o_proj: self.o_proj.to_resident(),
            q_norm: self.q_norm.clone(),
            k_norm: self.k_norm.clone(),
            shape: self.shape,
            output_gate: self.output_gate,
        }
    }

    /// `out = o_proj(softmax(q kᵀ / sqrt(D)) v)` for `n` tokens at positions `start..start + n`,
    /// appending their keys and values to `kv`.
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &self,
        mode: ProductMode,
        x: &[f32],
        n: usize,
        start: usize,
        rope: &Rope,
        kv: &mut LayerKv,
        out: &mut [f32],
    ) {
        let AttentionShape {
            n_heads,
            n_kv_heads,
            head_dim: d,
        } = self.shape;
        let mut q = vec![0f32; n * n_heads * d];
        let mut k = vec![0f32; n * n_kv_heads * d];
        let mut v = vec![0f32; n * n_kv_heads * d];
        let mut gate = Vec::new();
        if self.output_gate {
            // Per head: rows [0, D) the query, [D, 2D) the gate.
            let mut qg = vec![0f32; n * n_heads * 2 * d];
            self.q_proj.forward(mode, x, n, &mut qg);
            gate = vec![0f32; n * n_heads * d];
            for (i, head) in qg.chunks_exact(2 * d).enumerate() {
                q[i * d..(i + 1) * d].copy_from_slice(&head[..d]);
                gate[i * d..(i + 1) * d].copy_from_slice(&head[d..]);
            }
        } else {
            self.q_proj.forward(mode, x, n, &mut q);
        }
        self.k_proj.forward(mode, x, n, &mut k);
        self.v_proj.forward(mode, x, n, &mut v);
        if let Some(norm) = &self.q_norm {
            ops::rms_norm_rows(&mut q, &norm.weight, norm.eps);
        }
        if let Some(norm) = &self.k_norm {
            ops::rms_norm_rows(&mut k, &norm.weight, norm.eps);
        }
        for t in 0..n {
            rope.apply(&mut q[t * n_heads * d..(t + 1) * n_heads * d], d, start + t);
            rope.apply(
                &mut k[t * n_kv_heads * d..(t + 1) * n_kv_heads * d],
                d,
                start + t,
            );
        }
        kv.k.extend_from_slice(&k);
        kv.v.extend_from_slice(&v);
        let mut o = vec![0f32; n * n_heads * d];
        ops::attention(self.shape, &q, &kv.k, &kv.v, start, n, &mut o);
        if self.output_gate {
            for (a, &g) in o.iter_mut().zip(&gate) {
                *a *= deltanet::sigmoid(g);
            }
        }
        self.o_proj.forward(mode, &o, n, out);
    }
}

/// The input projections of a Gated DeltaNet layer, in either checkpoint layout.
#[allow(clippy::large_enum_variant)] // one per layer
pub enum DeltaProjections {
    /// Qwen3.5: `in_proj_qkv` (`[Q | K | V]`), `in_proj_z`, `in_proj_b`, `in_proj_a`.
    Separate {
        /// `[2·nk·dk + nv·dv, H]`.
        qkv: Linear,
        /// `[nv·dv, H]`.
        z: Linear,
        /// `[nv, H]`.
        b: Linear,
        /// `[nv, H]`.
        a: Linear,
    },
    /// Qwen3-Next: `in_proj_qkvz` and `in_proj_ba`, grouped by key head: for each key head
    /// `[q (dk) | k (dk) | v (r·dv) | z (r·dv)]` and `[b (r) | a (r)]`, with `r = nv / nk`.
    Fused {
        /// `[2·nk·dk + 2·nv·dv, H]`.
        qkvz: Linear,
        /// `[2·nv, H]`.
        ba: Linear,
    },
}

impl DeltaProjections {
    fn to_resident(&self) -> DeltaProjections {
        match self {
            DeltaProjections::Separate { qkv, z, b, a } => DeltaProjections::Separate {
                qkv: qkv.to_resident(),
                z: z.to_resident(),
                b: b.to_resident(),
                a: a.to_resident(),
            },
            DeltaProjections::Fused { qkvz, ba } => DeltaProjections::Fused {
                qkvz: qkvz.to_resident(),
                ba: ba.to_resident(),
            },
        }
    }
}

/// Gated DeltaNet linear attention (Qwen3-Next, Qwen3.5):
///
/// ```text
/// q, k, v = split(silu(conv1d(W_qkv x)))         causal depthwise conv, state = last K−1 inputs
/// q = l2norm(q)·dk^-1/2,  k = l2norm(k)           value head h reads key head h / (nv/nk)
///                                                 (h mod nk in Qwen3.5 GGUF files: `DeltaShape::order`)
/// β = sigmoid(W_b x),  g = −exp(A_log)·softplus(W_a x + dt_bias)
/// S ← e^g S + k ⊗ β(v − (e^g S)ᵀ k),  o = Sᵀ q     per value head, S ∈ R^{dk×dv} in f32
/// out = W_out( RMSNorm(o)·w · silu(W_z x) )       norm per head over dv
/// ```
pub struct GatedDeltaNet {
    /// Input projections.
    pub proj: DeltaProjections,
    /// Depthwise convolution `[channels, K]`.
    pub conv_weight: Vec<f32>,
    /// Taps `K`.
    pub conv_kernel: usize,
    /// `dt_bias [nv]`.
    pub dt_bias: Vec<f32>,
    /// `−exp(A_log) [nv]`.
    pub neg_a: Vec<f32>,
    /// The gated output norm (plain weight, not 1+w) over `dv`.
    pub norm: RmsNorm,
    /// `[H, nv·dv]`.
    pub out_proj: Linear,
    /// Heads.
    pub shape: DeltaShape,
}

impl GatedDeltaNet {
    /// The same layer with its weights copied into process memory.
    pub fn to_resident(&self) -> GatedDeltaNet {
        GatedDeltaNet {
            proj: self.proj.to_resident(),
            conv_weight: self.conv_weight.clone(),
            conv_kernel: self.conv_kernel,
            dt_bias: self.dt_bias.clone(),
            neg_a: self.neg_a.clone(),
            norm: self.norm.clone(),
            out_proj: self.out_proj.to_resident(),
            shape: self.shape,
        }
    }

    /// Floats of the convolution state and of the recurrent state of one sequence.
    pub fn state_lens(&self) -> (usize, usize) {
        (
            (self.conv_kernel - 1) * self.channels(),
            self.shape.state_len(),
        )
    }

    fn channels(&self) -> usize {
        let s = self.shape;
        2 * s.n_k_heads * s.k_dim + s.n_v_heads * s.v_dim
    }

    /// Takes `state` back, after a recorded pass, to the state after the pass's first `keep`
    /// tokens ([`LinearState::take_back`]).
    pub(crate) fn take_back(&self, state: &mut LinearState, keep: usize) {
        let shape = self.shape;
        let trail = std::mem::take(&mut state.trail);
        let inputs = DeltaInputs {
            q: &trail.q,
            k: &trail.k,
            v: &trail.v,
            g: &trail.g,
            beta: &trail.beta,
        };
        let mut o = vec![0f32; shape.n_v_heads * shape.v_dim];
        state.take_back(keep, self.channels(), &trail, |t, s, next| {
            deltanet::gated_delta_step(shape, inputs.token(shape, t), s, next, &mut o)
        });
        state.trail = trail;
        state.trail.tokens = 0;
    }

    /// Runs `n` tokens after those `state` has seen; the new state goes to the state's pending
    /// buffers (committed with the rest of the pass).
    pub fn forward(
        &self,
        mode: ProductMode,
        x: &[f32],
        n: usize,
        state: &mut LinearState,
        out: &mut [f32],
    ) {
        let DeltaShape {
            n_k_heads: nk,
            n_v_heads: nv,
            k_dim: dk,
            v_dim: dv,
            ..
        } = self.shape;
        let c = self.channels();
        let r = nv / nk;
        let mut mixed = vec![0f32; n * c];
        let mut z = vec![0f32; n * nv * dv];
        let mut b = vec![0f32; n * nv];
        let mut a = vec![0f32; n * nv];
        match &self.proj {
            DeltaProjections::Separate {
                qkv,
                z: wz,
                b: wb,
                a: wa,
            } => {
                qkv.forward(mode, x, n, &mut mixed);
                wz.forward(mode, x, n, &mut z);
                wb.forward(mode, x, n, &mut b);
                wa.forward(mode, x, n, &mut a);
            }
            DeltaProjections::Fused { qkvz, ba } => {
                let group = 2 * dk + 2 * r * dv;
                let mut raw = vec![0f32; n * nk * group];
                qkvz.forward(mode, x, n, &mut raw);
                let mut raw_ba = vec![0f32; n * 2 * nv];
                ba.forward(mode, x, n, &mut raw_ba);
                for t in 0..n {
                    let m = &mut mixed[t * c..(t + 1) * c];
                    for g in 0..nk {
                        let src = &raw[(t * nk + g) * group..(t * nk + g + 1) * group];
                        m[g * dk..(g + 1) * dk].copy_from_slice(&src[..dk]);
                        m[nk * dk + g * dk..nk * dk + (g + 1) * dk]
                            .copy_from_slice(&src[dk..2 * dk]);
                        let v0 = 2 * nk * dk + g * r * dv;
                        m[v0..v0 + r * dv].copy_from_slice(&src[2 * dk..2 * dk + r * dv]);
                        z[t * nv * dv + g * r * dv..][..r * dv]
                            .copy_from_slice(&src[2 * dk + r * dv..]);
                        let sba = &raw_ba[(t * nk + g) * 2 * r..(t * nk + g + 1) * 2 * r];
                        b[t * nv + g * r..][..r].copy_from_slice(&sba[..r]);
                        a[t * nv + g * r..][..r].copy_from_slice(&sba[r..]);
                    }
                }
            }
        }
        let StateBuffers {
            conv: conv_state,
            recurrent: s,
            next_conv,
            next_recurrent: next_s,
            spare,
            trail,
        } = state.split();
        let mut xc = vec![0f32; n * c];
        deltanet::causal_conv1d_silu(
            &mixed,
            n,
            c,
            &self.conv_weight,
            self.conv_kernel,
            conv_state,
            next_conv,
            &mut xc,
        );
        let (qk, kk) = (nk * dk, 2 * nk * dk);
        let mut q = Vec::with_capacity(n * qk);
        let mut k = Vec::with_capacity(n * qk);
        let mut v = Vec::with_capacity(n * nv * dv);
        for row in xc.chunks_exact(c) {
            q.extend_from_slice(&row[..qk]);
            k.extend_from_slice(&row[qk..kk]);
            v.extend_from_slice(&row[kk..]);
        }
        deltanet::l2_normalize_rows(&mut q, dk, 1.0 / (dk as f32).sqrt());
        deltanet::l2_normalize_rows(&mut k, dk, 1.0);
        let beta: Vec<f32> = b.iter().map(|&x| deltanet::sigmoid(x)).collect();
        let g: Vec<f32> = a
            .iter()
            .enumerate()
            .map(|(i, &x)| self.neg_a[i % nv] * deltanet::softplus(x + self.dt_bias[i % nv]))
            .collect();
        let inputs = DeltaInputs {
            q: &q,
            k: &k,
            v: &v,
            g: &g,
            beta: &beta,
        };
        let mut o = vec![0f32; n * nv * dv];
        match mode {
            ProductMode::Decode(_) => {
                // n decode steps, each token with the bits it would have had alone.
                let vv = nv * dv;
                alternate_steps(n, s, next_s, spare, &mut |t, from, to| {
                    deltanet::gated_delta_step(
                        self.shape,
                        inputs.token(self.shape, t),
                        from,
                        to,
                        &mut o[t * vv..(t + 1) * vv],
                    )
                });
            }
            ProductMode::Prefill(_) => {
                deltanet::gated_delta_chunked(self.shape, n, inputs, s, next_s, &mut o)
            }
        }
        if let Some(trail) = trail {
            *trail = DeltaTrail {
                tokens: n,
                mixed,
                q,
                k,
                v,
                g,
                beta,
            };
        }
        // Gated RMSNorm per head: (w · o / rms(o)) · silu(z).
        for (oh, zh) in o.chunks_exact_mut(dv).zip(z.chunks_exact(dv)) {
            let ms = oh.iter().map(|v| v * v).sum::<f32>() / dv as f32;
            let inv = 1.0 / (ms + self.norm.eps).sqrt();
            for ((ov, &w), &zv) in oh.iter_mut().zip(&self.norm.weight).zip(zh) {
                *ov = (w * (*ov * inv)) * deltanet::silu(zv);
            }
        }
        self.out_proj.forward(mode, &o, n, out);
    }
}

/// The shared expert of Qwen3-Next / Qwen3.5-MoE blocks: `sigmoid(w_g · x) · MLP(x)`, added to
/// the routed experts' sum for every token.
pub struct SharedExpert {
    /// SwiGLU of width `Is`.
    pub mlp: Mlp,
    /// `[1, H]` gate.
    pub gate: Linear,
}

impl SharedExpert {
    fn to_resident(&self) -> SharedExpert {
        SharedExpert {
            mlp: self.mlp.to_resident(),
            gate: self.gate.to_resident(),
        }
    }

    /// Adds `sigmoid(gate(x)) · mlp(x)` to `out` for `n` rows.
    fn add_to(&self, mode: ProductMode, x: &[f32], n: usize, out: &mut [f32]) {
        let h = self.gate.cols;
        let mut y = vec![0f32; n * h];
        self.mlp.forward(mode, x, n, &mut y);
        let mut g = vec![0f32; n];
        self.gate.forward(mode, x, n, &mut g);
        for t in 0..n {
            let s = deltanet::sigmoid(g[t]);
            for (o, &v) in out[t * h..(t + 1) * h]
                .iter_mut()
                .zip(&y[t * h..(t + 1) * h])
            {
                *o += s * v;
            }
        }
    }
}

/// SwiGLU feed-forward: `down(silu(gate(x)) * up(x))`. Also one routed expert.
pub struct Mlp {
    /// `[F, H]`.
    pub gate_proj: Linear,
    /// `[F, H]`.
    pub up_proj: Linear,
    /// `[H, F]`.
    pub down_proj: Linear,
}

impl Mlp {
    /// Kernel views of the three projections.
    pub fn weights(&self) -> ExpertWeights<'_> {
        ExpertWeights {
            gate: self.gate_proj.matrix(),
            up: self.up_proj.matrix(),
            down: self.down_proj.matrix(),
        }
    }

    /// Applies the MLP to `n` rows of `x`.
    pub fn forward(&self, mode: ProductMode, x: &[f32], n: usize, out: &mut [f32]) {
        self.weights().forward(x, n, mode, out)
    }

    /// Bytes of weights.
    pub fn size_bytes(&self) -> usize {
        self.gate_proj.size_bytes() + self.up_proj.size_bytes() + self.down_proj.size_bytes()
    }

    /// The same MLP with its weights copied into process memory.
    pub fn to_resident(&self) -> Mlp {
        Mlp {
            gate_proj: self.gate_proj.to_resident(),
            up_proj: self.up_proj.to_resident(),
            down_proj: self.down_proj.to_resident(),
        }
    }
}

/// How router probabilities become expert weights.
#[derive(Clone, Copy, Debug)]
pub struct RouterRule {
    /// Experts per token (the model's own; `Model::set_top_k` overrides it at run time).
    pub top_k: usize,
    /// Divide the chosen probabilities by their sum.
    pub renormalize: bool,
}

/// The router of a sparse mixture-of-experts block:
/// `y = Σ_{e ∈ topk(softmax(router(x)))} w_e · Expert_e(x)`. The experts themselves live in the
/// [`ExpertStore`], which decides where their bytes come from.
pub struct SparseMoe {
    /// Router `[E, H]`.
    pub router: Linear,
    /// Top-k and normalisation.
    pub rule: RouterRule,
    /// Always-on expert with its own sigmoid gate (Qwen3-Next, Qwen3.5-MoE).
    pub shared: Option<SharedExpert>,
}

impl SparseMoe {
    /// The router and shared expert copied into process memory (the routed experts live in the
    /// store).
    pub fn to_resident(&self) -> SparseMoe {
        SparseMoe {
            router: self.router.to_resident(),
            rule: self.rule,
            shared: self.shared.as_ref().map(SharedExpert::to_resident),
        }
    }
}

/// Expert choices of one token: `(expert, weight)`, best first.
pub type Routing = Vec<(usize, f32)>;

impl SparseMoe {
    /// Routes each of `n` tokens: softmax over all experts (f32), then top-k, then optional
    /// renormalisation (transformers' `Qwen3MoeTopKRouter` / `MixtralTopKRouter`).
    pub fn route(&self, mode: ProductMode, x: &[f32], n: usize, top_k: usize) -> Vec<Routing> {
        let e = self.router.rows;
        let mut logits = vec![0f32; n * e];
        self.router.forward(mode, x, n, &mut logits);
        self.choose(&mut logits, top_k)
    }

    /// Routing from router logits `[n, E]` (overwritten with the probabilities).
    pub fn choose(&self, logits: &mut [f32], top_k: usize) -> Vec<Routing> {
        logits
            .chunks_exact_mut(self.router.rows)
            .map(|p| {
                ops::softmax(p);
                let mut chosen = ops::top_k(p, top_k);
                if self.rule.renormalize {
                    let s: f32 = chosen.iter().map(|c| c.1).sum();
                    chosen.iter_mut().for_each(|c| c.1 /= s);
                }
                chosen
            })
            .collect()
    }

    /// Applies layer `layer`'s experts, as `routing` chose them, to `n` rows of `x`. Each chosen
    /// expert runs once over all tokens that chose it (a matrix-matrix product in prefill);
    /// outputs are summed in ascending expert order, however the store delivers them.
    /// `prefetch` is passed on to the store. Returns the number of distinct experts applied.
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &self,
        mode: ProductMode,
        layer: usize,
        store: &ExpertStore,
        x: &[f32],
        n: usize,
        routing: &[Routing],
        prefetch: Option<(usize, &[usize])>,
        out: &mut [f32],
    ) -> Result<usize, StoreError> {
        let h = self.router.cols;
        let mut users: Vec<Vec<(usize, f32)>> = vec![vec![]; self.router.rows];
        for (t, r) in routing.iter().enumerate() {
            for &(e, w) in r {
                users[e].push((t, w));
            }
        }
        let active: Vec<usize> = (0..users.len()).filter(|&e| !users[e].is_empty()).collect();
        let mut last_token: Vec<usize> = routing
            .last()
            .map(|r| r.iter().map(|c| c.0).collect())
            .unwrap_or_default();
        last_token.sort_unstable();
        let results = store.with_experts(layer, &active, &last_token, prefetch, |i, w| {
            let tokens = &users[active[i]];
            let mut xs = Vec::with_capacity(tokens.len() * h);
            for &(t, _) in tokens {
                xs.extend_from_slice(&x[t * h..(t + 1) * h]);
            }
            let mut y = vec![0f32; tokens.len() * h];
            w.forward(&xs, tokens.len(), mode, &mut y);
            y
        })?;
        out[..n * h].fill(0.0);
        for (&e, y) in active.iter().zip(&results) {
            for (j, &(t, w)) in users[e].iter().enumerate() {
                for (o, &v) in out[t * h..(t + 1) * h]
                    .iter_mut()
                    .zip(&y[j * h..(j + 1) * h])
                {
                    *o += w * v;
                }
            }
        }
        if let Some(shared) = &self.shared {
            shared.add_to(mode, x, n, out);
        }
        Ok(active.len())
    }
}

/// The feed-forward half of a decoder layer.
#[allow(clippy::large_enum_variant)] // one per layer; boxing would only add an indirection
pub enum FeedForward {
    /// Dense SwiGLU MLP.
    Dense(Mlp),
    /// Routed experts.
    Sparse(SparseMoe),
}
