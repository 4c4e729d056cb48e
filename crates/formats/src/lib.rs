//! Read-only views of model checkpoints.
//!
//! A checkpoint folder holds `config.json` and weights in one or several `*.safetensors` files
//! (Hugging Face float checkpoints, or MLX-quantized ones whose packed weights are `uint32` with
//! `.scales`/`.biases` beside them). [`SafetensorsIndex`] memory-maps every file, parses and
//! validates every header up front, and answers "where are the bytes of tensor X" with a
//! [`TensorLocation`]: a file and a byte range. Nothing here reads tensor data into a `Vec`; callers
//! borrow the mapped bytes, or later read the ranges themselves (the expert store does, to stream
//! experts from disk).
//!
//! [`QuantizationConfig`] parses the `quantization` entry mlx-lm writes into `config.json`.
//!
//! [`gguf::GgufIndex`] does the same for llama.cpp's GGUF files (single or split), with their
//! metadata.
//!
//! Every error names the file and, where there is one, the tensor.
#![deny(missing_docs)]

mod error;
#[doc(hidden)]
pub mod fuzzing;
pub mod gguf;
mod mlx;
mod safetensors_index;

pub use error::FormatError;
pub use mlx::{QuantParams, QuantizationConfig};
pub use safetensors_index::{
    weight_files_bytes, DType, MappedFile, SafetensorsIndex, TensorLocation,
};
