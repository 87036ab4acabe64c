// Pipelined tensor-core grouped GEMMs (sm_80+): bf16 operands (raw bits), f32 accumulation.
// mma.sync m16n8k16 with ldmatrix fragments and a TC_STAGES-deep cp.async pipeline (16-byte
// copies, zero-filled outside the matrix) when `vec16` (every leading dimension and column
// offset a multiple of 8 bf16, so every chunk is 16-byte aligned), plain loads otherwise.
// Block tile 128 x 128 x 32, 8 warps (2 along M x 4 along N) of 64 x 32. Dynamic shared memory:
// TC_STAGES * TC_STAGE_BYTES (61440 bytes: the launcher raises the 48 KiB default).
//
// Three layouts (the forward and the two backward GEMMs of the expert MLP):
// - tc_gemm_nn_bf16: M-grouped c[rows_e] = A[rows_e] @ B[e], A [rows, K] or gathered
//   (row r of A is a[a_idx[r]], the dispatch gather folded into the A-tile load), B [E, K, N].
//   Epilogues: mode 0 store (+ bias[e]); mode 1 GLU (the gate/up projection: the B tile takes
//   8-column groups alternately from the gate half and the up half, so every thread holds the
//   gate and the up value of the same h column; writes the pre-activation `a` [rows, 2I] in f32
//   (+ bias), h = act(gate, up) in f32 and bf16); mode 2 down projection (+ bias, and
//   yw = w[slot_of_row[r]] * y, the routing weight, when `row_w` is given).
// - tc_gemm_nt_bf16: M-grouped c[rows_e] = A[rows_e] @ B[e]^T, B [E, N, K] (dX and dh: the
//   forward weight read transposed, no copy).
// - tc_gemm_tn_bf16: K-grouped c[e] = A[rows_e]^T @ B[rows_e], A [rows, M], B [rows, N],
//   c [E, M, N] (dW: the reduction runs over the expert's rows, ascending; an expert without
//   rows gets exact zeros).
// Every output element is one fixed-order reduction: deterministic, no atomics.

#define TC_BM 128
#define TC_BN 128
#define TC_BK 32
#define TC_STAGES 3
#define TC_PAD 8
// Bytes of one stage: the larger of the two operand layouts for A ([BM][BK+PAD] or
// [BK][BM+PAD]) and for B, in bf16.
#define TC_A_BYTES (TC_BM * (TC_BK + TC_PAD) * 2)
#define TC_B_BYTES (TC_BN * (TC_BK + TC_PAD) * 2)
#define TC_STAGE_BYTES (TC_A_BYTES + TC_B_BYTES)

__device__ __forceinline__ unsigned int tc_smem(const void* p) {
    return (unsigned int)__cvta_generic_to_shared(p);
}

__device__ __forceinline__ void tc_cp16(void* smem, const void* gmem, bool valid) {
    int src_size = valid ? 16 : 0;
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(tc_smem(smem)),
                 "l"(gmem), "r"(src_size));
}

__device__ __forceinline__ void tc_commit() { asm volatile("cp.async.commit_group;\n" ::); }

template <int N>
__device__ __forceinline__ void tc_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

__device__ __forceinline__ void tc_ldsm_x4(unsigned int* r, const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(tc_smem(p)));
}

__device__ __forceinline__ void tc_ldsm_x4_t(unsigned int* r, const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(tc_smem(p)));
}

