//! Reference forward of the Qwen3-MoE sparse block on the native grouped layout.
//!
//! This is the specification the fast kernels are checked against: a plain per-expert loop,
//! written to be read. Source of the math: transformers `Qwen3MoeSparseMoeBlock` /
//! `Qwen3MoeExperts.forward` (eager): route, then for each expert that has tokens, gather its
//! tokens, `gate, up = x W_gu^T`, `h = silu(gate) * up`, `y = h W_d^T`, scale by the routing
//! weight and `index_add_` into a zero output, experts in ascending index order.

//!
//! The general block of every seed family (all routers, activations, biases, shared experts),
//! forward and backward, is [`moe_forward`] / [`moe_backward`] (submodule `moe_block`).

mod moe_block;

pub use moe_block::{moe_backward, moe_forward};

use ndarray::{s, Array2, ArrayView2, ArrayView3, Axis};

use crate::activation::swiglu;
use crate::error::{KernelError, Result};
use crate::router::{router_logits, softmax_topk, RouterConfig, Routing};

/// Output of [`qwen3_moe_block_forward`].
#[derive(Debug, Clone)]
pub struct MoeBlockOutput {
    /// `[T, H]` block output `y_t = sum_j w_{t,j} * expert_{idx_{t,j}}(x_t)`.
    pub output: Array2<f32>,
    /// `[T, E]` router logits `x @ gate^T`.
    pub router_logits: Array2<f32>,
    /// Router result (top-k ids, weights, probabilities).
    pub routing: Routing,
}

/// Reference forward of the Qwen3-MoE sparse block (f32 throughout).
///
/// Shapes (native layout, used as `x @ W`):
/// - `x` `[T, H]` tokens;
/// - `gate_weight` `[E, H]` router (HF `mlp.gate.weight`);
/// - `gate_and_up_projs` `[E, H, 2I]`, columns `[:I]` the gate projection, `[I:]` the up
///   projection (= `cat([gate_e.T, up_e.T], -1)` of the HF per-expert `[I, H]` weights);
/// - `down_projs` `[E, I, H]` (= HF `down_proj.weight.T`).
///
/// `y_t = sum_j w_{t,j} * (silu(x_t Wg_e) * (x_t Wu_e)) Wd_e` with `e = idx_{t,j}` from
/// [`softmax_topk`]. Output accumulation per token runs over experts in ascending index
/// order starting from zero, as transformers' eager `index_add_` loop does.
///
/// # Errors
/// [`KernelError::ShapeMismatch`] naming the first tensor whose shape disagrees (E, H, I, or an
/// odd last dimension of `gate_and_up_projs`); [`KernelError::ZeroTopK`],
/// [`KernelError::TopKTooLarge`], [`KernelError::NonFiniteLogit`] from the router.
pub fn qwen3_moe_block_forward(
    x: ArrayView2<f32>,
    gate_weight: ArrayView2<f32>,
    gate_and_up_projs: ArrayView3<f32>,
    down_projs: ArrayView3<f32>,
    cfg: &RouterConfig,
) -> Result<MoeBlockOutput> {
    let (tokens, hidden) = x.dim();
    let num_experts = gate_weight.nrows();
    let inter = check_shapes(x, gate_weight, gate_and_up_projs, down_projs)?;

    let logits = router_logits(x, gate_weight)?;
    let routing = softmax_topk(logits.view(), cfg)?;

    let mut output = Array2::<f32>::zeros((tokens, hidden));
    for expert in 0..num_experts {
        // The (token, weight) pairs routed to this expert, in token order.
        let assigned: Vec<(usize, f32)> = (0..tokens)
            .filter_map(|t| {
                (0..cfg.top_k)
                    .find(|&j| routing.top_k_index[[t, j]] == expert)
                    .map(|j| (t, routing.top_k_weights[[t, j]]))
            })
            .collect();
        if assigned.is_empty() {
            continue;
        }
        let token_ids: Vec<usize> = assigned.iter().map(|&(t, _)| t).collect();
        let xe = x.select(Axis(0), &token_ids); // [n_e, H]

        let gate_up = xe.dot(&gate_and_up_projs.index_axis(Axis(0), expert)); // [n_e, 2I]
        let gate = gate_up.slice(s![.., ..inter]);
        let up = gate_up.slice(s![.., inter..]);
        let mut h = Array2::<f32>::zeros(gate.raw_dim()); // [n_e, I]
        ndarray::Zip::from(&mut h)
            .and(&gate)
            .and(&up)
            .for_each(|h, &g, &u| *h = swiglu(g, u));
        let y = h.dot(&down_projs.index_axis(Axis(0), expert)); // [n_e, H]

        for (row, &(t, w)) in assigned.iter().enumerate() {
            let mut out_row = output.row_mut(t);
            out_row.zip_mut_with(&y.row(row), |o, &v| *o += v * w);
        }
    }
    Ok(MoeBlockOutput {
        output,
        router_logits: logits,
        routing,
    })
}

/// Checks every shape against `x` `[T, H]` and `gate_weight` `[E, H]`; returns `I`.
fn check_shapes(
    x: ArrayView2<f32>,
    gate_weight: ArrayView2<f32>,
    gate_and_up_projs: ArrayView3<f32>,
    down_projs: ArrayView3<f32>,
) -> Result<usize> {
    let hidden = x.ncols();
    let num_experts = gate_weight.nrows();
    if gate_weight.ncols() != hidden {
        return Err(KernelError::ShapeMismatch {
            tensor: "gate_weight",
            expected: format!("[E, H={hidden}]"),
            got: gate_weight.shape().to_vec(),
        });
    }
    let (e_gu, h_gu, two_i) = gate_and_up_projs.dim();
    if e_gu != num_experts || h_gu != hidden || two_i % 2 != 0 {
        return Err(KernelError::ShapeMismatch {
            tensor: "gate_and_up_projs",
            expected: format!("[E={num_experts}, H={hidden}, 2I (even)]"),
            got: gate_and_up_projs.shape().to_vec(),
        });
    }
    let inter = two_i / 2;
    if down_projs.dim() != (num_experts, inter, hidden) {
        return Err(KernelError::ShapeMismatch {
            tensor: "down_projs",
            expected: format!("[E={num_experts}, I={inter}, H={hidden}]"),
            got: down_projs.shape().to_vec(),
        });
    }
    Ok(inter)
}
