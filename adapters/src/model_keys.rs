//! The rest of a checkpoint's key set, outside the MoE blocks: embeddings, the final norm,
//! `lm_head`, and for every decoder layer its two norms, its attention and (in a dense layer)
//! its dense MLP, each with the shape config.json gives it. Checked on every read next to the
//! MoE blocks ([`crate::moe_block`]): a key that is missing, of another shape, or that the
//! family does not have is an error naming the file or checkpoint, the key, the expected shape
//! with its dims and the config.json fields it came from. The names are the same on the HF and
//! the native side (the converter passes these tensors through).
//!
//! The rules are transformers 5.23's modules (`modeling_qwen3_moe.py`, `modeling_mixtral.py`,
//! `modeling_gpt_oss.py`, `modeling_deepseek_v3.py`, `modeling_glm4_moe.py`,
//! `modeling_qwen3_next.py`, `modeling_qwen3_5_moe.py`, `modeling_qwen3_vl_moe.py`), checked
//! against the key sets transformers writes for each family under config variants
//! (`conformance/fixtures/key_sets.json`, from `generate_key_sets.py`):
//! - norms `input_layernorm` / `post_attention_layernorm` `[H]`; `embed_tokens` `[V, H]`, `norm`
//!   `[H]` under the text model; `lm_head.weight` `[V, H]`, optional when `tie_word_embeddings`
//!   (save_pretrained then drops it).
//! - GQA attention: `q_proj` `[nh*d, H]` (`[2*nh*d, H]` with the output gate of Qwen3-Next /
//!   Qwen3.5), `k_proj` / `v_proj` `[kv*d, H]`, `o_proj` `[H, nh*d]`; biases `[rows]` when
//!   `attention_bias` (GLM-4.5: on q/k/v only; GPT-OSS: always, plus `sinks` `[nh]`); `q_norm` /
//!   `k_norm` `[d]` for the Qwen3 families and GLM-4.5 with `use_qk_norm`. `d` is `head_dim`,
//!   else `H / nh`; `kv` is `num_key_value_heads`, else `nh`.
//! - DeepSeek-V3 MLA: `q_a_proj` `[r, H]` (+bias), `q_a_layernorm` `[r]`, `q_b_proj`
//!   `[nh*(dn+dr), r]`, or `q_proj` `[nh*(dn+dr), H]` when `q_lora_rank` is null;
//!   `kv_a_proj_with_mqa` `[c+dr, H]` (+bias), `kv_a_layernorm` `[c]`, `kv_b_proj`
//!   `[nh*(dn+dv), c]`, `o_proj` `[H, nh*dv]` (+bias), with r = `q_lora_rank`, c =
//!   `kv_lora_rank`, dn / dr / dv = `qk_nope_head_dim` / `qk_rope_head_dim` / `v_head_dim`.
//! - Qwen3-Next / Qwen3.5 linear-attention layers (`layer_types`, else every
//!   `full_attention_interval`-th layer is full attention): with nk / dk / nv / dv the
//!   `linear_num_key_heads` / `linear_key_head_dim` / `linear_num_value_heads` /
//!   `linear_value_head_dim` and K = `linear_conv_kernel_dim`: `conv1d.weight`
//!   `[2*nk*dk+nv*dv, 1, K]`, `dt_bias` / `A_log` `[nv]`, `norm.weight` `[dv]`, `out_proj`
//!   `[H, nv*dv]`, and Qwen3-Next's `in_proj_qkvz` `[2*nk*dk+2*nv*dv, H]`, `in_proj_ba`
//!   `[2*nv, H]`, or Qwen3.5's `in_proj_qkv` `[2*nk*dk+nv*dv, H]`, `in_proj_z` `[nv*dv, H]`,
//!   `in_proj_b` / `in_proj_a` `[nv, H]`.
//! - Dense layers (not MoE by [`crate::family::FamilyConfig::is_moe_layer`]): `mlp.gate_proj` /
//!   `mlp.up_proj` `[Id, H]`, `mlp.down_proj` `[H, Id]`, Id = `intermediate_size`.
//! - DeepSeek-V3 / GLM-4.5 multi-token-prediction layers (past `num_hidden_layers`, as the
//!   published checkpoints hold them): a full decoder layer plus `enorm` / `hnorm` /
//!   `shared_head.norm` `[H]`, `eh_proj` `[H, 2H]`, and optionally their own `embed_tokens` /
//!   `shared_head.head` `[V, H]`.
//! - Step3.5 (published layout; transformers' `Step3p7Attention`): `q/k/v/o_proj` with their
//!   rows free (head counts vary per layer), optional `q_norm` / `k_norm` `[d]` and `g_proj`.
//!
//! Modules this crate does not model pass through unchecked and are named here: the Qwen3-VL
//! vision tower (`model.visual.*`) and the Qwen3-Next / Qwen3.5 MTP head (`mtp.*`, which
//! transformers ignores on load).

