// RoPE, the paged KV store and attention over block tables.

#define BLOCK_TOKENS 32

// ops::rope_cos_sin + ops::rope_neox of one pair (dims i and i + half): the angle is an f32
// product, its cos and sin are taken in f64 and rounded once.
__device__ __forceinline__ void rotate_pair(float a, float b, u32 pos, float f, float* lo, float* hi) {
    double angle = (double)((float)pos * f);
    float c = (float)cos(angle), s = (float)sin(angle);
    *lo = a * c - b * s;
    *hi = b * c + a * s;
}

// CpuBackend::rope: thread per (row, head, pair), in place.
extern "C" __global__ void rope(float* x, const float* inv_freq, const u32* positions, int rows, int n_heads,
                                int head_dim) {
    pdl_enter();
    int half = head_dim / 2;
    u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (u64)rows * n_heads * half) return;
    int p = (int)(i % half);
    u64 rh = i / half;
    int t = (int)(rh / n_heads);
    float* head = x + rh * head_dim;
    float lo, hi;
    rotate_pair(head[p], head[p + half], positions[t], inv_freq[p], &lo, &hi);
    head[p] = lo;
    head[p + half] = hi;
}

// CpuBackend::rope_kv_store: rotated keys and plain values of each row into its cache slot of
// one layer's store (element type `kv_type`); thread per (row, head, pair). With `q` (rows of
// `n_q` heads), the queries of the same rows are rotated in place too (rope_qk_store): heads
// 0..n_q of a row are its queries, n_q.. its keys.
extern "C" __global__ void rope_kv_store(void* keys, void* values, int kv_type, const float* k, const float* v,
                                         const u32* positions, const u32* slots, const float* inv_freq, int rows,
                                         int n_kv_heads, int head_dim, float* q, int n_q) {
    pdl_enter();
    int half = head_dim / 2, kv_dim = n_kv_heads * head_dim, heads = n_q + n_kv_heads;
    u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (u64)rows * heads * half) return;
    int p = (int)(i % half);
    u64 rh = i / half;
    int t = (int)(rh / heads), h = (int)(rh % heads);
    float lo, hi;
    if (h < n_q) {
        float* head = q + ((u64)t * n_q + h) * head_dim;
        rotate_pair(head[p], head[p + half], positions[t], inv_freq[p], &lo, &hi);
        head[p] = lo;
        head[p + half] = hi;
        return;
    }
    h -= n_q;
    u64 src = (u64)t * kv_dim + (u64)h * head_dim;
    u64 dst = (u64)slots[t] * kv_dim + (u64)h * head_dim;
    rotate_pair(k[src + p], k[src + p + half], positions[t], inv_freq[p], &lo, &hi);
    store_elem(keys, kv_type, dst + p, lo);
    store_elem(keys, kv_type, dst + p + half, hi);
    store_elem(values, kv_type, dst + p, v[src + p]);
    store_elem(values, kv_type, dst + p + half, v[src + p + half]);
}

