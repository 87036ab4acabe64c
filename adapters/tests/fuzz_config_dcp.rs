//! Value-level fuzzing of config.json, seeded with committed transformers outputs: every field
//! of the fixtures' configs replaced by absurd or ill-typed values (huge integers, negatives,
//! floats, strings, lists, objects, null) through the adapter and a full read; and every byte of
//! a torch-written DCP `.metadata` replaced by a newline. Either works or gives a one-line error;
//! never a panic (proptest; the case counts bound the run time, a few seconds). The byte-level
//! targets with a committed corpus are in `fuzz_targets.rs`.

use adapters::{adapter_for, dcp, HfCheckpoint};
use proptest::prelude::*;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../conformance/fixtures")
}

/// Checkpoint fixtures whose config.json is mutated (one per expert layout and config style).
const MODELS: [&str; 6] = [
    "qwen3_moe_tiny",
    "qwen3_vl_moe_tiny",
    "deepseek_v3_tiny",
    "gpt_oss_tiny",
    "step3p5_tiny",
    "qwen3_next_tiny",
];

/// Values an absurd config may hold.
fn absurd_value() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        Just(json!(0)),
        Just(json!(1)),
        Just(json!(u64::MAX)),
        Just(json!(1u64 << 32)),
        Just(json!(1_000_000)),
        Just(json!(-1)),
        Just(json!(1.5)),
        Just(json!(1e300)),
        Just(json!("7")),
        Just(json!(true)),
        Just(json!([0, 1, 99999999])),
        Just(json!("0,1,x")),
        Just(json!({})),
        any::<i64>().prop_map(|v| json!(v)),
    ]
}

/// Opens `dir`, builds the adapter and reads every native tensor: any error is one line.
fn exercise(dir: &Path) {
    let r = HfCheckpoint::open(dir).and_then(|ck| {
        let a = adapter_for(&ck)?;
        let native = a.from_hf(&ck)?;
        a.to_hf(&native).map(|_| ())
    });
    if let Err(e) = r {
        assert!(!e.to_string().contains('\n'), "{e}");
    }
}

fn link_files(src: &Path, dst: &Path, except: &str) {
    for e in std::fs::read_dir(src).unwrap() {
        let p = e.unwrap().path();
        let name = p.file_name().unwrap();
        if p.is_file() && name != except {
            std::os::unix::fs::symlink(&p, dst.join(name)).unwrap();
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 192, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn an_absurd_config_value_never_panics(model in 0..MODELS.len(), field in any::<prop::sample::Index>(),
                                           value in absurd_value(), in_text in any::<bool>()) {
        let src = fixtures().join(MODELS[model]);
        let mut cfg: Value =
            serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
        let obj = match cfg.get_mut("text_config") {
            Some(t) if in_text && t.is_object() => t,
            _ => &mut cfg,
        };
        let keys: Vec<String> = obj.as_object().unwrap().keys().cloned().collect();
        let k = keys[field.index(keys.len())].clone();
        obj[&k] = value;
        let d = tempfile::tempdir().unwrap();
        link_files(&src, d.path(), "config.json");
        std::fs::write(d.path().join("config.json"), cfg.to_string()).unwrap();
        exercise(d.path());
    }

}

#[test]
fn the_seeds_themselves_are_accepted() {
    for m in MODELS {
        let ck = HfCheckpoint::open(&fixtures().join(m)).unwrap();
        adapter_for(&ck).unwrap().from_hf(&ck).unwrap();
    }
    for f in ["tp_w2", "fsdp2_w2", "views_w1"] {
        let ck = dcp::open(&fixtures().join("dcp").join(f).join("ckpt")).unwrap();
        assert!(!ck.keys().is_empty());
    }
}

#[test]
fn a_newline_byte_anywhere_in_a_dcp_metadata_gives_a_one_line_error() {
    // A string the pickle holds (an fqn, a path) may come to hold a newline: errors quote it
    // escaped, so they stay one line.
    let src = fixtures().join("dcp").join("tp_w2").join("ckpt");
    let orig = std::fs::read(src.join(".metadata")).unwrap();
    let d = tempfile::tempdir().unwrap();
    link_files(&src, d.path(), ".metadata");
    for i in 0..orig.len() {
        let mut b = orig.clone();
        b[i] = b'\n';
        std::fs::write(d.path().join(".metadata"), &b).unwrap();
        if let Err(e) = dcp::open(d.path()) {
            assert!(!e.to_string().contains('\n'), "byte {i}: {e}");
        }
    }
}
