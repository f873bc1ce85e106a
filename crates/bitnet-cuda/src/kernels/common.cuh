// Shared definitions of the bitnet-cuda kernels. Compiled by NVRTC at run time with
// --fmad=false: every float operation rounds on its own, as the CPU reference's do, so that
// the kernels' arithmetic can equal bitnet-core's operation for operation.

typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned char u8;
typedef signed char i8;
typedef unsigned long long u64;

#ifndef INFINITY
#define INFINITY __int_as_float(0x7f800000)
#endif

// Element types of dense tables and of the KV cache.
#define DT_F32 0
#define DT_BF16 1
#define DT_F16 2

__device__ __forceinline__ float bf16_to_f32(u16 b) { return __uint_as_float(((u32)b) << 16); }

__device__ __forceinline__ float f16_to_f32(u16 h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

// Round to nearest even, NaN kept quiet (the `half` crate's bf16::from_f32).
__device__ __forceinline__ u16 f32_to_bf16(float x) {
    u32 b = __float_as_uint(x);
    if ((b & 0x7fffffffu) > 0x7f800000u) return (u16)((b >> 16) | 0x0040u);
    return (u16)((b + 0x7fffu + ((b >> 16) & 1u)) >> 16);
}

__device__ __forceinline__ u16 f32_to_f16(float x) {
    u16 h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(x));
    return h;
}

// Element `i` of a table of type `dtype`, widened to f32.
__device__ __forceinline__ float load_elem(const void* p, int dtype, u64 i) {
    if (dtype == DT_F32) return ((const float*)p)[i];
    u16 b = ((const u16*)p)[i];
    return dtype == DT_BF16 ? bf16_to_f32(b) : f16_to_f32(b);
}

__device__ __forceinline__ void store_elem(void* p, int dtype, u64 i, float v) {
    if (dtype == DT_F32) ((float*)p)[i] = v;
    else ((u16*)p)[i] = dtype == DT_BF16 ? f32_to_bf16(v) : f32_to_f16(v);
}

__device__ __forceinline__ int warp_sum_i(int v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ float warp_sum_f(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ double warp_sum_d(double v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ float warp_max_f(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Block-wide reductions for blocks of up to 1024 threads; `scratch` holds 32 values.
__device__ __forceinline__ double block_sum_d(double v, double* scratch) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = (blockDim.x + 31) >> 5;
    v = warp_sum_d(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    double t = lane < warps ? scratch[lane] : 0.0;
    return warp_sum_d(t);
}
__device__ __forceinline__ float block_max_f(float v, float* scratch) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = (blockDim.x + 31) >> 5;
    v = warp_max_f(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    float t = lane < warps ? scratch[lane] : 0.0f;
    return warp_max_f(t);
}
__device__ __forceinline__ int block_sum_i(int v, int* scratch) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = (blockDim.x + 31) >> 5;
    v = warp_sum_i(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    int t = lane < warps ? scratch[lane] : 0;
    return warp_sum_i(t);
}

// bitnet_quant::quantize: clamp(round_half_even(v), -128, 127), NaN to 0.
__device__ __forceinline__ int round_to_i8(float v) {
    if (v != v) return 0;
    return (int)rintf(fminf(fmaxf(v, -128.0f), 127.0f));
}

// WeightScale::apply / apply_f32: mode 0 multiplies by mean|W|, mode 1 divides by d.
__device__ __forceinline__ float apply_scale(int mode, float scale, float acc, float s_a) {
    return mode == 0 ? (acc / s_a) * scale : acc / (s_a * scale);
}

// Programmatic dependent launch (sm_90+; the host sets the launch attribute only there). Every
// kernel runs this before it reads anything another kernel wrote: wait until the kernel before
// it in the stream has finished and its writes are visible, then let the next kernel be
// scheduled, so that its blocks' launch overlaps this kernel's run instead of following its
// last block. Only reads of constant data (weights) may come before it. Every kernel that
// waits keeps the stream's order transitive: no kernel can finish before the one ahead of it.
__device__ __forceinline__ void pdl_enter() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;\n" ::: "memory");
    asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

// Asks for the cache line holding `p` to be brought into L2 (no register is written).
__device__ __forceinline__ void prefetch_l2(const void* p) { asm volatile("prefetch.global.L2 [%0];\n" ::"l"(p)); }

// 16 bytes from global to shared memory without passing through registers; `full` false
// writes 16 zero bytes instead (src-size 0: `src` is not read).
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool full) {
#if __CUDA_ARCH__ >= 800
    u32 d = (u32)__cvta_generic_to_shared(dst);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(d), "l"(src), "r"(full ? 16 : 0)
                 : "memory");
#endif
}
__device__ __forceinline__ void cp_async_commit() {
#if __CUDA_ARCH__ >= 800
    asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#if __CUDA_ARCH__ >= 800
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}
