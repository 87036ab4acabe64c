//! Streaming checkpoint conversion HF <-> native (the `adapters convert` CLI).
//!
//! - Streaming: each safetensors file is written header first, then its tensor bytes in order,
//!   produced straight from the mmapped source in WINDOWS (32 MiB, or 8 MiB per worker thread
//!   when more): a window is a run of PIECES
//!   (up to 1 MiB of a copied tensor, a batch of experts of a native group, or of one HF disk
//!   tensor; a single expert may be larger), each filled in parallel (rayon, `threads` workers)
//!   directly at its place in the output staging buffer (one copy per element, no intermediate
//!   tensors), then handed to a writer thread (`direct_io`, `O_DIRECT`) while the next window is
//!   filled. Files are written one after the other, so memory is two windows (+ one expert):
//!   ~80 MB with up to 4 threads, whatever the model or the number of files.
//! - Output: `model.safetensors`, or `model-0000i-of-0000n.safetensors` + index when the total
//!   exceeds `max_shard_bytes` (the HF layout; keys in sorted order, an item never split), plus
//!   config.json and, for native checkpoints, `adapters_native.json` (the HF layout to go back to).
//! - Atomic finish: everything is written into `DST.partial-PID` (files fsynced, index last) and
//!   the directory is renamed to `DST` only when complete (and verified with `verify`). A crash
//!   leaves a `.partial-*` directory that never looks like a checkpoint at `DST`.
//! - `verify`: re-opens the output (full validation) and checks every tensor through the INVERSE
//!   conversion against the source bytes.
//!
//! No dtype change, no arithmetic: bytes move (crate rule).

use crate::adapter::MoeAdapter;
use crate::checkpoint::{HfCheckpoint, CONFIG_FILE};
use crate::error::{AdapterError, Result};
use crate::family::{spec_for, FamilyConfig};
use crate::family_adapter::{FamilyAdapter, LayoutChoice};
use crate::layout::{DiskLayout, Group};
use crate::local::LocalTensor;
pub use crate::out_dir::stale_partials;
use crate::out_dir::{atomic_dir, write_json, write_tensors};
use crate::stream_write::OutTensor;
use crate::tensor::{dtype_size, HostTensor};
use placement::{IndexSet, Placement};
use rayon::prelude::*;
use safetensors::Dtype;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::Path;

/// Sidecar file of a native checkpoint recording the HF layout it came from.
pub const NATIVE_SIDECAR: &str = "adapters_native.json";

/// Conversion direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// HF checkpoint -> native grouped layout.
    HfToNative,
    /// Native grouped layout (written by this tool) -> HF checkpoint in its original layout.
    NativeToHf,
}

/// Options of [`convert`].
#[derive(Debug, Clone)]
pub struct ConvertOptions {
    /// Shard size limit in bytes (HF default 5 GB).
    pub max_shard_bytes: u64,
    /// Worker threads (None: rayon's default, one per core).
    pub threads: Option<usize>,
    /// Re-read the output and check it through the inverse conversion.
    pub verify: bool,
}

impl Default for ConvertOptions {
    fn default() -> Self {
        ConvertOptions {
            max_shard_bytes: 5_000_000_000,
            threads: None,
            verify: false,
        }
    }
}

/// What [`convert`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConvertReport {
    /// Output tensors written.
    pub tensors: usize,
    /// Output tensor bytes written (excluding headers).
    pub bytes: u64,
    /// Output safetensors files.
    pub files: usize,
    /// Whether the output was verified.
    pub verified: bool,
}

/// How an item's tensors are produced.
#[derive(Debug, Clone)]
enum Source {
    /// Copy source key's bytes (pass-through or rename).
    Copy(String),
    /// HF -> native: build native group `g` whole.
    Group(usize),
    /// Native -> HF: all disk tensors of group `g` (stacked layouts).
    GroupWhole(usize),
    /// Native -> HF: the per-expert disk tensors of expert `e` of group `g`.
    GroupExpert(usize, usize),
}

/// One unit of work: the output tensors it produces (key, dtype, shape) and their source.
#[derive(Debug, Clone)]
struct Item {
    outs: Vec<(String, Dtype, Vec<usize>)>,
    source: Source,
}

