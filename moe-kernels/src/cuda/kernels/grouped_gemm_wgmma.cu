// Hopper (sm_90a) M-grouped GEMM on wgmma + TMA: bf16 inputs (raw bits), f32 accumulation and
// output. c[r, :] = a[src(r), :] @ w[e(r)] for the rows r of each expert e (offsets[e] ..
// offsets[e + 1]); src(r) = token_of_row[r] when `token_of_row` is given (a = [a_rows, K] token
// rows: the dispatch gather is folded into the A-tile load), else src(r) = r (a = [rows, K]).
// w is [E, K, Nout] row-major (Nout contiguous, i.e. B is MN-major).
//
// Structure (the CUTLASS SM90 TMA warp-specialized GEMM, non-persistent, cluster 1x1x1):
//   * block tile BM x BN x BK = 128 x 128 x 64, STAGES = 4 shared-memory stages, 384 threads:
//     warpgroup 0 is the producer, warpgroups 1 and 2 the consumers (rows 0..63 / 64..127 of
//     the tile, one wgmma.mma_async m64n128k16 f32.bf16.bf16 per 16-wide k step, 64 f32
//     accumulators per thread).
//   * every shared tile uses the 128-byte swizzle (16-byte chunk c of 128-byte row r stored at
//     chunk c ^ (r % 8), rows 128 bytes apart, tiles 1024-byte aligned), i.e. what TMA writes
//     with CU_TENSOR_MAP_SWIZZLE_128B and what a wgmma descriptor with layout type 1 reads:
//       A stage: [128 rows][64 k] (K-major): canonical K-major SW128 layout, SBO = 1024 bytes
//                (8-row groups), LBO unused (1); a k step of 16 adds 32 bytes to the start.
//       B stage: two [64 k][64 n] chunks (n 0..63 and 64..127), each K rows of 128 bytes: the
//                canonical MN-major SW128 layout ((64 n, 2 chunks), (8 k, k groups)) with
//                LBO = 8192 bytes (between the two 64-wide n chunks) and SBO = 1024 bytes
//                (between 8-row k groups); the wgmma transpose-B immediate is 1 (B MN-major),
//                so w is used as stored, no transposition. A k step of 16 adds 2048 bytes.
//   * B (weights) always by TMA over w viewed as the 3-D tensor [E][K][Nout] (box 64 x 64 x 1,
//     one load per 64-wide n chunk), so k beyond K and n beyond Nout are zero-filled per
//     expert (a chunk wholly beyond Nout is not loaded: it only feeds unstored columns). A by TMA over the 2-D tensor [rows][K] (box 64 x 128) without gather; with the
//     gather by cp.async (16 bytes, zero-filled out of range) from the 128 producer threads
//     straight into the swizzled layout.
//   * pipeline: per stage a "full" mbarrier (TMA: one arrive.expect_tx with the stage's bytes;
//     gather: + 128 cp.async.mbarrier.arrive.noinc) and an "empty" mbarrier (one arrival per
//     consumer warp, 8 in all, after wgmma.wait_group shows the stage's wgmmas are done).
//     Consumers keep one wgmma group in flight (wait_group 1) and release the previous stage.
//   * epilogue: every consumer thread stores its accumulator fragment (row pairs of float2)
//     straight to c, rows bounded by the expert's range, columns by Nout.
//   * tile schedule: gg_find_tile (common.cuh) over blockIdx.y (an upper bound of
//     ceil(rows / 128) + E row tiles, spare tiles exit), blockIdx.x the 128-wide column tile.
//     Tiles never straddle two experts; every output element is one fixed-order sum over k in
//     one thread: deterministic, no atomics.
//
// Host requirements (checked by the Rust wrapper): K % 8 == 0 and Nout % 8 == 0 (TMA global
// strides are multiples of 16 bytes, cp.async 16-byte chunks), 16-byte aligned bases,
// dynamic shared memory WG_SMEM_BYTES (opt-in above 48 KiB), blockDim.x = 384.
//
// Only sm_90a has wgmma: elsewhere (e.g. sm_80) the kernel body is a trap.
#define WG_BM 128
#define WG_BN 128
#define WG_BK 64
#define WG_STAGES 4
#define WG_THREADS 384
#define WG_A_STAGE_BYTES (WG_BM * WG_BK * 2)  // 16384
#define WG_B_CHUNK_BYTES (WG_BK * 64 * 2)     // 8192: one [64 k][64 n] chunk
#define WG_B_STAGE_BYTES (WG_BK * WG_BN * 2)  // 16384
// A stages, B stages, then 2 * STAGES mbarriers; + 1024 bytes to align the base to 1024.
#define WG_SMEM_BYTES (WG_STAGES * (WG_A_STAGE_BYTES + WG_B_STAGE_BYTES) + 2 * WG_STAGES * 8 + 1024)

