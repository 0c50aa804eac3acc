"""verl's loss aggregation: its autograd Function and the public entry
point :func:`agg_loss`."""

from __future__ import annotations

from typing import Literal, Optional

import torch

from . import _core
from ._args import Number, as_tensor, check_entry, loss_buffers, normalisers, result_dtype, stream_of
from ._args import BUILD, gradient, keep_gradient, register_loss_autograd, saved_inputs

AggMode = Literal["token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"]


class AggLossFunction(torch.autograd.Function):
    """verl's ``agg_loss``; differentiable in ``loss_mat``."""

    @staticmethod
    def forward(ctx, loss_mat, loss_mask, loss_agg_mode, options, factor, loss_dtype):
        grad, loss, _, scratch = loss_buffers(loss_mat, loss_dtype, metrics=False)
        _core.agg_loss(
            loss_mat.detach(),
            loss_mask,
            grad,
            loss,
            loss_agg_mode=loss_agg_mode,
            factor=factor,
            scratch=scratch,
            stream=stream_of(loss_mat),
            **options,
        )
        ctx.rerun = (loss_agg_mode, options, factor)
        keep_gradient(ctx, grad, loss_mat.detach(), loss_mask)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        none = (None,) * 5
        if torch.is_grad_enabled():
            # create_graph=True: agg_loss is linear in loss_mat, so its gradient
            # is the (unscaled) saved constant times grad_output, differentiably;
            # the buffer is not handed over, so it stays the unscaled constant
            grad = _run_again(ctx) if ctx.handed_over else ctx.saved_tensors[0]
            return (grad * grad_loss, *none)
        return (gradient(ctx, grad_loss, lambda: _run_again(ctx)), *none)


def _run_again(ctx) -> torch.Tensor:
    """The gradient forward wrote, computed again into a new buffer."""
    loss_mat, loss_mask = saved_inputs(ctx)
    loss_agg_mode, options, factor = ctx.rerun
    grad, loss, _, scratch = loss_buffers(loss_mat, torch.float64, metrics=False)
    _core.agg_loss(
        loss_mat, loss_mask, grad, loss, loss_agg_mode=loss_agg_mode, factor=factor, scratch=scratch,
        stream=stream_of(loss_mat), **options,
    )  # fmt: skip
    return grad


# `luspo_rs::agg_loss`: the native call as a torch.library op, used under
# torch.compile; eager calls keep AggLossFunction (see policy_loss.py's op).
# Its gradient is the constant `d loss / d loss_mat` times grad_output, so a
# compiled graph differentiates it twice as the eager one does.


@torch.library.custom_op("luspo_rs::agg_loss", mutates_args=())
def _agg_loss_op(
    loss_mat: torch.Tensor,
    loss_mask: torch.Tensor,
    factor: Optional[torch.Tensor],
    loss_agg_mode: str,
    dp_size: Optional[float],
    batch_num_tokens: Optional[float],
    global_batch_size: Optional[float],
    loss_scale_factor: Optional[float],
    loss_dtype: torch.dtype,
    *,
    build: str = "",
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loss, d loss / d loss_mat)`` (``build``: see ``_args.BUILD``)."""
    grad, loss, _, scratch = loss_buffers(loss_mat, loss_dtype, metrics=False)
    _core.agg_loss(
        loss_mat, loss_mask, grad, loss, loss_agg_mode=loss_agg_mode, factor=factor, scratch=scratch,
        stream=stream_of(loss_mat), dp_size=dp_size, batch_num_tokens=batch_num_tokens,
        global_batch_size=global_batch_size, loss_scale_factor=loss_scale_factor,
    )  # fmt: skip
    return loss, grad


@_agg_loss_op.register_fake
def _(loss_mat, loss_mask, factor, *args, build=""):
    return loss_mat.new_empty((), dtype=args[-1]), torch.empty_like(loss_mat, memory_format=torch.contiguous_format)


register_loss_autograd(_agg_loss_op, wrt=0)


def agg_loss(
    loss_mat: torch.Tensor,
    loss_mask: torch.Tensor,
    loss_agg_mode: AggMode = "token-mean",
    *,
    dp_size: Number = 1,
    batch_num_tokens: Optional[Number] = None,
    global_batch_size: Optional[Number] = None,
    loss_scale_factor: Optional[Number] = None,
) -> torch.Tensor:
    """Aggregates a ``(B, T)`` loss matrix into a scalar exactly as verl's
    ``agg_loss``, with ``L_i = sum_t m_it``:

    * ``token-mean``: ``sum(l m) / batch_num_tokens * dp_size`` (default ``sum(m)``);
    * ``token-sum``: ``sum(l m) * dp_size``;
    * ``seq-mean-token-sum``: ``sum_{i: L_i>0} sum_t l m / global_batch_size * dp_size``
      (default ``global_batch_size`` = rows with ``L_i > 0``);
    * ``seq-mean-token-mean``: as above with each row divided by ``L_i + 1e-8``;
    * ``seq-mean-token-sum-norm``: ``seq-mean-token-sum / loss_scale_factor`` (default ``T``).

    Returns a scalar in the dtype torch gives ``loss_mat * loss_mask``
    (``loss_mat``'s, promoted with a float mask's: verl's dtype, except that its
    sequence modes return float32 for 16-bit ``loss_mat``), differentiable in
    ``loss_mat`` (twice: it is linear in it).
    """
    check_entry("luspo_rs.agg_loss", "loss_mat", loss_mat, loss_agg_mode=loss_agg_mode)
    options, factor = normalisers(
        loss_mat, loss_agg_mode, dp_size, batch_num_tokens, global_batch_size, loss_scale_factor
    )
    loss_mask = as_tensor("loss_mask", loss_mask)
    loss_dtype = result_dtype(loss_mat=loss_mat, loss_mask=loss_mask)
    if torch.compiler.is_compiling():
        n = options
        return _agg_loss_op(
            loss_mat, loss_mask, factor, loss_agg_mode, n["dp_size"], n["batch_num_tokens"], n["global_batch_size"],
            n["loss_scale_factor"], loss_dtype, build=BUILD,
        )[0]  # fmt: skip
    return AggLossFunction.apply(loss_mat, loss_mask, loss_agg_mode, options, factor, loss_dtype)
