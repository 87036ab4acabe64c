//! PyTorch's redistribution cost model, shared by the strategy search (`strategy.rs`) and the
//! graph planner (`graph_plan.rs`): mesh topology, ring-collective costs (microseconds) and the
//! cost of one placement transition on one mesh dim.
//!
//! Source: `MeshTopoInfo`, `allgather_cost`, `allreduce_cost`, `reduce_scatter_cost` and
//! `_compute_placement_transition_cost` in `torch/distributed/tensor/_collective_utils.py`
//! (torch 2.15). Inside a host a mesh dim has 87.7 GB/s and 0.6 us per hop; a mesh dim whose
//! product of sizes (it and every later dim) exceeds the devices per host has `87.7 * 0.22` and
//! 2.7 us. A ring collective over `k` ranks costs `6.6 + hops * latency + bytes * hops / k / bw *
//! 1e6` with `hops = k - 1` (all-gather, reduce-scatter) or `2 (k - 1)` (all-reduce).

use crate::placement::Placement;

/// The inputs of PyTorch's redistribution cost model that are not placements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CostModel {
    /// Bytes per element (`dtype.itemsize`; 4 for float32).
    pub elem_size: usize,
    /// Devices per host (`_mesh_resources.num_devices_per_host(device_type)`: 1 on a CPU mesh,
    /// `torch.cuda.device_count()` on CUDA).
    pub devices_per_host: usize,
}

impl Default for CostModel {
    /// float32 on a CPU mesh (what the oracle runs): `elem_size` 4, 1 device per host.
    fn default() -> Self {
        CostModel {
            elem_size: 4,
            devices_per_host: 1,
        }
    }
}

/// `MeshTopoInfo.build_from_mesh`: (bandwidth GB/s, latency us) per mesh dim.
pub(crate) fn mesh_topo(sizes: &[usize], model: &CostModel) -> Vec<(f64, f64)> {
    let mut out = vec![(87.7, 0.6); sizes.len()];
    let mut total = 1usize;
    for m in (0..sizes.len()).rev() {
        total = total.saturating_mul(sizes[m]);
        if total > model.devices_per_host {
            out[m] = (87.7 * 0.22, 2.7);
        }
    }
    out
}

/// `allgather_cost` / `reduce_scatter_cost` (`hops_factor` 1) and `allreduce_cost` (2).
pub(crate) fn collective_cost(
    bytes_gb: f64,
    k: usize,
    topo: (f64, f64),
    hops_factor: usize,
) -> f64 {
    let hops = (hops_factor * (k - 1)) as f64;
    let latency = 6.6 + hops * topo.1;
    let bw = (bytes_gb * hops / k as f64) / topo.0;
    latency + bw * 1e6
}

/// `_compute_placement_transition_cost` (`_collective_utils.py`): `(cost, new comm bytes)`.
/// PyTorch's `is_shard()` there is false for `_S` (the strategy search gives `_S` infinite cost before, and the graph planner decodes `_S` away).
pub(crate) fn transition_cost(
    cur: Placement,
    tgt: Placement,
    k: usize,
    topo: (f64, f64),
    bytes: f64,
) -> (f64, f64) {
    use Placement::{Partial, Replicate, Shard};
    if cur == tgt {
        return (0.0, bytes);
    }
    match (cur, tgt) {
        (Shard(_), Replicate) => {
            let b = bytes * k as f64;
            (collective_cost(b, k, topo, 1), b)
        }
        (Shard(_), Shard(_)) => (collective_cost(bytes, k, topo, 1) + 1.0, bytes),
        (Partial(_), Replicate) => (collective_cost(bytes, k, topo, 2), bytes),
        (Partial(_), Shard(_)) => (collective_cost(bytes, k, topo, 1), bytes / k as f64),
        (Shard(_), Partial(_)) | (Partial(_), Partial(_)) => (f64::INFINITY, bytes),
        (Replicate, Shard(_)) => (0.0, bytes / k as f64),
        _ => (0.0, bytes),
    }
}

/// `DTensorSpec.num_shards`: the product of the mesh sizes of the mesh dims holding a shard
/// (`S` or `_S`).
pub(crate) fn num_shards(placements: &[Placement], sizes: &[usize]) -> usize {
    placements
        .iter()
        .zip(sizes)
        .filter(|(p, _)| p.is_shard())
        .map(|(_, &k)| k)
        .product()
}
