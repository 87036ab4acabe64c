//! Both paths (reference and fast) against the float64 truth transformers computed, for every
//! family with a golden fixture in `conformance/fixtures/<name>/` (format `golden/2`,
//! `conformance/fixtures/README.md`): output, grad_input and every parameter gradient, compared
//! in the HF disk layout (`grad.<disk key>`) with the float32 bar of `moe_kernels::bound`. HF disk -> native is done here by hand,
//! independently of the adapters crate: per-expert `[I, H]` / `[H, I]` weights, Mixtral
//! `w1`/`w3`/`w2`, fused `[E, 2I, H]`/`[E, H, I]` (transposed) or `[E, H, 2I]`/`[E, I, H]`
//! (native), GPT-OSS interleaved gate/up columns (gate = 0::2, up = 1::2).

use std::collections::HashMap;

use moe_kernels::bound::{self, TruthRef};
use moe_kernels::{
    fast, reference, Activation, MoeConfig, MoeGrads, MoeParams, Real, RouterKind,
    SharedExpertParams,
};
use ndarray::{s, Array1, Array2, Array3, ArrayD, Axis};

mod fixture_io;
use fixture_io::{fixture_dir, load, load64, model_files, Tensors};

fn m2(t: &Tensors, key: &str) -> Array2<f32> {
    t.get(key)
        .unwrap_or_else(|| panic!("missing {key}"))
        .clone()
        .into_dimensionality()
        .unwrap()
}
fn m1(t: &Tensors, key: &str) -> Array1<f32> {
    t.get(key).unwrap().clone().into_dimensionality().unwrap()
}
fn m3(t: &Tensors, key: &str) -> Array3<f32> {
    t.get(key).unwrap().clone().into_dimensionality().unwrap()
}

