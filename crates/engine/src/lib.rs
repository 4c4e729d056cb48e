//! The moestream engine: model code, per-sequence state, generation, tokenizer and chat templates.
//!
//! [`models::Model::load`] reads a checkpoint folder (config.json + safetensors, Hugging Face float
//! or MLX-quantized) into a model whose weights stay in the memory map, or whose experts stream
//! from disk through the [`store`] when the model does not fit in memory;
//! [`models::Model::forward`] runs tokens through it with a [`cache::SequenceCache`]. [`generate`]
//! turns logits into text.
//!
//! ```no_run
//! use moestream_engine::models::{Logits, Model};
//! let model = Model::load(std::path::Path::new("my-model")).unwrap();
//! let mut cache = model.new_cache(64);
//! let logits = model.forward(&[1, 2, 3], &mut cache, Logits::Last).unwrap();
//! ```
#![deny(missing_docs)]

pub mod accelerator;
pub mod cache;
pub mod config;
pub mod generate;
pub mod gguf;
pub mod models;
pub mod speculative;
pub mod store;
pub mod text;
pub mod weights;
