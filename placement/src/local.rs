//! Local shard of a DTensor on an N-D mesh: shape, global offset and exact index sets; the
//! global shape `DTensor.from_local` infers; and the check that catches a wrong placement.

use crate::error::{PlacementError, Result, ShapeMismatch};
use crate::index_set::IndexSet;
use crate::mesh::DeviceMesh;
use crate::placement::{format_placements, Placement};
use crate::shard::placement_indices;

/// What one rank holds of a tensor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalShard {
    /// Local tensor shape, one entry per tensor dim.
    pub local_shape: Vec<usize>,
    /// As `compute_local_shape_and_global_offset`: first global index held along each sharded
    /// dim, `global[d]` for an empty shard, 0 for an unsharded dim.
    pub global_offset: Vec<usize>,
    /// Per tensor dim: the global indices held, in local order; `None` when no mesh dim shards it.
    pub indices: Vec<Option<IndexSet>>,
}

impl LocalShard {
    /// Indices held along tensor dim `d`: the stored set, or all of `0..global_dim_size` when no
    /// mesh dim shards `d` (also for `d` past the stored dims).
    pub fn dim_indices(&self, d: usize, global_dim_size: usize) -> IndexSet {
        match self.indices.get(d) {
            Some(Some(set)) => set.clone(),
            _ => IndexSet::full(global_dim_size),
        }
    }

    /// True when every dim's indices are one run (the shard is a plain box `offset..offset+shape`).
    pub fn is_box(&self) -> bool {
        self.indices.iter().flatten().all(IndexSet::is_contiguous)
    }
}

/// Checks one placement per mesh dim, shard dims below `ndim`, split factors >= 1.
pub fn check_placements(mesh: &DeviceMesh, placements: &[Placement], ndim: usize) -> Result<()> {
    if placements.len() != mesh.ndim() {
        return Err(PlacementError::PlacementCountMismatch {
            placements: placements.len(),
            mesh_ndim: mesh.ndim(),
        });
    }
    for (m, p) in placements.iter().enumerate() {
        if let Some(d) = p.shard_dim() {
            if d >= ndim {
                return Err(PlacementError::ShardDimOutOfRange {
                    placement: *p,
                    mesh_dim: m,
                    dim: d,
                    tensor_ndim: ndim,
                });
            }
        }
        if p.split_factor() == Some(0) {
            return Err(PlacementError::ZeroSplitFactor {
                placement: p.to_string(),
            });
        }
    }
    Ok(())
}

/// Local shard of a tensor of `global_shape` at mesh `coordinate`. Mesh dims apply left to
/// right; a dim sharded by several mesh dims is split again within the previous split (nested,
/// not flat: 5 over (2,2) with `[S0,S0]` gives `[0,1] [2] [3] [4]`).
///
/// Source: `compute_local_shape_and_global_offset` in `torch/distributed/tensor/_utils.py`:
/// ```text
/// G[d] = 0..global[d]; loc = global
/// for m in mesh dims: if p_m is S(d)/_S(d): I = split(loc[d], mesh[m], coord[m]); G[d] = G[d][I]; loc[d] = |I|
/// offset[d] = first(G[d]) (global[d] when empty) if d is sharded else 0
/// ```
/// `R` and `P` leave the shape whole. Errors: `placements.len() != mesh.ndim()`, a shard dim
/// `>= global_shape.len()`, a bad coordinate, `split_factor == 0`.
pub fn local_shard(
    global_shape: &[usize],
    mesh: &DeviceMesh,
    placements: &[Placement],
    coordinate: &[usize],
) -> Result<LocalShard> {
    check_placements(mesh, placements, global_shape.len())?;
    mesh.check_coordinate(coordinate)?;
    let mut indices: Vec<Option<IndexSet>> = vec![None; global_shape.len()];
    let mut local_shape = global_shape.to_vec();
    for (m, p) in placements.iter().enumerate() {
        let Some(d) = p.shard_dim() else { continue };
        let split = placement_indices(p, local_shape[d], mesh.shape()[m], coordinate[m])?;
        let held = match &indices[d] {
            None => split,
            Some(prev) => prev.select(&split)?,
        };
        local_shape[d] = held.len();
        indices[d] = Some(held);
    }
    let global_offset = indices
        .iter()
        .zip(global_shape)
        .map(|(set, &n)| match set {
            None => 0,
            Some(s) => s.first().unwrap_or(n),
        })
        .collect();
    Ok(LocalShard {
        local_shape,
        global_offset,
        indices,
    })
}