/// The block's weights in the native layout plus how the experts are stored on disk.
struct Native {
    gate: Array2<f32>,
    gate_bias: Option<Array1<f32>>,
    corr: Option<Array1<f32>>,
    gate_up: Array3<f32>,
    down: Array3<f32>,
    gate_up_bias: Option<Array2<f32>>,
    down_bias: Option<Array2<f32>>,
    shared: Option<[Array2<f32>; 3]>,
    shared_gate: Option<Array2<f32>>,
    disk: ExpertDisk,
    shared_prefix: &'static str,
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum ExpertDisk {
    /// `experts.{e}.{gate,up,down}_proj.weight`, or Mixtral `w1`/`w3`/`w2`.
    PerExpert { mixtral: bool },
    /// `experts.gate_up_proj` / `down_proj`; `transposed`: `[E, 2I, H]` / `[E, H, I]`.
    Fused { transposed: bool },
    /// GPT-OSS: `[E, H, 2I]` interleaved + biases.
    Interleaved,
}

fn native(w: &Tensors, p: &str, num_experts: usize) -> Native {
    let router_key = if w.contains_key(&format!("{p}.router.weight")) {
        "router"
    } else {
        "gate"
    };
    let gate = m2(w, &format!("{p}.{router_key}.weight"));
    let gate_bias = w
        .contains_key(&format!("{p}.router.bias"))
        .then(|| m1(w, &format!("{p}.router.bias")));
    let corr_key = format!("{p}.gate.e_score_correction_bias");
    let corr = w.contains_key(&corr_key).then(|| m1(w, &corr_key));
    let h = gate.ncols();
    let (disk, gate_up, down, gate_up_bias, down_bias);
    if w.contains_key(&format!("{p}.experts.gate_up_proj")) {
        let gu = m3(w, &format!("{p}.experts.gate_up_proj"));
        let dn = m3(w, &format!("{p}.experts.down_proj"));
        if gate_bias.is_some() {
            // GPT-OSS: de-interleave columns (gate = 0::2, up = 1::2).
            let i = gu.shape()[2] / 2;
            let mut g = Array3::<f32>::zeros(gu.raw_dim());
            g.slice_mut(s![.., .., ..i])
                .assign(&gu.slice(s![.., .., 0..;2]));
            g.slice_mut(s![.., .., i..])
                .assign(&gu.slice(s![.., .., 1..;2]));
            let b = m2(w, &format!("{p}.experts.gate_up_proj_bias"));
            let mut bb = Array2::<f32>::zeros(b.raw_dim());
            bb.slice_mut(s![.., ..i]).assign(&b.slice(s![.., 0..;2]));
            bb.slice_mut(s![.., i..]).assign(&b.slice(s![.., 1..;2]));
            disk = ExpertDisk::Interleaved;
            gate_up = g;
            down = dn;
            gate_up_bias = Some(bb);
            down_bias = Some(m2(w, &format!("{p}.experts.down_proj_bias")));
        } else {
            // down_proj [E, H, I] -> fused transformers-v5 orientation; [E, I, H] -> native.
            let transposed = dn.shape()[1] == h && dn.shape()[2] != h;
            disk = ExpertDisk::Fused { transposed };
            if transposed {
                gate_up = gu.permuted_axes([0, 2, 1]).as_standard_layout().to_owned();
                down = dn.permuted_axes([0, 2, 1]).as_standard_layout().to_owned();
            } else {
                gate_up = gu;
                down = dn;
            }
            gate_up_bias = None;
            down_bias = None;
        }
    } else {
        let mixtral = w.contains_key(&format!("{p}.experts.0.w1.weight"));
        let names = if mixtral {
            ["w1", "w3", "w2"]
        } else {
            ["gate_proj", "up_proj", "down_proj"]
        };
        let g0 = m2(w, &format!("{p}.experts.0.{}.weight", names[0]));
        let i = g0.nrows();
        let mut gu = Array3::<f32>::zeros((num_experts, h, 2 * i));
        let mut dn = Array3::<f32>::zeros((num_experts, i, h));
        for e in 0..num_experts {
            let g = m2(w, &format!("{p}.experts.{e}.{}.weight", names[0]));
            let u = m2(w, &format!("{p}.experts.{e}.{}.weight", names[1]));
            let d = m2(w, &format!("{p}.experts.{e}.{}.weight", names[2]));
            gu.slice_mut(s![e, .., ..i]).assign(&g.t());
            gu.slice_mut(s![e, .., i..]).assign(&u.t());
            dn.slice_mut(s![e, .., ..]).assign(&d.t());
        }
        disk = ExpertDisk::PerExpert { mixtral };
        gate_up = gu;
        down = dn;
        gate_up_bias = None;
        down_bias = None;
    }
    let shared_prefix = if w.contains_key(&format!("{p}.shared_expert.gate_proj.weight")) {
        "shared_expert"
    } else {
        "shared_experts"
    };
    let shared = w
        .contains_key(&format!("{p}.{shared_prefix}.gate_proj.weight"))
        .then(|| {
            ["gate_proj", "up_proj", "down_proj"]
                .map(|n| m2(w, &format!("{p}.{shared_prefix}.{n}.weight")))
        });
    let sg_key = format!("{p}.shared_expert_gate.weight");
    let shared_gate = w.contains_key(&sg_key).then(|| m2(w, &sg_key));
    Native {
        gate,
        gate_bias,
        corr,
        gate_up,
        down,
        gate_up_bias,
        down_bias,
        shared,
        shared_gate,
        disk,
        shared_prefix,
    }
}

fn config(cfg: &serde_json::Value) -> MoeConfig {
    let c = cfg.get("text_config").unwrap_or(cfg);
    let model_type = cfg["model_type"].as_str().unwrap();
    let top_k = c["num_experts_per_tok"].as_u64().unwrap() as usize;
    let norm = c["norm_topk_prob"].as_bool();
    let router = match model_type {
        "gpt_oss" => RouterKind::TopKSoftmax,
        "deepseek_v3" | "glm4_moe" => RouterKind::SigmoidGroupLimited {
            n_group: c["n_group"].as_u64().unwrap() as usize,
            topk_group: c["topk_group"].as_u64().unwrap() as usize,
            norm_topk_prob: norm.unwrap(),
            routed_scaling_factor: c["routed_scaling_factor"].as_f64().unwrap(),
        },
        // Mixtral, Qwen3.5 and Qwen3-VL always renormalise; Qwen3-MoE / Next read the flag.
        "mixtral" | "qwen3_5_moe" | "qwen3_5_moe_text" | "qwen3_vl_moe" => {
            RouterKind::SoftmaxTopK {
                norm_topk_prob: true,
            }
        }
        _ => RouterKind::SoftmaxTopK {
            norm_topk_prob: norm.unwrap(),
        },
    };
    let activation = match model_type {
        "gpt_oss" => Activation::GptOssGlu {
            limit: c["swiglu_limit"].as_f64().unwrap(),
            alpha: 1.702,
        },
        _ => Activation::SwiGlu,
    };
    MoeConfig {
        router,
        top_k,
        activation,
    }
}

/// Our native gradients in the HF disk layout, keyed like the golden file (`grad.<key>`).
fn disk_grads<F: Real>(n: &Native, g: &MoeGrads<F>, p: &str) -> HashMap<String, ArrayD<F>> {
    let mut out = HashMap::new();
    let mut put = |k: String, a: ArrayD<F>| {
        out.insert(format!("grad.{p}.{k}"), a);
    };
    let router_key = if n.gate_bias.is_some() {
        "router"
    } else {
        "gate"
    };
    put(
        format!("{router_key}.weight"),
        g.gate_weight.clone().into_dyn(),
    );
    if let Some(b) = &g.gate_bias {
        put("router.bias".into(), b.clone().into_dyn());
    }
    let i = g.down_projs.shape()[1];
    match n.disk {
        ExpertDisk::PerExpert { mixtral } => {
            let names = if mixtral {
                ["w1", "w3", "w2"]
            } else {
                ["gate_proj", "up_proj", "down_proj"]
            };
            for e in 0..g.down_projs.shape()[0] {
                let gu = g.gate_and_up_projs.index_axis(Axis(0), e);
                put(
                    format!("experts.{e}.{}.weight", names[0]),
                    gu.slice(s![.., ..i]).t().to_owned().into_dyn(),
                );
                put(
                    format!("experts.{e}.{}.weight", names[1]),
                    gu.slice(s![.., i..]).t().to_owned().into_dyn(),
                );
                put(
                    format!("experts.{e}.{}.weight", names[2]),
                    g.down_projs
                        .index_axis(Axis(0), e)
                        .t()
                        .to_owned()
                        .into_dyn(),
                );
            }
        }
        ExpertDisk::Fused { transposed } => {
            let (gu, dn) = if transposed {
                (
                    g.gate_and_up_projs
                        .view()
                        .permuted_axes([0, 2, 1])
                        .to_owned(),
                    g.down_projs.view().permuted_axes([0, 2, 1]).to_owned(),
                )
            } else {
                (g.gate_and_up_projs.clone(), g.down_projs.clone())
            };
            put("experts.gate_up_proj".into(), gu.into_dyn());
            put("experts.down_proj".into(), dn.into_dyn());
        }
        ExpertDisk::Interleaved => {
            let mut gu = Array3::<F>::zeros(g.gate_and_up_projs.raw_dim());
            gu.slice_mut(s![.., .., 0..;2])
                .assign(&g.gate_and_up_projs.slice(s![.., .., ..i]));
            gu.slice_mut(s![.., .., 1..;2])
                .assign(&g.gate_and_up_projs.slice(s![.., .., i..]));
            put("experts.gate_up_proj".into(), gu.into_dyn());
            let b = g.gate_up_bias.as_ref().unwrap();
            let mut bb = Array2::<F>::zeros(b.raw_dim());
            bb.slice_mut(s![.., 0..;2]).assign(&b.slice(s![.., ..i]));
            bb.slice_mut(s![.., 1..;2]).assign(&b.slice(s![.., i..]));
            put("experts.gate_up_proj_bias".into(), bb.into_dyn());
            put("experts.down_proj".into(), g.down_projs.clone().into_dyn());
            put(
                "experts.down_proj_bias".into(),
                g.down_bias.clone().unwrap().into_dyn(),
            );
        }
    }
    if let Some(s) = &g.shared {
        let sp = n.shared_prefix;
        put(
            format!("{sp}.gate_proj.weight"),
            s.gate_proj.clone().into_dyn(),
        );
        put(format!("{sp}.up_proj.weight"), s.up_proj.clone().into_dyn());
        put(
            format!("{sp}.down_proj.weight"),
            s.down_proj.clone().into_dyn(),
        );
        if let Some(gg) = &s.gate {
            put("shared_expert_gate.weight".into(), gg.clone().into_dyn());
        }
    }
    out
}

/// Our float32 result against the float64 truth with the workspace's one float32 bar
/// (`moe_kernels::bound::judge_f32`: the running error bound elementwise, and normwise within 16x
/// transformers' own float32 error). Returns the worst ratio to the elementwise bound.
fn check(
    name: &str,
    what: &str,
    ours: &ArrayD<f32>,
    truth: &ArrayD<f64>,
    mags: &ArrayD<f64>,
    f32_ref: Option<&ArrayD<f64>>,
) -> f64 {
    assert_eq!(ours.shape(), truth.shape(), "{name} {what}: shape");
    let got: Vec<f64> = ours.iter().map(|&v| f64::from(v)).collect();
    let t: Vec<f64> = truth.iter().copied().collect();
    let m: Vec<f64> = mags.iter().copied().collect();
    let f: Option<Vec<f64>> = f32_ref.map(|a| a.iter().copied().collect());
    let note = bound::judge_f32(
        &got,
        &TruthRef {
            values: &t,
            mags: &m,
            f32_ref: f.as_deref(),
        },
    )
    .unwrap_or_else(|e| panic!("{name} {what}: {e}"));
    note.split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

/// The native weights / params cast to f64 (exact).
fn params64<'a>(p: &MoeParams<f32>, keep: &'a mut Vec<ArrayD<f64>>) -> MoeParams<'a, f64> {
    fn up<D: ndarray::Dimension>(a: ndarray::ArrayView<f32, D>) -> ArrayD<f64> {
        a.mapv(f64::from).into_dyn()
    }
    let mut push = |a: ArrayD<f64>| {
        keep.push(a);
        keep.len() - 1
    };
    let gw = push(up(p.gate_weight));
    let gb = p.gate_bias.map(|a| push(up(a)));
    let eb = p.e_score_correction_bias.map(|a| push(up(a)));
    let gu = push(up(p.gate_and_up_projs));
    let dn = push(up(p.down_projs));
    let gub = p.gate_up_bias.map(|a| push(up(a)));
    let dnb = p.down_bias.map(|a| push(up(a)));
    let sh = p.shared.map(|s| {
        (
            push(up(s.gate_proj)),
            push(up(s.up_proj)),
            push(up(s.down_proj)),
            s.gate.map(|g| push(up(g))),
        )
    });
    let k: &'a Vec<ArrayD<f64>> = keep;
    let v2 = |i: usize| k[i].view().into_dimensionality::<ndarray::Ix2>().unwrap();
    let v1 = |i: usize| k[i].view().into_dimensionality::<ndarray::Ix1>().unwrap();
    let v3 = |i: usize| k[i].view().into_dimensionality::<ndarray::Ix3>().unwrap();
    MoeParams {
        gate_weight: v2(gw),
        gate_bias: gb.map(v1),
        e_score_correction_bias: eb.map(v1),
        gate_and_up_projs: v3(gu),
        down_projs: v3(dn),
        gate_up_bias: gub.map(v2),
        down_bias: dnb.map(v2),
        shared: sh.map(|(g, u, d, gt)| SharedExpertParams {
            gate_proj: v2(g),
            up_proj: v2(u),
            down_proj: v2(d),
            gate: gt.map(v2),
        }),
    }
}

