//! Parallel plans for one MoE block: a device mesh over the world, which mesh dims shard the tokens,
//! and the DTensor placements of every parameter and activation on that mesh.
//!
//! Sources: torchtitan `distributed/expert_parallel.py` (EP: experts `S(0)`, contiguous ranges),
//! HF transformers `integrations/tensor_parallel.py` (`packed_colwise` gate_up = `_S(-1, 2)` in the
//! native `x @ W` layout, rowwise down = `S(1)`), Megatron SP (sequence `S(0)` on the TP group),
//! NeMo Automodel / FSDP2 (`S(1)` on expert weights when the FSDP dim shards a dim other than E).

use placement::{DeviceMesh, Placement};

/// The plans the `parallel` suite checks (names as the CLI takes them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, clap::ValueEnum)]
pub enum PlanKind {
    /// One mesh dim, everything replicated (the single-device computation through the same code).
    Single,
    /// Expert parallel over all ranks: experts `S(0)`, tokens `S(0)`, all_to_all dispatch/combine.
    Ep,
    /// Tensor parallel on the experts over all ranks: packed gate_up `_S(2, 2)`, down `S(1)`,
    /// tokens replicated, `f` on hidden states and routing weights, `g` on the output.
    Tp,
    /// `Tp` with sequence parallelism around the block: tokens `S(0)`, all_gather in,
    /// reduce_scatter out, the router on the local sequence shard.
    #[value(name = "tp-sp")]
    TpSp,
    /// FSDP over all ranks: expert weights `S(1)` (all_gather before use, reduce_scatter of the
    /// gradients), tokens `S(0)`.
    Fsdp,
    /// 2-D mesh `[ep, tp]` (`tp` = 2).
    #[value(name = "ep-tp")]
    EpTp,
    /// 2-D mesh `[ep, fsdp]` (`fsdp` = 2).
    #[value(name = "ep-fsdp")]
    EpFsdp,
}

impl PlanKind {
    /// Every plan, in report order.
    pub const ALL: [PlanKind; 7] = [
        PlanKind::Single,
        PlanKind::Ep,
        PlanKind::Tp,
        PlanKind::TpSp,
        PlanKind::Fsdp,
        PlanKind::EpTp,
        PlanKind::EpFsdp,
    ];

    /// CLI / report name.
    pub fn name(self) -> &'static str {
        match self {
            PlanKind::Single => "single",
            PlanKind::Ep => "ep",
            PlanKind::Tp => "tp",
            PlanKind::TpSp => "tp-sp",
            PlanKind::Fsdp => "fsdp",
            PlanKind::EpTp => "ep-tp",
            PlanKind::EpFsdp => "ep-fsdp",
        }
    }
}

/// A deliberately wrong plan, to show that the suite catches each classic bug (tests only).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mutation {
    /// Drop `f` on the routing weights under TP: their gradient stays a per-rank partial sum
    /// (torchtitan issues 1878 / 2416).
    #[value(name = "drop-routing-weight-f")]
    DropRoutingWeightF,
    /// Keep `S(1)` on `down_projs` after transposing it to `[E, H, I]` (should become `S(2)`).
    #[value(name = "keep-shard-after-transpose")]
    KeepShardAfterTranspose,
    /// Skip the all_reduce of the replicated router's gradient over the ranks that hold different
    /// tokens.
    #[value(name = "skip-router-grad-reduce")]
    SkipRouterGradReduce,
}

impl Mutation {
    /// CLI name.
    pub fn name(self) -> &'static str {
        match self {
            Mutation::DropRoutingWeightF => "drop-routing-weight-f",
            Mutation::KeepShardAfterTranspose => "keep-shard-after-transpose",
            Mutation::SkipRouterGradReduce => "skip-router-grad-reduce",
        }
    }
}

/// Which tensor of the block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Param {
    /// Router `[E, H]`, router bias `[E]`, selection bias `[E]`, shared expert, shared gate.
    Replicated,
    /// `gate_and_up_projs` `[E, H, 2I]`.
    GateAndUp,
    /// `down_projs` `[E, I, H]`.
    Down,
    /// `gate_up_bias` `[E, 2I]`.
    GateUpBias,
    /// `down_bias` `[E, H]`.
    DownBias,
    /// Hidden states / block output / their gradients `[T, H]`, routing weights `[T, k]`.
    Tokens,
}

/// A plan instantiated for a world size.
#[derive(Debug, Clone)]
pub struct ParallelPlan {
    pub kind: PlanKind,
    /// Mesh over the world (row-major ranks), dims named `ep` / `tp` / `fsdp` / `dp`.
    pub mesh: DeviceMesh,
    pub ep: Option<usize>,
    pub tp: Option<usize>,
    pub fsdp: Option<usize>,
    /// Sequence parallel on the `tp` dim.
    pub sp: bool,
}

