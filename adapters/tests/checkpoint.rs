//! HfCheckpoint validation (one-line errors naming file and key) and the writer round trip.
mod common;

use adapters::{write_hf_checkpoint, Dtype, HfCheckpoint, HostTensor};
use common::{rand_tensor, raw_file};
use serde_json::json;
use std::collections::BTreeMap;
use std::path::Path;

fn open_err(dir: &Path) -> String {
    let e = HfCheckpoint::open(dir).unwrap_err().to_string();
    assert!(!e.contains('\n'), "message is not one line: {e}");
    e
}

fn write(dir: &Path, name: &str, bytes: &[u8]) {
    std::fs::write(dir.join(name), bytes).unwrap();
}

fn assert_has(e: &str, parts: &[&str]) {
    for p in parts {
        assert!(e.contains(p), "expected {p:?} in: {e}");
    }
}

/// A valid single-tensor file: key `w` F32 [2, 2].
fn valid_one(key: &str) -> Vec<u8> {
    let h = format!(r#"{{"{key}":{{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]}}}}"#);
    raw_file(&h, &[7u8; 16])
}

#[test]
fn valid_file_opens_and_reads() {
    let d = tempfile::tempdir().unwrap();
    write(d.path(), "model.safetensors", &valid_one("w"));
    let ck = HfCheckpoint::open(d.path()).unwrap();
    assert_eq!(ck.keys(), vec!["w"]);
    let t = ck.tensor("w").unwrap();
    assert_eq!(
        (t.dtype, t.shape.clone(), t.data.clone()),
        (Dtype::F32, vec![2, 2], vec![7u8; 16])
    );
    assert_eq!(
        ck.info("w").unwrap().file,
        d.path().join("model.safetensors")
    );
    let e = ck.tensor("nope").unwrap_err().to_string();
    assert_has(&e, &["'nope'", &d.path().display().to_string()]);
    // no config.json: model_type errors
    assert!(ck.model_type().is_err());
}

#[test]
fn truncated_file() {
    let d = tempfile::tempdir().unwrap();
    let mut b = valid_one("model.layers.0.mlp.experts.3.up_proj.weight");
    b.truncate(b.len() - 4);
    write(d.path(), "model.safetensors", &b);
    let e = open_err(d.path());
    assert_has(
        &e,
        &[
            "model.safetensors",
            "'model.layers.0.mlp.experts.3.up_proj.weight'",
            "data [0, 16) extends past end of file",
        ],
    );
    write(d.path(), "model.safetensors", &[1, 2, 3]);
    assert_has(
        &open_err(d.path()),
        &["model.safetensors", "3 bytes", "truncated"],
    );
}

#[test]
fn header_length_beyond_file() {
    let d = tempfile::tempdir().unwrap();
    let mut b = 9_999_999u64.to_le_bytes().to_vec();
    b.extend_from_slice(&[b' '; 100]);
    write(d.path(), "model.safetensors", &b);
    assert_has(
        &open_err(d.path()),
        &["model.safetensors: header length 9999999 exceeds file size 108"],
    );
}

#[test]
fn data_offsets_out_of_range() {
    let d = tempfile::tempdir().unwrap();
    let h = r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[100,108]}}"#;
    write(d.path(), "model.safetensors", &raw_file(h, &[0u8; 16]));
    assert_has(
        &open_err(d.path()),
        &[
            "model.safetensors",
            "tensor 'b'",
            "data [100, 108) extends past end of file",
        ],
    );
}

#[test]
fn overlapping_offsets() {
    let d = tempfile::tempdir().unwrap();
    let h = r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}"#;
    write(d.path(), "model.safetensors", &raw_file(h, &[0u8; 12]));
    assert_has(
        &open_err(d.path()),
        &["model.safetensors", "tensor 'b'", "overlaps tensor 'a'"],
    );
}

