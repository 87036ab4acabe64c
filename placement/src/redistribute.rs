//! Redistribution planning: the step list of PyTorch's default greedy planner (or its graph
//! planner), the collective of each step, and a cheaper alternative with merged steps where one
//! exists. The bytes each step moves: module `traffic`.
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

/// What one step does on its mesh dim (the rules of `step_collective`, from `_redistribute.py`).
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

/// The communication a `src -> dst` change needs whatever the mesh dim's size (PyTorch's
/// `_TransformInfo._comm_type_key`): what decides which steps may merge, so that a step on a
/// size-1 mesh dim ([`Collective::Noop`]) merges like any other.
fn comm_kind(src: Placement, dst: Placement) -> Option<Collective> {
    match (src, dst) {
        (Placement::Partial(_), Placement::Replicate) => Some(Collective::AllReduce),
        (Placement::Partial(_), d) if d.is_shard() => Some(Collective::ReduceScatter),
        (s, Placement::Replicate) if s.is_shard() => Some(Collective::AllGather),
        (s, d) if s.is_shard() && d.is_shard() => Some(Collective::AllToAll),
        _ => None,
    }
}

/// Whether the consecutive steps `group` of `plan` (at least two, one collective kind, equal
/// `src -> dst`) run as one collective on their flattened mesh dims, by the rules
/// [`cheaper_alternative`] gives.
fn merges(
    plan: &RedistributePlan,
    mesh: &DeviceMesh,
    group: &[&Step],
    kind: Collective,
    rules: MergeRules,
) -> bool {
    let dims: Vec<usize> = group.iter().map(|s| s.mesh_dim).collect();
    let mut sorted = dims.clone();
    sorted.sort_unstable();
    let descending: Vec<usize> = sorted.iter().rev().copied().collect();
    let k: usize = sorted.iter().map(|&m| plan.mesh_shape[m]).product();
    let Some(first) = group.first() else {
        return false;
    };
    // The tensor the group sees: every merged mesh dim replicated.
    let mut seen = first.before.clone();
    for &m in &sorted {
        seen[m] = Placement::Replicate;
    }
    // On every rank, the size that must divide by k: the shard dim, or all elements.
    let divides = |d: Option<usize>| {
        (0..mesh.size()).all(|rank| {
            let s = mesh
                .coordinate(rank)
                .and_then(|c| local_shard(&plan.global_shape, mesh, &seen, &c));
            s.is_ok_and(|s| match d {
                Some(d) => s.local_shape[d].is_multiple_of(k),
                None => s.local_shape.iter().product::<usize>().is_multiple_of(k),
            })
        })
    };
    let d = first.src.shard_dim().or(first.dst.shard_dim());
    let ours = rules == MergeRules::Even;
    match kind {
        Collective::AllReduce => !ours || divides(None),
        Collective::AllGather => dims == descending && d.is_some() && (!ours || divides(d)),
        Collective::ReduceScatter => dims == sorted && d.is_some() && divides(d),
        _ => false,
    }
}

/// The alternative plan: consecutive steps with the same collective kind and the same placement
/// change (e.g. two `S(0)` -> `R` all-gathers on mesh dims 1 and 0) merge into one collective
/// over the flattened mesh dims, as PyTorch's `_optimize_transform_infos` does when a flattened
/// DeviceMesh of those dims exists (`mesh["dp", "tp"]._flatten()`), under its rules and ours
/// (below): all-gathers, all-reduces and reduce-scatters merge, all-to-alls do not; steps on
/// size-1 mesh dims merge by the collective their change would need. `None` when the merged plan
/// launches no fewer collectives than PyTorch's default plan.
///
/// Rules for a run of at least two such steps (`k` ranks in the flattened group): all-gathers
/// merge when their mesh dims descend (the innermost split is gathered first), reduce-scatters
/// when their mesh dims ascend and the tensor dim the group sees divides by `k` on every rank,
/// all-reduces always (PyTorch's rules). Ours: an all-gather, too, merges only when that tensor
/// dim divides by `k`, and an all-reduce only when the element count of the tensor the group
/// sees does, on every rank. Uneven, the merged all-reduce's ring blocks can be larger than
/// the per-dim ones: 1 element on `[2, 2]`, `[P, P] -> [R, R]`, moves 1 + 2 · 1 = 3 elements
/// on rank 0 merged against 1 + 1 in the default plan. PyTorch merges uneven all-gathers, and
/// - its flattened all-gather pads every piece to the flat chunk and strips the flat tail
///   padding, which reassembles nested uneven pieces wrongly: 5 rows on a `[2, 2]` mesh,
///   `[S(0), S(0)] -> [R, R]`, hold 2, 1, 1, 1 rows, the flat split is 2, 2, 1, 0, and torch
///   2.15 returns rows 0, 1, 2, a padding row, 3 (6 rows fail the same way);
/// - where the two splits agree (7 rows: 2, 2, 2, 1), the merged gather sends each piece to 3
///   peers, so rank 2 sends 6 rows where the two gathers of the default plan send 2 + 3.
///
/// With even splits a merged step moves no more bytes on any rank than the steps it replaces.
/// Bytes per rank of the merged steps: [`crate::traffic::alternative_traffic`].
pub fn cheaper_alternative(plan: &RedistributePlan) -> Option<AlternativePlan> {
    let merged = merged_steps(plan, MergeRules::Even);
    let launches =
        |c: &mut dyn Iterator<Item = Collective>| c.filter(|c| c.comm_name().is_some()).count();
    let pytorch = launches(&mut plan.steps.iter().map(|s| s.collective));
    let count = launches(&mut merged.iter().map(|s| s.collective));
    (count < pytorch).then_some(AlternativePlan {
        steps: merged,
        pytorch_collectives: pytorch,
        collectives: count,
    })
}