// Attention (the CPU's attention.rs, online softmax in f32) over a paged cache.
//
// A block of ATT_WARPS warps runs one task: up to ATT_ROWS query rows (tokens t0..t1 of one
// segment times `heads` consecutive query heads of one kv head's group, row i = token
// t0 + i / heads, head head0 + i % heads, as the CPU's tasks stack them) over the segment's
// key blocks, one 32-key cache block at a time, as attention.rs's tasks do: scores S = Q·Kᵀ,
// the causal mask (and a sliding window's lower edge), an online softmax per row and
// O += P·V. Blocks past the tile's last token, or wholly before its first token's window, are
// never visited.
//
// Both products are register-tiled out of shared memory, as a SIMT GEMM: thread (ty, tx),
// ty = tid / 8, tx = tid % 8, owns rows ty and ty + 16, keys tx + 8j (j < 4) of each score
// tile and dims 4tx..4tx+3 of every 32-dim chunk of those rows' outputs; the outputs, the
// rows' running max and sum live in registers for the whole walk. The eight threads of a row
// are adjacent lanes, so a row's max and sum are three shuffles. The scaled queries stay in
// shared memory ([ATT_ROWS][32D + 4]); keys and values pass through a double-buffered
// 32-key × 32-dim chunk ([2][32][ATT_KS]), each chunk read from global memory with coalesced
// four-wide loads (a key row's 32 dims are 128 contiguous bytes in f32) into registers while
// the previous chunk is being used, widened to f32, so that one barrier a chunk suffices; the
// probabilities pass through [ATT_ROWS][ATT_PS]. The paddings make every shared access free
// of bank conflicts. The products' sums are explicit fmaf (one rounding a step, as in the CPU's
// AVX2 microkernels), exp is expf. Keys past the context (the tail of the last block) are
// staged as zeros, so that stale cache slots never reach the sums. Shared memory: 4 ·
// (32 · (32D + 4) + 32 · 40 + 2 · 32 · 36) bytes, 31 232 for heads of 128, 47 616 for 256.
#define ATT_WARPS 4
#define ATT_ROWS 32
#define ATT_KS 36
#define ATT_PS 40
// The thread layout above (16 × 8 threads, two rows each, two pieces of a chunk each).
static_assert(ATT_WARPS * 32 == 128 && ATT_ROWS == 32, "attention_task's thread layout");

// Four elements i..i+3 of a cache of type KV, widened to f32 (i a multiple of four).
template <int KV>
__device__ __forceinline__ float4 kv_load4(const void* p, u64 i) {
    if (KV == DT_F32) return *(const float4*)((const float*)p + i);
    uint2 u = *(const uint2*)((const u16*)p + i);
    u16 e0 = (u16)(u.x & 0xffffu), e1 = (u16)(u.x >> 16), e2 = (u16)(u.y & 0xffffu), e3 = (u16)(u.y >> 16);
    if (KV == DT_BF16) return make_float4(bf16_to_f32(e0), bf16_to_f32(e1), bf16_to_f32(e2), bf16_to_f32(e3));
    return make_float4(f16_to_f32(e0), f16_to_f32(e1), f16_to_f32(e2), f16_to_f32(e3));
}

// This thread's two four-wide pieces of chunk c (dims 32c..32c + 31) of the 32 keys or values
// at `base` (key j at base + j * kv_dim): key tid / 8 + 16h, dims 32c + 4 (tid % 8) + 0..3.
// Keys from `kn` on and dims from `head_dim` on are zeros. Heads whose size is not a multiple
// of four are read an element at a time.
template <int KV>
__device__ __forceinline__ void att_fetch(float4 (&r)[2], const void* src, u64 base, int kv_dim, int c, int kn,
                                          int head_dim) {
#pragma unroll
    for (int h = 0; h < 2; h++) {
        int key = (threadIdx.x >> 3) + 16 * h, d = c * 32 + 4 * (threadIdx.x & 7);
        float4 v = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        if (key < kn && d < head_dim) {
            u64 i = base + (u64)key * kv_dim + d;
            if ((head_dim & 3) == 0) {
                v = kv_load4<KV>(src, i);
            } else {
                v.x = load_elem(src, KV, i);
                if (d + 1 < head_dim) v.y = load_elem(src, KV, i + 1);
                if (d + 2 < head_dim) v.z = load_elem(src, KV, i + 2);
                if (d + 3 < head_dim) v.w = load_elem(src, KV, i + 3);
            }
        }
        r[h] = v;
    }
}

// The fetched pieces into a staged chunk [32][ATT_KS].
__device__ __forceinline__ void att_stage(float* chunk, const float4 (&r)[2]) {
#pragma unroll
    for (int h = 0; h < 2; h++)
        *(float4*)&chunk[((threadIdx.x >> 3) + 16 * h) * ATT_KS + 4 * (threadIdx.x & 7)] = r[h];
}

