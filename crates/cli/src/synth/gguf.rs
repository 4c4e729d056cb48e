//! `synth --format gguf-*`: a random-weight model written as llama.cpp's converter and quantizer
//! would write it: one GGUF file with the `{arch}.*` metadata, a byte-level `gpt2` tokenizer,
//! stacked expert tensors `ffn_{gate,up,down}_exps`, the `llama` (Mixtral) query/key rows in
//! ggml's interleaved RoPE order, the hybrids' (`qwen3next`, `qwen35`, `qwen35moe`) tensors as
//! the converter's `Qwen3NextModel` and `_LinearAttentionVReorderBase` leave them (norms as
//! `1 + w`, `ssm_a = −exp(A_log)`, squeezed convolutions, regrouped `attn_qkv`/`attn_gate`,
//! `[1, H]` shared-expert gate, MTP blocks after the trunk with their `nextn` tensors), and, for
//! `gguf-q4km`, the tensor types llama-quantize chooses for Q4_K_M (MODELS.md 10.6). Weights are quantized by round-to-nearest
//! (`moestream_kernels::ggml::quantize_row`).
//!
//! Where a row length is not a multiple of 256, llama.cpp falls back from Q4_K to Q5_0 and from
//! Q6_K to Q8_0, as we do; from Q5_K it falls back to Q5_1, which moestream does not read, and we
//! to Q8_0 (the one deviation). Tensors are generated and written one at a time.
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

/// How a tensor's values are drawn (uniformly, per row, seeded by name).
#[derive(Clone, Copy)]
enum Fill {
    /// Weights of standard deviation `std`.
    Weight(f32),
    /// `center ± a`: norms as the converter stores them (`1 + w`), convolution taps, biases.
    Around { center: f32, a: f32 },
    /// `−exp(center ± a)`: `ssm_a`, which the converter stores as `−exp(A_log)`.
    NegExp { center: f32, a: f32 },
}

/// One tensor: GGUF name, type, numpy shape, fill.
struct Planned {
    name: String,
    ggml_type: GgmlType,
    shape: Vec<usize>,
    fill: Fill,
    /// Heads whose rows get the `llama` converter's RoPE permutation.
    rope_heads: Option<usize>,
}

fn use_more_bits(i: usize, n: usize) -> bool {
    i < n / 8 || i >= 7 * n / 8 || (i as isize - (n / 8) as isize) % 3 == 2
}

fn fallback(t: GgmlType, cols: usize) -> GgmlType {
    match t {
        _ if t.block_elements() <= 1 || cols.is_multiple_of(t.block_elements()) => t,
        // llama.cpp's next step, F16, we write as F32: no synth geometry gets there.
        _ if !cols.is_multiple_of(32) => GgmlType::F32,
        GgmlType::Q4_K => GgmlType::Q5_0,
        _ => GgmlType::Q8_0,
    }
}

fn u(cfg: &Value, k: &str) -> usize {
    cfg.get(k).and_then(Value::as_u64).unwrap_or(0) as usize
}

/// `1/sqrt(fan_in)`: keeps activations of the random model at unit scale.
fn s(fan_in: usize) -> f32 {
    1.0 / (fan_in as f32).sqrt()
}

/// A norm as the converter writes it: `1 + w`, F32.
const NORM: Fill = Fill::Around {
    center: 1.0,
    a: 0.2,
};

/// The model's geometry, read from its configuration (the text part of Qwen3.5's).
struct Geometry {
    arch: &'static str,
    h: usize,
    v: usize,
    /// Trunk layers; `mtp` more blocks follow them.
    layers: usize,
    mtp: usize,
    nh: usize,
    nkv: usize,
    d: usize,
    /// Dense feed-forward width.
    f: usize,
    /// Experts, used per token, expert width, shared-expert width.
    e: usize,
    k: usize,
    i: usize,
    is: usize,
    /// Gated DeltaNet key heads, value heads, key width, value width, taps.
    nk: usize,
    nv: usize,
    dk: usize,
    dv: usize,
    kc: usize,
    /// Per trunk layer: Gated DeltaNet (otherwise full attention).
    linear: Vec<bool>,
    /// Qwen3-Moe's dense layers.
    mlp_only: Vec<usize>,
    tied: bool,
}

