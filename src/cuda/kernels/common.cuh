// Shared by every kernel source: integer and float types, strided views,
// element conversion and loads / stores by dtype, torch's clamp / maximum /
// minimum with their gradients, and the fixed-order reductions.
//
// The kernels are compiled at run time by NVRTC for the device's
// architecture (src/cuda/runtime.rs) from one translation unit: the
// constants shared with Rust (src/ops/abi.rs, emitted as a prelude), this
// file, then loss.cu, kl_penalty.cu and advantage.cu. No CUDA header is
// included, so the source compiles with any NVRTC (11.2+) without an
// include path.
//
// The same translation unit also runs on the simulator (src/cuda/sim/): its
// emulation header, put in front, defines LUSPO_RS_SIM, the host versions of
// what is inline PTX here, and GLOBAL(p), which checks every global-memory
// access against the launch's buffers. On the GPU GLOBAL(p) is p itself, so
// every load and store of global memory is written `*GLOBAL(ptr)`.
//
// Determinism: every sum has a fixed order that depends on the shapes and
// dtypes only (see block_sum and team_sum). The only atomics are integer
// tickets that pick which block does a batch-wide sum; that block sums the
// rows in index order.

#ifndef GLOBAL
#define GLOBAL(p) (p)
#endif

typedef long long i64;
typedef unsigned long long u64;

// A strided (rows, cols) view; `cs == 0` broadcasts one value per row.
struct View {
    const char *ptr;
    i64 rs;
    i64 cs;
    i64 dtype;
};

// A writable strided float view.
struct ViewMut {
    char *ptr;
    i64 rs;
    i64 cs;
    i64 dtype;
};

// ---- element conversion (no cuda_fp16.h / cuda_bf16.h needed) ----

#ifndef LUSPO_RS_SIM  // the simulator defines the f16 conversions on the host
__device__ __forceinline__ float f16_to_f32(unsigned short h) {
    float f;
    asm("{ cvt.f32.f16 %0, %1; }" : "=f"(f) : "h"(h));
    return f;
}
__device__ __forceinline__ unsigned short f32_to_f16(float f) {
    unsigned short h;
    asm("{ cvt.rn.f16.f32 %0, %1; }" : "=h"(h) : "f"(f));
    return h;
}
__device__ __forceinline__ unsigned short f64_to_f16(double d) {
    unsigned short h;
    asm("{ cvt.rn.f16.f64 %0, %1; }" : "=h"(h) : "d"(d));
    return h;
}
#endif
__device__ __forceinline__ float bf16_to_f32(unsigned short b) {
    return __uint_as_float(((unsigned int)b) << 16);
}
// Round to nearest even, NaN kept quiet (as torch / the half crate do).
__device__ __forceinline__ unsigned short f32_to_bf16(float f) {
    unsigned int u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (unsigned short)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (unsigned short)(u >> 16);
}
__device__ __forceinline__ unsigned short f64_to_bf16(double d) {
    // Through f32 would round twice; bf16 has 8 exponent bits like f32, so a
    // round-to-odd f32 then RNE to bf16 is exact. __double2float_ro is not in
    // PTX for all targets, so emulate: truncate and set the sticky bit.
    float f = (float)d;
    double back = (double)f;
    if (back != d && f == f) {
        unsigned int u = __float_as_uint(f);
        // move toward zero if rounding went away from zero, then mark inexact
        if ((back > d) == (d > 0.0)) u -= 1u;
        u |= 1u;
        f = __uint_as_float(u);
    }
    return f32_to_bf16(f);
}
template <typename F> __device__ __forceinline__ F cvt(double v);
template <> __device__ __forceinline__ float cvt<float>(double v) { return (float)v; }
template <> __device__ __forceinline__ double cvt<double>(double v) { return v; }

// Reads element (i, t) of `v` as F. The switch is uniform across a launch.
template <typename F>
__device__ __forceinline__ F load(const View &v, i64 i, i64 t) {
    const char *p = v.ptr;
    i64 k = i * v.rs + t * v.cs;
    switch (v.dtype) {
    case DT_F64: return (F)*GLOBAL((const double *)p + k);
    case DT_F32: return (F)*GLOBAL((const float *)p + k);
    case DT_BF16: return (F)bf16_to_f32(*GLOBAL((const unsigned short *)p + k));
    case DT_F16: return (F)f16_to_f32(*GLOBAL((const unsigned short *)p + k));
    case DT_U8: return (F)*GLOBAL((const unsigned char *)p + k);
    case DT_I8: return (F)*GLOBAL((const signed char *)p + k);
    case DT_I16: return (F)*GLOBAL((const short *)p + k);
    case DT_I32: return (F)(double)*GLOBAL((const int *)p + k);
    default: return (F)(double)*GLOBAL((const i64 *)p + k);
    }
}

template <typename F>
__device__ __forceinline__ void store(const ViewMut &v, i64 i, i64 t, F x) {
    char *p = v.ptr;
    i64 k = i * v.rs + t * v.cs;
    switch (v.dtype) {
    case DT_F64: *GLOBAL((double *)p + k) = (double)x; break;
    case DT_F32: *GLOBAL((float *)p + k) = (float)x; break;
    case DT_BF16:
        *GLOBAL((unsigned short *)p + k) = sizeof(F) == 8 ? f64_to_bf16((double)x) : f32_to_bf16((float)x);
        break;
    default:
        *GLOBAL((unsigned short *)p + k) = sizeof(F) == 8 ? f64_to_f16((double)x) : f32_to_f16((float)x);
        break;
    }
}

