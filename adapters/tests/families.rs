//! Every family's adapter against independent references: the element formulas of the README ("Native grouped layout")
//! written out as index loops, round trips, gradient subsets, local shards vs gather(whole) with
//! each HF piece's placements checked through placement::local_shard, and the large Step3.5
//! [288, 4096, 1280] placement case.
mod common;

use adapters::family::{spec_for, FamilyConfig};
use adapters::family_adapter::LayoutChoice;
use adapters::{
    adapter_for, assemble, DiskLayout, Dtype, FamilyAdapter, HfCheckpoint, HostTensor, LocalTensor,
    MoeAdapter,
};
use common::{elem, rand_tensor};
use placement::{local_shard, DeviceMesh, IndexSet, Placement};
use serde_json::{json, Value};
use std::collections::BTreeMap;

const E: usize = 4;
const H: usize = 6;
const I: usize = 5;
const IS: usize = 3; // shared-expert intermediate size

struct Ckpt {
    _dir: tempfile::TempDir,
    ckpt: HfCheckpoint,
    hf: BTreeMap<String, HostTensor>,
}

/// One synthetic checkpoint per family: layer 0 dense, layer 1 MoE, with every optional tensor.
fn family_ckpt(family: &str, fused: bool, nshards: usize) -> Ckpt {
    let mut hf = BTreeMap::new();
    let mut seed = 7u64;
    let mut add = |k: String, dtype: Dtype, shape: &[usize]| {
        seed += 1;
        hf.insert(k, rand_tensor(seed, dtype, shape));
    };
    let bf = Dtype::BF16;
    let vl = family == "qwen3_vl_moe";
    let pre = if vl {
        "model.language_model.layers"
    } else {
        "model.layers"
    };
    let text = if vl { "model.language_model" } else { "model" };
    add(format!("{text}.embed_tokens.weight"), bf, &[11, H]);
    for l in 0..2 {
        let p = format!("{pre}.{l}");
        add(format!("{p}.input_layernorm.weight"), bf, &[H]);
        let dense_first = matches!(family, "deepseek_v3" | "glm4_moe" | "step3p5");
        if l == 0 && dense_first {
            add(format!("{p}.mlp.gate_proj.weight"), bf, &[7, H]);
            add(format!("{p}.mlp.up_proj.weight"), bf, &[7, H]);
            add(format!("{p}.mlp.down_proj.weight"), bf, &[H, 7]);
            continue;
        }
        let m = match family {
            "mixtral" => "block_sparse_moe",
            "step3p5" => "moe",
            _ => "mlp",
        };
        match family {
            "gpt_oss" => {
                add(format!("{p}.mlp.router.weight"), bf, &[E, H]);
                add(format!("{p}.mlp.router.bias"), bf, &[E]);
                add(format!("{p}.mlp.experts.gate_up_proj"), bf, &[E, H, 2 * I]);
                add(
                    format!("{p}.mlp.experts.gate_up_proj_bias"),
                    bf,
                    &[E, 2 * I],
                );
                add(format!("{p}.mlp.experts.down_proj"), bf, &[E, I, H]);
                add(format!("{p}.mlp.experts.down_proj_bias"), bf, &[E, H]);
            }
            "step3p5" => {
                add(format!("{p}.moe.gate.weight"), bf, &[E, H]);
                add(format!("{p}.moe.router_bias"), Dtype::F32, &[E]);
                add(format!("{p}.moe.gate_proj.weight"), bf, &[E, I, H]);
                add(format!("{p}.moe.up_proj.weight"), bf, &[E, I, H]);
                add(format!("{p}.moe.down_proj.weight"), bf, &[E, H, I]);
                for (n, s) in [
                    ("gate_proj", [IS, H]),
                    ("up_proj", [IS, H]),
                    ("down_proj", [H, IS]),
                ] {
                    add(format!("{p}.share_expert.{n}.weight"), bf, &s);
                }
            }
            _ => {
                add(format!("{p}.{m}.gate.weight"), bf, &[E, H]);
                let names = if family == "mixtral" {
                    ["w1.weight", "w3.weight", "w2.weight"]
                } else {
                    ["gate_proj.weight", "up_proj.weight", "down_proj.weight"]
                };
                if vl && !fused {
                    // published Qwen3-VL-MoE: fused, native orientation
                    add(format!("{p}.mlp.experts.gate_up_proj"), bf, &[E, H, 2 * I]);
                    add(format!("{p}.mlp.experts.down_proj"), bf, &[E, I, H]);
                } else if fused {
                    add(format!("{p}.{m}.experts.gate_up_proj"), bf, &[E, 2 * I, H]);
                    add(format!("{p}.{m}.experts.down_proj"), bf, &[E, H, I]);
                } else {
                    for e in 0..E {
                        add(format!("{p}.{m}.experts.{e}.{}", names[0]), bf, &[I, H]);
                        add(format!("{p}.{m}.experts.{e}.{}", names[1]), bf, &[I, H]);
                        add(format!("{p}.{m}.experts.{e}.{}", names[2]), bf, &[H, I]);
                    }
                }
                if matches!(family, "deepseek_v3" | "glm4_moe") {
                    add(
                        format!("{p}.mlp.gate.e_score_correction_bias"),
                        Dtype::F32,
                        &[E],
                    );
                }
                let shared = match family {
                    "deepseek_v3" | "glm4_moe" => Some("shared_experts"),
                    "qwen3_next" | "qwen3_5_moe" => Some("shared_expert"),
                    _ => None,
                };
                if let Some(s) = shared {
                    for (n, sh) in [
                        ("gate_proj", [IS, H]),
                        ("up_proj", [IS, H]),
                        ("down_proj", [H, IS]),
                    ] {
                        add(format!("{p}.mlp.{s}.{n}.weight"), bf, &sh);
                    }
                }
                if matches!(family, "qwen3_next" | "qwen3_5_moe") {
                    add(format!("{p}.mlp.shared_expert_gate.weight"), bf, &[1, H]);
                }
            }
        }
    }
    let mut cfg = json!({
        "model_type": family, "num_hidden_layers": 2, "hidden_size": H, "vocab_size": 11,
    });
    let c = cfg.as_object_mut().unwrap();
    match family {
        "mixtral" | "gpt_oss" => {
            c.insert("num_local_experts".into(), json!(E));
            c.insert("intermediate_size".into(), json!(I));
        }
        "deepseek_v3" | "glm4_moe" => {
            c.insert("n_routed_experts".into(), json!(E));
            c.insert("moe_intermediate_size".into(), json!(I));
            c.insert("intermediate_size".into(), json!(7));
            c.insert("first_k_dense_replace".into(), json!(1));
        }
        "step3p5" => {
            c.insert("moe_num_experts".into(), json!(E));
            c.insert("moe_intermediate_size".into(), json!(I));
            c.insert("moe_layers_enum".into(), json!("1"));
        }
        _ => {
            c.insert("num_experts".into(), json!(E));
            c.insert("moe_intermediate_size".into(), json!(I));
        }
    }
    if vl {
        cfg = json!({"model_type": "qwen3_vl_moe", "text_config": cfg});
    }
    common::complete_model(&mut cfg, &mut hf);
    let dir = tempfile::tempdir().unwrap();
    common::write_ckpt(dir.path(), &cfg, &hf, nshards);
    let ckpt = HfCheckpoint::open(dir.path()).unwrap();
    Ckpt {
        _dir: dir,
        ckpt,
        hf,
    }
}

