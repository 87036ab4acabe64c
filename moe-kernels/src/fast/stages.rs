//! The stages of the fast MoE path as separate calls, so that a distributed MoE layer (expert
//! parallel, tensor parallel on the experts, sequence parallel, FSDP) can run collectives
//! between them. [`super::moe_forward`] / [`super::moe_backward`] are these stages chained on
//! one rank, so chaining them by hand gives the same bits.
//!
//! Forward chain (backward: the same stages' `*_backward` in reverse order):
//!
//! ```text
//! x [T, H] --router_forward--> (logits [T, E], routing)                 gate, route
//!          --Permutation::from_top_k_index--> offsets, row_of_slot       counts, scan, scatter
//!          --permute_forward--> xp [N = T k, H]                           (EP: all_to_all_v here)
//!          --experts_forward--> y [N, H]                                  (TP: all_reduce of y)
//!          --combine_forward--> out [T, H]  (+ shared_expert_forward)     (EP: all_to_all_v back)
//! ```
//!
//! Sources: the expert MLP is transformers' eager `*Experts.forward` (`Qwen3MoeExperts`,
//! `GptOssExperts`, ...) on a group of experts; the grouped layout (rows sorted by expert, an
//! exclusive scan of per-expert counts as group offsets) is the one of torchtitan's
//! `GroupedExperts` (`torch._grouped_mm` with `offsets`) and Megatron-LM's `GroupedMLP`
//! (`moe_utils.permute` / `unpermute`). The tensor-parallel split of an expert follows
//! Megatron's expert tensor parallelism: the first projection is column parallel (each rank
//! holds the same column slice of the gate half and of the up half, packed gate first), the
//! second row parallel with its bias added on one rank only; the partial `y` are summed.
//!
//! Every stage validates all shapes before computing and returns
//! [`KernelError::ShapeMismatch`] naming the tensor; none panics on bad input. All are f32,
//! rayon-parallel and bitwise deterministic (each output element is one fixed-order reduction).

use ndarray::{Array1, Array2, Array3, ArrayView1, ArrayView2, ArrayView3, ArrayViewMut2, Axis};

use super::alloc::{recycle, scratch2, scratch3, zeros2};
use super::gemm::{matmul, Parallelism};
use super::grouped::{
    grouped_matmul, grouped_matmul_then, grouped_matmul_tn, grouped_row_sum, par_rows, Rows,
};
use crate::activation::{glu_backward, glu_forward, sigmoid};
use crate::config::{
    check_activation, check_dim, check_router, check_shared, mismatch, Activation, MoeConfig,
    MoeParams, SharedExpertGrads, SharedExpertParams,
};
use crate::error::{KernelError, Result};
use crate::router::Routing;
use crate::routing::{route, route_backward};

/// `a @ b` into a new array, rayon-parallel inside the GEMM.
pub(crate) fn dense(a: ArrayView2<f32>, b: ArrayView2<f32>) -> Result<Array2<f32>> {
    let mut out = scratch2(a.nrows(), b.ncols());
    matmul(out.view_mut(), a, b, false, Parallelism::Rayon(0))?;
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// Experts
// ---------------------------------------------------------------------------------------------

/// Weights of a contiguous group of experts held by one rank: `E_l` experts, `I_l` = this rank's
/// intermediate size (a TP shard: gate half first, then up half, each `I_l` wide).
///
/// Unsharded (`E_l = E`, `I_l = I`) these are the [`MoeParams`] expert tensors
/// ([`ExpertWeights::from_params`]). For expert parallelism pass the rank's experts
/// (`gate_and_up_projs.slice(s![e0..e1, .., ..])`); for tensor parallelism over `R` ranks, rank `r`
/// holds columns `r I_l..(r + 1) I_l` of the gate half and the same columns of the up half,
/// packed `[gate shard | up shard]`, rows `r I_l..(r + 1) I_l` of `down_projs`, the matching
/// columns of `gate_up_bias`, and `down_bias` on one rank only (`None` elsewhere) so that the
/// sum of the ranks' `y` adds it once (Megatron's row-parallel bias).
#[derive(Debug, Clone, Copy)]
pub struct ExpertWeights<'a> {
    /// `[E_l, H, 2 I_l]`, gate half first.
    pub gate_and_up_projs: ArrayView3<'a, f32>,
    /// `[E_l, I_l, H]`.
    pub down_projs: ArrayView3<'a, f32>,
    /// `[E_l, 2 I_l]` bias of the gate/up projection, gate half first (GPT-OSS).
    pub gate_up_bias: Option<ArrayView2<'a, f32>>,
    /// `[E_l, H]` bias of the down projection (GPT-OSS).
    pub down_bias: Option<ArrayView2<'a, f32>>,
}

