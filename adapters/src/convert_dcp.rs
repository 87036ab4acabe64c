//! Conversions to and from torch distributed checkpoints (the `adapters convert --from dcp` /
//! `--to dcp` CLI). No communication, no dtype change; output written atomically
//! ([`crate::out_dir::atomic_dir`]); progress through `tick(bytes)`.
//!
//! - [`dcp_to_safetensors`]: every tensor of a DCP (any [`StorageFormat`]) in full under its fqn,
//!   as sharded safetensors + index: what torch's `dcp_to_torch_save` gives, but streamed: each
//!   output file is filled in windows of row blocks, each block read straight from the memory-
//!   mapped chunks that overlap it (memory: two windows, whatever the model). Non-tensor items are
//!   counted in the report, not converted (safetensors holds tensors only).
//! - [`dcp_to_hf`]: a DCP of a model (keys in the family's HF disk naming, transformers 5.x's
//!   in-memory naming or the native one) to the model's HF disk layout: the tensors in full (as
//!   above), then through the family adapter (`convert` HF -> native -> HF) when the layouts
//!   differ.
//! - [`hf_to_dcp`]: an HF checkpoint to a DCP in the native layout, sharded by a plan (a mesh and
//!   per-tensor placements, or a named plan of [`placement::parallel::named_plan`]); each rank's
//!   shard read with `from_hf_local` / index gathers and saved with [`crate::dcp::save_rank`], as
//!   every rank of a torchtitan-style convert-from-HF step would.

use crate::checkpoint::{HfCheckpoint, CONFIG_FILE};
use crate::convert::{
    convert, native_adapter, sidecar_json, ConvertOptions, Direction, NATIVE_SIDECAR, PIECE,
};
use crate::dcp::{self, DcpCheckpoint, ShardToSave, StorageFormat};
use crate::error::{AdapterError, Result};
use crate::family::{spec_for, ExpertStyle, FamilyConfig};
use crate::family_adapter::{FamilyAdapter, LayoutChoice};
use crate::layout::DiskLayout;
use crate::model_shapes::ModelShapes;
use crate::out_dir::{atomic_dir, write_json, write_tensors};
use crate::stream_write::OutTensor;
use crate::tensor::{dtype_size, HostTensor};
use crate::MoeAdapter;
use placement::chunks::saves_shard;
use placement::parallel::{named_plan, NamedPlan};
use placement::{local_shard, DeviceMesh, IndexSet, Placement};
use rayon::prelude::*;
use serde_json::{json, Value};
use std::path::Path;

/// What a DCP conversion did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DcpConvertReport {
    /// Tensors written.
    pub tensors: usize,
    /// Tensor bytes written (headers excluded).
    pub bytes: u64,
    /// Files written (safetensors files, or DCP data files).
    pub files: usize,
    /// Non-tensor items of the source that were not converted.
    pub skipped_items: usize,
    /// Whether the output was verified.
    pub verified: bool,
}

/// A row block `[r0, r1)` of dim 0 of tensor `key` (the whole tensor for a 0-d one).
struct Rows<'a> {
    key: &'a str,
    rows: std::ops::Range<usize>,
}

/// The row blocks of a tensor of `shape`, each at most [`PIECE`] bytes (at least one row).
fn row_blocks(shape: &[usize], elem: usize) -> Vec<(std::ops::Range<usize>, usize)> {
    let Some((&n0, rest)) = shape.split_first() else {
        return vec![(0..1, elem)];
    };
    let row = rest.iter().product::<usize>() * elem;
    if n0 == 0 || row == 0 {
        return vec![(0..n0, 0)];
    }
    let per = (PIECE / row).max(1);
    (0..n0)
        .step_by(per)
        .map(|r| (r..(r + per).min(n0), ((r + per).min(n0) - r) * row))
        .collect()
}

/// Reads rows `rows` of `key` (all of every other dim) into `out`.
fn read_rows(
    ck: &DcpCheckpoint,
    key: &str,
    rows: &std::ops::Range<usize>,
    out: &mut [u8],
) -> Result<()> {
    let shape = ck.global_shape(key)?;
    let mut want = Vec::with_capacity(shape.len());
    if let Some((_, rest)) = shape.split_first() {
        want.push(IndexSet::from_range(rows.clone()));
        want.extend(rest.iter().map(|&n| IndexSet::full(n)));
    }
    ck.read_into(key, &want, out)
}

