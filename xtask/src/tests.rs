//! Unit tests of the orchestration that does not need the conformance binary.

use crate::process::run_with_timeout;
use crate::report;
use crate::results::{Row, RunResult};
use std::process::Command;
use std::time::{Duration, Instant};

#[test]
fn a_run_past_its_timeout_is_killed_with_its_whole_process_group() {
    // (Checked to fail when the run is not started in its own process group.)
    let dir = std::env::temp_dir().join(format!("xtask-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let marker = dir.join("child.pid");
    // The shell starts a grandchild (like mpirun starts ranks) and waits.
    let mut cmd = Command::new("sh");
    cmd.args([
        "-c",
        &format!("sleep 30 & echo $! > {}; wait", marker.display()),
    ]);
    let start = Instant::now();
    let (ok, _, note) = run_with_timeout(cmd, &dir.join("log"), Duration::from_secs(1)).unwrap();
    assert!(!ok);
    assert!(note.contains("timeout"), "{note}");
    assert!(start.elapsed() < Duration::from_secs(15));
    let pid = std::fs::read_to_string(&marker).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    // Gone, or a zombie waiting for init to reap it: either way no longer running.
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", pid.trim())).unwrap_or_default();
    let state = stat
        .rsplit(')')
        .next()
        .and_then(|r| r.split_whitespace().next())
        .unwrap_or("gone");
    assert!(
        state == "gone" || state == "Z" || state == "X",
        "grandchild {} still running (state {state})",
        pid.trim()
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_passing_command_reports_success() {
    let log = std::env::temp_dir().join(format!("xtask-ok-{}.log", std::process::id()));
    let (ok, _, note) =
        run_with_timeout(Command::new("true"), &log, Duration::from_secs(10)).unwrap();
    assert!(ok && note.is_empty());
    let (ok, _, note) =
        run_with_timeout(Command::new("false"), &log, Duration::from_secs(10)).unwrap();
    assert!(!ok && note.contains("exit status"));
    let _ = std::fs::remove_file(&log);
}

#[test]
fn totals_and_junit_count_failures() {
    let run: RunResult = serde_json::from_str(
        r#"{"backend":"threads","world_size":2,"suites":[
            {"suite":"golden","passed":3,"failed":1,"skipped":2,"seconds":0.5,"failures":[{"name":"g","message":"a < b"}]},
            {"suite":"roundtrip","passed":4,"failed":0,"seconds":0.1}]}"#,
    )
    .unwrap();
    let mut rows = Row::from_run(&run);
    rows.push(Row::run_error("mpi", 4, 1.0, "no result".into()));
    assert_eq!(report::totals(&rows), (7, 2, 2));
    let xml = report::junit(&rows);
    assert!(xml.contains(r#"failures="2""#), "{xml}");
    assert!(xml.contains("a &lt; b"));
    let md = report::markdown(&rows, "h");
    assert!(md.contains("7 passed, 2 failed, 2 skipped"));
}

#[test]
fn example_output_becomes_a_row() {
    use crate::runner::example_row;
    let log = std::env::temp_dir().join(format!("xtask-ex-{}.log", std::process::id()));
    let sh = |script: &str| {
        let mut c = Command::new("sh");
        c.args(["-c", script]);
        c
    };
    let t = Duration::from_secs(10);
    let r = example_row(
        "faults",
        "mpi",
        2,
        sh("echo 'PASS a'; echo 'FAIL b: hung'; exit 1"),
        &log,
        t,
    )
    .unwrap();
    assert_eq!((r.passed, r.failed, r.skipped), (1, 1, 0));
    assert_eq!(r.failures[0].message, "b: hung");
    let r = example_row(
        "nccl",
        "nccl",
        1,
        sh("echo 'nccl_selftest: skipped: no CUDA device'"),
        &log,
        t,
    )
    .unwrap();
    assert_eq!((r.passed, r.failed, r.skipped), (0, 0, 1));
    // Silence is not success: an example that checked nothing fails.
    let r = example_row("faults", "mpi", 2, sh("exit 0"), &log, t).unwrap();
    assert_eq!((r.passed, r.failed), (0, 1));
    // A crash after some passes still fails.
    let r = example_row("faults", "mpi", 2, sh("echo 'PASS a'; exit 3"), &log, t).unwrap();
    assert_eq!((r.passed, r.failed), (1, 1));
    let _ = std::fs::remove_file(&log);
}

// ---- argument handling and plan pass-through ----

use crate::process::{launcher, rank_args, RunOutcome};
use crate::runner::{run_args, select, Selection};
use crate::{Backend, Cli, Cmd, ConformanceArgs};
use clap::Parser;
use std::path::{Path, PathBuf};

fn parse(args: &[&str]) -> ConformanceArgs {
    let mut all = vec!["xtask", "conformance"];
    all.extend_from_slice(args);
    match Cli::try_parse_from(all).unwrap().cmd {
        Cmd::Conformance(a) => a,
        Cmd::Mutants(_) => unreachable!("parsed as conformance"),
    }
}

fn sel(args: &[&str]) -> Selection {
    select(&parse(args)).unwrap()
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

#[test]
fn the_full_matrix_is_the_default() {
    let s = sel(&[]);
    assert_eq!(s.world_sizes, vec![1, 2, 4, 8]);
    assert!(s.conformance_run && s.run_suites.is_empty() && s.plans.is_empty());
    assert_eq!(s.train_worlds, vec![2, 4]);
    assert!(s.faults && s.nccl);
}

#[test]
fn quick_means_world_sizes_1_2_and_the_short_training_scenarios() {
    let s = sel(&["--quick"]);
    assert_eq!(s.world_sizes, vec![1, 2]);
    assert_eq!(s.train_worlds, vec![2]);
    assert_eq!(crate::train::Group::other_mesh(true), ("single", 1));
    assert_eq!(crate::train::Group::other_mesh(false), ("ep-tp", 4));
    // Explicit world sizes win over --quick, and limit the training scenarios.
    let s = sel(&["--quick", "--world-sizes", "1,4"]);
    assert_eq!(s.world_sizes, vec![1, 4]);
    assert!(s.train_worlds.is_empty());
    let s = sel(&["--world-sizes", "2,8"]);
    assert_eq!(s.train_worlds, vec![2]);
}

#[test]
fn suites_split_into_conformance_run_suites_and_xtask_suites() {
    let s = sel(&["--suites", "train"]);
    assert!(!s.conformance_run, "train alone needs no `conformance run`");
    assert_eq!(s.train_worlds, vec![2, 4]);
    assert!(!s.faults && !s.nccl);
    let s = sel(&["--suites", "parallel,checkpoint"]);
    assert!(s.conformance_run);
    assert_eq!(s.run_suites, strings(&["parallel", "checkpoint"]));
    assert!(s.train_worlds.is_empty() && !s.faults);
    let s = sel(&[
        "--suites",
        "golden,train,faults,golden",
        "--suites",
        "sharded",
    ]);
    assert_eq!(s.run_suites, strings(&["golden", "sharded"]));
    assert!(!s.train_worlds.is_empty() && s.faults && !s.nccl);
    assert!(select(&parse(&["--suites", "golden,,train"])).is_err());
    assert!(select(&parse(&["--world-sizes", "0,2"])).is_err());
}

#[test]
fn plans_are_passed_through_to_conformance_run() {
    let s = sel(&[
        "--plans",
        "ep,tp-sp",
        "--plans",
        "ep-fsdp,ep",
        "--suites",
        "parallel,train",
    ]);
    assert_eq!(s.plans, strings(&["ep", "tp-sp", "ep-fsdp"]));
    let fixtures = [PathBuf::from("/f/a")];
    let a = run_args(
        Backend::Threads,
        4,
        &fixtures,
        &[],
        &s,
        Path::new("/o/r.json"),
    );
    let pos = a
        .iter()
        .position(|x| x == "--plans")
        .expect("--plans passed");
    assert_eq!(a[pos + 1], "ep,tp-sp,ep-fsdp");
    let pos = a.iter().position(|x| x == "--suites").unwrap();
    assert_eq!(
        a[pos + 1],
        "parallel",
        "the pseudo-suite train is not passed on"
    );
    assert_eq!(
        &a[..5],
        &strings(&["run", "--backend", "threads", "--world", "4"])[..]
    );
    assert!(a.ends_with(&strings(&["--json", "/o/r.json"])));
    // Without --plans (and --suites) conformance's defaults (all) apply.
    let s = sel(&[]);
    let a = run_args(Backend::Mpi, 8, &fixtures, &[], &s, Path::new("/o/r.json"));
    assert!(!a
        .iter()
        .any(|x| x == "--plans" || x == "--suites" || x == "--world"));
    assert!(select(&parse(&["--plans", "ep,"])).is_err());
}

#[test]
fn launcher_runs_threads_directly_and_mpi_under_mpirun_with_exported_env() {
    let env = [("COLLECTIVES_TIMEOUT_SECS", "20".to_string())];
    let args = rank_args("train", Backend::Threads, 8);
    assert_eq!(
        args,
        strings(&["train", "--backend", "threads", "--world", "8"])
    );
    let c = launcher(
        Path::new("/bin/conf"),
        Backend::Threads,
        8,
        false,
        &env,
        &args,
    );
    assert_eq!(c.get_program(), "/bin/conf");
    assert!(c
        .get_envs()
        .any(|(k, v)| k == "COLLECTIVES_TIMEOUT_SECS" && v == Some("20".as_ref())));
    let args = rank_args("train", Backend::Mpi, 8);
    assert_eq!(args, strings(&["train", "--backend", "mpi"]));
    let c = launcher(Path::new("/bin/conf"), Backend::Mpi, 8, true, &env, &args);
    assert_eq!(c.get_program(), "mpirun");
    let got: Vec<String> = c
        .get_args()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        got,
        strings(&[
            "-n",
            "8",
            "--oversubscribe",
            "--bind-to",
            "none",
            "--allow-run-as-root",
            "-x",
            "COLLECTIVES_TIMEOUT_SECS",
            "/bin/conf",
            "train",
            "--backend",
            "mpi"
        ])
    );
}

// ---- scenario verdicts on fake train.json files ----

use crate::train::{
    check_resume, check_run, compare_verdict, kill_verdict, loss_plot, read_train, step_dir,
    TrainJson,
};

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("xtask-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn train_json(plan: &str, world: usize, start: u64, steps: u64, from: Option<&str>) -> String {
    let losses: Vec<String> = (start + 1..=steps)
        .map(|s| format!(r#"{{"step": {s}, "loss": {}}}"#, 2.0 / s as f64))
        .collect();
    format!(
        r#"{{"plan": "{plan}", "world": {world}, "mesh": [{world}], "start_step": {start}, "steps": {steps},
           "losses": [{}], "resumed_from": {}, "incomplete_skipped": ["/ck/D/step_00000004/"],
           "weights_digest": "ab12"}}"#,
        losses.join(", "),
        from.map(|f| format!("\"{f}\"")).unwrap_or("null".into())
    )
}

fn parsed(text: &str) -> TrainJson {
    serde_json::from_str(text).unwrap()
}

#[test]
fn train_json_is_read_with_its_weights_and_checked() {
    let d = tmp("trainjson");
    std::fs::write(d.join("train.json"), train_json("ep", 2, 0, 8, None)).unwrap();
    let e = read_train(&d).unwrap_err();
    assert!(e.contains("weights.safetensors"), "{e}");
    std::fs::write(d.join("weights.safetensors"), b"x").unwrap();
    let tj = read_train(&d).unwrap();
    check_run(&tj, "ep", 2, 0, 8).unwrap();
    assert!(check_run(&tj, "ep-tp", 2, 0, 8)
        .unwrap_err()
        .contains("plan"));
    assert!(check_run(&tj, "ep", 4, 0, 8).unwrap_err().contains("world"));
    assert!(check_run(&tj, "ep", 2, 4, 8)
        .unwrap_err()
        .contains("start_step"));
    std::fs::write(d.join("train.json"), "{\"plan\": ").unwrap();
    assert!(read_train(&d).unwrap_err().contains("train.json"));
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn check_run_requires_one_finite_loss_per_step_and_a_digest() {
    let mut tj = parsed(&train_json("ep", 2, 4, 8, Some("/c/step_00000004")));
    check_run(&tj, "ep", 2, 4, 8).unwrap();
    tj.losses.remove(1);
    assert!(check_run(&tj, "ep", 2, 4, 8).unwrap_err().contains("steps"));
    let mut tj = parsed(&train_json("ep", 2, 4, 8, Some("/c/step_00000004")));
    tj.losses[2].loss = f64::NAN;
    assert!(check_run(&tj, "ep", 2, 4, 8)
        .unwrap_err()
        .contains("loss of step 7"));
    let mut tj = parsed(&train_json("ep", 2, 4, 8, Some("/c/step_00000004")));
    tj.weights_digest.clear();
    assert!(check_run(&tj, "ep", 2, 4, 8).is_err());
    // A fresh run must not claim to be resumed.
    let tj = parsed(&train_json("ep", 2, 0, 8, Some("/c/step_00000004")));
    assert!(check_run(&tj, "ep", 2, 0, 8)
        .unwrap_err()
        .contains("resumed_from"));
}

#[test]
fn check_resume_names_the_step_dirs_in_any_path_form() {
    assert_eq!(step_dir(4), "step_00000004");
    for from in ["/abs/C/step_00000002", "C/step_00000002/", "step_00000002"] {
        let tj = parsed(&train_json("ep", 2, 2, 8, Some(from)));
        check_resume(&tj, 2, &[4]).unwrap();
        assert!(check_resume(&tj, 4, &[])
            .unwrap_err()
            .contains("resumed_from"));
        assert!(check_resume(&tj, 2, &[6])
            .unwrap_err()
            .contains("incomplete_skipped"));
    }
    let tj = parsed(&train_json("ep", 2, 0, 8, None));
    assert!(check_resume(&tj, 2, &[]).is_err());
    // step_00000040 is not step_00000004.
    let tj = parsed(&train_json("ep", 2, 4, 8, Some("/c/step_000000040")));
    assert!(check_resume(&tj, 4, &[]).is_err());
}

fn outcome(ok: bool, seconds: f64, code: Option<i32>, timed_out: bool) -> RunOutcome {
    RunOutcome {
        ok,
        seconds,
        note: if ok {
            String::new()
        } else if timed_out {
            "killed after 60 s (timeout)".into()
        } else {
            format!("exit status {code:?}")
        },
        code,
        timed_out,
    }
}

#[test]
fn a_killed_rank_must_fail_the_job_in_bounded_time_with_an_error() {
    let bound = Duration::from_secs(60);
    let stderr = "step 2 ok\nError: rank 0: all_reduce (collective #7): peer rank 1 is gone\n";
    let note = kill_verdict(&outcome(false, 3.25, Some(1), false), bound, stderr, "").unwrap();
    assert!(
        note.contains("3.2") && note.contains("all_reduce"),
        "{note}"
    );
    // Exit 0 is not a failure of the job.
    assert!(kill_verdict(&outcome(true, 1.0, Some(0), false), bound, stderr, "").is_err());
    // Our timeout killed it: a hang.
    let e = kill_verdict(&outcome(false, 70.0, None, true), bound, stderr, "").unwrap_err();
    assert!(e.contains("60 s"), "{e}");
    // Slower than the bound even if it ended itself.
    assert!(kill_verdict(&outcome(false, 61.0, Some(1), false), bound, stderr, "").is_err());
    // No error anywhere.
    let e = kill_verdict(
        &outcome(false, 1.0, Some(134), false),
        bound,
        "Aborted\n",
        "",
    )
    .unwrap_err();
    assert!(e.contains("no error"), "{e}");
    // Under MPI the survivors are ended by mpirun's SIGTERM: their collectives fault report names
    // the collective without saying "error".
    let sigterm = "conformance train: rank 1 killed at the start of step 3 (fault injection)\n\
        collectives: rank 0 of 2: terminated by signal 15 while in all_to_all (collective #20 on mpi communicator of 2 ranks (this rank: 0)); a peer died\n";
    let note = kill_verdict(&outcome(false, 1.5, Some(137), false), bound, sigterm, "").unwrap();
    assert!(
        note.contains("all_to_all (collective #20") && note.contains("fault report"),
        "{note}"
    );
    // Under MPI the error may only be in the ranks' fault report files.
    let note = kill_verdict(
        &outcome(false, 1.0, Some(70), false),
        bound,
        "",
        "collectives watchdog: rank 0 of 2: error: all_reduce did not complete\n",
    )
    .unwrap();
    assert!(note.contains("fault report"), "{note}");
}

#[test]
fn compare_train_exit_codes_become_verdicts() {
    compare_verdict(&outcome(true, 0.1, Some(0), false), "equal\n").unwrap();
    let e = compare_verdict(
        &outcome(false, 0.1, Some(1), false),
        "\nloss differs at step 6: 0.5 vs 0.50001\n",
    )
    .unwrap_err();
    assert!(e.contains("differ") && e.contains("step 6"), "{e}");
    let e = compare_verdict(
        &outcome(false, 0.1, Some(2), false),
        "A/train.json: missing",
    )
    .unwrap_err();
    assert!(e.contains("unusable"), "{e}");
    assert!(compare_verdict(&outcome(false, 0.1, None, true), "").is_err());
    assert!(compare_verdict(&outcome(false, 0.1, Some(101), false), "panic").is_err());
}

#[test]
fn the_loss_plot_joins_the_two_parts_of_the_resumed_run_and_marks_the_resume() {
    let a = parsed(&train_json("ep", 2, 0, 8, None));
    let b1 = parsed(&train_json("ep", 2, 0, 4, None));
    let b2 = parsed(&train_json("ep", 2, 4, 8, Some("/c/step_00000004")));
    let b3 = parsed(&train_json("ep-tp", 4, 4, 8, Some("/c/step_00000004")));
    let p = loss_plot("t", Some(&a), Some(&b1), Some(&b2), Some(&b3)).unwrap();
    assert_eq!(p.series.len(), 3);
    assert_eq!(p.series[1].points.len(), 8);
    assert_eq!(p.series[1].points, p.series[0].points);
    assert_eq!(p.series[2].points.len(), 4);
    assert_eq!(p.markers.len(), 1);
    assert_eq!(p.markers[0].x, 4.0);
    assert!(p.series[2].name.contains("ep-tp"));
    // Only the reference: one series, no marker; nothing: no plot.
    let p = loss_plot("t", Some(&a), None, None, None).unwrap();
    assert_eq!((p.series.len(), p.markers.len()), (1, 0));
    assert!(loss_plot("t", None, None, None, None).is_none());
}

// ---- the scenarios end to end, against a fake `conformance` ----

/// A shell stand-in for `conformance train` / `compare-train` following the contract: step dirs
/// get a COMMITTED marker when complete; `--resume` takes the latest committed one.
const FAKE_CONFORMANCE: &str = r#"#!/bin/sh
cmd=$1; shift
case $cmd in
compare-train)
  [ -f "$2/train.json" ] && [ -f "$4/train.json" ] || { echo "unusable input" >&2; exit 2; }
  echo "equal"; exit 0;;
dcp)
  [ -f "$2/COMMITTED" ] || { echo "error: $2: incomplete checkpoint" >&2; exit 2; }
  echo "  [dcp] PASS model.layers.0.mlp.experts.gate_and_up_projs (F32 [4, 8, 16], 4 chunks, [_S(2, 2)] on [2])"
  echo "2 passed, 0 failed, 0 skipped"; exit 0;;
train) ;;
*) echo "error: unrecognized subcommand '$cmd'" >&2; exit 2;;
esac
world=1; every=0; resume=0; ck=; kat=; ksave=; kmid=; kfull=
while [ $# -gt 0 ]; do
  case $1 in
    --backend) shift;; --world) world=$2; shift;; --plan) plan=$2; shift;;
    --steps) steps=$2; shift;; --out-dir) out=$2; shift;; --ckpt-root) ck=$2; shift;;
    --save-every) every=$2; shift;; --resume) ;; --kill-rank) shift;;
    --kill-at-step) kat=$2; shift;; --kill-in-save-at-step) ksave=$2; shift;;
    --crash-mid-write-at-step) kmid=$2; shift;; --disk-full-at-step) kfull=$2; shift;;
  esac
  case $1 in --resume) resume=1;; esac
  shift
