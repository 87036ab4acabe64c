//! `checkpoint`: a distributed save of every native tensor of a fixture checkpoint at one mesh
//! (EP over the world), loaded at another mesh (EP x TP, or TP on an odd world: reshard on load),
//! and consolidated on one rank to the HF layout, which must equal the original checkpoint bit for
//! bit. At the load mesh, every native shard read and every HF piece `to_hf_local` makes of it
//! carries a label (placements) that `placement::local_shard` must reproduce exactly, and the HF
//! pieces gathered must be the checkpoint's expert tensors. The format is `adapters::dcp` (one
//! file per rank + `.metadata` written last); a save that was not committed must be detected as
//! incomplete.

use crate::gather::{all_gather_blobs, gather_full};
use crate::parallel::shards::indices;
use crate::parallel::{ParallelPlan, Param, PlanKind};
use crate::report::Check;
use crate::roundtrip::{diff_tensor_maps, read_all};
use crate::sharded::compare_full;
use adapters::dcp::{self, ShardToSave};
use adapters::{adapter_for, HfCheckpoint, HostTensor, LocalTensor, MoeAdapter};
use collectives::Communicator;
use placement::Placement;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// A directory every rank of `comm` can use: rank 0 creates it and sends the path. The returned
/// guard (rank 0 only) removes it when dropped. Collective.
pub fn shared_tempdir(
    comm: &dyn Communicator,
) -> Result<(Option<tempfile::TempDir>, PathBuf), String> {
    let (guard, blob) = if comm.rank() == 0 {
        match tempfile::Builder::new()
            .prefix("conformance-dcp-")
            .tempdir()
        {
            Ok(d) => {
                let p = d.path().to_string_lossy().into_owned().into_bytes();
                (Some(d), p)
            }
            Err(e) => (None, format!("\0{e}").into_bytes()),
        }
    } else {
        (None, Vec::new())
    };
    let blobs = all_gather_blobs(comm, &blob)?;
    let path = String::from_utf8_lossy(&blobs[0]).into_owned();
    if let Some(e) = path.strip_prefix('\0') {
        return Err(format!(
            "rank 0 could not create a temporary directory: {e}"
        ));
    }
    Ok((guard, PathBuf::from(path)))
}

/// Every rank's error (or none), agreed on by all: `Err` names the ranks that failed. Collective.
pub fn agree(comm: &dyn Communicator, mine: Result<(), String>) -> Result<(), String> {
    let blob = mine.err().unwrap_or_default().into_bytes();
    let errors: Vec<String> = all_gather_blobs(comm, &blob)?
        .iter()
        .enumerate()
        .filter(|(_, b)| !b.is_empty())
        .map(|(r, b)| format!("rank {r}: {}", String::from_utf8_lossy(b)))
        .collect();
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors.join("; "))
    }
}

/// Which block tensor each native expert key is, over every MoE layer.
fn expert_params(adapter: &dyn MoeAdapter) -> Result<BTreeMap<String, Param>, String> {
    let mut out = BTreeMap::new();
    for layer in adapter.moe_layers() {
        let k = adapter.native_moe_keys(layer).map_err(|e| e.to_string())?;
        out.insert(k.gate_and_up_projs, Param::GateAndUp);
        out.insert(k.down_projs, Param::Down);
        if let Some(b) = k.gate_up_proj_bias {
            out.insert(b, Param::GateUpBias);
        }
        if let Some(b) = k.down_proj_bias {
            out.insert(b, Param::DownBias);
        }
    }
    Ok(out)
}

fn placements_of(
    plan: &ParallelPlan,
    experts: &BTreeMap<String, Param>,
    key: &str,
) -> Vec<Placement> {
    plan.placements(experts.get(key).copied().unwrap_or(Param::Replicated))
}

fn local_of(
    full: &HostTensor,
    plan: &ParallelPlan,
    placements: &[Placement],
    coord: &[usize],
) -> Result<HostTensor, String> {
    let idx = indices(&full.shape, plan, placements, coord)?;
    full.gather(&idx).map_err(|e| e.to_string())
}

fn save(
    dir: &Path,
    plan: &ParallelPlan,
    rank: usize,
    native: &BTreeMap<String, HostTensor>,
    experts: &BTreeMap<String, Param>,
) -> Result<(), String> {
    let coord = plan.mesh.coordinate(rank).map_err(|e| e.to_string())?;
    let mut locals = Vec::new();
    for (key, full) in native {
        let placements = placements_of(plan, experts, key);
        locals.push((
            key,
            local_of(full, plan, &placements, &coord)?,
            placements,
            full,
        ));
    }
    let shards: Vec<ShardToSave> = locals
        .iter()
        .map(|(key, local, placements, full)| ShardToSave {
            key,
            local,
            global_shape: &full.shape,
            placements,
        })
        .collect();
    dcp::save_rank(dir, &plan.mesh, rank, &shards).map_err(|e| e.to_string())?;
    Ok(())
}

