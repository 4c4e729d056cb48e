//! `config.json` and `generation_config.json` of a checkpoint, parsed into the numbers the model
//! code needs. Accepts both the transformers-4 spelling (`rope_theta` at top level,
//! `num_experts`) and the transformers-5 one (`rope_parameters`, `num_local_experts`).
use moestream_formats::QuantizationConfig;
use serde_json::Value;
use std::path::{Path, PathBuf};

/// Architectures this engine runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    /// `qwen3_moe`: Qwen3-30B-A3B, Qwen3-235B-A22B.
    Qwen3Moe,
    /// `qwen3`: dense Qwen3 (draft models).
    Qwen3,
    /// `mixtral`: Mixtral-8x7B and kin.
    Mixtral,
    /// `qwen3_next`: Qwen3-Next-80B-A3B (hybrid Gated DeltaNet + gated attention, MoE with a
    /// shared expert, fused linear-attention projections).
    Qwen3Next,
    /// `qwen3_5`: dense Qwen3.5 (hybrid; the draft models of Qwen3.5-MoE).
    Qwen35,
    /// `qwen3_5_moe`: Qwen3.5-35B-A3B, -122B-A10B, -397B-A17B.
    Qwen35Moe,
}

/// The `model_type` strings accepted, for error messages.
pub const SUPPORTED_MODEL_TYPES: &[&str] = &[
    "qwen3_moe",
    "qwen3",
    "mixtral",
    "qwen3_next",
    "qwen3_5",
    "qwen3_5_moe",
];

impl Arch {
    /// From a `model_type` string.
    pub fn from_model_type(s: &str) -> Option<Arch> {
        match s {
            "qwen3_moe" => Some(Arch::Qwen3Moe),
            "qwen3" => Some(Arch::Qwen3),
            "mixtral" => Some(Arch::Mixtral),
            "qwen3_next" => Some(Arch::Qwen3Next),
            "qwen3_5" | "qwen3_5_text" => Some(Arch::Qwen35),
            "qwen3_5_moe" | "qwen3_5_moe_text" => Some(Arch::Qwen35Moe),
            _ => None,
        }
    }

    /// The `model_type` string.
    pub fn model_type(self) -> &'static str {
        match self {
            Arch::Qwen3Moe => "qwen3_moe",
            Arch::Qwen3 => "qwen3",
            Arch::Mixtral => "mixtral",
            Arch::Qwen3Next => "qwen3_next",
            Arch::Qwen35 => "qwen3_5",
            Arch::Qwen35Moe => "qwen3_5_moe",
        }
    }

    /// Hybrid: Gated DeltaNet layers between gated full-attention layers, zero-centred norms.
    pub fn is_hybrid(self) -> bool {
        matches!(self, Arch::Qwen3Next | Arch::Qwen35 | Arch::Qwen35Moe)
    }

    /// Has routed experts.
    pub fn is_moe(self) -> bool {
        !matches!(self, Arch::Qwen3 | Arch::Qwen35)
    }
}

/// The token mixer of a decoder layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LayerKind {
    /// Softmax attention over a KV cache.
    FullAttention,
    /// Gated DeltaNet: a recurrent state instead of a KV cache.
    LinearAttention,
}

/// Geometry of the Gated DeltaNet layers (`linear_*` fields of the config).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinearAttentionConfig {
    /// Query/key heads `nk`.
    pub num_key_heads: usize,
    /// Value heads `nv` (a multiple of `nk`).
    pub num_value_heads: usize,
    /// Query/key width `dk`.
    pub key_head_dim: usize,
    /// Value width `dv`.
    pub value_head_dim: usize,
    /// Causal convolution taps `K`.
    pub conv_kernel: usize,
    /// Value heads in llama.cpp's tiled order (value head `h` reads key head `h mod nk`), as
    /// its converter writes Qwen3.5 GGUF files; otherwise grouped by key head, as in every
    /// Hugging Face and MLX checkpoint. Never in a `config.json`: the GGUF loader sets it.
    pub tiled_value_heads: bool,
}

impl LinearAttentionConfig {
    /// Channels through the convolution: `2·nk·dk + nv·dv` (queries, keys, values).
    pub fn conv_channels(&self) -> usize {
        2 * self.num_key_heads * self.key_head_dim + self.num_value_heads * self.value_head_dim
    }
}

/// A malformed or unsupported config file.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {reason}")]
pub struct ConfigError {
    /// The file.
    pub path: PathBuf,
    /// The field and what is wrong.
    pub reason: String,
}

