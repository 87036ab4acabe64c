//! Benchmarks (figures, never pass/fail):
//! 0. the transpose kernel alone (bf16 expert tiles, both directions) vs memcpy, one thread;
//! 1. the key-mapping pass alone for the full DeepSeek-V3 key set (61 layers, 256 experts,
//!    first_k_dense_replace 3) in milliseconds;
//! 2. converting a synthetic Qwen3-30B-A3B-shaped checkpoint (48 layers, 128 experts, per-expert
//!    bf16 keys, H and I scaled down; default ~2.08 GB) HF -> native, then native -> HF, each step
//!    against `cp -r` of that step's source files + `sync` of the copies (fsync per file and of
//!    the directory, as the converter does), runs interleaved, with the source put in the same
//!    cache state before every timed run (read into the page cache, or evicted with `--cold`);
//! 3. native -> HF with `--verify`.
//!
//! `cargo run --release -p adapters --bin bench_convert -- [--dir D] [--hidden H] [--inter I]
//! [--layers L] [--experts E] [--threads N] [--runs R] [--max-shard-size B] [--cold] [--keep]
//! [--kernel-only]`

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
    kernel_only: bool,
    cold: bool,
    runs: usize,
    max_shard: u64,
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
        kernel_only: false,
        cold: false,
        runs: 3,
        max_shard: 400_000_000,
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
            "--kernel-only" => a.kernel_only = true,
            "--cold" => a.cold = true,
            "--runs" => a.runs = num(val()?)?.max(1),
            "--max-shard-size" => a.max_shard = num(val()?)? as u64,
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

/// The transpose kernel alone on the benchmark's expert shapes (bf16 [I, H] -> [H, I] per
/// expert, 512 MB of experts, from memory), vs `copy_from_slice` of the same bytes.
fn kernel_bench(a: &Args) {
    let (h, i) = (a.hidden, a.inter);
    let block = h * i * 2;
    let n = (512 << 20) / block;
    let src = fill(7, n * block);
    let mut dst = fill(8, n * block);
    let mut best = (f64::MAX, f64::MAX, f64::MAX);
    let mat = |stride| adapters::transpose::Mat { offset: 0, stride };
    for _ in 0..3 {
        let t0 = Instant::now();
        for e in 0..n {
            let r = e * block..(e + 1) * block;
            adapters::transpose::transpose(&mut dst[r.clone()], mat(i), &src[r], mat(h), i, h, 2);
        }
        best.0 = best.0.min(t0.elapsed().as_secs_f64());
        let t0 = Instant::now();
        for e in 0..n {
            let r = e * block..(e + 1) * block;
            adapters::transpose::transpose(&mut dst[r.clone()], mat(h), &src[r], mat(i), h, i, 2);
        }
        best.2 = best.2.min(t0.elapsed().as_secs_f64());
        let t1 = Instant::now();
        dst.copy_from_slice(&src);
        best.1 = best.1.min(t1.elapsed().as_secs_f64());
    }
    let gb = (n * block) as f64 / 1e9;
    println!(
        "transpose kernel, one thread, {n} experts from memory: bf16 [{i}, {h}] -> [{h}, {i}] {:.2} GB/s, [{h}, {i}] -> [{i}, {h}] {:.2} GB/s (memcpy of the same bytes {:.2} GB/s)",
        gb / best.0,
        gb / best.2,
        gb / best.1
    );
}

/// Makes the next timed step read `dir` from the page cache (reads every file once) or, with
/// `cold`, from the disk (sync + drop_caches; needs root). Done before cp and the converter alike.
fn prepare(dir: &Path, cold: bool) -> Result<(), String> {
    sh("sync", &[])?;
    if cold {
        return std::fs::write("/proc/sys/vm/drop_caches", "3\n")
            .map_err(|e| format!("--cold needs root to write /proc/sys/vm/drop_caches: {e}"));
    }
    for e in std::fs::read_dir(dir).map_err(|e| e.to_string())? {
        let p = e.map_err(|e| e.to_string())?.path();
        let mut f = std::fs::File::open(&p).map_err(|e| e.to_string())?;
        std::io::copy(&mut f, &mut std::io::sink()).map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// `cp -r from to` then `sync to to/*` (GNU sync with arguments fsyncs each file and the
/// directory: the same durability as the converter, which fsyncs each file and its directory).
fn cp_sync(from: &Path, to: &Path) -> Result<(), String> {
    let s = |p: &Path| p.display().to_string();
    sh("cp", &["-r", &s(from), &s(to)])?;
    let mut args = vec![s(to)];
    for e in std::fs::read_dir(to).map_err(|e| e.to_string())? {
        args.push(s(&e.map_err(|e| e.to_string())?.path()));
    }
    sh("sync", &args.iter().map(String::as_str).collect::<Vec<_>>())
}

fn rm(p: &Path) -> Result<(), String> {
    if p.exists() {
        std::fs::remove_dir_all(p).map_err(|e| e.to_string())?;
    }
    Ok(())
}

fn stats(v: &mut [f64]) -> (f64, f64) {
    v.sort_by(f64::total_cmp);
    (v[0], v[v.len() / 2])
}

fn main() -> Result<(), String> {
    let a = parse()?;
    kernel_bench(&a);
    if a.kernel_only {
        return Ok(());
    }
    deepseek_key_mapping()?;
    let root = &a.dir;
    rm(root)?;
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
    println!(
        "each step: source {} before every timed run (cp and converter alike); {} runs each, interleaved; best and median",
        if a.cold { "evicted from the page cache (sync + drop_caches)" } else { "read once into the page cache" },
        a.runs
    );
    println!("cp = `cp -r SRC DST` + `sync DST DST/*` (fsync of each file and the directory)");
    println!("converter = open + plan + write every file with O_DIRECT + fsync each + rename (no verify)");
    let opts = ConvertOptions {
        max_shard_bytes: a.max_shard,
        threads: a.threads,
        verify: false,
    };
    for (name, from, to, dir) in [
        ("hf -> native", &src, &nat, Direction::HfToNative),
        ("native -> hf", &nat, &back, Direction::NativeToHf),
    ] {
        let (mut t_cp, mut t_cv) = (Vec::new(), Vec::new());
        for _ in 0..a.runs {
            rm(&cp_dst)?;
            prepare(from, a.cold)?;
            t_cp.push(secs(|| cp_sync(from, &cp_dst))?);
            rm(to)?;
            prepare(from, a.cold)?;
            t_cv.push(secs(|| {
                convert(from, to, dir, &opts, &|_| {})
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            })?);
        }
        let ((cb, cm), (vb, vm)) = (stats(&mut t_cp), stats(&mut t_cv));
        println!(
            "{name}: cp {cb:.2} s best / {cm:.2} s median ({:.2} GB/s best); converter {vb:.2} s / {vm:.2} s ({:.2} GB/s best); converter vs cp: {:.2}x best, {:.2}x median",
            gb / cb,
            gb / vb,
            cb / vb,
            cm / vm
        );
    }
    rm(&back)?;
    prepare(&nat, a.cold)?;
    let t_v = secs(|| {
        let o = ConvertOptions {
            verify: true,
            ..opts.clone()
        };
        convert(&nat, &back, Direction::NativeToHf, &o, &|_| {})
            .map(|_| ())
            .map_err(|e| e.to_string())
    })?;
    println!(
        "native -> hf --verify: {t_v:.2} s ({:.2} GB/s; the verify pass re-reads the output, which O_DIRECT left out of the page cache)",
        gb / t_v
    );
    rm(&cp_dst)?;
    if !a.keep {
        rm(root)?;
    }
    Ok(())
}
