//! Reading a Hugging Face checkpoint directory: `config.json` plus either `model.safetensors` or
//! sharded `model-0000i-of-0000n.safetensors` files listed by `model.safetensors.index.json`.
//!
//! Files are memory-mapped; every safetensors header is validated on open (rules from the
//! safetensors format spec, huggingface/safetensors `tensor.rs` `read_metadata`/`validate`):
//! 8-byte little-endian header length within the file, UTF-8 JSON object, known dtype, shape x dtype
//! size == byte count of `data_offsets`, offsets inside the data section, no overlaps, no gaps, no
//! trailing bytes. Our own checks run first so every error is one line naming the file and key; the
//! safetensors crate's parser then runs as a final check.
//! The index (transformers `modeling_utils` sharded format) must name existing files, every key of
//! every file, and only keys present in the named file; a key in two files is an error.
//! Every file read is checked to be a regular file first ([`crate::input`]: a FIFO, a device or a
//! directory in its place is an error, never opened), and no JSON object (config.json, the index,
//! a header) may repeat a key.

use crate::error::{AdapterError, Result};
use crate::input::{parse_json_strict, read_regular_string, regular_file_len};
use crate::tensor::{check_indices, checked_numel, dtype_size, gather_bytes, HostTensor};
use memmap2::Mmap;
use safetensors::Dtype;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Name of the single-file checkpoint.
pub const SINGLE_FILE: &str = "model.safetensors";
/// Name of the sharded checkpoint index.
pub const INDEX_FILE: &str = "model.safetensors.index.json";
/// Name of the model config.
pub const CONFIG_FILE: &str = "config.json";
/// safetensors' limit on the JSON header (huggingface/safetensors `MAX_HEADER_SIZE`).
const MAX_HEADER_BYTES: u64 = 100_000_000;

/// Where a tensor lives and what it is.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    /// Element type.
    pub dtype: Dtype,
    /// Shape as stored on disk.
    pub shape: Vec<usize>,
    /// The safetensors file holding it.
    pub file: PathBuf,
}

impl TensorInfo {
    /// The name of the file holding the tensor (for error messages).
    pub fn file_name(&self) -> String {
        fname(&self.file)
    }
}

#[derive(Debug)]
struct Entry {
    file: usize,
    dtype: Dtype,
    shape: Vec<usize>,
    /// Absolute byte range in the file.
    start: usize,
    end: usize,
}

#[derive(Debug)]
struct MappedFile {
    path: PathBuf,
    mmap: Mmap,
}

/// A validated, memory-mapped Hugging Face checkpoint directory (see the module docs).
#[derive(Debug)]
pub struct HfCheckpoint {
    dir: PathBuf,
    config: Value,
    files: Vec<MappedFile>,
    tensors: BTreeMap<String, Entry>,
    metadata: BTreeMap<String, String>,
}

fn fname(p: &Path) -> String {
    p.file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| p.display().to_string())
}

fn fmt_err(file: &str, msg: impl std::fmt::Display) -> AdapterError {
    AdapterError::Format(format!("{file}: {msg}"))
}

/// One parsed header entry before it is placed in the checkpoint map.
pub(crate) struct HeaderEntry {
    pub(crate) key: String,
    pub(crate) dtype: Dtype,
    pub(crate) shape: Vec<usize>,
    pub(crate) begin: usize,
    pub(crate) end: usize,
}

