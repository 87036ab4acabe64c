//! Element-wise activations of the expert MLP: SwiGLU, GPT-OSS's clamped GLU, Step3.5's clamped
//! SwiGLU; forward and derivative, generic over `f32` / `f64` ([`glu_forward`], [`glu_backward`]).

use crate::config::Activation;
use crate::scalar::Real;

/// SiLU (swish): `silu(x) = x * sigmoid(x) = x / (1 + exp(-x))`, in f32.
///
/// Same formula as PyTorch's CPU kernel (`aten/src/ATen/native/cpu/Activation.cpp`,
/// `silu_kernel`: `x / (1 + exp(-x))`). For very negative `x`, `exp(-x)` overflows to
/// infinity and the result is `-0.0`, the correct limit.
pub fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

/// SwiGLU gate: `silu(gate) * up`, the hidden activation of a Qwen3-MoE / Mixtral expert
/// (`act_fn(gate_proj(x)) * up_proj(x)` in transformers' `Qwen3MoeMLP`).
pub fn swiglu(gate: f32, up: f32) -> f32 {
    silu(gate) * up
}

/// Logistic sigmoid `1 / (1 + exp(-x))`.
pub fn sigmoid<F: Real>(x: F) -> F {
    F::one() / (F::one() + (-x).exp())
}

/// Derivative of SiLU: `d/dx x sigmoid(x) = sigmoid(x) (1 + x (1 - sigmoid(x)))`.
fn silu_grad<F: Real>(x: F) -> F {
    let s = sigmoid(x);
    s * (F::one() + x * (F::one() - s))
}

/// Clamp with PyTorch's gradient mask: the gradient passes where `lo <= x <= hi`
/// (`torch.clamp` backward, `aten/src/ATen/native/...`: `grad * ((x >= min) & (x <= max))`).
fn clamp_with_mask<F: Real>(x: F, lo: F, hi: F) -> (F, F) {
    let pass = if x >= lo && x <= hi {
        F::one()
    } else {
        F::zero()
    };
    (x.max(lo).min(hi), pass)
}

/// Hidden activation `h` of one element from its gate value `g` and up value `u`
/// (see [`Activation`] for each formula and its source).
pub fn glu_forward<F: Real>(act: &Activation, g: F, u: F) -> F {
    match *act {
        Activation::SwiGlu => g * sigmoid(g) * u,
        Activation::GptOssGlu { limit, alpha } => {
            let l = F::from_f64(limit);
            let gc = g.min(l);
            let uc = u.max(-l).min(l);
            (uc + F::one()) * gc * sigmoid(F::from_f64(alpha) * gc)
        }
        Activation::ClampedSwiGlu { limit } => {
            let l = F::from_f64(limit);
            (g * sigmoid(g)).min(l) * u.max(-l).min(l)
        }
    }
}

/// `(dL/dg, dL/du)` of [`glu_forward`] given `dL/dh`. Clamps pass the gradient only inside
/// their closed interval, as `torch.clamp` does.
pub fn glu_backward<F: Real>(act: &Activation, g: F, u: F, dh: F) -> (F, F) {
    let one = F::one();
    match *act {
        Activation::SwiGlu => (dh * u * silu_grad(g), dh * g * sigmoid(g)),
        Activation::GptOssGlu { limit, alpha } => {
            let l = F::from_f64(limit);
            let a = F::from_f64(alpha);
            let (gc, g_pass) = clamp_with_mask(g, F::neg_infinity(), l);
            let (uc, u_pass) = clamp_with_mask(u, -l, l);
            let sg = sigmoid(a * gc);
            let glu = gc * sg;
            let dglu = sg + a * gc * sg * (one - sg);
            (dh * (uc + one) * dglu * g_pass, dh * glu * u_pass)
        }
        Activation::ClampedSwiGlu { limit } => {
            let l = F::from_f64(limit);
            let (sc, s_pass) = clamp_with_mask(g * sigmoid(g), F::neg_infinity(), l);
            let (uc, u_pass) = clamp_with_mask(u, -l, l);
            (dh * uc * s_pass * silu_grad(g), dh * sc * u_pass)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use approx::assert_relative_eq;

    #[test]
    fn silu_matches_definition_via_sigmoid() {
        // Hand values: silu(0) = 0, silu(1) = 1 / (1 + e^-1) = 0.7310586,
        // silu(-2) = -2 / (1 + e^2) = -0.23840584.
        assert_eq!(silu(0.0), 0.0);
        assert_relative_eq!(silu(1.0), 0.731_058_6, max_relative = 1e-6);
        assert_relative_eq!(silu(-2.0), -0.238_405_84, max_relative = 1e-6);
    }

    #[test]
    fn silu_limits_are_finite() {
        assert_eq!(silu(100.0), 100.0);
        assert_eq!(silu(-200.0), 0.0);
        assert!(silu(-200.0).is_sign_negative() || silu(-200.0) == 0.0);
    }

    #[test]
    fn swiglu_is_silu_times_up() {
        assert_relative_eq!(swiglu(1.0, 3.0), 3.0 * 0.731_058_6, max_relative = 1e-6);
        assert_eq!(swiglu(2.0, 0.0), 0.0);
    }
}
