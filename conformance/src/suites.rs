//! Running the selected suites on one rank of a world, and merging every rank's outcomes.

use crate::gather::all_gather_blobs;
use crate::golden::{self, Tolerance};
use crate::report::{merge_ranks, Check, SuiteReport};
use crate::{roundtrip, sharded};
use collectives::Communicator;
use std::path::PathBuf;
use std::time::Instant;

/// The suites `conformance run` knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Suite {
    /// HF -> native -> HF bit-identity of every fixture checkpoint (on every rank).
    Roundtrip,
    /// MoE block forward vs transformers' golden output (on every rank).
    Golden,
    /// Local shards per parallel plan: shapes vs `placement`, gathered bit-exact (collective).
    Sharded,
    /// The communicator's own collectives against naive references (collective).
    Collectives,
}

impl Suite {
    pub const ALL: [Suite; 4] = [
        Suite::Collectives,
        Suite::Roundtrip,
        Suite::Golden,
        Suite::Sharded,
    ];
    pub fn name(self) -> &'static str {
        match self {
            Suite::Roundtrip => "roundtrip",
            Suite::Golden => "golden",
            Suite::Sharded => "sharded",
            Suite::Collectives => "collectives",
        }
    }
}

/// What a run checks.
#[derive(Debug, Clone)]
pub struct RunConfig {
    pub fixtures: Vec<PathBuf>,
    pub suites: Vec<Suite>,
    pub tolerance: Tolerance,
}

fn label(dir: &std::path::Path) -> String {
    dir.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| dir.display().to_string())
}

/// Runs one suite on this rank.
pub fn run_suite(comm: &dyn Communicator, suite: Suite, cfg: &RunConfig) -> SuiteReport {
    let start = Instant::now();
    let mut checks = Vec::new();
    match suite {
        Suite::Collectives => {
            for (name, outcome) in collectives::selftest::run_all(comm) {
                checks.push(match outcome {
                    Ok(()) => Check::pass(name, ""),
                    Err(e) => Check::fail(name, e.to_string()),
                });
            }
        }
        Suite::Roundtrip => {
            for dir in &cfg.fixtures {
                match roundtrip::run(dir) {
                    Ok(c) => checks.extend(c),
                    Err(e) => checks.push(Check::error(format!("{}: roundtrip", label(dir)), e)),
                }
            }
        }
        Suite::Golden => {
            for dir in &cfg.fixtures {
                match golden::run(dir, cfg.tolerance) {
                    Ok(c) => checks.extend(c),
                    Err(e) => checks.push(Check::error(format!("{}: golden", label(dir)), e)),
                }
            }
        }
        Suite::Sharded => {
            for dir in &cfg.fixtures {
                checks.extend(sharded::run(comm, dir));
            }
        }
    }
    SuiteReport {
        suite: suite.name().into(),
        seconds: start.elapsed().as_secs_f64(),
        checks,
    }
}

/// Runs every selected suite on this rank, then all-gathers all ranks' reports and merges them, so
/// every rank returns the same verdict. Collective: every rank must call it with the same config.
pub fn run_and_merge(comm: &dyn Communicator, cfg: &RunConfig) -> Result<Vec<SuiteReport>, String> {
    let mine: Vec<SuiteReport> = cfg
        .suites
        .iter()
        .map(|s| run_suite(comm, *s, cfg))
        .collect();
    let blob = serde_json::to_vec(&mine).map_err(|e| e.to_string())?;
    let mut per_rank = Vec::new();
    for (rank, blob) in all_gather_blobs(comm, &blob)?.iter().enumerate() {
        let reports: Vec<SuiteReport> =
            serde_json::from_slice(blob).map_err(|e| format!("rank {rank}'s report: {e}"))?;
        per_rank.push(reports);
    }
    Ok(merge_ranks(&per_rank))
}
