//! The distributed save: every rank writes its own chunks ([`save_rank`]), then one rank merges
//! the ranks' metadata and writes `.metadata` last ([`commit`]). The files are torch's default
//! `FileSystemWriter` layout, so `torch.distributed.checkpoint.load` reads the result (module
//! docs of [`super`]).

use super::metadata::{self, Item, StorageIndex, StorageInfo, TensorItem, TorchMetadata};
use super::torch_item::{read_str_item, write_item, write_str_item};
use super::{from_metadata, DcpCheckpoint, METADATA_FILE};
use crate::error::{AdapterError, Result};
use crate::local::shard_indices;
use crate::tensor::{dtype_size, HostTensor};
use crate::writer::write_tmp;
use placement::chunks::{saves_shard, shard_boxes, LocalBox};
use placement::{format_placements, DeviceMesh, Placement};
use serde_json::Value;
use std::collections::BTreeMap;
use std::io::{BufWriter, Seek, Write};
use std::path::{Path, PathBuf};

/// fqn of the bytes item holding [`commit`]'s `extra` JSON (a `str`).
pub const EXTRA_KEY: &str = "extra";
/// The data file [`commit`] writes the `extra` item to.
pub const EXTRA_FILE: &str = "extra.distcp";

/// One tensor of this rank: its key, local data, global shape and the placements on `mesh`.
///
/// `local.shape` must be the local shape `placement::local_shard` gives for `global_shape`,
/// `placements` (one per mesh dim, no `Partial`) and the rank's mesh coordinate.
#[derive(Debug, Clone, Copy)]
pub struct ShardToSave<'a> {
    /// Tensor key (state-dict fqn).
    pub key: &'a str,
    /// This rank's local shard, row-major in its local order, in the dtype it is saved (and
    /// loaded) in.
    pub local: &'a HostTensor,
    /// Shape of the whole tensor.
    pub global_shape: &'a [usize],
    /// One placement per dim of the save mesh (`S(d)`, `_S(d, sf)`, `R`; never `P`).
    pub placements: &'a [Placement],
}

/// `__{rank}_0.distcp`: the data file of `rank` (DCP's `__{rank}_{n}.distcp`, one file per rank).
pub fn data_file_name(rank: usize) -> String {
    format!("__{rank}_0.distcp")
}

/// `__{rank}.metadata`: the pickled `Metadata` of the chunks `rank` wrote (the name torch's
/// no-collective save gives a rank's metadata).
pub fn rank_metadata_name(rank: usize) -> String {
    format!("__{rank}.metadata")
}

fn io_err(path: &Path) -> impl Fn(std::io::Error) -> AdapterError + '_ {
    move |e| AdapterError::io(path, e)
}

/// Writes the rows of box `b` of the row-major local tensor `t` (`elem`-byte elements) to `w`.
fn write_box(w: &mut dyn Write, t: &HostTensor, b: &LocalBox, elem: usize) -> std::io::Result<()> {
    let nd = t.shape.len();
    if nd == 0 {
        return w.write_all(&t.data);
    }
    let mut st = vec![1usize; nd];
    for d in (0..nd - 1).rev() {
        st[d] = st[d + 1] * t.shape[d + 1];
    }
    let sizes = &b.global.sizes;
    // Trailing dims the box holds whole are one contiguous run.
    let mut k = nd - 1;
    while k > 0 && sizes[k] == t.shape[k] {
        k -= 1;
    }
    let run = sizes[k..].iter().product::<usize>() * elem;
    let mut ix = vec![0usize; k];
    loop {
        let mut at = b.local_start[k] * st[k];
        for (d, &i) in ix.iter().enumerate() {
            at += (b.local_start[d] + i) * st[d];
        }
        w.write_all(&t.data[at * elem..at * elem + run])?;
        let mut d = k;
        loop {
            if d == 0 {
                return Ok(());
            }
            d -= 1;
            ix[d] += 1;
            if ix[d] < sizes[d] {
                break;
            }
            ix[d] = 0;
        }
    }
}

fn sync_dir(dir: &Path) {
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
}

