//! The model configuration of a GGUF file, rebuilt as the `config.json` object transformers
//! would have, from the `{arch}.*` metadata (MODELS.md 10.5), then parsed by the same code as a
//! checkpoint's `config.json`. The hybrids' Gated DeltaNet geometry comes from the `ssm.*` keys
//! the converter writes (`conv_kernel` K, `state_size` dk, `group_count` nk, `time_step_rank`
//! nv, `inner_size` nv·dv), their layer pattern from `attention.recurrent_layers` or
//! `full_attention_interval`, and `block_count` counts the multi-token-prediction blocks
//! (`nextn_predict_layers`) after the trunk.
use super::GgufSource;
use crate::config::{ConfigError, GenerationConfig, ModelConfig};
use moestream_formats::gguf::MetadataArray;
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
        need("block_count")?;
        let n_layers = self.trunk_layers as u64;
        let experts = self.arch_u64("expert_count").unwrap_or(0);
        let model_type = match arch {
            "qwen3moe" => "qwen3_moe",
            "qwen3" => "qwen3",
            "qwen3next" => "qwen3_next",
            "qwen35" => "qwen3_5",
            "qwen35moe" => "qwen3_5_moe",
            "llama" if experts > 0 => "mixtral",
            "llama" => {
                return Err(self.config_error(
                    "dense `llama` models are not supported (llama files with experts, Mixtral, are)".into(),
                ))
            }
            other => {
                return Err(self.config_error(format!(
                    "GGUF architecture `{other}` is not supported (supported: qwen3moe, qwen3, llama with experts, qwen3next, qwen35, qwen35moe)"
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
            // The hybrids' configurations default to a quarter: always say what the file says.
            let hybrid = matches!(model_type, "qwen3_next" | "qwen3_5" | "qwen3_5_moe");
            if rot != head_dim || hybrid {
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
        if matches!(model_type, "qwen3_next" | "qwen3_5" | "qwen3_5_moe") {
            self.hybrid_fields(&mut c, n_layers)?;
        }
        Ok(Value::Object(c))
    }

    /// The Gated DeltaNet geometry, layer pattern, shared expert and MTP depth of a hybrid.
    fn hybrid_fields(&self, c: &mut Map<String, Value>, n_layers: u64) -> Result<(), ConfigError> {
        let arch = self.arch.as_str();
        let need = |key: &str| {
            self.arch_u64(key).filter(|&v| v > 0).ok_or_else(|| {
                self.config_error(format!(
                    "metadata `{arch}.{key}` is missing or not a positive integer"
                ))
            })
        };
        let (nk, nv, inner) = (
            need("ssm.group_count")?,
            need("ssm.time_step_rank")?,
            need("ssm.inner_size")?,
        );
        if !inner.is_multiple_of(nv) {
            return Err(self.config_error(format!(
                "`{arch}.ssm.inner_size` {inner} is not a multiple of `{arch}.ssm.time_step_rank` {nv}"
            )));
        }
        c.insert("linear_num_key_heads".into(), json!(nk));
        c.insert("linear_num_value_heads".into(), json!(nv));
        c.insert("linear_key_head_dim".into(), json!(need("ssm.state_size")?));
        c.insert("linear_value_head_dim".into(), json!(inner / nv));
        c.insert(
            "linear_conv_kernel_dim".into(),
            json!(need("ssm.conv_kernel")?),
        );
        let recurrent = self
            .meta(&format!("{arch}.attention.recurrent_layers"))
            .and_then(|v| v.as_array());
        let kinds: Vec<&str> = match recurrent {
            Some(flags) => {
                let n = n_layers as usize;
                let flags = match flags {
                    MetadataArray::Bool(f) if f.len() >= n => &f[..n],
                    _ => {
                        return Err(self.config_error(format!(
                            "`{arch}.attention.recurrent_layers` is not an array of at least {n} booleans"
                        )))
                    }
                };
                flags
                    .iter()
                    .map(|&r| {
                        if r {
                            "linear_attention"
                        } else {
                            "full_attention"
                        }
                    })
                    .collect()
            }
            None => {
                let every = self.arch_u64("full_attention_interval").unwrap_or(4).max(1);
                (0..n_layers)
                    .map(|i| {
                        if (i + 1) % every == 0 {
                            "full_attention"
                        } else {
                            "linear_attention"
                        }
                    })
                    .collect()
            }
        };
        c.insert("layer_types".into(), json!(kinds));
        if let Some(is) = self.arch_u64("expert_shared_feed_forward_length") {
            c.insert("shared_expert_intermediate_size".into(), json!(is));
        }
        // llama.cpp renormalises the hybrids' top-k weights (Qwen3.5 does in transformers too).
        c.insert("norm_topk_prob".into(), json!(true));
        c.insert(
            "mtp_num_hidden_layers".into(),
            json!(self.arch_u64("nextn_predict_layers").unwrap_or(0)),
        );
        Ok(())
    }

    /// The model configuration.
    pub fn model_config(&self) -> Result<ModelConfig, ConfigError> {
        let mut config = ModelConfig::from_json(&self.config_json()?, self.index.path())?;
        // llama.cpp's converter reorders Qwen3.5's value heads to tiled order (when there are
        // more value heads than key heads; otherwise the two orders are one).
        if matches!(self.arch.as_str(), "qwen35" | "qwen35moe") {
            if let Some(l) = config.linear.as_mut() {
                l.tiled_value_heads = true;
            }
        }
        Ok(config)
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
