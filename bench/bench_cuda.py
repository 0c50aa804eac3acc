"""GPU benchmark of the fused CUDA policy loss (forward + backward).

One command on a GPU machine:  python bench/bench_cuda.py
(--B/--T/--modes/--dtypes to change the problem; --quick for a smoke run).

For each mode and dtype it times, in one process on one GPU, with CUDA
events (median of --iters after --warmup):

* ours            luspo_rs.policy_loss + loss.backward()
* verl eager      verl 0.9.1's compute_policy_loss_{vanilla,gspo} + backward
* verl compiled   torch.compile of the same verl function + backward

and prints speedups, the bandwidth ours reaches (bytes of the inputs read
and the gradient written, per second) against a device-to-device copy
measured in the same run, and the peak memory each allocates above the
inputs, next to the size of the gradient buffer.

Then the host overhead: the synced wall time of one forward + backward at
B=8, T=256 (where the GPU work is a few microseconds), for ours and verl
eager, and the GPU operations (kernels and memsets) one of ours launches,
counted by torch.profiler.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import Counter

import torch
from verl.trainer.ppo import core_algos
from verl.workers.config import ActorConfig

import luspo_rs

CLIP = dict(clip_ratio=0.2, clip_ratio_low=0.2, clip_ratio_high=0.28, clip_ratio_c=3.0)


def verl_config():
    """verl's actor config with the clip parameters above (as the tests build it)."""
    return ActorConfig(strategy="fsdp", ppo_micro_batch_size_per_gpu=1, rollout_n=1, **CLIP)


def make_inputs(B, T, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    old = -torch.rand(B, T, generator=g, device="cuda") * 3
    lp = (old + 0.3 * torch.randn(B, T, generator=g, device="cuda")).to(dtype)
    old = old.to(dtype)
    lengths = torch.randint(1, T + 1, (B,), generator=g, device="cuda")
    mask = torch.arange(T, device="cuda")[None, :] < lengths[:, None]
    adv = (torch.randn(B, 1, generator=g, device="cuda") + 0.1 * torch.randn(B, T, generator=g, device="cuda")).to(dtype)
    return old, lp, adv, mask


def time_ms(fn, warmup, iters):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def peak_above(fn):
    """Peak bytes allocated during one call above what was allocated before it."""
    fn()  # warm (compile, caches)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def copy_bandwidth(nbytes, warmup, iters):
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), warmup, iters)
    del src, dst
    return 2 * nbytes / (ms * 1e-3)  # read + write


def host_overhead_us(fn, iters=300, sync=True):
    """Median wall time of ``fn`` in microseconds, each call synced (or not)."""
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        if sync:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    torch.cuda.synchronize()
    return 1e6 * statistics.median(times)


