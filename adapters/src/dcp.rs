//! Distributed checkpoint in the spirit of torch DCP (`torch.distributed.checkpoint`): every rank
//! writes its own shards to its own file, one rank then writes a `.metadata` file with each
//! tensor's global shape, dtype and the index ranges every saved chunk holds, and a load reshards:
//! any rank of any mesh with any (non-`Partial`) placements reads exactly the bytes of its local
//! shard from the chunks that overlap it.
//!
//! Nothing here communicates (the caller runs the barrier between [`save_rank`] on every rank and
//! [`commit`] on one rank with its own communicator) and nothing changes dtype (bytes are copied as
//! they are; a [`HostTensor`] keeps its dtype).
//!
//! # Layout of a checkpoint directory (`step_dir(root, N)` = `root/step_{N:08}`)
//!
//! | file | written by | content |
//! |---|---|---|
//! | `__{rank}_0.distcp.safetensors` | [`save_rank`] of `rank` | safetensors, tensor name = key, the rank's local data in its local order |
//! | `__{rank}_0.manifest.json` | [`save_rank`] of `rank` | [`RankManifest`]: per key dtype, global shape, placements, mesh shape, index runs |
//! | `.metadata` | [`commit`], last | [`DcpMetadata`]: format version, world size, mesh shape, every rank file with its byte size, per key dtype + global shape + chunks `{file, runs}`, the caller's `extra` JSON |
//!
//! The data file names follow DCP's `FileSystemWriter` (`torch/distributed/checkpoint/filesystem.py`:
//! prefix `__{rank}_`, file counter, suffix `.distcp`) with `.safetensors` appended because the
//! payload is a safetensors file rather than DCP's pickled/raw byte stream. `.metadata` is the
//! commit marker as in DCP (`filesystem.py` writes `.metadata` in `finish`, after every rank's
//! `write_data`): a directory without it is an incomplete save and [`open`] refuses it.
//!
//! # Chunks and index runs
//!
//! DCP's `metadata.py` describes a saved chunk as a box (`ChunkStorageMetadata(offsets, sizes)`).
//! A `_StridedShard` shard is not a box, so a chunk here is the cartesian product of one index set
//! per tensor dim, each written as runs `[[start, end), ...]` in the rank's LOCAL order
//! (`placement::IndexSet::runs`, from `placement::local_shard`): the chunk's data in the file is
//! the row-major tensor of shape `[len(set_0), len(set_1), ...]` whose element `(i_0, i_1, ...)` is
//! global element `(set_0[i_0], set_1[i_1], ...)`. A plain `S(d)` chunk has one run per dim (the DCP
//! box `offsets = starts, sizes = lengths`).
//!
//! # Replicas
//!
//! A replicated shard is written once, as DCP's `dedup_save_plans(..., save_to_lowest_rank=True)`
//! (`torch/distributed/checkpoint/_dedup_save_plans.py`) does: rank `r` writes a tensor only if its
//! mesh coordinate is 0 on every mesh dim where the tensor is `Replicate` (the lowest rank of its
//! replica group). The rule is local, so no rank needs the other ranks' plans. `Partial` placements
//! are refused: a partial term is not the tensor's value (reduce before saving).
//!
//! # Checks
//!
//! [`commit`] and [`open`] both check that the chunks of each tensor cover every element of the
//! global shape exactly once (no gap, no overlap), that every chunk's runs lie inside the global
//! shape, and (open) that each rank file has the byte size `.metadata` records, a valid safetensors
//! header (the checks of [`crate::checkpoint`]) and, for each chunk, a tensor of the chunk's key
//! with the recorded dtype and the shape of the chunk's index sets. Errors are [`AdapterError`]s,
//! one line naming the directory or file and the key.
//!
//! # Example
//!
//! ```
//! use adapters::dcp::{self, ShardToSave};
//! use adapters::{Dtype, HostTensor};
//! use placement::{local_shard, parse_placements, DeviceMesh, Placement};
//!
//! let root = tempfile::tempdir().unwrap();
//! let dir = dcp::step_dir(root.path(), 100); // root/step_00000100
//! // Save: mesh [2, 2], packed gate|up [E=4, H=3, 2I=8] as [S(0), _S(2, 2)]; every rank calls
//! // save_rank for its own shards (here a loop stands for the 4 ranks).
//! let mesh = DeviceMesh::new(vec![2, 2]).unwrap();
//! let placements = parse_placements("[S(0), _S(2, 2)]").unwrap();
//! let global = [4, 3, 8];
//! for rank in 0..4 {
//!     let coord = mesh.coordinate(rank).unwrap();
//!     let shape = local_shard(&global, &mesh, &placements, &coord).unwrap().local_shape;
//!     let n: usize = shape.iter().product();
//!     let local = HostTensor::new(Dtype::BF16, shape, vec![rank as u8; 2 * n])?;
//!     let shard = ShardToSave { key: "w", local: &local, global_shape: &global, placements: &placements };
//!     dcp::save_rank(&dir, &mesh, rank, &[shard])?;
//! }
//! // After a barrier, one rank commits (writes .metadata last).
//! dcp::commit(&dir, 4, serde_json::json!({"step": 100}))?;
//!
//! // Load on another layout: mesh [2] with S(1) (rank 1 holds index 2 of dim 1).
//! let (step, latest) = dcp::latest_complete(root.path())?.unwrap();
//! let ck = dcp::open(&latest)?;
//! assert_eq!((step, ck.extra()["step"].as_u64()), (100, Some(100)));
//! let m2 = DeviceMesh::new(vec![2]).unwrap();
//! let t = ck.read_local("w", &m2, &[Placement::Shard(1)], 1)?;
//! assert_eq!((t.dtype, t.shape.clone()), (Dtype::BF16, vec![4, 1, 8]));
//! // Columns 0..2 and 4..6 of every row came from ranks (., 0), the others from ranks (., 1).
//! assert_eq!(t.data[..16], [0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1]);
//! # Ok::<(), adapters::AdapterError>(())
//! ```

