//! Unit tests of the orchestration that does not need the conformance binary.

use crate::report;
use crate::results::{Row, RunResult};
use crate::runner::run_with_timeout;
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
