//! Per-family description of an MoE checkpoint: which config.json fields give E, H, I and the MoE
//! layers, what the MoE module and its router are called on disk, which expert layouts the family
//! writes, and which extra tensors (router bias, score-correction bias, shared experts) it has.
//!
//! Sources (the transformers 5.23 modelling files and model cards named per entry):
//! - `qwen3_moe` (`modeling_qwen3_moe.py`), `qwen3_next` (`modeling_qwen3_next.py`),
//!   `qwen3_5_moe` / `qwen3_5_moe_text` (`modeling_qwen3_5_moe.py`): `mlp.gate`, per-expert
//!   `experts.e.{gate,up,down}_proj.weight` or fused `experts.{gate_up_proj,down_proj}`; Next/3.5 add
//!   `mlp.shared_expert.*` and `mlp.shared_expert_gate.weight` [1, H]. MoE layer rule:
//!   L not in `mlp_only_layers` and `(L + 1) % decoder_sparse_step == 0`.
//! - `qwen3_vl_moe` (`modeling_qwen3_vl_moe.py`): prefix `model.language_model.`, fused experts in
//!   either orientation (published checkpoints [E, H, 2I]; transformers 5.23 `save_pretrained`
//!   writes [E, 2I, H]); config under `text_config`.
//! - `mixtral` (`modeling_mixtral.py` + `conversion_mapping.py`): module `block_sparse_moe`,
//!   experts `w1` (gate), `w3` (up), `w2` (down); every layer MoE; I = `intermediate_size`.
//! - `deepseek_v3`, `glm4_moe` (`modeling_deepseek_v3.py`, `modeling_glm4_moe.py`): layers
//!   `>= first_k_dense_replace` are MoE; `mlp.gate.e_score_correction_bias` [E] (f32 buffer);
//!   `mlp.shared_experts.*`; E = `n_routed_experts`.
//! - `gpt_oss` (`modeling_gpt_oss.py`): `mlp.router.{weight,bias}`, `experts.gate_up_proj` [E, H, 2I]
//!   interleaved (gate = 0::2, up = 1::2), `gate_up_proj_bias` [E, 2I], `down_proj` [E, I, H],
//!   `down_proj_bias` [E, H]; every layer MoE; I = `intermediate_size`.
//! - `step3p5` (Step-3.5 published layout, not in transformers): `moe.{gate,up}_proj.weight`
//!   [E, I, H], `moe.down_proj.weight` [E, H, I], `moe.gate.weight`, `moe.router_bias` [E],
//!   `share_expert.{gate,up,down}_proj.weight`; E = `moe_num_experts`; MoE layers from
//!   `moe_layers_enum` ("3,4,5" or a list).

use crate::error::{AdapterError, Result};
use serde_json::Value;

/// model_type values this crate has adapters for.
pub const SUPPORTED_MODEL_TYPES: &[&str] = &[
    "qwen3_moe",
    "qwen3_next",
    "qwen3_5_moe",
    "qwen3_5_moe_text",
    "qwen3_vl_moe",
    "qwen3_vl_moe_text",
    "mixtral",
    "deepseek_v3",
    "glm4_moe",
    "gpt_oss",
    "step3p5",
];

/// How the expert weights of a family can be stored on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExpertStyle {
    /// Per-expert `experts.e.{gate,up,down}` Linear weights (names given) or the transformers v5
    /// fused pair `experts.gate_up_proj` / `experts.down_proj` (either orientation).
    PerExpertOrFused {
        /// Per-expert file names of gate, up and down (e.g. `gate_proj.weight`, `w1.weight`).
        names: [&'static str; 3],
        /// The orientations the family's fused pair is known to be written in (first: the one
        /// its writers use today). A fused checkpoint in another orientation is refused, also
        /// when its shapes could be read either way (`H == 2I` makes `gate_up_proj` square).
        fused: &'static [FusedOrientation],
    },
    /// GPT-OSS: fused, interleaved gate_up [E, H, 2I] + biases.
    GptOss,
    /// Step3.5: stacked `moe.{gate,up}_proj.weight` [E, I, H], `moe.down_proj.weight` [E, H, I].
    Step35,
}