use crate::checkpoint::{map_file, parse_header};
use crate::error::{AdapterError, Result};
use crate::local::shard_indices;
use crate::tensor::{checked_numel, dtype_size, for_each_index, strides, HostTensor};
use crate::writer::write_tmp;
use memmap2::Mmap;
use placement::{format_placements, DeviceMesh, IndexSet, Placement};
use safetensors::Dtype;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::ops::Range;
use std::path::{Path, PathBuf};

/// Version of the manifest and `.metadata` JSON written by this module.
pub const FORMAT_VERSION: u32 = 1;
/// `format` field of a [`RankManifest`].
pub const MANIFEST_FORMAT: &str = "adapters-dcp-rank-manifest";
/// `format` field of [`DcpMetadata`].
pub const METADATA_FORMAT: &str = "adapters-dcp";
/// Name of the commit marker / global metadata file (as DCP's `.metadata`).
pub const METADATA_FILE: &str = ".metadata";

/// Per dim, the runs `[start, end)` of global indices a chunk holds, in the chunk's local order.
pub type Runs = Vec<Vec<[usize; 2]>>;

/// `__{rank}_0.distcp.safetensors`: the data file of `rank` (DCP's `__{rank}_{n}.distcp`, one file
/// per rank so `n = 0`, plus `.safetensors` for the payload format).
pub fn data_file_name(rank: usize) -> String {
    format!("__{rank}_0.distcp.safetensors")
}

/// `__{rank}_0.manifest.json`: the [`RankManifest`] of `rank`.
pub fn manifest_file_name(rank: usize) -> String {
    format!("__{rank}_0.manifest.json")
}

/// `root/step_{step:08}`: the directory of the checkpoint of training step `step`.
pub fn step_dir(root: &Path, step: u64) -> PathBuf {
    root.join(format!("step_{step:08}"))
}

/// One tensor of this rank: its key, local data, global shape and the placements on `mesh`.
///
/// `local.shape` must be the local shape `placement::local_shard` gives for `global_shape`,
/// `placements` (one per mesh dim, no `Partial`) and the rank's mesh coordinate.
#[derive(Debug, Clone, Copy)]
pub struct ShardToSave<'a> {
    /// Tensor key (state-dict FQN); the tensor name inside the safetensors file.
    pub key: &'a str,
    /// This rank's local shard, in its local order, in the dtype it is saved (and loaded) in.
    pub local: &'a HostTensor,
    /// Shape of the whole tensor.
    pub global_shape: &'a [usize],
    /// One placement per dim of the save mesh (`S(d)`, `_S(d, sf)`, `R`; never `P`).
    pub placements: &'a [Placement],
}

/// What one rank saved of one key (an entry of [`RankManifest::tensors`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestEntry {
    /// Element type (safetensors name: `BF16`, `F32`, ...).
    pub dtype: Dtype,
    /// Shape of the whole tensor.
    pub global_shape: Vec<usize>,
    /// Placements on the save mesh, each as torch's `str()` prints it (`S(0)`, `_S(2, 2)`, `R`).
    pub placements: Vec<Placement>,
    /// Shape of the save mesh.
    pub mesh_shape: Vec<usize>,
    /// Per tensor dim, the runs `[start, end)` of global indices this file holds, local order.
    pub runs: Runs,
}

/// `__{rank}_0.manifest.json`: what [`save_rank`] wrote for one rank.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RankManifest {
    /// Always [`MANIFEST_FORMAT`].
    pub format: String,
    /// [`FORMAT_VERSION`] of the writer.
    pub version: u32,
    /// Rank (row-major index in the mesh, `DeviceMesh::coordinate`).
    pub rank: usize,
    /// Shape of the save mesh.
    pub mesh_shape: Vec<usize>,
    /// The data file ([`data_file_name`] of `rank`), relative to the checkpoint directory.
    pub file: String,
    /// Keys this rank wrote (replicas it skipped are absent), sorted.
    pub tensors: BTreeMap<String, ManifestEntry>,
}

/// One saved chunk of a tensor (an entry of [`TensorMeta::chunks`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkMeta {
    /// Data file holding it (tensor name in the file = the key).
    pub file: String,
    /// Per tensor dim, runs `[start, end)` of global indices, in the chunk's local order.
    pub runs: Runs,
}

/// A tensor of the checkpoint (as DCP's `TensorStorageMetadata`: properties, size, chunks).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TensorMeta {
    /// Element type.
    pub dtype: Dtype,
    /// Shape of the whole tensor.
    pub global_shape: Vec<usize>,
    /// Saved chunks; together they cover every element exactly once.
    pub chunks: Vec<ChunkMeta>,
}

/// A rank data file and its size in bytes (a shorter or longer file is refused on open).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileMeta {
    /// File name relative to the checkpoint directory.
    pub file: String,
    /// Rank that wrote it.
    pub rank: usize,
    /// Size in bytes when committed.
    pub bytes: u64,
}

/// The `.metadata` file (JSON), written last by [`commit`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DcpMetadata {
    /// Always [`METADATA_FORMAT`].
    pub format: String,
    /// [`FORMAT_VERSION`] of the writer.
    pub version: u32,
    /// Number of ranks that saved (= product of `mesh_shape`).
    pub world_size: usize,
    /// Shape of the save mesh.
    pub mesh_shape: Vec<usize>,
    /// Every rank's data file, rank order.
    pub files: Vec<FileMeta>,
    /// Per key: dtype, global shape, chunks.
    pub tensors: BTreeMap<String, TensorMeta>,
    /// The caller's JSON (step, RNG state, data position, ...), as given to [`commit`].
    pub extra: Value,
}

