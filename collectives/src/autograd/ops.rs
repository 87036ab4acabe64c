//! The forward/backward pairs (Megatron-LM `megatron/core/tensor_parallel/mappings.py`,
//! torchtitan `distributed/expert_parallel.py`). Each op is a small value holding its static
//! arguments (dim, split sizes), implementing [`CollectiveFunction`].

use super::tensor::{offsets, pack_blocks, unpack_blocks, LocalTensor};
use super::{AutogradError, CollectiveFunction, Layout};
use crate::communicator::{Communicator, CommunicatorExt};
use crate::dtype::{DType, Element, ReduceOp};

type Result<T> = std::result::Result<T, AutogradError>;

/// Which collective a failed local check stands in for (see [`fail_peers`]).
#[derive(Clone, Copy)]
enum Kind {
    AllGather,
    ReduceScatter,
    AllToAll,
}

/// A local argument error found before a collective: issue the same collective with a 1-byte
/// F64 buffer, which the backend's argument exchange rejects on EVERY rank
/// (`CommError::InvalidArgument` naming this rank), so peers fail at once instead of waiting
/// for the timeout. Returns `err` (the precise local error) on this rank.
fn fail_peers<T>(comm: &dyn Communicator, kind: Kind, err: AutogradError) -> Result<T> {
    let zeros = vec![0usize; comm.size()];
    let byte = [0u8; 1];
    // The call is made only to notify the peers: its own (expected) error is discarded.
    let _ = match kind {
        Kind::AllGather => comm.all_gather_raw(&byte, &zeros, DType::F64).map(drop),
        Kind::ReduceScatter => comm
            .reduce_scatter_raw(&byte, &zeros, DType::F64, ReduceOp::Sum)
            .map(drop),
        Kind::AllToAll => comm
            .all_to_all_raw(&byte, &zeros, &zeros, DType::F64)
            .map(drop),
    };
    Err(err)
}

fn shape_err(op: &'static str, reason: String) -> AutogradError {
    AutogradError::Shape { op, reason }
}

/// Checks `sizes.len() == comm.size()`.
fn check_sizes(op: &'static str, comm: &dyn Communicator, sizes: &[usize]) -> Result<()> {
    if sizes.len() != comm.size() {
        return Err(shape_err(
            op,
            format!(
                "{} split sizes for a communicator of {} ranks",
                sizes.len(),
                comm.size()
            ),
        ));
    }
    Ok(())
}

/// Sum of `x` over ranks (`all_reduce(SUM)`), same shape.
pub(super) fn all_reduce_sum<T: Element>(
    comm: &dyn Communicator,
    x: &LocalTensor<T>,
) -> Result<LocalTensor<T>> {
    let mut data = x.data().to_vec();
    comm.all_reduce(&mut data, ReduceOp::Sum)?;
    LocalTensor::new(x.shape().to_vec(), data)
}

/// Concatenation along `dim` of every rank's `x` (`x.shape[dim] == sizes[rank]`, the other dims
/// equal on all ranks): `all_gather_v` of rank-major blocks, then interleaved.
pub(super) fn gather_dim<T: Element>(
    op: &'static str,
    comm: &dyn Communicator,
    x: &LocalTensor<T>,
    dim: usize,
    sizes: &[usize],
) -> Result<LocalTensor<T>> {
    let checked = check_sizes(op, comm, sizes).and_then(|_| {
        let (outer, size, inner) = x.split_at_dim(op, dim)?;
        if size != sizes[comm.rank()] {
            return Err(shape_err(
                op,
                format!(
                    "rank {} holds {size} along dim {dim} (shape {:?}), split sizes say {}",
                    comm.rank(),
                    x.shape(),
                    sizes[comm.rank()]
                ),
            ));
        }
        Ok((outer, inner))
    });
    let (outer, inner) = match checked {
        Ok(v) => v,
        Err(e) => return fail_peers(comm, Kind::AllGather, e),
    };
    let counts: Vec<usize> = sizes.iter().map(|s| outer * s * inner).collect();
    let blocks = comm.all_gather(x.data(), &counts)?;
    let mut shape = x.shape().to_vec();
    shape[dim] = sizes.iter().sum();
    LocalTensor::new(shape, unpack_blocks(&blocks, outer, sizes, inner))
}

