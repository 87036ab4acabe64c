//! The cache-blocked transpose kernel vs the naive index formula
//! `dst[d.offset + c * d.stride + r] = src[s.offset + r * s.stride + c]`, for every element size
//! (1, 2, 4, 8 have their own kernels; 3, 6 and 16 take the generic one), shapes that are not
//! multiples of the 16-row runs or the 64 / 128 tiles, offsets, padded strides, and bytes outside
//! the written elements left untouched.

use adapters::transpose::{transpose, Mat};
use proptest::prelude::*;

fn bytes(seed: u64, n: usize) -> Vec<u8> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 24) as u8
        })
        .collect()
}

/// Checks one case against the naive formula; `pad_*` add slack to the strides.
fn check(elem: usize, rows: usize, cols: usize, offs: (usize, usize), pads: (usize, usize)) {
    let s = Mat {
        offset: offs.0,
        stride: cols + pads.0,
    };
    let d = Mat {
        offset: offs.1,
        stride: rows + pads.1,
    };
    let src_len = (s.offset + rows.saturating_sub(1) * s.stride + cols) * elem;
    let dst_len = (d.offset + cols.saturating_sub(1) * d.stride + rows) * elem;
    let src = bytes((rows * 31 + cols) as u64, src_len);
    let before = bytes(99, dst_len);
    let mut want = before.clone();
    for r in 0..rows {
        for c in 0..cols {
            let so = (s.offset + r * s.stride + c) * elem;
            let dof = (d.offset + c * d.stride + r) * elem;
            want[dof..dof + elem].copy_from_slice(&src[so..so + elem]);
        }
    }
    let mut got = before;
    transpose(&mut got, d, &src, s, rows, cols, elem);
    assert!(
        got == want,
        "elem {elem}, rows {rows}, cols {cols}, offsets {offs:?}, pads {pads:?}"
    );
}

#[test]
fn every_element_size_and_odd_shapes_match_the_formula() {
    let dims = [1, 2, 7, 8, 9, 15, 17, 63, 64, 65, 127, 128, 129, 200];
    for elem in [1, 2, 3, 4, 6, 8, 16] {
        for &rows in &dims {
            for &cols in &dims {
                if elem > 4 && rows * cols > 64 * 200 {
                    continue; // keep the debug-mode run short
                }
                check(elem, rows, cols, (0, 0), (0, 0));
            }
        }
    }
}

#[test]
fn offsets_and_padded_strides_leave_other_bytes_untouched() {
    for elem in [1, 2, 4, 8, 3] {
        for (rows, cols) in [(144, 384), (384, 144), (5, 300), (130, 3), (9, 9)] {
            check(elem, rows, cols, (3, 5), (7, 1));
            check(elem, rows, cols, (0, 11), (0, 13));
        }
    }
}

#[test]
fn empty_shapes_write_nothing() {
    let src = bytes(1, 16);
    let mut dst = bytes(2, 16);
    let before = dst.clone();
    let m = Mat {
        offset: 0,
        stride: 4,
    };
    transpose(&mut dst, m, &src, m, 0, 4, 2);
    transpose(&mut dst, m, &src, m, 4, 0, 2);
    assert_eq!(dst, before);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    #[test]
    fn random_cases_match_the_formula(
        elem in prop::sample::select(vec![1usize, 2, 3, 4, 8]),
        rows in 1usize..150,
        cols in 1usize..150,
        so in 0usize..5,
        dof in 0usize..5,
        sp in 0usize..4,
        dp in 0usize..4,
    ) {
        check(elem, rows, cols, (so, dof), (sp, dp));
    }
}
