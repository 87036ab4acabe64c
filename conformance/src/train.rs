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

/// Sizes of the model: hidden `H`, expert intermediate `I`, experts `E`, top-k, head outputs `C`,
/// MoE blocks `L`, tokens per step `B` (the global batch, split by the plan).
pub const HIDDEN: usize = 16;
pub const INTER: usize = 8;
pub const EXPERTS: usize = 8;
pub const TOP_K: usize = 2;
pub const CLASSES: usize = 4;
pub const LAYERS: usize = 2;
pub const BATCH: usize = 16;
const SEED_INIT: u64 = 20261121;
const SEED_DATA: u64 = 7;
const SEED_TEACHER: u64 = 99;

/// AdamW hyper-parameters (torch.optim.AdamW semantics, bias-corrected, decoupled weight decay).
const LR: f32 = 1e-2;
const BETA1: f32 = 0.9;
const BETA2: f32 = 0.999;
const EPS: f32 = 1e-8;
const WEIGHT_DECAY: f32 = 0.01;

fn moe_config() -> MoeConfig {
    MoeConfig {
        router: RouterKind::SoftmaxTopK {
            norm_topk_prob: true,
        },
        top_k: TOP_K,
        activation: Activation::SwiGlu,
    }
}

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

/// Uniform in [-1, 1) from 24 random bits (exact in f32).
fn uniform(rng: &mut ChaCha8Rng) -> f32 {
    (rng.next_u32() >> 8) as f32 / (1u32 << 23) as f32 - 1.0
}

fn random<D: Dimension, Sh: ndarray::ShapeBuilder<Dim = D>>(
    rng: &mut ChaCha8Rng,
    shape: Sh,
    scale: f32,
) -> Array<f32, D> {
    Array::from_shape_simple_fn(shape, || uniform(rng) * scale)
}

/// Native keys of block `l`'s tensors (checkpoint names).
fn block_keys(l: usize) -> NativeMoeKeys {
    let k = |n: &str| format!("layers.{l}.{n}");
    NativeMoeKeys {
        gate_weight: k("gate_weight"),
        gate_bias: None,
        e_score_correction_bias: None,
        gate_and_up_projs: k("gate_and_up_projs"),
        down_projs: k("down_projs"),
        gate_up_proj_bias: None,
        down_proj_bias: None,
        shared: None,
        shared_gate: None,
    }
}

const HEAD: &str = "head.weight";

/// The full model at initialisation (every rank builds it, then keeps its shards).
fn init_full() -> (Vec<BlockTensors>, Array2<f32>) {
    let mut rng = ChaCha8Rng::seed_from_u64(SEED_INIT);
    let blocks = (0..LAYERS)
        .map(|_| BlockTensors {
            gate_weight: random(&mut rng, (EXPERTS, HIDDEN), 0.5),
            gate_bias: None,
            e_score_correction_bias: None,
            gate_and_up_projs: random(
                &mut rng,
                (EXPERTS, HIDDEN, 2 * INTER),
                1.0 / (HIDDEN as f32).sqrt(),
            ),
            down_projs: random(
                &mut rng,
                (EXPERTS, INTER, HIDDEN),
                0.5 / (INTER as f32).sqrt(),
            ),
            gate_up_bias: None,
            down_bias: None,
            shared: None,
        })
        .collect();
    let head = random(&mut rng, (HIDDEN, CLASSES), 1.0 / (HIDDEN as f32).sqrt());
    (blocks, head)
}

/// The synthetic data stream: ChaCha8 from a fixed seed; its word position is the data position.
struct Data {
    rng: ChaCha8Rng,
    teacher: Array2<f32>,
}

impl Data {
    fn new(word_pos: u128) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(SEED_DATA);
        rng.set_word_pos(word_pos);
        let mut t = ChaCha8Rng::seed_from_u64(SEED_TEACHER);
        Data {
            rng,
            teacher: random(&mut t, (HIDDEN, CLASSES), 1.0),
        }
    }

    /// The next global batch: `x` `[B, H]` and its target `tanh(x W_t)` `[B, C]`.
    fn next_batch(&mut self) -> (Array2<f32>, Array2<f32>) {
        let x: Array2<f32> = random(&mut self.rng, (BATCH, HIDDEN), 1.0);
        let y = x.dot(&self.teacher).mapv(f32::tanh);
        (x, y)
    }
}

