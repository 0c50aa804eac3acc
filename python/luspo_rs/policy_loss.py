"""The fused policy loss (every verl loss mode, and LUSPO): its autograd
Function and the public entry point :func:`policy_loss`.

Forward allocates the outputs with torch (the gradient buffer in
``log_prob``'s dtype and device), hands every tensor to the native module
through DLPack without copying, and saves only the gradient for backward.
CUDA tensors run on the caller's current stream, without a host sync.
"""

from __future__ import annotations

from typing import Literal, Optional

import torch

from . import _core
from ._args import Number, as_float, as_tensor, check_entry, loss_buffers, normalisers, refuse_double_backward
from ._args import gradient, half_gradient, keep_gradient, result_dtype, saved_inputs, stream_of, torch_clamp_closed
from ._args import BUILD, register_loss_autograd
from .agg_loss import AggMode
from .cov_select import choose_tokens

PolicyMode = Literal[
    "vanilla", "gspo", "luspo", "cispo", "sapo", "geo_mean", "gpg", "clip_cov", "kl_cov", "dppo_tv", "dppo_kl",
    "dro", "reinforce",
]

#: The metrics of :func:`policy_loss`, in order: verl's three, then the length
#: diagnostics. The native loss writes all but the last; ``len_net_push`` is
#: read off the gradient it wrote (:func:`net_push`).
METRICS = (
    "pg_clipfrac", "ppo_kl", "pg_clipfrac_lower",
    "len_long_grad_share", "len_long_clipfrac", "len_short_clipfrac", "len_adv_corr", "len_net_push",
)  # fmt: skip


