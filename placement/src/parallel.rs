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

/// A tensor of an MoE block, as a named plan places it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MoeParam {
    /// Router `[E, H]`, router bias `[E]`, selection bias `[E]`, shared expert, shared gate, and
    /// every tensor outside the MoE blocks.
    Replicated,
    /// `gate_and_up_projs` `[E, H, 2I]` (native layout, gate half first).
    GateAndUp,
    /// `down_projs` `[E, I, H]`.
    Down,
    /// `gate_up_proj_bias` `[E, 2I]`.
    GateUpBias,
    /// `down_proj_bias` `[E, H]`.
    DownBias,
    /// Hidden states / block output / their gradients `[T, H]`, routing weights `[T, k]`.
    Tokens,
}

/// What a mesh dim of a named plan does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MeshRole {
    /// Expert parallel: experts `S(0)`, tokens `S(0)`.
    Ep,
    /// Tensor parallel on the experts: packed gate|up `_S(2, 2)`, down `S(1)`.
    Tp,
    /// FSDP: expert weights `S(1)`, tokens `S(0)`.
    Fsdp,
    /// Data parallel: everything replicated, tokens `S(0)`.
    Dp,
}

impl MeshRole {
    /// The mesh dim name (`ep`, `tp`, `fsdp`, `dp`).
    pub fn name(self) -> &'static str {
        match self {
            MeshRole::Ep => "ep",
            MeshRole::Tp => "tp",
            MeshRole::Fsdp => "fsdp",
            MeshRole::Dp => "dp",
        }
    }
}

/// The names of the named plans, in report order.
pub const PLAN_NAMES: [&str; 7] = ["single", "ep", "tp", "tp-sp", "fsdp", "ep-tp", "ep-fsdp"];

/// A named plan at a world size: mesh shape, the role of each mesh dim, sequence parallelism.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamedPlan {
    /// One of [`PLAN_NAMES`].
    pub name: &'static str,
    /// Mesh shape (product = world size).
    pub mesh_shape: Vec<usize>,
    /// Role of each mesh dim.
    pub roles: Vec<MeshRole>,
    /// Sequence parallel on the `tp` dim (tokens `S(0)` there too).
    pub sp: bool,
}

/// The named plan `name` at `world` ranks: `single` ([1], dp), `ep` / `tp` / `tp-sp` / `fsdp` (one
/// mesh dim over the world), `ep-tp` / `ep-fsdp` (`[world / 2, 2]`; `[1, 1]` at world 1).
///
/// Sources: torchtitan `distributed/expert_parallel.py` (EP: experts `S(0)`), transformers
/// `integrations/tensor_parallel.py` (`packed_colwise` gate_up = `_S(-1, 2)` in the native
/// `x @ W` layout, rowwise down = `S(1)`), Megatron SP (tokens `S(0)` on the TP group), NeMo
/// Automodel / FSDP2 (`S(1)` on expert weights when FSDP shards a dim other than E).
///
/// Errors ([`PlacementError::Parallelism`]): an unknown name (the known ones listed), `single` at
/// world != 1, a 2-D plan at an odd world > 1, world 0.
pub fn named_plan(name: &str, world: usize) -> Result<NamedPlan> {
    let err = |m: String| Err(PlacementError::Parallelism(m));
    if world == 0 {
        return err("world size 0".into());
    }
    let Some(&name) = PLAN_NAMES.iter().find(|n| **n == name) else {
        return err(format!(
            "unknown plan '{name}' (known: {})",
            PLAN_NAMES.join(", ")
        ));
    };
    let one = |r: MeshRole| (vec![world], vec![r]);
    let two = |a: MeshRole, b: MeshRole| -> Result<(Vec<usize>, Vec<MeshRole>)> {
        if world > 1 && !world.is_multiple_of(2) {
            return Err(PlacementError::Parallelism(format!(
                "plan {name} needs an even world size, got {world}"
            )));
        }
        let inner = world.min(2);
        Ok((vec![world / inner, inner], vec![a, b]))
    };
    let ((mesh_shape, roles), sp) = match name {
        "single" if world != 1 => return err(format!("plan single runs on 1 rank, not {world}")),
        "single" => (one(MeshRole::Dp), false),
        "ep" => (one(MeshRole::Ep), false),
        "tp" => (one(MeshRole::Tp), false),
        "tp-sp" => (one(MeshRole::Tp), true),
        "fsdp" => (one(MeshRole::Fsdp), false),
        "ep-tp" => (two(MeshRole::Ep, MeshRole::Tp)?, false),
        _ => (two(MeshRole::Ep, MeshRole::Fsdp)?, false),
    };
    Ok(NamedPlan {
        name,
        mesh_shape,
        roles,
        sp,
    })
}

