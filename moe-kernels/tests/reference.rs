//! The reference block forward against an independent naive per-token formula (f64, scalar
//! loops, its own top-k), shape errors, and a proptest that relabelling experts consistently
//! leaves the output unchanged.

use moe_kernels::{qwen3_moe_block_forward, KernelError, RouterConfig};
use ndarray::{Array2, Array3, Axis};
use proptest::prelude::*;

/// Small deterministic generator (xorshift64*) so the tests need no RNG crate.
struct Rng(u64);
impl Rng {
    fn uniform(&mut self) -> f32 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let bits = self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 40; // 24 bits
        bits as f32 / (1u64 << 24) as f32 * 2.0 - 1.0 // [-1, 1)
    }
    fn array2(&mut self, shape: (usize, usize), scale: f32) -> Array2<f32> {
        Array2::from_shape_simple_fn(shape, || self.uniform() * scale)
    }
    fn array3(&mut self, shape: (usize, usize, usize), scale: f32) -> Array3<f32> {
        Array3::from_shape_simple_fn(shape, || self.uniform() * scale)
    }
}

struct Case {
    x: Array2<f32>,
    gate: Array2<f32>,
    gate_up: Array3<f32>,
    down: Array3<f32>,
}

fn random_case(seed: u64, t: usize, h: usize, i: usize, e: usize) -> Case {
    let mut rng = Rng(seed | 1);
    Case {
        x: rng.array2((t, h), 1.0),
        gate: rng.array2((e, h), 1.0),
        gate_up: rng.array3((e, h, 2 * i), 0.5),
        down: rng.array3((e, i, h), 0.5),
    }
}

/// Dense naive formula, one token at a time, in f64: logits, softmax, top-k by repeated
/// strict-greater argmax (so the lowest index wins ties), optional renorm, then every selected
/// expert's SwiGLU MLP written out as scalar sums.
fn naive_forward(c: &Case, k: usize, norm: bool) -> (Array2<f64>, Vec<Vec<usize>>) {
    let (t_n, h_n) = c.x.dim();
    let e_n = c.gate.nrows();
    let i_n = c.down.shape()[1];
    let mut out = Array2::<f64>::zeros((t_n, h_n));
    let mut chosen_all = Vec::new();
    for t in 0..t_n {
        let z: Vec<f64> = (0..e_n)
            .map(|e| {
                (0..h_n)
                    .map(|h| c.x[[t, h]] as f64 * c.gate[[e, h]] as f64)
                    .sum()
            })
            .collect();
        let m = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let denom: f64 = z.iter().map(|v| (v - m).exp()).sum();
        let p: Vec<f64> = z.iter().map(|v| (v - m).exp() / denom).collect();
        let mut chosen: Vec<usize> = Vec::new();
        for _ in 0..k {
            let mut best: Option<usize> = None;
            for e in 0..e_n {
                if chosen.contains(&e) {
                    continue;
                }
                let better = match best {
                    None => true,
                    Some(b) => p[e] > p[b], // strict: an equal later expert never replaces
                };
                if better {
                    best = Some(e);
                }
            }
            chosen.push(best.unwrap());
        }
        let sel_sum: f64 = chosen.iter().map(|&e| p[e]).sum();
        for &e in &chosen {
            let w = if norm { p[e] / sel_sum } else { p[e] };
            for h_out in 0..h_n {
                let mut acc = 0.0f64;
                for i in 0..i_n {
                    let g: f64 = (0..h_n)
                        .map(|h| c.x[[t, h]] as f64 * c.gate_up[[e, h, i]] as f64)
                        .sum();
                    let u: f64 = (0..h_n)
                        .map(|h| c.x[[t, h]] as f64 * c.gate_up[[e, h, i_n + i]] as f64)
                        .sum();
                    let act = g / (1.0 + (-g).exp()) * u;
                    acc += act * c.down[[e, i, h_out]] as f64;
                }
                out[[t, h_out]] += w * acc;
            }
        }
        chosen_all.push(chosen);
    }
    (out, chosen_all)
}

fn run(c: &Case, k: usize, norm: bool) -> moe_kernels::Result<moe_kernels::MoeBlockOutput> {
    qwen3_moe_block_forward(
        c.x.view(),
        c.gate.view(),
        c.gate_up.view(),
        c.down.view(),
        &RouterConfig {
            top_k: k,
            norm_topk_prob: norm,
        },
    )
}

fn assert_matches_naive(c: &Case, k: usize, norm: bool) {
    let got = run(c, k, norm).unwrap();
    let (want, chosen) = naive_forward(c, k, norm);
    for (t, sel) in chosen.iter().enumerate() {
        let ours: Vec<usize> = got.routing.top_k_index.row(t).to_vec();
        assert_eq!(&ours, sel, "token {t} selection (k={k}, norm={norm})");
    }
    for ((t, h), w) in want.indexed_iter() {
        let g = got.output[[t, h]] as f64;
        assert!(
            (g - w).abs() <= 1e-5 + 1e-5 * w.abs(),
            "output[{t},{h}] = {g}, naive {w} (k={k}, norm={norm})"
        );
    }
}

#[test]
fn block_forward_matches_naive_per_token_formula() {
    for (seed, k) in [(11u64, 1usize), (12, 2), (13, 3), (14, 6)] {
        let c = random_case(seed, 7, 12, 5, 6);
        assert_matches_naive(&c, k, true);
        assert_matches_naive(&c, k, false);
    }
}