fn layout_name(l: DiskLayout) -> &'static str {
    match l {
        DiskLayout::PerExpert => "per_expert",
        DiskLayout::FusedTransposed => "fused_transposed",
        DiskLayout::FusedNative => "fused_native",
        DiskLayout::GptOss => "gpt_oss",
        DiskLayout::Step35 => "step35",
    }
}

fn layout_from(name: &str) -> Option<DiskLayout> {
    Some(match name {
        "per_expert" => DiskLayout::PerExpert,
        "fused_transposed" => DiskLayout::FusedTransposed,
        "fused_native" => DiskLayout::FusedNative,
        "gpt_oss" => DiskLayout::GptOss,
        "step35" => DiskLayout::Step35,
        _ => return None,
    })
}

pub(crate) fn sidecar_json(a: &FamilyAdapter) -> Value {
    let c = a.layout_choice();
    json!({
        "format": "adapters-native/1",
        "model_type": a.spec().model_type,
        "prefix": c.prefix,
        "moe_module": c.moe_module,
        "layout": layout_name(c.layout),
        "optional": c.optional,
    })
}

/// Rebuilds the adapter of a native checkpoint from config.json + [`NATIVE_SIDECAR`].
pub fn native_adapter(ckpt: &HfCheckpoint) -> Result<FamilyAdapter> {
    let path = ckpt.dir().join(NATIVE_SIDECAR);
    let bad = |m: String| AdapterError::Config(format!("{}: {m}", path.display()));
    let s = crate::input::read_regular_string(&path)?;
    let v: Value =
        crate::input::parse_json_strict(&s).map_err(|e| bad(format!("not JSON: {e}")))?;
    if v["format"] != "adapters-native/1" {
        return Err(bad(format!(
            "format is {}, not \"adapters-native/1\"",
            v["format"]
        )));
    }
    let spec = spec_for(ckpt.model_type()?)?;
    if v["model_type"] != spec.model_type {
        return Err(bad(format!(
            "model_type is {} but config.json's is \"{}\"",
            v["model_type"], spec.model_type
        )));
    }
    let config = FamilyConfig::from_json(&spec, ckpt.config())
        .map_err(|e| crate::family_adapter::in_dir(ckpt, e))?;
    let module = v["moe_module"].as_str().unwrap_or("");
    let moe_module = spec
        .moe_modules
        .iter()
        .copied()
        .find(|m| *m == module)
        .ok_or_else(|| {
            bad(format!(
                "moe_module '{module}' is not one of {:?}",
                spec.moe_modules
            ))
        })?;
    let layout = v["layout"]
        .as_str()
        .and_then(layout_from)
        .ok_or_else(|| bad(format!("unknown layout {}", v["layout"])))?;
    let opt: Vec<bool> = serde_json::from_value(v["optional"].clone())
        .map_err(|_| bad("'optional' is not a list of 4 booleans".into()))?;
    let optional: [bool; 4] = opt
        .try_into()
        .map_err(|_| bad("'optional' is not a list of 4 booleans".into()))?;
    let prefix = v["prefix"]
        .as_str()
        .ok_or_else(|| bad("no 'prefix'".into()))?
        .to_string();
    let config = crate::family_adapter::check_native_sizes(config, ckpt, &prefix)?;
    // The sidecar records the optional modules; config.json decides those it gives.
    let from_config = crate::family_adapter::optional_modules(&spec, &config, |_| true);
    let undecided = crate::family_adapter::optional_modules(&spec, &config, |_| false);
    for (i, name) in [
        "router bias",
        "score-correction bias",
        "shared expert",
        "shared-expert gate",
    ]
    .iter()
    .enumerate()
    {
        if from_config[i] == undecided[i] && optional[i] != from_config[i] {
            return Err(bad(format!(
                "optional[{i}] ({name}) is {} but config.json says {}",
                optional[i], from_config[i]
            )));
        }
    }
    Ok(FamilyAdapter::new(
        spec,
        config,
        LayoutChoice {
            prefix,
            moe_module,
            layout,
            optional,
        },
    ))
}

