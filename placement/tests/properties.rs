//! Property tests against independent references: a naive `Vec<usize>` model of torch.chunk and
//! `_StridedShard._split_tensor` (no runs, no `select`), the partition identity, and inverses.

use std::collections::BTreeMap;

use placement::{
    format_placements, infer_global_shape, inverse_permutation, local_shard, local_shard_for_rank,
    parse_placements, permute_placements, permute_shape, DeviceMesh, IndexSet, PartialOp,
    Placement,
};
use proptest::prelude::*;

/// Naive torch.chunk of a list: pieces of ceil(n/k) from the front, missing pieces empty.
fn naive_chunk(v: &[usize], k: usize, r: usize) -> Vec<usize> {
    let c = v.len().div_ceil(k);
    if c == 0 {
        return Vec::new();
    }
    v.chunks(c).nth(r).map(|p| p.to_vec()).unwrap_or_default()
}

/// Naive `_StridedShard._split_tensor`: chunk into sf pieces (torch.chunk), chunk each piece k ways,
/// take piece r of each, concatenate.
fn naive_strided(v: &[usize], sf: usize, k: usize, r: usize) -> Vec<usize> {
    let c1 = v.len().div_ceil(sf);
    if c1 == 0 {
        return Vec::new();
    }
    v.chunks(c1)
        .flat_map(|piece| naive_chunk(piece, k, r))
        .collect()
}

/// Naive local shard: materialize each dim's global index list and split it mesh dim by mesh dim.
fn naive_local(
    global: &[usize],
    mesh: &[usize],
    placements: &[Placement],
    coord: &[usize],
) -> Vec<Vec<usize>> {
    let mut held: Vec<Vec<usize>> = global.iter().map(|&n| (0..n).collect()).collect();
    for (m, p) in placements.iter().enumerate() {
        match *p {
            Placement::Shard(d) => held[d] = naive_chunk(&held[d], mesh[m], coord[m]),
            Placement::StridedShard { dim, split_factor } => {
                held[dim] = naive_strided(&held[dim], split_factor, mesh[m], coord[m])
            }
            _ => {}
        }
    }
    held
}

fn arb_op() -> impl Strategy<Value = PartialOp> {
    prop::sample::select(PartialOp::ALL.to_vec())
}

fn arb_placement(ndim: usize) -> impl Strategy<Value = Placement> {
    let nd = ndim.max(1);
    prop_oneof![
        Just(Placement::Replicate),
        arb_op().prop_map(Placement::Partial),
        (0..nd).prop_map(Placement::Shard),
        (0..nd, 1usize..5)
            .prop_map(|(dim, split_factor)| Placement::StridedShard { dim, split_factor }),
    ]
}

