//! Shared loading code: reads config.json, indexes the safetensors files and dispatches to the
//! architecture's file, which names the tensors.
use super::blocks::{Attention, Mlp, RmsNorm};
use super::Model;
use crate::config::{Arch, ConfigError, ModelConfig};
use crate::store::{StoreError, StoreOptions, StreamMode};
use crate::weights::{Linear, WeightLoader};
use moestream_formats::{FormatError, SafetensorsIndex};
use moestream_kernels::ops::AttentionShape;
use std::path::Path;

/// Why a model could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// config.json problem.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Weight file problem.
    #[error(transparent)]
    Format(#[from] FormatError),
    /// The expert store could not be set up.
    #[error(transparent)]
    Store(#[from] StoreError),
}

pub(super) fn load(dir: &Path, options: &StoreOptions) -> Result<Model, LoadError> {
    if crate::gguf::is_gguf_path(dir) {
        return load_gguf(dir, options);
    }
    let config = ModelConfig::from_dir(dir)?;
    let size = moestream_formats::weight_files_bytes(dir).ok();
    let (fits, stream) = residency(&config, size, options);
    let index = SafetensorsIndex::open_with(dir, fits && !stream)?;
    let model = build(config, &WeightLoader::safetensors(&index))?;
    finish(model, stream, options)
}

/// A GGUF file (or the first part of a split one): configuration and tensors from the file.
fn load_gguf(path: &Path, options: &StoreOptions) -> Result<Model, LoadError> {
    let probe = crate::gguf::GgufSource::open(path, false)?;
    let config = probe.model_config()?;
    let (fits, stream) = residency(&config, Some(probe.index().total_bytes()), options);
    let source = if fits && !stream {
        drop(probe);
        crate::gguf::GgufSource::open(path, true)?
    } else {
        probe
    };
    let model = build(config, &WeightLoader::gguf(&source))?;
    finish(model, stream, options)
}

/// Whether the weights (`size` bytes) fit in memory, and whether the experts stream.
fn residency(config: &ModelConfig, size: Option<u64>, options: &StoreOptions) -> (bool, bool) {
    let fits = match (size, available_memory_bytes()) {
        (Some(size), Some(avail)) => size < avail / 10 * 9,
        _ => false,
    };
    let stream = config.num_experts > 0
        && match options.stream {
            StreamMode::On => true,
            StreamMode::Off => false,
            StreamMode::Auto => !fits,
        };
    // A model that fits in memory is mapped with every page faulted in at load: otherwise each
    // token's first touch of an expert costs a page fault per 4 KiB, which showed up as a third
    // of decode time. A streamed model is mapped lazily: only its non-expert weights are read,
    // once, into process memory; the expert store reads experts itself.
    (fits, stream)
}

fn build(config: ModelConfig, loader: &WeightLoader) -> Result<Model, LoadError> {
    Ok(match config.arch {
        Arch::Qwen3Moe | Arch::Qwen3 => super::qwen3_moe::load(config, loader)?,
        Arch::Mixtral => super::mixtral::load(config, loader)?,
        Arch::Qwen3Next | Arch::Qwen35 | Arch::Qwen35Moe => {
            super::qwen3_next::load(config, loader)?
        }
    })
}

fn finish(model: Model, stream: bool, options: &StoreOptions) -> Result<Model, LoadError> {
    if stream {
        Ok(model.stream_experts(options)?)
    } else {
        Ok(model)
    }
}

pub(super) fn norm(
    l: &WeightLoader,
    name: &str,
    len: usize,
    eps: f32,
) -> Result<RmsNorm, FormatError> {
    Ok(RmsNorm {
        weight: l.vector(name, len)?,
        eps,
    })
}

/// Reads a norm weight of the given length (plain, or zero-centred with its 1 added).
pub(super) type NormReader<'a> = &'a dyn Fn(&str, usize) -> Result<RmsNorm, FormatError>;

/// `{p}.q_proj` ... `{p}.o_proj` (+ `q_norm`/`k_norm` when `qk_norm`, read through `norm`
/// so that zero-centred checkpoints can add their 1). With `output_gate`, `q_proj` has a gate
/// row block after each head's query rows (Qwen3-Next, Qwen3.5).
pub(super) fn attention_with(
    l: &WeightLoader,
    p: &str,
    c: &ModelConfig,
    qk_norm: Option<NormReader>,
    output_gate: bool,
) -> Result<Attention, FormatError> {
    let (h, d) = (c.hidden_size, c.head_dim);
    let (nq, nkv) = (c.num_attention_heads * d, c.num_key_value_heads * d);
    let (q_norm, k_norm) = match qk_norm {
        Some(norm) => (
            Some(norm(&format!("{p}.q_norm.weight"), d)?),
            Some(norm(&format!("{p}.k_norm.weight"), d)?),
        ),
        None => (None, None),
    };
    let q_rows = if output_gate { 2 * nq } else { nq };
    Ok(Attention {
        q_proj: l.linear(&format!("{p}.q_proj"), q_rows, h)?,
        k_proj: l.linear(&format!("{p}.k_proj"), nkv, h)?,
        v_proj: l.linear(&format!("{p}.v_proj"), nkv, h)?,
        o_proj: l.linear(&format!("{p}.o_proj"), h, nq)?,
        q_norm,
        k_norm,
        shape: AttentionShape {
            n_heads: c.num_attention_heads,
            n_kv_heads: c.num_key_value_heads,
            head_dim: d,
        },
        output_gate,
    })
}

/// Plain attention (Qwen3 with q/k norms, Mixtral without).
pub(super) fn attention(
    l: &WeightLoader,
    p: &str,
    c: &ModelConfig,
    qk_norm: bool,
) -> Result<Attention, FormatError> {
    let plain = |name: &str, len: usize| norm(l, name, len, c.rms_norm_eps);
    attention_with(l, p, c, qk_norm.then_some(&plain as _), false)
}

/// A dense MLP `{p}.{gate,up,down}`.
pub(super) fn mlp(
    l: &WeightLoader,
    p: &str,
    names: [&str; 3],
    hidden: usize,
    inter: usize,
) -> Result<Mlp, FormatError> {
    Ok(Mlp {
        gate_proj: l.linear(&format!("{p}.{}", names[0]), inter, hidden)?,
        up_proj: l.linear(&format!("{p}.{}", names[1]), inter, hidden)?,
        down_proj: l.linear(&format!("{p}.{}", names[2]), hidden, inter)?,
    })
}

/// The experts of MoE block `{p}` in whichever layout the checkpoint uses:
/// MLX stacked `switch_mlp.{gate,up,down}_proj`, transformers-5 fused `experts.gate_up_proj` +
/// `experts.down_proj`, or one tensor per expert `experts.{e}.{names}`.
pub(super) fn experts(
    l: &WeightLoader,
    p: &str,
    names: [&str; 3],
    c: &ModelConfig,
) -> Result<Vec<Mlp>, FormatError> {
    let (e, h, i) = (c.num_experts, c.hidden_size, c.moe_intermediate_size);
    if l.has(&format!("{p}.switch_mlp.gate_proj.weight")) {
        let s = |n: &str, rows, cols| {
            l.stacked_linear(
                &format!("{p}.switch_mlp.{n}.weight"),
                &format!("{p}.switch_mlp.{n}"),
                e,
                rows,
                cols,
            )
        };
        let gate = s("gate_proj", i, h)?;
        let up = s("up_proj", i, h)?;
        let down = s("down_proj", h, i)?;
        return Ok(zip3(gate, up, down));
    }
    if l.has(&format!("{p}.experts.gate_up_proj")) {
        let gu = l.fused_gate_up(&format!("{p}.experts.gate_up_proj"), e, i, h)?;
        let down_name = format!("{p}.experts.down_proj");
        let down = l.stacked_linear(&down_name, &down_name, e, h, i)?;
        return Ok(gu
            .into_iter()
            .zip(down)
            .map(|((g, u), d)| Mlp {
                gate_proj: g,
                up_proj: u,
                down_proj: d,
            })
            .collect());
    }
    (0..e)
        .map(|x| mlp(l, &format!("{p}.experts.{x}"), names, h, i))
        .collect()
}

fn zip3(a: Vec<Linear>, b: Vec<Linear>, c: Vec<Linear>) -> Vec<Mlp> {
    a.into_iter()
        .zip(b)
        .zip(c)
        .map(|((g, u), d)| Mlp {
            gate_proj: g,
            up_proj: u,
            down_proj: d,
        })
        .collect()
}

/// `lm_head`, or the embedding when tied (or when a tied checkpoint omits `lm_head`).
pub(super) fn lm_head(
    l: &WeightLoader,
    c: &ModelConfig,
    embed: &Linear,
) -> Result<Linear, FormatError> {
    if c.tie_word_embeddings && !l.has("lm_head.weight") {
        Ok(embed.clone())
    } else {
        l.linear("lm_head", c.vocab_size, c.hidden_size)
    }
}

/// Memory this process can still use, in bytes: `MemAvailable` from /proc/meminfo, lowered by
/// any cgroup (v1 or v2) memory limit above this process: limit minus what the group uses
/// besides reclaimable page cache. A container or `with-memory-limit` caps a model larger than
/// memory that way.
pub fn available_memory_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = s.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let mut avail = line.split_whitespace().nth(1)?.parse::<u64>().ok()? * 1024;
    if let Some(cg) = cgroup_headroom_bytes() {
        avail = avail.min(cg);
    }
    Some(avail)
}

