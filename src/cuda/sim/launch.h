// The simulator's launcher, compiled after the kernels (src/cuda/sim.rs adds
// the table of kernels, `luspo_rs_sim_kernels`, behind it): runs a grid of
// blocks as sim.h describes and exports the two entry points sim.rs calls.

#include <vector>

namespace sim {

// Calls a one-or-more-argument kernel with the arguments cuLaunchKernel's
// `params` point at.
template <typename F, F f> struct Invoke;
template <typename... A, void (*f)(A...)> struct Invoke<void (*)(A...), f> {
    template <size_t... I> static void call(void **p, std::index_sequence<I...>) { f(*static_cast<A *>(p[I])...); }
    static void run(void **p) { call(p, std::index_sequence_for<A...>{}); }
};

struct Kernel {
    const char *name;
    void (*invoke)(void **);
};

const size_t STACK = 256 << 10;  // bytes of stack per simulated thread (a guard page below)
static char *g_stacks = nullptr;
static unsigned int g_nstacks = 0;

inline bool reserve_stacks(unsigned int n) {
    if (n <= g_nstacks) return true;
    if (g_stacks) munmap(g_stacks, g_nstacks * STACK);
    void *m = mmap(nullptr, n * STACK, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (m == MAP_FAILED) {
        g_stacks = nullptr;
        g_nstacks = 0;
        return false;
    }
    g_stacks = (char *)m;
    g_nstacks = n;
    for (unsigned int k = 0; k < n; ++k) mprotect(g_stacks + k * STACK, 4096, PROT_NONE);
    return true;
}

inline void entry() {
    Launch *l = g_launch;
    l->invoke(l->params);
    l->cur->state = DONE;
    ++l->done;
    swapcontext(&l->cur->ctx, &l->sched);  // never resumed
}

inline void shuffle_order(std::vector<unsigned int> &v, uint64_t &rng) {
    for (size_t k = v.size(); k > 1; --k) std::swap(v[k - 1], v[next_random(rng) % k]);
}

// Why no thread of the block can go on: its threads' states.
inline void report_deadlock(Launch &l) {
    unsigned int bar = 0, shf = 0, first_bar = 0, first_shf = 0;
    for (unsigned int k = l.nthreads; k-- > 0;) {
        if (l.threads[k].state == BARRIER) ++bar, first_bar = k;
        if (l.threads[k].state == SHUFFLE) ++shf, first_shf = k;
    }
    l.failed = true;
    snprintf(l.err, l.errlen,
             "%s, block %u: deadlock: of %u threads, %u exited, %u wait at __syncthreads (first: %u), %u wait at a warp "
             "shuffle (first: %u, mask 0x%08x): a barrier or shuffle some thread of the block never reaches",
             l.kernel, l.block_idx.x, l.nthreads, l.done, bar, first_bar, shf, first_shf,
             shf ? l.threads[first_shf].mask : 0u);
}

}  // namespace sim

extern "C" char __start_luspo_rs_sim_shared[] __attribute__((weak));
extern "C" char __stop_luspo_rs_sim_shared[] __attribute__((weak));

// The kernel `name`'s index in the table, or -1.
extern "C" int luspo_rs_sim_find(const char *name);

// Runs kernel `k` on a (grid, 1, 1) x (block, 1, 1) launch; 0, or the CUDA
// error (700 for a bad access, 719 otherwise) with the reason in `err`.
extern "C" int luspo_rs_sim_launch(int k, unsigned int grid, unsigned int block, void **params, const sim::Region *regions,
                                   size_t nregions, uint64_t seed, char *err, size_t errlen);