/// The placement of `param` on a mesh dim of `role` (`sp`: sequence parallel on the TP dim).
pub fn moe_placement(param: MoeParam, role: MeshRole, sp: bool) -> Placement {
    use Placement::{Replicate, Shard, StridedShard};
    match (param, role) {
        (MoeParam::Replicated, _) => Replicate,
        (MoeParam::Tokens, MeshRole::Tp) if !sp => Replicate,
        (MoeParam::Tokens, _) => Shard(0),
        (_, MeshRole::Ep) => Shard(0),
        (MoeParam::GateAndUp, MeshRole::Tp) => StridedShard {
            dim: 2,
            split_factor: 2,
        },
        (MoeParam::GateUpBias, MeshRole::Tp) => StridedShard {
            dim: 1,
            split_factor: 2,
        },
        (MoeParam::Down, MeshRole::Tp) => Shard(1),
        (MoeParam::GateAndUp | MoeParam::Down, MeshRole::Fsdp) => Shard(1),
        (MoeParam::DownBias, _) | (MoeParam::GateUpBias, _) => Replicate,
        (_, MeshRole::Dp) => Replicate,
    }
}

impl NamedPlan {
    /// Placements of `param`, one per mesh dim.
    pub fn placements(&self, param: MoeParam) -> Vec<Placement> {
        self.roles
            .iter()
            .map(|&r| moe_placement(param, r, self.sp))
            .collect()
    }

    /// The mesh dim names (`["ep", "tp"]`).
    pub fn dim_names(&self) -> Vec<String> {
        self.roles.iter().map(|r| r.name().to_string()).collect()
    }

    /// Which [`MoeParam`] a native key is (`...experts.gate_and_up_projs` -> `GateAndUp`, ...;
    /// anything else `Replicated`).
    pub fn param_of_native_key(key: &str) -> MoeParam {
        match key.rsplit('.').next() {
            Some("gate_and_up_projs") if key.contains("experts.") => MoeParam::GateAndUp,
            Some("down_projs") if key.contains("experts.") => MoeParam::Down,
            Some("gate_up_proj_bias") if key.contains("experts.") => MoeParam::GateUpBias,
            Some("down_proj_bias") if key.contains("experts.") => MoeParam::DownBias,
            _ => MoeParam::Replicated,
        }
    }
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
        // The FSDP2 + TP layout gives the table PyTorch gives for 15 rows on (4, 2).
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
    fn fsdp2_takes_1d_and_2d_model_parallel_meshes_only() {
        // EP x TP on [2, 2]: experts S(0), packed columns _S(2, 2); FSDP on dim 1 is plain S(1).
        let ep_tp = ModelParallel {
            mesh_shape: vec![2, 2],
            placements: parse_placements("[S(0), _S(2, 2)]").unwrap(),
        };
        let s = fsdp2_sharding(&[8, 64, 32], 4, None, Some(1), Some(&ep_tp)).unwrap();
        assert_eq!(s.mesh_shape, vec![4, 2, 2]);
        assert_eq!(format_placements(&s.placements), "[S(1), S(0), _S(2, 2)]");
        let three = ModelParallel {
            mesh_shape: vec![2, 2, 2],
            placements: parse_placements("[S(0), S(1), S(2)]").unwrap(),
        };
        assert!(matches!(
            fsdp2_sharding(&[8, 64, 32], 4, None, Some(1), Some(&three)),
            Err(PlacementError::Parallelism(m)) if m.contains("1D TP/EP or 2D EP+TP")
        ));
    }

    #[test]
    fn tp_styles_on_grouped_and_one_d_tensors() {
        use ParamKind::*;
        use TpStyle::*;
        // Rowwise on a grouped [E, I, H] weight shards the last dim, not dim 1.
        assert_eq!(
            tp_local_shape(Rowwise, Weight, &[8, 1024, 4096], 4, 0).unwrap(),
            vec![8, 1024, 1024]
        );
        // Colwise on a grouped [E, out, in] weight shards dim -2.
        assert_eq!(
            tp_local_shape(Colwise, Weight, &[8, 1024, 4096], 4, 0).unwrap(),
            vec![8, 256, 4096]
        );
        // packed_colwise: a [2I] bias is _S(0, 2); a [E, 2I, H] weight _S(1, 2); an even fused
        // dim has a local shape.
        assert_eq!(
            format!("{}", tp_placement(PackedColwise, Bias, 1).unwrap()),
            "_S(0, 2)"
        );
        assert_eq!(
            format!("{}", tp_placement(PackedColwise, Weight, 3).unwrap()),
            "_S(1, 2)"
        );
        assert_eq!(
            tp_local_shape(PackedColwise, Weight, &[12, 5], 2, 1).unwrap(),
            vec![6, 5]
        );
        // [16] = gate 8 | up 8 over 4: rank 3 holds 2 of each (torch.chunk of 8 by 4).
        assert_eq!(
            tp_local_shape(PackedColwise, Bias, &[16], 4, 3).unwrap(),
            vec![4]
        );
    }

