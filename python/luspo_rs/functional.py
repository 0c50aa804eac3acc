"""torch autograd Functions over the native kernels.

Each forward allocates its outputs with torch (the gradient buffer in the
dtype and device of the differentiated input), hands every tensor to the
native module through DLPack without copying, and saves only the gradient
buffer for backward; backward is ``grad_output * saved_grad``. CUDA tensors
go through :mod:`luspo_rs._cuda` (caller's stream, no host sync, in-place backward).
"""

from __future__ import annotations

from typing import Any, Optional, Union

import torch

from . import _core, _cuda
from ._alloc import empty_host

Number = Union[int, float, torch.Tensor]

#: Order of the values the native policy loss writes into its ``out`` buffer.
STATS = ("loss", "pg_clipfrac", "ppo_kl", "pg_clipfrac_lower")


def _probe_clamp_closed() -> bool:
    with torch.inference_mode(False), torch.enable_grad():
        x = torch.tensor([0.5, 1.5], requires_grad=True)
        torch.clamp(x, 0.5, 1.5).sum().backward()
    return bool(x.grad.eq(1.0).all())


# Measured once, at import: run lazily inside torch.compile or a torch.func
# transform, the probe's own backward would be traced or refused there.
_CLAMP_CLOSED = _probe_clamp_closed()


def torch_clamp_closed() -> bool:
    """Whether the installed torch's ``clamp`` (with number bounds, as verl
    calls it) passes the gradient to a value lying exactly on a bound.

    torch 2.11 does (the closed interval); torch 2.15 does not. The kernels
    follow whichever torch is installed, measured once at import, so that
    gradients match verl's to the bit even on the bounds.
    """
    return _CLAMP_CLOSED


def _as_tensor(name: str, value: Any) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach()
    if hasattr(value, "__dlpack__") or hasattr(value, "__array_interface__"):
        strides = getattr(value, "strides", None)
        if strides is not None and any(st < 0 for st in strides):
            raise ValueError(f"{name}: arrays with negative strides are not supported; pass a copy (numpy.ascontiguousarray)")
        return torch.as_tensor(value)
    raise TypeError(f"{name}: expected a torch.Tensor (or an array supporting DLPack), got {type(value).__name__}")


_is_functorch_wrapped = getattr(torch._C._functorch, "is_functorch_wrapped_tensor", lambda t: False)


def _check_entry(op: str, name: str, x: Any, **modes: Any) -> None:
    """Argument checks every entry point makes first: the differentiated
    tensor, no torch.func transform, and string modes."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if _is_functorch_wrapped(x):
        raise RuntimeError(
            f"{name}: {op} does not support torch.func transforms (grad, vmap, jacrev, ...); "
            "use loss.backward() or torch.autograd.grad"
        )
    for mode_name, value in modes.items():
        if not isinstance(value, str):
            raise TypeError(f"{mode_name}: expected a string, got {type(value).__name__}")


def _as_float(name: str, value: Optional[Number]) -> Optional[float]:
    """verl passes normalisers as ints, floats or 0-d tensors."""
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name}: expected a scalar, got a tensor of shape {tuple(value.shape)}")
        return float(value.item())
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: expected a number, got {type(value).__name__}")
    return float(value)


def refuse_double_backward(op: str) -> None:
    """Raises in a backward run with ``create_graph=True``: the fused kernels
    compute the gradient, not a differentiable graph of it, so any second
    derivative taken through it would silently be 0."""
    if torch.is_grad_enabled():
        raise RuntimeError(
            f"{op}: create_graph=True (double backward, Hessian-vector products) is not supported: "
            "the fused kernel computes the gradient, not a graph of it; use verl's reference "
            "implementation for higher-order derivatives"
        )


def _result_dtype(*tensors: Optional[torch.Tensor]) -> torch.dtype:
    """The dtype torch's promotion gives an expression of ``tensors`` (the
    first is the differentiated input, a float tensor; integer and bool
    masks do not change it), i.e. the dtype of verl's loss."""
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        if t is not None and isinstance(t, torch.Tensor):
            dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _scaled(ctx, grad_loss: torch.Tensor) -> torch.Tensor:
    """``grad_loss * saved_grad`` for the CPU path. ``loss.backward()`` seeds
    ``grad_loss = 1``: then the saved buffer is the gradient itself and is
    handed over without a B×T multiply (autograd copies it before
    accumulating where the buffer is still referenced, e.g. with
    ``retain_graph=True``)."""
    (grad,) = ctx.saved_tensors
    if grad_loss.numel() == 1 and grad_loss.item() == 1.0:
        return grad
    return grad * grad_loss


