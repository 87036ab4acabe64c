//! Qwen3-MoE adapter against independent references: naive index formulas, gather of the whole
//! native tensor by placement::local_shard indices, assemble of all ranks, and identities.
mod common;

use adapters::{adapter_for, assemble, Dtype, HfCheckpoint, HostTensor, LocalTensor, MoeAdapter};
use common::{config, elem, hf_tensors, write_ckpt, Dims, SMALL};
use placement::{local_shard, DeviceMesh, IndexSet, Placement};
use proptest::prelude::*;
use std::collections::BTreeMap;

struct Fixture {
    _dir: tempfile::TempDir,
    ckpt: HfCheckpoint,
    hf: BTreeMap<String, HostTensor>,
}

fn fixture(d: Dims, dtype: Dtype, fused: bool, nshards: usize) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let hf = hf_tensors(d, dtype, fused);
    write_ckpt(dir.path(), &config(d, "qwen3_moe"), &hf, nshards);
    let ckpt = HfCheckpoint::open(dir.path()).unwrap();
    Fixture {
        _dir: dir,
        ckpt,
        hf,
    }
}

fn gu_key(l: usize) -> String {
    format!("model.layers.{l}.mlp.experts.gate_and_up_projs")
}
fn down_key(l: usize) -> String {
    format!("model.layers.{l}.mlp.experts.down_projs")
}
fn hf_key(l: usize, e: usize, p: &str) -> String {
    format!("model.layers.{l}.mlp.experts.{e}.{p}.weight")
}

/// native[e][h][j] == gate_e[j][h] (j < I) / up_e[j-I][h]; down_projs[e][i][h] == down_e[h][i];
/// for the fused layout native[e][h][j] == gate_up[e][j][h], native_down[e][i][h] == down[e][h][i].
fn check_native_formula(
    d: Dims,
    fused: bool,
    hf: &BTreeMap<String, HostTensor>,
    native: &BTreeMap<String, HostTensor>,
) {
    for l in 1..d.layers {
        let gu = &native[&gu_key(l)];
        let dn = &native[&down_key(l)];
        assert_eq!(gu.shape, vec![d.e, d.h, 2 * d.i]);
        assert_eq!(dn.shape, vec![d.e, d.i, d.h]);
        for e in 0..d.e {
            for h in 0..d.h {
                for j in 0..2 * d.i {
                    let want = if fused {
                        elem(
                            &hf[&format!("model.layers.{l}.mlp.experts.gate_up_proj")],
                            &[e, j, h],
                        )
                    } else if j < d.i {
                        elem(&hf[&hf_key(l, e, "gate_proj")], &[j, h])
                    } else {
                        elem(&hf[&hf_key(l, e, "up_proj")], &[j - d.i, h])
                    };
                    assert_eq!(elem(gu, &[e, h, j]), want, "layer {l} e {e} h {h} j {j}");
                }
                for i in 0..d.i {
                    let want = if fused {
                        elem(
                            &hf[&format!("model.layers.{l}.mlp.experts.down_proj")],
                            &[e, h, i],
                        )
                    } else {
                        elem(&hf[&hf_key(l, e, "down_proj")], &[h, i])
                    };
                    assert_eq!(elem(dn, &[e, i, h]), want);
                }
            }
        }
    }
}