/// This rank's block (along `dim`, `sizes[rank]` long) of the sum over ranks of `x`
/// (`x.shape[dim] == sum(sizes)` on every rank): rank-major packing, then `reduce_scatter_v`.
pub(super) fn reduce_scatter_dim<T: Element>(
    op: &'static str,
    comm: &dyn Communicator,
    x: &LocalTensor<T>,
    dim: usize,
    sizes: &[usize],
) -> Result<LocalTensor<T>> {
    let checked = check_sizes(op, comm, sizes).and_then(|_| {
        let (outer, size, inner) = x.split_at_dim(op, dim)?;
        let total: usize = sizes.iter().sum();
        if size != total {
            return Err(shape_err(
                op,
                format!(
                    "dim {dim} of shape {:?} is {size}, split sizes {sizes:?} sum to {total}",
                    x.shape()
                ),
            ));
        }
        Ok((outer, inner))
    });
    let (outer, inner) = match checked {
        Ok(v) => v,
        Err(e) => return fail_peers(comm, Kind::ReduceScatter, e),
    };
    let counts: Vec<usize> = sizes.iter().map(|s| outer * s * inner).collect();
    let packed = pack_blocks(x.data(), outer, sizes, inner);
    let mine = comm.reduce_scatter(&packed, &counts, ReduceOp::Sum)?;
    let mut shape = x.shape().to_vec();
    shape[dim] = sizes[comm.rank()];
    LocalTensor::new(shape, mine)
}

/// `S(i) -> S(j)` on one group (PyTorch's `shard_dim_alltoall`): `x` holds this rank's block
/// of dim `i` (`x.shape[i] == si[rank]`) and all of dim `j` (`x.shape[j] == sum(sj)`); the
/// result holds all of dim `i` (`sum(si)`) and this rank's block of dim `j` (`sj[rank]`). Rank
/// q receives block q of dim `j` from every rank (unpadded), concatenated along `i` in rank
/// order. Errors: `i == j`, a dim out of range, sizes that do not fit `x`.
pub(super) fn all_to_all_dim<T: Element>(
    op: &'static str,
    comm: &dyn Communicator,
    x: &LocalTensor<T>,
    (i, si): (usize, &[usize]),
    (j, sj): (usize, &[usize]),
) -> Result<LocalTensor<T>> {
    let rank = comm.rank();
    let checked = check_sizes(op, comm, si)
        .and_then(|_| check_sizes(op, comm, sj))
        .and_then(|_| {
            let (_, size_i, _) = x.split_at_dim(op, i)?;
            let (outer, size_j, inner) = x.split_at_dim(op, j)?;
            let total: usize = sj.iter().sum();
            if i == j || size_i != si[rank] || size_j != total {
                return Err(shape_err(
                    op,
                    format!(
                        "rank {rank} holds shape {:?}; all-to-all from dim {i} (sizes {si:?}) to \
                         dim {j} (sizes {sj:?}) does not fit",
                        x.shape()
                    ),
                ));
            }
            Ok((outer, inner))
        });
    let (outer, inner) = match checked {
        Ok(v) => v,
        Err(e) => return fail_peers(comm, Kind::AllToAll, e),
    };
    let send = pack_blocks(x.data(), outer, sj, inner);
    let send_counts: Vec<usize> = sj.iter().map(|s| outer * s * inner).collect();
    // The block from rank q: x's shape with dim j = sj[rank] and dim i = si[q].
    let mut shape = x.shape().to_vec();
    shape[j] = sj[rank];
    let outer_i: usize = shape[..i].iter().product();
    let inner_i: usize = shape[i + 1..].iter().product();
    let recv_counts: Vec<usize> = si.iter().map(|s| outer_i * s * inner_i).collect();
    let blocks = comm.all_to_all(&send, &send_counts, &recv_counts)?;
    shape[i] = si.iter().sum();
    LocalTensor::new(shape, unpack_blocks(&blocks, outer_i, si, inner_i))
}

