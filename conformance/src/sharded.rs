//! `sharded`: each rank of a world builds its local shards of the native expert tensors straight from
//! the HF checkpoint (the init path) for a parallel plan, checks their shapes against `placement`, and
//! the shards gathered over the communicator must equal the single-process native tensors bit for bit.
//! The reverse direction too: each rank's shards converted back with `to_hf_local` (no communication)
//! and gathered must equal the HF checkpoint's expert tensors bit for bit.

use crate::gather::gather_full;
use crate::report::Check;
use crate::roundtrip::diff_tensor_maps;
use adapters::{adapter_for, HfCheckpoint, HostTensor, LocalTensor, MoeAdapter, NativeTensorInfo};
use collectives::Communicator;
use placement::{format_placements, local_shard, validate_global_shape, DeviceMesh, Placement};
use std::collections::BTreeMap;
use std::path::Path;

/// A parallel plan for the expert tensors: a mesh over the world and the placements of
/// `gate_and_up_projs` [E, H, 2I] and `down_projs` [E, I, H] on it.
#[derive(Debug, Clone)]
pub struct Plan {
    pub name: String,
    pub mesh: DeviceMesh,
    pub placements: Vec<Placement>,
}

/// The plans checked at `world` ranks: EP (experts on dim 0 over all ranks) and EP x FSDP (experts on
/// dim 0 over `ep`, then FSDP S(1) over `fsdp` = 2 when the world is even, as NeMo Automodel shards
/// expert weights when there are more FSDP shards than local experts).
pub fn plans(world: usize) -> placement::Result<Vec<Plan>> {
    let fsdp = if world % 2 == 0 { 2 } else { 1 };
    Ok(vec![
        Plan {
            name: format!("EP={world}"),
            mesh: DeviceMesh::with_dim_names(vec![world], vec!["ep".into()])?,
            placements: vec![Placement::Shard(0)],
        },
        Plan {
            name: format!("EP={}xFSDP={fsdp}", world / fsdp),
            mesh: DeviceMesh::with_dim_names(
                vec![world / fsdp, fsdp],
                vec!["ep".into(), "fsdp".into()],
            )?,
            placements: vec![Placement::Shard(0), Placement::Shard(1)],
        },
    ])
}

/// This rank's native shards for `plan`, plus the shape check against `placement` for each.
fn local_native(
    adapter: &dyn MoeAdapter,
    ckpt: &HfCheckpoint,
    infos: &[NativeTensorInfo],
    plan: &Plan,
    rank: usize,
) -> Result<(Vec<LocalTensor>, Vec<String>), String> {
    let coord = plan.mesh.coordinate(rank).map_err(|e| e.to_string())?;
    let mut locals = Vec::new();
    let mut bad = Vec::new();
    for info in infos {
        let lt = adapter
            .from_hf_local(ckpt, &info.key, &plan.mesh, &plan.placements, &coord)
            .map_err(|e| e.to_string())?;
        let expected = local_shard(&info.shape, &plan.mesh, &plan.placements, &coord)
            .map_err(|e| e.to_string())?;
        let indices: Vec<_> = (0..info.shape.len())
            .map(|d| expected.dim_indices(d, info.shape[d]))
            .collect();
        if lt.tensor.shape != expected.local_shape {
            bad.push(format!(
                "{}: local shape {:?}, placement says {:?}",
                info.key, lt.tensor.shape, expected.local_shape
            ));
        } else if lt.indices != indices {
            bad.push(format!(
                "{}: local index sets differ from placement's",
                info.key
            ));
        } else if lt.global_shape != info.shape || lt.placements != plan.placements {
            bad.push(format!(
                "{}: declared {:?} {} != {:?} {}",
                info.key,
                lt.global_shape,
                format_placements(&lt.placements),
                info.shape,
                format_placements(&plan.placements)
            ));
        } else if let Err(e) = validate_global_shape(
            &lt.tensor.shape,
            &info.shape,
            &plan.mesh,
            &plan.placements,
            &coord,
        ) {
            bad.push(format!("{}: {e}", info.key));
        }
        locals.push(lt);
    }
    Ok((locals, bad))
}

