//! Benchmark (figures and ratios, never pass/fail): reading a torch distributed checkpoint.
//! `adapters convert --from dcp --to safetensors` on a >= 2 GB DCP (transformers-named bf16
//! experts `[64, 768, 768]` / `[64, 768, 384]` per layer, FSDP-style `S(1)` on 2 ranks) against, in
//! the same run and cache state, runs interleaved:
//! - `cp -r DCP DST` + `sync DST DST/*` (the same bytes, fsynced as the converter fsyncs);
//! - torch's own `dcp_to_torch_save(DCP, OUT)` + fsync (with `--python`; its call alone is timed,
//!   not the interpreter start or `import torch`).
//!
//! The DCP is written by torch 2.15 itself (`generate_dcp.py big`) with `--python PY`, else by this
//! crate's writer (the same format), or taken from `--dcp DIR`.
//!
//! `cargo run --release -p adapters --bin bench_dcp -- [--python ../torch-venv/bin/python]
//! [--dcp DIR] [--dir WORK] [--gb 2] [--runs 3] [--threads N] [--cold] [--keep]`

use adapters::convert::ConvertOptions;
use adapters::convert_dcp::dcp_to_safetensors;
use adapters::dcp::{self, ShardToSave};
use adapters::{Dtype, HostTensor};
use placement::{DeviceMesh, Placement};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

struct Args {
    dir: PathBuf,
    dcp: Option<PathBuf>,
    python: Option<PathBuf>,
    gb: f64,
    runs: usize,
    threads: Option<usize>,
    cold: bool,
    keep: bool,
}

