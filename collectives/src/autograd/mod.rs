//! Autograd collectives: forward/backward pairs for tensor (TP), sequence (SP) and expert (EP)
//! parallelism, in the style of `torch.autograd.Function` (a layer calls `forward`, keeps the
//! op, and calls `backward` on the output gradient). Sources: Megatron-LM
//! `megatron/core/tensor_parallel/mappings.py`, HF transformers `integrations/tensor_parallel.py`,
//! torchtitan `distributed/expert_parallel.py`; the table of ops is in this crate's README.
//!
//! | op | forward | backward | input -> output layout |
//! |---|---|---|---|
//! | [`CopyToTp`] (f) | identity | all_reduce sum | Replicated -> PerRank |
//! | [`ReduceFromTp`] (g) | all_reduce sum | identity | PerRank -> Replicated |
//! | [`GatherFromTp`] (dim) | all_gather | keep own chunk | PerRank -> Replicated |
//! | [`ScatterToTp`] (dim) | keep own chunk | all_gather | Replicated -> PerRank |
//! | [`SpAllGather`] (seq dim) | all_gather (uneven) | reduce_scatter | PerRank -> PerRank |
//! | [`SpReduceScatter`] (seq dim) | reduce_scatter | all_gather | PerRank -> PerRank |
//! | [`AllToAllV`] (EP dispatch/combine) | all_to_all_v(send, recv) | all_to_all_v(recv, send) | PerRank -> PerRank |
//! | [`Redistribute`] (DTensor placements) | the `placement` plan's steps | the steps' adjoints, reversed | per placements |
//!
//! Backward is the adjoint of forward: for every op,
//! `sum_r <F(x)_r, y_r> == sum_r <x_r, F*(y)_r>`, where a [`Layout::Replicated`] tensor counts
//! once (it is the same on every rank) and a [`Layout::PerRank`] tensor is summed over ranks.
//! The checks in [`checks`] test this exactly on integer-valued data (run by
//! `crate::selftest::run_all` under every backend).
//!
//! Tensors are [`LocalTensor`]s (row-major, any rank, any element type of the communicator).
//! Errors: a bad dim or split list is found on the rank that has it; before a collective that
//! rank issues an invalid call so that every peer fails at once with
//! `CommError::InvalidArgument` naming it, instead of waiting for the timeout.

pub mod checks;
mod ops;
mod redistribute;
mod tensor;

pub use ops::{
    chunk_sizes, AllToAllV, CopyToTp, GatherFromTp, ReduceFromTp, ScatterToTp, SpAllGather,
    SpReduceScatter,
};
pub use redistribute::Redistribute;
pub use tensor::LocalTensor;

use crate::communicator::Communicator;
use crate::dtype::Element;
use crate::error::CommError;

/// Error of an autograd collective.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AutogradError {
    /// The collective failed (on every rank: mismatched call, a peer's bad arguments, timeout,
    /// dead peer).
    #[error(transparent)]
    Comm(#[from] CommError),
    /// This rank's tensor or split arguments do not fit the op (message names the shapes).
    #[error("{op}: {reason}")]
    Shape {
        /// The op, e.g. `sp_all_gather`.
        op: &'static str,
        /// What does not fit.
        reason: String,
    },
}

/// How a tensor is held across the ranks of the communicator, which defines the inner product
/// the adjoint is taken in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// The same tensor on every rank (DTensor `Replicate`): counted once.
    Replicated,
    /// Each rank holds its own tensor (a shard, or a partial sum / partial gradient): the inner
    /// product is the sum over ranks.
    PerRank,
}

/// A collective with its backward, like a `torch.autograd.Function` with static arguments.
/// Both methods are collective (every rank of `comm` calls them, in the same order).
pub trait CollectiveFunction {
    /// Name used in errors and test reports.
    fn name(&self) -> &'static str;
    /// Layout of the forward input (= of the gradient `backward` returns).
    fn input_layout(&self) -> Layout;
    /// Layout of the forward output (= of the gradient `backward` takes).
    fn output_layout(&self) -> Layout;
    /// Forward pass on this rank's tensor.
    fn forward<T: Element>(
        &self,
        comm: &dyn Communicator,
        x: &LocalTensor<T>,
    ) -> Result<LocalTensor<T>, AutogradError>;
    /// Backward pass: gradient w.r.t. the input from the gradient w.r.t. the output (the adjoint
    /// of `forward`).
    fn backward<T: Element>(
        &self,
        comm: &dyn Communicator,
        grad_output: &LocalTensor<T>,
    ) -> Result<LocalTensor<T>, AutogradError>;
}