#[test]
fn block_forward_all_tokens_to_one_expert_and_empty_experts() {
    // Gate row 2 = 5 * x-direction-independent large bias via a constant feature: x[:, 0] = 1
    // and gate[2, 0] = 50, so every token picks expert 2 first; with k = 1 the other experts
    // get zero tokens.
    let mut c = random_case(21, 9, 8, 4, 5);
    c.x.column_mut(0).fill(1.0);
    c.gate[[2, 0]] = 50.0;
    let got = run(&c, 1, true).unwrap();
    assert!(got.routing.top_k_index.iter().all(|&e| e == 2));
    assert_matches_naive(&c, 1, true);
    assert_matches_naive(&c, 2, false);
}

#[test]
fn block_forward_returns_logits_and_routing() {
    let c = random_case(31, 4, 6, 3, 4);
    let got = run(&c, 2, true).unwrap();
    assert_eq!(got.router_logits.dim(), (4, 4));
    let manual = c.x.dot(&c.gate.t());
    assert_eq!(got.router_logits, manual);
    assert_eq!(got.routing.top_k_weights.dim(), (4, 2));
    for row in got.routing.top_k_weights.axis_iter(Axis(0)) {
        assert!((row.sum() - 1.0).abs() < 1e-6);
    }
}

#[test]
fn block_forward_zero_tokens() {
    let c = random_case(41, 0, 6, 3, 4);
    let got = run(&c, 2, true).unwrap();
    assert_eq!(got.output.dim(), (0, 6));
}

#[test]
fn block_forward_shape_errors_name_the_tensor() {
    let good = random_case(51, 3, 6, 2, 4);
    let name = |r: moe_kernels::Result<moe_kernels::MoeBlockOutput>| match r {
        Err(KernelError::ShapeMismatch { tensor, .. }) => tensor,
        other => panic!("expected a shape mismatch, got {other:?}"),
    };
    let mut c = random_case(51, 3, 6, 2, 4);
    c.gate = Array2::zeros((4, 5));
    assert_eq!(name(run(&c, 2, true)), "gate_weight");

    let mut c = random_case(51, 3, 6, 2, 4);
    c.gate_up = Array3::zeros((3, 6, 4)); // wrong E
    assert_eq!(name(run(&c, 2, true)), "gate_and_up_projs");
    c.gate_up = Array3::zeros((4, 5, 4)); // wrong H
    assert_eq!(name(run(&c, 2, true)), "gate_and_up_projs");
    c.gate_up = Array3::zeros((4, 6, 5)); // odd 2I
    assert_eq!(name(run(&c, 2, true)), "gate_and_up_projs");

    let mut c = random_case(51, 3, 6, 2, 4);
    c.down = Array3::zeros((4, 3, 6)); // wrong I
    assert_eq!(name(run(&c, 2, true)), "down_projs");
    c.down = Array3::zeros((4, 2, 5)); // wrong H
    assert_eq!(name(run(&c, 2, true)), "down_projs");
    c.down = Array3::zeros((5, 2, 6)); // wrong E
    let err = run(&c, 2, true).unwrap_err();
    assert!(err.to_string().contains("down_projs"), "{err}");

    assert_eq!(run(&good, 0, true).unwrap_err(), KernelError::ZeroTopK);
    assert_eq!(
        run(&good, 5, true).unwrap_err(),
        KernelError::TopKTooLarge {
            top_k: 5,
            num_experts: 4
        }
    );
}

/// Reorders experts: new expert `j` is old expert `perm[j]` (gate rows and weights together).
fn permute_experts(c: &Case, perm: &[usize]) -> Case {
    Case {
        x: c.x.clone(),
        gate: c.gate.select(Axis(0), perm),
        gate_up: c.gate_up.select(Axis(0), perm),
        down: c.down.select(Axis(0), perm),
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn output_is_invariant_to_consistent_expert_permutation(
        seed in any::<u64>(),
        t in 1usize..6,
        h in 1usize..9,
        i in 1usize..5,
        e in 1usize..7,
        k_raw in 0usize..7,
        norm in any::<bool>(),
        perm_keys in proptest::collection::vec(any::<u32>(), 6),
    ) {
        let k = 1 + k_raw % e;
        let c = random_case(seed, t, h, i, e);
        let mut perm: Vec<usize> = (0..e).collect();
        perm.sort_by_key(|&j| (perm_keys[j], j));
        let base = run(&c, k, norm).unwrap();
        // Skip near-ties at the selection boundary: relabelling may legitimately flip them.
        if k < e {
            for row in base.routing.probs.axis_iter(Axis(0)) {
                let mut p = row.to_vec();
                p.sort_by(|a, b| b.total_cmp(a));
                prop_assume!(p[k - 1] - p[k] > 1e-5);
            }
        }
        let permuted = run(&permute_experts(&c, &perm), k, norm).unwrap();
        for ((idx, a), b) in base.output.indexed_iter().zip(permuted.output.iter()) {
            prop_assert!((a - b).abs() <= 1e-5 + 1e-5 * a.abs(), "{:?}: {} vs {}", idx, a, b);
        }
        // The selected experts are the same ones, under the new labels: new j = old perm[j].
        for tok in 0..t {
            let mut old: Vec<usize> = base.routing.top_k_index.row(tok).to_vec();
            let mut new: Vec<usize> =
                permuted.routing.top_k_index.row(tok).iter().map(|&j| perm[j]).collect();
            old.sort_unstable();
            new.sort_unstable();
            prop_assert_eq!(old, new);
        }
    }
}
