//! `checkpoint`: a distributed save of every native tensor of a fixture checkpoint at one mesh
//! (EP over the world), loaded at another mesh (EP x TP, or TP on an odd world: reshard on load),
//! and consolidated on one rank to the HF layout, which must equal the original checkpoint bit for
//! bit. The format is `adapters::dcp` (one file per rank + `.metadata` written last); a save that
//! was not committed must be detected as incomplete.

use crate::gather::all_gather_blobs;
use crate::parallel::shards::indices;
use crate::parallel::{ParallelPlan, Param, PlanKind};
use crate::report::Check;
use crate::roundtrip::{diff_tensor_maps, read_all};
use adapters::dcp::{self, ShardToSave};
use adapters::{adapter_for, HfCheckpoint, HostTensor, MoeAdapter};
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
