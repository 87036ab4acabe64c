//! The specification of the MoE block for every seed family: a plain per-expert, per-token loop,
//! forward and backward, generic over `f32` / `f64`, written to be read (not to be fast).
//!
//! Forward (transformers' eager `*SparseMoeBlock` + `*Experts.forward`): `z = x Wr^T (+ b)`;
//! route ([`crate::routing::route`]); for each expert `e` in ascending order and each token `t`
//! routed to it (ascending), `a = x_t W_gu[e] (+ b_gu[e])` `[2I]`, `h = act(a[..I], a[I..])`
//! `[I]`, `y = h W_d[e] (+ b_d[e])` `[H]`, `out_t += w_{t,e} y`; then
//! `out_t += gate_t * shared(x_t)` (`gate_t = sigmoid(x_t Wsg^T)` or 1).
//! Backward: the same loops in the same order, recomputing the activations, with the
//! routing-weight gradient `dw_{t,e} = <dOut_t, y>` fed to [`crate::routing::route_backward`].

use ndarray::{Array1, Array2, Array3, ArrayView2, ArrayViewMut1, Axis};

use crate::activation::{glu_backward, glu_forward, sigmoid};
use crate::config::{
    check_block, check_saved, Activation, MoeConfig, MoeForward, MoeGrads, MoeParams,
    SharedExpertGrads, SharedExpertParams,
};
use crate::error::Result;
use crate::routing::{route, route_backward};
use crate::scalar::Real;

/// `out[n] = sum_h v[h] m[h, n]` (`v @ m`), `m` `[len(v), N]`.
fn vec_mat<F: Real>(v: &[F], m: ArrayView2<F>) -> Vec<F> {
    let mut out = vec![F::zero(); m.ncols()];
    for (&vh, row) in v.iter().zip(m.rows()) {
        for (o, &w) in out.iter_mut().zip(row.iter()) {
            *o += vh * w;
        }
    }
    out
}

/// Dot product, accumulated in 8 interleaved partial sums (lane `i % 8`) added at the end, so
/// that the compiler can vectorise it; a fixed order, hence deterministic.
fn dot<F: Real>(a: &[F], b: &[F]) -> F {
    let mut lanes = [F::zero(); 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            lanes[l] += x[l] * y[l];
        }
    }
    let tail: F = ra.iter().zip(rb).map(|(&x, &y)| x * y).sum();
    lanes.iter().copied().sum::<F>() + tail
}

/// `out[r] = sum_n m[r, n] v[n]` (`m @ v`), `m` `[R, len(v)]`.
fn mat_vec<F: Real>(m: ArrayView2<F>, v: &[F]) -> Vec<F> {
    m.rows()
        .into_iter()
        .map(|row| match row.as_slice() {
            Some(r) => dot(r, v),
            None => row.iter().zip(v).map(|(&a, &b)| a * b).sum(),
        })
        .collect()
}

/// `acc[r, n] += sum_t a_t[r] b_t[n]`: a weight gradient summed over one expert's tokens
/// (row `r` of `acc` stays in cache while the tokens stream by).
fn add_outer_sum<F: Real>(mut acc: ndarray::ArrayViewMut2<F>, a: &[Vec<F>], b: &[Vec<F>]) {
    for (r, mut row) in acc.rows_mut().into_iter().enumerate() {
        for (a_t, b_t) in a.iter().zip(b) {
            let s = a_t[r];
            for (o, &bn) in row.iter_mut().zip(b_t) {
                *o += s * bn;
            }
        }
    }
}

/// `acc[r, n] += a[r] b[n]` (rank-1 update of a weight gradient).
fn add_outer<F: Real>(mut acc: ndarray::ArrayViewMut2<F>, a: &[F], b: &[F]) {
    for (&ar, mut row) in a.iter().zip(acc.rows_mut()) {
        for (o, &bn) in row.iter_mut().zip(b) {
            *o += ar * bn;
        }
    }
}

