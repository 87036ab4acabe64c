//! The parameters transformers 5.23 builds in memory from an HF checkpoint: their names (as
//! `model.named_parameters()` gives them) and global shapes. This is what transformers' TP and EP
//! plans are applied to, and what a DCP saved from a transformers model names its fqns.
//!
//! Rules (transformers 5.23 `conversion_mapping.py` and the modelling files named in
//! [`crate::family`]):
//! - the expert tensors of MoE layer `L` are one fused pair per layer,
//!   `P.L.mlp.experts.gate_up_proj` `[E, 2I, H]` (gate rows first, then up) and
//!   `P.L.mlp.experts.down_proj` `[E, H, I]`, whatever the disk layout (per-expert Linear weights
//!   or a fused pair); GPT-OSS keeps its own `gate_up_proj` `[E, H, 2I]` (interleaved),
//!   `gate_up_proj_bias` `[E, 2I]`, `down_proj` `[E, I, H]`, `down_proj_bias` `[E, H]`;
//! - the MoE module is called `mlp` in memory (Mixtral's `block_sparse_moe.gate.weight` is
//!   `mlp.gate.weight`);
//! - the score-correction bias (`mlp.gate.e_score_correction_bias`) is a buffer, not a
//!   parameter;
//! - every other key under the model's root module (`model.`, `lm_head.`) is a parameter of the
//!   same name and shape; keys outside it (e.g. a fixture's golden tensors) are not loaded.
//!
//! ```no_run
//! use adapters::checkpoint::HfCheckpoint;
//! use adapters::hf_memory::transformers_params;
//! let ckpt = HfCheckpoint::open(std::path::Path::new("conformance/fixtures/mixtral_tiny")).unwrap();
//! for (name, shape) in transformers_params(&ckpt).unwrap() {
//!     println!("{name} {shape:?}"); // e.g. model.layers.0.mlp.experts.gate_up_proj [8, 64, 64]
//! }
//! ```

use crate::checkpoint::HfCheckpoint;
use crate::error::{AdapterError, Result};
use crate::family_adapter::{split_layer, FamilyAdapter};
use crate::layout::{DiskLayout, NativeKind};
use std::collections::BTreeMap;

/// The in-memory parameters of `ckpt` as transformers 5.23 builds them: name -> global shape,
/// sorted by name (see the module docs for the rules).
///
/// Errors: those of [`FamilyAdapter::from_checkpoint`] (unknown model_type, bad config.json,
/// mixed layouts, each naming the file), [`AdapterError::Unsupported`] for a family transformers
/// 5.23 has no model class for (`step3p5`).
pub fn transformers_params(ckpt: &HfCheckpoint) -> Result<BTreeMap<String, Vec<usize>>> {
    let adapter = FamilyAdapter::from_checkpoint(ckpt)?;
    if adapter.layout() == DiskLayout::Step35 {
        return Err(AdapterError::Unsupported(format!(
            "{}: model_type {} has no transformers 5.23 model class, so no in-memory parameters",
            ckpt.dir().join("config.json").display(),
            adapter.spec().model_type
        )));
    }
    let prefix = adapter.prefix();
    let root = format!("{}.", prefix.split('.').next().unwrap_or("model"));
    let moe = format!(".{}.", adapter.layout_choice().moe_module);
    let e_bias = adapter.spec().e_bias;
    let mut out = BTreeMap::new();
    for key in ckpt.keys() {
        let loaded = key.starts_with(&root) || key.starts_with("lm_head.");
        if !loaded || adapter.is_expert_disk_key(key) {
            continue;
        }
        let layer_rest = split_layer(prefix, key);
        if let (Some(b), Some((_, rest))) = (e_bias, layer_rest) {
            if rest == b {
                continue;
            }
        }
        let name = match layer_rest {
            Some(_) => key.replacen(&moe, ".mlp.", 1),
            None => key.to_string(),
        };
        out.insert(name, ckpt.info(key)?.shape);
    }
    let gpt_oss = adapter.layout() == DiskLayout::GptOss;
    for g in adapter.groups() {
        let (suffix, transpose) = match g.kind {
            NativeKind::GateUp => ("gate_up_proj", !gpt_oss),
            NativeKind::Down => ("down_proj", !gpt_oss),
            NativeKind::GateUpBias => ("gate_up_proj_bias", false),
            NativeKind::DownBias => ("down_proj_bias", false),
        };
        let mut shape = g.shape.clone();
        if transpose && shape.len() == 3 {
            shape.swap(1, 2);
        }
        out.insert(format!("{prefix}.{}.mlp.experts.{suffix}", g.layer), shape);
    }
    Ok(out)
}
