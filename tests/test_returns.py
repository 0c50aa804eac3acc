"""Parity of the scan estimators (GAE, REINFORCE++, ReMax: ``luspo_rs.advantage``
and the ``luspo_rs.core_algos`` drop-ins over it) with verl 0.9.1's own
functions, imported from the installed verl: masks that are prefixes, masks
with observation spans inside a response (multi-turn), empty and full rows,
gamma and lam at 1 and below, the dtypes verl accepts; the batch verl
refuses; NaN; bad input.

Tolerances: on float32 and float64 inputs of one dtype the returns (and
ReMax's advantages) are bitwise verl's: the scans do verl's arithmetic step
for step. The whitened advantages differ by rounding only (verl sums the
whitening statistics in float32, we in float64): 1e-5 for float32, 1e-10 for
float64.
"""

from __future__ import annotations

import math
import typing

import numpy as np
import pytest
import torch
from conftest import stable_seed
from verl.trainer.ppo import core_algos as verl_ca

import luspo_rs
from luspo_rs import core_algos as ours
from luspo_rs.advantage import ScanEstimator

SCANS = {
    "gae": "compute_gae_advantage_return",
    "reinforce_plus_plus": "compute_reinforce_plus_plus_outcome_advantage",
    "remax": "compute_remax_outcome_advantage",
}
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float64: dict(atol=1e-10, rtol=1e-10)}
GAMMA_LAM = [(1.0, 1.0), (0.99, 0.95), (0.5, 0.0)]
#: (estimator, gamma, lam): lam is GAE's only; ReMax reads neither
SETTINGS = [("gae", g, l) for g, l in GAMMA_LAM] + [("reinforce_plus_plus", g, 1.0) for g in (1.0, 0.99, 0.5)] + \
    [("remax", 1.0, 1.0)]


class Config:
    """verl's AlgoConfig, as far as these estimators read it."""

    def __init__(self, gamma: float):
        self.gamma = gamma


def make(B, T, rng, dtype=torch.float32, mask_dtype=torch.float32, layout="holes"):
    """Rewards, values, baselines and a mask: ragged lengths (row 0 full,
    row 1 empty), and with ``layout="holes"`` observation spans (mask 0)
    inside some responses, as verl's multi-turn masks have."""
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
    rewards = torch.from_numpy(rng.normal(size=(B, T))).to(dtype)
    values = torch.from_numpy(rng.normal(size=(B, T))).to(dtype)
    baselines = torch.from_numpy(rng.normal(size=B)).to(dtype)
    return rewards, values, baselines, torch.from_numpy(mask).to(mask_dtype)


def call(impl, name, rewards, values, baselines, mask, gamma=1.0, lam=1.0):
    if name == "gae":
        return impl.compute_gae_advantage_return(rewards, values, mask, gamma=gamma, lam=lam)
    if name == "reinforce_plus_plus":
        return impl.compute_reinforce_plus_plus_outcome_advantage(rewards, mask, config=Config(gamma))
    return impl.compute_remax_outcome_advantage(rewards, baselines, mask, config=Config(gamma))


