// Tensor-core M-grouped GEMM (sm_80+): bf16 a [N, K] and w [E, K, Nout] (row-major, raw bits),
// f32 accumulation and output c [N, Nout], c[rows_e] = a[rows_e] @ w[e]. mma.sync m16n8k16
// bf16, fragments loaded by ldmatrix (.trans for the K-major B tile), global -> shared copies by
// cp.async (16 bytes, zero-filled beyond the matrix) when `vec16` (K % 8 == 0, Nout % 8 == 0,
// 16-byte aligned bases) else scalar loads. Block tile 64 x 64 x 32, 4 warps of 32 x 32,
// single-stage pipeline. Same tile schedule as grouped_gemm.cu. blockDim.x = 128.
#define MMA_BM 64
#define MMA_BN 64
#define MMA_BK 32
#define MMA_APAD 8
#define MMA_BPAD 8

__device__ __forceinline__ unsigned int mma_smem_addr(const void* p) {
    return (unsigned int)__cvta_generic_to_shared(p);
}

__device__ __forceinline__ void mma_cp_async16(void* smem, const void* gmem, bool valid) {
    unsigned int dst = mma_smem_addr(smem);
    int src_size = valid ? 16 : 0;
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem),
                 "r"(src_size));
}

extern "C" __global__ void grouped_gemm_bf16_mma(const moe_bf16* __restrict__ a,
                                                 const moe_bf16* __restrict__ w,
                                                 const unsigned int* __restrict__ offsets,
                                                 int experts, int kdim, int nout, int vec16,
                                                 float* __restrict__ c) {
    __shared__ __align__(16) moe_bf16 as[MMA_BM][MMA_BK + MMA_APAD];
    __shared__ __align__(16) moe_bf16 bs[MMA_BK][MMA_BN + MMA_BPAD];
    int e, row0, row1;
    if (!gg_find_tile(offsets, experts, blockIdx.y, MMA_BM, &e, &row0, &row1)) return;
    const moe_bf16* we = w + (long long)e * kdim * nout;
    int col0 = blockIdx.x * MMA_BN;
    int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
    int wm = (warp / 2) * 32, wn = (warp % 2) * 32;
    float acc[2][4][4];
    for (int i = 0; i < 2; ++i)
        for (int j = 0; j < 4; ++j)
            for (int q = 0; q < 4; ++q) acc[i][j][q] = 0.0f;

    for (int k0 = 0; k0 < kdim; k0 += MMA_BK) {
        if (vec16) {
            // A: 64 rows x 32 cols = 256 chunks of 8; B: 32 rows x 64 cols = 256 chunks.
            for (int q = tid; q < MMA_BM * MMA_BK / 8; q += blockDim.x) {
                int m = q / (MMA_BK / 8), kc = (q % (MMA_BK / 8)) * 8;
                int r = row0 + m, kk = k0 + kc;
                bool ok = r < row1 && kk < kdim;
                const moe_bf16* src = ok ? a + (long long)r * kdim + kk : a;
                mma_cp_async16(&as[m][kc], src, ok);
            }
            for (int q = tid; q < MMA_BK * MMA_BN / 8; q += blockDim.x) {
                int kr = q / (MMA_BN / 8), nc = (q % (MMA_BN / 8)) * 8;
                int kk = k0 + kr, col = col0 + nc;
                bool ok = kk < kdim && col < nout;
                const moe_bf16* src = ok ? we + (long long)kk * nout + col : we;
                mma_cp_async16(&bs[kr][nc], src, ok);
            }
            asm volatile("cp.async.commit_group;\n" ::);
            asm volatile("cp.async.wait_group 0;\n" ::);
        } else {
            for (int q = tid; q < MMA_BM * MMA_BK; q += blockDim.x) {
                int m = q / MMA_BK, kc = q % MMA_BK;
                int r = row0 + m, kk = k0 + kc;
                as[m][kc] = (r < row1 && kk < kdim) ? a[(long long)r * kdim + kk] : (moe_bf16)0;
            }
            for (int q = tid; q < MMA_BK * MMA_BN; q += blockDim.x) {
                int kr = q / MMA_BN, nc = q % MMA_BN;
                int kk = k0 + kr, col = col0 + nc;
                bs[kr][nc] = (kk < kdim && col < nout) ? we[(long long)kk * nout + col] : (moe_bf16)0;
            }
        }
        __syncthreads();
        for (int ks = 0; ks < MMA_BK; ks += 16) {
            unsigned int af[2][4], bf[4][2];
            for (int i = 0; i < 2; ++i) {
                const moe_bf16* p = &as[wm + i * 16 + (lane % 16)][ks + (lane / 16) * 8];
                asm volatile(
                    "ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                    : "=r"(af[i][0]), "=r"(af[i][1]), "=r"(af[i][2]), "=r"(af[i][3])
                    : "r"(mma_smem_addr(p)));
            }
            for (int jp = 0; jp < 2; ++jp) {
                const moe_bf16* p = &bs[ks + (lane % 16)][wn + jp * 16 + (lane / 16) * 8];
                asm volatile(
                    "ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                    : "=r"(bf[2 * jp][0]), "=r"(bf[2 * jp][1]), "=r"(bf[2 * jp + 1][0]),
                      "=r"(bf[2 * jp + 1][1])
                    : "r"(mma_smem_addr(p)));
            }
            for (int i = 0; i < 2; ++i)
                for (int j = 0; j < 4; ++j)
                    asm volatile(
                        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
                        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
                        : "+f"(acc[i][j][0]), "+f"(acc[i][j][1]), "+f"(acc[i][j][2]),
                          "+f"(acc[i][j][3])
                        : "r"(af[i][0]), "r"(af[i][1]), "r"(af[i][2]), "r"(af[i][3]),
                          "r"(bf[j][0]), "r"(bf[j][1]));
        }
        __syncthreads();
    }
    for (int i = 0; i < 2; ++i)
        for (int j = 0; j < 4; ++j)
            for (int q = 0; q < 4; ++q) {
                int r = row0 + wm + i * 16 + lane / 4 + (q / 2) * 8;
                int col = col0 + wn + j * 8 + (lane % 4) * 2 + (q % 2);
                if (r < row1 && col < nout) c[(long long)r * nout + col] = acc[i][j][q];
            }
}
