//! The autograd checks themselves catch faults: `run_autograd_checks` on a communicator that
//! corrupts one kind of collective must fail exactly the checks whose ops use that collective,
//! and pass the others. A check that stops checking (a weakened comparison, a case that no
//! longer runs, an op swapped for another) changes that set.
//!
//! The faults keep the protocol intact (no rank waits): on rank 0, the last element of the result
//! of every call of one collective has an exponent bit flipped (bit 4 of its most significant
//! byte, little-endian f32/f64), which changes every value, 0.0 included; or, on every rank,
//! all_gather returns the ranks' blocks in reverse order, which only data that differs between
//! ranks can show.

use collectives::autograd::checks::run_autograd_checks;
use collectives::autograd::{CollectiveFunction, CopyToTp, GatherFromTp, LocalTensor};
use collectives::threads::spawn_world_with_timeout;
use collectives::{Communicator, DType, ReduceOp, Result};
use std::collections::BTreeSet;
use std::time::Duration;

#[derive(Clone, Copy, Debug, PartialEq)]
enum Fault {
    AllReduce,
    AllGather,
    ReduceScatter,
    AllToAll,
    GatherOrder,
    /// The bit flip of `AllGather`, on the sub-communicators of a mesh dim only (those smaller
    /// than the world).
    SubMeshAllGather,
}

struct Faulty {
    inner: Box<dyn Communicator>,
    fault: Fault,
    world: usize,
}

impl Faulty {
    fn corrupt(&self, kind: Fault, buf: &mut [u8], dtype: DType) {
        let w = dtype.size();
        let fault = match self.fault {
            Fault::SubMeshAllGather if self.inner.size() < self.world => Fault::AllGather,
            f => f,
        };
        if kind == fault && self.inner.rank() == 0 && buf.len() >= w {
            let n = buf.len();
            buf[n - 1] ^= 0x10;
        }
    }
}

impl Communicator for Faulty {
    fn rank(&self) -> usize {
        self.inner.rank()
    }
    fn size(&self) -> usize {
        self.inner.size()
    }
    fn backend(&self) -> &'static str {
        "faulty"
    }
    fn barrier(&self) -> Result<()> {
        self.inner.barrier()
    }
    fn broadcast_raw(&self, buf: &mut [u8], dtype: DType, root: usize) -> Result<()> {
        self.inner.broadcast_raw(buf, dtype, root)
    }
    fn all_reduce_raw(&self, buf: &mut [u8], dtype: DType, op: ReduceOp) -> Result<()> {
        self.inner.all_reduce_raw(buf, dtype, op)?;
        self.corrupt(Fault::AllReduce, buf, dtype);
        Ok(())
    }
    fn all_gather_raw(&self, send: &[u8], counts: &[usize], dtype: DType) -> Result<Vec<u8>> {
        let mut v = self.inner.all_gather_raw(send, counts, dtype)?;
        self.corrupt(Fault::AllGather, &mut v, dtype);
        if self.fault == Fault::GatherOrder {
            v = reverse_blocks(&v, counts, dtype.size());
        }
        Ok(v)
    }
    fn reduce_scatter_raw(
        &self,
        send: &[u8],
        counts: &[usize],
        dtype: DType,
        op: ReduceOp,
    ) -> Result<Vec<u8>> {
        let mut v = self.inner.reduce_scatter_raw(send, counts, dtype, op)?;
        self.corrupt(Fault::ReduceScatter, &mut v, dtype);
        Ok(v)
    }
    fn all_to_all_raw(
        &self,
        send: &[u8],
        send_counts: &[usize],
        recv_counts: &[usize],
        dtype: DType,
    ) -> Result<Vec<u8>> {
        let mut v = self
            .inner
            .all_to_all_raw(send, send_counts, recv_counts, dtype)?;
        self.corrupt(Fault::AllToAll, &mut v, dtype);
        Ok(v)
    }
    fn split(&self, color: usize, key: usize) -> Result<Box<dyn Communicator>> {
        Ok(Box::new(Faulty {
            inner: self.inner.split(color, key)?,
            fault: self.fault,
            world: self.world,
        }))
    }
}

/// The rank blocks of an all_gather result (`counts[r]` elements of `width` bytes each), last
/// rank first.
fn reverse_blocks(v: &[u8], counts: &[usize], width: usize) -> Vec<u8> {
    let mut starts = vec![0];
    for &c in counts {
        starts.push(starts[starts.len() - 1] + c * width);
    }
    (0..counts.len())
        .rev()
        .flat_map(|r| v[starts[r]..starts[r + 1]].iter().copied())
        .collect()
}

/// The names of the checks that fail on some rank, under `fault` at world size `w`.
fn failing(w: usize, fault: Option<Fault>) -> BTreeSet<String> {
    let results = spawn_world_with_timeout(w, Duration::from_secs(60), |c| {
        let comm: Box<dyn Communicator> = match fault {
            Some(fault) => {
                let world = c.size();
                Box::new(Faulty {
                    inner: c,
                    fault,
                    world,
                })
            }
            None => c,
        };
        run_autograd_checks(&*comm)
            .into_iter()
            .map(|(name, r)| (name, r.is_err()))
            .collect::<Vec<_>>()
    });
    let mut out = BTreeSet::new();
    for r in results {
        for (name, failed) in r.expect("no rank panics") {
            if failed {
                out.insert(name);
            }
        }
    }
    out
}

fn set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|n| format!("autograd_{n}")).collect()
}

