//! `Group::read` and `Group::write_experts` directly, on transformers-written fixtures of every
//! expert layout (per-expert, fused transformers-style, GPT-OSS interleaved, Step3.5 stacked):
//! any index lists read what the whole tensor holds there (reference: `HostTensor::gather_vecs`
//! of the whole read), and bad arguments are errors.

mod common;

use adapters::family_adapter::FamilyAdapter;
use adapters::HfCheckpoint;

const FIXTURES: [&str; 4] = [
    "qwen3_moe_tiny",
    "qwen3_vl_moe_tiny",
    "gpt_oss_tiny",
    "step3p5_tiny",
];

#[test]
fn reversed_index_lists_read_the_reversed_tensor() {
    // Every dim reversed (the fixtures' dims are even, so no index stays in place): nothing may
    // take the whole-tensor shortcut.
    for name in FIXTURES {
        let ck = HfCheckpoint::open(&common::fixture(name)).unwrap();
        let a = FamilyAdapter::from_checkpoint(&ck).unwrap();
        for g in a.groups() {
            let full: Vec<Vec<usize>> = g.shape.iter().map(|&n| (0..n).collect()).collect();
            let whole = g.read(&ck, &full).unwrap();
            assert!(g.shape.iter().all(|n| n % 2 == 0), "{name}: {:?}", g.shape);
            let rev: Vec<Vec<usize>> = full
                .iter()
                .map(|v| v.iter().rev().copied().collect())
                .collect();
            assert_eq!(
                g.read(&ck, &rev).unwrap(),
                whole.gather_vecs(&rev).unwrap(),
                "{name} {}",
                g.native_key
            );
        }
    }
}

#[test]
fn read_wants_one_index_list_per_native_dim() {
    let ck = HfCheckpoint::open(&common::fixture("qwen3_vl_moe_tiny")).unwrap();
    let a = FamilyAdapter::from_checkpoint(&ck).unwrap();
    let g = &a.groups()[0];
    let full: Vec<Vec<usize>> = g.shape.iter().map(|&n| (0..n).collect()).collect();
    let e = g.read(&ck, &full[..2]).unwrap_err().to_string();
    assert!(
        e.ends_with(&format!(
            "{}: 2 index lists for native shape {:?}",
            g.native_key, g.shape
        )),
        "{e}"
    );
}

#[test]
fn write_experts_checks_the_byte_count_and_the_expert_range() {
    let ck = HfCheckpoint::open(&common::fixture("qwen3_moe_tiny")).unwrap();
    let a = FamilyAdapter::from_checkpoint(&ck).unwrap();
    let g = &a.groups()[0];
    let full: Vec<Vec<usize>> = g.shape.iter().map(|&n| (0..n).collect()).collect();
    let t = g.read(&ck, &full).unwrap();
    let per = t.data.len() / g.shape[0];
    // right count for 2 experts, in range: fine; and the per-expert keys of experts 6, 7 come out
    let out = g.write_experts(&t.data[6 * per..], t.dtype, 6, 2).unwrap();
    assert!(out
        .iter()
        .all(|(k, _)| k.contains(".experts.6.") || k.contains(".experts.7.")));
    // a byte short, in range
    let e = g
        .write_experts(&t.data[6 * per + 1..], t.dtype, 6, 2)
        .unwrap_err()
        .to_string();
    assert!(e.contains("bytes for experts 6..8"), "{e}");
    // right count, out of range (experts 7..9 of 8)
    let e = g
        .write_experts(&t.data[6 * per..], t.dtype, 7, 2)
        .unwrap_err()
        .to_string();
    assert!(e.contains("bytes for experts 7..9"), "{e}");
}

#[test]
fn write_experts_then_read_is_the_identity_for_every_element_size() {
    // Random native tensors of 1-, 2-, 4- and 8-byte dtypes through every layout's disk tensors
    // (write_experts / fill_disk) and back (read: tensor_gather and transposes, another path).
    use adapters::Dtype;
    for name in FIXTURES {
        let src = HfCheckpoint::open(&common::fixture(name)).unwrap();
        let a = FamilyAdapter::from_checkpoint(&src).unwrap();
        for (seed, dtype) in [Dtype::U8, Dtype::BF16, Dtype::F32, Dtype::F64]
            .into_iter()
            .enumerate()
        {
            let native: Vec<_> = a
                .groups()
                .iter()
                .map(|g| common::rand_tensor(seed as u64, dtype, &g.shape))
                .collect();
            let mut disk = std::collections::BTreeMap::new();
            for (g, t) in a.groups().iter().zip(&native) {
                disk.extend(g.write_experts(&t.data, dtype, 0, g.shape[0]).unwrap());
            }
            let tmp = tempfile::tempdir().unwrap();
            common::write_ckpt(tmp.path(), src.config(), &disk, 1);
            let ck = HfCheckpoint::open(tmp.path()).unwrap();
            for (g, t) in a.groups().iter().zip(&native) {
                let full: Vec<Vec<usize>> = g.shape.iter().map(|&n| (0..n).collect()).collect();
                assert_eq!(
                    &g.read(&ck, &full).unwrap(),
                    t,
                    "{name} {dtype:?} {}",
                    g.native_key
                );
                // and expert by expert
                let mut out = vec![0u8; t.data.len() / g.shape[0]];
                for e in [0, g.shape[0] - 1] {
                    g.fill_experts(&ck, e, 1, &mut out).unwrap();
                    assert_eq!(out, t.data[e * out.len()..(e + 1) * out.len()]);
                }
            }
        }
    }
}

