//! The bytes a redistribution moves, counted by the threads backend's [`TrafficMeter`] while
//! `collectives::Redistribute` runs the plan on real data, held against
//! `placement::traffic::plan_traffic` (PyTorch's volumes: all-gather, reduce-scatter and
//! all-to-all of padded chunks, the ring volume of an all-reduce).
//!
//! Random plans of every collective on 1-D to 3-D meshes of at most 8 ranks. Where every chunk
//! is even the counted bytes of every rank equal the plan's exactly; where chunks are uneven
//! this executor sends the chunks unpadded, so it moves at most the plan's (padded) bytes.
//!
//! [`TrafficMeter`]: collectives::threads::TrafficMeter

use collectives::autograd::Redistribute;
use collectives::threads::{default_timeout, ThreadComm};
use collectives::Communicator;
use placement::redistribute::Collective;
use placement::traffic::{alternative_traffic, plan_traffic, StepTraffic};
use placement::{local_data, local_shard, DeviceMesh, PartialOp, Placement};
use proptest::prelude::*;

mod common;

use common::{case_with, input};

/// `even` picks dim sizes that every product of at most 8 mesh sizes from {1, 2, 3} divides
/// (multiples of 24), else sizes 0..=7.
fn case(even: bool) -> impl Strategy<Value = common::Case> {
    case_with(if even {
        prop_oneof![Just(24usize), Just(48usize)].boxed()
    } else {
        (0usize..=7).boxed()
    })
}

/// Cases whose steps tend to merge: one placement (`S(d)` or `P(sum)`) on most mesh dims of a
/// 2-D or 3-D mesh, to `R` or one `S(d')` on most mesh dims; dims as in [`case`].
fn merge_case(even: bool) -> impl Strategy<Value = common::Case> {
    let dim = if even {
        prop_oneof![Just(24usize), Just(48usize)].boxed()
    } else {
        (0usize..=7).boxed()
    };
    (1usize..=3, 2usize..=3).prop_flat_map(move |(ndim, mdim)| {
        let hot_src = prop_oneof![
            (0..ndim).prop_map(Placement::Shard),
            Just(Placement::Partial(PartialOp::Sum))
        ];
        let hot_dst = prop_oneof![
            Just(Placement::Replicate),
            (0..ndim).prop_map(Placement::Shard)
        ];
        (
            prop::collection::vec(dim.clone(), ndim),
            prop::collection::vec(1usize..=3, mdim)
                .prop_filter("at most 8 ranks", |m| m.iter().product::<usize>() <= 8),
            hot_src,
            hot_dst,
            prop::collection::vec((common::source(ndim), prop::bool::weighted(0.15)), mdim),
            prop::collection::vec((common::target(ndim), prop::bool::weighted(0.15)), mdim),
        )
            .prop_map(|(shape, mesh, hs, hd, src, dst)| {
                let pick = |hot: Placement, v: Vec<(Placement, bool)>| -> Vec<Placement> {
                    v.into_iter()
                        .map(|(p, keep)| if keep { p } else { hot })
                        .collect()
                };
                (shape, mesh, pick(hs, src), pick(hd, dst))
            })
    })
}

