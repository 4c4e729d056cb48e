//! CPU numeric kernels for moestream.
//!
//! The hot path of MoE decoding is a product of a weight matrix, whose bytes live in a memory map or
//! in a streamed expert buffer, with a few activation rows. [`matmul()`] computes it for every weight
//! format the engine loads, with dequantization fused into the product: a quantized expert is never
//! materialised as floats. SIMD paths (AVX2+FMA, AVX-512) are chosen once at run time
//! ([`features::simd_level`]); every one has a scalar twin ([`matmul_scalar`]) it is tested against.
//!
//! Decode products (one token) of quantized weights round the activations to int16 by default,
//! which makes them about 1.4 times faster on AVX2 at a relative error of ~1e-5; llama.cpp block
//! formats round them to int8 instead, in decode and prefill (~3-4 times the f32 path per decode
//! product, relative error ~5e-4) ([`features::ActivationPrecision`]);
//! `MOESTREAM_EXACT_MATMUL=1` keeps f32 activations everywhere.
//!
//! Weight bytes are taken as `&[u8]` in little-endian order with no alignment promise: memory-mapped
//! safetensors place tensors at arbitrary offsets, so all loads are unaligned.
//!
//! [`ops`] holds the small element-wise and attention kernels.
//!
//! ```
//! use moestream_kernels::{matmul, FloatKind, Matrix, Weights};
//!
//! // One row of 32 MLX 4-bit codes, element i = i % 16 (byte j holds elements 2j and 2j + 1,
//! // low nibble first), one group with scale 0.5 and bias -1.
//! let packed: Vec<u8> = (0..16u8).map(|j| (2 * j % 16) | ((2 * j + 1) % 16) << 4).collect();
//! let (scales, biases) = (0.5f32.to_le_bytes(), (-1.0f32).to_le_bytes());
//! let weights = Weights::Affine {
//!     bits: 4,
//!     group_size: 32,
//!     packed: &packed,
//!     scales: &scales,
//!     biases: &biases,
//!     scale_kind: FloatKind::F32,
//! };
//! let m = Matrix { rows: 1, cols: 32, weights };
//! m.validate()?;
//! let x = [1.0f32; 32];
//! let mut y = [0.0f32; 1];
//! matmul(&m, &x, 1, &mut y);
//! assert_eq!(y[0], 0.5 * 240.0 - 32.0); // Σ (0.5·q_i − 1) with Σ q_i = 2·(0 + … + 15)
//! # Ok::<(), moestream_kernels::LayoutError>(())
//! ```
#![deny(missing_docs)]

pub mod deltanet;
pub mod features;
pub mod ggml;
pub mod ops;

mod matmul;
pub use matmul::{
    dequantize_row, matmul, matmul_at, matmul_in_mode, matmul_scalar, matmul_with,
    matmul_with_precision,
};

/// Element type of a float tensor stored in a checkpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FloatKind {
    /// IEEE binary32.
    F32,
    /// IEEE binary16.
    F16,
    /// bfloat16.
    BF16,
}

impl FloatKind {
    /// Bytes per element.
    pub fn size_bytes(self) -> usize {
        match self {
            FloatKind::F32 => 4,
            FloatKind::F16 | FloatKind::BF16 => 2,
        }
    }
}

/// Where the numbers of a `[rows, cols]` row-major weight matrix come from.
#[derive(Clone, Copy, Debug)]
pub enum Weights<'a> {
    /// Plain floats, `rows * cols` elements.
    Float {
        /// Element type.
        kind: FloatKind,
        /// `rows * cols * kind.size_bytes()` bytes.
        data: &'a [u8],
    },
    /// MLX group-affine quantization: `w[o, i] = scale[o, i / gs] * q[o, i] + bias[o, i / gs]`.
    /// Each row of `packed` is a little-endian bitstream of `cols` unsigned `bits`-bit codes in
    /// `cols * bits / 32` u32 words (element i at stream bits `[i*bits, (i+1)*bits)`, stream bit n is
    /// bit `n % 32` of word `n / 32`).
    Affine {
        /// Bits per code: 2, 3, 4, 5, 6 or 8.
        bits: u32,
        /// Elements per group: 32, 64 or 128 (any divisor of `cols` that is a multiple of 32 works).
        group_size: usize,
        /// `rows * cols * bits / 8` bytes of packed codes.
        packed: &'a [u8],
        /// `rows * cols / group_size` scales of type `scale_kind`.
        scales: &'a [u8],
        /// `rows * cols / group_size` biases of type `scale_kind`.
        biases: &'a [u8],
        /// Element type of scales and biases.
        scale_kind: FloatKind,
    },
    /// llama.cpp block quantization ([`ggml`]): each row is `cols / block_elements` blocks of
    /// `format`, rows end to end.
    Ggml {
        /// The block format.
        format: ggml::BlockFormat,
        /// `rows * format.row_bytes(cols)` bytes.
        data: &'a [u8],
    },
}

