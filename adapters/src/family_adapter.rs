//! [`FamilyAdapter`]: the one [`MoeAdapter`] implementation, driven by a [`FamilySpec`] (names per
//! family) and a detected [`DiskLayout`] (segments per native tensor, [`crate::layout`]).
//!
//! Key mapping for MoE layer `L` with layer prefix `P` (`model.layers.L` or
//! `model.language_model.layers.L`, detected from the keys and kept in native keys):
//! - expert tensors: the groups of [`crate::layout::layer_groups`] -> `P.mlp.experts.*`;
//! - renames (disk -> native): `P.<moe>.<router>.weight` -> `P.mlp.gate.weight`, GPT-OSS
//!   `P.mlp.router.bias` -> `P.mlp.gate.bias`, `P.<e_bias>` -> `P.mlp.gate.e_score_correction_bias`,
//!   `P.<shared>.{gate,up,down}_proj.weight` -> `P.mlp.shared_experts.*`,
//!   `P.<shared_gate>` -> `P.mlp.shared_expert_gate.weight`;
//! - every other key passes through unchanged.
//!
//! [`MoeAdapter::to_hf`] applies the inverse per key, so a gradient map (any subset of native keys)
//! maps to the disk keys the same way. Conversions only move bytes: no dtype change, no
//! communication. Local shards: see [`crate::layout::Group::to_disk_local`]; any `S` / `_S` on any
//! native dim loads (the packed 2I dim included); on the way back, a mesh dim sharding the packed
//! dim must be `_S(2, 2)` (TP-packed gate|up) unless the tensor has one identity segment. It maps
//! to `S` of the gate and up tensors' I dim, or, for GPT-OSS's interleaved `gate_up_proj` (and
//! `gate_up_proj_bias`), to `S` of its 2I dim: rank r's gate cols G and up cols G + I are disk
//! cols `{2i, 2i + 1 : i in G}`, one run, re-interleaved; that `S` is exact when the mesh size
//! divides I (else the index sets are authoritative: `LocalTensor::placements_match`).

use crate::adapter::{MoeAdapter, NativeMoeKeys};
pub use crate::adapter_layout::LayoutChoice;
use crate::adapter_layout::{AdapterLayout, Side};
use crate::checkpoint::HfCheckpoint;
use crate::error::{AdapterError, Result};
use crate::family::{spec_for, ExpertStyle, FamilyConfig, FamilySpec, FusedOrientation};
use crate::layout::{layer_groups, DiskLayout, Group, NativeKind};
use crate::local::{shard_indices, LocalTensor, NativeTensorInfo};
use crate::tensor::HostTensor;
use placement::{DeviceMesh, IndexSet, Placement};
use safetensors::Dtype;
use std::collections::{BTreeMap, HashMap};

/// How many keys an error message lists before "...".
const LIST_MAX: usize = 3;

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

/// Where a disk expert key belongs.
#[derive(Debug, Clone, Copy)]
struct DiskSlot {
    /// Index into `groups`.
    group: usize,
}

/// The adapter for every supported family (see the module docs).
#[derive(Debug, Clone)]
pub struct FamilyAdapter {
    spec: FamilySpec,
    config: FamilyConfig,
    prefix: String,
    moe_module: &'static str,
    layout: DiskLayout,
    has_router_bias: bool,
    has_e_bias: bool,
    has_shared: bool,
    has_shared_gate: bool,
    groups: Vec<Group>,
    /// native key -> group index.
    by_native: HashMap<String, usize>,
    /// expected disk expert key -> slot.
    by_disk: HashMap<String, DiskSlot>,
    /// disk key -> native key (non-identity renames only), and the inverse.
    rename: HashMap<String, String>,
    unrename: HashMap<String, String>,
}

/// A config.json error of `ckpt` with the file's full path (`FamilyConfig` names it
/// `config.json`).
pub(crate) fn in_dir(ckpt: &HfCheckpoint, e: AdapterError) -> AdapterError {
    match e {
        AdapterError::Config(m) => match m.strip_prefix("config.json:") {
            Some(rest) => AdapterError::Config(format!(
                "{}:{rest}",
                ckpt.dir().join("config.json").display()
            )),
            None => AdapterError::Config(m),
        },
        other => other,
    }
}

/// Layer index and the rest of `key` under `prefix.` (`None` if the key is not a layer key).
pub(crate) fn split_layer<'a>(prefix: &str, key: &'a str) -> Option<(usize, &'a str)> {
    let rest = key.strip_prefix(prefix)?.strip_prefix('.')?;
    let (l, rest) = rest.split_once('.')?;
    Some((l.parse().ok()?, rest))
}

