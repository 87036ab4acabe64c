//! Hugging Face MoE checkpoints <-> the native grouped-expert layout, on whole tensors and on
//! local shards (PyTorch DTensor placements), plus validated safetensors reading and writing.
//!
//! A format conversion NEVER communicates and NEVER changes dtype: everything here works on raw
//! little-endian bytes + dtype + shape ([`HostTensor`]). See README.md for the rules and sources.

pub mod adapter;
pub mod adapter_layout;
pub mod checkpoint;
pub mod convert;
pub mod convert_dcp;
pub mod dcp;
pub mod direct_io;
pub mod error;
pub mod family;
pub mod family_adapter;
pub mod hf_memory;
pub mod hf_plan;
pub mod input;
pub mod layout;
pub mod local;
pub mod model_keys;
pub mod model_shapes;
pub mod moe_block;
mod out_dir;
mod stream_write;
pub mod tensor;
pub mod transpose;
pub mod writer;

pub use adapter::{MoeAdapter, NativeMoeKeys, SUPPORTED_MODEL_TYPES};
pub use checkpoint::{HfCheckpoint, TensorInfo};
pub use error::{AdapterError, Result};
pub use family_adapter::{adapter_for, FamilyAdapter};
pub use layout::DiskLayout;
pub use local::{LocalTensor, NativeTensorInfo};
pub use safetensors::Dtype;
pub use tensor::{assemble, HostTensor};
pub use writer::write_hf_checkpoint;

/// The README's examples, compiled as doctests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
