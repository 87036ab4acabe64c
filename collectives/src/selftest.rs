//! Backend-independent checks of a [`Communicator`]: every collective with uneven and zero
//! counts and all four dtypes against a naive single-process computation, splits, mesh-dim
//! sub-communicators, and the error paths (mismatched op / dtype / counts, invalid arguments,
//! `all_to_all` count mismatch) which must fail on EVERY rank and leave the communicator usable.
//!
//! [`run_all`] is collective: call it on every rank of the communicator. Each rank can compute
//! what every other rank contributes (data is a function of rank, index and a salt), so the
//! expected result is computed locally with plain f64 loops. Data is integer-valued and small
//! (|x| <= 5 for floats, `0..40` for `U8`) so every backend and reduction order gives exact,
//! bit-identical results, including bf16.
//!
//! Used by `tests/threads.rs` (threads backend, world sizes 1..=6), by
//! `examples/mpi_selftest.rs` (MPI) and by the conformance suite.

use crate::communicator::{Communicator, CommunicatorExt};
use crate::dtype::{DType, ReduceOp};
use crate::error::CommError;
use crate::mesh::mesh_dim_comm;

pub use crate::check::{CheckError, CheckResult};

/// One named check: collective, returns its outcome.
type Check = fn(&dyn Communicator) -> CheckResult;

/// Runs every check in a fixed order (identical on all ranks) and returns `(name, outcome)`.
/// Error-path checks that need two ranks are skipped when `comm.size() == 1`; the mesh checks
/// use every factorisation of `comm.size()` into 1, 2 and 3 mesh dims.
pub fn run_all(comm: &dyn Communicator) -> Vec<(String, CheckResult)> {
    let mut checks: Vec<(&str, Check)> = vec![
        ("identity", check_identity),
        ("barrier", check_barrier),
        ("broadcast", check_broadcast),
        ("all_reduce", check_all_reduce),
        ("all_gather", check_all_gather),
        ("reduce_scatter", check_reduce_scatter),
        ("all_to_all", check_all_to_all),
        ("typed_wrappers", check_typed),
        ("into_variants", check_into),
        ("split", check_split),
        ("mesh_dim_comm", check_mesh),
        ("error_bad_root", check_bad_root),
    ];
    if comm.size() >= 2 {
        checks.extend([
            ("error_mismatched_op", check_mismatched_op as Check),
            ("error_mismatched_dtype", check_mismatched_dtype),
            ("error_mismatched_counts", check_mismatched_counts),
            ("error_invalid_length", check_invalid_length),
            ("error_all_to_all_counts", check_all_to_all_counts),
            ("desync_skipped_collective", check_desync),
        ]);
    }
    checks.push(("usable_after_errors", check_all_reduce_small));
    let mut results: Vec<(String, CheckResult)> = checks
        .into_iter()
        .map(|(name, f)| (name.to_string(), f(comm)))
        .collect();
    results.extend(crate::autograd::checks::run_autograd_checks(comm));
    results.push(("usable_after_autograd".into(), check_all_reduce_small(comm)));
    results
}

/// `(passed, failed)` counts of [`run_all`]'s output.
pub fn summary(results: &[(String, CheckResult)]) -> (usize, usize) {
    let failed = results.iter().filter(|(_, r)| r.is_err()).count();
    (results.len() - failed, failed)
}

// ---------------------------------------------------------------------------------------------
// Data and the naive reference.

/// Element `i` of rank `rank`'s test data (integer-valued; non-negative for `U8`).
fn value(dtype: DType, rank: usize, i: usize, salt: usize) -> f64 {
    let h = rank * 7 + i * 3 + salt * 5;
    match dtype {
        DType::U8 => (h % 40) as f64,
        _ => (h % 11) as f64 - 5.0,
    }
}

fn values(dtype: DType, rank: usize, n: usize, salt: usize) -> Vec<f64> {
    (0..n).map(|i| value(dtype, rank, i, salt)).collect()
}

