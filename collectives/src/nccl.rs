//! NCCL backend (crate feature `nccl`): cudarc 0.19 (`nccl`, `driver`, `dynamic-loading`,
//! `cuda-13000`), one GPU per rank. It builds on machines without CUDA; at run time
//! [`availability`] reports [`NcclAvailability::Skipped`] (`"skipped: no CUDA device"`) instead
//! of calling into a missing library (cudarc's dynamic loading panics when the library is
//! missing, so the library is looked up first).
//!
//! A [`NcclComm`] is created collectively from a bootstrap communicator (MPI world, or the
//! threads backend for one process): rank 0 makes the NCCL unique id and broadcasts its 128
//! bytes over the bootstrap (`ncclGetUniqueId` + `ncclCommInitRank`, as PyTorch's
//! ProcessGroupNCCL does over its store). The bootstrap's private duplicate (one `split`) is
//! kept as the control communicator: every call's arguments are exchanged over it and checked
//! exactly as in the other backends before any data moves, so mismatched calls fail on every
//! rank instead of hanging the GPU.
//!
//! Data path (host buffers in, host buffers out, as the [`Communicator`] trait is host-based):
//! copy to the device, run the NCCL call on the rank's stream, copy back, synchronise.
//! - `all_reduce`: `ncclAllReduce` in place (`F32`/`F64`/`U8` natively; `BF16` widened to f32
//!   on the host and rounded once, the crate-wide rule);
//! - `all_gather` (uneven counts): each rank's block padded to the largest count,
//!   `ncclAllGather`, unpadded;
//! - `reduce_scatter` (uneven counts): blocks padded to the largest count, `ncclReduceScatter`;
//! - `all_to_all`: grouped `ncclSend`/`ncclRecv` (NCCL has no all_to_all_v;
//!   `ncclGroupStart/End` via cudarc's `Comm::group`);
//! - `broadcast`: `ncclBroadcast` in place; `barrier`: the control communicator's barrier;
//! - `split`: split of the control communicator, then a new NCCL communicator on it (same GPU).
//!
//! Not covered: the GPU phase has no watchdog of its own (a peer that dies inside an NCCL
//! kernel is caught by the control communicator's backend only at the next call).

use crate::call::{cross_check, decode, encode, local_check, Call};
use crate::communicator::{pod_vec, Communicator};
use crate::dtype::{DType, ReduceOp};
use crate::error::{CommError, Result};
use cudarc::driver::{CudaContext, CudaSlice, CudaStream, DeviceRepr, ValidAsZeroBits};
use cudarc::nccl::{Comm, Id, NcclType};
use std::cell::Cell;
use std::sync::Arc;

/// Whether the NCCL backend can run in this process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NcclAvailability {
    /// The CUDA driver and NCCL libraries load and `devices` CUDA devices are visible.
    Available {
        /// Number of CUDA devices.
        devices: usize,
    },
    /// The backend cannot run; the reason starts with `skipped:`.
    Skipped(String),
}

/// Checks, without panicking, that libcuda and libnccl can be loaded (cudarc
/// `is_culib_present`; cudarc looks for `libnccl.so`, so a `libnccl.so -> libnccl.so.2` symlink
/// may be needed) and that a CUDA device exists.
pub fn availability() -> NcclAvailability {
    // SAFETY: only tries to dlopen the library names; calls nothing in them.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return NcclAvailability::Skipped("skipped: no CUDA device (libcuda not found)".into());
    }
    // SAFETY: as above.
    if !unsafe { cudarc::nccl::sys::is_culib_present() } {
        return NcclAvailability::Skipped(
            "skipped: no NCCL library (libnccl.so not found; a symlink to libnccl.so.2 may be \
             needed)"
                .into(),
        );
    }
    match CudaContext::device_count() {
        Ok(n) if n > 0 => NcclAvailability::Available {
            devices: n as usize,
        },
        Ok(_) => NcclAvailability::Skipped("skipped: no CUDA device".into()),
        Err(e) => NcclAvailability::Skipped(format!("skipped: no CUDA device ({e:?})")),
    }
}

fn nccl_err(what: &str, e: impl std::fmt::Debug) -> CommError {
    CommError::Nccl(format!("{what}: {e:?}"))
}

/// One NCCL communicator (one GPU per rank) plus its control communicator.
pub struct NcclComm {
    control: Box<dyn Communicator>,
    comm: Comm,
    stream: Arc<CudaStream>,
    ordinal: usize,
    rank: usize,
    size: usize,
    seq: Cell<u64>,
}

impl std::fmt::Debug for NcclComm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NcclComm")
            .field("rank", &self.rank)
            .field("size", &self.size)
            .field("device", &self.ordinal)
            .finish()
    }
}

