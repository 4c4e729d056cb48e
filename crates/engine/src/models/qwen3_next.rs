//! Qwen3-Next and Qwen3.5, dense and MoE (transformers `Qwen3NextForCausalLM`,
//! `Qwen3_5ForCausalLM`, `Qwen3_5MoeForCausalLM` and the text half of the `*ForConditionalGeneration`
//! checkpoints).
//!
//! Hybrid decoders: three of every four layers (`layer_types`) mix tokens with a Gated DeltaNet
//! (a recurrent state, no KV cache), the fourth with gated full attention (`q_proj` yields a
//! sigmoid gate per head; partial RoPE on the first quarter of each head). Norms are
//! zero-centred, `y = x/rms(x) · (1 + w)`: transformers stores `w`, mlx-lm and GGUF store `1 + w`.
//! Which one a checkpoint holds follows from its convolution kernels, as mlx-lm decides it:
//! transformers' layout `[C, 1, K]` means `w`, MLX's `[C, K, 1]` means `1 + w`; GGUF files
//! (convolutions `[C, K]`) hold `1 + w` whatever their shapes (the gated norm inside the DeltaNet is never
//! shifted). GGUF files come through
//! [`crate::gguf`] under these Hugging Face names, with llama.cpp's `ssm_a = −exp(A_log)` read
//! as it is and, for Qwen3.5, value heads in tiled order (`DeltaShape::order`). MoE layers add a shared expert with a sigmoid gate;
//! Qwen3.5's router always renormalises its top-k.
//!
//! Tensor prefixes: `model.` (causal-LM checkpoints), `model.language_model.` (transformers'
//! vision-language Qwen3.5; `model.visual.*` is ignored), `language_model.model.` (mlx-lm's
//! Qwen3.5, with `language_model.lm_head`).
use super::blocks::{
    DeltaProjections, FeedForward, GatedDeltaNet, Mlp, RmsNorm, RouterRule, SharedExpert, SparseMoe,
};
use super::loading::{attention_with, experts, mlp, NormReader};
use super::{DecoderLayer, Mixer, Model, MtpHead};
use crate::config::{Arch, LayerKind, ModelConfig};
use crate::store::ExpertStore;
use crate::weights::{Linear, WeightLoader};
use moestream_formats::FormatError;
use moestream_kernels::deltanet::{DeltaShape, ValueHeadOrder};

const MLP_NAMES: [&str; 3] = ["gate_proj", "up_proj", "down_proj"];

/// Where the decoder's tensors are and where `lm_head` is.
fn prefixes(l: &WeightLoader) -> (&'static str, &'static str) {
    for (p, head) in [
        ("model.language_model.", "lm_head"),
        ("language_model.model.", "language_model.lm_head"),
    ] {
        if l.has(&format!("{p}embed_tokens.weight")) {
            return (p, head);
        }
    }
    ("model.", "lm_head")
}

/// Builds the model.
pub fn load(c: ModelConfig, l: &WeightLoader) -> Result<Model, FormatError> {
    let (h, eps) = (c.hidden_size, c.rms_norm_eps);
    let (p, head_name) = prefixes(l);
    let lin = c
        .linear
        .expect("hybrid configs have linear-attention geometry");
    let shape = DeltaShape {
        n_k_heads: lin.num_key_heads,
        n_v_heads: lin.num_value_heads,
        k_dim: lin.key_head_dim,
        v_dim: lin.value_head_dim,
        order: if lin.tiled_value_heads {
            ValueHeadOrder::Tiled
        } else {
            ValueHeadOrder::Grouped
        },
    };
    let (channels, k) = (lin.conv_channels(), lin.conv_kernel);
    // transformers' checkpoints keep `w` of the (1 + w) norms, mlx-lm's add the 1 (see above).
    let first_linear = c
        .layer_types
        .iter()
        .position(|&t| t == LayerKind::LinearAttention);
    // llama.cpp's converter adds the 1 whatever shape its convolutions have.
    let add_one = match first_linear {
        _ if l.is_gguf() => false,
        Some(i) => {
            let name = format!("{p}layers.{i}.linear_attn.conv1d.weight");
            l.floats(&name, &conv_shapes(channels, k))?.1 == 0
        }
        None => true,
    };
    let zero_centred = &|name: &str, len: usize| -> Result<RmsNorm, FormatError> {
        let mut weight = l.vector(name, len)?;
        if add_one {
            weight.iter_mut().for_each(|w| *w += 1.0);
        }
        Ok(RmsNorm { weight, eps })
    };
    let embed = l.linear(&format!("{p}embed_tokens"), c.vocab_size, h)?;
    let mut layers = Vec::with_capacity(c.num_hidden_layers);
    let mut layer_experts = Vec::with_capacity(c.num_hidden_layers);
    for (i, &kind) in c.layer_types.iter().enumerate() {
        let lp = format!("{p}layers.{i}");
        let (layer, experts) =
            decoder_layer(l, &lp, kind, c.is_moe_layer(i), &c, shape, &zero_centred)?;
        layers.push(layer);
        layer_experts.push(experts);
    }
    let final_norm = zero_centred(&format!("{p}norm.weight"), h)?;
    let head = if c.tie_word_embeddings && !l.has(&format!("{head_name}.weight")) {
        embed.clone()
    } else {
        l.linear(head_name, c.vocab_size, h)?
    };
    let mtp = mtp_head(l, &c, shape, &zero_centred)?;
    let mut model = Model::new(
        c,
        embed,
        layers,
        ExpertStore::resident(layer_experts),
        final_norm,
        head,
    );
    model.mtp = mtp;
    Ok(model)
}