/// Little-endian bytes of integer-valued `xs` as `dtype` (exact for the generated data).
fn encode(dtype: DType, xs: &[f64]) -> Vec<u8> {
    let mut out = Vec::with_capacity(xs.len() * dtype.size());
    for &x in xs {
        match dtype {
            DType::F32 => out.extend_from_slice(&(x as f32).to_le_bytes()),
            DType::F64 => out.extend_from_slice(&x.to_le_bytes()),
            DType::BF16 => out.extend_from_slice(&half::bf16::from_f64(x).to_bits().to_le_bytes()),
            DType::U8 => out.push(x as u8),
        }
    }
    out
}

/// Inverse of [`encode`] (for messages).
fn decode(dtype: DType, bytes: &[u8]) -> Vec<f64> {
    bytes
        .chunks(dtype.size())
        .map(|c| match (dtype, c) {
            (DType::F32, [a, b, c, d]) => f32::from_le_bytes([*a, *b, *c, *d]) as f64,
            (DType::F64, c) if c.len() == 8 => {
                let mut a = [0u8; 8];
                a.copy_from_slice(c);
                f64::from_le_bytes(a)
            }
            (DType::BF16, [a, b]) => half::bf16::from_bits(u16::from_le_bytes([*a, *b])).to_f64(),
            (DType::U8, [a]) => *a as f64,
            _ => f64::NAN,
        })
        .collect()
}

/// Naive element-wise reduction in f64 over the ranks' value vectors.
fn naive_reduce(op: ReduceOp, per_rank: &[Vec<f64>]) -> Vec<f64> {
    let n = per_rank.first().map_or(0, Vec::len);
    (0..n)
        .map(|i| {
            let col = per_rank.iter().map(|v| v[i]);
            match op {
                ReduceOp::Sum => col.sum(),
                ReduceOp::Max => col.fold(f64::NEG_INFINITY, f64::max),
                ReduceOp::Min => col.fold(f64::INFINITY, f64::min),
            }
        })
        .collect()
}

/// Collects wrong results without returning early, so every rank keeps issuing the same
/// collectives even when one comparison fails.
#[derive(Default)]
struct Failures(Vec<String>);

impl Failures {
    fn bytes(&mut self, what: String, dtype: DType, got: &[u8], want: &[u8]) {
        if got != want {
            self.0.push(format!(
                "{what}: got {:?}, want {:?}",
                decode(dtype, got),
                decode(dtype, want)
            ));
        }
    }
    fn check(&mut self, ok: bool, msg: impl FnOnce() -> String) {
        if !ok {
            self.0.push(msg());
        }
    }
    fn finish(self) -> CheckResult {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(CheckError::Wrong(self.0.join("; ")))
        }
    }
}

/// Uneven counts with zeros: `counts[r] = (2r + salt) % 4`.
fn uneven_counts(size: usize, salt: usize) -> Vec<usize> {
    (0..size).map(|r| (2 * r + salt) % 4).collect()
}

/// Elements rank `i` sends to rank `j` in the all_to_all check (zero for some pairs).
fn a2a_count(i: usize, j: usize, salt: usize) -> usize {
    (i + 2 * j + salt) % 3
}

// ---------------------------------------------------------------------------------------------
// Collective checks.

fn check_identity(comm: &dyn Communicator) -> CheckResult {
    let (rank, size) = (comm.rank(), comm.size());
    let mut f = Failures::default();
    f.check(size >= 1 && rank < size, || {
        format!("rank {rank} not in 0..{size}")
    });
    f.check(["threads", "mpi"].contains(&comm.backend()), || {
        format!("unknown backend {:?}", comm.backend())
    });
    let ranks = comm.all_gather(&[rank as f64], &vec![1; size])?;
    let want: Vec<f64> = (0..size).map(|r| r as f64).collect();
    f.check(ranks == want, || {
        format!("all_gather of rank ids gave {ranks:?}")
    });
    f.finish()
}

fn check_barrier(comm: &dyn Communicator) -> CheckResult {
    comm.barrier()?;
    comm.barrier()?;
    Ok(())
}