use crate::adapter_layout::{AdapterLayout, Side};
use crate::checkpoint::HfCheckpoint;
use crate::error::{AdapterError, Result};
use crate::family::{get_usize, MAX_DIM};
use crate::moe_block::block_tensors;
use serde_json::Value;
use std::collections::BTreeMap;

/// A dim of any size (Step3.5's per-layer head counts).
pub const ANY: usize = usize::MAX;

/// One expected key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRule {
    /// The full key, e.g. `model.layers.0.self_attn.q_proj.weight`.
    pub key: String,
    /// Expected shape; [`ANY`] where any size fits.
    pub shape: Vec<usize>,
    /// The dims by name, e.g. `[nh*d, H]`.
    pub dims: &'static str,
    /// Whether the key must be present.
    pub required: bool,
}

/// The non-MoE key set of a model.
#[derive(Debug, Clone, Default)]
pub struct ModelKeys {
    /// Every expected key.
    pub rules: Vec<KeyRule>,
    /// Key prefixes passed through unchecked (modules outside this crate's scope).
    pub passthrough: Vec<&'static str>,
}

/// The config.json numbers of the attention and the rest (text config of a VL model).
struct Fields<'a> {
    cfg: &'a Value,
    mt: &'static str,
}

impl Fields<'_> {
    fn opt(&self, f: &str) -> Result<Option<usize>> {
        match get_usize(self.cfg, f, self.mt)? {
            Some(x) if x > MAX_DIM => Err(AdapterError::Config(format!(
                "config.json: field '{f}' = {x} is absurd (more than {MAX_DIM}) ({})",
                self.mt
            ))),
            v => Ok(v),
        }
    }
    fn need(&self, f: &str) -> Result<usize> {
        self.opt(f)?.ok_or_else(|| {
            AdapterError::Config(format!("config.json: missing field '{f}' ({})", self.mt))
        })
    }
    fn flag(&self, f: &str) -> Result<Option<bool>> {
        match self.cfg.get(f) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(AdapterError::Config(format!(
                "config.json: field '{f}' is {v}, not a boolean ({})",
                self.mt
            ))),
        }
    }
    /// `a * b`, an error naming `what` when it passes [`MAX_DIM`].
    fn mul(&self, a: usize, b: usize, what: &str) -> Result<usize> {
        a.checked_mul(b).filter(|&p| p <= MAX_DIM).ok_or_else(|| {
            AdapterError::Config(format!(
                "config.json: {what} = {a} x {b} is absurd (more than {MAX_DIM}) ({})",
                self.mt
            ))
        })
    }
}

/// Rules of one layer, built with the layer's key prefix.
struct Layer<'r> {
    p: String,
    rules: &'r mut Vec<KeyRule>,
}