/// The smallest `limit - usage` over this process's memory cgroup and its ancestors: cgroup v2
/// (`memory.max`, `memory.current`) or v1 (`memory.limit_in_bytes`, `memory.usage_in_bytes` of
/// the memory controller's hierarchy). File pages on the LRU lists (`memory.stat`) are not
/// counted as used: the kernel reclaims them before it runs out, as `MemAvailable` assumes.
fn cgroup_headroom_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let (root, rel, files, file_stats) = if let Some(rel) = s
        .lines()
        .find_map(|l| l.split_once(":memory:").map(|(_, p)| p.to_string()))
    {
        (
            "/sys/fs/cgroup/memory",
            rel,
            ["memory.limit_in_bytes", "memory.usage_in_bytes"],
            ["total_inactive_file", "total_active_file"],
        )
    } else {
        let rel = s.lines().find_map(|l| l.strip_prefix("0::"))?.to_string();
        (
            "/sys/fs/cgroup",
            rel,
            ["memory.max", "memory.current"],
            ["inactive_file", "active_file"],
        )
    };
    let root = std::path::Path::new(root);
    let mut dir = root.join(rel.trim_start_matches('/'));
    let mut best: Option<u64> = None;
    loop {
        let read = |f: &str| std::fs::read_to_string(dir.join(f)).ok();
        if let (Some(max), Some(cur)) = (read(files[0]), read(files[1])) {
            if let (Ok(max), Ok(cur)) = (max.trim().parse::<u64>(), cur.trim().parse::<u64>()) {
                let reclaimable: u64 = read("memory.stat")
                    .map(|stat| {
                        stat.lines()
                            .filter_map(|l| l.split_once(' '))
                            .filter(|(k, _)| file_stats.contains(k))
                            .filter_map(|(_, v)| v.trim().parse::<u64>().ok())
                            .sum()
                    })
                    .unwrap_or(0);
                // v1 reports "no limit" as a huge number; it never wins the minimum.
                let room = max.saturating_sub(cur.saturating_sub(reclaimable));
                best = Some(best.map_or(room, |b| b.min(room)));
            }
        }
        if dir == root || !dir.pop() {
            break;
        }
    }
    best
}