fn check_fixture(name: &str) {
    let dir = fixture_dir(name);
    let cfg_json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let (weights, _) = load(&model_files(&dir));
    let (golden, meta) = load64(&dir.join("golden.safetensors"));
    assert_eq!(
        meta.get("format").map(String::as_str),
        Some("golden/2"),
        "{name}: golden format"
    );
    let p = meta["block_prefix"].clone();
    let num_experts: usize = meta["num_experts"].parse().unwrap();
    let n = native(&weights, &p, num_experts);
    let cfg = config(&cfg_json);
    let params = MoeParams {
        gate_weight: n.gate.view(),
        gate_bias: n.gate_bias.as_ref().map(|a| a.view()),
        e_score_correction_bias: n.corr.as_ref().map(|a| a.view()),
        gate_and_up_projs: n.gate_up.view(),
        down_projs: n.down.view(),
        gate_up_bias: n.gate_up_bias.as_ref().map(|a| a.view()),
        down_bias: n.down_bias.as_ref().map(|a| a.view()),
        shared: n.shared.as_ref().map(|[g, u, d]| SharedExpertParams {
            gate_proj: g.view(),
            up_proj: u.view(),
            down_proj: d.view(),
            gate: n.shared_gate.as_ref().map(|a| a.view()),
        }),
    };
    let g2 = |k: &str| {
        golden[k]
            .clone()
            .into_dimensionality::<ndarray::Ix2>()
            .unwrap()
    };
    let (x64, go64) = (g2("input"), g2("grad_output"));
    let x = x64.mapv(|v| v as f32);
    let go = go64.mapv(|v| v as f32);
    let mut keep = Vec::new();
    let p64 = params64(&params, &mut keep);
    let mags = bound::block_magnitudes(x64.view(), &p64, &cfg, go64.view()).unwrap();
    let mag_grads = disk_grads(&n, &mags.grads, &p);
    let grad_keys: Vec<&String> = golden.keys().filter(|k| k.starts_with("grad.")).collect();
    for path in ["reference", "fast"] {
        let (fwd, grads) = if path == "reference" {
            let f = reference::moe_forward(x.view(), &params, &cfg).unwrap();
            let g = reference::moe_backward(x.view(), &params, &cfg, &f, go.view()).unwrap();
            (f, g)
        } else {
            let f = fast::moe_forward(x.view(), &params, &cfg).unwrap();
            let g = fast::moe_backward(x.view(), &params, &cfg, &f, go.view()).unwrap();
            (f, g)
        };
        let mut worst = check(
            name,
            "output",
            &fwd.output.into_dyn(),
            &golden["output"],
            &mags.output.clone().into_dyn(),
            golden.get("f32.output"),
        );
        worst = worst.max(check(
            name,
            "grad_input",
            &grads.grad_input.clone().into_dyn(),
            &golden["grad_input"],
            &mags.grad_input.clone().into_dyn(),
            golden.get("f32.grad_input"),
        ));
        let ours = disk_grads(&n, &grads, &p);
        let mut ours_keys: Vec<&String> = ours.keys().collect();
        let mut want_keys = grad_keys.clone();
        ours_keys.sort();
        want_keys.sort();
        assert_eq!(ours_keys, want_keys, "{name}: gradient key sets differ");
        for k in want_keys {
            worst = worst.max(check(
                name,
                k,
                &ours[k],
                &golden[k],
                &mag_grads[k],
                golden.get(&format!("f32.{k}")),
            ));
        }
        println!(
            "{name} {path}: {} gradients + output + grad_input, worst {worst:.3} of the float32 bound",
            grad_keys.len()
        );
    }
}

