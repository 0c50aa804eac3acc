// ---- scan estimators (GAE, REINFORCE++, ReMax) ----
//
// Mirrors src/cpu/returns.rs (formulas: src/ops/returns.rs). Per launch:
//   returns_scan_*     a block of SCAN_THREADS per row. The row is cut into one
//                      chunk per thread. Each thread composes the affine maps
//                      of its chunk's steps (in float64, right to left); thread
//                      0 chains the chunks' maps from the row's end to get
//                      each chunk's incoming state; then every thread walks its
//                      chunk again with verl's arithmetic in F from that
//                      state, writes the raw advantages and the returns, and
//                      the block sums the row's whitening moments.
//   returns_batch      one block, GAE and REINFORCE++: the whitening statistics.
//   returns_whiten_*   a block per row: the whitened advantages.
// The state after a step is affine in the state before it (the mask may be
// any value, as verl's arithmetic allows):
//   GAE  (nv, g): nv' = (1 - m) nv + v m,
//                 g'  = m gamma nv + (m c + 1 - m) g + m (r - v),  c = gamma lam;
//   REINFORCE++ run: run' = (m gamma + 1 - m) run + m r;
//   ReMax acc (float64): acc' = acc + F(r m).
// So a chunk's map is (A, B, P, Q, S): nv' = A nv + B, g' = P nv + Q g + S.
// The incoming states come from maps composed in float64, the walk is in F:
// the outputs agree with the sequential CPU scan to a few ulps, not bitwise.

struct ScanArgs {
    View rewards, values, baselines, mask;  // values: GAE only; baselines: ReMax only, per row (cs = 0)
    ViewMut advantages, returns;
    double *scratch;                        // rows * SCAN_NSTAT + 2 float64, contiguous
    i64 rows, cols, estimator;
    double gamma, c;                        // c = gamma * lam, rounded to F as the CPU does
    i64 mask_f64;                           // the mask is float64 (the whitening's epsilon and Bessel factor)
};

// One step's map applied after `M` (the map of the steps to its right).
struct ScanMap {
    double A, B, P, Q, S;
};

template <typename F>
__device__ __forceinline__ ScanMap scan_step(const ScanArgs &a, i64 i, i64 t, ScanMap M) {
    const double r = (double)load<F>(a.rewards, i, t), m = (double)load<F>(a.mask, i, t);
    ScanMap o = M;
    if (a.estimator == SCAN_GAE) {
        const double v = (double)load<F>(a.values, i, t);
        const double gamma = (double)(F)a.gamma, c = (double)(F)a.c;
        const double at = 1.0 - m, bt = v * m, pt = m * gamma, qt = m * c + 1.0 - m, st = m * (r - v);
        o.A = at * M.A;
        o.B = at * M.B + bt;
        o.P = pt * M.A + qt * M.P;
        o.Q = qt * M.Q;
        o.S = pt * M.B + qt * M.S + st;
    } else if (a.estimator == SCAN_RFPP) {
        const double gamma = (double)(F)a.gamma, qt = m * gamma + 1.0 - m;
        o.Q = qt * M.Q;
        o.S = qt * M.S + m * r;
    } else {
        o.S = M.S + (double)((F)r * (F)m);
    }
    return o;
}

// The whitening moments (ops::returns::Moments): n = sum m, the mean and
// m2 = sum m (x - mean)^2, merged pairwise (Chan et al.), never as raw sums
// of x and x^2 (those cancel when the mean is far from 0 next to the spread).
struct Moments {
    double n, mean, m2;
};

__device__ __forceinline__ Moments moments_shifted(double n, double k, double s, double q) {
    if (n == 0.0) return Moments{0.0, 0.0, 0.0};
    const double d = s / n;
    return Moments{n, k + d, q - s * d};
}

