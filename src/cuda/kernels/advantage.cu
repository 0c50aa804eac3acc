// ---- group advantages (verl's outcome estimators) ----
//
// Mirrors src/cpu/advantage.rs. Four kernels, all in fixed order:
//   advantage_scores   a block per row: score s_i = sum_t r_it (not for gdpo
//                      given per-key scores) and, for opo /
//                      reinforce_plus_plus_baseline / gdpo, sum m, m^2, m^3 over m != 0;
//   advantage_groups   a thread per position k of `order` (the rows stably
//                      sorted by label, so a group is a contiguous run in row
//                      order); the thread at the start of a run walks its group
//                      sequentially, in row order as the CPU does, and writes
//                      every member's scalar a_i;
//   advantage_batch    one block, only for gpg (alpha) and
//                      reinforce_plus_plus_baseline / gdpo (masked whitening);
//   advantage_write_*  a block per row: out_it = a_i m_it (whitened for rf++, gdpo).
// Row scratch: ADV_NSTAT float64 per row, then 2 batch values.


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
    i64 need_mask;                  // opo / rf++ / gdpo: accumulate the mask moments
    i64 mask_f64;                   // the mask is float64 (rf++ whitening: plus_eps, bessel)
    View scores;                    // gdpo: (rows, n_keys) per-key scores, if n_keys > 0
    const double *weights;          // gdpo: (n_keys,) float64 weights
    i64 n_keys;                     // 0: the row sums of the rewards are the one score
};

template <typename F>
__device__ void adv_rows(const AdvArgs &a) {
    const i64 i = blockIdx.x, T = a.cols;
    double s[4] = {0.0, 0.0, 0.0, 0.0};
    for (i64 t = threadIdx.x; t < T; t += blockDim.x) {
        if (a.n_keys == 0) s[0] += (double)load<F>(a.rewards, i, t);
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
        *GLOBAL(p + A_SCORE) = s[0];
        *GLOBAL(p + A_M1) = s[1];
        *GLOBAL(p + A_M2) = s[2];
        *GLOBAL(p + A_M3) = s[3];
    }
}

extern "C" __global__ void advantage_scores_f32(AdvArgs a) { adv_rows<float>(a); }
extern "C" __global__ void advantage_scores_f64(AdvArgs a) { adv_rows<double>(a); }

// torch's topk order: NaN above every number.
__device__ __forceinline__ bool topk_greater(double x, double y) { return (x != x && y == y) || x > y; }

// GRPO over the run [k, end) of `order` (one group, in row order), key `key`
// of the per-key scores (or, for key < 0, the row sums): a_i, added times
// `w` to each member's scalar (`add`) or stored (src/cpu/advantage.rs grpo_scalars).
__device__ void grpo_group(const AdvArgs &a, i64 k, i64 end, i64 key, bool norm, bool add, double w) {
    const i64 *ord = a.order;
    double *st = a.scratch;
#define ROW(j) (*GLOBAL(ord + (j) * a.order_stride))
#define KSCORE(j) (key < 0 ? *GLOBAL(st + ROW(j) * ADV_NSTAT + A_SCORE) : load<double>(a.scores, ROW(j), key))
#define SCALAR(j) (*GLOBAL(st + ROW(j) * ADV_NSTAT + A_SCALAR))
    const double count = (double)(end - k);
    const bool many = end - k > 1;
    double sum = 0.0;
    for (i64 j = k; j < end; ++j) sum += KSCORE(j);
    const double mean = many ? sum / count : 0.0;
    double denom = 1.0;
    if (norm) {
        double ss = 0.0;
        for (i64 j = k; j < end; ++j) {
            double d = KSCORE(j) - mean;
            ss += d * d;
        }
        denom = many ? sqrt(ss / (count - 1.0)) + a.epsilon : a.single;
    }
    for (i64 j = k; j < end; ++j) {
        const double x = norm ? (KSCORE(j) - mean) / denom : KSCORE(j) - mean;
        if (add) SCALAR(j) += w * x;
        else SCALAR(j) = x;
    }
#undef ROW
#undef KSCORE
#undef SCALAR
}