#[test]
fn round_trip_and_formula_all_layouts() {
    for (dtype, fused, nshards) in [
        (Dtype::BF16, false, 1),
        (Dtype::F32, false, 3),
        (Dtype::BF16, true, 2),
        (Dtype::F32, true, 1),
    ] {
        let f = fixture(SMALL, dtype, fused, nshards);
        let a = adapter_for(&f.ckpt).unwrap();
        assert_eq!(a.model_type(), "qwen3_moe");
        assert_eq!(a.num_experts(), SMALL.e);
        assert_eq!(a.moe_layers(), vec![1, 2]);
        let native = a.from_hf(&f.ckpt).unwrap();
        check_native_formula(SMALL, fused, &f.hf, &native);
        // every non-expert key passes through unchanged
        for (k, t) in &f.hf {
            if !k.contains(".mlp.experts.") {
                assert_eq!(&native[k], t, "{k}");
            }
        }
        assert!(native.values().all(|t| t.dtype == dtype));
        let back = a.to_hf(&native).unwrap();
        assert_eq!(
            back, f.hf,
            "round trip dtype {dtype} fused {fused} shards {nshards}"
        );
        let infos = a.native_expert_tensors(&f.ckpt).unwrap();
        let got: Vec<(String, Vec<usize>)> = infos
            .iter()
            .map(|n| (n.key.clone(), n.shape.clone()))
            .collect();
        let (e, h, i) = (SMALL.e, SMALL.h, SMALL.i);
        assert_eq!(
            got,
            vec![
                (gu_key(1), vec![e, h, 2 * i]),
                (down_key(1), vec![e, i, h]),
                (gu_key(2), vec![e, h, 2 * i]),
                (down_key(2), vec![e, i, h]),
            ]
        );
    }
}

#[test]
fn layout_is_remembered() {
    let f = fixture(SMALL, Dtype::BF16, true, 1);
    let a = adapter_for(&f.ckpt).unwrap();
    let back = a.to_hf(&a.from_hf(&f.ckpt).unwrap()).unwrap();
    assert!(back.contains_key("model.layers.1.mlp.experts.gate_up_proj"));
    assert!(!back.keys().any(|k| k.contains("experts.0.")));
}

/// For every rank of `mesh`, from_hf_local equals gather(whole, indices), has placement's local
/// shape, and assembling all ranks gives the whole tensor back. Also checks to_hf_local of each
/// shard assembles to the whole-tensor to_hf output, and that each HF piece's placements give
/// (through placement::local_shard at the same coordinate) exactly the indices it holds.
fn check_local(f: &Fixture, a: &dyn MoeAdapter, key: &str, mesh_shape: &[usize], pl: &[Placement]) {
    check_local_impl(f, a, key, mesh_shape, pl, true)
}

/// [`check_local`] without the to_hf_local part (placements with no HF equivalent).
fn check_local_native(
    f: &Fixture,
    a: &dyn MoeAdapter,
    key: &str,
    mesh_shape: &[usize],
    pl: &[Placement],
) {
    check_local_impl(f, a, key, mesh_shape, pl, false)
}

fn check_local_impl(
    f: &Fixture,
    a: &dyn MoeAdapter,
    key: &str,
    mesh_shape: &[usize],
    pl: &[Placement],
    hf: bool,
) {
    let whole = a.from_hf(&f.ckpt).unwrap();
    let w = &whole[key];
    let hf_whole = a
        .to_hf(&BTreeMap::from([(key.to_string(), w.clone())]))
        .unwrap();
    let mesh = DeviceMesh::new(mesh_shape.to_vec()).unwrap();
    let mut parts = Vec::new();
    let mut hf_parts: BTreeMap<String, Vec<(Vec<IndexSet>, HostTensor)>> = BTreeMap::new();
    for r in 0..mesh.size() {
        let c = mesh.coordinate(r).unwrap();
        let lt = a.from_hf_local(&f.ckpt, key, &mesh, pl, &c).unwrap();
        let ls = local_shard(&w.shape, &mesh, pl, &c).unwrap();
        assert_eq!(lt.tensor.shape, ls.local_shape, "{key} {pl:?} rank {r}");
        let idx: Vec<IndexSet> = (0..w.shape.len())
            .map(|d| ls.dim_indices(d, w.shape[d]))
            .collect();
        assert_eq!(lt.indices, idx);
        assert_eq!(lt.tensor, w.gather(&idx).unwrap(), "{key} {pl:?} rank {r}");
        assert_eq!(lt.global_shape, w.shape);
        let pieces = if hf {
            a.to_hf_local(&lt).unwrap()
        } else {
            Vec::new()
        };
        for h in pieces {
            assert_eq!(h.global_shape, hf_whole[&h.key].shape);
            let hls = local_shard(&h.global_shape, &mesh, &h.placements, &c).unwrap();
            let want: Vec<IndexSet> = (0..h.global_shape.len())
                .map(|d| hls.dim_indices(d, h.global_shape[d]))
                .collect();
            assert_eq!(
                h.indices, want,
                "{} placements {:?} rank {r}",
                h.key, h.placements
            );
            assert_eq!(
                h.tensor,
                hf_whole[&h.key].gather(&h.indices).unwrap(),
                "{}",
                h.key
            );
            hf_parts
                .entry(h.key.clone())
                .or_default()
                .push((h.indices, h.tensor));
        }
        parts.push((lt.indices, lt.tensor));
    }
    assert_eq!(&assemble(&w.shape, w.dtype, &parts).unwrap(), w);
    if !hf {
        return;
    }
    assert_eq!(hf_parts.len(), hf_whole.len());
    for (k, ps) in hf_parts {
        let t = &hf_whole[&k];
        assert_eq!(&assemble(&t.shape, t.dtype, &ps).unwrap(), t, "{k}");
    }
}

