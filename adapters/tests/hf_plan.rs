//! `hf_plan::plan_checkpoint` against transformers 5.23's own distributed loads: for every seed
//! fixture in `conformance/fixtures/tp_plans.json` (written by `generate_tp_plans.py`: transformers
//! runs `from_pretrained` with `tp_plan="auto"` and with `DistributedConfig(tp_size=N,
//! ep_size=N)` on N CPU ranks, N = 2 and 4), the plan table built from the checkpoint alone (its
//! config.json, its keys and shapes, the committed plan table) must name exactly transformers'
//! parameters, with its global shapes, placements and local shape on every rank, and the same
//! rules matching nothing. Loads transformers could not run are printed, not hidden.

use adapters::checkpoint::HfCheckpoint;
use adapters::hf_plan::{plan_checkpoint, transformers_plans};
use serde_json::Value;
use std::path::Path;

fn fixtures() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../conformance/fixtures")
}

fn shape(v: &Value) -> Vec<usize> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as usize)
        .collect()
}

#[test]
fn plan_tables_equal_transformers_tp_and_ep_loads() {
    let doc: Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("tp_plans.json")).unwrap())
            .unwrap();
    let (mut checked, mut loads, mut not_loaded) = (0usize, 0usize, Vec::new());
    for (fixture, entry) in doc["fixtures"].as_object().unwrap() {
        let ckpt = HfCheckpoint::open(&fixtures().join(fixture)).unwrap();
        for (kind, ep_on) in [("loads", false), ("ep_loads", true)] {
            let Some(by_world) = entry.get(kind).and_then(Value::as_object) else {
                not_loaded.push(format!("{fixture} {kind}: {}", entry["error"]));
                continue;
            };
            for (world, load) in by_world {
                if let Some(e) = load.get("error") {
                    not_loaded.push(format!("{fixture} {kind} world {world}: {e}"));
                    continue;
                }
                let w: usize = world.parse().unwrap();
                let ep = if ep_on { w } else { 1 };
                let table = plan_checkpoint(&ckpt, w, ep)
                    .unwrap_or_else(|e| panic!("{fixture} {kind} world {w}: {e}"));
                let want = load["params"].as_object().unwrap();
                let ours: Vec<&String> = table.params.keys().collect();
                let mut theirs: Vec<&String> = want.keys().collect();
                theirs.sort();
                assert_eq!(ours, theirs, "{fixture} {kind} world {w}: parameter names");
                let unmatched: Vec<String> = load["unmatched_rules"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_str().unwrap().to_string())
                    .collect();
                assert_eq!(
                    table.rules_matching_nothing, unmatched,
                    "{fixture} {kind} world {w}: rules matching nothing"
                );
                for (name, p) in want {
                    let got = &table.params[name];
                    let at = format!("{fixture} {kind} world {w} {name}");
                    assert_eq!(got.global_shape, shape(&p["global_shape"]), "{at}");
                    let placements = got
                        .placements
                        .as_ref()
                        .map(|ps| ps.iter().map(|q| Value::from(q.to_string())).collect());
                    assert_eq!(
                        placements.unwrap_or(Value::Null),
                        p["placements"],
                        "{at} (style {:?})",
                        got.style
                    );
                    for r in 0..w {
                        assert_eq!(
                            got.local_shapes[r],
                            shape(&p["local_shape"][r.to_string()]),
                            "{at} rank {r}"
                        );
                    }
                    checked += 1;
                }
                loads += 1;
            }
        }
    }
    println!(
        "{checked} parameter placements in {loads} loads agree with transformers; not loaded: {not_loaded:?}"
    );
    assert!(loads >= 36, "too few transformers loads compared: {loads}");
}

#[test]
fn bad_sizes_and_unknown_families_are_one_line_errors() {
    let ckpt = HfCheckpoint::open(&fixtures().join("qwen3_moe_tiny")).unwrap();
    for (tp, ep, needle) in [
        (0, 1, "tp = 0 is outside"),
        (1 << 20, 1, "is outside 1..=4096"),
        (2, 4, "ep must be 1 or tp"),
        (3, 3, "experts do not divide evenly over ep = 3"),
    ] {
        let e = plan_checkpoint(&ckpt, tp, ep).unwrap_err().to_string();
        assert!(
            e.contains(needle) && e.contains("config.json"),
            "{tp} {ep}: {e}"
        );
        assert!(!e.contains('\n'), "{e}");
    }
    let e = transformers_plans("llama").unwrap_err().to_string();
    assert!(
        e.contains("no transformers plans for model_type llama"),
        "{e}"
    );
    let e = transformers_plans("step3p5").unwrap_err().to_string();
    assert!(e.contains("no transformers 5.23 model class"), "{e}");
}
