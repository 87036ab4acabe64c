//! Benchmark: the fast grouped-GEMM MoE block vs the reference per-expert loop on
//! Qwen3-30B-A3B-shaped layers (H=2048, I=768, E=128, k=8, SwiGLU, softmax top-k with renorm),
//! forward and forward+backward, in GFLOP/s of expert-GEMM work (forward 6*T*k*H*I FLOP,
//! backward twice that; the router GEMM and element-wise work are not counted), with the ratio
//! fast / reference; and the grouped GEMM's rate vs a dense GEMM of equal FLOPs, same run.
//!
//! Usage: `cargo run --release -p moe-kernels --bin moe_bench -- [--tokens 512,4096]
//! [--hidden 2048] [--inter 768] [--experts 128] [--top-k 8] [--iters 3] [--ref-max-tokens 4096]
//! [--ref-bwd-max-tokens 512]`. The reference loop is slow: it runs once per measurement, its
//! forward only for T <= --ref-max-tokens and its backward only for T <= --ref-bwd-max-tokens
//! (its backward runs at ~1 GFLOP/s: T=4096 would take over ten minutes).

use std::time::Instant;

use moe_kernels::fast::gemm::{matmul, Parallelism};
use moe_kernels::fast::grouped::grouped_matmul;
use moe_kernels::{fast, reference, Activation, MoeConfig, MoeParams, Permutation, RouterKind};
use ndarray::{Array2, Array3, Axis};

struct Args {
    tokens: Vec<usize>,
    hidden: usize,
    inter: usize,
    experts: usize,
    top_k: usize,
    iters: usize,
    ref_max_tokens: usize,
    ref_bwd_max_tokens: usize,
}

fn parse() -> Result<Args, String> {
    let mut a = Args {
        tokens: vec![512, 4096],
        hidden: 2048,
        inter: 768,
        experts: 128,
        top_k: 8,
        iters: 3,
        ref_max_tokens: 4096,
        ref_bwd_max_tokens: 512,
    };
    let argv: Vec<String> = std::env::args().skip(1).collect();
    for pair in argv.chunks(2) {
        let (flag, value) = match pair {
            [f, v] => (f.as_str(), v.as_str()),
            _ => return Err(format!("flag {pair:?} needs a value")),
        };
        let num = |v: &str| v.parse::<usize>().map_err(|e| format!("{flag} {v}: {e}"));
        match flag {
            "--tokens" => a.tokens = value.split(',').map(num).collect::<Result<_, _>>()?,
            "--hidden" => a.hidden = num(value)?,
            "--inter" => a.inter = num(value)?,
            "--experts" => a.experts = num(value)?,
            "--top-k" => a.top_k = num(value)?,
            "--iters" => a.iters = num(value)?.max(1),
            "--ref-max-tokens" => a.ref_max_tokens = num(value)?,
            "--ref-bwd-max-tokens" => a.ref_bwd_max_tokens = num(value)?,
            other => return Err(format!("unknown flag {other}")),
        }
    }
    Ok(a)
}