/// This rank's native expert shards at `plan`, read from the checkpoint in `step`, and their HF
/// pieces (`to_hf_local`, no communication), with every label problem
/// (`LocalTensor::check_label`) of either layout.
fn hf_pieces(
    step: &Path,
    native: &BTreeMap<String, HostTensor>,
    experts: &BTreeMap<String, Param>,
    adapter: &dyn MoeAdapter,
    plan: &ParallelPlan,
    rank: usize,
) -> Result<(Vec<LocalTensor>, Vec<String>), String> {
    let ck = dcp::open(step).map_err(|e| e.to_string())?;
    let coord = plan.mesh.coordinate(rank).map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    let mut bad = Vec::new();
    for key in experts.keys() {
        let full = native
            .get(key)
            .ok_or_else(|| format!("from_hf produced no '{key}'"))?;
        let placements = placements_of(plan, experts, key);
        let lt = LocalTensor {
            key: key.clone(),
            tensor: ck
                .read_local(key, &plan.mesh, &placements, rank)
                .map_err(|e| e.to_string())?,
            global_shape: full.shape.clone(),
            indices: indices(&full.shape, plan, &placements, &coord)?,
            placements,
        };
        if let Err(e) = lt.check_label(&plan.mesh, &coord) {
            bad.push(e.to_string());
        }
        for hf in adapter.to_hf_local(&lt).map_err(|e| e.to_string())? {
            if let Err(e) = hf.check_label(&plan.mesh, &coord) {
                bad.push(e.to_string());
            }
            out.push(hf);
        }
    }
    Ok((out, bad))
}

/// The checkpoint's own HF tensors for the native expert keys (which HF keys: from the whole-tensor
/// conversion; their bytes: straight from the checkpoint).
fn hf_expected(
    ckpt: &HfCheckpoint,
    adapter: &dyn MoeAdapter,
    native: &BTreeMap<String, HostTensor>,
    experts: &BTreeMap<String, Param>,
) -> Result<BTreeMap<String, HostTensor>, String> {
    let subset: BTreeMap<String, HostTensor> = native
        .iter()
        .filter(|(k, _)| experts.contains_key(*k))
        .map(|(k, t)| (k.clone(), t.clone()))
        .collect();
    let keys = adapter.to_hf(&subset).map_err(|e| e.to_string())?;
    keys.keys()
        .map(|k| Ok((k.clone(), ckpt.tensor(k).map_err(|e| e.to_string())?)))
        .collect()
}