fn add_into<F: Real>(acc: &mut [F], v: impl IntoIterator<Item = F>) {
    for (a, b) in acc.iter_mut().zip(v) {
        *a += b;
    }
}

/// `row += v` element-wise on an array row.
fn add_row<F: Real>(mut row: ArrayViewMut1<F>, v: impl IntoIterator<Item = F>) {
    for (a, b) in row.iter_mut().zip(v) {
        *a += b;
    }
}

/// Activations of one expert on one token.
struct ExpertActs<F> {
    /// `[2I]` pre-activation, gate half first.
    a: Vec<F>,
    /// `[I]` hidden activation.
    h: Vec<F>,
    /// `[H]` expert output before the routing weight.
    y: Vec<F>,
}

fn expert_forward<F: Real>(
    x_t: &[F],
    e: usize,
    p: &MoeParams<F>,
    act: &Activation,
) -> ExpertActs<F> {
    let w_gu = p.gate_and_up_projs.index_axis(Axis(0), e);
    let inter = w_gu.ncols() / 2;
    let mut a = vec_mat(x_t, w_gu);
    if let Some(b) = p.gate_up_bias {
        add_into(&mut a, b.row(e).iter().copied());
    }
    let h: Vec<F> = (0..inter)
        .map(|i| glu_forward(act, a[i], a[inter + i]))
        .collect();
    let mut y = vec_mat(&h, p.down_projs.index_axis(Axis(0), e));
    if let Some(b) = p.down_bias {
        add_into(&mut y, b.row(e).iter().copied());
    }
    ExpertActs { a, h, y }
}

/// Router logits `x Wr^T (+ b)` `[T, E]`.
fn logits<F: Real>(x: ArrayView2<F>, p: &MoeParams<F>) -> Array2<F> {
    let mut z = Array2::<F>::zeros((x.nrows(), p.gate_weight.nrows()));
    for (t, x_t) in x.rows().into_iter().enumerate() {
        let x_t = x_t.to_vec();
        for (e, v) in mat_vec(p.gate_weight, &x_t).into_iter().enumerate() {
            z[[t, e]] = v + p.gate_bias.map_or(F::zero(), |b| b[e]);
        }
    }
    z
}

/// Shared-expert activations of one token: `(g, u, hs, ys, gate)`.
struct SharedActs<F> {
    g: Vec<F>,
    u: Vec<F>,
    hs: Vec<F>,
    ys: Vec<F>,
    gate: F,
}

fn shared_forward<F: Real>(x_t: &[F], s: &SharedExpertParams<F>) -> SharedActs<F> {
    let g = mat_vec(s.gate_proj, x_t);
    let u = mat_vec(s.up_proj, x_t);
    let hs: Vec<F> = g
        .iter()
        .zip(&u)
        .map(|(&g, &u)| glu_forward(&Activation::SwiGlu, g, u))
        .collect();
    let ys = mat_vec(s.down_proj, &hs);
    let gate = s.gate.map_or(F::one(), |w| sigmoid(mat_vec(w, x_t)[0]));
    SharedActs { g, u, hs, ys, gate }
}

/// Tokens routed to `e` with their slot `j` (ascending token order).
fn routed_to(routing_index: &Array2<usize>, e: usize) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    for (t, row) in routing_index.rows().into_iter().enumerate() {
        if let Some(j) = row.iter().position(|&i| i == e) {
            out.push((t, j));
        }
    }
    out
}

