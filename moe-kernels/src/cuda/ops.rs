//! The element-wise and data-movement kernels of the expert pipeline on the device
//! (`permute.cu`, `activation_combine.cu`, `expert_ops.cu`): permutation, gather, GLU
//! activations, expert biases, combine, and their backward.

use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};

use super::*;

impl CudaMoe {
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
        self.permutation_impl(top_k_index, tokens, top_k, experts, true)
    }

    /// [`CudaMoe::permutation`] without the host-side check of the expert ids (no copy back,
    /// no host sync): only for ids produced on the device by a router, which are `< E` by
    /// construction (an id `>= E` would leave its slot without a row: `row_of_slot` 0).
    ///
    /// # Errors
    /// As [`CudaMoe::permutation`], except the expert-id check.
    pub fn permutation_unchecked(
        &self,
        top_k_index: &CudaSlice<u32>,
        tokens: usize,
        top_k: usize,
        experts: usize,
    ) -> Result<GpuPermutation> {
        self.permutation_impl(top_k_index, tokens, top_k, experts, false)
    }

    fn permutation_impl(
        &self,
        top_k_index: &CudaSlice<u32>,
        tokens: usize,
        top_k: usize,
        experts: usize,
        check_ids: bool,
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
        let src = "permute.cu";
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
        if !check_ids {
            return Ok(GpuPermutation {
                counts,
                offsets,
                row_of_slot,
                slot_of_row,
                token_of_row,
            });
        }
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
        self.gather_impl(x, tokens, hidden, token_of_row, rows, "gather_rows_f32")
    }

    /// The gather wrappers: `kernel` of `permute.cu` from `T` rows into `U` rows.
    fn gather_impl<T, U>(
        &self,
        x: &CudaSlice<T>,
        tokens: usize,
        hidden: usize,
        token_of_row: &CudaSlice<u32>,
        rows: usize,
        kernel: &str,
    ) -> Result<CudaSlice<U>>
    where
        U: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits,
    {
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
        let mut xp = self.alloc_zeros::<U>(rows * hidden)?;
        if rows * hidden > 0 {
            let f = self.function("permute.cu", kernel)?;
            let mut b = self.stream.launch_builder(&f);
            b.arg(x).arg(&h_i).arg(token_of_row).arg(&r_i).arg(&mut xp);
            // SAFETY: lengths checked above; token ids come from a permutation of T tokens.
            unsafe { b.launch(grid_for(rows * hidden)) }.map_err(|e| cuda_err(kernel, e))?;
        }
        Ok(xp)
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
            let f = self.function("activation_combine.cu", "swiglu_f32")?;
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
            let f = self.function("activation_combine.cu", "combine_f32")?;
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
            let f = self.function("expert_ops.cu", "glu_f32")?;
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
            let f = self.function("expert_ops.cu", "glu_backward_f32")?;
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
            let f = self.function("expert_ops.cu", "add_row_bias_f32")?;
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
            let f = self.function("expert_ops.cu", "grouped_row_sum_f32")?;
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
            let f = self.function("expert_ops.cu", "permute_backward_f32")?;
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
            let f = self.function("expert_ops.cu", "combine_backward_y_f32")?;
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
            let f = self.function("expert_ops.cu", "combine_backward_w_f32")?;
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

    /// Dispatch gather of bf16 rows, bf16 out: `xp[r] = x[token_of_row[r]]`, `x` `[T, H]` ->
    /// `[N, H]` (raw bits copied).
    ///
    /// # Errors
    /// As [`CudaMoe::gather_rows`].
    pub fn gather_rows_b16(
        &self,
        x: &CudaSlice<u16>,
        tokens: usize,
        hidden: usize,
        token_of_row: &CudaSlice<u32>,
        rows: usize,
    ) -> Result<CudaSlice<u16>> {
        self.gather_impl(x, tokens, hidden, token_of_row, rows, "gather_rows_b16")
    }

    /// `dst += src`, both `[len]`.
    ///
    /// # Errors
    /// [`KernelError::ShapeMismatch`] naming `dst` or `src`; CUDA errors.
    pub fn add_inplace(
        &self,
        dst: &mut CudaSlice<f32>,
        src: &CudaSlice<f32>,
        len: usize,
    ) -> Result<()> {
        check_len("dst", dst.len(), len, format!("[{len}]"))?;
        check_len("src", src.len(), len, format!("[{len}]"))?;
        if len > 0 {
            let n = len as i64;
            let f = self.function("activation_combine.cu", "add_inplace_f32")?;
            let mut b = self.stream.launch_builder(&f);
            b.arg(dst).arg(src).arg(&n);
            // SAFETY: both hold `len` elements.
            unsafe { b.launch(grid_for(len)) }.map_err(|e| cuda_err("add_inplace_f32", e))?;
        }
        Ok(())
    }
}
