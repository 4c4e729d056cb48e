//! `moestream synth`: random-weight models of real geometries, written in the same file layout as
//! the real checkpoints (Hugging Face per-expert safetensors, or mlx-lm's quantized layout with
//! stacked `switch_mlp` experts), with a small working byte-level tokenizer and the family's chat
//! template. For tests, demos and benchmarks; the output of such a model is noise.
//!
//! Writing is streamed: the safetensors header is computed from the tensor list first, then each
//! tensor's bytes are generated in parallel chunks and written, so a 17 GB model needs a few MB of
//! memory and runs at disk speed.
mod gguf;
mod hybrid;

use anyhow::{bail, Context, Result};
use rayon::prelude::*;
use serde_json::{json, Value};
use std::io::Write;
use std::path::Path;

/// Weight file layouts `synth` writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum SynthFormat {
    /// Hugging Face float32, one tensor per expert.
    HfF32,
    /// Hugging Face bfloat16, one tensor per expert.
    HfBf16,
    /// mlx-lm 4-bit, group size 64, bf16 scales.
    Mlx4,
    /// mlx-lm 8-bit, group size 64, bf16 scales.
    Mlx8,
    /// One GGUF file with llama-quantize's Q4_K_M type mix (OUT is the `.gguf` file).
    #[value(name = "gguf-q4km")]
    GgufQ4km,
    /// One GGUF file, every matrix Q8_0.
    #[value(name = "gguf-q8_0")]
    GgufQ8_0,
    /// One GGUF file, everything F32.
    #[value(name = "gguf-f32")]
    GgufF32,
}

/// Architecture names accepted by `--arch`.
pub const ARCHES: &[&str] = &[
    "qwen3_moe",
    "qwen3",
    "mixtral",
    "qwen3_next",
    "qwen3_5",
    "qwen3_5_moe",
];

