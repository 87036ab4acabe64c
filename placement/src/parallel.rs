//! Placements that parallelism libraries give parameters: FSDP2 `fully_shard` (alone or on a
//! TP/EP-sharded DTensor) and the tensor-parallel styles of Hugging Face transformers.
//!
//! Sources: `torch/distributed/fsdp/_fully_shard/_fsdp_param.py` (`_init_sharded_param`,
//! `_init_sharding_spec_tp`, torch 2.15) and transformers `integrations/tensor_parallel.py`
//! (`ColwiseParallel`, `RowwiseParallel`, `PackedColwiseParallel`, `GroupedGemmParallel`).

use crate::error::{PlacementError, Result};
use crate::local::{check_placements, local_shard};
use crate::mesh::DeviceMesh;
use crate::placement::{normalize_dim, Placement};

/// The model-parallel (TP/EP) sharding a parameter already has before `fully_shard`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelParallel {
    /// TP/EP mesh shape (1 or 2 dims: FSDP2 supports 1-D TP/EP or 2-D EP+TP).
    pub mesh_shape: Vec<usize>,
    /// Placements on that mesh.
    pub placements: Vec<Placement>,
}

/// The SPMD sharding FSDP2 gives a parameter: the mesh `(replicate?, dp_shard, *tp)` and its
/// placements.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fsdp2Sharding {
    /// Mesh shape: `[replicate,] dp_shard, *tp_mesh`.
    pub mesh_shape: Vec<usize>,
    /// Placements, one per mesh dim: `[R,] S(d) or _S(d, sf), *tp_placements`.
    pub placements: Vec<Placement>,
}

/// FSDP2 `fully_shard` placements for a parameter of `global_shape` [any rank].
///
/// - `dp_shard`: size of the FSDP shard mesh dim; `replicate`: `Some(r)` for HSDP (a leading `R`
///   mesh dim of size r).
/// - `shard_dim`: what `shard_placement_fn` returns (`None` = default `S(0)`; negative dims count
///   from the end).
/// - `tp`: the TP/EP sharding when the parameter is already a DTensor.
///
/// Rule (`_init_sharding_spec_tp`): `sf` = number of TP/EP shards of the shard dim
/// (`num_shards_map[d]`, product of the TP mesh sizes sharding d); the DP placement is
/// `_S(d, sf)` when `sf > 1`, else `S(d)`; then the TP/EP placements. Uneven sharding is allowed
/// only on dim 0 (`_init_sharded_param` raises "FSDP does not support uneven sharding on dim d"
/// when the local size on d is not divisible by `dp_shard`, for d > 0); for a TP parameter every
/// TP rank's local size is checked.
///
/// Errors: [`PlacementError::Parallelism`] for uneven non-zero dims, a TP mesh of more than 2
/// dims, `dp_shard == 0`; placement errors of the TP sharding.
pub fn fsdp2_sharding(
    global_shape: &[usize],
    dp_shard: usize,
    replicate: Option<usize>,
    shard_dim: Option<i64>,
    tp: Option<&ModelParallel>,
) -> Result<Fsdp2Sharding> {
    if dp_shard == 0 {
        return Err(PlacementError::Parallelism(
            "FSDP shard mesh dim has size 0".to_string(),
        ));
    }
    let d = normalize_dim(shard_dim.unwrap_or(0), global_shape.len())?;
    // Local sizes of dim d the FSDP split applies to (one per TP rank; the global size without TP).
    let (sf, local_sizes, tp_mesh, tp_placements) = match tp {
        None => (1, vec![global_shape[d]], vec![], vec![]),
        Some(mp) => {
            if mp.mesh_shape.len() > 2 {
                return Err(PlacementError::Parallelism(format!(
                    "FSDP only supports 1D TP/EP or 2D EP+TP, not {:?} (_fsdp_param.py)",
                    mp.placements
                )));
            }
            let mesh = DeviceMesh::new(mp.mesh_shape.clone())?;
            check_placements(&mesh, &mp.placements, global_shape.len())?;
            let sf: usize = mp
                .placements
                .iter()
                .zip(&mp.mesh_shape)
                .filter(|(p, _)| p.shard_dim() == Some(d))
                .map(|(_, &k)| k)
                .product();
            let sizes = (0..mesh.size())
                .map(|r| {
                    let c = mesh.coordinate(r)?;
                    Ok(local_shard(global_shape, &mesh, &mp.placements, &c)?.local_shape[d])
                })
                .collect::<Result<Vec<usize>>>()?;
            (sf, sizes, mp.mesh_shape.clone(), mp.placements.clone())
        }
    };
    if d > 0 {
        if let Some(bad) = local_sizes.iter().find(|&&n| n % dp_shard != 0) {
            return Err(PlacementError::Parallelism(format!(
                "FSDP does not support uneven sharding on dim {d}: local size {bad} of {global_shape:?} is not divisible by the FSDP shard world size {dp_shard} (_fsdp_param.py; only dim 0 may be uneven)"
            )));
        }
    }
    let dp = if sf > 1 {
        Placement::StridedShard {
            dim: d,
            split_factor: sf,
        }
    } else {
        Placement::Shard(d)
    };
    let mut mesh_shape = Vec::new();
    let mut placements = Vec::new();
    if let Some(r) = replicate {
        mesh_shape.push(r);
        placements.push(Placement::Replicate);
    }
    mesh_shape.push(dp_shard);
    placements.push(dp);
    mesh_shape.extend(tp_mesh);
    placements.extend(tp_placements);
    Ok(Fsdp2Sharding {
        mesh_shape,
        placements,
    })
}

