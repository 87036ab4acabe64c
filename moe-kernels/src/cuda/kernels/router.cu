// Softmax top-k router (Qwen3-MoE / Mixtral): one thread per token.
// probs[t, e] = softmax(logits[t, :])[e] (max subtracted, sequential sum, then divide: the CPU
// order); top-k by repeated selection, strictly greater wins, so ties go to the lowest expert
// index (the CPU's stable descending sort); optional renormalisation by the sum of the k
// selected probabilities (summed j = 0..k-1).
template <typename T>
__device__ void softmax_topk_impl(const T* __restrict__ logits, int tokens, int experts, int k,
                                  int renorm, float* __restrict__ probs,
                                  unsigned int* __restrict__ topk_index,
                                  float* __restrict__ topk_weights) {
    int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= tokens) return;
    const T* z = logits + (long long)t * experts;
    float* p = probs + (long long)t * experts;
    float mx = -__int_as_float(0x7f800000);
    for (int e = 0; e < experts; ++e) mx = fmaxf(mx, moe_load_f32(z + e));
    float sum = 0.0f;
    for (int e = 0; e < experts; ++e) {
        float v = expf(moe_load_f32(z + e) - mx);
        p[e] = v;
        sum += v;
    }
    for (int e = 0; e < experts; ++e) p[e] = p[e] / sum;
    float last_p = 0.0f;
    int last_e = -1;
    float wsum = 0.0f;
    for (int j = 0; j < k; ++j) {
        int best = -1;
        float bp = 0.0f;
        for (int e = 0; e < experts; ++e) {
            float v = p[e];
            bool after_last = last_e < 0 || v < last_p || (v == last_p && e > last_e);
            if (after_last && (best < 0 || v > bp)) {
                best = e;
                bp = v;
            }
        }
        topk_index[(long long)t * k + j] = (unsigned int)best;
        topk_weights[(long long)t * k + j] = bp;
        wsum += bp;
        last_p = bp;
        last_e = best;
    }
    if (renorm) {
        for (int j = 0; j < k; ++j) topk_weights[(long long)t * k + j] /= wsum;
    }
}

extern "C" __global__ void softmax_topk_f32(const float* logits, int tokens, int experts, int k,
                                            int renorm, float* probs, unsigned int* topk_index,
                                            float* topk_weights) {
    softmax_topk_impl(logits, tokens, experts, k, renorm, probs, topk_index, topk_weights);
}

extern "C" __global__ void softmax_topk_bf16(const moe_bf16* logits, int tokens, int experts,
                                             int k, int renorm, float* probs,
                                             unsigned int* topk_index, float* topk_weights) {
    softmax_topk_impl(logits, tokens, experts, k, renorm, probs, topk_index, topk_weights);
}
