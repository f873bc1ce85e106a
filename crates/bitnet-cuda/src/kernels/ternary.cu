// Ternary W2A8 products with dp4a: TernaryMatrix::forward's integer sums, exactly.
//
// Weight layout (packed on the host by bitnet_cuda::layout): each row is `kw` u32 words of 16
// columns, `kw` a multiple of 4 so that a row is whole 16-byte vectors of 64 columns. In word
// w, byte i holds in bits 2s..2s+1 the code u = t + 1 of column 16w + 4s + i, so
// `(word >> 2s) & 0x03030303` is the four codes of columns 16w + 4s .. 16w + 4s + 3 in byte
// order: one dp4a against the int32 of those four int8 activations. Padding codes are 1 (t = 0).
// The codes are unsigned, so each dot product gives sum(u*x) and the row's activation sum is
// subtracted once: sum(t*x) = sum(u*x) - sum(x).
//
// Activations: int8 rows of `stride` bytes (a multiple of 64, zero padded), a scale and a code
// sum per token.

#define GEMV_TOKENS 8
#define GEMV_WARPS 8

__device__ __forceinline__ int dot_word(u32 w, int4 x, int acc) {
    acc = __dp4a((int)(w & 0x03030303u), x.x, acc);
    acc = __dp4a((int)((w >> 2) & 0x03030303u), x.y, acc);
    acc = __dp4a((int)((w >> 4) & 0x03030303u), x.z, acc);
    acc = __dp4a((int)((w >> 6) & 0x03030303u), x.w, acc);
    return acc;
}

// Up to three matrices of the same width read the same activations (q, k, v; gate, up):
// their rows are numbered one after another, matrix i owning rows start_i..start_{i+1}.
struct Selected {
    const uint4* w;
    float* out;
    int rows, mode;
    float scale;
    int r;
};

__device__ __forceinline__ Selected select(int gr, const uint4* w0, const uint4* w1, const uint4* w2, float* o0,
                                           float* o1, float* o2, int r0, int r1, int r2, int m0, int m1, int m2,
                                           float s0, float s1, float s2) {
    Selected s;
    if (gr < r0) {
        s.w = w0; s.out = o0; s.rows = r0; s.mode = m0; s.scale = s0; s.r = gr;
    } else if (gr < r0 + r1) {
        s.w = w1; s.out = o1; s.rows = r1; s.mode = m1; s.scale = s1; s.r = gr - r0;
    } else {
        s.w = w2; s.out = o2; s.rows = r2; s.mode = m2; s.scale = s2; s.r = gr - r0 - r1;
    }
    return s;
}

#define MATS_PARAMS                                                                                             \
    const uint4 *w0, const uint4 *w1, const uint4 *w2, float *o0, float *o1, float *o2, int r0, int r1, int r2, \
        int m0, int m1, int m2, float s0, float s1, float s2
#define MATS_ARGS w0, w1, w2, o0, o1, o2, r0, r1, r2, m0, m1, m2, s0, s1, s2

// Decode-sized batches: one warp per weight row, tokens t0..t0+8 of the batch (grid.y picks
// the group of 8). Each 16-byte weight vector is read once for all those tokens.
extern "C" __global__ void __launch_bounds__(256) ternary_gemv(MATS_PARAMS, const int4* x, int xvec, const float* s_a,
                                                               const int* sums, int m, int wvec) {
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    int gr = blockIdx.x * GEMV_WARPS + warp;
    if (gr >= r0 + r1 + r2) return;
    Selected s = select(gr, MATS_ARGS);
    int t0 = blockIdx.y * GEMV_TOKENS;
    int tn = min(GEMV_TOKENS, m - t0);
    const uint4* wrow = s.w + (u64)s.r * wvec;
    int acc[GEMV_TOKENS];
#pragma unroll
    for (int t = 0; t < GEMV_TOKENS; t++) acc[t] = 0;
    for (int j = lane; j < wvec; j += 32) {
        uint4 w = __ldg(wrow + j);
#pragma unroll
        for (int t = 0; t < GEMV_TOKENS; t++) {
            if (t < tn) {
                const int4* xr = x + (u64)(t0 + t) * xvec + 4 * j;
                int a = acc[t];
                a = dot_word(w.x, __ldg(xr), a);
                a = dot_word(w.y, __ldg(xr + 1), a);
                a = dot_word(w.z, __ldg(xr + 2), a);
                a = dot_word(w.w, __ldg(xr + 3), a);
                acc[t] = a;
            }
        }
    }
#pragma unroll
    for (int t = 0; t < GEMV_TOKENS; t++) {
        if (t < tn) {
            int a = warp_sum_i(acc[t]);
            if (lane == 0) {
                int tok = t0 + t;
                s.out[(u64)tok * s.rows + s.r] = apply_scale(s.mode, s.scale, (float)(a - sums[tok]), s_a[tok]);
            }
        }
    }
}

