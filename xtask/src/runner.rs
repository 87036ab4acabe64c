//! Builds the conformance binary and runs it once per (backend, world size).

use crate::report;
use crate::results::{Row, RunResult};
use crate::{Backend, ConformanceArgs};
use indicatif::{ProgressBar, ProgressStyle};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Debian packages the MPI backend needs (build and run).
const MPI_PACKAGES: &str = "openmpi-bin libopenmpi-dev libclang-dev pkg-config";

fn workspace_root() -> PathBuf {
    let here = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    here.parent().map(Path::to_path_buf).unwrap_or(here)
}

fn target_dir(root: &Path) -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"))
}

fn succeeds(cmd: &str, args: &[&str]) -> bool {
    Command::new(cmd)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// Why the MPI backend cannot run here, or None when `mpirun` and the MPI library are present.
fn mpi_missing() -> Option<String> {
    if !succeeds("mpirun", &["--version"]) {
        return Some("`mpirun` not found".into());
    }
    let lib = ["ompi", "ompi-c", "mpich", "mpi"]
        .iter()
        .any(|p| succeeds("pkg-config", &["--exists", p]))
        || succeeds("mpicc", &["--showme:version"]);
    if !lib {
        return Some("the MPI development library (pkg-config ompi / mpicc) not found".into());
    }
    None
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// Every directory under conformance/fixtures/ that holds a config.json.
fn default_fixtures(root: &Path) -> Result<Vec<PathBuf>, String> {
    let dir = root.join("conformance").join("fixtures");
    let mut out = Vec::new();
    let entries = fs::read_dir(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    for entry in entries {
        let path = entry.map_err(|e| format!("{}: {e}", dir.display()))?.path();
        if path.join("config.json").is_file() {
            out.push(path);
        }
    }
    out.sort();
    if out.is_empty() {
        return Err(format!("no fixture directories under {}", dir.display()));
    }
    Ok(out)
}

/// Signals every process of the group `pgid` (mpirun and its ranks).
fn kill_group(signal: &str, pgid: u32) {
    let _ = Command::new("kill")
        .args([signal, "--", &format!("-{pgid}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// Runs `cmd` in its own process group with output to `log`; after `timeout` the whole group gets
/// SIGTERM (mpirun forwards it to the ranks), then SIGKILL 10 s later, so no rank outlives the run.
/// Returns (exit ok, seconds, note).
pub(crate) fn run_with_timeout(
    mut cmd: Command,
    log: &Path,
    timeout: Duration,
) -> Result<(bool, f64, String), String> {
    use std::os::unix::process::CommandExt;
    let file = fs::File::create(log).map_err(|e| format!("{}: {e}", log.display()))?;
    let err = file
        .try_clone()
        .map_err(|e| format!("{}: {e}", log.display()))?;
    let start = Instant::now();
    let mut child = cmd
        .stdout(file)
        .stderr(err)
        .stdin(Stdio::null())
        .process_group(0)
        .spawn()
        .map_err(|e| format!("cannot start {:?}: {e}", cmd.get_program()))?;
    let pgid = child.id();
    let mut terminated_at: Option<Instant> = None;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => {
                if terminated_at.is_some() {
                    kill_group("-KILL", pgid);
                    return Ok((
                        false,
                        start.elapsed().as_secs_f64(),
                        format!("killed after {} s (timeout)", timeout.as_secs()),
                    ));
                }
                let note = if status.success() {
                    String::new()
                } else {
                    format!("exit status {status}")
                };
                return Ok((status.success(), start.elapsed().as_secs_f64(), note));
            }
            Ok(None) => match terminated_at {
                None if start.elapsed() > timeout => {
                    kill_group("-TERM", pgid);
                    terminated_at = Some(Instant::now());
                }
                Some(t) if t.elapsed() > Duration::from_secs(10) => {
                    kill_group("-KILL", pgid);
                    let _ = child.kill();
                    let _ = child.wait();
                    return Ok((
                        false,
                        start.elapsed().as_secs_f64(),
                        format!("killed after {} s (timeout)", timeout.as_secs()),
                    ));
                }
                _ => std::thread::sleep(Duration::from_millis(50)),
            },
            Err(e) => return Err(format!("waiting for {:?}: {e}", cmd.get_program())),
        }
    }
}

/// The last lines of a log, for a failure message.
fn log_tail(log: &Path, lines: usize) -> String {
    let text = fs::read_to_string(log).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join(" | ")
}

/// `cargo build -p conformance --bin conformance` (without the `mpi` feature unless `with_mpi`).
fn build_conformance(root: &Path, release: bool, with_mpi: bool) -> Result<bool, String> {
    eprintln!(
        "xtask: building conformance ({}{})",
        if release { "release" } else { "debug" },
        if with_mpi { "" } else { ", without MPI" }
    );
    let mut build = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    build.current_dir(root).args([
        "build",
        "--quiet",
        "-p",
        "conformance",
        "--bin",
        "conformance",
    ]);
    if release {
        build.arg("--release");
    }
    if !with_mpi {
        build.arg("--no-default-features");
    }
    let status = build
        .status()
        .map_err(|e| format!("cannot run cargo: {e}"))?;
    Ok(status.success())
}

/// Builds the collectives example binaries (MPI fault scenarios, NCCL selftest).
fn build_examples(root: &Path, release: bool) -> Result<bool, String> {
    eprintln!("xtask: building the collectives examples");
    let mut build = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    build
        .current_dir(root)
        .args(["build", "--quiet", "-p", "collectives", "--examples"]);
    if release {
        build.arg("--release");
    }
    let status = build
        .status()
        .map_err(|e| format!("cannot run cargo: {e}"))?;
    Ok(status.success())
}

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

/// Runs the whole conformance job. Ok(true) when every check passed.
pub fn conformance(args: ConformanceArgs) -> Result<bool, String> {
    let root = workspace_root();
    let out_dir = target_dir(&root).join("conformance");
    let logs = out_dir.join("logs");
    fs::create_dir_all(&logs).map_err(|e| format!("{}: {e}", logs.display()))?;

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
    let world_sizes = if !args.world_sizes.is_empty() {
        args.world_sizes.clone()
    } else if args.quick {
        vec![1, 2]
    } else {
        vec![1, 2, 4]
    };
    if world_sizes.contains(&0) {
        return Err("world sizes must be >= 1".into());
    }
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
    let bin = target_dir(&root).join(profile).join("conformance");

    // Runs.
    let plan: Vec<(Backend, usize)> = backends
        .iter()
        .flat_map(|b| world_sizes.iter().map(move |w| (*b, *w)))
        .collect();
    let bar = ProgressBar::new(plan.len() as u64);
    bar.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} {msg}")
            .map_err(|e| e.to_string())?,
    );
    bar.enable_steady_tick(Duration::from_millis(200));
    let root_flag = is_root();
    let mut rows: Vec<Row> = Vec::new();
    for (backend, world) in plan {
        let name = format!("{}-w{world}", backend.name());
        bar.set_message(format!("{} world {world}", backend.name()));
        let json = out_dir.join(format!("{name}.json"));
        let _ = fs::remove_file(&json);
        let mut conformance_args: Vec<String> =
            vec!["run".into(), "--backend".into(), backend.name().into()];
        if backend == Backend::Threads {
            conformance_args.extend(["--world".into(), world.to_string()]);
        }
        for f in &fixtures {
            conformance_args.extend(["--fixture".into(), f.display().to_string()]);
        }
        for c in &cases {
            conformance_args.extend(["--cases".into(), c.display().to_string()]);
        }
        if !args.suites.is_empty() {
            conformance_args.extend(["--suites".into(), args.suites.join(",")]);
        }
        conformance_args.extend(["--json".into(), json.display().to_string()]);
        let cmd = match backend {
            Backend::Threads => {
                let mut c = Command::new(&bin);
                c.args(&conformance_args);
                c
            }
            Backend::Mpi => {
                let mut c = Command::new("mpirun");
                c.args([
                    "-n",
                    &world.to_string(),
                    "--oversubscribe",
                    "--bind-to",
                    "none",
                ]);
                if root_flag {
                    c.arg("--allow-run-as-root");
                }
                c.arg(&bin).args(&conformance_args);
                c
            }
        };
        let log = logs.join(format!("{name}.log"));
        let (ok, secs, note) = run_with_timeout(cmd, &log, Duration::from_secs(args.timeout_secs))?;
        match fs::read_to_string(&json) {
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
                    if !ok && failed_checks == 0 {
                        rows.push(Row::run_error(
                            backend.name(),
                            world,
                            secs,
                            format!("{note}; log {}: {}", log.display(), log_tail(&log, 5)),
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
                    "no result written ({note}); log {}: {}",
                    log.display(),
                    log_tail(&log, 5)
                ),
            )),
        }
        bar.inc(1);
    }
    // Fault scenarios under mpirun (desync, killed, stalled and vanished ranks must end with an
    // error naming the collective, in bounded time) and the NCCL selftest (skipped without a GPU).
    if backends.contains(&Backend::Mpi) {
        if build_examples(&root, args.release)? {
            let examples = target_dir(&root).join(profile).join("examples");
            for &world in world_sizes.iter().filter(|w| **w >= 2) {
                bar.set_message(format!("mpi fault scenarios, world {world}"));
                let mut cmd = Command::new(examples.join("mpi_fault"));
                cmd.args(["check", &world.to_string()]);
                let log = logs.join(format!("faults-w{world}.log"));
                rows.push(example_row(
                    "faults",
                    "mpi",
                    world,
                    cmd,
                    &log,
                    Duration::from_secs(args.timeout_secs),
                )?);
            }
            bar.set_message("nccl selftest");
            let log = logs.join("nccl-w1.log");
            rows.push(example_row(
                "nccl-selftest",
                "nccl",
                1,
                Command::new(examples.join("nccl_selftest")),
                &log,
                Duration::from_secs(args.timeout_secs),
            )?);
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

    let header = format!(
        "Fixtures: {}. Placement cases: {}. Backends: {}. World sizes: {:?}.",
        fixtures
            .iter()
            .map(|f| f.display().to_string())
            .collect::<Vec<_>>()
            .join(", "),
        if cases.is_empty() {
            "none".to_string()
        } else {
            cases
                .iter()
                .map(|c| c.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        },
        backends
            .iter()
            .map(|b| b.name())
            .collect::<Vec<_>>()
            .join(", "),
        world_sizes
    );
    let md = report::markdown(&rows, &header);
    println!("{md}");
    let md_path = out_dir.join("report.md");
    let xml_path = out_dir.join("junit.xml");
    fs::write(&md_path, &md).map_err(|e| format!("{}: {e}", md_path.display()))?;
    fs::write(&xml_path, report::junit(&rows))
        .map_err(|e| format!("{}: {e}", xml_path.display()))?;
    eprintln!(
        "xtask: wrote {} and {}",
        md_path.display(),
        xml_path.display()
    );
    let (_, failed, _) = report::totals(&rows);
    Ok(failed == 0 && !prereq_failed)
}