fn check_broadcast(comm: &dyn Communicator) -> CheckResult {
    let mut f = Failures::default();
    for dtype in DType::ALL {
        for root in 0..comm.size() {
            for n in [0, 5] {
                let want = encode(dtype, &values(dtype, root, n, 1));
                let mut buf = if comm.rank() == root {
                    want.clone()
                } else {
                    vec![0u8; want.len()]
                };
                comm.broadcast_raw(&mut buf, dtype, root)?;
                f.bytes(
                    format!("broadcast {dtype:?} root={root} n={n}"),
                    dtype,
                    &buf,
                    &want,
                );
            }
        }
    }
    f.finish()
}

fn check_all_reduce(comm: &dyn Communicator) -> CheckResult {
    let mut f = Failures::default();
    for dtype in DType::ALL {
        for op in ReduceOp::ALL {
            for n in [0, 1, 7] {
                let per_rank: Vec<Vec<f64>> =
                    (0..comm.size()).map(|r| values(dtype, r, n, 2)).collect();
                let mut buf = encode(dtype, &per_rank[comm.rank()]);
                comm.all_reduce_raw(&mut buf, dtype, op)?;
                let want = encode(dtype, &naive_reduce(op, &per_rank));
                f.bytes(
                    format!("all_reduce {dtype:?} {op:?} n={n}"),
                    dtype,
                    &buf,
                    &want,
                );
            }
        }
    }
    f.finish()
}

fn check_all_reduce_small(comm: &dyn Communicator) -> CheckResult {
    let mut x = [comm.rank() as f64, 1.0];
    comm.all_reduce(&mut x, ReduceOp::Sum)?;
    let s = comm.size() as f64;
    let mut f = Failures::default();
    f.check(x == [s * (s - 1.0) / 2.0, s], || {
        format!("all_reduce of [rank, 1] gave {x:?}")
    });
    f.finish()
}

fn check_all_gather(comm: &dyn Communicator) -> CheckResult {
    let mut f = Failures::default();
    for dtype in DType::ALL {
        for salt in [0, 1, 3] {
            let counts = uneven_counts(comm.size(), salt);
            let send = encode(
                dtype,
                &values(dtype, comm.rank(), counts[comm.rank()], salt),
            );
            let got = comm.all_gather_raw(&send, &counts, dtype)?;
            let want: Vec<f64> = (0..comm.size())
                .flat_map(|r| values(dtype, r, counts[r], salt))
                .collect();
            f.bytes(
                format!("all_gather {dtype:?} counts={counts:?}"),
                dtype,
                &got,
                &encode(dtype, &want),
            );
        }
    }
    f.finish()
}

fn check_reduce_scatter(comm: &dyn Communicator) -> CheckResult {
    let mut f = Failures::default();
    for dtype in DType::ALL {
        for op in ReduceOp::ALL {
            for salt in [0, 1] {
                let counts = uneven_counts(comm.size(), salt + 1);
                let total: usize = counts.iter().sum();
                let per_rank: Vec<Vec<f64>> = (0..comm.size())
                    .map(|r| values(dtype, r, total, salt))
                    .collect();
                let send = encode(dtype, &per_rank[comm.rank()]);
                let got = comm.reduce_scatter_raw(&send, &counts, dtype, op)?;
                let full = naive_reduce(op, &per_rank);
                let start: usize = counts[..comm.rank()].iter().sum();
                let want = &full[start..start + counts[comm.rank()]];
                f.bytes(
                    format!("reduce_scatter {dtype:?} {op:?} counts={counts:?}"),
                    dtype,
                    &got,
                    &encode(dtype, want),
                );
            }
        }
    }
    f.finish()
}

fn check_all_to_all(comm: &dyn Communicator) -> CheckResult {
    let (me, size) = (comm.rank(), comm.size());
    let mut f = Failures::default();
    for dtype in DType::ALL {
        for salt in [0, 1, 2] {
            // Rank i's block for rank j holds values(i, .., salt + 10 * j) so blocks differ.
            let block = |i: usize, j: usize| values(dtype, i, a2a_count(i, j, salt), salt + 10 * j);
            let send_counts: Vec<usize> = (0..size).map(|j| a2a_count(me, j, salt)).collect();
            let recv_counts: Vec<usize> = (0..size).map(|j| a2a_count(j, me, salt)).collect();
            let send: Vec<f64> = (0..size).flat_map(|j| block(me, j)).collect();
            let got =
                comm.all_to_all_raw(&encode(dtype, &send), &send_counts, &recv_counts, dtype)?;
            let want: Vec<f64> = (0..size).flat_map(|i| block(i, me)).collect();
            f.bytes(
                format!("all_to_all {dtype:?} send_counts={send_counts:?}"),
                dtype,
                &got,
                &encode(dtype, &want),
            );
        }
    }
    f.finish()
}