fn fmt_err(msg: String) -> AdapterError {
    AdapterError::Format(msg)
}

fn to_runs(sets: &[IndexSet]) -> Runs {
    sets.iter()
        .map(|s| s.runs().iter().map(|r| [r.start, r.end]).collect())
        .collect()
}

/// Validates runs against `global_shape` (one list per dim, non-empty runs inside the dim, no
/// index twice within a dim) and returns the index sets. `what` prefixes errors.
fn runs_to_sets(what: &str, global_shape: &[usize], runs: &Runs) -> Result<Vec<IndexSet>> {
    if runs.len() != global_shape.len() {
        return Err(fmt_err(format!(
            "{what}: {} run lists for a {}-d tensor of global shape {global_shape:?}",
            runs.len(),
            global_shape.len()
        )));
    }
    let mut sets = Vec::with_capacity(runs.len());
    for (d, (rs, &n)) in runs.iter().zip(global_shape).enumerate() {
        let mut sorted: Vec<Range<usize>> = Vec::with_capacity(rs.len());
        for &[s, e] in rs {
            if s >= e || e > n {
                return Err(fmt_err(format!(
                    "{what}: run [{s}, {e}) of dim {d} is empty or outside 0..{n} (global shape {global_shape:?})"
                )));
            }
            sorted.push(s..e);
        }
        sorted.sort_by_key(|r| r.start);
        for w in sorted.windows(2) {
            if w[1].start < w[0].end {
                return Err(fmt_err(format!(
                    "{what}: runs [{}, {}) and [{}, {}) of dim {d} overlap",
                    w[0].start, w[0].end, w[1].start, w[1].end
                )));
            }
        }
        sets.push(IndexSet::from_runs(rs.iter().map(|&[s, e]| s..e).collect()));
    }
    Ok(sets)
}

/// Sorted runs of each dim of a chunk (for intersection tests).
fn sorted_runs(sets: &[IndexSet]) -> Vec<Vec<Range<usize>>> {
    sets.iter()
        .map(|s| {
            let mut v = s.runs().to_vec();
            v.sort_by_key(|r| r.start);
            v
        })
        .collect()
}

/// First common index of two sorted, disjoint-run lists.
fn first_common(a: &[Range<usize>], b: &[Range<usize>]) -> Option<usize> {
    let (mut i, mut j) = (0, 0);
    while i < a.len() && j < b.len() {
        let lo = a[i].start.max(b[j].start);
        let hi = a[i].end.min(b[j].end);
        if lo < hi {
            return Some(lo);
        }
        if a[i].end <= b[j].end {
            i += 1;
        } else {
            j += 1;
        }
    }
    None
}

/// Checks that chunks (label, index sets) cover `global_shape` exactly once: pairwise disjoint
/// (sweep over dim-0 extents, then a per-dim run intersection) and total volume = numel.
/// `missing_note` is appended to a coverage error (e.g. the rank manifests that were absent).
fn check_cover(
    what: &str,
    global_shape: &[usize],
    chunks: &[(&str, Vec<IndexSet>)],
    missing_note: &str,
) -> Result<()> {
    let numel = checked_numel(global_shape)
        .ok_or_else(|| fmt_err(format!("{what}: global shape {global_shape:?} overflows")))?
        as u128;
    let vol = |sets: &Vec<IndexSet>| sets.iter().map(|s| s.len() as u128).product::<u128>();
    let nonempty: Vec<(&str, Vec<Vec<Range<usize>>>)> = chunks
        .iter()
        .filter(|(_, s)| vol(s) > 0)
        .map(|(l, s)| (*l, sorted_runs(s)))
        .collect();
    // Sweep and prune on the dim-0 extent (0-d tensors: every chunk holds the one element).
    let extent = |r: &Vec<Vec<Range<usize>>>| match r.first() {
        Some(d0) => (
            d0.first().map_or(0, |x| x.start),
            d0.last().map_or(0, |x| x.end),
        ),
        None => (0, 1),
    };
    let mut order: Vec<usize> = (0..nonempty.len()).collect();
    order.sort_by_key(|&i| extent(&nonempty[i].1).0);
    for (oi, &i) in order.iter().enumerate() {
        let (_, end_i) = extent(&nonempty[i].1);
        for &j in &order[oi + 1..] {
            if extent(&nonempty[j].1).0 >= end_i {
                break;
            }
            let (a, b) = (&nonempty[i].1, &nonempty[j].1);
            let common: Option<Vec<usize>> =
                a.iter().zip(b).map(|(x, y)| first_common(x, y)).collect();
            if let Some(idx) = common {
                return Err(fmt_err(format!(
                    "{what}: chunks in {} and {} overlap (both hold element {idx:?} of global shape {global_shape:?})",
                    nonempty[i].0, nonempty[j].0
                )));
            }
        }
    }
    let total: u128 = chunks.iter().map(|(_, s)| vol(s)).sum();
    if total != numel {
        return Err(fmt_err(format!(
            "{what}: saved chunks hold {total} of the {numel} elements of global shape {global_shape:?} (not covered){missing_note}"
        )));
    }
    Ok(())
}

