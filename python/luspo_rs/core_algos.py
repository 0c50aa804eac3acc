"""Drop-ins for ``verl.trainer.ppo.core_algos``, computed by luspo-rs.

Every function here has the signature, argument names, defaults and return
types of its verl 0.9.x namesake, reads the same config fields, and returns
the same numbers (to floating-point rounding: luspo-rs accumulates in f64).
This module holds only verl's signatures and config handling: the work is
done by the public functions (:func:`luspo_rs.policy_loss`,
:func:`luspo_rs.agg_loss`, :func:`luspo_rs.kl_penalty`,
:func:`luspo_rs.advantage`). It does not import verl (only
``compute_policy_loss_bypass_mode``, when called, imports verl's rollout
correction, as verl's own does).

* policy losses — ``compute_policy_loss_<mode>`` for every mode verl
  registers (:data:`POLICY_LOSSES`), ``compute_policy_loss_luspo`` and verl's
  ``compute_policy_loss_reinforce`` — return ``(loss, metrics)`` with the
  metrics verl returns for the mode (``"actor/pg_clipfrac"``, ``"actor/ppo_kl"``,
  ``"actor/pg_clipfrac_lower"``, or fewer) as python floats, then the length
  diagnostics ``"actor/len_*"``; they read the config fields verl's function
  reads (``clip_ratio*``, ``tau_pos``/``tau_neg``, ``policy_loss.dro_beta``,
  ``policy_loss.clip_cov_*``, ``kl_cov_ratio``, ``ppo_kl_coef``) and
  ``config.global_batch_info``; Clip-Cov and KL-Cov choose their tokens as
  verl does (:mod:`luspo_rs.cov_select`: the same tokens for the same torch
  seed), ``bypass_mode`` applies verl's rollout correction and dispatches
  to the fused REINFORCE or PPO-clip loss, adding verl's ``rollout_corr/*``
  metrics;
* ``compute_value_loss`` — verl's clipped critic loss, returning
  ``(vf_loss, vf_clipfrac)`` with ``vf_clipfrac`` a 0-d tensor in verl's dtype;
* ``agg_loss`` and ``kl_penalty``, differentiable through torch autograd;
* the outcome advantage estimators, returning ``(advantages, returns)`` (the
  same tensor twice, as verl), and the scans ``compute_gae_advantage_return``,
  ``compute_reinforce_plus_plus_outcome_advantage`` and
  ``compute_remax_outcome_advantage`` (two tensors), and the optimal token
  baselines ``compute_optimal_token_baseline_advantage`` and
  ``compute_multi_turn_optimal_token_baseline_advantage`` (two tensors).

Known, deliberate differences from verl (documented in docs/exactness.md):

* a ``torch.Tensor`` ``index`` is grouped by value (verl's loop estimators
  would hash each 0-d tensor by identity, i.e. one group per row);
* group statistics are computed in f64, so groups whose scores are all equal
  get exactly 0 where verl's f32 arithmetic may leave a rounding residue
  divided by ``std + epsilon``;
* ``reinforce_plus_plus_baseline`` and ``gdpo`` do not raise when the whole
  batch has at most one valid token (verl's ``masked_var`` does); they return
  zeros or NaN; GAE and REINFORCE++ return NaN advantages there (their returns
  are right);
* ``grpo_passk``: of tied best scores in a group the first row gets the
  advantage (torch's CPU ``topk`` picks an implementation-defined one in
  groups of more than 3 rows); this shows only where that advantage is NaN
  (``epsilon=0`` with an all-equal group, or non-finite scores). A missing
  ``config`` (verl: ``assert``) and, for ``gdpo``, a missing
  ``gdpo_reward_keys`` or reward key (verl: ``assert``) or too few
  ``gdpo_reward_weights`` (verl: ``IndexError``) are ``ValueError`` /
  ``KeyError`` naming what is missing.
* the optimal token baselines sum over a group's rows in float64, take
  ``exp(old_log_probs)`` correctly rounded (torch's float32 ``exp`` can be
  an ulp off), compute the mixtures of float32 and float64 inputs for which
  verl raises ("Index put requires the source and destination dtypes
  match"), leave the zero tail alone where a mask sum is not finite (verl's
  ``int(nan)`` raises), and in the multi-turn form rank the ``m != 0`` tokens
  whatever the mask's values (verl raises unless ``int(sum m)`` is their count).
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import numpy as np
import torch

from .advantage import advantage, group_index
from .agg_loss import agg_loss as _agg_loss
from .kl_penalty import kl_penalty  # verl's signature already: the drop-in is the public function
from .policy_loss import policy_loss as _policy_loss
from .value_loss import value_loss as _value_loss

__all__ = [
    "ESTIMATORS",
    "agg_loss",
    "compute_gae_advantage_return",
    "compute_gpg_outcome_advantage",
    "compute_gdpo_outcome_advantage",
    "compute_grpo_outcome_advantage",
    "compute_grpo_passk_outcome_advantage",
    "compute_grpo_vectorized_outcome_advantage",
    "compute_multi_turn_optimal_token_baseline_advantage",
    "compute_opo_outcome_advantage",
    "compute_optimal_token_baseline_advantage",
    "POLICY_LOSSES",
    "compute_policy_loss_cispo",
    "compute_policy_loss_clip_cov",
    "compute_policy_loss_dppo_kl",
    "compute_policy_loss_dppo_tv",
    "compute_policy_loss_bypass_mode",
    "compute_policy_loss_dro",
    "compute_policy_loss_geo_mean",
    "compute_policy_loss_gpg",
    "compute_policy_loss_gspo",
    "compute_policy_loss_kl_cov",
    "compute_policy_loss_luspo",
    "compute_policy_loss_reinforce",
    "compute_policy_loss_sapo",
    "compute_policy_loss_vanilla",
    "compute_reinforce_plus_plus_baseline_outcome_advantage",
    "compute_reinforce_plus_plus_outcome_advantage",
    "compute_remax_outcome_advantage",
    "compute_rloo_outcome_advantage",
    "compute_rloo_vectorized_outcome_advantage",
    "compute_value_loss",
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


def _knob(config: Any, key: str, default: Any) -> Any:
    """``config.policy_loss.<key>``, or ``default`` where it is absent or None
    (verl's fallbacks for the Clip-Cov / KL-Cov / DRO fields)."""
    value = _cfg(_cfg(config, "policy_loss", None) or {}, key, None)
    return default if value is None else value


#: Modes that read the clip fields (the rest ignore them, as verl's do).
_CLIPPED = {"vanilla", "gspo", "luspo", "cispo", "geo_mean", "clip_cov", "dppo_tv", "dppo_kl"}


def _policy(mode: str, old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config, rollout_is_weights):
    if config is None:
        raise ValueError(f"config: compute_policy_loss_{mode} needs the actor config (clip_ratio, ...), got None")
    clip_ratio = _cfg(config, "clip_ratio")
    if clip_ratio is None:
        if mode in _CLIPPED:
            raise ValueError("config: clip_ratio is not set")
        clip_ratio = 0.2  # (unused by this mode)
    gbi = _cfg(config, "global_batch_info", None) or {}
    norm = {k: gbi[k] for k in _GLOBAL_BATCH_KEYS if k in gbi and gbi[k] is not None}
    knobs: dict[str, Any] = {}
    if mode == "sapo":
        knobs.update(tau_pos=_cfg(config, "tau_pos", 1.0), tau_neg=_cfg(config, "tau_neg", 1.05))
    elif mode == "dro":
        knobs["dro_beta"] = _knob(config, "dro_beta", None)
    elif mode == "clip_cov":
        knobs.update(
            clip_cov_ratio=_knob(config, "clip_cov_ratio", 0.0002),
            clip_cov_lb=_knob(config, "clip_cov_lb", 1.0),
            clip_cov_ub=_knob(config, "clip_cov_ub", 5.0),
        )
    elif mode == "kl_cov":
        knobs.update(kl_cov_ratio=_knob(config, "kl_cov_ratio", 0.0002), ppo_kl_coef=_knob(config, "ppo_kl_coef", 1.0))
    # DPPO: verl's config.get("clip_ratio_c", 20.0); the dual clip: 3.0 as ActorConfig's default
    clip_ratio_c = _cfg(config, "clip_ratio_c", 20.0 if mode in ("dppo_tv", "dppo_kl") else 3.0)
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
        clip_ratio_c=clip_ratio_c,
        rollout_is_weights=rollout_is_weights,
        diagnostics=True,  # verl logs them as actor/len_*
        **knobs,
        **norm,
    )
    # verl's metrics for the mode, then the length diagnostics (logged as
    # actor/len_*); one device-to-host copy for all of them
    names = list(stats)
    values = torch.stack([stats[name] for name in names]).tolist()
    metrics = {f"actor/{name}": v for name, v in zip(names, values)}
    return loss, metrics