#[test]
fn from_hf_local_matches_gather_of_whole() {
    use Placement::{Replicate as R, Shard as S};
    for fused in [false, true] {
        let f = fixture(SMALL, Dtype::BF16, fused, 2);
        let a = adapter_for(&f.ckpt).unwrap();
        for key in [gu_key(1), down_key(2)] {
            check_local(&f, a.as_ref(), &key, &[4], &[S(0)]);
            check_local(&f, a.as_ref(), &key, &[2, 2], &[S(0), S(1)]);
            check_local(&f, a.as_ref(), &key, &[3], &[S(1)]); // uneven: H=6 / I=5 over 3
            check_local(&f, a.as_ref(), &key, &[2, 3], &[R, S(1)]);
            check_local(&f, a.as_ref(), &key, &[2, 2], &[S(1), S(1)]);
        }
        check_local(&f, a.as_ref(), &down_key(1), &[4], &[S(2)]);
        check_local(&f, a.as_ref(), &down_key(1), &[2, 2], &[S(0), S(2)]);
        // pass-through key
        check_local(
            &f,
            a.as_ref(),
            "model.layers.1.mlp.gate.weight",
            &[2],
            &[S(0)],
        );
    }
}

#[test]
fn packed_dim_sharding_loads() {
    // The packed 2I dim of gate_and_up_projs loads under any S / _S (each native column is read
    // from its gate or up source); checked against gather(whole) and assemble of all ranks.
    use Placement::Shard as S;
    let ss = |sf| Placement::StridedShard {
        dim: 2,
        split_factor: sf,
    };
    for fused in [false, true] {
        let f = fixture(SMALL, Dtype::BF16, fused, 1);
        let a = adapter_for(&f.ckpt).unwrap();
        check_local_native(&f, a.as_ref(), &gu_key(1), &[2], &[S(2)]);
        check_local_native(&f, a.as_ref(), &gu_key(1), &[3], &[S(2)]);
        check_local(&f, a.as_ref(), &gu_key(1), &[2], &[ss(2)]);
        check_local(&f, a.as_ref(), &gu_key(1), &[2, 2], &[S(0), ss(2)]);
    }
}

