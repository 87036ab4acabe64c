//! The shape a model's config.json gives each MoE tensor, under the three namings a checkpoint of
//! that model may use: the HF disk layout of the family (per-expert `experts.{e}.gate_proj.weight`
//! `[I, H]`, fused `experts.gate_up_proj`, ...), transformers 5.x in memory (what a DCP of a
//! transformers model holds: `mlp.experts.gate_up_proj` `[E, 2I, H]`, `mlp.experts.down_proj`
//! `[E, H, I]`), and this crate's native layout (`gate_and_up_projs` `[E, H, 2I]`, `down_projs`
//! `[E, I, H]`), plus the router (`gate.weight` `[E, H]`, biases `[E]`). A checker holds each
//! tensor of a checkpoint against it ([`ModelShapes::expected`]).
//!
//! Layouts and names: the family table of [`crate::family`] and the segment tables of
//! [`crate::layout::layer_groups`] (one source of truth with the converter). Keys are matched
//! after the last `layers.{L}.`, so any prefix (`model.`, `model.language_model.`, a wrapper's)
//! works. Per-expert keys are matched by pattern, never expanded over E.

use crate::error::{AdapterError, Result};
use crate::family::{spec_for, ExpertStyle, FamilyConfig, FamilySpec};
use crate::layout::{layer_groups, DiskLayout, Group, NativeKind};
use serde_json::Value;

pub use crate::family::MAX_DIM;

/// Which naming a key follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Naming {
    /// The family's checkpoint layout on the Hugging Face hub (what `save_pretrained` writes).
    HfDisk,
    /// transformers 5.x in-memory parameters (fused `[E, 2I, H]` / `[E, H, I]` under `mlp`).
    Transformers,
    /// This crate's native grouped layout.
    Native,
}

impl std::fmt::Display for Naming {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Naming::HfDisk => "HF disk",
            Naming::Transformers => "transformers",
            Naming::Native => "native",
        })
    }
}

/// The shape the model expects for a key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expected {
    /// The shape.
    pub shape: Vec<usize>,
    /// Its dims by name, e.g. `[E, H, I]`.
    pub dims: String,
    /// The naming the key follows.
    pub naming: Naming,
}

/// The expected MoE shapes of one model (see the module docs).
#[derive(Debug, Clone)]
pub struct ModelShapes {
    spec: FamilySpec,
    config: FamilyConfig,
}

fn native_dims(kind: NativeKind) -> &'static [&'static str] {
    match kind {
        NativeKind::GateUp => &["E", "H", "2I"],
        NativeKind::Down => &["E", "I", "H"],
        NativeKind::GateUpBias => &["E", "2I"],
        NativeKind::DownBias => &["E", "H"],
    }
}

/// Dim names of disk tensor `src` of group `g` (native dims moved through its transpose).
fn disk_dims(g: &Group, src: usize, i: usize) -> String {
    let nat = native_dims(g.kind);
    let d = &g.disk[src];
    let cols: usize = g.segs.iter().filter(|s| s.src == src).map(|s| s.len).sum();
    let col = match g.kind {
        NativeKind::GateUp | NativeKind::GateUpBias if cols != 2 * i => "I",
        _ => nat[nat.len() - 1],
    };
    let mut out = vec![""; d.shape.len()];
    for (n, m) in d.dim_map(nat.len()).iter().enumerate() {
        if let Some(m) = *m {
            if let Some(slot) = out.get_mut(m) {
                *slot = if n == nat.len() - 1 { col } else { nat[n] };
            }
        }
    }
    format!("[{}]", out.join(", "))
}

/// `rest` matches `pattern` (with `{e}` standing for an expert index below `e`).
fn matches(pattern: &str, rest: &str, e: usize) -> bool {
    match pattern.split_once("{e}") {
        None => pattern == rest,
        Some((a, b)) => rest
            .strip_prefix(a)
            .and_then(|r| r.strip_suffix(b))
            .is_some_and(|x| {
                !x.is_empty()
                    && x.bytes().all(|c| c.is_ascii_digit())
                    && x.parse::<usize>().is_ok_and(|v| v < e)
            }),
    }
}

/// The layer index and the key after `layers.{L}.` (the last such part of the key).
fn split_layer(key: &str) -> Option<(usize, &str)> {
    let mut best = None;
    let mut from = 0;
    while let Some(pos) = key[from..].find("layers.") {
        let at = from + pos;
        let after = &key[at + 7..];
        if let Some((num, rest)) = after.split_once('.') {
            if !num.is_empty()
                && num.bytes().all(|c| c.is_ascii_digit())
                && (at == 0 || key.as_bytes()[at - 1] == b'.')
            {
                if let Ok(l) = num.parse() {
                    best = Some((l, rest));
                }
            }
        }
        from = at + 7;
    }
    best
}