    #[test]
    fn named_plans_match_their_sources() {
        use MeshRole::*;
        // (name, world, mesh shape, roles, sp): torchtitan EP, transformers TP, Megatron SP,
        // FSDP2; 2-D plans are [world / 2, 2].
        let table: [(&str, usize, Vec<usize>, Vec<MeshRole>, bool); 10] = [
            ("single", 1, vec![1], vec![Dp], false),
            ("ep", 4, vec![4], vec![Ep], false),
            ("tp", 2, vec![2], vec![Tp], false),
            ("tp-sp", 2, vec![2], vec![Tp], true),
            ("fsdp", 3, vec![3], vec![Fsdp], false),
            ("ep-tp", 8, vec![4, 2], vec![Ep, Tp], false),
            ("ep-fsdp", 4, vec![2, 2], vec![Ep, Fsdp], false),
            ("ep-tp", 1, vec![1, 1], vec![Ep, Tp], false),
            ("ep", 1, vec![1], vec![Ep], false),
            ("tp-sp", 1, vec![1], vec![Tp], true),
        ];
        for (name, world, mesh, roles, sp) in table {
            let p = named_plan(name, world).unwrap();
            assert_eq!(p.name, name);
            assert_eq!(
                (p.mesh_shape, p.roles, p.sp),
                (mesh, roles, sp),
                "{name} {world}"
            );
        }
        assert_eq!(
            named_plan("ep-fsdp", 2).unwrap().dim_names(),
            vec!["ep", "fsdp"]
        );
        assert_eq!(named_plan("single", 1).unwrap().dim_names(), vec!["dp"]);
        assert_eq!(named_plan("tp", 2).unwrap().dim_names(), vec!["tp"]);
        let msg = |r: Result<NamedPlan>| match r {
            Err(PlacementError::Parallelism(m)) => m,
            other => panic!("{other:?}"),
        };
        assert!(msg(named_plan("single", 2)).contains("plan single runs on 1 rank, not 2"));
        assert!(msg(named_plan("ep-tp", 6 - 3)).contains("needs an even world size, got 3"));
        assert!(msg(named_plan("ep-fsdp", 5)).contains("got 5"));
        assert!(msg(named_plan("ep", 0)).contains("world size 0"));
        assert!(msg(named_plan("pp", 2)).contains("unknown plan 'pp' (known: single, ep"));
    }

    #[test]
    fn moe_placements_per_role() {
        use MeshRole::*;
        use MoeParam::*;
        let table = [
            // (param, role, sp, placement)
            (Tokens, Tp, false, "R"),
            (Tokens, Tp, true, "S(0)"),
            (Tokens, Ep, false, "S(0)"),
            (Tokens, Fsdp, false, "S(0)"),
            (Tokens, Dp, false, "S(0)"),
            (Replicated, Ep, true, "R"),
            (GateAndUp, Ep, false, "S(0)"),
            (GateAndUp, Tp, true, "_S(2, 2)"),
            (GateAndUp, Fsdp, false, "S(1)"),
            (GateAndUp, Dp, false, "R"),
            (Down, Tp, false, "S(1)"),
            (Down, Fsdp, false, "S(1)"),
            (GateUpBias, Tp, false, "_S(1, 2)"),
            (GateUpBias, Ep, false, "S(0)"),
            (GateUpBias, Fsdp, false, "R"),
            (DownBias, Tp, false, "R"),
            (DownBias, Ep, false, "S(0)"),
        ];
        for (param, role, sp, want) in table {
            assert_eq!(
                moe_placement(param, role, sp).to_string(),
                want,
                "{param:?} {role:?} sp={sp}"
            );
        }
        let tp_sp = named_plan("tp-sp", 2).unwrap();
        assert_eq!(format_placements(&tp_sp.placements(Tokens)), "[S(0)]");
        let tp = named_plan("tp", 2).unwrap();
        assert_eq!(format_placements(&tp.placements(Tokens)), "[R]");
    }

    #[test]
    fn native_keys_name_their_block_tensor() {
        use MoeParam::*;
        let of = NamedPlan::param_of_native_key;
        let l = "model.layers.3.mlp.experts.";
        assert_eq!(of(&format!("{l}gate_and_up_projs")), GateAndUp);
        assert_eq!(of(&format!("{l}down_projs")), Down);
        assert_eq!(of(&format!("{l}gate_up_proj_bias")), GateUpBias);
        assert_eq!(of(&format!("{l}down_proj_bias")), DownBias);
        // The same last names outside an experts module, and other tensors, are replicated.
        for k in [
            "model.layers.3.mlp.shared_expert.gate_and_up_projs",
            "model.layers.3.mlp.shared_expert.down_projs",
            "model.layers.3.mlp.shared_expert.gate_up_proj_bias",
            "model.layers.3.mlp.shared_expert.down_proj_bias",
            "model.layers.3.mlp.gate.weight",
            "model.embed_tokens.weight",
        ] {
            assert_eq!(of(k), Replicated, "{k}");
        }
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
