//! The model key check against transformers: for every case of
//! `conformance/fixtures/key_sets.json` (the key -> shape map transformers 5.23's
//! `save_pretrained` wrote for a family under a config variant, from `generate_key_sets.py`),
//! a checkpoint with exactly those keys and shapes is accepted under the config.json transformers
//! wrote and under the one it was given (where its defaults fill the gaps: `layer_types` from
//! `full_attention_interval`, `head_dim`, ...); every key outside the MoE blocks is one
//! [`model_keys::expected`] names; and each such key dropped, reshaped or joined by a stray one
//! is an error naming it.

mod common;

use adapters::model_keys;
use adapters::{adapter_for, Dtype, FamilyAdapter, HfCheckpoint, HostTensor};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

struct Case {
    name: String,
    config_in: Value,
    config: Value,
    keys: BTreeMap<String, Vec<usize>>,
}

fn cases() -> Vec<Case> {
    let p = common::fixture("key_sets.json");
    let v: Value = serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap();
    v["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| Case {
            name: c["name"].as_str().unwrap().to_string(),
            config_in: c["config_in"].clone(),
            config: c["config"].clone(),
            keys: serde_json::from_value(c["keys"].clone()).unwrap(),
        })
        .collect()
}

fn tensors(keys: &BTreeMap<String, Vec<usize>>) -> BTreeMap<String, HostTensor> {
    keys.iter()
        .map(|(k, s)| {
            let n: usize = s.iter().product();
            (
                k.clone(),
                HostTensor::new(Dtype::BF16, s.clone(), vec![0; 2 * n]).unwrap(),
            )
        })
        .collect()
}

/// Writes the checkpoint and reads it through the adapter (the HF side of every command).
fn read(dir: &Path, cfg: &Value, t: &BTreeMap<String, HostTensor>) -> Result<(), String> {
    common::write_ckpt(dir, cfg, t, 1);
    let ck = HfCheckpoint::open(dir).map_err(|e| e.to_string())?;
    let a = adapter_for(&ck).map_err(|e| e.to_string())?;
    a.from_hf(&ck).map(|_| ()).map_err(|e| e.to_string())
}

/// The keys of a case outside its MoE blocks, by the test's own reading of transformers'
/// modules: not under `mlp.` / `block_sparse_moe.` of a MoE layer, and not the vision tower.
fn non_moe(case: &Case, a: &FamilyAdapter) -> BTreeSet<String> {
    let moe: BTreeSet<usize> = a.config().moe_layers().into_iter().collect();
    case.keys
        .keys()
        .filter(|k| !k.starts_with("model.visual."))
        .filter(|k| {
            let Some(rest) = k.split(".layers.").nth(1) else {
                return true;
            };
            let (l, rest) = rest.split_once('.').unwrap();
            !(moe.contains(&l.parse::<usize>().unwrap())
                && (rest.starts_with("mlp.") || rest.starts_with("block_sparse_moe.")))
        })
        .cloned()
        .collect()
}

#[test]
fn transformers_key_sets_are_accepted_and_named_by_the_rules() {
    let cases = cases();
    assert!(cases.len() >= 19);
    for case in &cases {
        let t = tensors(&case.keys);
        for cfg in [&case.config, &case.config_in] {
            let d = tempfile::tempdir().unwrap();
            read(d.path(), cfg, &t).unwrap_or_else(|e| panic!("{}: {e}", case.name));
            let ck = HfCheckpoint::open(d.path()).unwrap();
            let a = FamilyAdapter::from_checkpoint(&ck).unwrap();
            let want = model_keys::expected(&a, cfg).unwrap();
            let named: BTreeSet<String> = want.rules.iter().map(|r| r.key.clone()).collect();
            let outside = non_moe(case, &a);
            let unnamed: Vec<&String> = outside.difference(&named).collect();
            assert!(
                unnamed.is_empty(),
                "{}: not in the rules: {unnamed:?}",
                case.name
            );
            // every required rule is a key transformers wrote (no key it never writes is asked for)
            for r in want.rules.iter().filter(|r| r.required) {
                assert!(
                    outside.contains(&r.key),
                    "{}: {} is required",
                    case.name,
                    r.key
                );
            }
        }
    }
}

/// One key per distinct (layer-free) name: the last layer's.
fn one_per_pattern(keys: &BTreeSet<String>) -> Vec<String> {
    let mut by: BTreeMap<String, String> = BTreeMap::new();
    for k in keys {
        let pat: String = k
            .split('.')
            .map(|p| if p.parse::<usize>().is_ok() { "N" } else { p })
            .collect::<Vec<_>>()
            .join(".");
        by.insert(pat, k.clone());
    }
    by.into_values().collect()
}