impl NcclComm {
    /// Collective over `bootstrap`: every rank checks [`availability`] and the results are
    /// combined, so either every rank gets `Ok(Some(comm))` or every rank gets `Ok(None)` (some
    /// rank has no device: use `bootstrap`'s backend instead). The device is
    /// `bootstrap.rank() % devices` (one GPU per rank; NCCL refuses two ranks on one GPU).
    ///
    /// Errors: a collective of `bootstrap` failed, or CUDA/NCCL initialisation failed.
    pub fn select(bootstrap: &dyn Communicator) -> Result<Option<NcclComm>> {
        let local = availability();
        let mut ok = [u8::from(matches!(
            local,
            NcclAvailability::Available { .. }
        ))];
        bootstrap.all_reduce_raw(&mut ok, DType::U8, ReduceOp::Min)?;
        match local {
            NcclAvailability::Available { devices } if ok[0] == 1 => {
                Self::new(bootstrap, bootstrap.rank() % devices).map(Some)
            }
            _ => Ok(None),
        }
    }

    /// Collective over `bootstrap`: creates this rank's NCCL communicator on CUDA device
    /// `device_ordinal`. Call [`availability`] (or use [`NcclComm::select`]) first: without a
    /// device this returns an error (it never calls into a missing library).
    ///
    /// Errors: no CUDA/NCCL (`CommError::Nccl`, "skipped: ..."), a bootstrap collective failed,
    /// CUDA context or NCCL communicator creation failed.
    pub fn new(bootstrap: &dyn Communicator, device_ordinal: usize) -> Result<NcclComm> {
        let control = bootstrap.split(0, bootstrap.rank())?;
        Self::with_control(control, device_ordinal)
    }

    fn with_control(control: Box<dyn Communicator>, ordinal: usize) -> Result<NcclComm> {
        let (rank, size) = (control.rank(), control.size());
        // Agree on availability first so no rank is left in the id broadcast.
        let local = availability();
        let mut ok = [u8::from(matches!(
            local,
            NcclAvailability::Available { .. }
        ))];
        control.all_reduce_raw(&mut ok, DType::U8, ReduceOp::Min)?;
        if ok[0] == 0 {
            return Err(CommError::Nccl(match local {
                NcclAvailability::Skipped(why) => why,
                NcclAvailability::Available { .. } => {
                    "skipped: another rank has no CUDA device".into()
                }
            }));
        }
        let mut id = [0u8; 128];
        let made = if rank == 0 {
            Id::new()
                .map(|id| *id.internal())
                .map_err(|e| nccl_err("ncclGetUniqueId", e))
        } else {
            Ok([0; 128])
        };
        if let Ok(internal) = &made {
            for (d, s) in id.iter_mut().zip(internal.iter()) {
                *d = *s as u8;
            }
        }
        control.broadcast_raw(&mut id, DType::U8, 0)?;
        made?;
        let internal = id.map(|b| b as std::ffi::c_char);
        let ctx = CudaContext::new(ordinal).map_err(|e| nccl_err("cuda context", e))?;
        let stream = ctx.default_stream();
        let comm = Comm::from_rank(stream.clone(), rank, size, Id::uninit(internal))
            .map_err(|e| nccl_err("ncclCommInitRank", e))?;
        Ok(NcclComm {
            control,
            comm,
            stream,
            ordinal,
            rank,
            size,
            seq: Cell::new(0),
        })
    }

    /// Exchanges call descriptors over the control communicator (as bytes) and checks them on
    /// every rank (identically), like the MPI backend.
    fn exchange(&self, call: &Call, data_len: usize) -> Result<()> {
        let seq = self.seq.get();
        self.seq.set(seq + 1);
        let local = local_check(call, self.rank, self.size, data_len).err();
        let words = encode(call, local.as_ref());
        let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
        let lens_b = self.control.all_gather_raw(
            &(bytes.len() as u64).to_le_bytes(),
            &vec![8; self.size],
            DType::U8,
        )?;
        let lens: Vec<usize> = pod_vec::<u64>(&lens_b)
            .iter()
            .map(|&l| l as usize)
            .collect();
        let all = self.control.all_gather_raw(&bytes, &lens, DType::U8)?;
        let mut calls = Vec::with_capacity(self.size);
        let mut locals = Vec::with_capacity(self.size);
        let mut start = 0;
        for (r, &l) in lens.iter().enumerate() {
            let w: Vec<u64> = pod_vec(&all[start..start + l]);
            let (c, e) = decode(&w, r)?;
            calls.push(c);
            locals.push(if r == self.rank { local.clone() } else { e });
            start += l;
        }
        cross_check(self.rank, seq, &calls, &locals)
    }

