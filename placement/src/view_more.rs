//! Placement rules of the other shape ops: unsqueeze, squeeze, flatten, unflatten and stack (of
//! copies of one DTensor). narrow/slice, select, cat and split, whose output placements PyTorch
//! 2.15 picks by a cost-based search over single-dim strategies, are in [`crate::strategy`].
//!
//! Sources (torch 2.15): `torch/distributed/tensor/_ops/_view_ops.py` (`dim_unsqueeze`,
//! `dim_squeeze` with strict view; `flatten`/`unflatten` decompose to `aten.view`; stack
//! unsqueezes its inputs). Checked against PyTorch by the `view` oracle cases.

use crate::error::{PlacementError, Result};
use crate::placement::{format_placements, normalize_dim, Placement};
use crate::view_rule::view_placements;

fn rejected(op: String, shape: &[usize], p: &[Placement], reason: String) -> PlacementError {
    PlacementError::ViewRejected {
        op,
        shape: shape.to_vec(),
        placements: format_placements(p),
        reason,
    }
}

fn check_dims(shape: &[usize], p: &[Placement]) -> Result<()> {
    for (m, q) in p.iter().enumerate() {
        if let Some(d) = q.shard_dim() {
            if d >= shape.len() {
                return Err(PlacementError::ShardDimOutOfRange {
                    placement: *q,
                    mesh_dim: m,
                    dim: d,
                    tensor_ndim: shape.len(),
                });
            }
        }
    }
    Ok(())
}

/// `x.unsqueeze(dim)` on a tensor of rank `ndim` (`dim` in `-(ndim+1)..=ndim`): shards on dims
/// `>= dim` move up by one; `R`/`P` unchanged. Errors: dim out of range, shard dim `>= ndim`.
pub fn unsqueeze_placements(
    placements: &[Placement],
    ndim: usize,
    dim: i64,
) -> Result<Vec<Placement>> {
    let d = normalize_dim(dim, ndim + 1)?;
    placements
        .iter()
        .map(|p| match p.shard_dim() {
            Some(s) if s >= ndim => Err(PlacementError::DimOutOfRange {
                dim: s as i64,
                ndim,
            }),
            Some(s) if s >= d => Ok(p.with_shard_dim(s + 1)),
            _ => Ok(*p),
        })
        .collect()
}

/// `x.squeeze(dims)` (`None`: every size-1 dim) on a tensor of `shape`: strict view rule, so
/// squeezing a sharded size-1 dim is refused ("would remove or reshape sharded dimension");
/// shards on later dims move down. Dims of size != 1 are kept, as torch does.
pub fn squeeze_placements(
    shape: &[usize],
    placements: &[Placement],
    dims: Option<&[i64]>,
) -> Result<Vec<Placement>> {
    check_dims(shape, placements)?;
    let removed: Vec<usize> = match dims {
        None => (0..shape.len()).filter(|&d| shape[d] == 1).collect(),
        Some(ds) => {
            let mut v = Vec::new();
            for &d in ds {
                let d = normalize_dim(d, shape.len().max(1))?;
                if d < shape.len() && shape[d] == 1 && !v.contains(&d) {
                    v.push(d);
                }
            }
            v
        }
    };
    placements
        .iter()
        .map(|p| match p.shard_dim() {
            Some(s) if removed.contains(&s) => Err(rejected(
                format!("squeeze({dims:?})"),
                shape,
                placements,
                format!("this operation would remove sharded dimension {s}, which requires redistribution"),
            )),
            Some(s) => Ok(p.with_shard_dim(s - removed.iter().filter(|&&r| r < s).count())),
            None => Ok(*p),
        })
        .collect()
}