/// Orientation of a fused expert pair `experts.gate_up_proj` / `experts.down_proj` on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FusedOrientation {
    /// transformers v5 (`save_pretrained`, published Qwen3.5): `[E, 2I, H]`, `[E, H, I]`.
    Transposed,
    /// The native orientation (published Qwen3-VL-MoE): `[E, H, 2I]`, `[E, I, H]`.
    Native,
}

impl FusedOrientation {
    /// `[gate_up_proj, down_proj]` shapes of this orientation for `E`, `H`, `I`.
    pub fn shapes(self, e: usize, h: usize, i: usize) -> [[usize; 3]; 2] {
        match self {
            FusedOrientation::Transposed => [[e, 2 * i, h], [e, h, i]],
            FusedOrientation::Native => [[e, h, 2 * i], [e, i, h]],
        }
    }

    /// Display name (`transformers [E, 2I, H]` / `native [E, H, 2I]`).
    pub fn name(self) -> &'static str {
        match self {
            FusedOrientation::Transposed => "transformers [E, 2I, H] / [E, H, I]",
            FusedOrientation::Native => "native [E, H, 2I] / [E, I, H]",
        }
    }
}

/// Fused orientation of transformers v5 writers (every family but Qwen3-VL-MoE).
const TRANSFORMERS_FUSED: &[FusedOrientation] = &[FusedOrientation::Transposed];
/// Qwen3-VL-MoE: published checkpoints native, transformers 5.23 `save_pretrained` transposed.
const VL_FUSED: &[FusedOrientation] = &[FusedOrientation::Native, FusedOrientation::Transposed];

/// Which layers have a routed-expert block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MoeLayerRule {
    /// Qwen: L not in `mlp_only_layers` and `(L + 1) % decoder_sparse_step == 0`.
    SparseStep {
        /// `decoder_sparse_step` (>= 1).
        step: usize,
        /// `mlp_only_layers`.
        mlp_only: Vec<usize>,
    },
    /// DeepSeek-V3 / GLM4: L >= `first_k_dense_replace`.
    FirstKDense(usize),
    /// Every layer (Mixtral, GPT-OSS).
    All,
    /// An explicit list (Step3.5 `moe_layers_enum`).
    List(Vec<usize>),
}

/// The static description of one family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FamilySpec {
    /// Canonical model_type.
    pub model_type: &'static str,
    /// Disk module names of the MoE block, tried in order (`mlp`, `block_sparse_moe`, `moe`).
    pub moe_modules: &'static [&'static str],
    /// Disk name of the router module under the MoE module (`gate` or `router`).
    pub router: &'static str,
    /// Expert storage.
    pub experts: ExpertStyle,
    /// Disk path (relative to the layer) of the score-correction bias, when the family has one.
    pub e_bias: Option<&'static str>,
    /// Disk path (relative to the layer) of the shared-expert module, when the family has one.
    pub shared: Option<&'static str>,
    /// Disk path (relative to the layer) of the shared-expert sigmoid gate weight [1, H].
    pub shared_gate: Option<&'static str>,
}

const QWEN_NAMES: [&str; 3] = ["gate_proj.weight", "up_proj.weight", "down_proj.weight"];