def gpu_ms(fn, iters=10):
    """Device time of one call of ``fn`` in ms: the summed durations of the
    GPU operations it runs (torch.profiler), without the host's launch gaps."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    us = sum(e.device_time_total for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
    return us / iters / 1000


def gpu_ops(fn):
    """The GPU operations (kernels, memsets, copies) one call of ``fn`` runs, by name."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return Counter(e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def host_rows(modes, cfg):
    print("\nhost overhead: one forward + backward at B=8, T=256 float32, synced wall time (median of 300)")
    old, lp, adv, mask = make_inputs(8, 256, torch.float32, seed=1)
    x = lp.clone().requires_grad_(True)
    for mode in modes:
        fn = core_algos.compute_policy_loss_vanilla if mode == "vanilla" else core_algos.compute_policy_loss_gspo
        vagg = "seq-mean-token-sum" if mode == "luspo" else "token-mean"

        def ours():
            x.grad = None
            luspo_rs.policy_loss(old, x, adv, mask, mode=mode, **CLIP)[0].backward()

        def eager():
            x.grad = None
            fn(old, x, adv, mask, loss_agg_mode=vagg, config=cfg)[0].backward()

        a, b = host_overhead_us(ours), host_overhead_us(eager)
        ops = gpu_ops(ours)
        names = ", ".join(f"{n} x{c}" if c > 1 else n for n, c in sorted(ops.items()))
        print(f"{mode:8} ours {a:7.1f} us   verl eager {b:7.1f} us   ours launches {sum(ops.values())} GPU ops: {names}")
    # What torch itself costs here for any custom op: an autograd.Function
    # whose forward is one reduction kernel and whose backward launches nothing.

    class Floor(torch.autograd.Function):
        @staticmethod
        def forward(ctx, t):
            ctx.shape = t.shape
            return t.sum()

        @staticmethod
        def backward(ctx, g):
            return g.expand(ctx.shape)

    def floor():
        x.grad = None
        Floor.apply(x).backward()

    print(f"{'floor':8} {host_overhead_us(floor):7.1f} us: a custom autograd.Function with one kernel forward and "
          f"no-kernel backward, the same way (torch's own cost per op on this host)")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--B", type=int, default=512)
    ap.add_argument("--T", type=int, default=16384)
    ap.add_argument("--modes", default="luspo,gspo,vanilla")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile of verl's loss")
    ap.add_argument("--quick", action="store_true", help="B=64, T=2048, 5 iterations")
    a = ap.parse_args()
    if a.quick:
        a.B, a.T, a.iters = 64, 2048, 5
    if not torch.cuda.is_available():
        raise SystemExit("bench_cuda.py needs a CUDA GPU (torch.cuda.is_available() is False)")
    cfg = verl_config()
    B, T = a.B, a.T
    print(f"GPU: {torch.cuda.get_device_name()}  torch {torch.__version__} (CUDA {torch.version.cuda})  "
          f"luspo_rs {luspo_rs.__version__}  NVRTC {luspo_rs._core.nvrtc_info()[1:]}")
    print(f"B={B} T={T}, forward + backward, median of {a.iters} (CUDA events)")
    copy_bw = copy_bandwidth(max(B * T * 4, 1 << 28), a.warmup, a.iters)
    print(f"device-to-device copy: {copy_bw / 1e9:.0f} GB/s (read + write)\n")
    head = (f"{'mode':8} {'dtype':9} {'impl':14} {'ms':>9} {'x eager':>8} {'x compile':>9} {'GB/s':>7} {'% copy':>7} "
            f"{'peak MB':>8} {'grad MB':>8} {'GPU ms':>7} {'% copy':>7}")
    print(head)
    print("-" * len(head))
    rows = []
    for dtype_name in a.dtypes.split(","):
        dtype = getattr(torch, dtype_name)
        old, lp, adv, mask = make_inputs(B, T, dtype)
        x = lp.clone().requires_grad_(True)
        es = lp.element_size()
        grad_bytes = B * T * es
        io_bytes = old.numel() * es + lp.numel() * es + adv.numel() * es + mask.numel() * mask.element_size() + grad_bytes
        for mode in a.modes.split(","):
            agg = "token-mean"
            fn = core_algos.compute_policy_loss_vanilla if mode == "vanilla" else core_algos.compute_policy_loss_gspo
            vagg = "seq-mean-token-sum" if mode == "luspo" else agg

            def ours():
                x.grad = None
                loss, _ = luspo_rs.policy_loss(old, x, adv, mask, mode=mode, loss_agg_mode=agg, **CLIP)
                loss.backward()

            def verl_loss(xx):
                return fn(old, xx, adv, mask, loss_agg_mode=vagg, config=cfg)[0]

            def eager():
                x.grad = None
                verl_loss(x).backward()

            impls = [("ours", ours), ("verl eager", eager)]
            if not a.no_compile:
                compiled = torch.compile(verl_loss, dynamic=False)

                def comp():
                    x.grad = None
                    compiled(x).backward()

                impls.append(("verl compiled", comp))
            res = {}
            for name, f in impls:
                try:
                    ms = time_ms(f, a.warmup, a.iters)
                    x.grad = None
                    peak = peak_above(f)
                    x.grad = None
                    res[name] = (ms, peak, gpu_ms(f))
                except Exception as e:  # e.g. torch.compile unavailable: report, keep going
                    print(f"{mode:8} {dtype_name:9} {name:14} failed: {type(e).__name__}: {str(e)[:80]}")
            for name, (ms, peak, gms) in res.items():
                e = res.get("verl eager", (float("nan"),))[0] / ms
                c = res.get("verl compiled", (float("nan"),))[0] / ms
                bw = io_bytes / (ms * 1e-3)
                line = (f"{mode:8} {dtype_name:9} {name:14} {ms:9.3f} {e:8.1f} {c:9.1f} {bw / 1e9:7.0f} "
                        f"{100 * bw / copy_bw:6.0f}% {peak / 2**20:8.0f} {grad_bytes / 2**20:8.0f} "
                        f"{gms:7.3f} {100 * io_bytes / (gms * 1e-3) / copy_bw:6.0f}%")
                print(line)
                rows.append(line)
        del old, lp, adv, mask, x
        torch.cuda.empty_cache()
    host_rows(a.modes.split(","), cfg)
    print("\nms: forward + backward; x eager / x compile: speedup of this row over verl eager / torch.compile(verl);")
    print("GB/s: (inputs + gradient bytes) / time; % copy: of the device-to-device copy bandwidth;")
    print("GPU ms: summed device time of the GPU operations of one call (torch.profiler), and its % copy;")
    print("peak MB: peak allocated during one forward+backward above what was allocated before (inputs, params);")
    print("targets (issue 7, B=512 T=16384): ours >= 50% copy, >= 15x eager, >= 8x compiled, peak <= grad MB;")
    print("host overhead <= 100 us; luspo no slower than gspo.")


if __name__ == "__main__":
    main()
