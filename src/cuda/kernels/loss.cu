// The loss kernels: the policy loss (every mode: vanilla, GSPO, LUSPO, GMPO
// (`_geo`), and in the `_ext` kernels the other token rules of
// src/cpu/policy_loss.rs), verl's value
// loss (MODE_VALUE, a token rule like the policy losses': src/ops/value_loss.rs)
// and verl's agg_loss, and backward's in-place scale. Twin of src/cpu/policy_loss.rs
// and src/cpu/agg_loss.rs, token for token (torch's clamp / maximum /
// minimum gradient conventions, the same NaN rules, the same gradient
// formula `coef_i * m * (dl * w)`), so the forward writes the final
// gradient; backward only multiplies by grad_output. Launched by
// src/cuda/loss.rs. Codes (MODE_*, AGG_*, SC_*, R_*, VEC_*) come from
// src/ops/abi.rs.

// Runs each thread of the row pass loads before summing any.
#ifndef ROW_RUNS
#define ROW_RUNS 2
#endif


// The policy loss and verl's agg_loss share this argument struct and the
// two kernels of "the loss kernels" below (MODE_AGG: agg_loss, where `lp`
// holds the loss matrix and old_lp / adv are unused).
struct LossArgs {
    View old_lp, lp, adv, mask, w;  // w.ptr == 0: no rollout IS weights
    ViewMut grad;                   // d loss / d lp, final (backward multiplies by grad_output)
    ViewMut loss;                   // 0-d: the loss, in its own dtype
    double *metrics;                // [pg_clipfrac, ppo_kl, pg_clipfrac_lower], or 0 (agg_loss)
    double *scratch;                // SCRATCH_HEAD + ROW_STRIDE * rows float64, see below
    const double *factor;           // 0, or a device float64 scalar that multiplies the scale
    i64 rows, cols, mode, agg;
    double lo, hi, c;               // clip bounds [1 - low, 1 + high] (MODE_GEO_MEAN: [-low, high] on the log-ratio),
                                    // dual-clip c (MODE_VALUE: cliprange_value)
    i64 clamp_closed;               // 1: clamp passes the gradient on its bounds too (torch < 2.15)
    double dp_size;
    double batch_num_tokens;        // <= 0: use the batch's own sum(mask)
    double global_batch_size;       // <= 0: use the batch's rows with L_i > 0
    double loss_scale_factor;       // <= 0: use cols
    i64 team;                       // threads per row: a power of two in [32, MAX_THREADS]
    i64 vec;                        // VEC_MASK* bits: how the mask is loaded
    View picks;                     // MODE_CLIP_COV / MODE_KL_COV: the chosen tokens (nonzero), or ptr 0
    double tau_pos, tau_neg;        // MODE_SAPO's temperatures
    double beta, kl_coef;           // MODE_DRO's dro_beta, MODE_KL_COV's ppo_kl_coef
};

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

// x rounded to float (kept in F) when `narrow`: GMPO's d in f64 math from
// 32- or 16-bit log-probs, as verl computes it (PolicyLossProblem::geo_narrow).
__device__ __forceinline__ float narrowg(float x, bool) { return x; }
__device__ __forceinline__ double narrowg(double x, bool narrow) { return narrow ? (double)(float)x : x; }

// GMPO's clipped log-ratio (geo_dmin of src/cpu/policy_loss.rs):
// dmin = sA min(sA d, sA dc), sA = sign(A) (0 at 0 and for NaN), dc =
// clamp(d, lo, hi); *ddmin = up * d dmin / d d as torch's backward computes
// it from the upstream gradient `up` (ties split, the clamp passes as clampg
// says, both by selection: an exact 0 where a branch is cut off even for a
// NaN `up`), *dc the clamped value.
template <typename F>
__device__ __forceinline__ F geo_dmin(F d, F A, F lo, F hi, bool closed, F up, F *ddmin, F *dc) {
    const F zero = cvt<F>(0.0), one = cvt<F>(1.0);
    bool pass;
    *dc = clampg(d, lo, hi, closed, &pass);
    const F sa = A > zero ? one : (A < zero ? -one : zero);
    const F u = up * sa;
    F dmn;
    const F mn = minimumg(sa * d, u, sa * *dc, pass ? u : zero, &dmn);
    *ddmin = sa * dmn;
    return sa * mn;
}

// ---- the loss kernels: the policy loss and agg_loss ----
//
// A call is a memset of the two tickets and two launches on the caller's
// stream, and gives the final gradient (backward only multiplies it by
// grad_output, see scale_grad):
//
//   loss_rows_*    a team of `team` threads per row sums L_i = sum(m)
//                        and, for GSPO / LUSPO, sum((lp - old) m), and
//                        writes L_i, s_i and d s_i (GMPO: the sums of
//                        dmin m, A m, ln(w + 1e-10) m, and from them pg_i
//                        into R_LOSS and pg_i / (L_i + 1e-8) into R_S,
//                        ops::policy_loss::LossMode::GeoMean); the last block to finish
//                        (ticket 0) sums the rows in index order into the
//                        batch-wide scale (dp / N, dp / G, ...) and N.
//   loss_tokens_*  the same teams, rows in reverse order (the rows the
//                        first kernel read last are still in L2): the token
//                        losses, the gradient `coef_i m (dl w)` with
//                        coef_i = scale * row weight, and the row sums; the
//                        last block (ticket 1) sums the rows in index order
//                        into the loss and verl's metrics.
//
// Each thread reads runs of V consecutive tokens (one 16-byte load of the
// float inputs when LossArgs.vec allows; 8 bytes for 16-bit floats). Sums have a
// fixed order for given (cols, dtype): a run in F, the runs of a thread in
// order in f64, then team_sum's tree. No float atomics.

// Storage types of the float operands: V elements per run, their conversion
// to the compute type (get), and back from it (put) or from a double,
// rounding once (put64).
struct SF32 {
    typedef float raw;
    enum { V = 4 };
    static __device__ __forceinline__ float get(raw x) { return x; }
    static __device__ __forceinline__ raw put(float x) { return x; }
    static __device__ __forceinline__ raw put64(double x) { return (float)x; }
};
struct SBF16 {
    typedef unsigned short raw;
    enum { V = 4 };
    static __device__ __forceinline__ float get(raw x) { return bf16_to_f32(x); }
    static __device__ __forceinline__ raw put(float x) { return f32_to_bf16(x); }
    static __device__ __forceinline__ raw put64(double x) { return f64_to_bf16(x); }
};
struct SF16 {
    typedef unsigned short raw;
    enum { V = 4 };
    static __device__ __forceinline__ float get(raw x) { return f16_to_f32(x); }
    static __device__ __forceinline__ raw put(float x) { return f32_to_f16(x); }
    static __device__ __forceinline__ raw put64(double x) { return f64_to_f16(x); }
};
struct SF64 {
    typedef double raw;
    enum { V = 2 };
    static __device__ __forceinline__ double get(raw x) { return x; }
    static __device__ __forceinline__ raw put(double x) { return x; }
    static __device__ __forceinline__ raw put64(double x) { return x; }
};

