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
    i64 mask_f64;                   // the mask is float64 (see plus_eps)
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

// sum + 1e-8 as verl computes it (spec.rs plus_eps): torch adds the epsilon
// in the mask's float type, float32 for bool / integer masks.
__device__ __forceinline__ double plus_eps(double sum, bool mask_f64) {
    return mask_f64 ? sum + 1e-8 : (double)((float)sum + 1e-8f);
}

// The row's share of the aggregation, relative to the batch-wide scale
// (spec.rs AggPlan::row_coef divided by AggPlan's scale).
__device__ __forceinline__ double row_rel(i64 agg, double tokens, bool mask_f64) {
    if (agg == AGG_TOKEN_MEAN || agg == AGG_TOKEN_SUM) return 1.0;
    if (tokens <= 0.0) return 0.0;
    if (agg == AGG_SEQ_MEAN) return 1.0 / plus_eps(tokens, mask_f64);
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
    const F rel = cvt<F>(row_rel(a.agg, tokens, a.mask.dtype == 0));

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
    const F rel = cvt<F>(row_rel(a.agg, tokens, a.mask.dtype == 0));
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
        v[0] += (seq_mode && L <= 0.0) ? 0.0 : row_rel(a.agg, L, a.mask_f64 != 0) * p[S_LOSS];
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
        double denom = plus_eps(v[1], a.mask_f64 != 0);  // verl's masked_mean
        a.out[0] = scale * v[0];
        a.out[1] = v[3] / denom;
        a.out[2] = v[4] / denom;
        a.out[3] = v[5] / denom;
        // gradient factor: with no valid token (n or g = 0) every gradient
        // element is 0, as in verl; keep it 0 instead of 0 * inf = NaN
        a.out[4] = isfinite(scale) ? scale : 0.0;
    }
}

// ---- verl's kl_penalty: elementwise, one block per row ----
//
// Mirrors src/cpu/kl.rs `kl_token`: the value and d value / d logprob of
// every estimator of d = logprob - ref_logprob in one pass.

enum { KL_K1 = 0, KL_ABS = 1, KL_K2 = 2, KL_K3 = 3 };

struct KlArgs {
    View lp, rf;
    ViewMut out;
    ViewMut grad;                   // grad.ptr == 0: no gradient wanted
    i64 rows, cols;
    i64 kind;                       // KL_*
    i64 straight_through;           // 1: the "+" variants (gradient of k2)
    i64 clamp_closed;               // as PolicyArgs.clamp_closed
};

template <typename F>
__device__ __forceinline__ F kl_token(const KlArgs &a, F lp, F rf, F *dv) {
    const F zero = cvt<F>(0.0), one = cvt<F>(1.0);
    const bool closed = a.clamp_closed != 0;
    F d = lp - rf;
    F v, g;
    switch (a.kind) {
    case KL_K1: v = d; g = one; break;
    case KL_ABS:
        g = d > zero ? one : (d < zero ? -one : zero);
        v = fabs(d);
        break;
    case KL_K2: v = cvt<F>(0.5) * d * d; g = d; break;
    default: {
        F k = rf - lp;
        bool pass_k, pass_v;
        k = clampg(k, cvt<F>(-20.0), cvt<F>(20.0), closed, &pass_k);
        F ratio = expg(k);
        F kld = ratio - k - one;
        v = clampg(kld, cvt<F>(-10.0), cvt<F>(10.0), closed, &pass_v);
        // d kld / d k = ratio - 1, d k / d lp = -1
        g = (pass_k && pass_v) ? one - ratio : zero;
        break;
    }
    }
    *dv = a.straight_through ? d : g;
    return v;
}

template <typename F>
__device__ void kl_rows(const KlArgs &a) {
    const i64 i = blockIdx.x, T = a.cols;
    for (i64 t = threadIdx.x; t < T; t += blockDim.x) {
        F dv;
        F v = kl_token<F>(a, load<F>(a.lp, i, t), load<F>(a.rf, i, t), &dv);
        store<F>(a.out, i, t, v);
        if (a.grad.ptr) store<F>(a.grad, i, t, dv);
    }
}

extern "C" __global__ void luspo_kl_f32(KlArgs a) { kl_rows<float>(a); }
extern "C" __global__ void luspo_kl_f64(KlArgs a) { kl_rows<double>(a); }

