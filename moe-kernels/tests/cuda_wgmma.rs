//! The Hopper grouped GEMM (`grouped_gemm_wgmma.cu`, [`CudaMoe::grouped_gemm_bf16_wgmma`]).
//!
//! NVRTC part (CI, no GPU): compiles the source for sm_90a (PTX with wgmma / TMA / mbarrier,
//! CUBIN through NVRTC's built-in ptxas, whose report must show no spills and no serialised
//! wgmma) and for sm_80 (the body is a trap there). Without the NVRTC library it prints
//! "skipped: no NVRTC library" and passes, unless `MOE_REQUIRE_NVRTC=1`.
//!
//! Device part: without a CUDA device it prints "skipped: no CUDA device", on a device other
//! than sm_90a "skipped: not sm_90a"; on Hopper it compares with a naive CPU loop on the same
//! bf16 inputs (zero-row experts, all rows to one expert, one row, K / Nout not multiples of the
//! tile, with and without the gather), checks bitwise determinism and the shape errors.

use moe_kernels::cuda::{self, CudaMoe, KernelSource};
use moe_kernels::KernelError;

fn source() -> &'static KernelSource {
    cuda::SOURCES
        .iter()
        .find(|s| s.name == "grouped_gemm_wgmma.cu")
        .expect("grouped_gemm_wgmma.cu in SOURCES")
}

fn nvrtc() -> bool {
    if cuda::nvrtc_available() {
        return true;
    }
    assert!(
        std::env::var("MOE_REQUIRE_NVRTC").as_deref() != Ok("1"),
        "MOE_REQUIRE_NVRTC=1 but the NVRTC library (libnvrtc.so.13) cannot be loaded; \
         put the `nvidia-cuda-nvrtc` wheel's lib folder on LD_LIBRARY_PATH"
    );
    println!("skipped: no NVRTC library");
    false
}

#[test]
fn wgmma_source_compiles_for_sm90a_and_sm80() {
    if !nvrtc() {
        return;
    }
    let src = source();
    assert_eq!(src.kernels, &["grouped_gemm_bf16_wgmma"]);
    // The launch configuration in src/cuda/wgmma.rs assumes these (tiles, stages, threads).
    for define in [
        "#define WG_BM 128\n",
        "#define WG_BN 128\n",
        "#define WG_BK 64\n",
        "#define WG_STAGES 4\n",
        "#define WG_THREADS 384\n",
    ] {
        assert!(
            src.src.contains(define),
            "`{}` changed: update src/cuda/wgmma.rs",
            define.trim()
        );
    }
    let ptx = cuda::compile(src, "sm_90a").expect("sm_90a PTX").to_src();
    for needle in [
        ".entry grouped_gemm_bf16_wgmma(",
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16",
        "wgmma.fence.sync.aligned",
        "wgmma.commit_group.sync.aligned",
        "wgmma.wait_group.sync.aligned",
        "cp.async.bulk.tensor.2d",
        "cp.async.bulk.tensor.3d",
        "mbarrier.try_wait.parity",
        "mbarrier.arrive.expect_tx",
        "cp.async.mbarrier.arrive.noinc",
        "cp.async.cg.shared.global",
    ] {
        assert!(
            ptx.contains(needle),
            "`{needle}` missing from the sm_90a PTX"
        );
    }
    let ptx80 = cuda::compile(src, "sm_80").expect("sm_80 PTX").to_src();
    assert!(ptx80.contains(".entry grouped_gemm_bf16_wgmma("));
    assert!(
        !ptx80.contains("wgmma.mma_async"),
        "sm_80 PTX must not contain wgmma"
    );
    for arch in ["sm_90a", "sm_80"] {
        let cubin =
            cuda::compile_cubin(src, arch).unwrap_or_else(|e| panic!("{arch} to CUBIN: {e}"));
        assert_eq!(&cubin[..4], b"\x7fELF", "{arch}: not an ELF CUBIN");
        println!("{arch}: {} bytes of CUBIN", cubin.len());
    }
}

