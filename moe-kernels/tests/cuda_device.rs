//! Each CUDA kernel vs the CPU path on random shapes (T = 1, zero-token experts, k in 1..=8).
//! Without a CUDA driver / device (or NVRTC) it prints "skipped: no CUDA device" and passes.

use moe_kernels::cuda::{self, CudaMoe};
use moe_kernels::{softmax_topk, Permutation, RouterConfig};
use ndarray::{Array2, Array3, Axis};

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
}

fn device() -> Option<CudaMoe> {
    if !cuda::device_available() || !cuda::nvrtc_available() {
        println!("skipped: no CUDA device");
        return None;
    }
    match CudaMoe::new(0) {
        Ok(d) => Some(d),
        Err(e) => {
            println!("skipped: no CUDA device ({e})");
            None
        }
    }
}

fn close(a: &[f32], b: &[f32], tol: f32, what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: length");
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!(
            (x - y).abs() <= tol * (1.0 + y.abs()),
            "{what}[{i}]: gpu {x} cpu {y}"
        );
    }
}

fn bf16_bits(v: f32) -> u16 {
    (v.to_bits() >> 16) as u16
}

#[test]
fn no_device_is_an_error_not_a_panic() {
    if cuda::device_available() {
        return;
    }
    assert!(matches!(
        CudaMoe::new(0),
        Err(moe_kernels::KernelError::NoCudaDevice(_))
    ));
    println!("skipped: no CUDA device");
}

