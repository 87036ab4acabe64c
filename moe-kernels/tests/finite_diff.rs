//! Every gradient of the reference block (input, router weight and bias, expert weights and
//! biases, shared expert and its gate) against central finite differences in f64, for every
//! family's router / activation / optional tensors, on tiny shapes.

mod common;

use common::{Case, Family, Rng, FAMILIES};
use moe_kernels::reference::{moe_backward, moe_forward};
use moe_kernels::MoeGrads;
use ndarray::Array2;

const NAMES: [&str; 11] = [
    "x",
    "gate_weight",
    "gate_bias",
    "gate_up",
    "down",
    "gate_up_bias",
    "down_bias",
    "shared.gate_proj",
    "shared.up_proj",
    "shared.down_proj",
    "shared.gate",
];

fn tensor_mut<'a>(c: &'a mut Case<f64>, name: &str) -> Option<&'a mut [f64]> {
    let s = c.shared.as_mut();
    match name {
        "x" => c.x.as_slice_mut(),
        "gate_weight" => c.gate_weight.as_slice_mut(),
        "gate_bias" => c.gate_bias.as_mut().and_then(|a| a.as_slice_mut()),
        "gate_up" => c.gate_up.as_slice_mut(),
        "down" => c.down.as_slice_mut(),
        "gate_up_bias" => c.gate_up_bias.as_mut().and_then(|a| a.as_slice_mut()),
        "down_bias" => c.down_bias.as_mut().and_then(|a| a.as_slice_mut()),
        "shared.gate_proj" => s.and_then(|s| s.gate_proj.as_slice_mut()),
        "shared.up_proj" => s.and_then(|s| s.up_proj.as_slice_mut()),
        "shared.down_proj" => s.and_then(|s| s.down_proj.as_slice_mut()),
        "shared.gate" => s
            .and_then(|s| s.gate.as_mut())
            .and_then(|g| g.as_slice_mut()),
        _ => None,
    }
}

fn grad_of<'a>(g: &'a MoeGrads<f64>, name: &str) -> Option<&'a [f64]> {
    let s = g.shared.as_ref();
    match name {
        "x" => g.grad_input.as_slice(),
        "gate_weight" => g.gate_weight.as_slice(),
        "gate_bias" => g.gate_bias.as_ref().and_then(|a| a.as_slice()),
        "gate_up" => g.gate_and_up_projs.as_slice(),
        "down" => g.down_projs.as_slice(),
        "gate_up_bias" => g.gate_up_bias.as_ref().and_then(|a| a.as_slice()),
        "down_bias" => g.down_bias.as_ref().and_then(|a| a.as_slice()),
        "shared.gate_proj" => s.and_then(|s| s.gate_proj.as_slice()),
        "shared.up_proj" => s.and_then(|s| s.up_proj.as_slice()),
        "shared.down_proj" => s.and_then(|s| s.down_proj.as_slice()),
        "shared.gate" => s.and_then(|s| s.gate.as_ref()).and_then(|g| g.as_slice()),
        _ => None,
    }
}

fn loss(c: &Case<f64>, family: Family, k: usize, go: &Array2<f64>) -> f64 {
    let cfg = family.config(c.gate_weight.nrows(), k);
    let out = moe_forward(c.x.view(), &c.params(), &cfg).unwrap().output;
    (&out * go).sum()
}

fn check_family(family: Family, k: usize, seed: u64) {
    let (t, h, i, e) = (5, 4, 3, 8);
    let case: Case<f64> = family.case(seed, t, h, i, e);
    let cfg = family.config(e, k);
    let go: Array2<f64> = Rng(seed + 7).a2((t, h), 1.0);
    let fwd = moe_forward(case.x.view(), &case.params(), &cfg).unwrap();
    let grads = moe_backward(case.x.view(), &case.params(), &cfg, &fwd, go.view()).unwrap();
    let eps = 1e-6;
    let mut checked = 0;
    for name in NAMES {
        let mut probe = case.clone();
        let Some(n) = tensor_mut(&mut probe, name).map(|s| s.len()) else {
            assert!(
                grad_of(&grads, name).is_none(),
                "{family:?}: gradient {name} without parameter"
            );
            continue;
        };
        let analytic = grad_of(&grads, name)
            .unwrap_or_else(|| panic!("{family:?}: no gradient for {name}"))
            .to_vec();
        assert_eq!(analytic.len(), n, "{family:?} {name}");
        for (idx, &an) in analytic.iter().enumerate() {
            let orig = tensor_mut(&mut probe, name).unwrap()[idx];
            tensor_mut(&mut probe, name).unwrap()[idx] = orig + eps;
            let lp = loss(&probe, family, k, &go);
            tensor_mut(&mut probe, name).unwrap()[idx] = orig - eps;
            let lm = loss(&probe, family, k, &go);
            tensor_mut(&mut probe, name).unwrap()[idx] = orig;
            let fd = (lp - lm) / (2.0 * eps);
            let err = (fd - an).abs();
            assert!(
                err <= 1e-7 + 1e-6 * fd.abs(),
                "{family:?} k={k} {name}[{idx}]: analytic {an} vs finite difference {fd}"
            );
            checked += 1;
        }
    }
    assert!(checked > 100, "{family:?}: only {checked} entries checked");
}

