//! `adapters convert --from hf --to native SRC DST` (and `--from native --to hf`), and to / from
//! torch distributed checkpoints: `--from dcp --to safetensors`, `--from dcp --to hf --model DIR`,
//! `--from hf --to dcp --plan NAME --world N` or `--mesh 2,2 --placements 'GLOB=[..]'`.
//! Streaming, parallel, sharded, verified, atomic (see `adapters::convert`,
//! `adapters::convert_dcp`).

use adapters::convert::{convert, ConvertOptions, Direction};
use adapters::convert_dcp::{dcp_to_hf, dcp_to_safetensors, hf_to_dcp, DcpPlan};
use clap::{Parser, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use placement::parse_placements;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

#[derive(Parser)]
#[command(
    name = "adapters",
    version,
    about = "Hugging Face MoE checkpoints <-> native grouped-expert layout"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Copy, Clone, PartialEq, Eq, ValueEnum)]
enum Format {
    /// Hugging Face checkpoint (config.json + safetensors) in the family's disk layout.
    Hf,
    /// The native grouped-expert layout (written by this tool).
    Native,
    /// A torch distributed checkpoint (any torch 2.x DCP; written: torch's default format).
    Dcp,
    /// Plain safetensors, every tensor under its own name (output of --from dcp only).
    Safetensors,
}

#[derive(Subcommand)]
enum Cmd {
    /// Convert a checkpoint directory; DST must not exist (written atomically).
    Convert {
        /// Source format.
        #[arg(long, value_enum)]
        from: Format,
        /// Destination format.
        #[arg(long, value_enum)]
        to: Format,
        /// Source checkpoint directory (config.json + safetensors [+ index], or a DCP directory).
        src: PathBuf,
        /// Destination directory (created).
        dst: PathBuf,
        /// Largest output file in bytes before sharding (HF default 5 GB).
        #[arg(long, default_value_t = 5_000_000_000)]
        max_shard_size: u64,
        /// Worker threads (default: one per core).
        #[arg(long)]
        threads: Option<usize>,
        /// Re-read the output and check it through the inverse conversion.
        #[arg(long)]
        verify: bool,
        /// No progress bar.
        #[arg(long)]
        quiet: bool,
        /// --from dcp --to hf: the model directory (its config.json, and weights whose layout to
        /// write, if any).
        #[arg(long)]
        model: Option<PathBuf>,
        /// --to dcp: a named plan (single, ep, tp, tp-sp, fsdp, ep-tp, ep-fsdp) on --world ranks.
        #[arg(long, conflicts_with = "mesh")]
        plan: Option<String>,
        /// --to dcp with --plan: number of ranks.
        #[arg(long, requires = "plan")]
        world: Option<usize>,
        /// --to dcp: the mesh shape, e.g. `2,2`.
        #[arg(long, value_delimiter = ',')]
        mesh: Option<Vec<usize>>,
        /// --to dcp with --mesh: `GLOB=[placements]` (first matching native key wins; `*` is a
        /// wildcard) or `[placements]` (the default; else `R` everywhere). PyTorch text forms:
        /// `S(0)`, `R`, `_S(2, 2)`.
        #[arg(long, requires = "mesh")]
        placements: Vec<String>,
    },
}

/// What to run.
enum Job {
    Hf(Direction),
    DcpToSafetensors,
    DcpToHf(PathBuf),
    HfToDcp(DcpPlan),
}

/// The `--to dcp` plan from the arguments.
fn dcp_plan(
    plan: Option<String>,
    world: Option<usize>,
    mesh: Option<Vec<usize>>,
    placements: &[String],
) -> Result<DcpPlan, String> {
    match (plan, mesh) {
        (Some(name), None) => {
            let w = world.ok_or("--plan needs --world N")?;
            DcpPlan::named(&name, w).map_err(|e| e.to_string())
        }
        (None, Some(mesh)) => {
            let mut rules = Vec::new();
            let mut default = None;
            for p in placements {
                let (pat, text) = match p.split_once('=') {
                    Some((a, b)) => (Some(a.trim().to_string()), b),
                    None => (None, p.as_str()),
                };
                let pl = parse_placements(text).map_err(|e| format!("--placements '{p}': {e}"))?;
                if pl.len() != mesh.len() {
                    return Err(format!(
                        "--placements '{p}': {} placements for a {}-d mesh {mesh:?}",
                        pl.len(),
                        mesh.len()
                    ));
                }
                match pat {
                    Some(pat) => rules.push((pat, pl)),
                    None => default = Some(pl),
                }
            }
            Ok(DcpPlan::Explicit {
                mesh,
                rules,
                default,
            })
        }
        _ => Err("--to dcp needs --plan NAME --world N, or --mesh SHAPE [--placements ...]".into()),
    }
}

