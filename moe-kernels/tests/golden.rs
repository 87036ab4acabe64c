//! The reference forward against PyTorch: the golden fixtures in `conformance/fixtures/`
//! (written by `conformance/fixtures/generate.py` with transformers' own Qwen3-MoE eager block,
//! f32 compute on the bf16 weights). Reads the HF disk keys directly and builds the native
//! layout by hand (`gate_and_up_projs[e] = cat([gate_e.T, up_e.T], -1)`, `down_projs[e] = down_e.T`).

mod fixture_io;

use fixture_io::{fixture_dir, load, model_files, Tensors};
use moe_kernels::{qwen3_moe_block_forward, RouterConfig};
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
    let (golden, _) = load(&[dir.join("golden.safetensors")]);
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
    let x = matrix(&golden, "input");
    let want = matrix(&golden, "output");
    let got = qwen3_moe_block_forward(x.view(), gate.view(), gate_up.view(), down.view(), &cfg)
        .unwrap()
        .output;
    assert_eq!(got.dim(), want.dim());
    let max_diff = got
        .iter()
        .zip(want.iter())
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    println!("{name}: max |ours - torch| = {max_diff:e}");
    assert!(max_diff < 2e-5, "{name}: max |ours - torch| = {max_diff}");
}

#[test]
fn matches_pytorch_golden_norm_topk() {
    check_fixture("qwen3_moe_tiny");
}

#[test]
fn matches_pytorch_golden_sharded_no_norm() {
    check_fixture("qwen3_moe_tiny_sharded");
}
