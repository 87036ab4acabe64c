//! Qwen3-MoE (`model_type = "qwen3_moe"`) adapter: HF disk layout <-> native grouped layout.
//!
//! Rules (models.md; transformers `models/qwen3_moe/modeling_qwen3_moe.py`):
//! - layer L is MoE iff L not in `mlp_only_layers`, `num_experts > 0` and
//!   `(L + 1) % decoder_sparse_step == 0`;
//! - HF per-expert disk keys: `model.layers.L.mlp.experts.e.{gate,up}_proj.weight` `[I, H]`,
//!   `model.layers.L.mlp.experts.e.down_proj.weight` `[H, I]`;
//! - HF fused disk keys (transformers v5 may write them): `model.layers.L.mlp.experts.gate_up_proj`
//!   `[E, 2I, H]` (gate rows first), `model.layers.L.mlp.experts.down_proj` `[E, H, I]`;
//! - native: `model.layers.L.mlp.experts.gate_and_up_projs` `[E, H, 2I]` =
//!   `stack_e(cat([gate_e.T, up_e.T], -1))` = `gate_up_proj.transpose(1, 2)`, and
//!   `model.layers.L.mlp.experts.down_projs` `[E, I, H]` = `stack_e(down_e.T)` =
//!   `down_proj.transpose(1, 2)`; `mlp.gate.weight` `[E, H]` and every other key pass through.
//!
//! The layout is detected from the keys when the adapter is built from a checkpoint, and
//! [`MoeAdapter::to_hf`] writes back that same layout.
//!
//! Local shards (this version): any `S(d)` / `_S(d, sf)` on the expert dim (EP) and the H / I dims
//! (FSDP `S(1)`, `S(2)` on down_projs), nested on any mesh; `R` anywhere. Sharding the packed 2I dim
//! of gate_and_up_projs is an "unsupported in this version" error (packed TP comes later);
//! loading into `P(op)` is an error, while [`MoeAdapter::to_hf_local`] carries `P(op)` through.
//! In [`MoeAdapter::to_hf_local`] with the per-expert layout, the expert dim is consumed by the key:
//! a mesh dim sharding it becomes `Replicate` on each per-expert HF tensor (the tensor is whole
//! along it; only the ranks holding expert e own that key). With the fused layout the expert dim
//! stays dim 0 and keeps its placement.

use crate::adapter::MoeAdapter;
use crate::checkpoint::HfCheckpoint;
use crate::error::{AdapterError, Result};
use crate::local::{map_placements, shard_indices, LocalTensor, NativeTensorInfo};
use crate::tensor::HostTensor;
use placement::{DeviceMesh, IndexSet, Placement};
use safetensors::Dtype;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};

/// How many missing / unexpected keys an error message lists before "...".
const LIST_MAX: usize = 3;

/// The Qwen3-MoE config.json fields the adapter needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Qwen3MoeConfig {
    /// `num_hidden_layers`.
    pub num_hidden_layers: usize,
    /// `num_experts` or `num_local_experts` (E).
    pub num_experts: usize,
    /// `moe_intermediate_size` (I).
    pub moe_intermediate_size: usize,
    /// `hidden_size` (H).
    pub hidden_size: usize,
    /// `decoder_sparse_step` (default 1).
    pub decoder_sparse_step: usize,
    /// `mlp_only_layers` (default empty).
    pub mlp_only_layers: Vec<usize>,
}

fn cfg_usize(cfg: &Value, field: &str) -> Result<usize> {
    let v = cfg.get(field).ok_or_else(|| {
        AdapterError::Config(format!("config.json: missing field '{field}' (qwen3_moe)"))
    })?;
    v.as_u64().map(|x| x as usize).ok_or_else(|| {
        AdapterError::Config(format!(
            "config.json: field '{field}' is {v}, not a non-negative integer"
        ))
    })
}