/// (global shape, mesh shape, placements): 1-3 tensor dims of size 0..20, 1-3 mesh dims of 1..4.
/// Shard dims are drawn from 0..2 at most half the time so nested sharding of one dim is common.
fn arb_case() -> impl Strategy<Value = (Vec<usize>, Vec<usize>, Vec<Placement>)> {
    (1usize..4, 1usize..4).prop_flat_map(|(ndim, mesh_ndim)| {
        (
            prop::collection::vec(prop_oneof![Just(0usize), Just(1usize), 0usize..20], ndim),
            prop::collection::vec(1usize..5, mesh_ndim),
            prop::collection::vec(
                prop_oneof![
                    Just(Placement::Replicate),
                    (0..ndim).prop_map(Placement::Shard),
                    (0..ndim.min(2)).prop_map(Placement::Shard),
                    (0..ndim, 1usize..5).prop_map(|(dim, split_factor)| Placement::StridedShard {
                        dim,
                        split_factor
                    }),
                ],
                mesh_ndim,
            ),
        )
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    /// For every tensor dim: ranks agreeing on the mesh dims that shard it hold the same indices,
    /// and the distinct index sets partition 0..n (every index exactly once). local_shape,
    /// global_offset and the index sets agree, and everything matches the naive model.
    #[test]
    fn shards_partition_each_dim((global, mesh_shape, placements) in arb_case()) {
        let mesh = DeviceMesh::new(mesh_shape.clone()).unwrap();
        for d in 0..global.len() {
            let sharding: Vec<usize> = placements.iter().enumerate()
                .filter(|(_, p)| p.shard_dim() == Some(d)).map(|(m, _)| m).collect();
            let mut by_key: BTreeMap<Vec<usize>, Vec<usize>> = BTreeMap::new();
            for rank in 0..mesh.size() {
                let coord = mesh.coordinate(rank).unwrap();
                let s = local_shard(&global, &mesh, &placements, &coord).unwrap();
                let set = s.dim_indices(d, global[d]);
                prop_assert_eq!(s.local_shape[d], set.len());
                if sharding.is_empty() {
                    prop_assert!(s.indices[d].is_none());
                    prop_assert_eq!(s.global_offset[d], 0);
                    prop_assert_eq!(set.to_vec(), (0..global[d]).collect::<Vec<_>>());
                } else {
                    prop_assert_eq!(s.global_offset[d], set.first().unwrap_or(global[d]));
                }
                let naive = naive_local(&global, &mesh_shape, &placements, &coord);
                prop_assert_eq!(&set.to_vec(), &naive[d]);
                let key: Vec<usize> = sharding.iter().map(|&m| coord[m]).collect();
                if let Some(prev) = by_key.get(&key) {
                    prop_assert_eq!(prev, &set.to_vec(), "ranks with equal key {:?} differ", key);
                } else {
                    by_key.insert(key, set.to_vec());
                }
            }
            let mut count = vec![0usize; global[d]];
            for v in by_key.values() {
                for &i in v {
                    prop_assert!(i < global[d]);
                    count[i] += 1;
                }
            }
            prop_assert!(count.iter().all(|&c| c == 1), "dim {} counts {:?}", d, count);
        }
    }

    #[test]
    fn text_round_trip(p in (1usize..6).prop_flat_map(arb_placement)) {
        prop_assert_eq!(p.to_string().parse::<Placement>().unwrap(), p);
        prop_assert_eq!(p.repr().parse::<Placement>().unwrap(), p);
        let json = serde_json::to_string(&p).unwrap();
        prop_assert_eq!(serde_json::from_str::<Placement>(&json).unwrap(), p);
    }

    #[test]
    fn list_round_trip(v in prop::collection::vec((1usize..6).prop_flat_map(arb_placement), 0..5)) {
        prop_assert_eq!(parse_placements(&format_placements(&v)).unwrap(), v.clone());
        let repr = format!("({})", v.iter().map(|p| p.repr()).collect::<Vec<_>>().join(", "));
        prop_assert_eq!(parse_placements(&repr).unwrap(), v);
    }

    /// permute then inverse-permute is the identity; and sharding then permuting equals
    /// permuting then sharding with the permuted placements (shapes, offsets, index sets).
    #[test]
    fn permute_commutes_with_sharding(
        (global, mesh_shape, placements) in arb_case(),
        seed in any::<u64>(),
    ) {
        let n = global.len();
        // A permutation from the seed (Fisher-Yates with a tiny LCG).
        let mut perm: Vec<usize> = (0..n).collect();
        let mut s = seed;
        for i in (1..n).rev() {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            perm.swap(i, (s >> 33) as usize % (i + 1));
        }
        let inv = inverse_permutation(&perm).unwrap();
        let q = permute_placements(&placements, &perm).unwrap();
        prop_assert_eq!(permute_placements(&q, &inv).unwrap(), placements.clone());
        let mesh = DeviceMesh::new(mesh_shape).unwrap();
        let global_p = permute_shape(&global, &perm).unwrap();
        for rank in 0..mesh.size() {
            let a = local_shard_for_rank(&global, &mesh, &placements, rank).unwrap();
            let b = local_shard_for_rank(&global_p, &mesh, &q, rank).unwrap();
            prop_assert_eq!(permute_shape(&a.local_shape, &perm).unwrap(), b.local_shape);
            prop_assert_eq!(permute_shape(&a.global_offset, &perm).unwrap(), b.global_offset);
            for (i, &src) in perm.iter().enumerate() {
                prop_assert_eq!(&a.indices[src], &b.indices[i]);
            }
        }
    }

    /// On even shapes, infer_global_shape inverts local_shard on every rank.
    #[test]
    fn infer_inverts_local_shard_when_even(
        (base, mesh_shape, placements) in arb_case(),
    ) {
        let mesh = DeviceMesh::new(mesh_shape).unwrap();
        // Make each local dim a multiple of the product of split factors on it: even everywhere.
        let local: Vec<usize> = base.iter().enumerate().map(|(d, &b)| {
            let sf: usize = placements.iter()
                .filter(|p| p.shard_dim() == Some(d))
                .filter_map(Placement::split_factor).product();
            b * sf
        }).collect();
        let global = infer_global_shape(&local, &mesh, &placements).unwrap();
        for rank in 0..mesh.size() {
            let s = local_shard_for_rank(&global, &mesh, &placements, rank).unwrap();
            prop_assert_eq!(&s.local_shape, &local);
        }
    }

    #[test]
    fn index_set_select_matches_naive(
        outer in prop::collection::vec(0usize..50, 0..30),
        picks in prop::collection::vec(0usize..30, 0..30),
    ) {
        let o = IndexSet::from_indices(&outer);
        prop_assert_eq!(o.to_vec(), outer.clone());
        prop_assert_eq!(o.len(), outer.len());
        let inner: Vec<usize> = picks.iter().copied().filter(|&i| i < outer.len()).collect();
        let got = o.select(&IndexSet::from_indices(&inner)).unwrap();
        let want: Vec<usize> = inner.iter().map(|&i| outer[i]).collect();
        prop_assert_eq!(got.to_vec(), want);
        if picks.iter().any(|&i| i >= outer.len()) {
            prop_assert!(o.select(&IndexSet::from_indices(&picks)).is_err());
        }
        for (pos, &v) in outer.iter().enumerate() {
            prop_assert_eq!(o.get(pos), Some(v));
        }
    }

    #[test]
    fn mesh_rank_coordinate_round_trip(shape in prop::collection::vec(1usize..5, 1..4)) {
        let mesh = DeviceMesh::new(shape.clone()).unwrap();
        for rank in 0..mesh.size() {
            let c = mesh.coordinate(rank).unwrap();
            prop_assert_eq!(mesh.rank_of(&c).unwrap(), rank);
        }
        for m in 0..shape.len() {
            let groups = mesh.dim_groups(m).unwrap();
            let mut all: Vec<usize> = groups.iter().flatten().copied().collect();
            all.sort_unstable();
            prop_assert_eq!(all, (0..mesh.size()).collect::<Vec<_>>());
            for g in &groups {
                for (i, &r) in g.iter().enumerate() {
                    prop_assert_eq!(mesh.coordinate(r).unwrap()[m], i);
                }
            }
            prop_assert!(groups.windows(2).all(|w| w[0][0] < w[1][0]));
        }
    }
}
