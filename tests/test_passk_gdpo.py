"""verl's ``grpo_passk`` (Pass@k) and ``gdpo`` estimators: the cases the
parametrised parity of tests/test_advantage.py does not draw -- ties and
NaN in Pass@k, its ValueError and config rules; GDPO's per-key path
(``config.gdpo_reward_keys``, ``non_tensor_batch``, ``batch``), its weights,
its float32 steps and errors; multi-turn masks, fully masked rows and every
mask dtype for both. Every reference is verl 0.9.1's own function.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_advantage import TOL, make_batch
from verl.trainer.config import AlgoConfig
from verl.trainer.ppo import core_algos as verl_ca

import luspo_rs
from luspo_rs import core_algos as ours

PASSK = "compute_grpo_passk_outcome_advantage"
GDPO = "compute_gdpo_outcome_advantage"
MASK_DTYPES = [torch.float32, torch.bool, torch.int64, torch.float64]


def both(fn, rewards, *args, **kw):
    """verl's and our ``fn`` on the same inputs (verl gets its own copy of the rewards)."""
    want, want_ret = getattr(verl_ca, fn)(rewards.clone(), *args, **kw)
    got, got_ret = getattr(ours, fn)(rewards.clone(), *args, **kw)
    assert got_ret is got and got.dtype == want.dtype and got.shape == want.shape
    return got, want


def masks(kind: str, B: int, T: int, rng: np.random.Generator) -> torch.Tensor:
    """prefix (ragged right padding), multi-turn (holes inside the response),
    some fully masked rows, or all ones."""
    if kind == "ones":
        return torch.ones(B, T, dtype=torch.bool)
    lengths = rng.integers(1, T + 1, size=B)
    m = np.arange(T)[None, :] < lengths[:, None]
    if kind == "multi_turn":  # observation tokens (0) inside each response
        m &= rng.random((B, T)) < 0.7
        m[:, 0] = True
    elif kind == "empty_rows":
        m[rng.random(B) < 0.3] = False
        m[0, 0] = m[1, 0] = True  # at least two valid tokens in the batch (the whitening)
    return torch.from_numpy(m)


# --------------------------------------------------------------------------- grpo_passk


@pytest.mark.parametrize("mask_dtype", MASK_DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["prefix", "multi_turn", "empty_rows", "ones"])
@pytest.mark.parametrize("norm", [True, False], ids=["std", "no_std"])
def test_passk_matches_verl_for_mask_kinds_and_dtypes(norm, kind, mask_dtype):
    rng = np.random.default_rng([1, len(kind), int(norm)])
    sizes = [int(s) for s in rng.choice([2, 3, 4, 8, 16], size=10)]
    rewards, _, index = make_batch(sizes, "uid", rng, dtype=torch.float64 if mask_dtype == torch.float64 else torch.float32)
    mask = masks(kind, sum(sizes), rewards.shape[1], rng).to(mask_dtype)
    got, want = both(PASSK, rewards, mask, index, config=AlgoConfig(norm_adv_by_std_in_grpo=norm))
    torch.testing.assert_close(got, want, **TOL[got.dtype])
    # one non-zero row per group at most, the best one
    assert int((got.abs().sum(-1) > 0).sum()) <= len(sizes)


@pytest.mark.parametrize("size", [2, 3, 4, 5, 8, 16, 50, 130])
def test_passk_ties_give_verls_numbers(size):
    """Integer scores with tied maxima (and all-equal groups): the tie gives
    0 whichever tied row is "the max", so ours has verl's zeros exactly (and,
    without std, every value; verl's float32 std may differ by an ulp)."""
    rng = np.random.default_rng(size)
    groups = 6
    B = groups * size
    scores = rng.integers(0, 3, size=B).astype(np.float32)
    scores[:size] = 2.0  # one all-equal group
    rewards = torch.zeros(B, 4)
    rewards[:, -1] = torch.from_numpy(scores)
    index = np.repeat(np.arange(groups), size)[rng.permutation(B)]
    for cfg in (AlgoConfig(), AlgoConfig(norm_adv_by_std_in_grpo=False)):
        got, want = both(PASSK, rewards, torch.ones(B, 4), index, config=cfg)
        assert torch.equal(got == 0, want == 0)
        if cfg.norm_adv_by_std_in_grpo:
            torch.testing.assert_close(got, want, **TOL[torch.float32])
        else:
            assert torch.equal(got, want)


