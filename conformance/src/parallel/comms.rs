//! The communicators a plan needs on one rank: one per mesh dim (`mesh_dim_comm`), and the
//! data-parallel group (the ranks that hold different tokens and the same parameter shards), over
//! which the gradients of replicated parameters are summed.

use super::plan::ParallelPlan;
use collectives::{mesh_dim_comm, Communicator};

/// Sub-communicators of one rank for a [`ParallelPlan`]. Building them is collective.
pub struct PlanComms {
    /// Rank in the world.
    pub rank: usize,
    /// This rank's coordinate on the plan's mesh.
    pub coord: Vec<usize>,
    /// One communicator per mesh dim (size = that dim's size).
    pub dims: Vec<Box<dyn Communicator>>,
    /// The ranks that differ only on token-sharding dims (EP, FSDP, SP): replicated parameters'
    /// gradients are all_reduced (sum) over it.
    pub data: Box<dyn Communicator>,
}

impl PlanComms {
    /// Splits `world` for `plan`. Collective over `world`.
    ///
    /// Errors: the world size differs from the mesh size, or a split fails.
    pub fn new(world: &dyn Communicator, plan: &ParallelPlan) -> Result<Self, String> {
        let rank = world.rank();
        let coord = plan.mesh.coordinate(rank).map_err(|e| e.to_string())?;
        let dims = (0..plan.mesh.ndim())
            .map(|d| mesh_dim_comm(world, &plan.mesh, d).map_err(|e| e.to_string()))
            .collect::<Result<Vec<_>, _>>()?;
        // Color = the coordinates on the non-data dims; key = the world rank (row-major order).
        let shape = plan.mesh.shape();
        let color = (0..plan.mesh.ndim())
            .filter(|&d| !plan.is_data_dim(d))
            .fold(0usize, |acc, d| acc * shape[d] + coord[d]);
        let data = world.split(color, rank).map_err(|e| e.to_string())?;
        Ok(PlanComms {
            rank,
            coord,
            dims,
            data,
        })
    }

    /// The communicator of mesh dim `d`, if the plan has that role.
    pub fn dim(&self, d: Option<usize>) -> Option<&dyn Communicator> {
        d.map(|d| &*self.dims[d])
    }
}
