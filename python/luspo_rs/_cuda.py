"""The CUDA side of :mod:`luspo_rs.functional` and :mod:`luspo_rs.core_algos`.

For CUDA tensors the native kernels (``src/cuda``) run on the caller's
current stream and return at once: nothing here reads a value back to the
host. torch allocates every buffer the kernels write. A policy loss or
``agg_loss`` call writes

* ``grad`` — the final ``d loss / d x`` (the one ``B x T`` buffer);
* ``loss`` — a 0-d float tensor (the dtype of verl's loss), and for the policy loss
  ``metrics``, float64 ``[pg_clipfrac, ppo_kl, pg_clipfrac_lower]``;
* ``scratch`` — float64 row sums and two tickets, ``cuda_loss_scratch_len(B)``.

Backward multiplies the saved ``grad`` by ``grad_output`` in place on the
device, and leaves it untouched when ``grad_output`` is 1 (``loss.backward()``),
so the gradient costs one ``B x T`` write in all. The buffer is then handed to
autograd as the gradient, without a copy. Because it may have been scaled in
place, a second backward through the same graph (``retain_graph=True``) is
refused by autograd's saved-tensor version check.

``kl_penalty`` is elementwise (``out`` and ``d out / d logprob`` in one
kernel). The group advantages take the group labels as an int64 device
vector plus a stable argsort of it (each group a contiguous run, in row
order), computed on the host where the labels live and copied to the device
in one non-blocking copy from pinned memory, and a float64 scratch of
``5 * B + 2`` elements (row scores and mask moments, per-row scalars, the
batch whitening statistics).

Normalisers (``dp_size``, ``batch_num_tokens``, ``global_batch_size``,
``loss_scale_factor``) may be CUDA 0-d tensors, as verl's actors compute
them: they are never ``.item()``-ed; the kernels run with 1 in their place
and multiply the scale (so the loss and the gradient) by their combined
``factor``, a float64 device scalar. Their values cannot be validated
without a sync, so a CUDA normaliser that is 0 or NaN gives a NaN / inf loss
instead of a ValueError.
"""

from __future__ import annotations

import glob
import os
from typing import Any, Optional

import torch

from . import _core

#: Length of the policy loss's ``metrics`` buffer.
METRICS_LEN = 3


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

# Which normaliser each aggregation divides by (dp_size always multiplies).
_DIVISORS = {
    "token-mean": ("batch_num_tokens",),
    "token-sum": (),
    "seq-mean-token-sum": ("global_batch_size",),
    "seq-mean-token-mean": ("global_batch_size",),
    "seq-mean-token-sum-norm": ("global_batch_size", "loss_scale_factor"),
}
NORMALISERS = ("dp_size", "batch_num_tokens", "global_batch_size", "loss_scale_factor")


def split_normalisers(agg_mode: str, values: dict[str, Any], device: torch.device, as_float) -> tuple[dict, Optional[torch.Tensor]]:
    """Host options for the native call, and the device factor (or None)
    that ``loss`` and ``scale`` are multiplied by afterwards.

    A normaliser given as a CUDA tensor is passed to the kernels as 1.0 and
    folded into the factor (``dp_size`` multiplies, the divisors of
    ``agg_mode`` divide; unused ones are ignored, as verl ignores them).
    """
    host: dict[str, Optional[float]] = {}
    factor: Optional[torch.Tensor] = None
    used = _DIVISORS.get(agg_mode, ())
    for name in NORMALISERS:
        v = values[name]
        if isinstance(v, torch.Tensor) and v.device.type == "cuda":
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
    """The ``CUstream`` handle of torch's current stream on ``x``'s device."""
    return _current_stream(x.get_device())


def _current_stream_public(index: int) -> int:
    return torch.cuda.current_stream(index).cuda_stream


# torch's raw query (the one Triton uses) returns the handle without building a Stream object.
_current_stream = getattr(torch._C, "_cuda_getCurrentRawStream", _current_stream_public)


