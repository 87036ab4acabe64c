//! Shared by the redistribution tests: random source and target placements, random cases, and
//! each rank's input shard.

use collectives::autograd::LocalTensor;
use placement::{local_data, local_shard, DeviceMesh, PartialOp, Placement};
use proptest::prelude::*;

/// A case: (global shape, mesh shape, src, dst).
pub type Case = (Vec<usize>, Vec<usize>, Vec<Placement>, Vec<Placement>);

pub fn target(ndim: usize) -> impl Strategy<Value = Placement> {
    prop_oneof![
        Just(Placement::Replicate),
        (0..ndim).prop_map(Placement::Shard)
    ]
}

pub fn source(ndim: usize) -> impl Strategy<Value = Placement> {
    prop_oneof![
        2 => target(ndim),
        1 => Just(Placement::Partial(PartialOp::Sum)),
    ]
}

/// A case with 1 to 3 tensor dims of sizes drawn from `dim`, on a mesh of 1 to 3 dims of
/// sizes 1 to 3 with at most 8 ranks.
pub fn case_with(dim: BoxedStrategy<usize>) -> impl Strategy<Value = Case> {
    (1usize..=3, 1usize..=3).prop_flat_map(move |(ndim, mdim)| {
        (
            prop::collection::vec(dim.clone(), ndim),
            prop::collection::vec(1usize..=3, mdim)
                .prop_filter("at most 8 ranks", |m| m.iter().product::<usize>() <= 8),
            prop::collection::vec(source(ndim), mdim),
            prop::collection::vec(target(ndim), mdim),
        )
    })
}

/// Rank `coord`'s input: its shard of `full` under `src`; along a Partial mesh dim the terms are
/// the data at coordinate 0 and zeros elsewhere, which sum to `full`.
pub fn input(
    full: &[f64],
    shape: &[usize],
    mesh: &DeviceMesh,
    src: &[Placement],
    coord: &[usize],
) -> LocalTensor<f64> {
    let shard = local_shard(shape, mesh, src, coord).unwrap();
    let mut data = local_data(full, shape, &shard).unwrap();
    let zero_term = src
        .iter()
        .zip(coord)
        .any(|(p, &c)| matches!(p, Placement::Partial(_)) && c != 0);
    if zero_term {
        data.iter_mut().for_each(|v| *v = 0.0);
    }
    LocalTensor::new(shard.local_shape, data).unwrap()
}
