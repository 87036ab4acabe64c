//! Hopper (sm_90a) M-grouped GEMM on wgmma + TMA (`grouped_gemm_wgmma.cu`), **unverified on a
//! GPU** (compiled to PTX and CUBIN by NVRTC in CI; the device tests run only on an sm_90a
//! device).
//!
//! Design (the CUTLASS SM90 TMA warp-specialized GEMM, non-persistent): 128 x 128 x 64 block
//! tiles, a 4-stage mbarrier pipeline, one producer warpgroup (TMA, or cp.async for the
//! gathered A rows) and two consumer warpgroups issuing `wgmma.mma_async m64n128k16
//! f32.bf16.bf16` from 128-byte-swizzled shared tiles. The weights `w` `[E, K, Nout]` are used
//! as stored (MN-major B, the wgmma transpose-B bit) through a 3-D tensor map, so `k >= K` and
//! `n >= Nout` read zeros per expert. Tiles never straddle two experts (the schedule of
//! `grouped_gemm.cu`); results are deterministic (one fixed-order sum per output, no atomics).

use cudarc::driver::sys::{
    CUfunction_attribute, CUresult, CUtensorMap, CUtensorMapDataType, CUtensorMapFloatOOBfill,
    CUtensorMapInterleave, CUtensorMapL2promotion, CUtensorMapSwizzle,
};
use cudarc::driver::{CudaSlice, DevicePtr, DeviceRepr, LaunchConfig, PushKernelArg};

use super::*;

/// Block tile rows / columns / depth and pipeline stages (`WG_*` in `grouped_gemm_wgmma.cu`).
const WG_BM: usize = 128;
const WG_BN: usize = 128;
const WG_BK: u32 = 64;
const WG_STAGES: usize = 4;
/// One producer and two consumer warpgroups.
const WG_THREADS: u32 = 384;
/// Dynamic shared memory: A and B stages (16 KiB each), 2 mbarriers per stage, 1 KiB of
/// alignment slack (`WG_SMEM_BYTES`).
const WG_SMEM_BYTES: usize = WG_STAGES * (2 * 16_384) + 2 * WG_STAGES * 8 + 1024;

/// A `CUtensorMap` as a kernel argument: 128 opaque bytes, 64-byte aligned (the TMA
/// requirement; `WgTensorMap` in the CUDA source has the same size and alignment).
#[repr(C, align(64))]
#[derive(Clone, Copy)]
struct TensorMap([u64; 16]);

// SAFETY: plain bytes passed by value as a `const __grid_constant__ WgTensorMap` parameter of
// the same size and alignment.
unsafe impl DeviceRepr for TensorMap {}

/// Encodes a bf16 tiled tensor map with the 128-byte swizzle (zero fill out of bounds) over
/// `dims` (innermost first) with byte strides `strides` of dimensions 1.. and box `boxes`.
fn tensor_map_bf16(
    what: &'static str,
    addr: cudarc::driver::sys::CUdeviceptr,
    dims: &[u64],
    strides: &[u64],
    boxes: &[u32],
) -> Result<TensorMap> {
    let rank = dims.len();
    if rank == 0 || rank > 5 || strides.len() + 1 != rank || boxes.len() != rank {
        return Err(KernelError::Cuda(format!("{what}: bad tensor map rank")));
    }
    let elem_strides = [1u32; 5];
    // SAFETY: all-zero bytes are a valid (not yet encoded) `CUtensorMap`.
    let mut map: CUtensorMap = unsafe { std::mem::zeroed() };
    // SAFETY: the array pointers hold `rank` (strides `rank - 1`) elements; `addr` is a live
    // device allocation the caller keeps alive (and ordered on the stream) across the launch.
    let r = unsafe {
        cudarc::driver::sys::cuTensorMapEncodeTiled(
            &mut map,
            CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_BFLOAT16,
            rank as u32,
            addr as *mut std::ffi::c_void,
            dims.as_ptr(),
            strides.as_ptr(),
            boxes.as_ptr(),
            elem_strides.as_ptr(),
            CUtensorMapInterleave::CU_TENSOR_MAP_INTERLEAVE_NONE,
            CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_128B,
            CUtensorMapL2promotion::CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
            CUtensorMapFloatOOBfill::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
        )
    };
    if r != CUresult::CUDA_SUCCESS {
        return Err(cuda_err(what, r));
    }
    Ok(TensorMap(map.opaque))
}

