//! Placement algebra of PyTorch DTensor (torch 2.15): `Shard`, `Replicate`, `Partial` and
//! `_StridedShard` on an N-D [`DeviceMesh`], with exact local shapes, global offsets and index
//! sets, the global shape `DTensor.from_local` infers, a checked form of it, the placement
//! rules of dim permutations and other view ops, and the strategies PyTorch picks for slice/narrow,
//! select, cat and split ([`strategy`]).
//!
//! Rules and verified tables: this crate's README; PyTorch sources:
//! `torch/distributed/tensor/placement_types.py`, `torch/distributed/tensor/_utils.py`
//! (`compute_local_shape_and_global_offset`), `torch/distributed/tensor/_ops/_view_ops.py`.
//!
//! ```
//! use placement::{local_shard_for_rank, parse_placements, DeviceMesh};
//! let mesh = DeviceMesh::new(vec![4, 2]).unwrap();
//! let p = parse_placements("[_S(0, 2), S(0)]").unwrap();
//! let s = local_shard_for_rank(&[15], &mesh, &p, 1).unwrap();
//! assert_eq!((s.local_shape[0], s.global_offset[0]), (2, 8));
//! assert_eq!(s.dim_indices(0, 15).to_vec(), vec![8, 9]);
//! ```

pub mod cases;
mod checked;
pub mod chunks;
mod cost;
mod error;
mod graph_plan;
pub mod hf_plan;
mod index_set;
mod local;
mod mesh;
pub mod parallel;
mod placement;
pub mod redistribute;
mod shard;
pub mod shard_order;
pub mod strategy;
pub mod traffic;
mod view;
mod view_more;
mod view_rule;
pub use checked::{global_shape_from_all_locals, local_data};

pub use error::{PlacementError, Result, ShapeMismatch};
pub use index_set::IndexSet;
pub use local::{
    check_placements, infer_global_shape, local_shard, local_shard_for_rank, validate_global_shape,
    LocalShard,
};
pub use mesh::DeviceMesh;
pub use placement::{
    check_partial_ops, format_placements, normalize_dim, parse_placements, PartialOp, Placement,
};
pub use shard::{chunk, placement_indices, shard_indices, strided_shard_indices};
pub use strategy::{cat_placements, narrow_placements, select_placements, split_placements};
pub use view::{inverse_permutation, permute_placements, permute_shape, transpose_placements};
pub use view_more::{
    flatten_placements, squeeze_placements, stack_placements, unflatten_placements,
    unsqueeze_placements,
};
pub use view_rule::{reshape_placements, view_placements, ReshapeSharding};

/// The README's usage example, compiled and run as a doctest.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