/// E from `num_experts` (transformers v4 name) or `num_local_experts` (what transformers v5's
/// `Qwen3MoeConfig` serialises; its attribute_map aliases the two). Both present and different is
/// an error.
fn num_experts(cfg: &Value) -> Result<usize> {
    match (cfg.get("num_experts"), cfg.get("num_local_experts")) {
        (Some(_), None) => cfg_usize(cfg, "num_experts"),
        (None, Some(_)) => cfg_usize(cfg, "num_local_experts"),
        (Some(_), Some(_)) => {
            let (a, b) = (
                cfg_usize(cfg, "num_experts")?,
                cfg_usize(cfg, "num_local_experts")?,
            );
            if a != b {
                return Err(AdapterError::Config(format!(
                    "config.json: num_experts {a} disagrees with num_local_experts {b}"
                )));
            }
            Ok(a)
        }
        (None, None) => Err(AdapterError::Config(
            "config.json: missing field 'num_experts' (or 'num_local_experts') (qwen3_moe)"
                .to_string(),
        )),
    }
}

impl Qwen3MoeConfig {
    /// Reads the fields from a parsed config.json. Errors name the field.
    pub fn from_json(cfg: &Value) -> Result<Self> {
        let c = Qwen3MoeConfig {
            num_hidden_layers: cfg_usize(cfg, "num_hidden_layers")?,
            num_experts: num_experts(cfg)?,
            moe_intermediate_size: cfg_usize(cfg, "moe_intermediate_size")?,
            hidden_size: cfg_usize(cfg, "hidden_size")?,
            decoder_sparse_step: match cfg.get("decoder_sparse_step") {
                None | Some(Value::Null) => 1,
                Some(_) => cfg_usize(cfg, "decoder_sparse_step")?,
            },
            mlp_only_layers: match cfg.get("mlp_only_layers") {
                None | Some(Value::Null) => Vec::new(),
                Some(v) => serde_json::from_value(v.clone()).map_err(|_| {
                    AdapterError::Config(format!(
                        "config.json: field 'mlp_only_layers' is {v}, not a list of layer indices"
                    ))
                })?,
            },
        };
        if c.num_experts > 0 && c.decoder_sparse_step == 0 {
            return Err(AdapterError::Config(
                "config.json: decoder_sparse_step is 0 (must be >= 1 when num_experts > 0)"
                    .to_string(),
            ));
        }
        Ok(c)
    }

    /// Whether layer `l` has a routed-expert block (rule in the module docs).
    pub fn is_moe_layer(&self, l: usize) -> bool {
        l < self.num_hidden_layers
            && !self.mlp_only_layers.contains(&l)
            && self.num_experts > 0
            && (l + 1) % self.decoder_sparse_step == 0
    }
}

/// On-disk expert layout of a Qwen3-MoE checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExpertLayout {
    /// `experts.e.{gate,up,down}_proj.weight`, one tensor per expert and projection.
    PerExpert,
    /// `experts.gate_up_proj` `[E, 2I, H]` and `experts.down_proj` `[E, H, I]`.
    Fused,
}

/// Projection of a per-expert key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Proj {
    Gate,
    Up,
    Down,
}

/// What a key under `model.layers.L.mlp.experts.` is.
#[derive(Debug, Clone, PartialEq, Eq)]
enum ExpertKey {
    PerExpert(usize, Proj),
    FusedGateUp,
    FusedDown,
    NativeGateUp,
    NativeDown,
    Other,
}

/// Splits `model.layers.L.mlp.experts.REST` into `(L, kind)`; `None` for keys outside experts.
fn parse_expert_key(key: &str) -> Option<(usize, ExpertKey)> {
    let rest = key.strip_prefix("model.layers.")?;
    let (l, rest) = rest.split_once('.')?;
    let l: usize = l.parse().ok()?;
    let rest = rest.strip_prefix("mlp.experts.")?;
    let kind = match rest {
        "gate_up_proj" => ExpertKey::FusedGateUp,
        "down_proj" => ExpertKey::FusedDown,
        "gate_and_up_projs" => ExpertKey::NativeGateUp,
        "down_projs" => ExpertKey::NativeDown,
        _ => {
            let parsed = rest.split_once('.').and_then(|(e, p)| {
                let e: usize = e.parse().ok()?;
                let proj = match p {
                    "gate_proj.weight" => Proj::Gate,
                    "up_proj.weight" => Proj::Up,
                    "down_proj.weight" => Proj::Down,
                    _ => return None,
                };
                Some(ExpertKey::PerExpert(e, proj))
            });
            parsed.unwrap_or(ExpertKey::Other)
        }
    };
    Some((l, kind))
}

