//! The [`Communicator`] trait (raw byte collectives) and its typed wrapper [`CommunicatorExt`].

use crate::dtype::{DType, Element, ReduceOp};
use crate::error::{CommError, Result};

/// A process group. Counts are in ELEMENTS of `dtype`; buffers are little-endian byte images
/// of `[T]` (no alignment required).
///
/// All methods are collective: every rank of the communicator must call them in the same order
/// with compatible arguments. Both backends exchange each call's arguments before moving data,
/// so a mismatch (different op, dtype, counts, root; an invalid argument on any rank) makes
/// EVERY rank return an error instead of hanging ([`CommError::Mismatch`],
/// [`CommError::CountMismatch`], [`CommError::InvalidArgument`] naming the offending rank; MPI
/// only: the offending rank keeps its own variant, e.g. [`CommError::CountOverflow`]), and the
/// communicator stays usable.
pub trait Communicator {
    /// This process's rank in `0..size()`.
    fn rank(&self) -> usize;
    /// Number of ranks.
    fn size(&self) -> usize;
    /// `"threads"` or `"mpi"`.
    fn backend(&self) -> &'static str;

    /// Blocks until every rank has called `barrier`.
    fn barrier(&self) -> Result<()>;

    /// Copies root's `buf` into every rank's `buf`. All ranks pass buffers of the same length.
    /// Errors: `root >= size`, length not a multiple of `dtype.size()`, differing lengths.
    fn broadcast_raw(&self, buf: &mut [u8], dtype: DType, root: usize) -> Result<()>;

    /// Element-wise reduction of `buf` over all ranks; the result replaces `buf` on every rank.
    ///
    /// `BF16` is reduced in f32 and rounded to bf16 once at the end (round-to-nearest-even);
    /// `U8` is reduced as unsigned integers (`Sum` wraps modulo 256). The threads backend
    /// combines in rank order (deterministic); MPI may use any order, so only integer-valued
    /// float data gives bit-identical results across backends.
    fn all_reduce_raw(&self, buf: &mut [u8], dtype: DType, op: ReduceOp) -> Result<()>;

    /// Rank `r` contributes `counts[r]` elements (`send.len() == counts[rank] * dtype.size()`);
    /// returns the concatenation in rank order (`sum(counts)` elements). `counts.len() == size`.
    fn all_gather_raw(&self, send: &[u8], counts: &[usize], dtype: DType) -> Result<Vec<u8>>;

    /// `send` holds `sum(counts)` elements on every rank; returns this rank's block
    /// (`counts[rank]` elements starting at element `sum(counts[..rank])`) of the element-wise
    /// reduction. Uneven and zero counts are allowed.
    fn reduce_scatter_raw(
        &self,
        send: &[u8],
        counts: &[usize],
        dtype: DType,
        op: ReduceOp,
    ) -> Result<Vec<u8>>;

    /// All-to-all-v. `send` holds `sum(send_counts)` elements: the first `send_counts[0]` go to
    /// rank 0, the next `send_counts[1]` to rank 1, ...; returns `sum(recv_counts)` elements, the
    /// block from rank 0 first. Each rank passes its own lists; if rank `i`'s `send_counts[j]`
    /// differs from rank `j`'s `recv_counts[i]` every rank gets [`CommError::CountMismatch`].
    fn all_to_all_raw(
        &self,
        send: &[u8],
        send_counts: &[usize],
        recv_counts: &[usize],
        dtype: DType,
    ) -> Result<Vec<u8>>;

    /// [`Communicator::all_gather_raw`] into a caller-provided `out` of exactly `sum(counts)`
    /// elements (no allocation on the MPI backend). Default: `all_gather_raw` then a copy; a
    /// wrong `out` length is then an error on this rank only, after the collective completed
    /// (the MPI backend checks it before, on every rank).
    fn all_gather_into_raw(
        &self,
        send: &[u8],
        counts: &[usize],
        dtype: DType,
        out: &mut [u8],
    ) -> Result<()> {
        let v = self.all_gather_raw(send, counts, dtype)?;
        copy_out("all_gather", self.rank(), &v, out)
    }