def test_passk_tied_best_is_the_first_row_of_the_group():
    """The documented rule, seen where it matters: epsilon=0 and an all-equal
    group give 0 / 0 = NaN on the best row. verl's CPU topk picks the first
    tied row in groups of up to 3 rows (ours too, so the same row is NaN);
    beyond that its choice is implementation-defined, ours stays the first."""
    for size in (2, 3):
        rewards = torch.full((2 * size, 1), 1.5)
        index = np.tile(["a", "b"], size).astype(object)  # groups interleaved
        got, want = both(PASSK, rewards, torch.ones(2 * size, 1), index, epsilon=0.0, config=AlgoConfig())
        torch.testing.assert_close(got, want, equal_nan=True)
        assert torch.isnan(got[:2]).all() and not torch.isnan(got[2:]).any()
    rewards = torch.full((8, 1), 1.5)
    got, _ = ours.compute_grpo_passk_outcome_advantage(rewards, torch.ones(8, 1), np.zeros(8), 0.0, config=AlgoConfig())
    assert torch.isnan(got[0]).all() and torch.equal(got[1:], torch.zeros(7, 1))


@pytest.mark.parametrize("size", [2, 3])
def test_passk_nan_score_is_the_largest_as_verls_topk(size):
    rewards = torch.tensor([[1.0], [float("nan")], [0.5], [3.0], [2.0], [-1.0]])[: 2 * size]
    index = np.repeat(["x", "y"], size).astype(object)
    got, want = both(PASSK, rewards, torch.ones(2 * size, 1), index, config=AlgoConfig())
    torch.testing.assert_close(got, want, equal_nan=True)
    assert torch.isnan(got[1]).all() and int(torch.isnan(got).sum()) == 1


def test_passk_groups_of_one_row_raise_as_verl():
    rng = np.random.default_rng(2)
    rewards, mask, index = make_batch([2, 1, 3], "uid", rng)
    with pytest.raises(ValueError, match="Pass@k requires at least 2 samples per group"):
        verl_ca.compute_grpo_passk_outcome_advantage(rewards.clone(), mask, index, config=AlgoConfig())
    lone = index[np.unique(index, return_counts=True)[1][np.unique(index, return_inverse=True)[1]] == 1][0]
    with pytest.raises(ValueError, match=f"^index: grpo_passk .* at least 2 responses per group, got 1 for group '{lone}'"):
        ours.compute_grpo_passk_outcome_advantage(rewards, mask, index, config=AlgoConfig())
    with pytest.raises(ValueError, match="^index: grpo_passk"):
        luspo_rs.advantage(rewards, mask, torch.tensor([0, 0, 7, 1, 1, 1]), "grpo_passk")


def test_passk_reads_the_config_not_the_argument_and_needs_it():
    rng = np.random.default_rng(3)
    rewards, mask, index = make_batch([4] * 6, "uid", rng)
    for cfg_norm in (True, False):
        cfg = AlgoConfig(norm_adv_by_std_in_grpo=cfg_norm)
        got, want = both(PASSK, rewards, mask, index, norm_adv_by_std_in_grpo=not cfg_norm, config=cfg)
        torch.testing.assert_close(got, want, **TOL[torch.float32])
    normed = luspo_rs.advantage(rewards, mask, index, "grpo_passk")
    plain = luspo_rs.advantage(rewards, mask, index, "grpo_passk", norm_adv_by_std_in_grpo=False)
    assert not torch.equal(normed, plain)
    # a plain dict config, and epsilon
    got, want = both(PASSK, rewards, mask, index, 1e-2, config={"norm_adv_by_std_in_grpo": True})
    torch.testing.assert_close(got, want, **TOL[torch.float32])
    with pytest.raises(AssertionError):
        verl_ca.compute_grpo_passk_outcome_advantage(rewards.clone(), mask, index)
    with pytest.raises(ValueError, match="^config: compute_grpo_passk_outcome_advantage needs the algorithm config"):
        ours.compute_grpo_passk_outcome_advantage(rewards, mask, index)


# --------------------------------------------------------------------------- gdpo, one key