/// Tensor-parallel styles of transformers' `tensor_parallel.py`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TpStyle {
    /// `colwise`: weight `[out, in]` sharded on dim -2, bias on dim -1.
    Colwise,
    /// `rowwise`: weight sharded on dim -1, bias replicated.
    Rowwise,
    /// `packed_colwise`: a fused `[gate; up]` weight `[2I, H]`: rank r gets
    /// `[r*I/tp, (r+1)*I/tp) U [I + r*I/tp, I + (r+1)*I/tp)` (= `_S(-2, 2)`), bias `_S(-1, 2)`.
    PackedColwise,
    /// `grouped_gemm` (EP): experts on dim 0 of `[E, ...]` weights and biases; `E % ep == 0`.
    GroupedGemm,
}

/// Which tensor of a layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParamKind {
    /// The weight.
    Weight,
    /// The bias.
    Bias,
}

/// Placement of a parameter of rank `ndim` under `style` on a 1-D TP/EP mesh.
/// Errors: a tensor rank too small for the style's dim (e.g. colwise weight of rank 1).
pub fn tp_placement(style: TpStyle, kind: ParamKind, ndim: usize) -> Result<Placement> {
    let dim = |d: i64| normalize_dim(d, ndim);
    Ok(match (style, kind) {
        (TpStyle::Colwise, ParamKind::Weight) => Placement::Shard(dim(-2)?),
        (TpStyle::Colwise, ParamKind::Bias) => Placement::Shard(dim(-1)?),
        (TpStyle::Rowwise, ParamKind::Weight) => Placement::Shard(dim(-1)?),
        (TpStyle::Rowwise, ParamKind::Bias) => Placement::Replicate,
        (TpStyle::PackedColwise, ParamKind::Weight) => Placement::StridedShard {
            dim: dim(-2)?,
            split_factor: 2,
        },
        (TpStyle::PackedColwise, ParamKind::Bias) => Placement::StridedShard {
            dim: dim(-1)?,
            split_factor: 2,
        },
        (TpStyle::GroupedGemm, _) => Placement::Shard(dim(0)?),
    })
}