impl<'a> ExpertWeights<'a> {
    /// The expert tensors of a whole block (`E_l = E`, `I_l = I`).
    pub fn from_params(p: &MoeParams<'a, f32>) -> Self {
        ExpertWeights {
            gate_and_up_projs: p.gate_and_up_projs,
            down_projs: p.down_projs,
            gate_up_bias: p.gate_up_bias,
            down_bias: p.down_bias,
        }
    }

    /// Number of experts `E_l`.
    pub fn num_experts(&self) -> usize {
        self.gate_and_up_projs.shape()[0]
    }

    /// Intermediate size `I_l` (half the last dimension of `gate_and_up_projs`).
    pub fn inter(&self) -> usize {
        self.gate_and_up_projs.shape()[2] / 2
    }
}

/// Saved activations of [`experts_forward`], rows in the same (expert-contiguous) order as `xp`.
#[derive(Debug, Clone)]
pub struct ExpertActs {
    /// `[N, 2 I_l]` pre-activations `xp W_gu[e] (+ b_gu[e])`, gate half first.
    pub a: Array2<f32>,
    /// `[N, I_l]` hidden activations `act(a[.., ..I_l], a[.., I_l..])`.
    pub h: Array2<f32>,
    /// `[N, H]` expert outputs `h W_d[e] (+ b_d[e])`, before the routing weight.
    pub y: Array2<f32>,
}

/// Gradients of [`experts_backward`], same shapes as the inputs and [`ExpertWeights`].
#[derive(Debug, Clone, PartialEq)]
pub struct ExpertGrads {
    /// `[N, H]` gradient w.r.t. `xp`.
    pub grad_xp: Array2<f32>,
    /// `[E_l, H, 2 I_l]`.
    pub gate_and_up_projs: Array3<f32>,
    /// `[E_l, I_l, H]`.
    pub down_projs: Array3<f32>,
    /// `[E_l, 2 I_l]`, `Some` iff the weights have `gate_up_bias`.
    pub gate_up_bias: Option<Array2<f32>>,
    /// `[E_l, H]`, `Some` iff the weights have `down_bias`.
    pub down_bias: Option<Array2<f32>>,
}

/// Checks the `[N, H]` rows (`xp`) / `offsets` / weights; returns `(E_l, I_l)`.
fn check_experts(
    (rows, hidden): (usize, usize),
    offsets: &[usize],
    w: &ExpertWeights,
) -> Result<(usize, usize)> {
    let gu = w.gate_and_up_projs.shape();
    let experts = gu[0];
    if gu[1] != hidden || gu[2] % 2 != 0 {
        return Err(mismatch(
            "gate_and_up_projs",
            format!("[E_l, H={hidden}, 2I_l (even)]"),
            gu,
        ));
    }
    let inter = gu[2] / 2;
    check_dim(
        "down_projs",
        w.down_projs.shape(),
        &[experts, inter, hidden],
        "[E_l, I_l, H]",
    )?;
    if let Some(b) = w.gate_up_bias {
        check_dim(
            "gate_up_bias",
            b.shape(),
            &[experts, 2 * inter],
            "[E_l, 2I_l]",
        )?;
    }
    if let Some(b) = w.down_bias {
        check_dim("down_bias", b.shape(), &[experts, hidden], "[E_l, H]")?;
    }
    if offsets.len() != experts + 1 {
        return Err(mismatch(
            "offsets",
            format!("[E_l + 1 = {}] (got: its length)", experts + 1),
            &[offsets.len()],
        ));
    }
    let scan_ok =
        offsets[0] == 0 && offsets.windows(2).all(|p| p[0] <= p[1]) && offsets[experts] == rows;
    if !scan_ok {
        return Err(mismatch(
            "offsets",
            format!("offsets[0] = 0, non-decreasing, offsets[E_l] = N = {rows} (got: its values)"),
            offsets,
        ));
    }
    Ok((experts, inter))
}