class PolicyLossFunction(torch.autograd.Function):
    """Fused policy loss; differentiable in ``log_prob`` only (the other
    inputs are treated as constants, as verl's trainers use them)."""

    @staticmethod
    def forward(ctx, log_prob, old_log_prob, advantages, response_mask, rollout_is_weights, options, factor, loss_dtype):
        # no zero gradient is built for the metrics output (a fill kernel on CUDA)
        ctx.set_materialize_grads(False)
        if log_prob.is_cuda:
            ctx.cuda = True
            return _cuda.policy_forward(
                ctx, log_prob, old_log_prob, advantages, response_mask, rollout_is_weights, options, factor, loss_dtype
            )
        grad = empty_host(tuple(log_prob.shape), log_prob.dtype)
        out = torch.empty(len(STATS), dtype=torch.float64, device=log_prob.device)
        _core.policy_loss(
            old_log_prob,
            log_prob.detach(),
            advantages,
            response_mask,
            grad,
            out,
            rollout_is_weights=rollout_is_weights,
            **options,
        )
        ctx.save_for_backward(grad)
        loss = out[0].to(loss_dtype)
        metrics = out[1:]
        ctx.mark_non_differentiable(metrics)
        return loss, metrics

    @staticmethod
    def backward(ctx, grad_loss, _grad_metrics):
        none = (None,) * 7
        if grad_loss is None:  # only the metrics were used
            return (None, *none)
        refuse_double_backward("luspo_rs.policy_loss")
        if getattr(ctx, "cuda", False):
            return (_cuda.backward(ctx, grad_loss), *none)
        return (_scaled(ctx, grad_loss), *none)