__device__ __forceinline__ void tc_mma(float* d, const unsigned int* a, unsigned int b0,
                                       unsigned int b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Epilogue arguments of tc_gemm_nn_bf16 (unused ones may be null).
struct TcEpilogue {
    int mode;             // 0 store, 1 GLU, 2 down projection
    const float* bias;    // [E, N] (mode 0 / 2) or [E, 2I] (mode 1), null for none
    int inter;            // I (mode 1)
    int act;              // GLU kind (mode 1), see glu_fwd
    float limit, alpha;   // GLU parameters (mode 1)
    float* h_f32;         // [rows, I] (mode 1)
    moe_bf16* h_bf16;     // [rows, I] (mode 1), null for none
    const float* row_w;   // [T k] routing weights by slot (mode 2), null for none
    const unsigned int* slot_of_row;  // [rows] (mode 2 with row_w)
    float* yw;            // [rows, N] routing-weighted output (mode 2 with row_w)
};

// Column of B (and of c) that tile column n of block column tile `bx` reads. GLU: 8-column
// groups alternate gate / up for the same h columns; returns -1 past the end.
__device__ __forceinline__ int tc_bcol(bool glu, int bx, int n, int ndim, int inter) {
    if (glu) {
        int hc = bx * (TC_BN / 2) + (n >> 4) * 8 + (n & 7);
        if (hc >= inter) return -1;
        return ((n >> 3) & 1) ? inter + hc : hc;
    }
    int c = bx * TC_BN + n;
    return c < ndim ? c : -1;
}

// The shared main loop. Block rows m0.. (M-grouped: grouped rows row0..row1; K-grouped: the
// M index), reduction range of `klen` (K-grouped: the expert's rows from krow0).
// A_T: A read transposed (K-grouped dW); B_T: B read transposed (dX).
template <bool GATHER, bool A_T, bool B_T, bool GLU>
__device__ __forceinline__ void tc_mainloop(
    float (&acc)[4][4][4], unsigned char* smem, const moe_bf16* __restrict__ a,
    const unsigned int* __restrict__ a_idx, int lda, const moe_bf16* __restrict__ b, int ldb,
    int m0, int m_end, int krow0, int klen, int bx, int ndim, int inter, int vec16) {
    int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    int wm = (warp >> 2) * 64, wn = (warp & 3) * 32;
    #pragma unroll
    for (int i = 0; i < 4; ++i)
        #pragma unroll
        for (int j = 0; j < 4; ++j)
            #pragma unroll
            for (int q = 0; q < 4; ++q) acc[i][j][q] = 0.0f;
    int ktiles = (klen + TC_BK - 1) / TC_BK;

    // Copies k tile `kt` into stage `st`.
    auto load = [&](int st, int kt) {
        moe_bf16* as = (moe_bf16*)(smem + st * TC_STAGE_BYTES);
        moe_bf16* bs = (moe_bf16*)(smem + st * TC_STAGE_BYTES + TC_A_BYTES);
        int k0 = kt * TC_BK;
        if (!A_T) {
            // as[m][k], BM x BK: 512 chunks of 8.
            for (int q = tid; q < TC_BM * TC_BK / 8; q += 256) {
                int m = q / (TC_BK / 8), kc = (q % (TC_BK / 8)) * 8;
                int r = m0 + m, kk = k0 + kc;
                moe_bf16* dst = as + m * (TC_BK + TC_PAD) + kc;
                long long src_row = r < m_end ? (GATHER ? (long long)a_idx[r] : r) : 0;
                const moe_bf16* src = a + src_row * lda + kk;
                if (vec16) {
                    bool ok = r < m_end && kk < klen;
                    tc_cp16(dst, ok ? src : a, ok);
                } else {
                    #pragma unroll
                    for (int x = 0; x < 8; ++x)
                        dst[x] = (r < m_end && kk + x < klen) ? src[x] : (moe_bf16)0;
                }
            }
        } else {
            // as[k][m], BK x BM: row krow0 + k of A, columns m0.. (m_end = M).
            for (int q = tid; q < TC_BK * TC_BM / 8; q += 256) {
                int kr = q / (TC_BM / 8), mc = (q % (TC_BM / 8)) * 8;
                int kk = k0 + kr, m = m0 + mc;
                moe_bf16* dst = as + kr * (TC_BM + TC_PAD) + mc;
                const moe_bf16* src = a + (long long)(krow0 + kk) * lda + m;
                if (vec16) {
                    bool ok = kk < klen && m < m_end;
                    tc_cp16(dst, ok ? src : a, ok);
                } else {
                    #pragma unroll
                    for (int x = 0; x < 8; ++x)
                        dst[x] = (kk < klen && m + x < m_end) ? src[x] : (moe_bf16)0;
                }
            }
        }
        if (!B_T) {
            // bs[k][n], BK x BN: row (krow0 +) k of B, columns tc_bcol(n).
            for (int q = tid; q < TC_BK * TC_BN / 8; q += 256) {
                int kr = q / (TC_BN / 8), nc = (q % (TC_BN / 8)) * 8;
                int kk = k0 + kr;
                moe_bf16* dst = bs + kr * (TC_BN + TC_PAD) + nc;
                if (vec16) {
                    int col = tc_bcol(GLU, bx, nc, ndim, inter);
                    bool ok = kk < klen && col >= 0;
                    const moe_bf16* src = b + (long long)(krow0 + kk) * ldb + (col < 0 ? 0 : col);
                    tc_cp16(dst, ok ? src : b, ok);
                } else {
                    #pragma unroll
                    for (int x = 0; x < 8; ++x) {
                        int col = tc_bcol(GLU, bx, nc + x, ndim, inter);
                        dst[x] = (kk < klen && col >= 0)
                                     ? b[(long long)(krow0 + kk) * ldb + col]
                                     : (moe_bf16)0;
                    }
                }
            }
        } else {
            // bs[n][k], BN x BK: B^T stored [N, K]: row (bx BN + n), columns k0...
            for (int q = tid; q < TC_BN * TC_BK / 8; q += 256) {
                int n = q / (TC_BK / 8), kc = (q % (TC_BK / 8)) * 8;
                int col = bx * TC_BN + n, kk = k0 + kc;
                moe_bf16* dst = bs + n * (TC_BK + TC_PAD) + kc;
                const moe_bf16* src = b + (long long)col * ldb + kk;
                if (vec16) {
                    bool ok = col < ndim && kk < klen;
                    tc_cp16(dst, ok ? src : b, ok);
                } else {
                    #pragma unroll
                    for (int x = 0; x < 8; ++x)
                        dst[x] = (col < ndim && kk + x < klen) ? src[x] : (moe_bf16)0;
                }
            }
        }
    };

    for (int s = 0; s < TC_STAGES - 1; ++s) {
        if (s < ktiles) load(s, s);
        tc_commit();
    }
    for (int kt = 0; kt < ktiles; ++kt) {
        tc_wait<TC_STAGES - 2>();
        __syncthreads();
        int nk = kt + TC_STAGES - 1;
        if (nk < ktiles) load(nk % TC_STAGES, nk);
        tc_commit();
        const unsigned char* stage = smem + (kt % TC_STAGES) * TC_STAGE_BYTES;
        const moe_bf16* as = (const moe_bf16*)stage;
        const moe_bf16* bs = (const moe_bf16*)(stage + TC_A_BYTES);
        #pragma unroll
        for (int ks = 0; ks < TC_BK; ks += 16) {
            unsigned int af[4][4], bf[4][2];
            #pragma unroll
            for (int i = 0; i < 4; ++i) {
                if (!A_T) {
                    tc_ldsm_x4(af[i], as + (wm + i * 16 + (lane & 15)) * (TC_BK + TC_PAD) + ks +
                                          (lane >> 4) * 8);
                } else {
                    // Stored [k][m]: matrices (m+0, k+0), (m+8, k+0), (m+0, k+8), (m+8, k+8).
                    int mi = ((lane >> 3) & 1) * 8, ki = (lane >> 4) * 8;
                    tc_ldsm_x4_t(af[i], as + (ks + ki + (lane & 7)) * (TC_BM + TC_PAD) + wm +
                                            i * 16 + mi);
                }
            }
            #pragma unroll
            for (int jp = 0; jp < 2; ++jp) {
                unsigned int r[4];
                if (!B_T) {
                    tc_ldsm_x4_t(r, bs + (ks + (lane & 15)) * (TC_BN + TC_PAD) + wn + jp * 16 +
                                       (lane >> 4) * 8);
                } else {
                    // Stored [n][k]: matrices (n+0, k+0), (n+0, k+8), (n+8, k+0), (n+8, k+8).
                    tc_ldsm_x4(r, bs + (wn + jp * 16 + (lane >> 4) * 8 + (lane & 7)) *
                                           (TC_BK + TC_PAD) +
                                       ks + ((lane >> 3) & 1) * 8);
                }
                bf[2 * jp][0] = r[0];
                bf[2 * jp][1] = r[1];
                bf[2 * jp + 1][0] = r[2];
                bf[2 * jp + 1][1] = r[3];
            }
            #pragma unroll
            for (int i = 0; i < 4; ++i)
                #pragma unroll
                for (int j = 0; j < 4; ++j) tc_mma(acc[i][j], af[i], bf[j][0], bf[j][1]);
        }
    }
    tc_wait<0>();
}

// M-grouped, B row-major [E, K, N] (the forward projections).
template <bool GATHER, bool GLU>
__device__ __forceinline__ void tc_nn(const moe_bf16* a, const unsigned int* a_idx, int lda,
                                      const moe_bf16* b, long long b_estride,
                                      const unsigned int* offsets, int experts, int ndim,
                                      int kdim, int vec16, const TcEpilogue& ep, float* c) {
    extern __shared__ __align__(16) unsigned char tc_smem_buf[];
    int e, row0, row1;
    if (!gg_find_tile(offsets, experts, blockIdx.y, TC_BM, &e, &row0, &row1)) return;
    float acc[4][4][4];
    tc_mainloop<GATHER, false, false, GLU>(acc, tc_smem_buf, a, a_idx, lda,
                                           b + (long long)e * b_estride, ndim, row0, row1, 0,
                                           kdim, blockIdx.x, ndim, ep.inter, vec16);
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    int wm = (warp >> 2) * 64, wn = (warp & 3) * 32;
    #pragma unroll
    for (int i = 0; i < 4; ++i)
        #pragma unroll
        for (int q = 0; q < 4; ++q) {
            int r = row0 + wm + i * 16 + (lane >> 2) + (q >> 1) * 8;
            if (r >= row1) continue;
            if (GLU) {
                int two_i = 2 * ep.inter;
                #pragma unroll
                for (int p = 0; p < 2; ++p) {
                    int n = wn + p * 16 + (lane & 3) * 2 + (q & 1);
                    int hc = blockIdx.x * (TC_BN / 2) + (n >> 4) * 8 + (n & 7);
                    if (hc >= ep.inter) continue;
                    float g = acc[i][2 * p][q], u = acc[i][2 * p + 1][q];
                    if (ep.bias) {
                        g += ep.bias[(long long)e * two_i + hc];
                        u += ep.bias[(long long)e * two_i + ep.inter + hc];
                    }
                    c[(long long)r * two_i + hc] = g;
                    c[(long long)r * two_i + ep.inter + hc] = u;
                    float h = glu_fwd(ep.act, ep.limit, ep.alpha, g, u);
                    ep.h_f32[(long long)r * ep.inter + hc] = h;
                    if (ep.h_bf16) ep.h_bf16[(long long)r * ep.inter + hc] = moe_f32_to_bf16(h);
                }
            } else {
                float w = (ep.mode == 2 && ep.row_w) ? ep.row_w[ep.slot_of_row[r]] : 0.0f;
                #pragma unroll
                for (int j = 0; j < 4; ++j) {
                    int col = blockIdx.x * TC_BN + wn + j * 8 + (lane & 3) * 2 + (q & 1);
                    if (col >= ndim) continue;
                    float v = acc[i][j][q];
                    if (ep.bias) v += ep.bias[(long long)e * ndim + col];
                    c[(long long)r * ndim + col] = v;
                    if (ep.mode == 2 && ep.row_w) ep.yw[(long long)r * ndim + col] = w * v;
                }
            }
        }
}

// Forward grouped GEMM (mode 0 / 2), optionally gathering A's rows. grid = (ceil(N / 128),
// ceil(rows / 128) + E), block = 256, dynamic shared memory TC_STAGES * TC_STAGE_BYTES.
extern "C" __global__ void __launch_bounds__(256)
    tc_gemm_nn_bf16(const moe_bf16* a, const unsigned int* a_idx, int gather, int lda,
                    const moe_bf16* b, long long b_estride, const unsigned int* offsets,
                    int experts, int ndim, int kdim, int vec16, TcEpilogue ep, float* c) {
    if (gather)
        tc_nn<true, false>(a, a_idx, lda, b, b_estride, offsets, experts, ndim, kdim, vec16, ep, c);
    else
        tc_nn<false, false>(a, a_idx, lda, b, b_estride, offsets, experts, ndim, kdim, vec16, ep,
                            c);
}

// Gate/up projection with the GLU in the epilogue (mode 1): c = a [rows, 2I] (pre-activation),
// ep.h_f32 / ep.h_bf16 = h [rows, I]. grid = (ceil(I / 64), ceil(rows / 128) + E).
extern "C" __global__ void __launch_bounds__(256)
    tc_gemm_glu_bf16(const moe_bf16* a, const unsigned int* a_idx, int gather, int lda,
                     const moe_bf16* b, long long b_estride, const unsigned int* offsets,
                     int experts, int ndim, int kdim, int vec16, TcEpilogue ep, float* c) {
    if (gather)
        tc_nn<true, true>(a, a_idx, lda, b, b_estride, offsets, experts, ndim, kdim, vec16, ep, c);
    else
        tc_nn<false, true>(a, a_idx, lda, b, b_estride, offsets, experts, ndim, kdim, vec16, ep,
                           c);
}

// dX-type grouped GEMM: c[rows_e] = a[rows_e] @ b[e]^T, a [rows, K], b [E, N, K] (the forward
// weight [E, Kf, Nf] read as [E, N = Kf, K = Nf]), c [rows, N]. grid = (ceil(N / 128),
// ceil(rows / 128) + E).
extern "C" __global__ void __launch_bounds__(256)
    tc_gemm_nt_bf16(const moe_bf16* a, int lda, const moe_bf16* b, long long b_estride,
                    const unsigned int* offsets, int experts, int ndim, int kdim, int vec16,
                    float* c) {
    extern __shared__ __align__(16) unsigned char tc_smem_buf[];
    int e, row0, row1;
    if (!gg_find_tile(offsets, experts, blockIdx.y, TC_BM, &e, &row0, &row1)) return;
    float acc[4][4][4];
    tc_mainloop<false, false, true, false>(acc, tc_smem_buf, a, 0, lda,
                                           b + (long long)e * b_estride, kdim, row0, row1, 0,
                                           kdim, blockIdx.x, ndim, 0, vec16);
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    int wm = (warp >> 2) * 64, wn = (warp & 3) * 32;
    #pragma unroll
    for (int i = 0; i < 4; ++i)
        #pragma unroll
        for (int j = 0; j < 4; ++j)
            #pragma unroll
            for (int q = 0; q < 4; ++q) {
                int r = row0 + wm + i * 16 + (lane >> 2) + (q >> 1) * 8;
                int col = blockIdx.x * TC_BN + wn + j * 8 + (lane & 3) * 2 + (q & 1);
                if (r < row1 && col < ndim) c[(long long)r * ndim + col] = acc[i][j][q];
            }
}

// dW-type K-grouped GEMM: c[e] = a[rows_e]^T @ b[rows_e], a [rows, M], b [rows, N],
// c [E, M, N]. grid = (ceil(N / 128), ceil(M / 128), E).
extern "C" __global__ void __launch_bounds__(256)
    tc_gemm_tn_bf16(const moe_bf16* a, const moe_bf16* b, const unsigned int* offsets, int mdim,
                    int ndim, int vec16, float* c) {
    extern __shared__ __align__(16) unsigned char tc_smem_buf[];
    int e = blockIdx.z;
    int krow0 = (int)offsets[e], klen = (int)offsets[e + 1] - krow0;
    int m0 = blockIdx.y * TC_BM;
    float acc[4][4][4];
    tc_mainloop<false, true, false, false>(acc, tc_smem_buf, a, 0, mdim, b, ndim, m0, mdim,
                                           krow0, klen, blockIdx.x, ndim, 0, vec16);
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    int wm = (warp >> 2) * 64, wn = (warp & 3) * 32;
    float* ce = c + (long long)e * mdim * ndim;
    #pragma unroll
    for (int i = 0; i < 4; ++i)
        #pragma unroll
        for (int j = 0; j < 4; ++j)
            #pragma unroll
            for (int q = 0; q < 4; ++q) {
                int m = m0 + wm + i * 16 + (lane >> 2) + (q >> 1) * 8;
                int col = blockIdx.x * TC_BN + wn + j * 8 + (lane & 3) * 2 + (q & 1);
                if (m < mdim && col < ndim) ce[(long long)m * ndim + col] = acc[i][j][q];
            }
}

// f32 -> bf16 (round to nearest even), n elements.
extern "C" __global__ void f32_to_bf16(const float* x, long long n, moe_bf16* y) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x)
        y[i] = moe_f32_to_bf16(x[i]);
}
