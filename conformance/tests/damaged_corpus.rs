//! A corpus of damaged copies of transformers-written fixtures (configs with absurd or ill-typed
//! sizes, truncated or inconsistent safetensors, missing, extra or misshapen tensors, a FIFO or a
//! directory in a file's place, broken golden files), built at test time from the committed
//! fixtures, each run through the `conformance` commands a user runs on a checkpoint
//! (`roundtrip`, `golden`, `sharded --world 2`). Every run must end by itself within its bound
//! (no hang), exit 1 or 2 with no panic, and say one `error:` line on stderr naming the file and the
//! key or field; the largest resident set of any of those processes stays under 64 MB
//! (`getrusage(RUSAGE_CHILDREN)`; the undamaged fixtures need about 20 MB).

mod corpus;

use corpus::{apply, copy_dir, corpus, run_bounded};
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_conformance");
/// A rejected input gets its error within this (the fixtures take well under a second).
const BOUND: Duration = Duration::from_secs(20);
const MAX_RSS_KB: i64 = 64 * 1024;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(name)
}

/// Runs `conformance ARGS` with a bound; returns (exit code, stderr, seconds). Panics on a hang
/// (after killing the child).
fn run(args: &[&str]) -> (Option<i32>, String, f64) {
    run_bounded(
        Command::new(BIN).args(args),
        BOUND,
        &format!("conformance {args:?}"),
    )
}

fn max_child_rss_kb() -> i64 {
    // SAFETY: getrusage writes into the struct it is given.
    unsafe {
        let mut u: libc::rusage = std::mem::zeroed();
        assert_eq!(libc::getrusage(libc::RUSAGE_CHILDREN, &mut u), 0);
        u.ru_maxrss
    }
}

#[test]
fn every_damaged_checkpoint_is_rejected_in_one_line_in_bounded_time_and_memory() {
    let cases = corpus();
    let tmp = tempfile::tempdir().unwrap();
    let mut problems = Vec::new();
    let mut runs = 0;
    let mut slowest = 0.0f64;
    for (i, c) in cases.iter().enumerate() {
        let dir = tmp.path().join(format!("case{i}"));
        copy_dir(&fixture(c.fixture), &dir);
        apply(&dir, &c.damage);
        let d = dir.display().to_string();
        for (tag, args) in [
            ('r', vec!["roundtrip", "--checkpoint", &d]),
            ('g', vec!["golden", "--fixture", &d]),
            ('s', vec!["sharded", "--checkpoint", &d, "--world", "2"]),
        ] {
            if !c.reject.contains(tag) {
                continue;
            }
            runs += 1;
            let (code, err, secs) = run(&args);
            slowest = slowest.max(secs);
            let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("error")).collect();
            let what = format!("{} [{}]", c.name, args[0]);
            if !matches!(code, Some(1) | Some(2)) {
                problems.push(format!(
                    "{what}: exit {code:?} (want 1 or 2); stderr: {err}"
                ));
            } else if err.contains("panicked") {
                problems.push(format!("{what}: panicked: {err}"));
            } else if lines.len() != 1 {
                problems.push(format!("{what}: {} error lines: {err}", lines.len()));
            } else if !lines[0].contains(&c.names) {
                problems.push(format!(
                    "{what}: the error does not name '{}': {}",
                    c.names, lines[0]
                ));
            }
        }
    }
    let rss = max_child_rss_kb();
    eprintln!(
        "damaged corpus: {} cases, {runs} runs, slowest {slowest:.2} s, largest child RSS {} KB",
        cases.len(),
        rss
    );
    assert!(
        problems.is_empty(),
        "{} of {runs} runs:\n{}",
        problems.len(),
        problems.join("\n")
    );
    assert!(
        rss < MAX_RSS_KB,
        "a rejected input took {rss} KB (bound {MAX_RSS_KB} KB)"
    );
    assert!(runs > 300, "{runs}");
}
