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

// The bf16 head for batches of tokens on the tensor cores (sm_80+). A bf16 × bf16 product is
// exact in f32, so the activations are first split into three bf16 planes whose sum is each
// value exactly (head_split: hi = bf16(x), mid = bf16(x - hi), lo = x - hi - mid, each
// difference exact in f32; values past bf16's range are not split exactly); W·x is then
// W·lo + W·mid + W·hi with every product exact and only the tensor cores' f32 accumulation
// rounding, the same order of error as the CPU's f32 sums and well inside LM_HEAD_RTOL. This
// makes the head compute-cheap enough that a batch reads the weights once: lm_head's warps
// re-read them per 8 tokens and are bound by their float work at 0.77 ms a pass.
extern "C" __global__ void head_split(const float* x, int first, int m, int cols, u16* planes) {
    pdl_enter();
    u64 n = (u64)m * cols, i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float v = x[(u64)first * cols + i];
    u16 hi = f32_to_bf16(v);
    float r = v - bf16_to_f32(hi);
    u16 mid = f32_to_bf16(r);
    planes[i] = hi;
    planes[n + i] = mid;
    planes[2 * n + i] = f32_to_bf16(r - bf16_to_f32(mid));
}

// A block of 4 warps (2 x 2) computes HM_BM vocabulary rows x HM_BN tokens, each warp 32 x 16
// with mma.m16n8k16 (bf16 x bf16 -> f32), K in stages of HM_KS columns through a ring of
// HM_STAGES shared buffers filled by cp.async (weights, and the three planes of the tokens).
// grid.x walks the token tiles so that the blocks sharing a weight tile run together and all
// but the first read it from L2. Rows are padded to 80 bytes so that fragment reads hit 32
// different banks. Needs cols a multiple of 8 (16-byte rows of weights and planes).
#define HM_BM 64
#define HM_BN 32
#define HM_KS 32
#define HM_STAGES 3
#define HM_STRIDE 40

__device__ __forceinline__ void mma_bf16(float* c, const u32* a, const u32* b) {
#if __CUDA_ARCH__ >= 800
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
}

extern "C" __global__ void __launch_bounds__(128) lm_head_mma(const u16* w, int rows, int cols, const u16* planes,
                                                              int m, float* out) {
    pdl_enter();
    __shared__ __align__(16) u16 as[HM_STAGES][HM_BM * HM_STRIDE];
    __shared__ __align__(16) u16 bs[HM_STAGES][3][HM_BN * HM_STRIDE];
    int tok0 = blockIdx.x * HM_BN, base = blockIdx.y * HM_BM;
    int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    int g = lane >> 2, tig = lane & 3;
    int wr = (warp >> 1) * 32, wt = (warp & 1) * 16;  // the warp's rows and tokens in the tile
    int stages = (cols + HM_KS - 1) / HM_KS;
    u64 plane = (u64)m * cols;
    auto load = [&](int st, int buf) {
        int c0 = st * HM_KS;
        for (int e = tid; e < HM_BM * 4; e += 128) {
            int r = e >> 2, c = c0 + 8 * (e & 3);
            bool full = base + r < rows && c < cols;
            cp_async16(&as[buf][r * HM_STRIDE + 8 * (e & 3)], full ? w + (u64)(base + r) * cols + c : w, full);
        }
        for (int e = tid; e < 3 * HM_BN * 4; e += 128) {
            int p = e / (HM_BN * 4), t = (e >> 2) % HM_BN, c = c0 + 8 * (e & 3);
            bool full = tok0 + t < m && c < cols;
            const u16* src = full ? planes + p * plane + (u64)(tok0 + t) * cols + c : planes;
            cp_async16(&bs[buf][p][t * HM_STRIDE + 8 * (e & 3)], src, full);
        }
    };
    float acc[2][2][4];
#pragma unroll
    for (int i = 0; i < 2; i++)
#pragma unroll
        for (int j = 0; j < 2; j++)
#pragma unroll
            for (int e = 0; e < 4; e++) acc[i][j][e] = 0.0f;
#pragma unroll
    for (int s = 0; s < HM_STAGES - 1; s++) {
        if (s < stages) load(s, s);
        cp_async_commit();
    }
    for (int st = 0; st < stages; st++) {
        cp_async_wait<HM_STAGES - 2>();
        __syncthreads();
        int next = st + HM_STAGES - 1;
        if (next < stages) load(next, next % HM_STAGES);
        cp_async_commit();
        const u16* a_st = as[st % HM_STAGES];
#pragma unroll
        for (int ks = 0; ks < HM_KS / 16; ks++) {
            // A: rows g and g + 8, columns 2 tig, 2 tig + 1 and 8 more; B: the same columns of
            // token g.
            u32 a[2][4];
#pragma unroll
            for (int i = 0; i < 2; i++) {
                const u16* ar = a_st + (wr + 16 * i + g) * HM_STRIDE + 16 * ks + 2 * tig;
                a[i][0] = *(const u32*)ar;
                a[i][1] = *(const u32*)(ar + 8 * HM_STRIDE);
                a[i][2] = *(const u32*)(ar + 8);
                a[i][3] = *(const u32*)(ar + 8 * HM_STRIDE + 8);
            }
            // The small planes first, so that they are added while the sums are small.
#pragma unroll
            for (int p = 2; p >= 0; p--) {
#pragma unroll
                for (int j = 0; j < 2; j++) {
                    const u16* br = bs[st % HM_STAGES][p] + (wt + 8 * j + g) * HM_STRIDE + 16 * ks + 2 * tig;
                    u32 b[2] = {*(const u32*)br, *(const u32*)(br + 8)};
#pragma unroll
                    for (int i = 0; i < 2; i++) mma_bf16(acc[i][j], a[i], b);
                }
            }
        }
    }
    cp_async_wait<0>();
    // c0, c1: row g, tokens 2 tig and 2 tig + 1; c2, c3: row g + 8.
#pragma unroll
    for (int i = 0; i < 2; i++)
#pragma unroll
        for (int j = 0; j < 2; j++)
#pragma unroll
            for (int e = 0; e < 4; e++) {
                int r = base + wr + 16 * i + g + 8 * (e >> 1);
                int tok = tok0 + wt + 8 * j + 2 * tig + (e & 1);
                if (r < rows && tok < m) out[(u64)tok * rows + r] = acc[i][j][e];
            }
}