// ---- torch's clamp / maximum / minimum with their gradients ----

template <typename F> __device__ __forceinline__ F nan_of() { return cvt<F>(__longlong_as_double(0x7ff8000000000000LL)); }

// clamp(x, lo, hi); *pass: the gradient passes: strictly inside the bounds
// (torch >= 2.15), or on the closed interval when `closed` (older torch);
// never for NaN.
// (Written as selects, not branches: the token kernels' warps never diverge here.)
template <typename F>
__device__ __forceinline__ F clampg(F x, F lo, F hi, bool closed, bool *pass) {
    *pass = closed ? (x >= lo && x <= hi) : (x > lo && x < hi);
    return x < lo ? lo : (x > hi ? hi : x);
}

// torch.maximum(a, b) with its gradient: NaN propagates, ties split it.
template <typename F>
__device__ __forceinline__ F maximumg(F a, F da, F b, F db, F *d) {
    const bool gt = a > b, lt = b > a, eq = a == b;
    *d = gt ? da : (lt ? db : (eq ? (da + db) * cvt<F>(0.5) : da + db));
    return gt ? a : (lt ? b : (eq ? a : nan_of<F>()));
}

// torch.minimum(a, b) with its gradient: NaN propagates, ties split it.
template <typename F>
__device__ __forceinline__ F minimumg(F a, F da, F b, F db, F *d) {
    const bool lt = a < b, gt = b < a, eq = a == b;
    *d = lt ? da : (gt ? db : (eq ? (da + db) * cvt<F>(0.5) : da + db));
    return lt ? a : (gt ? b : (eq ? a : nan_of<F>()));
}

__device__ __forceinline__ float expg(float x) { return expf(x); }
__device__ __forceinline__ double expg(double x) { return exp(x); }
__device__ __forceinline__ float logg(float x) { return logf(x); }
__device__ __forceinline__ double logg(double x) { return log(x); }

// ---- fixed-order block reduction of N doubles ----

// Sums v[0..N) over the block; the result is valid in every thread.
// Order: a shuffle tree inside each warp, then warp 0 sums the warp totals
// with the same tree. Fixed for a given blockDim.
template <int N>
__device__ __forceinline__ void block_sum(double *v) {
    __shared__ double sh[N][32];
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = (blockDim.x + 31) >> 5;
#pragma unroll
    for (int k = 0; k < N; ++k)
        for (int o = 16; o > 0; o >>= 1) v[k] += __shfl_down_sync(0xffffffffu, v[k], o);
    __syncthreads();  // sh may still be read by a previous call
    if (lane == 0)
#pragma unroll
        for (int k = 0; k < N; ++k) sh[k][warp] = v[k];
    __syncthreads();
    if (warp == 0) {
#pragma unroll
        for (int k = 0; k < N; ++k) {
            double x = lane < nwarps ? sh[k][lane] : 0.0;
            for (int o = 16; o > 0; o >>= 1) x += __shfl_down_sync(0xffffffffu, x, o);
            if (lane == 0) sh[k][0] = x;
        }
    }
    __syncthreads();
#pragma unroll
    for (int k = 0; k < N; ++k) v[k] = sh[k][0];
}

// sum + 1e-8 as verl computes it (ops::plus_eps): torch adds the epsilon
// in the mask's float type, float32 for bool / integer masks.
__device__ __forceinline__ double plus_eps(double sum, bool mask_f64) {
    return mask_f64 ? sum + 1e-8 : (double)((float)sum + 1e-8f);
}

// verl's masked_var Bessel factor N / (N - 1) (ops::bessel): float32 unless
// the mask is float64.
__device__ __forceinline__ double bessel(double n, bool mask_f64) {
    const float n32 = (float)n;
    return mask_f64 ? n / (n - 1.0) : (double)(n32 / (n32 - 1.0f));
}

// Sums v[0..N) over each team of `team` threads (a power of two >= 32, the
// teams of a block side by side); the result is valid in every thread of
// the team. Order: a shuffle tree in each warp, then the team's warps in
// index order. Every thread of the block must call it.
template <int N>
__device__ __forceinline__ void team_sum(double *v, int team) {
    __shared__ double sh[N][MAX_THREADS / 32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
    for (int k = 0; k < N; ++k)
        for (int o = 16; o > 0; o >>= 1) v[k] += __shfl_down_sync(0xffffffffu, v[k], o);
    if (team == 32) {
#pragma unroll
        for (int k = 0; k < N; ++k) v[k] = __shfl_sync(0xffffffffu, v[k], 0);
        return;
    }
    __syncthreads();  // sh may still be read by a previous call
    if (lane == 0)
#pragma unroll
        for (int k = 0; k < N; ++k) sh[k][warp] = v[k];
    __syncthreads();
    const int nw = team >> 5, w0 = (threadIdx.x / team) * nw;
#pragma unroll
    for (int k = 0; k < N; ++k) {
        double s = 0.0;
        for (int j = 0; j < nw; ++j) s += sh[k][w0 + j];
        v[k] = s;
    }
}

// Whether this block is the last of the launch to get here (`ticket` counts
// arrivals; the host zeroes it). Every thread's earlier global writes are
// visible to the last block.
__device__ __forceinline__ bool last_block(unsigned int *ticket) {
    __shared__ bool last;
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) last = atomicAdd(ticket, 1u) == gridDim.x - 1;
    __syncthreads();
    if (last) __threadfence();
    return last;
}