impl ModelShapes {
    /// From a parsed config.json (`model_type` picks the family; `text_config` for VL configs).
    /// Errors: unknown model_type, a missing or bad field, E / H / I above [`MAX_DIM`].
    pub fn from_config(config: &Value) -> Result<Self> {
        let mt = config
            .get("model_type")
            .or_else(|| config.get("text_config").and_then(|t| t.get("model_type")))
            .and_then(Value::as_str)
            .ok_or_else(|| {
                AdapterError::Config("config.json: missing field 'model_type'".into())
            })?;
        let spec = spec_for(mt)?;
        let config = FamilyConfig::from_json(&spec, config)?;
        Ok(ModelShapes { spec, config })
    }

    /// From `dir/config.json`. Errors also name the file.
    pub fn from_dir(dir: &std::path::Path) -> Result<Self> {
        let p = dir.join("config.json");
        let text = crate::input::read_regular_string(&p)?;
        let v: Value = crate::input::parse_json_strict(&text)
            .map_err(|e| AdapterError::Config(format!("{}: not JSON: {e}", p.display())))?;
        Self::from_config(&v).map_err(|e| AdapterError::Config(format!("{}: {e}", p.display())))
    }

    /// The family's model_type.
    pub fn model_type(&self) -> &str {
        self.spec.model_type
    }

    /// `(E, H, I)`.
    pub fn dims(&self) -> (usize, usize, usize) {
        let c = &self.config;
        (c.num_experts, c.hidden_size, c.moe_intermediate_size)
    }

    /// The shapes `key` may have, when it is an MoE tensor (experts or router) of a MoE layer in
    /// one of the three namings, most likely first: a fused name such as `experts.down_proj` is
    /// `[E, H, I]` in transformers 5.x (and its `save_pretrained`) but `[E, I, H]` in published
    /// Qwen3-VL-MoE checkpoints. Empty for every other key.
    pub fn candidates(&self, key: &str) -> Vec<Expected> {
        let mut out: Vec<Expected> = Vec::new();
        let Some((l, rest)) = split_layer(key) else {
            return out;
        };
        if !self.config.is_moe_layer(l) {
            return out;
        }
        let (e, h, i) = self.dims();
        let names = match self.spec.experts {
            ExpertStyle::PerExpertOrFused { names, .. } => names,
            _ => ["gate_proj.weight", "up_proj.weight", "down_proj.weight"],
        };
        let disk_layouts: &[DiskLayout] = match self.spec.experts {
            ExpertStyle::PerExpertOrFused { .. } => &[
                DiskLayout::PerExpert,
                DiskLayout::FusedTransposed,
                DiskLayout::FusedNative,
            ],
            ExpertStyle::GptOss => &[DiskLayout::GptOss],
            ExpertStyle::Step35 => &[DiskLayout::Step35],
        };
        // transformers' in-memory naming first (what a DCP of a transformers model holds).
        let mut tables: Vec<(DiskLayout, &str, Naming)> = Vec::new();
        if matches!(self.spec.experts, ExpertStyle::PerExpertOrFused { .. }) {
            tables.push((DiskLayout::FusedTransposed, "mlp", Naming::Transformers));
        }
        for &m in self.spec.moe_modules {
            for &lay in disk_layouts {
                tables.push((lay, m, Naming::HfDisk));
            }
        }
        let mut push = |x: Expected| {
            if !out.iter().any(|o| o.shape == x.shape) {
                out.push(x);
            }
        };
        let strip = |k: &str| k.strip_prefix("P.").map(str::to_string).unwrap_or_default();
        for (lay, m, naming) in &tables {
            for g in layer_groups(*lay, l, "P", m, names, (e, h, i)) {
                for (src, d) in g.disk.iter().enumerate() {
                    if matches(&strip(&d.key), rest, e) {
                        push(Expected {
                            shape: d.shape.clone(),
                            dims: disk_dims(&g, src, i),
                            naming: *naming,
                        });
                    }
                }
                if strip(&g.native_key) == rest {
                    push(Expected {
                        shape: g.shape.clone(),
                        dims: format!("[{}]", native_dims(g.kind).join(", ")),
                        naming: Naming::Native,
                    });
                }
            }
        }
        // Routers: disk names of the family and the native `mlp.gate.*`.
        let mut routers: Vec<(String, Vec<usize>, &str)> =
            vec![("mlp.gate.weight".into(), vec![e, h], "[E, H]")];
        for &m in self.spec.moe_modules {
            routers.push((
                format!("{m}.{}.weight", self.spec.router),
                vec![e, h],
                "[E, H]",
            ));
            if self.spec.experts == ExpertStyle::GptOss {
                routers.push((format!("{m}.{}.bias", self.spec.router), vec![e], "[E]"));
            }
        }
        if self.spec.experts == ExpertStyle::GptOss {
            routers.push(("mlp.gate.bias".into(), vec![e], "[E]"));
        }
        if let Some(b) = self.spec.e_bias {
            routers.push((b.to_string(), vec![e], "[E]"));
            routers.push(("mlp.gate.e_score_correction_bias".into(), vec![e], "[E]"));
        }
        if let Some((_, shape, dims)) = routers.into_iter().find(|(k, _, _)| k == rest) {
            push(Expected {
                shape,
                dims: dims.into(),
                naming: Naming::HfDisk,
            });
        }
        out
    }

