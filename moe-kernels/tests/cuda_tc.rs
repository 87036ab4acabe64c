//! The tensor-core grouped GEMMs (`grouped_gemm_tc.cu`: gathered forward, GLU and routing-weight
//! epilogues, dX and K-grouped dW), the router backward and the fused layer
//! (`CudaMoe::moe_forward` / `moe_backward`) against naive CPU loops and the fast CPU path on
//! bf16-exact inputs: random shapes including zero-row experts, one expert taking every row,
//! T = 1, k up to 8, sizes that are not multiples of the tile (and K not a multiple of 8: the
//! scalar-load path); bitwise determinism across two runs. Without a CUDA device it prints
//! "skipped: no CUDA device" and passes; before sm_80 "skipped: tensor cores need sm_80".

use moe_kernels::cuda::{self, CudaMoe, GpuMoeDims, GpuMoeParams};
use moe_kernels::routing::{route, route_backward};
use moe_kernels::{fast, Activation, KernelError, MoeConfig, MoeParams, Permutation, RouterKind};
use ndarray::{Array1, Array2, Array3};

struct Lcg(u64);
impl Lcg {
    fn next(&mut self) -> f32 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
    fn usize(&mut self, n: usize) -> usize {
        ((self.next() + 1.0) * 0.5 * n as f32) as usize % n
    }
    /// A bf16-exact value in [-scale, scale).
    fn b(&mut self, scale: f32) -> f32 {
        bf16_round(self.next() * scale)
    }
}

fn bf16_round(v: f32) -> f32 {
    f32::from_bits(v.to_bits() & 0xffff_0000)
}

fn bits(v: &[f32]) -> Vec<u16> {
    v.iter().map(|x| (x.to_bits() >> 16) as u16).collect()
}

fn device() -> Option<CudaMoe> {
    if !cuda::device_available() || !cuda::nvrtc_available() {
        println!("skipped: no CUDA device");
        return None;
    }
    let dev = match CudaMoe::new(0) {
        Ok(d) => d,
        Err(e) => {
            println!("skipped: no CUDA device ({e})");
            return None;
        }
    };
    if dev.sm() < 80 {
        println!("skipped: tensor cores need sm_80 ({})", dev.arch());
        return None;
    }
    Some(dev)
}

/// `max |a - b| <= tol (1 + max |b|)`.
fn close(a: &[f32], b: &[f32], tol: f32, what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: length");
    let scale = 1.0 + b.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!(
            (x - y).abs() <= tol * scale,
            "{what}[{i}]: gpu {x} cpu {y} (scale {scale})"
        );
    }
}

/// Per-expert row counts with zero-row experts and, in some cases, one expert taking all rows.
fn offsets(rng: &mut Lcg, rows: usize, experts: usize, all_to_one: bool) -> Vec<usize> {
    let mut counts = vec![0usize; experts];
    for _ in 0..rows {
        let e = if all_to_one {
            experts - 1
        } else {
            rng.usize(experts)
        };
        counts[e] += 1;
    }
    if experts > 2 && !all_to_one {
        let moved = counts[1];
        counts[1] = 0;
        counts[0] += moved;
    }
    let mut off = vec![0];
    for c in counts {
        off.push(off.last().unwrap() + c);
    }
    off
}

fn expert_of(off: &[usize], r: usize) -> usize {
    off.windows(2).position(|w| w[0] <= r && r < w[1]).unwrap()
}

