//! The whole routed-expert MoE layer on the device, forward and backward, chained from the
//! kernels of this module with no host synchronisation in the forward (the per-expert counts
//! stay on the device; grouped launches size their grids by an upper bound of tiles).
//!
//! Forward: router logits `x Wr^T (+ b)` (f32, as transformers keeps router logits in f32) ->
//! route (every [`RouterKind`]) -> permutation (counts, scan, stable scatter) -> gate/up
//! projection on tensor cores with the dispatch gather folded into the A-tile load and the GLU
//! in its epilogue -> down projection on tensor cores with the routing weight in its epilogue
//! -> deterministic gather-sum combine. Backward: combine backward, dW as K-grouped and dX as
//! transposed-B grouped GEMMs on tensor cores, GLU and permutation backward, router backward.
//! Expert weights are bf16 (tensor-core operands), activations and gradients f32, every GEMM
//! accumulates in f32. Shared experts are not part of this layer (a dense MLP on all tokens:
//! run it beside, e.g. with cuBLAS).
//!
//! Sources: the expert MLP of transformers' eager `*Experts.forward`; the grouped layout of
//! torchtitan's `GroupedExperts` and Megatron's `GroupedMLP` (see the CPU twin,
//! [`crate::fast::moe_forward`], whose stages this mirrors one for one).

use cudarc::driver::CudaSlice;

use super::*;
use crate::config::MoeConfig;

/// Sizes of one layer call: `T` tokens, `H` hidden, `I` expert intermediate, `E` experts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GpuMoeDims {
    /// `T`.
    pub tokens: usize,
    /// `H`.
    pub hidden: usize,
    /// `I`.
    pub inter: usize,
    /// `E`.
    pub experts: usize,
}

/// Layer parameters on the device (the native grouped layout of [`crate::MoeParams`]).
#[derive(Debug, Clone, Copy)]
pub struct GpuMoeParams<'a> {
    /// `[E, H]` router weight (HF `mlp.gate.weight`), f32.
    pub gate_weight: &'a CudaSlice<f32>,
    /// `[E]` router bias (GPT-OSS), f32.
    pub gate_bias: Option<&'a CudaSlice<f32>>,
    /// `[E]` selection-only bias (DeepSeek-V3 / GLM4 `e_score_correction_bias`), f32.
    pub e_score_correction_bias: Option<&'a CudaSlice<f32>>,
    /// `[E, H, 2I]` bf16 bits, gate half first.
    pub gate_and_up_projs: &'a CudaSlice<u16>,
    /// `[E, I, H]` bf16 bits.
    pub down_projs: &'a CudaSlice<u16>,
    /// `[E, 2I]` f32 (GPT-OSS).
    pub gate_up_bias: Option<&'a CudaSlice<f32>>,
    /// `[E, H]` f32 (GPT-OSS).
    pub down_bias: Option<&'a CudaSlice<f32>>,
}

/// Result of [`CudaMoe::moe_forward`]: the output and what the backward needs.
#[derive(Debug)]
pub struct GpuMoeForward {
    /// `[T, H]` layer output.
    pub output: CudaSlice<f32>,
    /// `[T, E]` router logits.
    pub router_logits: CudaSlice<f32>,
    /// Routing (top-k ids and weights, probabilities).
    pub routing: GpuRouting,
    /// The permutation of the routing slots (offsets, row / slot / token maps).
    pub perm: GpuPermutation,
    /// `[T, H]` the input rounded to bf16 (the A operand of the gate/up projection).
    pub x_bf16: CudaSlice<u16>,
    /// `[N, 2I]` pre-activations (f32), `N = T k`.
    pub a: CudaSlice<f32>,
    /// `[N, I]` hidden activations, bf16.
    pub h_bf16: CudaSlice<u16>,
    /// `[N, H]` expert outputs before the routing weight (f32).
    pub y: CudaSlice<f32>,
}

/// Gradients of [`CudaMoe::moe_backward`] (f32, shapes of [`GpuMoeParams`]).
#[derive(Debug)]
pub struct GpuMoeGrads {
    /// `[T, H]`.
    pub grad_input: CudaSlice<f32>,
    /// `[E, H]`.
    pub gate_weight: CudaSlice<f32>,
    /// `[E]` when the router has a bias.
    pub gate_bias: Option<CudaSlice<f32>>,
    /// `[E, H, 2I]`.
    pub gate_and_up_projs: CudaSlice<f32>,
    /// `[E, I, H]`.
    pub down_projs: CudaSlice<f32>,
    /// `[E, 2I]` when the experts have a gate/up bias.
    pub gate_up_bias: Option<CudaSlice<f32>>,
    /// `[E, H]` when the experts have a down bias.
    pub down_bias: Option<CudaSlice<f32>>,
}

