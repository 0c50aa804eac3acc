"""Drop-ins for ``verl.trainer.ppo.core_algos``, computed by luspo-rs.

Every function here has the signature, argument names, defaults and return
types of its verl 0.9.x namesake, reads the same config fields, and returns
the same numbers (to floating-point rounding: luspo-rs accumulates in f64).
This module does not import verl.

* policy losses — ``compute_policy_loss_vanilla``, ``compute_policy_loss_gspo``
  and ``compute_policy_loss_luspo`` — return ``(loss, metrics)`` with verl's
  ``"actor/pg_clipfrac"``, ``"actor/ppo_kl"``, ``"actor/pg_clipfrac_lower"``
  python floats; they read ``config.clip_ratio``, ``clip_ratio_low``,
  ``clip_ratio_high``, ``clip_ratio_c`` and ``config.global_batch_info``;
* ``agg_loss`` and ``kl_penalty``, differentiable through torch autograd;
* the outcome advantage estimators, returning ``(advantages, returns)`` (the
  same tensor twice, as verl).

Known, deliberate differences from verl (documented in the README):

* a ``torch.Tensor`` ``index`` is grouped by value (verl's loop estimators
  would hash each 0-d tensor by identity, i.e. one group per row);
* group statistics are computed in f64, so groups whose scores are all equal
  get exactly 0 where verl's f32 arithmetic may leave a rounding residue
  divided by ``std + epsilon``;
* ``reinforce_plus_plus_baseline`` does not raise when the whole batch has at
  most one valid token (verl's ``masked_var`` does); it returns zeros or NaN.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
import torch

from . import _core, _cuda
from ._alloc import empty_host
from .functional import agg_loss as _agg_loss
from .functional import policy_loss as _policy_loss
from .functional import refuse_double_backward, torch_clamp_closed

__all__ = [
    "agg_loss",
    "compute_gpg_outcome_advantage",
    "compute_grpo_outcome_advantage",
    "compute_grpo_vectorized_outcome_advantage",
    "compute_opo_outcome_advantage",
    "compute_policy_loss_gspo",
    "compute_policy_loss_luspo",
    "compute_policy_loss_vanilla",
    "compute_reinforce_plus_plus_baseline_outcome_advantage",
    "compute_rloo_outcome_advantage",
    "compute_rloo_vectorized_outcome_advantage",
    "group_index",
    "kl_penalty",
]

#: Keys of ``config.global_batch_info`` the aggregation reads.
_GLOBAL_BATCH_KEYS = ("dp_size", "batch_num_tokens", "global_batch_size", "loss_scale_factor")


# --------------------------------------------------------------------------- policy losses


def _cfg(config: Any, key: str, default: Any = None) -> Any:
    """``config.get(key, default)`` for verl's ActorConfig, an omegaconf
    DictConfig, a dict or any attribute holder."""
    if isinstance(config, dict) or hasattr(config, "get"):
        try:
            return config.get(key, default)
        except Exception:  # pragma: no cover - exotic config objects
            pass
    return getattr(config, key, default)


def _policy(mode: str, old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config, rollout_is_weights):
    if config is None:
        raise ValueError(f"config: compute_policy_loss_{mode} needs the actor config (clip_ratio, ...), got None")
    clip_ratio = _cfg(config, "clip_ratio")
    if clip_ratio is None:
        raise ValueError("config: clip_ratio is not set")
    gbi = _cfg(config, "global_batch_info", None) or {}
    norm = {k: gbi[k] for k in _GLOBAL_BATCH_KEYS if k in gbi and gbi[k] is not None}
    loss, stats = _policy_loss(
        old_log_prob,
        log_prob,
        advantages,
        response_mask,
        mode=mode,
        loss_agg_mode=loss_agg_mode,
        clip_ratio=clip_ratio,
        clip_ratio_low=_cfg(config, "clip_ratio_low"),
        clip_ratio_high=_cfg(config, "clip_ratio_high"),
        clip_ratio_c=_cfg(config, "clip_ratio_c", 3.0),
        rollout_is_weights=rollout_is_weights,
        **norm,
    )
    metrics = {
        "actor/pg_clipfrac": stats["pg_clipfrac"].item(),
        "actor/ppo_kl": stats["ppo_kl"].item(),
        "actor/pg_clipfrac_lower": stats["pg_clipfrac_lower"].item(),
    }
    return loss, metrics


def compute_policy_loss_vanilla(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "token-mean",
    config: Optional[Any] = None,
    rollout_is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """PPO/GRPO clipped surrogate with dual clip (verl ``vanilla``), fused.
    See :func:`luspo_rs.policy_loss` for the formula."""
    return _policy("vanilla", old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config, rollout_is_weights)


def compute_policy_loss_gspo(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "seq-mean-token-mean",
    config: Optional[Any] = None,
    rollout_is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """GSPO (sequence-level ratio), aggregated by ``loss_agg_mode`` (verl ``gspo``), fused."""
    return _policy("gspo", old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config, rollout_is_weights)


def compute_policy_loss_luspo(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "seq-mean-token-sum",
    config: Optional[Any] = None,
    rollout_is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """LUSPO: GSPO's token loss aggregated ``seq-mean-token-sum`` whatever
    ``loss_agg_mode`` says (each sequence weighted by its length), i.e.
    ``J = 1/G sum_i L_i min(s_i A_i, clip(s_i) A_i)``, with verl's global-batch
    normalisers from ``config.global_batch_info``."""
    return _policy("luspo", old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config, rollout_is_weights)


def agg_loss(
    loss_mat: torch.Tensor,
    loss_mask: torch.Tensor,
    loss_agg_mode: str,
    dp_size: int = 1,
    batch_num_tokens: Optional[int] = None,
    global_batch_size: Optional[int] = None,
    loss_scale_factor: Optional[int] = None,
) -> torch.Tensor:
    """verl's ``agg_loss`` (see :func:`luspo_rs.agg_loss`)."""
    return _agg_loss(
        loss_mat,
        loss_mask,
        loss_agg_mode,
        dp_size=dp_size,
        batch_num_tokens=batch_num_tokens,
        global_batch_size=global_batch_size,
        loss_scale_factor=loss_scale_factor,
    )


