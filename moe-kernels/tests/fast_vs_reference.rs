//! The fast path (grouped GEMM, f32) against the reference loop (run in f64 on the same
//! values, the truth): proptest over T, H, I, E, k, every family, random / all-to-one-expert /
//! all-tied routing; output and every gradient judged by the float32 bar of `moe_kernels::bound`
//! (the same bar as the conformance suites), routing weights by their own tolerance. Plus bitwise
//! determinism across runs and thread counts.

mod common;

use common::{Case, Family, Rng, FAMILIES};
use moe_kernels::{bound, fast, reference, MoeGrads};
use ndarray::Array2;
use proptest::prelude::*;

fn flat_grads<F: moe_kernels::Real>(g: &MoeGrads<F>) -> Vec<(&'static str, Vec<f64>)> {
    let c = |v: &mut dyn Iterator<Item = &F>| v.map(|x| x.to_f64().unwrap()).collect::<Vec<f64>>();
    let mut out = vec![
        ("grad_input", c(&mut g.grad_input.iter())),
        ("gate_weight", c(&mut g.gate_weight.iter())),
        ("gate_and_up_projs", c(&mut g.gate_and_up_projs.iter())),
        ("down_projs", c(&mut g.down_projs.iter())),
    ];
    if let Some(b) = &g.gate_bias {
        out.push(("gate_bias", c(&mut b.iter())));
    }
    if let Some(b) = &g.gate_up_bias {
        out.push(("gate_up_bias", c(&mut b.iter())));
    }
    if let Some(b) = &g.down_bias {
        out.push(("down_bias", c(&mut b.iter())));
    }
    if let Some(s) = &g.shared {
        out.push(("shared.gate_proj", c(&mut s.gate_proj.iter())));
        out.push(("shared.up_proj", c(&mut s.up_proj.iter())));
        out.push(("shared.down_proj", c(&mut s.down_proj.iter())));
        if let Some(gg) = &s.gate {
            out.push(("shared.gate", c(&mut gg.iter())));
        }
    }
    out
}

/// max |a - b| <= tol * (1 + max |b|): f32 accuracy relative to the tensor's scale.
fn assert_close(name: &str, a: &[f64], b: &[f64], tol: f64) -> Result<(), TestCaseError> {
    prop_assert_eq!(a.len(), b.len(), "{} length", name);
    let scale = 1.0 + b.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    let err = a
        .iter()
        .zip(b)
        .fold(0.0f64, |m, (x, y)| m.max((x - y).abs()));
    prop_assert!(
        err <= tol * scale,
        "{}: max err {} (scale {})",
        name,
        err,
        scale
    );
    Ok(())
}

#[derive(Debug, Clone, Copy)]
enum Mode {
    Random,
    AllToOne(usize),
    Tied,
}

fn build(
    family: Family,
    seed: u64,
    t: usize,
    h: usize,
    i: usize,
    e: usize,
    mode: Mode,
) -> Case<f32> {
    let mut c: Case<f32> = family.case(seed, t, h, i, e);
    match mode {
        Mode::Random => {}
        Mode::AllToOne(e0) => {
            let e0 = e0 % e;
            match c.corr.as_mut() {
                Some(b) => b[e0] += 30.0,
                None => {
                    let b = c.gate_bias.get_or_insert_with(|| ndarray::Array1::zeros(e));
                    b[e0] += 30.0;
                }
            }
        }
        Mode::Tied => {
            c.gate_weight.fill(0.0);
            if let Some(b) = c.gate_bias.as_mut() {
                b.fill(0.0);
            }
            if let Some(b) = c.corr.as_mut() {
                b.fill(0.0);
            }
        }
    }
    c
}