/// This rank's block along `dim` (no communication).
pub(super) fn chunk_dim<T: Element>(
    op: &'static str,
    comm: &dyn Communicator,
    x: &LocalTensor<T>,
    dim: usize,
    sizes: &[usize],
) -> Result<LocalTensor<T>> {
    check_sizes(op, comm, sizes)?;
    let (_, size, _) = x.split_at_dim(op, dim)?;
    let total: usize = sizes.iter().sum();
    if size != total {
        return Err(shape_err(
            op,
            format!(
                "dim {dim} of shape {:?} is {size}, split sizes {sizes:?} sum to {total}",
                x.shape()
            ),
        ));
    }
    let offs = offsets(sizes);
    x.narrow(dim, offs[comm.rank()], sizes[comm.rank()])
}

/// All-to-all-v of rows (dim 0): `send_rows[j]` leading rows go to rank j, `recv_rows[j]` come
/// from rank j, in rank order.
fn all_to_all_rows<T: Element>(
    op: &'static str,
    comm: &dyn Communicator,
    x: &LocalTensor<T>,
    send_rows: &[usize],
    recv_rows: &[usize],
) -> Result<LocalTensor<T>> {
    let checked = check_sizes(op, comm, send_rows)
        .and_then(|_| check_sizes(op, comm, recv_rows))
        .and_then(|_| {
            let (_, rows, row) = x.split_at_dim(op, 0)?;
            let total: usize = send_rows.iter().sum();
            if rows != total {
                return Err(shape_err(
                    op,
                    format!(
                        "input has {rows} rows (shape {:?}), send splits {send_rows:?} sum to {total}",
                        x.shape()
                    ),
                ));
            }
            Ok(row)
        });
    let row = match checked {
        Ok(v) => v,
        Err(e) => return fail_peers(comm, Kind::AllToAll, e),
    };
    let sc: Vec<usize> = send_rows.iter().map(|s| s * row).collect();
    let rc: Vec<usize> = recv_rows.iter().map(|s| s * row).collect();
    let out = comm.all_to_all(x.data(), &sc, &rc)?;
    let mut shape = x.shape().to_vec();
    shape[0] = recv_rows.iter().sum();
    LocalTensor::new(shape, out)
}

/// `f` (Megatron `copy_to_tensor_model_parallel_region`, HF `all_reduce_backward`): forward
/// identity, backward `all_reduce(SUM)` over the TP group. Put it on every replicated tensor that
/// feeds sharded compute (hidden states AND router top-k weights; torchtitan 1878, 2416).
/// Shapes: any, unchanged.
#[derive(Debug, Clone, Copy, Default)]
pub struct CopyToTp;

impl CollectiveFunction for CopyToTp {
    fn name(&self) -> &'static str {
        "copy_to_tp (f)"
    }
    fn input_layout(&self) -> Layout {
        Layout::Replicated
    }
    fn output_layout(&self) -> Layout {
        Layout::PerRank
    }
    fn forward<T: Element>(
        &self,
        _: &dyn Communicator,
        x: &LocalTensor<T>,
    ) -> Result<LocalTensor<T>> {
        Ok(x.clone())
    }
    fn backward<T: Element>(
        &self,
        comm: &dyn Communicator,
        grad: &LocalTensor<T>,
    ) -> Result<LocalTensor<T>> {
        all_reduce_sum(comm, grad)
    }
}

/// `g` (Megatron `reduce_from_tensor_model_parallel_region`, HF `all_reduce_forward`): forward
/// `all_reduce(SUM)` (row-parallel / expert output partial sums), backward identity.
/// Shapes: any, unchanged.
#[derive(Debug, Clone, Copy, Default)]
pub struct ReduceFromTp;