#[test]
fn kernels_match_cpu_path() {
    let Some(dev) = device() else { return };
    let s = dev.stream().clone();
    let mut rng = Lcg(7);
    for case in 0..24 {
        let tokens = if case % 4 == 0 { 1 } else { 1 + rng.usize(300) };
        let experts = 1 + rng.usize(16);
        let k = 1 + rng.usize(experts.min(8));
        let (hidden, inter) = if case % 3 == 0 {
            (8 * (1 + rng.usize(12)), 4 * (1 + rng.usize(20)))
        } else {
            (1 + rng.usize(96), 1 + rng.usize(80))
        };
        let cfg = RouterConfig {
            top_k: k,
            norm_topk_prob: case % 2 == 0,
        };
        // Router (a few ties forced by quantised logits).
        let logits = Array2::from_shape_fn((tokens, experts), |_| (rng.next() * 4.0).round());
        let cpu = softmax_topk(logits.view(), &cfg).unwrap();
        let d_logits = s.clone_htod(logits.as_slice().unwrap()).unwrap();
        let r = dev.softmax_topk(&d_logits, tokens, experts, &cfg).unwrap();
        let idx: Vec<u32> = s.clone_dtoh(&r.top_k_index).unwrap();
        let cpu_idx: Vec<u32> = cpu.top_k_index.iter().map(|&e| e as u32).collect();
        assert_eq!(idx, cpu_idx, "case {case}: top-k index");
        close(
            &s.clone_dtoh(&r.top_k_weights).unwrap(),
            cpu.top_k_weights.as_slice().unwrap(),
            1e-5,
            "weights",
        );
        close(
            &s.clone_dtoh(&r.probs).unwrap(),
            cpu.probs.as_slice().unwrap(),
            1e-5,
            "probs",
        );
        // Permutation (experts beyond the routed ones get zero tokens).
        let e_total = experts + 2;
        let perm = Permutation::from_top_k_index(cpu.top_k_index.view(), e_total).unwrap();
        let gp = dev.permutation(&r.top_k_index, tokens, k, e_total).unwrap();
        let u = |v: &[usize]| v.iter().map(|&x| x as u32).collect::<Vec<_>>();
        assert_eq!(s.clone_dtoh(&gp.counts).unwrap(), u(&perm.counts));
        assert_eq!(s.clone_dtoh(&gp.offsets).unwrap(), u(&perm.offsets));
        assert_eq!(s.clone_dtoh(&gp.row_of_slot).unwrap(), u(&perm.row_of_slot));
        assert_eq!(s.clone_dtoh(&gp.slot_of_row).unwrap(), u(&perm.slot_of_row));
        assert_eq!(
            s.clone_dtoh(&gp.token_of_row).unwrap(),
            u(&perm.token_of_rows())
        );
        // Gather, grouped GEMM (f32 and bf16), SwiGLU, combine.
        let n = tokens * k;
        let x = Array2::from_shape_fn((tokens, hidden), |_| rng.next());
        let xp =
            moe_kernels::fast::stages::permute_forward(x.view(), &perm.token_of_rows()).unwrap();
        let d_x = s.clone_htod(x.as_slice().unwrap()).unwrap();
        let d_xp = dev
            .gather_rows(&d_x, tokens, hidden, &gp.token_of_row, n)
            .unwrap();
        assert_eq!(
            s.clone_dtoh(&d_xp).unwrap(),
            xp.as_slice().unwrap().to_vec()
        );
        let w = Array3::from_shape_fn((e_total, hidden, 2 * inter), |_| rng.next() * 0.2);
        let mut a_cpu = Array2::<f32>::zeros((n, 2 * inter));
        for e in 0..e_total {
            let rows = perm.rows(e);
            let prod = xp
                .slice(ndarray::s![rows.clone(), ..])
                .dot(&w.index_axis(Axis(0), e));
            a_cpu.slice_mut(ndarray::s![rows, ..]).assign(&prod);
        }
        let d_w = s.clone_htod(w.as_slice().unwrap()).unwrap();
        let d_a = dev
            .grouped_gemm(&d_xp, n, hidden, &d_w, e_total, 2 * inter, &gp.offsets)
            .unwrap();
        close(
            &s.clone_dtoh(&d_a).unwrap(),
            a_cpu.as_slice().unwrap(),
            1e-4,
            "grouped_gemm",
        );
        // bf16: inputs rounded toward zero to bf16 on both sides.
        let xb: Vec<u16> = xp.iter().map(|&v| bf16_bits(v)).collect();
        let wb: Vec<u16> = w.iter().map(|&v| bf16_bits(v)).collect();
        let xr = Array2::from_shape_vec(
            (n, hidden),
            xb.iter()
                .map(|&b| f32::from_bits((b as u32) << 16))
                .collect(),
        )
        .unwrap();
        let wr = Array3::from_shape_vec(
            (e_total, hidden, 2 * inter),
            wb.iter()
                .map(|&b| f32::from_bits((b as u32) << 16))
                .collect(),
        )
        .unwrap();
        let mut ab_cpu = Array2::<f32>::zeros((n, 2 * inter));
        for e in 0..e_total {
            let rows = perm.rows(e);
            let prod = xr
                .slice(ndarray::s![rows.clone(), ..])
                .dot(&wr.index_axis(Axis(0), e));
            ab_cpu.slice_mut(ndarray::s![rows, ..]).assign(&prod);
        }
        let d_ab = dev
            .grouped_gemm_bf16(
                &s.clone_htod(&xb).unwrap(),
                n,
                hidden,
                &s.clone_htod(&wb).unwrap(),
                e_total,
                2 * inter,
                &gp.offsets,
            )
            .unwrap();
        close(
            &s.clone_dtoh(&d_ab).unwrap(),
            ab_cpu.as_slice().unwrap(),
            1e-4,
            "grouped_gemm_bf16",
        );
        // Tensor-core variant, both the cp.async (K, Nout multiples of 8) and scalar-load paths.
        let d_am = dev
            .grouped_gemm_bf16_mma(
                &s.clone_htod(&xb).unwrap(),
                n,
                hidden,
                &s.clone_htod(&wb).unwrap(),
                e_total,
                2 * inter,
                &gp.offsets,
            )
            .unwrap();
        close(
            &s.clone_dtoh(&d_am).unwrap(),
            ab_cpu.as_slice().unwrap(),
            1e-3,
            "grouped_gemm_bf16_mma",
        );
        let h_cpu: Vec<f32> = (0..n * inter)
            .map(|i| {
                moe_kernels::swiglu(
                    a_cpu[[i / inter, i % inter]],
                    a_cpu[[i / inter, inter + i % inter]],
                )
            })
            .collect();
        let d_h = dev.swiglu(&d_a, n, inter).unwrap();
        close(&s.clone_dtoh(&d_h).unwrap(), &h_cpu, 1e-4, "swiglu");
        let y = Array2::from_shape_fn((n, hidden), |_| rng.next());
        let out = moe_kernels::fast::stages::combine_forward(
            y.view(),
            cpu.top_k_weights.view(),
            perm.row_of_slot_matrix().view(),
        )
        .unwrap();
        let d_y = s.clone_htod(y.as_slice().unwrap()).unwrap();
        let d_out = dev
            .combine(
                &d_y,
                n,
                hidden,
                &r.top_k_weights,
                &gp.row_of_slot,
                tokens,
                k,
            )
            .unwrap();
        close(
            &s.clone_dtoh(&d_out).unwrap(),
            out.as_slice().unwrap(),
            1e-5,
            "combine",
        );
        // Bad shapes are errors before launch.
        assert!(dev
            .grouped_gemm(&d_xp, n + 1, hidden, &d_w, e_total, 2 * inter, &gp.offsets)
            .is_err());
        assert!(dev.swiglu(&d_a, n, inter + 1).is_err());
    }
}