/// Decoder layer `{lp}` of the given kind, with its routed experts when `moe` (empty otherwise).
fn decoder_layer(
    l: &WeightLoader,
    lp: &str,
    kind: LayerKind,
    moe: bool,
    c: &ModelConfig,
    shape: DeltaShape,
    zero_centred: NormReader,
) -> Result<(DecoderLayer, Vec<Mlp>), FormatError> {
    let h = c.hidden_size;
    let mixer = match kind {
        LayerKind::FullAttention => Mixer::Attention(attention_with(
            l,
            &format!("{lp}.self_attn"),
            c,
            Some(zero_centred),
            true,
        )?),
        LayerKind::LinearAttention => Mixer::Linear(delta_net(
            l,
            &format!("{lp}.linear_attn"),
            c,
            shape,
            c.rms_norm_eps,
        )?),
    };
    let mp = format!("{lp}.mlp");
    let (ffn, routed) = if moe {
        let routed = experts(l, &mp, MLP_NAMES, c)?;
        let shared = if c.shared_expert_intermediate_size > 0 {
            Some(SharedExpert {
                mlp: mlp(
                    l,
                    &format!("{mp}.shared_expert"),
                    MLP_NAMES,
                    h,
                    c.shared_expert_intermediate_size,
                )?,
                gate: l.linear(&format!("{mp}.shared_expert_gate"), 1, h)?,
            })
        } else {
            None
        };
        let sparse = FeedForward::Sparse(SparseMoe {
            router: l.linear(&format!("{mp}.gate"), c.num_experts, h)?,
            rule: RouterRule {
                top_k: c.num_experts_per_tok,
                renormalize: c.norm_topk_prob || c.arch == Arch::Qwen35Moe,
            },
            shared,
        });
        (sparse, routed)
    } else {
        let dense = mlp(l, &mp, MLP_NAMES, h, c.intermediate_size)?;
        (FeedForward::Dense(dense), Vec::new())
    };
    let layer = DecoderLayer {
        input_layernorm: zero_centred(&format!("{lp}.input_layernorm.weight"), h)?,
        mixer,
        post_attention_layernorm: zero_centred(
            &format!("{lp}.post_attention_layernorm.weight"),
            h,
        )?,
        mlp: ffn,
    };
    Ok((layer, routed))
}

