//! Turning checkpoint tensors into weight views the kernels read in place.
//!
//! A [`Linear`] is a `[rows, cols]` matrix whose bytes stay in the memory map: float (F32, F16,
//! BF16) or MLX group-affine quantized (packed codes + scales + biases). Stacked expert tensors
//! (MLX `switch_mlp.*` `[E, out, in]`, transformers-5 fused `experts.gate_up_proj`) are sliced per
//! expert into ordinary `Linear`s: each expert is a contiguous byte range of each tensor, which is
//! also what the expert store will read from disk.
//!
//! GGUF files ([`crate::gguf`]) are read through the same loader: the model code asks for Hugging
//! Face names, the GGUF source answers with the llama.cpp tensor under them (with the
//! converter's transformations undone), whose llama.cpp blocks become [`Storage::Ggml`].
//!
//! Every tensor's dtype and shape are checked against what `config.json` implies, so a mismatch is
//! an error naming the file, tensor and both shapes, never a panic or a silent misread.
use crate::gguf::GgufSource;
use moestream_formats::{DType, FormatError, MappedFile, SafetensorsIndex, TensorLocation};
use moestream_kernels::features::ProductMode;
use moestream_kernels::ggml::BlockFormat;
use moestream_kernels::{FloatKind, Matrix, Weights};
use std::path::PathBuf;
use std::sync::Arc;

/// What a [`Bytes`] range points into.
#[derive(Clone, Debug)]
enum Backing {
    /// A memory-mapped weight file.
    Mapped(Arc<MappedFile>),
    /// A private copy in process memory (non-expert weights of a streamed model).
    Owned(Arc<[u8]>),
}

/// A byte range of a mapped weight file, or of a private copy of one.
#[derive(Clone, Debug)]
pub struct Bytes {
    backing: Backing,
    offset: usize,
    len: usize,
}

impl Bytes {
    fn of(t: &TensorLocation) -> Bytes {
        Bytes::mapped(&t.file, t.offset, t.len)
    }
    /// `len` bytes at `offset` of a mapped file (the caller checked the range).
    pub(crate) fn mapped(file: &Arc<MappedFile>, offset: usize, len: usize) -> Bytes {
        debug_assert!(offset + len <= file.bytes().len());
        Bytes {
            backing: Backing::Mapped(file.clone()),
            offset,
            len,
        }
    }
    /// Bytes held in process memory.
    pub(crate) fn owned(bytes: Vec<u8>) -> Bytes {
        let len = bytes.len();
        Bytes {
            backing: Backing::Owned(Arc::from(bytes)),
            offset: 0,
            len,
        }
    }
    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        let all = match &self.backing {
            Backing::Mapped(f) => f.bytes(),
            Backing::Owned(b) => b,
        };
        &all[self.offset..self.offset + self.len]
    }
    /// Sub-range `[start, start + len)` relative to this one.
    fn slice(&self, start: usize, len: usize) -> Bytes {
        debug_assert!(start + len <= self.len);
        Bytes {
            backing: self.backing.clone(),
            offset: self.offset + start,
            len,
        }
    }
    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }
    /// Whether empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// The mapped file and absolute offset, for ranges that are still file-backed (the expert
    /// store reads these itself).
    pub fn location(&self) -> Option<(&Arc<MappedFile>, usize)> {
        match &self.backing {
            Backing::Mapped(f) => Some((f, self.offset)),
            Backing::Owned(_) => None,
        }
    }
    /// A private copy of the bytes, so that they no longer depend on the file or the page cache.
    fn to_owned_copy(&self) -> Bytes {
        Bytes {
            backing: Backing::Owned(Arc::from(self.as_slice())),
            offset: 0,
            len: self.len,
        }
    }
}

/// How a [`Linear`]'s numbers are stored.
#[derive(Clone, Debug)]
pub enum Storage {
    /// Plain floats.
    Float {
        /// Element type.
        kind: FloatKind,
        /// `rows * cols` elements.
        data: Bytes,
    },
    /// MLX group-affine quantization.
    Affine {
        /// Bits per code.
        bits: u32,
        /// Elements per group.
        group_size: usize,
        /// Packed codes.
        packed: Bytes,
        /// Per-group scales.
        scales: Bytes,
        /// Per-group biases.
        biases: Bytes,
        /// Scale/bias element type.
        scale_kind: FloatKind,
    },
    /// llama.cpp block quantization (GGUF).
    Ggml {
        /// Block format.
        format: BlockFormat,
        /// `rows` rows of `format.row_bytes(cols)` bytes.
        data: Bytes,
    },
}

