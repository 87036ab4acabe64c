//! Distributed checkpoint writer (`adapters::dcp::save_rank` + `commit`, torch's FileSystemWriter
//! layout): save at one mesh/placements, load at another, compare bit for bit with the direct slice
//! of the original tensor (`HostTensor::gather` of the index sets `placement::local_shard` gives).
//! Ranks are simulated by calling `save_rank` in a loop. That stock torch loads these files is
//! checked by `conformance/fixtures/generate_dcp.py verify-ours` (README).
mod common;

use adapters::dcp::metadata::{parse_metadata, write_metadata, Item as MdItem};
use adapters::dcp::{
    self, commit, list_steps, rank_metadata_name, save_rank, step_dir, DcpCheckpoint, ShardToSave,
};
use adapters::{Dtype, HostTensor};
use common::rand_tensor;
use placement::{parse_placements, DeviceMesh, Placement};
use proptest::prelude::*;
use serde_json::json;
use std::path::Path;

fn mesh(shape: &[usize]) -> DeviceMesh {
    DeviceMesh::new(shape.to_vec()).unwrap()
}

fn pl(s: &str) -> Vec<Placement> {
    parse_placements(s).unwrap()
}

/// The expected local tensor: the original sliced by the index sets of `local_shard`.
fn direct(
    global: &HostTensor,
    mesh: &DeviceMesh,
    placements: &[Placement],
    rank: usize,
) -> HostTensor {
    let coord = mesh.coordinate(rank).unwrap();
    let ls = placement::local_shard(&global.shape, mesh, placements, &coord).unwrap();
    let sets: Vec<_> = (0..global.shape.len())
        .map(|d| ls.dim_indices(d, global.shape[d]))
        .collect();
    let t = global.gather(&sets).unwrap();
    assert_eq!(t.shape, ls.local_shape);
    t
}

/// One tensor to save: key, whole value, placements on the save mesh.
struct Item {
    key: &'static str,
    global: HostTensor,
    placements: Vec<Placement>,
}

/// Every rank of `mesh` saves its local shards of `items` (a loop stands for the ranks).
fn save_ranks(dir: &Path, mesh: &DeviceMesh, items: &[Item], ranks: &[usize]) {
    for &r in ranks {
        {
            let locals: Vec<HostTensor> = items
                .iter()
                .map(|it| direct(&it.global, mesh, &it.placements, r))
                .collect();
            let shards: Vec<ShardToSave> = items
                .iter()
                .zip(&locals)
                .map(|(it, l)| ShardToSave {
                    key: it.key,
                    local: l,
                    global_shape: &it.global.shape,
                    placements: &it.placements,
                })
                .collect();
            save_rank(dir, mesh, r, &shards).unwrap()
        }
    }
}

/// (file, offsets) of every chunk of `key`, in metadata order.
fn chunk_files(ck: &DcpCheckpoint, key: &str) -> Vec<(String, Vec<usize>)> {
    ck.chunks(key)
        .unwrap()
        .into_iter()
        .map(|c| (c.file, c.offsets))
        .collect()
}

/// Rewrites the pickled metadata file `path` through `edit` (as a torch user editing it would).
fn edit_metadata(path: &Path, edit: impl FnOnce(&mut adapters::dcp::metadata::TorchMetadata)) {
    let mut m = parse_metadata(&std::fs::read(path).unwrap()).unwrap();
    edit(&mut m);
    std::fs::write(path, write_metadata(&m).unwrap()).unwrap();
}

fn chunks_mut<'a>(
    m: &'a mut adapters::dcp::metadata::TorchMetadata,
    key: &str,
) -> &'a mut Vec<placement::chunks::ChunkBox> {
    match m.items.get_mut(key) {
        Some(MdItem::Tensor(t)) => &mut t.chunks,
        _ => panic!("no tensor {key}"),
    }
}

fn save_all(dir: &Path, mesh: &DeviceMesh, items: &[Item]) {
    let ranks: Vec<usize> = (0..mesh.size()).collect();
    save_ranks(dir, mesh, items, &ranks)
}

