//! The MoE block of each model family as `moe-kernels` computes it: the router and activation
//! settings read from config.json (rules: transformers 5.23 `modeling_<family>.py` routers and
//! experts, named per family below), and the parameters taken from the adapter's native layout.

use adapters::{HostTensor, NativeMoeKeys};
use moe_kernels::{
    Activation, MoeConfig, MoeGrads, MoeParams, Real, RouterKind, SharedExpertParams,
};
use ndarray::{ArrayD, IxDyn};
use std::collections::BTreeMap;

/// A config value from the top level or, for VL / multimodal configs, from `text_config`.
fn field<'a>(cfg: &'a serde_json::Value, key: &str) -> Option<&'a serde_json::Value> {
    cfg.get(key)
        .or_else(|| cfg.get("text_config").and_then(|t| t.get(key)))
}

fn usize_field(cfg: &serde_json::Value, key: &str) -> Result<usize, String> {
    field(cfg, key)
        .and_then(|v| v.as_u64())
        .map(|v| v as usize)
        .ok_or_else(|| format!("config.json: missing or non-integer '{key}'"))
}

/// A number field (`default` when absent or null); present but not a finite number is an error.
fn f64_field(cfg: &serde_json::Value, key: &str, default: f64) -> Result<f64, String> {
    match field(cfg, key) {
        None | Some(serde_json::Value::Null) => Ok(default),
        Some(v) => v
            .as_f64()
            .filter(|x| x.is_finite())
            .ok_or_else(|| format!("config.json: '{key}' is {v}, not a finite number")),
    }
}

/// A boolean field (`default` when absent or null); present but not a boolean is an error.
fn bool_field(cfg: &serde_json::Value, key: &str, default: bool) -> Result<bool, String> {
    match field(cfg, key) {
        None | Some(serde_json::Value::Null) => Ok(default),
        Some(v) => v
            .as_bool()
            .ok_or_else(|| format!("config.json: '{key}' is {v}, not a boolean")),
    }
}

/// Entry `layer` of a per-layer clamp list (`swiglu_limits`): `None` when the list is absent or
/// the entry is null / 0 (no clamp, as transformers reads it).
fn layer_limit(cfg: &serde_json::Value, key: &str, layer: usize) -> Result<Option<f64>, String> {
    let list = match field(cfg, key) {
        None | Some(serde_json::Value::Null) => return Ok(None),
        Some(serde_json::Value::Array(a)) => a,
        Some(v) => return Err(format!("config.json: '{key}' is {v}, not a per-layer list")),
    };
    let v = list.get(layer).ok_or_else(|| {
        format!(
            "config.json: '{key}' has {} entries, no entry for layer {layer}",
            list.len()
        )
    })?;
    match v {
        serde_json::Value::Null => Ok(None),
        _ => match v.as_f64() {
            Some(0.0) => Ok(None),
            Some(x) if x.is_finite() && x > 0.0 => Ok(Some(x)),
            _ => Err(format!(
                "config.json: '{key}'[{layer}] is {v}, not a positive number, 0 or null"
            )),
        },
    }
}

/// Model types the golden check knows.
pub const GOLDEN_MODEL_TYPES: &[&str] = &[
    "qwen3_moe",
    "qwen3_next",
    "qwen3_5_moe",
    "qwen3_vl_moe",
    "mixtral",
    "deepseek_v3",
    "glm4_moe",
    "gpt_oss",
    "step3p5",
];