fn list_keys(keys: &[String]) -> String {
    let mut s = keys
        .iter()
        .take(LIST_MAX)
        .cloned()
        .collect::<Vec<_>>()
        .join(", ");
    if keys.len() > LIST_MAX {
        s.push_str(", ...");
    }
    s
}

/// Native key of layer `l`'s `[E, H, 2I]` gate+up tensor.
pub fn native_gate_up_key(l: usize) -> String {
    format!("model.layers.{l}.mlp.experts.gate_and_up_projs")
}
/// Native key of layer `l`'s `[E, I, H]` down tensor.
pub fn native_down_key(l: usize) -> String {
    format!("model.layers.{l}.mlp.experts.down_projs")
}
/// HF per-expert key, `proj` one of `gate_proj`, `up_proj`, `down_proj`.
pub fn hf_expert_key(l: usize, e: usize, proj: &str) -> String {
    format!("model.layers.{l}.mlp.experts.{e}.{proj}.weight")
}
/// HF fused `[E, 2I, H]` key.
pub fn hf_fused_gate_up_key(l: usize) -> String {
    format!("model.layers.{l}.mlp.experts.gate_up_proj")
}
/// HF fused `[E, H, I]` key.
pub fn hf_fused_down_key(l: usize) -> String {
    format!("model.layers.{l}.mlp.experts.down_proj")
}

fn proj_name(p: Proj) -> &'static str {
    match p {
        Proj::Gate => "gate_proj",
        Proj::Up => "up_proj",
        Proj::Down => "down_proj",
    }
}

fn range_vec(a: usize, b: usize) -> Vec<usize> {
    (a..b).collect()
}

/// Which native tensor of a layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum NativeKind {
    GateUp,
    Down,
}

/// Qwen3-MoE adapter (see the module docs). Build it with [`Qwen3MoeAdapter::from_checkpoint`]
/// (detects the layout) or [`Qwen3MoeAdapter::new`].
#[derive(Debug, Clone)]
pub struct Qwen3MoeAdapter {
    config: Qwen3MoeConfig,
    layout: ExpertLayout,
}

impl Qwen3MoeAdapter {
    /// An adapter for `config` that reads and writes `layout`.
    pub fn new(config: Qwen3MoeConfig, layout: ExpertLayout) -> Self {
        Qwen3MoeAdapter { config, layout }
    }

    /// Reads config.json and detects the expert layout from the keys (per-expert when the
    /// checkpoint has no expert keys). Errors: bad config, a checkpoint mixing both layouts.
    pub fn from_checkpoint(ckpt: &HfCheckpoint) -> Result<Self> {
        let config = Qwen3MoeConfig::from_json(ckpt.config())?;
        let layout = detect_layout(ckpt.keys())?;
        Ok(Qwen3MoeAdapter { config, layout })
    }

    /// The parsed config.
    pub fn config(&self) -> &Qwen3MoeConfig {
        &self.config
    }

    /// The expert layout read (and written back).
    pub fn layout(&self) -> ExpertLayout {
        self.layout
    }

    fn e(&self) -> usize {
        self.config.num_experts
    }
    fn h(&self) -> usize {
        self.config.hidden_size
    }
    fn i(&self) -> usize {
        self.config.moe_intermediate_size
    }

    /// Global native shape of `kind`: `[E, H, 2I]` or `[E, I, H]`.
    fn native_shape(&self, kind: NativeKind) -> Vec<usize> {
        match kind {
            NativeKind::GateUp => vec![self.e(), self.h(), 2 * self.i()],
            NativeKind::Down => vec![self.e(), self.i(), self.h()],
        }
    }

    /// HF disk keys of layer `l` with their expected shapes, in the adapter's layout.
    fn hf_layer_keys(&self, l: usize) -> Vec<(String, Vec<usize>)> {
        let (e, h, i) = (self.e(), self.h(), self.i());
        match self.layout {
            ExpertLayout::PerExpert => (0..e)
                .flat_map(|x| {
                    [
                        (hf_expert_key(l, x, "gate_proj"), vec![i, h]),
                        (hf_expert_key(l, x, "up_proj"), vec![i, h]),
                        (hf_expert_key(l, x, "down_proj"), vec![h, i]),
                    ]
                })
                .collect(),
            ExpertLayout::Fused => vec![
                (hf_fused_gate_up_key(l), vec![e, 2 * i, h]),
                (hf_fused_down_key(l), vec![e, h, i]),
            ],
        }
    }