/// Checks every parameter length against `d`.
fn check_params(d: &GpuMoeDims, p: &GpuMoeParams) -> Result<()> {
    let GpuMoeDims {
        hidden: h,
        inter: i,
        experts: e,
        ..
    } = *d;
    if e == 0 {
        return Err(KernelError::InvalidConfig("E must be at least 1".into()));
    }
    check_len(
        "gate_weight",
        p.gate_weight.len(),
        e * h,
        format!("[E={e}, H={h}]"),
    )?;
    let opt = |name, v: Option<&CudaSlice<f32>>, want, sym: String| match v {
        Some(s) => check_len(name, s.len(), want, sym),
        None => Ok(()),
    };
    opt("gate_bias", p.gate_bias, e, format!("[E={e}]"))?;
    opt(
        "e_score_correction_bias",
        p.e_score_correction_bias,
        e,
        format!("[E={e}]"),
    )?;
    check_len(
        "gate_and_up_projs",
        p.gate_and_up_projs.len(),
        e * h * 2 * i,
        format!("[E={e}, H={h}, 2I={}]", 2 * i),
    )?;
    check_len(
        "down_projs",
        p.down_projs.len(),
        e * i * h,
        format!("[E={e}, I={i}, H={h}]"),
    )?;
    opt(
        "gate_up_bias",
        p.gate_up_bias,
        e * 2 * i,
        format!("[E={e}, 2I={}]", 2 * i),
    )?;
    opt("down_bias", p.down_bias, e * h, format!("[E={e}, H={h}]"))
}

impl CudaMoe {
    /// `[0, T]`: the offsets of one group holding every token (the router GEMMs run as grouped
    /// GEMMs of one group).
    fn one_group(&self, tokens: usize) -> Result<CudaSlice<u32>> {
        let t = u32::try_from(tokens).map_err(|_| KernelError::ShapeMismatch {
            tensor: "x",
            expected: "T below 2^32".into(),
            got: vec![tokens],
        })?;
        self.stream
            .clone_htod(&[0u32, t])
            .map_err(|e| cuda_err("clone_htod", e))
    }

    /// Forward of the routed experts of one MoE layer on the device: `x` `[T, H]` f32 ->
    /// [`GpuMoeForward`] (output `[T, H]` and the saved activations). The result agrees with
    /// [`crate::fast::moe_forward`] on the bf16-rounded input and expert weights within bf16
    /// tensor-core tolerance.
    ///
    /// # Errors
    /// [`KernelError::ShapeMismatch`] naming `x` or a parameter; router configuration errors
    /// ([`KernelError::ZeroTopK`], [`KernelError::TopKTooLarge`], [`KernelError::InvalidConfig`]);
    /// [`KernelError::Cuda`] before sm_80 (tensor cores) or on a CUDA error.
    pub fn moe_forward(
        &self,
        x: &CudaSlice<f32>,
        d: GpuMoeDims,
        p: &GpuMoeParams,
        cfg: &MoeConfig,
    ) -> Result<GpuMoeForward> {
        check_params(&d, p)?;
        let GpuMoeDims {
            tokens: t,
            hidden: h,
            inter: i,
            experts: e,
        } = d;
        let k = cfg.top_k;
        check_len("x", x.len(), t * h, format!("[T={t}, H={h}]"))?;
        let one = self.one_group(t)?;
        let mut router_logits = self.grouped_gemm_nt(x, t, h, p.gate_weight, 1, e, &one)?;
        if let Some(b) = p.gate_bias {
            self.add_row_bias(&mut router_logits, t, e, b, &one, 1)?;
        }
        let routing = self.route(
            &router_logits,
            t,
            e,
            &cfg.router,
            k,
            p.e_score_correction_bias,
        )?;
        let perm = self.permutation_unchecked(&routing.top_k_index, t, k, e)?;
        let n = t * k;
        let x_bf16 = self.to_bf16(x, t * h)?;
        let glu = self.tc_gate_up_glu(
            &x_bf16,
            t,
            h,
            Some(&perm.token_of_row),
            n,
            p.gate_and_up_projs,
            e,
            i,
            &perm.offsets,
            p.gate_up_bias,
            &cfg.activation,
        )?;
        let (y, yw) = self.tc_down_proj(
            &glu.h_bf16,
            n,
            i,
            p.down_projs,
            e,
            h,
            &perm.offsets,
            p.down_bias,
            Some((&routing.top_k_weights, &perm.slot_of_row)),
        )?;
        let yw = yw.ok_or_else(|| KernelError::Cuda("down projection returned no yw".into()))?;
        // Combine of the weighted rows: the per-token sum over slots (permute_backward's kernel).
        let output = self.permute_backward(&yw, n, h, &perm.row_of_slot, t, k)?;
        Ok(GpuMoeForward {
            output,
            router_logits,
            routing,
            perm,
            x_bf16,
            a: glu.a,
            h_bf16: glu.h_bf16,
            y,
        })
    }

