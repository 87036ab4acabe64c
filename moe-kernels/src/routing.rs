//! Every router variant of the seed models ([`RouterKind`]), forward (logits -> top-k ids and
//! weights) and backward (weight gradient -> logit gradient), generic over `f32` / `f64`.
//!
//! Sources: transformers `Qwen3MoeTopKRouter`, `MixtralTopKRouter`, `GptOssTopKRouter`,
//! `DeepseekV3TopkRouter` (GLM4-MoE identical), `Step3p7TopKRouter`. **Ties: the lowest expert index wins**
//! in every top-k (and the lowest group index in the group top-k); `torch.topk` leaves the order
//! of equal values unspecified, this project fixes it.

use ndarray::{Array2, ArrayView1, ArrayView2};

use crate::config::RouterKind;
use crate::error::{KernelError, Result};
use crate::router::Routing;
use crate::scalar::Real;

/// Denominator epsilon of the DeepSeek-V3 renormalisation (`topk_weights.sum() + 1e-20`).
const DEEPSEEK_NORM_EPS: f64 = 1e-20;

/// Routes `[T, E]` logits (already including any router bias) with `kind`.
///
/// Returns `top_k_index` / `top_k_weights` `[T, k]` in descending order of the selection score
/// (lowest index first among equal scores) and `probs` `[T, E]` (see [`crate::MoeForward`]).
/// `correction_bias` `[E]` is the sigmoid routers' selection-only `e_score_correction_bias`
/// (`None` = zeros); softmax routers ignore it (rejected earlier by [`crate::config::check_block`]).
///
/// # Errors
/// [`KernelError::ZeroTopK`], [`KernelError::TopKTooLarge`]; [`KernelError::NonFiniteLogit`]
/// naming the first NaN / infinite logit; [`KernelError::NonFiniteScore`] for a non-finite
/// biased selection score; [`KernelError::InvalidConfig`] for a bad group layout.
pub fn route<F: Real>(
    logits: ArrayView2<F>,
    kind: &RouterKind,
    top_k: usize,
    correction_bias: Option<ArrayView1<F>>,
) -> Result<Routing<F>> {
    let (tokens, experts) = logits.dim();
    if top_k == 0 {
        return Err(KernelError::ZeroTopK);
    }
    if top_k > experts {
        return Err(KernelError::TopKTooLarge {
            top_k,
            num_experts: experts,
        });
    }
    if let Some(((token, expert), value)) = logits.indexed_iter().find(|(_, v)| !v.is_finite()) {
        return Err(KernelError::NonFiniteLogit {
            token,
            expert,
            value: value.to_f64_lossless() as f32,
        });
    }
    let mut routing = Routing {
        top_k_index: Array2::zeros((tokens, top_k)),
        top_k_weights: Array2::zeros((tokens, top_k)),
        probs: Array2::zeros((tokens, experts)),
    };
    for t in 0..tokens {
        let z: Vec<F> = logits.row(t).to_vec();
        let (probs, idx, weights) = match *kind {
            RouterKind::SoftmaxTopK { norm_topk_prob } => {
                softmax_topk_row(&z, top_k, norm_topk_prob)
            }
            RouterKind::TopKSoftmax => topk_softmax_row(&z, top_k),
            RouterKind::SigmoidGroupLimited {
                n_group,
                topk_group,
                norm_topk_prob,
                routed_scaling_factor,
            } => {
                let groups = Groups {
                    n_group,
                    topk_group,
                };
                let eps = F::from(DEEPSEEK_NORM_EPS).unwrap_or_else(F::zero);
                let norm = norm_topk_prob.then_some(eps);
                sigmoid_row(
                    t,
                    &z,
                    top_k,
                    correction_bias,
                    Some(groups),
                    norm,
                    routed_scaling_factor,
                )?
            }
            RouterKind::SigmoidTopK {
                routed_scaling_factor,
            } => sigmoid_row(
                t,
                &z,
                top_k,
                correction_bias,
                None,
                Some(F::zero()),
                routed_scaling_factor,
            )?,
        };
        for (e, p) in probs.into_iter().enumerate() {
            routing.probs[[t, e]] = p;
        }
        for (j, (e, w)) in idx.into_iter().zip(weights).enumerate() {
            routing.top_k_index[[t, j]] = e;
            routing.top_k_weights[[t, j]] = w;
        }
    }
    Ok(routing)
}

