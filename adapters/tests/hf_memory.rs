//! `hf_memory::transformers_params` against transformers 5.23 itself: for every seed fixture
//! transformers loaded in `conformance/fixtures/tp_plans.json` (written by
//! `generate_tp_plans.py` from `model.named_parameters()` after `from_pretrained`), the set of
//! in-memory parameter names and each global shape must be exactly what transformers built.

use adapters::checkpoint::HfCheckpoint;
use adapters::hf_memory::transformers_params;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;

#[test]
fn in_memory_names_and_shapes_are_transformers_own() {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../conformance/fixtures");
    let doc: Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures.join("tp_plans.json")).unwrap())
            .unwrap();
    let mut checked = 0;
    for (fixture, entry) in doc["fixtures"].as_object().unwrap() {
        let Some(params) = entry["loads"]["2"]["params"].as_object() else {
            continue;
        };
        let want: BTreeMap<String, Vec<usize>> = params
            .iter()
            .map(|(n, p)| {
                let s = p["global_shape"].as_array().unwrap();
                (
                    n.clone(),
                    s.iter().map(|x| x.as_u64().unwrap() as usize).collect(),
                )
            })
            .collect();
        let ckpt = HfCheckpoint::open(&fixtures.join(fixture)).unwrap();
        let got = transformers_params(&ckpt).unwrap();
        assert_eq!(got, want, "{fixture}");
        checked += 1;
    }
    assert!(
        checked >= 10,
        "only {checked} fixtures loaded by transformers"
    );
}

#[test]
fn step3p5_has_no_transformers_parameters() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../conformance/fixtures/step3p5_tiny");
    let e = transformers_params(&HfCheckpoint::open(&dir).unwrap())
        .unwrap_err()
        .to_string();
    assert!(e.contains("config.json") && e.contains("step3p5"), "{e}");
}