/// Grouped expert MLP forward on rows grouped by local expert:
/// `a = xp W_gu[e] (+ b_gu[e])`, `h = act(a[.., ..I_l], a[.., I_l..])`,
/// `y = h W_d[e] (+ b_d[e])` for the rows `offsets[e]..offsets[e + 1]` of expert `e`
/// (transformers' eager `*Experts.forward` per expert; torchtitan / Megatron grouped GEMM).
/// No routing weight: [`combine_forward`] applies it.
///
/// `xp` `[N, H]` token rows grouped by local expert; `offsets` `[E_l + 1]` exclusive scan of the
/// per-expert row counts (`offsets[0] == 0`, `offsets[E_l] == N`). `N` may be 0; an expert may
/// have no rows. Returns `y` `[N, H]` with the saved `a` `[N, 2 I_l]`, `h` `[N, I_l]`.
///
/// # Errors
/// [`KernelError::ShapeMismatch`] naming `gate_and_up_projs` (`H` differs from `xp`'s, odd last
/// dim), `down_projs`, `gate_up_bias`, `down_bias` (`E_l`, `I_l`, `H` disagree) or `offsets`
/// (length not `E_l + 1`, not a scan ending at `N`); [`KernelError::InvalidConfig`] for a bad
/// activation limit.
pub fn experts_forward(
    xp: ArrayView2<f32>,
    offsets: &[usize],
    w: &ExpertWeights,
    act: &Activation,
) -> Result<ExpertActs> {
    experts_forward_rows(Rows::Dense(xp), offsets, w, act)
}

/// [`experts_forward`] on [`Rows`]: with [`Rows::Gather`] (`x` `[T, H]` and the permutation's
/// `token_of_row` `[N]`) the dispatch gather is folded into the gate/up GEMM and `xp` is never
/// stored; the result is bitwise the one of [`experts_forward`] on [`permute_forward`]'s `xp`.
/// The GLU activation and the down projection run in the gate/up GEMM's epilogue, on each
/// task's rows while they are in cache.
///
/// # Errors
/// Those of [`experts_forward`]; [`KernelError::ShapeMismatch`] naming `token_of_row` when an
/// entry is `>= T`.
pub fn experts_forward_rows(
    xp: Rows,
    offsets: &[usize],
    w: &ExpertWeights,
    act: &Activation,
) -> Result<ExpertActs> {
    let (n, hidden) = (xp.nrows(), xp.ncols());
    let (_, inter) = check_experts((n, hidden), offsets, w)?;
    check_activation(act)?;

    let mut a = scratch2(n, 2 * inter);
    let mut h = scratch2(n, inter);
    let mut y = scratch2(n, hidden);
    let (gate_up_bias, down_bias) = (w.gate_up_bias, w.down_bias);
    // Each task: gate/up GEMM, bias, GLU into h, then the down GEMM of the same rows (h still in
    // cache) and its bias; the bits are those of the three separate grouped passes.
    grouped_matmul_then(
        &mut a,
        xp,
        offsets,
        |e| w.gate_and_up_projs.index_axis(Axis(0), e),
        &mut [&mut h, &mut y],
        |e, _r0, mut a_blk, sides| {
            let [h_blk, y_blk] = sides else {
                return Err(mismatch("side", "[h, y]".to_string(), &[sides.len()]));
            };
            if let Some(b) = gate_up_bias {
                for mut row in a_blk.rows_mut() {
                    row += &b.row(e);
                }
            }
            for (ar, mut hr) in a_blk.rows().into_iter().zip(h_blk.rows_mut()) {
                for (i, v) in hr.iter_mut().enumerate() {
                    *v = glu_forward(act, ar[i], ar[inter + i]);
                }
            }
            matmul(
                y_blk.view_mut(),
                h_blk.view(),
                w.down_projs.index_axis(Axis(0), e),
                false,
                Parallelism::None,
            )?;
            if let Some(b) = down_bias {
                for mut row in y_blk.rows_mut() {
                    row += &b.row(e);
                }
            }
            Ok(())
        },
    )?;
    Ok(ExpertActs { a, h, y })
}

