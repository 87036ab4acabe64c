//! Autograd collectives under the threads backend: a rank that dies (panics) or skips the op,
//! and a desynced backward, end with an error naming the collective on every other rank,
//! in bounded time (well under the 60 s timeout), never a hang.

use collectives::autograd::{
    AllToAllV, AutogradError, CollectiveFunction, LocalTensor, Redistribute, SpAllGather,
    SpReduceScatter,
};
use collectives::threads::spawn_world_with_timeout;
use collectives::{CommError, Communicator};
use placement::{DeviceMesh, Placement};
use std::time::{Duration, Instant};

const LONG: Duration = Duration::from_secs(60);

fn ones(shape: &[usize]) -> LocalTensor<f64> {
    LocalTensor::new(shape.to_vec(), vec![1.0; shape.iter().product()]).unwrap()
}

#[test]
fn rank_killed_before_sp_all_gather_fails_the_others_promptly() {
    let start = Instant::now();
    let results = spawn_world_with_timeout(4, LONG, |c| {
        if c.rank() == 3 {
            panic!("rank 3 dies on purpose");
        }
        let op = SpAllGather {
            dim: 0,
            sizes: vec![2, 1, 0, 1],
        };
        op.forward(&*c, &ones(&[op.sizes[c.rank()], 3]))
    });
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "{:?}",
        start.elapsed()
    );
    assert!(results[3].is_err(), "rank 3 panicked");
    for r in results.into_iter().take(3) {
        let err = r.unwrap().unwrap_err();
        // The first rank to notice gets PeerGone; the others may see the communicator
        // poisoned by it, with the same cause in the message.
        let ok = match &err {
            AutogradError::Comm(CommError::PeerGone { op, ranks, .. }) => {
                *op == "all_gather" && ranks == &[3]
            }
            AutogradError::Comm(CommError::Poisoned { op, reason }) => {
                *op == "all_gather"
                    && reason.contains("all_gather (collective #0)")
                    && reason.contains("ranks [3] dropped")
            }
            _ => false,
        };
        assert!(ok, "{err}");
    }
}

#[test]
fn rank_skipping_backward_is_a_mismatch_on_every_rank() {
    // Rank 1 skips SpReduceScatter::backward (an all_gather) and goes on to the EP all_to_all:
    // every rank gets Mismatch listing each rank's call.
    let start = Instant::now();
    let results = spawn_world_with_timeout(2, LONG, |c| {
        let rs = SpReduceScatter {
            dim: 0,
            sizes: vec![1, 2],
        };
        let a2a = AllToAllV {
            send_splits: vec![1, 1],
            recv_splits: vec![1, 1],
        };
        if c.rank() == 1 {
            a2a.forward(&*c, &ones(&[2, 3])).map(drop)
        } else {
            rs.backward(&*c, &ones(&[1, 3])).map(drop)
        }
    });
    assert!(start.elapsed() < Duration::from_secs(5));
    for r in results {
        let err = r.unwrap().unwrap_err();
        let msg = err.to_string();
        assert!(
            matches!(err, AutogradError::Comm(CommError::Mismatch { seq: 0, .. }))
                && msg.contains("rank 0: all_gather")
                && msg.contains("rank 1: all_to_all"),
            "{msg}"
        );
    }
}

#[test]
fn stalled_rank_times_out_naming_the_collective() {
    let results = spawn_world_with_timeout(2, Duration::from_millis(300), |c| {
        if c.rank() == 1 {
            std::thread::sleep(Duration::from_millis(1500));
            return None;
        }
        let start = Instant::now();
        let op = SpAllGather {
            dim: 0,
            sizes: vec![1, 1],
        };
        Some((op.forward(&*c, &ones(&[1, 2])), start.elapsed()))
    });
    let (r0, waited) = results[0].as_ref().unwrap().as_ref().unwrap();
    assert!(*waited < Duration::from_secs(1), "{waited:?}");
    let err = r0.as_ref().unwrap_err();
    assert!(
        matches!(err, AutogradError::Comm(CommError::Timeout { op: "all_gather", seq: 0, missing, .. }) if missing == &[1]),
        "{err}"
    );
}

/// Redistribute's S(0) -> S(1) all-to-all on 2 ranks of a [4, 4] tensor, given local tensors
/// of the wrong size along one dim: a `Shape` error naming the shape on every rank (both ranks
/// are wrong), in bounded time, never a hang.
#[test]
fn all_to_all_step_with_a_wrong_local_shape_is_a_shape_error_on_every_rank() {
    let mesh = DeviceMesh::new(vec![2]).unwrap();
    let r = Redistribute::new(
        &[4, 4],
        &mesh,
        &[Placement::Shard(0)],
        &[Placement::Shard(1)],
    )
    .unwrap();
    // [3, 4]: dim 0 (the shard dim) wrong; [2, 5]: dim 1 (the full dim) wrong.
    for bad in [[3usize, 4], [2, 5]] {
        let start = Instant::now();
        let results =
            spawn_world_with_timeout(2, LONG, |comm| r.forward(comm.as_ref(), &ones(&bad)));
        for (rank, res) in results.into_iter().enumerate() {
            match res.unwrap() {
                Err(AutogradError::Shape { reason, .. }) => {
                    assert!(
                        reason.contains(&format!("{bad:?}")),
                        "rank {rank}: {reason}"
                    )
                }
                other => panic!("rank {rank}, shape {bad:?}: {other:?}"),
            }
        }
        assert!(start.elapsed() < Duration::from_secs(10));
    }
}
