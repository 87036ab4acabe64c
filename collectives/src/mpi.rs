//! MPI backend (rsmpi 0.8, `MPI_COMM_WORLD` and its splits).
//!
//! Before moving any data every collective exchanges each rank's call descriptor (two extra
//! `MPI_Allgather(v)` calls) and runs the same consistency checks as the threads backend, so
//! mismatched or invalid calls make every rank return the same [`CommError`] instead of hanging
//! or corrupting memory. Mapping to MPI:
//! - `broadcast_raw`: `MPI_Bcast` of the bytes (`process_at_rank(root).broadcast_into`);
//! - `all_reduce_raw`: `MPI_Allreduce` on typed buffers (`F32`/`F64` as float/double, `U8` as
//!   unsigned 8-bit ints, `BF16` widened to f32, reduced, and rounded to bf16 once); in place
//!   (`MPI_IN_PLACE`, no copy) when the library is Open MPI, else through a copy;
//! - `*_into_raw`: the same calls writing into the caller's buffer (no allocation);
//! - `all_gather_raw`: `MPI_Allgatherv` of bytes (`all_gather_varcount_into`); `MPI_Allgather`
//!   when all counts are equal;
//! - `reduce_scatter_raw`: `MPI_Reduce_scatter` (uneven and zero counts allowed;
//!   `MPI_Reduce_scatter_block` when all counts are equal) for `F32`/`F64`/`U8`; `BF16`: `MPI_Allreduce` in f32 of the whole buffer, then each rank keeps
//!   its slice;
//! - `all_to_all_raw`: `MPI_Alltoallv` of bytes (`all_to_all_varcount_into`); `MPI_Alltoall`
//!   when every rank sends the same non-zero count to every rank (decided from the exchanged
//!   calls, so identically on all ranks);
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
use crate::watchdog::{CommLabel, Guard, Watchdog, WATCHDOG_EXIT_CODE};
use mpi::collective::SystemOperation;
use mpi::datatype::Equivalence as _;
use mpi::datatype::{Partition, PartitionMut};
use mpi::raw::AsRaw as _;
use mpi::topology::{Color, SimpleCommunicator};
use mpi::traits::{Communicator as _, CommunicatorCollectives as _, Root as _};
use std::cell::Cell;
use std::time::Duration;

/// Owns the MPI environment (one per process). Dropping it is collective (a checked barrier,
/// then `MPI_Finalize`): drop every communicator obtained from it (including splits) first.
pub struct MpiWorld {
    /// `Option` so that `Drop` can skip `MPI_Finalize` (see [`MpiWorld`]'s `Drop`).
    _universe: Option<mpi::environment::Universe>,
    watchdog: Watchdog,
    open_mpi: bool,
}

/// Watchdog action: print the message, wait 5 poll periods (250 ms, so peers blocked in the
/// same collective print their own line), and end this process with status 70 (`_exit`, no
/// atexit handlers, no MPI call: the watchdog thread must not call MPI under
/// `MPI_THREAD_SINGLE`, and `MPI_Abort` after a peer's `MPI_Finalize` made Open MPI 4.1's mpirun
/// crash or hang in `PMIx_server_finalize`). mpirun then sees a rank exit without finalizing and
/// terminates the others (SIGTERM: they print which collective they were in, see
/// `crate::sigterm`).
fn mpi_abort(msg: &str) -> ! {
    crate::report_fault(msg);
    std::thread::sleep(crate::watchdog::POLL * 5);
    exit_now(WATCHDOG_EXIT_CODE)
}

#[cfg(unix)]
fn exit_now(code: i32) -> ! {
    // SAFETY: _exit(2) ends the process immediately; nothing is touched afterwards.
    unsafe { libc::_exit(code) }
}

#[cfg(not(unix))]
fn exit_now(code: i32) -> ! {
    std::process::exit(code)
}

