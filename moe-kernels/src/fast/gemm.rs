//! Safe wrapper over the `gemm` crate's f32 kernel (BLAS-class, AVX2 / AVX-512 / NEON) on
//! ndarray views of any strides.

use ndarray::{ArrayView2, ArrayViewMut2};

use crate::error::{KernelError, Result};

pub use gemm::Parallelism;

/// `dst = a @ b` (or `dst += a @ b` when `accumulate`), `a` `[M, K]`, `b` `[K, N]`, `dst`
/// `[M, N]`, any strides (a transposed view is free). With `K = 0` the product is zero, so `dst`
/// is zeroed (or left as is when accumulating): an expert with no tokens gets an exact zero.
///
/// Each output element is one dot product over the whole `K` in a fixed order, whatever the
/// parallelism, so results are bitwise reproducible across runs.
///
/// # Errors
/// [`KernelError::ShapeMismatch`] naming `a`, `b` or `dst` when the shapes do not chain.
pub fn matmul(
    mut dst: ArrayViewMut2<f32>,
    a: ArrayView2<f32>,
    b: ArrayView2<f32>,
    accumulate: bool,
    par: Parallelism,
) -> Result<()> {
    let (m, k) = a.dim();
    let (kb, n) = b.dim();
    if kb != k {
        return Err(KernelError::ShapeMismatch {
            tensor: "b",
            expected: format!("[K={k}, N]"),
            got: b.shape().to_vec(),
        });
    }
    if dst.dim() != (m, n) {
        return Err(KernelError::ShapeMismatch {
            tensor: "dst",
            expected: format!("[M={m}, N={n}]"),
            got: dst.shape().to_vec(),
        });
    }
    if m == 0 || n == 0 {
        return Ok(());
    }
    if k == 0 {
        if !accumulate {
            dst.fill(0.0);
        }
        return Ok(());
    }
    let (ds, as_, bs) = (
        dst.strides().to_vec(),
        a.strides().to_vec(),
        b.strides().to_vec(),
    );
    // SAFETY: the pointers come from live ndarray views whose shapes were checked above to be
    // [m, n], [m, k], [k, n] with the given element strides, so every index gemm forms is in
    // bounds; `dst` is a unique mutable borrow, so it cannot alias `a` or `b`.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            ds[1],
            ds[0],
            accumulate,
            a.as_ptr(),
            as_[1],
            as_[0],
            b.as_ptr(),
            bs[1],
            bs[0],
            1.0,
            1.0,
            false,
            false,
            false,
            par,
        );
    }
    Ok(())
}
