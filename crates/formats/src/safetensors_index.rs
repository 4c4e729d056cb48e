//! Tensor index over the `*.safetensors` files of a checkpoint folder.
//!
//! Files are memory-mapped read-only. The mapping is shared (`Arc`) by every tensor view and by
//! the model, so it lives as long as any weight is in use.
//!
//! SIGBUS: a memory map turns a file that shrinks underneath us (another process truncating it)
//! into a SIGBUS on access. We accept that risk as llama.cpp and ripgrep do: checkpoints are not
//! edited while loaded, and every offset is validated against the file's length at load, so a
//! file that is merely truncated or corrupt is reported as an error before any access.
use crate::FormatError;
use memmap2::Mmap;
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Element types a safetensors tensor may declare.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DType {
    /// IEEE binary32.
    F32,
    /// IEEE binary16.
    F16,
    /// bfloat16.
    BF16,
    /// Unsigned 32-bit integer (MLX packed quantized weights).
    U32,
    /// Any other type; named for error messages.
    Other(&'static str),
}

impl DType {
    fn from_safetensors(d: safetensors::Dtype) -> DType {
        use safetensors::Dtype as D;
        match d {
            D::F32 => DType::F32,
            D::F16 => DType::F16,
            D::BF16 => DType::BF16,
            D::U32 => DType::U32,
            D::BOOL => DType::Other("BOOL"),
            D::U8 => DType::Other("U8"),
            D::I8 => DType::Other("I8"),
            D::I16 => DType::Other("I16"),
            D::U16 => DType::Other("U16"),
            D::I32 => DType::Other("I32"),
            D::I64 => DType::Other("I64"),
            D::U64 => DType::Other("U64"),
            D::F64 => DType::Other("F64"),
            D::F8_E4M3 => DType::Other("F8_E4M3"),
            D::F8_E5M2 => DType::Other("F8_E5M2"),
            _ => DType::Other("unknown"),
        }
    }

    /// Bytes per element, where fixed.
    pub fn size_bytes(self) -> Option<usize> {
        match self {
            DType::F32 | DType::U32 => Some(4),
            DType::F16 | DType::BF16 => Some(2),
            DType::Other(_) => None,
        }
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DType::F32 => f.write_str("F32"),
            DType::F16 => f.write_str("F16"),
            DType::BF16 => f.write_str("BF16"),
            DType::U32 => f.write_str("U32"),
            DType::Other(s) => f.write_str(s),
        }
    }
}

/// One memory-mapped weight file.
#[derive(Debug)]
pub struct MappedFile {
    path: PathBuf,
    map: Mmap,
}

impl MappedFile {
    /// Maps `path` read-only, lazily (pages are faulted in on first touch).
    pub fn open(path: &Path) -> Result<Self, FormatError> {
        Self::open_with(path, false)
    }