/// Dropping the world first checks that every rank is finalizing: a checked `barrier` on
/// `MPI_COMM_WORLD` (descriptor exchange + `MPI_Barrier`, under the watchdog). A rank that
/// reaches the end while its peers are still in a collective (it skipped one) makes every rank
/// see `Mismatch` ("rank 3: barrier()" against their call) instead of hanging; that rank then
/// prints the error and exits with status 70 WITHOUT `MPI_Finalize` (finalizing while peers are
/// in a collective hangs, and made Open MPI 4.1's mpirun crash or hang in teardown); mpirun then
/// terminates the job. When all ranks agree, `MPI_Finalize` runs as usual.
impl Drop for MpiWorld {
    fn drop(&mut self) {
        let comm = MpiComm::new(
            SimpleCommunicator::world(),
            self.watchdog.clone(),
            self.open_mpi,
        );
        if let Err(e) = comm.barrier() {
            crate::report_fault(&format!(
                "collectives: rank {} of {}: MPI_Finalize skipped, the other ranks are not \
                 finalizing: {e}; exiting with status {WATCHDOG_EXIT_CODE}",
                comm.rank, comm.size
            ));
            // Let the peers report their own error before mpirun terminates them.
            std::thread::sleep(crate::watchdog::POLL * 10);
            exit_now(WATCHDOG_EXIT_CODE);
        }
        drop(comm);
        drop(self._universe.take()); // MPI_Finalize
    }
}

impl MpiWorld {
    /// Initialises MPI (`MPI_Init_thread` with `MPI_THREAD_SINGLE`: use the communicators from
    /// the thread that called `init`) and starts the collective watchdog
    /// ([`crate::watchdog`]) with timeout [`crate::threads::default_timeout`]
    /// (`COLLECTIVES_TIMEOUT_SECS`, default 60 s): a collective that has not completed after the
    /// timeout (a peer died, stalled or skipped it) prints `collectives watchdog: rank R of N:
    /// <op> (collective #S on mpi communicator ...) did not complete within ...` and ends the
    /// process with exit status 70; mpirun then terminates the other ranks.
    ///
    /// Errors: MPI already initialised (or finalised) in this process; the watchdog thread
    /// could not be started.
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
        let world = SimpleCommunicator::world();
        let (rank, size) = (world.rank(), world.size());
        let (rank, size) = (rank.max(0) as usize, size.max(0) as usize);
        let watchdog = Watchdog::start(crate::threads::default_timeout(), rank, size, mpi_abort)
            .map_err(CommError::Mpi)?;
        let open_mpi = mpi::environment::library_version()
            .map(|v| v.starts_with("Open MPI"))
            .unwrap_or(false);
        Ok(MpiWorld {
            _universe: Some(universe),
            watchdog,
            open_mpi,
        })
    }

    /// The collective timeout of the watchdog.
    pub fn timeout(&self) -> Duration {
        self.watchdog.timeout()
    }

    /// Sets the collective timeout of the watchdog (every communicator of this process).
    pub fn set_timeout(&self, timeout: Duration) {
        self.watchdog.set_timeout(timeout);
    }

    /// The `MPI_COMM_WORLD` communicator, borrowed from `self` so it cannot outlive
    /// `MPI_Finalize`. (Sub-communicators from [`Communicator::split`] are `'static` because of
    /// the trait signature; drop them before the `MpiWorld` too.)
    pub fn world(&self) -> Box<dyn Communicator + '_> {
        Box::new(MpiComm::new(
            SimpleCommunicator::world(),
            self.watchdog.clone(),
            self.open_mpi,
        ))
    }
}

