//! PyTorch 2.15's graph-based redistribution planner: Dijkstra over sharding states, the plan
//! `DTensor.redistribute` runs whenever a source or target holds `_StridedShard` (and the split
//! factors decode into a shard order) or a non-default shard order.
//!
//! Source: `DTensorRedistributePlanner.get_next_state`, `_get_shard_to_partial_target_states`,
//! `find_min_cost_path` and `generate_graph_based_transform_infos` in
//! `torch/distributed/tensor/_redistribute.py`; the cost of a step from
//! `one_step_redistribute_cost`, `_compute_placement_transition_cost`, `MeshTopoInfo` and the
//! `allgather_cost` / `allreduce_cost` / `reduce_scatter_cost` formulas in
//! `torch/distributed/tensor/_collective_utils.py` (torch 2.15).
//!
//! A state is the placements (only `S`, `R`, `P`: `_S` is decoded into the shard order first) and
//! the shard order (which mesh dims split each tensor dim, first to last). From a state the moves
//! are, in PyTorch's order (the order decides ties, so it is kept exactly):
//!
//! | case | move | cost |
//! |---|---|---|
//! | 1 | the last mesh dim of tensor dim a's order moves to tensor dim b (appended last) | all-gather + 1 |
//! | 2 | the last mesh dim of a tensor dim's order becomes `R` | all-gather of the gathered bytes |
//! | 3 | a `P` mesh dim becomes `R` | all-reduce |
//! | 4 | an `R` mesh dim becomes `S(b)` (appended last to b's order) | 0 |
//! | 5 | a `P` mesh dim becomes `S(b)` (appended last) | reduce-scatter |
//! | 6 | an `R` mesh dim becomes `P(op)` for an op of the source or target (mixed ops skipped, except sum with avg) | 0 |
//! | 7 | toward a `P(sum)` target: the last mesh dim of an order becomes `P(sum)` | 0 |
//!
//! PyTorch's cases 9 and 12 (`_S` -> `R`, `R` -> `_S`) cannot arise: decoding leaves no `_S`.
//! Costs are PyTorch's (module `cost`: the transition cost on the mesh dim that changes, for
//! `bytes / num_shards / 2^30` of the current state). The search pops the lowest cost, then the
//! earliest push; the first time the target state is popped its path is the plan.

use std::cmp::{Ordering, Reverse};
use std::collections::{BTreeMap, BinaryHeap, HashSet};

use crate::cost::{mesh_topo, num_shards, transition_cost, CostModel};
use crate::error::{PlacementError, Result};
use crate::placement::{PartialOp, Placement};
use crate::shard_order::ShardOrderEntry;

/// A sharding state: placements and shard order (`tensor dim -> mesh dims`, first to last; no
/// empty lists).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct DistState {
    pub placements: Vec<Placement>,
    pub order: BTreeMap<usize, Vec<usize>>,
}

impl DistState {
    pub fn new(placements: Vec<Placement>, order: &[ShardOrderEntry]) -> Self {
        let order = order
            .iter()
            .filter(|e| !e.mesh_dims.is_empty())
            .map(|e| (e.tensor_dim, e.mesh_dims.clone()))
            .collect();
        DistState { placements, order }
    }

    /// The shard order as entries sorted by tensor dim.
    pub fn entries(&self) -> Vec<ShardOrderEntry> {
        self.order
            .iter()
            .map(|(&tensor_dim, m)| ShardOrderEntry {
                tensor_dim,
                mesh_dims: m.clone(),
            })
            .collect()
    }

    fn with(&self, mesh_dim: usize, p: Placement, order: BTreeMap<usize, Vec<usize>>) -> Self {
        let mut placements = self.placements.clone();
        placements[mesh_dim] = p;
        DistState {
            placements,
            order: order.into_iter().filter(|(_, v)| !v.is_empty()).collect(),
        }
    }

    /// `(tensor dim, its last mesh dim)` per order entry, sorted by tensor dim.
    fn lasts(&self) -> Vec<(usize, usize)> {
        self.order
            .iter()
            .filter_map(|(&d, m)| m.last().map(|&l| (d, l)))
            .collect()
    }
}

struct Planner<'a> {
    sizes: &'a [usize],
    ndim: usize,
    bytes: f64,
    topo: Vec<(f64, f64)>,
    /// Partial ops of the source and target, sorted (PyTorch iterates a set of one op in every
    /// committed case; with two the order only breaks ties between equal-cost states).
    partial_ops: Vec<PartialOp>,
}