def policy_loss(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    mode: str,
    loss_agg_mode: str = "token-mean",
    clip_ratio: float = 0.2,
    clip_ratio_low: Optional[float] = None,
    clip_ratio_high: Optional[float] = None,
    clip_ratio_c: float = 3.0,
    rollout_is_weights: Optional[torch.Tensor] = None,
    dp_size: Number = 1,
    batch_num_tokens: Optional[Number] = None,
    global_batch_size: Optional[Number] = None,
    loss_scale_factor: Optional[Number] = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """LUSPO / GSPO / vanilla (PPO, GRPO) policy loss, fused.

    Per token, with ``d = log_prob - old_log_prob``, ``A`` the advantage and
    ``clip(x) = clamp(x, 1 - clip_ratio_low, 1 + clip_ratio_high)``:

    * ``"vanilla"``: ``r = exp(clamp(d, -20, 20))``,
      ``l = max(-A r, -A clip(r))``, and ``l = min(l, -A clip_ratio_c)`` where ``A < 0``;
    * ``"gspo"``: ``s_i = exp(sum_t m d / max(L_i, 1))`` per sequence, token ratio
      ``s_it = exp(min(lp - sg(lp) + sg(log s_i), 10))``, ``l = max(-A s_it, -A clip(s_it))``;
    * ``"luspo"``: GSPO's token loss aggregated ``seq-mean-token-sum`` whatever
      ``loss_agg_mode`` says, i.e. ``J = 1/G sum_i L_i min(s_i A_i, clip(s_i) A_i)``
      for sequence-level advantages: each sequence weighted by its length ``L_i``.

    Each token loss is multiplied by ``rollout_is_weights`` if given, then
    aggregated as verl's ``agg_loss(loss_agg_mode, dp_size, batch_num_tokens,
    global_batch_size, loss_scale_factor)``.

    Args:
        old_log_prob, log_prob: ``(B, T)`` float tensors (float32/64, bfloat16, float16).
        advantages: ``(B, T)``, or ``(B,)`` / ``(B, 1)`` per sequence.
        response_mask: ``(B, T)`` bool, integer or float mask.
        rollout_is_weights: optional, shaped like ``advantages``.

    Returns:
        ``(loss, metrics)``: ``loss`` is a scalar in the dtype verl's loss has,
        torch's promotion of the float inputs' dtypes (``log_prob``'s when
        they all share it; float64 with a float64 mask, for instance),
        differentiable in ``log_prob``; ``metrics`` maps ``"pg_clipfrac"``,
        ``"ppo_kl"``, ``"pg_clipfrac_lower"`` to 0-d float64 tensors (verl's metrics).
    """
    _check_entry("luspo_rs.policy_loss", "log_prob", log_prob, mode=mode, loss_agg_mode=loss_agg_mode)
    options = dict(
        mode=mode,
        loss_agg_mode=loss_agg_mode,
        clip_ratio=_as_float("clip_ratio", clip_ratio),
        clip_ratio_low=_as_float("clip_ratio_low", clip_ratio_low),
        clip_ratio_high=_as_float("clip_ratio_high", clip_ratio_high),
        clip_ratio_c=_as_float("clip_ratio_c", clip_ratio_c),
        clamp_closed=torch_clamp_closed(),
    )
    # CUDA: normalisers given as CUDA tensors stay on the device (no .item()).
    factor = None
    norms = dict(
        dp_size=dp_size,
        batch_num_tokens=batch_num_tokens,
        global_batch_size=global_batch_size,
        loss_scale_factor=loss_scale_factor,
    )
    if log_prob.is_cuda:
        effective = "seq-mean-token-sum" if mode == "luspo" else loss_agg_mode
        host, factor = _cuda.split_normalisers(effective, norms, log_prob.device, _as_float)
        options.update(host)
    else:
        options.update({k: _as_float(k, v) for k, v in norms.items()})
    weights = None if rollout_is_weights is None else _as_tensor("rollout_is_weights", rollout_is_weights)
    old_log_prob = _as_tensor("old_log_prob", old_log_prob)
    advantages = _as_tensor("advantages", advantages)
    response_mask = _as_tensor("response_mask", response_mask)
    loss_dtype = _result_dtype(log_prob, old_log_prob, advantages, response_mask, weights)
    loss, metrics = PolicyLossFunction.apply(
        log_prob, old_log_prob, advantages, response_mask, weights, options, factor, loss_dtype
    )
    return loss, dict(zip(STATS[1:], metrics.unbind()))


class AggLossFunction(torch.autograd.Function):
    """verl's ``agg_loss``; differentiable in ``loss_mat``."""

    @staticmethod
    def forward(ctx, loss_mat, loss_mask, loss_agg_mode, options, factor, loss_dtype):
        if loss_mat.is_cuda:
            ctx.cuda = True
            return _cuda.agg_forward(ctx, loss_mat, loss_mask, loss_agg_mode, options, factor, loss_dtype)
        grad = torch.empty(loss_mat.shape, dtype=loss_mat.dtype, device=loss_mat.device)
        loss = _core.agg_loss(loss_mat.detach(), loss_mask, grad, loss_agg_mode, **options)
        ctx.save_for_backward(grad)
        return torch.tensor(loss, dtype=loss_dtype, device=loss_mat.device)

    @staticmethod
    def backward(ctx, grad_loss):
        if torch.is_grad_enabled():
            # create_graph=True: agg_loss is linear in loss_mat, so its gradient
            # is the saved constant times grad_output, differentiably
            (grad,) = ctx.saved_tensors
            return grad * grad_loss, None, None, None, None, None
        if getattr(ctx, "cuda", False):
            return _cuda.backward(ctx, grad_loss), None, None, None, None, None
        return _scaled(ctx, grad_loss), None, None, None, None, None


def agg_loss(
    loss_mat: torch.Tensor,
    loss_mask: torch.Tensor,
    loss_agg_mode: str = "token-mean",
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

    Returns a scalar in the dtype verl's has (``loss_mat``'s, promoted with
    a float mask's as torch promotes ``loss_mat * loss_mask``), differentiable
    in ``loss_mat``.
    """
    _check_entry("luspo_rs.agg_loss", "loss_mat", loss_mat, loss_agg_mode=loss_agg_mode)
    norms = dict(
        dp_size=dp_size,
        batch_num_tokens=batch_num_tokens,
        global_batch_size=global_batch_size,
        loss_scale_factor=loss_scale_factor,
    )
    factor = None
    if loss_mat.is_cuda:
        # normalisers given as CUDA tensors stay on the device (no .item())
        options, factor = _cuda.split_normalisers(loss_agg_mode, norms, loss_mat.device, _as_float)
    else:
        options = {k: _as_float(k, v) for k, v in norms.items()}
    loss_mask = _as_tensor("loss_mask", loss_mask)
    loss_dtype = _result_dtype(loss_mat, loss_mask)
    return AggLossFunction.apply(loss_mat, loss_mask, loss_agg_mode, options, factor, loss_dtype)
