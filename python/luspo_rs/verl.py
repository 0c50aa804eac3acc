"""verl plug-in: ``import luspo_rs.verl`` registers luspo-rs into verl.

verl imports this module itself when started with
``VERL_USE_EXTERNAL_MODULES=luspo_rs.verl`` (in every process that imports
``verl``, Ray workers included when they inherit the variable). Importing it:

* always registers ``luspo`` in verl's policy-loss registry, so
  ``actor_rollout_ref.actor.policy_loss.loss_mode=luspo`` selects
  :func:`luspo_rs.core_algos.compute_policy_loss_luspo`;
* with ``LUSPO_RS_TAKE_OVER=1`` in the environment (or by calling
  :func:`take_over`), also replaces verl's own implementations with the Rust
  ones: every policy loss verl registers (:data:`luspo_rs.core_algos.POLICY_LOSSES`,
  and ``compute_policy_loss_reinforce``, which bypass mode calls), the advantage estimators
  ``grpo``, ``grpo_vectorized``, ``rloo``, ``rloo_vectorized``,
  ``reinforce_plus_plus_baseline``, ``opo``, ``gpg``, ``grpo_passk``, ``gdpo``
  and the rest of :data:`luspo_rs.core_algos.ESTIMATORS` (registry entries and the
  ``core_algos.compute_*`` module attributes verl's trainer calls directly),
  ``kl_penalty`` and the critic's ``compute_value_loss`` (which
  ``verl.workers.utils.losses.value_loss`` calls): in every loaded verl module that holds verl's function
  object (found by identity), so modules that imported it by name are taken
  over too. :func:`restore` puts verl's originals back.

Importing it again is harmless: every step is an idempotent assignment.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Callable

try:
    from verl.trainer.ppo import core_algos as _verl
except ImportError as _e:  # pragma: no cover - exercised in a subprocess test
    raise ImportError(
        "luspo_rs.verl is the verl plug-in and needs verl installed: "
        "`pip install verl==0.9.1` (luspo-rs is tested against verl 0.9.1). "
        "The drop-in functions themselves work without verl: use luspo_rs.core_algos. "
        f"(import of verl.trainer.ppo.core_algos failed: {_e})"
    ) from _e

from . import core_algos as _ours

__all__ = ["ENV_TAKE_OVER", "TAKEN_OVER_ESTIMATORS", "register", "restore", "take_over", "taken_over"]

#: Environment variable that makes ``import luspo_rs.verl`` call :func:`take_over`.
ENV_TAKE_OVER = "LUSPO_RS_TAKE_OVER"

#: Registry name -> (verl ``core_algos`` attribute, our drop-in).
TAKEN_OVER_ESTIMATORS: dict[str, tuple[str, Callable[..., Any]]] = {
    name: (fn.__name__, fn) for name, fn in _ours.ESTIMATORS.items()
}

#: Every policy loss verl registers: registry name -> (verl ``core_algos``
#: attribute, our drop-in). ``luspo`` is ours, registered by :func:`register`.
_TAKEN_OVER_LOSSES = {name: (fn.__name__, fn) for name, fn in _ours.POLICY_LOSSES.items() if name != "luspo"}

_REGISTRIES = {"policy_loss": "POLICY_LOSS_REGISTRY", "adv_est": "ADV_ESTIMATOR_REGISTRY"}

_MISSING = "<absent>"  # a registry entry that did not exist before take_over()


def _replacements() -> dict[str, Callable[..., Any]]:
    """verl ``core_algos`` attribute -> our drop-in, for every function taken over."""
    out = {attr: fn for attr, fn in _TAKEN_OVER_LOSSES.values()}
    out.update({attr: fn for attr, fn in TAKEN_OVER_ESTIMATORS.values()})
    out["kl_penalty"] = _ours.kl_penalty
    out["compute_policy_loss_reinforce"] = _ours.compute_policy_loss_reinforce  # (bypass mode calls it by name)
    out["compute_value_loss"] = _ours.compute_value_loss
    return out


def _originals() -> dict[str, dict]:
    """verl's originals: ``"fns"`` (attribute -> verl's function object) and
    ``"registry"`` ((registry, name) -> verl's entry or ``_MISSING``). Kept
    on verl's ``core_algos`` module itself, so deleting and re-importing
    this module while taken over cannot lose them."""
    state = getattr(_verl, "_luspo_rs_originals", None)
    if state is None:
        state = {"fns": {}, "registry": {}}
        _verl._luspo_rs_originals = state
    return state


def _is_ours(fn: Any) -> bool:
    return getattr(fn, "__module__", "").startswith("luspo_rs")


def _swap_in_verl_modules(mapping: dict[int, tuple[Any, Any]]) -> None:
    """In every loaded ``verl`` module, replaces each attribute that *is*
    (by identity) a key object of ``mapping`` with its value."""
    for name, mod in list(sys.modules.items()):
        if mod is None or not (name == "verl" or name.startswith("verl.")):
            continue
        for attr, value in list(vars(mod).items()):
            hit = mapping.get(id(value))
            if hit is not None and hit[0] is value:
                setattr(mod, attr, hit[1])


def register() -> None:
    """Registers ``luspo`` in verl's policy-loss registry (idempotent)."""
    _verl.POLICY_LOSS_REGISTRY["luspo"] = _ours.compute_policy_loss_luspo


def take_over() -> None:
    """Replaces verl's ``vanilla``/``gspo`` losses, the group advantage
    estimators, ``kl_penalty`` and ``compute_value_loss`` with luspo-rs's (idempotent): the registry
    entries, and every loaded verl module's name bound to verl's function
    object (``core_algos``, ``verl.workers.utils.losses``,
    ``verl.trainer.distillation.losses``, ...), found by identity. A module
    imported later binds ours by itself."""
    register()
    state = _originals()
    swaps: dict[int, tuple[Any, Any]] = {}
    for attr, ours in _replacements().items():
        current = getattr(_verl, attr, None)
        if attr not in state["fns"] and current is not None and not _is_ours(current):
            state["fns"][attr] = current
        if attr in state["fns"]:
            swaps[id(state["fns"][attr])] = (state["fns"][attr], ours)
    for where, entries in (("policy_loss", _TAKEN_OVER_LOSSES), ("adv_est", TAKEN_OVER_ESTIMATORS)):
        registry = getattr(_verl, _REGISTRIES[where])
        for name, (_, ours) in entries.items():
            current = registry.get(name, _MISSING)
            if (where, name) not in state["registry"] and not _is_ours(current):
                state["registry"][(where, name)] = current
            registry[name] = ours
    _swap_in_verl_modules(swaps)


def restore() -> None:
    """Undoes :func:`take_over` (``luspo`` stays registered): every loaded
    verl module's name bound to one of our drop-ins gets verl's function
    back, whenever that module was imported, and each registry entry is
    verl's again, or gone if verl had none."""
    state = _originals()
    back = {id(ours): (ours, state["fns"][attr]) for attr, ours in _replacements().items() if attr in state["fns"]}
    _swap_in_verl_modules(back)
    for (where, name), original in state["registry"].items():
        registry = getattr(_verl, _REGISTRIES[where])
        if isinstance(original, str) and original == _MISSING:  # (equal, not identical, after a re-import)
            registry.pop(name, None)
        else:
            registry[name] = original


def taken_over() -> bool:
    """Whether verl's ``vanilla`` policy loss currently is luspo-rs's."""
    return _verl.POLICY_LOSS_REGISTRY.get("vanilla") is _ours.compute_policy_loss_vanilla


register()
if os.environ.get(ENV_TAKE_OVER, "").strip().lower() in ("1", "true", "yes", "on"):
    take_over()