/// Writes every tensor of `ck` in full, keys renamed by `rename`, into `dir`.
fn write_full(
    ck: &DcpCheckpoint,
    dir: &Path,
    rename: &(dyn Fn(&str) -> String + Sync),
    opts: &ConvertOptions,
    tick: &(dyn Fn(u64) + Sync),
) -> Result<(usize, u64, usize)> {
    let keys = ck.keys();
    let mut units: Vec<(String, Vec<OutTensor>)> = Vec::with_capacity(keys.len());
    for k in &keys {
        units.push((
            k.clone(),
            vec![(rename(k), ck.dtype(k)?, ck.global_shape(k)?.to_vec())],
        ));
    }
    units.sort_by(|a, b| a.1[0].0.cmp(&b.1[0].0));
    for w in units.windows(2) {
        if w[0].1[0].0 == w[1].1[0].0 {
            return Err(AdapterError::Tensor(format!(
                "'{}' and '{}' both map to '{}'",
                w[0].0, w[1].0, w[0].1[0].0
            )));
        }
    }
    let outs: Vec<Vec<OutTensor>> = units.iter().map(|u| u.1.clone()).collect();
    let pieces = |u: usize| -> Result<Vec<(Rows, usize)>> {
        let key = units[u].0.as_str();
        let elem = dtype_size(ck.dtype(key)?)?;
        Ok(row_blocks(ck.global_shape(key)?, elem)
            .into_iter()
            .map(|(rows, n)| (Rows { key, rows }, n))
            .collect())
    };
    let fill = |p: &Rows, out: &mut [u8]| read_rows(ck, p.key, &p.rows, out);
    let w = write_tensors(
        dir,
        &outs,
        &pieces,
        &fill,
        opts.max_shard_bytes,
        opts.threads,
        tick,
    )?;
    Ok((keys.len(), w.bytes, w.files))
}

/// Checks every tensor of `out_dir` (a safetensors checkpoint) against `ck` read again, in
/// parallel one tensor at a time per worker. Errors name the key.
fn verify_full(
    ck: &DcpCheckpoint,
    out_dir: &Path,
    rename: &(dyn Fn(&str) -> String + Sync),
) -> Result<()> {
    let out = HfCheckpoint::open(out_dir)?;
    if out.keys().len() != ck.keys().len() {
        return Err(AdapterError::Tensor(format!(
            "verify: {} holds {} tensors, the checkpoint {}",
            out_dir.display(),
            out.keys().len(),
            ck.keys().len()
        )));
    }
    ck.keys().par_iter().try_for_each(|k| -> Result<()> {
        let want = ck.read_full(k)?;
        let name = rename(k);
        let info = out.info(&name)?;
        if info.dtype != want.dtype
            || info.shape != want.shape
            || out.tensor_bytes(&name)? != want.data.as_slice()
        {
            return Err(AdapterError::Tensor(format!(
                "verify: '{name}' in {} differs from '{k}' of the checkpoint",
                out_dir.display()
            )));
        }
        Ok(())
    })
}

/// `DCP_DIR` -> every tensor in full under its fqn, sharded safetensors + index in `dst`
/// (module docs). `opts.verify` re-reads the output and compares every tensor with the DCP.
///
/// Errors: anything [`dcp::open`] reports (one line naming the file and key), `dst` existing, I/O.
pub fn dcp_to_safetensors(
    src: &Path,
    dst: &Path,
    opts: &ConvertOptions,
    tick: &(dyn Fn(u64) + Sync),
) -> Result<DcpConvertReport> {
    let ck = dcp::open(src)?;
    let same = |k: &str| k.to_string();
    atomic_dir(dst, |tmp| {
        let (tensors, bytes, files) = write_full(&ck, tmp, &same, opts, tick)?;
        if opts.verify {
            verify_full(&ck, tmp, &same)?;
        }
        Ok(DcpConvertReport {
            tensors,
            bytes,
            files,
            skipped_items: ck.bytes_items().len(),
            verified: opts.verify,
        })
    })
}

/// `LAYERS.N.mlp.{experts.,gate.}...` -> the family's disk MoE module when its modules do not
/// include `mlp` (transformers 5.x names Mixtral's `block_sparse_moe` `mlp` in memory).
fn transformers_to_disk(spec_modules: &[&str], router: &str, key: &str) -> String {
    if spec_modules.contains(&"mlp") {
        return key.to_string();
    }
    let m = spec_modules[0];
    for (from, to) in [
        (".mlp.experts.", format!(".{m}.experts.")),
        (".mlp.gate.", format!(".{m}.{router}.")),
    ] {
        if let Some(at) = key.find(from) {
            if key[..at]
                .rsplit('.')
                .next()
                .is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit()))
            {
                return format!("{}{to}{}", &key[..at], &key[at + from.len()..]);
            }
        }
    }
    key.to_string()
}

