// luspo-rs CUDA kernels: the fused policy loss and verl's agg_loss.
//
// Compiled at run time by NVRTC for the device's architecture (see
// src/cuda/mod.rs); no CUDA headers are included, so the source compiles with
// any NVRTC (11.2+) without an include path.
//
// Semantics mirror src/cpu/policy_loss.rs and src/cpu/agg.rs token for token
// (torch's clamp / maximum / minimum gradient conventions, the same NaN
// rules). The only difference is where the global aggregation scale goes:
// the row kernels write `d loss / d x` divided by the batch-wide factor
// `scale` (dp / N, dp / G, ...) because that factor needs every row; the
// finalize kernel computes `scale` into out[4] and the backward multiplies
// by it (it multiplies by grad_output anyway, so this costs nothing).
//
// Determinism: every sum has a fixed order. A block owns a row; each thread
// sums a fixed strided subset of the row, then a fixed shuffle tree and a
// fixed cross-warp tree combine them. Row partials go to a (rows, 5) float64
// scratch buffer; one block then reduces the rows in a fixed order. No
// atomics anywhere.

typedef long long i64;
typedef unsigned long long u64;

// Element types; the codes match `DType` in src/cuda/mod.rs.
enum { DT_F64 = 0, DT_F32 = 1, DT_BF16 = 2, DT_F16 = 3, DT_U8 = 4, DT_I8 = 5, DT_I16 = 6, DT_I32 = 7, DT_I64 = 8 };
// Loss modes and aggregation modes; the codes match src/cuda/mod.rs.
enum { MODE_VANILLA = 0, MODE_GSPO = 1, MODE_LUSPO = 2 };
enum { AGG_TOKEN_MEAN = 0, AGG_TOKEN_SUM = 1, AGG_SEQ_SUM = 2, AGG_SEQ_MEAN = 3, AGG_SEQ_SUM_NORM = 4 };

// Row partials, in this order, NSTAT per row of the scratch buffer.
enum { S_LOSS = 0, S_TOKENS = 1, S_CLIPPED = 2, S_KL = 3, S_LOWER = 4, NSTAT = 5 };

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

struct PolicyArgs {
    View old_lp, lp, adv, mask, w;  // w.ptr == 0: no rollout IS weights
    ViewMut grad;
    double *partials;               // (rows, NSTAT) float64, contiguous
    i64 rows, cols, mode, agg;
    double lo, hi, c;               // clip bounds [1 - low, 1 + high], dual-clip c
    i64 clamp_closed;               // 1: clamp passes the gradient on its bounds too (torch < 2.15)
};

struct AggArgs {
    View loss, mask;
    ViewMut grad;
    double *partials;
    i64 rows, cols, agg;
};

struct FinalizeArgs {
    const double *partials;
    double *out;                    // [loss, pg_clipfrac, ppo_kl, pg_clipfrac_lower, scale]
    i64 rows, cols, agg;
    double dp_size;
    double batch_num_tokens;        // <= 0: use the batch's own sum(mask)
    double global_batch_size;       // <= 0: use the batch's rows with L_i > 0
    double loss_scale_factor;       // <= 0: use cols
};

// ---- element conversion (no cuda_fp16.h / cuda_bf16.h needed) ----

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
__device__ __forceinline__ unsigned short f64_to_f16(double d) {
    unsigned short h;
    asm("{ cvt.rn.f16.f64 %0, %1; }" : "=h"(h) : "d"(d));
    return h;
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
    case DT_F64: return (F)((const double *)p)[k];
    case DT_F32: return (F)((const float *)p)[k];
    case DT_BF16: return (F)bf16_to_f32(((const unsigned short *)p)[k]);
    case DT_F16: return (F)f16_to_f32(((const unsigned short *)p)[k]);
    case DT_U8: return (F)((const unsigned char *)p)[k];
    case DT_I8: return (F)((const signed char *)p)[k];
    case DT_I16: return (F)((const short *)p)[k];
    case DT_I32: return (F)(double)((const int *)p)[k];
    default: return (F)(double)((const i64 *)p)[k];
    }
}

template <typename F>
__device__ __forceinline__ void store(const ViewMut &v, i64 i, i64 t, F x) {
    char *p = v.ptr;
    i64 k = i * v.rs + t * v.cs;
    switch (v.dtype) {
    case DT_F64: ((double *)p)[k] = (double)x; break;
    case DT_F32: ((float *)p)[k] = (float)x; break;
    case DT_BF16:
        ((unsigned short *)p)[k] = sizeof(F) == 8 ? f64_to_bf16((double)x) : f32_to_bf16((float)x);
        break;
    default:
        ((unsigned short *)p)[k] = sizeof(F) == 8 ? f64_to_f16((double)x) : f32_to_f16((float)x);
        break;
    }
}

// ---- torch's clamp / maximum / minimum with their gradients ----

template <typename F> __device__ __forceinline__ F nan_of() { return cvt<F>(__longlong_as_double(0x7ff8000000000000LL)); }

