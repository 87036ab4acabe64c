// SwiGLU on the packed gate/up rows: h[r, i] = g sigmoid(g) u, g = a[r, i], u = a[r, I + i].
extern "C" __global__ void swiglu_f32(const float* a, int rows, int inter, float* h) {
    long long n = (long long)rows * inter;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        long long r = i / inter;
        int c = (int)(i - r * inter);
        float g = a[r * 2 * inter + c];
        float u = a[r * 2 * inter + inter + c];
        h[i] = g * (1.0f / (1.0f + expf(-g))) * u;
    }
}

// Combine: out[t, c] = sum_{j = 0..k-1} w[t, j] y[row_of_slot[t, j], c], j ascending (a
// deterministic gather-sum, no atomics).
extern "C" __global__ void combine_f32(const float* y, const float* w,
                                       const unsigned int* row_of_slot, int tokens, int k,
                                       int hidden, float* out) {
    long long n = (long long)tokens * hidden;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        long long t = i / hidden;
        int c = (int)(i - t * hidden);
        float acc = 0.0f;
        for (int j = 0; j < k; ++j) {
            acc += w[t * k + j] * y[(long long)row_of_slot[t * k + j] * hidden + c];
        }
        out[i] = acc;
    }
}

// dst[i] += src[i], n elements.
extern "C" __global__ void add_inplace_f32(float* dst, const float* src, long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x)
        dst[i] += src[i];
}
