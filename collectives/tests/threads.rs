//! Threads backend: the shared selftest at world sizes 1..=8 plus the failure modes that only
//! an in-process backend can provoke deterministically (timeouts, dropped and panicking ranks).

use collectives::selftest::{run_all, summary};
use collectives::threads::{spawn_world, spawn_world_with_timeout, ThreadComm};
use collectives::{mesh_dim_comm, CommError, Communicator, CommunicatorExt, ReduceOp};
use placement::DeviceMesh;
use proptest::prelude::*;
use std::time::{Duration, Instant};

const SHORT: Duration = Duration::from_secs(10);

#[test]
fn thread_comm_is_send() {
    fn assert_send<T: Send>() {}
    assert_send::<ThreadComm>();
}

#[test]
fn selftest_passes_at_world_sizes_1_to_8() {
    for n in 1..=8 {
        let results = spawn_world_with_timeout(n, SHORT, |c| run_all(&*c));
        for (rank, r) in results.into_iter().enumerate() {
            let checks = r.unwrap_or_else(|_| panic!("rank {rank} of {n} panicked"));
            // 13 checks + 11 autograd checks always, 6 error-path/desync checks from 2 ranks on
            assert_eq!(checks.len(), if n == 1 { 24 } else { 30 });
            let failures: Vec<String> = checks
                .iter()
                .filter_map(|(name, r)| r.as_ref().err().map(|e| format!("{name}: {e}")))
                .collect();
            assert!(failures.is_empty(), "world {n} rank {rank}: {failures:#?}");
            assert_eq!(summary(&checks), (checks.len(), 0));
        }
    }
}

#[test]
fn mesh_dim_comms_of_2x2_and_2x3() {
    for shape in [vec![2, 2], vec![2, 3]] {
        let mesh = DeviceMesh::new(shape.clone()).unwrap();
        let results = spawn_world_with_timeout(mesh.size(), SHORT, |c| {
            (0..mesh.ndim())
                .map(|d| {
                    let sub = mesh_dim_comm(&*c, &mesh, d).unwrap();
                    let mut x = [c.rank() as f64];
                    sub.all_reduce(&mut x, ReduceOp::Sum).unwrap();
                    (sub.rank(), sub.size(), x[0])
                })
                .collect::<Vec<_>>()
        });
        for (rank, r) in results.into_iter().enumerate() {
            let per_dim = r.unwrap();
            let coord = mesh.coordinate(rank).unwrap();
            for (d, (sub_rank, sub_size, sum)) in per_dim.into_iter().enumerate() {
                let group = mesh
                    .dim_groups(d)
                    .unwrap()
                    .into_iter()
                    .find(|g| g.contains(&rank))
                    .unwrap();
                assert_eq!(
                    (sub_rank, sub_size),
                    (coord[d], shape[d]),
                    "{shape:?} dim {d}"
                );
                assert_eq!(sum, group.iter().sum::<usize>() as f64, "{shape:?} dim {d}");
            }
        }
    }
}

#[test]
fn mesh_size_mismatch_is_an_error() {
    let mesh = DeviceMesh::new(vec![2, 2]).unwrap();
    let results = spawn_world_with_timeout(3, SHORT, |c| mesh_dim_comm(&*c, &mesh, 0).err());
    for r in results {
        assert!(matches!(r.unwrap(), Some(CommError::Mesh(_))));
    }
}

#[test]
fn nested_split() {
    // world 6 -> parity groups {0,2,4}, {1,3,5} -> split again by (old rank < 3)
    let results = spawn_world_with_timeout(6, SHORT, |c| {
        let me = c.rank();
        let a = c.split(me % 2, me).unwrap();
        let b = a.split(usize::from(me < 3), 0).unwrap();
        b.all_gather(&[me as u8], &vec![1; b.size()]).unwrap()
    });
    let want = [
        vec![0, 2],
        vec![1],
        vec![0, 2],
        vec![3, 5],
        vec![4],
        vec![3, 5],
    ];
    for (rank, r) in results.into_iter().enumerate() {
        assert_eq!(r.unwrap(), want[rank], "rank {rank}");
    }
}