def _loss_buffers(x: torch.Tensor, loss_dtype: torch.dtype):
    """``grad``, ``loss`` (in ``loss_dtype``) and ``scratch`` of one loss-kernel call on ``x``."""
    device = x.device
    grad = torch.empty(x.shape, dtype=x.dtype, device=device)
    loss = torch.empty((), dtype=loss_dtype, device=device)
    rows = x.shape[0] if x.dim() > 0 else 0
    scratch = torch.empty(_core.cuda_loss_scratch_len(rows), dtype=torch.float64, device=device)
    return grad, loss, scratch


def policy_forward(ctx, log_prob, old_log_prob, advantages, response_mask, rollout_is_weights, options, factor, loss_dtype):
    """Forward of ``PolicyLossFunction`` for CUDA tensors; returns ``(loss, metrics)``."""
    grad, loss, scratch = _loss_buffers(log_prob, loss_dtype)
    metrics = torch.empty(METRICS_LEN, dtype=torch.float64, device=log_prob.device)
    _core.policy_loss(
        old_log_prob,
        log_prob.detach(),
        advantages,
        response_mask,
        grad,
        metrics,
        rollout_is_weights=rollout_is_weights,
        loss=loss,
        scratch=scratch,
        factor=factor,
        stream=stream_of(log_prob),
        **options,
    )
    ctx.save_for_backward(grad)
    ctx.mark_non_differentiable(metrics)
    return loss, metrics


def agg_forward(ctx, loss_mat, loss_mask, loss_agg_mode, options, factor, loss_dtype):
    """Forward of ``AggLossFunction`` for CUDA tensors; returns the loss."""
    grad, loss, scratch = _loss_buffers(loss_mat, loss_dtype)
    _core.agg_loss(
        loss_mat.detach(), loss_mask, grad, loss_agg_mode, out=loss, scratch=scratch, factor=factor,
        stream=stream_of(loss_mat), **options
    )
    ctx.save_for_backward(grad)
    return loss


def backward(ctx, grad_loss: torch.Tensor) -> torch.Tensor:
    """``grad * grad_output``, in place in the saved buffer (untouched when
    ``grad_output`` is 1), which then becomes the gradient."""
    (grad,) = ctx.saved_tensors
    _core.cuda_scale_grad(grad, grad_loss, stream_of(grad))
    torch.autograd.graph.increment_version(grad)
    return grad


def kl_penalty(logprob, ref_logprob, out, grad, mode, clamp_closed) -> None:
    """Queues the ``kl_penalty`` kernel on the current stream of ``logprob``'s device."""
    _core.kl_penalty(logprob, ref_logprob, out, grad, mode, clamp_closed=clamp_closed, stream=stream_of(logprob))


def advantage(estimator: str, rewards, mask, labels: torch.Tensor, dtype: torch.dtype, **params) -> torch.Tensor:
    """Queues a group advantage estimator on the current stream and returns
    the ``(B, T)`` output tensor (not yet computed: stream order guarantees
    it for every later use on that stream).

    ``labels``: integer group labels of the rows, on the host (one
    non-blocking copy to the device) or already on the device."""
    device = rewards.device
    labels = labels.to(torch.int64)
    order = torch.sort(labels, stable=True).indices
    if labels.device.type == "cpu":
        groups = torch.stack((labels, order)).pin_memory().to(device, non_blocking=True)
        labels, order = groups[0], groups[1]
    out = torch.empty(rewards.shape, dtype=dtype, device=device)
    rows = rewards.shape[0] if rewards.dim() > 0 else 0
    scratch = torch.empty(5 * rows + 2, dtype=torch.float64, device=device)
    _core.advantage(
        rewards, mask, labels, out, estimator=estimator, order=order, scratch=scratch, stream=stream_of(rewards), **params
    )
    return out
