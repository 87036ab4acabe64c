//! The tensors of one MoE block on one rank (parameters or their gradients), cut from the full
//! tensors by `placement`'s index sets, and turned back into [`adapters::LocalTensor`]s for
//! gathering and layout conversion.

use super::plan::{ParallelPlan, Param};
use adapters::{Dtype, HostTensor, LocalTensor, NativeMoeKeys};
use collectives::autograd::LocalTensor as CommTensor;
use moe_kernels::{MoeGrads, MoeParams, SharedExpertParams};
use ndarray::{Array, Array1, Array2, Array3, ArrayView, Axis, Dimension};
use placement::{local_shard, IndexSet, Placement};

/// Shared-expert tensors (HF `nn.Linear` layout, replicated).
#[derive(Debug, Clone, PartialEq)]
pub struct SharedTensors {
    pub gate_proj: Array2<f32>,
    pub up_proj: Array2<f32>,
    pub down_proj: Array2<f32>,
    pub gate: Option<Array2<f32>>,
}

/// One block's tensors on one rank, in the native layout: parameters (local shards) or their
/// gradients (same shapes; `e_score_correction_bias` is `None` for gradients, it has none).
#[derive(Debug, Clone, PartialEq)]
pub struct BlockTensors {
    /// `[E, H]` router.
    pub gate_weight: Array2<f32>,
    /// `[E]`.
    pub gate_bias: Option<Array1<f32>>,
    /// `[E]` selection-only bias.
    pub e_score_correction_bias: Option<Array1<f32>>,
    /// `[E_l, H_l, 2I_l]` local shard of `[E, H, 2I]`.
    pub gate_and_up_projs: Array3<f32>,
    /// `[E_l, I_l, H]` local shard of `[E, I, H]`.
    pub down_projs: Array3<f32>,
    /// `[E_l, 2I_l]`.
    pub gate_up_bias: Option<Array2<f32>>,
    /// `[E_l, H]`.
    pub down_bias: Option<Array2<f32>>,
    pub shared: Option<SharedTensors>,
}

/// Per-dim index sets of this rank's shard of a tensor of `shape` placed by `placements`.
pub fn indices(
    shape: &[usize],
    plan: &ParallelPlan,
    placements: &[Placement],
    coord: &[usize],
) -> Result<Vec<IndexSet>, String> {
    let ls = local_shard(shape, &plan.mesh, placements, coord).map_err(|e| e.to_string())?;
    Ok((0..shape.len())
        .map(|d| ls.dim_indices(d, shape[d]))
        .collect())
}

/// Whether this rank's copy of a tensor placed by `placements` is a replica of another rank's: its
/// coordinate is non-zero on a mesh dim where the tensor is `Replicate` (torch DCP's dedup rule;
/// gathering only the other copies sees each element once).
pub fn is_extra_replica(placements: &[Placement], coord: &[usize]) -> bool {
    placements
        .iter()
        .zip(coord)
        .any(|(p, &c)| p.is_replicate() && c != 0)
}

/// The sub-array of `full` at the index sets, row-major.
pub fn take<D: Dimension + ndarray::RemoveAxis>(
    full: ArrayView<f32, D>,
    idx: &[IndexSet],
) -> Array<f32, D> {
    let mut out = full.to_owned();
    for (d, set) in idx.iter().enumerate() {
        out = out.select(Axis(d), &set.to_vec());
    }
    // `select` may return a non-row-major layout; the kernels' summation order follows the
    // strides, so every shard is made row-major (bitwise reproducible after a save / load).
    if out.is_standard_layout() {
        out
    } else {
        out.as_standard_layout().into_owned()
    }
}

fn cut<D: Dimension + ndarray::RemoveAxis>(
    full: ArrayView<f32, D>,
    plan: &ParallelPlan,
    param: Param,
    coord: &[usize],
) -> Result<Array<f32, D>, String> {
    let idx = indices(full.shape(), plan, &plan.placements(param), coord)?;
    Ok(take(full, &idx))
}

