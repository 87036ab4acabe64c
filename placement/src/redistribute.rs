//! Redistribution planning: the step list of PyTorch's default greedy planner, the collective of
//! each step, the bytes each rank sends and receives, and a cheaper alternative where one exists.
//!
//! Source: `DTensorRedistributePlanner.generate_greedy_transform_infos` and
//! `redistribute_local_tensor` in `torch/distributed/tensor/_redistribute.py`, the public checks of
//! `DTensor.redistribute` in `torch/distributed/tensor/_api.py` (torch 2.15). Plans are pure data;
//! the `collectives` crate executes them.

use std::collections::BTreeMap;

use crate::cost::num_shards;
pub use crate::cost::CostModel;
use crate::error::{PlacementError, Result};
use crate::graph_plan::{graph_steps, DistState, GraphStep};
use crate::local::{check_placements, local_shard};
use crate::mesh::DeviceMesh;
use crate::placement::{check_partial_ops, Placement};
use crate::shard_order::{
    default_shard_order, placements_to_shard_order, shard_order_to_placements, ShardOrderEntry,
};

/// What one step does on its mesh dim (see the table in `placement.md`, "Redistribution").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Collective {
    /// `S(i)`/`_S(i)` -> `R`: pad to `ceil(n/k)`, all-gather on dim i, narrow to n.
    AllGather,
    /// `P(op)` -> `R`: all-reduce with `op`.
    AllReduce,
    /// `P(op)` -> `S(i)`: reduce-scatter on dim i (pad when uneven, unpad after).
    ReduceScatter,
    /// `S(i)` -> `S(j)`: all-to-all (gather i, shard j) with pad/unpad.
    AllToAll,
    /// `R` -> `S(i)`/`_S(i)`, `S(i)` -> `P(sum)`, `R` -> `P(op)`: local, no communication.
    Local,
    /// A mesh dim of size 1: PyTorch lists the step but communicates nothing.
    Noop,
}

/// Device type of the mesh: decides how PyTorch runs `S(i)` -> `S(j)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DeviceType {
    /// CPU (gloo): `shard_dim_alltoall` falls back to all-gather + chunk
    /// (`_collective_utils.py`), so CommDebugMode counts an all-gather.
    Cpu,
    /// CUDA (NCCL), or CPU under `LocalTensorMode`: a real all-to-all, counted as
    /// `_dtensor.shard_dim_alltoall`.
    Cuda,
}

impl Collective {
    /// The name CommDebugMode counts on `device` (the CPU mesh counts an all-to-all as
    /// `c10d_functional.all_gather_into_tensor`); `None` for steps without communication.
    pub fn comm_name_on(&self, device: DeviceType) -> Option<&'static str> {
        match (self, device) {
            (Collective::AllToAll, DeviceType::Cpu) => Collective::AllGather.comm_name(),
            _ => self.comm_name(),
        }
    }

    /// The name CommDebugMode counts on a CUDA mesh (`c10d_functional.all_gather_into_tensor`,
    /// `c10d_functional.all_reduce`, `c10d_functional.reduce_scatter_tensor`,
    /// `_dtensor.shard_dim_alltoall`); `None` for steps without communication.
    pub fn comm_name(&self) -> Option<&'static str> {
        match self {
            Collective::AllGather => Some("c10d_functional.all_gather_into_tensor"),
            Collective::AllReduce => Some("c10d_functional.all_reduce"),
            Collective::ReduceScatter => Some("c10d_functional.reduce_scatter_tensor"),
            Collective::AllToAll => Some("_dtensor.shard_dim_alltoall"),
            Collective::Local | Collective::Noop => None,
        }
    }
}

/// One transform of the plan: mesh dim `mesh_dim` goes from `src` to `dst`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    /// Mesh dim whose placement changes.
    pub mesh_dim: usize,
    /// Placement before the step.
    pub src: Placement,
    /// Placement after the step.
    pub dst: Placement,
    /// What runs (collectives named as CommDebugMode names them by [`Collective::comm_name`]).
    pub collective: Collective,
    /// Placements of all mesh dims before this step (`_S` where the shard order is not left to
    /// right, so that [`crate::local_shard`] gives each rank's data before the step).
    pub before: Vec<Placement>,
    /// Shard order before this step: the mesh dims splitting each tensor dim, first to last. A
    /// step on a shard moves the last mesh dim of its tensor dim's order.
    pub shard_order: Vec<ShardOrderEntry>,
}