/// Validates one safetensors file's header against its size. Returns the entries with ABSOLUTE
/// byte ranges and the `__metadata__` map.
pub(crate) fn parse_header(
    name: &str,
    buf: &[u8],
) -> Result<(Vec<HeaderEntry>, BTreeMap<String, String>)> {
    let size = buf.len();
    let Some(len_bytes) = buf.get(..8) else {
        return Err(fmt_err(
            name,
            format!("file is {size} bytes, too short for the 8-byte header length (truncated)"),
        ));
    };
    let mut arr = [0u8; 8];
    arr.copy_from_slice(len_bytes);
    let n = u64::from_le_bytes(arr);
    if n > (size as u64).saturating_sub(8) {
        return Err(fmt_err(
            name,
            format!("header length {n} exceeds file size {size}"),
        ));
    }
    if n > MAX_HEADER_BYTES {
        return Err(fmt_err(
            name,
            format!("header length {n} exceeds the safetensors limit of {MAX_HEADER_BYTES} bytes"),
        ));
    }
    let n = n as usize;
    let header = std::str::from_utf8(&buf[8..8 + n])
        .map_err(|e| fmt_err(name, format!("header is not UTF-8: {e}")))?;
    let json: Value = parse_json_strict(header)
        .map_err(|e| fmt_err(name, format!("header is not valid JSON: {e}")))?;
    let Value::Object(obj) = json else {
        return Err(fmt_err(name, "header is not a JSON object"));
    };
    let data_start = 8 + n;
    let data_len = size - data_start;
    let mut metadata = BTreeMap::new();
    let mut entries = Vec::new();
    for (key, v) in obj {
        if key == "__metadata__" {
            let Value::Object(m) = v else {
                return Err(fmt_err(name, "__metadata__ is not a JSON object"));
            };
            for (mk, mv) in m {
                let Value::String(s) = mv else {
                    return Err(fmt_err(
                        name,
                        format!("__metadata__ '{mk}' is not a string"),
                    ));
                };
                metadata.insert(mk, s);
            }
            continue;
        }
        let bad = |what: &str| fmt_err(name, format!("tensor '{key}' {what}"));
        let dtype_v = v.get("dtype").ok_or_else(|| bad("has no dtype"))?;
        let dtype: Dtype = serde_json::from_value(dtype_v.clone())
            .map_err(|_| bad(&format!("has unknown dtype {dtype_v}")))?;
        let shape: Vec<usize> = v
            .get("shape")
            .and_then(|s| serde_json::from_value(s.clone()).ok())
            .ok_or_else(|| bad("has no valid shape (array of non-negative integers)"))?;
        let offs: (usize, usize) = v
            .get("data_offsets")
            .and_then(|s| serde_json::from_value(s.clone()).ok())
            .ok_or_else(|| bad("has no valid data_offsets ([begin, end])"))?;
        let (b, e) = offs;
        if e < b {
            return Err(bad(&format!("data_offsets [{b}, {e}) end before begin")));
        }
        let nbytes = checked_numel(&shape)
            .and_then(|x| x.checked_mul(dtype.bitsize()))
            .ok_or_else(|| bad(&format!("shape {shape:?} overflows")))?;
        if nbytes % 8 != 0 || nbytes / 8 != e - b {
            return Err(bad(&format!(
                "shape {shape:?} dtype {dtype} needs {} bytes but data [{b}, {e}) spans {} bytes",
                nbytes as f64 / 8.0,
                e - b
            )));
        }
        if e > data_len {
            return Err(bad(&format!(
                "data [{b}, {e}) extends past end of file ({size} bytes; data section {data_len} bytes)"
            )));
        }
        entries.push(HeaderEntry {
            key,
            dtype,
            shape,
            begin: b,
            end: e,
        });
    }
    entries.sort_by_key(|x| (x.begin, x.end));
    let mut prev: Option<&HeaderEntry> = None;
    let mut pos = 0usize;
    for cur in &entries {
        if let Some(p) = prev {
            if cur.begin < p.end {
                return Err(fmt_err(
                    name,
                    format!(
                        "tensor '{}' data [{}, {}) overlaps tensor '{}' data [{}, {})",
                        cur.key, cur.begin, cur.end, p.key, p.begin, p.end
                    ),
                ));
            }
        }
        if cur.begin > pos {
            return Err(fmt_err(
                name,
                format!(
                    "gap of unused bytes [{pos}, {}) before tensor '{}' (safetensors data must be contiguous)",
                    cur.begin, cur.key
                ),
            ));
        }
        pos = cur.end;
        prev = Some(cur);
    }
    if pos != data_len {
        return Err(fmt_err(
            name,
            format!("tensors end at data offset {pos} but the data section is {data_len} bytes (trailing bytes)"),
        ));
    }
    // Final check with the reference parser.
    safetensors::SafeTensors::read_metadata(buf).map_err(|e| fmt_err(name, e))?;
    for en in &mut entries {
        en.begin += data_start;
        en.end += data_start;
    }
    Ok((entries, metadata))
}

