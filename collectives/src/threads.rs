//! In-process backend: N ranks in one process, one OS thread each.
//!
//! Every collective is a rendezvous on a shared `Mutex` + `Condvar` with a generation
//! (sequence) counter: each rank deposits its call and a copy of its send bytes; when all have
//! deposited, every rank reads all deposits, checks that the calls agree
//! ([`CommError::Mismatch`], [`CommError::CountMismatch`], [`CommError::InvalidArgument`]) and
//! computes its own result. Reductions combine inputs in rank order, so results are
//! deterministic.
//!
//! Failure handling: each collective waits at most `timeout` (default 60 s; the environment
//! variable `COLLECTIVES_TIMEOUT_SECS` overrides it, as a decimal number of seconds; an
//! unparsable value is ignored) and then fails with [`CommError::Timeout`] naming the op, its
//! sequence number and the missing ranks. When a rank's communicator is dropped (its thread
//! returned or panicked) the others fail at once with [`CommError::PeerGone`]. After a timeout
//! or a dropped peer the communicator is poisoned: later calls fail with
//! [`CommError::Poisoned`].
//!
//! Sub-communicators ([`Communicator::split`]) get their own rendezvous, found through a
//! registry in the parent keyed by (split sequence number, color).
//!
//! Traffic: every byte a rank copies out of a peer's deposit is counted on a [`TrafficMeter`]
//! (received on the reader, sent on the peer whose deposit it is); a rank's own deposit is not
//! counted. Sub-communicators count on the meter of the handle they were split from, so
//! [`ThreadComm::traffic`] gives all the bytes a rank moved. The volumes are those of this
//! backend's algorithms: all_gather and all_to_all move each block once per receiving peer,
//! reduce_scatter reads each rank's block from every peer, broadcast reads the root's buffer,
//! and all_reduce is a reduce-scatter of `k` near-equal blocks (the first `n % k` one element
//! longer) followed by an all-gather of the reduced blocks (a second collective on the same
//! communicator), so rank r moves `n + (k-2) * b_r` elements each way, `2(k-1)/k * n` when `k`
//! divides `n`: the volume of a ring all-reduce. Each element is still reduced in rank order.

use crate::call::{cross_check, local_check, Call};
use crate::communicator::Communicator;
use crate::dtype::{DType, ReduceOp};
use crate::error::{CommError, Result};
use crate::reduce::reduce_range;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

/// Default per-collective timeout.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

/// Environment variable overriding [`DEFAULT_TIMEOUT`] (seconds, decimal allowed).
pub const TIMEOUT_ENV: &str = "COLLECTIVES_TIMEOUT_SECS";

/// Bytes one rank moved through the threads backend (see the module doc). Counters only grow;
/// read them after the ranks have joined (or after a barrier), when no peer is still reading.
#[derive(Debug, Default)]
pub struct TrafficMeter {
    sent: AtomicU64,
    received: AtomicU64,
}

impl TrafficMeter {
    /// Bytes peers copied out of this rank's deposits.
    pub fn sent_bytes(&self) -> u64 {
        self.sent.load(Ordering::SeqCst)
    }

    /// Bytes this rank copied out of peers' deposits.
    pub fn received_bytes(&self) -> u64 {
        self.received.load(Ordering::SeqCst)
    }
}

/// One rank's contribution to a collective.
struct Deposit {
    call: Call,
    local_error: Option<CommError>,
    data: Vec<u8>,
    meter: Arc<TrafficMeter>,
}

struct State {
    /// Sequence number of the collective currently being collected or read.
    seq: u64,
    /// All ranks deposited `seq`; ranks are reading `completed`.
    reading: bool,
    deposits: Vec<Option<Deposit>>,
    completed: Option<Arc<Vec<Deposit>>>,
    readers_left: usize,
    alive: Vec<bool>,
    failure: Option<String>,
    /// Sub-communicators being handed out: (split seq, color) -> (rendezvous, fetches left).
    splits: HashMap<(u64, usize), (Arc<Shared>, usize)>,
}

struct Shared {
    size: usize,
    state: Mutex<State>,
    cv: Condvar,
}