/// Backward of [`route`]: from `grad_weights` `[T, k]` (dL/d top_k_weights) to dL/d logits
/// `[T, E]`. The selection (ids) is piecewise constant and has no gradient; the correction bias
/// has none either.
///
/// # Errors
/// [`KernelError::ShapeMismatch`] naming `grad_weights` when it is not `[T, k]`.
pub fn route_backward<F: Real>(
    kind: &RouterKind,
    routing: &Routing<F>,
    grad_weights: ArrayView2<F>,
) -> Result<Array2<F>> {
    if grad_weights.dim() != routing.top_k_index.dim() {
        return Err(KernelError::ShapeMismatch {
            tensor: "grad_weights",
            expected: format!("[T, k] = {:?}", routing.top_k_index.shape()),
            got: grad_weights.shape().to_vec(),
        });
    }
    let (tokens, experts) = routing.probs.dim();
    let k = routing.top_k_index.ncols();
    let mut grad_logits = Array2::<F>::zeros((tokens, experts));
    for t in 0..tokens {
        let idx: Vec<usize> = routing.top_k_index.row(t).to_vec();
        let w: Vec<F> = routing.top_k_weights.row(t).to_vec();
        let dw: Vec<F> = grad_weights.row(t).to_vec();
        let probs = routing.probs.row(t);
        // <dw, w>: appears in every normalisation Jacobian below.
        let dw_dot_w: F = (0..k).map(|j| dw[j] * w[j]).sum();
        match *kind {
            RouterKind::SoftmaxTopK { norm_topk_prob } => {
                // dL/dp on the selected experts; w = p[idx] (/ S).
                let mut dp = vec![F::zero(); experts];
                let sum_sel: F = idx.iter().map(|&e| probs[e]).sum();
                for j in 0..k {
                    dp[idx[j]] = if norm_topk_prob {
                        (dw[j] - dw_dot_w) / sum_sel
                    } else {
                        dw[j]
                    };
                }
                // Softmax Jacobian: dz_e = p_e (dp_e - <dp, p>).
                let dp_dot_p: F = (0..experts).map(|e| dp[e] * probs[e]).sum();
                for e in 0..experts {
                    grad_logits[[t, e]] = probs[e] * (dp[e] - dp_dot_p);
                }
            }
            RouterKind::TopKSoftmax => {
                // w = softmax(z[idx]): dz[idx_j] = w_j (dw_j - <dw, w>).
                for j in 0..k {
                    grad_logits[[t, idx[j]]] = w[j] * (dw[j] - dw_dot_w);
                }
            }
            RouterKind::SigmoidGroupLimited {
                norm_topk_prob,
                routed_scaling_factor,
                ..
            } => {
                let eps = F::from(DEEPSEEK_NORM_EPS).unwrap_or_else(F::zero);
                let norm = norm_topk_prob.then_some(eps);
                sigmoid_backward_row(
                    &idx,
                    &dw,
                    probs,
                    norm,
                    routed_scaling_factor,
                    &mut grad_logits,
                    t,
                );
            }
            RouterKind::SigmoidTopK {
                routed_scaling_factor,
            } => {
                sigmoid_backward_row(
                    &idx,
                    &dw,
                    probs,
                    Some(F::zero()),
                    routed_scaling_factor,
                    &mut grad_logits,
                    t,
                );
            }
        }
    }
    Ok(grad_logits)
}

/// `w_j = r * s_j / (S + eps)` (or `r * s_j` without norm), `s = sigmoid(z)`:
/// `ds_j = r (dw_j / D - <dw, s_sel> / D^2)`, evaluated as `r (dw_j - <dw, s_sel / D>) / D`,
/// `dz = ds * s (1 - s)`. That form has no cancellation of two separately rounded terms: with
/// `k = 1`, `s / D` is exactly 1 in any precision, so the gradient is exactly the 0 it is in exact
/// arithmetic (the subtracted form leaves float noise of size `u |dw / D|`).
fn sigmoid_backward_row<F: Real>(
    idx: &[usize],
    dw: &[F],
    s: ArrayView1<F>,
    norm_eps: Option<F>,
    scale: f64,
    grad_logits: &mut Array2<F>,
    t: usize,
) {
    let r = F::from_f64(scale);
    let one = F::one();
    match norm_eps {
        Some(eps) => {
            let denom: F = idx.iter().map(|&e| s[e]).sum::<F>() + eps;
            let dw_dot_w: F = idx.iter().zip(dw).map(|(&e, &d)| d * (s[e] / denom)).sum();
            for (&e, &d) in idx.iter().zip(dw) {
                let ds = r * ((d - dw_dot_w) / denom);
                grad_logits[[t, e]] = ds * s[e] * (one - s[e]);
            }
        }
        None => {
            for (&e, &d) in idx.iter().zip(dw) {
                grad_logits[[t, e]] = r * d * s[e] * (one - s[e]);
            }
        }
    }
}