/// Which merges [`merged_steps`] makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MergeRules {
    /// PyTorch's (`_optimize_transform_infos`, every flattened mesh present): what torch 2.15
    /// runs, uneven all-gathers and all-reduces included.
    PyTorch,
    /// PyTorch's, and all-gathers and all-reduces only where the group's size divides the
    /// tensor dim (the element count) on every rank: the rules of [`cheaper_alternative`].
    Even,
}

/// The steps of `plan` with each run of consecutive mergeable steps (see
/// [`cheaper_alternative`]) merged under `rules`: every step of the plan in exactly one merged
/// step, in order. A merged step over mesh dims whose sizes multiply to 1 is a
/// [`Collective::Noop`]. PyTorch decides each merge on each rank's logical shape; this is one
/// decision for all ranks (a reduce-scatter merges only where it may on every rank).
pub fn merged_steps(plan: &RedistributePlan, rules: MergeRules) -> Vec<MergedStep> {
    // A plan's mesh shape is valid; were it not, nothing merges.
    let mesh = DeviceMesh::new(plan.mesh_shape.clone()).ok();
    let kind = |s: &Step| comm_kind(s.src, s.dst);
    let mergeable = |k: Option<Collective>| {
        matches!(
            k,
            Some(Collective::AllGather | Collective::AllReduce | Collective::ReduceScatter)
        )
    };
    let mut merged: Vec<MergedStep> = Vec::new();
    let mut i = 0;
    while i < plan.steps.len() {
        let s = &plan.steps[i];
        let mut j = i + 1;
        if mergeable(kind(s)) {
            while j < plan.steps.len() && (plan.steps[j].src, plan.steps[j].dst) == (s.src, s.dst) {
                j += 1;
            }
        }
        let group: Vec<&Step> = plan.steps[i..j].iter().collect();
        match kind(s) {
            Some(k)
                if group.len() > 1
                    && mesh
                        .as_ref()
                        .is_some_and(|m| merges(plan, m, &group, k, rules)) =>
            {
                let size: usize = group.iter().map(|g| plan.mesh_shape[g.mesh_dim]).product();
                merged.push(MergedStep {
                    mesh_dims: group.iter().map(|g| g.mesh_dim).collect(),
                    collective: if size == 1 { Collective::Noop } else { k },
                    merged: (i..j).collect(),
                });
            }
            _ => merged.extend((i..j).map(|x| MergedStep {
                mesh_dims: vec![plan.steps[x].mesh_dim],
                collective: plan.steps[x].collective,
                merged: vec![x],
            })),
        }
        i = j;
    }
    merged
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

    /// (collective, mesh dims) of the merged steps of the alternative, or `None`.
    fn merged(
        g: &[usize],
        mesh: &[usize],
        src: &str,
        dst: &str,
    ) -> Option<Vec<(Collective, Vec<usize>)>> {
        let p = plan(g, mesh, src, dst).unwrap();
        let alt = p.alternative?;
        Some(
            alt.steps
                .into_iter()
                .filter(|m| m.merged.len() > 1)
                .map(|m| (m.collective, m.mesh_dims))
                .collect(),
        )
    }

    #[test]
    fn alternative_rules() {
        use Collective::{AllGather, AllReduce, ReduceScatter};
        let ag = |rows: usize| merged(&[rows, 3], &[2, 2], "[S(0), S(0)]", "[R, R]");
        // Even: the two gathers (mesh dims 1 then 0) merge.
        assert_eq!(ag(8), Some(vec![(AllGather, vec![1, 0])]));
        // Uneven: PyTorch merges; 5 and 6 rows it reassembles wrongly, 7 rows shift sends.
        for rows in [5, 6, 7] {
            assert_eq!(ag(rows), None, "{rows} rows");
        }
        // The graph planner gathers mesh dim 0 first (order: 1 then 0): ascending dims do not
        // merge (PyTorch: non-ascending shard order).
        assert_eq!(merged(&[8], &[2, 2], "[_S(0, 2), S(0)]", "[R, R]"), None);
        // Reduce-scatters on mesh dims 0 then 1 merge when 4 divides the dim.
        let rs = |rows: usize| merged(&[rows], &[2, 2], "[P(sum), P(sum)]", "[S(0), S(0)]");
        assert_eq!(rs(8), Some(vec![(ReduceScatter, vec![0, 1])]));
        assert_eq!(rs(6), None);
        // All-reduces merge when the group's size divides the element count.
        let ar = |n: usize| merged(&[n], &[2, 2], "[P(sum), P(sum)]", "[R, R]");
        assert_eq!(ar(4), Some(vec![(AllReduce, vec![0, 1])]));
        assert_eq!(ar(1), None);
        // A step on a size-1 mesh dim merges by the collective its change needs.
        let p = plan(&[8], &[2, 1, 2], "[S(0), S(0), S(0)]", "[R, R, R]").unwrap();
        let alt = p.alternative.unwrap();
        assert_eq!((alt.pytorch_collectives, alt.collectives), (2, 1));
        assert_eq!(alt.steps[0].mesh_dims, vec![2, 1, 0]);
        // All-to-alls never merge.
        assert_eq!(
            merged(&[8, 8], &[2, 2], "[S(0), S(0)]", "[S(1), S(1)]"),
            None
        );
    }
}