/// Parameters, AdamW moments and counters of one rank.
struct State {
    blocks: Vec<BlockTensors>,
    head: Array2<f32>,
    exp_avg: Vec<Array<f32, ndarray::IxDyn>>,
    exp_avg_sq: Vec<Array<f32, ndarray::IxDyn>>,
    step: u64,
}

/// Every trainable tensor of a rank with its key and placement kind, in a fixed order.
fn tensors_of(
    blocks: &[BlockTensors],
    head: &Array2<f32>,
) -> Vec<(String, Param, Array<f32, ndarray::IxDyn>)> {
    let mut out = Vec::new();
    for (l, b) in blocks.iter().enumerate() {
        let k = block_keys(l);
        out.push((
            k.gate_weight,
            Param::Replicated,
            b.gate_weight.clone().into_dyn(),
        ));
        out.push((
            k.gate_and_up_projs,
            Param::GateAndUp,
            b.gate_and_up_projs.clone().into_dyn(),
        ));
        out.push((k.down_projs, Param::Down, b.down_projs.clone().into_dyn()));
    }
    out.push((HEAD.to_string(), Param::Replicated, head.clone().into_dyn()));
    out
}

fn set_tensors(
    blocks: &mut [BlockTensors],
    head: &mut Array2<f32>,
    values: Vec<Array<f32, ndarray::IxDyn>>,
) -> Result<(), String> {
    let mut it = values.into_iter();
    let mut next = || it.next().ok_or("fewer tensors than parameters".to_string());
    for b in blocks.iter_mut() {
        b.gate_weight = next()?.into_dimensionality().map_err(|e| e.to_string())?;
        b.gate_and_up_projs = next()?.into_dimensionality().map_err(|e| e.to_string())?;
        b.down_projs = next()?.into_dimensionality().map_err(|e| e.to_string())?;
    }
    *head = next()?.into_dimensionality().map_err(|e| e.to_string())?;
    Ok(())
}

fn global_shape(key: &str) -> Vec<usize> {
    if key == HEAD {
        vec![HIDDEN, CLASSES]
    } else if key.ends_with("gate_weight") {
        vec![EXPERTS, HIDDEN]
    } else if key.ends_with("gate_and_up_projs") {
        vec![EXPERTS, HIDDEN, 2 * INTER]
    } else {
        vec![EXPERTS, INTER, HIDDEN]
    }
}

impl State {
    fn init(plan: &ParallelPlan, coord: &[usize]) -> Result<Self, String> {
        let (full, head) = init_full();
        let blocks = full
            .iter()
            .map(|b| BlockTensors::shard(&b.params(), plan, coord))
            .collect::<Result<Vec<_>, _>>()?;
        let zeros: Vec<_> = tensors_of(&blocks, &head)
            .into_iter()
            .map(|(_, _, a)| Array::zeros(a.raw_dim()))
            .collect();
        Ok(State {
            blocks,
            head,
            exp_avg: zeros.clone(),
            exp_avg_sq: zeros,
            step: 0,
        })
    }

    /// One AdamW step on every local element (torch.optim.AdamW, `maximize = False`).
    fn adamw(&mut self, grads: Vec<Array<f32, ndarray::IxDyn>>) -> Result<(), String> {
        let t = self.step as i32;
        let bc1 = 1.0 - BETA1.powi(t);
        let bc2 = 1.0 - BETA2.powi(t);
        let mut params: Vec<_> = tensors_of(&self.blocks, &self.head)
            .into_iter()
            .map(|(_, _, a)| a)
            .collect();
        for (((p, g), m), v) in params
            .iter_mut()
            .zip(&grads)
            .zip(&mut self.exp_avg)
            .zip(&mut self.exp_avg_sq)
        {
            if p.shape() != g.shape() {
                return Err(format!(
                    "gradient shape {:?} != parameter {:?}",
                    g.shape(),
                    p.shape()
                ));
            }
            ndarray::Zip::from(p)
                .and(g)
                .and(m)
                .and(v)
                .for_each(|p, &g, m, v| {
                    *p *= 1.0 - LR * WEIGHT_DECAY;
                    *m = BETA1 * *m + (1.0 - BETA1) * g;
                    *v = BETA2 * *v + (1.0 - BETA2) * g * g;
                    let denom = (*v / bc2).sqrt() + EPS;
                    *p -= LR * (*m / bc1) / denom;
                });
        }
        set_tensors(&mut self.blocks, &mut self.head, params)
    }
}