/// Deterministic pseudo-random fill in [-scale, scale).
fn fill(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut s = seed | 1;
    (0..n)
        .map(|_| {
            s ^= s >> 12;
            s ^= s << 25;
            s ^= s >> 27;
            let bits = (s.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 40) as f32;
            (bits / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect()
}

/// Best (minimum) wall time in seconds of `iters` runs of `f`.
fn best_of<T>(iters: usize, mut f: impl FnMut() -> T) -> f64 {
    (0..iters)
        .map(|_| {
            let t0 = Instant::now();
            std::hint::black_box(f());
            t0.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let a = parse()?;
    let (h, i, e, k) = (a.hidden, a.inter, a.experts, a.top_k);
    println!(
        "moe_bench: H={h} I={i} E={e} k={k}, SwiGLU, softmax top-k + renorm, f32, {} rayon threads",
        rayon::current_num_threads()
    );
    let gate = Array2::from_shape_vec((e, h), fill(e * h, 1, 0.05))?;
    let gate_up = Array3::from_shape_vec((e, h, 2 * i), fill(e * h * 2 * i, 2, 0.02))?;
    let down = Array3::from_shape_vec((e, i, h), fill(e * i * h, 3, 0.02))?;
    let p = MoeParams {
        gate_weight: gate.view(),
        gate_bias: None,
        e_score_correction_bias: None,
        gate_and_up_projs: gate_up.view(),
        down_projs: down.view(),
        gate_up_bias: None,
        down_bias: None,
        shared: None,
    };
    let cfg = MoeConfig {
        router: RouterKind::SoftmaxTopK {
            norm_topk_prob: true,
        },
        top_k: k,
        activation: Activation::SwiGlu,
    };
    for &t in &a.tokens {
        let x = Array2::from_shape_vec((t, h), fill(t * h, 4 + t as u64, 1.0))?;
        let go = Array2::from_shape_vec((t, h), fill(t * h, 5 + t as u64, 1.0))?;
        let fwd_flop = 6.0 * (t * k * h * i) as f64;
        let gf = |flop: f64, s: f64| flop / s / 1e9;
        println!(
            "\n== T={t} (N = T*k = {} rows; forward {:.1} GFLOP) ==",
            t * k,
            fwd_flop / 1e9
        );

        let fast_fwd = best_of(a.iters, || fast::moe_forward(x.view(), &p, &cfg));
        let f = fast::moe_forward(x.view(), &p, &cfg)?;
        let fast_bwd = best_of(a.iters, || {
            fast::moe_backward(x.view(), &p, &cfg, &f, go.view())
        });
        let fast_fb = fast_fwd + fast_bwd;
        println!(
            "fast      forward          {:9.3} s  {:8.1} GFLOP/s",
            fast_fwd,
            gf(fwd_flop, fast_fwd)
        );
        println!(
            "fast      forward+backward {:9.3} s  {:8.1} GFLOP/s",
            fast_fb,
            gf(3.0 * fwd_flop, fast_fb)
        );

        if t <= a.ref_max_tokens {
            let t0 = Instant::now();
            let rf = reference::moe_forward(x.view(), &p, &cfg)?;
            let ref_fwd = t0.elapsed().as_secs_f64();
            println!(
                "reference forward          {:9.3} s  {:8.1} GFLOP/s  (1 run)",
                ref_fwd,
                gf(fwd_flop, ref_fwd)
            );
            println!("ratio fast/reference forward: {:.1}x", ref_fwd / fast_fwd);
            let max_diff = rf
                .output
                .iter()
                .zip(f.output.iter())
                .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
            println!("max |fast - reference| output = {max_diff:e}");
            if t <= a.ref_bwd_max_tokens {
                let t0 = Instant::now();
                std::hint::black_box(reference::moe_backward(x.view(), &p, &cfg, &rf, go.view())?);
                let ref_fb = ref_fwd + t0.elapsed().as_secs_f64();
                println!(
                    "reference forward+backward {:9.3} s  {:8.1} GFLOP/s  (1 run)",
                    ref_fb,
                    gf(3.0 * fwd_flop, ref_fb)
                );
                println!(
                    "ratio fast/reference forward+backward: {:.1}x",
                    ref_fb / fast_fb
                );
            } else {
                println!(
                    "reference backward skipped (T > --ref-bwd-max-tokens {})",
                    a.ref_bwd_max_tokens
                );
            }
        } else {
            println!(
                "reference skipped (T > --ref-max-tokens {})",
                a.ref_max_tokens
            );
        }

        // Grouped GEMMs alone on the real routing vs one dense GEMM of equal FLOPs.
        let perm = Permutation::from_top_k_index(f.routing.top_k_index.view(), e)?;
        let n = t * k;
        let xp = Array2::from_shape_vec((n, h), fill(n * h, 6, 1.0))?;
        let hp = Array2::from_shape_vec((n, i), fill(n * i, 7, 1.0))?;
        let mut out_up = Array2::<f32>::zeros((n, 2 * i));
        let mut out_down = Array2::<f32>::zeros((n, h));
        let g_up = best_of(a.iters, || {
            grouped_matmul(&mut out_up, xp.view(), &perm.offsets, |x| {
                gate_up.index_axis(Axis(0), x)
            })
        });
        let g_down = best_of(a.iters, || {
            grouped_matmul(&mut out_down, hp.view(), &perm.offsets, |x| {
                down.index_axis(Axis(0), x)
            })
        });
        let w_up = gate_up.index_axis(Axis(0), 0);
        let w_down = down.index_axis(Axis(0), 0);
        // Dense baselines of equal FLOPs, one weight matrix: the gemm crate's own parallel
        // driver, and the same row-block task split as the grouped kernel (one "expert"); the
        // better of the two is the reference rate.
        let one = [0, n];
        let d_up = best_of(a.iters, || {
            matmul(
                out_up.view_mut(),
                xp.view(),
                w_up,
                false,
                Parallelism::Rayon(0),
            )
        })
        .min(best_of(a.iters, || {
            grouped_matmul(&mut out_up, xp.view(), &one, |_| w_up)
        }));
        let d_down = best_of(a.iters, || {
            matmul(
                out_down.view_mut(),
                hp.view(),
                w_down,
                false,
                Parallelism::Rayon(0),
            )
        })
        .min(best_of(a.iters, || {
            grouped_matmul(&mut out_down, hp.view(), &one, |_| w_down)
        }));
        let (f_up, f_down) = (2.0 * (n * h * 2 * i) as f64, 2.0 * (n * i * h) as f64);
        println!(
            "grouped GEMM gate_up [N,H]x[E,H,2I] {:8.1} GFLOP/s | dense [N,H]x[H,2I] {:8.1} GFLOP/s | grouped/dense {:.0}%",
            gf(f_up, g_up),
            gf(f_up, d_up),
            100.0 * d_up / g_up
        );
        println!(
            "grouped GEMM down    [N,I]x[E,I,H]  {:8.1} GFLOP/s | dense [N,I]x[I,H]  {:8.1} GFLOP/s | grouped/dense {:.0}%",
            gf(f_down, g_down),
            gf(f_down, d_down),
            100.0 * d_down / g_down
        );
    }
    Ok(())
}
