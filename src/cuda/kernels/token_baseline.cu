// ---- optimal token baselines (optimal_token_baseline, tir_optimal_token_baseline) ----
//
// Mirrors src/cpu/token_baseline.rs (formulas: src/ops/token_baseline.rs).
// Two kernels, TB_THREADS threads per block, every sum in a fixed order:
//   token_baseline_rows_*    a block per row: the returns G (a reverse scan:
//                            each thread sums its chunk in float64, thread 0
//                            chains the chunks from the row's end, each thread
//                            walks its chunk again from its incoming sum), the
//                            row's length (OTB: sum m; TIR: #{m != 0}); TIR's
//                            rows without a valid token get advantages 0 m.
//   token_baseline_groups_*  a block per position k of `order` (the rows stably
//                            sorted by label); the block at the start of a run
//                            of equal labels does that group, the others
//                            return. OTB: tiles of TB_THREADS columns, a
//                            column per thread; for each member row in row
//                            order the block scans w m over the tile (W = the
//                            row's carried sum + the scan) and each thread adds
//                            G W m and W m for its column; then the baselines,
//                            and the members' advantages for the tile.
//                            TIR: tiles of TB_THREADS valid-token ranks, a rank
//                            per thread; each member walks its columns from its
//                            cursor (the column of its next valid token, kept
//                            in scratch with W's carried sum) in column tiles,
//                            scanning w m and the valid flags, and hands the
//                            k-th valid token's (G, W) to the thread of rank k,
//                            until the tile's ranks are filled or the row ends;
//                            then the baselines, and a second walk over the same
//                            columns writes the advantages.
// W's running sums are float64 but composed through the block scans (a fixed
// tree), so W agrees with the CPU's sequential sum to a few float64 ulps, not
// bitwise; the group sums add the rows in row order, as the CPU does.

struct TbArgs {
    View rewards, mask, old, sp, rho;       // rho: only with has_rho
    ViewMut advantages, returns;
    const i64 *index;                       // (rows,) int64 group labels
    i64 index_stride;
    const i64 *order;                       // (rows,) int64: a stable argsort of index
    i64 order_stride;
    double *scratch;                        // rows * TB_NSTAT float64
    i64 rows, cols;
    i64 tir;                                // positions are valid-token ranks
    i64 has_rho, zero_tail;
    i64 rounding;                           // TB_RD_* bits: torch's float32 steps of a float64 computation
    i64 mask_sum_f32;                       // OTB's lengths are float32 sums
    double epsilon;
};

// x rounded through float32 when `narrow` (only ever set for F = double).
template <typename F>
__device__ __forceinline__ F tb_rd(bool narrow, F x) {
    return narrow ? (F)(float)x : x;
}

#define TB_RD(bit) ((a.rounding & (bit)) != 0)

// w m at (i, t) in W's dtype: (1 - 2 exp(old) + sp) [* rho^2] times m, exp
// correctly rounded (computed in float64), as the CPU takes it.
template <typename F>
__device__ __forceinline__ F tb_wm(const TbArgs &a, i64 i, i64 t, F m) {
    const F pi = tb_rd<F>(TB_RD(TB_RD_PI), (F)exp((double)load<F>(a.old, i, t)));
    const F b = tb_rd<F>(TB_RD(TB_RD_PI), (F)1.0 - tb_rd<F>(TB_RD(TB_RD_PI), (F)2.0 * pi));
    F w = tb_rd<F>(TB_RD(TB_RD_WP), b + load<F>(a.sp, i, t));
    if (a.has_rho) {
        const F r = load<F>(a.rho, i, t);
        w = tb_rd<F>(TB_RD(TB_RD_W), w * tb_rd<F>(TB_RD(TB_RD_Q), r * r));
    }
    return tb_rd<F>(TB_RD(TB_RD_WC), w * m);
}

// Inclusive scan of v over the block, in a fixed order (Hillis-Steele,
// double-buffered in `buf`, 2 * blockDim.x long); *total gets the block's sum.
template <typename T>
__device__ __forceinline__ T tb_scan(T v, T *buf, T *total) {
    const int n = blockDim.x, tid = threadIdx.x;
    int cur = 0;
    buf[tid] = v;
    __syncthreads();
    for (int off = 1; off < n; off <<= 1) {
        T x = buf[cur * n + tid];
        if (tid >= off) x += buf[cur * n + tid - off];
        buf[(1 - cur) * n + tid] = x;
        __syncthreads();
        cur = 1 - cur;
    }
    const T r = buf[cur * n + tid];
    *total = buf[cur * n + n - 1];
    __syncthreads();
    return r;
}

