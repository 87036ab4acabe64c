//! MPI backend (rsmpi 0.8, `MPI_COMM_WORLD` and its splits).
//!
//! Before moving any data every collective exchanges each rank's call descriptor (two extra
//! `MPI_Allgather(v)` calls) and runs the same consistency checks as the threads backend, so
//! mismatched or invalid calls make every rank return the same [`CommError`] instead of hanging
//! or corrupting memory. Mapping to MPI:
//! - `broadcast_raw`: `MPI_Bcast` of the bytes (`process_at_rank(root).broadcast_into`);
//! - `all_reduce_raw`: `MPI_Allreduce` on typed buffers (`F32`/`F64` as float/double, `U8` as
//!   unsigned 8-bit ints, `BF16` widened to f32, reduced, and rounded to bf16 once);
//! - `all_gather_raw`: `MPI_Allgatherv` of bytes (`all_gather_varcount_into`);
//! - `reduce_scatter_raw`: `MPI_Allreduce` of the whole buffer, then each rank keeps its slice
//!   (uneven counts are allowed; `MPI_Reduce_scatter_block` only handles equal blocks);
//! - `all_to_all_raw`: `MPI_Alltoallv` of bytes (`all_to_all_varcount_into`);
//! - `split`: `MPI_Comm_split` (`split_by_color_with_key`).
//!
//! MPI counts and displacements are C `int`: a byte count or offset above `i32::MAX` is a
//! [`CommError::CountOverflow`] (reported on every rank). MPI's reduction order is unspecified,
//! so float results can differ from a serial sum in the last bits unless the data is
//! integer-valued.

use crate::call::{cross_check, decode, encode, local_check, Call};
use crate::communicator::Communicator;
use crate::dtype::{DType, ReduceOp};
use crate::error::{CommError, Result};
use mpi::collective::SystemOperation;
use mpi::datatype::{Partition, PartitionMut};
use mpi::topology::{Color, SimpleCommunicator};
use mpi::traits::{Communicator as _, CommunicatorCollectives as _, Root as _};
use std::cell::Cell;

/// Owns the MPI environment (one per process). Dropping it calls `MPI_Finalize`: drop every
/// communicator obtained from it (including splits) first.
pub struct MpiWorld {
    _universe: mpi::environment::Universe,
}

impl MpiWorld {
    /// Initialises MPI (`MPI_Init_thread` with `MPI_THREAD_SINGLE`: use the communicators from
    /// the thread that called `init`).
    ///
    /// Errors: MPI already initialised (or finalised) in this process.
    pub fn init() -> Result<Self> {
        if mpi::is_finalized() {
            return Err(CommError::Mpi(
                "MPI was already finalized in this process; it cannot be re-initialised".into(),
            ));
        }
        if mpi::is_initialized() {
            return Err(CommError::Mpi(
                "MPI is already initialised in this process (only one MpiWorld may exist)".into(),
            ));
        }
        let universe = mpi::initialize()
            .ok_or_else(|| CommError::Mpi("MPI_Init failed or MPI already initialised".into()))?;
        Ok(MpiWorld {
            _universe: universe,
        })
    }

    /// The `MPI_COMM_WORLD` communicator, borrowed from `self` so it cannot outlive
    /// `MPI_Finalize`. (Sub-communicators from [`Communicator::split`] are `'static` because of
    /// the trait signature; drop them before the `MpiWorld` too.)
    pub fn world(&self) -> Box<dyn Communicator + '_> {
        Box::new(MpiComm::new(SimpleCommunicator::world()))
    }
}

/// One MPI communicator (world or a split of it). Not `Send`: MPI is initialised
/// single-threaded.
pub struct MpiComm {
    comm: SimpleCommunicator,
    rank: usize,
    size: usize,
    seq: Cell<u64>,
}

impl std::fmt::Debug for MpiComm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MpiComm")
            .field("rank", &self.rank)
            .field("size", &self.size)
            .finish()
    }
}

fn to_count(op: &'static str, what: &'static str, value: usize) -> Result<i32> {
    i32::try_from(value).map_err(|_| CommError::CountOverflow { op, what, value })
}

/// Byte counts and displacements of a partition, as MPI `int`s.
fn partition(op: &'static str, counts: &[usize], dsize: usize) -> Result<(Vec<i32>, Vec<i32>)> {
    let mut c = Vec::with_capacity(counts.len());
    let mut d = Vec::with_capacity(counts.len());
    let mut off = 0usize;
    for &n in counts {
        let bytes = n.checked_mul(dsize).ok_or(CommError::CountOverflow {
            op,
            what: "byte count",
            value: n,
        })?;
        c.push(to_count(op, "byte count", bytes)?);
        d.push(to_count(op, "byte displacement", off)?);
        off = off.checked_add(bytes).ok_or(CommError::CountOverflow {
            op,
            what: "total bytes",
            value: off,
        })?;
    }
    to_count(op, "total bytes", off)?;
    Ok((c, d))
}