fn main() -> ExitCode {
    let Cmd::Convert {
        from,
        to,
        src,
        dst,
        max_shard_size,
        threads,
        verify,
        quiet,
        model,
        plan,
        world,
        mesh,
        placements,
    } = Cli::parse().cmd;
    let job = match (from, to) {
        (Format::Hf, Format::Native) => Job::Hf(Direction::HfToNative),
        (Format::Native, Format::Hf) => Job::Hf(Direction::NativeToHf),
        (Format::Dcp, Format::Safetensors) => Job::DcpToSafetensors,
        (Format::Dcp, Format::Hf) => match model {
            Some(m) => Job::DcpToHf(m),
            None => {
                eprintln!("error: --from dcp --to hf needs --model HF_DIR (its config.json)");
                return ExitCode::from(2);
            }
        },
        (Format::Hf, Format::Dcp) => match dcp_plan(plan, world, mesh, &placements) {
            Ok(p) => Job::HfToDcp(p),
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::from(2);
            }
        },
        _ => {
            eprintln!(
                "error: supported: --from hf --to native, --from native --to hf, --from dcp --to safetensors, --from dcp --to hf, --from hf --to dcp"
            );
            return ExitCode::from(2);
        }
    };
    let total: u64 = std::fs::read_dir(&src)
        .map(|rd| {
            rd.flatten()
                .filter(|e| {
                    e.path()
                        .extension()
                        .is_some_and(|x| x == "safetensors" || x == "distcp")
                })
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0);
    let bar = ProgressBar::new(total);
    if quiet {
        bar.set_draw_target(ProgressDrawTarget::hidden());
    }
    if let Ok(style) =
        ProgressStyle::with_template("{bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}")
    {
        bar.set_style(style);
    }
    let opts = ConvertOptions {
        max_shard_bytes: max_shard_size,
        threads,
        verify,
    };
    for stale in adapters::convert::stale_partials(&dst) {
        eprintln!(
            "note: removing {}, the partial output of a run that did not finish",
            stale.display()
        );
    }
    let t0 = Instant::now();
    let tick = |b: u64| bar.inc(b);
    let r = match job {
        Job::Hf(direction) => convert(&src, &dst, direction, &opts, &tick)
            .map(|r| (r.tensors, r.bytes, r.files, 0, r.verified)),
        Job::DcpToSafetensors => dcp_to_safetensors(&src, &dst, &opts, &tick)
            .map(|r| (r.tensors, r.bytes, r.files, r.skipped_items, r.verified)),
        Job::DcpToHf(model) => dcp_to_hf(&src, &dst, &model, &opts, &tick)
            .map(|r| (r.tensors, r.bytes, r.files, r.skipped_items, r.verified)),
        Job::HfToDcp(plan) => hf_to_dcp(&src, &dst, &plan, &opts, &tick)
            .map(|r| (r.tensors, r.bytes, r.files, 0, r.verified)),
    };
    bar.finish_and_clear();
    match r {
        Ok((tensors, bytes, files, skipped, verified)) => {
            let s = t0.elapsed().as_secs_f64();
            println!(
                "wrote {tensors} tensors, {bytes} bytes in {files} file(s) to {} in {s:.2} s ({:.2} GB/s){}{}",
                dst.display(),
                bytes as f64 / s / 1e9,
                if verified { ", verified" } else { "" },
                if skipped > 0 {
                    format!("; {skipped} non-tensor item(s) of the source not converted")
                } else {
                    String::new()
                }
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
