//! `cargo xtask conformance`: builds the conformance binary, runs its suites under the threads backend
//! and (when Open MPI is installed) under `mpirun` at every world size, runs the save/resume training
//! scenarios (`train`) and the MPI fault scenarios, prints a summary table and writes
//! `target/conformance/report.md`, `junit.xml` and `report.html`. Exits non-zero on any failure.
//! `cargo xtask mutants`: mutation testing of the spec code with cargo-mutants (`mutants.rs`).
//!
//! xtask only orchestrates: every check lives in the `conformance` crate.

mod dcp;
mod golden_faults;
mod html;
mod mutants;
mod process;
mod report;
mod results;
mod runner;
mod setup;
#[cfg(test)]
mod tests;
mod train;

use clap::{Parser, Subcommand, ValueEnum};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(name = "xtask", about = "Project tasks")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum, Debug)]
pub enum Backend {
    Threads,
    Mpi,
}

impl Backend {
    pub fn name(self) -> &'static str {
        match self {
            Backend::Threads => "threads",
            Backend::Mpi => "mpi",
        }
    }
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the conformance suites (threads backend, and mpirun when MPI is installed), the
    /// save/resume training scenarios and the fault scenarios; write the reports.
    Conformance(ConformanceArgs),
    /// Mutation testing of the spec code (cargo-mutants, config `.cargo/mutants.toml`): counts per
    /// file in target/mutants/summary.md; fails when a mutant is missed.
    Mutants(mutants::MutantsArgs),
}

#[derive(clap::Args, Debug)]
pub struct ConformanceArgs {
    /// Backends to run (default: threads, and mpi when mpirun and the MPI library are present).
    #[arg(long, value_enum, value_delimiter = ',')]
    pub backend: Vec<Backend>,
    /// World sizes (number of ranks) to run each backend at [default: 1,2,4,8; with --quick: 1,2].
    /// The `train` scenarios run at the world sizes 2 and 4 (quick: 2) that are in this list.
    #[arg(long, value_delimiter = ',')]
    pub world_sizes: Vec<usize>,
    /// Suites to run; default all. `conformance run` suites (collectives, placement, roundtrip,
    /// golden, sharded, parallel, checkpoint; any other name is passed on to it too) and the
    /// suites xtask drives itself: train (save/resume scenarios), faults (MPI fault scenarios),
    /// nccl (NCCL selftest), dcp (`conformance dcp` on the torch-written checkpoints of
    /// conformance/fixtures/dcp), golden-faults (`conformance golden --mutate`: each deliberate
    /// fault of the fast path must fail the float32 bar).
    #[arg(long, value_delimiter = ',')]
    pub suites: Vec<String>,
    /// Parallel plans for `conformance run --plans` (single, ep, tp, tp-sp, fsdp, ep-tp, ep-fsdp);
    /// default: conformance's default (all plans).
    #[arg(long, value_delimiter = ',')]
    pub plans: Vec<String>,
    /// Fixture directories (default: every directory under conformance/fixtures/ with a config.json).
    #[arg(long = "fixture")]
    pub fixtures: Vec<PathBuf>,
    /// Placement-cases files (default: placement/oracle/cases.json when present).
    #[arg(long)]
    pub cases: Vec<PathBuf>,
    /// CI-sized run: world sizes 1 and 2 only (unless --world-sizes is given) and the short
    /// training scenarios (world 2; the other-mesh resume on plan single, world 1).
    #[arg(long)]
    pub quick: bool,
    /// Build and run the release profile.
    #[arg(long)]
    pub release: bool,
    /// Seconds a single run may take before it is killed and reported as failed.
    #[arg(long, default_value_t = 600)]
    pub timeout_secs: u64,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Conformance(args) => match runner::conformance(args) {
            Ok(true) => ExitCode::SUCCESS,
            Ok(false) => ExitCode::FAILURE,
            Err(e) => {
                eprintln!("xtask conformance: error: {e}");
                ExitCode::FAILURE
            }
        },
        Cmd::Mutants(args) => match mutants::run(args) {
            Ok(true) => ExitCode::SUCCESS,
            Ok(false) => ExitCode::FAILURE,
            Err(e) => {
                eprintln!("xtask mutants: error: {e}");
                ExitCode::FAILURE
            }
        },
    }
}