// A run of S in one load or store: its V elements, as their own type (no
// type punning), aligned to the run's size: 16 bytes (f32, f64), 8 bytes
// (bf16, f16: four tokens, which keeps the token kernel's registers those of f32).
template <typename S> struct alignas(sizeof(typename S::raw) * S::V) Run {
    typename S::raw e[S::V];
};
// N bytes of a 1-byte mask in one load.
template <int N> struct alignas(N) Bytes {
    unsigned char b[N];
};

// Elements [t, t + n) of row i of `v` into x[0..V) (zeros past n). With
// VEC, a full run of a column-contiguous view is one 16-byte load (the host
// checked alignment); a per-row view (cs == 0) is read once.
template <typename F, typename S, bool VEC>
__device__ __forceinline__ void load_run(const View &v, i64 i, i64 t, int n, F *x) {
    const int V = S::V;
    if (VEC && n == V && v.cs == 1) {
        const Run<S> r = *GLOBAL((const Run<S> *)(v.ptr + (i * v.rs + t) * (i64)sizeof(typename S::raw)));
#pragma unroll
        for (int k = 0; k < V; ++k) x[k] = (F)S::get(r.e[k]);
    } else if (v.cs == 0) {
        const F a = load<F>(v, i, 0);
#pragma unroll
        for (int k = 0; k < V; ++k) x[k] = a;
    } else {
#pragma unroll
        for (int k = 0; k < V; ++k) x[k] = k < n ? load<F>(v, i, t + k) : cvt<F>(0.0);
    }
}

// The mask run: one V-byte load for an aligned 1-byte mask (bool, uint8,
// int8), else element by element.
template <typename F, int V>
__device__ __forceinline__ void load_mask(const View &m, i64 i, i64 t, int n, bool vec, F *x) {
    if (vec && n == V) {
        const Bytes<V> q = *GLOBAL((const Bytes<V> *)(m.ptr + i * m.rs + t));
        const bool sgn = m.dtype == DT_I8;
#pragma unroll
        for (int k = 0; k < V; ++k) x[k] = sgn ? (F)(float)(signed char)q.b[k] : (F)(float)q.b[k];
    } else {
#pragma unroll
        for (int k = 0; k < V; ++k) x[k] = k < n ? load<F>(m, i, t + k) : cvt<F>(0.0);
    }
}

// Stores x[0..n) into row i of the (contiguous-row) gradient at t.
template <typename F, typename S, bool VEC>
__device__ __forceinline__ void store_run(const ViewMut &v, i64 i, i64 t, int n, const F *x) {
    const int V = S::V;
    if (VEC && n == V) {
        Run<S> r;
#pragma unroll
        for (int k = 0; k < V; ++k) r.e[k] = S::put(x[k]);
        *GLOBAL((Run<S> *)(v.ptr + (i * v.rs + t) * (i64)sizeof(typename S::raw))) = r;
    } else {
#pragma unroll
        for (int k = 0; k < V; ++k)
            if (k < n) store<F>(v, i, t + k, x[k]);
    }
}

// store_run for a vector kernel: the gradient is stored as S (contiguous rows).
template <typename F, typename S>
__device__ __forceinline__ void store_vec(const ViewMut &v, i64 i, i64 t, int n, const F *x) {
    const int V = S::V;
    typename S::raw *p = (typename S::raw *)v.ptr + (i * v.rs + t);
    if (n == V) {
        Run<S> r;
#pragma unroll
        for (int k = 0; k < V; ++k) r.e[k] = S::put(x[k]);
        *GLOBAL((Run<S> *)p) = r;
    } else {
#pragma unroll
        for (int k = 0; k < V; ++k)
            if (k < n) *GLOBAL(p + k) = S::put(x[k]);
    }
}

// Storage types of the masks a vector kernel reads in runs (its float
// operands' are S: SF32, SBF16, ...), converted as load() does.
struct SMaskI64 {
    typedef i64 raw;
    static __device__ __forceinline__ double get(raw x) { return (double)x; }
};
struct SMaskF32 {
    typedef float raw;
    static __device__ __forceinline__ float get(raw x) { return x; }
};
struct SMaskU8 {
    typedef unsigned char raw;
    static __device__ __forceinline__ float get(raw x) { return (float)x; }
};
struct SMaskI8 {
    typedef signed char raw;
    static __device__ __forceinline__ float get(raw x) { return (float)x; }
};
// V values of storage T in one load, aligned to their size up to 16 bytes
// (the host checked the rows: runs_ok, mask_runs_ok, mask_vec_ok in
// src/cuda/loss.rs).
template <typename T, int V> struct alignas(sizeof(typename T::raw) * V < 16 ? sizeof(typename T::raw) * V : 16) RunOf {
    typename T::raw e[V];
};

// Elements [t, t + n) of row i of a contiguous-row view stored as T into
// x[0..V): one load for a full run, element by element (at T, no dtype
// switch) at the row's ragged end, zeros past n.
template <typename F, typename T, int V>
__device__ __forceinline__ void load_runs_as(const View &v, i64 i, i64 t, int n, F *x) {
    const typename T::raw *p = (const typename T::raw *)v.ptr + (i * v.rs + t);
    if (n == V) {
        const RunOf<T, V> r = *GLOBAL((const RunOf<T, V> *)p);
#pragma unroll
        for (int k = 0; k < V; ++k) x[k] = (F)T::get(r.e[k]);
    } else {
#pragma unroll
        for (int k = 0; k < V; ++k) x[k] = k < n ? (F)T::get(*GLOBAL(p + k)) : cvt<F>(0.0);
    }
}

// A run of a float operand of the token pass in a vector kernel (VEC): a
// (rows, cols) view stored as S with contiguous rows (the host checked: one
// 16- or 8-byte load for a full run, element by element at the row's ragged
// end, no dtype switch: load_runs_as), or a per-row view (cs == 0), whose
// value `row` was read once before the loop. (load_run's element-wise paths,
// with their dtype switch, took the token loop from about 74 registers to
// 112 without a cap; at the 64-register cap vanilla f32 spilled 184 bytes,
// now 40.)
template <typename F, typename S>
__device__ __forceinline__ void load_vec(const View &v, i64 i, i64 t, int n, F row, F *x) {
    if (v.cs == 0) {
#pragma unroll
        for (int k = 0; k < S::V; ++k) x[k] = row;
        return;
    }
    load_runs_as<F, S, S::V>(v, i, t, n, x);
}

