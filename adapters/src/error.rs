//! The crate's error type. Every message is ONE line that names the file and/or tensor key
//! involved, so a failing load can be diagnosed from a log line alone.

use std::path::PathBuf;

/// Result alias used by every fallible function in this crate.
pub type Result<T> = std::result::Result<T, AdapterError>;

/// Everything that can go wrong while reading, converting or writing a checkpoint.
///
/// Messages are single lines (no embedded newlines) naming the file and/or key.
#[derive(Debug, thiserror::Error)]
pub enum AdapterError {
    /// An I/O error on `path` (open, mmap, read, write, rename).
    #[error("{}: {source}", path.display())]
    Io {
        /// File or directory the operation was about.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A malformed safetensors file or index.json; the message starts with the file name.
    #[error("{0}")]
    Format(String),
    /// A bad or missing config.json field.
    #[error("{0}")]
    Config(String),
    /// A requested tensor key is not in the checkpoint.
    #[error("tensor '{key}' not found in checkpoint {}", dir.display())]
    MissingKey {
        /// The key asked for.
        key: String,
        /// The checkpoint directory.
        dir: PathBuf,
    },
    /// Expert tensors that a MoE layer needs are absent (names the first missing keys).
    #[error("{0}")]
    MissingExperts(String),
    /// Keys that look like expert tensors but are not expected by the adapter.
    #[error("{0}")]
    UnexpectedKeys(String),
    /// A shape or dtype disagrees with the config or with another tensor.
    #[error("{0}")]
    Shape(String),
    /// An invalid argument to a [`crate::HostTensor`] operation or to [`crate::assemble`].
    #[error("{0}")]
    Tensor(String),
    /// A placement this version does not convert (e.g. sharding the packed 2I dim).
    #[error("{0}")]
    Unsupported(String),
    /// An error from the `placement` crate, prefixed with the key it was about.
    #[error("{0}")]
    Placement(String),
    /// config.json's model_type has no adapter.
    #[error("unknown model_type '{model_type}'; supported: {}", supported.join(", "))]
    UnknownModelType {
        /// The model_type found in config.json.
        model_type: String,
        /// The model types this crate has adapters for.
        supported: Vec<String>,
    },
}

impl AdapterError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        AdapterError::Io {
            path: path.into(),
            source,
        }
    }
}
