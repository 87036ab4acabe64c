//! Hopper (sm_90a) grouped GEMM: wgmma + TMA (`grouped_gemm_wgmma.cu`). Placeholder.

use super::*;

impl CudaMoe {}
