//! The checked form of global-shape inference over all ranks, and extraction of each rank's
//! expected local data from a full tensor (for tests that execute redistribution plans).

use crate::error::{PlacementError, Result};
use crate::local::local_shard_for_rank;
use crate::local::{check_placements, infer_global_shape, LocalShard};
use crate::mesh::DeviceMesh;
use crate::placement::{format_placements, Placement};

/// The true global shape explained by the local shapes of ALL ranks (`local_shapes[rank]`,
/// row-major ranks), checked rank by rank against the torch.chunk rule of `placements`.
///
/// For a tensor dim sharded by some mesh dims, the global size is the sum of the local sizes
/// over the ranks whose coordinates are 0 on every other mesh dim (the shards partition the
/// dim exactly once); for an unsharded dim all ranks must agree. Every rank is then checked with
/// [`crate::local_shard`]. This catches PyTorch issue 110762 (uneven `from_local` without
/// `shape=`): 5 rows over 4 ranks give local rows 2, 2, 1, 0, which `from_local` turns into
/// "global" 8, 8, 4, 0; here the answer is 5, and a set of local shapes that no global shape
/// gives (e.g. 2, 1, 2, 0) is an error naming the dim, the ranks and the expected sizes.
///
/// Errors: [`PlacementError::InconsistentLocalShapes`] (naming the tensor dim and ranks),
/// wrong number of ranks or tensor ranks, placement errors.
pub fn global_shape_from_all_locals(
    local_shapes: &[Vec<usize>],
    mesh: &DeviceMesh,
    placements: &[Placement],
) -> Result<Vec<usize>> {
    let text = format_placements(placements);
    let bad = |detail: String| PlacementError::InconsistentLocalShapes {
        placements: text.clone(),
        detail,
    };
    if local_shapes.len() != mesh.size() {
        return Err(bad(format!(
            "{} local shapes given for a mesh of {} ranks",
            local_shapes.len(),
            mesh.size()
        )));
    }
    let ndim = local_shapes.first().map_or(0, Vec::len);
    if let Some(r) = local_shapes.iter().position(|s| s.len() != ndim) {
        return Err(bad(format!(
            "rank {r} has shape {:?} of rank {}, rank 0 has rank {ndim}",
            local_shapes[r],
            local_shapes[r].len()
        )));
    }
    check_placements(mesh, placements, ndim)?;
    let mut global = vec![0usize; ndim];
    for (d, g) in global.iter_mut().enumerate() {
        let sharding: Vec<usize> = (0..mesh.ndim())
            .filter(|&m| placements[m].shard_dim() == Some(d))
            .collect();
        let mut total = 0usize;
        for (r, s) in local_shapes.iter().enumerate() {
            let c = mesh.coordinate(r)?;
            if (0..mesh.ndim()).all(|m| sharding.contains(&m) || c[m] == 0) {
                total = total
                    .checked_add(s[d])
                    .ok_or_else(|| PlacementError::Overflow {
                        what: format!("global size of dim {d}"),
                    })?;
            }
        }
        *g = total;
    }
    for (r, s) in local_shapes.iter().enumerate() {
        let expected = local_shard_for_rank(&global, mesh, placements, r)?.local_shape;
        if &expected != s {
            let dims: Vec<String> = (0..ndim)
                .filter(|&d| expected[d] != s[d])
                .map(|d| format!("dim {d}: rank {r} has {}, expected {}", s[d], expected[d]))
                .collect();
            let inferred: Vec<String> = local_shapes
                .iter()
                .map(|l| {
                    infer_global_shape(l, mesh, placements)
                        .map(|g| format!("{g:?}"))
                        .unwrap_or_else(|e| e.to_string())
                })
                .collect();
            return Err(bad(format!(
                "no global shape gives these local shapes; summing the shards gives {global:?}, but {}; DTensor.from_local without shape= would infer per rank {}",
                dims.join(", "),
                inferred.join(", ")
            )));
        }
    }
    Ok(global)
}

