// ---- verl's kl_penalty: elementwise, a block per `chunk` columns of a row ----
//
// Mirrors src/cpu/kl_penalty.rs `kl_token`: the value and d value / d logprob of
// every estimator of d = logprob - ref_logprob in one pass.

struct KlArgs {
    View lp, rf;
    ViewMut out;
    ViewMut grad;                   // grad.ptr == 0: no gradient wanted
    i64 rows, cols;
    i64 kind;                       // KL_*
    i64 straight_through;           // 1: the "+" variants (gradient of k2)
    i64 clamp_closed;               // as LossArgs.clamp_closed
    i64 chunk;                      // columns per block: a long row (a 1-D input) takes several blocks
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
    const i64 per_row = (a.cols + a.chunk - 1) / a.chunk;
    const i64 i = (i64)blockIdx.x / per_row, t0 = ((i64)blockIdx.x % per_row) * a.chunk;
    const i64 end = min(a.cols, t0 + a.chunk);
    for (i64 t = t0 + threadIdx.x; t < end; t += blockDim.x) {
        F dv;
        F v = kl_token<F>(a, load<F>(a.lp, i, t), load<F>(a.rf, i, t), &dv);
        store<F>(a.out, i, t, v);
        if (a.grad.ptr) store<F>(a.grad, i, t, dv);
    }
}

extern "C" __global__ void kl_penalty_f32(KlArgs a) { kl_rows<float>(a); }
extern "C" __global__ void kl_penalty_f64(KlArgs a) { kl_rows<double>(a); }

