//! Hugging Face storage for DCP (`HuggingFaceStorageWriter` / `HuggingFaceStorageReader` in
//! `torch/distributed/checkpoint/hf_storage.py`, names in `_hf_utils.py`): no pickle, only
//! safetensors files in the checkpoint directory (not its subdirectories).
//!
//! - `save_distributed=True`: one file per rank, `shard-{rank+1:05}-model-{i:05}-of-{n:05}.safetensors`,
//!   whose `__metadata__["DCP_SHARDING_INFO"]` is JSON `{fqn: {"saved_offsets": [...]}}`: each tensor
//!   of the file is the chunk of that fqn at those offsets.
//! - consolidated (`enable_consolidation=True`, shards then in `sharded/`), or any plain
//!   safetensors checkpoint: each tensor is one whole chunk at offset 0.
//!
//! As torch's reader, the global size of a tensor is the maximum of `offset + shape` over its
//! chunks, per dim.

use super::{Chunk, Layout, StorageFormat, TensorEntry};
use crate::checkpoint::{map_file, parse_header};
use crate::error::{AdapterError, Result};
use memmap2::Mmap;
use placement::chunks::ChunkBox;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;

/// `__metadata__` key of the per-file chunk offsets.
pub const SHARDING_INFO_KEY: &str = "DCP_SHARDING_INFO";

fn fmt(msg: String) -> AdapterError {
    AdapterError::Format(msg)
}

/// The `*.safetensors` files directly in `dir`, sorted by name.
pub fn safetensors_files(dir: &Path) -> Result<Vec<String>> {
    let rd = std::fs::read_dir(dir).map_err(|e| AdapterError::io(dir, e))?;
    let mut v = Vec::new();
    for e in rd {
        let e = e.map_err(|e| AdapterError::io(dir, e))?;
        let name = e.file_name().to_string_lossy().into_owned();
        if name.ends_with(".safetensors") && !name.starts_with('.') {
            v.push(name);
        }
    }
    v.sort();
    Ok(v)
}

/// Rank (0-based) of a `shard-{rank+1:05}-model-...` file name.
pub fn shard_rank(name: &str) -> Option<usize> {
    let rest = name.strip_prefix("shard-")?;
    let (num, tail) = rest.split_once('-')?;
    if !tail.starts_with("model-") || num.is_empty() || !num.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    num.parse::<usize>().ok()?.checked_sub(1)
}

/// What [`open`] read.
pub(crate) struct HfParts {
    /// Sharded (with `DCP_SHARDING_INFO`) or consolidated / plain.
    pub format: StorageFormat,
    /// The mapped files, by name.
    pub files: Vec<(String, Option<Mmap>)>,
    /// Tensors with their chunks.
    pub tensors: BTreeMap<String, TensorEntry>,
    /// Ranks that saved (the largest shard index), 1 when consolidated.
    pub world_size: usize,
}

/// Reads every safetensors file of `dir` (`names`, from [`safetensors_files`]). Errors (one
/// line, naming the file and key): a malformed safetensors file (the checks of
/// [`crate::HfCheckpoint::open`]), `DCP_SHARDING_INFO` that is not JSON of the form above or lacks a
/// tensor of its file, offsets of the wrong rank, one tensor in two files with different dtypes,
/// or with the sharding info in some files only.
pub(crate) fn open(dir: &Path, names: &[String]) -> Result<HfParts> {
    let mut files = Vec::new();
    let mut tensors: BTreeMap<String, TensorEntry> = BTreeMap::new();
    let mut sharded: Option<bool> = None;
    let mut world = 1usize;
    for (fi, name) in names.iter().enumerate() {
        let path = dir.join(name);
        let shown = path.display().to_string();
        let mmap = map_file(&path)?;
        let (entries, meta) = parse_header(&shown, &mmap)?;
        let info: Option<Value> = match meta.get(SHARDING_INFO_KEY) {
            None => None,
            Some(s) => Some(serde_json::from_str(s).map_err(|e| {
                fmt(format!(
                    "{shown}: __metadata__ {SHARDING_INFO_KEY} is not JSON: {e}"
                ))
            })?),
        };
        match sharded {
            None => sharded = Some(info.is_some()),
            Some(s) if s != info.is_some() => {
                return Err(fmt(format!(
                    "{shown}: {} {SHARDING_INFO_KEY} but {} {}",
                    if info.is_some() { "has" } else { "has no" },
                    names[0],
                    if s { "has" } else { "has not" }
                )))
            }
            _ => {}
        }
        if info.is_some() {
            if let Some(r) = shard_rank(name) {
                world = world.max(r + 1);
            }
        }
        for h in entries {
            let offsets: Vec<usize> = match &info {
                None => vec![0; h.shape.len()],
                Some(v) => {
                    let o = v
                        .get(&h.key)
                        .and_then(|e| e.get("saved_offsets"))
                        .ok_or_else(|| {
                            fmt(format!(
                                "{shown}: tensor '{}' has no saved_offsets in {SHARDING_INFO_KEY}",
                                h.key
                            ))
                        })?;
                    let o: Vec<usize> = serde_json::from_value(o.clone()).map_err(|_| {
                        fmt(format!(
                            "{shown}: tensor '{}': saved_offsets {o} is not a list of non-negative integers",
                            h.key
                        ))
                    })?;
                    if o.len() != h.shape.len() {
                        return Err(fmt(format!(
                            "{shown}: tensor '{}': {} saved_offsets for a {}-d tensor",
                            h.key,
                            o.len(),
                            h.shape.len()
                        )));
                    }
                    o
                }
            };
            let end: Option<Vec<usize>> = offsets
                .iter()
                .zip(&h.shape)
                .map(|(&o, &s)| o.checked_add(s))
                .collect();
            let end = end.ok_or_else(|| {
                fmt(format!(
                    "{shown}: tensor '{}': offsets {offsets:?} overflow",
                    h.key
                ))
            })?;
            let t = tensors.entry(h.key.clone()).or_insert_with(|| TensorEntry {
                dtype: h.dtype,
                global_shape: vec![0; h.shape.len()],
                chunks: Vec::new(),
                problems: Vec::new(),
            });
            if t.dtype != h.dtype || t.global_shape.len() != h.shape.len() {
                return Err(fmt(format!(
                    "{shown}: tensor '{}' is {} {:?} here but {} with {} dims in another file",
                    h.key,
                    h.dtype,
                    h.shape,
                    t.dtype,
                    t.global_shape.len()
                )));
            }
            for (g, e) in t.global_shape.iter_mut().zip(&end) {
                *g = (*g).max(*e);
            }
            let mut strides = vec![1usize; h.shape.len()];
            for d in (0..h.shape.len().saturating_sub(1)).rev() {
                strides[d] = strides[d + 1] * h.shape[d + 1].max(1);
            }
            let numel: usize = h.shape.iter().product();
            t.chunks.push(Chunk {
                boxed: ChunkBox {
                    offsets,
                    sizes: h.shape.clone(),
                },
                file: fi,
                byte_offset: h.begin as u64,
                byte_length: (h.end - h.begin) as u64,
                layout: Some(Layout {
                    data_start: h.begin,
                    storage_offset: 0,
                    strides,
                    storage_numel: numel,
                    crc32: None,
                }),
            });
        }
        files.push((name.clone(), Some(mmap)));
    }
    let format = if sharded == Some(true) {
        StorageFormat::HfSharded
    } else {
        StorageFormat::HfConsolidated
    };
    Ok(HfParts {
        format,
        files,
        tensors,
        world_size: world,
    })
}
