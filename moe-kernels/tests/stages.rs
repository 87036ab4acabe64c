//! The public stage API of the fast path (`moe_kernels::fast::{router_forward, experts_forward,
//! combine_forward, ...}`): chained by hand it reproduces the reference block (forward and every
//! gradient) and `fast::moe_forward` bit for bit; a tensor-parallel split of the intermediate
//! size and an expert-parallel split of the experts recombine to the unsplit result; empty
//! inputs and experts without rows give exact zero gradients; bad shapes are errors.

mod common;

use common::{rel_err, Case, Family, Rng};
use moe_kernels::fast::{
    self, combine_backward, combine_forward, experts_backward, experts_forward, permute_backward,
    permute_forward, router_backward, router_forward, shared_expert_backward,
    shared_expert_forward, ExpertActs, ExpertGrads, ExpertWeights,
};
use moe_kernels::{
    reference, Activation, KernelError, MoeConfig, MoeGrads, Permutation, Routing,
    SharedExpertParams,
};
use ndarray::{concatenate, s, Array1, Array2, Array3, ArrayView2, Axis};

/// `max |a - b| <= tol (1 + max |b|)`: f32 accuracy relative to the tensor's scale.
fn assert_close(name: &str, a: &[f64], b: &[f64], tol: f64) {
    assert_eq!(a.len(), b.len(), "{name}: length");
    let scale = 1.0 + b.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    let err = rel_err(a, b, tol * scale, 0.0);
    assert!(
        err <= 1.0,
        "{name}: max err {} (scale {scale})",
        err * tol * scale
    );
}

/// A float32 result against the float64 truth with the workspace's float32 bar
/// (`moe_kernels::bound::judge_f32`, elementwise: no independent float32 run here).
fn assert_within_bound(name: &str, got: &[f64], truth: &[f64], mags: &[f64]) {
    let t = moe_kernels::bound::TruthRef {
        values: truth,
        mags,
        f32_ref: None,
    };
    if let Err(e) = moe_kernels::bound::judge_f32(got, &t) {
        panic!("{name}: {e}");
    }
}

fn f64s<'a>(it: impl IntoIterator<Item = &'a f32>) -> Vec<f64> {
    it.into_iter().map(|&v| f64::from(v)).collect()
}