/// Router and activation of `model_type`'s MoE block of layer `layer` from its config.json (the
/// layer matters for Step3.5, whose clamp is per layer). Errors: a missing or ill-typed field,
/// a setting the block does not implement, an unknown model type (one line naming the field).
pub fn moe_config(
    model_type: &str,
    cfg: &serde_json::Value,
    layer: usize,
) -> Result<MoeConfig, String> {
    let base = model_type.trim_end_matches("_text");
    let top_k_field = if base == "step3p5" && field(cfg, "num_experts_per_tok").is_none() {
        "moe_top_k"
    } else {
        "num_experts_per_tok"
    };
    let top_k = usize_field(cfg, top_k_field)?;
    if top_k == 0 {
        return Err(format!(
            "config.json: '{top_k_field}' is 0 (top-k routing needs at least 1 expert per token)"
        ));
    }
    // E as the adapter reads it (a config the adapter refuses is reported by the adapter).
    let e = adapters::family::spec_for(model_type)
        .and_then(|spec| adapters::family::FamilyConfig::from_json(&spec, cfg))
        .map(|c| c.num_experts);
    if let Ok(e) = e {
        if top_k > e {
            return Err(format!(
                "config.json: '{top_k_field}' is {top_k} but the model has {e} experts"
            ));
        }
    }
    let (router, activation) = match base {
        // Qwen3MoeTopKRouter / Qwen3NextTopKRouter: renormalise only when norm_topk_prob.
        "qwen3_moe" => (
            RouterKind::SoftmaxTopK {
                norm_topk_prob: bool_field(cfg, "norm_topk_prob", false)?,
            },
            Activation::SwiGlu,
        ),
        "qwen3_next" => (
            RouterKind::SoftmaxTopK {
                norm_topk_prob: bool_field(cfg, "norm_topk_prob", true)?,
            },
            Activation::SwiGlu,
        ),
        // Qwen3_5MoeTopKRouter, Qwen3VLMoeTextTopKRouter, MixtralTopKRouter: always renormalised.
        "qwen3_5_moe" | "qwen3_vl_moe" | "mixtral" => (
            RouterKind::SoftmaxTopK {
                norm_topk_prob: true,
            },
            Activation::SwiGlu,
        ),
        "deepseek_v3" | "glm4_moe" => (
            RouterKind::SigmoidGroupLimited {
                n_group: usize_field(cfg, "n_group")?,
                topk_group: usize_field(cfg, "topk_group")?,
                norm_topk_prob: bool_field(cfg, "norm_topk_prob", true)?,
                routed_scaling_factor: f64_field(cfg, "routed_scaling_factor", 1.0)?,
            },
            Activation::SwiGlu,
        ),
        "gpt_oss" => (
            RouterKind::TopKSoftmax,
            Activation::GptOssGlu {
                limit: f64_field(cfg, "swiglu_limit", 7.0)?,
                alpha: f64_field(cfg, "swiglu_alpha", 1.702)?,
            },
        ),
        // Step3.5 (transformers 5.23 `models/step3p7`: model_type `step3p5` is its text config;
        // `Step3p7TopKRouter`, `Step3p7SparseMoeBlock`, `Step3p7Experts._apply_gate`): sigmoid
        // scores, top-k on score + router bias, always renormalised, routed output times
        // `moe_router_scaling_factor`; experts clamp per layer (`swiglu_limits[layer]`).
        "step3p5" => {
            if field(cfg, "moe_router_activation")
                .and_then(|v| v.as_str())
                .is_some_and(|a| a != "sigmoid")
            {
                return Err(format!(
                    "config.json: moe_router_activation {} is not implemented (sigmoid only)",
                    field(cfg, "moe_router_activation")
                        .cloned()
                        .unwrap_or_default()
                ));
            }
            if !bool_field(cfg, "norm_expert_weight", true)? {
                return Err("config.json: norm_expert_weight = false is not implemented (transformers' Step3p7TopKRouter always renormalises)".into());
            }
            if layer_limit(cfg, "swiglu_limits_shared", layer)?.is_some() {
                return Err(format!("config.json: swiglu_limits_shared[{layer}] clamps the shared expert, which is not implemented"));
            }
            (
                RouterKind::SigmoidTopK {
                    routed_scaling_factor: f64_field(cfg, "moe_router_scaling_factor", 1.0)?,
                },
                match layer_limit(cfg, "swiglu_limits", layer)? {
                    Some(limit) => Activation::ClampedSwiGlu { limit },
                    None => Activation::SwiGlu,
                },
            )
        }
        other => {
            return Err(format!(
                "golden block for model_type '{other}' is not implemented; supported: {}",
                GOLDEN_MODEL_TYPES.join(", ")
            ))
        }
    };
    Ok(MoeConfig {
        router,
        top_k,
        activation,
    })
}

/// The values of every native tensor the block uses, decoded once (f32 by default; [`BlockWeights::cast`]
/// gives the exact f64 upcast for the float64 reference and the error bound).
#[derive(Debug, Clone)]
pub struct BlockWeights<F = f32> {
    arrays: BTreeMap<String, ArrayD<F>>,
}

impl<F: Real> BlockWeights<F> {
    /// The same values in `G` (exact for f32 -> f64).
    pub fn cast<G: Real>(&self) -> BlockWeights<G> {
        BlockWeights {
            arrays: self
                .arrays
                .iter()
                .map(|(k, a)| (k.clone(), a.mapv(|v| G::from_f64(v.to_f64_lossless()))))
                .collect(),
        }
    }
}

