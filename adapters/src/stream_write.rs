//! The streamed safetensors file writer every converter uses: the header first (offsets of the
//! output tensors, in order), then the tensor bytes produced piece by piece in bounded windows
//! (pieces of a window in parallel, straight into the output staging buffer), and the split of a
//! checkpoint's tensors into files of at most a given size. Hand-written because the
//! `safetensors` crate serialises from tensors already in memory, which a converter of
//! checkpoints larger than RAM cannot hold.

use crate::direct_io::OutFile;
use crate::error::{AdapterError, Result};
use crate::tensor::dtype_size;
use rayon::prelude::*;
use safetensors::Dtype;
use serde_json::{json, Value};
use std::path::Path;

/// Output bytes produced in parallel before they are handed to the file (plus at most one
/// piece): at least this, and 8 MiB per worker thread (enough pieces for every worker when single
/// experts exceed [`PIECE`], e.g. 6 MiB per expert in Qwen3-30B-A3B).
const WINDOW: usize = 32 << 20;

/// Splits items of `sizes` bytes (in output order) into files of at most `max` bytes (an item
/// larger than `max` alone); one file when everything fits.
pub(crate) fn plan_files(sizes: &[u64], max: u64) -> Vec<Vec<usize>> {
    let total: u64 = sizes.iter().sum();
    if total <= max {
        return vec![(0..sizes.len()).collect()];
    }
    let mut files: Vec<Vec<usize>> = Vec::new();
    let mut cur = Vec::new();
    let mut cur_b = 0u64;
    for (i, &b) in sizes.iter().enumerate() {
        if !cur.is_empty() && cur_b + b > max {
            files.push(std::mem::take(&mut cur));
            cur_b = 0;
        }
        cur.push(i);
        cur_b += b;
    }
    if !cur.is_empty() {
        files.push(cur);
    }
    files
}

/// Error of a window fill: the output file's I/O or the conversion's own.
enum FillError {
    Io(std::io::Error),
    Adapter(AdapterError),
}

impl From<std::io::Error> for FillError {
    fn from(e: std::io::Error) -> Self {
        FillError::Io(e)
    }
}

/// One output tensor: key, dtype, shape.
pub(crate) type OutTensor = (String, Dtype, Vec<usize>);

/// Writes one safetensors file: header (offsets of `outs`, in order) then the tensors' bytes,
/// produced by `fill` from `ps` (the pieces in file order, each with its output size) in windows
/// of [`WINDOW`] bytes or 8 MiB per thread (pieces of a window in parallel), so memory is bounded
/// by two windows plus one piece. Returns the tensor bytes written.
pub(crate) fn write_file<P: Sync>(
    path: &Path,
    outs: &[&OutTensor],
    ps: &[(P, usize)],
    fill: &(dyn Fn(&P, &mut [u8]) -> Result<()> + Sync),
    tick: &(dyn Fn(u64) + Sync),
) -> Result<u64> {
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), json!({"format": "pt"}));
    let mut off = 0u64;
    for (k, d, s) in outs {
        let n = (s.iter().product::<usize>() * dtype_size(*d)?) as u64;
        header.insert(
            k.clone(),
            json!({"dtype": d.to_string(), "shape": s, "data_offsets": [off, off + n]}),
        );
        off += n;
    }
    let planned: u64 = ps.iter().map(|p| p.1 as u64).sum();
    if planned != off {
        return Err(AdapterError::Tensor(format!(
            "{}: {planned} bytes of pieces for {off} bytes of tensors",
            path.display()
        )));
    }
    let mut h = serde_json::to_vec(&Value::Object(header))
        .map_err(|e| AdapterError::Format(format!("{}: header: {e}", path.display())))?;
    while h.len() % 8 != 0 {
        h.push(b' ');
    }
    let mut w = OutFile::create(path).map_err(|e| AdapterError::io(path, e))?;
    let io = |e| AdapterError::io(path, e);
    w.write_all(&(h.len() as u64).to_le_bytes()).map_err(io)?;
    w.write_all(&h).map_err(io)?;
    // Pieces in file order, produced a window at a time: the pieces of a window in parallel
    // (rayon), each straight into its place in the output staging buffer.
    let window = WINDOW.max(rayon::current_num_threads() * (8 << 20));
    let mut i = 0;
    while i < ps.len() {
        let mut j = i;
        let mut total = 0;
        while j < ps.len() && (j == i || total + ps[j].1 <= window) {
            total += ps[j].1;
            j += 1;
        }
        let win = &ps[i..j];
        w.append_with(total, |buf| {
            let mut parts = Vec::with_capacity(win.len());
            let mut rest = buf;
            for (_, n) in win {
                let (x, r) = rest.split_at_mut(*n);
                parts.push(x);
                rest = r;
            }
            win.par_iter()
                .zip(parts)
                .try_for_each(|((p, _), out)| fill(p, out))
                .map_err(FillError::Adapter)
        })
        .map_err(|e| match e {
            FillError::Io(e) => io(e),
            FillError::Adapter(e) => e,
        })?;
        tick(total as u64);
        i = j;
    }
    w.finish().map_err(io)?;
    Ok(off)
}
