//! Models in llama.cpp's GGUF files: configuration, weights and tokenizer from one file (or the
//! first part of a split one).
//!
//! The model code is the one safetensors checkpoints use: it asks a
//! [`WeightLoader`](crate::weights::WeightLoader) for tensors by their Hugging Face names, and
//! [`GgufSource`] answers with the GGUF tensor under the llama.cpp name ([`names`]), after undoing
//! what llama.cpp's converter did to it (MODELS.md 10.4): the `llama` architecture's (Mixtral's)
//! query and key rows are permuted back from ggml's interleaved RoPE order to Hugging Face's
//! half-split order. Stacked expert tensors `ffn_{gate,up,down}_exps [E, rows, cols]` are read
//! like MLX's stacked `switch_mlp` tensors: each expert is a contiguous byte range, which is
//! what the expert store streams.
//!
//! The configuration is rebuilt as a `config.json` object from the `{arch}.*` metadata
//! ([`config`]); the tokenizer as a `tokenizer.json` from `tokenizer.ggml.*` ([`tokenizer`]).
//!
//! Supported: `qwen3moe`, `qwen3`, and `llama` files with experts (Mixtral). The hybrids
//! (`qwen3next`, `qwen35`, `qwen35moe`) are refused with an error naming the architecture.
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
        Ok(GgufSource { index, arch, heads })
    }

    /// The file's index.
    pub fn index(&self) -> &GgufIndex {
        &self.index
    }

    /// `general.architecture`.
    pub fn arch(&self) -> &str {
        &self.arch
    }

    /// Whether the tensor with Hugging Face name `name` exists.
    pub fn contains(&self, name: &str) -> bool {
        names::gguf_name(name).is_some_and(|g| self.index.contains(&g))
    }

    /// Hugging Face names of the tensors that have one.
    pub fn hf_names(&self) -> Vec<String> {
        self.index
            .tensors()
            .iter()
            .filter_map(|t| names::hf_name(&t.name))
            .collect()
    }

    /// The error for a tensor the model needs and the file lacks.
    pub fn missing(&self, name: &str) -> FormatError {
        FormatError::Gguf {
            path: self.index.path().to_path_buf(),
            reason: match names::gguf_name(name) {
                Some(g) => format!("tensor `{g}` (Hugging Face `{name}`) not found"),
                None => format!("no GGUF tensor corresponds to Hugging Face `{name}`"),
            },
        }
    }

    /// The tensor with Hugging Face name `name`, converted back to Hugging Face values.
    pub(crate) fn tensor(&self, name: &str) -> Result<Option<TensorView>, FormatError> {
        let Some(t) = names::gguf_name(name).and_then(|g| self.index.get(&g)) else {
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
        Ok(Some(view))
    }
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
