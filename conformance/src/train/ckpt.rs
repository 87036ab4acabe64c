//! Checkpointing: the state as DCP tensors with their placements, save (with the fault
//! injection of `--kill`), load at the current plan (reshard on load), and the gathered weights.

use super::*;

/// This rank's tensors (params and moments) as checkpoint shards.
pub(super) fn checkpoint_tensors(
    state: &State,
) -> Result<Vec<(String, HostTensor, Param)>, String> {
    let mut out = Vec::new();
    let params = tensors_of(&state.blocks, &state.head);
    for (i, (key, param, a)) in params.into_iter().enumerate() {
        out.push((format!("model.{key}"), host(&a)?, param));
        out.push((
            format!("optim.exp_avg.{key}"),
            host(&state.exp_avg[i])?,
            param,
        ));
        out.push((
            format!("optim.exp_avg_sq.{key}"),
            host(&state.exp_avg_sq[i])?,
            param,
        ));
    }
    Ok(out)
}

pub(super) fn global_of(ckpt_key: &str) -> Vec<usize> {
    let key = ckpt_key
        .trim_start_matches("model.")
        .trim_start_matches("optim.exp_avg_sq.")
        .trim_start_matches("optim.exp_avg.");
    global_shape(key)
}

#[derive(Serialize, Deserialize)]
pub(super) struct Extra {
    pub(super) step: u64,
    pub(super) data_seed: u64,
    pub(super) data_word_pos: String,
    pub(super) plan: String,
    pub(super) mesh: Vec<usize>,
}

pub(super) fn kill(args: &TrainArgs, rank: usize, what: &str) -> Result<(), String> {
    let msg = format!("rank {rank} killed {what} (fault injection)");
    if args.hard_kill {
        eprintln!("conformance train: {msg}");
        std::process::exit(137);
    }
    Err(msg)
}

pub(super) fn save(
    dir: &Path,
    comm: &dyn Communicator,
    plan: &ParallelPlan,
    state: &State,
    data: &Data,
    args: &TrainArgs,
) -> Result<(), String> {
    let rank = comm.rank();
    let tensors = checkpoint_tensors(state)?;
    let shapes: Vec<Vec<usize>> = tensors.iter().map(|(k, _, _)| global_of(k)).collect();
    let placements: Vec<_> = tensors
        .iter()
        .map(|(_, _, p)| plan.placements(*p))
        .collect();
    let shards: Vec<ShardToSave> = tensors
        .iter()
        .zip(&shapes)
        .zip(&placements)
        .map(|(((key, local, _), shape), placements)| ShardToSave {
            key,
            local,
            global_shape: shape,
            placements,
        })
        .collect();
    let limit = match args.kill {
        Some(Kill::MidWrite { rank: r, step }) if r == rank && step == state.step => Some(true),
        Some(Kill::DiskFull { rank: r, step }) if r == rank && step == state.step => Some(false),
        _ => None,
    };
    let saved = match limit {
        Some(crash) => {
            let half: usize = tensors.iter().map(|(_, t, _)| t.data.len()).sum::<usize>() / 2;
            eprintln!(
                "conformance train: rank {rank}: file-size limit {half} bytes during the save of step {} ({}, fault injection)",
                state.step,
                if crash { "SIGXFSZ kills" } else { "writes fail with EFBIG" }
            );
            Some(crate::fault::limit_file_size(half as u64, crash)?)
        }
        None => None,
    };
    let wrote = dcp::save_rank(dir, &plan.mesh, rank, &shards)
        .map(|_| ())
        .map_err(|e| e.to_string());
    if let Some(s) = saved {
        crate::fault::restore(s)?;
    }
    if args.kill
        == Some(Kill::InSave {
            rank,
            step: state.step,
        })
    {
        kill(
            args,
            rank,
            &format!("during the save of step {}", state.step),
        )?;
    }
    agree(comm, wrote)?;
    let extra = Extra {
        step: state.step,
        data_seed: SEED_DATA,
        data_word_pos: data.rng.get_word_pos().to_string(),
        plan: plan.kind.name().to_string(),
        mesh: plan.mesh.shape().to_vec(),
    };
    let committed = if rank == 0 {
        serde_json::to_value(&extra)
            .map_err(|e| e.to_string())
            .and_then(|v| dcp::commit(dir, comm.size(), v).map_err(|e| e.to_string()))
    } else {
        Ok(())
    };
    agree(comm, committed)
}

