//! `FamilyAdapter`'s own accessors on transformers-written checkpoints (conformance/fixtures):
//! the layer prefix, the key-mapping pass of the converter, and the error for a native key under
//! `mlp.experts` that is no native expert tensor.

mod common;

use adapters::family_adapter::FamilyAdapter;
use adapters::{Dtype, HfCheckpoint, HostTensor, MoeAdapter};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../conformance/fixtures")
        .join(name)
}

fn open(name: &str) -> HfCheckpoint {
    HfCheckpoint::open(&fixture(name)).unwrap()
}

/// A copy of fixture `name` in `dir` (config.json + one model.safetensors) whose tensors are
/// `edit` applied to the fixture's, written with the safetensors crate (common::write_ckpt).
fn edited_copy(
    name: &str,
    dir: &Path,
    edit: impl FnOnce(&mut BTreeMap<String, HostTensor>),
) -> HfCheckpoint {
    let ck = open(name);
    let mut tensors: BTreeMap<String, HostTensor> = ck
        .keys()
        .into_iter()
        .map(|k| (k.to_string(), ck.tensor(k).unwrap()))
        .collect();
    edit(&mut tensors);
    common::write_ckpt(dir, ck.config(), &tensors, 1);
    HfCheckpoint::open(dir).unwrap()
}

#[test]
fn the_layer_prefix_is_the_checkpoints() {
    let q = FamilyAdapter::from_checkpoint(&open("qwen3_moe_tiny")).unwrap();
    assert_eq!(q.prefix(), "model.layers");
    let vl = FamilyAdapter::from_checkpoint(&open("qwen3_vl_moe_tiny")).unwrap();
    assert_eq!(vl.prefix(), "model.language_model.layers");
}

#[test]
fn map_keys_groups_the_per_expert_keys_of_each_native_tensor() {
    let ck = open("qwen3_moe_tiny");
    let a = FamilyAdapter::from_checkpoint(&ck).unwrap();
    let keys = ck.keys();
    let m = a.map_keys(keys.iter().copied());
    let e = a.num_experts();
    let gu = &m["model.layers.0.mlp.experts.gate_and_up_projs"];
    assert_eq!(gu.len(), 2 * e, "{gu:?}");
    assert!(gu.contains(&"model.layers.0.mlp.experts.3.up_proj.weight".to_string()));
    let down = &m["model.layers.0.mlp.experts.down_projs"];
    assert_eq!(down.len(), e);
    assert!(down.iter().all(|k| k.ends_with(".down_proj.weight")));
    // Keys outside the experts pass through under their own name; every HF key is mapped once.
    assert_eq!(
        m["model.layers.0.mlp.gate.weight"],
        vec!["model.layers.0.mlp.gate.weight"]
    );
    assert_eq!(m.values().map(Vec::len).sum::<usize>(), keys.len());
}

#[test]
fn an_unknown_native_expert_key_names_what_the_layer_has() {
    let ck = open("qwen3_moe_tiny");
    let a = FamilyAdapter::from_checkpoint(&ck).unwrap();
    let mut native = BTreeMap::new();
    let t = ck.tensor("model.layers.0.mlp.gate.weight").unwrap();
    native.insert("model.layers.0.mlp.experts.bogus".to_string(), t);
    let e = a.to_hf(&native).unwrap_err().to_string();
    assert!(
        e.contains("unexpected key 'model.layers.0.mlp.experts.bogus'")
            && e.contains("has only gate_and_up_projs / down_projs under mlp.experts"),
        "{e}"
    );
}

#[test]
fn an_optional_module_is_detected_by_its_own_key_only() {
    // qwen3_next has a shared expert and its sigmoid gate `mlp.shared_expert_gate.weight`; a
    // checkpoint without the gate keeps the shared expert and loses only the gate.
    let full = FamilyAdapter::from_checkpoint(&open("qwen3_next_tiny")).unwrap();
    assert_eq!(full.layout_choice().optional[2..], [true, true]);
    let tmp = tempfile::tempdir().unwrap();
    let ck = edited_copy("qwen3_next_tiny", tmp.path(), |t| {
        t.retain(|k, _| !k.ends_with("mlp.shared_expert_gate.weight"))
    });
    let a = FamilyAdapter::from_checkpoint(&ck).unwrap();
    // [router bias, e_score_correction_bias, shared expert, shared expert gate]
    assert_eq!(a.layout_choice().optional[1..], [false, true, false]);
    // and the adapter then reads the checkpoint without asking for the missing gate.
    a.from_hf(&ck).unwrap();
}

#[test]
fn per_expert_tensors_of_one_native_tensor_must_share_a_dtype() {
    let tmp = tempfile::tempdir().unwrap();
    let key = "model.layers.0.mlp.experts.3.up_proj.weight";
    let ck = edited_copy("qwen3_moe_tiny", tmp.path(), |t| {
        let old = &t[key];
        assert_eq!(old.dtype, Dtype::BF16);
        let f32 = common::rand_tensor(7, Dtype::F32, &old.shape.clone());
        t.insert(key.to_string(), f32);
    });
    let a = FamilyAdapter::from_checkpoint(&ck).unwrap();
    let e = a.validate(&ck).unwrap_err().to_string();
    assert!(
        e.contains(&format!("tensor '{key}' is F32 but"))
            && e.contains("must share a dtype (no casting)"),
        "{e}"
    );
}

#[test]
fn the_unknown_key_error_lists_the_suffixes_of_the_only_moe_layer() {
    // deepseek_v3_tiny: first_k_dense_replace 1 of 2 layers, so layer 1 is the one MoE layer.
    let ck = open("deepseek_v3_tiny");
    let a = FamilyAdapter::from_checkpoint(&ck).unwrap();
    let mut native = BTreeMap::new();
    let t = ck.tensor("model.layers.1.mlp.gate.weight").unwrap();
    native.insert("model.layers.1.mlp.experts.bogus".to_string(), t);
    let e = a.to_hf(&native).unwrap_err().to_string();
    assert!(
        e.contains("has only gate_and_up_projs / down_projs under mlp.experts"),
        "{e}"
    );
}
