//! GGUF files (llama.cpp's format): metadata and a tensor index, single or split files.
//!
//! A GGUF file is a header (magic, version, metadata entries, tensor infos) followed by a data
//! section aligned to `general.alignment` (default 32) in which each tensor sits at its declared
//! offset (MODELS.md 10.1). [`GgufIndex`] maps the file(s) read-only, parses and validates every
//! header up front, and answers "where are the bytes of tensor X" with a [`GgufTensor`]: a file
//! and a byte range. Tensor data are never read here, only located: the engine borrows the
//! mapped bytes, and the expert store reads the ranges of streamed experts itself.
//!
//! Validation: every count, string length, array length, dimension, type, offset and size is
//! checked (with overflow checks) before it is used, and every tensor's byte range must lie
//! inside its file, so a corrupt or hostile file is an error naming the file and the problem,
//! never a huge allocation or an out-of-bounds read (see `header.rs`).
//!
//! Split files (`NAME-00001-of-00003.gguf`, as `llama-gguf-split` writes them) are opened from
//! the first part; each part is a GGUF file of its own with `split.no` (0-based) and
//! `split.count`, and the metadata of the model are those of the first part.
//!
//! Shapes: ggml lists dimensions innermost first (`dims[0]` is contiguous); [`GgufTensor::shape`]
//! is the reverse, the PyTorch/numpy shape of the same row-major bytes.
mod ggml_type;
pub(crate) mod header;
mod metadata;
#[cfg(test)]
mod tests;
mod writer;

pub use ggml_type::{file_type_name, GgmlType};
pub use header::DEFAULT_ALIGNMENT;
pub use metadata::{MetadataArray, MetadataValue, ValueType};
pub use writer::{write_gguf, TensorToWrite};

use crate::{FormatError, MappedFile};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Where one GGUF tensor's bytes are.
#[derive(Clone, Debug)]
pub struct GgufTensor {
    /// Tensor name as stored (`blk.0.attn_q.weight`).
    pub name: String,
    /// Element type.
    pub ggml_type: GgmlType,
    /// ggml dimensions, innermost first.
    pub dims: Vec<u64>,
    /// The file that holds it.
    pub file: Arc<MappedFile>,
    /// Absolute byte offset in the file.
    pub offset: usize,
    /// Length in bytes.
    pub len: usize,
}

impl GgufTensor {
    /// The PyTorch/numpy shape: `dims` reversed.
    pub fn shape(&self) -> Vec<usize> {
        // Validated at parse: the element count fits in i64, so every dim fits in usize on
        // 64-bit targets (and the file, hence the tensor, in the address space).
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.dims.iter().map(|&d| d as usize).product()
    }

    /// The tensor's bytes (borrowed from the memory map).
    pub fn bytes(&self) -> &[u8] {
        &self.file.bytes()[self.offset..self.offset + self.len]
    }

    /// An error about this tensor, naming its file.
    pub fn error(&self, reason: impl Into<String>) -> FormatError {
        FormatError::BadTensor {
            path: self.file.path().to_path_buf(),
            tensor: self.name.clone(),
            reason: reason.into(),
        }
    }
}

/// The metadata and tensors of a GGUF model (one file, or all parts of a split one).
#[derive(Debug)]
pub struct GgufIndex {
    path: PathBuf,
    version: u32,
    alignment: u64,
    files: Vec<Arc<MappedFile>>,
    metadata: Vec<(String, MetadataValue)>,
    metadata_by_key: HashMap<String, usize>,
    tensors: Vec<GgufTensor>,
    by_name: HashMap<String, usize>,
}

/// Whether `path` names a GGUF file (by its extension).
pub fn is_gguf_path(path: &Path) -> bool {
    path.extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
}

/// `(prefix, part, count)` of a split file name `PREFIX-0000i-of-0000n.gguf` (1-based part).
fn split_name(path: &Path) -> Option<(String, usize, usize)> {
    let name = path.file_name()?.to_str()?;
    let stem = name.strip_suffix(".gguf")?;
    let (rest, count) = stem.rsplit_once("-of-")?;
    let (prefix, part) = rest.rsplit_once('-')?;
    let digits = |s: &str| s.len() == 5 && s.bytes().all(|b| b.is_ascii_digit());
    if !digits(part) || !digits(count) {
        return None;
    }
    Some((prefix.to_string(), part.parse().ok()?, count.parse().ok()?))
}

impl GgufIndex {
    /// Opens a GGUF file, or the first part of a split one, mapped lazily.
    pub fn open(path: &Path) -> Result<Self, FormatError> {
        Self::open_with(path, false)
    }