/// Backward of [`experts_forward`]: from `grad_y` `[N, H]` (dL/dy, the caller has applied the
/// routing weight, e.g. by [`combine_backward`]) to dL/dxp and the weight / bias gradients.
///
/// `dW_d[e] = h_e^T dy_e`, `db_d[e] = sum dy_e`, `dh = dy W_d[e]^T`, `da = act'(a) dh`,
/// `dW_gu[e] = xp_e^T da_e`, `db_gu[e] = sum da_e`, `dxp = da W_gu[e]^T`: M-grouped GEMMs for
/// the data gradients, K-grouped GEMMs over each expert's rows for the weights (torchtitan /
/// Megatron grouped GEMM backward). Experts with zero rows get exact zero gradients. `acts` must
/// come from [`experts_forward`] on the same `xp`, `offsets`, `w`, `act` (only `a` and `h` are
/// read).
///
/// # Errors
/// The errors of [`experts_forward`]; [`KernelError::ShapeMismatch`] naming `acts.a`
/// (`[N, 2I_l]`), `acts.h` (`[N, I_l]`) or `grad_y` (`[N, H]`).
pub fn experts_backward(
    xp: ArrayView2<f32>,
    offsets: &[usize],
    w: &ExpertWeights,
    act: &Activation,
    acts: &ExpertActs,
    grad_y: ArrayView2<f32>,
) -> Result<ExpertGrads> {
    let (experts, inter) = check_experts(xp.dim(), offsets, w)?;
    check_activation(act)?;
    let (n, hidden) = xp.dim();
    check_dim("acts.a", acts.a.shape(), &[n, 2 * inter], "[N, 2I_l]")?;
    check_dim("acts.h", acts.h.shape(), &[n, inter], "[N, I_l]")?;
    check_dim("grad_y", grad_y.shape(), &[n, hidden], "[N, H]")?;

    let mut down_projs = scratch3(experts, inter, hidden);
    grouped_matmul_tn(&mut down_projs, acts.h.view(), grad_y, offsets)?;
    let down_bias = w.down_bias.map(|_| grouped_row_sum(grad_y, offsets));
    let mut dh = scratch2(n, inter);
    grouped_matmul(&mut dh, grad_y, offsets, |e| {
        w.down_projs.index_axis(Axis(0), e).reversed_axes()
    })?;

    let mut da = scratch2(n, 2 * inter);
    {
        let (a, dh) = (acts.a.view(), dh.view());
        par_rows(&mut da, |r, row| {
            let (ar, dhr) = (a.row(r), dh.row(r));
            for i in 0..inter {
                let (dg, du) = glu_backward(act, ar[i], ar[inter + i], dhr[i]);
                row[i] = dg;
                row[inter + i] = du;
            }
        });
    }
    recycle(dh);
    let mut gate_and_up_projs = scratch3(experts, hidden, 2 * inter);
    grouped_matmul_tn(&mut gate_and_up_projs, xp, da.view(), offsets)?;
    let gate_up_bias = w.gate_up_bias.map(|_| grouped_row_sum(da.view(), offsets));
    let mut grad_xp = scratch2(n, hidden);
    grouped_matmul(&mut grad_xp, da.view(), offsets, |e| {
        w.gate_and_up_projs.index_axis(Axis(0), e).reversed_axes()
    })?;
    recycle(da);
    Ok(ExpertGrads {
        grad_xp,
        gate_and_up_projs,
        down_projs,
        gate_up_bias,
        down_bias,
    })
}

// ---------------------------------------------------------------------------------------------
// Permutation (dispatch gather) and combine
// ---------------------------------------------------------------------------------------------

/// Checks `row_of_slot` `[T, k]` against `weights` `[T, k]` and `rows` = `N`.
fn check_slots(
    weights: ArrayView2<f32>,
    row_of_slot: ArrayView2<usize>,
    rows: usize,
) -> Result<()> {
    check_dim(
        "row_of_slot",
        row_of_slot.shape(),
        weights.shape(),
        "[T, k] (as weights)",
    )?;
    if let Some(&bad) = row_of_slot.iter().find(|&&r| r >= rows) {
        return Err(mismatch(
            "row_of_slot",
            format!("row ids < N = {rows} (got: the first bad id)"),
            &[bad],
        ));
    }
    Ok(())
}

/// Gathers token rows into expert-grouped order: `xp[r] = x[token_of_row[r]]` (Megatron
/// `moe_utils.permute`; the forward half of the dispatch). `x` `[T, H]`, `token_of_row` `[N]`
/// ([`crate::Permutation::token_of_rows`]) -> `xp` `[N, H]`.
///
/// # Errors
/// [`KernelError::ShapeMismatch`] naming `token_of_row` when an entry is `>= T`.
pub fn permute_forward(x: ArrayView2<f32>, token_of_row: &[usize]) -> Result<Array2<f32>> {
    let tokens = x.nrows();
    if let Some(&bad) = token_of_row.iter().find(|&&t| t >= tokens) {
        return Err(mismatch(
            "token_of_row",
            format!("token ids < T = {tokens} (got: the first bad id)"),
            &[bad],
        ));
    }
    let mut out = scratch2(token_of_row.len(), x.ncols());
    par_rows(&mut out, |r, row| {
        row.iter_mut()
            .zip(x.row(token_of_row[r]))
            .for_each(|(o, &v)| *o = v);
    });
    Ok(out)
}

