//! CUDA benchmark: the `moe_kernels::cuda` MoE layer, forward and forward+backward,
//! in TFLOP/s, against cuBLAS bf16 in the same run: a dense GEMM of equal FLOPs and a
//! per-expert cuBLAS loop (the naive baseline). Unverified on a GPU so far.
//!
//! Usage: `moe_cuda_bench [--shapes qwen3,deepseek,mixtral] [--tokens 4096,32768]
//! [--routing uniform,skewed] [--iters 10] [--warmup 3] [--device 0]`.
//!
//! On sm_80+ (timed, CUDA events, median): "gg fwd" = the forward's two grouped GEMMs alone
//! (`tc_gate_up_glu` with the dispatch gather and the GLU epilogue, `tc_down_proj` with the
//! routing weight in the epilogue); "fwd" = the fused layer `CudaMoe::moe_forward` (router GEMM,
//! route, permutation, both GEMMs, combine; no host sync); "fwd+bwd" = `moe_forward` +
//! `moe_backward` (tensor-core dX / dW GEMMs, router backward). Skewed routing uses a GPT-OSS
//! style router (top-k then softmax) with the skew as its bias. Before sm_80 the older f32 /
//! tiled kernel chain runs instead (gg fwd not measured). Each call allocates its outputs, so
//! allocation is inside the timed region.
//!
//! FLOPs counted: forward 6*N*H*I (N = T*k routed rows) + 2*T*H*E (router); backward twice the
//! expert GEMMs (12*N*H*I). The cuBLAS baselines run only the expert GEMMs (bf16 in / bf16 out,
//! f32 compute): "dense" = the same GEMMs with M = N rows against one expert's weights, "loop" =
//! one cuBLAS call per expert and GEMM on that expert's rows (the real routing's counts). Their
//! forward is 2 GEMMs, forward+backward 6 (dh, dW_d, dxp, dW_gu).

use std::sync::Arc;

use cudarc::cublas::sys::cublasOperation_t;
use cudarc::cublas::{CudaBlas, Gemm, GemmConfig};
use cudarc::driver::{sys::CUevent_flags, PushKernelArg};
use cudarc::driver::{CudaFunction, CudaSlice, CudaStream, CudaView, CudaViewMut, LaunchConfig};
use half::bf16;
use moe_kernels::cuda::{device_available, CudaMoe, GpuMoeDims, GpuMoeParams};
use moe_kernels::{Activation, MoeConfig, RouterConfig, RouterKind};

type R<T> = Result<T, String>;

const UTIL_SRC: &str = r#"
extern "C" __global__ void fill_uniform_f32(float* y, long long n, unsigned int seed, float scale) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        unsigned long long z = (unsigned long long)i * 0x9E3779B97F4A7C15ull + seed;
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
        z ^= z >> 31;
        float u = (float)(z >> 40) * (1.0f / 16777216.0f);
        y[i] = (2.0f * u - 1.0f) * scale;
    }
}
"#;

struct Shape {
    name: &'static str,
    h: usize,
    i: usize,
    e: usize,
    k: usize,
}

const SHAPES: [Shape; 3] = [
    Shape {
        name: "qwen3",
        h: 2048,
        i: 768,
        e: 128,
        k: 8,
    },
    Shape {
        name: "deepseek",
        h: 7168,
        i: 2048,
        e: 256,
        k: 8,
    },
    Shape {
        name: "mixtral",
        h: 4096,
        i: 14336,
        e: 8,
        k: 2,
    },
];

struct Args {
    shapes: Vec<String>,
    tokens: Vec<usize>,
    routing: Vec<String>,
    iters: usize,
    warmup: usize,
    device: usize,
}