impl ParallelPlan {
    /// The plan at `world` ranks. 2-D plans need an even world (or 1: a `[1, 1]` mesh).
    ///
    /// Errors: a 2-D plan at an odd world size > 1 (the suite reports it as skipped).
    pub fn new(kind: PlanKind, world: usize) -> Result<Self, String> {
        let one = |name: &str| DeviceMesh::with_dim_names(vec![world], vec![name.into()]);
        let two = |a: &str, b: &str| {
            if world > 1 && world % 2 != 0 {
                return Err(format!(
                    "plan {} needs an even world size, got {world}",
                    kind.name()
                ));
            }
            let inner = world.min(2);
            DeviceMesh::with_dim_names(vec![world / inner, inner], vec![a.into(), b.into()])
                .map_err(|e| e.to_string())
        };
        let e = |r: placement::Result<DeviceMesh>| r.map_err(|e| e.to_string());
        let (mesh, ep, tp, fsdp, sp) = match kind {
            PlanKind::Single => {
                if world != 1 {
                    return Err(format!("plan single runs on 1 rank, not {world}"));
                }
                (e(one("dp"))?, None, None, None, false)
            }
            PlanKind::Ep => (e(one("ep"))?, Some(0), None, None, false),
            PlanKind::Tp => (e(one("tp"))?, None, Some(0), None, false),
            PlanKind::TpSp => (e(one("tp"))?, None, Some(0), None, true),
            PlanKind::Fsdp => (e(one("fsdp"))?, None, None, Some(0), false),
            PlanKind::EpTp => (two("ep", "tp")?, Some(0), Some(1), None, false),
            PlanKind::EpFsdp => (two("ep", "fsdp")?, Some(0), None, Some(1), false),
        };
        Ok(ParallelPlan {
            kind,
            mesh,
            ep,
            tp,
            fsdp,
            sp,
        })
    }

    /// A label with the mesh, e.g. `ep-tp [2, 2]`.
    pub fn label(&self) -> String {
        format!("{} {:?}", self.kind.name(), self.mesh.shape())
    }

    /// Whether mesh dim `d` shards the tokens (EP and FSDP are data parallel; TP only with SP).
    pub fn is_data_dim(&self, d: usize) -> bool {
        Some(d) == self.ep || Some(d) == self.fsdp || (self.sp && Some(d) == self.tp) || {
            // The `dp` dim of `single` (size 1) holds the whole batch.
            self.kind == PlanKind::Single
        }
    }

    /// Placements of `param` on the mesh, one per mesh dim.
    pub fn placements(&self, param: Param) -> Vec<Placement> {
        (0..self.mesh.ndim())
            .map(|d| {
                let role = if Some(d) == self.ep {
                    Role::Ep
                } else if Some(d) == self.tp {
                    Role::Tp
                } else if Some(d) == self.fsdp {
                    Role::Fsdp
                } else {
                    Role::Dp
                };
                placement_of(param, role, self.sp)
            })
            .collect()
    }
}

#[derive(Clone, Copy)]
enum Role {
    Ep,
    Tp,
    Fsdp,
    Dp,
}

fn placement_of(param: Param, role: Role, sp: bool) -> Placement {
    use Placement::{Replicate, Shard, StridedShard};
    match (param, role) {
        (Param::Replicated, _) => Replicate,
        (Param::Tokens, Role::Tp) if !sp => Replicate,
        (Param::Tokens, _) => Shard(0),
        (_, Role::Ep) => Shard(0),
        (Param::GateAndUp, Role::Tp) => StridedShard {
            dim: 2,
            split_factor: 2,
        },
        (Param::GateUpBias, Role::Tp) => StridedShard {
            dim: 1,
            split_factor: 2,
        },
        (Param::Down, Role::Tp) => Shard(1),
        (Param::GateAndUp | Param::Down, Role::Fsdp) => Shard(1),
        (Param::DownBias, _) | (Param::GateUpBias, _) => Replicate,
        (_, Role::Dp) => Replicate,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use placement::format_placements;

    #[test]
    fn placements_per_plan() {
        let p = ParallelPlan::new(PlanKind::EpTp, 4).unwrap();
        assert_eq!(p.mesh.shape(), &[2, 2]);
        assert_eq!(
            format_placements(&p.placements(Param::GateAndUp)),
            "[S(0), _S(2, 2)]"
        );
        assert_eq!(
            format_placements(&p.placements(Param::Down)),
            "[S(0), S(1)]"
        );
        assert_eq!(format_placements(&p.placements(Param::Tokens)), "[S(0), R]");
        let p = ParallelPlan::new(PlanKind::EpFsdp, 8).unwrap();
        assert_eq!(
            format_placements(&p.placements(Param::GateAndUp)),
            "[S(0), S(1)]"
        );
        assert_eq!(
            format_placements(&p.placements(Param::Tokens)),
            "[S(0), S(0)]"
        );
        let p = ParallelPlan::new(PlanKind::TpSp, 2).unwrap();
        assert_eq!(format_placements(&p.placements(Param::Tokens)), "[S(0)]");
        assert!(ParallelPlan::new(PlanKind::EpTp, 3).is_err());
        assert_eq!(
            ParallelPlan::new(PlanKind::EpTp, 1).unwrap().mesh.shape(),
            &[1, 1]
        );
    }
}
