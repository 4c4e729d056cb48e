//! `synth --format gguf-*`: a random-weight model written as llama.cpp's converter and quantizer
//! would write it: one GGUF file with the `{arch}.*` metadata, a byte-level `gpt2` tokenizer,
//! stacked expert tensors `ffn_{gate,up,down}_exps`, the `llama` (Mixtral) query/key rows in
//! ggml's interleaved RoPE order, and, for `gguf-q4km`, the tensor types llama-quantize chooses
//! for Q4_K_M (MODELS.md 10.6). Weights are quantized by round-to-nearest
//! (`moestream_kernels::ggml::quantize_row`).
//!
//! One deviation: where a row length is not a multiple of 256, llama.cpp falls back from Q4_K to
//! Q5_0 and from Q5_K to Q5_1, which moestream does not read; we fall back to Q8_0 (as llama.cpp
//! does for Q6_K). Tensors are generated and written one at a time.
use anyhow::{bail, Context, Result};
use moestream_formats::gguf::{
    write_gguf, GgmlType, MetadataArray, MetadataValue as V, TensorToWrite,
};
use moestream_kernels::ggml::{quantize_row, BlockFormat};
use rayon::prelude::*;
use serde_json::Value;
use std::path::Path;

/// The GGUF type mixes `synth` writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GgufMix {
    /// llama-quantize Q4_K_M.
    Q4KM,
    /// Every matrix Q8_0.
    Q8_0,
    /// Everything F32.
    F32,
}

/// One tensor: GGUF name, type, numpy shape, fill (std of a uniform, or a norm around 1).
struct Planned {
    name: String,
    ggml_type: GgmlType,
    shape: Vec<usize>,
    std: f32,
    norm: bool,
    /// Heads whose rows get the `llama` converter's RoPE permutation.
    rope_heads: Option<usize>,
}

fn use_more_bits(i: usize, n: usize) -> bool {
    i < n / 8 || i >= 7 * n / 8 || (i as isize - (n / 8) as isize) % 3 == 2
}

fn fallback(t: GgmlType, cols: usize) -> GgmlType {
    if t.block_elements() > 1 && !cols.is_multiple_of(t.block_elements()) {
        GgmlType::Q8_0
    } else {
        t
    }
}

fn u(cfg: &Value, k: &str) -> usize {
    cfg.get(k).and_then(Value::as_u64).unwrap_or(0) as usize
}

