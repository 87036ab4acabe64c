//! Suite `dcp`: `conformance dcp --checkpoint FIXTURE/ckpt --model conformance/fixtures/dcp/model`
//! on every torch-written checkpoint under `conformance/fixtures/dcp/` (one row each). A fixture
//! whose `info.json` has `expect_failure: {check, message}` (the seed bug) must fail exactly that
//! check with a message containing that text, and pass everything else: the row then passes
//! ("detected"). A fixture saved from an HF fixture's model (`info.json` `model`) is checked
//! against that model's config, and, with `plan_tp: N`, also against transformers' TP plan of it
//! at world N (`conformance plan --check-dcp`, a second row).

use crate::process::run_for_result;
use crate::results::{Failure, Row, RunResult};
use serde::Deserialize;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// The expected failure of a negative fixture.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct ExpectFailure {
    pub check: String,
    pub message: String,
}

/// What xtask reads of a fixture's `info.json`.
#[derive(Debug, Clone, Deserialize)]
pub struct Info {
    pub world_size: usize,
    pub storage: String,
    #[serde(default)]
    pub torch_version: String,
    #[serde(default)]
    pub expect_failure: Option<ExpectFailure>,
    /// The HF fixture (a folder under `conformance/fixtures/`) the checkpoint was saved from;
    /// default: `dcp/model`.
    #[serde(default)]
    pub model: Option<String>,
    /// The TP size of transformers' plan it was saved under: also checked against that plan.
    #[serde(default)]
    pub plan_tp: Option<usize>,
}

/// Every `conformance/fixtures/dcp/NAME/` with `ckpt/` and `info.json`, sorted.
pub fn fixtures(root: &Path) -> Result<Vec<(String, PathBuf, Info)>, String> {
    let dir = root.join("conformance").join("fixtures").join("dcp");
    let mut out = Vec::new();
    for e in fs::read_dir(&dir).map_err(|e| format!("{}: {e}", dir.display()))? {
        let p = e.map_err(|e| format!("{}: {e}", dir.display()))?.path();
        let info = p.join("info.json");
        if !(p.join("ckpt").is_dir() && info.is_file()) {
            continue;
        }
        let text = fs::read_to_string(&info).map_err(|e| format!("{}: {e}", info.display()))?;
        let i: Info =
            serde_json::from_str(&text).map_err(|e| format!("{}: {e}", info.display()))?;
        let name = p
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        out.push((name, p, i));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    if out.is_empty() {
        return Err(format!("no DCP fixtures under {}", dir.display()));
    }
    Ok(out)
}

/// The row of one fixture from the run's result file (`None`: no result written) and exit.
pub fn verdict(
    name: &str,
    info: &Info,
    run: Option<&RunResult>,
    ok: bool,
    seconds: f64,
    why: &str,
) -> Row {
    let mut row = Row::new(
        "dcp",
        &format!("torch {}", info.torch_version),
        info.world_size,
        seconds,
    );
    row.name = format!("{name} ({})", info.storage);
    let fail = |row: &mut Row, message: String| {
        row.failed += 1;
        row.failures.push(Failure {
            name: name.into(),
            message,
        });
    };
    let Some(s) = run.and_then(|r| r.suites.first()) else {
        fail(&mut row, format!("no result: {why}"));
        return row;
    };
    row.skipped = s.skipped;
    match &info.expect_failure {
        None => {
            row.passed = s.passed;
            row.failed = s.failed;
            row.failures = s.failures.clone();
            if !ok && s.failed == 0 {
                fail(&mut row, why.into());
            }
        }
        Some(exp) => {
            let detected = !ok
                && s.failures.len() == 1
                && s.failures[0].name == exp.check
                && s.failures[0].message.contains(&exp.message);
            if detected {
                row.passed = s.passed + 1;
                row.note = format!("detected as expected: {}", s.failures[0].message);
            } else {
                row.passed = s.passed;
                let got: Vec<String> = s
                    .failures
                    .iter()
                    .map(|f| format!("{}: {}", f.name, f.message))
                    .collect();
                fail(
                    &mut row,
                    format!(
                        "expected exactly '{}' to fail with '{}', got {} failure(s): {}",
                        exp.check,
                        exp.message,
                        s.failures.len(),
                        got.join("; ")
                    ),
                );
            }
        }
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
    let fixtures_dir = root.join("conformance").join("fixtures");
    let mut rows = Vec::new();
    for (name, dir, info) in fixtures(root)? {
        let model = match &info.model {
            Some(m) => fixtures_dir.join(m),
            None => fixtures_dir.join("dcp").join("model"),
        };
        let json = out_dir.join(format!("dcp-{name}.json"));
        let log = logs.join(format!("dcp-{name}.log"));
        let mut cmd = Command::new(bin);
        cmd.arg("dcp")
            .arg("--checkpoint")
            .arg(dir.join("ckpt"))
            .arg("--model")
            .arg(&model)
            .arg("--json")
            .arg(&json);
        let (run, out, why) = run_for_result(cmd, &json, &log, timeout)?;
        rows.push(verdict(
            &name,
            &info,
            run.as_ref(),
            out.ok,
            out.seconds,
            &why,
        ));
        let Some(tp) = info.plan_tp else { continue };
        // The same checkpoint against transformers' TP plan of the model it was saved from.
        let json = out_dir.join(format!("dcp-plan-{name}.json"));
        let log = logs.join(format!("dcp-plan-{name}.log"));
        let mut cmd = Command::new(bin);
        cmd.arg("plan")
            .arg("--model")
            .arg(&model)
            .arg("--tp")
            .arg(tp.to_string())
            .arg("--check-dcp")
            .arg(dir.join("ckpt"))
            .arg("--report")
            .arg(&json);
        let (run, out, why) = run_for_result(cmd, &json, &log, timeout)?;
        let mut row = verdict(&name, &info, run.as_ref(), out.ok, out.seconds, &why);
        row.name = format!("{name} (transformers tp plan, world {tp})");
        rows.push(row);
    }
    Ok(rows)
}