/// A row-major `[rows, cols]` weight matrix (PyTorch `nn.Linear` layout `[out, in]`).
#[derive(Clone, Copy, Debug)]
pub struct Matrix<'a> {
    /// Output features.
    pub rows: usize,
    /// Input features.
    pub cols: usize,
    /// The numbers.
    pub weights: Weights<'a>,
}

/// A [`Matrix`] whose byte lengths disagree with its shape or format.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayoutError(pub String);

impl std::fmt::Display for LayoutError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}
impl std::error::Error for LayoutError {}

impl<'a> Matrix<'a> {
    /// Checks that every byte slice has exactly the length the shape and format require and that
    /// the quantization parameters are supported. Kernels assume a validated matrix.
    pub fn validate(&self) -> Result<(), LayoutError> {
        // Checked: the SIMD kernels trust these lengths, so a shape whose byte count overflows
        // must not wrap around to a small, matching length.
        let too_large = || LayoutError(format!("{}x{} matrix is too large", self.rows, self.cols));
        let n = self.rows.checked_mul(self.cols).ok_or_else(too_large)?;
        n.checked_mul(8).ok_or_else(too_large)?;
        match self.weights {
            Weights::Float { kind, data } => {
                if data.len() != n * kind.size_bytes() {
                    return Err(LayoutError(format!(
                        "{}x{} {:?} matrix needs {} bytes, has {}",
                        self.rows,
                        self.cols,
                        kind,
                        n * kind.size_bytes(),
                        data.len()
                    )));
                }
            }
            Weights::Affine {
                bits,
                group_size,
                packed,
                scales,
                biases,
                scale_kind,
            } => {
                if !matches!(bits, 2 | 3 | 4 | 5 | 6 | 8) {
                    return Err(LayoutError(format!(
                        "unsupported quantization bits {bits} (supported: 2, 3, 4, 5, 6, 8)"
                    )));
                }
                if group_size == 0
                    || !group_size.is_multiple_of(32)
                    || !self.cols.is_multiple_of(group_size)
                {
                    return Err(LayoutError(format!(
                        "group size {group_size} does not divide {} columns in multiples of 32",
                        self.cols
                    )));
                }
                let packed_len = n * bits as usize / 8;
                let groups = n / group_size * scale_kind.size_bytes();
                if packed.len() != packed_len || scales.len() != groups || biases.len() != groups {
                    return Err(LayoutError(format!(
                        "{}x{} {bits}-bit gs{group_size} matrix needs {packed_len} packed bytes and {groups} bytes of scales and of biases, has {}, {}, {}",
                        self.rows, self.cols, packed.len(), scales.len(), biases.len()
                    )));
                }
            }
            Weights::Ggml { format, data } => {
                if !self.cols.is_multiple_of(format.block_elements()) {
                    return Err(LayoutError(format!(
                        "{} columns are not whole {} blocks of {}",
                        self.cols,
                        format.name(),
                        format.block_elements()
                    )));
                }
                let need = self.rows * format.row_bytes(self.cols);
                if data.len() != need {
                    return Err(LayoutError(format!(
                        "{}x{} {} matrix needs {need} bytes, has {}",
                        self.rows,
                        self.cols,
                        format.name(),
                        data.len()
                    )));
                }
            }
        }
        Ok(())
    }

    /// Bytes of weight data this matrix reads per full product.
    pub fn size_bytes(&self) -> usize {
        match self.weights {
            Weights::Float { data, .. } | Weights::Ggml { data, .. } => data.len(),
            Weights::Affine {
                packed,
                scales,
                biases,
                ..
            } => packed.len() + scales.len() + biases.len(),
        }
    }
}
