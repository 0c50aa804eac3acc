"""verl's advantage estimators: the public entry point :func:`advantage`
(the group estimators, and the scans GAE, REINFORCE++ and ReMax) and
:func:`group_index`, which turns verl's ``index`` (uid strings, integers,
...) into integer group labels."""

from __future__ import annotations

from typing import Any, Literal, Optional, Sequence, Union

import numpy as np
import torch

from . import _core, _cuda
from ._alloc import empty_host
from ._args import BUILD, require_strings, require_tensors, to_float

GroupEstimator = Literal[
    "grpo", "grpo_vectorized", "rloo", "rloo_vectorized", "reinforce_plus_plus_baseline", "opo", "gpg",
    "grpo_passk", "gdpo",
]  # fmt: skip
ScanEstimator = Literal["gae", "reinforce_plus_plus", "remax"]
TokenBaselineEstimator = Literal["optimal_token_baseline", "tir_optimal_token_baseline"]
Estimator = Literal[
    "grpo", "grpo_vectorized", "rloo", "rloo_vectorized", "reinforce_plus_plus_baseline", "opo", "gpg",
    "grpo_passk", "gdpo",
    "gae", "reinforce_plus_plus", "remax", "optimal_token_baseline", "tir_optimal_token_baseline",
]  # fmt: skip

#: The estimators that scan each row backwards (``_core.returns``); they write
#: verl's returns as well as the advantages.
SCAN_ESTIMATORS = ("gae", "reinforce_plus_plus", "remax")

#: The per-token group baselines (``_core.token_baseline``); they write verl's
#: returns as well as the advantages.
TOKEN_BASELINE_ESTIMATORS = ("optimal_token_baseline", "tir_optimal_token_baseline")


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


def advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index: Any = None,
    estimator: Estimator = "grpo",
    *,
    norm_adv_by_std_in_grpo: bool = True,
    epsilon: Optional[float] = None,
    f_norm: float = 1.0,
    values: Optional[torch.Tensor] = None,
    reward_baselines: Optional[torch.Tensor] = None,
    gamma: float = 1.0,
    lam: float = 1.0,
    old_log_probs: Optional[torch.Tensor] = None,
    sum_pi_squared: Optional[torch.Tensor] = None,
    rollout_is_weights: Optional[torch.Tensor] = None,
    handle_zero_tail: bool = True,
    with_returns: bool = False,
    reward_scores: Optional[torch.Tensor] = None,
    reward_weights: Optional[Sequence[float]] = None,
) -> Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """verl's advantage ``estimator``, as a ``(B, T)`` tensor (with
    ``with_returns=True``, verl's pair ``(advantages, returns)``).

    **Scans** (no ``index``), each row from its last token to its first, with
    verl's arithmetic step for step (observation tokens, ``m = 0`` inside a
    response, carry the state through, as verl's loops do):

    * ``gae`` (``values``, ``gamma``, ``lam``): ``delta_t = r_t + gamma nv - v_t``,
      ``g = delta_t + gamma lam g`` at valid tokens, ``nv`` the next valid
      token's value; returns ``g + v``, advantages ``g`` whitened over the
      batch's valid tokens (verl's ``masked_whiten``, not masked);
    * ``reinforce_plus_plus`` (``gamma``): returns ``ret_t = (r_t + gamma run) m_t``,
      the running return carried past observation tokens; advantages
      ``whiten(ret) m``;
    * ``remax`` (``reward_baselines``, one per row): returns the reverse
      cumulative sum of ``r m``, advantages ``ret - b m``.

    The whitening needs two valid tokens in the batch: with fewer, verl
    raises and the advantages here are NaN (on both devices: raising on CUDA
    would need a host sync). 16-bit inputs are computed in float32 and
    rounded once (verl rounds at every step).

    **Group estimators** (``index`` required):

    With ``s_i = sum_t r_it`` the score of row ``i``, ``L_i = sum_t m_it``,
    and ``mean_g`` / ``std_g`` (unbiased) over the rows of ``i``'s group
    (rows with equal ``index`` labels, e.g. verl's uid array), the value of
    row ``i``, broadcast over its tokens and multiplied by ``response_mask``:

    * ``grpo``, ``grpo_vectorized``: ``(s_i - mean_g) / (std_g + epsilon)``
      (singletons: mean 0, std 1); ``s_i - mean_g`` without ``norm_adv_by_std_in_grpo`` (Dr.GRPO);
    * ``rloo``: ``n/(n-1) (s_i - mean_g)`` in groups of ``n > 1``, singletons
      keep ``s_i``; ``rloo_vectorized``: the same, singletons get 0;
    * ``reinforce_plus_plus_baseline``: ``(s_i - mean_g) m``, then whitened over
      the batch's valid tokens (verl's ``masked_whiten``) and masked;
    * ``opo``: ``s_i - sum_g L s / sum_g L`` (singletons keep ``s_i``);
    * ``gpg``: ``alpha (s_i - mean_g) / f_norm``, ``alpha = B / max(#{s_i != 0}, 1)``;
    * ``grpo_passk`` (Pass@k): only the best row of each group gets
      ``(s_(1) - s_(2)) / (std_g + epsilon)`` (``s_(1) - s_(2)`` without
      ``norm_adv_by_std_in_grpo``), the gap between the group's two largest
      scores; the other rows get 0. Of tied maxima the first row (in batch
      order) is the best, NaN counts as the largest score. Every group needs
      two rows or more (``ValueError``, as verl; on CUDA with labels already
      on the device such a row gets NaN instead);
    * ``gdpo``: ``c_i = sum_k w_k a_ik``, ``a_ik`` the ``grpo`` value of row
      ``i`` for the ``k``-th column of ``reward_scores`` (``(B, K)``, each row's
      score under K reward keys), ``w`` the ``reward_weights`` (rounded to
      float32 as verl's; default all 1); without ``reward_scores`` one key,
      ``s_i``, weight 1. Then ``c_i m`` whitened over the batch's valid tokens
      (verl's ``masked_whiten``) and masked, as ``reinforce_plus_plus_baseline``.
      With ``reward_scores`` the rewards are not read (only their shape and
      device) and the result's dtype is ``reward_scores``' promoted with the mask's.

    **Optimal token baselines** (``index``, ``old_log_probs``,
    ``sum_pi_squared``, optional ``rollout_is_weights`` and ``handle_zero_tail``):
    returns ``G`` the reverse cumulative sum of ``r m``; ``w = (1 - 2 exp(old) + sum_pi_squared)``
    times ``rollout_is_weights**2`` when given, ``W`` the cumulative sum of ``w m``;

    * ``optimal_token_baseline``: per group and column ``B_t = sum_g(G W m) / (sum_g(W m) + epsilon)``,
      advantages ``(G - B) m`` (singleton groups: ``B = 0``);
    * ``tir_optimal_token_baseline``: the same over valid-token ranks (the k-th
      token with ``m != 0`` of each row, for multi-turn masks with holes);
      rows without a valid token are left out of their group (advantages 0).

    With ``handle_zero_tail`` the unique longest row of a group gets ``B = 0``
    beyond the second-longest length. ``epsilon`` defaults to 1e-8 here.

    ``epsilon`` (default 1e-6) and ``norm_adv_by_std_in_grpo`` are used by the GRPO
    estimators (``grpo``, ``grpo_vectorized``, ``grpo_passk``, ``gdpo``) only,
    ``f_norm`` by ``gpg`` only (each must still be valid).
    Group statistics are computed in float64. The returns of a group
    estimator are its advantages (verl returns the same tensor twice).

    Results have verl's dtypes (torch's promotion of the inputs, as verl's
    expressions give it) and the rewards' device. CUDA inputs are computed
    on the current stream, without a host sync.

    Under ``torch.compile`` the call is the ``torch.library`` op of its
    family (``luspo_rs::advantage``, ``luspo_rs::returns``,
    ``luspo_rs::token_baseline``; eager calls skip the dispatcher), with the
    same kernels and bits. ``fullgraph=True`` needs ``index`` as an integer
    (or bool) tensor of group ids, e.g. ``core_algos.group_index(uid)``
    computed once outside the graph: verl's uid strings are host data that
    no graph holds, so a default compile runs a call given them eagerly (a
    graph break) and ``fullgraph=True`` refuses it.
    """
    require_tensors(token_level_rewards=token_level_rewards, response_mask=response_mask)
    require_strings(estimator=estimator)
    if estimator in SCAN_ESTIMATORS:
        adv, ret = _scan(token_level_rewards, response_mask, estimator, values, reward_baselines, gamma, lam)
        return (adv, ret) if with_returns else adv
    if index is None:
        raise ValueError(f"index: the {estimator} estimator needs the group labels (the batch's uid array)")
    if estimator in TOKEN_BASELINE_ESTIMATORS:
        adv, ret = _token_baseline(token_level_rewards, response_mask, index, estimator, old_log_probs,
                                   sum_pi_squared, rollout_is_weights, handle_zero_tail,
                                   1e-8 if epsilon is None else epsilon)  # fmt: skip
        return (adv, ret) if with_returns else adv
    norm = bool(norm_adv_by_std_in_grpo)
    eps = to_float("epsilon", 1e-6 if epsilon is None else epsilon)
    f_norm = to_float("f_norm", f_norm)
    rewards, mask = token_level_rewards.detach(), response_mask.detach()
    keys = _key_scores(estimator, rewards, reward_scores, reward_weights)
    if torch.compiler.is_compiling():
        gid = _compiled_group_ids(index, estimator == "grpo_passk")
        out = _advantage_op(rewards, mask, gid, keys.get("scores"), keys.get("weights"), estimator, norm, eps, f_norm,
                            build=BUILD)  # fmt: skip
        return (out, out) if with_returns else out
    gid = group_index(index)
    if estimator == "grpo_passk" and gid.device.type == "cpu":
        _require_pairs(gid, index)
    out = _group_kernel(rewards, mask, gid, keys.get("scores"), keys.get("weights"), estimator, norm, eps, f_norm)
    return (out, out) if with_returns else out