/// Load configurations valid for an `ndim`-d tensor.
fn load_cfgs(ndim: usize) -> Vec<(Vec<usize>, Vec<Placement>)> {
    if ndim == 0 {
        return vec![(vec![1], pl("[R]")), (vec![2, 2], pl("[R, R]"))];
    }
    let last = ndim - 1;
    let second = 1.min(last);
    vec![
        (vec![2], vec![Placement::Shard(last)]),
        (
            vec![2, 2],
            vec![Placement::Shard(0), Placement::Shard(second)],
        ),
        (vec![1], pl("[R]")),
        (vec![3], pl("[_S(0, 2)]")),
        (vec![2, 3], vec![Placement::Replicate, Placement::Shard(0)]),
        (vec![4, 2], pl("[S(0), S(0)]")),
    ]
}

/// Every key of `items` at every load configuration and rank equals the direct slice.
fn check_all_loads(ck: &DcpCheckpoint, items: &[Item]) {
    for it in items {
        assert_eq!(ck.global_shape(it.key).unwrap(), it.global.shape.as_slice());
        assert_eq!(ck.dtype(it.key).unwrap(), it.global.dtype);
        assert_eq!(ck.read_full(it.key).unwrap(), it.global, "{}", it.key);
        for (ms, p) in load_cfgs(it.global.shape.len()) {
            let m = mesh(&ms);
            for r in 0..m.size() {
                let got = ck.read_local(it.key, &m, &p, r).unwrap();
                let want = direct(&it.global, &m, &p, r);
                assert_eq!(got, want, "{} mesh {ms:?} {p:?} rank {r}", it.key);
            }
        }
    }
}

fn items_mesh4() -> Vec<Item> {
    vec![
        Item {
            key: "layers.0.norm.weight",
            global: rand_tensor(1, Dtype::BF16, &[10]),
            placements: pl("[S(0)]"),
        },
        Item {
            // 3 rows on 4 ranks: rank 3 holds an empty shard.
            key: "layers.0.attn.q_proj.weight",
            global: rand_tensor(2, Dtype::F32, &[3, 7]),
            placements: pl("[S(0)]"),
        },
        Item {
            key: "layers.0.mlp.experts.down_projs",
            global: rand_tensor(3, Dtype::BF16, &[5, 6, 9]),
            placements: pl("[S(1)]"),
        },
        Item {
            key: "embed.weight",
            global: rand_tensor(4, Dtype::F32, &[2, 3]),
            placements: pl("[R]"),
        },
        Item {
            key: "step_scalar",
            global: rand_tensor(5, Dtype::F32, &[]),
            placements: pl("[R]"),
        },
    ]
}

#[test]
fn reshard_from_mesh4_s0_s1_r() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ck");
    let m = mesh(&[4]);
    let items = items_mesh4();
    save_all(&dir, &m, &items);
    commit(&dir, 4, json!({"step": 7, "rng": [1, 2, 3]})).unwrap();
    let ck = dcp::open(&dir).unwrap();
    assert_eq!(ck.format(), dcp::StorageFormat::TorchSave);
    assert_eq!(ck.extra(), &json!({"step": 7, "rng": [1, 2, 3]}));
    assert_eq!(
        ck.bytes_items().keys().collect::<Vec<_>>(),
        [dcp::EXTRA_KEY]
    );
    let mut keys: Vec<String> = items.iter().map(|i| i.key.to_string()).collect();
    keys.sort();
    assert_eq!(ck.keys(), keys);
    assert_eq!(ck.world_size(), 4);
    // 3 rows on 4 ranks: rank 3's shard is empty and writes no chunk.
    let q = chunk_files(&ck, "layers.0.attn.q_proj.weight");
    assert_eq!(
        q.iter().map(|c| c.0.as_str()).collect::<Vec<_>>(),
        ["__0_0.distcp", "__1_0.distcp", "__2_0.distcp"]
    );
    check_all_loads(&ck, &items);
}