@pytest.mark.parametrize("mask_dtype", MASK_DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["prefix", "multi_turn", "empty_rows", "ones"])
def test_gdpo_matches_verl_for_mask_kinds_and_dtypes(kind, mask_dtype):
    rng = np.random.default_rng([2, len(kind)])
    sizes = [int(s) for s in rng.choice([1, 2, 3, 8], size=10)]
    rewards, _, index = make_batch(sizes, "int", rng, dtype=torch.float64 if mask_dtype == torch.float64 else torch.float32)
    mask = masks(kind, sum(sizes), rewards.shape[1], rng).to(mask_dtype)
    for kw in (dict(), dict(norm_adv_by_std_in_grpo=False), dict(epsilon=1e-2)):
        got, want = both(GDPO, rewards, mask, index, **kw)
        torch.testing.assert_close(got, want, **TOL[got.dtype])
        assert torch.equal(got, luspo_rs.advantage(rewards, mask, index, "gdpo", **kw))


def test_gdpo_is_whitened_grpo():
    """verl's one-key gdpo: grpo times a float32 weight 1, whitened over the
    valid tokens, masked (values masked out stay 0)."""
    rng = np.random.default_rng(4)
    rewards, mask, index = make_batch([4] * 8, "uid", rng)
    got, _ = ours.compute_gdpo_outcome_advantage(rewards, mask, index)
    grpo, _ = verl_ca.compute_grpo_outcome_advantage(rewards.clone(), mask, index)
    torch.testing.assert_close(got, verl_ca.verl_F.masked_whiten(grpo, mask) * mask, **TOL[torch.float32])
    valid = got[mask.bool()]
    assert abs(valid.mean().item()) < 1e-5 and abs(valid.std().item() - 1) < 1e-4
    assert torch.equal(got[~mask.bool()], torch.zeros(int((~mask.bool()).sum())))


def test_gdpo_with_at_most_one_valid_token_does_not_raise():
    """verl's masked_var raises; ours (as reinforce_plus_plus_baseline) returns 0 / NaN (documented)."""
    rewards = torch.randn(4, 3)
    mask = torch.zeros(4, 3)
    mask[2, 1] = 1
    index = np.array([0, 0, 1, 1])
    with pytest.raises(ValueError, match="mask"):
        verl_ca.compute_gdpo_outcome_advantage(rewards.clone(), mask, index)
    got, _ = ours.compute_gdpo_outcome_advantage(rewards, mask, index)
    assert got.shape == (4, 3) and bool((torch.isnan(got) | (got == 0)).all())


# --------------------------------------------------------------------------- gdpo, reward keys


def keyed_batch(rng, sizes, T=12, P=5, keys=("accuracy", "format", "length"), mask_dtype=torch.int64):
    """A batch as verl's trainer passes it to gdpo: uid groups, the response
    mask, ``batch`` with prompts and the attention mask (some responses empty),
    and per-key scores in ``non_tensor_batch`` (numpy arrays, lists)."""
    B = sum(sizes)
    index = np.repeat([f"uid-{g}" for g in range(len(sizes))], sizes)[rng.permutation(B)].astype(object)
    lengths = rng.integers(0, T + 1, size=B)
    lengths[:2] = T  # two valid tokens at least
    response = torch.from_numpy(np.arange(T)[None, :] < lengths[:, None])
    attention = torch.cat([torch.ones(B, P, dtype=torch.int64), response.long()], dim=1)
    batch = {"prompts": torch.zeros(B, P, dtype=torch.int64), "attention_mask": attention}
    non_tensor = {
        "uid": index,
        keys[0]: rng.integers(0, 2, size=B).astype(np.float64),  # 0/1: tied groups
        keys[1]: rng.normal(size=B).tolist(),
        keys[2]: (rng.integers(-3, 4, size=B) * 0.5).astype(np.float32),
    }
    rewards = torch.from_numpy(rng.normal(size=(B, T))).float()
    return rewards, response.to(mask_dtype), index, non_tensor, batch


