//! The MoE block's configuration, parameters (native grouped layout), gradients and saved forward
//! state, shared by the [`crate::reference`] and [`crate::fast`] paths, plus shape validation.
//!
//! Native layout (NeMo Automodel's, used as `x @ W`):
//! `gate_and_up_projs` `[E, H, 2I]` with the gate half FIRST for every family (GPT-OSS's
//! interleaved disk layout is de-interleaved by the adapters), `down_projs` `[E, I, H]`.

use ndarray::{Array1, Array2, Array3, ArrayView1, ArrayView2, ArrayView3};

use crate::error::{KernelError, Result};
use crate::router::Routing;
use crate::scalar::Real;

/// How router logits `z = x W^T (+ b)` `[T, E]` become `k` expert ids and weights per token.
/// Ties anywhere in a top-k: **the lowest expert (or group) index wins**.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RouterKind {
    /// `p = softmax(z)`; `(w, idx) = topk(p, k)`; if `norm_topk_prob`: `w /= sum(w)`.
    /// Qwen3-MoE (`Qwen3MoeTopKRouter`), Qwen3-Next / 3.5 / VL (norm = true), Mixtral
    /// (`MixtralTopKRouter`, norm = true).
    SoftmaxTopK {
        /// Renormalise the selected probabilities to sum to 1.
        norm_topk_prob: bool,
    },
    /// `(v, idx) = topk(z, k)` on the logits (which include the router bias `gate_bias`);
    /// `w = softmax(v)`. GPT-OSS (`GptOssTopKRouter`).
    TopKSoftmax,
    /// DeepSeek-V3 / GLM4-MoE (`DeepseekV3TopkRouter`): `s = sigmoid(z)`,
    /// `c = s + e_score_correction_bias` (selection only); group score = sum of the top-2 `c` in
    /// each of `n_group` contiguous groups; keep the `topk_group` best groups (others `-inf`);
    /// `idx = topk(c, k)`; `w = s[idx]` (unbiased); if `norm_topk_prob`:
    /// `w /= sum(w) + 1e-20`; `w *= routed_scaling_factor`.
    SigmoidGroupLimited {
        /// Number of expert groups (`E % n_group == 0`, group size >= 2).
        n_group: usize,
        /// Groups kept per token (`1 <= topk_group <= n_group`).
        topk_group: usize,
        /// Renormalise the selected scores (with `+ 1e-20` in the denominator).
        norm_topk_prob: bool,
        /// Factor applied to the weights after renormalisation (DeepSeek-V3: 2.5).
        routed_scaling_factor: f64,
    },
    /// Step3.5 / Step3.7 (transformers `models/step3p7/modeling_step3p7.py`,
    /// `Step3p7TopKRouter` + `Step3p7SparseMoeBlock`): `s = sigmoid(z)`; `idx = topk(s + bias, k)`
    /// (bias = `e_score_correction_bias`, disk `moe.router_bias`, selection only, no groups);
    /// `w = s[idx] / sum(s[idx])` (no epsilon) `* routed_scaling_factor` (HF scales the routed
    /// output by `moe_router_scaling_factor`, the same linear map).
    SigmoidTopK {
        /// HF `moe_router_scaling_factor` (default 1.0).
        routed_scaling_factor: f64,
    },
}

/// The expert MLP's gated activation on `a = x W_gu (+ b)` `[.., 2I]`, gate half `g = a[..I]`,
/// up half `u = a[I..]`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Activation {
    /// `h = silu(g) * u` (Qwen3, Mixtral, DeepSeek-V3, GLM4; `Qwen3MoeMLP`).
    SwiGlu,
    /// GPT-OSS (`GptOssExperts._apply_gate`): `g = min(g, limit)`, `u = clamp(u, -limit, limit)`,
    /// `h = (u + 1) * g * sigmoid(alpha * g)`; `alpha = 1.702`, `limit = swiglu_limit` (7.0).
    GptOssGlu {
        /// Clamp bound (`swiglu_limit`).
        limit: f64,
        /// Sigmoid slope (1.702).
        alpha: f64,
    },
    /// Step3.5 / Step3.7 clamped SwiGLU (`Step3p7Experts._apply_gate`):
    /// `h = min(silu(g), limit) * clamp(u, -limit, limit)` (layers with a `swiglu_limits` entry).
    ClampedSwiGlu {
        /// Clamp bound.
        limit: f64,
    },
}