#[test]
fn reshard_from_mesh2x2_packed_tp_strided() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ck");
    let m = mesh(&[2, 2]);
    let items = vec![
        Item {
            // [E, H, 2I] with gate|up packed on the last dim, TP-sharded as _S(2, 2).
            key: "layers.1.mlp.experts.gate_and_up_projs",
            global: rand_tensor(11, Dtype::BF16, &[4, 6, 10]),
            placements: pl("[S(0), _S(2, 2)]"),
        },
        Item {
            key: "layers.1.mlp.experts.down_projs",
            global: rand_tensor(12, Dtype::BF16, &[3, 5, 6]),
            placements: pl("[S(0), S(1)]"),
        },
        Item {
            key: "layers.1.attn.o_proj.weight",
            global: rand_tensor(13, Dtype::F32, &[7, 5]),
            placements: pl("[R, _S(0, 3)]"),
        },
        Item {
            key: "lm_head.weight",
            global: rand_tensor(14, Dtype::F32, &[1, 9]),
            placements: pl("[S(0), R]"),
        },
    ];
    save_all(&dir, &m, &items);
    commit(&dir, 4, json!(null)).unwrap();
    let ck = dcp::open(&dir).unwrap();
    // _S(2, 2) on 10 columns: rank (0, 1) holds columns 3..5 and 8..10, saved as two exact boxes.
    let g: Vec<_> = ck
        .chunks("layers.1.mlp.experts.gate_and_up_projs")
        .unwrap()
        .into_iter()
        .filter(|c| c.file == "__1_0.distcp")
        .map(|c| (c.offsets, c.sizes))
        .collect();
    assert_eq!(
        g,
        vec![
            (vec![0, 0, 3], vec![2, 6, 2]),
            (vec![0, 0, 8], vec![2, 6, 2])
        ]
    );
    assert_eq!(
        ck.chunks("layers.1.mlp.experts.gate_and_up_projs")
            .unwrap()
            .len(),
        8
    );
    check_all_loads(&ck, &items);
    // And back into the save layout itself.
    for it in &items {
        for r in 0..4 {
            let got = ck.read_local(it.key, &m, &it.placements, r).unwrap();
            assert_eq!(got, direct(&it.global, &m, &it.placements, r));
        }
    }
}

#[test]
fn read_errors_name_the_key() {
    let tmp = tempfile::tempdir().unwrap();
    let m = mesh(&[4]);
    let items = items_mesh4();
    save_all(tmp.path(), &m, &items);
    commit(tmp.path(), 4, json!({})).unwrap();
    let ck = dcp::open(tmp.path()).unwrap();
    let e = ck.read_full("nope").unwrap_err().to_string();
    assert!(e.contains("'nope'"), "{e}");
    let k = "layers.0.attn.q_proj.weight";
    let e = ck
        .read_local_checked(k, Some(&[3, 8]), &m, &pl("[S(0)]"), 0)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains(k) && e.contains("[3, 7]") && e.contains("[3, 8]"),
        "{e}"
    );
    assert!(ck
        .read_local_checked(k, Some(&[3, 7]), &m, &pl("[S(0)]"), 0)
        .is_ok());
    let e = ck
        .read_local(k, &m, &pl("[P(sum)]"), 0)
        .unwrap_err()
        .to_string();
    assert!(e.contains(k) && e.contains("P(sum)"), "{e}");
    let e = ck
        .read_local(k, &m, &pl("[S(2)]"), 0)
        .unwrap_err()
        .to_string();
    assert!(e.contains(k), "{e}");
    let e = ck
        .read_local(k, &m, &pl("[S(0)]"), 4)
        .unwrap_err()
        .to_string();
    assert!(e.contains(k), "{e}");
}

#[test]
fn save_rank_checks_local_shape_and_refuses_partial() {
    let tmp = tempfile::tempdir().unwrap();
    let m = mesh(&[4]);
    let wrong = rand_tensor(1, Dtype::F32, &[3, 7]);
    let p = pl("[S(0)]");
    // 10 rows over 4 ranks (torch.chunk): 3, 3, 3, 1; rank 3 passes 3 rows.
    let e = save_rank(
        tmp.path(),
        &m,
        3,
        &[ShardToSave {
            key: "w",
            local: &wrong,
            global_shape: &[10, 7],
            placements: &p,
        }],
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("'w'") && e.contains("expected [1, 7], got [3, 7]"),
        "{e}"
    );
    let local = rand_tensor(1, Dtype::F32, &[10, 7]);
    let partial = pl("[P(sum)]");
    let e = save_rank(
        tmp.path(),
        &m,
        0,
        &[ShardToSave {
            key: "grad",
            local: &local,
            global_shape: &[10, 7],
            placements: &partial,
        }],
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("'grad'") && e.contains("P(sum)"), "{e}");
}