const FAMILIES: &[&str] = &[
    "qwen3_moe",
    "qwen3_next",
    "qwen3_5_moe",
    "qwen3_vl_moe",
    "mixtral",
    "deepseek_v3",
    "glm4_moe",
    "gpt_oss",
    "step3p5",
];

fn moe_layer(family: &str) -> usize {
    let _ = family;
    1
}

/// The native gate_and_up / down / bias values by the README's element formulas ("Native grouped layout").
fn expected_native(
    family: &str,
    fused: bool,
    hf: &BTreeMap<String, HostTensor>,
    p: &str,
) -> BTreeMap<String, (Vec<usize>, Vec<Vec<u8>>)> {
    let mut out = BTreeMap::new();
    let mut gu = Vec::new();
    let mut dn = Vec::new();
    let (m, names) = match family {
        "mixtral" => ("block_sparse_moe", ["w1.weight", "w3.weight", "w2.weight"]),
        _ => (
            "mlp",
            ["gate_proj.weight", "up_proj.weight", "down_proj.weight"],
        ),
    };
    let vl_native = family == "qwen3_vl_moe" && !fused;
    for e in 0..E {
        for h in 0..H {
            for j in 0..2 * I {
                let v = match family {
                    "gpt_oss" => {
                        let c = if j < I { 2 * j } else { 2 * (j - I) + 1 };
                        elem(&hf[&format!("{p}.mlp.experts.gate_up_proj")], &[e, h, c])
                    }
                    "step3p5" => {
                        let (k, r) = if j < I {
                            ("gate_proj", j)
                        } else {
                            ("up_proj", j - I)
                        };
                        elem(&hf[&format!("{p}.moe.{k}.weight")], &[e, r, h])
                    }
                    _ if vl_native => {
                        elem(&hf[&format!("{p}.mlp.experts.gate_up_proj")], &[e, h, j])
                    }
                    _ if fused => elem(&hf[&format!("{p}.{m}.experts.gate_up_proj")], &[e, j, h]),
                    _ => {
                        let (k, r) = if j < I {
                            (names[0], j)
                        } else {
                            (names[1], j - I)
                        };
                        elem(&hf[&format!("{p}.{m}.experts.{e}.{k}")], &[r, h])
                    }
                };
                gu.push(v);
            }
        }
        for i in 0..I {
            for h in 0..H {
                let v = match family {
                    "gpt_oss" => elem(&hf[&format!("{p}.mlp.experts.down_proj")], &[e, i, h]),
                    "step3p5" => elem(&hf[&format!("{p}.moe.down_proj.weight")], &[e, h, i]),
                    _ if vl_native => elem(&hf[&format!("{p}.mlp.experts.down_proj")], &[e, i, h]),
                    _ if fused => elem(&hf[&format!("{p}.{m}.experts.down_proj")], &[e, h, i]),
                    _ => elem(&hf[&format!("{p}.{m}.experts.{e}.{}", names[2])], &[h, i]),
                };
                dn.push(v);
            }
        }
    }
    out.insert(
        format!("{p}.mlp.experts.gate_and_up_projs"),
        (vec![E, H, 2 * I], gu),
    );
    out.insert(format!("{p}.mlp.experts.down_projs"), (vec![E, I, H], dn));
    if family == "gpt_oss" {
        let b = &hf[&format!("{p}.mlp.experts.gate_up_proj_bias")];
        let v = (0..E)
            .flat_map(|e| (0..2 * I).map(move |j| (e, j)))
            .map(|(e, j)| elem(b, &[e, if j < I { 2 * j } else { 2 * (j - I) + 1 }]))
            .collect();
        out.insert(
            format!("{p}.mlp.experts.gate_up_proj_bias"),
            (vec![E, 2 * I], v),
        );
    }
    out
}