/// One training step on this rank's tokens: returns the global loss and the local gradients in the
/// order of [`tensors_of`].
fn step(
    state: &State,
    plan: &ParallelPlan,
    comms: &PlanComms,
    x_full: &Array2<f32>,
    y_full: &Array2<f32>,
) -> Result<(f32, Vec<Array<f32, ndarray::IxDyn>>), String> {
    let tok = indices(
        &[BATCH, HIDDEN],
        plan,
        &plan.placements(Param::Tokens),
        &comms.coord,
    )?;
    let x = take(x_full.view(), &tok);
    let y = take(
        y_full.view(),
        &[tok[0].clone(), placement::IndexSet::full(CLASSES)],
    );
    let cfg = moe_config();
    let blocks: Vec<DistBlock> = state
        .blocks
        .iter()
        .map(|p| DistBlock {
            plan,
            comms,
            cfg,
            params: p,
            num_experts: EXPERTS,
            mutation: None,
        })
        .collect();
    let mut hs = vec![x];
    let mut ctxs = Vec::new();
    for b in &blocks {
        let h = hs.last().ok_or("no input")?;
        let (out, ctx) = b.forward(h.view(), BATCH, HIDDEN, INTER)?;
        hs.push(h + &out);
        ctxs.push(ctx);
    }
    let h = hs.last().ok_or("no output")?;
    let pred = h.dot(&state.head);
    let diff = &pred - &y;
    let n = (BATCH * CLASSES) as f32;
    // Global loss: sum of squares over the ranks holding different tokens.
    let mut sq = Array1::from_elem(1, diff.iter().map(|d| d * d).sum::<f32>());
    all_reduce(&*comms.data, &mut sq)?;
    let loss = sq[0] / n;
    let dpred = diff.mapv(|d| 2.0 * d / n);
    let mut dhead = h.t().dot(&dpred);
    all_reduce(&*comms.data, &mut dhead)?;
    let mut dh = dpred.dot(&state.head.t());
    let mut block_grads: Vec<BlockTensors> = Vec::new();
    for (l, b) in blocks.iter().enumerate().rev() {
        let (dx, g) = b.backward(&ctxs[l], hs[l].view(), dh.view())?;
        dh = dh + dx;
        block_grads.push(g);
    }
    block_grads.reverse();
    let grads = tensors_of(&block_grads, &dhead)
        .into_iter()
        .map(|(_, _, a)| a)
        .collect();
    Ok((loss, grads))
}

