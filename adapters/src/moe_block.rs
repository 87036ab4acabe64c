//! The non-expert tensors of every MoE block, checked on each read: the router `[E, H]`, the
//! GPT-OSS router bias `[E]`, the score-correction bias `[E]` (DeepSeek-V3 / GLM-4.5
//! `e_score_correction_bias`, Step3.5 `router_bias`), the shared expert(s) (`gate_proj` /
//! `up_proj` `[Is, H]`, `down_proj` `[H, Is]`) and the shared-expert gate `[1, H]` (Qwen3-Next,
//! Qwen3.5). Each must be present exactly when the adapter's layout says so (from config.json,
//! see [`crate::family::FamilyConfig`]), with its shape; any other key under the MoE module of
//! a MoE layer is an error. Names: the disk names of [`crate::family::spec_for`] on the HF side,
//! the native names (`mlp.gate.weight`, `mlp.gate.e_score_correction_bias`,
//! `mlp.shared_experts.*`, `mlp.shared_expert_gate.weight`) on the native side; shapes from
//! transformers' modules (`modeling_deepseek_v3.py`, `modeling_qwen3_next.py`,
//! `modeling_gpt_oss.py`).

use crate::adapter_layout::AdapterLayout;
pub use crate::adapter_layout::Side;
use crate::checkpoint::HfCheckpoint;
use crate::error::{AdapterError, Result};

/// One non-expert tensor of a MoE block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockTensor {
    /// Its HF disk key.
    pub disk: String,
    /// Its native key.
    pub native: String,
    /// Expected shape; `None` for a shared-expert projection when config.json gives no Is (then
    /// the three projections must agree with one another).
    pub shape: Option<Vec<usize>>,
    /// The dims by name, e.g. `[E, H]`.
    pub dims: &'static str,
    /// What it is, e.g. `router`.
    pub what: &'static str,
}

/// The non-expert tensors of MoE layer `l` under `a`'s layout.
pub fn block_tensors(a: &dyn AdapterLayout, l: usize) -> Vec<BlockTensor> {
    let c = a.config();
    let spec = a.spec();
    let choice = a.layout_choice();
    let [router_bias, e_bias, shared, shared_gate] = choice.optional;
    let p = format!("{}.{l}", choice.prefix);
    let m = choice.moe_module;
    let (e, h) = (c.num_experts, c.hidden_size);
    let mut v = vec![BlockTensor {
        disk: format!("{p}.{m}.{}.weight", spec.router),
        native: format!("{p}.mlp.gate.weight"),
        shape: Some(vec![e, h]),
        dims: "[E, H]",
        what: "router",
    }];
    if router_bias {
        v.push(BlockTensor {
            disk: format!("{p}.{m}.{}.bias", spec.router),
            native: format!("{p}.mlp.gate.bias"),
            shape: Some(vec![e]),
            dims: "[E]",
            what: "router bias",
        });
    }
    if let (true, Some(b)) = (e_bias, spec.e_bias) {
        v.push(BlockTensor {
            disk: format!("{p}.{b}"),
            native: format!("{p}.mlp.gate.e_score_correction_bias"),
            shape: Some(vec![e]),
            dims: "[E]",
            what: "score-correction bias",
        });
    }
    if let (true, Some(s)) = (shared, spec.shared) {
        let is = c.shared_intermediate_size;
        for (proj, shape, dims) in [
            ("gate_proj", is.map(|i| vec![i, h]), "[Is, H]"),
            ("up_proj", is.map(|i| vec![i, h]), "[Is, H]"),
            ("down_proj", is.map(|i| vec![h, i]), "[H, Is]"),
        ] {
            v.push(BlockTensor {
                disk: format!("{p}.{s}.{proj}.weight"),
                native: format!("{p}.mlp.shared_experts.{proj}.weight"),
                shape,
                dims,
                what: "shared expert",
            });
        }
    }
    if let (true, Some(g)) = (shared_gate, spec.shared_gate) {
        v.push(BlockTensor {
            disk: format!("{p}.{g}"),
            native: format!("{p}.mlp.shared_expert_gate.weight"),
            shape: Some(vec![1, h]),
            dims: "[1, H]",
            what: "shared-expert gate",
        });
    }
    v
}