    /// Opens a GGUF file or the first part of a split one; with `populate`, every page of every
    /// part is faulted in now.
    pub fn open_with(path: &Path, populate: bool) -> Result<Self, FormatError> {
        let err = |p: &Path, reason: String| FormatError::Gguf {
            path: p.to_path_buf(),
            reason,
        };
        let first = Arc::new(MappedFile::open_with(path, populate)?);
        let header = header::parse(first.bytes()).map_err(|r| err(path, r))?;
        let meta_u64 = |h: &header::Header, key: &str| {
            h.metadata
                .iter()
                .find(|(k, _)| k == key)
                .and_then(|(_, v)| v.as_u64())
        };
        let declared_count = meta_u64(&header, "split.count").unwrap_or(1) as usize;
        let mut parts = vec![(first, header)];
        if declared_count > 1 || split_name(path).is_some_and(|(_, _, n)| n > 1) {
            let Some((prefix, part, count)) = split_name(path) else {
                return Err(err(
                    path,
                    format!("split.count is {declared_count}, but the name is not NAME-00001-of-{declared_count:05}.gguf"),
                ));
            };
            if part != 1 {
                return Err(err(
                    path,
                    format!("part {part} of a split model: open the first part ({prefix}-00001-of-{count:05}.gguf)"),
                ));
            }
            if count != declared_count {
                return Err(err(
                    path,
                    format!("the name says {count} parts, split.count says {declared_count}"),
                ));
            }
            let dir = path.parent().unwrap_or(Path::new(""));
            for i in 2..=count {
                let p = dir.join(format!("{prefix}-{i:05}-of-{count:05}.gguf"));
                let file = Arc::new(MappedFile::open_with(&p, populate)?);
                let h = header::parse(file.bytes()).map_err(|r| err(&p, r))?;
                parts.push((file, h));
            }
            for (i, (file, h)) in parts.iter().enumerate() {
                if meta_u64(h, "split.no") != Some(i as u64) {
                    return Err(err(
                        file.path(),
                        format!("expected split.no = {i} (part {} of {count})", i + 1),
                    ));
                }
            }
            if let Some(total) = meta_u64(&parts[0].1, "split.tensors.count") {
                let found: usize = parts.iter().map(|(_, h)| h.tensors.len()).sum();
                if total != found as u64 {
                    return Err(err(
                        path,
                        format!("split.tensors.count is {total}, the {count} parts hold {found}"),
                    ));
                }
            }
        }

        let version = parts[0].1.version;
        let alignment = parts[0].1.alignment;
        let metadata = parts[0].1.metadata.clone();
        let metadata_by_key = metadata
            .iter()
            .enumerate()
            .map(|(i, (k, _))| (k.clone(), i))
            .collect();
        let mut tensors = Vec::new();
        let mut by_name = HashMap::new();
        for (file, h) in &parts {
            for t in &h.tensors {
                // Validated in `parse`: data_start + offset + len <= file length.
                let offset = (h.data_start + t.offset) as usize;
                if by_name.insert(t.name.clone(), tensors.len()).is_some() {
                    return Err(err(
                        file.path(),
                        format!("tensor `{}` is in two parts", t.name),
                    ));
                }
                tensors.push(GgufTensor {
                    name: t.name.clone(),
                    ggml_type: t.ggml_type,
                    dims: t.dims.clone(),
                    file: file.clone(),
                    offset,
                    len: t.len as usize,
                });
            }
        }
        Ok(GgufIndex {
            path: path.to_path_buf(),
            version,
            alignment,
            files: parts.into_iter().map(|(f, _)| f).collect(),
            metadata,
            metadata_by_key,
            tensors,
            by_name,
        })
    }

    /// The file opened (the first part of a split model).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// GGUF version (2 or 3).
    pub fn version(&self) -> u32 {
        self.version
    }

    /// Alignment of the data section and tensors (`general.alignment`, default 32).
    pub fn alignment(&self) -> u64 {
        self.alignment
    }

    /// Metadata entries in file order.
    pub fn metadata(&self) -> &[(String, MetadataValue)] {
        &self.metadata
    }

    /// The metadata value of `key`.
    pub fn get_metadata(&self, key: &str) -> Option<&MetadataValue> {
        self.metadata_by_key.get(key).map(|&i| &self.metadata[i].1)
    }

    /// A tensor by name.
    pub fn get(&self, name: &str) -> Option<&GgufTensor> {
        self.by_name.get(name).map(|&i| &self.tensors[i])
    }

    /// A tensor by name, or an error naming the file and the tensor.
    pub fn require(&self, name: &str) -> Result<&GgufTensor, FormatError> {
        self.get(name).ok_or_else(|| FormatError::Gguf {
            path: self.path.clone(),
            reason: format!("tensor `{name}` not found"),
        })
    }

    /// Whether a tensor exists.
    pub fn contains(&self, name: &str) -> bool {
        self.by_name.contains_key(name)
    }

    /// All tensors in file order.
    pub fn tensors(&self) -> &[GgufTensor] {
        &self.tensors
    }

    /// The mapped files (one per part).
    pub fn files(&self) -> &[Arc<MappedFile>] {
        &self.files
    }

    /// Total bytes of the file(s).
    pub fn total_bytes(&self) -> u64 {
        self.files.iter().map(|f| f.bytes().len() as u64).sum()
    }
}