/// This rank's tensors (params and moments) as checkpoint shards.
fn checkpoint_tensors(state: &State) -> Result<Vec<(String, HostTensor, Param)>, String> {
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

fn global_of(ckpt_key: &str) -> Vec<usize> {
    let key = ckpt_key
        .trim_start_matches("model.")
        .trim_start_matches("optim.exp_avg_sq.")
        .trim_start_matches("optim.exp_avg.");
    global_shape(key)
}

#[derive(Serialize, Deserialize)]
struct Extra {
    step: u64,
    data_seed: u64,
    data_word_pos: String,
    plan: String,
    mesh: Vec<usize>,
}

fn kill(args: &TrainArgs, rank: usize, what: &str) -> Result<(), String> {
    let msg = format!("rank {rank} killed {what} (fault injection)");
    if args.hard_kill {
        eprintln!("conformance train: {msg}");
        std::process::exit(137);
    }
    Err(msg)
}

fn save(
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
fn load(dir: &Path, plan: &ParallelPlan, rank: usize) -> Result<(State, Data), String> {
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
fn gather_params(
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

fn write_weights(path: &Path, weights: &BTreeMap<String, HostTensor>) -> Result<(), String> {
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

/// How `compare-train` compares.
#[derive(Debug, Clone, Copy)]
pub enum Compare {
    Exact,
    Tolerance { atol: f64, rtol: f64 },
}

fn close(a: f64, b: f64, how: Compare) -> bool {
    match how {
        Compare::Exact => a.to_bits() == b.to_bits(),
        Compare::Tolerance { atol, rtol } => (a - b).abs() <= atol + rtol * b.abs(),
    }
}

fn read_result(dir: &Path) -> Result<(TrainResult, BTreeMap<String, HostTensor>), String> {
    let path = dir.join("train.json");
    let text = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let r: TrainResult =
        serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    let wpath = dir.join("weights.safetensors");
    let bytes = std::fs::read(&wpath).map_err(|e| format!("{}: {e}", wpath.display()))?;
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| format!("{}: {e}", wpath.display()))?;
    let mut w = BTreeMap::new();
    for (k, v) in st.tensors() {
        let t = HostTensor::new(v.dtype(), v.shape().to_vec(), v.data().to_vec())
            .map_err(|e| format!("{}: {k}: {e}", wpath.display()))?;
        w.insert(k, t);
    }
    Ok((r, w))
}

/// Compares a candidate run with a reference run: the candidate's losses against the reference's
/// at the same steps, and the final weights. `Ok(messages)` when equal, `Err(Ok(messages))` when they
/// differ (messages name the first differing step / tensor), `Err(Err(e))` for unusable input.
pub fn compare_runs(
    reference: &Path,
    candidate: &Path,
    how: Compare,
) -> Result<Vec<String>, Result<Vec<String>, String>> {
    let (r, rw) = read_result(reference).map_err(Err)?;
    let (c, cw) = read_result(candidate).map_err(Err)?;
    let mut problems = Vec::new();
    let by_step: BTreeMap<u64, f64> = r.losses.iter().map(|p| (p.step, p.loss)).collect();
    for p in &c.losses {
        match by_step.get(&p.step) {
            None => problems.push(format!("step {}: not in the reference run", p.step)),
            Some(&want) if !close(p.loss, want, how) => {
                problems.push(format!(
                    "step {}: loss {} != reference {}",
                    p.step, p.loss, want
                ));
                break;
            }
            _ => {}
        }
    }
    if c.steps != r.steps {
        problems.push(format!(
            "candidate ends at step {}, reference at {}",
            c.steps, r.steps
        ));
    }
    for (k, want) in &rw {
        let Some(got) = cw.get(k) else {
            problems.push(format!("weights: {k} missing"));
            continue;
        };
        let (g, w) = match (got.to_f32_vec(), want.to_f32_vec()) {
            (Ok(g), Ok(w)) => (g, w),
            _ => return Err(Err(format!("weights: {k}: not a float tensor"))),
        };
        if got.shape != want.shape {
            problems.push(format!(
                "weights: {k}: shape {:?} != {:?}",
                got.shape, want.shape
            ));
            continue;
        }
        if let Some((i, (a, b))) = g
            .iter()
            .zip(&w)
            .enumerate()
            .find(|(_, (a, b))| !close(f64::from(**a), f64::from(**b), how))
        {
            problems.push(format!("weights: {k}[{i}] = {a} != reference {b}"));
        }
    }
    let summary = format!(
        "{} losses compared (steps {}..={}), {} weight tensors, {}",
        c.losses.len(),
        c.start_step + 1,
        c.steps,
        rw.len(),
        match how {
            Compare::Exact => "bit-identical".to_string(),
            Compare::Tolerance { atol, rtol } => format!("atol {atol:e} rtol {rtol:e}"),
        }
    );
    if problems.is_empty() {
        Ok(vec![summary])
    } else {
        Err(Ok(problems))
    }
}
