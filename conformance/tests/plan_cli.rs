//! `conformance plan`: its `--json` table against transformers 5.23's own TP and EP loads
//! (`fixtures/tp_plans.json`, from `generate_tp_plans.py`: `from_pretrained` with
//! `tp_plan="auto"` and `DistributedConfig(tp_size=N, ep_size=N)` on N CPU ranks), compared as
//! JSON, every parameter's global shape, placements and local shape on every rank; and
//! `--check-dcp` on the checkpoint torch wrote from transformers' TP model (`fixtures/dcp/
//! transformers_tp_w2`), with a plan it fits and plans it does not.

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(name)
}

fn plan(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_conformance"))
        .arg("plan")
        .args(args)
        .output()
        .expect("run conformance plan")
}

#[test]
fn plan_json_is_transformers_own_tp_and_ep_load() {
    let doc: Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("tp_plans.json")).unwrap()).unwrap();
    let mut compared = 0;
    for (name, entry) in doc["fixtures"].as_object().unwrap() {
        for (kind, ep) in [("loads", false), ("ep_loads", true)] {
            let Some(loads) = entry.get(kind).and_then(Value::as_object) else {
                continue;
            };
            for (world, load) in loads {
                if load.get("error").is_some() {
                    continue;
                }
                let dir = fixture(name);
                let ep_arg = if ep { world.as_str() } else { "1" };
                let out = plan(&[
                    "--model",
                    dir.to_str().unwrap(),
                    "--tp",
                    world,
                    "--ep",
                    ep_arg,
                    "--json",
                ]);
                assert!(
                    out.status.success(),
                    "{name} {kind} {world}: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
                let got: Value = serde_json::from_slice(&out.stdout).unwrap();
                assert_eq!(got["world"], Value::from(world.parse::<u64>().unwrap()));
                assert_eq!(got["params"], load["params"], "{name} {kind} world {world}");
                compared += 1;
            }
        }
    }
    assert!(compared >= 40, "compared {compared} loads");
}

#[test]
fn check_dcp_of_transformers_tp_model() {
    let model = fixture("qwen3_moe_tiny");
    let ckpt = fixture("dcp/transformers_tp_w2/ckpt");
    let (m, c) = (model.to_str().unwrap(), ckpt.to_str().unwrap());
    let out = plan(&["--model", m, "--tp", "2", "--check-dcp", c]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("25 passed, 0 failed"), "{text}");
    // Under EP the experts are S(0); this checkpoint holds them sharded on dim 1 / dim 2.
    let out = plan(&["--model", m, "--tp", "2", "--ep", "2", "--check-dcp", c]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains("model.layers.0.mlp.experts.down_proj: plan")
            && text.contains("the chunks give [S(2)] on 2 ranks, the plan [S(0)]"),
        "{text}"
    );
    // Other models' plans: parameters the checkpoint lacks, shapes it does not have.
    for (other, needle) in [
        (
            "deepseek_v3_tiny",
            "model.layers.0.mlp.gate_proj.weight: plan: not in ",
        ),
        (
            "qwen3_moe_e16_k4_large",
            "lm_head.weight: plan: the checkpoint's global shape [128, 64], the plan's [128, 96]",
        ),
    ] {
        let dir = fixture(other);
        let out = plan(&[
            "--model",
            dir.to_str().unwrap(),
            "--tp",
            "2",
            "--check-dcp",
            c,
        ]);
        let text = String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.status.code(), Some(1), "{other}: {text}");
        assert!(text.contains(needle), "{other}: {text}");
    }
}

#[test]
fn bad_plan_arguments_are_one_line_errors() {
    let m = fixture("qwen3_moe_tiny");
    let m = m.to_str().unwrap();
    for (args, needle) in [
        (vec!["--model", m, "--tp", "0"], "tp = 0 is outside"),
        (
            vec!["--model", m, "--tp", "2", "--ep", "4"],
            "ep must be 1 or tp",
        ),
        (vec!["--model", "/nonexistent", "--tp", "2"], "/nonexistent"),
        (
            vec!["--model", m, "--tp", "2", "--check-dcp", "/nonexistent"],
            "/nonexistent",
        ),
    ] {
        let out = plan(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(
            err.contains(needle) && err.trim().lines().count() == 1,
            "{args:?}: {err}"
        );
    }
}
