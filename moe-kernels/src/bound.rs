//! The float32 error bar of the MoE block: a first-order forward-error bound per output element,
//! computed by running the reference kernels (the spec) on [`Mag`], a scalar that carries a value
//! and what its float32 evaluation may be off by.
//!
//! # The bound (running error analysis, order-independent sums)
//!
//! With `u = 2^-24` (float32 unit roundoff), every basic operation returns `(a op b)(1 + d)` with
//! `|d| <= u`, and `exp` within a few ulps (Higham, *Accuracy and Stability of Numerical
//! Algorithms*, 2nd ed., §2.2). Running error analysis (Higham §3.3) carries, for every value `x`,
//! a coefficient `E(x)` with `|x_float32 - x| <= u E(x)` to first order; [`Mag`] computes it
//! alongside the float64 value of the reference kernels (the spec), so every result of the block
//! gets its own `E`:
//!
//! | value | `E` |
//! |---|---|
//! | input / weight (exact in float32) | `0` |
//! | a sum `t_1 + ... + t_k` (any chain of `+` / `-`) | `sum E(t_i) + LAMBDA sqrt(k - 1) P` |
//! | `a * b` | `|b| E(a) + |a| E(b) + |a b|` |
//! | `a / b` | `E(a) / |b| + |a / b^2| E(b) + |a / b|` |
//! | `f(a)` (exp, sqrt, tanh, ...) | `|f'(a)| E(a) + 4 |f(a)|` (the function within 4 ulps) |
//! | `max`, `min`, clamp | `E` of the operand taken |
//!
//! **Sums.** The worst case of a `k`-term sum in any order is `(k - 1) u sum |t_i|` (Higham §4.2,
//! eq. 4.4); it is reached only when all `k - 1` roundings align, and over a 4096-token gradient
//! reduction it is 100x the errors any float32 code shows. The bar uses the probabilistic form of
//! Higham & Mary, "A New Approach to Probabilistic Rounding Error Analysis" (SIAM J. Sci. Comput.
//! 41(5), 2019, Thm. 3.1): with the roundings independent and of mean zero, the error of the sum is
//! at most `LAMBDA sqrt(k - 1) u P` except with probability `2 exp(-LAMBDA^2 / 2)` (`LAMBDA = 6`:
//! `3e-8` per sum), where `P` bounds the partial sums of the evaluation. `P = min(sum |t_i|,
//! |sum t_i| + LAMBDA sqrt(sum t_i^2))`: the first term holds for every order; the second bounds the
//! partial sums of any order once the terms behave as centred random values, the regime of a
//! gradient reduction over tokens whose terms cancel. A chain of additions stays OPEN (`Mag` keeps
//! `k`, `sum |t_i|` and `sum t_i^2`) until the value enters a product, a division or a function, so
//! the bar holds for every association order: the fast path's grouped GEMMs and blocked token
//! reductions and the reference's loops alike.
//!
//! **Bar 1 (elementwise).** A float32 result `r` against the float64 truth `t` passes when
//! `|r - t| <= (2^-24 + 2^-53) E` per element (the second term: the truth's own rounding).
//!
//! **Bar 2 (normwise, with an independent float32 result).** Bar 1 is per element and first order,
//! so a systematic error much smaller than it, spread over many elements (a `1e-4` relative error
//! in one expert's weights), could hide under it. When the truth comes with an independent float32
//! evaluation `f` of the same block (transformers' own float32 result in a golden fixture, the
//! float32 reference loop in the parallel suite), [`judge_f32`] also asks
//! `||r - t||_2 <= 16 max(||f - t||_2, 4 u ||t||_2)`: our float32 error is of the size float32
//! gives another implementation of the same block. Summation orders differ, so single tensors
//! scatter: over 8400 tensors of 36 transformers fixtures (the committed ones and 22 more drawn
//! with other seeds and 2.5-3x magnitudes) our error reached 13x `||f - t||` where `f` was lucky
//! (a one-token expert's gradient, `||f - t|| = 0.5 u ||t||`), hence the floor `4 u ||t||`
//! (four roundings' worth, below which the comparison measures luck) and the factor 16. With
//! them the worst correct tensor sits at 0.34 of the bar, and a `1e-4` relative error in the
//! busiest expert takes some tensor to at least 9.8x the bar on every one of those fixtures (the
//! block output alone to 3.9x or more on the committed ones).
//!
//! Routing decisions (top-k, group selection, clamps' branch) are taken from the values: the bound
//! holds when float32 makes the same discrete choices as the truth, which the fixtures ensure by
//! drawing inputs whose selection margins exceed the logits' error.