def _policy_drop_in(mode: str, default_agg: str, doc: str) -> Callable[..., tuple[torch.Tensor, dict[str, Any]]]:
    def drop_in(
        old_log_prob: torch.Tensor,
        log_prob: torch.Tensor,
        advantages: torch.Tensor,
        response_mask: torch.Tensor,
        loss_agg_mode: str = default_agg,
        config: Optional[Any] = None,
        rollout_is_weights: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        return _policy(mode, old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config, rollout_is_weights)

    drop_in.__name__ = drop_in.__qualname__ = f"compute_policy_loss_{mode}"
    drop_in.__doc__ = doc + " See :func:`luspo_rs.policy_loss` for the formula."
    return drop_in


compute_policy_loss_vanilla = _policy_drop_in(
    "vanilla", "token-mean", "PPO/GRPO clipped surrogate with dual clip (verl ``vanilla``), fused."
)
compute_policy_loss_gspo = _policy_drop_in(
    "gspo", "seq-mean-token-mean", "GSPO (sequence-level ratio), aggregated by ``loss_agg_mode`` (verl ``gspo``), fused."
)
compute_policy_loss_luspo = _policy_drop_in(
    "luspo",
    "seq-mean-token-sum",
    "LUSPO: GSPO's token loss aggregated ``seq-mean-token-sum`` whatever ``loss_agg_mode`` says (each "
    "sequence weighted by its length), i.e. ``J = 1/G sum_i L_i min(s_i A_i, clip(s_i) A_i)``, with verl's "
    "global-batch normalisers from ``config.global_batch_info``.",
)
compute_policy_loss_cispo = _policy_drop_in("cispo", "token-mean", "CISPO (verl ``cispo``), fused.")
compute_policy_loss_sapo = _policy_drop_in(
    "sapo", "seq-mean-token-mean", "SAPO (verl ``sapo``; always ``seq-mean-token-mean``), fused; reads ``config.tau_pos`` / ``tau_neg``."
)
compute_policy_loss_geo_mean = _policy_drop_in(
    "geo_mean", "token-mean", "GMPO (verl ``geo_mean``; the mean over rows, ignoring ``loss_agg_mode``), fused."
)
compute_policy_loss_gpg = _policy_drop_in("gpg", "token-mean", "GPG (verl ``gpg``), fused.")
compute_policy_loss_clip_cov = _policy_drop_in(
    "clip_cov", "token-mean", "Clip-Cov (verl ``clip_cov``): the tokens chosen in torch as verl chooses them, the loss fused."
)
compute_policy_loss_kl_cov = _policy_drop_in(
    "kl_cov", "token-mean", "KL-Cov (verl ``kl_cov``): the tokens chosen in torch as verl chooses them, the loss fused."
)
compute_policy_loss_dppo_tv = _policy_drop_in("dppo_tv", "token-mean", "DPPO-Binary-TV (verl ``dppo_tv``), fused.")
compute_policy_loss_dppo_kl = _policy_drop_in("dppo_kl", "token-mean", "DPPO-Binary-KL (verl ``dppo_kl``), fused.")
compute_policy_loss_dro = _policy_drop_in("dro", "token-mean", "DRO (verl ``dro``), fused; reads ``config.policy_loss.dro_beta``.")


def compute_policy_loss_reinforce(
    rollout_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "seq-mean-token-sum",
    config: Optional[Any] = None,
    rollout_is_weights: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """verl's REINFORCE loss (bypass mode's ``loss_type="reinforce"``), fused."""
    return _policy("reinforce", rollout_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config, rollout_is_weights)


def compute_policy_loss_bypass_mode(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "token-mean",
    config: Optional[Any] = None,
    rollout_is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """verl's ``bypass_mode`` (``old_log_prob`` is the rollout's log-prob):
    the rollout correction, IS weights ``pi_current / pi_rollout`` and the
    rejection mask, computed without gradient by verl's own
    ``rollout_corr_helper.compute_rollout_correction_and_rejection_mask``
    (imported here, when called: this drop-in runs inside verl), then the
    fused loss of ``config.policy_loss.rollout_correction.loss_type``:
    ``"reinforce"`` (:func:`compute_policy_loss_reinforce`, with the IS
    weights) or ``"ppo_clip"`` (:func:`compute_policy_loss_vanilla`, without
    them: the clipped ratio is the correction), both over the rejection mask.
    ``rollout_is_weights`` is ignored, as verl does. The metrics are the
    loss's, then verl's ``rollout_corr/*``.

    A missing ``config`` or ``rollout_correction`` and an unknown
    ``loss_type`` are ``ValueError`` (verl: ``assert`` for the config, then
    ``ValueError``); the last is raised before any work, verl raises it
    after computing the correction."""
    if config is None:
        raise ValueError("config: compute_policy_loss_bypass_mode needs the actor config, got None")
    policy_loss_cfg = _cfg(config, "policy_loss", None)
    rc = None if policy_loss_cfg is None else _cfg(policy_loss_cfg, "rollout_correction", None)
    if rc is None:
        raise ValueError(
            "config: rollout_correction config not found in policy_loss; with loss_mode='bypass_mode', "
            "set actor.policy_loss.rollout_correction"
        )
    loss_type = _cfg(rc, "loss_type", "ppo_clip")
    if loss_type not in ("reinforce", "ppo_clip"):
        raise ValueError(
            f"loss_type: invalid rollout_correction.loss_type {loss_type!r}; must be 'reinforce' or 'ppo_clip'"
        )
    try:
        from verl.trainer.ppo.rollout_corr_helper import compute_rollout_correction_and_rejection_mask
    except ImportError as e:
        raise ImportError(f"compute_policy_loss_bypass_mode needs verl's rollout correction (verl==0.9.1): {e}") from e
    with torch.no_grad():
        weights_proto, mask, correction_metrics = compute_rollout_correction_and_rejection_mask(
            old_log_prob=log_prob,  # the current policy: the IS ratio is pi_current / pi_rollout
            rollout_log_prob=old_log_prob,
            response_mask=response_mask,
            rollout_is=_cfg(rc, "rollout_is", None),
            rollout_is_threshold=_cfg(rc, "rollout_is_threshold", 2.0),
            rollout_is_batch_normalize=_cfg(rc, "rollout_is_batch_normalize", False),
            rollout_rs=_cfg(rc, "rollout_rs", None),
            rollout_rs_threshold=_cfg(rc, "rollout_rs_threshold", None),
        )
    args = (old_log_prob, log_prob, advantages, mask, loss_agg_mode, config)
    if loss_type == "reinforce":  # the IS weights, as constant factors
        weights = None if weights_proto is None else weights_proto.batch["rollout_is_weights"]
        loss, metrics = compute_policy_loss_reinforce(*args, weights)
    else:  # ppo_clip: no IS weights (the clipped ratio already is pi_current / pi_rollout)
        loss, metrics = compute_policy_loss_vanilla(*args, None)
    metrics.update(correction_metrics)
    return loss, metrics


#: verl's registered policy-loss name -> our drop-in (``luspo`` is ours).
POLICY_LOSSES: dict[str, Callable[..., tuple[torch.Tensor, dict[str, Any]]]] = {
    "vanilla": compute_policy_loss_vanilla,
    "gspo": compute_policy_loss_gspo,
    "luspo": compute_policy_loss_luspo,
    "cispo": compute_policy_loss_cispo,
    "sapo": compute_policy_loss_sapo,
    "geo_mean": compute_policy_loss_geo_mean,
    "gpg": compute_policy_loss_gpg,
    "clip_cov": compute_policy_loss_clip_cov,
    "kl_cov": compute_policy_loss_kl_cov,
    "dppo_tv": compute_policy_loss_dppo_tv,
    "dppo_kl": compute_policy_loss_dppo_kl,
    "dro": compute_policy_loss_dro,
    "bypass_mode": compute_policy_loss_bypass_mode,
}


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


def compute_value_loss(
    vpreds: torch.Tensor,
    returns: torch.Tensor,
    values: torch.Tensor,
    response_mask: torch.Tensor,
    cliprange_value: float,
    loss_agg_mode: str = "token-mean",
    dp_size: int = 1,
    batch_num_tokens: Optional[int] = None,
    global_batch_size: Optional[int] = None,
    loss_scale_factor: Optional[int] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """verl's ``compute_value_loss`` (see :func:`luspo_rs.value_loss`):
    ``(vf_loss, vf_clipfrac)``, the clip fraction a 0-d tensor in the dtype
    verl's ``masked_mean`` gives it (float32; float64 with a float64 mask)."""
    loss, clipfrac = _value_loss(
        vpreds,
        values,
        returns,
        response_mask,
        cliprange_value,
        loss_agg_mode,
        dp_size=dp_size,
        batch_num_tokens=batch_num_tokens,
        global_batch_size=global_batch_size,
        loss_scale_factor=loss_scale_factor,
    )
    mask_dtype = getattr(response_mask, "dtype", None)
    return loss, clipfrac.to(torch.float64 if mask_dtype == torch.float64 else torch.float32)


# --------------------------------------------------------------------------- advantages
#
# verl's nine outcome estimators take one of five argument lists; each
# drop-in is that list over :func:`luspo_rs.advantage` with the estimator's
# name, returning ``(advantages, returns)``, the same tensor twice, as verl.


def _grpo_args(estimator: str) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    def drop_in(
        token_level_rewards: torch.Tensor,
        response_mask: torch.Tensor,
        index: np.ndarray,
        epsilon: float = 1e-6,
        norm_adv_by_std_in_grpo: bool = True,
        config: Optional[Any] = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        out = advantage(
            token_level_rewards, response_mask, index, estimator,
            norm_adv_by_std_in_grpo=norm_adv_by_std_in_grpo, epsilon=epsilon,
        )  # fmt: skip
        return out, out

    return drop_in


def _plain_args(estimator: str) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    def drop_in(
        token_level_rewards: torch.Tensor,
        response_mask: torch.Tensor,
        index: np.ndarray,
        epsilon: float = 1e-6,
        config: Optional[Any] = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        out = advantage(token_level_rewards, response_mask, index, estimator)  # verl ignores epsilon here
        return out, out

    return drop_in


def _gpg_args(estimator: str) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    def drop_in(
        token_level_rewards: torch.Tensor,
        response_mask: torch.Tensor,
        index: np.ndarray,
        epsilon: float = 1e-6,
        f_norm: float = 1.0,
        alpha: float = 1.0,
        config=None,
        **kwargs,
    ):
        out = advantage(token_level_rewards, response_mask, index, estimator, f_norm=f_norm)
        return out, out

    return drop_in


def _passk_args(estimator: str) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    def drop_in(
        token_level_rewards: torch.Tensor,
        response_mask: torch.Tensor,
        index: np.ndarray,
        epsilon: float = 1e-6,
        norm_adv_by_std_in_grpo: bool = True,
        config: Optional[Any] = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if config is None:  # verl: `assert config is not None`
            raise ValueError(f"config: compute_{estimator}_outcome_advantage needs the algorithm config, got None")
        # as verl: the argument norm_adv_by_std_in_grpo is ignored, the config's is read
        norm = _cfg(config, "norm_adv_by_std_in_grpo", True)
        out = advantage(
            token_level_rewards, response_mask, index, estimator, norm_adv_by_std_in_grpo=norm, epsilon=epsilon
        )
        return out, out

    return drop_in


def _gdpo_args(estimator: str) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    def drop_in(
        token_level_rewards: torch.Tensor,
        response_mask: torch.Tensor,
        index: np.ndarray,
        epsilon: float = 1e-6,
        norm_adv_by_std_in_grpo: bool = True,
        config: Optional[Any] = None,
        non_tensor_batch: Optional[dict] = None,
        batch: Optional[dict] = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        keys = {}
        if config is not None and non_tensor_batch is not None and batch is not None:
            keys = _gdpo_key_scores(token_level_rewards, response_mask, config, non_tensor_batch, batch)
        out = advantage(
            token_level_rewards, response_mask, index, estimator,
            norm_adv_by_std_in_grpo=norm_adv_by_std_in_grpo, epsilon=epsilon, **keys,
        )  # fmt: skip
        return out, out

    return drop_in


def _gdpo_key_scores(rewards: torch.Tensor, mask: torch.Tensor, config: Any, non_tensor_batch: Any, batch: Any) -> dict:
    """verl's per-key GDPO scores: ``non_tensor_batch[key]`` as float32, one
    column per ``config.gdpo_reward_keys`` entry, and the float32
    ``config.gdpo_reward_weights`` (the first ``K``; default 1). verl puts
    each score at the response's last token, ``valid_response_length`` from
    ``batch["attention_mask"]``; the row sum GRPO takes is the score itself,
    so only verl's range check of that position is kept."""
    reward_keys = _cfg(config, "gdpo_reward_keys", None)
    if not reward_keys:  # verl: assert
        raise ValueError(
            "config: gdpo needs 'algorithm.gdpo_reward_keys', the reward component keys of compute_score's "
            "result (e.g. ['format_reward', 'accuracy_reward'])"
        )
    B, T = (mask.shape[0], mask.shape[1]) if mask.dim() == 2 else (len(mask), 0)
    prompt_length = batch["prompts"].size(1)
    attention = batch["attention_mask"]
    if attention.shape[0] != B:
        raise ValueError(f"batch: attention_mask has {attention.shape[0]} rows, response_mask {B}")
    # verl indexes (B, T) at attention_mask[:, prompt_length:].sum(1) - 1, which
    # is in range whenever the response part has at most T columns
    if attention.shape[1] - prompt_length > T:
        last = attention[:, prompt_length:].sum(dim=1) - 1
        bad = torch.nonzero((last >= T) | (last < -T))
        if bad.numel():
            i = int(bad[0, 0])
            raise IndexError(
                f"batch: attention_mask row {i} has {int(last[i]) + 1} response tokens, "
                f"more than the {T} of response_mask"
            )
    columns = []
    for key in reward_keys:
        if key not in non_tensor_batch:  # verl: assert
            available = list(non_tensor_batch.keys())
            raise KeyError(f"non_tensor_batch: GDPO reward key {key!r} not found; available: {available}")
        column = torch.from_numpy(np.asarray(non_tensor_batch[key], dtype=np.float32))
        try:
            columns.append(torch.broadcast_to(column, (B,)))
        except RuntimeError as e:
            raise ValueError(
                f"non_tensor_batch: {key!r} has shape {tuple(column.shape)}, expected one score per row ({B})"
            ) from e
    weights = _cfg(config, "gdpo_reward_weights", None)
    if weights is not None:
        weights = list(weights)
        if len(weights) < len(columns):  # verl: IndexError; more weights than keys: the rest unused
            raise ValueError(f"config: gdpo_reward_weights has {len(weights)} weights for {len(columns)} reward keys")
        weights = weights[: len(columns)]
    scores = torch.stack(columns, dim=1).to(rewards.device)
    return dict(reward_scores=scores, reward_weights=weights)


def _drop_in(estimator: str, args: Callable[[str], Callable[..., Any]], doc: str) -> Callable[..., Any]:
    fn = args(estimator)
    fn.__name__ = fn.__qualname__ = f"compute_{estimator}_outcome_advantage"
    fn.__doc__ = doc
    return fn


#: verl's estimator name -> (verl's argument list, docstring) of ``compute_<name>_outcome_advantage``.
_ESTIMATOR_TABLE = {
    "grpo": (_grpo_args, "GRPO: ``(s_i - mean_g) / (std_g + epsilon)`` with ``s_i`` the row sum of "
             "``token_level_rewards`` and the unbiased std of its ``index`` group (singletons: mean 0, "
             "std 1); without ``norm_adv_by_std_in_grpo`` (Dr.GRPO) ``s_i - mean_g``. Broadcast over "
             "tokens times ``response_mask``."),
    "grpo_vectorized": (_grpo_args, "verl's ``grpo_vectorized``: the same numbers as "
                        ":func:`compute_grpo_outcome_advantage`."),
    "rloo": (_plain_args, "RLOO: ``n/(n-1) (s_i - mean_g)`` for groups of ``n > 1``; singletons keep ``s_i``."),
    "rloo_vectorized": (_plain_args, "verl's ``rloo_vectorized``: RLOO, but singletons get 0."),
    "reinforce_plus_plus_baseline": (_plain_args, "REINFORCE++ with group baseline: ``(s_i - mean_g) m``, "
                                     "then whitened over all valid tokens of the batch (verl's "
                                     "``masked_whiten``) and masked."),
    "opo": (_plain_args, "OPO: ``s_i`` minus the length-weighted group mean ``sum L s / sum L`` "
            "(singletons keep ``s_i``), ``L_i = sum_t m_it``."),
    "gpg": (_gpg_args, "GPG: ``alpha (s_i - mean_g) / f_norm`` with ``alpha = B / max(#{s_i != 0}, 1)`` "
            "(verl recomputes ``alpha``; the argument is ignored, as there)."),
    "grpo_passk": (_passk_args, "Pass@k (verl ``grpo_passk``): only the best row of each group gets "
                   "``(s_(1) - s_(2)) / (std_g + epsilon)``, the gap to the second best score (without "
                   "std when ``config.norm_adv_by_std_in_grpo`` is false; the argument is ignored, as in "
                   "verl); the others 0. Tied best: the first row. Needs ``config`` and groups of 2 or more."),
    "gdpo": (_gdpo_args, "GDPO: per reward key ``k`` (``config.gdpo_reward_keys``, scores from "
             "``non_tensor_batch[k]`` as float32, when ``config``, ``non_tensor_batch`` and ``batch`` are "
             "all given; else one key, the rewards' row sums) the GRPO advantage ``a_k``, summed with "
             "``config.gdpo_reward_weights`` (float32, default 1), times ``response_mask``, then whitened over "
             "the batch's valid tokens (verl's ``masked_whiten``) and masked."),
}  # fmt: skip

#: verl's estimator name -> our ``compute_<name>_outcome_advantage``, in the
#: order of :data:`luspo_rs.advantage.Estimator`.
ESTIMATORS: dict[str, Callable[..., tuple[torch.Tensor, torch.Tensor]]] = {
    name: _drop_in(name, args, doc) for name, (args, doc) in _ESTIMATOR_TABLE.items()
}

compute_grpo_outcome_advantage = ESTIMATORS["grpo"]
compute_grpo_vectorized_outcome_advantage = ESTIMATORS["grpo_vectorized"]
compute_rloo_outcome_advantage = ESTIMATORS["rloo"]
compute_rloo_vectorized_outcome_advantage = ESTIMATORS["rloo_vectorized"]
compute_reinforce_plus_plus_baseline_outcome_advantage = ESTIMATORS["reinforce_plus_plus_baseline"]
compute_opo_outcome_advantage = ESTIMATORS["opo"]
compute_gpg_outcome_advantage = ESTIMATORS["gpg"]
compute_grpo_passk_outcome_advantage = ESTIMATORS["grpo_passk"]
compute_gdpo_outcome_advantage = ESTIMATORS["gdpo"]


# --------------------------------------------------------------------------- scans


def compute_gae_advantage_return(
    token_level_rewards: torch.Tensor,
    values: torch.Tensor,
    response_mask: torch.Tensor,
    gamma: torch.Tensor,
    lam: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE, verl's default estimator: ``(advantages, returns)``. Each row is
    scanned from its last token: ``delta_t = r_t + gamma nv - v_t``,
    ``g = delta_t + gamma lam g`` at valid tokens (observation tokens carry
    ``g`` and the next value ``nv`` through); returns ``g + values``,
    advantages ``g`` whitened over the batch's valid tokens. ``gamma`` and
    ``lam`` are read as Python floats."""
    return advantage(token_level_rewards, response_mask, None, "gae", values=values, gamma=gamma, lam=lam,
                     with_returns=True)  # fmt: skip


def compute_reinforce_plus_plus_outcome_advantage(
    token_level_rewards: torch.Tensor, response_mask: torch.Tensor, config: Optional[Any] = None, **kwargs
) -> tuple[torch.Tensor, torch.Tensor]:
    """REINFORCE++: returns ``ret_t = (r_t + gamma run) m_t`` with the running
    return carried past observation tokens (``config.gamma``); advantages the
    returns whitened over the batch's valid tokens, times the mask."""
    if config is None:
        raise ValueError("config: compute_reinforce_plus_plus_outcome_advantage needs the algorithm config (gamma)")
    return advantage(token_level_rewards, response_mask, None, "reinforce_plus_plus", gamma=_cfg(config, "gamma"),
                     with_returns=True)  # fmt: skip


def compute_remax_outcome_advantage(
    token_level_rewards: torch.Tensor,
    reward_baselines: torch.Tensor,
    response_mask: torch.Tensor,
    config: Optional[Any] = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """ReMax: returns the reverse cumulative sum of ``r m`` along each row,
    advantages ``returns - reward_baselines m``."""
    return advantage(token_level_rewards, response_mask, None, "remax", reward_baselines=reward_baselines,
                     with_returns=True)  # fmt: skip


ESTIMATORS["gae"] = compute_gae_advantage_return
ESTIMATORS["reinforce_plus_plus"] = compute_reinforce_plus_plus_outcome_advantage
ESTIMATORS["remax"] = compute_remax_outcome_advantage


# --------------------------------------------------------------------------- token baselines


def compute_optimal_token_baseline_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index: np.ndarray,
    old_log_probs: torch.Tensor,
    sum_pi_squared: torch.Tensor,
    rollout_is_weights: torch.Tensor = None,
    handle_zero_tail: bool = True,
    epsilon: float = 1e-8,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Optimal token baseline (verl ``optimal_token_baseline``): ``(advantages,
    returns)``. Returns ``G`` are the reverse cumulative sum of ``r m``;
    ``W`` the cumulative sum of ``(1 - 2 exp(old_log_probs) + sum_pi_squared) m``
    (times ``rollout_is_weights**2``); per ``index`` group and column
    ``B_t = sum(G W m) / (sum(W m) + epsilon)`` (0 for singletons, and, with
    ``handle_zero_tail``, beyond the second-longest length for the unique
    longest row); advantages ``(G - B) m``."""
    return advantage(token_level_rewards, response_mask, index, "optimal_token_baseline",
                     old_log_probs=old_log_probs, sum_pi_squared=sum_pi_squared,
                     rollout_is_weights=rollout_is_weights, handle_zero_tail=handle_zero_tail,
                     epsilon=epsilon, with_returns=True)  # fmt: skip


def compute_multi_turn_optimal_token_baseline_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index: np.ndarray,
    old_log_probs: torch.Tensor,
    sum_pi_squared: torch.Tensor,
    rollout_is_weights: torch.Tensor = None,
    handle_zero_tail: bool = True,
    epsilon: float = 1e-8,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Multi-turn optimal token baseline (verl ``tir_optimal_token_baseline``):
    :func:`compute_optimal_token_baseline_advantage` over valid-token ranks
    (the k-th token with ``m != 0`` of each row, so masks with holes line up
    by token, not by column); rows without a valid token are left out of
    their group and get zero advantages."""
    return advantage(token_level_rewards, response_mask, index, "tir_optimal_token_baseline",
                     old_log_probs=old_log_probs, sum_pi_squared=sum_pi_squared,
                     rollout_is_weights=rollout_is_weights, handle_zero_tail=handle_zero_tail,
                     epsilon=epsilon, with_returns=True)  # fmt: skip


ESTIMATORS["optimal_token_baseline"] = compute_optimal_token_baseline_advantage
ESTIMATORS["tir_optimal_token_baseline"] = compute_multi_turn_optimal_token_baseline_advantage
