"""What only CUDA tensors need around the native calls, which are otherwise
the same on both devices (see :mod:`luspo_rs._args`):

* the caller's stream: the kernels run on torch's current stream and return
  at once; nothing here reads a value back to the host;
* NVRTC's location: the ``lib`` directories of torch's ``nvidia-*`` wheels;
* normalisers given as CUDA 0-d tensors, as verl's actors compute them: they
  are never ``.item()``-ed; the kernels run with 1 in their place and
  multiply the loss and the gradient by their combined ``factor``, a float64
  device scalar. Their values cannot be validated without a sync, so a CUDA
  normaliser that is 0 or NaN gives a NaN / inf loss instead of a ValueError;
* the group advantages' inputs: the labels as an int64 device vector plus a
  stable argsort of it (each group a contiguous run, in row order), computed
  on the host where the labels live and copied in one non-blocking copy from
  pinned memory, and the kernels' float64 scratch.

Backward multiplies the saved gradient by ``grad_output`` in place on the
device and leaves it untouched when ``grad_output`` is 1, without a sync;
the buffer then becomes the gradient, without a copy.
"""

from __future__ import annotations

import glob
import os
from typing import Any, Callable, Optional

import torch

from . import _core

def nvrtc_dirs() -> list[str]:
    """``lib`` directories of PyTorch's ``nvidia-*`` wheels that hold an
    NVRTC, the one matching torch's CUDA major version first."""
    site = os.path.dirname(os.path.dirname(torch.__file__))
    found = glob.glob(os.path.join(site, "nvidia", "*", "lib", "libnvrtc.so*"))
    found += glob.glob(os.path.join(site, "nvidia", "*", "bin", "nvrtc64*.dll"))
    dirs = sorted({os.path.dirname(p) for p in found if "builtins" not in os.path.basename(p)})
    major = (torch.version.cuda or "").split(".")[0]
    dirs.sort(key=lambda d: not any(os.path.basename(p).startswith(f"libnvrtc.so.{major}") for p in glob.glob(d + "/*")))
    return dirs


_core.cuda_set_nvrtc_hints(nvrtc_dirs())

NORMALISERS = ("dp_size", "batch_num_tokens", "global_batch_size", "loss_scale_factor")


@torch.compiler.assume_constant_result
def _sim_on() -> bool:
    # (a graph compiled by torch.compile keeps the simulator's state it was traced with)
    return _core.sim_enabled()


def on_device(x: torch.Tensor) -> bool:
    """Whether ``x`` goes to the CUDA kernels: a CUDA tensor, or, with the
    simulator on (``LUSPO_RS_CUDA=sim``), a CPU tensor, which is then the
    simulated ``cuda:0``."""
    return x.is_cuda or (x.device.type == "cpu" and _sim_on())


def split_normalisers(agg_mode: str, values: dict[str, Any], device: torch.device, as_float) -> tuple[dict, Optional[torch.Tensor]]:
    """Host options for the native call, and the device factor (or None)
    that ``loss`` and ``scale`` are multiplied by afterwards.

    A normaliser given as a CUDA tensor is passed to the kernels as 1.0 and
    folded into the factor (``dp_size`` multiplies, the divisors of
    ``agg_mode`` divide; unused ones are ignored, as verl ignores them).
    """
    host: dict[str, Optional[float]] = {}
    factor: Optional[torch.Tensor] = None
    used = _core.agg_divisors(agg_mode)  # (the native rule: ops::agg_loss::AggMode::divisors)
    for name in NORMALISERS:
        v = values[name]
        if isinstance(v, torch.Tensor) and on_device(v):
            if v.numel() != 1:
                raise ValueError(f"{name}: expected a scalar, got a tensor of shape {tuple(v.shape)}")
            if v.device != device:
                raise ValueError(f"{name}: is on {v.device} but log_prob is on {device}")
            host[name] = 1.0
            t = v.detach().reshape(()).to(torch.float64)
            if name == "dp_size":
                factor = t if factor is None else factor * t
            elif name in used:
                factor = 1.0 / t if factor is None else factor / t
        else:
            host[name] = as_float(name, v)
    return host, factor


def stream_of(x: torch.Tensor) -> int:
    """The ``CUstream`` handle of torch's current stream on ``x``'s device
    (0, the one stream, on the simulator)."""
    return _current_stream(x.get_device()) if x.is_cuda else 0


def _current_stream_public(index: int) -> int:
    return torch.cuda.current_stream(index).cuda_stream


# torch's raw query (the one Triton uses) returns the handle without building a Stream object.
_current_stream = getattr(torch._C, "_cuda_getCurrentRawStream", _current_stream_public)


def advantage_inputs(
    rewards: torch.Tensor, labels: torch.Tensor, scratch_len: Callable[[int], int] = _core.advantage_scratch_len
) -> tuple[torch.Tensor, dict[str, Any]]:
    """What the advantage kernels need besides the inputs: the integer group
    labels on ``rewards``' device (one non-blocking copy from the host), a
    stable argsort of them (``order``), the float64 ``scratch`` (of
    ``scratch_len(rows)`` values) and the caller's ``stream``."""
    device = rewards.device
    labels = labels.to(torch.int64)
    order = torch.sort(labels, stable=True).indices
    if labels.device.type == "cpu" and device.type == "cuda":
        groups = torch.stack((labels, order)).pin_memory().to(device, non_blocking=True)
        labels, order = groups[0], groups[1]
    rows = rewards.shape[0] if rewards.dim() > 0 else 0
    scratch = torch.empty(scratch_len(rows), dtype=torch.float64, device=device)
    return labels, dict(order=order, scratch=scratch, stream=stream_of(rewards))
