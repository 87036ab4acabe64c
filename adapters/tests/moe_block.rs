//! The non-expert tensors of each MoE block (router, router bias, score-correction bias, shared
//! expert and its gate) are checked on every read, on transformers-written fixtures damaged one
//! tensor at a time: a missing or wrongly shaped one, or a stray key in the block, is a one-line
//! error naming the key, what it is and the shape config.json gives; on the HF side (adapter
//! reads, the converter) and the native side (the converter back to HF).

mod common;

use adapters::convert::{convert, ConvertOptions, Direction, NATIVE_SIDECAR};
use adapters::{adapter_for, HfCheckpoint, HostTensor};
use std::collections::BTreeMap;
use std::path::Path;

type Edit = fn(&mut BTreeMap<String, HostTensor>);

/// The error of reading `name` after `edit`, through the adapter and through the converter
/// (both must say the same, and the converter must leave no output).
fn hf_error(name: &str, edit: Edit) -> String {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    std::fs::create_dir(&src).unwrap();
    let ck = common::edited_copy(name, &src, |_| {}, edit);
    let e = adapter_for(&ck)
        .and_then(|a| a.from_hf(&ck))
        .unwrap_err()
        .to_string();
    let dst = tmp.path().join("native");
    let c = convert(
        &src,
        &dst,
        Direction::HfToNative,
        &ConvertOptions::default(),
        &|_| {},
    )
    .unwrap_err()
    .to_string();
    assert_eq!(e, c);
    assert!(!dst.exists() && !e.contains('\n'), "{e}");
    e
}

fn replace(t: &mut BTreeMap<String, HostTensor>, key: &str, shape: &[usize]) {
    let dtype = t[key].dtype;
    t.insert(key.to_string(), common::rand_tensor(3, dtype, shape));
}

#[test]
fn the_fixtures_pass_the_block_check() {
    for name in [
        "qwen3_moe_tiny",
        "qwen3_next_tiny",
        "qwen3_5_moe_tiny",
        "deepseek_v3_tiny",
        "glm4_moe_tiny",
        "gpt_oss_tiny",
        "mixtral_tiny",
        "step3p5_tiny",
        "qwen3_vl_moe_tiny",
    ] {
        let ck = HfCheckpoint::open(&common::fixture(name)).unwrap();
        adapter_for(&ck).unwrap().from_hf(&ck).unwrap();
    }
}

#[test]
fn a_wrongly_shaped_router_is_named() {
    let e = hf_error("qwen3_moe_tiny", |t| {
        replace(t, "model.layers.1.mlp.gate.weight", &[8, 63])
    });
    assert!(
        e.ends_with(
            "model.safetensors: tensor 'model.layers.1.mlp.gate.weight' has shape [8, 63] but \
             config.json (E=8, H=64) gives [8, 64] [E, H]"
        ),
        "{e}"
    );
    let e = hf_error("mixtral_tiny", |t| {
        t.remove("model.layers.0.block_sparse_moe.gate.weight");
    });
    assert!(
        e.ends_with(
            "layer 0: missing 'model.layers.0.block_sparse_moe.gate.weight' (mixtral router, \
             [E, H]; config.json: E=8, H=64)"
        ),
        "{e}"
    );
}

#[test]
fn a_missing_score_correction_bias_or_router_bias_is_named() {
    let e = hf_error("deepseek_v3_tiny", |t| {
        t.remove("model.layers.1.mlp.gate.e_score_correction_bias");
    });
    assert!(
        e.ends_with(
            "layer 1: missing 'model.layers.1.mlp.gate.e_score_correction_bias' (deepseek_v3 \
             score-correction bias, [E]; config.json: E=8, H=64)"
        ),
        "{e}"
    );
    let e = hf_error("gpt_oss_tiny", |t| {
        replace(t, "model.layers.1.mlp.router.bias", &[7])
    });
    assert!(
        e.ends_with(
            "tensor 'model.layers.1.mlp.router.bias' has shape [7] but config.json (E=8, H=64) gives \
             [8] [E]"
        ),
        "{e}"
    );
}

#[test]
fn a_wrongly_shaped_shared_expert_is_named_with_is() {
    // qwen3_next: shared_expert_intermediate_size 48; deepseek_v3: 1 x moe_intermediate_size 32.
    let e = hf_error("qwen3_next_tiny", |t| {
        replace(
            t,
            "model.layers.1.mlp.shared_expert.down_proj.weight",
            &[64, 32],
        )
    });
    assert!(
        e.ends_with(
            "tensor 'model.layers.1.mlp.shared_expert.down_proj.weight' has shape [64, 32] but \
             config.json (E=8, H=64, Is=48) gives [64, 48] [H, Is]"
        ),
        "{e}"
    );
    let e = hf_error("deepseek_v3_tiny", |t| {
        t.remove("model.layers.1.mlp.shared_experts.up_proj.weight");
    });
    assert!(
        e.ends_with(
            "layer 1: missing 'model.layers.1.mlp.shared_experts.up_proj.weight' (deepseek_v3 \
             shared expert, [Is, H]; config.json: E=8, H=64)"
        ),
        "{e}"
    );
}

