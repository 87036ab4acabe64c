//! Check outcomes, suite reports, the per-run JSON file that `cargo xtask conformance` reads, and the
//! merge of every rank's outcomes into one verdict (a check passes only when it passes on all ranks).

use serde::{Deserialize, Serialize};
use std::fmt;

/// The outcome of one named check.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Outcome {
    /// Passed; the text says what was measured (e.g. a max abs diff), may be empty.
    Pass(String),
    /// Failed; the text says what differed.
    Fail(String),
    /// Not run; the text says why.
    Skip(String),
}

/// One named check and its outcome.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Check {
    pub name: String,
    pub outcome: Outcome,
}

impl Check {
    pub fn pass(name: impl Into<String>, note: impl Into<String>) -> Self {
        Check {
            name: name.into(),
            outcome: Outcome::Pass(note.into()),
        }
    }
    pub fn fail(name: impl Into<String>, why: impl Into<String>) -> Self {
        Check {
            name: name.into(),
            outcome: Outcome::Fail(why.into()),
        }
    }
    pub fn skip(name: impl Into<String>, why: impl Into<String>) -> Self {
        Check {
            name: name.into(),
            outcome: Outcome::Skip(why.into()),
        }
    }
    /// Pass when `ok`, else fail with `why`.
    pub fn expect(
        name: impl Into<String>,
        ok: bool,
        note: impl Into<String>,
        why: impl FnOnce() -> String,
    ) -> Self {
        if ok {
            Check::pass(name, note)
        } else {
            Check::fail(name, why())
        }
    }
    /// A check whose computation itself failed with an error.
    pub fn error(name: impl Into<String>, err: impl fmt::Display) -> Self {
        Check::fail(name, format!("error: {err}"))
    }
    pub fn failed(&self) -> bool {
        matches!(self.outcome, Outcome::Fail(_))
    }
}

impl fmt::Display for Check {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.outcome {
            Outcome::Pass(n) if n.is_empty() => write!(f, "PASS {}", self.name),
            Outcome::Pass(n) => write!(f, "PASS {} ({n})", self.name),
            Outcome::Fail(w) => write!(f, "FAIL {}: {w}", self.name),
            Outcome::Skip(w) => write!(f, "SKIP {}: {w}", self.name),
        }
    }
}

/// The checks of one suite on one rank, with the wall time they took.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SuiteReport {
    pub suite: String,
    pub seconds: f64,
    pub checks: Vec<Check>,
}

impl SuiteReport {
    pub fn counts(&self) -> (usize, usize, usize) {
        self.checks
            .iter()
            .fold((0, 0, 0), |(p, f, s), c| match c.outcome {
                Outcome::Pass(_) => (p + 1, f, s),
                Outcome::Fail(_) => (p, f + 1, s),
                Outcome::Skip(_) => (p, f, s + 1),
            })
    }
}

/// Merges the reports of all ranks (`per_rank[r]` is rank r's list). Every rank runs the same
/// suites and checks in the same order, so checks are matched by position: a check fails if it
/// failed on any rank (identical messages from several ranks are reported once, naming the ranks),
/// or if some rank reported a different check list there; it is skipped if every rank skipped it,
/// and passes otherwise. Time is the slowest rank's.
pub fn merge_ranks(per_rank: &[Vec<SuiteReport>]) -> Vec<SuiteReport> {
    let Some(first) = per_rank.first() else {
        return Vec::new();
    };
    if per_rank.len() == 1 {
        return first.clone();
    }
    first
        .iter()
        .enumerate()
        .map(|(si, suite)| {
            let seconds = per_rank
                .iter()
                .filter_map(|r| r.get(si).map(|s| s.seconds))
                .fold(0.0f64, f64::max);
            let checks = suite
                .checks
                .iter()
                .enumerate()
                .map(|(ci, check)| merge_check(per_rank, si, ci, check))
                .collect();
            SuiteReport {
                suite: suite.suite.clone(),
                seconds,
                checks,
            }
        })
        .collect()
}

/// Check `ci` of suite `si` over all ranks (`check` is rank 0's).
fn merge_check(per_rank: &[Vec<SuiteReport>], si: usize, ci: usize, check: &Check) -> Check {
    let mut fails: Vec<(Vec<usize>, String)> = Vec::new();
    let mut add_fail =
        |rank: usize, message: String| match fails.iter_mut().find(|(_, m)| *m == message) {
            Some((ranks, _)) => ranks.push(rank),
            None => fails.push((vec![rank], message)),
        };
    let mut all_skipped = true;
    let mut pass_note = None;
    for (rank, reports) in per_rank.iter().enumerate() {
        let theirs = reports
            .get(si)
            .filter(|s| s.suite == per_rank[0][si].suite)
            .and_then(|s| s.checks.get(ci));
        match theirs {
            Some(c) if c.name == check.name => match &c.outcome {
                Outcome::Fail(w) => {
                    all_skipped = false;
                    add_fail(rank, w.clone());
                }
                Outcome::Pass(n) => {
                    all_skipped = false;
                    pass_note.get_or_insert_with(|| n.clone());
                }
                Outcome::Skip(_) => {}
            },
            Some(c) => add_fail(
                rank,
                format!(
                    "reported '{}' in this place (check lists differ between ranks)",
                    c.name
                ),
            ),
            None => add_fail(rank, "did not report this check".into()),
        }
    }
    let outcome = if !fails.is_empty() {
        let parts: Vec<String> = fails
            .into_iter()
            .map(|(ranks, w)| {
                let list: Vec<String> = ranks.iter().map(usize::to_string).collect();
                format!(
                    "rank{} {}: {w}",
                    if ranks.len() > 1 { "s" } else { "" },
                    list.join(", ")
                )
            })
            .collect();
        Outcome::Fail(parts.join("; "))
    } else if all_skipped {
        check.outcome.clone()
    } else {
        let note = pass_note.unwrap_or_default();
        Outcome::Pass(format!(
            "{} ranks{}{note}",
            per_rank.len(),
            if note.is_empty() { "" } else { "; " }
        ))
    };
    Check {
        name: check.name.clone(),
        outcome,
    }
}

