"""A quick differential fuzz against verl (tests/fuzz.py): a fixed seed, a few
thousand cases, no real mismatch; and replaying a case reproduces it."""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys

import pytest
import torch

import fuzz

SEED = 20261125
CASES = 4000  # ~12 s of fuzzing, ~25 s for this file, on the project's 2-core machine


def test_quick_fuzz_finds_no_real_mismatch():
    stats = fuzz.fuzz(SEED, cases=CASES)
    assert stats.cases == CASES
    assert set(stats.per_op) == set(fuzz.OPS), f"every op is drawn: {dict(stats.per_op)}"
    assert stats.per_class["ok"] > 0.8 * CASES, stats.table()
    assert stats.per_class["known_tie"] > 0, "the draw puts ratios at the clip bounds"
    if stats.mismatches:
        shown = stats.mismatches[:10]
        report = "\n".join(
            f"{key}: {desc}\n    " + "\n    ".join(problems) + f"\n    replay: {fuzz.replay_command(key)}"
            for key, desc, problems in shown
        )
        more = len(stats.mismatches) - len(shown)
        pytest.fail(
            f"{len(stats.mismatches)} real mismatch(es) with verl (first {len(shown)} below"
            + (f", {more} more" if more else "") + f"):\n{report}\n{stats.table()}",
            pytrace=False,
        )  # fmt: skip


def _same_inputs(a: fuzz.Case, b: fuzz.Case) -> bool:
    if (a.op, a.variant, a.params) != (b.op, b.variant, b.params) or a.inputs.keys() != b.inputs.keys():
        return False
    for k, x in a.inputs.items():
        y = b.inputs[k]
        if isinstance(x, torch.Tensor):
            same = x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y)
        else:
            same = type(x) is type(y) and list(x) == list(y)
        if not same:
            return False
    return True


def test_a_case_is_a_pure_function_of_seed_and_index():
    keys = [(SEED, i) for i in (0, 1, 7, 123, CASES - 1)] + [(0, 5), (3, 2**31)]
    first = {k: fuzz.make_case(*k) for k in keys}
    for i in range(50):  # whatever was drawn in between
        fuzz.make_case(SEED + 1, i)
    for k in reversed(keys):
        again = fuzz.make_case(*k)
        assert _same_inputs(again, first[k]), k
        assert fuzz.fingerprint(again) == fuzz.fingerprint(first[k])
    assert len({fuzz.fingerprint(c) for c in first.values()}) == len(keys), "distinct keys give distinct cases"