// Prefill-sized batches: a block of 256 threads computes 64 rows x 64 tokens, each thread a
// 4 x 4 patch, stepping through K 64 columns (one weight vector per row) at a time through
// shared memory laid out [word][row] and [word][token], so that a thread's four rows or
// four tokens are one 16-byte read. grid.x walks the row tiles of the (up to three)
// matrices, grid.y the token tiles.
#define TILE 64
extern "C" __global__ void __launch_bounds__(256) ternary_gemm(MATS_PARAMS, const int4* x, int xvec, const float* s_a,
                                                               const int* sums, int m, int wvec) {
    __shared__ __align__(16) u32 ws[4][TILE];
    __shared__ __align__(16) int xs[16][TILE];
    int tiles0 = (r0 + TILE - 1) / TILE, tiles1 = (r1 + TILE - 1) / TILE;
    int tile = blockIdx.x, base;
    const uint4* w;
    float* out;
    int rows, mode;
    float scale;
    if (tile < tiles0) {
        w = w0; out = o0; rows = r0; mode = m0; scale = s0; base = tile * TILE;
    } else if (tile < tiles0 + tiles1) {
        w = w1; out = o1; rows = r1; mode = m1; scale = s1; base = (tile - tiles0) * TILE;
    } else {
        w = w2; out = o2; rows = r2; mode = m2; scale = s2; base = (tile - tiles0 - tiles1) * TILE;
    }
    int tok0 = blockIdx.y * TILE;
    int tid = threadIdx.x, ty = tid >> 4, tx = tid & 15;
    int acc[4][4];
#pragma unroll
    for (int i = 0; i < 4; i++)
#pragma unroll
        for (int j = 0; j < 4; j++) acc[i][j] = 0;
    for (int kv = 0; kv < wvec; kv++) {
        if (tid < TILE) {
            int r = base + tid;
            uint4 v = r < rows ? __ldg(w + (u64)r * wvec + kv) : make_uint4(0x55555555u, 0x55555555u, 0x55555555u, 0x55555555u);
            ws[0][tid] = v.x; ws[1][tid] = v.y; ws[2][tid] = v.z; ws[3][tid] = v.w;
        }
        {
            int tk = tid >> 2, c = tid & 3, tok = tok0 + tk;
            int4 v = tok < m ? __ldg(x + (u64)tok * xvec + 4 * kv + c) : make_int4(0, 0, 0, 0);
            xs[4 * c][tk] = v.x; xs[4 * c + 1][tk] = v.y; xs[4 * c + 2][tk] = v.z; xs[4 * c + 3][tk] = v.w;
        }
        __syncthreads();
#pragma unroll
        for (int q = 0; q < 4; q++) {
            uint4 wv = *(const uint4*)&ws[q][4 * ty];
            u32 wr[4] = {wv.x, wv.y, wv.z, wv.w};
#pragma unroll
            for (int sh = 0; sh < 4; sh++) {
                int4 xv = *(const int4*)&xs[4 * q + sh][4 * tx];
                int xt[4] = {xv.x, xv.y, xv.z, xv.w};
#pragma unroll
                for (int i = 0; i < 4; i++) {
                    int code = (int)((wr[i] >> (2 * sh)) & 0x03030303u);
#pragma unroll
                    for (int j = 0; j < 4; j++) acc[i][j] = __dp4a(code, xt[j], acc[i][j]);
                }
            }
        }
        __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < 4; i++) {
        int r = base + 4 * ty + i;
        if (r >= rows) continue;
#pragma unroll
        for (int j = 0; j < 4; j++) {
            int tok = tok0 + 4 * tx + j;
            if (tok < m) out[(u64)tok * rows + r] = apply_scale(mode, scale, (float)(acc[i][j] - sums[tok]), s_a[tok]);
        }
    }
}

