//! transformers 5.23's tensor- and expert-parallel plans applied to a checkpoint: for every
//! parameter transformers builds in memory ([`crate::hf_memory::transformers_params`]), its
//! placements on the 1-D TP mesh and its local shape on every rank, as
//! `from_pretrained(dir, tp_plan="auto")` (and `DistributedConfig(tp_size=N, ep_size=N)`) gives
//! them.
//!
//! The plans per model_type are data: `adapters/data/transformers_plans.json`, written by
//! `conformance/fixtures/generate_tp_plans.py` from transformers 5.23's config classes
//! (`base_model_tp_plan`, `base_model_ep_plan`) and model classes (`_tp_plan`, `_ep_plan`,
//! `base_model_prefix`). The rules that turn a plan into placements are
//! [`placement::hf_plan::HfTpPlan`]'s. Rules of transformers' `distributed/mixin.py` and
//! `distributed/configuration_utils.py` kept here: a plan of a parallel size of 1 is not applied;
//! a size above 1 with an empty plan is an error; `ep_size` must be a multiple of `tp_size` and
//! divide `fsdp_size * tp_size`, so without FSDP, EP runs on the TP ranks (`ep == tp`); and
//! `grouped_gemm` needs the experts to divide evenly (`expert_parallel.py`).
//!
//! ```no_run
//! use adapters::checkpoint::HfCheckpoint;
//! use adapters::hf_plan::plan_checkpoint;
//! let ckpt = HfCheckpoint::open(std::path::Path::new("conformance/fixtures/qwen3_moe_tiny")).unwrap();
//! let table = plan_checkpoint(&ckpt, 2, 1).unwrap();
//! let p = &table.params["model.layers.0.mlp.experts.gate_up_proj"];
//! assert_eq!(p.placements.as_ref().unwrap()[0].to_string(), "_S(1, 2)");
//! ```

use crate::checkpoint::HfCheckpoint;
use crate::error::{AdapterError, Result};
use crate::hf_memory::transformers_params;
use placement::hf_plan::HfTpPlan;
use placement::{local_shard, DeviceMesh, Placement};
use serde_json::Value;
use std::collections::BTreeMap;

/// The committed plan table (see the module docs).
const PLANS_JSON: &str = include_str!("../data/transformers_plans.json");
/// Where the table comes from, for error messages.
const PLANS_FILE: &str = "adapters/data/transformers_plans.json";
/// The largest TP / EP size accepted: a bound on the per-rank tables this builds.
pub const MAX_PARALLEL_SIZE: usize = 4096;

/// `(pattern, style)` rules, e.g. `("layers.*.mlp.experts.gate_up_proj", "packed_colwise")`.
pub type Rules = Vec<(String, String)>;

/// One model_type's plans as transformers 5.23 defines them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransformersPlans {
    /// The config class's `base_model_tp_plan` (empty when it has none).
    pub base_model_tp_plan: Rules,
    /// The config class's `base_model_ep_plan`.
    pub base_model_ep_plan: Rules,
    /// The model class's `_tp_plan` (e.g. `lm_head: colwise_gather_output`).
    pub model_tp_plan: Rules,
    /// The model class's `_ep_plan`.
    pub model_ep_plan: Rules,
    /// The module path of the base model, the prefix of the `base_model_*` rules (`model.`).
    pub base_prefix: String,
}

