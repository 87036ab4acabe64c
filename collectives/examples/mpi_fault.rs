//! Fault scenarios under mpirun: desync, killed rank, stalled rank, rank that skips the last
//! collective and exits. Each must end with a clear error naming the collective, in bounded
//! time, never a hang.
//!
//! ```text
//! cargo build -p collectives --example mpi_fault
//! # driver: runs every scenario under `mpirun -n RANKS`, checks exit status, message and time;
//! # prints one PASS/FAIL line per scenario; exit status 0 iff all pass
//! target/debug/examples/mpi_fault check 4
//! # one scenario by hand (TIMEOUT_SECS = watchdog timeout):
//! mpirun --allow-run-as-root --oversubscribe -n 4 target/debug/examples/mpi_fault run killed 2
//! ```
//!
//! Scenarios (the faulty rank is the last one; collectives #0..#2 are healthy `all_reduce`s):
//! - `desync`: the faulty rank skips `all_reduce` #3 and issues an `all_gather`: every rank gets
//!   `Mismatch` listing each rank's call; rank 0 prints `desync detected on every rank`; exit 0.
//! - `killed`: the faulty rank aborts (SIGABRT) before #3; the others block in `all_reduce` #3.
//! - `stalled`: the faulty rank sleeps 10 x timeout before #3.
//! - `skip_and_exit`: the faulty rank skips #3 and ends (drops the `MpiWorld`): its finalize
//!   check (a checked barrier) and the others' `all_reduce` #3 fail with `Mismatch` on every
//!   rank at once; the others print `rank R of N: all_reduce (collective #3): ranks issued
//!   different collectives: ... rank N-1: barrier()`, the faulty rank exits with status 70
//!   without `MPI_Finalize`.
//!
//! For the last three, the waiting ranks (0..N-1) name the collective: either the watchdog
//! prints `collectives watchdog: rank R of N: all_reduce (collective #3 on mpi communicator
//! ...) did not complete within ...` and exits with status 70, or mpirun's SIGTERM (sent when a
//! rank dies or exits early) makes the rank print `collectives: rank R of N: terminated by
//! signal 15 while in all_reduce (collective #3 ...)`. mpirun exits non-zero (`killed`: 134, the
//! SIGABRT; `stalled` and `skip_and_exit`: 70) within about timeout + 1 s. `check` requires a
//! non-zero status within 30 s (mpirun is killed after 35 s) and at least one waiting rank's line
//! naming `all_reduce (collective #3`, and prints how many did: every waiting rank prints one,
//! but Open MPI may drop the stderr of processes it is killing, so `check` also reads the per-rank
//! report files each rank appends to (`COLLECTIVES_REPORT_DIR`, see `collectives::report_fault`).

use collectives::mpi::MpiWorld;
use collectives::{CommError, CommunicatorExt, ReduceOp};
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

const SCENARIOS: [&str; 4] = ["desync", "killed", "stalled", "skip_and_exit"];
/// Watchdog timeout used by `check`.
const CHECK_TIMEOUT_SECS: f64 = 2.0;
/// A scenario taking longer than this under `check` counts as a hang.
const HANG_LIMIT: Duration = Duration::from_secs(30);

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("run") if args.len() == 4 => match args[3].parse::<f64>() {
            Ok(t) if t > 0.0 => run(&args[2], Duration::from_secs_f64(t)),
            _ => usage(),
        },
        Some("check") if args.len() == 3 => match args[2].parse::<usize>() {
            Ok(n) if n >= 2 => check(n),
            _ => usage(),
        },
        _ => usage(),
    }
}

fn usage() -> ExitCode {
    eprintln!("usage: mpi_fault check RANKS (RANKS >= 2) | mpi_fault run SCENARIO TIMEOUT_SECS");
    eprintln!("scenarios: {SCENARIOS:?}");
    ExitCode::from(2)
}

