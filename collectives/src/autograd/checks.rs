//! Checks of the autograd collectives on any backend (collective: call on every rank):
//!
//! - adjoint identity `sum_r <F(x)_r, y_r> == sum_r <x_r, F*(y)_r>` for every op, exact on
//!   integer-valued f64 and f32 data, along every dim of a 3-d tensor, with uneven split sizes
//!   and zero-length shards (torch.chunk sizes and an irregular list with zeros);
//! - every forward against a naive reference computed locally from all ranks' inputs (each rank
//!   can generate every rank's data);
//! - rank-valued tests in the style of Megatron-LM `tests/unit_tests/tensor_parallel/test_mappings.py`
//!   (grad of f over 4 ranks = 0+1+2+3, ...);
//! - a bad split list on one rank fails every rank with an error (no hang).
//!
//! Used by [`crate::selftest::run_all`], hence by `tests/threads.rs` (world sizes 1..=8) and
//! `examples/mpi_selftest.rs` under mpirun.

use super::{
    chunk_sizes, AllToAllV, AutogradError, CollectiveFunction, CopyToTp, GatherFromTp, Layout,
    LocalTensor, Redistribute, ReduceFromTp, ScatterToTp, SpAllGather, SpReduceScatter,
};
use crate::check::{CheckError, CheckResult};
use crate::communicator::{Communicator, CommunicatorExt};
use crate::dtype::{Element, ReduceOp};
use crate::error::CommError;
use placement::{local_data, local_shard, DeviceMesh, LocalShard, PartialOp, Placement};

/// Float element types the checks run on.
trait Real: Element {
    fn of(x: f64) -> Self;
    fn f64(self) -> f64;
}
impl Real for f64 {
    fn of(x: f64) -> Self {
        x
    }
    fn f64(self) -> f64 {
        self
    }
}
impl Real for f32 {
    fn of(x: f64) -> Self {
        x as f32
    }
    fn f64(self) -> f64 {
        self as f64
    }
}

fn wrong(msg: String) -> CheckError {
    CheckError::Wrong(msg)
}

fn from_autograd(e: AutogradError) -> CheckError {
    match e {
        AutogradError::Comm(c) => CheckError::Comm(c),
        other => wrong(other.to_string()),
    }
}

