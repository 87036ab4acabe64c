//! Runs the case checker on the committed PyTorch oracle file (`oracle/cases.json`, written by
//! `oracle/generate_cases.py` with torch 2.15's own DTensor code) and requires 0 failures.
//! Excluded cases (documented PyTorch self-disagreements) are counted and printed, not hidden.

use placement::cases::{check_cases_json, CaseOutcome};

#[test]
fn committed_oracle_cases_all_pass() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/oracle/cases.json");
    let text = std::fs::read_to_string(path).expect("read oracle/cases.json");
    let report = check_cases_json(&text).expect("a placement-cases/1 document");
    let (passed, failed, excluded) = report.counts();
    let mut by_kind = std::collections::BTreeMap::new();
    for r in &report.results {
        let e = by_kind.entry(r.kind.clone()).or_insert((0, 0, 0));
        match &r.outcome {
            CaseOutcome::Pass => e.0 += 1,
            CaseOutcome::Fail { expected, got } => {
                e.1 += 1;
                println!("FAIL {}: expected {expected}, got {got}", r.id);
            }
            CaseOutcome::Excluded { reason } => {
                e.2 += 1;
                println!("excluded {}: {reason}", r.id);
            }
        }
    }
    println!(
        "torch {:?}: {passed} passed, {failed} failed, {excluded} excluded; by kind (passed, failed, excluded): {by_kind:?}",
        report.torch_version
    );
    assert!(
        passed > 3000,
        "the oracle file should hold several thousand cases"
    );
    for (kind, least) in [
        ("local", 100),
        ("global_from_local", 100),
        ("view", 100),
        ("redistribute", 100),
        ("redistribute_merge", 300),
        ("fsdp2", 300),
    ] {
        assert!(
            by_kind.get(kind).is_some_and(|c| c.0 > least),
            "too few passing {kind} cases"
        );
    }
    assert_eq!(failed, 0, "cases disagreeing with PyTorch");

    // The strategy-search ops (narrow, select, cat, split) and the non-strict view rule
    // (reshape): passed and excluded per op.
    let doc: serde_json::Value = serde_json::from_str(&text).expect("JSON");
    let ops: Vec<Option<&str>> = doc["cases"]
        .as_array()
        .expect("cases")
        .iter()
        .map(|c| c.get("op").and_then(|o| o.as_str()))
        .collect();
    for (op, least) in [
        ("narrow", 100),
        ("select", 100),
        ("cat", 100),
        ("split", 100),
        ("reshape", 300),
    ] {
        let mut c = (0, 0);
        for (r, o) in report.results.iter().zip(&ops) {
            if *o == Some(op) {
                match r.outcome {
                    CaseOutcome::Pass => c.0 += 1,
                    CaseOutcome::Excluded { .. } => c.1 += 1,
                    CaseOutcome::Fail { .. } => {}
                }
            }
        }
        println!("view op {op}: {} passed, {} excluded", c.0, c.1);
        assert!(c.0 > least, "too few passing {op} cases");
    }

    // Redistributions with `_StridedShard`: PyTorch's graph planner where the split factors
    // decode into shard orders, its greedy walk where not.
    let mut strided = std::collections::BTreeMap::new();
    for (r, c) in report
        .results
        .iter()
        .zip(doc["cases"].as_array().expect("cases"))
    {
        let has_ss = ["src", "dst"].iter().any(|k| {
            c[*k].as_array().is_some_and(|v| {
                v.iter()
                    .any(|p| p.as_str().is_some_and(|p| p.starts_with("_S")))
            })
        });
        if r.kind != "redistribute" || !has_ss || !matches!(r.outcome, CaseOutcome::Pass) {
            continue;
        }
        let which = if c.get("error").is_some() {
            "refused"
        } else {
            let parse = |k: &str| {
                let v: Vec<String> = serde_json::from_value(c[k].clone()).expect("placements");
                placement::parse_placements(&format!("[{}]", v.join(", "))).expect("placements")
            };
            let shape: Vec<usize> =
                serde_json::from_value(c["global_shape"].clone()).expect("shape");
            let mesh: Vec<usize> = serde_json::from_value(c["mesh_shape"].clone()).expect("mesh");
            let plan = placement::redistribute::plan_redistribute(
                &shape,
                &placement::DeviceMesh::new(mesh).expect("mesh"),
                &parse("src"),
                &parse("dst"),
            )
            .expect("a passing case with steps plans");
            match plan.planner {
                placement::redistribute::Planner::Graph => "graph planner",
                placement::redistribute::Planner::Greedy => "greedy planner",
            }
        };
        *strided.entry(which).or_insert(0usize) += 1;
    }
    println!("_StridedShard redistributions passed, by PyTorch's planner: {strided:?}");
    assert!(
        strided.get("graph planner").copied().unwrap_or(0) >= 300,
        "too few passing _StridedShard redistributions through the graph planner"
    );

    // Informative: the excluded cases evaluated anyway against the answer the file records.
    let mut doc: serde_json::Value = serde_json::from_str(&text).expect("JSON");
    if let Some(cases) = doc.get_mut("cases").and_then(|c| c.as_array_mut()) {
        cases.retain(|c| c.get("excluded").is_some());
        for c in cases.iter_mut() {
            if let Some(o) = c.as_object_mut() {
                o.remove("excluded");
            }
        }
    }
    let again = check_cases_json(&doc.to_string()).expect("document");
    let (agree, disagree, _) = again.counts();
    for r in &again.results {
        if let CaseOutcome::Fail { expected, got } = &r.outcome {
            println!(
                "excluded case {} differs from the recorded answer: expected {expected}, got {got}",
                r.id
            );
        }
    }
    println!("excluded cases: {agree} give the recorded answer, {disagree} do not");
}

/// Checks any other file in the same format when `PLACEMENT_CASES=path` is set (prints
/// "skipped" otherwise): `PLACEMENT_CASES=other.json cargo test -p placement --test oracle_cases`.
#[test]
fn cases_file_from_env() {
    let Ok(path) = std::env::var("PLACEMENT_CASES") else {
        println!("skipped: PLACEMENT_CASES not set");
        return;
    };
    let text = std::fs::read_to_string(&path).expect("read PLACEMENT_CASES");
    let report = check_cases_json(&text).expect("a placement-cases/1 document");
    for r in &report.results {
        if let CaseOutcome::Fail { expected, got } = &r.outcome {
            println!("FAIL {}: expected {expected}, got {got}", r.id);
        }
    }
    let (passed, failed, excluded) = report.counts();
    println!("{path}: {passed} passed, {failed} failed, {excluded} excluded");
    assert_eq!(failed, 0);
}

/// The targeted strict-view cases (`oracle/view_edge_cases.json`, written by
/// `oracle/generate_view_edge_cases.py` from torch 2.15's view rule): `_StridedShard` inputs
/// unflattened at a split that is not the last, `_S` on the first dim of a flattened group, `_S`
/// then `S` of one dim on 2-D meshes. None is excluded: torch's crashes are refusals here too.
#[test]
fn committed_view_edge_cases_all_pass() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/oracle/view_edge_cases.json");
    let text = std::fs::read_to_string(path).expect("read oracle/view_edge_cases.json");
    let report = check_cases_json(&text).expect("a placement-cases/1 document");
    let (passed, failed, excluded) = report.counts();
    for r in &report.results {
        if let CaseOutcome::Fail { expected, got } = &r.outcome {
            println!("FAIL {}: expected {expected}, got {got}", r.id);
        }
    }
    assert_eq!((failed, excluded), (0, 0));
    assert_eq!(passed, 74);
}