    /// [`Communicator::reduce_scatter_raw`] into a caller-provided `out` of exactly
    /// `counts[rank]` elements. Default: `reduce_scatter_raw` then a copy (see
    /// [`Communicator::all_gather_into_raw`] for the length check).
    fn reduce_scatter_into_raw(
        &self,
        send: &[u8],
        counts: &[usize],
        dtype: DType,
        op: ReduceOp,
        out: &mut [u8],
    ) -> Result<()> {
        let v = self.reduce_scatter_raw(send, counts, dtype, op)?;
        copy_out("reduce_scatter", self.rank(), &v, out)
    }

    /// [`Communicator::all_to_all_raw`] into a caller-provided `out` of exactly
    /// `sum(recv_counts)` elements. Default: `all_to_all_raw` then a copy (see
    /// [`Communicator::all_gather_into_raw`] for the length check).
    fn all_to_all_into_raw(
        &self,
        send: &[u8],
        send_counts: &[usize],
        recv_counts: &[usize],
        dtype: DType,
        out: &mut [u8],
    ) -> Result<()> {
        let v = self.all_to_all_raw(send, send_counts, recv_counts, dtype)?;
        copy_out("all_to_all", self.rank(), &v, out)
    }

    /// `MPI_Comm_split` semantics: ranks with the same `color` form a communicator, ranked by
    /// `(key, old rank)`. `color` and `key` must be `<= i32::MAX` (MPI `int`).
    fn split(&self, color: usize, key: usize) -> Result<Box<dyn Communicator>>;
}

macro_rules! forward_communicator {
    ($($ty:ty),*) => {$(
        impl<C: Communicator + ?Sized> Communicator for $ty {
            fn rank(&self) -> usize { (**self).rank() }
            fn size(&self) -> usize { (**self).size() }
            fn backend(&self) -> &'static str { (**self).backend() }
            fn barrier(&self) -> Result<()> { (**self).barrier() }
            fn broadcast_raw(&self, buf: &mut [u8], dtype: DType, root: usize) -> Result<()> {
                (**self).broadcast_raw(buf, dtype, root)
            }
            fn all_reduce_raw(&self, buf: &mut [u8], dtype: DType, op: ReduceOp) -> Result<()> {
                (**self).all_reduce_raw(buf, dtype, op)
            }
            fn all_gather_raw(&self, send: &[u8], counts: &[usize], dtype: DType) -> Result<Vec<u8>> {
                (**self).all_gather_raw(send, counts, dtype)
            }
            fn reduce_scatter_raw(
                &self, send: &[u8], counts: &[usize], dtype: DType, op: ReduceOp,
            ) -> Result<Vec<u8>> {
                (**self).reduce_scatter_raw(send, counts, dtype, op)
            }
            fn all_to_all_raw(
                &self, send: &[u8], send_counts: &[usize], recv_counts: &[usize], dtype: DType,
            ) -> Result<Vec<u8>> {
                (**self).all_to_all_raw(send, send_counts, recv_counts, dtype)
            }
            fn all_gather_into_raw(
                &self, send: &[u8], counts: &[usize], dtype: DType, out: &mut [u8],
            ) -> Result<()> {
                (**self).all_gather_into_raw(send, counts, dtype, out)
            }
            fn reduce_scatter_into_raw(
                &self, send: &[u8], counts: &[usize], dtype: DType, op: ReduceOp, out: &mut [u8],
            ) -> Result<()> {
                (**self).reduce_scatter_into_raw(send, counts, dtype, op, out)
            }
            fn all_to_all_into_raw(
                &self, send: &[u8], send_counts: &[usize], recv_counts: &[usize], dtype: DType,
                out: &mut [u8],
            ) -> Result<()> {
                (**self).all_to_all_into_raw(send, send_counts, recv_counts, dtype, out)
            }
            fn split(&self, color: usize, key: usize) -> Result<Box<dyn Communicator>> {
                (**self).split(color, key)
            }
        }
    )*};
}

forward_communicator!(Box<C>, &C);

