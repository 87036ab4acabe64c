//! Pipelined tensor-core grouped GEMMs (`grouped_gemm_tc.cu`, sm_80+): bf16 operands (raw bits,
//! e.g. from [`CudaMoe::to_bf16`]), f32 accumulation and outputs; the forward projections with
//! the dispatch gather folded into the A-tile load and fused epilogues (bias, GLU activation,
//! routing weight), and the two backward GEMMs (dX: `a @ w[e]^T`; dW: K-grouped `a^T @ b`).
//!
//! Design sources: CUTLASS's multistage sm_80 GEMM (cp.async pipeline, ldmatrix, mma.sync
//! m16n8k16), torchtitan / Megatron grouped GEMMs (expert-contiguous rows, an exclusive scan of
//! per-expert counts as group offsets), Megatron's `moe_utils.permute` (the gather).

use cudarc::driver::sys::CUfunction_attribute_enum;
use cudarc::driver::{
    CudaFunction, CudaSlice, CudaStream, DevicePtr, DevicePtrMut, DeviceRepr, LaunchConfig,
    PushKernelArg, SyncOnDrop,
};

use super::*;

/// Rows and columns of a tensor-core block tile (`TC_BM`, `TC_BN` in `grouped_gemm_tc.cu`).
const TC_BM: usize = 128;
const TC_BN: usize = 128;
/// Dynamic shared memory of every tensor-core kernel: 3 stages of 20480 bytes.
const TC_SMEM: u32 = 3 * 20480;
const TC_SOURCE: &str = "grouped_gemm_tc.cu";

/// Device twin of `TcEpilogue` in `grouped_gemm_tc.cu` (same field order and C layout; device
/// pointers as `u64`, 0 = none).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
struct TcEpilogue {
    mode: i32,
    bias: u64,
    inter: i32,
    act: i32,
    limit: f32,
    alpha: f32,
    h_f32: u64,
    h_bf16: u64,
    row_w: u64,
    slot_of_row: u64,
    yw: u64,
}

// SAFETY: plain `#[repr(C)]` data (integers, floats, device addresses) passed by value, laid
// out exactly as the CUDA struct (every pointer field 8-byte aligned in both).
unsafe impl DeviceRepr for TcEpilogue {}

/// Outputs of [`CudaMoe::tc_gate_up_glu`].
#[derive(Debug)]
pub struct GluProjection {
    /// `[N, 2I]` pre-activations `x W_gu[e] (+ b_gu[e])`, gate half first (f32, saved for the
    /// backward).
    pub a: CudaSlice<f32>,
    /// `[N, I]` `h = act(gate, up)` in f32.
    pub h: CudaSlice<f32>,
    /// `[N, I]` the same `h` rounded to bf16 (the A operand of the down projection).
    pub h_bf16: CudaSlice<u16>,
}

/// Grid for an M-grouped launch: column tiles x (row tiles + one spare per expert), so no host
/// needs the per-expert counts (spare tiles exit at once).
fn m_grouped_grid(col_tiles: usize, rows: usize, experts: usize) -> Result<LaunchConfig> {
    let tiles = rows.div_ceil(TC_BM) + experts;
    Ok(LaunchConfig {
        grid_dim: (
            to_i32("column tiles", col_tiles.max(1))? as u32,
            to_i32("tiles", tiles)? as u32,
            1,
        ),
        block_dim: (256, 1, 1),
        shared_mem_bytes: TC_SMEM,
    })
}

/// Device address of an optional input (0 for none) and the stream guard to hold across the
/// launch that reads it.
fn opt_ptr<'a>(
    s: Option<&'a CudaSlice<f32>>,
    stream: &'a CudaStream,
) -> (u64, Option<SyncOnDrop<'a>>) {
    match s {
        Some(v) => {
            let (p, g) = v.device_ptr(stream);
            (p, Some(g))
        }
        None => (0, None),
    }
}

fn check_experts(experts: usize) -> Result<()> {
    if experts == 0 {
        return Err(KernelError::InvalidConfig("E must be at least 1".into()));
    }
    Ok(())
}