#[test]
fn tensor_core_gemms_match_naive_loops() {
    let Some(dev) = device() else { return };
    let s = dev.stream().clone();
    let mut rng = Lcg(11);
    for case in 0..12 {
        let rows = if case == 0 { 1 } else { 1 + rng.usize(700) };
        let experts = 1 + rng.usize(9);
        // Multiples of 8 (cp.async path) most of the time, odd sizes (plain loads) otherwise.
        let (kdim, nout) = if case % 4 == 3 {
            (1 + rng.usize(150), 1 + rng.usize(150))
        } else {
            (8 * (1 + rng.usize(40)), 8 * (1 + rng.usize(40)))
        };
        let off = offsets(&mut rng, rows, experts, case % 5 == 4);
        let tokens = 1 + rng.usize(rows);
        let x: Vec<f32> = (0..tokens * kdim).map(|_| rng.b(1.0)).collect();
        let tor: Vec<u32> = (0..rows).map(|_| rng.usize(tokens) as u32).collect();
        let w: Vec<f32> = (0..experts * kdim * nout).map(|_| rng.b(0.5)).collect();
        let bias: Vec<f32> = (0..experts * nout).map(|_| rng.next()).collect();
        let off_u: Vec<u32> = off.iter().map(|&v| v as u32).collect();
        let (d_x, d_w) = (
            s.clone_htod(&bits(&x)).unwrap(),
            s.clone_htod(&bits(&w)).unwrap(),
        );
        let d_tor = s.clone_htod(&tor).unwrap();
        let d_off = s.clone_htod(&off_u).unwrap();
        let d_bias = s.clone_htod(&bias).unwrap();
        // Gathered forward with bias vs the naive loop.
        let mut want = vec![0.0f32; rows * nout];
        for r in 0..rows {
            let (e, t) = (expert_of(&off, r), tor[r] as usize);
            for c in 0..nout {
                let mut acc = 0.0f64;
                for q in 0..kdim {
                    acc += x[t * kdim + q] as f64 * w[(e * kdim + q) * nout + c] as f64;
                }
                want[r * nout + c] = acc as f32 + bias[e * nout + c];
            }
        }
        let run = || {
            let c = dev
                .tc_grouped_gemm(
                    &d_x,
                    tokens,
                    kdim,
                    Some(&d_tor),
                    rows,
                    &d_w,
                    experts,
                    nout,
                    &d_off,
                    Some(&d_bias),
                )
                .unwrap();
            s.clone_dtoh(&c).unwrap()
        };
        let got = run();
        close(&got, &want, 1e-5, &format!("case {case}: gathered forward"));
        assert_eq!(got, run(), "case {case}: bitwise determinism");

        // dX-type: c = a @ w[e]^T with w read as [E, Nout' = kdim, K' = nout].
        let a: Vec<f32> = (0..rows * nout).map(|_| rng.b(1.0)).collect();
        let d_a = s.clone_htod(&bits(&a)).unwrap();
        let got = s
            .clone_dtoh(
                &dev.tc_grouped_gemm_nt(&d_a, rows, nout, &d_w, experts, kdim, &d_off)
                    .unwrap(),
            )
            .unwrap();
        let mut want = vec![0.0f32; rows * kdim];
        for r in 0..rows {
            let e = expert_of(&off, r);
            for c in 0..kdim {
                let mut acc = 0.0f64;
                for q in 0..nout {
                    acc += a[r * nout + q] as f64 * w[(e * kdim + c) * nout + q] as f64;
                }
                want[r * kdim + c] = acc as f32;
            }
        }
        close(&got, &want, 1e-5, &format!("case {case}: dX (nt)"));

        // dW-type: c[e] = xp[rows_e]^T @ a[rows_e]; zero-row experts give exact zeros.
        let xp: Vec<f32> = (0..rows * kdim).map(|_| rng.b(1.0)).collect();
        let d_xp = s.clone_htod(&bits(&xp)).unwrap();
        let got = s
            .clone_dtoh(
                &dev.tc_grouped_gemm_tn(&d_xp, &d_a, rows, kdim, nout, &d_off, experts)
                    .unwrap(),
            )
            .unwrap();
        let mut want = vec![0.0f32; experts * kdim * nout];
        for e in 0..experts {
            for m in 0..kdim {
                for c in 0..nout {
                    let mut acc = 0.0f64;
                    for r in off[e]..off[e + 1] {
                        acc += xp[r * kdim + m] as f64 * a[r * nout + c] as f64;
                    }
                    want[(e * kdim + m) * nout + c] = acc as f32;
                }
            }
        }
        close(&got, &want, 1e-5, &format!("case {case}: dW (tn)"));
        for e in 0..experts {
            if off[e] == off[e + 1] {
                let blk = &got[e * kdim * nout..(e + 1) * kdim * nout];
                assert!(
                    blk.iter().all(|&v| v == 0.0),
                    "case {case}: expert {e} zeros"
                );
            }
        }
    }
}