fn flat(t: &HostTensor) -> Vec<Vec<u8>> {
    t.data
        .chunks(t.element_size())
        .map(<[u8]>::to_vec)
        .collect()
}

#[test]
fn every_family_formula_keys_and_round_trip() {
    for &family in FAMILIES {
        for fused in [false, true] {
            if fused && matches!(family, "gpt_oss" | "step3p5") {
                continue;
            }
            for nshards in [1, 3] {
                let f = family_ckpt(family, fused, nshards);
                let a = adapter_for(&f.ckpt).unwrap();
                let l = moe_layer(family);
                let want_layers = if family_all_moe(family) {
                    vec![0, 1]
                } else {
                    vec![1]
                };
                assert_eq!(a.moe_layers(), want_layers, "{family}");
                let keys = a.native_moe_keys(l).unwrap();
                let p = keys
                    .gate_weight
                    .trim_end_matches(".mlp.gate.weight")
                    .to_string();
                let native = a.from_hf(&f.ckpt).unwrap();
                // element formulas
                for (k, (shape, want)) in expected_native(family, fused, &f.hf, &p) {
                    assert_eq!(native[&k].shape, shape, "{family} {k}");
                    assert_eq!(flat(&native[&k]), want, "{family} fused={fused} {k}");
                }
                // every native key named by native_moe_keys exists; optional ones as the family has them
                let mut named = vec![
                    keys.gate_weight.clone(),
                    keys.gate_and_up_projs.clone(),
                    keys.down_projs.clone(),
                ];
                named.extend(keys.gate_bias.clone());
                named.extend(keys.e_score_correction_bias.clone());
                named.extend(keys.gate_up_proj_bias.clone());
                named.extend(keys.down_proj_bias.clone());
                named.extend(keys.shared.clone().into_iter().flatten());
                named.extend(keys.shared_gate.clone());
                for k in &named {
                    assert!(native.contains_key(k), "{family}: {k} missing from native");
                    assert!(k.contains(".mlp."), "{k}");
                }
                assert_eq!(keys.gate_bias.is_some(), family == "gpt_oss", "{family}");
                assert_eq!(
                    keys.e_score_correction_bias.is_some(),
                    matches!(family, "deepseek_v3" | "glm4_moe" | "step3p5"),
                    "{family}"
                );
                assert_eq!(
                    keys.shared.is_some(),
                    matches!(
                        family,
                        "deepseek_v3" | "glm4_moe" | "step3p5" | "qwen3_next" | "qwen3_5_moe"
                    ),
                    "{family}"
                );
                assert_eq!(
                    keys.shared_gate.is_some(),
                    matches!(family, "qwen3_next" | "qwen3_5_moe")
                );
                // renamed tensors are the disk bytes, dtype kept (router_bias / e_score bias F32)
                if let Some(b) = &keys.e_score_correction_bias {
                    assert_eq!(native[b].dtype, Dtype::F32);
                }
                assert!(a.native_moe_keys(0).is_err() || family_all_moe(family));
                // no native key keeps a disk-only MoE name
                assert!(
                    !native.keys().any(|k| k.contains("block_sparse_moe")
                        || k.contains(".moe.")
                        || k.contains("router")
                        || k.contains("share_expert.")),
                    "{family}"
                );
                // round trip: same keys, dtypes, shapes, bytes
                let back = a.to_hf(&native).unwrap();
                assert_eq!(back, f.hf, "{family} fused={fused} shards={nshards}");
            }
        }
    }
}