/// [`local_shard`] at the coordinate of `rank` (row-major). Errors also when `rank >= mesh.size()`.
pub fn local_shard_for_rank(
    global_shape: &[usize],
    mesh: &DeviceMesh,
    placements: &[Placement],
    rank: usize,
) -> Result<LocalShard> {
    let coord = mesh.coordinate(rank)?;
    local_shard(global_shape, mesh, placements, &coord)
}

/// Global shape `DTensor.from_local(local, mesh, placements)` infers without `shape=`:
/// `shape[d] *= mesh[m]` for every `S(d)` / `_S(d)` on mesh dim `m` (source: `compute_global_tensor_info`
/// in `_utils.py`). Only right for even sharding: 5 rows over 4 ranks gives per-rank "global"
/// 8, 8, 4, 0 (PyTorch issue 110762); use [`validate_global_shape`] when the true shape is known.
/// Errors: placement count, shard dim `>= local_shape.len()`, overflow.
pub fn infer_global_shape(
    local_shape: &[usize],
    mesh: &DeviceMesh,
    placements: &[Placement],
) -> Result<Vec<usize>> {
    check_placements(mesh, placements, local_shape.len())?;
    let mut shape = local_shape.to_vec();
    for (m, p) in placements.iter().enumerate() {
        if let Some(d) = p.shard_dim() {
            shape[d] =
                shape[d]
                    .checked_mul(mesh.shape()[m])
                    .ok_or_else(|| PlacementError::Overflow {
                        what: format!("global size of dim {d} from local {local_shape:?}"),
                    })?;
        }
    }
    Ok(shape)
}

