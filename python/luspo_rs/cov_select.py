"""Clip-Cov's and KL-Cov's choice of tokens, in torch, as verl 0.9.1 makes it.

The fused pass (:func:`luspo_rs.policy_loss`) computes the loss of both modes
given the chosen tokens (``picks``); this module chooses them, so that a
seeded run picks the same tokens as verl's ``compute_policy_loss_clip_cov`` /
``compute_policy_loss_kl_cov``. Every comparison that decides a choice is
made on the same float values verl makes it on: the same torch operations on
the same dtypes (so the same roundings and reduction orders), on the same
device, and the random draw comes from the same generator in the same
number: one ``torch.randperm`` on the default CPU generator for Clip-Cov,
none for KL-Cov.

**Clip-Cov.** With ``r = exp(lp - old)``, a token is a candidate where
``m > 0``, the PPO clip does not already act on it
(``-A clip(r, 1 - clip_ratio_low, 1 + clip_ratio_high) > -A r`` is false) and
``clip_cov_lb < cov < clip_cov_ub``, where
``cov = (A - mean_m A) (lp - mean_m lp)`` with verl's masked means
(``sum(where(m, x, 0) m) / (sum m + 1e-8)``). Of the ``n`` candidates, taken
in row-major order, ``torch.randperm(n)`` chooses the first
``clip_num = max(int(clip_cov_ratio * sum m), 1)``.

**KL-Cov.** Over the ``n`` tokens with ``m > 0``, in row-major order, copied
to the CPU as verl does, ``cov = (A - mean A) (lp - mean lp)`` (plain means
over those tokens); ``torch.topk(cov, max(1, int(n * kl_cov_ratio)))``
chooses the tokens given the ``ppo_kl_coef |lp - old|`` term. Ties (common
with bfloat16 log-probs) are broken by the same CPU ``topk`` on the same
values, hence as verl breaks them.

Cost, besides the fused pass. Clip-Cov: elementwise passes that create
``(B, T)`` temporaries in the inputs' promoted dtype (the ratio, its clamp,
a masked copy for each masked mean, the centred log-probs and, for
per-token advantages, the centred advantages), at most two of them alive at
once, the products of the clip test and the covariance made in place where
the dtypes allow; and bool ``(B, T)`` masks (the clip test, the candidates,
one comparison at a time). Host syncs: ``sum m`` read for ``clip_num`` and
the candidate count (verl reads the same ``.item()``), and a ``nonzero``
only when there are more candidates than ``clip_num`` (otherwise every
candidate is chosen and the candidate mask is returned as it is; verl
always calls ``nonzero``). ``randperm(n)`` runs on the CPU, as in verl.
KL-Cov: a bool ``(B, T)`` test, one ``nonzero`` (a sync; ``n`` int64
positions) for the valid tokens, the two gathered ``n``-element vectors
copied to the host (verl makes the same two copies, and syncs twice more
for its boolean indexing), ``topk`` on the CPU, and the ``k`` chosen
positions copied back. Measured once (best of 3, torch on one thread of a
shared 2-core machine, 64 x 2048 tokens, the default ratios), the choice
took 1.8 ms of our drop-in's 3.5 ms forward and backward for Clip-Cov and
1.3 of 4.6 ms for KL-Cov (verl's functions: 17.8 and 8.6 ms).

Deliberate differences from verl (which asserts, or raises from deeper
down): a ratio that is not a finite number > 0 is a ``ValueError`` naming
``clip_cov_ratio`` / ``kl_cov_ratio`` (verl: ``AssertionError`` for ratios
<= 0 or NaN, ``OverflowError`` for infinity); a NaN ``clip_cov_lb`` /
``clip_cov_ub`` is a ``ValueError`` (verl silently chooses no token); a
``kl_cov_ratio`` choosing more tokens than there are valid ones is a
``ValueError`` (verl: ``RuntimeError`` from ``topk``); a non-finite
``sum m`` for Clip-Cov is a ``ValueError`` naming ``response_mask`` (verl:
``int()`` raises ``ValueError`` or ``OverflowError``). Per-row advantages (``(B,)`` or ``(B, 1)``), which
verl's two functions do not take, are used as if expanded over the row.
NaN inputs are not refused: they decide as in verl, e.g. a NaN ``log_prob``
at a valid token makes every Clip-Cov covariance NaN (no token chosen) and
every KL-Cov covariance NaN (``topk`` then takes the first ``k``, as verl's).
"""