impl CollectiveFunction for ReduceFromTp {
    fn name(&self) -> &'static str {
        "reduce_from_tp (g)"
    }
    fn input_layout(&self) -> Layout {
        Layout::PerRank
    }
    fn output_layout(&self) -> Layout {
        Layout::Replicated
    }
    fn forward<T: Element>(
        &self,
        comm: &dyn Communicator,
        x: &LocalTensor<T>,
    ) -> Result<LocalTensor<T>> {
        all_reduce_sum(comm, x)
    }
    fn backward<T: Element>(
        &self,
        _: &dyn Communicator,
        grad: &LocalTensor<T>,
    ) -> Result<LocalTensor<T>> {
        Ok(grad.clone())
    }
}

/// Gather along `dim` (Megatron `gather_from_tensor_model_parallel_region`, HF
/// `colwise_gather_output`): forward all_gather of the shards (`[.., sizes[r], ..]` on rank r,
/// uneven and zero sizes allowed) into the replicated `[.., sum(sizes), ..]`; backward keeps this
/// rank's block of the (replicated) gradient.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatherFromTp {
    /// Tensor dim gathered along.
    pub dim: usize,
    /// Size along `dim` of each rank's shard (length = communicator size).
    pub sizes: Vec<usize>,
}

impl CollectiveFunction for GatherFromTp {
    fn name(&self) -> &'static str {
        "gather_from_tp"
    }
    fn input_layout(&self) -> Layout {
        Layout::PerRank
    }
    fn output_layout(&self) -> Layout {
        Layout::Replicated
    }
    fn forward<T: Element>(
        &self,
        comm: &dyn Communicator,
        x: &LocalTensor<T>,
    ) -> Result<LocalTensor<T>> {
        gather_dim(self.name(), comm, x, self.dim, &self.sizes)
    }
    fn backward<T: Element>(
        &self,
        comm: &dyn Communicator,
        grad: &LocalTensor<T>,
    ) -> Result<LocalTensor<T>> {
        chunk_dim(self.name(), comm, grad, self.dim, &self.sizes)
    }
}

/// Split along `dim` (Megatron `scatter_to_tensor_model_parallel_region`, HF
/// `rowwise_split_input`): forward keeps this rank's block `[.., sizes[rank], ..]` of the
/// replicated `[.., sum(sizes), ..]`; backward all_gathers the gradient shards.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScatterToTp {
    /// Tensor dim split along.
    pub dim: usize,
    /// Size along `dim` of each rank's block (length = communicator size).
    pub sizes: Vec<usize>,
}

impl CollectiveFunction for ScatterToTp {
    fn name(&self) -> &'static str {
        "scatter_to_tp"
    }
    fn input_layout(&self) -> Layout {
        Layout::Replicated
    }
    fn output_layout(&self) -> Layout {
        Layout::PerRank
    }
    fn forward<T: Element>(
        &self,
        comm: &dyn Communicator,
        x: &LocalTensor<T>,
    ) -> Result<LocalTensor<T>> {
        chunk_dim(self.name(), comm, x, self.dim, &self.sizes)
    }
    fn backward<T: Element>(
        &self,
        comm: &dyn Communicator,
        grad: &LocalTensor<T>,
    ) -> Result<LocalTensor<T>> {
        gather_dim(self.name(), comm, grad, self.dim, &self.sizes)
    }
}

/// SP all_gather (Megatron `gather_from_sequence_parallel_region` with
/// `tensor_parallel_output_grad=True`): forward all_gather of the sequence shards
/// (`[.., sizes[r], ..]`, uneven allowed) into `[.., sum(sizes), ..]`; backward reduce_scatter of
/// the per-rank gradients (the downstream compute is TP-sharded, so each rank holds a partial
/// gradient of the full sequence).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpAllGather {
    /// Sequence dim.
    pub dim: usize,
    /// Sequence length of each rank's shard (length = communicator size).
    pub sizes: Vec<usize>,
}

impl CollectiveFunction for SpAllGather {
    fn name(&self) -> &'static str {
        "sp_all_gather"
    }
    fn input_layout(&self) -> Layout {
        Layout::PerRank
    }
    fn output_layout(&self) -> Layout {
        Layout::PerRank
    }
    fn forward<T: Element>(
        &self,
        comm: &dyn Communicator,
        x: &LocalTensor<T>,
    ) -> Result<LocalTensor<T>> {
        gather_dim(self.name(), comm, x, self.dim, &self.sizes)
    }
    fn backward<T: Element>(
        &self,
        comm: &dyn Communicator,
        grad: &LocalTensor<T>,
    ) -> Result<LocalTensor<T>> {
        reduce_scatter_dim(self.name(), comm, grad, self.dim, &self.sizes)
    }
}

