//! PyTorch distributed checkpoints (DCP, `torch.distributed.checkpoint`) on disk: read, check,
//! reshard on read, and write ones that stock `torch.distributed.checkpoint.load` reads.
//!
//! # Formats read ([`open`], [`inspect`])
//!
//! | [`StorageFormat`] | written by | files |
//! |---|---|---|
//! | `TorchSave` | `dcp.save(sd, checkpoint_id=DIR)` (`FileSystemWriter`, torch 2.4 - 2.15) | `.metadata` (pickled `Metadata`), `__{rank}_{n}.distcp` (items back to back, each tensor a `torch.save` zip) |
//! | `HfSharded` | `HuggingFaceStorageWriter(save_distributed=True)` | `shard-{rank+1:05}-model-*.safetensors` with `DCP_SHARDING_INFO` |
//! | `HfConsolidated` | `HuggingFaceStorageWriter(enable_consolidation=True)`, or any safetensors checkpoint | `model-*.safetensors` (+ index); one chunk per tensor |
//!
//! Nothing is executed: `.metadata` and every item's `data.pkl` go through a restricted
//! unpickler ([`pickle`]) that accepts only the globals DCP writes ([`metadata::METADATA_GLOBALS`],
//! [`torch_item::item_global_allowed`]). Files are memory-mapped; reads copy only the bytes a shard
//! needs. Checks (per tensor, [`DcpCheckpoint::problems`]): every chunk inside the global shape,
//! chunks covering every element exactly once (no gap, no overlap), each chunk's item present,
//! inside its file, a tensor of the recorded dtype and exactly the chunk's sizes, its storage
//! holding every element its strides reach. [`open`] refuses a checkpoint with any problem;
//! [`inspect`] keeps them for a report (`conformance dcp`).
//!
//! # Format written ([`save_rank`] + [`commit`]): torch's default `FileSystemWriter` layout
//!
//! Chosen over the HF storage format because `dcp.load(sd, checkpoint_id=DIR)` reads it with no
//! storage reader argument, at any mesh, on every torch 2.x, and because it can hold non-tensor
//! values (the caller's `extra` JSON) and several chunks of one tensor in one rank's file (the HF
//! format allows one chunk per fqn per file, which a `_StridedShard` shard needs more of).
//!
//! | file | written by | content |
//! |---|---|---|
//! | `__{rank}_0.distcp` | [`save_rank`] of that rank | its chunks, each a `torch.save` archive of a contiguous tensor |
//! | `__{rank}.metadata` | [`save_rank`] of that rank | a pickled `Metadata` of that rank's chunks (what torch's no-collective save writes per rank) |
//! | `extra.distcp` | [`commit`] | the caller's JSON as the `torch.save` of a `str`, the bytes item `extra` |
//! | `.metadata` | [`commit`], last | the merged `Metadata`: the commit marker |
//!
//! A `_StridedShard` shard that is not one box is written as the exact boxes of its runs
//! ([`placement::chunks::shard_boxes`]): packed gate|up `_S(2, 2)` saves as two chunks per rank,
//! where torch 2.15's own save refuses it ("overlapping chunks"). Replicas are written once (the
//! rank with coordinate 0 on every `Replicate` mesh dim). Nothing here communicates: the caller
//! runs a barrier between every rank's [`save_rank`] and one rank's [`commit`]. Nothing changes
//! dtype.
//!
//! ```
//! use adapters::dcp::{self, ShardToSave};
//! use adapters::{Dtype, HostTensor};
//! use placement::{local_shard, parse_placements, DeviceMesh, Placement};
//!
//! let root = tempfile::tempdir().unwrap();
//! let dir = dcp::step_dir(root.path(), 100); // root/step_00000100
//! // mesh [2, 2], packed gate|up [E=4, H=3, 2I=8] as [S(0), _S(2, 2)]; each rank saves its shard.
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
//! let (step, latest) = dcp::latest_complete(root.path())?.unwrap();
//! let ck = dcp::open(&latest)?;
//! assert_eq!((step, ck.extra()["step"].as_u64()), (100, Some(100)));
//! assert_eq!(ck.chunks("w")?.len(), 8); // each rank: 2 boxes of its _S(2, 2) shard
//! // Load on mesh [2] with S(1): rank 1 holds index 2 of dim 1.
//! let m2 = DeviceMesh::new(vec![2]).unwrap();
//! let t = ck.read_local("w", &m2, &[Placement::Shard(1)], 1)?;
//! assert_eq!((t.dtype, t.shape.clone()), (Dtype::BF16, vec![4, 1, 8]));
//! // Columns 0..2 and 4..6 of every row came from ranks (., 0), the others from ranks (., 1).
//! assert_eq!(t.data[..16], [0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1]);
//! # Ok::<(), adapters::AdapterError>(())
//! ```