/// The HF disk layout to write for the model in `model_dir`: the layout of its weights when it
/// has any, else the family's (per-expert; GPT-OSS and Step-3.5 their own; Qwen3-VL-MoE the fused
/// `[E, 2I, H]` transformers 5.x writes), with `prefix` and the optional tensors of the source.
fn target_layout(
    model_dir: &Path,
    model_type: &str,
    prefix: &str,
    optional: [bool; 4],
) -> Result<LayoutChoice> {
    let has_weights = std::fs::read_dir(model_dir)
        .map_err(|e| AdapterError::io(model_dir, e))?
        .flatten()
        .any(|e| e.file_name().to_string_lossy().ends_with(".safetensors"));
    if has_weights {
        return Ok(
            FamilyAdapter::from_checkpoint(&HfCheckpoint::open(model_dir)?)?.layout_choice(),
        );
    }
    let spec = spec_for(model_type)?;
    let layout = match spec.experts {
        ExpertStyle::GptOss => DiskLayout::GptOss,
        ExpertStyle::Step35 => DiskLayout::Step35,
        _ if model_type.starts_with("qwen3_vl_moe") => DiskLayout::FusedTransposed,
        _ => DiskLayout::PerExpert,
    };
    Ok(LayoutChoice {
        prefix: prefix.to_string(),
        moe_module: spec.moe_modules[0],
        layout,
        optional,
    })
}