use crate::config::{MoeConfig, MoeForward, MoeGrads, MoeParams};
use crate::error::Result;
use crate::scalar::Real;
use ndarray::{Array1, Array2, Array3, ArrayView2, ScalarOperand};
use num_traits::{Float, Num, NumCast, One, ToPrimitive, Zero};
use std::cmp::Ordering;
use std::iter::Sum;
use std::num::FpCategory;
use std::ops::{Add, AddAssign, Div, DivAssign, Mul, MulAssign, Neg, Rem, Sub, SubAssign};

/// float32 unit roundoff, `2^-24`.
pub const U32: f64 = 1.0 / 16_777_216.0;
/// float64 unit roundoff, `2^-53`.
pub const U64: f64 = 1.0 / 9_007_199_254_740_992.0;
/// Probabilistic factor of a sum's rounding (Higham & Mary 2019): exceeded with probability at
/// most `2 exp(-LAMBDA^2 / 2)` per sum.
pub const LAMBDA: f64 = 6.0;
/// Ulps allowed to an elementary function (`exp`, `sqrt`, `tanh`, `ln`) of either path.
pub const FN_ULPS: f64 = 4.0;

/// A value (computed in float64) with its running error coefficient (module docs): `e` is the
/// propagated error of the terms of the (possibly open) sum `v`, `k` its number of terms and `s`
/// the sum of their magnitudes; [`Mag::coef`] closes the sum. Comparisons look at `v` only.
#[derive(Debug, Clone, Copy, Default)]
pub struct Mag {
    /// The value.
    pub v: f64,
    /// Sum of the terms' closed coefficients `E(t_i)`.
    pub e: f64,
    /// Number of terms of the open sum (1 for a single value).
    pub k: f64,
    /// Sum of the terms' magnitudes `|t_i|`.
    pub s: f64,
    /// Sum of the terms' squares `t_i^2`.
    pub q: f64,
}

impl Mag {
    /// An exact input: `E = 0`.
    pub fn exact(v: f64) -> Self {
        Mag::closed(v, 0.0)
    }

    /// `E(self)`: `e` plus the rounding of the open sum, `LAMBDA sqrt(k - 1) P` with `P =
    /// min(s, |v| + LAMBDA sqrt(q))` the size of its partial sums in any order.
    pub fn coef(&self) -> f64 {
        if self.k <= 1.0 {
            return self.e;
        }
        let partial = self.s.min(self.v.abs() + LAMBDA * self.q.sqrt());
        self.e + LAMBDA * (self.k - 1.0).sqrt() * partial
    }

    /// A closed value `v` with coefficient `e` (the result of a rounded operation).
    fn closed(v: f64, e: f64) -> Self {
        Mag {
            v,
            e,
            k: 1.0,
            s: v.abs(),
            q: v * v,
        }
    }

    /// A value with no rule here: `E = NaN`, so a bound built on it is NaN and its check fails.
    fn poisoned(v: f64) -> Self {
        Mag::closed(v, f64::NAN)
    }

    /// `f(self)` with derivative `df` at `self.v`.
    fn unary(self, f: f64, df: f64) -> Self {
        Mag::closed(f, df.abs() * self.coef() + FN_ULPS * f.abs())
    }
}

impl PartialEq for Mag {
    fn eq(&self, o: &Self) -> bool {
        self.v == o.v
    }
}

impl PartialOrd for Mag {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        self.v.partial_cmp(&o.v)
    }
}

