//! Hand-worked values of every router variant, the tie rule (lowest expert / group index wins),
//! the selection-only correction bias, and configuration errors.

use approx::assert_relative_eq;
use moe_kernels::{route, KernelError, RouterKind};
use ndarray::{array, Array1};

fn ln(v: f64) -> f64 {
    v.ln()
}

#[test]
fn topk_softmax_is_softmax_over_the_selected_logits() {
    // GPT-OSS: z = [1, 3, 2, 0]; k = 2 -> ids [1, 2], w = softmax([3, 2]) = [e/(e+1), 1/(e+1)].
    let z = array![[1.0f64, 3.0, 2.0, 0.0]];
    let r = route(z.view(), &RouterKind::TopKSoftmax, 2, None).unwrap();
    assert_eq!(r.top_k_index.row(0).to_vec(), vec![1, 2]);
    let e = std::f64::consts::E;
    assert_relative_eq!(r.top_k_weights[[0, 0]], e / (e + 1.0), max_relative = 1e-12);
    assert_relative_eq!(
        r.top_k_weights[[0, 1]],
        1.0 / (e + 1.0),
        max_relative = 1e-12
    );
    assert_eq!(r.probs[[0, 0]], 0.0);
}

#[test]
fn softmax_topk_without_and_with_renormalisation() {
    // softmax([ln 1, ln 2, ln 3, ln 4]) = [.1, .2, .3, .4]; k = 2 -> [.4, .3] or [4/7, 3/7].
    let z = array![[ln(1.0), ln(2.0), ln(3.0), ln(4.0)]];
    let raw = route(
        z.view(),
        &RouterKind::SoftmaxTopK {
            norm_topk_prob: false,
        },
        2,
        None,
    )
    .unwrap();
    assert_eq!(raw.top_k_index.row(0).to_vec(), vec![3, 2]);
    assert_relative_eq!(raw.top_k_weights[[0, 0]], 0.4, max_relative = 1e-12);
    let norm = route(
        z.view(),
        &RouterKind::SoftmaxTopK {
            norm_topk_prob: true,
        },
        2,
        None,
    )
    .unwrap();
    assert_relative_eq!(norm.top_k_weights[[0, 1]], 3.0 / 7.0, max_relative = 1e-12);
}

fn deepseek(n_group: usize, topk_group: usize) -> RouterKind {
    RouterKind::SigmoidGroupLimited {
        n_group,
        topk_group,
        norm_topk_prob: true,
        routed_scaling_factor: 2.5,
    }
}

#[test]
fn group_limited_sigmoid_hand_worked() {
    // s = sigmoid(z) = [0.75, 0.25, 0.5, 0.5]; groups {0,1}, {2,3}: scores 1.0, 1.0 (tie ->
    // group 0 kept); ids [0, 1]; w = [0.75, 0.25] / 1.0 * 2.5.
    let z = array![[ln(3.0), ln(1.0 / 3.0), 0.0, 0.0]];
    let r = route(z.view(), &deepseek(2, 1), 2, None).unwrap();
    assert_eq!(r.top_k_index.row(0).to_vec(), vec![0, 1]);
    assert_relative_eq!(r.top_k_weights[[0, 0]], 1.875, max_relative = 1e-12);
    assert_relative_eq!(r.top_k_weights[[0, 1]], 0.625, max_relative = 1e-12);
    // Bias +0.1 on expert 2: group 1 scores 1.1 and wins; c = [0.6, 0.5] -> ids [2, 3];
    // weights are the UNBIASED s = [0.5, 0.5], renormalised, times 2.5.
    let bias = array![0.0, 0.0, 0.1, 0.0];
    let r = route(z.view(), &deepseek(2, 1), 2, Some(bias.view())).unwrap();
    assert_eq!(r.top_k_index.row(0).to_vec(), vec![2, 3]);
    assert_relative_eq!(r.top_k_weights[[0, 0]], 1.25, max_relative = 1e-12);
    assert_relative_eq!(r.top_k_weights[[0, 1]], 1.25, max_relative = 1e-12);
}

#[test]
fn group_score_is_the_sum_of_the_top_two() {
    // Group 0 = {0.9, 0.1, 0.1} -> 1.0; group 1 = {0.6, 0.6, 0.0} -> 1.2 (max alone would pick 0).
    let s = [0.9f64, 0.1, 0.1, 0.6, 0.6, 1e-9];
    let z =
        Array1::from_iter(s.iter().map(|&p| (p / (1.0 - p)).ln())).insert_axis(ndarray::Axis(0));
    let r = route(z.view(), &deepseek(2, 1), 1, None).unwrap();
    assert_eq!(r.top_k_index[[0, 0]], 3);
}

