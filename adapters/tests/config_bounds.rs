//! config.json's sizes are checked against the checkpoint's keys before they size anything: an
//! absurd `num_experts` or `num_hidden_layers` on a transformers-written fixture is a one-line
//! error naming config.json, the field, its value and what the checkpoint has (not a
//! `capacity overflow` panic, an abort or seconds of key building), on the HF and the native
//! side.

mod common;

use adapters::convert::{convert, ConvertOptions, Direction};
use adapters::{adapter_for, Dtype, HfCheckpoint, HostTensor};
use serde_json::Value;
use std::path::{Path, PathBuf};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../conformance/fixtures")
        .join(name)
}

/// Copies `src`'s files into `dst`, then sets `field` (of `text_config` when the config has one)
/// in its config.json to `value`.
fn copy_with(src: &Path, dst: &Path, field: &str, value: Value) {
    common::copy_dir(src, dst);
    let path = dst.join("config.json");
    let mut cfg: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let obj = match cfg.get_mut("text_config") {
        Some(t) if t.get("hidden_size").is_some() => t,
        _ => &mut cfg,
    };
    assert!(obj.get(field).is_some(), "{}: no '{field}'", src.display());
    obj[field] = value;
    std::fs::write(&path, cfg.to_string()).unwrap();
}

fn adapter_error(dir: &Path) -> String {
    let ck = HfCheckpoint::open(dir).unwrap();
    match adapter_for(&ck) {
        Err(e) => e.to_string(),
        Ok(a) => a.from_hf(&ck).unwrap_err().to_string(),
    }
}

#[test]
fn an_absurd_expert_count_is_refused_before_it_sizes_the_key_lists() {
    // qwen3_moe_tiny: 8 experts per layer, per-expert keys, MoE layers 0 and 1.
    for e in [1u64 << 32, 1_000_000, 9] {
        let tmp = tempfile::tempdir().unwrap();
        copy_with(
            &fixture("qwen3_moe_tiny"),
            tmp.path(),
            "num_local_experts",
            e.into(),
        );
        let err = adapter_error(tmp.path());
        let want = format!(
            "config.json: num_experts is {e} but layer 0 has 8 experts (0..=7) under \
             'model.layers.0.mlp.experts.'"
        );
        assert!(err.contains(&want), "{err}");
        assert!(!err.contains('\n'), "{err}");
    }
}

#[test]
fn an_absurd_expert_count_of_a_fused_checkpoint_is_a_shape_error() {
    // gpt_oss_tiny: fused experts [E, H, 2I]; the key lists do not grow with E.
    let tmp = tempfile::tempdir().unwrap();
    copy_with(
        &fixture("gpt_oss_tiny"),
        tmp.path(),
        "num_local_experts",
        (1u64 << 32).into(),
    );
    let err = adapter_error(tmp.path());
    assert!(
        err.contains("model.layers.0.mlp.experts.gate_up_proj")
            && err.contains(&format!("E={}", 1u64 << 32))
            && err.contains("has shape [8, 64, 64]"),
        "{err}"
    );
}

#[test]
fn an_absurd_layer_count_is_refused_naming_the_last_layer() {
    for (name, l) in [("qwen3_moe_tiny", 1u64 << 32), ("mixtral_tiny", 3)] {
        let tmp = tempfile::tempdir().unwrap();
        copy_with(&fixture(name), tmp.path(), "num_hidden_layers", l.into());
        let err = adapter_error(tmp.path());
        let want = format!(
            "config.json: num_hidden_layers is {l} but the checkpoint has no key under \
             'model.layers.2.' (2 layers, the last 1)"
        );
        assert!(err.contains(&want), "{name}: {err}");
    }
}

#[test]
fn a_native_checkpoint_checks_the_expert_count_against_its_tensors() {
    let tmp = tempfile::tempdir().unwrap();
    let (nat, bad, back) = (
        tmp.path().join("native"),
        tmp.path().join("bad"),
        tmp.path().join("hf"),
    );
    let opts = ConvertOptions::default();
    convert(
        &fixture("qwen3_moe_tiny"),
        &nat,
        Direction::HfToNative,
        &opts,
        &|_| {},
    )
    .unwrap();
    copy_with(&nat, &bad, "num_local_experts", (1u64 << 32).into());
    let err = convert(&bad, &back, Direction::NativeToHf, &opts, &|_| {})
        .unwrap_err()
        .to_string();
    let want = format!(
        "config.json: num_experts is {} but 'model.layers.0.mlp.experts.gate_and_up_projs' has \
         shape [8, 64, 64] ([E, H, 2I])",
        1u64 << 32
    );
    assert!(err.contains(&want), "{err}");
    assert!(!back.exists());
    copy_with(
        &nat,
        &tmp.path().join("bad2"),
        "num_hidden_layers",
        5.into(),
    );
    let err = convert(
        &tmp.path().join("bad2"),
        &back,
        Direction::NativeToHf,
        &opts,
        &|_| {},
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains(
            "num_hidden_layers is 5 but the checkpoint has no key under 'model.layers.2.'"
        ),
        "{err}"
    );
}