impl Shared {
    fn new(size: usize) -> Arc<Self> {
        Arc::new(Shared {
            size,
            state: Mutex::new(State {
                seq: 0,
                reading: false,
                deposits: (0..size).map(|_| None).collect(),
                completed: None,
                readers_left: 0,
                alive: vec![true; size],
                failure: None,
                splits: HashMap::new(),
            }),
            cv: Condvar::new(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // No code panics while holding the lock; if it ever did, the state is still consistent
        // enough to report errors, so recover the guard instead of propagating the poison.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// One rank's handle on an in-process communicator. `Send` (not `Sync`): move it to the thread
/// that plays the rank. Dropping it tells the other ranks that this rank is gone.
pub struct ThreadComm {
    shared: Arc<Shared>,
    rank: usize,
    timeout: Duration,
    next_seq: AtomicU64,
    meter: Arc<TrafficMeter>,
}

impl std::fmt::Debug for ThreadComm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ThreadComm")
            .field("rank", &self.rank)
            .field("size", &self.shared.size)
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl Drop for ThreadComm {
    fn drop(&mut self) {
        let mut st = self.shared.lock();
        if let Some(a) = st.alive.get_mut(self.rank) {
            *a = false;
        }
        drop(st);
        self.shared.cv.notify_all();
    }
}

/// The timeout from `COLLECTIVES_TIMEOUT_SECS`, else [`DEFAULT_TIMEOUT`].
pub fn default_timeout() -> Duration {
    std::env::var(TIMEOUT_ENV)
        .ok()
        .and_then(|s| s.trim().parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s > 0.0)
        .map(Duration::from_secs_f64)
        .unwrap_or(DEFAULT_TIMEOUT)
}

impl ThreadComm {
    /// Creates the `world_size` handles of a new world (rank `r` at index `r`). Use this instead
    /// of [`spawn_world`] to run ranks on threads you manage yourself.
    pub fn new_world(world_size: usize, timeout: Duration) -> Vec<ThreadComm> {
        let shared = Shared::new(world_size);
        (0..world_size)
            .map(|rank| ThreadComm {
                shared: Arc::clone(&shared),
                rank,
                timeout,
                next_seq: AtomicU64::new(0),
                meter: Arc::default(),
            })
            .collect()
    }

    /// The per-collective timeout.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// This rank's traffic counters (shared with the sub-communicators split from it).
    pub fn traffic(&self) -> Arc<TrafficMeter> {
        Arc::clone(&self.meter)
    }

    /// `bytes` of `done[from]`'s deposit, counted as moved from `from` to this rank unless
    /// `from` is this rank.
    fn read<'a>(&self, done: &'a [Deposit], from: usize, bytes: &'a [u8]) -> &'a [u8] {
        if from != self.rank {
            let n = bytes.len() as u64;
            self.meter.received.fetch_add(n, Ordering::SeqCst);
            done[from].meter.sent.fetch_add(n, Ordering::SeqCst);
        }
        bytes
    }

    /// Deposits this rank's call and waits until all ranks deposited; returns the sequence
    /// number and all deposits in rank order (after the cross-rank checks).
    fn rendezvous(
        &self,
        call: Call,
        data: Vec<u8>,
        data_len: usize,
    ) -> Result<(u64, Arc<Vec<Deposit>>)> {
        let op = call.name();
        let local_error = local_check(&call, self.rank, self.shared.size, data_len).err();
        let seq = self.next_seq.fetch_add(1, Ordering::Relaxed);
        let start = Instant::now();
        let deadline = start + self.timeout;
        let shared = &*self.shared;
        let mut st = shared.lock();

        // Phase 1: wait until the previous collective has been read by everyone.
        loop {
            if let Some(reason) = &st.failure {
                return Err(CommError::Poisoned {
                    op,
                    reason: reason.clone(),
                });
            }
            if st.seq == seq && !st.reading {
                break;
            }
            if st.seq > seq {
                return Err(CommError::Internal(format!(
                    "{op}: rank {} is at collective #{seq} but the communicator is at #{}",
                    self.rank, st.seq
                )));
            }
            st = self.wait(st, op, seq, start, deadline)?;
        }

        // Phase 2: deposit and wait for everyone.
        if let Some(slot) = st.deposits.get_mut(self.rank) {
            *slot = Some(Deposit {
                call,
                local_error,
                data,
                meter: Arc::clone(&self.meter),
            });
        }
        if st.deposits.iter().all(Option::is_some) {
            let all: Vec<Deposit> = st.deposits.iter_mut().filter_map(Option::take).collect();
            st.completed = Some(Arc::new(all));
            st.reading = true;
            st.readers_left = shared.size;
            shared.cv.notify_all();
        }
        loop {
            if st.reading && st.seq == seq {
                let Some(done) = st.completed.clone() else {
                    return Err(CommError::Internal(format!(
                        "{op}: collective #{seq} completed without deposits"
                    )));
                };
                st.readers_left -= 1;
                if st.readers_left == 0 {
                    st.reading = false;
                    st.completed = None;
                    st.seq += 1;
                    shared.cv.notify_all();
                }
                drop(st);
                let calls: Vec<Call> = done.iter().map(|d| d.call.clone()).collect();
                let local: Vec<Option<CommError>> =
                    done.iter().map(|d| d.local_error.clone()).collect();
                cross_check(self.rank, seq, &calls, &local)?;
                return Ok((seq, done));
            }
            if let Some(reason) = &st.failure {
                return Err(CommError::Poisoned {
                    op,
                    reason: reason.clone(),
                });
            }
            st = self.wait(st, op, seq, start, deadline)?;
        }
    }

    /// One condvar wait with the dead-peer and timeout checks; on failure poisons the
    /// communicator and wakes everyone.
    fn wait<'a>(
        &self,
        mut st: MutexGuard<'a, State>,
        op: &'static str,
        seq: u64,
        start: Instant,
        deadline: Instant,
    ) -> Result<MutexGuard<'a, State>> {
        let dead: Vec<usize> = st
            .alive
            .iter()
            .enumerate()
            .filter(|(_, a)| !**a)
            .map(|(r, _)| r)
            .collect();
        let err = if !dead.is_empty() {
            Some(CommError::PeerGone {
                op,
                seq,
                ranks: dead,
            })
        } else if Instant::now() >= deadline {
            let missing: Vec<usize> = if st.seq == seq && !st.reading {
                st.deposits
                    .iter()
                    .enumerate()
                    .filter(|(_, d)| d.is_none())
                    .map(|(r, _)| r)
                    .collect()
            } else {
                // Still waiting for the previous collective: report who never finished it.
                (0..self.shared.size).collect()
            };
            Some(CommError::Timeout {
                op,
                seq,
                waited: start.elapsed(),
                missing,
            })
        } else {
            None
        };
        if let Some(e) = err {
            st.failure = Some(format!("rank {}: {e}", self.rank));
            drop(st);
            self.shared.cv.notify_all();
            return Err(e);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        let (st, _) = self
            .shared
            .cv
            .wait_timeout(st, left)
            .unwrap_or_else(PoisonError::into_inner);
        Ok(st)
    }
}

/// The all-reduce blocks of `count` elements on `size` ranks: near-equal, the first
/// `count % size` one element longer.
fn ring_blocks(count: usize, size: usize) -> Vec<usize> {
    (0..size)
        .map(|r| count / size + usize::from(r < count % size))
        .collect()
}

/// Byte offset of element block `idx` in a buffer laid out by `counts`.
fn block(counts: &[usize], idx: usize, dsize: usize) -> (usize, usize) {
    let start: usize = counts[..idx].iter().sum();
    (start * dsize, counts[idx] * dsize)
}

impl Communicator for ThreadComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.shared.size
    }

    fn backend(&self) -> &'static str {
        "threads"
    }

    fn barrier(&self) -> Result<()> {
        self.rendezvous(Call::Barrier, Vec::new(), 0).map(|_| ())
    }

    fn broadcast_raw(&self, buf: &mut [u8], dtype: DType, root: usize) -> Result<()> {
        let count = buf.len() / dtype.size();
        let data = if self.rank == root {
            buf.to_vec()
        } else {
            Vec::new()
        };
        let call = Call::Broadcast { dtype, count, root };
        let (_, done) = self.rendezvous(call, data, buf.len())?;
        let src = self.read(&done, root, &done[root].data);
        if src.len() != buf.len() {
            return Err(CommError::Internal(format!(
                "broadcast: root sent {} bytes, buffer has {}",
                src.len(),
                buf.len()
            )));
        }
        buf.copy_from_slice(src);
        Ok(())
    }

    fn all_reduce_raw(&self, buf: &mut [u8], dtype: DType, op: ReduceOp) -> Result<()> {
        let count = buf.len() / dtype.size();
        let call = Call::AllReduce { dtype, count, op };
        let (_, done) = self.rendezvous(call, buf.to_vec(), buf.len())?;
        // Reduce-scatter: this rank reduces its block of every rank's buffer (rank order).
        let blocks = ring_blocks(count, self.shared.size);
        let (start, len) = block(&blocks, self.rank, dtype.size());
        let inputs: Vec<&[u8]> = done
            .iter()
            .enumerate()
            .map(|(r, d)| self.read(&done, r, d.data.get(start..start + len).unwrap_or(&[])))
            .collect();
        let mine = reduce_range(dtype, op, &inputs, 0, len);
        drop(inputs);
        drop(done);
        // All-gather of the reduced blocks.
        let out = self.all_gather_raw(&mine, &blocks, dtype)?;
        if out.len() != buf.len() {
            return Err(CommError::Internal(format!(
                "all_reduce: gathered {} bytes for a buffer of {}",
                out.len(),
                buf.len()
            )));
        }
        buf.copy_from_slice(&out);
        Ok(())
    }

    fn all_gather_raw(&self, send: &[u8], counts: &[usize], dtype: DType) -> Result<Vec<u8>> {
        let call = Call::AllGather {
            dtype,
            counts: counts.to_vec(),
        };
        let (_, done) = self.rendezvous(call, send.to_vec(), send.len())?;
        Ok(done
            .iter()
            .enumerate()
            .flat_map(|(r, d)| self.read(&done, r, &d.data).iter().copied())
            .collect())
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
        let (_, done) = self.rendezvous(call, send.to_vec(), send.len())?;
        let (start, len) = block(counts, self.rank, dtype.size());
        let inputs: Vec<&[u8]> = done
            .iter()
            .enumerate()
            .map(|(r, d)| self.read(&done, r, d.data.get(start..start + len).unwrap_or(&[])))
            .collect();
        Ok(reduce_range(dtype, op, &inputs, 0, len))
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
        let (_, done) = self.rendezvous(call, send.to_vec(), send.len())?;
        let mut out = Vec::with_capacity(recv_counts.iter().sum::<usize>() * dtype.size());
        for (r, d) in done.iter().enumerate() {
            let Call::AllToAll { send_counts, .. } = &d.call else {
                return Err(CommError::Internal("all_to_all: peer call changed".into()));
            };
            let (start, len) = block(send_counts, self.rank, dtype.size());
            out.extend_from_slice(self.read(&done, r, &d.data[start..start + len]));
        }
        Ok(out)
    }

    fn split(&self, color: usize, key: usize) -> Result<Box<dyn Communicator>> {
        let (seq, done) = self.rendezvous(Call::Split { color, key }, Vec::new(), 0)?;
        let mut members: Vec<(usize, usize)> = done
            .iter()
            .enumerate()
            .filter_map(|(r, d)| match d.call {
                Call::Split { color: c, key: k } if c == color => Some((k, r)),
                _ => None,
            })
            .collect();
        members.sort_unstable();
        let new_rank = members
            .iter()
            .position(|&(_, r)| r == self.rank)
            .ok_or_else(|| {
                CommError::Internal(format!("split: rank {} not in its group", self.rank))
            })?;
        let n = members.len();
        let sub = {
            let mut st = self.shared.lock();
            let entry = st
                .splits
                .entry((seq, color))
                .or_insert_with(|| (Shared::new(n), n));
            let sub = Arc::clone(&entry.0);
            entry.1 -= 1;
            if entry.1 == 0 {
                st.splits.remove(&(seq, color));
            }
            sub
        };
        Ok(Box::new(ThreadComm {
            shared: sub,
            rank: new_rank,
            timeout: self.timeout,
            next_seq: AtomicU64::new(0),
            meter: Arc::clone(&self.meter),
        }))
    }
}

/// Runs `f` on `world_size` threads, each with its rank's communicator, and returns each
/// thread's outcome in rank order (`Err` holds the panic payload). Uses [`default_timeout`].
pub fn spawn_world<R: Send>(
    world_size: usize,
    f: impl Fn(Box<dyn Communicator>) -> R + Sync,
) -> Vec<std::thread::Result<R>> {
    spawn_world_with_timeout(world_size, default_timeout(), f)
}

/// [`spawn_world`] with an explicit per-collective timeout.
pub fn spawn_world_with_timeout<R: Send>(
    world_size: usize,
    timeout: Duration,
    f: impl Fn(Box<dyn Communicator>) -> R + Sync,
) -> Vec<std::thread::Result<R>> {
    let comms = ThreadComm::new_world(world_size, timeout);
    let f = &f;
    std::thread::scope(|s| {
        let handles: Vec<_> = comms
            .into_iter()
            .map(|c| s.spawn(move || f(Box::new(c))))
            .collect();
        handles.into_iter().map(|h| h.join()).collect()
    })
}