#[test]
fn mismatched_ops_fail_on_every_rank_without_hanging() {
    let start = Instant::now();
    let results = spawn_world_with_timeout(3, Duration::from_secs(30), |c| {
        let r = if c.rank() == 0 {
            let mut x = [1.0f32];
            c.all_reduce(&mut x, ReduceOp::Sum).map(|_| ())
        } else {
            c.all_gather(&[1.0f32], &[1, 1, 1]).map(|_| ())
        };
        let after = c.barrier();
        (r, after)
    });
    assert!(start.elapsed() < Duration::from_secs(5));
    for r in results {
        let (r, after) = r.unwrap();
        let err = r.unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, CommError::Mismatch { seq: 0, .. }), "{msg}");
        assert!(
            msg.contains("rank 0: all_reduce(dtype=F32, count=1, op=Sum)")
                && msg.contains("rank 2: all_gather(dtype=F32, counts=[1, 1, 1])"),
            "{msg}"
        );
        assert_eq!(after, Ok(()), "communicator stays usable");
    }
}

#[test]
fn count_errors_are_reported_on_every_rank() {
    let results = spawn_world_with_timeout(2, SHORT, |c| {
        let me = c.rank();
        // counts list of the wrong length on rank 1
        let counts: &[usize] = if me == 1 { &[1, 1, 1] } else { &[1, 1] };
        let e1 = c.all_gather(&[0f32], counts).unwrap_err();
        // reduce_scatter send buffer shorter than sum(counts) on rank 0
        let send = vec![0f64; if me == 0 { 2 } else { 3 }];
        let e2 = c.reduce_scatter(&send, &[1, 2], ReduceOp::Sum).unwrap_err();
        // all_to_all: rank 0 sends 2 to rank 1, rank 1 expects 1
        let (sc, rc) = if me == 0 {
            ([0, 2], [0, 0])
        } else {
            ([0, 0], [1, 0])
        };
        let e3 = c
            .all_to_all(&vec![1u8; sc.iter().sum()], &sc, &rc)
            .unwrap_err();
        // broadcast buffers of different lengths
        let mut buf = vec![0u8; me + 1];
        let e4 = c.broadcast(&mut buf, 0).unwrap_err();
        // raw buffer that is not a whole number of elements
        let mut raw = [0u8; 3];
        let e5 = c
            .all_reduce_raw(&mut raw, collectives::DType::F32, ReduceOp::Sum)
            .unwrap_err();
        (e1, e2, e3, e4, e5)
    });
    for r in results {
        let (e1, e2, e3, e4, e5) = r.unwrap();
        assert!(
            matches!(&e1, CommError::InvalidArgument { op: "all_gather", rank: 1, reason } if reason.contains("3 entries")),
            "{e1}"
        );
        assert!(
            matches!(
                &e2,
                CommError::InvalidArgument {
                    op: "reduce_scatter",
                    rank: 0,
                    ..
                }
            ),
            "{e2}"
        );
        assert_eq!(
            e3,
            CommError::CountMismatch {
                seq: 2,
                sender: 0,
                receiver: 1,
                sent: 2,
                expected: 1
            }
        );
        assert!(
            matches!(
                e4,
                CommError::Mismatch {
                    op: "broadcast",
                    ..
                }
            ),
            "{e4}"
        );
        assert!(
            matches!(
                e5,
                CommError::InvalidArgument {
                    op: "all_reduce",
                    ..
                }
            ),
            "{e5}"
        );
    }
}

