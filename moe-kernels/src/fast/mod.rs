//! Fast CPU path of the MoE block (f32): permutation (counts, exclusive scan, stable scatter),
//! M-grouped GEMMs over the permuted rows, dW as K-grouped GEMMs, rayon parallelism, and a
//! deterministic per-token gather-sum combine (no atomics). Same signatures and results (within
//! f32 tolerance) as [`crate::reference`]; bitwise deterministic across runs and thread counts
//! (every output element is one fixed-order reduction, see [`grouped`]).
//!
//! Pipeline (`/work/shared/reference/kernels.md`): `z = x Wr^T (+ b)` -> route -> permutation
//! -> gather `xp` `[N = T k, H]` -> `a = xp W_gu[e] (+ b)` `[N, 2I]` -> `h = act(a)` `[N, I]`
//! -> `y = h W_d[e] (+ b)` `[N, H]` -> `out_t = sum_j w_{t,j} y[row(t, j)]` (+ shared).

pub mod gemm;
pub mod grouped;

use ndarray::{Array1, Array2, Array3, ArrayView2, Axis};

use crate::activation::{glu_backward, glu_forward, sigmoid};
use crate::config::{
    check_block, Activation, MoeConfig, MoeForward, MoeGrads, MoeParams, SharedExpertGrads,
    SharedExpertParams,
};
use crate::error::Result;
use crate::permute::Permutation;
use crate::reference::check_saved;
use crate::routing::{route, route_backward};
use gemm::{matmul, Parallelism};
use grouped::{grouped_matmul, grouped_matmul_tn, grouped_row_sum, par_rows};

/// Activations saved by [`moe_forward`] for [`moe_backward`].
#[derive(Debug, Clone)]
pub struct Saved {
    perm: Permutation,
    /// `[N, 2I]` expert pre-activations (with bias), permuted rows.
    a: Array2<f32>,
    /// `[N, I]` hidden activations.
    h: Array2<f32>,
    /// `[N, H]` expert outputs before the routing weight.
    y: Array2<f32>,
    shared: Option<SharedSaved>,
}

#[derive(Debug, Clone)]
struct SharedSaved {
    /// `[T, Is]` gate / up projections and hidden activation.
    g: Array2<f32>,
    u: Array2<f32>,
    hs: Array2<f32>,
    /// `[T, H]` shared output before the gate.
    ys: Array2<f32>,
    /// `[T]` sigmoid gate (ones without a gate).
    gate: Array1<f32>,
}

fn dense(a: ArrayView2<f32>, b: ArrayView2<f32>) -> Result<Array2<f32>> {
    let mut out = Array2::<f32>::zeros((a.nrows(), b.ncols()));
    matmul(out.view_mut(), a, b, false, Parallelism::Rayon(0))?;
    Ok(out)
}

/// Gathers rows of `src` `[T, C]` into permuted order `[N, C]` (row `r` <- token of `r`).
fn gather(src: ArrayView2<f32>, perm: &Permutation) -> Array2<f32> {
    let mut out = Array2::<f32>::zeros((perm.slot_of_row.len(), src.ncols()));
    par_rows(&mut out, |r, row| {
        row.iter_mut()
            .zip(src.row(perm.token_of_row(r)))
            .for_each(|(o, &v)| *o = v);
    });
    out
}

fn expert_of_rows(perm: &Permutation) -> Vec<usize> {
    let mut out = Vec::with_capacity(perm.slot_of_row.len());
    for (e, &c) in perm.counts.iter().enumerate() {
        out.extend(std::iter::repeat(e).take(c));
    }
    out
}

/// Fast forward (same contract as [`crate::reference::moe_forward`], f32).
///
/// # Errors
/// Shape and configuration errors of [`check_block`]; router errors of [`route`].
pub fn moe_forward(
    x: ArrayView2<f32>,
    p: &MoeParams<f32>,
    cfg: &MoeConfig,
) -> Result<MoeForward<f32>> {
    let (mut fwd, saved) = forward_inner(x, p, cfg)?;
    fwd.saved = Some(saved);
    Ok(fwd)
}

