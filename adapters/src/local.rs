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

impl LocalTensor {
    /// Checks the piece's label as a DCP save or `DTensor.from_local` would trust it: `placements`
    /// of `global_shape` at `coord` on `mesh` must give exactly the piece's local shape and index
    /// sets (`placement::local_shard`), and `placement::validate_global_shape` must accept them.
    ///
    /// Errors ([`AdapterError::Placement`], one line): the key, the coordinate, the label, what it
    /// gives against what the piece holds, and the label that fits this rank's index sets
    /// (`placement::chunks::placements_giving`), or that no `S` / `_S` label fits them.
    pub fn check_label(&self, mesh: &DeviceMesh, coord: &[usize]) -> Result<()> {
        let label = placement::format_placements(&self.placements);
        let held: Vec<usize> = self.indices.iter().map(IndexSet::len).collect();
        let fits = || match placement::chunks::placements_giving(
            &self.global_shape,
            mesh,
            coord,
            &self.indices,
        ) {
            Some(p) => format!(
                "the label that fits is {}",
                placement::format_placements(&p)
            ),
            None => "no S / _S label on this mesh fits its index sets".to_string(),
        };
        let wrong = |what: String| {
            AdapterError::Placement(format!(
                "{} at coordinate {coord:?}: label {label} of global shape {:?} {what}; {}",
                self.key,
                self.global_shape,
                fits()
            ))
        };
        if self.tensor.shape != held {
            return Err(wrong(format!(
                "but the tensor has shape {:?} for index sets of sizes {held:?}",
                self.tensor.shape
            )));
        }
        let (ls, idx) = shard_indices(&self.key, &self.global_shape, mesh, &self.placements, coord)
            .map_err(|e| wrong(format!("is not valid here ({e})")))?;
        if ls.local_shape != self.tensor.shape {
            return Err(wrong(format!(
                "gives local shape {:?}, the piece has {:?}",
                ls.local_shape, self.tensor.shape
            )));
        }
        if idx != self.indices {
            let d = (0..idx.len())
                .find(|&d| idx[d] != self.indices[d])
                .unwrap_or(0);
            return Err(wrong(format!(
                "gives indices {:?} of dim {d}, the piece holds {:?}",
                idx[d].runs(),
                self.indices[d].runs()
            )));
        }
        placement::validate_global_shape(
            &self.tensor.shape,
            &self.global_shape,
            mesh,
            &self.placements,
            coord,
        )
        .map_err(|e| wrong(format!("is refused by validate_global_shape ({e})")))
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

#[cfg(test)]
mod tests {
    use super::*;
    use placement::parse_placements;

    /// Rank `coord` of a `[4, 6, 8]` tensor with `label` on `mesh`, holding what `truth` gives.
    fn piece(mesh: &DeviceMesh, label: &str, truth: &str, coord: &[usize]) -> LocalTensor {
        let shape = [4, 6, 8];
        let (ls, indices) =
            shard_indices("k", &shape, mesh, &parse_placements(truth).unwrap(), coord).unwrap();
        let n: usize = ls.local_shape.iter().product();
        LocalTensor {
            key: "model.layers.0.mlp.experts.down_proj".into(),
            tensor: HostTensor::new(Dtype::F32, ls.local_shape.clone(), vec![0u8; 4 * n]).unwrap(),
            global_shape: shape.to_vec(),
            placements: parse_placements(label).unwrap(),
            indices,
        }
    }

    #[test]
    fn a_right_label_passes_on_every_rank() {
        let mesh = DeviceMesh::new(vec![2, 2]).unwrap();
        for label in [
            "[S(0), S(1)]",
            "[S(0), _S(2, 2)]",
            "[R, S(2)]",
            "[P(sum), S(2)]",
        ] {
            for r in 0..4 {
                let c = mesh.coordinate(r).unwrap();
                piece(&mesh, label, label, &c)
                    .check_label(&mesh, &c)
                    .unwrap();
            }
        }
    }

    #[test]
    fn a_kept_label_after_a_transpose_names_the_key_and_the_label_that_fits() {
        // The piece holds half the last dim (S(2), [4, 6, 4]) but says S(1) ([4, 3, 8]).
        let mesh = DeviceMesh::new(vec![2]).unwrap();
        let e = piece(&mesh, "[S(1)]", "[S(2)]", &[1])
            .check_label(&mesh, &[1])
            .unwrap_err()
            .to_string();
        assert!(e.contains("model.layers.0.mlp.experts.down_proj"), "{e}");
        assert!(e.contains("label [S(1)]"), "{e}");
        assert!(e.contains("the label that fits is [S(2)]"), "{e}");
        // Same local shape, other indices: _S(2, 2) vs S(2) on rank 1 (cols {2, 3, 6, 7} vs 4..8).
        let e = piece(&mesh, "[S(2)]", "[_S(2, 2)]", &[1])
            .check_label(&mesh, &[1])
            .unwrap_err()
            .to_string();
        assert!(e.contains("gives indices [4..8] of dim 2"), "{e}");
        assert!(e.contains("the label that fits is [_S(2, 2)]"), "{e}");
    }

    #[test]
    fn validate_names_the_key_of_a_broken_invariant() {
        let mesh = DeviceMesh::new(vec![2]).unwrap();
        let good = piece(&mesh, "[S(2)]", "[S(2)]", &[1]);
        good.validate().unwrap();
        let err = |p: LocalTensor| p.validate().unwrap_err().to_string();
        // Fewer index sets than dims.
        let mut p = good.clone();
        p.indices.pop();
        assert!(err(p).contains(
            "model.layers.0.mlp.experts.down_proj': shape [4, 6, 4] but index-set lengths [4, 6]"
        ));
        // Index-set lengths that are not the tensor's shape.
        let mut p = good.clone();
        p.indices[1] = IndexSet::from_range(0..5);
        assert!(err(p).contains("index-set lengths [4, 5, 4]"));
        // An index past the global extent (the last one allowed is 7).
        let mut p = good.clone();
        p.indices[2] = IndexSet::from_range(5..9);
        assert!(err(p).contains("index 8 out of range for dim 2 of global shape [4, 6, 8]"));
        let mut p = good.clone();
        p.indices[2] = IndexSet::from_range(4..8);
        p.validate().unwrap();
    }

    #[test]
    fn index_sets_no_label_gives_are_named_so() {
        let mesh = DeviceMesh::new(vec![2]).unwrap();
        let mut p = piece(&mesh, "[S(2)]", "[S(2)]", &[0]);
        p.indices[2] = IndexSet::from_range(1..5);
        let e = p.check_label(&mesh, &[0]).unwrap_err().to_string();
        assert!(e.contains("no S / _S label on this mesh fits"), "{e}");
        // A tensor whose shape is not its index sets' sizes.
        let mut p = piece(&mesh, "[S(2)]", "[S(2)]", &[0]);
        p.indices[0] = IndexSet::from_range(0..2);
        let e = p.check_label(&mesh, &[0]).unwrap_err().to_string();
        assert!(e.contains("for index sets of sizes [2, 6, 4]"), "{e}");
    }
}