/// One failed check in the result file.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FailureJson {
    pub name: String,
    pub message: String,
}

/// A suite's counts in the result file (the format `xtask/src/results.rs` reads).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SuiteJson {
    pub suite: String,
    pub passed: usize,
    pub failed: usize,
    pub skipped: usize,
    pub seconds: f64,
    pub failures: Vec<FailureJson>,
}

/// The result file of one run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunJson {
    pub backend: String,
    pub world_size: usize,
    pub suites: Vec<SuiteJson>,
}

impl RunJson {
    pub fn new(backend: &str, world_size: usize, reports: &[SuiteReport]) -> Self {
        let suites = reports
            .iter()
            .map(|r| {
                let (passed, failed, skipped) = r.counts();
                SuiteJson {
                    suite: r.suite.clone(),
                    passed,
                    failed,
                    skipped,
                    seconds: r.seconds,
                    failures: r
                        .checks
                        .iter()
                        .filter_map(|c| match &c.outcome {
                            Outcome::Fail(w) => Some(FailureJson {
                                name: c.name.clone(),
                                message: w.clone(),
                            }),
                            _ => None,
                        })
                        .collect(),
                }
            })
            .collect();
        RunJson {
            backend: backend.into(),
            world_size,
            suites,
        }
    }
}

/// Prints every failed and skipped check, the per-suite counts, and the closing
/// `N passed, M failed, K skipped` line; with `verbose`, passing checks too. Returns the failure count.
pub fn print_reports(reports: &[SuiteReport], verbose: bool) -> usize {
    let (mut tp, mut tf, mut ts) = (0, 0, 0);
    for r in reports {
        for c in &r.checks {
            if verbose || !matches!(c.outcome, Outcome::Pass(_)) {
                println!("  [{}] {c}", r.suite);
            }
        }
        let (p, f, s) = r.counts();
        println!(
            "{}: {p} passed, {f} failed, {s} skipped ({:.2} s)",
            r.suite, r.seconds
        );
        tp += p;
        tf += f;
        ts += s;
    }
    println!("{tp} passed, {tf} failed, {ts} skipped");
    tf
}

#[cfg(test)]
mod tests {
    use super::*;

    fn suite(checks: Vec<Check>) -> Vec<SuiteReport> {
        vec![SuiteReport {
            suite: "s".into(),
            seconds: 1.0,
            checks,
        }]
    }

    #[test]
    fn a_failure_on_one_rank_fails_the_merged_check() {
        let merged = merge_ranks(&[
            suite(vec![Check::pass("a", ""), Check::pass("b", "")]),
            suite(vec![Check::pass("a", ""), Check::fail("b", "differs")]),
        ]);
        assert_eq!(merged[0].counts(), (1, 1, 0));
        assert_eq!(
            merged[0].checks[1].outcome,
            Outcome::Fail("rank 1: differs".into())
        );
    }

    #[test]
    fn identical_failures_are_reported_once_with_their_ranks() {
        let merged = merge_ranks(&[
            suite(vec![Check::fail("a", "bad file")]),
            suite(vec![Check::fail("a", "other")]),
            suite(vec![Check::fail("a", "bad file")]),
        ]);
        assert_eq!(
            merged[0].checks[0].outcome,
            Outcome::Fail("ranks 0, 2: bad file; rank 1: other".into())
        );
    }

    #[test]
    fn a_check_missing_or_different_on_a_rank_fails() {
        let merged = merge_ranks(&[
            suite(vec![Check::pass("a", ""), Check::pass("b", "")]),
            suite(vec![Check::pass("a", "")]),
        ]);
        assert_eq!(
            merged[0].checks[1].outcome,
            Outcome::Fail("rank 1: did not report this check".into())
        );
        let merged = merge_ranks(&[
            suite(vec![Check::pass("a", "")]),
            suite(vec![Check::pass("c", "")]),
        ]);
        assert!(merged[0].checks[0].failed());
    }

    #[test]
    fn same_named_checks_stay_separate() {
        let merged = merge_ranks(&[
            suite(vec![Check::pass("a", ""), Check::fail("a", "x")]),
            suite(vec![Check::pass("a", ""), Check::fail("a", "x")]),
        ]);
        assert_eq!(merged[0].counts(), (1, 1, 0));
    }

    #[test]
    fn skipped_everywhere_stays_skipped() {
        let merged = merge_ranks(&[
            suite(vec![Check::skip("a", "n/a")]),
            suite(vec![Check::skip("a", "n/a")]),
        ]);
        assert_eq!(merged[0].counts(), (0, 0, 1));
    }

    #[test]
    fn run_json_counts_match_reports() {
        let r = suite(vec![
            Check::pass("a", ""),
            Check::fail("b", "x"),
            Check::skip("c", "y"),
        ]);
        let j = RunJson::new("threads", 2, &r);
        assert_eq!(
            (j.suites[0].passed, j.suites[0].failed, j.suites[0].skipped),
            (1, 1, 1)
        );
        assert_eq!(j.suites[0].failures[0].name, "b");
    }
}