fn flat_grads<F: moe_kernels::Real>(g: &MoeGrads<F>) -> Vec<(&'static str, Vec<f64>)> {
    let c = |v: &mut dyn Iterator<Item = &F>| v.map(|x| x.to_f64().unwrap()).collect::<Vec<f64>>();
    let mut out = vec![
        ("grad_input", c(&mut g.grad_input.iter())),
        ("gate_weight", c(&mut g.gate_weight.iter())),
        ("gate_and_up_projs", c(&mut g.gate_and_up_projs.iter())),
        ("down_projs", c(&mut g.down_projs.iter())),
    ];
    let opt = [
        ("gate_bias", g.gate_bias.as_ref().map(|b| c(&mut b.iter()))),
        (
            "gate_up_bias",
            g.gate_up_bias.as_ref().map(|b| c(&mut b.iter())),
        ),
        ("down_bias", g.down_bias.as_ref().map(|b| c(&mut b.iter()))),
    ];
    out.extend(opt.into_iter().filter_map(|(n, v)| v.map(|v| (n, v))));
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

/// Everything the hand-chained forward keeps for its backward.
struct Chain {
    output: Array2<f32>,
    logits: Array2<f32>,
    routing: Routing<f32>,
    perm: Permutation,
    row_of_slot: Array2<usize>,
    xp: Array2<f32>,
    acts: ExpertActs,
    shared: Option<fast::SharedActs>,
}

fn chain_forward(c: &Case<f32>, cfg: &MoeConfig) -> Chain {
    let p = c.params();
    let (logits, routing) = router_forward(
        c.x.view(),
        p.gate_weight,
        p.gate_bias,
        p.e_score_correction_bias,
        cfg,
    )
    .unwrap();
    let perm =
        Permutation::from_top_k_index(routing.top_k_index.view(), c.gate_weight.nrows()).unwrap();
    let row_of_slot = perm.row_of_slot_matrix();
    let xp = permute_forward(c.x.view(), &perm.token_of_rows()).unwrap();
    let w = ExpertWeights::from_params(&p);
    let acts = experts_forward(xp.view(), &perm.offsets, &w, &cfg.activation).unwrap();
    let mut output = combine_forward(
        acts.y.view(),
        routing.top_k_weights.view(),
        row_of_slot.view(),
    )
    .unwrap();
    let shared = p.shared.as_ref().map(|s| {
        let (out, sa) = shared_expert_forward(c.x.view(), s).unwrap();
        // The saved activations name the T tokens they were computed for.
        assert_eq!(sa.tokens(), c.x.nrows());
        output += &out;
        sa
    });
    Chain {
        output,
        logits,
        routing,
        perm,
        row_of_slot,
        xp,
        acts,
        shared,
    }
}

fn chain_backward(
    c: &Case<f32>,
    cfg: &MoeConfig,
    ch: &Chain,
    go: ArrayView2<f32>,
) -> MoeGrads<f32> {
    let p = c.params();
    let (dy, dw) = combine_backward(
        ch.acts.y.view(),
        ch.routing.top_k_weights.view(),
        ch.row_of_slot.view(),
        go,
    )
    .unwrap();
    let w = ExpertWeights::from_params(&p);
    let eg = experts_backward(
        ch.xp.view(),
        &ch.perm.offsets,
        &w,
        &cfg.activation,
        &ch.acts,
        dy.view(),
    )
    .unwrap();
    let mut grad_input = permute_backward(eg.grad_xp.view(), ch.row_of_slot.view()).unwrap();
    let rg = router_backward(
        c.x.view(),
        p.gate_weight,
        p.gate_bias.is_some(),
        cfg,
        &ch.routing,
        dw.view(),
    )
    .unwrap();
    grad_input += &rg.grad_x;
    let shared = match (&p.shared, &ch.shared) {
        (Some(s), Some(sa)) => {
            let (gx, sg) = shared_expert_backward(c.x.view(), s, sa, go).unwrap();
            grad_input += &gx;
            Some(sg)
        }
        _ => None,
    };
    MoeGrads {
        grad_input,
        gate_weight: rg.gate_weight,
        gate_bias: rg.gate_bias,
        gate_and_up_projs: eg.gate_and_up_projs,
        down_projs: eg.down_projs,
        gate_up_bias: eg.gate_up_bias,
        down_bias: eg.down_bias,
        shared,
    }
}

/// (family, seed, T, H, I, E, k): Qwen3, GPT-OSS (router and expert biases, clamped GLU),
/// Qwen3-Next (gated shared expert), DeepSeek-V3 (correction bias, ungated shared expert),
/// Step3.5 (clamped SwiGLU), Mixtral with k = 1 and T = 1.
const CONFIGS: [(Family, u64, usize, usize, usize, usize, usize); 7] = [
    (Family::Qwen3MoeNorm, 1, 37, 29, 7, 16, 4),
    (Family::GptOss, 2, 40, 23, 6, 8, 2),
    (Family::GptOss, 3, 300, 70, 40, 16, 4),
    (Family::Qwen3Next, 4, 33, 19, 5, 8, 3),
    (Family::DeepseekV3, 5, 25, 17, 4, 8, 2),
    (Family::Step35, 6, 20, 9, 5, 8, 3),
    (Family::Mixtral, 7, 1, 13, 5, 8, 1),
];

#[test]
fn chained_forward_matches_reference_and_fast_bitwise() {
    for (family, seed, t, h, i, e, k) in CONFIGS {
        let c: Case<f32> = family.case(seed, t, h, i, e);
        let c64: Case<f64> = c.cast();
        let cfg = family.config(e, k);
        let ch = chain_forward(&c, &cfg);

        let f = fast::moe_forward(c.x.view(), &c.params(), &cfg).unwrap();
        let bits = |a: &Array2<f32>| a.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&ch.output), bits(&f.output), "{family:?}: output bits");
        assert_eq!(
            bits(&ch.logits),
            bits(&f.router_logits),
            "{family:?}: logits"
        );
        assert_eq!(ch.routing, f.routing, "{family:?}: routing");

        let r = reference::moe_forward(c64.x.view(), &c64.params(), &cfg).unwrap();
        assert_eq!(ch.routing.top_k_index, r.routing.top_k_index, "{family:?}");
        let want: Vec<f64> = r.output.iter().copied().collect();
        let go64 = Array2::<f64>::zeros(r.output.raw_dim());
        let m =
            moe_kernels::bound::block_magnitudes(c64.x.view(), &c64.params(), &cfg, go64.view())
                .unwrap();
        assert_within_bound(
            &format!("{family:?} output"),
            &f64s(&ch.output),
            &want,
            m.output.as_slice().unwrap(),
        );
    }
}