@pytest.mark.parametrize("name, gamma, lam", SETTINGS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("mask_dtype", ["same", torch.int64], ids=str)
@pytest.mark.parametrize("layout", ["prefix", "holes"])
# the CPU scan's shapes: lane groups of 16 rows (3, 9, 17, 33 pad the last
# one); column blocks of 512 (600: two); within a block, transposes in tiles of
# 16 columns, then of 8, then one by one (40 = 16 + 16 + 8, 13 = 8 + 5, 257 = 16 x 16 + 1)
@pytest.mark.parametrize("B, T", [(8, 40), (3, 257), (2, 1), (33, 13), (17, 600), (9, 600)])
def test_matches_verl(name, dtype, mask_dtype, layout, gamma, lam, B, T):
    rng = np.random.default_rng(stable_seed(name, str(dtype), str(mask_dtype), layout, gamma, lam, B, T))
    mask_dtype = dtype if mask_dtype == "same" else mask_dtype
    r, v, b, m = make(B, T, rng, dtype, mask_dtype, layout)
    if name != "remax" and m.sum() < 2:
        m[0, :] = 1  # verl's whitening needs two valid tokens (test_fewer_than_two_valid_tokens)
        m[:2, 0] = 1
    want_adv, want_ret = call(verl_ca, name, r.clone(), v.clone(), b.clone(), m, gamma, lam)
    got_adv, got_ret = call(ours, name, r.clone(), v.clone(), b.clone(), m, gamma, lam)
    assert got_adv.dtype == want_adv.dtype and got_ret.dtype == want_ret.dtype
    assert got_adv.shape == want_adv.shape == got_ret.shape == (B, T)
    # the scans: verl's arithmetic step for step
    assert torch.equal(got_ret, want_ret)
    if name == "remax":
        assert torch.equal(got_adv, want_adv)
    else:
        torch.testing.assert_close(got_adv, want_adv, **TOL[dtype])


@pytest.mark.parametrize("name", sorted(SCANS))
@pytest.mark.parametrize("which", ["rewards", "values", "mask", "all"])
def test_strided_inputs_take_the_general_path_to_the_same_bits(name, which):
    # a column-strided view is not a contiguous run: the CPU scan converts it
    # through row buffers (and GAE's returns go through the transpose, not the
    # row-wise add), with the same arithmetic as verl's, bit for bit
    rng = np.random.default_rng(stable_seed(name, which))
    r, v, b, m = make(19, 530, rng, torch.float32, torch.int64)
    strided = lambda x: torch.stack([x, torch.zeros_like(x)], dim=-1)[..., 0]  # noqa: E731
    args = {"rewards": r, "values": v, "mask": m}
    if which == "all":
        args = {k: strided(x) for k, x in args.items()}
    else:
        args[which] = strided(args[which])
    assert which == "all" or not args[which].is_contiguous()
    want_adv, want_ret = call(verl_ca, name, args["rewards"].clone(), args["values"].clone(), b, args["mask"], 0.9, 0.8)
    got_adv, got_ret = call(ours, name, args["rewards"], args["values"], b, args["mask"], 0.9, 0.8)
    assert torch.equal(got_ret, want_ret)
    torch.testing.assert_close(got_adv, want_adv, **TOL[torch.float32])


@pytest.mark.parametrize("name", sorted(SCANS))
@pytest.mark.parametrize("mask_dtype", [torch.float64, torch.int32, torch.float32], ids=str)
def test_mixed_dtypes_promote_like_verl(name, mask_dtype):
    # float32 inputs with a float64 mask compute in float64 (verl's promotion,
    # except verl's last token, computed before anything is float64): close, not bitwise
    rng = np.random.default_rng(stable_seed(name, str(mask_dtype)))
    r, v, b, m = make(6, 30, rng, torch.float32, mask_dtype)
    b = b.double()  # ReMax's baselines in float64 promote its advantages
    want_adv, want_ret = call(verl_ca, name, r.clone(), v.clone(), b, m, 0.9, 0.8)
    got_adv, got_ret = call(ours, name, r.clone(), v.clone(), b, m, 0.9, 0.8)
    assert (got_adv.dtype, got_ret.dtype) == (want_adv.dtype, want_ret.dtype)
    torch.testing.assert_close(got_ret, want_ret, **TOL[torch.float32])
    torch.testing.assert_close(got_adv, want_adv, **TOL[torch.float32])


@pytest.mark.parametrize("name", sorted(SCANS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_16_bit_inputs_are_computed_in_float32(name, dtype):
    # verl rounds to 16 bits at every step; we compute in float32 and round
    # once, so we compare with verl run on the same values in float32
    rng = np.random.default_rng(stable_seed(name, str(dtype)))
    r, v, b, m = make(6, 50, rng, dtype, torch.int64)
    got_adv, got_ret = call(ours, name, r, v, b, m, 0.99, 0.95)
    want_adv, want_ret = call(verl_ca, name, r.float(), v.float(), b.float(), m, 0.99, 0.95)
    assert got_adv.dtype == got_ret.dtype == dtype  # verl's dtype for these inputs
    tol = dict(atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(got_ret.float(), want_ret, **tol)
    torch.testing.assert_close(got_adv.float(), want_adv, **tol)


def test_long_rows_go_through_in_pieces():
    # rows longer than the CPU kernels' 65536-token piece: the state is carried across pieces
    rng = np.random.default_rng(5)
    r, v, b, m = make(2, 65536 + 77, rng, torch.float32, torch.float32, "holes")
    for name in ("gae", "remax"):
        want_adv, want_ret = call(verl_ca, name, r.clone(), v.clone(), b.clone(), m, 0.999, 0.99)
        got_adv, got_ret = call(ours, name, r.clone(), v.clone(), b.clone(), m, 0.999, 0.99)
        assert torch.equal(got_ret, want_ret), name
        torch.testing.assert_close(got_adv, want_adv, **TOL[torch.float32])


@pytest.mark.parametrize("name", ["gae", "reinforce_plus_plus"])
@pytest.mark.parametrize("valid", [0, 1])
def test_fewer_than_two_valid_tokens(name, valid):
    """verl's whitening raises; the advantages here are NaN (on both devices:
    raising on CUDA would need a host sync) and the returns are verl's scan."""
    r, v, b, m = make(3, 6, np.random.default_rng(1), layout="prefix")
    m = torch.zeros_like(m)
    m[2, 4] = float(valid)
    with pytest.raises(ValueError, match="mask"):
        call(verl_ca, name, r.clone(), v.clone(), b, m, 0.9, 0.9)
    adv, ret = call(ours, name, r.clone(), v.clone(), b, m, 0.9, 0.9)
    assert torch.isnan(adv).all()
    # the returns of the same scan on a batch verl accepts, row by row
    m2 = m.clone()
    m2[0, 0] = m2[0, 1] = 1.0
    _, want_ret = call(verl_ca, name, r.clone(), v.clone(), b, m2, 0.9, 0.9)
    torch.testing.assert_close(ret[1:], want_ret[1:], atol=0, rtol=0)


@pytest.mark.parametrize("mask_dtype", [torch.float64, torch.float32, torch.int64], ids=str)
@pytest.mark.parametrize("name", ["gae", "reinforce_plus_plus"])
def test_whitening_keeps_its_digits_far_from_zero_mean(name, mask_dtype):
    """Raw advantages (or returns) near 53 with a spread of 1e-3: statistics kept
    as raw sums of x and x^2 lose about 8 of float64's digits to cancellation
    (a fuzz finding: 5e-9 off verl at a spread of 6e-3); centred moments agree
    to float64 precision."""
    rng = np.random.default_rng(7)
    B, T = 11, 40
    lengths = torch.from_numpy(rng.integers(1, T + 1, size=B))
    m = (torch.arange(T)[None, :] < lengths[:, None]).to(mask_dtype)
    if name == "gae":  # gamma = lam = 1: g_t = (rewards from t on) - v_t = 3 + 50 + noise
        r = torch.zeros(B, T, dtype=torch.float64)
        r[torch.arange(B), lengths - 1] = 3.0
        v = torch.from_numpy(-50.0 + 1e-3 * rng.standard_normal((B, T)))
    else:  # returns near 53: 53 on each last token, tiny rewards before it
        r = torch.from_numpy(1e-4 * rng.standard_normal((B, T)))
        r[torch.arange(B), lengths - 1] = 53.0
        v = None
    want, _ = call(verl_ca, name, r.clone(), None if v is None else v.clone(), None, m, 1.0, 1.0)
    got, _ = call(ours, name, r.clone(), None if v is None else v.clone(), None, m, 1.0, 1.0)
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("name", sorted(SCANS))
def test_nan_propagates_as_in_verl(name):
    # a NaN reward at a valid token poisons the whitening (GAE, REINFORCE++)
    # or its row's earlier returns; a NaN value at an observation token is
    # carried as verl carries it (0 * NaN)
    rng = np.random.default_rng(stable_seed(name, "nan"))
    r, v, b, m = make(5, 12, rng, layout="holes")
    r[3, 2] = float("nan")
    hole = (m[:, 1:-1] == 0).nonzero()
    if len(hole):
        v[hole[0, 0], hole[0, 1] + 1] = float("nan")
    want = call(verl_ca, name, r.clone(), v.clone(), b, m, 0.9, 0.9)
    got = call(ours, name, r.clone(), v.clone(), b, m, 0.9, 0.9)
    for g, w in zip(got, want):
        assert torch.equal(torch.isnan(g), torch.isnan(w))
        torch.testing.assert_close(g, w, equal_nan=True, **TOL[torch.float32])


def test_bool_masks_are_read_as_zero_and_one():
    # verl's GAE and REINFORCE++ compute `1 - mask`, which torch refuses for a
    # bool mask; here a bool mask is the 0/1 mask it stands for
    # (20 x 1100: whole tiles and blocks of the CPU scan, not only a ragged end)
    for B, T in [(4, 9), (20, 1100)]:
        r, v, b, m = make(B, T, np.random.default_rng(3))
        for name in ("gae", "reinforce_plus_plus"):
            got = call(ours, name, r, v, b, m.bool(), 0.9, 0.9)
            want = call(ours, name, r, v, b, m, 0.9, 0.9)
            assert all(torch.equal(g, w) for g, w in zip(got, want))
    r, v, b, m = make(4, 9, np.random.default_rng(3))
    # ReMax takes it in verl too
    assert all(torch.equal(g, w) for g, w in zip(call(ours, "remax", r, v, b, m.bool()),
                                                 call(verl_ca, "remax", r, v, b, m.bool())))


@pytest.mark.parametrize("name", ["gae", "reinforce_plus_plus"])
@pytest.mark.parametrize("mask_dtype, odd", [(torch.int64, 2), (torch.int64, -1), (torch.float32, 0.5), (torch.float32, -0.0)],
                         ids=["int64-2", "int64--1", "float32-0.5", "float32--0.0"])
def test_mask_values_other_than_0_and_1_inside_long_rows_match_verl(name, mask_dtype, odd):
    # with AVX-512 the CPU scan reads a 0/1 mask as bits, sixteen columns at a
    # time; a tile holding another value (-0.0 included: verl's products give
    # other signs of zero with it) goes, with the rest of its block, through
    # the path that multiplies by the mask's value, as verl does
    rng = np.random.default_rng(stable_seed(name, str(mask_dtype), odd))
    r, v, b, m = make(20, 1100, rng)
    m = m.to(mask_dtype)
    for i, t in [(3, 700), (17, 5), (19, 1099), (0, 512)]:
        m[i, t] = odd
    want_adv, want_ret = call(verl_ca, name, r.clone(), v.clone(), b, m, 0.9, 0.8)
    got_adv, got_ret = call(ours, name, r, v, b, m, 0.9, 0.8)
    assert torch.equal(got_ret, want_ret)
    torch.testing.assert_close(got_adv, want_adv, **TOL[torch.float32])


def test_public_entry_point():
    r, v, b, m = make(4, 9, np.random.default_rng(4))
    adv, ret = ours.compute_gae_advantage_return(r, v, m, gamma=0.9, lam=0.8)
    assert torch.equal(luspo_rs.advantage(r, m, estimator="gae", values=v, gamma=0.9, lam=0.8), adv)
    a2, r2 = luspo_rs.advantage(r, m, None, "gae", values=v, gamma=0.9, lam=0.8, with_returns=True)
    assert torch.equal(a2, adv) and torch.equal(r2, ret)
    # the group estimators return verl's pair (the same tensor twice) too
    out = luspo_rs.advantage(r, m, np.arange(4) // 2, "grpo", with_returns=True)
    assert out[0] is out[1]
    assert list(typing.get_args(ScanEstimator)) == list(SCANS)
    for name, fn_name in SCANS.items():
        fn = ours.ESTIMATORS[name]
        assert fn is getattr(ours, fn_name) and fn.__name__ == fn_name and fn.__doc__
        assert fn.__module__ == "luspo_rs.core_algos"


def test_bad_input_names_the_argument():
    r, v, b, m = make(4, 9, np.random.default_rng(6))
    with pytest.raises(ValueError, match="^values: the gae estimator needs it"):
        luspo_rs.advantage(r, m, estimator="gae")
    with pytest.raises(ValueError, match="^reward_baselines: the remax estimator needs it"):
        luspo_rs.advantage(r, m, estimator="remax")
    with pytest.raises(ValueError, match="^values: shape"):
        luspo_rs.advantage(r, m, estimator="gae", values=v[:, :5])
    with pytest.raises(ValueError, match="^reward_baselines: expected one baseline per row"):
        luspo_rs.advantage(r, m, estimator="remax", reward_baselines=b[:, None])
    with pytest.raises(TypeError, match="^token_level_rewards: expected a floating-point tensor"):
        luspo_rs.advantage(r.long(), m, estimator="reinforce_plus_plus")
    with pytest.raises(TypeError, match="^values: expected a torch.Tensor"):
        luspo_rs.advantage(r, m, estimator="gae", values=v.numpy())
    with pytest.raises(ValueError, match="^gamma: must be finite"):
        luspo_rs.advantage(r, m, estimator="reinforce_plus_plus", gamma=math.nan)
    with pytest.raises(TypeError, match="^lam: expected a number"):
        luspo_rs.advantage(r, m, estimator="gae", values=v, lam=None)
    with pytest.raises(ValueError, match="^token_level_rewards: expected a 2-D"):
        luspo_rs.advantage(r[0], m[0], estimator="reinforce_plus_plus")
    with pytest.raises(ValueError, match="^token_level_rewards: empty batch"):
        luspo_rs.advantage(r[:0], m[:0], estimator="gae", values=v[:0])
    with pytest.raises(ValueError, match="^response_mask: shape"):
        luspo_rs.advantage(r, m[:, :3], estimator="remax", reward_baselines=b)
    with pytest.raises(ValueError, match="^config: "):
        ours.compute_reinforce_plus_plus_outcome_advantage(r, m)
    with pytest.raises(ValueError, match='unknown advantage estimator "gea".*"gae"'):
        luspo_rs.advantage(r, m, np.arange(4), "gea")