// Segment fields: first_row, rows, pos0, table_start. Task fields: segment, t0, t1, head0.
template <int D, int KV>
__device__ void attention_task(const float* q, const void* keys, const void* values, int kv_dim, const u32* tables,
                               const int4* segments, const int4* tasks, int n_heads, int n_kv_heads, int head_dim,
                               int heads, float scale, int window, float* out) {
    // Rows of a thread, 16 apart.
    const int RT = ATT_ROWS / 16;
    const int QS = D * 32 + 4;
    extern __shared__ float4 smem4[];
    float* qs = (float*)smem4;          // [ATT_ROWS][QS], scaled queries, zeros past head_dim
    float* ps = qs + ATT_ROWS * QS;     // [ATT_ROWS][ATT_PS], probabilities of one key block
    float* kvs = ps + ATT_ROWS * ATT_PS;  // [2][32][ATT_KS], staged key or value chunks
    int4 task = tasks[blockIdx.x];
    int4 seg = segments[task.x];
    int t0 = task.y, t1 = task.z, head0 = task.w;
    int rows = (t1 - t0) * heads;
    int n_rep = n_heads / n_kv_heads, g = head0 / n_rep;
    int tx = threadIdx.x & 7, ty = threadIdx.x >> 3;
    // `scale` is the host's factor on q.k (head_dim^-0.5, or Gemma3's query_pre_attn_scalar^-0.5);
    // `window` > 0: a sliding window, the row at position p sees keys p + 1 - window ..= p.
    for (int e = threadIdx.x; e < ATT_ROWS * D * 32; e += blockDim.x) {
        int i = e / (D * 32), d = e % (D * 32);
        float x = 0.0f;
        if (i < rows && d < head_dim) {
            int tok = seg.x + t0 + i / heads, h = head0 + i % heads;
            x = q[((u64)tok * n_heads + h) * head_dim + d] * scale;
        }
        qs[i * QS + d] = x;
    }
    // A row's position and first visible key; rows past the task's see no key (position -1).
    int pos[RT], lo[RT];
    float m[RT], l[RT], o[RT][D][4];
#pragma unroll
    for (int i = 0; i < RT; i++) {
        int r = ty + 16 * i;
        pos[i] = r < rows ? seg.z + t0 + r / heads : -1;
        lo[i] = window > 0 ? pos[i] + 1 - window : 0;
        m[i] = -INFINITY;
        l[i] = 0.0f;
#pragma unroll
        for (int c = 0; c < D; c++)
#pragma unroll
            for (int e = 0; e < 4; e++) o[i][c][e] = 0.0f;
    }
    int end = seg.z + t1;  // keys the last row sees
    int nblocks = (end + BLOCK_TOKENS - 1) / BLOCK_TOKENS;
    int bi = window > 0 ? max(seg.z + t0 + 1 - window, 0) / BLOCK_TOKENS : 0;
    u64 koff = (u64)g * head_dim;
    u64 base = (u64)tables[seg.w + bi] * BLOCK_TOKENS * kv_dim + koff;
    int kn = min(BLOCK_TOKENS, end - bi * BLOCK_TOKENS);
    float4 pre[2];
    att_fetch<KV>(pre, keys, base, kv_dim, 0, kn, head_dim);
    int buf = 0;
    for (; bi < nblocks; bi++) {
        int k0 = bi * BLOCK_TOKENS;
        // S = Q·Kᵀ, a 32-dim chunk at a time; the next chunk (or the first of the values) is
        // read while this one is used. The barrier also orders the previous block's reads of
        // the probabilities before this block's writes.
        float s[RT][4];
#pragma unroll
        for (int i = 0; i < RT; i++)
#pragma unroll
            for (int j = 0; j < 4; j++) s[i][j] = 0.0f;
#pragma unroll
        for (int c = 0; c < D; c++) {
            float* kc = kvs + buf * (32 * ATT_KS);
            att_stage(kc, pre);
            __syncthreads();
            if (c + 1 < D) att_fetch<KV>(pre, keys, base, kv_dim, c + 1, kn, head_dim);
            else att_fetch<KV>(pre, values, base, kv_dim, 0, kn, head_dim);
#pragma unroll
            for (int d4 = 0; d4 < 8; d4++) {
                float4 kf[4];
#pragma unroll
                for (int j = 0; j < 4; j++) kf[j] = *(const float4*)&kc[(tx + 8 * j) * ATT_KS + 4 * d4];
#pragma unroll
                for (int i = 0; i < RT; i++) {
                    float4 qf = *(const float4*)&qs[(ty + 16 * i) * QS + c * 32 + 4 * d4];
#pragma unroll
                    for (int j = 0; j < 4; j++) {
                        s[i][j] = fmaf(qf.x, kf[j].x, s[i][j]);
                        s[i][j] = fmaf(qf.y, kf[j].y, s[i][j]);
                        s[i][j] = fmaf(qf.z, kf[j].z, s[i][j]);
                        s[i][j] = fmaf(qf.w, kf[j].w, s[i][j]);
                    }
                }
            }
            buf ^= 1;
        }
        // Online softmax per row over its visible keys of the block; masked keys get no weight,
        // and a row that has seen no key yet (the window's edge, rows past the task's) stays so.
#pragma unroll
        for (int i = 0; i < RT; i++) {
            bool in[4];
            float mx = -INFINITY;
#pragma unroll
            for (int j = 0; j < 4; j++) {
                int key = k0 + tx + 8 * j;
                in[j] = key >= lo[i] && key <= pos[i];
                if (in[j]) mx = fmaxf(mx, s[i][j]);
            }
#pragma unroll
            for (int x = 1; x < 8; x <<= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, x));
            float new_max = fmaxf(m[i], mx);
            float alpha = 1.0f, sum = 0.0f, p[4];
#pragma unroll
            for (int j = 0; j < 4; j++) p[j] = 0.0f;
            if (new_max != -INFINITY) {
                alpha = expf(m[i] - new_max);
#pragma unroll
                for (int j = 0; j < 4; j++) {
                    if (in[j]) p[j] = expf(s[i][j] - new_max);
                    sum = sum + p[j];
                }
            }
#pragma unroll
            for (int x = 1; x < 8; x <<= 1) sum = sum + __shfl_xor_sync(0xffffffffu, sum, x);
            l[i] = fmaf(l[i], alpha, sum);
            m[i] = new_max;
#pragma unroll
            for (int c = 0; c < D; c++)
#pragma unroll
                for (int e = 0; e < 4; e++) o[i][c][e] = o[i][c][e] * alpha;
#pragma unroll
            for (int j = 0; j < 4; j++) ps[(ty + 16 * i) * ATT_PS + tx + 8 * j] = p[j];
        }
        // The next block's first key chunk is read during the last value chunk.
        int next = bi + 1;
        u64 next_base = 0;
        int next_kn = 0;
        if (next < nblocks) {
            next_base = (u64)tables[seg.w + next] * BLOCK_TOKENS * kv_dim + koff;
            next_kn = min(BLOCK_TOKENS, end - next * BLOCK_TOKENS);
        }
        // O += P·V, a 32-dim chunk of the values at a time.
#pragma unroll
        for (int c = 0; c < D; c++) {
            float* vc = kvs + buf * (32 * ATT_KS);
            att_stage(vc, pre);
            __syncthreads();
            if (c + 1 < D) att_fetch<KV>(pre, values, base, kv_dim, c + 1, kn, head_dim);
            else if (next < nblocks) att_fetch<KV>(pre, keys, next_base, kv_dim, 0, next_kn, head_dim);
#pragma unroll
            for (int k4 = 0; k4 < 8; k4++) {
                float4 vf[4];
#pragma unroll
                for (int kk = 0; kk < 4; kk++) vf[kk] = *(const float4*)&vc[(4 * k4 + kk) * ATT_KS + 4 * tx];
#pragma unroll
                for (int i = 0; i < RT; i++) {
                    float4 pf = *(const float4*)&ps[(ty + 16 * i) * ATT_PS + 4 * k4];
                    float pk[4] = {pf.x, pf.y, pf.z, pf.w};
#pragma unroll
                    for (int kk = 0; kk < 4; kk++) {
                        o[i][c][0] = fmaf(pk[kk], vf[kk].x, o[i][c][0]);
                        o[i][c][1] = fmaf(pk[kk], vf[kk].y, o[i][c][1]);
                        o[i][c][2] = fmaf(pk[kk], vf[kk].z, o[i][c][2]);
                        o[i][c][3] = fmaf(pk[kk], vf[kk].w, o[i][c][3]);
                    }
                }
            }
            buf ^= 1;
        }
        base = next_base;
        kn = next_kn;
    }
    // out = O · (1 / l), as the CPU's.
