//! `roundtrip`: HF -> native -> HF is bit-identical (every key, dtype, shape and byte), in memory and
//! after writing the HF layout back to disk (sharded with an index) and re-reading it.

use crate::report::Check;
use adapters::{adapter_for, write_hf_checkpoint, HfCheckpoint, HostTensor};
use std::collections::BTreeMap;
use std::path::Path;

/// Shard size used when writing the checkpoint back, small enough that the tiny fixtures are written
/// as several files plus `model.safetensors.index.json`.
const REWRITE_SHARD_BYTES: u64 = 64 * 1024;

/// Lists every difference between two tensor maps (missing or extra keys, dtype, shape, bytes), at
/// most `limit` entries, plus the total number of differences.
pub fn diff_tensor_maps(
    expected: &BTreeMap<String, HostTensor>,
    got: &BTreeMap<String, HostTensor>,
    limit: usize,
) -> (Vec<String>, usize) {
    let mut diffs = Vec::new();
    for (k, e) in expected {
        match got.get(k) {
            None => diffs.push(format!("missing key {k}")),
            Some(g) if g.dtype != e.dtype => {
                diffs.push(format!("{k}: dtype {:?} != {:?}", g.dtype, e.dtype))
            }
            Some(g) if g.shape != e.shape => {
                diffs.push(format!("{k}: shape {:?} != {:?}", g.shape, e.shape))
            }
            Some(g) if g.data != e.data => {
                let first = g
                    .data
                    .iter()
                    .zip(&e.data)
                    .position(|(a, b)| a != b)
                    .unwrap_or(0);
                diffs.push(format!("{k}: bytes differ (first at byte {first})"))
            }
            Some(_) => {}
        }
    }
    for k in got.keys().filter(|k| !expected.contains_key(*k)) {
        diffs.push(format!("unexpected key {k}"));
    }
    let total = diffs.len();
    diffs.truncate(limit);
    (diffs, total)
}

fn compare(
    name: &str,
    expected: &BTreeMap<String, HostTensor>,
    got: &BTreeMap<String, HostTensor>,
) -> Check {
    let (diffs, total) = diff_tensor_maps(expected, got, 5);
    Check::expect(name, total == 0, format!("{} keys", expected.len()), || {
        format!("{total} differences: {}", diffs.join("; "))
    })
}

/// Reads every tensor of a checkpoint.
pub fn read_all(ckpt: &HfCheckpoint) -> adapters::Result<BTreeMap<String, HostTensor>> {
    ckpt.keys()
        .into_iter()
        .map(|k| Ok((k.to_string(), ckpt.tensor(k)?)))
        .collect()
}

/// Runs the round-trip checks on the checkpoint in `dir`. A checkpoint that cannot be read is an
/// `Err` (the CLI prints it as one line and exits non-zero); a conversion that differs is a failed check.
pub fn run(dir: &Path) -> adapters::Result<Vec<Check>> {
    let label = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let ckpt = HfCheckpoint::open(dir)?;
    let adapter = adapter_for(&ckpt)?;
    let original = read_all(&ckpt)?;
    let native = adapter.from_hf(&ckpt)?;
    let mut checks = Vec::new();

    let expert_keys = adapter.native_expert_tensors(&ckpt)?;
    let missing: Vec<&str> = expert_keys
        .iter()
        .filter(|t| !native.contains_key(&t.key))
        .map(|t| t.key.as_str())
        .collect();
    checks.push(Check::expect(
        format!("{label}: native expert tensors present"),
        !expert_keys.is_empty() && missing.is_empty(),
        format!(
            "{} grouped tensors over {} MoE layers",
            expert_keys.len(),
            adapter.moe_layers().len()
        ),
        || {
            if expert_keys.is_empty() {
                "the adapter found no MoE expert tensors: nothing would be converted".to_string()
            } else {
                format!("missing {}", missing.join(", "))
            }
        },
    ));
    let bad_shapes: Vec<String> = expert_keys
        .iter()
        .filter_map(|t| {
            let got = native.get(&t.key)?;
            (got.shape != t.shape || got.dtype != t.dtype).then(|| {
                format!(
                    "{}: {:?} {:?} != {:?} {:?}",
                    t.key, got.dtype, got.shape, t.dtype, t.shape
                )
            })
        })
        .collect();
    checks.push(Check::expect(
        format!("{label}: native shapes and dtypes"),
        bad_shapes.is_empty(),
        "",
        || bad_shapes.join("; "),
    ));

    let back = adapter.to_hf(&native)?;
    checks.push(compare(
        &format!("{label}: HF -> native -> HF bit-identical"),
        &original,
        &back,
    ));

    let tmp = tempfile::tempdir().map_err(|source| adapters::AdapterError::Io {
        path: std::env::temp_dir(),
        source,
    })?;
    let out = tmp.path().join("rewritten");
    let files = write_hf_checkpoint(&out, &back, Some(ckpt.config()), REWRITE_SHARD_BYTES)?;
    let reread = read_all(&HfCheckpoint::open(&out)?)?;
    let mut c = compare(
        &format!("{label}: written HF checkpoint re-reads bit-identical"),
        &original,
        &reread,
    );
    if let crate::report::Outcome::Pass(n) = &mut c.outcome {
        *n = format!("{n}, {} files", files.len());
    }
    checks.push(c);
    Ok(checks)
}
