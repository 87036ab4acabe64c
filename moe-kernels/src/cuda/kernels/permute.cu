// Per-expert counts, exclusive scan and stable scatter of the routing slots (slot s = t k + j),
// deterministic (no order-dependent atomics on the result): the permutation of
// moe_kernels::Permutation. Slots are processed in chunks of PERM_CHUNK = blockDim.x (one block
// per chunk); a slot's rank inside its chunk is the number of earlier slots of the chunk with
// the same expert.
#define PERM_CHUNK 256

__device__ __forceinline__ int chunk_rank(const unsigned int* ids, int i, unsigned int e) {
    int r = 0;
    for (int q = 0; q < i; ++q) r += (ids[q] == e) ? 1 : 0;
    return r;
}

// hist[b, e] = number of slots of chunk b routed to expert e; bad[0] = min slot with an
// expert id >= experts (stays at num_slots when all are valid).
extern "C" __global__ void permute_hist(const unsigned int* topk_index, int num_slots,
                                        int experts, unsigned int* hist, int* bad) {
    __shared__ unsigned int ids[PERM_CHUNK];
    int b = blockIdx.x;
    int i = threadIdx.x;
    int s = b * PERM_CHUNK + i;
    unsigned int e = s < num_slots ? topk_index[s] : 0xffffffffu;
    ids[i] = e;
    __syncthreads();
    if (s < num_slots && e >= (unsigned int)experts) atomicMin(bad, s);
    if (s < num_slots && e < (unsigned int)experts) {
        // The last slot of each expert in the chunk writes the count (rank + 1).
        bool last = true;
        for (int q = i + 1; q < PERM_CHUNK; ++q) {
            if (ids[q] == e) { last = false; break; }
        }
        if (last) hist[(long long)b * experts + e] = (unsigned int)(chunk_rank(ids, i, e) + 1);
    }
}

// One block: counts[e] = sum_b hist[b, e]; offsets = exclusive scan (length experts + 1);
// hist[b, e] becomes the first row of chunk b's slots of expert e.
extern "C" __global__ void permute_scan(unsigned int* hist, int chunks, int experts,
                                        unsigned int* counts, unsigned int* offsets) {
    for (int e = threadIdx.x; e < experts; e += blockDim.x) {
        unsigned int acc = 0;
        for (int b = 0; b < chunks; ++b) {
            unsigned int c = hist[(long long)b * experts + e];
            hist[(long long)b * experts + e] = acc;
            acc += c;
        }
        counts[e] = acc;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        unsigned int acc = 0;
        for (int e = 0; e < experts; ++e) {
            offsets[e] = acc;
            acc += counts[e];
        }
        offsets[experts] = acc;
    }
    __syncthreads();
    for (int e = threadIdx.x; e < experts; e += blockDim.x) {
        unsigned int base = offsets[e];
        for (int b = 0; b < chunks; ++b) hist[(long long)b * experts + e] += base;
    }
}

// row = base[chunk, e] + rank in chunk; row_of_slot[s] = row, slot_of_row[row] = s,
// token_of_row[row] = s / k.
extern "C" __global__ void permute_scatter(const unsigned int* topk_index, int num_slots,
                                           int experts, int k, const unsigned int* base,
                                           unsigned int* row_of_slot, unsigned int* slot_of_row,
                                           unsigned int* token_of_row) {
    __shared__ unsigned int ids[PERM_CHUNK];
    int b = blockIdx.x;
    int i = threadIdx.x;
    int s = b * PERM_CHUNK + i;
    unsigned int e = s < num_slots ? topk_index[s] : 0xffffffffu;
    ids[i] = e;
    __syncthreads();
    if (s >= num_slots || e >= (unsigned int)experts) return;
    unsigned int row = base[(long long)b * experts + e] + (unsigned int)chunk_rank(ids, i, e);
    row_of_slot[s] = row;
    slot_of_row[row] = (unsigned int)s;
    token_of_row[row] = (unsigned int)(s / k);
}

// xp[r, :] = x[token_of_row[r], :] (dispatch gather), f32 and bf16 -> f32.
template <typename T>
__device__ void gather_rows_impl(const T* x, int hidden, const unsigned int* token_of_row,
                                 int rows, float* xp) {
    long long n = (long long)rows * hidden;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        long long r = i / hidden;
        int c = (int)(i - r * hidden);
        xp[i] = moe_load_f32(x + (long long)token_of_row[r] * hidden + c);
    }
}

extern "C" __global__ void gather_rows_f32(const float* x, int hidden,
                                           const unsigned int* token_of_row, int rows,
                                           float* xp) {
    gather_rows_impl(x, hidden, token_of_row, rows, xp);
}

extern "C" __global__ void gather_rows_bf16(const moe_bf16* x, int hidden,
                                            const unsigned int* token_of_row, int rows,
                                            float* xp) {
    gather_rows_impl(x, hidden, token_of_row, rows, xp);
}

// xp[r, :] = x[token_of_row[r], :] on bf16 bits (the dW GEMM's A operand).
extern "C" __global__ void gather_rows_b16(const moe_bf16* x, int hidden,
                                           const unsigned int* token_of_row, int rows,
                                           moe_bf16* xp) {
    long long n = (long long)rows * hidden;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        long long r = i / hidden;
        int c = (int)(i - r * hidden);
        xp[i] = x[(long long)token_of_row[r] * hidden + c];
    }
}
