//! `sharded`: each rank of a world builds its local shards of the native expert tensors straight from
//! the HF checkpoint (the init path) for a parallel plan, checks their shapes against `placement`, and
//! the shards gathered over the communicator must equal the single-process native tensors bit for bit.
//! The reverse direction too: each rank's shards converted back with `to_hf_local` (no communication)
//! and gathered must equal the HF checkpoint's expert tensors bit for bit.

use crate::gather::{all_gather_blobs, gather_full};
use crate::report::Check;
use crate::roundtrip::diff_tensor_maps;
use adapters::{adapter_for, HfCheckpoint, HostTensor, LocalTensor, MoeAdapter, NativeTensorInfo};
use collectives::Communicator;
use placement::{format_placements, DeviceMesh, Placement};
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

/// This rank's native shards for `plan`, plus the label check of each: the declared global shape
/// and placements are the plan's, and `LocalTensor::check_label` accepts them.
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
        if lt.global_shape != info.shape || lt.placements != plan.placements {
            bad.push(format!(
                "{}: declared {:?} {} != {:?} {}",
                info.key,
                lt.global_shape,
                format_placements(&lt.placements),
                info.shape,
                format_placements(&plan.placements)
            ));
        } else if let Err(e) = lt.check_label(&plan.mesh, &coord) {
            bad.push(e.to_string());
        }
        locals.push(lt);
    }
    Ok((locals, bad))
}

/// This rank's HF-layout shards, converted from its native shards without communication, and
/// the label check of each (`LocalTensor::check_label`: placements, global shape and coordinate
/// give exactly its local shape and index sets).
fn local_hf(
    adapter: &dyn MoeAdapter,
    native: &[LocalTensor],
    plan: &Plan,
    rank: usize,
) -> Result<(Vec<LocalTensor>, Vec<String>), String> {
    let coord = plan.mesh.coordinate(rank).map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    let mut bad = Vec::new();
    for lt in native {
        for hf in adapter.to_hf_local(lt).map_err(|e| e.to_string())? {
            if let Err(e) = hf.check_label(&plan.mesh, &coord) {
                bad.push(e.to_string());
            }
            out.push(hf);
        }
    }
    Ok((out, bad))
}

/// A check that the gathered `got` equals `expected` bit for bit (every key, every byte).
pub(crate) fn compare_full(
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

/// Everything a rank reads on its own before any collective.
struct Setup {
    ckpt: HfCheckpoint,
    adapter: Box<dyn MoeAdapter>,
    infos: Vec<NativeTensorInfo>,
    native_expected: BTreeMap<String, HostTensor>,
    hf_expected: BTreeMap<String, HostTensor>,
    plans: Vec<Plan>,
}

fn setup(dir: &Path, world: usize) -> Result<Setup, String> {
    let ckpt = HfCheckpoint::open(dir).map_err(|e| e.to_string())?;
    let adapter = adapter_for(&ckpt).map_err(|e| e.to_string())?;
    let infos = adapter
        .native_expert_tensors(&ckpt)
        .map_err(|e| e.to_string())?;
    if infos.is_empty() {
        return Err(format!("{}: no MoE expert tensors found", dir.display()));
    }
    let whole = adapter.from_hf(&ckpt).map_err(|e| e.to_string())?;
    let native_expected: BTreeMap<String, HostTensor> = infos
        .iter()
        .map(|i| {
            let t = whole
                .get(&i.key)
                .ok_or_else(|| format!("from_hf produced no '{}'", i.key))?;
            Ok((i.key.clone(), t.clone()))
        })
        .collect::<Result<_, String>>()?;
    // Which HF keys the expert tensors cover comes from the whole-tensor conversion; their bytes come
    // straight from the checkpoint, independently of the adapter.
    let hf_keys = adapter.to_hf(&native_expected).map_err(|e| e.to_string())?;
    let mut hf_expected = BTreeMap::new();
    for key in hf_keys.keys() {
        hf_expected.insert(key.clone(), ckpt.tensor(key).map_err(|e| e.to_string())?);
    }
    let plans = plans(world).map_err(|e| e.to_string())?;
    Ok(Setup {
        ckpt,
        adapter,
        infos,
        native_expected,
        hf_expected,
        plans,
    })
}

/// Runs the sharded checks for every plan on the checkpoint in `dir`. Collective over `comm`: every
/// rank must call it with the same `dir`. `Err` when the checkpoint cannot be used on some rank
/// (every rank returns the same error: the ranks agree on it before any other collective, so a
/// failure on one rank never leaves the others waiting in a different collective).
pub fn run(comm: &dyn Communicator, dir: &Path) -> Result<Vec<Check>, String> {
    let label = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let rank = comm.rank();
    let mine = setup(dir, comm.size());
    let my_error = mine
        .as_ref()
        .err()
        .map(|e| e.as_bytes().to_vec())
        .unwrap_or_default();
    let errors: Vec<(usize, String)> = all_gather_blobs(comm, &my_error)?
        .into_iter()
        .enumerate()
        .filter(|(_, b)| !b.is_empty())
        .map(|(r, b)| (r, String::from_utf8_lossy(&b).into_owned()))
        .collect();
    if let Some((_, first)) = errors.first() {
        return Err(
            if errors.iter().all(|(_, e)| e == first) && errors.len() == comm.size() {
                first.clone()
            } else {
                errors
                    .iter()
                    .map(|(r, e)| format!("rank {r}: {e}"))
                    .collect::<Vec<_>>()
                    .join("; ")
            },
        );
    }
    let Setup {
        ckpt,
        adapter,
        infos,
        native_expected,
        hf_expected,
        plans,
    } = mine.map_err(|e| format!("rank {rank}: {e}"))?;

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
                format!("{tag}: from_hf_local labels = placement"),
                bad.is_empty(),
                format!("{} tensors", t.len()),
                || bad.join("; "),
            ),
            Err(e) => Check::fail(
                format!("{tag}: from_hf_local labels = placement"),
                e.clone(),
            ),
        });
        let native_locals = native.map(|(t, _)| t);
        checks.push(compare_full(
            format!("{tag}: gathered native shards bit-exact"),
            &native_expected,
            gather_full(comm, &native_locals),
        ));

        let hf = native_locals.and_then(|t| local_hf(adapter.as_ref(), &t, plan, rank));
        checks.push(match &hf {
            Ok((t, bad)) => Check::expect(
                format!("{tag}: to_hf_local labels = placement"),
                bad.is_empty(),
                format!("{} tensors", t.len()),
                || bad.join("; "),
            ),
            Err(e) => Check::fail(format!("{tag}: to_hf_local labels = placement"), e.clone()),
        });
        let hf_locals = hf.map(|(t, _)| t);
        checks.push(compare_full(
            format!("{tag}: to_hf_local shards gather to the HF experts bit-exact"),
            &hf_expected,
            gather_full(comm, &hf_locals),
        ));
    }
    Ok(checks)
}