/// Configuration of one MoE block.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MoeConfig {
    /// Router variant.
    pub router: RouterKind,
    /// Experts per token `k` (`num_experts_per_tok`), `1 <= k <= E`.
    pub top_k: usize,
    /// Expert activation.
    pub activation: Activation,
}

/// Shared (always-on) expert, HF `nn.Linear` layout (`y = x W^T`), SwiGLU:
/// `shared(x) = (silu(x Wg^T) * (x Wu^T)) Wd^T`, optionally gated per token by
/// `sigmoid(x gate^T)` (Qwen3-Next / 3.5 `shared_expert_gate`).
#[derive(Debug, Clone, Copy)]
pub struct SharedExpertParams<'a, F = f32> {
    /// `[Is, H]` (`shared_experts.gate_proj.weight`).
    pub gate_proj: ArrayView2<'a, F>,
    /// `[Is, H]` (`shared_experts.up_proj.weight`).
    pub up_proj: ArrayView2<'a, F>,
    /// `[H, Is]` (`shared_experts.down_proj.weight`).
    pub down_proj: ArrayView2<'a, F>,
    /// `[1, H]` sigmoid gate (`shared_expert_gate.weight`), Qwen3-Next / 3.5 only.
    pub gate: Option<ArrayView2<'a, F>>,
}

/// Parameters of one MoE block in the native layout (see the module doc).
#[derive(Debug, Clone, Copy)]
pub struct MoeParams<'a, F = f32> {
    /// `[E, H]` router weight (`mlp.gate.weight`).
    pub gate_weight: ArrayView2<'a, F>,
    /// `[E]` router bias added to the logits (GPT-OSS `mlp.router.bias`).
    pub gate_bias: Option<ArrayView1<'a, F>>,
    /// `[E]` selection-only bias of the sigmoid routers (no gradient).
    pub e_score_correction_bias: Option<ArrayView1<'a, F>>,
    /// `[E, H, 2I]`, gate half first.
    pub gate_and_up_projs: ArrayView3<'a, F>,
    /// `[E, I, H]`.
    pub down_projs: ArrayView3<'a, F>,
    /// `[E, 2I]` expert bias of the gate/up projection, gate half first (GPT-OSS).
    pub gate_up_bias: Option<ArrayView2<'a, F>>,
    /// `[E, H]` expert bias of the down projection (GPT-OSS); scaled by the routing weight.
    pub down_bias: Option<ArrayView2<'a, F>>,
    /// Shared experts, added to the routed output.
    pub shared: Option<SharedExpertParams<'a, F>>,
}

/// Gradients of the shared expert, same shapes as [`SharedExpertParams`].
#[derive(Debug, Clone, PartialEq)]
pub struct SharedExpertGrads<F = f32> {
    /// `[Is, H]`.
    pub gate_proj: Array2<F>,
    /// `[Is, H]`.
    pub up_proj: Array2<F>,
    /// `[H, Is]`.
    pub down_proj: Array2<F>,
    /// `[1, H]` when the params have a shared-expert gate.
    pub gate: Option<Array2<F>>,
}

/// Gradients of a scalar loss `L = sum(grad_output * output)` with respect to the input and every
/// trainable parameter (none for `e_score_correction_bias`). Optional fields are `Some` exactly
/// when the parameter is. An expert with zero tokens gets an exact zero gradient.
#[derive(Debug, Clone, PartialEq)]
pub struct MoeGrads<F = f32> {
    /// `[T, H]`.
    pub grad_input: Array2<F>,
    /// `[E, H]`.
    pub gate_weight: Array2<F>,
    /// `[E]`.
    pub gate_bias: Option<Array1<F>>,
    /// `[E, H, 2I]`.
    pub gate_and_up_projs: Array3<F>,
    /// `[E, I, H]`.
    pub down_projs: Array3<F>,
    /// `[E, 2I]`.
    pub gate_up_bias: Option<Array2<F>>,
    /// `[E, H]`.
    pub down_bias: Option<Array2<F>>,
    /// Shared-expert gradients.
    pub shared: Option<SharedExpertGrads<F>>,
}

/// Forward result: the block output, the router's decision and (fast path) saved activations.
#[derive(Debug, Clone)]
pub struct MoeForward<F = f32> {
    /// `[T, H]` block output (routed + shared).
    pub output: Array2<F>,
    /// `[T, E]` router logits `x W^T (+ b)`.
    pub router_logits: Array2<F>,
    /// Router result; `probs` holds the per-expert scores the weights are taken from (softmax
    /// for softmax routers, sigmoid for sigmoid routers, for `TopKSoftmax` the softmax over the
    /// selected logits scattered into `[T, E]`, zero elsewhere).
    pub routing: Routing<F>,
    /// Activations the fast backward reuses (`None` from the reference path, which recomputes).
    /// Held opaque (the fast path's own type, shared by clones), so that this shared vocabulary
    /// does not depend on the path that fills it.
    pub(crate) saved: Option<std::sync::Arc<dyn std::any::Any + Send + Sync>>,
}

