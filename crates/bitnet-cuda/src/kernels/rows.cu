// Row-wise operations: one block per row (token) unless said otherwise.
// Each names the bitnet-core / bitnet-quant function it must equal.

#define QUANT_EPS 1e-5f

// CpuBackend::embedding: out[t] = table[ids[t]] widened to f32.
extern "C" __global__ void embedding(const void* table, int dtype, const u32* ids, int cols, float* out) {
    pdl_enter();
    int t = blockIdx.x;
    u64 base = (u64)ids[t] * cols;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) out[(u64)t * cols + c] = load_elem(table, dtype, base + c);
}

// CpuBackend::gather_rows: out[t] = x[rows[t]].
extern "C" __global__ void gather_rows(const float* x, const u32* rows, int width, float* out) {
    pdl_enter();
    int t = blockIdx.x;
    const float* src = x + (u64)rows[t] * width;
    for (int c = threadIdx.x; c < width; c += blockDim.x) out[(u64)t * width + c] = src[c];
}

// ops::inverse_rms from the square sum (in f64) of a row: 1 / sqrt(mean(x^2) + eps).
__device__ __forceinline__ float inverse_rms_of(double square_sum, int width, float eps) {
    float mean_sq = (float)(square_sum / (double)width);
    return 1.0f / sqrtf(mean_sq + eps);
}

// ops::inverse_rms over the block, reading x once per element.
__device__ float inverse_rms(const float* x, int width, float eps, double* scratch) {
    double s = 0.0;
    for (int c = threadIdx.x; c < width; c += blockDim.x) s += (double)x[c] * (double)x[c];
    return inverse_rms_of(block_sum_d(s, scratch), width, eps);
}

// Decoding runs these kernels on one row at a time, one block, so their time is memory
// latency: a loop that loads one element per iteration pays a round trip per iteration and
// per pass. A row of up to ROW_CACHE * blockDim.x values is therefore loaded once into
// registers, every load of a thread in flight together, and the passes (square sum, max,
// quantize) run on the registers; longer rows take the loops that recompute each value.
#define ROW_CACHE 8

// v[k] = value(threadIdx.x + k * blockDim.x), 0 past the row.
template <typename F>
__device__ __forceinline__ void cache_row(F value, int width, float (&v)[ROW_CACHE]) {
#pragma unroll
    for (int k = 0; k < ROW_CACHE; k++) {
        int c = threadIdx.x + k * blockDim.x;
        v[k] = c < width ? value(c) : 0.0f;
    }
}

__device__ __forceinline__ bool row_fits_cache(int width) { return width <= ROW_CACHE * (int)blockDim.x; }

// The block's f64 square sum of a cached row.
__device__ __forceinline__ double cached_square_sum(const float (&v)[ROW_CACHE], int width, double* scratch) {
    double s = 0.0;
#pragma unroll
    for (int k = 0; k < ROW_CACHE; k++)
        if (threadIdx.x + k * blockDim.x < width) s += (double)v[k] * (double)v[k];
    return block_sum_d(s, scratch);
}

// ops::rmsnorm_row on a cached row: v = g * (v * inv), or v * inv without a gain.
__device__ __forceinline__ void normalize_cached(float (&v)[ROW_CACHE], int width, float inv, const float* gain) {
#pragma unroll
    for (int k = 0; k < ROW_CACHE; k++) {
        int c = threadIdx.x + k * blockDim.x;
        if (c < width) v[k] = gain ? gain[c] * (v[k] * inv) : v[k] * inv;
    }
}

// ops::rmsnorm_row: out = g * (x * inv), or x * inv without a gain.
extern "C" __global__ void __launch_bounds__(1024) rmsnorm(const float* x, const float* gain, int width, float eps,
                                                           float* out) {
    pdl_enter();
    __shared__ double scratch[32];
    int t = blockIdx.x;
    const float* xr = x + (u64)t * width;
    if (row_fits_cache(width)) {
        float v[ROW_CACHE];
        cache_row([&](int c) { return xr[c]; }, width, v);
        normalize_cached(v, width, inverse_rms_of(cached_square_sum(v, width, scratch), width, eps), gain);
#pragma unroll
        for (int k = 0; k < ROW_CACHE; k++) {
            int c = threadIdx.x + k * blockDim.x;
            if (c < width) out[(u64)t * width + c] = v[k];
        }
        return;
    }
    float inv = inverse_rms(xr, width, eps, scratch);
    for (int c = threadIdx.x; c < width; c += blockDim.x) {
        float v = xr[c] * inv;
        out[(u64)t * width + c] = gain ? gain[c] * v : v;
    }
}

