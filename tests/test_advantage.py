"""Parity of luspo-rs's group advantage estimators (``luspo_rs.advantage``
and the ``luspo_rs.core_algos`` drop-ins over it) with verl 0.9.1's own
functions (imported from the installed verl), over random batches; bad input.

Tolerances: float32 inputs 1e-5 abs + 1e-5 rel (verl accumulates in float32,
we in float64), float64 inputs 1e-10 abs + 1e-10 rel (grpo_vectorized: the
float32 tolerance, see ``float64_tol``).
"""

from __future__ import annotations

import typing
import uuid

import numpy as np
import pytest
import torch
from conftest import check_public_op, stable_seed
from verl.trainer.config import AlgoConfig
from verl.trainer.ppo import core_algos as verl_ca

import luspo_rs
from luspo_rs import core_algos as ours
from luspo_rs.advantage import Estimator, GroupEstimator

ESTIMATORS = {
    "grpo": "compute_grpo_outcome_advantage",
    "grpo_vectorized": "compute_grpo_vectorized_outcome_advantage",
    "rloo": "compute_rloo_outcome_advantage",
    "rloo_vectorized": "compute_rloo_vectorized_outcome_advantage",
    "reinforce_plus_plus_baseline": "compute_reinforce_plus_plus_baseline_outcome_advantage",
    "opo": "compute_opo_outcome_advantage",
    "gpg": "compute_gpg_outcome_advantage",
    "grpo_passk": "compute_grpo_passk_outcome_advantage",
    "gdpo": "compute_gdpo_outcome_advantage",
}
#: The estimators whose output verl whitens over the batch's valid tokens (verl raises below 2).
WHITENED = ("reinforce_plus_plus_baseline", "gdpo")
#: Arguments verl requires beyond the tensors (grpo_passk asserts a config).
VERL_KW = {"grpo_passk": dict(config=AlgoConfig())}


def sizes_for(name: str, sizes: list[int]) -> list[int]:
    """grpo_passk refuses groups of one row (verl's ValueError; tests/test_passk_gdpo.py
    checks it): its singletons become pairs."""
    return [max(s, 2) for s in sizes] if name == "grpo_passk" else sizes

TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float64: dict(atol=1e-10, rtol=1e-10)}


def group_layout(kind: str, rng: np.random.Generator) -> list[int]:
    """Group sizes of a batch: all 1, all 2, all 16, or a random mix (with singletons)."""
    if kind == "mixed":
        return [int(s) for s in rng.choice([1, 2, 3, 5, 16], size=12)]
    return [int(kind)] * {"1": 24, "2": 16, "16": 4}[kind]


def make_batch(sizes, index_kind, rng, dtype=torch.float32, mask_dtype=torch.float32, T=24, binary=False):
    B = sum(sizes)
    labels = np.repeat(np.arange(len(sizes)), sizes)
    perm = rng.permutation(B)  # groups interleaved, as after a shuffle
    labels = labels[perm]
    if index_kind == "uid":
        uids = [str(uuid.UUID(int=int(rng.integers(1 << 62)))) for _ in sizes]
        index = np.array([uids[g] for g in labels], dtype=object)
    elif index_kind == "int":
        index = (labels * 7919 + 3).astype(np.int64)
    else:
        raise AssertionError(index_kind)
    lengths = rng.integers(1, T + 1, size=B)
    mask = torch.from_numpy(np.arange(T)[None, :] < lengths[:, None]).to(mask_dtype)
    if binary:  # outcome reward 0/1 on the last valid token: equal scores within groups happen
        rewards = torch.zeros(B, T, dtype=dtype)
        rewards[torch.arange(B), torch.from_numpy(lengths - 1)] = torch.from_numpy(rng.integers(0, 2, B)).to(dtype)
    else:
        rewards = torch.from_numpy(rng.normal(size=(B, T))).to(dtype)
    return rewards, mask, index


def run_both(name, rewards, mask, index, **kw):
    fn = ESTIMATORS[name]
    kw = {**VERL_KW.get(name, {}), **kw}
    want, want_ret = getattr(verl_ca, fn)(token_level_rewards=rewards.clone(), response_mask=mask, index=index, **kw)
    got, got_ret = getattr(ours, fn)(token_level_rewards=rewards.clone(), response_mask=mask, index=index, **kw)
    return want, got, want_ret, got_ret


