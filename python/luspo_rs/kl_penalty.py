"""verl's KL penalty estimators: the autograd Function and the public entry
point :func:`kl_penalty`."""

from __future__ import annotations

from typing import Literal

import torch

from . import _core
from ._args import BUILD, refuse_double_backward, require_strings, require_tensors, stream_of, torch_clamp_closed

KlMode = Literal[
    "kl", "k1", "abs", "mse", "k2", "low_var_kl", "k3",
    "kl+", "k1+", "abs+", "mse+", "k2+", "low_var_kl+", "k3+",
]  # fmt: skip

#: Devices the native module has kernels for; others take :func:`_kl_penalty_torch`.
_NATIVE_DEVICES = ("cpu", "cuda")


class KlPenaltyFunction(torch.autograd.Function):
    """Elementwise KL estimate; differentiable in both inputs. Saves only
    ``d out / d logprob`` (``d out / d ref_logprob`` is its negative)."""

    @staticmethod
    def forward(ctx, logprob, ref_logprob, mode):
        dtype = torch.promote_types(logprob.dtype, ref_logprob.dtype)
        out = torch.empty(logprob.shape, dtype=dtype, device=logprob.device)
        grad = None
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            grad = torch.empty(logprob.shape, dtype=dtype, device=logprob.device)
        _core.kl_penalty(
            logprob.detach(), ref_logprob.detach(), out, grad, mode, clamp_closed=torch_clamp_closed(), stream=stream_of(logprob)
        )
        ctx.save_for_backward(grad)
        ctx.dtypes = (logprob.dtype, ref_logprob.dtype)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        refuse_double_backward("luspo_rs.kl_penalty")
        (grad,) = ctx.saved_tensors
        g = grad_out * grad
        d_lp = g.to(ctx.dtypes[0]) if ctx.needs_input_grad[0] else None
        d_ref = (-g).to(ctx.dtypes[1]) if ctx.needs_input_grad[1] else None
        return d_lp, d_ref, None


# ---------------------------------------------------------------- the torch.library op
#
# `luspo_rs::kl_penalty` is the same native call as a torch.library custom op,
# so that torch.compile traces it (fullgraph, no graph break), fake tensors
# infer its shape and dtype, and torch.export sees it. Eager calls keep the
# autograd.Function above (the dispatcher's extra host time would be paid on
# every small call); under torch.compile the op is used.