/// Which of PyTorch's planners made a plan (`_gen_transform_infos_non_cached`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Planner {
    /// `generate_greedy_transform_infos`: no `_S`, or a split factor that decodes into no order.
    Greedy,
    /// `generate_graph_based_transform_infos`: a `_S` in the source or target that decodes into
    /// a shard order (Dijkstra over sharding states, module `graph_plan`).
    Graph,
}

/// A redistribution plan: PyTorch's steps, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedistributePlan {
    /// The steps, in execution order.
    pub steps: Vec<Step>,
    /// Global shape the plan was made for.
    pub global_shape: Vec<usize>,
    /// Mesh shape.
    pub mesh_shape: Vec<usize>,
    /// Source placements.
    pub src: Vec<Placement>,
    /// Target placements.
    pub dst: Vec<Placement>,
    /// The planner PyTorch uses for this pair.
    pub planner: Planner,
    /// A plan with fewer collectives where one exists (see [`cheaper_alternative`]); PyTorch's
    /// plan stays the default.
    pub alternative: Option<AlternativePlan>,
}

impl RedistributePlan {
    /// Collective name -> count, as `CommDebugMode.get_comm_counts()` reports for this plan on a
    /// CUDA mesh.
    pub fn comm_counts(&self) -> BTreeMap<&'static str, usize> {
        self.comm_counts_on(DeviceType::Cuda)
    }

    /// Collective name -> count as CommDebugMode reports on a mesh of `device`.
    pub fn comm_counts_on(&self, device: DeviceType) -> BTreeMap<&'static str, usize> {
        let mut m = BTreeMap::new();
        for s in &self.steps {
            if let Some(n) = s.collective.comm_name_on(device) {
                *m.entry(n).or_insert(0) += 1;
            }
        }
        m
    }
}

/// A merged step of the alternative plan: one collective over several mesh dims flattened
/// together (PyTorch does this only when a flattened mesh with those dims exists; its planner
/// warns "N sequential all_gather operations will be performed ... flatten mesh dimensions").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MergedStep {
    /// Mesh dims flattened into one group.
    pub mesh_dims: Vec<usize>,
    /// The collective run once over the flattened group.
    pub collective: Collective,
    /// Original steps merged (indices into [`RedistributePlan::steps`]).
    pub merged: Vec<usize>,
}

/// A cheaper alternative to PyTorch's plan: same data movement, fewer collective launches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AlternativePlan {
    /// The steps.
    pub steps: Vec<MergedStep>,
    /// Collectives launched by PyTorch's plan.
    pub pytorch_collectives: usize,
    /// Collectives launched by this plan.
    pub collectives: usize,
}

/// Bytes one rank sends and receives in one step (ring-algorithm volumes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StepTraffic {
    /// Bytes sent by the rank.
    pub send_bytes: usize,
    /// Bytes received by the rank.
    pub recv_bytes: usize,
}

/// Collective of one `src -> dst` step on a mesh dim of size `k`; errors on pairs the public API
/// rejects (`_api.py`: to a Partial only from the same Partial or `S(d)` -> `P(sum)`).
fn step_collective(
    mesh_dim: usize,
    k: usize,
    src: Placement,
    dst: Placement,
) -> Result<Collective> {
    let reject = |reason: &str| PlacementError::UnsupportedRedistribute {
        mesh_dim,
        src,
        dst,
        reason: reason.to_string(),
    };
    if let Placement::Partial(op) = dst {
        let ok = src == dst
            || (matches!(src, Placement::Shard(_)) && op == crate::placement::PartialOp::Sum);
        if !ok {
            return Err(reject(
                "DTensor.redistribute supports only Shard(dim) -> Partial(sum) among conversions to Partial (_api.py)",
            ));
        }
    }
    if k == 1 {
        return Ok(Collective::Noop);
    }
    Ok(match (src, dst) {
        (Placement::Partial(_), Placement::Replicate) => Collective::AllReduce,
        (Placement::Partial(_), Placement::Shard(_)) => Collective::ReduceScatter,
        (Placement::Partial(_), Placement::StridedShard { .. }) => Collective::AllReduce,
        (s, Placement::Replicate) if s.is_shard() => Collective::AllGather,
        (Placement::Shard(i), Placement::Shard(j)) if i != j => Collective::AllToAll,
        (Placement::Shard(_), Placement::Shard(_)) => Collective::Local,
        (s, d) if s.is_shard() && d.is_shard() => Collective::AllGather,
        (Placement::Shard(_), Placement::StridedShard { .. }) => Collective::AllGather,
        _ => Collective::Local,
    })
}

