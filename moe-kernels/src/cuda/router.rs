//! Routers on the device: softmax top-k (f32 / bf16 logits) and every [`RouterKind`] through
//! [`CudaMoe::route`] (`router.cu`).

use cudarc::driver::{CudaSlice, PushKernelArg};

use super::*;

impl CudaMoe {
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
            let f = self.function("router.cu", kernel)?;
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
                    routed_scaling_factor as f32,
                )
            }
            RouterKind::SigmoidTopK {
                routed_scaling_factor,
            } => (1, 1, true, 0.0, routed_scaling_factor as f32),
            _ => (0, 0, false, 0.0, 1.0),
        };
        if tokens > 0 {
            if matches!(kind, RouterKind::TopKSoftmax) {
                let f = self.function("router.cu", "topk_softmax_f32")?;
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
                let f = self.function("router.cu", "sigmoid_topk_f32")?;
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

    /// Router backward on the device: `dz` `[T, E]` = dL/dlogits from `grad_weights` `[T, k]` =
    /// dL/d`top_k_weights` and the forward's [`GpuRouting`] (the formulas of
    /// [`crate::routing::route_backward`] for every [`RouterKind`]; the expert selection and the
    /// correction bias get no gradient).
    ///
    /// # Errors
    /// [`KernelError::ShapeMismatch`] naming `grad_weights` or `routing`; CUDA errors.
    pub fn route_backward(
        &self,
        kind: &RouterKind,
        routing: &GpuRouting,
        grad_weights: &CudaSlice<f32>,
        tokens: usize,
        experts: usize,
        top_k: usize,
    ) -> Result<CudaSlice<f32>> {
        let slots = tokens * top_k;
        let sym = format!("[T={tokens}, k={top_k}]");
        check_len("grad_weights", grad_weights.len(), slots, sym.clone())?;
        check_len("routing", routing.top_k_index.len(), slots, sym.clone())?;
        check_len("routing", routing.top_k_weights.len(), slots, sym)?;
        check_len(
            "routing",
            routing.probs.len(),
            tokens * experts,
            format!("[T={tokens}, E={experts}]"),
        )?;
        let (kind_i, renorm, eps, scale) = match *kind {
            RouterKind::SoftmaxTopK { norm_topk_prob } => (0, norm_topk_prob, 0.0f32, 1.0f32),
            RouterKind::TopKSoftmax => (1, false, 0.0, 1.0),
            RouterKind::SigmoidGroupLimited {
                norm_topk_prob,
                routed_scaling_factor,
                ..
            } => (2, norm_topk_prob, 1e-20, routed_scaling_factor as f32),
            RouterKind::SigmoidTopK {
                routed_scaling_factor,
            } => (2, true, 0.0, routed_scaling_factor as f32),
        };
        let (t_i, e_i, k_i) = (
            to_i32("tokens", tokens)?,
            to_i32("experts", experts)?,
            to_i32("top_k", top_k)?,
        );
        let renorm = i32::from(renorm);
        let mut dz = self.alloc_zeros::<f32>(tokens * experts)?;
        if tokens > 0 {
            let f = self.function("router.cu", "route_backward_f32")?;
            let mut b = self.stream.launch_builder(&f);
            b.arg(&routing.probs)
                .arg(&routing.top_k_index)
                .arg(&routing.top_k_weights)
                .arg(grad_weights)
                .arg(&t_i)
                .arg(&e_i)
                .arg(&k_i)
                .arg(&kind_i)
                .arg(&renorm)
                .arg(&eps)
                .arg(&scale)
                .arg(&mut dz);
            // SAFETY: lengths checked above; expert ids come from the device router (< E).
            unsafe { b.launch(grid_for(tokens)) }.map_err(|e| cuda_err("route_backward_f32", e))?;
        }
        Ok(dz)
    }
}