// The mask's run in a vector kernel's token pass: one load of V values for
// 1-byte masks, int64 (verl's response_mask) and float32 masks, element by
// element (at the mask's own type) only at a row's ragged end. The host
// runs the vector kernels only for these masks laid out for runs
// (mask_vec_ok in src/cuda/loss.rs), so the token loop has no element-wise
// dtype switch: with load_mask's, vanilla f32 spilled 40 bytes more at the
// 64-register cap (ptxas, sm_90), seq and value 40.
template <typename F, int V>
__device__ __forceinline__ void load_mask_vec(const View &m, i64 i, i64 t, int n, F *x) {
    switch (m.dtype) {
    case DT_I64: load_runs_as<F, SMaskI64, V>(m, i, t, n, x); break;
    case DT_F32: load_runs_as<F, SMaskF32, V>(m, i, t, n, x); break;
    case DT_I8: load_runs_as<F, SMaskI8, V>(m, i, t, n, x); break;
    default: load_runs_as<F, SMaskU8, V>(m, i, t, n, x); break;
    }
}

// The gradient's run in the token pass: store_vec in a vector kernel, else store_run.
template <typename F, typename S, bool VEC>
__device__ __forceinline__ void store_token_run(const ViewMut &v, i64 i, i64 t, int n, const F *x) {
    if (VEC)
        store_vec<F, S>(v, i, t, n, x);
    else
        store_run<F, S, false>(v, i, t, n, x);
}

// A float operand's run in the token pass: load_vec in a vector kernel,
// else load_run (any dtype and strides; `row` unused).
template <typename F, typename S, bool VEC>
__device__ __forceinline__ void load_token_run(const View &v, i64 i, i64 t, int n, F row, F *x) {
    if (VEC)
        load_vec<F, S>(v, i, t, n, row, x);
    else
        load_run<F, S, false>(v, i, t, n, x);
}

__device__ __forceinline__ bool is_seq(i64 agg) { return !(agg == AGG_TOKEN_MEAN || agg == AGG_TOKEN_SUM); }

// The row's weight before the shared scale (ops::agg_loss::AggPlan::row_weight):
// 1, 1 / (L_i + 1e-8) for seq-mean-token-mean, 0 for empty rows in
// sequence modes.
__device__ __forceinline__ double row_weight(i64 agg, double tokens, bool mask_f64) {
    if (!is_seq(agg)) return 1.0;
    if (!(tokens > 0.0)) return 0.0;  // (a NaN mask sum counts as empty, as verl's sum(m) > 0)
    if (agg == AGG_SEQ_MEAN) return 1.0 / plus_eps(tokens, mask_f64);
    return 1.0;
}

// This thread's row in a launch of `team`-thread teams; `reverse` walks the
// blocks backwards. Rows past the batch get no tokens.
struct RowOf {
    i64 i, cols;
    int tl;
    bool live;
};
__device__ __forceinline__ RowOf row_of(const LossArgs &a, bool reverse) {
    RowOf r;
    const int team = (int)a.team;
    const i64 blk = reverse ? (i64)(gridDim.x - 1 - blockIdx.x) : (i64)blockIdx.x;
    r.i = blk * (blockDim.x / team) + threadIdx.x / team;
    r.tl = threadIdx.x & (team - 1);
    r.live = r.i < a.rows;
    r.cols = r.live ? a.cols : 0;
    return r;
}