#[test]
fn chained_backward_matches_reference() {
    for (family, seed, t, h, i, e, k) in CONFIGS {
        let c: Case<f32> = family.case(seed, t, h, i, e);
        let c64: Case<f64> = c.cast();
        let cfg = family.config(e, k);
        let go: Array2<f32> = Rng(seed ^ 0x55).a2((t, h), 1.0);
        let ch = chain_forward(&c, &cfg);
        let g = chain_backward(&c, &cfg, &ch, go.view());

        let r = reference::moe_forward(c64.x.view(), &c64.params(), &cfg).unwrap();
        let go64 = go.mapv(f64::from);
        let gr =
            reference::moe_backward(c64.x.view(), &c64.params(), &cfg, &r, go64.view()).unwrap();
        let f = fast::moe_forward(c.x.view(), &c.params(), &cfg).unwrap();
        let gf = fast::moe_backward(c.x.view(), &c.params(), &cfg, &f, go.view()).unwrap();
        let mags =
            moe_kernels::bound::block_magnitudes(c64.x.view(), &c64.params(), &cfg, go64.view())
                .unwrap();
        let (a, b, fa) = (flat_grads(&g), flat_grads(&gr), flat_grads(&gf));
        let m = flat_grads(&mags.grads);
        let names = |v: &[(&'static str, Vec<f64>)]| v.iter().map(|x| x.0).collect::<Vec<_>>();
        assert_eq!(names(&a), names(&b), "{family:?}: gradient set");
        for ((((name, ga), (_, gb)), (_, gfa)), (_, gm)) in a.iter().zip(&b).zip(&fa).zip(&m) {
            assert_within_bound(&format!("{family:?} {name}"), ga, gb, gm);
            // Same stages as fast::moe_backward; only grad_input sums its terms differently.
            if *name == "grad_input" {
                assert_close(&format!("{family:?} {name} vs fast"), ga, gfa, 1e-6);
            } else {
                assert_eq!(ga, gfa, "{family:?} {name}: stages vs fast::moe_backward");
            }
        }
    }
}

/// Rank `r` of 2 of a tensor-parallel split of `I`: columns `[r I/2, (r+1) I/2)` of the gate
/// half and the same of the up half (packed gate first), rows of `down_projs`, `down_bias` on
/// rank 0 only.
struct TpShard {
    gate_up: Array3<f32>,
    down: Array3<f32>,
    gate_up_bias: Option<Array2<f32>>,
    down_bias: Option<Array2<f32>>,
}

fn tp_shard(c: &Case<f32>, r: usize) -> TpShard {
    let inter = c.down.shape()[1];
    let half = inter / 2;
    let (g0, u0) = (r * half, inter + r * half);
    let gate_up = concatenate(
        Axis(2),
        &[
            c.gate_up.slice(s![.., .., g0..g0 + half]),
            c.gate_up.slice(s![.., .., u0..u0 + half]),
        ],
    )
    .unwrap();
    let gate_up_bias = c.gate_up_bias.as_ref().map(|b| {
        concatenate(
            Axis(1),
            &[
                b.slice(s![.., g0..g0 + half]),
                b.slice(s![.., u0..u0 + half]),
            ],
        )
        .unwrap()
    });
    TpShard {
        gate_up,
        down: c.down.slice(s![.., g0..g0 + half, ..]).to_owned(),
        gate_up_bias,
        down_bias: if r == 0 { c.down_bias.clone() } else { None },
    }
}

impl TpShard {
    fn weights(&self) -> ExpertWeights<'_> {
        ExpertWeights {
            gate_and_up_projs: self.gate_up.view(),
            down_projs: self.down.view(),
            gate_up_bias: self.gate_up_bias.as_ref().map(|b| b.view()),
            down_bias: self.down_bias.as_ref().map(|b| b.view()),
        }
    }
}

#[test]
fn tensor_parallel_halves_of_i_sum_to_the_unsplit_experts() {
    for (family, seed, t, h, i, e, k) in [
        (Family::GptOss, 11, 40, 23, 6, 8, 2),
        (Family::Qwen3MoeNorm, 12, 60, 31, 10, 8, 3),
        (Family::Step35, 13, 30, 17, 4, 4, 2),
    ] {
        let c: Case<f32> = family.case(seed, t, h, i, e);
        let cfg = family.config(e, k);
        let ch = chain_forward(&c, &cfg);
        let (xp, offsets) = (ch.xp.view(), &ch.perm.offsets);
        let gy: Array2<f32> = Rng(seed).a2(ch.acts.y.dim(), 1.0);
        let p = c.params();
        let full_w = ExpertWeights::from_params(&p);
        let full =
            experts_backward(xp, offsets, &full_w, &cfg.activation, &ch.acts, gy.view()).unwrap();

        let shards = [tp_shard(&c, 0), tp_shard(&c, 1)];
        let mut y_sum = Array2::<f32>::zeros(ch.acts.y.dim());
        let mut gx_sum = Array2::<f32>::zeros(ch.xp.dim());
        let half = i / 2;
        for (r, sh) in shards.iter().enumerate() {
            let w = sh.weights();
            assert_eq!((w.num_experts(), w.inter()), (e, half));
            let acts = experts_forward(xp, offsets, &w, &cfg.activation).unwrap();
            y_sum += &acts.y;
            // The shard's activations are the matching columns of the unsplit ones.
            let cols = |a: &Array2<f32>, off: usize| a.slice(s![.., off..off + half]).to_owned();
            assert_eq!(cols(&acts.h, 0), cols(&ch.acts.h, r * half), "{family:?} h");
            let g = experts_backward(xp, offsets, &w, &cfg.activation, &acts, gy.view()).unwrap();
            gx_sum += &g.grad_xp;

            let name = |n: &str| format!("{family:?} rank {r} {n}");
            let (g0, u0) = (r * half, i + r * half);
            let gu_want = concatenate(
                Axis(2),
                &[
                    full.gate_and_up_projs.slice(s![.., .., g0..g0 + half]),
                    full.gate_and_up_projs.slice(s![.., .., u0..u0 + half]),
                ],
            )
            .unwrap();
            assert_close(
                &name("gate_and_up_projs"),
                &f64s(&g.gate_and_up_projs),
                &f64s(&gu_want),
                1e-6,
            );
            let d_want = full.down_projs.slice(s![.., g0..g0 + half, ..]).to_owned();
            assert_close(
                &name("down_projs"),
                &f64s(&g.down_projs),
                &f64s(&d_want),
                1e-6,
            );
            match (&g.gate_up_bias, &full.gate_up_bias) {
                (Some(b), Some(fb)) => {
                    let want = concatenate(
                        Axis(1),
                        &[
                            fb.slice(s![.., g0..g0 + half]),
                            fb.slice(s![.., u0..u0 + half]),
                        ],
                    )
                    .unwrap();
                    assert_close(&name("gate_up_bias"), &f64s(b), &f64s(&want), 1e-6);
                }
                (None, None) => {}
                _ => panic!("{}", name("gate_up_bias presence")),
            }
            match (&g.down_bias, r) {
                (Some(b), 0) => assert_eq!(Some(b), full.down_bias.as_ref(), "{family:?}"),
                (None, 0) => assert!(full.down_bias.is_none()),
                (b, _) => assert!(b.is_none(), "{}", name("down_bias only on rank 0")),
            }
        }
        assert_close(
            &format!("{family:?} sum of y"),
            &f64s(&y_sum),
            &f64s(&ch.acts.y),
            1e-6,
        );
        assert_close(
            &format!("{family:?} sum of grad_xp"),
            &f64s(&gx_sum),
            &f64s(&full.grad_xp),
            1e-6,
        );
    }
}

#[test]
fn expert_parallel_groups_concatenate_to_the_unsplit_experts() {
    let (family, e, k) = (Family::GptOss, 8, 2);
    let c: Case<f32> = family.case(21, 50, 19, 6, e);
    let cfg = family.config(e, k);
    let ch = chain_forward(&c, &cfg);
    let gy: Array2<f32> = Rng(3).a2(ch.acts.y.dim(), 1.0);
    let p = c.params();
    let full = experts_backward(
        ch.xp.view(),
        &ch.perm.offsets,
        &ExpertWeights::from_params(&p),
        &cfg.activation,
        &ch.acts,
        gy.view(),
    )
    .unwrap();
    let mut ys = Vec::new();
    let mut gxs = Vec::new();
    for (e0, e1) in [(0, 3), (3, 8)] {
        let off = &ch.perm.offsets;
        let (r0, r1) = (off[e0], off[e1]);
        let local: Vec<usize> = off[e0..=e1].iter().map(|&o| o - r0).collect();
        let w = ExpertWeights {
            gate_and_up_projs: c.gate_up.slice(s![e0..e1, .., ..]),
            down_projs: c.down.slice(s![e0..e1, .., ..]),
            gate_up_bias: c.gate_up_bias.as_ref().map(|b| b.slice(s![e0..e1, ..])),
            down_bias: c.down_bias.as_ref().map(|b| b.slice(s![e0..e1, ..])),
        };
        let xp = ch.xp.slice(s![r0..r1, ..]);
        let acts = experts_forward(xp, &local, &w, &cfg.activation).unwrap();
        let g = experts_backward(
            xp,
            &local,
            &w,
            &cfg.activation,
            &acts,
            gy.slice(s![r0..r1, ..]),
        )
        .unwrap();
        let want_gu = full.gate_and_up_projs.slice(s![e0..e1, .., ..]).to_owned();
        assert_close(
            "ep gate_and_up_projs",
            &f64s(&g.gate_and_up_projs),
            &f64s(&want_gu),
            1e-6,
        );
        let want_d = full.down_projs.slice(s![e0..e1, .., ..]).to_owned();
        assert_close("ep down_projs", &f64s(&g.down_projs), &f64s(&want_d), 1e-6);
        ys.push(acts.y);
        gxs.push(g.grad_xp);
    }
    let y = concatenate(Axis(0), &[ys[0].view(), ys[1].view()]).unwrap();
    let gx = concatenate(Axis(0), &[gxs[0].view(), gxs[1].view()]).unwrap();
    assert_close("ep y", &f64s(&y), &f64s(&ch.acts.y), 1e-6);
    assert_close("ep grad_xp", &f64s(&gx), &f64s(&full.grad_xp), 1e-6);
}

fn gpt_weights(
    e: usize,
    h: usize,
    i: usize,
) -> (Array3<f32>, Array3<f32>, Array2<f32>, Array2<f32>) {
    let mut r = Rng(9);
    (
        r.a3((e, h, 2 * i), 0.7),
        r.a3((e, i, h), 0.7),
        r.a2((e, 2 * i), 0.3),
        r.a2((e, h), 0.3),
    )
}

fn all_zero(g: &ExpertGrads) -> bool {
    let z = |a: ndarray::ArrayViewD<f32>| a.iter().all(|&v| v == 0.0);
    z(g.grad_xp.view().into_dyn())
        && z(g.gate_and_up_projs.view().into_dyn())
        && z(g.down_projs.view().into_dyn())
        && g.gate_up_bias.iter().all(|b| z(b.view().into_dyn()))
        && g.down_bias.iter().all(|b| z(b.view().into_dyn()))
}

#[test]
fn empty_rows_and_experts_without_rows_give_exact_zero_gradients() {
    let (e, h, i) = (4, 7, 3);
    let (gu, d, gub, db) = gpt_weights(e, h, i);
    let w = ExpertWeights {
        gate_and_up_projs: gu.view(),
        down_projs: d.view(),
        gate_up_bias: Some(gub.view()),
        down_bias: Some(db.view()),
    };
    let act = Activation::GptOssGlu {
        limit: 0.7,
        alpha: 1.702,
    };
    // N = 0: empty outputs, zero-filled weight gradients of the right shapes.
    let xp = Array2::<f32>::zeros((0, h));
    let acts = experts_forward(xp.view(), &[0; 5], &w, &act).unwrap();
    assert_eq!(
        (acts.a.dim(), acts.h.dim(), acts.y.dim()),
        ((0, 6), (0, 3), (0, 7))
    );
    let g = experts_backward(xp.view(), &[0; 5], &w, &act, &acts, xp.view()).unwrap();
    assert_eq!(g.gate_and_up_projs.dim(), (e, h, 2 * i));
    assert_eq!(g.down_projs.dim(), (e, i, h));
    assert_eq!(g.gate_up_bias.as_ref().map(|b| b.dim()), Some((e, 2 * i)));
    assert_eq!(g.grad_xp.dim(), (0, h));
    assert!(all_zero(&g));
    // Combine / permute with T = 0 and N = 0.
    let none = Array2::<usize>::zeros((0, 2));
    let w0 = Array2::<f32>::zeros((0, 2));
    assert_eq!(
        combine_forward(acts.y.view(), w0.view(), none.view())
            .unwrap()
            .dim(),
        (0, h)
    );
    let (gy, gw) = combine_backward(acts.y.view(), w0.view(), none.view(), xp.view()).unwrap();
    assert_eq!((gy.dim(), gw.dim()), ((0, h), (0, 2)));
    assert_eq!(
        permute_backward(xp.view(), none.view()).unwrap().dim(),
        (0, h)
    );
    assert_eq!(permute_forward(xp.view(), &[]).unwrap().dim(), (0, h));

    // Experts 1 and 3 have no rows: exact zeros for them, nonzero for the others.
    let offsets = [0, 5, 5, 9, 9];
    let xp: Array2<f32> = Rng(4).a2((9, h), 1.0);
    let gy: Array2<f32> = Rng(5).a2((9, h), 1.0);
    let acts = experts_forward(xp.view(), &offsets, &w, &act).unwrap();
    let g = experts_backward(xp.view(), &offsets, &w, &act, &acts, gy.view()).unwrap();
    for ex in 0..e {
        let zero = |a: ndarray::ArrayViewD<f32>| a.iter().all(|&v| v == 0.0);
        let parts = [
            zero(g.gate_and_up_projs.index_axis(Axis(0), ex).into_dyn()),
            zero(g.down_projs.index_axis(Axis(0), ex).into_dyn()),
            zero(g.gate_up_bias.as_ref().unwrap().row(ex).into_dyn()),
            zero(g.down_bias.as_ref().unwrap().row(ex).into_dyn()),
        ];
        let empty = ex == 1 || ex == 3;
        assert_eq!(parts, [empty; 4], "expert {ex}");
    }
}

/// The dispatch gather folded into the gate/up GEMM (`Rows::Gather`) gives the bits of the
/// stored `xp` path, with experts spread over several row blocks (1024 rows per task), one
/// expert without rows, biases on; an out-of-range token id is an error naming it.
#[test]
fn gathered_rows_match_stored_rows_bitwise() {
    use moe_kernels::fast::experts_forward_rows;
    use moe_kernels::fast::grouped::Rows;
    let (t, h, i, e) = (1500, 5, 3, 4);
    let (gu, d, gub, db) = gpt_weights(e, h, i);
    let w = ExpertWeights {
        gate_and_up_projs: gu.view(),
        down_projs: d.view(),
        gate_up_bias: Some(gub.view()),
        down_bias: Some(db.view()),
    };
    let x: Array2<f32> = Rng(3).a2((t, h), 1.0);
    // Expert 0: 2100 rows (3 blocks), expert 1: none, expert 2: 7, expert 3: 893.
    let counts = [2100, 0, 7, 893];
    let token_of_row: Vec<usize> = (0..counts.iter().sum::<usize>())
        .map(|r| (r * 7919) % t)
        .collect();
    let mut offsets = vec![0];
    for c in counts {
        offsets.push(offsets.last().unwrap() + c);
    }
    for act in [
        Activation::SwiGlu,
        Activation::GptOssGlu {
            alpha: 1.702,
            limit: 7.0,
        },
    ] {
        let xp = permute_forward(x.view(), &token_of_row).unwrap();
        let stored = experts_forward(xp.view(), &offsets, &w, &act).unwrap();
        let gathered = experts_forward_rows(
            Rows::Gather {
                x: x.view(),
                token_of_row: &token_of_row,
            },
            &offsets,
            &w,
            &act,
        )
        .unwrap();
        assert_eq!(stored.a, gathered.a, "{act:?}: a");
        assert_eq!(stored.h, gathered.h, "{act:?}: h");
        assert_eq!(stored.y, gathered.y, "{act:?}: y");
        assert!(stored.y.iter().all(|v| v.is_finite()));
    }
    let mut bad = token_of_row.clone();
    bad[2000] = t;
    names(
        experts_forward_rows(
            Rows::Gather {
                x: x.view(),
                token_of_row: &bad,
            },
            &offsets,
            &w,
            &Activation::SwiGlu,
        ),
        "token_of_row",
    );
    // Fewer gathered rows than offsets[E_l]: the offsets are named.
    names(
        experts_forward_rows(
            Rows::Gather {
                x: x.view(),
                token_of_row: &token_of_row[..100],
            },
            &offsets,
            &w,
            &Activation::SwiGlu,
        ),
        "offsets",
    );
}

#[test]
fn permutation_helpers_invert_each_other() {
    let idx = ndarray::array![[2usize, 0], [0, 1], [2, 1]];
    let perm = Permutation::from_top_k_index(idx.view(), 3).unwrap();
    let ros = perm.row_of_slot_matrix();
    assert_eq!(ros.dim(), (3, 2));
    let tor = perm.token_of_rows();
    for ((t, _), &r) in ros.indexed_iter() {
        assert_eq!(tor[r], t);
    }
    // Expert 0's rows (tokens 0, 1), expert 1's (1, 2), expert 2's (0, 2).
    assert_eq!(tor, vec![0, 1, 1, 2, 0, 2]);
    assert_eq!(ros, ndarray::array![[4usize, 0], [1, 2], [5, 3]]);
}

fn names(r: Result<impl std::fmt::Debug, KernelError>, tensor: &str) {
    match r {
        Err(KernelError::ShapeMismatch { tensor: t, .. }) if t == tensor => {}
        other => panic!("expected a shape error naming {tensor}, got {other:?}"),
    }
}

#[test]
fn stage_shape_errors_name_the_tensor() {
    let (e, h, i, n) = (4, 7, 3, 9);
    let (gu, d, gub, db) = gpt_weights(e, h, i);
    let w = ExpertWeights {
        gate_and_up_projs: gu.view(),
        down_projs: d.view(),
        gate_up_bias: Some(gub.view()),
        down_bias: Some(db.view()),
    };
    let act = Activation::SwiGlu;
    let xp: Array2<f32> = Rng(1).a2((n, h), 1.0);
    let off = [0, 2, 5, 5, 9];
    let acts = experts_forward(xp.view(), &off, &w, &act).unwrap();
    let gy = Array2::<f32>::zeros((n, h));

    // Offsets: wrong length, first not 0, decreasing, last != N.
    for bad in [
        &[0, 2, 5, 9][..],
        &[1, 2, 5, 5, 9],
        &[0, 5, 2, 5, 9],
        &[0, 2, 5, 5, 8],
    ] {
        names(experts_forward(xp.view(), bad, &w, &act), "offsets");
        names(
            experts_backward(xp.view(), bad, &w, &act, &acts, gy.view()),
            "offsets",
        );
    }
    // Weights: H differs, odd 2I, E_l / I_l / H of the others.
    let odd = Array3::<f32>::zeros((e, h, 5));
    let wrong_h = Array3::<f32>::zeros((e, h + 1, 2 * i));
    let d_wrong_e = Array3::<f32>::zeros((e - 1, i, h));
    let b_wrong = Array2::<f32>::zeros((e, 2 * i + 2));
    let db_wrong = Array2::<f32>::zeros((e - 1, h));
    let edits: Vec<(&str, ExpertWeights)> = vec![
        (
            "gate_and_up_projs",
            ExpertWeights {
                gate_and_up_projs: odd.view(),
                ..w
            },
        ),
        (
            "gate_and_up_projs",
            ExpertWeights {
                gate_and_up_projs: wrong_h.view(),
                ..w
            },
        ),
        (
            "down_projs",
            ExpertWeights {
                down_projs: d_wrong_e.view(),
                ..w
            },
        ),
        (
            "gate_up_bias",
            ExpertWeights {
                gate_up_bias: Some(b_wrong.view()),
                ..w
            },
        ),
        (
            "down_bias",
            ExpertWeights {
                down_bias: Some(db_wrong.view()),
                ..w
            },
        ),
    ];
    for (tensor, bad) in &edits {
        names(experts_forward(xp.view(), &off, bad, &act), tensor);
        names(
            experts_backward(xp.view(), &off, bad, &act, &acts, gy.view()),
            tensor,
        );
    }
    // Saved activations and grad_y of another N.
    let short = Array2::<f32>::zeros((n - 1, h));
    names(
        experts_backward(xp.view(), &off, &w, &act, &acts, short.view()),
        "grad_y",
    );
    let mut bad_acts = acts.clone();
    bad_acts.a = Array2::zeros((n, 2 * i + 1));
    names(
        experts_backward(xp.view(), &off, &w, &act, &bad_acts, gy.view()),
        "acts.a",
    );
    let mut bad_acts = acts.clone();
    bad_acts.h = Array2::zeros((n - 1, i));
    names(
        experts_backward(xp.view(), &off, &w, &act, &bad_acts, gy.view()),
        "acts.h",
    );
    assert!(matches!(
        experts_forward(
            xp.view(),
            &off,
            &w,
            &Activation::ClampedSwiGlu { limit: -1.0 }
        ),
        Err(KernelError::InvalidConfig(_))
    ));

    // Combine / permute: row ids >= N, shape of row_of_slot, repeated rows, grad_out.
    let wts = Array2::<f32>::ones((3, 2));
    let ros = ndarray::array![[0usize, 1], [2, 3], [4, 5]];
    let oob = ndarray::array![[0usize, 1], [2, 3], [4, 9]];
    let dup = ndarray::array![[0usize, 1], [2, 3], [4, 1]];
    let y = acts.y.view();
    let go = Array2::<f32>::zeros((3, h));
    names(combine_forward(y, wts.view(), oob.view()), "row_of_slot");
    names(
        combine_forward(y, wts.view(), ros.slice(s![..2, ..])),
        "row_of_slot",
    );
    names(
        combine_backward(y, wts.view(), oob.view(), go.view()),
        "row_of_slot",
    );
    names(
        combine_backward(y, wts.view(), dup.view(), go.view()),
        "row_of_slot",
    );
    names(
        combine_backward(y, wts.view(), ros.view(), gy.view()),
        "grad_out",
    );
    names(permute_backward(y, oob.view()), "row_of_slot");
    names(permute_forward(xp.view(), &[0, 9]), "token_of_row");
    assert!(combine_backward(y, wts.view(), ros.view(), go.view()).is_ok());

    // Router: gate_weight of another H, biases of another E, routing and grad_weights shapes.
    let c: Case<f32> = Family::GptOss.case(1, 5, h, i, e);
    let cfg = Family::GptOss.config(e, 2);
    let x = c.x.view();
    let gw_bad = Array2::<f32>::zeros((e, h + 1));
    let b_bad = Array1::<f32>::zeros(e + 1);
    names(
        router_forward(x, gw_bad.view(), None, None, &cfg),
        "gate_weight",
    );
    let gw = c.gate_weight.view();
    names(
        router_forward(x, gw, Some(b_bad.view()), None, &cfg),
        "gate_bias",
    );
    let ds = Family::DeepseekV3.config(e, 2);
    names(
        router_forward(x, gw, None, Some(b_bad.view()), &ds),
        "e_score_correction_bias",
    );
    assert!(matches!(
        router_forward(x, gw, None, Some(Array1::zeros(e).view()), &cfg),
        Err(KernelError::InvalidConfig(_))
    ));
    let (_, routing) =
        router_forward(x, gw, c.gate_bias.as_ref().map(|b| b.view()), None, &cfg).unwrap();
    let dw = Array2::<f32>::zeros((5, 2));
    assert!(router_backward(x, gw, true, &cfg, &routing, dw.view()).is_ok());
    names(
        router_backward(x, gw, true, &cfg, &routing, dw.t()),
        "grad_weights",
    );
    names(
        router_backward(x, gw_bad.view(), true, &cfg, &routing, dw.view()),
        "gate_weight",
    );
    let mut r2 = routing.clone();
    r2.top_k_index[[0, 0]] = e;
    names(
        router_backward(x, gw, true, &cfg, &r2, dw.view()),
        "routing.top_k_index",
    );
    let mut r3 = routing.clone();
    r3.probs = Array2::zeros((5, e + 1));
    names(
        router_backward(x, gw, true, &cfg, &r3, dw.view()),
        "routing.probs",
    );
    let cfg3 = Family::GptOss.config(e, 3);
    names(
        router_backward(x, gw, true, &cfg3, &routing, dw.view()),
        "routing.top_k_index",
    );

    // Shared expert: weights of another H / Is, activations of another T, grad_out.
    let cs: Case<f32> = Family::Qwen3Next.case(1, 5, h, i, e);
    let sh = cs.shared.as_ref().unwrap();
    let s = SharedExpertParams {
        gate_proj: sh.gate_proj.view(),
        up_proj: sh.up_proj.view(),
        down_proj: sh.down_proj.view(),
        gate: sh.gate.as_ref().map(|g| g.view()),
    };
    let (_, sa) = shared_expert_forward(cs.x.view(), &s).unwrap();
    let up_bad = Array2::<f32>::zeros((4, h));
    let down_bad = Array2::<f32>::zeros((h, 4));
    let gate_bad = Array2::<f32>::zeros((2, h));
    for (tensor, bad) in [
        (
            "shared.up_proj",
            SharedExpertParams {
                up_proj: up_bad.view(),
                ..s
            },
        ),
        (
            "shared.down_proj",
            SharedExpertParams {
                down_proj: down_bad.view(),
                ..s
            },
        ),
        (
            "shared.gate",
            SharedExpertParams {
                gate: Some(gate_bad.view()),
                ..s
            },
        ),
    ] {
        names(shared_expert_forward(cs.x.view(), &bad), tensor);
    }
    let go5 = Array2::<f32>::zeros((5, h));
    assert!(shared_expert_backward(cs.x.view(), &s, &sa, go5.view()).is_ok());
    names(
        shared_expert_backward(cs.x.view(), &s, &sa, go.view()),
        "grad_out",
    );
    let x4 = cs.x.slice(s![..4, ..]);
    let go4 = Array2::<f32>::zeros((4, h));
    names(shared_expert_backward(x4, &s, &sa, go4.view()), "acts.g");
}