/// Writes this rank's shards: `dir/__{rank}_0.distcp.safetensors` (safetensors; tensor names =
/// keys; `__metadata__ = {"format": "pt"}`) and `dir/__{rank}_0.manifest.json` ([`RankManifest`]),
/// each written to a temporary name, fsynced and renamed into place (data file first, manifest
/// second, then the directory is fsynced). Creates `dir` if needed and removes a stale `.metadata`
/// left there by an earlier save (the directory is incomplete again until [`commit`]).
///
/// Replicas are written once (module docs, DCP `_dedup_save_plans.py`): the rank writes a tensor only
/// if its coordinate is 0 on every mesh dim where the tensor is `Replicate`. A rank with nothing to
/// write still writes both files (an empty safetensors file and a manifest without tensors), so
/// [`commit`] can tell a finished rank from a missing one. Empty shards (a dim smaller than the
/// mesh) are written as zero-element tensors.
///
/// `rank` is the rank's row-major index in `mesh` (`DeviceMesh::coordinate`).
///
/// Errors (naming the key): `Partial` placement; placements that do not fit the mesh or the
/// tensor (`placement::local_shard`); `local.shape` differs from the local shape of `global_shape`
/// at this rank's coordinate ("expected [..], got [..]"); `local.data` length disagrees with dtype
/// and shape; a key given twice; `rank >= mesh.size()`; I/O errors naming the path.
pub fn save_rank(
    dir: &Path,
    mesh: &DeviceMesh,
    rank: usize,
    shards: &[ShardToSave],
) -> Result<RankManifest> {
    let coord = mesh
        .coordinate(rank)
        .map_err(|e| AdapterError::Placement(format!("save_rank: rank {rank}: {e}")))?;
    let mut tensors = BTreeMap::new();
    let mut items: Vec<(&str, &HostTensor)> = Vec::new();
    let mut seen = std::collections::BTreeSet::new();
    for s in shards {
        let key = s.key;
        if !seen.insert(key) {
            return Err(AdapterError::Tensor(format!(
                "save_rank rank {rank}: tensor '{key}' given twice"
            )));
        }
        if let Some(p) = s.placements.iter().find(|p| p.is_partial()) {
            return Err(AdapterError::Unsupported(format!(
                "save_rank rank {rank}: tensor '{key}' has placement {p} in {}: a Partial term is not the tensor's value; reduce it before saving",
                format_placements(s.placements)
            )));
        }
        let (ls, sets) = shard_indices(key, s.global_shape, mesh, s.placements, &coord)?;
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
        let replica_copy = s
            .placements
            .iter()
            .zip(&coord)
            .any(|(p, &c)| p.is_replicate() && c != 0);
        if replica_copy {
            continue;
        }
        tensors.insert(
            key.to_string(),
            ManifestEntry {
                dtype: s.local.dtype,
                global_shape: s.global_shape.to_vec(),
                placements: s.placements.to_vec(),
                mesh_shape: mesh.shape().to_vec(),
                runs: to_runs(&sets),
            },
        );
        items.push((key, s.local));
    }
    let manifest = RankManifest {
        format: MANIFEST_FORMAT.to_string(),
        version: FORMAT_VERSION,
        rank,
        mesh_shape: mesh.shape().to_vec(),
        file: data_file_name(rank),
        tensors,
    };
    std::fs::create_dir_all(dir).map_err(|e| AdapterError::io(dir, e))?;
    let stale = dir.join(METADATA_FILE);
    if stale.exists() {
        std::fs::remove_file(&stale).map_err(|e| AdapterError::io(&stale, e))?;
    }
    let data_name = data_file_name(rank);
    let data_tmp = dir.join(format!(".{data_name}.tmp-{}", std::process::id()));
    if let Err(e) = write_safetensors(&data_tmp, &items) {
        let _ = std::fs::remove_file(&data_tmp);
        return Err(e);
    }
    let man_name = manifest_file_name(rank);
    let json = serde_json::to_string(&manifest).map_err(|e| fmt_err(format!("{man_name}: {e}")))?;
    let man_tmp = match write_tmp(dir, &man_name, format!("{json}\n").as_bytes()) {
        Ok(p) => p,
        Err(e) => {
            let _ = std::fs::remove_file(&data_tmp);
            return Err(e);
        }
    };
    for (tmp, name) in [(&data_tmp, &data_name), (&man_tmp, &man_name)] {
        let fin = dir.join(name);
        std::fs::rename(tmp, &fin).map_err(|e| AdapterError::io(&fin, e))?;
    }
    sync_dir(dir);
    Ok(manifest)
}

/// Streams a safetensors file to `path` (header, then each tensor's bytes straight from the
/// [`HostTensor`]s, no staging copy) and fsyncs it. Tensors are laid out by element size (largest
/// first), then key, so each tensor's data is aligned to its element size (the header is padded
/// with spaces to a multiple of 8 bytes, as the safetensors crate does);
/// `__metadata__ = {"format": "pt"}`.
fn write_safetensors(path: &Path, items: &[(&str, &HostTensor)]) -> Result<()> {
    let mut order: Vec<&(&str, &HostTensor)> = items.iter().collect();
    order.sort_by(|a, b| {
        b.1.element_size()
            .cmp(&a.1.element_size())
            .then(a.0.cmp(b.0))
    });
    let mut header = serde_json::Map::new();
    header.insert(
        "__metadata__".to_string(),
        serde_json::json!({"format": "pt"}),
    );
    let mut off = 0usize;
    for (k, t) in &order {
        let end = off + t.data.len();
        header.insert(
            (*k).to_string(),
            serde_json::json!({"dtype": t.dtype, "shape": t.shape, "data_offsets": [off, end]}),
        );
        off = end;
    }
    let mut hdr = serde_json::to_vec(&Value::Object(header))
        .map_err(|e| fmt_err(format!("{}: header: {e}", path.display())))?;
    hdr.resize(hdr.len().div_ceil(8) * 8, b' ');
    let io = |e| AdapterError::io(path, e);
    let f = std::fs::File::create(path).map_err(io)?;
    let mut w = std::io::BufWriter::with_capacity(1 << 20, &f);
    w.write_all(&(hdr.len() as u64).to_le_bytes()).map_err(io)?;
    w.write_all(&hdr).map_err(io)?;
    for (_, t) in &order {
        w.write_all(&t.data).map_err(io)?;
    }
    w.flush().map_err(io)?;
    drop(w);
    f.sync_all().map_err(io)
}

