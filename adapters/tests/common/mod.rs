//! Test helpers: tiny random Qwen3-MoE checkpoints written with the safetensors crate directly
//! (independent of this crate's writer), and raw safetensors byte crafting.
#![allow(dead_code)]

use adapters::{Dtype, HfCheckpoint, HostTensor};
use serde_json::json;
use std::collections::BTreeMap;
use std::path::Path;

/// xorshift64* bytes: deterministic "random" data.
pub fn rand_bytes(seed: u64, n: usize) -> Vec<u8> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s >> 12;
            s ^= s << 25;
            s ^= s >> 27;
            (s.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 56) as u8
        })
        .collect()
}

pub fn rand_tensor(seed: u64, dtype: Dtype, shape: &[usize]) -> HostTensor {
    let n: usize = shape.iter().product::<usize>() * (dtype.bitsize() / 8);
    HostTensor::new(dtype, shape.to_vec(), rand_bytes(seed, n)).unwrap()
}

#[derive(Clone, Copy, Debug)]
pub struct Dims {
    pub layers: usize,
    pub e: usize,
    pub h: usize,
    pub i: usize,
}

pub const SMALL: Dims = Dims {
    layers: 3,
    e: 4,
    h: 6,
    i: 5,
};

/// config.json for the tiny model: decoder_sparse_step 1, layer 0 mlp-only (dense).
pub fn config(d: Dims, model_type: &str) -> serde_json::Value {
    json!({
        "model_type": model_type,
        "architectures": ["Qwen3MoeForCausalLM"],
        "num_hidden_layers": d.layers,
        "num_experts": d.e,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": d.i,
        "hidden_size": d.h,
        "intermediate_size": 7,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [0],
        "vocab_size": 11,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": 3,
        "tie_word_embeddings": true,
    })
}

/// HF tensors of the tiny model in the given layout (fused = transformers v5 on-disk fused form).
pub fn hf_tensors(d: Dims, dtype: Dtype, fused: bool) -> BTreeMap<String, HostTensor> {
    let mut m = BTreeMap::new();
    let mut seed = 1u64;
    let mut add = |m: &mut BTreeMap<String, HostTensor>, k: String, shape: &[usize]| {
        seed += 1;
        m.insert(k, rand_tensor(seed, dtype, shape));
    };
    add(&mut m, "model.embed_tokens.weight".into(), &[11, d.h]);
    add(&mut m, "model.norm.weight".into(), &[d.h]);
    for l in 0..d.layers {
        let p = format!("model.layers.{l}");
        // Qwen3-MoE attention with nh = 2, kv = 1, d = 3 (config()).
        add(&mut m, format!("{p}.self_attn.q_proj.weight"), &[6, d.h]);
        add(&mut m, format!("{p}.self_attn.k_proj.weight"), &[3, d.h]);
        add(&mut m, format!("{p}.self_attn.v_proj.weight"), &[3, d.h]);
        add(&mut m, format!("{p}.self_attn.o_proj.weight"), &[d.h, 6]);
        add(&mut m, format!("{p}.self_attn.q_norm.weight"), &[3]);
        add(&mut m, format!("{p}.self_attn.k_norm.weight"), &[3]);
        add(&mut m, format!("{p}.input_layernorm.weight"), &[d.h]);
        add(
            &mut m,
            format!("{p}.post_attention_layernorm.weight"),
            &[d.h],
        );
        if l == 0 {
            add(&mut m, format!("{p}.mlp.gate_proj.weight"), &[7, d.h]);
            add(&mut m, format!("{p}.mlp.up_proj.weight"), &[7, d.h]);
            add(&mut m, format!("{p}.mlp.down_proj.weight"), &[d.h, 7]);
            continue;
        }
        add(&mut m, format!("{p}.mlp.gate.weight"), &[d.e, d.h]);
        if fused {
            add(
                &mut m,
                format!("{p}.mlp.experts.gate_up_proj"),
                &[d.e, 2 * d.i, d.h],
            );
            add(
                &mut m,
                format!("{p}.mlp.experts.down_proj"),
                &[d.e, d.h, d.i],
            );
        } else {
            for e in 0..d.e {
                add(
                    &mut m,
                    format!("{p}.mlp.experts.{e}.gate_proj.weight"),
                    &[d.i, d.h],
                );
                add(
                    &mut m,
                    format!("{p}.mlp.experts.{e}.up_proj.weight"),
                    &[d.i, d.h],
                );
                add(
                    &mut m,
                    format!("{p}.mlp.experts.{e}.down_proj.weight"),
                    &[d.h, d.i],
                );
            }
        }
    }
    m
}

fn st_bytes(tensors: &[(&String, &HostTensor)]) -> Vec<u8> {
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .map(|(k, t)| {
            (
                (*k).clone(),
                safetensors::tensor::TensorView::new(t.dtype, t.shape.clone(), &t.data).unwrap(),
            )
        })
        .collect();
    safetensors::serialize(views, None).unwrap()
}