def test_replay_command_reproduces_the_case_and_its_outcome():
    # the CLI replay, in a fresh interpreter, draws the same inputs (fingerprint)
    # and reaches the same triage as this process
    keys = [f"{SEED}:{i}" for i in (0, 17, 42)]
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fuzz.py")
    run = subprocess.run(
        [sys.executable, script, "--replay", *keys], capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    printed = dict(re.findall(r"^case (\S+)  fingerprint (\S+)$", run.stdout, re.M))
    classes = re.findall(r"^  -> (\S+)$", run.stdout, re.M)
    assert len(printed) == len(keys) and len(classes) == len(keys), run.stdout + run.stderr
    for key, cls in zip(keys, classes):
        case = fuzz.make_case(*(int(s) for s in key.split(":")))
        assert printed[key] == fuzz.fingerprint(case), key
        assert cls == fuzz.run_case(case).cls, key


def _tie_case() -> fuzz.Case:
    """The first vanilla fp32 case with ratios drawn a few ulps around the clip bounds."""
    for i in range(10_000):
        case = fuzz.make_case(SEED, i)
        p = case.params
        if case.op == "policy" and p["mode"] == "vanilla" and p["dtype"] == "fp32" and p["tie"] == "near":
            return case
    raise AssertionError("no tie case drawn")


def test_triage_excuses_exactly_the_documented_tie(monkeypatch):
    # "ours" is verl itself, doctored: whatever luspo-rs computes, the triage
    # must excuse a gradient x2 at a token within 2 ulps of a clip bound and
    # a pg_clipfrac off by that token, and nothing else.
    case = _tie_case()
    spec = fuzz.SPECS["policy"]
    x, p = case.inputs, case.params
    mask = x["response_mask"]
    ratio = fuzz.verl_ratio("vanilla", x["old_log_prob"], x["log_prob"], mask)
    lo = 1 - (p["clip_ratio_low"] if p["clip_ratio_low"] is not None else p["clip_ratio"])
    hi = 1 + (p["clip_ratio_high"] if p["clip_ratio_high"] is not None else p["clip_ratio"])
    grad = spec.verl(case, "native")["grad"]
    near = fuzz.near_bound(ratio, mask, (lo, hi)) & (grad != 0)
    far = ~fuzz.near_bound(ratio, mask, (lo, hi), fuzz.WIDE_TIE_ULPS) & (mask != 0) & (grad.abs() > 1e-3)
    assert near.any() and far.any()
    at_near, at_far = tuple(near.nonzero()[0].tolist()), tuple(far.nonzero()[0].tolist())
    n_valid = float(mask.double().sum())

    def classify(grad_factor=1.0, where=None, clipfrac_shift=0.0):
        def ours(c):
            out = spec.verl(c, "native")
            if where is not None:
                out["grad"] = out["grad"].clone()
                out["grad"][where] *= grad_factor
            out["pg_clipfrac"] = out["pg_clipfrac"] + clipfrac_shift / n_valid
            return out

        monkeypatch.setitem(fuzz.SPECS, "policy", dataclasses.replace(spec, ours=ours))
        return fuzz.run_case(case).cls

    assert classify() == "ok"
    assert classify(2.0, at_near) == "known_tie"
    assert classify(0.5, at_near, clipfrac_shift=1.0) == "known_tie"
    assert classify(0.0, at_near) == "known_tie"
    assert classify(3.0, at_near) == "mismatch", "x3 is no tie"
    assert classify(2.0, at_far) == "mismatch", "x2 away from a clip bound is no tie"
    assert classify(clipfrac_shift=0.5) == "mismatch", "half a token is no flip"
    n_wide = int(fuzz.near_bound(ratio, mask, (lo, hi), fuzz.WIDE_TIE_ULPS).sum())
    assert classify(clipfrac_shift=float(n_wide + 1)) == "mismatch", "more flips than tokens at a bound"


def _dppo_tie_case() -> fuzz.Case:
    """A DPPO-TV fp32 case whose tokens have p - p_old a few ulps around the
    divergence bounds (as test_policy_modes' tie test draws them)."""
    g = torch.Generator().manual_seed(5)
    B, T, low, high = 8, 64, 0.2, 0.28
    old = -torch.rand(B, T, generator=g, dtype=torch.float64) * 2 - 0.1
    up = torch.rand(B, T, generator=g) < 0.5
    lp = torch.where(up, old.exp() + high, old.exp() - low).clamp(1e-6, 1 - 1e-6).log().float()
    steps = torch.randint(-3, 4, (B, T), generator=g)
    for k in range(1, 4):
        lp = torch.where(steps >= k, torch.nextafter(lp, torch.tensor(0.0)), lp)
        lp = torch.where(steps <= -k, torch.nextafter(lp, torch.tensor(-1e9)), lp)
    adv = torch.where(up, 1.0, -1.0) * (0.5 + torch.rand(B, T, generator=g))
    params = dict(mode="dppo_tv", dtype="fp32", mask_dtype="bool", loss_agg_mode="token-mean", clip_ratio=0.2,
                  clip_ratio_low=low, clip_ratio_high=high, clip_ratio_c=3.0, tau_pos=1.0, tau_neg=1.05, dro_beta=0.1,
                  tensor_norms={}, layout="contiguous", grad_out=1.0)  # fmt: skip
    inputs = dict(old_log_prob=old.float(), log_prob=lp, advantages=adv, response_mask=torch.ones(B, T, dtype=torch.bool))
    return fuzz.Case(0, 0, "policy_rule", "dppo_tv", params, inputs)


def test_triage_excuses_exactly_dppos_rounding_decided_drops(monkeypatch):
    # "ours" is verl itself, doctored: a token near a divergence bound kept by
    # verl and dropped by "ours" (gradient 0, pg_clipfrac one token up, the
    # loss without that token) is a known_tie; the same anywhere else, or a
    # gradient that is no drop, is a mismatch.
    case = _dppo_tie_case()
    spec = fuzz.SPECS["policy_rule"]
    ref = spec.verl(case, "native")
    near, _ = fuzz.dppo_near(case)
    grad = ref["grad"]
    at_near = tuple((near & (grad != 0)).nonzero()[0].tolist())
    at_far = tuple((~near & (grad.abs() > 1e-4)).nonzero()[0].tolist())
    n = float(grad.numel())
    x = case.inputs
    # the token's own loss, as token-mean weighs it: -A min(r, c) lp / n
    token_loss = lambda i: (-x["advantages"][i] * torch.exp(x["log_prob"][i] - x["old_log_prob"][i]).clamp(max=3.0)  # noqa: E731
                            * x["log_prob"][i] / n).item()  # fmt: skip

    def classify(where=None, factor=0.0, clipfrac_shift=0.0, loss_shift=0.0):
        def ours(c):
            out = spec.verl(c, "native")
            if where is not None:
                out["grad"] = out["grad"].clone()
                out["grad"][where] *= factor
            out["pg_clipfrac"] = out["pg_clipfrac"] + clipfrac_shift / n
            out["loss"] = out["loss"] + loss_shift
            return out

        monkeypatch.setitem(fuzz.SPECS, "policy_rule", dataclasses.replace(spec, ours=ours))
        return fuzz.run_case(case).cls

    assert near.sum() > 10
    assert classify() == "ok"
    assert classify(at_near) == "known_tie"
    assert classify(at_near, clipfrac_shift=1.0, loss_shift=-token_loss(at_near)) == "known_tie"
    assert classify(at_near, factor=2.0) == "mismatch", "x2 is no drop"
    assert classify(at_far) == "mismatch", "a drop away from a bound is no tie"
    assert classify(clipfrac_shift=0.5) == "mismatch", "half a token is no flip"
    assert classify(loss_shift=1.0) == "mismatch", "more than the tokens at a bound carry"


def _doctor(monkeypatch, op: str, change) -> fuzz.OpSpec:
    """SPECS[op] whose "ours" is verl's own outputs passed through ``change``."""
    spec = fuzz.SPECS[op]

    def ours(c):
        out = spec.verl(c, "native")
        change(out)
        return out

    monkeypatch.setitem(fuzz.SPECS, op, dataclasses.replace(spec, ours=ours))
    return spec


def _cov_tie_case() -> fuzz.Case:
    """A Clip-Cov fp32 case with ratios a few ulps around the clip bounds and
    more candidates than clip_num (the random draw decides), token-mean."""
    for i in range(20_000):
        case = fuzz.make_case(SEED, i)
        p = case.params
        if (case.op == "policy_cov" and p["mode"] == "clip_cov" and p["dtype"] == "fp32" and p["tie"] == "near"
                and p["clip_cov_ratio"] < 0.3 and p["clip_cov_lb"] < 0 and case.inputs["log_prob"].numel() > 200):  # fmt: skip
            return dataclasses.replace(case, params={**p, "api": "functional"})  # verl's metric keys only
    raise AssertionError("no Clip-Cov tie case drawn")


def test_triage_of_clip_cov_excuses_clip_ties_but_never_another_choice(monkeypatch):
    # "ours" is verl itself, doctored: a gradient x2 at a token within 2 ulps
    # of a PPO clip bound is a known_tie; another generator state, another
    # chosen fraction or another seed's choice is a mismatch, ties or not.
    case = _cov_tie_case()
    x, p = case.inputs, case.params
    mask = x["response_mask"]
    low, high = fuzz._low_high(p)
    ref = fuzz.SPECS["policy_cov"].verl(case, "native")
    near = fuzz.near_bound(fuzz.verl_ratio("vanilla", x["old_log_prob"], x["log_prob"], mask), mask, (1 - low, 1 + high))
    at_near = tuple((near & (ref["grad"] != 0)).nonzero()[0].tolist())
    n_valid = float(mask.double().sum())

    def classify(change):
        _doctor(monkeypatch, "policy_cov", change)
        return fuzz.run_case(case).cls

    def times(where, f):
        def change(out):
            out["grad"] = out["grad"].clone()
            out["grad"][where] *= f

        return change

    assert classify(lambda out: None) == "ok"
    assert classify(times(at_near, 2.0)) == "known_tie"
    assert classify(times(at_near, 3.0)) == "mismatch", "x3 is no tie"

    def other_state(out):
        out["rng_state"] = out["rng_state"].clone()
        out["rng_state"][-1] ^= 1

    assert classify(other_state) == "mismatch", "another number of draws"

    def one_more_chosen(out):
        out["grad"] = out["grad"].clone()
        out["grad"][at_near] = 0.0  # a tie could explain this gradient, not the count
        out["pg_clipfrac"] = out["pg_clipfrac"] + 1.0 / n_valid

    assert classify(one_more_chosen) == "mismatch", "the chosen fraction is no clip flag"
    other = dataclasses.replace(case, params={**p, "torch_seed": p["torch_seed"] + 1})
    theirs = fuzz.SPECS["policy_cov"].verl(other, "native")
    assert not torch.equal(theirs["grad"], ref["grad"]), "the draw must decide this case"

    def other_seed(out):
        out.update(theirs)

    assert classify(other_seed) == "mismatch", "another seed's choice"


def _geo_f64_mask_case() -> fuzz.Case:
    """GMPO on float32 log-ratios exactly on float32's rounding of the lower
    bound, with a float64 mask: the case of geo_f64_mask_flips."""
    B, T, low, high = 4, 16, 0.5885, 0.2599
    g = torch.Generator().manual_seed(3)
    old = torch.full((B, T), -4.0)
    lp = (old.double() + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)).float()
    on = torch.rand(B, T, generator=g) < 0.3
    lp = torch.where(on, old + torch.tensor(-low, dtype=torch.float32), lp)
    adv = torch.randn(B, 1, generator=g).expand(B, T).contiguous()
    params = dict(mode="geo_mean", dtype="fp32", mask_dtype="fp64", loss_agg_mode="token-mean", clip_ratio=0.2,
                  clip_ratio_low=low, clip_ratio_high=high, tensor_norms={}, layout="contiguous", grad_out=1.0,
                  api="functional")  # fmt: skip
    inputs = dict(old_log_prob=old, log_prob=lp, advantages=adv, response_mask=torch.ones(B, T, dtype=torch.float64))
    return fuzz.Case(0, 0, "policy_geo", "geo_mean", params, inputs)


