//! The reference forward against PyTorch: the golden fixtures in `conformance/fixtures/`
//! (written by `conformance/fixtures/generate.py` with transformers' own Qwen3-MoE eager block,
//! f32 compute on the bf16 weights). Reads the HF disk keys directly and builds the native
//! layout by hand (`gate_and_up_projs[e] = cat([gate_e.T, up_e.T], -1)`, `down_projs[e] = down_e.T`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use moe_kernels::{qwen3_moe_block_forward, RouterConfig};
use ndarray::{s, Array2, Array3};
use safetensors::{Dtype, SafeTensors};

fn fixture_dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../conformance/fixtures")
        .join(name)
}

/// All tensors of the given files as f32 (BF16 upcast exactly, F32 as is), with their shapes.
fn load(files: &[PathBuf]) -> HashMap<String, (Vec<usize>, Vec<f32>)> {
    let mut out = HashMap::new();
    for file in files {
        let bytes = std::fs::read(file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        let st = SafeTensors::deserialize(&bytes).unwrap();
        for (name, view) in st.tensors() {
            let data: Vec<f32> = match view.dtype() {
                Dtype::BF16 => view
                    .data()
                    .chunks_exact(2)
                    .map(|b| half::bf16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32())
                    .collect(),
                Dtype::F32 => view
                    .data()
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect(),
                other => panic!("{name}: unexpected dtype {other:?}"),
            };
            out.insert(name, (view.shape().to_vec(), data));
        }
    }
    out
}

fn model_files(dir: &Path) -> Vec<PathBuf> {
    let index = dir.join("model.safetensors.index.json");
    if index.exists() {
        let text = std::fs::read_to_string(&index).unwrap();
        let json: serde_json::Value = serde_json::from_str(&text).unwrap();
        let mut files: Vec<String> = json["weight_map"]
            .as_object()
            .unwrap()
            .values()
            .map(|v| v.as_str().unwrap().to_owned())
            .collect();
        files.sort();
        files.dedup();
        files.into_iter().map(|f| dir.join(f)).collect()
    } else {
        vec![dir.join("model.safetensors")]
    }
}

fn matrix(t: &HashMap<String, (Vec<usize>, Vec<f32>)>, key: &str) -> Array2<f32> {
    let (shape, data) = t.get(key).unwrap_or_else(|| panic!("missing tensor {key}"));
    Array2::from_shape_vec((shape[0], shape[1]), data.clone()).unwrap()
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
    let weights = load(&model_files(&dir));
    let golden = load(&[dir.join("golden.safetensors")]);
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