done
start=0; from=null; skipped=
if [ $resume = 1 ]; then
  for d in "$ck"/step_*; do
    [ -d "$d" ] || continue
    if [ -f "$d/COMMITTED" ]; then start=$(basename "$d" | sed 's/^step_0*//'); from="\"$d\""
    else skipped="$skipped,\"$d\""; fi
  done
fi
step=$start; losses=
while [ $step -lt $steps ]; do
  step=$((step + 1))
  if [ "$step" = "$kat" ]; then echo "error: rank 0: all_reduce: peer rank 1 is gone" >&2; exit 1; fi
  losses="$losses,{\"step\": $step, \"loss\": 0.$((100 - step))}"
  if [ $every -gt 0 ] && [ $((step % every)) = 0 ]; then
    d=$(printf '%s/step_%08d' "$ck" $step); mkdir -p "$d"
    if [ "$step" = "$ksave" ]; then echo "error: rank 1 killed while saving" >&2; exit 1; fi
    if [ "$step" = "$kmid" ]; then echo "rank 1: file-size limit 10 bytes" >&2; : > "$d/.__1_0.distcp.tmp-1"; exit 153; fi
    if [ "$step" = "$kfull" ]; then echo "error: $d/.__1_0.distcp.tmp-1: i/o error: File too large (os error 27)" >&2; exit 1; fi
    touch "$d/COMMITTED"
  fi