def _group_dtype(rewards: torch.Tensor, mask: torch.Tensor, scores: Optional[torch.Tensor]) -> torch.dtype:
    """The group estimators' result dtype: verl's ``scores * mask`` promotion
    (gdpo's per-key float32 ``scores`` in place of the rewards' row sums)."""
    if scores is not None and scores.dtype.is_floating_point:
        return torch.promote_types(scores.dtype, mask.dtype)
    return torch.promote_types(rewards.dtype, mask.dtype) if rewards.dtype.is_floating_point else rewards.dtype


def _group_kernel(rewards, mask, gid, scores, weights, estimator, norm, epsilon, f_norm) -> torch.Tensor:
    """``_core.advantage`` into a new ``(B, T)`` tensor (the eager path and
    the op's implementation): on CUDA with the labels on the device, their
    stable argsort, the kernels' scratch and the current stream."""
    dtype = _group_dtype(rewards, mask, scores)
    if _cuda.on_device(rewards):
        gid, cuda = _cuda.advantage_inputs(rewards, gid)
        out = torch.empty(rewards.shape, dtype=dtype, device=rewards.device)
    else:
        gid, cuda = gid.cpu(), {}
        out = empty_host(tuple(rewards.shape), dtype)
    _core.advantage(rewards, mask, gid, out, estimator=estimator, norm_adv_by_std_in_grpo=norm, epsilon=epsilon,
                    f_norm=f_norm, scores=scores, weights=weights, **cuda)  # fmt: skip
    return out