#[test]
fn to_hf_local_moves_placements_with_the_transpose() {
    use Placement::{Replicate as R, Shard as S};
    let (e, h, i) = (SMALL.e, SMALL.h, SMALL.i);
    for fused in [false, true] {
        let f = fixture(SMALL, Dtype::F32, fused, 1);
        let a = adapter_for(&f.ckpt).unwrap();
        // down_projs [E, I, H] with S(2) (H) -> HF down [H, I] with S(0) / fused [E, H, I] with S(1)
        let mesh = DeviceMesh::new(vec![2]).unwrap();
        let lt = a
            .from_hf_local(&f.ckpt, &down_key(1), &mesh, &[S(2)], &[1])
            .unwrap();
        let out = a.to_hf_local(&lt).unwrap();
        let hidx = common::run(3, 6);
        if fused {
            assert_eq!(out.len(), 1);
            assert_eq!(out[0].key, "model.layers.1.mlp.experts.down_proj");
            assert_eq!(out[0].global_shape, vec![e, h, i]);
            assert_eq!(out[0].placements, vec![S(1)]);
            assert_eq!(
                out[0].indices,
                vec![IndexSet::full(e), hidx.clone(), IndexSet::full(i)]
            );
            assert_eq!(out[0].tensor.shape, vec![e, 3, i]);
        } else {
            assert_eq!(out.len(), e);
            for (x, o) in out.iter().enumerate() {
                assert_eq!(o.key, hf_key(1, x, "down_proj"));
                assert_eq!(o.global_shape, vec![h, i]);
                assert_eq!(o.placements, vec![S(0)]);
                assert_eq!(o.indices, vec![hidx.clone(), IndexSet::full(i)]);
                assert_eq!(o.tensor.shape, vec![3, i]);
            }
        }
        // down_projs S(1) (I) -> HF down [H, I] S(1) / fused S(2)
        let lt = a
            .from_hf_local(&f.ckpt, &down_key(1), &mesh, &[S(1)], &[0])
            .unwrap();
        let out = a.to_hf_local(&lt).unwrap();
        assert!(out
            .iter()
            .all(|o| o.placements == vec![if fused { S(2) } else { S(1) }]));
        // gate_and_up [E, H, 2I] with [S(0), S(1)] -> per-expert [R, S(1)] (expert dim consumed
        // by the key), fused [S(0), S(2)]
        let mesh = DeviceMesh::new(vec![2, 2]).unwrap();
        let lt = a
            .from_hf_local(&f.ckpt, &gu_key(2), &mesh, &[S(0), S(1)], &[1, 0])
            .unwrap();
        let out = a.to_hf_local(&lt).unwrap();
        if fused {
            assert_eq!(out[0].placements, vec![S(0), S(2)]);
            assert_eq!(out[0].indices[0], common::run(2, 4));
        } else {
            let keys: Vec<&str> = out.iter().map(|o| o.key.as_str()).collect();
            assert_eq!(
                keys,
                vec![
                    hf_key(2, 2, "gate_proj"),
                    hf_key(2, 2, "up_proj"),
                    hf_key(2, 3, "gate_proj"),
                    hf_key(2, 3, "up_proj")
                ]
            );
            assert!(out
                .iter()
                .all(|o| o.placements == vec![R, S(1)] && o.global_shape == vec![i, h]));
            assert!(out
                .iter()
                .all(|o| o.indices == vec![IndexSet::full(i), common::run(0, 3)]));
        }
    }
}

#[test]
fn to_hf_local_rejects_partial_packed_dim() {
    let f = fixture(SMALL, Dtype::F32, false, 1);
    let a = adapter_for(&f.ckpt).unwrap();
    let whole = a.from_hf(&f.ckpt).unwrap();
    let w = &whole[&gu_key(1)];
    let idx = vec![
        IndexSet::full(SMALL.e),
        IndexSet::full(SMALL.h),
        common::run(0, SMALL.i),
    ];
    let lt = LocalTensor {
        key: gu_key(1),
        tensor: w.gather(&idx).unwrap(),
        global_shape: w.shape.clone(),
        placements: vec![Placement::Shard(2)],
        indices: idx,
    };
    let e = a.to_hf_local(&lt).unwrap_err().to_string();
    assert!(e.contains("unsupported in this version"), "{e}");
}

#[test]
fn missing_expert_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let mut hf = hf_tensors(SMALL, Dtype::BF16, false);
    hf.remove(&hf_key(1, 3, "gate_proj"));
    hf.remove(&hf_key(1, 3, "down_proj"));
    write_ckpt(dir.path(), &config(SMALL, "qwen3_moe"), &hf, 1);
    let ck = HfCheckpoint::open(dir.path()).unwrap();
    let a = adapter_for(&ck).unwrap();
    let e = a.from_hf(&ck).unwrap_err().to_string();
    assert_eq!(
        e,
        format!(
            "layer 1: missing expert keys: {}, {} (2 missing)",
            hf_key(1, 3, "gate_proj"),
            hf_key(1, 3, "down_proj")
        )
    );
    assert!(a.native_expert_tensors(&ck).is_err());
}

