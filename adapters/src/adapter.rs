//! The [`MoeAdapter`] trait (one implementation per MoE model family; `adapter_for` in
//! `family_adapter` picks it from config.json's `model_type`).

use crate::checkpoint::HfCheckpoint;
use crate::error::Result;
use crate::local::{LocalTensor, NativeTensorInfo};
use crate::tensor::HostTensor;
use placement::{DeviceMesh, Placement};
use std::collections::BTreeMap;

pub use crate::family::SUPPORTED_MODEL_TYPES;

/// Native key names of one layer's MoE block (the contract with moe-kernels; README "Native
/// layout"). `<L>` is the HF layer prefix (`model.layers.3`, `model.language_model.layers.3`); the
/// MoE module is always `mlp` in native keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NativeMoeKeys {
    /// `<L>.mlp.gate.weight` [E, H] (router).
    pub gate_weight: String,
    /// `<L>.mlp.gate.bias` [E] (GPT-OSS router bias).
    pub gate_bias: Option<String>,
    /// `<L>.mlp.gate.e_score_correction_bias` [E] (DeepSeek-V3, GLM4, Step3.5; dtype as on disk).
    pub e_score_correction_bias: Option<String>,
    /// `<L>.mlp.experts.gate_and_up_projs` [E, H, 2I], gate half first.
    pub gate_and_up_projs: String,
    /// `<L>.mlp.experts.down_projs` [E, I, H].
    pub down_projs: String,
    /// `<L>.mlp.experts.gate_up_proj_bias` [E, 2I] (GPT-OSS, gate half first).
    pub gate_up_proj_bias: Option<String>,
    /// `<L>.mlp.experts.down_proj_bias` [E, H] (GPT-OSS).
    pub down_proj_bias: Option<String>,
    /// `<L>.mlp.shared_experts.{gate_proj,up_proj,down_proj}.weight` [Is, H], [Is, H], [H, Is].
    pub shared: Option<[String; 3]>,
    /// `<L>.mlp.shared_expert_gate.weight` [1, H] (Qwen3-Next / Qwen3.5).
    pub shared_gate: Option<String>,
}

/// One MoE model family. Native layout (README "Native grouped layout"):
/// `...mlp.experts.gate_and_up_projs` `[E, H, 2I]` (gate half first) and `...mlp.experts.down_projs`
/// `[E, I, H]`; everything else passes through unchanged. Conversions never communicate and never
/// change dtype.
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
    /// Native key names of MoE layer `layer`'s block. Errors when `layer` is not a MoE layer.
    fn native_moe_keys(&self, layer: usize) -> Result<NativeMoeKeys>;
    /// Whole checkpoint HF -> native; every non-expert key passes through unchanged.
    fn from_hf(&self, ckpt: &HfCheckpoint) -> Result<BTreeMap<String, HostTensor>>;
    /// Native -> HF disk layout (the inverse; bit-identical round trip). Works key by key, so a
    /// native GRADIENT map (any subset of the native keys, same names as the weights) maps to the
    /// HF disk keys the same way.
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
