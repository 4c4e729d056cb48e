//! Qwen3 (dense) and Qwen3-MoE (transformers `Qwen3ForCausalLM`, `Qwen3MoeForCausalLM`).
//!
//! Attention has per-head RMSNorm on queries and keys before RoPE. Layer `l` is MoE iff
//! `l ∉ mlp_only_layers` and `(l + 1) % decoder_sparse_step == 0`; the router takes the softmax
//! over all experts first, then the top-k, renormalised only when `norm_topk_prob`.
use super::blocks::{FeedForward, RouterRule, SparseMoe};
use super::loading::{attention, experts, lm_head, mlp, norm};
use super::{DecoderLayer, Mixer, Model};
use crate::config::ModelConfig;
use crate::store::ExpertStore;
use crate::weights::WeightLoader;
use moestream_formats::FormatError;

const MLP_NAMES: [&str; 3] = ["gate_proj", "up_proj", "down_proj"];

/// Builds the model from `model.*` / `lm_head` tensors.
pub fn load(c: ModelConfig, l: &WeightLoader) -> Result<Model, FormatError> {
    let (h, eps) = (c.hidden_size, c.rms_norm_eps);
    let embed = l.linear("model.embed_tokens", c.vocab_size, h)?;
    let mut layers = Vec::with_capacity(c.num_hidden_layers);
    let mut layer_experts = Vec::with_capacity(c.num_hidden_layers);
    for i in 0..c.num_hidden_layers {
        let p = format!("model.layers.{i}");
        let ffn = if c.is_moe_layer(i) {
            layer_experts.push(experts(l, &format!("{p}.mlp"), MLP_NAMES, &c)?);
            FeedForward::Sparse(SparseMoe {
                router: l.linear(&format!("{p}.mlp.gate"), c.num_experts, h)?,
                rule: RouterRule {
                    top_k: c.num_experts_per_tok,
                    renormalize: c.norm_topk_prob,
                },
                shared: None,
            })
        } else {
            layer_experts.push(Vec::new());
            FeedForward::Dense(mlp(
                l,
                &format!("{p}.mlp"),
                MLP_NAMES,
                h,
                c.intermediate_size,
            )?)
        };
        layers.push(DecoderLayer {
            input_layernorm: norm(l, &format!("{p}.input_layernorm.weight"), h, eps)?,
            mixer: Mixer::Attention(attention(l, &format!("{p}.self_attn"), &c, true)?),
            post_attention_layernorm: norm(
                l,
                &format!("{p}.post_attention_layernorm.weight"),
                h,
                eps,
            )?,
            mlp: ffn,
        });
    }
    let final_norm = norm(l, "model.norm.weight", h, eps)?;
    let head = lm_head(l, &c, &embed)?;
    Ok(Model::new(
        c,
        embed,
        layers,
        ExpertStore::resident(layer_experts),
        final_norm,
        head,
    ))
}
