//! Builds the conformance binary and runs it once per (backend, world size).

use crate::process::{launcher, log_tail, rank_args, run_logged, run_with_timeout, RunOutcome};
use crate::report;
use crate::results::{Row, RunResult};
use crate::setup::{
    build_conformance, build_examples, default_fixtures, is_root, mpi_missing, target_dir,
    workspace_root, MPI_PACKAGES,
};
use crate::{Backend, ConformanceArgs};
use indicatif::{ProgressBar, ProgressStyle};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// Runs an example that prints one `PASS ...` / `FAIL ...` line per check, or a line containing
/// `skipped:` when it cannot run here (e.g. no CUDA device), and turns its output into a row.
pub(crate) fn example_row(
    suite: &str,
    backend: &str,
    world: usize,
    cmd: Command,
    log: &Path,
    timeout: Duration,
) -> Result<Row, String> {
    let (ok, secs, note) = run_with_timeout(cmd, log, timeout)?;
    let text = fs::read_to_string(log).unwrap_or_default();
    let mut row = Row::new(suite, backend, world, secs);
    for line in text.lines() {
        if line.starts_with("PASS ") {
            row.passed += 1;
        } else if let Some(rest) = line.strip_prefix("FAIL ") {
            row.failed += 1;
            row.failures.push(crate::results::Failure {
                name: suite.into(),
                message: rest.into(),
            });
        }
    }
    if row.passed + row.failed == 0 && ok && text.contains("skipped:") {
        row.skipped = 1;
    } else if (!ok && row.failed == 0) || row.passed + row.failed == 0 {
        row.failed += 1;
        row.failures.push(crate::results::Failure {
            name: suite.into(),
            message: format!("{note}; log {}: {}", log.display(), log_tail(log, 5)),
        });
    }
    Ok(row)
}

/// Suites xtask drives itself (not `conformance run` suites).
pub(crate) const XTASK_SUITES: [&str; 5] = ["train", "faults", "nccl", "dcp", "golden-faults"];

/// What a `cargo xtask conformance` invocation runs, from its arguments.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Selection {
    pub world_sizes: Vec<usize>,
    /// Run `conformance run` at every (backend, world size).
    pub conformance_run: bool,
    /// `--suites` for `conformance run` (empty: not passed, conformance runs all its suites).
    pub run_suites: Vec<String>,
    /// `--plans` for `conformance run` (empty: not passed, all plans).
    pub plans: Vec<String>,
    /// The save/resume training scenarios, at these world sizes.
    pub train_worlds: Vec<usize>,
    /// The MPI fault scenarios and the NCCL selftest (when the mpi backend runs).
    pub faults: bool,
    pub nccl: bool,
    /// `conformance dcp` on the committed torch checkpoints.
    pub dcp: bool,
    /// `conformance golden --mutate` on the committed fixtures (each fault must be caught).
    pub golden_faults: bool,
}

/// Splits `--suites` into `conformance run` suites and xtask's own, applies `--quick` and the
/// default world sizes, and checks the lists.
pub(crate) fn select(args: &ConformanceArgs) -> Result<Selection, String> {
    let world_sizes = if !args.world_sizes.is_empty() {
        args.world_sizes.clone()
    } else if args.quick {
        vec![1, 2]
    } else {
        vec![1, 2, 4, 8]
    };
    if world_sizes.contains(&0) {
        return Err("world sizes must be >= 1".into());
    }
    let clean = |list: &[String], what: &str| -> Result<Vec<String>, String> {
        let mut out: Vec<String> = Vec::new();
        for item in list.iter().map(|s| s.trim()) {
            if item.is_empty() {
                return Err(format!("empty name in --{what}"));
            }
            if !out.iter().any(|o| o == item) {
                out.push(item.to_string());
            }
        }
        Ok(out)
    };
    let suites = clean(&args.suites, "suites")?;
    let plans = clean(&args.plans, "plans")?;
    let all = suites.is_empty();
    let wants = |name: &str| all || suites.iter().any(|s| s == name);
    let run_suites: Vec<String> = suites
        .iter()
        .filter(|s| !XTASK_SUITES.contains(&s.as_str()))
        .cloned()
        .collect();
    // Training scenarios at world 2 (quick) or 2 and 4, limited to the requested world sizes.
    let train_worlds: Vec<usize> = if wants("train") {
        let base: &[usize] = if args.quick { &[2] } else { &[2, 4] };
        base.iter()
            .copied()
            .filter(|w| args.world_sizes.is_empty() || world_sizes.contains(w))
            .collect()
    } else {
        Vec::new()
    };
    Ok(Selection {
        conformance_run: all || !run_suites.is_empty(),
        run_suites,
        plans,
        train_worlds,
        faults: wants("faults"),
        nccl: wants("nccl"),
        dcp: wants("dcp"),
        golden_faults: wants("golden-faults"),
        world_sizes,
    })
}

