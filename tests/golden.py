"""Bitwise fingerprints of the CPU path's outputs, for refactors that must
not change a single bit (issue 9: "the CPU path stays bitwise identical").

Every case draws its inputs from numpy's seeded generator (stable across
numpy and torch versions), runs one public op on the CPU, and records the
SHA-256 of each output's bytes. ``tests/test_golden.py`` recomputes them and
compares with ``tests/data/golden_cpu.json``, written by

    .venv/bin/python tests/golden.py --write

before a change that must keep the numbers (and never to make a failing
comparison pass: a difference is a behaviour change to explain).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import zlib
from pathlib import Path

import numpy as np
import torch

import luspo_rs
from luspo_rs import core_algos

PATH = Path(__file__).with_name("data") / "golden_cpu.json"

MODES = ("vanilla", "gspo", "luspo")
AGG_MODES = ("token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")
DTYPES = {"fp32": torch.float32, "fp64": torch.float64, "bf16": torch.bfloat16}
MASKS = {"bool": torch.bool, "f32": torch.float32, "i64": torch.int64}
KL_MODES = ("k1", "abs", "k2", "low_var_kl", "k3+")
ESTIMATORS = ("grpo", "grpo_vectorized", "rloo", "rloo_vectorized", "reinforce_plus_plus_baseline", "opo", "gpg")


def digest(t: torch.Tensor) -> str:
    """dtype, shape and the SHA-256 of the bytes (the first 24 hex digits)."""
    shape = list(t.shape)
    t = t.detach().contiguous().reshape(-1)
    h = hashlib.sha256(t.view(torch.uint8).numpy().tobytes()).hexdigest()[:24]
    return f"{str(t.dtype).removeprefix('torch.')}{shape}:{h}"


def batch(seed: int, B: int, T: int, spread: float = 0.4):
    rng = np.random.default_rng(seed)
    old = -3.0 * rng.random((B, T))
    lp = old + spread * rng.standard_normal((B, T))
    lengths = rng.integers(0, T + 1, size=B)  # some rows fully masked
    mask = np.arange(T)[None, :] < lengths[:, None]
    adv = rng.standard_normal((B, 1)).repeat(T, axis=1)
    w = 0.5 + rng.random((B, T))
    return [torch.from_numpy(a) for a in (old, lp, adv, mask, w)]


def cases():
    """(name, thunk) pairs; each thunk returns a list of output tensors."""
    shapes = {"7x301": (7, 301), "3x64": (3, 64), "1x1": (1, 1)}
    for mode in MODES:
        for agg in AGG_MODES:
            for dname, dtype in DTYPES.items():
                for sname, (B, T) in shapes.items():
                    for mname, mdtype in MASKS.items():
                        for weights in (False, True):
                            name = f"policy_loss/{mode}/{agg}/{dname}/{sname}/{mname}/w{int(weights)}"
                            seed = zlib.crc32(name.encode())

                            def run(mode=mode, agg=agg, dtype=dtype, B=B, T=T, mdtype=mdtype, weights=weights, seed=seed):
                                old, lp, adv, mask, w = batch(seed, B, T)
                                x = lp.to(dtype).requires_grad_(True)
                                loss, m = luspo_rs.policy_loss(
                                    old.to(dtype), x, adv.to(dtype), mask.to(mdtype), mode=mode, loss_agg_mode=agg,
                                    clip_ratio=0.2, clip_ratio_high=0.28,
                                    rollout_is_weights=w.to(dtype) if weights else None,
                                )  # fmt: skip
                                loss.backward()
                                return [loss, x.grad, *m.values()]

                            yield name, run
    for agg in AGG_MODES:
        for dname, dtype in DTYPES.items():
            for norm in ({}, dict(dp_size=2, batch_num_tokens=100, global_batch_size=13, loss_scale_factor=64)):

                def run(agg=agg, dtype=dtype, norm=norm):
                    _, lp, _, mask, _ = batch(99, 7, 301)
                    x = lp.to(dtype).requires_grad_(True)
                    loss = luspo_rs.agg_loss(x, mask, agg, **norm)
                    loss.backward()
                    return [loss, x.grad]

                yield f"agg_loss/{agg}/{dname}/{'global' if norm else 'local'}", run
    for kl in KL_MODES:
        for dname, dtype in (("fp32", torch.float32), ("fp64", torch.float64)):

            def run(kl=kl, dtype=dtype):
                old, lp, _, _, _ = batch(7, 5, 301, spread=3.0)
                a, b = lp.to(dtype).requires_grad_(True), old.to(dtype).requires_grad_(True)
                v = core_algos.kl_penalty(a, b, kl)
                v.sum().backward()
                return [v, a.grad, b.grad]

            yield f"kl_penalty/{kl}/{dname}", run
    for est in ESTIMATORS:
        for dname, dtype in (("fp32", torch.float32), ("fp64", torch.float64)):

            def run(est=est, dtype=dtype):
                rng = np.random.default_rng(5)
                rewards = torch.from_numpy(rng.standard_normal((24, 33))).to(dtype)
                lengths = rng.integers(1, 34, size=24)
                mask = torch.from_numpy(np.arange(33)[None, :] < lengths[:, None]).float()
                index = rng.integers(0, 7, size=24)
                fn = getattr(core_algos, f"compute_{est}_outcome_advantage")
                adv, ret = fn(token_level_rewards=rewards, response_mask=mask, index=index)
                return [adv, ret]

            yield f"advantage/{est}/{dname}", run


def fingerprints() -> dict[str, list[str]]:
    return {name: [digest(t) for t in run()] for name, run in cases()}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--write", action="store_true", help=f"write {PATH.name}")
    args = ap.parse_args()
    fp = fingerprints()
    if args.write:
        PATH.parent.mkdir(exist_ok=True)
        PATH.write_text(json.dumps(fp, indent=0, sort_keys=True) + "\n")
        print(f"wrote {len(fp)} cases to {PATH}")
    else:
        print(f"{len(fp)} cases")


if __name__ == "__main__":
    main()
