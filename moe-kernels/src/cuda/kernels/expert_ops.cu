// Element-wise GLU activations (forward and backward) and the backward of the permutation and
// of the combine. act: 0 = SwiGLU, 1 = GPT-OSS clamped GLU (limit, alpha), 2 = Step3.5 clamped
// SwiGLU (limit); the formulas of moe_kernels::activation::{glu_forward, glu_backward}. Clamps
// pass the gradient only inside their closed interval (torch.clamp).

// h[r, i] = act(a[r, i], a[r, I + i]).
extern "C" __global__ void glu_f32(const float* a, int rows, int inter, int act, float limit,
                                   float alpha, float* h) {
    long long n = (long long)rows * inter;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        long long r = i / inter;
        int c = (int)(i - r * inter);
        h[i] = glu_fwd(act, limit, alpha, a[r * 2 * inter + c], a[r * 2 * inter + inter + c]);
    }
}

// da[r, i], da[r, I + i] = d act / d(g, u) * dh[r, i].
extern "C" __global__ void glu_backward_f32(const float* a, const float* dh, int rows, int inter,
                                            int act, float limit, float alpha, float* da) {
    long long n = (long long)rows * inter;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        long long r = i / inter;
        int c = (int)(i - r * inter);
        float dg, du;
        glu_bwd(act, limit, alpha, a[r * 2 * inter + c], a[r * 2 * inter + inter + c], dh[i], &dg,
                &du);
        da[r * 2 * inter + c] = dg;
        da[r * 2 * inter + inter + c] = du;
    }
}

// dst[r, :] += bias[e, :] for the rows offsets[e]..offsets[e+1] (GPT-OSS expert biases).
extern "C" __global__ void add_row_bias_f32(float* dst, const float* bias,
                                            const unsigned int* offsets, int experts, int rows,
                                            int cols) {
    long long n = (long long)rows * cols;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        long long r = i / cols;
        int c = (int)(i - r * cols);
        int e = 0;
        while (e + 1 < experts && (unsigned int)r >= offsets[e + 1]) ++e;
        dst[i] += bias[(long long)e * cols + c];
    }
}

// Bias gradient: out[e, c] = sum over the rows of e (ascending) of g[r, c]; zero for an empty
// expert. One thread per (e, c).
extern "C" __global__ void grouped_row_sum_f32(const float* g, const unsigned int* offsets,
                                               int experts, int cols, float* out) {
    long long n = (long long)experts * cols;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        long long e = i / cols;
        int c = (int)(i - e * cols);
        float acc = 0.0f;
        for (unsigned int r = offsets[e]; r < offsets[e + 1]; ++r) acc += g[(long long)r * cols + c];
        out[i] = acc;
    }
}

// Permutation backward: grad_x[t, c] = sum_{j ascending} grad_xp[row_of_slot[t, j], c].
extern "C" __global__ void permute_backward_f32(const float* grad_xp,
                                                const unsigned int* row_of_slot, int tokens,
                                                int k, int hidden, float* grad_x) {
    long long n = (long long)tokens * hidden;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        long long t = i / hidden;
        int c = (int)(i - t * hidden);
        float acc = 0.0f;
        for (int j = 0; j < k; ++j) acc += grad_xp[(long long)row_of_slot[t * k + j] * hidden + c];
        grad_x[i] = acc;
    }
}

// Combine backward, grad_y: grad_y[r, c] = w[s] grad_out[s / k, c], s = slot_of_row[r].
extern "C" __global__ void combine_backward_y_f32(const float* w, const float* grad_out,
                                                  const unsigned int* slot_of_row, int rows,
                                                  int k, int hidden, float* grad_y) {
    long long n = (long long)rows * hidden;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        long long r = i / hidden;
        int c = (int)(i - r * hidden);
        unsigned int s = slot_of_row[r];
        grad_y[i] = w[s] * grad_out[(long long)(s / k) * hidden + c];
    }
}

// Combine backward, weights: grad_w[t, j] = <grad_out[t], y[row_of_slot[t, j]]>, one warp per
// slot, lane-strided partial sums then a fixed xor-tree: deterministic.
extern "C" __global__ void combine_backward_w_f32(const float* y, const float* grad_out,
                                                  const unsigned int* row_of_slot, int tokens,
                                                  int k, int hidden, float* grad_w) {
    long long slot = (blockIdx.x * (long long)blockDim.x + threadIdx.x) / 32;
    int lane = threadIdx.x % 32;
    if (slot >= (long long)tokens * k) return;
    const float* yr = y + (long long)row_of_slot[slot] * hidden;
    const float* go = grad_out + (slot / k) * hidden;
    float acc = 0.0f;
    for (int c = lane; c < hidden; c += 32) acc += go[c] * yr[c];
    for (int off = 16; off > 0; off /= 2) acc += __shfl_xor_sync(0xffffffffu, acc, off);
    if (lane == 0) grad_w[slot] = acc;
}
