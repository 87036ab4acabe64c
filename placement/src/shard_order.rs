//! The shard-order view of placements: which mesh dims shard each tensor dim, in which order,
//! and the conversion between shard orders and `_StridedShard` split factors.
//!
//! Source: `DTensorSpec.compute_default_shard_order`, `_convert_shard_order_to_StridedShard` and
//! `_maybe_convert_StridedShard_to_shard_order` in `torch/distributed/tensor/_dtensor_spec.py`
//! (torch 2.15). Example (mesh `[4, 3, 2]`): tensor dim 0 sharded on mesh dims 2, then 0, then
//! 1 is `[_S(0, 2), _S(0, 2), S(0)]`. FSDP2 + TP on one dim (`[_S(0, tp), S(0)]` on `(dp, tp)`)
//! is the order "mesh dim 1, then mesh dim 0": TP splits first.

use crate::error::{PlacementError, Result};
use crate::mesh::DeviceMesh;
use crate::placement::{format_placements, Placement};

/// One entry of a shard order: `tensor_dim` is split by `mesh_dims`, first to last.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ShardOrderEntry {
    /// The tensor dim.
    pub tensor_dim: usize,
    /// Mesh dims that shard it, in execution order.
    pub mesh_dims: Vec<usize>,
}

/// Default shard order of placements (mesh dims left to right), entries sorted by tensor dim;
/// `S` and `_S` both count.
pub fn default_shard_order(placements: &[Placement]) -> Vec<ShardOrderEntry> {
    let mut entries: Vec<ShardOrderEntry> = Vec::new();
    for (m, p) in placements.iter().enumerate() {
        if let Some(d) = p.shard_dim() {
            match entries.iter_mut().find(|e| e.tensor_dim == d) {
                Some(e) => e.mesh_dims.push(m),
                None => entries.push(ShardOrderEntry {
                    tensor_dim: d,
                    mesh_dims: vec![m],
                }),
            }
        }
    }
    entries.sort_by_key(|e| e.tensor_dim);
    entries
}

/// Placements for a shard order: for mesh dim `mesh_dims[i]` of an entry, the split factor is
/// the product of the sizes of the mesh dims earlier in the order (`mesh_dims[..i]`) but later
/// in the placement list (index `> mesh_dims[i]`); 1 gives `S(d)`, more gives `_S(d, sf)`.
/// Mesh dims not in the order keep their placement. Errors: a mesh dim in the order whose
/// placement is not a plain `S` (PyTorch's `ValueError`), or out of range.
pub fn shard_order_to_placements(
    order: &[ShardOrderEntry],
    placements: &[Placement],
    mesh: &DeviceMesh,
) -> Result<Vec<Placement>> {
    let mut out = placements.to_vec();
    for e in order {
        for (i, &m) in e.mesh_dims.iter().enumerate() {
            match placements.get(m) {
                Some(Placement::Shard(_)) => {}
                other => {
                    return Err(PlacementError::Parallelism(format!(
                        "only Shard placements can be converted to _StridedShard, found {:?} on mesh dim {m} in {}",
                        other.map(ToString::to_string),
                        format_placements(placements)
                    )))
                }
            }
            let sf: usize = e.mesh_dims[..i]
                .iter()
                .filter(|&&j| j > m)
                .map(|&j| mesh.dim_size(j))
                .product::<Result<usize>>()?;
            out[m] = if sf == 1 {
                Placement::Shard(e.tensor_dim)
            } else {
                Placement::StridedShard {
                    dim: e.tensor_dim,
                    split_factor: sf,
                }
            };
        }
    }
    Ok(out)
}

/// The shard order that `_StridedShard` split factors encode, or `None` when no order gives
/// them (PyTorch then falls back to its greedy planner). Walks mesh dims right to left and
/// inserts each shard where the product of the mesh sizes before it equals its split factor.
/// Without any `_S`, the default order.
pub fn placements_to_shard_order(
    placements: &[Placement],
    mesh: &DeviceMesh,
) -> Result<Option<Vec<ShardOrderEntry>>> {
    if !placements.iter().any(Placement::is_strided_shard) {
        return Ok(Some(default_shard_order(placements)));
    }
    let max_dim = placements
        .iter()
        .filter_map(Placement::shard_dim)
        .max()
        .unwrap_or(0)
        + 1;
    let mut orders: Vec<Vec<usize>> = vec![Vec::new(); max_dim];
    for m in (0..placements.len()).rev() {
        let Some(d) = placements[m].shard_dim() else {
            continue;
        };
        let sf = placements[m].split_factor().unwrap_or(1);
        let order = &mut orders[d];
        let mut acc = 1usize;
        let mut placed = false;
        for i in 0..=order.len() {
            if acc == sf {
                order.insert(i, m);
                placed = true;
                break;
            }
            if i < order.len() {
                acc = acc.saturating_mul(mesh.dim_size(order[i])?);
            }
        }
        if !placed {
            return Ok(None);
        }
    }
    Ok(Some(
        orders
            .into_iter()
            .enumerate()
            .filter(|(_, v)| !v.is_empty())
            .map(|(tensor_dim, mesh_dims)| ShardOrderEntry {
                tensor_dim,
                mesh_dims,
            })
            .collect(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::local::local_shard_for_rank;
    use crate::placement::parse_placements;

    #[test]
    fn pytorch_docstring_example() {
        let mesh = DeviceMesh::new(vec![4, 3, 2]).unwrap();
        let order = vec![ShardOrderEntry {
            tensor_dim: 0,
            mesh_dims: vec![2, 0, 1],
        }];
        let p = shard_order_to_placements(&order, &[Placement::Shard(0); 3], &mesh).unwrap();
        assert_eq!(format_placements(&p), "[_S(0, 2), _S(0, 2), S(0)]");
        assert_eq!(placements_to_shard_order(&p, &mesh).unwrap(), Some(order));
        // An undecodable split factor.
        let bad = parse_placements("[_S(0, 5), S(0), R]").unwrap();
        assert_eq!(placements_to_shard_order(&bad, &mesh).unwrap(), None);
        assert!(shard_order_to_placements(
            &[ShardOrderEntry {
                tensor_dim: 0,
                mesh_dims: vec![0]
            }],
            &[Placement::Replicate; 3],
            &mesh
        )
        .is_err());
    }

    #[test]
    fn fsdp_tp_order_means_tp_first() {
        // [_S(0, 2), S(0)] on (4, 2) is "mesh dim 1 splits first, then mesh dim 0": rank
        // (dp, tp) holds chunk dp of chunk tp. Check against the index sets, 16 rows.
        let mesh = DeviceMesh::new(vec![4, 2]).unwrap();
        let p = parse_placements("[_S(0, 2), S(0)]").unwrap();
        let order = placements_to_shard_order(&p, &mesh).unwrap().unwrap();
        assert_eq!(order[0].mesh_dims, vec![1, 0]);
        for r in 0..8 {
            let c = mesh.coordinate(r).unwrap();
            let got = local_shard_for_rank(&[16], &mesh, &p, r)
                .unwrap()
                .dim_indices(0, 16)
                .to_vec();
            let start = c[1] * 8 + c[0] * 2;
            assert_eq!(got, vec![start, start + 1]);
        }
        assert_eq!(
            default_shard_order(&parse_placements("[S(1), R, S(0), S(1)]").unwrap()),
            vec![
                ShardOrderEntry {
                    tensor_dim: 0,
                    mesh_dims: vec![2]
                },
                ShardOrderEntry {
                    tensor_dim: 1,
                    mesh_dims: vec![0, 3]
                }
            ]
        );
    }
}