/// `DCP_DIR` of a model -> the model's HF disk layout in `dst` (module docs); `model_dir` holds
/// its `config.json` (and optionally weights, whose layout is then the target). `dst` gets the
/// tensors and `config.json`.
///
/// Errors: [`dcp::open`]'s; a bad config; the adapter's (missing or unexpected expert keys,
/// shapes that do not fit the config: one line naming the key); `dst` existing; I/O.
pub fn dcp_to_hf(
    src: &Path,
    dst: &Path,
    model_dir: &Path,
    opts: &ConvertOptions,
    tick: &(dyn Fn(u64) + Sync),
) -> Result<DcpConvertReport> {
    let ck = dcp::open(src)?;
    let cfg_path = model_dir.join(CONFIG_FILE);
    let cfg_text = crate::input::read_regular_string(&cfg_path)?;
    let config: Value = crate::input::parse_json_strict(&cfg_text)
        .map_err(|e| AdapterError::Config(format!("{}: not JSON: {e}", cfg_path.display())))?;
    let mt = config
        .get("model_type")
        .and_then(Value::as_str)
        .ok_or_else(|| {
            AdapterError::Config(format!(
                "{}: missing field 'model_type'",
                cfg_path.display()
            ))
        })?
        .to_string();
    let spec = spec_for(&mt)?;
    let family = FamilyConfig::from_json(&spec, &config)?;
    // The seed bug surfaces here, named on the checkpoint (not on a staged file).
    let shapes = ModelShapes::from_config(&config)
        .map_err(|e| AdapterError::Config(format!("{}: {e}", cfg_path.display())))?;
    for k in ck.keys() {
        let cands = shapes.candidates(&k);
        let got = ck.global_shape(&k)?;
        if let Some(first) = cands.first() {
            if !cands.iter().any(|c| c.shape == got) {
                return Err(AdapterError::Shape(format!(
                    "checkpoint {}: tensor '{k}' has global shape {got:?} but {} expects {:?} ({}); `conformance dcp --model` names the placement its chunks fit",
                    src.display(),
                    cfg_path.display(),
                    first.shape,
                    first.dims
                )));
            }
        }
    }
    let rename = |k: &str| transformers_to_disk(spec.moe_modules, spec.router, k);
    let stage = dst.with_file_name(format!(
        ".{}.stage-{}",
        dst.file_name()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default(),
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&stage);
    let result = (|| -> Result<DcpConvertReport> {
        // 1. Every tensor in full, as an HF-like checkpoint in the source's naming.
        let full = stage.join("full");
        let (tensors, _, _) = atomic_dir(&full, |tmp| {
            let r = write_full(&ck, tmp, &rename, opts, tick)?;
            write_json(tmp, CONFIG_FILE, &config)?;
            if opts.verify {
                verify_full(&ck, tmp, &rename)?;
            }
            Ok(r)
        })?;
        let staged = HfCheckpoint::open(&full)?;
        let native_src = staged.keys().iter().any(|k| {
            k.ends_with(".experts.gate_and_up_projs") || k.ends_with(".experts.down_projs")
        });
        let (src_choice, native_dir) = if native_src {
            let prefix = if staged
                .keys()
                .iter()
                .any(|k| k.starts_with("model.language_model.layers."))
            {
                "model.language_model.layers"
            } else {
                "model.layers"
            };
            let has = |s: &str| staged.keys().iter().any(|k| k.contains(s));
            let optional = [
                has(".mlp.gate.bias"),
                has("e_score_correction_bias"),
                has(".mlp.shared_experts."),
                has(".mlp.shared_expert_gate."),
            ];
            (None, (prefix.to_string(), optional, full.clone()))
        } else {
            let a = FamilyAdapter::from_checkpoint(&staged)?;
            let c = a.layout_choice();
            (
                Some(c.clone()),
                (c.prefix.clone(), c.optional, full.clone()),
            )
        };
        let (prefix, optional, _) = &native_dir;
        let target = target_layout(model_dir, &mt, prefix, *optional)?;
        // 2. Same layout: the staged tensors are the result.
        if src_choice.as_ref() == Some(&target) {
            std::fs::rename(&full, dst).map_err(|e| AdapterError::io(dst, e))?;
            return Ok(DcpConvertReport {
                tensors,
                bytes: staged_bytes(&staged)?,
                files: staged.files().len(),
                skipped_items: ck.bytes_items().len(),
                verified: opts.verify,
            });
        }
        // 3. Through the native layout.
        let native = if native_src {
            full.clone()
        } else {
            let n = stage.join("native");
            convert(&full, &n, Direction::HfToNative, opts, &|_| {})?;
            n
        };
        let a = FamilyAdapter::new(spec, family.clone(), target);
        write_json(&native, NATIVE_SIDECAR, &sidecar_json(&a))?;
        native_adapter(&HfCheckpoint::open(&native)?)?;
        let r = convert(&native, dst, Direction::NativeToHf, opts, &|_| {})?;
        Ok(DcpConvertReport {
            tensors: r.tensors,
            bytes: r.bytes,
            files: r.files,
            skipped_items: ck.bytes_items().len(),
            verified: r.verified && opts.verify,
        })
    })();
    let _ = std::fs::remove_dir_all(&stage);
    result
}

fn staged_bytes(c: &HfCheckpoint) -> Result<u64> {
    let mut b = 0u64;
    for k in c.keys() {
        b += c.tensor_bytes(k)?.len() as u64;
    }
    Ok(b)
}

/// How [`hf_to_dcp`] shards the native tensors.
#[derive(Debug, Clone)]
pub enum DcpPlan {
    /// A named plan (`ep`, `tp`, `ep-tp`, ...) at a world size.
    Named(NamedPlan),
    /// A mesh and, per tensor, the first rule whose pattern matches the native key (`*` matches
    /// any run of characters), else `default` (`R` on every mesh dim when `None`).
    Explicit {
        /// Mesh shape.
        mesh: Vec<usize>,
        /// `(pattern, placements)`, tried in order.
        rules: Vec<(String, Vec<Placement>)>,
        /// Placements of keys no rule matches.
        default: Option<Vec<Placement>>,
    },
}

/// `pattern` (with `*` wildcards) matches all of `s`.
pub fn glob_match(pattern: &str, s: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == s;
    }
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if !s.starts_with(first) || s.len() < first.len() + last.len() || !s.ends_with(last) {
        return false;
    }
    let mut rest = &s[first.len()..s.len() - last.len()];
    for p in &parts[1..parts.len() - 1] {
        match rest.find(p) {
            Some(i) => rest = &rest[i + p.len()..],
            None => return false,
        }
    }
    true
}

impl DcpPlan {
    /// A named plan of `world` ranks. Errors name the known plans.
    pub fn named(name: &str, world: usize) -> Result<Self> {
        named_plan(name, world)
            .map(DcpPlan::Named)
            .map_err(|e| AdapterError::Placement(format!("--plan {name}: {e}")))
    }

