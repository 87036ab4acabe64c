//! `FamilyAdapter`'s own accessors on transformers-written checkpoints (conformance/fixtures):
//! the layer prefix, the key-mapping pass of the converter, and the error for a native key under
//! `mlp.experts` that is no native expert tensor.

mod common;

use adapters::family_adapter::FamilyAdapter;
use adapters::{Dtype, HfCheckpoint, MoeAdapter};
use std::collections::BTreeMap;

fn open(name: &str) -> HfCheckpoint {
    HfCheckpoint::open(&common::fixture(name)).unwrap()
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
fn the_shared_expert_gate_comes_with_the_shared_expert() {
    // qwen3_next: config.json gives shared_expert_intermediate_size, so transformers builds the
    // shared expert and its sigmoid gate `mlp.shared_expert_gate.weight` [1, H].
    let full = FamilyAdapter::from_checkpoint(&open("qwen3_next_tiny")).unwrap();
    assert_eq!(full.layout_choice().optional[2..], [true, true]);
    let tmp = tempfile::tempdir().unwrap();
    let ck = common::edited_copy(
        "qwen3_next_tiny",
        tmp.path(),
        |_| {},
        |t| t.retain(|k, _| !k.ends_with("mlp.shared_expert_gate.weight")),
    );
    let a = FamilyAdapter::from_checkpoint(&ck).unwrap();
    assert_eq!(a.layout_choice().optional[2..], [true, true]);
    let e = a.from_hf(&ck).unwrap_err().to_string();
    assert!(
        e.ends_with(
            "layer 0: missing 'model.layers.0.mlp.shared_expert_gate.weight' (qwen3_next \
             shared-expert gate, [1, H]; config.json: E=8, H=64)"
        ),
        "{e}"
    );
}

#[test]
fn where_config_json_is_silent_an_optional_module_is_detected_by_its_own_key() {
    // step3p5 without `use_moe_router_bias`: the checkpoint's `moe.router_bias` keys decide.
    let no_field = |c: &mut serde_json::Value| {
        c.as_object_mut()
            .unwrap()
            .remove("use_moe_router_bias")
            .unwrap();
    };
    let tmp = tempfile::tempdir().unwrap();
    let ck = common::edited_copy("step3p5_tiny", tmp.path(), no_field, |_| {});
    let a = FamilyAdapter::from_checkpoint(&ck).unwrap();
    assert_eq!(a.layout_choice().optional, [false, true, true, false]);
    a.from_hf(&ck).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let ck = common::edited_copy("step3p5_tiny", tmp.path(), no_field, |t| {
        t.retain(|k, _| !k.ends_with("moe.router_bias"))
    });
    let a = FamilyAdapter::from_checkpoint(&ck).unwrap();
    // [router bias, score-correction bias, shared expert, shared-expert gate]
    assert_eq!(a.layout_choice().optional, [false, false, true, false]);
    a.from_hf(&ck).unwrap();
}

#[test]
fn per_expert_tensors_of_one_native_tensor_must_share_a_dtype() {
    let tmp = tempfile::tempdir().unwrap();
    let key = "model.layers.0.mlp.experts.3.up_proj.weight";
    let ck = common::edited_copy(
        "qwen3_moe_tiny",
        tmp.path(),
        |_| {},
        |t| {
            let old = &t[key];
            assert_eq!(old.dtype, Dtype::BF16);
            let f32 = common::rand_tensor(7, Dtype::F32, &old.shape.clone());
            t.insert(key.to_string(), f32);
        },
    );
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

#[test]
fn fused_layers_of_one_checkpoint_share_an_orientation() {
    // qwen3_vl_moe_tiny is written transformers-style (down_proj [E, H, I] = [8, 64, 32]); with
    // layer 1's down_proj native-style ([E, I, H] = [8, 32, 64]) the layers disagree.
    let tmp = tempfile::tempdir().unwrap();
    let key = "model.language_model.layers.1.mlp.experts.down_proj";
    let ck = common::edited_copy(
        "qwen3_vl_moe_tiny",
        tmp.path(),
        |_| {},
        |t| {
            assert_eq!(t[key].shape, [8, 64, 32]);
            let d = t[key].dtype;
            t.insert(key.to_string(), common::rand_tensor(5, d, &[8, 32, 64]));
        },
    );
    let e = FamilyAdapter::from_checkpoint(&ck).unwrap_err().to_string();
    assert!(
        e.ends_with(
            "fused experts of layer 1 are native [E, H, 2I] / [E, I, H] but those of layer 0 are \
             transformers [E, 2I, H] / [E, H, I]"
        ),
        "{e}"
    );
}
