//! Benchmark (not a test; prints figures): local shape / offset for all ranks of an (8, 8, 4)
//! mesh on a 3-D tensor, and planning 1,000 random redistributions on 1-D to 3-D meshes.
//! Run: `cargo bench -p placement --bench placement_bench`.

use std::hint::black_box;
use std::time::Instant;

use placement::redistribute::plan_redistribute;
use placement::traffic::plan_traffic;
use placement::{local_shard_for_rank, parse_placements, DeviceMesh, Placement};

/// Small deterministic generator (xorshift64*), so runs are comparable.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

fn random_placements(rng: &mut Rng, mesh_ndim: usize, ndim: usize) -> Vec<Placement> {
    let partial = rng.below(2) == 0;
    (0..mesh_ndim)
        .map(|_| match rng.below(5) {
            0 | 1 => Placement::Shard(rng.below(ndim)),
            2 if partial => Placement::Partial(placement::PartialOp::Sum),
            _ => Placement::Replicate,
        })
        .collect()
}

fn main() -> Result<(), placement::PlacementError> {
    // 1. Local shape and offset of every rank of an (8, 8, 4) mesh on a 3-D tensor.
    let mesh = DeviceMesh::new(vec![8, 8, 4])?;
    let global = [4099, 1027, 515];
    for text in [
        "[S(0), S(1), S(2)]",
        "[S(0), S(0), S(1)]",
        "[_S(0, 8), S(0), S(2)]",
    ] {
        let p = parse_placements(text)?;
        let reps = 50;
        let t0 = Instant::now();
        let mut checksum = 0usize;
        for _ in 0..reps {
            for r in 0..mesh.size() {
                let s = local_shard_for_rank(&global, &mesh, &p, r)?;
                checksum = checksum.wrapping_add(s.local_shape[0] + s.global_offset[1]);
            }
        }
        let dt = t0.elapsed();
        let per_all = dt / reps;
        println!(
            "local shape/offset, mesh (8,8,4) = 256 ranks, global {global:?}, {text}: {per_all:?} for all ranks ({:.0} ns/rank; checksum {})",
            per_all.as_nanos() as f64 / mesh.size() as f64,
            black_box(checksum)
        );
    }

    // 2. Planning 1,000 random redistributions on 1-D to 3-D meshes.
    let meshes = [
        vec![8],
        vec![4, 2],
        vec![2, 4],
        vec![2, 2, 2],
        vec![8, 8, 4],
    ];
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let mut cases = Vec::with_capacity(1000);
    for i in 0..1000 {
        let mesh = DeviceMesh::new(meshes[i % meshes.len()].clone())?;
        let ndim = 1 + rng.below(3);
        let shape: Vec<usize> = (0..ndim).map(|_| 1 + rng.below(4096)).collect();
        let src = random_placements(&mut rng, mesh.ndim(), ndim);
        let mut dst = random_placements(&mut rng, mesh.ndim(), ndim);
        // Keep targets the public API accepts: P only where the source has the same P.
        for (d, s) in dst.iter_mut().zip(&src) {
            if d.is_partial() && d != s {
                *d = Placement::Replicate;
            }
        }
        cases.push((mesh, shape, src, dst));
    }
    let t0 = Instant::now();
    let mut steps = 0usize;
    let mut alternatives = 0usize;
    for (mesh, shape, src, dst) in &cases {
        let plan = plan_redistribute(shape, mesh, src, dst)?;
        steps += plan.steps.len();
        alternatives += usize::from(plan.alternative.is_some());
        black_box(&plan);
    }
    let dt = t0.elapsed();
    println!(
        "planning 1,000 random redistributions: {dt:?} ({:.2} us/plan; {steps} steps, {alternatives} plans with a cheaper merged alternative)",
        dt.as_secs_f64() * 1e6 / 1000.0
    );
    // Baseline in the same run: planning plus per-rank traffic for every rank.
    let t0 = Instant::now();
    let mut bytes = 0usize;
    for (mesh, shape, src, dst) in cases.iter().take(100) {
        let plan = plan_redistribute(shape, mesh, src, dst)?;
        for step in plan_traffic(&plan, mesh, 2)? {
            bytes = bytes.wrapping_add(step.iter().map(|t| t.send_bytes).sum::<usize>());
        }
    }
    let dt2 = t0.elapsed();
    println!(
        "planning + per-rank bf16 traffic of 100 of them: {dt2:?} ({:.1} us/plan, {:.1}x plan-only; checksum {})",
        dt2.as_secs_f64() * 1e6 / 100.0,
        (dt2.as_secs_f64() / 100.0) / (dt.as_secs_f64() / 1000.0),
        black_box(bytes)
    );
    Ok(())
}