impl FamilyAdapter {
    /// Builds the adapter from config.json's model_type, detecting prefix, module name, layout
    /// and optional tensors from the keys. Errors: unknown model_type (lists the supported ones),
    /// bad config, a checkpoint mixing layouts.
    pub fn from_checkpoint(ckpt: &HfCheckpoint) -> Result<Self> {
        let spec = spec_for(ckpt.model_type()?)?;
        let mut config =
            FamilyConfig::from_json(&spec, ckpt.config()).map_err(|e| in_dir(ckpt, e))?;
        let keys = ckpt.keys();
        let prefix = if keys
            .iter()
            .any(|k| k.starts_with("model.language_model.layers."))
        {
            "model.language_model.layers"
        } else {
            "model.layers"
        }
        .to_string();
        let moe_module = spec
            .moe_modules
            .iter()
            .copied()
            .find(|m| {
                let pat = format!(".{m}.");
                keys.iter()
                    .any(|k| split_layer(&prefix, k).is_some() && k.contains(&pat))
            })
            .unwrap_or(spec.moe_modules[0]);
        config.mtp_layers = check_layer_count(&config, ckpt, &prefix)?;
        let layout = detect_layout(&spec, &config, ckpt, &prefix, moe_module)?;
        if layout == DiskLayout::PerExpert {
            check_expert_count(&config, ckpt, &prefix, moe_module)?;
        }
        let has = |rel: Option<&str>| {
            rel.is_some_and(|r| {
                keys.iter().any(|k| {
                    split_layer(&prefix, k)
                        .is_some_and(|(_, rest)| rest == r || rest.starts_with(&format!("{r}.")))
                })
            })
        };
        let optional = optional_modules(&spec, &config, has);
        Ok(Self::new(
            spec,
            config,
            LayoutChoice {
                prefix,
                moe_module,
                layout,
                optional,
            },
        ))
    }

    /// An adapter for an explicit config and layout (no checkpoint needed).
    pub fn new(spec: FamilySpec, config: FamilyConfig, c: LayoutChoice) -> Self {
        let mut a = FamilyAdapter {
            spec,
            config,
            prefix: c.prefix,
            moe_module: c.moe_module,
            layout: c.layout,
            has_router_bias: c.optional[0],
            has_e_bias: c.optional[1],
            has_shared: c.optional[2],
            has_shared_gate: c.optional[3],
            groups: Vec::new(),
            by_native: HashMap::new(),
            by_disk: HashMap::new(),
            rename: HashMap::new(),
            unrename: HashMap::new(),
        };
        a.build_maps();
        a
    }

    fn names(&self) -> [&'static str; 3] {
        match self.spec.experts {
            ExpertStyle::PerExpertOrFused { names, .. } => names,
            _ => ["gate_proj.weight", "up_proj.weight", "down_proj.weight"],
        }
    }

    fn build_maps(&mut self) {
        let c = &self.config;
        let dims = (c.num_experts, c.hidden_size, c.moe_intermediate_size);
        let mut groups = Vec::new();
        let mut renames: Vec<(String, String)> = Vec::new();
        for l in c.moe_layers() {
            let p = format!("{}.{l}", self.prefix);
            groups.extend(layer_groups(
                self.layout,
                l,
                &p,
                self.moe_module,
                self.names(),
                dims,
            ));
            let m = self.moe_module;
            renames.push((
                format!("{p}.{m}.{}.weight", self.spec.router),
                format!("{p}.mlp.gate.weight"),
            ));
            if self.has_router_bias {
                renames.push((
                    format!("{p}.{m}.{}.bias", self.spec.router),
                    format!("{p}.mlp.gate.bias"),
                ));
            }
            if let (true, Some(b)) = (self.has_e_bias, self.spec.e_bias) {
                renames.push((
                    format!("{p}.{b}"),
                    format!("{p}.mlp.gate.e_score_correction_bias"),
                ));
            }
            if let (true, Some(s)) = (self.has_shared, self.spec.shared) {
                for proj in ["gate_proj", "up_proj", "down_proj"] {
                    renames.push((
                        format!("{p}.{s}.{proj}.weight"),
                        format!("{p}.mlp.shared_experts.{proj}.weight"),
                    ));
                }
            }
            if let (true, Some(s)) = (self.has_shared_gate, self.spec.shared_gate) {
                renames.push((
                    format!("{p}.{s}"),
                    format!("{p}.mlp.shared_expert_gate.weight"),
                ));
            }
        }
        let e = c.num_experts;
        for (gi, g) in groups.iter().enumerate() {
            self.by_native.insert(g.native_key.clone(), gi);
            for (k, _) in g.disk_keys(e) {
                self.by_disk.insert(k, DiskSlot { group: gi });
            }
        }
        for (d, n) in renames {
            if d != n {
                self.unrename.insert(n.clone(), d.clone());
                self.rename.insert(d, n);
            }
        }
        self.groups = groups;
    }

