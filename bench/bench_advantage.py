"""GRPO outcome advantage: luspo-rs against verl's ``grpo`` and ``grpo_vectorized``,
measured in one run, end to end (uid-string index handling included).

The estimator reads ``token_level_rewards`` and ``response_mask`` and writes the
B×T advantages, so it is bound by memory bandwidth: the table prints the bytes
per second it achieves next to the streaming bandwidth of a large torch copy
(and a numpy copy) measured in the same run.

    python bench/bench_advantage.py                 # B=16384, groups of 16, T=1024
    python bench/bench_advantage.py --batch 4096 --length 512 --repeat 5
"""

from __future__ import annotations

import argparse
import statistics
import time
import uuid

import numpy as np
import torch


def timeit(fn, repeat: int, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` in seconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def streaming_bandwidth(nbytes: int, repeat: int) -> dict[str, float]:
    """Bytes/s of large copies (read + write counted): torch (all threads) and numpy."""
    src = torch.rand(nbytes // 4)
    dst = torch.empty_like(src)
    t_torch = timeit(lambda: dst.copy_(src), repeat)
    a, b = src.numpy(), dst.numpy()
    t_np = timeit(lambda: np.copyto(b, a), repeat)
    return {"torch copy": 2 * nbytes / t_torch, "numpy copy": 2 * nbytes / t_np}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=16384)
    ap.add_argument("--group", type=int, default=16)
    ap.add_argument("--length", type=int, default=1024)
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--mask-dtype", default="int64", choices=["int64", "bool", "float32"],
                    help="dtype of response_mask (verl's is the int64 attention mask slice)")  # fmt: skip
    ap.add_argument("--skip-loop", action="store_true", help="skip verl's (slow) python-loop grpo")
    args = ap.parse_args()

    from verl.trainer.ppo import core_algos as verl_ca

    import luspo_rs
    from luspo_rs import _alloc as ours_alloc
    from luspo_rs import core_algos as ours

    B, T, G = args.batch, args.length, args.group
    rng = np.random.default_rng(0)
    uids = [str(uuid.uuid4()) for _ in range(B // G)]
    index = np.array([uids[i // G] for i in range(B)], dtype=object)  # as verl's non_tensor_batch["uid"]
    lengths = torch.from_numpy(rng.integers(1, T + 1, size=B))
    mask = (torch.arange(T)[None, :] < lengths[:, None]).to(getattr(torch, args.mask_dtype))
    rewards = torch.zeros(B, T)
    rewards[torch.arange(B), lengths - 1] = torch.from_numpy(rng.integers(0, 2, size=B)).float()

    nbytes = rewards.numel() * rewards.element_size() + mask.numel() * mask.element_size()
    nbytes += rewards.numel() * 4  # the float32 advantages written
    bw = streaming_bandwidth(max(nbytes // 2, 1 << 26), args.repeat)
    stream = max(bw.values())

    want = verl_ca.compute_grpo_vectorized_outcome_advantage(rewards, mask, index)[0]
    got = ours.compute_grpo_outcome_advantage(rewards, mask, index)[0]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)

    rows = []
    t_ours = timeit(lambda: ours.compute_grpo_outcome_advantage(rewards, mask, index), args.repeat)
    rows.append(("luspo_rs grpo", t_ours))
    def cold():  # no idle output buffer to reuse: a fresh huge-page mapping is faulted in
        ours_alloc.pool.clear()
        ours.compute_grpo_outcome_advantage(rewards, mask, index)

    rows.append(("luspo_rs grpo (cold)", timeit(cold, args.repeat)))
    t_ids = timeit(lambda: ours.group_index(index), args.repeat)
    t_vec = timeit(lambda: verl_ca.compute_grpo_vectorized_outcome_advantage(rewards, mask, index), max(args.repeat // 2, 1))
    rows.append(("verl grpo_vectorized", t_vec))
    t_loop = None
    if not args.skip_loop:
        t_loop = timeit(lambda: verl_ca.compute_grpo_outcome_advantage(rewards, mask, index), 1, warmup=0)
        rows.append(("verl grpo (loop)", t_loop))

    print(f"GRPO advantage, B={B} (groups of {G}, uid strings), T={T}, rewards float32, mask {args.mask_dtype};"
          f" {luspo_rs.num_threads()} threads, torch {torch.get_num_threads()} threads")  # fmt: skip
    print(f"bytes moved per call (read rewards + mask, write advantages): {nbytes / 1e6:.1f} MB")
    for name, v in bw.items():
        print(f"streaming bandwidth ({name}, read+write): {v / 1e9:.2f} GB/s")
    print()
    print(f"{'implementation':<24}{'time (ms)':>12}{'GB/s':>10}{'x of stream':>13}{'luspo_rs speed-up':>20}")
    for name, t in rows:
        print(f"{name:<24}{t * 1e3:>12.2f}{nbytes / t / 1e9:>10.2f}{nbytes / t / stream:>13.2f}{t / t_ours:>19.1f}x")
    print(f"(of which luspo_rs uid -> group id mapping: {t_ids * 1e3:.2f} ms; 'cold': every call maps and"
          " faults in a new output buffer, otherwise the previous call's freed buffer is reused)")  # fmt: skip
    print()
    ok_bw = nbytes / t_ours >= 0.5 * stream
    ok_vec = t_vec / t_ours >= 5
    print(f"target >= 0.5 x streaming bandwidth: {'met' if ok_bw else 'NOT met'} ({nbytes / t_ours / stream:.2f})")
    print(f"target >= 5x verl grpo_vectorized: {'met' if ok_vec else 'NOT met'} ({t_vec / t_ours:.1f}x)")
    if t_loop is not None:
        ok_loop = t_loop / t_ours >= 20
        print(f"target >= 20x verl grpo: {'met' if ok_loop else 'NOT met'} ({t_loop / t_ours:.1f}x)")


if __name__ == "__main__":
    main()