/// `shape` = (T, H, I, E, k).
fn compare(
    family: Family,
    seed: u64,
    shape: (usize, usize, usize, usize, usize),
    mode: Mode,
) -> Result<(), TestCaseError> {
    let (t, h, i, e, k) = shape;
    let c32 = build(family, seed, t, h, i, e, mode);
    let c64: Case<f64> = c32.cast();
    let cfg = family.config(e, k);
    let go32: Array2<f32> = Rng(seed ^ 0x55).a2((t, h), 1.0);
    let go64 = go32.mapv(f64::from);

    let f_fast = fast::moe_forward(c32.x.view(), &c32.params(), &cfg).unwrap();
    let f_ref = reference::moe_forward(c64.x.view(), &c64.params(), &cfg).unwrap();
    if f_fast.routing.top_k_index != f_ref.routing.top_k_index {
        // Only a near-tie of two scores may flip the selection between f32 and f64 logits.
        let dz = (&f_fast.router_logits.mapv(f64::from) - &f_ref.router_logits)
            .iter()
            .fold(0.0f64, |m, v| m.max(v.abs()));
        prop_assert!(dz < 1e-5, "selection differs and logits differ by {}", dz);
        prop_assume!(false);
    }
    if let Mode::AllToOne(e0) = mode {
        let e0 = e0 % e;
        prop_assert!(f_fast
            .routing
            .top_k_index
            .rows()
            .into_iter()
            .all(|r| r.iter().any(|&x| x == e0)));
    }
    // Routing weights: softmax / sigmoid outputs in [0, 1] of logits with an H-term dot product's
    // float32 error (H < 38 here): 2e-5 of the scale.
    let tol = 2e-5;
    let w_fast: Vec<f64> = f_fast
        .routing
        .top_k_weights
        .iter()
        .map(|&v| f64::from(v))
        .collect();
    let w_ref: Vec<f64> = f_ref.routing.top_k_weights.iter().copied().collect();
    assert_close("top_k_weights", &w_fast, &w_ref, tol)?;

    // Output and every gradient: the workspace's float32 bar (moe_kernels::bound) against the
    // float64 truth, with the float32 reference loop as the independent float32 evaluation.
    let g_fast =
        fast::moe_backward(c32.x.view(), &c32.params(), &cfg, &f_fast, go32.view()).unwrap();
    let g_ref =
        reference::moe_backward(c64.x.view(), &c64.params(), &cfg, &f_ref, go64.view()).unwrap();
    let f_32 = reference::moe_forward(c32.x.view(), &c32.params(), &cfg).unwrap();
    let g_32 =
        reference::moe_backward(c32.x.view(), &c32.params(), &cfg, &f_32, go32.view()).unwrap();
    let mags = bound::block_magnitudes(c64.x.view(), &c64.params(), &cfg, go64.view()).unwrap();
    let f64s = |a: &Array2<f32>| a.iter().map(|&v| f64::from(v)).collect::<Vec<f64>>();
    let mut got = vec![("output", f64s(&f_fast.output))];
    got.extend(flat_grads(&g_fast));
    let mut truth = vec![("output", f_ref.output.iter().copied().collect::<Vec<f64>>())];
    truth.extend(flat_grads(&g_ref));
    let mut m = vec![("output", mags.output.iter().copied().collect::<Vec<f64>>())];
    m.extend(flat_grads(&mags.grads));
    let mut r32 = vec![("output", f64s(&f_32.output))];
    r32.extend(flat_grads(&g_32));
    prop_assert_eq!(got.len(), truth.len());
    prop_assert_eq!(m.len(), truth.len());
    for (((name, g), (_, t)), ((_, mm), (_, r))) in got.iter().zip(&truth).zip(m.iter().zip(&r32)) {
        let verdict = bound::judge_f32(
            g,
            &bound::TruthRef {
                values: t,
                mags: mm,
                f32_ref: Some(r),
            },
        );
        prop_assert!(
            verdict.is_ok(),
            "{:?} {}: {}",
            family,
            name,
            verdict.unwrap_err()
        );
    }
    Ok(())
}

fn family_strategy() -> impl Strategy<Value = Family> {
    (0..FAMILIES.len()).prop_map(|i| FAMILIES[i])
}

