//! Step3.5 (`SigmoidTopK` router, `ClampedSwiGlu` experts, shared expert) against transformers'
//! own `Step3p7SparseMoeBlock` (transformers 5.23's Step3.5 block): the conformance fixture
//! `conformance/fixtures/step3p5_tiny` (published Step-3.5 disk layout; golden/2: the float64
//! truth, transformers' float32 result beside it), judged by the float32 bar of
//! `moe_kernels::bound`. The disk -> native mapping is written out here by hand, independently of
//! `adapters`: `gate_and_up_projs[e] = cat([gate_proj[e].T, up_proj[e].T], -1)`,
//! `down_projs[e] = down_proj[e].T`, `moe.router_bias` = `e_score_correction_bias`.

mod fixture_io;

use fixture_io::{fixture_dir, load, load64, model_files};
use moe_kernels::bound::{self, TruthRef};
use moe_kernels::{
    fast, reference, Activation, MoeConfig, MoeGrads, MoeParams, Real, RouterKind,
    SharedExpertParams,
};
use ndarray::{s, Array1, Array2, Array3, ArrayD, Axis, Ix1, Ix2, Ix3};
use std::collections::HashMap;

const P: &str = "model.layers.1";

/// The native parameters (owned), in `F`.
struct Native<F> {
    gate: Array2<F>,
    bias: Array1<F>,
    gate_up: Array3<F>,
    down: Array3<F>,
    shared: [Array2<F>; 3],
}

impl Native<f32> {
    fn load(w: &HashMap<String, ArrayD<f32>>) -> Self {
        let t = |k: &str| w[&format!("{P}.{k}")].clone();
        let g: Array3<f32> = t("moe.gate_proj.weight")
            .into_dimensionality::<Ix3>()
            .unwrap();
        let u: Array3<f32> = t("moe.up_proj.weight")
            .into_dimensionality::<Ix3>()
            .unwrap();
        let d: Array3<f32> = t("moe.down_proj.weight")
            .into_dimensionality::<Ix3>()
            .unwrap();
        let (e, i, h) = g.dim();
        let mut gate_up = Array3::<f32>::zeros((e, h, 2 * i));
        gate_up
            .slice_mut(s![.., .., ..i])
            .assign(&g.permuted_axes([0, 2, 1]));
        gate_up
            .slice_mut(s![.., .., i..])
            .assign(&u.permuted_axes([0, 2, 1]));
        let down = d.permuted_axes([0, 2, 1]).as_standard_layout().to_owned();
        let m2 = |k: &str| t(k).into_dimensionality::<Ix2>().unwrap();
        Native {
            gate: m2("moe.gate.weight"),
            bias: t("moe.router_bias").into_dimensionality::<Ix1>().unwrap(),
            gate_up,
            down,
            shared: ["gate_proj", "up_proj", "down_proj"]
                .map(|n| m2(&format!("share_expert.{n}.weight"))),
        }
    }

    /// The same values in f64 (exact).
    fn cast(&self) -> Native<f64> {
        Native {
            gate: self.gate.mapv(f64::from),
            bias: self.bias.mapv(f64::from),
            gate_up: self.gate_up.mapv(f64::from),
            down: self.down.mapv(f64::from),
            shared: self.shared.clone().map(|a| a.mapv(f64::from)),
        }
    }
}

impl<F: Real> Native<F> {
    fn params(&self) -> MoeParams<'_, F> {
        MoeParams {
            gate_weight: self.gate.view(),
            gate_bias: None,
            e_score_correction_bias: Some(self.bias.view()),
            gate_and_up_projs: self.gate_up.view(),
            down_projs: self.down.view(),
            gate_up_bias: None,
            down_bias: None,
            shared: Some(SharedExpertParams {
                gate_proj: self.shared[0].view(),
                up_proj: self.shared[1].view(),
                down_proj: self.shared[2].view(),
                gate: None,
            }),
        }
    }
}