#[test]
fn glu_and_down_epilogues_match_the_cpu_stages() {
    let Some(dev) = device() else { return };
    let s = dev.stream().clone();
    let mut rng = Lcg(23);
    let acts = [
        Activation::SwiGlu,
        Activation::GptOssGlu {
            alpha: 1.702,
            limit: 7.0,
        },
        Activation::ClampedSwiGlu { limit: 5.0 },
    ];
    for (case, act) in acts.iter().enumerate() {
        let (tokens, hidden, inter, experts, k) = (37 + 50 * case, 48, 24 + 40 * case, 5, 3);
        let x = Array2::from_shape_fn((tokens, hidden), |_| rng.b(1.0));
        let wgu = Array3::from_shape_fn((experts, hidden, 2 * inter), |_| rng.b(0.3));
        let wd = Array3::from_shape_fn((experts, inter, hidden), |_| rng.b(0.3));
        let bgu = Array2::from_shape_fn((experts, 2 * inter), |_| rng.next());
        let bd = Array2::from_shape_fn((experts, hidden), |_| rng.next());
        let idx = Array2::from_shape_fn((tokens, k), |(t, j)| (t + 2 * j) % experts);
        let wts = Array2::from_shape_fn((tokens, k), |_| rng.next().abs());
        let perm = Permutation::from_top_k_index(idx.view(), experts).unwrap();
        let tor = perm.token_of_rows();
        let n = tokens * k;
        // CPU: the fast stages on the same bf16-exact values.
        let xp = fast::permute_forward(x.view(), &tor).unwrap();
        let w = fast::ExpertWeights {
            gate_and_up_projs: wgu.view(),
            down_projs: wd.view(),
            gate_up_bias: Some(bgu.view()),
            down_bias: Some(bd.view()),
        };
        let cpu = fast::experts_forward(xp.view(), &perm.offsets, &w, act).unwrap();
        let u32s = |v: &[usize]| v.iter().map(|&x| x as u32).collect::<Vec<_>>();
        let d_x = s.clone_htod(&bits(x.as_slice().unwrap())).unwrap();
        let d_tor = s.clone_htod(&u32s(&tor)).unwrap();
        let d_off = s.clone_htod(&u32s(&perm.offsets)).unwrap();
        let d_wgu = s.clone_htod(&bits(wgu.as_slice().unwrap())).unwrap();
        let d_wd = s.clone_htod(&bits(wd.as_slice().unwrap())).unwrap();
        let d_bgu = s.clone_htod(bgu.as_slice().unwrap()).unwrap();
        let d_bd = s.clone_htod(bd.as_slice().unwrap()).unwrap();
        let glu = dev
            .tc_gate_up_glu(
                &d_x,
                tokens,
                hidden,
                Some(&d_tor),
                n,
                &d_wgu,
                experts,
                inter,
                &d_off,
                Some(&d_bgu),
                act,
            )
            .unwrap();
        close(
            &s.clone_dtoh(&glu.a).unwrap(),
            cpu.a.as_slice().unwrap(),
            1e-5,
            "a",
        );
        let h = s.clone_dtoh(&glu.h).unwrap();
        close(&h, cpu.h.as_slice().unwrap(), 1e-5, "h");
        let h_b: Vec<u16> = s.clone_dtoh(&glu.h_bf16).unwrap();
        // h_bf16 is h rounded to nearest even (half's bf16::from_f32 is the reference).
        for (i, (&hb, &hf)) in h_b.iter().zip(&h).enumerate() {
            assert_eq!(
                hb,
                half::bf16::from_f32(hf).to_bits(),
                "h_bf16[{i}] of {hf}"
            );
        }
        // Down projection on the bf16 h, with the routing weight in the epilogue.
        let h_round = Array2::from_shape_vec(
            (n, inter),
            h_b.iter()
                .map(|&b| f32::from_bits((b as u32) << 16))
                .collect(),
        )
        .unwrap();
        let mut y_cpu = Array2::<f32>::zeros((n, hidden));
        fast::grouped::grouped_matmul(&mut y_cpu, h_round.view(), &perm.offsets, |e| {
            wd.index_axis(ndarray::Axis(0), e)
        })
        .unwrap();
        for r in 0..n {
            let e = expert_of(&perm.offsets, r);
            for c in 0..hidden {
                y_cpu[[r, c]] += bd[[e, c]];
            }
        }
        let d_w = s.clone_htod(wts.as_slice().unwrap()).unwrap();
        let d_slot = s.clone_htod(&u32s(&perm.slot_of_row)).unwrap();
        let (y, yw) = dev
            .tc_down_proj(
                &glu.h_bf16,
                n,
                inter,
                &d_wd,
                experts,
                hidden,
                &d_off,
                Some(&d_bd),
                Some((&d_w, &d_slot)),
            )
            .unwrap();
        let y = s.clone_dtoh(&y).unwrap();
        close(&y, y_cpu.as_slice().unwrap(), 1e-5, "y");
        let yw = s.clone_dtoh(&yw.unwrap()).unwrap();
        let flat_w = wts.as_slice().unwrap();
        for r in 0..n {
            let wr = flat_w[perm.slot_of_row[r]];
            for c in 0..hidden {
                assert_eq!(yw[r * hidden + c], wr * y[r * hidden + c], "yw[{r}, {c}]");
            }
        }
        // Combine of the weighted rows vs the CPU combine.
        let row_of_slot = perm.row_of_slot_matrix();
        let d_ros = s
            .clone_htod(&row_of_slot.iter().map(|&r| r as u32).collect::<Vec<_>>())
            .unwrap();
        let d_yw = s.clone_htod(&yw).unwrap();
        let out = dev
            .permute_backward(&d_yw, n, hidden, &d_ros, tokens, k)
            .unwrap();
        let y_arr = Array2::from_shape_vec((n, hidden), y).unwrap();
        let cpu_out = fast::combine_forward(y_arr.view(), wts.view(), row_of_slot.view()).unwrap();
        close(
            &s.clone_dtoh(&out).unwrap(),
            cpu_out.as_slice().unwrap(),
            1e-6,
            "combine of yw",
        );
    }
}

