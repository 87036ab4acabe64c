//! Grouped GEMMs over the expert-contiguous permuted rows ([`crate::Permutation`]), parallel
//! with rayon over (expert, row block) or (expert, column block) tasks, each task one
//! single-threaded `gemm` call: every output element is written by exactly one task with a
//! fixed reduction order, so the results are bitwise deterministic.

use ndarray::{s, Array2, ArrayView2, ArrayViewMut2, Axis};
use rayon::prelude::*;

use super::gemm::{matmul, Parallelism};
use crate::error::Result;

/// Most rows per task of an M-grouped GEMM. An expert's rows are split into the fewest tasks of
/// at most this many rows, of near-equal size ([`row_blocks`]): no tiny remainder task that packs
/// a whole expert weight for a few rows, and enough tasks for rayon when one expert holds most
/// rows. The split depends only on the row counts, never on the thread count, so the bits do not
/// either.
const ROW_BLOCK: usize = 1024;

/// Near-equal blocks `(start, len)` covering `start..end`, each at most [`ROW_BLOCK`] rows.
fn row_blocks(start: usize, end: usize) -> impl Iterator<Item = (usize, usize)> {
    let n = end - start;
    let parts = n.div_ceil(ROW_BLOCK);
    (0..parts).map(move |p| {
        let (b0, b1) = (start + n * p / parts, start + n * (p + 1) / parts);
        (b0, b1 - b0)
    })
}

/// Left operand of an M-grouped GEMM: the grouped rows, stored or gathered.
#[derive(Debug, Clone, Copy)]
pub enum Rows<'a> {
    /// `[N, K]`: row `r` is the `r`-th grouped row (e.g. the permuted tokens `xp`).
    Dense(ArrayView2<'a, f32>),
    /// Row `r` is `x[token_of_row[r]]`, `x` `[T, K]`, `token_of_row` `[N]` (every entry `< T`):
    /// the dispatch gather folded into the GEMM. Each task copies its rows into a per-thread
    /// buffer right before its GEMM, so the `[N, K]` permuted copy is never materialised
    /// (the row gather of the A-tile load in torchtitan / Megatron grouped-GEMM kernels).
    Gather {
        /// `[T, K]` token rows.
        x: ArrayView2<'a, f32>,
        /// `[N]` token of every grouped row.
        token_of_row: &'a [usize],
    },
}

impl Rows<'_> {
    /// Number of grouped rows `N`.
    pub fn nrows(&self) -> usize {
        match self {
            Rows::Dense(a) => a.nrows(),
            Rows::Gather { token_of_row, .. } => token_of_row.len(),
        }
    }

    /// Row length `K`.
    pub fn ncols(&self) -> usize {
        match self {
            Rows::Dense(a) => a.ncols(),
            Rows::Gather { x, .. } => x.ncols(),
        }
    }
}

thread_local! {
    /// Per-thread buffer of [`Rows::Gather`] tasks (reused, so no task faults in fresh pages).
    static GATHERED: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// M-grouped GEMM: for each expert `e`, `dst[rows_e] = a[rows_e] @ weight(e)`, `a` `[N, K]`,
/// `weight(e)` `[K, Nout]` (any strides, e.g. a transposed expert weight), `dst` `[N, Nout]`,
/// `offsets` `[E + 1]` the exclusive scan of the per-expert row counts.
///
/// # Errors
/// [`crate::KernelError::ShapeMismatch`] when `a`, `weight(e)` and `dst` do not chain.
pub fn grouped_matmul<'w, W>(
    dst: &mut Array2<f32>,
    a: ArrayView2<f32>,
    offsets: &[usize],
    weight: W,
) -> Result<()>
where
    W: Fn(usize) -> ArrayView2<'w, f32> + Sync,
{
    run_grouped(
        dst,
        Rows::Dense(a),
        offsets,
        &weight,
        &mut [],
        &|_, _, _, _| Ok(()),
    )
}