    /// The native expert groups (one per native expert tensor of every MoE layer).
    pub fn groups(&self) -> &[Group] {
        &self.groups
    }

    /// The group producing native key `key`, if it is a native expert tensor.
    pub fn group_of(&self, key: &str) -> Option<&Group> {
        self.by_native.get(key).and_then(|&g| self.groups.get(g))
    }

    /// Whether `key` is an HF disk key consumed by a native expert group.
    pub fn is_expert_disk_key(&self, key: &str) -> bool {
        self.by_disk.contains_key(key)
    }

    /// HF disk key -> native key for renamed and pass-through keys (identity when not renamed).
    pub fn native_name<'a>(&'a self, disk_key: &'a str) -> &'a str {
        self.rename
            .get(disk_key)
            .map(String::as_str)
            .unwrap_or(disk_key)
    }

    /// Native key -> HF disk key for renamed and pass-through keys.
    pub fn disk_name_of<'a>(&'a self, native_key: &'a str) -> &'a str {
        self.disk_name(native_key)
    }

    /// Checks the HF expert keys (see `from_hf`) and returns each group's dtype, in `groups()` order.
    pub fn validate(&self, ckpt: &HfCheckpoint) -> Result<Vec<Dtype>> {
        self.validate_hf(ckpt)
    }

    /// What `from_checkpoint` detected, to rebuild the adapter for a native checkpoint.
    pub fn layout_choice(&self) -> LayoutChoice {
        LayoutChoice {
            prefix: self.prefix.clone(),
            moe_module: self.moe_module,
            layout: self.layout,
            optional: [
                self.has_router_bias,
                self.has_e_bias,
                self.has_shared,
                self.has_shared_gate,
            ],
        }
    }

    /// The family spec.
    pub fn spec(&self) -> &FamilySpec {
        &self.spec
    }

    /// The detected on-disk expert layout (written back by `to_hf`).
    pub fn layout(&self) -> DiskLayout {
        self.layout
    }

    /// The parsed config numbers.
    pub fn config(&self) -> &FamilyConfig {
        &self.config
    }

    /// The layer prefix (`model.layers` or `model.language_model.layers`).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Whether `key` (a disk key) looks like an expert tensor of some layer: under
    /// `<moe>.experts.` or, for Step3.5, `moe.{gate,up,down}_proj.weight`.
    fn looks_like_expert(&self, key: &str) -> bool {
        let Some((_, rest)) = split_layer(&self.prefix, key) else {
            return false;
        };
        self.spec.moe_modules.iter().any(|m| {
            rest.strip_prefix(m)
                .and_then(|r| r.strip_prefix('.'))
                .is_some_and(|r| {
                    r.starts_with("experts.")
                        || (self.spec.experts == ExpertStyle::Step35
                            && matches!(
                                r,
                                "gate_proj.weight" | "up_proj.weight" | "down_proj.weight"
                            ))
                })
        })
    }