    /// Checks that every MoE layer has exactly its expected HF expert keys, with the expected
    /// shapes and one dtype per layer. Returns each MoE layer's dtype.
    fn validate_hf(&self, ckpt: &HfCheckpoint) -> Result<BTreeMap<usize, Dtype>> {
        let mut unexpected = Vec::new();
        for k in ckpt.keys() {
            if let Some((l, kind)) = parse_expert_key(k) {
                if !self.expected_hf_kind(l, &kind) {
                    unexpected.push(k.to_string());
                }
            }
        }
        if !unexpected.is_empty() {
            return Err(AdapterError::UnexpectedKeys(format!(
                "{}: unexpected expert keys for qwen3_moe ({:?} layout, {} experts, MoE layers {:?}): {} ({} unexpected)",
                ckpt.dir().display(),
                self.layout,
                self.e(),
                self.moe_layers(),
                list_keys(&unexpected),
                unexpected.len()
            )));
        }
        let mut dtypes = BTreeMap::new();
        for l in self.moe_layers() {
            let keys = self.hf_layer_keys(l);
            let missing: Vec<String> = keys
                .iter()
                .filter(|(k, _)| !ckpt.contains(k))
                .map(|(k, _)| k.clone())
                .collect();
            if !missing.is_empty() {
                return Err(AdapterError::MissingExperts(format!(
                    "layer {l}: missing expert keys: {} ({} missing)",
                    list_keys(&missing),
                    missing.len()
                )));
            }
            let mut dtype: Option<(Dtype, &str)> = None;
            for (k, want) in &keys {
                let info = ckpt.info(k)?;
                if &info.shape != want {
                    return Err(AdapterError::Shape(format!(
                        "{}: tensor '{k}' has shape {:?} but config (E={}, H={}, I={}) gives {want:?}",
                        info.file.file_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default(),
                        info.shape,
                        self.e(),
                        self.h(),
                        self.i()
                    )));
                }
                match dtype {
                    None => dtype = Some((info.dtype, k)),
                    Some((d, k0)) if d != info.dtype => {
                        return Err(AdapterError::Shape(format!(
                            "layer {l}: tensor '{k}' is {} but '{k0}' is {d}; experts of a layer must share a dtype (no casting)",
                            info.dtype
                        )))
                    }
                    _ => {}
                }
            }
            if let Some((d, _)) = dtype {
                dtypes.insert(l, d);
            }
        }
        Ok(dtypes)
    }

    /// Whether an expert key of layer `l` is one this adapter reads (HF side).
    fn expected_hf_kind(&self, l: usize, kind: &ExpertKey) -> bool {
        if !self.config.is_moe_layer(l) {
            return false;
        }
        match (self.layout, kind) {
            (ExpertLayout::PerExpert, ExpertKey::PerExpert(e, _)) => *e < self.e(),
            (ExpertLayout::Fused, ExpertKey::FusedGateUp | ExpertKey::FusedDown) => true,
            _ => false,
        }
    }

    /// Parses a native expert key into `(layer, kind)`; `Ok(None)` for pass-through keys; error
    /// for expert-looking keys that are not native expert keys of a MoE layer.
    fn parse_native(&self, key: &str) -> Result<Option<(usize, NativeKind)>> {
        let Some((l, kind)) = parse_expert_key(key) else {
            return Ok(None);
        };
        let nk = match kind {
            ExpertKey::NativeGateUp => NativeKind::GateUp,
            ExpertKey::NativeDown => NativeKind::Down,
            _ => {
                return Err(AdapterError::UnexpectedKeys(format!(
                    "unexpected key '{key}' in native state: expected only gate_and_up_projs / down_projs under mlp.experts"
                )))
            }
        };
        if !self.config.is_moe_layer(l) {
            return Err(AdapterError::UnexpectedKeys(format!(
                "native key '{key}': layer {l} is not a MoE layer of this config (MoE layers {:?})",
                self.moe_layers()
            )));
        }
        Ok(Some((l, nk)))
    }