@pytest.mark.parametrize("name", sorted(ESTIMATORS))
@pytest.mark.parametrize("layout", ["1", "2", "16", "mixed"])
@pytest.mark.parametrize("index_kind", ["uid", "int"])
def test_estimator_matches_verl(name, layout, index_kind):
    rng = np.random.default_rng(stable_seed(name, layout, index_kind))
    sizes = sizes_for(name, group_layout(layout, rng))
    if name in WHITENED and sum(sizes) < 2:
        pytest.skip("needs two valid tokens")
    rewards, mask, index = make_batch(sizes, index_kind, rng)
    want, got, want_ret, got_ret = run_both(name, rewards, mask, index)
    assert got.dtype == want.dtype and got.shape == want.shape
    torch.testing.assert_close(got, want, **TOL[torch.float32])
    torch.testing.assert_close(got_ret, want_ret, **TOL[torch.float32])


@pytest.mark.parametrize("name", sorted(ESTIMATORS))
def test_estimator_float64_and_bool_mask(name):
    rng = np.random.default_rng(7)
    rewards, mask, index = make_batch(sizes_for(name, group_layout("mixed", rng)), "uid", rng, dtype=torch.float64, mask_dtype=torch.bool)
    want, got, _, _ = run_both(name, rewards, mask, index)
    assert got.dtype == want.dtype == torch.float64
    torch.testing.assert_close(got, want, **float64_tol(name))


def float64_tol(name):
    """verl's grpo_vectorized computes the group statistics in float32
    (verl.utils.groupwise.group_mean_std casts the scores) even for float64
    scores; that float32 step is not reproducible to float64 precision (torch's
    CPU float32 sqrt is MKL's, not correctly rounded; on CUDA index_add_ sums
    with atomics in no fixed order), so it agrees to float32 precision only.
    Every other estimator, reinforce_plus_plus_baseline's float32 mask count
    and Bessel factor included, matches to float64 precision."""
    return TOL[torch.float32] if name == "grpo_vectorized" else TOL[torch.float64]


@pytest.mark.parametrize("mask_dtype", [torch.float32, torch.bool, torch.int64, torch.float64], ids=str)
@pytest.mark.parametrize("layout", ["1", "16", "mixed"])
@pytest.mark.parametrize("name", sorted(ESTIMATORS))
def test_float64_rewards_match_verl_for_every_mask_dtype(name, layout, mask_dtype):
    # The inputs of tests/test_cuda.py's estimator test (float64 rewards, T=40), on the CPU.
    rng = np.random.default_rng(stable_seed(name, layout, "uid", str(torch.float64)))
    rewards, mask, index = make_batch(sizes_for(name, group_layout(layout, rng)), "uid", rng, dtype=torch.float64, T=40)
    want, got, _, _ = run_both(name, rewards, mask.to(mask_dtype), index)
    assert got.dtype == want.dtype == torch.float64
    torch.testing.assert_close(got, want, **float64_tol(name))


@pytest.mark.parametrize("name", sorted(ESTIMATORS))
def test_estimator_binary_rewards_with_tied_groups(name):
    rng = np.random.default_rng(11)
    rewards, mask, index = make_batch(sizes_for(name, group_layout("mixed", rng)), "uid", rng, binary=True, mask_dtype=torch.int64)
    want, got, _, _ = run_both(name, rewards, mask, index)
    torch.testing.assert_close(got, want, **TOL[torch.float32])


@pytest.mark.parametrize("norm", [True, False], ids=["grpo", "dr_grpo"])
@pytest.mark.parametrize("fn", ["compute_grpo_outcome_advantage", "compute_grpo_vectorized_outcome_advantage"])
def test_grpo_norm_by_std_and_epsilon(fn, norm):
    rng = np.random.default_rng(3)
    rewards, mask, index = make_batch(group_layout("mixed", rng), "uid", rng)
    kw = dict(norm_adv_by_std_in_grpo=norm, epsilon=1e-2)
    want, _ = getattr(verl_ca, fn)(rewards.clone(), mask, index, **kw)
    got, _ = getattr(ours, fn)(rewards.clone(), mask, index, **kw)
    torch.testing.assert_close(got, want, **TOL[torch.float32])


def test_gpg_alpha_is_verls_float32_with_float64_rewards():
    # fuzz finding: verl's alpha = bsz / m.clamp(min=1) is float32 (1/m, then
    # times bsz) even for float64 rewards; 7 rows, 3 non-zero scores
    rewards = torch.tensor([[1.0], [1.0], [0.0], [0.0], [1.0], [0.0], [0.0]], dtype=torch.float64)
    mask = torch.ones(7, 1)
    index = np.array(list("abcdefg"), dtype=object)
    want, _ = verl_ca.compute_gpg_outcome_advantage(rewards.clone(), mask, index, f_norm=2.5)
    got, _ = ours.compute_gpg_outcome_advantage(rewards.clone(), mask, index, f_norm=2.5)
    torch.testing.assert_close(got, want, **TOL[torch.float64])
    assert got[0, 0].item() == want[0, 0].item() == 0.9333333969116211