impl BlockWeights<f32> {
    /// Decodes the tensors `keys` names from `native` (bf16/f16/f32 -> f32, for computing only).
    pub fn load(
        native: &BTreeMap<String, HostTensor>,
        keys: &NativeMoeKeys,
    ) -> Result<Self, String> {
        let mut names: Vec<&String> =
            vec![&keys.gate_weight, &keys.gate_and_up_projs, &keys.down_projs];
        names.extend(keys.gate_bias.iter());
        names.extend(keys.e_score_correction_bias.iter());
        names.extend(keys.gate_up_proj_bias.iter());
        names.extend(keys.down_proj_bias.iter());
        if let Some(s) = &keys.shared {
            names.extend(s.iter());
        }
        names.extend(keys.shared_gate.iter());
        let mut arrays = BTreeMap::new();
        for name in names {
            let t = native
                .get(name)
                .ok_or_else(|| format!("native key '{name}' missing"))?;
            let values = t.to_f32_vec().map_err(|e| e.to_string())?;
            let a = ArrayD::from_shape_vec(IxDyn(&t.shape), values)
                .map_err(|e| format!("{name}: {e}"))?;
            arrays.insert(name.clone(), a);
        }
        Ok(BlockWeights { arrays })
    }
}

impl<F: Real> BlockWeights<F> {
    /// The decoded tensor of native key `key`, for changing it in place (fault injection).
    pub fn array_mut(&mut self, key: &str) -> Option<&mut ArrayD<F>> {
        self.arrays.get_mut(key)
    }

    fn get<D: ndarray::Dimension>(
        &self,
        key: &str,
    ) -> Result<ndarray::ArrayView<'_, F, D>, String> {
        let a = self
            .arrays
            .get(key)
            .ok_or_else(|| format!("native key '{key}' missing"))?;
        a.view()
            .into_dimensionality::<D>()
            .map_err(|_| format!("native key '{key}' has shape {:?}", a.shape()))
    }

    fn opt<D: ndarray::Dimension>(
        &self,
        key: &Option<String>,
    ) -> Result<Option<ndarray::ArrayView<'_, F, D>>, String> {
        key.as_deref().map(|k| self.get::<D>(k)).transpose()
    }

    /// The block's parameters as moe-kernels takes them.
    pub fn params(&self, keys: &NativeMoeKeys) -> Result<MoeParams<'_, F>, String> {
        let shared = match &keys.shared {
            None => None,
            Some([g, u, d]) => Some(SharedExpertParams {
                gate_proj: self.get(g)?,
                up_proj: self.get(u)?,
                down_proj: self.get(d)?,
                gate: self.opt(&keys.shared_gate)?,
            }),
        };
        Ok(MoeParams {
            gate_weight: self.get(&keys.gate_weight)?,
            gate_bias: self.opt(&keys.gate_bias)?,
            e_score_correction_bias: self.opt(&keys.e_score_correction_bias)?,
            gate_and_up_projs: self.get(&keys.gate_and_up_projs)?,
            down_projs: self.get(&keys.down_projs)?,
            gate_up_bias: self.opt(&keys.gate_up_proj_bias)?,
            down_bias: self.opt(&keys.down_proj_bias)?,
            shared,
        })
    }
}

/// An f32 or f64 array as a host tensor of that dtype (bytes as they are).
fn f32_tensor<F: Real, D: ndarray::Dimension>(
    a: &ndarray::Array<F, D>,
) -> Result<HostTensor, String> {
    let (dtype, data): (adapters::Dtype, Vec<u8>) = if std::mem::size_of::<F>() == 4 {
        let d = a
            .iter()
            .flat_map(|v| (v.to_f64_lossless() as f32).to_le_bytes())
            .collect();
        (adapters::Dtype::F32, d)
    } else {
        let d = a
            .iter()
            .flat_map(|v| v.to_f64_lossless().to_le_bytes())
            .collect();
        (adapters::Dtype::F64, d)
    };
    HostTensor::new(dtype, a.shape().to_vec(), data).map_err(|e| e.to_string())
}