// CUtensorMap (cuda.h): 128 opaque bytes, 64-byte aligned; encoded on the host.
struct __align__(64) WgTensorMap {
    unsigned long long opaque[16];
};

#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 900) && defined(__CUDA_ARCH_FEAT_SM90_ALL)

static __device__ __forceinline__ unsigned int wg_smem_u32(const void* p) {
    return (unsigned int)__cvta_generic_to_shared(p);
}

static __device__ __forceinline__ void wg_mbar_init(unsigned int bar, unsigned int count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}

static __device__ __forceinline__ void wg_mbar_arrive_expect_tx(unsigned int bar,
                                                                unsigned int bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar),
                 "r"(bytes)
                 : "memory");
}

static __device__ __forceinline__ void wg_mbar_arrive(unsigned int bar) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}

static __device__ __forceinline__ void wg_mbar_wait(unsigned int bar, unsigned int parity) {
    unsigned int done = 0;
    do {
        asm volatile(
            "{\n"
            ".reg .pred p;\n"
            "mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
            "selp.u32 %0, 1, 0, p;\n"
            "}\n"
            : "=r"(done)
            : "r"(bar), "r"(parity)
            : "memory");
    } while (!done);
}

// TMA tile loads (async proxy), completion counted in bytes on `bar`.
static __device__ __forceinline__ void wg_tma_load_2d(unsigned int dst, const WgTensorMap* map,
                                                      unsigned int bar, int c0, int c1) {
    asm volatile(
        "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes "
        "[%0], [%1, {%3, %4}], [%2];\n" ::"r"(dst),
        "l"((unsigned long long)map), "r"(bar), "r"(c0), "r"(c1)
        : "memory");
}

static __device__ __forceinline__ void wg_tma_load_3d(unsigned int dst, const WgTensorMap* map,
                                                      unsigned int bar, int c0, int c1, int c2) {
    asm volatile(
        "cp.async.bulk.tensor.3d.shared::cluster.global.tile.mbarrier::complete_tx::bytes "
        "[%0], [%1, {%3, %4, %5}], [%2];\n" ::"r"(dst),
        "l"((unsigned long long)map), "r"(bar), "r"(c0), "r"(c1), "r"(c2)
        : "memory");
}

// 16-byte cp.async, zero-filled when !valid (src-size 0; `src` must still be a valid address).
static __device__ __forceinline__ void wg_cp_async16(unsigned int dst, const void* src,
                                                     bool valid) {
    int src_size = valid ? 16 : 0;
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
                 "r"(src_size)
                 : "memory");
}

// wgmma shared-memory matrix descriptor: start address, leading / stride byte offsets (all
// >> 4), layout type 1 = 128-byte swizzle (bits 62-63), base offset 0 (tiles 1024-aligned).
static __device__ __forceinline__ unsigned long long wg_desc(unsigned int addr, unsigned int lbo,
                                                             unsigned int sbo) {
    unsigned long long d = 0;
    d |= (unsigned long long)((addr & 0x3FFFF) >> 4);
    d |= (unsigned long long)((lbo & 0x3FFFF) >> 4) << 16;
    d |= (unsigned long long)((sbo & 0x3FFFF) >> 4) << 32;
    d |= 1ull << 62;
    return d;
}

// Keeps the compiler from moving accumulator reads / writes across the asynchronous wgmma.
static __device__ __forceinline__ void wg_fence_acc(float (&d)[64]) {
#pragma unroll
    for (int i = 0; i < 64; ++i) asm volatile("" : "+f"(d[i])::"memory");
}

// D (64 x 128, f32) += A (64 x 16, K-major, descriptor) * B (16 x 128, MN-major, descriptor).
static __device__ __forceinline__ void wg_mma_m64n128k16(float (&d)[64], unsigned long long da,
                                                         unsigned long long db) {
    asm volatile(
        "{\n"
        ".reg .pred p;\n"
        "setp.ne.b32 p, %66, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, "
        "%8, %9, %10, %11, %12, %13, %14, %15, "
        "%16, %17, %18, %19, %20, %21, %22, %23, "
        "%24, %25, %26, %27, %28, %29, %30, %31, "
        "%32, %33, %34, %35, %36, %37, %38, %39, "
        "%40, %41, %42, %43, %44, %45, %46, %47, "
        "%48, %49, %50, %51, %52, %53, %54, %55, "
        "%56, %57, %58, %59, %60, %61, %62, %63}, "
        "%64, %65, p, 1, 1, 0, 1;\n"
        "}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]),
          "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]),
          "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]),
          "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]),
          "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]),
          "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]),
          "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]),
          "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]),
          "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]),
          "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]),
          "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
        : "l"(da), "l"(db), "r"(1)
        : "memory");
}

