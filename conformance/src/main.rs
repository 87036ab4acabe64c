//! `conformance`: the command-line entry to the checks.
//!
//! - `conformance run --backend threads --world 4 --fixture DIR ... [--json FILE]`: every suite,
//!   N ranks as threads; `mpirun -n 4 conformance run --backend mpi ...`: one rank per process.
//! - `conformance placement --cases FILE`: PyTorch-generated placement cases.
//! - `conformance roundtrip --checkpoint DIR`, `conformance golden --fixture DIR`,
//!   `conformance sharded --checkpoint DIR --world N`: one suite.
//! - `conformance dcp --checkpoint DIR [--model HF_DIR]`: a torch distributed checkpoint on disk.
//! - `conformance plan --model HF_DIR --tp N [--ep N] [--json] [--check-dcp DIR]`: transformers'
//!   TP / EP plan of a checkpoint per parameter and rank, and a DCP held against it.
//!
//! Exit status: 0 when every check passed, 1 when a check failed, 2 when the input could not be
//! used (the error is one line on stderr naming the file and key).

use clap::{Parser, Subcommand, ValueEnum};
use collectives::Communicator;
use conformance::golden;
use conformance::parallel::{Mutation, PlanKind};
use conformance::report::{print_reports, Check, RunJson, SuiteReport};
use conformance::suites::{run_and_merge, RunConfig, Suite};
use conformance::train::{self, compare_runs, Compare, Kill, TrainArgs};
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