#[test]
fn incomplete_missing_or_truncated_files_are_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("step_00000003");
    let m = mesh(&[4]);
    let items = items_mesh4();
    save_all(&dir, &m, &items);
    let e = dcp::open(&dir).unwrap_err().to_string();
    assert!(
        e.contains("incomplete") && e.contains("step_00000003"),
        "{e}"
    );
    commit(&dir, 4, json!({"step": 3})).unwrap();
    dcp::open(&dir).unwrap();

    // Truncated rank file: the items past the cut are named.
    let f2 = dir.join("__2_0.distcp");
    let bytes = std::fs::read(&f2).unwrap();
    for cut in [0usize, 5, bytes.len() / 2, bytes.len() - 1] {
        std::fs::write(&f2, &bytes[..cut]).unwrap();
        let e = dcp::open(&dir).unwrap_err().to_string();
        assert!(
            e.contains("__2_0.distcp") && !e.contains('\n'),
            "cut {cut}: {e}"
        );
    }
    // A flipped byte in a zip header: the item no longer decodes.
    let mut flipped = bytes.clone();
    flipped[2] ^= 0xff;
    std::fs::write(&f2, &flipped).unwrap();
    let e = dcp::open(&dir).unwrap_err().to_string();
    assert!(
        e.contains("__2_0.distcp") && e.contains("not a torch.save archive"),
        "{e}"
    );

    // Deleted rank file: named.
    std::fs::remove_file(&f2).unwrap();
    let e = dcp::open(&dir).unwrap_err().to_string();
    assert!(e.contains("__2_0.distcp") && e.contains("missing"), "{e}");

    // Malformed .metadata.
    std::fs::write(dir.join(".metadata"), b"{not a pickle").unwrap();
    let e = dcp::open(&dir).unwrap_err().to_string();
    assert!(e.contains(".metadata"), "{e}");

    // A new save into the directory makes it incomplete again until commit.
    save_all(&dir, &m, &items);
    assert!(dcp::open(&dir)
        .unwrap_err()
        .to_string()
        .contains("incomplete"));
    commit(&dir, 4, json!({"step": 3})).unwrap();
    check_all_loads(&dcp::open(&dir).unwrap(), &items);
}

#[test]
fn replicas_are_written_once() {
    let tmp = tempfile::tempdir().unwrap();
    let m = mesh(&[4]);
    let items = vec![Item {
        key: "embed.weight",
        global: rand_tensor(4, Dtype::BF16, &[6, 3]),
        placements: pl("[R]"),
    }];
    save_all(tmp.path(), &m, &items);
    for r in 1..4 {
        let f = tmp.path().join(format!("__{r}_0.distcp"));
        assert_eq!(
            std::fs::metadata(&f).unwrap().len(),
            0,
            "rank {r} writes nothing"
        );
        let md = parse_metadata(&std::fs::read(tmp.path().join(rank_metadata_name(r))).unwrap())
            .unwrap();
        assert!(md.items.is_empty(), "rank {r}");
    }
    commit(tmp.path(), 4, json!({})).unwrap();
    let ck = dcp::open(tmp.path()).unwrap();
    assert_eq!(
        chunk_files(&ck, "embed.weight"),
        vec![("__0_0.distcp".to_string(), vec![0, 0])]
    );
    check_all_loads(&ck, &items);

    // [R, S(0)] on [2, 2]: only the ranks with coordinate 0 on mesh dim 0 (ranks 0, 1) write.
    let tmp2 = tempfile::tempdir().unwrap();
    let m2 = mesh(&[2, 2]);
    let items2 = vec![Item {
        key: "w",
        global: rand_tensor(5, Dtype::F32, &[5, 2]),
        placements: pl("[R, S(0)]"),
    }];
    save_all(tmp2.path(), &m2, &items2);
    commit(tmp2.path(), 4, json!({})).unwrap();
    let ck2 = dcp::open(tmp2.path()).unwrap();
    let files: Vec<String> = chunk_files(&ck2, "w").into_iter().map(|c| c.0).collect();
    assert_eq!(files, ["__0_0.distcp", "__1_0.distcp"]);
    check_all_loads(&ck2, &items2);
}