/// Model geometry and options from `config.json`.
#[derive(Clone, Debug)]
pub struct ModelConfig {
    /// Architecture.
    pub arch: Arch,
    /// Vocabulary rows of the embedding and lm_head.
    pub vocab_size: usize,
    /// Residual width `H`.
    pub hidden_size: usize,
    /// Dense MLP width `F` (Mixtral: expert width).
    pub intermediate_size: usize,
    /// Decoder layers.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads.
    pub num_key_value_heads: usize,
    /// Per-head width `D`.
    pub head_dim: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f32,
    /// RoPE base.
    pub rope_theta: f64,
    /// Longest context the model was trained for.
    pub max_position_embeddings: usize,
    /// lm_head shares the embedding matrix.
    pub tie_word_embeddings: bool,
    /// Routed experts per MoE layer (0 = dense model).
    pub num_experts: usize,
    /// Experts chosen per token.
    pub num_experts_per_tok: usize,
    /// Expert MLP width `I`.
    pub moe_intermediate_size: usize,
    /// Renormalise the chosen experts' probabilities to sum to one.
    pub norm_topk_prob: bool,
    /// Every n-th layer is MoE.
    pub decoder_sparse_step: usize,
    /// Layers forced to a dense MLP.
    pub mlp_only_layers: Vec<usize>,
    /// MLX quantization, when the checkpoint is MLX-quantized.
    pub quantization: Option<QuantizationConfig>,
    /// The mixer of each layer (all full attention for non-hybrid models).
    pub layer_types: Vec<LayerKind>,
    /// Gated DeltaNet geometry (hybrid models).
    pub linear: Option<LinearAttentionConfig>,
    /// Leading dims of each head that RoPE rotates (`head_dim · partial_rotary_factor`).
    pub rotary_dim: usize,
    /// Shared expert width `Is` (0: none).
    pub shared_expert_intermediate_size: usize,
    /// Multi-token-prediction layers shipped with the checkpoint (`mtp_num_hidden_layers`).
    pub mtp_num_hidden_layers: usize,
}