/// Checks the left operand of an M-grouped GEMM: `a` `[a_rows, K]`, with `token_of_row` `[rows]`
/// (gathered) or without (`a_rows == rows`).
fn check_rows(
    a_len: usize,
    a_rows: usize,
    kdim: usize,
    token_of_row: Option<&CudaSlice<u32>>,
    rows: usize,
) -> Result<()> {
    check_len(
        "a",
        a_len,
        a_rows * kdim,
        format!("[rows={a_rows}, K={kdim}]"),
    )?;
    match token_of_row {
        Some(t) => check_len("token_of_row", t.len(), rows, format!("[N={rows}]")),
        None if a_rows != rows => Err(KernelError::ShapeMismatch {
            tensor: "a",
            expected: format!("[N={rows}, K] (no token_of_row: one row per grouped row)"),
            got: vec![a_rows, kdim],
        }),
        None => Ok(()),
    }
}

impl CudaMoe {
    /// A tensor-core kernel, with its dynamic shared memory limit raised to [`TC_SMEM`].
    fn tc_function(&self, kernel: &str) -> Result<CudaFunction> {
        self.require_sm80(kernel)?;
        let f = self.function(TC_SOURCE, kernel)?;
        f.set_attribute(
            CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            TC_SMEM as i32,
        )
        .map_err(|e| cuda_err("cuFuncSetAttribute(max dynamic shared memory)", e))?;
        Ok(f)
    }

    /// f32 -> bf16 bits, round to nearest even (torch `.to(torch.bfloat16)`); `x` `[len]`.
    ///
    /// # Errors
    /// [`KernelError::ShapeMismatch`] naming `x` when shorter than `len`; CUDA errors.
    pub fn to_bf16(&self, x: &CudaSlice<f32>, len: usize) -> Result<CudaSlice<u16>> {
        check_len("x", x.len(), len, format!("[{len}]"))?;
        let mut y = self.alloc_zeros::<u16>(len)?;
        if len > 0 {
            let n = len as i64;
            let f = self.function(TC_SOURCE, "f32_to_bf16")?;
            let mut b = self.stream.launch_builder(&f);
            b.arg(x).arg(&n).arg(&mut y);
            // SAFETY: x and y hold `len` elements (checked / allocated above).
            unsafe { b.launch(grid_for(len)) }.map_err(|e| cuda_err("f32_to_bf16", e))?;
        }
        Ok(y)
    }

    /// The forward launch shared by [`CudaMoe::tc_grouped_gemm`], [`CudaMoe::tc_gate_up_glu`]
    /// and [`CudaMoe::tc_down_proj`]: `a` (gathered through `token_of_row` when given) times
    /// `w[e]` `[E, K, ndim]`, epilogue `ep`, into `c`.
    #[allow(clippy::too_many_arguments)]
    fn tc_launch_nn(
        &self,
        kernel: &str,
        a: &CudaSlice<u16>,
        token_of_row: Option<&CudaSlice<u32>>,
        kdim: usize,
        w: &CudaSlice<u16>,
        ndim: usize,
        offsets: &CudaSlice<u32>,
        experts: usize,
        vec16: bool,
        ep: TcEpilogue,
        c: &mut CudaSlice<f32>,
        cfg: LaunchConfig,
    ) -> Result<()> {
        let f = self.tc_function(kernel)?;
        let (gather, lda) = (i32::from(token_of_row.is_some()), to_i32("K", kdim)?);
        let b_estride = (kdim * ndim) as i64;
        let (e_i, n_i, v_i) = (
            to_i32("experts", experts)?,
            to_i32("N", ndim)?,
            i32::from(vec16),
        );
        let idx = token_of_row.unwrap_or(offsets);
        let mut b = self.stream.launch_builder(&f);
        b.arg(a)
            .arg(idx)
            .arg(&gather)
            .arg(&lda)
            .arg(w)
            .arg(&b_estride)
            .arg(offsets)
            .arg(&e_i)
            .arg(&n_i)
            .arg(&lda)
            .arg(&v_i)
            .arg(&ep)
            .arg(c);
        // SAFETY: every length was checked by the caller against (rows, K, ndim, E); `idx` is
        // only read when `gather` is 1; the epilogue's pointers come from live slices of the
        // checked lengths, held (with their stream guards) by the caller across this launch.
        unsafe { b.launch(cfg) }.map_err(|e| cuda_err(kernel, e))?;
        Ok(())
    }