impl BlockTensors {
    /// This rank's shards of the full parameters `p` under `plan`.
    pub fn shard(p: &MoeParams, plan: &ParallelPlan, coord: &[usize]) -> Result<Self, String> {
        let rep = |a: Option<ndarray::ArrayView1<f32>>| a.map(|a| a.to_owned());
        Ok(BlockTensors {
            gate_weight: p.gate_weight.to_owned(),
            gate_bias: rep(p.gate_bias),
            e_score_correction_bias: rep(p.e_score_correction_bias),
            gate_and_up_projs: cut(p.gate_and_up_projs, plan, Param::GateAndUp, coord)?,
            down_projs: cut(p.down_projs, plan, Param::Down, coord)?,
            gate_up_bias: p
                .gate_up_bias
                .map(|b| cut(b, plan, Param::GateUpBias, coord))
                .transpose()?,
            down_bias: p
                .down_bias
                .map(|b| cut(b, plan, Param::DownBias, coord))
                .transpose()?,
            shared: p.shared.as_ref().map(SharedTensors::from_params),
        })
    }

    /// The full single-device gradients in this struct's layout (for comparison).
    pub fn from_grads(g: &MoeGrads) -> Self {
        BlockTensors {
            gate_weight: g.gate_weight.clone(),
            gate_bias: g.gate_bias.clone(),
            e_score_correction_bias: None,
            gate_and_up_projs: g.gate_and_up_projs.clone(),
            down_projs: g.down_projs.clone(),
            gate_up_bias: g.gate_up_bias.clone(),
            down_bias: g.down_bias.clone(),
            shared: g.shared.as_ref().map(|s| SharedTensors {
                gate_proj: s.gate_proj.clone(),
                up_proj: s.up_proj.clone(),
                down_proj: s.down_proj.clone(),
                gate: s.gate.clone(),
            }),
        }
    }

    /// Views as the kernels' parameter struct (meaningful for full, unsharded tensors).
    pub fn params(&self) -> MoeParams<'_> {
        MoeParams {
            gate_weight: self.gate_weight.view(),
            gate_bias: self.gate_bias.as_ref().map(|b| b.view()),
            e_score_correction_bias: self.e_score_correction_bias.as_ref().map(|b| b.view()),
            gate_and_up_projs: self.gate_and_up_projs.view(),
            down_projs: self.down_projs.view(),
            gate_up_bias: self.gate_up_bias.as_ref().map(|b| b.view()),
            down_bias: self.down_bias.as_ref().map(|b| b.view()),
            shared: self.shared.as_ref().map(|s| s.params()),
        }
    }

    /// Every tensor with its native key and the plan's placements, as [`LocalTensor`]s (F32).
    /// With `dedupe`, a replicated tensor is only returned by the rank whose coordinate is 0 on
    /// every mesh dim where it is `Replicate` (as torch DCP deduplicates replicas), so that a gather
    /// sees one copy. Keys without a native name in `keys` are skipped.
    pub fn to_local_tensors(
        &self,
        keys: &NativeMoeKeys,
        plan: &ParallelPlan,
        coord: &[usize],
        full_shapes: &FullShapes,
        dedupe: bool,
    ) -> Result<Vec<LocalTensor>, String> {
        let mut out = Vec::new();
        let mut push = |key: &str, param: Param, shape: &[usize], t: HostTensor| {
            let placements = plan.placements(param);
            if dedupe && is_extra_replica(&placements, coord) {
                return Ok::<(), String>(());
            }
            let idx = indices(shape, plan, &placements, coord)?;
            out.push(LocalTensor {
                key: key.to_string(),
                tensor: t,
                global_shape: shape.to_vec(),
                placements,
                indices: idx,
            });
            Ok(())
        };
        let f = &full_shapes;
        push(
            &keys.gate_weight,
            Param::Replicated,
            &f.gate_weight,
            host(&self.gate_weight)?,
        )?;
        if let (Some(k), Some(b)) = (&keys.gate_bias, &self.gate_bias) {
            push(k, Param::Replicated, &[b.len()], host(b)?)?;
        }
        if let (Some(k), Some(b)) = (&keys.e_score_correction_bias, &self.e_score_correction_bias) {
            push(k, Param::Replicated, &[b.len()], host(b)?)?;
        }
        push(
            &keys.gate_and_up_projs,
            Param::GateAndUp,
            &f.gate_and_up_projs,
            host(&self.gate_and_up_projs)?,
        )?;
        push(
            &keys.down_projs,
            Param::Down,
            &f.down_projs,
            host(&self.down_projs)?,
        )?;
        if let (Some(k), Some(b)) = (&keys.gate_up_proj_bias, &self.gate_up_bias) {
            push(k, Param::GateUpBias, &f.gate_up_bias, host(b)?)?;
        }
        if let (Some(k), Some(b)) = (&keys.down_proj_bias, &self.down_bias) {
            push(k, Param::DownBias, &f.down_bias, host(b)?)?;
        }
        if let (Some([gk, uk, dk]), Some(s)) = (&keys.shared, &self.shared) {
            for (k, a) in [(gk, &s.gate_proj), (uk, &s.up_proj), (dk, &s.down_proj)] {
                push(k, Param::Replicated, a.shape(), host(a)?)?;
            }
            if let (Some(k), Some(g)) = (&keys.shared_gate, &s.gate) {
                push(k, Param::Replicated, g.shape(), host(g)?)?;
            }
        }
        Ok(out)
    }
}

