//! Products of many tokens (a prompt) with dense, non-expert matrices through cuBLAS.
//!
//! The product kernels of [`crate::matrix`] give each output row a warp and dequantize every
//! weight where it is used: right for a decode step, which reads each weight once and is bound
//! by memory, wrong for a prompt of hundreds of tokens, which is bound by arithmetic, where a
//! tiled GEMM does several times better. cuBLAS cannot read quantized weights, so a matrix is
//! dequantized to f32 in slices of rows into one scratch buffer (f32 weights are read in place),
//! and each slice multiplied by SGEMM in its default math mode: FP32 arithmetic, no TF32, so the
//! products keep f32 accuracy and the GPU's scores stay within the tested tolerance of the CPU's.
//! The dequantization costs a write and a read of 4 bytes per weight per pass, small beside the
//! `2·n` flops each weight takes part in.
//!
//! Decode steps (and prompts shorter than [`min_tokens`]) keep the fused kernels; the routed
//! experts of a prompt use the grouped spans kernels, each expert seeing only its few tokens.
//! cuBLAS is opened at the first product that wants it; without the library (or with
//! `MOESTREAM_CUDA_CUBLAS=0`) everything stays on the fused kernels.
use crate::device::{Context, DeviceBuffer, GpuError};
use cudarc::cublas::{result, sys, CudaBlas};
use cudarc::driver::CudaStream;
use std::sync::Arc;

/// Floats of the dequantization scratch (64 MiB): a 151,936 x 2,048 output head goes in 19 slices.
const SCRATCH_FLOATS: usize = 16 << 20;

/// Fewest tokens a product goes to cuBLAS for (`MOESTREAM_CUDA_GEMM_MIN`, default 16).
pub fn min_tokens() -> usize {
    std::env::var("MOESTREAM_CUDA_GEMM_MIN")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(16)
        .max(2)
}

/// A cuBLAS handle on the GPU's stream and the scratch for dequantized rows.
pub(crate) struct Gemm {
    blas: CudaBlas,
    scratch: DeviceBuffer,
}

impl Gemm {
    /// `None` (with the reason logged) when cuBLAS cannot be used here.
    pub(crate) fn open(stream: &Arc<CudaStream>) -> Option<Gemm> {
        if std::env::var_os("MOESTREAM_CUDA_CUBLAS").is_some_and(|v| v == "0") {
            return None;
        }
        // SAFETY: only tries to open the library; cudarc would panic on its absence later.
        if !unsafe { sys::is_culib_present() } {
            tracing::info!("cuBLAS not found: prompts use the fused product kernels");
            return None;
        }
        let opened = CudaBlas::new(stream.clone())
            .doing("creating a cuBLAS handle")
            .and_then(|blas| Ok((blas, DeviceBuffer::new(4 * SCRATCH_FLOATS)?)));
        match opened {
            Ok((blas, scratch)) => Some(Gemm { blas, scratch }),
            Err(e) => {
                tracing::warn!("{e}: prompts use the fused product kernels");
                None
            }
        }
    }

    /// Floats of scratch for one slice of dequantized rows.
    pub(crate) fn scratch_floats(&self) -> usize {
        SCRATCH_FLOATS
    }

    /// Device address of the scratch.
    pub(crate) fn scratch(&self) -> u64 {
        self.scratch.ptr
    }

    /// `y[t][r] (+)= Σ_k w[r][k] · x[t][k]` for `m` rows of `w` (row-major f32, `cols` wide),
    /// `n` tokens of `x` (row-major, `cols` wide) and `y` rows `ldy` wide (device addresses).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn rows_times(
        &self,
        w: u64,
        m: usize,
        cols: usize,
        x: u64,
        n: usize,
        y: u64,
        ldy: usize,
        accumulate: bool,
    ) -> Result<(), GpuError> {
        let int = |v: usize| {
            i32::try_from(v).map_err(|_| GpuError(format!("{v} is too large for cuBLAS")))
        };
        let (alpha, beta) = (1f32, if accumulate { 1f32 } else { 0f32 });
        // Column-major, as cuBLAS sees it: y (m x n, ld ldy) = wᵀ(m x cols) · x (cols x n).
        // SAFETY: the callers pass device ranges of the sizes named by m, n, cols and ldy.
        unsafe {
            result::sgemm(
                *self.blas.handle(),
                sys::cublasOperation_t::CUBLAS_OP_T,
                sys::cublasOperation_t::CUBLAS_OP_N,
                int(m)?,
                int(n)?,
                int(cols)?,
                &alpha,
                w as *const f32,
                int(cols)?,
                x as *const f32,
                int(cols)?,
                &beta,
                y as *mut f32,
                int(ldy)?,
            )
        }
        .doing("cuBLAS SGEMM")
    }
}