extern "C" __global__ void advantage_groups(AdvArgs a) {
    const i64 k = (i64)blockIdx.x * blockDim.x + threadIdx.x, n = a.rows;
    if (k >= n) return;
    const i64 *ord = a.order;
    const i64 os = a.order_stride, is = a.index_stride;
#define ROW(j) (*GLOBAL(ord + (j) * os))
#define LABEL(j) (*GLOBAL(a.index + ROW(j) * is))
    const i64 label = LABEL(k);
    if (k > 0 && LABEL(k - 1) == label) return;  // not the start of a run
    i64 end = k + 1;
    while (end < n && LABEL(end) == label) ++end;
    double *st = a.scratch;
#define SCORE(j) (*GLOBAL(st + ROW(j) * ADV_NSTAT + A_SCORE))
#define SCALAR(j) (*GLOBAL(st + ROW(j) * ADV_NSTAT + A_SCALAR))
    double count = (double)(end - k), sum = 0.0;
    for (i64 j = k; j < end; ++j) sum += SCORE(j);
    const bool many = end - k > 1;
    const double mean = many ? sum / count : 0.0;
    switch (a.estimator) {
    case EST_GRPO:
    case EST_GRPO_NOSTD:
        grpo_group(a, k, end, -1, a.estimator == EST_GRPO, false, 0.0);
        break;
    case EST_GDPO:
    case EST_GDPO_NOSTD:
        // c_i = sum_k w_k a_ik in key order (verl's `new_advantage +=`), or
        // the one key of the row sums with weight 1
        if (a.n_keys == 0) {
            grpo_group(a, k, end, -1, a.estimator == EST_GDPO, false, 0.0);
        } else {
            for (i64 j = k; j < end; ++j) SCALAR(j) = 0.0;
            for (i64 key = 0; key < a.n_keys; ++key)
                grpo_group(a, k, end, key, a.estimator == EST_GDPO, true, *GLOBAL(a.weights + key));
        }
        break;
    case EST_PASSK:
    case EST_PASSK_NOSTD: {
        // the first of the tied maxima (NaN the largest) gets s_(1) - s_(2),
        // over sd + eps with std; the rest 0 (src/cpu/advantage.rs passk_scalars).
        // A singleton (labels on the device; the host refuses them) gets NaN.
        if (!many) {
            SCALAR(k) = __longlong_as_double(0x7ff8000000000000LL);
            break;
        }
        double best = SCORE(k), second = 0.0;
        i64 best_j = k;
        for (i64 j = k + 1; j < end; ++j) {
            const double x = SCORE(j);
            if (topk_greater(x, best)) {
                second = best;
                best = x;
                best_j = j;
            } else if (j == k + 1 || topk_greater(x, second)) {
                second = x;
            }
        }
        double value = best - second;
        if (a.estimator == EST_PASSK) {
            double ss = 0.0;
            for (i64 j = k; j < end; ++j) {
                double d = SCORE(j) - sum / count;
                ss += d * d;
            }
            value /= sqrt(ss / (count - 1.0)) + a.epsilon;
        }
        for (i64 j = k; j < end; ++j) SCALAR(j) = j == best_j ? value : 0.0;
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
            double m1 = *GLOBAL(st + ROW(j) * ADV_NSTAT + A_M1);
            ls += m1 * SCORE(j);
            l += m1;
        }
        for (i64 j = k; j < end; ++j) SCALAR(j) = many ? SCORE(j) - ls / l : SCORE(j);
        break;
    }
    default:  // rf++ baseline, gpg (alpha / f_norm applied by advantage_batch)
        for (i64 j = k; j < end; ++j) SCALAR(j) = SCORE(j) - mean;
        break;
    }
#undef ROW
#undef LABEL
#undef SCORE
#undef SCALAR
}

