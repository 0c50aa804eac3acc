"""Host cost of the CUDA path at a size where the GPU work is negligible.

One command on a GPU machine:  python bench/bench_cuda_host.py

At B=8, T=256 float32 it times, in this process and nothing else, the median
wall time (of 500 after 20 warm-up calls, three repeats) of

* the native call alone (``luspo_rs._core.policy_loss`` with 8 CUDA tensors:
  the DLPack imports, validation and the three launches), not synced;
* one ``luspo_rs.policy_loss`` forward + ``loss.backward()``, synced.
"""

from __future__ import annotations

import torch
from bench_cuda import CLIP, host_overhead_us, make_inputs

import luspo_rs
from luspo_rs import _core


def main():
    if not torch.cuda.is_available():
        raise SystemExit("bench_cuda_host.py needs a CUDA GPU (torch.cuda.is_available() is False)")
    old, lp, adv, mask = make_inputs(8, 256, torch.float32, seed=1)
    w = torch.rand_like(lp)
    grad = torch.empty_like(lp)
    loss = torch.empty((), device="cuda")
    metrics = torch.empty(_core.METRICS_LEN, dtype=torch.float64, device="cuda")
    scratch = torch.empty(_core.loss_scratch_len(8), dtype=torch.float64, device="cuda")
    stream = torch.cuda.current_stream().cuda_stream
    x = lp.clone().requires_grad_(True)

    def native():
        _core.policy_loss(old, lp, adv, mask, grad, loss, metrics, mode="luspo", loss_agg_mode="token-mean",
                          clip_ratio=0.2, rollout_is_weights=w, scratch=scratch, stream=stream)

    def step():
        x.grad = None
        luspo_rs.policy_loss(old, x, adv, mask, mode="luspo", **CLIP)[0].backward()

    runs = [(host_overhead_us(native, 500, sync=False), host_overhead_us(step, 500)) for _ in range(3)]
    print(f"GPU: {torch.cuda.get_device_name()}  torch {torch.__version__}")
    print("native call (8 CUDA tensors), us:", ", ".join(f"{a:.1f}" for a, _ in runs))
    print("forward + backward, synced, us:  ", ", ".join(f"{b:.1f}" for _, b in runs))


if __name__ == "__main__":
    main()