fn parse() -> R<Args> {
    let mut a = Args {
        shapes: vec!["qwen3".into(), "deepseek".into(), "mixtral".into()],
        tokens: vec![4096, 32768],
        routing: vec!["uniform".into(), "skewed".into()],
        iters: 10,
        warmup: 3,
        device: 0,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "--help" || flag == "-h" {
            return Err("usage: moe_cuda_bench [--shapes qwen3,deepseek,mixtral] [--tokens 4096,32768] [--routing uniform,skewed] [--iters N] [--warmup N] [--device N]".into());
        }
        let v = it.next().ok_or(format!("{flag} needs a value"))?;
        let list = |v: &str| {
            v.split(',')
                .map(|s| s.trim().to_string())
                .collect::<Vec<_>>()
        };
        let num = |s: &str| s.parse::<usize>().map_err(|e| format!("{flag} {s}: {e}"));
        match flag.as_str() {
            "--shapes" => a.shapes = list(&v),
            "--tokens" => a.tokens = list(&v).iter().map(|s| num(s)).collect::<R<_>>()?,
            "--routing" => a.routing = list(&v),
            "--iters" => a.iters = num(&v)?.max(1),
            "--warmup" => a.warmup = num(&v)?,
            "--device" => a.device = num(&v)?,
            _ => return Err(format!("unknown option {flag}")),
        }
    }
    for s in &a.shapes {
        if !SHAPES.iter().any(|x| x.name == s) {
            return Err(format!("unknown shape {s} (qwen3, deepseek, mixtral)"));
        }
    }
    for r in &a.routing {
        if r != "uniform" && r != "skewed" {
            return Err(format!("unknown routing {r} (uniform, skewed)"));
        }
    }
    Ok(a)
}

fn main() {
    let args = match parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
    };
    if !device_available() {
        println!("skipped: no CUDA device");
        return;
    }
    if !unsafe { cudarc::cublas::sys::is_culib_present() } {
        println!("skipped: no cuBLAS library (libcublas) found");
        return;
    }
    if let Err(e) = run(&args) {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

fn e<E: std::fmt::Debug>(what: &'static str) -> impl Fn(E) -> String {
    move |err| format!("{what}: {err:?}")
}

struct Util<'a> {
    moe: &'a CudaMoe,
    stream: Arc<CudaStream>,
    fill: CudaFunction,
}

impl Util<'_> {
    fn grid(n: usize) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (n.div_ceil(256).clamp(1, 65_535) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        }
    }
    fn rand_f32(&self, n: usize, seed: u32, scale: f32) -> R<CudaSlice<f32>> {
        let mut y = unsafe { self.stream.alloc::<f32>(n.max(1)) }.map_err(e("alloc"))?;
        let n_i = n as i64;
        let mut b = self.stream.launch_builder(&self.fill);
        b.arg(&mut y).arg(&n_i).arg(&seed).arg(&scale);
        unsafe { b.launch(Self::grid(n)) }.map_err(e("fill_uniform_f32"))?;
        Ok(y)
    }
    /// f32 -> bf16 (round to nearest even), the library's `to_bf16`.
    fn cast(&self, x: &CudaSlice<f32>, n: usize) -> R<CudaSlice<u16>> {
        self.moe.to_bf16(x, n).map_err(|x| x.to_string())
    }
    fn rand_bf16(&self, n: usize, seed: u32, scale: f32) -> R<CudaSlice<u16>> {
        let f = self.rand_f32(n, seed, scale)?;
        self.cast(&f, n)
    }
}

/// Row-major `C[m, n] = op(A) @ op(B)` in bf16 (f32 compute) through column-major cuBLAS:
/// `C^T = op(B)^T @ op(A)^T`. `A` is `[m, k]` (`[k, m]` if `ta`), `B` is `[k, n]` (`[n, k]` if `tb`).
#[allow(clippy::too_many_arguments)]
fn gemm_rm(
    blas: &CudaBlas,
    a: &CudaView<'_, bf16>,
    b: &CudaView<'_, bf16>,
    c: &mut CudaViewMut<'_, bf16>,
    m: usize,
    n: usize,
    k: usize,
    ta: bool,
    tb: bool,
) -> R<()> {
    if m == 0 || n == 0 || k == 0 {
        return Ok(());
    }
    let op = |t: bool| {
        if t {
            cublasOperation_t::CUBLAS_OP_T
        } else {
            cublasOperation_t::CUBLAS_OP_N
        }
    };
    let cfg = GemmConfig {
        transa: op(tb),
        transb: op(ta),
        m: n as i32,
        n: m as i32,
        k: k as i32,
        alpha: bf16::ONE,
        lda: if tb { k } else { n } as i32,
        ldb: if ta { m } else { k } as i32,
        beta: bf16::ZERO,
        ldc: n as i32,
    };
    unsafe { blas.gemm(cfg, b, a, c) }.map_err(e("cublasGemmEx"))
}

