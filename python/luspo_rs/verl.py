"""verl plug-in: ``import luspo_rs.verl`` registers luspo-rs into verl.

verl imports this module itself when started with
``VERL_USE_EXTERNAL_MODULES=luspo_rs.verl`` (in every process that imports
``verl``, Ray workers included when they inherit the variable). Importing it:

* always registers ``luspo`` in verl's policy-loss registry, so
  ``actor_rollout_ref.actor.policy_loss.loss_mode=luspo`` selects
  :func:`luspo_rs.core_algos.compute_policy_loss_luspo`;
* with ``LUSPO_RS_TAKE_OVER=1`` in the environment (or by calling
  :func:`take_over`), also replaces verl's own implementations with the Rust
  ones: the ``vanilla`` and ``gspo`` policy losses, the advantage estimators
  ``grpo``, ``grpo_vectorized``, ``rloo``, ``rloo_vectorized``,
  ``reinforce_plus_plus_baseline``, ``opo``, ``gpg`` (registry entries and the
  ``core_algos.compute_*`` module attributes verl's trainer calls directly), and
  ``kl_penalty`` (in ``core_algos`` and in ``verl.workers.utils.losses``).
  :func:`restore` puts verl's originals back.

Importing it again is harmless: every step is an idempotent assignment.
"""

from __future__ import annotations

import importlib
import os
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

_TAKEN_OVER_LOSSES = {
    "vanilla": ("compute_policy_loss_vanilla", _ours.compute_policy_loss_vanilla),
    "gspo": ("compute_policy_loss_gspo", _ours.compute_policy_loss_gspo),
}

#: Modules (besides ``core_algos``) that bound ``kl_penalty`` by name at import.
_KL_IMPORTERS = ("verl.workers.utils.losses",)

# verl's originals, captured once (a re-import must not capture our own functions).
_ORIGINALS: dict[tuple[str, str], Any] = globals().get("_ORIGINALS", {})


def _set(where: str, key: str, container: Any, value: Any, *, item: bool) -> None:
    current = container.get(key) if item else getattr(container, key, None)
    if (where, key) not in _ORIGINALS and not getattr(current, "__module__", "").startswith("luspo_rs"):
        _ORIGINALS[(where, key)] = current
    if item:
        container[key] = value
    else:
        setattr(container, key, value)


def register() -> None:
    """Registers ``luspo`` in verl's policy-loss registry (idempotent)."""
    _verl.POLICY_LOSS_REGISTRY["luspo"] = _ours.compute_policy_loss_luspo


def take_over() -> None:
    """Replaces verl's ``vanilla``/``gspo`` losses, the group advantage
    estimators and ``kl_penalty`` with luspo-rs's (idempotent)."""
    register()
    # Import the modules that bind kl_penalty by name first, so they capture
    # verl's function (the original restore() puts back), not ours.
    importers = []
    for mod_name in _KL_IMPORTERS:
        try:
            importers.append((mod_name, importlib.import_module(mod_name)))
        except ImportError:  # pragma: no cover - optional part of verl
            continue
    for name, (attr, fn) in _TAKEN_OVER_LOSSES.items():
        _set("policy_loss", name, _verl.POLICY_LOSS_REGISTRY, fn, item=True)
        _set("core_algos", attr, _verl, fn, item=False)
    for name, (attr, fn) in TAKEN_OVER_ESTIMATORS.items():
        _set("adv_est", name, _verl.ADV_ESTIMATOR_REGISTRY, fn, item=True)
        _set("core_algos", attr, _verl, fn, item=False)
    _set("core_algos", "kl_penalty", _verl, _ours.kl_penalty, item=False)
    for mod_name, mod in importers:
        _set(mod_name, "kl_penalty", mod, _ours.kl_penalty, item=False)


def restore() -> None:
    """Undoes :func:`take_over` (``luspo`` stays registered)."""
    for (where, key), original in _ORIGINALS.items():
        if where == "policy_loss":
            _verl.POLICY_LOSS_REGISTRY[key] = original
        elif where == "adv_est":
            _verl.ADV_ESTIMATOR_REGISTRY[key] = original
        elif where == "core_algos":
            setattr(_verl, key, original)
        else:
            setattr(importlib.import_module(where), key, original)


def taken_over() -> bool:
    """Whether verl's ``vanilla`` policy loss currently is luspo-rs's."""
    return _verl.POLICY_LOSS_REGISTRY.get("vanilla") is _ours.compute_policy_loss_vanilla


register()
if os.environ.get(ENV_TAKE_OVER, "").strip().lower() in ("1", "true", "yes", "on"):
    take_over()