/// Indices of the `k` largest values, descending; equal values: lower index first (stable sort).
/// The values hold no NaN (checked by the callers), so `partial_cmp` is total here.
pub(crate) fn top_k_order<F: Real>(values: &[F], k: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..values.len()).collect();
    order.sort_by(|&a, &b| {
        values[b]
            .partial_cmp(&values[a])
            .unwrap_or(std::cmp::Ordering::Equal)
    });
    order.truncate(k);
    order
}

/// Max-subtracted softmax of one row.
fn softmax<F: Real>(z: &[F]) -> Vec<F> {
    let max = z.iter().copied().fold(F::neg_infinity(), F::max);
    let exps: Vec<F> = z.iter().map(|&v| (v - max).exp()).collect();
    let sum: F = exps.iter().copied().sum();
    exps.into_iter().map(|v| v / sum).collect()
}

type RowResult<F> = (Vec<F>, Vec<usize>, Vec<F>);

fn softmax_topk_row<F: Real>(z: &[F], k: usize, norm: bool) -> RowResult<F> {
    let p = softmax(z);
    let idx = top_k_order(&p, k);
    let mut w: Vec<F> = idx.iter().map(|&e| p[e]).collect();
    if norm {
        let sum: F = w.iter().copied().sum();
        w.iter_mut().for_each(|v| *v /= sum);
    }
    (p, idx, w)
}

fn topk_softmax_row<F: Real>(z: &[F], k: usize) -> RowResult<F> {
    let idx = top_k_order(z, k);
    let selected: Vec<F> = idx.iter().map(|&e| z[e]).collect();
    let w = softmax(&selected);
    let mut probs = vec![F::zero(); z.len()];
    for (&e, &v) in idx.iter().zip(&w) {
        probs[e] = v;
    }
    (probs, idx, w)
}

#[derive(Debug, Clone, Copy)]
struct Groups {
    n_group: usize,
    topk_group: usize,
}

/// Sigmoid routers: `s = sigmoid(z)`, selection on `s + bias` (optionally group-limited),
/// weights `s[idx]`, optional renorm with denominator `sum + eps`, times `scale`.
fn sigmoid_row<F: Real>(
    t: usize,
    z: &[F],
    k: usize,
    bias: Option<ArrayView1<F>>,
    groups: Option<Groups>,
    norm_eps: Option<F>,
    scale: f64,
) -> Result<RowResult<F>> {
    let one = F::one();
    let s: Vec<F> = z.iter().map(|&v| one / (one + (-v).exp())).collect();
    let mut choice: Vec<F> = match bias {
        Some(b) => s.iter().zip(b.iter()).map(|(&v, &b)| v + b).collect(),
        None => s.clone(),
    };
    if let Some((expert, &value)) = choice.iter().enumerate().find(|(_, v)| !v.is_finite()) {
        return Err(KernelError::NonFiniteScore {
            token: t,
            expert,
            value: value.to_f64_lossless(),
        });
    }
    if let Some(g) = groups {
        let size = z.len() / g.n_group;
        // Group score: sum of the two largest biased scores in the group.
        let group_scores: Vec<F> = choice
            .chunks(size)
            .map(|c| top_k_order(c, 2).iter().map(|&i| c[i]).sum())
            .collect();
        let kept = top_k_order(&group_scores, g.topk_group);
        for (gi, chunk) in choice.chunks_mut(size).enumerate() {
            if !kept.contains(&gi) {
                chunk.iter_mut().for_each(|v| *v = F::neg_infinity());
            }
        }
    }
    let idx = top_k_order(&choice, k);
    let mut w: Vec<F> = idx.iter().map(|&e| s[e]).collect();
    if let Some(eps) = norm_eps {
        let denom = w.iter().copied().sum::<F>() + eps;
        w.iter_mut().for_each(|v| *v /= denom);
    }
    let r = F::from_f64(scale);
    w.iter_mut().for_each(|v| *v *= r);
    Ok((s, idx, w))
}