from __future__ import annotations

import math
import numbers
from typing import Optional

import torch


def choose_tokens(
    mode: str,
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    clip_ratio: float,
    clip_ratio_low: Optional[float] = None,
    clip_ratio_high: Optional[float] = None,
    clip_cov_ratio: float = 0.0002,
    clip_cov_lb: float = 1.0,
    clip_cov_ub: float = 5.0,
    kl_cov_ratio: float = 0.0002,
) -> Optional[torch.Tensor]:
    """The tokens verl's ``mode`` (``"clip_cov"`` or ``"kl_cov"``) chooses,
    as a bool ``(B, T)`` tensor on ``log_prob``'s device, or None when it
    chooses none (see the module's doc for the rules and their cost).

    ``log_prob`` is read as a constant (pass it detached). Clip-Cov draws
    from torch's default CPU generator exactly as verl does (one
    ``randperm`` of the candidates, none when there is no candidate)."""
    adv = _check(old_log_prob, log_prob, advantages, response_mask)
    if mode == "clip_cov":
        ratio = _positive("clip_cov_ratio", clip_cov_ratio)
        for name, bound in (("clip_cov_lb", clip_cov_lb), ("clip_cov_ub", clip_cov_ub)):
            if not isinstance(bound, numbers.Real) or isinstance(bound, bool) or math.isnan(bound):
                raise ValueError(f"{name}: expected a number (not NaN), got {bound!r}")
        low = clip_ratio if clip_ratio_low is None else clip_ratio_low
        high = clip_ratio if clip_ratio_high is None else clip_ratio_high
        return _clip_cov(old_log_prob, log_prob, adv, response_mask, low, high, ratio, clip_cov_lb, clip_cov_ub)
    if mode == "kl_cov":
        return _kl_cov(log_prob, adv, response_mask, _positive("kl_cov_ratio", kl_cov_ratio))
    raise ValueError(f"mode: only clip_cov and kl_cov choose tokens, not {mode!r}")


def _positive(name: str, value) -> float:
    """verl's ``assert <ratio> > 0``, as a ``ValueError`` naming it (and
    refusing infinity, for which verl's ``int()`` raises)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a number, got {type(value).__name__}")
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{name}: must be a finite number > 0 (verl asserts {name} > 0), got {value!r}")
    return value


def _check(old_log_prob, log_prob, advantages, response_mask) -> torch.Tensor:
    """What torch would otherwise refuse without naming the argument (the
    native call makes the same checks, later): ``log_prob`` a non-empty
    ``(B, T)`` float tensor, ``old_log_prob`` and ``response_mask`` of its
    shape, ``advantages`` ``(B, T)``, ``(B,)`` or ``(B, 1)``, all on its
    device. Returns the advantages as ``(B, T)`` or ``(B, 1)``."""
    if log_prob.dim() != 2:
        raise ValueError(f"log_prob: expected a 2-D (batch, response_length) tensor, got shape {list(log_prob.shape)}")
    B, T = log_prob.shape
    if B == 0:
        raise ValueError("log_prob: empty batch: the batch dimension is 0")
    if T == 0:
        raise ValueError("log_prob: empty responses: the response_length dimension is 0")
    for name, t in (("log_prob", log_prob), ("old_log_prob", old_log_prob), ("advantages", advantages)):
        if not t.is_floating_point():
            raise TypeError(f"{name}: expected a floating-point tensor, got {str(t.dtype).removeprefix('torch.')}")
    for name, t in (("old_log_prob", old_log_prob), ("response_mask", response_mask)):
        if t.shape != log_prob.shape:
            raise ValueError(f"{name}: shape {list(t.shape)} does not match log_prob shape {[B, T]}")
    if advantages.shape in ((B,), (B, 1)):
        adv = advantages.reshape(B, 1)
    elif advantages.shape == (B, T):
        adv = advantages
    else:
        raise ValueError(f"advantages: shape {list(advantages.shape)} is neither {[B, T]}, {[B]} nor {[B, 1]}")
    for name, t in (("old_log_prob", old_log_prob), ("advantages", advantages), ("response_mask", response_mask)):
        if t.device != log_prob.device:
            raise ValueError(f"{name}: on {t.device}, but log_prob is on {log_prob.device}")
    return adv


def _mul(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``x * y``, written into ``x`` (a temporary of ours) when the result
    has ``x``'s dtype and shape: the same kernel, the same bits."""
    if torch.result_type(x, y) == x.dtype and torch.broadcast_shapes(x.shape, y.shape) == x.shape:
        return x.mul_(y)
    return x * y