impl Storage {
    /// The same format with every byte range replaced by `f(range)`.
    fn map_bytes(&self, f: impl Fn(&Bytes) -> Bytes) -> Storage {
        match self {
            Storage::Float { kind, data } => Storage::Float {
                kind: *kind,
                data: f(data),
            },
            Storage::Affine {
                bits,
                group_size,
                packed,
                scales,
                biases,
                scale_kind,
            } => Storage::Affine {
                bits: *bits,
                group_size: *group_size,
                packed: f(packed),
                scales: f(scales),
                biases: f(biases),
                scale_kind: *scale_kind,
            },
            Storage::Ggml { format, data } => Storage::Ggml {
                format: *format,
                data: f(data),
            },
        }
    }
}

/// A `[rows, cols]` weight matrix (`y = W x`).
#[derive(Clone, Debug)]
pub struct Linear {
    /// Output features.
    pub rows: usize,
    /// Input features.
    pub cols: usize,
    /// Where the numbers are.
    pub storage: Storage,
}

impl Linear {
    /// A kernel view of the matrix.
    pub fn matrix(&self) -> Matrix<'_> {
        let weights = match &self.storage {
            Storage::Float { kind, data } => Weights::Float {
                kind: *kind,
                data: data.as_slice(),
            },
            Storage::Affine {
                bits,
                group_size,
                packed,
                scales,
                biases,
                scale_kind,
            } => Weights::Affine {
                bits: *bits,
                group_size: *group_size,
                packed: packed.as_slice(),
                scales: scales.as_slice(),
                biases: biases.as_slice(),
                scale_kind: *scale_kind,
            },
            Storage::Ggml { format, data } => Weights::Ggml {
                format: *format,
                data: data.as_slice(),
            },
        };
        Matrix {
            rows: self.rows,
            cols: self.cols,
            weights,
        }
    }

    /// `y[t] = W x[t]` for `n_tokens` rows of `x`, computed as `mode` says (the forward pass's
    /// [`ProductMode`]).
    pub fn forward(&self, mode: ProductMode, x: &[f32], n_tokens: usize, y: &mut [f32]) {
        moestream_kernels::matmul_at(mode, &self.matrix(), x, n_tokens, y)
    }

    /// Bytes of weights.
    pub fn size_bytes(&self) -> usize {
        match &self.storage {
            Storage::Float { data, .. } | Storage::Ggml { data, .. } => data.len(),
            Storage::Affine {
                packed,
                scales,
                biases,
                ..
            } => packed.len() + scales.len() + biases.len(),
        }
    }

    /// The same matrix with its bytes copied into process memory. A model whose experts stream
    /// keeps everything else this way: resident whatever the page cache does, and immune to the
    /// file changing under it.
    pub fn to_resident(&self) -> Linear {
        Linear {
            rows: self.rows,
            cols: self.cols,
            storage: self.storage.map_bytes(|b| b.to_owned_copy()),
        }
    }

    /// A short description of the format, e.g. `bf16` or `q4g64`.
    pub fn format_name(&self) -> String {
        match &self.storage {
            Storage::Float { kind, .. } => format!("{kind:?}").to_lowercase(),
            Storage::Affine {
                bits, group_size, ..
            } => format!("q{bits}g{group_size}"),
            Storage::Ggml { format, .. } => format.name().to_lowercase(),
        }
    }

    /// Rows `[start, start + n)` as their own matrix (used to split fused gate/up tensors).
    fn rows_slice(&self, start: usize, n: usize) -> Linear {
        let storage = match &self.storage {
            Storage::Float { kind, data } => {
                let rb = self.cols * kind.size_bytes();
                Storage::Float {
                    kind: *kind,
                    data: data.slice(start * rb, n * rb),
                }
            }
            Storage::Affine {
                bits,
                group_size,
                packed,
                scales,
                biases,
                scale_kind,
            } => {
                let pb = self.cols * *bits as usize / 8;
                let sb = self.cols / group_size * scale_kind.size_bytes();
                Storage::Affine {
                    bits: *bits,
                    group_size: *group_size,
                    packed: packed.slice(start * pb, n * pb),
                    scales: scales.slice(start * sb, n * sb),
                    biases: biases.slice(start * sb, n * sb),
                    scale_kind: *scale_kind,
                }
            }
            Storage::Ggml { format, data } => {
                let rb = format.row_bytes(self.cols);
                Storage::Ggml {
                    format: *format,
                    data: data.slice(start * rb, n * rb),
                }
            }
        };
        Linear {
            rows: n,
            cols: self.cols,
            storage,
        }
    }
}

