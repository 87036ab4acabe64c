//! Runs `collectives::selftest` on `MPI_COMM_WORLD`.
//!
//! ```text
//! cargo build -p collectives --example mpi_selftest
//! mpirun --allow-run-as-root --oversubscribe -n 4 target/debug/examples/mpi_selftest
//! ```
//! Every rank prints its failures; rank 0 prints `N passed, M failed` (summed over ranks: a
//! check counts as failed if it failed on any rank). Exit status 1 on any failure.

use collectives::mpi::MpiWorld;
use collectives::selftest::{run_all, summary};
use collectives::{CommunicatorExt, ReduceOp};
use std::process::ExitCode;

fn main() -> ExitCode {
    let world = match MpiWorld::init() {
        Ok(w) => w,
        Err(e) => {
            eprintln!("mpi_selftest: {e}");
            return ExitCode::FAILURE;
        }
    };
    let code = {
        let comm = world.world();
        let (rank, size) = (comm.rank(), comm.size());
        let mut results = run_all(&*comm);
        // A second MpiWorld in the same process must be refused.
        let second = match MpiWorld::init() {
            Err(collectives::CommError::Mpi(_)) => Ok(()),
            Err(e) => Err(collectives::selftest::CheckError::Wrong(format!(
                "second MpiWorld::init: wrong error {e}"
            ))),
            Ok(_) => Err(collectives::selftest::CheckError::Wrong(
                "second MpiWorld::init succeeded".into(),
            )),
        };
        results.push(("mpi_init_twice_is_an_error".into(), second));
        for (name, r) in &results {
            if let Err(e) = r {
                eprintln!("rank {rank}/{size}: FAILED {name}: {e}");
            }
        }
        // A check fails if it failed on any rank.
        let mut failed: Vec<u8> = results.iter().map(|(_, r)| u8::from(r.is_err())).collect();
        let agreed = comm.all_reduce(&mut failed, ReduceOp::Max);
        let (passed, nfailed) = match agreed {
            Ok(()) => {
                let m = failed.iter().filter(|&&x| x != 0).count();
                (results.len() - m, m)
            }
            Err(e) => {
                eprintln!("rank {rank}: could not combine results: {e}");
                let (p, m) = summary(&results);
                (p, m.max(1))
            }
        };
        if rank == 0 {
            println!(
                "mpi_selftest on {size} ranks ({}): {passed} passed, {nfailed} failed",
                comm.backend()
            );
        }
        if nfailed == 0 {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        }
    };
    drop(world);
    code
}
