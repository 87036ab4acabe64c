//! CUDA kernels of the MoE layer (first slice of issue 7, **unverified on a GPU**): CUDA C++
//! sources under `src/cuda/kernels/`, compiled at run time by NVRTC through `cudarc` (dynamic
//! loading: the crate builds and its CPU path runs without CUDA), cached per device
//! ([`CudaMoe`]) and compile options.
//!
//! The sources need no CUDA headers (bf16 is carried as raw `u16` bits, see `common.cuh`), so the
//! NVRTC library alone (PyPI `nvidia-cuda-nvrtc`) compiles them; CI does so for every source and
//! every architecture in [`ARCHS`] ([`compile_all`]).
//!
//! Kernels: softmax top-k router (f32 / bf16 logits), per-expert counts + exclusive scan + stable
//! scatter ([`CudaMoe::permutation`], the [`crate::Permutation`] of the CPU path), dispatch gather,
//! M-grouped GEMM (tiled, f32 / bf16 inputs, f32 accumulation), SwiGLU, combine (deterministic
//! per-token gather-sum); every router of [`RouterKind`] ([`CudaMoe::route`]), the GLU
//! activations and expert biases; the backward of the expert pipeline (dX grouped GEMM
//! [`CudaMoe::grouped_gemm_nt`], dW K-grouped GEMM [`CudaMoe::grouped_gemm_tn`], bias sums, GLU,
//! combine and permutation backward), all deterministic (no atomics). Every wrapper checks lengths and dimensions before launching and
//! returns [`KernelError`] (never panics) for bad shapes, a missing driver / device or a CUDA
//! error.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use cudarc::driver::{
    CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, LaunchConfig, PushKernelArg,
};
use cudarc::nvrtc::{CompileOptions, Ptx};

use crate::config::{Activation, RouterKind};
use crate::error::{KernelError, Result};
use crate::router::RouterConfig;

/// Helpers prepended to every source (bf16 as raw bits, loads widening to f32).
pub const COMMON: &str = include_str!("kernels/common.cuh");

/// One kernel source file and the `extern "C"` kernels it defines.
#[derive(Debug, Clone, Copy)]
pub struct KernelSource {
    /// File name under `src/cuda/kernels/`.
    pub name: &'static str,
    /// The CUDA C++ text (without [`COMMON`]).
    pub src: &'static str,
    /// Names of its `extern "C" __global__` kernels.
    pub kernels: &'static [&'static str],
}

/// Every kernel source of the crate.
pub const SOURCES: &[KernelSource] = &[
    KernelSource {
        name: "router.cu",
        src: include_str!("kernels/router.cu"),
        kernels: &[
            "softmax_topk_f32",
            "softmax_topk_bf16",
            "topk_softmax_f32",
            "sigmoid_topk_f32",
        ],
    },
    KernelSource {
        name: "permute.cu",
        src: include_str!("kernels/permute.cu"),
        kernels: &[
            "permute_hist",
            "permute_scan",
            "permute_scatter",
            "gather_rows_f32",
            "gather_rows_bf16",
        ],
    },
    KernelSource {
        name: "grouped_gemm.cu",
        src: include_str!("kernels/grouped_gemm.cu"),
        kernels: &[
            "grouped_gemm_f32",
            "grouped_gemm_bf16",
            "grouped_gemm_nt_f32",
            "grouped_gemm_tn_f32",
        ],
    },
    KernelSource {
        name: "grouped_gemm_mma.cu",
        src: include_str!("kernels/grouped_gemm_mma.cu"),
        kernels: &["grouped_gemm_bf16_mma"],
    },
    KernelSource {
        name: "activation_combine.cu",
        src: include_str!("kernels/activation_combine.cu"),
        kernels: &["swiglu_f32", "combine_f32"],
    },
    KernelSource {
        name: "expert_ops.cu",
        src: include_str!("kernels/expert_ops.cu"),
        kernels: &[
            "glu_f32",
            "glu_backward_f32",
            "add_row_bias_f32",
            "grouped_row_sum_f32",
            "permute_backward_f32",
            "combine_backward_y_f32",
            "combine_backward_w_f32",
        ],
    },
];

/// Architectures CI compiles every source for (Ampere and Hopper).
pub const ARCHS: &[&str] = &["sm_80", "sm_90a"];

/// Slots per chunk of the permutation kernels (`PERM_CHUNK` in `permute.cu`).
const PERM_CHUNK: usize = 256;
/// Threads per block of the grouped GEMM, rows / columns per tile (`GG_*` in `grouped_gemm.cu`).
const GG_THREADS: u32 = 256;
const GG_TM: usize = 64;
const GG_TN: usize = 64;
/// Index of each source in [`SOURCES`].
const SRC_ROUTER: usize = 0;
const SRC_GEMM: usize = 2;
const SRC_EXPERT_OPS: usize = 5;

fn cuda_err(what: &str, e: impl std::fmt::Debug) -> KernelError {
    KernelError::Cuda(format!("{what}: {e:?}"))
}

/// The NVRTC options the runtime uses for `arch` (e.g. `"sm_80"`, `"sm_90a"`).
pub fn compile_options(arch: &str) -> Vec<String> {
    vec![
        format!("--gpu-architecture={arch}"),
        "-std=c++17".into(),
        "--fmad=true".into(),
    ]
}

/// Whether the NVRTC shared library can be loaded (no panic when it cannot).
pub fn nvrtc_available() -> bool {
    // SAFETY: only tries to dlopen the candidate library names.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

/// `(major, minor)` of the loaded NVRTC library.
///
/// # Errors
/// [`KernelError::Cuda`] when NVRTC is missing or fails.
pub fn nvrtc_version() -> Result<(i32, i32)> {
    if !nvrtc_available() {
        return Err(KernelError::Cuda("NVRTC library not found".into()));
    }
    let (mut major, mut minor) = (0, 0);
    // SAFETY: the library is present; the pointers are valid for the call.
    let r = unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor) };
    if r != cudarc::nvrtc::sys::nvrtcResult::NVRTC_SUCCESS {
        return Err(cuda_err("nvrtcVersion", r));
    }
    Ok((major, minor))
}

/// Compiles one source (with [`COMMON`] prepended) for `arch` to PTX.
///
/// # Errors
/// [`KernelError::Cuda`] with the NVRTC log when NVRTC is missing or compilation fails.
pub fn compile(source: &KernelSource, arch: &str) -> Result<Ptx> {
    if !nvrtc_available() {
        return Err(KernelError::Cuda("NVRTC library not found".into()));
    }
    let text = format!("{COMMON}\n{}", source.src);
    let opts = CompileOptions {
        options: compile_options(arch),
        name: Some(source.name.to_string()),
        ..Default::default()
    };
    cudarc::nvrtc::compile_ptx_with_opts(text, opts).map_err(|e| match e {
        cudarc::nvrtc::CompileError::CompileError { log, options, .. } => {
            KernelError::Cuda(format!(
                "NVRTC failed on {} with {options:?}:\n{}",
                source.name,
                log.to_string_lossy()
            ))
        }
        other => cuda_err(source.name, other),
    })
}

