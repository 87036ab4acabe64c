//! The streaming converter: HF -> native -> HF through files is bit-identical (checked by reading
//! with HfCheckpoint and comparing to the source bytes), sharded output has a valid index, a
//! failing conversion leaves neither DST nor a partial directory, and DST must not exist.
mod common;

use adapters::convert::{convert, ConvertOptions, Direction, NATIVE_SIDECAR};
use adapters::{adapter_for, HfCheckpoint};
use std::path::Path;

fn fixture_root() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../conformance/fixtures")
}

fn all_tensors(d: &Path) -> Vec<(String, adapters::HostTensor)> {
    let ck = HfCheckpoint::open(d).unwrap();
    ck.keys()
        .into_iter()
        .map(|k| (k.to_string(), ck.tensor(k).unwrap()))
        .collect()
}

#[test]
fn hf_native_hf_through_files_is_bit_identical() {
    let mut n = 0;
    for name in [
        "qwen3_moe_tiny_sharded",
        "gpt_oss_tiny",
        "mixtral_tiny",
        "step3p5_tiny",
        "qwen3_vl_moe_tiny",
    ] {
        let src = fixture_root().join(name);
        if !src.join("config.json").is_file() {
            eprintln!("skipping absent fixture {name}");
            continue;
        }
        n += 1;
        let tmp = tempfile::tempdir().unwrap();
        let (nat, back) = (tmp.path().join("native"), tmp.path().join("hf"));
        let opts = ConvertOptions {
            max_shard_bytes: 100_000,
            threads: Some(2),
            verify: true,
        };
        let r = convert(&src, &nat, Direction::HfToNative, &opts, &|_| {}).unwrap();
        assert!(r.files > 1 && r.verified, "{name}: {r:?}");
        assert!(
            nat.join("model.safetensors.index.json").is_file()
                && nat.join(NATIVE_SIDECAR).is_file()
        );
        // the native checkpoint equals from_hf of the source
        let ck = HfCheckpoint::open(&src).unwrap();
        let native = adapter_for(&ck).unwrap().from_hf(&ck).unwrap();
        let got: std::collections::BTreeMap<_, _> = all_tensors(&nat).into_iter().collect();
        assert_eq!(got, native, "{name}");
        let r2 = convert(
            &nat,
            &back,
            Direction::NativeToHf,
            &ConvertOptions {
                verify: true,
                ..Default::default()
            },
            &|_| {},
        )
        .unwrap();
        assert_eq!(r2.files, 1);
        assert_eq!(all_tensors(&back), all_tensors(&src), "{name}");
        // destination exists -> error, nothing touched
        let e = convert(&src, &back, Direction::HfToNative, &opts, &|_| {})
            .unwrap_err()
            .to_string();
        assert!(e.contains("exists"), "{e}");
    }
    assert!(n > 0 || !fixture_root().exists());
}

#[test]
fn failed_conversion_leaves_nothing() {
    let src = fixture_root().join("mixtral_tiny");
    if !src.join("config.json").is_file() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let broken = tmp.path().join("broken");
    std::fs::create_dir(&broken).unwrap();
    // a native "checkpoint" with no sidecar: native -> hf must fail before writing anything
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(src.join(f), broken.join(f)).unwrap();
    }
    let dst = tmp.path().join("out");
    let e = convert(
        &broken,
        &dst,
        Direction::NativeToHf,
        &ConvertOptions::default(),
        &|_| {},
    )
    .unwrap_err();
    assert!(e.to_string().contains(NATIVE_SIDECAR), "{e}");
    let left: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(left, vec![std::ffi::OsString::from("broken")]);
}

/// Checkpoints big enough that the converter splits expert groups into several batches of
/// experts, copies into several pieces and files into several windows, with H and I that are
/// not multiples of the transpose tiles: HF -> native equals `from_hf`, and back is bit-identical
/// (per-expert bf16 and fused f32, one file and sharded).
#[test]
fn large_groups_split_into_pieces_and_windows_are_bit_identical() {
    use adapters::Dtype;
    for (dtype, fused, layers, shard) in [
        (Dtype::BF16, false, 13, 5_000_000_000u64),
        (Dtype::F32, true, 7, 15_000_000),
    ] {
        let d = common::Dims {
            layers,
            e: 64,
            h: 130,
            i: 66,
        };
        let mut tensors = common::hf_tensors(d, dtype, fused);
        // a vocabulary of 5000: embed_tokens and lm_head [5000, H] are the largest tensors
        for (seed, k) in [(7, "lm_head.weight"), (8, "model.embed_tokens.weight")] {
            tensors.insert(k.into(), common::rand_tensor(seed, dtype, &[5000, d.h]));
        }
        let mut cfg = common::config(d, "qwen3_moe");
        cfg["vocab_size"] = 5000.into();
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("src");
        std::fs::create_dir(&src).unwrap();
        common::write_ckpt(&src, &cfg, &tensors, 2);
        let (nat, back) = (tmp.path().join("native"), tmp.path().join("hf"));
        let opts = ConvertOptions {
            max_shard_bytes: shard,
            threads: Some(3),
            verify: true,
        };
        convert(&src, &nat, Direction::HfToNative, &opts, &|_| {}).unwrap();
        let ck = HfCheckpoint::open(&src).unwrap();
        let native = adapter_for(&ck).unwrap().from_hf(&ck).unwrap();
        let got: std::collections::BTreeMap<_, _> = all_tensors(&nat).into_iter().collect();
        assert!(
            got == native,
            "{dtype} fused={fused}: native differs from from_hf"
        );
        convert(&nat, &back, Direction::NativeToHf, &opts, &|_| {}).unwrap();
        let back_t: std::collections::BTreeMap<_, _> = all_tensors(&back).into_iter().collect();
        assert!(
            back_t == tensors,
            "{dtype} fused={fused}: round trip differs"
        );
    }
}