fn parse() -> Result<Args, String> {
    let mut a = Args {
        dir: std::env::temp_dir().join("adapters_bench_dcp"),
        dcp: None,
        python: None,
        gb: 2.0,
        runs: 3,
        threads: None,
        cold: false,
        keep: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(f) = it.next() {
        let mut val = || it.next().ok_or_else(|| format!("{f} needs a value"));
        match f.as_str() {
            "--dir" => a.dir = PathBuf::from(val()?),
            "--dcp" => a.dcp = Some(PathBuf::from(val()?)),
            "--python" => a.python = Some(PathBuf::from(val()?)),
            "--gb" => a.gb = val()?.parse().map_err(|e| format!("--gb: {e}"))?,
            "--runs" => a.runs = val()?.parse().map_err(|e| format!("--runs: {e}"))?,
            "--threads" => a.threads = Some(val()?.parse().map_err(|e| format!("--threads: {e}"))?),
            "--cold" => a.cold = true,
            "--keep" => a.keep = true,
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(a)
}

fn sh(cmd: &str, args: &[&str]) -> Result<String, String> {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .map_err(|e| format!("{cmd}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{cmd} {args:?}: {}; {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
                .lines()
                .last()
                .unwrap_or("")
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn generator() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../conformance/fixtures/generate_dcp.py")
}

/// The same layout as `generate_dcp.py big`, written by `adapters::dcp` (2 ranks, `S(1)`).
fn write_ours(dir: &Path, gb: f64) -> Result<(), String> {
    let (e, h, i) = (64usize, 768usize, 384usize);
    let per_layer = 3 * e * h * i * 2;
    let layers = ((gb * 1e9 / per_layer as f64).ceil() as usize).max(1);
    let mesh = DeviceMesh::new(vec![2]).map_err(|e| e.to_string())?;
    let s1 = [Placement::Shard(1)];
    let shapes: Vec<(String, Vec<usize>)> = (0..layers)
        .flat_map(|l| {
            [
                (
                    format!("model.layers.{l}.mlp.experts.gate_up_proj"),
                    vec![e, 2 * i, h],
                ),
                (
                    format!("model.layers.{l}.mlp.experts.down_proj"),
                    vec![e, h, i],
                ),
            ]
        })
        .collect();
    for rank in 0..2 {
        let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ rank as u64;
        let locals: Vec<HostTensor> = shapes
            .iter()
            .map(|(_, s)| {
                let local = vec![s[0], s[1] / 2, s[2]];
                let n: usize = local.iter().product();
                let data = (0..2 * n)
                    .map(|_| {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        x as u8 & 0x3f
                    })
                    .collect();
                HostTensor::new(Dtype::BF16, local, data).map_err(|e| e.to_string())
            })
            .collect::<Result<_, _>>()?;
        let shards: Vec<ShardToSave> = shapes
            .iter()
            .zip(&locals)
            .map(|((k, s), l)| ShardToSave {
                key: k,
                local: l,
                global_shape: s,
                placements: &s1,
            })
            .collect();
        dcp::save_rank(dir, &mesh, rank, &shards).map_err(|e| e.to_string())?;
    }
    dcp::commit(dir, 2, serde_json::json!({"bench": true})).map_err(|e| e.to_string())
}

/// Puts `dir`'s files in the page cache (read once), or evicts them (`cold`: sync + drop_caches).
fn prepare(dir: &Path, cold: bool) -> Result<(), String> {
    sh("sync", &[])?;
    if cold {
        return std::fs::write("/proc/sys/vm/drop_caches", "3\n")
            .map_err(|e| format!("--cold needs root to write /proc/sys/vm/drop_caches: {e}"));
    }
    for e in std::fs::read_dir(dir).map_err(|e| e.to_string())?.flatten() {
        if e.path().is_file() {
            std::fs::read(e.path()).map_err(|e| e.to_string())?;
        }
    }
    Ok(())
}

fn rm(p: &Path) {
    let _ = std::fs::remove_dir_all(p);
    let _ = std::fs::remove_file(p);
}

fn stats(v: &mut [f64]) -> (f64, f64) {
    v.sort_by(|a, b| a.total_cmp(b));
    (v[0], v[v.len() / 2])
}

fn main() -> Result<(), String> {
    let a = parse()?;
    std::fs::create_dir_all(&a.dir).map_err(|e| format!("{}: {e}", a.dir.display()))?;
    let (src, written_by) = match &a.dcp {
        Some(d) => (d.clone(), "given".to_string()),
        None => {
            let d = a.dir.join("dcp");
            rm(&d);
            match &a.python {
                Some(py) => {
                    let g = generator();
                    let out = sh(
                        &py.display().to_string(),
                        &[
                            &g.display().to_string(),
                            "big",
                            &d.display().to_string(),
                            &a.gb.to_string(),
                        ],
                    )?;
                    (d, format!("torch ({})", out.trim()))
                }
                None => {
                    write_ours(&d, a.gb)?;
                    (
                        d,
                        "adapters::dcp (pass --python for a torch-written one)".to_string(),
                    )
                }
            }
        }
    };
    let bytes: u64 = std::fs::read_dir(&src)
        .map_err(|e| e.to_string())?
        .flatten()
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.len())
        .sum();
    let uptime = sh("uptime", &[]).unwrap_or_default();
    println!(
        "bench_dcp: {} ({:.2} GB, written by {written_by})",
        src.display(),
        bytes as f64 / 1e9
    );
    println!(
        "machine: {} cores; {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        uptime.trim()
    );
    println!(
        "source {} before every timed run; runs interleaved, {} each",
        if a.cold {
            "evicted from the page cache"
        } else {
            "read once into the page cache"
        },
        a.runs
    );
    let (cp_dst, our_dst, pt) = (a.dir.join("cp"), a.dir.join("out"), a.dir.join("torch.pt"));
    let (mut t_cp, mut t_ours, mut t_torch) = (Vec::new(), Vec::new(), Vec::new());
    let opts = ConvertOptions {
        max_shard_bytes: 5_000_000_000,
        threads: a.threads,
        verify: false,
    };
    for run in 0..a.runs {
        rm(&cp_dst);
        prepare(&src, a.cold)?;
        let t = Instant::now();
        sh(
            "cp",
            &[
                "-r",
                &src.display().to_string(),
                &cp_dst.display().to_string(),
            ],
        )?;
        let mut sync_args = vec![cp_dst.display().to_string()];
        for e in std::fs::read_dir(&cp_dst)
            .map_err(|e| e.to_string())?
            .flatten()
        {
            sync_args.push(e.path().display().to_string());
        }
        sh(
            "sync",
            &sync_args.iter().map(String::as_str).collect::<Vec<_>>(),
        )?;
        t_cp.push(t.elapsed().as_secs_f64());
        rm(&cp_dst);

        rm(&our_dst);
        prepare(&src, a.cold)?;
        let t = Instant::now();
        let r = dcp_to_safetensors(&src, &our_dst, &opts, &|_| {}).map_err(|e| e.to_string())?;
        t_ours.push(t.elapsed().as_secs_f64());
        if run == 0 {
            println!(
                "converter: {} tensors, {} bytes in {} file(s)",
                r.tensors, r.bytes, r.files
            );
        }
        rm(&our_dst);

        if let Some(py) = &a.python {
            rm(&pt);
            prepare(&src, a.cold)?;
            let out = sh(
                &py.display().to_string(),
                &[
                    &generator().display().to_string(),
                    "time-dcp-to-torch-save",
                    &src.display().to_string(),
                    &pt.display().to_string(),
                ],
            )?;
            let s: f64 = out
                .lines()
                .find_map(|l| l.strip_prefix("seconds "))
                .and_then(|v| v.trim().parse().ok())
                .ok_or_else(|| format!("no timing from dcp_to_torch_save: {out}"))?;
            t_torch.push(s);
            rm(&pt);
        }
    }
    let gbps = |s: f64| bytes as f64 / s / 1e9;
    let (cb, cm) = stats(&mut t_cp);
    let (ob, om) = stats(&mut t_ours);
    println!(
        "cp -r + sync:                       best {cb:.2} s ({:.2} GB/s), median {cm:.2} s",
        gbps(cb)
    );
    println!(
        "convert --from dcp --to safetensors: best {ob:.2} s ({:.2} GB/s), median {om:.2} s",
        gbps(ob)
    );
    println!(
        "ratio converter / cp (throughput):  best {:.2}x, median {:.2}x  (target >= 0.8x)",
        cb / ob,
        cm / om
    );
    if !t_torch.is_empty() {
        let (tb, tm) = stats(&mut t_torch);
        println!(
            "torch dcp_to_torch_save + fsync:    best {tb:.2} s ({:.2} GB/s), median {tm:.2} s",
            gbps(tb)
        );
        println!(
            "ratio converter / torch:            best {:.2}x, median {:.2}x  (target >= 1x)",
            tb / ob,
            tm / om
        );
    }
    if !a.keep && a.dcp.is_none() {
        rm(&a.dir);
    }
    Ok(())
}