/// Plans the output items for `dir`ection.
fn plan(a: &FamilyAdapter, src: &HfCheckpoint, dir: Direction) -> Result<Vec<Item>> {
    let mut items = Vec::new();
    match dir {
        Direction::HfToNative => {
            let dtypes = a.validate(src)?;
            for k in src.keys() {
                if a.is_expert_disk_key(k) {
                    continue;
                }
                let info = src.info(k)?;
                items.push(Item {
                    outs: vec![(a.native_name(k).to_string(), info.dtype, info.shape)],
                    source: Source::Copy(k.to_string()),
                });
            }
            for (gi, (g, d)) in a.groups().iter().zip(dtypes).enumerate() {
                items.push(Item {
                    outs: vec![(g.native_key.clone(), d, g.shape.clone())],
                    source: Source::Group(gi),
                });
            }
        }
        Direction::NativeToHf => {
            crate::moe_block::check(a, src, crate::moe_block::Side::Native)?;
            crate::model_keys::check(a, src, crate::moe_block::Side::Native)?;
            let e = a.config().num_experts;
            let by_key: BTreeMap<&str, usize> = a
                .groups()
                .iter()
                .enumerate()
                .map(|(i, g)| (g.native_key.as_str(), i))
                .collect();
            for k in src.keys() {
                let info = src.info(k)?;
                match by_key.get(k).copied() {
                    None => {
                        // Stray keys under mlp.experts are an error (same rule as to_hf).
                        a.to_hf_local(&LocalTensor {
                            key: k.to_string(),
                            tensor: HostTensor::new(info.dtype, vec![0], Vec::new())?,
                            global_shape: vec![0],
                            placements: vec![Placement::Replicate],
                            indices: vec![IndexSet::empty()],
                        })?;
                        items.push(Item {
                            outs: vec![(a.disk_name_of(k).to_string(), info.dtype, info.shape)],
                            source: Source::Copy(k.to_string()),
                        });
                    }
                    Some(gi) => {
                        let g = &a.groups()[gi];
                        if info.shape != g.shape {
                            return Err(AdapterError::Shape(format!(
                                "{}: native tensor '{k}' has shape {:?} but config gives {:?}",
                                src.dir().display(),
                                info.shape,
                                g.shape
                            )));
                        }
                        let per_expert = g.disk.iter().all(|d| d.per_expert);
                        if per_expert {
                            for x in 0..e {
                                items.push(Item {
                                    outs: g
                                        .disk
                                        .iter()
                                        .map(|d| (d.key_for(x), info.dtype, d.shape.clone()))
                                        .collect(),
                                    source: Source::GroupExpert(gi, x),
                                });
                            }
                        } else {
                            items.push(Item {
                                outs: g
                                    .disk
                                    .iter()
                                    .map(|d| (d.key.clone(), info.dtype, d.shape.clone()))
                                    .collect(),
                                source: Source::GroupWhole(gi),
                            });
                        }
                    }
                }
            }
        }
    }
    items.sort_by(|x, y| x.outs[0].0.cmp(&y.outs[0].0));
    Ok(items)
}

/// Largest piece of work (bytes of output): copies are split, expert tensors batched by experts
/// up to this size (a single expert may be larger).
pub(crate) const PIECE: usize = 1 << 20;

/// A contiguous byte range of an output file's tensor data and how to produce it.
enum Piece<'a> {
    /// Bytes copied from the source mmap.
    Copy(&'a [u8]),
    /// HF -> native: experts `e0..e0 + ne` of native group `g`.
    Native(&'a Group, usize, usize),
    /// Native -> HF: disk tensor `src` of group `g` for the whole experts in `native`
    /// (`n`-byte elements).
    Disk(&'a Group, usize, &'a [u8], usize),
}

impl Piece<'_> {
    fn fill(&self, src: &HfCheckpoint, out: &mut [u8]) -> Result<()> {
        match *self {
            Piece::Copy(b) => out.copy_from_slice(b),
            Piece::Native(g, e0, ne) => {
                g.fill_experts(src, e0, ne, out)?;
            }
            Piece::Disk(g, s, native, n) => g.fill_disk(native, n, s, out)?,
        }
        Ok(())
    }
}