/// The local data a rank holds of a full row-major tensor `full` of `global_shape`: the
/// elements at the shard's index sets, row-major in local order (a `_S` shard is gathered in its
/// local storage order). Use with [`crate::local_shard_for_rank`] to get every rank's expected
/// tensor after a redistribution. Errors: `full.len()` differs from the element count of
/// `global_shape`, or the shard's rank differs from `global_shape.len()`.
pub fn local_data<T: Clone>(
    full: &[T],
    global_shape: &[usize],
    shard: &LocalShard,
) -> Result<Vec<T>> {
    let expected: usize = global_shape.iter().product();
    if full.len() != expected || shard.local_shape.len() != global_shape.len() {
        return Err(PlacementError::DataLength {
            len: full.len(),
            shape: global_shape.to_vec(),
            expected,
        });
    }
    let idx: Vec<Vec<usize>> = (0..global_shape.len())
        .map(|d| shard.dim_indices(d, global_shape[d]).to_vec())
        .collect();
    let mut strides = vec![1usize; global_shape.len()];
    for d in (0..global_shape.len().saturating_sub(1)).rev() {
        strides[d] = strides[d + 1] * global_shape[d + 1];
    }
    let n: usize = idx.iter().map(Vec::len).product();
    let mut out = Vec::with_capacity(n);
    if n == 0 {
        return Ok(out);
    }
    let mut pos = vec![0usize; idx.len()];
    loop {
        let flat: usize = pos
            .iter()
            .enumerate()
            .map(|(d, &p)| idx[d][p] * strides[d])
            .sum();
        out.push(full[flat].clone());
        // Odometer increment, last dim fastest.
        let mut d = idx.len();
        loop {
            if d == 0 {
                return Ok(out);
            }
            d -= 1;
            pos[d] += 1;
            if pos[d] < idx[d].len() {
                break;
            }
            pos[d] = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::placement::parse_placements;

    #[test]
    fn issue_110762_uneven_from_local() {
        let m = DeviceMesh::new(vec![4]).unwrap();
        let p = [Placement::Shard(0)];
        let locals = vec![vec![2, 3], vec![2, 3], vec![1, 3], vec![0, 3]];
        // from_local infers a different "global" shape on every rank...
        let inferred: Vec<usize> = locals
            .iter()
            .map(|l| infer_global_shape(l, &m, &p).unwrap()[0])
            .collect();
        assert_eq!(inferred, vec![8, 8, 4, 0]);
        // ...the checked form finds the true one.
        assert_eq!(
            global_shape_from_all_locals(&locals, &m, &p).unwrap(),
            vec![5, 3]
        );
        // Shards that no chunking gives: named dim and rank.
        let wrong = vec![vec![2, 3], vec![1, 3], vec![2, 3], vec![0, 3]];
        let msg = global_shape_from_all_locals(&wrong, &m, &p)
            .unwrap_err()
            .to_string();
        assert!(msg.contains("dim 0: rank 1 has 1, expected 2"), "{msg}");
        assert!(msg.contains("[8, 3], [4, 3], [8, 3], [0, 3]"), "{msg}");
        // Replicated dims must agree.
        let rep = vec![vec![2, 3], vec![2, 4], vec![1, 3], vec![0, 3]];
        assert!(global_shape_from_all_locals(&rep, &m, &p).is_err());
    }

    #[test]
    fn nested_global_from_all_locals() {
        // 13 on (4,2) [S0,S0]: verified table sizes 2,2,2,2,2,2,1,0.
        let m = DeviceMesh::new(vec![4, 2]).unwrap();
        let p = parse_placements("[S(0), S(0)]").unwrap();
        let locals: Vec<Vec<usize>> = [2, 2, 2, 2, 2, 2, 1, 0].iter().map(|&n| vec![n]).collect();
        assert_eq!(
            global_shape_from_all_locals(&locals, &m, &p).unwrap(),
            vec![13]
        );
        // [S(1), R] on (2, 3): only mesh dim 0 shards; dim 1 sums over coordinate 0 of mesh dim 1.
        let m = DeviceMesh::new(vec![2, 3]).unwrap();
        let p = parse_placements("[S(1), R]").unwrap();
        let locals = vec![vec![4, 4]; 3]
            .into_iter()
            .chain(vec![vec![4, 3]; 3])
            .collect::<Vec<_>>();
        assert_eq!(
            global_shape_from_all_locals(&locals, &m, &p).unwrap(),
            vec![4, 7]
        );
    }

    #[test]
    fn local_data_naive_loop() {
        // Full 4x6 tensor 0..24; [_S(1, 2)] over 2 ranks: 6 cols, sf 2 -> pieces [0..3) and
        // [3..6), each chunked over 2 ranks -> rank 1 holds cols 2 and 5.
        let full: Vec<usize> = (0..24).collect();
        let m = DeviceMesh::new(vec![2]).unwrap();
        let p = parse_placements("[_S(1, 2)]").unwrap();
        let s = local_shard_for_rank(&[4, 6], &m, &p, 1).unwrap();
        let got = local_data(&full, &[4, 6], &s).unwrap();
        let mut naive = Vec::new();
        for r in 0..4 {
            for c in [2, 5] {
                naive.push(r * 6 + c);
            }
        }
        assert_eq!(got, naive);
        assert!(local_data(&full[..5], &[4, 6], &s).is_err());
    }
}
