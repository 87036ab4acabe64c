//! The single-function Qwen3-MoE forward (`qwen3_moe_block_forward`) against PyTorch: the golden
//! fixtures in `conformance/fixtures/` (written by `conformance/fixtures/generate.py` with
//! transformers' own Qwen3-MoE eager block, the float64 truth on the bf16 weights), judged by the
//! float32 bar of `moe_kernels::bound`. Reads the HF disk keys directly and builds the native
//! layout by hand (`gate_and_up_projs[e] = cat([gate_e.T, up_e.T], -1)`, `down_projs[e] = down_e.T`).

mod fixture_io;

use fixture_io::{fixture_dir, load, load64, model_files, Tensors};
use moe_kernels::bound::{self, TruthRef};
use moe_kernels::{
    qwen3_moe_block_forward, Activation, MoeConfig, MoeParams, RouterConfig, RouterKind,
};
use ndarray::{s, Array2, Array3, Ix2};

fn matrix(t: &Tensors, key: &str) -> Array2<f32> {
    let a = t.get(key).unwrap_or_else(|| panic!("missing tensor {key}"));
    a.clone().into_dimensionality::<Ix2>().unwrap()
}

fn check_fixture(name: &str) {
    let dir = fixture_dir(name);
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let num_experts = config["num_local_experts"]
        .as_u64()
        .or_else(|| config["num_experts"].as_u64())
        .unwrap() as usize;
    let cfg = RouterConfig {
        top_k: config["num_experts_per_tok"].as_u64().unwrap() as usize,
        norm_topk_prob: config["norm_topk_prob"].as_bool().unwrap(),
    };
    let (weights, _) = load(&model_files(&dir));

    let p = "model.layers.1.mlp";

    let gate = matrix(&weights, &format!("{p}.gate.weight"));
    let (h, i) = {
        let g0 = matrix(&weights, &format!("{p}.experts.0.gate_proj.weight"));
        (g0.ncols(), g0.nrows())
    };
    let mut gate_up = Array3::<f32>::zeros((num_experts, h, 2 * i));
    let mut down = Array3::<f32>::zeros((num_experts, i, h));
    for e in 0..num_experts {
        let g = matrix(&weights, &format!("{p}.experts.{e}.gate_proj.weight")); // [I, H]
        let u = matrix(&weights, &format!("{p}.experts.{e}.up_proj.weight")); // [I, H]
        let d = matrix(&weights, &format!("{p}.experts.{e}.down_proj.weight")); // [H, I]
        gate_up.slice_mut(s![e, .., ..i]).assign(&g.t());
        gate_up.slice_mut(s![e, .., i..]).assign(&u.t());
        down.slice_mut(s![e, .., ..]).assign(&d.t());
    }
    // The float64 truth, its error coefficients, transformers' float32 output.
    let (g64, _) = load64(&dir.join("golden.safetensors"));
    let m2 = |k: &str| -> Array2<f64> { g64[k].clone().into_dimensionality().unwrap() };
    let x = m2("input").mapv(|v| v as f32); // float32-representable by construction
    let got = qwen3_moe_block_forward(x.view(), gate.view(), gate_up.view(), down.view(), &cfg)
        .unwrap()
        .output;
    let (x64, go64, truth, f32_ref) = (
        m2("input"),
        m2("grad_output"),
        m2("output"),
        m2("f32.output"),
    );
    let (gate64, gu64, dn64) = (
        gate.mapv(f64::from),
        gate_up.mapv(f64::from),
        down.mapv(f64::from),
    );
    let p64 = MoeParams {
        gate_weight: gate64.view(),
        gate_bias: None,
        e_score_correction_bias: None,
        gate_and_up_projs: gu64.view(),
        down_projs: dn64.view(),
        gate_up_bias: None,
        down_bias: None,
        shared: None,
    };
    let moe_cfg = MoeConfig {
        router: RouterKind::SoftmaxTopK {
            norm_topk_prob: cfg.norm_topk_prob,
        },
        top_k: cfg.top_k,
        activation: Activation::SwiGlu,
    };
    let mags = bound::block_magnitudes(x64.view(), &p64, &moe_cfg, go64.view()).unwrap();
    assert_eq!(got.dim(), truth.dim());
    let got: Vec<f64> = got.iter().map(|&v| f64::from(v)).collect();
    let note = bound::judge_f32(
        &got,
        &TruthRef {
            values: truth.as_slice().unwrap(),
            mags: mags.output.as_slice().unwrap(),
            f32_ref: Some(f32_ref.as_slice().unwrap()),
        },
    )
    .unwrap_or_else(|e| panic!("{name} output: {e}"));
    println!("{name}: output {note}");
}

#[test]
fn matches_pytorch_golden_norm_topk() {
    check_fixture("qwen3_moe_tiny");
}

#[test]
fn matches_pytorch_golden_sharded_no_norm() {
    check_fixture("qwen3_moe_tiny_sharded");
}