fn family_all_moe(family: &str) -> bool {
    !matches!(family, "deepseek_v3" | "glm4_moe" | "step3p5")
}

#[test]
fn gradient_subset_maps_to_disk_keys() {
    // A gradient map holds a subset of native keys (no e_score_correction_bias, no attention);
    // to_hf maps it with the same code as the weights.
    for &family in FAMILIES {
        let f = family_ckpt(family, false, 1);
        let a = adapter_for(&f.ckpt).unwrap();
        let native = a.from_hf(&f.ckpt).unwrap();
        let keys = a.native_moe_keys(1).unwrap();
        let mut grads = BTreeMap::new();
        for k in [&keys.gate_weight, &keys.gate_and_up_projs, &keys.down_projs]
            .into_iter()
            .chain(keys.gate_bias.iter())
            .chain(keys.shared.iter().flatten())
        {
            grads.insert(k.clone(), native[k].clone());
        }
        let hf = a.to_hf(&grads).unwrap();
        let all = a.to_hf(&native).unwrap();
        assert!(
            hf.len() > grads.len() || family == "gpt_oss" || family.starts_with("qwen3_vl"),
            "{family}"
        );
        for (k, t) in &hf {
            assert_eq!(t, &f.hf[k], "{family}: grad key {k} is not the disk tensor");
            assert!(all.contains_key(k));
        }
        assert!(!hf
            .keys()
            .any(|k| k.contains("e_score_correction_bias") || k.contains("router_bias")));
    }
}

/// For each rank: from_hf_local == gather(whole), to_hf_local pieces == gather(to_hf(whole)) with
/// placements that give (through local_shard) the indices held, and all ranks assemble.
fn check_local(
    a: &dyn MoeAdapter,
    ck: &HfCheckpoint,
    key: &str,
    mesh_shape: &[usize],
    pl: &[Placement],
) {
    check_local_with(a, ck, key, mesh_shape, pl, true);
}