/// NVRTC's ptxas report for sm_90a (`--ptxas-options=-v`): registers and shared memory are
/// printed; spills and serialised wgmma (ptxas falls back to waiting after every wgmma when it
/// cannot prove the accumulator registers are left alone) fail the test.
#[test]
fn wgmma_ptxas_report_has_no_spills_or_serialisation() {
    use cudarc::nvrtc::result;
    if !nvrtc() {
        return;
    }
    let src = source();
    let text = std::ffi::CString::new(format!("{}\n{}", cuda::COMMON, src.src)).unwrap();
    let name = std::ffi::CString::new(src.name).unwrap();
    let prog = result::create_program(&text, Some(&name)).expect("nvrtcCreateProgram");
    let mut opts = cuda::compile_options("sm_90a");
    opts.push("--ptxas-options=-v".into());
    // SAFETY: `prog` comes from `text` / `name`, which outlive it; destroyed once below.
    let (compiled, log) = unsafe {
        let compiled = result::compile_program(prog, &opts);
        let log = result::get_program_log(prog)
            .map(|l| {
                let bytes: Vec<u8> = l.iter().map(|&c| c as u8).collect();
                String::from_utf8_lossy(&bytes).into_owned()
            })
            .unwrap_or_default();
        let _ = result::destroy_program(prog);
        (compiled, log)
    };
    println!("{log}");
    compiled.unwrap_or_else(|e| panic!("NVRTC with {opts:?}: {e:?}\n{log}"));
    assert!(
        !log.contains("serialized"),
        "ptxas serialised the wgmma instructions:\n{log}"
    );
    for line in log.lines().filter(|l| l.contains("spill")) {
        assert!(
            line.contains("0 bytes spill stores") && line.contains("0 bytes spill loads"),
            "register spills: {line}"
        );
    }
}

// ------------------------------------------------------------------------------------------
// Device tests.

struct Lcg(u64);
impl Lcg {
    fn next(&mut self) -> f32 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
    fn usize(&mut self, n: usize) -> usize {
        ((self.next() + 1.0) * 0.5 * n as f32) as usize % n
    }
}

fn bf16_bits(v: f32) -> u16 {
    (v.to_bits() >> 16) as u16
}

fn bf16_f32(b: u16) -> f32 {
    f32::from_bits(u32::from(b) << 16)
}

fn device() -> Option<CudaMoe> {
    if !cuda::device_available() || !cuda::nvrtc_available() {
        println!("skipped: no CUDA device");
        return None;
    }
    match CudaMoe::new(0) {
        Ok(d) if d.arch() == "sm_90a" => Some(d),
        Ok(d) => {
            println!("skipped: not sm_90a (device is {})", d.arch());
            None
        }
        Err(e) => {
            println!("skipped: no CUDA device ({e})");
            None
        }
    }
}

/// One problem: bf16 `a` `[a_rows, K]`, optional gather, `w` `[E, K, Nout]`, offsets.
struct Case {
    a: Vec<u16>,
    a_rows: usize,
    kdim: usize,
    tok: Option<Vec<u32>>,
    rows: usize,
    w: Vec<u16>,
    experts: usize,
    nout: usize,
    offsets: Vec<u32>,
}

impl Case {
    fn new(
        rng: &mut Lcg,
        counts: &[usize],
        kdim: usize,
        nout: usize,
        gather_tokens: Option<usize>,
    ) -> Case {
        let experts = counts.len();
        let rows: usize = counts.iter().sum();
        let mut offsets = vec![0u32];
        for &c in counts {
            offsets.push(offsets.last().unwrap() + c as u32);
        }
        let a_rows = gather_tokens.unwrap_or(rows);
        let tok = gather_tokens.map(|t| (0..rows).map(|_| rng.usize(t) as u32).collect());
        let a = (0..a_rows * kdim).map(|_| bf16_bits(rng.next())).collect();
        let w = (0..experts * kdim * nout)
            .map(|_| bf16_bits(rng.next()))
            .collect();
        Case {
            a,
            a_rows,
            kdim,
            tok,
            rows,
            w,
            experts,
            nout,
            offsets,
        }
    }

    /// Naive loop (f64 sums of the bf16 values): the product and `sum |a w|` per element.
    fn reference(&self) -> (Vec<f32>, Vec<f32>) {
        let (k, n) = (self.kdim, self.nout);
        let mut c = vec![0f32; self.rows * n];
        let mut scale = vec![0f32; self.rows * n];
        for e in 0..self.experts {
            for r in self.offsets[e] as usize..self.offsets[e + 1] as usize {
                let src = self.tok.as_ref().map_or(r, |t| t[r] as usize);
                if src >= self.a_rows {
                    continue; // out-of-range token index: a zero row
                }
                for j in 0..n {
                    let (mut s, mut m) = (0f64, 0f64);
                    for kk in 0..k {
                        let p = f64::from(bf16_f32(self.a[src * k + kk]))
                            * f64::from(bf16_f32(self.w[(e * k + kk) * n + j]));
                        s += p;
                        m += p.abs();
                    }
                    c[r * n + j] = s as f32;
                    scale[r * n + j] = m as f32;
                }
            }
        }
        (c, scale)
    }