impl Add for Mag {
    type Output = Mag;
    fn add(self, o: Mag) -> Mag {
        // Adding an exact zero (an accumulator's start) adds no term.
        if o.v == 0.0 && o.coef() == 0.0 {
            return self;
        }
        if self.v == 0.0 && self.coef() == 0.0 {
            return o;
        }
        Mag {
            v: self.v + o.v,
            e: self.e + o.e,
            k: self.k + o.k,
            s: self.s + o.s,
            q: self.q + o.q,
        }
    }
}

impl Sub for Mag {
    type Output = Mag;
    fn sub(self, o: Mag) -> Mag {
        self + (-o)
    }
}

impl Mul for Mag {
    type Output = Mag;
    fn mul(self, o: Mag) -> Mag {
        let v = self.v * o.v;
        Mag::closed(
            v,
            o.v.abs() * self.coef() + self.v.abs() * o.coef() + v.abs(),
        )
    }
}

impl Div for Mag {
    type Output = Mag;
    fn div(self, o: Mag) -> Mag {
        let v = self.v / o.v;
        let b = o.v.abs();
        Mag::closed(v, self.coef() / b + (v / o.v).abs() * o.coef() + v.abs())
    }
}

impl Rem for Mag {
    type Output = Mag;
    fn rem(self, o: Mag) -> Mag {
        Mag::poisoned(self.v % o.v)
    }
}

impl Neg for Mag {
    type Output = Mag;
    fn neg(self) -> Mag {
        Mag { v: -self.v, ..self }
    }
}

macro_rules! assign {
    ($t:ident, $f:ident, $op:tt) => {
        impl $t for Mag {
            fn $f(&mut self, o: Mag) {
                *self = *self $op o;
            }
        }
    };
}
assign!(AddAssign, add_assign, +);
assign!(SubAssign, sub_assign, -);
assign!(MulAssign, mul_assign, *);
assign!(DivAssign, div_assign, /);

impl Sum for Mag {
    fn sum<I: Iterator<Item = Mag>>(it: I) -> Mag {
        it.fold(Mag::zero(), |a, b| a + b)
    }
}

impl Zero for Mag {
    fn zero() -> Self {
        Mag::exact(0.0)
    }
    fn is_zero(&self) -> bool {
        self.v == 0.0
    }
}

impl One for Mag {
    fn one() -> Self {
        Mag::exact(1.0)
    }
}

impl Num for Mag {
    type FromStrRadixErr = num_traits::ParseFloatError;
    fn from_str_radix(s: &str, r: u32) -> std::result::Result<Self, Self::FromStrRadixErr> {
        f64::from_str_radix(s, r).map(Mag::exact)
    }
}

impl ToPrimitive for Mag {
    fn to_i64(&self) -> Option<i64> {
        self.v.to_i64()
    }
    fn to_u64(&self) -> Option<u64> {
        self.v.to_u64()
    }
    fn to_f64(&self) -> Option<f64> {
        Some(self.v)
    }
}

impl NumCast for Mag {
    fn from<T: ToPrimitive>(n: T) -> Option<Self> {
        n.to_f64().map(Mag::exact)
    }
}

impl ScalarOperand for Mag {}

/// The constant of a float operation without a first-order rule here (poisons the bound).
macro_rules! poison {
    ($($f:ident),*) => {
        $(fn $f(self) -> Self { Mag::poisoned(self.v.$f()) })*
    };
}

