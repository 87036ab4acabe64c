//! Both paths reject bad shapes and configurations with errors that name the tensor or
//! parameter, instead of panicking.

mod common;

use common::{Case, Family};
use moe_kernels::{fast, reference, KernelError, MoeConfig, RouterKind};
use ndarray::{Array1, Array2, Array3};

fn both(c: &Case<f32>, cfg: &MoeConfig) -> (KernelError, KernelError) {
    let a = reference::moe_forward(c.x.view(), &c.params(), cfg).unwrap_err();
    let b = fast::moe_forward(c.x.view(), &c.params(), cfg).unwrap_err();
    (a, b)
}

/// A named edit that breaks one tensor's shape.
type Edit = (&'static str, Box<dyn Fn(&mut Case<f32>)>);

fn names(err: &KernelError, tensor: &str) -> bool {
    matches!(err, KernelError::ShapeMismatch { tensor: t, .. } if *t == tensor)
}

#[test]
fn shape_errors_name_the_tensor() {
    let base: Case<f32> = Family::GptOss.case(1, 4, 6, 3, 8);
    let cfg = Family::GptOss.config(8, 2);
    let cases: Vec<Edit> = vec![
        (
            "gate_weight",
            Box::new(|c| c.gate_weight = Array2::zeros((8, 5))),
        ),
        (
            "gate_and_up_projs",
            Box::new(|c| c.gate_up = Array3::zeros((8, 6, 5))),
        ),
        (
            "down_projs",
            Box::new(|c| c.down = Array3::zeros((8, 4, 6))),
        ),
        (
            "gate_bias",
            Box::new(|c| c.gate_bias = Some(Array1::zeros(7))),
        ),
        (
            "gate_up_bias",
            Box::new(|c| c.gate_up_bias = Some(Array2::zeros((8, 5)))),
        ),
        (
            "down_bias",
            Box::new(|c| c.down_bias = Some(Array2::zeros((7, 6)))),
        ),
    ];
    for (tensor, edit) in cases {
        let mut c = base.clone();
        edit(&mut c);
        let (a, b) = both(&c, &cfg);
        assert!(names(&a, tensor), "reference: {a}");
        assert!(names(&b, tensor), "fast: {b}");
        assert!(a.to_string().contains(tensor));
    }
    let mut c: Case<f32> = Family::Qwen3Next.case(1, 4, 6, 3, 8);
    c.shared.as_mut().unwrap().down_proj = Array2::zeros((6, 4));
    let (a, b) = both(&c, &Family::Qwen3Next.config(8, 2));
    assert!(
        names(&a, "shared.down_proj") && names(&b, "shared.down_proj"),
        "{a} / {b}"
    );
}

#[test]
fn configuration_errors() {
    let c: Case<f32> = Family::DeepseekV3.case(1, 4, 6, 3, 8);
    let bad_groups = MoeConfig {
        router: RouterKind::SigmoidGroupLimited {
            n_group: 3,
            topk_group: 1,
            norm_topk_prob: true,
            routed_scaling_factor: 1.0,
        },
        ..Family::DeepseekV3.config(8, 2)
    };
    let (a, b) = both(&c, &bad_groups);
    assert!(
        matches!(a, KernelError::InvalidConfig(ref m) if m.contains("n_group")),
        "{a}"
    );
    assert!(matches!(b, KernelError::InvalidConfig(_)));
    // k larger than the experts of the kept groups: 1 group of 4 experts cannot give k = 5.
    let too_many = MoeConfig {
        router: RouterKind::SigmoidGroupLimited {
            n_group: 2,
            topk_group: 1,
            norm_topk_prob: true,
            routed_scaling_factor: 1.0,
        },
        ..Family::DeepseekV3.config(8, 5)
    };
    assert!(
        matches!(both(&c, &too_many).0, KernelError::InvalidConfig(ref m) if m.contains("top_k"))
    );
    // A correction bias given to a softmax router would be silently ignored: rejected.
    let softmax = MoeConfig {
        router: RouterKind::SoftmaxTopK {
            norm_topk_prob: true,
        },
        ..Family::DeepseekV3.config(8, 2)
    };
    assert!(
        matches!(both(&c, &softmax).0, KernelError::InvalidConfig(ref m) if m.contains("e_score_correction_bias"))
    );
    assert!(matches!(
        both(&c, &Family::DeepseekV3.config(8, 0)).1,
        KernelError::ZeroTopK
    ));
    assert!(matches!(
        both(&c, &Family::DeepseekV3.config(8, 9)).1,
        KernelError::TopKTooLarge { .. }
    ));
}

#[test]
fn backward_rejects_a_wrong_grad_output() {
    let c: Case<f32> = Family::Mixtral.case(1, 4, 6, 3, 8);
    let cfg = Family::Mixtral.config(8, 2);
    let go = Array2::<f32>::zeros((4, 5));
    let f = fast::moe_forward(c.x.view(), &c.params(), &cfg).unwrap();
    let a = reference::moe_backward(c.x.view(), &c.params(), &cfg, &f, go.view()).unwrap_err();
    let b = fast::moe_backward(c.x.view(), &c.params(), &cfg, &f, go.view()).unwrap_err();
    assert!(
        names(&a, "grad_output") && names(&b, "grad_output"),
        "{a} / {b}"
    );
    // A forward of another batch (T = 3) does not fit x (T = 4).
    let other: Case<f32> = Family::Mixtral.case(2, 3, 6, 3, 8);
    let f3 = fast::moe_forward(other.x.view(), &other.params(), &cfg).unwrap();
    let go4 = Array2::<f32>::zeros((4, 6));
    let err = fast::moe_backward(c.x.view(), &c.params(), &cfg, &f3, go4.view()).unwrap_err();
    assert!(names(&err, "fwd.routing"), "{err}");
    // Each routing tensor alone of the wrong shape is refused (k = 2, E = 8, T = 4).
    let mut bad_w = f.clone();
    bad_w.routing.top_k_weights = Array2::zeros((4, 3));
    let mut bad_p = f.clone();
    bad_p.routing.probs = Array2::zeros((4, 7));
    for bad in [bad_w, bad_p] {
        for err in [
            reference::moe_backward(c.x.view(), &c.params(), &cfg, &bad, go4.view()).unwrap_err(),
            fast::moe_backward(c.x.view(), &c.params(), &cfg, &bad, go4.view()).unwrap_err(),
        ] {
            assert!(err.to_string().contains("routing"), "{err}");
        }
    }
}
