//! Zeroed arrays for the fast path's large intermediates and gradients, with transparent huge
//! pages requested (`madvise(MADV_HUGEPAGE)`, Linux) before the first touch.
//!
//! A large zeroed allocation is a fresh anonymous mapping: the zeros cost nothing up front, but
//! every 4 KiB page faults on its first write. At the Qwen3-30B-A3B layer shape (`N = T k =
//! 32768` rows at `T = 4096`) one forward + backward touches ~4.5 GB of fresh memory, over a
//! million faults, which measured as much system time as the GEMMs' user time on a 2-core VM.
//! With 2 MiB pages the same memory takes ~2k faults. The contents are the same zeros either
//! way; only the page size changes. Small arrays (below [`HUGE_MIN_BYTES`]) are left alone.

use std::sync::Mutex;

use ndarray::{Array2, Array3};
use rayon::prelude::*;

/// Allocations at least this large get the huge-page advice.
pub const HUGE_MIN_BYTES: usize = 4 << 20;

const HUGE_PAGE: usize = 2 << 20;

#[cfg(target_os = "linux")]
fn advise_huge(ptr: *mut f32, len: usize) {
    let bytes = len * std::mem::size_of::<f32>();
    if bytes < HUGE_MIN_BYTES {
        return;
    }
    let start = ptr as usize;
    let end = start + bytes;
    let a0 = start.next_multiple_of(HUGE_PAGE);
    let a1 = end & !(HUGE_PAGE - 1);
    if a1 > a0 {
        // SAFETY: [a0, a1) lies inside the live allocation of `len` f32 starting at `ptr`;
        // MADV_HUGEPAGE only changes how the kernel backs those pages, never their contents
        // (the range is still all zeros, as allocated), and failure is harmless (ignored).
        unsafe {
            libc::madvise(a0 as *mut libc::c_void, a1 - a0, libc::MADV_HUGEPAGE);
        }
    }
}

#[cfg(not(target_os = "linux"))]
fn advise_huge(_ptr: *mut f32, _len: usize) {}

/// Most bytes the buffer pool keeps ([`recycle`]); beyond it a recycled buffer is freed.
pub const POOL_MAX_BYTES: usize = 4 << 30;

/// Large buffers given back by [`recycle`], reused by [`zeroed_vec`] for the same length.
static POOL: Mutex<Vec<Vec<f32>>> = Mutex::new(Vec::new());

fn pool() -> std::sync::MutexGuard<'static, Vec<Vec<f32>>> {
    POOL.lock().unwrap_or_else(|e| e.into_inner())
}

/// A zeroed `Vec<f32>` of `len` elements: a recycled buffer of that length (zeroed here, in
/// parallel) when the pool has one, else a fresh allocation with huge pages advised when large.
pub fn zeroed_vec(len: usize) -> Vec<f32> {
    if len * std::mem::size_of::<f32>() >= HUGE_MIN_BYTES {
        if let Some(mut v) = take_pooled(len) {
            v.par_chunks_mut(1 << 16).for_each(|c| c.fill(0.0));
            return v;
        }
    }
    let mut v = vec![0.0f32; len];
    advise_huge(v.as_mut_ptr(), len);
    v
}

/// A `Vec<f32>` of `len` elements with unspecified (finite, initialised) contents, for an
/// output that the caller overwrites entirely: a recycled buffer of that length as it was left
/// (no zeroing pass), else a fresh zeroed allocation with huge pages advised when large.
pub fn scratch_vec(len: usize) -> Vec<f32> {
    if len * std::mem::size_of::<f32>() >= HUGE_MIN_BYTES {
        if let Some(v) = take_pooled(len) {
            return v;
        }
    }
    let mut v = vec![0.0f32; len];
    advise_huge(v.as_mut_ptr(), len);
    v
}

/// Removes and returns a pooled buffer of exactly `len` elements, if any.
fn take_pooled(len: usize) -> Option<Vec<f32>> {
    let mut p = pool();
    p.iter()
        .position(|v| v.len() == len)
        .map(|i| p.swap_remove(i))
}