/// The forward proper: the result (without saved state) and the saved activations.
fn forward_inner(
    x: ArrayView2<f32>,
    p: &MoeParams<f32>,
    cfg: &MoeConfig,
) -> Result<(MoeForward<f32>, Saved)> {
    let d = check_block(x, p, cfg)?;
    let mut router_logits = dense(x, p.gate_weight.t())?;
    if let Some(b) = p.gate_bias {
        router_logits += &b;
    }
    let routing = route(
        router_logits.view(),
        &cfg.router,
        cfg.top_k,
        p.e_score_correction_bias,
    )?;
    let perm = Permutation::from_top_k_index(routing.top_k_index.view(), d.experts)?;
    let expert = expert_of_rows(&perm);
    let n = perm.slot_of_row.len();

    let xp = gather(x, &perm);
    let mut a = Array2::<f32>::zeros((n, 2 * d.inter));
    grouped_matmul(&mut a, xp.view(), &perm.offsets, |e| {
        p.gate_and_up_projs.index_axis(Axis(0), e)
    })?;
    let mut h = Array2::<f32>::zeros((n, d.inter));
    {
        let a = &mut a;
        if let Some(b) = p.gate_up_bias {
            par_rows(a, |r, row| {
                row.iter_mut()
                    .zip(b.row(expert[r]))
                    .for_each(|(v, &b)| *v += b)
            });
        }
        let a = a.view();
        let act = cfg.activation;
        par_rows(&mut h, |r, row| {
            let ar = a.row(r);
            for (i, v) in row.iter_mut().enumerate() {
                *v = glu_forward(&act, ar[i], ar[d.inter + i]);
            }
        });
    }
    let mut y = Array2::<f32>::zeros((n, d.hidden));
    grouped_matmul(&mut y, h.view(), &perm.offsets, |e| {
        p.down_projs.index_axis(Axis(0), e)
    })?;
    if let Some(b) = p.down_bias {
        par_rows(&mut y, |r, row| {
            row.iter_mut()
                .zip(b.row(expert[r]))
                .for_each(|(v, &b)| *v += b)
        });
    }

    // Combine: per token, slots j = 0..k in order (deterministic gather-sum).
    let mut output = Array2::<f32>::zeros((d.tokens, d.hidden));
    {
        let (yv, w) = (y.view(), routing.top_k_weights.view());
        par_rows(&mut output, |t, row| {
            for j in 0..d.top_k {
                let yr = yv.row(perm.row_of_slot[t * d.top_k + j]);
                let wj = w[[t, j]];
                row.iter_mut().zip(yr).for_each(|(o, &v)| *o += wj * v);
            }
        });
    }
    let shared = match &p.shared {
        Some(s) => {
            let saved = shared_forward(x, s)?;
            let (ys, gate) = (saved.ys.view(), saved.gate.view());
            par_rows(&mut output, |t, row| {
                row.iter_mut()
                    .zip(ys.row(t))
                    .for_each(|(o, &v)| *o += gate[t] * v);
            });
            Some(saved)
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
            a,
            h,
            y,
            shared,
        },
    ))
}

fn shared_forward(x: ArrayView2<f32>, s: &SharedExpertParams<f32>) -> Result<SharedSaved> {
    let g = dense(x, s.gate_proj.t())?;
    let u = dense(x, s.up_proj.t())?;
    let mut hs = g.clone();
    hs.zip_mut_with(&u, |h, &u| *h = glu_forward(&Activation::SwiGlu, *h, u));
    let ys = dense(hs.view(), s.down_proj.t())?;
    let gate = match s.gate {
        Some(w) => dense(x, w.t())?.column(0).mapv(sigmoid),
        None => Array1::ones(x.nrows()),
    };
    Ok(SharedSaved { g, u, hs, ys, gate })
}