fn preset_config(arch: &str, preset: &str) -> Result<Value> {
    let qwen = |v: Value| -> Value {
        let mut base = json!({
            "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "hidden_act": "silu",
            "attention_bias": false, "attention_dropout": 0.0, "torch_dtype": "bfloat16",
            "bos_token_id": 256, "eos_token_id": 258, "use_sliding_window": false,
        });
        if let (Some(b), Some(o)) = (base.as_object_mut(), v.as_object()) {
            for (k, x) in o {
                b.insert(k.clone(), x.clone());
            }
        }
        base
    };
    let cfg = match (arch, preset) {
        ("qwen3_moe", "tiny") => qwen(json!({"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe",
            "vocab_size": 512, "hidden_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
            "head_dim": 32, "intermediate_size": 256, "moe_intermediate_size": 128, "num_experts": 8, "num_experts_per_tok": 2,
            "norm_topk_prob": true, "decoder_sparse_step": 1, "mlp_only_layers": [], "max_position_embeddings": 4096,
            "tie_word_embeddings": false})),
        // K-quant rows need multiples of 256 columns; one MoE layer and one dense layer, small
        // enough (~0.5 MB at Q4_K_M) to commit as a test fixture.
        ("qwen3_moe", "tiny-gguf") => qwen(json!({"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe",
            "vocab_size": 384, "hidden_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "head_dim": 64, "intermediate_size": 256, "moe_intermediate_size": 256, "num_experts": 4, "num_experts_per_tok": 2,
            "norm_topk_prob": true, "decoder_sparse_step": 1, "mlp_only_layers": [1], "max_position_embeddings": 4096,
            "tie_word_embeddings": false})),
        ("qwen3_moe", "qwen3-30b-a3b") => qwen(json!({"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe",
            "vocab_size": 151936, "hidden_size": 2048, "num_hidden_layers": 48, "num_attention_heads": 32, "num_key_value_heads": 4,
            "head_dim": 128, "intermediate_size": 6144, "moe_intermediate_size": 768, "num_experts": 128, "num_experts_per_tok": 8,
            "norm_topk_prob": true, "decoder_sparse_step": 1, "mlp_only_layers": [], "max_position_embeddings": 40960,
            "tie_word_embeddings": false})),
        ("qwen3_moe", "qwen3-235b-a22b") => qwen(json!({"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe",
            "vocab_size": 151936, "hidden_size": 4096, "num_hidden_layers": 94, "num_attention_heads": 64, "num_key_value_heads": 4,
            "head_dim": 128, "intermediate_size": 12288, "moe_intermediate_size": 1536, "num_experts": 128, "num_experts_per_tok": 8,
            "norm_topk_prob": true, "decoder_sparse_step": 1, "mlp_only_layers": [], "max_position_embeddings": 40960,
            "tie_word_embeddings": false})),
        ("qwen3", "tiny") => qwen(json!({"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3",
            "vocab_size": 512, "hidden_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "head_dim": 32, "intermediate_size": 256, "max_position_embeddings": 4096, "tie_word_embeddings": true})),
        // The GGUF fixtures' dense model: tied embeddings (the Q6_K token_embd is the output too).
        ("qwen3", "tiny-gguf") => qwen(json!({"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3",
            "vocab_size": 384, "hidden_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "head_dim": 64, "intermediate_size": 512, "max_position_embeddings": 4096, "tie_word_embeddings": true})),
        ("qwen3", "qwen3-0.6b") => qwen(json!({"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3",
            "vocab_size": 151936, "hidden_size": 1024, "num_hidden_layers": 28, "num_attention_heads": 16, "num_key_value_heads": 8,
            "head_dim": 128, "intermediate_size": 3072, "max_position_embeddings": 40960, "tie_word_embeddings": true})),
        ("qwen3", "qwen3-4b") => qwen(json!({"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3",
            "vocab_size": 151936, "hidden_size": 2560, "num_hidden_layers": 36, "num_attention_heads": 32, "num_key_value_heads": 8,
            "head_dim": 128, "intermediate_size": 9728, "max_position_embeddings": 40960, "tie_word_embeddings": true})),
        // With random weights a tied output head makes the model repeat its input token (its
        // own embedding dominates every logit), which any draft predicts; the untied variant
        // gives speculation benchmarks a real distribution.
        ("qwen3", "qwen3-4b-untied") => qwen(json!({"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3",
            "vocab_size": 151936, "hidden_size": 2560, "num_hidden_layers": 36, "num_attention_heads": 32, "num_key_value_heads": 8,
            "head_dim": 128, "intermediate_size": 9728, "max_position_embeddings": 40960, "tie_word_embeddings": false})),
        ("qwen3", "qwen3-8b") => qwen(json!({"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3",
            "vocab_size": 151936, "hidden_size": 4096, "num_hidden_layers": 36, "num_attention_heads": 32, "num_key_value_heads": 8,
            "head_dim": 128, "intermediate_size": 12288, "max_position_embeddings": 40960, "tie_word_embeddings": false})),
        ("mixtral", "tiny") => json!({"architectures": ["MixtralForCausalLM"], "model_type": "mixtral",
            "vocab_size": 512, "hidden_size": 128, "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2,
            "intermediate_size": 128, "num_local_experts": 8, "num_experts_per_tok": 2, "rms_norm_eps": 1e-5,
            "rope_theta": 1000000.0, "max_position_embeddings": 4096, "tie_word_embeddings": false,
            "bos_token_id": 256, "eos_token_id": 257, "hidden_act": "silu", "torch_dtype": "bfloat16"}),
        // The GGUF fixtures' Mixtral (`llama` with experts, permuted q/k rows): one layer of four
        // experts keeps the Q4_K_M file under 1 MB (eight experts of 256 x 256 alone would not).
        ("mixtral", "tiny-gguf") => json!({"architectures": ["MixtralForCausalLM"], "model_type": "mixtral",
            "vocab_size": 384, "hidden_size": 256, "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2,
            "intermediate_size": 256, "num_local_experts": 4, "num_experts_per_tok": 2, "rms_norm_eps": 1e-5,
            "rope_theta": 1000000.0, "max_position_embeddings": 4096, "tie_word_embeddings": false,
            "bos_token_id": 256, "eos_token_id": 257, "hidden_act": "silu", "torch_dtype": "bfloat16"}),
        ("mixtral", "mixtral-8x7b") => json!({"architectures": ["MixtralForCausalLM"], "model_type": "mixtral",
            "vocab_size": 32000, "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
            "intermediate_size": 14336, "num_local_experts": 8, "num_experts_per_tok": 2, "rms_norm_eps": 1e-5,
            "rope_theta": 1000000.0, "max_position_embeddings": 32768, "tie_word_embeddings": false,
            "bos_token_id": 256, "eos_token_id": 257, "hidden_act": "silu", "torch_dtype": "bfloat16"}),
        ("qwen3_next" | "qwen3_5" | "qwen3_5_moe", _) => return hybrid_preset(arch, preset),
        _ => bail!(
            "no preset `{preset}` for architecture `{arch}`; presets: qwen3_moe: tiny, tiny-gguf, qwen3-30b-a3b, qwen3-235b-a22b; \
             qwen3: tiny, tiny-gguf, qwen3-0.6b, qwen3-4b, qwen3-4b-untied, qwen3-8b; mixtral: tiny, tiny-gguf, mixtral-8x7b; qwen3_next: tiny, tiny-gguf, qwen3-next-80b-a3b; \
             qwen3_5: tiny, tiny-gguf; qwen3_5_moe: tiny, tiny-gguf, qwen3.5-35b-a3b, qwen3.5-122b-a10b"
        ),
    };
    Ok(cfg)
}

/// Qwen3-Next and Qwen3.5 configurations (MODELS.md section 6). Qwen3.5 is written as its
/// vision-language checkpoints are: the text model's fields under `text_config`.
fn hybrid_preset(arch: &str, preset: &str) -> Result<Value> {
    let geometry = match (arch, preset) {
        (_, "tiny") => json!({"vocab_size": 512, "hidden_size": 128, "num_hidden_layers": 8,
            "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64,
            "linear_num_key_heads": 2, "linear_num_value_heads": 4, "linear_key_head_dim": 32,
            "linear_value_head_dim": 32, "intermediate_size": 256, "num_experts": 8,
            "num_experts_per_tok": 2, "moe_intermediate_size": 64,
            "shared_expert_intermediate_size": 64, "max_position_embeddings": 4096}),
        // The GGUF fixtures' hybrids: a Gated DeltaNet layer and a full-attention layer, with
        // 2 key heads for 4 value heads (grouped and tiled orders differ), rows of 256 columns
        // for the K-quants, narrow experts (their down rows fall back to Q8_0), and the MTP
        // block: about 0.6 MB at Q4_K_M.
        (_, "tiny-gguf") => json!({"vocab_size": 384, "hidden_size": 256, "num_hidden_layers": 2,
            "full_attention_interval": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
            "head_dim": 64, "linear_num_key_heads": 2, "linear_num_value_heads": 4,
            "linear_key_head_dim": 32, "linear_value_head_dim": 32, "intermediate_size": 256,
            "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
            "shared_expert_intermediate_size": 32, "max_position_embeddings": 4096}),
        ("qwen3_next", "qwen3-next-80b-a3b") => json!({"vocab_size": 151936, "hidden_size": 2048,
            "num_hidden_layers": 48, "num_attention_heads": 16, "num_key_value_heads": 2, "head_dim": 256,
            "linear_num_key_heads": 16, "linear_num_value_heads": 32, "linear_key_head_dim": 128,
            "linear_value_head_dim": 128, "intermediate_size": 5120, "num_experts": 512,
            "num_experts_per_tok": 10, "moe_intermediate_size": 512,
            "shared_expert_intermediate_size": 512, "max_position_embeddings": 262144}),
        ("qwen3_5_moe", "qwen3.5-35b-a3b") => json!({"vocab_size": 248320, "hidden_size": 2048,
            "num_hidden_layers": 40, "num_attention_heads": 16, "num_key_value_heads": 2, "head_dim": 256,
            "linear_num_key_heads": 16, "linear_num_value_heads": 32, "linear_key_head_dim": 128,
            "linear_value_head_dim": 128, "num_experts": 256, "num_experts_per_tok": 8,
            "moe_intermediate_size": 512, "shared_expert_intermediate_size": 512,
            "max_position_embeddings": 262144}),
        ("qwen3_5_moe", "qwen3.5-122b-a10b") => json!({"vocab_size": 248320, "hidden_size": 3072,
            "num_hidden_layers": 48, "num_attention_heads": 32, "num_key_value_heads": 2, "head_dim": 256,
            "linear_num_key_heads": 16, "linear_num_value_heads": 64, "linear_key_head_dim": 128,
            "linear_value_head_dim": 128, "num_experts": 256, "num_experts_per_tok": 8,
            "moe_intermediate_size": 1024, "shared_expert_intermediate_size": 1024,
            "max_position_embeddings": 262144}),
        _ => bail!(
            "no preset `{preset}` for architecture `{arch}`; presets: qwen3_next: tiny, tiny-gguf, qwen3-next-80b-a3b; \
             qwen3_5: tiny, tiny-gguf; qwen3_5_moe: tiny, tiny-gguf, qwen3.5-35b-a3b, qwen3.5-122b-a10b"
        ),
    };
    let mut t = json!({"rms_norm_eps": 1e-6, "hidden_act": "silu", "attention_bias": false,
        "linear_conv_kernel_dim": 4, "full_attention_interval": 4, "bos_token_id": 256,
        "eos_token_id": 258, "tie_word_embeddings": false, "mtp_num_hidden_layers": 1});
    if let (Some(b), Some(o)) = (t.as_object_mut(), geometry.as_object()) {
        for (k, x) in o {
            b.insert(k.clone(), x.clone());
        }
    }
    let layers = usize_of(&t, "num_hidden_layers");
    let every = usize_of(&t, "full_attention_interval").max(1);
    t["layer_types"] = json!((0..layers)
        .map(|i| if (i + 1) % every == 0 {
            "full_attention"
        } else {
            "linear_attention"
        })
        .collect::<Vec<_>>());
    Ok(match arch {
        "qwen3_next" => {
            t["model_type"] = json!("qwen3_next");
            t["architectures"] = json!(["Qwen3NextForCausalLM"]);
            t["rope_theta"] = json!(10000000.0);
            t["partial_rotary_factor"] = json!(0.25);
            t["norm_topk_prob"] = json!(true);
            t["decoder_sparse_step"] = json!(1);
            t["mlp_only_layers"] = json!([]);
            t
        }
        _ => {
            let moe = arch == "qwen3_5_moe";
            if !moe {
                for k in [
                    "num_experts",
                    "num_experts_per_tok",
                    "moe_intermediate_size",
                    "shared_expert_intermediate_size",
                ] {
                    if let Some(o) = t.as_object_mut() {
                        o.remove(k);
                    }
                }
            }
            t["model_type"] = json!(format!("{arch}_text"));
            t["rope_parameters"] = json!({"rope_type": "default", "rope_theta": 10000000.0,
                "partial_rotary_factor": 0.25, "mrope_section": [11, 11, 10], "mrope_interleaved": true});
            let class = if moe {
                "Qwen3_5MoeForConditionalGeneration"
            } else {
                "Qwen3_5ForConditionalGeneration"
            };
            json!({"architectures": [class], "model_type": arch, "text_config": t,
                "tie_word_embeddings": false, "bos_token_id": 256, "eos_token_id": 258})
        }
    })
}

/// One tensor to write: name, dtype string, shape, and how to fill it.
struct TensorSpec {
    name: String,
    dtype: &'static str,
    shape: Vec<usize>,
    fill: Fill,
    /// Quantized tensors: the float tensors whose values they hold, in order (the experts of a
    /// stacked MLX tensor are the per-expert tensors of the Hugging Face layout); empty: the
    /// float tensor of the same name.
    sources: Vec<String>,
}

#[derive(Clone, Copy)]
enum Fill {
    /// Uniform floats in `[-a, a]` (+ `center`), stored as F32 or BF16.
    Uniform { a: f32, center: f32 },
    /// One part of the MLX affine quantization (`bits`, groups of `gs`) of the uniform floats
    /// in `[-a, a]` that the float formats hold for the same tensor: every format of a seed is
    /// the same model, as a real checkpoint and its conversions are.
    Quantized {
        a: f32,
        bits: u32,
        gs: usize,
        part: QuantPart,
    },
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum QuantPart {
    Codes,
    Scales,
    Biases,
}

impl TensorSpec {
    fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    fn size_bytes(&self) -> usize {
        self.numel()
            * if self.dtype == "F32" || self.dtype == "U32" {
                4
            } else {
                2
            }
    }
}

struct Plan {
    tensors: Vec<TensorSpec>,
}

impl Plan {
    /// A float or quantized linear layer `[rows, cols]`, optionally stacked over `experts`.
    fn linear(
        &mut self,
        name: &str,
        (experts, rows, cols): (Option<usize>, usize, usize),
        std: f32,
        format: SynthFormat,
        bits_override: Option<u32>,
    ) {
        let a = std * 3f32.sqrt();
        let lead: Vec<usize> = experts.into_iter().collect();
        let shape = |v: &[usize]| -> Vec<usize> { lead.iter().chain(v).copied().collect() };
        match format {
            SynthFormat::HfF32 | SynthFormat::HfBf16 => {
                let dtype = if format == SynthFormat::HfF32 {
                    "F32"
                } else {
                    "BF16"
                };
                self.tensors.push(TensorSpec {
                    name: format!("{name}.weight"),
                    dtype,
                    shape: shape(&[rows, cols]),
                    fill: Fill::Uniform { a, center: 0.0 },
                    sources: Vec::new(),
                });
            }
            SynthFormat::GgufQ4km | SynthFormat::GgufQ8_0 | SynthFormat::GgufF32 => {
                unreachable!("GGUF models are planned by synth/gguf.rs")
            }
            SynthFormat::Mlx4 | SynthFormat::Mlx8 => {
                let bits = bits_override.unwrap_or(if format == SynthFormat::Mlx4 { 4 } else { 8 })
                    as usize;
                let gs = 64;
                let quantized = |part| Fill::Quantized {
                    a,
                    bits: bits as u32,
                    gs,
                    part,
                };
                self.tensors.push(TensorSpec {
                    name: format!("{name}.weight"),
                    dtype: "U32",
                    shape: shape(&[rows, cols * bits / 32]),
                    fill: quantized(QuantPart::Codes),
                    sources: Vec::new(),
                });
                self.tensors.push(TensorSpec {
                    name: format!("{name}.scales"),
                    dtype: "BF16",
                    shape: shape(&[rows, cols / gs]),
                    fill: quantized(QuantPart::Scales),
                    sources: Vec::new(),
                });
                self.tensors.push(TensorSpec {
                    name: format!("{name}.biases"),
                    dtype: "BF16",
                    shape: shape(&[rows, cols / gs]),
                    fill: quantized(QuantPart::Biases),
                    sources: Vec::new(),
                });
            }
        }
    }

    fn norm(&mut self, name: &str, len: usize, format: SynthFormat) {
        let dtype = if format == SynthFormat::HfF32 {
            "F32"
        } else {
            "BF16"
        };
        self.tensors.push(TensorSpec {
            name: name.into(),
            dtype,
            shape: vec![len],
            fill: Fill::Uniform {
                a: 0.2,
                center: 1.0,
            },
            sources: Vec::new(),
        });
    }
}

fn usize_of(cfg: &Value, k: &str) -> usize {
    cfg.get(k).and_then(Value::as_u64).unwrap_or(0) as usize
}

/// The tensors of `cfg`'s model; `residual_scale` multiplies what every layer adds to the
/// residual stream (o_proj, down projections).
fn plan(cfg: &Value, format: SynthFormat, residual_scale: f32) -> Plan {
    let arch = cfg["model_type"].as_str().unwrap_or_default();
    if matches!(arch, "qwen3_next" | "qwen3_5" | "qwen3_5_moe") {
        return hybrid::plan(arch, cfg.get("text_config").unwrap_or(cfg), format);
    }
    let h = usize_of(cfg, "hidden_size");
    let v = usize_of(cfg, "vocab_size");
    let nh = usize_of(cfg, "num_attention_heads");
    let nkv = usize_of(cfg, "num_key_value_heads");
    let d = match usize_of(cfg, "head_dim") {
        0 => h / nh,
        x => x,
    };
    let layers = usize_of(cfg, "num_hidden_layers");
    let f = usize_of(cfg, "intermediate_size");
    let (e, i) = match arch {
        "qwen3_moe" => (
            usize_of(cfg, "num_experts"),
            usize_of(cfg, "moe_intermediate_size"),
        ),
        "mixtral" => (usize_of(cfg, "num_local_experts"), f),
        _ => (0, 0),
    };
    let mlx = matches!(format, SynthFormat::Mlx4 | SynthFormat::Mlx8);
    let mut p = Plan { tensors: vec![] };
    // Standard deviations chosen so activations stay O(1) through the stack: 1/sqrt(fan_in).
    let s = |fan_in: usize| 1.0 / (fan_in as f32).sqrt();
    p.linear("model.embed_tokens", (None, v, h), 1.0, format, None);
    for l in 0..layers {
        let pre = format!("model.layers.{l}");
        p.norm(&format!("{pre}.input_layernorm.weight"), h, format);
        p.norm(&format!("{pre}.post_attention_layernorm.weight"), h, format);
        let at = format!("{pre}.self_attn");
        p.linear(
            &format!("{at}.q_proj"),
            (None, nh * d, h),
            s(h),
            format,
            None,
        );
        p.linear(
            &format!("{at}.k_proj"),
            (None, nkv * d, h),
            s(h),
            format,
            None,
        );
        p.linear(
            &format!("{at}.v_proj"),
            (None, nkv * d, h),
            s(h),
            format,
            None,
        );
        p.linear(
            &format!("{at}.o_proj"),
            (None, h, nh * d),
            residual_scale * s(nh * d),
            format,
            None,
        );
        if arch != "mixtral" {
            p.norm(&format!("{at}.q_norm.weight"), d, format);
            p.norm(&format!("{at}.k_norm.weight"), d, format);
        }
        if e == 0 {
            for (n, r, c) in [("gate_proj", f, h), ("up_proj", f, h), ("down_proj", h, f)] {
                let scale = if n == "down_proj" {
                    residual_scale
                } else {
                    1.0
                };
                p.linear(
                    &format!("{pre}.mlp.{n}"),
                    (None, r, c),
                    scale * s(c),
                    format,
                    None,
                );
            }
            continue;
        }
        let moe = if arch == "mixtral" {
            format!("{pre}.block_sparse_moe")
        } else {
            format!("{pre}.mlp")
        };
        // mlx-lm keeps the Qwen3-MoE router at 8 bits (its quant_predicate); Mixtral's at base bits.
        let router_bits = if arch == "qwen3_moe" { Some(8) } else { None };
        p.linear(
            &format!("{moe}.gate"),
            (None, e, h),
            4.0 * s(h),
            format,
            router_bits,
        );
        let names = if arch == "mixtral" && !mlx {
            ["w1", "w3", "w2"]
        } else {
            ["gate_proj", "up_proj", "down_proj"]
        };
        let shapes = [(i, h), (i, h), (h, i)];
        // The down projection (third) adds to the residual stream.
        let out_scale = |n: usize| if n == 2 { residual_scale } else { 1.0 };
        if mlx {
            let hf_names = if arch == "mixtral" {
                ["w1", "w3", "w2"]
            } else {
                names
            };
            for (k, ((n, hf), (r, c))) in names.iter().zip(hf_names).zip(shapes).enumerate() {
                p.linear(
                    &format!("{moe}.switch_mlp.{n}"),
                    (Some(e), r, c),
                    out_scale(k) * s(c),
                    format,
                    None,
                );
                // The same values as the Hugging Face layout's per-expert tensors.
                let codes = p.tensors.len() - 3;
                p.tensors[codes].sources = (0..e)
                    .map(|x| format!("{moe}.experts.{x}.{hf}.weight"))
                    .collect();
            }
        } else {
            for x in 0..e {
                for (k, (n, (r, c))) in names.iter().zip(shapes).enumerate() {
                    p.linear(
                        &format!("{moe}.experts.{x}.{n}"),
                        (None, r, c),
                        out_scale(k) * s(c),
                        format,
                        None,
                    );
                }
            }
        }
    }
    p.norm("model.norm.weight", h, format);
    if !cfg["tie_word_embeddings"].as_bool().unwrap_or(false) {
        p.linear("lm_head", (None, v, h), s(h), format, None);
    }
    p
}

/// Writes the model; returns the total bytes of weights.
pub fn synth(
    arch: &str,
    preset: &str,
    format: SynthFormat,
    seed: u64,
    out: &Path,
    progress: bool,
) -> Result<u64> {
    synth_layers(arch, preset, format, seed, None, 1.0, out, progress)
}

/// [`synth`], keeping only the first `layers` decoder layers when given. Every tensor's values
/// depend only on the seed, the tensor's name and its scale, so such a model holds exactly the
/// embedding, first layers, final norm and output head of the full one: a draft made of the
/// target's own weights, for speculative decoding.
///
/// `residual_scale` (1 for the usual model) multiplies the weights of every projection that adds
/// to the residual stream (o_proj, the MLPs' and experts' down projections). Well below 1, the
/// layers barely move the stream, so the next token is almost a function of the current one
/// (output head of its embedding) whatever the layers: a 1-layer draft of the same seed then
/// predicts a many-layer target's greedy tokens, distinct tokens at each position, a
/// high-acceptance pair for measuring speculation with realistic expert choices (safetensors
/// formats of the non-hybrid architectures).
#[allow(clippy::too_many_arguments)]
pub fn synth_layers(
    arch: &str,
    preset: &str,
    format: SynthFormat,
    seed: u64,
    layers: Option<usize>,
    residual_scale: f32,
    out: &Path,
    progress: bool,
) -> Result<u64> {
    if !(residual_scale.is_finite() && residual_scale > 0.0) {
        bail!("--residual-scale {residual_scale}: give a positive number");
    }
    if !ARCHES.contains(&arch) {
        bail!(
            "unknown architecture `{arch}`; supported: {}",
            ARCHES.join(", ")
        );
    }
    let mut cfg = preset_config(arch, preset)?;
    if let Some(n) = layers {
        let t = if cfg.get("text_config").is_some() {
            &mut cfg["text_config"]
        } else {
            &mut cfg
        };
        let full = usize_of(t, "num_hidden_layers");
        if n == 0 || n > full {
            bail!("--layers {n}: the preset has {full} layers; keep 1 to {full}");
        }
        t["num_hidden_layers"] = json!(n);
        if let Some(types) = t.get_mut("layer_types").and_then(Value::as_array_mut) {
            types.truncate(n);
        }
    }
    let mix = match format {
        SynthFormat::GgufQ4km => Some(gguf::GgufMix::Q4KM),
        SynthFormat::GgufQ8_0 => Some(gguf::GgufMix::Q8_0),
        SynthFormat::GgufF32 => Some(gguf::GgufMix::F32),
        _ => None,
    };
    if let Some(mix) = mix {
        if !moestream_formats::gguf::is_gguf_path(out) {
            bail!(
                "{}: a GGUF format writes one file; name it NAME.gguf",
                out.display()
            );
        }
        if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        if residual_scale != 1.0 {
            bail!("--residual-scale is for the safetensors formats (hf-*, mlx*)");
        }
        return gguf::write(&cfg, mix, seed, out);
    }
    if residual_scale != 1.0 && matches!(arch, "qwen3_next" | "qwen3_5" | "qwen3_5_moe") {
        bail!("--residual-scale is not available for the hybrid architectures");
    }
    let plan = plan(&cfg, format, residual_scale);
    if matches!(format, SynthFormat::Mlx4 | SynthFormat::Mlx8) {
        let bits = if format == SynthFormat::Mlx4 { 4 } else { 8 };
        let mut q = json!({"group_size": 64, "bits": bits, "mode": "affine"});
        if arch == "qwen3_moe" {
            for l in 0..usize_of(&cfg, "num_hidden_layers") {
                q[format!("model.layers.{l}.mlp.gate")] = json!({"group_size": 64, "bits": 8});
            }
        }
        if matches!(arch, "qwen3_next" | "qwen3_5_moe") {
            let t = cfg.get("text_config").unwrap_or(&cfg).clone();
            let pre = if arch == "qwen3_next" {
                "model"
            } else {
                "language_model.model"
            };
            for l in 0..usize_of(&t, "num_hidden_layers") {
                for m in ["mlp.gate", "mlp.shared_expert_gate"] {
                    q[format!("{pre}.layers.{l}.{m}")] = json!({"group_size": 64, "bits": 8});
                }
            }
        }
        cfg["quantization"] = q.clone();
        cfg["quantization_config"] = q;
    }
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    write_json(&out.join("config.json"), &cfg)?;
    let eos = cfg["eos_token_id"].clone();
    write_json(
        &out.join("generation_config.json"),
        &json!({"bos_token_id": cfg["bos_token_id"], "eos_token_id": eos, "do_sample": true, "temperature": 0.7, "top_p": 0.8, "top_k": 20}),
    )?;
    write_tokenizer(out, arch)?;
    std::fs::write(
        out.join("README.md"),
        format!("Random-weight `{arch}` model, preset `{preset}`, format {format:?}, seed {seed}, written by `moestream synth`.\nIts output is noise: it exists for tests, demos and benchmarks.\n"),
    )?;
    write_safetensors(out, &plan.tensors, seed, progress)
}

fn write_json(path: &Path, v: &Value) -> Result<()> {
    std::fs::write(path, serde_json::to_string_pretty(v)?)
        .with_context(|| format!("writing {}", path.display()))
}

/// GPT-2's byte-to-unicode map: printable stand-ins for every byte, as byte-level BPE uses.
fn byte_to_unicode() -> Vec<char> {
    let mut bs: Vec<u32> = (b'!' as u32..=b'~' as u32)
        .chain(0xA1..=0xAC)
        .chain(0xAE..=0xFF)
        .collect();
    let mut cs = bs.clone();
    let mut n = 0;
    for b in 0..256u32 {
        if !bs.contains(&b) {
            bs.push(b);
            cs.push(256 + n);
            n += 1;
        }
    }
    let mut map = vec![' '; 256];
    for (b, c) in bs.into_iter().zip(cs) {
        map[b as usize] = char::from_u32(c).unwrap_or('?');
    }
    map
}

/// A byte-level BPE tokenizer with the 256 bytes and the family's special tokens: every string
/// round-trips, so `run`, `score --text` and chat work on synthetic models.
/// The special tokens of the synthetic vocabularies, after the 256 byte tokens: Mistral's for
/// Mixtral, Qwen's otherwise (shared by the tokenizer.json and GGUF writers).
pub(crate) fn special_tokens(mistral: bool) -> &'static [&'static str] {
    if mistral {
        &["<s>", "</s>", "<unk>", "[INST]", "[/INST]"]
    } else {
        &[
            "<|endoftext|>",
            "<|im_start|>",
            "<|im_end|>",
            "<think>",
            "</think>",
            "<tool_call>",
            "</tool_call>",
        ]
    }
}

fn write_tokenizer(out: &Path, arch: &str) -> Result<()> {
    let map = byte_to_unicode();
    let mut vocab = serde_json::Map::new();
    for (i, c) in map.iter().enumerate() {
        vocab.insert(c.to_string(), json!(i));
    }
    let specials = special_tokens(arch == "mixtral");
    // Qwen layout: <|endoftext|>=256 (bos), <|im_start|>=257, <|im_end|>=258 (eos).
    // Mixtral layout: <s>=256 (bos), </s>=257 (eos).
    // As in Qwen3's own tokenizer, the think and tool-call tags are not special: decoding keeps
    // them, so reasoning and tool calls can be parsed from the text.
    let added: Vec<Value> = specials
        .iter()
        .enumerate()
        .map(|(k, s)| {
            let special = !matches!(*s, "<think>" | "</think>" | "<tool_call>" | "</tool_call>");
            json!({"id": 256 + k, "content": s, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": special})
        })
        .collect();
    // Llama-family tokenizers prepend BOS through a post-processor when add_special_tokens is on.
    let post_processor = if arch == "mixtral" {
        json!({"type": "TemplateProcessing",
               "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
               "pair": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                        {"SpecialToken": {"id": "<s>", "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
               "special_tokens": {"<s>": {"id": "<s>", "ids": [256], "tokens": ["<s>"]}}})
    } else {
        Value::Null
    };
    let tok = json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "post_processor": post_processor,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null, "end_of_word_suffix": null,
                  "fuse_unk": false, "byte_fallback": false, "ignore_merges": false, "vocab": vocab, "merges": []}
    });
    write_json(&out.join("tokenizer.json"), &tok)?;
    let (template, bos, eos) = if arch == "mixtral" {
        (include_str!("../assets/mixtral.jinja"), "<s>", "</s>")
    } else {
        (
            include_str!("../assets/qwen3.jinja"),
            "<|endoftext|>",
            "<|im_end|>",
        )
    };
    let bos_v = if arch == "mixtral" {
        json!(bos)
    } else {
        Value::Null
    };
    write_json(
        &out.join("tokenizer_config.json"),
        &json!({"add_bos_token": arch == "mixtral", "bos_token": bos_v, "eos_token": eos, "pad_token": eos,
                "model_max_length": 131072, "tokenizer_class": "PreTrainedTokenizerFast", "chat_template": template}),
    )?;
    Ok(())
}

const SHARD_BYTES: usize = 4 << 30;

fn write_safetensors(out: &Path, tensors: &[TensorSpec], seed: u64, progress: bool) -> Result<u64> {
    // Split into shards of at most SHARD_BYTES (whole tensors), as Hugging Face does.
    let mut shards: Vec<Vec<&TensorSpec>> = vec![vec![]];
    let mut cur = 0usize;
    for t in tensors {
        if cur > 0 && cur + t.size_bytes() > SHARD_BYTES {
            shards.push(vec![]);
            cur = 0;
        }
        cur += t.size_bytes();
        if let Some(last) = shards.last_mut() {
            last.push(t);
        }
    }
    let total: u64 = tensors.iter().map(|t| t.size_bytes() as u64).sum();
    let bar = if progress {
        indicatif::ProgressBar::new(total)
    } else {
        indicatif::ProgressBar::hidden()
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let n = shards.len();
    let mut weight_map = serde_json::Map::new();
    let mut stash = Stash::new();
    for (si, shard) in shards.iter().enumerate() {
        let fname = if n == 1 {
            "model.safetensors".to_string()
        } else {
            format!("model-{:05}-of-{:05}.safetensors", si + 1, n)
        };
        let mut header = serde_json::Map::new();
        header.insert("__metadata__".into(), json!({"format": "pt"}));
        let mut off = 0usize;
        for t in shard {
            header.insert(t.name.clone(), json!({"dtype": t.dtype, "shape": t.shape, "data_offsets": [off, off + t.size_bytes()]}));
            off += t.size_bytes();
            weight_map.insert(t.name.clone(), json!(fname));
        }
        let mut hbytes = serde_json::to_vec(&Value::Object(header))?;
        while hbytes.len() % 8 != 0 {
            hbytes.push(b' ');
        }
        let path = out.join(&fname);
        let file =
            std::fs::File::create(&path).with_context(|| format!("creating {}", path.display()))?;
        let mut w = std::io::BufWriter::with_capacity(8 << 20, file);
        w.write_all(&(hbytes.len() as u64).to_le_bytes())?;
        w.write_all(&hbytes)?;
        for t in shard {
            write_tensor(&mut w, t, seed, &bar, &mut stash)?;
        }
        w.flush()?;
    }
    if n > 1 {
        write_json(
            &out.join("model.safetensors.index.json"),
            &json!({"metadata": {"total_size": total}, "weight_map": weight_map}),
        )?;
    }
    bar.finish_and_clear();
    Ok(total)
}

fn fxhash(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    })
}

const CHUNK_ELEMS: usize = 1 << 20;

/// Scales and biases of quantized tensors, computed with their codes and written after them,
/// by the name of the tensor they belong to.
type Stash = std::collections::HashMap<String, (Vec<u8>, Vec<u8>)>;

/// The generator of chunk `c` of a tensor seeded `seed`: the floats of every format come from it.
fn chunk_rng(seed: u64, c: usize) -> impl FnMut() -> u64 {
    let mut rng = seed ^ (c as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    }
}

fn uniform(next: &mut impl FnMut() -> u64, a: f32, center: f32) -> f32 {
    center + a * ((next() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0)
}

/// MLX affine quantization of `values` in groups of `gs`: codes packed low bit first into
/// little-endian u32 words, scales and biases as bf16 (codes computed against the rounded
/// scale and bias, so dequantizing gives the nearest representable value).
fn quantize(values: &[f32], bits: u32, gs: usize) -> (Vec<u8>, Vec<u8>, Vec<u8>) {
    let levels = ((1u32 << bits) - 1) as f32;
    let mut codes = Vec::with_capacity(values.len() * bits as usize / 8);
    let (mut scales, mut biases) = (Vec::new(), Vec::new());
    let (mut acc, mut filled) = (0u64, 0u32);
    for g in values.chunks(gs) {
        let lo = g.iter().copied().fold(f32::INFINITY, f32::min);
        let hi = g.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let scale = half::bf16::from_f32(((hi - lo) / levels).max(1e-8));
        let bias = half::bf16::from_f32(lo);
        let (s, b) = (scale.to_f32(), bias.to_f32());
        scales.extend_from_slice(&scale.to_bits().to_le_bytes());
        biases.extend_from_slice(&bias.to_bits().to_le_bytes());
        for &v in g {
            let q = ((v - b) / s).round().clamp(0.0, levels) as u64;
            acc |= q << filled;
            filled += bits;
            while filled >= 32 {
                codes.extend_from_slice(&(acc as u32).to_le_bytes());
                acc >>= 32;
                filled -= 32;
            }
        }
    }
    debug_assert_eq!(filled, 0, "groups are whole u32 words");
    (codes, scales, biases)
}

fn write_tensor(
    w: &mut impl Write,
    t: &TensorSpec,
    seed: u64,
    bar: &indicatif::ProgressBar,
    stash: &mut Stash,
) -> Result<()> {
    if let Fill::Quantized { a, bits, gs, part } = t.fill {
        // Seeded by the float tensors' names below.
        let stem = t.name.rsplit_once('.').map_or(t.name.as_str(), |p| p.0);
        if part != QuantPart::Codes {
            let parts = stash
                .get_mut(stem)
                .with_context(|| format!("{}: written before its codes", t.name))?;
            let bytes = std::mem::take(if part == QuantPart::Scales {
                &mut parts.0
            } else {
                &mut parts.1
            });
            w.write_all(&bytes)?;
            bar.inc(bytes.len() as u64);
            return Ok(());
        }
        // The float tensor has the codes tensor's name ("X.weight") and 32/bits times as many
        // values; its chunks hold whole groups (CHUNK_ELEMS is a multiple of every gs).
        let sources = if t.sources.is_empty() {
            vec![t.name.clone()]
        } else {
            t.sources.clone()
        };
        let n = t.numel() * 32 / bits as usize / sources.len();
        let chunks = n.div_ceil(CHUNK_ELEMS);
        let batch = rayon::current_num_threads().max(1) * 2;
        let (mut scales, mut biases) = (Vec::new(), Vec::new());
        for source in &sources {
            let fseed = seed ^ fxhash(source);
            for c0 in (0..chunks).step_by(batch) {
                let parts: Vec<(Vec<u8>, Vec<u8>, Vec<u8>)> = (c0..(c0 + batch).min(chunks))
                    .into_par_iter()
                    .map(|c| {
                        let len = CHUNK_ELEMS.min(n - c * CHUNK_ELEMS);
                        let mut next = chunk_rng(fseed, c);
                        let values: Vec<f32> =
                            (0..len).map(|_| uniform(&mut next, a, 0.0)).collect();
                        quantize(&values, bits, gs)
                    })
                    .collect();
                for (codes, s, b) in parts {
                    w.write_all(&codes)?;
                    bar.inc(codes.len() as u64);
                    scales.extend(s);
                    biases.extend(b);
                }
            }
        }
        stash.insert(stem.to_string(), (scales, biases));
        return Ok(());
    }
    let seed = seed ^ fxhash(&t.name);
    let elem = t.size_bytes() / t.numel().max(1);
    let n = t.numel();
    let chunks = n.div_ceil(CHUNK_ELEMS);
    // Generate a batch of chunks in parallel, then write them in order.
    let batch = rayon::current_num_threads().max(1) * 2;
    let mut c0 = 0;
    while c0 < chunks {
        let c1 = (c0 + batch).min(chunks);
        let bufs: Vec<Vec<u8>> = (c0..c1)
            .into_par_iter()
            .map(|c| {
                let len = CHUNK_ELEMS.min(n - c * CHUNK_ELEMS);
                let mut next = chunk_rng(seed, c);
                let mut buf = Vec::with_capacity(len * elem);
                let (a, center) = match t.fill {
                    Fill::Uniform { a, center } => (a, center),
                    Fill::Quantized { .. } => unreachable!("quantized tensors returned above"),
                };
                for _ in 0..len {
                    let v = uniform(&mut next, a, center);
                    if t.dtype == "F32" {
                        buf.extend_from_slice(&v.to_le_bytes());
                    } else {
                        buf.extend_from_slice(&half::bf16::from_f32(v).to_bits().to_le_bytes());
                    }
                }
                buf
            })
            .collect();
        for b in bufs {
            w.write_all(&b)?;
            bar.inc(b.len() as u64);
        }
        c0 = c1;
    }
    Ok(())
}