fn sync_dir(dir: &Path) {
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
}

fn read_manifest(path: &Path, rank: usize) -> Result<RankManifest> {
    let s = std::fs::read_to_string(path).map_err(|e| AdapterError::io(path, e))?;
    let m: RankManifest = serde_json::from_str(&s).map_err(|e| {
        fmt_err(format!(
            "{}: not a valid rank manifest: {e}",
            path.display()
        ))
    })?;
    if m.format != MANIFEST_FORMAT || m.version != FORMAT_VERSION {
        return Err(fmt_err(format!(
            "{}: format '{}' version {} (expected '{MANIFEST_FORMAT}' version {FORMAT_VERSION})",
            path.display(),
            m.format,
            m.version
        )));
    }
    if m.rank != rank || m.file != data_file_name(rank) {
        return Err(fmt_err(format!(
            "{}: manifest of rank {} for file '{}' (expected rank {rank}, file '{}')",
            path.display(),
            m.rank,
            m.file,
            data_file_name(rank)
        )));
    }
    Ok(m)
}

/// Called by ONE rank after every rank's [`save_rank`] returned (after a barrier): reads the
/// `world_size` manifests `__{r}_0.manifest.json`, checks them, and writes `dir/.metadata`
/// ([`DcpMetadata`], with `extra` stored as given) via temporary name + fsync + rename, then
/// fsyncs the directory. Until `.metadata` exists the checkpoint is incomplete (DCP
/// `filesystem.py`: `.metadata` is written in `finish`, after all data).
///
/// Checks, each an error naming the directory and file or key: every manifest parses, has this
/// format version and its own rank and file name; all manifests have the same mesh shape, whose
/// product is `world_size`; all ranks agree on each key's global shape and dtype; each entry's runs
/// are what `placement::local_shard` gives for its placements, the mesh and the rank's coordinate;
/// the chunks of each key cover every element exactly once (an uncovered key is named, with the
/// missing manifests if any); a missing manifest is an error even when the others cover
/// everything; finally the whole checkpoint is verified as [`open`] would (data file sizes and
/// headers, chunk dtypes and shapes) before `.metadata` is written.
pub fn commit(dir: &Path, world_size: usize, extra: Value) -> Result<()> {
    let d = dir.display();
    if world_size == 0 {
        return Err(fmt_err(format!("commit {d}: world_size is 0")));
    }
    let mut manifests: Vec<RankManifest> = Vec::new();
    let mut missing: Vec<String> = Vec::new();
    for r in 0..world_size {
        let p = dir.join(manifest_file_name(r));
        if p.is_file() {
            manifests.push(read_manifest(&p, r)?);
        } else {
            missing.push(manifest_file_name(r));
        }
    }
    let missing_note = if missing.is_empty() {
        String::new()
    } else {
        format!("; missing rank manifests: {}", missing.join(", "))
    };
    let mesh_shape = match manifests.first() {
        Some(m) => m.mesh_shape.clone(),
        None => {
            return Err(fmt_err(format!(
                "commit {d}: no rank manifest found (expected {} .. {})",
                manifest_file_name(0),
                manifest_file_name(world_size - 1)
            )))
        }
    };
    let mesh = DeviceMesh::new(mesh_shape.clone()).map_err(|e| {
        fmt_err(format!(
            "commit {d}: {}: mesh shape {mesh_shape:?}: {e}",
            manifest_file_name(manifests[0].rank)
        ))
    })?;
    if mesh.size() != world_size {
        return Err(fmt_err(format!(
            "commit {d}: mesh shape {mesh_shape:?} has {} ranks but world_size is {world_size}",
            mesh.size()
        )));
    }
    let mut tensors: BTreeMap<String, TensorMeta> = BTreeMap::new();
    let mut first_file: BTreeMap<String, String> = BTreeMap::new();
    for m in &manifests {
        let mf = manifest_file_name(m.rank);
        if m.mesh_shape != mesh_shape {
            return Err(fmt_err(format!(
                "commit {d}: {mf} has mesh shape {:?} but {} has {mesh_shape:?}",
                m.mesh_shape,
                manifest_file_name(manifests[0].rank)
            )));
        }
        let coord = mesh
            .coordinate(m.rank)
            .map_err(|e| fmt_err(format!("commit {d}: {mf}: {e}")))?;
        for (key, en) in &m.tensors {
            let what = format!("commit {d}: {mf}: tensor '{key}'");
            if en.mesh_shape != mesh_shape {
                return Err(fmt_err(format!(
                    "{what}: mesh shape {:?} but the manifest's is {mesh_shape:?}",
                    en.mesh_shape
                )));
            }
            let sets = runs_to_sets(&what, &en.global_shape, &en.runs)?;
            let (_, want) = shard_indices(key, &en.global_shape, &mesh, &en.placements, &coord)
                .map_err(|e| fmt_err(format!("{what}: {e}")))?;
            if sets != want {
                return Err(fmt_err(format!(
                    "{what}: runs {:?} are not what placements {} give at coordinate {coord:?} ({:?})",
                    en.runs,
                    format_placements(&en.placements),
                    to_runs(&want)
                )));
            }
            match tensors.get_mut(key) {
                Some(t) => {
                    if t.dtype != en.dtype || t.global_shape != en.global_shape {
                        return Err(fmt_err(format!(
                            "{what}: dtype {} global shape {:?} but {} has dtype {} global shape {:?}",
                            en.dtype, en.global_shape, first_file[key], t.dtype, t.global_shape
                        )));
                    }
                    t.chunks.push(ChunkMeta {
                        file: m.file.clone(),
                        runs: en.runs.clone(),
                    });
                }
                None => {
                    first_file.insert(key.clone(), mf.clone());
                    tensors.insert(
                        key.clone(),
                        TensorMeta {
                            dtype: en.dtype,
                            global_shape: en.global_shape.clone(),
                            chunks: vec![ChunkMeta {
                                file: m.file.clone(),
                                runs: en.runs.clone(),
                            }],
                        },
                    );
                }
            }
        }
    }
    for (key, t) in &tensors {
        let what = format!("commit {d}: tensor '{key}'");
        let chunks: Vec<(&str, Vec<IndexSet>)> = t
            .chunks
            .iter()
            .map(|c| {
                Ok((
                    c.file.as_str(),
                    runs_to_sets(&what, &t.global_shape, &c.runs)?,
                ))
            })
            .collect::<Result<_>>()?;
        check_cover(&what, &t.global_shape, &chunks, &missing_note)?;
    }
    if !missing.is_empty() {
        return Err(fmt_err(format!(
            "commit {d}: missing rank manifests: {} (a rank's save_rank did not finish)",
            missing.join(", ")
        )));
    }
    let mut files = Vec::with_capacity(world_size);
    for r in 0..world_size {
        let name = data_file_name(r);
        let p = dir.join(&name);
        let meta = std::fs::metadata(&p).map_err(|e| AdapterError::io(&p, e))?;
        files.push(FileMeta {
            file: name,
            rank: r,
            bytes: meta.len(),
        });
    }
    let meta = DcpMetadata {
        format: METADATA_FORMAT.to_string(),
        version: FORMAT_VERSION,
        world_size,
        mesh_shape,
        files,
        tensors,
        extra,
    };
    // Everything open() checks, before the marker exists.
    DcpCheckpoint::from_metadata(dir, meta.clone())?;
    let json = serde_json::to_string(&meta)
        .map_err(|e| fmt_err(format!("commit {d}: {METADATA_FILE}: {e}")))?;
    let tmp = write_tmp(dir, METADATA_FILE, format!("{json}\n").as_bytes())?;
    let fin = dir.join(METADATA_FILE);
    std::fs::rename(&tmp, &fin).map_err(|e| AdapterError::io(&fin, e))?;
    sync_dir(dir);
    Ok(())
}