/// Splits an item into pieces in output order; `len` of each piece is its output size.
fn pieces<'a>(
    a: &'a FamilyAdapter,
    src: &'a HfCheckpoint,
    it: &Item,
    out: &mut Vec<(Piece<'a>, usize)>,
) -> Result<()> {
    let size = |(_, d, s): &(String, Dtype, Vec<usize>)| -> Result<usize> {
        Ok(s.iter().product::<usize>() * dtype_size(*d)?)
    };
    let batch = |one: usize| (PIECE / one.max(1)).max(1);
    match &it.source {
        Source::Copy(k) => {
            let bytes = src.tensor_bytes(k)?;
            let n = size(&it.outs[0])?;
            if bytes.len() != n {
                return Err(AdapterError::Tensor(format!(
                    "tensor '{k}' has {} bytes, expected {n}",
                    bytes.len()
                )));
            }
            out.extend(bytes.chunks(PIECE).map(|c| (Piece::Copy(c), c.len())));
        }
        Source::Group(gi) => {
            let g = &a.groups()[*gi];
            let (block, _) = g.expert_bytes(it.outs[0].1, 0)?;
            let e = g.shape[0];
            if size(&it.outs[0])? != e * block {
                return Err(AdapterError::Tensor(format!(
                    "{}: {} bytes planned for {e} experts of {block} bytes",
                    g.native_key,
                    size(&it.outs[0])?
                )));
            }
            let step = batch(block);
            for e0 in (0..e).step_by(step) {
                let ne = step.min(e - e0);
                out.push((Piece::Native(g, e0, ne), ne * block));
            }
        }
        Source::GroupWhole(gi) | Source::GroupExpert(gi, _) => {
            let g = &a.groups()[*gi];
            let info = src.info(&g.native_key)?;
            let n = dtype_size(info.dtype)?;
            let bytes = src.tensor_bytes(&g.native_key)?;
            let (experts, native) = match it.source {
                Source::GroupExpert(_, e) => {
                    let per = bytes.len() / g.shape[0].max(1);
                    (1, bytes.get(e * per..(e + 1) * per).unwrap_or(&[]))
                }
                _ => (g.shape[0], bytes),
            };
            if it.outs.len() != g.disk.len() {
                return Err(AdapterError::Tensor(format!(
                    "{}: {} output tensors for {} disk tensors",
                    g.native_key,
                    it.outs.len(),
                    g.disk.len()
                )));
            }
            for (srci, o) in it.outs.iter().enumerate() {
                let (block, dblock) = g.expert_bytes(info.dtype, srci)?;
                if native.len() != experts * block || size(o)? != experts * dblock {
                    return Err(AdapterError::Tensor(format!(
                        "{}: {} native bytes for {experts} expert(s) of '{}' ({} bytes)",
                        g.native_key,
                        native.len(),
                        o.0,
                        size(o)?
                    )));
                }
                let step = batch(dblock);
                for e0 in (0..experts).step_by(step) {
                    let ne = step.min(experts - e0);
                    let part = &native[e0 * block..(e0 + ne) * block];
                    out.push((Piece::Disk(g, srci, part, n), ne * dblock));
                }
            }
        }
    }
    Ok(())
}

/// Converts the checkpoint in `src_dir` to `dst_dir` (which must not exist). `tick(bytes)` is
/// called after each item (progress). See the module docs for streaming, atomicity and verify.
///
/// Errors: anything [`HfCheckpoint::open`] or the adapter reports (one line naming file and key),
/// `dst_dir` already existing, I/O, a verify mismatch (names the key).
pub fn convert(
    src_dir: &Path,
    dst_dir: &Path,
    direction: Direction,
    opts: &ConvertOptions,
    tick: &(dyn Fn(u64) + Sync),
) -> Result<ConvertReport> {
    if dst_dir.exists() {
        return Err(AdapterError::io(
            dst_dir,
            std::io::Error::new(std::io::ErrorKind::AlreadyExists, "destination exists"),
        ));
    }
    let src = HfCheckpoint::open(src_dir)?;
    let a = match direction {
        Direction::HfToNative => FamilyAdapter::from_checkpoint(&src)?,
        Direction::NativeToHf => native_adapter(&src)?,
    };
    let items = plan(&a, &src, direction)?;
    atomic_dir(dst_dir, |tmp| {
        let units: Vec<Vec<OutTensor>> = items.iter().map(|i| i.outs.clone()).collect();
        let pieces_of = |u: usize| -> Result<Vec<(Piece, usize)>> {
            let mut ps = Vec::new();
            pieces(&a, &src, &items[u], &mut ps)?;
            Ok(ps)
        };
        let fill = |p: &Piece, out: &mut [u8]| p.fill(&src, out);
        let w = write_tensors(
            tmp,
            &units,
            &pieces_of,
            &fill,
            opts.max_shard_bytes,
            opts.threads,
            tick,
        )?;
        write_json(tmp, CONFIG_FILE, src.config())?;
        if direction == Direction::HfToNative {
            write_json(tmp, NATIVE_SIDECAR, &sidecar_json(&a))?;
        }
        let verified = if opts.verify {
            verify(&a, &src, tmp, direction)?;
            true
        } else {
            false
        };
        Ok(ConvertReport {
            tensors: items.iter().map(|i| i.outs.len()).sum(),
            bytes: w.bytes,
            files: w.files,
            verified,
        })
    })
}