impl Layer<'_> {
    fn add(&mut self, rest: &str, shape: Vec<usize>, dims: &'static str, required: bool) {
        self.rules.push(KeyRule {
            key: format!("{}.{rest}", self.p),
            shape,
            dims,
            required,
        });
    }
    /// `{name}.weight` `[rows, cols]` and, when `bias`, `{name}.bias` `[rows]`.
    fn linear(&mut self, name: &str, rows: usize, cols: usize, dims: &'static str, bias: bool) {
        self.add(&format!("{name}.weight"), vec![rows, cols], dims, true);
        if bias {
            self.add(&format!("{name}.bias"), vec![rows], "[rows]", true);
        }
    }
}

/// The non-MoE key set of `a`'s model under `root` (the checkpoint's config.json).
pub fn expected(a: &dyn AdapterLayout, root: &Value) -> Result<ModelKeys> {
    let mt = a.spec().model_type;
    let cfg = match root.get("text_config") {
        Some(t @ Value::Object(_)) if root.get("hidden_size").is_none() => t,
        _ => root,
    };
    let f = Fields { cfg, mt };
    let c = a.config();
    let h = c.hidden_size;
    let v = f.need("vocab_size")?;
    let prefix = a.prefix();
    let text = prefix.strip_suffix(".layers").unwrap_or("model");
    let tied = match root.get("tie_word_embeddings") {
        None | Some(Value::Null) => true,
        Some(Value::Bool(b)) => *b,
        Some(x) => {
            return Err(AdapterError::Config(format!(
                "config.json: field 'tie_word_embeddings' is {x}, not a boolean ({mt})"
            )))
        }
    };
    let mut rules = vec![
        KeyRule {
            key: format!("{text}.embed_tokens.weight"),
            shape: vec![v, h],
            dims: "[V, H]",
            required: true,
        },
        KeyRule {
            key: format!("{text}.norm.weight"),
            shape: vec![h],
            dims: "[H]",
            required: true,
        },
        KeyRule {
            key: "lm_head.weight".into(),
            shape: vec![v, h],
            dims: "[V, H]",
            required: !tied,
        },
    ];
    let layer_types = linear_layers(&f, c.num_hidden_layers)?;
    let dense = f.opt("intermediate_size")?;
    for l in 0..c.num_hidden_layers + c.mtp_layers {
        let mut ly = Layer {
            p: format!("{prefix}.{l}"),
            rules: &mut rules,
        };
        ly.add("input_layernorm.weight", vec![h], "[H]", true);
        ly.add("post_attention_layernorm.weight", vec![h], "[H]", true);
        if layer_types.get(l).copied().unwrap_or(false) {
            linear_attention(&f, &mut ly, h)?;
        } else {
            attention(&f, &mut ly, h)?;
        }
        if !c.is_moe_layer(l) {
            let id = dense.ok_or_else(|| {
                AdapterError::Config(format!(
                    "config.json: missing field 'intermediate_size' (layer {l} is dense) ({mt})"
                ))
            })?;
            ly.linear("mlp.gate_proj", id, h, "[Id, H]", false);
            ly.linear("mlp.up_proj", id, h, "[Id, H]", false);
            ly.linear("mlp.down_proj", h, id, "[H, Id]", false);
        }
        if l >= c.num_hidden_layers {
            for n in ["enorm", "hnorm", "shared_head.norm"] {
                ly.add(&format!("{n}.weight"), vec![h], "[H]", true);
            }
            ly.add("eh_proj.weight", vec![h, 2 * h], "[H, 2H]", true);
            ly.add("embed_tokens.weight", vec![v, h], "[V, H]", false);
            ly.add("shared_head.head.weight", vec![v, h], "[V, H]", false);
        }
    }
    let passthrough = match mt {
        "qwen3_vl_moe" => vec!["model.visual."],
        "qwen3_next" | "qwen3_5_moe" | "qwen3_5_moe_text" => vec!["mtp."],
        _ => Vec::new(),
    };
    Ok(ModelKeys { rules, passthrough })
}

