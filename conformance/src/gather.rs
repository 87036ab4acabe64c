//! Gathering local shards from every rank over a [`Communicator`] and reassembling full tensors.
//!
//! Every rank always takes part in the same collectives: a rank whose local work failed sends its
//! error instead of shards, so one rank's failure is reported by all and never hangs the others.

use adapters::{assemble, Dtype, HostTensor, LocalTensor};
use collectives::{Communicator, DType};
use placement::IndexSet;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

#[derive(Serialize, Deserialize)]
struct Entry {
    key: String,
    dtype: Dtype,
    shape: Vec<usize>,
    global_shape: Vec<usize>,
    /// Per dim, the runs of global indices held, in local order.
    runs: Vec<Vec<(usize, usize)>>,
    len: usize,
}

#[derive(Serialize, Deserialize)]
struct Header {
    error: Option<String>,
    entries: Vec<Entry>,
}

/// One rank's contribution: `u64` header length, the JSON header, then each entry's bytes.
fn encode(local: &Result<Vec<LocalTensor>, String>) -> Result<Vec<u8>, String> {
    let (error, tensors): (Option<String>, &[LocalTensor]) = match local {
        Ok(t) => (None, t),
        Err(e) => (Some(e.clone()), &[]),
    };
    let entries = tensors
        .iter()
        .map(|t| Entry {
            key: t.key.clone(),
            dtype: t.tensor.dtype,
            shape: t.tensor.shape.clone(),
            global_shape: t.global_shape.clone(),
            runs: t
                .indices
                .iter()
                .map(|s| s.runs().iter().map(|r| (r.start, r.end)).collect())
                .collect(),
            len: t.tensor.data.len(),
        })
        .collect();
    let header = serde_json::to_vec(&Header { error, entries }).map_err(|e| e.to_string())?;
    let mut blob = (header.len() as u64).to_le_bytes().to_vec();
    blob.extend_from_slice(&header);
    for t in tensors {
        blob.extend_from_slice(&t.tensor.data);
    }
    Ok(blob)
}

/// A shard as received: its index sets and bytes.
pub type Part = (Vec<IndexSet>, HostTensor);

fn decode(rank: usize, blob: &[u8]) -> Result<Vec<(String, Vec<usize>, Part)>, String> {
    let bad = |m: &str| format!("rank {rank}: malformed shard blob: {m}");
    let len_bytes: [u8; 8] = blob
        .get(..8)
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| bad("short"))?;
    let hlen = u64::from_le_bytes(len_bytes) as usize;
    let header_end = 8usize
        .checked_add(hlen)
        .ok_or_else(|| bad("header length overflow"))?;
    let header: Header =
        serde_json::from_slice(blob.get(8..header_end).ok_or_else(|| bad("header"))?)
            .map_err(|e| bad(&e.to_string()))?;
    if let Some(e) = header.error {
        return Err(format!("rank {rank}: {e}"));
    }
    let mut pos = header_end;
    let mut out = Vec::new();
    for e in header.entries {
        let end = pos
            .checked_add(e.len)
            .ok_or_else(|| bad("data length overflow"))?;
        let data = blob.get(pos..end).ok_or_else(|| bad("data"))?.to_vec();
        pos = end;
        let indices = e
            .runs
            .iter()
            .map(|runs| IndexSet::from_runs(runs.iter().map(|&(a, b)| a..b).collect()))
            .collect();
        let tensor =
            HostTensor::new(e.dtype, e.shape, data).map_err(|err| format!("rank {rank}: {err}"))?;
        out.push((e.key, e.global_shape, (indices, tensor)));
    }
    if pos != blob.len() {
        return Err(bad("trailing bytes"));
    }
    Ok(out)
}

/// All-gathers one variable-length byte blob per rank; returns them in rank order. Collective.
/// Errors (never panics) when the communicator returns fewer or more bytes than announced.
pub fn all_gather_blobs(comm: &dyn Communicator, blob: &[u8]) -> Result<Vec<Vec<u8>>, String> {
    let sizes = comm
        .all_gather_raw(
            &(blob.len() as u64).to_le_bytes(),
            &vec![8; comm.size()],
            DType::U8,
        )
        .map_err(|e| format!("gathering blob sizes: {e}"))?;
    if sizes.len() != 8 * comm.size() {
        return Err(format!(
            "gathering blob sizes: got {} bytes for {} ranks",
            sizes.len(),
            comm.size()
        ));
    }
    let counts: Vec<usize> = sizes
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]) as usize)
        .collect();
    let all = comm
        .all_gather_raw(blob, &counts, DType::U8)
        .map_err(|e| format!("gathering blobs: {e}"))?;
    let mut out = Vec::with_capacity(counts.len());
    let mut pos = 0usize;
    for (rank, n) in counts.into_iter().enumerate() {
        let part = pos
            .checked_add(n)
            .and_then(|end| all.get(pos..end))
            .ok_or_else(|| {
                format!(
                    "gathering blobs: rank {rank}'s {n} bytes missing from {} received",
                    all.len()
                )
            })?;
        out.push(part.to_vec());
        pos += n;
    }
    if pos != all.len() {
        return Err(format!(
            "gathering blobs: {} bytes received, {pos} announced",
            all.len()
        ));
    }
    Ok(out)
}

/// All-gathers every rank's local shards (or its error) and reassembles each key into its full tensor.
/// Collective: every rank must call it. Returns `Err` naming the ranks whose local work failed, or a
/// key whose shards do not cover its global shape exactly.
pub fn gather_full(
    comm: &dyn Communicator,
    local: &Result<Vec<LocalTensor>, String>,
) -> Result<BTreeMap<String, HostTensor>, String> {
    let blobs = all_gather_blobs(comm, &encode(local)?)?;
    let mut by_key: BTreeMap<String, (Vec<usize>, Dtype, Vec<Part>)> = BTreeMap::new();
    let mut errors = Vec::new();
    for (rank, blob) in blobs.iter().enumerate() {
        match decode(rank, blob) {
            Ok(entries) => {
                for (key, global_shape, part) in entries {
                    let slot = by_key
                        .entry(key)
                        .or_insert_with(|| (global_shape, part.1.dtype, Vec::new()));
                    slot.2.push(part);
                }
            }
            Err(e) => errors.push(e),
        }
    }
    if !errors.is_empty() {
        return Err(errors.join("; "));
    }
    by_key
        .into_iter()
        .map(|(key, (shape, dtype, parts))| {
            assemble(&shape, dtype, &parts)
                .map(|t| (key.clone(), t))
                .map_err(|e| format!("{key}: {e}"))
        })
        .collect()
}