/// Backward of [`permute_forward`]: `grad_x[t] = sum_j grad_xp[row_of_slot[t, j]]`, per token
/// over `j` ascending from zero (deterministic gather-sum, no atomics; Megatron
/// `moe_utils.unpermute` without probabilities). `grad_xp` `[N, H]`, `row_of_slot` `[T, k]`
/// ([`crate::Permutation::row_of_slot_matrix`]) -> `[T, H]`.
///
/// # Errors
/// [`KernelError::ShapeMismatch`] naming `row_of_slot` when an entry is `>= N`.
pub fn permute_backward(
    grad_xp: ArrayView2<f32>,
    row_of_slot: ArrayView2<usize>,
) -> Result<Array2<f32>> {
    let rows = grad_xp.nrows();
    if let Some(&bad) = row_of_slot.iter().find(|&&r| r >= rows) {
        return Err(mismatch(
            "row_of_slot",
            format!("row ids < N = {rows} (got: the first bad id)"),
            &[bad],
        ));
    }
    let mut grad_x = zeros2(row_of_slot.nrows(), grad_xp.ncols());
    par_rows(&mut grad_x, |t, row| {
        for &r in row_of_slot.row(t) {
            row.iter_mut()
                .zip(grad_xp.row(r))
                .for_each(|(o, &v)| *o += v);
        }
    });
    Ok(grad_x)
}

/// Combine: `out[t] = sum_j w[t, j] y[row_of_slot[t, j]]`, per token over `j` ascending from
/// zero (a deterministic gather-sum, no atomics; the routing weight scales the expert output,
/// `down_bias` included, as in transformers' eager `*Experts.forward`; Megatron
/// `moe_utils.unpermute` with probabilities).
///
/// `y` `[N, H]` expert outputs, `weights` `[T, k]` routing weights (`Routing::top_k_weights`),
/// `row_of_slot` `[T, k]` the row of `y` holding token `t`'s `j`-th choice
/// ([`crate::Permutation::row_of_slot_matrix`]) -> `[T, H]`.
///
/// # Errors
/// [`KernelError::ShapeMismatch`] naming `row_of_slot` (shape not that of `weights`, an entry
/// `>= N`).
pub fn combine_forward(
    y: ArrayView2<f32>,
    weights: ArrayView2<f32>,
    row_of_slot: ArrayView2<usize>,
) -> Result<Array2<f32>> {
    check_slots(weights, row_of_slot, y.nrows())?;
    let mut out = zeros2(weights.nrows(), y.ncols());
    par_rows(&mut out, |t, row| {
        for (&r, &wj) in row_of_slot.row(t).iter().zip(weights.row(t)) {
            row.iter_mut()
                .zip(y.row(r))
                .for_each(|(o, &v)| *o += wj * v);
        }
    });
    Ok(out)
}

/// Backward of [`combine_forward`]: `grad_y[row_of_slot[t, j]] = w[t, j] grad_out[t]` (rows of
/// `y` that no slot uses get zeros) and `grad_weights[t, j] = <grad_out[t], y[row_of_slot[t, j]]>`
/// (the input of [`router_backward`]). Returns `(grad_y [N, H], grad_weights [T, k])`.
///
/// # Errors
/// The errors of [`combine_forward`]; [`KernelError::ShapeMismatch`] naming `row_of_slot` when
/// two slots share a row (each row of `y` is one (token, expert) pair) or `grad_out` when it is
/// not `[T, H]`.
pub fn combine_backward(
    y: ArrayView2<f32>,
    weights: ArrayView2<f32>,
    row_of_slot: ArrayView2<usize>,
    grad_out: ArrayView2<f32>,
) -> Result<(Array2<f32>, Array2<f32>)> {
    let (rows, hidden) = y.dim();
    check_slots(weights, row_of_slot, rows)?;
    let (tokens, k) = weights.dim();
    check_dim("grad_out", grad_out.shape(), &[tokens, hidden], "[T, H]")?;
    // Inverse map row -> slot (flat t * k + j); usize::MAX = unused row.
    let mut slot_of_row = vec![usize::MAX; rows];
    for (slot, &r) in row_of_slot.iter().enumerate() {
        if slot_of_row[r] != usize::MAX {
            return Err(mismatch(
                "row_of_slot",
                "distinct row ids (got: a repeated id)".to_string(),
                &[r],
            ));
        }
        slot_of_row[r] = slot;
    }

    let mut grad_weights = zeros2(tokens, k);
    par_rows(&mut grad_weights, |t, row| {
        let go = grad_out.row(t);
        for (v, &r) in row.iter_mut().zip(row_of_slot.row(t)) {
            *v = go.iter().zip(y.row(r)).map(|(&a, &b)| a * b).sum();
        }
    });
    let mut grad_y = scratch2(rows, hidden);
    par_rows(&mut grad_y, |r, row| {
        let slot = slot_of_row[r];
        if slot != usize::MAX {
            let (t, j) = (slot / k, slot % k);
            let w = weights[[t, j]];
            row.iter_mut()
                .zip(grad_out.row(t))
                .for_each(|(o, &g)| *o = w * g);
        } else {
            row.fill(0.0);
        }
    });
    Ok((grad_y, grad_weights))
}

