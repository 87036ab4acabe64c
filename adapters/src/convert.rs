//! Streaming checkpoint conversion HF <-> native (the `adapters convert` CLI).
//!
//! - Streaming: output tensors are produced one ITEM at a time (a pass-through tensor, one native
//!   expert group, or, native -> per-expert HF, one expert of a group) straight from the mmapped
//!   source, and each safetensors file is written header first, then tensor by tensor, so memory
//!   is bounded by the largest item per worker, not by the model.
//! - Parallel over output files (rayon; `threads` workers).
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
use crate::checkpoint::{HfCheckpoint, CONFIG_FILE, INDEX_FILE, SINGLE_FILE};
use crate::direct_io::OutFile;
use crate::error::{AdapterError, Result};
use crate::family::{spec_for, FamilyConfig};
use crate::family_adapter::{FamilyAdapter, LayoutChoice};
use crate::layout::DiskLayout;
use crate::local::LocalTensor;
use crate::tensor::{dtype_size, HostTensor};
use crate::writer::shard_file_name;
use placement::{IndexSet, Placement};
use rayon::prelude::*;
use safetensors::Dtype;
use serde_json::{json, Value};
use std::borrow::Cow;
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

impl Item {
    fn bytes(&self) -> u64 {
        self.outs
            .iter()
            .map(|(_, d, s)| (s.iter().product::<usize>() * (d.bitsize() / 8)) as u64)
            .sum()
    }
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

fn sidecar_json(a: &FamilyAdapter) -> Value {
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
    let s = std::fs::read_to_string(&path).map_err(|e| AdapterError::io(&path, e))?;
    let v: Value = serde_json::from_str(&s).map_err(|e| bad(format!("not JSON: {e}")))?;
    let spec = spec_for(ckpt.model_type()?)?;
    let config = FamilyConfig::from_json(&spec, ckpt.config())?;
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

/// Produces an item's tensors (bytes in `outs` order).
fn produce<'a>(
    a: &FamilyAdapter,
    src: &'a HfCheckpoint,
    item: &Item,
) -> Result<Vec<Cow<'a, [u8]>>> {
    let full =
        |shape: &[usize]| -> Vec<Vec<usize>> { shape.iter().map(|&n| (0..n).collect()).collect() };
    match &item.source {
        Source::Copy(k) => Ok(vec![Cow::Borrowed(src.tensor_bytes(k)?)]),
        Source::Group(gi) => {
            let g = &a.groups()[*gi];
            Ok(vec![Cow::Owned(g.read(src, &full(&g.shape))?.data)])
        }
        Source::GroupWhole(gi) => {
            let g = &a.groups()[*gi];
            let t = src.tensor(&g.native_key)?;
            let mut by_key: BTreeMap<String, HostTensor> = g.write(&t)?.into_iter().collect();
            item.outs
                .iter()
                .map(|(k, _, _)| {
                    by_key.remove(k).map(|t| Cow::Owned(t.data)).ok_or_else(|| {
                        AdapterError::Tensor(format!("conversion did not produce '{k}'"))
                    })
                })
                .collect()
        }
        Source::GroupExpert(gi, e) => {
            let g = &a.groups()[*gi];
            let info = src.info(&g.native_key)?;
            let bytes = src.tensor_bytes(&g.native_key)?;
            let per = bytes.len() / g.shape[0].max(1);
            let slice = bytes.get(e * per..(e + 1) * per).unwrap_or(&[]);
            let mut by_key: BTreeMap<String, HostTensor> = g
                .write_experts(slice, info.dtype, *e, 1)?
                .into_iter()
                .collect();
            item.outs
                .iter()
                .map(|(k, _, _)| {
                    by_key.remove(k).map(|t| Cow::Owned(t.data)).ok_or_else(|| {
                        AdapterError::Tensor(format!("conversion did not produce '{k}'"))
                    })
                })
                .collect()
        }
    }
}

/// Splits items (sorted) into files of at most `max` bytes (an item larger than `max` alone).
fn plan_files(items: &[Item], max: u64) -> Vec<Vec<usize>> {
    let total: u64 = items.iter().map(Item::bytes).sum();
    if total <= max {
        return vec![(0..items.len()).collect()];
    }
    let mut files: Vec<Vec<usize>> = Vec::new();
    let mut cur = Vec::new();
    let mut cur_b = 0u64;
    for (i, it) in items.iter().enumerate() {
        let b = it.bytes();
        if !cur.is_empty() && cur_b + b > max {
            files.push(std::mem::take(&mut cur));
            cur_b = 0;
        }
        cur.push(i);
        cur_b += b;
    }
    if !cur.is_empty() {
        files.push(cur);
    }
    files
}

