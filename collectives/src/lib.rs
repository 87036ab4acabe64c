//! Communicator abstraction and the collectives that tensor, sequence and expert parallelism
//! need (`broadcast`, `all_reduce`, `all_gather(v)`, `reduce_scatter(v)`, `all_to_all(v)`,
//! `split`), their autograd forward/backward pairs ([`autograd`]), with three backends:
//!
//! - [`threads`]: N ranks in one process, one OS thread each (tests, conformance suite); never
//!   hangs: timeouts, dropped-peer detection and per-call consistency checks.
//! - `mpi` (feature `mpi`, default on): rsmpi over `MPI_COMM_WORLD`, with a collective
//!   watchdog ([`watchdog`]) that aborts every rank with a message naming the collective.
//! - `nccl` (feature `nccl`, default on): cudarc, one GPU per rank; compiled everywhere, run
//!   only when a CUDA device is present (`nccl::availability`).
//!
//! Both backends exchange every call's arguments before moving data, so a collective issued
//! with different ops/dtypes/counts on different ranks fails on every rank instead of hanging
//! (the failure mode behind NeMo Automodel PR 1570/1589).
//! [`selftest`] holds the checks both backends must pass.
//!
//! ```
//! use collectives::{threads::spawn_world, CommunicatorExt, ReduceOp};
//! let out = spawn_world(3, |comm| {
//!     let mut x = [comm.rank() as f32, 1.0];
//!     comm.all_reduce(&mut x, ReduceOp::Sum).unwrap();
//!     let g = comm.all_gather(&[comm.rank() as u8; 2][..comm.rank()], &[0, 1, 2]).unwrap();
//!     (x, g)
//! });
//! for r in out {
//!     let (x, g) = r.unwrap();
//!     assert_eq!(x, [3.0, 3.0]);
//!     assert_eq!(g, vec![1, 2, 2]);
//! }
//! ```

pub mod autograd;
mod call;
mod check;
mod communicator;
mod dtype;
mod error;
mod mesh;
mod reduce;

#[cfg(feature = "mpi")]
pub mod mpi;
#[cfg(feature = "nccl")]
pub mod nccl;
pub mod selftest;
#[cfg(unix)]
mod sigterm;

/// Environment variable naming a folder where each rank also appends its fault reports
/// (`rank-<R>.log`): watchdog timeouts, SIGTERM while in a collective, a skipped finalize. The
/// MPI runtime may drop the stderr of processes it is terminating; the files keep the reports.
pub const REPORT_DIR_ENV: &str = "COLLECTIVES_REPORT_DIR";

/// Prints a fault report line on stderr and, when [`REPORT_DIR_ENV`] is set (and an MPI world was
/// initialised in this process), appends it to this rank's report file.
pub fn report_fault(line: &str) {
    #[cfg(unix)]
    sigterm::report(line);
    #[cfg(not(unix))]
    eprintln!("{line}");
}
pub mod threads;
pub mod watchdog;

pub use communicator::{Communicator, CommunicatorExt};
pub use dtype::{DType, Element, ReduceOp};
pub use error::{CommError, Result};
pub use mesh::{mesh_dim_comm, mesh_dims_comm};
