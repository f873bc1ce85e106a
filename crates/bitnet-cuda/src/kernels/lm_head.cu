// The float lm_head (DenseMatrix::matmul): out[t, r] = sum_c W[r, c] * x[first + t, c] with
// W in f32, bf16 or f16, widened exactly. One warp per vocabulary row, 8 tokens per grid.y
// step; each lane sums its columns in order, then the warp adds the lanes in a tree.

#define HEAD_TOKENS 8
#define HEAD_WARPS 8

__device__ __forceinline__ void widen8(uint4 v, int dtype, float* w) {
    u32 words[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int i = 0; i < 4; i++) {
        u16 lo = (u16)(words[i] & 0xffffu), hi = (u16)(words[i] >> 16);
        w[2 * i] = dtype == DT_BF16 ? bf16_to_f32(lo) : f16_to_f32(lo);
        w[2 * i + 1] = dtype == DT_BF16 ? bf16_to_f32(hi) : f16_to_f32(hi);
    }
}

extern "C" __global__ void __launch_bounds__(256) lm_head(const void* weights, int dtype, int rows, int cols,
                                                          const float* x, int first, int m, float* out) {
    pdl_enter();
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    int r = blockIdx.x * HEAD_WARPS + warp;
    if (r >= rows) return;
    int t0 = blockIdx.y * HEAD_TOKENS;
    int tn = min(HEAD_TOKENS, m - t0);
    const float* xs = x + (u64)(first + t0) * cols;
    float acc[HEAD_TOKENS];
#pragma unroll
    for (int t = 0; t < HEAD_TOKENS; t++) acc[t] = 0.0f;
    u64 row = (u64)r * cols;
    // Vectors of 8 weights where the row is 16-byte aligned; single elements otherwise.
    bool vec = dtype != DT_F32 && (cols % 8) == 0;
    if (vec) {
        const uint4* wr = (const uint4*)((const u16*)weights + row);
        for (int j = lane; j < cols / 8; j += 32) {
            float w[8];
            widen8(__ldg(wr + j), dtype, w);
#pragma unroll
            for (int t = 0; t < HEAD_TOKENS; t++) {
                if (t < tn) {
                    const float4* xv = (const float4*)(xs + (u64)t * cols + 8 * j);
                    float4 a = xv[0], b = xv[1];
                    float s = acc[t];
                    s = s + w[0] * a.x; s = s + w[1] * a.y; s = s + w[2] * a.z; s = s + w[3] * a.w;
                    s = s + w[4] * b.x; s = s + w[5] * b.y; s = s + w[6] * b.z; s = s + w[7] * b.w;
                    acc[t] = s;
                }
            }
        }
    } else {
        for (int c = lane; c < cols; c += 32) {
            float w = load_elem(weights, dtype, row + c);
#pragma unroll
            for (int t = 0; t < HEAD_TOKENS; t++)
                if (t < tn) acc[t] = acc[t] + w * xs[(u64)t * cols + c];
        }
    }
#pragma unroll
    for (int t = 0; t < HEAD_TOKENS; t++) {
        if (t < tn) {
            float s = warp_sum_f(acc[t]);
            if (lane == 0) out[(u64)(t0 + t) * rows + r] = s;
        }
    }
}