// GEO: GMPO's row pass (its own kernels, `loss_rows_*_geo`, so that the
// other modes' row pass keeps its registers: GMPO's sums spill at the cap).
template <typename F, typename S, bool VEC, bool GEO>
__device__ void loss_rows(const LossArgs &a) {
    const int V = S::V;
    const RowOf r = row_of(a, false);
    const bool gspo = !GEO && (a.mode == MODE_GSPO || a.mode == MODE_LUSPO);
    const bool geo = GEO, weighted = geo && a.w.ptr != 0, narrow = (a.vec & VEC_NARROW) != 0;
    const bool mvec = (a.vec & VEC_MASK) != 0;
    // L_i = sum(m); GSPO / LUSPO: sum((lp - old) * m); GMPO: sum(dmin * m),
    // sum(A * m), sum(ln(w + 1e-10) * m): plain products, so a NaN anywhere
    // in the row propagates, as in verl.
    double v[4] = {0.0, 0.0, 0.0, 0.0};
    if (!gspo && !geo && (a.vec & VEC_MASK16)) {
        // mask only, 16 bytes a load; byte sums are exact in any order
        const bool sgn = a.mask.dtype == DT_I8;
        const unsigned char *row = (const unsigned char *)a.mask.ptr + r.i * a.mask.rs;
        i64 acc = 0;
        for (i64 t = (i64)r.tl * 16; t < r.cols; t += a.team * 16) {
            if (t + 16 <= r.cols) {
                const Bytes<16> q = *GLOBAL((const Bytes<16> *)(row + t));
#pragma unroll
                for (int k = 0; k < 16; ++k) acc += sgn ? (i64)(signed char)q.b[k] : (i64)q.b[k];
            } else {
                for (i64 k = t; k < r.cols; ++k) {
                    const unsigned char b = *GLOBAL(row + k);
                    acc += sgn ? (i64)(signed char)b : (i64)b;
                }
            }
        }
        v[0] = (double)acc;
    } else {
        // ROW_RUNS runs loaded before any is summed: more bytes in flight
        const i64 step = a.team * V;
        for (i64 t0 = (i64)r.tl * V; t0 < r.cols; t0 += ROW_RUNS * step) {
            F m[ROW_RUNS][V], l[ROW_RUNS][V], o[ROW_RUNS][V], A[ROW_RUNS][V], w[ROW_RUNS][V];
            int n[ROW_RUNS];
#pragma unroll
            for (int u = 0; u < ROW_RUNS; ++u) {
                const i64 t = t0 + u * step;
                n[u] = t < r.cols ? (int)min((i64)V, r.cols - t) : 0;
                load_mask<F, V>(a.mask, r.i, t, n[u], mvec, m[u]);
                if (gspo || geo) {
                    load_run<F, S, VEC>(a.lp, r.i, t, n[u], l[u]);
                    load_run<F, S, VEC>(a.old_lp, r.i, t, n[u], o[u]);
                }
                if (geo) load_run<F, S, VEC>(a.adv, r.i, t, n[u], A[u]);
                if (weighted) load_run<F, S, VEC>(a.w, r.i, t, n[u], w[u]);
            }
#pragma unroll
            for (int u = 0; u < ROW_RUNS; ++u) {
                F sm = cvt<F>(0.0), sd = cvt<F>(0.0), sa = cvt<F>(0.0), sw = cvt<F>(0.0);
#pragma unroll
                for (int k = 0; k < V; ++k) {
                    sm += m[u][k];
                    if (gspo) sd += (l[u][k] - o[u][k]) * m[u][k];
                    if (geo && k < n[u]) {
                        F dd, dc;
                        const F dmin = geo_dmin(narrowg(l[u][k] - o[u][k], narrow), A[u][k], cvt<F>(a.lo), cvt<F>(a.hi),
                                                a.clamp_closed != 0, cvt<F>(1.0), &dd, &dc);
                        sd += dmin * m[u][k];
                        sa += A[u][k] * m[u][k];
                        if (weighted) sw += logg(w[u][k] + cvt<F>(1e-10)) * m[u][k];
                    }
                }
                v[0] += (double)sm;
                v[1] += (double)sd;
                v[2] += (double)sa;
                v[3] += (double)sw;
            }
        }
    }
    if (geo)
        team_sum<4>(v, (int)a.team);
    else
        team_sum<2>(v, (int)a.team);
    if (r.live && r.tl == 0) {
        const double tokens = v[0];
        F sr = cvt<F>(0.0), dsr = cvt<F>(0.0);
        if (gspo) {
            // s_i = exp(min(sum / max(L_i, 1), 10)) and d s_i (0 where the clamp bites)
            F log_s = cvt<F>(v[1] / fmax(tokens, 1.0));
            bool pass;
            F x = clampg(log_s, cvt<F>(-__longlong_as_double(0x7ff0000000000000LL)), cvt<F>(10.0), a.clamp_closed != 0, &pass);
            sr = expg(x);
            dsr = pass ? sr : cvt<F>(0.0);
        }
        double *p = a.scratch + SCRATCH_HEAD + r.i * ROW_STRIDE;
        *GLOBAL(p + R_TOKENS) = tokens;
        *GLOBAL(p + R_S) = (double)sr;
        *GLOBAL(p + R_DS) = (double)dsr;
        if (geo) {
            // the row means in F (verl divides in the inputs' type), then
            // pg_i = (-adv_i ratio_i) sw_i: the row's loss, and its
            // gradient's coefficient before the scale
            const double den = plus_eps(tokens, a.mask.dtype == DT_F64);
            const F ratio = expg(cvt<F>(v[1] / den)), adv = cvt<F>(v[2] / den);
            const F sw = weighted ? expg(cvt<F>(v[3] / den)) : cvt<F>(1.0);
            const F pg = (-adv * ratio) * sw;
            *GLOBAL(p + R_LOSS) = (double)pg;
            *GLOBAL(p + R_S) = (double)pg / den;
        }
    }
    if (!last_block((unsigned int *)(a.scratch + SC_TICKETS))) return;
    // The batch: N = sum L_i, G = #{L_i > 0}, in index order.
    double t[2] = {0.0, 0.0};
    for (i64 i = threadIdx.x; i < a.rows; i += blockDim.x) {
        const double L = *GLOBAL((volatile double *)a.scratch + SCRATCH_HEAD + i * ROW_STRIDE + R_TOKENS);
        t[0] += L;
        t[1] += L > 0.0 ? 1.0 : 0.0;
    }
    team_sum<2>(t, blockDim.x);
    if (threadIdx.x == 0) {
        const double n = a.batch_num_tokens > 0.0 ? a.batch_num_tokens : t[0];
        const double g = a.global_batch_size > 0.0 ? a.global_batch_size : t[1];
        const double lsf = a.loss_scale_factor > 0.0 ? a.loss_scale_factor : (double)a.cols;
        double scale;
        switch (geo ? -1 : a.agg) {
        case -1: scale = 1.0 / (double)a.rows; break;  // GMPO: the mean over all rows, no normalisers
        case AGG_TOKEN_MEAN: scale = a.dp_size / n; break;
        case AGG_TOKEN_SUM: scale = a.dp_size; break;
        case AGG_SEQ_SUM_NORM: scale = a.dp_size / g / lsf; break;
        default: scale = a.dp_size / g; break;
        }
        if (a.factor) scale *= *GLOBAL(a.factor);
        *GLOBAL(a.scratch + SC_SCALE) = scale;
        *GLOBAL(a.scratch + SC_TOKENS) = t[0];
    }
}

// Sets of ext_token_loss's rules, as bitmasks of their modes: an `_ext`
// kernel's token loop is compiled for a set, and reads a.mode only among
// the set's rules (a set of one: not at all).
#define EXT_BIT(m) (1 << (m))
// the 32- and 16-bit vector kernels: four loops, each spill-free at the
// 64-register cap (sm_90), where one loop for every rule spilled 15
// instructions (f32), three (CISPO to DRO in one) 2, and a loop per rule
// cost a quarter more compile time
#define EXT_RATIO (EXT_BIT(MODE_CISPO) | EXT_BIT(MODE_SAPO))
#define EXT_LINEAR (EXT_BIT(MODE_GPG) | EXT_BIT(MODE_REINFORCE) | EXT_BIT(MODE_DRO))
#define EXT_DPPO (EXT_BIT(MODE_DPPO_TV) | EXT_BIT(MODE_DPPO_KL))
#define EXT_COV (EXT_BIT(MODE_CLIP_COV) | EXT_BIT(MODE_KL_COV))
// the float64 and element-wise kernels, which spill in any case: one loop
#define EXT_ALL (EXT_RATIO | EXT_LINEAR | EXT_DPPO | EXT_COV)

// The lowest rule of a set.
__host__ __device__ constexpr int ext_first(int set) {
    return (set & 1) ? 0 : 1 + ext_first(set >> 1);
}

