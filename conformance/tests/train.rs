//! Save / resume of the small MoE model (threads backend): bit-identical on the same mesh, within
//! tolerance on another mesh, and a save killed before its commit leaves the previous checkpoint.

use collectives::threads::spawn_world;
use conformance::parallel::PlanKind;
use conformance::train::{compare_runs, run_rank, Compare, Kill, TrainArgs, TrainResult};
use std::path::Path;

fn train(world: usize, args: TrainArgs) -> Result<(), String> {
    let results = spawn_world(world, |comm| run_rank(comm.as_ref(), &args));
    let errors: Vec<String> = results
        .into_iter()
        .filter_map(|r| match r {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(e),
            Err(_) => Some("a rank panicked".into()),
        })
        .collect();
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors.join("\n"))
    }
}

fn args(plan: PlanKind, steps: u64, out: &Path) -> TrainArgs {
    TrainArgs {
        plan,
        steps,
        out_dir: out.to_path_buf(),
        ckpt_root: None,
        save_every: None,
        resume: false,
        kill: None,
        hard_kill: false,
    }
}

#[test]
fn resume_is_bit_identical_on_the_same_mesh_and_close_on_another() {
    let tmp = tempfile::tempdir().unwrap();
    let p = |s: &str| tmp.path().join(s);
    train(2, args(PlanKind::Ep, 6, &p("a"))).unwrap();
    let first = TrainArgs {
        ckpt_root: Some(p("ck")),
        save_every: Some(3),
        ..args(PlanKind::Ep, 3, &p("b1"))
    };
    train(2, first).unwrap();
    let resume = TrainArgs {
        ckpt_root: Some(p("ck")),
        resume: true,
        ..args(PlanKind::Ep, 6, &p("b2"))
    };
    train(2, resume.clone()).unwrap();
    let lines = compare_runs(&p("a"), &p("b2"), Compare::Exact).unwrap();
    assert!(lines[0].contains("3 losses"), "{lines:?}");

    // Another mesh: EP x TP on 4 ranks, and a single rank.
    for (world, plan, out) in [(4, PlanKind::EpTp, "c4"), (1, PlanKind::Single, "c1")] {
        let other = TrainArgs {
            plan,
            out_dir: p(out),
            ..resume.clone()
        };
        train(world, other).unwrap();
        let tol = Compare::Tolerance {
            atol: 1e-5,
            rtol: 1e-4,
        };
        compare_runs(&p("a"), &p(out), tol).unwrap();
    }
    // The uninterrupted run differs from a run with other data: the comparison can fail.
    train(2, args(PlanKind::Ep, 5, &p("short"))).unwrap();
    assert!(matches!(
        compare_runs(&p("a"), &p("short"), Compare::Exact),
        Err(Ok(_))
    ));
}

#[test]
fn a_rank_killed_during_a_save_leaves_the_previous_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let p = |s: &str| tmp.path().join(s);
    train(2, args(PlanKind::Ep, 6, &p("a"))).unwrap();
    let killed = TrainArgs {
        ckpt_root: Some(p("ck")),
        save_every: Some(2),
        kill: Some(Kill::InSave { rank: 1, step: 4 }),
        ..args(PlanKind::Ep, 6, &p("x"))
    };
    let err = train(2, killed).unwrap_err();
    assert!(err.contains("killed during the save of step 4"), "{err}");
    let resume = TrainArgs {
        ckpt_root: Some(p("ck")),
        resume: true,
        ..args(PlanKind::Ep, 6, &p("e"))
    };
    train(2, resume).unwrap();
    let r: TrainResult =
        serde_json::from_str(&std::fs::read_to_string(p("e").join("train.json")).unwrap()).unwrap();
    assert!(r.resumed_from.unwrap().ends_with("step_00000002"));
    assert_eq!(r.incomplete_skipped.len(), 1);
    assert!(r.incomplete_skipped[0].ends_with("step_00000004"));
    compare_runs(&p("a"), &p("e"), Compare::Exact).unwrap();
}

#[test]
fn a_rank_killed_during_training_ends_the_job_with_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    let killed = TrainArgs {
        kill: Some(Kill::AtStep { rank: 1, step: 2 }),
        ..args(PlanKind::Ep, 4, &tmp.path().join("k"))
    };
    let start = std::time::Instant::now();
    let err = train(2, killed).unwrap_err();
    assert!(err.contains("dropped their communicator"), "{err}");
    assert!(start.elapsed().as_secs() < 60);
}