    /// Checks the checkpoint's expert keys: none unexpected, none missing, shapes as the config
    /// says, one dtype per native group. Returns each group's dtype.
    fn validate_hf(&self, ckpt: &HfCheckpoint) -> Result<Vec<Dtype>> {
        let unexpected: Vec<String> = ckpt
            .keys()
            .into_iter()
            .filter(|k| !self.by_disk.contains_key(*k) && self.looks_like_expert(k))
            .map(str::to_string)
            .collect();
        if !unexpected.is_empty() {
            return Err(AdapterError::UnexpectedKeys(format!(
                "{}: unexpected expert keys for {} ({:?} layout, {} experts, MoE layers {:?} by config.json): {} ({} unexpected)",
                ckpt.dir().display(),
                self.spec.model_type,
                self.layout,
                self.config.num_experts,
                self.config.moe_layers(),
                list_keys(&unexpected),
                unexpected.len()
            )));
        }
        let e = self.config.num_experts;
        let mut missing_by_layer: BTreeMap<usize, Vec<String>> = BTreeMap::new();
        for g in &self.groups {
            for (k, _) in g.disk_keys(e) {
                if !ckpt.contains(&k) {
                    missing_by_layer.entry(g.layer).or_default().push(k);
                }
            }
        }
        if let Some((l, missing)) = missing_by_layer.into_iter().next() {
            return Err(AdapterError::MissingExperts(format!(
                "layer {l}: missing expert keys: {} ({} missing)",
                list_keys(&missing),
                missing.len()
            )));
        }
        let mut dtypes = Vec::with_capacity(self.groups.len());
        for g in &self.groups {
            let mut dtype: Option<(Dtype, String)> = None;
            for (k, want) in g.disk_keys(e) {
                let info = ckpt.info(&k)?;
                if info.shape != want {
                    let file = info.file_name();
                    return Err(AdapterError::Shape(format!(
                        "{file}: tensor '{k}' has shape {:?} but config.json (E={}, H={}, I={}) gives {want:?}",
                        info.shape,
                        e,
                        self.config.hidden_size,
                        self.config.moe_intermediate_size
                    )));
                }
                match &dtype {
                    None => dtype = Some((info.dtype, k)),
                    Some((d, k0)) if *d != info.dtype => {
                        return Err(AdapterError::Shape(format!(
                            "layer {}: tensor '{k}' is {} but '{k0}' is {d}; tensors of one native tensor must share a dtype (no casting)",
                            g.layer, info.dtype
                        )))
                    }
                    _ => {}
                }
            }
            dtypes.push(dtype.map(|(d, _)| d).unwrap_or(Dtype::F32));
        }
        crate::moe_block::check(self, ckpt, Side::Hf)?;
        crate::model_keys::check(self, ckpt, Side::Hf)?;
        Ok(dtypes)
    }

    /// The group of a native key; `Ok(None)` for renamed / pass-through keys; error for a key
    /// under `mlp.experts.` that is not a native expert tensor of this adapter.
    fn native_group(&self, key: &str) -> Result<Option<&Group>> {
        if let Some(&gi) = self.by_native.get(key) {
            return Ok(self.groups.get(gi));
        }
        if let Some((l, rest)) = split_layer(&self.prefix, key) {
            if rest.starts_with("mlp.experts.") {
                return Err(AdapterError::UnexpectedKeys(
                    if self.config.is_moe_layer(l) {
                        format!(
                        "unexpected key '{key}' in native state: {} ({:?} layout) has only {} under mlp.experts",
                        self.spec.model_type,
                        self.layout,
                        self.native_expert_suffixes().join(" / ")
                    )
                    } else {
                        format!(
                        "native key '{key}': layer {l} is not a MoE layer of this config.json (MoE layers {:?})",
                        self.config.moe_layers()
                    )
                    },
                ));
            }
        }
        Ok(None)
    }

    fn native_expert_suffixes(&self) -> Vec<&'static str> {
        let mut v: Vec<&'static str> = self
            .groups
            .iter()
            .filter(|g| g.layer == self.groups[0].layer)
            .map(|g| g.kind.suffix())
            .collect();
        v.dedup();
        v
    }

    /// The disk key a native key maps to when it is renamed or passes through.
    fn disk_name<'a>(&'a self, native_key: &'a str) -> &'a str {
        self.unrename
            .get(native_key)
            .map(String::as_str)
            .unwrap_or(native_key)
    }

    /// Maps every key of a HF key list to its native key (pass-through, rename, or the native
    /// expert tensor it feeds), without reading data; the key-mapping pass of the converter.
    /// Returns (native key -> HF keys feeding it), sorted.
    pub fn map_keys<'a>(
        &self,
        hf_keys: impl IntoIterator<Item = &'a str>,
    ) -> BTreeMap<String, Vec<String>> {
        let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for k in hf_keys {
            let n = if let Some(s) = self.by_disk.get(k) {
                self.groups[s.group].native_key.clone()
            } else if let Some(n) = self.rename.get(k) {
                n.clone()
            } else {
                k.to_string()
            };
            out.entry(n).or_default().push(k.to_string());
        }
        out
    }
}

