//! `FamilyAdapter`'s own accessors on transformers-written checkpoints (conformance/fixtures):
//! the layer prefix, the key-mapping pass of the converter, and the error for a native key under
//! `mlp.experts` that is no native expert tensor.

use adapters::family_adapter::FamilyAdapter;
use adapters::{HfCheckpoint, MoeAdapter};
use std::collections::BTreeMap;
use std::path::PathBuf;

fn open(name: &str) -> HfCheckpoint {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../conformance/fixtures")
        .join(name);
    HfCheckpoint::open(&dir).unwrap()
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
