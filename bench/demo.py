"""The timing demo: one LUSPO policy-loss step on a realistic synthetic rollout
batch, through luspo-rs and through verl 0.9.1's own code, side by side.

    make bench           # or: .venv/bin/python bench/demo.py [--B 512 --T 4096]

The batch: B responses padded to T tokens with lengths uniform in [T/16, T],
old/new log-probs a small policy step apart, and GRPO group-relative
advantages of 0/1 rewards in groups of 8. verl has no LUSPO loss, so its
reference is built from verl's pieces: the GSPO per-token loss aggregated
``seq-mean-token-sum`` (what LUSPO is). Prints the loss of each, the largest
gradient difference, and the time of forward + backward of each.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import rollout_batch, timeit  # noqa: E402

import luspo_rs  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--B", type=int, default=512)
    ap.add_argument("--T", type=int, default=4096)
    args = ap.parse_args(argv)

    from verl.trainer.ppo import core_algos
    from verl.workers.config import ActorConfig

    old, lp, adv, mask = rollout_batch(args.B, args.T)
    cfg = ActorConfig(strategy="fsdp", clip_ratio=0.2, clip_ratio_low=0.2, clip_ratio_high=0.28,
                      ppo_micro_batch_size_per_gpu=1, rollout_n=1)

    x_ref = lp.clone().requires_grad_()
    x_ours = lp.clone().requires_grad_()

    def verl_step():
        x_ref.grad = None
        loss, _ = core_algos.compute_policy_loss_gspo(old, x_ref, adv, mask, "seq-mean-token-sum", cfg)
        loss.backward()
        return loss.detach(), x_ref.grad

    def ours_step():
        x_ours.grad = None
        loss, metrics = luspo_rs.policy_loss(old, x_ours, adv, mask, mode="luspo", clip_ratio=0.2, clip_ratio_high=0.28)
        loss.backward()
        return loss.detach(), x_ours.grad, metrics

    ref_loss, ref_grad = verl_step()
    loss, grad, metrics = ours_step()
    t_ref = timeit(verl_step, reps=5)
    t_ours = timeit(ours_step, reps=5)

    print(f"LUSPO on a synthetic rollout batch: B={args.B}, T={args.T}, {int(mask.sum())} valid tokens, fp32, "
          f"{luspo_rs.num_threads()} threads")
    print(f"  verl 0.9.1 (GSPO token loss + seq-mean-token-sum): loss {ref_loss.item():+.8f}  "
          f"forward+backward {t_ref * 1e3:8.2f} ms")
    print(f"  luspo-rs                                         : loss {loss.item():+.8f}  "
          f"forward+backward {t_ours * 1e3:8.2f} ms")
    print(f"  |loss difference| {abs(loss.item() - ref_loss.item()):.3e}   "
          f"max |gradient difference| {(grad - ref_grad).abs().max().item():.3e}   "
          f"speed-up {t_ref / t_ours:.1f}x")
    print("  metrics: " + ", ".join(f"{k}={v.item():.6f}" for k, v in metrics.items()))


if __name__ == "__main__":
    main()
