// The CUDA simulator's emulation header: put in front of the very translation
// unit NVRTC compiles (src/cuda/runtime.rs `full_source`), it lets the host's
// C++ compiler build our kernels into a shared object that runs them on the
// CPU, through the driver table of src/cuda/sim.rs (which compiles it).
//
// Execution model:
// * every thread of a block runs, as a fiber (its own stack and registers);
//   the block's fibers take turns on one OS thread, each running until it
//   reaches a barrier or a warp shuffle, in an order shuffled by the launch's
//   seed (a new order each round);
// * __syncthreads is a barrier over every thread of the block: a block whose
//   threads cannot all reach it (some exited, some wait elsewhere) is a
//   reported deadlock, not a hang;
// * warp shuffles exchange values among the lanes their mask names, with the
//   width's segments; every named lane must reach a shuffle with the same mask,
//   and a value read from a lane outside the mask is poison (all bits set);
// * each block has its own shared memory: every __shared__ variable lives in
//   one section, filled with 0xff bytes (NaN, -1, true) before each block;
// * blocks run one after another in an order shuffled by the seed, so integer
//   atomics are atomic and __threadfence has nothing to order;
// * every global-memory access goes through GLOBAL(p) (common.cuh), checked
//   here against the buffers handed to the launch: an access outside all of
//   them, a misaligned one, or a write through an output pointer into an
//   input ends the launch with an error naming the kernel and the offset.
//
// What it does not model: speed, warps running in lockstep, memory-model
// races between blocks or beyond what the barriers order, and the GPU's own
// exp / log / sqrt (the host's libm is used; see docs/cuda.md).

#define LUSPO_RS_SIM 1

#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <type_traits>

#ifdef LUSPO_RS_SIM_SCAN
// The first pass of the simulator's compile only lists the kernels.
#define __global__ luspo_rs_sim_kernel
#else
#define __global__
#endif
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __restrict__ __restrict
#define __shared__ static __attribute__((section("luspo_rs_sim_shared")))

struct uint3 {
    unsigned int x, y, z;
};
typedef uint3 dim3;

