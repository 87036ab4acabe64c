//! `redistribute(placements)` with its backward, executing the `placement` crate's plan
//! (`placement::redistribute::plan_redistribute`, PyTorch's greedy planner) step by step on the
//! mesh-dim sub-communicators ([`crate::mesh_dim_comm`]).
//!
//! | step (mesh dim m, k ranks) | forward | backward (adjoint) |
//! |---|---|---|
//! | `S(i) -> R` (AllGather) | all_gather along i, torch.chunk sizes | keep own chunk |
//! | `P(sum) -> R` (AllReduce) | all_reduce sum | identity (DTensor keeps the grad `R`) |
//! | `P(sum) -> S(i)` (ReduceScatter) | reduce_scatter along i | all_gather along i |
//! | `S(i) -> S(j)` (AllToAll) | all_to_all: chunk q of dim j to rank q, concatenated along i | all_to_all from j back to i |
//! | `R -> S(i)` (Local) | keep chunk i | all_gather along i |
//! | size-1 mesh dim (Noop) | identity | identity |
//!
//! The chunk sizes of tensor dim i on mesh dim m follow the torch.chunk rule applied to the size
//! dim i has after the mesh dims before m in i's shard order ([`Step::shard_order`]; left to
//! right, `compute_local_shape_and_global_offset`, unless a `_StridedShard` encodes another
//! order). Source: `redistribute_local_tensor` and `Redistribute.backward` in
//! `torch/distributed/tensor/_redistribute.py` (torch 2.15).
//!
//! [`Redistribute::cheaper`] runs the plan's cheaper alternative instead: merged steps as one
//! collective on their flattened mesh dims ([`crate::mesh_dims_comm`]).
//!
//! Supported: `Shard`, `Replicate` and `Partial(sum)` sources, `Shard`/`Replicate` targets, and
//! `_StridedShard` on either side where its split factor encodes a shard order (PyTorch's graph
//! planner then plans on plain `S`, every step moving the last mesh dim of an order; the data
//! is that of nested torch.chunk splits in that order, which `_S` describes exactly when the
//! splits are even). Rejected at construction ([`AutogradError::Shape`]): other `_S`, other
//! Partial ops, Partial targets, and a greedy step whose tensor dim is also sharded by a later
//! mesh dim (PyTorch's planner avoids this by replicating the later dim first).

use super::ops::{all_reduce_sum, all_to_all_dim, chunk_dim, gather_dim, reduce_scatter_dim};
use super::{AutogradError, LocalTensor};
use crate::communicator::Communicator;
use crate::dtype::Element;
use crate::mesh::{mesh_dim_comm, mesh_dims_comm};
use placement::redistribute::{plan_redistribute, Collective, Planner, RedistributePlan, Step};
use placement::{DeviceMesh, PartialOp, Placement};

type Result<T> = std::result::Result<T, AutogradError>;

const OP: &str = "redistribute";

fn unsupported(reason: String) -> AutogradError {
    AutogradError::Shape { op: OP, reason }
}

/// The mesh dims splitting tensor dim `d` before `step`, first to last.
fn order_of(step: &Step, d: usize) -> &[usize] {
    step.shard_order
        .iter()
        .find(|e| e.tensor_dim == d)
        .map(|e| e.mesh_dims.as_slice())
        .unwrap_or(&[])
}

/// A redistribution `src -> dst` of a tensor of `global_shape` on `mesh`, as a
/// forward/backward pair. Both methods are collective over the WORLD communicator whose ranks
/// are the mesh's ranks (row-major).
#[derive(Debug, Clone)]
pub struct Redistribute {
    mesh: DeviceMesh,
    plan: RedistributePlan,
    /// The steps run as one collective each, in order: `[i]` per step for PyTorch's plan, the
    /// merged steps of [`RedistributePlan::alternative`] for [`Redistribute::cheaper`].
    groups: Vec<Vec<usize>>,
}

impl Redistribute {
    /// Plans `src -> dst` (PyTorch's greedy plan) and checks that every step is supported.
    ///
    /// Errors: the planner's errors (as [`AutogradError::Shape`]), unsupported placements
    /// (see the module doc).
    pub fn new(
        global_shape: &[usize],
        mesh: &DeviceMesh,
        src: &[Placement],
        dst: &[Placement],
    ) -> Result<Self> {
        let plan = plan_redistribute(global_shape, mesh, src, dst)
            .map_err(|e| unsupported(e.to_string()))?;
        let graph = plan.planner == Planner::Graph;
        for p in src {
            match p {
                Placement::StridedShard { .. } if !graph => {
                    return Err(unsupported(
                        "_StridedShard source whose split factor encodes no shard order".into(),
                    ))
                }
                Placement::Partial(op) if *op != PartialOp::Sum => {
                    return Err(unsupported(format!("Partial({}) source", op.as_str())))
                }
                _ => {}
            }
        }
        for p in dst {
            let strided_ok = graph && p.is_strided_shard();
            if !strided_ok && !matches!(p, Placement::Shard(_) | Placement::Replicate) {
                return Err(unsupported(format!("target placement {p:?}")));
            }
        }
        // A graph plan's steps each move the last mesh dim of their tensor dim's shard order
        // (or append one): the planner has no other moves. Greedy steps follow the mesh dims.
        for s in plan.steps.iter().filter(|_| !graph) {
            for d in [s.src.shard_dim(), s.dst.shard_dim()].into_iter().flatten() {
                let later = s.before[s.mesh_dim + 1..]
                    .iter()
                    .any(|p| p.shard_dim() == Some(d));
                if later && s.collective != Collective::Noop {
                    return Err(unsupported(format!(
                        "step on mesh dim {} moves tensor dim {d}, which a later mesh dim also \
                         shards (placements {:?})",
                        s.mesh_dim, s.before
                    )));
                }
            }
        }
        let groups = (0..plan.steps.len()).map(|i| vec![i]).collect();
        Ok(Redistribute {
            mesh: mesh.clone(),
            plan,
            groups,
        })
    }