@torch.library.custom_op("luspo_rs::kl_penalty", mutates_args=())
def _kl_penalty_op(
    logprob: torch.Tensor, ref_logprob: torch.Tensor, mode: str, clamp_closed: bool, with_grad: bool, *, build: str = ""
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, d out / d logprob)`` of 2-D inputs (the gradient is empty
    unless ``with_grad``)."""
    dtype = torch.promote_types(logprob.dtype, ref_logprob.dtype)
    out = torch.empty(logprob.shape, dtype=dtype, device=logprob.device)
    grad = torch.empty(logprob.shape if with_grad else (0,), dtype=dtype, device=logprob.device)
    _core.kl_penalty(
        logprob, ref_logprob, out, grad if with_grad else None, mode, clamp_closed=clamp_closed, stream=stream_of(logprob)
    )
    return out, grad


@_kl_penalty_op.register_fake
def _(logprob, ref_logprob, mode, clamp_closed, with_grad, *, build=""):
    dtype = torch.promote_types(logprob.dtype, ref_logprob.dtype)
    out = logprob.new_empty(logprob.shape, dtype=dtype)
    return out, logprob.new_empty(logprob.shape if with_grad else (0,), dtype=dtype)


def _kl_setup(ctx, inputs, output, keyword_only_inputs=None):
    logprob, ref_logprob = inputs[:2]
    ctx.save_for_backward(output[1])
    ctx.dtypes = (logprob.dtype, ref_logprob.dtype)


def _kl_backward(ctx, grad_out, _grad_grad):
    (grad,) = ctx.saved_tensors
    g = grad_out * grad
    return g.to(ctx.dtypes[0]), (-g).to(ctx.dtypes[1]), None, None, None


_kl_penalty_op.register_autograd(_kl_backward, setup_context=_kl_setup)


def _kl_2d(logprob: torch.Tensor, ref_logprob: torch.Tensor, mode: str) -> torch.Tensor:
    if torch.compiler.is_compiling():
        with_grad = torch.is_grad_enabled() and (logprob.requires_grad or ref_logprob.requires_grad)
        return _kl_penalty_op(logprob, ref_logprob, mode, torch_clamp_closed(), with_grad, build=BUILD)[0]
    return KlPenaltyFunction.apply(logprob, ref_logprob, mode)


def kl_penalty(logprob: torch.Tensor, ref_logprob: torch.Tensor, kl_penalty: KlMode) -> torch.Tensor:
    """verl's ``kl_penalty``, fused, elementwise: with ``d = logprob - ref_logprob``,

    * ``kl`` / ``k1``: ``d``;  ``abs``: ``|d|``;  ``mse`` / ``k2``: ``d^2 / 2``;
    * ``low_var_kl`` / ``k3``: ``clamp(exp(k) - k - 1, -10, 10)`` with ``k = clamp(-d, -20, 20)``;
    * a ``+`` suffix keeps the value and takes the gradient of ``k2`` (straight-through).

    Tensors of equal shape, any rank; the result has torch's promotion of
    their dtypes and is differentiable in both (once: ``create_graph=True``
    raises). An empty input gives verl's empty result.
    """
    require_strings(kl_penalty=kl_penalty)
    require_tensors(logprob=logprob, ref_logprob=ref_logprob)
    if logprob.device.type not in _NATIVE_DEVICES or ref_logprob.device.type not in _NATIVE_DEVICES:
        return _kl_penalty_torch(logprob, ref_logprob, kl_penalty)
    if logprob.numel() == 0 and logprob.shape == ref_logprob.shape:
        # an empty batch or response: verl returns an empty tensor (torch ops on
        # no elements cost nothing; the mode is still checked there)
        for name, t in (("logprob", logprob), ("ref_logprob", ref_logprob)):
            if not t.is_floating_point():
                raise TypeError(f"{name}: expected a floating-point tensor, got {t.dtype}")
        return _kl_penalty_torch(logprob, ref_logprob, kl_penalty)
    shape = logprob.shape
    if logprob.dim() != 2 and logprob.shape == ref_logprob.shape:
        cols = shape[-1] if logprob.dim() > 0 else 1
        out = _kl_2d(logprob.reshape(-1, cols), ref_logprob.reshape(-1, cols), kl_penalty)
        return out.reshape(shape)
    return _kl_2d(logprob, ref_logprob, kl_penalty)


def _kl_penalty_torch(logprob: torch.Tensor, ref_logprob: torch.Tensor, mode: str) -> torch.Tensor:
    """The same estimators in plain torch ops, for devices the native module
    has no kernel for (neither CPU nor CUDA, e.g. MPS): autograd
    differentiates them as verl's."""
    base, straight_through = (mode[:-1], True) if mode.endswith("+") else (mode, False)
    d = logprob - ref_logprob
    if base in ("kl", "k1"):
        value = d
    elif base == "abs":
        value = d.abs()
    elif base in ("mse", "k2"):
        value = 0.5 * d.square()
    elif base in ("low_var_kl", "k3"):
        k = (-d).clamp(-20.0, 20.0)
        value = (k.exp() - k - 1.0).clamp(-10.0, 10.0)
    else:
        raise ValueError(
            f"kl_penalty: unknown kl_penalty {mode!r}; expected one of 'kl', 'k1', 'abs', 'mse', 'k2', "
            "'low_var_kl', 'k3', optionally with a '+' suffix"
        )
    if not straight_through:
        return value
    k2 = 0.5 * d.square()
    return k2 - k2.detach() + value.detach()