/// The arguments of one `conformance run`.
pub(crate) fn run_args(
    backend: Backend,
    world: usize,
    fixtures: &[PathBuf],
    cases: &[PathBuf],
    sel: &Selection,
    json: &Path,
) -> Vec<String> {
    let mut a = rank_args("run", backend, world);
    for f in fixtures {
        a.extend(["--fixture".into(), f.display().to_string()]);
    }
    for c in cases {
        a.extend(["--cases".into(), c.display().to_string()]);
    }
    if !sel.run_suites.is_empty() {
        a.extend(["--suites".into(), sel.run_suites.join(",")]);
    }
    if !sel.plans.is_empty() {
        a.extend(["--plans".into(), sel.plans.join(",")]);
    }
    a.extend(["--json".into(), json.display().to_string()]);
    a
}

/// Rows of one `conformance run` from its result file, outcome and log.
fn run_rows(backend: Backend, world: usize, json: &Path, log: &Path, out: &RunOutcome) -> Vec<Row> {
    let secs = out.seconds;
    let mut rows = Vec::new();
    match fs::read_to_string(json) {
        Ok(text) => match serde_json::from_str::<RunResult>(&text) {
            Ok(run) if run.backend != backend.name() || run.world_size != world => {
                rows.push(Row::run_error(
                    backend.name(),
                    world,
                    secs,
                    format!(
                        "result file says backend {} world {}, expected {} world {world} (is the binary linked against the MPI that mpirun belongs to?)",
                        run.backend,
                        run.world_size,
                        backend.name()
                    ),
                ));
            }
            Ok(run) => {
                let run_rows = Row::from_run(&run);
                let failed_checks: usize = run_rows.iter().map(|r| r.failed).sum();
                rows.extend(run_rows);
                if !out.ok && failed_checks == 0 {
                    rows.push(Row::run_error(
                        backend.name(),
                        world,
                        secs,
                        format!("{}; log {}: {}", out.note, log.display(), log_tail(log, 5)),
                    ));
                }
            }
            Err(e) => rows.push(Row::run_error(
                backend.name(),
                world,
                secs,
                format!("unreadable result {}: {e}", json.display()),
            )),
        },
        Err(_) => rows.push(Row::run_error(
            backend.name(),
            world,
            secs,
            format!(
                "no result written ({}); log {}: {}",
                out.note,
                log.display(),
                log_tail(log, 5)
            ),
        )),
    }
    rows
}

