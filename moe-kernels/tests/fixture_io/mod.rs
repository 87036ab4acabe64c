//! Reading golden fixtures for the tests: safetensors files decoded to f32 arrays (BF16 upcast
//! exactly, F32 as is) with their header metadata, and the weight files of an HF checkpoint folder.
//! Independent of the adapters crate on purpose: the golden tests build the native layout by hand.

#![allow(dead_code)] // each test binary uses a subset

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use ndarray::{ArrayD, IxDyn};
use safetensors::{Dtype, SafeTensors};

/// Tensors by name.
pub type Tensors = HashMap<String, ArrayD<f32>>;

/// `conformance/fixtures/<name>`.
pub fn fixture_dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../conformance/fixtures")
        .join(name)
}

/// The values of a BF16 / F32 / F64 tensor as f64 (exact).
fn values(name: &str, view: &safetensors::tensor::TensorView) -> Vec<f64> {
    let d = view.data();
    match view.dtype() {
        Dtype::BF16 => d
            .chunks_exact(2)
            .map(|b| f64::from(half::bf16::from_bits(u16::from_le_bytes([b[0], b[1]]))))
            .collect(),
        Dtype::F32 => d
            .chunks_exact(4)
            .map(|b| f64::from(f32::from_le_bytes([b[0], b[1], b[2], b[3]])))
            .collect(),
        Dtype::F64 => d
            .chunks_exact(8)
            .map(|b| f64::from_le_bytes(b.try_into().unwrap()))
            .collect(),
        other => panic!("{name}: unexpected dtype {other:?}"),
    }
}

/// Every tensor of `files` as f64, and the files' merged `__metadata__`.
fn load_all(files: &[PathBuf]) -> (HashMap<String, ArrayD<f64>>, HashMap<String, String>) {
    let mut out = HashMap::new();
    let mut meta = HashMap::new();
    for file in files {
        let bytes = std::fs::read(file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        let (_, m) = SafeTensors::read_metadata(&bytes).unwrap();
        if let Some(m) = m.metadata() {
            meta.extend(m.clone());
        }
        let st = SafeTensors::deserialize(&bytes).unwrap();
        for (name, view) in st.tensors() {
            let data = values(&name, &view);
            out.insert(
                name,
                ArrayD::from_shape_vec(IxDyn(view.shape()), data).unwrap(),
            );
        }
    }
    (out, meta)
}

/// Every tensor of `files` as f32 (weights: bf16 / f32 exactly; F64 rounded), and the files'
/// merged `__metadata__`.
pub fn load(files: &[PathBuf]) -> (Tensors, HashMap<String, String>) {
    let (all, meta) = load_all(files);
    let out = all
        .into_iter()
        .map(|(k, a)| (k, a.mapv(|v| v as f32)))
        .collect();
    (out, meta)
}

/// Every tensor of a golden file (F64 truth, F32 `f32.*`, BF16 `bf16.*`) as f64, and its metadata.
pub fn load64(file: &Path) -> (HashMap<String, ArrayD<f64>>, HashMap<String, String>) {
    load_all(&[file.to_path_buf()])
}

/// The weight files of an HF checkpoint folder (sharded with an index, or `model.safetensors`).
pub fn model_files(dir: &Path) -> Vec<PathBuf> {
    let index = dir.join("model.safetensors.index.json");
    if !index.exists() {
        return vec![dir.join("model.safetensors")];
    }
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&index).unwrap()).unwrap();
    let mut files: Vec<String> = json["weight_map"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_str().unwrap().to_owned())
        .collect();
    files.sort();
    files.dedup();
    files.into_iter().map(|f| dir.join(f)).collect()
}
