//! CUDA kernels of the MoE layer (**unverified on a GPU**): CUDA C++
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

use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, LaunchConfig};
use cudarc::nvrtc::{CompileOptions, Ptx};

use crate::config::{Activation, RouterKind};
use crate::error::{KernelError, Result};
use crate::router::RouterConfig;

mod gemm;
mod layer;
mod ops;
mod router;
mod tc;
mod wgmma;

pub use layer::{GpuMoeDims, GpuMoeForward, GpuMoeGrads, GpuMoeParams};
pub use tc::GluProjection;

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
            "route_backward_f32",
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
            "gather_rows_b16",
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
        name: "grouped_gemm_tc.cu",
        src: include_str!("kernels/grouped_gemm_tc.cu"),
        kernels: &[
            "tc_gemm_nn_bf16",
            "tc_gemm_glu_bf16",
            "tc_gemm_nt_bf16",
            "tc_gemm_tn_bf16",
            "f32_to_bf16",
        ],
    },
    KernelSource {
        name: "grouped_gemm_wgmma.cu",
        src: include_str!("kernels/grouped_gemm_wgmma.cu"),
        kernels: &["grouped_gemm_bf16_wgmma"],
    },
    KernelSource {
        name: "activation_combine.cu",
        src: include_str!("kernels/activation_combine.cu"),
        kernels: &["swiglu_f32", "combine_f32", "add_inplace_f32"],
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
    Ok(compile_cubin_with(source, arch, &[])?.0)
}

/// The PTX assembler's resource report (`--ptxas-options=-v`) of one source for `arch`: per
/// kernel entry, registers, stack frame, spill stores / loads, as ptxas prints them.
///
/// # Errors
/// As [`compile_cubin`].
pub fn ptxas_report(source: &KernelSource, arch: &str) -> Result<String> {
    Ok(compile_cubin_with(source, arch, &["--ptxas-options=-v".to_string()])?.1)
}

/// [`compile_cubin`] with extra NVRTC options; returns the CUBIN and the compile log.
fn compile_cubin_with(
    source: &KernelSource,
    arch: &str,
    extra: &[String],
) -> Result<(Vec<u8>, String)> {
    use cudarc::nvrtc::{result, sys};
    if !nvrtc_available() {
        return Err(KernelError::Cuda("NVRTC library not found".into()));
    }
    let text = std::ffi::CString::new(format!("{COMMON}\n{}", source.src))
        .map_err(|e| cuda_err(source.name, e))?;
    let name = std::ffi::CString::new(source.name).map_err(|e| cuda_err(source.name, e))?;
    let prog = result::create_program(&text, Some(&name)).map_err(|e| cuda_err(source.name, e))?;
    let mut opts = compile_options(arch);
    opts.extend_from_slice(extra);
    // SAFETY: `prog` was just created from `text` / `name`, which outlive it, and is destroyed
    // exactly once below; the CUBIN buffer has the size NVRTC reported.
    let out = unsafe {
        let compiled = result::compile_program(prog, &opts);
        let log = result::get_program_log(prog)
            .map(|l| {
                let bytes: Vec<u8> = l.iter().map(|&c| c as u8).filter(|&c| c != 0).collect();
                String::from_utf8_lossy(&bytes).into_owned()
            })
            .unwrap_or_default();
        let res = match compiled {
            Err(e) => Err(KernelError::Cuda(format!(
                "NVRTC failed on {} with {opts:?}: {e:?}\n{log}",
                source.name
            ))),
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
                        Ok((buf, log))
                    }
                }
            }
        };
        let _ = result::destroy_program(prog);
        res
    }?;
    if out.0.is_empty() {
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

    /// The compute capability as one number (`sm_90a` -> 90, `sm_80` -> 80).
    pub fn sm(&self) -> u32 {
        self.arch
            .trim_start_matches("sm_")
            .trim_end_matches('a')
            .parse()
            .unwrap_or(0)
    }

    /// Errors unless the device is sm_80 or newer (tensor-core `mma.sync` kernels).
    fn require_sm80(&self, kernel: &str) -> Result<()> {
        if self.sm() < 80 {
            return Err(KernelError::Cuda(format!(
                "{kernel} needs sm_80 or newer, device is {}",
                self.arch
            )));
        }
        Ok(())
    }

    /// Kernel `kernel` of the source file `source` (a name in [`SOURCES`]), compiled and loaded
    /// on first use.
    fn function(&self, source: &str, kernel: &str) -> Result<CudaFunction> {
        let source = SOURCES
            .iter()
            .find(|s| s.name == source)
            .ok_or_else(|| KernelError::Cuda(format!("no kernel source named {source}")))?;
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
}

/// `(kind, limit, alpha)` arguments of the GLU kernels (`act` in `expert_ops.cu`).
fn act_params(act: &Activation) -> (i32, f32, f32) {
    match *act {
        Activation::SwiGlu => (0, 0.0, 0.0),
        Activation::GptOssGlu { limit, alpha } => (1, limit as f32, alpha as f32),
        Activation::ClampedSwiGlu { limit } => (2, limit as f32, 0.0),
    }
}