#[test]
fn dropped_rank_fails_the_others_promptly() {
    let start = Instant::now();
    let results = spawn_world_with_timeout(3, Duration::from_secs(60), |c| {
        if c.rank() == 2 {
            return None; // drops its communicator without calling the collective
        }
        let mut x = [1.0f32];
        Some(c.all_reduce(&mut x, ReduceOp::Sum))
    });
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "took {:?}",
        start.elapsed()
    );
    for r in results.into_iter().take(2) {
        let err = r.unwrap().unwrap().unwrap_err();
        assert!(
            matches!(&err, CommError::PeerGone { op: "all_reduce", ranks, .. } if ranks == &[2])
                || matches!(&err, CommError::Poisoned { .. }),
            "{err}"
        );
    }
}

#[test]
fn panicking_rank_fails_the_others_promptly() {
    let start = Instant::now();
    let results = spawn_world_with_timeout(2, Duration::from_secs(60), |c| {
        if c.rank() == 1 {
            panic!("rank 1 fails on purpose");
        }
        c.barrier()
    });
    assert!(start.elapsed() < Duration::from_secs(5));
    assert!(results[1].is_err(), "rank 1 panicked");
    let r0 = results[0].as_ref().unwrap();
    assert!(
        matches!(r0, Err(CommError::PeerGone { ranks, .. }) if ranks == &[1]),
        "{r0:?}"
    );
}

#[test]
fn timeout_names_op_sequence_and_missing_ranks() {
    let results = spawn_world_with_timeout(3, Duration::from_millis(200), |c| {
        c.barrier().unwrap(); // collective #0 succeeds
        if c.rank() == 1 {
            std::thread::sleep(Duration::from_millis(1500));
        }
        let start = Instant::now();
        let r = c.all_gather(&[c.rank() as u8], &[1, 1, 1]);
        (r, start.elapsed())
    });
    for (rank, r) in results.into_iter().enumerate() {
        let (r, waited) = r.unwrap();
        let err = r.unwrap_err();
        if rank == 1 {
            // arrives after the others gave up: poisoned (or its peers are gone)
            assert!(
                matches!(err, CommError::Poisoned { .. } | CommError::PeerGone { .. }),
                "{err}"
            );
        } else {
            assert!(waited < Duration::from_secs(1), "{waited:?}");
            // the first rank to time out reports Timeout; the other may see the poison first
            match &err {
                CommError::Timeout {
                    op, seq, missing, ..
                } => {
                    assert_eq!((*op, *seq, missing.as_slice()), ("all_gather", 1, &[1][..]));
                    assert!(err.to_string().contains("ranks [1] did not arrive"));
                }
                CommError::Poisoned { reason, .. } => {
                    assert!(reason.contains("ranks [1] did not arrive"), "{reason}")
                }
                other => panic!("unexpected {other}"),
            }
        }
    }
}

#[test]
fn spawn_world_uses_default_timeout_and_rank_order() {
    let out = spawn_world(4, |c| (c.rank(), c.size(), c.backend()));
    for (r, o) in out.into_iter().enumerate() {
        assert_eq!(o.unwrap(), (r, 4, "threads"));
    }
}

/// Naive all_to_all: rank i's block for rank j is `[i * 100 + j; counts[i][j]]`.
fn a2a_case(counts: Vec<Vec<usize>>) {
    let n = counts.len();
    let results = spawn_world_with_timeout(n, SHORT, |c| {
        let me = c.rank();
        let send: Vec<f32> = (0..n)
            .flat_map(|j| vec![(me * 100 + j) as f32; counts[me][j]])
            .collect();
        let recv_counts: Vec<usize> = (0..n).map(|i| counts[i][me]).collect();
        let got = c.all_to_all(&send, &counts[me], &recv_counts).unwrap();
        // reduce_scatter with counts row 0 (uneven, zeros allowed) of a ramp
        let rs_counts = &counts[0];
        let total: usize = rs_counts.iter().sum();
        let ramp: Vec<f64> = (0..total).map(|k| (k * (me + 1)) as f64).collect();
        let rs = c.reduce_scatter(&ramp, rs_counts, ReduceOp::Sum).unwrap();
        (got, rs)
    });
    for (me, r) in results.into_iter().enumerate() {
        let (got, rs) = r.unwrap();
        let want: Vec<f32> = (0..n)
            .flat_map(|i| vec![(i * 100 + me) as f32; counts[i][me]])
            .collect();
        assert_eq!(got, want);
        let start: usize = counts[0][..me].iter().sum();
        let tri = (n * (n + 1) / 2) as f64;
        let want_rs: Vec<f64> = (start..start + counts[0][me])
            .map(|k| k as f64 * tri)
            .collect();
        assert_eq!(rs, want_rs);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]
    #[test]
    fn all_to_all_and_reduce_scatter_random_counts(
        counts in (1usize..=5).prop_flat_map(|n| prop::collection::vec(prop::collection::vec(0usize..4, n), n))
    ) {
        a2a_case(counts);
    }
}

