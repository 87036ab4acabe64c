//! The floating-point element type of the reference path: `f32` (the API the lead calls) or `f64`
//! (the finite-difference tests run the very same reference code in double precision).

use std::fmt::Debug;
use std::iter::Sum;
use std::ops::{AddAssign, DivAssign, MulAssign, SubAssign};

use ndarray::LinalgScalar;
use num_traits::Float;

/// A real scalar the reference kernels are generic over (`f32`, `f64`).
pub trait Real:
    Float
    + LinalgScalar
    + Debug
    + Default
    + Sum
    + AddAssign
    + SubAssign
    + MulAssign
    + DivAssign
    + Send
    + Sync
    + 'static
{
    /// Exact conversion from an `f32` hyper-parameter (f32 -> f32 / f64 is always exact).
    fn from_f32(v: f32) -> Self;
    /// Conversion to `f64`, for error messages.
    fn to_f64_lossless(self) -> f64;
    /// The nearest value to `v` (exact for f64; round to nearest for f32).
    fn from_f64(v: f64) -> Self;
}

impl Real for f32 {
    fn from_f32(v: f32) -> Self {
        v
    }
    fn to_f64_lossless(self) -> f64 {
        f64::from(self)
    }
    fn from_f64(v: f64) -> Self {
        v as f32
    }
}

impl Real for f64 {
    fn from_f32(v: f32) -> Self {
        f64::from(v)
    }
    fn to_f64_lossless(self) -> f64 {
        self
    }
    fn from_f64(v: f64) -> Self {
        v
    }
}