/// The multi-token-prediction head (`mtp.*`, MODELS.md §5.5), when the checkpoint ships one:
/// `mtp.fc` over `[norm(embedding) ; norm(hidden)]`, then full-attention decoder layers of the
/// trunk's kind (`mtp.layers.{j}`, MoE when the trunk is), then `mtp.norm`; the embedding and
/// `lm_head` are the trunk's. mlx-lm drops these tensors on conversion, so MLX checkpoints have
/// none. A partial head (some tensors missing) is an error naming the first missing one.
fn mtp_head(
    l: &WeightLoader,
    c: &ModelConfig,
    shape: DeltaShape,
    zero_centred: NormReader,
) -> Result<Option<MtpHead>, FormatError> {
    let names: Vec<String> = l
        .tensor_names()
        .into_iter()
        .filter(|n| n.starts_with("mtp."))
        .collect();
    if names.is_empty() {
        return Ok(None);
    }
    let h = c.hidden_size;
    let moe = c.num_experts > 0 && c.arch.is_moe();
    // The layers present, and at least as many as the config says (1 in every release): a
    // missing one is then an error naming its first tensor.
    let present = (0..)
        .take_while(|j| l.has(&format!("mtp.layers.{j}.input_layernorm.weight")))
        .count();
    let (mut layers, mut layer_experts) = (Vec::new(), Vec::new());
    for j in 0..present.max(c.mtp_num_hidden_layers) {
        let lp = format!("mtp.layers.{j}");
        let (layer, routed) = decoder_layer(
            l,
            &lp,
            LayerKind::FullAttention,
            moe,
            c,
            shape,
            zero_centred,
        )?;
        layers.push(layer);
        layer_experts.push(routed);
    }
    Ok(Some(MtpHead {
        pre_fc_norm_embedding: zero_centred("mtp.pre_fc_norm_embedding.weight", h)?,
        pre_fc_norm_hidden: zero_centred("mtp.pre_fc_norm_hidden.weight", h)?,
        fc: l.linear("mtp.fc", h, 2 * h)?,
        layers,
        experts: ExpertStore::resident(layer_experts),
        norm: zero_centred("mtp.norm.weight", h)?,
        tensors: names,
    }))
}

/// The shapes a depthwise convolution kernel is stored in: transformers' `[C, 1, K]` (its norms
/// store `w`), mlx-lm's `[C, K, 1]` and llama.cpp's squeezed `[C, K]` (both store `1 + w`).
/// All hold channel c's taps at c·K .. c·K + K.
fn conv_shapes(channels: usize, k: usize) -> [Vec<usize>; 3] {
    [
        vec![channels, 1, k],
        vec![channels, k, 1],
        vec![channels, k],
    ]
}

/// A Gated DeltaNet layer `{p}` (`linear_attn`), with Qwen3.5's separate or Qwen3-Next's fused
/// input projections.
fn delta_net(
    l: &WeightLoader,
    p: &str,
    c: &ModelConfig,
    shape: DeltaShape,
    eps: f32,
) -> Result<GatedDeltaNet, FormatError> {
    let h = c.hidden_size;
    let lin = c
        .linear
        .expect("hybrid configs have linear-attention geometry");
    let DeltaShape {
        n_k_heads: nk,
        n_v_heads: nv,
        k_dim: dk,
        v_dim: dv,
        ..
    } = shape;
    let proj = if l.has(&format!("{p}.in_proj_qkvz.weight")) {
        DeltaProjections::Fused {
            qkvz: l.linear(&format!("{p}.in_proj_qkvz"), 2 * nk * dk + 2 * nv * dv, h)?,
            ba: l.linear(&format!("{p}.in_proj_ba"), 2 * nv, h)?,
        }
    } else {
        let lin_of = |n: &str, rows| -> Result<Linear, FormatError> {
            l.linear(&format!("{p}.{n}"), rows, h)
        };
        DeltaProjections::Separate {
            qkv: lin_of("in_proj_qkv", 2 * nk * dk + nv * dv)?,
            z: lin_of("in_proj_z", nv * dv)?,
            b: lin_of("in_proj_b", nv)?,
            a: lin_of("in_proj_a", nv)?,
        }
    };
    let (channels, k) = (lin.conv_channels(), lin.conv_kernel);
    let (conv_weight, _) = l.floats(&format!("{p}.conv1d.weight"), &conv_shapes(channels, k))?;
    // GGUF files hold −exp(A_log) itself (`ssm_a`): read as it is, it needs no log/exp round trip.
    let neg_a = if l.has(&format!("{p}.ssm_a")) {
        l.vector(&format!("{p}.ssm_a"), nv)?
    } else {
        let a_log = l.vector(&format!("{p}.A_log"), nv)?;
        a_log.iter().map(|a| -a.exp()).collect()
    };
    Ok(GatedDeltaNet {
        proj,
        conv_weight,
        conv_kernel: k,
        dt_bias: l.vector(&format!("{p}.dt_bias"), nv)?,
        neg_a,
        norm: RmsNorm {
            weight: l.vector(&format!("{p}.norm.weight"), dv)?,
            eps,
        },
        out_proj: l.linear(&format!("{p}.out_proj"), h, nv * dv)?,
        shape,
    })
}
