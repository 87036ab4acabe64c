//! Bounded fuzzing of the safetensors / index reading and of the adapters on what it accepts:
//! random bytes, random headers of a plausible length and random index.json contents must give
//! `Ok` or a one-line error, never a panic (proptest; the case counts bound the run time).
mod common;

use adapters::{adapter_for, HfCheckpoint};
use common::raw_file;
use proptest::prelude::*;
use std::path::Path;

/// A valid two-tensor file with a Qwen3-MoE-looking key set.
fn valid_file() -> Vec<u8> {
    let h = r#"{"__metadata__":{"format":"pt"},"model.layers.0.mlp.gate.weight":{"dtype":"BF16","shape":[2,3],"data_offsets":[0,12]},"model.layers.0.mlp.experts.0.up_proj.weight":{"dtype":"F32","shape":[1,3],"data_offsets":[12,24]}}"#;
    raw_file(h, &[3u8; 24])
}

/// Opens `dir` and, when that works, reads every tensor and runs the adapter: no panic, and any
/// error is one line.
fn exercise(dir: &Path) {
    match HfCheckpoint::open(dir) {
        Err(e) => assert!(!e.to_string().contains('\n'), "{e}"),
        Ok(ck) => {
            for k in ck.keys() {
                let t = ck.tensor(k).unwrap();
                assert_eq!(t.data.len(), t.numel() * t.element_size());
            }
            if let Ok(a) = adapter_for(&ck) {
                if let Ok(native) = a.from_hf(&ck) {
                    let _ = a.to_hf(&native);
                }
            }
        }
    }
}

fn write_config(dir: &Path) {
    std::fs::write(
        dir.join("config.json"),
        r#"{"model_type":"qwen3_moe","num_hidden_layers":1,"num_experts":1,"hidden_size":3,"moe_intermediate_size":1}"#,
    )
    .unwrap();
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn random_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..200)) {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("model.safetensors"), &bytes).unwrap();
        exercise(d.path());
    }

    #[test]
    fn random_header_with_plausible_length_never_panics(header in "[ -~]{0,120}", data in prop::collection::vec(any::<u8>(), 0..40)) {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("model.safetensors"), raw_file(&header, &data)).unwrap();
        exercise(d.path());
    }

    #[test]
    fn random_index_never_panics(index in "\\{\"weight_map\":\\{(\"[a-z.0-9]{1,12}\":\"[a-z0-9./-]{0,24}\",?){0,4}\\}\\}|[ -~]{0,60}") {
        let d = tempfile::tempdir().unwrap();
        write_config(d.path());
        std::fs::write(d.path().join("model-00001-of-00001.safetensors"), valid_file()).unwrap();
        std::fs::write(d.path().join("model.safetensors.index.json"), index).unwrap();
        exercise(d.path());
    }
}

#[test]
fn valid_file_is_accepted() {
    let d = tempfile::tempdir().unwrap();
    std::fs::write(d.path().join("model.safetensors"), valid_file()).unwrap();
    let ck = HfCheckpoint::open(d.path()).unwrap();
    assert_eq!(ck.keys().len(), 2);
}