/// Compiles one source (with [`COMMON`] prepended) for a real architecture `arch` (e.g.
/// `"sm_90a"`) all the way to a CUBIN: NVRTC runs its built-in PTX assembler, so errors that
/// PTX generation lets through (inline-assembly operands, instructions the architecture lacks,
/// register or shared-memory limits) fail here too. Returns the CUBIN bytes.
///
/// # Errors
/// [`KernelError::Cuda`] with the NVRTC log when NVRTC is missing or compilation fails.
pub fn compile_cubin(source: &KernelSource, arch: &str) -> Result<Vec<u8>> {
    use cudarc::nvrtc::{result, sys};
    if !nvrtc_available() {
        return Err(KernelError::Cuda("NVRTC library not found".into()));
    }
    let text = std::ffi::CString::new(format!("{COMMON}\n{}", source.src))
        .map_err(|e| cuda_err(source.name, e))?;
    let name = std::ffi::CString::new(source.name).map_err(|e| cuda_err(source.name, e))?;
    let prog = result::create_program(&text, Some(&name)).map_err(|e| cuda_err(source.name, e))?;
    let opts = compile_options(arch);
    // SAFETY: `prog` was just created from `text` / `name`, which outlive it, and is destroyed
    // exactly once below; the CUBIN buffer has the size NVRTC reported.
    let out = unsafe {
        let compiled = result::compile_program(prog, &opts);
        let res = match compiled {
            Err(e) => {
                let log = result::get_program_log(prog)
                    .map(|l| {
                        let bytes: Vec<u8> = l.iter().map(|&c| c as u8).collect();
                        String::from_utf8_lossy(&bytes).into_owned()
                    })
                    .unwrap_or_default();
                Err(KernelError::Cuda(format!(
                    "NVRTC failed on {} with {opts:?}: {e:?}\n{log}",
                    source.name
                )))
            }
            Ok(()) => {
                let mut size = 0usize;
                let r = sys::nvrtcGetCUBINSize(prog, &mut size);
                if r != sys::nvrtcResult::NVRTC_SUCCESS {
                    Err(cuda_err("nvrtcGetCUBINSize", r))
                } else {
                    let mut buf = vec![0u8; size];
                    let r = sys::nvrtcGetCUBIN(prog, buf.as_mut_ptr().cast());
                    if r != sys::nvrtcResult::NVRTC_SUCCESS {
                        Err(cuda_err("nvrtcGetCUBIN", r))
                    } else {
                        Ok(buf)
                    }
                }
            }
        };
        let _ = result::destroy_program(prog);
        res
    }?;
    if out.is_empty() {
        return Err(KernelError::Cuda(format!(
            "{}: NVRTC returned an empty CUBIN for {arch}",
            source.name
        )));
    }
    Ok(out)
}

/// Compiles every source in [`SOURCES`] for `arch`; returns `(source name, PTX size in bytes)`.
/// Checks that each declared kernel appears as an `.entry` of the PTX.
///
/// # Errors
/// The first compilation error, or [`KernelError::Cuda`] naming a missing entry point.
pub fn compile_all(arch: &str) -> Result<Vec<(&'static str, usize)>> {
    SOURCES
        .iter()
        .map(|s| {
            let ptx = compile(s, arch)?.to_src();
            for k in s.kernels {
                if !ptx.contains(&format!(".entry {k}(")) {
                    return Err(KernelError::Cuda(format!(
                        "{}: kernel `{k}` missing from the PTX for {arch}",
                        s.name
                    )));
                }
            }
            Ok((s.name, ptx.len()))
        })
        .collect()
}

/// Whether a CUDA driver and at least one device are present (no panic when not).
pub fn device_available() -> bool {
    // SAFETY: only tries to dlopen the candidate library names.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return false;
    }
    matches!(CudaContext::device_count(), Ok(n) if n > 0)
}

/// Routing on the device: `top_k_index` `[T, k]`, `top_k_weights` `[T, k]`, `probs` `[T, E]`.
#[derive(Debug)]
pub struct GpuRouting {
    /// Selected experts per token, descending probability, ties to the lowest index.
    pub top_k_index: CudaSlice<u32>,
    /// Their (optionally renormalised) probabilities.
    pub top_k_weights: CudaSlice<f32>,
    /// Full softmax.
    pub probs: CudaSlice<f32>,
}

/// The permutation on the device (the fields of [`crate::Permutation`], as `u32`).
#[derive(Debug)]
pub struct GpuPermutation {
    /// `[E]` rows per expert.
    pub counts: CudaSlice<u32>,
    /// `[E + 1]` exclusive scan of `counts`.
    pub offsets: CudaSlice<u32>,
    /// `[T k]` the row of slot `t k + j`.
    pub row_of_slot: CudaSlice<u32>,
    /// `[N = T k]` the slot of each row.
    pub slot_of_row: CudaSlice<u32>,
    /// `[N]` the token of each row.
    pub token_of_row: CudaSlice<u32>,
}

/// Loaded modules keyed by (source name, NVRTC options).
type ModuleCache = HashMap<(&'static str, Vec<String>), Arc<CudaModule>>;

/// A device, its stream and the compiled modules (cached per source and compile options).
pub struct CudaMoe {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    arch: String,
    modules: Mutex<ModuleCache>,
}

impl std::fmt::Debug for CudaMoe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaMoe")
            .field("ordinal", &self.ctx.ordinal())
            .field("arch", &self.arch)
            .finish()
    }
}

/// Device buffers of zero elements are allocated with one element (a zero-byte allocation is an
/// error for the driver), so an empty tensor is accepted with length 0 or 1.
fn check_len(tensor: &'static str, len: usize, want: usize, symbols: String) -> Result<()> {
    if len == want || (want == 0 && len <= 1) {
        Ok(())
    } else {
        Err(KernelError::ShapeMismatch {
            tensor,
            expected: format!("{symbols} = {want} elements"),
            got: vec![len],
        })
    }
}

fn to_i32(name: &'static str, v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| KernelError::ShapeMismatch {
        tensor: name,
        expected: "a dimension below 2^31".into(),
        got: vec![v],
    })
}