#[test]
fn list_steps_marks_complete_and_incomplete() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("ckpts");
    assert!(list_steps(&root).unwrap().is_empty());
    let m = mesh(&[2]);
    let items = vec![Item {
        key: "w",
        global: rand_tensor(1, Dtype::BF16, &[4]),
        placements: pl("[S(0)]"),
    }];
    for (step, done) in [(10u64, true), (1, true), (2, false)] {
        let d = step_dir(&root, step);
        save_all(&d, &m, &items);
        if done {
            commit(&d, 2, json!({"step": step})).unwrap();
        }
    }
    std::fs::create_dir_all(root.join("step_abc")).unwrap();
    std::fs::create_dir_all(root.join("other")).unwrap();
    std::fs::write(root.join("step_00000005"), b"a file, not a step").unwrap();
    assert_eq!(step_dir(&root, 2), root.join("step_00000002"));
    let got: Vec<(u64, bool)> = list_steps(&root)
        .unwrap()
        .into_iter()
        .map(|(n, p, c)| {
            assert_eq!(p, step_dir(&root, n));
            (n, c)
        })
        .collect();
    assert_eq!(got, vec![(1, true), (2, false), (10, true)]);
    let (n, p) = dcp::latest_complete(&root).unwrap().unwrap();
    assert_eq!(n, 10);
    assert_eq!(dcp::open(&p).unwrap().extra(), &json!({"step": 10}));
}

#[test]
fn commit_refuses_uncovered_or_inconsistent_saves() {
    // Rank 2 did not save: the S(0) tensors are not covered; the error names a key and the file.
    let tmp = tempfile::tempdir().unwrap();
    let m = mesh(&[4]);
    let items = items_mesh4();
    save_ranks(tmp.path(), &m, &items, &[0, 1, 3]);
    let e = commit(tmp.path(), 4, json!({})).unwrap_err().to_string();
    assert!(
        e.contains("'layers.0.") && e.contains("__2.metadata") && e.contains("gap"),
        "{e}"
    );
    assert!(!tmp.path().join(".metadata").exists());

    // Only replicated tensors: covered, but the missing rank is still an error.
    let tmp = tempfile::tempdir().unwrap();
    let rep = vec![Item {
        key: "r",
        global: rand_tensor(1, Dtype::F32, &[3]),
        placements: pl("[R]"),
    }];
    save_ranks(tmp.path(), &m, &rep, &[0, 1, 2]);
    let e = commit(tmp.path(), 4, json!({})).unwrap_err().to_string();
    assert!(e.contains("__3.metadata"), "{e}");

    // Ranks disagree on a global shape.
    let tmp = tempfile::tempdir().unwrap();
    let m2 = mesh(&[2]);
    let p = pl("[S(0)]");
    let a = rand_tensor(1, Dtype::F32, &[4]);
    let b = rand_tensor(2, Dtype::F32, &[5]);
    let s0 = [ShardToSave {
        key: "x",
        local: &a,
        global_shape: &[8],
        placements: &p,
    }];
    save_rank(tmp.path(), &m2, 0, &s0).unwrap();
    let s1 = [ShardToSave {
        key: "x",
        local: &b,
        global_shape: &[10],
        placements: &p,
    }];
    save_rank(tmp.path(), &m2, 1, &s1).unwrap();
    let e = commit(tmp.path(), 2, json!({})).unwrap_err().to_string();
    assert!(
        e.contains("'x'") && e.contains("[8]") && e.contains("[10]"),
        "{e}"
    );

    // A rank's metadata edited so its chunk overlaps the other rank's.
    let tmp = tempfile::tempdir().unwrap();
    let items = vec![Item {
        key: "y",
        global: rand_tensor(3, Dtype::BF16, &[8]),
        placements: pl("[S(0)]"),
    }];
    save_all(tmp.path(), &m2, &items);
    edit_metadata(&tmp.path().join(rank_metadata_name(1)), |md| {
        chunks_mut(md, "y")[0].offsets = vec![2];
    });
    let e = commit(tmp.path(), 2, json!({})).unwrap_err().to_string();
    assert!(e.contains("'y'") && e.contains("overlaps"), "{e}");

    // .metadata edited so two chunks overlap: open names the tensor and both chunks.
    save_all(tmp.path(), &m2, &items);
    commit(tmp.path(), 2, json!({})).unwrap();
    edit_metadata(&tmp.path().join(".metadata"), |md| {
        chunks_mut(md, "y")[1].offsets = vec![2];
    });
    let e = dcp::open(tmp.path()).unwrap_err().to_string();
    assert!(
        e.contains("'y'") && e.contains("overlaps") && e.contains("chunk 0") && e.contains("[2]"),
        "{e}"
    );

    // A world size larger than the save's: the ranks beyond it are named.
    save_all(tmp.path(), &m2, &items);
    let e = commit(tmp.path(), 3, json!({})).unwrap_err().to_string();
    assert!(e.contains("__2.metadata"), "{e}");
    assert!(commit(tmp.path(), 0, json!({}))
        .unwrap_err()
        .to_string()
        .contains("world_size is 0"));
}