mod check;
mod hf_storage;
pub mod metadata;
pub mod pickle;
pub mod pickler;
mod read;
mod save;
pub mod torch_item;

pub use hf_storage::SHARDING_INFO_KEY;
pub use save::{
    commit, data_file_name, rank_metadata_name, save_rank, ShardToSave, EXTRA_FILE, EXTRA_KEY,
};

use crate::checkpoint::map_file;
use crate::error::{AdapterError, Result};
use crate::tensor::dtype_size;
use memmap2::Mmap;
use metadata::{Item, TorchMetadata};
use placement::chunks::ChunkBox;
use safetensors::Dtype;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The commit marker and global metadata file of a torch DCP.
pub const METADATA_FILE: &str = ".metadata";
/// Largest `.metadata` read (a pickle of a million chunks is about 300 MB).
pub const MAX_METADATA_BYTES: u64 = 1 << 30;

/// How a checkpoint directory stores its data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StorageFormat {
    /// torch's default `FileSystemWriter`: `.metadata` + `__{rank}_{n}.distcp`.
    TorchSave,
    /// `HuggingFaceStorageWriter(save_distributed=True)`: per-rank safetensors with
    /// `DCP_SHARDING_INFO`.
    HfSharded,
    /// Consolidated safetensors (`model-*.safetensors`), one chunk per tensor.
    HfConsolidated,
}

impl std::fmt::Display for StorageFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            StorageFormat::TorchSave => "torch DCP (FileSystemWriter: .metadata + .distcp)",
            StorageFormat::HfSharded => {
                "torch DCP, Hugging Face storage (per-rank safetensors, DCP_SHARDING_INFO)"
            }
            StorageFormat::HfConsolidated => "Hugging Face safetensors (consolidated)",
        })
    }
}

/// Where a chunk's elements are in its mapped file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Layout {
    /// Absolute byte offset in the file of storage element 0.
    pub(crate) data_start: usize,
    /// Element index of the chunk's first element in the storage.
    pub(crate) storage_offset: usize,
    /// Strides in elements, per dim.
    pub(crate) strides: Vec<usize>,
    /// Elements in the storage.
    pub(crate) storage_numel: usize,
    /// CRC-32 of the storage recorded by the item's zip directory (`None` for safetensors).
    pub(crate) crc32: Option<u32>,
}

/// One saved chunk of a tensor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Chunk {
    pub(crate) boxed: ChunkBox,
    /// Index into the checkpoint's files.
    pub(crate) file: usize,
    /// The item's byte range in the file.
    pub(crate) byte_offset: u64,
    pub(crate) byte_length: u64,
    /// `None` when the item could not be decoded (a problem is recorded).
    pub(crate) layout: Option<Layout>,
}

/// A tensor of the checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TensorEntry {
    pub(crate) dtype: Dtype,
    pub(crate) global_shape: Vec<usize>,
    pub(crate) chunks: Vec<Chunk>,
    /// What is wrong with it (empty when it can be read).
    pub(crate) problems: Vec<String>,
}

/// A saved chunk as [`DcpCheckpoint::chunks`] reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkInfo {
    /// Global index of the chunk's first element, per dim.
    pub offsets: Vec<usize>,
    /// Extent per dim.
    pub sizes: Vec<usize>,
    /// File holding it, relative to the checkpoint directory.
    pub file: String,
    /// Byte range of its item (`torch.save` archive or safetensors tensor data) in the file.
    pub byte_offset: u64,
    /// Length of that range in bytes.
    pub byte_length: u64,
}

/// A non-tensor value (`BytesStorageMetadata`): its `torch.save` bytes, listed, not decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BytesItem {
    /// File holding it.
    pub file: String,
    /// First byte in the file.
    pub offset: u64,
    /// Length in bytes.
    pub length: u64,
    /// Why it cannot be read (no storage entry, file missing, past the end), if so.
    pub problem: Option<String>,
}

/// An opened checkpoint (see the module docs).
#[derive(Debug)]
pub struct DcpCheckpoint {
    dir: PathBuf,
    format: StorageFormat,
    files: Vec<(String, Option<Mmap>)>,
    tensors: BTreeMap<String, TensorEntry>,
    bytes: BTreeMap<String, BytesItem>,
    world_size: usize,
    version: Option<String>,
    extra: Value,
}

fn fmt_err(msg: String) -> AdapterError {
    AdapterError::Format(msg)
}