/// Reference forward of the MoE block (module doc). Shapes: `x` `[T, H]`, params as in
/// [`MoeParams`]; output `[T, H]`.
///
/// # Errors
/// Shape and configuration errors of [`check_block`]; router errors of [`route`].
pub fn moe_forward<F: Real>(
    x: ArrayView2<F>,
    p: &MoeParams<F>,
    cfg: &MoeConfig,
) -> Result<MoeForward<F>> {
    let dims = check_block(x, p, cfg)?;
    let router_logits = logits(x, p);
    let routing = route(
        router_logits.view(),
        &cfg.router,
        cfg.top_k,
        p.e_score_correction_bias,
    )?;
    let mut output = Array2::<F>::zeros((dims.tokens, dims.hidden));
    for e in 0..dims.experts {
        for (t, j) in routed_to(&routing.top_k_index, e) {
            let x_t = x.row(t).to_vec();
            let acts = expert_forward(&x_t, e, p, &cfg.activation);
            let w = routing.top_k_weights[[t, j]];
            add_row(output.row_mut(t), acts.y.iter().map(|&v| w * v));
        }
    }
    if let Some(s) = &p.shared {
        for t in 0..dims.tokens {
            let sa = shared_forward(&x.row(t).to_vec(), s);
            add_row(output.row_mut(t), sa.ys.iter().map(|&v| sa.gate * v));
        }
    }
    Ok(MoeForward {
        output,
        router_logits,
        routing,
        saved: None,
    })
}

/// Reference backward: gradients of `L = sum(grad_output * output)` (see [`MoeGrads`]).
/// `fwd` must come from a forward on the same `x`, `p`, `cfg` (its routing is reused).
///
/// # Errors
/// Shape and configuration errors of [`check_block`]; [`KernelError::ShapeMismatch`] naming
/// `grad_output` (must be `[T, H]`) or `fwd.routing` (must be `[T, k]` / `[T, E]`).
pub fn moe_backward<F: Real>(
    x: ArrayView2<F>,
    p: &MoeParams<F>,
    cfg: &MoeConfig,
    fwd: &MoeForward<F>,
    grad_output: ArrayView2<F>,
) -> Result<MoeGrads<F>> {
    let d = check_block(x, p, cfg)?;
    check_saved(grad_output, fwd, d.tokens, d.hidden, d.experts, d.top_k)?;
    let routing = &fwd.routing;
    let mut g = MoeGrads {
        grad_input: Array2::zeros((d.tokens, d.hidden)),
        gate_weight: Array2::zeros((d.experts, d.hidden)),
        gate_bias: p.gate_bias.map(|_| Array1::zeros(d.experts)),
        gate_and_up_projs: Array3::zeros((d.experts, d.hidden, 2 * d.inter)),
        down_projs: Array3::zeros((d.experts, d.inter, d.hidden)),
        gate_up_bias: p
            .gate_up_bias
            .map(|_| Array2::zeros((d.experts, 2 * d.inter))),
        down_bias: p.down_bias.map(|_| Array2::zeros((d.experts, d.hidden))),
        shared: None,
    };
    let mut grad_weights = Array2::<F>::zeros((d.tokens, d.top_k));
    for e in 0..d.experts {
        let w_gu = p.gate_and_up_projs.index_axis(Axis(0), e);
        let w_d = p.down_projs.index_axis(Axis(0), e);
        // Per token of this expert: inputs, hidden activations and the two output gradients.
        let (mut xs, mut hs, mut dys, mut das) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for (t, j) in routed_to(&routing.top_k_index, e) {
            let x_t = x.row(t).to_vec();
            let dout: Vec<F> = grad_output.row(t).to_vec();
            let acts = expert_forward(&x_t, e, p, &cfg.activation);
            let w = routing.top_k_weights[[t, j]];
            grad_weights[[t, j]] = dot(&dout, &acts.y);
            let dy: Vec<F> = dout.iter().map(|&v| w * v).collect();
            let dh = mat_vec(w_d, &dy);
            let mut da = vec![F::zero(); 2 * d.inter];
            for i in 0..d.inter {
                let (dg, du) = glu_backward(&cfg.activation, acts.a[i], acts.a[d.inter + i], dh[i]);
                da[i] = dg;
                da[d.inter + i] = du;
            }
            let dx = mat_vec(w_gu, &da);
            add_row(g.grad_input.row_mut(t), dx);
            xs.push(x_t);
            hs.push(acts.h);
            dys.push(dy);
            das.push(da);
        }
        // Weight and bias gradients of expert e: sums over its tokens (zero if it has none).
        add_outer_sum(g.down_projs.index_axis_mut(Axis(0), e), &hs, &dys);
        add_outer_sum(g.gate_and_up_projs.index_axis_mut(Axis(0), e), &xs, &das);
        if let Some(db) = g.down_bias.as_mut() {
            for dy in &dys {
                add_row(db.row_mut(e), dy.iter().copied());
            }
        }
        if let Some(db) = g.gate_up_bias.as_mut() {
            for da in &das {
                add_row(db.row_mut(e), da.iter().copied());
            }
        }
    }
    // Router: dL/dz from dL/dw, then through z = x Wr^T + b.
    let grad_logits = route_backward(&cfg.router, routing, grad_weights.view())?;
    for t in 0..d.tokens {
        let x_t = x.row(t).to_vec();
        let dz: Vec<F> = grad_logits.row(t).to_vec();
        add_outer(g.gate_weight.view_mut(), &dz, &x_t);
        if let Some(db) = g.gate_bias.as_mut() {
            add_row(db.view_mut(), dz.iter().copied());
        }
        let dx = vec_mat(&dz, p.gate_weight);
        add_row(g.grad_input.row_mut(t), dx);
    }
    if let Some(s) = &p.shared {
        g.shared = Some(shared_backward(x, s, grad_output, &mut g.grad_input));
    }
    Ok(g)
}