/// A random placement for an `ndim`-d tensor (no Partial).
fn placement_strategy(ndim: usize) -> BoxedStrategy<Placement> {
    if ndim == 0 {
        return Just(Placement::Replicate).boxed();
    }
    prop_oneof![
        Just(Placement::Replicate),
        (0..ndim).prop_map(Placement::Shard),
        (0..ndim, 1usize..4)
            .prop_map(|(dim, split_factor)| Placement::StridedShard { dim, split_factor }),
    ]
    .boxed()
}

/// (mesh shape, placements) for an `ndim`-d tensor.
fn layout_strategy(ndim: usize) -> impl Strategy<Value = (Vec<usize>, Vec<Placement>)> {
    prop::collection::vec(1usize..4, 1..3).prop_flat_map(move |ms| {
        let n = ms.len();
        (
            Just(ms),
            prop::collection::vec(placement_strategy(ndim), n..=n),
        )
    })
}

/// (global shape, dtype index, save layout, load layout).
type Case = (
    Vec<usize>,
    usize,
    (Vec<usize>, Vec<Placement>),
    (Vec<usize>, Vec<Placement>),
);

fn case_strategy() -> impl Strategy<Value = Case> {
    (0usize..4).prop_flat_map(|nd| {
        (
            prop::collection::vec(0usize..8, nd..=nd),
            0usize..4,
            layout_strategy(nd),
            layout_strategy(nd),
        )
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn save_at_one_layout_load_at_another((shape, dt, (sm, sp), (lm, lp)) in case_strategy(), seed in any::<u64>()) {
        let dtype = [Dtype::BF16, Dtype::F32, Dtype::U8, Dtype::F64][dt];
        let tmp = tempfile::tempdir().unwrap();
        let save_mesh = mesh(&sm);
        let items = vec![
            Item { key: "t", global: rand_tensor(seed, dtype, &shape), placements: sp.clone() },
        ];
        save_all(tmp.path(), &save_mesh, &items);
        commit(tmp.path(), save_mesh.size(), json!({"seed": seed})).unwrap();
        let ck = dcp::open(tmp.path()).unwrap();
        let load_mesh = mesh(&lm);
        for r in 0..load_mesh.size() {
            let got = ck.read_local("t", &load_mesh, &lp, r).unwrap();
            prop_assert_eq!(got, direct(&items[0].global, &load_mesh, &lp, r),
                "save {:?} {:?} load {:?} {:?} rank {}", sm, sp, lm, lp, r);
        }
        prop_assert_eq!(ck.read_full("t").unwrap(), items[0].global.clone());
    }
}