/// `output` and the gradients in the disk layout, keyed like the golden file, as f64.
fn disk<F: Real>(output: &Array2<F>, g: &MoeGrads<F>) -> Vec<(String, Vec<f64>)> {
    fn f<F: Real>(a: ndarray::ArrayViewD<F>) -> Vec<f64> {
        a.iter().map(|v| v.to_f64_lossless()).collect()
    }
    let i = g.gate_and_up_projs.shape()[2] / 2;
    let gu = g.gate_and_up_projs.view().permuted_axes([0, 2, 1]); // [E, 2I, H]
    let sh = g.shared.as_ref().expect("shared expert gradients");
    vec![
        ("output".into(), f(output.view().into_dyn())),
        ("grad_input".into(), f(g.grad_input.view().into_dyn())),
        (
            format!("grad.{P}.moe.gate.weight"),
            f(g.gate_weight.view().into_dyn()),
        ),
        (
            format!("grad.{P}.moe.gate_proj.weight"),
            f(gu.slice(s![.., ..i, ..]).into_dyn()),
        ),
        (
            format!("grad.{P}.moe.up_proj.weight"),
            f(gu.slice(s![.., i.., ..]).into_dyn()),
        ),
        (
            format!("grad.{P}.moe.down_proj.weight"),
            f(g.down_projs.view().permuted_axes([0, 2, 1]).into_dyn()),
        ),
        (
            format!("grad.{P}.share_expert.gate_proj.weight"),
            f(sh.gate_proj.view().into_dyn()),
        ),
        (
            format!("grad.{P}.share_expert.up_proj.weight"),
            f(sh.up_proj.view().into_dyn()),
        ),
        (
            format!("grad.{P}.share_expert.down_proj.weight"),
            f(sh.down_proj.view().into_dyn()),
        ),
    ]
}

#[test]
fn step3p5_block_matches_transformers_float64_truth() {
    let dir = fixture_dir("step3p5_tiny");
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let (golden, meta) = load64(&dir.join("golden.safetensors"));
    assert_eq!(meta["format"], "golden/2");
    let (w, _) = load(&model_files(&dir));
    let native = Native::load(&w);
    let n64 = native.cast();
    let limit = config["swiglu_limits"][1].as_f64().unwrap();
    let cfg = MoeConfig {
        router: RouterKind::SigmoidTopK {
            routed_scaling_factor: config["moe_router_scaling_factor"].as_f64().unwrap(),
        },
        top_k: config["moe_top_k"].as_u64().unwrap() as usize,
        activation: Activation::ClampedSwiGlu { limit },
    };
    let m2 = |k: &str| -> Array2<f64> { golden[k].clone().into_dimensionality().unwrap() };
    let (x64, go64) = (m2("input"), m2("grad_output"));
    let (x, go) = (x64.mapv(|v| v as f32), go64.mapv(|v| v as f32));
    let mags = bound::block_magnitudes(x64.view(), &n64.params(), &cfg, go64.view()).unwrap();
    let mag = disk(&mags.output, &mags.grads);
    let truth = |name: &str| -> Vec<f64> { golden[name].iter().copied().collect() };

    // The float64 reference is the truth to float64 rounding.
    let p64 = n64.params();
    let f = reference::moe_forward(x64.view(), &p64, &cfg).unwrap();
    let g = reference::moe_backward(x64.view(), &p64, &cfg, &f, go64.view()).unwrap();
    for (name, v) in disk(&f.output, &g) {
        let e = bound::normwise(&v, &truth(&name));
        assert!(e <= bound::F64_NORMWISE, "float64 {name}: {e:e}");
    }

    let p = native.params();
    for path in ["reference", "fast"] {
        let (f, g) = if path == "fast" {
            let f = fast::moe_forward(x.view(), &p, &cfg).unwrap();
            let g = fast::moe_backward(x.view(), &p, &cfg, &f, go.view()).unwrap();
            (f, g)
        } else {
            let f = reference::moe_forward(x.view(), &p, &cfg).unwrap();
            let g = reference::moe_backward(x.view(), &p, &cfg, &f, go.view()).unwrap();
            (f, g)
        };
        for ((name, v), (_, m)) in disk(&f.output, &g).iter().zip(&mag) {
            let r = truth(&format!("f32.{name}"));
            let note = bound::judge_f32(
                v,
                &TruthRef {
                    values: &truth(name),
                    mags: m,
                    f32_ref: Some(&r),
                },
            )
            .unwrap_or_else(|e| panic!("{path} {name}: {e}"));
            println!("{path} {name}: {note}");
        }
    }
    // The clamp is exercised: some silu(gate) values of expert 0 exceed the limit.
    let i = n64.gate_up.shape()[2] / 2;
    let xg = x64.dot(&n64.gate_up.index_axis(Axis(0), 0).slice(s![.., ..i]));
    assert!(
        xg.iter().any(|&v| v / (1.0 + (-v).exp()) > limit),
        "fixture does not reach the clamp"
    );
}
