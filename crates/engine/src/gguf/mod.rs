//! Models in llama.cpp's GGUF files: configuration, weights and tokenizer from one file (or the
//! first part of a split one).
//!
//! The model code is the one safetensors checkpoints use: it asks a
//! [`WeightLoader`](crate::weights::WeightLoader) for tensors by their Hugging Face names, and
//! [`GgufSource`] answers with the GGUF tensor under the llama.cpp name ([`names`]), after undoing
//! what llama.cpp's converter did to it (MODELS.md 10.4), or with the model told what to expect:
//! - `llama` (Mixtral): query and key rows are permuted back from ggml's interleaved RoPE order
//!   to Hugging Face's half-split order (whole rows move; blocks are never decoded).
//! - the hybrids (`qwen3next`, `qwen35`, `qwen35moe`): `ssm_ba` (Qwen3-Next's `in_proj_ba`,
//!   `[b (r) | a (r)]` per key head) answers `in_proj_b` and `in_proj_a` with its b or a rows;
//!   a 1-D shared-expert gate (`{n_embd}`, as llama.cpp declares it; the converter itself keeps
//!   Hugging Face's `[1, H]`) is read as that matrix. What the model reads
//!   differently: norms already hold `1 + w` (it knows the loader reads GGUF),
//!   `ssm_a` holds `−exp(A_log)` (read under its own name), and Qwen3.5 files have their value
//!   heads in tiled order (set in the configuration, [`config`]), which no permutation of
//!   quantized `ssm_out` columns could undo without decoding it.
//!
//! Stacked expert tensors `ffn_{gate,up,down}_exps [E, rows, cols]` are read like MLX's stacked
//! `switch_mlp` tensors: each expert is a contiguous byte range, which is what the expert store
//! streams.
//!
//! The configuration is rebuilt as a `config.json` object from the `{arch}.*` metadata
//! ([`config`]); the tokenizer as a `tokenizer.json` from `tokenizer.ggml.*` ([`tokenizer`]).
//!
//! Supported: `qwen3moe`, `qwen3`, `llama` files with experts (Mixtral), `qwen3next`, `qwen35`
//! and `qwen35moe` (with their multi-token-prediction blocks, `nextn`, when present).
pub mod config;
mod names;
pub mod tokenizer;

use crate::weights::{Bytes, ElementKind, TensorView};
use moestream_formats::gguf::{GgmlType, GgufIndex, GgufTensor};
use moestream_formats::FormatError;
use moestream_kernels::ggml::BlockFormat;
use moestream_kernels::FloatKind;
use std::path::Path;

pub use moestream_formats::gguf::is_gguf_path;

/// A GGUF model's tensors, answered by Hugging Face name.
#[derive(Debug)]
pub struct GgufSource {
    index: GgufIndex,
    arch: String,
    /// Heads of queries and of keys, for undoing the `llama` converter's row permutation.
    heads: (usize, usize),
    /// Gated DeltaNet key and value heads (`ssm.group_count`, `ssm.time_step_rank`), for
    /// splitting `ssm_ba`.
    linear_heads: (usize, usize),
    /// Blocks of the trunk: `block_count` less the `nextn_predict_layers` after it.
    trunk_layers: usize,
}

impl GgufSource {
    /// Opens `path` (with `populate`, faults every page in now).
    pub fn open(path: &Path, populate: bool) -> Result<GgufSource, FormatError> {
        let index = GgufIndex::open_with(path, populate)?;
        Self::new(index)
    }

    /// Wraps an opened index.
    pub fn new(index: GgufIndex) -> Result<GgufSource, FormatError> {
        let arch = index
            .get_metadata("general.architecture")
            .and_then(|v| v.as_str())
            .ok_or_else(|| FormatError::Gguf {
                path: index.path().to_path_buf(),
                reason: "no string `general.architecture`".into(),
            })?
            .to_string();
        let count = |key: &str| {
            index
                .get_metadata(&format!("{arch}.{key}"))
                .and_then(|v| v.as_u64())
                .unwrap_or(0) as usize
        };
        let heads = (
            count("attention.head_count"),
            match count("attention.head_count_kv") {
                0 => count("attention.head_count"),
                n => n,
            },
        );
        let trunk_layers = count("block_count").saturating_sub(count("nextn_predict_layers"));
        let linear_heads = (count("ssm.group_count"), count("ssm.time_step_rank"));
        Ok(GgufSource {
            index,
            arch,
            heads,
            linear_heads,
            trunk_layers,
        })
    }

    /// The file's index.
    pub fn index(&self) -> &GgufIndex {
        &self.index
    }

    /// `general.architecture`.
    pub fn arch(&self) -> &str {
        &self.arch
    }

    /// Blocks of the trunk (without the multi-token-prediction blocks).
    pub fn trunk_layers(&self) -> usize {
        self.trunk_layers
    }

    /// The file's tensor for Hugging Face name `name`.
    fn find(&self, name: &str) -> Option<&GgufTensor> {
        names::gguf_names(name, self.trunk_layers)
            .iter()
            .find_map(|g| self.index.get(g))
    }

    /// Whether the tensor with Hugging Face name `name` exists.
    pub fn contains(&self, name: &str) -> bool {
        self.find(name).is_some()
    }