/// [`check_local`]; with `exact` false, the HF pieces' placements must NOT reproduce their index
/// sets on some rank (GPT-OSS interleaved gate_up with `_S(last, 2)` when the mesh size does not
/// divide I: the index sets are authoritative), everything else is checked the same.
fn check_local_with(
    a: &dyn MoeAdapter,
    ck: &HfCheckpoint,
    key: &str,
    mesh_shape: &[usize],
    pl: &[Placement],
    exact: bool,
) {
    let mut all_match = true;
    let whole = a.from_hf(ck).unwrap();
    let w = &whole[key];
    let hf_whole = a
        .to_hf(&BTreeMap::from([(key.to_string(), w.clone())]))
        .unwrap();
    let mesh = DeviceMesh::new(mesh_shape.to_vec()).unwrap();
    let mut hf_parts: BTreeMap<String, Vec<(Vec<IndexSet>, HostTensor)>> = BTreeMap::new();
    for r in 0..mesh.size() {
        let c = mesh.coordinate(r).unwrap();
        let lt = a.from_hf_local(ck, key, &mesh, pl, &c).unwrap();
        let ls = local_shard(&w.shape, &mesh, pl, &c).unwrap();
        let idx: Vec<IndexSet> = (0..w.shape.len())
            .map(|d| ls.dim_indices(d, w.shape[d]))
            .collect();
        assert_eq!(lt.tensor, w.gather(&idx).unwrap(), "{key} {pl:?} rank {r}");
        for h in a.to_hf_local(&lt).unwrap() {
            let t = &hf_whole[&h.key];
            assert_eq!(h.tensor, t.gather(&h.indices).unwrap(), "{}", h.key);
            let hls = local_shard(&h.global_shape, &mesh, &h.placements, &c).unwrap();
            let want: Vec<IndexSet> = (0..h.global_shape.len())
                .map(|d| hls.dim_indices(d, h.global_shape[d]))
                .collect();
            let m = h.placements_match(&mesh, &c).unwrap();
            assert_eq!(m, h.indices == want, "{}", h.key);
            assert_eq!(h.check_label(&mesh, &c).is_ok(), m, "{}", h.key);
            if exact {
                assert_eq!(h.indices, want, "{} {:?} rank {r}", h.key, h.placements);
            }
            all_match &= m;
            hf_parts
                .entry(h.key.clone())
                .or_default()
                .push((h.indices, h.tensor));
        }
    }
    assert_eq!(all_match, exact, "{key} {pl:?} on {mesh_shape:?}");
    assert_eq!(hf_parts.len(), hf_whole.len(), "{key}");
    for (k, ps) in hf_parts {
        let t = &hf_whole[&k];
        assert_eq!(&assemble(&t.shape, t.dtype, &ps).unwrap(), t, "{k}");
    }
}

#[test]
fn local_shards_every_family() {
    use Placement::{Replicate as R, Shard as S};
    let ss = Placement::StridedShard {
        dim: 2,
        split_factor: 2,
    };
    let ss1 = Placement::StridedShard {
        dim: 1,
        split_factor: 2,
    };
    for &family in FAMILIES {
        let f = family_ckpt(family, false, 2);
        let a = adapter_for(&f.ckpt).unwrap();
        let k = a.native_moe_keys(1).unwrap();
        for key in [&k.gate_and_up_projs, &k.down_projs] {
            check_local(a.as_ref(), &f.ckpt, key, &[4], &[S(0)]);
            check_local(a.as_ref(), &f.ckpt, key, &[2, 2], &[S(0), S(1)]);
            check_local(a.as_ref(), &f.ckpt, key, &[3], &[S(1)]);
            check_local(a.as_ref(), &f.ckpt, key, &[2, 3], &[R, S(1)]);
        }
        // TP-packed gate|up: _S(2, 2) maps to a plain shard of each HF tensor's I dim. GPT-OSS
        // interleaves gate and up in one disk tensor: S(2) of its 2I dim, exact only when the
        // mesh size divides I (here I = 5 over 2: the index sets are exact, the S(2) is not;
        // tests/gpt_oss_tp.rs has the even cases).
        if family == "gpt_oss" {
            let key = &k.gate_and_up_projs;
            check_local_with(a.as_ref(), &f.ckpt, key, &[2], &[ss], false);
            check_local_with(a.as_ref(), &f.ckpt, key, &[2, 2], &[S(0), ss], false);
            let b = k.gate_up_proj_bias.as_ref().unwrap();
            check_local_with(a.as_ref(), &f.ckpt, b, &[2], &[ss1], false);
            check_local_with(a.as_ref(), &f.ckpt, b, &[2, 2], &[S(0), ss1], false);
            check_local(a.as_ref(), &f.ckpt, key, &[5], &[ss]);
        } else {
            check_local(a.as_ref(), &f.ckpt, &k.gate_and_up_projs, &[2], &[ss]);
            check_local(
                a.as_ref(),
                &f.ckpt,
                &k.gate_and_up_projs,
                &[2, 2],
                &[S(0), ss],
            );
        }
        check_local(a.as_ref(), &f.ckpt, &k.down_projs, &[2, 2], &[S(0), S(2)]);
        check_local(a.as_ref(), &f.ckpt, &k.down_projs, &[2], &[ss1]);
        if let Some(b) = &k.down_proj_bias {
            check_local(a.as_ref(), &f.ckpt, b, &[2, 2], &[S(0), S(1)]);
        }
        // renamed pass-through keys load from their disk names
        check_local(a.as_ref(), &f.ckpt, &k.gate_weight, &[2], &[S(0)]);
    }
}