impl Planner<'_> {
    /// `one_step_redistribute_cost` between states that differ on `mesh_dim`: the transition
    /// cost for the bytes of the current state's local shard.
    fn cost(&self, cur: &DistState, mesh_dim: usize, to: Placement) -> f64 {
        let from = cur.placements[mesh_dim];
        if from == to {
            return 0.0;
        }
        let shards = num_shards(&cur.placements, self.sizes);
        let bytes = self.bytes / shards as f64 / 1024.0 / 1024.0 / 1024.0;
        transition_cost(from, to, self.sizes[mesh_dim], self.topo[mesh_dim], bytes).0
    }

    /// `get_next_state`: the states one move away, in PyTorch's insertion order (a state
    /// reached twice keeps its first position and its last cost, as a Python dict does).
    fn next_states(&self, cur: &DistState, dst: &DistState) -> Vec<(DistState, f64)> {
        let mut out: Vec<(DistState, f64)> = Vec::new();
        let mut put = |s: DistState, c: f64| match out.iter_mut().find(|(t, _)| *t == s) {
            Some(slot) => slot.1 = c,
            None => out.push((s, c)),
        };
        // Case 1: the last shard of tensor dim a moves to tensor dim b (all-to-all).
        for (a, m) in cur.lasts() {
            if !matches!(cur.placements[m], Placement::Shard(_)) {
                continue;
            }
            for b in (0..self.ndim).filter(|&b| b != a) {
                let mut order = cur.order.clone();
                if let Some(v) = order.get_mut(&a) {
                    v.pop();
                }
                order.entry(b).or_default().push(m);
                let to = Placement::Shard(b);
                put(cur.with(m, to, order), self.cost(cur, m, to));
            }
        }
        // Case 2: the last shard of a tensor dim becomes R (all-gather).
        for (a, m) in cur.lasts() {
            if !matches!(cur.placements[m], Placement::Shard(_)) {
                continue;
            }
            let mut order = cur.order.clone();
            if let Some(v) = order.get_mut(&a) {
                v.pop();
            }
            let to = Placement::Replicate;
            put(cur.with(m, to, order), self.cost(cur, m, to));
        }
        // Case 3: P -> R (all-reduce).
        for m in 0..cur.placements.len() {
            if cur.placements[m].is_partial() {
                let to = Placement::Replicate;
                put(cur.with(m, to, cur.order.clone()), self.cost(cur, m, to));
            }
        }
        // Cases 4 and 5: R -> S(b) (chunk), P -> S(b) (reduce-scatter).
        for want_partial in [false, true] {
            for m in 0..cur.placements.len() {
                let p = cur.placements[m];
                if (want_partial && !p.is_partial()) || (!want_partial && !p.is_replicate()) {
                    continue;
                }
                for b in 0..self.ndim {
                    let mut order = cur.order.clone();
                    order.entry(b).or_default().push(m);
                    let to = Placement::Shard(b);
                    put(cur.with(m, to, order), self.cost(cur, m, to));
                }
            }
        }
        // Case 6: R -> P(op), for the ops of the source and target.
        for m in 0..cur.placements.len() {
            if !cur.placements[m].is_replicate() {
                continue;
            }
            for &op in &self.partial_ops {
                let to = Placement::Partial(op);
                let mut ops: Vec<PartialOp> = cur
                    .placements
                    .iter()
                    .enumerate()
                    .filter_map(|(i, p)| match (i == m, p) {
                        (true, _) => Some(op),
                        (false, Placement::Partial(o)) => Some(*o),
                        _ => None,
                    })
                    .collect();
                ops.sort_by_key(|o| o.as_str());
                ops.dedup();
                if ops.len() > 1 && ops != [PartialOp::Avg, PartialOp::Sum] {
                    continue;
                }
                put(cur.with(m, to, cur.order.clone()), self.cost(cur, m, to));
            }
        }
        // Case 7 (`_get_shard_to_partial_target_states`): toward a P(sum) target, cost 0.
        for (a, m) in cur.lasts() {
            let to = dst.placements[m];
            if matches!(cur.placements[m], Placement::Shard(_))
                && to == Placement::Partial(PartialOp::Sum)
            {
                let mut order = cur.order.clone();
                if let Some(v) = order.get_mut(&a) {
                    v.pop();
                }
                put(cur.with(m, to, order), 0.0);
            }
        }
        out
    }
}

