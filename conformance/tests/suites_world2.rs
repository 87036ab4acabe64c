//! The main job's suites that hold the adapters and the placement algebra to each other
//! (`roundtrip`, `sharded`, `parallel`, `checkpoint`) on every committed fixture at world 2 on the
//! threads backend: the conformance part of the mutation-testing command (`cargo xtask mutants`),
//! so a mutant the main job would catch is caught by `cargo test` too.

use collectives::threads::spawn_world;
use conformance::suites::{run_and_merge, RunConfig, Suite};
use std::path::{Path, PathBuf};

fn fixtures() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures");
    let mut v: Vec<PathBuf> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("config.json").is_file())
        .collect();
    v.sort();
    v
}

#[test]
fn every_fixture_passes_roundtrip_sharded_parallel_checkpoint_at_world_2() {
    let cfg = RunConfig {
        fixtures: fixtures(),
        cases: Vec::new(),
        suites: vec![
            Suite::Roundtrip,
            Suite::Sharded,
            Suite::Parallel,
            Suite::Checkpoint,
        ],
        plans: Vec::new(),
        mutation: None,
    };
    assert!(cfg.fixtures.len() >= 14, "{:?}", cfg.fixtures);
    let reports = spawn_world(2, |c| run_and_merge(c.as_ref(), &cfg))
        .into_iter()
        .next()
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(reports.len(), 4);
    let mut failures = Vec::new();
    for r in &reports {
        let (passed, _, _) = r.counts();
        assert!(passed > 0, "{}: nothing passed", r.suite);
        failures.extend(
            r.checks
                .iter()
                .filter(|c| c.failed())
                .map(|c| c.to_string()),
        );
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