// The token rules of the `_ext` kernels (EXT: the set of rules the token
// loop was compiled for, a.mode picks among them), twins of the rules of
// src/cpu/policy_loss.rs of the same names. `pick`: the token was chosen
// (Clip-Cov, KL-Cov). Returns l; *dloss, *d (-d is what ppo_kl averages)
// and the flags as token_loss.
template <typename F, int EXT>
__device__ __forceinline__ F ext_token_loss(const LossArgs &a, F old, F lp, F A, bool pick, F *dloss, F *d,
                                            bool *clipped, bool *lower) {
    const F zero = cvt<F>(0.0), one = cvt<F>(1.0);
    const bool closed = a.clamp_closed != 0;
    *clipped = false;
    *lower = false;
    const int rule = (EXT & (EXT - 1)) == 0 ? ext_first(EXT) : (int)a.mode;
    switch (rule) {
    case MODE_CISPO: {
        if (!(EXT & EXT_BIT(MODE_CISPO))) break;
        // l = -sg(clip(r)) A lp; the clip bounds are [1 - low, 1 + high]
        bool pass;
        *d = clampg(lp - old, cvt<F>(-20.0), cvt<F>(20.0), closed, &pass);
        const F r = expg(*d);
        const F rc = clampg(r, cvt<F>(a.lo), cvt<F>(a.hi), closed, &pass);
        const F k = -rc * A;
        *clipped = r != rc;
        *dloss = k;
        return k * lp;
    }
    case MODE_SAPO: {
        if (!(EXT & EXT_BIT(MODE_SAPO))) break;
        // l = -g A, g = sigmoid(tau (r - 1)) 4 / tau
        bool pass;
        *d = clampg(lp - old, cvt<F>(-20.0), cvt<F>(20.0), closed, &pass);
        const F r = expg(*d);
        const F tau = A > zero ? cvt<F>(a.tau_pos) : cvt<F>(a.tau_neg);
        const F y = one / (one + expg(-(tau * (r - one))));
        const F k = cvt<F>(4.0) / tau;
        const F dl = ((-A * k) * ((one - y) * y)) * tau * r;
        *dloss = pass ? dl : zero;
        return -(y * k) * A;
    }
    case MODE_GPG:
        if (!(EXT & EXT_BIT(MODE_GPG))) break;
        *d = zero;
        *dloss = -A;
        return -lp * A;
    case MODE_REINFORCE:
        if (!(EXT & EXT_BIT(MODE_REINFORCE))) break;
        *d = lp - old;
        *dloss = -A;
        return -A * lp;
    case MODE_DRO: {
        if (!(EXT & EXT_BIT(MODE_DRO))) break;
        const F hb = cvt<F>(0.5 * a.beta), x = lp - old;
        *d = x;
        *dloss = -(A - hb * (x + x));
        return -(lp * A - hb * (x * x));
    }
    case MODE_DPPO_TV:
    case MODE_DPPO_KL: {
        if (!(EXT & EXT_DPPO)) break;
        // the divergence bounds are `low` and `high` themselves here
        // (the launcher passes them so for DPPO), c the truncation
        bool pass;
        *d = clampg(lp - old, cvt<F>(-20.0), cvt<F>(20.0), closed, &pass);
        const F r = expg(*d), c = cvt<F>(a.c), lo = cvt<F>(a.lo), hi = cvt<F>(a.hi);
        const F tr = r > c ? c : r;
        const F p = expg(lp), po = expg(old);
        bool up, down;
        if (rule == MODE_DPPO_KL) {
            const F eps = cvt<F>(1e-8);
            const F bkl = po * (old - lp) + (one - po) * logg((one - po + eps) / (one - p + eps));
            up = bkl <= hi || p <= po;
            down = bkl <= lo || p >= po;
        } else {
            const F moved = p - po;
            up = moved <= hi;
            down = moved >= -lo;
        }
        const F v = (A > zero ? up : down) ? one : zero;
        const F k = -A * tr;
        *clipped = v == zero;
        *lower = r > c && v != zero;
        *dloss = k * v;
        return (k * lp) * v;
    }
    case MODE_CLIP_COV: {
        if (!(EXT & EXT_BIT(MODE_CLIP_COV))) break;
        // max(-A r, -A clip(r)) with r = exp(lp - old), times corr (0 where picked)
        *d = lp - old;
        const F r = expg(*d);
        bool clip_flag;
        F dl;
        const F l = clipped_surrogate(A, r, r, cvt<F>(a.lo), cvt<F>(a.hi), closed, &dl, &clip_flag);
        const F corr = pick ? zero : one;
        *clipped = pick;
        *dloss = dl * corr;
        return l * corr;
    }
    case MODE_KL_COV: {  // -A r, plus coef |lp - old| where picked
        if (!(EXT & EXT_BIT(MODE_KL_COV))) break;
        const F x = lp - old;
        const F r = expg(x);
        const F ab = x < zero ? -x : x;
        const F coef = cvt<F>(a.kl_coef);
        const F l1 = -A * r;
        const F sign = x > zero ? one : (x < zero ? -one : x * zero);
        *d = -ab;
        *dloss = pick ? l1 + coef * sign : l1;
        return pick ? l1 + coef * ab : l1;
    }
    }
    // (a rule outside the set: never, the kernel picks the set of a.mode)
    *dloss = zero;
    *d = zero;
    return zero;
}

// One token: loss l, dl / dlp, the log-ratio the ppo_kl metric averages,
// and verl's clip flags (src/cpu/policy_loss.rs, token for token). MODE is
// MODE_VANILLA, MODE_GSPO (GSPO and LUSPO: the row's s_i, ds_i), MODE_AGG,
// MODE_VALUE (old: the values, lp: the predictions, A: the returns),
// MODE_GEO_MEAN (l = 0: GMPO's loss is its rows'; sr: the row's coefficient,
// *dloss = sr d dmin / d d) or
// MODE_CISPO, which stands for ext_token_loss's rules (those of the set EXT).
template <typename F, int MODE, int EXT>
__device__ __forceinline__ F token_loss(const LossArgs &a, F old, F lp, F A, F sr, F dsr, bool pick, F *dloss, F *d,
                                        bool *clipped, bool *lower) {
    const F zero = cvt<F>(0.0), lo = cvt<F>(a.lo), hi = cvt<F>(a.hi);
    const bool closed = a.clamp_closed != 0;
    if (MODE == MODE_CISPO) return ext_token_loss<F, EXT>(a, old, lp, A, pick, dloss, d, clipped, lower);
    if (MODE == MODE_GEO_MEAN) {
        // pg_clipfrac: d != dc (NaN counts) where A > 0; _lower: where A < 0
        F dc;
        *d = narrowg(lp - old, (a.vec & VEC_NARROW) != 0);
        geo_dmin(*d, A, lo, hi, closed, sr, dloss, &dc);
        const bool c = *d != dc;
        *clipped = c && A > zero;
        *lower = c && A < zero;
        return zero;
    }
    *lower = false;
    if (MODE == MODE_AGG) {
        *dloss = cvt<F>(1.0);
        *d = zero;
        *clipped = false;
        return lp;
    }
    if (MODE == MODE_VALUE) {
        // verl's clip_by_value: max(min(x, values + c), values - c), ties
        // split; l = 0.5 max((x - R)^2, (vc - R)^2), the 0.5 per token (exact)
        const F c = cvt<F>(a.c), one = cvt<F>(1.0), half = cvt<F>(0.5);
        F dmn, dvc, dl;
        F mn = minimumg(lp, one, old + c, zero, &dmn);
        F vc = maximumg(mn, dmn, old - c, zero, &dvc);
        F x1 = lp - A, x2 = vc - A;
        F l1 = x1 * x1, l2 = x2 * x2;
        F l = maximumg(l1, x1 + x1, l2, (x2 + x2) * dvc, &dl);
        *clipped = l2 > l1;
        *d = zero;
        *dloss = half * dl;
        return half * l;
    }
    if (MODE == MODE_VANILLA) {
        bool pass;
        *d = clampg(lp - old, cvt<F>(-20.0), cvt<F>(20.0), closed, &pass);
        F r = expg(*d);
        F dl1;
        F l1 = clipped_surrogate(A, r, pass ? r : zero, lo, hi, closed, &dl1, clipped);
        F pl3 = -A * cvt<F>(a.c);
        const bool neg = A < zero;
        *lower = l1 > pl3 && neg;
        F dl2;
        F l2 = minimumg(pl3, zero, l1, dl1, &dl2);
        *dloss = neg ? dl2 : dl1;
        return neg ? l2 : l1;
    }
    // lp - sg(lp) is 0 for finite lp and NaN otherwise, as in torch; the
    // clamp at 10 then passes no gradient to a NaN value.
    F z = lp - lp;
    F r = z == zero ? sr : nan_of<F>(), dr = z == zero ? dsr : zero;
    *d = lp - old;
    return clipped_surrogate(A, r, dr, lo, hi, closed, dloss, clipped);
}