/// Per tensor name of one rank file: dtype, shape, absolute byte offset of its data.
type FileEntries = HashMap<String, (Dtype, Vec<usize>, usize)>;

/// A saved chunk located in its mmapped file.
#[derive(Debug)]
struct Chunk {
    file: usize,
    sets: Vec<IndexSet>,
    /// Absolute byte offset of the chunk's data in the file.
    start: usize,
}

#[derive(Debug)]
struct LoadedTensor {
    chunks: Vec<Chunk>,
    elem: usize,
}

/// A committed, validated distributed checkpoint, its rank files memory-mapped (see the module
/// docs for the checks [`open`] runs).
#[derive(Debug)]
pub struct DcpCheckpoint {
    dir: PathBuf,
    meta: DcpMetadata,
    files: Vec<(PathBuf, Mmap)>,
    tensors: BTreeMap<String, LoadedTensor>,
}

/// Opens a committed checkpoint: parses `.metadata`, maps every rank file it lists and checks
/// them (module docs).
///
/// Errors (one line naming the path): `.metadata` missing -> `incomplete checkpoint DIR: no
/// .metadata (a save did not finish)`; `.metadata` not valid JSON / not this format or version; a
/// listed rank file missing (`rank file PATH listed in .metadata is missing`) or of another size
/// than recorded ("truncated or rewritten"); a malformed safetensors header; a chunk whose tensor
/// is absent from its file or has another dtype or shape; chunks that do not cover a tensor
/// exactly once.
pub fn open(dir: &Path) -> Result<DcpCheckpoint> {
    let mp = dir.join(METADATA_FILE);
    if !mp.is_file() {
        return Err(fmt_err(format!(
            "incomplete checkpoint {}: no {METADATA_FILE} (a save did not finish)",
            dir.display()
        )));
    }
    let s = std::fs::read_to_string(&mp).map_err(|e| AdapterError::io(&mp, e))?;
    let meta: DcpMetadata = serde_json::from_str(&s)
        .map_err(|e| fmt_err(format!("{}: not valid dcp metadata: {e}", mp.display())))?;
    if meta.format != METADATA_FORMAT || meta.version != FORMAT_VERSION {
        return Err(fmt_err(format!(
            "{}: format '{}' version {} (expected '{METADATA_FORMAT}' version {FORMAT_VERSION})",
            mp.display(),
            meta.format,
            meta.version
        )));
    }
    DcpCheckpoint::from_metadata(dir, meta)
}

/// Per dim of a read: segments `(dst_pos, src_pos, len)` where the target's and the chunk's index
/// sets hold the same global indices (positions are local to each).
fn overlap_segments(target: &IndexSet, chunk: &IndexSet) -> Vec<(usize, usize, usize)> {
    let mut out = Vec::new();
    let mut tpos = 0usize;
    for tr in target.runs() {
        let mut cpos = 0usize;
        for cr in chunk.runs() {
            let lo = tr.start.max(cr.start);
            let hi = tr.end.min(cr.end);
            if lo < hi {
                out.push((tpos + lo - tr.start, cpos + lo - cr.start, hi - lo));
            }
            cpos += cr.end - cr.start;
        }
        tpos += tr.end - tr.start;
    }
    out
}