fn shared_backward<F: Real>(
    x: ArrayView2<F>,
    s: &SharedExpertParams<F>,
    grad_output: ArrayView2<F>,
    grad_input: &mut Array2<F>,
) -> SharedExpertGrads<F> {
    let mut sg = SharedExpertGrads {
        gate_proj: Array2::zeros(s.gate_proj.raw_dim()),
        up_proj: Array2::zeros(s.up_proj.raw_dim()),
        down_proj: Array2::zeros(s.down_proj.raw_dim()),
        gate: s.gate.map(|w| Array2::zeros(w.raw_dim())),
    };
    for t in 0..x.nrows() {
        let x_t = x.row(t).to_vec();
        let dout: Vec<F> = grad_output.row(t).to_vec();
        let sa = shared_forward(&x_t, s);
        let mut dx = vec![F::zero(); x_t.len()];
        if let (Some(w), Some(dgw)) = (s.gate, sg.gate.as_mut()) {
            // out += sigmoid(zg) * ys: dzg = <dout, ys> * gate (1 - gate).
            let dgate: F = dout.iter().zip(&sa.ys).map(|(&a, &b)| a * b).sum();
            let dz = dgate * sa.gate * (F::one() - sa.gate);
            add_outer(dgw.view_mut(), &[dz], &x_t);
            add_into(&mut dx, w.row(0).iter().map(|&v| dz * v));
        }
        let dys: Vec<F> = dout.iter().map(|&v| sa.gate * v).collect();
        add_outer(sg.down_proj.view_mut(), &dys, &sa.hs);
        let dhs = vec_mat(&dys, s.down_proj);
        let (dg, du): (Vec<F>, Vec<F>) = (0..sa.hs.len())
            .map(|i| glu_backward(&Activation::SwiGlu, sa.g[i], sa.u[i], dhs[i]))
            .unzip();
        add_outer(sg.gate_proj.view_mut(), &dg, &x_t);
        add_outer(sg.up_proj.view_mut(), &du, &x_t);
        add_into(&mut dx, vec_mat(&dg, s.gate_proj));
        add_into(&mut dx, vec_mat(&du, s.up_proj));
        add_row(grad_input.row_mut(t), dx);
    }
    sg
}