// Runs each thread of the token pass loads before computing any.
#ifndef TOKEN_RUNS
#define TOKEN_RUNS 1
#endif

// The token pass's last block: the rows, in index order, into the loss, verl's
// metrics and the length diagnostics. Not inlined, so its registers are not
// added to the token loop's (which would spill at the 64-register cap).
__device__ __noinline__ void loss_finish(const double *scratch, i64 rows, ViewMut out, double *metrics, double scale,
                                         bool mask_f64, bool diag) {
    // b: the loss, the metrics' sums, and for the length diagnostics the
    // non-empty rows, their tokens and their mean advantages
    double b[7] = {0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0};
    // (the diagnostics: when LossArgs.vec has VEC_DIAGNOSTICS, else NaN)
    for (i64 i = threadIdx.x; i < rows; i += blockDim.x) {
        const volatile double *q = (volatile double *)scratch + SCRATCH_HEAD + i * ROW_STRIDE;
        b[0] += *GLOBAL(q + R_LOSS);
        b[1] += *GLOBAL(q + R_CLIPPED);
        b[2] += *GLOBAL(q + R_KL);
        b[3] += *GLOBAL(q + R_LOWER);
        const double L = *GLOBAL(q + R_TOKENS);
        if (L > 0.0) {
            b[4] += 1.0;
            b[5] += L;
            b[6] += *GLOBAL(q + R_ADV) / L;
        }
    }
    team_sum<7>(b, blockDim.x);
    double d[8] = {0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0};
    if (diag && b[4] > 0.0) {
        // the length diagnostics (ops::policy_loss::LengthDiagnostics): a row
        // is long when L_i > the mean length of the non-empty rows
        const double lbar = b[5] / b[4], abar = b[6] / b[4];
        for (i64 i = threadIdx.x; i < rows; i += blockDim.x) {
            const volatile double *q = (volatile double *)scratch + SCRATCH_HEAD + i * ROW_STRIDE;
            const double L = *GLOBAL(q + R_TOKENS);
            if (!(L > 0.0)) continue;
            const bool long_row = L > lbar;
            const double mass = *GLOBAL(q + R_MASS), clipped = *GLOBAL(q + R_CLIPPED);
            d[0] += long_row ? mass : 0.0;  // gradient mass of long rows
            d[1] += mass;                   // all gradient mass
            d[2] += long_row ? L : 0.0;     // tokens of long rows
            d[3] += long_row ? clipped : 0.0;
            d[4] += long_row ? 0.0 : clipped;
            const double x = L - lbar, y = *GLOBAL(q + R_ADV) / L - abar;
            d[5] += x * x;
            d[6] += y * y;
            d[7] += x * y;
        }
    }
    team_sum<8>(d, blockDim.x);
    if (threadIdx.x == 0) {
        // scale last keeps verl's 0 / 0 = NaN when every row is empty (GMPO: the mean of pg_i, times factor)
        const double loss = scale * b[0];
        switch (out.dtype) {
        case DT_F64: *GLOBAL((double *)out.ptr) = loss; break;
        case DT_F32: *GLOBAL((float *)out.ptr) = (float)loss; break;
        // as torch's double -> 16-bit cast: through float
        case DT_BF16: *GLOBAL((unsigned short *)out.ptr) = f32_to_bf16((float)loss); break;
        default: *GLOBAL((unsigned short *)out.ptr) = f32_to_f16((float)loss); break;
        }
        if (metrics) {
            const double denom = plus_eps(*GLOBAL(scratch + SC_TOKENS), mask_f64);  // verl's masked_mean
            *GLOBAL(metrics + 0) = b[1] / denom;
            *GLOBAL(metrics + 1) = b[2] / denom;
            *GLOBAL(metrics + 2) = b[3] / denom;
            const double nan = __longlong_as_double(0x7ff8000000000000LL);
            const bool any = diag && b[4] > 0.0;
            *GLOBAL(metrics + 3) = any ? (d[0] / d[1]) / (d[2] / b[5]) : nan;
            *GLOBAL(metrics + 4) = any ? d[3] / d[2] : nan;
            *GLOBAL(metrics + 5) = any ? d[4] / (b[5] - d[2]) : nan;
            *GLOBAL(metrics + 6) = any ? d[7] / sqrt(d[5] * d[6]) : nan;
        }
    }
}

// What a thread's token loop needs from loss_tokens' prologue.
template <typename F> struct TokenRow {
    RowOf r;
    i64 step;
    F coef, sr, dsr, A_row, w_row;
    bool seq_mode, weighted, diag, mvec, picked;
};

