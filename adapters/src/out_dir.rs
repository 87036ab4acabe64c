//! Writing a checkpoint directory the way every converter here does: into `.DST.partial-PID`,
//! renamed to `DST` only when complete (a crash never leaves something that looks like a
//! checkpoint at `DST`; the next write to `DST` removes what a dead run left, see
//! [`stale_partials`]), tensors in `model.safetensors` or `model-0000i-of-0000n.safetensors` +
//! `model.safetensors.index.json` (the HF layout; units never split across files), each file
//! streamed by [`crate::stream_write::write_file`].

use crate::checkpoint::{INDEX_FILE, SINGLE_FILE};
use crate::error::{AdapterError, Result};
use crate::stream_write::{plan_files, write_file, OutTensor};
use crate::tensor::dtype_size;
use crate::writer::shard_file_name;
use serde_json::{json, Value};
use std::path::Path;

/// The partial output directories `.DST.partial-PID` next to `dst` left by runs that died before
/// finishing (their process `PID` no longer exists: `/proc/PID` is absent), sorted. Every write
/// to `dst` removes them first ([`atomic_dir`]); a tool reports them before it starts.
pub fn stale_partials(dst: &Path) -> Vec<std::path::PathBuf> {
    let (Some(parent), Some(name)) = (dst.parent(), dst.file_name()) else {
        return Vec::new();
    };
    let parent = if parent.as_os_str().is_empty() {
        Path::new(".")
    } else {
        parent
    };
    let prefix = format!(".{}.partial-", name.to_string_lossy());
    let mut v: Vec<std::path::PathBuf> = std::fs::read_dir(parent)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| {
            let n = e.file_name().to_string_lossy().into_owned();
            n.strip_prefix(&prefix)
                .and_then(|pid| pid.parse::<u32>().ok())
                .is_some_and(|pid| {
                    pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists()
                })
        })
        .map(|e| e.path())
        .collect();
    v.sort();
    v
}

/// Runs `job` on a fresh partial directory next to `dst` and renames it to `dst` when `job`
/// succeeds (fsyncing it first); removes it when `job` fails. Errors: `dst` exists, I/O, `job`'s.
pub(crate) fn atomic_dir<R>(dst: &Path, job: impl FnOnce(&Path) -> Result<R>) -> Result<R> {
    if dst.exists() {
        return Err(AdapterError::io(
            dst,
            std::io::Error::new(std::io::ErrorKind::AlreadyExists, "destination exists"),
        ));
    }
    let name = dst
        .file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "out".into());
    for stale in stale_partials(dst) {
        std::fs::remove_dir_all(&stale).map_err(|e| AdapterError::io(&stale, e))?;
    }
    let tmp = dst.with_file_name(format!(".{name}.partial-{}", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| AdapterError::io(&tmp, e))?;
    }
    std::fs::create_dir_all(&tmp).map_err(|e| AdapterError::io(&tmp, e))?;
    match job(&tmp) {
        Ok(r) => {
            if let Ok(d) = std::fs::File::open(&tmp) {
                let _ = d.sync_all();
            }
            std::fs::rename(&tmp, dst).map_err(|e| AdapterError::io(dst, e))?;
            Ok(r)
        }
        Err(e) => {
            let _ = std::fs::remove_dir_all(&tmp);
            Err(e)
        }
    }
}

/// Writes `v` as pretty JSON to `dir/name`.
pub(crate) fn write_json(dir: &Path, name: &str, v: &Value) -> Result<()> {
    let p = dir.join(name);
    let s = serde_json::to_string_pretty(v)
        .map_err(|e| AdapterError::Format(format!("{name}: {e}")))?;
    std::fs::write(&p, format!("{s}\n")).map_err(|e| AdapterError::io(&p, e))
}

/// What [`write_tensors`] wrote.
pub(crate) struct Written {
    /// Tensor bytes (headers excluded).
    pub bytes: u64,
    /// Number of safetensors files.
    pub files: usize,
}

/// Writes the output tensors of `units` (each unit: the tensors one piece list produces, in
/// order) into `dir` as safetensors files of at most `max_shard_bytes` (+ index when several),
/// one file at a time; `pieces(u)` gives unit `u`'s pieces in output order, `fill` produces one.
/// `threads`: worker threads of the fill (`None`: rayon's default).
pub(crate) fn write_tensors<P: Send + Sync>(
    dir: &Path,
    units: &[Vec<OutTensor>],
    pieces: &(dyn Fn(usize) -> Result<Vec<(P, usize)>> + Sync),
    fill: &(dyn Fn(&P, &mut [u8]) -> Result<()> + Sync),
    max_shard_bytes: u64,
    threads: Option<usize>,
    tick: &(dyn Fn(u64) + Sync),
) -> Result<Written> {
    let mut sizes = Vec::with_capacity(units.len());
    for u in units {
        let mut b = 0u64;
        for (_, d, s) in u {
            b += (s.iter().product::<usize>() * dtype_size(*d)?) as u64;
        }
        sizes.push(b);
    }
    let files = plan_files(&sizes, max_shard_bytes);
    let n = files.len();
    let names: Vec<String> = (0..n)
        .map(|i| {
            if n == 1 {
                SINGLE_FILE.to_string()
            } else {
                shard_file_name(i + 1, n)
            }
        })
        .collect();
    let job = || -> Result<Vec<u64>> {
        files
            .iter()
            .zip(&names)
            .map(|(f, fname)| {
                let outs: Vec<&OutTensor> = f.iter().flat_map(|&u| units[u].iter()).collect();
                let mut ps = Vec::new();
                for &u in f {
                    ps.extend(pieces(u)?);
                }
                write_file(&dir.join(fname), &outs, &ps, fill, tick)
            })
            .collect()
    };
    let written = match threads {
        Some(t) => rayon::ThreadPoolBuilder::new()
            .num_threads(t.max(1))
            .build()
            .map_err(|e| AdapterError::Config(format!("thread pool: {e}")))?
            .install(job)?,
        None => job()?,
    };
    let total: u64 = written.iter().sum();
    if n > 1 {
        let mut wm = serde_json::Map::new();
        for (f, fname) in files.iter().zip(&names) {
            for &u in f {
                for (k, _, _) in &units[u] {
                    wm.insert(k.clone(), Value::String(fname.clone()));
                }
            }
        }
        write_json(
            dir,
            INDEX_FILE,
            &json!({"metadata": {"total_size": total}, "weight_map": wm}),
        )?;
    }
    Ok(Written {
        bytes: total,
        files: n,
    })
}