def test_gpg_f_norm():
    rng = np.random.default_rng(5)
    rewards, mask, index = make_batch(group_layout("2", rng), "uid", rng)
    want, _ = verl_ca.compute_gpg_outcome_advantage(rewards.clone(), mask, index, f_norm=2.5)
    got, _ = ours.compute_gpg_outcome_advantage(rewards.clone(), mask, index, f_norm=2.5)
    torch.testing.assert_close(got, want, **TOL[torch.float32])


def test_singleton_groups_behave_as_verl():
    """Singletons: grpo -> s/(1+eps), rloo/opo/gpg -> s, rloo_vectorized -> 0."""
    rewards = torch.tensor([[1.0, 2.0], [3.0, 0.0], [5.0, 0.0]])
    mask = torch.ones(3, 2)
    index = np.array(["a", "b", "c"], dtype=object)
    s = torch.tensor([3.0, 3.0, 5.0])[:, None].expand(3, 2)
    grpo, _ = ours.compute_grpo_outcome_advantage(rewards, mask, index)
    torch.testing.assert_close(grpo, s / torch.tensor(1.0 + 1e-6, dtype=torch.float32))
    for fn in ("compute_rloo_outcome_advantage", "compute_opo_outcome_advantage", "compute_gpg_outcome_advantage"):
        torch.testing.assert_close(getattr(ours, fn)(rewards, mask, index)[0], s)
    assert torch.equal(ours.compute_rloo_vectorized_outcome_advantage(rewards, mask, index)[0], torch.zeros(3, 2))


def test_advantages_and_returns_are_the_same_tensor_like_verl():
    rng = np.random.default_rng(0)
    rewards, mask, index = make_batch([2, 2], "uid", rng)
    adv, ret = ours.compute_grpo_outcome_advantage(rewards, mask, index)
    assert adv is ret


def test_index_kinds_agree():
    """uid strings, numpy ints, python lists, torch ints and numpy str arrays group identically."""
    rng = np.random.default_rng(1)
    rewards, mask, index = make_batch(group_layout("mixed", rng), "uid", rng)
    codes = np.unique(index, return_inverse=True)[1]
    ref, _ = ours.compute_grpo_outcome_advantage(rewards, mask, index)
    for other in (codes, codes.astype(np.int32), list(index), torch.from_numpy(codes), index.astype(str)):
        got, _ = ours.compute_grpo_outcome_advantage(rewards, mask, other)
        assert torch.equal(got, ref), type(other)


def test_deterministic_across_runs():
    rng = np.random.default_rng(2)
    rewards, mask, index = make_batch(group_layout("16", rng), "uid", rng, T=300)
    a, _ = ours.compute_reinforce_plus_plus_baseline_outcome_advantage(rewards, mask, index)
    b, _ = ours.compute_reinforce_plus_plus_baseline_outcome_advantage(rewards, mask, index)
    assert torch.equal(a, b)


def test_bad_input_names_the_argument():
    r, m = torch.zeros(4, 3), torch.ones(4, 3)
    idx = np.array(["a", "a", "b", "b"], dtype=object)
    with pytest.raises(ValueError, match="index"):
        ours.compute_grpo_outcome_advantage(r, m, idx[:3])
    with pytest.raises(ValueError, match="response_mask"):
        ours.compute_grpo_outcome_advantage(r, m[:, :2], idx)
    with pytest.raises(ValueError, match="token_level_rewards"):
        ours.compute_grpo_outcome_advantage(torch.zeros(0, 3), torch.ones(0, 3), idx[:0])
    with pytest.raises(TypeError, match="token_level_rewards"):
        ours.compute_grpo_outcome_advantage(torch.zeros(4, 3, dtype=torch.int64), m, idx)
    with pytest.raises(TypeError, match="token_level_rewards"):
        ours.compute_grpo_outcome_advantage(np.zeros((4, 3)), m, idx)
    with pytest.raises(ValueError, match="index"):
        ours.compute_rloo_outcome_advantage(r, m, None)
    unhashable = np.empty(4, dtype=object)
    for i in range(4):
        unhashable[i] = [i]
    with pytest.raises(TypeError, match="index"):
        ours.compute_grpo_outcome_advantage(r, m, unhashable)


def test_estimators_on_index_with_numpy_ints_and_many_groups():
    g = torch.Generator().manual_seed(0)
    rewards = torch.randn(64, 8, generator=g)
    mask = torch.ones(64, 8)
    index = np.repeat(np.arange(32) * 1_000_003, 2)  # large labels: hashed path
    want, _ = verl_ca.compute_grpo_outcome_advantage(rewards.clone(), mask, index)
    got, _ = ours.compute_grpo_outcome_advantage(rewards.clone(), mask, index)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", sorted(ESTIMATORS))
