//! Hugging Face transformers' tensor-parallel plans as data: which placement a plan gives each
//! parameter of a model, as transformers 5.23 names it in memory.
//!
//! A plan maps module patterns to style strings: the config class's `base_model_tp_plan`
//! (patterns relative to the base model, e.g. `layers.*.self_attn.q_proj`, applied under the
//! `model.` prefix) and the model class's own `_tp_plan` (e.g. `lm_head`). A `*` stands for one
//! path segment (a layer index). Sources: transformers 5.23 `distributed/tensor_parallel.py`
//! (the styles: `colwise`, `rowwise`, `packed_colwise`, `embedding_rowwise`, ...) and
//! `distributed/mixin.py` (how the plans merge), and what `from_pretrained(...,
//! tp_plan="auto")` does with each seed family on CPU (`conformance/fixtures/tp_plans.json`,
//! written by `conformance/fixtures/generate_tp_plans.py`).
//!
//! ```
//! use placement::hf_plan::HfTpPlan;
//! use placement::Placement;
//! let base = [("layers.*.self_attn.o_proj".to_string(), "rowwise".to_string())];
//! let plan = HfTpPlan::new(&base, "model.", &[]);
//! let o = plan.placement("model.layers.3.self_attn.o_proj.weight", 2).unwrap();
//! assert_eq!(o, Some(Placement::Shard(1)));
//! // transformers shards the vocabulary of the input embedding when a base plan exists.
//! let e = plan.placement("model.embed_tokens.weight", 2).unwrap();
//! assert_eq!(e, Some(Placement::Shard(0)));
//! assert_eq!(plan.placement("model.norm.weight", 1).unwrap(), None);
//! ```

use crate::error::{PlacementError, Result};
use crate::parallel::{tp_placement, ParamKind, TpStyle};
use crate::placement::Placement;

/// A model's TP plan, and its EP plan when expert parallelism is on: `(pattern, style)` rules
/// with full in-memory module paths.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HfTpPlan {
    rules: Vec<(Vec<String>, String)>,
    ep_rules: Vec<(Vec<String>, String)>,
}

fn split_rule(p: &str) -> Vec<String> {
    p.split('.').map(str::to_string).collect()
}

impl HfTpPlan {
    /// The plan of a model: `base_model_tp_plan` rules (prefixed with `base_prefix`, `model.`
    /// for the causal-LM classes) and the model class's `_tp_plan` rules (as they are). As
    /// transformers' `distributed/mixin.py` does, a non-empty base plan that does not name
    /// `embed_tokens` gets `embed_tokens: embedding_rowwise` (the vocabulary sharded).
    pub fn new(
        base_model_tp_plan: &[(String, String)],
        base_prefix: &str,
        model_tp_plan: &[(String, String)],
    ) -> Self {
        let mut rules: Vec<(Vec<String>, String)> = Vec::new();
        if !base_model_tp_plan.is_empty()
            && !base_model_tp_plan.iter().any(|(p, _)| p == "embed_tokens")
        {
            rules.push((
                split_rule(&format!("{base_prefix}embed_tokens")),
                "embedding_rowwise".into(),
            ));
        }
        rules.extend(
            base_model_tp_plan
                .iter()
                .map(|(p, s)| (split_rule(&format!("{base_prefix}{p}")), s.clone())),
        );
        rules.extend(
            model_tp_plan
                .iter()
                .map(|(p, s)| (split_rule(p), s.clone())),
        );
        Self {
            rules,
            ep_rules: Vec::new(),
        }
    }

    /// This plan with expert parallelism on the same ranks (transformers' `DistributedConfig(
    /// tp_size=N, ep_size=N)`): the `base_model_ep_plan` rules (prefixed with `base_prefix`) and
    /// the model class's `_ep_plan` rules. As `_resolve_parallel_plans` in transformers 5.23
    /// `distributed/mixin.py` does, EP rules take precedence: every TP rule naming an EP rule's
    /// module, or anything under it, is dropped (compared as text, wildcards included).
    pub fn with_expert_plan(
        mut self,
        base_model_ep_plan: &[(String, String)],
        base_prefix: &str,
        model_ep_plan: &[(String, String)],
    ) -> Self {
        let ep: Vec<(Vec<String>, String)> = base_model_ep_plan
            .iter()
            .map(|(p, s)| (split_rule(&format!("{base_prefix}{p}")), s.clone()))
            .chain(
                model_ep_plan
                    .iter()
                    .map(|(p, s)| (split_rule(p), s.clone())),
            )
            .collect();
        self.rules
            .retain(|(pat, _)| !ep.iter().any(|(e, _)| pat.starts_with(e)));
        self.ep_rules.extend(ep);
        self
    }