// ---- group advantages (verl's outcome estimators) ----
//
// Mirrors src/cpu/advantage.rs. Four kernels, all in fixed order:
//   luspo_adv_rows     a block per row: score s_i = sum_t r_it and, for opo /
//                      reinforce_plus_plus_baseline, sum m, m^2, m^3 over m != 0;
//   luspo_adv_groups   a thread per position k of `order` (the rows stably
//                      sorted by label, so a group is a contiguous run in row
//                      order); the thread at the start of a run walks its group
//                      sequentially, in row order as the CPU does, and writes
//                      every member's scalar a_i;
//   luspo_adv_batch    one block, only for gpg (alpha) and
//                      reinforce_plus_plus_baseline (masked whitening);
//   luspo_adv_write_*  a block per row: out_it = a_i m_it (whitened for rf++).
// Row scratch: ADV_NSTAT float64 per row, then 2 batch values.

enum { EST_GRPO = 0, EST_GRPO_NOSTD = 1, EST_RLOO = 2, EST_RLOO_VEC = 3, EST_RFPP = 4, EST_OPO = 5, EST_GPG = 6 };
enum { A_SCORE = 0, A_M1 = 1, A_M2 = 2, A_M3 = 3, A_SCALAR = 4, ADV_NSTAT = 5 };

struct AdvArgs {
    View rewards, mask;
    ViewMut out;
    const i64 *index;               // (rows,) int64 group labels
    i64 index_stride;               // in elements
    const i64 *order;               // (rows,) int64: a stable argsort of index
    i64 order_stride;
    double *scratch;                // rows * ADV_NSTAT + 2 float64, contiguous
    i64 rows, cols, estimator;
    double epsilon;
    double single;                  // (double)(1.0f + (float)epsilon): verl's float32 singleton std + eps
    double f_norm;
    i64 need_mask;                  // opo / rf++: accumulate the mask moments
};

template <typename F>
__device__ void adv_rows(const AdvArgs &a) {
    const i64 i = blockIdx.x, T = a.cols;
    double s[4] = {0.0, 0.0, 0.0, 0.0};
    for (i64 t = threadIdx.x; t < T; t += blockDim.x) {
        s[0] += (double)load<F>(a.rewards, i, t);
        if (a.need_mask) {
            double m = load<double>(a.mask, i, t);
            if (m != 0.0) {
                s[1] += m;
                s[2] += m * m;
                s[3] += m * m * m;
            }
        }
    }
    block_sum<4>(s);
    if (threadIdx.x == 0) {
        double *p = a.scratch + i * ADV_NSTAT;
        p[A_SCORE] = s[0];
        p[A_M1] = s[1];
        p[A_M2] = s[2];
        p[A_M3] = s[3];
    }
}

extern "C" __global__ void luspo_adv_rows_f32(AdvArgs a) { adv_rows<float>(a); }
extern "C" __global__ void luspo_adv_rows_f64(AdvArgs a) { adv_rows<double>(a); }

extern "C" __global__ void luspo_adv_groups(AdvArgs a) {
    const i64 k = (i64)blockIdx.x * blockDim.x + threadIdx.x, n = a.rows;
    if (k >= n) return;
    const i64 *ord = a.order;
    const i64 os = a.order_stride, is = a.index_stride;
    const i64 label = a.index[ord[k * os] * is];
    if (k > 0 && a.index[ord[(k - 1) * os] * is] == label) return;  // not the start of a run
    i64 end = k + 1;
    while (end < n && a.index[ord[end * os] * is] == label) ++end;
    double *st = a.scratch;
#define ROW(j) (ord[(j) * os])
#define SCORE(j) (st[ROW(j) * ADV_NSTAT + A_SCORE])
#define SCALAR(j) (st[ROW(j) * ADV_NSTAT + A_SCALAR])
    double count = (double)(end - k), sum = 0.0;
    for (i64 j = k; j < end; ++j) sum += SCORE(j);
    const bool many = end - k > 1;
    const double mean = many ? sum / count : 0.0;
    switch (a.estimator) {
    case EST_GRPO: {
        double ss = 0.0;
        for (i64 j = k; j < end; ++j) {
            double d = SCORE(j) - mean;
            ss += d * d;
        }
        double denom = many ? sqrt(ss / (count - 1.0)) + a.epsilon : a.single;
        for (i64 j = k; j < end; ++j) SCALAR(j) = (SCORE(j) - mean) / denom;
        break;
    }
    case EST_RLOO:
        for (i64 j = k; j < end; ++j)
            SCALAR(j) = many ? SCORE(j) * count / (count - 1.0) - mean * count / (count - 1.0) : SCORE(j);
        break;
    case EST_RLOO_VEC:
        for (i64 j = k; j < end; ++j) SCALAR(j) = many ? (count * SCORE(j) - sum) / (count - 1.0) : 0.0;
        break;
    case EST_OPO: {
        double ls = 0.0, l = 0.0;
        for (i64 j = k; j < end; ++j) {
            double m1 = st[ROW(j) * ADV_NSTAT + A_M1];
            ls += m1 * SCORE(j);
            l += m1;
        }
        for (i64 j = k; j < end; ++j) SCALAR(j) = many ? SCORE(j) - ls / l : SCORE(j);
        break;
    }
    default:  // grpo without std, rf++ baseline, gpg (alpha / f_norm applied by luspo_adv_batch)
        for (i64 j = k; j < end; ++j) SCALAR(j) = SCORE(j) - mean;
        break;
    }
#undef ROW
#undef SCORE
#undef SCALAR
}