/// [`grouped_matmul`] on [`Rows`] with an epilogue: after each task's GEMM,
/// `then(e, r0, dst_block, side_blocks)` runs on the same thread with the task's expert `e`,
/// its rows `r0..r0 + len` of `dst` (still in cache; the epilogue may update them, e.g. add a
/// bias) and the same rows of every array of `sides` (each `[N, C_i]`), e.g. the GLU activation
/// into `h` and the down projection of those rows into `y` while `h` is in cache.
///
/// # Errors
/// [`crate::KernelError::ShapeMismatch`] naming `side` when one does not have `N` rows, or
/// when `a`, `weight(e)` and `dst` do not chain; the first error an epilogue returns.
pub fn grouped_matmul_then<'w, W, F>(
    dst: &mut Array2<f32>,
    a: Rows,
    offsets: &[usize],
    weight: W,
    sides: &mut [&mut Array2<f32>],
    then: F,
) -> Result<()>
where
    W: Fn(usize) -> ArrayView2<'w, f32> + Sync,
    F: Fn(usize, usize, ArrayViewMut2<f32>, &mut [ArrayViewMut2<f32>]) -> Result<()> + Sync,
{
    if let Some(bad) = sides.iter().find(|s| s.nrows() != dst.nrows()) {
        return Err(crate::KernelError::ShapeMismatch {
            tensor: "side",
            expected: format!("[N={}, C]", dst.nrows()),
            got: bad.shape().to_vec(),
        });
    }
    run_grouped(dst, a, offsets, &weight, sides, &then)
}

/// Epilogue of [`grouped_matmul_then`]: `(expert, first row, dst rows, side rows)`.
type Epilogue<'f> =
    dyn Fn(usize, usize, ArrayViewMut2<f32>, &mut [ArrayViewMut2<f32>]) -> Result<()> + Sync + 'f;

/// One task of an M-grouped GEMM: expert, first row, its `dst` rows and side rows.
type Task<'d> = (
    usize,
    usize,
    ArrayViewMut2<'d, f32>,
    Vec<ArrayViewMut2<'d, f32>>,
);

/// The shared driver of [`grouped_matmul`] / [`grouped_matmul_then`]: (expert, row block)
/// tasks on rayon, each one single-threaded GEMM then the epilogue.
fn run_grouped<'w>(
    dst: &mut Array2<f32>,
    a: Rows,
    offsets: &[usize],
    weight: &(dyn Fn(usize) -> ArrayView2<'w, f32> + Sync),
    sides: &mut [&mut Array2<f32>],
    then: &Epilogue,
) -> Result<()> {
    let rows = dst.nrows();
    if a.nrows() != rows || offsets.last().copied().unwrap_or(0) != rows {
        return Err(crate::KernelError::ShapeMismatch {
            tensor: "a",
            expected: format!("[N={rows} (= offsets[E] and dst rows), K]"),
            got: vec![a.nrows(), a.ncols()],
        });
    }
    if let Rows::Gather { x, token_of_row } = a {
        if let Some(&bad) = token_of_row.iter().find(|&&t| t >= x.nrows()) {
            return Err(crate::KernelError::ShapeMismatch {
                tensor: "token_of_row",
                expected: format!("token ids < T = {} (got: the first bad id)", x.nrows()),
                got: vec![bad],
            });
        }
    }
    let mut tasks: Vec<Task> = Vec::new();
    let mut rest = dst.view_mut();
    let mut side_rest: Vec<ArrayViewMut2<f32>> = sides.iter_mut().map(|s| s.view_mut()).collect();
    for (e, w) in offsets.windows(2).enumerate() {
        for (r, len) in row_blocks(w[0], w[1]) {
            let (head, tail) = rest.split_at(Axis(0), len);
            rest = tail;
            let mut side_heads = Vec::with_capacity(side_rest.len());
            side_rest = side_rest
                .into_iter()
                .map(|v| {
                    let (h, t) = v.split_at(Axis(0), len);
                    side_heads.push(h);
                    t
                })
                .collect();
            tasks.push((e, r, head, side_heads));
        }
    }
    tasks
        .into_par_iter()
        .try_for_each(|(e, r, mut view, mut sides)| {
            let len = view.nrows();
            match a {
                Rows::Dense(a) => matmul(
                    view.view_mut(),
                    a.slice(s![r..r + len, ..]),
                    weight(e),
                    false,
                    Parallelism::None,
                )?,
                Rows::Gather { x, token_of_row } => GATHERED.with(|buf| {
                    let mut buf = buf.borrow_mut();
                    let k = x.ncols();
                    buf.resize(len * k, 0.0);
                    for (dst_row, &t) in buf.chunks_mut(k.max(1)).zip(&token_of_row[r..r + len]) {
                        dst_row.iter_mut().zip(x.row(t)).for_each(|(d, &v)| *d = v);
                    }
                    let block =
                        ArrayView2::from_shape((len, k), &buf[..len * k]).map_err(|err| {
                            crate::KernelError::ShapeMismatch {
                                tensor: "gathered rows",
                                expected: format!("[{len}, {k}] ({err})"),
                                got: vec![buf.len()],
                            }
                        })?;
                    matmul(view.view_mut(), block, weight(e), false, Parallelism::None)
                })?,
            }
            then(e, r, view, &mut sides)
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