/// Every check passes without a fault (so the sets below are the faults' doing).
#[test]
fn no_fault_no_failure() {
    for w in [1, 2, 4] {
        assert_eq!(failing(w, None), BTreeSet::new(), "world {w}");
    }
}

/// Under `fault`, at each world size of `worlds`, exactly the checks `names` fail.
fn expect_failing(fault: Fault, worlds: &[usize], names: &[&str]) {
    for &w in worlds {
        assert_eq!(
            failing(w, Some(fault)),
            set(names),
            "{fault:?} at world {w}"
        );
    }
}

/// The checks of the ops that call all_gather: the forward of gather_from_tp and sp_all_gather,
/// the backward of scatter_to_tp and sp_reduce_scatter, and Shard -> Replicate.
const GATHERING: [&str; 6] = [
    "adjoint_gather",
    "adjoint_scatter",
    "adjoint_sp_all_gather",
    "adjoint_sp_reduce_scatter",
    "rank_valued",
    "redistribute",
];

/// all_reduce carries `f`'s backward and `g`'s forward, the Partial -> Replicate
/// redistribution, and the checks' own inner products. Gather and scatter have a replicated
/// side, whose equal-across-ranks check (an all_reduce max / min) sees rank 0's corrupt copy.
/// The SP and all_to_all ops never call all_reduce, and both sides of their identity are
/// per-rank sums, corrupted alike (the same bit of the same value): they pass.
#[test]
fn a_corrupt_all_reduce_fails_the_ops_that_reduce_or_replicate() {
    let names = [
        "adjoint_f",
        "adjoint_g",
        "adjoint_gather",
        "adjoint_scatter",
        "rank_valued",
        "redistribute",
    ];
    expect_failing(Fault::AllReduce, &[2, 4], &names);
}

/// f, g and all_to_all never call all_gather.
#[test]
fn a_corrupt_all_gather_fails_the_gathering_ops_only() {
    expect_failing(Fault::AllGather, &[2, 4], &GATHERING);
}

/// The same ops, when all_gather puts the ranks in the wrong order: every rank's input differs
/// from every other's in these checks.
#[test]
fn an_all_gather_in_the_wrong_rank_order_fails_the_gathering_ops_only() {
    expect_failing(Fault::GatherOrder, &[2, 4], &GATHERING);
}

/// Only the redistributions on a 2-D mesh (run from world size 4, on even world sizes) use
/// communicators smaller than the world.
#[test]
fn a_corrupt_mesh_dim_all_gather_fails_the_2d_redistributions_only() {
    expect_failing(Fault::SubMeshAllGather, &[2], &[]);
    expect_failing(Fault::SubMeshAllGather, &[4, 6], &["redistribute"]);
}

/// reduce_scatter is sp_reduce_scatter's forward and sp_all_gather's backward: the backward
/// fault is seen by the adjoint identity alone (a backward's values are checked nowhere else in
/// the adjoint case).
#[test]
fn a_corrupt_reduce_scatter_fails_the_sp_ops_only() {
    let names = [
        "adjoint_sp_all_gather",
        "adjoint_sp_reduce_scatter",
        "rank_valued",
        "redistribute",
    ];
    expect_failing(Fault::ReduceScatter, &[2, 4], &names);
}

/// all_to_all is the EP dispatch/combine op, forward and backward, and Redistribute's
/// Shard -> Shard step.
#[test]
fn a_corrupt_all_to_all_fails_the_a2a_and_redistribute_checks_only() {
    expect_failing(
        Fault::AllToAll,
        &[2, 4],
        &["adjoint_a2a", "rank_valued", "redistribute"],
    );
}

/// The ops' names are what reports and errors print: Megatron's region names with the f / g of
/// the Megatron-LM paper, and the collective for the SP and EP ops.
#[test]
fn op_names_are_the_field_terms() {
    use collectives::autograd::{
        AllToAllV, ReduceFromTp, ScatterToTp, SpAllGather, SpReduceScatter,
    };
    let sizes = vec![1];
    let names = [
        CopyToTp.name(),
        ReduceFromTp.name(),
        GatherFromTp {
            dim: 0,
            sizes: sizes.clone(),
        }
        .name(),
        ScatterToTp {
            dim: 0,
            sizes: sizes.clone(),
        }
        .name(),
        SpAllGather {
            dim: 0,
            sizes: sizes.clone(),
        }
        .name(),
        SpReduceScatter { dim: 0, sizes }.name(),
        AllToAllV {
            send_splits: vec![1],
            recv_splits: vec![1],
        }
        .name(),
    ];
    assert_eq!(
        names,
        [
            "copy_to_tp (f)",
            "reduce_from_tp (g)",
            "gather_from_tp",
            "scatter_to_tp",
            "sp_all_gather",
            "sp_reduce_scatter",
            "all_to_all_v",
        ]
    );
}

/// cat refuses parts that differ outside the cat dim (same rank, or a different rank).
#[test]
fn cat_refuses_parts_that_differ_outside_dim() {
    let a = LocalTensor::new(vec![2, 3], vec![0.0f64; 6]).unwrap();
    let b = LocalTensor::new(vec![2, 4], vec![0.0f64; 8]).unwrap();
    let c = LocalTensor::new(vec![6], vec![0.0f64; 6]).unwrap();
    for parts in [[a.clone(), b], [a, c]] {
        let err = LocalTensor::cat(&parts, 0).unwrap_err().to_string();
        assert!(err.contains("differ outside dim 0"), "{err}");
    }
}