#[test]
fn shape_dtype_bytecount_mismatch() {
    let d = tempfile::tempdir().unwrap();
    let h = r#"{"w":{"dtype":"BF16","shape":[3,2],"data_offsets":[0,8]}}"#;
    write(d.path(), "model.safetensors", &raw_file(h, &[0u8; 8]));
    assert_has(
        &open_err(d.path()),
        &[
            "model.safetensors",
            "tensor 'w'",
            "needs 12 bytes",
            "spans 8 bytes",
        ],
    );
    let h = r#"{"w":{"dtype":"Q4","shape":[2],"data_offsets":[0,8]}}"#;
    write(d.path(), "model.safetensors", &raw_file(h, &[0u8; 8]));
    assert_has(
        &open_err(d.path()),
        &["model.safetensors", "tensor 'w'", "unknown dtype"],
    );
}

#[test]
fn gap_and_bad_json() {
    let d = tempfile::tempdir().unwrap();
    let h = r#"{"w":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#;
    write(d.path(), "model.safetensors", &raw_file(h, &[0u8; 8]));
    assert_has(
        &open_err(d.path()),
        &["model.safetensors", "tensor 'w'", "gap"],
    );
    write(d.path(), "model.safetensors", &raw_file("{not json", &[]));
    assert_has(
        &open_err(d.path()),
        &["model.safetensors", "not valid JSON"],
    );
}

fn write_index(dir: &Path, wm: serde_json::Value) {
    let v = json!({"metadata": {"total_size": 32}, "weight_map": wm});
    write(
        dir,
        "model.safetensors.index.json",
        v.to_string().as_bytes(),
    );
}

#[test]
fn duplicate_key_across_shards() {
    let d = tempfile::tempdir().unwrap();
    write(
        d.path(),
        "model-00001-of-00002.safetensors",
        &valid_one("x"),
    );
    write(
        d.path(),
        "model-00002-of-00002.safetensors",
        &valid_one("x"),
    );
    write_index(
        d.path(),
        json!({"x": "model-00001-of-00002.safetensors", "y": "model-00002-of-00002.safetensors"}),
    );
    assert_has(
        &open_err(d.path()),
        &[
            "model-00002-of-00002.safetensors",
            "duplicate key 'x'",
            "model-00001-of-00002.safetensors",
        ],
    );
}

#[test]
fn index_names_missing_file() {
    let d = tempfile::tempdir().unwrap();
    write(
        d.path(),
        "model-00001-of-00002.safetensors",
        &valid_one("x"),
    );
    write_index(
        d.path(),
        json!({"x": "model-00001-of-00002.safetensors", "y": "model-00002-of-00002.safetensors"}),
    );
    assert_has(
        &open_err(d.path()),
        &[
            "model.safetensors.index.json",
            "missing file 'model-00002-of-00002.safetensors'",
            "'y'",
        ],
    );
}

#[test]
fn index_key_absent_from_its_file() {
    let d = tempfile::tempdir().unwrap();
    write(
        d.path(),
        "model-00001-of-00002.safetensors",
        &valid_one("x"),
    );
    write(
        d.path(),
        "model-00002-of-00002.safetensors",
        &valid_one("y"),
    );
    write_index(
        d.path(),
        json!({"x": "model-00001-of-00002.safetensors", "y": "model-00002-of-00002.safetensors",
               "z": "model-00002-of-00002.safetensors"}),
    );
    assert_has(
        &open_err(d.path()),
        &[
            "model.safetensors.index.json",
            "key 'z'",
            "'model-00002-of-00002.safetensors'",
            "absent",
        ],
    );
    // and a key in a file that the index does not list
    write_index(
        d.path(),
        json!({"x": "model-00001-of-00002.safetensors", "z": "model-00002-of-00002.safetensors"}),
    );
    let e = open_err(d.path());
    assert!(e.contains("'z'") || e.contains("'y'"), "{e}");
}

#[test]
fn missing_weights_file() {
    let d = tempfile::tempdir().unwrap();
    assert_has(
        &open_err(d.path()),
        &["neither model.safetensors nor model.safetensors.index.json"],
    );
}

