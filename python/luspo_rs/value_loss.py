"""verl's clipped value (critic) loss, fused with its gradient: its autograd
Function and the public entry point :func:`value_loss`.

It runs the policy loss's native pipeline with a value rule
(``src/ops/value_loss.rs``): one pass over ``B x T`` writes the loss, the
``vf_clipfrac`` metric and ``d loss / d vpreds``; only that gradient is saved
for backward. CUDA tensors run on the caller's current stream, without a
host sync.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import _core
from ._args import Number, as_float, as_tensor, check_entry, gradient, keep_gradient, loss_buffers, normalisers
from ._args import BUILD, half_gradient, refuse_double_backward, register_loss_autograd, result_dtype, saved_inputs, stream_of
from .agg_loss import AggMode


class ValueLossFunction(torch.autograd.Function):
    """Fused value loss; differentiable in ``vpreds`` only (``values`` and
    ``returns`` are data, as in verl's critic). Backward hands forward's
    gradient over once, and computes it again for a later backward through a
    retained graph (see :func:`luspo_rs._args.gradient`)."""

    @staticmethod
    def forward(ctx, vpreds, values, returns, response_mask, options, factor, loss_dtype):
        ctx.set_materialize_grads(False)
        grad, loss, metrics, scratch = loss_buffers(vpreds, loss_dtype, metrics=True)
        _core.value_loss(
            vpreds.detach(), values, returns, response_mask, grad, loss, metrics,
            factor=factor, scratch=scratch, stream=stream_of(vpreds), **options,
        )  # fmt: skip
        # float16: a gradient computed for a seed of 1 may overflow where the
        # seeded one fits, so backward recomputes it with the seed as `factor`
        ctx.half = vpreds.dtype == torch.float16
        ctx.rerun = (options, factor)
        keep_gradient(ctx, grad, vpreds.detach(), values, returns, response_mask)
        clipfrac = metrics[0]
        ctx.mark_non_differentiable(clipfrac)
        return loss, clipfrac

    @staticmethod
    def backward(ctx, grad_loss, _grad_clipfrac):
        none = (None,) * 6
        if grad_loss is None:  # only the metric was used
            return (None, *none)
        refuse_double_backward("luspo_rs.value_loss")
        if ctx.half:
            return (half_gradient(ctx, grad_loss, _run_again), *none)
        return (gradient(ctx, grad_loss, lambda: _run_again(ctx, ctx.rerun[1])), *none)


def _run_again(ctx, factor: Optional[torch.Tensor]) -> torch.Tensor:
    """The gradient forward wrote, computed again from the saved inputs into
    a new buffer, with ``factor`` in the aggregation's scale."""
    vpreds, values, returns, mask = saved_inputs(ctx)
    options, _ = ctx.rerun
    grad, loss, metrics, scratch = loss_buffers(vpreds, torch.float64, metrics=True)
    _core.value_loss(
        vpreds, values, returns, mask, grad, loss, metrics, factor=factor, scratch=scratch,
        stream=stream_of(vpreds), **options,
    )  # fmt: skip
    return grad


# `luspo_rs::value_loss`: the native call as a torch.library op, used under
# torch.compile (fullgraph traces it; fake tensors infer its outputs); eager
# calls keep ValueLossFunction (see policy_loss.py's op, the same pattern).


@torch.library.custom_op("luspo_rs::value_loss", mutates_args=())
def _value_loss_op(
    vpreds: torch.Tensor,
    values: torch.Tensor,
    returns: torch.Tensor,
    response_mask: torch.Tensor,
    factor: Optional[torch.Tensor],
    cliprange_value: float,
    loss_agg_mode: str,
    dp_size: Optional[float],
    batch_num_tokens: Optional[float],
    global_batch_size: Optional[float],
    loss_scale_factor: Optional[float],
    loss_dtype: torch.dtype,
    *,
    build: str = "",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(loss, vf_clipfrac, d loss / d vpreds)`` (``build``: see ``_args.BUILD``)."""
    grad, loss, metrics, scratch = loss_buffers(vpreds, loss_dtype, metrics=True)
    _core.value_loss(
        vpreds, values, returns, response_mask, grad, loss, metrics, factor=factor, scratch=scratch,
        stream=stream_of(vpreds), cliprange_value=cliprange_value, loss_agg_mode=loss_agg_mode, dp_size=dp_size,
        batch_num_tokens=batch_num_tokens, global_batch_size=global_batch_size, loss_scale_factor=loss_scale_factor,
    )  # fmt: skip
    return loss, metrics[0].clone(), grad


@_value_loss_op.register_fake
def _(vpreds, values, returns, response_mask, factor, *args, build=""):
    return (
        vpreds.new_empty((), dtype=args[-1]),
        vpreds.new_empty((), dtype=torch.float64),
        torch.empty_like(vpreds, memory_format=torch.contiguous_format),
    )


register_loss_autograd(_value_loss_op, wrt=0)


def _compiled_value_loss(vpreds, values, returns, response_mask, options, factor, loss_dtype):
    loss, clipfrac, _ = _value_loss_op(
        vpreds, values, returns, response_mask, factor, options["cliprange_value"], options["loss_agg_mode"],
        options["dp_size"], options["batch_num_tokens"], options["global_batch_size"], options["loss_scale_factor"],
        loss_dtype, build=BUILD,
    )  # fmt: skip
    return loss, clipfrac


def value_loss(
    vpreds: torch.Tensor,
    values: torch.Tensor,
    returns: torch.Tensor,
    response_mask: torch.Tensor,
    cliprange_value: float,
    loss_agg_mode: AggMode = "token-mean",
    *,
    dp_size: Number = 1,
    batch_num_tokens: Optional[Number] = None,
    global_batch_size: Optional[Number] = None,
    loss_scale_factor: Optional[Number] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """verl's clipped value loss (``compute_value_loss``), fused with its gradient.

    Per token, with ``c = cliprange_value``:
    ``vc = max(min(vpreds, values + c), values - c)`` (verl's ``clip_by_value``),
    ``l1 = (vpreds - returns)^2``, ``l2 = (vc - returns)^2``; the loss is
    ``0.5 * agg_loss(max(l1, l2))`` with ``loss_agg_mode`` and verl's
    normalisers (see :func:`luspo_rs.agg_loss`), and
    ``vf_clipfrac = masked_mean(l2 > l1, response_mask)``.

    Args:
        vpreds: ``(B, T)`` float tensor, the critic's predictions (differentiated).
        values, returns: ``(B, T)`` float tensors (the old values, the returns).
        response_mask: ``(B, T)`` bool, integer or float mask.
        cliprange_value: finite, ``>= 0``.

    Returns:
        ``(loss, vf_clipfrac)``: ``loss`` a scalar in torch's promotion of the
        inputs' dtypes (verl's, except that its sequence modes return float32
        for 16-bit inputs), differentiable in ``vpreds`` (torch's conventions:
        a prediction on a clip bound or a tie of ``l1`` and ``l2`` splits the
        gradient in half); ``vf_clipfrac`` a 0-d float64 tensor on the inputs'
        device (verl's is float32).
    """
    check_entry("luspo_rs.value_loss", "vpreds", vpreds, loss_agg_mode=loss_agg_mode)
    c = as_float("cliprange_value", cliprange_value)
    if c is None:
        raise TypeError("cliprange_value: expected a number, got NoneType")
    options = dict(cliprange_value=c, loss_agg_mode=loss_agg_mode)
    norms, factor = normalisers(vpreds, loss_agg_mode, dp_size, batch_num_tokens, global_batch_size, loss_scale_factor)
    options.update(norms)
    values = as_tensor("values", values)
    returns = as_tensor("returns", returns)
    response_mask = as_tensor("response_mask", response_mask)
    loss_dtype = result_dtype(vpreds=vpreds, values=values, returns=returns, response_mask=response_mask)
    call = _compiled_value_loss if torch.compiler.is_compiling() else ValueLossFunction.apply
    return call(vpreds, values, returns, response_mask, options, factor, loss_dtype)