/// Opens a checkpoint directory of any [`StorageFormat`] and refuses it when any tensor has a
/// problem ([`inspect`] lists them instead). Errors (one line naming the directory or file and
/// the key): no `.metadata` but DCP data files (`incomplete checkpoint DIR: no .metadata (a save
/// did not finish)`), neither `.metadata` nor safetensors files, an unreadable or malformed
/// `.metadata` (a refused pickle global is named), a malformed safetensors file, then the first
/// problem of the first tensor that has one.
pub fn open(dir: &Path) -> Result<DcpCheckpoint> {
    let ck = inspect(dir)?;
    for (k, t) in &ck.tensors {
        if let Some(p) = t.problems.first() {
            return Err(fmt_err(format!(
                "checkpoint {}: tensor '{k}': {p}",
                dir.display()
            )));
        }
    }
    for (k, b) in &ck.bytes {
        if let Some(p) = &b.problem {
            return Err(fmt_err(format!(
                "checkpoint {}: item '{k}': {p}",
                dir.display()
            )));
        }
    }
    Ok(ck)
}

/// Opens a checkpoint directory, recording per tensor what is wrong instead of failing
/// ([`DcpCheckpoint::problems`]); errors only when the directory cannot be read as a checkpoint
/// at all (see [`open`]).
pub fn inspect(dir: &Path) -> Result<DcpCheckpoint> {
    let md = dir.join(METADATA_FILE);
    let meta_stat = std::fs::metadata(&md);
    if let Ok(m) = &meta_stat {
        if !m.is_file() {
            return Err(fmt_err(format!("{}: not a regular file", md.display())));
        }
        return open_torch(dir, m.len());
    }
    let listing = std::fs::read_dir(dir).map_err(|e| AdapterError::io(dir, e))?;
    let mut has_dcp_files = false;
    for e in listing {
        let name = e.map_err(|e| AdapterError::io(dir, e))?.file_name();
        let n = name.to_string_lossy();
        if n.ends_with(".distcp") || (n.starts_with("__") && n.ends_with(".metadata")) {
            has_dcp_files = true;
        }
    }
    if has_dcp_files {
        return Err(fmt_err(format!(
            "incomplete checkpoint {}: no {METADATA_FILE} (a save did not finish)",
            dir.display()
        )));
    }
    let names = hf_storage::safetensors_files(dir)?;
    if names.is_empty() {
        return Err(fmt_err(format!(
            "{}: not a DCP checkpoint (no {METADATA_FILE}, no .safetensors files)",
            dir.display()
        )));
    }
    let parts = hf_storage::open(dir, &names)?;
    let mut tensors = parts.tensors;
    for t in tensors.values_mut() {
        let boxes: Vec<ChunkBox> = t.chunks.iter().map(|c| c.boxed.clone()).collect();
        let p = check::layout_problems(&t.global_shape, &boxes);
        t.problems.extend(p);
    }
    Ok(DcpCheckpoint {
        dir: dir.to_path_buf(),
        format: parts.format,
        files: parts.files,
        tensors,
        bytes: BTreeMap::new(),
        world_size: parts.world_size,
        version: None,
        extra: Value::Null,
    })
}

/// A `_StorageInfo.relative_path` that stays inside the checkpoint directory.
fn plain_relative(p: &str) -> bool {
    let path = Path::new(p);
    !p.is_empty()
        && path.is_relative()
        && path
            .components()
            .all(|c| matches!(c, std::path::Component::Normal(_)))
}

/// Rank of a `__{rank}_{n}.distcp` file name.
fn distcp_rank(name: &str) -> Option<usize> {
    let rest = name.strip_prefix("__")?.strip_suffix(".distcp")?;
    let (r, n) = rest.split_once('_')?;
    if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    r.parse().ok()
}

fn open_torch(dir: &Path, md_len: u64) -> Result<DcpCheckpoint> {
    let md = dir.join(METADATA_FILE);
    let shown = md.display().to_string();
    if md_len > MAX_METADATA_BYTES {
        return Err(fmt_err(format!(
            "{shown}: {md_len} bytes, more than the {MAX_METADATA_BYTES} this reader accepts"
        )));
    }
    let raw = std::fs::read(&md).map_err(|e| AdapterError::io(&md, e))?;
    let meta = metadata::parse_metadata(&raw).map_err(|e| fmt_err(format!("{shown}: {e}")))?;
    from_metadata(dir, meta)
}

