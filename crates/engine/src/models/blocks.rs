//! The blocks every supported decoder is built from: RMSNorm, grouped-query attention with RoPE,
//! the SwiGLU MLP, and the sparse mixture-of-experts block with its router.
//!
//! Activations are f32 row-major `[n_tokens, width]`; every block processes a batch of tokens at
//! once (prefill) or one (decode) through the same code.
use crate::cache::LayerKv;
use crate::store::{ExpertStore, ExpertWeights, StoreError};
use crate::weights::Linear;
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
        }
    }

    /// `out = o_proj(softmax(q kᵀ / sqrt(D)) v)` for `n` tokens at positions `start..start + n`,
    /// appending their keys and values to `kv`.
    pub fn forward(
        &self,
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
        self.q_proj.forward(x, n, &mut q);
        self.k_proj.forward(x, n, &mut k);
        self.v_proj.forward(x, n, &mut v);
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
        self.o_proj.forward(&o, n, out);
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
    pub fn forward(&self, x: &[f32], n: usize, out: &mut [f32]) {
        self.weights().forward(x, n, out)
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
}

/// Expert choices of one token: `(expert, weight)`, best first.
pub type Routing = Vec<(usize, f32)>;

impl SparseMoe {
    /// Routes each of `n` tokens: softmax over all experts (f32), then top-k, then optional
    /// renormalisation (transformers' `Qwen3MoeTopKRouter` / `MixtralTopKRouter`).
    pub fn route(&self, x: &[f32], n: usize, top_k: usize) -> Vec<Routing> {
        let e = self.router.rows;
        let mut logits = vec![0f32; n * e];
        self.router.forward(x, n, &mut logits);
        logits
            .chunks_exact_mut(e)
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
    /// `prefetch` is passed on to the store.
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &self,
        layer: usize,
        store: &ExpertStore,
        x: &[f32],
        n: usize,
        routing: &[Routing],
        prefetch: Option<(usize, &[usize])>,
        out: &mut [f32],
    ) -> Result<(), StoreError> {
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
            w.forward(&xs, tokens.len(), &mut y);
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
        Ok(())
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
