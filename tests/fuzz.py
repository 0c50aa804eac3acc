"""Differential fuzzing of luspo-rs against verl 0.9.1's own ``core_algos``.

Every case is drawn from ``numpy.random.default_rng([seed, index])`` alone, so
``(seed, index)`` reproduces it exactly, in any process and whatever ran
before it. A case is one call of one operation, on both sides:

* ``policy``     -- ``luspo_rs.policy_loss`` (or the verl-signature adapters in
  ``luspo_rs.core_algos``) against ``verl.get_policy_loss_fn("vanilla"/"gspo")``
  (LUSPO: verl's GSPO aggregated ``seq-mean-token-sum``, as in the tests):
  loss, gradient through ``backward()`` and metrics;
* ``policy_rule`` -- the token-rule losses of issue 17 (``cispo``, ``sapo``,
  ``gpg``, ``dro``, ``dppo_tv``, ``dppo_kl``, ``reinforce``) through
  ``luspo_rs.policy_loss`` against ``verl.get_policy_loss_fn(mode)`` (REINFORCE:
  ``compute_policy_loss_reinforce``), with their knobs (``tau_pos`` / ``tau_neg``,
  ``dro_beta``, DPPO's divergence bounds and truncation) drawn: loss, gradient
  and metrics (the exact key set verl returns);
* ``policy_geo`` -- GMPO: ``luspo_rs.policy_loss(mode="geo_mean")`` (or the
  adapter) against verl's ``compute_policy_loss_geo_mean`` (per-row
  advantages / weights expanded to the ``(B, T)`` it takes), every
  ``loss_agg_mode`` and normaliser (both ignore them), log-ratios exactly on
  and a few ulps around the clip bounds: loss, gradient, metrics;
* ``policy_cov`` -- Clip-Cov and KL-Cov, ``torch.manual_seed(s)`` before
  verl's call and before ours: loss, gradient, metrics and torch's default
  generator's state after the call (``rng_state``: compared bit for bit,
  never excused), with more candidates than ``clip_num`` now and then (the
  random draw decides) and KL-Cov's covariances tied at the k-th largest;
* ``policy_bypass`` -- ``core_algos.compute_policy_loss_bypass_mode`` against
  verl's, both loss types (``reinforce``, ``ppo_clip``), IS and rejection
  settings (``BYPASS_IS`` / ``BYPASS_RS``): loss, gradient, metrics
  (``rollout_corr/*`` bit for bit: verl's helper computes them on both sides);
* ``agg_loss``   -- value and gradient against verl's ``agg_loss``;
* ``value_loss`` -- ``luspo_rs.value_loss`` (or the adapter
  ``luspo_rs.core_algos.compute_value_loss``) against verl's
  ``compute_value_loss``: loss, gradient w.r.t. ``vpreds`` and ``vf_clipfrac``,
  with predictions drawn exactly on the clip bounds ``values -+ c`` now and then;
* ``kl_penalty`` -- every estimator name verl accepts, value and gradients in
  both inputs against verl's ``kl_penalty``;
* ``advantage``  -- the group estimators against verl's
  ``compute_*_outcome_advantage`` (``grpo_passk`` with verl's required
  ``config``; ``gdpo`` half of the time with per-key scores: ``config.gdpo_reward_keys``,
  ``non_tensor_batch`` and ``batch`` as verl's trainer passes them), and the scans (``gae``,
  ``reinforce_plus_plus``, ``remax``: ``luspo_rs.advantage(...,
  with_returns=True)`` or the verl-signature adapters) against verl's
  ``compute_gae_advantage_return``, ``compute_reinforce_plus_plus_outcome_advantage``
  and ``compute_remax_outcome_advantage``: advantages and returns; and the
  optimal token baselines (``optimal_token_baseline``,
  ``tir_optimal_token_baseline``) against verl's
  ``compute_optimal_token_baseline_advantage`` and
  ``compute_multi_turn_optimal_token_baseline_advantage``: grouped rows with
  multi-turn masks, IS weights, the zero tail on and off.

Tolerances are the ones of the parity tests, imported from them where they are
named constants (``conftest.TOLERANCES``, ``test_kl_penalty.TOL``,
``test_advantage.TOL`` / ``float64_tol``), copied with a reference to
the test where they are inline literals (half-precision policy rule). The
token baselines' absolute tolerance is scaled by the largest return, as their
baseline is a weighted mean of returns (test_token_baseline's long-row rule).

Triage of each case:

* ``ok``            -- every output within tolerance;
* ``both_raise``    -- verl and luspo-rs both refuse the input (``dp_size > 1``
  without the global count the aggregation divides by; ``grpo_passk`` with a
  group of one row);
* ``known_nan``     -- the documented difference of the whitening scans (GAE,
  REINFORCE++): the batch has fewer than 2 valid tokens, verl's
  ``masked_var`` raises ``ValueError`` and luspo-rs returns NaN advantages;
  there its advantages must be all NaN and its returns verl's (verl's own
  scan, run with the whitening that raises left out);
* ``known_tie``     -- the README's documented exception: only the gradient
  (and, by the same rounding, ``pg_clipfrac`` / ``pg_clipfrac_lower``)
  differs, only at valid tokens where a value verl compares with a bound lies
  within a few ulps of it: the ratio within 2 ulps of ``1 - clip_ratio_low``
  or ``1 + clip_ratio_high`` (2 eps for bounds below 2, as the README's test;
  8 for GSPO / LUSPO, whose sequence mean verl sums in float32 and luspo-rs
  in float64), within 8 of vanilla's dual-clip bound ``clip_ratio_c`` (where
  A < 0), or GSPO's sequence log-ratio within 8 ulps of its clamp at 10 (the
  whole row); there ours is verl's x2, x1/2 or 0, or non-zero where verl's is
  0, and the clip fractions differ by whole such tokens. The token rules
  (``policy_rule``) have the same kind of rounding-decided comparisons:
  CISPO's ``pg_clipfrac`` (its ratio within 2 ulps of a clip bound; its
  gradient has no jump there), and DPPO's keep/drop decision (``p - p_old`` or
  the binary KL within its rounding error of a divergence bound, ``p`` within
  2 ulps of ``p_old``; see ``dppo_near``) and truncation (the ratio within 2
  ulps of ``clip_ratio_c``): the gradient of such a token is 0 on one side,
  the clip fractions differ by whole such tokens, the loss by at most those
  tokens' share of it. Clip-Cov's gradient at its PPO clip test (the ratio
  within 2 ulps of a clip bound, as vanilla's; never its choice of tokens,
  its ``pg_clipfrac`` -- the chosen fraction -- or the generator's state),
  and bypass mode's ``ppo_clip`` as vanilla's (its clip fractions over the
  mask less the rejected tokens, ``bypass_mask``);
* ``undocumented_tie`` -- the same pattern wider than documented: vanilla's
  token ratio 3 to 8 ulps from the clip bounds; counted apart, fatal with
  ``--strict``. (GMPO with a float64 mask once decided ``d != clamp(d, -low,
  high)`` in float64 where verl does in the inputs' float32, at the tokens of
  ``geo_f64_mask_flips``: found by this fuzz, fixed in the Rust rule, no
  longer excused);
* ``rounding``      -- the difference is floating-point rounding of an
  ill-conditioned computation (terms that nearly cancel) or of a value near
  float32's resolution, which the tolerances cannot absorb: either verl run
  without its float32 rounding (its formula on float64 upcasts of the inputs;
  for the policy losses also its own float32 token math with float64 sums; for
  ``grpo_vectorized``, whose group statistics are float32 whatever the input,
  verl's loop ``grpo`` in float64; for GAE / REINFORCE++ also verl's own scan
  whitened in float64) is at least as close to ours as to verl's
  result and within the tolerance of ours (or not of verl's) (for the token
  baselines also verl with a correctly rounded float32 ``exp``, as luspo-rs
  takes it: torch's misses it by an ulp now and then, and for probabilities
  near 1 ``1 - 2 pi + sum_pi_squared`` cancels down to that ulp), or, for a sum
  (a loss, ``ppo_kl``), ours and verl's differ by less than float32's
  forward-error bound ``ROUNDING_ULPS * u * sum|terms|``, or, for DRO's,
  SAPO's and KL-Cov's gradients, ours is within the forward-error bound of
  their ill-conditioned terms (``rule_gradient_rounding``,
  ``kl_cov_gradient_rounding``), or, for GAE's and REINFORCE++'s whitened
  advantages, within the forward-error bound of verl's whitening
  (``whitening_rounding``), or, for bfloat16 Clip-Cov / KL-Cov (verl
  computing in bfloat16, the float64 reruns choosing other tokens), a loss
  within verl's own bfloat16 forward-error bound (``cov_magnitudes``);
  fatal with ``--strict``;
* ``mismatch``      -- anything else: printed with its replay command.

Inputs that fall under the README's other *documented* deliberate differences
are not drawn (a ``torch.Tensor`` index, ``reinforce_plus_plus_baseline`` or
``gdpo`` with at most one valid token or a response without one,
``grpo_passk`` ties under ``epsilon=0``, groups of equal scores that float32 cannot average
exactly, float64 scores far from zero mean in ``grpo_vectorized``, empty
batches or responses; bfloat16 Clip-Cov ratios within 3% of a clip bound,
which verl's bfloat16 arithmetic and our float32 one clip differently, as
test_cov_losses moves them; float16 for Clip-Cov / KL-Cov and 16-bit inputs
for bypass mode, which their parity tests leave out too; a ``kl_cov_ratio``
above 1, which ours refuses and verl only refuses with a valid token); a bool mask for GAE / REINFORCE++ (which verl refuses:
its ``1 - mask``) is compared with verl given the same mask as int64; NaN inputs
are not drawn either (the README's NaN rules make masked-position gradients
differ from verl's by design).

Usage::

    .venv/bin/python tests/fuzz.py --minutes 5 --seed 0     # time-bounded run
    .venv/bin/python tests/fuzz.py --cases 3000 --seed 1    # count-bounded run
    .venv/bin/python tests/fuzz.py --replay 0:1234 -v       # one case, in detail
    .venv/bin/python tests/fuzz.py --replay 0:1234 --save case.pt
    .venv/bin/python tests/fuzz.py --minutes 5 --strict      # undocumented_tie, rounding fail too

The exit status is 1 if any real mismatch was found (class ``mismatch``; with
``--strict`` also ``undocumented_tie`` and ``rounding``), else 0.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import math
import os
import sys
import time
import traceback
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np
import torch

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:  # run as a script: the tests' helpers live next to this file
    sys.path.insert(0, _HERE)

from conftest import AGG_MODES, MODES, TOLERANCES, verl_config  # noqa: E402
from test_advantage import ESTIMATORS, float64_tol  # noqa: E402
from test_cov_losses import LEN_KEYS as COV_LEN_KEYS  # noqa: E402
from test_cov_losses import METRIC_TOL as COV_METRIC_TOL  # noqa: E402
from test_cov_losses import TOL as COV_TOL  # noqa: E402
from test_advantage import TOL as ADV_TOL  # noqa: E402
from test_advantage import WHITENED as WHITENED_GROUP  # noqa: E402
from test_kl_penalty import MODES as KL_MODES  # noqa: E402
from test_kl_penalty import TOL as KL_TOL  # noqa: E402
from verl.trainer.config import AlgoConfig  # noqa: E402
from verl.trainer.ppo import core_algos as verl_ca  # noqa: E402

import luspo_rs  # noqa: E402
from luspo_rs import core_algos as ours_ca  # noqa: E402

# --------------------------------------------------------------------------- tolerances

#: Half-precision policy loss / agg_loss rule of test_policy_loss.test_half_precision_inputs:
#: verl on the same values upcast to fp32, compared at the rounding of the output.
HALF_LOSS_TOL = dict(rtol=8e-3, atol=1e-5)
HALF_GRAD_TOL = dict(rtol=8e-3, atol=1e-7)  # against verl's fp32 gradient rounded to the half type
#: Metrics, as test_policy_loss.compare: pytest.approx(v, abs=1e-6).
METRIC_ATOL = 1e-6
#: kl_penalty on bfloat16 inputs, as test_kl_penalty.test_bfloat16_inputs (verl computing in bf16).
KL_BF16_TOL = dict(atol=2e-2, rtol=2e-2)
#: The documented tie: a ratio within this many ulps of a clip bound (counted in units of
#: max(eps, ulp(bound)) of the compute dtype: for bounds below 2 that is the 2 eps of
#: test_gradient_differs_from_verl_only_at_clip_bound_ties).
TIE_ULPS = 2
#: The documented window for values whose rounding differs by more than exp's ulp or
#: two: GSPO's sequence mean (summed in float64 by luspo-rs, in float32 by verl) at the
#: clip bounds and at its clamp at 10, and the dual-clip bound clip_ratio_c. Vanilla's
#: token ratio this far from the clip bounds (beyond TIE_ULPS) is undocumented_tie.
WIDE_TIE_ULPS = 8

#: Forward-error bound of a float32 evaluation of a sum, in units of the unit roundoff u
#: times the sum of the absolute terms: luspo-rs's per-token math (exp <= 2 ulp, a few
#: products), its eight float32 lanes of eight terms within each block of 64 tokens,
#: verl's float32 pairwise sum (log2 of up to 40 000 terms) and its own token math.
ROUNDING_ULPS = 32

#: k > 0 with exp(k) - k - 1 = 10: where low_var_kl's clamp at 10 starts.
KL_K10 = 2.610868638149876

DTYPES = {"fp32": torch.float32, "fp64": torch.float64, "bf16": torch.bfloat16, "fp16": torch.float16}
HALF = (torch.bfloat16, torch.float16)
MASK_DTYPES = {
    "bool": torch.bool, "int64": torch.int64, "int32": torch.int32, "uint8": torch.uint8,
    "fp32": torch.float32, "fp64": torch.float64,
}  # fmt: skip

#: The scan estimators (no groups; they return verl's returns as well) and verl's functions.
SCAN_ESTIMATORS = {
    "gae": "compute_gae_advantage_return",
    "reinforce_plus_plus": "compute_reinforce_plus_plus_outcome_advantage",
    "remax": "compute_remax_outcome_advantage",
}
#: The scans whose advantages are whitened over the batch's valid tokens (verl raises below 2).
WHITENED = ("gae", "reinforce_plus_plus")
#: The optimal token baselines (grouped, with returns) and verl's functions.
TOKEN_BASELINES = {
    "optimal_token_baseline": "compute_optimal_token_baseline_advantage",
    "tir_optimal_token_baseline": "compute_multi_turn_optimal_token_baseline_advantage",
}
ADV_ESTIMATORS = {**ESTIMATORS, **SCAN_ESTIMATORS, **TOKEN_BASELINES}
#: gamma / lam: the usual settings, the edge 0 and, for "random", a draw in (0, 1].
DISCOUNTS = (1.0, 0.99, 0.95, 0.5, 0.0, "random")

OPS = (
    "policy", "policy_rule", "policy_geo", "policy_cov", "policy_bypass", "agg_loss", "kl_penalty", "advantage",
    "value_loss",
)  # fmt: skip
OP_WEIGHTS = (0.24, 0.16, 0.05, 0.07, 0.04, 0.09, 0.11, 0.15, 0.09)
#: The token-rule policy losses of issue 17 (op ``policy_rule``).
RULE_MODES = ("cispo", "sapo", "gpg", "dro", "dppo_tv", "dppo_kl", "reinforce")
CLASSES = ("ok", "both_raise", "known_nan", "known_tie", "undocumented_tie", "rounding", "mismatch")
#: Classes that fail a run; ``--strict`` adds undocumented_tie and rounding.
REAL = ("mismatch",)
STRICT_REAL = ("undocumented_tie", "rounding", "mismatch")


def _check_reference_is_verls() -> None:
    """With ``LUSPO_RS_TAKE_OVER`` verl's registry would hold our own functions,
    and the fuzz would compare luspo-rs with itself."""
    fns = [verl_ca.get_policy_loss_fn("vanilla"), verl_ca.get_policy_loss_fn("gspo"), verl_ca.agg_loss, verl_ca.kl_penalty]
    fns += [rule_verl_fn(m) for m in RULE_MODES]
    # GMPO, Clip-Cov, KL-Cov, bypass mode and the two losses bypass mode calls
    fns += [verl_ca.get_policy_loss_fn(m) for m in ("geo_mean", "clip_cov", "kl_cov", "bypass_mode")]
    fns += [verl_ca.compute_policy_loss_vanilla, verl_ca.compute_policy_loss_reinforce]
    fns.append(verl_ca.compute_value_loss)
    fns += [getattr(verl_ca, fn) for fn in ADV_ESTIMATORS.values()]
    for fn in fns:
        if not getattr(fn, "__module__", "").startswith("verl."):
            raise RuntimeError(
                f"verl's {fn.__name__} is {fn.__module__}'s: luspo-rs has taken over verl "
                "(unset LUSPO_RS_TAKE_OVER or call luspo_rs.verl.restore())"
            )


# --------------------------------------------------------------------------- cases


@dataclass
class Case:
    """One drawn input: ``params`` are plain values (strings, numbers, None),
    ``inputs`` tensors (contiguous), numpy arrays or lists."""

    seed: int
    index: int
    op: str
    variant: str
    params: dict[str, Any] = field(default_factory=dict)
    inputs: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return f"{self.seed}:{self.index}"

    def describe(self) -> str:
        shapes = []
        for k, v in self.inputs.items():
            if isinstance(v, torch.Tensor):
                shapes.append(f"{k}{tuple(v.shape)}:{str(v.dtype).removeprefix('torch.')}")
            elif isinstance(v, np.ndarray):
                shapes.append(f"{k}{v.shape}:np.{v.dtype}")
            else:
                shapes.append(f"{k}:{type(v).__name__}[{len(v)}]")
        ps = ", ".join(f"{k}={v!r}" for k, v in self.params.items())
        return f"{self.op}/{self.variant} [{ps}] {' '.join(shapes)}"


def fingerprint(case: Case) -> str:
    """sha256 of everything that defines the case (bit patterns of the tensors)."""
    h = hashlib.sha256()
    h.update(repr((case.seed, case.index, case.op, case.variant, sorted(case.params.items()))).encode())
    for name, v in case.inputs.items():
        h.update(name.encode())
        if isinstance(v, torch.Tensor):
            h.update(f"{v.dtype}{tuple(v.shape)}".encode())
            h.update(v.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(v, np.ndarray) and v.dtype != object:
            h.update(f"{v.dtype}{v.shape}".encode())
            h.update(np.ascontiguousarray(v).tobytes())
        else:
            h.update(f"{type(v).__name__}".encode() + repr(list(v)).encode())
    return h.hexdigest()[:16]


def _pick(rng: np.random.Generator, options, p=None):
    options = list(options)
    return options[int(rng.choice(len(options), p=p))]


def _dim(rng: np.random.Generator, hi: int) -> int:
    """A batch or response length: 1 often, small odd sizes, now and then large."""
    u = rng.random()
    if u < 0.12:
        return 1
    if u < 0.55:
        return int(rng.integers(2, 17))
    if u < 0.9:
        return int(rng.integers(17, min(hi, 128) + 1))
    return int(rng.integers(min(hi, 129), hi + 1))


def _shape(rng: np.random.Generator, b_hi=64, t_hi=600, cap=40_000) -> tuple[int, int]:
    B, T = _dim(rng, b_hi), _dim(rng, t_hi)
    while B * T > cap:  # bound the cost of one case
        T = max(1, T // 2)
    return B, T


def _mask(rng: np.random.Generator, B: int, T: int, min_len: int = 0) -> tuple[np.ndarray, str]:
    """A (B, T) 0/1 mask: right-padded responses, scattered (multi-turn) masks or
    full rows; fully masked rows now and then, a fully masked batch rarely."""
    kind = _pick(rng, ["prefix", "scattered", "full", "empty"], p=[0.6, 0.22, 0.15, 0.03])
    if kind == "prefix":
        lengths = rng.integers(min_len, T + 1, size=B)
        m = np.arange(T)[None, :] < lengths[:, None]
    elif kind == "scattered":
        m = rng.random((B, T)) < rng.uniform(0.2, 0.95)
    elif kind == "full":
        m = np.ones((B, T), dtype=bool)
    else:
        m = np.zeros((B, T), dtype=bool)
    if kind != "empty" and min_len == 0 and B > 1 and rng.random() < 0.3:
        m[rng.choice(B, size=int(rng.integers(1, max(2, B // 3))), replace=False)] = False
    return m, kind


def _normalisers(rng: np.random.Generator, B: int, T: int) -> tuple[dict[str, Any], str]:
    """verl's global-batch normalisers: none, given (ints or 0-d tensors, as
    verl's actors pass them), or dp_size > 1 with some missing (both raise where
    the aggregation needs them)."""
    kind = _pick(rng, ["local", "global", "missing"], p=[0.5, 0.44, 0.06])
    if kind == "local":
        return {}, kind
    norms: dict[str, Any] = {"dp_size": int(_pick(rng, [1, 2, 3, 4, 8]))}
    draws = {
        "batch_num_tokens": lambda: int(rng.integers(1, 2 * B * T + 2)),
        "global_batch_size": lambda: int(rng.integers(1, 4 * B + 2)),
        "loss_scale_factor": lambda: int(_pick(rng, [T, int(rng.integers(1, 4097))])),
    }
    for k, draw in draws.items():
        if kind == "missing" and rng.random() < 0.5:
            continue
        v = draw()
        if kind == "global" and rng.random() < 0.15:
            continue
        norms[k] = v
    if kind == "missing":
        norms["dp_size"] = int(_pick(rng, [2, 4]))
    return norms, kind


def _tensor_norms(rng: np.random.Generator, norms: dict[str, Any]) -> dict[str, str]:
    """Which normalisers are passed as 0-d tensors (int64 or float32)."""
    return {k: _pick(rng, ["int64", "fp32"]) for k in norms if k != "dp_size" and rng.random() < 0.3}


def _materialise_norms(norms: dict[str, Any], as_tensor: dict[str, str]) -> dict[str, Any]:
    out = dict(norms)
    for k, dt in as_tensor.items():
        out[k] = torch.tensor(norms[k], dtype=torch.int64 if dt == "int64" else torch.float32)
    return out


def _nextafter_steps(x: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """``x`` moved by ``steps`` (an integer tensor, per element) representable values."""
    out = x.clone()
    for k in range(1, int(steps.abs().max().item()) + 1 if steps.numel() else 1):
        up, down = steps >= k, steps <= -k
        out = torch.where(up, torch.nextafter(out, torch.full_like(out, math.inf)), out)
        out = torch.where(down, torch.nextafter(out, torch.full_like(out, -math.inf)), out)
    return out


def draw_policy(rng: np.random.Generator, case: Case) -> None:
    mode = _pick(rng, MODES)
    B, T = _shape(rng)
    dtype_name = _pick(rng, ["fp32", "fp64", "bf16", "fp16"], p=[0.5, 0.25, 0.15, 0.1])
    dtype = DTYPES[dtype_name]
    mask, mask_kind = _mask(rng, B, T)

    # clip ratios: verl's defaults, asymmetric (DAPO), zero, or random; low/high maybe unset
    clip_ratio = float(_pick(rng, [0.2, 0.28, 0.0, round(rng.uniform(0.01, 0.6), 4)], p=[0.4, 0.1, 0.05, 0.45]))
    clip_low = None if rng.random() < 0.4 else float(_pick(rng, [0.2, 0.0, round(rng.uniform(0.0, 0.9), 4)]))
    clip_high = None if rng.random() < 0.4 else float(_pick(rng, [0.28, 0.0, round(rng.uniform(0.0, 2.0), 4)]))
    clip_c = float(_pick(rng, [3.0, round(rng.uniform(1.01, 10.0), 4)], p=[0.7, 0.3]))

    # log-probs: old in [-scale, 0], log-ratios of a random spread, large outliers now and then
    old, d, values = _policy_values(rng, B, T)
    if mode != "vanilla" and rng.random() < 0.08:
        values = "large-rows"  # whole sequences past GSPO's log-ratio clamp (10) or far below
        rows = rng.random(B) < 0.5
        d[rows] = rng.uniform(-30.0, 30.0, size=(int(rows.sum()), 1))
    # advantages: per token, per sequence (B,) or (B, 1), or GRPO-like (per
    # sequence + noise), exact zeros now and then (max of two -0.0: a tie
    # torch splits); IS weights
    adv, adv_kind, weights, w_kind = _policy_advantages(rng, B, T)

    norms, norm_kind = _normalisers(rng, B, T)
    case.params.update(
        mode=mode, dtype=dtype_name, mask_dtype=_pick(rng, MASK_DTYPES), mask_kind=mask_kind,
        loss_agg_mode=_pick(rng, AGG_MODES), clip_ratio=clip_ratio, clip_ratio_low=clip_low,
        clip_ratio_high=clip_high, clip_ratio_c=clip_c, values=values, adv=adv_kind, weights=w_kind,
        norms=norm_kind, **{f"norm_{k}": v for k, v in norms.items()},
        tensor_norms=_tensor_norms(rng, norms), api=_pick(rng, ["functional", "core_algos"]),
        layout=_pick(rng, ["contiguous", "transposed", "strided"], p=[0.7, 0.15, 0.15]),
        grad_out=float(_pick(rng, [1.0, 1.0, 1.0, 0.5, -2.0, 3.0])),
    )  # fmt: skip

    old_t = torch.from_numpy(old).to(dtype)
    lp_t = torch.from_numpy(old + d).to(dtype)

    # ties: ratios a few ulps around a clip bound ("near") or exactly on it ("exact"),
    # log-ratios exactly on the clamps (vanilla's +-20, GSPO's 10: "clamp"), ratios a
    # few ulps around the dual-clip bound clip_ratio_c ("dual", vanilla) and sequence
    # log-ratios within rounding of GSPO's clamp at 10 ("near10", GSPO / LUSPO)
    tie = _pick(rng, ["none", "near", "exact", "clamp", "dual", "near10"], p=[0.66, 0.14, 0.09, 0.04, 0.04, 0.03])
    if tie == "dual" and mode != "vanilla":
        tie = "near"
    if tie == "near10" and mode == "vanilla":
        tie = "clamp"
    lo = 1 - (clip_low if clip_low is not None else clip_ratio)
    hi = 1 + (clip_high if clip_high is not None else clip_ratio)
    if tie == "near" and lo <= 0:
        tie = "exact"
    case.params["tie"] = tie
    if mode == "vanilla":
        sel = torch.from_numpy(rng.random((B, T)) < rng.uniform(0.1, 1.0))
    else:  # the sequence ratio is what is clipped: whole rows carry the same log-ratio
        sel = torch.from_numpy(np.repeat(rng.random((B, 1)) < rng.uniform(0.3, 1.0), T, axis=1))
    if tie in ("near", "dual"):
        if tie == "near":
            bound = torch.from_numpy(np.where(rng.random((B, T)) < 0.5, lo, hi))
        else:
            bound = torch.full((B, T), clip_c, dtype=torch.float64)
        steps = torch.from_numpy(rng.integers(-4, 5, size=(B, T)))
        if mode != "vanilla":
            bound, steps = bound[:, :1].expand(B, T), steps[:, :1].expand(B, T)
        dt = _nextafter_steps(bound.log().to(dtype), steps)
        o = torch.from_numpy(-rng.random((B, T))).to(dtype)
        old_t = torch.where(sel, o, old_t)
        lp_t = torch.where(sel, o + dt, lp_t)
    elif tie == "exact":  # ratio exactly 1 on a zero-width side of the clip range
        if rng.random() < 0.5:
            case.params["clip_ratio_low"] = 0.0
        if case.params["clip_ratio_low"] != 0.0 or rng.random() < 0.5:
            case.params["clip_ratio_high"] = 0.0
        lp_t = torch.where(sel, old_t, lp_t)
    elif tie == "clamp":  # exact: integer old log-probs, log-ratios +-20 or 10
        o = torch.from_numpy(-rng.integers(0, 30, size=(B, T)).astype(np.float64)).to(dtype)
        shift = 10.0 if mode != "vanilla" else torch.from_numpy(rng.choice([-20.0, 20.0], size=(B, T))).to(dtype)
        old_t = torch.where(sel, o, old_t)
        lp_t = torch.where(sel, o + shift, lp_t)
    elif tie == "near10":  # varied tokens whose masked mean is 10 up to rounding
        noise = rng.standard_normal((B, T)) * 0.5
        L = np.maximum(mask.sum(-1, keepdims=True), 1)
        d10 = 10.0 + noise - (noise * mask).sum(-1, keepdims=True) / L
        o = torch.from_numpy(-rng.random((B, T)) * 3).to(dtype)
        old_t = torch.where(sel, o, old_t)
        lp_t = torch.where(sel, o + torch.from_numpy(d10).to(dtype), lp_t)

    case.inputs.update(
        old_log_prob=old_t,
        log_prob=lp_t,
        advantages=torch.from_numpy(adv).to(dtype),
        response_mask=torch.from_numpy(mask).to(MASK_DTYPES[case.params["mask_dtype"]]),
    )
    if weights is not None:
        case.inputs["rollout_is_weights"] = torch.from_numpy(weights).to(dtype)


def draw_policy_rule(rng: np.random.Generator, case: Case) -> None:
    """A token-rule loss (issue 17): its knobs, clip ratios (CISPO's clip,
    DPPO's divergence bounds) and truncation, log-ratios with outliers past
    the +-20 clamp, every advantage / weight layout, zero advantages (SAPO's
    and DPPO's ``A > 0`` branch), the normalisers."""
    mode = _pick(rng, RULE_MODES)
    B, T = _shape(rng)
    dtype_name = _pick(rng, ["fp32", "fp64", "bf16", "fp16"], p=[0.5, 0.25, 0.15, 0.1])
    dtype = DTYPES[dtype_name]
    mask, mask_kind = _mask(rng, B, T)
    clip_ratio = float(_pick(rng, [0.2, 0.28, 0.0, round(rng.uniform(0.01, 0.6), 4)], p=[0.4, 0.1, 0.05, 0.45]))
    clip_low = None if rng.random() < 0.4 else float(_pick(rng, [0.2, 0.0, round(rng.uniform(0.0, 0.9), 4)]))
    clip_high = None if rng.random() < 0.4 else float(_pick(rng, [0.28, 0.0, round(rng.uniform(0.0, 2.0), 4)]))
    clip_c = float(_pick(rng, [3.0, 20.0, round(rng.uniform(0.5, 10.0), 4)], p=[0.5, 0.2, 0.3]))
    tau_pos, tau_neg = 1.0, 1.05
    if rng.random() < 0.5:
        tau_pos, tau_neg = (round(float(x), 4) for x in rng.uniform(0.05, 5.0, size=2))
    dro_beta = float(_pick(rng, [0.1, round(rng.uniform(1e-3, 5.0), 4)]))

    old, d, values = _policy_values(rng, B, T)
    adv, adv_kind, weights, w_kind = _policy_advantages(rng, B, T)

    norms, norm_kind = _normalisers(rng, B, T)
    case.params.update(
        mode=mode, dtype=dtype_name, mask_dtype=_pick(rng, MASK_DTYPES), mask_kind=mask_kind,
        loss_agg_mode=_pick(rng, AGG_MODES), clip_ratio=clip_ratio, clip_ratio_low=clip_low,
        clip_ratio_high=clip_high, clip_ratio_c=clip_c, tau_pos=tau_pos, tau_neg=tau_neg, dro_beta=dro_beta,
        values=values, adv=adv_kind, weights=w_kind, norms=norm_kind, **{f"norm_{k}": v for k, v in norms.items()},
        tensor_norms=_tensor_norms(rng, norms),
        layout=_pick(rng, ["contiguous", "transposed", "strided"], p=[0.7, 0.15, 0.15]),
        grad_out=float(_pick(rng, [1.0, 1.0, 1.0, 0.5, -2.0, 3.0])),
    )  # fmt: skip
    old_t = torch.from_numpy(old).to(dtype)
    lp_t = torch.from_numpy(old + d).to(dtype)
    # ties: CISPO's ratio a few ulps around a clip bound, DPPO-TV's p - p_old
    # a few ulps around a divergence bound ("near"; see rule_ties)
    tie = _pick(rng, ["none", "near"], p=[0.8, 0.2]) if mode in ("cispo", "dppo_tv") else "none"
    low = clip_low if clip_low is not None else clip_ratio
    high = clip_high if clip_high is not None else clip_ratio
    if tie == "near" and mode == "cispo" and 1 - low <= 0:
        tie = "none"
    case.params["tie"] = tie
    if tie == "near":
        sel = torch.from_numpy(rng.random((B, T)) < rng.uniform(0.1, 1.0))
        side = rng.random((B, T)) < 0.5
        steps = torch.from_numpy(rng.integers(-4, 5, size=(B, T)))
        o = torch.from_numpy(-rng.random((B, T)) * 2 - 0.05)
        if mode == "cispo":
            at = torch.from_numpy(np.where(side, 1 - low, 1 + high)).log().to(dtype)
            lp_near = o.to(dtype) + _nextafter_steps(at, steps)
        else:
            target = torch.from_numpy(np.where(side, o.exp().numpy() + high, o.exp().numpy() - low))
            lp_near = _nextafter_steps(target.clamp(1e-6, 1 - 1e-6).log().to(dtype), steps)
        old_t = torch.where(sel, o.to(dtype), old_t)
        lp_t = torch.where(sel, lp_near, lp_t)
    case.inputs.update(
        old_log_prob=old_t,
        log_prob=lp_t,
        advantages=torch.from_numpy(adv).to(dtype),
        response_mask=torch.from_numpy(mask).to(MASK_DTYPES[case.params["mask_dtype"]]),
    )
    if weights is not None:
        case.inputs["rollout_is_weights"] = torch.from_numpy(weights).to(dtype)


def _policy_values(rng: np.random.Generator, B: int, T: int, *, outliers=True) -> tuple[np.ndarray, np.ndarray, str]:
    """Old log-probs in ``[-scale, 0]`` and log-ratios of a random spread,
    with outliers (``|d|`` 8 to 40) now and then."""
    old = -rng.random((B, T)) * _pick(rng, [0.5, 3.0, 10.0])
    d = rng.standard_normal((B, T)) * _pick(rng, [0.01, 0.1, 0.3, 1.0, 3.0])
    values = "normal"
    if outliers and rng.random() < 0.2:
        values = "outliers"
        sel = rng.random((B, T)) < rng.uniform(0.01, 0.3)
        d[sel] = rng.choice([-1.0, 1.0], size=int(sel.sum())) * rng.uniform(8.0, 40.0, size=int(sel.sum()))
    return old, d, values


def _policy_advantages(rng: np.random.Generator, B: int, T: int, kinds=("token", "seq", "seq1", "grouplike")):
    """Advantages per token, per sequence ``(B,)`` / ``(B, 1)`` or GRPO-like,
    exact zeros now and then; and IS weights (none, per token, per sequence)."""
    adv_kind = _pick(rng, kinds)
    scale = float(_pick(rng, [0.1, 1.0, 10.0]))
    a_seq = rng.standard_normal(B) * scale
    if adv_kind == "token":
        adv = rng.standard_normal((B, T)) * scale
    elif adv_kind == "seq":
        adv = a_seq
    elif adv_kind == "seq1":
        adv = a_seq[:, None]
    else:
        adv = a_seq[:, None] + 0.1 * scale * rng.standard_normal((B, T))
    if rng.random() < 0.15:
        adv = np.where(rng.random(adv.shape) < 0.3, 0.0, adv)
    w_kind = _pick(rng, ["none", "token", "seq"], p=[0.6, 0.3, 0.1])
    weights = None
    if w_kind == "token":
        weights = rng.uniform(0.0, 2.0, size=(B, T))
    elif w_kind == "seq":
        weights = rng.uniform(0.0, 2.0, size=B)
    return adv, adv_kind, weights, w_kind


def _clip_draw(rng: np.random.Generator) -> dict[str, Any]:
    """clip_ratio (verl's defaults, DAPO's, zero, random) and low / high, maybe unset."""
    clip_ratio = float(_pick(rng, [0.2, 0.28, 0.0, round(rng.uniform(0.01, 0.6), 4)], p=[0.4, 0.1, 0.05, 0.45]))
    clip_low = None if rng.random() < 0.4 else float(_pick(rng, [0.2, 0.0, round(rng.uniform(0.0, 0.9), 4)]))
    clip_high = None if rng.random() < 0.4 else float(_pick(rng, [0.28, 0.0, round(rng.uniform(0.0, 2.0), 4)]))
    return dict(clip_ratio=clip_ratio, clip_ratio_low=clip_low, clip_ratio_high=clip_high)


def _low_high(p: dict) -> tuple[float, float]:
    low = p["clip_ratio_low"] if p["clip_ratio_low"] is not None else p["clip_ratio"]
    high = p["clip_ratio_high"] if p["clip_ratio_high"] is not None else p["clip_ratio"]
    return low, high


def draw_policy_geo(rng: np.random.Generator, case: Case) -> None:
    """GMPO (``geo_mean``): the clip ratios, every advantage / weight layout
    (verl's function takes ``(B, T)`` ones: ours per row too, compared with
    verl on their expansion), every loss_agg_mode and normaliser (ignored by
    both), and log-ratios exactly on the clip bounds ``-clip_ratio_low`` /
    ``clip_ratio_high`` or a few ulps around them ("exact" / "near": the
    clamp and the min decide there; ``old = -4`` and ``lp`` within a factor
    2 of it, so ``lp - old`` is exact and the same on both sides)."""
    B, T = _shape(rng)
    dtype_name = _pick(rng, ["fp32", "fp64", "bf16", "fp16"], p=[0.5, 0.25, 0.15, 0.1])
    dtype = DTYPES[dtype_name]
    mask, mask_kind = _mask(rng, B, T)
    clip = _clip_draw(rng)
    old, d, values = _policy_values(rng, B, T)
    adv, adv_kind, weights, w_kind = _policy_advantages(rng, B, T)
    norms, norm_kind = _normalisers(rng, B, T)
    tie = _pick(rng, ["none", "near", "exact"], p=[0.7, 0.18, 0.12])
    case.params.update(
        mode="geo_mean", dtype=dtype_name, mask_dtype=_pick(rng, MASK_DTYPES), mask_kind=mask_kind,
        loss_agg_mode=_pick(rng, AGG_MODES), **clip, values=values, adv=adv_kind, weights=w_kind, norms=norm_kind,
        **{f"norm_{k}": v for k, v in norms.items()}, tensor_norms=_tensor_norms(rng, norms),
        layout=_pick(rng, ["contiguous", "transposed", "strided"], p=[0.7, 0.15, 0.15]),
        grad_out=float(_pick(rng, [1.0, 1.0, 1.0, 0.5, -2.0, 3.0])), tie=tie,
        api=_pick(rng, ["functional", "core_algos"]),
    )  # fmt: skip
    old_t = torch.from_numpy(old).to(dtype)
    lp_t = torch.from_numpy(old + d).to(dtype)
    if tie != "none":
        if tie == "exact":  # bounds that every dtype holds exactly
            case.params["clip_ratio_low"] = float(_pick(rng, [0.25, 0.125, 0.375, 0.5]))
            case.params["clip_ratio_high"] = float(_pick(rng, [0.25, 0.125, 0.375, 0.5, 1.0]))
        low, high = _low_high(case.params)
        sel = torch.from_numpy(rng.random((B, T)) < rng.uniform(0.1, 1.0))
        side = torch.from_numpy(rng.random((B, T)) < 0.5)
        o = torch.full((B, T), -4.0, dtype=dtype)
        at = torch.where(side, torch.tensor(-low, dtype=torch.float64), torch.tensor(high, dtype=torch.float64))
        lp_near = (o.double() + at).to(dtype)
        if tie == "near":
            lp_near = _nextafter_steps(lp_near, torch.from_numpy(rng.integers(-3, 4, size=(B, T))))
        old_t = torch.where(sel, o, old_t)
        lp_t = torch.where(sel, lp_near, lp_t)
    case.inputs.update(
        old_log_prob=old_t, log_prob=lp_t, advantages=torch.from_numpy(adv).to(dtype),
        response_mask=torch.from_numpy(mask).to(MASK_DTYPES[case.params["mask_dtype"]]),
    )  # fmt: skip
    if weights is not None:
        case.inputs["rollout_is_weights"] = torch.from_numpy(weights).to(dtype)


#: Clip-Cov's random draw and KL-Cov's choice: ratios choosing one token, a few, many, all.
CLIP_COV_RATIOS = (0.0002, 0.01, 0.05, 0.3, 1.0)
KL_COV_RATIOS = (0.0002, 0.01, 0.1, 0.5, 1.0)
#: 16-bit ratios within this relative margin of a clip bound are not drawn for
#: Clip-Cov (test_cov_losses.away_from_the_clip): verl's 16-bit arithmetic and
#: our float32 one clip them differently in the loss (the choice is the same).
COV_HALF_CLIP_MARGIN = 0.03


def _away_from_the_clip(old: torch.Tensor, lp: torch.Tensor, bounds) -> torch.Tensor:
    """``old`` moved (by -0.1 at a time) where ``exp(lp - old)`` lies within
    COV_HALF_CLIP_MARGIN of a clip bound (in float64)."""
    for _ in range(64):
        r = torch.exp((lp - old).double())
        near = torch.zeros(r.shape, dtype=torch.bool)
        for b in bounds:
            near |= (r / b - 1).abs() < COV_HALF_CLIP_MARGIN if b > 0 else torch.zeros_like(near)
        if not near.any():
            return old
        old = torch.where(near, old.double() - 0.1, old.double()).to(old.dtype)
    raise AssertionError("could not move the ratios off the clip bounds")


def draw_policy_cov(rng: np.random.Generator, case: Case) -> None:
    """Clip-Cov and KL-Cov (seeded: ``torch.manual_seed(seed)`` before
    verl's call and before ours). Clip-Cov: ``clip_cov_ratio`` from one
    token to all of them, candidate windows ``(clip_cov_lb, clip_cov_ub)``
    of every width, so that there are often more candidates than
    ``clip_num`` (the draw decides) and sometimes none; ratios a few ulps
    around the PPO clip bounds ("near"). KL-Cov: ``kl_cov_ratio`` from one
    token to all, ``ppo_kl_coef`` 0 to 10, and log-probs on a coarse grid
    with integer per-row advantages ("grid") so that covariances tie at the
    k-th largest (``topk`` breaks the ties). The 16-bit type drawn is
    bfloat16 (as test_cov_losses), its ratios kept off the clip bounds."""
    mode = _pick(rng, ["clip_cov", "kl_cov"])
    B, T = _shape(rng)
    dtype_name = _pick(rng, ["fp32", "fp64", "bf16"], p=[0.55, 0.3, 0.15])
    dtype = DTYPES[dtype_name]
    mask, mask_kind = _mask(rng, B, T)
    clip = _clip_draw(rng)
    old, d, values = _policy_values(rng, B, T)
    adv, adv_kind, weights, w_kind = _policy_advantages(rng, B, T, kinds=("token", "seq", "seq1", "grouplike", "grid"))
    if adv_kind == "grid":  # integer per-row advantages, log-probs on a grid of 1/4
        adv = rng.integers(-1, 2, size=(B, 1)).astype(np.float64) * np.ones((1, T))
        lp = -rng.integers(0, 7, size=(B, T)) / 4.0
        d = 0.1 * rng.standard_normal((B, T))
        old = lp - d
        values = "grid"
    norms, norm_kind = _normalisers(rng, B, T)
    knobs: dict[str, Any]
    if mode == "clip_cov":
        window = _pick(rng, ["default", "wide", "positive", "random"], p=[0.3, 0.25, 0.2, 0.25])
        if window == "default":
            lb, ub = 1.0, 5.0
        elif window == "wide":
            lb, ub = -1e6, 1e6
        elif window == "positive":
            lb, ub = 0.0, 5.0
        else:
            lb = round(float(rng.uniform(-2.0, 1.0)), 4)
            ub = round(lb + float(rng.uniform(0.05, 10.0)), 4)
        knobs = dict(clip_cov_ratio=float(_pick(rng, CLIP_COV_RATIOS)), clip_cov_lb=lb, clip_cov_ub=ub)
    else:
        knobs = dict(kl_cov_ratio=float(_pick(rng, KL_COV_RATIOS)),
                     ppo_kl_coef=float(_pick(rng, [1.0, 0.1, 0.0, round(rng.uniform(0.0, 10.0), 4)])))  # fmt: skip
    tie = "none"
    if mode == "clip_cov" and dtype_name != "bf16" and adv_kind != "grid":
        tie = _pick(rng, ["none", "near"], p=[0.8, 0.2])
    case.params.update(
        mode=mode, dtype=dtype_name, mask_dtype=_pick(rng, MASK_DTYPES), mask_kind=mask_kind,
        loss_agg_mode=_pick(rng, AGG_MODES), **clip, **knobs, values=values, adv=adv_kind, weights=w_kind,
        norms=norm_kind, **{f"norm_{k}": v for k, v in norms.items()}, tensor_norms=_tensor_norms(rng, norms),
        api=_pick(rng, ["functional", "core_algos"]),
        layout=_pick(rng, ["contiguous", "transposed", "strided"], p=[0.7, 0.15, 0.15]),
        grad_out=float(_pick(rng, [1.0, 1.0, 1.0, 0.5, -2.0, 3.0])), tie=tie,
        torch_seed=int(rng.integers(0, 2**31)),
    )  # fmt: skip
    old_t = torch.from_numpy(old).to(dtype)
    lp_t = torch.from_numpy(old + d).to(dtype)
    low, high = _low_high(case.params)
    if tie == "near":  # as draw_policy_rule's CISPO ties
        sel = torch.from_numpy(rng.random((B, T)) < rng.uniform(0.1, 1.0))
        side = rng.random((B, T)) < 0.5
        steps = torch.from_numpy(rng.integers(-4, 5, size=(B, T)))
        o = torch.from_numpy(-rng.random((B, T)) * 2 - 0.05)
        bound = np.where(side, 1 - low, 1 + high)
        bound = np.where(bound > 0, bound, 1 + high)
        at = torch.from_numpy(bound).log().to(dtype)
        old_t = torch.where(sel, o.to(dtype), old_t)
        lp_t = torch.where(sel, o.to(dtype) + _nextafter_steps(at, steps), lp_t)
    if dtype_name == "bf16":
        old_t = _away_from_the_clip(old_t, lp_t, (1 - low, 1 + high))
    case.inputs.update(
        old_log_prob=old_t, log_prob=lp_t, advantages=torch.from_numpy(adv).to(dtype),
        response_mask=torch.from_numpy(mask).to(MASK_DTYPES[case.params["mask_dtype"]]),
    )  # fmt: skip
    if weights is not None:
        case.inputs["rollout_is_weights"] = torch.from_numpy(weights).to(dtype)


#: bypass mode's rollout corrections (verl's RolloutCorrectionConfig fields):
#: IS weights per token or sequence with an upper or a (lower, upper)
#: threshold, batch-normalised or not; rejection sampling by token or
#: sequence criteria (chained too); or nothing.
BYPASS_IS = (
    dict(rollout_is=None),
    dict(rollout_is="token", rollout_is_threshold=2.0),
    dict(rollout_is="token", rollout_is_threshold=1.5),
    dict(rollout_is="token", rollout_is_threshold="0.8_1.25"),
    dict(rollout_is="sequence", rollout_is_threshold=3.0),
    dict(rollout_is="sequence", rollout_is_threshold=3.0, rollout_is_batch_normalize=True),
    dict(rollout_is="token", rollout_is_threshold=2.0, rollout_is_batch_normalize=True),
)
BYPASS_RS = (
    dict(rollout_rs=None),
    dict(rollout_rs="token_k1", rollout_rs_threshold="0.7_1.4"),
    dict(rollout_rs="token_k1", rollout_rs_threshold=1.5),
    dict(rollout_rs="token_k3", rollout_rs_threshold=0.05),
    dict(rollout_rs="seq_mean_k3", rollout_rs_threshold=0.02),
    dict(rollout_rs="seq_sum_k1", rollout_rs_threshold="0.5_2.0"),
    dict(rollout_rs="seq_max_k2", rollout_rs_threshold=0.1),
    dict(rollout_rs="token_k1,seq_mean_k3", rollout_rs_threshold="0.7_1.4,0.05"),
)


def draw_policy_bypass(rng: np.random.Generator, case: Case) -> None:
    """bypass mode (``core_algos.compute_policy_loss_bypass_mode``): both
    loss types (``reinforce``: REINFORCE with the IS weights; ``ppo_clip``:
    vanilla PPO, dual clip included, without them), an IS and a rejection
    setting of BYPASS_IS / BYPASS_RS, the rollout log-probs near the
    current ones (the corrections reject or truncate some tokens, not all),
    and ratios a few ulps around the PPO clip bounds ("near"). Float32 and
    float64, as test_cov_losses."""
    B, T = _shape(rng)
    dtype_name = _pick(rng, ["fp32", "fp64"], p=[0.7, 0.3])
    dtype = DTYPES[dtype_name]
    mask, mask_kind = _mask(rng, B, T)
    clip = _clip_draw(rng)
    clip_c = float(_pick(rng, [3.0, round(rng.uniform(1.01, 10.0), 4)], p=[0.7, 0.3]))
    old = -rng.random((B, T)) * _pick(rng, [0.5, 3.0, 10.0])
    d = rng.standard_normal((B, T)) * _pick(rng, [0.01, 0.05, 0.2, 0.5])
    adv, adv_kind, _, _ = _policy_advantages(rng, B, T, kinds=("token", "grouplike"))
    norms, norm_kind = _normalisers(rng, B, T)
    loss_type = _pick(rng, ["reinforce", "ppo_clip"])
    correction = {**_pick(rng, BYPASS_IS), **_pick(rng, BYPASS_RS, p=[0.4] + [0.6 / 7] * 7)}
    tie = _pick(rng, ["none", "near"], p=[0.8, 0.2]) if loss_type == "ppo_clip" else "none"
    case.params.update(
        mode="bypass_mode", loss_type=loss_type, dtype=dtype_name, mask_dtype=_pick(rng, MASK_DTYPES),
        mask_kind=mask_kind, loss_agg_mode=_pick(rng, AGG_MODES), **clip, clip_ratio_c=clip_c, adv=adv_kind,
        correction=correction, norms=norm_kind, **{f"norm_{k}": v for k, v in norms.items()},
        tensor_norms=_tensor_norms(rng, norms), layout=_pick(rng, ["contiguous", "transposed"], p=[0.8, 0.2]),
        grad_out=float(_pick(rng, [1.0, 1.0, 0.5, -2.0])), tie=tie, ignored_weights=bool(rng.random() < 0.3),
    )  # fmt: skip
    old_t = torch.from_numpy(old).to(dtype)
    lp_t = torch.from_numpy(old + d).to(dtype)
    if tie == "near":
        low, high = _low_high(case.params)
        sel = torch.from_numpy(rng.random((B, T)) < rng.uniform(0.1, 0.5))
        side = rng.random((B, T)) < 0.5
        bound = np.where(side, 1 - low, 1 + high)
        bound = np.where(bound > 0, bound, 1 + high)
        o = torch.from_numpy(-rng.random((B, T)) * 2 - 0.05).to(dtype)
        at = _nextafter_steps(torch.from_numpy(bound).log().to(dtype), torch.from_numpy(rng.integers(-4, 5, size=(B, T))))
        old_t = torch.where(sel, o, old_t)
        lp_t = torch.where(sel, o + at, lp_t)
    case.inputs.update(
        old_log_prob=old_t, log_prob=lp_t, advantages=torch.from_numpy(adv).to(dtype),
        response_mask=torch.from_numpy(mask).to(MASK_DTYPES[case.params["mask_dtype"]]),
    )  # fmt: skip


def draw_agg_loss(rng: np.random.Generator, case: Case) -> None:
    B, T = _shape(rng)
    dtype_name = _pick(rng, ["fp32", "fp64", "bf16", "fp16"], p=[0.45, 0.35, 0.1, 0.1])
    mask, mask_kind = _mask(rng, B, T)
    norms, norm_kind = _normalisers(rng, B, T)
    agg = _pick(rng, AGG_MODES)
    case.variant = agg
    case.params.update(
        dtype=dtype_name, mask_dtype=_pick(rng, MASK_DTYPES), mask_kind=mask_kind, loss_agg_mode=agg,
        norms=norm_kind, **{f"norm_{k}": v for k, v in norms.items()}, tensor_norms=_tensor_norms(rng, norms),
        api=_pick(rng, ["functional", "core_algos"]), layout=_pick(rng, ["contiguous", "transposed", "strided"], p=[0.7, 0.15, 0.15]),
        grad_out=float(_pick(rng, [1.0, 1.0, 0.5, -3.0])),
    )  # fmt: skip
    loss_mat = rng.standard_normal((B, T)) * _pick(rng, [1e-3, 1.0, 1e3]) + _pick(rng, [0.0, 0.0, 5.0])
    case.inputs.update(
        loss_mat=torch.from_numpy(loss_mat).to(DTYPES[dtype_name]),
        loss_mask=torch.from_numpy(mask).to(MASK_DTYPES[case.params["mask_dtype"]]),
    )


def draw_value_loss(rng: np.random.Generator, case: Case) -> None:
    B, T = _shape(rng)
    dtype_name = _pick(rng, ["fp32", "fp64", "bf16", "fp16"], p=[0.5, 0.25, 0.15, 0.1])
    dtype = DTYPES[dtype_name]
    mask, mask_kind = _mask(rng, B, T)
    norms, norm_kind = _normalisers(rng, B, T)
    agg = _pick(rng, AGG_MODES)
    c = _pick(rng, [0.2, 0.5, 0.0, "random"], p=[0.4, 0.2, 0.1, 0.3])
    c = float(rng.uniform(0.0, 2.0)) if c == "random" else c
    scale = float(_pick(rng, [1e-2, 1.0, 10.0], p=[0.2, 0.6, 0.2]))
    # predictions: off the old values by a fraction or a multiple of the clip
    # range; "bound": a share of them exactly on values -+ c as torch rounds it
    # (clip_by_value's ties), "equal": some equal to the returns (l1 = 0)
    where = _pick(rng, ["plain", "bound", "equal"], p=[0.6, 0.3, 0.1])
    case.variant = agg
    case.params.update(
        dtype=dtype_name, mask_dtype=_pick(rng, MASK_DTYPES), mask_kind=mask_kind, loss_agg_mode=agg,
        cliprange_value=c, scale=scale, where=where, norms=norm_kind, **{f"norm_{k}": v for k, v in norms.items()},
        tensor_norms=_tensor_norms(rng, norms), api=_pick(rng, ["functional", "core_algos"]),
        layout=_pick(rng, ["contiguous", "transposed", "strided"], p=[0.7, 0.15, 0.15]),
        grad_out=float(_pick(rng, [1.0, 1.0, 0.5, -3.0])),
    )  # fmt: skip
    values = torch.from_numpy(scale * rng.standard_normal((B, T))).to(dtype)
    spread = float(_pick(rng, [0.3, 1.0, 3.0])) * max(c, 0.05) * scale
    vpreds = (values.double() + torch.from_numpy(spread * rng.standard_normal((B, T)))).to(dtype)
    returns = (values.double() + torch.from_numpy(scale * rng.standard_normal((B, T)))).to(dtype)
    pick = torch.from_numpy(rng.random((B, T)) < 0.4)
    if where == "bound":  # values -+ c computed by torch in the inputs' dtype, as verl's clip_by_value sees them
        up = torch.from_numpy(rng.random((B, T)) < 0.5)
        vpreds = torch.where(pick, torch.where(up, values + c, values - c), vpreds)
    elif where == "equal":
        vpreds = torch.where(pick, returns, vpreds)
    case.inputs.update(
        vpreds=vpreds, values=values, returns=returns,
        response_mask=torch.from_numpy(mask).to(MASK_DTYPES[case.params["mask_dtype"]]),
    )  # fmt: skip


def draw_kl(rng: np.random.Generator, case: Case) -> None:
    # every name verl's kl_penalty accepts; "full" is a name verl refuses
    # (NotImplementedError): both must raise
    mode = "full" if rng.random() < 0.02 else _pick(rng, KL_MODES)
    rank = _pick(rng, [2, 1, 3, 0], p=[0.7, 0.12, 0.12, 0.06])
    B, T = _shape(rng, cap=20_000)
    shape = {0: (), 1: (B * T,), 2: (B, T), 3: (B, max(1, T // 4), 4 if T >= 4 else 1)}[rank]
    if rank in (1, 2) and rng.random() < 0.04:  # an empty batch or response
        shape = (0,) if rank == 1 else _pick(rng, [(0, T), (B, 0)])
    dtypes = _pick(rng, [("fp32", "fp32"), ("fp64", "fp64"), ("bf16", "bf16"), ("fp32", "fp64")], p=[0.45, 0.3, 0.12, 0.13])
    size = int(np.prod(shape)) if shape else 1
    lp = -rng.random(size) * _pick(rng, [0.3, 3.0])
    scale = float(_pick(rng, [0.01, 0.3, 1.0, 3.0, 10.0, 30.0]))
    ref = lp + rng.standard_normal(size) * scale
    if size and rng.random() < 0.2:  # the clamps of low_var_kl: |ref - lp| exactly 20, or past it
        sel = rng.random(size) < 0.2
        lp[sel] = -rng.integers(0, 10, size=int(sel.sum())).astype(np.float64)
        ref[sel] = lp[sel] + rng.choice([-20.0, 20.0, -25.0, 25.0], size=int(sel.sum()))
    lp_t = torch.from_numpy(lp.reshape(shape)).to(DTYPES[dtypes[0]])
    ref_t = torch.from_numpy(ref.reshape(shape)).to(DTYPES[dtypes[1]])
    near_clamp = bool(size and rng.random() < 0.1)
    if near_clamp:  # k = ref - lp a few ulps around KL_K10, where low_var_kl's clamp at 10 starts
        sel = torch.from_numpy((rng.random(size) < 0.5).reshape(shape))
        steps = torch.from_numpy(rng.integers(-6, 7, size=size).reshape(shape))
        k = _nextafter_steps(torch.full(shape, KL_K10, dtype=ref_t.dtype), steps)
        lp_t = torch.where(sel, torch.zeros_like(lp_t), lp_t)
        ref_t = torch.where(sel, k, ref_t)
    case.variant = mode
    case.params.update(
        dtype=dtypes[0], ref_dtype=dtypes[1], rank=rank, scale=scale, grad_ref=bool(rng.random() < 0.7),
        near_clamp=near_clamp,
    )  # fmt: skip
    case.inputs.update(
        logprob=lp_t,
        ref_logprob=ref_t,
        weight=torch.from_numpy(rng.standard_normal(size).reshape(shape)).to(DTYPES[dtypes[0]]),
    )


#: Group estimators added after the first seven. A case drawing a group
#: estimator becomes one of these with their share of the group estimators,
#: decided by a side stream of the case key: every other case -- and its
#: replay key -- stays as it was before they were added.
LATER_GROUP = ("grpo_passk", "gdpo")


def draw_advantage(rng: np.random.Generator, case: Case) -> None:
    # The token baselines take a sixth of the advantage cases, drawn from their
    # own stream of (seed, index), so the other estimators' cases stay those
    # of earlier versions (their replay commands keep working).
    sub = np.random.default_rng([case.seed, case.index, 16])
    if sub.random() < 1 / 6:
        draw_token_baseline(sub, case, _pick(sub, sorted(TOKEN_BASELINES)))
        return
    first = sorted(n for n in ESTIMATORS if n not in LATER_GROUP)
    name = _pick(rng, first + sorted(SCAN_ESTIMATORS))
    if name in ESTIMATORS:  # grpo_passk and gdpo: from a side stream of their own too
        side = np.random.default_rng([case.seed, case.index, 17])
        if side.random() < len(LATER_GROUP) / len(ESTIMATORS):
            name = str(side.choice(LATER_GROUP))
    if name in SCAN_ESTIMATORS:
        draw_scan(rng, case, name)
        return
    layout = _pick(rng, ["1", "2", "4", "16", "mixed"], p=[0.1, 0.15, 0.15, 0.2, 0.4])
    if layout == "mixed":
        sizes = [int(s) for s in rng.choice([1, 2, 3, 4, 5, 8, 16], size=int(rng.integers(1, 13)))]
    else:
        sizes = [int(layout)] * int(rng.integers(1, max(2, 64 // int(layout)) + 1))
    rpp = name in WHITENED_GROUP
    if rpp and sum(sizes) < 2:
        sizes.append(1)
    if name == "grpo_passk" and rng.random() < 0.9:  # else verl's ValueError for a lone row, ours too
        sizes = [max(s, 2) for s in sizes]
    B = sum(sizes)
    T = _dim(rng, 300)
    labels = rng.permutation(np.repeat(np.arange(len(sizes)), sizes))  # groups interleaved, as after a shuffle
    index_kind = _pick(rng, ["uid", "int", "list"])
    if index_kind == "int":
        index: Any = (labels * 7919 + 3).astype(np.int64)
    else:
        uids = [str(uuid.UUID(int=int(rng.integers(1 << 62)))) for _ in sizes]
        index = np.array([uids[g] for g in labels], dtype=object)
        if index_kind == "list":
            index = index.tolist()

    dtype_name = _pick(rng, ["fp32", "fp64"], p=[0.6, 0.4])
    mask_dtype = _pick(rng, ["fp32", "bool", "int64", "fp64"])
    mask, mask_kind = _mask(rng, B, T, min_len=1 if rpp else 0)
    if rpp:
        # reinforce_plus_plus_baseline (and gdpo) whitens over the batch's valid tokens: verl
        # raises on <= 1 of them, and where they all come from one response
        # (one value, variance 0) the rounding residue of the mean, divided by
        # sqrt(1e-8), is all there is -- the README's equal-scores difference.
        # Every response keeps a valid token.
        mask[:, 0] = True
    lengths = mask.sum(-1)

    rewards_kind = _pick(rng, ["normal", "binary", "tied_int"], p=[0.6, 0.2, 0.2])
    rewards = np.zeros((B, T))
    last = np.maximum(lengths - 1, 0)
    if rewards_kind == "normal":
        rewards = rng.standard_normal((B, T)) * _pick(rng, [0.01, 1.0, 100.0])
    elif rewards_kind == "binary":  # outcome 0/1 on the last valid token: all-equal groups happen
        rewards[np.arange(B), last] = rng.integers(0, 2, size=B)
    else:  # small integer scores, the whole group equal half of the time (float32 averages them exactly)
        g_score = rng.integers(-3, 4, size=len(sizes))
        s = np.where(rng.random(B) < 0.5, g_score[labels], rng.integers(-3, 4, size=B))
        rewards[np.arange(B), last] = s

    params: dict[str, Any] = {}
    if name in ("grpo", "grpo_vectorized", "grpo_passk", "gdpo"):
        params = dict(epsilon=float(_pick(rng, [1e-6, 1e-2])), norm_adv_by_std_in_grpo=bool(rng.random() < 0.75))
    elif name == "gpg":
        params = dict(f_norm=float(_pick(rng, [1.0, 2.5])))
    if name == "gdpo" and rng.random() < 0.5:  # per-key scores, as verl's trainer passes them
        K = int(rng.integers(1, 4))
        columns = []
        for _ in range(K):
            kind = _pick(rng, ["binary", "half", "normal"])
            if kind == "binary":
                columns.append(rng.integers(0, 2, size=B).astype(np.float64))
            elif kind == "half":
                columns.append(rng.integers(-4, 5, size=B) * 0.5)
            else:
                columns.append(rng.standard_normal(B) * _pick(rng, [0.1, 1.0, 10.0]))
        weights = _pick(rng, [None, K, K + 1])  # None: verl's default 1; K + 1: the extra one unused
        if weights is not None:
            weights = [float(_pick(rng, [1.0, 0.5, -0.25, 0.1, 2.0])) for _ in range(weights)]
        params.update(keys=K, weights=weights)
        case.inputs["gdpo_scores"] = np.stack(columns, axis=1)
    case.variant = name
    case.params.update(
        dtype=dtype_name, mask_dtype=mask_dtype, mask_kind=mask_kind, layout=layout, index=index_kind,
        rewards=rewards_kind, **params,
    )  # fmt: skip
    case.inputs.update(
        token_level_rewards=torch.from_numpy(rewards).to(DTYPES[dtype_name]),
        response_mask=torch.from_numpy(mask).to(MASK_DTYPES[mask_dtype]),
        index=index,
    )


def _discount(rng: np.random.Generator) -> float:
    d = _pick(rng, DISCOUNTS)
    return float(1.0 - rng.random()) if d == "random" else float(d)


def _scan_mask(rng: np.random.Generator, B: int, T: int) -> tuple[np.ndarray, str]:
    """``_mask``'s masks, and: multi-turn responses (right-padded, with holes:
    observation tokens, mask 0 inside the response), or a batch with exactly
    one valid token (verl's whitening raises there)."""
    if rng.random() < 0.04:
        m = np.zeros((B, T), dtype=bool)
        m[int(rng.integers(B)), int(rng.integers(T))] = True
        return m, "single"
    m, kind = _mask(rng, B, T)
    if kind in ("prefix", "full") and T >= 3 and rng.random() < 0.45:
        kind += "+holes"
        lengths = m.sum(-1)
        for i in range(B):
            L = int(lengths[i])
            for _ in range(int(rng.integers(0, 4)) if L >= 3 else 0):  # observation spans
                a = int(rng.integers(1, L))  # the response's first token stays valid
                m[i, a : min(L, a + int(rng.integers(1, max(2, L // 4) + 1)))] = False
    return m, kind


def draw_scan(rng: np.random.Generator, case: Case, name: str) -> None:
    """GAE, REINFORCE++ or ReMax: ragged (multi-turn) masks, outcome, dense or
    per-turn rewards, values (GAE) or baselines (ReMax), discounts from
    DISCOUNTS; T from 1 to a few hundred."""
    B = _dim(rng, 64)
    T = _dim(rng, 512)
    while B * T > 40_000:
        T = max(1, T // 2)
    dtype_name = _pick(rng, ["fp32", "fp64"], p=[0.6, 0.4])
    other = "fp64" if dtype_name == "fp32" else "fp32"
    mask_dtype = _pick(rng, ["fp32", "int64", "fp64", "bool"])
    mask, mask_kind = _scan_mask(rng, B, T)
    valid_rows = mask.any(-1)
    last = np.where(valid_rows, T - 1 - np.argmax(mask[:, ::-1], axis=-1), 0)  # last valid token (0 if none)

    scale = float(_pick(rng, [0.01, 1.0, 100.0]))
    rewards_kind = _pick(rng, ["outcome", "binary", "dense", "turns", "tied_int"], p=[0.3, 0.15, 0.25, 0.15, 0.15])
    rewards = np.zeros((B, T))
    if rewards_kind == "outcome":  # one score per response, on its last valid token
        rewards[np.arange(B), last] = rng.standard_normal(B) * scale
    elif rewards_kind == "binary":
        rewards[np.arange(B), last] = rng.integers(0, 2, size=B)
    elif rewards_kind == "dense":  # per-token rewards (a KL penalty, a PRM), masked positions included
        rewards = rng.standard_normal((B, T)) * scale
    elif rewards_kind == "turns":  # a score at the last token of every turn (before each hole)
        ends = mask & ~np.concatenate([mask[:, 1:], np.zeros((B, 1), dtype=bool)], axis=1)
        rewards = np.where(ends, rng.standard_normal((B, T)) * scale, 0.0)
    else:  # small integer scores, all rows equal half of the time (equal returns: variance 0)
        s = np.full(B, int(rng.integers(-3, 4))) if rng.random() < 0.5 else rng.integers(-3, 4, size=B)
        rewards[np.arange(B), last] = s

    params: dict[str, Any] = {}
    inputs: dict[str, Any] = {}
    if name == "gae":
        params.update(gamma=_discount(rng), lam=_discount(rng))
        values_kind = _pick(rng, ["normal", "offset", "garbage"], p=[0.5, 0.25, 0.25])
        values = rng.standard_normal((B, T)) * _pick(rng, [0.1, 1.0, scale])
        if values_kind == "offset":  # a common offset: the deltas nearly cancel
            values += _pick(rng, [-50.0, 5.0, 1e3])
        elif values_kind == "garbage":  # large values at masked positions: verl skips them
            values = np.where(mask, values, rng.standard_normal((B, T)) * 1e4)
        v_dtype = other if rng.random() < 0.15 else dtype_name
        params.update(values=values_kind, values_dtype=v_dtype)
        inputs["values"] = torch.from_numpy(values).to(DTYPES[v_dtype])
    elif name == "reinforce_plus_plus":
        params.update(gamma=_discount(rng))
    else:
        base_kind = _pick(rng, ["normal", "score", "zero"], p=[0.4, 0.45, 0.15])
        if base_kind == "normal":
            base = rng.standard_normal(B) * scale
        elif base_kind == "score":  # a greedy rollout's score: near each response's own
            base = (rewards * mask).sum(-1) + rng.standard_normal(B) * 0.1 * scale
        else:
            base = np.zeros(B)
        b_dtype = other if rng.random() < 0.15 else dtype_name
        params.update(baselines=base_kind, baselines_dtype=b_dtype)
        inputs["reward_baselines"] = torch.from_numpy(base).to(DTYPES[b_dtype])

    case.variant = name
    case.params.update(
        dtype=dtype_name, mask_dtype=mask_dtype, mask_kind=mask_kind, rewards=rewards_kind, scale=scale, **params,
        api=_pick(rng, ["functional", "core_algos"]), layout=_pick(rng, ["contiguous", "transposed", "strided"], p=[0.7, 0.15, 0.15]),
    )  # fmt: skip
    if mask_dtype == "bool" and name in WHITENED:
        case.params["verl_mask"] = "int64"  # verl's 1 - mask refuses bool: verl gets the same 0/1 as int64
    case.inputs.update(
        token_level_rewards=torch.from_numpy(rewards).to(DTYPES[dtype_name]),
        response_mask=torch.from_numpy(mask).to(MASK_DTYPES[mask_dtype]),
        **inputs,
    )


def draw_token_baseline(rng: np.random.Generator, case: Case, name: str) -> None:
    """The optimal token baselines: groups of 1 to 16 rows interleaved, the
    scans' masks (multi-turn holes, empty rows, a fully masked batch), outcome,
    dense or per-turn rewards, a policy's probabilities (``w >= 0``) or
    arbitrary ones (``w`` of either sign), garbage at masked positions, IS
    weights or none, the zero tail on or off. One float dtype for every data
    input (verl raises on most mixtures: test_token_baseline covers them)."""
    layout = _pick(rng, ["1", "2", "4", "16", "mixed"], p=[0.1, 0.15, 0.15, 0.2, 0.4])
    if layout == "mixed":
        sizes = [int(s) for s in rng.choice([1, 2, 3, 4, 5, 8, 16], size=int(rng.integers(1, 13)))]
    else:
        sizes = [int(layout)] * int(rng.integers(1, max(2, 64 // int(layout)) + 1))
    B = sum(sizes)
    T = _dim(rng, 512)
    while B * T > 40_000:
        T = max(1, T // 2)
    labels = rng.permutation(np.repeat(np.arange(len(sizes)), sizes))
    index_kind = _pick(rng, ["uid", "int", "list"])
    if index_kind == "int":
        index: Any = (labels * 7919 + 3).astype(np.int64)
    else:
        uids = [str(uuid.UUID(int=int(rng.integers(1 << 62)))) for _ in sizes]
        index = np.array([uids[g] for g in labels], dtype=object)
        if index_kind == "list":
            index = index.tolist()
    dtype_name = _pick(rng, ["fp32", "fp64"], p=[0.6, 0.4])
    dtype = DTYPES[dtype_name]
    mask_dtype = _pick(rng, ["fp32", "int64", "fp64", "bool"])
    mask, mask_kind = _scan_mask(rng, B, T)
    valid_rows = mask.any(-1)
    last = np.where(valid_rows, T - 1 - np.argmax(mask[:, ::-1], axis=-1), 0)

    scale = float(_pick(rng, [0.01, 1.0, 100.0]))
    rewards_kind = _pick(rng, ["outcome", "binary", "dense", "turns"], p=[0.35, 0.2, 0.25, 0.2])
    rewards = np.zeros((B, T))
    if rewards_kind == "outcome":
        rewards[np.arange(B), last] = rng.standard_normal(B) * scale
    elif rewards_kind == "binary":
        rewards[np.arange(B), last] = rng.integers(0, 2, size=B)
    elif rewards_kind == "dense":
        rewards = rng.standard_normal((B, T)) * scale
    else:
        ends = mask & ~np.concatenate([mask[:, 1:], np.zeros((B, 1), dtype=bool)], axis=1)
        rewards = np.where(ends, rng.standard_normal((B, T)) * scale, 0.0)

    probs_kind = _pick(rng, ["policy", "peaked", "arbitrary"], p=[0.55, 0.3, 0.15])
    if probs_kind == "arbitrary":  # not a distribution: w of either sign, small sums
        old = rng.uniform(-6.0, 0.5, size=(B, T))
        sp = rng.uniform(0.0, 1.0, size=(B, T))
    else:
        p = rng.uniform(0.01, 1.0, size=(B, T)) if probs_kind == "policy" else 1.0 - rng.uniform(0, 1e-3, size=(B, T))
        old = np.log(p)
        sp = p * p + rng.uniform(0, 1, size=(B, T)) * (1 - p) ** 2
    if rng.random() < 0.3:  # padding values at masked positions
        old = np.where(mask, old, _pick(rng, [0.0, -1e4, 3.0]))
    inputs: dict[str, Any] = dict(old_log_probs=torch.from_numpy(old).to(dtype), sum_pi_squared=torch.from_numpy(sp).to(dtype))
    is_kind = _pick(rng, ["none", "weights"], p=[0.5, 0.5])
    if is_kind == "weights":
        inputs["rollout_is_weights"] = torch.from_numpy(rng.uniform(0.2, 2.0, size=(B, T))).to(dtype)
    case.variant = name
    case.params.update(
        dtype=dtype_name, mask_dtype=mask_dtype, mask_kind=mask_kind, layout=layout, index=index_kind,
        rewards=rewards_kind, scale=scale, probs=probs_kind, is_weights=is_kind,
        handle_zero_tail=bool(rng.random() < 0.7), epsilon=float(_pick(rng, [1e-8, 1e-6], p=[0.8, 0.2])),
        api=_pick(rng, ["functional", "core_algos"]),
    )  # fmt: skip
    case.inputs.update(
        token_level_rewards=torch.from_numpy(rewards).to(dtype),
        response_mask=torch.from_numpy(mask).to(MASK_DTYPES[mask_dtype]),
        index=index,
        **inputs,
    )


DRAW: dict[str, Callable[[np.random.Generator, Case], None]] = {
    "policy": draw_policy, "policy_rule": draw_policy_rule, "policy_geo": draw_policy_geo, "policy_cov": draw_policy_cov,
    "policy_bypass": draw_policy_bypass, "agg_loss": draw_agg_loss, "kl_penalty": draw_kl, "advantage": draw_advantage,
    "value_loss": draw_value_loss,
}  # fmt: skip


def make_case(seed: int, index: int) -> Case:
    """The case ``(seed, index)``: a pure function of the two numbers."""
    rng = np.random.default_rng([seed, index])
    op = OPS[int(rng.choice(len(OPS), p=OP_WEIGHTS))]
    case = Case(seed, index, op, "")
    DRAW[op](rng, case)
    if op in ("policy", "policy_rule", "policy_geo", "policy_cov"):
        case.variant = case.params["mode"]
    elif op == "policy_bypass":
        case.variant = case.params["loss_type"]
    return case


# --------------------------------------------------------------------------- comparison

#: Names of the outputs compared, per op (scalars are 0-d tensors; None where
#: there is no such output, e.g. no gradient for a constant input).
Outputs = dict[str, Optional[torch.Tensor]]


@dataclass
class Tol:
    """``torch.testing.assert_close`` tolerance; ``overflow``: a half dtype the
    output is rounded to, where verl's fp32 value overflowing it must give the
    same infinity."""

    rtol: float
    atol: float
    overflow: Optional[torch.dtype] = None
    atol_of_max: float = 0.0  # added to atol: this fraction of the reference's largest |element|


@dataclass
class Outcome:
    cls: str  # one of CLASSES
    problems: list[str] = field(default_factory=list)  # what differs (mismatch) or what was excused
    tie_tokens: int = 0
    outputs: list[str] = field(default_factory=list)  # the outputs that differ ("grad", "loss", ...)


def _relayout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values in another memory layout (luspo-rs reads them through strides)."""
    if layout == "transposed" and t.dim() == 2:
        return t.t().contiguous().t()
    if layout == "strided" and t.dim() >= 1:
        view = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)[..., ::2]
        view.copy_(t)
        return view
    return t


def _leaf(t: torch.Tensor, layout: str = "contiguous") -> torch.Tensor:
    return _relayout(t.detach().clone(), layout).requires_grad_(True)


def _cast(t: Any, precision: str) -> Any:
    """A float input for verl at ``precision``: "native" (as drawn), "fp32"
    (half types upcast: the reference of the half-precision rule) or "fp64"
    (every float upcast: verl's own formula without its float32 rounding)."""
    if not isinstance(t, torch.Tensor) or not t.is_floating_point():
        return t
    if precision == "fp64":
        return t.double()
    if precision == "fp32" and t.dtype in HALF:
        return t.float()
    return t


def _agree(got: torch.Tensor, want: torch.Tensor, tol: Tol) -> Optional[torch.Tensor]:
    """Elementwise ``assert_close`` (NaN equals NaN); None if the shapes differ."""
    if tuple(got.shape) != tuple(want.shape):
        return None
    g, w = got.detach().double(), want.detach().double()
    atol = tol.atol
    if tol.atol_of_max and w.numel():
        atol += tol.atol_of_max * w.abs().nan_to_num(posinf=0.0, neginf=0.0).max().item()
    ok = torch.isclose(g, w, rtol=tol.rtol, atol=atol, equal_nan=True)
    if tol.overflow is not None:
        r = want.detach().to(tol.overflow).double()
        over = torch.isinf(r) & ~torch.isinf(w)
        ok = torch.where(over, got.detach().to(tol.overflow).double() == r, ok)
    return ok


def _diff(what: str, got: torch.Tensor, want: torch.Tensor, ok: torch.Tensor) -> str:
    a, e = got.detach().double(), want.detach().double()
    if a.dim() == 0:
        return f"{what}: ours {a.item():.9g} verl {e.item():.9g} (|diff| {abs(a.item() - e.item()):.3g})"
    bad = (~ok).nonzero()
    first = tuple(bad[0].tolist())
    err = (a - e).abs()[~ok]
    return (
        f"{what}: {len(bad)}/{ok.numel()} elements differ, max |diff| {err.max().item():.3g}; "
        f"first at {first}: ours {a[first].item():.9g} verl {e[first].item():.9g}"
    )


def _call(fn: Callable[[], Any]) -> tuple[Any, Optional[BaseException]]:
    try:
        return fn(), None
    except Exception as e:  # noqa: BLE001 - any failure is data for the triage
        return None, e


def _norm_kwargs(case: Case) -> dict[str, Any]:
    norms = {k.removeprefix("norm_"): v for k, v in case.params.items() if k.startswith("norm_")}
    return _materialise_norms(norms, case.params.get("tensor_norms", {}))


def _scalar(v: float) -> torch.Tensor:
    return torch.tensor(v, dtype=torch.float64)


# ---- policy losses


def _clip_kwargs(p: dict) -> dict[str, Any]:
    return dict(clip_ratio=p["clip_ratio"], clip_ratio_low=p["clip_ratio_low"], clip_ratio_high=p["clip_ratio_high"])


def policy_verl(case: Case, precision: str) -> Outputs:
    """verl's registered loss (LUSPO: its GSPO aggregated seq-mean-token-sum);
    per-sequence advantages / weights broadcast to (B, T) as verl expects them."""
    p, x = case.params, case.inputs
    mode, dtype = p["mode"], DTYPES[p["dtype"]]
    old, lp, adv, w = (_cast(x.get(k), precision) for k in ("old_log_prob", "log_prob", "advantages", "rollout_is_weights"))
    mask = x["response_mask"]
    B, T = lp.shape
    adv = adv[:, None].expand(B, T) if adv.dim() == 1 else adv
    w = None if w is None else (w[:, None].expand(B, T) if w.dim() == 1 else w)
    cfg = verl_config(**_clip_kwargs(p), clip_ratio_c=p["clip_ratio_c"], **_norm_kwargs(case))
    fn = verl_ca.get_policy_loss_fn("vanilla" if mode == "vanilla" else "gspo")
    agg = "seq-mean-token-sum" if mode == "luspo" else p["loss_agg_mode"]
    xr = _leaf(lp)
    loss, metrics = fn(old, xr, adv, mask, loss_agg_mode=agg, config=cfg, rollout_is_weights=w)
    (loss * p["grad_out"]).backward()
    grad = xr.grad.to(dtype) if dtype in HALF and precision != "native" else xr.grad  # half rule: rounded to the type
    return {"loss": loss.detach(), "grad": grad, **{k.removeprefix("actor/"): _scalar(v) for k, v in metrics.items()}}


def policy_ours(case: Case) -> Outputs:
    """The public function or the verl-signature adapter, inputs in the drawn layout."""
    p, x = case.params, case.inputs
    mode, lay = p["mode"], p["layout"]
    xo = _leaf(x["log_prob"], lay)
    args = (_relayout(x["old_log_prob"], lay), xo, _relayout(x["advantages"], lay), _relayout(x["response_mask"], lay))
    w = x.get("rollout_is_weights")
    w = None if w is None else _relayout(w, lay)
    if p["api"] == "functional":
        loss, metrics = luspo_rs.policy_loss(
            *args, mode=mode, loss_agg_mode=p["loss_agg_mode"], **_clip_kwargs(p), clip_ratio_c=p["clip_ratio_c"],
            rollout_is_weights=w, **_norm_kwargs(case),
        )  # fmt: skip
        metrics = {k: _scalar(v.item()) for k, v in metrics.items()}
    else:
        cfg = verl_config(**_clip_kwargs(p), clip_ratio_c=p["clip_ratio_c"], **_norm_kwargs(case))
        fn = getattr(ours_ca, f"compute_policy_loss_{mode}")
        loss, metrics = fn(*args, loss_agg_mode=p["loss_agg_mode"], config=cfg, rollout_is_weights=w)
        metrics = {k.removeprefix("actor/"): _scalar(v) for k, v in metrics.items()}
    (loss * p["grad_out"]).backward()
    return {"loss": loss.detach(), "grad": xo.grad, **metrics}


def policy_tols(case: Case) -> dict[str, Tol]:
    dtype = DTYPES[case.params["dtype"]]
    metric = Tol(0.0, METRIC_ATOL)
    if dtype in HALF:
        loss, grad = Tol(**HALF_LOSS_TOL, overflow=dtype), Tol(**HALF_GRAD_TOL)
    else:
        loss = grad = Tol(**TOLERANCES[dtype])
    return {"loss": loss, "grad": grad, "pg_clipfrac": metric, "ppo_kl": metric, "pg_clipfrac_lower": metric}


def verl_ratio(mode: str, old: torch.Tensor, lp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The importance ratio of every token as verl computes it (its own ops)."""
    d = lp - old
    if mode == "vanilla":
        return torch.exp(torch.clamp(d, min=-20.0, max=20.0))
    L = torch.sum(mask, dim=-1).clamp(min=1)
    seq = torch.sum(d * mask, dim=-1) / L
    return torch.exp(torch.clamp(seq, max=10.0))[:, None].expand_as(d)


def _tie_window(b: float, dtype: torch.dtype, ulps: int = TIE_ULPS) -> float:
    """``ulps`` units of ``max(eps, ulp(b))`` in ``dtype``: "an ulp or two" of the
    bound, and for bounds below 2 exactly the 2 eps of
    test_gradient_differs_from_verl_only_at_clip_bound_ties."""
    b_t = torch.tensor(b, dtype=dtype)
    ulp = (torch.nextafter(b_t, torch.tensor(math.inf, dtype=dtype)) - b_t).item()
    return ulps * max(torch.finfo(dtype).eps, ulp)


def near_bound(ratio: torch.Tensor, mask: torch.Tensor, bounds, ulps: int = TIE_ULPS) -> torch.Tensor:
    """Valid tokens whose ratio lies within the tie window of one of ``bounds``
    (each in the ratio's dtype, as verl's clamp compares them)."""
    r = ratio.double()
    near = torch.zeros(r.shape, dtype=torch.bool)
    for b in bounds:
        near |= (r - torch.tensor(b, dtype=ratio.dtype).double()).abs() <= _tie_window(b, ratio.dtype, ulps)
    return near & (mask.double() != 0)


#: Metrics that are fractions of valid tokens: rounding can only flip whole tokens.
COUNT_METRICS = ("pg_clipfrac", "pg_clipfrac_lower")


def _whole_token_flips(got: float, want: float, mask: torch.Tensor) -> int:
    """How many whole valid tokens a fraction-of-valid-tokens metric differs
    by: ``|got - want| * #valid`` if that is an integer (up to the metric
    tolerance), else -1."""
    n_valid = float(mask.double().sum())
    k = abs(got - want) * n_valid
    return round(k) if abs(k - round(k)) <= METRIC_ATOL * max(n_valid, 1.0) else -1


def policy_ties(case: Case, got: Outputs, ref: Outputs, off: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """Elements of ``off`` a tie explains, by class.

    ``known_tie`` (the README's exception), at valid tokens whose ratio (as
    verl computes it) is within TIE_ULPS ulps of ``1 - clip_ratio_low`` or
    ``1 + clip_ratio_high`` (see ``_tie_window``):

    * the gradient: ours is verl's x2, x1/2 or 0, or verl's is 0;
    * ``pg_clipfrac``: the same rounding decides whether verl's
      ``gt(pg_losses2, pg_losses1)`` counts such a token, so it may differ by
      whole tokens, at most as many as there are.

    The window is WIDE_TIE_ULPS for GSPO / LUSPO's sequence ratio, at
    vanilla's dual-clip bound ``clip_ratio_c`` (tokens with a negative
    advantage; the gradient and ``pg_clipfrac_lower``) and at GSPO's clamp of
    the sequence log-ratio at 10 (every valid token of the row).

    ``undocumented_tie``: vanilla's token ratio within WIDE_TIE_ULPS but not
    TIE_ULPS ulps of the clip bounds.
    """
    p, x = case.params, case.inputs
    if not ({"grad", "pg_clipfrac", "pg_clipfrac_lower"} & set(off)):
        return {}
    dtype = DTYPES[p["dtype"]]
    prec = "fp32" if dtype in HALF else "native"
    mask = x["response_mask"]
    old, lp, adv = (_cast(x[k], prec) for k in ("old_log_prob", "log_prob", "advantages"))
    lo = 1 - (p["clip_ratio_low"] if p["clip_ratio_low"] is not None else p["clip_ratio"])
    hi = 1 + (p["clip_ratio_high"] if p["clip_ratio_high"] is not None else p["clip_ratio"])
    ratio = verl_ratio(p["mode"], old, lp, mask)
    near = near_bound(ratio, mask, (lo, hi))
    near_wide = near_bound(ratio, mask, (lo, hi), WIDE_TIE_ULPS)
    near_c = torch.zeros_like(near)
    near_10 = torch.zeros_like(near)
    if p["mode"] == "vanilla":  # the dual clip min(l, -A c) acts where A < 0
        negative = (adv[:, None] if adv.dim() == 1 else adv).expand_as(ratio) < 0
        near_c = near_bound(ratio, mask, (p["clip_ratio_c"],), WIDE_TIE_ULPS) & negative
    else:
        # GSPO / LUSPO: the sequence mean is rounded differently on each side
        near = near_wide
        d = lp - old
        seq = torch.sum(d * mask, dim=-1) / torch.sum(mask, dim=-1).clamp(min=1)
        rows = (seq.double() - 10.0).abs() <= _tie_window(10.0, seq.dtype, WIDE_TIE_ULPS)
        near_10 = rows[:, None].expand_as(near) & (mask.double() != 0)
    out: dict[str, dict[str, torch.Tensor]] = {"known_tie": {}, "undocumented_tie": {}}
    if "grad" in off:
        g, e, tol = got["grad"].double(), ref["grad"].double(), policy_tols(case)["grad"]
        factor = _agree(g, 2 * e, tol) | _agree(g, 0.5 * e, tol) | (g == 0) | (e == 0)
        out["known_tie"]["grad"] = (near | near_c | near_10) & factor
        out["undocumented_tie"]["grad"] = near_wide & factor
    if "pg_clipfrac" in off:
        flips = _whole_token_flips(got["pg_clipfrac"].item(), ref["pg_clipfrac"].item(), mask)
        out["known_tie"]["pg_clipfrac"] = torch.tensor(0 < flips <= int(near.sum()))
        out["undocumented_tie"]["pg_clipfrac"] = torch.tensor(0 < flips <= int(near_wide.sum()))
    if "pg_clipfrac_lower" in off:
        flips = _whole_token_flips(got["pg_clipfrac_lower"].item(), ref["pg_clipfrac_lower"].item(), mask)
        out["known_tie"]["pg_clipfrac_lower"] = torch.tensor(0 < flips <= int(near_c.sum()))
    return out


# ---- token-rule policy losses (issue 17)


def rule_verl_fn(mode: str) -> Callable[..., Any]:
    """verl's function for a token-rule mode (REINFORCE: bypass mode's loss,
    not registered under its own name)."""
    return verl_ca.compute_policy_loss_reinforce if mode == "reinforce" else verl_ca.get_policy_loss_fn(mode)


def _rule_config(case: Case) -> Any:
    from verl.workers.config import ActorConfig, PolicyLossConfig

    p = case.params
    cfg = ActorConfig(
        strategy="fsdp", **_clip_kwargs(p), clip_ratio_c=p["clip_ratio_c"], ppo_micro_batch_size_per_gpu=1, rollout_n=1,
        tau_pos=p["tau_pos"], tau_neg=p["tau_neg"], policy_loss=PolicyLossConfig(dro_beta=p["dro_beta"]),
    )  # fmt: skip
    cfg.global_batch_info.update(_norm_kwargs(case))
    return cfg


def rule_verl(case: Case, precision: str) -> Outputs:
    """verl's own function; per-sequence advantages / weights broadcast to (B, T)."""
    p, x = case.params, case.inputs
    dtype = DTYPES[p["dtype"]]
    old, lp, adv, w = (_cast(x.get(k), precision) for k in ("old_log_prob", "log_prob", "advantages", "rollout_is_weights"))
    mask = x["response_mask"]
    B, T = lp.shape
    adv = adv[:, None].expand(B, T) if adv.dim() == 1 else adv.expand(B, T)
    w = None if w is None else (w[:, None].expand(B, T) if w.dim() == 1 else w.expand(B, T))
    xr = _leaf(lp)
    fn = rule_verl_fn(p["mode"])
    loss, metrics = fn(old, xr, adv, mask, loss_agg_mode=p["loss_agg_mode"], config=_rule_config(case), rollout_is_weights=w)
    (loss * p["grad_out"]).backward()
    grad = xr.grad.to(dtype) if dtype in HALF and precision != "native" else xr.grad
    return {"loss": loss.detach(), "grad": grad, **{k.removeprefix("actor/"): _scalar(v) for k, v in metrics.items()}}


def rule_ours(case: Case) -> Outputs:
    p, x = case.params, case.inputs
    lay = p["layout"]
    xo = _leaf(x["log_prob"], lay)
    args = (_relayout(x["old_log_prob"], lay), xo, _relayout(x["advantages"], lay), _relayout(x["response_mask"], lay))
    w = x.get("rollout_is_weights")
    loss, metrics = luspo_rs.policy_loss(
        *args, mode=p["mode"], loss_agg_mode=p["loss_agg_mode"], **_clip_kwargs(p), clip_ratio_c=p["clip_ratio_c"],
        rollout_is_weights=None if w is None else _relayout(w, lay), tau_pos=p["tau_pos"], tau_neg=p["tau_neg"],
        dro_beta=p["dro_beta"], **_norm_kwargs(case),
    )  # fmt: skip
    (loss * p["grad_out"]).backward()
    return {"loss": loss.detach(), "grad": xo.grad, **{k: _scalar(v.item()) for k, v in metrics.items()}}


def dppo_near(case: Case) -> tuple[torch.Tensor, torch.Tensor]:
    """DPPO's rounding-decided tokens: ``(valid, trunc)``, the valid tokens
    whose keep/drop decision or whose truncation ``ratio > clip_ratio_c`` the
    last bits of ``exp`` / ``log`` can flip.

    Kept or dropped: TV compares ``p - p_old`` (``p = exp(lp)``) with
    ``high`` and ``-low``, within 4 ulps of ``|p| + |p_old|``; KL compares
    the binary KL with ``high`` / ``low``, within 4 times its first-order
    rounding error (``(1 - p_old) ln((1 - p_old + 1e-8) / (1 - p + 1e-8))``
    amplifies ``exp``'s ulp by ``1 / (1 - p)`` where ``p`` nears 1), and
    ``p`` with ``p_old``, within 2 ulps. Truncated: the ratio within
    TIE_ULPS of ``clip_ratio_c``."""
    p_, x = case.params, case.inputs
    dtype = DTYPES[p_["dtype"]]
    eps = torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps
    old, lp = x["old_log_prob"].double(), x["log_prob"].double()
    mask = x["response_mask"].double() != 0
    low = p_["clip_ratio_low"] if p_["clip_ratio_low"] is not None else p_["clip_ratio"]
    high = p_["clip_ratio_high"] if p_["clip_ratio_high"] is not None else p_["clip_ratio"]
    p, po = lp.exp(), old.exp()
    if p_["mode"] == "dppo_tv":
        err = 4 * eps * (p.abs() + po.abs())
        moved = p - po
        near = ((moved - high).abs() <= err) | ((moved + low).abs() <= err)
    else:
        t1 = po * (old - lp)
        q = (1 - po + 1e-8) / (1 - p + 1e-8)
        t2 = (1 - po) * q.log()
        amp = p.abs() / (1 - p + 1e-8).abs() + po.abs() / (1 - po + 1e-8).abs() + 2 + q.log().abs()
        err = 4 * eps * (t1.abs() + (old - lp).abs() * po + t2.abs() + (1 - po).abs() * amp + po * q.log().abs())
        bkl = t1 + t2
        near = ((bkl - high).abs() <= err) | ((bkl - low).abs() <= err)
        near |= (p - po).abs() <= 2 * eps * torch.maximum(p, po)
    prec = "fp32" if dtype in HALF else "native"
    ratio = verl_ratio("vanilla", _cast(x["old_log_prob"], prec), _cast(x["log_prob"], prec), x["response_mask"])
    trunc = near_bound(ratio, x["response_mask"], (p_["clip_ratio_c"],))
    return near & mask, trunc


def rule_gradient_rounding(case: Case, got: Outputs) -> torch.Tensor:
    """The tokens where ours is within the float32 forward-error bound of a
    gradient that is ill-conditioned where both sides compute it as torch's
    chain does, ``|ours - exact| <= 8 u c`` (``exact``: verl's formula on
    float64 upcasts; ``u`` the unit roundoff of the token math); such a token
    is ``rounding``, not a tie:

    * DRO, ``s (beta (lp - old) - A)``: the two terms nearly cancel where
      ``A ~ beta (lp - old)``; ``c = (|A| + |beta (lp - old)|) |s|``, ``s``
      the token's scale (the aggregation's coefficient times its IS weight
      and the backward seed: minus verl's GPG gradient for ``A = 1``);
    * SAPO, ``... (1 - y) y tau r`` with ``y = sigmoid(tau (r - 1))``:
      ``1 - y`` loses ``y / (1 - y)`` of its bits to the rounding of ``y``
      (and ``tau r`` to the ratio's) where the gate saturates;
      ``c = |exact| (1 + y / (1 - y) + tau r)``."""
    p, x = case.params, case.inputs
    dtype = DTYPES[p["dtype"]]
    u = 2.0**-53 if dtype == torch.float64 else 2.0**-24
    exact = rule_verl(case, "fp64")["grad"].double()
    B, T = x["log_prob"].shape
    adv = x["advantages"].double()
    adv = adv[:, None].expand(B, T) if adv.dim() == 1 else adv.expand(B, T)
    d = x["log_prob"].double() - x["old_log_prob"].double()
    if p["mode"] == "dro":
        unit = Case(case.seed, case.index, case.op, "gpg", {**p, "mode": "gpg"},
                    {**x, "advantages": torch.ones_like(x["advantages"])})  # fmt: skip
        scale = rule_verl(unit, "fp64")["grad"].double().abs()
        cond = (adv.abs() + (p["dro_beta"] * d).abs()) * scale
    else:
        r = d.clamp(-20.0, 20.0).exp()
        tau = torch.where(adv > 0, p["tau_pos"], p["tau_neg"]).double()
        y = torch.sigmoid(tau * (r - 1))
        cond = exact.abs() * (1 + y / (1 - y) + tau * r)
    bound = 8 * u * cond
    if dtype in HALF:  # and the output's rounding to the half type
        bound = bound + torch.finfo(dtype).eps * exact.abs()
    return (got["grad"].double() - exact).abs() <= bound


def rule_ties(case: Case, got: Outputs, ref: Outputs, off: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """Elements of ``off`` a rounding-decided comparison explains
    (``known_tie``), or DRO's and SAPO's ill-conditioned gradients
    (``rounding``, see ``rule_gradient_rounding``): CISPO's ``pg_clipfrac`` (``ratio != clip(ratio)``) by
    whole tokens whose ratio is within TIE_ULPS of a clip bound (its
    gradient takes the clipped ratio as a constant: no jump); DPPO's
    gradient where a token kept on one side is dropped on the other (ours or
    verl's is 0) at the tokens of ``dppo_near``, and its clip fractions by
    whole such tokens."""
    p, x = case.params, case.inputs
    mask = x["response_mask"]
    out: dict[str, dict[str, torch.Tensor]] = {"known_tie": {}}
    if p["mode"] in ("dro", "sapo") and "grad" in off:
        out["rounding"] = {"grad": rule_gradient_rounding(case, got)}
    if p["mode"] == "cispo" and "pg_clipfrac" in off:
        dtype = DTYPES[p["dtype"]]
        prec = "fp32" if dtype in HALF else "native"
        lo = 1 - (p["clip_ratio_low"] if p["clip_ratio_low"] is not None else p["clip_ratio"])
        hi = 1 + (p["clip_ratio_high"] if p["clip_ratio_high"] is not None else p["clip_ratio"])
        ratio = verl_ratio("vanilla", _cast(x["old_log_prob"], prec), _cast(x["log_prob"], prec), mask)
        near = near_bound(ratio, mask, (lo, hi))
        flips = _whole_token_flips(got["pg_clipfrac"].item(), ref["pg_clipfrac"].item(), mask)
        out["known_tie"]["pg_clipfrac"] = torch.tensor(0 < flips <= int(near.sum()))
    elif p["mode"] in ("dppo_tv", "dppo_kl"):
        valid, trunc = dppo_near(case)
        if "loss" in off:  # by at most the losses of those tokens, aggregated as verl does
            prec = "fp32" if DTYPES[p["dtype"]] in HALF else "native"
            old, lp, adv, w = (_cast(x.get(k), prec) for k in ("old_log_prob", "log_prob", "advantages", "rollout_is_weights"))
            B, T = lp.shape
            adv = adv[:, None].expand(B, T) if adv.dim() == 1 else adv.expand(B, T)
            w = torch.ones(B, T) if w is None else (w[:, None].expand(B, T) if w.dim() == 1 else w.expand(B, T))
            r = torch.exp(torch.clamp(lp.double() - old.double(), -20.0, 20.0)).clamp(max=p["clip_ratio_c"])
            terms = (adv.double() * r * lp.double() * w.double()).abs() * valid
            bound = verl_ca.agg_loss(terms, mask, p["loss_agg_mode"], **_norm_kwargs(case)).abs().item()
            want = ref["loss"].double().item()
            tol = policy_tols(case)["loss"]
            diff = abs(got["loss"].double().item() - want)
            out["known_tie"]["loss"] = torch.tensor(diff <= tol.atol + tol.rtol * abs(want) + 1.01 * bound)
        if "grad" in off:
            g, e = got["grad"].double(), ref["grad"].double()
            out["known_tie"]["grad"] = valid & ((g == 0) | (e == 0))
        for name, n in (("pg_clipfrac", int(valid.sum())), ("pg_clipfrac_lower", int((valid | trunc).sum()))):
            if name in off:
                flips = _whole_token_flips(got[name].item(), ref[name].item(), mask)
                out["known_tie"][name] = torch.tensor(0 < flips <= n)
    return out


def rule_magnitudes(case: Case, precision: str) -> dict[str, float]:
    """As policy_magnitudes, for verl's token-rule function."""
    agg, captured = verl_ca.agg_loss, {}

    def spy(loss_mat, loss_mask, loss_agg_mode, *args, **kwargs):
        captured["loss"] = agg(loss_mat.detach().double().abs(), loss_mask, loss_agg_mode, *args, **kwargs).item()
        return agg(loss_mat, loss_mask, loss_agg_mode, *args, **kwargs)

    with _patched(verl_ca, "agg_loss", spy):
        rule_verl(case, precision)
    x = case.inputs
    d = (_cast(x["log_prob"], precision) - _cast(x["old_log_prob"], precision)).double().abs()
    captured["ppo_kl"] = verl_ca.verl_F.masked_mean(d, x["response_mask"]).item()
    return captured


def rule_exact(case: Case, precision: str) -> list[Outputs]:
    """As policy_exact: verl on float64 upcasts, and verl with float64 sums."""
    with verl_accumulating_in_fp64():
        acc64 = rule_verl(case, precision)
    return _upcast_exact(rule_verl)(case, precision) + [acc64]


# ---- GMPO, Clip-Cov / KL-Cov, bypass mode (issue 17)


def _bt(t: Optional[torch.Tensor], B: int, T: int) -> Optional[torch.Tensor]:
    """A per-row ``(B,)`` / ``(B, 1)`` tensor expanded to the ``(B, T)`` verl's functions take."""
    if t is None:
        return None
    return (t[:, None] if t.dim() == 1 else t).expand(B, T).contiguous()


def _metrics(metrics: dict[str, Any]) -> dict[str, torch.Tensor]:
    return {k.removeprefix("actor/"): _scalar(float(v)) for k, v in metrics.items()}


def _ours_metric_keys(case: Case, ref: set[str]) -> set[str]:
    """verl's keys; the verl-signature adapters add the length diagnostics."""
    return ref | LEN_KEYS if case.params.get("api", "core_algos") == "core_algos" else ref


#: The length diagnostics the verl-signature adapters add to verl's metrics (test_cov_losses.LEN_KEYS).
LEN_KEYS = {k.removeprefix("actor/") for k in COV_LEN_KEYS}


def geo_verl(case: Case, precision: str) -> Outputs:
    p, x = case.params, case.inputs
    dtype = DTYPES[p["dtype"]]
    old, lp, adv, w = (_cast(x.get(k), precision) for k in ("old_log_prob", "log_prob", "advantages", "rollout_is_weights"))
    B, T = lp.shape
    xr = _leaf(lp)
    cfg = verl_config(**_clip_kwargs(p), **_norm_kwargs(case))
    loss, metrics = verl_ca.compute_policy_loss_geo_mean(
        old, xr, _bt(adv, B, T), x["response_mask"], loss_agg_mode=p["loss_agg_mode"], config=cfg,
        rollout_is_weights=_bt(w, B, T),
    )  # fmt: skip
    (loss * p["grad_out"]).backward()
    grad = xr.grad.to(dtype) if dtype in HALF and precision != "native" else xr.grad
    return {"loss": loss.detach(), "grad": grad, **_metrics(metrics)}


def geo_ours(case: Case) -> Outputs:
    p, x = case.params, case.inputs
    lay = p["layout"]
    xo = _leaf(x["log_prob"], lay)
    args = (_relayout(x["old_log_prob"], lay), xo, _relayout(x["advantages"], lay), _relayout(x["response_mask"], lay))
    w = x.get("rollout_is_weights")
    w = None if w is None else _relayout(w, lay)
    if p["api"] == "functional":
        loss, metrics = luspo_rs.policy_loss(
            *args, mode="geo_mean", loss_agg_mode=p["loss_agg_mode"], **_clip_kwargs(p), rollout_is_weights=w,
            **_norm_kwargs(case),
        )  # fmt: skip
        metrics = {k: _scalar(v.item()) for k, v in metrics.items()}
    else:
        cfg = verl_config(**_clip_kwargs(p), **_norm_kwargs(case))
        loss, metrics = ours_ca.compute_policy_loss_geo_mean(*args, loss_agg_mode=p["loss_agg_mode"], config=cfg,
                                                             rollout_is_weights=w)  # fmt: skip
        metrics = _metrics(metrics)
    (loss * p["grad_out"]).backward()
    return {"loss": loss.detach(), "grad": xo.grad, **metrics}


def geo_tols(case: Case) -> dict[str, Tol]:
    """test_geo_mean's: the inputs' tolerance (conftest), for 16-bit inputs
    verl on float32 upcasts, the loss (float32) to rtol 1e-5 / atol 1e-6 and
    the gradient rounded to the half type (test_half_precision_inputs)."""
    dtype = DTYPES[case.params["dtype"]]
    metric = Tol(0.0, METRIC_ATOL)
    if dtype in HALF:
        loss, grad = Tol(rtol=1e-5, atol=1e-6), Tol(**HALF_GRAD_TOL)
    else:
        loss = grad = Tol(**TOLERANCES[dtype])
    return {"loss": loss, "grad": grad, "pg_clipfrac": metric, "ppo_kl": metric, "pg_clipfrac_lower": metric}


def geo_magnitudes(case: Case, precision: str) -> dict[str, float]:
    """sum|terms| of GMPO's loss (the mean of the rows' ``|pg_i|``: verl's
    ``torch.mean`` spied on) and of ``ppo_kl``."""
    mean, captured = torch.mean, {}

    def spy(t, *args, **kwargs):
        if isinstance(t, torch.Tensor) and t.dim() == 1 and not args and not kwargs:
            captured["loss"] = mean(t.detach().double().abs()).item()
        return mean(t, *args, **kwargs)

    with _patched(torch, "mean", spy):
        geo_verl(case, precision)
    x = case.inputs
    d = (_cast(x["log_prob"], precision) - _cast(x["old_log_prob"], precision)).double().abs()
    captured["ppo_kl"] = verl_ca.verl_F.masked_mean(d, x["response_mask"]).item()
    return captured


def geo_f64_mask_flips(case: Case) -> torch.Tensor:
    """The valid tokens whose GMPO clip decision a float64 mask would flip if
    ``d = lp - old`` and its bounds were taken in float64: verl computes them
    in the inputs' type (float32 for 16/32-bit inputs, the bounds rounded to
    it) and promotes only at the mask products, and so does luspo-rs
    (``PolicyLossProblem::geo_narrow``). None without a float64 mask, or for
    float64 inputs. (The regression test of that fix reads them.)"""
    p, x = case.params, case.inputs
    mask = x["response_mask"]
    if mask.dtype != torch.float64 or DTYPES[p["dtype"]] == torch.float64:
        return torch.zeros(mask.shape, dtype=torch.bool)
    low, high = _low_high(p)
    old, lp = (_cast(x[k], "fp32") for k in ("old_log_prob", "log_prob"))
    d32 = lp - old
    verl_clipped = d32 != torch.clamp(d32, -low, high)
    d64 = lp.double() - old.double()
    ours_clipped = (d64 < -low) | (d64 > high)
    return (verl_clipped != ours_clipped) & (mask != 0)


def _spied_magnitudes(verl_fn: Callable[[Case, str], Outputs]) -> Callable[[Case, str], dict[str, float]]:
    """As rule_magnitudes, for any verl function aggregating with ``agg_loss``."""

    def magnitudes(case: Case, precision: str) -> dict[str, float]:
        agg, captured = verl_ca.agg_loss, {}

        def spy(loss_mat, loss_mask, loss_agg_mode, *args, **kwargs):
            captured["loss"] = agg(loss_mat.detach().double().abs(), loss_mask, loss_agg_mode, *args, **kwargs).item()
            return agg(loss_mat, loss_mask, loss_agg_mode, *args, **kwargs)

        with _patched(verl_ca, "agg_loss", spy):
            verl_fn(case, precision)
        x = case.inputs
        d = (_cast(x["log_prob"], precision) - _cast(x["old_log_prob"], precision)).double().abs()
        captured["ppo_kl"] = verl_ca.verl_F.masked_mean(d, x["response_mask"]).item()
        return captured

    return magnitudes


def cov_magnitudes(case: Case, precision: str) -> dict[str, float]:
    """As ``_spied_magnitudes``; and for bfloat16 inputs, which verl computes
    in bfloat16 (its per-token losses each rounded there: the log-ratio
    ``d`` (an error of ``u |d|`` in the ratio), ``exp``, the products), the
    loss's absolute forward-error bound ``loss:abs`` = ``u sum_i |l_i| (4 +
    |d_i|)`` aggregated as verl does, ``u = 2^-8``, plus verl's rounding of
    the sums: where the per-token losses nearly cancel, verl's bfloat16
    loss is that rounding (the float64 runs of the triage cannot stand in:
    float64 makes another choice of tokens; found by the fuzz: case
    303:47999)."""
    captured = _spied_magnitudes(cov_verl)(case, precision)
    dtype = DTYPES[case.params["dtype"]]
    if dtype not in HALF:
        return captured
    agg, x = verl_ca.agg_loss, case.inputs
    d = (x["log_prob"].double() - x["old_log_prob"].double()).abs()

    def spy(loss_mat, loss_mask, loss_agg_mode, *args, **kwargs):
        terms = loss_mat.detach().double().abs() * (4 + d)
        bound = agg(terms, loss_mask, loss_agg_mode, *args, **kwargs).abs().item()
        captured["loss:abs"] = torch.finfo(dtype).eps / 2 * bound
        return agg(loss_mat, loss_mask, loss_agg_mode, *args, **kwargs)

    with _patched(verl_ca, "agg_loss", spy):
        cov_verl(case, precision)
    return captured


def _exact_of(verl_fn: Callable[[Case, str], Outputs]) -> Callable[[Case, str], list[Outputs]]:
    """As rule_exact: verl on float64 upcasts, and verl with float64 sums."""

    def exact(case: Case, precision: str) -> list[Outputs]:
        with verl_accumulating_in_fp64():
            acc64 = verl_fn(case, precision)
        return _upcast_exact(verl_fn)(case, precision) + [acc64]

    return exact


COV_KNOBS = ("clip_cov_ratio", "clip_cov_lb", "clip_cov_ub", "kl_cov_ratio", "ppo_kl_coef")


def _cov_config(case: Case) -> Any:
    from verl.workers.config import ActorConfig, PolicyLossConfig

    p = case.params
    knobs = {k: p[k] for k in COV_KNOBS if k in p}
    cfg = ActorConfig(
        strategy="fsdp", **_clip_kwargs(p), ppo_micro_batch_size_per_gpu=1, rollout_n=1,
        policy_loss=PolicyLossConfig(loss_mode=p["mode"], **knobs),
    )  # fmt: skip
    cfg.global_batch_info.update(_norm_kwargs(case))
    return cfg


def cov_verl(case: Case, precision: str) -> Outputs:
    """verl's own Clip-Cov / KL-Cov, torch seeded with the case's seed first;
    ``rng_state``: torch's default generator after the call."""
    p, x = case.params, case.inputs
    old, lp, adv, w = (_cast(x.get(k), precision) for k in ("old_log_prob", "log_prob", "advantages", "rollout_is_weights"))
    B, T = lp.shape
    xr = _leaf(lp)
    fn = verl_ca.get_policy_loss_fn(p["mode"])
    torch.manual_seed(p["torch_seed"])
    loss, metrics = fn(old, xr, _bt(adv, B, T), x["response_mask"], loss_agg_mode=p["loss_agg_mode"],
                       config=_cov_config(case), rollout_is_weights=_bt(w, B, T))  # fmt: skip
    state = torch.get_rng_state()
    (loss * p["grad_out"]).backward()
    return {"loss": loss.detach(), "grad": xr.grad, **_metrics(metrics), "rng_state": state}


def cov_ours(case: Case) -> Outputs:
    p, x = case.params, case.inputs
    lay = p["layout"]
    xo = _leaf(x["log_prob"], lay)
    args = (_relayout(x["old_log_prob"], lay), xo, _relayout(x["advantages"], lay), _relayout(x["response_mask"], lay))
    w = x.get("rollout_is_weights")
    w = None if w is None else _relayout(w, lay)
    torch.manual_seed(p["torch_seed"])
    if p["api"] == "functional":
        loss, metrics = luspo_rs.policy_loss(
            *args, mode=p["mode"], loss_agg_mode=p["loss_agg_mode"], **_clip_kwargs(p), rollout_is_weights=w,
            **{k: p[k] for k in COV_KNOBS if k in p}, **_norm_kwargs(case),
        )  # fmt: skip
        metrics = {k: _scalar(v.item()) for k, v in metrics.items()}
    else:
        fn = getattr(ours_ca, f"compute_policy_loss_{p['mode']}")
        loss, metrics = fn(*args, loss_agg_mode=p["loss_agg_mode"], config=_cov_config(case), rollout_is_weights=w)
        metrics = _metrics(metrics)
    state = torch.get_rng_state()
    (loss * p["grad_out"]).backward()
    return {"loss": loss.detach(), "grad": xo.grad, **metrics, "rng_state": state}


def cov_tols(case: Case) -> dict[str, Tol]:
    """test_cov_losses's: TOL by dtype; for bfloat16 (verl rounding every
    operation to it) the gradient's absolute tolerance is 1/64 of its
    largest element (grad_tol); metrics to METRIC_TOL relative (and the
    fuzz's METRIC_ATOL); the generator's state exactly."""
    dtype = DTYPES[case.params["dtype"]]
    tol = COV_TOL[dtype]
    grad = Tol(**tol) if dtype.itemsize > 2 else Tol(rtol=tol["rtol"], atol=1e-9, atol_of_max=1 / 64)
    metric = Tol(rtol=COV_METRIC_TOL[dtype], atol=METRIC_ATOL)
    return {"loss": Tol(**tol), "grad": grad, "pg_clipfrac": metric, "ppo_kl": metric, "rng_state": Tol(0.0, 0.0)}


def cov_loss_dtype(case: Case, verl_dtype: torch.dtype) -> torch.dtype:
    """For 16-bit inputs ours is torch's promotion of the input dtypes (the
    16-bit type, or a float mask's), as for every policy loss
    (test_half_precision_inputs); verl's sequence aggregations return
    float32, and its others too where a normaliser comes as a float32
    tensor (documented in luspo_rs.policy_loss, test_cov_losses)."""
    return _promoted_dtype(case) if DTYPES[case.params["dtype"]] in HALF else verl_dtype


def kl_cov_gradient_rounding(case: Case, got: Outputs) -> torch.Tensor:
    """As rule_gradient_rounding for DRO: the tokens where ours is within the
    float32 forward-error bound ``8 u c`` of KL-Cov's gradient ``s (-A r +
    ppo_kl_coef sign(d))`` (verl's formula on float64 upcasts, the same
    tokens chosen: KL-Cov draws nothing), ill-conditioned at a chosen token
    where ``A r ~ ppo_kl_coef``: ``c = (|A| r + ppo_kl_coef) |s|``, ``s`` the
    token's scale (minus verl's GPG gradient for ``A = 1``), plus the
    output's rounding to the 16-bit type."""
    p, x = case.params, case.inputs
    dtype = DTYPES[p["dtype"]]
    u = 2.0**-53 if dtype == torch.float64 else 2.0**-24
    exact = cov_verl(case, "fp64")["grad"].double()
    B, T = x["log_prob"].shape
    w = x.get("rollout_is_weights")
    unit = _leaf(x["log_prob"].double())
    loss, _ = verl_ca.get_policy_loss_fn("gpg")(
        x["old_log_prob"].double(), unit, torch.ones(B, T, dtype=torch.float64), x["response_mask"],
        loss_agg_mode=p["loss_agg_mode"], config=_cov_config(case),
        rollout_is_weights=None if w is None else _bt(w.double(), B, T),
    )  # fmt: skip
    (loss * p["grad_out"]).backward()
    scale = unit.grad.double().abs()
    adv = _bt(x["advantages"].double(), B, T)
    r = (x["log_prob"].double() - x["old_log_prob"].double()).exp()
    bound = 8 * u * (adv.abs() * r + abs(p["ppo_kl_coef"])) * scale
    if dtype in HALF:
        bound = bound + torch.finfo(dtype).eps * exact.abs()
    return (got["grad"].double() - exact).abs() <= bound


def cov_ties(case: Case, got: Outputs, ref: Outputs, off: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """Clip-Cov's gradient at PPO clip-bound ties (``known_tie``, as
    vanilla's: the ratio within TIE_ULPS of ``1 - clip_ratio_low`` or ``1 +
    clip_ratio_high``, ours verl's x2, x1/2 or 0, or verl's 0). Only the
    fused pass's ``max(-A r, -A clip(r))`` is excused there: the choice (its
    clip test made by torch on verl's values) is not, nor ``pg_clipfrac``
    (the chosen fraction), the loss or the generator's state."""
    p, x = case.params, case.inputs
    if p["mode"] == "kl_cov" and "grad" in off:
        return {"rounding": {"grad": kl_cov_gradient_rounding(case, got)}}
    if p["mode"] != "clip_cov" or "grad" not in off:
        return {}
    mask = x["response_mask"]
    low, high = _low_high(p)
    ratio = verl_ratio("vanilla", x["old_log_prob"], x["log_prob"], mask)
    near = near_bound(ratio, mask, (1 - low, 1 + high))
    g, e = got["grad"].double(), ref["grad"].double()
    tol = cov_tols(case)["grad"]
    factor = _agree(g, 2 * e, tol) | _agree(g, 0.5 * e, tol) | (g == 0) | (e == 0)
    return {"known_tie": {"grad": near & factor}}


def _bypass_config(case: Case) -> Any:
    from verl.trainer.config.algorithm import RolloutCorrectionConfig
    from verl.workers.config import ActorConfig, PolicyLossConfig

    p = case.params
    rc = RolloutCorrectionConfig(loss_type=p["loss_type"], **p["correction"])
    cfg = ActorConfig(
        strategy="fsdp", **_clip_kwargs(p), clip_ratio_c=p["clip_ratio_c"], ppo_micro_batch_size_per_gpu=1,
        rollout_n=1, policy_loss=PolicyLossConfig(loss_mode="bypass_mode", rollout_correction=rc),
    )  # fmt: skip
    cfg.global_batch_info.update(_norm_kwargs(case))
    return cfg


def _bypass_call(fn: Callable[..., Any], case: Case, precision: str, layout: str) -> Outputs:
    p, x = case.params, case.inputs
    old, lp, adv = (_cast(x[k], precision) for k in ("old_log_prob", "log_prob", "advantages"))
    xr = _leaf(lp, layout)
    ignored = torch.full(lp.shape, 7.0, dtype=lp.dtype) if p["ignored_weights"] else None  # both ignore it
    loss, metrics = fn(_relayout(old, layout), xr, _relayout(adv, layout), _relayout(x["response_mask"], layout),
                       loss_agg_mode=p["loss_agg_mode"], config=_bypass_config(case), rollout_is_weights=ignored)  # fmt: skip
    (loss * p["grad_out"]).backward()
    return {"loss": loss.detach(), "grad": xr.grad, **_metrics(metrics)}


def bypass_verl(case: Case, precision: str) -> Outputs:
    """verl's, on the inputs in the layout ours gets: its rollout-correction
    helper (which ours calls too) then reduces in the same order, and its
    ``rollout_corr/*`` metrics are the same bits (an IS weights' float32
    ``std`` otherwise differs by its rounding between layouts)."""
    return _bypass_call(verl_ca.compute_policy_loss_bypass_mode, case, precision, case.params["layout"])


def bypass_ours(case: Case) -> Outputs:
    return _bypass_call(ours_ca.compute_policy_loss_bypass_mode, case, "native", case.params["layout"])


class _Tols(dict):
    """Tolerances by output name, ``default`` for the names not listed."""

    def __init__(self, default: Tol, **named: Tol) -> None:
        super().__init__(**named)
        self.default = default

    def __missing__(self, name: str) -> Tol:
        return self.default


def bypass_tols(case: Case) -> dict[str, Tol]:
    """The policy tolerances; ``rollout_corr/*``, computed by verl's own
    helper on both sides, exactly."""
    dtype = DTYPES[case.params["dtype"]]
    corr = Tol(0.0, 0.0)
    metric = Tol(0.0, METRIC_ATOL)
    tol = Tol(**TOLERANCES[dtype])
    return _Tols(corr, loss=tol, grad=tol, pg_clipfrac=metric, ppo_kl=metric, pg_clipfrac_lower=metric)


def bypass_mask(case: Case) -> torch.Tensor:
    """The mask bypass mode's loss runs over: the response mask less the
    tokens verl's rollout correction rejects (its own helper)."""
    from verl.trainer.ppo.rollout_corr_helper import compute_rollout_correction_and_rejection_mask

    p, x = case.params, case.inputs
    c = p["correction"]
    _, mask, _ = compute_rollout_correction_and_rejection_mask(
        old_log_prob=x["log_prob"], rollout_log_prob=x["old_log_prob"], response_mask=x["response_mask"],
        rollout_is=c.get("rollout_is"), rollout_is_threshold=c.get("rollout_is_threshold", 2.0),
        rollout_is_batch_normalize=c.get("rollout_is_batch_normalize", False), rollout_rs=c.get("rollout_rs"),
        rollout_rs_threshold=c.get("rollout_rs_threshold"),
    )  # fmt: skip
    return mask


def bypass_ties(case: Case, got: Outputs, ref: Outputs, off: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """``ppo_clip`` is vanilla PPO over ``bypass_mask``: its clip-bound ties (policy_ties)."""
    if case.params["loss_type"] != "ppo_clip":
        return {}
    inputs = {**case.inputs, "response_mask": bypass_mask(case)}
    vanilla = Case(case.seed, case.index, "policy", "vanilla", {**case.params, "mode": "vanilla"}, inputs)
    return policy_ties(vanilla, got, ref, off)


# ---- agg_loss


def agg_verl(case: Case, precision: str) -> Outputs:
    p, x = case.params, case.inputs
    dtype = DTYPES[p["dtype"]]
    xr = _leaf(_cast(x["loss_mat"], precision))
    loss = verl_ca.agg_loss(xr, x["loss_mask"], p["loss_agg_mode"], **_norm_kwargs(case))
    (loss * p["grad_out"]).backward()
    grad = xr.grad.to(dtype) if dtype in HALF and precision != "native" else xr.grad
    return {"loss": loss.detach(), "grad": grad}


def agg_ours(case: Case) -> Outputs:
    p, x = case.params, case.inputs
    xo = _leaf(x["loss_mat"], p["layout"])
    fn = luspo_rs.agg_loss if p["api"] == "functional" else ours_ca.agg_loss
    loss = fn(xo, _relayout(x["loss_mask"], p["layout"]), p["loss_agg_mode"], **_norm_kwargs(case))
    (loss * p["grad_out"]).backward()
    return {"loss": loss.detach(), "grad": xo.grad}


def agg_tols(case: Case) -> dict[str, Tol]:
    dtype = DTYPES[case.params["dtype"]]
    if dtype in HALF:
        return {"loss": Tol(**HALF_LOSS_TOL, overflow=dtype), "grad": Tol(**HALF_GRAD_TOL)}
    return {"loss": Tol(**TOLERANCES[dtype]), "grad": Tol(**TOLERANCES[dtype])}


# ---- value_loss


def value_verl(case: Case, precision: str) -> Outputs:
    p, x = case.params, case.inputs
    dtype = DTYPES[p["dtype"]]
    vp, v, r = (_cast(x[k], precision) for k in ("vpreds", "values", "returns"))
    xr = _leaf(vp)
    loss, clipfrac = verl_ca.compute_value_loss(
        xr, r, v, x["response_mask"], p["cliprange_value"], loss_agg_mode=p["loss_agg_mode"], **_norm_kwargs(case)
    )
    (loss * p["grad_out"]).backward()
    grad = xr.grad.to(dtype) if dtype in HALF and precision != "native" else xr.grad
    return {"loss": loss.detach(), "grad": grad, "vf_clipfrac": _scalar(clipfrac.item())}


def value_ours(case: Case) -> Outputs:
    p, x = case.params, case.inputs
    lay = p["layout"]
    xo = _leaf(x["vpreds"], lay)
    v, r, m = (_relayout(x[k], lay) for k in ("values", "returns", "response_mask"))
    c, agg = p["cliprange_value"], p["loss_agg_mode"]
    if p["api"] == "functional":
        loss, clipfrac = luspo_rs.value_loss(xo, v, r, m, c, agg, **_norm_kwargs(case))
    else:
        loss, clipfrac = ours_ca.compute_value_loss(xo, r, v, m, c, agg, **_norm_kwargs(case))
    (loss * p["grad_out"]).backward()
    return {"loss": loss.detach(), "grad": xo.grad, "vf_clipfrac": _scalar(clipfrac.item())}


def value_tols(case: Case) -> dict[str, Tol]:
    return {**agg_tols(case), "vf_clipfrac": Tol(0.0, METRIC_ATOL)}


# ---- kl_penalty


def kl_verl(case: Case, precision: str, fn=None) -> Outputs:
    p, x = case.params, case.inputs
    a = _leaf(_cast(x["logprob"], precision))
    b = _cast(x["ref_logprob"], precision).detach().clone().requires_grad_(p["grad_ref"])
    v = (fn or verl_ca.kl_penalty)(a, b, case.variant)
    (v * x["weight"]).sum().backward()
    return {"value": v.detach(), "d/dlogprob": a.grad, "d/dref_logprob": b.grad}


def kl_ours(case: Case) -> Outputs:
    return kl_verl(case, "native", fn=ours_ca.kl_penalty)


def kl_tols(case: Case) -> dict[str, Tol]:
    dtypes = (DTYPES[case.params["dtype"]], DTYPES[case.params["ref_dtype"]])
    if torch.bfloat16 in dtypes:
        tol = Tol(**KL_BF16_TOL)
    else:  # mixed fp32/fp64: the fp32 tolerance (test_mixed_dtypes_promote_like_verl)
        tol = Tol(**KL_TOL[torch.float32 if torch.float32 in dtypes else torch.float64])
    return dict.fromkeys(("value", "d/dlogprob", "d/dref_logprob"), tol)


# ---- advantage estimators


def adv_verl(case: Case, precision: str, module=None) -> Outputs:
    if case.variant in SCAN_ESTIMATORS:
        return scan_verl(case, precision)
    if case.variant in TOKEN_BASELINES:
        return token_baseline_call(module or verl_ca, case, precision)
    p, x = case.params, case.inputs
    kw = {k: p[k] for k in ("epsilon", "norm_adv_by_std_in_grpo", "f_norm") if k in p}
    if case.variant == "grpo_passk":  # verl asserts a config and reads the flag from it
        kw["config"] = AlgoConfig(norm_adv_by_std_in_grpo=kw.pop("norm_adv_by_std_in_grpo"))
    if "gdpo_scores" in x:
        kw.update(_gdpo_data(case))
    fn = getattr(module or verl_ca, ESTIMATORS[case.variant])
    rewards = _cast(x["token_level_rewards"], precision).clone()
    adv, ret = fn(token_level_rewards=rewards, response_mask=x["response_mask"], index=x["index"], **kw)
    return {"advantages": adv, "returns": ret}


def _gdpo_data(case: Case) -> dict[str, Any]:
    """gdpo's per-key path as verl's trainer calls it: the config naming the
    keys (and weights), ``non_tensor_batch`` holding a float64 array per key
    (verl reads them as float32), ``batch`` with a 2-token prompt and the
    attention mask of the valid tokens."""
    x, p = case.inputs, case.params
    scores, mask = x["gdpo_scores"], x["response_mask"]
    keys = [f"reward_{k}" for k in range(scores.shape[1])]
    B = scores.shape[0]
    attention = torch.cat([torch.ones(B, 2, dtype=torch.int64), (mask != 0).to(torch.int64)], dim=1)
    return dict(
        config=AlgoConfig(gdpo_reward_keys=keys, gdpo_reward_weights=p["weights"]),
        non_tensor_batch={k: scores[:, i].copy() for i, k in enumerate(keys)},
        batch={"prompts": torch.zeros(B, 2, dtype=torch.int64), "attention_mask": attention},
    )


def adv_ours(case: Case) -> Outputs:
    if case.variant in SCAN_ESTIMATORS:
        return scan_ours(case)
    if case.variant in TOKEN_BASELINES and case.params["api"] == "functional":
        x, p = case.inputs, case.params
        adv, ret = luspo_rs.advantage(
            x["token_level_rewards"], x["response_mask"], x["index"], case.variant,
            old_log_probs=x["old_log_probs"], sum_pi_squared=x["sum_pi_squared"],
            rollout_is_weights=x.get("rollout_is_weights"), handle_zero_tail=p["handle_zero_tail"],
            epsilon=p["epsilon"], with_returns=True,
        )  # fmt: skip
        return {"advantages": adv, "returns": ret}
    return adv_verl(case, "native", module=ours_ca)


def adv_tols(case: Case) -> dict[str, Tol]:
    p = case.params
    if case.variant in SCAN_ESTIMATORS:  # float32's if any data input (not the 0/1 mask) is float32
        data = {p["dtype"], p.get("values_dtype", p["dtype"]), p.get("baselines_dtype", p["dtype"])}
        tol = Tol(**(ADV_TOL[torch.float64] if data == {"fp64"} else ADV_TOL[torch.float32]))
        return {"advantages": tol, "returns": tol}
    dtype = DTYPES[p["dtype"]]
    if case.variant in TOKEN_BASELINES:
        # the advantages are G - B with B a weighted mean of the group's returns:
        # B's rounding scales with the returns, so the absolute tolerance does too
        x = case.inputs
        rm = x["token_level_rewards"].double() * x["response_mask"].double()
        scale = max(1.0, rm.flip(-1).cumsum(-1).abs().max().item()) if rm.numel() else 1.0
        base = ADV_TOL[dtype]
        return {"advantages": Tol(atol=base["atol"] * scale, rtol=base["rtol"]), "returns": Tol(**base)}
    if "gdpo_scores" in case.inputs:  # verl's per-key scores and their GRPO are float32 whatever the rewards
        dtype = torch.float32
    tol = Tol(**(float64_tol(case.variant) if dtype == torch.float64 else ADV_TOL[torch.float32]))
    return {"advantages": tol, "returns": tol}


def token_baseline_call(fn_holder: Any, case: Case, precision: str) -> Outputs:
    """verl's signature of the token baseline ``case.variant`` on ``fn_holder``
    (verl's core_algos or luspo-rs's adapters), float inputs at ``precision``."""
    x, p = case.inputs, case.params
    fn = getattr(fn_holder, TOKEN_BASELINES[case.variant])
    ris = x.get("rollout_is_weights")
    adv, ret = fn(
        token_level_rewards=_cast(x["token_level_rewards"], precision).clone(),
        response_mask=_cast(x["response_mask"], precision), index=x["index"],
        old_log_probs=_cast(x["old_log_probs"], precision), sum_pi_squared=_cast(x["sum_pi_squared"], precision),
        rollout_is_weights=None if ris is None else _cast(ris, precision),
        handle_zero_tail=p["handle_zero_tail"], epsilon=p["epsilon"],
    )  # fmt: skip
    return {"advantages": adv, "returns": ret}


def _scan_call(fn_holder: Any, case: Case, precision: str, *, verl_side: bool, layout: str = "contiguous") -> Outputs:
    """verl's signature of the scan ``case.variant``, called on ``fn_holder``
    (verl's core_algos or luspo-rs's adapters); inputs at ``precision``, in
    ``layout``; on verl's side a bool mask of GAE / REINFORCE++ as int64."""
    p, x = case.params, case.inputs
    r = _relayout(_cast(x["token_level_rewards"], precision).clone(), layout)
    mask = x["response_mask"]
    if verl_side and p.get("verl_mask"):
        mask = mask.to(MASK_DTYPES[p["verl_mask"]])
    mask = _relayout(_cast(mask, precision), layout)
    fn = getattr(fn_holder, SCAN_ESTIMATORS[case.variant])
    if case.variant == "gae":
        v = _relayout(_cast(x["values"], precision), layout)
        adv, ret = fn(token_level_rewards=r, values=v, response_mask=mask, gamma=p["gamma"], lam=p["lam"])
    elif case.variant == "reinforce_plus_plus":
        adv, ret = fn(token_level_rewards=r, response_mask=mask, config=AlgoConfig(gamma=p["gamma"]))
    else:
        b = _relayout(_cast(x["reward_baselines"], precision), layout)
        adv, ret = fn(token_level_rewards=r, reward_baselines=b, response_mask=mask, config=AlgoConfig())
    return {"advantages": adv, "returns": ret}


def scan_verl(case: Case, precision: str) -> Outputs:
    return _scan_call(verl_ca, case, precision, verl_side=True)


def scan_ours(case: Case) -> Outputs:
    """``luspo_rs.advantage(..., with_returns=True)`` or the verl-signature
    adapter in ``luspo_rs.core_algos``, inputs in the drawn layout."""
    p, x, lay = case.params, case.inputs, case.params["layout"]
    if p["api"] == "core_algos":
        return _scan_call(ours_ca, case, "native", verl_side=False, layout=lay)
    kw = {k: p[k] for k in ("gamma", "lam") if k in p}
    if "values" in x:
        kw["values"] = _relayout(x["values"], lay)
    if "reward_baselines" in x:
        kw["reward_baselines"] = _relayout(x["reward_baselines"], lay)
    adv, ret = luspo_rs.advantage(
        _relayout(x["token_level_rewards"], lay), _relayout(x["response_mask"], lay), None, case.variant,
        with_returns=True, **kw,
    )  # fmt: skip
    return {"advantages": adv, "returns": ret}


def _whiten_in(mode: str):
    """A stand-in for verl's ``masked_whiten`` (called by GAE and
    REINFORCE++): "fp64" -- verl's own whitening of its scan's output, upcast
    to float64 (the mask too, where float); "none" -- the values as they are
    (verl's returns where the whitening would raise)."""
    whiten = verl_ca.verl_F.masked_whiten

    def fp64(values, mask, shift_mean=True):
        return whiten(values.double(), mask.double() if mask.is_floating_point() else mask, shift_mean)

    def none(values, mask, shift_mean=True):
        return values

    return _patched(verl_ca.verl_F, "masked_whiten", fp64 if mode == "fp64" else none)


def whitening_rounding(case: Case, got: Outputs, ref: Outputs, off: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """``rounding``: the whitened advantages of GAE / REINFORCE++ within the
    forward-error bound of verl's ``(R - mean) * rsqrt(var + 1e-8)``: the
    mean's rounding, ``ROUNDING_ULPS u max|R|`` over the valid tokens,
    scaled by ``rsqrt(var + 1e-8)`` (up to 1e4 where the returns are all
    but constant: there verl's advantages are that rounding, amplified,
    and ours an exact 0; found by the fuzz: case 101:131523)."""
    if case.variant not in WHITENED or "advantages" not in off or ref.get("returns") is None:
        return {}
    p, x = case.params, case.inputs
    data = {p["dtype"], p.get("values_dtype", p["dtype"]), p.get("baselines_dtype", p["dtype"])}
    u = 2.0**-53 if data == {"fp64"} else 2.0**-24
    valid = x["response_mask"].double() != 0
    ret = ref["returns"].double()[valid]
    if ret.numel() < 2:
        return {}
    scale = (ret.var() + 1e-8).rsqrt().item()
    bound = ROUNDING_ULPS * u * ret.abs().max().item() * scale
    return {"rounding": {"advantages": (got["advantages"].double() - ref["advantages"].double()).abs() <= bound}}


def scan_verl_raised(case: Case, err: BaseException, got: Outputs) -> Optional[Outcome]:
    """The documented difference: fewer than 2 valid tokens in the batch, verl's
    ``masked_var`` raises ValueError, luspo-rs returns NaN advantages. Then
    ours must be all NaN, and our returns (dtype and values) verl's own, from
    verl's scan with the whitening left out. None where it does not apply."""
    x = case.inputs
    if case.variant not in WHITENED or not isinstance(err, ValueError):
        return None
    n_valid = int((x["response_mask"] != 0).sum())
    if n_valid >= 2:
        return None
    with _whiten_in("none"):
        ref = scan_verl(case, "native")
    problems = []
    adv, ret = got["advantages"], got["returns"]
    if ret.dtype != ref["returns"].dtype or adv.dtype != ref["advantages"].dtype:
        problems.append(f"dtypes: ours {adv.dtype}/{ret.dtype}, verl {ref['advantages'].dtype}/{ref['returns'].dtype}")
    if not bool(torch.isnan(adv).all()):
        problems.append(f"advantages: {int((~torch.isnan(adv)).sum())}/{adv.numel()} not NaN ({n_valid} valid token(s))")
    ok = _agree(ret, ref["returns"], adv_tols(case)["returns"])
    if ok is None or not bool(ok.all()):
        problems.append("returns: " + ("shape" if ok is None else _diff("returns", ret, ref["returns"], ok)))
    if problems:
        return Outcome("mismatch", [f"verl: {type(err).__name__}: {err}"] + problems, outputs=["advantages", "returns"])
    return Outcome("known_nan", [f"{n_valid} valid token(s): verl raised ({err}), ours NaN advantages, returns verl's"],
                   outputs=["advantages"])  # fmt: skip


# ---- verl without its float32 rounding (the rounding triage)


def _upcast_exact(verl_fn: Callable[[Case, str], Outputs]) -> Callable[[Case, str], list[Outputs]]:
    """verl's formula on float64 upcasts of the inputs (nothing to add for
    float64 inputs)."""

    def exact(case: Case, precision: str) -> list[Outputs]:
        return [] if _float_dtypes(case) == {torch.float64} else [verl_fn(case, "fp64")]

    return exact


@contextlib.contextmanager
def _patched(obj: Any, name: str, value: Any):
    """``obj.name = value`` for the duration (this harness is single-threaded)."""
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


@contextlib.contextmanager
def _correctly_rounded_exp():
    """``torch.exp`` of float32 tensors computed in float64 and rounded, as
    luspo-rs's token baselines take ``exp(old_log_probs)``: torch's float32
    exp misses the correctly rounded value by an ulp now and then, and where
    ``1 - 2 pi + sum_pi_squared`` cancels (pi near 1) that ulp is all of
    ``w``. Patches ``torch.exp`` for the duration (single-threaded harness)."""
    exp = torch.exp

    def rounded(x, *args, **kwargs):
        if isinstance(x, torch.Tensor) and x.dtype == torch.float32 and not args and not kwargs:
            return exp(x.double()).float()
        return exp(x, *args, **kwargs)

    with _patched(torch, "exp", rounded):
        yield


@contextlib.contextmanager
def verl_accumulating_in_fp64():
    """verl with its reductions -- ``agg_loss`` and ``masked_mean`` (the
    metrics) -- in float64, its token math untouched: luspo-rs's documented
    arithmetic (float32 token math, float64 sums). Patches the two names for
    the duration (this harness is single-threaded)."""
    agg, mean = verl_ca.agg_loss, verl_ca.verl_F.masked_mean

    def agg_loss64(loss_mat, loss_mask, loss_agg_mode, *args, **kwargs):
        return agg(loss_mat.double(), loss_mask, loss_agg_mode, *args, **kwargs)

    def masked_mean64(values, mask, axis=None):
        return mean(values.double(), mask, axis)

    with _patched(verl_ca, "agg_loss", agg_loss64), _patched(verl_ca.verl_F, "masked_mean", masked_mean64):
        yield


def policy_magnitudes(case: Case, precision: str) -> dict[str, float]:
    """sum|terms| of the sums behind the loss (verl's own per-token losses,
    aggregated with the same normalisers) and ``ppo_kl`` (mean |log-ratio|)."""
    agg, captured = verl_ca.agg_loss, {}

    def spy(loss_mat, loss_mask, loss_agg_mode, *args, **kwargs):
        captured["loss"] = agg(loss_mat.detach().double().abs(), loss_mask, loss_agg_mode, *args, **kwargs).item()
        return agg(loss_mat, loss_mask, loss_agg_mode, *args, **kwargs)

    with _patched(verl_ca, "agg_loss", spy):
        policy_verl(case, precision)
    x = case.inputs
    d = (_cast(x["log_prob"], precision) - _cast(x["old_log_prob"], precision)).double().abs()
    captured["ppo_kl"] = verl_ca.verl_F.masked_mean(d, x["response_mask"]).item()
    return captured


def agg_magnitudes(case: Case, precision: str) -> dict[str, float]:
    x, p = case.inputs, case.params
    loss_abs = verl_ca.agg_loss(x["loss_mat"].double().abs(), x["loss_mask"], p["loss_agg_mode"], **_norm_kwargs(case))
    return {"loss": abs(loss_abs.item())}


def policy_exact(case: Case, precision: str) -> list[Outputs]:
    """verl's loss on float64 upcasts, and verl's loss with float64 sums: an
    ill-conditioned loss (terms that nearly cancel) or a metric near float32's
    resolution differs between float32 and float64 accumulation by more than
    the tolerance."""
    with verl_accumulating_in_fp64():
        acc64 = policy_verl(case, precision)
    return _upcast_exact(policy_verl)(case, precision) + [acc64]


def adv_exact(case: Case, precision: str) -> list[Outputs]:
    """verl's estimator on float64 rewards; for ``grpo_vectorized``, whose
    ``group_mean_std`` casts the scores to float32 whatever their dtype,
    verl's loop ``grpo`` on float64 rewards (the same numbers, per verl and
    the README) instead. For the scans: verl on float64 upcasts of every
    float input, and for GAE / REINFORCE++ also verl's own scan (its own
    returns) whitened in float64, as luspo-rs sums the whitening statistics."""
    if case.variant in SCAN_ESTIMATORS:
        out = _upcast_exact(scan_verl)(case, precision)
        if case.variant in WHITENED and _float_dtypes(case) != {torch.float64}:
            with _whiten_in("fp64"):
                out.append(scan_verl(case, precision))
        return out
    if case.variant in TOKEN_BASELINES:
        out = _upcast_exact(adv_verl)(case, precision)
        if torch.float32 in _float_dtypes(case):
            with _correctly_rounded_exp():
                out.append(adv_verl(case, precision))
        return out
    if "gdpo_scores" in case.inputs:
        return [_gdpo_keys_fp64(case)]
    if case.variant == "grpo_vectorized":
        x, p = case.inputs, case.params
        kw = {k: p[k] for k in ("epsilon", "norm_adv_by_std_in_grpo") if k in p}
        rewards = x["token_level_rewards"].double().clone()
        adv, ret = verl_ca.compute_grpo_outcome_advantage(rewards, x["response_mask"], x["index"], **kw)
        return [{"advantages": adv, "returns": ret}]
    return _upcast_exact(adv_verl)(case, precision)


def _gdpo_keys_fp64(case: Case) -> Outputs:
    """gdpo's per-key path with verl's float32 steps taken in float64, from
    verl's own pieces: its float32-rounded scores and weights, its
    ``compute_grpo_outcome_advantage`` per key on float64 rewards holding the
    score, the weighted sum, its ``masked_whiten`` on a float64 mask. (Keys
    whose GRPO values nearly cancel leave verl's float32 rounding residue,
    which the whitening scales up.)"""
    x, p = case.inputs, case.params
    scores, mask, index = x["gdpo_scores"], x["response_mask"], x["index"]
    B, T = mask.shape
    m64 = mask.to(torch.float64)
    weights = p["weights"] or [1.0] * scores.shape[1]
    total = None
    for k in range(scores.shape[1]):
        r = torch.zeros(B, T, dtype=torch.float64)
        r[:, 0] = torch.from_numpy(scores[:, k].astype(np.float32)).double()
        a, _ = verl_ca.compute_grpo_outcome_advantage(
            r, m64, index, epsilon=p["epsilon"], norm_adv_by_std_in_grpo=p["norm_adv_by_std_in_grpo"]
        )
        term = float(np.float32(weights[k])) * a
        total = term if total is None else total + term
    adv = verl_ca.verl_F.masked_whiten(total, m64) * m64
    return {"advantages": adv, "returns": adv}


@dataclass
class OpSpec:
    verl: Callable[[Case, str], Outputs]  # (case, precision) -> verl's outputs
    ours: Callable[[Case], Outputs]
    tols: Callable[[Case], dict[str, Tol]]
    # (case, precision) -> verl's outputs without (some of) its float32 rounding, for the triage
    exact: Callable[[Case, str], list[Outputs]]
    # (case, precision) -> output -> sum|terms| of the sum it is (float32 forward-error bound);
    # "output:abs" -> an absolute forward-error bound of verl's own arithmetic (cov_magnitudes)
    magnitudes: Callable[[Case, str], dict[str, float]] = lambda case, precision: {}  # noqa: E731
    half_rule: bool = False  # half inputs compared with verl on fp32 upcasts (else verl on the inputs as drawn)
    # (case, ours, verl's, differing outputs) -> tie class -> output -> elements it explains
    ties: Optional[Callable[[Case, Outputs, Outputs, dict], dict[str, dict[str, torch.Tensor]]]] = None
    # (case, verl's exception, ours) -> the outcome of a documented case where only verl
    # raises, or None (then it is a mismatch)
    verl_raised: Optional[Callable[[Case, BaseException, Outputs], Optional[Outcome]]] = None
    # (case, verl's loss dtype) -> the loss dtype ours must have (default: verl's; for
    # half_rule inputs torch's promotion of the input dtypes)
    loss_dtype: Optional[Callable[[Case, torch.dtype], torch.dtype]] = None
    # (case, verl's output names) -> the names ours must return exactly (None: not checked)
    keys: Optional[Callable[[Case, set[str]], set[str]]] = None
    untriaged: tuple[str, ...] = ()  # outputs no tie or rounding excuses (the generator's state)
    # case -> the mask the fractions of valid tokens (COUNT_METRICS) count over (default: response_mask)
    count_mask: Optional[Callable[[Case], torch.Tensor]] = None


SPECS = {
    "policy": OpSpec(policy_verl, policy_ours, policy_tols, policy_exact, policy_magnitudes, half_rule=True, ties=policy_ties),
    "policy_rule": OpSpec(rule_verl, rule_ours, policy_tols, rule_exact, rule_magnitudes, half_rule=True, ties=rule_ties,
                          keys=lambda case, ref: ref),
    "policy_geo": OpSpec(geo_verl, geo_ours, geo_tols, _exact_of(geo_verl), geo_magnitudes, half_rule=True,
                         loss_dtype=lambda case, verl_dtype: verl_dtype, keys=_ours_metric_keys),
    "policy_cov": OpSpec(cov_verl, cov_ours, cov_tols, _exact_of(cov_verl), cov_magnitudes, ties=cov_ties,
                         loss_dtype=cov_loss_dtype, keys=_ours_metric_keys, untriaged=("rng_state",)),
    "policy_bypass": OpSpec(bypass_verl, bypass_ours, bypass_tols, _exact_of(bypass_verl), _spied_magnitudes(bypass_verl),
                            ties=bypass_ties, keys=lambda case, ref: ref | LEN_KEYS, count_mask=bypass_mask),
    "agg_loss": OpSpec(agg_verl, agg_ours, agg_tols, _upcast_exact(agg_verl), agg_magnitudes, half_rule=True),
    "value_loss": OpSpec(value_verl, value_ours, value_tols, _upcast_exact(value_verl), half_rule=True),
    "kl_penalty": OpSpec(kl_verl, kl_ours, kl_tols, _upcast_exact(kl_verl)),
    "advantage": OpSpec(adv_verl, adv_ours, adv_tols, adv_exact, verl_raised=scan_verl_raised, ties=whitening_rounding),
}


def _float_dtypes(case: Case) -> set[torch.dtype]:
    return {v.dtype for v in case.inputs.values() if isinstance(v, torch.Tensor) and v.is_floating_point()}


def _promoted_dtype(case: Case) -> torch.dtype:
    """torch's promotion of the dtypes of every input tensor (bool and integer
    masks leave a float dtype as it is)."""
    dtypes = [v.dtype for v in case.inputs.values() if isinstance(v, torch.Tensor)]
    out = dtypes[0]
    for d in dtypes[1:]:
        out = torch.promote_types(out, d)
    return out


def run_case(case: Case) -> Outcome:
    try:
        return _run_case(case)
    except Exception:  # noqa: BLE001 - a crash of the harness is reported, not hidden
        return Outcome("mismatch", ["harness error:\n" + traceback.format_exc()])


def _run_case(case: Case) -> Outcome:
    spec = SPECS[case.op]
    half = bool(_float_dtypes(case) & set(HALF))
    precision = "fp32" if spec.half_rule and half else "native"
    ref, ref_err = _call(lambda: spec.verl(case, precision))
    got, our_err = _call(lambda: spec.ours(case))
    if ref_err is not None and our_err is None and spec.verl_raised is not None:
        documented = spec.verl_raised(case, ref_err, got)
        if documented is not None:
            return documented
    if ref_err is not None and our_err is not None:
        return Outcome("both_raise", [f"verl: {type(ref_err).__name__}: {ref_err}", f"ours: {type(our_err).__name__}: {our_err}"])
    if ref_err is not None or our_err is not None:
        who, err = ("ours", our_err) if our_err is not None else ("verl", ref_err)
        return Outcome("mismatch", [f"only {who} raised: {type(err).__name__}: {err}"])

    # dtypes (and presence) as verl's, except a half-precision loss: there the
    # documented rule (test_half_precision_inputs) is torch's promotion of the
    # input dtypes, where verl's sequence modes would upcast to float32
    want_dtypes = {name: None if t is None else t.dtype for name, t in ref.items()}
    if spec.loss_dtype is not None:
        want_dtypes["loss"] = spec.loss_dtype(case, want_dtypes["loss"])
    elif precision != "native":
        want_dtypes["loss"] = _promoted_dtype(case)
    problems: list[str] = []
    for name, want in want_dtypes.items():
        g = got.get(name)
        if (g is None) != (want is None):
            problems.append(f"{name}: ours {'None' if g is None else 'a tensor'}, verl {'None' if want is None else 'a tensor'}")
        elif g is not None and g.dtype != want:
            problems.append(f"{name}: dtype {g.dtype}, expected {want}")
    # the token rules' metrics: verl's exact key set (e.g. none for GPG); the
    # verl-signature adapters of the other modes add the length diagnostics
    if spec.keys is not None and set(got) != spec.keys(case, set(ref)):
        problems.append(f"outputs: ours {sorted(got)}, verl's {sorted(ref)}")

    # values
    tols = spec.tols(case)
    off: dict[str, torch.Tensor] = {}
    for name, want in ref.items():
        g = got.get(name)
        if g is None or want is None:
            continue
        ok = _agree(g, want, tols[name])
        if ok is None:
            problems.append(f"{name}: shape {tuple(g.shape)}, verl's {tuple(want.shape)}")
        elif not bool(ok.all()):
            off[name] = ok
    for name in spec.untriaged:
        if name in off:
            problems.append(f"{name}: differs from verl's")
    if not off and not problems:
        return Outcome("ok")
    if problems:
        return Outcome("mismatch", problems + [_diff(n, got[n], ref[n], ok) for n, ok in off.items()], outputs=["dtype/shape"])

    # triage: which differing elements does a clip-bound tie explain, and
    # which verl's own float32 rounding (compared with verl run without it,
    # see OpSpec.exact, ours is the closer one)?
    ties = spec.ties(case, got, ref, off) if spec.ties else {}
    exact, _ = _call(lambda: spec.exact(case, precision))
    magnitudes = {}
    if any(name in off for name in ("loss", "ppo_kl")):
        magnitudes, _ = _call(lambda: spec.magnitudes(case, precision))
    u = 2.0**-53 if _float_dtypes(case) == {torch.float64} else 2.0**-24  # unit roundoff of the token math
    notes: list[str] = []
    remaining: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    n_tie = 0
    count_mask = spec.count_mask(case) if spec.count_mask is not None and set(COUNT_METRICS) & set(off) else None
    for name, ok in off.items():
        left = ~ok
        if name in COUNT_METRICS and _whole_token_flips(
            got[name].item(), ref[name].item(), case.inputs["response_mask"] if count_mask is None else count_mask
        ) < 0:
            remaining[name] = ok  # a fraction of tokens that differs by no whole number of tokens
            continue
        for kind, masks in ties.items():
            if name in masks:
                by = left & masks[name]
                if bool(by.any()):
                    used.add(kind)
                    n_tie += int(by.sum()) if name == "grad" else 0
                    notes.append(f"{name}: {int(by.sum())} element(s) differ at ties ({kind})")
                left = left & ~by
        for x in exact or []:
            if not bool(left.any()) or x.get(name) is None or x[name].shape != got[name].shape:
                continue
            # ours is no further from verl-without-its-rounding than verl's own
            # result, and within the tolerance of it (or verl's is not)
            verl_ok, ours_ok = _agree(ref[name], x[name], tols[name]), _agree(got[name], x[name], tols[name])
            g, e, xx = got[name].double(), ref[name].double(), x[name].double()
            by = left & ((g - xx).abs() <= (e - xx).abs()) & (ours_ok | ~verl_ok)
            if bool(by.any()):
                used.add("rounding")
                notes.append(f"{name}: {int(by.sum())} element(s) differ by verl's own rounding")
            left = left & ~by
        if bool(left.any()) and name in (magnitudes or {}):
            bound = tols[name].atol + ROUNDING_ULPS * u * magnitudes[name]
            # an op's own absolute bound where verl computes in a 16-bit type (see cov_magnitudes)
            bound = max(bound, tols[name].atol + magnitudes.get(f"{name}:abs", 0.0))
            if abs(got[name].item() - ref[name].item()) <= bound:
                used.add("rounding")
                notes.append(f"{name}: within the forward-error bound {bound:.3g} (sum|terms| {magnitudes[name]:.4g})")
                left = torch.zeros_like(left)
        if bool(left.any()):
            remaining[name] = ~left
    if remaining:
        problems = [_diff(n, got[n], ref[n], ok) for n, ok in remaining.items()] + [f"({m})" for m in notes]
        return Outcome("mismatch", problems, outputs=sorted(remaining))
    cls = next(c for c in ("undocumented_tie", "rounding", "known_tie") if c in used)
    return Outcome(cls, notes, tie_tokens=n_tie, outputs=sorted(off))


# --------------------------------------------------------------------------- driver


def replay_command(case_key: str) -> str:
    exe = sys.executable
    if exe.startswith(os.getcwd() + os.sep):
        exe = os.path.relpath(exe)
    script = os.path.relpath(os.path.abspath(__file__))
    return f"{exe} {script} --replay {case_key}"


@dataclass
class Stats:
    seed: int
    real: tuple[str, ...] = REAL  # the classes that count as real mismatches
    cases: int = 0
    seconds: float = 0.0
    per_op: Counter = field(default_factory=Counter)
    per_op_seconds: Counter = field(default_factory=Counter)
    per_class: Counter = field(default_factory=Counter)
    per_op_class: dict = field(default_factory=lambda: defaultdict(Counter))  # op -> class counts
    per_variant_class: dict = field(default_factory=lambda: defaultdict(Counter))  # op/variant -> class counts
    tie_tokens: int = 0
    per_output: Counter = field(default_factory=Counter)  # (class, "op.output") -> cases, for the non-ok classes
    examples: dict = field(default_factory=lambda: defaultdict(list))  # class -> first few case keys
    mismatches: list[tuple[str, str, list[str]]] = field(default_factory=list)  # (key, description, problems)

    def add(self, case: Case, out: Outcome, seconds: float = 0.0) -> None:
        self.cases += 1
        self.per_op[case.op] += 1
        self.per_op_seconds[case.op] += seconds
        self.per_class[out.cls] += 1
        self.per_op_class[case.op][out.cls] += 1
        self.per_variant_class[f"{case.op}/{case.variant}"][out.cls] += 1
        self.tie_tokens += out.tie_tokens
        for name in out.outputs:
            self.per_output[(out.cls, f"{case.op}.{name}")] += 1
        if out.cls != "ok" and len(self.examples[out.cls]) < 3:
            self.examples[out.cls].append(case.key)
        if out.cls in self.real:
            self.mismatches.append((case.key, case.describe(), out.problems))

    def table(self) -> str:
        w = max(len(c) for c in CLASSES) + 2
        lines = [f"  {'op':<42}{'cases':>8}" + "".join(f"{c:>{w}}" for c in CLASSES) + f"{'cases/s':>10}"]
        for op in OPS:
            c = self.per_op_class.get(op, Counter())
            rate = self.per_op[op] / max(self.per_op_seconds[op], 1e-9)
            lines.append(f"  {op:<42}{sum(c.values()):>8}" + "".join(f"{c[k]:>{w}}" for k in CLASSES) + f"{rate:>10.1f}")
            for name in sorted(v for v in self.per_variant_class if v.startswith(op + "/")):
                cv = self.per_variant_class[name]
                lines.append(f"    {name:<40}{sum(cv.values()):>8}" + "".join(f"{cv[k]:>{w}}" for k in CLASSES))
        tot = self.per_class
        lines.append(f"  {'total':<42}{self.cases:>8}" + "".join(f"{tot[k]:>{w}}" for k in CLASSES))
        for cls in CLASSES[3:]:
            outs = sorted((o, n) for (c, o), n in self.per_output.items() if c == cls)
            if outs:
                lines.append(f"  {cls} by output: " + ", ".join(f"{o} {n}" for o, n in outs))
        for cls in ("both_raise", "known_nan", "known_tie", "undocumented_tie", "rounding"):
            if self.examples.get(cls):
                lines.append(f"  e.g. {cls}: " + "; ".join(replay_command(k) for k in self.examples[cls]))
        return "\n".join(lines)


def fuzz(
    seed: int, *, cases: Optional[int] = None, seconds: Optional[float] = None, start: int = 0,
    out=None, progress_every: float = 30.0, real: tuple[str, ...] = REAL,
) -> Stats:
    """Runs cases ``start, start + 1, ...`` of ``seed`` until ``cases`` have run
    or ``seconds`` have passed; prints every real mismatch (a case whose class
    is in ``real``) with its replay command to ``out`` as it is found."""
    _check_reference_is_verls()
    stats = Stats(seed, real=real)
    t0 = last = time.perf_counter()
    index = start
    while True:
        if cases is not None and stats.cases >= cases:
            break
        now = time.perf_counter()
        if seconds is not None and now - t0 >= seconds:
            break
        case = make_case(seed, index)
        t = time.perf_counter()
        outcome = run_case(case)
        stats.add(case, outcome, time.perf_counter() - t)
        if outcome.cls in real and out is not None:
            print(f"{outcome.cls.upper()} {case.key} {case.describe()}", file=out)
            for line in outcome.problems:
                print(f"    {line}", file=out)
            print(f"    replay: {replay_command(case.key)}", file=out, flush=True)
        if out is not None and progress_every and now - last >= progress_every:
            last = now
            el = now - t0
            print(
                f"[{el:7.1f} s] {stats.cases} cases ({stats.cases / el:.1f}/s), "
                + ", ".join(f"{k} {stats.per_class[k]}" for k in CLASSES),
                file=out, flush=True,
            )  # fmt: skip
        index += 1
    stats.seconds = time.perf_counter() - t0
    return stats


def replay(key: str, *, verbose: bool = False, save: Optional[str] = None) -> Outcome:
    seed, index = (int(s) for s in key.split(":"))
    case = make_case(seed, index)
    print(f"case {case.key}  fingerprint {fingerprint(case)}")
    print(f"  {case.describe()}")
    if verbose:
        torch.set_printoptions(precision=10, linewidth=160, threshold=400)
        for k, v in case.inputs.items():
            print(f"  {k} =\n{v}")
    if save:
        torch.save({"seed": seed, "index": index, "op": case.op, "variant": case.variant,
                    "params": case.params, "inputs": case.inputs}, save)  # fmt: skip
        print(f"  saved to {save}")
    outcome = run_case(case)
    print(f"  -> {outcome.cls}")
    for line in outcome.problems:
        print(f"     {line}")
    return outcome


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--minutes", type=float, default=None, help="run for this long (default 5 without --cases)")
    ap.add_argument("--cases", type=int, default=None, help="run this many cases")
    ap.add_argument("--start", type=int, default=0, help="index of the first case")
    ap.add_argument("--replay", nargs="+", metavar="SEED:CASE", help="rerun these cases and print what differs")
    ap.add_argument("-v", "--verbose", action="store_true", help="with --replay: print the inputs")
    ap.add_argument("--save", metavar="PATH", help="with --replay of one case: torch.save its inputs there")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    ap.add_argument("--strict", action="store_true", help="count undocumented_tie and rounding as real mismatches")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    real = STRICT_REAL if args.strict else REAL

    if args.replay:
        _check_reference_is_verls()
        outcomes = [replay(k, verbose=args.verbose, save=args.save) for k in args.replay]
        return 1 if any(o.cls in real for o in outcomes) else 0

    seconds = None if args.cases is not None and args.minutes is None else 60.0 * (args.minutes or 5.0)
    print(
        f"fuzz: seed {args.seed}, from case {args.start}, "
        + (f"{args.cases} cases" if args.cases is not None else "") + (f" for {seconds / 60:g} min" if seconds else "")
        + f"; torch {torch.__version__} ({torch.get_num_threads()} threads), luspo_rs {luspo_rs.__version__} "
        f"({luspo_rs.num_threads()} threads)",
        flush=True,
    )  # fmt: skip
    stats = fuzz(args.seed, cases=args.cases, seconds=seconds, start=args.start, out=sys.stdout, real=real)
    print(
        f"\n{stats.cases} cases in {stats.seconds:.1f} s: {stats.cases / max(stats.seconds, 1e-9):.1f} cases/s "
        f"(seed {args.seed}, cases {args.start}..{args.start + stats.cases - 1})"
    )
    print(stats.table())
    print(f"ties (known_tie + undocumented_tie): {stats.per_class['known_tie'] + stats.per_class['undocumented_tie']} cases, "
          f"{stats.tie_tokens} gradient elements")  # fmt: skip
    if stats.mismatches:
        print(f"\n{len(stats.mismatches)} REAL MISMATCH(ES) ({', '.join(real)}):")
        for key, desc, _ in stats.mismatches:
            print(f"  {replay_command(key)}    # {desc}")
        return 1
    print("no real mismatch")
    return 0


if __name__ == "__main__":
    sys.exit(main())