def _key_scores(estimator: str, rewards: torch.Tensor, scores: Any, weights: Any) -> dict[str, torch.Tensor]:
    """``gdpo``'s per-key ``scores`` and float64 ``weights`` (verl's float32
    weights, widened) for ``_core.advantage``, or nothing."""
    if scores is None:
        if weights is not None:
            raise ValueError("reward_weights: given without reward_scores (gdpo's per-key scores)")
        return {}
    if estimator != "gdpo":
        raise ValueError(f"reward_scores: only the gdpo estimator reads per-key scores, not {estimator}")
    require_tensors(reward_scores=scores)
    scores = scores.detach()
    if scores.dim() != 2 or scores.shape[1] == 0:
        raise ValueError(
            f"reward_scores: expected a (batch, keys) tensor with at least one key, got shape {tuple(scores.shape)}"
        )
    k = scores.shape[1]
    if weights is None:
        w = torch.ones(k, dtype=torch.float64)
    else:
        try:
            w = torch.as_tensor(weights, dtype=torch.float32).reshape(-1).to(torch.float64)
        except (TypeError, ValueError, RuntimeError) as e:
            raise TypeError(f"reward_weights: expected {k} numbers, got {weights!r}") from e
        if w.numel() != k:
            raise ValueError(f"reward_weights: expected one weight per key ({k}), got {w.numel()}")
    if _cuda.on_device(rewards):
        w = w.to(rewards.device, non_blocking=True)
    return dict(scores=scores, weights=w)


def _require_pairs(gid: torch.Tensor, index: Any) -> None:
    """verl's Pass@k ``ValueError`` for a group of one row, naming its label."""
    _, inverse, counts = torch.unique(gid, return_inverse=True, return_counts=True)
    lone = torch.nonzero(counts[inverse] < 2)
    if lone.numel():
        i = int(lone[0, 0])
        label = index[i].item() if isinstance(index, torch.Tensor) else index[i]
        raise ValueError(
            f"index: grpo_passk (Pass@k) needs at least 2 responses per group, got 1 for group {label!r} (row {i})"
        )


def _scan(rewards, mask, estimator, values, baselines, gamma, lam) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE, REINFORCE++ or ReMax through ``_core.returns``: both outputs in
    verl's dtypes."""
    rewards, mask = rewards.detach(), mask.detach()
    needed = {"gae": ("values", values), "remax": ("reward_baselines", baselines)}.get(estimator)
    if needed is not None:
        if needed[1] is None:
            raise ValueError(f"{needed[0]}: the {estimator} estimator needs it")
        require_tensors(**{needed[0]: needed[1]})
    values = None if values is None or estimator != "gae" else values.detach()
    baselines = None if baselines is None or estimator != "remax" else baselines.detach()
    gamma, lam = to_float("gamma", gamma), to_float("lam", lam)
    for name, t in (("token_level_rewards", rewards), ("values", values), ("reward_baselines", baselines)):
        if t is not None and not t.dtype.is_floating_point:
            raise TypeError(f"{name}: expected a floating-point tensor, got {t.dtype}")
    if torch.compiler.is_compiling():
        return _returns_op(rewards, mask, values, baselines, estimator, gamma, lam, build=BUILD)
    return _scan_kernel(rewards, mask, values, baselines, estimator, gamma, lam)


def _scan_dtypes(estimator, rewards, mask, values, baselines) -> tuple[torch.dtype, torch.dtype]:
    """``(advantages, returns)`` dtypes of a scan, as verl's expressions promote them."""
    promote = torch.promote_types
    if estimator == "gae":  # delta, g and the returns: rewards, values and mask together
        dtype = promote(promote(rewards.dtype, values.dtype), mask.dtype)
        return dtype, dtype
    if estimator == "reinforce_plus_plus":  # returns = zeros_like(rewards); whiten(returns) * mask
        return promote(rewards.dtype, mask.dtype), rewards.dtype
    if estimator == "remax":  # returns from (r * m).cumsum; returns - b * m
        ret_dtype = promote(rewards.dtype, mask.dtype)
        return promote(ret_dtype, promote(baselines.dtype, mask.dtype)), ret_dtype
    raise ValueError(f"estimator: {estimator!r} is not a scan; expected one of {', '.join(SCAN_ESTIMATORS)}")


