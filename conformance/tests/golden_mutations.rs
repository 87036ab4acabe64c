//! Each deliberate fault of the fast float32 path (`golden::Fault`) fails a named check of the
//! float32 bar on the committed transformers fixtures, while the reference paths (no fault) pass:
//! the bar follows the arithmetic and still catches real faults, down to a 1e-4 relative error
//! in one expert.

use conformance::golden::{self, Fault};
use conformance::report::Check;
use std::path::PathBuf;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(name)
}

/// The failed checks' names with `fault` on `name`; asserts every other path passed.
fn failed(name: &str, fault: Fault) -> Vec<String> {
    let checks: Vec<Check> = golden::run_with(&fixture(name), Some(fault)).expect("fixture");
    let tag = format!("fast+{}", fault.name());
    let bad: Vec<&Check> = checks.iter().filter(|c| c.failed()).collect();
    for c in &bad {
        assert!(
            c.name.contains(&tag),
            "{name} {fault:?}: a path without the fault failed: {c:?}"
        );
    }
    assert!(
        checks.iter().any(|c| c.name.contains(" reference f64 ")),
        "{name}: no float64 checks"
    );
    bad.iter().map(|c| c.name.clone()).collect()
}

fn has(failed: &[String], suffix: &str) -> bool {
    failed.iter().any(|n| n.ends_with(suffix))
}

#[test]
fn the_unmutated_fixtures_pass() {
    for name in [
        "qwen3_moe_tiny",
        "gpt_oss_tiny",
        "deepseek_v3_tiny",
        "qwen3_vl_moe_tiny",
    ] {
        let checks = golden::run(&fixture(name)).unwrap();
        let bad: Vec<&Check> = checks.iter().filter(|c| c.failed()).collect();
        assert!(bad.is_empty(), "{name}: {bad:?}");
    }
}

#[test]
fn a_swapped_expert_fails_output_and_both_experts_gradients() {
    for name in ["qwen3_moe_tiny", "mixtral_tiny"] {
        let f = failed(name, Fault::SwapExperts);
        assert!(has(&f, " output"), "{name}: {f:?}");
        assert!(has(&f, " grad_input"), "{name}: {f:?}");
        assert!(f.iter().any(|n| n.contains("experts.0.")), "{name}: {f:?}");
        assert!(f.iter().any(|n| n.contains("experts.1.")), "{name}: {f:?}");
    }
}

#[test]
fn a_missing_bias_fails_the_output() {
    // GPT-OSS: router and expert biases; DeepSeek-V3: the score-correction bias (routing changes).
    for name in ["gpt_oss_tiny", "deepseek_v3_tiny"] {
        let f = failed(name, Fault::DropBias);
        assert!(has(&f, " output"), "{name}: {f:?}");
    }
    // GPT-OSS's expert-bias gradients do not depend on the bias values of the same expert, but
    // the router gradient does.
    let f = failed("gpt_oss_tiny", Fault::DropBias);
    assert!(has(&f, "mlp.router.weight"), "{f:?}");
    // A family without biases cannot show the fault: an error, not a silent pass.
    let e = golden::run_with(&fixture("qwen3_moe_tiny"), Some(Fault::DropBias))
        .expect_err("qwen3_moe has no bias")
        .to_string();
    assert!(e.contains("drop-bias: this family has no bias"), "{e}");
}

#[test]
fn a_transposed_square_expert_weight_fails() {
    // H = 64 = 2I: a missed transpose of the gate/up matrices keeps every shape.
    for name in ["qwen3_vl_moe_tiny", "gpt_oss_tiny", "qwen3_moe_tiny"] {
        let f = failed(name, Fault::TransposeExpertWeight);
        assert!(has(&f, " output"), "{name}: {f:?}");
        assert!(has(&f, " grad_input"), "{name}: {f:?}");
    }
}

#[test]
fn a_1e_4_relative_error_in_one_expert_fails() {
    for name in [
        "qwen3_moe_tiny",
        "deepseek_v3_tiny",
        "gpt_oss_tiny",
        "qwen3_moe_e128_k8",
    ] {
        let f = failed(name, Fault::ScaleOneExpert);
        assert!(has(&f, " output"), "{name}: {f:?}");
        assert!(has(&f, " grad_input"), "{name}: {f:?}");
    }
}

#[test]
fn a_dropped_routing_weight_fails_the_output() {
    for name in ["qwen3_moe_tiny", "deepseek_v3_e256_k8", "qwen3_next_tiny"] {
        let f = failed(name, Fault::DropRoutingWeight);
        assert_eq!(f.len(), 1, "{name}: only the output is affected: {f:?}");
        assert!(has(&f, " output"), "{name}: {f:?}");
    }
}