fn sample_tensors() -> BTreeMap<String, HostTensor> {
    let mut m = BTreeMap::new();
    for (i, k) in ["b.weight", "a.weight", "c.bias", "d.weight", "e.weight"]
        .iter()
        .enumerate()
    {
        let dt = if i % 2 == 0 { Dtype::BF16 } else { Dtype::F32 };
        m.insert(k.to_string(), rand_tensor(i as u64 + 40, dt, &[3, i + 1]));
    }
    m
}

#[test]
fn writer_single_file_round_trip() {
    let d = tempfile::tempdir().unwrap();
    let m = sample_tensors();
    let cfg = json!({"model_type": "qwen3_moe"});
    let files = write_hf_checkpoint(d.path(), &m, Some(&cfg), 1 << 30).unwrap();
    assert_eq!(
        files,
        vec![
            d.path().join("model.safetensors"),
            d.path().join("config.json")
        ]
    );
    let ck = HfCheckpoint::open(d.path()).unwrap();
    assert_eq!(ck.model_type().unwrap(), "qwen3_moe");
    assert_eq!(ck.keys(), m.keys().map(String::as_str).collect::<Vec<_>>());
    for (k, t) in &m {
        assert_eq!(&ck.tensor(k).unwrap(), t, "{k}");
    }
    assert_eq!(ck.metadata().get("format").map(String::as_str), Some("pt"));
    // no temp files left behind
    let names: Vec<String> = std::fs::read_dir(d.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(names.iter().all(|n| !n.contains(".tmp-")), "{names:?}");
}

#[test]
fn writer_sharded_round_trip_and_index() {
    let d = tempfile::tempdir().unwrap();
    let m = sample_tensors();
    let total: u64 = m.values().map(|t| t.data.len() as u64).sum();
    // An earlier single-file save in the same dir must not survive next to the shards.
    write_hf_checkpoint(d.path(), &m, None, u64::MAX).unwrap();
    let files = write_hf_checkpoint(d.path(), &m, None, 40).unwrap();
    assert!(!d.path().join("model.safetensors").exists());
    let n = files.len() - 1;
    assert!(n >= 2, "{files:?}");
    assert_eq!(files[n], d.path().join("model.safetensors.index.json"));
    for (i, f) in files[..n].iter().enumerate() {
        assert_eq!(
            f,
            &d.path()
                .join(format!("model-{:05}-of-{:05}.safetensors", i + 1, n))
        );
    }
    let idx: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&files[n]).unwrap()).unwrap();
    assert_eq!(idx["metadata"]["total_size"].as_u64(), Some(total));
    let wm = idx["weight_map"].as_object().unwrap();
    assert_eq!(wm.len(), m.len());
    // keys fill shards in sorted order: the shard number never decreases along sorted keys
    let shard_no: Vec<&str> = m.keys().map(|k| wm[k].as_str().unwrap()).collect();
    assert!(shard_no.windows(2).all(|w| w[0] <= w[1]), "{shard_no:?}");
    let ck = HfCheckpoint::open(d.path()).unwrap();
    for (k, t) in &m {
        assert_eq!(&ck.tensor(k).unwrap(), t, "{k}");
        assert_eq!(
            ck.info(k).unwrap().file,
            d.path().join(wm[k].as_str().unwrap())
        );
    }
    // each shard respects the limit unless it holds a single larger tensor
    for f in &files[..n] {
        let c = safetensors::SafeTensors::deserialize(&std::fs::read(f).unwrap())
            .unwrap()
            .len();
        let bytes: usize = safetensors::SafeTensors::deserialize(&std::fs::read(f).unwrap())
            .unwrap()
            .tensors()
            .iter()
            .map(|(_, v)| v.data().len())
            .sum();
        assert!(bytes <= 40 || c == 1, "{f:?}: {bytes} bytes in {c} tensors");
    }
}