/// The element count of a tensor of shape `dims`, or a shape error when it overflows.
fn elems(tensor: &'static str, dims: &[usize]) -> Result<usize> {
    dims.iter()
        .try_fold(1usize, |n, &d| n.checked_mul(d))
        .ok_or_else(|| KernelError::ShapeMismatch {
            tensor,
            expected: "an element count below 2^64".into(),
            got: dims.to_vec(),
        })
}

impl CudaMoe {
    /// M-grouped GEMM on Hopper tensor cores (wgmma + TMA), bf16 inputs (raw bits), f32
    /// accumulation and output: `c[r, :] = a[src(r), :] @ w[e(r)]` for `r < rows`, where `e(r)`
    /// is the expert with `offsets[e] <= r < offsets[e + 1]` and `src(r) = token_of_row[r]`
    /// when `token_of_row` is given (the dispatch gather folded into the A-tile load), else
    /// `src(r) = r`.
    ///
    /// Shapes: `a` `[a_rows, K]` (without `token_of_row`, `a_rows` must equal `rows`),
    /// `token_of_row` `[rows]` (values `< a_rows`; a larger one reads a zero row), `w`
    /// `[E, K, Nout]` row-major, `offsets` `[E + 1]` (an exclusive scan ending at `rows`, e.g.
    /// [`GpuPermutation::offsets`]) -> `c` `[rows, Nout]`. Rows outside every expert's range
    /// stay zero. No host synchronisation: the launch covers `ceil(rows / 128) + E` row tiles
    /// and the spare ones exit.
    ///
    /// Constraints: `K % 8 == 0` and `Nout % 8 == 0` (TMA needs 16-byte global strides; use
    /// [`CudaMoe::grouped_gemm_bf16_mma`] otherwise). `rows`, `K` or `Nout` of zero return
    /// zeros without a launch.
    ///
    /// # Errors
    /// [`KernelError::Cuda`] on a device other than sm_90a ("needs sm_90a") and for CUDA
    /// errors; [`KernelError::InvalidConfig`] for `E = 0`, `K` or `Nout` not a multiple of 8,
    /// or more than 65535 row tiles; [`KernelError::ShapeMismatch`] naming `a`,
    /// `token_of_row`, `w` or `offsets`.
    #[allow(clippy::too_many_arguments)]
    pub fn grouped_gemm_bf16_wgmma(
        &self,
        a: &CudaSlice<u16>,
        a_rows: usize,
        kdim: usize,
        token_of_row: Option<&CudaSlice<u32>>,
        rows: usize,
        w: &CudaSlice<u16>,
        experts: usize,
        nout: usize,
        offsets: &CudaSlice<u32>,
    ) -> Result<CudaSlice<f32>> {
        const KERNEL: &str = "grouped_gemm_bf16_wgmma";
        if self.arch != "sm_90a" {
            return Err(KernelError::Cuda(format!(
                "{KERNEL} needs sm_90a, device is {}",
                self.arch
            )));
        }
        if experts == 0 {
            return Err(KernelError::InvalidConfig("E must be at least 1".into()));
        }
        match token_of_row {
            Some(t) => check_len("token_of_row", t.len(), rows, format!("[N={rows}]"))?,
            None if a_rows != rows => {
                return Err(KernelError::ShapeMismatch {
                    tensor: "a",
                    expected: format!("[N={rows}, K={kdim}] (no token_of_row: a_rows = N)"),
                    got: vec![a_rows, kdim],
                })
            }
            None => {}
        }
        check_len(
            "a",
            a.len(),
            elems("a", &[a_rows, kdim])?,
            format!("[a_rows={a_rows}, K={kdim}]"),
        )?;
        check_len(
            "w",
            w.len(),
            elems("w", &[experts, kdim, nout])?,
            format!("[E={experts}, K={kdim}, Nout={nout}]"),
        )?;
        check_len(
            "offsets",
            offsets.len(),
            experts + 1,
            format!("[E + 1 = {}]", experts + 1),
        )?;
        if kdim % 8 != 0 || nout % 8 != 0 {
            return Err(KernelError::InvalidConfig(format!(
                "{KERNEL}: K = {kdim} and Nout = {nout} must be multiples of 8 (TMA needs \
                 16-byte row strides); use grouped_gemm_bf16_mma"
            )));
        }
        let (e_i, ar_i, r_i, k_i, n_i) = (
            to_i32("experts", experts)?,
            to_i32("a_rows", a_rows)?,
            to_i32("rows", rows)?,
            to_i32("K", kdim)?,
            to_i32("Nout", nout)?,
        );
        let mut c = self.alloc_zeros::<f32>(elems("c", &[rows, nout])?)?;
        if rows == 0 || nout == 0 || kdim == 0 {
            return Ok(c);
        }
        let tiles = rows.div_ceil(WG_BM) + experts;
        if tiles > 65_535 {
            return Err(KernelError::InvalidConfig(format!(
                "{KERNEL}: {tiles} row tiles exceed the grid limit of 65535"
            )));
        }
        let cfg = LaunchConfig {
            grid_dim: (nout.div_ceil(WG_BN) as u32, tiles as u32, 1),
            block_dim: (WG_THREADS, 1, 1),
            shared_mem_bytes: WG_SMEM_BYTES as u32,
        };
        // The tensor maps hold raw device addresses: the guards keep `a` / `w` ordered on this
        // stream until the launch is queued (dropped at the end of the function).
        let (a_ptr, _a_guard) = a.device_ptr(&self.stream);
        let (w_ptr, _w_guard) = w.device_ptr(&self.stream);
        let (kb, nb) = (kdim as u64 * 2, nout as u64 * 2);
        let tmap_b = tensor_map_bf16(
            "cuTensorMapEncodeTiled(w)",
            w_ptr,
            &[nout as u64, kdim as u64, experts as u64],
            &[nb, nb * kdim as u64],
            &[64, WG_BK, 1],
        )?;
        let tmap_a = match token_of_row {
            Some(_) => TensorMap([0; 16]),
            None => tensor_map_bf16(
                "cuTensorMapEncodeTiled(a)",
                a_ptr,
                &[kdim as u64, rows as u64],
                &[kb],
                &[WG_BK, WG_BM as u32],
            )?,
        };
        let f = self.function("grouped_gemm_wgmma.cu", KERNEL)?;
        f.set_attribute(
            CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            WG_SMEM_BYTES as i32,
        )
        .map_err(|e| cuda_err("cuFuncSetAttribute(max dynamic shared memory)", e))?;
        let null: u64 = 0;
        let mut b = self.stream.launch_builder(&f);
        b.arg(&tmap_a).arg(&tmap_b).arg(a);
        match token_of_row {
            Some(t) => b.arg(t),
            None => b.arg(&null),
        };
        b.arg(offsets)
            .arg(&e_i)
            .arg(&ar_i)
            .arg(&r_i)
            .arg(&k_i)
            .arg(&n_i)
            .arg(&mut c);
        // SAFETY: argument order and types match the kernel; lengths checked above; the tensor
        // maps cover exactly `a` ([rows, K]) and `w` ([E, K, Nout]); gathered token indices
        // are bounded by `a_rows` in the kernel and output rows by `rows`.
        unsafe { b.launch(cfg) }.map_err(|e| cuda_err(KERNEL, e))?;
        Ok(c)
    }
}