    fn sync(&self) -> Result<()> {
        self.stream
            .synchronize()
            .map_err(|e| nccl_err("stream synchronize", e))
    }

    fn to_device<T: DeviceRepr>(&self, host: &[T]) -> Result<CudaSlice<T>> {
        self.stream
            .clone_htod(host)
            .map_err(|e| nccl_err("copy to device", e))
    }

    fn to_host<T: DeviceRepr>(&self, dev: &CudaSlice<T>) -> Result<Vec<T>> {
        let v = self
            .stream
            .clone_dtoh(dev)
            .map_err(|e| nccl_err("copy to host", e))?;
        self.sync()?;
        Ok(v)
    }

    fn all_reduce_typed<T: NcclType + DeviceRepr + bytemuck::Pod>(
        &self,
        host: Vec<T>,
        op: ReduceOp,
    ) -> Result<Vec<T>> {
        let mut d = self.to_device(&host)?;
        self.comm
            .all_reduce_in_place(&mut d, &nccl_op(op))
            .map_err(|e| nccl_err("ncclAllReduce", e))?;
        self.to_host(&d)
    }

    /// Padded reduce_scatter: `send` holds `size` blocks of `m` elements; returns block `rank`.
    fn reduce_scatter_typed<T: NcclType + DeviceRepr + ValidAsZeroBits + bytemuck::Pod>(
        &self,
        send: Vec<T>,
        m: usize,
        op: ReduceOp,
    ) -> Result<Vec<T>> {
        let d_send = self.to_device(&send)?;
        let mut d_recv = self
            .stream
            .alloc_zeros::<T>(m)
            .map_err(|e| nccl_err("alloc", e))?;
        self.comm
            .reduce_scatter(&d_send, &mut d_recv, &nccl_op(op))
            .map_err(|e| nccl_err("ncclReduceScatter", e))?;
        self.to_host(&d_recv)
    }

    /// Element-wise reduction of a host byte buffer of `dtype`, returned as bytes.
    fn reduce_bytes(&self, buf: &[u8], dtype: DType, op: ReduceOp) -> Result<Vec<u8>> {
        Ok(match dtype {
            DType::F32 => {
                bytemuck::cast_slice(&self.all_reduce_typed::<f32>(pod_vec(buf), op)?).to_vec()
            }
            DType::F64 => {
                bytemuck::cast_slice(&self.all_reduce_typed::<f64>(pod_vec(buf), op)?).to_vec()
            }
            DType::U8 => self.all_reduce_typed::<u8>(buf.to_vec(), op)?,
            DType::BF16 => {
                let wide = widen_bf16(buf);
                let out = self.all_reduce_typed::<f32>(wide, op)?;
                narrow_bf16(&out)
            }
        })
    }
}

fn widen_bf16(buf: &[u8]) -> Vec<f32> {
    pod_vec::<half::bf16>(buf)
        .iter()
        .map(|x| x.to_f32())
        .collect()
}

fn narrow_bf16(xs: &[f32]) -> Vec<u8> {
    let v: Vec<half::bf16> = xs.iter().map(|&x| half::bf16::from_f32(x)).collect();
    bytemuck::cast_slice(&v).to_vec()
}

fn nccl_op(op: ReduceOp) -> cudarc::nccl::ReduceOp {
    match op {
        ReduceOp::Sum => cudarc::nccl::ReduceOp::Sum,
        ReduceOp::Max => cudarc::nccl::ReduceOp::Max,
        ReduceOp::Min => cudarc::nccl::ReduceOp::Min,
    }
}

/// Rank-major blocks of `counts[r] * esize` bytes, each padded with zeros to `m * esize`.
fn pad_blocks(data: &[u8], counts: &[usize], m: usize, esize: usize) -> Vec<u8> {
    let mut out = vec![0u8; counts.len() * m * esize];
    let mut off = 0;
    for (r, &c) in counts.iter().enumerate() {
        let n = c * esize;
        out[r * m * esize..r * m * esize + n].copy_from_slice(&data[off..off + n]);
        off += n;
    }
    out
}