    /// Builds the native sub-tensor of layer `l` / `kind` holding global indices `idx` (per native
    /// dim), reading only the HF bytes it needs. The packed 2I dim of gate_and_up_projs must be
    /// complete.
    fn build_native(
        &self,
        ckpt: &HfCheckpoint,
        l: usize,
        kind: NativeKind,
        dtype: Dtype,
        idx: &[Vec<usize>],
    ) -> Result<HostTensor> {
        let i = self.i();
        let out_shape: Vec<usize> = idx.iter().map(Vec::len).collect();
        if out_shape.contains(&0) {
            return HostTensor::new(dtype, out_shape, Vec::new());
        }
        let t = match (self.layout, kind) {
            (ExpertLayout::Fused, NativeKind::GateUp) => ckpt
                .tensor_gather(
                    &hf_fused_gate_up_key(l),
                    &[idx[0].clone(), idx[2].clone(), idx[1].clone()],
                )?
                .transpose(1, 2)?,
            (ExpertLayout::Fused, NativeKind::Down) => ckpt
                .tensor_gather(
                    &hf_fused_down_key(l),
                    &[idx[0].clone(), idx[2].clone(), idx[1].clone()],
                )?
                .transpose(1, 2)?,
            (ExpertLayout::PerExpert, NativeKind::GateUp) => {
                if idx[2] != range_vec(0, 2 * i) {
                    return Err(AdapterError::Unsupported(format!(
                        "{}: sharding the packed 2I dim is unsupported in this version",
                        native_gate_up_key(l)
                    )));
                }
                let mut parts = Vec::with_capacity(idx[0].len());
                for &e in &idx[0] {
                    let g = ckpt.tensor_gather(
                        &hf_expert_key(l, e, "gate_proj"),
                        &[range_vec(0, i), idx[1].clone()],
                    )?;
                    let u = ckpt.tensor_gather(
                        &hf_expert_key(l, e, "up_proj"),
                        &[range_vec(0, i), idx[1].clone()],
                    )?;
                    parts.push(HostTensor::cat(
                        &[g.transpose(0, 1)?, u.transpose(0, 1)?],
                        1,
                    )?);
                }
                HostTensor::stack(&parts)?
            }
            (ExpertLayout::PerExpert, NativeKind::Down) => {
                let mut parts = Vec::with_capacity(idx[0].len());
                for &e in &idx[0] {
                    let d = ckpt.tensor_gather(
                        &hf_expert_key(l, e, "down_proj"),
                        &[idx[2].clone(), idx[1].clone()],
                    )?;
                    parts.push(d.transpose(0, 1)?);
                }
                HostTensor::stack(&parts)?
            }
        };
        if t.shape != out_shape || t.dtype != dtype {
            return Err(AdapterError::Shape(format!(
                "layer {l}: built native {kind:?} {} {:?}, expected {dtype} {out_shape:?}",
                t.dtype, t.shape
            )));
        }
        Ok(t)
    }

    /// HF key of a native tensor in the fused layout.
    fn fused_key(l: usize, kind: NativeKind) -> String {
        match kind {
            NativeKind::GateUp => hf_fused_gate_up_key(l),
            NativeKind::Down => hf_fused_down_key(l),
        }
    }

    /// Converts one whole native expert tensor to its HF tensors.
    fn native_to_hf(
        &self,
        key: &str,
        l: usize,
        kind: NativeKind,
        t: &HostTensor,
    ) -> Result<Vec<(String, HostTensor)>> {
        let want = self.native_shape(kind);
        if t.shape != want {
            return Err(AdapterError::Shape(format!(
                "native tensor '{key}' has shape {:?} but config gives {want:?}",
                t.shape
            )));
        }
        let i = self.i();
        match self.layout {
            ExpertLayout::Fused => Ok(vec![(Self::fused_key(l, kind), t.transpose(1, 2)?)]),
            ExpertLayout::PerExpert => {
                let mut out = Vec::new();
                for e in 0..self.e() {
                    let x = t.select(0, e)?;
                    match kind {
                        NativeKind::GateUp => {
                            let rows = range_vec(0, x.shape[0]);
                            let g = x
                                .gather_vecs(&[rows.clone(), range_vec(0, i)])?
                                .transpose(0, 1)?;
                            let u = x
                                .gather_vecs(&[rows, range_vec(i, 2 * i)])?
                                .transpose(0, 1)?;
                            out.push((hf_expert_key(l, e, "gate_proj"), g));
                            out.push((hf_expert_key(l, e, "up_proj"), u));
                        }
                        NativeKind::Down => {
                            out.push((hf_expert_key(l, e, "down_proj"), x.transpose(0, 1)?));
                        }
                    }
                }
                Ok(out)
            }
        }
    }
}

