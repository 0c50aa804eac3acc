"""verl's group (outcome) advantage estimators: the public entry point
:func:`advantage` and :func:`group_index`, which turns verl's ``index`` (uid
strings, integers, ...) into integer group labels."""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import torch

from . import _core, _cuda
from ._alloc import empty_host
from ._args import require_strings, require_tensors, to_float

Estimator = Literal["grpo", "grpo_vectorized", "rloo", "rloo_vectorized", "reinforce_plus_plus_baseline", "opo", "gpg"]


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
    index: Any,
    estimator: Estimator = "grpo",
    *,
    norm_adv_by_std_in_grpo: bool = True,
    epsilon: float = 1e-6,
    f_norm: float = 1.0,
) -> torch.Tensor:
    """verl's outcome advantage ``estimator``, as a ``(B, T)`` tensor.

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
    * ``gpg``: ``alpha (s_i - mean_g) / f_norm``, ``alpha = B / max(#{s_i != 0}, 1)``.

    ``epsilon`` and ``norm_adv_by_std_in_grpo`` are used by the GRPO
    estimators only, ``f_norm`` by ``gpg`` only (each must still be valid).
    Group statistics are
    computed in float64; the result has the dtype of verl's (the rewards'
    promoted with the mask's) and the rewards' device. CUDA inputs are
    computed on the current stream, without a host sync.
    """
    require_tensors(token_level_rewards=token_level_rewards, response_mask=response_mask)
    require_strings(estimator=estimator)
    if index is None:
        raise ValueError(f"index: the {estimator} estimator needs the group labels (the batch's uid array)")
    params = dict(
        norm_adv_by_std_in_grpo=bool(norm_adv_by_std_in_grpo),
        epsilon=to_float("epsilon", epsilon),
        f_norm=to_float("f_norm", f_norm),
    )
    rewards, mask = token_level_rewards.detach(), response_mask.detach()
    gid = group_index(index)
    dtype = torch.promote_types(rewards.dtype, mask.dtype) if rewards.dtype.is_floating_point else rewards.dtype
    if _cuda.on_device(rewards):
        # the labels on the device, their stable argsort and the kernels' scratch
        gid, cuda = _cuda.advantage_inputs(rewards, gid)
        out = torch.empty(rewards.shape, dtype=dtype, device=rewards.device)
    else:
        gid, cuda = gid.cpu(), {}
        out = empty_host(tuple(rewards.shape), dtype)
    _core.advantage(rewards, mask, gid, out, estimator=estimator, **params, **cuda)
    return out