/// This rank's HF-layout shards, converted from its native shards without communication.
fn local_hf(
    adapter: &dyn MoeAdapter,
    native: &[LocalTensor],
) -> Result<(Vec<LocalTensor>, Vec<String>), String> {
    let mut out = Vec::new();
    let mut bad = Vec::new();
    for lt in native {
        for hf in adapter.to_hf_local(lt).map_err(|e| e.to_string())? {
            let lens: Vec<usize> = hf.indices.iter().map(|s| s.len()).collect();
            if lens != hf.tensor.shape || hf.global_shape.len() != hf.tensor.shape.len() {
                bad.push(format!(
                    "{}: local shape {:?} but index sets of sizes {lens:?}",
                    hf.key, hf.tensor.shape
                ));
            }
            out.push(hf);
        }
    }
    Ok((out, bad))
}

fn compare_full(
    name: String,
    expected: &BTreeMap<String, HostTensor>,
    got: Result<BTreeMap<String, HostTensor>, String>,
) -> Check {
    match got {
        Err(e) => Check::fail(name, e),
        Ok(got) => {
            let (diffs, total) = diff_tensor_maps(expected, &got, 4);
            Check::expect(
                name,
                total == 0,
                format!("{} tensors", expected.len()),
                || format!("{total} differences: {}", diffs.join("; ")),
            )
        }
    }
}

/// Runs the sharded checks for every plan on the checkpoint in `dir`. Collective over `comm`: every
/// rank must call it with the same `dir`. Local failures become failed checks on every rank.
pub fn run(comm: &dyn Communicator, dir: &Path) -> Vec<Check> {
    let label = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let world = comm.size();
    let rank = comm.rank();
    // Everything a rank reads on its own; errors here are identical on all ranks (same files), so no
    // rank enters a collective another skips.
    let setup = (|| -> Result<_, String> {
        let ckpt = HfCheckpoint::open(dir).map_err(|e| e.to_string())?;
        let adapter = adapter_for(&ckpt).map_err(|e| e.to_string())?;
        let infos = adapter
            .native_expert_tensors(&ckpt)
            .map_err(|e| e.to_string())?;
        let whole = adapter.from_hf(&ckpt).map_err(|e| e.to_string())?;
        let plans = plans(world).map_err(|e| e.to_string())?;
        let mut hf_expected = BTreeMap::new();
        for key in ckpt.keys().into_iter().filter(|k| k.contains(".experts.")) {
            hf_expected.insert(
                key.to_string(),
                ckpt.tensor(key).map_err(|e| e.to_string())?,
            );
        }
        Ok((ckpt, adapter, infos, whole, plans, hf_expected))
    })();
    let (ckpt, adapter, infos, whole, plans, hf_expected) = match setup {
        Ok(s) => s,
        Err(e) => return vec![Check::fail(format!("{label}: sharded setup"), e)],
    };
    let native_expected: BTreeMap<String, HostTensor> = infos
        .iter()
        .filter_map(|i| whole.get(&i.key).map(|t| (i.key.clone(), t.clone())))
        .collect();

    let mut checks = Vec::new();
    for plan in &plans {
        let tag = format!(
            "{label}: {} mesh {:?} {}",
            plan.name,
            plan.mesh.shape(),
            format_placements(&plan.placements)
        );
        let e = adapter.num_experts();
        let ep = plan.mesh.shape()[0];
        if e % ep != 0 {
            checks.push(Check::skip(
                tag,
                format!("{e} experts do not divide over EP={ep} (E % ep must be 0)"),
            ));
            continue;
        }
        let native = local_native(adapter.as_ref(), &ckpt, &infos, plan, rank);
        checks.push(match &native {
            Ok((t, bad)) => Check::expect(
                format!("{tag}: local shapes = placement"),
                bad.is_empty(),
                format!("{} tensors", t.len()),
                || bad.join("; "),
            ),
            Err(e) => Check::fail(format!("{tag}: local shapes = placement"), e.clone()),
        });
        let native_locals = native.map(|(t, _)| t);
        checks.push(compare_full(
            format!("{tag}: gathered native shards bit-exact"),
            &native_expected,
            gather_full(comm, &native_locals),
        ));

        let hf = native_locals.and_then(|t| local_hf(adapter.as_ref(), &t));
        if let Ok((_, bad)) = &hf {
            if !bad.is_empty() {
                checks.push(Check::fail(
                    format!("{tag}: to_hf_local index sets"),
                    bad.join("; "),
                ));
            }
        }
        let hf_locals = hf.map(|(t, _)| t);
        checks.push(compare_full(
            format!("{tag}: to_hf_local shards gather to the HF experts bit-exact"),
            &hf_expected,
            gather_full(comm, &hf_locals),
        ));
    }
    checks
}