done
mkdir -p "$out"; : > "$out/weights.safetensors"
echo "{\"plan\": \"$plan\", \"world\": $world, \"mesh\": [$world], \"start_step\": $start, \"steps\": $steps, \"losses\": [${losses#,}], \"resumed_from\": $from, \"incomplete_skipped\": [${skipped#,}], \"weights_digest\": \"d\"}" > "$out/train.json"
"#;

fn fake_group(name: &str, script: &str, quick: bool) -> (crate::train::Group, PathBuf) {
    use std::os::unix::fs::PermissionsExt;
    let d = tmp(name);
    let bin = d.join("conformance");
    std::fs::write(&bin, script).unwrap();
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
    let g = crate::train::Group {
        bin,
        backend: Backend::Threads,
        world: 2,
        quick,
        as_root: false,
        timeout: Duration::from_secs(30),
        dir: d.join("work"),
        logs: d.join("logs"),
    };
    (g, d)
}

#[test]
fn every_scenario_passes_against_a_conforming_fake() {
    let (g, d) = fake_group("fake-ok", FAKE_CONFORMANCE, true);
    let (rows, plot) = g.run(&|_| {}).unwrap();
    let names: Vec<&str> = rows.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(
        names,
        [
            crate::train::ROW_UNINTERRUPTED,
            crate::train::ROW_SAME_MESH,
            crate::train::ROW_OTHER_MESH,
            crate::train::ROW_KILL_SAVE,
            crate::train::ROW_CRASH_WRITE,
            crate::train::ROW_DISK_FULL,
            crate::train::ROW_KILL_TRAIN,
            crate::train::ROW_DCP
        ]
    );
    for r in &rows {
        assert_eq!(
            (r.suite.as_str(), r.backend.as_str(), r.world_size),
            ("train", "threads", 2)
        );
        assert_eq!((r.passed, r.failed), (1, 0), "{}: {:?}", r.name, r.failures);
    }
    assert!(rows[6].note.contains("failed in"), "{}", rows[6].note);
    assert!(
        rows[4]
            .note
            .contains("leaving .__1_0.distcp.tmp-1 (0 bytes)"),
        "{}",
        rows[4].note
    );
    assert!(rows[2].note.contains("single world 1"), "{}", rows[2].note);
    assert!(
        rows[7].note.starts_with("tp: G: 2 passed, 0 failed")
            && rows[7].note.contains("[_S(2, 2)]"),
        "{}",
        rows[7].note
    );
    let plot = plot.unwrap();
    assert_eq!(plot.series.len(), 3);
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn scenarios_fail_with_clear_rows_when_train_is_missing_or_wrong() {
    // A conformance binary without `train`: eight failing rows naming the cause, no crash.
    let (g, d) = fake_group(
        "fake-missing",
        "#!/bin/sh\necho \"error: unrecognized subcommand '$1'\" >&2\nexit 2\n",
        false,
    );
    let (rows, plot) = g.run(&|_| {}).unwrap();
    assert_eq!(rows.len(), 8);
    for r in &rows {
        assert_eq!((r.passed, r.failed), (0, 1), "{}", r.name);
        let m = &r.failures[0].message;
        assert!(
            m.contains("unrecognized subcommand") || m.contains("run A failed"),
            "{}: {}",
            r.name,
            r.failures[0].message
        );
    }
    assert!(plot.is_none());
    let _ = std::fs::remove_dir_all(&d);
    // Kills that are ignored (exit 0) and a resume that does not skip the incomplete dir fail.
    let ignoring = FAKE_CONFORMANCE
        .replace("exit 1; fi\n  losses", "fi\n  losses")
        .replace(
            "echo \"error: rank 1 killed while saving\" >&2; exit 1;",
            "touch \"$d/COMMITTED\";",
        )
        // a "crash" that leaves no partial file, a "full disk" that names no file
        .replace(": > \"$d/.__1_0.distcp.tmp-1\"; exit 153;", "exit 153;")
        .replace("File too large (os error 27)", "something");
    let (g, d) = fake_group("fake-ignoring", &ignoring, true);
    let (rows, _) = g.run(&|_| {}).unwrap();
    let failed: Vec<&str> = rows
        .iter()
        .filter(|r| r.failed > 0)
        .map(|r| r.name.as_str())
        .collect();
    assert_eq!(
        failed,
        [
            crate::train::ROW_KILL_SAVE,
            crate::train::ROW_CRASH_WRITE,
            crate::train::ROW_DISK_FULL,
            crate::train::ROW_KILL_TRAIN
        ]
    );
    assert!(rows[3].failures[0].message.contains("status 0"));
    assert!(rows[4].failures[0]
        .message
        .contains("left no partial .distcp.tmp file"));
    assert!(rows[5].failures[0]
        .message
        .contains("without saying 'File too large'"));
    let _ = std::fs::remove_dir_all(&d);
}

// ---- HTML ----

use crate::html::{escape, page, svg, ticks, Marker, Plot, Series};

fn plot_of(series: Vec<Vec<(f64, f64)>>) -> Plot {
    Plot {
        title: "loss <A & B>".into(),
        x_label: "step".into(),
        y_label: "loss".into(),
        series: series
            .into_iter()
            .enumerate()
            .map(|(i, points)| Series {
                name: format!("s{i} \"q\""),
                points,
            })
            .collect(),
        markers: vec![Marker {
            x: 4.0,
            label: "resume".into(),
        }],
    }
}

fn assert_finite_svg(s: &str) {
    for bad in ["NaN", "inf"] {
        assert!(!s.contains(bad), "{bad} in {s}");
    }
}

#[test]
fn html_escape_covers_the_special_characters() {
    assert_eq!(
        escape(r#"<a href="x">'&'</a>"#),
        "&lt;a href=&quot;x&quot;&gt;&#39;&amp;&#39;&lt;/a&gt;"
    );
    assert_eq!(escape("plain"), "plain");
}

#[test]
fn svg_has_a_polyline_per_series_axes_and_a_legend() {
    let p = plot_of(vec![
        (1..=8).map(|s| (s as f64, 1.0 / s as f64)).collect(),
        (1..=8).map(|s| (s as f64, 1.0 / s as f64)).collect(),
        (5..=8).map(|s| (s as f64, 1.0 / s as f64 + 1e-6)).collect(),
    ]);
    let s = svg(&p);
    assert!(s.starts_with("<svg") && s.trim_end().ends_with("</svg>"));
    assert_eq!(s.matches("<polyline").count(), 3);
    assert_eq!(s.matches("<circle").count(), 20);
    assert!(s.contains("loss &lt;A &amp; B&gt;") && s.contains("s2 &quot;q&quot;"));
    assert!(
        s.contains(">step</text>") && s.contains(">loss</text>") && s.contains(">resume</text>")
    );
    assert_finite_svg(&s);
}

#[test]
fn svg_handles_a_single_point_equal_losses_and_no_data() {
    let s = svg(&plot_of(vec![vec![(1.0, 0.5)]]));
    assert_eq!(s.matches("<polyline").count(), 1);
    assert_eq!(s.matches("<circle").count(), 1);
    assert_finite_svg(&s);
    let s = svg(&plot_of(vec![
        (1..=8).map(|s| (s as f64, 0.25)).collect(),
        vec![],
    ]));
    assert_eq!(s.matches("<polyline").count(), 2);
    assert_finite_svg(&s);
    let s = svg(&plot_of(vec![vec![(1.0, 0.0), (2.0, 0.0)]]));
    assert_finite_svg(&s);
    let s = svg(&plot_of(vec![vec![(1.0, f64::NAN)]]));
    assert!(s.contains("no data"));
    let s = svg(&plot_of(vec![]));
    assert!(s.contains("no data"));
}

#[test]
fn ticks_are_round_and_inside_the_range() {
    let (t, d) = ticks(0.0, 8.0, 8);
    assert_eq!(t, vec![0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]);
    assert_eq!(d, 0);
    let (t, d) = ticks(0.1231, 0.1239, 4);
    assert!(
        t.len() >= 3 && t.iter().all(|v| (0.1231..=0.1239).contains(v)),
        "{t:?}"
    );
    assert_eq!(d, 4);
    let (t, _) = ticks(1.0, 1.0, 5);
    assert_eq!(t.len(), 1);
}

#[test]
fn the_page_has_totals_matrix_failures_and_plots() {
    let run: RunResult = serde_json::from_str(
        r#"{"backend":"threads","world_size":2,"suites":[
            {"suite":"golden","passed":3,"failed":1,"skipped":0,"seconds":0.5,"failures":[{"name":"g","message":"x <b>bold</b>"}]},
            {"suite":"parallel","passed":0,"failed":0,"skipped":2,"seconds":0.1}]}"#,
    )
    .unwrap();
    let mut rows = Row::from_run(&run);
    let mut t = Row::new("train", "mpi", 4, 2.0);
    t.name = "kill during training: error in bounded time".into();
    t.passed = 1;
    t.note = "failed in 3.1 s".into();
    rows.push(t);
    let html = page(
        &rows,
        "header <h>",
        &[plot_of(vec![vec![(1.0, 1.0), (2.0, 0.5)]])],
    );
    assert!(html.starts_with("<!DOCTYPE html>"));
    assert!(
        !html.contains("http://") || html.matches("http://").count() == 1,
        "only the SVG namespace"
    );
    assert!(!html.contains("<script") && !html.contains("<link"));
    assert!(html.contains("4 passed, 1 failed, 2 skipped"));
    assert!(html.contains("<th>threads world 2</th><th>mpi world 4</th>"));
    assert!(html.contains(r#"<td class="fail">3 passed, 1 failed, 0 skipped</td>"#));
    assert!(html.contains(r#"<td class="skip">0 passed, 0 failed, 2 skipped</td>"#));
    assert!(html.contains(r#"<td class="pass">1 passed, 0 failed, 0 skipped</td>"#));
    assert!(html.contains(r#"<td class="none">&mdash;</td>"#));
    assert!(html.contains("x &lt;b&gt;bold&lt;/b&gt;") && !html.contains("<b>bold"));
    assert!(html.contains("header &lt;h&gt;"));
    assert!(html.contains("failed in 3.1 s"));
    assert_eq!(html.matches("<svg").count(), 1);
    let md = report::markdown(&rows, "h");
    assert!(md.contains("| train: kill during training: error in bounded time | 4 | mpi | 1 | 0 | 0 | 2.00 | failed in 3.1 s |"), "{md}");
}

// ---- dcp suite ----

fn dcp_run(failures: &[(&str, &str)], passed: usize) -> crate::results::RunResult {
    let f: Vec<String> = failures
        .iter()
        .map(|(n, m)| format!(r#"{{"name": "{n}", "message": "{m}"}}"#))
        .collect();
    serde_json::from_str(&format!(
        r#"{{"backend":"threads","world_size":1,"suites":[{{"suite":"dcp","passed":{passed},"failed":{},"skipped":0,"seconds":0.1,"failures":[{}]}}]}}"#,
        failures.len(),
        f.join(",")
    ))
    .unwrap()
}

#[test]
fn dcp_rows_pass_clean_fixtures_and_require_the_expected_failure() {
    use crate::dcp::{verdict, ExpectFailure, Info};
    let plain = Info {
        world_size: 2,
        storage: "torch_save".into(),
        torch_version: "2.15.0".into(),
        expect_failure: None,
        model: None,
        plan_tp: None,
    };
    let r = verdict("tp_w2", &plain, Some(&dcp_run(&[], 17)), true, 0.1, "");
    assert_eq!(
        (r.passed, r.failed, r.suite.as_str(), r.world_size),
        (17, 0, "dcp", 2)
    );
    let r = verdict(
        "tp_w2",
        &plain,
        Some(&dcp_run(&[("k", "overlaps")], 16)),
        false,
        0.1,
        "exit 1",
    );
    assert_eq!((r.passed, r.failed), (16, 1));
    let r = verdict("tp_w2", &plain, None, false, 0.1, "exit 2; log: error: bad");
    assert!(r.failed == 1 && r.failures[0].message.contains("error: bad"));
    let bug = Info {
        expect_failure: Some(ExpectFailure {
            check: "d: model shape".into(),
            message: "consistent with S(2), not S(1)".into(),
        }),
        ..plain.clone()
    };
    let seen = dcp_run(
        &[(
            "d: model shape",
            "each chunk [8, 65, 12] is consistent with S(2), not S(1)",
        )],
        16,
    );
    let r = verdict("seed_bug_w2", &bug, Some(&seen), false, 0.1, "exit 1");
    assert_eq!((r.passed, r.failed), (17, 0));
    assert!(r.note.contains("detected as expected"));
    // Not detected (the check passed), detected with another message, or with an extra failure.
    for run in [
        dcp_run(&[], 17),
        dcp_run(&[("d: model shape", "something else")], 16),
        dcp_run(
            &[
                ("d: model shape", "consistent with S(2), not S(1)"),
                ("x", "overlaps"),
            ],
            15,
        ),
    ] {
        let r = verdict(
            "seed_bug_w2",
            &bug,
            Some(&run),
            run.suites[0].failed == 0,
            0.1,
            "",
        );
        assert_eq!(r.failed, 1, "{:?}", r.failures);
        assert!(r.failures[0]
            .message
            .contains("expected exactly 'd: model shape'"));
    }
}

#[test]
fn dcp_fixtures_are_found_with_their_info() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap();
    let f = crate::dcp::fixtures(root).unwrap();
    assert!(f.len() >= 10, "{}", f.len());
    let bug: Vec<&str> = f
        .iter()
        .filter(|x| x.2.expect_failure.is_some())
        .map(|x| x.0.as_str())
        .collect();
    assert_eq!(bug, ["seed_bug_w2"]);
}

#[test]
fn golden_fault_rows_pass_only_when_the_faulty_path_alone_fails() {
    use crate::golden_faults::verdict;
    use crate::results::{Failure, RunResult, SuiteResult};
    let run = |failures: &[&str]| RunResult {
        backend: "threads".into(),
        world_size: 1,
        suites: vec![SuiteResult {
            suite: "golden".into(),
            passed: 10,
            failed: failures.len(),
            skipped: 0,
            seconds: 0.1,
            failures: failures
                .iter()
                .map(|n| Failure {
                    name: n.to_string(),
                    message: "normwise error 4.5e-4 > 16 x ...".into(),
                })
                .collect(),
        }],
    };
    let f = "q: layer 1 fast+scale-one-expert output";
    let r = verdict(
        "scale-one-expert",
        "q",
        " output",
        Some(&run(&[f])),
        false,
        0.1,
        "",
    );
    assert_eq!((r.passed, r.failed), (1, 0), "{:?}", r.failures);
    assert!(r.note.starts_with("detected: 1 of 11 checks failed"));
    // The fault went unnoticed (exit 0, nothing failed).
    let r = verdict(
        "scale-one-expert",
        "q",
        " output",
        Some(&run(&[])),
        true,
        0.1,
        "",
    );
    assert_eq!(r.failed, 1);
    // A reference path failed too: the fault is not what was caught.
    let r = verdict(
        "scale-one-expert",
        "q",
        " output",
        Some(&run(&[f, "q: layer 1 reference output"])),
        false,
        0.1,
        "",
    );
    assert_eq!(r.failed, 1);
    assert!(r.failures[0].message.contains("1 outside the faulty path"));
    // Only another tensor failed, not the expected one.
    let g = "q: layer 1 fast+scale-one-expert grad_input";
    let r = verdict(
        "scale-one-expert",
        "q",
        " output",
        Some(&run(&[g])),
        false,
        0.1,
        "",
    );
    assert_eq!(r.failed, 1);
    // No result file.
    let r = verdict(
        "scale-one-expert",
        "q",
        " output",
        None,
        false,
        0.1,
        "exit 2",
    );
    assert!(r.failures[0].message.contains("no result: exit 2"));
}
