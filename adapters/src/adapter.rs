//! The [`MoeAdapter`] trait (one implementation per MoE model family) and [`adapter_for`], which
//! picks the implementation from config.json's `model_type`.

use crate::checkpoint::HfCheckpoint;
use crate::error::{AdapterError, Result};
use crate::local::{LocalTensor, NativeTensorInfo};
use crate::qwen3_moe::Qwen3MoeAdapter;
use crate::tensor::HostTensor;
use placement::{DeviceMesh, Placement};
use std::collections::BTreeMap;

/// model_type values [`adapter_for`] accepts.
pub const SUPPORTED_MODEL_TYPES: &[&str] = &["qwen3_moe"];

/// One MoE model family. Native layout: models.md ("Native grouped layout"):
/// `...mlp.experts.gate_and_up_projs` `[E, H, 2I]` (gate half first) and `...mlp.experts.down_projs`
/// `[E, I, H]`; everything else passes through unchanged. Conversions never communicate and never
/// change dtype (models.md "Seed bugs").
// `from_hf*` take `&self`: the adapter carries the config and the remembered on-disk layout.
#[allow(clippy::wrong_self_convention)]
pub trait MoeAdapter {
    /// config.json model_type this adapter serves.
    fn model_type(&self) -> &str;
    /// Number of routed experts E.
    fn num_experts(&self) -> usize;
    /// Indices of the layers that have a routed-expert MoE block, ascending.
    fn moe_layers(&self) -> Vec<usize>;
    /// Native expert tensors (gate_and_up_projs [E, H, 2I], down_projs [E, I, H] per MoE layer) with global shapes.
    fn native_expert_tensors(&self, ckpt: &HfCheckpoint) -> Result<Vec<NativeTensorInfo>>;
    /// Whole checkpoint HF -> native; every non-expert key passes through unchanged.
    fn from_hf(&self, ckpt: &HfCheckpoint) -> Result<BTreeMap<String, HostTensor>>;
    /// Native -> HF disk layout (the inverse; bit-identical round trip). Must handle gradients the same way.
    fn to_hf(&self, native: &BTreeMap<String, HostTensor>) -> Result<BTreeMap<String, HostTensor>>;
    /// Init path: this rank's shard of native tensor `native_key` for `placements` on `mesh` at
    /// `coord`, reading only the HF tensors it needs.
    fn from_hf_local(
        &self,
        ckpt: &HfCheckpoint,
        native_key: &str,
        mesh: &DeviceMesh,
        placements: &[Placement],
        coord: &[usize],
    ) -> Result<LocalTensor>;
    /// A native local shard -> the HF tensors it covers, with indices and placements moved through
    /// every transpose. No communication.
    fn to_hf_local(&self, local: &LocalTensor) -> Result<Vec<LocalTensor>>;
}

/// Chooses the adapter from config.json's model_type; unknown -> error listing the supported ones.
pub fn adapter_for(ckpt: &HfCheckpoint) -> Result<Box<dyn MoeAdapter>> {
    let mt = ckpt.model_type()?;
    match mt {
        "qwen3_moe" => Ok(Box::new(Qwen3MoeAdapter::from_checkpoint(ckpt)?)),
        other => Err(AdapterError::UnknownModelType {
            model_type: other.to_string(),
            supported: SUPPORTED_MODEL_TYPES
                .iter()
                .map(|s| s.to_string())
                .collect(),
        }),
    }
}