/// Detects the expert layout from checkpoint keys (see [`ExpertLayout`]).
fn detect_layout<'a>(keys: impl IntoIterator<Item = &'a str>) -> Result<ExpertLayout> {
    let mut per: Option<&str> = None;
    let mut fused: Option<&str> = None;
    for k in keys {
        match parse_expert_key(k) {
            Some((_, ExpertKey::PerExpert(..))) => per = per.or(Some(k)),
            Some((_, ExpertKey::FusedGateUp | ExpertKey::FusedDown)) => fused = fused.or(Some(k)),
            _ => {}
        }
    }
    match (per, fused) {
        (Some(p), Some(f)) => Err(AdapterError::UnexpectedKeys(format!(
            "checkpoint mixes per-expert keys (e.g. '{p}') and fused expert keys (e.g. '{f}')"
        ))),
        (None, Some(_)) => Ok(ExpertLayout::Fused),
        _ => Ok(ExpertLayout::PerExpert),
    }
}

impl MoeAdapter for Qwen3MoeAdapter {
    fn model_type(&self) -> &str {
        "qwen3_moe"
    }

    fn num_experts(&self) -> usize {
        self.e()
    }

    fn moe_layers(&self) -> Vec<usize> {
        (0..self.config.num_hidden_layers)
            .filter(|&l| self.config.is_moe_layer(l))
            .collect()
    }

    fn native_expert_tensors(&self, ckpt: &HfCheckpoint) -> Result<Vec<NativeTensorInfo>> {
        let dtypes = self.validate_hf(ckpt)?;
        let mut out = Vec::new();
        for (l, dtype) in dtypes {
            for (key, kind) in [
                (native_gate_up_key(l), NativeKind::GateUp),
                (native_down_key(l), NativeKind::Down),
            ] {
                out.push(NativeTensorInfo {
                    key,
                    dtype,
                    shape: self.native_shape(kind),
                });
            }
        }
        Ok(out)
    }

    fn native_moe_keys(&self, layer: usize) -> Result<crate::adapter::NativeMoeKeys> {
        if !self.config.is_moe_layer(layer) {
            return Err(AdapterError::Config(format!(
                "layer {layer} is not a MoE layer of this qwen3_moe config (MoE layers {:?})",
                self.moe_layers()
            )));
        }
        let p = format!("model.layers.{layer}.mlp");
        Ok(crate::adapter::NativeMoeKeys {
            gate_weight: format!("{p}.gate.weight"),
            gate_bias: None,
            e_score_correction_bias: None,
            gate_and_up_projs: native_gate_up_key(layer),
            down_projs: native_down_key(layer),
            gate_up_proj_bias: None,
            down_proj_bias: None,
            shared: None,
            shared_gate: None,
        })
    }

    fn from_hf(&self, ckpt: &HfCheckpoint) -> Result<BTreeMap<String, HostTensor>> {
        let dtypes = self.validate_hf(ckpt)?;
        let mut out = BTreeMap::new();
        for k in ckpt.keys() {
            if parse_expert_key(k).is_none() {
                out.insert(k.to_string(), ckpt.tensor(k)?);
            }
        }
        for (&l, &dtype) in &dtypes {
            for (key, kind) in [
                (native_gate_up_key(l), NativeKind::GateUp),
                (native_down_key(l), NativeKind::Down),
            ] {
                let idx: Vec<Vec<usize>> = self
                    .native_shape(kind)
                    .iter()
                    .map(|&n| range_vec(0, n))
                    .collect();
                let t = self.build_native(ckpt, l, kind, dtype, &idx)?;
                if out.insert(key.clone(), t).is_some() {
                    return Err(AdapterError::UnexpectedKeys(format!(
                        "{}: key '{key}' exists in the checkpoint and is also produced by the conversion",
                        ckpt.dir().display()
                    )));
                }
            }
        }
        Ok(out)
    }