# --------------------------------------------------------------------------- KL


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
        if logprob.is_cuda:
            _cuda.kl_penalty(logprob.detach(), ref_logprob.detach(), out, grad, mode, torch_clamp_closed())
        else:
            _core.kl_penalty(logprob.detach(), ref_logprob.detach(), out, grad, mode, clamp_closed=torch_clamp_closed())
        ctx.save_for_backward(grad)
        ctx.dtypes = (logprob.dtype, ref_logprob.dtype)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        refuse_double_backward("luspo_rs.core_algos.kl_penalty")
        (grad,) = ctx.saved_tensors
        g = grad_out * grad
        d_lp = g.to(ctx.dtypes[0]) if ctx.needs_input_grad[0] else None
        d_ref = (-g).to(ctx.dtypes[1]) if ctx.needs_input_grad[1] else None
        return d_lp, d_ref, None


def kl_penalty(logprob: torch.FloatTensor, ref_logprob: torch.FloatTensor, kl_penalty) -> torch.FloatTensor:
    """verl's ``kl_penalty``, fused: with ``d = logprob - ref_logprob``,
    ``kl``/``k1``: ``d``; ``abs``: ``|d|``; ``mse``/``k2``: ``d^2/2``;
    ``low_var_kl``/``k3``: ``clamp(exp(k) - k - 1, -10, 10)`` with
    ``k = clamp(-d, -20, 20)``. A ``+`` suffix keeps the value and takes the
    gradient of ``k2`` (straight-through). Tensors of equal shape, any rank."""
    if not isinstance(kl_penalty, str):
        raise TypeError(f"kl_penalty: expected a string, got {type(kl_penalty).__name__}")
    for name, t in (("logprob", logprob), ("ref_logprob", ref_logprob)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    native = ("cpu", "cuda")
    if logprob.device.type not in native or ref_logprob.device.type not in native:
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
        out = KlPenaltyFunction.apply(logprob.reshape(-1, cols), ref_logprob.reshape(-1, cols), kl_penalty)
        return out.reshape(shape)
    return KlPenaltyFunction.apply(logprob, ref_logprob, kl_penalty)


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


# --------------------------------------------------------------------------- advantages


def group_index(index: Any) -> torch.Tensor:
    """Integer group labels for ``index``: integer arrays and tensors pass
    through (no copy when already contiguous int64/int32 on the CPU);
    anything else (uid strings in an object array, floats, mixed labels) is
    mapped to dense ids by Python equality, exactly as verl's
    ``id2score[index[i]]`` dictionary groups them."""
    if isinstance(index, torch.Tensor):
        if index.dtype.is_floating_point or index.dtype.is_complex:
            return group_index(index.detach().cpu().reshape(-1).tolist())
        t = index.detach().reshape(-1)
        return t if t.dtype in (torch.int64, torch.int32) else t.to(torch.int64)
    arr = index if isinstance(index, np.ndarray) else np.asarray(index, dtype=object)
    arr = arr.reshape(-1)
    if arr.dtype.kind == "i":
        return torch.from_numpy(np.ascontiguousarray(arr))
    if arr.dtype.kind in "ub":
        return torch.from_numpy(arr.astype(np.int64))
    ids = torch.empty(arr.shape[0], dtype=torch.int64)
    _core.group_ids(arr.tolist(), ids)
    return ids


def _advantage(estimator, token_level_rewards, response_mask, index, **params):
    for name, t in (("token_level_rewards", token_level_rewards), ("response_mask", response_mask)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if index is None:
        raise ValueError(f"index: the {estimator} estimator needs the group labels (the batch's uid array)")
    rewards, mask = token_level_rewards.detach(), response_mask.detach()
    gid = group_index(index)
    dtype = torch.promote_types(rewards.dtype, mask.dtype) if rewards.dtype.is_floating_point else rewards.dtype
    if rewards.is_cuda:
        out = _cuda.advantage(estimator, rewards, mask, gid, dtype, **params)
        return out, out
    if gid.device.type != "cpu":
        gid = gid.cpu()
    out = empty_host(tuple(rewards.shape), dtype)
    _core.advantage(rewards, mask, gid, out, estimator=estimator, **params)
    return out, out


def compute_grpo_outcome_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index: np.ndarray,
    epsilon: float = 1e-6,
    norm_adv_by_std_in_grpo: bool = True,
    config: Optional[Any] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GRPO: ``(s_i - mean_g) / (std_g + epsilon)`` with ``s_i`` the row sum of
    ``token_level_rewards`` and the unbiased std of its ``index`` group
    (singletons: mean 0, std 1); without ``norm_adv_by_std_in_grpo``
    (Dr.GRPO) ``s_i - mean_g``. Broadcast over tokens times ``response_mask``."""
    return _advantage(
        "grpo", token_level_rewards, response_mask, index,
        norm_adv_by_std_in_grpo=bool(norm_adv_by_std_in_grpo), epsilon=float(epsilon),
    )  # fmt: skip


def compute_grpo_vectorized_outcome_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index: np.ndarray,
    epsilon: float = 1e-6,
    norm_adv_by_std_in_grpo: bool = True,
    config: Optional[Any] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """verl's ``grpo_vectorized``: the same numbers as :func:`compute_grpo_outcome_advantage`."""
    return _advantage(
        "grpo_vectorized", token_level_rewards, response_mask, index,
        norm_adv_by_std_in_grpo=bool(norm_adv_by_std_in_grpo), epsilon=float(epsilon),
    )  # fmt: skip


def compute_rloo_outcome_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index: np.ndarray,
    epsilon: float = 1e-6,
    config: Optional[Any] = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """RLOO: ``n/(n-1) (s_i - mean_g)`` for groups of ``n > 1``; singletons keep ``s_i``."""
    return _advantage("rloo", token_level_rewards, response_mask, index)


def compute_rloo_vectorized_outcome_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index: np.ndarray,
    epsilon: float = 1e-6,
    config: Optional[Any] = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """verl's ``rloo_vectorized``: RLOO, but singletons get 0."""
    return _advantage("rloo_vectorized", token_level_rewards, response_mask, index)


def compute_reinforce_plus_plus_baseline_outcome_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index: torch.Tensor,
    epsilon: float = 1e-6,
    config: Optional[Any] = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """REINFORCE++ with group baseline: ``(s_i - mean_g) m``, then whitened over
    all valid tokens of the batch (verl's ``masked_whiten``) and masked."""
    return _advantage("reinforce_plus_plus_baseline", token_level_rewards, response_mask, index)


def compute_opo_outcome_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index: np.ndarray,
    epsilon: float = 1e-6,
    config: Optional[Any] = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """OPO: ``s_i`` minus the length-weighted group mean ``sum L s / sum L``
    (singletons keep ``s_i``), ``L_i = sum_t m_it``."""
    return _advantage("opo", token_level_rewards, response_mask, index)


def compute_gpg_outcome_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index: np.ndarray,
    epsilon: float = 1e-6,
    f_norm: float = 1.0,
    alpha: float = 1.0,
    config=None,
    **kwargs,
):
    """GPG: ``alpha (s_i - mean_g) / f_norm`` with ``alpha = B / max(#{s_i != 0}, 1)``
    (verl recomputes ``alpha``; the argument is ignored, as there)."""
    return _advantage("gpg", token_level_rewards, response_mask, index, f_norm=float(f_norm))