macro_rules! golden_test {
    ($test:ident, $fixture:literal) => {
        #[test]
        fn $test() {
            let dir = fixture_dir($fixture);
            assert!(
                dir.join("golden.safetensors").exists(),
                "fixture {} missing",
                dir.display()
            );
            check_fixture($fixture);
        }
    };
}

golden_test!(golden_qwen3_moe, "qwen3_moe_tiny");
golden_test!(golden_qwen3_moe_sharded, "qwen3_moe_tiny_sharded");
golden_test!(golden_qwen3_next, "qwen3_next_tiny");
golden_test!(golden_qwen3_5_moe, "qwen3_5_moe_tiny");
golden_test!(golden_qwen3_vl_moe, "qwen3_vl_moe_tiny");
golden_test!(golden_mixtral, "mixtral_tiny");
golden_test!(golden_gpt_oss, "gpt_oss_tiny");
golden_test!(golden_deepseek_v3, "deepseek_v3_tiny");
golden_test!(golden_glm4_moe, "glm4_moe_tiny");
golden_test!(golden_qwen3_moe_e128_k8, "qwen3_moe_e128_k8");
golden_test!(golden_deepseek_v3_e256_k8, "deepseek_v3_e256_k8");
golden_test!(golden_qwen3_moe_e16_k4_large, "qwen3_moe_e16_k4_large");
golden_test!(golden_gpt_oss_clamped, "gpt_oss_clamped");