    fn to_hf(&self, native: &BTreeMap<String, HostTensor>) -> Result<BTreeMap<String, HostTensor>> {
        let mut out = BTreeMap::new();
        for (k, t) in native {
            match self.parse_native(k)? {
                None => {
                    out.insert(k.clone(), t.clone());
                }
                Some((l, kind)) => {
                    for (hk, ht) in self.native_to_hf(k, l, kind, t)? {
                        if out.insert(hk.clone(), ht).is_some() {
                            return Err(AdapterError::UnexpectedKeys(format!(
                                "native state: HF key '{hk}' produced twice"
                            )));
                        }
                    }
                }
            }
        }
        Ok(out)
    }

    fn from_hf_local(
        &self,
        ckpt: &HfCheckpoint,
        native_key: &str,
        mesh: &DeviceMesh,
        placements: &[Placement],
        coord: &[usize],
    ) -> Result<LocalTensor> {
        if let Some(p) = placements.iter().find(|p| p.is_partial()) {
            return Err(AdapterError::Unsupported(format!(
                "{native_key}: loading into placement {p} is not supported (a loaded weight is never partial)"
            )));
        }
        let parsed = self.parse_native(native_key)?;
        let Some((l, kind)) = parsed else {
            // Pass-through key: native == HF, so gather this rank's shard straight from the file.
            let info = ckpt.info(native_key)?;
            let (_, idx) = shard_indices(native_key, &info.shape, mesh, placements, coord)?;
            let vecs: Vec<Vec<usize>> = idx.iter().map(IndexSet::to_vec).collect();
            let tensor = ckpt.tensor_gather(native_key, &vecs)?;
            return Ok(LocalTensor {
                key: native_key.to_string(),
                tensor,
                global_shape: info.shape,
                placements: placements.to_vec(),
                indices: idx,
            });
        };
        if kind == NativeKind::GateUp {
            if let Some(p) = placements.iter().find(|p| p.shard_dim() == Some(2)) {
                return Err(AdapterError::Unsupported(format!(
                    "{native_key}: placement {p} shards the packed 2I dim (gate|up); unsupported in this version (packed TP comes later)"
                )));
            }
        }
        let dtypes = self.validate_hf(ckpt)?;
        let dtype = *dtypes.get(&l).ok_or_else(|| {
            AdapterError::MissingExperts(format!(
                "layer {l}: no expert tensors in {}",
                ckpt.dir().display()
            ))
        })?;
        let global = self.native_shape(kind);
        let (ls, idx) = shard_indices(native_key, &global, mesh, placements, coord)?;
        let vecs: Vec<Vec<usize>> = idx.iter().map(IndexSet::to_vec).collect();
        let tensor = self.build_native(ckpt, l, kind, dtype, &vecs)?;
        if tensor.shape != ls.local_shape {
            return Err(AdapterError::Shape(format!(
                "{native_key}: built local shape {:?} but placement gives {:?}",
                tensor.shape, ls.local_shape
            )));
        }
        Ok(LocalTensor {
            key: native_key.to_string(),
            tensor,
            global_shape: global,
            placements: placements.to_vec(),
            indices: idx,
        })
    }

