// Shared helpers, prepended to every kernel source by the Rust side (NVRTC alone, no CUDA
// headers: bf16 is carried as its raw 16 bits).
typedef unsigned short moe_bf16;

__device__ __forceinline__ float moe_bf16_to_f32(moe_bf16 v) {
    return __uint_as_float(((unsigned int)v) << 16);
}

__device__ __forceinline__ float moe_load_f32(const float* p) { return *p; }
__device__ __forceinline__ float moe_load_f32(const moe_bf16* p) { return moe_bf16_to_f32(*p); }
