//! How one mesh dim splits one tensor dim: the torch.chunk rule (`Shard`) and the
//! `_StridedShard._split_tensor` rule.

use crate::error::{PlacementError, Result};
use crate::index_set::IndexSet;
use crate::placement::Placement;

/// The torch.chunk rule (NOT numpy `array_split`): `c = ceil(n/k)`, chunk `r` is
/// `[min(n, c*r), min(n, c*(r+1)))`. Returns `(size, offset)`; an empty chunk's offset is `n`
/// (PyTorch PR 150862: DCP dedups shards by offset).
///
/// Source: `Shard._local_shard_size_and_offset` in `torch/distributed/tensor/placement_types.py`.
/// Examples: 5 over 4 -> sizes `[2,2,1,0]`, offsets `[0,2,4,5]`; 13 over 4 -> `[4,4,4,1]`.
/// Errors: `k == 0`, `r >= k`.
pub fn chunk(n: usize, k: usize, r: usize) -> Result<(usize, usize)> {
    if k == 0 {
        return Err(PlacementError::ZeroChunks);
    }
    if r >= k {
        return Err(PlacementError::ChunkOutOfRange {
            index: r,
            chunks: k,
        });
    }
    let c = n.div_ceil(k);
    let start = c.saturating_mul(r).min(n);
    let end = c.saturating_mul(r).saturating_add(c).min(n);
    Ok((end - start, start))
}

/// Indices rank `r` holds of a dim of extent `n` split `k` ways by `Shard`: one run
/// `offset..offset+size` of [`chunk`]. Errors as [`chunk`].
pub fn shard_indices(n: usize, k: usize, r: usize) -> Result<IndexSet> {
    let (size, offset) = chunk(n, k, r)?;
    Ok(IndexSet::from_range(offset..offset + size))
}

/// Indices rank `r` holds of a dim of extent `n` split `k` ways by `_StridedShard(split_factor)`:
///
/// ```text
/// c1 = ceil(n / sf)
/// piece_j = [min(n, j*c1), min(n, (j+1)*c1))         for j in 0..sf
/// (s_j, o_j) = chunk(|piece_j|, k, r)
/// indices(r) = concat_j (piece_j.start + o_j .. piece_j.start + o_j + s_j)
/// ```
///
/// Source: `_StridedShard._split_tensor` in `placement_types.py` (chunk the dim into `sf`
/// pieces, shard each piece, concatenate). For uneven sizes PyTorch itself is inconsistent
/// (PyTorch issue 168134: FSDP2's physical layout vs this metadata); this crate follows `_split_tensor`.
/// Examples: 9 elements, sf 2, k 4 -> `[0,1,5] [2,3,6] [4,7] [8]`; 8 elements -> `[0,4] [1,5]
/// [2,6] [3,7]`. Errors: `split_factor == 0`, and those of [`chunk`].
pub fn strided_shard_indices(
    n: usize,
    split_factor: usize,
    k: usize,
    r: usize,
) -> Result<IndexSet> {
    if split_factor == 0 {
        return Err(PlacementError::ZeroSplitFactor {
            placement: format!("_S(?, 0) over {k} ranks"),
        });
    }
    // Validate k and r even when every piece is empty.
    chunk(0, k, r)?;
    let c1 = n.div_ceil(split_factor);
    let mut runs = Vec::new();
    for j in 0..split_factor {
        let start = c1.saturating_mul(j).min(n);
        if start >= n {
            break; // every later piece is empty too
        }
        let end = c1.saturating_mul(j).saturating_add(c1).min(n);
        let (s, o) = chunk(end - start, k, r)?;
        runs.push(start + o..start + o + s);
    }
    Ok(IndexSet::from_runs(runs))
}