    /// Tensor-core M-grouped GEMM: `c[r] = a[src(r)] @ w[e(r)] (+ bias[e(r)])`, `src(r) =
    /// token_of_row[r]` when given (`a` `[a_rows, K]` token rows: the dispatch gather folded into
    /// the A-tile load) else `r` (`a_rows == rows`); `w` `[E, K, Nout]` bf16, `offsets` `[E + 1]`
    /// the scan of the per-expert row counts (ending at `rows`), `bias` `[E, Nout]` f32
    /// -> `c` `[rows, Nout]` f32.
    ///
    /// # Errors
    /// [`KernelError::ShapeMismatch`] naming `a`, `token_of_row`, `w`, `offsets` or `bias`;
    /// [`KernelError::InvalidConfig`] for `E = 0`; [`KernelError::Cuda`] before sm_80 or on a CUDA
    /// error.
    #[allow(clippy::too_many_arguments)]
    pub fn tc_grouped_gemm(
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
        bias: Option<&CudaSlice<f32>>,
    ) -> Result<CudaSlice<f32>> {
        check_experts(experts)?;
        check_rows(a.len(), a_rows, kdim, token_of_row, rows)?;
        check_len(
            "w",
            w.len(),
            experts * kdim * nout,
            format!("[E={experts}, K={kdim}, Nout={nout}]"),
        )?;
        check_len("offsets", offsets.len(), experts + 1, "[E + 1]".to_string())?;
        if let Some(bv) = bias {
            check_len(
                "bias",
                bv.len(),
                experts * nout,
                format!("[E, Nout={nout}]"),
            )?;
        }
        let mut c = self.alloc_zeros::<f32>(rows * nout)?;
        if rows == 0 || nout == 0 {
            return Ok(c);
        }
        let (bias_ptr, _g) = opt_ptr(bias, &self.stream);
        let ep = TcEpilogue {
            mode: 0,
            bias: bias_ptr,
            ..Default::default()
        };
        let vec16 = kdim % 8 == 0 && nout % 8 == 0;
        let cfg = m_grouped_grid(nout.div_ceil(TC_BN), rows, experts)?;
        self.tc_launch_nn(
            "tc_gemm_nn_bf16",
            a,
            token_of_row,
            kdim,
            w,
            nout,
            offsets,
            experts,
            vec16,
            ep,
            &mut c,
            cfg,
        )?;
        Ok(c)
    }

    /// Gate/up projection with the GLU activation in the epilogue (tensor cores):
    /// `a[r] = x[src(r)] @ w_gu[e(r)] (+ b_gu[e(r)])` `[rows, 2I]` (gate half first), `h[r, i] =
    /// act(a[r, i], a[r, I + i])` in f32 and bf16. `x` `[a_rows, H]` bf16 (gathered through
    /// `token_of_row` when given), `w_gu` `[E, H, 2I]` bf16, `bias` `[E, 2I]` f32.
    ///
    /// # Errors
    /// As [`CudaMoe::tc_grouped_gemm`]; [`KernelError::InvalidConfig`] for a bad activation limit.
    #[allow(clippy::too_many_arguments)]
    pub fn tc_gate_up_glu(
        &self,
        x: &CudaSlice<u16>,
        a_rows: usize,
        hidden: usize,
        token_of_row: Option<&CudaSlice<u32>>,
        rows: usize,
        w_gu: &CudaSlice<u16>,
        experts: usize,
        inter: usize,
        offsets: &CudaSlice<u32>,
        bias: Option<&CudaSlice<f32>>,
        act: &Activation,
    ) -> Result<GluProjection> {
        crate::config::check_activation(act)?;
        check_experts(experts)?;
        check_rows(x.len(), a_rows, hidden, token_of_row, rows)?;
        check_len(
            "w_gu",
            w_gu.len(),
            experts * hidden * 2 * inter,
            format!("[E={experts}, H={hidden}, 2I={}]", 2 * inter),
        )?;
        check_len("offsets", offsets.len(), experts + 1, "[E + 1]".to_string())?;
        if let Some(bv) = bias {
            check_len("bias", bv.len(), experts * 2 * inter, "[E, 2I]".to_string())?;
        }
        let mut a = self.alloc_zeros::<f32>(rows * 2 * inter)?;
        let mut h = self.alloc_zeros::<f32>(rows * inter)?;
        let mut h_bf16 = self.alloc_zeros::<u16>(rows * inter)?;
        if rows > 0 && inter > 0 {
            let (kind, limit, alpha) = act_params(act);
            let (bias_ptr, _gb) = opt_ptr(bias, &self.stream);
            let (h_ptr, _gh) = h.device_ptr_mut(&self.stream);
            let (hb_ptr, _ghb) = h_bf16.device_ptr_mut(&self.stream);
            let ep = TcEpilogue {
                mode: 1,
                bias: bias_ptr,
                inter: to_i32("inter", inter)?,
                act: kind,
                limit,
                alpha,
                h_f32: h_ptr,
                h_bf16: hb_ptr,
                ..Default::default()
            };
            let vec16 = hidden % 8 == 0 && inter % 8 == 0;
            let cfg = m_grouped_grid(inter.div_ceil(TC_BN / 2), rows, experts)?;
            self.tc_launch_nn(
                "tc_gemm_glu_bf16",
                x,
                token_of_row,
                hidden,
                w_gu,
                2 * inter,
                offsets,
                experts,
                vec16,
                ep,
                &mut a,
                cfg,
            )?;
        }
        Ok(GluProjection { a, h, h_bf16 })
    }

