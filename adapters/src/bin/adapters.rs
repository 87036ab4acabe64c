//! `adapters convert --from hf --to native SRC DST` (and `--from native --to hf`): streaming,
//! parallel, sharded, verified, atomic checkpoint conversion (see `adapters::convert`).

use adapters::convert::{convert, ConvertOptions, Direction};
use clap::{Parser, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
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
    Hf,
    Native,
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
        /// Source checkpoint directory (config.json + safetensors [+ index]).
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
    },
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
    } = Cli::parse().cmd;
    let direction = match (from, to) {
        (Format::Hf, Format::Native) => Direction::HfToNative,
        (Format::Native, Format::Hf) => Direction::NativeToHf,
        _ => {
            eprintln!("error: --from and --to must differ (hf -> native or native -> hf)");
            return ExitCode::from(2);
        }
    };
    let total: u64 = std::fs::read_dir(&src)
        .map(|rd| {
            rd.flatten()
                .filter(|e| e.path().extension().is_some_and(|x| x == "safetensors"))
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
    let t0 = Instant::now();
    let r = convert(&src, &dst, direction, &opts, &|b| bar.inc(b));
    bar.finish_and_clear();
    match r {
        Ok(r) => {
            let s = t0.elapsed().as_secs_f64();
            println!(
                "wrote {} tensors, {} bytes in {} file(s) to {} in {s:.2} s ({:.2} GB/s){}",
                r.tensors,
                r.bytes,
                r.files,
                dst.display(),
                r.bytes as f64 / s / 1e9,
                if r.verified { ", verified" } else { "" }
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