/// The plans of `model_type` from the committed table.
///
/// Errors: [`AdapterError::Unsupported`] for a model_type not in the table or one transformers
/// 5.23 has no model class for; [`AdapterError::Format`] for a malformed table entry.
pub fn transformers_plans(model_type: &str) -> Result<TransformersPlans> {
    let doc: Value = serde_json::from_str(PLANS_JSON)
        .map_err(|e| AdapterError::Format(format!("{PLANS_FILE}: {e}")))?;
    let types = &doc["model_types"];
    let entry = types.get(model_type).ok_or_else(|| {
        let known: Vec<&String> = types
            .as_object()
            .map(|m| m.keys().collect())
            .unwrap_or_default();
        AdapterError::Unsupported(format!(
            "{PLANS_FILE}: no transformers plans for model_type {model_type} (known: {known:?})"
        ))
    })?;
    if entry["model_class"].is_null() {
        return Err(AdapterError::Unsupported(format!(
            "{PLANS_FILE}: model_type {model_type} has no transformers 5.23 model class to load it"
        )));
    }
    let rules = |field: &str| -> Result<Rules> {
        match &entry[field] {
            Value::Null => Ok(Vec::new()),
            Value::Object(m) => m
                .iter()
                .map(|(k, v)| match v.as_str() {
                    Some(s) => Ok((k.clone(), s.to_string())),
                    None => Err(AdapterError::Format(format!(
                        "{PLANS_FILE}: {model_type}.{field}.{k} is not a style string"
                    ))),
                })
                .collect(),
            _ => Err(AdapterError::Format(format!(
                "{PLANS_FILE}: {model_type}.{field} is not an object"
            ))),
        }
    };
    let prefix = entry["base_model_prefix"].as_str().ok_or_else(|| {
        AdapterError::Format(format!(
            "{PLANS_FILE}: {model_type}.base_model_prefix missing"
        ))
    })?;
    Ok(TransformersPlans {
        base_model_tp_plan: rules("base_model_tp_plan")?,
        base_model_ep_plan: rules("base_model_ep_plan")?,
        model_tp_plan: rules("model_tp_plan")?,
        model_ep_plan: rules("model_ep_plan")?,
        base_prefix: format!("{prefix}."),
    })
}

/// One parameter under the plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParamPlan {
    /// Global shape (the in-memory shape, e.g. `gate_up_proj` `[E, 2I, H]`).
    pub global_shape: Vec<usize>,
    /// Placements on the 1-D mesh, `None` when the parameter stays a plain tensor.
    pub placements: Option<Vec<Placement>>,
    /// The plan style that placed it (`None`: no rule).
    pub style: Option<String>,
    /// Local shape per rank (the global shape on every rank for a plain tensor).
    pub local_shapes: Vec<Vec<usize>>,
}

/// A checkpoint's parameters under a TP (and EP) plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlanTable {
    /// The world size (`tp`; EP runs on the same ranks).
    pub world: usize,
    /// Every in-memory parameter by name.
    pub params: BTreeMap<String, ParamPlan>,
    /// The applied rules that match no parameter or module (transformers warns "rules ... match
    /// nothing ... and will not be applied").
    pub rules_matching_nothing: Vec<String>,
}

/// The plan table of `ckpt` at `tp` ranks, with expert parallelism when `ep > 1` (`ep` must be
/// 1 or `tp`; see the module docs).
///
/// Errors: [`AdapterError::Config`] for a `tp` or `ep` outside `1..=MAX_PARALLEL_SIZE`, an `ep`
/// that transformers refuses, a parallel size over an empty plan, experts that do not divide
/// by `ep`, or a style [`HfTpPlan`] does not know (each naming the parameter or rule); those of
/// [`transformers_params`] and [`transformers_plans`].
pub fn plan_checkpoint(ckpt: &HfCheckpoint, tp: usize, ep: usize) -> Result<PlanTable> {
    let config = ckpt.dir().join("config.json");
    let cfg_err = |m: String| AdapterError::Config(format!("{}: {m}", config.display()));
    for (name, v) in [("tp", tp), ("ep", ep)] {
        if !(1..=MAX_PARALLEL_SIZE).contains(&v) {
            return Err(cfg_err(format!(
                "{name} = {v} is outside 1..={MAX_PARALLEL_SIZE}"
            )));
        }
    }
    if ep > 1 && ep != tp {
        return Err(cfg_err(format!(
            "ep = {ep} with tp = {tp}: transformers needs ep_size a multiple of tp_size that \
             divides fsdp_size * tp_size, so without FSDP ep must be 1 or tp"
        )));
    }
    let model_type = ckpt.model_type()?.to_string();
    let params = transformers_params(ckpt)?;
    let plans = transformers_plans(&model_type)?;
    let pfx = &plans.base_prefix;
    let mut plan = HfTpPlan::new(&[], pfx, &[]);
    if tp > 1 {
        if plans.base_model_tp_plan.is_empty() && plans.model_tp_plan.is_empty() {
            return Err(cfg_err(format!(
                "tp = {tp}, but model_type {model_type} has no tp plan"
            )));
        }
        plan = HfTpPlan::new(&plans.base_model_tp_plan, pfx, &plans.model_tp_plan);
    }
    if ep > 1 {
        if plans.base_model_ep_plan.is_empty() && plans.model_ep_plan.is_empty() {
            return Err(cfg_err(format!(
                "ep = {ep}, but model_type {model_type} has no ep plan"
            )));
        }
        plan = plan.with_expert_plan(&plans.base_model_ep_plan, pfx, &plans.model_ep_plan);
    }
    let mesh = DeviceMesh::new(vec![tp]).map_err(|e| cfg_err(format!("tp = {tp}: {e}")))?;
    let mut out = BTreeMap::new();
    for (name, shape) in &params {
        let placed = plan
            .placement(name, shape.len())
            .map_err(|e| cfg_err(format!("{name}: {e}")))?;
        let style = plan.style_of(name).map(str::to_string);
        if style.as_deref() == Some("grouped_gemm") && shape[0] % ep != 0 {
            return Err(cfg_err(format!(
                "{name}: {} experts do not divide evenly over ep = {ep} (grouped_gemm)",
                shape[0]
            )));
        }
        let ps = [placed.unwrap_or(Placement::Replicate)];
        let local_shapes = (0..tp)
            .map(|r| local_shard(shape, &mesh, &ps, &[r]).map(|l| l.local_shape))
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|e| cfg_err(format!("{name} {shape:?} {}: {e}", ps[0])))?;
        out.insert(
            name.clone(),
            ParamPlan {
                global_shape: shape.clone(),
                placements: placed.map(|p| vec![p]),
                style,
                local_shapes,
            },
        );
    }
    let names: Vec<&str> = params.keys().map(String::as_str).collect();
    Ok(PlanTable {
        world: tp,
        rules_matching_nothing: plan.rules_matching_nothing(&names),
        params: out,
    })
}

