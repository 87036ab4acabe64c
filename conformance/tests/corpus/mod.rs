//! The damaged-checkpoint corpus: copies of the committed transformers-written fixtures with one
//! fault each, built at test time (shared by `conformance/tests/damaged_corpus.rs`, which runs
//! the `conformance` commands on it, and `adapters/tests/convert_corpus.rs`, which runs the
//! converter).
#![allow(dead_code)]

use serde_json::{json, Value};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// What a damaged copy is made from: which fixture, what is done to it, which commands must
/// reject it, and what the error must name.
pub struct Case {
    pub name: String,
    pub fixture: &'static str,
    pub damage: Damage,
    /// Commands that must reject it (`r`oundtrip, `g`olden, `s`harded).
    pub reject: &'static str,
    /// Text the error line must contain (a file, key or field).
    pub names: String,
}

pub enum Damage {
    /// Set a config.json field (of `text_config` when the config has one).
    Config(&'static str, Value),
    /// Replace config.json with these bytes.
    ConfigText(&'static str),
    /// Truncate model.safetensors to this many bytes.
    Truncate(u64),
    /// Rewrite model.safetensors with a tensor removed / replaced by one of another shape / added.
    Remove(&'static str),
    Reshape(&'static str, Vec<usize>),
    Add(&'static str),
    /// Put a FIFO or a directory where this file was.
    Fifo(&'static str),
    Dir(&'static str),
    /// Truncate golden.safetensors to this many bytes.
    TruncateGolden(u64),
}

pub fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let p = e.unwrap().path();
        if p.is_file() {
            std::fs::copy(&p, dst.join(p.file_name().unwrap())).unwrap();
        }
    }
}

/// Rewrites `dir/model.safetensors` with `edit` applied to its tensors (safetensors crate).
fn rewrite(
    dir: &Path,
    edit: impl FnOnce(&mut Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)>),
) {
    let p = dir.join("model.safetensors");
    let bytes = std::fs::read(&p).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut t: Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .map(|(k, v)| (k, v.dtype(), v.shape().to_vec(), v.data().to_vec()))
        .collect();
    edit(&mut t);
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = t
        .iter()
        .map(|(k, d, s, b)| {
            (
                k.clone(),
                safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap(),
            )
        })
        .collect();
    std::fs::write(&p, safetensors::serialize(views, None).unwrap()).unwrap();
}

pub fn apply(dir: &Path, d: &Damage) {
    match d {
        Damage::Config(field, v) => {
            let p = dir.join("config.json");
            let mut c: Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
            match c.get_mut("text_config") {
                Some(t) if t.get("hidden_size").is_some() => t[*field] = v.clone(),
                _ => c[*field] = v.clone(),
            }
            std::fs::write(&p, c.to_string()).unwrap();
        }
        Damage::ConfigText(t) => std::fs::write(dir.join("config.json"), t).unwrap(),
        Damage::Truncate(n) => {
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(dir.join("model.safetensors"))
                .unwrap();
            f.set_len(*n).unwrap();
        }
        Damage::Remove(k) => rewrite(dir, |t| {
            let n = t.len();
            t.retain(|x| x.0 != *k);
            assert_eq!(t.len(), n - 1, "{k}");
        }),
        Damage::Reshape(k, shape) => rewrite(dir, |t| {
            let x = t.iter_mut().find(|x| x.0 == *k).unwrap();
            let size = x.3.len() / x.2.iter().product::<usize>();
            x.2 = shape.clone();
            x.3 = vec![0; size * shape.iter().product::<usize>()];
        }),
        Damage::Add(k) => rewrite(dir, |t| {
            let mut x = t[0].clone();
            x.0 = k.to_string();
            t.push(x);
        }),
        Damage::Fifo(f) => {
            std::fs::remove_file(dir.join(f)).unwrap();
            let ok = Command::new("mkfifo").arg(dir.join(f)).status().unwrap();
            assert!(ok.success());
        }
        Damage::Dir(f) => {
            std::fs::remove_file(dir.join(f)).unwrap();
            std::fs::create_dir(dir.join(f)).unwrap();
        }
        Damage::TruncateGolden(n) => {
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(dir.join("golden.safetensors"))
                .unwrap();
            f.set_len(*n).unwrap();
        }
    }
}

pub fn corpus() -> Vec<Case> {
    let mut v = Vec::new();
    let mut add =
        |fixture: &'static str, name: &str, damage: Damage, reject: &'static str, names: &str| {
            v.push(Case {
                name: format!("{fixture}: {name}"),
                fixture,
                damage,
                reject,
                names: names.to_string(),
            })
        };
    for (fixture, experts) in [
        ("qwen3_moe_tiny", "num_local_experts"),
        ("gpt_oss_tiny", "num_local_experts"),
        ("deepseek_v3_tiny", "n_routed_experts"),
        ("qwen3_vl_moe_tiny", "num_experts"),
    ] {
        for field in [
            experts,
            "hidden_size",
            "moe_intermediate_size",
            "num_hidden_layers",
        ] {
            if fixture == "gpt_oss_tiny" && field == "moe_intermediate_size" {
                continue; // GPT-OSS reads intermediate_size
            }
            for value in [
                json!(u64::MAX),
                json!(1u64 << 32),
                json!(1_000_000),
                json!(0),
                json!(-1),
                json!("8"),
                json!(2.5),
            ] {
                if value == json!(0) && field == experts {
                    continue; // E = 0: a model without MoE layers; its checkpoint has unexpected keys
                }
                add(
                    fixture,
                    &format!("{field} = {value}"),
                    Damage::Config(field, value),
                    "rgs",
                    "config.json",
                );
            }
        }
        add(
            fixture,
            "config.json a FIFO",
            Damage::Fifo("config.json"),
            "rgs",
            "config.json",
        );
        add(
            fixture,
            "config.json a directory",
            Damage::Dir("config.json"),
            "rgs",
            "config.json",
        );
        add(
            fixture,
            "model.safetensors a FIFO",
            Damage::Fifo("model.safetensors"),
            "rgs",
            "model.safetensors",
        );
        add(
            fixture,
            "model.safetensors a directory",
            Damage::Dir("model.safetensors"),
            "rgs",
            "model.safetensors",
        );
        for n in [0u64, 7, 8, 100, 5000] {
            add(
                fixture,
                &format!("model.safetensors cut at {n} bytes"),
                Damage::Truncate(n),
                "rgs",
                "model.safetensors",
            );
        }
        add(
            fixture,
            "golden.safetensors a FIFO",
            Damage::Fifo("golden.safetensors"),
            "g",
            "golden.safetensors",
        );
        add(
            fixture,
            "golden.safetensors cut at 100 bytes",
            Damage::TruncateGolden(100),
            "g",
            "golden.safetensors",
        );
    }
    add(
        "qwen3_moe_tiny",
        "config.json not JSON",
        Damage::ConfigText("{\"model_type\": "),
        "rgs",
        "config.json",
    );
    add(
        "qwen3_moe_tiny",
        "config.json repeats a key",
        Damage::ConfigText("{\"model_type\": \"qwen3_moe\", \"model_type\": \"mixtral\"}"),
        "rgs",
        "duplicate key 'model_type'",
    );
    add(
        "qwen3_moe_tiny",
        "unknown model_type",
        Damage::Config("model_type", json!("llama")),
        "rgs",
        "llama",
    );
    add(
        "qwen3_moe_tiny",
        "num_experts_per_tok 0",
        Damage::Config("num_experts_per_tok", json!(0)),
        "g",
        "num_experts_per_tok",
    );
    add(
        "qwen3_moe_tiny",
        "num_experts_per_tok 9 of 8",
        Damage::Config("num_experts_per_tok", json!(9)),
        "g",
        "num_experts_per_tok",
    );
    add(
        "qwen3_moe_tiny",
        "router missing",
        Damage::Remove("model.layers.1.mlp.gate.weight"),
        "rgs",
        "model.layers.1.mlp.gate.weight",
    );
    add(
        "qwen3_moe_tiny",
        "router misshapen",
        Damage::Reshape("model.layers.0.mlp.gate.weight", vec![8, 63]),
        "rgs",
        "model.layers.0.mlp.gate.weight",
    );
    add(
        "qwen3_moe_tiny",
        "an expert missing",
        Damage::Remove("model.layers.0.mlp.experts.3.up_proj.weight"),
        "rgs",
        "model.layers.0.mlp.experts.3.up_proj.weight",
    );
    add(
        "qwen3_moe_tiny",
        "an expert misshapen",
        Damage::Reshape(
            "model.layers.1.mlp.experts.0.down_proj.weight",
            vec![64, 31],
        ),
        "rgs",
        "model.layers.1.mlp.experts.0.down_proj.weight",
    );
    add(
        "qwen3_moe_tiny",
        "an extra expert",
        Damage::Add("model.layers.0.mlp.experts.8.up_proj.weight"),
        "rgs",
        "model.layers.0.mlp.experts.8.up_proj.weight",
    );
    add(
        "qwen3_moe_tiny",
        "a stray key in the MoE block",
        Damage::Add("model.layers.0.mlp.gate.bias"),
        "rgs",
        "model.layers.0.mlp.gate.bias",
    );
    add(
        "qwen3_moe_tiny",
        "a layer past num_hidden_layers",
        Damage::Add("model.layers.5.mlp.gate.weight"),
        "rgs",
        "model.layers.5.",
    );
    add(
        "deepseek_v3_tiny",
        "e_score_correction_bias missing",
        Damage::Remove("model.layers.1.mlp.gate.e_score_correction_bias"),
        "rgs",
        "model.layers.1.mlp.gate.e_score_correction_bias",
    );
    add(
        "deepseek_v3_tiny",
        "shared expert misshapen",
        Damage::Reshape(
            "model.layers.1.mlp.shared_experts.up_proj.weight",
            vec![31, 64],
        ),
        "rgs",
        "model.layers.1.mlp.shared_experts.up_proj.weight",
    );
    add(
        "qwen3_next_tiny",
        "shared_expert_gate missing",
        Damage::Remove("model.layers.1.mlp.shared_expert_gate.weight"),
        "rgs",
        "model.layers.1.mlp.shared_expert_gate.weight",
    );
    add(
        "gpt_oss_tiny",
        "router bias missing",
        Damage::Remove("model.layers.0.mlp.router.bias"),
        "rgs",
        "model.layers.0.mlp.router.bias",
    );
    add(
        "gpt_oss_tiny",
        "fused experts misshapen",
        Damage::Reshape("model.layers.1.mlp.experts.down_proj", vec![8, 32, 63]),
        "rgs",
        "model.layers.1.mlp.experts.down_proj",
    );
    // outside the MoE blocks: attention, norms, dense layers, embeddings, stray keys
    for (fixture, name, damage, names) in [
        (
            "qwen3_moe_tiny",
            "an attention tensor missing",
            Damage::Remove("model.layers.1.self_attn.k_proj.weight"),
            "model.layers.1.self_attn.k_proj.weight",
        ),
        (
            "qwen3_moe_tiny",
            "a norm misshapen",
            Damage::Reshape("model.layers.0.input_layernorm.weight", vec![63]),
            "model.layers.0.input_layernorm.weight",
        ),
        (
            "qwen3_moe_tiny",
            "q_norm misshapen",
            Damage::Reshape("model.layers.1.self_attn.q_norm.weight", vec![17]),
            "model.layers.1.self_attn.q_norm.weight",
        ),
        (
            "qwen3_moe_tiny",
            "a stray attention key",
            Damage::Add("model.layers.0.self_attn.bogus.weight"),
            "model.layers.0.self_attn.bogus.weight",
        ),
        (
            "qwen3_moe_tiny",
            "a stray top-level key",
            Damage::Add("model.bogus"),
            "model.bogus",
        ),
        (
            "qwen3_moe_tiny",
            "lm_head missing (not tied)",
            Damage::Remove("lm_head.weight"),
            "lm_head.weight",
        ),
        (
            "qwen3_moe_tiny",
            "final norm missing",
            Damage::Remove("model.norm.weight"),
            "model.norm.weight",
        ),
        (
            "deepseek_v3_tiny",
            "a dense layer's MLP missing",
            Damage::Remove("model.layers.0.mlp.down_proj.weight"),
            "model.layers.0.mlp.down_proj.weight",
        ),
        (
            "deepseek_v3_tiny",
            "a dense layer's MLP misshapen",
            Damage::Reshape("model.layers.0.mlp.gate_proj.weight", vec![95, 64]),
            "model.layers.0.mlp.gate_proj.weight",
        ),
        (
            "deepseek_v3_tiny",
            "MLA kv_b_proj misshapen",
            Damage::Reshape("model.layers.1.self_attn.kv_b_proj.weight", vec![95, 16]),
            "model.layers.1.self_attn.kv_b_proj.weight",
        ),
        (
            "gpt_oss_tiny",
            "attention sinks missing",
            Damage::Remove("model.layers.1.self_attn.sinks"),
            "model.layers.1.self_attn.sinks",
        ),
        (
            "gpt_oss_tiny",
            "an attention bias misshapen",
            Damage::Reshape("model.layers.0.self_attn.o_proj.bias", vec![63]),
            "model.layers.0.self_attn.o_proj.bias",
        ),
        (
            "qwen3_vl_moe_tiny",
            "embed_tokens misshapen",
            Damage::Reshape("model.language_model.embed_tokens.weight", vec![127, 64]),
            "model.language_model.embed_tokens.weight",
        ),
        (
            "qwen3_vl_moe_tiny",
            "embed_tokens at the text-only name",
            Damage::Add("model.embed_tokens.weight"),
            "model.embed_tokens.weight",
        ),
        (
            "mixtral_tiny",
            "q_norm that mixtral has not",
            Damage::Add("model.layers.0.self_attn.q_norm.weight"),
            "model.layers.0.self_attn.q_norm.weight",
        ),
        (
            "glm4_moe_tiny",
            "a dense MLP in a MoE layer",
            Damage::Add("model.layers.1.mlp.gate_proj.weight"),
            "model.layers.1.mlp.gate_proj.weight",
        ),
    ] {
        add(fixture, name, damage, "rgs", names);
    }
    for (field, value) in [
        ("num_attention_heads", json!(u64::MAX)),
        ("head_dim", json!(-1)),
        ("vocab_size", json!(1_000_000)),
        ("num_key_value_heads", json!("2")),
    ] {
        add(
            "qwen3_moe_tiny",
            &format!("{field} = {value}"),
            Damage::Config(field, value),
            "rgs",
            "config.json",
        );
    }
    v
}

/// Runs `cmd` (stdout discarded) until it exits or `bound` passes; returns (exit code, stderr,
/// seconds). Panics on a hang, naming `what`, after killing the child.
pub fn run_bounded(cmd: &mut Command, bound: Duration, what: &str) -> (Option<i32>, String, f64) {
    let t0 = Instant::now();
    let mut child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let mut err = String::new();
            use std::io::Read;
            child
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut err)
                .unwrap();
            return (status.code(), err, t0.elapsed().as_secs_f64());
        }
        if t0.elapsed() > bound {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what}: no answer within {bound:?} (a hang)");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}