#[test]
fn extra_expert_key_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let mut hf = hf_tensors(SMALL, Dtype::BF16, false);
    let t = hf[&hf_key(1, 0, "up_proj")].clone();
    hf.insert(hf_key(1, 4, "up_proj"), t.clone()); // expert 4 of 4
    hf.insert(hf_key(0, 0, "up_proj"), t); // layer 0 is mlp-only
    write_ckpt(dir.path(), &config(SMALL, "qwen3_moe"), &hf, 1);
    let ck = HfCheckpoint::open(dir.path()).unwrap();
    let e = adapter_for(&ck)
        .unwrap()
        .from_hf(&ck)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains(&hf_key(1, 4, "up_proj")) && e.contains(&hf_key(0, 0, "up_proj")),
        "{e}"
    );
    assert!(e.contains("(2 unexpected)"), "{e}");
}

#[test]
fn wrong_expert_shape_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let mut hf = hf_tensors(SMALL, Dtype::BF16, false);
    hf.insert(
        hf_key(2, 1, "down_proj"),
        common::rand_tensor(5, Dtype::BF16, &[SMALL.i, SMALL.h]),
    );
    write_ckpt(dir.path(), &config(SMALL, "qwen3_moe"), &hf, 1);
    let ck = HfCheckpoint::open(dir.path()).unwrap();
    let e = adapter_for(&ck)
        .unwrap()
        .from_hf(&ck)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("model.safetensors") && e.contains(&hf_key(2, 1, "down_proj")),
        "{e}"
    );
}

#[test]
fn unknown_model_type() {
    let dir = tempfile::tempdir().unwrap();
    write_ckpt(
        dir.path(),
        &config(SMALL, "foo"),
        &hf_tensors(SMALL, Dtype::BF16, false),
        1,
    );
    let ck = HfCheckpoint::open(dir.path()).unwrap();
    let e = adapter_for(&ck).err().unwrap().to_string();
    assert!(
        e.starts_with("unknown model_type 'foo'; supported: qwen3_moe, qwen3_next, ")
            && e.contains("step3p5"),
        "{e}"
    );
}

#[test]
fn mixed_layouts_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let mut hf = hf_tensors(SMALL, Dtype::BF16, false);
    let fused = hf_tensors(SMALL, Dtype::BF16, true);
    let k = "model.layers.2.mlp.experts.gate_up_proj".to_string();
    hf.insert(k.clone(), fused[&k].clone());
    write_ckpt(dir.path(), &config(SMALL, "qwen3_moe"), &hf, 1);
    let ck = HfCheckpoint::open(dir.path()).unwrap();
    let e = adapter_for(&ck).err().unwrap().to_string();
    assert!(e.contains("mixes") && e.contains(&k), "{e}");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]
    /// Random small dims and random shard placements on 1-D/2-D meshes (never the packed dim):
    /// every rank's from_hf_local equals gather(whole) and all ranks assemble to the whole.
    #[test]
    fn random_placements(e in 1usize..5, h in 1usize..6, i in 1usize..5, fused in any::<bool>(),
                         m0 in 1usize..4, m1 in 1usize..3, d0 in 0usize..4, d1 in 0usize..4, down in any::<bool>()) {
        let dims = Dims { layers: 2, e, h, i };
        let f = fixture(dims, Dtype::BF16, fused, 1);
        let a = adapter_for(&f.ckpt).unwrap();
        let key = if down { down_key(1) } else { gu_key(1) };
        let max_dim = if down { 3 } else { 2 };
        let pick = |d: usize| if d % 4 < max_dim { Placement::Shard(d % 4) } else { Placement::Replicate };
        check_local(&f, a.as_ref(), &key, &[m0, m1], &[pick(d0), pick(d1)]);
    }
}