    /// The style of the rule that places parameter `name` (e.g.
    /// `model.layers.0.self_attn.q_proj.weight` or `model.layers.0.mlp.experts.gate_up_proj`):
    /// a rule naming the parameter itself wins over one naming its module. `None` when no rule
    /// matches.
    pub fn style_of(&self, name: &str) -> Option<&str> {
        let parts: Vec<&str> = name.split('.').collect();
        let find = |path: &[&str]| {
            self.ep_rules
                .iter()
                .chain(&self.rules)
                .find(|(pat, _)| Self::matches(pat, path))
                .map(|(_, s)| s.as_str())
        };
        find(&parts).or_else(|| find(&parts[..parts.len().saturating_sub(1)]))
    }

    /// The plan's rules (full patterns, e.g. `model.layers.*.mlp.down_proj`) that match no
    /// parameter of `names` nor any module holding one: what transformers reports as "rules
    /// ... match nothing ... and will not be applied". Sorted.
    pub fn rules_matching_nothing(&self, names: &[&str]) -> Vec<String> {
        let paths: Vec<Vec<&str>> = names.iter().map(|n| n.split('.').collect()).collect();
        let mut out: Vec<String> = self
            .rules
            .iter()
            .chain(&self.ep_rules)
            .filter(|(pat, _)| {
                !paths
                    .iter()
                    .any(|path| (1..=path.len()).any(|k| Self::matches(pat, &path[..k])))
            })
            .map(|(pat, _)| pat.join("."))
            .collect();
        out.sort();
        out.dedup();
        out
    }

    fn matches(pat: &[String], path: &[&str]) -> bool {
        pat.len() == path.len()
            && pat
                .iter()
                .zip(path)
                .all(|(p, s)| p == "*" && s.parse::<usize>().is_ok() || p == s)
    }

    /// The placement on a 1-D TP mesh of parameter `name` of rank `ndim`: `None` when the
    /// parameter stays a plain tensor (no rule, or a replicated style). Styles: `colwise` and
    /// `colwise_gather_output` (weight `S(-2)`, bias `S(-1)`), `rowwise` (weight `S(-1)`, bias
    /// `R`), `packed_colwise` (`_S(-2, 2)`, the fused `[gate; up]` dim), `embedding_rowwise`
    /// (`S(0)`, the vocabulary) and `embedding_colwise` (`S(1)`), the replicated
    /// `replicated_with_grad_allreduce`; the EP style `grouped_gemm` (`S(0)`, the experts:
    /// transformers' `MoEParamShard(Shard(0))` in `distributed/expert_parallel.py`); and the
    /// module styles that install a forward and leave the module's parameters plain tensors,
    /// `moe_tp_experts` and `ep_dispatch_experts`.
    ///
    /// Errors: [`PlacementError::Parallelism`] for a style this crate does not know (named), and
    /// a rank too small for the style.
    pub fn placement(&self, name: &str, ndim: usize) -> Result<Option<Placement>> {
        let Some(style) = self.style_of(name) else {
            return Ok(None);
        };
        let kind = if name.ends_with(".bias") || name.ends_with("_bias") {
            ParamKind::Bias
        } else {
            ParamKind::Weight
        };
        let tp = match style {
            "colwise" | "colwise_gather_output" => TpStyle::Colwise,
            "rowwise" => TpStyle::Rowwise,
            "packed_colwise" => TpStyle::PackedColwise,
            "embedding_rowwise" => return Ok(Some(Placement::Shard(0))),
            "embedding_colwise" => return Ok(Some(Placement::Shard(1))),
            "grouped_gemm" => TpStyle::GroupedGemm,
            "replicated_with_grad_allreduce" | "moe_tp_experts" | "ep_dispatch_experts" => {
                return Ok(None)
            }
            other => {
                return Err(PlacementError::Parallelism(format!(
                    "tp plan style `{other}` (rule for {name}) is not known to this crate"
                )))
            }
        };
        tp_placement(tp, kind, ndim).map(Some)
    }
}