// gpg: a_i = alpha * a_i / f_norm, alpha = B / max(#{s_i != 0}, 1).
// rf++: the whitening statistics of v_it = a_i m_it over the batch, into
// scratch[rows * ADV_NSTAT + {0, 1}] = (mean, 1 / sqrt(var + 1e-8)).
extern "C" __global__ void luspo_adv_batch(AdvArgs a) {
    double *st = a.scratch;
    const i64 n = a.rows;
    if (a.estimator == EST_GPG) {
        double c[1] = {0.0};
        for (i64 i = threadIdx.x; i < n; i += blockDim.x) c[0] += st[i * ADV_NSTAT + A_SCORE] != 0.0 ? 1.0 : 0.0;
        block_sum<1>(c);
        const double alpha = (double)n / fmax(c[0], 1.0);
        for (i64 i = threadIdx.x; i < n; i += blockDim.x) {
            double *p = st + i * ADV_NSTAT;
            p[A_SCALAR] = alpha * p[A_SCALAR] / a.f_norm;
        }
        return;
    }
    // rf++: sum m, sum a m^2 (= sum v m), then sum m (a m - mean)^2.
    double v[2] = {0.0, 0.0};
    for (i64 i = threadIdx.x; i < n; i += blockDim.x) {
        const double *p = st + i * ADV_NSTAT;
        v[0] += p[A_M1];
        v[1] += p[A_SCALAR] * p[A_M2];
    }
    block_sum<2>(v);
    const double tokens = v[0];
    const double mean = v[1] / (tokens + 1e-8);
    double s[1] = {0.0};
    for (i64 i = threadIdx.x; i < n; i += blockDim.x) {
        const double *p = st + i * ADV_NSTAT;
        double x = p[A_SCALAR];
        s[0] += x * x * p[A_M3] - 2.0 * x * mean * p[A_M2] + mean * mean * p[A_M1];
    }
    block_sum<1>(s);
    if (threadIdx.x == 0) {
        double var = s[0] / (tokens + 1e-8) * tokens / (tokens - 1.0);
        st[n * ADV_NSTAT] = mean;
        st[n * ADV_NSTAT + 1] = 1.0 / sqrt(var + 1e-8);
    }
}

template <typename F>
__device__ void adv_write(const AdvArgs &a) {
    const i64 i = blockIdx.x, T = a.cols;
    const double *st = a.scratch;
    const F x = cvt<F>(st[i * ADV_NSTAT + A_SCALAR]);
    const bool whiten = a.estimator == EST_RFPP;
    const F mean = whiten ? cvt<F>(st[a.rows * ADV_NSTAT]) : cvt<F>(0.0);
    const F rstd = whiten ? cvt<F>(st[a.rows * ADV_NSTAT + 1]) : cvt<F>(0.0);
    for (i64 t = threadIdx.x; t < T; t += blockDim.x) {
        F m = load<F>(a.mask, i, t);
        store<F>(a.out, i, t, whiten ? (x * m - mean) * rstd * m : x * m);
    }
}

extern "C" __global__ void luspo_adv_write_f32(AdvArgs a) { adv_write<float>(a); }
extern "C" __global__ void luspo_adv_write_f64(AdvArgs a) { adv_write<double>(a); }