/// Sizes of one block: `T` tokens, `H` hidden, `E` experts, `I` expert intermediate, `k`,
/// `Is` shared intermediate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dims {
    /// Tokens `T`.
    pub tokens: usize,
    /// Hidden size `H`.
    pub hidden: usize,
    /// Experts `E`.
    pub experts: usize,
    /// Expert intermediate size `I`.
    pub inter: usize,
    /// Experts per token `k`.
    pub top_k: usize,
    /// Shared-expert intermediate size `Is`, when there is a shared expert.
    pub shared_inter: Option<usize>,
}

/// A [`KernelError::ShapeMismatch`] naming `tensor`.
pub(crate) fn mismatch(tensor: &'static str, expected: String, got: &[usize]) -> KernelError {
    KernelError::ShapeMismatch {
        tensor,
        expected,
        got: got.to_vec(),
    }
}

/// `Ok` when `got == want`, else a shape mismatch naming `tensor` (`symbols` e.g. `[E, H]`).
pub(crate) fn check_dim(
    tensor: &'static str,
    got: &[usize],
    want: &[usize],
    symbols: &str,
) -> Result<()> {
    if got == want {
        Ok(())
    } else {
        Err(mismatch(tensor, format!("{symbols} = {want:?}"), got))
    }
}

/// Checks the shared-expert weights against the hidden size `H`; returns `Is`.
pub(crate) fn check_shared<F: Real>(hidden: usize, s: &SharedExpertParams<F>) -> Result<usize> {
    let is = s.gate_proj.nrows();
    check_dim(
        "shared.gate_proj",
        s.gate_proj.shape(),
        &[is, hidden],
        "[Is, H]",
    )?;
    check_dim(
        "shared.up_proj",
        s.up_proj.shape(),
        &[is, hidden],
        "[Is, H]",
    )?;
    check_dim(
        "shared.down_proj",
        s.down_proj.shape(),
        &[hidden, is],
        "[H, Is]",
    )?;
    if let Some(g) = s.gate {
        check_dim("shared.gate", g.shape(), &[1, hidden], "[1, H]")?;
    }
    Ok(is)
}

/// Checks every shape and hyper-parameter of a block call against `x` `[T, H]` and
/// `gate_weight` `[E, H]`; returns the sizes.
///
/// # Errors
/// [`KernelError::ShapeMismatch`] naming the first tensor whose shape is wrong;
/// [`KernelError::ZeroTopK`], [`KernelError::TopKTooLarge`]; [`KernelError::InvalidConfig`] for a
/// group layout that does not divide `E`, a `top_k` larger than the kept groups can hold, a
/// correction bias given to a softmax router, or a non-positive / non-finite activation limit.
pub fn check_block<F: Real>(x: ArrayView2<F>, p: &MoeParams<F>, cfg: &MoeConfig) -> Result<Dims> {
    let (tokens, hidden) = x.dim();
    let experts = p.gate_weight.nrows();
    check_dim(
        "gate_weight",
        p.gate_weight.shape(),
        &[experts, hidden],
        "[E, H]",
    )?;
    let gu = p.gate_and_up_projs.shape();
    if gu.len() != 3 || gu[0] != experts || gu[1] != hidden || gu[2] % 2 != 0 {
        return Err(mismatch(
            "gate_and_up_projs",
            format!("[E={experts}, H={hidden}, 2I (even)]"),
            gu,
        ));
    }
    let inter = gu[2] / 2;
    check_dim(
        "down_projs",
        p.down_projs.shape(),
        &[experts, inter, hidden],
        "[E, I, H]",
    )?;
    if let Some(b) = p.gate_bias {
        check_dim("gate_bias", b.shape(), &[experts], "[E]")?;
    }
    if let Some(b) = p.e_score_correction_bias {
        check_dim("e_score_correction_bias", b.shape(), &[experts], "[E]")?;
    }
    if let Some(b) = p.gate_up_bias {
        check_dim("gate_up_bias", b.shape(), &[experts, 2 * inter], "[E, 2I]")?;
    }
    if let Some(b) = p.down_bias {
        check_dim("down_bias", b.shape(), &[experts, hidden], "[E, H]")?;
    }
    let shared_inter = p
        .shared
        .as_ref()
        .map(|s| check_shared(hidden, s))
        .transpose()?;
    let top_k = cfg.top_k;
    if top_k == 0 {
        return Err(KernelError::ZeroTopK);
    }
    if top_k > experts {
        return Err(KernelError::TopKTooLarge {
            top_k,
            num_experts: experts,
        });
    }
    check_router(
        &cfg.router,
        experts,
        top_k,
        p.e_score_correction_bias.is_some(),
    )?;
    check_activation(&cfg.activation)?;
    Ok(Dims {
        tokens,
        hidden,
        experts,
        inter,
        top_k,
        shared_inter,
    })
}