fn router_kinds() -> Vec<RouterKind> {
    vec![
        RouterKind::SoftmaxTopK {
            norm_topk_prob: true,
        },
        RouterKind::SoftmaxTopK {
            norm_topk_prob: false,
        },
        RouterKind::TopKSoftmax,
        RouterKind::SigmoidGroupLimited {
            n_group: 4,
            topk_group: 2,
            norm_topk_prob: true,
            routed_scaling_factor: 2.5,
        },
        RouterKind::SigmoidTopK {
            routed_scaling_factor: 1.5,
        },
    ]
}

#[test]
fn route_backward_matches_cpu() {
    let Some(dev) = device() else { return };
    let s = dev.stream().clone();
    let mut rng = Lcg(31);
    for kind in router_kinds() {
        let (tokens, experts, k) = (1 + rng.usize(200), 16, 1 + rng.usize(8));
        let logits = Array2::from_shape_fn((tokens, experts), |_| rng.next() * 3.0);
        let cpu = route(logits.view(), &kind, k, None).unwrap();
        let dw = Array2::from_shape_fn((tokens, k), |_| rng.next());
        let want = route_backward(&kind, &cpu, dw.view()).unwrap();
        let d_logits = s.clone_htod(logits.as_slice().unwrap()).unwrap();
        let g = dev
            .route(&d_logits, tokens, experts, &kind, k, None)
            .unwrap();
        let d_dw = s.clone_htod(dw.as_slice().unwrap()).unwrap();
        let dz = dev
            .route_backward(&kind, &g, &d_dw, tokens, experts, k)
            .unwrap();
        close(
            &s.clone_dtoh(&dz).unwrap(),
            want.as_slice().unwrap(),
            1e-5,
            &format!("{kind:?}: dz"),
        );
        let bad = s.clone_htod(&vec![0.0f32; tokens * k + 1]).unwrap();
        assert!(matches!(
            dev.route_backward(&kind, &g, &bad, tokens, experts, k),
            Err(KernelError::ShapeMismatch {
                tensor: "grad_weights",
                ..
            })
        ));
    }
}

