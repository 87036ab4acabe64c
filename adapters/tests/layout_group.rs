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