#endif  // sm_90a

// tmap_a: 2-D [rows][K] bf16 map (box 64 x 128, 128-byte swizzle), used when token_of_row is
// null; tmap_b: 3-D [E][K][Nout] map (box 64 x 64 x 1, 128-byte swizzle). `a` ([a_rows, K]) is
// read directly only when gathering; token indices >= a_rows read zeros. `rows` bounds the
// output rows (offsets[E] beyond it is clamped).
extern "C" __global__ void __launch_bounds__(WG_THREADS, 1)
    grouped_gemm_bf16_wgmma(const __grid_constant__ WgTensorMap tmap_a,
                            const __grid_constant__ WgTensorMap tmap_b,
                            const moe_bf16* __restrict__ a,
                            const unsigned int* __restrict__ token_of_row,
                            const unsigned int* __restrict__ offsets, int experts, int a_rows,
                            int rows, int kdim, int nout, float* __restrict__ c) {
#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 900) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
    int e, row0, row1;
    if (!gg_find_tile(offsets, experts, blockIdx.y, WG_BM, &e, &row0, &row1)) return;
    if (row1 > rows) row1 = rows;
    if (row0 >= row1) return;
    const int col0 = blockIdx.x * WG_BN;
    const bool gather = token_of_row != nullptr;
    const int nk = (kdim + WG_BK - 1) / WG_BK;

    extern __shared__ __align__(1024) unsigned char wg_smem_raw[];
    const unsigned int raw = wg_smem_u32(wg_smem_raw);
    const unsigned int base = (raw + 1023u) & ~1023u;
    const unsigned int sa = base;                                      // A stages
    const unsigned int sb = base + WG_STAGES * WG_A_STAGE_BYTES;       // B stages
    const unsigned int bars = sb + WG_STAGES * WG_B_STAGE_BYTES;       // full[], empty[]
#define WG_FULL(s) (bars + 8u * (unsigned int)(s))
#define WG_EMPTY(s) (bars + 8u * (unsigned int)(WG_STAGES + (s)))

    const int tid = threadIdx.x;
    if (tid == 0) {
        for (int s = 0; s < WG_STAGES; ++s) {
            wg_mbar_init(WG_FULL(s), gather ? 129u : 1u);
            wg_mbar_init(WG_EMPTY(s), 8u);
        }
        asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
        asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
    }
    __syncthreads();

    if (tid < 128) {
        // ---------------- producer warpgroup ----------------
        // The second 64-wide B chunk is skipped when it lies wholly beyond Nout: its stale
        // shared memory only feeds output columns >= Nout, which are never stored.
        const bool b_hi = col0 + 64 < nout;
        const unsigned int b_bytes = b_hi ? WG_B_STAGE_BYTES : WG_B_CHUNK_BYTES;
        if (!gather) {
            if (tid != 0) return;
            for (int kb = 0; kb < nk; ++kb) {
                const int s = kb % WG_STAGES;
                const int use = kb / WG_STAGES;
                if (use > 0) wg_mbar_wait(WG_EMPTY(s), (unsigned int)((use - 1) & 1));
                const int k0 = kb * WG_BK;
                wg_mbar_arrive_expect_tx(WG_FULL(s), WG_A_STAGE_BYTES + b_bytes);
                wg_tma_load_2d(sa + s * WG_A_STAGE_BYTES, &tmap_a, WG_FULL(s), k0, row0);
                wg_tma_load_3d(sb + s * WG_B_STAGE_BYTES, &tmap_b, WG_FULL(s), col0, k0, e);
                if (b_hi)
                    wg_tma_load_3d(sb + s * WG_B_STAGE_BYTES + WG_B_CHUNK_BYTES, &tmap_b,
                                   WG_FULL(s), col0 + 64, k0, e);
            }
            return;
        }
        // Gather: thread t copies 16-byte chunk (t % 8) of tile rows t / 8 + 16 i, i < 8.
        const int chunk = tid % 8;
        const moe_bf16* src_row[8];
#pragma unroll
        for (int i = 0; i < 8; ++i) {
            const int r = row0 + tid / 8 + 16 * i;
            src_row[i] = nullptr;
            if (r < row1) {
                const unsigned int t = token_of_row[r];
                if (t < (unsigned int)a_rows) src_row[i] = a + (long long)t * kdim;
            }
        }
        for (int kb = 0; kb < nk; ++kb) {
            const int s = kb % WG_STAGES;
            const int use = kb / WG_STAGES;
            if (use > 0) wg_mbar_wait(WG_EMPTY(s), (unsigned int)((use - 1) & 1));
            const int k0 = kb * WG_BK;
            if (tid == 0) {
                wg_mbar_arrive_expect_tx(WG_FULL(s), b_bytes);
                wg_tma_load_3d(sb + s * WG_B_STAGE_BYTES, &tmap_b, WG_FULL(s), col0, k0, e);
                if (b_hi)
                    wg_tma_load_3d(sb + s * WG_B_STAGE_BYTES + WG_B_CHUNK_BYTES, &tmap_b,
                                   WG_FULL(s), col0 + 64, k0, e);
            }
            const int kk = k0 + chunk * 8;
            const unsigned int stage = sa + s * WG_A_STAGE_BYTES;
#pragma unroll
            for (int i = 0; i < 8; ++i) {
                const int m = tid / 8 + 16 * i;
                const bool ok = src_row[i] != nullptr && kk < kdim;
                const moe_bf16* src = ok ? src_row[i] + kk : a;
                const unsigned int dst =
                    stage + (unsigned int)(m * 128 + ((chunk ^ (m & 7)) << 4));
                wg_cp_async16(dst, src, ok);
            }
            // Arrives on full[s] once this thread's copies above have landed.
            asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(
                             WG_FULL(s))
                         : "memory");
        }
        asm volatile("cp.async.wait_all;\n" ::: "memory");
        return;
    }

    // ---------------- consumer warpgroups ----------------
    const int wg = tid / 128 - 1;  // 0: tile rows 0..63, 1: rows 64..127
    const int t = tid % 128;
    const int lane = t % 32;
    const int warp = t / 32;
    float d[64];
