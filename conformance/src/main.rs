//! `conformance`: the command-line entry to the checks.
//!
//! - `conformance run --backend threads --world 4 --fixture DIR ... [--json FILE]`: every suite,
//!   N ranks as threads; `mpirun -n 4 conformance run --backend mpi ...`: one rank per process.
//! - `conformance roundtrip --checkpoint DIR`, `conformance golden --fixture DIR`,
//!   `conformance sharded --checkpoint DIR --world N`: one suite.
//!
//! Exit status: 0 when every check passed, 1 when a check failed, 2 when the input could not be
//! used (the error is one line on stderr naming the file and key).

use clap::{Parser, Subcommand, ValueEnum};
use collectives::Communicator;
use conformance::golden::{self, Tolerance, F32_TOLERANCE};
use conformance::report::{print_reports, Check, RunJson, SuiteReport};
use conformance::suites::{run_and_merge, RunConfig, Suite};
use conformance::{roundtrip, sharded};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

#[derive(Parser)]
#[command(
    name = "conformance",
    version,
    about = "Conformance checks for distributed MoE training"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum, Debug)]
enum Backend {
    /// N ranks as threads of this process.
    Threads,
    /// One rank per process, under mpirun.
    Mpi,
}

#[derive(clap::Args, Debug, Clone, Copy)]
struct TolArgs {
    /// Absolute tolerance of the golden comparison.
    #[arg(long, default_value_t = F32_TOLERANCE.atol)]
    atol: f32,
    /// Relative tolerance of the golden comparison.
    #[arg(long, default_value_t = F32_TOLERANCE.rtol)]
    rtol: f32,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the selected suites on every fixture, on a world of ranks.
    Run {
        #[arg(long, value_enum, default_value_t = Backend::Threads)]
        backend: Backend,
        /// Number of ranks (threads backend; under MPI the world is mpirun's).
        #[arg(long, default_value_t = 1)]
        world: usize,
        /// Fixture / checkpoint directories.
        #[arg(long = "fixture", required = true)]
        fixtures: Vec<PathBuf>,
        /// Suites to run (default: all).
        #[arg(long, value_enum, value_delimiter = ',')]
        suites: Vec<Suite>,
        /// Write the result file read by `cargo xtask conformance` (rank 0).
        #[arg(long)]
        json: Option<PathBuf>,
        /// Print passing checks too.
        #[arg(long, short)]
        verbose: bool,
        #[command(flatten)]
        tol: TolArgs,
    },
    /// HF -> native -> HF must be bit-identical (every key, dtype, shape), also after writing back.
    Roundtrip {
        #[arg(long)]
        checkpoint: PathBuf,
    },
    /// MoE block forward vs the fixture's golden output.
    Golden {
        #[arg(long)]
        fixture: PathBuf,
        #[command(flatten)]
        tol: TolArgs,
    },
    /// Local shards of the expert tensors per parallel plan, on `world` thread ranks.
    Sharded {
        #[arg(long)]
        checkpoint: PathBuf,
        #[arg(long, default_value_t = 2)]
        world: usize,
    },
}