fn check_typed(comm: &dyn Communicator) -> CheckResult {
    let (me, size) = (comm.rank(), comm.size());
    let counts: Vec<usize> = (0..size).map(|r| r % 3).collect();
    let mut f = Failures::default();

    let mut x = vec![half::bf16::from_f32(me as f32); 3];
    comm.all_reduce(&mut x, ReduceOp::Max)?;
    f.check(x.iter().all(|v| v.to_f32() == (size - 1) as f32), || {
        format!("bf16 all_reduce max gave {x:?}")
    });

    let mut b = vec![me as u8 + 1; 4];
    comm.broadcast(&mut b, size - 1)?;
    f.check(b == vec![size as u8; 4], || {
        format!("u8 broadcast gave {b:?}")
    });

    let g = comm.all_gather(&vec![me as f32; counts[me]], &counts)?;
    let want: Vec<f32> = (0..size)
        .flat_map(|r| std::iter::repeat(r as f32).take(counts[r]))
        .collect();
    f.check(g == want, || {
        format!("f32 all_gather gave {g:?}, want {want:?}")
    });

    let total: usize = counts.iter().sum();
    let send: Vec<f64> = (0..total).map(|i| (i + me) as f64).collect();
    let rs = comm.reduce_scatter(&send, &counts, ReduceOp::Sum)?;
    let start: usize = counts[..me].iter().sum();
    let want: Vec<f64> = (start..start + counts[me])
        .map(|i| (0..size).map(|r| (i + r) as f64).sum())
        .collect();
    f.check(rs == want, || {
        format!("f64 reduce_scatter gave {rs:?}, want {want:?}")
    });

    // every rank sends (rank, dest) pairs: 2 u8 values to each rank
    let send: Vec<u8> = (0..size).flat_map(|j| [me as u8, j as u8]).collect();
    let a2a = comm.all_to_all(&send, &vec![2; size], &vec![2; size])?;
    let want: Vec<u8> = (0..size).flat_map(|i| [i as u8, me as u8]).collect();
    f.check(a2a == want, || {
        format!("u8 all_to_all gave {a2a:?}, want {want:?}")
    });
    f.finish()
}

fn check_split(comm: &dyn Communicator) -> CheckResult {
    let (me, size) = (comm.rank(), comm.size());
    // color = parity, key = size - rank: each group is ordered by DESCENDING old rank.
    let sub = comm.split(me % 2, size - me)?;
    let mut group: Vec<usize> = (0..size).filter(|r| r % 2 == me % 2).collect();
    group.reverse();
    let mut f = Failures::default();
    let want_rank = group.iter().position(|&r| r == me).unwrap_or(usize::MAX);
    f.check(sub.size() == group.len() && sub.rank() == want_rank, || {
        format!(
            "split gave rank {}/{}, want {want_rank}/{}",
            sub.rank(),
            sub.size(),
            group.len()
        )
    });
    let got = sub.all_gather(&[me as f64], &vec![1; sub.size()])?;
    let want: Vec<f64> = group.iter().map(|&r| r as f64).collect();
    f.check(got == want, || {
        format!("all_gather in split gave {got:?}, want {want:?}")
    });
    // A split of everything with one color and equal keys keeps the old order.
    let same = comm.split(0, 0)?;
    f.check(same.rank() == me && same.size() == size, || {
        format!("split(0, 0) gave rank {}/{}", same.rank(), same.size())
    });
    let mut x = [1.0f32];
    same.all_reduce(&mut x, ReduceOp::Sum)?;
    f.check(x[0] == size as f32, || {
        format!("all_reduce in split(0,0) gave {x:?}")
    });
    f.finish()
}