    fn run(&self, dev: &CudaMoe) -> moe_kernels::Result<Vec<f32>> {
        let s = dev.stream();
        // Empty tensors are uploaded as one element (zero-byte allocations are errors).
        let a = s.clone_htod(&padded(&self.a)).unwrap();
        let w = s.clone_htod(&padded(&self.w)).unwrap();
        let off = s.clone_htod(&self.offsets).unwrap();
        let tok = self.tok.as_ref().map(|t| s.clone_htod(&padded(t)).unwrap());
        let c = dev.grouped_gemm_bf16_wgmma(
            &a,
            self.a_rows,
            self.kdim,
            tok.as_ref(),
            self.rows,
            &w,
            self.experts,
            self.nout,
            &off,
        )?;
        Ok(s.clone_dtoh(&c).unwrap())
    }
}

fn padded<T: Copy + Default>(v: &[T]) -> Vec<T> {
    if v.is_empty() {
        vec![T::default()]
    } else {
        v.to_vec()
    }
}

fn check(case: &Case, got: &[f32], what: &str) {
    let (want, scale) = case.reference();
    assert_eq!(got.len(), want.len().max(1), "{what}: length");
    for (i, ((g, w), s)) in got.iter().zip(&want).zip(&scale).enumerate() {
        assert!(
            (g - w).abs() <= 1e-3 * s + 1e-6,
            "{what}: c[{}, {}] gpu {g} cpu {w} (sum |a w| = {s})",
            i / case.nout,
            i % case.nout
        );
    }
}

#[test]
fn wgmma_matches_cpu_loop() {
    let Some(dev) = device() else { return };
    let mut rng = Lcg(11);
    // (counts per expert, K, Nout): zero-row experts, all rows to one expert, one row, K and
    // Nout not multiples of the 64 / 128 tile, K long enough to wrap the 4-stage ring.
    let shapes: Vec<(Vec<usize>, usize, usize)> = vec![
        (vec![1], 8, 8),
        (vec![0, 0, 1, 0], 64, 128),
        (vec![219, 0, 5, 300, 1, 0, 130, 0], 200, 264),
        (vec![0, 0, 0, 500, 0, 0], 520, 136),
        (vec![37, 129, 128, 255], 1024, 256),
        (vec![300], 8, 8),
        (vec![3, 0, 70], 72, 8),
        (vec![260, 7], 136, 392),
    ];
    for (i, (counts, kdim, nout)) in shapes.iter().enumerate() {
        for gather in [false, true] {
            let rows: usize = counts.iter().sum();
            let tokens = gather.then(|| 1 + rng.usize(rows.max(1) + 5));
            let case = Case::new(&mut rng, counts, *kdim, *nout, tokens);
            let what = format!("case {i} {counts:?} K={kdim} Nout={nout} gather={gather}");
            let got = case.run(&dev).unwrap_or_else(|e| panic!("{what}: {e}"));
            check(&case, &got, &what);
            println!("{what}: ok");
        }
    }
    // A gathered token index beyond a_rows reads a zero row.
    let mut case = Case::new(&mut rng, &[5, 6], 16, 16, Some(4));
    if let Some(t) = case.tok.as_mut() {
        t[3] = 1_000;
    }
    let got = case.run(&dev).unwrap();
    check(&case, &got, "out-of-range token");
    assert!(got[3 * 16..4 * 16].iter().all(|&v| v == 0.0));
}

#[test]
fn wgmma_is_deterministic() {
    let Some(dev) = device() else { return };
    let mut rng = Lcg(5);
    for gather in [false, true] {
        let case = Case::new(
            &mut rng,
            &[700, 3, 0, 1200, 64],
            768,
            384,
            gather.then_some(1000),
        );
        let x = case.run(&dev).unwrap();
        let y = case.run(&dev).unwrap();
        let same = x.iter().zip(&y).all(|(p, q)| p.to_bits() == q.to_bits());
        assert!(same, "gather={gather}: two runs differ");
        check(&case, &x, "determinism case");
    }
}

