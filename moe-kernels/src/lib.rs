//! MoE kernels: every router and expert variant of the seed models (Qwen3-MoE / Next / 3.5 / VL,
//! Mixtral, GPT-OSS, DeepSeek-V3, GLM4-MoE, Step3.5), forward and backward, on the native grouped
//! layout, as a CPU reference (the spec, [`reference`](mod@reference)) and a fast grouped-GEMM path ([`fast`]).
//!
//! Modules: [`config`] (router / activation kinds, parameters, gradients, shape checks),
//! [`routing`] (all routers, forward and backward), [`router`] (the Qwen3 softmax router of the
//! first slice), [`activation`] (SwiGLU, GPT-OSS GLU, clamped SwiGLU and their derivatives),
//! [`permute`] (per-expert counts, exclusive scan, stable scatter, inverse), [`reference`](mod@reference)
//! (per-expert loops), [`fast`] (grouped GEMM + rayon, f32), [`scalar`], [`error`].
//!
#![doc = include_str!("../README.md")]

pub mod activation;
pub mod bound;
pub mod config;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod error;
pub mod fast;
pub mod permute;
pub mod reference;
pub mod router;
pub mod routing;
pub mod scalar;

pub use activation::{glu_backward, glu_forward, sigmoid, silu, swiglu};
pub use config::{
    check_block, Activation, Dims, MoeConfig, MoeForward, MoeGrads, MoeParams, RouterKind,
    SharedExpertGrads, SharedExpertParams,
};
pub use error::{KernelError, Result};
pub use permute::Permutation;
pub use reference::{qwen3_moe_block_forward, MoeBlockOutput};
pub use router::{router_logits, softmax_topk, RouterConfig, Routing};
pub use routing::{route, route_backward};
pub use scalar::Real;