/// MPI-specific limits of a call (all byte counts and offsets fit in `int`).
fn mpi_limits(call: &Call, data_len: usize) -> Result<()> {
    let op = call.name();
    to_count(op, "buffer bytes", data_len)?;
    match call {
        Call::AllGather { dtype, counts } | Call::ReduceScatter { dtype, counts, .. } => {
            partition(op, counts, dtype.size()).map(|_| ())
        }
        Call::AllToAll {
            dtype,
            send_counts,
            recv_counts,
        } => {
            partition(op, send_counts, dtype.size())?;
            partition(op, recv_counts, dtype.size()).map(|_| ())
        }
        _ => Ok(()),
    }
}

/// An empty byte slice may carry the dangling pointer `0x1`, which is Open MPI's
/// `MPI_IN_PLACE`; pass a real (zero-length) slice of `dummy` instead. Receive buffers are
/// allocated with at least one byte for the same reason.
fn non_null<'a>(buf: &'a [u8], dummy: &'a [u8; 1]) -> &'a [u8] {
    if buf.is_empty() {
        &dummy[..0]
    } else {
        buf
    }
}

fn system_op(op: ReduceOp) -> SystemOperation {
    match op {
        ReduceOp::Sum => SystemOperation::sum(),
        ReduceOp::Max => SystemOperation::max(),
        ReduceOp::Min => SystemOperation::min(),
    }
}

impl MpiComm {
    fn new(comm: SimpleCommunicator) -> Self {
        let rank = usize::try_from(comm.rank()).unwrap_or(0);
        let size = usize::try_from(comm.size()).unwrap_or(0);
        MpiComm {
            comm,
            rank,
            size,
            seq: Cell::new(0),
        }
    }

    /// Exchanges call descriptors and checks them on every rank (identically).
    fn exchange(&self, call: &Call, data_len: usize) -> Result<()> {
        let seq = self.seq.get();
        self.seq.set(seq + 1);
        let local = local_check(call, self.rank, self.size, data_len)
            .and_then(|_| mpi_limits(call, data_len))
            .err();
        let words = encode(call, local.as_ref());
        let my_len = [words.len() as u64];
        let mut lens = vec![0u64; self.size];
        self.comm.all_gather_into(&my_len[..], &mut lens[..]);
        let mut counts = Vec::with_capacity(self.size);
        let mut displs = Vec::with_capacity(self.size);
        let mut off = 0usize;
        for &l in &lens {
            let l = usize::try_from(l)
                .map_err(|_| CommError::Internal("descriptor length overflow".into()))?;
            counts.push(to_count(call.name(), "descriptor words", l)?);
            displs.push(to_count(call.name(), "descriptor offset", off)?);
            off += l;
        }
        let mut all = vec![0u64; off];
        {
            let mut part = PartitionMut::new(&mut all[..], counts, displs);
            self.comm.all_gather_varcount_into(&words[..], &mut part);
        }
        let mut calls = Vec::with_capacity(self.size);
        let mut locals = Vec::with_capacity(self.size);
        let mut start = 0usize;
        for (r, &l) in lens.iter().enumerate() {
            let l = l as usize;
            let (c, e) = decode(&all[start..start + l], r)?;
            calls.push(c);
            // This rank's own error keeps its original variant (e.g. CountOverflow).
            locals.push(if r == self.rank { local.clone() } else { e });
            start += l;
        }
        cross_check(self.rank, seq, &calls, &locals)
    }

    fn all_reduce_bytes(&self, buf: &mut [u8], dtype: DType, op: ReduceOp) {
        if buf.is_empty() {
            // Every rank has the same (zero) count; an empty Vec<u8> would also pass the
            // dangling pointer 0x1, which Open MPI reads as MPI_IN_PLACE.
            return;
        }
        fn typed<T: mpi::datatype::Equivalence + bytemuck::Pod + Default>(
            comm: &SimpleCommunicator,
            send: Vec<T>,
            op: ReduceOp,
        ) -> Vec<T> {
            let mut recv = vec![T::default(); send.len()];
            comm.all_reduce_into(&send[..], &mut recv[..], system_op(op));
            recv
        }
        match dtype {
            DType::F32 => {
                let out = typed::<f32>(&self.comm, crate::communicator::pod_vec(buf), op);
                buf.copy_from_slice(bytemuck::cast_slice(&out));
            }
            DType::F64 => {
                let out = typed::<f64>(&self.comm, crate::communicator::pod_vec(buf), op);
                buf.copy_from_slice(bytemuck::cast_slice(&out));
            }
            DType::U8 => {
                let out = typed::<u8>(&self.comm, buf.to_vec(), op);
                buf.copy_from_slice(&out);
            }
            DType::BF16 => {
                let wide: Vec<f32> = crate::communicator::pod_vec::<half::bf16>(buf)
                    .iter()
                    .map(|x| x.to_f32())
                    .collect();
                let out: Vec<half::bf16> = typed::<f32>(&self.comm, wide, op)
                    .into_iter()
                    .map(half::bf16::from_f32)
                    .collect();
                buf.copy_from_slice(bytemuck::cast_slice(&out));
            }
        }
    }
}