/// Mesh shapes whose size is `n`: `[n]`, `[1, n]`, every `[a, b]` and `[a, b, c]` with factors >= 2.
fn mesh_shapes(n: usize) -> Vec<Vec<usize>> {
    let mut shapes = vec![vec![n], vec![1, n]];
    for a in 2..n {
        if n % a == 0 && n / a >= 2 {
            shapes.push(vec![a, n / a]);
            let m = n / a;
            for b in 2..m {
                if m % b == 0 && m / b >= 2 {
                    shapes.push(vec![a, b, m / b]);
                }
            }
        }
    }
    shapes
}

fn check_mesh(comm: &dyn Communicator) -> CheckResult {
    let me = comm.rank();
    let mut f = Failures::default();
    for shape in mesh_shapes(comm.size()) {
        let mesh = placement::DeviceMesh::new(shape.clone())
            .map_err(|e| CheckError::Wrong(format!("mesh {shape:?}: {e}")))?;
        let coord = mesh
            .coordinate(me)
            .map_err(|e| CheckError::Wrong(format!("mesh {shape:?}: {e}")))?;
        for dim in 0..shape.len() {
            let sub = mesh_dim_comm(comm, &mesh, dim)?;
            // Expected group: vary coordinate `dim`, keep the others (computed from coordinates,
            // independent of DeviceMesh::dim_groups).
            let group: Vec<usize> = (0..shape[dim])
                .map(|k| {
                    let mut c = coord.clone();
                    c[dim] = k;
                    c.iter()
                        .zip(&shape)
                        .fold(0, |acc, (&ci, &si)| acc * si + ci)
                })
                .collect();
            f.check(sub.rank() == coord[dim] && sub.size() == shape[dim], || {
                format!(
                    "mesh {shape:?} dim {dim}: rank {}/{}, want {}/{}",
                    sub.rank(),
                    sub.size(),
                    coord[dim],
                    shape[dim]
                )
            });
            let mut x = [me as f64];
            sub.all_reduce(&mut x, ReduceOp::Sum)?;
            let want: f64 = group.iter().map(|&r| r as f64).sum();
            f.check(x[0] == want, || {
                format!("mesh {shape:?} dim {dim}: all_reduce of rank ids {x:?}, want {want} (group {group:?})")
            });
            let got = sub.all_gather(&[me as f64], &vec![1; sub.size()])?;
            let want: Vec<f64> = group.iter().map(|&r| r as f64).collect();
            f.check(got == want, || {
                format!("mesh {shape:?} dim {dim}: all_gather of rank ids {got:?}, want {want:?}")
            });
        }
    }
    f.finish()
}

// ---------------------------------------------------------------------------------------------
// Error paths: every rank must get the error, and the communicator must stay usable.

fn expect_err<T: std::fmt::Debug>(
    what: &str,
    r: crate::Result<T>,
    ok: impl Fn(&CommError) -> bool,
) -> CheckResult {
    match r {
        Err(e) if ok(&e) => Ok(()),
        Err(e) => Err(CheckError::Wrong(format!("{what}: wrong error: {e}"))),
        Ok(v) => Err(CheckError::Wrong(format!(
            "{what}: expected an error, got Ok({v:?})"
        ))),
    }
}

fn check_bad_root(comm: &dyn Communicator) -> CheckResult {
    let mut buf = [0f32; 2];
    let r = comm.broadcast(&mut buf, comm.size());
    expect_err("broadcast with root == size", r, |e| {
        matches!(
            e,
            CommError::InvalidArgument {
                op: "broadcast",
                ..
            }
        )
    })?;
    comm.barrier()?;
    Ok(())
}

fn check_mismatched_op(comm: &dyn Communicator) -> CheckResult {
    let size = comm.size();
    let r = if comm.rank() == 0 {
        let mut x = [1.0f32];
        comm.all_reduce(&mut x, ReduceOp::Sum).map(|_| Vec::new())
    } else {
        comm.all_gather(&[1.0f32], &vec![1; size])
    };
    let res = expect_err("rank 0 all_reduce vs all_gather", r, |e| match e {
        CommError::Mismatch { calls, .. } => {
            calls.contains("rank 0: all_reduce") && calls.contains("rank 1: all_gather")
        }
        _ => false,
    });
    comm.barrier()?;
    res
}

