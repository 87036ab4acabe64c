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

// f32 -> bf16 bits, round to nearest even (NaN stays a quiet NaN), as torch's `.to(bfloat16)`.
__device__ __forceinline__ moe_bf16 moe_f32_to_bf16(float f) {
    unsigned int u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (moe_bf16)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (moe_bf16)(u >> 16);
}

// GLU activations (act: 0 = SwiGLU, 1 = GPT-OSS clamped GLU (limit, alpha), 2 = Step3.5 clamped
// SwiGLU (limit)): the formulas of moe_kernels::activation::{glu_forward, glu_backward}. Clamps
// pass the gradient only inside their closed interval (torch.clamp).
__device__ __forceinline__ float moe_sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }

__device__ __forceinline__ float moe_silu_grad(float x) {
    float s = moe_sigmoid(x);
    return s * (1.0f + x * (1.0f - s));
}

__device__ __forceinline__ float glu_fwd(int act, float limit, float alpha, float g, float u) {
    if (act == 1) {
        float gc = fminf(g, limit);
        float uc = fminf(fmaxf(u, -limit), limit);
        return (uc + 1.0f) * gc * moe_sigmoid(alpha * gc);
    }
    if (act == 2) {
        float uc = fminf(fmaxf(u, -limit), limit);
        return fminf(g * moe_sigmoid(g), limit) * uc;
    }
    return g * moe_sigmoid(g) * u;
}

__device__ __forceinline__ void glu_bwd(int act, float limit, float alpha, float g, float u,
                                        float dh, float* dg, float* du) {
    if (act == 1) {
        float gc = fminf(g, limit);
        float g_pass = g <= limit ? 1.0f : 0.0f;
        float uc = fminf(fmaxf(u, -limit), limit);
        float u_pass = (u >= -limit && u <= limit) ? 1.0f : 0.0f;
        float sg = moe_sigmoid(alpha * gc);
        float glu = gc * sg;
        float dglu = sg + alpha * gc * sg * (1.0f - sg);
        *dg = dh * (uc + 1.0f) * dglu * g_pass;
        *du = dh * glu * u_pass;
    } else if (act == 2) {
        float silu = g * moe_sigmoid(g);
        float sc = fminf(silu, limit);
        float s_pass = silu <= limit ? 1.0f : 0.0f;
        float uc = fminf(fmaxf(u, -limit), limit);
        float u_pass = (u >= -limit && u <= limit) ? 1.0f : 0.0f;
        *dg = dh * uc * s_pass * moe_silu_grad(g);
        *du = dh * sc * u_pass;
    } else {
        *dg = dh * u * moe_silu_grad(g);
        *du = dh * g * moe_sigmoid(g);
    }
}