impl Float for Mag {
    fn nan() -> Self {
        Mag::poisoned(f64::NAN)
    }
    fn infinity() -> Self {
        Mag {
            v: f64::INFINITY,
            e: 0.0,
            k: 1.0,
            s: 0.0,
            q: 0.0,
        }
    }
    fn neg_infinity() -> Self {
        Mag {
            v: f64::NEG_INFINITY,
            e: 0.0,
            k: 1.0,
            s: 0.0,
            q: 0.0,
        }
    }
    fn neg_zero() -> Self {
        Mag::exact(-0.0)
    }
    fn min_value() -> Self {
        Mag::exact(f64::MIN)
    }
    fn min_positive_value() -> Self {
        Mag::exact(f64::MIN_POSITIVE)
    }
    fn max_value() -> Self {
        Mag::exact(f64::MAX)
    }
    fn is_nan(self) -> bool {
        self.v.is_nan()
    }
    fn is_infinite(self) -> bool {
        self.v.is_infinite()
    }
    fn is_finite(self) -> bool {
        self.v.is_finite()
    }
    fn is_normal(self) -> bool {
        self.v.is_normal()
    }
    fn classify(self) -> FpCategory {
        self.v.classify()
    }
    poison!(
        floor, ceil, round, trunc, fract, signum, exp2, log2, log10, cbrt, sin, cos, tan, asin,
        acos, atan, sinh, cosh, asinh, acosh, atanh, exp_m1, ln_1p
    );
    fn abs(self) -> Self {
        if self.v < 0.0 {
            -self
        } else {
            self
        }
    }
    fn is_sign_positive(self) -> bool {
        self.v.is_sign_positive()
    }
    fn is_sign_negative(self) -> bool {
        self.v.is_sign_negative()
    }
    fn mul_add(self, a: Self, b: Self) -> Self {
        self * a + b
    }
    fn recip(self) -> Self {
        Mag::one() / self
    }
    fn powi(self, n: i32) -> Self {
        let f = self.v.powi(n);
        self.unary(f, <f64 as From<i32>>::from(n) * self.v.powi(n - 1))
    }
    fn powf(self, n: Self) -> Self {
        Mag::poisoned(self.v.powf(n.v))
    }
    fn sqrt(self) -> Self {
        let f = self.v.sqrt();
        self.unary(f, 0.5 / f)
    }
    fn exp(self) -> Self {
        let f = self.v.exp();
        self.unary(f, f)
    }
    fn ln(self) -> Self {
        self.unary(self.v.ln(), 1.0 / self.v)
    }
    fn log(self, b: Self) -> Self {
        Mag::poisoned(self.v.log(b.v))
    }
    fn max(self, o: Self) -> Self {
        if o.v > self.v || self.v.is_nan() {
            o
        } else {
            self
        }
    }
    fn min(self, o: Self) -> Self {
        if o.v < self.v || self.v.is_nan() {
            o
        } else {
            self
        }
    }
    fn abs_sub(self, o: Self) -> Self {
        if self.v > o.v {
            self - o
        } else {
            Mag::zero()
        }
    }
    fn hypot(self, o: Self) -> Self {
        Mag::poisoned(self.v.hypot(o.v))
    }
    fn atan2(self, o: Self) -> Self {
        Mag::poisoned(self.v.atan2(o.v))
    }
    fn sin_cos(self) -> (Self, Self) {
        (Mag::poisoned(self.v.sin()), Mag::poisoned(self.v.cos()))
    }
    fn tanh(self) -> Self {
        let f = self.v.tanh();
        self.unary(f, 1.0 - f * f)
    }
    fn integer_decode(self) -> (u64, i16, i8) {
        Float::integer_decode(self.v)
    }
}

impl Real for Mag {
    fn from_f32(v: f32) -> Self {
        Mag::exact(<f64 as From<f32>>::from(v))
    }
    fn to_f64_lossless(self) -> f64 {
        self.v
    }
    fn from_f64(v: f64) -> Self {
        Mag::exact(v)
    }
}

/// The coefficient `E` of every result of the block (the same shapes as the results).
#[derive(Debug, Clone)]
pub struct BlockMagnitudes {
    /// `[T, H]`.
    pub output: Array2<f64>,
    /// `[T, H]`.
    pub grad_input: Array2<f64>,
    /// The gradients, as the reference returns them (`MoeGrads` of `m`).
    pub grads: MoeGrads<f64>,
}

fn mags2(a: &Array2<Mag>) -> Array2<f64> {
    a.mapv(|x| x.coef())
}

fn mags3(a: &Array3<Mag>) -> Array3<f64> {
    a.mapv(|x| x.coef())
}

fn mags1(a: &Array1<Mag>) -> Array1<f64> {
    a.mapv(|x| x.coef())
}