impl Geometry {
    fn of(cfg: &Value) -> Result<Geometry> {
        let model_type = cfg["model_type"].as_str().unwrap_or_default();
        let arch = match model_type {
            "qwen3_moe" => "qwen3moe",
            "qwen3" => "qwen3",
            "mixtral" => "llama",
            "qwen3_next" => "qwen3next",
            "qwen3_5" => "qwen35",
            "qwen3_5_moe" => "qwen35moe",
            other => bail!(
                "synth writes GGUF for {}, not `{other}`",
                super::ARCHES.join(", ")
            ),
        };
        let t = cfg
            .get("text_config")
            .filter(|t| t.is_object())
            .unwrap_or(cfg);
        let (h, nh) = (u(t, "hidden_size"), u(t, "num_attention_heads"));
        let layers = u(t, "num_hidden_layers");
        let hybrid = matches!(arch, "qwen3next" | "qwen35" | "qwen35moe");
        let linear = (0..layers)
            .map(|l| t["layer_types"].get(l).and_then(Value::as_str) == Some("linear_attention"))
            .collect();
        Ok(Geometry {
            arch,
            h,
            v: u(t, "vocab_size"),
            layers,
            mtp: if hybrid {
                u(t, "mtp_num_hidden_layers")
            } else {
                0
            },
            nh,
            nkv: u(t, "num_key_value_heads"),
            d: match u(t, "head_dim") {
                0 => h / nh.max(1),
                x => x,
            },
            f: u(t, "intermediate_size"),
            e: u(t, "num_experts").max(u(t, "num_local_experts")),
            k: u(t, "num_experts_per_tok"),
            i: match arch {
                "llama" => u(t, "intermediate_size"),
                _ => u(t, "moe_intermediate_size"),
            },
            is: u(t, "shared_expert_intermediate_size"),
            nk: u(t, "linear_num_key_heads"),
            nv: u(t, "linear_num_value_heads"),
            dk: u(t, "linear_key_head_dim"),
            dv: u(t, "linear_value_head_dim"),
            kc: u(t, "linear_conv_kernel_dim"),
            linear,
            mlp_only: t["mlp_only_layers"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|x| x.as_u64().map(|x| x as usize))
                        .collect()
                })
                .unwrap_or_default(),
            tied: t["tie_word_embeddings"]
                .as_bool()
                .or_else(|| cfg["tie_word_embeddings"].as_bool())
                .unwrap_or(false),
        })
    }

    fn hybrid(&self) -> bool {
        matches!(self.arch, "qwen3next" | "qwen35" | "qwen35moe")
    }

    /// Blocks in the file: the trunk and the multi-token-prediction blocks after it.
    fn blocks(&self) -> usize {
        self.layers + self.mtp
    }
}

/// The tensors of a file, with llama-quantize's Q4_K_M choices (MODELS.md 10.6).
struct Planner<'a> {
    g: &'a Geometry,
    mix: GgufMix,
    plan: Vec<Planned>,
}