def test_public_advantage_matches_verl(name):
    """``luspo_rs.advantage(..., estimator)`` is verl's estimator, and the
    drop-in's bits."""
    rng = np.random.default_rng(stable_seed("public", name))
    rewards, mask, index = make_batch(sizes_for(name, group_layout("mixed", rng)), "uid", rng, mask_dtype=torch.bool)
    kw = VERL_KW.get(name, {})
    want, _ = getattr(verl_ca, ESTIMATORS[name])(token_level_rewards=rewards.clone(), response_mask=mask, index=index, **kw)
    got = luspo_rs.advantage(rewards, mask, index, name)
    assert isinstance(got, torch.Tensor) and got.dtype == want.dtype and got.shape == want.shape
    torch.testing.assert_close(got, want, **TOL[torch.float32])
    drop_in, _ = getattr(ours, ESTIMATORS[name])(token_level_rewards=rewards, response_mask=mask, index=index, **kw)
    assert torch.equal(got, drop_in)


@pytest.mark.parametrize(
    "name, kw",
    [
        ("grpo", dict(norm_adv_by_std_in_grpo=False)),
        ("grpo", dict(epsilon=1e-2)),
        ("grpo_vectorized", dict(norm_adv_by_std_in_grpo=False, epsilon=1e-2)),
        ("gpg", dict(f_norm=2.5)),
    ],
    ids=["dr_grpo", "grpo_epsilon", "grpo_vectorized", "gpg_f_norm"],
)
def test_public_advantage_parameters_match_verl(name, kw):
    rng = np.random.default_rng(4)
    rewards, mask, index = make_batch(group_layout("mixed", rng), "int", rng)
    want, _ = getattr(verl_ca, ESTIMATORS[name])(rewards.clone(), mask, index, **kw)
    got = luspo_rs.advantage(rewards, mask, index, name, **kw)
    torch.testing.assert_close(got, want, **TOL[torch.float32])


def test_public_advantage_defaults_to_grpo_and_reads_only_its_parameters():
    rng = np.random.default_rng(6)
    rewards, mask, index = make_batch(group_layout("2", rng), "uid", rng)
    grpo = luspo_rs.advantage(rewards, mask, index)
    assert torch.equal(grpo, luspo_rs.advantage(rewards, mask, index, "grpo", f_norm=7.0))
    rloo = luspo_rs.advantage(rewards, mask, index, "rloo")
    ignored = dict(epsilon=0.5, norm_adv_by_std_in_grpo=False)
    assert torch.equal(rloo, luspo_rs.advantage(rewards, mask, index, "rloo", **ignored))


def test_public_advantage_bad_input_names_the_argument():
    r, m = torch.zeros(4, 3), torch.ones(4, 3)
    idx = np.array(["a", "a", "b", "b"], dtype=object)
    with pytest.raises(ValueError, match="^estimator: unknown advantage estimator"):
        luspo_rs.advantage(r, m, idx, "ppo")
    with pytest.raises(TypeError, match="^estimator: expected a string"):
        luspo_rs.advantage(r, m, idx, None)
    with pytest.raises(ValueError, match="^index: the grpo estimator needs the group labels"):
        luspo_rs.advantage(r, m, None)
    with pytest.raises(TypeError, match="^epsilon: expected a number"):
        luspo_rs.advantage(r, m, idx, epsilon="small")
    with pytest.raises(ValueError, match="epsilon"):
        luspo_rs.advantage(r, m, idx, epsilon=float("nan"))
    with pytest.raises(TypeError, match="^response_mask: expected a torch.Tensor"):
        luspo_rs.advantage(r, m.numpy(), idx)
    with pytest.raises(ValueError, match="index"):
        luspo_rs.advantage(r, m, idx[:3], "opo")


def test_public_function_and_its_modes():
    check_public_op("advantage", "GroupEstimator", ESTIMATORS)
    # every estimator: the group ones, then the scans (tests/test_returns.py),
    # then the token baselines (tests/test_token_baseline.py)
    assert list(ours.ESTIMATORS) == list(typing.get_args(Estimator))
    assert list(typing.get_args(Estimator)) == list(typing.get_args(GroupEstimator)) + [
        "gae", "reinforce_plus_plus", "remax", "optimal_token_baseline", "tir_optimal_token_baseline"]  # fmt: skip
    for name in ESTIMATORS:
        fn = ours.ESTIMATORS[name]
        assert fn is getattr(ours, ESTIMATORS[name]) and fn.__name__ == ESTIMATORS[name]
        assert fn.__module__ == "luspo_rs.core_algos" and fn.__doc__