    /// Maps `path` read-only; with `populate`, every page is faulted in now (reading the file
    /// into the page cache if needed), so the hot path takes no page faults later.
    pub fn open_with(path: &Path, populate: bool) -> Result<Self, FormatError> {
        let io = |source| FormatError::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = File::open(path).map_err(io)?;
        // SAFETY: the map is read-only and private to this process. If another process truncates
        // the file while it is mapped, access faults (SIGBUS); see the module docs for why that is
        // accepted. Offsets are validated against the length before any access.
        let mut opts = memmap2::MmapOptions::new();
        if populate {
            opts.populate();
        }
        let map = unsafe { opts.map(&file) }.map_err(io)?;
        Ok(MappedFile {
            path: path.to_path_buf(),
            map,
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The whole mapped file.
    pub fn bytes(&self) -> &[u8] {
        &self.map
    }
}

/// Where one tensor's bytes are.
#[derive(Clone, Debug)]
pub struct TensorLocation {
    /// Tensor name as stored.
    pub name: String,
    /// Declared element type.
    pub dtype: DType,
    /// Declared shape.
    pub shape: Vec<usize>,
    /// The file that holds it.
    pub file: Arc<MappedFile>,
    /// Absolute byte offset of the first element in the file.
    pub offset: usize,
    /// Length in bytes.
    pub len: usize,
}

impl TensorLocation {
    /// The tensor's bytes, borrowed from the memory map.
    pub fn bytes(&self) -> &[u8] {
        &self.file.bytes()[self.offset..self.offset + self.len]
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// An error about this tensor.
    pub fn error(&self, reason: impl Into<String>) -> FormatError {
        FormatError::BadTensor {
            path: self.file.path().to_path_buf(),
            tensor: self.name.clone(),
            reason: reason.into(),
        }
    }
}

/// Every tensor of every `*.safetensors` file in a checkpoint folder.
#[derive(Debug)]
pub struct SafetensorsIndex {
    dir: PathBuf,
    tensors: HashMap<String, TensorLocation>,
    files: Vec<Arc<MappedFile>>,
}

impl SafetensorsIndex {
    /// Indexes the folder: the files named by `model.safetensors.index.json` when present, else
    /// every `*.safetensors` file. Every header is parsed and validated here.
    pub fn open(dir: &Path) -> Result<Self, FormatError> {
        Self::open_with(dir, false)
    }

    /// [`SafetensorsIndex::open`], with every file's pages faulted in up front when `populate`.
    pub fn open_with(dir: &Path, populate: bool) -> Result<Self, FormatError> {
        let paths = weight_files(dir)?;
        let mut tensors = HashMap::new();
        let mut files = Vec::new();
        for path in paths {
            let file = Arc::new(MappedFile::open_with(&path, populate)?);
            for loc in parse_header(&file)? {
                if let Some(prev) = tensors.get(&loc.name) {
                    let prev: &TensorLocation = prev;
                    return Err(FormatError::BadTensor {
                        path: path.clone(),
                        tensor: loc.name.clone(),
                        reason: format!("also present in {}", prev.file.path().display()),
                    });
                }
                tensors.insert(loc.name.clone(), loc);
            }
            files.push(file);
        }
        Ok(SafetensorsIndex {
            dir: dir.to_path_buf(),
            tensors,
            files,
        })
    }

    /// The checkpoint folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The tensor, or `None`.
    pub fn get(&self, name: &str) -> Option<&TensorLocation> {
        self.tensors.get(name)
    }

    /// The tensor, or an error naming it.
    pub fn require(&self, name: &str) -> Result<&TensorLocation, FormatError> {
        self.tensors
            .get(name)
            .ok_or_else(|| FormatError::MissingTensor {
                dir: self.dir.clone(),
                tensor: name.to_string(),
            })
    }

    /// Whether a tensor of that name exists.
    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// All tensors, sorted by name.
    pub fn tensors(&self) -> Vec<&TensorLocation> {
        let mut v: Vec<_> = self.tensors.values().collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    /// The mapped files.
    pub fn files(&self) -> &[Arc<MappedFile>] {
        &self.files
    }
}

/// Total bytes of the weight files of a checkpoint folder.
pub fn weight_files_bytes(dir: &Path) -> Result<u64, FormatError> {
    let mut total = 0;
    for p in weight_files(dir)? {
        total += std::fs::metadata(&p)
            .map_err(|source| FormatError::Io {
                path: p.clone(),
                source,
            })?
            .len();
    }
    Ok(total)
}

fn weight_files(dir: &Path) -> Result<Vec<PathBuf>, FormatError> {
    let index_path = dir.join("model.safetensors.index.json");
    if index_path.is_file() {
        let text = std::fs::read_to_string(&index_path).map_err(|source| FormatError::Io {
            path: index_path.clone(),
            source,
        })?;
        let json: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| FormatError::Json {
                path: index_path.clone(),
                reason: format!("malformed JSON: {e}"),
            })?;
        let map = json
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| FormatError::Json {
                path: index_path.clone(),
                reason: "missing object field `weight_map`".into(),
            })?;
        let mut names = BTreeMap::new();
        for (tensor, file) in map {
            let file = file.as_str().ok_or_else(|| FormatError::Json {
                path: index_path.clone(),
                reason: format!("`weight_map.{tensor}` is not a string"),
            })?;
            if file.contains('/') || file.contains("..") {
                return Err(FormatError::Json {
                    path: index_path.clone(),
                    reason: format!(
                        "`weight_map.{tensor}` names a file outside the folder: {file}"
                    ),
                });
            }
            names.insert(file.to_string(), ());
        }
        return Ok(names.into_keys().map(|f| dir.join(f)).collect());
    }
    let rd = std::fs::read_dir(dir).map_err(|source| FormatError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let mut paths: Vec<PathBuf> = rd
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    paths.sort();
    if paths.is_empty() {
        return Err(FormatError::NoWeights {
            dir: dir.to_path_buf(),
        });
    }
    Ok(paths)
}

/// Parses and validates one file's header: offsets must be in bounds, contiguous, and agree with
/// dtype x shape (the `safetensors` crate's validation), so later slicing cannot go out of range.
fn parse_header(file: &Arc<MappedFile>) -> Result<Vec<TensorLocation>, FormatError> {
    let located = locate_tensors(file.bytes()).map_err(|reason| FormatError::Safetensors {
        path: file.path().to_path_buf(),
        reason,
    })?;
    Ok(located
        .into_iter()
        .map(|t| TensorLocation {
            name: t.name,
            dtype: t.dtype,
            shape: t.shape,
            file: file.clone(),
            offset: t.offset,
            len: t.len,
        })
        .collect())
}

/// A tensor of a safetensors file, located in its bytes.
pub(crate) struct Located {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
    /// Absolute byte offset; `offset + len` is at most the file's length.
    pub offset: usize,
    pub len: usize,
}

/// [`parse_header`] on the bytes of a file; the error is the problem, without the file name.
pub(crate) fn locate_tensors(bytes: &[u8]) -> Result<Vec<Located>, String> {
    precheck_header(bytes)?;
    let (header_len, metadata) = safetensors::SafeTensors::read_metadata(bytes).map_err(|e| {
        match e {
            safetensors::SafeTensorError::MetadataIncompleteBuffer => {
                format!("{e} (the tensors' byte ranges do not match the file's length: truncated or corrupt)")
            }
            _ => e.to_string(),
        }
    })?;
    let data_start = 8 + header_len;
    let mut out = Vec::new();
    for (name, info) in metadata.tensors() {
        let (start, end) = info.data_offsets;
        let overflow = || format!("tensor `{name}` offset overflows");
        let offset = data_start.checked_add(start).ok_or_else(overflow)?;
        let stop = data_start.checked_add(end).ok_or_else(overflow)?;
        if end < start || stop > bytes.len() {
            return Err(format!(
                "tensor `{name}` byte range {start}..{end} runs past the end of the file"
            ));
        }
        out.push(Located {
            dtype: DType::from_safetensors(info.dtype),
            shape: info.shape.clone(),
            offset,
            len: end - start,
            name,
        });
    }
    Ok(out)
}

/// Checks each tensor's declared byte range against the file before the `safetensors` crate's
/// own validation, so the error can name the tensor (the crate's does not always).
fn precheck_header(bytes: &[u8]) -> Result<(), String> {
    let Some(len_bytes) = bytes.get(..8) else {
        return Err(format!(
            "file is {} bytes, too short for a safetensors header",
            bytes.len()
        ));
    };
    let mut n = [0u8; 8];
    n.copy_from_slice(len_bytes);
    let header_len = u64::from_le_bytes(n);
    let Some(header) = usize::try_from(header_len)
        .ok()
        .and_then(|h| bytes.get(8..8usize.checked_add(h)?))
    else {
        return Err(format!(
            "header length {header_len} runs past the end of the {}-byte file (truncated?)",
            bytes.len()
        ));
    };
    let Ok(json) = serde_json::from_slice::<serde_json::Value>(header) else {
        return Ok(()); // the crate reports malformed JSON with details
    };
    let data_len = (bytes.len() - 8 - header.len()) as u64;
    if let Some(obj) = json.as_object() {
        for (name, info) in obj {
            if name == "__metadata__" {
                continue;
            }
            let end = info
                .get("data_offsets")
                .and_then(|o| o.get(1))
                .and_then(|e| e.as_u64());
            if let Some(end) = end {
                if end > data_len {
                    return Err(format!(
                        "tensor `{name}` byte range ends at {end}, past the end of the data section ({data_len} bytes): the file is truncated or its header is corrupt"
                    ));
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_st(path: &Path, header: &str, data: &[u8]) {
        let mut h = header.as_bytes().to_vec();
        while !h.len().is_multiple_of(8) {
            h.push(b' ');
        }
        let mut out = (h.len() as u64).to_le_bytes().to_vec();
        out.extend(h);
        out.extend(data);
        std::fs::write(path, out).unwrap();
    }

    #[test]
    fn locates_tensors_across_files_without_reading_them() {
        let d = tempfile::tempdir().unwrap();
        write_st(
            &d.path().join("a.safetensors"),
            r#"{"x":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#,
            &[0, 0, 128, 63, 0, 0, 0, 64],
        );
        write_st(
            &d.path().join("b.safetensors"),
            r#"{"__metadata__":{"format":"mlx"},"y":{"dtype":"BF16","shape":[1,2],"data_offsets":[0,4]}}"#,
            &[1, 2, 3, 4],
        );
        let idx = SafetensorsIndex::open(d.path()).unwrap();
        let x = idx.require("x").unwrap();
        assert_eq!((x.dtype, x.shape.clone(), x.len), (DType::F32, vec![2], 8));
        assert_eq!(x.bytes(), &[0, 0, 128, 63, 0, 0, 0, 64]);
        assert_eq!(idx.require("y").unwrap().bytes(), &[1, 2, 3, 4]);
        let e = idx.require("z").unwrap_err().to_string();
        assert!(e.contains("`z` not found"), "{e}");
        assert_eq!(idx.files().len(), 2);
    }

    #[test]
    fn index_json_names_the_shards_and_cannot_escape_the_folder() {
        let d = tempfile::tempdir().unwrap();
        write_st(
            &d.path().join("s1.safetensors"),
            r#"{"x":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#,
            &[0; 4],
        );
        write_st(
            &d.path().join("stray.safetensors"),
            r#"{"x":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#,
            &[0; 4],
        );
        std::fs::write(
            d.path().join("model.safetensors.index.json"),
            r#"{"weight_map":{"x":"s1.safetensors"}}"#,
        )
        .unwrap();
        // Only the indexed shard is read, so the duplicate in the stray file does not matter.
        assert!(SafetensorsIndex::open(d.path()).unwrap().contains("x"));
        std::fs::write(
            d.path().join("model.safetensors.index.json"),
            r#"{"weight_map":{"x":"../etc/passwd"}}"#,
        )
        .unwrap();
        let e = SafetensorsIndex::open(d.path()).unwrap_err().to_string();
        assert!(e.contains("outside the folder"), "{e}");
        std::fs::write(d.path().join("model.safetensors.index.json"), "{").unwrap();
        let e = SafetensorsIndex::open(d.path()).unwrap_err().to_string();
        assert!(
            e.contains("model.safetensors.index.json") && e.contains("malformed"),
            "{e}"
        );
    }

    #[test]
    fn duplicate_tensor_and_empty_folder_are_errors() {
        let d = tempfile::tempdir().unwrap();
        let e = SafetensorsIndex::open(d.path()).unwrap_err().to_string();
        assert!(e.contains("no *.safetensors"), "{e}");
        for f in ["a.safetensors", "b.safetensors"] {
            write_st(
                &d.path().join(f),
                r#"{"x":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#,
                &[0; 4],
            );
        }
        let e = SafetensorsIndex::open(d.path()).unwrap_err().to_string();
        assert!(e.contains("`x`") && e.contains("also present"), "{e}");
    }

    #[test]
    fn hostile_headers_are_rejected() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("m.safetensors");
        // Header length larger than the file.
        std::fs::write(&f, [255u8, 255, 255, 255, 0, 0, 0, 0, b'{']).unwrap();
        assert!(SafetensorsIndex::open(d.path())
            .unwrap_err()
            .to_string()
            .contains("header"));
        // Shape and byte range disagree.
        write_st(
            &f,
            r#"{"x":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}"#,
            &[0; 8],
        );
        assert!(SafetensorsIndex::open(d.path()).is_err());
        // Unknown dtype string.
        write_st(
            &f,
            r#"{"x":{"dtype":"Q4","shape":[2],"data_offsets":[0,8]}}"#,
            &[0; 8],
        );
        assert!(SafetensorsIndex::open(d.path())
            .unwrap_err()
            .to_string()
            .contains("m.safetensors"));
    }
}