// quantize_activation_row on `width` values that `value(c)` yields (recomputed, never stored):
// s_a = 127 / max(max|x|, 1e-5), q = round_half_even(x * s_a), and the row's code sum.
template <typename F>
__device__ void quantize_values(F value, int width, i8* q, float* scale, int* sum, float* fscratch, int* iscratch) {
    float amax = 0.0f;
    for (int c = threadIdx.x; c < width; c += blockDim.x) amax = fmaxf(amax, fabsf(value(c)));
    amax = block_max_f(amax, fscratch);
    float s = 127.0f / fmaxf(amax, QUANT_EPS);
    int total = 0;
    for (int c = threadIdx.x; c < width; c += blockDim.x) {
        int v = round_to_i8(value(c) * s);
        q[c] = (i8)v;
        total += v;
    }
    total = block_sum_i(total, iscratch);
    if (threadIdx.x == 0) {
        *scale = s;
        *sum = total;
    }
}

// quantize_values on a cached row.
__device__ __forceinline__ void quantize_cached(const float (&v)[ROW_CACHE], int width, i8* q, float* scale, int* sum,
                                float* fscratch, int* iscratch) {
    float amax = 0.0f;
#pragma unroll
    for (int k = 0; k < ROW_CACHE; k++)
        if (threadIdx.x + k * blockDim.x < width) amax = fmaxf(amax, fabsf(v[k]));
    amax = block_max_f(amax, fscratch);
    float s = 127.0f / fmaxf(amax, QUANT_EPS);
    int total = 0;
#pragma unroll
    for (int k = 0; k < ROW_CACHE; k++) {
        int c = threadIdx.x + k * blockDim.x;
        if (c < width) {
            int r = round_to_i8(v[k] * s);
            q[c] = (i8)r;
            total += r;
        }
    }
    total = block_sum_i(total, iscratch);
    if (threadIdx.x == 0) {
        *scale = s;
        *sum = total;
    }
}

// QuantizedActivations::quantize of rows first..first+rows (block t quantizes row first + t
// into token t). Codes go to q[t * stride ..]; the padding past `width` stays zero.
extern "C" __global__ void __launch_bounds__(1024) quantize(const float* x, int first, int width, int stride, i8* q,
                                                            float* scales, int* sums) {
    pdl_enter();
    __shared__ float fs[32];
    __shared__ int is[32];
    int t = blockIdx.x;
    const float* xr = x + (u64)(first + t) * width;
    if (row_fits_cache(width)) {
        float v[ROW_CACHE];
        cache_row([&](int c) { return xr[c]; }, width, v);
        quantize_cached(v, width, q + (u64)t * stride, scales + t, sums + t, fs, is);
        return;
    }
    quantize_values([&](int c) { return xr[c]; }, width, q + (u64)t * stride, scales + t, sums + t, fs, is);
}

// CpuBackend::norm_quantize: rmsnorm_row straight into the quantizer. With `y`, the residual
// add first (CpuBackend::add_norm_quantize: x += y, written back, then normed): the sum is
// made as the row is read.
extern "C" __global__ void __launch_bounds__(1024) norm_quantize(float* x, const float* y, const float* gain,
                                                                 int width, float eps, int stride, i8* q,
                                                                 float* scales, int* sums) {
    pdl_enter();
    __shared__ double ds[32];
    __shared__ float fs[32];
    __shared__ int is[32];
    int t = blockIdx.x;
    float* xr = x + (u64)t * width;
    const float* yr = y ? y + (u64)t * width : nullptr;
    if (row_fits_cache(width)) {
        float v[ROW_CACHE];
        if (yr) {
            // Both rows' loads in flight together, then the sum written back.
            cache_row([&](int c) { return xr[c] + yr[c]; }, width, v);
#pragma unroll
            for (int k = 0; k < ROW_CACHE; k++) {
                int c = threadIdx.x + k * blockDim.x;
                if (c < width) xr[c] = v[k];
            }
        } else {
            cache_row([&](int c) { return xr[c]; }, width, v);
        }
        normalize_cached(v, width, inverse_rms_of(cached_square_sum(v, width, ds), width, eps), gain);
        quantize_cached(v, width, q + (u64)t * stride, scales + t, sums + t, fs, is);
        return;
    }
    if (yr) {
        for (int c = threadIdx.x; c < width; c += blockDim.x) xr[c] = xr[c] + yr[c];
        __syncthreads();  // the sums, written by other threads, are read below
    }
    float inv = inverse_rms(xr, width, eps, ds);
    auto value = [&](int c) {
        float v = xr[c] * inv;
        return gain ? gain[c] * v : v;
    };
    quantize_values(value, width, q + (u64)t * stride, scales + t, sums + t, fs, is);
}

// ops::relu2_mul / ops::silu_mul / ops::gelu_tanh_mul of one value.
__device__ __forceinline__ float gated(int act, float g, float u) {
    if (act == 0) {
        float r = fmaxf(g, 0.0f);
        return r * r * u;
    }
    if (act == 2) {
        float inner = 0.7978846f * (g + 0.044715f * g * g * g);
        return 0.5f * g * (1.0f + tanhf(inner)) * u;
    }
    return g / (1.0f + expf(-g)) * u;
}