/// Checks every MoE layer's non-expert tensors of `ckpt` (named as `side` says): present, of
/// their shape, and no other key under the MoE module. Errors name the checkpoint, the key,
/// the expected shape with its dims, and what was found.
pub fn check(a: &dyn AdapterLayout, ckpt: &HfCheckpoint, side: Side) -> Result<()> {
    let dir = ckpt.dir().display();
    let c = a.config();
    let module = match side {
        Side::Hf => a.layout_choice().moe_module,
        Side::Native => "mlp",
    };
    // Keys under some layer's MoE module, by layer (one pass over the keys, not one per layer).
    let mut under_module: std::collections::BTreeMap<usize, Vec<&str>> = Default::default();
    let lp = format!("{}.", a.prefix());
    for k in ckpt.keys() {
        let Some((l, rest)) = k
            .strip_prefix(&lp)
            .and_then(|r| r.split_once('.'))
            .and_then(|(l, rest)| Some((l.parse::<usize>().ok()?, rest)))
        else {
            continue;
        };
        if rest
            .strip_prefix(module)
            .is_some_and(|r| r.starts_with('.'))
        {
            under_module.entry(l).or_default().push(k);
        }
    }
    for l in c.moe_layers() {
        let want = block_tensors(a, l);
        let name = |t: &BlockTensor| match side {
            Side::Hf => t.disk.clone(),
            Side::Native => t.native.clone(),
        };
        // Is from the checkpoint when config.json does not give it: the shared gate_proj's dim 0.
        let is_found = want
            .iter()
            .find(|t| t.shape.is_none())
            .and_then(|t| ckpt.info(&name(t)).ok())
            .and_then(|i| i.shape.first().copied());
        for t in &want {
            let k = name(t);
            if !ckpt.contains(&k) {
                return Err(AdapterError::UnexpectedKeys(format!(
                    "{dir}: layer {l}: missing '{k}' ({} {}, {}; config.json: E={}, H={})",
                    a.spec().model_type,
                    t.what,
                    t.dims,
                    c.num_experts,
                    c.hidden_size
                )));
            }
            let info = ckpt.info(&k)?;
            let shape = t.shape.clone().or_else(|| {
                let h = c.hidden_size;
                is_found.map(|i| {
                    if t.dims == "[H, Is]" {
                        vec![h, i]
                    } else {
                        vec![i, h]
                    }
                })
            });
            if let Some(s) = shape {
                if info.shape != s {
                    let file = info.file_name();
                    let is = match (t.dims.contains("Is"), c.shared_intermediate_size) {
                        (false, _) => String::new(),
                        (true, Some(i)) => format!(", Is={i}"),
                        (true, None) => format!(", Is={} as the shared gate_proj", s[0]),
                    };
                    return Err(AdapterError::Shape(format!(
                        "{file}: tensor '{k}' has shape {:?} but config.json (E={}, H={}{is}) gives {s:?} {}",
                        info.shape, c.num_experts, c.hidden_size, t.dims
                    )));
                }
            }
        }
        let stray: Vec<&str> = under_module
            .remove(&l)
            .unwrap_or_default()
            .into_iter()
            .filter(|k| !a.is_expert_key(k, side))
            .filter(|k| !want.iter().any(|t| name(t) == *k))
            .collect();
        if let Some(k) = stray.first() {
            return Err(AdapterError::UnexpectedKeys(format!(
                "{dir}: unexpected key '{k}' in the MoE block of layer {l} ({} expects {}, and the experts){}",
                a.spec().model_type,
                want.iter().map(name).collect::<Vec<_>>().join(", "),
                if stray.len() > 1 {
                    format!(" ({} unexpected)", stray.len())
                } else {
                    String::new()
                }
            )));
        }
    }
    Ok(())
}