// TernaryMatrix::forward_block_scaled: per (row, token), the exact i32 partial of every
// 256-column block, scaled by the block's multiplier and summed in block order, then the
// matrix scale. Codes decode to signed bytes (u - 1), so no activation sum is needed.
extern "C" __global__ void ternary_block_scaled(const uint4* w, const float* d, int rows, int blocks, int mode,
                                                float scale, const int4* x, int xvec, const float* s_a, int m,
                                                int wvec, float* out) {
    u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (u64)rows * m) return;
    int r = (int)(i % rows), tok = (int)(i / rows);
    const uint4* wrow = w + (u64)r * wvec;
    const int4* xr = x + (u64)tok * xvec;
    float acc = 0.0f;
    for (int b = 0; b < blocks; b++) {
        int part = 0;
        for (int v = 4 * b; v < min(4 * b + 4, wvec); v++) {
            uint4 wv = wrow[v];
            u32 words[4] = {wv.x, wv.y, wv.z, wv.w};
            for (int q = 0; q < 4; q++) {
                int4 xv = xr[4 * v + q];
                int xs[4] = {xv.x, xv.y, xv.z, xv.w};
                for (int sh = 0; sh < 4; sh++) {
                    int code = (int)__vsub4((words[q] >> (2 * sh)) & 0x03030303u, 0x01010101u);
                    part = __dp4a(code, xs[sh], part);
                }
            }
        }
        acc = acc + d[(u64)r * blocks + b] * (float)part;
    }
    out[(u64)tok * rows + r] = apply_scale(mode, scale, acc, s_a[tok]);
}

// Int8Matrix::forward (the integer lm_head, 8 or 6 bits, stored here as int8 rows of
// `wvec` 16-byte vectors): y = (sum(q*x) / s_a) * scale[r]. One warp per row, tokens in
// groups of 8 along grid.y.
extern "C" __global__ void __launch_bounds__(256) int8_gemv(const int4* w, const float* row_scales, int rows,
                                                            const int4* x, int xvec, const float* s_a, int m,
                                                            int wvec, float* out) {
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    int r = blockIdx.x * GEMV_WARPS + warp;
    if (r >= rows) return;
    int t0 = blockIdx.y * GEMV_TOKENS;
    int tn = min(GEMV_TOKENS, m - t0);
    const int4* wrow = w + (u64)r * wvec;
    int acc[GEMV_TOKENS];
#pragma unroll
    for (int t = 0; t < GEMV_TOKENS; t++) acc[t] = 0;
    for (int j = lane; j < wvec; j += 32) {
        int4 wv = __ldg(wrow + j);
#pragma unroll
        for (int t = 0; t < GEMV_TOKENS; t++) {
            if (t < tn) {
                int4 xv = __ldg(x + (u64)(t0 + t) * xvec + j);
                int a = acc[t];
                a = __dp4a(wv.x, xv.x, a);
                a = __dp4a(wv.y, xv.y, a);
                a = __dp4a(wv.z, xv.z, a);
                a = __dp4a(wv.w, xv.w, a);
                acc[t] = a;
            }
        }
    }
#pragma unroll
    for (int t = 0; t < GEMV_TOKENS; t++) {
        if (t < tn) {
            int a = warp_sum_i(acc[t]);
            if (lane == 0) {
                int tok = t0 + t;
                out[(u64)tok * rows + r] = ((float)a / s_a[tok]) * row_scales[r];
            }
        }
    }
}