    /// Down projection (tensor cores): `y[r] = h[r] @ w_d[e(r)] (+ b_d[e(r)])` `[rows, H]` f32,
    /// and with `routing = Some((top_k_weights [T k], slot_of_row [rows]))` also the
    /// routing-weighted `yw[r] = top_k_weights[slot_of_row[r]] * y[r]` (the routing weight in the
    /// epilogue; [`CudaMoe::permute_backward`], the per-token sum over slots, then combines without weights). `h` `[rows, I]` bf16,
    /// `w_d` `[E, I, H]` bf16, `bias` `[E, H]` f32. Returns `(y, yw)`.
    ///
    /// # Errors
    /// As [`CudaMoe::tc_grouped_gemm`]; [`KernelError::ShapeMismatch`] naming `slot_of_row`.
    #[allow(clippy::too_many_arguments)]
    pub fn tc_down_proj(
        &self,
        h: &CudaSlice<u16>,
        rows: usize,
        inter: usize,
        w_d: &CudaSlice<u16>,
        experts: usize,
        hidden: usize,
        offsets: &CudaSlice<u32>,
        bias: Option<&CudaSlice<f32>>,
        routing: Option<(&CudaSlice<f32>, &CudaSlice<u32>)>,
    ) -> Result<(CudaSlice<f32>, Option<CudaSlice<f32>>)> {
        check_experts(experts)?;
        check_len("h", h.len(), rows * inter, format!("[N={rows}, I={inter}]"))?;
        check_len(
            "w_d",
            w_d.len(),
            experts * inter * hidden,
            format!("[E={experts}, I={inter}, H={hidden}]"),
        )?;
        check_len("offsets", offsets.len(), experts + 1, "[E + 1]".to_string())?;
        if let Some(bv) = bias {
            check_len(
                "bias",
                bv.len(),
                experts * hidden,
                format!("[E, H={hidden}]"),
            )?;
        }
        if let Some((_, slots)) = routing {
            check_len("slot_of_row", slots.len(), rows, format!("[N={rows}]"))?;
        }
        let mut y = self.alloc_zeros::<f32>(rows * hidden)?;
        let mut yw = match routing {
            Some(_) => Some(self.alloc_zeros::<f32>(rows * hidden)?),
            None => None,
        };
        if rows == 0 || hidden == 0 {
            return Ok((y, yw));
        }
        {
            let (bias_ptr, _gb) = opt_ptr(bias, &self.stream);
            let (w_ptr, _gw, s_ptr, _gs) = match routing {
                Some((w, s)) => {
                    let (wp, gw) = w.device_ptr(&self.stream);
                    let (sp, gs) = s.device_ptr(&self.stream);
                    (wp, Some(gw), sp, Some(gs))
                }
                None => (0, None, 0, None),
            };
            let (yw_ptr, _gy) = match yw.as_mut() {
                Some(v) => {
                    let (p, g) = v.device_ptr_mut(&self.stream);
                    (p, Some(g))
                }
                None => (0, None),
            };
            let ep = TcEpilogue {
                mode: 2,
                bias: bias_ptr,
                row_w: w_ptr,
                slot_of_row: s_ptr,
                yw: yw_ptr,
                ..Default::default()
            };
            let vec16 = inter % 8 == 0 && hidden % 8 == 0;
            let cfg = m_grouped_grid(hidden.div_ceil(TC_BN), rows, experts)?;
            self.tc_launch_nn(
                "tc_gemm_nn_bf16",
                h,
                None,
                inter,
                w_d,
                hidden,
                offsets,
                experts,
                vec16,
                ep,
                &mut y,
                cfg,
            )?;
        }
        Ok((y, yw))
    }