/// SP reduce_scatter (Megatron `reduce_scatter_to_sequence_parallel_region`; MoE combine under
/// SP): forward sums the per-rank partial `[.., sum(sizes), ..]` and keeps this rank's
/// `[.., sizes[rank], ..]` block; backward all_gathers the gradient shards.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpReduceScatter {
    /// Sequence dim.
    pub dim: usize,
    /// Sequence length of each rank's shard (length = communicator size).
    pub sizes: Vec<usize>,
}

impl CollectiveFunction for SpReduceScatter {
    fn name(&self) -> &'static str {
        "sp_reduce_scatter"
    }
    fn input_layout(&self) -> Layout {
        Layout::PerRank
    }
    fn output_layout(&self) -> Layout {
        Layout::PerRank
    }
    fn forward<T: Element>(
        &self,
        comm: &dyn Communicator,
        x: &LocalTensor<T>,
    ) -> Result<LocalTensor<T>> {
        reduce_scatter_dim(self.name(), comm, x, self.dim, &self.sizes)
    }
    fn backward<T: Element>(
        &self,
        comm: &dyn Communicator,
        grad: &LocalTensor<T>,
    ) -> Result<LocalTensor<T>> {
        gather_dim(self.name(), comm, grad, self.dim, &self.sizes)
    }
}

/// EP token exchange (torchtitan `ExpertParallel._token_dispatch` / `_token_combine`,
/// `all_to_all_single_autograd`): forward sends the first `send_splits[0]` rows (dim 0) to rank
/// 0, the next `send_splits[1]` to rank 1, ... and receives `recv_splits[j]` rows from rank j in
/// rank order; backward is the same exchange with the split lists swapped. Shapes:
/// `[sum(send_splits), ..]` -> `[sum(recv_splits), ..]`. Rank i's `send_splits[j]` must equal
/// rank j's `recv_splits[i]` (checked on every rank).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllToAllV {
    /// Rows sent to each rank (input splits).
    pub send_splits: Vec<usize>,
    /// Rows received from each rank (output splits).
    pub recv_splits: Vec<usize>,
}

impl CollectiveFunction for AllToAllV {
    fn name(&self) -> &'static str {
        "all_to_all_v"
    }
    fn input_layout(&self) -> Layout {
        Layout::PerRank
    }
    fn output_layout(&self) -> Layout {
        Layout::PerRank
    }
    fn forward<T: Element>(
        &self,
        comm: &dyn Communicator,
        x: &LocalTensor<T>,
    ) -> Result<LocalTensor<T>> {
        all_to_all_rows(self.name(), comm, x, &self.send_splits, &self.recv_splits)
    }
    fn backward<T: Element>(
        &self,
        comm: &dyn Communicator,
        grad: &LocalTensor<T>,
    ) -> Result<LocalTensor<T>> {
        all_to_all_rows(
            self.name(),
            comm,
            grad,
            &self.recv_splits,
            &self.send_splits,
        )
    }
}

/// Split sizes of `n` over `parts` ranks by the torch.chunk rule (`ceil(n/parts)` each, trailing
/// shards short or empty), as DTensor `Shard` uses (`placement::chunk`). E.g. 5 over 4 ->
/// `[2, 2, 1, 0]`. Errors: `parts == 0`.
pub fn chunk_sizes(n: usize, parts: usize) -> Result<Vec<usize>> {
    (0..parts)
        .map(|r| {
            placement::chunk(n, parts, r)
                .map(|(len, _)| len)
                .map_err(|e| shape_err("chunk_sizes", e.to_string()))
        })
        .collect::<Result<Vec<_>>>()
        .and_then(|v| {
            if v.is_empty() {
                Err(shape_err("chunk_sizes", "0 parts".into()))
            } else {
                Ok(v)
            }
        })
}
