//! NCCL backend (feature `nccl`): with a CUDA device, the whole selftest (collectives, autograd
//! adjoint and rank-valued checks, error paths) at world size 1, bootstrapped over the threads
//! backend; without one, the test reports "skipped: no CUDA device" and passes (the code is
//! still compiled and its availability probe exercised, which must not panic).
#![cfg(feature = "nccl")]

use collectives::nccl::{availability, NcclAvailability, NcclComm};
use collectives::selftest::run_all;
use collectives::threads::spawn_world;

#[test]
fn nccl_world_size_1_selftest_or_skipped() {
    match availability() {
        NcclAvailability::Skipped(why) => {
            assert!(why.starts_with("skipped:"), "{why}");
            println!("nccl_world_size_1_selftest: {why}");
        }
        NcclAvailability::Available { devices } => {
            assert!(devices >= 1);
            let out = spawn_world(1, |boot| {
                let comm = NcclComm::select(&*boot)
                    .expect("NcclComm::select")
                    .expect("a device is available");
                run_all(&comm)
            });
            let checks = out.into_iter().next().unwrap().unwrap();
            let failures: Vec<String> = checks
                .iter()
                .filter_map(|(n, r)| r.as_ref().err().map(|e| format!("{n}: {e}")))
                .collect();
            assert!(failures.is_empty(), "{failures:#?}");
        }
    }
}

#[test]
fn select_without_device_falls_back_on_every_rank() {
    if matches!(availability(), NcclAvailability::Available { .. }) {
        return; // covered by the selftest above
    }
    let out = spawn_world(2, |boot| NcclComm::select(&*boot).map(|c| c.is_none()));
    for r in out {
        assert_eq!(r.unwrap(), Ok(true));
    }
}