#[test]
fn step35_288_4096_1280_placements_follow_the_permutation() {
    // Step-3.5-Flash dims (E=288, H=4096, I=1280): disk moe.down_proj.weight [288, 4096, 1280],
    // moe.{gate,up}_proj.weight [288, 1280, 4096]. Native down_projs [288, 1280, 4096] with FSDP
    // S(1) on I must land on disk dim 2 (the seed bug was leaving it at S(1)); no checkpoint
    // needed: to_hf_local works on the shard alone.
    use Placement::Shard as S;
    let spec = spec_for("step3p5").unwrap();
    let cfg = FamilyConfig::from_json(
        &spec,
        &json!({"num_hidden_layers": 2, "moe_num_experts": 288, "hidden_size": 4096,
                "moe_intermediate_size": 1280, "moe_layers_enum": "1"}),
    )
    .unwrap();
    let a = FamilyAdapter::new(
        spec,
        cfg,
        LayoutChoice {
            prefix: "model.layers".into(),
            moe_module: "moe",
            layout: DiskLayout::Step35,
            optional: [false, true, true, false],
        },
    );
    let mesh = DeviceMesh::new(vec![288, 8]).unwrap();
    let coord = [5usize, 3];
    for (key, global, disk) in [
        (
            "model.layers.1.mlp.experts.down_projs",
            vec![288, 1280, 4096],
            vec![("model.layers.1.moe.down_proj.weight", vec![288, 4096, 1280])],
        ),
        (
            "model.layers.1.mlp.experts.gate_and_up_projs",
            vec![288, 4096, 2560],
            vec![
                ("model.layers.1.moe.gate_proj.weight", vec![288, 1280, 4096]),
                ("model.layers.1.moe.up_proj.weight", vec![288, 1280, 4096]),
            ],
        ),
    ] {
        let pl = [S(0), S(1)];
        let ls = local_shard(&global, &mesh, &pl, &coord).unwrap();
        let idx: Vec<IndexSet> = (0..3).map(|d| ls.dim_indices(d, global[d])).collect();
        let lt = LocalTensor {
            key: key.to_string(),
            tensor: rand_tensor(1, Dtype::BF16, &ls.local_shape),
            global_shape: global.clone(),
            placements: pl.to_vec(),
            indices: idx.clone(),
        };
        let out = a.to_hf_local(&lt).unwrap();
        assert_eq!(out.len(), disk.len());
        for (o, (dk, dshape)) in out.iter().zip(&disk) {
            assert_eq!(&o.key, dk);
            assert_eq!(&o.global_shape, dshape);
            assert_eq!(
                o.placements,
                vec![S(0), S(2)],
                "{dk}: S(1) of native dim 1 moves to disk dim 2"
            );
            let hls = local_shard(dshape, &mesh, &o.placements, &coord).unwrap();
            assert_eq!(o.tensor.shape, hls.local_shape, "{dk}");
            assert_eq!(o.indices[2], idx[1], "{dk}");
            // bytes: disk piece = the native shard's columns of this tensor, last two dims swapped
            let up = dk.contains("up_proj");
            let cols = if up {
                1280..2560
            } else {
                0..lt.tensor.shape[2].min(1280)
            };
            let cols = if key.ends_with("down_projs") {
                0..4096
            } else {
                cols
            };
            let sel = vec![
                (0..1).collect(),
                (0..lt.tensor.shape[1]).collect(),
                cols.collect(),
            ];
            let want = lt
                .tensor
                .gather_vecs(&sel)
                .unwrap()
                .transpose(1, 2)
                .unwrap();
            assert_eq!(o.tensor, want, "{dk}");
        }
    }
}