fn bv(s: &CudaSlice<u16>, off: usize, len: usize) -> CudaView<'_, bf16> {
    let v = s.slice(off..off + len);
    // SAFETY: bf16 and u16 have the same size; the bits are bf16 values.
    unsafe { v.transmute::<bf16>(len) }.expect("same size")
}

/// Binds `$name` to a mutable bf16 view of `$s[$off..$off + $len]` (u16 storage).
macro_rules! bvm {
    ($name:ident = $s:expr, $off:expr, $len:expr) => {
        let mut tmp = $s.slice_mut($off..$off + $len);
        // SAFETY: bf16 and u16 have the same size; the bits are bf16 values.
        let mut $name = unsafe { tmp.transmute_mut::<bf16>($len) }.expect("same size");
    };
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Median milliseconds of `f` over `iters` runs after `warmup`, CUDA events on the stream.
fn time_ms(
    stream: &Arc<CudaStream>,
    warmup: usize,
    iters: usize,
    mut f: impl FnMut() -> R<()>,
) -> R<f64> {
    for _ in 0..warmup {
        f()?;
    }
    stream.synchronize().map_err(e("synchronize"))?;
    let mut ts = Vec::with_capacity(iters);
    for _ in 0..iters {
        let t0 = stream
            .record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
            .map_err(e("record_event"))?;
        f()?;
        let t1 = stream
            .record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
            .map_err(e("record_event"))?;
        ts.push(f64::from(t0.elapsed_ms(&t1).map_err(e("elapsed_ms"))?));
    }
    Ok(median(ts))
}

const GIB: f64 = (1u64 << 30) as f64;

/// Peak bytes one configuration needs (weights in bf16 + f32, dW, activations and gradients of
/// one forward+backward, cuBLAS baseline buffers), a deliberate over-estimate.
fn bytes_needed(s: &Shape, t: usize, use_mma: bool) -> f64 {
    let (h, i, e, k) = (s.h as f64, s.i as f64, s.e as f64, s.k as f64);
    let t = t as f64;
    let n = t * k;
    // bf16 weights, f32 dW, and (pre-sm_80 chain only) f32 weight copies.
    let weights = e * 3.0 * h * i * (2.0 + 4.0 + if use_mma { 0.0 } else { 4.0 });
    let tokens = t * h * (4.0 + 2.0 + 4.0 + 4.0 + 4.0) + t * e * 12.0 + t * k * 32.0;
    let rows = n * (h * 20.0 + i * (8.0 + 4.0 + 2.0 + 4.0 + 8.0 + 8.0));
    let blas = n * (h * 6.0 + i * 8.0) + 3.0 * h * i * 2.0 * 2.0;
    weights + tokens + rows + blas
}

fn run(args: &Args) -> R<()> {
    let moe = CudaMoe::new(args.device).map_err(|x| format!("CudaMoe::new: {x}"))?;
    let stream = moe.stream().clone();
    let ctx = stream.context().clone();
    ctx.bind_to_thread().map_err(e("bind_to_thread"))?;
    let use_mma = moe.sm() >= 80;
    let ptx = cudarc::nvrtc::compile_ptx(UTIL_SRC).map_err(e("nvrtc util kernels"))?;
    let module = ctx.load_module(ptx).map_err(e("load_module"))?;
    let util = Util {
        moe: &moe,
        stream: stream.clone(),
        fill: module
            .load_function("fill_uniform_f32")
            .map_err(e("fill"))?,
    };
    let blas = CudaBlas::new(stream.clone()).map_err(e("CudaBlas::new"))?;
    let (_, total) = cudarc::driver::result::mem_get_info().map_err(e("mem_get_info"))?;
    println!(
        "device {} ({}), {:.1} GiB; forward GEMMs: {}; iters {} (median), warmup {}",
        args.device,
        moe.arch(),
        total as f64 / GIB,
        if use_mma {
            "grouped_gemm_bf16_mma (tensor cores)"
        } else {
            "grouped_gemm_bf16 (tiled, pre-sm_80)"
        },
        args.iters,
        args.warmup
    );
    println!(
        "{:<9} {:>6} {:<8} {:>6} | {:>9} {:>7} {:>7} | {:>9} {:>9} {:>9} {:>7} {:>7} | {:>9} {:>9} {:>9} {:>7} {:>7}",
        "shape",
        "T",
        "routing",
        "maxld",
        "gg fwd",
        "/dense",
        "/loop",
        "fwd",
        "dense",
        "loop",
        "/dense",
        "/loop",
        "fwd+bwd",
        "dense",
        "loop",
        "/dense",
        "/loop"
    );
    for s in SHAPES
        .iter()
        .filter(|s| args.shapes.iter().any(|x| x == s.name))
    {
        for &t in &args.tokens {
            for routing in &args.routing {
                let (free, _) =
                    cudarc::driver::result::mem_get_info().map_err(e("mem_get_info"))?;
                let need = bytes_needed(s, t, use_mma);
                if need > free as f64 * 0.95 {
                    println!(
                        "{:<9} {:>6} {:<8} skipped: needs ~{:.1} GiB, {:.1} GiB free",
                        s.name,
                        t,
                        routing,
                        need / GIB,
                        free as f64 / GIB
                    );
                    continue;
                }
                let r = bench_one(args, &moe, &util, &blas, use_mma, s, t, routing == "skewed");
                if let Err(x) = r {
                    println!("{:<9} {:>6} {:<8} failed: {x}", s.name, t, routing);
                }
                stream.synchronize().map_err(e("synchronize"))?;
            }
        }
    }
    println!(
        "TFLOP/s: gg fwd = the two grouped GEMMs of the forward alone (6*N*H*I, gathered gate/up \
         + GLU epilogue, down + routing-weight epilogue); fwd 6*N*H*I + 2*T*H*E, fwd+bwd \
         18*N*H*I + 2*T*H*E (N = T*k) of the fused layer; cuBLAS baselines: expert GEMMs only \
         (bf16, f32 compute); maxld = max expert rows / mean"
    );
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn bench_one(
    args: &Args,
    moe: &CudaMoe,
    util: &Util<'_>,
    blas: &CudaBlas,
    use_mma: bool,
    s: &Shape,
    t: usize,
    skewed: bool,
) -> R<()> {
    let stream = moe.stream();
    let (h, inter, ne, k) = (s.h, s.i, s.e, s.k);
    let n = t * k;
    let m = |x: moe_kernels::KernelError| x.to_string();
    let ws = 1.0 / (h as f32).sqrt();
    // Inputs and weights (device-side random fill).
    let x = util.rand_f32(t * h, 1, 1.0)?;
    let xb = util.cast(&x, t * h)?;
    let w_r = util.rand_bf16(h * ne, 2, ws * 3.0f32.sqrt())?;
    // f32 copies of the expert weights only for the pre-sm_80 chain's f32 backward kernels.
    let f32_len = |len: usize| if use_mma { 1 } else { len };
    let w_gu_b = util.rand_bf16(ne * h * 2 * inter, 3, ws)?;
    let w_gu = util.rand_f32(f32_len(ne * h * 2 * inter), 3, ws)?;
    let wd_scale = 1.0 / (inter as f32).sqrt();
    let w_d_b = util.rand_bf16(ne * inter * h, 4, wd_scale)?;
    let w_d = util.rand_f32(f32_len(ne * inter * h), 4, wd_scale)?;
    let grad_out = util.rand_f32(t * h, 5, 1.0)?;
    let one_group = stream.clone_htod(&[0u32, t as u32]).map_err(e("htod"))?;
    let skew: Vec<f32> = (0..ne).map(|j| -1.5 * ((j + 1) as f32).ln()).collect();
    let skew = stream.clone_htod(&skew).map_err(e("htod"))?;
    let rcfg = RouterConfig {
        top_k: k,
        norm_topk_prob: true,
    };
    let act = Activation::SwiGlu;
    let gg = |a: &CudaSlice<u16>,
              rows: usize,
              kd: usize,
              w: &CudaSlice<u16>,
              ex: usize,
              no: usize,
              off: &CudaSlice<u32>| {
        if use_mma {
            moe.grouped_gemm_bf16_mma(a, rows, kd, w, ex, no, off)
        } else {
            moe.grouped_gemm_bf16(a, rows, kd, w, ex, no, off)
        }
        .map_err(m)
    };

    struct Fwd {
        weights: CudaSlice<f32>,
        perm: moe_kernels::cuda::GpuPermutation,
        xp: CudaSlice<f32>,
        a: CudaSlice<f32>,
        hf: CudaSlice<f32>,
        y: CudaSlice<f32>,
    }
    let forward = || -> R<Fwd> {
        let mut logits = gg(&xb, t, h, &w_r, 1, ne, &one_group)?;
        if skewed {
            moe.add_row_bias(&mut logits, t, ne, &skew, &one_group, 1)
                .map_err(m)?;
        }
        let routing = moe.softmax_topk(&logits, t, ne, &rcfg).map_err(m)?;
        let perm = moe.permutation(&routing.top_k_index, t, k, ne).map_err(m)?;
        let xp = moe
            .gather_rows(&x, t, h, &perm.token_of_row, n)
            .map_err(m)?;
        let xpb = util.cast(&xp, n * h)?;
        let a = gg(&xpb, n, h, &w_gu_b, ne, 2 * inter, &perm.offsets)?;
        let hf = moe.glu(&a, n, inter, &act).map_err(m)?;
        let hb = util.cast(&hf, n * inter)?;
        let y = gg(&hb, n, inter, &w_d_b, ne, h, &perm.offsets)?;
        let _out = moe
            .combine(&y, n, h, &routing.top_k_weights, &perm.row_of_slot, t, k)
            .map_err(m)?;
        Ok(Fwd {
            weights: routing.top_k_weights,
            perm,
            xp,
            a,
            hf,
            y,
        })
    };
    let backward = |f: &Fwd| -> R<()> {
        let p = &f.perm;
        let (gy, _gw) = moe
            .combine_backward(
                &f.y,
                h,
                &f.weights,
                &p.row_of_slot,
                &p.slot_of_row,
                &grad_out,
                t,
                k,
            )
            .map_err(m)?;
        let _dwd = moe
            .grouped_gemm_tn(&f.hf, n, inter, &gy, h, &p.offsets, ne)
            .map_err(m)?;
        let dh = moe
            .grouped_gemm_nt(&gy, n, h, &w_d, ne, inter, &p.offsets)
            .map_err(m)?;
        let da = moe.glu_backward(&f.a, &dh, n, inter, &act).map_err(m)?;
        let _dwgu = moe
            .grouped_gemm_tn(&f.xp, n, h, &da, 2 * inter, &p.offsets, ne)
            .map_err(m)?;
        let dxp = moe
            .grouped_gemm_nt(&da, n, 2 * inter, &w_gu, ne, h, &p.offsets)
            .map_err(m)?;
        let _dx = moe
            .permute_backward(&dxp, n, h, &p.row_of_slot, t, k)
            .map_err(m)?;
        Ok(())
    };

    // The fused layer (sm_80+: tensor cores, no host sync in the forward) or the pre-sm_80
    // kernel chain above. Skewed routing on the fused layer: a GPT-OSS-style router (top-k then
    // softmax) whose bias is the skew.
    // Returns the timings and the measured path's per-expert offsets (routing statistics and the
    // cuBLAS loop's row counts come from the routing that was timed).
    let (fwd_ms, fb_ms, gg_ms, offs) = if use_mma {
        let w_r_f = util.rand_f32(ne * h, 2, ws * 3.0f32.sqrt())?;
        let cfg = MoeConfig {
            router: if skewed {
                RouterKind::TopKSoftmax
            } else {
                RouterKind::SoftmaxTopK {
                    norm_topk_prob: true,
                }
            },
            top_k: k,
            activation: act,
        };
        let params = GpuMoeParams {
            gate_weight: &w_r_f,
            gate_bias: skewed.then_some(&skew),
            e_score_correction_bias: None,
            gate_and_up_projs: &w_gu_b,
            down_projs: &w_d_b,
            gate_up_bias: None,
            down_bias: None,
        };
        let dims = GpuMoeDims {
            tokens: t,
            hidden: h,
            inter,
            experts: ne,
        };
        let fwd_ms = time_ms(stream, args.warmup, args.iters, || {
            moe.moe_forward(&x, dims, &params, &cfg)
                .map(|_| ())
                .map_err(m)
        })?;
        let fb_ms = time_ms(stream, args.warmup, args.iters, || {
            let f = moe.moe_forward(&x, dims, &params, &cfg).map_err(m)?;
            moe.moe_backward(dims, &params, &cfg, &x, &f, &grad_out)
                .map(|_| ())
                .map_err(m)
        })?;
        // The two grouped GEMMs alone (gathered gate/up with the GLU epilogue, down with the
        // routing weight in its epilogue) on this routing.
        let f = moe.moe_forward(&x, dims, &params, &cfg).map_err(m)?;
        let p = &f.perm;
        let gg_ms = time_ms(stream, args.warmup, args.iters, || {
            let g = moe
                .tc_gate_up_glu(
                    &f.x_bf16,
                    t,
                    h,
                    Some(&p.token_of_row),
                    n,
                    &w_gu_b,
                    ne,
                    inter,
                    &p.offsets,
                    None,
                    &act,
                )
                .map_err(m)?;
            moe.tc_down_proj(
                &g.h_bf16,
                n,
                inter,
                &w_d_b,
                ne,
                h,
                &p.offsets,
                None,
                Some((&f.routing.top_k_weights, &p.slot_of_row)),
            )
            .map(|_| ())
            .map_err(m)
        })?;
        let offs = stream.clone_dtoh(&p.offsets).map_err(e("dtoh"))?;
        (fwd_ms, fb_ms, gg_ms, offs)
    } else {
        let f0 = forward()?;
        let offs = stream.clone_dtoh(&f0.perm.offsets).map_err(e("dtoh"))?;
        drop(f0);
        let fwd_ms = time_ms(stream, args.warmup, args.iters, || forward().map(|_| ()))?;
        let fb_ms = time_ms(stream, args.warmup, args.iters, || {
            let f = forward()?;
            backward(&f)
        })?;
        (fwd_ms, fb_ms, f64::NAN, offs)
    };
    let counts: Vec<usize> = offs.windows(2).map(|w| (w[1] - w[0]) as usize).collect();
    let maxld = *counts.iter().max().unwrap_or(&0) as f64 / (n as f64 / ne as f64);

    // cuBLAS baselines (bf16 buffers; gradients reuse the forward's buffers as inputs).
    let xp_b = util.rand_bf16(n * h, 6, 1.0)?;
    let mut a_b = util.rand_bf16(n * 2 * inter, 7, 1.0)?;
    let mut h_b = util.rand_bf16(n * inter, 8, 1.0)?;
    let mut y_b = util.rand_bf16(n * h, 9, 1.0)?;
    let mut dxp_b = util.rand_bf16(n * h, 10, 1.0)?;
    let mut dwgu_b = util.rand_bf16(h * 2 * inter, 11, 1.0)?;
    let mut dwd_b = util.rand_bf16(inter * h, 12, 1.0)?;
    let (gu, dn) = (h * 2 * inter, inter * h);
    // One expert's GEMMs on `r` rows starting at row `r0`, weights of expert `ex`.
    let mut expert_gemms = |r0: usize, r: usize, ex: usize, bwd: bool| -> R<()> {
        let (i2, i1) = (2 * inter, inter);
        {
            let xa = bv(&xp_b, r0 * h, r * h);
            let wg = bv(&w_gu_b, ex * gu, gu);
            bvm!(cv = a_b, r0 * i2, r * i2);
            gemm_rm(blas, &xa, &wg, &mut cv, r, i2, h, false, false)?;
        }
        {
            let hh = bv(&h_b, r0 * i1, r * i1);
            let wd = bv(&w_d_b, ex * dn, dn);
            bvm!(cv = y_b, r0 * h, r * h);
            gemm_rm(blas, &hh, &wd, &mut cv, r, h, i1, false, false)?;
        }
        if bwd {
            // dh = dy @ W_d^T (into h_b), dW_d = h^T @ dy, dxp = da @ W_gu^T, dW_gu = xp^T @ da.
            let dy = bv(&y_b, r0 * h, r * h);
            let wd = bv(&w_d_b, ex * dn, dn);
            bvm!(cv = h_b, r0 * i1, r * i1);
            gemm_rm(blas, &dy, &wd, &mut cv, r, i1, h, false, true)?;
            let hh = bv(&h_b, r0 * i1, r * i1);
            bvm!(cv = dwd_b, 0, dn);
            gemm_rm(blas, &hh, &dy, &mut cv, i1, h, r, true, false)?;
            let da = bv(&a_b, r0 * i2, r * i2);
            let wg = bv(&w_gu_b, ex * gu, gu);
            bvm!(cv = dxp_b, r0 * h, r * h);
            gemm_rm(blas, &da, &wg, &mut cv, r, h, i2, false, true)?;
            let xa = bv(&xp_b, r0 * h, r * h);
            bvm!(cv = dwgu_b, 0, gu);
            gemm_rm(blas, &xa, &da, &mut cv, h, i2, r, true, false)?;
        }
        Ok(())
    };
    let dense_f = time_ms(stream, args.warmup, args.iters, || {
        expert_gemms(0, n, 0, false)
    })?;
    let dense_fb = time_ms(stream, args.warmup, args.iters, || {
        expert_gemms(0, n, 0, true)
    })?;
    let mut loop_run = |bwd: bool| -> R<()> {
        for (ex, &c) in counts.iter().enumerate() {
            if c > 0 {
                expert_gemms(offs[ex] as usize, c, ex, bwd)?;
            }
        }
        Ok(())
    };
    let loop_f = time_ms(stream, args.warmup, args.iters, || loop_run(false))?;
    let loop_fb = time_ms(stream, args.warmup, args.iters, || loop_run(true))?;

    let expert = 6.0 * n as f64 * h as f64 * inter as f64;
    let router = 2.0 * t as f64 * h as f64 * ne as f64;
    let tf = |flop: f64, ms: f64| flop / (ms * 1e-3) / 1e12;
    let (g_f, g_fb) = (
        tf(expert + router, fwd_ms),
        tf(3.0 * expert + router, fb_ms),
    );
    let (d_f, d_fb) = (tf(expert, dense_f), tf(3.0 * expert, dense_fb));
    let (l_f, l_fb) = (tf(expert, loop_f), tf(3.0 * expert, loop_fb));
    let gg = tf(expert, gg_ms);
    println!(
        "{:<9} {:>6} {:<8} {:>6.2} | {:>9.1} {:>7.2} {:>7.2} | {:>9.1} {:>9.1} {:>9.1} {:>7.2} {:>7.2} | {:>9.1} {:>9.1} {:>9.1} {:>7.2} {:>7.2}",
        s.name,
        t,
        if skewed { "skewed" } else { "uniform" },
        maxld,
        gg,
        gg / d_f,
        gg / l_f,
        g_f,
        d_f,
        l_f,
        g_f / d_f,
        g_f / l_f,
        g_fb,
        d_fb,
        l_fb,
        g_fb / d_fb,
        g_fb / l_fb
    );
    Ok(())
}