#pragma unroll
    for (int i = 0; i < RT; i++) {
        int r = ty + 16 * i;
        if (r >= rows) continue;
        int tok = seg.x + t0 + r / heads, h = head0 + r % heads;
        float* dst = out + ((u64)tok * n_heads + h) * head_dim;
        float inv = 1.0f / l[i];
#pragma unroll
        for (int c = 0; c < D; c++)
#pragma unroll
            for (int e = 0; e < 4; e++) {
                int d = c * 32 + 4 * tx + e;
                if (d < head_dim) dst[d] = o[i][c][e] * inv;
            }
    }
}

#define ATTENTION_KERNEL(D, KV, NAME)                                                                            \
    extern "C" __global__ void __launch_bounds__(ATT_WARPS * 32)                                                 \
        NAME(const float* q, const void* keys, const void* values, int kv_dim, const u32* tables,                \
             const int4* segments, const int4* tasks, int n_heads, int n_kv_heads, int head_dim, int heads,      \
             float scale, int window, float* out) {                                                              \
        pdl_enter();                                                                                             \
        attention_task<D, KV>(q, keys, values, kv_dim, tables, segments, tasks, n_heads, n_kv_heads, head_dim, \
                              heads, scale, window, out);                                                        \
    }

#define ATTENTION_KV(D)                               \
    ATTENTION_KERNEL(D, DT_F32, attention_d##D##_f32)   \
    ATTENTION_KERNEL(D, DT_BF16, attention_d##D##_bf16) \
    ATTENTION_KERNEL(D, DT_F16, attention_d##D##_f16)

ATTENTION_KV(1)
ATTENTION_KV(2)
ATTENTION_KV(3)
ATTENTION_KV(4)
ATTENTION_KV(8)

// Attention of short segments (decode steps), split over the context (flash-decoding).
//
// A block runs one query row of one head: row task `blockIdx.x / n_heads` (a segment and a
// row of it), head `blockIdx.x % n_heads`, over part `blockIdx.y` of the key blocks that row
// sees (`gridDim.y` parts of whole 32-key blocks, taken from the row's position at run time, so
// that a captured graph stays valid as the context grows). Lane l holds dims l + 32c of the
// query, of the output and of every key and value it reads: keys and values are read a
// coalesced 32-lane row at a time, and the heads of one kv group, adjacent in the grid, read
// the same rows while they are in L2. Each of the ROW_WARPS warps takes 8 keys of every
// 32-key block, four at a time: four dot products reduced across the warp together, one
// online-softmax update per four keys. The warps merge through shared memory; with one part,
// the block writes the row's output, else its part's (max, sum, unnormalized output) for
// `attention_merge`.
#define ROW_WARPS 4
#define ROW_KEYS 4

template <int D, int KV>
__device__ __forceinline__ float kv_elem(const void* p, u64 i) {
    return KV == DT_F32 ? ((const float*)p)[i]
                        : (KV == DT_BF16 ? bf16_to_f32(((const u16*)p)[i]) : f16_to_f32(((const u16*)p)[i]));
}

// Row task fields: segment, row of the segment.
template <int D, int KV>
__device__ void attention_row_task(const float* q, const void* keys, const void* values, int kv_dim,
                                   const u32* tables, const int4* segments, const int2* row_tasks, int n_heads,
                                   int n_kv_heads, int head_dim, float scale, int window, float* out,
                                   float* partials) {
    __shared__ float wm[ROW_WARPS], wl[ROW_WARPS];
    __shared__ float wo[ROW_WARPS][D * 32];
    int task = blockIdx.x / n_heads, h = blockIdx.x % n_heads;
    int2 rt = row_tasks[task];
    int4 seg = segments[rt.x];
    int row = seg.x + rt.y;
    int end = seg.z + rt.y + 1;  // keys 0..end are visible (the row's own position last)
    int lo = window > 0 ? max(end - window, 0) : 0;
    int g = h / (n_heads / n_kv_heads);
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    int kb0 = lo / BLOCK_TOKENS, nkb = (end + BLOCK_TOKENS - 1) / BLOCK_TOKENS - kb0;
    int parts = gridDim.y, z = blockIdx.y;
    int b0 = kb0 + (int)(((long long)nkb * z) / parts), b1 = kb0 + (int)(((long long)nkb * (z + 1)) / parts);
    const float* qrow = q + ((u64)row * n_heads + h) * head_dim;
    float qr[D], o[D];
#pragma unroll
    for (int c = 0; c < D; c++) {
        int d = lane + 32 * c;
        qr[c] = d < head_dim ? qrow[d] * scale : 0.0f;
        o[c] = 0.0f;
    }
    float m = -INFINITY, l = 0.0f;
    for (int bi = b0; bi < b1; bi++) {
        u64 base = (u64)tables[seg.w + bi] * BLOCK_TOKENS * kv_dim + (u64)g * head_dim;
#pragma unroll
        for (int kk = 0; kk < 8; kk += ROW_KEYS) {
            int k0 = bi * BLOCK_TOKENS + warp * 8 + kk;
            float s[ROW_KEYS], vv[ROW_KEYS][D];
            bool in[ROW_KEYS];
            // The values are loaded with the keys (they do not depend on the scores), so that
            // a step of four keys waits for memory once.
#pragma unroll
            for (int j = 0; j < ROW_KEYS; j++) {
                int key = k0 + j;
                in[j] = key >= lo && key < end;
                u64 kb = base + (u64)(key % BLOCK_TOKENS) * kv_dim;
                float acc = 0.0f;
#pragma unroll
                for (int c = 0; c < D; c++) {
                    int d = lane + 32 * c;
                    bool here = in[j] && d < head_dim;
                    vv[j][c] = here ? kv_elem<D, KV>(values, kb + d) : 0.0f;
                    if (here) acc = acc + qr[c] * kv_elem<D, KV>(keys, kb + d);
                }
                s[j] = acc;
            }
#pragma unroll
            for (int j = 0; j < ROW_KEYS; j++) s[j] = warp_sum_f(s[j]);
            float mx = m;
#pragma unroll
            for (int j = 0; j < ROW_KEYS; j++)
                if (in[j]) mx = fmaxf(mx, s[j]);
            if (mx == -INFINITY) continue;  // no visible key yet
            float alpha = expf(m - mx), sum = 0.0f, p[ROW_KEYS];
#pragma unroll
            for (int j = 0; j < ROW_KEYS; j++) {
                p[j] = in[j] ? expf(s[j] - mx) : 0.0f;
                sum = sum + p[j];
            }
            l = l * alpha + sum;
            m = mx;
#pragma unroll
            for (int c = 0; c < D; c++) {
                float acc = o[c] * alpha;
#pragma unroll
                for (int j = 0; j < ROW_KEYS; j++)
                    if (in[j]) acc = acc + p[j] * vv[j][c];
                o[c] = acc;
            }
        }
    }
    // Merge the warps' states.
    if (lane == 0) {
        wm[warp] = m;
        wl[warp] = l;
    }
#pragma unroll
    for (int c = 0; c < D; c++) wo[warp][lane + 32 * c] = o[c];
    __syncthreads();
    float mx = -INFINITY;
    for (int w = 0; w < ROW_WARPS; w++) mx = fmaxf(mx, wm[w]);
    for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
        float sum = 0.0f, acc = 0.0f;
        for (int w = 0; w < ROW_WARPS; w++) {
            if (wm[w] == -INFINITY) continue;
            float f = expf(wm[w] - mx);
            sum = sum + wl[w] * f;
            acc = acc + wo[w][d] * f;
        }
        if (parts == 1) {
            out[((u64)row * n_heads + h) * head_dim + d] = acc / sum;
        } else {
            float* part = partials + ((u64)blockIdx.x * parts + z) * (head_dim + 2);
            part[2 + d] = acc;
            if (d == 0) {
                part[0] = mx;
                part[1] = sum;
            }
        }
    }
}

#define ATTENTION_ROW_KERNEL(D, KV, NAME)                                                                   \
    extern "C" __global__ void __launch_bounds__(ROW_WARPS * 32)                                            \
        NAME(const float* q, const void* keys, const void* values, int kv_dim, const u32* tables,           \
             const int4* segments, const int2* row_tasks, int n_heads, int n_kv_heads, int head_dim,       \
             float scale, int window, float* out, float* partials) {                                       \
        pdl_enter();                                                                                        \
        attention_row_task<D, KV>(q, keys, values, kv_dim, tables, segments, row_tasks, n_heads, n_kv_heads, \
                                  head_dim, scale, window, out, partials);                                  \
    }

#define ATTENTION_ROW_KV(D)                                   \
    ATTENTION_ROW_KERNEL(D, DT_F32, attention_rows_d##D##_f32)   \
    ATTENTION_ROW_KERNEL(D, DT_BF16, attention_rows_d##D##_bf16) \
    ATTENTION_ROW_KERNEL(D, DT_F16, attention_rows_d##D##_f16)

ATTENTION_ROW_KV(1)
ATTENTION_ROW_KV(2)
ATTENTION_ROW_KV(3)
ATTENTION_ROW_KV(4)
ATTENTION_ROW_KV(8)

// The parts of attention_rows_*: block x = (row task, head) as there, thread per dim; parts
// without a visible key (max -inf) carry no weight.
extern "C" __global__ void attention_merge(const float* partials, int parts, const int4* segments,
                                           const int2* row_tasks, int n_heads, int head_dim, float* out) {
    pdl_enter();
    int task = blockIdx.x / n_heads, h = blockIdx.x % n_heads;
    int2 rt = row_tasks[task];
    int row = segments[rt.x].x + rt.y;
    const float* p = partials + (u64)blockIdx.x * parts * (head_dim + 2);
    float mx = -INFINITY;
    for (int z = 0; z < parts; z++) mx = fmaxf(mx, p[(u64)z * (head_dim + 2)]);
    for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
        float sum = 0.0f, acc = 0.0f;
        for (int z = 0; z < parts; z++) {
            const float* pz = p + (u64)z * (head_dim + 2);
            if (pz[0] == -INFINITY) continue;
            float f = expf(pz[0] - mx);
            sum = sum + pz[1] * f;
            acc = acc + pz[2 + d] * f;
        }
        out[((u64)row * n_heads + h) * head_dim + d] = acc / sum;
    }
}