namespace sim {

// ---- bit casts and the f16 conversions the kernels write in inline PTX ----

template <typename To, typename From> inline To bits(From f) {
    static_assert(sizeof(To) == sizeof(From), "bit cast between types of one size");
    To t;
    memcpy(&t, &f, sizeof t);
    return t;
}

// IEEE binary16 to binary32 (exact), as PTX cvt.f32.f16.
inline float f16_to_f32(unsigned short h) {
    const unsigned int sign = (unsigned int)(h & 0x8000u) << 16, e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
    if (e == 0x1f) return bits<float>(sign | 0x7f800000u | (m << 13));  // inf, NaN
    if (e == 0) {                                                        // zero, subnormal: m * 2^-24
        const float v = (float)m * 5.9604644775390625e-08f;
        return sign ? -v : v;
    }
    return bits<float>(sign | ((e + 112u) << 23) | (m << 13));
}

// binary64 to binary16, rounding once to nearest even (as PTX cvt.rn.f16.f64;
// a binary32 argument converts to double exactly, so this is cvt.rn.f16.f32
// too). NaN becomes the canonical 0x7fff, as on the GPU.
inline unsigned short f64_to_f16(double d) {
    const uint64_t u = bits<uint64_t>(d);
    const unsigned short sign = (unsigned short)((u >> 48) & 0x8000u);
    const double a = fabs(d);
    if (a != a) return 0x7fff;
    if (a >= 65520.0) return sign | 0x7c00;  // rounds to infinity
    if (a < 6.103515625e-05) {               // subnormal range: multiples of 2^-24
        const double q = nearbyint(a * 16777216.0);  // round half even (default mode)
        return sign | (unsigned short)q;
    }
    int e;
    const double f = frexp(a, &e);                        // a = f 2^e, f in [0.5, 1)
    double q = nearbyint(ldexp(f, 11));                   // 11 significant bits
    if (q == 2048.0) {
        q = 1024.0;
        ++e;
    }
    return sign | (unsigned short)(((e + 14) << 10) | ((unsigned int)q - 1024u));
}

// ---- the launch: blocks, fibers, barriers, shuffles ----

enum State { READY, BARRIER, SHUFFLE, DONE };

struct Region {
    uint64_t lo, hi;   // [lo, hi) bytes
    const char *name;  // the argument it was handed as
    int64_t writable;
};

struct Thread {
    ucontext_t ctx;
    uint3 idx;
    int state;
    // the shuffle this lane waits at
    unsigned int mask;
    int kind, arg, width;
    uint64_t value, result;
};

struct Launch {
    const char *kernel;
    void (*invoke)(void **);
    void **params;
    uint3 grid, block, block_idx;
    unsigned int nthreads, done, at_barrier;
    Thread *threads;
    Thread *cur;
    ucontext_t sched;
    const Region *regions;
    size_t nregions;
    uint64_t rng;
    char *err;
    size_t errlen;
    bool failed;
    int code;  // the CUDA error of the failure: 700 for a bad access, else 719
};

static Launch *g_launch = nullptr;  // the one running launch (sim.rs serialises them)

inline uint64_t next_random(uint64_t &s) {  // splitmix64
    uint64_t z = (s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

// Gives the scheduler back control: the running thread resumes when its
// state is READY again and its turn comes.
inline void yield() {
    Launch *l = g_launch;
    swapcontext(&l->cur->ctx, &l->sched);
}

// Ends the launch with `msg` (the first failure is kept); never returns.
[[noreturn]] __attribute__((format(printf, 1, 2))) inline void fail(const char *fmt, ...) {
    Launch *l = g_launch;
    if (!l->failed) {
        l->failed = true;
        const int n = snprintf(l->err, l->errlen, "%s, block %u, thread %u: ", l->kernel, l->block_idx.x, l->cur->idx.x);
        va_list ap;
        va_start(ap, fmt);
        if (n >= 0 && (size_t)n < l->errlen) vsnprintf(l->err + n, l->errlen - n, fmt, ap);
        va_end(ap);
    }
    for (;;) {
        l->cur->state = DONE;
        swapcontext(&l->cur->ctx, &l->sched);  // never resumed
    }
}

inline Thread *current() { return g_launch->cur; }

inline void syncthreads() {
    Launch *l = g_launch;
    Thread *t = l->cur;
    t->state = BARRIER;
    // every thread of the block, exited ones included: a barrier some thread
    // never reaches is a deadlock the scheduler reports
    if (++l->at_barrier == l->nthreads) {
        for (unsigned int k = 0; k < l->nthreads; ++k)
            if (l->threads[k].state == BARRIER) l->threads[k].state = READY;
        l->at_barrier = 0;
    }
    yield();
}

enum { SHFL_IDX, SHFL_DOWN, SHFL_UP, SHFL_XOR };

template <typename T> inline T shuffle(unsigned int mask, T v, int kind, int arg, int width) {
    static_assert(sizeof(T) <= 8, "shuffles move up to 8 bytes");
    Launch *l = g_launch;
    Thread *t = l->cur;
    const unsigned int tid = t->idx.x, lane = tid & 31u, base = tid - lane;
    if (width <= 0 || width > 32 || (width & (width - 1)))
        fail("shuffle width %d is not a power of two in [1, 32]", width);
    if (!((mask >> lane) & 1u)) fail("lane %u calls a shuffle whose mask 0x%08x does not name it", lane, mask);
    const unsigned int lanes = l->nthreads - base < 32 ? l->nthreads - base : 32;
    if (lanes < 32 && (mask >> lanes))
        fail("shuffle mask 0x%08x names lanes this warp does not have (it has %u)", mask, lanes);
    uint64_t raw = 0;
    memcpy(&raw, &v, sizeof v);
    t->mask = mask;
    t->kind = kind;
    t->arg = arg;
    t->width = width;
    t->value = raw;
    t->state = SHUFFLE;
    bool all = true;
    for (unsigned int k = 0; k < 32 && all; ++k)
        if ((mask >> k) & 1u) all = l->threads[base + k].state == SHUFFLE;
    if (all) {
        for (unsigned int k = 0; k < 32; ++k) {
            if (!((mask >> k) & 1u)) continue;
            Thread *o = &l->threads[base + k];
            if (o->mask != mask) fail("lanes %u and %u meet at a shuffle with masks 0x%08x and 0x%08x", lane, k, mask, o->mask);
            if (o->width != width || o->kind != kind)
                fail("lanes %u and %u meet at different shuffles (width %d / %d)", lane, k, width, o->width);
        }
        for (unsigned int k = 0; k < 32; ++k) {
            if (!((mask >> k) & 1u)) continue;
            Thread *o = &l->threads[base + k];
            const int seg = (int)k & ~(width - 1), pos = (int)k - seg;
            int src;
            switch (o->kind) {
            case SHFL_IDX: src = seg + (o->arg & (width - 1)); break;
            case SHFL_DOWN: src = pos + o->arg < width ? (int)k + o->arg : (int)k; break;
            case SHFL_UP: src = pos - o->arg >= 0 ? (int)k - o->arg : (int)k; break;
            default: src = (((int)k ^ o->arg) - seg) < width && (((int)k ^ o->arg) - seg) >= 0 ? (int)k ^ o->arg : (int)k; break;
            }
            o->result = (mask >> src) & 1u ? l->threads[base + src].value : ~0ull;
            o->state = READY;
        }
    }
    yield();
    T r;
    memcpy(&r, &t->result, sizeof r);
    return r;
}

// The global-memory access of `sizeof(T)` bytes at `p`, checked.
template <typename T> inline T *checked(T *p, const char *file, int line) {
    Launch *l = g_launch;

    const uint64_t a = (uint64_t)(uintptr_t)p, n = sizeof(T);
    const bool write = !std::is_const<T>::value;
    const Region *in = nullptr, *ro = nullptr;
    for (size_t k = 0; k < l->nregions; ++k) {
        const Region &r = l->regions[k];
        if (a >= r.lo && a + n <= r.hi) {
            if (!write || r.writable) in = &r;
            else ro = &r;
            if (in) break;
        }
    }
    if (in) {
        if (a % alignof(T)) l->code = 700, fail("%s:%d: misaligned %u-byte access at offset %lld of `%s` (needs %u-byte alignment)", file,
                                 line, (unsigned)n, (long long)(a - in->lo), in->name, (unsigned)alignof(T));
        return p;
    }
    if (ro) l->code = 700, fail("%s:%d: %u-byte access through an output pointer into the input `%s`, at offset %lld", file, line,
                 (unsigned)n, ro->name, (long long)(a - ro->lo));
    // name the nearest buffer
    const Region *near = nullptr;
    long long off = 0;
    for (size_t k = 0; k < l->nregions; ++k) {
        const Region &r = l->regions[k];
        const long long o = (long long)(a - r.lo);
        if (!near || llabs(o) < llabs(off)) near = &r, off = o;
    }
    l->code = 700;  // CUDA_ERROR_ILLEGAL_ADDRESS
    if (near)
        fail("%s:%d: %u-byte %s at offset %lld of `%s`, which holds %llu bytes: outside every buffer of the launch", file,
             line, (unsigned)n, write ? "access" : "load", off, near->name, (unsigned long long)(near->hi - near->lo));
    fail("%s:%d: %u-byte access at %p, and the launch was handed no buffer", file, line, (unsigned)n, (void *)p);
}

}  // namespace sim

#define GLOBAL(p) (::sim::checked((p), __FILE__, __LINE__))

// ---- CUDA's names ----

#define threadIdx (::sim::current()->idx)
#define blockIdx (::sim::g_launch->block_idx)
#define blockDim (::sim::g_launch->block)
#define gridDim (::sim::g_launch->grid)

inline void __syncthreads() { ::sim::syncthreads(); }
inline void __threadfence() {}
template <typename T> inline T __shfl_sync(unsigned int mask, T v, int src, int width = 32) {
    return ::sim::shuffle(mask, v, ::sim::SHFL_IDX, src, width);
}
template <typename T> inline T __shfl_down_sync(unsigned int mask, T v, unsigned int d, int width = 32) {
    return ::sim::shuffle(mask, v, ::sim::SHFL_DOWN, (int)d, width);
}
template <typename T> inline T __shfl_up_sync(unsigned int mask, T v, unsigned int d, int width = 32) {
    return ::sim::shuffle(mask, v, ::sim::SHFL_UP, (int)d, width);
}
template <typename T> inline T __shfl_xor_sync(unsigned int mask, T v, int m, int width = 32) {
    return ::sim::shuffle(mask, v, ::sim::SHFL_XOR, m, width);
}
template <typename T> inline T atomicAdd(T *p, T v) {
    static_assert(std::is_integral<T>::value, "the simulator models integer atomics only");
    T *q = GLOBAL(p);
    const T old = *q;
    *q = old + v;
    return old;
}

inline float __uint_as_float(unsigned int u) { return ::sim::bits<float>(u); }
inline unsigned int __float_as_uint(float f) { return ::sim::bits<unsigned int>(f); }
inline double __longlong_as_double(long long u) { return ::sim::bits<double>(u); }
inline long long __double_as_longlong(double d) { return ::sim::bits<long long>(d); }
template <typename T> inline T min(T a, T b) { return b < a ? b : a; }
template <typename T> inline T max(T a, T b) { return a < b ? b : a; }

// common.cuh writes these in inline PTX on the GPU
inline float f16_to_f32(unsigned short h) { return ::sim::f16_to_f32(h); }
inline unsigned short f32_to_f16(float f) { return ::sim::f64_to_f16((double)f); }
inline unsigned short f64_to_f16(double d) { return ::sim::f64_to_f16(d); }