@pytest.mark.parametrize("mask_dtype", MASK_DTYPES, ids=str)
@pytest.mark.parametrize(
    "keys, weights",
    [(["accuracy"], None), (["accuracy", "format"], None), (["accuracy", "format", "length"], [1.0, 0.3, -0.25]),
     (["format", "accuracy"], [0.1, 2.0, 99.0])],  # more weights than keys: the rest unused, as verl
    ids=["one", "two", "three_weighted", "extra_weight"],
)  # fmt: skip
@pytest.mark.parametrize("norm", [True, False], ids=["std", "no_std"])
def test_gdpo_reward_keys_match_verl(keys, weights, mask_dtype, norm):
    rng = np.random.default_rng([5, len(keys), int(norm)])
    rewards, mask, index, non_tensor, batch = keyed_batch(rng, [int(s) for s in rng.choice([1, 2, 4, 8], 10)], mask_dtype=mask_dtype)
    config = AlgoConfig(gdpo_reward_keys=keys, gdpo_reward_weights=weights)
    got, want = both(GDPO, rewards, mask, index, norm_adv_by_std_in_grpo=norm, config=config,
                     non_tensor_batch=non_tensor, batch=batch)  # fmt: skip
    # float32 whatever the rewards (verl's float32 scores), float64 with a float64 mask; verl's
    # per-key GRPO is float32 arithmetic there, so float32 precision in every case
    assert got.dtype == (torch.float64 if mask_dtype == torch.float64 else torch.float32)
    torch.testing.assert_close(got, want, **TOL[torch.float32])


def test_gdpo_reward_keys_ignore_the_rewards_and_use_float32_weights():
    rng = np.random.default_rng(6)
    rewards, mask, index, non_tensor, batch = keyed_batch(rng, [2] * 12, mask_dtype=torch.float64)
    # exact per-key values: Dr.GRPO on half-integer scores in groups of 2
    non_tensor["format"] = (rng.integers(-4, 5, size=24) * 0.5).tolist()
    config = AlgoConfig(gdpo_reward_keys=["accuracy", "format", "length"], gdpo_reward_weights=[0.1, 0.7, 1.3])
    kw = dict(norm_adv_by_std_in_grpo=False, config=config, non_tensor_batch=non_tensor, batch=batch)
    got, want = both(GDPO, rewards.double(), mask, index, **kw)
    # the per-key values are exact in float32 here and the mask is float64: the weights'
    # float32 rounding (0.1 -> 0.10000000149...) is all that is left to see
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)
    nan_rewards, _ = ours.compute_gdpo_outcome_advantage(torch.full_like(rewards, float("nan")), mask, index, **kw)
    assert torch.equal(nan_rewards, got)
    public = luspo_rs.advantage(
        rewards, mask, index, "gdpo", norm_adv_by_std_in_grpo=False, reward_weights=[0.1, 0.7, 1.3],
        reward_scores=torch.tensor(np.stack([np.asarray(non_tensor[k], np.float32) for k in config.gdpo_reward_keys], 1)),
    )  # fmt: skip
    assert torch.equal(public, got)


def test_gdpo_cancelling_keys_give_verls_zeros():
    """Two identical keys weighted 1 and -1: verl's float32 sum cancels exactly, so does ours."""
    rng = np.random.default_rng(7)
    rewards, mask, index, non_tensor, batch = keyed_batch(rng, [3] * 8)
    non_tensor["copy"] = list(non_tensor["format"])
    config = AlgoConfig(gdpo_reward_keys=["format", "copy"], gdpo_reward_weights=[1.0, -1.0])
    got, want = both(GDPO, rewards, mask, index, config=config, non_tensor_batch=non_tensor, batch=batch)
    assert torch.equal(got, want) and not got.any()


def test_gdpo_scalar_reward_component_broadcasts_as_verl():
    rng = np.random.default_rng(8)
    rewards, mask, index, non_tensor, batch = keyed_batch(rng, [4] * 6)
    non_tensor["constant"] = 1.0  # one number for every row
    config = AlgoConfig(gdpo_reward_keys=["constant", "format"])
    got, want = both(GDPO, rewards, mask, index, config=config, non_tensor_batch=non_tensor, batch=batch)
    torch.testing.assert_close(got, want, **TOL[torch.float32])


def test_gdpo_without_all_three_of_config_batch_and_non_tensor_batch_is_one_key():
    rng = np.random.default_rng(9)
    rewards, mask, index, non_tensor, batch = keyed_batch(rng, [4] * 6)
    config = AlgoConfig(gdpo_reward_keys=["format"])
    plain, _ = ours.compute_gdpo_outcome_advantage(rewards, mask, index)
    for kw in (dict(config=config, non_tensor_batch=non_tensor), dict(config=config, batch=batch),
               dict(non_tensor_batch=non_tensor, batch=batch)):  # fmt: skip
        got, want = both(GDPO, rewards, mask, index, **kw)
        torch.testing.assert_close(got, want, **TOL[torch.float32])
        assert torch.equal(got, plain)


