// M-grouped GEMM over expert-contiguous rows: for each expert e and each row r in
// offsets[e]..offsets[e+1], c[r, :] = a[r, :] @ w[e] (a [N, K], w [E, K, Nout] row-major,
// c [N, Nout] f32). f32 or bf16 inputs, f32 accumulation. Tiles never straddle two experts:
// blockIdx.y enumerates, expert by expert, the ceil(count_e / GG_TM) row tiles of each expert
// (grid.y = ceil(N / GG_TM) + E is an upper bound; spare blocks exit). Each output element is
// one fixed-order reduction, so results are deterministic.
#define GG_TM 64
#define GG_TN 64
#define GG_TK 16

template <typename T>
__device__ void grouped_gemm_tiled(const T* __restrict__ a, const T* __restrict__ w,
                                   const unsigned int* __restrict__ offsets, int experts, int kdim,
                                   int nout, float* __restrict__ c) {
    __shared__ float as[GG_TK][GG_TM];
    __shared__ float bs[GG_TK][GG_TN];
    int e, row0, row1;
    if (!gg_find_tile(offsets, experts, blockIdx.y, GG_TM, &e, &row0, &row1)) return;
    const T* we = w + (long long)e * kdim * nout;
    int col0 = blockIdx.x * GG_TN;
    int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
    float acc[4][4];
    for (int i = 0; i < 4; ++i)
        for (int j = 0; j < 4; ++j) acc[i][j] = 0.0f;
    for (int k0 = 0; k0 < kdim; k0 += GG_TK) {
        for (int q = threadIdx.x; q < GG_TM * GG_TK; q += blockDim.x) {
            int m = q / GG_TK, kk = q % GG_TK;
            int r = row0 + m, kc = k0 + kk;
            as[kk][m] = (r < row1 && kc < kdim) ? moe_load_f32(a + (long long)r * kdim + kc) : 0.0f;
        }
        for (int q = threadIdx.x; q < GG_TK * GG_TN; q += blockDim.x) {
            int kk = q / GG_TN, n = q % GG_TN;
            int kc = k0 + kk, col = col0 + n;
            bs[kk][n] = (kc < kdim && col < nout) ? moe_load_f32(we + (long long)kc * nout + col) : 0.0f;
        }
        __syncthreads();
        for (int kk = 0; kk < GG_TK; ++kk) {
            float av[4], bv[4];
            for (int i = 0; i < 4; ++i) av[i] = as[kk][ty * 4 + i];
            for (int j = 0; j < 4; ++j) bv[j] = bs[kk][tx * 4 + j];
            for (int i = 0; i < 4; ++i)
                for (int j = 0; j < 4; ++j) acc[i][j] += av[i] * bv[j];
        }
        __syncthreads();
    }
    for (int i = 0; i < 4; ++i) {
        int r = row0 + ty * 4 + i;
        if (r >= row1) continue;
        for (int j = 0; j < 4; ++j) {
            int col = col0 + tx * 4 + j;
            if (col < nout) c[(long long)r * nout + col] = acc[i][j];
        }
    }
}

// blockDim.x = 256.
extern "C" __global__ void grouped_gemm_f32(const float* a, const float* w,
                                            const unsigned int* offsets, int experts, int kdim,
                                            int nout, float* c) {
    grouped_gemm_tiled(a, w, offsets, experts, kdim, nout, c);
}

// blockDim.x = 256.
extern "C" __global__ void grouped_gemm_bf16(const moe_bf16* a, const moe_bf16* w,
                                             const unsigned int* offsets, int experts, int kdim,
                                             int nout, float* c) {
    grouped_gemm_tiled(a, w, offsets, experts, kdim, nout, c);
}
