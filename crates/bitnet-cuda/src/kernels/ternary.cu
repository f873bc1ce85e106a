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
    if (gr >= r0 + r1 + r2) {
        pdl_enter();
        return;
    }
    Selected s = select(gr, MATS_ARGS);
    int t0 = blockIdx.y * GEMV_TOKENS;
    int tn = min(GEMV_TOKENS, m - t0);
    const uint4* wrow = s.w + (u64)s.r * wvec;
    // The weights do not depend on the kernel before this one: the lane's first vector is read,
    // and the rest of its vectors requested into L2, while that kernel still runs.
    uint4 w_first = lane < wvec ? __ldg(wrow + lane) : make_uint4(0, 0, 0, 0);
    for (int j = lane + 32; j < wvec; j += 32) prefetch_l2(wrow + j);
    pdl_enter();
    int acc[GEMV_TOKENS];
#pragma unroll
    for (int t = 0; t < GEMV_TOKENS; t++) acc[t] = 0;
    for (int j = lane; j < wvec; j += 32) {
        uint4 w = j == lane ? w_first : __ldg(wrow + j);
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
    pdl_enter();
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
    pdl_enter();
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
    pdl_enter();
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

// Batches of more than 8 tokens on the int8 tensor cores (sm_80+): the same product as
// ternary_gemm, exact in i32. A block of 4 warps (2 x 2) computes BM rows x BN tokens, each
// warp (BM/2) x (BN/2) with mma.m16n8k32 (u8 x s8 -> s32): the weights enter the tensor cores
// as their unsigned codes u = t + 1, as in the GEMV, and the token's activation sum is
// subtracted once at the end. K advances MMA_KS = 128 columns a stage through a ring of
// MMA_STAGES shared-memory buffers filled by cp.async, so that the loads of the next stages are
// in flight while one is multiplied (the kernel waits for memory once per ring, not per step).
// A stage holds each row's two weight vectors still packed (8 words: 2 bits a code, a quarter
// of the bytes of decoded codes; the fragment's four codes are one shift and mask of a word,
// see the layout comment above) and each token's 128 activation bytes. Row strides are padded
// (12 words, 144 bytes) so that a warp's fragment reads hit 32 different banks. Columns past
// the row's vectors, rows past the matrix and tokens past the batch are zero-filled: they add
// nothing, and their outputs are not written.
//
// Split K (grid.z > 1): when the tiles alone would leave multiprocessors idle (a decode step of
// a few dozen sequences), each of the grid.z blocks of a tile takes its own run of stages and
// adds its i32 sums into `part` (one i32 per output, zero between launches) with atomics:
// integer addition in any order gives the same sum, so the split is exact. The last block of a
// tile to finish (counted in `done`, one counter per tile) takes the sums back, leaving zeros,
// subtracts the activation sums, scales and writes the outputs, and resets the counter.
#define MMA_KS 128
#define MMA_STAGES 3
#define MMA_A_WORDS 12
#define MMA_B_BYTES 144

__device__ __forceinline__ void mma_u8s8(int* c, const u32* a, const u32* b) {
#if __CUDA_ARCH__ >= 800
    asm volatile(
        "mma.sync.aligned.m16n8k32.row.col.s32.u8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
}

// f(sum, row, token) for each of a thread's outputs in its warp's part of an MMA tile (first row
// `row0`, first token `tok0`): c0, c1 are row g, tokens 2 tig and 2 tig + 1; c2, c3 row g + 8.
// A template, not a generic lambda: some NVRTC versions take `[&](auto f)` for a host function.
template <int MI, int NJ, class F>
__device__ __forceinline__ void each_mma_output(int (&acc)[MI][NJ][4], int row0, int tok0, int g, int tig, F f) {
#pragma unroll
    for (int i = 0; i < MI; i++)
#pragma unroll
        for (int j = 0; j < NJ; j++)
#pragma unroll
            for (int e = 0; e < 4; e++) f(acc[i][j][e], row0 + 16 * i + g + 8 * (e >> 1), tok0 + 8 * j + 2 * tig + (e & 1));
}

template <int BM, int BN>
__device__ __forceinline__ void ternary_mma_tile(MATS_PARAMS, const int4* x, int xvec, const float* s_a,
                                                 const int* sums, int m, int wvec, int* part, int* done) {
    constexpr int MI = BM / 32, NJ = BN / 16;  // a warp's 16-row and 8-token fragments
    __shared__ __align__(16) u32 as[MMA_STAGES][BM * MMA_A_WORDS];
    __shared__ __align__(16) u8 bs[MMA_STAGES][BN * MMA_B_BYTES];
    int tiles0 = (r0 + BM - 1) / BM, tiles1 = (r1 + BM - 1) / BM;
    int tile = blockIdx.x, base, row0;  // row0: the matrix's first row among the launch's rows
    const uint4* w;
    float* out;
    int rows, mode;
    float scale;
    if (tile < tiles0) {
        w = w0; out = o0; rows = r0; mode = m0; scale = s0; base = tile * BM; row0 = 0;
    } else if (tile < tiles0 + tiles1) {
        w = w1; out = o1; rows = r1; mode = m1; scale = s1; base = (tile - tiles0) * BM; row0 = r0;
    } else {
        w = w2; out = o2; rows = r2; mode = m2; scale = s2; base = (tile - tiles0 - tiles1) * BM; row0 = r0 + r1;
    }
    int tok0 = blockIdx.y * BN;
    int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    int g = lane >> 2, tig = lane & 3;
    int wr = (warp >> 1) * (BM / 2), wt = (warp & 1) * (BN / 2);  // the warp's rows and tokens in the tile
    // This block's stages: all of them, or its share of a split K.
    int all_stages = (wvec + 1) / 2, share = (all_stages + gridDim.z - 1) / gridDim.z;
    int first = blockIdx.z * share, stages = max(0, min(share, all_stages - first));
    // Stage st: weight vectors 2 st, 2 st + 1 of each row, activation vectors 8 st .. 8 st + 7.
    auto load = [&](int st, int buf) {
        st += first;
        for (int e = tid; e < BM * 2; e += 128) {
            int r = e >> 1, v = 2 * st + (e & 1);
            bool full = base + r < rows && v < wvec;
            cp_async16(&as[buf][r * MMA_A_WORDS + 4 * (e & 1)], full ? w + (u64)(base + r) * wvec + v : w, full);
        }
        for (int e = tid; e < BN * 8; e += 128) {
            int tk = e >> 3, c = e & 7, tok = tok0 + tk;
            bool full = tok < m && 2 * st + (c >> 2) < wvec;
            cp_async16(&bs[buf][tk * MMA_B_BYTES + 16 * c], full ? x + (u64)tok * xvec + 8 * st + c : x, full);
        }
    };
    int acc[MI][NJ][4];
#pragma unroll
    for (int i = 0; i < MI; i++)
#pragma unroll
        for (int j = 0; j < NJ; j++)
#pragma unroll
            for (int e = 0; e < 4; e++) acc[i][j][e] = 0;
#pragma unroll
    for (int s = 0; s < MMA_STAGES - 1; s++) {
        if (s < stages) load(s, s);
        cp_async_commit();
    }
    for (int st = 0; st < stages; st++) {
        cp_async_wait<MMA_STAGES - 2>();  // stage st has landed (this thread's copies) ...
        __syncthreads();                  // ... everyone's, and stage st - 1's buffer is free
        int next = st + MMA_STAGES - 1;
        if (next < stages) load(next, next % MMA_STAGES);
        cp_async_commit();
        const u32* a_st = as[st % MMA_STAGES];
        const u8* b_st = bs[st % MMA_STAGES];
#pragma unroll
        for (int ks = 0; ks < MMA_KS / 32; ks++) {
            // Words 2 ks, 2 ks + 1 of a row are its columns 32 ks .. 32 ks + 31; shifting by
            // 2 tig gives the codes of columns 4 tig .. 4 tig + 3 (and 16 + those) in byte order.
            u32 a[MI][4], b[NJ][2];
#pragma unroll
            for (int i = 0; i < MI; i++) {
                const u32* ar = a_st + (wr + 16 * i + g) * MMA_A_WORDS + 2 * ks;
                uint2 lo = *(const uint2*)ar, hi = *(const uint2*)(ar + 8 * MMA_A_WORDS);
                a[i][0] = (lo.x >> (2 * tig)) & 0x03030303u;
                a[i][1] = (hi.x >> (2 * tig)) & 0x03030303u;
                a[i][2] = (lo.y >> (2 * tig)) & 0x03030303u;
                a[i][3] = (hi.y >> (2 * tig)) & 0x03030303u;
            }
#pragma unroll
            for (int j = 0; j < NJ; j++) {
                const u8* br = b_st + (wt + 8 * j + g) * MMA_B_BYTES + 32 * ks + 4 * tig;
                b[j][0] = *(const u32*)br;
                b[j][1] = *(const u32*)(br + 16);
            }
#pragma unroll
            for (int i = 0; i < MI; i++)
#pragma unroll
                for (int j = 0; j < NJ; j++) mma_u8s8(acc[i][j], a[i], b[j]);
        }
    }
    cp_async_wait<0>();
    if (gridDim.z > 1) {
        int total = r0 + r1 + r2;
        each_mma_output(acc, base + wr, tok0 + wt, g, tig, [&](int& a, int r, int tok) {
            if (r < rows && tok < m && a != 0) atomicAdd(&part[(u64)tok * total + row0 + r], a);
        });
        // Every add of this block is visible before the count says so (the classic
        // threadfence-reduction handshake); the last block sees every block's adds.
        __threadfence();
        __syncthreads();
        __shared__ int last;
        int* count = done + blockIdx.y * gridDim.x + blockIdx.x;
        if (tid == 0) last = atomicAdd(count, 1) == (int)gridDim.z - 1;
        __syncthreads();
        if (!last) return;
        __threadfence();
        each_mma_output(acc, base + wr, tok0 + wt, g, tig, [&](int& a, int r, int tok) {
            a = r < rows && tok < m ? atomicExch(&part[(u64)tok * total + row0 + r], 0) : 0;
        });
        if (tid == 0) *count = 0;
    }
    each_mma_output(acc, base + wr, tok0 + wt, g, tig, [&](int& a, int r, int tok) {
        if (r < rows && tok < m) out[(u64)tok * rows + r] = apply_scale(mode, scale, (float)(a - sums[tok]), s_a[tok]);
    });
}

// Prefill-sized batches: 64 rows x 64 tokens a block (`part`, `done`: split K, see above).
extern "C" __global__ void __launch_bounds__(128) ternary_mma(MATS_PARAMS, const int4* x, int xvec, const float* s_a,
                                                              const int* sums, int m, int wvec, int* part,
                                                              int* done) {
    pdl_enter();
    ternary_mma_tile<64, 64>(MATS_ARGS, x, xvec, s_a, sums, m, wvec, part, done);
}

// Decode steps of many sequences: 32 x 32 tiles, so that a layer's products still give every
// multiprocessor blocks to run (with K split where even these are too few).
extern "C" __global__ void __launch_bounds__(128) ternary_mma_small(MATS_PARAMS, const int4* x, int xvec,
                                                                    const float* s_a, const int* sums, int m,
                                                                    int wvec, int* part, int* done) {
    pdl_enter();
    ternary_mma_tile<32, 32>(MATS_ARGS, x, xvec, s_a, sums, m, wvec, part, done);
}