// ---------------------------------------------------------------------------------------------
// Router
// ---------------------------------------------------------------------------------------------

/// Router: logits `z = x W^T (+ gate_bias)` `[T, E]` (`F.linear(x, gate.weight, gate.bias)`),
/// then [`route`] with `cfg.router` / `cfg.top_k` and the selection-only
/// `e_score_correction_bias` (transformers' `*TopKRouter.forward`). `cfg.activation` is not
/// used. Returns `(logits [T, E], routing)`.
///
/// Shapes: `x` `[T, H]`, `gate_weight` `[E, H]`, `gate_bias` `[E]`, `e_score_correction_bias`
/// `[E]`.
///
/// # Errors
/// [`KernelError::ShapeMismatch`] naming `gate_weight`, `gate_bias` or
/// `e_score_correction_bias`; [`KernelError::ZeroTopK`], [`KernelError::TopKTooLarge`];
/// [`KernelError::InvalidConfig`] as [`crate::check_block`] (group layout, correction bias on a
/// softmax router, non-finite scaling factor); the router errors of [`route`].
pub fn router_forward(
    x: ArrayView2<f32>,
    gate_weight: ArrayView2<f32>,
    gate_bias: Option<ArrayView1<f32>>,
    e_score_correction_bias: Option<ArrayView1<f32>>,
    cfg: &MoeConfig,
) -> Result<(Array2<f32>, Routing<f32>)> {
    let experts = check_router_inputs(x, gate_weight, cfg)?;
    if let Some(b) = gate_bias {
        check_dim("gate_bias", b.shape(), &[experts], "[E]")?;
    }
    if let Some(b) = e_score_correction_bias {
        check_dim("e_score_correction_bias", b.shape(), &[experts], "[E]")?;
    }
    check_router(
        &cfg.router,
        experts,
        cfg.top_k,
        e_score_correction_bias.is_some(),
    )?;
    let mut logits = dense(x, gate_weight.t())?;
    if let Some(b) = gate_bias {
        logits += &b;
    }
    let routing = route(
        logits.view(),
        &cfg.router,
        cfg.top_k,
        e_score_correction_bias,
    )?;
    Ok((logits, routing))
}

/// Checks `gate_weight` `[E, H]` against `x` and `1 <= top_k <= E`; returns `E`.
fn check_router_inputs(
    x: ArrayView2<f32>,
    gate_weight: ArrayView2<f32>,
    cfg: &MoeConfig,
) -> Result<usize> {
    let experts = gate_weight.nrows();
    check_dim(
        "gate_weight",
        gate_weight.shape(),
        &[experts, x.ncols()],
        "[E, H]",
    )?;
    if cfg.top_k == 0 {
        return Err(KernelError::ZeroTopK);
    }
    if cfg.top_k > experts {
        return Err(KernelError::TopKTooLarge {
            top_k: cfg.top_k,
            num_experts: experts,
        });
    }
    Ok(experts)
}

/// Gradients of [`router_backward`].
#[derive(Debug, Clone, PartialEq)]
pub struct RouterGrads {
    /// `[T, H]` gradient w.r.t. `x` through the router logits.
    pub grad_x: Array2<f32>,
    /// `[E, H]`.
    pub gate_weight: Array2<f32>,
    /// `[E]`, `Some` iff `has_gate_bias`.
    pub gate_bias: Option<Array1<f32>>,
}