def _scan_kernel(rewards, mask, values, baselines, estimator, gamma, lam) -> tuple[torch.Tensor, torch.Tensor]:
    """``_core.returns`` into two new ``(B, T)`` tensors (the eager path and
    the op's implementation); on CUDA with the kernels' scratch and the
    current stream."""
    adv_dtype, ret_dtype = _scan_dtypes(estimator, rewards, mask, values, baselines)
    if _cuda.on_device(rewards):
        device = rewards.device
        adv = torch.empty(rewards.shape, dtype=adv_dtype, device=device)
        ret = torch.empty(rewards.shape, dtype=ret_dtype, device=device)
        rows = rewards.shape[0] if rewards.dim() > 0 else 0
        cuda = dict(scratch=torch.empty(_core.returns_scratch_len(rows), dtype=torch.float64, device=device),
                    stream=_cuda.stream_of(rewards))
    else:
        adv, ret, cuda = empty_host(tuple(rewards.shape), adv_dtype), empty_host(tuple(rewards.shape), ret_dtype), {}
    _core.returns(rewards, mask, adv, ret, estimator=estimator, values=values, reward_baselines=baselines,
                  gamma=gamma, lam=lam, **cuda)
    return adv, ret


def _token_baseline(rewards, mask, index, estimator, old, sp, rho, handle_zero_tail, epsilon):
    """The optimal token baselines through ``_core.token_baseline``: both
    outputs in verl's dtype, ``promote(rewards, mask)``."""
    for name, t in (("old_log_probs", old), ("sum_pi_squared", sp)):
        if t is None:
            raise ValueError(f"{name}: the {estimator} estimator needs it")
    require_tensors(old_log_probs=old, sum_pi_squared=sp)
    if rho is not None:
        require_tensors(rollout_is_weights=rho)
        rho = rho.detach()
    epsilon = to_float("epsilon", epsilon)
    rewards, mask, old, sp = rewards.detach(), mask.detach(), old.detach(), sp.detach()
    if not rewards.dtype.is_floating_point:
        raise TypeError(f"token_level_rewards: expected a floating-point tensor, got {rewards.dtype}")
    handle_zero_tail = bool(handle_zero_tail)
    if torch.compiler.is_compiling():
        gid = _compiled_group_ids(index, False)
        return _token_baseline_op(rewards, mask, gid, old, sp, rho, estimator, handle_zero_tail, epsilon, build=BUILD)
    return _token_baseline_kernel(rewards, mask, group_index(index), old, sp, rho, estimator, handle_zero_tail, epsilon)


def _token_baseline_kernel(rewards, mask, gid, old, sp, rho, estimator, handle_zero_tail, epsilon):
    """``_core.token_baseline`` into two new ``(B, T)`` tensors (the eager
    path and the op's implementation); on CUDA with the labels on the device,
    their stable argsort, the kernels' scratch and the current stream."""
    dtype = torch.promote_types(rewards.dtype, mask.dtype)
    if _cuda.on_device(rewards):
        gid, cuda = _cuda.advantage_inputs(rewards, gid, _core.token_baseline_scratch_len)
        adv = torch.empty(rewards.shape, dtype=dtype, device=rewards.device)
        ret = torch.empty(rewards.shape, dtype=dtype, device=rewards.device)
    else:
        gid = gid.cpu()
        adv, ret, cuda = empty_host(tuple(rewards.shape), dtype), empty_host(tuple(rewards.shape), dtype), {}
    _core.token_baseline(rewards, mask, gid, old, sp, adv, ret, estimator=estimator, rollout_is_weights=rho,
                         handle_zero_tail=handle_zero_tail, epsilon=epsilon, **cuda)  # fmt: skip
    return adv, ret


# ---------------------------------------------------------------- the torch.library ops
#
# `luspo_rs::advantage` (the group estimators), `luspo_rs::returns` (the
# scans) and `luspo_rs::token_baseline` are the same native calls as
# torch.library custom ops, so that torch.compile traces a step computing
# advantages (fullgraph, no graph break) and fake tensors infer the outputs.
# Eager calls keep the direct calls above (no dispatcher host time). No
# autograd: advantages are data (verl computes them under no_grad); the
# inputs are detached before the call, as eagerly.
#
# The group labels enter the ops as an integer tensor. verl's uid strings
# (a numpy object array) are mapped to ids on the host, outside any graph:
# under torch.compile that mapping is a graph break by design, and
# `fullgraph=True` needs `index` as an integer tensor (the group ids).