/// One MPI communicator (world or a split of it). Not `Send`: MPI is initialised
/// single-threaded.
pub struct MpiComm {
    comm: SimpleCommunicator,
    rank: usize,
    size: usize,
    seq: Cell<u64>,
    watchdog: Watchdog,
    /// The library is Open MPI, whose `MPI_IN_PLACE` is known (in-place all_reduce).
    open_mpi: bool,
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

/// Checks a caller-provided output buffer against the call (after `local_check` passed).
fn check_out_len(call: &Call, rank: usize, out_len: Option<usize>) -> Result<()> {
    let Some(got) = out_len else {
        return Ok(());
    };
    let want = match call {
        Call::AllGather { dtype, counts } => counts.iter().sum::<usize>() * dtype.size(),
        Call::ReduceScatter { dtype, counts, .. } => counts[rank] * dtype.size(),
        Call::AllToAll {
            dtype, recv_counts, ..
        } => recv_counts.iter().sum::<usize>() * dtype.size(),
        _ => got,
    };
    if got != want {
        return Err(CommError::InvalidArgument {
            op: call.name(),
            rank,
            reason: format!("output buffer has {got} bytes, expected {want}"),
        });
    }
    Ok(())
}

/// `MPI_IN_PLACE` of Open MPI (`#define MPI_IN_PLACE ((void *) 1)` in its `mpi.h`; rsmpi does
/// not export the constant). Used only when the library reports itself as Open MPI.
const OPEN_MPI_IN_PLACE: *const std::ffi::c_void = 1usize as *const std::ffi::c_void;

/// Raw MPI datatype of the dtypes MPI reduces natively (`BF16` is widened to f32 instead).
fn native_datatype(dtype: DType) -> Option<mpi::ffi::MPI_Datatype> {
    match dtype {
        DType::F32 => Some(f32::equivalent_datatype().as_raw()),
        DType::F64 => Some(f64::equivalent_datatype().as_raw()),
        DType::U8 => Some(u8::equivalent_datatype().as_raw()),
        DType::BF16 => None,
    }
}

fn check_rc(op: &'static str, what: &str, rc: std::ffi::c_int) -> Result<()> {
    if rc == 0 {
        Ok(())
    } else {
        Err(CommError::Mpi(format!(
            "{op}: {what} returned error code {rc}"
        )))
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
    fn new(comm: SimpleCommunicator, watchdog: Watchdog, open_mpi: bool) -> Self {
        let rank = usize::try_from(comm.rank()).unwrap_or(0);
        let size = usize::try_from(comm.size()).unwrap_or(0);
        MpiComm {
            comm,
            rank,
            size,
            seq: Cell::new(0),
            watchdog,
            open_mpi,
        }
    }

    /// Registers the collective about to be issued (sequence number = the next `seq`) with the
    /// watchdog until the guard drops.
    fn watch(&self, op: &'static str) -> Guard {
        let label = CommLabel {
            backend: "mpi",
            size: self.size,
            rank: self.rank,
        };
        self.watchdog.enter(op, self.seq.get(), label)
    }

    /// Exchanges call descriptors and checks them on every rank (identically).
    fn exchange(&self, call: &Call, data_len: usize) -> Result<()> {
        self.exchange_out(call, data_len, None).map(drop)
    }

    /// [`Self::exchange`] that also checks the length of a caller-provided output buffer, and
    /// returns every rank's call (identical on all ranks, so decisions taken from it are too).
    fn exchange_out(
        &self,
        call: &Call,
        data_len: usize,
        out_len: Option<usize>,
    ) -> Result<Vec<Call>> {
        let seq = self.seq.get();
        self.seq.set(seq + 1);
        let local = local_check(call, self.rank, self.size, data_len)
            .and_then(|_| mpi_limits(call, data_len))
            .and_then(|_| check_out_len(call, self.rank, out_len))
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
        cross_check(self.rank, seq, &calls, &locals)?;
        Ok(calls)
    }

    fn all_reduce_bytes(&self, buf: &mut [u8], dtype: DType, op: ReduceOp) -> Result<()> {
        if buf.is_empty() {
            // Every rank has the same (zero) count; an empty Vec<u8> would also pass the
            // dangling pointer 0x1, which Open MPI reads as MPI_IN_PLACE.
            return Ok(());
        }
        if let (true, Some(dt)) = (self.open_mpi, native_datatype(dtype)) {
            // In place: no copy (x86 and Open MPI's reduction kernels accept unaligned data).
            let count = to_count("all_reduce", "element count", buf.len() / dtype.size())?;
            // SAFETY: `buf` holds `count` elements of `dt`; every rank passes the same count,
            // dtype and op (checked by the exchange); OPEN_MPI_IN_PLACE is Open MPI's value.
            let rc = unsafe {
                mpi::ffi::MPI_Allreduce(
                    OPEN_MPI_IN_PLACE,
                    buf.as_mut_ptr().cast(),
                    count,
                    dt,
                    system_op(op).as_raw(),
                    self.comm.as_raw(),
                )
            };
            return check_rc("all_reduce", "MPI_Allreduce", rc);
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
        Ok(())
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
        let _watch = self.watch("barrier");
        self.exchange(&Call::Barrier, 0)?;
        self.comm.barrier();
        Ok(())
    }

    fn broadcast_raw(&self, buf: &mut [u8], dtype: DType, root: usize) -> Result<()> {
        let _watch = self.watch("broadcast");
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
        let _watch = self.watch("all_reduce");
        let call = Call::AllReduce {
            dtype,
            count: buf.len() / dtype.size(),
            op,
        };
        self.exchange(&call, buf.len())?;
        self.all_reduce_bytes(buf, dtype, op)
    }

    fn all_gather_raw(&self, send: &[u8], counts: &[usize], dtype: DType) -> Result<Vec<u8>> {
        let total = counts.iter().sum::<usize>().saturating_mul(dtype.size());
        let mut out = vec![0u8; total];
        self.all_gather_into_raw(send, counts, dtype, &mut out)?;
        Ok(out)
    }

    fn all_gather_into_raw(
        &self,
        send: &[u8],
        counts: &[usize],
        dtype: DType,
        out: &mut [u8],
    ) -> Result<()> {
        let _watch = self.watch("all_gather");
        let call = Call::AllGather {
            dtype,
            counts: counts.to_vec(),
        };
        self.exchange_out(&call, send.len(), Some(out.len()))?;
        if counts.iter().all(|&c| c == 0) {
            return Ok(());
        }
        if counts.iter().all(|&c| c == counts[0]) {
            // Equal blocks (the count list is the same on every rank): MPI_Allgather, whose
            // algorithms are usually faster than MPI_Allgatherv's.
            self.comm.all_gather_into(send, out);
            return Ok(());
        }
        let (c, d) = partition("all_gather", counts, dtype.size())?;
        let (dummy, mut dummy_out) = ([0u8; 1], [0u8; 1]);
        let recv = if out.is_empty() {
            &mut dummy_out[..0]
        } else {
            out
        };
        let mut part = PartitionMut::new(recv, c, d);
        self.comm
            .all_gather_varcount_into(non_null(send, &dummy), &mut part);
        Ok(())
    }

    fn reduce_scatter_raw(
        &self,
        send: &[u8],
        counts: &[usize],
        dtype: DType,
        op: ReduceOp,
    ) -> Result<Vec<u8>> {
        let mine = counts.get(self.rank).copied().unwrap_or(0);
        let mut out = vec![0u8; mine.saturating_mul(dtype.size())];
        self.reduce_scatter_into_raw(send, counts, dtype, op, &mut out)?;
        Ok(out)
    }

    fn reduce_scatter_into_raw(
        &self,
        send: &[u8],
        counts: &[usize],
        dtype: DType,
        op: ReduceOp,
        out: &mut [u8],
    ) -> Result<()> {
        let _watch = self.watch("reduce_scatter");
        let call = Call::ReduceScatter {
            dtype,
            counts: counts.to_vec(),
            op,
        };
        self.exchange_out(&call, send.len(), Some(out.len()))?;
        if send.is_empty() {
            return Ok(()); // every count is 0 on every rank
        }
        if let Some(dt) = native_datatype(dtype) {
            let recv_counts = counts
                .iter()
                .map(|&c| to_count("reduce_scatter", "element count", c))
                .collect::<Result<Vec<i32>>>()?;
            let mut dummy = [0u8; 1];
            let recv = if out.is_empty() { &mut dummy[..0] } else { out };
            if counts.iter().all(|&c| c == counts[0]) {
                // Equal blocks (same count list on every rank): MPI_Reduce_scatter_block,
                // which Open MPI implements faster than MPI_Reduce_scatter for large buffers.
                // SAFETY: as below, with every block `counts[0]` elements.
                let rc = unsafe {
                    mpi::ffi::MPI_Reduce_scatter_block(
                        send.as_ptr().cast(),
                        recv.as_mut_ptr().cast(),
                        recv_counts[0],
                        dt,
                        system_op(op).as_raw(),
                        self.comm.as_raw(),
                    )
                };
                return check_rc("reduce_scatter", "MPI_Reduce_scatter_block", rc);
            }
            // SAFETY: `send` holds sum(counts) elements of `dt`, `recv` counts[rank]
            // (checked by the exchange on every rank, which also agreed on counts, dtype, op);
            // neither pointer is Open MPI's MPI_IN_PLACE (both point into real buffers).
            let rc = unsafe {
                mpi::ffi::MPI_Reduce_scatter(
                    send.as_ptr().cast(),
                    recv.as_mut_ptr().cast(),
                    recv_counts.as_ptr(),
                    dt,
                    system_op(op).as_raw(),
                    self.comm.as_raw(),
                )
            };
            return check_rc("reduce_scatter", "MPI_Reduce_scatter", rc);
        }
        // BF16: all_reduce in f32 (rounded once) and keep this rank's block.
        let mut full = send.to_vec();
        self.all_reduce_bytes(&mut full, dtype, op)?;
        let start = counts[..self.rank].iter().sum::<usize>() * dtype.size();
        out.copy_from_slice(&full[start..start + out.len()]);
        Ok(())
    }

    fn all_to_all_raw(
        &self,
        send: &[u8],
        send_counts: &[usize],
        recv_counts: &[usize],
        dtype: DType,
    ) -> Result<Vec<u8>> {
        let total = recv_counts
            .iter()
            .sum::<usize>()
            .saturating_mul(dtype.size());
        let mut out = vec![0u8; total];
        self.all_to_all_into_raw(send, send_counts, recv_counts, dtype, &mut out)?;
        Ok(out)
    }

    fn all_to_all_into_raw(
        &self,
        send: &[u8],
        send_counts: &[usize],
        recv_counts: &[usize],
        dtype: DType,
        out: &mut [u8],
    ) -> Result<()> {
        let _watch = self.watch("all_to_all");
        let call = Call::AllToAll {
            dtype,
            send_counts: send_counts.to_vec(),
            recv_counts: recv_counts.to_vec(),
        };
        let calls = self.exchange_out(&call, send.len(), Some(out.len()))?;
        let uniform = send_counts
            .first()
            .copied()
            .filter(|&c| c > 0)
            .filter(|&c| {
                calls.iter().all(|k| {
                    matches!(k, Call::AllToAll { send_counts, .. }
                    if send_counts.iter().all(|&x| x == c))
                })
            });
        if uniform.is_some() {
            // Every rank sends the same count to every rank (so receives it too, checked):
            // MPI_Alltoall.
            self.comm.all_to_all_into(send, out);
            return Ok(());
        }
        let (sc, sd) = partition("all_to_all", send_counts, dtype.size())?;
        let (rc, rd) = partition("all_to_all", recv_counts, dtype.size())?;
        let (dummy, mut dummy_out) = ([0u8; 1], [0u8; 1]);
        let recv = if out.is_empty() {
            &mut dummy_out[..0]
        } else {
            out
        };
        let spart = Partition::new(non_null(send, &dummy), sc, sd);
        let mut rpart = PartitionMut::new(recv, rc, rd);
        self.comm.all_to_all_varcount_into(&spart, &mut rpart);
        Ok(())
    }

    fn split(&self, color: usize, key: usize) -> Result<Box<dyn Communicator>> {
        let _watch = self.watch("split");
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
        Ok(Box::new(MpiComm::new(
            sub,
            self.watchdog.clone(),
            self.open_mpi,
        )))
    }
}