/// Runs the reference forward and backward on [`Mag`] values (inputs exact: `m = |v|`) and
/// returns every result's `E`. `x`, `grad_output` `[T, H]` and `p` in float64 (the truth's inputs).
///
/// Errors: those of the reference (shapes, configuration, routing).
pub fn block_magnitudes(
    x: ArrayView2<f64>,
    p: &MoeParams<f64>,
    cfg: &MoeConfig,
    grad_output: ArrayView2<f64>,
) -> Result<BlockMagnitudes> {
    let m2 = |a: ArrayView2<f64>| a.mapv(Mag::exact);
    let m1 = |a: ndarray::ArrayView1<f64>| a.mapv(Mag::exact);
    let m3 = |a: ndarray::ArrayView3<f64>| a.mapv(Mag::exact);
    let gw = m2(p.gate_weight);
    let gb = p.gate_bias.map(m1);
    let eb = p.e_score_correction_bias.map(m1);
    let gu = m3(p.gate_and_up_projs);
    let dn = m3(p.down_projs);
    let gub = p.gate_up_bias.map(m2);
    let dnb = p.down_bias.map(m2);
    let sh = p.shared.map(|s| {
        (
            m2(s.gate_proj),
            m2(s.up_proj),
            m2(s.down_proj),
            s.gate.map(m2),
        )
    });
    let params = MoeParams {
        gate_weight: gw.view(),
        gate_bias: gb.as_ref().map(|a| a.view()),
        e_score_correction_bias: eb.as_ref().map(|a| a.view()),
        gate_and_up_projs: gu.view(),
        down_projs: dn.view(),
        gate_up_bias: gub.as_ref().map(|a| a.view()),
        down_bias: dnb.as_ref().map(|a| a.view()),
        shared: sh
            .as_ref()
            .map(|(g, u, d, gt)| crate::config::SharedExpertParams {
                gate_proj: g.view(),
                up_proj: u.view(),
                down_proj: d.view(),
                gate: gt.as_ref().map(|a| a.view()),
            }),
    };
    let xm = m2(x);
    let go = m2(grad_output);
    let fwd: MoeForward<Mag> = crate::reference::moe_forward(xm.view(), &params, cfg)?;
    let g = crate::reference::moe_backward(xm.view(), &params, cfg, &fwd, go.view())?;
    let grads = MoeGrads {
        grad_input: mags2(&g.grad_input),
        gate_weight: mags2(&g.gate_weight),
        gate_bias: g.gate_bias.as_ref().map(mags1),
        gate_and_up_projs: mags3(&g.gate_and_up_projs),
        down_projs: mags3(&g.down_projs),
        gate_up_bias: g.gate_up_bias.as_ref().map(mags2),
        down_bias: g.down_bias.as_ref().map(mags2),
        shared: g.shared.as_ref().map(|s| crate::config::SharedExpertGrads {
            gate_proj: mags2(&s.gate_proj),
            up_proj: mags2(&s.up_proj),
            down_proj: mags2(&s.down_proj),
            gate: s.gate.as_ref().map(mags2),
        }),
    };
    Ok(BlockMagnitudes {
        output: mags2(&fwd.output),
        grad_input: grads.grad_input.clone(),
        grads,
    })
}

/// The bar of a float32 result against a float64 truth at coefficient `e` (module docs):
/// `(2^-24 + 2^-53) e`.
pub fn bar(e: f64) -> f64 {
    (U32 + U64) * e
}

/// Largest normwise relative error of a float64 result against the float64 truth.
pub const F64_NORMWISE: f64 = 1e-12;
/// Factor of the normwise float32 bar against another float32 implementation.
pub const F32_NORMWISE_FACTOR: f64 = 16.0;
/// Smallest reference error of the normwise bar, in units of `2^-24 ||t||_2` (module docs).
pub const F32_NORMWISE_FLOOR: f64 = 4.0;

/// A float64 truth tensor, its coefficients `E` ([`block_magnitudes`]) and, when known, an
/// independent float32 implementation's result (transformers', from the fixture).
#[derive(Debug, Clone, Copy)]
pub struct TruthRef<'a> {
    /// Truth values, row-major.
    pub values: &'a [f64],
    /// `E` per element.
    pub mags: &'a [f64],
    /// Another float32 result of the same block, for the normwise bar.
    pub f32_ref: Option<&'a [f64]>,
}

fn dist(a: &[f64], b: &[f64]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y) * (x - y))
        .sum::<f64>()
        .sqrt()
}

