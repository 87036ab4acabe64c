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

// Next entry of a descending top-k by repeated selection over score(e), e < n: the largest
// value after (last_v, last_e) in the order (value descending, index ascending); ties go to the
// lowest index (the CPU's stable sort). -inf entries are still ordered by index.
template <typename F>
__device__ int select_next(F score, int n, float last_v, int last_e, float* out_v) {
    int best = -1;
    float bv = 0.0f;
    for (int e = 0; e < n; ++e) {
        float v = score(e);
        bool after = last_e < 0 || v < last_v || (v == last_v && e > last_e);
        if (after && (best < 0 || v > bv)) {
            best = e;
            bv = v;
        }
    }
    *out_v = bv;
    return best;
}

// Top-k then softmax (GPT-OSS): z = logits (+ bias[e] when has_bias, the router's linear bias),
// top-k on z, weights = softmax over the k selected logits (max subtracted, sequential sum),
// probs[t, e] = the weight of e when selected, else 0. One thread per token.
extern "C" __global__ void topk_softmax_f32(const float* __restrict__ logits,
                                            const float* __restrict__ bias, int has_bias,
                                            int tokens, int experts, int k,
                                            float* __restrict__ probs,
                                            unsigned int* __restrict__ topk_index,
                                            float* __restrict__ topk_weights) {
    int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= tokens) return;
    const float* z = logits + (long long)t * experts;
    float* p = probs + (long long)t * experts;
    unsigned int* idx = topk_index + (long long)t * k;
    float* w = topk_weights + (long long)t * k;
    auto score = [&](int e) { return has_bias ? z[e] + bias[e] : z[e]; };
    float last_v = 0.0f;
    int last_e = -1;
    for (int j = 0; j < k; ++j) {
        float v;
        int e = select_next(score, experts, last_v, last_e, &v);
        idx[j] = (unsigned int)e;
        w[j] = v;
        last_v = v;
        last_e = e;
    }
    float mx = -__int_as_float(0x7f800000);
    for (int j = 0; j < k; ++j) mx = fmaxf(mx, w[j]);
    float sum = 0.0f;
    for (int j = 0; j < k; ++j) {
        w[j] = expf(w[j] - mx);
        sum += w[j];
    }
    for (int e = 0; e < experts; ++e) p[e] = 0.0f;
    for (int j = 0; j < k; ++j) {
        w[j] = w[j] / sum;
        p[idx[j]] = w[j];
    }
}

// Sigmoid routers (DeepSeek-V3 / GLM4 group-limited, Step3.5 plain): s = sigmoid(z) -> probs;
// selection on s + corr[e] (corr = e_score_correction_bias when has_corr, selection only);
// with n_group > 1 only the topk_group groups with the largest sum of their two best biased
// scores are eligible (the others become -inf); weights = s[idx], divided by
// (sum_j s[idx_j] + eps) when renorm, times scale. eps: 1e-20 (DeepSeek) or 0 (Step3.5).
// n_group <= 64 and divides E (checked by the caller). One thread per token.
extern "C" __global__ void sigmoid_topk_f32(const float* __restrict__ logits,
                                            const float* __restrict__ corr, int has_corr,
                                            int tokens, int experts, int k, int n_group,
                                            int topk_group, int renorm, float eps, float scale,
                                            float* __restrict__ probs,
                                            unsigned int* __restrict__ topk_index,
                                            float* __restrict__ topk_weights) {
    int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= tokens) return;
    const float* z = logits + (long long)t * experts;
    float* s = probs + (long long)t * experts;
    unsigned int* idx = topk_index + (long long)t * k;
    float* w = topk_weights + (long long)t * k;
    for (int e = 0; e < experts; ++e) s[e] = 1.0f / (1.0f + expf(-z[e]));
    auto biased = [&](int e) { return has_corr ? s[e] + corr[e] : s[e]; };
    unsigned long long kept = ~0ull;
    if (n_group > 1) {
        int size = experts / n_group;
        float gscore[64];
        for (int g = 0; g < n_group; ++g) {
            auto in_group = [&](int i) { return biased(g * size + i); };
            float v0, v1;
            int i0 = select_next(in_group, size, 0.0f, -1, &v0);
            float sum = v0;
            if (size > 1) {
                select_next(in_group, size, v0, i0, &v1);
                sum = v0 + v1;
            }
            gscore[g] = sum;
        }
        auto group_score = [&](int g) { return gscore[g]; };
        kept = 0ull;
        float last_v = 0.0f;
        int last_g = -1;
        for (int q = 0; q < topk_group; ++q) {
            float v;
            int g = select_next(group_score, n_group, last_v, last_g, &v);
            kept |= 1ull << g;
            last_v = v;
            last_g = g;
        }
        int sz = size;
        auto masked = [&](int e) {
            return ((kept >> (e / sz)) & 1ull) ? biased(e) : -__int_as_float(0x7f800000);
        };
        float last = 0.0f;
        int last_e = -1;
        for (int j = 0; j < k; ++j) {
            float v;
            int e = select_next(masked, experts, last, last_e, &v);
            idx[j] = (unsigned int)e;
            last = v;
            last_e = e;
        }
    } else {
        float last = 0.0f;
        int last_e = -1;
        for (int j = 0; j < k; ++j) {
            float v;
            int e = select_next(biased, experts, last, last_e, &v);
            idx[j] = (unsigned int)e;
            last = v;
            last_e = e;
        }
    }
    float sum = 0.0f;
    for (int j = 0; j < k; ++j) {
        w[j] = s[idx[j]];
        sum += w[j];
    }
    float denom = sum + eps;
    for (int j = 0; j < k; ++j) {
        float v = renorm ? w[j] / denom : w[j];
        w[j] = v * scale;
    }
}

