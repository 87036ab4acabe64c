//! Element-wise activations of the expert MLP (SwiGLU).

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