/// Writes the model `cfg` (a synth preset's config.json) to `out`; returns the file's bytes.
pub fn write(cfg: &Value, mix: GgufMix, seed: u64, out: &Path) -> Result<u64> {
    let model_type = cfg["model_type"].as_str().unwrap_or_default();
    let arch = match model_type {
        "qwen3_moe" => "qwen3moe",
        "qwen3" => "qwen3",
        "mixtral" => "llama",
        other => bail!("synth writes GGUF for qwen3_moe, qwen3 and mixtral, not `{other}`"),
    };
    let (h, v, layers) = (
        u(cfg, "hidden_size"),
        u(cfg, "vocab_size"),
        u(cfg, "num_hidden_layers"),
    );
    let (nh, nkv) = (u(cfg, "num_attention_heads"), u(cfg, "num_key_value_heads"));
    let d = match u(cfg, "head_dim") {
        0 => h / nh,
        x => x,
    };
    let f = u(cfg, "intermediate_size");
    let (e, k, i) = match model_type {
        "qwen3_moe" => (
            u(cfg, "num_experts"),
            u(cfg, "num_experts_per_tok"),
            u(cfg, "moe_intermediate_size"),
        ),
        "mixtral" => (
            u(cfg, "num_local_experts"),
            u(cfg, "num_experts_per_tok"),
            f,
        ),
        _ => (0, 0, 0),
    };
    let mlp_only: Vec<usize> = cfg["mlp_only_layers"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|x| x.as_u64().map(|x| x as usize))
                .collect()
        })
        .unwrap_or_default();
    let tied = cfg["tie_word_embeddings"].as_bool().unwrap_or(false);
    let eight = e == 8;
    let q = |t: GgmlType, cols: usize| match mix {
        GgufMix::F32 => GgmlType::F32,
        GgufMix::Q8_0 => GgmlType::Q8_0,
        GgufMix::Q4KM => fallback(t, cols),
    };
    let s = |fan_in: usize| 1.0 / (fan_in as f32).sqrt();
    let mut plan: Vec<Planned> = Vec::new();
    let mut add = |name: String, ggml_type, shape: Vec<usize>, std, rope_heads| {
        plan.push(Planned {
            name,
            ggml_type,
            shape,
            std,
            norm: false,
            rope_heads,
        })
    };
    let embd_type = if tied { GgmlType::Q6_K } else { GgmlType::Q4_K };
    // A tied embedding is the output projection too: std 4/sqrt(h) keeps the logits of normed
    // states near std 4, as in real models, where std 1 would spread them over ~100.
    let embd_std = if tied { 4.0 * s(h) } else { 1.0 };
    add(
        "token_embd.weight".into(),
        q(embd_type, h),
        vec![v, h],
        embd_std,
        None,
    );
    let rope = |heads: usize| (arch == "llama").then_some(heads);
    let mut norms = Vec::new();
    for l in 0..layers {
        let b = format!("blk.{l}");
        norms.push((format!("{b}.attn_norm.weight"), h));
        norms.push((format!("{b}.ffn_norm.weight"), h));
        if arch != "llama" {
            norms.push((format!("{b}.attn_q_norm.weight"), d));
            norms.push((format!("{b}.attn_k_norm.weight"), d));
        }
        let v_type = if eight {
            GgmlType::Q8_0
        } else if use_more_bits(l, layers) {
            GgmlType::Q6_K
        } else {
            GgmlType::Q4_K
        };
        let k_type = if eight {
            GgmlType::Q8_0
        } else {
            GgmlType::Q4_K
        };
        let o_type = if eight {
            GgmlType::Q5_K
        } else {
            GgmlType::Q4_K
        };
        let down_type = if use_more_bits(l, layers) {
            GgmlType::Q6_K
        } else {
            GgmlType::Q4_K
        };
        add(
            format!("{b}.attn_q.weight"),
            q(GgmlType::Q4_K, h),
            vec![nh * d, h],
            s(h),
            rope(nh),
        );
        add(
            format!("{b}.attn_k.weight"),
            q(k_type, h),
            vec![nkv * d, h],
            s(h),
            rope(nkv),
        );
        add(
            format!("{b}.attn_v.weight"),
            q(v_type, h),
            vec![nkv * d, h],
            s(h),
            None,
        );
        add(
            format!("{b}.attn_output.weight"),
            q(o_type, nh * d),
            vec![h, nh * d],
            s(nh * d),
            None,
        );
        if e > 0 && !mlp_only.contains(&l) {
            add(
                format!("{b}.ffn_gate_inp.weight"),
                GgmlType::F32,
                vec![e, h],
                s(h),
                None,
            );
            add(
                format!("{b}.ffn_gate_exps.weight"),
                q(GgmlType::Q4_K, h),
                vec![e, i, h],
                s(h),
                None,
            );
            add(
                format!("{b}.ffn_up_exps.weight"),
                q(GgmlType::Q4_K, h),
                vec![e, i, h],
                s(h),
                None,
            );
            add(
                format!("{b}.ffn_down_exps.weight"),
                q(down_type, i),
                vec![e, h, i],
                s(i),
                None,
            );
        } else {
            add(
                format!("{b}.ffn_gate.weight"),
                q(GgmlType::Q4_K, h),
                vec![f, h],
                s(h),
                None,
            );
            add(
                format!("{b}.ffn_up.weight"),
                q(GgmlType::Q4_K, h),
                vec![f, h],
                s(h),
                None,
            );
            add(
                format!("{b}.ffn_down.weight"),
                q(down_type, f),
                vec![h, f],
                s(f),
                None,
            );
        }
    }
    norms.push(("output_norm.weight".into(), h));
    if !tied {
        add(
            "output.weight".into(),
            q(GgmlType::Q6_K, h),
            vec![v, h],
            s(h),
            None,
        );
    }
    for (name, len) in norms {
        plan.push(Planned {
            name,
            ggml_type: GgmlType::F32,
            shape: vec![len],
            std: 0.2,
            norm: true,
            rope_heads: None,
        });
    }

    let metadata = metadata(cfg, arch, mix, (h, v, layers, nh, nkv, d, f, e, k, i))?;
    let tensors: Vec<TensorToWrite> = plan
        .iter()
        .map(|p| TensorToWrite {
            name: p.name.clone(),
            ggml_type: p.ggml_type,
            dims: p.shape.iter().rev().map(|&x| x as u64).collect(),
        })
        .collect();
    let file = std::fs::File::create(out).with_context(|| format!("creating {}", out.display()))?;
    let mut w = std::io::BufWriter::with_capacity(8 << 20, file);
    write_gguf(&mut w, &metadata, &tensors, |idx| {
        Ok(tensor_bytes(&plan[idx], seed))
    })
    .with_context(|| format!("writing {}", out.display()))?;
    std::io::Write::flush(&mut w)?;
    Ok(std::fs::metadata(out)?.len())
}

fn fxhash(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    })
}

