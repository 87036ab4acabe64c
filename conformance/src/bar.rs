//! The one comparison of a computed tensor with a float64 truth, used by every suite that holds
//! a result against a truth (`golden`, `parallel`; moe-kernels' tests use the same functions):
//!
//! - a **float64** result (the reference in f64): normwise relative error
//!   `||r - t||_2 / ||t||_2 <= 1e-12` (float64's own rounding over these blocks is about 1e-15);
//! - a **float32** result, two bars, both must hold:
//!   1. elementwise `|r - t| <= (2^-24 + 2^-53) E` with `E` the element's running error
//!      coefficient ([`moe_kernels::bound`]: first order, every sum bounded for any summation
//!      order): what float32 arithmetic can do at all; it catches gross errors anywhere;
//!   2. normwise against an independent float32 implementation of the same block `f`
//!      (transformers' own float32 result in `golden`, the float32 reference loop in `parallel`):
//!      `||r - t||_2 <= 16 max(||f - t||_2, 4 * 2^-24 ||t||_2)`: our float32 error is of the size
//!      float32 gives another implementation (the factor and the floor measured on 36 fixtures,
//!      see [`moe_kernels::bound`]), which catches systematic errors far below the worst-case
//!      bar 1, e.g. a 1e-4 relative error in one expert.
//!
//! The note gives the worst `|r - t| / bar` (bar 1) and `||r - t|| / ||f - t||` (bar 2).

use crate::report::Check;
use moe_kernels::bound::{self, TruthRef};

/// A truth tensor with its error coefficients and, when known, another float32 implementation's
/// result ([`moe_kernels::bound::TruthRef`]).
pub type Truth<'a> = TruthRef<'a>;

/// The check of a float32 result (as f64 values) against a truth: bars 1 and 2 (module docs).
pub fn check_f32(name: String, got: &[f64], t: &Truth) -> Check {
    match bound::judge_f32(got, t) {
        Ok(note) => Check::pass(name, note),
        Err(why) => Check::fail(name, why),
    }
}

/// The check of a float64 result against a truth (normwise, module docs).
pub fn check_f64(name: String, got: &[f64], truth: &[f64]) -> Check {
    match bound::judge_f64(got, truth) {
        Ok(note) => Check::pass(name, note),
        Err(why) => Check::fail(name, why),
    }
}