    /// The mesh.
    pub fn mesh(&self) -> Result<DeviceMesh> {
        let shape = match self {
            DcpPlan::Named(p) => p.mesh_shape.clone(),
            DcpPlan::Explicit { mesh, .. } => mesh.clone(),
        };
        DeviceMesh::new(shape.clone())
            .map_err(|e| AdapterError::Placement(format!("--mesh {shape:?}: {e}")))
    }

    /// The placements of native key `key`.
    pub fn placements_of(&self, key: &str) -> Vec<Placement> {
        match self {
            DcpPlan::Named(p) => p.placements(NamedPlan::param_of_native_key(key)),
            DcpPlan::Explicit {
                mesh,
                rules,
                default,
            } => rules
                .iter()
                .find(|(pat, _)| glob_match(pat, key))
                .map(|(_, p)| p.clone())
                .or_else(|| default.clone())
                .unwrap_or_else(|| vec![Placement::Replicate; mesh.len()]),
        }
    }

    /// A short description for the report and the checkpoint's `extra`.
    pub fn describe(&self) -> String {
        match self {
            DcpPlan::Named(p) => format!("{} on {:?}", p.name, p.mesh_shape),
            DcpPlan::Explicit {
                mesh,
                rules,
                default,
            } => format!(
                "mesh {mesh:?}, {} rule(s){}",
                rules.len(),
                default
                    .as_ref()
                    .map(|d| format!(", default {}", placement::format_placements(d)))
                    .unwrap_or_default()
            ),
        }
    }
}

/// What [`hf_to_dcp`] saves of one tensor.
struct Planned {
    native: String,
    /// The HF key of a pass-through tensor (`None` for a native expert tensor).
    hf: Option<String>,
    shape: Vec<usize>,
    placements: Vec<Placement>,
}