template <typename F>
__device__ void tb_rows(const TbArgs &a) {
    __shared__ double part[TB_THREADS];
    const i64 i = blockIdx.x, T = a.cols, nt = blockDim.x;
    const i64 len = (T + nt - 1) / nt, lo = (i64)threadIdx.x * len;
    const i64 hi = lo + len < T ? lo + len : T;
    const bool rr = TB_RD(TB_RD_R), tir = a.tir != 0;
    // 1. this chunk's sum of r m, right to left, and its part of the length
    double s = 0.0, n[1] = {0.0};
    for (i64 t = hi - 1; t >= lo; --t) {
        const F m = load<F>(a.mask, i, t);
        s += (double)tb_rd<F>(rr, load<F>(a.rewards, i, t) * m);
        n[0] += tir ? (double)(m != (F)0.0) : (double)m;
    }
    part[threadIdx.x] = s;
    __syncthreads();
    // 2. each chunk's incoming sum: the chunks to its right, from the row's end
    if (threadIdx.x == 0) {
        double acc = 0.0;
        for (i64 j = nt - 1; j >= 0; --j) {
            const double c = part[j];
            part[j] = acc;
            acc += c;
        }
    }
    __syncthreads();
    // 3. the walk: the returns
    double acc = part[threadIdx.x];
    for (i64 t = hi - 1; t >= lo; --t) {
        acc += (double)tb_rd<F>(rr, load<F>(a.rewards, i, t) * load<F>(a.mask, i, t));
        store<F>(a.returns, i, t, tb_rd<F>(rr, (F)acc));
    }
    block_sum<1>(n);
    if (!tir && a.mask_sum_f32) n[0] = (double)(float)n[0];
    if (tir && n[0] == 0.0)  // left out of its group: advantages 0 m
        for (i64 t = threadIdx.x; t < T; t += nt) store<F>(a.advantages, i, t, (F)0.0 * load<F>(a.mask, i, t));
    if (threadIdx.x == 0) {
        double *p = a.scratch + i * TB_NSTAT;
        *GLOBAL(p + TB_LEN) = n[0];
        *GLOBAL(p + TB_CARRY) = 0.0;
        *GLOBAL(p + TB_CUR) = 0.0;
    }
}

extern "C" __global__ void token_baseline_rows_f32(TbArgs a) { tb_rows<float>(a); }
extern "C" __global__ void token_baseline_rows_f64(TbArgs a) { tb_rows<double>(a); }

// The zero tail of a group (ops::token_baseline::zero_tail): the member
// position whose baseline is 0 from position *start on, or -1.
__device__ i64 tb_zero_tail(const TbArgs &a, i64 k, i64 end, i64 cols, i64 *start) {
    const i64 *ord = a.order;
    double best = -__longlong_as_double(0x7ff0000000000000LL), second = best;
    i64 n = 0;
    bool finite = true;
    for (i64 j = k; j < end; ++j) {
        const double l = *GLOBAL(a.scratch + *GLOBAL(ord + j * a.order_stride) * TB_NSTAT + TB_LEN);
        if (a.tir && l == 0.0) continue;
        ++n;
        finite = finite && l - l == 0.0;
        if (l > best) {
            second = best;
            best = l;
        } else if (l > second) {
            second = l;
        }
    }
    if (n < 2 || !finite) return -1;
    const double mx = trunc(best), sc = trunc(second);
    i64 hit = -1, hits = 0, pos = 0;
    for (i64 j = k; j < end; ++j) {
        const double l = *GLOBAL(a.scratch + *GLOBAL(ord + j * a.order_stride) * TB_NSTAT + TB_LEN);
        if (a.tir && l == 0.0) continue;
        if (l == mx) {
            hit = pos;
            ++hits;
        }
        ++pos;
    }
    if (hits != 1 || !(mx > sc)) return -1;
    const double st = sc < 0.0 ? fmax((double)cols + sc, 0.0) : fmin(sc, (double)cols);
    *start = (i64)st;
    return hit;
}