/// Runs the plan forward on a threads world; returns each rank's (sent, received) bytes as
/// counted by the backend, after checking each rank's output against the direct slice.
fn counted(
    shape: &[usize],
    mesh: &DeviceMesh,
    src: &[Placement],
    dst: &[Placement],
    r: &Redistribute,
) -> Vec<(u64, u64)> {
    let n: usize = shape.iter().product();
    let full: Vec<f64> = (0..n).map(|i| i as f64).collect();
    let comms = ThreadComm::new_world(mesh.size(), default_timeout());
    let meters: Vec<_> = comms.iter().map(ThreadComm::traffic).collect();
    let outs: Vec<Vec<f64>> = std::thread::scope(|s| {
        let handles: Vec<_> = comms
            .into_iter()
            .map(|c| {
                let full = &full;
                s.spawn(move || {
                    let coord = mesh.coordinate(c.rank()).unwrap();
                    let x = input(full, shape, mesh, src, &coord);
                    r.forward(&c, &x).unwrap().into_data()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (rank, got) in outs.iter().enumerate() {
        let coord = mesh.coordinate(rank).unwrap();
        let want = local_data(
            &full,
            shape,
            &local_shard(shape, mesh, dst, &coord).unwrap(),
        );
        assert_eq!(got, &want.unwrap(), "rank {rank}: data");
    }
    meters
        .iter()
        .map(|m| (m.sent_bytes(), m.received_bytes()))
        .collect()
}

/// (sent, received) bytes per rank of a table of per-step traffic, summed over the steps.
fn summed(t: &[Vec<StepTraffic>], ranks: usize) -> Vec<(u64, u64)> {
    let mut sum = vec![(0u64, 0u64); ranks];
    for step in t {
        for (rank, s) in step.iter().enumerate() {
            sum[rank].0 += s.send_bytes as u64;
            sum[rank].1 += s.recv_bytes as u64;
        }
    }
    sum
}

/// The plan's (sent, received) bytes per rank, summed over its steps.
fn planned(r: &Redistribute, mesh: &DeviceMesh) -> Vec<(u64, u64)> {
    let t = plan_traffic(r.plan(), mesh, std::mem::size_of::<f64>()).unwrap();
    summed(&t, mesh.size())
}

/// The cheaper alternative's (sent, received) bytes per rank, summed over its merged steps.
fn alt_planned(r: &Redistribute, mesh: &DeviceMesh) -> Vec<(u64, u64)> {
    let alt = r.plan().alternative.as_ref().unwrap();
    let t = alternative_traffic(r.plan(), alt, mesh, std::mem::size_of::<f64>()).unwrap();
    summed(&t, mesh.size())
}

/// Whether every rank's (sent, received) in `a` is at most that in `b`.
fn at_most(a: &[(u64, u64)], b: &[(u64, u64)]) -> bool {
    a.iter().zip(b).all(|(x, y)| x.0 <= y.0 && x.1 <= y.1)
}

/// Runs the cheaper alternative of `r` (when the plan has one) and checks: the output is the
/// direct slice; the counted bytes equal the alternative's planned bytes (`even`) or are at
/// most them; on every rank the alternative's planned and counted bytes are at most the
/// default plan's; it launches fewer collectives.
fn check_cheaper(
    shape: &[usize],
    mesh: &DeviceMesh,
    src: &[Placement],
    dst: &[Placement],
    r: &Redistribute,
    even: bool,
) -> Result<(), TestCaseError> {
    prop_assert_eq!(r.cheaper().is_some(), r.plan().alternative.is_some());
    let Some(c) = r.cheaper() else {
        return Ok(());
    };
    prop_assert!(c.groups().len() < r.groups().len());
    let (alt_plan, default_plan) = (alt_planned(r, mesh), planned(r, mesh));
    let got = counted(shape, mesh, src, dst, &c);
    let default_counted = counted(shape, mesh, src, dst, r);
    if even {
        prop_assert_eq!(&got, &alt_plan);
    } else {
        prop_assert!(
            at_most(&got, &alt_plan),
            "counted {:?}, planned {:?}",
            got,
            alt_plan
        );
    }
    prop_assert!(
        at_most(&alt_plan, &default_plan),
        "{:?} vs default {:?}",
        alt_plan,
        default_plan
    );
    prop_assert!(
        at_most(&got, &default_counted),
        "{:?} vs default {:?}",
        got,
        default_counted
    );
    Ok(())
}

/// Runs PyTorch's plan of `src -> dst` (when the executor takes it) and holds every rank's
/// counted bytes to `plan_traffic`: equal (`even`) or at most; then its cheaper alternative
/// ([`check_cheaper`]).
fn check_plan(
    shape: &[usize],
    mesh_shape: Vec<usize>,
    src: &[Placement],
    dst: &[Placement],
    even: bool,
) -> Result<(), TestCaseError> {
    let mesh = DeviceMesh::new(mesh_shape).unwrap();
    let Ok(r) = Redistribute::new(shape, &mesh, src, dst) else {
        return Ok(());
    };
    let want = planned(&r, &mesh);
    let got = counted(shape, &mesh, src, dst, &r);
    if even {
        prop_assert_eq!(&got, &want, "{:?} {:?} -> {:?}", shape, src, dst);
    } else {
        prop_assert!(
            at_most(&got, &want),
            "counted {:?}, planned {:?}",
            got,
            want
        );
    }
    check_cheaper(shape, &mesh, src, dst, &r, even)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn even_chunks_move_exactly_the_planned_bytes((shape, mesh_shape, src, dst) in case(true)) {
        check_plan(&shape, mesh_shape, &src, &dst, true)?;
    }

    #[test]
    fn uneven_chunks_move_at_most_the_planned_bytes((shape, mesh_shape, src, dst) in case(false)) {
        check_plan(&shape, mesh_shape, &src, &dst, false)?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn merged_steps_move_no_more_than_the_default(
        (shape, mesh_shape, src, dst) in merge_case(true),
        (ushape, umesh_shape, usrc, udst) in merge_case(false),
    ) {
        for (shape, mesh_shape, src, dst, even) in
            [(shape, mesh_shape, src, dst, true), (ushape, umesh_shape, usrc, udst, false)]
        {
            let mesh = DeviceMesh::new(mesh_shape).unwrap();
            if let Ok(r) = Redistribute::new(&shape, &mesh, &src, &dst) {
                check_cheaper(&shape, &mesh, &src, &dst, &r, even)?;
            }
        }
    }
}

/// Hand case, worked out: 6 rows of 4 f64 on 3 ranks, S(0) -> R. Each rank holds 2 rows (64
/// bytes), sends them to 2 peers and receives 2 peers' rows: 128 bytes each way.
#[test]
fn all_gather_hand_case() {
    let mesh = DeviceMesh::new(vec![3]).unwrap();
    let (src, dst) = (vec![Placement::Shard(0)], vec![Placement::Replicate]);
    let r = Redistribute::new(&[6, 4], &mesh, &src, &dst).unwrap();
    assert_eq!(counted(&[6, 4], &mesh, &src, &dst, &r), vec![(128, 128); 3]);
    assert_eq!(planned(&r, &mesh), vec![(128, 128); 3]);
}

/// Hand case: P(sum) -> R of 5 f64 on 2 ranks, blocks [3, 2]: rank 0 receives its 3 and sends
/// 2, then receives 2 and sends 3 (5 elements, 40 bytes, each way); rank 1 the same.
#[test]
fn all_reduce_hand_case() {
    let mesh = DeviceMesh::new(vec![2]).unwrap();
    let (src, dst) = (
        vec![Placement::Partial(PartialOp::Sum)],
        vec![Placement::Replicate],
    );
    let r = Redistribute::new(&[5], &mesh, &src, &dst).unwrap();
    assert_eq!(counted(&[5], &mesh, &src, &dst, &r), vec![(40, 40); 2]);
    assert_eq!(planned(&r, &mesh), vec![(40, 40); 2]);
}

/// Hand case: 6 x 6 f64 on 3 ranks, S(0) -> S(1). Each rank holds 2 x 6 and keeps a 2 x 2
/// block; it sends a 2 x 2 block (32 bytes) to each of 2 peers and receives as much.
#[test]
fn all_to_all_hand_case() {
    let mesh = DeviceMesh::new(vec![3]).unwrap();
    let (src, dst) = (vec![Placement::Shard(0)], vec![Placement::Shard(1)]);
    let r = Redistribute::new(&[6, 6], &mesh, &src, &dst).unwrap();
    assert_eq!(r.plan().steps[0].collective, Collective::AllToAll);
    assert_eq!(counted(&[6, 6], &mesh, &src, &dst, &r), vec![(64, 64); 3]);
    assert_eq!(planned(&r, &mesh), vec![(64, 64); 3]);
}
