//! The CUDA backend of moestream: the whole model on an NVIDIA GPU, with the routed experts in a
//! VRAM cache filled from host memory or SSD.
//!
//! Built on `cudarc` with dynamic loading: the crate compiles on machines with no CUDA at all,
//! and at run time [`devices`] says whether libcuda and a GPU are there (the CLI falls back to
//! the CPU when not). Kernels are CUDA C compiled by NVRTC for the GPU present, their PTX cached
//! on disk ([`device`]). Weights stay in their checkpoint's formats (floats, MLX group-affine
//! codes, llama.cpp blocks) and are dequantized inside the products ([`matrix`]), as on the CPU.
//!
//! Prompts multiply their dense matrices through cuBLAS ([`gemm`]).
//!
//! [`CudaModel`] implements the engine's `Accelerator`: `model.set_accelerator(...)` and every
//! forward pass (generation, scoring, serving) runs on the GPU.
#![deny(missing_docs)]

/// A kernel's argument array from local variables (each passed by address, as the driver wants).
macro_rules! args {
    ($($a:ident),* $(,)?) => {
        &mut [$(&mut $a as *mut _ as *mut ::std::ffi::c_void),*]
    };
}

pub mod device;
pub mod experts;
pub mod gemm;
pub mod matrix;
pub mod model;
pub mod ops;

pub use device::{devices, DeviceBuffer, Gpu, GpuError, PinnedBuffer};
pub use experts::Eviction;
pub use model::{CudaModel, ExpertBudget};

/// Moves `model`'s forward passes to GPU `ordinal`, with the routed experts in a VRAM cache of
/// `budget` evicting by `eviction`. Returns a line describing the placement.
pub fn accelerate(
    model: &mut moestream_engine::models::Model,
    ordinal: usize,
    budget: ExpertBudget,
    eviction: Eviction,
) -> Result<String, GpuError> {
    let gpu = Gpu::open(ordinal)?;
    let name = gpu.describe();
    let cuda = CudaModel::new(gpu, model, budget, eviction)?;
    let experts = match cuda.expert_slots() {
        Some(slots) => {
            let total: usize = (0..model.layers.len())
                .map(|l| model.experts.experts_in(l))
                .sum();
            format!(", experts: {slots} of {total} in VRAM")
        }
        None => String::new(),
    };
    let line = format!(
        "{name}: {:.2} GiB of weights in VRAM{experts}",
        cuda.weight_bytes as f64 / (1u64 << 30) as f64
    );
    model.set_accelerator(Box::new(cuda));
    Ok(line)
}