/// Detects the expert layout from the keys; a fused pair's orientation from both tensors' shapes
/// against the family's known orientations ([`fused_orientation`]).
/// Which optional MoE-block tensors a model has: [router bias, score-correction bias, shared
/// expert, shared-expert gate]. config.json decides where it says ([`FamilyConfig`]'s
/// `router_e_bias` and `shared_intermediate_size`; GPT-OSS always has a router bias, the
/// shared-expert gate comes with the shared expert of the families that have one); `has`
/// (whether the checkpoint holds keys of that module) decides where it does not.
pub(crate) fn optional_modules(
    spec: &FamilySpec,
    config: &FamilyConfig,
    has: impl Fn(Option<&str>) -> bool,
) -> [bool; 4] {
    let shared =
        spec.shared.is_some() && (config.shared_intermediate_size.is_some() || has(spec.shared));
    [
        spec.experts == ExpertStyle::GptOss,
        spec.e_bias.is_some() && config.router_e_bias.unwrap_or_else(|| has(spec.e_bias)),
        shared,
        shared && spec.shared_gate.is_some(),
    ]
}

/// The checkpoint's layer indices under `prefix` (`prefix.L.*` keys), ascending.
fn layer_indices(ckpt: &HfCheckpoint, prefix: &str) -> std::collections::BTreeSet<usize> {
    ckpt.keys()
        .into_iter()
        .filter_map(|k| split_layer(prefix, k).map(|(l, _)| l))
        .collect()
}

/// config.json's `num_hidden_layers` against the keys, before it sizes anything: every layer up
/// to it has keys, and no layer after it but the `num_nextn_predict_layers` MTP layers. Returns
/// how many MTP layers the checkpoint holds. Errors name the field, its value and the layer the
/// checkpoint has or lacks.
pub(crate) fn check_layer_count(
    config: &FamilyConfig,
    ckpt: &HfCheckpoint,
    prefix: &str,
) -> Result<usize> {
    let layers = layer_indices(ckpt, prefix);
    let l = config.num_hidden_layers;
    if let Some(missing) = (0..l).find(|x| !layers.contains(x)) {
        return Err(AdapterError::Config(format!(
            "{}: num_hidden_layers is {l} but the checkpoint has no key under '{prefix}.{missing}.' ({})",
            ckpt.dir().join("config.json").display(),
            match layers.last() {
                Some(last) => format!("{} layers, the last {last}", layers.len()),
                None => format!("no key under '{prefix}.'"),
            }
        )));
    }
    // Layers past num_hidden_layers: only the multi-token-prediction layers DeepSeek-V3 and
    // GLM-4.5 publish there (`num_nextn_predict_layers`), in order.
    let nextn = config.num_nextn_predict_layers;
    let mtp = (l..l.saturating_add(nextn))
        .take_while(|x| layers.contains(x))
        .count();
    if let Some(&extra) = layers.range(l + mtp..).next() {
        return Err(AdapterError::UnexpectedKeys(format!(
            "{}: keys under '{prefix}.{extra}.' but config.json's num_hidden_layers is {l}{}",
            ckpt.dir().display(),
            if nextn > 0 {
                format!(" (+ {nextn} num_nextn_predict_layers)")
            } else {
                String::new()
            }
        )));
    }
    Ok(mtp)
}

/// config.json's expert count E against the per-expert keys `prefix.L.<moe>.experts.X.*` of
/// every MoE layer (some key of expert E - 1 present), before E sizes the key lists; missing or
/// extra keys below that are reported key by key by `validate`. Error: names the field, E, the
/// layer and the experts found.
fn check_expert_count(
    config: &FamilyConfig,
    ckpt: &HfCheckpoint,
    prefix: &str,
    moe: &str,
) -> Result<()> {
    let pat = format!("{moe}.experts.");
    let mut per_layer: BTreeMap<usize, std::collections::BTreeSet<usize>> = BTreeMap::new();
    for k in ckpt.keys() {
        let Some((l, rest)) = split_layer(prefix, k) else {
            continue;
        };
        let Some(x) = rest
            .strip_prefix(&pat)
            .and_then(|r| r.split_once('.'))
            .and_then(|(x, _)| x.parse::<usize>().ok())
        else {
            continue;
        };
        per_layer.entry(l).or_default().insert(x);
    }
    let e = config.num_experts;
    for l in config.moe_layers() {
        let found = per_layer.remove(&l).unwrap_or_default();
        let n = found.len();
        // More experts than the layer has keys for (fewer, or gaps, are reported key by key).
        if found.last().is_none_or(|&x| x + 1 < e) {
            return Err(AdapterError::Config(format!(
                "{}: num_experts is {e} but layer {l} has {} under '{prefix}.{l}.{pat}'",
                ckpt.dir().join("config.json").display(),
                match (found.first(), found.last()) {
                    (Some(a), Some(b)) => format!("{n} experts ({a}..={b})"),
                    _ => "no expert keys".to_string(),
                }
            )));
        }
    }
    Ok(())
}