/// Builds the checkpoint of `meta` (the parsed `.metadata`) in `dir`: maps the files it names and
/// decodes every item (shared by [`open`] and [`commit`]).
pub(crate) fn from_metadata(dir: &Path, meta: TorchMetadata) -> Result<DcpCheckpoint> {
    let d = dir.display().to_string();
    let mut file_index: BTreeMap<String, usize> = BTreeMap::new();
    let mut files: Vec<(String, Option<Mmap>)> = Vec::new();
    let mut missing: BTreeMap<usize, String> = BTreeMap::new();
    for s in meta.storage.values() {
        if file_index.contains_key(&s.relative_path) {
            continue;
        }
        if !plain_relative(&s.relative_path) {
            return Err(fmt_err(format!(
                "{d}/{METADATA_FILE}: storage path '{}' leaves the checkpoint directory",
                s.relative_path
            )));
        }
        let p = dir.join(&s.relative_path);
        let map = match std::fs::metadata(&p) {
            Ok(m) if m.is_file() && m.len() > 0 => Some(map_file(&p)?),
            Ok(m) if m.is_file() => None,
            Ok(_) => {
                missing.insert(
                    files.len(),
                    format!("data file {} is not a regular file", p.display()),
                );
                None
            }
            Err(_) => {
                missing.insert(files.len(), format!("data file {} is missing", p.display()));
                None
            }
        };
        file_index.insert(s.relative_path.clone(), files.len());
        files.push((s.relative_path.clone(), map));
    }
    let locate = |fqn: &str,
                  offset: Option<&Vec<usize>>|
     -> std::result::Result<(usize, u64, u64, &[u8]), String> {
        let key = metadata::StorageIndex {
            fqn: fqn.to_string(),
            offset: offset.cloned(),
        };
        let s = meta.storage.get(&key).ok_or_else(|| match offset {
            Some(o) => format!("no storage_data entry for the chunk at offsets {o:?}"),
            None => "no storage_data entry".to_string(),
        })?;
        let fi = file_index[&s.relative_path];
        if let Some(m) = missing.get(&fi) {
            return Err(m.clone());
        }
        if !s.transforms.is_empty() {
            return Err(format!(
                "stored with stream transforms {:?} (an extension this reader does not apply)",
                s.transforms
            ));
        }
        let data: &[u8] = files[fi].1.as_deref().unwrap_or(&[]);
        let end = s.offset.checked_add(s.length);
        if end.is_none_or(|e| e > data.len() as u64) {
            return Err(format!(
                "item [{}, {}) of {} extends past its end ({} bytes): truncated",
                s.offset,
                s.offset.saturating_add(s.length),
                dir.join(&s.relative_path).display(),
                data.len()
            ));
        }
        let item = &data[s.offset as usize..(s.offset + s.length) as usize];
        Ok((fi, s.offset, s.length, item))
    };
    let mut tensors = BTreeMap::new();
    let mut bytes = BTreeMap::new();
    for (fqn, item) in &meta.items {
        match item {
            Item::Bytes => {
                let (file, offset, length, problem) = match locate(fqn, None) {
                    Ok((fi, o, l, _)) => (files[fi].0.clone(), o, l, None),
                    Err(e) => (String::new(), 0, 0, Some(e)),
                };
                bytes.insert(
                    fqn.clone(),
                    BytesItem {
                        file,
                        offset,
                        length,
                        problem,
                    },
                );
            }
            Item::Tensor(t) => {
                let mut entry = TensorEntry {
                    dtype: t.dtype,
                    global_shape: t.size.clone(),
                    chunks: Vec::new(),
                    problems: Vec::new(),
                };
                if let Err(e) = dtype_size(t.dtype) {
                    entry.problems.push(e.to_string());
                }
                // Layout checks first, on every chunk the metadata lists, then each item.
                entry
                    .problems
                    .extend(check::layout_problems(&t.size, &t.chunks));
                for (ci, b) in t.chunks.iter().enumerate() {
                    let what = format!("chunk {ci} (offsets {:?}, sizes {:?})", b.offsets, b.sizes);
                    match locate(fqn, Some(&b.offsets)) {
                        Err(e) => entry.problems.push(format!("{what}: {e}")),
                        Ok((fi, off, len, item)) => {
                            let layout = match torch_item::decode_item(item) {
                                Err(e) => {
                                    entry.problems.push(format!(
                                        "{what}: item at byte {off} of {}: {e}",
                                        files[fi].0
                                    ));
                                    None
                                }
                                Ok(it) if it.dtype != t.dtype || it.sizes != b.sizes => {
                                    entry.problems.push(format!(
                                        "{what}: item at byte {off} of {} is {} {:?}, the metadata says {} {:?}",
                                        files[fi].0, it.dtype, it.sizes, t.dtype, b.sizes
                                    ));
                                    None
                                }
                                Ok(it) => Some(Layout {
                                    data_start: off as usize + it.data_start,
                                    storage_offset: it.storage_offset,
                                    strides: it.strides,
                                    storage_numel: it.storage_numel,
                                    crc32: Some(it.crc32),
                                }),
                            };
                            entry.chunks.push(Chunk {
                                boxed: b.clone(),
                                file: fi,
                                byte_offset: off,
                                byte_length: len,
                                layout,
                            });
                        }
                    }
                }
                tensors.insert(fqn.clone(), entry);
            }
        }
    }
    let mut world = 0usize;
    for (name, _) in &files {
        if let Some(r) = distcp_rank(name) {
            world = world.max(r + 1);
        }
    }
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            if let Some(r) = distcp_rank(&e.file_name().to_string_lossy()) {
                world = world.max(r + 1);
            }
        }
    }
    let mut ck = DcpCheckpoint {
        dir: dir.to_path_buf(),
        format: StorageFormat::TorchSave,
        files,
        tensors,
        bytes,
        world_size: world.max(1),
        version: meta.version,
        extra: Value::Null,
    };
    ck.extra = save::read_extra(&ck).unwrap_or(Value::Null);
    Ok(ck)
}

