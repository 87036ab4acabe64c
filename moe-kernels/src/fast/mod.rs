//! Fast CPU path of the MoE block (f32): permutation (counts, exclusive scan, stable scatter),
//! M-grouped GEMMs over the permuted rows, dW as K-grouped GEMMs, rayon parallelism, and a
//! deterministic per-token gather-sum combine (no atomics). Same signatures and results (within
//! f32 tolerance) as [`crate::reference`]; bitwise deterministic across runs and thread counts
//! (every output element is one fixed-order reduction, see [`grouped`]).
//!
//! Pipeline: `z = x Wr^T (+ b)` -> route -> permutation
//! -> gather `xp` `[N = T k, H]` -> `a = xp W_gu[e] (+ b)` `[N, 2I]` -> `h = act(a)` `[N, I]`
//! -> `y = h W_d[e] (+ b)` `[N, H]` -> `out_t = sum_j w_{t,j} y[row(t, j)]` (+ shared).
//! In [`moe_forward`] the gather is folded into the gate/up GEMM's tasks ([`grouped::Rows`])
//! and the activation runs in that GEMM's epilogue, so `xp` is never stored.
//!
//! Each step is a public stage in [`stages`] (re-exported here) that a distributed layer can
//! chain with collectives in between; [`moe_forward`] / [`moe_backward`] are those stages
//! chained on one rank.

pub mod alloc;
pub mod gemm;
pub mod grouped;
pub mod stages;

use ndarray::{Array2, ArrayView2};

use crate::config::{check_block, check_saved, MoeConfig, MoeForward, MoeGrads, MoeParams};
use crate::error::Result;
use crate::permute::Permutation;
pub use stages::{
    combine_backward, combine_forward, experts_backward, experts_forward, experts_forward_rows,
    permute_backward, permute_forward, router_backward, router_forward, shared_expert_backward,
    shared_expert_forward, ExpertActs, ExpertGrads, ExpertWeights, RouterGrads, SharedActs,
};
use stages::{router_backward_into, shared_expert_backward_into};

/// Activations saved by [`moe_forward`] for [`moe_backward`].
#[derive(Debug, Clone)]
pub struct Saved {
    perm: Permutation,
    /// `[T, k]` permuted row of every (token, slot).
    row_of_slot: Array2<usize>,
    /// Expert activations `a`, `h`, `y` (permuted rows).
    acts: ExpertActs,
    shared: Option<SharedActs>,
}

impl Drop for Saved {
    /// The expert activations go back to the buffer pool ([`alloc::recycle`]) for the next
    /// forward at this shape.
    fn drop(&mut self) {
        alloc::recycle(std::mem::take(&mut self.acts.a));
        alloc::recycle(std::mem::take(&mut self.acts.h));
        alloc::recycle(std::mem::take(&mut self.acts.y));
    }
}

/// Fast forward (same contract as [`crate::reference::moe_forward`], f32).
///
/// # Errors
/// Shape and configuration errors of [`check_block`]; router errors of [`crate::route`].
pub fn moe_forward(
    x: ArrayView2<f32>,
    p: &MoeParams<f32>,
    cfg: &MoeConfig,
) -> Result<MoeForward<f32>> {
    let (mut fwd, saved) = forward_inner(x, p, cfg)?;
    fwd.saved = Some(std::sync::Arc::new(saved));
    Ok(fwd)
}

