//! Qwen3-MoE router: logits, softmax, top-k with the project's tie rule, optional
//! renormalisation.
//!
//! Source: transformers `models/qwen3_moe/modeling_qwen3_moe.py`, `Qwen3MoeTopKRouter.forward`:
//! `logits = F.linear(x, W)`; `p = softmax(logits, dtype=float32)`; `(w, idx) = topk(p, k)`;
//! `if norm_topk_prob: w /= w.sum(-1, keepdim=True)`. `torch.topk` does not specify the order
//! of equal values; this project defines it: **the lowest expert index wins a tie** (the
//! routers' own code is in `routing.rs`).

use ndarray::{Array2, ArrayView2};

use crate::error::{KernelError, Result};

/// Router hyper-parameters (HF config: `num_experts_per_tok`, `norm_topk_prob`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RouterConfig {
    /// Number of experts per token `k` (1 <= k <= E).
    pub top_k: usize,
    /// Renormalise the selected probabilities to sum to 1 (Qwen3-30B-A3B: `true`).
    pub norm_topk_prob: bool,
}

/// Router result for `T` tokens and `E` experts (element type `F`, `f32` by default).
#[derive(Debug, Clone, PartialEq)]
pub struct Routing<F = f32> {
    /// `[T, k]` expert ids per token, by descending weight; ties: lowest expert index first.
    pub top_k_index: Array2<usize>,
    /// `[T, k]` routing weights (selected probabilities, renormalised if `norm_topk_prob`).
    pub top_k_weights: Array2<F>,
    /// `[T, E]` softmax of the logits over experts (for the other routers of
    /// [`crate::routing::route`]: the scores the weights are taken from).
    pub probs: Array2<F>,
}

/// Router logits `z = x @ gate^T` in f32 (`F.linear(x, gate_weight)`, no bias).
///
/// Shapes: `x` `[T, H]`, `gate_weight` `[E, H]` (HF `mlp.gate.weight`) -> `[T, E]`.
///
/// # Errors
/// [`KernelError::ShapeMismatch`] naming `gate_weight` when its hidden size differs from `x`'s.
pub fn router_logits(x: ArrayView2<f32>, gate_weight: ArrayView2<f32>) -> Result<Array2<f32>> {
    let hidden = x.ncols();
    if gate_weight.ncols() != hidden {
        return Err(KernelError::ShapeMismatch {
            tensor: "gate_weight",
            expected: format!("[E, H={hidden}]"),
            got: gate_weight.shape().to_vec(),
        });
    }
    Ok(x.dot(&gate_weight.t()))
}

/// Qwen3-MoE routing of `[T, E]` logits: `p = softmax(z)` per token (max-subtracted, f32);
/// the `k` largest `p` in descending order, the lowest expert index first among equal values;
/// if `cfg.norm_topk_prob`, `w /= sum(w)`.
///
/// # Errors
/// [`KernelError::ZeroTopK`] if `k == 0`; [`KernelError::TopKTooLarge`] if `k > E`;
/// [`KernelError::NonFiniteLogit`] naming the first NaN / infinite logit (token, expert).
pub fn softmax_topk(logits: ArrayView2<f32>, cfg: &RouterConfig) -> Result<Routing<f32>> {
    let (tokens, num_experts) = logits.dim();
    let k = cfg.top_k;
    if k == 0 {
        return Err(KernelError::ZeroTopK);
    }
    if k > num_experts {
        return Err(KernelError::TopKTooLarge {
            top_k: k,
            num_experts,
        });
    }
    if let Some(((token, expert), &value)) = logits.indexed_iter().find(|(_, v)| !v.is_finite()) {
        return Err(KernelError::NonFiniteLogit {
            token,
            expert,
            value,
        });
    }

    let mut probs = Array2::<f32>::zeros((tokens, num_experts));
    let mut top_k_index = Array2::<usize>::zeros((tokens, k));
    let mut top_k_weights = Array2::<f32>::zeros((tokens, k));
    for t in 0..tokens {
        let z = logits.row(t);
        let p = softmax_row(z.iter().copied());
        let order = top_k_order(&p, k);
        for (j, &e) in order.iter().enumerate() {
            top_k_index[[t, j]] = e;
            top_k_weights[[t, j]] = p[e];
        }
        if cfg.norm_topk_prob {
            let sum: f32 = order.iter().map(|&e| p[e]).sum();
            for j in 0..k {
                top_k_weights[[t, j]] /= sum;
            }
        }
        for (e, pe) in p.into_iter().enumerate() {
            probs[[t, e]] = pe;
        }
    }
    Ok(Routing {
        top_k_index,
        top_k_weights,
        probs,
    })
}

/// Numerically stable softmax of one row: `exp(z - max) / sum(exp(z - max))`, f32.
fn softmax_row(z: impl Iterator<Item = f32> + Clone) -> Vec<f32> {
    let max = z.clone().fold(f32::NEG_INFINITY, f32::max);
    let exps: Vec<f32> = z.map(|v| (v - max).exp()).collect();
    let sum: f32 = exps.iter().sum();
    exps.into_iter().map(|v| v / sum).collect()
}

/// Indices of the `k` largest values of `p`, descending; equal values: lower index first.
/// `p` holds no NaN (the logits were checked finite), so `partial_cmp` is total here.
fn top_k_order(p: &[f32], k: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..p.len()).collect();
    // Stable sort by descending value keeps ascending index order among equal values.
    order.sort_by(|&a, &b| p[b].partial_cmp(&p[a]).unwrap_or(std::cmp::Ordering::Equal));
    order.truncate(k);
    order
}