/// Expected local shape of rank `rank` of `tp` for a parameter of `global_shape` under `style`
/// (sizes follow the torch.chunk rule). Compute this instead of skipping shape checks when TP is
/// applied. Errors: `rank >= tp`, `tp == 0`, a rank too small for the style,
/// [`PlacementError::Parallelism`] for `grouped_gemm` with `E % ep != 0` or a packed dim of odd
/// size.
pub fn tp_local_shape(
    style: TpStyle,
    kind: ParamKind,
    global_shape: &[usize],
    tp: usize,
    rank: usize,
) -> Result<Vec<usize>> {
    let p = tp_placement(style, kind, global_shape.len())?;
    match (style, p.shard_dim()) {
        (TpStyle::GroupedGemm, Some(d)) if global_shape[d] % tp.max(1) != 0 => {
            return Err(PlacementError::Parallelism(format!(
                "grouped_gemm: {} experts are not divisible by the EP size {tp}",
                global_shape[d]
            )))
        }
        (TpStyle::PackedColwise, Some(d)) if global_shape[d] % 2 != 0 => {
            return Err(PlacementError::Parallelism(format!(
                "packed_colwise: fused dim {d} of {global_shape:?} has odd size; expected [gate; up] = 2 x I"
            )))
        }
        _ => {}
    }
    let mesh = DeviceMesh::new(vec![tp])?;
    Ok(local_shard(global_shape, &mesh, &[p], &[rank])?.local_shape)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::placement::{format_placements, parse_placements};

    #[test]
    fn fsdp2_composition() {
        // Plain FSDP: S(0), uneven allowed on dim 0.
        let s = fsdp2_sharding(&[7, 4], 4, None, None, None).unwrap();
        assert_eq!(
            (s.mesh_shape, format_placements(&s.placements)),
            (vec![4], "[S(0)]".into())
        );
        // FSDP + colwise TP on the same dim 0: [_S(0, tp), S(0)].
        let tp = ModelParallel {
            mesh_shape: vec![2],
            placements: parse_placements("[S(0)]").unwrap(),
        };
        let s = fsdp2_sharding(&[16, 4], 4, None, None, Some(&tp)).unwrap();
        assert_eq!(s.mesh_shape, vec![4, 2]);
        assert_eq!(format_placements(&s.placements), "[_S(0, 2), S(0)]");
        // Rowwise TP on dim 1, FSDP on dim 0: plain S(0).
        let tp = ModelParallel {
            mesh_shape: vec![2],
            placements: parse_placements("[S(1)]").unwrap(),
        };
        let s = fsdp2_sharding(&[16, 4], 4, Some(2), None, Some(&tp)).unwrap();
        assert_eq!(format_placements(&s.placements), "[R, S(0), S(1)]");
        // MoE experts [E, H, 2I] with FSDP on dim 1 under EP on dim 0.
        let ep = ModelParallel {
            mesh_shape: vec![4],
            placements: parse_placements("[S(0)]").unwrap(),
        };
        let s = fsdp2_sharding(&[8, 64, 32], 8, None, Some(1), Some(&ep)).unwrap();
        assert_eq!(format_placements(&s.placements), "[S(1), S(0)]");
        // Uneven on dim 1 is refused, as FSDP2.
        assert!(matches!(
            fsdp2_sharding(&[8, 6, 32], 4, None, Some(1), None),
            Err(PlacementError::Parallelism(_))
        ));
        // The FSDP2 + TP layout gives the verified table of placement.md (15 on (4,2)).
        let tp = ModelParallel {
            mesh_shape: vec![2],
            placements: parse_placements("[S(0)]").unwrap(),
        };
        let s = fsdp2_sharding(&[15], 4, None, None, Some(&tp)).unwrap();
        let mesh = DeviceMesh::new(s.mesh_shape.clone()).unwrap();
        let got: Vec<(usize, usize)> = (0..8)
            .map(|r| {
                let l = crate::local::local_shard_for_rank(&[15], &mesh, &s.placements, r).unwrap();
                (l.local_shape[0], l.global_offset[0])
            })
            .collect();
        assert_eq!(
            got,
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
    }

    #[test]
    fn tp_styles_hand_worked() {
        use ParamKind::*;
        use TpStyle::*;
        assert_eq!(
            tp_local_shape(Colwise, Weight, &[4096, 1024], 4, 1).unwrap(),
            vec![1024, 1024]
        );
        assert_eq!(
            tp_local_shape(Colwise, Bias, &[4096], 4, 3).unwrap(),
            vec![1024]
        );
        assert_eq!(
            tp_local_shape(Rowwise, Weight, &[1024, 4096], 4, 0).unwrap(),
            vec![1024, 1024]
        );
        assert_eq!(
            tp_local_shape(Rowwise, Bias, &[1024], 4, 0).unwrap(),
            vec![1024]
        );
        // 4096 over 30 ranks: 29 x 137 then 123 (chunk rule).
        assert_eq!(
            tp_local_shape(Rowwise, Weight, &[8, 4096], 30, 29).unwrap(),
            vec![8, 123]
        );
        // packed gate_up [2I, H] with I = 6 over 2: rank 1 holds gate rows 3..6 and up rows 9..12.
        let mesh = DeviceMesh::new(vec![2]).unwrap();
        let p = tp_placement(PackedColwise, Weight, 2).unwrap();
        let s = local_shard(&[12, 5], &mesh, &[p], &[1]).unwrap();
        assert_eq!(s.dim_indices(0, 12).to_vec(), vec![3, 4, 5, 9, 10, 11]);
        assert!(tp_local_shape(PackedColwise, Weight, &[7, 5], 2, 0).is_err());
        assert_eq!(
            tp_local_shape(GroupedGemm, Weight, &[8, 64, 32], 4, 2).unwrap(),
            vec![2, 64, 32]
        );
        assert!(matches!(
            tp_local_shape(GroupedGemm, Weight, &[6, 64, 32], 4, 0),
            Err(PlacementError::Parallelism(_))
        ));
        assert!(tp_placement(Colwise, Weight, 1).is_err());
    }
}