/// The parameter gradients as a native-key map (F32 for f32 gradients, F64 for f64 ones: the
/// values as they are), ready for the adapter's `to_hf`.
pub fn grads_by_native_key<F: Real>(
    g: &MoeGrads<F>,
    keys: &NativeMoeKeys,
) -> Result<BTreeMap<String, HostTensor>, String> {
    let mut out = BTreeMap::new();
    let mut put = |key: &Option<String>, t: Option<HostTensor>| {
        if let (Some(k), Some(t)) = (key, t) {
            out.insert(k.clone(), t);
        }
    };
    put(
        &Some(keys.gate_weight.clone()),
        Some(f32_tensor::<F, ndarray::Ix2>(&g.gate_weight)?),
    );
    put(
        &keys.gate_bias,
        g.gate_bias
            .as_ref()
            .map(f32_tensor::<F, ndarray::Ix1>)
            .transpose()?,
    );
    put(
        &Some(keys.gate_and_up_projs.clone()),
        Some(f32_tensor::<F, ndarray::Ix3>(&g.gate_and_up_projs)?),
    );
    put(
        &Some(keys.down_projs.clone()),
        Some(f32_tensor::<F, ndarray::Ix3>(&g.down_projs)?),
    );
    put(
        &keys.gate_up_proj_bias,
        g.gate_up_bias
            .as_ref()
            .map(f32_tensor::<F, ndarray::Ix2>)
            .transpose()?,
    );
    put(
        &keys.down_proj_bias,
        g.down_bias
            .as_ref()
            .map(f32_tensor::<F, ndarray::Ix2>)
            .transpose()?,
    );
    if let (Some([gk, uk, dk]), Some(s)) = (&keys.shared, &g.shared) {
        put(
            &Some(gk.clone()),
            Some(f32_tensor::<F, ndarray::Ix2>(&s.gate_proj)?),
        );
        put(
            &Some(uk.clone()),
            Some(f32_tensor::<F, ndarray::Ix2>(&s.up_proj)?),
        );
        put(
            &Some(dk.clone()),
            Some(f32_tensor::<F, ndarray::Ix2>(&s.down_proj)?),
        );
        put(
            &keys.shared_gate,
            s.gate
                .as_ref()
                .map(f32_tensor::<F, ndarray::Ix2>)
                .transpose()?,
        );
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn step3p5_reads_the_per_layer_clamp_and_refuses_what_it_does_not_implement() {
        let base = json!({"moe_top_k": 2, "moe_router_scaling_factor": 1.5,
            "swiglu_limits": [0.0, 0.6, null], "swiglu_limits_shared": [0.0, 0.0, 0.0]});
        let c = moe_config("step3p5", &base, 1).unwrap();
        assert_eq!(c.top_k, 2);
        assert_eq!(c.activation, Activation::ClampedSwiGlu { limit: 0.6 });
        assert_eq!(
            c.router,
            RouterKind::SigmoidTopK {
                routed_scaling_factor: 1.5
            }
        );
        // 0 and null entries mean "no clamp", as transformers reads them.
        for layer in [0, 2] {
            let c = moe_config("step3p5", &base, layer).unwrap();
            assert_eq!(c.activation, Activation::SwiGlu);
        }
        let err =
            |cfg: serde_json::Value, layer: usize| moe_config("step3p5", &cfg, layer).unwrap_err();
        assert_eq!(
            err(base.clone(), 3),
            "config.json: 'swiglu_limits_shared' has 3 entries, no entry for layer 3"
        );
        let mut c = base.clone();
        c["swiglu_limits_shared"] = json!([0.0, 16.0, 0.0]);
        assert!(err(c, 1).contains("swiglu_limits_shared[1] clamps the shared expert"));
        let mut c = base.clone();
        c["norm_expert_weight"] = json!(false);
        assert!(err(c, 1).contains("norm_expert_weight = false is not implemented"));
        let mut c = base.clone();
        c["swiglu_limits"] = json!([0.0, -1.0]);
        assert!(err(c, 1).contains("'swiglu_limits'[1] is -1.0, not a positive number"));
        let mut c = base;
        c["moe_router_scaling_factor"] = json!("2.5");
        assert_eq!(
            err(c, 1),
            "config.json: 'moe_router_scaling_factor' is \"2.5\", not a finite number"
        );
    }

    #[test]
    fn top_k_is_between_1_and_e_naming_the_field() {
        let c = json!({"num_experts_per_tok": 0});
        assert_eq!(
            moe_config("qwen3_moe", &c, 1).unwrap_err(),
            "config.json: 'num_experts_per_tok' is 0 (top-k routing needs at least 1 expert per token)"
        );
        let c = json!({"num_experts_per_tok": 9, "num_local_experts": 8, "num_hidden_layers": 2,
            "hidden_size": 4, "moe_intermediate_size": 2});
        assert_eq!(
            moe_config("qwen3_moe", &c, 1).unwrap_err(),
            "config.json: 'num_experts_per_tok' is 9 but the model has 8 experts"
        );
        let c = json!({"moe_top_k": 0});
        assert!(moe_config("step3p5", &c, 1)
            .unwrap_err()
            .starts_with("config.json: 'moe_top_k' is 0"));
    }

    #[test]
    fn ill_typed_fields_are_errors_not_defaults() {
        let c = json!({"num_experts_per_tok": 2, "norm_topk_prob": "yes"});
        assert_eq!(
            moe_config("qwen3_moe", &c, 1).unwrap_err(),
            "config.json: 'norm_topk_prob' is \"yes\", not a boolean"
        );
        let c = json!({"num_experts_per_tok": 2, "swiglu_limit": null, "swiglu_alpha": 1.5});
        assert_eq!(
            moe_config("gpt_oss", &c, 0).unwrap().activation,
            Activation::GptOssGlu {
                limit: 7.0,
                alpha: 1.5
            }
        );
    }
}