impl PlanTable {
    /// The table as JSON: `{"world": N, "params": {name: {"global_shape": [...], "placements":
    /// ["S(0)"] or null, "local_shape": {"0": [...], ...}}}}` (placements in PyTorch's text).
    pub fn to_json(&self) -> Value {
        let params: serde_json::Map<String, Value> = self
            .params
            .iter()
            .map(|(name, p)| {
                let local: serde_json::Map<String, Value> = p
                    .local_shapes
                    .iter()
                    .enumerate()
                    .map(|(r, s)| (r.to_string(), Value::from(s.clone())))
                    .collect();
                let placements = match &p.placements {
                    Some(ps) => Value::from(ps.iter().map(|q| q.to_string()).collect::<Vec<_>>()),
                    None => Value::Null,
                };
                let entry = serde_json::json!({
                    "global_shape": p.global_shape,
                    "placements": placements,
                    "local_shape": local,
                });
                (name.clone(), entry)
            })
            .collect();
        serde_json::json!({"world": self.world, "params": params})
    }

    /// The table as text, one parameter a line: name, global shape, placements (`-` for a plain
    /// tensor) and style, and the local shape per rank (`all [..]` when every rank has the same).
    pub fn to_text(&self) -> String {
        let width = self.params.keys().map(String::len).max().unwrap_or(0);
        let mut out = String::new();
        for (name, p) in &self.params {
            let placed = match (&p.placements, &p.style) {
                (Some(ps), Some(s)) => format!("{} {s}", ps[0]),
                (Some(ps), None) => ps[0].to_string(),
                (None, Some(s)) => format!("- {s}"),
                (None, None) => "-".to_string(),
            };
            let first = &p.local_shapes[0];
            let local = if p.local_shapes.iter().all(|s| s == first) {
                format!("all {first:?}")
            } else {
                let per: Vec<String> = p
                    .local_shapes
                    .iter()
                    .enumerate()
                    .map(|(r, s)| format!("{r}:{s:?}"))
                    .collect();
                per.join(" ")
            };
            let global = format!("{:?}", p.global_shape);
            out.push_str(&format!(
                "{name:width$}  {global:16}  {placed:28}  {local}\n"
            ));
        }
        for rule in &self.rules_matching_nothing {
            out.push_str(&format!("rule matching nothing (not applied): {rule}\n"));
        }
        out
    }
}