/// Which of the first `n` layers are linear attention (Qwen3-Next / Qwen3.5; none elsewhere).
fn linear_layers(f: &Fields, n: usize) -> Result<Vec<bool>> {
    if !matches!(f.mt, "qwen3_next" | "qwen3_5_moe" | "qwen3_5_moe_text") {
        return Ok(Vec::new());
    }
    match f.cfg.get("layer_types") {
        None | Some(Value::Null) => {
            let every = f.opt("full_attention_interval")?.unwrap_or(4).max(1);
            Ok((0..n).map(|i| (i + 1) % every != 0).collect())
        }
        Some(Value::Array(a)) if a.len() == n => a
            .iter()
            .map(|t| match t.as_str() {
                Some("linear_attention") => Ok(true),
                Some("full_attention") => Ok(false),
                _ => Err(AdapterError::Config(format!(
                    "config.json: layer_types holds {t}, not \"linear_attention\" or \"full_attention\" ({})",
                    f.mt
                ))),
            })
            .collect(),
        Some(x) => Err(AdapterError::Config(format!(
            "config.json: field 'layer_types' is {x}, not a list of {n} layer types (num_hidden_layers) ({})",
            f.mt
        ))),
    }
}

/// Softmax-attention keys of one layer.
fn attention(f: &Fields, ly: &mut Layer, h: usize) -> Result<()> {
    let mt = f.mt;
    let nh = f.need("num_attention_heads")?;
    if mt == "deepseek_v3" {
        return mla(f, ly, h, nh);
    }
    let kv = match mt {
        "step3p5" => f.opt("num_attention_groups")?,
        _ => f.opt("num_key_value_heads")?,
    }
    .unwrap_or(nh);
    let d = match f.opt("head_dim")? {
        Some(d) => d,
        None if nh == 0 => 0,
        None => h / nh,
    };
    let bias = f.flag("attention_bias")?.unwrap_or(false);
    let q = f.mul(nh, d, "num_attention_heads x head_dim")?;
    let kvd = f.mul(kv, d, "num_key_value_heads x head_dim")?;
    match mt {
        "step3p5" => {
            ly.linear("self_attn.q_proj", ANY, h, "[nh*d, H]", bias);
            ly.linear("self_attn.k_proj", ANY, h, "[kv*d, H]", bias);
            ly.linear("self_attn.v_proj", ANY, h, "[kv*d, H]", bias);
            ly.linear("self_attn.o_proj", h, ANY, "[H, nh*d]", bias);
            ly.add("self_attn.q_norm.weight", vec![d], "[d]", false);
            ly.add("self_attn.k_norm.weight", vec![d], "[d]", false);
            ly.add("self_attn.g_proj.weight", vec![ANY, h], "[nh, H]", false);
            return Ok(());
        }
        "qwen3_next" | "qwen3_5_moe" | "qwen3_5_moe_text" => {
            ly.linear("self_attn.q_proj", 2 * q, h, "[2*nh*d, H]", bias)
        }
        _ => ly.linear(
            "self_attn.q_proj",
            q,
            h,
            "[nh*d, H]",
            bias || mt == "gpt_oss",
        ),
    }
    let kv_bias = bias || mt == "gpt_oss";
    ly.linear("self_attn.k_proj", kvd, h, "[kv*d, H]", kv_bias);
    ly.linear("self_attn.v_proj", kvd, h, "[kv*d, H]", kv_bias);
    let o_bias = (bias && mt != "glm4_moe") || mt == "gpt_oss";
    ly.linear("self_attn.o_proj", h, q, "[H, nh*d]", o_bias);
    let qk_norm = match mt {
        "mixtral" | "gpt_oss" => false,
        "glm4_moe" => f.flag("use_qk_norm")?.unwrap_or(false),
        _ => true,
    };
    if qk_norm {
        ly.add("self_attn.q_norm.weight", vec![d], "[d]", true);
        ly.add("self_attn.k_norm.weight", vec![d], "[d]", true);
    }
    if mt == "gpt_oss" {
        ly.add("self_attn.sinks", vec![nh], "[nh]", true);
    }
    Ok(())
}