impl Planner<'_> {
    /// A matrix `[rows, cols]` (or stacked `[E, rows, cols]`) of Q4_K_M type `t`.
    fn matrix(&mut self, name: String, t: GgmlType, shape: Vec<usize>, rope_heads: Option<usize>) {
        let cols = *shape.last().unwrap_or(&1);
        let ggml_type = match self.mix {
            GgufMix::F32 => GgmlType::F32,
            GgufMix::Q8_0 => GgmlType::Q8_0,
            GgufMix::Q4KM => fallback(t, cols),
        };
        self.plan.push(Planned {
            name,
            ggml_type,
            shape,
            fill: Fill::Weight(s(cols)),
            rope_heads,
        });
    }

    /// A tensor the converter keeps in F32 (norms, routers, `ssm_*` vectors, convolutions).
    fn float(&mut self, name: String, shape: Vec<usize>, fill: Fill) {
        self.plan.push(Planned {
            name,
            ggml_type: GgmlType::F32,
            shape,
            fill,
            rope_heads: None,
        });
    }

    /// `attn_v`'s type (also `attn_qkv`'s): Q6_K on the layers `use_more_bits` picks; Q8_0 with
    /// eight experts.
    fn v_type(&self, l: usize) -> GgmlType {
        if self.g.e == 8 {
            GgmlType::Q8_0
        } else if use_more_bits(l, self.g.blocks()) {
            GgmlType::Q6_K
        } else {
            GgmlType::Q4_K
        }
    }

    fn down_type(&self, l: usize) -> GgmlType {
        if use_more_bits(l, self.g.blocks()) {
            GgmlType::Q6_K
        } else {
            GgmlType::Q4_K
        }
    }

    /// Block `l`: attention (full or Gated DeltaNet), then the feed-forward block.
    fn block(&mut self, l: usize, linear: bool) {
        let g = self.g;
        let (h, b) = (g.h, format!("blk.{l}"));
        self.float(format!("{b}.attn_norm.weight"), vec![h], NORM);
        let post = if g.hybrid() {
            "post_attention_norm"
        } else {
            "ffn_norm"
        };
        self.float(format!("{b}.{post}.weight"), vec![h], NORM);
        if linear {
            self.delta_net(l, &b);
        } else {
            self.attention(l, &b);
        }
        let moe = g.e > 0 && !g.mlp_only.contains(&l);
        let q4k = GgmlType::Q4_K;
        if moe {
            let (e, i) = (g.e, g.i);
            self.float(
                format!("{b}.ffn_gate_inp.weight"),
                vec![e, h],
                Fill::Weight(s(h)),
            );
            self.matrix(
                format!("{b}.ffn_gate_exps.weight"),
                q4k,
                vec![e, i, h],
                None,
            );
            self.matrix(format!("{b}.ffn_up_exps.weight"), q4k, vec![e, i, h], None);
            let down = self.down_type(l);
            self.matrix(
                format!("{b}.ffn_down_exps.weight"),
                down,
                vec![e, h, i],
                None,
            );
            if g.is > 0 {
                let is = g.is;
                // The converter keeps HF's `shared_expert_gate [1, H]` as it is (ne `[H, 1]`,
                // which llama.cpp reads as its `{n_embd}`); one row is never quantized.
                self.float(
                    format!("{b}.ffn_gate_inp_shexp.weight"),
                    vec![1, h],
                    Fill::Weight(s(h)),
                );
                self.matrix(format!("{b}.ffn_gate_shexp.weight"), q4k, vec![is, h], None);
                self.matrix(format!("{b}.ffn_up_shexp.weight"), q4k, vec![is, h], None);
                self.matrix(
                    format!("{b}.ffn_down_shexp.weight"),
                    down,
                    vec![h, is],
                    None,
                );
            }
        } else {
            let f = g.f;
            self.matrix(format!("{b}.ffn_gate.weight"), q4k, vec![f, h], None);
            self.matrix(format!("{b}.ffn_up.weight"), q4k, vec![f, h], None);
            let down = self.down_type(l);
            self.matrix(format!("{b}.ffn_down.weight"), down, vec![h, f], None);
        }
    }

    fn attention(&mut self, l: usize, b: &str) {
        let g = self.g;
        let (h, nh, nkv, d) = (g.h, g.nh, g.nkv, g.d);
        let rope = |heads: usize| (g.arch == "llama").then_some(heads);
        let eight = g.e == 8;
        let (k_type, o_type) = if eight {
            (GgmlType::Q8_0, GgmlType::Q5_K)
        } else {
            (GgmlType::Q4_K, GgmlType::Q4_K)
        };
        // The hybrids' q_proj holds each head's query rows, then its output-gate rows.
        let q_rows = if g.hybrid() { 2 * nh * d } else { nh * d };
        let v_type = self.v_type(l);
        self.matrix(
            format!("{b}.attn_q.weight"),
            GgmlType::Q4_K,
            vec![q_rows, h],
            rope(nh),
        );
        self.matrix(
            format!("{b}.attn_k.weight"),
            k_type,
            vec![nkv * d, h],
            rope(nkv),
        );
        self.matrix(format!("{b}.attn_v.weight"), v_type, vec![nkv * d, h], None);
        self.matrix(
            format!("{b}.attn_output.weight"),
            o_type,
            vec![h, nh * d],
            None,
        );
        if g.arch != "llama" {
            self.float(format!("{b}.attn_q_norm.weight"), vec![d], NORM);
            self.float(format!("{b}.attn_k_norm.weight"), vec![d], NORM);
        }
    }

    /// A Gated DeltaNet as the converter writes it: `attn_qkv` `[Q | K | V]` and `attn_gate`
    /// (Qwen3-Next's `in_proj_qkvz` regrouped), `ssm_ba` (Qwen3-Next) or `ssm_beta` and
    /// `ssm_alpha` (Qwen3.5), the squeezed convolution `[C, K]`, `ssm_a = −exp(A_log)` with
    /// `A = exp(A_log)` in [2, 8], the gated norm's plain `w`. Qwen3.5's value heads are in
    /// llama.cpp's tiled order; with random values the reorder is a relabelling of heads, so
    /// writing the values in place is writing them reordered.
    fn delta_net(&mut self, l: usize, b: &str) {
        let g = self.g;
        let (h, nk, nv, dk, dv) = (g.h, g.nk, g.nv, g.dk, g.dv);
        let c = 2 * nk * dk + nv * dv;
        let q4k = GgmlType::Q4_K;
        let qkv_type = self.v_type(l);
        self.matrix(format!("{b}.attn_qkv.weight"), qkv_type, vec![c, h], None);
        self.matrix(format!("{b}.attn_gate.weight"), q4k, vec![nv * dv, h], None);
        if g.arch == "qwen3next" {
            self.matrix(format!("{b}.ssm_ba.weight"), q4k, vec![2 * nv, h], None);
        } else {
            self.matrix(format!("{b}.ssm_beta.weight"), q4k, vec![nv, h], None);
            self.matrix(format!("{b}.ssm_alpha.weight"), q4k, vec![nv, h], None);
        }
        let around = |center, a| Fill::Around { center, a };
        self.float(
            format!("{b}.ssm_conv1d.weight"),
            vec![c, g.kc],
            around(0.0, 0.5),
        );
        self.float(format!("{b}.ssm_dt.bias"), vec![nv], around(0.0, 0.5));
        self.float(
            format!("{b}.ssm_a"),
            vec![nv],
            Fill::NegExp {
                center: 2.08 - 0.69,
                a: 0.69,
            },
        );
        self.float(format!("{b}.ssm_norm.weight"), vec![dv], around(1.0, 0.2));
        self.matrix(format!("{b}.ssm_out.weight"), q4k, vec![h, nv * dv], None);
    }

    /// The multi-token-prediction blocks: a full-attention block each, and at the first its
    /// `nextn` tensors (MODELS.md 5.5 and 10.3).
    fn mtp(&mut self) {
        let g = self.g;
        for l in g.layers..g.blocks() {
            self.block(l, false);
        }
        if g.mtp > 0 {
            let (h, b) = (g.h, format!("blk.{}.nextn", g.layers));
            self.matrix(
                format!("{b}.eh_proj.weight"),
                GgmlType::Q4_K,
                vec![h, 2 * h],
                None,
            );
            for n in ["enorm", "hnorm", "shared_head_norm"] {
                self.float(format!("{b}.{n}.weight"), vec![h], NORM);
            }
        }
    }
}