/// PyTorch's default greedy plan from `src` to `dst` for a tensor of `global_shape` on `mesh`.
///
/// Rule (`generate_greedy_transform_infos`): on a 1-D mesh one step when `src != dst`. Otherwise,
/// when the source has more than one shard (product of mesh sizes of shard placements > 1), walk
/// mesh dims last to first: if the target there is `S(d)` and the earlier mesh dims sharding `d`
/// differ between current and target placements, the target becomes `R` for now; emit a step
/// when current != target. Then walk first to last and emit what still differs. Steps on mesh
/// dims of size 1 are listed with [`Collective::Noop`]. `(S0,S0)->(R,S0)`: m1 S0->R, m0 S0->R,
/// m1 R->S0.
///
/// With a `_StridedShard` in `src` or `dst` whose split factors decode into shard orders,
/// PyTorch's graph planner instead (module `graph_plan`, costs of [`CostModel::default`]:
/// float32 on a CPU mesh; [`plan_redistribute_with`] sets others): the steps then name plain
/// `S(d)` placements, each moving the last mesh dim of its tensor dim's shard order
/// ([`Step::shard_order`]). `[_S(0, 2), S(0)] -> [R, R]` on `[2, 2]` (order: mesh dim 1, then 0)
/// is m0 S(0)->R, then m1 S(0)->R. An undecodable `_S` (e.g. `_S(0, 3)` on a 1-D mesh) keeps the
/// greedy walk, as PyTorch does.
///
/// Errors: placement counts, shard dims out of range, mixed Partial ops, and conversions to
/// Partial that the public API rejects ([`PlacementError::UnsupportedRedistribute`]).
pub fn plan_redistribute(
    global_shape: &[usize],
    mesh: &DeviceMesh,
    src: &[Placement],
    dst: &[Placement],
) -> Result<RedistributePlan> {
    plan_redistribute_with(global_shape, mesh, src, dst, CostModel::default())
}

/// [`plan_redistribute`] with the element size and devices per host of `model`, which the graph
/// planner's costs (and so its choice between paths) depend on.
///
/// Errors: as [`plan_redistribute`].
pub fn plan_redistribute_with(
    global_shape: &[usize],
    mesh: &DeviceMesh,
    src: &[Placement],
    dst: &[Placement],
    model: CostModel,
) -> Result<RedistributePlan> {
    check_placements(mesh, src, global_shape.len())?;
    check_placements(mesh, dst, global_shape.len())?;
    check_partial_ops(src)?;
    check_partial_ops(dst)?;
    let sizes = mesh.shape();
    // Validate every pair first, as the public API does before planning.
    for (m, (&s, &d)) in src.iter().zip(dst).enumerate() {
        if s != d {
            step_collective(m, sizes[m], s, d)?;
        }
    }
    let mut steps = Vec::new();
    let mut planner = Planner::Greedy;
    if let Some(graph) = graph_plan(global_shape, mesh, src, dst, model)? {
        planner = Planner::Graph;
        for (state, m, from, to) in graph {
            steps.push(Step {
                mesh_dim: m,
                src: from,
                dst: to,
                collective: step_collective(m, sizes[m], from, to)?,
                before: shard_order_to_placements(&state.entries(), &state.placements, mesh)?,
                shard_order: state.entries(),
            });
        }
    } else {
        let mut current = src.to_vec();
        for (m, from, to) in greedy_steps(sizes, src, dst) {
            let collective = step_collective(m, sizes[m], from, to)?;
            steps.push(Step {
                mesh_dim: m,
                src: from,
                dst: to,
                collective,
                shard_order: default_shard_order(&current),
                before: current.clone(),
            });
            current[m] = to;
        }
    }
    let mut plan = RedistributePlan {
        steps,
        global_shape: global_shape.to_vec(),
        mesh_shape: sizes.to_vec(),
        src: src.to_vec(),
        dst: dst.to_vec(),
        planner,
        alternative: None,
    };
    plan.alternative = cheaper_alternative(&plan);
    Ok(plan)
}

