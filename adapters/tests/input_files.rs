//! What a checkpoint directory may hold: only regular files are read (a FIFO, a device or a
//! directory in a file's place is an error naming it, returned without blocking), JSON and
//! safetensors headers must not repeat a key, and the native sidecar must agree with config.json.

mod common;

use adapters::convert::{convert, ConvertOptions, Direction, NATIVE_SIDECAR};
use adapters::HfCheckpoint;
use std::path::{Path, PathBuf};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../conformance/fixtures")
        .join(name)
}

fn mkfifo(p: &Path) {
    let ok = std::process::Command::new("mkfifo")
        .arg(p)
        .status()
        .unwrap()
        .success();
    assert!(ok, "mkfifo {}", p.display());
}

fn open_err(dir: &Path) -> String {
    let e = HfCheckpoint::open(dir).unwrap_err().to_string();
    assert!(!e.contains('\n'), "{e}");
    e
}

#[test]
fn a_fifo_or_directory_in_place_of_a_file_is_named_not_read() {
    for file in ["model.safetensors", "config.json"] {
        for (what, make) in [
            ("a FIFO (named pipe)", mkfifo as fn(&Path)),
            ("a directory", |p: &Path| std::fs::create_dir(p).unwrap()),
        ] {
            let tmp = tempfile::tempdir().unwrap();
            common::copy_dir(&fixture("qwen3_moe_tiny"), tmp.path());
            let p = tmp.path().join(file);
            std::fs::remove_file(&p).unwrap();
            make(&p);
            let e = open_err(tmp.path());
            assert_eq!(
                e,
                format!("{}: is {what}, not a regular file", p.display()),
                "{file}"
            );
        }
    }
}

#[test]
fn a_shard_named_by_the_index_must_be_a_regular_file() {
    let tmp = tempfile::tempdir().unwrap();
    common::copy_dir(&fixture("qwen3_moe_tiny_sharded"), tmp.path());
    let shard = tmp.path().join("model-00002-of-00003.safetensors");
    assert!(shard.is_file());
    std::fs::remove_file(&shard).unwrap();
    mkfifo(&shard);
    let e = open_err(tmp.path());
    assert!(
        e.ends_with("is a FIFO (named pipe), not a regular file"),
        "{e}"
    );
    // and a file where the directory should be
    let e = open_err(&tmp.path().join("config.json"));
    assert!(e.ends_with("config.json: not a directory (a checkpoint is a directory holding model.safetensors or model.safetensors.index.json)"), "{e}");
}

#[test]
fn a_repeated_key_in_a_header_or_config_is_an_error() {
    // Two entries for one key with different dtypes: serde_json keeps the last one silently.
    let tmp = tempfile::tempdir().unwrap();
    let header = r#"{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"w":{"dtype":"I32","shape":[1],"data_offsets":[0,4]}}"#;
    std::fs::write(
        tmp.path().join("model.safetensors"),
        common::raw_file(header, &[0; 4]),
    )
    .unwrap();
    let e = open_err(tmp.path());
    assert!(
        e.starts_with("model.safetensors: header is not valid JSON: duplicate key 'w'"),
        "{e}"
    );

    let tmp = tempfile::tempdir().unwrap();
    common::copy_dir(&fixture("qwen3_moe_tiny"), tmp.path());
    let cfg = tmp.path().join("config.json");
    let text = std::fs::read_to_string(&cfg).unwrap();
    let text = text.replacen('{', r#"{"num_local_experts": 4,"#, 1);
    std::fs::write(&cfg, text).unwrap();
    let e = open_err(tmp.path());
    assert!(
        e.starts_with(&format!(
            "{}: not valid JSON: duplicate key 'num_local_experts'",
            cfg.display()
        )),
        "{e}"
    );
}

#[test]
fn the_native_sidecar_must_name_config_jsons_family() {
    let tmp = tempfile::tempdir().unwrap();
    let nat = tmp.path().join("native");
    let opts = ConvertOptions::default();
    convert(
        &fixture("qwen3_moe_tiny"),
        &nat,
        Direction::HfToNative,
        &opts,
        &|_| {},
    )
    .unwrap();
    let side = nat.join(NATIVE_SIDECAR);
    let text = std::fs::read_to_string(&side).unwrap();
    assert!(text.contains(r#""model_type": "qwen3_moe""#), "{text}");
    std::fs::write(&side, text.replace(r#""qwen3_moe""#, r#""mixtral""#)).unwrap();
    let back = tmp.path().join("hf");
    let e = convert(&nat, &back, Direction::NativeToHf, &opts, &|_| {})
        .unwrap_err()
        .to_string();
    assert_eq!(
        e,
        format!(
            "{}: model_type is \"mixtral\" but config.json's is \"qwen3_moe\"",
            side.display()
        )
    );
    assert!(!back.exists());
}
