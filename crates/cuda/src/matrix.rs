//! Weight matrices in device memory, in their checkpoint's bytes, and the products with them.
//!
//! A matrix's parts (floats or packed codes, and for MLX weights scales and biases) are laid out
//! one after the other at 256-byte boundaries, so that a whole expert (gate, up and down) is one
//! contiguous slot of the expert cache, copied with one transfer. The same [`MatrixLayout`]
//! describes a matrix in its own buffer and in every expert slot of a layer.
use crate::device::{DeviceBuffer, Gpu, GpuError};
use crate::gemm::Gemm;
use crate::ops::Q8View;
use moestream_kernels::ggml::BlockFormat;
use moestream_kernels::{FloatKind, Matrix, Weights};

/// Kernel arguments of a product (kernels.cu `MatArgs`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct MatArgs {
    data: u64,
    scales: u64,
    biases: u64,
    scale_kind: u32,
    group_size: u32,
    rows: u32,
    cols: u32,
    n: u32,
    accumulate: u32,
    x_group_stride: u64,
    y_group_stride: u64,
}

const ALIGN: usize = 256;
/// Output rows per thread block of the product kernels (kernels.cu `ROWS_PER_BLOCK`).
const ROWS_PER_BLOCK: usize = 4;
/// f32 matrices of fewer rows (routers) take a block per row in one-token products.
const SPLIT_F32_ROWS: usize = 1024;
/// Matrices in one `matvec_q8_multi` launch (kernels.cu `MULTI_MAX`).
const MULTI_MAX: usize = 4;

/// Kernel arguments of `matvec_q8_multi` (kernels.cu `MultiArgs`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct MultiArgs {
    a: [MatArgs; MULTI_MAX],
    y: [u64; MULTI_MAX],
    kind: [u32; MULTI_MAX],
    first_block: [u32; MULTI_MAX + 1],
    count: u32,
}

/// The kernels of one weight format (kernels.cu `MATVEC`).
#[derive(Clone, Copy, Debug)]
struct Kernel {
    /// Tokens in tiles of 8.
    tiled: &'static str,
    /// One token.
    one: &'static str,
    /// A prompt's experts, each over its own rows.
    spans: &'static str,
    /// Rows dequantized to f32 (for cuBLAS).
    dequant: &'static str,
    /// One token with its activations in int8 ([`Q8View`]), for the formats that have it.
    int8: Option<&'static str>,
    /// The same over a token's experts, with their weighted sum.
    int8_combine: Option<&'static str>,
}

macro_rules! k {
    ($name:literal) => {
        Kernel {
            tiled: $name,
            one: concat!($name, "_1"),
            spans: concat!($name, "_spans"),
            dequant: concat!($name, "_dequant"),
            int8: None,
            int8_combine: None,
        }
    };
    ($name:literal, int8) => {
        Kernel {
            int8: Some(concat!($name, "_q8")),
            int8_combine: Some(concat!($name, "_q8_combine")),
            ..k!($name)
        }
    };
}

fn align(n: usize) -> usize {
    n.div_ceil(ALIGN) * ALIGN
}

/// Where a matrix's parts lie from a base address, and which kernel multiplies it.
#[derive(Clone, Copy, Debug)]
pub struct MatrixLayout {
    kernel: Kernel,
    args: MatArgs,
    /// Bytes from the base to the end of the last part.
    pub bytes: usize,
    /// Output features.
    pub rows: usize,
    /// Input features.
    pub cols: usize,
    /// Plain f32 rows, which cuBLAS reads as they are.
    plain_f32: bool,
}

fn scale_kind(k: FloatKind) -> u32 {
    match k {
        FloatKind::F32 => 0,
        FloatKind::F16 => 1,
        FloatKind::BF16 => 2,
    }
}