/// The device layer (`cuda::CudaMoe::moe_forward` / `moe_backward`: bf16 expert weights and GEMM
/// operands, float32 accumulation) on a fixture without shared experts, against the float64
/// truth: every tensor's normwise relative error within twice what transformers' own bf16 run
/// shows (`bf16_error` in the golden metadata; floor `2^-8`, bf16's unit roundoff). The device
/// rounds fewer intermediates to bf16 than a bf16 model does, so it should sit below 1x.
#[cfg(feature = "cuda")]
fn cuda_bf16_fixture(dev: &moe_kernels::cuda::CudaMoe, name: &str) {
    use moe_kernels::cuda::{GpuMoeDims, GpuMoeParams};
    let dir = fixture_dir(name);
    let cfg_json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let (weights, _) = load(&model_files(&dir));
    let (golden, meta) = load64(&dir.join("golden.safetensors"));
    let bf16_err: serde_json::Value = serde_json::from_str(&meta["bf16_error"]).unwrap();
    let p = meta["block_prefix"].clone();
    let n = native(&weights, &p, meta["num_experts"].parse().unwrap());
    assert!(
        n.shared.is_none(),
        "{name}: the device layer has no shared expert"
    );
    let cfg = config(&cfg_json);
    let s = dev.stream().clone();
    let up = |a: &[f32]| s.clone_htod(a).unwrap();
    // Expert weights are bf16 values on disk: their bf16 bits are exact.
    let bits = |a: &[f32]| -> Vec<u16> { a.iter().map(|v| (v.to_bits() >> 16) as u16).collect() };
    let x: Vec<f32> = golden["input"].iter().map(|&v| v as f32).collect();
    let go: Vec<f32> = golden["grad_output"].iter().map(|&v| v as f32).collect();
    let (e, h, i2) = n.gate_up.dim();
    let dims = GpuMoeDims {
        tokens: x.len() / h,
        hidden: h,
        inter: i2 / 2,
        experts: e,
    };
    let d_x = up(&x);
    let d_go = up(&go);
    let d_gate = up(n.gate.as_slice().unwrap());
    let d_gb = n.gate_bias.as_ref().map(|b| up(b.as_slice().unwrap()));
    let d_corr = n.corr.as_ref().map(|b| up(b.as_slice().unwrap()));
    let d_gu = s.clone_htod(&bits(n.gate_up.as_slice().unwrap())).unwrap();
    let d_dn = s.clone_htod(&bits(n.down.as_slice().unwrap())).unwrap();
    let d_gub = n.gate_up_bias.as_ref().map(|b| up(b.as_slice().unwrap()));
    let d_db = n.down_bias.as_ref().map(|b| up(b.as_slice().unwrap()));
    let gp = GpuMoeParams {
        gate_weight: &d_gate,
        gate_bias: d_gb.as_ref(),
        e_score_correction_bias: d_corr.as_ref(),
        gate_and_up_projs: &d_gu,
        down_projs: &d_dn,
        gate_up_bias: d_gub.as_ref(),
        down_bias: d_db.as_ref(),
    };
    let fwd = dev.moe_forward(&d_x, dims, &gp, &cfg).unwrap();
    let g = dev
        .moe_backward(dims, &gp, &cfg, &d_x, &fwd, &d_go)
        .unwrap();
    let down = |d: &cudarc::driver::CudaSlice<f32>| s.clone_dtoh(d).unwrap();
    let a2 = |v: Vec<f32>, r: usize, c: usize| Array2::from_shape_vec((r, c), v).unwrap();
    let a3 = |v: Vec<f32>, sh: (usize, usize, usize)| Array3::from_shape_vec(sh, v).unwrap();
    let (t, i) = (dims.tokens, dims.inter);
    let grads = MoeGrads {
        grad_input: a2(down(&g.grad_input), t, h),
        gate_weight: a2(down(&g.gate_weight), e, h),
        gate_bias: g.gate_bias.as_ref().map(|b| Array1::from_vec(down(b))),
        gate_and_up_projs: a3(down(&g.gate_and_up_projs), (e, h, 2 * i)),
        down_projs: a3(down(&g.down_projs), (e, i, h)),
        gate_up_bias: g.gate_up_bias.as_ref().map(|b| a2(down(b), e, 2 * i)),
        down_bias: g.down_bias.as_ref().map(|b| a2(down(b), e, h)),
        shared: None,
    };
    let mut ours = disk_grads(&n, &grads, &p);
    ours.insert("output".into(), a2(down(&fwd.output), t, h).into_dyn());
    ours.insert("grad_input".into(), grads.grad_input.clone().into_dyn());
    let mut worst = (String::new(), 0.0f64);
    for (k, v) in &ours {
        let got: Vec<f64> = v.iter().map(|&x| f64::from(x)).collect();
        let truth: Vec<f64> = golden[k].iter().copied().collect();
        let err = bound::normwise(&got, &truth);
        let theirs = bf16_err[k.as_str()]["normwise"].as_f64().unwrap();
        let ratio = err / (2.0 * theirs.max(1.0 / 256.0));
        assert!(
            ratio <= 1.0,
            "{name} {k}: device normwise error {err:.3e} > 2 x transformers' bf16 error {theirs:.3e}"
        );
        if ratio > worst.1 {
            worst = (k.clone(), ratio);
        }
    }
    println!(
        "{name}: device bf16 layer, worst {:.3} of the bf16 bar ({})",
        worst.1, worst.0
    );
}

#[cfg(feature = "cuda")]
#[test]
fn cuda_layer_within_transformers_bf16_error() {
    if !moe_kernels::cuda::device_available() || !moe_kernels::cuda::nvrtc_available() {
        println!("skipped: no CUDA device");
        return;
    }
    let dev = match moe_kernels::cuda::CudaMoe::new(0) {
        Ok(d) => d,
        Err(e) => {
            println!("skipped: no CUDA device ({e})");
            return;
        }
    };
    for name in [
        "qwen3_moe_tiny",
        "qwen3_moe_tiny_sharded",
        "qwen3_vl_moe_tiny",
        "mixtral_tiny",
        "gpt_oss_tiny",
        "gpt_oss_clamped",
        "qwen3_moe_e128_k8",
        "qwen3_moe_e16_k4_large",
    ] {
        cuda_bf16_fixture(&dev, name);
    }
}
