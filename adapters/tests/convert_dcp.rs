//! `adapters convert --from dcp` / `--to dcp` through the library: against the tensors stock torch
//! loaded from its own checkpoints (`conformance/fixtures/dcp/*/expected.safetensors`), against the
//! per-expert split formula of transformers' fused tensors, and HF -> DCP -> HF round trips.

use adapters::convert::ConvertOptions;
use adapters::convert_dcp::{dcp_to_hf, dcp_to_safetensors, hf_to_dcp, DcpPlan};
use adapters::{dcp, HfCheckpoint, HostTensor};
use placement::parse_placements;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../conformance/fixtures")
}

fn safetensors_dir(dir: &Path) -> BTreeMap<String, HostTensor> {
    let mut out = BTreeMap::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        if !name.ends_with(".safetensors") || name == "golden.safetensors" {
            continue;
        }
        let bytes = std::fs::read(&p).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        for (k, v) in st.tensors() {
            let t = HostTensor::new(v.dtype(), v.shape().to_vec(), v.data().to_vec()).unwrap();
            assert!(out.insert(k, t).is_none());
        }
    }
    out
}

fn opts(max: u64) -> ConvertOptions {
    ConvertOptions {
        max_shard_bytes: max,
        threads: Some(2),
        verify: true,
    }
}

#[test]
fn dcp_to_safetensors_equals_what_torch_loads() {
    for name in [
        "fsdp2_w2",
        "fsdp2_w4",
        "ep_fsdp_w4",
        "tp_w2",
        "tp_w4",
        "fsdp_tp_w4",
        "seed_bug_w2",
        "views_w1",
        "hf_sharded_w2",
        "hf_consolidated_w2",
    ] {
        let t = tempfile::tempdir().unwrap();
        let out = t.path().join("out");
        // 20 kB files: several files + index.
        let r = dcp_to_safetensors(
            &fixtures().join(format!("dcp/{name}/ckpt")),
            &out,
            &opts(20_000),
            &|_| {},
        )
        .unwrap();
        let want = safetensors_dir(&fixtures().join(format!("dcp/{name}")));
        let got = safetensors_dir(&out);
        assert_eq!(
            got.keys().collect::<Vec<_>>(),
            want.keys().collect::<Vec<_>>(),
            "{name}"
        );
        for (k, w) in &want {
            assert!(got[k] == *w, "{name}: {k}");
        }
        assert!(r.verified, "{name}");
        if r.bytes > 20_000 {
            assert!(
                r.files > 1 && out.join("model.safetensors.index.json").is_file(),
                "{name}"
            );
        }
        if name == "fsdp2_w2" {
            assert_eq!(r.skipped_items, 2, "train_state.* are not tensors");
        }
    }
}

#[test]
fn dcp_in_transformers_naming_to_hf_per_expert() {
    let t = tempfile::tempdir().unwrap();
    let out = t.path().join("hf");
    dcp_to_hf(
        &fixtures().join("dcp/tp_w4/ckpt"),
        &out,
        &fixtures().join("dcp/model"),
        &opts(5_000_000_000),
        &|_| {},
    )
    .unwrap();
    let want = safetensors_dir(&fixtures().join("dcp/tp_w4"));
    let got = safetensors_dir(&out);
    let hf = HfCheckpoint::open(&out).unwrap();
    assert_eq!(hf.model_type().unwrap(), "qwen3_moe");
    // gate_up_proj [E, 2I, H]: expert e's gate = rows 0..I, up = rows I..2I; down_proj [E, H, I].
    let (e, i) = (8usize, 24usize);
    let gu = &want["model.layers.0.mlp.experts.gate_up_proj"];
    let dn = &want["model.layers.0.mlp.experts.down_proj"];
    let per_gu = gu.data.len() / e;
    let per_dn = dn.data.len() / e;
    for x in 0..e {
        let g = &got[&format!("model.layers.0.mlp.experts.{x}.gate_proj.weight")];
        let u = &got[&format!("model.layers.0.mlp.experts.{x}.up_proj.weight")];
        let d = &got[&format!("model.layers.0.mlp.experts.{x}.down_proj.weight")];
        assert_eq!(
            (g.shape.clone(), d.shape.clone()),
            (vec![i, 65], vec![65, i])
        );
        let half = per_gu / 2;
        assert_eq!(g.data, gu.data[x * per_gu..x * per_gu + half]);
        assert_eq!(u.data, gu.data[x * per_gu + half..(x + 1) * per_gu]);
        assert_eq!(d.data, dn.data[x * per_dn..(x + 1) * per_dn]);
    }
    for (k, w) in &want {
        if !k.contains(".experts.") {
            assert!(got[k] == *w, "{k} passes through unchanged");
        }
    }
    // The seed bug is refused, naming the checkpoint, the tensor and both shapes.
    let e = dcp_to_hf(
        &fixtures().join("dcp/seed_bug_w2/ckpt"),
        &t.path().join("bug"),
        &fixtures().join("dcp/model"),
        &opts(5_000_000_000),
        &|_| {},
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("seed_bug_w2")
            && e.contains("down_proj")
            && e.contains("[8, 130, 12]")
            && e.contains("[8, 65, 24]"),
        "{e}"
    );
    assert!(!t.path().join("bug").exists());
}