#[test]
fn a_size_beyond_2_pow_32_is_refused_before_any_arithmetic() {
    // step3p5: 2 * moe_intermediate_size would overflow.
    for (name, field) in [
        ("step3p5_tiny", "moe_intermediate_size"),
        ("qwen3_moe_tiny", "num_local_experts"),
        ("qwen3_moe_tiny", "hidden_size"),
        ("qwen3_moe_tiny", "num_hidden_layers"),
        ("qwen3_next_tiny", "shared_expert_intermediate_size"),
    ] {
        let tmp = tempfile::tempdir().unwrap();
        copy_with(&fixture(name), tmp.path(), field, u64::MAX.into());
        let err = adapter_error(tmp.path());
        let what = if field.starts_with("shared") {
            "the shared experts' intermediate size"
        } else {
            field
        };
        assert!(
            err.contains(&format!(
                "/config.json: {what} = {} is absurd (more than 4294967296)",
                u64::MAX
            )),
            "{name} {field}: {err}"
        );
    }
}

#[test]
fn a_layer_beyond_num_hidden_layers_is_an_error_unless_it_is_an_mtp_layer() {
    // qwen3_moe_tiny has layers 0 and 1: with num_hidden_layers 1, layer 1 is unexpected.
    let tmp = tempfile::tempdir().unwrap();
    copy_with(
        &fixture("qwen3_moe_tiny"),
        tmp.path(),
        "num_hidden_layers",
        1.into(),
    );
    let err = adapter_error(tmp.path());
    assert!(
        err.ends_with("keys under 'model.layers.1.' but config.json's num_hidden_layers is 1"),
        "{err}"
    );
    // deepseek_v3_tiny (layer 0 dense, 1 MoE) read as one layer plus one MTP layer: the MTP
    // layer is a MoE layer like the others, and holds the MTP head's own tensors (enorm, hnorm
    // [H], eh_proj [H, 2H], shared_head.norm [H]).
    let mtp_config = |c: &mut Value| {
        c["num_hidden_layers"] = 1.into();
        c["num_nextn_predict_layers"] = 1.into();
    };
    let tmp = tempfile::tempdir().unwrap();
    let _ = common::edited_copy("deepseek_v3_tiny", tmp.path(), mtp_config, |_| {});
    let err = adapter_error(tmp.path());
    assert!(
        err.contains("missing 'model.layers.1.enorm.weight' (deepseek_v3 [H], from config.json) (4 missing keys)"),
        "{err}"
    );
    let tmp = tempfile::tempdir().unwrap();
    let _ = common::edited_copy("deepseek_v3_tiny", tmp.path(), mtp_config, |t| {
        for (k, shape) in [
            ("enorm", vec![64]),
            ("hnorm", vec![64]),
            ("shared_head.norm", vec![64]),
            ("eh_proj", vec![64, 128]),
        ] {
            let n = shape.iter().product::<usize>();
            let tensor = HostTensor::new(Dtype::BF16, shape, vec![7; 2 * n]).unwrap();
            t.insert(format!("model.layers.1.{k}.weight"), tensor);
        }
    });
    let p = tmp.path().join("config.json");
    let mut c: Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    let ck = HfCheckpoint::open(tmp.path()).unwrap();
    let a = adapter_for(&ck).unwrap();
    let native = a.from_hf(&ck).unwrap();
    assert!(native.contains_key("model.layers.1.mlp.experts.gate_and_up_projs"));
    assert_eq!(
        a.native_moe_keys(1).unwrap().gate_weight,
        "model.layers.1.mlp.gate.weight"
    );
    // through the converter, to native and back, bit for bit
    let (nat, back) = (tmp.path().join("nat"), tmp.path().join("back"));
    let opts = ConvertOptions::default();
    convert(tmp.path(), &nat, Direction::HfToNative, &opts, &|_| {}).unwrap();
    convert(&nat, &back, Direction::NativeToHf, &opts, &|_| {}).unwrap();
    let back = HfCheckpoint::open(&back).unwrap();
    assert_eq!(back.keys(), ck.keys());
    for k in ck.keys() {
        assert_eq!(back.tensor(k).unwrap(), ck.tensor(k).unwrap(), "{k}");
    }
    // and with num_nextn_predict_layers 0 layer 1 is unexpected
    c["num_nextn_predict_layers"] = 0.into();
    std::fs::write(&p, c.to_string()).unwrap();
    let err = adapter_error(tmp.path());
    assert!(
        err.ends_with("keys under 'model.layers.1.' but config.json's num_hidden_layers is 1"),
        "{err}"
    );
}
