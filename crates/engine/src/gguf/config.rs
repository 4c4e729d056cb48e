//! The model configuration of a GGUF file, rebuilt as the `config.json` object transformers
//! would have, from the `{arch}.*` metadata (MODELS.md 10.5), then parsed by the same code as a
//! checkpoint's `config.json`.
use super::GgufSource;
use crate::config::{ConfigError, GenerationConfig, ModelConfig};
use serde_json::{json, Map, Value};

impl GgufSource {
    fn meta(&self, key: &str) -> Option<&moestream_formats::gguf::MetadataValue> {
        self.index.get_metadata(key)
    }

    fn arch_u64(&self, key: &str) -> Option<u64> {
        self.meta(&format!("{}.{key}", self.arch))
            .and_then(|v| v.as_u64())
    }

    fn arch_f64(&self, key: &str) -> Option<f64> {
        self.meta(&format!("{}.{key}", self.arch))
            .and_then(|v| v.as_f64())
    }

    fn config_error(&self, reason: String) -> ConfigError {
        ConfigError {
            path: self.index.path().to_path_buf(),
            reason,
        }
    }

    /// The `config.json` object this file's metadata describe.
    pub fn config_json(&self) -> Result<Value, ConfigError> {
        let arch = self.arch.as_str();
        let need = |key: &str| {
            self.arch_u64(key).ok_or_else(|| {
                self.config_error(format!(
                    "metadata `{arch}.{key}` is missing or not an integer"
                ))
            })
        };
        let n_layers = need("block_count")?;
        let experts = self.arch_u64("expert_count").unwrap_or(0);
        let model_type = match arch {
            "qwen3moe" => "qwen3_moe",
            "qwen3" => "qwen3",
            "llama" if experts > 0 => "mixtral",
            "llama" => {
                return Err(self.config_error(
                    "dense `llama` models are not supported (llama files with experts, Mixtral, are)".into(),
                ))
            }
            other => {
                return Err(self.config_error(format!(
                    "GGUF architecture `{other}` is not supported (supported: qwen3moe, qwen3, llama with experts)"
                )))
            }
        };
        let vocab = self
            .index
            .get("token_embd.weight")
            .and_then(|t| t.dims.get(1).copied())
            .ok_or_else(|| self.config_error("no 2-D tensor `token_embd.weight`".into()))?;
        let hidden = need("embedding_length")?;
        let heads = need("attention.head_count")?;
        let head_dim = self
            .arch_u64("attention.key_length")
            .unwrap_or(hidden / heads.max(1));
        let mut c = Map::new();
        c.insert("model_type".into(), json!(model_type));
        c.insert("vocab_size".into(), json!(vocab));
        c.insert("hidden_size".into(), json!(hidden));
        c.insert("num_hidden_layers".into(), json!(n_layers));
        c.insert("num_attention_heads".into(), json!(heads));
        c.insert(
            "num_key_value_heads".into(),
            json!(self.arch_u64("attention.head_count_kv").unwrap_or(heads)),
        );
        c.insert("head_dim".into(), json!(head_dim));
        c.insert(
            "rms_norm_eps".into(),
            json!(self
                .arch_f64("attention.layer_norm_rms_epsilon")
                .unwrap_or(1e-6)),
        );
        c.insert(
            "rope_theta".into(),
            json!(self.arch_f64("rope.freq_base").unwrap_or(10000.0)),
        );
        if let Some(rot) = self.arch_u64("rope.dimension_count") {
            if rot != head_dim {
                c.insert(
                    "partial_rotary_factor".into(),
                    json!(rot as f64 / head_dim.max(1) as f64),
                );
            }
        }
        if let Some(t) = self
            .meta(&format!("{arch}.rope.scaling.type"))
            .and_then(|v| v.as_str())
        {
            if t != "none" {
                c.insert("rope_scaling".into(), json!({ "rope_type": t }));
            }
        }
        c.insert(
            "max_position_embeddings".into(),
            json!(self.arch_u64("context_length").unwrap_or(4096)),
        );
        c.insert(
            "tie_word_embeddings".into(),
            json!(!self.index.contains("output.weight")),
        );
        c.insert(
            "intermediate_size".into(),
            json!(self.arch_u64("feed_forward_length").unwrap_or(0)),
        );
        if experts > 0 {
            c.insert("num_experts".into(), json!(experts));
            c.insert("num_local_experts".into(), json!(experts));
            c.insert(
                "num_experts_per_tok".into(),
                json!(need("expert_used_count")?),
            );
            let expert_ff = self
                .arch_u64("expert_feed_forward_length")
                .or_else(|| self.arch_u64("feed_forward_length"));
            c.insert("moe_intermediate_size".into(), json!(expert_ff));
            if model_type == "mixtral" {
                c.insert("intermediate_size".into(), json!(expert_ff));
            }
            // llama.cpp renormalises qwen3moe's top-k weights unless the file says otherwise.
            let norm = self
                .meta(&format!("{arch}.expert_weights_norm"))
                .and_then(|v| v.as_bool())
                .unwrap_or(true);
            c.insert("norm_topk_prob".into(), json!(norm));
            // Layers without a router are dense (Qwen3-MoE's mlp_only_layers).
            let dense: Vec<u64> = (0..n_layers)
                .filter(|l| !self.index.contains(&format!("blk.{l}.ffn_gate_inp.weight")))
                .collect();
            c.insert("decoder_sparse_step".into(), json!(1));
            c.insert("mlp_only_layers".into(), json!(dense));
        }
        Ok(Value::Object(c))
    }

    /// The model configuration.
    pub fn model_config(&self) -> Result<ModelConfig, ConfigError> {
        ModelConfig::from_json(&self.config_json()?, self.index.path())
    }

    /// Stop and start ids from `tokenizer.ggml.{eos,eot,bos}_token_id`.
    pub fn generation_config(&self) -> GenerationConfig {
        let id = |k: &str| {
            self.meta(&format!("tokenizer.ggml.{k}_token_id"))
                .and_then(|v| v.as_u64())
                .and_then(|v| u32::try_from(v).ok())
        };
        let mut g = GenerationConfig {
            bos_token_id: id("bos"),
            ..GenerationConfig::default()
        };
        for k in ["eos", "eot"] {
            if let Some(i) = id(k) {
                if !g.eos_token_ids.contains(&i) {
                    g.eos_token_ids.push(i);
                }
            }
        }
        g
    }
}
