//! Shared test helpers: a small deterministic RNG, owned parameter sets for every family.
#![allow(dead_code)]

use moe_kernels::{Activation, MoeConfig, MoeParams, Real, RouterKind, SharedExpertParams};
use ndarray::{Array1, Array2, Array3};

/// xorshift64* generator, uniform in [-1, 1).
pub struct Rng(pub u64);
impl Rng {
    pub fn uniform(&mut self) -> f64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let bits = self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 40;
        bits as f64 / (1u64 << 24) as f64 * 2.0 - 1.0
    }
    pub fn a1<F: Real>(&mut self, n: usize, scale: f64) -> Array1<F> {
        Array1::from_shape_simple_fn(n, || F::from(self.uniform() * scale).unwrap())
    }
    pub fn a2<F: Real>(&mut self, s: (usize, usize), scale: f64) -> Array2<F> {
        Array2::from_shape_simple_fn(s, || F::from(self.uniform() * scale).unwrap())
    }
    pub fn a3<F: Real>(&mut self, s: (usize, usize, usize), scale: f64) -> Array3<F> {
        Array3::from_shape_simple_fn(s, || F::from(self.uniform() * scale).unwrap())
    }
}

/// Owned shared-expert weights (HF Linear layout).
#[derive(Clone, Debug)]
pub struct OwnedShared<F> {
    pub gate_proj: Array2<F>,
    pub up_proj: Array2<F>,
    pub down_proj: Array2<F>,
    pub gate: Option<Array2<F>>,
}

/// Owned input and parameters of one block.
#[derive(Clone, Debug)]
pub struct Case<F> {
    pub x: Array2<F>,
    pub gate_weight: Array2<F>,
    pub gate_bias: Option<Array1<F>>,
    pub corr: Option<Array1<F>>,
    pub gate_up: Array3<F>,
    pub down: Array3<F>,
    pub gate_up_bias: Option<Array2<F>>,
    pub down_bias: Option<Array2<F>>,
    pub shared: Option<OwnedShared<F>>,
}

impl<F: Real> Case<F> {
    pub fn params(&self) -> MoeParams<'_, F> {
        MoeParams {
            gate_weight: self.gate_weight.view(),
            gate_bias: self.gate_bias.as_ref().map(|a| a.view()),
            e_score_correction_bias: self.corr.as_ref().map(|a| a.view()),
            gate_and_up_projs: self.gate_up.view(),
            down_projs: self.down.view(),
            gate_up_bias: self.gate_up_bias.as_ref().map(|a| a.view()),
            down_bias: self.down_bias.as_ref().map(|a| a.view()),
            shared: self.shared.as_ref().map(|s| SharedExpertParams {
                gate_proj: s.gate_proj.view(),
                up_proj: s.up_proj.view(),
                down_proj: s.down_proj.view(),
                gate: s.gate.as_ref().map(|g| g.view()),
            }),
        }
    }

    /// Same values in another precision (f32 -> f64 is exact).
    pub fn cast<G: Real>(&self) -> Case<G> {
        let c1 = |a: &Array1<F>| a.mapv(|v| G::from(v).unwrap());
        let c2 = |a: &Array2<F>| a.mapv(|v| G::from(v).unwrap());
        let c3 = |a: &Array3<F>| a.mapv(|v| G::from(v).unwrap());
        Case {
            x: c2(&self.x),
            gate_weight: c2(&self.gate_weight),
            gate_bias: self.gate_bias.as_ref().map(c1),
            corr: self.corr.as_ref().map(c1),
            gate_up: c3(&self.gate_up),
            down: c3(&self.down),
            gate_up_bias: self.gate_up_bias.as_ref().map(c2),
            down_bias: self.down_bias.as_ref().map(c2),
            shared: self.shared.as_ref().map(|s| OwnedShared {
                gate_proj: c2(&s.gate_proj),
                up_proj: c2(&s.up_proj),
                down_proj: c2(&s.down_proj),
                gate: s.gate.as_ref().map(c2),
            }),
        }
    }
}

/// The seed families' block variants (router, activation and which optional tensors exist).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Family {
    Qwen3MoeNorm,
    Qwen3MoeNoNorm,
    Mixtral,
    Qwen3Next,
    GptOss,
    DeepseekV3,
    DeepseekNoNorm,
    Step35,
}

