//! Parallel plans for one MoE block: a device mesh over the world, which mesh dims shard the tokens,
//! and the DTensor placements of every parameter and activation on that mesh.
//!
//! Sources: torchtitan `distributed/expert_parallel.py` (EP: experts `S(0)`, contiguous ranges),
//! HF transformers `integrations/tensor_parallel.py` (`packed_colwise` gate_up = `_S(-1, 2)` in the
//! native `x @ W` layout, rowwise down = `S(1)`), Megatron SP (sequence `S(0)` on the TP group),
//! NeMo Automodel / FSDP2 (`S(1)` on expert weights when the FSDP dim shards a dim other than E).

use placement::parallel::{named_plan, MeshRole, NamedPlan};
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

/// Which tensor of the block (`placement::parallel::MoeParam`: the rules live in `placement`).
pub use placement::parallel::MoeParam as Param;

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
    /// The plan as `placement::parallel` defines it (mesh dims' roles).
    pub named: NamedPlan,
}

impl ParallelPlan {
    /// The plan at `world` ranks. 2-D plans need an even world (or 1: a `[1, 1]` mesh).
    ///
    /// Errors: a 2-D plan at an odd world size > 1 (the suite reports it as skipped).
    pub fn new(kind: PlanKind, world: usize) -> Result<Self, String> {
        let np = named_plan(kind.name(), world).map_err(|e| e.to_string())?;
        let mesh = DeviceMesh::with_dim_names(np.mesh_shape.clone(), np.dim_names())
            .map_err(|e| e.to_string())?;
        let pos = |r: MeshRole| np.roles.iter().position(|&x| x == r);
        Ok(ParallelPlan {
            kind,
            mesh,
            ep: pos(MeshRole::Ep),
            tp: pos(MeshRole::Tp),
            fsdp: pos(MeshRole::Fsdp),
            sp: np.sp,
            named: np,
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

    /// Placements of `param` on the mesh, one per mesh dim
    /// (`placement::parallel::moe_placement` of each dim's role).
    pub fn placements(&self, param: Param) -> Vec<Placement> {
        self.named.placements(param)
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