#[test]
fn step35_sigmoid_topk_hand_worked() {
    // s = [0.75, 0.5, 0.25]; bias [0, 0, 0.6] -> c = [0.75, 0.5, 0.85]; k = 2 -> ids [2, 0];
    // w = [0.25, 0.75] / 1.0 * 1.5.
    let z = array![[ln(3.0), 0.0, ln(1.0 / 3.0)]];
    let bias = array![0.0, 0.0, 0.6];
    let kind = RouterKind::SigmoidTopK {
        routed_scaling_factor: 1.5,
    };
    let r = route(z.view(), &kind, 2, Some(bias.view())).unwrap();
    assert_eq!(r.top_k_index.row(0).to_vec(), vec![2, 0]);
    assert_relative_eq!(r.top_k_weights[[0, 0]], 0.375, max_relative = 1e-12);
    assert_relative_eq!(r.top_k_weights[[0, 1]], 1.125, max_relative = 1e-12);
}

#[test]
fn ties_lowest_expert_index_wins_for_every_router() {
    let z = array![[0.5f64; 6]];
    for kind in [
        RouterKind::SoftmaxTopK {
            norm_topk_prob: true,
        },
        RouterKind::TopKSoftmax,
        deepseek(3, 2),
        RouterKind::SigmoidTopK {
            routed_scaling_factor: 1.0,
        },
    ] {
        let r = route(z.view(), &kind, 3, None).unwrap();
        assert_eq!(r.top_k_index.row(0).to_vec(), vec![0, 1, 2], "{kind:?}");
    }
    // Group ties: groups {0,1}, {2,3}, {4,5} all tie; topk_group = 2 keeps groups 0 and 1.
    let r = route(z.view(), &deepseek(3, 2), 4, None).unwrap();
    assert_eq!(r.top_k_index.row(0).to_vec(), vec![0, 1, 2, 3]);
}

#[test]
fn router_errors_name_the_problem() {
    let z = array![[0.0f64, f64::NAN]];
    assert!(matches!(
        route(z.view(), &RouterKind::TopKSoftmax, 1, None),
        Err(KernelError::NonFiniteLogit {
            token: 0,
            expert: 1,
            ..
        })
    ));
    let z = array![[0.0f64, 1.0]];
    assert!(matches!(
        route(z.view(), &RouterKind::TopKSoftmax, 3, None),
        Err(KernelError::TopKTooLarge { .. })
    ));
    assert!(matches!(
        route(z.view(), &RouterKind::TopKSoftmax, 0, None),
        Err(KernelError::ZeroTopK)
    ));
    let bias = array![f64::INFINITY, 0.0];
    let kind = RouterKind::SigmoidTopK {
        routed_scaling_factor: 1.0,
    };
    assert!(matches!(
        route(z.view(), &kind, 1, Some(bias.view())),
        Err(KernelError::NonFiniteScore {
            token: 0,
            expert: 0,
            ..
        })
    ));
}

#[test]
fn deepseek_renormalisation_epsilon_counts_at_tiny_scores() {
    // s = sigmoid(z) ~ [1e-20, 2e-20, ~0, ~0]: the denominator's `+ 1e-20` is a quarter of it, so
    // w = 2.5 * [1, 2] / 4 (not / 3), and the backward must use the same denominator: dL/dz
    // against central differences of L(z) = <dw, w(z)> (f64; relative step 1e-6, truncation
    // error ~1e-12 of the value, so 1e-6 relative judges it with room for the roundings).
    let z0 = [(1e-20f64).ln(), (2e-20f64).ln(), -100.0, -100.0];
    let kind = deepseek(1, 1);
    let z = Array1::from(z0.to_vec()).insert_axis(ndarray::Axis(0));
    let r = route(z.view(), &kind, 2, None).unwrap();
    assert_eq!(r.top_k_index.row(0).to_vec(), vec![1, 0]);
    assert_relative_eq!(r.top_k_weights[[0, 0]], 1.25, max_relative = 1e-9);
    assert_relative_eq!(r.top_k_weights[[0, 1]], 0.625, max_relative = 1e-9);
    let dw = array![[0.7f64, -1.3]];
    let loss = |zz: &[f64]| {
        let zz = Array1::from(zz.to_vec()).insert_axis(ndarray::Axis(0));
        let r = route(zz.view(), &kind, 2, None).unwrap();
        (0..2)
            .map(|j| dw[[0, j]] * r.top_k_weights[[0, j]])
            .sum::<f64>()
    };
    let g = moe_kernels::route_backward(&kind, &r, dw.view()).unwrap();
    for e in 0..2 {
        let h = 1e-6 * z0[e].abs();
        let (mut zp, mut zm) = (z0, z0);
        zp[e] += h;
        zm[e] -= h;
        let fd = (loss(&zp) - loss(&zm)) / (2.0 * h);
        assert!(
            fd.abs() > 0.1,
            "expert {e}: the check needs a non-trivial gradient ({fd})"
        );
        assert_relative_eq!(g[[0, e]], fd, max_relative = 1e-6);
    }
}
