//! `hf_plan::HfTpPlan` against what transformers 5.23 itself does: for every seed fixture in
//! `conformance/fixtures/tp_plans.json` (written by `generate_tp_plans.py`: the plans, and
//! `from_pretrained(dir, tp_plan="auto")` run by transformers on CPU at world sizes 2 and 4, and
//! the same with `DistributedConfig(tp_size=N, ep_size=N)`, against the plan with its EP rules),
//! every parameter's placements (or none: a plain tensor) and its local shape on every rank
//! must be what the plan gives through this crate. Loads transformers could not run are
//! counted and printed, not hidden.

use placement::hf_plan::HfTpPlan;
use placement::{local_shard, DeviceMesh, Placement};
use serde_json::Value;

fn rules(v: &Value) -> Vec<(String, String)> {
    v.as_object()
        .map(|m| {
            m.iter()
                .map(|(k, s)| (k.clone(), s.as_str().unwrap().to_string()))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn plans_give_what_transformers_tp_load_gives() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../conformance/fixtures/tp_plans.json"
    );
    let doc: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let (mut checked, mut distributed, mut not_loaded) = (0, 0, Vec::new());
    for (fixture, entry) in doc["fixtures"].as_object().unwrap() {
        let Some(plans) = entry.get("plans") else {
            not_loaded.push(format!("{fixture}: {}", entry["error"]));
            continue;
        };
        let tp_plan = HfTpPlan::new(
            &rules(&plans["base_model_tp_plan"]),
            "model.",
            &rules(&plans["model_tp_plan"]),
        );
        // `ep_loads`: DistributedConfig(tp_size=N, ep_size=N), the EP plan on the TP ranks.
        let ep_plan =
            tp_plan
                .clone()
                .with_expert_plan(&rules(&plans["base_model_ep_plan"]), "model.", &[]);
        let runs = [("loads", &tp_plan), ("ep_loads", &ep_plan)];
        for (kind, plan, world, load) in runs.iter().flat_map(|&(kind, plan)| {
            entry[kind]
                .as_object()
                .into_iter()
                .flatten()
                .map(move |(w, l)| (kind, plan, w, l))
        }) {
            if let Some(e) = load.get("error") {
                not_loaded.push(format!("{fixture} {kind} world {world}: {e}"));
                continue;
            }
            let w: usize = world.parse().unwrap();
            let mesh = DeviceMesh::new(vec![w]).unwrap();
            // The rules transformers reports as matching nothing, and only those.
            let names: Vec<&str> = load["params"]
                .as_object()
                .unwrap()
                .keys()
                .map(String::as_str)
                .collect();
            let unmatched: Vec<String> = load["unmatched_rules"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_str().unwrap().to_string())
                .collect();
            assert_eq!(
                plan.rules_matching_nothing(&names),
                unmatched,
                "{fixture} {kind} world {w}: rules matching nothing"
            );
            for (name, p) in load["params"].as_object().unwrap() {
                let g: Vec<usize> = p["global_shape"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_u64().unwrap() as usize)
                    .collect();
                let want: Option<Vec<String>> = p["placements"]
                    .as_array()
                    .map(|a| a.iter().map(|x| x.as_str().unwrap().to_string()).collect());
                let got = plan
                    .placement(name, g.len())
                    .unwrap_or_else(|e| panic!("{fixture} {name}: {e}"));
                let got_text = got.map(|q| vec![q.to_string()]);
                assert_eq!(got_text, want, "{fixture} {kind} world {w} {name}");
                let ps: Vec<Placement> = vec![got.unwrap_or(Placement::Replicate)];
                for r in 0..w {
                    let local = local_shard(&g, &mesh, &ps, &[r]).unwrap().local_shape;
                    let want_local: Vec<usize> = p["local_shape"][r.to_string()]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|x| x.as_u64().unwrap() as usize)
                        .collect();
                    assert_eq!(
                        local, want_local,
                        "{fixture} {kind} world {w} rank {r} {name}"
                    );
                }
                checked += 1;
                distributed += usize::from(got.is_some());
            }
        }
    }
    println!(
        "{checked} parameter loads agree with transformers ({distributed} distributed); not loaded by transformers: {not_loaded:?}"
    );
    assert!(checked > 300, "too few parameters checked: {checked}");
}

/// transformers 5.23 `distributed/mixin.py` `_resolve_parallel_plans`: with EP on, a TP rule on
/// an EP rule's module or anything under it is dropped, even one no EP rule replaces (here the
/// bias, which stays a plain tensor); other TP rules stay.
#[test]
fn expert_plan_drops_tp_rules_under_ep_modules() {
    let s = |v: &[(&str, &str)]| -> Vec<(String, String)> {
        v.iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    };
    let tp = s(&[
        ("layers.*.mlp.experts.gate_up_proj", "packed_colwise"),
        ("layers.*.mlp.experts.gate_up_proj_bias", "colwise"),
        ("layers.*.self_attn.q_proj", "colwise"),
    ]);
    let ep = s(&[
        ("layers.*.mlp.experts", "ep_dispatch_experts"),
        ("layers.*.mlp.experts.gate_up_proj", "grouped_gemm"),
    ]);
    let bias = "model.layers.0.mlp.experts.gate_up_proj_bias";
    let w = "model.layers.0.mlp.experts.gate_up_proj";
    let q = "model.layers.0.self_attn.q_proj.weight";
    let tp_only = HfTpPlan::new(&tp, "model.", &[]);
    assert_eq!(
        tp_only.placement(bias, 2).unwrap(),
        Some(Placement::Shard(1))
    );
    let with_ep = tp_only.with_expert_plan(&ep, "model.", &[]);
    assert_eq!(with_ep.placement(bias, 2).unwrap(), None);
    assert_eq!(with_ep.style_of(bias), Some("ep_dispatch_experts"));
    assert_eq!(with_ep.placement(w, 3).unwrap(), Some(Placement::Shard(0)));
    assert_eq!(with_ep.placement(q, 2).unwrap(), Some(Placement::Shard(0)));
    // The dropped rules are not applied, so not reported as matching nothing.
    assert!(with_ep
        .rules_matching_nothing(&[q])
        .iter()
        .all(|r| !r.ends_with("gate_up_proj_bias")));
}