impl MatrixLayout {
    /// The layout of `m` starting at byte `offset` of a base, and its parts in that order.
    pub fn of<'a>(
        m: &Matrix<'a>,
        offset: usize,
    ) -> Result<(MatrixLayout, Vec<&'a [u8]>), GpuError> {
        m.validate().map_err(|e| GpuError(e.to_string()))?;
        if !m.cols.is_multiple_of(32) {
            return Err(GpuError(format!(
                "a {}x{} matrix: the GPU kernels need a multiple of 32 columns",
                m.rows, m.cols
            )));
        }
        let rows = u32::try_from(m.rows).map_err(|_| GpuError("too many rows".into()))?;
        let cols = u32::try_from(m.cols).map_err(|_| GpuError("too many columns".into()))?;
        let mut args = MatArgs {
            rows,
            cols,
            ..Default::default()
        };
        let (kernel, parts): (Kernel, Vec<&[u8]>) = match m.weights {
            Weights::Float { kind, data } => (
                match kind {
                    FloatKind::F32 => k!("matvec_f32"),
                    FloatKind::F16 => k!("matvec_f16"),
                    FloatKind::BF16 => k!("matvec_bf16"),
                },
                vec![data],
            ),
            Weights::Affine {
                bits,
                group_size,
                packed,
                scales,
                biases,
                scale_kind: k,
            } => {
                args.scale_kind = scale_kind(k);
                args.group_size = group_size as u32;
                let kernel = match bits {
                    2 => k!("matvec_affine2"),
                    3 => k!("matvec_affine3"),
                    4 => k!("matvec_affine4"),
                    5 => k!("matvec_affine5"),
                    6 => k!("matvec_affine6"),
                    8 => k!("matvec_affine8"),
                    b => return Err(GpuError(format!("no GPU kernel for {b}-bit weights"))),
                };
                (kernel, vec![packed, scales, biases])
            }
            Weights::Ggml { format, data } => (
                match format {
                    BlockFormat::Q4_0 => k!("matvec_q4_0"),
                    BlockFormat::Q4_1 => k!("matvec_q4_1"),
                    BlockFormat::Q5_0 => k!("matvec_q5_0"),
                    BlockFormat::Q8_0 => k!("matvec_q8_0"),
                    BlockFormat::Q4_K => k!("matvec_q4_k", int8),
                    BlockFormat::Q5_K => k!("matvec_q5_k"),
                    BlockFormat::Q6_K => k!("matvec_q6_k", int8),
                },
                vec![data],
            ),
        };
        let mut at = offset;
        let mut offsets = [0u64; 3];
        for (o, p) in offsets.iter_mut().zip(&parts) {
            *o = at as u64;
            at = align(at + p.len());
        }
        args.data = offsets[0];
        args.scales = offsets[1];
        args.biases = offsets[2];
        Ok((
            MatrixLayout {
                kernel,
                args,
                bytes: at,
                rows: m.rows,
                cols: m.cols,
                plain_f32: matches!(
                    m.weights,
                    Weights::Float {
                        kind: FloatKind::F32,
                        ..
                    }
                ),
            },
            parts,
        ))
    }

    /// Copies `parts` (as [`MatrixLayout::of`] returned them) into `dst` at their offsets from
    /// byte `base` of it, through `fill(offset, bytes)`.
    pub fn place(&self, parts: &[&[u8]], mut fill: impl FnMut(usize, &[u8])) {
        let offsets = [self.args.data, self.args.scales, self.args.biases];
        for (o, p) in offsets.iter().zip(parts) {
            fill(*o as usize, p);
        }
    }

    /// Byte offset of the first part from the base.
    pub fn offset(&self) -> u64 {
        self.args.data
    }

    /// Whether `other` is multiplied by the same kernel with the same quantization parameters
    /// and shape (so both can share one grouped launch).
    pub fn same_kind(&self, other: &MatrixLayout) -> bool {
        self.kernel.tiled == other.kernel.tiled
            && self.rows == other.rows
            && self.cols == other.cols
            && self.args.scale_kind == other.args.scale_kind
            && self.args.group_size == other.args.group_size
            && self.args.scales.wrapping_sub(self.args.data)
                == other.args.scales.wrapping_sub(other.args.data)
            && self.args.biases.wrapping_sub(self.args.data)
                == other.args.biases.wrapping_sub(other.args.data)
    }

    /// Whether one-token products can take their activations in int8 ([`Q8View`]).
    pub fn has_int8(&self) -> bool {
        self.kernel.int8.is_some()
    }

    /// `y[t] (+)= W x[t]` for `n` rows of `x` (device addresses), this layout's offsets taken as
    /// absolute addresses after adding `base`; `accumulate` adds to `y` instead of writing it.
    /// `xq`, the one token of `x` in int8, is used where the format has an int8 kernel.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn launch(
        &self,
        gpu: &Gpu,
        base: u64,
        x: u64,
        xq: Option<Q8View>,
        n: usize,
        y: u64,
        accumulate: bool,
    ) -> Result<(), GpuError> {
        let mut a = self.args;
        a.data += base;
        a.scales += base;
        a.biases += base;
        a.n = n as u32;
        a.accumulate = accumulate as u32;
        self.launch_with(gpu, 0, 1, a, x, xq, y)
    }

    /// The grouped product over the `groups` slots whose base addresses are the u64 array at
    /// device address `bases`: group g reads `n` inputs at `x + g·x_stride` floats and writes
    /// `y + g·y_stride` floats. `xq`: as for [`MatrixLayout::launch`], group g's at
    /// `g·x_stride` activations on.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn launch_grouped(
        &self,
        gpu: &Gpu,
        bases: u64,
        groups: usize,
        x: u64,
        xq: Option<Q8View>,
        x_stride: usize,
        n: usize,
        y: u64,
        y_stride: usize,
    ) -> Result<(), GpuError> {
        let mut a = self.args;
        a.n = n as u32;
        a.x_group_stride = x_stride as u64;
        a.y_group_stride = y_stride as u64;
        self.launch_with(gpu, bases, groups, a, x, xq, y)
    }

    /// `y (+)= Σ_g weights[g] · W_g x_g` over one token's `groups` experts (slots at the u64
    /// array `bases`; f32 `weights` at a device address) in one launch, each `x_g` the int8
    /// activations `g·x_stride` on in `xq`. `Ok(false)`, doing nothing, for a format without an
    /// int8 kernel.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn launch_combined(
        &self,
        gpu: &Gpu,
        bases: u64,
        groups: usize,
        xq: Q8View,
        x_stride: usize,
        weights: u64,
        y: u64,
        accumulate: bool,
    ) -> Result<bool, GpuError> {
        let Some(kernel) = self.kernel.int8_combine else {
            return Ok(false);
        };
        if groups == 0 || groups > 32 {
            return Ok(false); // a warp per expert, at most 32 in a block
        }
        let mut a = self.args;
        a.n = 1;
        a.accumulate = accumulate as u32;
        a.x_group_stride = x_stride as u64;
        let (mut bases, mut xq, mut weights, mut groups, mut y) =
            (bases, xq, weights, groups as u32, y);
        gpu.launch(
            kernel,
            (self.rows as u32, 1, 1),
            32 * groups,
            args!(bases, a, xq, weights, groups, y),
        )?;
        Ok(true)
    }

    /// The grouped product of a prompt's experts: group g (the slot at the g-th u64 of device
    /// address `bases`) multiplies the rows `spans[g] .. spans[g+1]` of `x` into the same rows
    /// of `y` (`spans`: `groups + 1` u32 at a device address).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn launch_spans(
        &self,
        gpu: &Gpu,
        bases: u64,
        spans: u64,
        groups: usize,
        x: u64,
        y: u64,
    ) -> Result<(), GpuError> {
        if groups == 0 {
            return Ok(());
        }
        let mut a = self.args;
        a.n = 1;
        let (mut bases, mut spans, mut x, mut y) = (bases, spans, x, y);
        let blocks = self.rows.div_ceil(ROWS_PER_BLOCK) as u32;
        gpu.launch(
            self.kernel.spans,
            (blocks, groups as u32, 1),
            (ROWS_PER_BLOCK * 32) as u32,
            args!(bases, spans, a, x, y),
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn launch_with(
        &self,
        gpu: &Gpu,
        bases: u64,
        groups: usize,
        mut a: MatArgs,
        mut x: u64,
        xq: Option<Q8View>,
        mut y: u64,
    ) -> Result<(), GpuError> {
        if a.n == 0 || groups == 0 {
            return Ok(());
        }
        let mut bases = bases;
        let blocks = self.rows.div_ceil(ROWS_PER_BLOCK) as u32;
        if a.n == 1 && self.plain_f32 && self.rows < SPLIT_F32_ROWS {
            // A block per row (a router's few rows).
            return gpu.launch(
                "matvec_f32_1_split",
                (self.rows as u32, groups as u32, 1),
                (ROWS_PER_BLOCK * 32) as u32,
                args!(bases, a, x, y),
            );
        }
        if let (1, Some(kernel), Some(mut xq)) = (a.n, self.kernel.int8, xq) {
            return gpu.launch(
                kernel,
                (blocks, groups as u32, 1),
                (ROWS_PER_BLOCK * 32) as u32,
                args!(bases, a, xq, y),
            );
        }
        gpu.launch(
            if a.n == 1 {
                self.kernel.one
            } else {
                self.kernel.tiled
            },
            (blocks, groups as u32, 1),
            (ROWS_PER_BLOCK * 32) as u32,
            args!(bases, a, x, y),
        )
    }
}

/// A matrix in its own device buffer.
pub struct GpuMatrix {
    buf: DeviceBuffer,
    /// Its layout from the buffer's start.
    pub layout: MatrixLayout,
}

impl GpuMatrix {
    /// Uploads `m`.
    pub fn upload(gpu: &Gpu, m: &Matrix) -> Result<GpuMatrix, GpuError> {
        let (layout, parts) = MatrixLayout::of(m, 0)?;
        let mut staging = vec![0u8; layout.bytes];
        layout.place(&parts, |o, p| staging[o..o + p.len()].copy_from_slice(p));
        let buf = gpu.upload(&staging)?;
        Ok(GpuMatrix { buf, layout })
    }

    /// `y = W x` for `n` rows (device addresses).
    pub fn forward(&self, gpu: &Gpu, x: u64, n: usize, y: u64) -> Result<(), GpuError> {
        self.product(gpu, x, None, n, y, false)
    }

    /// `y += W x` for `n` rows (a residual connection).
    pub fn forward_add(&self, gpu: &Gpu, x: u64, n: usize, y: u64) -> Result<(), GpuError> {
        self.product(gpu, x, None, n, y, true)
    }

    /// `y (+)= W x` where `xq`, if given, is the one token of `x` rounded to int8: formats with
    /// an int8 kernel multiply that instead (a decode step at `ActivationPrecision::Int8`).
    pub fn product(
        &self,
        gpu: &Gpu,
        x: u64,
        xq: Option<Q8View>,
        n: usize,
        y: u64,
        accumulate: bool,
    ) -> Result<(), GpuError> {
        match gpu.gemm(n) {
            Some(gemm) => self.product_gemm(gpu, gemm, x, n, y, accumulate),
            None => self
                .layout
                .launch(gpu, self.buf.ptr, x, xq, n, y, accumulate),
        }
    }

    /// The product by cuBLAS: slices of rows dequantized to f32 into the scratch (f32 weights
    /// are read in place), each multiplied into its columns of `y`.
    fn product_gemm(
        &self,
        gpu: &Gpu,
        gemm: &Gemm,
        x: u64,
        n: usize,
        y: u64,
        accumulate: bool,
    ) -> Result<(), GpuError> {
        let (rows, cols) = (self.layout.rows, self.layout.cols);
        let slice = (gemm.scratch_floats() / cols).clamp(1, rows);
        let mut args = self.layout.args;
        args.data += self.buf.ptr;
        args.scales += self.buf.ptr;
        args.biases += self.buf.ptr;
        for row0 in (0..rows).step_by(slice) {
            let m = slice.min(rows - row0);
            let w = if self.layout.plain_f32 {
                args.data + (4 * row0 * cols) as u64
            } else {
                let (mut a, mut r0, mut r, mut out) = (args, row0 as u32, m as u32, gemm.scratch());
                gpu.launch_elements(
                    self.layout.kernel.dequant,
                    m * (cols / 32),
                    args!(a, r0, r, out),
                )?;
                gemm.scratch()
            };
            gemm.rows_times(w, m, cols, x, n, y + (4 * row0) as u64, rows, accumulate)?;
        }
        Ok(())
    }

    /// `y_i = W_i x` for matrices multiplying the same input (`list`: matrix and output). For a
    /// decode step with `xq` (x in int8) and two to four Q4_K/Q6_K matrices, one launch does all
    /// (each row with the bits of its own product); otherwise one product each.
    pub fn products(
        gpu: &Gpu,
        list: &[(&GpuMatrix, u64)],
        x: u64,
        xq: Option<Q8View>,
        n: usize,
    ) -> Result<(), GpuError> {
        let kind = |m: &GpuMatrix| match m.layout.kernel.tiled {
            "matvec_q4_k" => Some(0u32),
            "matvec_q6_k" => Some(1u32),
            _ => None,
        };
        let multi = n == 1
            && (2..=MULTI_MAX).contains(&list.len())
            && list.iter().all(|(m, _)| kind(m).is_some());
        match xq {
            Some(mut xq) if multi => {
                let mut m = MultiArgs {
                    count: list.len() as u32,
                    ..Default::default()
                };
                let mut blocks = 0u32;
                for (i, (w, y)) in list.iter().enumerate() {
                    let mut a = w.layout.args;
                    a.data += w.buf.ptr;
                    a.n = 1;
                    m.a[i] = a;
                    m.y[i] = *y;
                    m.kind[i] = kind(w).unwrap_or(0);
                    m.first_block[i] = blocks;
                    blocks += w.layout.rows.div_ceil(ROWS_PER_BLOCK) as u32;
                }
                m.first_block[list.len()] = blocks;
                gpu.launch(
                    "matvec_q8_multi",
                    (blocks, 1, 1),
                    (ROWS_PER_BLOCK * 32) as u32,
                    args!(m, xq),
                )
            }
            _ => {
                for (w, y) in list {
                    w.product(gpu, x, xq, n, *y, false)?;
                }
                Ok(())
            }
        }
    }

    /// Output features.
    pub fn rows(&self) -> usize {
        self.layout.rows
    }

    /// Bytes of device memory.
    pub fn size_bytes(&self) -> usize {
        self.buf.bytes
    }
}
