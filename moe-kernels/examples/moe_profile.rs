//! Profiling driver for the fast path alone (no reference, no GEMM microbench): Qwen3-30B-A3B
//! layer shape, `moe_forward` and `moe_backward` timed separately, `iters` times each.
//! `cargo run --release -p moe-kernels --example moe_profile -- [tokens] [iters]`

use std::time::Instant;

use moe_kernels::{fast, Activation, MoeConfig, MoeParams, RouterKind};
use ndarray::{Array2, Array3};

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

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let argv: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse())
        .collect::<Result<_, _>>()?;
    let t = argv.first().copied().unwrap_or(4096);
    let iters = argv.get(1).copied().unwrap_or(3);
    let (h, i, e, k) = (2048, 768, 128, 8);
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
    let x = Array2::from_shape_vec((t, h), fill(t * h, 4 + t as u64, 1.0))?;
    let go = Array2::from_shape_vec((t, h), fill(t * h, 5 + t as u64, 1.0))?;
    let fwd_flop = 6.0 * (t * k * h * i) as f64;
    let mut sum = 0.0f64;
    for it in 0..iters {
        let t0 = Instant::now();
        let f = fast::moe_forward(x.view(), &p, &cfg)?;
        let tf = t0.elapsed().as_secs_f64();
        let t1 = Instant::now();
        let g = fast::moe_backward(x.view(), &p, &cfg, &f, go.view())?;
        let tb = t1.elapsed().as_secs_f64();
        sum += f.output.sum() as f64 + g.gate_and_up_projs[[0, 0, 0]] as f64;
        println!(
            "iter {it}: fwd {tf:.3} s ({:.1} GFLOP/s)  bwd {tb:.3} s  fwd+bwd {:.1} GFLOP/s",
            fwd_flop / tf / 1e9,
            3.0 * fwd_flop / (tf + tb) / 1e9
        );
    }
    println!("checksum {sum:e}");
    Ok(())
}
