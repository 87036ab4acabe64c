//! The error type of every fallible operation in this crate.

use std::time::Duration;

/// Result alias used throughout the crate.
pub type Result<T> = std::result::Result<T, CommError>;

/// Everything that can go wrong in a collective. Every message names the operation, the rank(s)
/// involved and what mismatched, so a failing multi-rank test points at the offending call.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommError {
    /// A rank passed arguments that are invalid on their own (wrong buffer length, count list of
    /// the wrong length, root out of range, ...). Every rank of the communicator reports the same
    /// error (the arguments are exchanged before any data moves), so no rank is left hanging.
    #[error("{op}: invalid arguments on rank {rank}: {reason}")]
    InvalidArgument {
        /// Operation name, e.g. `all_gather`.
        op: &'static str,
        /// Rank (in the communicator that was called) whose arguments are invalid.
        rank: usize,
        /// What is wrong.
        reason: String,
    },
    /// The ranks did not issue the same collective (different op, dtype, counts, root or reduce
    /// op). `calls` lists each rank's call.
    #[error("{op} (collective #{seq}): ranks issued different collectives: {calls}")]
    Mismatch {
        /// The operation this rank called.
        op: &'static str,
        /// Sequence number of the collective on this communicator (0-based).
        seq: u64,
        /// Each rank's call, `rank 0: all_reduce(dtype=F32, count=4, op=Sum); rank 1: ...`.
        calls: String,
    },
    /// `all_to_all`: `sender`'s `send_counts[receiver]` differs from `receiver`'s
    /// `recv_counts[sender]`.
    #[error(
        "all_to_all (collective #{seq}): rank {sender} sends {sent} elements to rank {receiver}, \
         but rank {receiver} expects {expected} from rank {sender}"
    )]
    CountMismatch {
        /// Sequence number of the collective on this communicator (0-based).
        seq: u64,
        /// The sending rank.
        sender: usize,
        /// The receiving rank.
        receiver: usize,
        /// `send_counts[receiver]` on `sender`.
        sent: usize,
        /// `recv_counts[sender]` on `receiver`.
        expected: usize,
    },
    /// Some ranks did not reach the collective within the timeout (threads backend).
    #[error(
        "{op} (collective #{seq}): timed out after {waited:?}; ranks {missing:?} did not arrive"
    )]
    Timeout {
        /// The operation this rank called.
        op: &'static str,
        /// Sequence number of the collective on this communicator (0-based).
        seq: u64,
        /// How long this rank waited.
        waited: Duration,
        /// Ranks that had not issued the collective when the timeout expired.
        missing: Vec<usize>,
    },
    /// Some ranks dropped their communicator (their thread ended or panicked) so the collective
    /// can never complete (threads backend).
    #[error("{op} (collective #{seq}): ranks {ranks:?} dropped their communicator")]
    PeerGone {
        /// The operation this rank called.
        op: &'static str,
        /// Sequence number of the collective on this communicator (0-based).
        seq: u64,
        /// Ranks whose communicator was dropped.
        ranks: Vec<usize>,
    },
    /// The communicator failed earlier (timeout or dropped peer) and cannot be used any more.
    #[error("{op}: communicator is unusable after an earlier failure: {reason}")]
    Poisoned {
        /// The operation this rank called.
        op: &'static str,
        /// The earlier failure.
        reason: String,
    },
    /// A count or byte offset does not fit the MPI `int` count type (`i32`).
    #[error("{op}: {what} = {value} does not fit MPI's 32-bit count type")]
    CountOverflow {
        /// Operation name.
        op: &'static str,
        /// Which quantity overflowed.
        what: &'static str,
        /// Its value.
        value: usize,
    },
    /// MPI could not be initialised or an MPI call reported a failure.
    #[error("mpi: {0}")]
    Mpi(String),
    /// CUDA or NCCL is missing ("skipped: no CUDA device") or a CUDA/NCCL call failed.
    #[error("nccl: {0}")]
    Nccl(String),
    /// The device mesh does not fit the communicator, or a placement error.
    #[error("mesh: {0}")]
    Mesh(String),
    /// An internal invariant failed (a bug in this crate); the message says which.
    #[error("internal error: {0}")]
    Internal(String),
}