/// Runs the checkpoint checks on the fixture in `dir`. Collective over `comm`.
pub fn run(comm: &dyn Communicator, dir: &Path) -> Result<Vec<Check>, String> {
    let label = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let world = comm.size();
    let rank = comm.rank();
    let ckpt = HfCheckpoint::open(dir).map_err(|e| e.to_string())?;
    let adapter = adapter_for(&ckpt).map_err(|e| e.to_string())?;
    let native = adapter.from_hf(&ckpt).map_err(|e| e.to_string())?;
    let experts = expert_params(adapter.as_ref())?;
    let save_plan = ParallelPlan::new(PlanKind::Ep, world)?;
    let load_kind = if world % 2 == 0 || world == 1 {
        PlanKind::EpTp
    } else {
        PlanKind::Tp
    };
    let load_plan = ParallelPlan::new(load_kind, world)?;
    let (_guard, root) = shared_tempdir(comm)?;
    let step = root.join("step_00000001");
    let partial = root.join("step_00000002");
    let mut checks = Vec::new();
    let tag = format!("{label}: save {} -> load", save_plan.label());

    // Save at EP, commit on rank 0 after everyone wrote.
    let saved = agree(comm, save(&step, &save_plan, rank, &native, &experts));
    let committed = saved.and_then(|()| {
        let mine = if rank == 0 {
            dcp::commit(&step, world, serde_json::json!({"fixture": label}))
                .map_err(|e| e.to_string())
        } else {
            Ok(())
        };
        agree(comm, mine)
    });
    if let Err(e) = committed {
        checks.push(Check::fail(format!("{tag}: distributed save"), e));
        return Ok(checks);
    }
    checks.push(Check::pass(
        format!("{tag}: distributed save"),
        format!("{} tensors, {world} rank files", native.len()),
    ));

    // Reshard on load at the other mesh: every rank's shards equal the direct slices.
    let coord = load_plan.mesh.coordinate(rank).map_err(|e| e.to_string())?;
    let mine: Result<(), String> = (|| {
        let ck = dcp::open(&step).map_err(|e| e.to_string())?;
        let mut bad = Vec::new();
        for (key, full) in &native {
            let placements = placements_of(&load_plan, &experts, key);
            let got = ck
                .read_local(key, &load_plan.mesh, &placements, rank)
                .map_err(|e| e.to_string())?;
            let want = local_of(full, &load_plan, &placements, &coord)?;
            if got != want {
                bad.push(format!(
                    "{key} {}: loaded {:?} {:?} differs from the direct shard {:?}",
                    placement::format_placements(&placements),
                    got.dtype,
                    got.shape,
                    want.shape
                ));
            }
        }
        if bad.is_empty() {
            Ok(())
        } else {
            Err(bad.join("; "))
        }
    })();
    checks.push(match agree(comm, mine) {
        Ok(()) => Check::pass(
            format!("{tag} {}: reshard on load", load_plan.label()),
            "bit-identical shards",
        ),
        Err(e) => Check::fail(format!("{tag} {}: reshard on load", load_plan.label()), e),
    });

    // The adapters' pieces at the load mesh on both layouts: each native expert shard read from
    // the checkpoint, and its HF pieces (`to_hf_local`); every label is checked against
    // `placement::local_shard`, and the HF pieces gathered must be the checkpoint's tensors.
    let pieces = hf_pieces(&step, &native, &experts, adapter.as_ref(), &load_plan, rank);
    let label_problems = match &pieces {
        Ok((_, bad)) if bad.is_empty() => Ok(()),
        Ok((_, bad)) => Err(bad.join("; ")),
        Err(e) => Err(e.clone()),
    };
    let what = format!("{tag} {}: labels on both layouts", load_plan.label());
    checks.push(match agree(comm, label_problems) {
        Ok(()) => Check::pass(what, "native and HF pieces = placement"),
        Err(e) => Check::fail(what, e),
    });
    let hf_locals = pieces.map(|(t, _)| t);
    let gathered = gather_full(comm, &hf_locals);
    checks.push(
        match hf_expected(&ckpt, adapter.as_ref(), &native, &experts) {
            Ok(expected) => compare_full(
                format!(
                    "{tag} {}: to_hf_local pieces gather to the HF experts bit-exact",
                    load_plan.label()
                ),
                &expected,
                gathered,
            ),
            Err(e) => Check::fail(format!("{tag}: HF expert tensors"), e),
        },
    );

    // Consolidation on one rank: read_full of every key, to HF, equal to the original.
    let consolidated: Result<Check, String> = (|| {
        let ck = dcp::open(&step).map_err(|e| e.to_string())?;
        let mut full = BTreeMap::new();
        for key in ck.keys() {
            let t = ck.read_full(&key).map_err(|e| e.to_string())?;
            full.insert(key, t);
        }
        let hf = adapter.to_hf(&full).map_err(|e| e.to_string())?;
        let original = read_all(&ckpt).map_err(|e| e.to_string())?;
        let (diffs, total) = diff_tensor_maps(&original, &hf, 5);
        Ok(Check::expect(
            format!("{tag} 1 rank: consolidated to HF bit-identical"),
            total == 0,
            format!("{} keys", original.len()),
            || format!("{total} differences: {}", diffs.join("; ")),
        ))
    })();
    checks.push(
        consolidated
            .unwrap_or_else(|e| Check::fail(format!("{tag} 1 rank: consolidated to HF"), e)),
    );

    // A save that never committed is detected, and the committed one still loads.
    let wrote = agree(comm, save(&partial, &save_plan, rank, &native, &experts));
    let detected: Result<(), String> = wrote.and_then(|()| match dcp::open(&partial) {
        Ok(_) => Err(format!(
            "{} opened although it was never committed",
            partial.display()
        )),
        Err(e) if e.to_string().contains("incomplete") => dcp::open(&step)
            .map(|_| ())
            .map_err(|e| format!("the previous checkpoint no longer opens: {e}")),
        Err(e) => Err(format!("wrong error for an uncommitted save: {e}")),
    });
    checks.push(match agree(comm, detected) {
        Ok(()) => Check::pass(
            format!("{label}: uncommitted save detected as incomplete"),
            "",
        ),
        Err(e) => Check::fail(
            format!("{label}: uncommitted save detected as incomplete"),
            e,
        ),
    });
    comm.barrier().map_err(|e| e.to_string())?;
    Ok(checks)
}
