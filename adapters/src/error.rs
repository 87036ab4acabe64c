//! The crate's error type. Every message is ONE line that names the file and/or tensor key
//! involved, so a failing load can be diagnosed from a log line alone.

use std::path::PathBuf;

/// `s` with line breaks (and other control characters) escaped as Rust does (`\n`), so a key,
/// path or pickle string that holds one still makes a one-line message.
pub fn one_line(s: &str) -> std::borrow::Cow<'_, str> {
    if s.chars().any(char::is_control) {
        std::borrow::Cow::Owned(
            s.chars()
                .map(|c| {
                    if c.is_control() {
                        c.escape_default().to_string()
                    } else {
                        c.to_string()
                    }
                })
                .collect(),
        )
    } else {
        std::borrow::Cow::Borrowed(s)
    }
}

/// Result alias used by every fallible function in this crate.
pub type Result<T> = std::result::Result<T, AdapterError>;

/// Everything that can go wrong while reading, converting or writing a checkpoint.
///
/// Messages are single lines naming the file and/or key: control characters a key, path or
/// message holds are escaped ([`one_line`]) when the error is displayed.
#[derive(Debug, thiserror::Error)]
pub enum AdapterError {
    /// An I/O error on `path` (open, mmap, read, write, rename).
    #[error("{}: {}", one_line(&path.display().to_string()), one_line(&source.to_string()))]
    Io {
        /// File or directory the operation was about.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A malformed safetensors file or index.json; the message starts with the file name.
    #[error("{}", one_line(.0))]
    Format(String),
    /// A bad or missing config.json field.
    #[error("{}", one_line(.0))]
    Config(String),
    /// A requested tensor key is not in the checkpoint.
    #[error("tensor '{}' not found in checkpoint {}", one_line(key), one_line(&dir.display().to_string()))]
    MissingKey {
        /// The key asked for.
        key: String,
        /// The checkpoint directory.
        dir: PathBuf,
    },
    /// Expert tensors that a MoE layer needs are absent (names the first missing keys).
    #[error("{}", one_line(.0))]
    MissingExperts(String),
    /// Keys that look like expert tensors but are not expected by the adapter.
    #[error("{}", one_line(.0))]
    UnexpectedKeys(String),
    /// A shape or dtype disagrees with the config or with another tensor.
    #[error("{}", one_line(.0))]
    Shape(String),
    /// An invalid argument to a [`crate::HostTensor`] operation or to [`crate::assemble`].
    #[error("{}", one_line(.0))]
    Tensor(String),
    /// A placement this version does not convert (e.g. sharding the packed 2I dim).
    #[error("{}", one_line(.0))]
    Unsupported(String),
    /// An error from the `placement` crate, prefixed with the key it was about.
    #[error("{}", one_line(.0))]
    Placement(String),
    /// config.json's model_type has no adapter.
    #[error("unknown model_type '{}'; supported: {}", one_line(model_type), supported.join(", "))]
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_with_a_newline_still_makes_one_line() {
        let e = AdapterError::MissingKey {
            key: "a\nb".into(),
            dir: "/x\ty".into(),
        };
        assert_eq!(
            e.to_string(),
            "tensor 'a\\nb' not found in checkpoint /x\\ty"
        );
        assert_eq!(
            AdapterError::Format("f: key 'k\r\n'".into()).to_string(),
            "f: key 'k\\r\\n'"
        );
        assert_eq!(one_line("plain ünïcode"), "plain ünïcode");
    }
}