/// How a tensor's elements are stored, whatever the file format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ElementKind {
    /// Plain floats.
    Float(FloatKind),
    /// llama.cpp blocks.
    Block(BlockFormat),
    /// u32 words (MLX packed codes).
    U32,
    /// Anything no kernel reads; named for errors.
    Other(&'static str),
}

impl std::fmt::Display for ElementKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ElementKind::Float(k) => write!(f, "{}", format!("{k:?}").to_uppercase()),
            ElementKind::Block(b) => f.write_str(b.name()),
            ElementKind::U32 => f.write_str("U32"),
            ElementKind::Other(s) => f.write_str(s),
        }
    }
}

/// One tensor as the loader sees it: from a safetensors index or a GGUF file.
#[derive(Clone, Debug)]
pub(crate) struct TensorView {
    /// The name in its file (a GGUF tensor keeps its llama.cpp name, for error messages).
    pub name: String,
    /// The file that holds it.
    pub path: PathBuf,
    /// Element storage.
    pub kind: ElementKind,
    /// PyTorch-order shape in elements.
    pub shape: Vec<usize>,
    /// The bytes.
    pub bytes: Bytes,
}

impl TensorView {
    fn of_safetensors(t: &TensorLocation) -> TensorView {
        TensorView {
            name: t.name.clone(),
            path: t.file.path().to_path_buf(),
            kind: match t.dtype {
                DType::F32 => ElementKind::Float(FloatKind::F32),
                DType::F16 => ElementKind::Float(FloatKind::F16),
                DType::BF16 => ElementKind::Float(FloatKind::BF16),
                DType::U32 => ElementKind::U32,
                DType::Other(s) => ElementKind::Other(s),
            },
            shape: t.shape.clone(),
            bytes: Bytes::of(t),
        }
    }

    /// An error about this tensor.
    pub fn error(&self, reason: impl Into<String>) -> FormatError {
        FormatError::BadTensor {
            path: self.path.clone(),
            tensor: self.name.clone(),
            reason: reason.into(),
        }
    }

    fn float_kind(&self) -> Result<FloatKind, FormatError> {
        match self.kind {
            ElementKind::Float(k) => Ok(k),
            d => Err(self.error(format!(
                "unsupported dtype {d} here; supported: F32, F16, BF16"
            ))),
        }
    }
}

fn shape_error(t: &TensorView, expected: &[usize]) -> FormatError {
    t.error(format!(
        "shape {:?} disagrees with the model's configuration, which implies {:?}",
        t.shape, expected
    ))
}

/// Where a [`WeightLoader`] finds tensors.
#[derive(Clone, Copy)]
enum Source<'a> {
    Safetensors(&'a SafetensorsIndex),
    Gguf(&'a GgufSource),
}

/// Reads tensors, by their Hugging Face names, out of a [`SafetensorsIndex`] or a GGUF file as
/// typed, shape-checked views.
pub struct WeightLoader<'a> {
    source: Source<'a>,
}

impl<'a> WeightLoader<'a> {
    /// A loader over a safetensors checkpoint.
    pub fn safetensors(index: &'a SafetensorsIndex) -> Self {
        WeightLoader {
            source: Source::Safetensors(index),
        }
    }

    /// A loader over a GGUF file.
    pub fn gguf(source: &'a GgufSource) -> Self {
        WeightLoader {
            source: Source::Gguf(source),
        }
    }

