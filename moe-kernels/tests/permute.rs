//! Permutation invariants: counts sum to T*k, offsets are the exclusive scan, the inverse is the
//! identity both ways, every row of expert e holds a slot routed to e, slots ascend within an
//! expert (stable scatter); plus a hand-worked example.

use moe_kernels::Permutation;
use ndarray::{array, Array2};
use proptest::prelude::*;

#[test]
fn hand_worked_permutation() {
    // T = 3, k = 2; slots 0..6 route to experts [2, 0, 0, 1, 2, 0], E = 4 (expert 3 empty).
    let idx = array![[2usize, 0], [0, 1], [2, 0]];
    let p = Permutation::from_top_k_index(idx.view(), 4).unwrap();
    assert_eq!(p.counts, vec![3, 1, 2, 0]);
    assert_eq!(p.offsets, vec![0, 3, 4, 6, 6]);
    assert_eq!(p.slot_of_row, vec![1, 2, 5, 3, 0, 4]);
    assert_eq!(p.row_of_slot, vec![4, 0, 1, 3, 5, 2]);
    assert_eq!(p.rows(3), 6..6);
    assert_eq!(
        (0..6).map(|r| p.token_of_row(r)).collect::<Vec<_>>(),
        vec![0, 1, 2, 1, 0, 2]
    );
}

#[test]
fn out_of_range_expert_is_an_error_naming_top_k_index() {
    let idx = array![[0usize, 5]];
    let err = Permutation::from_top_k_index(idx.view(), 4).unwrap_err();
    assert!(err.to_string().contains("top_k_index"), "{err}");
}

proptest! {
    #[test]
    fn permutation_invariants(
        (t, k, e, ids) in (0usize..40, 1usize..9, 1usize..20)
            .prop_flat_map(|(t, k, e)| (Just(t), Just(k), Just(e), prop::collection::vec(0..e, t * k)))
    ) {
        let idx = Array2::from_shape_vec((t, k), ids).unwrap();
        let p = Permutation::from_top_k_index(idx.view(), e).unwrap();
        prop_assert_eq!(p.counts.iter().sum::<usize>(), t * k);
        prop_assert_eq!(p.offsets.len(), e + 1);
        prop_assert_eq!(p.offsets[0], 0);
        for x in 0..e {
            prop_assert_eq!(p.offsets[x + 1] - p.offsets[x], p.counts[x]);
            let rows = p.rows(x);
            let slots: Vec<usize> = rows.clone().map(|r| p.slot_of_row[r]).collect();
            prop_assert!(slots.windows(2).all(|w| w[0] < w[1]), "not stable: {:?}", slots);
            for s in slots {
                prop_assert_eq!(idx[[s / k, s % k]], x);
            }
        }
        for r in 0..t * k {
            prop_assert_eq!(p.row_of_slot[p.slot_of_row[r]], r);
            prop_assert_eq!(p.slot_of_row[p.row_of_slot[r]], r);
        }
    }
}
