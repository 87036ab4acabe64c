//! Compiles every CUDA kernel source with NVRTC for each architecture in `cuda::ARCHS`
//! (sm_80, sm_90a). Without the NVRTC library it prints "skipped: no NVRTC library" and passes,
//! unless `MOE_REQUIRE_NVRTC=1` (CI), where it fails.

use moe_kernels::cuda;

#[test]
fn every_kernel_compiles_with_nvrtc() {
    if !cuda::nvrtc_available() {
        assert!(
            std::env::var("MOE_REQUIRE_NVRTC").as_deref() != Ok("1"),
            "MOE_REQUIRE_NVRTC=1 but the NVRTC library (libnvrtc.so.13) cannot be loaded; \
             put the `nvidia-cuda-nvrtc` wheel's lib folder on LD_LIBRARY_PATH"
        );
        println!("skipped: no NVRTC library");
        return;
    }
    // Every kernel the crate declares (the entry points `compile_all` checks in the PTX).
    let expected = [
        "softmax_topk_f32",
        "softmax_topk_bf16",
        "topk_softmax_f32",
        "sigmoid_topk_f32",
        "route_backward_f32",
        "permute_hist",
        "permute_scan",
        "permute_scatter",
        "gather_rows_f32",
        "gather_rows_bf16",
        "gather_rows_b16",
        "grouped_gemm_f32",
        "grouped_gemm_bf16",
        "grouped_gemm_nt_f32",
        "grouped_gemm_tn_f32",
        "grouped_gemm_bf16_mma",
        "tc_gemm_nn_bf16",
        "tc_gemm_glu_bf16",
        "tc_gemm_nt_bf16",
        "tc_gemm_tn_bf16",
        "f32_to_bf16",
        "grouped_gemm_bf16_wgmma",
        "swiglu_f32",
        "combine_f32",
        "add_inplace_f32",
        "glu_f32",
        "glu_backward_f32",
        "add_row_bias_f32",
        "grouped_row_sum_f32",
        "permute_backward_f32",
        "combine_backward_y_f32",
        "combine_backward_w_f32",
    ];
    let declared: Vec<&str> = cuda::SOURCES
        .iter()
        .flat_map(|s| s.kernels.iter().copied())
        .collect();
    assert_eq!(declared, expected, "kernel list changed: update this test");
    let (major, minor) = cuda::nvrtc_version().expect("nvrtcVersion");
    println!("NVRTC {major}.{minor}");
    for arch in cuda::ARCHS {
        let compiled = cuda::compile_all(arch).unwrap_or_else(|e| panic!("{arch}: {e}"));
        assert_eq!(compiled.len(), cuda::SOURCES.len());
        for ((name, ptx_bytes), src) in compiled.iter().zip(cuda::SOURCES) {
            assert!(*ptx_bytes > 0);
            println!(
                "{arch} {name}: {ptx_bytes} bytes of PTX, kernels {:?}",
                src.kernels
            );
        }
    }
    // All the way to machine code: NVRTC's built-in PTX assembler checks the inline assembly,
    // the instructions each architecture has, and register / shared-memory limits.
    for arch in cuda::ARCHS {
        for src in cuda::SOURCES {
            let cubin = cuda::compile_cubin(src, arch)
                .unwrap_or_else(|e| panic!("{arch} {} to CUBIN: {e}", src.name));
            assert_eq!(
                &cubin[..4],
                b"\x7fELF",
                "{arch} {}: not an ELF CUBIN",
                src.name
            );
            println!("{arch} {}: {} bytes of CUBIN", src.name, cubin.len());
        }
    }
    // The tensor-core source really emits tensor-core instructions.
    let mma = cuda::SOURCES
        .iter()
        .find(|s| s.name == "grouped_gemm_mma.cu")
        .expect("grouped_gemm_mma.cu");
    let ptx = cuda::compile(mma, "sm_80").expect("sm_80").to_src();
    for needle in [
        "mma.sync.aligned.m16n8k16",
        "ldmatrix.sync.aligned",
        "cp.async.cg",
    ] {
        assert!(
            ptx.contains(needle),
            "`{needle}` missing from the sm_80 PTX"
        );
    }
    // The pipelined tensor-core source: mma.sync, both ldmatrix forms (the transposed operands
    // of dX / dW), a multi-stage cp.async pipeline.
    let tc = cuda::SOURCES
        .iter()
        .find(|s| s.name == "grouped_gemm_tc.cu")
        .expect("grouped_gemm_tc.cu");
    let ptx = cuda::compile(tc, "sm_80").expect("sm_80").to_src();
    for needle in [
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32",
        "ldmatrix.sync.aligned.m8n8.x4.shared.b16",
        "ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16",
        "cp.async.cg.shared.global",
        "cp.async.wait_group 1",
    ] {
        assert!(
            ptx.contains(needle),
            "`{needle}` missing from the sm_80 PTX of grouped_gemm_tc.cu"
        );
    }
    // The GEMM kernels keep their accumulators in registers: no stack frame, no spills (a
    // dynamically indexed accumulator array would silently move to local memory).
    for arch in cuda::ARCHS {
        let report = cuda::ptxas_report(tc, arch).expect("ptxas report");
        let entries = report.matches("Compiling entry function").count();
        assert_eq!(entries, tc.kernels.len(), "{arch}: ptxas report:\n{report}");
        for line in report.lines().filter(|l| l.contains("stack frame")) {
            assert!(
                line.contains(" 0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads"),
                "{arch}: grouped_gemm_tc.cu uses local memory: {line}\n{report}"
            );
        }
        println!("{arch} grouped_gemm_tc.cu ptxas:\n{report}");
    }
}