__device__ __forceinline__ Moments moments_merge(Moments a, Moments b) {
    const double n = a.n + b.n;
    if (b.n == 0.0) return a;
    if (a.n == 0.0 || n == 0.0) return b;
    const double delta = b.mean - a.mean, r = b.n / n;
    return Moments{n, a.mean + delta * r, a.m2 + b.m2 + delta * delta * a.n * r};
}

// Merges every thread's moments into thread 0's, in thread order (a fixed
// order: the result does not depend on timing). Ends with a barrier. Blocks
// of at most SCAN_THREADS threads (the launcher uses exactly that).
__device__ inline Moments block_merge(Moments m) {
    __shared__ double sh[3][SCAN_THREADS];
    sh[0][threadIdx.x] = m.n;
    sh[1][threadIdx.x] = m.mean;
    sh[2][threadIdx.x] = m.m2;
    __syncthreads();
    if (threadIdx.x == 0)
        for (unsigned j = 1; j < blockDim.x; ++j) m = moments_merge(m, Moments{sh[0][j], sh[1][j], sh[2][j]});
    __syncthreads();
    return m;
}

template <typename F>
__device__ void scan_rows(const ScanArgs &a) {
    __shared__ double maps[5][SCAN_THREADS];
    __shared__ double carry[2][SCAN_THREADS];
    const i64 i = blockIdx.x, T = a.cols, nt = blockDim.x;
    const i64 len = (T + nt - 1) / nt, lo = (i64)threadIdx.x * len;
    const i64 hi = lo + len < T ? lo + len : T;
    // 1. this chunk's map, right to left
    ScanMap M = {1.0, 0.0, 0.0, 1.0, 0.0};
    for (i64 t = hi - 1; t >= lo; --t) M = scan_step<F>(a, i, t, M);
    maps[0][threadIdx.x] = M.A;
    maps[1][threadIdx.x] = M.B;
    maps[2][threadIdx.x] = M.P;
    maps[3][threadIdx.x] = M.Q;
    maps[4][threadIdx.x] = M.S;
    __syncthreads();
    // 2. each chunk's incoming state: the row's end state (0, 0) through the
    // maps of every chunk to its right
    if (threadIdx.x == 0) {
        double nv = 0.0, g = 0.0;
        for (i64 j = nt - 1; j >= 0; --j) {
            carry[0][j] = nv;
            carry[1][j] = g;
            const double nv2 = maps[0][j] * nv + maps[1][j];
            g = maps[2][j] * nv + maps[3][j] * g + maps[4][j];
            nv = nv2;
        }
    }
    __syncthreads();
    // 3. the walk, with verl's arithmetic in F (src/cpu/returns.rs scan_group)
    const F one = (F)1.0, gamma = (F)a.gamma, c = (F)a.c;
    F nv = (F)carry[0][threadIdx.x], g = (F)carry[1][threadIdx.x], run = g;
    double acc = carry[1][threadIdx.x];
    // sum m, sum m (x - k), sum m (x - k)^2 over m != 0, k this chunk's first valid x
    double mn = 0.0, ms = 0.0, mq = 0.0, mk = 0.0;
    bool seen = false;
    for (i64 t = hi - 1; t >= lo; --t) {
        const F r = load<F>(a.rewards, i, t), m = load<F>(a.mask, i, t);
        F x = (F)0.0;
        if (a.estimator == SCAN_GAE) {
            const F v = load<F>(a.values, i, t);
            const F delta = r + gamma * nv - v;
            const F g_new = delta + c * g;
            nv = v * m + (one - m) * nv;
            g = g_new * m + (one - m) * g;
            store<F>(a.advantages, i, t, g);
            store<F>(a.returns, i, t, g + v);
            x = g;
        } else if (a.estimator == SCAN_RFPP) {
            const F nw = r + gamma * run;
            x = nw * m;
            store<F>(a.returns, i, t, x);
            run = nw * m + run * (one - m);
        } else {
            acc += (double)(r * m);
            const F rt = (F)acc;
            store<F>(a.returns, i, t, rt);
            store<F>(a.advantages, i, t, rt - load<F>(a.baselines, i, t) * m);
        }
        if (m != (F)0.0) {
            const double md = (double)m, xd = (double)x;
            if (!seen) mk = xd, seen = true;
            const double d = xd - mk;
            mn += md;
            ms += md * d;
            mq += md * d * d;
        }
    }
    const Moments row = block_merge(moments_shifted(mn, mk, ms, mq));
    if (threadIdx.x == 0) {
        double *p = a.scratch + i * SCAN_NSTAT;
        *GLOBAL(p + S_N) = row.n;
        *GLOBAL(p + S_MEAN) = row.mean;
        *GLOBAL(p + S_M2) = row.m2;
    }
}

