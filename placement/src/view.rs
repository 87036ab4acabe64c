//! Placement rules for dim permutations (`permute`, `transpose`, `movedim`): a shard follows its
//! tensor dim; no communication. Source: `torch/distributed/tensor/_ops/_view_ops.py`
//! (`dim_transpose`, `dim_permute`). The seed bug: after permuting a local tensor by `perm`,
//! `S(d)` must become `S(perm.index(d))`.

use crate::error::{PlacementError, Result};
use crate::placement::Placement;

/// Checks `perm` is a permutation of `0..perm.len()`.
fn check_permutation(perm: &[usize]) -> Result<()> {
    let mut seen = vec![false; perm.len()];
    for &p in perm {
        if p >= perm.len() {
            return Err(PlacementError::NotAPermutation {
                perm: perm.to_vec(),
                reason: format!("entry {p} is out of range"),
            });
        }
        if seen[p] {
            return Err(PlacementError::NotAPermutation {
                perm: perm.to_vec(),
                reason: format!("entry {p} appears twice"),
            });
        }
        seen[p] = true;
    }
    Ok(())
}

/// Inverse permutation: `inv[perm[i]] = i`. Errors when `perm` is not a permutation.
pub fn inverse_permutation(perm: &[usize]) -> Result<Vec<usize>> {
    check_permutation(perm)?;
    let mut inv = vec![0; perm.len()];
    for (i, &p) in perm.iter().enumerate() {
        inv[p] = i;
    }
    Ok(inv)
}

/// Placements after `x.permute(perm)` (output dim `i` = input dim `perm[i]`, tensor rank
/// `perm.len()`): `S(d)` -> `S(position of d in perm)`, `_S(d, sf)` -> `_S(position, sf)`, `R`/`P`
/// unchanged. Errors: `perm` not a permutation, or a shard dim `>= perm.len()`.
pub fn permute_placements(placements: &[Placement], perm: &[usize]) -> Result<Vec<Placement>> {
    let inv = inverse_permutation(perm)?;
    placements
        .iter()
        .enumerate()
        .map(|(m, p)| match p.shard_dim() {
            None => Ok(*p),
            Some(d) => inv.get(d).map(|&new_dim| p.with_shard_dim(new_dim)).ok_or(
                PlacementError::ShardDimOutOfRange {
                    placement: *p,
                    mesh_dim: m,
                    dim: d,
                    tensor_ndim: perm.len(),
                },
            ),
        })
        .collect()
}

/// Placements after `x.transpose(d0, d1)` on a tensor of rank `ndim`: `S(d0)` <-> `S(d1)`.
/// Errors: `d0` or `d1 >= ndim`, or a shard dim `>= ndim`.
pub fn transpose_placements(
    placements: &[Placement],
    ndim: usize,
    d0: usize,
    d1: usize,
) -> Result<Vec<Placement>> {
    for d in [d0, d1] {
        if d >= ndim {
            return Err(PlacementError::DimOutOfRange {
                dim: i64::try_from(d).unwrap_or(i64::MAX),
                ndim,
            });
        }
    }
    let mut perm: Vec<usize> = (0..ndim).collect();
    perm.swap(d0, d1);
    permute_placements(placements, &perm)
}

/// Permutes a shape like `x.permute(perm)`: `out[i] = shape[perm[i]]`. Errors when `perm` is not a
/// permutation or its length differs from `shape.len()`.
pub fn permute_shape(shape: &[usize], perm: &[usize]) -> Result<Vec<usize>> {
    check_permutation(perm)?;
    if perm.len() != shape.len() {
        return Err(PlacementError::NotAPermutation {
            perm: perm.to_vec(),
            reason: format!("length differs from the tensor rank {}", shape.len()),
        });
    }
    Ok(perm.iter().map(|&p| shape[p]).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::local::{infer_global_shape, validate_global_shape};
    use crate::mesh::DeviceMesh;
    use crate::placement::parse_placements;

    #[test]
    fn seed_bug_transpose() {
        // Global [288, 4096, 1280] with S(2) on mesh [2]; transpose(1, 2) -> S(1).
        let p = [Placement::Shard(2)];
        let t = transpose_placements(&p, 3, 1, 2).unwrap();
        assert_eq!(t, vec![Placement::Shard(1)]);
        let mesh = DeviceMesh::new(vec![2]).unwrap();
        let local_t = permute_shape(&[288, 4096, 640], &[0, 2, 1]).unwrap();
        assert_eq!(local_t, vec![288, 640, 4096]);
        let global_t = permute_shape(&[288, 4096, 1280], &[0, 2, 1]).unwrap();
        assert_eq!(infer_global_shape(&local_t, &mesh, &t).unwrap(), global_t);
        assert!(validate_global_shape(&local_t, &global_t, &mesh, &t, &[1]).is_ok());
        // Keeping the stale S(2) is caught.
        assert!(validate_global_shape(&local_t, &global_t, &mesh, &p, &[1]).is_err());
    }

    #[test]
    fn permute_rules() {
        let p = parse_placements("[S(0), _S(2, 4), R, P(sum)]").unwrap();
        // out dim 0 = in 2, out 1 = in 0, out 2 = in 1.
        let q = permute_placements(&p, &[2, 0, 1]).unwrap();
        assert_eq!(q, parse_placements("[S(1), _S(0, 4), R, P(sum)]").unwrap());
        assert!(permute_placements(&p, &[0, 0, 1]).is_err());
        assert!(permute_placements(&p, &[0, 3, 1]).is_err());
        assert!(matches!(
            permute_placements(&p, &[1, 0]),
            Err(PlacementError::ShardDimOutOfRange { dim: 2, .. })
        ));
        assert!(transpose_placements(&p, 3, 0, 3).is_err());
        assert_eq!(
            transpose_placements(&p, 3, 1, 1).unwrap(),
            p,
            "transpose of a dim with itself is the identity"
        );
        assert_eq!(inverse_permutation(&[2, 0, 1]).unwrap(), vec![1, 2, 0]);
        assert!(permute_shape(&[1, 2], &[0, 1, 2]).is_err());
    }
}