#[test]
fn vl_orientation_detected_from_shapes_even_when_2i_equals_h() {
    // transformers 5.23 saves Qwen3-VL-MoE as [E, 2I, H]; published checkpoints as [E, H, 2I].
    // With 2I == H only down_proj tells them apart.
    for (down_shape, layout) in [
        ([E, 2 * E, E], DiskLayout::FusedTransposed),
        ([E, E, 2 * E], DiskLayout::FusedNative),
    ] {
        let (h, i) = (2 * E, E);
        let mut hf = BTreeMap::new();
        let p = "model.language_model.layers.0.mlp";
        hf.insert(
            format!("{p}.gate.weight"),
            rand_tensor(1, Dtype::F32, &[E, h]),
        );
        hf.insert(
            format!("{p}.experts.gate_up_proj"),
            rand_tensor(2, Dtype::F32, &[E, 2 * i, h]),
        );
        hf.insert(
            format!("{p}.experts.down_proj"),
            rand_tensor(3, Dtype::F32, &down_shape),
        );
        let mut cfg = json!({"model_type": "qwen3_vl_moe", "text_config": {"num_hidden_layers": 1,
            "num_experts": E, "hidden_size": h, "moe_intermediate_size": i}});
        common::complete_model(&mut cfg, &mut hf);
        let dir = tempfile::tempdir().unwrap();
        common::write_ckpt(dir.path(), &cfg, &hf, 1);
        let ck = HfCheckpoint::open(dir.path()).unwrap();
        let a = FamilyAdapter::from_checkpoint(&ck).unwrap();
        assert_eq!(a.layout(), layout);
        assert_eq!(a.to_hf(&a.from_hf(&ck).unwrap()).unwrap(), hf);
    }
}

/// Writes a one-layer fused checkpoint of `model_type` with the given expert shapes.
fn fused_ckpt(
    model_type: &str,
    h: usize,
    i: usize,
    gu: [usize; 3],
    down: [usize; 3],
) -> (tempfile::TempDir, BTreeMap<String, HostTensor>) {
    let vl = model_type.starts_with("qwen3_vl");
    let p = if vl {
        "model.language_model.layers.0.mlp"
    } else {
        "model.layers.0.mlp"
    };
    let mut hf = BTreeMap::new();
    hf.insert(
        format!("{p}.gate.weight"),
        rand_tensor(1, Dtype::F32, &[E, h]),
    );
    hf.insert(
        format!("{p}.experts.gate_up_proj"),
        rand_tensor(2, Dtype::F32, &gu),
    );
    hf.insert(
        format!("{p}.experts.down_proj"),
        rand_tensor(3, Dtype::F32, &down),
    );
    let text = json!({"num_hidden_layers": 1, "num_experts": E, "hidden_size": h,
        "moe_intermediate_size": i});
    let mut cfg = if vl {
        json!({"model_type": model_type, "text_config": text})
    } else {
        let mut c = text;
        c["model_type"] = json!(model_type);
        c
    };
    common::complete_model(&mut cfg, &mut hf);
    let dir = tempfile::tempdir().unwrap();
    common::write_ckpt(dir.path(), &cfg, &hf, 1);
    (dir, hf)
}