/// Runs the whole conformance job. Ok(true) when every check passed.
pub fn conformance(args: ConformanceArgs) -> Result<bool, String> {
    let job_start = Instant::now();
    let root = workspace_root();
    let out_dir = target_dir(&root).join("conformance");
    let logs = out_dir.join("logs");
    fs::create_dir_all(&logs).map_err(|e| format!("{}: {e}", logs.display()))?;
    let sel = select(&args)?;
    let timeout = Duration::from_secs(args.timeout_secs);

    let mpi_problem = mpi_missing();
    let mut backends = args.backend.clone();
    let mut prereq_failed = false;
    if backends.is_empty() {
        backends.push(Backend::Threads);
        match &mpi_problem {
            None => backends.push(Backend::Mpi),
            Some(why) => eprintln!(
                "xtask: MPI backend skipped: {why}. Install it with `apt-get install {MPI_PACKAGES}` (Debian/Ubuntu); running the threads backend only."
            ),
        }
    } else if backends.contains(&Backend::Mpi) {
        if let Some(why) = &mpi_problem {
            eprintln!(
                "xtask: error: --backend mpi requested but {why}. Install it with `apt-get install {MPI_PACKAGES}` (Debian/Ubuntu). Running the other backends."
            );
            backends.retain(|b| *b != Backend::Mpi);
            prereq_failed = true;
        }
    }
    let world_sizes = sel.world_sizes.clone();
    let fixtures = if args.fixtures.is_empty() {
        default_fixtures(&root)?
    } else {
        args.fixtures.clone()
    };
    let default_cases = root.join("placement").join("oracle").join("cases.json");
    let cases = if !args.cases.is_empty() {
        args.cases.clone()
    } else if default_cases.is_file() {
        vec![default_cases]
    } else {
        Vec::new()
    };

    // Build: with MPI when it is there; if that build fails (e.g. libclang missing), without it.
    let profile = if args.release { "release" } else { "debug" };
    let with_mpi = mpi_problem.is_none();
    if !build_conformance(&root, args.release, with_mpi)? {
        if !with_mpi {
            return Err("building the conformance binary failed".into());
        }
        eprintln!(
            "xtask: error: building with MPI failed; install `{MPI_PACKAGES}` (Debian/Ubuntu). Building without MPI and running the threads backend only."
        );
        prereq_failed = true;
        backends.retain(|b| *b != Backend::Mpi);
        if !build_conformance(&root, args.release, false)? {
            return Err("building the conformance binary failed, also without MPI".into());
        }
    }
    // Run a private copy, so that a `cargo build` elsewhere during the job cannot swap the binary
    // between runs (every row comes from the binary built above).
    let built = target_dir(&root).join(profile).join("conformance");
    let bin_dir = out_dir.join("bin");
    fs::create_dir_all(&bin_dir).map_err(|e| format!("{}: {e}", bin_dir.display()))?;
    let bin = bin_dir.join("conformance");
    let _ = fs::remove_file(&bin);
    fs::copy(&built, &bin)
        .map_err(|e| format!("copying {} to {}: {e}", built.display(), bin.display()))?;
    let run_mpi_examples = backends.contains(&Backend::Mpi) && (sel.faults || sel.nccl);
    let examples_built = run_mpi_examples && build_examples(&root, args.release)?;

    // Work list, for the progress bar.
    let runs: Vec<(Backend, usize)> = if sel.conformance_run {
        backends
            .iter()
            .flat_map(|b| world_sizes.iter().map(move |w| (*b, *w)))
            .collect()
    } else {
        Vec::new()
    };
    let train_groups: Vec<(Backend, usize)> = backends
        .iter()
        .flat_map(|b| sel.train_worlds.iter().map(move |w| (*b, *w)))
        .collect();
    let fault_worlds: Vec<usize> = if run_mpi_examples && sel.faults {
        world_sizes.iter().copied().filter(|w| *w >= 2).collect()
    } else {
        Vec::new()
    };
    let nccl = run_mpi_examples && sel.nccl;
    let bar = ProgressBar::new(
        (runs.len()
            + train_groups.len()
            + fault_worlds.len()
            + nccl as usize
            + sel.dcp as usize
            + sel.golden_faults as usize) as u64,
    );
    bar.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} {msg}")
            .map_err(|e| e.to_string())?,
    );
    bar.enable_steady_tick(Duration::from_millis(200));
    let as_root = is_root();
    let mut rows: Vec<Row> = Vec::new();

    // `conformance run` per (backend, world size).
    for &(backend, world) in &runs {
        let name = format!("{}-w{world}", backend.name());
        bar.set_message(format!("{} world {world}", backend.name()));
        let json = out_dir.join(format!("{name}.json"));
        let _ = fs::remove_file(&json);
        let cargs = run_args(backend, world, &fixtures, &cases, &sel, &json);
        let cmd = launcher(&bin, backend, world, as_root, &[], &cargs);
        let log = logs.join(format!("{name}.log"));
        let out = run_logged(cmd, &log, None, timeout)?;
        rows.extend(run_rows(backend, world, &json, &log, &out));
        bar.inc(1);
    }

    // The torch-written DCP checkpoints under conformance/fixtures/dcp.
    if sel.dcp {
        bar.set_message("dcp: torch checkpoints");
        rows.extend(crate::dcp::rows(&bin, &root, &out_dir, &logs, timeout)?);
        bar.inc(1);
    }

    // Deliberate faults of the fast path: the float32 bar must catch each one.
    if sel.golden_faults {
        bar.set_message("golden-faults");
        rows.extend(crate::golden_faults::rows(
            &bin, &root, &out_dir, &logs, timeout,
        )?);
        bar.inc(1);
    }

    // Save / resume training scenarios per (backend, world size).
    let mut plots = Vec::new();
    for &(backend, world) in &train_groups {
        bar.set_message(format!("train scenarios, {} world {world}", backend.name()));
        let group = crate::train::Group {
            bin: bin.clone(),
            backend,
            world,
            quick: args.quick,
            as_root,
            timeout,
            dir: out_dir
                .join("train")
                .join(format!("{}-w{world}", backend.name())),
            logs: logs.clone(),
        };
        let (group_rows, plot) = group.run(&|m: &str| bar.set_message(m.to_string()))?;
        rows.extend(group_rows);
        plots.extend(plot);
        bar.inc(1);
    }

    // Fault scenarios under mpirun (desync, killed, stalled and vanished ranks must end with an
    // error naming the collective, in bounded time) and the NCCL selftest (skipped without a GPU).
    if run_mpi_examples {
        if examples_built {
            let examples = target_dir(&root).join(profile).join("examples");
            for &world in &fault_worlds {
                bar.set_message(format!("mpi fault scenarios, world {world}"));
                let mut cmd = Command::new(examples.join("mpi_fault"));
                cmd.args(["check", &world.to_string()]);
                let log = logs.join(format!("faults-w{world}.log"));
                rows.push(example_row("faults", "mpi", world, cmd, &log, timeout)?);
                bar.inc(1);
            }
            if nccl {
                bar.set_message("nccl selftest");
                let log = logs.join("nccl-w1.log");
                rows.push(example_row(
                    "nccl-selftest",
                    "nccl",
                    1,
                    Command::new(examples.join("nccl_selftest")),
                    &log,
                    timeout,
                )?);
                bar.inc(1);
            }
        } else {
            rows.push(Row::run_error(
                "mpi",
                0,
                0.0,
                "building the collectives examples failed".into(),
            ));
        }
    }
    bar.finish_and_clear();

    let list = |v: &[String], none: &str| {
        if v.is_empty() {
            none.to_string()
        } else {
            v.join(", ")
        }
    };
    let header = format!(
        "Fixtures: {}. Placement cases: {}. Backends: {}. World sizes: {:?}. Suites: {}. Plans: {}. Training scenarios at world sizes {:?}{}.{} Wall time: {:.1} s.",
        list(
            &fixtures.iter().map(|f| f.display().to_string()).collect::<Vec<_>>(),
            "none"
        ),
        list(
            &cases.iter().map(|c| c.display().to_string()).collect::<Vec<_>>(),
            "none"
        ),
        backends.iter().map(|b| b.name()).collect::<Vec<_>>().join(", "),
        world_sizes,
        list(&args.suites, "all"),
        list(&sel.plans, "all"),
        sel.train_worlds,
        if args.quick { " (quick)" } else { "" },
        if sel.dcp { " Torch DCP checkpoints: conformance/fixtures/dcp." } else { "" },
        job_start.elapsed().as_secs_f64()
    );
    let md = report::markdown(&rows, &header);
    println!("{md}");
    let md_path = out_dir.join("report.md");
    let xml_path = out_dir.join("junit.xml");
    let html_path = out_dir.join("report.html");
    fs::write(&md_path, &md).map_err(|e| format!("{}: {e}", md_path.display()))?;
    fs::write(&xml_path, report::junit(&rows))
        .map_err(|e| format!("{}: {e}", xml_path.display()))?;
    fs::write(&html_path, crate::html::page(&rows, &header, &plots))
        .map_err(|e| format!("{}: {e}", html_path.display()))?;
    eprintln!(
        "xtask: wrote {}, {} and {}",
        md_path.display(),
        xml_path.display(),
        html_path.display()
    );
    let (_, failed, _) = report::totals(&rows);
    Ok(failed == 0 && !prereq_failed)
}