#[test]
fn hf_to_dcp_to_hf_is_bit_identical_and_reshards() {
    for (fx, plan) in [
        ("qwen3_moe_tiny", DcpPlan::named("ep-tp", 4).unwrap()),
        ("gpt_oss_tiny", DcpPlan::named("tp", 2).unwrap()),
        ("mixtral_tiny", DcpPlan::named("fsdp", 2).unwrap()),
        (
            "deepseek_v3_tiny",
            DcpPlan::Explicit {
                mesh: vec![2, 2],
                rules: vec![(
                    "*.experts.*".into(),
                    parse_placements("[S(0), _S(2, 3)]").unwrap(),
                )],
                default: Some(parse_placements("[R, S(0)]").unwrap()),
            },
        ),
        ("qwen3_vl_moe_tiny", DcpPlan::named("ep", 4).unwrap()),
    ] {
        let t = tempfile::tempdir().unwrap();
        let src = fixtures().join(fx);
        let d = t.path().join("dcp");
        hf_to_dcp(&src, &d, &plan, &opts(5_000_000_000), &|_| {}).unwrap();
        let ck = dcp::open(&d).unwrap();
        assert_eq!(ck.extra()["converted_from"], "hf");
        assert_eq!(ck.world_size(), plan.mesh().unwrap().size());
        let back = t.path().join("back");
        dcp_to_hf(&d, &back, &src, &opts(5_000_000_000), &|_| {}).unwrap();
        let (a, b) = (safetensors_dir(&src), safetensors_dir(&back));
        assert_eq!(
            a.keys().collect::<Vec<_>>(),
            b.keys().collect::<Vec<_>>(),
            "{fx}"
        );
        for (k, v) in &a {
            assert!(b[k] == *v, "{fx}: {k}");
        }
    }
}

#[test]
fn conversion_errors_are_one_line_and_leave_nothing() {
    let t = tempfile::tempdir().unwrap();
    let src = fixtures().join("qwen3_moe_tiny");
    let bad = DcpPlan::Explicit {
        mesh: vec![2],
        rules: vec![("*.down_projs".into(), parse_placements("[S(7)]").unwrap())],
        default: None,
    };
    let e = hf_to_dcp(&src, &t.path().join("x"), &bad, &opts(1 << 30), &|_| {})
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("down_projs") && e.contains("S(7)") && !e.contains('\n'),
        "{e}"
    );
    assert!(!t.path().join("x").exists());
    assert!(DcpPlan::named("ep-tp", 3)
        .unwrap_err()
        .to_string()
        .contains("even world size"));
    // (An HF checkpoint directory reads as a consolidated DCP, as torch's HF storage reader does.)
    let no_data = fixtures().join("dcp/model");
    let e = dcp_to_safetensors(&no_data, &t.path().join("y"), &opts(1 << 30), &|_| {})
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("not a DCP checkpoint") || e.contains("incomplete"),
        "{e}"
    );
    std::fs::create_dir(t.path().join("exists")).unwrap();
    let e = dcp_to_safetensors(
        &fixtures().join("dcp/tp_w2/ckpt"),
        &t.path().join("exists"),
        &opts(1 << 30),
        &|_| {},
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("exists"), "{e}");
    let left: Vec<_> = std::fs::read_dir(t.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(
        left.len(),
        1,
        "no partial or stage directories left: {left:?}"
    );
}
