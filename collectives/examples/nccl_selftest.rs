//! Runs `collectives::selftest` on the NCCL backend (features `mpi` and `nccl`).
//!
//! ```text
//! cargo build -p collectives --features nccl --example nccl_selftest
//! target/debug/examples/nccl_selftest            # world size 1 (threads bootstrap)
//! mpirun --allow-run-as-root -n 2 target/debug/examples/nccl_selftest   # one GPU per rank
//! ```
//! Without a CUDA device every rank prints `nccl_selftest: skipped: no CUDA device` and the exit
//! status is 0. Otherwise rank 0 prints `N passed, M failed`; exit status 1 on any failure.

use collectives::mpi::MpiWorld;
use collectives::nccl::{availability, NcclAvailability, NcclComm};
use collectives::selftest::{run_all, summary};
use collectives::Communicator;
use std::process::ExitCode;

fn report(comm: &dyn Communicator) -> ExitCode {
    let results = run_all(comm);
    for (name, r) in &results {
        if let Err(e) = r {
            eprintln!("rank {}: FAILED {name}: {e}", comm.rank());
        }
    }
    let (passed, failed) = summary(&results);
    println!(
        "nccl_selftest rank {} of {}: {passed} passed, {failed} failed",
        comm.rank(),
        comm.size()
    );
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn main() -> ExitCode {
    if let NcclAvailability::Skipped(why) = availability() {
        println!("nccl_selftest: {why}");
        return ExitCode::SUCCESS;
    }
    let under_mpirun = std::env::var_os("OMPI_COMM_WORLD_SIZE").is_some()
        || std::env::var_os("PMI_SIZE").is_some();
    if !under_mpirun {
        let out = collectives::threads::spawn_world(1, |boot| match NcclComm::select(&*boot) {
            Ok(Some(c)) => report(&c),
            Ok(None) => {
                println!("nccl_selftest: skipped: no CUDA device");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("nccl_selftest: {e}");
                ExitCode::FAILURE
            }
        });
        return out
            .into_iter()
            .next()
            .and_then(|r| r.ok())
            .unwrap_or(ExitCode::FAILURE);
    }
    let world = match MpiWorld::init() {
        Ok(w) => w,
        Err(e) => {
            eprintln!("nccl_selftest: {e}");
            return ExitCode::FAILURE;
        }
    };
    let code = {
        let boot = world.world();
        match NcclComm::select(&*boot) {
            Ok(Some(c)) => report(&c),
            Ok(None) => {
                println!("nccl_selftest: skipped: no CUDA device on some rank");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("nccl_selftest: {e}");
                ExitCode::FAILURE
            }
        }
    };
    drop(world);
    code
}