/// Writes this rank's shards: `dir/__{rank}_0.distcp` (each chunk a `torch.save` archive of a
/// contiguous tensor) and `dir/__{rank}.metadata` (a pickled `Metadata` of them), each to a
/// temporary name, fsynced and renamed into place (data first), then fsyncs the directory.
/// Creates `dir` if needed and removes a stale `.metadata` (the directory is incomplete again
/// until [`commit`]).
///
/// A shard is written as the boxes of its runs ([`placement::chunks::shard_boxes`]: one for `S`
/// and `R`, several for a `_StridedShard` shard that is not one box). Replicas are written once:
/// the rank writes a tensor only if its coordinate is 0 on every mesh dim where the tensor is
/// `Replicate`. A rank with nothing to write still writes both files.
///
/// Errors (naming the key): `Partial`; placements that do not fit the mesh or the tensor;
/// `local.shape` not the local shape at this rank's coordinate ("expected [..], got [..]");
/// data length disagreeing with dtype and shape; a key given twice or named [`EXTRA_KEY`];
/// `rank >= mesh.size()`; I/O errors naming the path.
pub fn save_rank(dir: &Path, mesh: &DeviceMesh, rank: usize, shards: &[ShardToSave]) -> Result<()> {
    let coord = mesh
        .coordinate(rank)
        .map_err(|e| AdapterError::Placement(format!("save_rank: rank {rank}: {e}")))?;
    let mut seen = std::collections::BTreeSet::new();
    let mut planned: Vec<(&ShardToSave, Vec<LocalBox>, usize)> = Vec::new();
    for s in shards {
        let key = s.key;
        if !seen.insert(key) || key == EXTRA_KEY {
            return Err(AdapterError::Tensor(format!(
                "save_rank rank {rank}: tensor '{key}' {}",
                if key == EXTRA_KEY {
                    "uses the reserved name of the extra item"
                } else {
                    "given twice"
                }
            )));
        }
        if let Some(p) = s.placements.iter().find(|p| p.is_partial()) {
            return Err(AdapterError::Unsupported(format!(
                "save_rank rank {rank}: tensor '{key}' has placement {p} in {}: a Partial term is not the tensor's value; reduce it before saving",
                format_placements(s.placements)
            )));
        }
        let (ls, _) = shard_indices(key, s.global_shape, mesh, s.placements, &coord)?;
        if s.local.shape != ls.local_shape {
            return Err(AdapterError::Shape(format!(
                "save_rank rank {rank}: tensor '{key}': local shape expected {:?}, got {:?} (global shape {:?}, placements {} on mesh {:?}, coordinate {coord:?})",
                ls.local_shape,
                s.local.shape,
                s.global_shape,
                format_placements(s.placements),
                mesh.shape()
            )));
        }
        let elem = dtype_size(s.local.dtype)
            .map_err(|e| AdapterError::Tensor(format!("tensor '{key}': {e}")))?;
        if s.local.data.len() != s.local.numel() * elem {
            return Err(AdapterError::Tensor(format!(
                "save_rank rank {rank}: tensor '{key}': {} bytes for dtype {} and shape {:?}",
                s.local.data.len(),
                s.local.dtype,
                s.local.shape
            )));
        }
        metadata::torch_dtype_name(s.local.dtype).ok_or_else(|| {
            AdapterError::Tensor(format!(
                "tensor '{key}': dtype {} has no torch equivalent",
                s.local.dtype
            ))
        })?;
        if !saves_shard(s.placements, &coord) {
            continue;
        }
        planned.push((s, shard_boxes(&ls, s.global_shape), elem));
    }
    std::fs::create_dir_all(dir).map_err(|e| AdapterError::io(dir, e))?;
    let stale = dir.join(METADATA_FILE);
    if stale.exists() {
        std::fs::remove_file(&stale).map_err(|e| AdapterError::io(&stale, e))?;
    }
    let data_name = data_file_name(rank);
    let data_tmp = dir.join(format!(".{data_name}.tmp-{}", std::process::id()));
    let mut meta = TorchMetadata::default();
    let written = (|| -> Result<()> {
        let f = std::fs::File::create(&data_tmp).map_err(io_err(&data_tmp))?;
        let mut w = BufWriter::with_capacity(1 << 20, f);
        let mut n_items = 0u64;
        for (s, boxes, elem) in &planned {
            let mut chunks = Vec::with_capacity(boxes.len());
            for b in boxes {
                let offset = w.stream_position().map_err(io_err(&data_tmp))?;
                let bytes = (b.global.numel().unwrap_or(0) * elem) as u64;
                let id = format!("{rank:020}{n_items:020}");
                n_items += 1;
                let length = write_item(
                    &mut w,
                    s.local.dtype,
                    &b.global.sizes,
                    bytes,
                    &id,
                    &mut |out| write_box(out, s.local, b, *elem),
                )
                .map_err(io_err(&data_tmp))?;
                meta.storage.insert(
                    StorageIndex {
                        fqn: s.key.to_string(),
                        offset: Some(b.global.offsets.clone()),
                    },
                    StorageInfo {
                        relative_path: data_name.clone(),
                        offset,
                        length,
                        transforms: Vec::new(),
                    },
                );
                chunks.push(b.global.clone());
            }
            meta.items.insert(
                s.key.to_string(),
                Item::Tensor(TensorItem {
                    dtype: s.local.dtype,
                    size: s.global_shape.to_vec(),
                    chunks,
                }),
            );
        }
        let f = w
            .into_inner()
            .map_err(|e| AdapterError::io(&data_tmp, e.into_error()))?;
        f.sync_all().map_err(io_err(&data_tmp))
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(&data_tmp);
        return Err(e);
    }
    let rm_name = rank_metadata_name(rank);
    let pickled = metadata::write_metadata(&meta)
        .map_err(|e| AdapterError::Format(format!("{rm_name}: {e}")));
    let rm_tmp = match pickled.and_then(|b| write_tmp(dir, &rm_name, &b)) {
        Ok(p) => p,
        Err(e) => {
            let _ = std::fs::remove_file(&data_tmp);
            return Err(e);
        }
    };
    for (tmp, name) in [(&data_tmp, &data_name), (&rm_tmp, &rm_name)] {
        let fin = dir.join(name);
        std::fs::rename(tmp, &fin).map_err(|e| AdapterError::io(&fin, e))?;
    }
    sync_dir(dir);
    Ok(())
}

/// Writes `name` in `dir` through a temporary name (fsync, rename).
fn write_atomic(
    dir: &Path,
    name: &str,
    f: impl FnOnce(&mut std::fs::File) -> std::io::Result<()>,
) -> Result<PathBuf> {
    let fin = dir.join(name);
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let r = (|| {
        let mut file = std::fs::File::create(&tmp)?;
        f(&mut file)?;
        file.sync_all()
    })();
    if let Err(e) = r {
        let _ = std::fs::remove_file(&tmp);
        return Err(AdapterError::io(&tmp, e));
    }
    std::fs::rename(&tmp, &fin).map_err(|e| AdapterError::io(&fin, e))?;
    Ok(fin)
}

/// Called by ONE rank after every rank's [`save_rank`] returned (after a barrier): merges the
/// `world_size` rank metadata files `__{r}.metadata`, writes `extra` (any JSON: step, RNG state,
/// data position, ...) as the bytes item [`EXTRA_KEY`] in [`EXTRA_FILE`], checks the whole
/// checkpoint as [`super::open`] would, and writes `dir/.metadata` (temporary name, fsync, rename,
/// directory fsync). Until `.metadata` exists the checkpoint is incomplete.
///
/// Errors, each naming the directory and the file or key: `world_size` 0; a rank's metadata
/// missing (named, with the first tensor it leaves uncovered) or unreadable; ranks disagreeing on
/// a tensor's dtype or global shape; two ranks saving the same chunk; chunks that do not cover a
/// tensor exactly once; any check of [`super::open`] (data file sizes, items).
pub fn commit(dir: &Path, world_size: usize, extra: Value) -> Result<()> {
    let d = dir.display();
    if world_size == 0 {
        return Err(AdapterError::Format(format!("commit {d}: world_size is 0")));
    }
    let mut merged = TorchMetadata::default();
    let mut missing = Vec::new();
    let mut owner: BTreeMap<String, usize> = BTreeMap::new();
    for r in 0..world_size {
        let p = dir.join(rank_metadata_name(r));
        if !p.is_file() {
            missing.push(rank_metadata_name(r));
            continue;
        }
        let raw = std::fs::read(&p).map_err(|e| AdapterError::io(&p, e))?;
        let m = metadata::parse_metadata(&raw)
            .map_err(|e| AdapterError::Format(format!("{}: {e}", p.display())))?;
        for (fqn, item) in m.items {
            let Item::Tensor(t) = item else {
                return Err(AdapterError::Format(format!(
                    "commit {d}: {} holds a non-tensor item '{fqn}'",
                    rank_metadata_name(r)
                )));
            };
            match merged.items.get_mut(&fqn) {
                None => {
                    owner.insert(fqn.clone(), r);
                    merged.items.insert(fqn, Item::Tensor(t));
                }
                Some(Item::Tensor(have)) => {
                    if have.dtype != t.dtype || have.size != t.size {
                        return Err(AdapterError::Format(format!(
                            "commit {d}: tensor '{fqn}' is {} {:?} on rank {} but {} {:?} on rank {r}",
                            have.dtype, have.size, owner[&fqn], t.dtype, t.size
                        )));
                    }
                    have.chunks.extend(t.chunks);
                }
                Some(Item::Bytes) => unreachable!("ranks write tensors only"),
            }
        }
        for (k, s) in m.storage {
            if merged.storage.contains_key(&k) {
                return Err(AdapterError::Format(format!(
                    "commit {d}: two ranks saved the chunk of '{}' at offsets {:?} (overlapping chunks)",
                    k.fqn,
                    k.offset.unwrap_or_default()
                )));
            }
            merged.storage.insert(k, s);
        }
    }
    for (fqn, item) in &merged.items {
        if let Item::Tensor(t) = item {
            if let Some(p) = super::check::layout_problems(&t.size, &t.chunks).first() {
                let note = if missing.is_empty() {
                    String::new()
                } else {
                    format!(" (missing rank metadata: {})", missing.join(", "))
                };
                return Err(AdapterError::Format(format!(
                    "commit {d}: tensor '{fqn}': {p}{note}"
                )));
            }
        }
    }
    if !missing.is_empty() {
        return Err(AdapterError::Format(format!(
            "commit {d}: missing rank metadata {} (those ranks did not finish their save)",
            missing.join(", ")
        )));
    }
    let text = serde_json::to_string(&extra)
        .map_err(|e| AdapterError::Format(format!("commit {d}: extra: {e}")))?;
    let mut length = 0u64;
    write_atomic(dir, EXTRA_FILE, |f| {
        let mut w = BufWriter::new(f);
        length = write_str_item(&mut w, &text, &format!("{:040}", 0))?;
        w.flush()
    })?;
    merged.items.insert(EXTRA_KEY.to_string(), Item::Bytes);
    merged.storage.insert(
        StorageIndex {
            fqn: EXTRA_KEY.to_string(),
            offset: None,
        },
        StorageInfo {
            relative_path: EXTRA_FILE.to_string(),
            offset: 0,
            length,
            transforms: Vec::new(),
        },
    );
    merged.version = Some("1.0.0".to_string());
    // Check everything as a reader will before the commit marker exists.
    let ck = from_metadata(dir, merged.clone())?;
    for k in ck.keys() {
        if let Some(p) = ck.problems(&k)?.first() {
            return Err(AdapterError::Format(format!(
                "commit {d}: tensor '{k}': {p}"
            )));
        }
    }
    let bytes = metadata::write_metadata(&merged)
        .map_err(|e| AdapterError::Format(format!("commit {d}: {e}")))?;
    write_atomic(dir, METADATA_FILE, |f| f.write_all(&bytes))?;
    sync_dir(dir);
    Ok(())
}

/// The `extra` JSON of a checkpoint written by [`commit`] (`None` when it has no readable one).
pub(crate) fn read_extra(ck: &DcpCheckpoint) -> Option<Value> {
    let b = ck.bytes_items().get(EXTRA_KEY)?;
    if b.problem.is_some() {
        return None;
    }
    let fi = ck.file_named(&b.file)?;
    let data = ck.file_bytes(fi);
    let item = data.get(b.offset as usize..(b.offset + b.length) as usize)?;
    let s = read_str_item(item).ok()?;
    serde_json::from_str(&s).ok()
}
