//! Hugging Face tensor names ↔ llama.cpp GGUF names (MODELS.md 10.3) for the architectures
//! loaded from GGUF. Expert tensors are asked for under MLX's stacked names
//! (`mlp.switch_mlp.gate_proj.weight`), which have the same `[E, rows, cols]` layout as GGUF's
//! `ffn_gate_exps`.

/// `(Hugging Face suffix after model.layers.N., GGUF suffix after blk.N.)`.
const LAYER: &[(&str, &str)] = &[
    ("input_layernorm.weight", "attn_norm.weight"),
    ("post_attention_layernorm.weight", "ffn_norm.weight"),
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
];

const GLOBAL: &[(&str, &str)] = &[
    ("model.embed_tokens.weight", "token_embd.weight"),
    ("model.norm.weight", "output_norm.weight"),
    ("lm_head.weight", "output.weight"),
];

/// The GGUF name of Hugging Face tensor `hf`.
pub(super) fn gguf_name(hf: &str) -> Option<String> {
    if let Some(&(_, g)) = GLOBAL.iter().find(|(h, _)| *h == hf) {
        return Some(g.to_string());
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, suffix) = rest.split_once('.')?;
    layer.parse::<usize>().ok()?;
    let &(_, g) = LAYER.iter().find(|(h, _)| *h == suffix)?;
    Some(format!("blk.{layer}.{g}"))
}

/// The Hugging Face name of GGUF tensor `g` (the first match, `mlp.*` for the router).
pub(super) fn hf_name(g: &str) -> Option<String> {
    if let Some(&(h, _)) = GLOBAL.iter().find(|(_, x)| *x == g) {
        return Some(h.to_string());
    }
    let rest = g.strip_prefix("blk.")?;
    let (layer, suffix) = rest.split_once('.')?;
    layer.parse::<usize>().ok()?;
    let &(h, _) = LAYER.iter().find(|(_, x)| *x == suffix)?;
    Some(format!("model.layers.{layer}.{h}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_both_ways() {
        assert_eq!(
            gguf_name("model.layers.3.mlp.switch_mlp.down_proj.weight").as_deref(),
            Some("blk.3.ffn_down_exps.weight")
        );
        assert_eq!(
            gguf_name("lm_head.weight").as_deref(),
            Some("output.weight")
        );
        assert_eq!(gguf_name("model.layers.x.mlp.gate.weight"), None);
        assert_eq!(gguf_name("model.layers.0.mlp.experts.0.w1.weight"), None);
        for (h, g) in [
            (
                "model.layers.12.self_attn.k_norm.weight",
                "blk.12.attn_k_norm.weight",
            ),
            ("model.embed_tokens.weight", "token_embd.weight"),
        ] {
            assert_eq!(gguf_name(h).as_deref(), Some(g));
            assert_eq!(hf_name(g).as_deref(), Some(h));
        }
    }
}