def net_push(grad: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """``len_net_push`` of a policy-loss gradient ``grad = d loss / d log_prob``,
    as a 1-element float64 tensor on ``grad``'s device (no host sync).

    With ``w_i = -sum_t g_it / L_i`` the weight the update gives row ``i``'s
    log-likelihood (its mean per-token coefficient), over the rows with
    ``L_i > 0``: ``sum_i w_i / sum_i |w_i|``. +1: the update raises the
    likelihood of every row; -1: lowers it; 0: balanced, as an unclipped
    token-mean or LUSPO step with group-centred advantages is. A clip whose
    bounds are asymmetric leaves a net push (more rows clipped on its tighter
    side). NaN when no row has a gradient."""
    L = response_mask.sum(-1, dtype=torch.float64)
    w = torch.where(L > 0, -grad.sum(-1, dtype=torch.float64) / L, 0.0)
    return (w.sum() / w.abs().sum()).reshape(1)


# The native rules, read once into plain tables (so that torch.compile can
# trace a call: Dynamo cannot call into the native module); an unknown name
# goes to the native function, whose ValueError names it.
_METRICS_OF = {m: tuple(_core.policy_metrics(m)) for m in _core.policy_modes()}
_AGG_OF = {
    (m, a): _core.effective_agg_mode(m, a)
    for m in _core.policy_modes()
    for a in ("token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")
}


def mode_metrics(mode: str) -> list[tuple[str, int]]:
    """verl's metrics for policy-loss ``mode``, as ``(name, slot)`` pairs (the
    slot in the native metrics buffer), in verl's order: GPG has none;
    KL-Cov, DRO and REINFORCE only ``ppo_kl``; Clip-Cov no
    ``pg_clipfrac_lower`` (the native rule, ``LossMode::metric_slots``)."""
    found = _METRICS_OF.get(mode)
    return list(found) if found is not None else _core.policy_metrics(mode)


def effective_agg_mode(mode: str, loss_agg_mode: str) -> str:
    """The aggregation a policy loss uses: LUSPO is GSPO's token loss
    aggregated ``seq-mean-token-sum``, whatever ``loss_agg_mode`` says, and
    SAPO always ``seq-mean-token-mean`` (the native rule,
    ``src/ops/policy_loss.rs`` ``LossMode::effective_agg``). An unknown mode
    or aggregation is a ``ValueError`` naming it."""
    found = _AGG_OF.get((mode, loss_agg_mode))
    return found if found is not None else _core.effective_agg_mode(mode, loss_agg_mode)


class PolicyLossFunction(torch.autograd.Function):
    """Fused policy loss; differentiable in ``log_prob`` only (the other
    inputs are treated as constants, as verl's trainers use them). The same
    native call on both devices writes the final gradient, the loss and the
    metrics; backward hands that gradient over once (see
    :func:`luspo_rs._args.gradient`)."""

    @staticmethod
    def forward(ctx, log_prob, old_log_prob, advantages, response_mask, rollout_is_weights, picks, options, factor, loss_dtype):
        # no zero gradient is built for the metrics output (a fill kernel on CUDA)
        ctx.set_materialize_grads(False)
        grad, loss, metrics, scratch = loss_buffers(log_prob, loss_dtype, metrics=True)
        _core.policy_loss(
            old_log_prob,
            log_prob.detach(),
            advantages,
            response_mask,
            grad,
            loss,
            metrics,
            rollout_is_weights=rollout_is_weights,
            picks=picks,
            factor=factor,
            scratch=scratch,
            stream=stream_of(log_prob),
            **options,
        )
        # float16 overflows at 65504: a gradient computed for a seed of 1 may
        # not fit where the seeded one does, so its backward computes it again
        # with the seed as `factor` (applied before rounding) unless the seed
        # is 1 (see _args.half_gradient)
        ctx.half = log_prob.dtype == torch.float16
        ctx.rerun = (options, factor, picks)
        keep_gradient(ctx, grad, log_prob.detach(), old_log_prob, advantages, response_mask, rollout_is_weights)
        if options["diagnostics"]:  # one more read of the gradient, in torch
            metrics = torch.cat((metrics, net_push(grad, response_mask)))
        ctx.mark_non_differentiable(metrics)
        return loss, metrics

    @staticmethod
    def backward(ctx, grad_loss, _grad_metrics):
        none = (None,) * 8
        if grad_loss is None:  # only the metrics were used
            return (None, *none)
        refuse_double_backward("luspo_rs.policy_loss")
        if ctx.half:
            return (half_gradient(ctx, grad_loss, _run_again), *none)
        return (gradient(ctx, grad_loss, lambda: _run_again(ctx, ctx.rerun[1])), *none)


def _run_again(ctx, factor: Optional[torch.Tensor]) -> torch.Tensor:
    """The gradient forward wrote, computed again from the saved inputs into
    a new buffer, with ``factor`` in the aggregation's scale."""
    lp, old, adv, mask, weights = saved_inputs(ctx)
    options, _, picks = ctx.rerun
    grad, loss, metrics, scratch = loss_buffers(lp, torch.float64, metrics=True)
    _core.policy_loss(
        old, lp, adv, mask, grad, loss, metrics, rollout_is_weights=weights, picks=picks, factor=factor,
        scratch=scratch, stream=stream_of(lp), **options,
    )  # fmt: skip
    return grad


# ---------------------------------------------------------------- the torch.library op
#
# `luspo_rs::policy_loss`: the same native call as a torch.library custom op,
# used under torch.compile, so that `fullgraph=True` traces a step calling
# `policy_loss` and fake tensors infer its outputs. It returns the gradient
# as an output, which its autograd formula multiplies by the loss's
# grad_output (out of place). Eager calls keep PolicyLossFunction, with its
# in-place first backward and the float16 rerun (see `_args.gradient`).


@torch.library.custom_op("luspo_rs::policy_loss", mutates_args=())
def _policy_loss_op(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    rollout_is_weights: Optional[torch.Tensor],
    picks: Optional[torch.Tensor],
    factor: Optional[torch.Tensor],
    mode: str,
    loss_agg_mode: str,
    clip_ratio: float,
    clip_ratio_low: Optional[float],
    clip_ratio_high: Optional[float],
    clip_ratio_c: float,
    clamp_closed: bool,
    diagnostics: bool,
    tau_pos: float,
    tau_neg: float,
    dro_beta: Optional[float],
    ppo_kl_coef: float,
    dp_size: Optional[float],
    batch_num_tokens: Optional[float],
    global_batch_size: Optional[float],
    loss_scale_factor: Optional[float],
    loss_dtype: torch.dtype,
    *,
    build: str = "",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(loss, metrics, d loss / d log_prob)``: the native call's outputs
    (``build``: see ``_args.BUILD``)."""
    grad, loss, metrics, scratch = loss_buffers(log_prob, loss_dtype, metrics=True)
    _core.policy_loss(
        old_log_prob, log_prob, advantages, response_mask, grad, loss, metrics,
        rollout_is_weights=rollout_is_weights, picks=picks, factor=factor, scratch=scratch, stream=stream_of(log_prob),
        mode=mode, loss_agg_mode=loss_agg_mode, clip_ratio=clip_ratio, clip_ratio_low=clip_ratio_low,
        clip_ratio_high=clip_ratio_high, clip_ratio_c=clip_ratio_c, clamp_closed=clamp_closed, diagnostics=diagnostics,
        tau_pos=tau_pos, tau_neg=tau_neg, dro_beta=dro_beta, ppo_kl_coef=ppo_kl_coef, dp_size=dp_size,
        batch_num_tokens=batch_num_tokens, global_batch_size=global_batch_size, loss_scale_factor=loss_scale_factor,
    )  # fmt: skip
    return loss, metrics, grad


@_policy_loss_op.register_fake
def _(old_log_prob, log_prob, advantages, response_mask, rollout_is_weights, picks, factor, *args, build=""):
    loss_dtype = args[-1]
    return (
        log_prob.new_empty((), dtype=loss_dtype),
        log_prob.new_empty((_core.METRICS_LEN,), dtype=torch.float64),
        torch.empty_like(log_prob, memory_format=torch.contiguous_format),
    )


register_loss_autograd(_policy_loss_op, wrt=1)


def _compiled_policy_loss(log_prob, old_log_prob, advantages, response_mask, weights, picks, options, factor, loss_dtype):
    """PolicyLossFunction's outputs through `luspo_rs::policy_loss`."""
    loss, metrics, grad = _policy_loss_op(
        old_log_prob, log_prob, advantages, response_mask, weights, picks, factor, options["mode"],
        options["loss_agg_mode"], options["clip_ratio"], options["clip_ratio_low"], options["clip_ratio_high"],
        options["clip_ratio_c"], options["clamp_closed"], options["diagnostics"], options["tau_pos"],
        options["tau_neg"], options["dro_beta"], options["ppo_kl_coef"], options["dp_size"],
        options["batch_num_tokens"], options["global_batch_size"], options["loss_scale_factor"], loss_dtype,
        build=BUILD,
    )  # fmt: skip
    if options["diagnostics"]:
        metrics = torch.cat((metrics, net_push(grad.detach(), response_mask)))
    return loss, metrics


def policy_loss(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    mode: PolicyMode,
    loss_agg_mode: AggMode = "token-mean",
    clip_ratio: float = 0.2,
    clip_ratio_low: Optional[float] = None,
    clip_ratio_high: Optional[float] = None,
    clip_ratio_c: float = 3.0,
    rollout_is_weights: Optional[torch.Tensor] = None,
    dp_size: Number = 1,
    batch_num_tokens: Optional[Number] = None,
    global_batch_size: Optional[Number] = None,
    loss_scale_factor: Optional[Number] = None,
    diagnostics: bool = False,
    tau_pos: float = 1.0,
    tau_neg: float = 1.05,
    dro_beta: Optional[float] = None,
    ppo_kl_coef: float = 0.1,
    clip_cov_ratio: float = 0.0002,
    clip_cov_lb: float = 1.0,
    clip_cov_ub: float = 5.0,
    kl_cov_ratio: float = 0.0002,
    picks: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Every verl policy loss, and LUSPO, fused: the loss, its gradient and
    verl's metrics in one pass.

    Per token, with ``d = log_prob - old_log_prob``, ``A`` the advantage and
    ``clip(x) = clamp(x, 1 - clip_ratio_low, 1 + clip_ratio_high)``:

    * ``"vanilla"``: ``r = exp(clamp(d, -20, 20))``,
      ``l = max(-A r, -A clip(r))``, and ``l = min(l, -A clip_ratio_c)`` where ``A < 0``;
    * ``"gspo"``: ``s_i = exp(sum_t m d / max(L_i, 1))`` per sequence, token ratio
      ``s_it = exp(min(lp - sg(lp) + sg(log s_i), 10))``, ``l = max(-A s_it, -A clip(s_it))``;
    * ``"luspo"``: GSPO's token loss aggregated ``seq-mean-token-sum`` whatever
      ``loss_agg_mode`` says, i.e. ``J = 1/G sum_i L_i min(s_i A_i, clip(s_i) A_i)``
      for sequence-level advantages: each sequence weighted by its length ``L_i``;
    * ``"geo_mean"`` (GMPO): per row, ``ratio_i = exp(sum_t m dmin / (L_i + 1e-8))``
      with ``dmin = sA min(sA d, sA clamp(d, -clip_ratio_low, clip_ratio_high))``,
      ``sA = sign(A)``, and ``pg_i = -ratio_i sum_t m A / (L_i + 1e-8)``, times the
      geometric mean of the row's IS weights if given; the loss is the mean of
      ``pg_i`` over all rows. As verl, it ignores ``loss_agg_mode`` and the
      normalisers (``dp_size``, ...); its loss is float32 for 16-bit inputs and
      a bool or integer mask, as verl's.

    Each token loss is multiplied by ``rollout_is_weights`` if given, then
    aggregated as verl's ``agg_loss(loss_agg_mode, dp_size, batch_num_tokens,
    global_batch_size, loss_scale_factor)`` (see :func:`luspo_rs.agg_loss`).

    Args:
        old_log_prob, log_prob: ``(B, T)`` float tensors (float32/64, bfloat16, float16).
        advantages: ``(B, T)``, or ``(B,)`` / ``(B, 1)`` per sequence.
        response_mask: ``(B, T)`` bool, integer or float mask.
        rollout_is_weights: optional, shaped like ``advantages``.
        clip_cov_ratio, clip_cov_lb, clip_cov_ub, kl_cov_ratio: Clip-Cov's and
            KL-Cov's choice of tokens, made as verl 0.9.1 makes it
            (:func:`luspo_rs.cov_select.choose_tokens`: Clip-Cov draws one
            ``torch.randperm`` from torch's default CPU generator, so a run
            seeded as verl's picks the same tokens; KL-Cov takes the CPU
            ``topk``). The ratios must be finite and > 0 (``ValueError``).
        picks: optional bool ``(B, T)``: the chosen tokens themselves
            (Clip-Cov: cut out; KL-Cov: given ``ppo_kl_coef |lp - old|``);
            when given, nothing is chosen or drawn.

    Returns:
        ``(loss, metrics)``: ``loss`` is a scalar in torch's promotion of the
        float inputs' dtypes (``log_prob``'s when they all share it; float64
        with a float64 mask, as verl's; for 16-bit inputs the 16-bit type,
        where verl's sequence modes return float32),
        differentiable in ``log_prob``; ``metrics`` maps names to 0-d float64
        tensors: verl's ``"pg_clipfrac"``, ``"ppo_kl"``, ``"pg_clipfrac_lower"``,
        and with ``diagnostics=True`` five length-bias diagnostics, the first
        four computed in the same pass (two more sums per token: about 10% of
        the CPU kernel's single-thread time). Over the rows with ``L_i > 0``, a row is *long* if
        ``L_i`` exceeds their mean length:

        * ``"len_long_grad_share"``: the long rows' share of the gradient mass
          ``sum |d loss / d log_prob|`` over their share of the tokens; 1 when
          the aggregation weighs every token the same (token-mean, LUSPO) and
          long and short rows have the same mean ``|A dl|`` per token; GSPO's
          ``1/L_i`` weighting pulls it down;
        * ``"len_long_clipfrac"``, ``"len_short_clipfrac"``: the clip fraction
          (as ``pg_clipfrac``) within the long and within the short rows;
        * ``"len_adv_corr"``: the correlation over rows of ``L_i`` with the row's
          mean advantage (positive: longer responses are rewarded);
        * ``"len_net_push"``: ``sum_i w_i / sum_i |w_i|``, ``w_i = -sum_t g_it / L_i``
          the weight of row ``i``'s log-likelihood in the update (see
          :func:`net_push`): 0 when the update raises and lowers likelihood in
          balance. With ``len_long_grad_share`` below 1 (GSPO) and a reward that
          ignores length, a positive net push shortens responses, a negative
          one lengthens them; the tight, asymmetric sequence clip of the GSPO
          paper leaves a positive one (``docs/lab.md``). Read off the
          gradient in torch, one more pass over it.

        Each is NaN where undefined (e.g. no long row when all lengths are equal).
    """
    check_entry("luspo_rs.policy_loss", "log_prob", log_prob, mode=mode, loss_agg_mode=loss_agg_mode)
    metric_names = mode_metrics(mode)  # (also: an unknown mode is a ValueError naming it)
    options = dict(
        mode=mode,
        loss_agg_mode=loss_agg_mode,
        clip_ratio=as_float("clip_ratio", clip_ratio),
        clip_ratio_low=as_float("clip_ratio_low", clip_ratio_low),
        clip_ratio_high=as_float("clip_ratio_high", clip_ratio_high),
        clip_ratio_c=as_float("clip_ratio_c", clip_ratio_c),
        clamp_closed=torch_clamp_closed(),
        diagnostics=bool(diagnostics),
        tau_pos=as_float("tau_pos", tau_pos),
        tau_neg=as_float("tau_neg", tau_neg),
        dro_beta=as_float("dro_beta", dro_beta),
        ppo_kl_coef=as_float("ppo_kl_coef", ppo_kl_coef),
    )
    agg = effective_agg_mode(mode, loss_agg_mode)
    if mode == "geo_mean":
        # verl's GMPO is torch.mean over the rows: it reads neither
        # loss_agg_mode nor global_batch_info, and neither do we
        dp_size, batch_num_tokens, global_batch_size, loss_scale_factor = 1, None, None, None
    norms, factor = normalisers(log_prob, agg, dp_size, batch_num_tokens, global_batch_size, loss_scale_factor)
    options.update(norms)
    weights = None if rollout_is_weights is None else as_tensor("rollout_is_weights", rollout_is_weights)
    old_log_prob = as_tensor("old_log_prob", old_log_prob)
    advantages = as_tensor("advantages", advantages)
    response_mask = as_tensor("response_mask", response_mask)
    loss_dtype = result_dtype(
        log_prob=log_prob, old_log_prob=old_log_prob, advantages=advantages, response_mask=response_mask,
        rollout_is_weights=weights,
    )  # fmt: skip
    if picks is not None:
        picks = as_tensor("picks", picks)
    elif mode in ("clip_cov", "kl_cov"):
        # verl's choice of tokens, in torch (Clip-Cov draws from torch's default CPU generator as verl does)
        picks = choose_tokens(
            mode, old_log_prob, log_prob.detach(), advantages, response_mask, clip_ratio=options["clip_ratio"],
            clip_ratio_low=options["clip_ratio_low"], clip_ratio_high=options["clip_ratio_high"],
            clip_cov_ratio=clip_cov_ratio, clip_cov_lb=clip_cov_lb, clip_cov_ub=clip_cov_ub, kl_cov_ratio=kl_cov_ratio,
        )  # fmt: skip
    if mode in ("gpg", "reinforce"):
        # their loss does not read old_log_prob (REINFORCE's ppo_kl metric
        # only): verl's loss keeps the other inputs' dtype
        loss_dtype = result_dtype(
            log_prob=log_prob, advantages=advantages, response_mask=response_mask, rollout_is_weights=weights
        )
    if mode == "geo_mean" and not response_mask.is_floating_point():
        # verl divides GMPO's row sums by sum(mask) + 1e-8: for a bool or
        # integer mask a tensor of torch's default dtype, which promotes
        # 16-bit inputs (to float32, by default)
        loss_dtype = torch.promote_types(loss_dtype, torch.get_default_dtype())
    call = _compiled_policy_loss if torch.compiler.is_compiling() else PolicyLossFunction.apply
    loss, metrics = call(log_prob, old_log_prob, advantages, response_mask, weights, picks, options, factor, loss_dtype)
    values = metrics.unbind()
    out = {name: values[slot] for name, slot in metric_names}
    if diagnostics:
        out.update(zip(METRICS[3:], values[3:]))
    return loss, out