impl DcpCheckpoint {
    /// Maps and checks every file and chunk of `meta` (shared by [`open`] and [`commit`]).
    fn from_metadata(dir: &Path, meta: DcpMetadata) -> Result<DcpCheckpoint> {
        let d = dir.display();
        let mut files = Vec::with_capacity(meta.files.len());
        let mut by_name: HashMap<&str, usize> = HashMap::new();
        let mut entries: Vec<FileEntries> = Vec::new();
        for f in &meta.files {
            let n = f.file.as_str();
            if n.is_empty() || n.contains('/') || n.contains('\\') || n == "." || n == ".." {
                return Err(fmt_err(format!(
                    "{d}/{METADATA_FILE}: file entry '{n}' is not a plain file name"
                )));
            }
            if by_name.insert(n, files.len()).is_some() {
                return Err(fmt_err(format!(
                    "{d}/{METADATA_FILE}: file '{n}' listed twice"
                )));
            }
            let p = dir.join(n);
            if !p.is_file() {
                return Err(fmt_err(format!(
                    "rank file {} listed in {METADATA_FILE} is missing",
                    p.display()
                )));
            }
            let len = std::fs::metadata(&p)
                .map_err(|e| AdapterError::io(&p, e))?
                .len();
            if len != f.bytes {
                return Err(fmt_err(format!(
                    "rank file {}: {len} bytes but {METADATA_FILE} records {} (truncated or rewritten)",
                    p.display(),
                    f.bytes
                )));
            }
            let mmap = map_file(&p)?;
            let (hdr, _) = parse_header(&p.display().to_string(), &mmap)?;
            entries.push(
                hdr.into_iter()
                    .map(|h| (h.key, (h.dtype, h.shape, h.begin)))
                    .collect(),
            );
            files.push((p, mmap));
        }
        let mut tensors = BTreeMap::new();
        for (key, t) in &meta.tensors {
            let what = format!("checkpoint {d}: tensor '{key}'");
            let elem = dtype_size(t.dtype).map_err(|e| fmt_err(format!("{what}: {e}")))?;
            let mut chunks = Vec::with_capacity(t.chunks.len());
            for c in &t.chunks {
                let fi = *by_name.get(c.file.as_str()).ok_or_else(|| {
                    fmt_err(format!(
                        "{what}: chunk in file '{}', which {METADATA_FILE} does not list",
                        c.file
                    ))
                })?;
                let sets = runs_to_sets(&what, &t.global_shape, &c.runs)?;
                let lens: Vec<usize> = sets.iter().map(IndexSet::len).collect();
                let fpath = files[fi].0.display();
                let Some((dt, shape, start)) = entries[fi].get(key) else {
                    return Err(fmt_err(format!(
                        "{fpath}: tensor '{key}' listed in {METADATA_FILE} is absent"
                    )));
                };
                if *dt != t.dtype || *shape != lens {
                    return Err(fmt_err(format!(
                        "{fpath}: tensor '{key}' is {dt} {shape:?} but {METADATA_FILE} says {} {lens:?}",
                        t.dtype
                    )));
                }
                chunks.push(Chunk {
                    file: fi,
                    sets,
                    start: *start,
                });
            }
            let labelled: Vec<(&str, Vec<IndexSet>)> = t
                .chunks
                .iter()
                .zip(&chunks)
                .map(|(c, ch)| (c.file.as_str(), ch.sets.clone()))
                .collect();
            check_cover(&what, &t.global_shape, &labelled, "")?;
            tensors.insert(key.clone(), LoadedTensor { chunks, elem });
        }
        Ok(DcpCheckpoint {
            dir: dir.to_path_buf(),
            meta,
            files,
            tensors,
        })
    }

    /// The checkpoint directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The parsed `.metadata`.
    pub fn metadata(&self) -> &DcpMetadata {
        &self.meta
    }

    /// All tensor keys, sorted.
    pub fn keys(&self) -> Vec<String> {
        self.meta.tensors.keys().cloned().collect()
    }

    /// Whether `key` is a tensor of this checkpoint.
    pub fn contains(&self, key: &str) -> bool {
        self.meta.tensors.contains_key(key)
    }

    fn meta_of(&self, key: &str) -> Result<&TensorMeta> {
        self.meta
            .tensors
            .get(key)
            .ok_or_else(|| AdapterError::MissingKey {
                key: key.to_string(),
                dir: self.dir.clone(),
            })
    }

    /// Global shape of `key`. Errors (naming key and dir) when the key is unknown.
    pub fn global_shape(&self, key: &str) -> Result<&[usize]> {
        Ok(&self.meta_of(key)?.global_shape)
    }

    /// dtype of `key` (as saved; loads never cast). Errors when the key is unknown.
    pub fn dtype(&self, key: &str) -> Result<Dtype> {
        Ok(self.meta_of(key)?.dtype)
    }

    /// The saved chunks of `key` (file + runs). Errors when the key is unknown.
    pub fn chunks(&self, key: &str) -> Result<&[ChunkMeta]> {
        Ok(&self.meta_of(key)?.chunks)
    }

    /// The caller's JSON given to [`commit`] (step, RNG state, data position, ...).
    pub fn extra(&self) -> &Value {
        &self.meta.extra
    }

    /// Save-time world size.
    pub fn world_size(&self) -> usize {
        self.meta.world_size
    }

    /// Save-time mesh shape.
    pub fn mesh_shape(&self) -> &[usize] {
        &self.meta.mesh_shape
    }

    /// Reshard on load: this rank's local tensor of `key` for `placements` on `mesh` (any mesh,
    /// any placements without `Partial`; `rank` = row-major index in `mesh`), assembled from the
    /// saved chunks that overlap it, copying from the mmap only the bytes it needs. Shape =
    /// `placement::local_shard(global_shape, mesh, placements, coordinate(rank)).local_shape`, in
    /// the local order of that shard (strided shards included); dtype = the saved dtype.
    ///
    /// Errors (naming the key): unknown key; a `Partial` placement; placements that do not fit
    /// the mesh or the tensor; `rank >= mesh.size()`.
    pub fn read_local(
        &self,
        key: &str,
        mesh: &DeviceMesh,
        placements: &[Placement],
        rank: usize,
    ) -> Result<HostTensor> {
        self.read_local_checked(key, None, mesh, placements, rank)
    }

