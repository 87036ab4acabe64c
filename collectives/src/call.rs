//! Description of one collective call, the per-rank argument checks, and the cross-rank
//! consistency checks. Shared by both backends so they report identical errors.

use crate::dtype::{DType, ReduceOp};
use crate::error::{CommError, Result};
use std::fmt;

/// One rank's collective call (arguments only, no data).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Call {
    Barrier,
    Broadcast {
        dtype: DType,
        count: usize,
        root: usize,
    },
    AllReduce {
        dtype: DType,
        count: usize,
        op: ReduceOp,
    },
    AllGather {
        dtype: DType,
        counts: Vec<usize>,
    },
    ReduceScatter {
        dtype: DType,
        counts: Vec<usize>,
        op: ReduceOp,
    },
    AllToAll {
        dtype: DType,
        send_counts: Vec<usize>,
        recv_counts: Vec<usize>,
    },
    Split {
        color: usize,
        key: usize,
    },
}

impl Call {
    /// Operation name as used in error messages.
    pub(crate) fn name(&self) -> &'static str {
        match self {
            Call::Barrier => "barrier",
            Call::Broadcast { .. } => "broadcast",
            Call::AllReduce { .. } => "all_reduce",
            Call::AllGather { .. } => "all_gather",
            Call::ReduceScatter { .. } => "reduce_scatter",
            Call::AllToAll { .. } => "all_to_all",
            Call::Split { .. } => "split",
        }
    }

    /// Whether two ranks' calls are compatible: identical, except that `all_to_all` count lists
    /// are per rank (checked separately) and `split` color/key are per rank.
    fn compatible(&self, other: &Call) -> bool {
        match (self, other) {
            (Call::AllToAll { dtype: a, .. }, Call::AllToAll { dtype: b, .. }) => a == b,
            (Call::Split { .. }, Call::Split { .. }) => true,
            _ => self == other,
        }
    }
}

impl fmt::Display for Call {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Call::Barrier => write!(f, "barrier()"),
            Call::Broadcast { dtype, count, root } => {
                write!(f, "broadcast(dtype={dtype:?}, count={count}, root={root})")
            }
            Call::AllReduce { dtype, count, op } => {
                write!(f, "all_reduce(dtype={dtype:?}, count={count}, op={op:?})")
            }
            Call::AllGather { dtype, counts } => {
                write!(f, "all_gather(dtype={dtype:?}, counts={counts:?})")
            }
            Call::ReduceScatter { dtype, counts, op } => {
                write!(
                    f,
                    "reduce_scatter(dtype={dtype:?}, counts={counts:?}, op={op:?})"
                )
            }
            Call::AllToAll {
                dtype,
                send_counts,
                recv_counts,
            } => write!(
                f,
                "all_to_all(dtype={dtype:?}, send_counts={send_counts:?}, recv_counts={recv_counts:?})"
            ),
            Call::Split { color, key } => write!(f, "split(color={color}, key={key})"),
        }
    }
}

/// Sum of a count list, or an error naming the overflow.
pub(crate) fn total(op: &'static str, rank: usize, counts: &[usize]) -> Result<usize> {
    counts
        .iter()
        .try_fold(0usize, |acc, &c| acc.checked_add(c))
        .ok_or_else(|| CommError::InvalidArgument {
            op,
            rank,
            reason: format!("sum of counts {counts:?} overflows usize"),
        })
}

/// Checks one rank's arguments on their own. `data_len` is the byte length of the send (or
/// in/out) buffer. The returned error is deposited with the call so that every rank reports it.
pub(crate) fn local_check(call: &Call, rank: usize, size: usize, data_len: usize) -> Result<()> {
    let op = call.name();
    let bad = |reason: String| CommError::InvalidArgument { op, rank, reason };
    let expect_len = |dtype: DType, elems: usize, what: &str| -> Result<()> {
        let want = elems.checked_mul(dtype.size()).ok_or_else(|| {
            bad(format!(
                "{what}: {elems} elements of {dtype:?} overflow the byte count"
            ))
        })?;
        if want != data_len {
            return Err(bad(format!(
                "{what}: expected {elems} {dtype:?} elements ({want} bytes), got {data_len} bytes"
            )));
        }
        Ok(())
    };
    let expect_list = |counts: &[usize], what: &str| -> Result<()> {
        if counts.len() != size {
            return Err(bad(format!(
                "{what} has {} entries, communicator size is {size}",
                counts.len()
            )));
        }
        Ok(())
    };
    match call {
        Call::Barrier => Ok(()),
        Call::Broadcast { dtype, count, root } => {
            if *root >= size {
                return Err(bad(format!("root {root} out of range for size {size}")));
            }
            expect_len(*dtype, *count, "buffer")
        }
        Call::AllReduce { dtype, count, .. } => expect_len(*dtype, *count, "buffer"),
        Call::AllGather { dtype, counts } => {
            expect_list(counts, "counts")?;
            expect_len(*dtype, counts[rank], "send buffer (counts[rank])")
        }
        Call::ReduceScatter { dtype, counts, .. } => {
            expect_list(counts, "counts")?;
            expect_len(
                *dtype,
                total(op, rank, counts)?,
                "send buffer (sum(counts))",
            )
        }
        Call::AllToAll {
            dtype,
            send_counts,
            recv_counts,
        } => {
            expect_list(send_counts, "send_counts")?;
            expect_list(recv_counts, "recv_counts")?;
            total(op, rank, recv_counts)?;
            expect_len(
                *dtype,
                total(op, rank, send_counts)?,
                "send buffer (sum(send_counts))",
            )
        }
        Call::Split { color, key } => {
            // Both backends limit color and key to MPI's non-negative `int` range.
            let max = i32::MAX as usize;
            if *color > max || *key > max {
                return Err(bad(format!(
                    "color {color} and key {key} must be <= {max} (MPI int)"
                )));
            }
            Ok(())
        }
    }
}