/// Router backward into `grad_x` (`=` or `+=` by `accumulate`); returns the weight gradients.
#[allow(clippy::too_many_arguments)]
pub(crate) fn router_backward_into(
    x: ArrayView2<f32>,
    gate_weight: ArrayView2<f32>,
    has_gate_bias: bool,
    cfg: &MoeConfig,
    routing: &Routing<f32>,
    grad_weights: ArrayView2<f32>,
    grad_x: ArrayViewMut2<f32>,
    accumulate: bool,
) -> Result<(Array2<f32>, Option<Array1<f32>>)> {
    let experts = check_router_inputs(x, gate_weight, cfg)?;
    let (tokens, k) = (x.nrows(), cfg.top_k);
    check_dim(
        "routing.top_k_index",
        routing.top_k_index.shape(),
        &[tokens, k],
        "[T, k]",
    )?;
    check_dim(
        "routing.top_k_weights",
        routing.top_k_weights.shape(),
        &[tokens, k],
        "[T, k]",
    )?;
    check_dim(
        "routing.probs",
        routing.probs.shape(),
        &[tokens, experts],
        "[T, E]",
    )?;
    if let Some(&bad) = routing.top_k_index.iter().find(|&&e| e >= experts) {
        return Err(mismatch(
            "routing.top_k_index",
            format!("expert ids < E = {experts} (got: the first bad id)"),
            &[bad],
        ));
    }
    check_dim("grad_weights", grad_weights.shape(), &[tokens, k], "[T, k]")?;
    let grad_logits = route_backward(&cfg.router, routing, grad_weights)?;
    let gate_weight_grad = dense(grad_logits.t(), x)?;
    let gate_bias = has_gate_bias.then(|| grad_logits.sum_axis(Axis(0)));
    matmul(
        grad_x,
        grad_logits.view(),
        gate_weight,
        accumulate,
        Parallelism::Rayon(0),
    )?;
    Ok((gate_weight_grad, gate_bias))
}

/// Backward of [`router_forward`] from `grad_weights` `[T, k]` (dL/d `top_k_weights`, e.g. from
/// [`combine_backward`]): [`route_backward`] to dL/dz `[T, E]`, then through `z = x W^T + b`:
/// `dW = dz^T x`, `db = sum_t dz`, `dx = dz W`. The selection and `e_score_correction_bias` have
/// no gradient. `routing` must come from [`router_forward`] on the same `x`.
///
/// # Errors
/// [`KernelError::ShapeMismatch`] naming `gate_weight`, `routing.top_k_index` (not `[T, k]` or
/// an id `>= E`), `routing.top_k_weights`, `routing.probs` (`[T, E]`) or `grad_weights`;
/// [`KernelError::ZeroTopK`], [`KernelError::TopKTooLarge`].
pub fn router_backward(
    x: ArrayView2<f32>,
    gate_weight: ArrayView2<f32>,
    has_gate_bias: bool,
    cfg: &MoeConfig,
    routing: &Routing<f32>,
    grad_weights: ArrayView2<f32>,
) -> Result<RouterGrads> {
    let mut grad_x = zeros2(x.nrows(), x.ncols());
    let (gate_weight, gate_bias) = router_backward_into(
        x,
        gate_weight,
        has_gate_bias,
        cfg,
        routing,
        grad_weights,
        grad_x.view_mut(),
        false,
    )?;
    Ok(RouterGrads {
        grad_x,
        gate_weight,
        gate_bias,
    })
}

// ---------------------------------------------------------------------------------------------
// Shared expert
// ---------------------------------------------------------------------------------------------

/// Saved activations of [`shared_expert_forward`] for [`shared_expert_backward`].
#[derive(Debug, Clone)]
pub struct SharedActs {
    /// `[T, Is]` gate / up projections and hidden activation.
    g: Array2<f32>,
    u: Array2<f32>,
    hs: Array2<f32>,
    /// `[T, H]` shared output before the gate.
    ys: Array2<f32>,
    /// `[T]` sigmoid gate (ones without a gate).
    gate: Array1<f32>,
}

impl SharedActs {
    /// Tokens `T` these activations were computed for.
    pub fn tokens(&self) -> usize {
        self.gate.len()
    }
}

/// Shared (always-on) expert, HF `nn.Linear` layout, SwiGLU (transformers `Qwen3NextMLP` /
/// `DeepseekV3MLP` as `shared_expert(s)`): `ys = (silu(x Wg^T) * (x Wu^T)) Wd^T`, then
/// `out = sigmoid(x Wsg^T) * ys` with the Qwen3-Next / 3.5 `shared_expert_gate` (`out = ys`
/// without one). `x` `[T, H]`; returns `(out [T, H], saved activations)`; the block adds `out`
/// to the routed output.
///
/// # Errors
/// [`KernelError::ShapeMismatch`] naming `shared.gate_proj` / `shared.up_proj` (`[Is, H]`),
/// `shared.down_proj` (`[H, Is]`) or `shared.gate` (`[1, H]`).
pub fn shared_expert_forward(
    x: ArrayView2<f32>,
    s: &SharedExpertParams<f32>,
) -> Result<(Array2<f32>, SharedActs)> {
    check_shared(x.ncols(), s)?;
    let g = dense(x, s.gate_proj.t())?;
    let u = dense(x, s.up_proj.t())?;
    let mut hs = g.clone();
    hs.zip_mut_with(&u, |h, &u| *h = glu_forward(&Activation::SwiGlu, *h, u));
    let ys = dense(hs.view(), s.down_proj.t())?;
    let gate = match s.gate {
        Some(w) => dense(x, w.t())?.column(0).mapv(sigmoid),
        None => Array1::ones(x.nrows()),
    };
    let mut out = ys.clone();
    {
        let gate = gate.view();
        par_rows(&mut out, |t, row| {
            row.iter_mut().for_each(|v| *v *= gate[t])
        });
    }
    Ok((out, SharedActs { g, u, hs, ys, gate }))
}