def test_gdpo_reward_key_errors_are_verls_cases():
    rng = np.random.default_rng(10)
    rewards, mask, index, non_tensor, batch = keyed_batch(rng, [2] * 6)
    data = dict(non_tensor_batch=non_tensor, batch=batch)
    cases = [
        (AlgoConfig(), AssertionError, ValueError, "^config: gdpo needs 'algorithm.gdpo_reward_keys'"),
        (AlgoConfig(gdpo_reward_keys=["missing"]), AssertionError, KeyError, "GDPO reward key 'missing' not found"),
        (AlgoConfig(gdpo_reward_keys=["format", "length"], gdpo_reward_weights=[1.0]), IndexError, ValueError,
         "^config: gdpo_reward_weights has 1 weights for 2 reward keys"),
    ]  # fmt: skip
    for config, verl_err, our_err, match in cases:
        with pytest.raises(verl_err):
            verl_ca.compute_gdpo_outcome_advantage(rewards.clone(), mask, index, config=config, **data)
        with pytest.raises(our_err, match=match):
            ours.compute_gdpo_outcome_advantage(rewards, mask, index, config=config, **data)
    config = AlgoConfig(gdpo_reward_keys=["format"])
    short = {**non_tensor, "format": non_tensor["format"][:5]}
    with pytest.raises(RuntimeError):
        verl_ca.compute_gdpo_outcome_advantage(rewards.clone(), mask, index, config=config, non_tensor_batch=short, batch=batch)
    with pytest.raises(ValueError, match="^non_tensor_batch: 'format' has shape \\(5,\\), expected one score per row"):
        ours.compute_gdpo_outcome_advantage(rewards, mask, index, config=config, non_tensor_batch=short, batch=batch)
    # an attention mask whose response part is longer than response_mask: verl indexes past it
    long = dict(batch, attention_mask=torch.cat([batch["attention_mask"], torch.ones(12, 3, dtype=torch.int64)], 1))
    with pytest.raises(IndexError):
        verl_ca.compute_gdpo_outcome_advantage(rewards.clone(), mask, index, config=config, non_tensor_batch=non_tensor, batch=long)
    with pytest.raises(IndexError, match="^batch: attention_mask row"):
        ours.compute_gdpo_outcome_advantage(rewards, mask, index, config=config, non_tensor_batch=non_tensor, batch=long)


def test_public_reward_scores_bad_input_names_the_argument():
    r, m = torch.zeros(4, 3), torch.ones(4, 3)
    idx = np.array(["a", "a", "b", "b"], dtype=object)
    s = torch.randn(4, 2)
    with pytest.raises(ValueError, match="^reward_scores: only the gdpo estimator"):
        luspo_rs.advantage(r, m, idx, "grpo", reward_scores=s)
    with pytest.raises(ValueError, match="^reward_weights: given without reward_scores"):
        luspo_rs.advantage(r, m, idx, "gdpo", reward_weights=[1.0])
    with pytest.raises(ValueError, match="^reward_weights: expected one weight per key \\(2\\), got 3"):
        luspo_rs.advantage(r, m, idx, "gdpo", reward_scores=s, reward_weights=[1, 2, 3])
    with pytest.raises(TypeError, match="^reward_weights: expected 2 numbers"):
        luspo_rs.advantage(r, m, idx, "gdpo", reward_scores=s, reward_weights=["a", "b"])
    with pytest.raises(ValueError, match="^reward_scores: expected a \\(batch, keys\\) tensor"):
        luspo_rs.advantage(r, m, idx, "gdpo", reward_scores=torch.randn(4))
    with pytest.raises(ValueError, match="^scores: expected \\(batch, keys\\) = \\(4, K >= 1\\)"):
        luspo_rs.advantage(r, m, idx, "gdpo", reward_scores=torch.randn(3, 2))
    with pytest.raises(TypeError, match="^scores: expected a floating-point tensor"):
        luspo_rs.advantage(r, m, idx, "gdpo", reward_scores=torch.ones(4, 2, dtype=torch.int64))
    with pytest.raises(TypeError, match="^reward_scores: expected a torch.Tensor"):
        luspo_rs.advantage(r, m, idx, "gdpo", reward_scores=np.ones((4, 2)))