pub const FAMILIES: [Family; 8] = [
    Family::Qwen3MoeNorm,
    Family::Qwen3MoeNoNorm,
    Family::Mixtral,
    Family::Qwen3Next,
    Family::GptOss,
    Family::DeepseekV3,
    Family::DeepseekNoNorm,
    Family::Step35,
];

impl Family {
    /// Block config for `E` experts and `k`; group-limited routers use 2 groups (E even).
    pub fn config(self, experts: usize, top_k: usize) -> MoeConfig {
        let n_group = if experts % 2 == 0 && experts >= 4 {
            2
        } else {
            1
        };
        let (router, activation) = match self {
            Family::Qwen3MoeNorm | Family::Mixtral | Family::Qwen3Next => (
                RouterKind::SoftmaxTopK {
                    norm_topk_prob: true,
                },
                Activation::SwiGlu,
            ),
            Family::Qwen3MoeNoNorm => (
                RouterKind::SoftmaxTopK {
                    norm_topk_prob: false,
                },
                Activation::SwiGlu,
            ),
            Family::GptOss => (
                RouterKind::TopKSoftmax,
                Activation::GptOssGlu {
                    limit: 0.7,
                    alpha: 1.702,
                },
            ),
            Family::DeepseekV3 => (
                RouterKind::SigmoidGroupLimited {
                    n_group,
                    topk_group: n_group,
                    norm_topk_prob: true,
                    routed_scaling_factor: 2.5,
                },
                Activation::SwiGlu,
            ),
            Family::DeepseekNoNorm => (
                RouterKind::SigmoidGroupLimited {
                    n_group,
                    topk_group: 1,
                    norm_topk_prob: false,
                    routed_scaling_factor: 1.5,
                },
                Activation::SwiGlu,
            ),
            Family::Step35 => (
                RouterKind::SigmoidTopK {
                    routed_scaling_factor: 1.25,
                },
                Activation::ClampedSwiGlu { limit: 0.3 },
            ),
        };
        MoeConfig {
            router,
            top_k,
            activation,
        }
    }

    /// Largest valid k for this family with `E` experts.
    pub fn max_top_k(self, experts: usize) -> usize {
        match self {
            // Group-limited routers need groups of >= 2 experts (top-2 group score).
            Family::DeepseekV3 | Family::DeepseekNoNorm if experts < 2 => 0,
            Family::DeepseekNoNorm if experts % 2 == 0 && experts >= 4 => experts / 2,
            _ => experts,
        }
    }

    /// Random parameters for this family, `T` tokens, `H`, `I`, `E`.
    pub fn case<F: Real>(self, seed: u64, t: usize, h: usize, i: usize, e: usize) -> Case<F> {
        let mut r = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
        let gated_shared = matches!(self, Family::Qwen3Next);
        let has_shared = matches!(
            self,
            Family::Qwen3Next | Family::DeepseekV3 | Family::Step35
        );
        let sigmoid = matches!(
            self,
            Family::DeepseekV3 | Family::DeepseekNoNorm | Family::Step35
        );
        let gpt = self == Family::GptOss;
        let is = 3;
        Case {
            x: r.a2((t, h), 1.0),
            gate_weight: r.a2((e, h), 1.0),
            gate_bias: gpt.then(|| r.a1(e, 0.5)),
            corr: sigmoid.then(|| r.a1(e, 0.3)),
            gate_up: r.a3((e, h, 2 * i), 0.7),
            down: r.a3((e, i, h), 0.7),
            gate_up_bias: gpt.then(|| r.a2((e, 2 * i), 0.3)),
            down_bias: gpt.then(|| r.a2((e, h), 0.3)),
            shared: has_shared.then(|| OwnedShared {
                gate_proj: r.a2((is, h), 0.7),
                up_proj: r.a2((is, h), 0.7),
                down_proj: r.a2((h, is), 0.7),
                gate: gated_shared.then(|| r.a2((1, h), 0.7)),
            }),
        }
    }
}

/// Max |a - b| / (atol + rtol |b|) over all elements (<= 1 means within tolerance).
pub fn rel_err(a: &[f64], b: &[f64], atol: f64, rtol: f64) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs() / (atol + rtol * y.abs()))
        .fold(0.0, f64::max)
}