impl ModelConfig {
    /// Reads `dir/config.json`.
    pub fn from_dir(dir: &Path) -> Result<Self, ConfigError> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).map_err(|e| ConfigError {
            path: path.clone(),
            reason: format!("cannot read: {e}"),
        })?;
        let json: Value = serde_json::from_str(&text).map_err(|e| ConfigError {
            path: path.clone(),
            reason: format!("malformed JSON: {e}"),
        })?;
        Self::from_json(&json, &path)
    }

    /// Parses a config object; `path` is used in error messages.
    pub fn from_json(json: &Value, path: &Path) -> Result<Self, ConfigError> {
        let err = |reason: String| ConfigError {
            path: path.to_path_buf(),
            reason,
        };
        if !json.is_object() {
            return Err(err("top level is not a JSON object".into()));
        }
        let model_type = json
            .get("model_type")
            .and_then(Value::as_str)
            .ok_or_else(|| err("missing string field `model_type`".into()))?;
        let arch = Arch::from_model_type(model_type).ok_or_else(|| {
            err(format!(
                "unknown model_type `{model_type}`; supported: {}",
                SUPPORTED_MODEL_TYPES.join(", ")
            ))
        })?;
        // Qwen3.5's vision-language configs nest the text model's fields in `text_config`.
        let top = json;
        let json = match json.get("text_config") {
            Some(t) if t.is_object() => t,
            _ => json,
        };
        let f = Fields { json, path };
        let hidden_size = f.usize("hidden_size")?;
        let num_attention_heads = f.usize("num_attention_heads")?;
        let num_key_value_heads = f.usize_or("num_key_value_heads", num_attention_heads)?;
        let head_dim = match f.opt_usize("head_dim")? {
            Some(d) => d,
            None => hidden_size / num_attention_heads.max(1),
        };
        let rope_parameters = json.get("rope_parameters");
        let rope_theta = match json.get("rope_theta").and_then(Value::as_f64) {
            Some(t) => t,
            None => rope_parameters
                .and_then(|p| p.get("rope_theta"))
                .and_then(Value::as_f64)
                .unwrap_or(match arch {
                    Arch::Mixtral => 1e6,
                    _ => 10000.0,
                }),
        };
        let partial_rotary_factor = json
            .get("partial_rotary_factor")
            .or_else(|| rope_parameters.and_then(|p| p.get("partial_rotary_factor")))
            .and_then(Value::as_f64)
            .unwrap_or(if arch.is_hybrid() { 0.25 } else { 1.0 });
        if !(partial_rotary_factor > 0.0 && partial_rotary_factor <= 1.0) {
            return Err(err(format!(
                "`partial_rotary_factor` {partial_rotary_factor} is not in (0, 1]"
            )));
        }
        let rotary_dim = (head_dim as f64 * partial_rotary_factor) as usize;
        for key in ["rope_scaling", "rope_parameters"] {
            if let Some(rt) = json
                .get(key)
                .and_then(|r| r.get("rope_type").or_else(|| r.get("type")))
            {
                let rt = rt.as_str().unwrap_or("?");
                // Qwen3.5's interleaved mRoPE is plain RoPE for text: all three position rows
                // hold the token's position.
                if rt != "default" && !(arch.is_hybrid() && rt == "mrope") {
                    return Err(err(format!(
                        "`{key}.rope_type` is `{rt}`; only default RoPE is supported"
                    )));
                }
            }
        }
        if json.get("attention_bias").and_then(Value::as_bool) == Some(true) {
            return Err(err("`attention_bias: true` is not supported".into()));
        }
        let experts = || -> Result<usize, ConfigError> {
            match f.opt_usize("num_experts")? {
                Some(e) => Ok(e),
                None => f.usize("num_local_experts"),
            }
        };
        let (num_experts, num_experts_per_tok, moe_intermediate_size, norm_topk_prob) = match arch {
            Arch::Qwen3 | Arch::Qwen35 => (0, 0, 0, false),
            Arch::Qwen3Moe | Arch::Qwen3Next => (
                experts()?,
                f.usize("num_experts_per_tok")?,
                f.usize("moe_intermediate_size")?,
                f.bool_or("norm_topk_prob", arch == Arch::Qwen3Next)?,
            ),
            // Qwen3.5's router always renormalises (transformers ignores `norm_topk_prob`).
            Arch::Qwen35Moe => (
                experts()?,
                f.usize("num_experts_per_tok")?,
                f.usize("moe_intermediate_size")?,
                true,
            ),
            Arch::Mixtral => {
                let e = match f.opt_usize("num_local_experts")? {
                    Some(e) => e,
                    None => f.usize("num_experts")?,
                };
                (
                    e,
                    f.usize_or("num_experts_per_tok", 2)?,
                    f.usize("intermediate_size")?,
                    true,
                )
            }
        };
        let num_hidden_layers = f.usize("num_hidden_layers")?;
        let linear = if arch.is_hybrid() {
            Some(LinearAttentionConfig {
                num_key_heads: f.usize("linear_num_key_heads")?,
                num_value_heads: f.usize("linear_num_value_heads")?,
                key_head_dim: f.usize("linear_key_head_dim")?,
                value_head_dim: f.usize("linear_value_head_dim")?,
                conv_kernel: f.usize_or("linear_conv_kernel_dim", 4)?,
                tiled_value_heads: false,
            })
        } else {
            None
        };
        let layer_types = match json.get("layer_types") {
            Some(Value::Array(a)) if arch.is_hybrid() => a
                .iter()
                .map(|v| match v.as_str() {
                    Some("full_attention") => Ok(LayerKind::FullAttention),
                    Some("linear_attention") => Ok(LayerKind::LinearAttention),
                    _ => Err(err(format!(
                        "`layer_types` entries must be \"full_attention\" or \"linear_attention\", found {v}"
                    ))),
                })
                .collect::<Result<Vec<_>, _>>()?,
            Some(v) if arch.is_hybrid() && !v.is_null() => {
                return Err(err("`layer_types` must be an array".into()))
            }
            _ if arch.is_hybrid() => {
                let every = f.usize_or("full_attention_interval", 4)?.max(1);
                (0..num_hidden_layers)
                    .map(|i| {
                        if (i + 1) % every == 0 {
                            LayerKind::FullAttention
                        } else {
                            LayerKind::LinearAttention
                        }
                    })
                    .collect()
            }
            _ => vec![LayerKind::FullAttention; num_hidden_layers],
        };
        let shared_expert_intermediate_size = match arch {
            Arch::Qwen3Next | Arch::Qwen35Moe => {
                f.usize_or("shared_expert_intermediate_size", 0)?
            }
            _ => 0,
        };
        let intermediate_size = match arch {
            Arch::Qwen35Moe => f.usize_or("intermediate_size", 0)?,
            _ => f.usize("intermediate_size")?,
        };
        let mtp_num_hidden_layers = f.usize_or("mtp_num_hidden_layers", 0)?;
        let tie_word_embeddings = match json.get("tie_word_embeddings") {
            Some(Value::Bool(b)) => *b,
            _ => Fields { json: top, path }.bool_or("tie_word_embeddings", false)?,
        };
        let mlp_only_layers = match json.get("mlp_only_layers") {
            None | Some(Value::Null) => vec![],
            Some(Value::Array(a)) => a
                .iter()
                .map(|v| {
                    v.as_u64()
                        .map(|x| x as usize)
                        .ok_or_else(|| err("`mlp_only_layers` must hold integers".into()))
                })
                .collect::<Result<_, _>>()?,
            Some(_) => return Err(err("`mlp_only_layers` must be an array".into())),
        };
        let cfg = ModelConfig {
            arch,
            vocab_size: f.usize("vocab_size")?,
            hidden_size,
            intermediate_size,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rms_norm_eps: f.f64_or("rms_norm_eps", 1e-6)? as f32,
            rope_theta,
            max_position_embeddings: f.usize_or("max_position_embeddings", 32768)?,
            tie_word_embeddings,
            num_experts,
            num_experts_per_tok,
            moe_intermediate_size,
            norm_topk_prob,
            decoder_sparse_step: f.usize_or("decoder_sparse_step", 1)?,
            mlp_only_layers,
            quantization: QuantizationConfig::from_config(top, path)
                .map_err(|e| err(e.to_string()))?,
            layer_types,
            linear,
            rotary_dim,
            shared_expert_intermediate_size,
            mtp_num_hidden_layers,
        };
        cfg.validate().map_err(err)?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<(), String> {
        let positive = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("head_dim", self.head_dim),
            ("decoder_sparse_step", self.decoder_sparse_step),
        ];
        for (name, v) in positive {
            if v == 0 {
                return Err(format!("`{name}` must be positive"));
            }
        }
        if !self
            .num_attention_heads
            .is_multiple_of(self.num_key_value_heads)
        {
            return Err(format!(
                "`num_attention_heads` ({}) is not a multiple of `num_key_value_heads` ({})",
                self.num_attention_heads, self.num_key_value_heads
            ));
        }
        if !self.head_dim.is_multiple_of(2) {
            return Err(format!(
                "`head_dim` ({}) must be even for RoPE",
                self.head_dim
            ));
        }
        if self.rotary_dim == 0 || !self.rotary_dim.is_multiple_of(2) {
            return Err(format!(
                "rotary dims ({}: head_dim × partial_rotary_factor) must be even and positive",
                self.rotary_dim
            ));
        }
        if self.layer_types.len() != self.num_hidden_layers {
            return Err(format!(
                "`layer_types` has {} entries for {} layers",
                self.layer_types.len(),
                self.num_hidden_layers
            ));
        }
        if let Some(l) = &self.linear {
            let dims = [
                ("linear_num_key_heads", l.num_key_heads),
                ("linear_num_value_heads", l.num_value_heads),
                ("linear_key_head_dim", l.key_head_dim),
                ("linear_value_head_dim", l.value_head_dim),
                ("linear_conv_kernel_dim", l.conv_kernel),
            ];
            for (name, v) in dims {
                if v == 0 || v > 1 << 16 {
                    return Err(format!("`{name}` ({v}) must be between 1 and 65536"));
                }
            }
            if !l.num_value_heads.is_multiple_of(l.num_key_heads) {
                return Err(format!(
                    "`linear_num_value_heads` ({}) is not a multiple of `linear_num_key_heads` ({})",
                    l.num_value_heads, l.num_key_heads
                ));
            }
        }
        if self.arch.is_moe() {
            if self.num_experts == 0
                || self.num_experts_per_tok == 0
                || self.num_experts_per_tok > self.num_experts
            {
                return Err(format!(
                    "`num_experts_per_tok` ({}) must be between 1 and the number of experts ({})",
                    self.num_experts_per_tok, self.num_experts
                ));
            }
            if self.moe_intermediate_size == 0 {
                return Err("`moe_intermediate_size` must be positive".into());
            }
        }
        // Guard against absurd sizes that would overflow or exhaust memory before any tensor check.
        let big = 1usize << 24;
        if self.hidden_size > big || self.vocab_size > big || self.num_hidden_layers > 4096 {
            return Err("dimensions are implausibly large".into());
        }
        Ok(())
    }

    /// Whether layer `l` is a sparse MoE layer (transformers' rule).
    pub fn is_moe_layer(&self, l: usize) -> bool {
        self.num_experts > 0
            && self.arch.is_moe()
            && !self.mlp_only_layers.contains(&l)
            && (l + 1).is_multiple_of(self.decoder_sparse_step)
    }
}

