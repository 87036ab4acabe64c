//! HostTensor data movement against naive index formulas.
mod common;

use adapters::{assemble, Dtype, HostTensor};
use common::{elem, rand_tensor};
use placement::IndexSet;
use proptest::prelude::*;

/// Row-major multi-index of flat position `f` in `shape`.
fn unravel(mut f: usize, shape: &[usize]) -> Vec<usize> {
    let mut idx = vec![0; shape.len()];
    for d in (0..shape.len()).rev() {
        idx[d] = f % shape[d];
        f /= shape[d];
    }
    idx
}

#[test]
fn new_checks_byte_count() {
    let e = HostTensor::new(Dtype::F32, vec![2, 3], vec![0; 20]).unwrap_err();
    assert!(e.to_string().contains("needs 24 bytes, got 20"), "{e}");
    assert!(HostTensor::new(Dtype::BF16, vec![2, 3], vec![0; 12]).is_ok());
}

#[test]
fn transpose_matches_formula() {
    let t = rand_tensor(3, Dtype::BF16, &[3, 4, 5]);
    let x = t.transpose(1, 2).unwrap();
    assert_eq!(x.shape, vec![3, 5, 4]);
    for a in 0..3 {
        for b in 0..5 {
            for c in 0..4 {
                assert_eq!(elem(&x, &[a, b, c]), elem(&t, &[a, c, b]));
            }
        }
    }
    assert!(t.transpose(0, 3).is_err());
}

#[test]
fn stack_cat_select() {
    let a = rand_tensor(1, Dtype::F32, &[2, 3]);
    let b = rand_tensor(2, Dtype::F32, &[2, 2]);
    let c = HostTensor::cat(&[a.clone(), b.clone()], 1).unwrap();
    assert_eq!(c.shape, vec![2, 5]);
    for r in 0..2 {
        for k in 0..5 {
            let want = if k < 3 {
                elem(&a, &[r, k])
            } else {
                elem(&b, &[r, k - 3])
            };
            assert_eq!(elem(&c, &[r, k]), want);
        }
    }
    let s = HostTensor::stack(&[a.clone(), a.clone()]).unwrap();
    assert_eq!(s.shape, vec![2, 2, 3]);
    assert_eq!(s.select(0, 1).unwrap(), a);
    let col = a.select(1, 2).unwrap();
    assert_eq!(col.shape, vec![2]);
    assert_eq!(elem(&col, &[1]), elem(&a, &[1, 2]));
    assert!(HostTensor::stack(&[a.clone(), b.clone()]).is_err());
    assert!(HostTensor::cat(&[a, b], 0).is_err());
}

#[test]
fn gather_by_index_sets() {
    let t = rand_tensor(5, Dtype::BF16, &[4, 6]);
    let rows = IndexSet::from_indices(&[3, 1]);
    let cols = IndexSet::from_runs(vec![0..2, 4..6]);
    let g = t.gather(&[rows, cols]).unwrap();
    assert_eq!(g.shape, vec![2, 4]);
    let rr = [3, 1];
    let cc = [0, 1, 4, 5];
    for (a, &r) in rr.iter().enumerate() {
        for (b, &c) in cc.iter().enumerate() {
            assert_eq!(elem(&g, &[a, b]), elem(&t, &[r, c]));
        }
    }
    assert!(t
        .gather(&[IndexSet::from_indices(&[4]), IndexSet::full(6)])
        .is_err());
}

#[test]
fn assemble_inverts_gather_and_detects_gaps_and_conflicts() {
    let t = rand_tensor(9, Dtype::F32, &[5, 3]);
    let s0 = vec![IndexSet::from_indices(&[0, 4]), IndexSet::full(3)];
    let s1 = vec![common::run(1, 4), IndexSet::full(3)];
    let parts = vec![
        (s0.clone(), t.gather(&s0).unwrap()),
        (s1.clone(), t.gather(&s1).unwrap()),
        // a replica of part 0: equal bytes are fine
        (s0.clone(), t.gather(&s0).unwrap()),
    ];
    assert_eq!(assemble(&[5, 3], Dtype::F32, &parts).unwrap(), t);
    let e = assemble(&[5, 3], Dtype::F32, &parts[..1])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("element [1, 0]") && e.contains("9 uncovered"),
        "{e}"
    );
    let mut bad = t.gather(&s0).unwrap();
    bad.data[0] ^= 1;
    let e = assemble(
        &[5, 3],
        Dtype::F32,
        &[parts[0].clone(), parts[1].clone(), (s0, bad)],
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("covered twice with different bytes"), "{e}");
}

#[test]
fn to_f32_known_values() {
    // bf16 0x3F80 = 1.0, 0xC000 = -2.0; f16 0x3C00 = 1.0.
    let b = HostTensor::new(Dtype::BF16, vec![2], vec![0x80, 0x3F, 0x00, 0xC0]).unwrap();
    assert_eq!(b.to_f32_vec().unwrap(), vec![1.0, -2.0]);
    let h = HostTensor::new(Dtype::F16, vec![1], vec![0x00, 0x3C]).unwrap();
    assert_eq!(h.to_f32_vec().unwrap(), vec![1.0]);
    let i = HostTensor::new(Dtype::I32, vec![1], vec![0; 4]).unwrap();
    assert!(i.to_f32_vec().is_err());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    /// permute(perm) agrees with out[idx] == in[idx permuted back] for every element.
    #[test]
    fn permute_matches_naive(shape in prop::collection::vec(1usize..4, 1..5), seed in 0u64..1000, rot in 0usize..4) {
        let nd = shape.len();
        let mut perm: Vec<usize> = (0..nd).collect();
        perm.rotate_left(rot % nd);
        if nd > 2 { perm.swap(0, nd - 1); }
        let t = rand_tensor(seed, Dtype::BF16, &shape);
        let p = t.permute(&perm).unwrap();
        let out_shape: Vec<usize> = perm.iter().map(|&q| shape[q]).collect();
        prop_assert_eq!(&p.shape, &out_shape);
        for f in 0..t.numel() {
            let o = unravel(f, &out_shape);
            let mut src = vec![0; nd];
            for (i, &q) in perm.iter().enumerate() { src[q] = o[i]; }
            prop_assert_eq!(elem(&p, &o), elem(&t, &src));
        }
    }
}