def _masked_mean(values: torch.Tensor, mask: torch.Tensor, on: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    """verl's ``masked_mean(values, mask)``: ``sum(where(m, v, 0) * m) /
    (sum m + 1e-8)``, the same operations on the same dtypes. ``on`` is
    ``mask.bool()`` and ``total`` is ``mask.sum()``. For a bool mask the
    product is ``where``'s own values (times 1 or 0 where they are already
    0), so it is skipped."""
    s = torch.where(on, values, 0.0)
    if mask.dtype != torch.bool:
        s = _mul(s, mask)
    return s.sum() / (total + 1e-8)


def _clip_cov(old, lp, adv, mask, low, high, clip_cov_ratio, lb, ub) -> Optional[torch.Tensor]:
    ratio = torch.sub(lp, old).exp_()
    # verl: clip_by_origin = (-A clamp(r) > -A r) & (m > 0). (-A) x is -(A x)
    # to the bit (rounding is symmetric), so the test is A clamp(r) < A r,
    # made on the same products without negating the advantages.
    clipped = torch.lt(_mul(ratio.clamp(1 - low, 1 + high), adv), _mul(ratio, adv))
    del ratio
    on = mask.bool()
    total = mask.sum()
    # verl: cov_all = (A - mean_m A) (lp - mean_m lp), set to -inf at the
    # masked and the clipped tokens, then lb < cov_all < ub & m > 0: the same
    # set as below (-inf never exceeds lb), without the writes.
    cov = _mul(torch.sub(lp, _masked_mean(lp, mask, on, total)), adv - _masked_mean(adv, mask, on, total))
    chosen = cov.lt(ub).logical_and_(cov.gt(lb))
    del cov
    chosen.logical_and_(mask > 0).logical_and_(clipped.logical_not_())
    del clipped
    budget = clip_cov_ratio * total.item()
    if not math.isfinite(budget):
        raise ValueError(f"response_mask: its sum is not finite ({total.item()}); Clip-Cov's token count needs it")
    clip_num = max(int(budget), 1)
    n = int(chosen.sum().item())
    if n == 0:
        return None  # verl draws nothing then
    perm = torch.randperm(n)  # verl's draw: the default CPU generator, n values
    if clip_num >= n:
        return chosen  # every candidate is chosen, whatever the order
    where = torch.nonzero(chosen)[perm[:clip_num].to(chosen.device)]
    picks = torch.zeros(chosen.shape, dtype=torch.bool, device=chosen.device)
    picks[where[:, 0], where[:, 1]] = True
    return picks


def _kl_cov(lp, adv, mask, kl_cov_ratio) -> Optional[torch.Tensor]:
    B, T = lp.shape
    at = torch.nonzero((mask > 0).reshape(-1)).squeeze(1)  # row-major, as verl's boolean indexing
    # verl: advantages[m > 0] and log_prob[m > 0], copied to the CPU; the
    # same values by index (per-row advantages: the row's)
    a = adv.reshape(-1)[at] if adv.shape[1] == T else adv.reshape(-1)[torch.div(at, T, rounding_mode="floor")]
    a = a.cpu()
    x = lp.reshape(-1)[at].cpu()
    n = x.numel()
    if n == 0:
        return None
    k = max(1, int(n * kl_cov_ratio))
    if k > n:
        raise ValueError(
            f"kl_cov_ratio: {kl_cov_ratio!r} chooses {k} tokens of the {n} valid ones (verl's topk raises)"
        )
    # (a and x are our copies: the centring is done in place, same bits)
    cov = _mul(a.sub_(a.mean()), x.sub_(x.mean()))
    top = torch.topk(cov, k, largest=True).indices
    picks = torch.zeros(B * T, dtype=torch.bool, device=lp.device)
    picks[at[top.to(at.device)]] = True
    return picks.view(B, T)
