//! Grouped GEMMs on the device (`grouped_gemm.cu`, `grouped_gemm_mma.cu`): M-grouped forward
//! (tiled f32 / bf16, and bf16 on tensor cores), dX (`a @ w[e]^T`) and dW (K-grouped).

use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};

use super::*;

impl CudaMoe {
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
            let f = self.function("grouped_gemm.cu", kernel)?;
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
        self.require_sm80("grouped_gemm_bf16_mma")?;
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
            let f = self.function("grouped_gemm_mma.cu", "grouped_gemm_bf16_mma")?;
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
            let f = self.function("grouped_gemm.cu", "grouped_gemm_tn_f32")?;
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
}
