//! Reading real torch DCP checkpoints: the fixtures in `conformance/fixtures/dcp/` were written by
//! torch 2.15 on real processes (`generate_dcp.py`), each with `expected.safetensors` = every
//! tensor as stock `dcp.load(no_dist=True)` returned it. Every tensor must read back bit for bit,
//! reshards to other meshes must equal the direct slice of that truth, and damaged copies must fail
//! with one line naming the file and key.

use adapters::dcp::{self, StorageFormat};
use adapters::{Dtype, HostTensor};
use placement::{local_shard, parse_placements, DeviceMesh};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../conformance/fixtures/dcp")
}

/// The torch-loaded truth of a fixture.
fn expected(name: &str) -> BTreeMap<String, HostTensor> {
    let bytes = std::fs::read(root().join(name).join("expected.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(k, v)| {
            (
                k,
                HostTensor::new(v.dtype(), v.shape().to_vec(), v.data().to_vec()).unwrap(),
            )
        })
        .collect()
}

const FIXTURES: &[(&str, StorageFormat, usize)] = &[
    ("fsdp2_w2", StorageFormat::TorchSave, 2),
    ("fsdp2_w4", StorageFormat::TorchSave, 4),
    ("ep_fsdp_w4", StorageFormat::TorchSave, 4),
    ("tp_w2", StorageFormat::TorchSave, 2),
    ("tp_w4", StorageFormat::TorchSave, 4),
    ("fsdp_tp_w4", StorageFormat::TorchSave, 4),
    ("seed_bug_w2", StorageFormat::TorchSave, 2),
    ("views_w1", StorageFormat::TorchSave, 1),
    ("hf_sharded_w2", StorageFormat::HfSharded, 2),
    ("hf_consolidated_w2", StorageFormat::HfConsolidated, 1),
];

#[test]
fn every_torch_fixture_reads_back_bit_for_bit() {
    for &(name, format, world) in FIXTURES {
        let ck =
            dcp::open(&root().join(name).join("ckpt")).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(ck.format(), format, "{name}");
        assert_eq!(ck.world_size(), world, "{name}");
        let want = expected(name);
        assert_eq!(
            ck.keys(),
            want.keys().cloned().collect::<Vec<_>>(),
            "{name}: tensor keys"
        );
        for (k, t) in &want {
            let got = ck.read_full(k).unwrap();
            assert_eq!((got.dtype, &got.shape), (t.dtype, &t.shape), "{name}: {k}");
            assert!(
                got.data == t.data,
                "{name}: {k} differs from what torch loaded"
            );
            if format == StorageFormat::TorchSave {
                ck.verify_crc(k).unwrap();
            }
        }
    }
}

#[test]
fn every_dtype_and_non_tensor_items_are_read() {
    let ck = dcp::open(&root().join("fsdp2_w2/ckpt")).unwrap();
    let mut dtypes: Vec<Dtype> = ck.keys().iter().map(|k| ck.dtype(k).unwrap()).collect();
    dtypes.sort_by_key(|d| d.to_string());
    dtypes.dedup();
    for d in [
        Dtype::BOOL,
        Dtype::U8,
        Dtype::I8,
        Dtype::I16,
        Dtype::I32,
        Dtype::I64,
        Dtype::F16,
        Dtype::BF16,
        Dtype::F32,
        Dtype::F64,
    ] {
        assert!(dtypes.contains(&d), "{d} missing from {dtypes:?}");
    }
    assert_eq!(ck.global_shape("step").unwrap(), &[] as &[usize]);
    let items: Vec<&String> = ck.bytes_items().keys().collect();
    assert_eq!(items, ["train_state.step", "train_state.tokens_seen"]);
    assert!(ck
        .bytes_items()
        .values()
        .all(|b| b.problem.is_none() && b.length > 0));
    assert_eq!(ck.extra(), &serde_json::Value::Null);
    // views_w1: storage offsets, steps, zero strides, two chunks stored differently.
    let v = dcp::open(&root().join("views_w1/ckpt")).unwrap();
    assert_eq!(v.chunks("v.two_chunks").unwrap().len(), 2);
    assert_eq!(v.bytes_items().keys().collect::<Vec<_>>(), ["v.bytes"]);
}

/// The direct slice of `full` for `placements` at `rank`.
fn direct(full: &HostTensor, mesh: &DeviceMesh, placements: &str, rank: usize) -> HostTensor {
    let p = parse_placements(placements).unwrap();
    let coord = mesh.coordinate(rank).unwrap();
    let ls = local_shard(&full.shape, mesh, &p, &coord).unwrap();
    let sets: Vec<_> = (0..full.shape.len())
        .map(|d| ls.dim_indices(d, full.shape[d]))
        .collect();
    full.gather(&sets).unwrap()
}

#[test]
fn reshard_to_other_meshes_equals_the_direct_slice() {
    let targets: &[(&[usize], &str)] = &[
        (&[3], "[S(1)]"),
        (&[2, 2], "[S(0), _S(1, 2)]"),
        (&[3, 2], "[S(2), S(0)]"),
        (&[4], "[_S(2, 3)]"),
        (&[1], "[R]"),
    ];
    for &(name, _, _) in FIXTURES {
        let ck = dcp::open(&root().join(name).join("ckpt")).unwrap();
        for (k, full) in expected(name) {
            for &(shape, text) in targets {
                let mesh = DeviceMesh::new(shape.to_vec()).unwrap();
                let p = parse_placements(text).unwrap();
                if p.iter()
                    .any(|x| x.shard_dim().is_some_and(|d| d >= full.shape.len()))
                {
                    continue;
                }
                for rank in 0..mesh.size() {
                    let got = ck.read_local(&k, &mesh, &p, rank).unwrap();
                    let want = direct(&full, &mesh, text, rank);
                    assert_eq!(
                        got.shape, want.shape,
                        "{name} {k} {text} on {shape:?} rank {rank}"
                    );
                    assert!(
                        got.data == want.data,
                        "{name} {k} {text} on {shape:?} rank {rank}"
                    );
                }
            }
        }
    }
}

