//! Mixtral (transformers `MixtralForCausalLM`).
//!
//! Llama attention (no q/k norm), every layer sparse: `block_sparse_moe` with experts `w1` (gate),
//! `w3` (up), `w2` (down); the router always renormalises its top-k probabilities. transformers 5
//! fused checkpoints rename the block to `mlp` with `experts.gate_up_proj`; both are read.
use super::blocks::{FeedForward, RouterRule, SparseMoe};
use super::loading::{attention, experts, lm_head, norm};
use super::{DecoderLayer, Mixer, Model};
use crate::config::ModelConfig;
use crate::store::ExpertStore;
use crate::weights::WeightLoader;
use moestream_formats::FormatError;

const EXPERT_NAMES: [&str; 3] = ["w1", "w3", "w2"];

/// Builds the model from `model.*` / `lm_head` tensors.
pub fn load(c: ModelConfig, l: &WeightLoader) -> Result<Model, FormatError> {
    let (h, eps) = (c.hidden_size, c.rms_norm_eps);
    let embed = l.linear("model.embed_tokens", c.vocab_size, h)?;
    let mut layers = Vec::with_capacity(c.num_hidden_layers);
    let mut layer_experts = Vec::with_capacity(c.num_hidden_layers);
    for i in 0..c.num_hidden_layers {
        let p = format!("model.layers.{i}");
        let fused = l.has(&format!("{p}.mlp.experts.gate_up_proj"))
            || l.has(&format!("{p}.mlp.gate.weight"));
        let moe = if fused {
            format!("{p}.mlp")
        } else {
            format!("{p}.block_sparse_moe")
        };
        let names = if fused {
            ["gate_proj", "up_proj", "down_proj"]
        } else {
            EXPERT_NAMES
        };
        layer_experts.push(experts(l, &moe, names, &c)?);
        layers.push(DecoderLayer {
            input_layernorm: norm(l, &format!("{p}.input_layernorm.weight"), h, eps)?,
            mixer: Mixer::Attention(attention(l, &format!("{p}.self_attn"), &c, false)?),
            post_attention_layernorm: norm(
                l,
                &format!("{p}.post_attention_layernorm.weight"),
                h,
                eps,
            )?,
            mlp: FeedForward::Sparse(SparseMoe {
                router: l.linear(&format!("{moe}.gate"), c.num_experts, h)?,
                rule: RouterRule {
                    top_k: c.num_experts_per_tok,
                    renormalize: true,
                },
                shared: None,
            }),
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
