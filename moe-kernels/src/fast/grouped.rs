//! Grouped GEMMs over the expert-contiguous permuted rows ([`crate::Permutation`]), parallel
//! with rayon over (expert, row block) or (expert, column block) tasks, each task one
//! single-threaded `gemm` call: every output element is written by exactly one task with a
//! fixed reduction order, so the results are bitwise deterministic.

use ndarray::{s, Array2, ArrayView2, ArrayViewMut2, Axis};
use rayon::prelude::*;

use super::gemm::{matmul, Parallelism};
use crate::error::Result;

/// Rows per task of an M-grouped GEMM (large enough for the kernel's packing to pay off).
const ROW_BLOCK: usize = 256;

/// M-grouped GEMM: for each expert `e`, `dst[rows_e] = a[rows_e] @ weight(e)`, `a` `[N, K]`,
/// `weight(e)` `[K, Nout]` (any strides, e.g. a transposed expert weight), `dst` `[N, Nout]`,
/// `offsets` `[E + 1]` the exclusive scan of the per-expert row counts.
pub fn grouped_matmul<'w, W>(
    dst: &mut Array2<f32>,
    a: ArrayView2<f32>,
    offsets: &[usize],
    weight: W,
) -> Result<()>
where
    W: Fn(usize) -> ArrayView2<'w, f32> + Sync,
{
    let mut tasks: Vec<(usize, usize, ArrayViewMut2<f32>)> = Vec::new();
    let mut rest = dst.view_mut();
    for (e, w) in offsets.windows(2).enumerate() {
        let (start, end) = (w[0], w[1]);
        let (mut block, tail) = rest.split_at(Axis(0), end - start);
        rest = tail;
        let mut r = start;
        while r < end {
            let len = ROW_BLOCK.min(end - r);
            let (head, tail) = block.split_at(Axis(0), len);
            tasks.push((e, r, head));
            block = tail;
            r += len;
        }
    }
    tasks.into_par_iter().try_for_each(|(e, r, view)| {
        let len = view.nrows();
        matmul(
            view,
            a.slice(s![r..r + len, ..]),
            weight(e),
            false,
            Parallelism::None,
        )
    })
}

/// K-grouped GEMM (weight gradients): for each expert `e`,
/// `dst[e] = lhs[rows_e]^T @ rhs[rows_e]`, `lhs` `[N, P]`, `rhs` `[N, Q]`, `dst` `[E, P, Q]`.
/// The reduction runs over that expert's rows; an expert with no rows gets exact zeros.
pub fn grouped_matmul_tn(
    dst: &mut ndarray::Array3<f32>,
    lhs: ArrayView2<f32>,
    rhs: ArrayView2<f32>,
    offsets: &[usize],
) -> Result<()> {
    let experts = dst.shape()[0];
    let q = dst.shape()[2];
    // Split columns so that there are at least ~4 tasks per thread.
    let want = 4 * rayon::current_num_threads();
    let col_parts = want
        .div_ceil(experts.max(1))
        .clamp(1, q.div_ceil(64).max(1));
    let col_block = q.div_ceil(col_parts).max(1);
    let mut tasks: Vec<(usize, usize, ArrayViewMut2<f32>)> = Vec::new();
    for (e, mut de) in dst.outer_iter_mut().enumerate() {
        let mut c0 = 0;
        while c0 < q {
            let len = col_block.min(q - c0);
            let (head, tail) = de.split_at(Axis(1), len);
            tasks.push((e, c0, head));
            de = tail;
            c0 += len;
        }
    }
    tasks.into_par_iter().try_for_each(|(e, c0, view)| {
        let rows = offsets[e]..offsets[e + 1];
        let len = view.ncols();
        let l = lhs.slice(s![rows.clone(), ..]);
        let r = rhs.slice(s![rows, c0..c0 + len]);
        matmul(view, l.t(), r, false, Parallelism::None)
    })
}

/// Per-expert column sums (bias gradients): `dst[e] = sum over rows_e of src`, `src` `[N, C]`,
/// `dst` `[E, C]`; rows summed in ascending order.
pub fn grouped_row_sum(src: ArrayView2<f32>, offsets: &[usize]) -> Array2<f32> {
    let experts = offsets.len().saturating_sub(1);
    let mut dst = Array2::<f32>::zeros((experts, src.ncols()));
    par_rows(&mut dst, |e, row| {
        for r in offsets[e]..offsets[e + 1] {
            row.iter_mut().zip(src.row(r)).for_each(|(a, &b)| *a += b);
        }
    });
    dst
}

/// Runs `f(row_index, row)` over the rows of a standard-layout `[N, C]` array in parallel.
pub fn par_rows<F>(dst: &mut Array2<f32>, f: F)
where
    F: Fn(usize, &mut [f32]) + Sync,
{
    let cols = dst.ncols().max(1);
    match dst.as_slice_mut() {
        Some(data) => data
            .par_chunks_mut(cols)
            .enumerate()
            .for_each(|(r, row)| f(r, row)),
        None => {
            for (r, mut row) in dst.rows_mut().into_iter().enumerate() {
                let mut v = row.to_vec();
                f(r, &mut v);
                row.iter_mut().zip(v).for_each(|(a, b)| *a = b);
            }
        }
    }
}