/// Judges a float32 result `got` (as f64) against `t`: (1) elementwise `|r - t| <= bar(E)` and
/// (2), with `f32_ref`, normwise `||r - t||_2 <= 16 max(||f - t||_2, 4 * 2^-24 ||t||_2)` (our error
/// is of the size float32 gives an independent implementation; catches systematic errors far
/// below bar 1).
/// `Ok(note)` with the worst ratios, `Err(why)` naming what failed. Both bars are the one float32
/// bar of this workspace (`conformance` golden and parallel suites, the moe-kernels golden tests).
pub fn judge_f32(got: &[f64], t: &TruthRef) -> std::result::Result<String, String> {
    let n = t.values.len();
    if got.len() != n || t.mags.len() != n || t.f32_ref.is_some_and(|f| f.len() != n) {
        return Err(format!("{} elements, the truth has {n}", got.len()));
    }
    let mut worst = 0.0f64;
    let mut bad = 0usize;
    for ((&r, &v), &e) in got.iter().zip(t.values).zip(t.mags) {
        let err = (r - v).abs();
        let ratio = if err == 0.0 { 0.0 } else { err / bar(e) };
        if ratio.is_nan() || ratio > 1.0 {
            bad += 1;
        }
        worst = if ratio.is_nan() {
            f64::INFINITY
        } else {
            worst.max(ratio)
        };
    }
    let mut fails = Vec::new();
    if bad > 0 {
        fails.push(format!(
            "{bad} of {n} elements outside the float32 bound |r - t| <= (2^-24 + 2^-53) E (worst {worst:.3e} times it)"
        ));
    }
    let mut note = format!("worst {worst:.3} of the float32 bound");
    if let Some(f) = t.f32_ref {
        let ours = dist(got, t.values);
        let theirs = dist(f, t.values);
        let norm_t = t.values.iter().map(|v| v * v).sum::<f64>().sqrt();
        let limit = F32_NORMWISE_FACTOR * theirs.max(F32_NORMWISE_FLOOR * U32 * norm_t);
        let ratio = if theirs > 0.0 { ours / theirs } else { ours };
        note.push_str(&format!(
            ", normwise {ratio:.2} x the float32 reference's error"
        ));
        if ours.is_nan() || ours > limit {
            fails.push(format!(
                "normwise error {ours:.3e} > {limit:.3e} = {F32_NORMWISE_FACTOR} x max(the float32 reference's error {theirs:.3e}, 4 * 2^-24 ||t|| = {:.3e}) ({:.1} x the limit)",
                F32_NORMWISE_FLOOR * U32 * norm_t,
                ours / limit
            ));
        }
    }
    if fails.is_empty() {
        Ok(note)
    } else {
        Err(fails.join("; "))
    }
}

/// `||r - t||_2 / ||t||_2` (`||r - t||_2` when the truth is zero).
pub fn normwise(got: &[f64], truth: &[f64]) -> f64 {
    let d = dist(got, truth);
    let n = truth.iter().map(|b| b * b).sum::<f64>().sqrt();
    if n == 0.0 {
        d
    } else {
        d / n
    }
}