pub(crate) fn map_file(path: &Path) -> Result<Mmap> {
    let f = std::fs::File::open(path).map_err(|e| AdapterError::io(path, e))?;
    // SAFETY: the mapping is read-only; like every safetensors reader we assume the file is not
    // truncated or rewritten while the checkpoint is open (our writer renames new files into place
    // rather than rewriting in place).
    unsafe { Mmap::map(&f) }.map_err(|e| AdapterError::io(path, e))
}

impl HfCheckpoint {
    /// Opens and validates a checkpoint directory (see the module docs for every check).
    ///
    /// `model.safetensors.index.json` wins when present; otherwise `model.safetensors` must exist.
    /// `config.json` is optional here (then [`HfCheckpoint::config`] is `{}` and
    /// [`HfCheckpoint::model_type`] errors), but must be valid JSON when present.
    pub fn open(dir: &Path) -> Result<Self> {
        match std::fs::metadata(dir) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                return Err(AdapterError::Format(format!(
                    "{}: not a directory (a checkpoint is a directory holding {SINGLE_FILE} or {INDEX_FILE})",
                    dir.display()
                )))
            }
            Err(e) => return Err(AdapterError::io(dir, e)),
        }
        let cfg_path = dir.join(CONFIG_FILE);
        let config = if regular_file_len(&cfg_path)?.is_some() {
            let s = read_regular_string(&cfg_path)?;
            parse_json_strict(&s).map_err(|e| {
                AdapterError::Config(format!("{}: not valid JSON: {e}", cfg_path.display()))
            })?
        } else {
            Value::Object(Default::default())
        };
        let index_path = dir.join(INDEX_FILE);
        let mut ck = HfCheckpoint {
            dir: dir.to_path_buf(),
            config,
            files: Vec::new(),
            tensors: BTreeMap::new(),
            metadata: BTreeMap::new(),
        };
        if regular_file_len(&index_path)?.is_some() {
            let weight_map = read_index(&index_path)?;
            let mut names: Vec<&String> = weight_map.values().collect();
            names.sort();
            names.dedup();
            for n in &names {
                let p = dir.join(n.as_str());
                if regular_file_len(&p)?.is_none() {
                    let key = weight_map
                        .iter()
                        .find(|(_, f)| f == n)
                        .map(|(k, _)| k.as_str())
                        .unwrap_or("");
                    return Err(fmt_err(
                        INDEX_FILE,
                        format!("weight_map names missing file '{n}' (for key '{key}')"),
                    ));
                }
            }
            for n in &names {
                ck.add_file(&dir.join(n.as_str()))?;
            }
            for (k, f) in &weight_map {
                match ck.tensors.get(k) {
                    Some(en) if fname(&ck.files[en.file].path) == *f => {}
                    _ => {
                        return Err(fmt_err(
                            INDEX_FILE,
                            format!("key '{k}' is mapped to '{f}' but absent from that file"),
                        ))
                    }
                }
            }
            for (k, en) in &ck.tensors {
                if !weight_map.contains_key(k) {
                    let file = fname(&ck.files[en.file].path);
                    return Err(fmt_err(
                        &file,
                        format!("tensor '{k}' is not listed in {INDEX_FILE}"),
                    ));
                }
            }
        } else {
            let p = dir.join(SINGLE_FILE);
            if regular_file_len(&p)?.is_none() {
                return Err(AdapterError::Format(format!(
                    "{}: neither {SINGLE_FILE} nor {INDEX_FILE} found",
                    dir.display()
                )));
            }
            ck.add_file(&p)?;
        }
        Ok(ck)
    }

    fn add_file(&mut self, path: &Path) -> Result<()> {
        let name = fname(path);
        let meta = std::fs::metadata(path).map_err(|e| AdapterError::io(path, e))?;
        if meta.len() < 8 {
            return Err(fmt_err(
                &name,
                format!(
                    "file is {} bytes, too short for the 8-byte header length (truncated)",
                    meta.len()
                ),
            ));
        }
        let mmap = map_file(path)?;
        let (entries, md) = parse_header(&name, &mmap)?;
        let idx = self.files.len();
        for en in entries {
            if let Some(prev) = self.tensors.get(&en.key) {
                let other = fname(&self.files[prev.file].path);
                return Err(fmt_err(
                    &name,
                    format!("duplicate key '{}' also in {other}", en.key),
                ));
            }
            self.tensors.insert(
                en.key,
                Entry {
                    file: idx,
                    dtype: en.dtype,
                    shape: en.shape,
                    start: en.begin,
                    end: en.end,
                },
            );
        }
        for (k, v) in md {
            self.metadata.entry(k).or_insert(v);
        }
        self.files.push(MappedFile {
            path: path.to_path_buf(),
            mmap,
        });
        Ok(())
    }

    /// The checkpoint directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Parsed config.json (`{}` when the directory has none).
    pub fn config(&self) -> &Value {
        &self.config
    }

    /// config.json's `model_type`. Errors when config.json or the field is missing.
    pub fn model_type(&self) -> Result<&str> {
        self.config
            .get("model_type")
            .and_then(Value::as_str)
            .ok_or_else(|| {
                AdapterError::Config(format!(
                    "{}: no string 'model_type' in {CONFIG_FILE}",
                    self.dir.display()
                ))
            })
    }

    /// All tensor keys, sorted.
    pub fn keys(&self) -> Vec<&str> {
        self.tensors.keys().map(String::as_str).collect()
    }

    /// Whether `key` is a tensor of this checkpoint.
    pub fn contains(&self, key: &str) -> bool {
        self.tensors.contains_key(key)
    }

    fn entry(&self, key: &str) -> Result<&Entry> {
        self.tensors
            .get(key)
            .ok_or_else(|| AdapterError::MissingKey {
                key: key.to_string(),
                dir: self.dir.clone(),
            })
    }

    /// dtype, shape and file of `key`. Errors (naming key and dir) when missing.
    pub fn info(&self, key: &str) -> Result<TensorInfo> {
        let e = self.entry(key)?;
        Ok(TensorInfo {
            dtype: e.dtype,
            shape: e.shape.clone(),
            file: self.files[e.file].path.clone(),
        })
    }

    /// The raw little-endian bytes of `key`, borrowed from the mmap.
    pub fn tensor_bytes(&self, key: &str) -> Result<&[u8]> {
        let e = self.entry(key)?;
        Ok(&self.files[e.file].mmap[e.start..e.end])
    }

    /// Copies `key` into a [`HostTensor`]. Errors (naming key and dir) when missing.
    pub fn tensor(&self, key: &str) -> Result<HostTensor> {
        let e = self.entry(key)?;
        HostTensor::new(e.dtype, e.shape.clone(), self.tensor_bytes(key)?.to_vec())
    }

    /// Reads only the sub-tensor of `key` holding indices `idx[d]` of each dim (in that order),
    /// straight from the mmap: an EP rank touches only its experts' bytes.
    pub fn tensor_gather(&self, key: &str, idx: &[Vec<usize>]) -> Result<HostTensor> {
        let e = self.entry(key)?;
        check_indices(key, &e.shape, idx)?;
        let elem = dtype_size(e.dtype)?;
        let data = gather_bytes(self.tensor_bytes(key)?, &e.shape, elem, idx);
        HostTensor::new(e.dtype, idx.iter().map(Vec::len).collect(), data)
    }

    /// File-level `__metadata__` of all files merged (the first file, in name order, wins).
    pub fn metadata(&self) -> &BTreeMap<String, String> {
        &self.metadata
    }

    /// The safetensors files of this checkpoint, in name order.
    pub fn files(&self) -> Vec<&Path> {
        self.files.iter().map(|f| f.path.as_path()).collect()
    }
}

/// Parses `model.safetensors.index.json` into its weight_map; file names must be plain names.
fn read_index(path: &Path) -> Result<BTreeMap<String, String>> {
    let s = read_regular_string(path)?;
    let v: Value =
        parse_json_strict(&s).map_err(|e| fmt_err(INDEX_FILE, format!("not valid JSON: {e}")))?;
    let Some(Value::Object(wm)) = v.get("weight_map") else {
        return Err(fmt_err(INDEX_FILE, "no 'weight_map' object"));
    };
    let mut out = BTreeMap::new();
    for (k, f) in wm {
        let Value::String(f) = f else {
            return Err(fmt_err(
                INDEX_FILE,
                format!("weight_map entry for key '{k}' is not a string"),
            ));
        };
        if f.contains('/') || f.contains('\\') || f == ".." || f.is_empty() {
            return Err(fmt_err(
                INDEX_FILE,
                format!("weight_map entry for key '{k}' names '{f}', not a plain file name"),
            ));
        }
        out.insert(k.clone(), f.clone());
    }
    Ok(out)
}