#[test]
fn fused_orientation_comes_from_the_family_never_from_an_ambiguous_shape() {
    // H == 2I: gate_up_proj is [E, H, H] either way; down_proj decides, and it must be an
    // orientation the family writes. transformers-only families: [E, 2I, H] / [E, H, I].
    let (h, i) = (2 * E, E);
    for mt in [
        "qwen3_moe",
        "qwen3_5_moe_text",
        "qwen3_next",
        "mixtral",
        "deepseek_v3",
    ] {
        let (dir, hf) = fused_ckpt(mt, h, i, [E, 2 * i, h], [E, h, i]);
        let ck = HfCheckpoint::open(dir.path()).unwrap();
        let a = FamilyAdapter::from_checkpoint(&ck).unwrap();
        assert_eq!(a.layout(), DiskLayout::FusedTransposed, "{mt}");
        let native = a.from_hf(&ck);
        if mt == "qwen3_moe" || mt == "mixtral" {
            assert_eq!(a.to_hf(&native.unwrap()).unwrap(), hf, "{mt}");
        }
        // The same square gate_up with down_proj in native orientation contradicts the family.
        let (dir, _) = fused_ckpt(mt, h, i, [E, h, 2 * i], [E, i, h]);
        let ck = HfCheckpoint::open(dir.path()).unwrap();
        let e = FamilyAdapter::from_checkpoint(&ck).unwrap_err().to_string();
        assert!(
            e.contains("layer 0: fused experts")
                && e.contains("experts.down_proj' [4, 4, 8]")
                && e.contains(&format!("which {mt} checkpoints are not written in")),
            "{mt}: {e}"
        );
    }
    // H == I: down_proj is square; gate_up_proj decides (VL knows both orientations).
    let (h, i) = (E, E);
    for (gu, down, layout) in [
        ([E, h, 2 * i], [E, i, h], DiskLayout::FusedNative),
        ([E, 2 * i, h], [E, h, i], DiskLayout::FusedTransposed),
    ] {
        let (dir, hf) = fused_ckpt("qwen3_vl_moe", h, i, gu, down);
        let ck = HfCheckpoint::open(dir.path()).unwrap();
        let a = FamilyAdapter::from_checkpoint(&ck).unwrap();
        assert_eq!(a.layout(), layout);
        assert_eq!(a.to_hf(&a.from_hf(&ck).unwrap()).unwrap(), hf);
    }
    // A pair that fits no orientation names both tensors.
    let (dir, _) = fused_ckpt("qwen3_moe", 2 * E, E, [E, 2 * E, 2 * E], [E, 3, 2 * E]);
    let ck = HfCheckpoint::open(dir.path()).unwrap();
    let e = FamilyAdapter::from_checkpoint(&ck).unwrap_err().to_string();
    assert!(e.contains("fit neither"), "{e}");
}

#[test]
fn family_errors_name_keys() {
    // missing expert (Mixtral names), unexpected Step3.5 key, unknown model type
    let f = family_ckpt("mixtral", false, 1);
    let mut hf = f.hf.clone();
    hf.remove("model.layers.0.block_sparse_moe.experts.2.w3.weight");
    let dir = tempfile::tempdir().unwrap();
    let cfg: Value =
        serde_json::from_slice(&std::fs::read(f.ckpt.dir().join("config.json")).unwrap()).unwrap();
    common::write_ckpt(dir.path(), &cfg, &hf, 1);
    let ck = HfCheckpoint::open(dir.path()).unwrap();
    let e = adapter_for(&ck)
        .unwrap()
        .from_hf(&ck)
        .unwrap_err()
        .to_string();
    assert_eq!(e, "layer 0: missing expert keys: model.layers.0.block_sparse_moe.experts.2.w3.weight (1 missing)");

    let f = family_ckpt("step3p5", false, 1);
    let mut hf = f.hf.clone();
    hf.insert(
        "model.layers.0.moe.gate_proj.weight".into(),
        rand_tensor(3, Dtype::BF16, &[E, I, H]),
    );
    let dir = tempfile::tempdir().unwrap();
    let cfg: Value =
        serde_json::from_slice(&std::fs::read(f.ckpt.dir().join("config.json")).unwrap()).unwrap();
    common::write_ckpt(dir.path(), &cfg, &hf, 1);
    let ck = HfCheckpoint::open(dir.path()).unwrap();
    let e = adapter_for(&ck)
        .unwrap()
        .from_hf(&ck)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("model.layers.0.moe.gate_proj.weight") && e.contains("(1 unexpected)"),
        "{e}"
    );
}