impl DcpCheckpoint {
    /// The checkpoint directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// How the checkpoint stores its data.
    pub fn format(&self) -> StorageFormat {
        self.format
    }

    /// Tensor fqns, sorted.
    pub fn keys(&self) -> Vec<String> {
        self.tensors.keys().cloned().collect()
    }

    /// Whether `key` is a tensor of this checkpoint.
    pub fn contains(&self, key: &str) -> bool {
        self.tensors.contains_key(key)
    }

    fn entry(&self, key: &str) -> Result<&TensorEntry> {
        self.tensors
            .get(key)
            .ok_or_else(|| AdapterError::MissingKey {
                key: key.to_string(),
                dir: self.dir.clone(),
            })
    }

    /// Global shape of `key` (as recorded: `size` of its metadata, or the extent of its chunks for
    /// the HF formats). Errors when the key is unknown.
    pub fn global_shape(&self, key: &str) -> Result<&[usize]> {
        Ok(&self.entry(key)?.global_shape)
    }

    /// dtype of `key` (loads never cast). Errors when the key is unknown.
    pub fn dtype(&self, key: &str) -> Result<Dtype> {
        Ok(self.entry(key)?.dtype)
    }

    /// The saved chunks of `key` whose items were found, in metadata order.
    pub fn chunks(&self, key: &str) -> Result<Vec<ChunkInfo>> {
        Ok(self
            .entry(key)?
            .chunks
            .iter()
            .map(|c| ChunkInfo {
                offsets: c.boxed.offsets.clone(),
                sizes: c.boxed.sizes.clone(),
                file: self.files[c.file].0.clone(),
                byte_offset: c.byte_offset,
                byte_length: c.byte_length,
            })
            .collect())
    }

    /// What is wrong with `key` (empty when it reads correctly): a chunk outside the global shape,
    /// a gap, an overlap, a missing or malformed item, an item of another dtype or shape.
    pub fn problems(&self, key: &str) -> Result<&[String]> {
        Ok(&self.entry(key)?.problems)
    }

    /// The non-tensor items (`BytesStorageMetadata`), by fqn.
    pub fn bytes_items(&self) -> &BTreeMap<String, BytesItem> {
        &self.bytes
    }

    /// Ranks that saved, from the data file names (`__{rank}_{n}.distcp`, `shard-{rank+1}-...`); 1
    /// for a consolidated checkpoint.
    pub fn world_size(&self) -> usize {
        self.world_size
    }

    /// The metadata `version` (`"1.0.0"` for torch 2.5 - 2.15), if recorded.
    pub fn version(&self) -> Option<&str> {
        self.version.as_deref()
    }

    /// The JSON given to [`commit`] (step, RNG state, data position, ...); `Null` for a
    /// checkpoint without it (every torch-written one).
    pub fn extra(&self) -> &Value {
        &self.extra
    }

    /// The bytes of the mapped file `file` (empty when absent).
    pub(crate) fn file_bytes(&self, file: usize) -> &[u8] {
        self.files
            .get(file)
            .and_then(|f| f.1.as_deref())
            .unwrap_or(&[])
    }

    /// Index of the file named `name`.
    pub(crate) fn file_named(&self, name: &str) -> Option<usize> {
        self.files.iter().position(|f| f.0 == name)
    }
}

/// `root/step_{step:08}`: the directory of the checkpoint of training step `step`.
pub fn step_dir(root: &Path, step: u64) -> PathBuf {
    root.join(format!("step_{step:08}"))
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
