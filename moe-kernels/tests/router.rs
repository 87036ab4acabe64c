//! Hand-worked router cases (Qwen3-MoE: softmax -> top-k (lowest index wins ties) -> optional
//! renormalisation) and router error cases.

use approx::assert_abs_diff_eq;
use moe_kernels::{router_logits, softmax_topk, KernelError, RouterConfig};
use ndarray::{array, Array2};

fn cfg(top_k: usize, norm_topk_prob: bool) -> RouterConfig {
    RouterConfig {
        top_k,
        norm_topk_prob,
    }
}

/// Logits `ln(1), ln(2), ln(3), ln(4)`: softmax = [1, 2, 3, 4] / 10 exactly (by hand).
fn ln_logits() -> Array2<f32> {
    array![[1.0f32.ln(), 2.0f32.ln(), 3.0f32.ln(), 4.0f32.ln()]]
}

#[test]
fn softmax_values_hand_worked() {
    let r = softmax_topk(ln_logits().view(), &cfg(2, false)).unwrap();
    for (got, want) in r.probs.iter().zip([0.1f32, 0.2, 0.3, 0.4]) {
        assert_abs_diff_eq!(*got, want, epsilon = 1e-6);
    }
    // Logits [0, 0] -> [0.5, 0.5]; [0, 1] -> [1/(1+e), e/(1+e)] = [0.26894142, 0.7310586].
    let r = softmax_topk(array![[0.0f32, 0.0], [0.0, 1.0]].view(), &cfg(1, false)).unwrap();
    assert_abs_diff_eq!(r.probs[[0, 0]], 0.5, epsilon = 1e-7);
    assert_abs_diff_eq!(r.probs[[0, 1]], 0.5, epsilon = 1e-7);
    assert_abs_diff_eq!(r.probs[[1, 0]], 0.268_941_42, epsilon = 1e-7);
    assert_abs_diff_eq!(r.probs[[1, 1]], 0.731_058_6, epsilon = 1e-7);
}

#[test]
fn softmax_is_shift_invariant_and_stable_for_large_logits() {
    // softmax(z + 1000) == softmax(z): the max is subtracted before exp (no overflow).
    let z = ln_logits();
    let shifted = z.mapv(|v| v + 1000.0);
    let a = softmax_topk(z.view(), &cfg(4, false)).unwrap();
    let b = softmax_topk(shifted.view(), &cfg(4, false)).unwrap();
    assert_eq!(a.top_k_index, b.top_k_index);
    for (x, y) in a.probs.iter().zip(b.probs.iter()) {
        assert_abs_diff_eq!(*x, *y, epsilon = 1e-4);
    }
}

#[test]
fn top2_without_norm_keeps_probabilities() {
    let r = softmax_topk(ln_logits().view(), &cfg(2, false)).unwrap();
    assert_eq!(r.top_k_index, array![[3usize, 2]]);
    assert_abs_diff_eq!(r.top_k_weights[[0, 0]], 0.4, epsilon = 1e-6);
    assert_abs_diff_eq!(r.top_k_weights[[0, 1]], 0.3, epsilon = 1e-6);
}

#[test]
fn top2_with_norm_renormalises() {
    // [0.4, 0.3] / 0.7 = [4/7, 3/7].
    let r = softmax_topk(ln_logits().view(), &cfg(2, true)).unwrap();
    assert_eq!(r.top_k_index, array![[3usize, 2]]);
    assert_abs_diff_eq!(r.top_k_weights[[0, 0]], 4.0 / 7.0, epsilon = 1e-6);
    assert_abs_diff_eq!(r.top_k_weights[[0, 1]], 3.0 / 7.0, epsilon = 1e-6);
}

#[test]
fn ties_lowest_expert_index_wins() {
    // Experts 1 and 3 tie for first, 2 and 4 tie for third.
    let z = array![[0.0f32, 2.0, 1.0, 2.0, 1.0]];
    let r = softmax_topk(z.view(), &cfg(3, false)).unwrap();
    assert_eq!(r.top_k_index, array![[1usize, 3, 2]]);
    let r = softmax_topk(z.view(), &cfg(1, false)).unwrap();
    assert_eq!(r.top_k_index, array![[1usize]]);
    // All equal: experts in index order, weights 1/E (or 1/k renormalised).
    let flat = Array2::<f32>::from_elem((2, 6), 0.25);
    let r = softmax_topk(flat.view(), &cfg(4, false)).unwrap();
    assert_eq!(r.top_k_index, array![[0usize, 1, 2, 3], [0, 1, 2, 3]]);
    for w in r.top_k_weights.iter() {
        assert_abs_diff_eq!(*w, 1.0 / 6.0, epsilon = 1e-7);
    }
    let r = softmax_topk(flat.view(), &cfg(4, true)).unwrap();
    for w in r.top_k_weights.iter() {
        assert_abs_diff_eq!(*w, 0.25, epsilon = 1e-7);
    }
}