/// Rank mode (under mpirun).
fn run(scenario: &str, timeout: Duration) -> ExitCode {
    let world = match MpiWorld::init() {
        Ok(w) => w,
        Err(e) => {
            eprintln!("mpi_fault: {e}");
            return ExitCode::FAILURE;
        }
    };
    world.set_timeout(timeout);
    let code = {
        let comm = world.world();
        let (me, w) = (comm.rank(), comm.size());
        let faulty = me + 1 == w;
        let mut x = [1.0f64];
        for _ in 0..3 {
            if let Err(e) = comm.all_reduce(&mut x, ReduceOp::Sum) {
                eprintln!("rank {me}: healthy all_reduce failed: {e}");
                return ExitCode::FAILURE;
            }
        }
        match (scenario, faulty) {
            ("desync", _) => {
                let got = if faulty {
                    comm.all_gather(&[1.0f64], &vec![1; w]).map(drop)
                } else {
                    comm.all_reduce(&mut x, ReduceOp::Sum)
                };
                let ok = match &got {
                    Err(e @ CommError::Mismatch { .. }) => {
                        eprintln!("rank {me}: {e}");
                        1u8
                    }
                    other => {
                        eprintln!("rank {me}: expected Mismatch, got {other:?}");
                        0
                    }
                };
                let mut all = [ok];
                match comm.all_reduce(&mut all, ReduceOp::Min) {
                    Ok(()) if all[0] == 1 => {
                        if me == 0 {
                            println!("desync detected on every rank");
                        }
                        ExitCode::SUCCESS
                    }
                    other => {
                        eprintln!("rank {me}: desync not detected everywhere: {other:?}");
                        ExitCode::FAILURE
                    }
                }
            }
            ("killed", true) => {
                eprintln!("rank {me}: aborting (simulated crash) before all_reduce #3");
                std::process::abort()
            }
            ("stalled", true) => {
                eprintln!(
                    "rank {me}: stalling {:?} before all_reduce #3",
                    timeout * 10
                );
                std::thread::sleep(timeout * 10);
                ExitCode::FAILURE
            }
            ("skip_and_exit", true) => {
                eprintln!("rank {me}: skipping all_reduce #3 and exiting");
                ExitCode::SUCCESS
            }
            ("killed" | "stalled" | "skip_and_exit", false) => {
                // Blocks until the watchdog ends the job (killed, stalled), or fails with
                // Mismatch against the skipping rank's finalize check (skip_and_exit).
                match comm.all_reduce(&mut x, ReduceOp::Sum) {
                    Err(e) => collectives::report_fault(&format!("rank {me} of {w}: {e}")),
                    Ok(()) => eprintln!("rank {me} of {w}: all_reduce #3 succeeded unexpectedly"),
                }
                ExitCode::FAILURE
            }
            _ => {
                eprintln!("unknown scenario {scenario}; known: {SCENARIOS:?}");
                ExitCode::from(2)
            }
        }
    };
    drop(world);
    code
}

/// Driver mode: runs each scenario under mpirun and checks the outcome.
fn check(ranks: usize) -> ExitCode {
    let exe = match std::env::current_exe() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("mpi_fault: cannot find own executable: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut all_ok = true;
    for scenario in SCENARIOS {
        // Each rank also appends its fault report to <reports>/rank-<R>.log: Open MPI may drop
        // the stderr of the processes it is terminating.
        let reports =
            std::env::temp_dir().join(format!("mpi_fault-{}-{scenario}", std::process::id()));
        let _ = std::fs::remove_dir_all(&reports);
        if let Err(e) = std::fs::create_dir_all(&reports) {
            println!("FAIL {scenario}: cannot create {}: {e}", reports.display());
            all_ok = false;
            continue;
        }
        let start = Instant::now();
        let out = Command::new("timeout")
            .args(["--kill-after=5"])
            .arg(HANG_LIMIT.as_secs().to_string())
            .env(collectives::REPORT_DIR_ENV, &reports)
            .args([
                "mpirun",
                "-x",
                collectives::REPORT_DIR_ENV,
                "--allow-run-as-root",
                "--oversubscribe",
                "-n",
            ])
            .arg(ranks.to_string())
            .arg(&exe)
            .args(["run", scenario, &CHECK_TIMEOUT_SECS.to_string()])
            .output();
        let elapsed = start.elapsed();
        let out = match out {
            Ok(o) => o,
            Err(e) => {
                println!("FAIL {scenario}: cannot run mpirun: {e}");
                all_ok = false;
                continue;
            }
        };
        let mut text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        for r in 0..ranks {
            text.push_str(
                &std::fs::read_to_string(reports.join(format!("rank-{r}.log"))).unwrap_or_default(),
            );
        }
        let _ = std::fs::remove_dir_all(&reports);
        let status = out.status.code();
        let verdict = if status == Some(124) || status == Some(137) || elapsed >= HANG_LIMIT {
            Err("hung (killed by the 30 s limit)".to_string())
        } else if scenario == "desync" {
            if status == Some(0) && text.contains("desync detected on every rank") {
                Ok(())
            } else {
                Err(format!(
                    "status {status:?}, no 'desync detected on every rank'"
                ))
            }
        } else if status == Some(0) {
            Err("exit status 0, want non-zero".into())
        } else {
            // Every rank except the faulty one must name the collective it was blocked in
            // (watchdog line or SIGTERM line).
            let named = (0..ranks - 1)
                .filter(|r| {
                    text.lines().any(|l| {
                        l.contains(&format!("rank {r} of {ranks}: "))
                            && l.contains("all_reduce (collective #3")
                    })
                })
                .count();
            if named >= 1 {
                println!(
                    "  {scenario}: {named} of {} waiting ranks named all_reduce #3 in the output",
                    ranks - 1
                );
                Ok(())
            } else {
                Err("no waiting rank named all_reduce #3".into())
            }
        };
        match verdict {
            Ok(()) => println!(
                "PASS {scenario} on {ranks} ranks: exit status {status:?} after {:.1} s",
                elapsed.as_secs_f64()
            ),
            Err(why) => {
                all_ok = false;
                println!(
                    "FAIL {scenario} on {ranks} ranks after {:.1} s: {why}\n--- output ---\n{text}",
                    elapsed.as_secs_f64()
                );
            }
        }
    }
    if all_ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
