// M-grouped GEMM over expert-contiguous rows: for each expert e and each row r in
// offsets[e]..offsets[e+1], c[r, :] = a[r, :] @ w[e] (a [N, K], w [E, K, Nout] row-major,
// c [N, Nout] f32). f32 or bf16 inputs, f32 accumulation. Tiles never straddle two experts:
// blockIdx.y enumerates, expert by expert, the ceil(count_e / GG_TM) row tiles of each expert
// (grid.y = ceil(N / GG_TM) + E is an upper bound; spare blocks exit). Each output element is
// one fixed-order reduction, so results are deterministic.
#define GG_TM 64
#define GG_TN 64
#define GG_TK 16

// TRANS_B: w is [E, Nout, K] and c[rows_e] = a[rows_e] @ w[e]^T (the dX GEMMs of the backward).
template <typename T, bool TRANS_B>
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
            long long off = TRANS_B ? (long long)col * kdim + kc : (long long)kc * nout + col;
            bs[kk][n] = (kc < kdim && col < nout) ? moe_load_f32(we + off) : 0.0f;
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
    grouped_gemm_tiled<float, false>(a, w, offsets, experts, kdim, nout, c);
}

// blockDim.x = 256.
extern "C" __global__ void grouped_gemm_bf16(const moe_bf16* a, const moe_bf16* w,
                                             const unsigned int* offsets, int experts, int kdim,
                                             int nout, float* c) {
    grouped_gemm_tiled<moe_bf16, false>(a, w, offsets, experts, kdim, nout, c);
}

// dX of the expert GEMMs: c[rows_e] = a[rows_e] @ w[e]^T, w [E, Nout, K] (e.g. grad_xp = da @
// W_gu[e]^T with W_gu [E, H, 2I]: K = 2I, Nout = H). blockDim.x = 256.
extern "C" __global__ void grouped_gemm_nt_f32(const float* a, const float* w,
                                               const unsigned int* offsets, int experts, int kdim,
                                               int nout, float* c) {
    grouped_gemm_tiled<float, true>(a, w, offsets, experts, kdim, nout, c);
}

// K-grouped GEMM (weight gradients): out[e] = a[rows_e]^T @ b[rows_e], a [N, M], b [N, Nout],
// out [E, M, Nout]. One block owns each 64 x 64 output tile (grid (ceil(Nout/64),
// ceil(M/64), E)) and reduces over the expert's rows in 16-row steps, ascending: deterministic,
// no atomics. An expert with zero rows writes exact zeros. blockDim.x = 256.
extern "C" __global__ void grouped_gemm_tn_f32(const float* __restrict__ a,
                                               const float* __restrict__ b,
                                               const unsigned int* __restrict__ offsets, int mdim,
                                               int nout, float* __restrict__ out) {
    __shared__ float as[GG_TK][GG_TM];
    __shared__ float bs[GG_TK][GG_TN];
    int e = blockIdx.z;
    int row0 = (int)offsets[e], row1 = (int)offsets[e + 1];
    int m0 = blockIdx.y * GG_TM, col0 = blockIdx.x * GG_TN;
    int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
    float acc[4][4];
    for (int i = 0; i < 4; ++i)
        for (int j = 0; j < 4; ++j) acc[i][j] = 0.0f;
    for (int r0 = row0; r0 < row1; r0 += GG_TK) {
        for (int q = threadIdx.x; q < GG_TK * GG_TM; q += blockDim.x) {
            int kk = q / GG_TM, m = q % GG_TM;
            int r = r0 + kk, mm = m0 + m;
            as[kk][m] = (r < row1 && mm < mdim) ? a[(long long)r * mdim + mm] : 0.0f;
        }
        for (int q = threadIdx.x; q < GG_TK * GG_TN; q += blockDim.x) {
            int kk = q / GG_TN, n = q % GG_TN;
            int r = r0 + kk, col = col0 + n;
            bs[kk][n] = (r < row1 && col < nout) ? b[(long long)r * nout + col] : 0.0f;
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
    float* oe = out + (long long)e * mdim * nout;
    for (int i = 0; i < 4; ++i) {
        int m = m0 + ty * 4 + i;
        if (m >= mdim) continue;
        for (int j = 0; j < 4; ++j) {
            int col = col0 + tx * 4 + j;
            if (col < nout) oe[(long long)m * nout + col] = acc[i][j];
        }
    }
}
