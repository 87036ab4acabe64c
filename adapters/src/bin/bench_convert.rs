//! Benchmarks (figures, never pass/fail):
//! 1. converting a synthetic Qwen3-30B-A3B-shaped checkpoint (48 layers, 128 experts, per-expert
//!    bf16 keys, H and I scaled down; default ~2 GB) HF -> native -> HF with the streaming
//!    converter, throughput in GB/s vs `cp -r` (+ `sync`, since the converter fsyncs) of the same
//!    files in the same run;
//! 2. the key-mapping pass alone for the full DeepSeek-V3 key set (61 layers, 256 experts,
//!    first_k_dense_replace 3) in milliseconds.
//!
//! `cargo run --release -p adapters --bin bench_convert -- [--dir D] [--hidden H] [--inter I]
//! [--layers L] [--experts E] [--threads N] [--keep]`

use adapters::convert::{convert, ConvertOptions, Direction};
use adapters::family::{spec_for, FamilyConfig};
use adapters::family_adapter::{FamilyAdapter, LayoutChoice};
use adapters::{DiskLayout, Dtype, HostTensor};
use serde_json::json;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

struct Args {
    dir: PathBuf,
    hidden: usize,
    inter: usize,
    layers: usize,
    experts: usize,
    threads: Option<usize>,
    keep: bool,
}

