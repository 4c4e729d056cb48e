//! Model families. Each file builds a [`Model`] from a checkpoint by naming its tensors; the
//! forward pass is shared, because Qwen3, Qwen3-MoE and Mixtral are the same pre-norm decoder:
//!
//! ```text
//! h   = x + Attention(RMSNorm(x))
//! out = h + FeedForward(RMSNorm(h))          FeedForward = dense SwiGLU MLP or sparse MoE
//! logits = lm_head(RMSNorm(out_L))
//! ```
pub mod blocks;
mod loading;
pub mod mixtral;
pub mod qwen3_moe;

use crate::cache::KvCache;
use crate::config::{Arch, ModelConfig};
use crate::weights::Linear;
use blocks::{Attention, FeedForward, RmsNorm};
use moestream_kernels::ops::Rope;

pub use loading::LoadError;

/// One decoder layer.
pub struct DecoderLayer {
    /// Norm before attention.
    pub input_layernorm: RmsNorm,
    /// Self-attention.
    pub self_attn: Attention,
    /// Norm before the feed-forward block.
    pub post_attention_layernorm: RmsNorm,
    /// Dense MLP or MoE.
    pub mlp: FeedForward,
}

impl DecoderLayer {
    /// Updates the residual stream `x` (`[n, H]`) in place.
    fn forward(
        &self,
        x: &mut [f32],
        n: usize,
        start: usize,
        rope: &Rope,
        kv: &mut crate::cache::LayerKv,
    ) {
        let mut normed = vec![0f32; x.len()];
        let mut delta = vec![0f32; x.len()];
        self.input_layernorm.forward(x, &mut normed);
        self.self_attn
            .forward(&normed, n, start, rope, kv, &mut delta);
        add_into(x, &delta);
        self.post_attention_layernorm.forward(x, &mut normed);
        self.mlp.forward(&normed, n, &mut delta);
        add_into(x, &delta);
    }
}

fn add_into(x: &mut [f32], d: &[f32]) {
    for (a, b) in x.iter_mut().zip(d) {
        *a += b;
    }
}

/// Which positions need logits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Logits {
    /// Only the last token's (generation).
    Last,
    /// Every token's (scoring).
    All,
}

/// A loaded decoder-only language model.
pub struct Model {
    /// Its configuration.
    pub config: ModelConfig,
    /// `[V, H]` token embeddings.
    pub embed_tokens: Linear,
    /// Decoder layers.
    pub layers: Vec<DecoderLayer>,
    /// Final norm.
    pub norm: RmsNorm,
    /// `[V, H]` output projection (the embedding itself when tied).
    pub lm_head: Linear,
    rope: Rope,
}

impl Model {
    /// Assembles a model from its parts.
    pub fn new(
        config: ModelConfig,
        embed_tokens: Linear,
        layers: Vec<DecoderLayer>,
        norm: RmsNorm,
        lm_head: Linear,
    ) -> Model {
        let rope = Rope::new(config.head_dim, config.rope_theta);
        Model {
            config,
            embed_tokens,
            layers,
            norm,
            lm_head,
            rope,
        }
    }

    /// Loads the model in `dir` (config.json + safetensors).
    pub fn load(dir: &std::path::Path) -> Result<Model, LoadError> {
        loading::load(dir)
    }

    /// An empty KV cache sized for this model.
    pub fn new_cache(&self, reserve_tokens: usize) -> KvCache {
        let c = &self.config;
        KvCache::new(
            c.num_hidden_layers,
            c.num_key_value_heads * c.head_dim,
            reserve_tokens,
        )
    }

    /// Runs `tokens` after what `cache` holds; returns logits `[rows, V]` for the positions asked.
    /// Token ids must be below `vocab_size` (checked by callers that take outside input:
    /// [`Model::check_tokens`]).
    pub fn forward(&self, tokens: &[u32], cache: &mut KvCache, want: Logits) -> Vec<f32> {
        let h = self.config.hidden_size;
        let n = tokens.len();
        let start = cache.len();
        let mut x = vec![0f32; n * h];
        for (t, &id) in tokens.iter().enumerate() {
            moestream_kernels::dequantize_row(
                &self.embed_tokens.matrix(),
                id as usize,
                &mut x[t * h..(t + 1) * h],
            );
        }
        for (layer, kv) in self.layers.iter().zip(cache.layers.iter_mut()) {
            layer.forward(&mut x, n, start, &self.rope, kv);
        }
        cache.advance(n);
        let rows: &[f32] = match want {
            Logits::All => &x,
            Logits::Last => &x[(n - 1) * h..],
        };
        let m = rows.len() / h;
        let mut normed = vec![0f32; rows.len()];
        self.norm.forward(rows, &mut normed);
        let mut logits = vec![0f32; m * self.config.vocab_size];
        self.lm_head.forward(&normed, m, &mut logits);
        logits
    }

    /// Errors if any token id is outside the vocabulary.
    pub fn check_tokens(&self, tokens: &[u32]) -> Result<(), String> {
        match tokens
            .iter()
            .find(|&&t| t as usize >= self.config.vocab_size)
        {
            Some(t) => Err(format!(
                "token id {t} is outside the vocabulary (size {})",
                self.config.vocab_size
            )),
            None => Ok(()),
        }
    }

    /// The architecture.
    pub fn arch(&self) -> Arch {
        self.config.arch
    }
}
