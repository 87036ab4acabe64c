//! Bandwidth of all_reduce / all_gather / reduce_scatter / all_to_all through this crate's MPI
//! backend (`CommunicatorExt::{all_reduce, all_gather_into, reduce_scatter_into,
//! all_to_all_into}` on `MpiWorld::world()`, with its argument exchange and watchdog)
//! vs the same rsmpi call made directly, f32 data, 4 KiB to 64 MiB.
//!
//! ```text
//! cargo bench -p collectives --bench mpi_bandwidth --no-run
//! mpirun --allow-run-as-root --oversubscribe -n 2 target/release/deps/mpi_bandwidth-<hash> [MAX_MIB]
//! ```
//! (`cargo bench --no-run` prints the binary's path.) `MAX_MIB` (default 64) caps the size.
//!
//! Size convention (nccl-tests): all_reduce: the buffer; all_gather: the gathered output
//! (each rank sends size/N); reduce_scatter: the input (each rank keeps size/N); all_to_all:
//! the send buffer (size/N to each rank). Times are the max over ranks of the mean per call;
//! bus bandwidth uses nccl-tests' factors (all_reduce 2(N-1)/N, the others (N-1)/N).
//! Times are the best of 7 rounds; `ratio_med` is the median over the rounds of
//! (crate time / direct time) measured back to back (order alternating), which is robust to
//! load spikes; the target is <= 1.05 from 1 MiB up. The last lines give, per op, the
//! geometric mean of `ratio_med` over the sizes >= 1 MiB.

use collectives::mpi::MpiWorld;
use collectives::{Communicator, CommunicatorExt, ReduceOp};
use mpi::collective::SystemOperation;
use mpi::topology::SimpleCommunicator;
use mpi::traits::CommunicatorCollectives as _;
use std::time::Instant;

#[derive(Clone, Copy, Debug)]
enum Op {
    AllReduce,
    AllGather,
    ReduceScatter,
    AllToAll,
}

const OPS: [Op; 4] = [
    Op::AllReduce,
    Op::AllGather,
    Op::ReduceScatter,
    Op::AllToAll,
];

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::AllReduce => "all_reduce",
            Op::AllGather => "all_gather",
            Op::ReduceScatter => "reduce_scatter",
            Op::AllToAll => "all_to_all",
        }
    }
    fn bus_factor(self, n: usize) -> f64 {
        let n = n as f64;
        match self {
            Op::AllReduce => 2.0 * (n - 1.0) / n,
            _ => (n - 1.0) / n,
        }
    }
}

/// One call through the crate (the `*_into` variants, writing into the reused `out` like the
/// direct calls).
fn via_crate(comm: &dyn Communicator, op: Op, buf: &mut [f32], out: &mut [f32], n: usize) {
    let block = buf.len() / n;
    let counts = vec![block; n];
    let r = match op {
        Op::AllReduce => comm.all_reduce(buf, ReduceOp::Sum),
        Op::AllGather => comm.all_gather_into(&buf[..block], &counts, out),
        Op::ReduceScatter => {
            comm.reduce_scatter_into(buf, &counts, ReduceOp::Sum, &mut out[..block])
        }
        Op::AllToAll => comm.all_to_all_into(buf, &counts, &counts, out),
    };
    if let Err(e) = r {
        eprintln!("mpi_bandwidth: {} failed: {e}", op.name());
        std::process::exit(1);
    }
}

/// The same collective, rsmpi called directly (`out` is the receive buffer).
fn direct(world: &SimpleCommunicator, op: Op, buf: &[f32], out: &mut [f32], n: usize) {
    let block = buf.len() / n;
    match op {
        // Separate send/receive buffers (rsmpi has no in-place all_reduce).
        Op::AllReduce => world.all_reduce_into(buf, out, SystemOperation::sum()),
        Op::AllGather => world.all_gather_into(&buf[..block], out),
        Op::ReduceScatter => {
            world.reduce_scatter_block_into(buf, &mut out[..block], SystemOperation::sum())
        }
        Op::AllToAll => world.all_to_all_into(buf, out),
    }
}