/// For a native checkpoint: `num_hidden_layers` as in [`check_layer_count`] (returns `config`
/// with the MTP layers found), and config.json's E
/// against dim 0 of each MoE layer's `prefix.L.mlp.experts.gate_and_up_projs` (`[E, H, 2I]`),
/// before E sizes the key lists of the HF layout.
pub(crate) fn check_native_sizes(
    mut config: FamilyConfig,
    ckpt: &HfCheckpoint,
    prefix: &str,
) -> Result<FamilyConfig> {
    config.mtp_layers = check_layer_count(&config, ckpt, prefix)?;
    let e = config.num_experts;
    for l in config.moe_layers() {
        let key = format!("{prefix}.{l}.mlp.experts.gate_and_up_projs");
        let info = ckpt.info(&key)?;
        if info.shape.first() != Some(&e) {
            return Err(AdapterError::Config(format!(
                "{}: num_experts is {e} but '{key}' has shape {:?} ([E, H, 2I])",
                ckpt.dir().join("config.json").display(),
                info.shape
            )));
        }
    }
    Ok(config)
}

fn detect_layout(
    spec: &FamilySpec,
    config: &FamilyConfig,
    ckpt: &HfCheckpoint,
    prefix: &str,
    m: &str,
) -> Result<DiskLayout> {
    let known = match spec.experts {
        ExpertStyle::GptOss => return Ok(DiskLayout::GptOss),
        ExpertStyle::Step35 => return Ok(DiskLayout::Step35),
        ExpertStyle::PerExpertOrFused { fused, .. } => fused,
    };
    let mut per: Option<&str> = None;
    // layer -> (gate_up_proj key, down_proj key)
    let mut fused: BTreeMap<usize, [Option<&str>; 2]> = BTreeMap::new();
    let pat = format!("{m}.experts.");
    for k in ckpt.keys() {
        let Some((layer, rest)) = split_layer(prefix, k) else {
            continue;
        };
        let Some(r) = rest.strip_prefix(&pat) else {
            continue;
        };
        if r == "gate_up_proj" || r == "down_proj" {
            fused.entry(layer).or_default()[usize::from(r == "down_proj")] = Some(k);
        } else if r
            .split_once('.')
            .is_some_and(|(e, _)| e.parse::<usize>().is_ok())
        {
            per = per.or(Some(k));
        }
    }
    match (per, fused.values().flatten().flatten().next()) {
        (Some(p), Some(f)) => Err(AdapterError::UnexpectedKeys(format!(
            "checkpoint mixes per-expert keys (e.g. '{p}') and fused expert keys (e.g. '{f}')"
        ))),
        (None, Some(_)) => {
            let mut chosen: Option<(usize, FusedOrientation)> = None;
            for (&layer, pair) in &fused {
                let o = fused_orientation(spec, config, ckpt, layer, pair, known)?;
                match chosen {
                    Some((l0, o0)) if o0 != o => {
                        return Err(AdapterError::Shape(format!(
                            "fused experts of layer {layer} are {} but those of layer {l0} are {}",
                            o.name(),
                            o0.name()
                        )))
                    }
                    Some(_) => {}
                    None => chosen = Some((layer, o)),
                }
            }
            Ok(match chosen.map(|c| c.1) {
                Some(FusedOrientation::Native) => DiskLayout::FusedNative,
                _ => DiskLayout::FusedTransposed,
            })
        }
        _ => Ok(DiskLayout::PerExpert),
    }
}

