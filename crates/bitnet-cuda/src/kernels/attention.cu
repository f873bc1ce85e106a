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
// A block runs one task: `rows` query rows (tokens t0..t1 of one segment times `heads`
// consecutive query heads of one kv head's group). Its ATT_WARPS warps split the segment's
// key blocks between them (warp w takes blocks w, w + ATT_WARPS, ...); in a block of 32 keys,
// lane j scores key j against every row, the warp's running max, sum and output are updated,
// and the output accumulators live in registers, dims lane + 32c. At the end the warps'
// partial states are merged through shared memory. Decoding (one row per segment) thus
// walks each sequence's block table once, four blocks at a time.
#define ATT_WARPS 4
#define ATT_ROWS 16

// Segment fields: first_row, rows, pos0, table_start. Task fields: segment, t0, t1, head0.
template <int D, int KV>
__device__ void attention_task(const float* q, const void* keys, const void* values, int kv_dim, const u32* tables,
                               const int4* segments, const int4* tasks, int n_heads, int n_kv_heads, int head_dim,
                               int heads, float scale, int window, float* out) {
    extern __shared__ float smem[];
    int4 task = tasks[blockIdx.x];
    int4 seg = segments[task.x];
    int t0 = task.y, t1 = task.z, head0 = task.w;
    int rows = (t1 - t0) * heads;
    int n_rep = n_heads / n_kv_heads, g = head0 / n_rep;
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    // `scale` is the host's factor on q.k (head_dim^-0.5, or Gemma3's query_pre_attn_scalar^-0.5);
    // `window` > 0: a sliding window, the row at position p sees keys p + 1 - window ..= p.
    // Shared: queries [ATT_ROWS][head_dim] (scaled), then per warp: max, sum [ATT_ROWS] and
    // outputs [ATT_ROWS][head_dim].
    float* qs = smem;
    float* wm = qs + ATT_ROWS * head_dim;
    float* wl = wm + ATT_WARPS * ATT_ROWS;
    float* wo = wl + ATT_WARPS * ATT_ROWS;
    for (int e = threadIdx.x; e < rows * head_dim; e += blockDim.x) {
        int i = e / head_dim, d = e % head_dim;
        int tok = seg.x + t0 + i / heads, h = head0 + i % heads;
        qs[e] = q[((u64)tok * n_heads + h) * head_dim + d] * scale;
    }
    __syncthreads();
    float m[ATT_ROWS], l[ATT_ROWS], o[ATT_ROWS][D];
#pragma unroll
    for (int i = 0; i < ATT_ROWS; i++) {
        m[i] = -INFINITY;
        l[i] = 0.0f;
#pragma unroll
        for (int c = 0; c < D; c++) o[i][c] = 0.0f;
    }
    int end = seg.z + t1;  // keys the last row sees
    int nblocks = (end + BLOCK_TOKENS - 1) / BLOCK_TOKENS;
    // Blocks wholly before the first row's window are skipped.
    int first_block = window > 0 ? max(seg.z + t0 + 1 - window, 0) / BLOCK_TOKENS : 0;
    for (int bi = first_block + warp; bi < nblocks; bi += ATT_WARPS) {
        int k0 = bi * BLOCK_TOKENS;
        int kn = min(BLOCK_TOKENS, end - k0);
        u64 base = (u64)tables[seg.w + bi] * BLOCK_TOKENS * kv_dim + (u64)g * head_dim;
        // Lane j: scores of key j against every row.
        float s[ATT_ROWS];
#pragma unroll
        for (int i = 0; i < ATT_ROWS; i++) s[i] = 0.0f;
        if (lane < kn) {
            u64 kb = base + (u64)lane * kv_dim;
            for (int d = 0; d < head_dim; d++) {
                float kd = KV == DT_F32 ? ((const float*)keys)[kb + d]
                                        : (KV == DT_BF16 ? bf16_to_f32(((const u16*)keys)[kb + d])
                                                         : f16_to_f32(((const u16*)keys)[kb + d]));
#pragma unroll
                for (int i = 0; i < ATT_ROWS; i++)
                    if (i < rows) s[i] = s[i] + qs[i * head_dim + d] * kd;
            }
        }
        // Online softmax per row; masked keys get no weight.
        float p[ATT_ROWS];
#pragma unroll
        for (int i = 0; i < ATT_ROWS; i++) {
            p[i] = 0.0f;
            if (i >= rows) continue;
            int visible = seg.z + t0 + i / heads + 1;
            int valid = min(kn, max(visible - k0, 0));
            int lo = window > 0 ? min(max(visible - window - k0, 0), valid) : 0;
            if (lo == valid) continue;
            bool in = lane >= lo && lane < valid;
            float tile_max = warp_max_f(in ? s[i] : -INFINITY);
            float new_max = fmaxf(m[i], tile_max);
            float alpha = expf(m[i] - new_max);
            float e = in ? expf(s[i] - new_max) : 0.0f;
            float sum = warp_sum_f(e);
            p[i] = e;
            l[i] = l[i] * alpha + sum;
            m[i] = new_max;
#pragma unroll
            for (int c = 0; c < D; c++) o[i][c] = o[i][c] * alpha;
        }
        // o += P V: lane holds dims lane + 32c.
        for (int j = 0; j < kn; j++) {
            u64 vb = base + (u64)j * kv_dim;
            float vd[D];
#pragma unroll
            for (int c = 0; c < D; c++) {
                int d = lane + 32 * c;
                vd[c] = 0.0f;
                if (d < head_dim)
                    vd[c] = KV == DT_F32 ? ((const float*)values)[vb + d]
                                         : (KV == DT_BF16 ? bf16_to_f32(((const u16*)values)[vb + d])
                                                          : f16_to_f32(((const u16*)values)[vb + d]));
            }
#pragma unroll
            for (int i = 0; i < ATT_ROWS; i++) {
                if (i >= rows) continue;
                float pij = __shfl_sync(0xffffffffu, p[i], j);
#pragma unroll
                for (int c = 0; c < D; c++) o[i][c] = o[i][c] + pij * vd[c];
            }
        }
    }
    // Merge the warps' states.
#pragma unroll
    for (int i = 0; i < ATT_ROWS; i++) {
        if (i >= rows) continue;
        if (lane == 0) {
            wm[warp * ATT_ROWS + i] = m[i];
            wl[warp * ATT_ROWS + i] = l[i];
        }
#pragma unroll
        for (int c = 0; c < D; c++) {
            int d = lane + 32 * c;
            if (d < head_dim) wo[((u64)warp * ATT_ROWS + i) * head_dim + d] = o[i][c];
        }
    }
    __syncthreads();
    for (int e = threadIdx.x; e < rows * head_dim; e += blockDim.x) {
        int i = e / head_dim, d = e % head_dim;
        float mx = -INFINITY;
        for (int w = 0; w < ATT_WARPS; w++) mx = fmaxf(mx, wm[w * ATT_ROWS + i]);
        float sum = 0.0f, acc = 0.0f;
        for (int w = 0; w < ATT_WARPS; w++) {
            float mw = wm[w * ATT_ROWS + i];
            if (mw == -INFINITY) continue;
            float f = expf(mw - mx);
            sum = sum + wl[w * ATT_ROWS + i] * f;
            acc = acc + wo[((u64)w * ATT_ROWS + i) * head_dim + d] * f;
        }
        int tok = seg.x + t0 + i / heads, h = head0 + i % heads;
        out[((u64)tok * n_heads + h) * head_dim + d] = acc / sum;
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