/// Mean seconds per call of `f` over `iters` calls, max over ranks.
fn time(world: &SimpleCommunicator, iters: usize, mut f: impl FnMut()) -> f64 {
    world.barrier();
    let t = Instant::now();
    for _ in 0..iters {
        f();
    }
    let mine = t.elapsed().as_secs_f64() / iters as f64;
    let mut max = 0.0f64;
    world.all_reduce_into(&mine, &mut max, SystemOperation::max());
    max
}

fn main() {
    let max_mib: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(64);
    let world_env = match MpiWorld::init() {
        Ok(w) => w,
        Err(e) => {
            eprintln!("mpi_bandwidth: {e}");
            std::process::exit(1);
        }
    };
    let comm = world_env.world();
    let raw = SimpleCommunicator::world();
    let (me, n) = (comm.rank(), comm.size());
    if me == 0 {
        println!("# mpi_bandwidth: {n} ranks, f32, times in us (max over ranks of the mean)");
        println!(
            "{:<15} {:>9} {:>11} {:>11} {:>9} {:>10} {:>10}",
            "op", "size", "crate_us", "direct_us", "ratio_med", "busbw_GB/s", "direct_GB/s"
        );
    }
    let mut summary = Vec::new();
    for op in OPS {
        let mut bytes = 4 << 10;
        while bytes <= max_mib << 20 {
            let elems = (bytes / 4) / n * n; // a multiple of n
            let mut buf: Vec<f32> = (0..elems).map(|i| ((i + me) % 7) as f32).collect();
            let mut out = vec![0.0f32; elems];
            let iters = ((256usize << 20) / bytes).clamp(3, 200);
            let rounds = 7;
            // warm-up
            via_crate(&*comm, op, &mut buf, &mut out, n);
            direct(&raw, op, &buf, &mut out, n);
            let (mut tc, mut td) = (f64::INFINITY, f64::INFINITY);
            let mut ratios = Vec::with_capacity(rounds);
            for round in 0..rounds {
                // all_reduce in place grows the values: keep them bounded.
                buf.iter_mut().for_each(|x| *x = 1.0);
                // Alternate which goes first so neither always runs on a warmer cache.
                let (c, d) = if round % 2 == 0 {
                    let c = time(&raw, iters, || via_crate(&*comm, op, &mut buf, &mut out, n));
                    (c, time(&raw, iters, || direct(&raw, op, &buf, &mut out, n)))
                } else {
                    let d = time(&raw, iters, || direct(&raw, op, &buf, &mut out, n));
                    (
                        time(&raw, iters, || via_crate(&*comm, op, &mut buf, &mut out, n)),
                        d,
                    )
                };
                tc = tc.min(c);
                td = td.min(d);
                ratios.push(c / d);
            }
            ratios.sort_by(f64::total_cmp);
            // Median of the per-round paired ratios: robust to load spikes on a shared host.
            let ratio = ratios[rounds / 2];
            let bus = |t: f64| bytes as f64 * op.bus_factor(n) / t / 1e9;
            if me == 0 {
                let size = if bytes >= 1 << 20 {
                    format!("{}MiB", bytes >> 20)
                } else {
                    format!("{}KiB", bytes >> 10)
                };
                println!(
                    "{:<15} {:>9} {:>11.1} {:>11.1} {:>9.3} {:>10.2} {:>10.2}",
                    op.name(),
                    size,
                    tc * 1e6,
                    td * 1e6,
                    ratio,
                    bus(tc),
                    bus(td)
                );
            }
            if bytes >= 1 << 20 {
                summary.push((op, bytes, ratio));
            }
            bytes *= 4;
        }
    }
    if me == 0 {
        for op in OPS {
            let rs: Vec<f64> = summary
                .iter()
                .filter(|(o, _, _)| o.name() == op.name())
                .map(|(_, _, r)| r.ln())
                .collect();
            if !rs.is_empty() {
                let geo = (rs.iter().sum::<f64>() / rs.len() as f64).exp();
                println!(
                    "# {:<15} geometric mean of ratio_med over sizes >= 1 MiB: {geo:.3} (target <= 1.05)",
                    op.name()
                );
            }
        }
    }
    drop(comm);
    drop(world_env);
}