/// HF checkpoint `src` -> a torch DCP in `dst`, native layout, sharded by `plan` (module docs).
/// `dst` also gets `config.json` and the native sidecar (so [`dcp_to_hf`] and the adapters find
/// the layout again); stock torch ignores them. `opts.verify` reads every tensor back in full and
/// compares it with the source through the adapter.
///
/// Errors (naming the key): the source's (`HfCheckpoint::open`, the adapter's checks);
/// placements that do not fit a tensor or the mesh, `Partial`; `dst` existing; I/O.
pub fn hf_to_dcp(
    src: &Path,
    dst: &Path,
    plan: &DcpPlan,
    opts: &ConvertOptions,
    tick: &(dyn Fn(u64) + Sync),
) -> Result<DcpConvertReport> {
    let ckpt = HfCheckpoint::open(src)?;
    let a = FamilyAdapter::from_checkpoint(&ckpt)?;
    let dtypes = a.validate(&ckpt)?;
    let mesh = plan.mesh()?;
    let mut planned = Vec::new();
    for (g, _) in a.groups().iter().zip(&dtypes) {
        planned.push(Planned {
            native: g.native_key.clone(),
            hf: None,
            shape: g.shape.clone(),
            placements: plan.placements_of(&g.native_key),
        });
    }
    for k in ckpt.keys() {
        if a.is_expert_disk_key(k) {
            continue;
        }
        let n = a.native_name(k).to_string();
        planned.push(Planned {
            placements: plan.placements_of(&n),
            native: n,
            hf: Some(k.to_string()),
            shape: ckpt.info(k)?.shape,
        });
    }
    planned.sort_by(|x, y| x.native.cmp(&y.native));
    for p in &planned {
        placement::check_placements(&mesh, &p.placements, p.shape.len()).map_err(|e| {
            AdapterError::Placement(format!(
                "tensor '{}' {:?}: {}: {e}",
                p.native,
                p.shape,
                placement::format_placements(&p.placements)
            ))
        })?;
    }
    atomic_dir(dst, |tmp| {
        let mut bytes = 0u64;
        for rank in 0..mesh.size() {
            let coord = mesh
                .coordinate(rank)
                .map_err(|e| AdapterError::Placement(e.to_string()))?;
            let mut locals: Vec<(usize, HostTensor)> = Vec::new();
            for (i, p) in planned.iter().enumerate() {
                if !saves_shard(&p.placements, &coord) {
                    continue;
                }
                let t = match &p.hf {
                    None => {
                        a.from_hf_local(&ckpt, &p.native, &mesh, &p.placements, &coord)?
                            .tensor
                    }
                    Some(hk) => {
                        let ls = local_shard(&p.shape, &mesh, &p.placements, &coord)
                            .map_err(|e| AdapterError::Placement(format!("{}: {e}", p.native)))?;
                        let idx: Vec<Vec<usize>> = (0..p.shape.len())
                            .map(|d| ls.dim_indices(d, p.shape[d]).to_vec())
                            .collect();
                        ckpt.tensor_gather(hk, &idx)?
                    }
                };
                bytes += t.data.len() as u64;
                tick(t.data.len() as u64);
                locals.push((i, t));
            }
            let shards: Vec<ShardToSave> = locals
                .iter()
                .map(|(i, t)| ShardToSave {
                    key: &planned[*i].native,
                    local: t,
                    global_shape: &planned[*i].shape,
                    placements: &planned[*i].placements,
                })
                .collect();
            dcp::save_rank(tmp, &mesh, rank, &shards)?;
        }
        let extra = json!({
            "converted_from": "hf",
            "model_type": a.spec().model_type,
            "plan": plan.describe(),
            "mesh": mesh.shape(),
        });
        dcp::commit(tmp, mesh.size(), extra)?;
        write_json(tmp, CONFIG_FILE, ckpt.config())?;
        write_json(tmp, NATIVE_SIDECAR, &sidecar_json(&a))?;
        if opts.verify {
            let ck = dcp::open(tmp)?;
            if ck.format() != StorageFormat::TorchSave {
                return Err(AdapterError::Format("verify: not a torch DCP".into()));
            }
            let full =
                DeviceMesh::new(vec![1]).map_err(|e| AdapterError::Placement(e.to_string()))?;
            planned.par_iter().try_for_each(|p| -> Result<()> {
                let want = match &p.hf {
                    None => {
                        a.from_hf_local(&ckpt, &p.native, &full, &[Placement::Replicate], &[0])?
                            .tensor
                    }
                    Some(hk) => ckpt.tensor(hk)?,
                };
                if ck.read_full(&p.native)? != want {
                    return Err(AdapterError::Tensor(format!(
                        "verify: '{}' in {} differs from the source",
                        p.native,
                        tmp.display()
                    )));
                }
                Ok(())
            })?;
        }
        Ok(DcpConvertReport {
            tensors: planned.len(),
            bytes,
            files: mesh.size(),
            skipped_items: 0,
            verified: opts.verify,
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_and_renames() {
        assert!(glob_match(
            "*.experts.gate_and_up_projs",
            "model.layers.3.mlp.experts.gate_and_up_projs"
        ));
        assert!(glob_match(
            "model.*.down_projs",
            "model.layers.3.mlp.experts.down_projs"
        ));
        assert!(!glob_match(
            "*.down_projs",
            "model.layers.3.mlp.experts.down_proj"
        ));
        assert!(glob_match("a*b*c", "aXbYc") && !glob_match("a*b*c", "aXc"));
        assert!(glob_match("exact", "exact") && !glob_match("exact", "exactly"));
        let m = ["block_sparse_moe"];
        assert_eq!(
            transformers_to_disk(&m, "gate", "model.layers.0.mlp.experts.gate_up_proj"),
            "model.layers.0.block_sparse_moe.experts.gate_up_proj"
        );
        assert_eq!(
            transformers_to_disk(&m, "gate", "model.layers.10.mlp.gate.weight"),
            "model.layers.10.block_sparse_moe.gate.weight"
        );
        assert_eq!(
            transformers_to_disk(&m, "gate", "model.norm.weight"),
            "model.norm.weight"
        );
        assert_eq!(
            transformers_to_disk(&["mlp"], "gate", "model.layers.0.mlp.experts.down_proj"),
            "model.layers.0.mlp.experts.down_proj"
        );
    }

    #[test]
    fn row_blocks_cover_the_tensor() {
        assert_eq!(row_blocks(&[], 4), vec![(0..1, 4)]);
        assert_eq!(row_blocks(&[0, 5], 2), vec![(0..0, 0)]);
        let b = row_blocks(&[1000, 600], 2); // 1200-byte rows, 873 per block
        assert_eq!(b.iter().map(|x| x.1).sum::<usize>(), 1000 * 1200);
        assert!(b.iter().all(|x| x.1 <= PIECE));
        assert_eq!(
            row_blocks(&[3, PIECE], 1),
            vec![(0..1, PIECE), (1..2, PIECE), (2..3, PIECE)]
        );
    }
}