/// The forward proper, chained from [`stages`]: the result (without saved state) and the saved
/// activations.
fn forward_inner(
    x: ArrayView2<f32>,
    p: &MoeParams<f32>,
    cfg: &MoeConfig,
) -> Result<(MoeForward<f32>, Saved)> {
    let d = check_block(x, p, cfg)?;
    let (router_logits, routing) = router_forward(
        x,
        p.gate_weight,
        p.gate_bias,
        p.e_score_correction_bias,
        cfg,
    )?;
    let perm = Permutation::from_top_k_index(routing.top_k_index.view(), d.experts)?;
    let row_of_slot = perm.row_of_slot_matrix();
    let token_of_row = perm.token_of_rows();
    let w = ExpertWeights::from_params(p);
    let acts = experts_forward_rows(
        grouped::Rows::Gather {
            x,
            token_of_row: &token_of_row,
        },
        &perm.offsets,
        &w,
        &cfg.activation,
    )?;
    let mut output = combine_forward(
        acts.y.view(),
        routing.top_k_weights.view(),
        row_of_slot.view(),
    )?;
    let shared = match &p.shared {
        Some(s) => {
            let (out, sa) = shared_expert_forward(x, s)?;
            output += &out;
            Some(sa)
        }
        None => None,
    };
    let fwd = MoeForward {
        output,
        router_logits,
        routing,
        saved: None,
    };
    Ok((
        fwd,
        Saved {
            perm,
            row_of_slot,
            acts,
            shared,
        },
    ))
}

/// Fast backward (same contract as [`crate::reference::moe_backward`], f32), chained from
/// [`stages`]. Uses the activations saved by [`moe_forward`]; given a forward from the reference
/// path it recomputes them.
///
/// # Errors
/// Shape and configuration errors of [`check_block`]; [`crate::KernelError::ShapeMismatch`]
/// naming `grad_output` or `fwd.routing`.
pub fn moe_backward(
    x: ArrayView2<f32>,
    p: &MoeParams<f32>,
    cfg: &MoeConfig,
    fwd: &MoeForward<f32>,
    grad_output: ArrayView2<f32>,
) -> Result<MoeGrads<f32>> {
    let d = check_block(x, p, cfg)?;
    check_saved(grad_output, fwd, d.tokens, d.hidden, d.experts, d.top_k)?;
    let recomputed;
    let sv = match fwd.saved.as_ref().and_then(|s| s.downcast_ref::<Saved>()) {
        Some(sv) => sv,
        None => {
            recomputed = forward_inner(x, p, cfg)?.1;
            &recomputed
        }
    };
    let routing = &fwd.routing;

    // Combine backward: dy = w * dOut (permuted rows), dw[t, j] = <dOut_t, y[row(t, j)]>.
    let (dy, grad_weights) = combine_backward(
        sv.acts.y.view(),
        routing.top_k_weights.view(),
        sv.row_of_slot.view(),
        grad_output,
    )?;
    let xp = permute_forward(x, &sv.perm.token_of_rows())?;
    let w = ExpertWeights::from_params(p);
    let eg = experts_backward(
        xp.view(),
        &sv.perm.offsets,
        &w,
        &cfg.activation,
        &sv.acts,
        dy.view(),
    )?;
    alloc::recycle(xp);
    alloc::recycle(dy);

    // dx: per-token gather-sum over the k slots in order, then the router and shared terms
    // accumulated into it (in this order, so the bits do not depend on the staging).
    let mut grad_input = permute_backward(eg.grad_xp.view(), sv.row_of_slot.view())?;
    alloc::recycle(eg.grad_xp);
    let (gate_weight, gate_bias) = router_backward_into(
        x,
        p.gate_weight,
        p.gate_bias.is_some(),
        cfg,
        routing,
        grad_weights.view(),
        grad_input.view_mut(),
        true,
    )?;
    let shared = match (&p.shared, &sv.shared) {
        (Some(s), Some(sa)) => Some(shared_expert_backward_into(
            x,
            s,
            sa,
            grad_output,
            grad_input.view_mut(),
            true,
        )?),
        _ => None,
    };
    Ok(MoeGrads {
        grad_input,
        gate_weight,
        gate_bias,
        gate_and_up_projs: eg.gate_and_up_projs,
        down_projs: eg.down_projs,
        gate_up_bias: eg.gate_up_bias,
        down_bias: eg.down_bias,
        shared,
    })
}