/// The spec of `model_type`, or an error listing the supported ones.
pub fn spec_for(model_type: &str) -> Result<FamilySpec> {
    let qwen = FamilySpec {
        model_type: "qwen3_moe",
        moe_modules: &["mlp"],
        router: "gate",
        experts: ExpertStyle::PerExpertOrFused {
            names: QWEN_NAMES,
            fused: TRANSFORMERS_FUSED,
        },
        e_bias: None,
        shared: None,
        shared_gate: None,
    };
    let spec = match model_type {
        "qwen3_moe" => qwen,
        "qwen3_next" | "qwen3_5_moe" | "qwen3_5_moe_text" => FamilySpec {
            model_type: match model_type {
                "qwen3_next" => "qwen3_next",
                "qwen3_5_moe" => "qwen3_5_moe",
                _ => "qwen3_5_moe_text",
            },
            shared: Some("mlp.shared_expert"),
            shared_gate: Some("mlp.shared_expert_gate.weight"),
            ..qwen
        },
        "qwen3_vl_moe" | "qwen3_vl_moe_text" => FamilySpec {
            model_type: if model_type == "qwen3_vl_moe" {
                "qwen3_vl_moe"
            } else {
                "qwen3_vl_moe_text"
            },
            experts: ExpertStyle::PerExpertOrFused {
                names: QWEN_NAMES,
                fused: VL_FUSED,
            },
            ..qwen
        },
        "mixtral" => FamilySpec {
            model_type: "mixtral",
            moe_modules: &["block_sparse_moe", "mlp"],
            experts: ExpertStyle::PerExpertOrFused {
                names: ["w1.weight", "w3.weight", "w2.weight"],
                fused: TRANSFORMERS_FUSED,
            },
            ..qwen
        },
        "deepseek_v3" | "glm4_moe" => FamilySpec {
            model_type: if model_type == "glm4_moe" {
                "glm4_moe"
            } else {
                "deepseek_v3"
            },
            e_bias: Some("mlp.gate.e_score_correction_bias"),
            shared: Some("mlp.shared_experts"),
            ..qwen
        },
        "gpt_oss" => FamilySpec {
            model_type: "gpt_oss",
            router: "router",
            experts: ExpertStyle::GptOss,
            ..qwen
        },
        "step3p5" => FamilySpec {
            model_type: "step3p5",
            moe_modules: &["moe"],
            experts: ExpertStyle::Step35,
            e_bias: Some("moe.router_bias"),
            shared: Some("share_expert"),
            ..qwen
        },
        other => {
            return Err(AdapterError::UnknownModelType {
                model_type: other.to_string(),
                supported: SUPPORTED_MODEL_TYPES
                    .iter()
                    .map(|s| s.to_string())
                    .collect(),
            })
        }
    };
    Ok(spec)
}

/// Largest E, H, I, Is or layer count accepted from config.json: values beyond are refused
/// before any arithmetic (so `2 * I`, `E * H` and the like cannot overflow).
pub const MAX_DIM: usize = 1 << 32;

/// The config.json numbers an adapter needs (from `text_config` for VL / multimodal configs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FamilyConfig {
    /// `num_hidden_layers`.
    pub num_hidden_layers: usize,
    /// Routed experts E (`num_experts` / `num_local_experts` / `n_routed_experts` / `moe_num_experts`).
    pub num_experts: usize,
    /// `hidden_size` H.
    pub hidden_size: usize,
    /// Expert intermediate size I (`moe_intermediate_size`, else `intermediate_size`).
    pub moe_intermediate_size: usize,
    /// Which layers are MoE.
    pub rule: MoeLayerRule,
    /// Intermediate size Is of the shared expert(s) of a family that has them (their projections
    /// are `[Is, H]` and `[H, Is]`): `shared_expert_intermediate_size` (Qwen3-Next, Qwen3.5),
    /// `n_shared_experts * moe_intermediate_size` (DeepSeek-V3, GLM-4.5), `share_expert_dim`
    /// (Step3.5). transformers builds the shared expert whenever the family has one, even of
    /// size 0 (`modeling_deepseek_v3.py`, `modeling_qwen3_next.py`). `None` for a family
    /// without shared experts, or when config.json does not give the field (then the checkpoint's
    /// keys decide whether there is one).
    pub shared_intermediate_size: Option<usize>,
    /// Whether the router has a score-correction bias `[E]`: always for DeepSeek-V3 and GLM-4.5
    /// (transformers' `e_score_correction_bias` buffer), `use_moe_router_bias` for Step3.5,
    /// never for the others; `None` when config.json does not say.
    pub router_e_bias: Option<bool>,
    /// DeepSeek-V3 / GLM-4.5 `num_nextn_predict_layers`: multi-token-prediction layers a
    /// checkpoint may hold after the last layer (`model.layers.{L}...`, MoE layers like the
    /// others; transformers itself skips them on load). 0 for the other families.
    pub num_nextn_predict_layers: usize,
    /// How many of those the checkpoint holds (set from its keys by the adapter; 0 from
    /// [`FamilyConfig::from_json`]): they count as MoE layers.
    pub mtp_layers: usize,
}