fn grid_for(n: usize) -> LaunchConfig {
    let blocks = n.div_ceil(256).clamp(1, 65_535) as u32;
    LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

impl CudaMoe {
    /// Opens device `ordinal`; compiles for its compute capability (`sm_90` becomes `sm_90a`).
    ///
    /// # Errors
    /// [`KernelError::NoCudaDevice`] when the driver library or the device is missing,
    /// [`KernelError::Cuda`] for other driver errors.
    pub fn new(ordinal: usize) -> Result<Self> {
        // SAFETY: only tries to dlopen the candidate library names.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return Err(KernelError::NoCudaDevice("libcuda not found".into()));
        }
        let n = CudaContext::device_count()
            .map_err(|e| KernelError::NoCudaDevice(format!("cuDeviceGetCount: {e:?}")))?;
        if ordinal >= n.max(0) as usize {
            return Err(KernelError::NoCudaDevice(format!(
                "device {ordinal} requested, {n} visible"
            )));
        }
        let ctx = CudaContext::new(ordinal).map_err(|e| cuda_err("CudaContext::new", e))?;
        let (major, minor) = ctx
            .compute_capability()
            .map_err(|e| cuda_err("compute_capability", e))?;
        let arch = if major == 9 && minor == 0 {
            "sm_90a".to_string()
        } else {
            format!("sm_{major}{minor}")
        };
        let stream = ctx.default_stream();
        Ok(CudaMoe {
            ctx,
            stream,
            arch,
            modules: Mutex::new(HashMap::new()),
        })
    }

    /// The stream every wrapper launches on (use it for copies to and from the device).
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// The architecture kernels are compiled for, e.g. `"sm_80"`.
    pub fn arch(&self) -> &str {
        &self.arch
    }

    fn function(&self, source: &KernelSource, kernel: &str) -> Result<CudaFunction> {
        let opts = compile_options(&self.arch);
        let key = (source.name, opts);
        let mut cache = self
            .modules
            .lock()
            .map_err(|_| KernelError::Cuda("module cache poisoned".into()))?;
        let module = match cache.get(&key) {
            Some(m) => m.clone(),
            None => {
                let ptx = compile(source, &self.arch)?;
                let m = self
                    .ctx
                    .load_module(ptx)
                    .map_err(|e| cuda_err("load_module", e))?;
                cache.insert(key, m.clone());
                m
            }
        };
        module
            .load_function(kernel)
            .map_err(|e| cuda_err(kernel, e))
    }

    fn alloc_zeros<T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits>(
        &self,
        len: usize,
    ) -> Result<CudaSlice<T>> {
        self.stream
            .alloc_zeros::<T>(len.max(1))
            .map_err(|e| cuda_err("alloc_zeros", e))
    }

    /// Softmax top-k router on logits `[T, E]` (f32), one thread per token.
    ///
    /// Non-finite logits are not detected on the device (the CPU path returns an error).
    ///
    /// # Errors
    /// [`KernelError::ZeroTopK`], [`KernelError::TopKTooLarge`], [`KernelError::ShapeMismatch`]
    /// naming `logits`, CUDA errors.
    pub fn softmax_topk(
        &self,
        logits: &CudaSlice<f32>,
        tokens: usize,
        experts: usize,
        cfg: &RouterConfig,
    ) -> Result<GpuRouting> {
        self.softmax_topk_impl(logits, tokens, experts, cfg, "softmax_topk_f32")
    }

    /// [`CudaMoe::softmax_topk`] on bf16 logits (raw bits), f32 math.
    ///
    /// # Errors
    /// As [`CudaMoe::softmax_topk`].
    pub fn softmax_topk_bf16(
        &self,
        logits: &CudaSlice<u16>,
        tokens: usize,
        experts: usize,
        cfg: &RouterConfig,
    ) -> Result<GpuRouting> {
        self.softmax_topk_impl(logits, tokens, experts, cfg, "softmax_topk_bf16")
    }

    fn softmax_topk_impl<T>(
        &self,
        logits: &CudaSlice<T>,
        tokens: usize,
        experts: usize,
        cfg: &RouterConfig,
        kernel: &str,
    ) -> Result<GpuRouting> {
        let k = cfg.top_k;
        if k == 0 {
            return Err(KernelError::ZeroTopK);
        }
        if k > experts {
            return Err(KernelError::TopKTooLarge {
                top_k: k,
                num_experts: experts,
            });
        }
        check_len(
            "logits",
            logits.len(),
            tokens * experts,
            format!("[T={tokens}, E={experts}]"),
        )?;
        let (t, e, ki) = (
            to_i32("tokens", tokens)?,
            to_i32("experts", experts)?,
            to_i32("top_k", k)?,
        );
        let renorm = i32::from(cfg.norm_topk_prob);
        let mut probs = self.alloc_zeros::<f32>(tokens * experts)?;
        let mut idx = self.alloc_zeros::<u32>(tokens * k)?;
        let mut w = self.alloc_zeros::<f32>(tokens * k)?;
        if tokens > 0 {
            let f = self.function(&SOURCES[0], kernel)?;
            let mut b = self.stream.launch_builder(&f);
            b.arg(logits)
                .arg(&t)
                .arg(&e)
                .arg(&ki)
                .arg(&renorm)
                .arg(&mut probs)
                .arg(&mut idx)
                .arg(&mut w);
            // SAFETY: argument types and lengths match the kernel signature (checked above).
            unsafe { b.launch(grid_for(tokens)) }.map_err(|e| cuda_err(kernel, e))?;
        }
        Ok(GpuRouting {
            top_k_index: idx,
            top_k_weights: w,
            probs,
        })
    }

    /// Counts, exclusive scan and stable scatter of `top_k_index` `[T, k]` (expert ids < E):
    /// the device twin of [`crate::Permutation::from_top_k_index`], deterministic.
    ///
    /// # Errors
    /// [`KernelError::ShapeMismatch`] naming `top_k_index` (length not `T k`, or an expert id
    /// `>= E`: reported after the kernels ran, one 4-byte copy back), CUDA errors.
    pub fn permutation(
        &self,
        top_k_index: &CudaSlice<u32>,
        tokens: usize,
        top_k: usize,
        experts: usize,
    ) -> Result<GpuPermutation> {
        if top_k == 0 {
            return Err(KernelError::ZeroTopK);
        }
        if experts == 0 {
            return Err(KernelError::InvalidConfig("E must be at least 1".into()));
        }
        let slots = tokens * top_k;
        check_len(
            "top_k_index",
            top_k_index.len(),
            slots,
            format!("[T={tokens}, k={top_k}]"),
        )?;
        let (s_i, e_i, k_i) = (
            to_i32("slots", slots)?,
            to_i32("experts", experts)?,
            to_i32("top_k", top_k)?,
        );
        let chunks = slots.div_ceil(PERM_CHUNK).max(1);
        let c_i = to_i32("chunks", chunks)?;
        let mut hist = self.alloc_zeros::<u32>(chunks * experts)?;
        let mut counts = self.alloc_zeros::<u32>(experts)?;
        let mut offsets = self.alloc_zeros::<u32>(experts + 1)?;
        let mut row_of_slot = self.alloc_zeros::<u32>(slots)?;
        let mut slot_of_row = self.alloc_zeros::<u32>(slots)?;
        let mut token_of_row = self.alloc_zeros::<u32>(slots)?;
        let mut bad = self
            .stream
            .clone_htod(&[s_i])
            .map_err(|e| cuda_err("clone_htod", e))?;
        let src = &SOURCES[1];
        let chunk_cfg = LaunchConfig {
            grid_dim: (chunks as u32, 1, 1),
            block_dim: (PERM_CHUNK as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        let f = self.function(src, "permute_hist")?;
        let mut b = self.stream.launch_builder(&f);
        b.arg(top_k_index)
            .arg(&s_i)
            .arg(&e_i)
            .arg(&mut hist)
            .arg(&mut bad);
        // SAFETY: lengths checked above; hist is [chunks, E].
        unsafe { b.launch(chunk_cfg) }.map_err(|e| cuda_err("permute_hist", e))?;
        let f = self.function(src, "permute_scan")?;
        let mut b = self.stream.launch_builder(&f);
        b.arg(&mut hist)
            .arg(&c_i)
            .arg(&e_i)
            .arg(&mut counts)
            .arg(&mut offsets);
        let one_block = LaunchConfig {
            grid_dim: (1, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: as above; offsets has E + 1 entries.
        unsafe { b.launch(one_block) }.map_err(|e| cuda_err("permute_scan", e))?;
        let f = self.function(src, "permute_scatter")?;
        let mut b = self.stream.launch_builder(&f);
        b.arg(top_k_index)
            .arg(&s_i)
            .arg(&e_i)
            .arg(&k_i)
            .arg(&hist)
            .arg(&mut row_of_slot)
            .arg(&mut slot_of_row)
            .arg(&mut token_of_row);
        // SAFETY: as above; the three outputs have T k entries.
        unsafe { b.launch(chunk_cfg) }.map_err(|e| cuda_err("permute_scatter", e))?;
        let bad = self
            .stream
            .clone_dtoh(&bad)
            .map_err(|e| cuda_err("clone_dtoh", e))?;
        if let Some(&first) = bad.first() {
            if first < s_i {
                return Err(KernelError::ShapeMismatch {
                    tensor: "top_k_index",
                    expected: format!("expert ids < E={experts} (got: the first bad slot)"),
                    got: vec![first as usize],
                });
            }
        }
        Ok(GpuPermutation {
            counts,
            offsets,
            row_of_slot,
            slot_of_row,
            token_of_row,
        })
    }

    /// Dispatch gather: `xp[r] = x[token_of_row[r]]`, `x` `[T, H]` -> `xp` `[N, H]` (f32).
    ///
    /// # Errors
    /// [`KernelError::ShapeMismatch`] naming `x`; CUDA errors. Token ids are trusted (they come
    /// from [`CudaMoe::permutation`]).
    pub fn gather_rows(
        &self,
        x: &CudaSlice<f32>,
        tokens: usize,
        hidden: usize,
        token_of_row: &CudaSlice<u32>,
        rows: usize,
    ) -> Result<CudaSlice<f32>> {
        check_len(
            "x",
            x.len(),
            tokens * hidden,
            format!("[T={tokens}, H={hidden}]"),
        )?;
        check_len(
            "token_of_row",
            token_of_row.len(),
            rows,
            format!("[N={rows}]"),
        )?;
        let (h_i, r_i) = (to_i32("hidden", hidden)?, to_i32("rows", rows)?);
        let mut xp = self.alloc_zeros::<f32>(rows * hidden)?;
        if rows * hidden > 0 {
            let f = self.function(&SOURCES[1], "gather_rows_f32")?;
            let mut b = self.stream.launch_builder(&f);
            b.arg(x).arg(&h_i).arg(token_of_row).arg(&r_i).arg(&mut xp);
            // SAFETY: lengths checked above.
            unsafe { b.launch(grid_for(rows * hidden)) }.map_err(|e| cuda_err("gather_rows", e))?;
        }
        Ok(xp)
    }

    /// M-grouped GEMM: `c[rows_e] = a[rows_e] @ w[e]`, `a` `[N, K]`, `w` `[E, K, Nout]`,
    /// `offsets` `[E + 1]` (a scan ending at `N`, e.g. [`GpuPermutation::offsets`]) -> `[N, Nout]`.
    ///
    /// # Errors
    /// [`KernelError::ShapeMismatch`] naming `a`, `w` or `offsets`; CUDA errors.
    #[allow(clippy::too_many_arguments)]
    pub fn grouped_gemm(
        &self,
        a: &CudaSlice<f32>,
        rows: usize,
        kdim: usize,
        w: &CudaSlice<f32>,
        experts: usize,
        nout: usize,
        offsets: &CudaSlice<u32>,
    ) -> Result<CudaSlice<f32>> {
        self.grouped_gemm_impl(a, rows, kdim, w, experts, nout, offsets, "grouped_gemm_f32")
    }

    /// [`CudaMoe::grouped_gemm`] on bf16 inputs (raw bits), f32 accumulation and output.
    ///
    /// # Errors
    /// As [`CudaMoe::grouped_gemm`].
    #[allow(clippy::too_many_arguments)]
    pub fn grouped_gemm_bf16(
        &self,
        a: &CudaSlice<u16>,
        rows: usize,
        kdim: usize,
        w: &CudaSlice<u16>,
        experts: usize,
        nout: usize,
        offsets: &CudaSlice<u32>,
    ) -> Result<CudaSlice<f32>> {
        self.grouped_gemm_impl(
            a,
            rows,
            kdim,
            w,
            experts,
            nout,
            offsets,
            "grouped_gemm_bf16",
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn grouped_gemm_impl<T>(
        &self,
        a: &CudaSlice<T>,
        rows: usize,
        kdim: usize,
        w: &CudaSlice<T>,
        experts: usize,
        nout: usize,
        offsets: &CudaSlice<u32>,
        kernel: &str,
    ) -> Result<CudaSlice<f32>> {
        if experts == 0 {
            return Err(KernelError::InvalidConfig("E must be at least 1".into()));
        }
        check_len("a", a.len(), rows * kdim, format!("[N={rows}, K={kdim}]"))?;
        check_len(
            "w",
            w.len(),
            experts * kdim * nout,
            format!("[E={experts}, K={kdim}, Nout={nout}]"),
        )?;
        check_len(
            "offsets",
            offsets.len(),
            experts + 1,
            format!("[E + 1 = {}]", experts + 1),
        )?;
        let (e_i, k_i, n_i) = (
            to_i32("experts", experts)?,
            to_i32("K", kdim)?,
            to_i32("Nout", nout)?,
        );
        to_i32("rows", rows)?;
        let mut c = self.alloc_zeros::<f32>(rows * nout)?;
        if rows > 0 && nout > 0 {
            let tiles = rows.div_ceil(GG_TM) + experts;
            let cfg = LaunchConfig {
                grid_dim: (
                    nout.div_ceil(GG_TN) as u32,
                    to_i32("tiles", tiles)? as u32,
                    1,
                ),
                block_dim: (GG_THREADS, 1, 1),
                shared_mem_bytes: 0,
            };
            let f = self.function(&SOURCES[2], kernel)?;
            let mut b = self.stream.launch_builder(&f);
            b.arg(a)
                .arg(w)
                .arg(offsets)
                .arg(&e_i)
                .arg(&k_i)
                .arg(&n_i)
                .arg(&mut c);
            // SAFETY: lengths checked above; rows beyond offsets[E] are never read.
            unsafe { b.launch(cfg) }.map_err(|e| cuda_err(kernel, e))?;
        }
        Ok(c)
    }

    /// [`CudaMoe::grouped_gemm_bf16`] on tensor cores (mma.sync m16n8k16, ldmatrix, cp.async
    /// when K and Nout are multiples of 8); needs sm_80 or newer.
    ///
    /// # Errors
    /// As [`CudaMoe::grouped_gemm`]; [`KernelError::Cuda`] on a device older than sm_80.
    #[allow(clippy::too_many_arguments)]
    pub fn grouped_gemm_bf16_mma(
        &self,
        a: &CudaSlice<u16>,
        rows: usize,
        kdim: usize,
        w: &CudaSlice<u16>,
        experts: usize,
        nout: usize,
        offsets: &CudaSlice<u32>,
    ) -> Result<CudaSlice<f32>> {
        let sm: u32 = self
            .arch
            .trim_start_matches("sm_")
            .trim_end_matches('a')
            .parse()
            .unwrap_or(0);
        if sm < 80 {
            return Err(KernelError::Cuda(format!(
                "grouped_gemm_bf16_mma needs sm_80 or newer, device is {}",
                self.arch
            )));
        }
        if experts == 0 {
            return Err(KernelError::InvalidConfig("E must be at least 1".into()));
        }
        check_len("a", a.len(), rows * kdim, format!("[N={rows}, K={kdim}]"))?;
        check_len(
            "w",
            w.len(),
            experts * kdim * nout,
            format!("[E={experts}, K={kdim}, Nout={nout}]"),
        )?;
        check_len(
            "offsets",
            offsets.len(),
            experts + 1,
            format!("[E + 1 = {}]", experts + 1),
        )?;
        let (e_i, k_i, n_i) = (
            to_i32("experts", experts)?,
            to_i32("K", kdim)?,
            to_i32("Nout", nout)?,
        );
        to_i32("rows", rows)?;
        // cudarc allocations are 256-byte aligned, so 16-byte alignment of every row follows
        // from K and Nout being multiples of 8 bf16.
        let vec16 = i32::from(kdim % 8 == 0 && nout % 8 == 0);
        let mut c = self.alloc_zeros::<f32>(rows * nout)?;
        if rows > 0 && nout > 0 {
            let tiles = rows.div_ceil(GG_TM) + experts;
            let cfg = LaunchConfig {
                grid_dim: (
                    nout.div_ceil(GG_TN) as u32,
                    to_i32("tiles", tiles)? as u32,
                    1,
                ),
                block_dim: (128, 1, 1),
                shared_mem_bytes: 0,
            };
            let f = self.function(&SOURCES[3], "grouped_gemm_bf16_mma")?;
            let mut b = self.stream.launch_builder(&f);
            b.arg(a)
                .arg(w)
                .arg(offsets)
                .arg(&e_i)
                .arg(&k_i)
                .arg(&n_i)
                .arg(&vec16)
                .arg(&mut c);
            // SAFETY: lengths checked above; cp.async only on in-bounds 16-byte chunks.
            unsafe { b.launch(cfg) }.map_err(|e| cuda_err("grouped_gemm_bf16_mma", e))?;
        }
        Ok(c)
    }

    /// SwiGLU on packed rows: `a` `[N, 2I]` (gate half first) -> `h` `[N, I]`.
    ///
    /// # Errors
    /// [`KernelError::ShapeMismatch`] naming `a`; CUDA errors.
    pub fn swiglu(&self, a: &CudaSlice<f32>, rows: usize, inter: usize) -> Result<CudaSlice<f32>> {
        check_len(
            "a",
            a.len(),
            rows * 2 * inter,
            format!("[N={rows}, 2I={}]", 2 * inter),
        )?;
        let (r_i, i_i) = (to_i32("rows", rows)?, to_i32("inter", inter)?);
        let mut h = self.alloc_zeros::<f32>(rows * inter)?;
        if rows * inter > 0 {
            let f = self.function(&SOURCES[4], "swiglu_f32")?;
            let mut b = self.stream.launch_builder(&f);
            b.arg(a).arg(&r_i).arg(&i_i).arg(&mut h);
            // SAFETY: lengths checked above.
            unsafe { b.launch(grid_for(rows * inter)) }.map_err(|e| cuda_err("swiglu", e))?;
        }
        Ok(h)
    }

    /// Combine: `out[t] = sum_j w[t, j] y[row_of_slot[t, j]]`, `j` ascending; `y` `[N, H]`,
    /// `weights` and `row_of_slot` `[T, k]` -> `[T, H]`.
    ///
    /// # Errors
    /// [`KernelError::ShapeMismatch`] naming `y`, `weights` or `row_of_slot`; CUDA errors.
    #[allow(clippy::too_many_arguments)]
    pub fn combine(
        &self,
        y: &CudaSlice<f32>,
        rows: usize,
        hidden: usize,
        weights: &CudaSlice<f32>,
        row_of_slot: &CudaSlice<u32>,
        tokens: usize,
        top_k: usize,
    ) -> Result<CudaSlice<f32>> {
        check_len(
            "y",
            y.len(),
            rows * hidden,
            format!("[N={rows}, H={hidden}]"),
        )?;
        check_len(
            "weights",
            weights.len(),
            tokens * top_k,
            format!("[T={tokens}, k={top_k}]"),
        )?;
        check_len(
            "row_of_slot",
            row_of_slot.len(),
            tokens * top_k,
            format!("[T={tokens}, k={top_k}]"),
        )?;
        let (t_i, k_i, h_i) = (
            to_i32("tokens", tokens)?,
            to_i32("top_k", top_k)?,
            to_i32("hidden", hidden)?,
        );
        let mut out = self.alloc_zeros::<f32>(tokens * hidden)?;
        if tokens * hidden > 0 {
            let f = self.function(&SOURCES[4], "combine_f32")?;
            let mut b = self.stream.launch_builder(&f);
            b.arg(y)
                .arg(weights)
                .arg(row_of_slot)
                .arg(&t_i)
                .arg(&k_i)
                .arg(&h_i)
                .arg(&mut out);
            // SAFETY: lengths checked above; row ids come from `permutation` (< N).
            unsafe { b.launch(grid_for(tokens * hidden)) }.map_err(|e| cuda_err("combine", e))?;
        }
        Ok(out)
    }

    /// dX of the expert GEMMs: `c[rows_e] = a[rows_e] @ w[e]^T`, `a` `[N, K]`, `w` `[E, Nout, K]`
    /// -> `[N, Nout]` (`grad_xp = da @ W_gu[e]^T` with `w` = `W_gu` `[E, H, 2I]`, `K = 2I`,
    /// `Nout = H`; `dh = dy @ W_d[e]^T` with `w` = `W_d` `[E, I, H]`, `K = H`, `Nout = I`).
    ///
    /// # Errors
    /// As [`CudaMoe::grouped_gemm`] (`w` must hold `E Nout K` elements).
    #[allow(clippy::too_many_arguments)]
    pub fn grouped_gemm_nt(
        &self,
        a: &CudaSlice<f32>,
        rows: usize,
        kdim: usize,
        w: &CudaSlice<f32>,
        experts: usize,
        nout: usize,
        offsets: &CudaSlice<u32>,
    ) -> Result<CudaSlice<f32>> {
        self.grouped_gemm_impl(
            a,
            rows,
            kdim,
            w,
            experts,
            nout,
            offsets,
            "grouped_gemm_nt_f32",
        )
    }

    /// K-grouped GEMM (weight gradients): `out[e] = a[rows_e]^T @ b[rows_e]`, `a` `[N, M]`,
    /// `b` `[N, Nout]` -> `[E, M, Nout]` (`dW_gu[e] = xp_e^T da_e`, `dW_d[e] = h_e^T dy_e`). One
    /// thread block owns each output tile and sums the expert's rows in ascending order
    /// (deterministic); an expert with zero rows gets exact zeros.
    ///
    /// # Errors
    /// [`KernelError::ShapeMismatch`] naming `a`, `b` or `offsets`; CUDA errors.
    #[allow(clippy::too_many_arguments)]
    pub fn grouped_gemm_tn(
        &self,
        a: &CudaSlice<f32>,
        rows: usize,
        mdim: usize,
        b: &CudaSlice<f32>,
        nout: usize,
        offsets: &CudaSlice<u32>,
        experts: usize,
    ) -> Result<CudaSlice<f32>> {
        if experts == 0 {
            return Err(KernelError::InvalidConfig("E must be at least 1".into()));
        }
        check_len("a", a.len(), rows * mdim, format!("[N={rows}, M={mdim}]"))?;
        check_len(
            "b",
            b.len(),
            rows * nout,
            format!("[N={rows}, Nout={nout}]"),
        )?;
        check_len(
            "offsets",
            offsets.len(),
            experts + 1,
            format!("[E + 1 = {}]", experts + 1),
        )?;
        let (m_i, n_i) = (to_i32("M", mdim)?, to_i32("Nout", nout)?);
        to_i32("rows", rows)?;
        let mut out = self.alloc_zeros::<f32>(experts * mdim * nout)?;
        if mdim > 0 && nout > 0 {
            let cfg = LaunchConfig {
                grid_dim: (
                    nout.div_ceil(GG_TN) as u32,
                    to_i32("M tiles", mdim.div_ceil(GG_TM))? as u32,
                    u32::try_from(experts.min(65_535)).unwrap_or(65_535),
                ),
                block_dim: (GG_THREADS, 1, 1),
                shared_mem_bytes: 0,
            };
            if experts > 65_535 {
                return Err(KernelError::InvalidConfig(
                    "grouped_gemm_tn: at most 65535 experts".into(),
                ));
            }
            let f = self.function(&SOURCES[SRC_GEMM], "grouped_gemm_tn_f32")?;
            let mut l = self.stream.launch_builder(&f);
            l.arg(a)
                .arg(b)
                .arg(offsets)
                .arg(&m_i)
                .arg(&n_i)
                .arg(&mut out);
            // SAFETY: lengths checked above; arguments in the order and types of the kernel.
            unsafe { l.launch(cfg) }.map_err(|e| cuda_err("grouped_gemm_tn_f32", e))?;
        }
        Ok(out)
    }

    /// GLU activation on packed rows: `a` `[N, 2I]` (gate half first) -> `h` `[N, I]`, any
    /// [`Activation`] (SwiGLU, GPT-OSS clamped GLU, Step3.5 clamped SwiGLU).
    ///
    /// # Errors
    /// [`KernelError::ShapeMismatch`] naming `a`; CUDA errors.
    pub fn glu(
        &self,
        a: &CudaSlice<f32>,
        rows: usize,
        inter: usize,
        act: &Activation,
    ) -> Result<CudaSlice<f32>> {
        check_len(
            "a",
            a.len(),
            rows * 2 * inter,
            format!("[N={rows}, 2I={}]", 2 * inter),
        )?;
        let (r_i, i_i) = (to_i32("rows", rows)?, to_i32("inter", inter)?);
        let (kind, limit, alpha) = act_params(act);
        let mut h = self.alloc_zeros::<f32>(rows * inter)?;
        if rows * inter > 0 {
            let f = self.function(&SOURCES[SRC_EXPERT_OPS], "glu_f32")?;
            let mut l = self.stream.launch_builder(&f);
            l.arg(a)
                .arg(&r_i)
                .arg(&i_i)
                .arg(&kind)
                .arg(&limit)
                .arg(&alpha)
                .arg(&mut h);
            // SAFETY: lengths checked above; arguments in the order and types of the kernel.
            unsafe { l.launch(grid_for(rows * inter)) }.map_err(|e| cuda_err("glu_f32", e))?;
        }
        Ok(h)
    }

    /// Backward of [`CudaMoe::glu`]: `da` `[N, 2I]` from the saved pre-activations `a` `[N, 2I]`
    /// and `dh` `[N, I]` (clamps pass the gradient only inside their closed interval).
    ///
    /// # Errors
    /// [`KernelError::ShapeMismatch`] naming `a` or `dh`; CUDA errors.
    pub fn glu_backward(
        &self,
        a: &CudaSlice<f32>,
        dh: &CudaSlice<f32>,
        rows: usize,
        inter: usize,
        act: &Activation,
    ) -> Result<CudaSlice<f32>> {
        check_len(
            "a",
            a.len(),
            rows * 2 * inter,
            format!("[N={rows}, 2I={}]", 2 * inter),
        )?;
        check_len(
            "dh",
            dh.len(),
            rows * inter,
            format!("[N={rows}, I={inter}]"),
        )?;
        let (r_i, i_i) = (to_i32("rows", rows)?, to_i32("inter", inter)?);
        let (kind, limit, alpha) = act_params(act);
        let mut da = self.alloc_zeros::<f32>(rows * 2 * inter)?;
        if rows * inter > 0 {
            let f = self.function(&SOURCES[SRC_EXPERT_OPS], "glu_backward_f32")?;
            let mut l = self.stream.launch_builder(&f);
            l.arg(a)
                .arg(dh)
                .arg(&r_i)
                .arg(&i_i)
                .arg(&kind)
                .arg(&limit)
                .arg(&alpha)
                .arg(&mut da);
            // SAFETY: lengths checked above; arguments in the order and types of the kernel.
            unsafe { l.launch(grid_for(rows * inter)) }
                .map_err(|e| cuda_err("glu_backward_f32", e))?;
        }
        Ok(da)
    }

    /// `dst[r] += bias[e]` for the rows of each expert (GPT-OSS expert biases); `dst` `[N, C]`,
    /// `bias` `[E, C]`.
    ///
    /// # Errors
    /// [`KernelError::ShapeMismatch`] naming `dst`, `bias` or `offsets`; CUDA errors.
    #[allow(clippy::too_many_arguments)]
    pub fn add_row_bias(
        &self,
        dst: &mut CudaSlice<f32>,
        rows: usize,
        cols: usize,
        bias: &CudaSlice<f32>,
        offsets: &CudaSlice<u32>,
        experts: usize,
    ) -> Result<()> {
        if experts == 0 {
            return Err(KernelError::InvalidConfig("E must be at least 1".into()));
        }
        check_len(
            "dst",
            dst.len(),
            rows * cols,
            format!("[N={rows}, C={cols}]"),
        )?;
        check_len(
            "bias",
            bias.len(),
            experts * cols,
            format!("[E={experts}, C={cols}]"),
        )?;
        check_len(
            "offsets",
            offsets.len(),
            experts + 1,
            format!("[E + 1 = {}]", experts + 1),
        )?;
        let (e_i, r_i, c_i) = (
            to_i32("experts", experts)?,
            to_i32("rows", rows)?,
            to_i32("cols", cols)?,
        );
        if rows * cols > 0 {
            let f = self.function(&SOURCES[SRC_EXPERT_OPS], "add_row_bias_f32")?;
            let mut l = self.stream.launch_builder(&f);
            l.arg(dst)
                .arg(bias)
                .arg(offsets)
                .arg(&e_i)
                .arg(&r_i)
                .arg(&c_i);
            // SAFETY: lengths checked above; arguments in the order and types of the kernel.
            unsafe { l.launch(grid_for(rows * cols)) }
                .map_err(|e| cuda_err("add_row_bias_f32", e))?;
        }
        Ok(())
    }

    /// Bias gradient: `out[e] = sum of g[rows_e]` (rows ascending, zeros for an empty expert);
    /// `g` `[N, C]` -> `[E, C]`.
    ///
    /// # Errors
    /// [`KernelError::ShapeMismatch`] naming `g` or `offsets`; CUDA errors.
    pub fn grouped_row_sum(
        &self,
        g: &CudaSlice<f32>,
        rows: usize,
        cols: usize,
        offsets: &CudaSlice<u32>,
        experts: usize,
    ) -> Result<CudaSlice<f32>> {
        if experts == 0 {
            return Err(KernelError::InvalidConfig("E must be at least 1".into()));
        }
        check_len("g", g.len(), rows * cols, format!("[N={rows}, C={cols}]"))?;
        check_len(
            "offsets",
            offsets.len(),
            experts + 1,
            format!("[E + 1 = {}]", experts + 1),
        )?;
        let (e_i, c_i) = (to_i32("experts", experts)?, to_i32("cols", cols)?);
        let mut out = self.alloc_zeros::<f32>(experts * cols)?;
        if experts * cols > 0 {
            let f = self.function(&SOURCES[SRC_EXPERT_OPS], "grouped_row_sum_f32")?;
            let mut l = self.stream.launch_builder(&f);
            l.arg(g).arg(offsets).arg(&e_i).arg(&c_i).arg(&mut out);
            // SAFETY: lengths checked above; arguments in the order and types of the kernel.
            unsafe { l.launch(grid_for(experts * cols)) }
                .map_err(|e| cuda_err("grouped_row_sum_f32", e))?;
        }
        Ok(out)
    }

    /// Permutation backward: `grad_x[t] = sum_j grad_xp[row_of_slot[t, j]]`, `j` ascending;
    /// `grad_xp` `[N, H]`, `row_of_slot` `[T, k]` -> `[T, H]`.
    ///
    /// # Errors
    /// [`KernelError::ShapeMismatch`] naming `grad_xp` or `row_of_slot`; CUDA errors. Row ids
    /// are trusted (they come from [`CudaMoe::permutation`]).
    pub fn permute_backward(
        &self,
        grad_xp: &CudaSlice<f32>,
        rows: usize,
        hidden: usize,
        row_of_slot: &CudaSlice<u32>,
        tokens: usize,
        top_k: usize,
    ) -> Result<CudaSlice<f32>> {
        check_len(
            "grad_xp",
            grad_xp.len(),
            rows * hidden,
            format!("[N={rows}, H={hidden}]"),
        )?;
        check_len(
            "row_of_slot",
            row_of_slot.len(),
            tokens * top_k,
            format!("[T={tokens}, k={top_k}]"),
        )?;
        let (t_i, k_i, h_i) = (
            to_i32("tokens", tokens)?,
            to_i32("top_k", top_k)?,
            to_i32("hidden", hidden)?,
        );
        let mut gx = self.alloc_zeros::<f32>(tokens * hidden)?;
        if tokens * hidden > 0 {
            let f = self.function(&SOURCES[SRC_EXPERT_OPS], "permute_backward_f32")?;
            let mut l = self.stream.launch_builder(&f);
            l.arg(grad_xp)
                .arg(row_of_slot)
                .arg(&t_i)
                .arg(&k_i)
                .arg(&h_i)
                .arg(&mut gx);
            // SAFETY: lengths checked above; arguments in the order and types of the kernel.
            unsafe { l.launch(grid_for(tokens * hidden)) }
                .map_err(|e| cuda_err("permute_backward_f32", e))?;
        }
        Ok(gx)
    }

    /// Combine backward: `grad_y[row_of_slot[t, j]] = w[t, j] grad_out[t]` and
    /// `grad_weights[t, j] = <grad_out[t], y[row_of_slot[t, j]]>`. Every row is one slot
    /// (`N = T k`, the [`CudaMoe::permutation`] layout; `slot_of_row` its inverse). Returns
    /// `(grad_y [N, H], grad_weights [T, k])`.
    ///
    /// # Errors
    /// [`KernelError::ShapeMismatch`] naming `y`, `weights`, `row_of_slot`, `slot_of_row` or
    /// `grad_out`; CUDA errors.
    #[allow(clippy::too_many_arguments)]
    pub fn combine_backward(
        &self,
        y: &CudaSlice<f32>,
        hidden: usize,
        weights: &CudaSlice<f32>,
        row_of_slot: &CudaSlice<u32>,
        slot_of_row: &CudaSlice<u32>,
        grad_out: &CudaSlice<f32>,
        tokens: usize,
        top_k: usize,
    ) -> Result<(CudaSlice<f32>, CudaSlice<f32>)> {
        let rows = tokens * top_k;
        let tk = format!("[T={tokens}, k={top_k}]");
        check_len(
            "y",
            y.len(),
            rows * hidden,
            format!("[N=T k={rows}, H={hidden}]"),
        )?;
        check_len("weights", weights.len(), rows, tk.clone())?;
        check_len("row_of_slot", row_of_slot.len(), rows, tk)?;
        check_len(
            "slot_of_row",
            slot_of_row.len(),
            rows,
            format!("[N={rows}]"),
        )?;
        check_len(
            "grad_out",
            grad_out.len(),
            tokens * hidden,
            format!("[T={tokens}, H={hidden}]"),
        )?;
        let (t_i, k_i, h_i, r_i) = (
            to_i32("tokens", tokens)?,
            to_i32("top_k", top_k)?,
            to_i32("hidden", hidden)?,
            to_i32("rows", rows)?,
        );
        let mut gy = self.alloc_zeros::<f32>(rows * hidden)?;
        let mut gw = self.alloc_zeros::<f32>(rows)?;
        if rows * hidden > 0 {
            let f = self.function(&SOURCES[SRC_EXPERT_OPS], "combine_backward_y_f32")?;
            let mut l = self.stream.launch_builder(&f);
            l.arg(weights)
                .arg(grad_out)
                .arg(slot_of_row)
                .arg(&r_i)
                .arg(&k_i)
                .arg(&h_i)
                .arg(&mut gy);
            // SAFETY: lengths checked above; arguments in the order and types of the kernel.
            unsafe { l.launch(grid_for(rows * hidden)) }
                .map_err(|e| cuda_err("combine_backward_y_f32", e))?;
        }
        if rows > 0 {
            let blocks = (rows * 32).div_ceil(256);
            let cfg = LaunchConfig {
                grid_dim: (to_i32("blocks", blocks)? as u32, 1, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            };
            let f = self.function(&SOURCES[SRC_EXPERT_OPS], "combine_backward_w_f32")?;
            let mut l = self.stream.launch_builder(&f);
            l.arg(y)
                .arg(grad_out)
                .arg(row_of_slot)
                .arg(&t_i)
                .arg(&k_i)
                .arg(&h_i)
                .arg(&mut gw);
            // SAFETY: lengths checked above; arguments in the order and types of the kernel.
            unsafe { l.launch(cfg) }.map_err(|e| cuda_err("combine_backward_w_f32", e))?;
        }
        Ok((gy, gw))
    }

    /// Any router of [`RouterKind`] on f32 logits `[T, E]`: the device twin of
    /// [`crate::route`]. `bias` `[E]`: for [`RouterKind::TopKSoftmax`] the router's linear bias
    /// (added to the logits, GPT-OSS), for the sigmoid routers the selection-only
    /// `e_score_correction_bias`; must be `None` for [`RouterKind::SoftmaxTopK`]. Ties: the
    /// lowest index wins. Non-finite logits are not detected on the device.
    ///
    /// # Errors
    /// [`KernelError::ZeroTopK`], [`KernelError::TopKTooLarge`], [`KernelError::InvalidConfig`]
    /// (bias on a softmax top-k router, bad group layout, more than 64 groups),
    /// [`KernelError::ShapeMismatch`] naming `logits` or `bias`; CUDA errors.
    pub fn route(
        &self,
        logits: &CudaSlice<f32>,
        tokens: usize,
        experts: usize,
        kind: &RouterKind,
        top_k: usize,
        bias: Option<&CudaSlice<f32>>,
    ) -> Result<GpuRouting> {
        if let RouterKind::SoftmaxTopK { norm_topk_prob } = *kind {
            if bias.is_some() {
                return Err(KernelError::InvalidConfig(
                    "no bias on a softmax top-k router".into(),
                ));
            }
            let cfg = RouterConfig {
                top_k,
                norm_topk_prob,
            };
            return self.softmax_topk(logits, tokens, experts, &cfg);
        }
        if top_k == 0 {
            return Err(KernelError::ZeroTopK);
        }
        if top_k > experts {
            return Err(KernelError::TopKTooLarge {
                top_k,
                num_experts: experts,
            });
        }
        check_len(
            "logits",
            logits.len(),
            tokens * experts,
            format!("[T={tokens}, E={experts}]"),
        )?;
        if let Some(b) = bias {
            check_len("bias", b.len(), experts, format!("[E={experts}]"))?;
        }
        let (t_i, e_i, k_i) = (
            to_i32("tokens", tokens)?,
            to_i32("experts", experts)?,
            to_i32("top_k", top_k)?,
        );
        let has_bias = i32::from(bias.is_some());
        let bias_ptr = bias.unwrap_or(logits);
        let mut probs = self.alloc_zeros::<f32>(tokens * experts)?;
        let mut idx = self.alloc_zeros::<u32>(tokens * top_k)?;
        let mut w = self.alloc_zeros::<f32>(tokens * top_k)?;
        let (n_group, topk_group, renorm, eps, scale) = match *kind {
            RouterKind::SigmoidGroupLimited {
                n_group,
                topk_group,
                norm_topk_prob,
                routed_scaling_factor,
            } => {
                if n_group == 0
                    || n_group > 64
                    || experts % n_group != 0
                    || topk_group == 0
                    || topk_group > n_group
                {
                    return Err(KernelError::InvalidConfig(format!(
                        "group layout n_group={n_group}, topk_group={topk_group}, E={experts} \
                         (the device router needs n_group <= 64 dividing E)"
                    )));
                }
                (
                    n_group,
                    topk_group,
                    norm_topk_prob,
                    1e-20_f32,
                    routed_scaling_factor,
                )
            }
            RouterKind::SigmoidTopK {
                routed_scaling_factor,
            } => (1, 1, true, 0.0, routed_scaling_factor),
            _ => (0, 0, false, 0.0, 1.0),
        };
        if tokens > 0 {
            if matches!(kind, RouterKind::TopKSoftmax) {
                let f = self.function(&SOURCES[SRC_ROUTER], "topk_softmax_f32")?;
                let mut l = self.stream.launch_builder(&f);
                l.arg(logits)
                    .arg(bias_ptr)
                    .arg(&has_bias)
                    .arg(&t_i)
                    .arg(&e_i)
                    .arg(&k_i)
                    .arg(&mut probs)
                    .arg(&mut idx)
                    .arg(&mut w);
                // SAFETY: lengths checked above; arguments in the order and types of the kernel.
                unsafe { l.launch(grid_for(tokens)) }
                    .map_err(|e| cuda_err("topk_softmax_f32", e))?;
            } else {
                let (g_i, tg_i) = (n_group as i32, topk_group as i32);
                let renorm = i32::from(renorm);
                let f = self.function(&SOURCES[SRC_ROUTER], "sigmoid_topk_f32")?;
                let mut l = self.stream.launch_builder(&f);
                l.arg(logits)
                    .arg(bias_ptr)
                    .arg(&has_bias)
                    .arg(&t_i)
                    .arg(&e_i)
                    .arg(&k_i)
                    .arg(&g_i)
                    .arg(&tg_i)
                    .arg(&renorm)
                    .arg(&eps)
                    .arg(&scale)
                    .arg(&mut probs)
                    .arg(&mut idx)
                    .arg(&mut w);
                // SAFETY: lengths checked above; arguments in the order and types of the kernel.
                unsafe { l.launch(grid_for(tokens)) }
                    .map_err(|e| cuda_err("sigmoid_topk_f32", e))?;
            }
        }
        Ok(GpuRouting {
            top_k_index: idx,
            top_k_weights: w,
            probs,
        })
    }
}

/// `(kind, limit, alpha)` arguments of the GLU kernels (`act` in `expert_ops.cu`).
fn act_params(act: &Activation) -> (i32, f32, f32) {
    match *act {
        Activation::SwiGlu => (0, 0.0, 0.0),
        Activation::GptOssGlu { limit, alpha } => (1, limit, alpha),
        Activation::ClampedSwiGlu { limit } => (2, limit, 0.0),
    }
}