// gpg: a_i = alpha * a_i / f_norm, alpha = B / max(#{s_i != 0}, 1) in float32
// (src/cpu/advantage.rs gpg_alpha).
// rf++ / gdpo: the whitening statistics of v_it = a_i m_it over the batch, into
// scratch[rows * ADV_NSTAT + {0, 1}] = (mean, 1 / sqrt(var + 1e-8)); with
// N = sum m, verl's masked_mean divides by N + 1e-8 and masked_var multiplies
// by N / (N - 1), both in float32 unless the mask is float64
// (ops::plus_eps, ops::bessel).
extern "C" __global__ void advantage_batch(AdvArgs a) {
    double *st = a.scratch;
    const i64 n = a.rows;
    if (a.estimator == EST_GPG) {
        double c[1] = {0.0};
        for (i64 i = threadIdx.x; i < n; i += blockDim.x) c[0] += *GLOBAL(st + i * ADV_NSTAT + A_SCORE) != 0.0 ? 1.0 : 0.0;
        block_sum<1>(c);
        // verl: bsz / m.clamp(min=1), torch's float32 reciprocal(m) * bsz
        const double alpha = (double)((1.0f / (float)fmax(c[0], 1.0)) * (float)n);
        for (i64 i = threadIdx.x; i < n; i += blockDim.x) {
            double *p = GLOBAL(st + i * ADV_NSTAT + A_SCALAR);
            *p = alpha * *p / a.f_norm;
        }
        return;
    }
    // rf++ / gdpo: sum m, sum a m^2 (= sum v m), then sum m (a m - mean)^2.
    double v[2] = {0.0, 0.0};
    for (i64 i = threadIdx.x; i < n; i += blockDim.x) {
        const double *p = st + i * ADV_NSTAT;
        v[0] += *GLOBAL(p + A_M1);
        v[1] += *GLOBAL(p + A_SCALAR) * *GLOBAL(p + A_M2);
    }
    block_sum<2>(v);
    const double tokens = v[0];
    const bool mask_f64 = a.mask_f64 != 0;
    const double denom = plus_eps(tokens, mask_f64);
    const double mean = v[1] / denom;
    double s[1] = {0.0};
    for (i64 i = threadIdx.x; i < n; i += blockDim.x) {
        const double *p = st + i * ADV_NSTAT;
        double x = *GLOBAL(p + A_SCALAR);
        s[0] += x * x * *GLOBAL(p + A_M3) - 2.0 * x * mean * *GLOBAL(p + A_M2) + mean * mean * *GLOBAL(p + A_M1);
    }
    block_sum<1>(s);
    if (threadIdx.x == 0) {
        double var = s[0] / denom * bessel(tokens, mask_f64);
        *GLOBAL(st + n * ADV_NSTAT) = mean;
        *GLOBAL(st + n * ADV_NSTAT + 1) = 1.0 / sqrt(var + 1e-8);
    }
}

template <typename F>
__device__ void adv_write(const AdvArgs &a) {
    const i64 i = blockIdx.x, T = a.cols;
    const double *st = a.scratch;
    const F x = cvt<F>(*GLOBAL(st + i * ADV_NSTAT + A_SCALAR));
    const bool whiten = a.estimator == EST_RFPP || a.estimator == EST_GDPO || a.estimator == EST_GDPO_NOSTD;
    const F mean = whiten ? cvt<F>(*GLOBAL(st + a.rows * ADV_NSTAT)) : cvt<F>(0.0);
    const F rstd = whiten ? cvt<F>(*GLOBAL(st + a.rows * ADV_NSTAT + 1)) : cvt<F>(0.0);
    for (i64 t = threadIdx.x; t < T; t += blockDim.x) {
        F m = load<F>(a.mask, i, t);
        store<F>(a.out, i, t, whiten ? (x * m - mean) * rstd * m : x * m);
    }
}

extern "C" __global__ void advantage_write_f32(AdvArgs a) { adv_write<float>(a); }
extern "C" __global__ void advantage_write_f64(AdvArgs a) { adv_write<double>(a); }
