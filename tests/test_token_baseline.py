"""Parity of the optimal token baselines (``optimal_token_baseline`` and
``tir_optimal_token_baseline``: ``luspo_rs.advantage`` and the
``luspo_rs.core_algos`` drop-ins over it) with verl 0.9.1's own functions,
imported from the installed verl: prefix and multi-turn masks (holes inside
a response), empty rows and fully masked batches, singleton groups, the zero
tail of a unique longest row, rollout IS weights, the dtypes verl accepts
(bool / integer / float masks, float32, float64 and mixed inputs), NaN, bad
input.

Tolerances: the returns are bitwise verl's (torch's CPU cumsum: float64
running sum). The baselines sum over a group's rows in float64 (torch: in
the inputs' dtype), so float32 results agree to 1e-5, float64 ones to 1e-10.
"""

from __future__ import annotations

import math
import typing

import numpy as np
import pytest
import torch
from conftest import check_public_op, stable_seed
from verl.trainer.ppo import core_algos as verl_ca

import luspo_rs
from luspo_rs import core_algos as ours
from luspo_rs.advantage import TOKEN_BASELINE_ESTIMATORS, TokenBaselineEstimator

FNS = {
    "optimal_token_baseline": "compute_optimal_token_baseline_advantage",
    "tir_optimal_token_baseline": "compute_multi_turn_optimal_token_baseline_advantage",
}
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float64: dict(atol=1e-10, rtol=1e-10)}