/// `x.flatten(start, end)`: the strict `view` to the flattened shape ([`view_placements`]).
pub fn flatten_placements(
    shape: &[usize],
    mesh_shape: &[usize],
    placements: &[Placement],
    start: i64,
    end: i64,
) -> Result<Vec<Placement>> {
    let n = shape.len().max(1);
    let (s, e) = (normalize_dim(start, n)?, normalize_dim(end, n)?);
    if shape.is_empty() {
        return view_placements(shape, &[1], mesh_shape, placements);
    }
    if s > e {
        return Err(rejected(
            format!("flatten({start}, {end})"),
            shape,
            placements,
            "flatten() has invalid args: start_dim cannot come after end_dim".to_string(),
        ));
    }
    let mut sizes: Vec<i64> = shape[..s].iter().map(|&x| x as i64).collect();
    sizes.push(shape[s..=e].iter().product::<usize>() as i64);
    sizes.extend(shape[e + 1..].iter().map(|&x| x as i64));
    view_placements(shape, &sizes, mesh_shape, placements)
}

/// `x.unflatten(dim, sizes)`: the strict `view` with dim replaced by `sizes` (one `-1` allowed).
pub fn unflatten_placements(
    shape: &[usize],
    mesh_shape: &[usize],
    placements: &[Placement],
    dim: i64,
    sizes: &[i64],
) -> Result<Vec<Placement>> {
    let d = normalize_dim(dim, shape.len())?;
    let mut known: i64 = sizes.iter().filter(|&&s| s != -1).product();
    if known == 0 {
        known = 1;
    }
    let resolved: Vec<i64> = sizes
        .iter()
        .map(|&s| if s == -1 { shape[d] as i64 / known } else { s })
        .collect();
    let mut all: Vec<i64> = shape[..d].iter().map(|&x| x as i64).collect();
    all.extend(&resolved);
    all.extend(shape[d + 1..].iter().map(|&x| x as i64));
    view_placements(shape, &all, mesh_shape, placements)
}

/// `torch.stack([x, x, ...], dim)` of copies of one DTensor: the unsqueeze rule (a new dim at
/// `dim`, shards at or after it move up). Errors as [`unsqueeze_placements`].
pub fn stack_placements(placements: &[Placement], ndim: usize, dim: i64) -> Result<Vec<Placement>> {
    unsqueeze_placements(placements, ndim, dim)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::placement::parse_placements;

    fn f(p: Result<Vec<Placement>>) -> String {
        p.map(|q| format_placements(&q))
            .unwrap_or_else(|_| "error".into())
    }

    /// Answers PyTorch 2.15 gave on a (2, 2) mesh (probed with DTensor ops on a fake process group).
    #[test]
    fn pytorch_probe_table() {
        let p = |s: &str| parse_placements(s).unwrap();
        assert_eq!(
            f(unsqueeze_placements(&p("[S(1), S(0)]"), 2, 1)),
            "[S(2), S(0)]"
        );
        assert_eq!(
            f(unsqueeze_placements(&p("[S(1), P(sum)]"), 2, -1)),
            "[S(1), P(sum)]"
        );
        assert_eq!(
            f(squeeze_placements(
                &[4, 1, 6],
                &p("[S(2), S(0)]"),
                Some(&[1])
            )),
            "[S(1), S(0)]"
        );
        assert_eq!(
            f(squeeze_placements(&[4, 1, 6], &p("[S(1), S(0)]"), None)),
            "error"
        );
        assert_eq!(
            f(flatten_placements(&[4, 6], &[2, 2], &p("[S(1), R]"), 0, 1)),
            "[_S(0, 4), R]"
        );
        assert_eq!(
            f(unflatten_placements(
                &[4, 6],
                &[2, 2],
                &p("[S(0), R]"),
                0,
                &[2, 2]
            )),
            "[S(0), R]"
        );
        assert_eq!(
            f(stack_placements(&p("[S(1), S(0)]"), 2, 0)),
            "[S(2), S(1)]"
        );
        assert_eq!(
            f(stack_placements(&p("[S(1), _S(0, 2)]"), 2, 1)),
            "[S(2), _S(0, 2)]"
        );
        assert!(unsqueeze_placements(&p("[S(1), R]"), 2, 3).is_err());
    }
}