    /// dX-type grouped GEMM on tensor cores: `c[rows_e] = a[rows_e] @ w[e]^T`, `a` `[rows, K]`
    /// bf16, `w` `[E, Nout, K]` bf16 (a forward weight `[E, Kf, Nf]` read as `Nout = Kf`,
    /// `K = Nf`: no transposed copy) -> `[rows, Nout]` f32.
    ///
    /// # Errors
    /// As [`CudaMoe::tc_grouped_gemm`].
    #[allow(clippy::too_many_arguments)]
    pub fn tc_grouped_gemm_nt(
        &self,
        a: &CudaSlice<u16>,
        rows: usize,
        kdim: usize,
        w: &CudaSlice<u16>,
        experts: usize,
        nout: usize,
        offsets: &CudaSlice<u32>,
    ) -> Result<CudaSlice<f32>> {
        check_experts(experts)?;
        check_len("a", a.len(), rows * kdim, format!("[N={rows}, K={kdim}]"))?;
        check_len(
            "w",
            w.len(),
            experts * nout * kdim,
            format!("[E={experts}, Nout={nout}, K={kdim}]"),
        )?;
        check_len("offsets", offsets.len(), experts + 1, "[E + 1]".to_string())?;
        let mut c = self.alloc_zeros::<f32>(rows * nout)?;
        if rows == 0 || nout == 0 {
            return Ok(c);
        }
        let f = self.tc_function("tc_gemm_nt_bf16")?;
        let cfg = m_grouped_grid(nout.div_ceil(TC_BN), rows, experts)?;
        let (lda, e_i, n_i) = (
            to_i32("K", kdim)?,
            to_i32("experts", experts)?,
            to_i32("Nout", nout)?,
        );
        let b_estride = (nout * kdim) as i64;
        let vec16 = i32::from(kdim % 8 == 0);
        let mut b = self.stream.launch_builder(&f);
        b.arg(a)
            .arg(&lda)
            .arg(w)
            .arg(&b_estride)
            .arg(offsets)
            .arg(&e_i)
            .arg(&n_i)
            .arg(&lda)
            .arg(&vec16)
            .arg(&mut c);
        // SAFETY: lengths checked above; rows beyond offsets[E] are never read.
        unsafe { b.launch(cfg) }.map_err(|e| cuda_err("tc_gemm_nt_bf16", e))?;
        Ok(c)
    }

    /// dW-type K-grouped GEMM on tensor cores: `c[e] = a[rows_e]^T @ b[rows_e]`, `a` `[rows, M]`,
    /// `b` `[rows, N]` bf16 -> `[E, M, N]` f32; the reduction runs over the expert's rows in
    /// ascending order, an expert without rows gets exact zeros.
    ///
    /// # Errors
    /// As [`CudaMoe::tc_grouped_gemm`].
    #[allow(clippy::too_many_arguments)]
    pub fn tc_grouped_gemm_tn(
        &self,
        a: &CudaSlice<u16>,
        b: &CudaSlice<u16>,
        rows: usize,
        mdim: usize,
        ndim: usize,
        offsets: &CudaSlice<u32>,
        experts: usize,
    ) -> Result<CudaSlice<f32>> {
        check_experts(experts)?;
        check_len("a", a.len(), rows * mdim, format!("[N={rows}, M={mdim}]"))?;
        check_len("b", b.len(), rows * ndim, format!("[N={rows}, N={ndim}]"))?;
        check_len("offsets", offsets.len(), experts + 1, "[E + 1]".to_string())?;
        let mut c = self.alloc_zeros::<f32>(experts * mdim * ndim)?;
        if mdim == 0 || ndim == 0 {
            return Ok(c);
        }
        let f = self.tc_function("tc_gemm_tn_bf16")?;
        let cfg = LaunchConfig {
            grid_dim: (
                to_i32("column tiles", ndim.div_ceil(TC_BN))? as u32,
                to_i32("row tiles", mdim.div_ceil(TC_BM))? as u32,
                to_i32("experts", experts)? as u32,
            ),
            block_dim: (256, 1, 1),
            shared_mem_bytes: TC_SMEM,
        };
        let (m_i, n_i) = (to_i32("M", mdim)?, to_i32("N", ndim)?);
        to_i32("rows", rows)?;
        let vec16 = i32::from(mdim % 8 == 0 && ndim % 8 == 0);
        let mut l = self.stream.launch_builder(&f);
        l.arg(a)
            .arg(b)
            .arg(offsets)
            .arg(&m_i)
            .arg(&n_i)
            .arg(&vec16)
            .arg(&mut c);
        // SAFETY: lengths checked above; offsets bound every expert's rows by `rows`.
        unsafe { l.launch(cfg) }.map_err(|e| cuda_err("tc_gemm_tn_bf16", e))?;
        Ok(c)
    }
}