#[test]
fn fused_layer_matches_fast_path() {
    let Some(dev) = device() else { return };
    let s = dev.stream().clone();
    let mut rng = Lcg(47);
    for (case, kind) in router_kinds().into_iter().enumerate() {
        let (t, h, i, e) = (1 + rng.usize(150), 64, 40, 8);
        let k = 1 + rng.usize(4);
        let gpt = matches!(kind, RouterKind::TopKSoftmax);
        let cfg = MoeConfig {
            router: kind,
            top_k: k,
            activation: if gpt {
                Activation::GptOssGlu {
                    alpha: 1.702,
                    limit: 7.0,
                }
            } else {
                Activation::SwiGlu
            },
        };
        let x = Array2::from_shape_fn((t, h), |_| rng.b(1.0));
        let gate = Array2::from_shape_fn((e, h), |_| rng.next() * 0.3);
        let gate_b = Array1::from_shape_fn(e, |_| rng.next());
        let wgu = Array3::from_shape_fn((e, h, 2 * i), |_| rng.b(0.2));
        let wd = Array3::from_shape_fn((e, i, h), |_| rng.b(0.2));
        let bgu = Array2::from_shape_fn((e, 2 * i), |_| rng.next() * 0.1);
        let bd = Array2::from_shape_fn((e, h), |_| rng.next() * 0.1);
        let p = MoeParams {
            gate_weight: gate.view(),
            gate_bias: gpt.then(|| gate_b.view()),
            e_score_correction_bias: None,
            gate_and_up_projs: wgu.view(),
            down_projs: wd.view(),
            gate_up_bias: gpt.then(|| bgu.view()),
            down_bias: gpt.then(|| bd.view()),
            shared: None,
        };
        let cpu = fast::moe_forward(x.view(), &p, &cfg).unwrap();
        let go = Array2::from_shape_fn((t, h), |_| rng.next());
        let cpu_g = fast::moe_backward(x.view(), &p, &cfg, &cpu, go.view()).unwrap();

        let up = |a: &[f32]| s.clone_htod(a).unwrap();
        let (d_x, d_gate, d_gb) = (
            up(x.as_slice().unwrap()),
            up(gate.as_slice().unwrap()),
            up(gate_b.as_slice().unwrap()),
        );
        let d_wgu = s.clone_htod(&bits(wgu.as_slice().unwrap())).unwrap();
        let d_wd = s.clone_htod(&bits(wd.as_slice().unwrap())).unwrap();
        let (d_bgu, d_bd) = (up(bgu.as_slice().unwrap()), up(bd.as_slice().unwrap()));
        let gp = GpuMoeParams {
            gate_weight: &d_gate,
            gate_bias: gpt.then_some(&d_gb),
            e_score_correction_bias: None,
            gate_and_up_projs: &d_wgu,
            down_projs: &d_wd,
            gate_up_bias: gpt.then_some(&d_bgu),
            down_bias: gpt.then_some(&d_bd),
        };
        let dims = GpuMoeDims {
            tokens: t,
            hidden: h,
            inter: i,
            experts: e,
        };
        let fwd = dev.moe_forward(&d_x, dims, &gp, &cfg).unwrap();
        let idx: Vec<u32> = s.clone_dtoh(&fwd.routing.top_k_index).unwrap();
        let cpu_idx: Vec<u32> = cpu.routing.top_k_index.iter().map(|&v| v as u32).collect();
        assert_eq!(idx, cpu_idx, "case {case}: routing");
        // h is rounded to bf16 before the down projection on the device: bf16 tolerance.
        let out = s.clone_dtoh(&fwd.output).unwrap();
        close(
            &out,
            cpu.output.as_slice().unwrap(),
            1e-2,
            &format!("case {case}: output"),
        );
        let fwd2 = dev.moe_forward(&d_x, dims, &gp, &cfg).unwrap();
        assert_eq!(
            out,
            s.clone_dtoh(&fwd2.output).unwrap(),
            "case {case}: bitwise"
        );

        let d_go = up(go.as_slice().unwrap());
        let g = dev
            .moe_backward(dims, &gp, &cfg, &d_x, &fwd, &d_go)
            .unwrap();
        let cmp = |dv: &cudarc::driver::CudaSlice<f32>, want: &[f32], name: &str| {
            close(
                &s.clone_dtoh(dv).unwrap(),
                want,
                2e-2,
                &format!("case {case}: {name}"),
            );
        };
        cmp(
            &g.grad_input,
            cpu_g.grad_input.as_slice().unwrap(),
            "grad_input",
        );
        cmp(
            &g.gate_weight,
            cpu_g.gate_weight.as_slice().unwrap(),
            "gate_weight",
        );
        cmp(
            &g.gate_and_up_projs,
            cpu_g.gate_and_up_projs.as_slice().unwrap(),
            "gate_and_up_projs",
        );
        cmp(
            &g.down_projs,
            cpu_g.down_projs.as_slice().unwrap(),
            "down_projs",
        );
        if gpt {
            cmp(
                g.gate_bias.as_ref().unwrap(),
                cpu_g.gate_bias.as_ref().unwrap().as_slice().unwrap(),
                "gate_bias",
            );
            cmp(
                g.gate_up_bias.as_ref().unwrap(),
                cpu_g.gate_up_bias.as_ref().unwrap().as_slice().unwrap(),
                "gate_up_bias",
            );
            cmp(
                g.down_bias.as_ref().unwrap(),
                cpu_g.down_bias.as_ref().unwrap().as_slice().unwrap(),
                "down_bias",
            );
        }
        let g2 = dev
            .moe_backward(dims, &gp, &cfg, &d_x, &fwd, &d_go)
            .unwrap();
        assert_eq!(
            s.clone_dtoh(&g.gate_and_up_projs).unwrap(),
            s.clone_dtoh(&g2.gate_and_up_projs).unwrap(),
            "case {case}: dW bitwise"
        );
        // A wrong-length input is an error naming it.
        let bad = up(&vec![0.0f32; t * h + 1]);
        assert!(matches!(
            dev.moe_forward(&bad, dims, &gp, &cfg),
            Err(KernelError::ShapeMismatch { tensor: "x", .. })
        ));
    }
}