struct Fields<'a> {
    json: &'a Value,
    path: &'a Path,
}

impl Fields<'_> {
    fn err(&self, reason: String) -> ConfigError {
        ConfigError {
            path: self.path.to_path_buf(),
            reason,
        }
    }
    fn opt_usize(&self, key: &str) -> Result<Option<usize>, ConfigError> {
        match self.json.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v.as_u64().map(|x| Some(x as usize)).ok_or_else(|| {
                self.err(format!("`{key}` must be a non-negative integer, found {v}"))
            }),
        }
    }
    fn usize(&self, key: &str) -> Result<usize, ConfigError> {
        self.opt_usize(key)?
            .ok_or_else(|| self.err(format!("missing integer field `{key}`")))
    }
    fn usize_or(&self, key: &str, d: usize) -> Result<usize, ConfigError> {
        Ok(self.opt_usize(key)?.unwrap_or(d))
    }
    fn f64_or(&self, key: &str, d: f64) -> Result<f64, ConfigError> {
        match self.json.get(key) {
            None | Some(Value::Null) => Ok(d),
            Some(v) => v
                .as_f64()
                .ok_or_else(|| self.err(format!("`{key}` must be a number, found {v}"))),
        }
    }
    fn bool_or(&self, key: &str, d: bool) -> Result<bool, ConfigError> {
        match self.json.get(key) {
            None | Some(Value::Null) => Ok(d),
            Some(v) => v
                .as_bool()
                .ok_or_else(|| self.err(format!("`{key}` must be true or false, found {v}"))),
        }
    }
}

