//! The bytes each rank sends and receives in each step of a redistribution plan, and in each
//! merged step of its cheaper alternative: the volumes of the ring algorithms, with the tail
//! padding PyTorch applies to uneven shards (`Shard._maybe_pad_tensor` in
//! `torch/distributed/tensor/placement_types.py`, torch 2.15).

use crate::error::{PlacementError, Result};
use crate::local::local_shard;
use crate::mesh::DeviceMesh;
use crate::placement::Placement;
use crate::redistribute::{AlternativePlan, Collective, RedistributePlan};

/// Bytes one rank sends and receives in one step (ring-algorithm volumes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StepTraffic {
    /// Bytes sent by the rank.
    pub send_bytes: usize,
    /// Bytes received by the rank.
    pub recv_bytes: usize,
}

/// Bytes each rank sends and receives in each step of `plan`, for elements of `elem_size`
/// bytes: `result[step][rank]`. Volumes of the ring algorithms on a group of `k` ranks, with the
/// padding PyTorch applies to uneven shards (tail padding to `ceil(n/k)`):
/// all-gather and reduce-scatter move `(k-1)` padded chunks, all-to-all `(k-1)` of the `k`
/// padded pieces of the local tensor; local steps 0. All-reduce of `n` elements is a
/// reduce-scatter of `k` near-equal blocks (the first `n % k` one element longer, `b_c` at group
/// coordinate c) then an all-gather of them: `n + (k-2) * b_c` elements each way, `2(k-1)/k * n`
/// when `k` divides `n` (the ring volume; PyTorch does not pad an all-reduce).
/// Errors: as [`crate::local_shard`], overflow.
pub fn plan_traffic(
    plan: &RedistributePlan,
    mesh: &DeviceMesh,
    elem_size: usize,
) -> Result<Vec<Vec<StepTraffic>>> {
    (0..plan.steps.len())
        .map(|i| group_traffic(plan, mesh, elem_size, &[i], plan.steps[i].collective))
        .collect()
}

/// Bytes each rank sends and receives in each step of `alt`, the cheaper alternative of `plan`:
/// `result[merged step][rank]`. A merged step is one collective on the group of the flattened
/// mesh dims (`k` = the product of their sizes, the group coordinate row-major over the dims in
/// ascending order, as a flattened DeviceMesh numbers its ranks), with the volumes of
/// [`plan_traffic`] for that `k` and the tensor the group sees (every merged mesh dim
/// replicated: the outermost step's logical shape, which PyTorch pads to). A step that merged
/// with nothing has its [`plan_traffic`] row.
/// Errors: as [`plan_traffic`]; a merged step naming a step the plan does not have.
pub fn alternative_traffic(
    plan: &RedistributePlan,
    alt: &AlternativePlan,
    mesh: &DeviceMesh,
    elem_size: usize,
) -> Result<Vec<Vec<StepTraffic>>> {
    alt.steps
        .iter()
        .map(|m| group_traffic(plan, mesh, elem_size, &m.merged, m.collective))
        .collect()
}