/// One step of a graph plan: the state before it, the mesh dim, and its placement before and after.
pub(crate) type GraphStep = (DistState, usize, Placement, Placement);

/// A heap entry: lowest cost first, then the earliest push.
struct Entry {
    cost: f64,
    counter: u64,
    state: usize,
}

impl PartialEq for Entry {
    fn eq(&self, o: &Self) -> bool {
        self.cmp(o) == Ordering::Equal
    }
}
impl Eq for Entry {}
impl PartialOrd for Entry {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Entry {
    fn cmp(&self, o: &Self) -> Ordering {
        self.cost
            .total_cmp(&o.cost)
            .then(self.counter.cmp(&o.counter))
    }
}

/// Most states the search may expand before it gives up: the state space is at most
/// `(N + 2)^M M!` (`N` tensor dims, `M` mesh dims), far below this for the meshes DTensor runs.
const MAX_EXPANDED: usize = 1 << 20;

/// The min-cost path of states from `src` to `dst` (`find_min_cost_path`), as the list of
/// `(state before, mesh dim, from, to)` steps.
///
/// Errors: no path ([`PlacementError::UnsupportedRedistribute`] naming the target), or more
/// than `MAX_EXPANDED` states expanded.
pub(crate) fn graph_steps(
    global_shape: &[usize],
    sizes: &[usize],
    src: &DistState,
    dst: &DistState,
    model: CostModel,
) -> Result<Vec<GraphStep>> {
    let mut partial_ops: Vec<PartialOp> = src
        .placements
        .iter()
        .chain(&dst.placements)
        .filter_map(|p| match p {
            Placement::Partial(op) => Some(*op),
            _ => None,
        })
        .collect();
    partial_ops.sort_by_key(|o| o.as_str());
    partial_ops.dedup();
    let planner = Planner {
        sizes,
        ndim: global_shape.len(),
        bytes: model.elem_size as f64 * global_shape.iter().map(|&n| n as f64).product::<f64>(),
        topo: mesh_topo(sizes, &model),
        partial_ops,
    };
    // Every state pushed, with the index of the state it came from (the path).
    let mut nodes: Vec<(DistState, Option<usize>)> = vec![(src.clone(), None)];
    let mut heap = BinaryHeap::new();
    heap.push(Reverse(Entry {
        cost: 0.0,
        counter: 0,
        state: 0,
    }));
    let mut visited: HashSet<DistState> = HashSet::new();
    let mut counter = 0u64;
    while let Some(Reverse(Entry { cost, state, .. })) = heap.pop() {
        let cur = nodes[state].0.clone();
        if cur == *dst {
            return Ok(path(&nodes, state));
        }
        if !visited.insert(cur.clone()) {
            continue;
        }
        if visited.len() > MAX_EXPANDED {
            break;
        }
        for (next, c) in planner.next_states(&cur, dst) {
            if visited.contains(&next) {
                continue;
            }
            counter += 1;
            nodes.push((next, Some(state)));
            heap.push(Reverse(Entry {
                cost: cost + c,
                counter,
                state: nodes.len() - 1,
            }));
        }
    }
    Err(PlacementError::UnsupportedRedistribute {
        mesh_dim: 0,
        src: src
            .placements
            .first()
            .copied()
            .unwrap_or(Placement::Replicate),
        dst: dst
            .placements
            .first()
            .copied()
            .unwrap_or(Placement::Replicate),
        reason: "the graph planner finds no path to the target state".to_string(),
    })
}

fn path(nodes: &[(DistState, Option<usize>)], last: usize) -> Vec<GraphStep> {
    let mut chain = vec![last];
    while let Some(p) = nodes[*chain.last().unwrap_or(&0)].1 {
        chain.push(p);
    }
    chain.reverse();
    let mut steps = Vec::new();
    for w in chain.windows(2) {
        let (a, b) = (&nodes[w[0]].0, &nodes[w[1]].0);
        if let Some(m) = (0..a.placements.len()).find(|&m| a.placements[m] != b.placements[m]) {
            steps.push((a.clone(), m, a.placements[m], b.placements[m]));
        }
    }
    steps
}
