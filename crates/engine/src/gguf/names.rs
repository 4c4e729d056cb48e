//! Hugging Face tensor names ↔ llama.cpp GGUF names (MODELS.md 10.3) for the architectures
//! loaded from GGUF. Expert tensors are asked for under MLX's stacked names
//! (`mlp.switch_mlp.gate_proj.weight`), which have the same `[E, rows, cols]` layout as GGUF's
//! `ffn_gate_exps`.
//!
//! A Hugging Face name can have several GGUF candidates (`post_attention_layernorm` is
//! `ffn_norm` in `qwen3moe` files and `post_attention_norm` in the hybrids'); the source takes
//! the one its file holds. The multi-token-prediction head (`mtp.*`) lives in the blocks after
//! the trunk's (`blk.{n_layer + j}`, with `nextn.*` for its own tensors), as the converter's
//! `_QwenMtpMixin` writes it.

/// `(Hugging Face suffix after model.layers.N., GGUF suffix after blk.N.)`.
const LAYER: &[(&str, &str)] = &[
    ("input_layernorm.weight", "attn_norm.weight"),
    ("post_attention_layernorm.weight", "ffn_norm.weight"),
    (
        "post_attention_layernorm.weight",
        "post_attention_norm.weight",
    ),
    ("self_attn.q_proj.weight", "attn_q.weight"),
    ("self_attn.k_proj.weight", "attn_k.weight"),
    ("self_attn.v_proj.weight", "attn_v.weight"),
    ("self_attn.o_proj.weight", "attn_output.weight"),
    ("self_attn.q_norm.weight", "attn_q_norm.weight"),
    ("self_attn.k_norm.weight", "attn_k_norm.weight"),
    ("mlp.gate.weight", "ffn_gate_inp.weight"),
    ("mlp.switch_mlp.gate_proj.weight", "ffn_gate_exps.weight"),
    ("mlp.switch_mlp.up_proj.weight", "ffn_up_exps.weight"),
    ("mlp.switch_mlp.down_proj.weight", "ffn_down_exps.weight"),
    ("mlp.gate_proj.weight", "ffn_gate.weight"),
    ("mlp.up_proj.weight", "ffn_up.weight"),
    ("mlp.down_proj.weight", "ffn_down.weight"),
    // Mixtral's block name, asked for by its loader.
    ("block_sparse_moe.gate.weight", "ffn_gate_inp.weight"),
    // The shared expert of Qwen3-Next and Qwen3.5-MoE ([1, H] gate, or 1-D in some files).
    (
        "mlp.shared_expert.gate_proj.weight",
        "ffn_gate_shexp.weight",
    ),
    ("mlp.shared_expert.up_proj.weight", "ffn_up_shexp.weight"),
    (
        "mlp.shared_expert.down_proj.weight",
        "ffn_down_shexp.weight",
    ),
    ("mlp.shared_expert_gate.weight", "ffn_gate_inp_shexp.weight"),
    // Gated DeltaNet. Qwen3-Next's `in_proj_qkvz` arrives split into `attn_qkv` and
    // `attn_gate`, its `in_proj_ba` whole (`ssm_ba`, from which the source takes the b or a
    // rows); Qwen3.5's `in_proj_b`/`in_proj_a` are `ssm_beta`/`ssm_alpha`.
    ("linear_attn.in_proj_qkv.weight", "attn_qkv.weight"),
    ("linear_attn.in_proj_z.weight", "attn_gate.weight"),
    ("linear_attn.in_proj_b.weight", "ssm_beta.weight"),
    ("linear_attn.in_proj_b.weight", "ssm_ba.weight"),
    ("linear_attn.in_proj_a.weight", "ssm_alpha.weight"),
    ("linear_attn.in_proj_a.weight", "ssm_ba.weight"),
    ("linear_attn.conv1d.weight", "ssm_conv1d.weight"),
    ("linear_attn.dt_bias", "ssm_dt.bias"),
    // llama.cpp's own tensor: −exp(A_log), which has no Hugging Face name.
    ("linear_attn.ssm_a", "ssm_a"),
    ("linear_attn.norm.weight", "ssm_norm.weight"),
    ("linear_attn.out_proj.weight", "ssm_out.weight"),
];

const GLOBAL: &[(&str, &str)] = &[
    ("model.embed_tokens.weight", "token_embd.weight"),
    ("model.norm.weight", "output_norm.weight"),
    ("lm_head.weight", "output.weight"),
];