fn check_mismatched_dtype(comm: &dyn Communicator) -> CheckResult {
    let r = if comm.rank() == 0 {
        let mut x = [1.0f64];
        comm.all_reduce(&mut x, ReduceOp::Sum)
    } else {
        let mut x = [1.0f32];
        comm.all_reduce(&mut x, ReduceOp::Sum)
    };
    let res = expect_err("all_reduce f64 vs f32", r, |e| {
        matches!(
            e,
            CommError::Mismatch {
                op: "all_reduce",
                ..
            }
        )
    });
    comm.barrier()?;
    res
}

fn check_mismatched_counts(comm: &dyn Communicator) -> CheckResult {
    let size = comm.size();
    // Every rank sends one element, but rank 0 believes counts[0] == 1 while the others
    // believe counts[0] == 2 (each call is valid on its own).
    let mut counts = vec![1; size];
    if comm.rank() != 0 {
        counts[0] = 2;
    }
    let r = comm.all_gather(&[1.0f32], &counts);
    let res = expect_err("all_gather with differing counts", r, |e| {
        matches!(
            e,
            CommError::Mismatch {
                op: "all_gather",
                ..
            }
        )
    });
    comm.barrier()?;
    res
}

fn check_invalid_length(comm: &dyn Communicator) -> CheckResult {
    let size = comm.size();
    let last = size - 1;
    let n = if comm.rank() == last { 2 } else { 1 };
    let r = comm.all_gather(&vec![0u8; n], &vec![1; size]);
    let res = expect_err(
        "all_gather with a too-long send on the last rank",
        r,
        |e| matches!(e, CommError::InvalidArgument { op: "all_gather", rank, .. } if *rank == last),
    );
    comm.barrier()?;
    res
}

fn check_all_to_all_counts(comm: &dyn Communicator) -> CheckResult {
    let size = comm.size();
    // Rank 0 sends one element to rank 1; nobody expects anything.
    let mut send_counts = vec![0; size];
    if comm.rank() == 0 {
        send_counts[1] = 1;
    }
    let send = vec![0.5f32; send_counts.iter().sum()];
    let r = comm.all_to_all(&send, &send_counts, &vec![0; size]);
    let res = expect_err("all_to_all send/recv count mismatch", r, |e| {
        matches!(
            e,
            CommError::CountMismatch {
                sender: 0,
                receiver: 1,
                sent: 1,
                expected: 0,
                ..
            }
        )
    });
    comm.barrier()?;
    res
}

/// Desync: the last rank skips an `all_reduce` and goes on to the next collective (an
/// `all_gather`); the others issue the `all_reduce`. Every rank must get `Mismatch` listing each
/// rank's call (in real MPI/NCCL this hangs). Afterwards no rank issues the skipped call, so the
/// ranks are in step again.
fn check_desync(comm: &dyn Communicator) -> CheckResult {
    let (me, w) = (comm.rank(), comm.size());
    let skipper = w - 1;
    let got = if me == skipper {
        comm.all_gather(&[1.0f32], &vec![1; w]).map(drop)
    } else {
        let mut x = [1.0f32];
        comm.all_reduce(&mut x, ReduceOp::Sum)
    };
    match got {
        Err(CommError::Mismatch { calls, .. })
            if calls.contains("all_reduce")
                && calls.contains(&format!("rank {skipper}: all_gather")) =>
        {
            Ok(())
        }
        other => Err(CheckError::Wrong(format!(
            "rank {skipper} skipped an all_reduce: rank {me} got {other:?}, want Mismatch"
        ))),
    }
}

