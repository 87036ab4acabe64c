//! `train`: save / resume of a small MoE model trained with AdamW, on any parallel plan.
//!
//! Model: `L` MoE blocks with residual connections (`h = h + moe(h)`, Qwen3-style softmax top-k
//! router, SwiGLU experts) and a linear head `[H, C]`; loss = mean squared error against a fixed
//! teacher `tanh(x W_t)` on synthetic tokens drawn from a ChaCha8 stream (the data position is the
//! stream's word position). The blocks run distributed ([`DistBlock`]) by the plan; replicated
//! parameters' gradients are summed over the ranks holding different tokens.
//!
//! A checkpoint (`adapters::dcp`, one file per rank + `.metadata` written last) holds the model,
//! AdamW's `exp_avg` / `exp_avg_sq` with the same placements, and in its metadata the step, the data
//! RNG (seed, word position) and the plan it was saved at. Resuming reads every tensor at the
//! current plan's placements (reshard on load), so a run can resume on another mesh.
//!
//! Same mesh: a resumed run is bit-identical to an uninterrupted one (every kernel and collective
//! here is deterministic). Another mesh: equal within f32 tolerance (summation orders differ).

use crate::checkpoint::agree;
use crate::gather::gather_full;
use crate::parallel::block::all_reduce;
use crate::parallel::shards::{host, indices, is_extra_replica, take, BlockTensors, FullShapes};
use crate::parallel::{DistBlock, ParallelPlan, Param, PlanComms, PlanKind};
use adapters::dcp::{self, ShardToSave};
use adapters::{Dtype, HostTensor, LocalTensor, NativeMoeKeys};
use collectives::Communicator;
use moe_kernels::{Activation, MoeConfig, RouterKind};
use ndarray::{Array, Array1, Array2, Dimension};
use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

mod ckpt;
mod compare;
mod data;
mod model;

pub use ckpt::digest;
use ckpt::*;
pub use compare::{compare_runs, Compare};
use data::*;
use model::*;
pub use model::{BATCH, CLASSES, EXPERTS, HIDDEN, INTER, LAYERS, TOP_K};

/// Fault injection (tests of the job's failure behaviour).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kill {
    /// `rank` dies at the start of `step`.
    AtStep { rank: usize, step: u64 },
    /// `rank` dies after writing its shard of the step-`step` save, before the commit.
    InSave { rank: usize, step: u64 },
    /// `rank` crashes in the middle of writing its shard file of the step-`step` save: a
    /// file-size limit of half its shard's bytes, at which the kernel kills the process
    /// (`SIGXFSZ`; with the threads backend that is every rank).
    MidWrite { rank: usize, step: u64 },
    /// The disk fills while `rank` writes its shard file of the step-`step` save: writes past
    /// half its shard's bytes fail (`EFBIG`); the save reports the file and the job fails.
    DiskFull { rank: usize, step: u64 },
}

/// What `conformance train` does.
#[derive(Debug, Clone)]
pub struct TrainArgs {
    pub plan: PlanKind,
    /// Train up to this step (inclusive).
    pub steps: u64,
    pub out_dir: PathBuf,
    pub ckpt_root: Option<PathBuf>,
    pub save_every: Option<u64>,
    pub resume: bool,
    pub kill: Option<Kill>,
    /// Kill by exiting the process (MPI: one process per rank) rather than ending the rank's thread.
    pub hard_kill: bool,
}

/// The `train.json` result file.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TrainResult {
    pub plan: String,
    pub world: usize,
    pub mesh: Vec<usize>,
    pub start_step: u64,
    pub steps: u64,
    pub losses: Vec<LossPoint>,
    pub resumed_from: Option<String>,
    pub incomplete_skipped: Vec<String>,
    pub weights_digest: String,
}

/// One step's loss.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
pub struct LossPoint {
    pub step: u64,
    pub loss: f64,
}

/// Runs `conformance train` on this rank. Collective over `comm`.
pub fn run_rank(comm: &dyn Communicator, args: &TrainArgs) -> Result<(), String> {
    let rank = comm.rank();
    let plan = ParallelPlan::new(args.plan, comm.size())?;
    let comms = PlanComms::new(comm, &plan)?;
    let mut resumed_from = None;
    let mut incomplete = Vec::new();
    let (mut state, mut data) = if args.resume {
        let root = args
            .ckpt_root
            .as_ref()
            .ok_or("--resume needs --ckpt-root")?;
        let steps = dcp::list_steps(root).map_err(|e| e.to_string())?;
        let latest = steps.iter().rev().find(|(_, _, complete)| *complete);
        for (_, dir, complete) in &steps {
            let newer = latest.map_or(true, |(_, l, _)| dir > l);
            if !complete && newer {
                incomplete.push(dir.display().to_string());
                if rank == 0 {
                    eprintln!(
                        "conformance train: skipping incomplete checkpoint {} (no .metadata: a save did not finish)",
                        dir.display()
                    );
                }
            }
        }
        let (_, dir, _) = latest
            .ok_or_else(|| format!("--resume: no complete checkpoint under {}", root.display()))?;
        resumed_from = Some(dir.display().to_string());
        load(dir, &plan, rank)?
    } else {
        (State::init(&plan, &comms.coord)?, Data::new(0))
    };
    let start_step = state.step;
    let mut losses = Vec::new();
    while state.step < args.steps {
        let next = state.step + 1;
        if args.kill == Some(Kill::AtStep { rank, step: next }) {
            kill(args, rank, &format!("at the start of step {next}"))?;
        }
        let (x, y) = data.next_batch();
        let (loss, grads) = step(&state, &plan, &comms, &x, &y)?;
        state.step = next;
        state.adamw(grads)?;
        losses.push(LossPoint {
            step: next,
            loss: f64::from(loss),
        });
        if let (Some(root), Some(every)) = (&args.ckpt_root, args.save_every) {
            if every > 0 && next % every == 0 {
                save(&dcp::step_dir(root, next), comm, &plan, &state, &data, args)?;
            }
        }
    }
    let weights = gather_params(comm, &plan, &comms.coord, &state)?;
    if rank == 0 {
        std::fs::create_dir_all(&args.out_dir)
            .map_err(|e| format!("{}: {e}", args.out_dir.display()))?;
        write_weights(&args.out_dir.join("weights.safetensors"), &weights)?;
        let result = TrainResult {
            plan: args.plan.name().into(),
            world: comm.size(),
            mesh: plan.mesh.shape().to_vec(),
            start_step,
            steps: args.steps,
            losses,
            resumed_from,
            incomplete_skipped: incomplete,
            weights_digest: digest(&weights),
        };
        let text = serde_json::to_string_pretty(&result).map_err(|e| e.to_string())?;
        let path = args.out_dir.join("train.json");
        std::fs::write(&path, text).map_err(|e| format!("{}: {e}", path.display()))?;
    }
    comm.barrier().map_err(|e| format!("final barrier: {e}"))
}
