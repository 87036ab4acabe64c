//! Property tests of redistribution plans against an independent element-level model: each
//! rank's set of held global elements (enumerated one by one from the chunk rule, no index-set
//! algebra). A step may only use data of the ranks in its mesh-dim group (or the rank's own data
//! for local steps), and the plan must end at the target placements.

use std::collections::BTreeSet;

use placement::redistribute::{plan_redistribute, Collective};
use placement::traffic::plan_traffic;
use placement::{local_data, local_shard, local_shard_for_rank, DeviceMesh, Placement};
use proptest::prelude::*;

/// Naive chunk: elements of 0..n that rank r of k holds (torch.chunk).
fn naive_chunk(held: &[usize], k: usize, r: usize) -> Vec<usize> {
    let c = held.len().div_ceil(k);
    if c == 0 {
        return vec![];
    }
    held.chunks(c)
        .nth(r)
        .map(<[usize]>::to_vec)
        .unwrap_or_default()
}

/// Global elements (as multi-indices) a rank holds under S/R/P placements.
fn held(
    global: &[usize],
    mesh: &[usize],
    p: &[Placement],
    coord: &[usize],
) -> BTreeSet<Vec<usize>> {
    let mut dims: Vec<Vec<usize>> = global.iter().map(|&n| (0..n).collect()).collect();
    for (m, q) in p.iter().enumerate() {
        if let Placement::Shard(d) = q {
            dims[*d] = naive_chunk(&dims[*d], mesh[m], coord[m]);
        }
    }
    let mut out = BTreeSet::new();
    let mut cur = vec![];
    fn rec(dims: &[Vec<usize>], cur: &mut Vec<usize>, out: &mut BTreeSet<Vec<usize>>) {
        if cur.len() == dims.len() {
            out.insert(cur.clone());
            return;
        }
        for &i in &dims[cur.len()] {
            cur.push(i);
            rec(dims, cur, out);
            cur.pop();
        }
    }
    rec(&dims, &mut cur, &mut out);
    out
}

fn arb_case() -> impl Strategy<Value = (Vec<usize>, Vec<usize>, Vec<Placement>, Vec<Placement>)> {
    let meshes = vec![
        vec![2],
        vec![3],
        vec![4],
        vec![2, 2],
        vec![3, 2],
        vec![1, 2],
        vec![2, 2, 2],
        vec![2, 1, 3],
    ];
    (prop::sample::select(meshes), 1usize..=3).prop_flat_map(|(mesh, ndim)| {
        let n = mesh.len();
        let place = prop_oneof![
            3 => (0..ndim).prop_map(Placement::Shard),
            2 => Just(Placement::Replicate),
            1 => Just(Placement::Partial(placement::PartialOp::Sum)),
        ];
        (
            Just(mesh),
            prop::collection::vec(0usize..7, ndim),
            prop::collection::vec(place.clone(), n),
            prop::collection::vec(place, n),
        )
    })
}

proptest! {
    #[test]
    fn plan_moves_data_only_within_groups((mesh_shape, global, src, dst0) in arb_case()) {
        // Targets the public API accepts: P only from the same P or from S (as P(sum)).
        let dst: Vec<Placement> = dst0.iter().zip(&src).map(|(d, s)| {
            if d.is_partial() && d != s && !matches!(s, Placement::Shard(_)) { Placement::Replicate } else { *d }
        }).collect();
        let mesh = DeviceMesh::new(mesh_shape.clone()).unwrap();
        let plan = plan_redistribute(&global, &mesh, &src, &dst).unwrap();
        let mut state = src.clone();
        for step in &plan.steps {
            prop_assert_eq!(&step.before, &state);
            prop_assert_ne!(step.src, step.dst);
            prop_assert_eq!(state[step.mesh_dim], step.src);
            let mut next = state.clone();
            next[step.mesh_dim] = step.dst;
            let k = mesh_shape[step.mesh_dim];
            if k == 1 { prop_assert_eq!(step.collective, Collective::Noop); }
            // S(d) -> P(sum) is a local zero-fill: the new term needs only the rank's own shard.
            let check = !step.dst.is_partial();
            for rank in (0..mesh.size()).filter(|_| check) {
                let c = mesh.coordinate(rank).unwrap();
                let after = held(&global, &mesh_shape, &next, &c);
                // Elements reachable: own data for a local step, the group's for a collective.
                let mut reach = BTreeSet::new();
                let group: Vec<usize> = if step.collective.comm_name().is_some() { (0..k).collect() } else { vec![c[step.mesh_dim]] };
                for g in group {
                    let mut cc = c.clone();
                    cc[step.mesh_dim] = g;
                    reach.extend(held(&global, &mesh_shape, &state, &cc));
                }
                prop_assert!(after.is_subset(&reach), "step {:?} on rank {} needs data outside its group", step, rank);
            }
            state = next;
        }
        prop_assert_eq!(&state, &dst);
        // Traffic is computable for every step and zero for local steps.
        let t = plan_traffic(&plan, &mesh, 4).unwrap();
        for (s, per_rank) in plan.steps.iter().zip(&t) {
            if s.collective.comm_name().is_none() {
                prop_assert!(per_rank.iter().all(|x| x.send_bytes == 0));
            }
        }
    }

    #[test]
    fn local_data_matches_element_model((mesh_shape, global, p, _dst) in arb_case()) {
        let mesh = DeviceMesh::new(mesh_shape.clone()).unwrap();
        let n: usize = global.iter().product();
        let full: Vec<usize> = (0..n).collect();
        for rank in 0..mesh.size() {
            let s = local_shard_for_rank(&global, &mesh, &p, rank).unwrap();
            let got = local_data(&full, &global, &s).unwrap();
            let c = mesh.coordinate(rank).unwrap();
            prop_assert_eq!(&s, &local_shard(&global, &mesh, &p, &c).unwrap());
            // Element model: row-major flat index of every held multi-index, in order.
            let want: Vec<usize> = held(&global, &mesh_shape, &p, &c).into_iter().map(|ix| {
                ix.iter().zip(&global).fold(0, |a, (&i, &g)| a * g + i)
            }).collect();
            prop_assert_eq!(got, want);
        }
    }
}