/// The `*_into` variants (caller-provided output) give the same results as the allocating
/// ones, for uneven and zero counts and every dtype.
fn check_into(comm: &dyn Communicator) -> CheckResult {
    let (me, w) = (comm.rank(), comm.size());
    let mut f = Failures::default();
    for dtype in DType::ALL {
        let ds = dtype.size();
        let counts = uneven_counts(w, 3);
        let send = encode(dtype, &values(dtype, me, counts[me], 3));
        let want = comm.all_gather_raw(&send, &counts, dtype)?;
        let mut out = vec![0u8; counts.iter().sum::<usize>() * ds];
        comm.all_gather_into_raw(&send, &counts, dtype, &mut out)?;
        f.bytes(format!("all_gather_into {dtype:?}"), dtype, &out, &want);

        let total: usize = counts.iter().sum();
        let send = encode(dtype, &values(dtype, me, total, 4));
        let want = comm.reduce_scatter_raw(&send, &counts, dtype, ReduceOp::Max)?;
        let mut out = vec![0u8; counts[me] * ds];
        comm.reduce_scatter_into_raw(&send, &counts, dtype, ReduceOp::Max, &mut out)?;
        f.bytes(format!("reduce_scatter_into {dtype:?}"), dtype, &out, &want);

        let sc: Vec<usize> = (0..w).map(|j| a2a_count(me, j, 5)).collect();
        let rc: Vec<usize> = (0..w).map(|j| a2a_count(j, me, 5)).collect();
        let send = encode(dtype, &values(dtype, me, sc.iter().sum(), 5));
        let want = comm.all_to_all_raw(&send, &sc, &rc, dtype)?;
        let mut out = vec![0u8; rc.iter().sum::<usize>() * ds];
        comm.all_to_all_into_raw(&send, &sc, &rc, dtype, &mut out)?;
        f.bytes(format!("all_to_all_into {dtype:?}"), dtype, &out, &want);

        // Equal counts (the MPI backend's MPI_Allgather / MPI_Alltoall path) vs naive.
        let send = encode(dtype, &values(dtype, me, 2, 6));
        let want: Vec<f64> = (0..w).flat_map(|r| values(dtype, r, 2, 6)).collect();
        let got = comm.all_gather_raw(&send, &vec![2; w], dtype)?;
        f.bytes(
            format!("all_gather equal counts {dtype:?}"),
            dtype,
            &got,
            &encode(dtype, &want),
        );
        let per_rank: Vec<Vec<f64>> = (0..w).map(|r| values(dtype, r, 2 * w, 8)).collect();
        let send = encode(dtype, &per_rank[me]);
        let want = naive_reduce(ReduceOp::Sum, &per_rank)[2 * me..2 * me + 2].to_vec();
        let got = comm.reduce_scatter_raw(&send, &vec![2; w], dtype, ReduceOp::Sum)?;
        let want = match dtype {
            DType::U8 => want.iter().map(|x| x.rem_euclid(256.0)).collect(),
            _ => want,
        };
        f.bytes(
            format!("reduce_scatter equal counts {dtype:?}"),
            dtype,
            &got,
            &encode(dtype, &want),
        );
        let send = encode(dtype, &values(dtype, me, 2 * w, 7));
        let want: Vec<f64> = (0..w)
            .flat_map(|j| values(dtype, j, 2 * w, 7)[2 * me..2 * me + 2].to_vec())
            .collect();
        let mut out = vec![0u8; 2 * w * ds];
        comm.all_to_all_into_raw(&send, &vec![2; w], &vec![2; w], dtype, &mut out)?;
        f.bytes(
            format!("all_to_all equal counts {dtype:?}"),
            dtype,
            &out,
            &encode(dtype, &want),
        );
    }
    f.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mesh_shapes_cover_factorisations() {
        assert_eq!(mesh_shapes(4), vec![vec![4], vec![1, 4], vec![2, 2]]);
        assert!(mesh_shapes(6).contains(&vec![2, 3]) && mesh_shapes(6).contains(&vec![3, 2]));
        assert!(mesh_shapes(8).contains(&vec![2, 2, 2]));
        assert_eq!(mesh_shapes(1), vec![vec![1], vec![1, 1]]);
    }

    #[test]
    fn encode_decode_roundtrip() {
        for dtype in DType::ALL {
            let xs = values(dtype, 3, 9, 2);
            assert_eq!(decode(dtype, &encode(dtype, &xs)), xs);
        }
    }
}
