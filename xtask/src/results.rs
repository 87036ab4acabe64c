//! The result file each `conformance run --json FILE` writes, and the rows of the summary.
//!
//! Format (written by `conformance/src/report.rs`, read here):
//! `{"backend": "threads", "world_size": 4, "suites": [{"suite": "golden", "passed": 2,
//! "failed": 0, "skipped": 0, "seconds": 0.1, "failures": [{"name": "...", "message": "..."}]}]}`

use serde::Deserialize;

/// One failed check, as the conformance binary reports it.
#[derive(Debug, Clone, Deserialize)]
pub struct Failure {
    pub name: String,
    pub message: String,
}

/// Counts of one suite in one run.
#[derive(Debug, Clone, Deserialize)]
pub struct SuiteResult {
    pub suite: String,
    pub passed: usize,
    pub failed: usize,
    #[serde(default)]
    pub skipped: usize,
    pub seconds: f64,
    #[serde(default)]
    pub failures: Vec<Failure>,
}

/// What one run (one backend, one world size) wrote.
#[derive(Debug, Clone, Deserialize)]
pub struct RunResult {
    pub backend: String,
    pub world_size: usize,
    pub suites: Vec<SuiteResult>,
}

/// A row of the summary table: one suite of one run, one scenario of an xtask-driven suite
/// (`train`), or a run that failed as a whole.
#[derive(Debug, Clone)]
pub struct Row {
    pub suite: String,
    /// The scenario within the suite (empty for a whole suite of a `conformance run`).
    pub name: String,
    /// What a passing row measured (e.g. the seconds a killed job took to fail), may be empty.
    pub note: String,
    pub backend: String,
    pub world_size: usize,
    pub passed: usize,
    pub failed: usize,
    pub skipped: usize,
    pub seconds: f64,
    pub failures: Vec<Failure>,
}

impl Row {
    /// Rows of a run that wrote its result file.
    pub fn from_run(run: &RunResult) -> Vec<Row> {
        run.suites
            .iter()
            .map(|s| Row {
                suite: s.suite.clone(),
                name: String::new(),
                note: String::new(),
                backend: run.backend.clone(),
                world_size: run.world_size,
                passed: s.passed,
                failed: s.failed,
                skipped: s.skipped,
                seconds: s.seconds,
                failures: s.failures.clone(),
            })
            .collect()
    }

    /// An empty row (no checks yet) of `suite` in one run.
    pub fn new(suite: &str, backend: &str, world_size: usize, seconds: f64) -> Row {
        Row {
            suite: suite.into(),
            name: String::new(),
            note: String::new(),
            backend: backend.into(),
            world_size,
            passed: 0,
            failed: 0,
            skipped: 0,
            seconds,
            failures: Vec::new(),
        }
    }

    /// The suite column: `suite` or `suite: scenario`.
    pub fn label(&self) -> String {
        if self.name.is_empty() {
            self.suite.clone()
        } else {
            format!("{}: {}", self.suite, self.name)
        }
    }

    /// The row of a run that crashed, timed out or wrote no result.
    pub fn run_error(backend: &str, world_size: usize, seconds: f64, message: String) -> Row {
        let mut row = Row::new("(run)", backend, world_size, seconds);
        row.failed = 1;
        row.failures.push(Failure {
            name: format!("{backend} world {world_size}"),
            message,
        });
        row
    }
}