    /// Whether the tensors come from a GGUF file.
    pub fn is_gguf(&self) -> bool {
        matches!(self.source, Source::Gguf(_))
    }

    /// Whether a tensor exists.
    pub fn has(&self, name: &str) -> bool {
        match self.source {
            Source::Safetensors(i) => i.contains(name),
            Source::Gguf(g) => g.contains(name),
        }
    }

    /// The Hugging Face names of every tensor (for GGUF: of those that have one).
    pub fn tensor_names(&self) -> Vec<String> {
        match self.source {
            Source::Safetensors(i) => i.tensors().iter().map(|t| t.name.clone()).collect(),
            Source::Gguf(g) => g.hf_names(),
        }
    }

    fn get(&self, name: &str) -> Result<Option<TensorView>, FormatError> {
        match self.source {
            Source::Safetensors(i) => Ok(i.get(name).map(TensorView::of_safetensors)),
            Source::Gguf(g) => g.tensor(name),
        }
    }

    fn require(&self, name: &str) -> Result<TensorView, FormatError> {
        match self.source {
            Source::Safetensors(i) => i.require(name).map(TensorView::of_safetensors),
            Source::Gguf(g) => g.tensor(name)?.ok_or_else(|| g.missing(name)),
        }
    }

    /// A 1-D float tensor of `len` elements, converted to f32 (norm weights: small).
    pub fn vector(&self, name: &str, len: usize) -> Result<Vec<f32>, FormatError> {
        Ok(self.floats(name, &[&[len]])?.0)
    }

    /// A float tensor stored in one of `shapes` (equal in element count, e.g. a convolution
    /// kernel `[C, 1, K]` or `[C, K, 1]`) as f32, with the index of the shape it has.
    pub fn floats<S: AsRef<[usize]>>(
        &self,
        name: &str,
        shapes: &[S],
    ) -> Result<(Vec<f32>, usize), FormatError> {
        let t = self.require(name)?;
        let kind = t.float_kind()?;
        let Some(which) = shapes.iter().position(|s| t.shape.as_slice() == s.as_ref()) else {
            return Err(shape_error(
                &t,
                shapes.first().map(|s| s.as_ref()).unwrap_or(&[]),
            ));
        };
        let len: usize = shapes[which].as_ref().iter().product();
        let mut out = vec![0f32; len];
        let m = Matrix {
            rows: 1,
            cols: len,
            weights: Weights::Float {
                kind,
                data: t.bytes.as_slice(),
            },
        };
        m.validate().map_err(|e| t.error(e.0))?;
        moestream_kernels::dequantize_row(&m, 0, &mut out);
        Ok((out, which))
    }

    /// The linear layer `{prefix}.weight` (float) or `{prefix}.{weight,scales,biases}` (MLX).
    pub fn linear(&self, prefix: &str, rows: usize, cols: usize) -> Result<Linear, FormatError> {
        let mut v = self.stacked(&format!("{prefix}.weight"), prefix, 1, rows, cols, false)?;
        Ok(v.remove(0))
    }

    /// `experts` matrices of `[rows, cols]` stacked in one tensor `[experts, rows, cols]` (MLX
    /// `switch_mlp`, or transformers-5 fused tensors named without `.weight`).
    pub fn stacked_linear(
        &self,
        weight_name: &str,
        prefix: &str,
        experts: usize,
        rows: usize,
        cols: usize,
    ) -> Result<Vec<Linear>, FormatError> {
        self.stacked(weight_name, prefix, experts, rows, cols, true)
    }

    /// transformers-5 fused `gate_up_proj [E, 2I, H]`: returns (gate, up) per expert.
    pub fn fused_gate_up(
        &self,
        name: &str,
        experts: usize,
        inter: usize,
        hidden: usize,
    ) -> Result<Vec<(Linear, Linear)>, FormatError> {
        let stacked = self.stacked(name, name, experts, 2 * inter, hidden, true)?;
        Ok(stacked
            .into_iter()
            .map(|m| (m.rows_slice(0, inter), m.rows_slice(inter, inter)))
            .collect())
    }

