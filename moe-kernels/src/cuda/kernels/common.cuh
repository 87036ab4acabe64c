// Shared helpers, prepended to every kernel source by the Rust side (NVRTC alone, no CUDA
// headers: bf16 is carried as its raw 16 bits).
typedef unsigned short moe_bf16;

__device__ __forceinline__ float moe_bf16_to_f32(moe_bf16 v) {
    return __uint_as_float(((unsigned int)v) << 16);
}

__device__ __forceinline__ float moe_load_f32(const float* p) { return *p; }
__device__ __forceinline__ float moe_load_f32(const moe_bf16* p) { return moe_bf16_to_f32(*p); }

// Grouped-GEMM tile schedule: tile `tile` of the row tiles (tm rows each) enumerated expert by
// expert; false for a spare tile. Tiles never straddle two experts.
__device__ __forceinline__ bool gg_find_tile(const unsigned int* offsets, int experts, int tile,
                                             int tm, int* expert, int* row0, int* row1) {
    for (int e = 0; e < experts; ++e) {
        int start = (int)offsets[e];
        int count = (int)offsets[e + 1] - start;
        int tiles = (count + tm - 1) / tm;
        if (tile < tiles) {
            *expert = e;
            *row0 = start + tile * tm;
            *row1 = start + count;
            return true;
        }
        tile -= tiles;
    }
    return false;
}