/// Prints a single-suite result and maps it to the exit status.
fn finish(suite: &str, start: Instant, result: Result<Vec<Check>, String>) -> ExitCode {
    match result {
        Ok(checks) => {
            let report = SuiteReport {
                suite: suite.into(),
                seconds: start.elapsed().as_secs_f64(),
                checks,
            };
            if print_reports(&[report], true) == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}

/// Runs the suites on this rank's communicator; rank 0 prints and writes the result file.
fn run_on(
    comm: &dyn Communicator,
    cfg: &RunConfig,
    json: Option<&PathBuf>,
    verbose: bool,
) -> Result<bool, String> {
    let reports = run_and_merge(comm, cfg)?;
    let failed = reports.iter().map(|r| r.counts().1).sum::<usize>();
    if comm.rank() == 0 {
        println!(
            "conformance: backend {}, world size {}",
            comm.backend(),
            comm.size()
        );
        print_reports(&reports, verbose);
        if let Some(path) = json {
            let text =
                serde_json::to_string_pretty(&RunJson::new(comm.backend(), comm.size(), &reports))
                    .map_err(|e| e.to_string())?;
            std::fs::write(path, text).map_err(|e| format!("{}: {e}", path.display()))?;
        }
    }
    Ok(failed == 0)
}

fn run_threads(
    world: usize,
    cfg: &RunConfig,
    json: Option<&PathBuf>,
    verbose: bool,
) -> Result<bool, String> {
    if world == 0 {
        return Err("--world must be >= 1".into());
    }
    let results =
        collectives::threads::spawn_world(world, |comm| run_on(comm.as_ref(), cfg, json, verbose));
    let mut ok = true;
    for (rank, r) in results.into_iter().enumerate() {
        match r {
            Ok(Ok(pass)) => ok &= pass,
            Ok(Err(e)) => return Err(format!("rank {rank}: {e}")),
            Err(_) => return Err(format!("rank {rank} panicked")),
        }
    }
    Ok(ok)
}

#[cfg(feature = "mpi")]
fn run_mpi(cfg: &RunConfig, json: Option<&PathBuf>, verbose: bool) -> Result<bool, String> {
    let mpi = collectives::mpi::MpiWorld::init().map_err(|e| e.to_string())?;
    let world = mpi.world();
    run_on(world.as_ref(), cfg, json, verbose)
}

#[cfg(not(feature = "mpi"))]
fn run_mpi(_: &RunConfig, _: Option<&PathBuf>, _: bool) -> Result<bool, String> {
    Err(
        "this conformance binary was built without MPI (build with the default `mpi` feature; \
         needs Debian packages openmpi-bin libopenmpi-dev libclang-dev pkg-config)"
            .into(),
    )
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let start = Instant::now();
    match cli.cmd {
        Cmd::Run {
            backend,
            world,
            fixtures,
            suites,
            json,
            verbose,
            tol,
        } => {
            let cfg = RunConfig {
                fixtures,
                suites: if suites.is_empty() {
                    Suite::ALL.to_vec()
                } else {
                    suites
                },
                tolerance: Tolerance {
                    atol: tol.atol,
                    rtol: tol.rtol,
                },
            };
            let result = match backend {
                Backend::Threads => run_threads(world, &cfg, json.as_ref(), verbose),
                Backend::Mpi => run_mpi(&cfg, json.as_ref(), verbose),
            };
            match result {
                Ok(true) => ExitCode::SUCCESS,
                Ok(false) => ExitCode::from(1),
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::from(2)
                }
            }
        }
        Cmd::Roundtrip { checkpoint } => finish(
            "roundtrip",
            start,
            roundtrip::run(&checkpoint).map_err(|e| e.to_string()),
        ),
        Cmd::Golden { fixture, tol } => finish(
            "golden",
            start,
            golden::run(
                &fixture,
                Tolerance {
                    atol: tol.atol,
                    rtol: tol.rtol,
                },
            )
            .map_err(|e| e.to_string()),
        ),
        Cmd::Sharded { checkpoint, world } => {
            if world == 0 {
                return finish("sharded", start, Err("--world must be >= 1".into()));
            }
            let per_rank = collectives::threads::spawn_world(world, |comm| {
                sharded::run(comm.as_ref(), &checkpoint)
            });
            let mut reports = Vec::new();
            for (rank, r) in per_rank.into_iter().enumerate() {
                match r {
                    Ok(checks) => reports.push(vec![SuiteReport {
                        suite: "sharded".into(),
                        seconds: 0.0,
                        checks,
                    }]),
                    Err(_) => {
                        return finish("sharded", start, Err(format!("rank {rank} panicked")))
                    }
                }
            }
            let merged = conformance::report::merge_ranks(&reports);
            finish(
                "sharded",
                start,
                Ok(merged.into_iter().flat_map(|r| r.checks).collect()),
            )
        }
    }
}