/// Integer-valued data in `-4..=4` of `shape`, a function of `(seed, index)` only: a
/// multiplicative hash of both (the SplitMix64 constants), so the ranks' inputs of a case all
/// differ (a weaker mix gave several ranks the same data, hiding a rank-order fault).
fn data(shape: &[usize], seed: usize) -> LocalTensor<f64> {
    let n: usize = shape.iter().product();
    let key = (seed as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let v = (0..n)
        .map(|i| {
            let h = ((i as u64) ^ key).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            ((h >> 29) % 9) as f64 - 4.0
        })
        .collect();
    LocalTensor::new(shape.to_vec(), v).unwrap_or_else(|_| LocalTensor::empty())
}

fn cast<T: Real>(t: &LocalTensor<f64>) -> Result<LocalTensor<T>, CheckError> {
    LocalTensor::new(
        t.shape().to_vec(),
        t.data().iter().map(|&v| T::of(v)).collect(),
    )
    .map_err(from_autograd)
}

fn widen<T: Real>(t: &LocalTensor<T>) -> LocalTensor<f64> {
    match LocalTensor::new(
        t.shape().to_vec(),
        t.data().iter().map(|v| v.f64()).collect(),
    ) {
        Ok(w) => w,
        Err(_) => LocalTensor::empty(),
    }
}

fn dot(a: &LocalTensor<f64>, b: &LocalTensor<f64>) -> f64 {
    a.data().iter().zip(b.data()).map(|(x, y)| x * y).sum()
}

fn seed_of(layout: Layout, salt: usize, rank: usize) -> usize {
    match layout {
        Layout::Replicated => salt,
        Layout::PerRank => salt + 101 * (rank + 1),
    }
}

/// The inner product over the ranks: summed for `PerRank`, counted once for `Replicated`
/// (after checking that every rank holds the same tensor). Collective.
fn global_dot(
    comm: &dyn Communicator,
    layout: Layout,
    a: &LocalTensor<f64>,
    b: &LocalTensor<f64>,
    fails: &mut Vec<String>,
    what: &str,
) -> Result<f64, CheckError> {
    let mut local = [dot(a, b)];
    match layout {
        Layout::PerRank => {
            comm.all_reduce(&mut local, ReduceOp::Sum)?;
        }
        Layout::Replicated => {
            let mut hi = a.data().to_vec();
            let mut lo = a.data().to_vec();
            comm.all_reduce(&mut hi, ReduceOp::Max)?;
            comm.all_reduce(&mut lo, ReduceOp::Min)?;
            if hi != lo {
                fails.push(format!("{what}: replicated tensor differs across ranks"));
            }
        }
    }
    Ok(local[0])
}

/// Naive forward reference: this rank's expected output from every rank's input.
type Reference<'a> = dyn Fn(&[LocalTensor<f64>]) -> Result<LocalTensor<f64>, AutogradError> + 'a;

/// One adjoint case: `x_shape(r)` is rank r's input shape; `reference(all inputs)` is this
/// rank's expected forward output.
fn adjoint_case<T: Real, F: CollectiveFunction>(
    comm: &dyn Communicator,
    op: &F,
    x_shape: &dyn Fn(usize) -> Vec<usize>,
    reference: &Reference,
    salt: usize,
    fails: &mut Vec<String>,
) -> CheckResult {
    let (me, w) = (comm.rank(), comm.size());
    let what = format!(
        "{} [{}] ranks={w} x_shape(me)={:?}",
        op.name(),
        std::any::type_name::<T>(),
        x_shape(me)
    );
    let inputs: Vec<LocalTensor<f64>> = (0..w)
        .map(|r| data(&x_shape(r), seed_of(op.input_layout(), salt, r)))
        .collect();
    let x = &inputs[me];
    let fx = widen(&op.forward(comm, &cast::<T>(x)?).map_err(from_autograd)?);
    let want = reference(&inputs).map_err(from_autograd)?;
    if fx != want {
        fails.push(format!(
            "{what}: forward gave shape {:?} {:?}, naive reference {:?} {:?}",
            fx.shape(),
            fx.data(),
            want.shape(),
            want.data()
        ));
    }
    let y = data(fx.shape(), seed_of(op.output_layout(), salt + 7, me));
    let xb = widen(&op.backward(comm, &cast::<T>(&y)?).map_err(from_autograd)?);
    if xb.shape() != x.shape() {
        fails.push(format!(
            "{what}: backward gave shape {:?}, input shape {:?}",
            xb.shape(),
            x.shape()
        ));
    }
    let lhs = global_dot(comm, op.output_layout(), &fx, &y, fails, &what)?;
    let rhs = global_dot(comm, op.input_layout(), &xb, x, fails, &what)?;
    if lhs != rhs {
        fails.push(format!("{what}: <F(x), y> = {lhs} but <x, F*(y)> = {rhs}"));
    }
    Ok(())
}

fn finish(fails: Vec<String>) -> CheckResult {
    if fails.is_empty() {
        Ok(())
    } else {
        Err(wrong(fails.join("; ")))
    }
}

/// Split-size lists for `w` ranks: torch.chunk of 5 (trailing zeros from 4 ranks on) and an
/// irregular list with zeros.
fn size_lists(w: usize) -> Vec<Vec<usize>> {
    let chunked = chunk_sizes(5, w).unwrap_or_else(|_| vec![5]);
    let irregular = (0..w).map(|r| (r * 3 + 2) % 4).collect();
    vec![chunked, irregular]
}

const BASE: [usize; 3] = [2, 3, 2];

fn shape_with(dim: usize, size: usize) -> Vec<usize> {
    let mut s = BASE.to_vec();
    s[dim] = size;
    s
}

fn sum_all(xs: &[LocalTensor<f64>]) -> Result<LocalTensor<f64>, AutogradError> {
    let first = xs.first().cloned().unwrap_or_else(LocalTensor::empty);
    let mut acc = first.data().to_vec();
    for x in &xs[1..] {
        if x.shape() != first.shape() {
            return Err(AutogradError::Shape {
                op: "reference",
                reason: "inputs differ in shape".into(),
            });
        }
        for (a, b) in acc.iter_mut().zip(x.data()) {
            *a += b;
        }
    }
    LocalTensor::new(first.shape().to_vec(), acc)
}

/// Rows rank `i` sends to rank `j` in the all_to_all adjoint case: 0 to 3, with zeros, and
/// not symmetric (`i -> j` differs from `j -> i`), so a send/recv mix-up is seen.
fn a2a_split(i: usize, j: usize, salt: usize) -> usize {
    (i * 2 + j * 3 + salt) % 4
}

fn offset(sizes: &[usize], r: usize) -> usize {
    sizes[..r].iter().sum()
}

fn adjoint_all<T: Real>(
    comm: &dyn Communicator,
    which: &str,
    fails: &mut Vec<String>,
) -> CheckResult {
    let (me, w) = (comm.rank(), comm.size());
    let full = |_: usize| BASE.to_vec();
    match which {
        "f" => adjoint_case::<T, _>(comm, &CopyToTp, &full, &|xs| Ok(xs[me].clone()), 1, fails)?,
        "g" => adjoint_case::<T, _>(comm, &ReduceFromTp, &full, &sum_all, 2, fails)?,
        "a2a" => {
            for salt in 0..2 {
                let split = |i: usize, j: usize| a2a_split(i, j, salt);
                let op = AllToAllV {
                    send_splits: (0..w).map(|j| split(me, j)).collect(),
                    recv_splits: (0..w).map(|j| split(j, me)).collect(),
                };
                let shape = |r: usize| vec![(0..w).map(|j| split(r, j)).sum(), 3];
                let reference = |xs: &[LocalTensor<f64>]| {
                    let parts = (0..w)
                        .map(|j| {
                            let start = (0..me).map(|k| split(j, k)).sum();
                            xs[j].narrow(0, start, split(j, me))
                        })
                        .collect::<Result<Vec<_>, _>>()?;
                    LocalTensor::cat(&parts, 0)
                };
                adjoint_case::<T, _>(comm, &op, &shape, &reference, 3 + salt, fails)?;
            }
        }
        _ => {
            for dim in 0..BASE.len() {
                for sizes in size_lists(w) {
                    let total: usize = sizes.iter().sum();
                    let sharded = |r: usize| shape_with(dim, sizes[r]);
                    let whole = |_: usize| shape_with(dim, total);
                    let mine = |t: &LocalTensor<f64>| t.narrow(dim, offset(&sizes, me), sizes[me]);
                    let salt = 10 + dim;
                    match which {
                        "gather" => {
                            let op = GatherFromTp {
                                dim,
                                sizes: sizes.clone(),
                            };
                            let reference = |xs: &[LocalTensor<f64>]| LocalTensor::cat(xs, dim);
                            adjoint_case::<T, _>(comm, &op, &sharded, &reference, salt, fails)?;
                        }
                        "scatter" => {
                            let op = ScatterToTp {
                                dim,
                                sizes: sizes.clone(),
                            };
                            let reference = |xs: &[LocalTensor<f64>]| mine(&xs[me]);
                            adjoint_case::<T, _>(comm, &op, &whole, &reference, salt, fails)?;
                        }
                        "sp_all_gather" => {
                            let op = SpAllGather {
                                dim,
                                sizes: sizes.clone(),
                            };
                            let reference = |xs: &[LocalTensor<f64>]| LocalTensor::cat(xs, dim);
                            adjoint_case::<T, _>(comm, &op, &sharded, &reference, salt, fails)?;
                        }
                        "sp_reduce_scatter" => {
                            let op = SpReduceScatter {
                                dim,
                                sizes: sizes.clone(),
                            };
                            let reference = |xs: &[LocalTensor<f64>]| mine(&sum_all(xs)?);
                            adjoint_case::<T, _>(comm, &op, &whole, &reference, salt, fails)?;
                        }
                        other => return Err(wrong(format!("no adjoint check for op {other:?}"))),
                    }
                }
            }
        }
    }
    Ok(())
}

/// The ops by short name, for [`run_autograd_checks`].
const OPS: [&str; 7] = [
    "f",
    "g",
    "gather",
    "scatter",
    "sp_all_gather",
    "sp_reduce_scatter",
    "a2a",
];

fn check_adjoint(comm: &dyn Communicator, which: &str) -> CheckResult {
    let mut fails = Vec::new();
    adjoint_all::<f64>(comm, which, &mut fails)?;
    adjoint_all::<f32>(comm, which, &mut fails)?;
    finish(fails)
}

fn full(shape: &[usize], v: f64) -> LocalTensor<f64> {
    let n = shape.iter().product();
    LocalTensor::new(shape.to_vec(), vec![v; n]).unwrap_or_else(|_| LocalTensor::empty())
}

fn expect(fails: &mut Vec<String>, what: &str, got: &LocalTensor<f64>, want: &LocalTensor<f64>) {
    if got != want {
        fails.push(format!(
            "{what}: got {:?} {:?}, want {:?} {:?}",
            got.shape(),
            got.data(),
            want.shape(),
            want.data()
        ));
    }
}

/// Megatron-style rank-valued checks with hand-computed answers.
fn check_rank_valued(comm: &dyn Communicator) -> CheckResult {
    let (me, w) = (comm.rank(), comm.size());
    let r = me as f64;
    let sum_ranks = (w * (w - 1) / 2) as f64; // 0+1+...+(w-1)
    let sum_r1 = (w * (w + 1) / 2) as f64; // 1+2+...+w
    let mut fails = Vec::new();
    let ag = from_autograd;

    // f: forward identity, grad = sum over ranks of rank-valued grads.
    let x = full(&[2, 3], r);
    expect(
        &mut fails,
        "f forward",
        &CopyToTp.forward(comm, &x).map_err(ag)?,
        &x,
    );
    let gx = CopyToTp.backward(comm, &x).map_err(ag)?;
    expect(
        &mut fails,
        "f backward (0+1+..)",
        &gx,
        &full(&[2, 3], sum_ranks),
    );
    // g: forward sum, backward identity.
    let gy = ReduceFromTp.forward(comm, &x).map_err(ag)?;
    expect(
        &mut fails,
        "g forward (0+1+..)",
        &gy,
        &full(&[2, 3], sum_ranks),
    );
    expect(
        &mut fails,
        "g backward",
        &ReduceFromTp.backward(comm, &x).map_err(ag)?,
        &x,
    );

    // gather along the last dim: rank r's [2, r+1] block holds r.
    let sizes: Vec<usize> = (1..=w).collect();
    let op = GatherFromTp {
        dim: 1,
        sizes: sizes.clone(),
    };
    let got = op.forward(comm, &full(&[2, me + 1], r)).map_err(ag)?;
    let row: Vec<f64> = (0..w).flat_map(|k| vec![k as f64; k + 1]).collect();
    let gathered = LocalTensor::new(vec![2, row.len()], [row.clone(), row].concat()).map_err(ag)?;
    expect(&mut fails, "gather forward", &got, &gathered);
    expect(
        &mut fails,
        "gather backward (own chunk)",
        &op.backward(comm, &gathered).map_err(ag)?,
        &full(&[2, me + 1], r),
    );
    // split: backward gathers the rank-valued gradients.
    let op = ScatterToTp { dim: 1, sizes };
    expect(
        &mut fails,
        "split forward (own chunk)",
        &op.forward(comm, &gathered).map_err(ag)?,
        &full(&[2, me + 1], r),
    );
    expect(
        &mut fails,
        "split backward",
        &op.backward(comm, &full(&[2, me + 1], r)).map_err(ag)?,
        &gathered,
    );

    // SP along dim 0 with torch.chunk sizes of 5 (zero-length shards from 4 ranks on).
    let seq = chunk_sizes(5, w).map_err(ag)?;
    let rs = SpReduceScatter {
        dim: 0,
        sizes: seq.clone(),
    };
    let got = rs.forward(comm, &full(&[5, 2], r + 1.0)).map_err(ag)?;
    expect(
        &mut fails,
        "sp reduce_scatter forward (1+2+..)",
        &got,
        &full(&[seq[me], 2], sum_r1),
    );
    let agt = SpAllGather {
        dim: 0,
        sizes: seq.clone(),
    };
    let got = agt.backward(comm, &full(&[5, 2], r + 1.0)).map_err(ag)?;
    expect(
        &mut fails,
        "sp all_gather backward (1+2+..)",
        &got,
        &full(&[seq[me], 2], sum_r1),
    );

    // all_to_all: rank i sends one row per destination j, valued 10*i + j.
    let op = AllToAllV {
        send_splits: vec![1; w],
        recv_splits: vec![1; w],
    };
    let x =
        LocalTensor::new(vec![w, 1], (0..w).map(|j| (10 * me + j) as f64).collect()).map_err(ag)?;
    let want =
        LocalTensor::new(vec![w, 1], (0..w).map(|j| (10 * j + me) as f64).collect()).map_err(ag)?;
    expect(
        &mut fails,
        "all_to_all forward",
        &op.forward(comm, &x).map_err(ag)?,
        &want,
    );
    expect(
        &mut fails,
        "all_to_all backward",
        &op.backward(comm, &want).map_err(ag)?,
        &x,
    );
    finish(fails)
}

/// The last rank passes a split list of the wrong length: it gets a `Shape` error, every other
/// rank a `CommError::InvalidArgument` naming it, at once; the communicator stays usable.
fn check_bad_sizes_fail_every_rank(comm: &dyn Communicator) -> CheckResult {
    let (me, w) = (comm.rank(), comm.size());
    let bad = me + 1 == w;
    let sizes = if bad { vec![1; w + 1] } else { vec![1; w] };
    let op = SpAllGather { dim: 0, sizes };
    let got = op.forward(comm, &full(&[1, 2], 1.0));
    let ok = match (&got, bad) {
        (Err(AutogradError::Shape { .. }), true) => true,
        (Err(AutogradError::Comm(CommError::InvalidArgument { rank, .. })), false) => {
            *rank == w - 1
        }
        _ => false,
    };
    if ok {
        Ok(())
    } else {
        Err(wrong(format!(
            "bad split list on rank {}: rank {me} got {got:?}",
            w - 1
        )))
    }
}

/// The elements of `g` at the shard's global indices (row-major), shaped as the shard
/// (`placement::local_data`).
fn take(g: &LocalTensor<f64>, shard: &LocalShard) -> Result<LocalTensor<f64>, CheckError> {
    let data = local_data(g.data(), g.shape(), shard).map_err(|e| wrong(e.to_string()))?;
    LocalTensor::new(shard.local_shape.clone(), data).map_err(from_autograd)
}

fn shard_of(
    global: &[usize],
    mesh: &DeviceMesh,
    ps: &[Placement],
    coord: &[usize],
) -> Result<LocalShard, CheckError> {
    local_shard(global, mesh, ps, coord).map_err(|e| wrong(e.to_string()))
}

/// The data seed of the rank at mesh coordinate `c` for a redistribute source `src` on a mesh of
/// `w` ranks: the Partial terms differ along Partial mesh dims only (equal along the others, as
/// the shards of one term must be).
fn partial_seed(src: &[Placement], c: &[usize], w: usize) -> usize {
    src.iter()
        .enumerate()
        .filter(|(_, p)| p.is_partial())
        .map(|(m, _)| c[m] * (w + 1).pow(m as u32 + 1))
        .sum::<usize>()
        + 1
}

/// Number of ranks holding each element (product of the `Replicate` mesh dims).
fn replication(mesh: &DeviceMesh, ps: &[Placement]) -> f64 {
    ps.iter()
        .zip(mesh.shape())
        .filter(|(p, _)| **p == Placement::Replicate)
        .map(|(_, &k)| k as f64)
        .product()
}

/// One redistribute case of a tensor of `global` elements: PyTorch's plan and, where the plan
/// has one, its cheaper alternative ([`Redistribute::cheaper`]), each checked by
/// [`redistribute_op`]. `merges`: the plan's steps merge, so it must have the alternative.
fn redistribute_case(
    comm: &dyn Communicator,
    mesh: &DeviceMesh,
    global: &[usize],
    (src, dst): (&[Placement], &[Placement]),
    merges: bool,
    fails: &mut Vec<String>,
) -> CheckResult {
    let what = format!(
        "redistribute {global:?} mesh {:?} {src:?} -> {dst:?}",
        mesh.shape()
    );
    let op =
        Redistribute::new(global, mesh, src, dst).map_err(|e| wrong(format!("{what}: {e}")))?;
    if merges && op.cheaper().is_none() {
        fails.push(format!("{what}: no merged alternative"));
    }
    if let Some(cheaper) = op.cheaper() {
        redistribute_op(
            comm,
            mesh,
            global,
            (src, dst),
            &cheaper,
            &format!("{what} (merged)"),
            fails,
        )?;
    }
    redistribute_op(comm, mesh, global, (src, dst), &op, &what, fails)
}

/// Forward of `op` against the global reference (sum of the Partial terms, sliced by `dst`),
/// and the adjoint identity with DTensor's inner product (sum over ranks of the local
/// products, divided by the replication of the placements).
fn redistribute_op(
    comm: &dyn Communicator,
    mesh: &DeviceMesh,
    global: &[usize],
    (src, dst): (&[Placement], &[Placement]),
    op: &Redistribute,
    what: &str,
    fails: &mut Vec<String>,
) -> CheckResult {
    let w = comm.size();
    let coord_of = |r: usize| mesh.coordinate(r).map_err(|e| wrong(e.to_string()));
    let seed = |c: &[usize]| partial_seed(src, c, w);
    let mut seeds = Vec::new();
    for r in 0..w {
        let s = seed(&coord_of(r)?);
        if !seeds.contains(&s) {
            seeds.push(s);
        }
    }
    let terms: Vec<LocalTensor<f64>> = seeds.iter().map(|&s| data(global, s)).collect();
    let value = sum_all(&terms).map_err(from_autograd)?;
    let me = coord_of(comm.rank())?;
    let x = take(&data(global, seed(&me)), &shard_of(global, mesh, src, &me)?)?;
    let fx = op.forward(comm, &x).map_err(from_autograd)?;
    let dst_shard = shard_of(global, mesh, dst, &me)?;
    let want = take(&value, &dst_shard)?;
    if fx != want {
        fails.push(format!(
            "{what}: forward {:?} {:?}, reference {:?} {:?}",
            fx.shape(),
            fx.data(),
            want.shape(),
            want.data()
        ));
    }
    let y = take(&data(global, 999), &dst_shard)?;
    let xb = op.backward(comm, &y).map_err(from_autograd)?;
    if xb.shape() != x.shape() {
        fails.push(format!(
            "{what}: backward shape {:?}, input {:?}",
            xb.shape(),
            x.shape()
        ));
    }
    let mut sums = [dot(&fx, &y), dot(&x, &xb)];
    comm.all_reduce(&mut sums, ReduceOp::Sum)?;
    let (lhs, rhs) = (
        sums[0] * replication(mesh, src),
        sums[1] * replication(mesh, dst),
    );
    if lhs != rhs {
        fails.push(format!(
            "{what}: <F(x), y> * repl(src) = {lhs} but <x, F*(y)> * repl(dst) = {rhs}"
        ));
    }
    Ok(())
}

/// `Redistribute` on the 1-D mesh of all ranks and, for even world sizes from 4, on a
/// `[2, W/2]` mesh, for Shard/Replicate/Partial(sum) sources (uneven 5 x 3 tensor), and plans
/// whose steps merge (all-gathers, all-reduces, reduce-scatters) on a `W x 6` tensor.
fn check_redistribute(comm: &dyn Communicator) -> CheckResult {
    use Placement::{Replicate as R, Shard as S};
    let p = Placement::Partial(PartialOp::Sum);
    let w = comm.size();
    let mut fails = Vec::new();
    let mesh1 = DeviceMesh::new(vec![w]).map_err(|e| wrong(e.to_string()))?;
    for (src, dst) in [
        ([S(0)], [R]),
        ([p], [R]),
        ([p], [S(0)]),
        ([S(0)], [S(1)]),
        ([S(1)], [S(0)]),
        ([R], [S(1)]),
        ([R], [R]),
    ] {
        redistribute_case(comm, &mesh1, &[5, 3], (&src, &dst), false, &mut fails)?;
    }
    if w >= 4 && w % 2 == 0 {
        let mesh2 = DeviceMesh::new(vec![2, w / 2]).map_err(|e| wrong(e.to_string()))?;
        for (src, dst) in [
            ([S(0), S(1)], [R, R]),
            ([p, S(0)], [R, S(1)]),
            ([S(0), S(0)], [R, S(0)]),
            ([S(0), R], [S(1), S(0)]),
            ([p, p], [S(0), R]),
        ] {
            redistribute_case(comm, &mesh2, &[5, 3], (&src, &dst), false, &mut fails)?;
        }
        for (src, dst) in [
            ([S(0), S(0)], [R, R]),
            ([p, p], [R, R]),
            ([p, p], [S(0), S(0)]),
        ] {
            redistribute_case(comm, &mesh2, &[w, 6], (&src, &dst), true, &mut fails)?;
        }
    }
    finish(fails)
}

/// Runs the autograd checks (collective, same order on every rank): one adjoint check per op
/// (f64 and f32), the rank-valued checks, and the bad-argument check. Called by
/// [`crate::selftest::run_all`]; public so a caller can run only these.
pub fn run_autograd_checks(comm: &dyn Communicator) -> Vec<(String, CheckResult)> {
    let mut out: Vec<(String, CheckResult)> = OPS
        .iter()
        .map(|op| (format!("autograd_adjoint_{op}"), check_adjoint(comm, op)))
        .collect();
    out.push(("autograd_rank_valued".into(), check_rank_valued(comm)));
    out.push(("autograd_redistribute".into(), check_redistribute(comm)));
    out.push((
        "autograd_bad_sizes_fail_every_rank".into(),
        check_bad_sizes_fail_every_rank(comm),
    ));
    out
}

#[cfg(test)]
mod tests {
    //! The properties the checks above rely on in their data, their seeds and their split
    //! sizes (any choice with these properties is as strong a check).
    use super::*;

    #[test]
    fn data_is_small_varied_integers() {
        for seed in 0..60 {
            for shape in [&BASE[..], &[5, 3], &[7, 3], &[2, 4, 2]] {
                let t = data(shape, seed);
                assert_eq!(t.shape(), shape);
                // Integers in -4..=4: every sum of up to 8 ranks' products is exact in f32.
                assert!(t
                    .data()
                    .iter()
                    .all(|&v| v.fract() == 0.0 && (-4.0..=4.0).contains(&v)));
                // At least 4 distinct values: a misplaced element changes the result.
                let mut vals: Vec<i64> = t.data().iter().map(|&v| v as i64).collect();
                vals.sort_unstable();
                vals.dedup();
                assert!(vals.len() >= 4, "seed {seed} {shape:?}: {vals:?}");
            }
        }
        // The ranks' inputs of one case differ from each other and from the replicated one.
        for salt in 0..40 {
            let mut seen = vec![data(&BASE, seed_of(Layout::Replicated, salt, 0))];
            for r in 0..8 {
                let t = data(&BASE, seed_of(Layout::PerRank, salt, r));
                assert!(!seen.contains(&t), "salt {salt} rank {r}");
                seen.push(t);
            }
        }
    }

    #[test]
    fn seeds_are_shared_when_replicated_and_differ_per_rank() {
        for salt in 0..20 {
            let rep: Vec<usize> = (0..8)
                .map(|r| seed_of(Layout::Replicated, salt, r))
                .collect();
            assert!(rep.iter().all(|&s| s == salt));
            let per: Vec<usize> = (0..8).map(|r| seed_of(Layout::PerRank, salt, r)).collect();
            for (a, &x) in per.iter().enumerate() {
                assert_ne!(x, salt, "a per-rank seed equals the replicated one");
                for &y in &per[a + 1..] {
                    assert_ne!(x, y, "two ranks share a seed");
                }
            }
        }
    }

    #[test]
    fn partial_terms_differ_along_partial_mesh_dims_only() {
        use Placement::{Replicate as R, Shard as S};
        let p = Placement::Partial(PartialOp::Sum);
        for (w, shape) in [
            (2, vec![2]),
            (4, vec![2, 2]),
            (6, vec![2, 3]),
            (8, vec![2, 4]),
        ] {
            let mesh = DeviceMesh::new(shape.clone()).unwrap();
            let srcs: Vec<Vec<Placement>> = if shape.len() == 1 {
                vec![vec![p], vec![S(0)]]
            } else {
                vec![vec![p, p], vec![p, S(0)], vec![S(0), p], vec![R, S(1)]]
            };
            for src in srcs {
                for a in 0..w {
                    for b in 0..w {
                        let (ca, cb) = (mesh.coordinate(a).unwrap(), mesh.coordinate(b).unwrap());
                        let same_term =
                            (0..shape.len()).all(|m| !src[m].is_partial() || ca[m] == cb[m]);
                        let (sa, sb) = (partial_seed(&src, &ca, w), partial_seed(&src, &cb, w));
                        assert_eq!(sa == sb, same_term, "{src:?} {ca:?} {cb:?}");
                        // The terms' data differ, not only their seeds.
                        if !same_term {
                            assert_ne!(data(&[5, 3], sa), data(&[5, 3], sb));
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn replication_counts_the_replicate_mesh_dims() {
        use Placement::{Replicate as R, Shard as S};
        let p = Placement::Partial(PartialOp::Sum);
        let mesh = DeviceMesh::new(vec![2, 3]).unwrap();
        assert_eq!(replication(&mesh, &[R, R]), 6.0);
        assert_eq!(replication(&mesh, &[R, S(0)]), 2.0);
        assert_eq!(replication(&mesh, &[S(1), R]), 3.0);
        assert_eq!(replication(&mesh, &[p, S(0)]), 1.0);
        assert_eq!(replication(&mesh, &[S(0), S(1)]), 1.0);
    }

    #[test]
    fn split_lists_are_uneven_with_zero_length_shards() {
        for w in 1..=8 {
            let lists = size_lists(w);
            assert_eq!(lists[0], chunk_sizes(5, w).unwrap());
            let irregular = &lists[1];
            assert_eq!(irregular.len(), w);
            assert!(irregular.iter().all(|&s| s <= 3));
            if w >= 2 {
                assert!(
                    irregular.iter().any(|&s| s != irregular[0]),
                    "{irregular:?}"
                );
            }
            if w >= 3 {
                assert!(irregular.contains(&0), "{irregular:?}");
            }
        }
        for salt in 0..2 {
            let s = |i, j| a2a_split(i, j, salt);
            assert!((0..4).all(|i| (0..4).all(|j| s(i, j) <= 3)));
            assert!((0..4).any(|i| (0..4).any(|j| s(i, j) == 0)));
            assert!((0..4).any(|i| (0..4).any(|j| s(i, j) != s(j, i))));
            assert!(
                (0..2).any(|i| s(i, 1 - i) != s(1 - i, i)),
                "asymmetric at world 2"
            );
        }
    }
}