/// The traffic meter counts the bytes each rank copies from its peers, worked out by hand for
/// each collective on 3 ranks with f32 (4 bytes) buffers, and keeps counting through a split.
#[test]
fn traffic_meter_counts_each_collective() {
    let run = |f: &(dyn Fn(&dyn Communicator) + Sync)| -> Vec<(u64, u64)> {
        let comms = ThreadComm::new_world(3, Duration::from_secs(30));
        let meters: Vec<_> = comms.iter().map(ThreadComm::traffic).collect();
        std::thread::scope(|s| {
            for c in comms {
                s.spawn(move || f(&c));
            }
        });
        meters
            .iter()
            .map(|m| (m.sent_bytes(), m.received_bytes()))
            .collect()
    };
    // broadcast of 5 f32 from root 1: the root sends 20 bytes to each of 2 peers.
    let got = run(&|c| {
        let mut b = vec![1.0f32; 5];
        c.broadcast(&mut b, 1).unwrap();
    });
    assert_eq!(got, vec![(0, 20), (40, 0), (0, 20)]);
    // all_gather of rank r's r+1 elements: rank r sends 4(r+1) bytes to 2 peers and receives
    // the others' 4 * (6 - (r+1)) bytes.
    let got = run(&|c| {
        let send = vec![0.0f32; c.rank() + 1];
        c.all_gather(&send, &[1, 2, 3]).unwrap();
    });
    assert_eq!(got, vec![(8, 20), (16, 16), (24, 12)]);
    // reduce_scatter with blocks [1, 2, 3]: rank r receives its block from 2 peers and sends
    // the others' blocks.
    let got = run(&|c| {
        c.reduce_scatter(&[0.0f32; 6], &[1, 2, 3], ReduceOp::Sum)
            .unwrap();
    });
    assert_eq!(got, vec![(20, 8), (16, 16), (12, 24)]);
    // all_reduce of 4 f32 in blocks [2, 1, 1]: rank 0 receives its 2 from 2 peers and sends
    // them 1 + 1 (reduce-scatter), then receives 1 + 1 and sends its 2 to 2 peers (all-gather):
    // 6 elements each way; ranks 1 and 2 move 2 + 3 = 5.
    let got = run(&|c| {
        c.all_reduce(&mut [0.0f32; 4], ReduceOp::Sum).unwrap();
    });
    assert_eq!(got, vec![(24, 24), (20, 20), (20, 20)]);
    // all_to_all: rank r sends q+1 elements to rank q and receives r+1 from each of 2 peers
    // (its own block is not counted).
    let got = run(&|c| {
        let r = c.rank();
        let recv = vec![r + 1; 3];
        c.all_to_all(&[0.0f32; 6], &[1, 2, 3], &recv).unwrap();
    });
    assert_eq!(got, vec![(20, 8), (16, 16), (12, 24)]);
    // A split's traffic lands on the parent's meter: all_gather of 1 f32 in {0, 2}.
    let got = run(&|c| {
        let sub = c.split(c.rank() % 2, c.rank()).unwrap();
        sub.all_gather(&[0.0f32], &vec![1; sub.size()]).unwrap();
    });
    assert_eq!(got, vec![(4, 4), (0, 0), (4, 4)]);
}
