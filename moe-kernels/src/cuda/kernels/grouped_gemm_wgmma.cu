// Hopper (sm_90a) M-grouped GEMM on wgmma + TMA. Placeholder: the kernel is being written.
extern "C" __global__ void grouped_gemm_bf16_wgmma() {}