pub(crate) fn get_usize(cfg: &Value, field: &str, mt: &str) -> Result<Option<usize>> {
    match cfg.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v.as_u64().map(|x| Some(x as usize)).ok_or_else(|| {
            AdapterError::Config(format!(
                "config.json: field '{field}' is {v}, not a non-negative integer ({mt})"
            ))
        }),
    }
}

fn need_usize(cfg: &Value, field: &str, mt: &str) -> Result<usize> {
    get_usize(cfg, field, mt)?
        .ok_or_else(|| AdapterError::Config(format!("config.json: missing field '{field}' ({mt})")))
}

/// The first of `fields` present, and its name; every present one must agree.
fn one_of<'f>(cfg: &Value, fields: &[&'f str], mt: &str) -> Result<(usize, &'f str)> {
    let mut found: Option<(usize, &str)> = None;
    for f in fields {
        if let Some(v) = get_usize(cfg, f, mt)? {
            match found {
                None => found = Some((v, f)),
                Some((w, g)) if w != v => {
                    return Err(AdapterError::Config(format!(
                        "config.json: {g} {w} disagrees with {f} {v} ({mt})"
                    )))
                }
                _ => {}
            }
        }
    }
    found.ok_or_else(|| {
        AdapterError::Config(format!(
            "config.json: missing field '{}' ({mt})",
            fields.join("' / '")
        ))
    })
}

fn layer_list(v: &Value, field: &str) -> Result<Vec<usize>> {
    let bad = || {
        AdapterError::Config(format!(
            "config.json: field '{field}' is {v}, not a list of layer indices"
        ))
    };
    match v {
        Value::String(s) => s
            .split(',')
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .map(|t| t.parse::<usize>().map_err(|_| bad()))
            .collect(),
        _ => serde_json::from_value(v.clone()).map_err(|_| bad()),
    }
}