/// Traffic per rank of running the steps `idx` of `plan` (consecutive, on distinct mesh dims)
/// as one `collective` on their flattened mesh dims.
fn group_traffic(
    plan: &RedistributePlan,
    mesh: &DeviceMesh,
    elem_size: usize,
    idx: &[usize],
    collective: Collective,
) -> Result<Vec<StepTraffic>> {
    let overflow = || PlacementError::Overflow {
        what: "bytes of a redistribution step".to_string(),
    };
    let steps = idx
        .iter()
        .map(|&i| {
            plan.steps.get(i).ok_or(PlacementError::UnknownStep {
                step: i,
                steps: plan.steps.len(),
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let Some(first) = steps.first() else {
        return Ok(vec![StepTraffic::default(); mesh.size()]);
    };
    let mut dims: Vec<usize> = steps.iter().map(|s| s.mesh_dim).collect();
    dims.sort_unstable();
    let k = dims
        .iter()
        .try_fold(1usize, |a, &m| a.checked_mul(mesh.shape()[m]))
        .ok_or_else(overflow)?;
    // The tensor the group sees: the placements before the first step with every merged mesh
    // dim replicated.
    let mut logical_p = first.before.clone();
    for &m in &dims {
        logical_p[m] = Placement::Replicate;
    }
    let elems = |shape: &[usize]| -> Result<usize> {
        shape
            .iter()
            .try_fold(1usize, |a, &b| a.checked_mul(b))
            .ok_or_else(overflow)
    };
    let mut per_rank = Vec::with_capacity(mesh.size());
    for rank in 0..mesh.size() {
        let coord = mesh.coordinate(rank)?;
        let logical = local_shard(&plan.global_shape, mesh, &logical_p, &coord)?.local_shape;
        let padded_chunk = |d: usize| -> Result<usize> {
            let mut s = logical.clone();
            s[d] = s[d].div_ceil(k);
            elems(&s)
        };
        let moved = match collective {
            Collective::AllGather | Collective::ReduceScatter => {
                let d = first.src.shard_dim().or(first.dst.shard_dim()).unwrap_or(0);
                padded_chunk(d)?.checked_mul(k - 1).ok_or_else(overflow)?
            }
            Collective::AllReduce => {
                // k >= 2 here: a group of size 1 is a Noop step.
                let c = dims.iter().fold(0, |a, &m| a * mesh.shape()[m] + coord[m]);
                let n = elems(&logical)?;
                let b = n / k + usize::from(c < n % k);
                b.checked_mul(k.saturating_sub(2))
                    .and_then(|x| x.checked_add(n))
                    .ok_or_else(overflow)?
            }
            Collective::AllToAll => {
                // Local piece: sharded on src dim, split k ways on dst dim (padded).
                let (Some(i), Some(j)) = (first.src.shard_dim(), first.dst.shard_dim()) else {
                    return Err(overflow());
                };
                let mut s = logical.clone();
                s[i] = s[i].div_ceil(k);
                s[j] = s[j].div_ceil(k);
                elems(&s)?.checked_mul(k - 1).ok_or_else(overflow)?
            }
            Collective::Local | Collective::Noop => 0,
        };
        let bytes = moved.checked_mul(elem_size).ok_or_else(overflow)?;
        per_rank.push(StepTraffic {
            send_bytes: bytes,
            recv_bytes: bytes,
        });
    }
    Ok(per_rank)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::placement::parse_placements;
    use crate::redistribute::plan_redistribute;

    fn plan(g: &[usize], mesh: &[usize], src: &str, dst: &str) -> RedistributePlan {
        plan_redistribute(
            g,
            &DeviceMesh::new(mesh.to_vec()).unwrap(),
            &parse_placements(src).unwrap(),
            &parse_placements(dst).unwrap(),
        )
        .unwrap()
    }

    #[test]
    fn traffic_hand_worked() {
        // 5 rows of 3 over 4 ranks, S(0) -> R: padded chunk 2x3 = 6 elems, 3 peers, f32.
        let mesh = DeviceMesh::new(vec![4]).unwrap();
        let p = plan(&[5, 3], &[4], "[S(0)]", "[R]");
        let t = plan_traffic(&p, &mesh, 4).unwrap();
        assert!(t[0].iter().all(|s| s.send_bytes == 6 * 3 * 4));
        // All-reduce of 5x3 over 4 ranks, blocks [4, 4, 4, 3]: rank 0 moves 15 + 2 * 4 = 23
        // elems, rank 3 15 + 2 * 3 = 21.
        let p = plan(&[5, 3], &[4], "[P(sum)]", "[R]");
        let t = plan_traffic(&p, &mesh, 1).unwrap();
        assert_eq!((t[0][0].send_bytes, t[0][3].recv_bytes), (23, 21));
    }

    #[test]
    fn merged_traffic_hand_worked() {
        // 8 rows on [2, 2], [S(0), S(0)] -> [R, R]: default gathers 2 rows from 1 peer, then 4
        // rows from 1 peer (6 rows); merged, 2 rows from each of 3 peers (6 rows).
        let mesh = DeviceMesh::new(vec![2, 2]).unwrap();
        let p = plan(&[8], &[2, 2], "[S(0), S(0)]", "[R, R]");
        let alt = p.alternative.clone().unwrap();
        let d = plan_traffic(&p, &mesh, 1).unwrap();
        let a = alternative_traffic(&p, &alt, &mesh, 1).unwrap();
        assert_eq!((d[0][0].send_bytes, d[1][0].send_bytes), (2, 4));
        assert_eq!(a.len(), 1);
        assert!(a[0].iter().all(|s| s.send_bytes == 6 && s.recv_bytes == 6));
        // All-reduce of 6 on [2, 3] merged over 6 ranks: blocks of 1, 6 + 4 * 1 = 10 each way,
        // against 6 + 0 (k = 2) plus 6 + 1 * 2 (k = 3) = 14 for the default.
        let mesh = DeviceMesh::new(vec![2, 3]).unwrap();
        let p = plan(&[6], &[2, 3], "[P(sum), P(sum)]", "[R, R]");
        let alt = p.alternative.clone().unwrap();
        let a = alternative_traffic(&p, &alt, &mesh, 1).unwrap();
        let d = plan_traffic(&p, &mesh, 1).unwrap();
        assert!(a[0].iter().all(|s| s.send_bytes == 10));
        assert!((0..6).all(|r| d[0][r].send_bytes + d[1][r].send_bytes == 14));
    }
}
