//! The sharded suite under the threads backend, and negative controls for its gather and compare.

use adapters::{Dtype, HostTensor, LocalTensor};
use collectives::threads::spawn_world;
use conformance::gather::gather_full;
use conformance::roundtrip::diff_tensor_maps;
use conformance::sharded;
use placement::{IndexSet, Placement};
use std::collections::BTreeMap;
use std::path::Path;

#[test]
fn sharded_checks_pass_at_world_sizes_1_2_4() {
    for name in ["qwen3_moe_tiny", "qwen3_moe_tiny_sharded"] {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("fixtures")
            .join(name);
        for world in [1, 2, 4] {
            for (rank, checks) in spawn_world(world, |c| sharded::run(c.as_ref(), &dir))
                .into_iter()
                .enumerate()
            {
                let checks = checks.unwrap().unwrap();
                // 2 plans x (shapes, native gather, HF index sets, HF gather)
                assert_eq!(
                    checks.len(),
                    8,
                    "{name} world {world} rank {rank}: {checks:?}"
                );
                for c in &checks {
                    assert!(!c.failed(), "{name} world {world} rank {rank}: {c}");
                }
            }
        }
    }
}

fn shard(indices: std::ops::Range<usize>, values: &[f32]) -> LocalTensor {
    let data = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    LocalTensor {
        key: "w".into(),
        tensor: HostTensor::new(Dtype::F32, vec![values.len()], data).unwrap(),
        global_shape: vec![4],
        placements: vec![Placement::Shard(0)],
        indices: vec![IndexSet::from_runs(vec![indices])],
    }
}

#[test]
fn an_unusable_checkpoint_is_one_agreed_error_on_every_rank() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(
        tmp.path().join("config.json"),
        r#"{"model_type": "qwen3_moe"}"#,
    )
    .unwrap();
    std::fs::write(tmp.path().join("model.safetensors"), b"short").unwrap();
    for r in spawn_world(3, |c| sharded::run(c.as_ref(), tmp.path())) {
        let e = r.unwrap().unwrap_err();
        assert!(
            e.contains("model.safetensors") && !e.contains("rank "),
            "{e}"
        );
    }
}

#[test]
fn gather_reassembles_disjoint_shards_in_global_order() {
    let got = spawn_world(2, |c| {
        let mine = if c.rank() == 0 {
            shard(2..4, &[3.0, 4.0])
        } else {
            shard(0..2, &[1.0, 2.0])
        };
        gather_full(c.as_ref(), &Ok(vec![mine]))
    });
    let want: Vec<u8> = [1.0f32, 2.0, 3.0, 4.0]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    for r in got {
        assert_eq!(r.unwrap().unwrap()["w"].data, want);
    }
}

#[test]
fn gather_rejects_shards_that_leave_elements_uncovered() {
    let got = spawn_world(2, |c| {
        gather_full(c.as_ref(), &Ok(vec![shard(0..2, &[1.0, 2.0])]))
    });
    for r in got {
        assert!(r.unwrap().is_err());
    }
}

#[test]
fn gather_reports_a_rank_that_failed_locally_on_every_rank() {
    let got = spawn_world(2, |c| {
        let mine = if c.rank() == 1 {
            Err("boom".to_string())
        } else {
            Ok(vec![shard(0..2, &[1.0, 2.0])])
        };
        gather_full(c.as_ref(), &mine)
    });
    for r in got {
        let e = r.unwrap().unwrap_err();
        assert!(e.contains("rank 1: boom"), "{e}");
    }
}

#[test]
fn diff_finds_a_single_flipped_byte() {
    let t = HostTensor::new(Dtype::BF16, vec![2, 2], vec![1, 2, 3, 4, 5, 6, 7, 8]).unwrap();
    let mut u = t.clone();
    u.data[5] ^= 1;
    let a: BTreeMap<_, _> = [("k".to_string(), t)].into();
    let b: BTreeMap<_, _> = [("k".to_string(), u)].into();
    let (diffs, n) = diff_tensor_maps(&a, &b, 4);
    assert_eq!(n, 1);
    assert!(diffs[0].contains("first at byte 5"), "{diffs:?}");
}