/// Checks all ranks' calls (in rank order) for consistency; every rank runs this on the same
/// inputs and so returns the same result. `local` holds each rank's [`local_check`] failure.
pub(crate) fn cross_check(
    me: usize,
    seq: u64,
    calls: &[Call],
    local: &[Option<CommError>],
) -> Result<()> {
    if let Some(err) = local.iter().flatten().next() {
        return Err(err.clone());
    }
    let my_op = calls.get(me).map(Call::name).unwrap_or("collective");
    let Some(first) = calls.first() else {
        return Ok(());
    };
    if !calls.iter().all(|c| c.compatible(first)) {
        let listing = calls
            .iter()
            .enumerate()
            .map(|(r, c)| format!("rank {r}: {c}"))
            .collect::<Vec<_>>()
            .join("; ");
        return Err(CommError::Mismatch {
            op: my_op,
            seq,
            calls: listing,
        });
    }
    if let Call::AllToAll { .. } = first {
        for (sender, c) in calls.iter().enumerate() {
            let Call::AllToAll { send_counts, .. } = c else {
                continue;
            };
            for (receiver, &sent) in send_counts.iter().enumerate() {
                let expected = match calls.get(receiver) {
                    Some(Call::AllToAll { recv_counts, .. }) => {
                        recv_counts.get(sender).copied().unwrap_or(0)
                    }
                    _ => 0,
                };
                if sent != expected {
                    return Err(CommError::CountMismatch {
                        seq,
                        sender,
                        receiver,
                        sent,
                        expected,
                    });
                }
            }
        }
    }
    Ok(())
}

/// Encodes a call and its local-check error as `u64` words (MPI backend exchanges these).
#[cfg_attr(not(feature = "mpi"), allow(dead_code))]
pub(crate) fn encode(call: &Call, local: Option<&CommError>) -> Vec<u64> {
    fn dt(d: DType) -> u64 {
        match d {
            DType::F32 => 0,
            DType::F64 => 1,
            DType::BF16 => 2,
            DType::U8 => 3,
        }
    }
    fn rop(o: ReduceOp) -> u64 {
        match o {
            ReduceOp::Sum => 0,
            ReduceOp::Max => 1,
            ReduceOp::Min => 2,
        }
    }
    fn list(w: &mut Vec<u64>, l: &[usize]) {
        w.push(l.len() as u64);
        w.extend(l.iter().map(|&x| x as u64));
    }
    let mut w = Vec::new();
    match call {
        Call::Barrier => w.push(0),
        Call::Broadcast { dtype, count, root } => {
            w.extend([1, dt(*dtype), *count as u64, *root as u64])
        }
        Call::AllReduce { dtype, count, op } => w.extend([2, dt(*dtype), *count as u64, rop(*op)]),
        Call::AllGather { dtype, counts } => {
            w.extend([3, dt(*dtype)]);
            list(&mut w, counts);
        }
        Call::ReduceScatter { dtype, counts, op } => {
            w.extend([4, dt(*dtype), rop(*op)]);
            list(&mut w, counts);
        }
        Call::AllToAll {
            dtype,
            send_counts,
            recv_counts,
        } => {
            w.extend([5, dt(*dtype)]);
            list(&mut w, send_counts);
            list(&mut w, recv_counts);
        }
        Call::Split { color, key } => w.extend([6, *color as u64, *key as u64]),
    }
    match local {
        None => w.push(0),
        Some(e) => {
            let msg = match e {
                CommError::InvalidArgument { reason, .. } => reason.clone(),
                other => other.to_string(),
            };
            w.push(1);
            w.push(msg.len() as u64);
            w.extend(msg.bytes().map(u64::from));
        }
    }
    w
}