/// Top-k indexes `[T, k]` with distinct experts per token; expert `E - 1` is never used (and
/// others may not be).
fn random_topk(rng: &mut Lcg, tokens: usize, experts: usize, k: usize) -> Array2<usize> {
    let used = experts - 1;
    let mut out = Array2::<usize>::zeros((tokens, k));
    for t in 0..tokens {
        let mut row: Vec<usize> = Vec::new();
        for _ in 0..k {
            let mut e = rng.usize(used);
            while row.contains(&e) {
                e = (e + 1) % used;
            }
            row.push(e);
        }
        for (j, e) in row.into_iter().enumerate() {
            out[[t, j]] = e;
        }
    }
    out
}

#[test]
fn backward_kernels_match_cpu_path() {
    use moe_kernels::fast::stages::{self, ExpertWeights};
    use moe_kernels::Activation;
    let Some(dev) = device() else { return };
    let s = dev.stream().clone();
    let mut rng = Lcg(11);
    let acts = [
        Activation::SwiGlu,
        Activation::GptOssGlu {
            limit: 0.5,
            alpha: 1.702,
        },
        Activation::ClampedSwiGlu { limit: 0.05 },
    ];
    for case in 0..18 {
        let act = acts[case % 3];
        let tokens = if case % 5 == 0 { 1 } else { 1 + rng.usize(200) };
        let experts = 2 + rng.usize(12);
        let k = 1 + rng.usize((experts - 1).min(6));
        let (hidden, inter) = (1 + rng.usize(90), 1 + rng.usize(70));
        let top = random_topk(&mut rng, tokens, experts, k);
        let perm = Permutation::from_top_k_index(top.view(), experts).unwrap();
        let top_u: Vec<u32> = top.iter().map(|&e| e as u32).collect();
        let gp = dev
            .permutation(&s.clone_htod(&top_u).unwrap(), tokens, k, experts)
            .unwrap();
        let n = tokens * k;
        let xp = Array2::from_shape_fn((n, hidden), |_| rng.next());
        let wgu = Array3::from_shape_fn((experts, hidden, 2 * inter), |_| rng.next() * 0.3);
        let wd = Array3::from_shape_fn((experts, inter, hidden), |_| rng.next() * 0.3);
        let bgu = Array2::from_shape_fn((experts, 2 * inter), |_| rng.next() * 0.1);
        let bd = Array2::from_shape_fn((experts, hidden), |_| rng.next() * 0.1);
        let biased = case % 2 == 0;
        let w = ExpertWeights {
            gate_and_up_projs: wgu.view(),
            down_projs: wd.view(),
            gate_up_bias: biased.then(|| bgu.view()),
            down_bias: biased.then(|| bd.view()),
        };
        let fwd = stages::experts_forward(xp.view(), &perm.offsets, &w, &act).unwrap();
        let dy = Array2::from_shape_fn((n, hidden), |_| rng.next());
        let grads =
            stages::experts_backward(xp.view(), &perm.offsets, &w, &act, &fwd, dy.view()).unwrap();
        let up = |a: &[f32]| s.clone_htod(a).unwrap();
        let (d_xp, d_wgu, d_wd, d_dy) = (
            up(xp.as_slice().unwrap()),
            up(wgu.as_slice().unwrap()),
            up(wd.as_slice().unwrap()),
            up(dy.as_slice().unwrap()),
        );
        let (d_bgu, d_bd) = (up(bgu.as_slice().unwrap()), up(bd.as_slice().unwrap()));
        let off = &gp.offsets;
        // Forward with biases and the activation.
        let mut d_a = dev
            .grouped_gemm(&d_xp, n, hidden, &d_wgu, experts, 2 * inter, off)
            .unwrap();
        if biased {
            dev.add_row_bias(&mut d_a, n, 2 * inter, &d_bgu, off, experts)
                .unwrap();
        }
        close(
            &s.clone_dtoh(&d_a).unwrap(),
            fwd.a.as_slice().unwrap(),
            1e-4,
            "a",
        );
        let d_h = dev.glu(&d_a, n, inter, &act).unwrap();
        close(
            &s.clone_dtoh(&d_h).unwrap(),
            fwd.h.as_slice().unwrap(),
            1e-4,
            "h",
        );
        let mut d_y = dev
            .grouped_gemm(&d_h, n, inter, &d_wd, experts, hidden, off)
            .unwrap();
        if biased {
            dev.add_row_bias(&mut d_y, n, hidden, &d_bd, off, experts)
                .unwrap();
        }
        close(
            &s.clone_dtoh(&d_y).unwrap(),
            fwd.y.as_slice().unwrap(),
            1e-4,
            "y",
        );
        // Backward (use the CPU a so that clamp masks agree bit for bit).
        let d_a_cpu = up(fwd.a.as_slice().unwrap());
        let d_h_cpu = up(fwd.h.as_slice().unwrap());
        let d_dwd = dev
            .grouped_gemm_tn(&d_h_cpu, n, inter, &d_dy, hidden, off, experts)
            .unwrap();
        close(
            &s.clone_dtoh(&d_dwd).unwrap(),
            grads.down_projs.as_slice().unwrap(),
            1e-4,
            "dW_d",
        );
        let d_dh = dev
            .grouped_gemm_nt(&d_dy, n, hidden, &d_wd, experts, inter, off)
            .unwrap();
        let d_da = dev.glu_backward(&d_a_cpu, &d_dh, n, inter, &act).unwrap();
        let d_dwgu = dev
            .grouped_gemm_tn(&d_xp, n, hidden, &d_da, 2 * inter, off, experts)
            .unwrap();
        close(
            &s.clone_dtoh(&d_dwgu).unwrap(),
            grads.gate_and_up_projs.as_slice().unwrap(),
            1e-3,
            "dW_gu",
        );
        // Experts with zero rows: exact zeros.
        let dwgu: Vec<f32> = s.clone_dtoh(&d_dwgu).unwrap();
        for e in (0..experts).filter(|&e| perm.counts[e] == 0) {
            let block = hidden * 2 * inter;
            assert!(dwgu[e * block..(e + 1) * block].iter().all(|&v| v == 0.0));
        }
        let d_gxp = dev
            .grouped_gemm_nt(&d_da, n, 2 * inter, &d_wgu, experts, hidden, off)
            .unwrap();
        close(
            &s.clone_dtoh(&d_gxp).unwrap(),
            grads.grad_xp.as_slice().unwrap(),
            1e-3,
            "grad_xp",
        );
        if biased {
            let dbd = dev.grouped_row_sum(&d_dy, n, hidden, off, experts).unwrap();
            close(
                &s.clone_dtoh(&dbd).unwrap(),
                grads.down_bias.as_ref().unwrap().as_slice().unwrap(),
                1e-4,
                "db_d",
            );
            let dbgu = dev
                .grouped_row_sum(&d_da, n, 2 * inter, off, experts)
                .unwrap();
            close(
                &s.clone_dtoh(&dbgu).unwrap(),
                grads.gate_up_bias.as_ref().unwrap().as_slice().unwrap(),
                1e-3,
                "db_gu",
            );
        }
        // Permutation and combine backward.
        let ros = perm.row_of_slot_matrix();
        let gx = stages::permute_backward(grads.grad_xp.view(), ros.view()).unwrap();
        let d_gx = dev
            .permute_backward(
                &up(grads.grad_xp.as_slice().unwrap()),
                n,
                hidden,
                &gp.row_of_slot,
                tokens,
                k,
            )
            .unwrap();
        close(
            &s.clone_dtoh(&d_gx).unwrap(),
            gx.as_slice().unwrap(),
            1e-5,
            "grad_x",
        );
        let weights = Array2::from_shape_fn((tokens, k), |_| rng.next());
        let gout = Array2::from_shape_fn((tokens, hidden), |_| rng.next());
        let (gy, gw) =
            stages::combine_backward(fwd.y.view(), weights.view(), ros.view(), gout.view())
                .unwrap();
        let (d_gy, d_gw) = dev
            .combine_backward(
                &up(fwd.y.as_slice().unwrap()),
                hidden,
                &up(weights.as_slice().unwrap()),
                &gp.row_of_slot,
                &gp.slot_of_row,
                &up(gout.as_slice().unwrap()),
                tokens,
                k,
            )
            .unwrap();
        close(
            &s.clone_dtoh(&d_gy).unwrap(),
            gy.as_slice().unwrap(),
            1e-6,
            "grad_y",
        );
        close(
            &s.clone_dtoh(&d_gw).unwrap(),
            gw.as_slice().unwrap(),
            1e-4,
            "grad_w",
        );
        // Bad shapes are errors before launch.
        assert!(dev
            .grouped_gemm_tn(&d_xp, n, hidden + 1, &d_dy, hidden, off, experts)
            .is_err());
        assert!(dev
            .glu_backward(&d_a_cpu, &d_dh, n, inter + 1, &act)
            .is_err());
    }
}