#[test]
fn finite_differences_every_family_every_gradient() {
    for (n, family) in FAMILIES.into_iter().enumerate() {
        for k in [1, 2, 3] {
            check_family(family, k, 11 + n as u64 * 31 + k as u64);
        }
    }
}

#[test]
fn unused_expert_gets_exact_zero_gradient() {
    // E = 8, T * k = 2 < E: at least 6 experts have no token; their gradients are exact zeros.
    let family = Family::GptOss;
    let case: Case<f64> = family.case(5, 1, 4, 3, 8);
    let cfg = family.config(8, 2);
    let go: Array2<f64> = Rng(9).a2((1, 4), 1.0);
    let fwd = moe_forward(case.x.view(), &case.params(), &cfg).unwrap();
    let g = moe_backward(case.x.view(), &case.params(), &cfg, &fwd, go.view()).unwrap();
    let used: Vec<usize> = fwd.routing.top_k_index.iter().copied().collect();
    for e in (0..8).filter(|e| !used.contains(e)) {
        assert!(g
            .gate_and_up_projs
            .index_axis(ndarray::Axis(0), e)
            .iter()
            .all(|&v| v == 0.0));
        assert!(g
            .down_projs
            .index_axis(ndarray::Axis(0), e)
            .iter()
            .all(|&v| v == 0.0));
        assert!(g
            .down_bias
            .as_ref()
            .unwrap()
            .row(e)
            .iter()
            .all(|&v| v == 0.0));
    }
    for &e in &used {
        assert!(g
            .down_projs
            .index_axis(ndarray::Axis(0), e)
            .iter()
            .any(|&v| v != 0.0));
    }
}

/// The reference takes views in any memory layout: the router and shared-expert weights given
/// column-major (rows not contiguous, the reference's strided path) give the output and every
/// gradient of the row-major call, within f64 reassociation (terms O(1), H < 40: a relative
/// 1e-12 leaves 100x room over `H u` and catches any wrong product, which is O(1) off).
#[test]
fn reference_accepts_column_major_weights() {
    for family in [Family::Qwen3Next, Family::DeepseekV3, Family::GptOss] {
        let c: Case<f64> = family.case(11, 5, 19, 6, 8);
        let cfg = family.config(8, 2);
        let go: Array2<f64> = Rng(99).a2((5, 19), 1.0);
        let col = |a: &Array2<f64>| a.t().as_standard_layout().into_owned();
        let (gw, sh) = (
            col(&c.gate_weight),
            c.shared
                .as_ref()
                .map(|s| (col(&s.gate_proj), col(&s.up_proj), col(&s.down_proj))),
        );
        let mut p = c.params();
        p.gate_weight = gw.t();
        assert!(p.gate_weight.row(0).as_slice().is_none());
        if let (Some(ps), Some((g, u, d))) = (p.shared.as_mut(), sh.as_ref()) {
            ps.gate_proj = g.t();
            ps.up_proj = u.t();
            ps.down_proj = d.t();
        }
        let f_row = moe_forward(c.x.view(), &c.params(), &cfg).unwrap();
        let f_col = moe_forward(c.x.view(), &p, &cfg).unwrap();
        let g_row = moe_backward(c.x.view(), &c.params(), &cfg, &f_row, go.view()).unwrap();
        let g_col = moe_backward(c.x.view(), &p, &cfg, &f_col, go.view()).unwrap();
        let close = |name: &str, a: &[f64], b: &[f64]| {
            let scale = 1.0 + b.iter().fold(0.0f64, |m, v| m.max(v.abs()));
            let err = a
                .iter()
                .zip(b)
                .fold(0.0f64, |m, (x, y)| m.max((x - y).abs()));
            assert!(err <= 1e-12 * scale, "{family:?} {name}: {err}");
        };
        close(
            "output",
            f_col.output.as_slice().unwrap(),
            f_row.output.as_slice().unwrap(),
        );
        for name in NAMES {
            if let (Some(a), Some(b)) = (grad_of(&g_col, name), grad_of(&g_row, name)) {
                close(name, a, b);
            }
        }
    }
}