impl Communicator for NcclComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.size
    }

    fn backend(&self) -> &'static str {
        "nccl"
    }

    fn barrier(&self) -> Result<()> {
        self.exchange(&Call::Barrier, 0)?;
        self.control.barrier()
    }

    fn broadcast_raw(&self, buf: &mut [u8], dtype: DType, root: usize) -> Result<()> {
        let call = Call::Broadcast {
            dtype,
            count: buf.len() / dtype.size(),
            root,
        };
        self.exchange(&call, buf.len())?;
        if buf.is_empty() {
            return Ok(());
        }
        let mut d = self.to_device(buf)?;
        self.comm
            .broadcast_in_place(&mut d, root as i32)
            .map_err(|e| nccl_err("ncclBroadcast", e))?;
        let out = self.to_host(&d)?;
        buf.copy_from_slice(&out);
        Ok(())
    }

    fn all_reduce_raw(&self, buf: &mut [u8], dtype: DType, op: ReduceOp) -> Result<()> {
        let call = Call::AllReduce {
            dtype,
            count: buf.len() / dtype.size(),
            op,
        };
        self.exchange(&call, buf.len())?;
        if buf.is_empty() {
            return Ok(());
        }
        let out = self.reduce_bytes(buf, dtype, op)?;
        buf.copy_from_slice(&out);
        Ok(())
    }

    fn all_gather_raw(&self, send: &[u8], counts: &[usize], dtype: DType) -> Result<Vec<u8>> {
        let call = Call::AllGather {
            dtype,
            counts: counts.to_vec(),
        };
        self.exchange(&call, send.len())?;
        let es = dtype.size();
        let m = counts.iter().copied().max().unwrap_or(0);
        if m == 0 {
            return Ok(Vec::new());
        }
        let mut padded = send.to_vec();
        padded.resize(m * es, 0);
        let d_send = self.to_device(&padded)?;
        let mut d_recv = self
            .stream
            .alloc_zeros::<u8>(self.size * m * es)
            .map_err(|e| nccl_err("alloc", e))?;
        self.comm
            .all_gather(&d_send, &mut d_recv)
            .map_err(|e| nccl_err("ncclAllGather", e))?;
        let all = self.to_host(&d_recv)?;
        let mut out = Vec::with_capacity(counts.iter().sum::<usize>() * es);
        for (r, &c) in counts.iter().enumerate() {
            out.extend_from_slice(&all[r * m * es..r * m * es + c * es]);
        }
        Ok(out)
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
        let es = dtype.size();
        let m = counts.iter().copied().max().unwrap_or(0);
        if m == 0 {
            return Ok(Vec::new());
        }
        let padded = pad_blocks(send, counts, m, es);
        let mine = counts[self.rank] * es;
        let mut block = match dtype {
            DType::F32 => {
                bytemuck::cast_slice(&self.reduce_scatter_typed::<f32>(pod_vec(&padded), m, op)?)
                    .to_vec()
            }
            DType::F64 => {
                bytemuck::cast_slice(&self.reduce_scatter_typed::<f64>(pod_vec(&padded), m, op)?)
                    .to_vec()
            }
            DType::U8 => self.reduce_scatter_typed::<u8>(padded, m, op)?,
            DType::BF16 => {
                let out = self.reduce_scatter_typed::<f32>(widen_bf16(&padded), m, op)?;
                narrow_bf16(&out)
            }
        };
        block.truncate(mine);
        Ok(block)
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
        let es = dtype.size();
        let send_bufs = send_counts
            .iter()
            .scan(0usize, |off, &c| {
                let s = *off;
                *off += c * es;
                Some((s, c * es))
            })
            .filter(|&(_, n)| n > 0)
            .map(|(s, n)| self.to_device(&send[s..s + n]))
            .collect::<Result<Vec<_>>>()?;
        let mut recv_bufs = recv_counts
            .iter()
            .map(|&c| {
                if c == 0 {
                    Ok(None)
                } else {
                    self.stream
                        .alloc_zeros::<u8>(c * es)
                        .map(Some)
                        .map_err(|e| nccl_err("alloc", e))
                }
            })
            .collect::<Result<Vec<_>>>()?;
        {
            let mut group = self.comm.group();
            let senders = send_counts.iter().enumerate().filter(|(_, &c)| c > 0);
            for ((peer, _), buf) in senders.zip(send_bufs.iter()) {
                group
                    .send(buf.slice(..), peer as i32)
                    .map_err(|e| nccl_err("ncclSend", e))?;
            }
            for (peer, buf) in recv_bufs.iter_mut().enumerate() {
                if let Some(buf) = buf {
                    group
                        .recv(buf.slice_mut(..), peer as i32)
                        .map_err(|e| nccl_err("ncclRecv", e))?;
                }
            }
        } // ncclGroupEnd
        let mut out = Vec::with_capacity(recv_counts.iter().sum::<usize>() * es);
        for buf in recv_bufs.iter().flatten() {
            out.extend(self.to_host(buf)?);
        }
        Ok(out)
    }

    fn split(&self, color: usize, key: usize) -> Result<Box<dyn Communicator>> {
        self.exchange(&Call::Split { color, key }, 0)?;
        let sub = self.control.split(color, key)?;
        Ok(Box::new(NcclComm::with_control(sub, self.ordinal)?))
    }
}
