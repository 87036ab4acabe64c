//! What the MoE-block and model-key checks (`moe_block`, `model_keys`) read of an adapter: its
//! family, config numbers and detected layout, and which keys are expert tensors. The family
//! adapter implements it; the checks depend on this, not on the adapter.

use crate::family::{FamilyConfig, FamilySpec};
use crate::layout::DiskLayout;

/// Which naming the checkpoint follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The family's HF disk names.
    Hf,
    /// This crate's native names.
    Native,
}

/// Options for building an adapter without a checkpoint (tools, benchmarks, tests).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayoutChoice {
    /// Layer prefix (`model.layers`).
    pub prefix: String,
    /// Disk module name of the MoE block (`mlp`, `block_sparse_moe`, `moe`).
    pub moe_module: &'static str,
    /// Expert layout.
    pub layout: DiskLayout,
    /// Router bias / score-correction bias / shared experts / shared-expert gate present.
    pub optional: [bool; 4],
}

/// The adapter as the checks see it.
pub trait AdapterLayout {
    /// The family spec (disk names, router and expert styles).
    fn spec(&self) -> &FamilySpec;
    /// The parsed config numbers.
    fn config(&self) -> &FamilyConfig;
    /// The layer prefix (`model.layers` or `model.language_model.layers`).
    fn prefix(&self) -> &str;
    /// What was detected: prefix, MoE module name, expert layout, optional tensors.
    fn layout_choice(&self) -> LayoutChoice;
    /// Whether `key`, named as `side` says, is an expert tensor of some MoE layer (an HF disk
    /// key an expert group reads, or a native expert key).
    fn is_expert_key(&self, key: &str, side: Side) -> bool;
}