    /// The same redistribution run as the plan's cheaper alternative
    /// ([`placement::redistribute::cheaper_alternative`]): each merged step one collective on
    /// the communicator of its flattened mesh dims ([`crate::mesh_dims_comm`]), with the unpadded
    /// nested chunks as pieces. `None` when the plan has no alternative.
    ///
    /// | merged step (mesh dims M) | forward | backward |
    /// |---|---|---|
    /// | `S(i) -> R` (AllGather, M descending) | all_gather along i over M ascending | keep own chunk |
    /// | `P(sum) -> R` (AllReduce) | all_reduce sum over M | identity |
    /// | `P(sum) -> S(i)` (ReduceScatter, M ascending) | reduce_scatter along i over M | all_gather along i |
    ///
    /// Sums of a merged all-reduce run over the flattened group in rank order, so they may
    /// round differently from PyTorch's per-dim sums.
    pub fn cheaper(&self) -> Option<Self> {
        let alt = self.plan.alternative.as_ref()?;
        Some(Redistribute {
            mesh: self.mesh.clone(),
            plan: self.plan.clone(),
            groups: alt.steps.iter().map(|m| m.merged.clone()).collect(),
        })
    }

    /// The steps of [`Redistribute::plan`] run as one collective each, in order.
    pub fn groups(&self) -> &[Vec<usize>] {
        &self.groups
    }

    /// The plan being executed.
    pub fn plan(&self) -> &RedistributePlan {
        &self.plan
    }

    /// Size of tensor dim `d` before the step's mesh dim splits it: the global size chunked by
    /// every mesh dim before it in `d`'s shard order (at this rank's coordinates).
    fn parent_size(&self, step: &Step, coord: &[usize], d: usize) -> Result<usize> {
        let mut n = self.plan.global_shape[d];
        for &m in order_of(step, d)
            .iter()
            .take_while(|&&m| m != step.mesh_dim)
        {
            n = placement::chunk(n, self.mesh.shape()[m], coord[m])
                .map_err(|e| unsupported(e.to_string()))?
                .0;
        }
        Ok(n)
    }

    fn sizes(&self, step: &Step, coord: &[usize], d: usize) -> Result<Vec<usize>> {
        let n = self.parent_size(step, coord, d)?;
        super::chunk_sizes(n, self.mesh.shape()[step.mesh_dim])
    }

    fn run<T: Element>(
        &self,
        world: &dyn Communicator,
        x: &LocalTensor<T>,
        backward: bool,
    ) -> Result<LocalTensor<T>> {
        let coord = self
            .mesh
            .coordinate(world.rank())
            .map_err(|e| unsupported(e.to_string()))?;
        let mut t = x.clone();
        let groups: Vec<&Vec<usize>> = if backward {
            self.groups.iter().rev().collect()
        } else {
            self.groups.iter().collect()
        };
        for group in groups {
            let steps = group
                .iter()
                .map(|&i| self.plan.steps.get(i))
                .collect::<Option<Vec<&Step>>>()
                .ok_or_else(|| unsupported(format!("merged step {group:?} names no step")))?;
            t = match steps.as_slice() {
                [step] => self.run_step(world, &coord, step, t, backward)?,
                _ => self.run_merged(world, &coord, &steps, t, backward)?,
            };
        }
        Ok(t)
    }