#[test]
fn wgmma_empty_sizes_and_shape_errors() {
    let Some(dev) = device() else { return };
    let s = dev.stream().clone();
    let mut rng = Lcg(3);
    // rows = 0 (and K = 0) return zeros without a launch.
    let empty = Case::new(&mut rng, &[0, 0], 16, 8, None);
    assert!(empty.run(&dev).unwrap().iter().all(|&v| v == 0.0));
    let k0 = Case::new(&mut rng, &[2, 1], 0, 8, None);
    assert_eq!(k0.run(&dev).unwrap(), vec![0.0; 24]);

    let (rows, k, n, e) = (6usize, 16usize, 8usize, 2usize);
    let a = s.clone_htod(&vec![0u16; rows * k]).unwrap();
    let w = s.clone_htod(&vec![0u16; e * k * n]).unwrap();
    let off = s.clone_htod(&[0u32, 3, 6]).unwrap();
    let tok = s.clone_htod(&vec![0u32; rows]).unwrap();
    let short_tok = s.clone_htod(&vec![0u32; rows - 1]).unwrap();
    let bad_off = s.clone_htod(&[0u32, 6]).unwrap();
    let bad_w = s.clone_htod(&vec![0u16; e * k * n - 1]).unwrap();
    let shape = |r: moe_kernels::Result<_>| match r {
        Err(KernelError::ShapeMismatch { tensor, .. }) => tensor,
        other => panic!("expected a shape mismatch, got {other:?}"),
    };
    let ok = dev.grouped_gemm_bf16_wgmma(&a, rows, k, None, rows, &w, e, n, &off);
    assert!(ok.is_ok());
    assert_eq!(
        shape(dev.grouped_gemm_bf16_wgmma(&a, rows + 1, k, None, rows + 1, &w, e, n, &off)),
        "a"
    );
    assert_eq!(
        shape(dev.grouped_gemm_bf16_wgmma(&a, rows, k, None, rows - 1, &w, e, n, &off)),
        "a"
    );
    assert_eq!(
        shape(dev.grouped_gemm_bf16_wgmma(&a, rows, k, Some(&short_tok), rows, &w, e, n, &off)),
        "token_of_row"
    );
    assert_eq!(
        shape(dev.grouped_gemm_bf16_wgmma(&a, rows, k, None, rows, &bad_w, e, n, &off)),
        "w"
    );
    assert_eq!(
        shape(dev.grouped_gemm_bf16_wgmma(&a, rows, k, None, rows, &w, e, n, &bad_off)),
        "offsets"
    );
    // Gathering from 3 token rows of a 6-row buffer: `a` must hold exactly a_rows K elements.
    assert_eq!(
        shape(dev.grouped_gemm_bf16_wgmma(&a, 3, k, Some(&tok), rows, &w, e, n, &off)),
        "a"
    );
    assert!(matches!(
        dev.grouped_gemm_bf16_wgmma(&a, rows, k, None, rows, &w, 0, n, &off),
        Err(KernelError::InvalidConfig(_))
    ));
    // K not a multiple of 8 (TMA strides).
    let a12 = s.clone_htod(&vec![0u16; rows * 12]).unwrap();
    let w12 = s.clone_htod(&vec![0u16; e * 12 * n]).unwrap();
    assert!(matches!(
        dev.grouped_gemm_bf16_wgmma(&a12, rows, 12, None, rows, &w12, e, n, &off),
        Err(KernelError::InvalidConfig(_))
    ));
}

/// Throughput on a Qwen3-30B-A3B-like up projection (E = 128, K = 2048, Nout = 1536, 32768
/// rows, near-uniform routing) next to the sm_80 mma.sync kernel: `cargo test --test
/// cuda_wgmma -- --ignored --nocapture` on an H100.
#[test]
#[ignore = "benchmark; needs an sm_90a device"]
fn wgmma_throughput() {
    let Some(dev) = device() else { return };
    let s = dev.stream().clone();
    let (experts, kdim, nout, rows) = (128usize, 2048usize, 1536usize, 32_768usize);
    let mut rng = Lcg(9);
    let mut counts = vec![rows / experts; experts];
    for _ in 0..experts {
        let (i, j) = (rng.usize(experts), rng.usize(experts));
        let d = counts[i].min(rng.usize(64));
        counts[i] -= d;
        counts[j] += d;
    }
    let mut offsets = vec![0u32];
    for &c in &counts {
        offsets.push(offsets.last().unwrap() + c as u32);
    }
    let a: Vec<u16> = (0..rows * kdim).map(|_| bf16_bits(rng.next())).collect();
    let w: Vec<u16> = (0..experts * kdim * nout)
        .map(|_| bf16_bits(rng.next()))
        .collect();
    let (a, w, off) = (
        s.clone_htod(&a).unwrap(),
        s.clone_htod(&w).unwrap(),
        s.clone_htod(&offsets).unwrap(),
    );
    let flop = 2.0 * (rows * kdim * nout) as f64;
    let time = |f: &dyn Fn()| {
        f();
        s.synchronize().unwrap();
        let t = std::time::Instant::now();
        for _ in 0..10 {
            f();
        }
        s.synchronize().unwrap();
        t.elapsed().as_secs_f64() / 10.0
    };
    let t_wgmma = time(&|| {
        dev.grouped_gemm_bf16_wgmma(&a, rows, kdim, None, rows, &w, experts, nout, &off)
            .unwrap();
    });
    let t_mma = time(&|| {
        dev.grouped_gemm_bf16_mma(&a, rows, kdim, &w, experts, nout, &off)
            .unwrap();
    });
    println!(
        "wgmma {:.1} TFLOP/s ({:.3} ms), mma.sync {:.1} TFLOP/s ({:.3} ms)",
        flop / t_wgmma / 1e12,
        t_wgmma * 1e3,
        flop / t_mma / 1e12,
        t_mma * 1e3
    );
}