#[derive(Subcommand)]
enum Cmd {
    /// Run the selected suites on every fixture, on a world of ranks.
    Run {
        #[arg(long, value_enum, default_value_t = Backend::Threads)]
        backend: Backend,
        /// Number of ranks (threads backend, default 1; under MPI the world is mpirun's and a
        /// different --world is an error).
        #[arg(long)]
        world: Option<usize>,
        /// Fixture / checkpoint directories.
        #[arg(long = "fixture")]
        fixtures: Vec<PathBuf>,
        /// Placement-cases files (PyTorch oracle output) for the placement suite.
        #[arg(long)]
        cases: Vec<PathBuf>,
        /// Suites to run (default: all).
        #[arg(long, value_enum, value_delimiter = ',')]
        suites: Vec<Suite>,
        /// Plans of the `parallel` suite (default: all).
        #[arg(long, value_enum, value_delimiter = ',')]
        plans: Vec<PlanKind>,
        /// Run a deliberately wrong plan variant (to show the suite catches it).
        #[arg(long, value_enum)]
        mutate: Option<Mutation>,
        /// Write the result file read by `cargo xtask conformance` (rank 0).
        #[arg(long)]
        json: Option<PathBuf>,
        /// Print passing checks too.
        #[arg(long, short)]
        verbose: bool,
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
        /// Run the fast path with a deliberate fault (to show the float32 bar catches it).
        #[arg(long, value_enum)]
        mutate: Option<golden::Fault>,
        /// Write the result file read by `cargo xtask conformance`.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Check every case of a placement-cases file (PyTorch DTensor as the oracle).
    Placement {
        #[arg(long)]
        cases: PathBuf,
        /// Print passing cases too.
        #[arg(long, short)]
        verbose: bool,
    },
    /// Train a small MoE model with AdamW on a parallel plan; save / resume distributed checkpoints.
    Train {
        #[arg(long, value_enum, default_value_t = Backend::Threads)]
        backend: Backend,
        /// Number of ranks (threads backend, default 1; under MPI the world is mpirun's).
        #[arg(long)]
        world: Option<usize>,
        #[arg(long, value_enum)]
        plan: PlanKind,
        /// Train up to this step (inclusive).
        #[arg(long)]
        steps: u64,
        /// Where rank 0 writes train.json and weights.safetensors.
        #[arg(long)]
        out_dir: PathBuf,
        /// Root of the step_NNNNNNNN checkpoint directories.
        #[arg(long)]
        ckpt_root: Option<PathBuf>,
        /// Save a checkpoint every S steps (needs --ckpt-root).
        #[arg(long)]
        save_every: Option<u64>,
        /// Resume from the latest complete checkpoint under --ckpt-root.
        #[arg(long)]
        resume: bool,
        /// Fault injection: the rank that dies.
        #[arg(long)]
        kill_rank: Option<usize>,
        /// Fault injection: the step at whose start --kill-rank dies.
        #[arg(long)]
        kill_at_step: Option<u64>,
        /// Fault injection: the save (step) during which --kill-rank dies, before the commit.
        #[arg(long)]
        kill_in_save_at_step: Option<u64>,
        /// Fault injection: the save (step) in the middle of whose shard file --kill-rank crashes
        /// (a file-size limit; the kernel's SIGXFSZ kills the process).
        #[arg(long)]
        crash_mid_write_at_step: Option<u64>,
        /// Fault injection: the save (step) during which --kill-rank's disk fills (writes past a
        /// file-size limit fail with EFBIG).
        #[arg(long)]
        disk_full_at_step: Option<u64>,
    },
    /// Compare a resumed training run with a reference run (losses and final weights).
    CompareTrain {
        #[arg(long)]
        reference: PathBuf,
        #[arg(long)]
        candidate: PathBuf,
        /// Bit-identical losses and weights.
        #[arg(long, conflicts_with_all = ["atol", "rtol"])]
        exact: bool,
        #[arg(long)]
        atol: Option<f64>,
        #[arg(long)]
        rtol: Option<f64>,
    },
    /// Check a torch distributed checkpoint (DCP) on disk: chunk layout, items, model shapes.
    Dcp {
        /// The checkpoint directory (`.metadata` + `.distcp`, or DCP safetensors).
        #[arg(long)]
        checkpoint: PathBuf,
        /// An HF model directory whose config.json gives the expected MoE shapes.
        #[arg(long)]
        model: Option<PathBuf>,
        /// The save mesh shape (e.g. `2,2`); default: every mesh of the world size is tried.
        #[arg(long, value_delimiter = ',')]
        mesh: Option<Vec<usize>>,
        /// Do not verify the CRC-32 of every item's storage.
        #[arg(long)]
        no_crc: bool,
        /// Write the result file read by `cargo xtask conformance`.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// transformers' TP (and EP) plan of an HF checkpoint: every parameter as transformers names
    /// it in memory, its global shape, placements and local shape per rank.
    Plan {
        /// The HF model directory (config.json + safetensors).
        #[arg(long)]
        model: PathBuf,
        /// Tensor-parallel size (the world size).
        #[arg(long)]
        tp: usize,
        /// Expert-parallel size: 1 (default) or the TP size (transformers runs EP on the TP ranks
        /// without FSDP).
        #[arg(long, default_value_t = 1)]
        ep: usize,
        /// Print the table as JSON (`{"world": N, "params": {...}}`).
        #[arg(long)]
        json: bool,
        /// Check a torch distributed checkpoint of the model against the plan.
        #[arg(long)]
        check_dcp: Option<PathBuf>,
        /// Write the `--check-dcp` result file read by `cargo xtask conformance`.
        #[arg(long, requires = "check_dcp")]
        report: Option<PathBuf>,
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
    finish_json(suite, start, result, None)
}

/// [`finish`], also writing the result file (`--json`) when given.
fn finish_json(
    suite: &str,
    start: Instant,
    result: Result<Vec<Check>, String>,
    json: Option<&PathBuf>,
) -> ExitCode {
    let checks = match result {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let report = SuiteReport {
        suite: suite.into(),
        seconds: start.elapsed().as_secs_f64(),
        checks,
    };
    if let Some(path) = json {
        let run = RunJson::new("threads", 1, std::slice::from_ref(&report));
        let written = serde_json::to_string_pretty(&run)
            .map_err(|e| e.to_string())
            .and_then(|t| std::fs::write(path, t).map_err(|e| format!("{}: {e}", path.display())));
        if let Err(e) = written {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    }
    if print_reports(&[report], true) == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
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
    // A panicked rank is the cause; the others then only report that a peer is gone.
    if let Some(rank) = results.iter().position(|r| r.is_err()) {
        return Err(format!("rank {rank} panicked"));
    }
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

/// Checks that fixture-based suites have fixtures and that fixture folder names (the check labels)
/// are distinct.
fn validate_run(cfg: &RunConfig) -> Result<(), String> {
    let needs: Vec<&str> = cfg
        .suites
        .iter()
        .filter(|s| {
            matches!(
                s,
                Suite::Roundtrip
                    | Suite::Golden
                    | Suite::Sharded
                    | Suite::Parallel
                    | Suite::Checkpoint
            )
        })
        .map(|s| s.name())
        .collect();
    if !needs.is_empty() && cfg.fixtures.is_empty() {
        return Err(format!(
            "--fixture DIR is required for the suites {}",
            needs.join(", ")
        ));
    }
    let mut names = std::collections::BTreeSet::new();
    for f in &cfg.fixtures {
        let name = f
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if !names.insert(name.clone()) {
            return Err(format!(
                "two fixtures are named '{name}': fixture folders must have distinct names"
            ));
        }
    }
    Ok(())
}

fn train_threads(world: usize, args: &TrainArgs) -> Result<(), String> {
    if world == 0 {
        return Err("--world must be >= 1".into());
    }
    let results =
        collectives::threads::spawn_world(world, |comm| train::run_rank(comm.as_ref(), args));
    let mut errors = Vec::new();
    for (rank, r) in results.into_iter().enumerate() {
        match r {
            Ok(Ok(())) => {}
            Ok(Err(e)) => errors.push(format!("rank {rank}: {e}")),
            Err(_) => errors.push(format!("rank {rank} panicked")),
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors.join("\n"))
    }
}

#[cfg(feature = "mpi")]
fn train_mpi(expected_world: Option<usize>, args: &TrainArgs) -> Result<(), String> {
    let mpi = collectives::mpi::MpiWorld::init().map_err(|e| e.to_string())?;
    let world = mpi.world();
    if let Some(n) = expected_world.filter(|n| *n != world.size()) {
        return Err(format!(
            "--world {n} given but mpirun started {} ranks",
            world.size()
        ));
    }
    train::run_rank(world.as_ref(), args).map_err(|e| format!("rank {}: {e}", world.rank()))
}

#[cfg(not(feature = "mpi"))]
fn train_mpi(_: Option<usize>, _: &TrainArgs) -> Result<(), String> {
    Err("this conformance binary was built without MPI".into())
}

#[cfg(feature = "mpi")]
fn run_mpi(
    expected_world: Option<usize>,
    cfg: &RunConfig,
    json: Option<&PathBuf>,
    verbose: bool,
) -> Result<bool, String> {
    let mpi = collectives::mpi::MpiWorld::init().map_err(|e| e.to_string())?;
    let world = mpi.world();
    if let Some(n) = expected_world.filter(|n| *n != world.size()) {
        return Err(format!(
            "--world {n} given but mpirun started {} ranks",
            world.size()
        ));
    }
    run_on(world.as_ref(), cfg, json, verbose)
}

#[cfg(not(feature = "mpi"))]
fn run_mpi(_: Option<usize>, _: &RunConfig, _: Option<&PathBuf>, _: bool) -> Result<bool, String> {
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
            cases,
            suites,
            plans,
            mutate,
            json,
            verbose,
        } => {
            let cfg = RunConfig {
                fixtures,
                cases,
                suites: if suites.is_empty() {
                    Suite::ALL.to_vec()
                } else {
                    suites
                },
                plans,
                mutation: mutate,
            };
            let result = validate_run(&cfg).and_then(|()| match backend {
                Backend::Threads => run_threads(world.unwrap_or(1), &cfg, json.as_ref(), verbose),
                Backend::Mpi => run_mpi(world, &cfg, json.as_ref(), verbose),
            });
            match result {
                Ok(true) => ExitCode::SUCCESS,
                Ok(false) => ExitCode::from(1),
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::from(2)
                }
            }
        }
        Cmd::Train {
            backend,
            world,
            plan,
            steps,
            out_dir,
            ckpt_root,
            save_every,
            resume,
            kill_rank,
            kill_at_step,
            kill_in_save_at_step,
            crash_mid_write_at_step,
            disk_full_at_step,
        } => {
            let faults = [
                kill_at_step.map(|step| (step, 0)),
                kill_in_save_at_step.map(|step| (step, 1)),
                crash_mid_write_at_step.map(|step| (step, 2)),
                disk_full_at_step.map(|step| (step, 3)),
            ];
            let set: Vec<(u64, u8)> = faults.into_iter().flatten().collect();
            let kill = match (kill_rank, set.as_slice()) {
                (None, []) => None,
                (Some(rank), [(step, which)]) => Some(match which {
                    0 => Kill::AtStep { rank, step: *step },
                    1 => Kill::InSave { rank, step: *step },
                    2 => Kill::MidWrite { rank, step: *step },
                    _ => Kill::DiskFull { rank, step: *step },
                }),
                _ => {
                    eprintln!("error: --kill-rank needs exactly one of --kill-at-step, --kill-in-save-at-step, --crash-mid-write-at-step, --disk-full-at-step");
                    return ExitCode::from(2);
                }
            };
            let args = TrainArgs {
                plan,
                steps,
                out_dir,
                ckpt_root,
                save_every,
                resume,
                kill,
                hard_kill: backend == Backend::Mpi,
            };
            let result = match backend {
                Backend::Threads => train_threads(world.unwrap_or(1), &args),
                Backend::Mpi => train_mpi(world, &args),
            };
            match result {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::from(1)
                }
            }
        }
        Cmd::CompareTrain {
            reference,
            candidate,
            exact,
            atol,
            rtol,
        } => {
            let how = if exact {
                Compare::Exact
            } else {
                Compare::Tolerance {
                    atol: atol.unwrap_or(1e-5),
                    rtol: rtol.unwrap_or(1e-4),
                }
            };
            match compare_runs(&reference, &candidate, how) {
                Ok(lines) => {
                    println!("compare-train: equal: {}", lines.join("; "));
                    ExitCode::SUCCESS
                }
                Err(Ok(problems)) => {
                    println!("compare-train: DIFFERENT: {}", problems.join("; "));
                    ExitCode::from(1)
                }
                Err(Err(e)) => {
                    eprintln!("error: {e}");
                    ExitCode::from(2)
                }
            }
        }
        Cmd::Dcp {
            checkpoint,
            model,
            mesh,
            no_crc,
            json,
        } => {
            let args = conformance::dcp::DcpArgs {
                model,
                mesh,
                no_crc,
            };
            let result = conformance::dcp::run(&checkpoint, &args).map(|(header, checks)| {
                println!("{header}");
                checks
            });
            finish_json("dcp", start, result, json.as_ref())
        }
        Cmd::Plan {
            model,
            tp,
            ep,
            json,
            check_dcp,
            report,
        } => {
            let table = adapters::checkpoint::HfCheckpoint::open(&model)
                .and_then(|ck| adapters::hf_plan::plan_checkpoint(&ck, tp, ep));
            let table = match table {
                Ok(t) => t,
                Err(e) => return finish("plan", start, Err(e.to_string())),
            };
            if json {
                println!("{:#}", table.to_json());
            } else {
                print!("{}", table.to_text());
            }
            match check_dcp {
                None => ExitCode::SUCCESS,
                Some(dir) => {
                    let result = conformance::dcp_plan::check(&dir, &table).map(|(h, c)| {
                        eprintln!("{h}");
                        c
                    });
                    finish_json("plan-dcp", start, result, report.as_ref())
                }
            }
        }
        Cmd::Roundtrip { checkpoint } => finish(
            "roundtrip",
            start,
            roundtrip::run(&checkpoint).map_err(|e| e.to_string()),
        ),
        Cmd::Placement { cases, verbose } => match conformance::placement_cases::run(&cases) {
            Ok(checks) => {
                let report = SuiteReport {
                    suite: "placement".into(),
                    seconds: start.elapsed().as_secs_f64(),
                    checks,
                };
                if print_reports(&[report], verbose) == 0 {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::from(1)
                }
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::from(2)
            }
        },
        Cmd::Golden {
            fixture,
            mutate,
            json,
        } => finish_json(
            "golden",
            start,
            golden::run_with(&fixture, mutate).map_err(|e| e.to_string()),
            json.as_ref(),
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
                    Ok(Ok(checks)) => reports.push(vec![SuiteReport {
                        suite: "sharded".into(),
                        seconds: 0.0,
                        checks,
                    }]),
                    // The ranks agree on setup errors, so rank 0's is everyone's.
                    Ok(Err(e)) => return finish("sharded", start, Err(e)),
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