// Prefill-sized batches on the int8 tensor cores (sm_80+): the same product as ternary_gemm,
// exact in i32. A block of 4 warps computes 64 rows x 64 tokens, each warp 32 x 32 with
// mma.m16n8k32 (s8 x s8 -> s32). Per step of 64 columns, the weight vectors are decoded to
// signed bytes t in {-1, 0, 1} in shared memory (A, row-major) beside the tokens' int8
// activations (B, one token's 64 bytes per row: the "col" operand), rows padded to 80 bytes
// so that fragment loads hit 32 different banks. Signed codes need no activation sum.
#define MMA_STRIDE 80
__device__ __forceinline__ void mma_s8(int* c, const u32* a, const u32* b) {
#if __CUDA_ARCH__ >= 800
    asm volatile(
        "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
}

extern "C" __global__ void __launch_bounds__(128) ternary_mma(MATS_PARAMS, const int4* x, int xvec, const float* s_a,
                                                              const int* sums, int m, int wvec) {
    __shared__ __align__(16) u8 as[TILE * MMA_STRIDE];
    __shared__ __align__(16) u8 bs[TILE * MMA_STRIDE];
    int tiles0 = (r0 + TILE - 1) / TILE, tiles1 = (r1 + TILE - 1) / TILE;
    int tile = blockIdx.x, base;
    const uint4* w;
    float* out;
    int rows, mode;
    float scale;
    if (tile < tiles0) {
        w = w0; out = o0; rows = r0; mode = m0; scale = s0; base = tile * TILE;
    } else if (tile < tiles0 + tiles1) {
        w = w1; out = o1; rows = r1; mode = m1; scale = s1; base = (tile - tiles0) * TILE;
    } else {
        w = w2; out = o2; rows = r2; mode = m2; scale = s2; base = (tile - tiles0 - tiles1) * TILE;
    }
    int tok0 = blockIdx.y * TILE;
    int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    int g = lane >> 2, tig = lane & 3;
    int wr = (warp >> 1) * 32, wt = (warp & 1) * 32;  // the warp's rows and tokens in the tile
    int acc[2][4][4];
#pragma unroll
    for (int i = 0; i < 2; i++)
#pragma unroll
        for (int j = 0; j < 4; j++)
#pragma unroll
            for (int e = 0; e < 4; e++) acc[i][j][e] = 0;
    for (int kv = 0; kv < wvec; kv++) {
        if (tid < TILE) {
            int r = base + tid;
            uint4 v = r < rows ? __ldg(w + (u64)r * wvec + kv) : make_uint4(0x55555555u, 0x55555555u, 0x55555555u, 0x55555555u);
            u32 words[4] = {v.x, v.y, v.z, v.w};
            u32* dst = (u32*)(as + tid * MMA_STRIDE);
#pragma unroll
            for (int q = 0; q < 4; q++)
#pragma unroll
                for (int sh = 0; sh < 4; sh++) dst[4 * q + sh] = __vsub4((words[q] >> (2 * sh)) & 0x03030303u, 0x01010101u);
        }
#pragma unroll
        for (int h = 0; h < 2; h++) {
            int e = tid + 128 * h, tk = e >> 2, c = e & 3, tok = tok0 + tk;
            int4 v = tok < m ? __ldg(x + (u64)tok * xvec + 4 * kv + c) : make_int4(0, 0, 0, 0);
            *(int4*)(bs + tk * MMA_STRIDE + 16 * c) = v;
        }
        __syncthreads();
#pragma unroll
        for (int k0 = 0; k0 < 64; k0 += 32) {
            u32 a[2][4], b[4][2];
#pragma unroll
            for (int i = 0; i < 2; i++) {
                const u8* ar = as + (wr + 16 * i + g) * MMA_STRIDE + k0 + 4 * tig;
                a[i][0] = *(const u32*)ar;
                a[i][1] = *(const u32*)(ar + 8 * MMA_STRIDE);
                a[i][2] = *(const u32*)(ar + 16);
                a[i][3] = *(const u32*)(ar + 8 * MMA_STRIDE + 16);
            }
#pragma unroll
            for (int j = 0; j < 4; j++) {
                const u8* br = bs + (wt + 8 * j + g) * MMA_STRIDE + k0 + 4 * tig;
                b[j][0] = *(const u32*)br;
                b[j][1] = *(const u32*)(br + 16);
            }
#pragma unroll
            for (int i = 0; i < 2; i++)
#pragma unroll
                for (int j = 0; j < 4; j++) mma_s8(acc[i][j], a[i], b[j]);
        }
        __syncthreads();
    }
    // c0, c1: row g, tokens 2 tig and 2 tig + 1; c2, c3: row g + 8.
#pragma unroll
    for (int i = 0; i < 2; i++)
#pragma unroll
        for (int j = 0; j < 4; j++)
#pragma unroll
            for (int e = 0; e < 4; e++) {
                int r = base + wr + 16 * i + g + 8 * (e >> 1);
                int tok = tok0 + wt + 8 * j + 2 * tig + (e & 1);
                if (r < rows && tok < m) out[(u64)tok * rows + r] = apply_scale(mode, scale, (float)acc[i][j][e], s_a[tok]);
            }
}