impl FamilyConfig {
    /// Reads the fields for `spec` from a parsed config.json (the `text_config` object when the
    /// top level has one and lacks `hidden_size`). Errors name the field.
    pub fn from_json(spec: &FamilySpec, root: &Value) -> Result<Self> {
        let mt = spec.model_type;
        let cfg = match root.get("text_config") {
            Some(t @ Value::Object(_)) if root.get("hidden_size").is_none() => t,
            _ => root,
        };
        let (num_experts, experts_field) = one_of(
            cfg,
            &[
                "num_experts",
                "num_local_experts",
                "n_routed_experts",
                "moe_num_experts",
            ],
            mt,
        )?;
        let (moe_intermediate_size, i_field) = match get_usize(cfg, "moe_intermediate_size", mt)? {
            Some(i) => (i, "moe_intermediate_size"),
            None => (
                need_usize(cfg, "intermediate_size", mt)?,
                "intermediate_size",
            ),
        };
        let rule = match spec.model_type {
            "mixtral" | "gpt_oss" => MoeLayerRule::All,
            "deepseek_v3" | "glm4_moe" => {
                MoeLayerRule::FirstKDense(get_usize(cfg, "first_k_dense_replace", mt)?.unwrap_or(0))
            }
            "step3p5" => match cfg.get("moe_layers_enum") {
                None | Some(Value::Null) => {
                    return Err(AdapterError::Config(format!(
                        "config.json: missing field 'moe_layers_enum' ({mt})"
                    )))
                }
                Some(v) => MoeLayerRule::List(layer_list(v, "moe_layers_enum")?),
            },
            _ => {
                let step = get_usize(cfg, "decoder_sparse_step", mt)?.unwrap_or(1);
                if step == 0 && num_experts > 0 {
                    return Err(AdapterError::Config(
                        "config.json: decoder_sparse_step is 0 (must be >= 1 when num_experts > 0)"
                            .to_string(),
                    ));
                }
                let mlp_only = match cfg.get("mlp_only_layers") {
                    None | Some(Value::Null) => Vec::new(),
                    Some(v) => layer_list(v, "mlp_only_layers")?,
                };
                MoeLayerRule::SparseStep { step, mlp_only }
            }
        };
        let shared_intermediate_size = match spec.model_type {
            _ if spec.shared.is_none() => None,
            "deepseek_v3" | "glm4_moe" => match get_usize(cfg, "n_shared_experts", mt)? {
                None => None,
                Some(n) => Some(n.checked_mul(moe_intermediate_size).ok_or_else(|| {
                    AdapterError::Config(format!(
                        "config.json: n_shared_experts {n} x moe_intermediate_size {moe_intermediate_size} overflows ({mt})"
                    ))
                })?),
            },
            "step3p5" => get_usize(cfg, "share_expert_dim", mt)?,
            _ => get_usize(cfg, "shared_expert_intermediate_size", mt)?,
        };
        let router_e_bias = match spec.model_type {
            "deepseek_v3" | "glm4_moe" => Some(true),
            "step3p5" => match cfg.get("use_moe_router_bias") {
                None | Some(Value::Null) => None,
                Some(Value::Bool(b)) => Some(*b),
                Some(v) => {
                    return Err(AdapterError::Config(format!(
                        "config.json: field 'use_moe_router_bias' is {v}, not a boolean ({mt})"
                    )))
                }
            },
            _ => Some(false),
        };
        let num_hidden_layers = need_usize(cfg, "num_hidden_layers", mt)?;
        let hidden_size = need_usize(cfg, "hidden_size", mt)?;
        for (name, v) in [
            (experts_field, num_experts),
            ("hidden_size", hidden_size),
            (i_field, moe_intermediate_size),
            ("num_hidden_layers", num_hidden_layers),
            (
                "the shared experts' intermediate size",
                shared_intermediate_size.unwrap_or(0),
            ),
        ] {
            if v > MAX_DIM {
                return Err(AdapterError::Config(format!(
                    "config.json: {name} = {v} is absurd (more than {MAX_DIM}) ({mt})"
                )));
            }
        }
        Ok(FamilyConfig {
            num_hidden_layers,
            num_experts,
            hidden_size,
            moe_intermediate_size,
            rule,
            shared_intermediate_size,
            router_e_bias,
            num_nextn_predict_layers: match spec.model_type {
                "deepseek_v3" | "glm4_moe" => {
                    get_usize(cfg, "num_nextn_predict_layers", mt)?.unwrap_or(0)
                }
                _ => 0,
            },
            mtp_layers: 0,
        })
    }

    /// Whether layer `l` has a routed-expert block.
    pub fn is_moe_layer(&self, l: usize) -> bool {
        if l >= self.num_hidden_layers + self.mtp_layers || self.num_experts == 0 {
            return false;
        }
        match &self.rule {
            MoeLayerRule::SparseStep { step, mlp_only } => {
                !mlp_only.contains(&l) && *step > 0 && (l + 1) % step == 0
            }
            MoeLayerRule::FirstKDense(k) => l >= *k,
            MoeLayerRule::All => true,
            MoeLayerRule::List(v) => v.contains(&l),
        }
    }

    /// MoE layer indices, ascending.
    pub fn moe_layers(&self) -> Vec<usize> {
        (0..self.num_hidden_layers + self.mtp_layers)
            .filter(|&l| self.is_moe_layer(l))
            .collect()
    }
}
