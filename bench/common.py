"""Shared pieces of the benchmarks: a realistic synthetic rollout batch,
timing, and the machine's streaming bandwidth measured in the same run."""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


def rollout_batch(B: int, T: int, *, group: int = 8, dtype=torch.float32, seed: int = 0, device="cpu"):
    """Right-padded responses of varied length (uniform in [T/16, T]),
    log-probs of an old policy and a slightly moved new one, and GRPO
    group-relative advantages of 0/1 rewards, one per sequence."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(max(1, T // 16), T + 1, (B,), generator=g)
    mask = torch.arange(T)[None, :] < lengths[:, None]
    old = -torch.rand(B, T, generator=g) * 2.0
    lp = old + 0.1 * torch.randn(B, T, generator=g)
    reward = (torch.rand(B, generator=g) < 0.5).float().view(-1, group)
    adv = ((reward - reward.mean(1, keepdim=True)) / (reward.std(1, keepdim=True) + 1e-6)).view(B, 1)
    adv = adv.expand(B, T) * mask
    to = dict(dtype=dtype, device=device)
    return old.to(**to), lp.to(**to), adv.contiguous().to(**to), mask.to(device)


def timeit(fn: Callable[[], object], *, reps: int = 7, warmup: int = 2, sync: Callable[[], None] = lambda: None) -> float:
    """Median wall time of ``fn`` in seconds."""
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def stream_bandwidth(nbytes: int = 256 << 20) -> float:
    """Bytes per second of a large CPU copy (read + write), the best of a
    few runs: the roof a memory-bound kernel can reach on this machine."""
    src = torch.ones(nbytes // 4, dtype=torch.float32)
    dst = torch.empty_like(src)
    best = min(timeit(lambda: dst.copy_(src), reps=5, warmup=1) for _ in range(2))
    return 2 * nbytes / best


def nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)
