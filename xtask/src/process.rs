//! Running child processes for xtask: the timeout with process-group kill, logs, the result file
//! of a single-suite run, and the launcher for threads / mpirun.

use crate::results::RunResult;
use crate::Backend;
use std::fs;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Signals every process of the group `pgid` (mpirun and its ranks).
pub(crate) fn kill_group(signal: &str, pgid: u32) {
    let _ = Command::new("kill")
        .args([signal, "--", &format!("-{pgid}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// How a child run ended.
#[derive(Debug, Clone)]
pub(crate) struct RunOutcome {
    /// Exited with status 0 (and was not killed for the timeout).
    pub ok: bool,
    pub seconds: f64,
    /// Empty on success; else `exit status ...` or `killed after N s (timeout)`.
    pub note: String,
    /// The exit code, when it exited (not killed by a signal).
    pub code: Option<i32>,
    pub timed_out: bool,
}

/// Runs `cmd` in its own process group with output to `log`; after `timeout` the whole group gets
/// SIGTERM (mpirun forwards it to the ranks), then SIGKILL 10 s later, so no rank outlives the run.
/// Returns (exit ok, seconds, note).
pub(crate) fn run_with_timeout(
    cmd: Command,
    log: &Path,
    timeout: Duration,
) -> Result<(bool, f64, String), String> {
    let o = run_logged(cmd, log, None, timeout)?;
    Ok((o.ok, o.seconds, o.note))
}

/// Runs a single-suite conformance command that writes its result file to `json` (removed
/// first), logging to `log`: the parsed result (`None` when none was written or it does not
/// parse), the outcome, and a one-line reason for a row that has no result (note + log tail).
pub(crate) fn run_for_result(
    cmd: Command,
    json: &Path,
    log: &Path,
    timeout: Duration,
) -> Result<(Option<RunResult>, RunOutcome, String), String> {
    let _ = fs::remove_file(json);
    let out = run_logged(cmd, log, None, timeout)?;
    let run: Option<RunResult> = fs::read_to_string(json)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok());
    let why = format!("{}; log {}: {}", out.note, log.display(), log_tail(log, 3));
    Ok((run, out, why))
}

/// [`run_with_timeout`] with stderr to `err_log` when given (else to `log` too), and the exit code.
pub(crate) fn run_logged(
    mut cmd: Command,
    log: &Path,
    err_log: Option<&Path>,
    timeout: Duration,
) -> Result<RunOutcome, String> {
    use std::os::unix::process::CommandExt;
    let file = fs::File::create(log).map_err(|e| format!("{}: {e}", log.display()))?;
    let err = match err_log {
        Some(p) => fs::File::create(p).map_err(|e| format!("{}: {e}", p.display()))?,
        None => file
            .try_clone()
            .map_err(|e| format!("{}: {e}", log.display()))?,
    };
    let start = Instant::now();
    let mut child = cmd
        .stdout(file)
        .stderr(err)
        .stdin(Stdio::null())
        .process_group(0)
        .spawn()
        .map_err(|e| format!("cannot start {:?}: {e}", cmd.get_program()))?;
    let pgid = child.id();
    let timed_out = |start: Instant| RunOutcome {
        ok: false,
        seconds: start.elapsed().as_secs_f64(),
        note: format!("killed after {} s (timeout)", timeout.as_secs()),
        code: None,
        timed_out: true,
    };
    let mut terminated_at: Option<Instant> = None;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => {
                if terminated_at.is_some() {
                    kill_group("-KILL", pgid);
                    return Ok(timed_out(start));
                }
                let note = if status.success() {
                    String::new()
                } else {
                    status.to_string()
                };
                return Ok(RunOutcome {
                    ok: status.success(),
                    seconds: start.elapsed().as_secs_f64(),
                    note,
                    code: status.code(),
                    timed_out: false,
                });
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
                    return Ok(timed_out(start));
                }
                _ => std::thread::sleep(Duration::from_millis(50)),
            },
            Err(e) => return Err(format!("waiting for {:?}: {e}", cmd.get_program())),
        }
    }
}

/// The last lines of a log, for a failure message.
pub(crate) fn log_tail(log: &Path, lines: usize) -> String {
    let text = fs::read_to_string(log).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join(" | ")
}

/// `SUB --backend B` and, for the threads backend, `--world N` (under MPI the world is mpirun's).
pub(crate) fn rank_args(sub: &str, backend: Backend, world: usize) -> Vec<String> {
    let mut a = vec![sub.to_string(), "--backend".into(), backend.name().into()];
    if backend == Backend::Threads {
        a.extend(["--world".into(), world.to_string()]);
    }
    a
}

/// The command that runs `bin args` on `world` ranks with the environment variables `env`:
/// directly for threads, under `mpirun -n N --oversubscribe --bind-to none [--allow-run-as-root]
/// [-x VAR ...]` for MPI.
pub(crate) fn launcher(
    bin: &Path,
    backend: Backend,
    world: usize,
    as_root: bool,
    env: &[(&str, String)],
    args: &[String],
) -> Command {
    match backend {
        Backend::Threads => {
            let mut c = Command::new(bin);
            c.envs(env.iter().map(|(k, v)| (*k, v)));
            c.args(args);
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
            if as_root {
                c.arg("--allow-run-as-root");
            }
            for (k, v) in env {
                c.env(k, v).args(["-x", k]);
            }
            c.arg(bin).args(args);
            c
        }
    }
}