/// The orientation of one layer's fused pair: the orientations each present tensor's shape fits
/// (`gate_up_proj` fits both when `H == 2I`, `down_proj` both when `H == I`; never both tensors),
/// intersected with the family's `known` ones, first known wins. Never a guess from one
/// ambiguous shape: a shape that fits no orientation, or a pair whose only fitting orientation
/// is not one the family writes (e.g. `H == 2I` with `down_proj` [E, I, H] in a transformers-only
/// family), is an error naming the keys and shapes.
fn fused_orientation(
    spec: &FamilySpec,
    config: &FamilyConfig,
    ckpt: &HfCheckpoint,
    layer: usize,
    pair: &[Option<&str>; 2],
    known: &[FusedOrientation],
) -> Result<FusedOrientation> {
    let (e, h, i) = (
        config.num_experts,
        config.hidden_size,
        config.moe_intermediate_size,
    );
    const ALL: [FusedOrientation; 2] = [FusedOrientation::Transposed, FusedOrientation::Native];
    let mut fits: Vec<FusedOrientation> = ALL.to_vec();
    let mut seen = Vec::new();
    for (idx, key) in pair.iter().enumerate() {
        let Some(key) = key else { continue };
        let shape = ckpt.info(key)?.shape;
        seen.push(format!("'{key}' {shape:?}"));
        fits.retain(|o| o.shapes(e, h, i)[idx][..] == shape[..]);
    }
    let seen = seen.join(", ");
    if fits.is_empty() {
        return Err(AdapterError::Shape(format!(
            "layer {layer}: fused experts {seen} fit neither {} nor {} for config.json's E = {e}, H = {h}, I = {i}",
            ALL[0].name(),
            ALL[1].name()
        )));
    }
    known
        .iter()
        .copied()
        .find(|o| fits.contains(o))
        .ok_or_else(|| {
            AdapterError::Shape(format!(
                "layer {layer}: fused experts {seen} are {}, which {} checkpoints are not written in (known: {}; E = {e}, H = {h}, I = {i})",
                fits.iter().map(|o| o.name()).collect::<Vec<_>>().join(" or "),
                spec.model_type,
                known.iter().map(|o| o.name()).collect::<Vec<_>>().join(", ")
            ))
        })
}

impl AdapterLayout for FamilyAdapter {
    fn spec(&self) -> &FamilySpec {
        &self.spec
    }
    fn config(&self) -> &FamilyConfig {
        &self.config
    }
    fn prefix(&self) -> &str {
        &self.prefix
    }
    fn layout_choice(&self) -> LayoutChoice {
        FamilyAdapter::layout_choice(self)
    }
    fn is_expert_key(&self, key: &str, side: Side) -> bool {
        match side {
            Side::Hf => self.is_expert_disk_key(key),
            Side::Native => self.group_of(key).is_some(),
        }
    }
}

/// Chooses the adapter from config.json's model_type (layout detected from the keys); unknown ->
/// error listing the supported ones.
pub fn adapter_for(ckpt: &HfCheckpoint) -> Result<Box<dyn MoeAdapter>> {
    Ok(Box::new(FamilyAdapter::from_checkpoint(ckpt)?))
}

impl MoeAdapter for FamilyAdapter {
    fn model_type(&self) -> &str {
        self.spec.model_type
    }

    fn num_experts(&self) -> usize {
        self.config.num_experts
    }

    fn moe_layers(&self) -> Vec<usize> {
        self.config.moe_layers()
    }

    fn native_expert_tensors(&self, ckpt: &HfCheckpoint) -> Result<Vec<NativeTensorInfo>> {
        let dtypes = self.validate_hf(ckpt)?;
        Ok(self
            .groups
            .iter()
            .zip(dtypes)
            .filter(|(g, _)| matches!(g.kind, NativeKind::GateUp | NativeKind::Down))
            .map(|(g, dtype)| NativeTensorInfo {
                key: g.native_key.clone(),
                dtype,
                shape: g.shape.clone(),
            })
            .collect())
    }

    fn native_moe_keys(&self, layer: usize) -> Result<NativeMoeKeys> {
        if !self.config.is_moe_layer(layer) {
            return Err(AdapterError::Config(format!(
                "layer {layer} is not a MoE layer of this {} config.json (MoE layers {:?})",
                self.spec.model_type,
                self.config.moe_layers()
            )));
        }
        let p = format!("{}.{layer}.mlp", self.prefix);
        let gpt = self.layout == DiskLayout::GptOss;
        let opt = |b: bool, s: String| b.then_some(s);
        Ok(NativeMoeKeys {
            gate_weight: format!("{p}.gate.weight"),
            gate_bias: opt(self.has_router_bias, format!("{p}.gate.bias")),
            e_score_correction_bias: opt(
                self.has_e_bias,
                format!("{p}.gate.e_score_correction_bias"),
            ),
            gate_and_up_projs: format!("{p}.experts.gate_and_up_projs"),
            down_projs: format!("{p}.experts.down_projs"),
            gate_up_proj_bias: opt(gpt, format!("{p}.experts.gate_up_proj_bias")),
            down_proj_bias: opt(gpt, format!("{p}.experts.down_proj_bias")),
            shared: self.has_shared.then(|| {
                ["gate_proj", "up_proj", "down_proj"]
                    .map(|x| format!("{p}.shared_experts.{x}.weight"))
            }),
            shared_gate: opt(
                self.has_shared_gate,
                format!("{p}.shared_expert_gate.weight"),
            ),
        })
    }