/// Shared-expert backward into `grad_x` (`=` or `+=` by `accumulate`).
pub(crate) fn shared_expert_backward_into(
    x: ArrayView2<f32>,
    s: &SharedExpertParams<f32>,
    acts: &SharedActs,
    grad_out: ArrayView2<f32>,
    mut grad_x: ArrayViewMut2<f32>,
    accumulate: bool,
) -> Result<SharedExpertGrads<f32>> {
    let is = check_shared(x.ncols(), s)?;
    let (tokens, hidden) = x.dim();
    for (name, a) in [
        ("acts.g", &acts.g),
        ("acts.u", &acts.u),
        ("acts.hs", &acts.hs),
    ] {
        check_dim(name, a.shape(), &[tokens, is], "[T, Is]")?;
    }
    check_dim("acts.ys", acts.ys.shape(), &[tokens, hidden], "[T, H]")?;
    check_dim("acts.gate", acts.gate.shape(), &[tokens], "[T]")?;
    check_dim("grad_out", grad_out.shape(), &[tokens, hidden], "[T, H]")?;

    let mut dys = grad_out.to_owned();
    par_rows(&mut dys, |t, row| {
        row.iter_mut().for_each(|v| *v *= acts.gate[t])
    });
    let down_proj = dense(dys.t(), acts.hs.view())?;
    let mut dhs = dense(dys.view(), s.down_proj)?;
    let mut du = zeros2(dhs.nrows(), dhs.ncols());
    ndarray::Zip::from(&mut dhs)
        .and(&mut du)
        .and(&acts.g)
        .and(&acts.u)
        .for_each(|dg, du, &g, &u| {
            let (a, b) = glu_backward(&Activation::SwiGlu, g, u, *dg);
            *dg = a;
            *du = b;
        });
    let dg = dhs;
    let gate_proj = dense(dg.t(), x)?;
    let up_proj = dense(du.t(), x)?;
    matmul(
        grad_x.view_mut(),
        dg.view(),
        s.gate_proj,
        accumulate,
        Parallelism::Rayon(0),
    )?;
    matmul(
        grad_x.view_mut(),
        du.view(),
        s.up_proj,
        true,
        Parallelism::Rayon(0),
    )?;
    let gate = match s.gate {
        Some(w) => {
            // out = sigmoid(zg) * ys: dzg = <dOut, ys> * gate (1 - gate).
            let mut dz = zeros2(tokens, 1);
            par_rows(&mut dz, |t, v| {
                let dgate: f32 = grad_out
                    .row(t)
                    .iter()
                    .zip(acts.ys.row(t))
                    .map(|(&a, &b)| a * b)
                    .sum();
                v[0] = dgate * acts.gate[t] * (1.0 - acts.gate[t]);
            });
            matmul(grad_x, dz.view(), w, true, Parallelism::Rayon(0))?;
            Some(dense(dz.t(), x)?)
        }
        None => None,
    };
    Ok(SharedExpertGrads {
        gate_proj,
        up_proj,
        down_proj,
        gate,
    })
}

/// Backward of [`shared_expert_forward`] from `grad_out` `[T, H]` (dL/d block output): the
/// gradients of `Wg`, `Wu`, `Wd` and the gate, and `grad_x` `[T, H]` (the shared expert's
/// contribution only; the block adds it to the routed and router terms). `acts` must come from
/// [`shared_expert_forward`] on the same `x` and `s`.
///
/// # Errors
/// The errors of [`shared_expert_forward`]; [`KernelError::ShapeMismatch`] naming `acts.*`
/// (activations of another `T` or `Is`) or `grad_out` (`[T, H]`).
pub fn shared_expert_backward(
    x: ArrayView2<f32>,
    s: &SharedExpertParams<f32>,
    acts: &SharedActs,
    grad_out: ArrayView2<f32>,
) -> Result<(Array2<f32>, SharedExpertGrads<f32>)> {
    let mut grad_x = zeros2(x.nrows(), x.ncols());
    let grads = shared_expert_backward_into(x, s, acts, grad_out, grad_x.view_mut(), false)?;
    Ok((grad_x, grads))
}