fn parse() -> Result<Args, String> {
    let mut a = Args {
        dir: std::env::temp_dir().join("adapters_bench"),
        hidden: 384,
        inter: 144,
        layers: 48,
        experts: 128,
        threads: None,
        keep: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(f) = it.next() {
        let mut val = || it.next().ok_or_else(|| format!("{f} needs a value"));
        let num = |v: String| v.parse::<usize>().map_err(|e| format!("{v}: {e}"));
        match f.as_str() {
            "--dir" => a.dir = PathBuf::from(val()?),
            "--hidden" => a.hidden = num(val()?)?,
            "--inter" => a.inter = num(val()?)?,
            "--layers" => a.layers = num(val()?)?,
            "--experts" => a.experts = num(val()?)?,
            "--threads" => a.threads = Some(num(val()?)?),
            "--keep" => a.keep = true,
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(a)
}

/// Deterministic non-zero bytes (no sparse-file shortcuts).
fn fill(seed: u64, n: usize) -> Vec<u8> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut v = Vec::with_capacity(n);
    while v.len() < n {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        v.extend_from_slice(&s.to_le_bytes());
    }
    v.truncate(n);
    v
}

fn t(seed: &mut u64, shape: &[usize]) -> HostTensor {
    *seed += 1;
    let n = shape.iter().product::<usize>() * 2;
    HostTensor {
        dtype: Dtype::BF16,
        shape: shape.to_vec(),
        data: fill(*seed, n),
    }
}

/// Writes the synthetic HF checkpoint, ~8 layers per shard file; returns total tensor bytes.
fn write_source(a: &Args, dir: &Path) -> Result<u64, String> {
    let (h, i, e) = (a.hidden, a.inter, a.experts);
    std::fs::create_dir_all(dir).map_err(|x| x.to_string())?;
    let cfg = json!({"model_type": "qwen3_moe", "num_hidden_layers": a.layers, "num_experts": e,
        "num_experts_per_tok": 8, "hidden_size": h, "moe_intermediate_size": i, "intermediate_size": 4 * h,
        "decoder_sparse_step": 1, "mlp_only_layers": [], "vocab_size": 1024});
    std::fs::write(dir.join("config.json"), cfg.to_string()).map_err(|x| x.to_string())?;
    let per_file = 8;
    let nfiles = a.layers.div_ceil(per_file);
    let mut seed = 0u64;
    let mut wm = serde_json::Map::new();
    let mut total = 0u64;
    for f in 0..nfiles {
        let mut m: BTreeMap<String, HostTensor> = BTreeMap::new();
        if f == 0 {
            m.insert("model.embed_tokens.weight".into(), t(&mut seed, &[1024, h]));
            m.insert("model.norm.weight".into(), t(&mut seed, &[h]));
            m.insert("lm_head.weight".into(), t(&mut seed, &[1024, h]));
        }
        for l in f * per_file..((f + 1) * per_file).min(a.layers) {
            let p = format!("model.layers.{l}");
            for (n, s) in [
                ("q_proj", [h, h]),
                ("k_proj", [h / 4, h]),
                ("v_proj", [h / 4, h]),
                ("o_proj", [h, h]),
            ] {
                m.insert(format!("{p}.self_attn.{n}.weight"), t(&mut seed, &s));
            }
            m.insert(format!("{p}.input_layernorm.weight"), t(&mut seed, &[h]));
            m.insert(format!("{p}.mlp.gate.weight"), t(&mut seed, &[e, h]));
            for x in 0..e {
                m.insert(
                    format!("{p}.mlp.experts.{x}.gate_proj.weight"),
                    t(&mut seed, &[i, h]),
                );
                m.insert(
                    format!("{p}.mlp.experts.{x}.up_proj.weight"),
                    t(&mut seed, &[i, h]),
                );
                m.insert(
                    format!("{p}.mlp.experts.{x}.down_proj.weight"),
                    t(&mut seed, &[h, i]),
                );
            }
        }
        let name = format!("model-{:05}-of-{:05}.safetensors", f + 1, nfiles);
        total += m.values().map(|t| t.data.len() as u64).sum::<u64>();
        for k in m.keys() {
            wm.insert(k.clone(), json!(name));
        }
        let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = m
            .iter()
            .map(|(k, t)| {
                safetensors::tensor::TensorView::new(t.dtype, t.shape.clone(), &t.data)
                    .map(|v| (k.clone(), v))
                    .map_err(|x| x.to_string())
            })
            .collect::<Result<_, _>>()?;
        safetensors::serialize_to_file(views, None, &dir.join(&name)).map_err(|x| x.to_string())?;
    }
    let idx = json!({"metadata": {"total_size": total}, "weight_map": wm});
    std::fs::write(dir.join("model.safetensors.index.json"), idx.to_string())
        .map_err(|x| x.to_string())?;
    Ok(total)
}

fn secs(f: impl FnOnce() -> Result<(), String>) -> Result<f64, String> {
    let t0 = Instant::now();
    f()?;
    Ok(t0.elapsed().as_secs_f64())
}

fn sh(cmd: &str, args: &[&str]) -> Result<(), String> {
    let s = Command::new(cmd)
        .args(args)
        .status()
        .map_err(|e| format!("{cmd}: {e}"))?;
    if s.success() {
        Ok(())
    } else {
        Err(format!("{cmd} {args:?} failed: {s}"))
    }
}

fn deepseek_key_mapping() -> Result<(usize, f64, f64), String> {
    let spec = spec_for("deepseek_v3").map_err(|e| e.to_string())?;
    let cfg = FamilyConfig::from_json(
        &spec,
        &json!({"num_hidden_layers": 61, "n_routed_experts": 256, "hidden_size": 7168,
                "moe_intermediate_size": 2048, "first_k_dense_replace": 3}),
    )
    .map_err(|e| e.to_string())?;
    let mut keys = vec![
        "model.embed_tokens.weight".to_string(),
        "model.norm.weight".into(),
        "lm_head.weight".into(),
    ];
    for l in 0..61 {
        let p = format!("model.layers.{l}");
        for n in [
            "input_layernorm",
            "post_attention_layernorm",
            "self_attn.q_a_proj",
            "self_attn.q_b_proj",
            "self_attn.kv_a_proj_with_mqa",
            "self_attn.kv_b_proj",
            "self_attn.o_proj",
            "self_attn.q_a_layernorm",
            "self_attn.kv_a_layernorm",
        ] {
            keys.push(format!("{p}.{n}.weight"));
        }
        if l < 3 {
            for n in ["gate_proj", "up_proj", "down_proj"] {
                keys.push(format!("{p}.mlp.{n}.weight"));
            }
            continue;
        }
        keys.push(format!("{p}.mlp.gate.weight"));
        keys.push(format!("{p}.mlp.gate.e_score_correction_bias"));
        for n in ["gate_proj", "up_proj", "down_proj"] {
            keys.push(format!("{p}.mlp.shared_experts.{n}.weight"));
        }
        for e in 0..256 {
            for n in ["gate_proj", "up_proj", "down_proj"] {
                keys.push(format!("{p}.mlp.experts.{e}.{n}.weight"));
            }
        }
    }
    let mut build = Vec::new();
    let mut map = Vec::new();
    let mut groups = 0;
    for _ in 0..5 {
        let t0 = Instant::now();
        let a = FamilyAdapter::new(
            spec,
            cfg.clone(),
            LayoutChoice {
                prefix: "model.layers".into(),
                moe_module: "mlp",
                layout: DiskLayout::PerExpert,
                optional: [false, true, true, false],
            },
        );
        build.push(t0.elapsed().as_secs_f64() * 1e3);
        let t1 = Instant::now();
        let m = a.map_keys(keys.iter().map(String::as_str));
        map.push(t1.elapsed().as_secs_f64() * 1e3);
        groups = m.len();
    }
    build.sort_by(f64::total_cmp);
    map.sort_by(f64::total_cmp);
    println!(
        "deepseek_v3 key mapping: {} HF keys -> {groups} native keys; adapter build (key tables) median {:.1} ms, mapping pass median {:.1} ms",
        keys.len(),
        build[2],
        map[2]
    );
    Ok((keys.len(), build[2], map[2]))
}

fn main() -> Result<(), String> {
    let a = parse()?;
    deepseek_key_mapping()?;
    let root = &a.dir;
    if root.exists() {
        std::fs::remove_dir_all(root).map_err(|e| e.to_string())?;
    }
    let (src, cp_dst, nat, back) = (
        root.join("src"),
        root.join("cp"),
        root.join("native"),
        root.join("hf"),
    );
    let total = write_source(&a, &src)?;
    sh("sync", &[])?;
    let gb = total as f64 / 1e9;
    println!(
        "synthetic qwen3_moe checkpoint: {} layers x {} experts, H={} I={}, {:.2} GB bf16 in {}",
        a.layers,
        a.experts,
        a.hidden,
        a.inter,
        gb,
        src.display()
    );
    let s = |p: &Path| p.display().to_string();
    let t_cp = secs(|| sh("cp", &["-r", &s(&src), &s(&cp_dst)]).and_then(|_| sh("sync", &[])))?;
    let opts = ConvertOptions {
        max_shard_bytes: 400_000_000,
        threads: a.threads,
        verify: false,
    };
    // Each conversion twice (output removed in between), the faster run counts, as for cp.
    let mut t_n = f64::MAX;
    let mut t_h = f64::MAX;
    for _ in 0..2 {
        for p in [&nat, &back] {
            if p.exists() {
                std::fs::remove_dir_all(p).map_err(|e| e.to_string())?;
            }
        }
        sh("sync", &[])?;
        t_n = t_n.min(secs(|| {
            convert(&src, &nat, Direction::HfToNative, &opts, &|_| {})
                .map(|_| ())
                .map_err(|e| e.to_string())
        })?);
        t_h = t_h.min(secs(|| {
            convert(&nat, &back, Direction::NativeToHf, &opts, &|_| {})
                .map(|_| ())
                .map_err(|e| e.to_string())
        })?);
    }
    let t_cp2 = secs(|| {
        sh("rm", &["-rf", &s(&cp_dst)])
            .and_then(|_| sh("cp", &["-r", &s(&src), &s(&cp_dst)]))
            .and_then(|_| sh("sync", &[]))
    })?;
    let t_cp = t_cp.min(t_cp2);
    println!("cp -r + sync:        {t_cp:7.2} s  {:6.2} GB/s", gb / t_cp);
    println!(
        "hf -> native:        {t_n:7.2} s  {:6.2} GB/s  ({:.2}x cp)",
        gb / t_n,
        t_cp / t_n
    );
    println!(
        "native -> hf:        {t_h:7.2} s  {:6.2} GB/s  ({:.2}x cp)",
        gb / t_h,
        t_cp / t_h
    );
    let t_v = secs(|| {
        std::fs::remove_dir_all(&back).map_err(|e| e.to_string())?;
        let o = ConvertOptions {
            verify: true,
            ..opts.clone()
        };
        convert(&nat, &back, Direction::NativeToHf, &o, &|_| {})
            .map(|_| ())
            .map_err(|e| e.to_string())
    })?;
    println!("native -> hf --verify: {t_v:5.2} s  {:6.2} GB/s", gb / t_v);
    if !a.keep {
        std::fs::remove_dir_all(root).map_err(|e| e.to_string())?;
    }
    Ok(())
}
