//! Local shards: a [`LocalTensor`] is one rank's piece of a (native or HF) tensor, with the global
//! indices it holds per dim (from `placement::local_shard`), so a conversion can move the indices
//! and placements along with the data and never needs to communicate.

use crate::error::{AdapterError, Result};
use crate::tensor::HostTensor;
use placement::{DeviceMesh, IndexSet, LocalShard, Placement};
use safetensors::Dtype;

/// A local shard of a (native or HF) tensor: which global indices it holds per dim, in local order.
///
/// Invariant: `tensor.shape[d] == indices[d].len()`, `indices[d]` within `0..global_shape[d]`,
/// `placements.len()` == the mesh's number of dims.
#[derive(Debug, Clone, PartialEq)]
pub struct LocalTensor {
    /// Tensor key (native or HF naming).
    pub key: String,
    /// This rank's data, shape = lengths of `indices`.
    pub tensor: HostTensor,
    /// Shape of the whole (global) tensor.
    pub global_shape: Vec<usize>,
    /// One placement per mesh dim (PyTorch DTensor semantics). `placement::local_shard` of these
    /// placements at the rank's coordinate gives `indices` ([`LocalTensor::placements_match`]),
    /// with one exception, for the pieces `MoeAdapter::to_hf_local` returns: GPT-OSS's interleaved
    /// `gate_up_proj` / `gate_up_proj_bias` from native `_S(last, 2)` say `S(last)`, which is exact
    /// only when torch.chunk of 2I over the mesh size lines up with twice that of I (e.g. the
    /// mesh size divides I; see `Group::disk_placements` in `layout.rs`); there `indices` (always
    /// exact) are authoritative.
    pub placements: Vec<Placement>,
    /// Per tensor dim, the global indices held, in local order (full range when unsharded).
    pub indices: Vec<IndexSet>,
}

/// Name, dtype and global shape of a native tensor.
#[derive(Debug, Clone, PartialEq)]
pub struct NativeTensorInfo {
    /// Native key, e.g. `model.layers.0.mlp.experts.gate_and_up_projs`.
    pub key: String,
    /// Element type (the HF dtype; conversions never cast).
    pub dtype: Dtype,
    /// Global shape, e.g. `[E, H, 2I]`.
    pub shape: Vec<usize>,
}

impl LocalTensor {
    /// Checks the invariant documented on the type; errors name the key.
    pub fn validate(&self) -> Result<()> {
        let nd = self.global_shape.len();
        let lens: Vec<usize> = self.indices.iter().map(IndexSet::len).collect();
        if self.indices.len() != nd || self.tensor.shape != lens {
            return Err(AdapterError::Shape(format!(
                "local tensor '{}': shape {:?} but index-set lengths {lens:?} for global shape {:?}",
                self.key, self.tensor.shape, self.global_shape
            )));
        }
        for (d, s) in self.indices.iter().enumerate() {
            if let Some(bad) = s.iter().find(|&i| i >= self.global_shape[d]) {
                return Err(AdapterError::Shape(format!(
                    "local tensor '{}': index {bad} out of range for dim {d} of global shape {:?}",
                    self.key, self.global_shape
                )));
            }
        }
        Ok(())
    }

    /// Whether `placements` on `mesh` at `coord` give exactly `indices` (in local order), through
    /// `placement::local_shard`. Errors: placements that do not fit the mesh or the global shape, a
    /// bad coordinate.
    pub fn placements_match(&self, mesh: &DeviceMesh, coord: &[usize]) -> Result<bool> {
        let (_, idx) = shard_indices(&self.key, &self.global_shape, mesh, &self.placements, coord)?;
        Ok(idx == self.indices)
    }
}

/// Runs `placement::local_shard` and returns the per-dim global index sets of this rank's shard
/// (full ranges for unsharded dims). Errors are prefixed with `key`.
pub fn shard_indices(
    key: &str,
    global_shape: &[usize],
    mesh: &DeviceMesh,
    placements: &[Placement],
    coord: &[usize],
) -> Result<(LocalShard, Vec<IndexSet>)> {
    let ls = placement::local_shard(global_shape, mesh, placements, coord)
        .map_err(|e| AdapterError::Placement(format!("{key}: {e}")))?;
    let idx = (0..global_shape.len())
        .map(|d| ls.dim_indices(d, global_shape[d]))
        .collect();
    Ok((ls, idx))
}

/// Maps placements through a change of tensor dims: `dim_map[d]` is the new dim of old dim `d`, or
/// `None` when the dim is consumed by the key (the per-expert split of `[E, ...]`): a mesh dim that
/// sharded a consumed dim becomes `Replicate` for the per-key tensor (the tensor is whole along that
/// mesh dim; only the ranks whose coordinate holds that expert own the key). `R` and `P(op)` are
/// unchanged (the conversion only moves elements, so a partial sum stays a partial sum).
pub fn map_placements(
    placements: &[Placement],
    dim_map: &[Option<usize>],
) -> Result<Vec<Placement>> {
    placements
        .iter()
        .map(|p| match p.shard_dim() {
            None => Ok(*p),
            Some(d) => match dim_map.get(d) {
                Some(Some(nd)) => Ok(p.with_shard_dim(*nd)),
                Some(None) => Ok(Placement::Replicate),
                None => Err(AdapterError::Placement(format!(
                    "placement {p} shards dim {d} of a {}-d tensor",
                    dim_map.len()
                ))),
            },
        })
        .collect()
}