/// PyTorch's choice of planner (`_gen_transform_infos_non_cached`): with a `_StridedShard` in the
/// source or target, the graph planner on the decoded shard orders (`_S(d, sf)` read as `S(d)` in
/// the order its split factor encodes, [`placements_to_shard_order`]); `None` (the greedy walk)
/// without `_S` or when a split factor decodes into no order (`_StridedShardNotDecodableError`).
fn graph_plan(
    global_shape: &[usize],
    mesh: &DeviceMesh,
    src: &[Placement],
    dst: &[Placement],
    model: CostModel,
) -> Result<Option<Vec<GraphStep>>> {
    if !src.iter().chain(dst).any(Placement::is_strided_shard) {
        return Ok(None);
    }
    let (Some(so), Some(dso)) = (
        placements_to_shard_order(src, mesh)?,
        placements_to_shard_order(dst, mesh)?,
    ) else {
        return Ok(None);
    };
    let plain = |p: &[Placement]| -> Vec<Placement> {
        p.iter()
            .map(|&q| match q {
                Placement::StridedShard { dim, .. } => Placement::Shard(dim),
                q => q,
            })
            .collect()
    };
    let from = DistState::new(plain(src), &so);
    let to = DistState::new(plain(dst), &dso);
    graph_steps(global_shape, mesh.shape(), &from, &to, model).map(Some)
}

/// The `(mesh_dim, from, to)` transforms of PyTorch's greedy planner
/// (`generate_greedy_transform_infos`, `_redistribute.py`), without the public API's checks: the
/// walk [`plan_redistribute`] documents. Also used to cost strategies (`strategy.rs`), where PyTorch
/// plans transitions the public API would refuse (e.g. `R` -> `P(sum)`, cost 0).
pub(crate) fn greedy_steps(
    sizes: &[usize],
    src: &[Placement],
    dst: &[Placement],
) -> Vec<(usize, Placement, Placement)> {
    let mut current = src.to_vec();
    let mut steps = Vec::new();
    let mut push = |current: &mut Vec<Placement>, m: usize, target: Placement| {
        steps.push((m, current[m], target));
        current[m] = target;
    };
    if sizes.len() == 1 {
        if src[0] != dst[0] {
            push(&mut current, 0, dst[0]);
        }
        return steps;
    }
    let shards = num_shards(src, sizes);
    if shards > 1 {
        for m in (0..current.len()).rev() {
            let mut target = dst[m];
            if let Placement::Shard(d) = target {
                // `Placement.is_shard(d)`: false for `_S` in torch 2.15.
                let cur: Vec<usize> = (0..m)
                    .filter(|&i| current[i] == Placement::Shard(d))
                    .collect();
                let tgt: Vec<usize> = (0..m).filter(|&i| dst[i] == Placement::Shard(d)).collect();
                if cur != tgt {
                    target = Placement::Replicate;
                }
            }
            if current[m] != target {
                push(&mut current, m, target);
            }
        }
    }
    for m in 0..current.len() {
        if current[m] != dst[m] {
            push(&mut current, m, dst[m]);
        }
    }
    steps
}