// CpuBackend::gate_quantize: act(gate) * up, through rmsnorm_row_in_place with the sub-norm
// gain when there is one, into the quantizer. act 0 is ReLU^2, 1 is SiLU, 2 is tanh GELU.
extern "C" __global__ void __launch_bounds__(1024) gate_quantize(int act, const float* gate, const float* up,
                                                                 const float* sub_norm, int width, float eps,
                                                                 int stride, i8* q, float* scales, int* sums) {
    pdl_enter();
    __shared__ double ds[32];
    __shared__ float fs[32];
    __shared__ int is[32];
    int t = blockIdx.x;
    const float* g = gate + (u64)t * width;
    const float* u = up + (u64)t * width;
    if (row_fits_cache(width)) {
        float v[ROW_CACHE];
        cache_row([&](int c) { return gated(act, g[c], u[c]); }, width, v);
        if (sub_norm) normalize_cached(v, width, inverse_rms_of(cached_square_sum(v, width, ds), width, eps), sub_norm);
        quantize_cached(v, width, q + (u64)t * stride, scales + t, sums + t, fs, is);
        return;
    }
    float inv = 1.0f;
    if (sub_norm) {
        double s = 0.0;
        for (int c = threadIdx.x; c < width; c += blockDim.x) {
            double y = (double)gated(act, g[c], u[c]);
            s += y * y;
        }
        inv = inverse_rms_of(block_sum_d(s, ds), width, eps);
    }
    auto value = [&](int c) {
        float y = gated(act, g[c], u[c]);
        return sub_norm ? sub_norm[c] * (y * inv) : y;
    };
    quantize_values(value, width, q + (u64)t * stride, scales + t, sums + t, fs, is);
}

// CpuBackend::gate over `len` values (grid-stride).
extern "C" __global__ void gate(int act, const float* g, const float* u, u64 len, float* out) {
    pdl_enter();
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < len; i += (u64)gridDim.x * blockDim.x)
        out[i] = gated(act, g[i], u[i]);
}

// ops::add_assign: x += y over `len` values.
extern "C" __global__ void add(float* x, const float* y, u64 len) {
    pdl_enter();
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < len; i += (u64)gridDim.x * blockDim.x)
        x[i] = x[i] + y[i];
}

// ops::scale: x *= factor over `len` values.
extern "C" __global__ void scale(float* x, float factor, u64 len) {
    pdl_enter();
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < len; i += (u64)gridDim.x * blockDim.x)
        x[i] = x[i] * factor;
}

// QuantizedActivations::set_int8's sums: the code sum of each loaded row.
extern "C" __global__ void row_sums(const i8* q, int width, int stride, int* sums) {
    pdl_enter();
    __shared__ int is[32];
    int t = blockIdx.x;
    int total = 0;
    for (int c = threadIdx.x; c < width; c += blockDim.x) total += q[(u64)t * stride + c];
    total = block_sum_i(total, is);
    if (threadIdx.x == 0) sums[t] = total;
}

// sampling::argmax of each row: the first index of the row's largest value, NaNs never chosen
// (`v > best` is false for them), index 0 when nothing beats element 0 (so a row starting with
// NaN, or all -inf or NaN, gives 0, as the host scan does). Block per row; each thread keeps
// the first best of its strided elements, then the block keeps the largest value and, among
// equal values, the lowest index.
__device__ __forceinline__ void keep_first_max(float& v, int& i, float ov, int oi) {
    if (ov > v || (ov == v && oi < i)) {
        v = ov;
        i = oi;
    }
}

#define NO_INDEX 0x7fffffff

extern "C" __global__ void argmax_rows(const float* x, int width, u32* out) {
    pdl_enter();
    __shared__ float vs[32];
    __shared__ int is[32];
    const float* row = x + (u64)blockIdx.x * width;
    float best = -INFINITY;
    int at = NO_INDEX;
    for (int c = threadIdx.x; c < width; c += blockDim.x) {
        float v = row[c];
        if (v > best) {  // strided in increasing order: the first of equal values stays
            best = v;
            at = c;
        }
    }
    for (int o = 16; o > 0; o >>= 1) keep_first_max(best, at, __shfl_xor_sync(0xffffffffu, best, o), __shfl_xor_sync(0xffffffffu, at, o));
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, warps = blockDim.x >> 5;
    if (lane == 0) {
        vs[warp] = best;
        is[warp] = at;
    }
    __syncthreads();
    if (warp == 0) {
        best = lane < warps ? vs[lane] : -INFINITY;
        at = lane < warps ? is[lane] : NO_INDEX;
        for (int o = 16; o > 0; o >>= 1) keep_first_max(best, at, __shfl_xor_sync(0xffffffffu, best, o), __shfl_xor_sync(0xffffffffu, at, o));
        if (lane == 0) {
            // Nothing above -inf, or element 0 is NaN (nothing compares above it): index 0.
            out[blockIdx.x] = at == NO_INDEX || row[0] != row[0] ? 0u : (u32)at;
        }
    }
}