/// Fast backward (same contract as [`crate::reference::moe_backward`], f32). Uses the
/// activations saved by [`moe_forward`]; given a forward from the reference path it recomputes
/// them.
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
    let sv = match &fwd.saved {
        Some(sv) => sv,
        None => {
            recomputed = forward_inner(x, p, cfg)?.1;
            &recomputed
        }
    };
    let perm = &sv.perm;
    let n = perm.slot_of_row.len();
    let k = d.top_k;
    let routing = &fwd.routing;

    // Routing-weight gradient dw[t, j] = <dOut_t, y[row(t, j)]>, and dy = w * dOut (permuted).
    let mut grad_weights = Array2::<f32>::zeros((d.tokens, k));
    par_rows(&mut grad_weights, |t, row| {
        let go = grad_output.row(t);
        for (j, v) in row.iter_mut().enumerate() {
            *v = go
                .iter()
                .zip(sv.y.row(perm.row_of_slot[t * k + j]))
                .map(|(&a, &b)| a * b)
                .sum();
        }
    });
    let mut dy = Array2::<f32>::zeros((n, d.hidden));
    par_rows(&mut dy, |r, row| {
        let slot = perm.slot_of_row[r];
        let w = routing.top_k_weights[[slot / k, slot % k]];
        row.iter_mut()
            .zip(grad_output.row(slot / k))
            .for_each(|(o, &g)| *o = w * g);
    });

    let mut down_projs = Array3::<f32>::zeros((d.experts, d.inter, d.hidden));
    grouped_matmul_tn(&mut down_projs, sv.h.view(), dy.view(), &perm.offsets)?;
    let down_bias = p
        .down_bias
        .map(|_| grouped_row_sum(dy.view(), &perm.offsets));
    let mut dh = Array2::<f32>::zeros((n, d.inter));
    grouped_matmul(&mut dh, dy.view(), &perm.offsets, |e| {
        p.down_projs.index_axis(Axis(0), e).reversed_axes()
    })?;
    drop(dy);

    let mut da = Array2::<f32>::zeros((n, 2 * d.inter));
    {
        let (a, dh, act) = (sv.a.view(), dh.view(), cfg.activation);
        par_rows(&mut da, |r, row| {
            let (ar, dhr) = (a.row(r), dh.row(r));
            for i in 0..d.inter {
                let (dg, du) = glu_backward(&act, ar[i], ar[d.inter + i], dhr[i]);
                row[i] = dg;
                row[d.inter + i] = du;
            }
        });
    }
    let xp = gather(x, perm);
    let mut gate_and_up_projs = Array3::<f32>::zeros((d.experts, d.hidden, 2 * d.inter));
    grouped_matmul_tn(&mut gate_and_up_projs, xp.view(), da.view(), &perm.offsets)?;
    drop(xp);
    let gate_up_bias = p
        .gate_up_bias
        .map(|_| grouped_row_sum(da.view(), &perm.offsets));
    let mut dxp = Array2::<f32>::zeros((n, d.hidden));
    grouped_matmul(&mut dxp, da.view(), &perm.offsets, |e| {
        p.gate_and_up_projs.index_axis(Axis(0), e).reversed_axes()
    })?;
    drop(da);

    // dx: per-token gather-sum over the k slots in order, then the router and shared terms.
    let mut grad_input = Array2::<f32>::zeros((d.tokens, d.hidden));
    {
        let dxp = dxp.view();
        par_rows(&mut grad_input, |t, row| {
            for j in 0..k {
                let src = dxp.row(perm.row_of_slot[t * k + j]);
                row.iter_mut().zip(src).for_each(|(o, &v)| *o += v);
            }
        });
    }
    let grad_logits = route_backward(&cfg.router, routing, grad_weights.view())?;
    let gate_weight = dense(grad_logits.t(), x)?;
    let gate_bias = p.gate_bias.map(|_| grad_logits.sum_axis(Axis(0)));
    matmul(
        grad_input.view_mut(),
        grad_logits.view(),
        p.gate_weight,
        true,
        Parallelism::Rayon(0),
    )?;

    let shared = match (&p.shared, &sv.shared) {
        (Some(s), Some(ss)) => Some(shared_backward(x, s, ss, grad_output, &mut grad_input)?),
        _ => None,
    };
    Ok(MoeGrads {
        grad_input,
        gate_weight,
        gate_bias,
        gate_and_up_projs,
        down_projs,
        gate_up_bias,
        down_bias,
        shared,
    })
}

fn shared_backward(
    x: ArrayView2<f32>,
    s: &SharedExpertParams<f32>,
    ss: &SharedSaved,
    grad_output: ArrayView2<f32>,
    grad_input: &mut Array2<f32>,
) -> Result<SharedExpertGrads<f32>> {
    let tokens = x.nrows();
    let mut dys = grad_output.to_owned();
    par_rows(&mut dys, |t, row| {
        row.iter_mut().for_each(|v| *v *= ss.gate[t])
    });
    let down_proj = dense(dys.t(), ss.hs.view())?;
    let mut dhs = dense(dys.view(), s.down_proj)?;
    let mut du = Array2::<f32>::zeros(dhs.raw_dim());
    ndarray::Zip::from(&mut dhs)
        .and(&mut du)
        .and(&ss.g)
        .and(&ss.u)
        .for_each(|dg, du, &g, &u| {
            let (a, b) = glu_backward(&Activation::SwiGlu, g, u, *dg);
            *dg = a;
            *du = b;
        });
    let dg = dhs;
    let gate_proj = dense(dg.t(), x)?;
    let up_proj = dense(du.t(), x)?;
    matmul(
        grad_input.view_mut(),
        dg.view(),
        s.gate_proj,
        true,
        Parallelism::Rayon(0),
    )?;
    matmul(
        grad_input.view_mut(),
        du.view(),
        s.up_proj,
        true,
        Parallelism::Rayon(0),
    )?;
    let gate = match s.gate {
        Some(w) => {
            let mut dz = Array2::<f32>::zeros((tokens, 1));
            par_rows(&mut dz, |t, v| {
                let dgate: f32 = grad_output
                    .row(t)
                    .iter()
                    .zip(ss.ys.row(t))
                    .map(|(&a, &b)| a * b)
                    .sum();
                v[0] = dgate * ss.gate[t] * (1.0 - ss.gate[t]);
            });
            matmul(
                grad_input.view_mut(),
                dz.view(),
                w,
                true,
                Parallelism::Rayon(0),
            )?;
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
