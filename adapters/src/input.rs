//! Opening input files safely: only regular files are read as data (a FIFO, a device, a socket or
//! a directory in a file's place is an error naming the path, checked before any open, so nothing
//! blocks on a pipe or reads an endless device), and JSON inputs (config.json, the index, the
//! sidecar, safetensors headers) must not repeat a key in any object, which `serde_json::Value`
//! would resolve silently by keeping the last one.
//!
//! The duplicate check is a serde visitor over the document (serde_json's parser, no hand-written
//! JSON parsing): the libraries in use keep the last of duplicated keys and have no option to
//! refuse them.

use crate::error::{AdapterError, Result};
use serde::de::{Deserialize, Deserializer, Error as _, MapAccess, SeqAccess, Visitor};
use std::collections::HashSet;
use std::fmt;
use std::path::Path;

/// What kind of non-regular file `m` is, for errors.
fn kind(m: &std::fs::Metadata) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    let t = m.file_type();
    if t.is_dir() {
        "a directory"
    } else if t.is_fifo() {
        "a FIFO (named pipe)"
    } else if t.is_char_device() || t.is_block_device() {
        "a device"
    } else if t.is_socket() {
        "a socket"
    } else {
        "not a regular file"
    }
}

/// The length in bytes of the regular file at `path` (symlinks followed), `Ok(None)` when
/// nothing is there. Errors: something other than a regular file is there (names what), or its
/// metadata cannot be read (permission, I/O).
pub fn regular_file_len(path: &Path) -> Result<Option<u64>> {
    match std::fs::metadata(path) {
        Ok(m) if m.is_file() => Ok(Some(m.len())),
        Ok(m) => Err(AdapterError::Format(format!(
            "{}: is {}, not a regular file",
            path.display(),
            kind(&m)
        ))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(AdapterError::io(path, e)),
    }
}

/// The bytes of the regular file at `path`. Errors: absent, not a regular file, unreadable.
pub fn read_regular(path: &Path) -> Result<Vec<u8>> {
    read_bounded(path, u64::MAX)
}

/// [`read_regular`] refusing more than `max` bytes (one metadata call, then the read).
fn read_bounded(path: &Path, max: u64) -> Result<Vec<u8>> {
    match regular_file_len(path)? {
        None => Err(AdapterError::io(
            path,
            std::io::Error::from(std::io::ErrorKind::NotFound),
        )),
        Some(n) if n > max => Err(AdapterError::Format(format!(
            "{}: {n} bytes, more than the {max} a JSON input may have",
            path.display()
        ))),
        Some(_) => std::fs::read(path).map_err(|e| AdapterError::io(path, e)),
    }
}

/// Largest text (JSON) input read: config.json, an index, a sidecar. The largest published
/// indexes are a few MB (about 100 bytes per tensor); a bigger file is refused before it is
/// read, so a damaged one costs no more memory than this.
pub const MAX_TEXT_BYTES: u64 = 32 << 20;

/// The text of the regular file at `path` (see [`read_regular`]). Errors also for non-UTF-8 and
/// for more than [`MAX_TEXT_BYTES`] bytes.
pub fn read_regular_string(path: &Path) -> Result<String> {
    String::from_utf8(read_bounded(path, MAX_TEXT_BYTES)?)
        .map_err(|e| AdapterError::Format(format!("{}: not UTF-8 text: {e}", path.display())))
}

/// Walks any JSON value, refusing an object that repeats a key.
struct NoDuplicateKeys;

impl<'de> Deserialize<'de> for NoDuplicateKeys {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        d.deserialize_any(NoDuplicateKeys)
    }
}

impl<'de> Visitor<'de> for NoDuplicateKeys {
    type Value = NoDuplicateKeys;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> std::result::Result<Self, A::Error> {
        let mut seen = HashSet::new();
        while let Some(k) = map.next_key::<String>()? {
            if !seen.insert(k.clone()) {
                return Err(A::Error::custom(format!("duplicate key '{k}'")));
            }
            map.next_value::<NoDuplicateKeys>()?;
        }
        Ok(self)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> std::result::Result<Self, A::Error> {
        while seq.next_element::<NoDuplicateKeys>()?.is_some() {}
        Ok(self)
    }

    fn visit_bool<E>(self, _: bool) -> std::result::Result<Self, E> {
        Ok(self)
    }
    fn visit_i64<E>(self, _: i64) -> std::result::Result<Self, E> {
        Ok(self)
    }
    fn visit_u64<E>(self, _: u64) -> std::result::Result<Self, E> {
        Ok(self)
    }
    fn visit_f64<E>(self, _: f64) -> std::result::Result<Self, E> {
        Ok(self)
    }
    fn visit_str<E>(self, _: &str) -> std::result::Result<Self, E> {
        Ok(self)
    }
    fn visit_unit<E>(self) -> std::result::Result<Self, E> {
        Ok(self)
    }
}

/// Parses JSON `text` into a `serde_json::Value` after checking no object in it repeats a key.
/// Errors (serde_json's message, with line and column): invalid JSON, a duplicated key.
pub fn parse_json_strict(text: &str) -> std::result::Result<serde_json::Value, serde_json::Error> {
    serde_json::from_str::<NoDuplicateKeys>(text)?;
    serde_json::from_str(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_repeated_key_at_any_depth_is_refused() {
        assert!(parse_json_strict(r#"{"a": 1, "b": [{"c": 2, "d": 3}]}"#).is_ok());
        let e = parse_json_strict(r#"{"a": 1, "a": 2}"#)
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("duplicate key 'a'"), "{e}");
        let e = parse_json_strict(r#"{"t": [{"c": 1, "c": {}}]}"#)
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("duplicate key 'c'"), "{e}");
        // the same key in two objects is no duplicate
        assert!(parse_json_strict(r#"[{"c": 1}, {"c": 2}]"#).is_ok());
    }

    #[test]
    fn only_regular_files_are_read() {
        let tmp = tempfile::tempdir().unwrap();
        assert_eq!(regular_file_len(&tmp.path().join("absent")).unwrap(), None);
        let e = read_regular(tmp.path()).unwrap_err().to_string();
        assert!(e.ends_with("is a directory, not a regular file"), "{e}");
        let fifo = tmp.path().join("pipe");
        let ok = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success();
        assert!(ok);
        // returns at once: the FIFO is never opened
        let e = read_regular(&fifo).unwrap_err().to_string();
        assert!(
            e.ends_with("is a FIFO (named pipe), not a regular file"),
            "{e}"
        );
        let e = read_regular(Path::new("/dev/zero"))
            .unwrap_err()
            .to_string();
        assert!(e.ends_with("is a device, not a regular file"), "{e}");
        let big = tmp.path().join("big.json");
        std::fs::File::create(&big)
            .unwrap()
            .set_len(MAX_TEXT_BYTES + 1)
            .unwrap();
        let e = read_regular_string(&big).unwrap_err().to_string();
        assert!(
            e.ends_with("33554433 bytes, more than the 33554432 a JSON input may have"),
            "{e}"
        );
        std::fs::write(tmp.path().join("f"), b"xyz").unwrap();
        assert_eq!(regular_file_len(&tmp.path().join("f")).unwrap(), Some(3));
        assert_eq!(read_regular(&tmp.path().join("f")).unwrap(), b"xyz");
    }
}