/// DeepSeek-V3 multi-head latent attention.
fn mla(f: &Fields, ly: &mut Layer, h: usize, nh: usize) -> Result<()> {
    let bias = f.flag("attention_bias")?.unwrap_or(false);
    let (dn, dr, dv) = (
        f.need("qk_nope_head_dim")?,
        f.need("qk_rope_head_dim")?,
        f.need("v_head_dim")?,
    );
    let c = f.need("kv_lora_rank")?;
    let q = f.mul(
        nh,
        dn + dr,
        "num_attention_heads x (qk_nope_head_dim + qk_rope_head_dim)",
    )?;
    match f.opt("q_lora_rank")? {
        Some(r) => {
            ly.linear("self_attn.q_a_proj", r, h, "[r, H]", bias);
            ly.add("self_attn.q_a_layernorm.weight", vec![r], "[r]", true);
            ly.linear("self_attn.q_b_proj", q, r, "[nh*(dn+dr), r]", false);
        }
        None => ly.linear("self_attn.q_proj", q, h, "[nh*(dn+dr), H]", false),
    }
    ly.linear("self_attn.kv_a_proj_with_mqa", c + dr, h, "[c+dr, H]", bias);
    ly.add("self_attn.kv_a_layernorm.weight", vec![c], "[c]", true);
    let kvb = f.mul(
        nh,
        dn + dv,
        "num_attention_heads x (qk_nope_head_dim + v_head_dim)",
    )?;
    ly.linear("self_attn.kv_b_proj", kvb, c, "[nh*(dn+dv), c]", false);
    let o = f.mul(nh, dv, "num_attention_heads x v_head_dim")?;
    ly.linear("self_attn.o_proj", h, o, "[H, nh*dv]", bias);
    Ok(())
}

/// Qwen3-Next / Qwen3.5 gated-delta-net (linear attention) keys of one layer.
fn linear_attention(f: &Fields, ly: &mut Layer, h: usize) -> Result<()> {
    let (nk, dk) = (
        f.need("linear_num_key_heads")?,
        f.need("linear_key_head_dim")?,
    );
    let (nv, dv) = (
        f.need("linear_num_value_heads")?,
        f.need("linear_value_head_dim")?,
    );
    let k = f.need("linear_conv_kernel_dim")?;
    let key = f.mul(nk, dk, "linear_num_key_heads x linear_key_head_dim")?;
    let val = f.mul(nv, dv, "linear_num_value_heads x linear_value_head_dim")?;
    let conv = 2 * key + val;
    ly.add(
        "linear_attn.conv1d.weight",
        vec![conv, 1, k],
        "[2*nk*dk+nv*dv, 1, K]",
        true,
    );
    ly.add("linear_attn.dt_bias", vec![nv], "[nv]", true);
    ly.add("linear_attn.A_log", vec![nv], "[nv]", true);
    ly.add("linear_attn.norm.weight", vec![dv], "[dv]", true);
    ly.linear("linear_attn.out_proj", h, val, "[H, nv*dv]", false);
    if f.mt == "qwen3_next" {
        ly.linear(
            "linear_attn.in_proj_qkvz",
            conv + val,
            h,
            "[2*nk*dk+2*nv*dv, H]",
            false,
        );
        ly.linear("linear_attn.in_proj_ba", 2 * nv, h, "[2*nv, H]", false);
    } else {
        ly.linear(
            "linear_attn.in_proj_qkv",
            conv,
            h,
            "[2*nk*dk+nv*dv, H]",
            false,
        );
        ly.linear("linear_attn.in_proj_z", val, h, "[nv*dv, H]", false);
        ly.linear("linear_attn.in_proj_b", nv, h, "[nv, H]", false);
        ly.linear("linear_attn.in_proj_a", nv, h, "[nv, H]", false);
    }
    Ok(())
}