    fn stacked(
        &self,
        weight_name: &str,
        prefix: &str,
        experts: usize,
        rows: usize,
        cols: usize,
        has_expert_axis: bool,
    ) -> Result<Vec<Linear>, FormatError> {
        let w = self.require(weight_name)?;
        let lead: Vec<usize> = if has_expert_axis {
            vec![experts]
        } else {
            vec![]
        };
        let scales_name = format!("{prefix}.scales");
        if let Some(s) = self.get(&scales_name)? {
            // MLX quantized: bits and group size follow from the shapes, checked for consistency.
            let b = self.require(&format!("{prefix}.biases"))?;
            if w.kind != ElementKind::U32 {
                return Err(w.error(format!("quantized weight must be U32, found {}", w.kind)));
            }
            let scale_kind = s.float_kind()?;
            if b.kind != s.kind {
                return Err(b.error(format!(
                    "biases dtype {} differs from scales dtype {}",
                    b.kind, s.kind
                )));
            }
            let (Some(&packed_cols), Some(&groups)) = (w.shape.last(), s.shape.last()) else {
                return Err(w.error("quantized weight has no dimensions"));
            };
            if packed_cols == 0
                || groups == 0
                || (packed_cols * 32) % cols != 0
                || !cols.is_multiple_of(groups)
            {
                return Err(w.error(format!(
                    "packed shape {:?} and scales shape {:?} do not fit {cols} input features",
                    w.shape, s.shape
                )));
            }
            let bits = (packed_cols * 32 / cols) as u32;
            let group_size = cols / groups;
            if !matches!(bits, 2 | 3 | 4 | 5 | 6 | 8) {
                return Err(w.error(format!(
                    "unsupported quantization: {bits} bits (supported: 2, 3, 4, 5, 6, 8)"
                )));
            }
            if !matches!(group_size, 32 | 64 | 128) {
                return Err(w.error(format!(
                    "unsupported quantization group size {group_size} (supported: 32, 64, 128)"
                )));
            }
            let mut ws = lead.clone();
            ws.extend([rows, packed_cols]);
            if w.shape != ws {
                return Err(shape_error(&w, &ws));
            }
            let mut ss = lead.clone();
            ss.extend([rows, groups]);
            if s.shape != ss {
                return Err(shape_error(&s, &ss));
            }
            if b.shape != ss {
                return Err(shape_error(&b, &ss));
            }
            let (pw, ps, pb) = (&w.bytes, &s.bytes, &b.bytes);
            let pe = rows * packed_cols * 4;
            let se = rows * groups * scale_kind.size_bytes();
            return Ok((0..experts)
                .map(|e| Linear {
                    rows,
                    cols,
                    storage: Storage::Affine {
                        bits,
                        group_size,
                        packed: pw.slice(e * pe, pe),
                        scales: ps.slice(e * se, se),
                        biases: pb.slice(e * se, se),
                        scale_kind,
                    },
                })
                .collect());
        }
        let mut ws = lead.clone();
        ws.extend([rows, cols]);
        if w.shape != ws {
            return Err(shape_error(&w, &ws));
        }
        let (per, storage): (usize, &dyn Fn(Bytes) -> Storage) = match w.kind {
            ElementKind::Float(kind) => (rows * cols * kind.size_bytes(), &move |data| {
                Storage::Float { kind, data }
            }),
            ElementKind::Block(format) if cols.is_multiple_of(format.block_elements()) => {
                (rows * format.row_bytes(cols), &move |data| Storage::Ggml {
                    format,
                    data,
                })
            }
            ElementKind::Block(format) => {
                return Err(w.error(format!(
                    "{cols} columns are not whole {} blocks",
                    format.name()
                )))
            }
            d => {
                return Err(w.error(format!(
                    "unsupported tensor type {d}; supported: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q8_0, Q4_K, Q5_K, Q6_K (and U32 for MLX packed weights)"
                )))
            }
        };
        if w.bytes.len() != per * experts {
            return Err(w.error(format!(
                "{} bytes, its shape and type need {}",
                w.bytes.len(),
                per * experts
            )));
        }
        Ok((0..experts)
            .map(|e| Linear {
                rows,
                cols,
                storage: storage(w.bytes.slice(e * per, per)),
            })
            .collect())
    }
}