// The token loop of one thread (its runs of its row); in the `_ext`
// kernels, for the set EXT of rules (see EXT_RATIO), picked once per thread.
template <typename F, typename S, bool VEC, int MODE, int EXT>
__device__ __forceinline__ void token_loop(const LossArgs &a, const TokenRow<F> &c, double *s) {
    const int V = S::V, U = TOKEN_RUNS;
    const RowOf &r = c.r;
    const i64 step = c.step;
    const F zero = cvt<F>(0.0), one = cvt<F>(1.0);
    const F coef = c.coef, sr = c.sr, dsr = c.dsr, A_row = c.A_row, w_row = c.w_row;
    const bool seq_mode = c.seq_mode, weighted = c.weighted, diag = c.diag, mvec = c.mvec;
    const bool picked = (EXT & EXT_COV) != 0 && c.picked;
    for (i64 t0 = (i64)r.tl * V; t0 < r.cols; t0 += U * step) {
        F o[U][V], l[U][V], A[U][V], m[U][V], w[U][V], pk[U][V];
        int n[U];
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const i64 t = t0 + u * step;
            n[u] = t < r.cols ? (int)min((i64)V, r.cols - t) : 0;
            if (MODE != MODE_AGG) {
                load_token_run<F, S, VEC>(a.old_lp, r.i, t, n[u], zero, o[u]);
                load_token_run<F, S, VEC>(a.adv, r.i, t, n[u], A_row, A[u]);
            }
            load_token_run<F, S, VEC>(a.lp, r.i, t, n[u], zero, l[u]);
            if (VEC)
                load_mask_vec<F, V>(a.mask, r.i, t, n[u], m[u]);
            else
                load_mask<F, V>(a.mask, r.i, t, n[u], mvec, m[u]);
            if (weighted) load_token_run<F, S, VEC>(a.w, r.i, t, n[u], w_row, w[u]);
            if (picked) {
                // (a vector kernel's picks are 1-byte with rows on V bytes: only != 0 is read)
                if (VEC)
                    load_runs_as<F, SMaskU8, V>(a.picks, r.i, t, n[u], pk[u]);
                else
                    load_mask<F, V>(a.picks, r.i, t, n[u], false, pk[u]);
            }
        }
#pragma unroll
        for (int u = 0; u < U; ++u) {
            if (n[u] == 0) break;
            F g[V];
            F sl = zero, sd = zero, sc = zero, slo = zero, sa = zero, sg = zero;
#pragma unroll
            for (int k = 0; k < V; ++k) {
                F dl, d;
                bool clipped, lower;
                const F ok = MODE == MODE_AGG ? zero : o[u][k], ak = MODE == MODE_AGG ? zero : A[u][k];
                const bool pick = picked && pk[u][k] != zero;
                F loss = token_loss<F, MODE, EXT>(a, ok, l[u][k], ak, sr, dsr, pick, &dl, &d, &clipped, &lower);
                const F wk = weighted ? w[u][k] : one;
                const bool in = k < n[u], keep = in && m[u][k] != zero;
                sl += (keep || (in && seq_mode)) ? loss * wk * m[u][k] : zero;
                sd += keep ? d * m[u][k] : zero;
                sc += keep && clipped ? m[u][k] : zero;
                slo += keep && lower ? m[u][k] : zero;
                g[k] = keep ? coef * m[u][k] * (dl * wk) : zero;
                if (diag) {
                    sa += keep ? ak * m[u][k] : zero;
                    sg += g[k] < zero ? -g[k] : g[k];
                }
            }
            store_token_run<F, S, VEC>(a.grad, r.i, t0 + u * step, n[u], g);
            s[0] += (double)sl;
            s[1] += (double)sd;
            s[2] += (double)sc;
            s[3] += (double)slo;
            s[4] += (double)sa;
            s[5] += (double)sg;
        }
    }
}

template <typename F, typename S, bool VEC, int MODE>
__device__ void loss_tokens(const LossArgs &a) {
    const int V = S::V;
    const RowOf r = row_of(a, true);
    // GMPO: its loss is its rows' (loss_rows), the IS weights are in its
    // rows' coefficients, and no aggregation applies
    const bool geo = MODE == MODE_GEO_MEAN;
    const bool seq_mode = !geo && is_seq(a.agg), mask_f64 = a.mask.dtype == DT_F64;
    const bool mvec = (a.vec & VEC_MASK) != 0, weighted = !geo && a.w.ptr != 0, diag = (a.vec & VEC_DIAGNOSTICS) != 0;
    const double scale = *GLOBAL(a.scratch + SC_SCALE);
    const double *p = a.scratch + SCRATCH_HEAD + (r.live ? r.i : 0) * ROW_STRIDE;
    const double tokens = r.live ? *GLOBAL(p + R_TOKENS) : 0.0;
    const double rw = geo ? 1.0 : row_weight(a.agg, tokens, mask_f64);
    const F zero = cvt<F>(0.0), one = cvt<F>(1.0);
    // (GMPO: the row's coefficient is sr, applied inside its token rule, as torch's backward order has it)
    const F coef = geo ? one : cvt<F>(rw == 0.0 ? 0.0 : scale * rw);
    const F sr = cvt<F>(r.live ? *GLOBAL(p + R_S) * (geo ? scale : 1.0) : 0.0);
    const F dsr = cvt<F>(r.live ? *GLOBAL(p + R_DS) : 0.0);
    const i64 step = a.team * V;
    double s[6] = {0.0, 0.0, 0.0, 0.0, 0.0, 0.0};  // sum m w l, sum m d, clipped, lower, sum m A, sum |g|
    const bool picked = MODE == MODE_CISPO && a.picks.ptr != 0;  // (the `_ext` kernel's Clip-Cov, KL-Cov)
    // a row whose mask sums to NaN: dropped by the sequence modes (verl's
    // sum(m) > 0 is false): loss, count and gradient
    const bool dropped = seq_mode && tokens != tokens;
    // per-row advantages and weights (cs == 0), read once (vector kernels)
    const F A_row = VEC && MODE != MODE_AGG && r.live && a.adv.cs == 0 ? load<F>(a.adv, r.i, 0) : zero;
    const F w_row = VEC && weighted && r.live && a.w.cs == 0 ? load<F>(a.w, r.i, 0) : one;
    const TokenRow<F> c = {r, step, coef, sr, dsr, A_row, w_row, seq_mode, weighted, diag, mvec, picked};
    if (dropped) {
        // a zero gradient, and nothing summed (the row's loss share is 0
        // below): no token loop needs the flag (in the `_ext` kernels' it
        // made ptxas reload the row's count from the stack at every run)
        F g[V];
#pragma unroll
        for (int k = 0; k < V; ++k) g[k] = zero;
        for (i64 t = (i64)r.tl * V; t < r.cols; t += step)
            store_token_run<F, S, VEC>(a.grad, r.i, t, (int)min((i64)V, r.cols - t), g);
    } else if (MODE != MODE_CISPO) {
        token_loop<F, S, VEC, MODE, 0>(a, c, s);
    } else if (!VEC || sizeof(F) == 8) {
        token_loop<F, S, VEC, MODE, EXT_ALL>(a, c, s);
    } else {
        switch (a.mode) {
        case MODE_DPPO_TV:
        case MODE_DPPO_KL: token_loop<F, S, VEC, MODE, EXT_DPPO>(a, c, s); break;
        case MODE_CLIP_COV:
        case MODE_KL_COV: token_loop<F, S, VEC, MODE, EXT_COV>(a, c, s); break;
        case MODE_CISPO:
        case MODE_SAPO: token_loop<F, S, VEC, MODE, EXT_RATIO>(a, c, s); break;
        default: token_loop<F, S, VEC, MODE, EXT_LINEAR>(a, c, s); break;
        }
    }
    team_sum<6>(s, (int)a.team);
    if (r.live && r.tl == 0) {
        double *q = a.scratch + SCRATCH_HEAD + r.i * ROW_STRIDE;
        // the row's share of the loss before the scale; sequence modes drop
        // empty rows even when their sum is NaN (AggPlan::row_contribution)
        if (!geo) *GLOBAL(q + R_LOSS) = (seq_mode && !(tokens > 0.0)) ? 0.0 : rw * s[0];
        *GLOBAL(q + R_CLIPPED) = s[2];
        *GLOBAL(q + R_KL) = -s[1];
        *GLOBAL(q + R_LOWER) = s[3];
        *GLOBAL(q + R_ADV) = s[4];
        *GLOBAL(q + R_MASS) = s[5];
    }
    if (!last_block((unsigned int *)(a.scratch + SC_TICKETS) + 1)) return;
    loss_finish(a.scratch, a.rows, a.loss, a.metrics, scale, mask_f64, diag);
}

