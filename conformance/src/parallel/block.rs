//! The MoE block distributed by a [`ParallelPlan`], forward and backward, built from the
//! `moe-kernels` stages and the `collectives` autograd ops:
//!
//! 1. FSDP: all_gather the expert weights along dim 1 ([`SpAllGather`]: its backward is the
//!    reduce_scatter of the gradients).
//! 2. Router on this rank's tokens (replicated weights).
//! 3. TP: `f` ([`CopyToTp`]) on the hidden states AND the routing weights; with SP instead an
//!    all_gather of the sequence shards of both (backward reduce_scatter).
//! 4. EP: [`Dispatch`] (all_to_all with variable splits, rank-major -> expert-major).
//! 5. Grouped experts on the local (TP-sharded) weights; the down bias on TP rank 0 only.
//! 6. EP combine, weighted gather-sum at the origin.
//! 7. TP: `g` ([`ReduceFromTp`]) on the output; with SP a reduce_scatter.
//! 8. Shared experts on this rank's tokens (replicated).
//!
//! Backward runs the adjoints in reverse; gradients of replicated parameters are summed over the
//! ranks holding different tokens ([`PlanComms::data`]).

use super::comms::PlanComms;
use super::dispatch::Dispatch;
use super::plan::{Mutation, ParallelPlan};
use super::shards::{comm_tensor, from_comm, BlockTensors, SharedTensors};
use collectives::autograd::{
    chunk_sizes, CollectiveFunction, CopyToTp, GatherFromTp, ReduceFromTp, SpAllGather,
    SpReduceScatter,
};
use collectives::{Communicator, CommunicatorExt, ReduceOp};
use moe_kernels::fast::{
    combine_backward, combine_forward, experts_backward, experts_forward, router_backward,
    router_forward, shared_expert_backward, shared_expert_forward, ExpertActs, ExpertWeights,
    SharedActs,
};
use moe_kernels::{MoeConfig, Permutation, Routing};
use ndarray::{Array, Array2, Array3, ArrayView2, Axis, Dimension};

/// One rank's view of a distributed MoE block.
pub struct DistBlock<'a> {
    pub plan: &'a ParallelPlan,
    pub comms: &'a PlanComms,
    pub cfg: MoeConfig,
    /// This rank's parameter shards.
    pub params: &'a BlockTensors,
    /// Global number of experts `E`.
    pub num_experts: usize,
    /// A deliberately wrong variant (tests).
    pub mutation: Option<Mutation>,
}

/// What the forward keeps for the backward.
pub struct BlockCtx {
    routing: Routing<f32>,
    /// Expert weights as used (FSDP: gathered).
    w_gu: Array3<f32>,
    w_d: Array3<f32>,
    /// SP: each TP rank's sequence length.
    seq_sizes: Vec<usize>,
    /// Routing weights the combine used `[T_e, k]`.
    w_e: Array2<f32>,
    perm: Permutation,
    dispatch: Dispatch,
    xp: Array2<f32>,
    acts: ExpertActs,
    /// Expert outputs back at the origin, permuted row order `[N, H]`.
    ys: Array2<f32>,
    shared: Option<SharedActs>,
}

fn err<E: std::fmt::Display>(what: &str) -> impl Fn(E) -> String + '_ {
    move |e| format!("{what}: {e}")
}

fn collective<D: Dimension, Op: CollectiveFunction>(
    op: &Op,
    comm: &dyn Communicator,
    a: &Array<f32, D>,
    backward: bool,
) -> Result<Array<f32, D>, String> {
    let t = comm_tensor(a)?;
    let out = if backward {
        op.backward(comm, &t)
    } else {
        op.forward(comm, &t)
    }
    .map_err(|e| format!("{}: {e}", op.name()))?;
    from_comm(out)
}

/// In-place `all_reduce(SUM)` of an array over `comm`.
pub(crate) fn all_reduce<D: Dimension>(
    comm: &dyn Communicator,
    a: &mut Array<f32, D>,
) -> Result<(), String> {
    let mut v: Vec<f32> = a.iter().copied().collect();
    comm.all_reduce(&mut v, ReduceOp::Sum)
        .map_err(|e| format!("all_reduce of a gradient: {e}"))?;
    a.iter_mut().zip(v).for_each(|(d, s)| *d = s);
    Ok(())
}

