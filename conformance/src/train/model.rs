//! The model and its optimizer: sizes, initialisation, the training state (parameters and
//! AdamW moments on this rank's plan) and one training step.

use super::*;

/// Sizes of the model: hidden `H`, expert intermediate `I`, experts `E`, top-k, head outputs `C`,
/// MoE blocks `L`, tokens per step `B` (the global batch, split by the plan).
pub const HIDDEN: usize = 16;
pub const INTER: usize = 8;
pub const EXPERTS: usize = 8;
pub const TOP_K: usize = 2;
pub const CLASSES: usize = 4;
pub const LAYERS: usize = 2;
pub const BATCH: usize = 16;
pub(super) const SEED_INIT: u64 = 20261121;
pub(super) const SEED_DATA: u64 = 7;
pub(super) const SEED_TEACHER: u64 = 99;

/// AdamW hyper-parameters (torch.optim.AdamW semantics, bias-corrected, decoupled weight decay).
pub(super) const LR: f32 = 1e-2;
pub(super) const BETA1: f32 = 0.9;
pub(super) const BETA2: f32 = 0.999;
pub(super) const EPS: f32 = 1e-8;
pub(super) const WEIGHT_DECAY: f32 = 0.01;

pub(super) fn moe_config() -> MoeConfig {
    MoeConfig {
        router: RouterKind::SoftmaxTopK {
            norm_topk_prob: true,
        },
        top_k: TOP_K,
        activation: Activation::SwiGlu,
    }
}

/// Uniform in [-1, 1) from 24 random bits (exact in f32).
pub(super) fn uniform(rng: &mut ChaCha8Rng) -> f32 {
    (rng.next_u32() >> 8) as f32 / (1u32 << 23) as f32 - 1.0
}

pub(super) fn random<D: Dimension, Sh: ndarray::ShapeBuilder<Dim = D>>(
    rng: &mut ChaCha8Rng,
    shape: Sh,
    scale: f32,
) -> Array<f32, D> {
    Array::from_shape_simple_fn(shape, || uniform(rng) * scale)
}

/// Native keys of block `l`'s tensors (checkpoint names).
pub(super) fn block_keys(l: usize) -> NativeMoeKeys {
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

pub(super) const HEAD: &str = "head.weight";

/// The full model at initialisation (every rank builds it, then keeps its shards).
pub(super) fn init_full() -> (Vec<BlockTensors>, Array2<f32>) {
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

/// Parameters, AdamW moments and counters of one rank.
pub(super) struct State {
    pub(super) blocks: Vec<BlockTensors>,
    pub(super) head: Array2<f32>,
    pub(super) exp_avg: Vec<Array<f32, ndarray::IxDyn>>,
    pub(super) exp_avg_sq: Vec<Array<f32, ndarray::IxDyn>>,
    pub(super) step: u64,
}

/// Every trainable tensor of a rank with its key and placement kind, in a fixed order.
pub(super) fn tensors_of(
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

pub(super) fn set_tensors(
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

pub(super) fn global_shape(key: &str) -> Vec<usize> {
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
    pub(super) fn init(plan: &ParallelPlan, coord: &[usize]) -> Result<Self, String> {
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
    pub(super) fn adamw(&mut self, grads: Vec<Array<f32, ndarray::IxDyn>>) -> Result<(), String> {
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
pub(super) fn step(
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