    /// Hugging Face names of the tensors that have one.
    pub fn hf_names(&self) -> Vec<String> {
        self.index
            .tensors()
            .iter()
            .filter_map(|t| names::hf_name(&t.name, self.trunk_layers))
            .collect()
    }

    /// The error for a tensor the model needs and the file lacks.
    pub fn missing(&self, name: &str) -> FormatError {
        let candidates = names::gguf_names(name, self.trunk_layers);
        FormatError::Gguf {
            path: self.index.path().to_path_buf(),
            reason: if candidates.is_empty() {
                format!("no GGUF tensor corresponds to Hugging Face `{name}`")
            } else {
                format!(
                    "tensor `{}` (Hugging Face `{name}`) not found",
                    candidates.join("` or `")
                )
            },
        }
    }

    /// The tensor with Hugging Face name `name`, converted back to Hugging Face values.
    pub(crate) fn tensor(&self, name: &str) -> Result<Option<TensorView>, FormatError> {
        let Some(t) = self.find(name) else {
            return Ok(None);
        };
        let mut view = TensorView {
            name: t.name.clone(),
            path: t.file.path().to_path_buf(),
            kind: element_kind(t.ggml_type),
            shape: t.shape(),
            bytes: Bytes::mapped(&t.file, t.offset, t.len),
        };
        if self.arch == "llama" {
            let heads = match name.rsplit('.').nth(1) {
                Some("q_proj") => Some(self.heads.0),
                Some("k_proj") => Some(self.heads.1),
                _ => None,
            };
            if let Some(heads) = heads {
                view.bytes = Bytes::owned(unpermute_rope_rows(t, heads)?);
            }
        }
        if t.name.ends_with(".ssm_ba.weight") {
            let a_rows = name.ends_with("in_proj_a.weight");
            let rows = beta_alpha_rows(t, self.linear_heads, a_rows)?;
            view.shape[0] /= 2;
            view.bytes = Bytes::owned(rows);
        }
        if t.name.ends_with(".ffn_gate_inp_shexp.weight") && view.shape.len() == 1 {
            view.shape.insert(0, 1);
        }
        Ok(Some(view))
    }
}

/// The b rows (or, with `a_rows`, the a rows) of Qwen3-Next's `ssm_ba [2·nv, H]`, which the
/// converter keeps as Hugging Face's `in_proj_ba`: per key head `g`, `r = nv / nk` rows of b
/// then `r` rows of a. Whole rows move, so any block type works.
fn beta_alpha_rows(
    t: &GgufTensor,
    (nk, nv): (usize, usize),
    a_rows: bool,
) -> Result<Vec<u8>, FormatError> {
    let shape = t.shape();
    let rows = shape.first().copied().unwrap_or(0);
    if shape.len() != 2 || nk == 0 || !nv.is_multiple_of(nk) || rows != 2 * nv {
        return Err(t.error(format!(
            "shape {shape:?} is not [2 × {nv} value heads, hidden] in {nk} key-head groups \
             (`ssm.time_step_rank`, `ssm.group_count`)"
        )));
    }
    let r = nv / nk;
    let rb = t.len / rows;
    let src = t.bytes();
    let mut out = Vec::with_capacity(nv * rb);
    for g in 0..nk {
        let first = g * 2 * r + if a_rows { r } else { 0 };
        out.extend_from_slice(&src[first * rb..(first + r) * rb]);
    }
    Ok(out)
}

/// The element kind of a ggml type (unsupported types keep their name for the error).
fn element_kind(t: GgmlType) -> ElementKind {
    match t {
        GgmlType::F32 => ElementKind::Float(FloatKind::F32),
        GgmlType::F16 => ElementKind::Float(FloatKind::F16),
        GgmlType::BF16 => ElementKind::Float(FloatKind::BF16),
        other => match BlockFormat::from_name(other.name()) {
            Some(b) => ElementKind::Block(b),
            None => ElementKind::Other(other.name()),
        },
    }
}

/// Undoes llama.cpp's `LlamaModel.permute` of a query or key projection `[heads·D, cols]`: the
/// converter moved Hugging Face row `(h, i, j)` (head `h`, half `i`, pair `j < D/2`) to row
/// `h·D + 2j + i`, for ggml's interleaved RoPE. Rows are whole (blocks run along them), so this
/// moves bytes and never decodes.
fn unpermute_rope_rows(t: &GgufTensor, heads: usize) -> Result<Vec<u8>, FormatError> {
    let shape = t.shape();
    let rows = shape.first().copied().unwrap_or(0);
    if shape.len() != 2 || heads == 0 || !rows.is_multiple_of(2 * heads) {
        return Err(t.error(format!(
            "shape {shape:?} cannot hold {heads} heads of rotary rows"
        )));
    }
    let d = rows / heads;
    let rb = t.len / rows;
    let src = t.bytes();
    let mut out = vec![0u8; t.len];
    for h in 0..heads {
        for i in 0..2 {
            for j in 0..d / 2 {
                let hf = h * d + i * (d / 2) + j;
                let gg = h * d + 2 * j + i;
                out[hf * rb..(hf + 1) * rb].copy_from_slice(&src[gg * rb..(gg + 1) * rb]);
            }
        }
    }
    Ok(out)
}
