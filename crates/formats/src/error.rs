use std::path::PathBuf;

/// What went wrong reading a checkpoint. Each variant names the file, and the tensor or field.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    /// The file could not be opened, mapped or read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The safetensors header is malformed, or its offsets disagree with the file's length.
    #[error("{path}: invalid safetensors file: {reason}")]
    Safetensors {
        /// The file.
        path: PathBuf,
        /// What the parser found.
        reason: String,
    },
    /// A GGUF file's header is malformed, inconsistent with the file, or lacks what is needed.
    #[error("{path}: invalid GGUF file: {reason}")]
    Gguf {
        /// The file.
        path: PathBuf,
        /// What the parser found.
        reason: String,
    },
    /// A JSON file (config, index) is malformed or lacks a field.
    #[error("{path}: {reason}")]
    Json {
        /// The file.
        path: PathBuf,
        /// The field involved and what is wrong with it.
        reason: String,
    },
    /// A tensor the model needs is not in any weight file.
    #[error("{dir}: tensor `{tensor}` not found in the checkpoint's safetensors files")]
    MissingTensor {
        /// The checkpoint folder.
        dir: PathBuf,
        /// The tensor name.
        tensor: String,
    },
    /// A tensor exists but cannot be used as asked (dtype, shape, quantization).
    #[error("{path}: tensor `{tensor}`: {reason}")]
    BadTensor {
        /// The file that holds it.
        path: PathBuf,
        /// The tensor name.
        tensor: String,
        /// What is wrong.
        reason: String,
    },
    /// The folder holds no weights.
    #[error("{dir}: no *.safetensors files found")]
    NoWeights {
        /// The checkpoint folder.
        dir: PathBuf,
    },
}
