//! The conformance fixtures written by transformers (conformance/fixtures/qwen3_moe_tiny*):
//! open, convert, round-trip bit-identically, and check the golden gradient keys name HF tensors.
//! Read-only use of the fixture directories; skipped (with a note on stderr) when absent.
use adapters::{adapter_for, assemble, write_hf_checkpoint, HfCheckpoint};
use placement::{DeviceMesh, Placement};
use std::path::PathBuf;

fn fixture_dirs() -> Vec<PathBuf> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../conformance/fixtures");
    ["qwen3_moe_tiny", "qwen3_moe_tiny_sharded"]
        .iter()
        .map(|n| root.join(n))
        .filter(|p| {
            let ok = p.join("config.json").is_file();
            if !ok {
                eprintln!("skipping absent fixture {}", p.display());
            }
            ok
        })
        .collect()
}

#[test]
fn fixtures_round_trip_bit_identically() {
    for dir in fixture_dirs() {
        let ck = HfCheckpoint::open(&dir).unwrap();
        let a = adapter_for(&ck).unwrap();
        assert_eq!(a.model_type(), "qwen3_moe");
        let native = a.from_hf(&ck).unwrap();
        for l in a.moe_layers() {
            assert!(native.contains_key(&format!("model.layers.{l}.mlp.experts.gate_and_up_projs")));
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