#pragma unroll
    for (int i = 0; i < 64; ++i) d[i] = 0.0f;

    for (int kb = 0; kb < nk; ++kb) {
        const int s = kb % WG_STAGES;
        wg_mbar_wait(WG_FULL(s), (unsigned int)((kb / WG_STAGES) & 1));
        __syncwarp();  // converged again before the .aligned wgmma instructions
        // cp.async writes are generic-proxy writes; wgmma reads through the async proxy.
        if (gather) asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
        const unsigned int a_tile = sa + s * WG_A_STAGE_BYTES + wg * (64 * 128);
        const unsigned int b_tile = sb + s * WG_B_STAGE_BYTES;
        wg_fence_acc(d);
        asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#pragma unroll
        for (int ks = 0; ks < WG_BK / 16; ++ks) {
            const unsigned long long da = wg_desc(a_tile + ks * 32, 16, 1024);
            const unsigned long long db = wg_desc(b_tile + ks * 2048, WG_B_CHUNK_BYTES, 1024);
            wg_mma_m64n128k16(d, da, db);
        }
        asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
        // At most this k block's group in flight: the previous stage has been read.
        asm volatile("wgmma.wait_group.sync.aligned 1;\n" ::: "memory");
        wg_fence_acc(d);
        if (kb > 0 && lane == 0) wg_mbar_arrive(WG_EMPTY((kb - 1) % WG_STAGES));
    }
    asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
    wg_fence_acc(d);
#undef WG_FULL
#undef WG_EMPTY

    // Accumulator fragment of m64nNk16: register 4 j + q holds row warp * 16 + lane / 4
    // (+ 8 for q >= 2), column 8 j + 2 (lane % 4) + (q % 2).
    const int r_lo = row0 + wg * 64 + warp * 16 + lane / 4;
    const int r_hi = r_lo + 8;
#pragma unroll
    for (int j = 0; j < 16; ++j) {
        const int col = col0 + 8 * j + 2 * (lane % 4);
        if (col < nout) {  // nout % 8 == 0 and col is even, so col + 1 < nout too
            if (r_lo < row1)
                *reinterpret_cast<float2*>(c + (long long)r_lo * nout + col) =
                    make_float2(d[4 * j], d[4 * j + 1]);
            if (r_hi < row1)
                *reinterpret_cast<float2*>(c + (long long)r_hi * nout + col) =
                    make_float2(d[4 * j + 2], d[4 * j + 3]);
        }
    }
#else
    asm volatile("trap;\n");
#endif
}