    /// Backward of [`CudaMoe::moe_forward`]: gradients of `L = sum(grad_output * output)`
    /// (`grad_output` `[T, H]` f32) w.r.t. `x` and every parameter (the CPU twin is
    /// [`crate::fast::moe_backward`]). The expert GEMMs run on tensor cores with their bf16
    /// operands (`dy`, `da` rounded to bf16), f32 accumulation; the router's in f32.
    ///
    /// # Errors
    /// As [`CudaMoe::moe_forward`]; [`KernelError::ShapeMismatch`] naming `grad_output`.
    pub fn moe_backward(
        &self,
        d: GpuMoeDims,
        p: &GpuMoeParams,
        cfg: &MoeConfig,
        x: &CudaSlice<f32>,
        fwd: &GpuMoeForward,
        grad_output: &CudaSlice<f32>,
    ) -> Result<GpuMoeGrads> {
        check_params(&d, p)?;
        let GpuMoeDims {
            tokens: t,
            hidden: h,
            inter: i,
            experts: e,
        } = d;
        let k = cfg.top_k;
        let n = t * k;
        check_len("x", x.len(), t * h, format!("[T={t}, H={h}]"))?;
        check_len(
            "grad_output",
            grad_output.len(),
            t * h,
            format!("[T={t}, H={h}]"),
        )?;
        let (routing, perm) = (&fwd.routing, &fwd.perm);
        // Combine: dy = w dOut on the permuted rows, dw[t, j] = <dOut_t, y[row(t, j)]>.
        let (dy, grad_weights) = self.combine_backward(
            &fwd.y,
            h,
            &routing.top_k_weights,
            &perm.row_of_slot,
            &perm.slot_of_row,
            grad_output,
            t,
            k,
        )?;
        let dy_b = self.to_bf16(&dy, n * h)?;
        let down_projs = self.tc_grouped_gemm_tn(&fwd.h_bf16, &dy_b, n, i, h, &perm.offsets, e)?;
        let down_bias = match p.down_bias {
            Some(_) => Some(self.grouped_row_sum(&dy, n, h, &perm.offsets, e)?),
            None => None,
        };
        let dh = self.tc_grouped_gemm_nt(&dy_b, n, h, p.down_projs, e, i, &perm.offsets)?;
        let da = self.glu_backward(&fwd.a, &dh, n, i, &cfg.activation)?;
        let da_b = self.to_bf16(&da, n * 2 * i)?;
        let xp_b = self.gather_rows_b16(&fwd.x_bf16, t, h, &perm.token_of_row, n)?;
        let gate_and_up_projs =
            self.tc_grouped_gemm_tn(&xp_b, &da_b, n, h, 2 * i, &perm.offsets, e)?;
        let gate_up_bias = match p.gate_up_bias {
            Some(_) => Some(self.grouped_row_sum(&da, n, 2 * i, &perm.offsets, e)?),
            None => None,
        };
        let dxp =
            self.tc_grouped_gemm_nt(&da_b, n, 2 * i, p.gate_and_up_projs, e, h, &perm.offsets)?;
        let mut grad_input = self.permute_backward(&dxp, n, h, &perm.row_of_slot, t, k)?;

        // Router: dz = dL/dlogits, dWr = dz^T x, db = sum_t dz, dx += dz Wr.
        let dz = self.route_backward(&cfg.router, routing, &grad_weights, t, e, k)?;
        let one = self.one_group(t)?;
        let gate_weight = self.grouped_gemm_tn(&dz, t, e, x, h, &one, 1)?;
        let gate_bias = match p.gate_bias {
            Some(_) => Some(self.grouped_row_sum(&dz, t, e, &one, 1)?),
            None => None,
        };
        let dx_router = self.grouped_gemm(&dz, t, e, p.gate_weight, 1, h, &one)?;
        self.add_inplace(&mut grad_input, &dx_router, t * h)?;
        Ok(GpuMoeGrads {
            grad_input,
            gate_weight,
            gate_bias,
            gate_and_up_projs,
            down_projs,
            gate_up_bias,
            down_bias,
        })
    }
}