@torch.compiler.disable(
    reason="luspo_rs.advantage: group labels other than an integer tensor (verl's uid strings) are mapped to ids on "
    "the host; for fullgraph=True pass index as an int64 tensor of group ids (core_algos.group_index(uid))"
)
def _host_group_ids(index: Any, passk: bool) -> torch.Tensor:
    """:func:`group_index` of labels that are not an integer tensor, run
    eagerly (a graph break under torch.compile); Pass@k's check of lone rows
    here names the original label."""
    gid = group_index(index)
    if passk and gid.device.type == "cpu":
        _require_pairs(gid, index)
    return gid


def _compiled_group_ids(index: Any, passk: bool) -> torch.Tensor:
    """The labels the ops take: an integer (or bool) tensor is traced into
    the graph as it is; other labels go through :func:`_host_group_ids`."""
    if isinstance(index, torch.Tensor) and not (index.dtype.is_floating_point or index.dtype.is_complex):
        gid = index.detach().reshape(-1)
        return gid if gid.dtype in (torch.int64, torch.int32) else gid.to(torch.int64)
    return _host_group_ids(index, passk)


@torch.library.custom_op("luspo_rs::advantage", mutates_args=())
def _advantage_op(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index: torch.Tensor,
    scores: Optional[torch.Tensor],
    weights: Optional[torch.Tensor],
    estimator: str,
    norm_adv_by_std_in_grpo: bool,
    epsilon: float,
    f_norm: float,
    *,
    build: str = "",
) -> torch.Tensor:
    """A group estimator's ``(B, T)`` advantages; ``index`` the integer group
    labels (``(B,)``), ``scores`` / ``weights`` gdpo's per-key scores
    (``build``: see ``_args.BUILD``)."""
    if estimator == "grpo_passk" and index.device.type == "cpu":
        _require_pairs(index, index)
    return _group_kernel(token_level_rewards, response_mask, index, scores, weights, estimator,
                         norm_adv_by_std_in_grpo, epsilon, f_norm)  # fmt: skip


@_advantage_op.register_fake
def _(token_level_rewards, response_mask, index, scores, *args, build=""):
    dtype = _group_dtype(token_level_rewards, response_mask, scores)
    return token_level_rewards.new_empty(token_level_rewards.shape, dtype=dtype)


@torch.library.custom_op("luspo_rs::returns", mutates_args=())
def _returns_op(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    values: Optional[torch.Tensor],
    reward_baselines: Optional[torch.Tensor],
    estimator: str,
    gamma: float,
    lam: float,
    *,
    build: str = "",
) -> tuple[torch.Tensor, torch.Tensor]:
    """A scan's ``(advantages, returns)`` (``build``: see ``_args.BUILD``)."""
    return _scan_kernel(token_level_rewards, response_mask, values, reward_baselines, estimator, gamma, lam)


@_returns_op.register_fake
def _(token_level_rewards, response_mask, values, reward_baselines, estimator, gamma, lam, *, build=""):
    adv_dtype, ret_dtype = _scan_dtypes(estimator, token_level_rewards, response_mask, values, reward_baselines)
    shape = token_level_rewards.shape
    return token_level_rewards.new_empty(shape, dtype=adv_dtype), token_level_rewards.new_empty(shape, dtype=ret_dtype)


@torch.library.custom_op("luspo_rs::token_baseline", mutates_args=())
def _token_baseline_op(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index: torch.Tensor,
    old_log_probs: torch.Tensor,
    sum_pi_squared: torch.Tensor,
    rollout_is_weights: Optional[torch.Tensor],
    estimator: str,
    handle_zero_tail: bool,
    epsilon: float,
    *,
    build: str = "",
) -> tuple[torch.Tensor, torch.Tensor]:
    """An optimal token baseline's ``(advantages, returns)`` (``build``: see ``_args.BUILD``)."""
    return _token_baseline_kernel(token_level_rewards, response_mask, index, old_log_probs, sum_pi_squared,
                                  rollout_is_weights, estimator, handle_zero_tail, epsilon)  # fmt: skip


@_token_baseline_op.register_fake
def _(token_level_rewards, response_mask, *args, build=""):
    dtype = torch.promote_types(token_level_rewards.dtype, response_mask.dtype)
    shape = token_level_rewards.shape
    return token_level_rewards.new_empty(shape, dtype=dtype), token_level_rewards.new_empty(shape, dtype=dtype)