def test_gmpo_with_a_float64_mask_decides_its_clamp_in_float32_as_verl(monkeypatch):
    # found by the fuzz: with a float64 mask GMPO took d = lp - old and its
    # bounds in float64, so tokens on float32's rounding of a bound got 2x / 0
    # verl's gradient; fixed (PolicyLossProblem::geo_narrow), the case is ok,
    # and no triage excuses a change at such a token any more
    case = _geo_f64_mask_case()
    flips = fuzz.geo_f64_mask_flips(case)
    assert flips.any() and fuzz.run_case(case).cls == "ok"
    ref = fuzz.SPECS["policy_geo"].verl(case, "native")
    at_flip = tuple((flips & (ref["grad"] != 0)).nonzero()[0].tolist())

    def change(out):
        out["grad"] = out["grad"].clone()
        out["grad"][at_flip] *= 2.0

    _doctor(monkeypatch, "policy_geo", change)
    assert fuzz.run_case(case).cls == "mismatch"


def test_triage_of_the_whitening_excuses_its_rounding_only(monkeypatch):
    # all but constant returns: verl's whitened advantages are the mean's
    # rounding times rsqrt(1e-8), ours an exact 0 (rounding); a whitened
    # case of ordinary spread off by 1e-6 is a mismatch
    assert fuzz.run_case(fuzz.make_case(101, 131523)).cls == "rounding"
    for i in range(10_000):
        case = fuzz.make_case(SEED, i)
        if case.op == "advantage" and case.variant in fuzz.WHITENED and case.params["dtype"] == "fp64":
            ref = fuzz.SPECS["advantage"].verl(case, "native")
            if ref["advantages"].abs().max() > 0.5:
                break
    else:
        raise AssertionError("no whitened float64 case drawn")
    where = tuple((ref["advantages"].abs() > 0.5).nonzero()[0].tolist())

    def change(out):
        out["advantages"] = out["advantages"].clone()
        out["advantages"][where] += 1e-6

    assert fuzz.run_case(case).cls in ("ok", "rounding")
    _doctor(monkeypatch, "advantage", change)
    assert fuzz.run_case(case).cls == "mismatch"