/// Typed wrappers over the raw collectives, blanket-implemented for every [`Communicator`]
/// (including `dyn Communicator`). Semantics and errors are those of the `*_raw` methods with
/// `dtype = T::DTYPE` and counts in elements of `T`.
pub trait CommunicatorExt: Communicator {
    /// See [`Communicator::broadcast_raw`].
    fn broadcast<T: Element>(&self, buf: &mut [T], root: usize) -> Result<()> {
        self.broadcast_raw(bytemuck::cast_slice_mut(buf), T::DTYPE, root)
    }
    /// See [`Communicator::all_reduce_raw`].
    fn all_reduce<T: Element>(&self, buf: &mut [T], op: ReduceOp) -> Result<()> {
        self.all_reduce_raw(bytemuck::cast_slice_mut(buf), T::DTYPE, op)
    }
    /// See [`Communicator::all_gather_raw`].
    fn all_gather<T: Element>(&self, send: &[T], counts: &[usize]) -> Result<Vec<T>> {
        let out = self.all_gather_raw(bytemuck::cast_slice(send), counts, T::DTYPE)?;
        from_bytes("all_gather", &out)
    }
    /// See [`Communicator::reduce_scatter_raw`].
    fn reduce_scatter<T: Element>(
        &self,
        send: &[T],
        counts: &[usize],
        op: ReduceOp,
    ) -> Result<Vec<T>> {
        let out = self.reduce_scatter_raw(bytemuck::cast_slice(send), counts, T::DTYPE, op)?;
        from_bytes("reduce_scatter", &out)
    }
    /// See [`Communicator::all_to_all_raw`].
    fn all_to_all<T: Element>(
        &self,
        send: &[T],
        send_counts: &[usize],
        recv_counts: &[usize],
    ) -> Result<Vec<T>> {
        let out = self.all_to_all_raw(
            bytemuck::cast_slice(send),
            send_counts,
            recv_counts,
            T::DTYPE,
        )?;
        from_bytes("all_to_all", &out)
    }
    /// See [`Communicator::all_gather_into_raw`] (`out.len() == sum(counts)`).
    fn all_gather_into<T: Element>(
        &self,
        send: &[T],
        counts: &[usize],
        out: &mut [T],
    ) -> Result<()> {
        self.all_gather_into_raw(
            bytemuck::cast_slice(send),
            counts,
            T::DTYPE,
            bytemuck::cast_slice_mut(out),
        )
    }
    /// See [`Communicator::reduce_scatter_into_raw`] (`out.len() == counts[rank]`).
    fn reduce_scatter_into<T: Element>(
        &self,
        send: &[T],
        counts: &[usize],
        op: ReduceOp,
        out: &mut [T],
    ) -> Result<()> {
        self.reduce_scatter_into_raw(
            bytemuck::cast_slice(send),
            counts,
            T::DTYPE,
            op,
            bytemuck::cast_slice_mut(out),
        )
    }
    /// See [`Communicator::all_to_all_into_raw`] (`out.len() == sum(recv_counts)`).
    fn all_to_all_into<T: Element>(
        &self,
        send: &[T],
        send_counts: &[usize],
        recv_counts: &[usize],
        out: &mut [T],
    ) -> Result<()> {
        self.all_to_all_into_raw(
            bytemuck::cast_slice(send),
            send_counts,
            recv_counts,
            T::DTYPE,
            bytemuck::cast_slice_mut(out),
        )
    }
}

impl<C: Communicator + ?Sized> CommunicatorExt for C {}

/// Copies a collective's result into the caller's buffer, which must have the same length.
fn copy_out(op: &'static str, rank: usize, result: &[u8], out: &mut [u8]) -> Result<()> {
    if out.len() != result.len() {
        return Err(CommError::InvalidArgument {
            op,
            rank,
            reason: format!(
                "output buffer has {} bytes, the result has {}",
                out.len(),
                result.len()
            ),
        });
    }
    out.copy_from_slice(result);
    Ok(())
}

/// Copies a byte buffer into a `Vec<T>` (the bytes need not be aligned).
fn from_bytes<T: Element>(op: &'static str, bytes: &[u8]) -> Result<Vec<T>> {
    let size = std::mem::size_of::<T>();
    if bytes.len() % size != 0 {
        return Err(CommError::Internal(format!(
            "{op}: backend returned {} bytes, not a multiple of {size}",
            bytes.len()
        )));
    }
    Ok(pod_vec(bytes))
}

/// Copies little-endian element bytes into a `Vec<T>` (no alignment needed; a trailing partial
/// element is ignored, callers check lengths first).
pub(crate) fn pod_vec<T: bytemuck::Pod>(bytes: &[u8]) -> Vec<T> {
    bytes
        .chunks_exact(std::mem::size_of::<T>())
        .map(bytemuck::pod_read_unaligned)
        .collect()
}