#[test]
fn fill_disk_and_fill_experts_check_their_buffers() {
    let ck = HfCheckpoint::open(&common::fixture("qwen3_moe_tiny")).unwrap();
    let a = FamilyAdapter::from_checkpoint(&ck).unwrap();
    let g = &a.groups()[0];
    let (native_block, disk_block) = g.expert_bytes(adapters::Dtype::BF16, 0).unwrap();
    let native = vec![0u8; 2 * native_block];
    // whole experts in, the wrong output size
    let mut out = vec![0u8; 2 * disk_block + 2];
    let e = g
        .fill_disk(&native, 2, 0, &mut out)
        .unwrap_err()
        .to_string();
    assert!(e.contains("do not match whole experts"), "{e}");
    let mut out = vec![0u8; 2 * disk_block];
    g.fill_disk(&native, 2, 0, &mut out).unwrap();
    // fill_experts: the wrong buffer size in range, the right size out of range
    let mut out = vec![0u8; native_block + 2];
    let e = g.fill_experts(&ck, 0, 1, &mut out).unwrap_err().to_string();
    assert!(e.contains("output buffer of"), "{e}");
    let mut out = vec![0u8; 2 * native_block];
    let e = g.fill_experts(&ck, 7, 2, &mut out).unwrap_err().to_string();
    assert!(e.contains("for experts 7..9"), "{e}");
    g.fill_experts(&ck, 6, 2, &mut out).unwrap();
    // write_experts of a strict subset of experts not at the end
    let t = g
        .read(
            &ck,
            &g.shape
                .iter()
                .map(|&n| (0..n).collect::<Vec<_>>())
                .collect::<Vec<_>>(),
        )
        .unwrap();
    let per = t.data.len() / g.shape[0];
    let out = g.write_experts(&t.data[..per], t.dtype, 0, 1).unwrap();
    assert!(
        out.iter().all(|(k, _)| k.contains(".experts.0.")),
        "{out:?}"
    );
}

#[test]
fn the_segments_of_each_disk_tensor_cover_its_columns_once() {
    // The invariants `Group::disk_placements` relies on (one segment of a disk tensor is the
    // whole tensor; several are interleaved): every layout table of layer_groups, with I != H
    // and 2I != H.
    use adapters::layout::{layer_groups, DiskLayout};
    let names = ["gate_proj.weight", "up_proj.weight", "down_proj.weight"];
    for layout in [
        DiskLayout::PerExpert,
        DiskLayout::FusedTransposed,
        DiskLayout::FusedNative,
        DiskLayout::GptOss,
        DiskLayout::Step35,
    ] {
        for g in layer_groups(layout, 0, "model.layers.0", "mlp", names, (4, 6, 5)) {
            let n = *g.shape.last().unwrap();
            // native columns: ascending, contiguous, complete
            let mut next = 0;
            for s in &g.segs {
                assert_eq!(s.start, next, "{layout:?} {}", g.native_key);
                next += s.len;
            }
            assert_eq!(next, n, "{layout:?} {}", g.native_key);
            for (src, d) in g.disk.iter().enumerate() {
                // a tensor holding n > 1 segments interleaves them: segment j at j, j + n, ...
                let mine: Vec<_> = g.segs.iter().filter(|s| s.src == src).collect();
                if mine.len() > 1 {
                    for (j, s) in mine.iter().enumerate() {
                        assert_eq!(
                            (s.col0, s.step, s.start),
                            (j, mine.len(), j * s.len),
                            "{layout:?} {}",
                            d.key
                        );
                    }
                }
                let nd = d.shape.len();
                let width = d.shape[if d.transposed { nd - 2 } else { nd - 1 }];
                let mut cols: Vec<usize> = g
                    .segs
                    .iter()
                    .filter(|s| s.src == src)
                    .flat_map(|s| (0..s.len).map(move |c| s.col0 + s.step * c))
                    .collect();
                cols.sort_unstable();
                assert_eq!(
                    cols,
                    (0..width).collect::<Vec<_>>(),
                    "{layout:?} {} {}",
                    g.native_key,
                    d.key
                );
            }
        }
    }
}

#[test]
fn packed_gate_up_of_a_transformers_fused_tensor_writes_back_strided() {
    // qwen3_vl_moe_tiny: gate_up_proj [E, 2I, H] holds gate | up along 2I in native order (one
    // identity segment): native `_S(2, 2)` is `_S(1, 2)` of it, rank 1 holding I/2.. of gate and
    // of up: disk rows {16..32, 48..64} (I = 32).
    use adapters::MoeAdapter;
    use placement::{DeviceMesh, IndexSet, Placement};
    let ck = HfCheckpoint::open(&common::fixture("qwen3_vl_moe_tiny")).unwrap();
    let a = FamilyAdapter::from_checkpoint(&ck).unwrap();
    let key = "model.language_model.layers.0.mlp.experts.gate_and_up_projs";
    let mesh = DeviceMesh::new(vec![2]).unwrap();
    let ss = |dim| Placement::StridedShard {
        dim,
        split_factor: 2,
    };
    let lt = a.from_hf_local(&ck, key, &mesh, &[ss(2)], &[1]).unwrap();
    let out = a.to_hf_local(&lt).unwrap();
    assert_eq!(out.len(), 1);
    let h = &out[0];
    assert_eq!(
        h.key,
        "model.language_model.layers.0.mlp.experts.gate_up_proj"
    );
    assert_eq!(h.placements, [ss(1)]);
    assert_eq!(
        h.indices,
        [
            IndexSet::from_range(0..8),
            IndexSet::from_runs(vec![16..32, 48..64]),
            IndexSet::from_range(0..64)
        ]
    );
    assert!(h.placements_match(&mesh, &[1]).unwrap());
    let disk = ck.tensor(&h.key).unwrap();
    assert_eq!(h.tensor, disk.gather(&h.indices).unwrap());
}