    /// [`DcpCheckpoint::read_local`], first checking the checkpoint's global shape of `key`
    /// against `expect_global_shape` when given (the model's shape): a mismatch is an error
    /// naming the key and both shapes.
    pub fn read_local_checked(
        &self,
        key: &str,
        expect_global_shape: Option<&[usize]>,
        mesh: &DeviceMesh,
        placements: &[Placement],
        rank: usize,
    ) -> Result<HostTensor> {
        let tm = self.meta_of(key)?;
        let lt = &self.tensors[key];
        let gs = &tm.global_shape;
        if let Some(want) = expect_global_shape {
            if want != gs.as_slice() {
                return Err(AdapterError::Shape(format!(
                    "checkpoint {}: tensor '{key}' has global shape {gs:?} but {want:?} was expected",
                    self.dir.display()
                )));
            }
        }
        if let Some(p) = placements.iter().find(|p| p.is_partial()) {
            return Err(AdapterError::Unsupported(format!(
                "tensor '{key}': cannot load into placement {p} of {}: a checkpoint holds full values, not partial terms",
                format_placements(placements)
            )));
        }
        let coord = mesh
            .coordinate(rank)
            .map_err(|e| AdapterError::Placement(format!("{key}: rank {rank}: {e}")))?;
        let (ls, want) = shard_indices(key, gs, mesh, placements, &coord)?;
        let elem = lt.elem;
        let out_shape = ls.local_shape;
        let out_numel: usize = out_shape.iter().product();
        let mut out = vec![0u8; out_numel * elem];
        let nd = gs.len();
        let mut copied = 0usize;
        if nd == 0 {
            if let Some(c) = lt.chunks.first() {
                let src = &self.files[c.file].1[c.start..c.start + elem];
                out.copy_from_slice(src);
                copied = 1;
            }
        } else if out_numel > 0 {
            let dst_st = strides(&out_shape);
            for c in &lt.chunks {
                let segs: Vec<Vec<(usize, usize, usize)>> = want
                    .iter()
                    .zip(&c.sets)
                    .map(|(t, s)| overlap_segments(t, s))
                    .collect();
                if segs.iter().any(Vec::is_empty) {
                    continue;
                }
                let src_shape: Vec<usize> = c.sets.iter().map(IndexSet::len).collect();
                let src_st = strides(&src_shape);
                let mmap = &self.files[c.file].1;
                // Outer dims: every (dst, src) index pair; last dim: contiguous segments.
                let outer: Vec<Vec<(usize, usize)>> = segs[..nd - 1]
                    .iter()
                    .map(|v| {
                        v.iter()
                            .flat_map(|&(t, s, n)| (0..n).map(move |k| (t + k, s + k)))
                            .collect()
                    })
                    .collect();
                let lens: Vec<usize> = outer.iter().map(Vec::len).collect();
                let last = &segs[nd - 1];
                for_each_index(&lens, |ix| {
                    let (mut db, mut sb) = (0usize, 0usize);
                    for (dd, &k) in ix.iter().enumerate() {
                        let (t, s) = outer[dd][k];
                        db += t * dst_st[dd];
                        sb += s * src_st[dd];
                    }
                    for &(t, s, n) in last {
                        let a = c.start + (sb + s) * elem;
                        let b = (db + t) * elem;
                        out[b..b + n * elem].copy_from_slice(&mmap[a..a + n * elem]);
                        copied += n;
                    }
                });
            }
        }
        if copied != out_numel {
            return Err(fmt_err(format!(
                "checkpoint {}: tensor '{key}': saved chunks gave {copied} of the {out_numel} local elements",
                self.dir.display()
            )));
        }
        HostTensor::new(tm.dtype, out_shape, out)
    }

    /// The whole tensor of `key` (= [`DcpCheckpoint::read_local`] on a 1-rank mesh with
    /// `Replicate`). Errors when the key is unknown.
    pub fn read_full(&self, key: &str) -> Result<HostTensor> {
        let mesh =
            DeviceMesh::new(vec![1]).map_err(|e| AdapterError::Placement(format!("{key}: {e}")))?;
        self.read_local(key, &mesh, &[Placement::Replicate], 0)
    }
}

/// Under `root`, the step directories `step_{N}` (`N` decimal digits, normally 8 as
/// [`step_dir`] writes them) in ascending `N`, each with whether it is complete (has
/// `.metadata`): a resume takes the latest complete one and can report the incomplete ones.
/// Other entries are ignored; a missing `root` gives an empty list (nothing saved yet).
///
/// Errors: `root` exists but cannot be listed (I/O error naming it).
pub fn list_steps(root: &Path) -> Result<Vec<(u64, PathBuf, bool)>> {
    if !root.exists() {
        return Ok(Vec::new());
    }
    let rd = std::fs::read_dir(root).map_err(|e| AdapterError::io(root, e))?;
    let mut out = Vec::new();
    for ent in rd {
        let ent = ent.map_err(|e| AdapterError::io(root, e))?;
        let name = ent.file_name().to_string_lossy().into_owned();
        let Some(num) = name.strip_prefix("step_") else {
            continue;
        };
        if num.is_empty() || !num.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let Ok(n) = num.parse::<u64>() else {
            continue;
        };
        let p = ent.path();
        if !p.is_dir() {
            continue;
        }
        let complete = p.join(METADATA_FILE).is_file();
        out.push((n, p, complete));
    }
    out.sort();
    Ok(out)
}

/// The latest complete step under `root` (`None` when there is none), from [`list_steps`].
pub fn latest_complete(root: &Path) -> Result<Option<(u64, PathBuf)>> {
    Ok(list_steps(root)?
        .into_iter()
        .rev()
        .find(|(_, _, c)| *c)
        .map(|(n, p, _)| (n, p)))
}