/// Writes the model `cfg` (a synth preset's config.json) to `out`; returns the file's bytes.
pub fn write(cfg: &Value, mix: GgufMix, seed: u64, out: &Path) -> Result<u64> {
    let g = Geometry::of(cfg)?;
    let mut p = Planner {
        g: &g,
        mix,
        plan: Vec::new(),
    };
    let (h, v) = (g.h, g.v);
    let embd_type = if g.tied {
        GgmlType::Q6_K
    } else {
        GgmlType::Q4_K
    };
    p.matrix("token_embd.weight".into(), embd_type, vec![v, h], None);
    // Embeddings are not scaled by fan-in: std 1, or, when tied, 4/sqrt(h), which keeps the
    // logits of normed states near std 4, as in real models, where std 1 would spread them
    // over ~100.
    p.plan[0].fill = Fill::Weight(if g.tied { 4.0 * s(h) } else { 1.0 });
    for l in 0..g.layers {
        p.block(l, g.linear[l]);
    }
    p.mtp();
    p.float("output_norm.weight".into(), vec![h], NORM);
    if !g.tied {
        p.matrix("output.weight".into(), GgmlType::Q6_K, vec![v, h], None);
    }
    let plan = p.plan;
    let metadata = metadata(cfg, &g, mix)?;
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
    let tseed = seed ^ fxhash(&p.name);
    let row_values = |r: usize| -> Vec<f32> {
        let mut x = tseed ^ (r as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..cols)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let uni = (x >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0;
                match p.fill {
                    Fill::Weight(std) => std * 3f32.sqrt() * uni,
                    Fill::Around { center, a } => center + a * uni,
                    Fill::NegExp { center, a } => -(center + a * uni).exp(),
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

fn metadata(cfg: &Value, g: &Geometry, mix: GgufMix) -> Result<Vec<(String, V)>> {
    let (arch, v) = (g.arch, g.v);
    let t = cfg
        .get("text_config")
        .filter(|t| t.is_object())
        .unwrap_or(cfg);
    let a = |key: &str| format!("{arch}.{key}");
    let n32 = |x: usize| V::U32(x as u32);
    let rope_theta = t["rope_theta"]
        .as_f64()
        .or_else(|| t["rope_parameters"]["rope_theta"].as_f64())
        .unwrap_or(10000.0);
    // The hybrids rotate the first quarter of each head (`partial_rotary_factor`).
    let rot = if g.hybrid() { g.d / 4 } else { g.d };
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
        (a("block_count"), n32(g.blocks())),
        (a("context_length"), n32(u(t, "max_position_embeddings"))),
        (a("embedding_length"), n32(g.h)),
        (a("feed_forward_length"), n32(g.f)),
        (a("attention.head_count"), n32(g.nh)),
        (a("attention.head_count_kv"), n32(g.nkv)),
        (a("attention.key_length"), n32(g.d)),
        (a("attention.value_length"), n32(g.d)),
        (a("rope.dimension_count"), n32(rot)),
        (a("rope.freq_base"), V::F32(rope_theta as f32)),
        (
            a("attention.layer_norm_rms_epsilon"),
            V::F32(t["rms_norm_eps"].as_f64().unwrap_or(1e-6) as f32),
        ),
    ];
    if g.e > 0 {
        m.push((a("expert_count"), n32(g.e)));
        m.push((a("expert_used_count"), n32(g.k)));
        if arch != "llama" {
            m.push((a("expert_feed_forward_length"), n32(g.i)));
        }
        if g.is > 0 {
            m.push((a("expert_shared_feed_forward_length"), n32(g.is)));
        }
    }
    if g.hybrid() {
        m.extend([
            (a("ssm.conv_kernel"), n32(g.kc)),
            (a("ssm.state_size"), n32(g.dk)),
            (a("ssm.group_count"), n32(g.nk)),
            (a("ssm.time_step_rank"), n32(g.nv)),
            (a("ssm.inner_size"), n32(g.nv * g.dv)),
            (
                a("full_attention_interval"),
                n32(u(t, "full_attention_interval").max(1)),
            ),
        ]);
        let mut recurrent = g.linear.clone();
        recurrent.resize(g.blocks(), false);
        m.push((
            a("attention.recurrent_layers"),
            V::Array(MetadataArray::Bool(recurrent)),
        ));
        if g.mtp > 0 {
            m.push((a("nextn_predict_layers"), n32(g.mtp)));
        }
        if arch != "qwen3next" {
            let mut sections: Vec<i32> = t["rope_parameters"]["mrope_section"]
                .as_array()
                .map(|x| {
                    x.iter()
                        .filter_map(|v| v.as_i64().map(|v| v as i32))
                        .collect()
                })
                .unwrap_or_else(|| vec![11, 11, 10]);
            sections.resize(4, 0);
            m.push((
                a("rope.dimension_sections"),
                V::Array(MetadataArray::I32(sections)),
            ));
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
        (
            "tokenizer.ggml.pre".into(),
            V::String(
                if arch.starts_with("qwen35") {
                    "qwen35"
                } else {
                    "qwen2"
                }
                .into(),
            ),
        ),
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