/// Checks that `local_shape` is what `placements` give at `coordinate` for `global_shape`
/// (`local_shard(global_shape, ..).local_shape`). On mismatch the error lists every disagreeing
/// tensor dim (expected vs got), what `from_local` would infer, and, when moving one shard
/// placement to another tensor dim makes the shapes agree, says so: for the seed bug (local
/// `[288, 4096, 640]`, true global `[288, 4096, 1280]`, `S(1)` on mesh `[2]`) the message
/// says "consistent with S(2), not S(1)".
///
/// Errors: as [`local_shard`], [`PlacementError::ShapeRankMismatch`] and
/// [`PlacementError::LocalShapeMismatch`].
pub fn validate_global_shape(
    local_shape: &[usize],
    global_shape: &[usize],
    mesh: &DeviceMesh,
    placements: &[Placement],
    coordinate: &[usize],
) -> Result<()> {
    if local_shape.len() != global_shape.len() {
        return Err(PlacementError::ShapeRankMismatch {
            local: local_shape.to_vec(),
            global: global_shape.to_vec(),
        });
    }
    let expected = local_shard(global_shape, mesh, placements, coordinate)?.local_shape;
    if expected == local_shape {
        return Ok(());
    }
    let mut parts: Vec<String> = expected
        .iter()
        .zip(local_shape)
        .enumerate()
        .filter(|(_, (e, g))| e != g)
        .map(|(d, (e, g))| format!("dim {d}: expected {e}, got {g}"))
        .collect();
    // Alternatives: move one shard placement to another tensor dim.
    let mut alternatives = Vec::new();
    for (m, p) in placements.iter().enumerate() {
        let Some(d) = p.shard_dim() else { continue };
        for d2 in (0..global_shape.len()).filter(|&d2| d2 != d) {
            let mut alt = placements.to_vec();
            alt[m] = p.with_shard_dim(d2);
            if let Ok(s) = local_shard(global_shape, mesh, &alt, coordinate) {
                if s.local_shape == local_shape {
                    alternatives.push(format!(
                        "the local shape is consistent with {}, not {p}, on mesh dim {m} (placements {})",
                        alt[m],
                        format_placements(&alt)
                    ));
                }
            }
        }
    }
    if let Ok(inferred) = infer_global_shape(local_shape, mesh, placements) {
        parts.push(format!(
            "DTensor.from_local without shape= would infer global {inferred:?}"
        ));
    }
    parts.extend(alternatives);
    Err(PlacementError::LocalShapeMismatch(Box::new(
        ShapeMismatch {
            local: local_shape.to_vec(),
            global: global_shape.to_vec(),
            expected,
            coordinate: coordinate.to_vec(),
            placements: format_placements(placements),
            detail: parts.join("; "),
        },
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::placement::parse_placements;

    fn mesh(shape: &[usize]) -> DeviceMesh {
        DeviceMesh::new(shape.to_vec()).unwrap()
    }

    /// (size, offset) of dim 0 for every rank, row-major.
    fn table(n: usize, mesh_shape: &[usize], placements: &str) -> Vec<(usize, usize)> {
        let m = mesh(mesh_shape);
        let p = parse_placements(placements).unwrap();
        (0..m.size())
            .map(|r| {
                let s = local_shard_for_rank(&[n], &m, &p, r).unwrap();
                (s.local_shape[0], s.global_offset[0])
            })
            .collect()
    }

    #[test]
    fn verified_tables() {
        assert_eq!(
            table(18, &[4, 2], "[S(0), S(0)]"),
            vec![
                (3, 0),
                (2, 3),
                (3, 5),
                (2, 8),
                (3, 10),
                (2, 13),
                (2, 15),
                (1, 17)
            ]
        );
        assert_eq!(
            table(13, &[4, 2], "[S(0), S(0)]"),
            vec![
                (2, 0),
                (2, 2),
                (2, 4),
                (2, 6),
                (2, 8),
                (2, 10),
                (1, 12),
                (0, 13)
            ]
        );
        assert_eq!(
            table(15, &[4, 2], "[_S(0, 2), S(0)]"),
            vec![
                (2, 0),
                (2, 8),
                (2, 2),
                (2, 10),
                (2, 4),
                (2, 12),
                (2, 6),
                (1, 14)
            ]
        );
        let s = local_shard(
            &[10, 7],
            &mesh(&[2, 3]),
            &parse_placements("[S(1), S(0)]").unwrap(),
            &[1, 2],
        )
        .unwrap();
        assert_eq!(s.local_shape, vec![2, 3]);
        assert_eq!(s.global_offset, vec![8, 4]);
        assert_eq!(s.indices[0].as_ref().unwrap().to_vec(), vec![8, 9]);
        assert_eq!(s.indices[1].as_ref().unwrap().to_vec(), vec![4, 5, 6]);
    }

    #[test]
    fn nested_is_not_flat() {
        let m = mesh(&[2, 2]);
        let p = parse_placements("[S(0), S(0)]").unwrap();
        let nested: Vec<Vec<usize>> = (0..4)
            .map(|r| {
                local_shard_for_rank(&[5], &m, &p, r)
                    .unwrap()
                    .dim_indices(0, 5)
                    .to_vec()
            })
            .collect();
        assert_eq!(nested, vec![vec![0, 1], vec![2], vec![3], vec![4]]);
        let flat: Vec<Vec<usize>> = (0..4)
            .map(|r| {
                local_shard_for_rank(&[5], &mesh(&[4]), &[Placement::Shard(0)], r)
                    .unwrap()
                    .dim_indices(0, 5)
                    .to_vec()
            })
            .collect();
        assert_eq!(flat, vec![vec![0, 1], vec![2, 3], vec![4], vec![]]);
        let last = local_shard_for_rank(&[5], &mesh(&[4]), &[Placement::Shard(0)], 3).unwrap();
        assert_eq!(last.global_offset, vec![5]);
    }

    #[test]
    fn strided_shard_keeps_local_order() {
        // 15 on (4,2) [_S(0,2), _]: coord 3 on mesh dim 0 holds [6, 7, 14].
        let m = mesh(&[4, 2]);
        let p = parse_placements("[_S(0, 2), R]").unwrap();
        let s = local_shard(&[15, 3], &m, &p, &[3, 1]).unwrap();
        assert_eq!(s.indices[0].as_ref().unwrap().to_vec(), vec![6, 7, 14]);
        assert_eq!(s.indices[1], None);
        assert_eq!(s.dim_indices(1, 3).to_vec(), vec![0, 1, 2]);
        assert_eq!(s.global_offset, vec![6, 0]);
        assert!(!s.is_box());
        // A plain S shard, a replicated dim and an _S shard that happens to be one run are boxes.
        let b = local_shard(
            &[15, 3],
            &m,
            &parse_placements("[S(0), R]").unwrap(),
            &[3, 1],
        )
        .unwrap();
        assert!(b.is_box());
        let one_run = local_shard(
            &[4, 3],
            &mesh(&[2]),
            &parse_placements("[_S(0, 1)]").unwrap(),
            &[1],
        )
        .unwrap();
        assert!(one_run.is_box());
    }

    #[test]
    fn errors() {
        let m = mesh(&[2, 2]);
        assert!(matches!(
            local_shard(&[4], &m, &[Placement::Shard(0)], &[0, 0]),
            Err(PlacementError::PlacementCountMismatch { .. })
        ));
        assert!(matches!(
            local_shard(
                &[4],
                &m,
                &[Placement::Shard(1), Placement::Replicate],
                &[0, 0]
            ),
            Err(PlacementError::ShardDimOutOfRange { dim: 1, .. })
        ));
        assert!(matches!(
            local_shard(
                &[4],
                &m,
                &[Placement::Shard(0), Placement::Replicate],
                &[0, 2]
            ),
            Err(PlacementError::CoordinateOutOfRange { .. })
        ));
        let ss0 = Placement::StridedShard {
            dim: 0,
            split_factor: 0,
        };
        assert!(matches!(
            local_shard(&[4], &m, &[ss0, Placement::Replicate], &[0, 0]),
            Err(PlacementError::ZeroSplitFactor { .. })
        ));
        assert!(local_shard_for_rank(&[4], &m, &[Placement::Replicate; 2], 4).is_err());
    }

    #[test]
    fn from_local_inference() {
        // 5 rows over 4 ranks: local rows 2,2,1,0 -> inferred "global" 8, 8, 4, 0 (PyTorch issue 110762).
        let m = mesh(&[4]);
        let p = [Placement::Shard(0)];
        let inferred: Vec<usize> = (0..4)
            .map(|r| {
                let local = local_shard_for_rank(&[5, 3], &m, &p, r)
                    .unwrap()
                    .local_shape;
                infer_global_shape(&local, &m, &p).unwrap()[0]
            })
            .collect();
        assert_eq!(inferred, vec![8, 8, 4, 0]);
        // Given the true global shape, validate accepts every rank's local shape.
        for r in 0..4 {
            let local = local_shard_for_rank(&[5, 3], &m, &p, r)
                .unwrap()
                .local_shape;
            assert!(validate_global_shape(&local, &[5, 3], &m, &p, &[r]).is_ok());
        }
        // _S is multiplied like S.
        let ss = [Placement::StridedShard {
            dim: 1,
            split_factor: 2,
        }];
        assert_eq!(infer_global_shape(&[3, 4], &m, &ss).unwrap(), vec![3, 16]);
        assert!(infer_global_shape(&[3], &m, &[Placement::Shard(1)]).is_err());
    }

    #[test]
    fn seed_bug() {
        let m = mesh(&[2]);
        let local = [288, 4096, 640];
        // Wrong placement kept after a transpose: from_local infers [288, 8192, 640].
        assert_eq!(
            infer_global_shape(&local, &m, &[Placement::Shard(1)]).unwrap(),
            vec![288, 8192, 640]
        );
        assert_eq!(
            infer_global_shape(&local, &m, &[Placement::Shard(2)]).unwrap(),
            vec![288, 4096, 1280]
        );
        let err =
            validate_global_shape(&local, &[288, 4096, 1280], &m, &[Placement::Shard(1)], &[0])
                .unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("dim 1: expected 2048, got 4096"), "{msg}");
        assert!(msg.contains("dim 2: expected 1280, got 640"), "{msg}");
        assert!(msg.contains("consistent with S(2), not S(1)"), "{msg}");
        assert!(msg.contains("[288, 8192, 640]"), "{msg}");
        println!("{msg}");
        assert!(validate_global_shape(
            &local,
            &[288, 4096, 1280],
            &m,
            &[Placement::Shard(2)],
            &[1]
        )
        .is_ok());
        // No alternative placement fits: no suggestion.
        let msg = validate_global_shape(
            &[1, 1, 1],
            &[288, 4096, 1280],
            &m,
            &[Placement::Shard(1)],
            &[0],
        )
        .unwrap_err()
        .to_string();
        assert!(!msg.contains("consistent with"), "{msg}");
        assert!(matches!(
            validate_global_shape(&[1, 1], &[1, 1, 1], &m, &[Placement::Replicate], &[0]),
            Err(PlacementError::ShapeRankMismatch { .. })
        ));
    }
}