/// Gives a buffer back for reuse by a later [`zeroed_vec`] / [`zeros2`] / [`zeros3`] of the
/// same length (a caching allocator for the fast path's large intermediates, so that repeated
/// calls at one shape do not fault in fresh pages every time). Small buffers, non-contiguous
/// arrays and buffers beyond [`POOL_MAX_BYTES`] in all are simply dropped.
pub fn recycle<D: ndarray::Dimension>(a: ndarray::Array<f32, D>) {
    if !a.is_standard_layout() || a.len() * std::mem::size_of::<f32>() < HUGE_MIN_BYTES {
        return;
    }
    let (v, offset) = a.into_raw_vec_and_offset();
    if offset.unwrap_or(0) != 0 {
        return;
    }
    let mut p = pool();
    let held: usize = p.iter().map(|b| b.len() * std::mem::size_of::<f32>()).sum();
    if held + v.len() * std::mem::size_of::<f32>() <= POOL_MAX_BYTES {
        p.push(v);
    }
}

/// Frees every buffer the pool holds.
pub fn release_pool() {
    pool().clear();
}

/// `Array2::zeros((rows, cols))`, huge pages advised when large.
pub fn zeros2(rows: usize, cols: usize) -> Array2<f32> {
    let v = zeroed_vec(rows * cols);
    // `v` has exactly rows * cols elements, so the shape always fits; the fallback is unreachable.
    Array2::from_shape_vec((rows, cols), v).unwrap_or_else(|_| Array2::zeros((rows, cols)))
}

/// A `[rows, cols]` array for an output the caller overwrites entirely ([`scratch_vec`]:
/// contents unspecified until written).
pub fn scratch2(rows: usize, cols: usize) -> Array2<f32> {
    let v = scratch_vec(rows * cols);
    // `v` has exactly rows * cols elements, so the shape always fits; the fallback is unreachable.
    Array2::from_shape_vec((rows, cols), v).unwrap_or_else(|_| Array2::zeros((rows, cols)))
}

/// A `[d0, d1, d2]` array for an output the caller overwrites entirely ([`scratch_vec`]).
pub fn scratch3(d0: usize, d1: usize, d2: usize) -> Array3<f32> {
    let v = scratch_vec(d0 * d1 * d2);
    // `v` has exactly d0 * d1 * d2 elements; the fallback is unreachable.
    Array3::from_shape_vec((d0, d1, d2), v).unwrap_or_else(|_| Array3::zeros((d0, d1, d2)))
}

/// `Array3::zeros((d0, d1, d2))`, huge pages advised when large.
pub fn zeros3(d0: usize, d1: usize, d2: usize) -> Array3<f32> {
    let v = zeroed_vec(d0 * d1 * d2);
    // `v` has exactly d0 * d1 * d2 elements; the fallback is unreachable.
    Array3::from_shape_vec((d0, d1, d2), v).unwrap_or_else(|_| Array3::zeros((d0, d1, d2)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recycled_buffers_come_back_zeroed() {
        let (rows, cols) = (1024, 1024 + 7); // over HUGE_MIN_BYTES: pooled
        let mut a = zeros2(rows, cols);
        a.fill(3.5);
        recycle(a);
        let b = zeros2(rows, cols);
        assert_eq!(b.dim(), (rows, cols));
        assert!(b.iter().all(|&v| v == 0.0));
        let c = zeros3(1, rows, cols);
        assert!(c.iter().all(|&v| v == 0.0));
        recycle(b);
        recycle(c);
        release_pool();
    }

    #[test]
    fn scratch_reuses_the_pooled_buffer() {
        let (rows, cols) = (1024, 1024 + 9);
        let mut a = scratch2(rows, cols);
        assert!(
            a.iter().all(|&v| v == 0.0),
            "a fresh scratch buffer is zeroed"
        );
        a.fill(2.5);
        let ptr = a.as_ptr();
        recycle(a);
        let b = scratch2(rows, cols);
        assert_eq!(b.as_ptr(), ptr, "same length: the pooled buffer comes back");
        assert_eq!(b.dim(), (rows, cols));
        recycle(b);
        release_pool();
    }
}
