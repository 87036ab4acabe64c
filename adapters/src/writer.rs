//! Writing a Hugging Face checkpoint directory (the layout transformers' `save_pretrained` writes).
//!
//! - total tensor bytes <= `max_shard_bytes`: one `model.safetensors`;
//! - otherwise `model-0000i-of-0000n.safetensors` (5-digit, 1-based, as transformers names them)
//!   filled greedily in sorted key order (a tensor larger than the limit gets a shard of its own),
//!   plus `model.safetensors.index.json` = `{"metadata": {"total_size": N}, "weight_map": {key: file}}`
//!   with N the sum of tensor byte sizes.
//!
//! Files carry `__metadata__ = {"format": "pt"}` (what transformers expects). Crash safety:
//! every file is written under a temporary name, fsynced, and renamed into place only after all
//! files were written; the index is renamed last. Files of the other layout
//! (`model.safetensors` vs. shards + index) left from an earlier save are removed afterwards so the
//! directory is unambiguous.

use crate::checkpoint::{CONFIG_FILE, INDEX_FILE, SINGLE_FILE};
use crate::error::{AdapterError, Result};
use crate::stream_write::plan_files;
use crate::tensor::HostTensor;
use safetensors::{Dtype, View};
use serde_json::{json, Value};
use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};

impl View for &HostTensor {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

fn tmp_name(final_name: &str) -> String {
    format!(".{final_name}.tmp-{}", std::process::id())
}

/// Writes `bytes` to `dir/.name.tmp-PID` and fsyncs it; returns the temporary path.
pub(crate) fn write_tmp(dir: &Path, name: &str, bytes: &[u8]) -> Result<PathBuf> {
    let p = dir.join(tmp_name(name));
    let mut f = std::fs::File::create(&p).map_err(|e| AdapterError::io(&p, e))?;
    f.write_all(bytes).map_err(|e| AdapterError::io(&p, e))?;
    f.sync_all().map_err(|e| AdapterError::io(&p, e))?;
    Ok(p)
}

/// Shard file name as transformers writes it: `model-00001-of-00003.safetensors`.
pub fn shard_file_name(i: usize, n: usize) -> String {
    format!("model-{i:05}-of-{n:05}.safetensors")
}

/// Writes HF layout: model.safetensors, or when the total exceeds `max_shard_bytes`,
/// model-0000i-of-0000n.safetensors + model.safetensors.index.json (weight_map,
/// metadata.total_size), keys in sorted order, plus config.json when given. Writes to temporary
/// names and renames at the end. Returns the final paths written (safetensors files in order, then
/// the index, then config.json).
///
/// Errors: I/O (naming the path), a tensor whose bytes disagree with its dtype/shape, an empty
/// tensor map.
pub fn write_hf_checkpoint(
    dir: &Path,
    tensors: &BTreeMap<String, HostTensor>,
    config: Option<&Value>,
    max_shard_bytes: u64,
) -> Result<Vec<PathBuf>> {
    if tensors.is_empty() {
        return Err(AdapterError::Tensor(format!(
            "{}: refusing to write a checkpoint with no tensors",
            dir.display()
        )));
    }
    for (k, t) in tensors {
        let want = t.numel() * t.element_size();
        if t.data.len() != want || t.dtype.bitsize() % 8 != 0 {
            return Err(AdapterError::Tensor(format!(
                "tensor '{k}': {} bytes for dtype {} shape {:?} (expected {want})",
                t.data.len(),
                t.dtype,
                t.shape
            )));
        }
    }
    std::fs::create_dir_all(dir).map_err(|e| AdapterError::io(dir, e))?;
    let keys: Vec<&str> = tensors.keys().map(String::as_str).collect();
    let sizes: Vec<u64> = tensors.values().map(|t| t.data.len() as u64).collect();
    let total: u64 = sizes.iter().sum();
    let shards: Vec<Vec<&str>> = plan_files(&sizes, max_shard_bytes)
        .into_iter()
        .map(|file| file.into_iter().map(|i| keys[i]).collect())
        .collect();
    let sharded = shards.len() > 1;
    let n = shards.len();
    let md: HashMap<String, String> = HashMap::from([("format".to_string(), "pt".to_string())]);
    // (tmp, final) pairs, renamed at the end.
    let mut pending: Vec<(PathBuf, PathBuf)> = Vec::new();
    let mut weight_map = serde_json::Map::new();
    let result = (|| -> Result<()> {
        for (i, keys) in shards.iter().enumerate() {
            let name = if sharded {
                shard_file_name(i + 1, n)
            } else {
                SINGLE_FILE.to_string()
            };
            let items: Vec<(&str, &HostTensor)> = keys
                .iter()
                .filter_map(|k| tensors.get(*k).map(|t| (*k, t)))
                .collect();
            let bytes = safetensors::serialize(items, Some(md.clone()))
                .map_err(|e| AdapterError::Format(format!("{name}: serialize failed: {e}")))?;
            let tmp = write_tmp(dir, &name, &bytes)?;
            pending.push((tmp, dir.join(&name)));
            for k in keys {
                weight_map.insert((*k).to_string(), Value::String(name.clone()));
            }
        }
        if sharded {
            let index = json!({"metadata": {"total_size": total}, "weight_map": weight_map});
            let s = serde_json::to_string_pretty(&index)
                .map_err(|e| AdapterError::Format(format!("{INDEX_FILE}: {e}")))?;
            let tmp = write_tmp(dir, INDEX_FILE, format!("{s}\n").as_bytes())?;
            pending.push((tmp, dir.join(INDEX_FILE)));
        }
        if let Some(cfg) = config {
            let s = serde_json::to_string_pretty(cfg)
                .map_err(|e| AdapterError::Config(format!("{CONFIG_FILE}: {e}")))?;
            let tmp = write_tmp(dir, CONFIG_FILE, format!("{s}\n").as_bytes())?;
            pending.push((tmp, dir.join(CONFIG_FILE)));
        }
        Ok(())
    })();
    if let Err(e) = result {
        for (tmp, _) in &pending {
            let _ = std::fs::remove_file(tmp);
        }
        return Err(e);
    }
    let mut written = Vec::new();
    for (tmp, fin) in &pending {
        std::fs::rename(tmp, fin).map_err(|e| AdapterError::io(fin, e))?;
        written.push(fin.clone());
    }
    remove_stale(dir, &written)?;
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(written)
}

/// Removes HF weight files in `dir` that belong to an earlier save and were not just written.
fn remove_stale(dir: &Path, written: &[PathBuf]) -> Result<()> {
    let rd = std::fs::read_dir(dir).map_err(|e| AdapterError::io(dir, e))?;
    for ent in rd.flatten() {
        let name = ent.file_name().to_string_lossy().into_owned();
        let is_weights = name == SINGLE_FILE
            || name == INDEX_FILE
            || (name.starts_with("model-")
                && name.contains("-of-")
                && name.ends_with(".safetensors"));
        let p = ent.path();
        if is_weights && !written.contains(&p) {
            std::fs::remove_file(&p).map_err(|e| AdapterError::io(&p, e))?;
        }
    }
    Ok(())
}
