//! Suite `golden-faults`: `conformance golden --fixture F --mutate FAULT` for each deliberate fault
//! of the fast float32 path on a fixture that can show it (one row each). A row passes when the
//! run fails, every failed check is one of the faulty path's (`fast+FAULT`, the reference paths
//! keep passing) and the expected tensor's check is among them: the float32 bar catches the
//! fault, down to a `1e-4` relative error in one expert.

use crate::process::run_for_result;
use crate::results::{Failure, Row, RunResult};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

/// (fault, fixture, a check-name suffix that must fail).
pub const CASES: [(&str, &str, &str); 8] = [
    ("swap-experts", "qwen3_moe_tiny", " output"),
    ("drop-bias", "gpt_oss_tiny", " output"),
    ("drop-bias", "deepseek_v3_e256_k8", " output"),
    (
        "transpose-expert-weight",
        "qwen3_vl_moe_tiny",
        " grad_input",
    ),
    ("scale-one-expert", "qwen3_moe_e128_k8", " output"),
    ("scale-one-expert", "gpt_oss_clamped", " output"),
    ("scale-one-expert", "step3p5_tiny", " output"),
    ("drop-routing-weight", "deepseek_v3_tiny", " output"),
];

/// The row of one case from its result file (`None`: none written) and whether the run exited 0.
pub fn verdict(
    fault: &str,
    fixture: &str,
    must_fail: &str,
    run: Option<&RunResult>,
    exit_ok: bool,
    seconds: f64,
    why: &str,
) -> Row {
    let mut row = Row::new("golden-faults", "threads", 1, seconds);
    row.name = format!("{fault} on {fixture}");
    let fail = |row: &mut Row, message: String| {
        row.failed += 1;
        row.failures.push(Failure {
            name: row.name.clone(),
            message,
        });
    };
    let Some(s) = run.and_then(|r| r.suites.first()) else {
        fail(&mut row, format!("no result: {why}"));
        return row;
    };
    let tag = format!(" fast+{fault} ");
    let outside: Vec<&str> = s
        .failures
        .iter()
        .filter(|f| !f.name.contains(&tag))
        .map(|f| f.name.as_str())
        .collect();
    let hit = s.failures.iter().find(|f| f.name.ends_with(must_fail));
    match hit {
        Some(h) if !exit_ok && outside.is_empty() => {
            row.passed = 1;
            row.note = format!(
                "detected: {} of {} checks failed, e.g. {}: {}",
                s.failed,
                s.passed + s.failed,
                h.name,
                h.message
            );
        }
        _ => fail(
            &mut row,
            format!(
                "expected '{tag}...{must_fail}' to fail and only fast+{fault} checks: exit ok {exit_ok}, {} failed ({} outside the faulty path: {})",
                s.failed,
                outside.len(),
                outside.join(", ")
            ),
        ),
    }
    row
}

/// Runs the suite with the conformance binary `bin`.
pub fn rows(
    bin: &Path,
    root: &Path,
    out_dir: &Path,
    logs: &Path,
    timeout: Duration,
) -> Result<Vec<Row>, String> {
    let mut rows = Vec::new();
    for (fault, fixture, must_fail) in CASES {
        let dir = root.join("conformance").join("fixtures").join(fixture);
        let tag = format!("golden-fault-{fault}-{fixture}");
        let json = out_dir.join(format!("{tag}.json"));
        let log = logs.join(format!("{tag}.log"));
        let mut cmd = Command::new(bin);
        cmd.arg("golden")
            .arg("--fixture")
            .arg(&dir)
            .arg("--mutate")
            .arg(fault)
            .arg("--json")
            .arg(&json);
        let (run, out, why) = run_for_result(cmd, &json, &log, timeout)?;
        rows.push(verdict(
            fault,
            fixture,
            must_fail,
            run.as_ref(),
            out.ok,
            out.seconds,
            &why,
        ));
    }
    Ok(rows)
}