/// A copy of fixture `name`'s checkpoint in a temporary directory.
fn copy(name: &str) -> tempfile::TempDir {
    let t = tempfile::tempdir().unwrap();
    let src = root().join(name).join("ckpt");
    for e in std::fs::read_dir(&src).unwrap() {
        let e = e.unwrap();
        if e.path().is_file() {
            std::fs::copy(e.path(), t.path().join(e.file_name())).unwrap();
        }
    }
    t
}

fn one_line(e: &str) {
    assert!(!e.contains('\n'), "not one line: {e}");
}

const DOWN: &str = "model.layers.0.mlp.experts.down_proj";

#[test]
fn damaged_checkpoints_fail_with_one_line_naming_file_and_key() {
    // Metadata variants written by Python with torch's own classes (bad/*.metadata).
    for (variant, want) in [
        ("overlap", "overlaps"),
        ("gap", "(a gap)"),
        ("outside", "outside the global shape"),
    ] {
        let t = copy("tp_w2");
        std::fs::copy(
            root().join(format!("bad/{variant}.metadata")),
            t.path().join(".metadata"),
        )
        .unwrap();
        let e = dcp::open(t.path()).unwrap_err().to_string();
        one_line(&e);
        assert!(e.contains(DOWN) && e.contains(want), "{variant}: {e}");
        let ck = dcp::inspect(t.path()).unwrap();
        assert!(!ck.problems(DOWN).unwrap().is_empty());
        assert!(
            ck.problems("model.norm.weight").unwrap().is_empty(),
            "{variant}: only the damaged tensor"
        );
    }
    let t = copy("tp_w2");
    std::fs::copy(
        root().join("bad/unknown_global.metadata"),
        t.path().join(".metadata"),
    )
    .unwrap();
    let e = dcp::open(t.path()).unwrap_err().to_string();
    one_line(&e);
    assert!(
        e.contains(".metadata")
            && e.contains("'collections.Counter' is not one a DCP .metadata holds"),
        "{e}"
    );

    // Truncated data file: the items past the cut are named.
    let t = copy("tp_w2");
    let f = t.path().join("__1_0.distcp");
    let len = std::fs::metadata(&f).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&f)
        .unwrap()
        .set_len(len - 100)
        .unwrap();
    let e = dcp::open(t.path()).unwrap_err().to_string();
    one_line(&e);
    assert!(e.contains("__1_0.distcp") && e.contains("truncated"), "{e}");

    // Missing data file.
    let t = copy("tp_w2");
    std::fs::remove_file(t.path().join("__0_0.distcp")).unwrap();
    let e = dcp::open(t.path()).unwrap_err().to_string();
    one_line(&e);
    assert!(
        e.contains("__0_0.distcp is missing") && e.contains("tensor '"),
        "{e}"
    );

    // Bad pickle: truncated, random bytes.
    for cut in [0usize, 1, 50, 700] {
        let t = copy("tp_w2");
        let md = t.path().join(".metadata");
        let b = std::fs::read(&md).unwrap();
        std::fs::write(&md, &b[..cut.min(b.len())]).unwrap();
        let e = dcp::open(t.path()).unwrap_err().to_string();
        one_line(&e);
        assert!(
            e.contains(".metadata") && e.contains("pickle byte"),
            "cut {cut}: {e}"
        );
    }
    let t = copy("tp_w2");
    std::fs::write(
        t.path().join(".metadata"),
        b"\x80\x04garbage that is not a pickle",
    )
    .unwrap();
    let e = dcp::open(t.path()).unwrap_err().to_string();
    assert!(e.contains(".metadata"), "{e}");

    // A flipped byte inside a storage: the CRC check names chunk and file.
    let t = copy("tp_w2");
    let ck = dcp::open(t.path()).unwrap();
    let c = &ck.chunks(DOWN).unwrap()[1];
    let f = t.path().join(&c.file);
    drop(ck);
    let mut b = std::fs::read(&f).unwrap();
    let item = &mut b[c.byte_offset as usize..(c.byte_offset + c.byte_length) as usize];
    let pos = dcp::torch_item::decode_item(item).unwrap().data_start + 7;
    item[pos] ^= 0x55;
    std::fs::write(&f, &b).unwrap();
    let ck = dcp::open(t.path()).unwrap();
    let e = ck.verify_crc(DOWN).unwrap_err().to_string();
    one_line(&e);
    assert!(
        e.contains(&c.file) && e.contains(DOWN) && e.contains("CRC"),
        "{e}"
    );

    // No .metadata but data files: an incomplete save.
    let t = copy("tp_w2");
    std::fs::remove_file(t.path().join(".metadata")).unwrap();
    let e = dcp::open(t.path()).unwrap_err().to_string();
    assert!(e.contains("incomplete checkpoint"), "{e}");
    // Neither.
    let t = tempfile::tempdir().unwrap();
    let e = dcp::open(t.path()).unwrap_err().to_string();
    assert!(e.contains("not a DCP checkpoint"), "{e}");
}