template <typename F>
__device__ void tb_groups(const TbArgs &a) {
    __shared__ double dbuf[2 * TB_THREADS];
    __shared__ int ibuf[2 * TB_THREADS];
    __shared__ double sG[TB_THREADS], sW[TB_THREADS], sB[TB_THREADS];
    __shared__ i64 sh_end, sh_tail, sh_start, sh_n, sh_used, sh_next;
    __shared__ double sh_carry;
    const i64 k = blockIdx.x, T = a.cols, nt = blockDim.x, tid = threadIdx.x;
    const i64 *ord = a.order;
#define TB_ROW(j) (*GLOBAL(ord + (j) * a.order_stride))
#define TB_LABEL(j) (*GLOBAL(a.index + TB_ROW(j) * a.index_stride))
#define TB_SC(row, f) (*GLOBAL(a.scratch + (row) * TB_NSTAT + (f)))
    if (k > 0 && TB_LABEL(k - 1) == TB_LABEL(k)) return;  // not the start of a run (uniform in the block)
    const bool tir = a.tir != 0;
    if (tid == 0) {
        const i64 label = TB_LABEL(k);
        i64 end = k + 1;
        while (end < a.rows && TB_LABEL(end) == label) ++end;
        i64 n = 0, used = 0;
        for (i64 j = k; j < end; ++j) {
            const double l = TB_SC(TB_ROW(j), TB_LEN);
            if (tir && l == 0.0) continue;
            ++n;
            if (tir && (i64)l > used) used = (i64)l;
        }
        sh_end = end;
        sh_n = n;
        sh_used = tir ? used : T;
        i64 start = 0;
        sh_tail = a.zero_tail ? tb_zero_tail(a, k, end, sh_used, &start) : -1;
        sh_start = start;
    }
    __syncthreads();
    const i64 end = sh_end, tail = sh_tail, tail_from = sh_start, used = sh_used;
    const bool many = sh_n > 1;
    const bool rr = TB_RD(TB_RD_R), rwc = TB_RD(TB_RD_WC);
    const bool nb = tir && rwc;  // the baselines' dtype: TIR's are W's
    const F eps = tb_rd<F>(rwc, (F)a.epsilon);
    const View ret = {a.returns.ptr, a.returns.rs, a.returns.cs, a.returns.dtype};
    for (i64 p0 = 0; p0 < used; p0 += nt) {  // a tile of positions (columns, or ranks)
        double num = 0.0, den = 0.0;
        // 1. the sums over the members, in row order
        if (many) {
            for (i64 j = k; j < end; ++j) {
                const i64 row = TB_ROW(j);
                if (tir && TB_SC(row, TB_LEN) == 0.0) continue;
                if (!tir) {
                    const i64 t = p0 + tid;
                    const F m = t < T ? load<F>(a.mask, row, t) : (F)0.0;
                    const F x = t < T ? tb_wm<F>(a, row, t, m) : (F)0.0;
                    double tot;
                    const double sc = tb_scan<double>((double)x, dbuf, &tot);
                    const double carry = TB_SC(row, TB_CARRY);
                    if (t < T) {
                        const F W = tb_rd<F>(rwc, (F)(carry + sc));
                        num += (double)(load<F>(ret, row, t) * W * m);
                        den += (double)tb_rd<F>(rwc, W * m);
                    }
                    __syncthreads();  // every thread has read the carry
                    if (tid == 0) TB_SC(row, TB_CARRY) = carry + tot;
                    __syncthreads();
                    continue;
                }
                // TIR: walk the row's columns from its cursor until ranks p0 .. p0 + nt are found
                i64 cur = (i64)TB_SC(row, TB_CUR);
                double carry = TB_SC(row, TB_CARRY);
                i64 found = 0;  // ranks p0 .. p0 + found are in sG / sW
                while (cur < T && found < nt) {
                    const i64 t = cur + tid;
                    const F m = t < T ? load<F>(a.mask, row, t) : (F)0.0;
                    const F x = t < T ? tb_wm<F>(a, row, t, m) : (F)0.0;
                    const int v = t < T && m != (F)0.0;
                    double tot;
                    int cnt;
                    const double sc = tb_scan<double>((double)x, dbuf, &tot);
                    const int iv = tb_scan<int>(v, ibuf, &cnt);
                    if (tid == 0) sh_next = -1;
                    __syncthreads();
                    const i64 r = found + iv - 1;  // this token's rank - p0
                    if (v && r < nt) {
                        sG[r] = (double)tb_rd<F>(rwc, load<F>(ret, row, t));
                        sW[r] = (double)tb_rd<F>(rwc, (F)(carry + sc));
                    }
                    if (v && r == nt) {  // the next tile's first token: the cursor stops here
                        sh_next = t;
                        sh_carry = carry + (sc - (double)x);
                    }
                    __syncthreads();
                    if (sh_next >= 0) {
                        cur = sh_next;
                        carry = sh_carry;
                        found = nt;
                    } else {
                        cur += nt;
                        carry += tot;
                        found += cnt;
                    }
                    __syncthreads();
                }
                if (tid < found) {
                    num += (double)tb_rd<F>(rwc, (F)sG[tid] * (F)sW[tid]);
                    den += sW[tid];
                }
                __syncthreads();  // sG / sW are free again
                if (tid == 0) {
                    TB_SC(row, TB_CUR0) = TB_SC(row, TB_CUR);
                    TB_SC(row, TB_CUR) = (double)(cur < T ? cur : T);
                    TB_SC(row, TB_CARRY) = carry;
                }
                __syncthreads();
            }
        }
        // 2. the baselines of the tile's positions
        const F d = tb_rd<F>(rwc, tb_rd<F>(rwc, (F)den) + eps);
        const F b = many ? tb_rd<F>(nb, tb_rd<F>(nb, (F)num) / d) : (F)0.0;
        sB[tid] = (double)b;
        __syncthreads();
        // 3. the members' advantages at the tile's positions
        i64 pos = 0;
        for (i64 j = k; j < end; ++j) {
            const i64 row = TB_ROW(j);
            if (tir && TB_SC(row, TB_LEN) == 0.0) continue;
            const bool cut = pos++ == tail;
            if (!tir) {
                const i64 t = p0 + tid;
                if (t < T) {
                    const F bt = cut && t >= tail_from ? (F)0.0 : b;
                    const F g = load<F>(ret, row, t), m = load<F>(a.mask, row, t);
                    store<F>(a.advantages, row, t, tb_rd<F>(rr, tb_rd<F>(rr, g - tb_rd<F>(rr, bt)) * m));
                }
                continue;
            }
            // TIR: the columns walked for this tile (a singleton walks them here)
            i64 c0, c1;
            if (many) {
                c0 = (i64)TB_SC(row, TB_CUR0);
                c1 = (i64)TB_SC(row, TB_CUR);
            } else {
                c0 = (i64)TB_SC(row, TB_CUR);
                c1 = -1;  // until the rank p0 + nt, or the row's end
            }
            i64 cur = c0, seen = 0;
            while (cur < T && (c1 < 0 || cur < c1)) {
                const i64 t = cur + tid;
                const bool in = t < T && (c1 < 0 || t < c1);
                const F m = in ? load<F>(a.mask, row, t) : (F)0.0;
                const int v = in && m != (F)0.0;
                int cnt;
                const int iv = tb_scan<int>(v, ibuf, &cnt);
                const i64 r = seen + iv - 1;
                if (tid == 0) sh_next = -1;
                __syncthreads();
                if (v && r == nt && c1 < 0) sh_next = t;  // a singleton's next tile starts here
                __syncthreads();
                const i64 stop = sh_next;
                if (in && (stop < 0 || t < stop)) {
                    F out;
                    if (v) {
                        const i64 rank = p0 + r;
                        const F bt = cut && rank >= tail_from ? (F)0.0 : (F)sB[r];
                        const F g = tb_rd<F>(rwc, load<F>(ret, row, t));
                        out = tb_rd<F>(rr, tb_rd<F>(rr, tb_rd<F>(rwc, g - bt)) * m);
                    } else {
                        out = (F)0.0 * m;
                    }
                    store<F>(a.advantages, row, t, out);
                }
                __syncthreads();
                if (stop >= 0) {
                    cur = stop;
                    break;
                }
                cur += nt;
                seen += cnt;
            }
            if (!many && tid == 0) TB_SC(row, TB_CUR) = (double)(cur < T ? cur : T);
            __syncthreads();
        }
    }
#undef TB_ROW
#undef TB_LABEL
#undef TB_SC
}

extern "C" __global__ void token_baseline_groups_f32(TbArgs a) { tb_groups<float>(a); }
extern "C" __global__ void token_baseline_groups_f64(TbArgs a) { tb_groups<double>(a); }