fn mode_strategy() -> impl Strategy<Value = Mode> {
    prop_oneof![
        3 => Just(Mode::Random),
        1 => (0usize..64).prop_map(Mode::AllToOne),
        1 => Just(Mode::Tied),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn fast_matches_reference(
        family in family_strategy(),
        seed in any::<u64>(),
        t in 1usize..34,
        h in 1usize..38,
        i in 1usize..20,
        e in 1usize..17,
        k in prop::sample::select(vec![1usize, 2, 3, 4, 8]),
        mode in mode_strategy(),
    ) {
        prop_assume!(k <= family.max_top_k(e));
        compare(family, seed, (t, h, i, e, k), mode)?;
    }
}

#[test]
fn fast_matches_reference_on_fixed_shapes() {
    // Hidden sizes that are no multiple of any tile, T = 1, k = 8, a fixed-seed sweep.
    for (n, family) in FAMILIES.into_iter().enumerate() {
        for &(t, h, i, e, k) in &[(1, 13, 5, 8, 8), (37, 29, 7, 16, 4), (64, 17, 3, 4, 1)] {
            if k <= family.max_top_k(e) {
                compare(family, 100 + n as u64, (t, h, i, e, k), Mode::Random).unwrap();
            }
        }
    }
}

fn run_fast(
    c: &Case<f32>,
    family: Family,
    k: usize,
    go: &Array2<f32>,
) -> (Array2<f32>, MoeGrads<f32>) {
    let cfg = family.config(c.gate_weight.nrows(), k);
    let f = fast::moe_forward(c.x.view(), &c.params(), &cfg).unwrap();
    let g = fast::moe_backward(c.x.view(), &c.params(), &cfg, &f, go.view()).unwrap();
    (f.output, g)
}

fn bits(out: &Array2<f32>, g: &MoeGrads<f32>) -> Vec<u32> {
    let mut v: Vec<u32> = out.iter().map(|x| x.to_bits()).collect();
    for (_, t) in flat_grads(g) {
        v.extend(t.iter().map(|&x| (x as f32).to_bits()));
    }
    v
}

#[test]
fn fast_path_is_bitwise_deterministic_across_runs_and_thread_counts() {
    for family in [Family::Qwen3Next, Family::GptOss, Family::DeepseekV3] {
        let (t, h, i, e, k) = (300, 70, 40, 16, 4);
        let c: Case<f32> = family.case(3, t, h, i, e);
        let go: Array2<f32> = Rng(4).a2((t, h), 1.0);
        let (o1, g1) = run_fast(&c, family, k, &go);
        let (o2, g2) = run_fast(&c, family, k, &go);
        assert_eq!(
            bits(&o1, &g1),
            bits(&o2, &g2),
            "{family:?}: two runs differ"
        );
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(3)
            .build()
            .unwrap();
        let (o3, g3) = pool.install(|| run_fast(&c, family, k, &go));
        assert_eq!(
            bits(&o1, &g1),
            bits(&o3, &g3),
            "{family:?}: 3 threads differ"
        );
    }
}

#[test]
fn fast_backward_accepts_a_reference_forward() {
    let family = Family::Step35;
    let c: Case<f32> = family.case(8, 20, 9, 5, 8);
    let cfg = family.config(8, 3);
    let go: Array2<f32> = Rng(2).a2((20, 9), 1.0);
    let f_ref = reference::moe_forward(c.x.view(), &c.params(), &cfg).unwrap();
    let f_fast = fast::moe_forward(c.x.view(), &c.params(), &cfg).unwrap();
    let a = fast::moe_backward(c.x.view(), &c.params(), &cfg, &f_ref, go.view()).unwrap();
    let b = fast::moe_backward(c.x.view(), &c.params(), &cfg, &f_fast, go.view()).unwrap();
    // The two forwards' routing weights may differ in the last bit (loop vs GEMM logits).
    for ((name, ga), (_, gb)) in flat_grads(&a).iter().zip(&flat_grads(&b)) {
        assert_close(name, ga, gb, 1e-5).unwrap();
    }
}

#[test]
fn zero_tokens_give_empty_output_and_zero_gradients() {
    for family in FAMILIES {
        let c: Case<f32> = family.case(1, 0, 5, 3, 8);
        let cfg = family.config(8, 2);
        let go = Array2::<f32>::zeros((0, 5));
        for path in ["reference", "fast"] {
            let (f, g) = if path == "fast" {
                let f = fast::moe_forward(c.x.view(), &c.params(), &cfg).unwrap();
                let g = fast::moe_backward(c.x.view(), &c.params(), &cfg, &f, go.view()).unwrap();
                (f, g)
            } else {
                let f = reference::moe_forward(c.x.view(), &c.params(), &cfg).unwrap();
                let g =
                    reference::moe_backward(c.x.view(), &c.params(), &cfg, &f, go.view()).unwrap();
                (f, g)
            };
            assert_eq!(f.output.dim(), (0, 5));
            assert_eq!(g.down_projs.dim(), (8, 3, 5));
            for (name, v) in flat_grads(&g) {
                assert!(v.iter().all(|&x| x == 0.0), "{family:?} {path} {name}");
            }
        }
    }
}
