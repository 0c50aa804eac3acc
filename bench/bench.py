"""Policy-loss benchmark: luspo-rs against verl 0.9.1's eager reference,
forward + backward, measured in the same run.

    make bench            # or: .venv/bin/python bench/bench.py [--B 512 --T 4096]

Prints, for every policy-loss mode, the median time of each, the speed-up, and the achieved
bandwidth of luspo-rs (bytes of the four inputs and the gradient per
second) next to the streaming bandwidth of this machine measured now.
"""

from __future__ import annotations

import argparse
import atexit
import os
import shutil
import sys
import tempfile

# A fresh compile cache: torch's AOTAutograd cache keys a graph that calls a
# custom op by the graph, not by the op's autograd formula, so a cache from an
# older luspo-rs would replay that version's compiled backward.
if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="luspo_rs_bench_inductor_")
    atexit.register(shutil.rmtree, os.environ["TORCHINDUCTOR_CACHE_DIR"], ignore_errors=True)

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from common import nbytes, rollout_batch, stream_bandwidth, timeit  # noqa: E402

import luspo_rs  # noqa: E402


#: Every mode, in the order of the README's covers table; bypass_mode is verl's rollout correction
#: in front of vanilla or reinforce, so those rows time it.
MODES = ["luspo", "gspo", "vanilla", "cispo", "sapo", "geo_mean", "gpg", "clip_cov", "kl_cov", "dppo_tv", "dppo_kl",
         "dro", "reinforce"]
#: The aggregation each row uses (verl's default for the mode).
AGG = {"gspo": "seq-mean-token-mean", "sapo": "seq-mean-token-mean", "reinforce": "seq-mean-token-sum"}
DRO_BETA = 0.1


def verl_loss_fn(mode):
    from verl.trainer.ppo import core_algos
    from verl.workers.config import ActorConfig, PolicyLossConfig

    cfg = ActorConfig(strategy="fsdp", clip_ratio=0.2, clip_ratio_low=0.2, clip_ratio_high=0.28,
                      ppo_micro_batch_size_per_gpu=1, rollout_n=1, policy_loss=PolicyLossConfig(dro_beta=DRO_BETA))
    agg = AGG.get(mode, "token-mean")
    if mode == "luspo":  # (not in verl: GSPO's token loss aggregated seq-mean-token-sum)
        return lambda o, l, a, m: core_algos.compute_policy_loss_gspo(o, l, a, m, "seq-mean-token-sum", cfg)[0]
    fn = core_algos.compute_policy_loss_reinforce if mode == "reinforce" else core_algos.get_policy_loss_fn(mode)
    return lambda o, l, a, m: fn(o, l, a, m, agg, cfg)[0]


def ours_loss_fn(mode):
    agg = AGG.get(mode, "token-mean")
    return lambda o, l, a, m: luspo_rs.policy_loss(o, l, a, m, mode=mode, loss_agg_mode=agg, clip_ratio=0.2,
                                                   clip_ratio_high=0.28, dro_beta=DRO_BETA)[0]


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
    ap.add_argument("--modes", nargs="*", default=MODES, choices=MODES)
    args = ap.parse_args(argv)

    old, lp, adv, mask = rollout_batch(args.B, args.T)
    moved = nbytes(old, lp, adv, mask) + nbytes(lp)  # inputs + gradient
    bw = stream_bandwidth()
    print(f"B={args.B} T={args.T} fp32, torch {torch.__version__}, {torch.get_num_threads()} torch threads, "
          f"{luspo_rs.num_threads()} luspo-rs threads")
    print(f"streaming bandwidth (copy, read+write): {bw / 1e9:.2f} GB/s; bytes per call: {moved / 1e6:.1f} MB")
    print(f"{'mode':9} {'verl ms':>9} {'luspo-rs ms':>12} {'speed-up':>9} {'GB/s':>7} {'of stream':>10}")
    for mode in args.modes:
        t_ref = timeit(fwd_bwd(verl_loss_fn(mode), old, lp, adv, mask), reps=args.reps)
        t_ours = timeit(fwd_bwd(ours_loss_fn(mode), old, lp, adv, mask), reps=args.reps)
        gbs = moved / t_ours
        print(f"{mode:9} {t_ref * 1e3:9.2f} {t_ours * 1e3:12.2f} {t_ref / t_ours:8.1f}x {gbs / 1e9:7.2f} {gbs / bw:9.0%}")
    # a compiled step: torch.compile(fullgraph=True) over the call (the
    # luspo_rs::policy_loss op), against verl's loss compiled the same way
    # (Dynamo graph-breaks at verl's .item() calls there, so not fullgraph)
    import logging

    torch._logging.set_logs(dynamo=logging.ERROR)  # (Dynamo's notes on verl's graph breaks)
    mode = "luspo"
    t_ref = timeit(fwd_bwd(torch.compile(verl_loss_fn(mode)), old, lp, adv, mask), reps=args.reps, warmup=3)
    t_ours = timeit(fwd_bwd(torch.compile(ours_loss_fn(mode), fullgraph=True), old, lp, adv, mask), reps=args.reps, warmup=3)
    gbs = moved / t_ours
    name = "luspo, compiled"
    print(f"{name:9} {t_ref * 1e3:9.2f} {t_ours * 1e3:12.2f} {t_ref / t_ours:8.1f}x {gbs / 1e9:7.2f} {gbs / bw:9.0%}")


if __name__ == "__main__":
    main()