    fn to_hf_local(&self, local: &LocalTensor) -> Result<Vec<LocalTensor>> {
        local.validate()?;
        let Some((l, kind)) = self.parse_native(&local.key)? else {
            return Ok(vec![local.clone()]);
        };
        let want = self.native_shape(kind);
        if local.global_shape != want {
            return Err(AdapterError::Shape(format!(
                "local tensor '{}' has global shape {:?} but config gives {want:?}",
                local.key, local.global_shape
            )));
        }
        let i = self.i();
        if kind == NativeKind::GateUp && local.indices[2].to_vec() != range_vec(0, 2 * i) {
            return Err(AdapterError::Unsupported(format!(
                "{}: shard holds part of the packed 2I dim (gate|up); unsupported in this version (packed TP comes later)",
                local.key
            )));
        }
        match self.layout {
            ExpertLayout::Fused => {
                // HF fused = native.transpose(1, 2): native dim 1 <-> 2.
                let placements = map_placements(&local.placements, &[Some(0), Some(2), Some(1)])?;
                let (g, ix) = (&local.global_shape, &local.indices);
                Ok(vec![LocalTensor {
                    key: Self::fused_key(l, kind),
                    tensor: local.tensor.transpose(1, 2)?,
                    global_shape: vec![g[0], g[2], g[1]],
                    placements,
                    indices: vec![ix[0].clone(), ix[2].clone(), ix[1].clone()],
                }])
            }
            ExpertLayout::PerExpert => {
                // Per expert: native [e, a, b] -> HF [b, a]; native dim 1 -> HF dim 1, 2 -> 0.
                let placements = map_placements(&local.placements, &[None, Some(1), Some(0)])?;
                let experts = local.indices[0].to_vec();
                let mut out = Vec::new();
                for (k, &e) in experts.iter().enumerate() {
                    let x = local.tensor.select(0, k)?;
                    let rows = range_vec(0, x.shape[0]);
                    let mut push =
                        |proj: Proj, t: HostTensor, global: Vec<usize>, dim0: IndexSet| {
                            out.push(LocalTensor {
                                key: hf_expert_key(l, e, proj_name(proj)),
                                tensor: t,
                                global_shape: global,
                                placements: placements.clone(),
                                indices: vec![dim0, local.indices[1].clone()],
                            });
                        };
                    match kind {
                        NativeKind::GateUp => {
                            let h = self.h();
                            let g = x
                                .gather_vecs(&[rows.clone(), range_vec(0, i)])?
                                .transpose(0, 1)?;
                            let u = x
                                .gather_vecs(&[rows, range_vec(i, 2 * i)])?
                                .transpose(0, 1)?;
                            push(Proj::Gate, g, vec![i, h], IndexSet::full(i));
                            push(Proj::Up, u, vec![i, h], IndexSet::full(i));
                        }
                        NativeKind::Down => {
                            let t = x.transpose(0, 1)?;
                            push(Proj::Down, t, vec![self.h(), i], local.indices[2].clone());
                        }
                    }
                }
                Ok(out)
            }
        }
    }
}

/// Keys of `ckpt` that are Qwen3-MoE expert keys (either layout), sorted; for tools.
pub fn expert_keys(ckpt: &HfCheckpoint) -> BTreeSet<String> {
    ckpt.keys()
        .into_iter()
        .filter(|k| parse_expert_key(k).is_some())
        .map(str::to_string)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_keys() {
        assert_eq!(
            parse_expert_key("model.layers.12.mlp.experts.3.up_proj.weight"),
            Some((12, ExpertKey::PerExpert(3, Proj::Up)))
        );
        assert_eq!(
            parse_expert_key("model.layers.0.mlp.experts.gate_up_proj"),
            Some((0, ExpertKey::FusedGateUp))
        );
        assert_eq!(
            parse_expert_key("model.layers.0.mlp.experts.3.up_proj.bias"),
            Some((0, ExpertKey::Other))
        );
        assert_eq!(parse_expert_key("model.layers.0.mlp.gate.weight"), None);
    }

    #[test]
    fn config_expert_count_names() {
        let base = serde_json::json!({"num_hidden_layers": 2, "moe_intermediate_size": 3, "hidden_size": 4});
        let with = |k: &str, v: u64| {
            let mut c = base.clone();
            c[k] = v.into();
            c
        };
        assert_eq!(
            Qwen3MoeConfig::from_json(&with("num_experts", 8))
                .unwrap()
                .num_experts,
            8
        );
        assert_eq!(
            Qwen3MoeConfig::from_json(&with("num_local_experts", 6))
                .unwrap()
                .num_experts,
            6
        );
        let mut both = with("num_experts", 8);
        both["num_local_experts"] = 6.into();
        assert!(Qwen3MoeConfig::from_json(&both).is_err());
        let e = Qwen3MoeConfig::from_json(&base).unwrap_err().to_string();
        assert!(e.contains("num_experts"), "{e}");
        let c = Qwen3MoeConfig::from_json(&with("num_experts", 8)).unwrap();
        assert_eq!((c.decoder_sparse_step, c.mlp_only_layers.len()), (1, 0));
    }

    #[test]
    fn moe_layer_rule() {
        // Hand-worked: 6 layers, step 2, layer 3 mlp-only -> MoE layers are L with (L+1)%2==0
        // i.e. 1, 3, 5, minus 3.
        let c = Qwen3MoeConfig {
            num_hidden_layers: 6,
            num_experts: 4,
            moe_intermediate_size: 2,
            hidden_size: 3,
            decoder_sparse_step: 2,
            mlp_only_layers: vec![3],
        };
        let a = Qwen3MoeAdapter::new(c, ExpertLayout::PerExpert);
        assert_eq!(a.moe_layers(), vec![1, 5]);
    }
}