/// Decodes [`encode`]'s output. The local error comes back as `InvalidArgument` carrying the
/// original message (`rank` is the sender).
#[cfg_attr(not(feature = "mpi"), allow(dead_code))]
pub(crate) fn decode(words: &[u64], rank: usize) -> Result<(Call, Option<CommError>)> {
    let corrupt = || CommError::Internal(format!("undecodable call descriptor from rank {rank}"));
    let mut it = words.iter().copied();
    let mut next = || it.next().ok_or_else(corrupt);
    let mut next_usize = || -> Result<usize> {
        let v = next()?;
        usize::try_from(v).map_err(|_| corrupt())
    };
    fn dt(v: usize) -> Option<DType> {
        DType::ALL.get(v).copied()
    }
    fn rop(v: usize) -> Option<ReduceOp> {
        ReduceOp::ALL.get(v).copied()
    }
    let list = |next_usize: &mut dyn FnMut() -> Result<usize>| -> Result<Vec<usize>> {
        let n = next_usize()?;
        (0..n).map(|_| next_usize()).collect()
    };
    let kind = next_usize()?;
    let call = match kind {
        0 => Call::Barrier,
        1 => Call::Broadcast {
            dtype: dt(next_usize()?).ok_or_else(corrupt)?,
            count: next_usize()?,
            root: next_usize()?,
        },
        2 => Call::AllReduce {
            dtype: dt(next_usize()?).ok_or_else(corrupt)?,
            count: next_usize()?,
            op: rop(next_usize()?).ok_or_else(corrupt)?,
        },
        3 => Call::AllGather {
            dtype: dt(next_usize()?).ok_or_else(corrupt)?,
            counts: list(&mut next_usize)?,
        },
        4 => {
            let dtype = dt(next_usize()?).ok_or_else(corrupt)?;
            let op = rop(next_usize()?).ok_or_else(corrupt)?;
            Call::ReduceScatter {
                dtype,
                op,
                counts: list(&mut next_usize)?,
            }
        }
        5 => Call::AllToAll {
            dtype: dt(next_usize()?).ok_or_else(corrupt)?,
            send_counts: list(&mut next_usize)?,
            recv_counts: list(&mut next_usize)?,
        },
        6 => Call::Split {
            color: next_usize()?,
            key: next_usize()?,
        },
        _ => return Err(corrupt()),
    };
    let local = match next_usize()? {
        0 => None,
        _ => {
            let n = next_usize()?;
            let bytes: Vec<u8> = (0..n)
                .map(|_| next_usize().map(|b| b as u8))
                .collect::<Result<_>>()?;
            Some(CommError::InvalidArgument {
                op: call.name(),
                rank,
                reason: String::from_utf8_lossy(&bytes).into_owned(),
            })
        }
    };
    Ok((call, local))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encode_decode_roundtrip() {
        let calls = [
            Call::Barrier,
            Call::Broadcast {
                dtype: DType::BF16,
                count: 3,
                root: 1,
            },
            Call::AllReduce {
                dtype: DType::U8,
                count: 0,
                op: ReduceOp::Min,
            },
            Call::AllGather {
                dtype: DType::F64,
                counts: vec![1, 0, 5],
            },
            Call::ReduceScatter {
                dtype: DType::F32,
                counts: vec![2, 2],
                op: ReduceOp::Max,
            },
            Call::AllToAll {
                dtype: DType::F32,
                send_counts: vec![1, 2],
                recv_counts: vec![3, 4],
            },
            Call::Split { color: 7, key: 9 },
        ];
        for c in calls {
            let (d, e) = decode(&encode(&c, None), 0).expect("decodes");
            assert_eq!(d, c);
            assert!(e.is_none());
        }
        let err = CommError::Internal("x".into());
        let (_, e) = decode(&encode(&Call::Barrier, Some(&err)), 3).expect("decodes");
        let msg = e.expect("error kept").to_string();
        assert_eq!(
            msg,
            "barrier: invalid arguments on rank 3: internal error: x"
        );
    }

    #[test]
    fn all_to_all_matrix_mismatch_is_reported() {
        let calls = vec![
            Call::AllToAll {
                dtype: DType::F32,
                send_counts: vec![1, 2],
                recv_counts: vec![1, 3],
            },
            Call::AllToAll {
                dtype: DType::F32,
                send_counts: vec![3, 0],
                recv_counts: vec![1, 0],
            },
        ];
        let err = cross_check(0, 4, &calls, &[None, None]).unwrap_err();
        assert_eq!(
            err,
            CommError::CountMismatch {
                seq: 4,
                sender: 0,
                receiver: 1,
                sent: 2,
                expected: 1
            }
        );
    }
}