/// `[T, k]` row of each (token, slot) in the permutation.
fn row_of_slot(perm: &Permutation, tokens: usize) -> Result<Array2<usize>, String> {
    Array2::from_shape_vec((tokens, perm.top_k), perm.row_of_slot.clone())
        .map_err(|e| e.to_string())
}

impl DistBlock<'_> {
    fn tp(&self) -> Option<&dyn Communicator> {
        self.comms.dim(self.plan.tp)
    }
    fn ep(&self) -> Option<&dyn Communicator> {
        self.comms.dim(self.plan.ep)
    }
    fn fsdp(&self) -> Option<&dyn Communicator> {
        self.comms.dim(self.plan.fsdp)
    }

    /// Whether this rank adds the (replicated) down bias: TP rank 0 only, so that `g` sums it once.
    fn owns_down_bias(&self) -> bool {
        self.plan.tp.map_or(true, |d| self.comms.coord[d] == 0)
    }

    fn expert_weights<'w>(
        &self,
        w_gu: &'w Array3<f32>,
        w_d: &'w Array3<f32>,
        zero_bias: &'w Option<Array2<f32>>,
    ) -> ExpertWeights<'w>
    where
        Self: 'w,
    {
        ExpertWeights {
            gate_and_up_projs: w_gu.view(),
            down_projs: w_d.view(),
            gate_up_bias: self.params.gate_up_bias.as_ref().map(|b| b.view()),
            down_bias: if self.owns_down_bias() {
                self.params.down_bias.as_ref().map(|b| b.view())
            } else {
                zero_bias.as_ref().map(|b| b.view())
            },
        }
    }

    fn zero_bias(&self) -> Option<Array2<f32>> {
        self.params
            .down_bias
            .as_ref()
            .map(|b| Array2::zeros(b.raw_dim()))
    }

    fn fsdp_gather(&self, a: &Array3<f32>, global_dim1: usize) -> Result<Array3<f32>, String> {
        match self.fsdp() {
            None => Ok(a.clone()),
            Some(f) => {
                let op = SpAllGather {
                    dim: 1,
                    sizes: chunk_sizes(global_dim1, f.size()).map_err(err("fsdp"))?,
                };
                collective(&op, f, a, false).map_err(|e| format!("FSDP all_gather: {e}"))
            }
        }
    }

    /// Forward on this rank's tokens `x` `[T_l, H]` (`global_tokens` = T of the whole batch, for
    /// the SP split sizes). Returns the block output for the same tokens.
    pub fn forward(
        &self,
        x: ArrayView2<f32>,
        global_tokens: usize,
        global_hidden: usize,
        global_inter: usize,
    ) -> Result<(Array2<f32>, BlockCtx), String> {
        let p = self.params;
        let k = self.cfg.top_k;
        // 1. FSDP all_gather of the expert weights.
        let w_gu = self.fsdp_gather(&p.gate_and_up_projs, global_hidden)?;
        let w_d = self.fsdp_gather(&p.down_projs, global_inter)?;
        // 2. Router on this rank's tokens.
        let (_, routing) = router_forward(
            x,
            p.gate_weight.view(),
            p.gate_bias.as_ref().map(|b| b.view()),
            p.e_score_correction_bias.as_ref().map(|b| b.view()),
            &self.cfg,
        )
        .map_err(err("router"))?;
        // 3. f / SP all_gather on hidden states, routing weights (and ids, no gradient).
        let mut seq_sizes = Vec::new();
        let (x_e, w_e, ids_e) = match (self.tp(), self.plan.sp) {
            (Some(tp), true) => {
                seq_sizes = chunk_sizes(global_tokens, tp.size()).map_err(err("sp"))?;
                let gather = SpAllGather {
                    dim: 0,
                    sizes: seq_sizes.clone(),
                };
                let x_e = collective(&gather, tp, &x.to_owned(), false)?;
                let w_e = collective(&gather, tp, &routing.top_k_weights, false)?;
                let ids = routing.top_k_index.mapv(|i| i as f32);
                let ids_op = GatherFromTp {
                    dim: 0,
                    sizes: seq_sizes.clone(),
                };
                let ids_e = collective(&ids_op, tp, &ids, false)?.mapv(|v| v as usize);
                (x_e, w_e, ids_e)
            }
            (Some(tp), false) => (
                collective(&CopyToTp, tp, &x.to_owned(), false)?,
                collective(&CopyToTp, tp, &routing.top_k_weights, false)?,
                routing.top_k_index.clone(),
            ),
            (None, _) => (
                x.to_owned(),
                routing.top_k_weights.clone(),
                routing.top_k_index.clone(),
            ),
        };
        let tokens_e = x_e.nrows();
        // 4. Permute locally by global expert, then EP dispatch.
        let perm = Permutation::from_top_k_index(ids_e.view(), self.num_experts)
            .map_err(err("permutation"))?;
        let rows: Vec<usize> = (0..perm.slot_of_row.len())
            .map(|r| perm.token_of_row(r))
            .collect();
        let xs = x_e.select(Axis(0), &rows);
        let dispatch = Dispatch::new(self.ep(), &perm.counts)?;
        let xp = dispatch.dispatch(self.ep(), xs.view())?;
        // 5. Grouped experts.
        let zero = self.zero_bias();
        let weights = self.expert_weights(&w_gu, &w_d, &zero);
        let acts = experts_forward(xp.view(), &dispatch.offsets, &weights, &self.cfg.activation)
            .map_err(err("experts"))?;
        // 6. Combine at the origin.
        let ys = dispatch.combine(self.ep(), acts.y.view())?;
        let slots = row_of_slot(&perm, tokens_e)?;
        let out_e = combine_forward(ys.view(), w_e.view(), slots.view()).map_err(err("combine"))?;
        debug_assert_eq!(w_e.ncols(), k);
        // 7. g / SP reduce_scatter.
        let mut out = match (self.tp(), self.plan.sp) {
            (Some(tp), true) => collective(
                &SpReduceScatter {
                    dim: 0,
                    sizes: seq_sizes.clone(),
                },
                tp,
                &out_e,
                false,
            )?,
            (Some(tp), false) => collective(&ReduceFromTp, tp, &out_e, false)?,
            (None, _) => out_e,
        };
        // 8. Shared experts on this rank's tokens.
        let shared = match &p.shared {
            Some(s) => {
                let (ys, acts) =
                    shared_expert_forward(x, &s.params()).map_err(err("shared expert"))?;
                out += &ys;
                Some(acts)
            }
            None => None,
        };
        Ok((
            out,
            BlockCtx {
                routing,
                w_gu,
                w_d,
                seq_sizes,
                w_e,
                perm,
                dispatch,
                xp,
                acts,
                ys,
                shared,
            },
        ))
    }

    /// Backward: from the gradient of this rank's output rows to the gradient of its input rows
    /// and of its parameter shards (same shapes as [`DistBlock::params`]).
    pub fn backward(
        &self,
        ctx: &BlockCtx,
        x: ArrayView2<f32>,
        grad_out: ArrayView2<f32>,
    ) -> Result<(Array2<f32>, BlockTensors), String> {
        let p = self.params;
        let mut dx = Array2::<f32>::zeros(x.raw_dim());
        // 8. Shared experts.
        let shared = match (&p.shared, &ctx.shared) {
            (Some(s), Some(acts)) => {
                let (dxs, g) = shared_expert_backward(x, &s.params(), acts, grad_out)
                    .map_err(err("shared expert backward"))?;
                dx += &dxs;
                Some(SharedTensors {
                    gate_proj: g.gate_proj,
                    up_proj: g.up_proj,
                    down_proj: g.down_proj,
                    gate: g.gate,
                })
            }
            _ => None,
        };
        // 7. g / SP reduce_scatter adjoints.
        let dout_e = match (self.tp(), self.plan.sp) {
            (Some(tp), true) => collective(
                &SpReduceScatter {
                    dim: 0,
                    sizes: ctx.seq_sizes.clone(),
                },
                tp,
                &grad_out.to_owned(),
                true,
            )?,
            (Some(tp), false) => collective(&ReduceFromTp, tp, &grad_out.to_owned(), true)?,
            (None, _) => grad_out.to_owned(),
        };
        // 6. Combine adjoint.
        let tokens_e = dout_e.nrows();
        let slots = row_of_slot(&ctx.perm, tokens_e)?;
        let (dys, dw_e) =
            combine_backward(ctx.ys.view(), ctx.w_e.view(), slots.view(), dout_e.view())
                .map_err(err("combine backward"))?;
        let dyp = ctx.dispatch.combine_backward(self.ep(), dys.view())?;
        // 5. Experts.
        let zero = self.zero_bias();
        let weights = self.expert_weights(&ctx.w_gu, &ctx.w_d, &zero);
        let eg = experts_backward(
            ctx.xp.view(),
            &ctx.dispatch.offsets,
            &weights,
            &self.cfg.activation,
            &ctx.acts,
            dyp.view(),
        )
        .map_err(err("experts backward"))?;
        // 4. Dispatch adjoint and the gather-sum back to tokens (slots in ascending order).
        let dxs = ctx
            .dispatch
            .dispatch_backward(self.ep(), eg.grad_xp.view())?;
        let mut dx_e = Array2::<f32>::zeros((tokens_e, x.ncols()));
        for t in 0..tokens_e {
            let mut row = dx_e.row_mut(t);
            for j in 0..ctx.perm.top_k {
                row += &dxs.row(slots[[t, j]]);
            }
        }
        // 3. f / SP all_gather adjoints.
        let drop_f = self.mutation == Some(Mutation::DropRoutingWeightF);
        let (dx_experts, dw) = match (self.tp(), self.plan.sp) {
            (Some(tp), true) => {
                let gather = SpAllGather {
                    dim: 0,
                    sizes: ctx.seq_sizes.clone(),
                };
                let dx_l = collective(&gather, tp, &dx_e, true)?;
                let dw = if drop_f {
                    let keep = GatherFromTp {
                        dim: 0,
                        sizes: ctx.seq_sizes.clone(),
                    };
                    collective(&keep, tp, &dw_e, true)?
                } else {
                    collective(&gather, tp, &dw_e, true)?
                };
                (dx_l, dw)
            }
            (Some(tp), false) => {
                let dx_l = collective(&CopyToTp, tp, &dx_e, true)?;
                let dw = if drop_f {
                    dw_e
                } else {
                    collective(&CopyToTp, tp, &dw_e, true)?
                };
                (dx_l, dw)
            }
            (None, _) => (dx_e, dw_e),
        };
        dx += &dx_experts;
        // 2. Router.
        let rg = router_backward(
            x,
            p.gate_weight.view(),
            p.gate_bias.is_some(),
            &self.cfg,
            &ctx.routing,
            dw.view(),
        )
        .map_err(err("router backward"))?;
        dx += &rg.grad_x;
        let mut grads = BlockTensors {
            gate_weight: rg.gate_weight,
            gate_bias: rg.gate_bias,
            e_score_correction_bias: None,
            gate_and_up_projs: eg.gate_and_up_projs,
            down_projs: eg.down_projs,
            gate_up_bias: eg.gate_up_bias,
            // Replicated over TP: every TP rank computes the same gradient (dy is replicated),
            // also the ranks that added a zero bias.
            down_bias: eg.down_bias,
            shared,
        };
        // Replicated parameters: sum over the ranks holding different tokens.
        let data = &*self.comms.data;
        if self.mutation != Some(Mutation::SkipRouterGradReduce) {
            all_reduce(data, &mut grads.gate_weight)?;
            if let Some(b) = grads.gate_bias.as_mut() {
                all_reduce(data, b)?;
            }
        }
        if let Some(s) = grads.shared.as_mut() {
            all_reduce(data, &mut s.gate_proj)?;
            all_reduce(data, &mut s.up_proj)?;
            all_reduce(data, &mut s.down_proj)?;
            if let Some(g) = s.gate.as_mut() {
                all_reduce(data, g)?;
            }
        }
        // 1. FSDP: reduce_scatter of the gathered weights' gradients; biases (R) all_reduced.
        if let Some(f) = self.fsdp() {
            let rs = |a: &Array3<f32>, global: usize| -> Result<Array3<f32>, String> {
                let op = SpAllGather {
                    dim: 1,
                    sizes: chunk_sizes(global, f.size()).map_err(err("fsdp"))?,
                };
                collective(&op, f, a, true).map_err(|e| format!("FSDP reduce_scatter: {e}"))
            };
            grads.gate_and_up_projs = rs(&grads.gate_and_up_projs, ctx.w_gu.dim().1)?;
            grads.down_projs = rs(&grads.down_projs, ctx.w_d.dim().1)?;
            if let Some(b) = grads.gate_up_bias.as_mut() {
                all_reduce(f, b)?;
            }
            if let Some(b) = grads.down_bias.as_mut() {
                all_reduce(f, b)?;
            }
        }
        Ok((dx, grads))
    }
}