#[test]
fn a_dropped_reshaped_or_stray_key_outside_the_moe_blocks_is_an_error_naming_it() {
    let mut checked = 0;
    for case in cases() {
        let d = tempfile::tempdir().unwrap();
        let t = tensors(&case.keys);
        read(d.path(), &case.config, &t).unwrap();
        let ck = HfCheckpoint::open(d.path()).unwrap();
        let a = FamilyAdapter::from_checkpoint(&ck).unwrap();
        let want = model_keys::expected(&a, &case.config).unwrap();
        let required: BTreeMap<&str, bool> = want
            .rules
            .iter()
            .map(|r| (r.key.as_str(), r.required))
            .collect();
        for k in one_per_pattern(&non_moe(&case, &a)) {
            let d = tempfile::tempdir().unwrap();
            let mut m = t.clone();
            // dropped: an error unless the key is optional (a tied lm_head)
            let dropped = m.remove(&k).unwrap();
            match (read(d.path(), &case.config, &m), required[k.as_str()]) {
                (Err(e), true) => assert!(e.contains(&format!("missing '{k}'")), "{e}"),
                (Ok(()), false) => {}
                (r, req) => panic!("{}: {k} dropped (required {req}): {r:?}", case.name),
            }
            // reshaped: dim 0 one larger
            let mut shape = dropped.shape.clone();
            shape[0] += 1;
            let n: usize = shape.iter().product();
            m.insert(
                k.clone(),
                HostTensor::new(Dtype::BF16, shape, vec![0; 2 * n]).unwrap(),
            );
            let e = read(d.path(), &case.config, &m).unwrap_err();
            assert!(
                e.contains(&format!("tensor '{k}' has shape")),
                "{}: {e}",
                case.name
            );
            assert!(e.contains("but config.json gives"), "{e}");
            checked += 1;
        }
        // a stray key in a layer and one at the top level
        let layer0 = format!("{}.0", a.prefix());
        for stray in [
            format!("{layer0}.self_attn.bogus.weight"),
            format!("{layer0}.input_layernorm.bias"),
            "model.bogus.weight".to_string(),
            format!(
                "{}.{}.input_layernorm.weight",
                a.prefix(),
                a.config().num_hidden_layers + 3
            ),
        ] {
            let d = tempfile::tempdir().unwrap();
            let mut m = t.clone();
            m.insert(
                stray.clone(),
                HostTensor::new(Dtype::BF16, vec![1], vec![0; 2]).unwrap(),
            );
            let e = read(d.path(), &case.config, &m).unwrap_err();
            assert!(
                e.contains(&format!("'{stray}'")) || e.contains("num_hidden_layers"),
                "{}: {e}",
                case.name
            );
            assert!(!e.contains('\n'), "{e}");
        }
    }
    // 272 keys (one per name and case) each dropped and reshaped
    assert!(checked >= 250, "{checked}");
}

#[test]
fn every_committed_fixture_passes_the_model_key_check() {
    for name in [
        "qwen3_moe_tiny",
        "qwen3_moe_tiny_sharded",
        "qwen3_moe_e128_k8",
        "qwen3_moe_e16_k4_large",
        "qwen3_vl_moe_tiny",
        "qwen3_next_tiny",
        "qwen3_5_moe_tiny",
        "mixtral_tiny",
        "deepseek_v3_tiny",
        "deepseek_v3_e256_k8",
        "glm4_moe_tiny",
        "gpt_oss_tiny",
        "gpt_oss_clamped",
        "step3p5_tiny",
    ] {
        let ck = HfCheckpoint::open(&common::fixture(name)).unwrap();
        let a = adapter_for(&ck).unwrap();
        a.from_hf(&ck).unwrap_or_else(|e| panic!("{name}: {e}"));
    }
}

#[test]
fn absurd_attention_fields_are_errors_naming_the_field() {
    for (field, value, want) in [
        (
            "num_attention_heads",
            Value::from(u64::MAX),
            "'num_attention_heads'",
        ),
        ("head_dim", Value::from(1u64 << 40), "'head_dim'"),
        ("head_dim", Value::from("16"), "'head_dim'"),
        ("vocab_size", Value::Null, "missing field 'vocab_size'"),
        ("attention_bias", Value::from(1), "'attention_bias'"),
        (
            "layer_types",
            Value::from(vec!["full_attention"]),
            "'layer_types'",
        ),
        (
            "layer_types",
            Value::from(vec!["x", "y"]),
            "layer_types holds",
        ),
    ] {
        let d = tempfile::tempdir().unwrap();
        let ck = common::edited_copy(
            "qwen3_next_tiny",
            d.path(),
            |c| {
                c[field] = value.clone();
            },
            |_| {},
        );
        let e = match adapter_for(&ck) {
            Err(e) => e.to_string(),
            Ok(a) => a.from_hf(&ck).unwrap_err().to_string(),
        };
        assert!(
            e.contains(want) && e.contains("config.json"),
            "{field}: {e}"
        );
    }
}