pub(crate) fn check_router(
    kind: &RouterKind,
    experts: usize,
    top_k: usize,
    has_bias: bool,
) -> Result<()> {
    match *kind {
        RouterKind::SoftmaxTopK { .. } | RouterKind::TopKSoftmax if has_bias => {
            Err(KernelError::InvalidConfig(format!(
                "e_score_correction_bias is only used by sigmoid routers, not by {kind:?}"
            )))
        }
        RouterKind::SigmoidGroupLimited {
            n_group,
            topk_group,
            routed_scaling_factor,
            ..
        } => {
            if n_group == 0 || experts % n_group != 0 || experts / n_group < 2 {
                return Err(KernelError::InvalidConfig(format!(
                    "n_group = {n_group} must divide E = {experts} into groups of at least 2 experts"
                )));
            }
            if topk_group == 0 || topk_group > n_group {
                return Err(KernelError::InvalidConfig(format!(
                    "topk_group = {topk_group} must be in 1..=n_group = {n_group}"
                )));
            }
            if top_k > topk_group * (experts / n_group) {
                return Err(KernelError::InvalidConfig(format!(
                    "top_k = {top_k} exceeds the {} experts of the topk_group = {topk_group} kept groups",
                    topk_group * (experts / n_group)
                )));
            }
            check_finite("routed_scaling_factor", routed_scaling_factor)
        }
        RouterKind::SigmoidTopK {
            routed_scaling_factor,
        } => check_finite("routed_scaling_factor", routed_scaling_factor),
        _ => Ok(()),
    }
}

fn check_finite(name: &str, v: f64) -> Result<()> {
    if v.is_finite() {
        Ok(())
    } else {
        Err(KernelError::InvalidConfig(format!(
            "{name} = {v} is not finite"
        )))
    }
}

pub(crate) fn check_activation(act: &Activation) -> Result<()> {
    let limit = match *act {
        Activation::SwiGlu => return Ok(()),
        Activation::GptOssGlu { limit, alpha } => {
            check_finite("alpha", alpha)?;
            limit
        }
        Activation::ClampedSwiGlu { limit } => limit,
    };
    if limit.is_finite() && limit > 0.0 {
        Ok(())
    } else {
        Err(KernelError::InvalidConfig(format!(
            "activation limit = {limit} must be finite and > 0"
        )))
    }
}

/// Checks `grad_output` `[T, H]` and the saved routing `[T, k]` / `[T, E]`.
pub(crate) fn check_saved<F: Real>(
    grad_output: ArrayView2<F>,
    fwd: &MoeForward<F>,
    tokens: usize,
    hidden: usize,
    experts: usize,
    top_k: usize,
) -> Result<()> {
    if grad_output.dim() != (tokens, hidden) {
        return Err(KernelError::ShapeMismatch {
            tensor: "grad_output",
            expected: format!("[T={tokens}, H={hidden}]"),
            got: grad_output.shape().to_vec(),
        });
    }
    let r = &fwd.routing;
    if r.top_k_index.dim() != (tokens, top_k)
        || r.top_k_weights.dim() != (tokens, top_k)
        || r.probs.dim() != (tokens, experts)
    {
        return Err(KernelError::ShapeMismatch {
            tensor: "fwd.routing",
            expected: format!("top_k_* [T={tokens}, k={top_k}], probs [T, E={experts}]"),
            got: r.top_k_index.shape().to_vec(),
        });
    }
    if let Some(&bad) = r.top_k_index.iter().find(|&&e| e >= experts) {
        return Err(KernelError::ShapeMismatch {
            tensor: "fwd.routing.top_k_index",
            expected: format!("expert ids < E={experts}"),
            got: vec![bad],
        });
    }
    Ok(())
}