/// Indices rank `r` of `k` holds of a dim of current extent `n` under `placement`: the split of
/// [`shard_indices`] for `S`, [`strided_shard_indices`] for `_S`, and all of `0..n` for `R`/`P`.
pub fn placement_indices(placement: &Placement, n: usize, k: usize, r: usize) -> Result<IndexSet> {
    match placement {
        Placement::Shard(_) => shard_indices(n, k, r),
        Placement::StridedShard { split_factor, .. } => {
            if *split_factor == 0 {
                return Err(PlacementError::ZeroSplitFactor {
                    placement: placement.to_string(),
                });
            }
            strided_shard_indices(n, *split_factor, k, r)
        }
        Placement::Replicate | Placement::Partial(_) => {
            chunk(0, k, r)?;
            Ok(IndexSet::full(n))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sizes_offsets(n: usize, k: usize) -> (Vec<usize>, Vec<usize>) {
        (0..k).map(|r| chunk(n, k, r).unwrap()).unzip()
    }

    #[test]
    fn chunk_examples_from_reference() {
        assert_eq!(sizes_offsets(5, 4), (vec![2, 2, 1, 0], vec![0, 2, 4, 5]));
        assert_eq!(sizes_offsets(13, 4).0, vec![4, 4, 4, 1]);
        let (s, o) = sizes_offsets(4096, 30);
        assert_eq!(&s[..29], &[137; 29][..]);
        assert_eq!(s[29], 123);
        assert_eq!(o[29], 29 * 137);
        assert_eq!(sizes_offsets(0, 3), (vec![0, 0, 0], vec![0, 0, 0]));
        // Not numpy array_split (which would give 2,1,1,1 for 5 over 4).
        assert_ne!(sizes_offsets(5, 4).0, vec![2, 1, 1, 1]);
        assert_eq!(chunk(5, 0, 0), Err(PlacementError::ZeroChunks));
        assert!(chunk(5, 4, 4).is_err());
    }

    #[test]
    fn chunk_matches_a_naive_torch_chunk() {
        // torch.chunk: pieces of c = ceil(n/k) taken from the front; missing pieces are empty.
        for n in 0usize..40 {
            for k in 1..9 {
                let c = n.div_ceil(k);
                let mut pieces: Vec<Vec<usize>> = Vec::new();
                if c > 0 {
                    let all: Vec<usize> = (0..n).collect();
                    pieces = all.chunks(c).map(|p| p.to_vec()).collect();
                }
                for r in 0..k {
                    let want = pieces.get(r).cloned().unwrap_or_default();
                    let got = shard_indices(n, k, r).unwrap().to_vec();
                    assert_eq!(got, want, "n={n} k={k} r={r}");
                    let (size, off) = chunk(n, k, r).unwrap();
                    assert_eq!(size, want.len());
                    assert_eq!(off, want.first().copied().unwrap_or(n));
                }
            }
        }
    }

    #[test]
    fn strided_examples_from_reference() {
        let got: Vec<Vec<usize>> = (0..4)
            .map(|r| strided_shard_indices(9, 2, 4, r).unwrap().to_vec())
            .collect();
        assert_eq!(got, vec![vec![0, 1, 5], vec![2, 3, 6], vec![4, 7], vec![8]]);
        let got: Vec<Vec<usize>> = (0..4)
            .map(|r| strided_shard_indices(8, 2, 4, r).unwrap().to_vec())
            .collect();
        assert_eq!(got, vec![vec![0, 4], vec![1, 5], vec![2, 6], vec![3, 7]]);
        assert!(strided_shard_indices(8, 0, 4, 0).is_err());
        assert!(strided_shard_indices(0, 2, 4, 4).is_err());
        assert!(strided_shard_indices(0, 2, 4, 3).unwrap().is_empty());
        // sf 1 is the chunk rule (but the placement still differs from S(d) in torch 2.15).
        for r in 0..4 {
            assert_eq!(
                strided_shard_indices(9, 1, 4, r).unwrap(),
                shard_indices(9, 4, r).unwrap()
            );
        }
    }

    #[test]
    fn packed_gate_up_is_strided_shard_2() {
        // HF packed_colwise on [2I, H] with I = 8, tp = 4: rank r gets gate rows
        // [r*2, r*2+2) and up rows [8 + r*2, 8 + r*2 + 2).
        for r in 0..4 {
            let want: Vec<usize> = (r * 2..r * 2 + 2).chain(8 + r * 2..8 + r * 2 + 2).collect();
            assert_eq!(strided_shard_indices(16, 2, 4, r).unwrap().to_vec(), want);
        }
    }
}