/// Re-opens the output and checks it through the inverse conversion against the source.
fn verify(a: &FamilyAdapter, src: &HfCheckpoint, out_dir: &Path, dir: Direction) -> Result<()> {
    let out = HfCheckpoint::open(out_dir)?;
    let mismatch = |k: &str| {
        AdapterError::Tensor(format!(
            "verify: '{k}' in {} differs from the source through the inverse conversion",
            out_dir.display()
        ))
    };
    let (hf, native) = match dir {
        Direction::HfToNative => (src, &out),
        Direction::NativeToHf => (&out, src),
    };
    if hf.keys().len() + a.groups().len()
        != native.keys().len()
            + a.groups()
                .iter()
                .map(|g| g.disk_keys(a.config().num_experts).len())
                .sum::<usize>()
    {
        return Err(AdapterError::Tensor(format!(
            "verify: {} HF keys and {} native keys do not match the {} expert groups",
            hf.keys().len(),
            native.keys().len(),
            a.groups().len()
        )));
    }
    a.validate(hf)?;
    // Tasks: pass-through keys, and per group / disk tensor / batch of experts (the same pieces
    // as the writer), checked in parallel; each task holds at most one piece in memory.
    enum Check<'a> {
        Same(&'a str),
        Experts(&'a str, &'a Group, usize, usize, usize),
    }
    let mut tasks = Vec::new();
    for k in native.keys() {
        match a.group_of(k) {
            None => tasks.push(Check::Same(k)),
            Some(g) => {
                let info = native.info(k)?;
                if info.shape != g.shape {
                    return Err(AdapterError::Shape(format!(
                        "verify: native tensor '{k}' has shape {:?} but config gives {:?}",
                        info.shape, g.shape
                    )));
                }
                let e = g.shape[0];
                for srci in 0..g.disk.len() {
                    let (_, dblock) = g.expert_bytes(info.dtype, srci)?;
                    let step = (PIECE / dblock.max(1)).max(1);
                    for e0 in (0..e).step_by(step) {
                        tasks.push(Check::Experts(k, g, srci, e0, step.min(e - e0)));
                    }
                }
            }
        }
    }
    tasks
        .par_iter()
        .try_for_each_init(Vec::new, |scratch: &mut Vec<u8>, t| -> Result<()> {
            match *t {
                Check::Same(k) => {
                    let hk = a.disk_name_of(k);
                    let (hi, ni) = (hf.info(hk)?, native.info(k)?);
                    if hf.tensor_bytes(hk)? != native.tensor_bytes(k)?
                        || hi.dtype != ni.dtype
                        || hi.shape != ni.shape
                    {
                        return Err(mismatch(hk));
                    }
                }
                Check::Experts(k, g, srci, e0, ne) => {
                    // native -> HF must give the HF checkpoint's bytes
                    let dtype = native.info(k)?.dtype;
                    let (block, dblock) = g.expert_bytes(dtype, srci)?;
                    let nb = native.tensor_bytes(k)?;
                    let part = nb.get(e0 * block..(e0 + ne) * block).unwrap_or(&[]);
                    scratch.resize(ne * dblock, 0);
                    g.fill_disk(part, dtype_size(dtype)?, srci, scratch)?;
                    let d = &g.disk[srci];
                    for j in 0..ne {
                        let hk = d.key_for(e0 + j);
                        let hi = hf.info(&hk)?;
                        let hb = hf.tensor_bytes(&hk)?;
                        let (want, got) = if d.per_expert {
                            (&scratch[j * dblock..(j + 1) * dblock], Some(hb))
                        } else {
                            let r = (e0 + j) * dblock..(e0 + j + 1) * dblock;
                            (&scratch[j * dblock..(j + 1) * dblock], hb.get(r))
                        };
                        if got != Some(want) || hi.dtype != dtype || hi.shape != d.shape {
                            return Err(mismatch(&hk));
                        }
                    }
                }
            }
            Ok(())
        })?;
    Ok(())
}
