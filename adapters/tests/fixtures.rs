//! The conformance fixtures written by transformers (conformance/fixtures/qwen3_moe_tiny*):
//! open, convert, round-trip bit-identically, and check the golden gradient keys name HF tensors.
//! Read-only use of the fixture directories; skipped (with a note on stderr) when absent.
use adapters::{adapter_for, assemble, write_hf_checkpoint, HfCheckpoint};
use placement::{DeviceMesh, Placement};
use std::path::PathBuf;

/// Every fixture folder (a directory with config.json); golden ones have golden.safetensors.
fn fixture_dirs() -> Vec<PathBuf> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../conformance/fixtures");
    let mut v: Vec<PathBuf> = std::fs::read_dir(&root)
        .map(|rd| rd.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    v.retain(|p| p.join("config.json").is_file());
    v.sort();
    if v.is_empty() {
        eprintln!("skipping: no fixtures under {}", root.display());
    }
    v
}

#[test]
fn fixtures_round_trip_bit_identically() {
    for dir in fixture_dirs() {
        let ck = HfCheckpoint::open(&dir).unwrap();
        let a = adapter_for(&ck).unwrap();
        assert_eq!(Some(a.model_type()), ck.config()["model_type"].as_str());
        let native = a.from_hf(&ck).unwrap();
        assert!(!a.moe_layers().is_empty(), "{}", dir.display());
        for l in a.moe_layers() {
            let keys = a.native_moe_keys(l).unwrap();
            for k in [&keys.gate_weight, &keys.gate_and_up_projs, &keys.down_projs]
                .into_iter()
                .chain(keys.gate_bias.iter())
                .chain(keys.e_score_correction_bias.iter())
                .chain(keys.gate_up_proj_bias.iter())
                .chain(keys.down_proj_bias.iter())
                .chain(keys.shared.iter().flatten())
                .chain(keys.shared_gate.iter())
            {
                assert!(native.contains_key(k), "{}: {k}", dir.display());
            }
        }
        let back = a.to_hf(&native).unwrap();
        let keys: Vec<&str> = back.keys().map(String::as_str).collect();
        assert_eq!(keys, ck.keys(), "{}", dir.display());
        for (k, t) in &back {
            assert_eq!(t, &ck.tensor(k).unwrap(), "{}: {k}", dir.display());
        }
        // EP shards of every native expert tensor assemble to the whole.
        let mesh = DeviceMesh::new(vec![4]).unwrap();
        for info in a.native_expert_tensors(&ck).unwrap() {
            let parts: Vec<_> = (0..4)
                .map(|r| {
                    let lt = a
                        .from_hf_local(&ck, &info.key, &mesh, &[Placement::Shard(0)], &[r])
                        .unwrap();
                    (lt.indices, lt.tensor)
                })
                .collect();
            assert_eq!(
                assemble(&info.shape, info.dtype, &parts).unwrap(),
                native[&info.key]
            );
        }
        // Writer: re-save to a temp dir (sharded), reopen, same tensors.
        let tmp = tempfile::tempdir().unwrap();
        write_hf_checkpoint(tmp.path(), &back, Some(ck.config()), 100_000).unwrap();
        let ck2 = HfCheckpoint::open(tmp.path()).unwrap();
        for (k, t) in &back {
            assert_eq!(t, &ck2.tensor(k).unwrap(), "{k}");
        }
        // golden.safetensors: grad.<HF disk key> must name a checkpoint tensor of the same shape.
        if !dir.join("golden.safetensors").is_file() {
            assert!(
                dir.to_string_lossy().ends_with("_roundtrip_only"),
                "{}",
                dir.display()
            );
            continue;
        }
        let golden = std::fs::read(dir.join("golden.safetensors")).unwrap();
        let g = safetensors::SafeTensors::deserialize(&golden).unwrap();
        let mut n = 0;
        for (k, v) in g.tensors() {
            if let Some(hk) = k.strip_prefix("grad.") {
                assert_eq!(ck.info(hk).unwrap().shape, v.shape(), "{k}");
                n += 1;
            }
        }
        assert!(n > 0);
    }
}
