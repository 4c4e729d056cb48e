//! The seam between the model and a device that runs it instead of the CPU kernels (the CUDA
//! backend in `moestream-cuda`). The engine stays device-agnostic: a [`Model`] with an
//! [`Accelerator`] hands every forward pass to it, and a [`SequenceCache`] carries the device's
//! per-sequence state (its KV cache in device memory) as an opaque [`DeviceState`]. Everything
//! above the forward pass (generation, sampling, scoring, the server) is unchanged.
use crate::cache::SequenceCache;
use crate::models::{Logits, Model};
use crate::store::StoreError;
use moestream_kernels::features::ProductMode;
use std::any::Any;

/// A device that runs a model's forward passes.
pub trait Accelerator: Send + Sync {
    /// What it is, for messages (`cuda:0 NVIDIA H200`).
    fn describe(&self) -> String;

    /// [`Model::forward_in`] on the device: runs `tokens` after what `cache` holds and returns
    /// logits `[rows, V]` for the positions `want` asks for. An error leaves `cache` as it was.
    fn forward(
        &self,
        model: &Model,
        mode: ProductMode,
        tokens: &[u32],
        cache: &mut SequenceCache,
        want: Logits,
    ) -> Result<Vec<f32>, StoreError>;

    /// Counters to print after a run (`name value` pairs, already formatted).
    fn stats(&self) -> Vec<(String, String)> {
        Vec::new()
    }
}

/// A sequence's state on a device (its KV cache), owned by the [`SequenceCache`].
pub trait DeviceState: Send + std::fmt::Debug {
    /// A copy (for caches that fork).
    fn clone_box(&self) -> Box<dyn DeviceState>;
    /// For the accelerator to find its own type again.
    fn as_any_mut(&mut self) -> &mut dyn Any;
}

impl Clone for Box<dyn DeviceState> {
    fn clone(&self) -> Self {
        self.clone_box()
    }
}
