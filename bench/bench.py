"""Policy-loss benchmark: luspo-rs against verl 0.9.1's eager reference,
forward + backward, measured in the same run.

    make bench            # or: .venv/bin/python bench/bench.py [--B 512 --T 4096]

Prints, per mode, the median time of each, the speed-up, and the achieved
bandwidth of luspo-rs (bytes of the four inputs and the gradient per
second) next to the streaming bandwidth of this machine measured now.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import nbytes, rollout_batch, stream_bandwidth, timeit  # noqa: E402

import luspo_rs  # noqa: E402


def verl_loss_fn(mode):
    from verl.trainer.ppo import core_algos
    from verl.workers.config import ActorConfig

    cfg = ActorConfig(strategy="fsdp", clip_ratio=0.2, clip_ratio_low=0.2, clip_ratio_high=0.28,
                      ppo_micro_batch_size_per_gpu=1, rollout_n=1)
    if mode == "vanilla":
        return lambda o, l, a, m: core_algos.compute_policy_loss_vanilla(o, l, a, m, "token-mean", cfg)[0]
    agg = "seq-mean-token-sum" if mode == "luspo" else "seq-mean-token-mean"
    return lambda o, l, a, m: core_algos.compute_policy_loss_gspo(o, l, a, m, agg, cfg)[0]


def ours_loss_fn(mode):
    agg = "seq-mean-token-mean" if mode == "gspo" else "token-mean"
    return lambda o, l, a, m: luspo_rs.policy_loss(o, l, a, m, mode=mode, loss_agg_mode=agg, clip_ratio=0.2,
                                                   clip_ratio_high=0.28)[0]


def fwd_bwd(loss_fn, old, lp, adv, mask):
    x = lp.detach().requires_grad_()

    def step():
        x.grad = None
        loss_fn(old, x, adv, mask).backward()

    return step


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--B", type=int, default=512)
    ap.add_argument("--T", type=int, default=4096)
    ap.add_argument("--reps", type=int, default=7)
    args = ap.parse_args(argv)

    old, lp, adv, mask = rollout_batch(args.B, args.T)
    moved = nbytes(old, lp, adv, mask) + nbytes(lp)  # inputs + gradient
    bw = stream_bandwidth()
    print(f"B={args.B} T={args.T} fp32, torch {torch.__version__}, {torch.get_num_threads()} torch threads, "
          f"{luspo_rs.num_threads()} luspo-rs threads")
    print(f"streaming bandwidth (copy, read+write): {bw / 1e9:.2f} GB/s; bytes per call: {moved / 1e6:.1f} MB")
    print(f"{'mode':8} {'verl ms':>9} {'luspo-rs ms':>12} {'speed-up':>9} {'GB/s':>7} {'of stream':>10}")
    for mode in ["luspo", "gspo", "vanilla"]:
        t_ref = timeit(fwd_bwd(verl_loss_fn(mode), old, lp, adv, mask), reps=args.reps)
        t_ours = timeit(fwd_bwd(ours_loss_fn(mode), old, lp, adv, mask), reps=args.reps)
        gbs = moved / t_ours
        print(f"{mode:8} {t_ref * 1e3:9.2f} {t_ours * 1e3:12.2f} {t_ref / t_ours:8.1f}x {gbs / 1e9:7.2f} {gbs / bw:9.0%}")


if __name__ == "__main__":
    main()