    /// The most likely of [`ModelShapes::candidates`].
    pub fn expected(&self, key: &str) -> Option<Expected> {
        self.candidates(key).into_iter().next()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn qwen() -> ModelShapes {
        ModelShapes::from_config(&json!({
            "model_type": "qwen3_moe", "num_hidden_layers": 2, "num_experts": 8,
            "hidden_size": 65, "moe_intermediate_size": 24, "decoder_sparse_step": 1
        }))
        .unwrap()
    }

    #[test]
    fn three_namings_of_qwen3_moe() {
        let s = qwen();
        let x = |k: &str| s.expected(k).map(|e| (e.shape, e.dims, e.naming));
        assert_eq!(
            x("model.layers.0.mlp.experts.down_proj"),
            Some((vec![8, 65, 24], "[E, H, I]".into(), Naming::Transformers))
        );
        assert_eq!(
            x("model.layers.1.mlp.experts.gate_up_proj"),
            Some((vec![8, 48, 65], "[E, 2I, H]".into(), Naming::Transformers))
        );
        assert_eq!(
            x("model.layers.1.mlp.experts.7.gate_proj.weight"),
            Some((vec![24, 65], "[I, H]".into(), Naming::HfDisk))
        );
        assert_eq!(
            x("model.layers.1.mlp.experts.3.down_proj.weight"),
            Some((vec![65, 24], "[H, I]".into(), Naming::HfDisk))
        );
        let c = s.candidates("model.layers.0.mlp.experts.down_proj");
        let dims: Vec<&str> = c.iter().map(|x| x.dims.as_str()).collect();
        assert_eq!(dims, ["[E, H, I]", "[E, I, H]"]);
        assert_eq!(
            x("model.layers.1.mlp.experts.gate_and_up_projs"),
            Some((vec![8, 65, 48], "[E, H, 2I]".into(), Naming::Native))
        );
        assert_eq!(
            x("model.layers.0.mlp.experts.down_projs"),
            Some((vec![8, 24, 65], "[E, I, H]".into(), Naming::Native))
        );
        assert_eq!(
            x("model.layers.0.mlp.gate.weight").map(|v| v.0),
            Some(vec![8, 65])
        );
        // any prefix; expert index bound; non-MoE keys and layers
        assert!(s
            .expected("_orig_mod.model.layers.0.mlp.experts.down_proj")
            .is_some());
        assert!(s
            .expected("model.layers.0.mlp.experts.8.gate_proj.weight")
            .is_none());
        assert!(s.expected("model.layers.2.mlp.experts.down_proj").is_none());
        assert!(s
            .expected("model.layers.0.self_attn.q_proj.weight")
            .is_none());
        assert!(s.expected("model.norm.weight").is_none());
    }

    #[test]
    fn other_families_and_absurd_configs() {
        let m = ModelShapes::from_config(&json!({
            "model_type": "mixtral", "num_hidden_layers": 1, "num_local_experts": 4,
            "hidden_size": 6, "intermediate_size": 5
        }))
        .unwrap();
        assert_eq!(
            m.expected("model.layers.0.block_sparse_moe.experts.2.w2.weight")
                .unwrap()
                .shape,
            vec![6, 5]
        );
        assert_eq!(
            m.expected("model.layers.0.mlp.experts.gate_up_proj")
                .unwrap()
                .dims,
            "[E, 2I, H]"
        );
        assert_eq!(
            m.expected("model.layers.0.block_sparse_moe.gate.weight")
                .unwrap()
                .shape,
            vec![4, 6]
        );
        let g = ModelShapes::from_config(&json!({
            "model_type": "gpt_oss", "num_hidden_layers": 1, "num_local_experts": 4,
            "hidden_size": 6, "intermediate_size": 5
        }))
        .unwrap();
        assert_eq!(
            g.expected("model.layers.0.mlp.experts.gate_up_proj")
                .unwrap()
                .dims,
            "[E, H, 2I]"
        );
        assert_eq!(
            g.expected("model.layers.0.mlp.router.bias").unwrap().shape,
            vec![4]
        );
        let e = ModelShapes::from_config(&json!({
            "model_type": "qwen3_moe", "num_hidden_layers": 1, "num_experts": u64::MAX,
            "hidden_size": 6, "moe_intermediate_size": 5
        }))
        .unwrap_err()
        .to_string();
        assert!(e.contains("num_experts") && e.contains("absurd"), "{e}");
        assert!(ModelShapes::from_config(&json!({"hidden_size": 1}))
            .unwrap_err()
            .to_string()
            .contains("model_type"));
    }
}
