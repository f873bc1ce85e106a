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
// one layer's store (element type `kv_type`); thread per (row, kv head, pair).
extern "C" __global__ void rope_kv_store(void* keys, void* values, int kv_type, const float* k, const float* v,
                                         const u32* positions, const u32* slots, const float* inv_freq, int rows,
                                         int n_kv_heads, int head_dim) {
    int half = head_dim / 2, kv_dim = n_kv_heads * head_dim;
    u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (u64)rows * n_kv_heads * half) return;
    int p = (int)(i % half);
    u64 rh = i / half;
    int t = (int)(rh / n_kv_heads), h = (int)(rh % n_kv_heads);
    u64 src = (u64)t * kv_dim + (u64)h * head_dim;
    u64 dst = (u64)slots[t] * kv_dim + (u64)h * head_dim;
    float lo, hi;
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
