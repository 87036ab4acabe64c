//! The `parallel` suite passes for correct plans and fails, naming the check, for each classic
//! wrong plan (threads backend).

use collectives::threads::spawn_world;
use conformance::parallel::suite;
use conformance::parallel::{Mutation, PlanKind};
use conformance::report::Check;
use std::path::PathBuf;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(name)
}

/// Rank 0's checks of the suite on `world` thread ranks.
fn run(world: usize, name: &str, plans: &[PlanKind], mutation: Option<Mutation>) -> Vec<Check> {
    let dir = fixture(name);
    let mut results = spawn_world(world, |comm| {
        suite::run(comm.as_ref(), &dir, plans, mutation)
    });
    results
        .remove(0)
        .expect("rank 0 panicked")
        .expect("suite setup")
}

fn failures(checks: &[Check]) -> Vec<String> {
    checks
        .iter()
        .filter(|c| c.failed())
        .map(|c| c.name.clone())
        .collect()
}

#[test]
fn every_plan_matches_the_reference_at_2_and_4_ranks() {
    for world in [2, 4] {
        for name in [
            "qwen3_moe_tiny",
            "gpt_oss_tiny",
            "qwen3_next_tiny",
            "deepseek_v3_tiny",
        ] {
            let checks = run(world, name, &PlanKind::ALL, None);
            assert!(
                failures(&checks).is_empty(),
                "{name} at {world}: {:?}",
                checks.iter().filter(|c| c.failed()).collect::<Vec<_>>()
            );
            // Gradient checks ran for every plan but `single` (skipped above 1 rank).
            let grads = checks.iter().filter(|c| c.name.contains(": grad ")).count();
            assert!(grads >= 6, "{name}: only {grads} gradient checks");
        }
    }
}

#[test]
fn dropping_f_on_the_routing_weights_fails_the_router_gradient() {
    for plan in [PlanKind::Tp, PlanKind::TpSp, PlanKind::EpTp] {
        let checks = run(
            4,
            "qwen3_moe_tiny",
            &[plan],
            Some(Mutation::DropRoutingWeightF),
        );
        let failed = failures(&checks);
        assert!(
            failed
                .iter()
                .any(|n| n.ends_with("grad model.layers.1.mlp.gate.weight")),
            "{plan:?}: {failed:?}"
        );
        assert!(
            failed.iter().any(|n| n.ends_with(": grad_input")),
            "{failed:?}"
        );
        // Forward is unaffected: f is the identity forward.
        assert!(
            !failed.iter().any(|n| n.ends_with(": output")),
            "{failed:?}"
        );
    }
}

#[test]
fn keeping_shard_1_after_a_transpose_fails_the_shape_check() {
    let checks = run(
        2,
        "qwen3_moe_tiny",
        &[PlanKind::Tp],
        Some(Mutation::KeepShardAfterTranspose),
    );
    let bad: Vec<&Check> = checks.iter().filter(|c| c.failed()).collect();
    assert_eq!(bad.len(), 1, "{bad:?}");
    assert!(
        bad[0].name.ends_with("tp [2]: sharded shapes"),
        "{}",
        bad[0].name
    );
    let why = format!("{:?}", bad[0].outcome);
    assert!(
        why.contains("down_projs transposed to [E, H, I] with [S(1)]"),
        "{why}"
    );
}

#[test]
fn skipping_the_router_gradient_reduction_fails_the_router_gradient() {
    for plan in [
        PlanKind::Ep,
        PlanKind::Fsdp,
        PlanKind::TpSp,
        PlanKind::EpFsdp,
    ] {
        let checks = run(
            2,
            "qwen3_moe_tiny",
            &[plan],
            Some(Mutation::SkipRouterGradReduce),
        );
        let failed = failures(&checks);
        assert!(
            failed
                .iter()
                .any(|n| n.ends_with("grad model.layers.1.mlp.gate.weight")),
            "{plan:?}: {failed:?}"
        );
        assert!(
            !failed.iter().any(|n| n.ends_with(": output")),
            "{failed:?}"
        );
    }
    // Plain TP has no data-parallel dim: there is nothing to reduce, the mutation changes nothing.
    let checks = run(
        2,
        "qwen3_moe_tiny",
        &[PlanKind::Tp],
        Some(Mutation::SkipRouterGradReduce),
    );
    assert!(failures(&checks).is_empty());
}
