//! `golden` on damaged copies of a committed fixture: a non-finite router weight or golden input,
//! or a top-k outside [1, E], is a one-line error naming the file and the key or field, not a
//! kernel error without context or a pass.

use adapters::HfCheckpoint;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(name)
}

fn copy_dir(src: &Path, dst: &Path) {
    for e in std::fs::read_dir(src).unwrap() {
        let p = e.unwrap().path();
        if p.is_file() {
            std::fs::copy(&p, dst.join(p.file_name().unwrap())).unwrap();
        }
    }
}

/// Rewrites the safetensors file `path` (with the safetensors crate, metadata kept) with element 0
/// of `key` set to its dtype's quiet NaN.
fn poison(path: &Path, key: &str) {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let mut data: BTreeMap<String, (safetensors::Dtype, Vec<usize>, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .map(|(k, v)| (k, (v.dtype(), v.shape().to_vec(), v.data().to_vec())))
        .collect();
    let (dtype, _, d) = data.get_mut(key).unwrap();
    let nan: &[u8] = match dtype {
        safetensors::Dtype::BF16 => &[0xc0, 0x7f],
        safetensors::Dtype::F32 => &[0, 0, 0xc0, 0x7f],
        safetensors::Dtype::F64 => &[0, 0, 0, 0, 0, 0, 0xf8, 0x7f],
        other => panic!("{other:?}"),
    };
    d[..nan.len()].copy_from_slice(nan);
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = data
        .iter()
        .map(|(k, (t, s, d))| {
            (
                k.clone(),
                safetensors::tensor::TensorView::new(*t, s.clone(), d).unwrap(),
            )
        })
        .collect();
    let out = safetensors::serialize(views, meta.metadata().clone()).unwrap();
    std::fs::write(path, out).unwrap();
}

fn golden_error(dir: &Path) -> String {
    let e = match conformance::golden::run_with(dir, None) {
        Ok(_) => panic!("{}: accepted", dir.display()),
        Err(e) => e.to_string(),
    };
    assert!(!e.contains('\n'), "{e}");
    e
}

#[test]
fn a_nan_router_weight_names_the_key_and_element() {
    let tmp = tempfile::tempdir().unwrap();
    copy_dir(&fixture("qwen3_moe_tiny"), tmp.path());
    // the conversion carries it bit for bit; the forward refuses it
    poison(
        &tmp.path().join("model.safetensors"),
        "model.layers.1.mlp.gate.weight",
    );
    assert!(HfCheckpoint::open(tmp.path()).is_ok());
    assert_eq!(
        golden_error(tmp.path()),
        format!(
            "{}: layer 1: 'model.layers.1.mlp.gate.weight' element [0, 0] is NaN (the MoE block \
             forward needs finite parameters)",
            tmp.path().display()
        )
    );
}

#[test]
fn a_nan_golden_input_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    copy_dir(&fixture("qwen3_moe_tiny"), tmp.path());
    let g = tmp.path().join("golden.safetensors");
    poison(&g, "input");
    assert_eq!(
        golden_error(tmp.path()),
        format!(
            "{}: 'input' element [0, 0] is NaN (not finite)",
            g.display()
        )
    );
}

#[test]
fn top_k_outside_1_to_e_names_config_json_and_the_field() {
    for (k, want) in [
        (
            0,
            "config.json: 'num_experts_per_tok' is 0 (top-k routing needs at least 1 expert per token)",
        ),
        (9, "config.json: 'num_experts_per_tok' is 9 but the model has 8 experts"),
    ] {
        let tmp = tempfile::tempdir().unwrap();
        copy_dir(&fixture("qwen3_moe_tiny"), tmp.path());
        let p = tmp.path().join("config.json");
        let mut c: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
        c["num_experts_per_tok"] = k.into();
        std::fs::write(&p, c.to_string()).unwrap();
        assert_eq!(
            golden_error(tmp.path()),
            format!("{}: {want}", tmp.path().display())
        );
    }
}