/// The alternative plan: consecutive steps with the same collective and the same placement
/// change (e.g. two `S(0)` -> `R` all-gathers on mesh dims 1 and 0) merge into one collective
/// over the flattened mesh dims, as PyTorch does when a flattened mesh exists
/// (`_optimize_transform_infos`). `None` when nothing merges.
pub fn cheaper_alternative(plan: &RedistributePlan) -> Option<AlternativePlan> {
    let mut merged: Vec<MergedStep> = Vec::new();
    let pytorch = plan
        .steps
        .iter()
        .filter(|s| s.collective.comm_name().is_some())
        .count();
    for (i, s) in plan.steps.iter().enumerate() {
        if let Some(last) = merged.last_mut() {
            let prev = &plan.steps[*last.merged.last().unwrap_or(&i)];
            let mergeable = s.collective.comm_name().is_some()
                && s.collective == last.collective
                && s.collective != Collective::AllToAll
                && prev.src == s.src
                && prev.dst == s.dst;
            if mergeable {
                last.mesh_dims.push(s.mesh_dim);
                last.merged.push(i);
                continue;
            }
        }
        merged.push(MergedStep {
            mesh_dims: vec![s.mesh_dim],
            collective: s.collective,
            merged: vec![i],
        });
    }
    let count = merged
        .iter()
        .filter(|s| s.collective.comm_name().is_some())
        .count();
    (count < pytorch).then_some(AlternativePlan {
        steps: merged,
        pytorch_collectives: pytorch,
        collectives: count,
    })
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
    let g = &plan.global_shape;
    let overflow = || PlacementError::Overflow {
        what: "bytes of a redistribution step".to_string(),
    };
    let mut out = Vec::with_capacity(plan.steps.len());
    for step in &plan.steps {
        let k = mesh.shape()[step.mesh_dim];
        let mut after = step.before.clone();
        after[step.mesh_dim] = step.dst;
        let mut per_rank = Vec::with_capacity(mesh.size());
        for rank in 0..mesh.size() {
            let coord = mesh.coordinate(rank)?;
            // Shape this mesh dim works on: the placements of the step with the mesh dim's own
            // placement replaced by R (the tensor "seen" by the group).
            let mut logical_p = step.before.clone();
            logical_p[step.mesh_dim] = Placement::Replicate;
            let logical = local_shard(g, mesh, &logical_p, &coord)?.local_shape;
            let elems = |shape: &[usize]| -> Result<usize> {
                shape
                    .iter()
                    .try_fold(1usize, |a, &b| a.checked_mul(b))
                    .ok_or_else(overflow)
            };
            let padded_chunk = |d: usize| -> Result<usize> {
                let mut s = logical.clone();
                s[d] = s[d].div_ceil(k);
                elems(&s)
            };
            let moved = match step.collective {
                Collective::AllGather | Collective::ReduceScatter => {
                    let d = step.src.shard_dim().or(step.dst.shard_dim()).unwrap_or(0);
                    padded_chunk(d)?.checked_mul(k - 1).ok_or_else(overflow)?
                }
                Collective::AllReduce => {
                    // k >= 2 here: a size-1 mesh dim is a Noop step.
                    let n = elems(&logical)?;
                    let b = n / k + usize::from(coord[step.mesh_dim] < n % k);
                    b.checked_mul(k.saturating_sub(2))
                        .and_then(|x| x.checked_add(n))
                        .ok_or_else(overflow)?
                }
                Collective::AllToAll => {
                    // Local piece: sharded on src dim, split k ways on dst dim (padded).
                    let (Some(i), Some(j)) = (step.src.shard_dim(), step.dst.shard_dim()) else {
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
        out.push(per_rank);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::placement::parse_placements;

    fn plan(g: &[usize], mesh: &[usize], src: &str, dst: &str) -> Result<RedistributePlan> {
        plan_redistribute(
            g,
            &DeviceMesh::new(mesh.to_vec()).unwrap(),
            &parse_placements(src).unwrap(),
            &parse_placements(dst).unwrap(),
        )
    }

    fn brief(p: &RedistributePlan) -> Vec<(usize, String, String)> {
        p.steps
            .iter()
            .map(|s| (s.mesh_dim, s.src.to_string(), s.dst.to_string()))
            .collect()
    }

    #[test]
    fn placement_md_examples() {
        // (S0,S0)->(R,S0): m1 S0->R, m0 S0->R, m1 R->S0.
        let p = plan(&[8], &[2, 2], "[S(0), S(0)]", "[R, S(0)]").unwrap();
        assert_eq!(
            brief(&p),
            vec![
                (1, "S(0)".into(), "R".into()),
                (0, "S(0)".into(), "R".into()),
                (1, "R".into(), "S(0)".into())
            ]
        );
        assert_eq!(p.comm_counts()["c10d_functional.all_gather_into_tensor"], 2);
        // The two gathers merge on a flattened mesh.
        let alt = p.alternative.as_ref().unwrap();
        assert_eq!((alt.pytorch_collectives, alt.collectives), (2, 1));
        // (S0,S1)->(S1,S0): m1 S1->R, m0 S0->S1 (all-to-all), m1 R->S0.
        let p = plan(&[8, 8], &[2, 2], "[S(0), S(1)]", "[S(1), S(0)]").unwrap();
        assert_eq!(
            brief(&p),
            vec![
                (1, "S(1)".into(), "R".into()),
                (0, "S(0)".into(), "S(1)".into()),
                (1, "R".into(), "S(0)".into())
            ]
        );
        assert_eq!(p.steps[1].collective, Collective::AllToAll);
        assert_eq!(p.steps[2].collective, Collective::Local);
    }

    #[test]
    fn strided_source_takes_the_graph_planner() {
        // [_S(0, 2), S(0)] on [2, 2] is tensor dim 0 split by mesh dim 1, then mesh dim 0: the
        // last split (mesh dim 0) is gathered first.
        let p = plan(&[8], &[2, 2], "[_S(0, 2), S(0)]", "[R, R]").unwrap();
        assert_eq!(p.planner, Planner::Graph);
        assert_eq!(
            brief(&p),
            vec![
                (0, "S(0)".into(), "R".into()),
                (1, "S(0)".into(), "R".into())
            ]
        );
        assert_eq!(
            p.steps[0].before,
            parse_placements("[_S(0, 2), S(0)]").unwrap()
        );
        assert_eq!(p.steps[0].shard_order[0].mesh_dims, vec![1, 0]);
        // The greedy walk would gather mesh dim 1 first.
        let g = plan(&[8], &[2, 2], "[S(0), S(0)]", "[R, R]").unwrap();
        assert_eq!(g.planner, Planner::Greedy);
        assert_eq!(g.steps[0].mesh_dim, 1);
        // A split factor no order gives: greedy, as PyTorch falls back.
        let u = plan(&[12], &[2], "[_S(0, 3)]", "[R]").unwrap();
        assert_eq!(u.planner, Planner::Greedy);
    }

    #[test]
    fn partial_rules() {
        assert_eq!(
            plan(&[4], &[2], "[P(sum)]", "[S(0)]").unwrap().steps[0].collective,
            Collective::ReduceScatter
        );
        assert_eq!(
            plan(&[4], &[2], "[S(0)]", "[P(sum)]").unwrap().steps[0].collective,
            Collective::Local
        );
        assert!(matches!(
            plan(&[4], &[2], "[R]", "[P(sum)]"),
            Err(PlacementError::UnsupportedRedistribute { .. })
        ));
        assert!(plan(&[4], &[2], "[P(sum)]", "[P(avg)]").is_err());
        // Size-1 mesh dim: listed, no communication.
        let p = plan(&[4], &[1, 2], "[S(0), R]", "[R, R]").unwrap();
        assert_eq!(p.steps[0].collective, Collective::Noop);
        assert!(p.comm_counts().is_empty());
    }

    #[test]
    fn traffic_hand_worked() {
        // 5 rows of 3 over 4 ranks, S(0) -> R: padded chunk 2x3 = 6 elems, 3 peers, f32.
        let mesh = DeviceMesh::new(vec![4]).unwrap();
        let p = plan(&[5, 3], &[4], "[S(0)]", "[R]").unwrap();
        let t = plan_traffic(&p, &mesh, 4).unwrap();
        assert!(t[0].iter().all(|s| s.send_bytes == 6 * 3 * 4));
        // All-reduce of 5x3 over 4 ranks, blocks [4, 4, 4, 3]: rank 0 moves 15 + 2 * 4 = 23
        // elems, rank 3 15 + 2 * 3 = 21.
        let p = plan(&[5, 3], &[4], "[P(sum)]", "[R]").unwrap();
        let t = plan_traffic(&p, &mesh, 1).unwrap();
        assert_eq!((t[0][0].send_bytes, t[0][3].recv_bytes), (23, 21));
    }
}
