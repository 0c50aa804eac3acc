// (after the table of kernels: src/cuda/sim.rs)

extern "C" int luspo_rs_sim_find(const char *name) {
    for (size_t k = 0; k < sizeof luspo_rs_sim_kernels / sizeof luspo_rs_sim_kernels[0]; ++k)
        if (!strcmp(luspo_rs_sim_kernels[k].name, name)) return (int)k;
    return -1;
}

extern "C" int luspo_rs_sim_launch(int k, unsigned int grid, unsigned int block, void **params, const sim::Region *regions,
                                   size_t nregions, uint64_t seed, char *err, size_t errlen) {
    using namespace sim;
    if (k < 0 || (size_t)k >= sizeof luspo_rs_sim_kernels / sizeof luspo_rs_sim_kernels[0]) {
        snprintf(err, errlen, "no kernel %d", k);
        return 719;
    }
    if (block == 0 || block > 1024 || grid == 0) {
        snprintf(err, errlen, "%s: invalid launch of %u blocks of %u threads", luspo_rs_sim_kernels[k].name, grid, block);
        return 719;
    }
    if (!reserve_stacks(block)) {
        snprintf(err, errlen, "%s: cannot map stacks for %u threads", luspo_rs_sim_kernels[k].name, block);
        return 719;
    }
    static std::vector<Thread> threads;
    threads.resize(block);
    Launch l;
    memset(&l, 0, sizeof l);
    l.kernel = luspo_rs_sim_kernels[k].name;
    l.invoke = luspo_rs_sim_kernels[k].invoke;
    l.params = params;
    l.grid = {grid, 1, 1};
    l.block = {block, 1, 1};
    l.nthreads = block;
    l.threads = threads.data();
    l.regions = regions;
    l.nregions = nregions;
    l.rng = seed;
    l.err = err;
    l.errlen = errlen;
    g_launch = &l;
    std::vector<unsigned int> blocks(grid), order(block);
    for (unsigned int b = 0; b < grid; ++b) blocks[b] = b;
    for (unsigned int t = 0; t < block; ++t) order[t] = t;
    shuffle_order(blocks, l.rng);
    for (unsigned int b : blocks) {
        if (__start_luspo_rs_sim_shared && __stop_luspo_rs_sim_shared)
            memset(__start_luspo_rs_sim_shared, 0xff, __stop_luspo_rs_sim_shared - __start_luspo_rs_sim_shared);
        l.block_idx = {b, 0, 0};
        l.done = 0;
        l.at_barrier = 0;
        for (unsigned int t = 0; t < block; ++t) {
            Thread &th = threads[t];
            getcontext(&th.ctx);
            th.ctx.uc_stack.ss_sp = g_stacks + (size_t)t * STACK + 4096;
            th.ctx.uc_stack.ss_size = STACK - 4096;
            th.ctx.uc_link = nullptr;
            makecontext(&th.ctx, entry, 0);
            th.idx = {t, 0, 0};
            th.state = READY;
        }
        while (l.done < block && !l.failed) {
            shuffle_order(order, l.rng);
            bool ran = false;
            for (unsigned int t : order) {
                if (threads[t].state != READY) continue;
                l.cur = &threads[t];
                swapcontext(&l.sched, &threads[t].ctx);
                ran = true;
                if (l.failed) break;
            }
            if (!ran && !l.failed) report_deadlock(l);
        }
        if (l.failed) break;
    }
    g_launch = nullptr;
    return !l.failed ? 0 : l.code == 700 ? 700 : 719;  // CUDA_ERROR_ILLEGAL_ADDRESS / CUDA_ERROR_LAUNCH_FAILED
}