// Router backward: dz [T, E] = dL/dlogits from dw [T, k] = dL/dtop_k_weights, the formulas of
// moe_kernels::routing::route_backward (the selection has no gradient). kind 0: softmax then
// top-k (renorm: w = p[idx] / sum p[idx]), dz_e = p_e (dp_e - <dp, p>); kind 1: top-k then
// softmax, dz[idx_j] = w_j (dw_j - <dw, w>); kind 2: sigmoid (probs = s), renorm by
// sum s[idx] + eps, times `scale`, dz[idx_j] = ds_j s (1 - s). Unselected experts of kinds 1
// and 2 get 0. Sums run in the CPU's order (j ascending, e ascending). One thread per token.
extern "C" __global__ void route_backward_f32(const float* __restrict__ probs,
                                              const unsigned int* __restrict__ topk_index,
                                              const float* __restrict__ topk_weights,
                                              const float* __restrict__ grad_weights, int tokens,
                                              int experts, int k, int kind, int renorm, float eps,
                                              float scale, float* __restrict__ dz) {
    int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= tokens) return;
    const float* p = probs + (long long)t * experts;
    const unsigned int* idx = topk_index + (long long)t * k;
    const float* w = topk_weights + (long long)t * k;
    const float* dw = grad_weights + (long long)t * k;
    float* d = dz + (long long)t * experts;
    for (int e = 0; e < experts; ++e) d[e] = 0.0f;
    float dw_dot_w = 0.0f;
    for (int j = 0; j < k; ++j) dw_dot_w += dw[j] * w[j];
    if (kind == 0) {
        float sum_sel = 0.0f;
        for (int j = 0; j < k; ++j) sum_sel += p[idx[j]];
        // dp_e on the selected experts (ids are distinct), 0 elsewhere.
        float dp_dot_p = 0.0f;
        for (int e = 0; e < experts; ++e) {
            float dp = 0.0f;
            for (int j = 0; j < k; ++j)
                if ((int)idx[j] == e) dp = renorm ? (dw[j] - dw_dot_w) / sum_sel : dw[j];
            dp_dot_p += dp * p[e];
        }
        for (int e = 0; e < experts; ++e) {
            float dp = 0.0f;
            for (int j = 0; j < k; ++j)
                if ((int)idx[j] == e) dp = renorm ? (dw[j] - dw_dot_w) / sum_sel : dw[j];
            d[e] = p[e] * (dp - dp_dot_p);
        }
    } else if (kind == 1) {
        for (int j = 0; j < k; ++j) d[idx[j]] = w[j] * (dw[j] - dw_dot_w);
    } else {
        if (renorm) {
            // r (dw_j - <dw, s / D>) / D: no cancellation of two rounded terms (routing.rs).
            float denom = 0.0f, dw_dot_sn = 0.0f;
            for (int j = 0; j < k; ++j) denom += p[idx[j]];
            denom += eps;
            for (int j = 0; j < k; ++j) dw_dot_sn += dw[j] * (p[idx[j]] / denom);
            for (int j = 0; j < k; ++j) {
                float s = p[idx[j]];
                float ds = scale * ((dw[j] - dw_dot_sn) / denom);
                d[idx[j]] = ds * s * (1.0f - s);
            }
        } else {
            for (int j = 0; j < k; ++j) {
                float s = p[idx[j]];
                d[idx[j]] = scale * dw[j] * s * (1.0f - s);
            }
        }
    }
}