// clamp(x, lo, hi); *pass: the gradient passes: strictly inside the bounds
// (torch >= 2.15), or on the closed interval when `closed` (older torch);
// never for NaN.
template <typename F>
__device__ __forceinline__ F clampg(F x, F lo, F hi, bool closed, bool *pass) {
    if (x < lo) { *pass = false; return lo; }
    if (x > hi) { *pass = false; return hi; }
    *pass = closed ? (x >= lo && x <= hi) : (x > lo && x < hi);
    return x;
}

template <typename F>
__device__ __forceinline__ F maximumg(F a, F da, F b, F db, F *d) {
    if (a > b) { *d = da; return a; }
    if (b > a) { *d = db; return b; }
    if (a == b) { *d = (da + db) * cvt<F>(0.5); return a; }
    *d = da + db;
    return nan_of<F>();
}

template <typename F>
__device__ __forceinline__ F minimumg(F a, F da, F b, F db, F *d) {
    if (a < b) { *d = da; return a; }
    if (b < a) { *d = db; return b; }
    if (a == b) { *d = (da + db) * cvt<F>(0.5); return a; }
    *d = da + db;
    return nan_of<F>();
}

__device__ __forceinline__ float expg(float x) { return expf(x); }
__device__ __forceinline__ double expg(double x) { return exp(x); }

// max(-A r, -A clip(r)); returns the loss, writes its derivative and the clip flag.
template <typename F>
__device__ __forceinline__ F clipped_surrogate(F a, F r, F dr, F lo, F hi, bool closed, F *dl, bool *clipped) {
    F na = -a;
    F pl1 = na * r;
    bool pass;
    F rc = clampg(r, lo, hi, closed, &pass);
    F pl2 = na * rc;
    F l = maximumg(pl1, na * dr, pl2, pass ? na * dr : cvt<F>(0.0), dl);
    *clipped = pl2 > pl1;
    return l;
}

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

// The row's share of the aggregation, relative to the batch-wide scale
// (spec.rs AggPlan::row_coef divided by AggPlan's scale).
__device__ __forceinline__ double row_rel(i64 agg, double tokens) {
    if (agg == AGG_TOKEN_MEAN || agg == AGG_TOKEN_SUM) return 1.0;
    if (tokens <= 0.0) return 0.0;
    if (agg == AGG_SEQ_MEAN) return 1.0 / (tokens + 1e-8);
    return 1.0;
}

// ---- the fused policy loss: one block per row ----

template <typename F>
__device__ void policy_rows(const PolicyArgs &a) {
    const i64 i = blockIdx.x, T = a.cols;
    const bool seq_mode = !(a.agg == AGG_TOKEN_MEAN || a.agg == AGG_TOKEN_SUM);
    const bool gspo = a.mode != MODE_VANILLA;
    const F lo = cvt<F>(a.lo), hi = cvt<F>(a.hi), c = cvt<F>(a.c), zero = cvt<F>(0.0);

    // Pass 1: L_i = sum(m), and for GSPO/LUSPO sum((lp - old) * m) (a plain
    // product, as verl, so NaN propagates from masked positions too).
    double r1[2] = {0.0, 0.0};
    for (i64 t = threadIdx.x; t < T; t += blockDim.x) {
        F m = load<F>(a.mask, i, t);
        r1[0] += (double)m;
        if (gspo) r1[1] += (double)((load<F>(a.lp, i, t) - load<F>(a.old_lp, i, t)) * m);
    }
    block_sum<2>(r1);
    const double tokens = r1[0];
    const F rel = cvt<F>(row_rel(a.agg, tokens));

    // GSPO / LUSPO sequence ratio s_i = exp(min(log s_i, 10)) and its derivative.
    F sr = zero, dsr = zero;
    if (gspo) {
        F log_s = cvt<F>(r1[1] / fmax(tokens, 1.0));
        bool pass;
        F x = clampg(log_s, cvt<F>(-__longlong_as_double(0x7ff0000000000000LL)), cvt<F>(10.0), a.clamp_closed != 0, &pass);
        sr = expg(x);
        dsr = pass ? sr : zero;
    }

    // Pass 2: token losses, metrics, gradient.
    double s[4] = {0.0, 0.0, 0.0, 0.0};  // loss, clipped, kl, lower
    for (i64 t = threadIdx.x; t < T; t += blockDim.x) {
        F old = load<F>(a.old_lp, i, t), lp = load<F>(a.lp, i, t), A = load<F>(a.adv, i, t);
        F m = load<F>(a.mask, i, t);
        F loss, dloss, d;
        bool clipped, lower = false;
        if (!gspo) {
            bool pass;
            d = clampg(lp - old, cvt<F>(-20.0), cvt<F>(20.0), a.clamp_closed != 0, &pass);
            F r = expg(d);
            F dl1;
            F l1 = clipped_surrogate(A, r, pass ? r : zero, lo, hi, a.clamp_closed != 0, &dl1, &clipped);
            F pl3 = -A * c;
            lower = l1 > pl3 && A < zero;
            if (A < zero) loss = minimumg(pl3, zero, l1, dl1, &dloss);
            else { loss = l1; dloss = dl1; }
        } else {
            // lp - sg(lp) is 0 for finite lp and NaN otherwise, as in torch.
            F z = lp - lp;
            F r = z == zero ? sr : nan_of<F>(), dr = z == zero ? dsr : nan_of<F>();
            loss = clipped_surrogate(A, r, dr, lo, hi, a.clamp_closed != 0, &dloss, &clipped);
            d = lp - old;
        }
        if (a.w.ptr) {
            F w = load<F>(a.w, i, t);
            loss = loss * w;
            dloss = dloss * w;
        }
        F g;
        if (m != zero) {
            s[0] += (double)(loss * m);
            s[2] -= (double)(d * m);
            if (clipped) s[1] += (double)m;
            if (lower) s[3] += (double)m;
            g = rel * m * dloss;
        } else {
            if (seq_mode) s[0] += (double)(loss * m);
            g = zero;
        }
        store<F>(a.grad, i, t, g);
    }
    block_sum<4>(s);
    if (threadIdx.x == 0) {
        double *p = a.partials + i * NSTAT;
        p[S_LOSS] = s[0];
        p[S_TOKENS] = tokens;
        p[S_CLIPPED] = s[1];
        p[S_KL] = s[2];
        p[S_LOWER] = s[3];
    }
}