/// Writes config.json + model.safetensors, or (nshards > 1) round-robin shards + index.json.
pub fn write_ckpt(
    dir: &Path,
    cfg: &serde_json::Value,
    tensors: &BTreeMap<String, HostTensor>,
    nshards: usize,
) {
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    if nshards <= 1 {
        let all: Vec<_> = tensors.iter().collect();
        std::fs::write(dir.join("model.safetensors"), st_bytes(&all)).unwrap();
        return;
    }
    let mut wm = serde_json::Map::new();
    for s in 0..nshards {
        let name = format!("model-{:05}-of-{:05}.safetensors", s + 1, nshards);
        let part: Vec<_> = tensors
            .iter()
            .enumerate()
            .filter(|(i, _)| i % nshards == s)
            .map(|(_, kv)| kv)
            .collect();
        for (k, _) in &part {
            wm.insert((*k).clone(), json!(name));
        }
        std::fs::write(dir.join(&name), st_bytes(&part)).unwrap();
    }
    let idx = json!({"metadata": {"total_size": 0}, "weight_map": wm});
    std::fs::write(dir.join("model.safetensors.index.json"), idx.to_string()).unwrap();
}

/// Completes a synthetic MoE checkpoint into a whole model: adds to `cfg` (its `text_config`
/// when it has one) the attention fields of a tiny model (nh = 2, kv = 1, d = 3, MLA ranks 4 /
/// 2 / 2 / 2, full attention everywhere, a dense Id = 7) where absent, and to `tensors` every
/// required tensor of `model_keys::expected` that is absent (random bf16; free dims 1). The
/// tensors already there are kept, so the MoE blocks stay as the test built them. A checkpoint
/// the adapter refuses (a test of that refusal) gets the config fields only.
pub fn complete_model(cfg: &mut serde_json::Value, tensors: &mut BTreeMap<String, HostTensor>) {
    let text = match cfg.get("text_config") {
        Some(t) if t.is_object() => cfg.get_mut("text_config").unwrap(),
        _ => &mut *cfg,
    };
    for (f, v) in [
        ("num_attention_heads", json!(2)),
        ("num_key_value_heads", json!(1)),
        ("head_dim", json!(3)),
        ("intermediate_size", json!(7)),
        ("vocab_size", json!(11)),
        ("kv_lora_rank", json!(4)),
        ("q_lora_rank", json!(4)),
        ("qk_nope_head_dim", json!(2)),
        ("qk_rope_head_dim", json!(2)),
        ("v_head_dim", json!(2)),
        ("full_attention_interval", json!(1)),
    ] {
        if text.get(f).is_none() {
            text[f] = v;
        }
    }
    let dir = tempfile::tempdir().unwrap();
    write_ckpt(dir.path(), cfg, tensors, 1);
    let ck = HfCheckpoint::open(dir.path()).unwrap();
    let Ok(a) = adapters::FamilyAdapter::from_checkpoint(&ck) else {
        return;
    };
    let want = adapters::model_keys::expected(&a, cfg).unwrap();
    for (i, r) in want.rules.iter().enumerate() {
        if r.required && !tensors.contains_key(&r.key) {
            let shape: Vec<usize> = r
                .shape
                .iter()
                .map(|&d| if d == adapters::model_keys::ANY { 1 } else { d })
                .collect();
            tensors.insert(
                r.key.clone(),
                rand_tensor(900 + i as u64, Dtype::BF16, &shape),
            );
        }
    }
}

/// 8-byte LE header length + header + data: a hand-crafted safetensors file.
pub fn raw_file(header: &str, data: &[u8]) -> Vec<u8> {
    let mut v = (header.len() as u64).to_le_bytes().to_vec();
    v.extend_from_slice(header.as_bytes());
    v.extend_from_slice(data);
    v
}

/// Element `flat` (row-major index) of a tensor, as bytes.
pub fn elem(t: &HostTensor, idx: &[usize]) -> Vec<u8> {
    assert_eq!(idx.len(), t.shape.len());
    let mut flat = 0;
    for (d, &i) in idx.iter().enumerate() {
        assert!(i < t.shape[d]);
        flat = flat * t.shape[d] + i;
    }
    let es = t.element_size();
    t.data[flat * es..(flat + 1) * es].to_vec()
}

/// The index set `a..b` (one run).
pub fn run(a: usize, b: usize) -> placement::IndexSet {
    placement::IndexSet::from_runs(std::iter::once(a..b).collect())
}

/// A committed fixture directory (conformance/fixtures/NAME).
pub fn fixture(name: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../conformance/fixtures")
        .join(name)
}

/// A copy of fixture `name` in `dir` (config.json + one model.safetensors) whose config and
/// tensors are `edit_config` and `edit` applied to the fixture's, written with the safetensors
/// crate (common::write_ckpt).
pub fn edited_copy(
    name: &str,
    dir: &Path,
    edit_config: impl FnOnce(&mut serde_json::Value),
    edit: impl FnOnce(&mut BTreeMap<String, HostTensor>),
) -> HfCheckpoint {
    let ck = HfCheckpoint::open(&fixture(name)).unwrap();
    let mut tensors: BTreeMap<String, HostTensor> = ck
        .keys()
        .into_iter()
        .map(|k| (k.to_string(), ck.tensor(k).unwrap()))
        .collect();
    edit(&mut tensors);
    let mut config = ck.config().clone();
    edit_config(&mut config);
    write_ckpt(dir, &config, &tensors, 1);
    HfCheckpoint::open(dir).unwrap()
}

/// Copies the files (not subdirectories) of `src` into `dst`, creating it.
pub fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let p = e.unwrap().path();
        if p.is_file() {
            std::fs::copy(&p, dst.join(p.file_name().unwrap())).unwrap();
        }
    }
}
