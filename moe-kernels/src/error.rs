//! Error type of the crate: every message names the tensor or parameter that is wrong.

use thiserror::Error;

/// Result alias used by every fallible function of this crate.
pub type Result<T> = std::result::Result<T, KernelError>;

/// What can go wrong in a kernel call. Messages name the offending tensor / parameter.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum KernelError {
    /// A tensor does not have the shape the operation requires.
    #[error("shape mismatch for `{tensor}`: expected {expected}, got {got:?}")]
    ShapeMismatch {
        /// Name of the tensor argument, e.g. `"gate_and_up_projs"`.
        tensor: &'static str,
        /// The required shape in symbols and numbers, e.g. `"[E=8, H=64, 2I]"`.
        expected: String,
        /// The shape that was passed.
        got: Vec<usize>,
    },
    /// `top_k == 0`: every token must be routed to at least one expert.
    #[error("top_k must be at least 1, got 0")]
    ZeroTopK,
    /// `top_k` is larger than the number of experts `E`.
    #[error("top_k = {top_k} exceeds the number of experts E = {num_experts}")]
    TopKTooLarge {
        /// Requested `k`.
        top_k: usize,
        /// Number of experts `E` (columns of the logits).
        num_experts: usize,
    },
    /// A router logit is NaN or infinite, so the softmax and the top-k order are undefined.
    #[error("router logit for token {token}, expert {expert} is not finite ({value})")]
    NonFiniteLogit {
        /// Token (row) index.
        token: usize,
        /// Expert (column) index.
        expert: usize,
        /// The offending value.
        value: f32,
    },
    /// A router / activation hyper-parameter or an optional tensor does not fit the
    /// configuration (e.g. `E % n_group != 0`, a correction bias given to a softmax router).
    #[error("invalid MoE configuration: {0}")]
    InvalidConfig(String),
    /// A router score is NaN or infinite (e.g. after adding `e_score_correction_bias`).
    #[error("router score for token {token}, expert {expert} is not finite ({value})")]
    NonFiniteScore {
        /// Token (row) index.
        token: usize,
        /// Expert (column) index.
        expert: usize,
        /// The offending value, widened to f64.
        value: f64,
    },
    /// No CUDA driver library or no (such) CUDA device.
    #[error("no CUDA device: {0}")]
    NoCudaDevice(String),
    /// A CUDA driver / NVRTC error (compilation log included).
    #[error("CUDA error: {0}")]
    Cuda(String),
}
