//! Zeroed arrays for the fast path's large intermediates and gradients, with transparent huge
//! pages requested (`madvise(MADV_HUGEPAGE)`, Linux) before the first touch.
//!
//! A large zeroed allocation is a fresh anonymous mapping: the zeros cost nothing up front, but
//! every 4 KiB page faults on its first write. At the Qwen3-30B-A3B layer shape (`N = T k =
//! 32768` rows at `T = 4096`) one forward + backward touches ~4.5 GB of fresh memory, over a
//! million faults, which measured as much system time as the GEMMs' user time on a 2-core VM.
//! With 2 MiB pages the same memory takes ~2k faults. The contents are the same zeros either
//! way; only the page size changes. Small arrays (below [`HUGE_MIN_BYTES`]) are left alone.

use ndarray::{Array2, Array3};

/// Allocations at least this large get the huge-page advice.
pub const HUGE_MIN_BYTES: usize = 4 << 20;

const HUGE_PAGE: usize = 2 << 20;

#[cfg(target_os = "linux")]
fn advise_huge(ptr: *mut f32, len: usize) {
    extern "C" {
        fn madvise(addr: *mut core::ffi::c_void, len: usize, advice: core::ffi::c_int) -> i32;
    }
    const MADV_HUGEPAGE: core::ffi::c_int = 14;
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
            madvise(a0 as *mut core::ffi::c_void, a1 - a0, MADV_HUGEPAGE);
        }
    }
}

#[cfg(not(target_os = "linux"))]
fn advise_huge(_ptr: *mut f32, _len: usize) {}

/// A zeroed `Vec<f32>` of `len` elements, huge pages advised when large.
pub fn zeroed_vec(len: usize) -> Vec<f32> {
    let mut v = vec![0.0f32; len];
    advise_huge(v.as_mut_ptr(), len);
    v
}

/// `Array2::zeros((rows, cols))`, huge pages advised when large.
pub fn zeros2(rows: usize, cols: usize) -> Array2<f32> {
    Array2::from_shape_vec((rows, cols), zeroed_vec(rows * cols)).expect("shape matches the length")
}

/// `Array3::zeros((d0, d1, d2))`, huge pages advised when large.
pub fn zeros3(d0: usize, d1: usize, d2: usize) -> Array3<f32> {
    Array3::from_shape_vec((d0, d1, d2), zeroed_vec(d0 * d1 * d2))
        .expect("shape matches the length")
}