extern "C" __global__ void returns_scan_f32(ScanArgs a) { scan_rows<float>(a); }
extern "C" __global__ void returns_scan_f64(ScanArgs a) { scan_rows<double>(a); }

// The whitening statistics (ops::returns::whiten_stats): the rows' moments
// merged (each thread its rows in order, then the threads in order); with
// N = sum m, verl's mean = sum m x / (N + 1e-8) and var = sum m (x - mean)^2 /
// (N + 1e-8) * N / (N - 1), the epsilon and the Bessel factor in float32
// unless the mask is float64; NaN for N < 2 (verl raises). Into
// scratch[rows * SCAN_NSTAT + {0, 1}] = (mean, 1 / sqrt(var + 1e-8)).
extern "C" __global__ void returns_batch(ScanArgs a) {
    const double *st = a.scratch;
    Moments m = {0.0, 0.0, 0.0};
    for (i64 i = threadIdx.x; i < a.rows; i += blockDim.x) {
        const double *p = st + i * SCAN_NSTAT;
        m = moments_merge(m, Moments{*GLOBAL(p + S_N), *GLOBAL(p + S_MEAN), *GLOBAL(p + S_M2)});
    }
    m = block_merge(m);
    if (threadIdx.x == 0) {
        const double n = m.n, nan = __longlong_as_double(0x7ff8000000000000LL);
        double mean = nan, rstd = nan;
        if (n != 0.0 && n != 1.0) {
            const bool mask_f64 = a.mask_f64 != 0;
            const double denom = plus_eps(n, mask_f64);
            mean = n * m.mean / denom;
            const double d = m.mean - mean, ss = m.m2 + n * d * d;
            rstd = 1.0 / sqrt(ss / denom * bessel(n, mask_f64) + 1e-8);
        }
        *GLOBAL(a.scratch + a.rows * SCAN_NSTAT) = mean;
        *GLOBAL(a.scratch + a.rows * SCAN_NSTAT + 1) = rstd;
    }
}

// GAE: advantages = (advantages - mean) * rstd, in place; REINFORCE++:
// advantages = (returns - mean) * rstd * m.
template <typename F>
__device__ void whiten_rows(const ScanArgs &a) {
    const i64 i = blockIdx.x, T = a.cols;
    const F mean = (F)*GLOBAL(a.scratch + a.rows * SCAN_NSTAT);
    const F rstd = (F)*GLOBAL(a.scratch + a.rows * SCAN_NSTAT + 1);
    const bool rfpp = a.estimator == SCAN_RFPP;
    const View src = rfpp ? View{a.returns.ptr, a.returns.rs, a.returns.cs, a.returns.dtype}
                          : View{a.advantages.ptr, a.advantages.rs, a.advantages.cs, a.advantages.dtype};
    for (i64 t = threadIdx.x; t < T; t += blockDim.x) {
        const F x = load<F>(src, i, t);
        store<F>(a.advantages, i, t, rfpp ? (x - mean) * rstd * load<F>(a.mask, i, t) : (x - mean) * rstd);
    }
}

extern "C" __global__ void returns_whiten_f32(ScanArgs a) { whiten_rows<float>(a); }
extern "C" __global__ void returns_whiten_f64(ScanArgs a) { whiten_rows<double>(a); }