// Blocks per multiprocessor the loss kernels are compiled for (registers
// per thread <= 64K / (blocks * MAX_THREADS)).
#ifndef MIN_BLOCKS
#define MIN_BLOCKS 2
#endif

#define LOSS_KERNELS(suffix, F, S, VEC)                                                                                \
    extern "C" __global__ void __launch_bounds__(MAX_THREADS, MIN_BLOCKS) loss_rows_##suffix(LossArgs a) {             \
        loss_rows<F, S, VEC, false>(a);                                                                                \
    }                                                                                                                  \
    extern "C" __global__ void __launch_bounds__(MAX_THREADS, MIN_BLOCKS) loss_rows_##suffix##_geo(LossArgs a) {       \
        loss_rows<F, S, VEC, true>(a);                                                                                 \
    }                                                                                                                  \
    extern "C" __global__ void __launch_bounds__(MAX_THREADS, MIN_BLOCKS)                                              \
        loss_tokens_##suffix##_vanilla(LossArgs a) {                                                                   \
        loss_tokens<F, S, VEC, MODE_VANILLA>(a);                                                                       \
    }                                                                                                                  \
    extern "C" __global__ void __launch_bounds__(MAX_THREADS, MIN_BLOCKS)                                              \
        loss_tokens_##suffix##_seq(LossArgs a) {                                                                       \
        loss_tokens<F, S, VEC, MODE_GSPO>(a);                                                                          \
    }                                                                                                                  \
    extern "C" __global__ void __launch_bounds__(MAX_THREADS, MIN_BLOCKS)                                              \
        loss_tokens_##suffix##_agg(LossArgs a) {                                                                       \
        loss_tokens<F, S, VEC, MODE_AGG>(a);                                                                           \
    }                                                                                                                  \
    extern "C" __global__ void __launch_bounds__(MAX_THREADS, MIN_BLOCKS)                                              \
        loss_tokens_##suffix##_value(LossArgs a) {                                                                     \
        loss_tokens<F, S, VEC, MODE_VALUE>(a);                                                                         \
    }                                                                                                                  \
    extern "C" __global__ void __launch_bounds__(MAX_THREADS, MIN_BLOCKS)                                              \
        loss_tokens_##suffix##_ext(LossArgs a) {                                                                       \
        loss_tokens<F, S, VEC, MODE_CISPO>(a);                                                                         \
    }                                                                                                                  \
    extern "C" __global__ void __launch_bounds__(MAX_THREADS, MIN_BLOCKS)                                              \
        loss_tokens_##suffix##_geo(LossArgs a) {                                                                       \
        loss_tokens<F, S, VEC, MODE_GEO_MEAN>(a);                                                                      \
    }
LOSS_KERNELS(f32, float, SF32, true)
LOSS_KERNELS(bf16, float, SBF16, true)
LOSS_KERNELS(f16, float, SF16, true)
LOSS_KERNELS(f64, double, SF64, true)
LOSS_KERNELS(any32, float, SF32, false)
LOSS_KERNELS(any64, double, SF64, false)

// ---- backward: grad *= grad_output, in place ----
//
// `grad` is the loss kernels' final gradient (contiguous, 16-byte aligned,
// as torch allocates it); with grad_output == 1 (loss.backward()) every
// block returns at once and the buffer is not touched.

struct ScaleArgs {
    ViewMut grad;                   // viewed as (1, n)
    View grad_output;               // 0-d, any float dtype
    i64 n;
};

template <typename S>
__device__ void scale_runs(const ScaleArgs &a, double go) {
    const int V = S::V;
    const i64 runs = a.n / V, stride = (i64)gridDim.x * blockDim.x;
    for (i64 j = (i64)blockIdx.x * blockDim.x + threadIdx.x; j < runs; j += stride) {
        Run<S> *p = GLOBAL((Run<S> *)((typename S::raw *)a.grad.ptr + j * V));
        Run<S> r = *p;
#pragma unroll
        for (int k = 0; k < V; ++k) r.e[k] = S::put64((double)S::get(r.e[k]) * go);  // exact product, one rounding
        *p = r;
    }
    const View g = {a.grad.ptr, a.grad.rs, a.grad.cs, a.grad.dtype};
    for (i64 t = runs * V + (i64)blockIdx.x * blockDim.x + threadIdx.x; t < a.n; t += stride)
        store<double>(a.grad, 0, t, load<double>(g, 0, t) * go);
}

extern "C" __global__ void scale_grad(ScaleArgs a) {
    const double go = load<double>(a.grad_output, 0, 0);
    if (go == 1.0) return;
    switch (a.grad.dtype) {
    case DT_F64: scale_runs<SF64>(a, go); break;
    case DT_F32: scale_runs<SF32>(a, go); break;
    case DT_BF16: scale_runs<SBF16>(a, go); break;
    default: scale_runs<SF16>(a, go); break;
    }
}