#[test]
fn k_equals_num_experts_orders_all_experts() {
    let z = array![[0.3f32, -1.0, 2.0, 0.3]];
    let r = softmax_topk(z.view(), &cfg(4, false)).unwrap();
    // 2.0 > 0.3 == 0.3 (tie: expert 0 before 3) > -1.0.
    assert_eq!(r.top_k_index, array![[2usize, 0, 3, 1]]);
    let total: f32 = r.top_k_weights.sum();
    assert_abs_diff_eq!(total, 1.0, epsilon = 1e-6);
    for j in 0..4 {
        assert_eq!(r.top_k_weights[[0, j]], r.probs[[0, r.top_k_index[[0, j]]]]);
    }
    let rn = softmax_topk(z.view(), &cfg(4, true)).unwrap();
    for j in 0..4 {
        assert_abs_diff_eq!(
            rn.top_k_weights[[0, j]],
            r.top_k_weights[[0, j]],
            epsilon = 1e-6
        );
    }
}

#[test]
fn k_equals_one() {
    let z = array![[0.1f32, 0.5, -0.2], [3.0, 1.0, 3.5]];
    let r = softmax_topk(z.view(), &cfg(1, false)).unwrap();
    assert_eq!(r.top_k_index, array![[1usize], [2]]);
    assert_eq!(r.top_k_weights[[0, 0]], r.probs[[0, 1]]);
    assert!(r.top_k_weights[[0, 0]] < 1.0);
    let r = softmax_topk(z.view(), &cfg(1, true)).unwrap();
    assert_eq!(r.top_k_weights, array![[1.0f32], [1.0]]);
}

#[test]
fn zero_tokens_give_empty_routing() {
    let z = Array2::<f32>::zeros((0, 4));
    let r = softmax_topk(z.view(), &cfg(2, true)).unwrap();
    assert_eq!(r.top_k_index.dim(), (0, 2));
    assert_eq!(r.probs.dim(), (0, 4));
}

#[test]
fn router_logits_is_x_times_gate_transposed() {
    // x [2, 3], gate [2 experts, 3]: z[t, e] = sum_h x[t, h] * gate[e, h], by hand.
    let x = array![[1.0f32, 2.0, 3.0], [-1.0, 0.5, 0.0]];
    let gate = array![[1.0f32, 0.0, -1.0], [0.5, 0.5, 0.5]];
    let z = router_logits(x.view(), gate.view()).unwrap();
    assert_eq!(z, array![[-2.0f32, 3.0], [-1.0, -0.25]]);
}

#[test]
fn router_errors_name_the_problem() {
    let z = ln_logits();
    assert_eq!(
        softmax_topk(z.view(), &cfg(0, true)),
        Err(KernelError::ZeroTopK)
    );
    assert_eq!(
        softmax_topk(z.view(), &cfg(5, true)),
        Err(KernelError::TopKTooLarge {
            top_k: 5,
            num_experts: 4
        })
    );
    let mut bad = z.clone();
    bad[[0, 2]] = f32::NAN;
    let err = softmax_topk(bad.view(), &cfg(2, true)).unwrap_err();
    assert!(matches!(
        err,
        KernelError::NonFiniteLogit {
            token: 0,
            expert: 2,
            ..
        }
    ));
    bad[[0, 2]] = f32::INFINITY;
    assert!(softmax_topk(bad.view(), &cfg(2, true)).is_err());

    let x = Array2::<f32>::zeros((2, 3));
    let gate = Array2::<f32>::zeros((4, 5));
    let err = router_logits(x.view(), gate.view()).unwrap_err();
    assert!(err.to_string().contains("gate_weight"), "{err}");
    assert!(matches!(
        err,
        KernelError::ShapeMismatch {
            tensor: "gate_weight",
            ..
        }
    ));
}