/// `generation_config.json`: stop ids and default sampling.
#[derive(Clone, Debug, Default)]
pub struct GenerationConfig {
    /// Token ids that end generation.
    pub eos_token_ids: Vec<u32>,
    /// BOS id, if declared.
    pub bos_token_id: Option<u32>,
    /// Default temperature.
    pub temperature: Option<f32>,
    /// Default nucleus mass.
    pub top_p: Option<f32>,
    /// Default top-k.
    pub top_k: Option<usize>,
    /// Default min-p.
    pub min_p: Option<f32>,
    /// Default repetition penalty.
    pub repetition_penalty: Option<f32>,
}

impl GenerationConfig {
    /// Reads `dir/generation_config.json` if present (else defaults), and falls back to
    /// `config.json`'s `eos_token_id` for stop ids.
    pub fn from_dir(dir: &Path) -> Result<Self, ConfigError> {
        let mut g = GenerationConfig::default();
        let path = dir.join("generation_config.json");
        let gen: Option<Value> = if path.is_file() {
            let text = std::fs::read_to_string(&path).map_err(|e| ConfigError {
                path: path.clone(),
                reason: format!("cannot read: {e}"),
            })?;
            Some(serde_json::from_str(&text).map_err(|e| ConfigError {
                path: path.clone(),
                reason: format!("malformed JSON: {e}"),
            })?)
        } else {
            None
        };
        let cfg_path = dir.join("config.json");
        let cfg: Option<Value> = std::fs::read_to_string(&cfg_path)
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok());
        for src in [gen.as_ref(), cfg.as_ref()].into_iter().flatten() {
            if g.eos_token_ids.is_empty() {
                g.eos_token_ids = ids(src.get("eos_token_id"));
            }
            if g.bos_token_id.is_none() {
                g.bos_token_id = ids(src.get("bos_token_id")).first().copied();
            }
        }
        if let Some(gen) = gen {
            let num = |k: &str| gen.get(k).and_then(Value::as_f64).map(|x| x as f32);
            g.temperature = num("temperature");
            g.top_p = num("top_p");
            g.min_p = num("min_p");
            g.repetition_penalty = num("repetition_penalty");
            g.top_k = gen.get("top_k").and_then(Value::as_u64).map(|x| x as usize);
            if gen.get("do_sample").and_then(Value::as_bool) == Some(false) {
                g.temperature = Some(0.0);
            }
        }
        Ok(g)
    }
}

fn ids(v: Option<&Value>) -> Vec<u32> {
    match v {
        Some(Value::Number(n)) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(|x| x.as_u64().map(|x| x as u32))
            .collect(),
        _ => vec![],
    }
}