extern "C" __global__ void luspo_policy_rows_f32(PolicyArgs a) { policy_rows<float>(a); }
extern "C" __global__ void luspo_policy_rows_f64(PolicyArgs a) { policy_rows<double>(a); }

// ---- verl's agg_loss: one block per row ----

template <typename F>
__device__ void agg_rows(const AggArgs &a) {
    const i64 i = blockIdx.x, T = a.cols;
    const bool seq_mode = !(a.agg == AGG_TOKEN_MEAN || a.agg == AGG_TOKEN_SUM);
    const F zero = cvt<F>(0.0);
    double r1[1] = {0.0};
    for (i64 t = threadIdx.x; t < T; t += blockDim.x) r1[0] += (double)load<F>(a.mask, i, t);
    block_sum<1>(r1);
    const double tokens = r1[0];
    const F rel = cvt<F>(row_rel(a.agg, tokens));
    double s[1] = {0.0};
    for (i64 t = threadIdx.x; t < T; t += blockDim.x) {
        F l = load<F>(a.loss, i, t), m = load<F>(a.mask, i, t);
        if (m != zero || seq_mode) s[0] += (double)(l * m);
        store<F>(a.grad, i, t, m != zero ? rel * m : zero);
    }
    block_sum<1>(s);
    if (threadIdx.x == 0) {
        double *p = a.partials + i * NSTAT;
        p[S_LOSS] = s[0];
        p[S_TOKENS] = tokens;
        p[S_CLIPPED] = 0.0;
        p[S_KL] = 0.0;
        p[S_LOWER] = 0.0;
    }
}

extern "C" __global__ void luspo_agg_rows_f32(AggArgs a) { agg_rows<float>(a); }
extern "C" __global__ void luspo_agg_rows_f64(AggArgs a) { agg_rows<double>(a); }

// ---- the batch reduction: one block, rows in a fixed order ----

extern "C" __global__ void luspo_finalize(FinalizeArgs a) {
    const bool seq_mode = !(a.agg == AGG_TOKEN_MEAN || a.agg == AGG_TOKEN_SUM);
    // loss (relative), tokens, rows with L > 0, clipped, kl, lower
    double v[6] = {0.0, 0.0, 0.0, 0.0, 0.0, 0.0};
    for (i64 i = threadIdx.x; i < a.rows; i += blockDim.x) {
        const double *p = a.partials + i * NSTAT;
        double L = p[S_TOKENS];
        v[0] += (seq_mode && L <= 0.0) ? 0.0 : row_rel(a.agg, L) * p[S_LOSS];
        v[1] += L;
        v[2] += L > 0.0 ? 1.0 : 0.0;
        v[3] += p[S_CLIPPED];
        v[4] += p[S_KL];
        v[5] += p[S_LOWER];
    }
    block_sum<6>(v);
    if (threadIdx.x == 0) {
        double n = a.batch_num_tokens > 0.0 ? a.batch_num_tokens : v[1];
        double g = a.global_batch_size > 0.0 ? a.global_batch_size : v[2];
        double lsf = a.loss_scale_factor > 0.0 ? a.loss_scale_factor : (double)a.cols;
        double scale;
        switch (a.agg) {
        case AGG_TOKEN_MEAN: scale = a.dp_size / n; break;
        case AGG_TOKEN_SUM: scale = a.dp_size; break;
        case AGG_SEQ_SUM_NORM: scale = a.dp_size / g / lsf; break;
        default: scale = a.dp_size / g; break;
        }
        double denom = v[1] + 1e-8;  // verl's masked_mean
        a.out[0] = scale * v[0];
        a.out[1] = v[3] / denom;
        a.out[2] = v[4] / denom;
        a.out[3] = v[5] / denom;
        a.out[4] = scale;
    }
}