#[test]
fn routers_match_cpu_path() {
    use moe_kernels::RouterKind;
    let Some(dev) = device() else { return };
    let s = dev.stream().clone();
    let mut rng = Lcg(5);
    for case in 0..24 {
        let tokens = if case % 4 == 0 { 1 } else { 1 + rng.usize(300) };
        let n_group = [1, 2, 4, 8][case % 4];
        let experts = n_group * (2 + rng.usize(8));
        let k = 1 + rng.usize(experts.min(8));
        let kind = match case % 3 {
            0 => RouterKind::TopKSoftmax,
            1 => RouterKind::SigmoidGroupLimited {
                n_group,
                topk_group: 1 + rng.usize(n_group),
                norm_topk_prob: case % 2 == 0,
                routed_scaling_factor: 2.5,
            },
            _ => RouterKind::SigmoidTopK {
                routed_scaling_factor: 3.0,
            },
        };
        // Quantised logits and bias force ties.
        let logits = Array2::from_shape_fn((tokens, experts), |_| (rng.next() * 4.0).round());
        let bias = ndarray::Array1::from_shape_fn(experts, |_| (rng.next() * 2.0).round() * 0.25);
        let with_bias = case % 2 == 1;
        let d_logits = s.clone_htod(logits.as_slice().unwrap()).unwrap();
        let d_bias = s.clone_htod(bias.as_slice().unwrap()).unwrap();
        let cpu = if matches!(kind, RouterKind::TopKSoftmax) {
            let z = if with_bias {
                &logits + &bias
            } else {
                logits.clone()
            };
            moe_kernels::route(z.view(), &kind, k, None).unwrap()
        } else {
            moe_kernels::route(logits.view(), &kind, k, with_bias.then(|| bias.view())).unwrap()
        };
        let g = dev
            .route(
                &d_logits,
                tokens,
                experts,
                &kind,
                k,
                with_bias.then_some(&d_bias),
            )
            .unwrap();
        let idx: Vec<u32> = s.clone_dtoh(&g.top_k_index).unwrap();
        let cpu_idx: Vec<u32> = cpu.top_k_index.iter().map(|&e| e as u32).collect();
        assert_eq!(idx, cpu_idx, "case {case} {kind:?}: top-k index");
        close(
            &s.clone_dtoh(&g.top_k_weights).unwrap(),
            cpu.top_k_weights.as_slice().unwrap(),
            1e-5,
            "weights",
        );
        close(
            &s.clone_dtoh(&g.probs).unwrap(),
            cpu.probs.as_slice().unwrap(),
            1e-5,
            "probs",
        );
    }
}