impl Communicator for MpiComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.size
    }

    fn backend(&self) -> &'static str {
        "mpi"
    }

    fn barrier(&self) -> Result<()> {
        self.exchange(&Call::Barrier, 0)?;
        self.comm.barrier();
        Ok(())
    }

    fn broadcast_raw(&self, buf: &mut [u8], dtype: DType, root: usize) -> Result<()> {
        let call = Call::Broadcast {
            dtype,
            count: buf.len() / dtype.size(),
            root,
        };
        self.exchange(&call, buf.len())?;
        let root = to_count("broadcast", "root", root)?;
        let mut dummy = [0u8; 1];
        let buf = if buf.is_empty() { &mut dummy[..0] } else { buf };
        self.comm.process_at_rank(root).broadcast_into(buf);
        Ok(())
    }

    fn all_reduce_raw(&self, buf: &mut [u8], dtype: DType, op: ReduceOp) -> Result<()> {
        let call = Call::AllReduce {
            dtype,
            count: buf.len() / dtype.size(),
            op,
        };
        self.exchange(&call, buf.len())?;
        self.all_reduce_bytes(buf, dtype, op);
        Ok(())
    }

    fn all_gather_raw(&self, send: &[u8], counts: &[usize], dtype: DType) -> Result<Vec<u8>> {
        let call = Call::AllGather {
            dtype,
            counts: counts.to_vec(),
        };
        self.exchange(&call, send.len())?;
        let (c, d) = partition("all_gather", counts, dtype.size())?;
        let total: usize = counts.iter().sum::<usize>() * dtype.size();
        let dummy = [0u8; 1];
        let mut recv = vec![0u8; total.max(1)];
        {
            let mut part = PartitionMut::new(&mut recv[..], c, d);
            self.comm
                .all_gather_varcount_into(non_null(send, &dummy), &mut part);
        }
        recv.truncate(total);
        Ok(recv)
    }

    fn reduce_scatter_raw(
        &self,
        send: &[u8],
        counts: &[usize],
        dtype: DType,
        op: ReduceOp,
    ) -> Result<Vec<u8>> {
        let call = Call::ReduceScatter {
            dtype,
            counts: counts.to_vec(),
            op,
        };
        self.exchange(&call, send.len())?;
        let mut full = send.to_vec();
        self.all_reduce_bytes(&mut full, dtype, op);
        let start = counts[..self.rank].iter().sum::<usize>() * dtype.size();
        let len = counts[self.rank] * dtype.size();
        Ok(full[start..start + len].to_vec())
    }

    fn all_to_all_raw(
        &self,
        send: &[u8],
        send_counts: &[usize],
        recv_counts: &[usize],
        dtype: DType,
    ) -> Result<Vec<u8>> {
        let call = Call::AllToAll {
            dtype,
            send_counts: send_counts.to_vec(),
            recv_counts: recv_counts.to_vec(),
        };
        self.exchange(&call, send.len())?;
        let (sc, sd) = partition("all_to_all", send_counts, dtype.size())?;
        let (rc, rd) = partition("all_to_all", recv_counts, dtype.size())?;
        let total: usize = recv_counts.iter().sum::<usize>() * dtype.size();
        let dummy = [0u8; 1];
        let mut recv = vec![0u8; total.max(1)];
        {
            let spart = Partition::new(non_null(send, &dummy), sc, sd);
            let mut rpart = PartitionMut::new(&mut recv[..], rc, rd);
            self.comm.all_to_all_varcount_into(&spart, &mut rpart);
        }
        recv.truncate(total);
        Ok(recv)
    }

    fn split(&self, color: usize, key: usize) -> Result<Box<dyn Communicator>> {
        self.exchange(&Call::Split { color, key }, 0)?;
        let c = to_count("split", "color", color)?;
        let k = to_count("split", "key", key)?;
        let sub = self
            .comm
            .split_by_color_with_key(Color::with_value(c), k)
            .ok_or_else(|| {
                CommError::Mpi(format!(
                    "MPI_Comm_split(color={color}, key={key}) returned MPI_COMM_NULL"
                ))
            })?;
        Ok(Box::new(MpiComm::new(sub)))
    }
}