def make(B, T, rng, dtype=torch.float32, layout="holes", groups=None):
    """A batch: ragged lengths (row 0 full, row 1 empty), observation spans
    (mask 0) inside some responses with ``layout="holes"``, probabilities
    ``p`` in (0.05, 0.95) with ``old = log p`` and ``sum_pi_squared`` in
    ``[p^2, p^2 + (1 - p)^2]`` (so ``w >= 0``, as from a real policy), IS
    weights in [0.5, 1.5], and group labels (default: groups of 1 to 4 rows)."""
    lengths = rng.integers(0, T + 1, size=B)
    lengths[0] = T
    if B > 1:
        lengths[1] = 0
    mask = np.arange(T)[None, :] < lengths[:, None]
    if layout == "holes":
        for i in range(B):
            if lengths[i] > 4 and rng.random() < 0.7:
                a = int(rng.integers(1, lengths[i] - 2))
                mask[i, a : a + int(rng.integers(1, max(2, lengths[i] // 3)))] = False
    p = rng.uniform(0.05, 0.95, size=(B, T))
    sp = p * p + rng.uniform(0, 1, size=(B, T)) * (1 - p) ** 2
    if groups is None:
        groups = np.repeat(np.arange(B), rng.integers(1, 5, size=B))[:B]
    t = lambda x: torch.from_numpy(np.asarray(x)).to(dtype)  # noqa: E731
    return dict(
        token_level_rewards=t(rng.normal(size=(B, T))),
        response_mask=torch.from_numpy(mask),
        index=np.asarray(groups),
        old_log_probs=t(np.log(p)),
        sum_pi_squared=t(sp),
        rho=t(rng.uniform(0.5, 1.5, size=(B, T))),
    )


def call(impl, name, b, mask, rho=False, tail=True, **kw):
    fn = getattr(impl, FNS[name])
    return fn(b["token_level_rewards"], mask, b["index"], b["old_log_probs"], b["sum_pi_squared"],
              b["rho"] if rho else None, tail, **kw)  # fmt: skip


def check(name, b, mask, rho=False, tail=True, tol=None, **kw):
    want = call(verl_ca, name, b, mask, rho, tail, **kw)
    got = call(ours, name, b, mask, rho, tail, **kw)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and g.shape == w.shape
    # the returns: bitwise
    assert torch.equal(got[1], want[1]) or torch.equal(torch.isnan(got[1]), torch.isnan(want[1]))
    torch.testing.assert_close(got[1], want[1], equal_nan=True, atol=0, rtol=0)
    torch.testing.assert_close(got[0], want[0], equal_nan=True, **(tol or TOL[want[0].dtype]))
    return got, want


@pytest.mark.parametrize("name", sorted(FNS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.int64, "same"], ids=str)
@pytest.mark.parametrize("layout", ["prefix", "holes"])
@pytest.mark.parametrize("rho", [False, True], ids=["no_is", "is"])
@pytest.mark.parametrize("tail", [True, False], ids=["zero_tail", "keep_tail"])
@pytest.mark.parametrize("B, T", [(1, 5), (12, 17), (40, 130)])
def test_matches_verl(name, dtype, mask_dtype, layout, rho, tail, B, T):
    rng = np.random.default_rng(stable_seed(name, str(dtype), str(mask_dtype), layout, rho, tail, B, T))
    b = make(B, T, rng, dtype, layout)
    mask = b["response_mask"].to(dtype if mask_dtype == "same" else mask_dtype)
    check(name, b, mask, rho, tail)


@pytest.mark.parametrize("name", sorted(FNS))
@pytest.mark.parametrize("layout", ["prefix", "holes"])
def test_zero_tail_of_a_unique_longest_row(name, layout):
    # one group of four: a unique longest row (zeroed beyond the second
    # longest), a group whose two longest rows tie (kept), a group with an
    # empty row (OTB: the other row's baseline is zeroed from column 0; TIR:
    # the empty row leaves the group, a singleton then) and a singleton
    rng = np.random.default_rng(stable_seed(name, layout, "tail"))
    b = make(9, 20, rng, torch.float32, layout, groups=[0, 0, 0, 0, 1, 1, 2, 2, 3])
    m = torch.zeros(9, 20, dtype=torch.bool)
    for i, n in enumerate([20, 7, 12, 3, 9, 9, 6, 0, 4]):
        m[i, :n] = True
    if layout == "holes":
        m[0, 13:15] = m[2, 2] = m[4, 5] = m[5, 1] = False
    for tail in (True, False):
        check(name, b, m, rho=True, tail=tail)
    # the tail is what differs
    a_tail, _ = call(ours, name, b, m, True, True)
    a_keep, _ = call(ours, name, b, m, True, False)
    differs = (a_tail != a_keep).any(dim=1)
    want = [0, 6] if name == "optimal_token_baseline" else [0]
    assert differs.nonzero().flatten().tolist() == want


@pytest.mark.parametrize("name", sorted(FNS))
def test_fully_masked_batch_and_rows(name):
    rng = np.random.default_rng(stable_seed(name, "empty"))
    b = make(6, 9, rng, groups=[0, 0, 1, 1, 2, 2])
    check(name, b, torch.zeros(6, 9, dtype=torch.bool))
    m = b["response_mask"].clone()
    m[2:4] = False  # a whole group empty
    m[4] = False  # a group of one empty row and one with tokens (TIR: a singleton then)
    check(name, b, m, rho=True)


def test_otb_fractional_masks_truncate_lengths_as_verl():
    # verl's zero tail takes int() of float mask sums: 4.5 never equals int(4.5)
    rng = np.random.default_rng(11)
    b = make(6, 10, rng, torch.float32, "prefix", groups=[0, 0, 0, 1, 1, 1])
    m = b["response_mask"].float()
    m[0] *= 0.5
    m[3, :] = 1.0
    m[4, 2:] = 0.25
    check("optimal_token_baseline", b, m, rho=True)
    check("optimal_token_baseline", b, m.double(), rho=False)


def test_tir_with_mask_values_other_than_one_ranks_the_nonzero_tokens():
    # verl's TIR takes a row's length as int(sum m) and copies the m != 0
    # tokens into that many slots: it raises when the two differ. Here the
    # ranks are those of the m != 0 tokens (documented). On prefix masks
    # without empty rows, ranks are columns, so this is verl's OTB (whose
    # G W m and W m sums carry the constant m = 0.5 that TIR's leave out).
    rng = np.random.default_rng(12)
    b = make(8, 15, rng, torch.float64, "prefix", groups=[0, 0, 0, 1, 1, 2, 2, 2])
    m = b["response_mask"].double()
    m[1, 0] = 1.0  # no empty row (row 1 is made empty by `make`)
    m = m * 0.5
    with pytest.raises(RuntimeError):
        call(verl_ca, "tir_optimal_token_baseline", b, m, True, False)
    got = call(ours, "tir_optimal_token_baseline", b, m, True, False)
    want = call(verl_ca, "optimal_token_baseline", b, m, True, False)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-7, rtol=1e-7)


#: float64 inputs among float32 ones, and whether verl 0.9.1 raises for them
#: (OTB, TIR): its baselines are stored into a tensor of another dtype
#: ("Index put requires the source and destination dtypes match").
MIXED = [
    (dict(old_log_probs=torch.float64), True, True),
    (dict(sum_pi_squared=torch.float64, rho=torch.float64), True, True),
    (dict(rho=torch.float64), True, True),
    (dict(token_level_rewards=torch.float64), False, True),
    (dict(response_mask=torch.float64), False, False),
]


@pytest.mark.parametrize("name", sorted(FNS))
@pytest.mark.parametrize("dtypes, raises_otb, raises_tir", MIXED, ids=lambda d: "+".join(d) if isinstance(d, dict) else "")
def test_mixed_dtypes_promote_like_verl(name, dtypes, raises_otb, raises_tir):
    # A float64 input makes the computation float64, with torch's float32
    # intermediates rounded to float32. Tolerance: float32's, since torch's
    # float32 exp may differ from a correctly rounded one in the last bit.
    rng = np.random.default_rng(stable_seed(name, *dtypes))
    b = make(10, 23, rng, torch.float32, "holes")
    b["response_mask"] = b["response_mask"].float()
    for k, dt in dtypes.items():
        b[k] = b[k].to(dt)
    got = call(ours, name, b, b["response_mask"], True)
    dtype = torch.promote_types(b["token_level_rewards"].dtype, b["response_mask"].dtype)
    assert got[0].dtype == got[1].dtype == dtype
    if raises_otb if name == "optimal_token_baseline" else raises_tir:
        # verl raises; here the baselines are rounded to the returns' dtype:
        # compare with verl on the inputs in float64, rounded
        with pytest.raises(RuntimeError, match="Index put requires the source and destination dtypes match"):
            call(verl_ca, name, b, b["response_mask"], True)
        b64 = {k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in b.items()}
        want = [w.to(dtype) for w in call(verl_ca, name, b64, b64["response_mask"], True)]
    else:
        want = call(verl_ca, name, b, b["response_mask"], True)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **TOL[torch.float32])


@pytest.mark.parametrize("name", sorted(FNS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_16_bit_inputs_are_computed_in_float32(name, dtype):
    # verl rounds to 16 bits at every step; we compute in float32 and round
    # once, so we compare with verl run on the same values in float32
    rng = np.random.default_rng(stable_seed(name, str(dtype)))
    b = make(8, 30, rng, dtype)
    got = call(ours, name, b, b["response_mask"], True)
    b32 = {k: (v.float() if isinstance(v, torch.Tensor) and v.dtype == dtype else v) for k, v in b.items()}
    want = call(verl_ca, name, b32, b["response_mask"], True)
    assert got[0].dtype == got[1].dtype == dtype
    for g, w in zip(got, want):
        torch.testing.assert_close(g.float(), w, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("name", sorted(FNS))
def test_long_rows_go_through_in_pieces(name):
    # rows longer than the CPU kernels' 65536-token piece: W and the ranks carry across pieces
    rng = np.random.default_rng(stable_seed(name, "long"))
    b = make(4, 65536 + 77, rng, torch.float32, "holes", groups=[0, 0, 0, 1])
    # returns of a few hundred: float32's rounding of the baseline is about 1e-5 of them
    scale = call(verl_ca, name, b, b["response_mask"], True)[1].abs().max().item()
    check(name, b, b["response_mask"], rho=True, tol=dict(atol=1e-6 * scale, rtol=1e-5))


@pytest.mark.parametrize("name", sorted(FNS))
def test_nan_propagates_as_in_verl(name):
    # a NaN reward at a masked token: r m is NaN, so the earlier returns and
    # their group's baselines are NaN; a NaN old log-prob at a masked token:
    # W is NaN from there on
    rng = np.random.default_rng(stable_seed(name, "nan"))
    b = make(8, 12, rng, torch.float32, "prefix", groups=[0, 0, 0, 1, 1, 2, 2, 2])
    m = b["response_mask"].clone()
    m[0, 8:] = False
    b["token_level_rewards"][0, 10] = math.nan
    m[3, 6:] = False
    b["old_log_probs"][3, 7] = math.nan
    check(name, b, m)


@pytest.mark.parametrize("name", sorted(FNS))
def test_uid_labels_and_tensor_index(name):
    rng = np.random.default_rng(stable_seed(name, "uid"))
    b = make(8, 10, rng, groups=[0, 1, 0, 2, 1, 1, 2, 3])
    want = call(verl_ca, name, b, b["response_mask"])
    b_uid = dict(b, index=np.array([f"uid-{g}" for g in b["index"]], dtype=object))
    got = call(ours, name, b_uid, b["response_mask"])
    torch.testing.assert_close(got[0], want[0], **TOL[torch.float32])
    got_t = call(ours, name, dict(b, index=torch.from_numpy(b["index"])), b["response_mask"])
    assert torch.equal(got_t[0], got[0])


def test_public_entry_point():
    rng = np.random.default_rng(4)
    b = make(6, 9, rng)
    m = b["response_mask"]
    for name in FNS:
        adv, ret = call(ours, name, b, m, rho=True)
        kw = dict(old_log_probs=b["old_log_probs"], sum_pi_squared=b["sum_pi_squared"],
                  rollout_is_weights=b["rho"])  # fmt: skip
        got = luspo_rs.advantage(b["token_level_rewards"], m, b["index"], name, **kw)
        assert torch.equal(got, adv)
        a2, r2 = luspo_rs.advantage(b["token_level_rewards"], m, b["index"], name, **kw, with_returns=True)
        assert torch.equal(a2, adv) and torch.equal(r2, ret)
        # epsilon defaults to verl's 1e-8 here (the GRPO estimators' default stays 1e-6)
        a3 = luspo_rs.advantage(b["token_level_rewards"], m, b["index"], name, **kw, epsilon=1e-8)
        assert torch.equal(a3, adv)
        fn = ours.ESTIMATORS[name]
        assert fn is getattr(ours, FNS[name]) and fn.__name__ == FNS[name] and fn.__doc__
        assert fn.__name__ == getattr(verl_ca, FNS[name]).__name__
    assert list(typing.get_args(TokenBaselineEstimator)) == list(TOKEN_BASELINE_ESTIMATORS) == list(FNS)
    check_public_op("advantage", "TokenBaselineEstimator", FNS)  # the native stubs spell the same names
    # every estimator verl 0.9.1 registers that luspo-rs computes has a drop-in of verl's name
    for name in FNS:
        assert name in verl_ca.ADV_ESTIMATOR_REGISTRY and name in ours.ESTIMATORS


def test_bad_input_names_the_argument():
    b = make(4, 9, np.random.default_rng(6))
    r, m, idx = b["token_level_rewards"], b["response_mask"], b["index"]
    old, sp = b["old_log_probs"], b["sum_pi_squared"]
    adv = luspo_rs.advantage
    name = "optimal_token_baseline"
    with pytest.raises(ValueError, match="^old_log_probs: the optimal_token_baseline estimator needs it"):
        adv(r, m, idx, name, sum_pi_squared=sp)
    with pytest.raises(ValueError, match="^sum_pi_squared: the tir_optimal_token_baseline estimator needs it"):
        adv(r, m, idx, "tir_optimal_token_baseline", old_log_probs=old)
    with pytest.raises(ValueError, match="^index: the optimal_token_baseline estimator needs the group labels"):
        adv(r, m, None, name, old_log_probs=old, sum_pi_squared=sp)
    with pytest.raises(ValueError, match="^sum_pi_squared: shape"):
        adv(r, m, idx, name, old_log_probs=old, sum_pi_squared=sp[:, :3])
    with pytest.raises(ValueError, match="^rollout_is_weights: shape"):
        adv(r, m, idx, name, old_log_probs=old, sum_pi_squared=sp, rollout_is_weights=sp[0])
    with pytest.raises(TypeError, match="^old_log_probs: expected a floating-point tensor"):
        adv(r, m, idx, name, old_log_probs=old.long(), sum_pi_squared=sp)
    with pytest.raises(TypeError, match="^token_level_rewards: expected a floating-point tensor"):
        adv(r.long(), m, idx, name, old_log_probs=old, sum_pi_squared=sp)
    with pytest.raises(TypeError, match="^sum_pi_squared: expected a torch.Tensor"):
        adv(r, m, idx, name, old_log_probs=old, sum_pi_squared=sp.numpy())
    with pytest.raises(ValueError, match="^epsilon: must be finite"):
        adv(r, m, idx, name, old_log_probs=old, sum_pi_squared=sp, epsilon=math.inf)
    with pytest.raises(TypeError, match="^epsilon: expected a number"):
        adv(r, m, idx, name, old_log_probs=old, sum_pi_squared=sp, epsilon="small")
    with pytest.raises(ValueError, match="^index: expected one label per row"):
        adv(r, m, idx[:3], name, old_log_probs=old, sum_pi_squared=sp)
    with pytest.raises(ValueError, match="^token_level_rewards: empty batch"):
        adv(r[:0], m[:0], idx[:0], name, old_log_probs=old[:0], sum_pi_squared=sp[:0])
    with pytest.raises(ValueError, match="^token_level_rewards: expected a 2-D"):
        adv(r[0], m[0], idx, name, old_log_probs=old[0], sum_pi_squared=sp[0])
    with pytest.raises(ValueError, match="^response_mask: shape"):
        adv(r, m[:, :3], idx, name, old_log_probs=old, sum_pi_squared=sp)
    with pytest.raises(ValueError, match='unknown advantage estimator "optimal_token".*"optimal_token_baseline"'):
        adv(r, m, idx, "optimal_token", old_log_probs=old, sum_pi_squared=sp)