/// Whether `key` belongs to the MoE block of a MoE layer (checked by [`crate::moe_block`] and
/// the expert groups): under the MoE module `module` of a layer of `block` (keys after the
/// layer prefix `lp`), or one of the block's tensors.
fn in_moe_block(
    a: &dyn AdapterLayout,
    side: Side,
    (lp, module): (&str, &str),
    block: &BTreeMap<usize, Vec<String>>,
    key: &str,
) -> bool {
    let Some((l, rest)) = key
        .strip_prefix(lp)
        .and_then(|r| r.split_once('.'))
        .and_then(|(l, rest)| Some((l.parse::<usize>().ok()?, rest)))
    else {
        return false;
    };
    let Some(names) = block.get(&l) else {
        return false;
    };
    rest.strip_prefix(module)
        .is_some_and(|r| r.starts_with('.'))
        || names.iter().any(|n| n == key)
        || a.is_expert_key(key, side)
}

/// Checks every key of `ckpt` (named as `side` says) outside the MoE blocks against
/// [`expected`]: each required key present, each key of its shape, no key the model does not
/// have. Errors name the checkpoint (or the tensor's file), the key, the expected shape with its
/// dims and what was found.
pub fn check(a: &dyn AdapterLayout, ckpt: &HfCheckpoint, side: Side) -> Result<()> {
    let dir = ckpt.dir().display();
    let mt = a.spec().model_type;
    let want = expected(a, ckpt.config())?;
    let block: BTreeMap<usize, Vec<String>> = a
        .config()
        .moe_layers()
        .into_iter()
        .map(|l| {
            let names = block_tensors(a, l)
                .into_iter()
                .map(|t| match side {
                    Side::Hf => t.disk,
                    Side::Native => t.native,
                })
                .collect();
            (l, names)
        })
        .collect();
    let by_key: BTreeMap<&str, &KeyRule> = want.rules.iter().map(|r| (r.key.as_str(), r)).collect();
    let lp = format!("{}.", a.prefix());
    let module = match side {
        Side::Hf => a.layout_choice().moe_module,
        Side::Native => "mlp",
    };
    let mut unknown = Vec::new();
    for k in ckpt.keys() {
        if want.passthrough.iter().any(|p| k.starts_with(p))
            || in_moe_block(a, side, (&lp, module), &block, k)
        {
            continue;
        }
        let Some(r) = by_key.get(k) else {
            unknown.push(k);
            continue;
        };
        let info = ckpt.info(k)?;
        let fits = info.shape.len() == r.shape.len()
            && info
                .shape
                .iter()
                .zip(&r.shape)
                .all(|(&s, &w)| w == ANY || s == w);
        if !fits {
            let shown: Vec<String> = r
                .shape
                .iter()
                .map(|&w| if w == ANY { "_".into() } else { w.to_string() })
                .collect();
            return Err(AdapterError::Shape(format!(
                "{}: tensor '{k}' has shape {:?} but config.json gives [{}] {} ({mt})",
                info.file_name(),
                info.shape,
                shown.join(", "),
                r.dims
            )));
        }
    }
    if let Some(k) = unknown.first() {
        return Err(AdapterError::UnexpectedKeys(format!(
            "{dir}: unexpected key '{k}': {mt} with this config.json has no such tensor{}",
            if unknown.len() > 1 {
                format!(" ({} unexpected keys)", unknown.len())
            } else {
                String::new()
            }
        )));
    }
    let missing: Vec<&KeyRule> = want
        .rules
        .iter()
        .filter(|r| r.required && !ckpt.contains(&r.key))
        .collect();
    if let Some(r) = missing.first() {
        return Err(AdapterError::UnexpectedKeys(format!(
            "{dir}: missing '{}' ({mt} {}, from config.json){}",
            r.key,
            r.dims,
            if missing.len() > 1 {
                format!(" ({} missing keys)", missing.len())
            } else {
                String::new()
            }
        )));
    }
    Ok(())
}