    /// One step of the plan on its mesh dim's communicator.
    fn run_step<T: Element>(
        &self,
        world: &dyn Communicator,
        coord: &[usize],
        step: &Step,
        t: LocalTensor<T>,
        backward: bool,
    ) -> Result<LocalTensor<T>> {
        if step.collective == Collective::Noop {
            return Ok(t);
        }
        let g = mesh_dim_comm(world, &self.mesh, step.mesh_dim)?;
        let g = &*g;
        Ok(match (step.src, step.dst, backward) {
            (Placement::Shard(i), Placement::Replicate, false) => {
                gather_dim(OP, g, &t, i, &self.sizes(step, coord, i)?)?
            }
            (Placement::Shard(i), Placement::Replicate, true) => {
                chunk_dim(OP, g, &t, i, &self.sizes(step, coord, i)?)?
            }
            (Placement::Partial(_), Placement::Replicate, false) => all_reduce_sum(g, &t)?,
            (Placement::Partial(_), Placement::Replicate, true) => t,
            (Placement::Partial(_), Placement::Shard(i), false) => {
                reduce_scatter_dim(OP, g, &t, i, &self.sizes(step, coord, i)?)?
            }
            (Placement::Partial(_), Placement::Shard(i), true) => {
                gather_dim(OP, g, &t, i, &self.sizes(step, coord, i)?)?
            }
            (Placement::Shard(i), Placement::Shard(j), false) => {
                let (si, sj) = (self.sizes(step, coord, i)?, self.sizes(step, coord, j)?);
                all_to_all_dim(OP, g, &t, (i, &si), (j, &sj))?
            }
            (Placement::Shard(i), Placement::Shard(j), true) => {
                let (si, sj) = (self.sizes(step, coord, i)?, self.sizes(step, coord, j)?);
                all_to_all_dim(OP, g, &t, (j, &sj), (i, &si))?
            }
            (Placement::Replicate, Placement::Shard(i), false) => {
                chunk_dim(OP, g, &t, i, &self.sizes(step, coord, i)?)?
            }
            (Placement::Replicate, Placement::Shard(i), true) => {
                gather_dim(OP, g, &t, i, &self.sizes(step, coord, i)?)?
            }
            (s, d, _) => {
                return Err(unsupported(format!(
                    "step {s:?} -> {d:?} on mesh dim {}",
                    step.mesh_dim
                )))
            }
        })
    }

    /// Consecutive steps with one `src -> dst` change run as one collective on their flattened
    /// mesh dims (ascending; the group's pieces are the nested chunks in data order).
    fn run_merged<T: Element>(
        &self,
        world: &dyn Communicator,
        coord: &[usize],
        steps: &[&Step],
        t: LocalTensor<T>,
        backward: bool,
    ) -> Result<LocalTensor<T>> {
        let Some(&first) = steps.first() else {
            return Ok(t);
        };
        let mut dims: Vec<usize> = steps.iter().map(|s| s.mesh_dim).collect();
        dims.sort_unstable();
        let g = mesh_dims_comm(world, &self.mesh, &dims)?;
        let g = &*g;
        // Pieces of tensor dim d over the group: the size d has before the first merged dim in
        // its shard order, split by the merged dims in ascending order.
        let pieces = |d: usize| -> Result<Vec<usize>> {
            let mut n = self.plan.global_shape[d];
            for &m in order_of(first, d).iter().take_while(|m| !dims.contains(m)) {
                n = placement::chunk(n, self.mesh.shape()[m], coord[m])
                    .map_err(|e| unsupported(e.to_string()))?
                    .0;
            }
            let mut sizes = vec![n];
            for &m in &dims {
                let k = self.mesh.shape()[m];
                sizes = sizes
                    .iter()
                    .map(|&p| super::chunk_sizes(p, k))
                    .collect::<Result<Vec<_>>>()?
                    .concat();
            }
            Ok(sizes)
        };
        Ok(match (first.src, first.dst, backward) {
            (Placement::Shard(i), Placement::Replicate, false) => {
                gather_dim(OP, g, &t, i, &pieces(i)?)?
            }
            (Placement::Shard(i), Placement::Replicate, true) => {
                chunk_dim(OP, g, &t, i, &pieces(i)?)?
            }
            (Placement::Partial(_), Placement::Replicate, false) => all_reduce_sum(g, &t)?,
            (Placement::Partial(_), Placement::Replicate, true) => t,
            (Placement::Partial(_), Placement::Shard(i), false) => {
                reduce_scatter_dim(OP, g, &t, i, &pieces(i)?)?
            }
            (Placement::Partial(_), Placement::Shard(i), true) => {
                gather_dim(OP, g, &t, i, &pieces(i)?)?
            }
            (s, d, _) => {
                return Err(unsupported(format!(
                    "merged step {s:?} -> {d:?} on mesh dims {dims:?}"
                )))
            }
        })
    }

    /// Forward: this rank's local tensor in `src` placements -> in `dst` placements.
    ///
    /// Errors: a collective failed, or the local shape does not fit the placements.
    pub fn forward<T: Element>(
        &self,
        world: &dyn Communicator,
        x: &LocalTensor<T>,
    ) -> Result<LocalTensor<T>> {
        self.run(world, x, false)
    }

    /// Backward: the gradient w.r.t. the `dst`-placed output -> the gradient w.r.t. the input
    /// (placed as `src`, with `Partial` mesh dims holding the replicated gradient, as DTensor's
    /// `Redistribute.backward` does).
    pub fn backward<T: Element>(
        &self,
        world: &dyn Communicator,
        grad_output: &LocalTensor<T>,
    ) -> Result<LocalTensor<T>> {
        self.run(world, grad_output, true)
    }
}