/// Judges a float64 result against the float64 truth: normwise relative error <= 1e-12.
pub fn judge_f64(got: &[f64], truth: &[f64]) -> std::result::Result<String, String> {
    if got.len() != truth.len() {
        return Err(format!(
            "{} elements, the truth has {}",
            got.len(),
            truth.len()
        ));
    }
    let e = normwise(got, truth);
    if e <= F64_NORMWISE {
        Ok(format!("normwise relative error {e:.2e}"))
    } else {
        Err(format!(
            "normwise relative error {e:.3e} > {F64_NORMWISE:e}"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rng(seed: u64) -> impl FnMut() -> f64 {
        let mut s = seed;
        move || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
        }
    }

    /// float32 evaluations in two summation orders, with exp and division, stay inside the bar,
    /// and the bar is tight: the worst float32 error is a sizable fraction of it.
    #[test]
    fn float32_errors_stay_inside_a_tight_bound() {
        let mut r = rng(0x1234_5678_9abc_def0);
        let mut worst = 0.0f64;
        for _ in 0..300 {
            let n = 64;
            let xs: Vec<f32> = (0..n).map(|_| r() as f32).collect();
            let ys: Vec<f32> = (0..n).map(|_| r() as f32 * 8.0).collect();
            let mut t = Mag::zero();
            for (a, b) in xs.iter().zip(&ys) {
                t += Mag::from_f32(*a) * Mag::from_f32(*b);
            }
            let z = (t.exp() / (Mag::one() + t.exp())) * t; // x * sigmoid(x)
            let f = |order: &mut dyn Iterator<Item = usize>| {
                let mut acc = 0f32;
                for i in order {
                    acc += xs[i] * ys[i];
                }
                let e = acc.exp();
                (e / (1.0 + e)) * acc
            };
            for got in [f(&mut (0..n)), f(&mut (0..n).rev())] {
                let err = (<f64 as From<f32>>::from(got) - z.v).abs();
                let b = bar(z.coef());
                assert!(err <= b, "err {err:e} > bar {b:e}");
                worst = worst.max(err / b);
            }
        }
        assert!(worst > 0.01, "the bar is loose: worst {worst}");
    }

    #[test]
    fn rules_of_the_table() {
        let a = Mag::exact(-3.0);
        let b = Mag::exact(2.0);
        // a sum of two exact terms: E = LAMBDA sqrt(1) min(5, 1 + LAMBDA sqrt(13))
        assert_eq!((a + b).coef(), LAMBDA * 5.0);
        // sums stay open: ((a + b) + a) has 3 terms, |v| = 4, s = 8
        assert_eq!(((a + b) + a).coef(), LAMBDA * 2f64.sqrt() * 8.0);
        assert_eq!((a * b).coef(), 6.0);
        assert_eq!((a / b).coef(), 1.5);
        let c = (a + b) * b; // E = |b| E(a + b) + |(a+b) b|
        assert_eq!(c.coef(), 2.0 * LAMBDA * 5.0 + 2.0);
        assert_eq!(a.max(b).v, 2.0);
        assert!(
            Mag::exact(1.0).sin().coef().is_nan(),
            "uncovered operations poison the bound"
        );
    }

    #[test]
    fn bars_pass_what_fits_and_fail_what_does_not() {
        let t = [1.0, -2.0, 0.0];
        let m = [1.0, 3.0, 0.5];
        let truth = TruthRef {
            values: &t,
            mags: &m,
            f32_ref: None,
        };
        let b = bar(3.0);
        assert!(judge_f32(&[1.0, -2.0 + 0.9 * b, 0.0], &truth).is_ok());
        assert!(judge_f32(&[1.0, -2.0 + 1.1 * b, 0.0], &truth).is_err());
        assert!(judge_f32(&[f64::NAN, -2.0, 0.0], &truth).is_err());
        assert!(judge_f32(&[1.0], &truth).is_err());
        // the normwise bar: within 16 x max(another float32 result's error, 4 u ||t||)
        let big = [1000.0, 3.0, 0.5]; // bar 1 at 6e-5 on the first element
        let f = [1.0 + 1e-6, -2.0, 0.0];
        let with = TruthRef {
            values: &t,
            mags: &big,
            f32_ref: Some(&f),
        };
        assert!(judge_f32(&[1.0 + 1.5e-5, -2.0, 0.0], &with).is_ok());
        assert!(judge_f32(&[1.0 + 1.7e-5, -2.0, 0.0], &with)
            .unwrap_err()
            .contains("normwise"));
        // an exact f: the floor 16 * 4 * 2^-24 * sqrt(5) = 8.5e-6 decides
        let exact = TruthRef {
            values: &t,
            mags: &big,
            f32_ref: Some(&t),
        };
        assert!(judge_f32(&[1.0 + 8.0e-6, -2.0, 0.0], &exact).is_ok());
        assert!(judge_f32(&[1.0 + 9.0e-6, -2.0, 0.0], &exact).is_err());
        assert!(judge_f64(&[1.0, -2.0, 1e-13], &t).is_ok());
        assert!(judge_f64(&[1.0, -2.0, 1e-10], &t).is_err());
    }
}