/// Global shapes of the sharded block tensors.
#[derive(Debug, Clone)]
pub struct FullShapes {
    pub gate_weight: Vec<usize>,
    pub gate_and_up_projs: Vec<usize>,
    pub down_projs: Vec<usize>,
    pub gate_up_bias: Vec<usize>,
    pub down_bias: Vec<usize>,
}

impl FullShapes {
    /// From the full parameters.
    pub fn of(p: &MoeParams) -> Self {
        let (e, h, two_i) = p.gate_and_up_projs.dim();
        FullShapes {
            gate_weight: vec![e, h],
            gate_and_up_projs: vec![e, h, two_i],
            down_projs: vec![e, two_i / 2, h],
            gate_up_bias: vec![e, two_i],
            down_bias: vec![e, h],
        }
    }
}

impl SharedTensors {
    fn from_params(s: &SharedExpertParams) -> Self {
        SharedTensors {
            gate_proj: s.gate_proj.to_owned(),
            up_proj: s.up_proj.to_owned(),
            down_proj: s.down_proj.to_owned(),
            gate: s.gate.map(|g| g.to_owned()),
        }
    }

    /// Views as the kernels' shared-expert struct.
    pub fn params(&self) -> SharedExpertParams<'_> {
        SharedExpertParams {
            gate_proj: self.gate_proj.view(),
            up_proj: self.up_proj.view(),
            down_proj: self.down_proj.view(),
            gate: self.gate.as_ref().map(|g| g.view()),
        }
    }
}

/// An f32 array as an F32 [`HostTensor`] (little-endian bytes, logical order).
pub fn host<D: Dimension>(a: &Array<f32, D>) -> Result<HostTensor, String> {
    let data = a.iter().flat_map(|v| v.to_le_bytes()).collect();
    HostTensor::new(Dtype::F32, a.shape().to_vec(), data).map_err(|e| e.to_string())
}

/// An f32 array as a collectives tensor (row-major, logical order).
pub fn comm_tensor<D: Dimension>(a: &Array<f32, D>) -> Result<CommTensor<f32>, String> {
    CommTensor::new(a.shape().to_vec(), a.iter().copied().collect()).map_err(|e| e.to_string())
}

/// A collectives tensor back as an array of dimension `D`.
pub fn from_comm<D: Dimension>(t: CommTensor<f32>) -> Result<Array<f32, D>, String> {
    let shape = t.shape().to_vec();
    Array::from_shape_vec(ndarray::IxDyn(&shape), t.into_data())
        .map_err(|e| e.to_string())?
        .into_dimensionality::<D>()
        .map_err(|e| format!("collective result of shape {shape:?}: {e}"))
}