/// `(Hugging Face name, GGUF suffix after blk.{n_layer}.)` of the MTP head's own tensors.
const MTP: &[(&str, &str)] = &[
    ("mtp.fc.weight", "nextn.eh_proj.weight"),
    ("mtp.pre_fc_norm_embedding.weight", "nextn.enorm.weight"),
    ("mtp.pre_fc_norm_hidden.weight", "nextn.hnorm.weight"),
    ("mtp.norm.weight", "nextn.shared_head_norm.weight"),
];

/// The GGUF names Hugging Face tensor `hf` may have, most likely first, in a file whose trunk
/// has `trunk_layers` blocks.
pub(super) fn gguf_names(hf: &str, trunk_layers: usize) -> Vec<String> {
    if let Some(&(_, g)) = GLOBAL.iter().find(|(h, _)| *h == hf) {
        return vec![g.to_string()];
    }
    if let Some(&(_, g)) = MTP.iter().find(|(h, _)| *h == hf) {
        return vec![format!("blk.{trunk_layers}.{g}")];
    }
    let (offset, rest) = match hf.strip_prefix("model.layers.") {
        Some(rest) => (0, rest),
        None => match hf.strip_prefix("mtp.layers.") {
            Some(rest) => (trunk_layers, rest),
            None => return Vec::new(),
        },
    };
    let Some((layer, suffix)) = rest.split_once('.') else {
        return Vec::new();
    };
    let Ok(layer) = layer.parse::<usize>() else {
        return Vec::new();
    };
    LAYER
        .iter()
        .filter(|(h, _)| *h == suffix)
        .map(|(_, g)| format!("blk.{}.{g}", layer + offset))
        .collect()
}

/// The Hugging Face name of GGUF tensor `g` (the first match: `mlp.*` for the router,
/// `in_proj_b` for `ssm_ba`).
pub(super) fn hf_name(g: &str, trunk_layers: usize) -> Option<String> {
    if let Some(&(h, _)) = GLOBAL.iter().find(|(_, x)| *x == g) {
        return Some(h.to_string());
    }
    let rest = g.strip_prefix("blk.")?;
    let (layer, suffix) = rest.split_once('.')?;
    let layer = layer.parse::<usize>().ok()?;
    if layer >= trunk_layers {
        if let Some(&(h, _)) = MTP.iter().find(|(_, x)| *x == suffix) {
            return Some(h.to_string());
        }
    }
    let &(h, _) = LAYER.iter().find(|(_, x)| *x == suffix)?;
    Some(if layer >= trunk_layers {
        format!("mtp.layers.{}.{h}", layer - trunk_layers)
    } else {
        format!("model.layers.{layer}.{h}")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_both_ways() {
        assert_eq!(
            gguf_names("model.layers.3.mlp.switch_mlp.down_proj.weight", 8),
            ["blk.3.ffn_down_exps.weight"]
        );
        assert_eq!(gguf_names("lm_head.weight", 8), ["output.weight"]);
        assert!(gguf_names("model.layers.x.mlp.gate.weight", 8).is_empty());
        assert!(gguf_names("model.layers.0.mlp.experts.0.w1.weight", 8).is_empty());
        assert_eq!(
            gguf_names("model.layers.1.post_attention_layernorm.weight", 8),
            ["blk.1.ffn_norm.weight", "blk.1.post_attention_norm.weight"]
        );
        for (h, g) in [
            (
                "model.layers.5.self_attn.k_norm.weight",
                "blk.5.attn_k_norm.weight",
            ),
            ("model.embed_tokens.weight", "token_embd.weight"),
            ("model.layers.2.linear_attn.ssm_a", "blk.2.ssm_a"),
            ("mtp.fc.weight", "blk.8.nextn.eh_proj.weight"),
            ("mtp.norm.weight", "blk.8.nextn.shared_head_norm.weight"),
            (
                "mtp.layers.0.self_attn.q_proj.weight",
                "blk.8.attn_q.weight",
            ),
            (
                "mtp.layers.0.mlp.shared_expert_gate.weight",
                "blk.8.ffn_gate_inp_shexp.weight",
            ),
        ] {
            assert_eq!(gguf_names(h, 8)[0], g);
            assert_eq!(hf_name(g, 8).as_deref(), Some(h));
        }
    }
}