/// The tensor's values (uniform, seeded by name and row), permuted and quantized.
fn tensor_bytes(p: &Planned, seed: u64) -> Vec<u8> {
    let cols = *p.shape.last().unwrap_or(&1);
    let rows: usize = p.shape.iter().product::<usize>() / cols.max(1);
    let a = p.std * 3f32.sqrt();
    let tseed = seed ^ fxhash(&p.name);
    let row_values = |r: usize| -> Vec<f32> {
        let mut x = tseed ^ (r as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..cols)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let uni = (x >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0;
                if p.norm {
                    1.0 + p.std * uni
                } else {
                    a * uni
                }
            })
            .collect()
    };
    // The llama converter's permutation: ggml row h·D + 2j + i holds HF row h·D + i·D/2 + j.
    let source_row = |r: usize| match p.rope_heads {
        Some(heads) => {
            let dh = rows / heads;
            let (hd, within) = (r / dh, r % dh);
            let (j, i) = (within / 2, within % 2);
            hd * dh + i * (dh / 2) + j
        }
        None => r,
    };
    let encode = |vals: Vec<f32>| -> Vec<u8> {
        match p.ggml_type {
            GgmlType::F32 => vals.iter().flat_map(|v| v.to_le_bytes()).collect(),
            t => {
                let format =
                    BlockFormat::from_name(t.name()).expect("synth plans supported types only");
                quantize_row(format, &vals)
            }
        }
    };
    let chunks: Vec<Vec<u8>> = (0..rows)
        .into_par_iter()
        .map(|r| encode(row_values(source_row(r))))
        .collect();
    chunks.concat()
}

type Geometry = (
    usize,
    usize,
    usize,
    usize,
    usize,
    usize,
    usize,
    usize,
    usize,
    usize,
);

fn metadata(cfg: &Value, arch: &str, mix: GgufMix, g: Geometry) -> Result<Vec<(String, V)>> {
    let (h, v, layers, nh, nkv, d, f, e, k, i) = g;
    let a = |key: &str| format!("{arch}.{key}");
    let mut m: Vec<(String, V)> = vec![
        ("general.architecture".into(), V::String(arch.into())),
        (
            "general.name".into(),
            V::String(format!(
                "moestream synth {}",
                cfg["model_type"].as_str().unwrap_or("")
            )),
        ),
        (
            "general.file_type".into(),
            V::U32(match mix {
                GgufMix::Q4KM => 15,
                GgufMix::Q8_0 => 7,
                GgufMix::F32 => 0,
            }),
        ),
        ("general.quantization_version".into(), V::U32(2)),
        (a("block_count"), V::U32(layers as u32)),
        (
            a("context_length"),
            V::U32(u(cfg, "max_position_embeddings") as u32),
        ),
        (a("embedding_length"), V::U32(h as u32)),
        (a("feed_forward_length"), V::U32(f as u32)),
        (a("attention.head_count"), V::U32(nh as u32)),
        (a("attention.head_count_kv"), V::U32(nkv as u32)),
        (a("attention.key_length"), V::U32(d as u32)),
        (a("attention.value_length"), V::U32(d as u32)),
        (a("rope.dimension_count"), V::U32(d as u32)),
        (
            a("rope.freq_base"),
            V::F32(cfg["rope_theta"].as_f64().unwrap_or(10000.0) as f32),
        ),
        (
            a("attention.layer_norm_rms_epsilon"),
            V::F32(cfg["rms_norm_eps"].as_f64().unwrap_or(1e-6) as f32),
        ),
    ];
    if e > 0 {
        m.push((a("expert_count"), V::U32(e as u32)));
        m.push((a("expert_used_count"), V::U32(k as u32)));
        if arch == "qwen3moe" {
            m.push((a("expert_feed_forward_length"), V::U32(i as u32)));
        }
    }
    // The synth byte-level vocabulary (as in its tokenizer.json), padded to vocab_size.
    let map = super::byte_to_unicode();
    let specials = super::special_tokens(arch == "llama");
    let mut tokens: Vec<String> = map.iter().map(|c| c.to_string()).collect();
    let mut types: Vec<i32> = vec![1; 256];
    for s in specials {
        tokens.push(s.to_string());
        types.push(if s.starts_with("<|") || arch == "llama" {
            3
        } else {
            4
        });
    }
    if tokens.len() > v {
        bail!(
            "vocab_size {v} is smaller than the {} synth tokens",
            tokens.len()
        );
    }
    while tokens.len() < v {
        tokens.push(format!("[PAD{}]", tokens.len()));
        types.push(5);
    }
    let (bos, eos) = if arch == "llama" {
        (256u32, 257u32)
    } else {
        (256, 258)
    };
    m.extend([
        ("tokenizer.ggml.model".into(), V::String("gpt2".into())),
        ("tokenizer.ggml.pre".into(), V::String("qwen2".into())),
        (
            "tokenizer.ggml.tokens".into(),
            V::Array(MetadataArray::String(tokens)),
        ),
        (
            "tokenizer.ggml.token_type".into(),
            V::Array(MetadataArray::I32(types)),
        ),
        (
            "tokenizer.ggml.merges".into(),
            V::Array(MetadataArray::String(vec![])),
        ),
        ("tokenizer.ggml.bos_token_id".into(), V::U32(bos)),
        ("tokenizer.ggml.eos_token_id".into(), V::U32(eos)),
        ("tokenizer.ggml.padding_token_id".into(), V::U32(eos)),
        (
            "tokenizer.ggml.add_bos_token".into(),
            V::Bool(arch == "llama"),
        ),
        (
            "tokenizer.chat_template".into(),
            V::String(if arch == "llama" {
                include_str!("../../assets/mixtral.jinja").into()
            } else {
                include_str!("../../assets/qwen3.jinja").into()
            }),
        ),
    ]);
    Ok(m)
}