    fn from_hf(&self, ckpt: &HfCheckpoint) -> Result<BTreeMap<String, HostTensor>> {
        self.validate_hf(ckpt)?;
        let mut out = BTreeMap::new();
        let mut put = |k: String, t: HostTensor| -> Result<()> {
            if out.contains_key(&k) {
                return Err(AdapterError::UnexpectedKeys(format!(
                    "{}: native key '{k}' is produced twice (a disk key and a renamed or converted one)",
                    ckpt.dir().display()
                )));
            }
            out.insert(k, t);
            Ok(())
        };
        for k in ckpt.keys() {
            if self.by_disk.contains_key(k) {
                continue;
            }
            let n = self.rename.get(k).map(String::as_str).unwrap_or(k);
            put(n.to_string(), ckpt.tensor(k)?)?;
        }
        for g in &self.groups {
            let idx: Vec<Vec<usize>> = g.shape.iter().map(|&n| (0..n).collect()).collect();
            put(g.native_key.clone(), g.read(ckpt, &idx)?)?;
        }
        Ok(out)
    }

    fn to_hf(&self, native: &BTreeMap<String, HostTensor>) -> Result<BTreeMap<String, HostTensor>> {
        let mut out = BTreeMap::new();
        let mut put = |k: String, t: HostTensor| -> Result<()> {
            if out.contains_key(&k) {
                return Err(AdapterError::UnexpectedKeys(format!(
                    "native state: HF key '{k}' produced twice"
                )));
            }
            out.insert(k, t);
            Ok(())
        };
        for (k, t) in native {
            match self.native_group(k)? {
                Some(g) => {
                    for (hk, ht) in g.write(t)? {
                        put(hk, ht)?;
                    }
                }
                None => put(self.disk_name(k).to_string(), t.clone())?,
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
        let Some(g) = self.native_group(native_key)? else {
            let disk = self.disk_name(native_key);
            let info = ckpt.info(disk)?;
            let (_, idx) = shard_indices(native_key, &info.shape, mesh, placements, coord)?;
            let vecs: Vec<Vec<usize>> = idx.iter().map(IndexSet::to_vec).collect();
            return Ok(LocalTensor {
                key: native_key.to_string(),
                tensor: ckpt.tensor_gather(disk, &vecs)?,
                global_shape: info.shape,
                placements: placements.to_vec(),
                indices: idx,
            });
        };
        self.validate_hf(ckpt)?;
        let (ls, idx) = shard_indices(native_key, &g.shape, mesh, placements, coord)?;
        let vecs: Vec<Vec<usize>> = idx.iter().map(IndexSet::to_vec).collect();
        let tensor = g.read(ckpt, &vecs)?;
        if tensor.shape != ls.local_shape {
            return Err(AdapterError::Shape(format!(
                "{native_key}: built local shape {:?} but placement gives {:?}",
                tensor.shape, ls.local_shape
            )));
        }
        Ok(LocalTensor {
            key: native_key.to_string(),
            tensor,
            global_shape: g.shape.clone(),
            placements: placements.to_vec(),
            indices: idx,
        })
    }

    fn to_hf_local(&self, local: &LocalTensor) -> Result<Vec<LocalTensor>> {
        local.validate()?;
        let Some(g) = self.native_group(&local.key)? else {
            let mut t = local.clone();
            t.key = self.disk_name(&local.key).to_string();
            return Ok(vec![t]);
        };
        if local.global_shape != g.shape {
            return Err(AdapterError::Shape(format!(
                "local tensor '{}' has global shape {:?} but config gives {:?}",
                local.key, local.global_shape, g.shape
            )));
        }
        g.to_disk_local(local)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_key_lists_stop_after_three() {
        let keys: Vec<String> = (0..5).map(|i| format!("k{i}")).collect();
        assert_eq!(list_keys(&keys[..2]), "k0, k1");
        assert_eq!(list_keys(&keys[..3]), "k0, k1, k2");
        assert_eq!(list_keys(&keys[..4]), "k0, k1, k2, ...");
        assert_eq!(list_keys(&keys), "k0, k1, k2, ...");
    }
}