/// Loads `dir` at this plan's placements.
pub(super) fn load(dir: &Path, plan: &ParallelPlan, rank: usize) -> Result<(State, Data), String> {
    let ck = dcp::open(dir).map_err(|e| e.to_string())?;
    let extra: Extra = serde_json::from_value(ck.extra().clone())
        .map_err(|e| format!("{}: metadata: {e}", dir.display()))?;
    let coord = plan.mesh.coordinate(rank).map_err(|e| e.to_string())?;
    let mut state = State::init(plan, &coord)?;
    let keys: Vec<(String, Param)> = tensors_of(&state.blocks, &state.head)
        .into_iter()
        .map(|(k, p, _)| (k, p))
        .collect();
    let read = |name: String, p: Param| -> Result<Array<f32, ndarray::IxDyn>, String> {
        let t = ck
            .read_local(&name, &plan.mesh, &plan.placements(p), rank)
            .map_err(|e| e.to_string())?;
        if t.dtype != Dtype::F32 {
            return Err(format!(
                "{name}: dtype {} in the checkpoint, expected F32",
                t.dtype
            ));
        }
        Array::from_shape_vec(
            ndarray::IxDyn(&t.shape),
            t.to_f32_vec().map_err(|e| e.to_string())?,
        )
        .map_err(|e| e.to_string())
    };
    let mut params = Vec::new();
    state.exp_avg.clear();
    state.exp_avg_sq.clear();
    for (key, p) in keys {
        params.push(read(format!("model.{key}"), p)?);
        state.exp_avg.push(read(format!("optim.exp_avg.{key}"), p)?);
        state
            .exp_avg_sq
            .push(read(format!("optim.exp_avg_sq.{key}"), p)?);
    }
    set_tensors(&mut state.blocks, &mut state.head, params)?;
    state.step = extra.step;
    if extra.data_seed != SEED_DATA {
        return Err(format!(
            "{}: data seed {} != {SEED_DATA}",
            dir.display(),
            extra.data_seed
        ));
    }
    let pos: u128 = extra
        .data_word_pos
        .parse()
        .map_err(|e| format!("{}: data position: {e}", dir.display()))?;
    Ok((state, Data::new(pos)))
}

/// Gathers the full parameters (rank 0 gets them; collective).
pub(super) fn gather_params(
    comm: &dyn Communicator,
    plan: &ParallelPlan,
    coord: &[usize],
    state: &State,
) -> Result<BTreeMap<String, HostTensor>, String> {
    let shapes = FullShapes {
        gate_weight: vec![EXPERTS, HIDDEN],
        gate_and_up_projs: vec![EXPERTS, HIDDEN, 2 * INTER],
        down_projs: vec![EXPERTS, INTER, HIDDEN],
        gate_up_bias: vec![],
        down_bias: vec![],
    };
    let local: Result<Vec<LocalTensor>, String> = (|| {
        let mut out = Vec::new();
        for (l, b) in state.blocks.iter().enumerate() {
            out.extend(b.to_local_tensors(&block_keys(l), plan, coord, &shapes, true)?);
        }
        if !is_extra_replica(&plan.placements(Param::Replicated), coord) {
            out.push(LocalTensor {
                key: HEAD.into(),
                tensor: host(&state.head)?,
                global_shape: vec![HIDDEN, CLASSES],
                placements: plan.placements(Param::Replicated),
                indices: vec![
                    placement::IndexSet::full(HIDDEN),
                    placement::IndexSet::full(CLASSES),
                ],
            });
        }
        Ok(out)
    })();
    gather_full(comm, &local)
}

/// SHA-256 over every tensor's key, shape and bytes in key order.
pub fn digest(weights: &BTreeMap<String, HostTensor>) -> String {
    let mut h = Sha256::new();
    for (k, t) in weights {
        h.update(k.as_bytes());
        h.update(format!("{:?}", t.shape).as_bytes());
        h.update(&t.data);
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

pub(super) fn write_weights(
    path: &Path,
    weights: &BTreeMap<String, HostTensor>,
) -> Result<(), String> {
    let views: Vec<(String, safetensors::tensor::TensorView)> = weights
        .iter()
        .map(|(k, t)| {
            safetensors::tensor::TensorView::new(t.dtype, t.shape.clone(), &t.data)
                .map(|v| (k.clone(), v))
                .map_err(|e| format!("{k}: {e}"))
        })
        .collect::<Result<_, _>>()?;
    safetensors::tensor::serialize_to_file(views, None, path)
        .map_err(|e| format!("{}: {e}", path.display()))
}
