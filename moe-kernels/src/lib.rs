//! MoE kernels: CPU reference of the Qwen3-MoE sparse block (router, SwiGLU experts,
//! weighted combine) on the native grouped layout, in f32.
//!
//! Modules: [`router`] (logits, softmax, top-k with the lowest-index tie rule, renorm),
//! [`activation`] (SiLU / SwiGLU), [`reference`] (the per-expert loop block forward),
//! [`error`]. Everything public is re-exported here.
//!
#![doc = include_str!("../README.md")]

pub mod activation;
pub mod error;
pub mod reference;
pub mod router;

pub use activation::{silu, swiglu};
pub use error::{KernelError, Result};
pub use reference::{qwen3_moe_block_forward, MoeBlockOutput};
pub use router::{router_logits, softmax_topk, RouterConfig, Routing};
