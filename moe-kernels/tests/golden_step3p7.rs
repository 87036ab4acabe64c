//! Step3.5 / Step3.7 (`SigmoidTopK` router, `ClampedSwiGlu` experts, shared expert) against
//! transformers' own `Step3p7SparseMoeBlock`: `tests/fixtures/step3p7_block/golden.safetensors`,
//! written by `tests/fixtures/generate_step3p7.py` (f32 compute on bf16-rounded weights, in
//! transformers' in-memory layout: `experts.gate_up_proj` [E, 2I, H], `experts.down_proj`
//! [E, H, I]; native = transpose(1, 2)). The conformance fixture for step3p5 is roundtrip-only
//! (transformers 5.23 has no Step3.5 modelling code; Step3.7 shares the MoE block).

use std::collections::HashMap;
use std::path::Path;

use moe_kernels::{
    fast, reference, Activation, MoeConfig, MoeParams, RouterKind, SharedExpertParams,
};
use ndarray::{Array1, Array2, Array3, ArrayD};

mod fixture_io;
use fixture_io::Tensors;

/// The golden file (all F32) and its metadata.
fn load() -> (Tensors, HashMap<String, String>) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/step3p7_block/golden.safetensors");
    fixture_io::load(&[path])
}

fn a2(t: &HashMap<String, ArrayD<f32>>, k: &str) -> Array2<f32> {
    t[k].clone().into_dimensionality().unwrap()
}

/// `[E, A, B]` -> `[E, B, A]`, standard layout.
fn swap12(a: &ArrayD<f32>) -> Array3<f32> {
    let a: Array3<f32> = a.clone().into_dimensionality().unwrap();
    a.permuted_axes([0, 2, 1]).as_standard_layout().to_owned()
}

fn check(what: &str, ours: ArrayD<f32>, want: &ArrayD<f32>) {
    fixture_io::check_close(what, &ours, want);
}

#[test]
fn step3p7_block_matches_transformers() {
    let (t, meta) = load();
    let limit: f32 = meta["swiglu_limit"].parse().unwrap();
    let scale: f32 = meta["moe_router_scaling_factor"].parse().unwrap();
    let top_k: usize = meta["top_k"].parse().unwrap();
    let gate = a2(&t, "gate.weight");
    let corr: Array1<f32> = t["gate.e_score_correction_bias"]
        .clone()
        .into_dimensionality()
        .unwrap();
    let gate_up = swap12(&t["experts.gate_up_proj"]);
    let down = swap12(&t["experts.down_proj"]);
    let (sg, su, sd) = (
        a2(&t, "shared_experts.gate_proj.weight"),
        a2(&t, "shared_experts.up_proj.weight"),
        a2(&t, "shared_experts.down_proj.weight"),
    );
    let p = MoeParams {
        gate_weight: gate.view(),
        gate_bias: None,
        e_score_correction_bias: Some(corr.view()),
        gate_and_up_projs: gate_up.view(),
        down_projs: down.view(),
        gate_up_bias: None,
        down_bias: None,
        shared: Some(SharedExpertParams {
            gate_proj: sg.view(),
            up_proj: su.view(),
            down_proj: sd.view(),
            gate: None,
        }),
    };
    let cfg = MoeConfig {
        router: RouterKind::SigmoidTopK {
            routed_scaling_factor: scale,
        },
        top_k,
        activation: Activation::ClampedSwiGlu { limit },
    };
    let x = a2(&t, "input");
    let go = a2(&t, "grad_output");
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
        check(&format!("{path} output"), f.output.into_dyn(), &t["output"]);
        check(
            &format!("{path} grad_input"),
            g.grad_input.into_dyn(),
            &t["grad_input"],
        );
        check(
            &format!("{path} gate.weight"),
            g.gate_weight.into_dyn(),
            &t["grad.gate.weight"],
        );
        let gu = g.gate_and_up_projs.permuted_axes([0, 2, 1]).into_dyn();
        check(
            &format!("{path} experts.gate_up_proj"),
            gu,
            &t["grad.experts.gate_up_proj"],
        );
        let dn = g.down_projs.permuted_axes([0, 2, 1]).into_dyn();
        check(
            &format!("{path} experts.down_proj"),
            dn,
            &t["grad.experts.down_proj"],
        );
        let s = g.shared.unwrap();
        check(
            &format!("{path} shared gate_proj"),
            s.gate_proj.into_dyn(),
            &t["grad.shared_experts.gate_proj.weight"],
        );
        check(
            &format!("{path} shared up_proj"),
            s.up_proj.into_dyn(),
            &t["grad.shared_experts.up_proj.weight"],
        );
        check(
            &format!("{path} shared down_proj"),
            s.down_proj.into_dyn(),
            &t["grad.shared_experts.down_proj.weight"],
        );
    }
    // The clamp is exercised: some silu(gate) values exceed the limit in this fixture.
    let xg = x.dot(
        &gate_up
            .index_axis(ndarray::Axis(0), 0)
            .slice(ndarray::s![.., ..gate_up.shape()[2] / 2]),
    );
    assert!(
        xg.iter().any(|&v| moe_kernels::silu(v) > limit),
        "fixture does not reach the clamp"
    );
}