/// Writes one safetensors file: header (offsets from the plan) then each item's tensors in
/// order, one item in memory at a time. Returns the bytes written.
fn write_file(
    path: &Path,
    a: &FamilyAdapter,
    src: &HfCheckpoint,
    items: &[&Item],
    tick: &(dyn Fn(u64) + Sync),
) -> Result<u64> {
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), json!({"format": "pt"}));
    let mut off = 0u64;
    for it in items {
        for (k, d, s) in &it.outs {
            let n = (s.iter().product::<usize>() * dtype_size(*d)?) as u64;
            header.insert(
                k.clone(),
                json!({"dtype": d.to_string(), "shape": s, "data_offsets": [off, off + n]}),
            );
            off += n;
        }
    }
    let mut h = serde_json::to_vec(&Value::Object(header))
        .map_err(|e| AdapterError::Format(format!("{}: header: {e}", path.display())))?;
    while h.len() % 8 != 0 {
        h.push(b' ');
    }
    let mut w = OutFile::create(path).map_err(|e| AdapterError::io(path, e))?;
    let io = |e| AdapterError::io(path, e);
    w.write_all(&(h.len() as u64).to_le_bytes()).map_err(io)?;
    w.write_all(&h).map_err(io)?;
    let mut scratch: Vec<u8> = Vec::new();
    for it in items {
        let data = match &it.source {
            Source::Group(gi) => {
                a.groups()[*gi].read_whole_into(src, &mut scratch)?;
                vec![Cow::Borrowed(scratch.as_slice())]
            }
            _ => produce(a, src, it)?,
        };
        for ((k, d, s), bytes) in it.outs.iter().zip(&data) {
            let n = s.iter().product::<usize>() * dtype_size(*d)?;
            if bytes.len() != n {
                return Err(AdapterError::Tensor(format!(
                    "{}: tensor '{k}' produced {} bytes, expected {n}",
                    path.display(),
                    bytes.len()
                )));
            }
            w.write_all(bytes).map_err(io)?;
        }
        tick(it.bytes());
    }
    w.finish().map_err(io)?;
    Ok(off)
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
    let files = plan_files(&items, opts.max_shard_bytes);
    let n = files.len();
    let name = dst_dir
        .file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "out".into());
    let tmp = dst_dir.with_file_name(format!(".{name}.partial-{}", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| AdapterError::io(&tmp, e))?;
    }
    std::fs::create_dir_all(&tmp).map_err(|e| AdapterError::io(&tmp, e))?;
    let result = (|| -> Result<ConvertReport> {
        let names: Vec<String> = (0..n)
            .map(|i| {
                if n == 1 {
                    SINGLE_FILE.to_string()
                } else {
                    shard_file_name(i + 1, n)
                }
            })
            .collect();
        let job = || -> Result<Vec<u64>> {
            files
                .par_iter()
                .zip(names.par_iter())
                .map(|(f, fname)| {
                    let its: Vec<&Item> = f.iter().map(|&i| &items[i]).collect();
                    write_file(&tmp.join(fname), &a, &src, &its, tick)
                })
                .collect()
        };
        let sizes = match opts.threads {
            Some(t) => rayon::ThreadPoolBuilder::new()
                .num_threads(t.max(1))
                .build()
                .map_err(|e| AdapterError::Config(format!("thread pool: {e}")))?
                .install(job)?,
            None => job()?,
        };
        let write_small = |fname: &str, v: &Value| -> Result<()> {
            let p = tmp.join(fname);
            let s = serde_json::to_string_pretty(v)
                .map_err(|e| AdapterError::Format(format!("{fname}: {e}")))?;
            std::fs::write(&p, format!("{s}\n")).map_err(|e| AdapterError::io(&p, e))
        };
        write_small(CONFIG_FILE, src.config())?;
        if direction == Direction::HfToNative {
            write_small(NATIVE_SIDECAR, &sidecar_json(&a))?;
        }
        if n > 1 {
            let mut wm = serde_json::Map::new();
            for (f, fname) in files.iter().zip(&names) {
                for &i in f {
                    for (k, _, _) in &items[i].outs {
                        wm.insert(k.clone(), Value::String(fname.clone()));
                    }
                }
            }
            let total: u64 = sizes.iter().sum();
            write_small(
                INDEX_FILE,
                &json!({"metadata": {"total_size": total}, "weight_map": wm}),
            )?;
        }
        let verified = if opts.verify {
            verify(&a, &src, &tmp, direction)?;
            true
        } else {
            false
        };
        Ok(ConvertReport {
            tensors: items.iter().map(|i| i.outs.len()).sum(),
            bytes: sizes.iter().sum(),
            files: n,
            verified,
        })
    })();
    match result {
        Ok(r) => {
            if let Ok(d) = std::fs::File::open(&tmp) {
                let _ = d.sync_all();
            }
            std::fs::rename(&tmp, dst_dir).map_err(|e| AdapterError::io(dst_dir, e))?;
            Ok(r)
        }
        Err(e) => {
            let _ = std::fs::remove_dir_all(&tmp);
            Err(e)
        }
    }
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
    for k in native.keys() {
        match a.group_of(k) {
            Some(g) => {
                // native -> HF must give the HF checkpoint's bytes
                for (hk, t) in g.write(&native.tensor(k)?)? {
                    if hf.tensor_bytes(&hk)? != t.data.as_slice() || hf.info(&hk)?.dtype != t.dtype
                    {
                        return Err(mismatch(&hk));
                    }
                }
            }
            None => {
                let hk = a.disk_name_of(k);
                if hf.tensor_bytes(hk)? != native.tensor_bytes(k)? {
                    return Err(mismatch(hk));
                }
            }
        }
    }
    Ok(())
}