#[test]
fn a_stray_key_in_the_block_is_an_error() {
    let e = hf_error("qwen3_moe_tiny", |t| {
        let x = t["model.layers.0.mlp.gate.weight"].clone();
        t.insert("model.layers.0.mlp.gate.bias".into(), x);
    });
    assert!(
        e.ends_with(
            "unexpected key 'model.layers.0.mlp.gate.bias' in the MoE block of layer 0 \
             (qwen3_moe expects model.layers.0.mlp.gate.weight, and the experts)"
        ),
        "{e}"
    );
}

fn to_native(name: &str, dir: &Path) -> std::path::PathBuf {
    let nat = dir.join("native");
    convert(
        &common::fixture(name),
        &nat,
        Direction::HfToNative,
        &ConvertOptions::default(),
        &|_| {},
    )
    .unwrap();
    nat
}

/// Rewrites the native checkpoint `nat` (one or more files) with `edit` applied, keeping its
/// config.json and sidecar.
fn edit_native(nat: &Path, edit: Edit) {
    let ck = HfCheckpoint::open(nat).unwrap();
    let mut t: BTreeMap<String, HostTensor> = ck
        .keys()
        .into_iter()
        .map(|k| (k.to_string(), ck.tensor(k).unwrap()))
        .collect();
    let cfg = ck.config().clone();
    drop(ck);
    edit(&mut t);
    for e in std::fs::read_dir(nat).unwrap() {
        let p = e.unwrap().path();
        if p.extension()
            .is_some_and(|x| x == "safetensors" || x == "json")
            && !p.ends_with(NATIVE_SIDECAR)
        {
            std::fs::remove_file(p).unwrap();
        }
    }
    common::write_ckpt(nat, &cfg, &t, 1);
}

#[test]
fn the_native_side_checks_the_block_too() {
    let tmp = tempfile::tempdir().unwrap();
    let nat = to_native("qwen3_next_tiny", tmp.path());
    edit_native(&nat, |t| {
        t.remove("model.layers.0.mlp.shared_expert_gate.weight");
    });
    let back = tmp.path().join("hf");
    let e = convert(
        &nat,
        &back,
        Direction::NativeToHf,
        &ConvertOptions::default(),
        &|_| {},
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.ends_with(
            "layer 0: missing 'model.layers.0.mlp.shared_expert_gate.weight' (qwen3_next \
             shared-expert gate, [1, H]; config.json: E=8, H=64)"
        ),
        "{e}"
    );
    assert!(!back.exists());
}

/// The converter's error on `fixture`'s native checkpoint after its sidecar's `optional` (which
/// must read `was` first) gets `value` at `index`, and the sidecar's path.
fn sidecar_error(fixture: &str, was: [bool; 4], index: usize, value: bool) -> (String, String) {
    let tmp = tempfile::tempdir().unwrap();
    let nat = to_native(fixture, tmp.path());
    let side = nat.join(NATIVE_SIDECAR);
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&side).unwrap()).unwrap();
    assert_eq!(v["optional"], serde_json::json!(was));
    v["optional"][index] = value.into();
    std::fs::write(&side, v.to_string()).unwrap();
    let e = convert(
        &nat,
        &tmp.path().join("hf"),
        Direction::NativeToHf,
        &ConvertOptions::default(),
        &|_| {},
    )
    .unwrap_err()
    .to_string();
    (side.display().to_string(), e)
}

#[test]
fn the_sidecar_cannot_drop_a_module_config_json_has() {
    let (side, e) = sidecar_error("deepseek_v3_tiny", [false, true, true, false], 1, false);
    assert_eq!(
        e,
        format!("{side}: optional[1] (score-correction bias) is false but config.json says true")
    );
}

#[test]
fn the_sidecar_cannot_add_a_module_the_family_lacks() {
    // qwen3_moe has no shared expert: a sidecar saying it has one is refused.
    let (side, e) = sidecar_error("qwen3_moe_tiny", [false; 4], 2, true);
    assert_eq!(
        e,
        format!("{side}: optional[2] (shared expert) is true but config.json says false")
    );
}
