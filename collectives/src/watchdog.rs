//! Process-wide watchdog for blocking collectives of backends that cannot time out on their own
//! (MPI, NCCL): a rank that dies, stalls or skips a collective would otherwise leave its peers
//! blocked forever inside the library.
//!
//! Each collective registers itself ([`Watchdog::enter`], a guard cleared on drop) with its op
//! name, sequence number and communicator. A background thread checks every
//! [`POLL`]; when one collective has been in flight longer than the timeout it prints
//! `collectives watchdog: rank R of N: <op> (collective #S on <comm>) did not complete within T
//! ...` to stderr and calls the backend's abort (MPI: exit status 70, after which mpirun
//! terminates the other ranks), so EVERY rank exits within about `timeout + POLL + 1 s` with an
//! error naming the collective: the waiting ranks through their own watchdog or the SIGTERM
//! note (`crate::sigterm`), the job through the MPI runtime.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Exit status used when the watchdog aborts (BSD `EX_SOFTWARE`).
pub const WATCHDOG_EXIT_CODE: i32 = 70;

/// How often the watchdog thread looks at the collective in flight.
pub const POLL: Duration = Duration::from_millis(50);

/// The collective in flight.
struct InFlight {
    op: &'static str,
    seq: u64,
    comm: CommLabel,
    started: Instant,
}

struct State {
    in_flight: Option<InFlight>,
    timeout: Duration,
}

/// Names a communicator in the watchdog message: `mpi communicator of 4 ranks (this rank: 1)`.
#[derive(Debug, Clone, Copy)]
pub struct CommLabel {
    /// Backend name (`"mpi"`).
    pub backend: &'static str,
    /// Communicator size.
    pub size: usize,
    /// This process's rank in it.
    pub rank: usize,
}

impl std::fmt::Display for CommLabel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} communicator of {} ranks (this rank: {})",
            self.backend, self.size, self.rank
        )
    }
}

/// Called (once) with the message when a collective exceeds the timeout; must not return.
pub type AbortFn = fn(&str) -> !;

/// Handle to the process-wide watchdog (cheap to clone).
#[derive(Clone)]
pub struct Watchdog {
    state: Arc<Mutex<State>>,
}

/// Clears the in-flight record when the collective returns.
pub struct Guard {
    state: Arc<Mutex<State>>,
}

impl Drop for Guard {
    fn drop(&mut self) {
        #[cfg(unix)]
        crate::sigterm::clear();
        lock(&self.state).in_flight = None;
    }
}

/// A poisoned mutex only means a thread panicked while holding it; the record is still valid.
fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    state.lock().unwrap_or_else(|e| e.into_inner())
}

impl Watchdog {
    /// Starts the watchdog thread. `proc_rank`/`proc_size` (world rank and size) name this
    /// process in the message; `abort` is called with the message when a collective exceeds
    /// `timeout`. On unix it also installs the SIGTERM/SIGINT note (`crate::sigterm`): a rank
    /// terminated by the runtime while blocked in a collective prints which one.
    ///
    /// Errors: the OS refused to start the thread (the message says so).
    pub fn start(
        timeout: Duration,
        proc_rank: usize,
        proc_size: usize,
        abort: AbortFn,
    ) -> Result<Self, String> {
        #[cfg(unix)]
        crate::sigterm::install(proc_rank, proc_size);
        let label = format!("rank {proc_rank} of {proc_size}");
        let state = Arc::new(Mutex::new(State {
            in_flight: None,
            timeout,
        }));
        let watched = Arc::clone(&state);
        std::thread::Builder::new()
            .name("collectives-watchdog".into())
            .spawn(move || loop {
                std::thread::sleep(POLL);
                // Stop when every handle is gone.
                if Arc::strong_count(&watched) == 1 {
                    return;
                }
                let expired = {
                    let s = lock(&watched);
                    match &s.in_flight {
                        Some(f) if f.started.elapsed() > s.timeout => Some(format!(
                            "collectives watchdog: {label}: {} (collective #{} on {}) did not \
                             complete within {:?}: a peer died, stalled or skipped it; exiting \
                             with status {WATCHDOG_EXIT_CODE}",
                            f.op, f.seq, f.comm, s.timeout
                        )),
                        _ => None,
                    }
                };
                if let Some(msg) = expired {
                    abort(&msg);
                }
            })
            .map_err(|e| format!("cannot start the collectives watchdog thread: {e}"))?;
        Ok(Watchdog { state })
    }

    /// Records that `op` (sequence number `seq` on communicator `comm`) is in flight until the
    /// guard drops.
    pub fn enter(&self, op: &'static str, seq: u64, comm: CommLabel) -> Guard {
        #[cfg(unix)]
        crate::sigterm::record(op, comm.backend, seq, comm.size, comm.rank);
        lock(&self.state).in_flight = Some(InFlight {
            op,
            seq,
            comm,
            started: Instant::now(),
        });
        Guard {
            state: Arc::clone(&self.state),
        }
    }

    /// The current timeout.
    pub fn timeout(&self) -> Duration {
        lock(&self.state).timeout
    }

    /// Changes the timeout (applies to the collective in flight too).
    pub fn set_timeout(&self, timeout: Duration) {
        lock(&self.state).timeout = timeout;
    }
}
