"""Parity of the token-rule policy losses of issue 17 with verl 0.9.1's own
functions: ``cispo``, ``sapo``, ``gpg``, ``dro``, ``dppo_tv``, ``dppo_kl``
(``verl.get_policy_loss_fn(mode)``) and ``reinforce``
(``compute_policy_loss_reinforce``, called directly): the loss (value and
dtype), the gradient through ``loss.backward()`` and the metrics (the exact
key set verl returns), over every aggregation, dtype, mask kind, advantage
and IS-weight layout, the modes' own knobs, the global-batch normalisers and
the edge cases (empty rows, all rows masked, NaN); then bad knobs and
``picks`` validation. Clip-Cov / KL-Cov parity (their random choice) is
``test_cov_select.py``'s; GMPO (``geo_mean``) is not a token rule."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import AGG_MODES, assert_close, make_batch, stable_seed, verl_core_algos
from verl.workers.config import ActorConfig, PolicyLossConfig

import luspo_rs
from luspo_rs import _core

EXT_MODES = ["cispo", "sapo", "gpg", "dro", "dppo_tv", "dppo_kl", "reinforce"]
CLIP = dict(clip_ratio=0.2, clip_ratio_low=0.2, clip_ratio_high=0.28, clip_ratio_c=3.0)
KNOBS = dict(tau_pos=1.0, tau_neg=1.05, dro_beta=0.3)
#: The metric keys verl returns per mode (after "actor/"), written out: the
#: native table (`_core.policy_metrics`) must agree with them and with verl.
VERL_KEYS = {
    "cispo": {"pg_clipfrac", "ppo_kl", "pg_clipfrac_lower"},
    "sapo": {"pg_clipfrac", "ppo_kl", "pg_clipfrac_lower"},
    "gpg": set(),
    "dro": {"ppo_kl"},
    "dppo_tv": {"pg_clipfrac", "ppo_kl", "pg_clipfrac_lower"},
    "dppo_kl": {"pg_clipfrac", "ppo_kl", "pg_clipfrac_lower"},
    "reinforce": {"ppo_kl"},
}
CASES = {
    "B1": dict(B=1, T=7),
    "T1": dict(B=5, T=1),
    "odd_T_with_empty_and_full_rows": dict(B=7, T=33, empty_rows=(2,), full_rows=(0, 5)),
    "far_from_1": dict(B=8, T=64, spread=3.0),
    "per_sequence_advantages": dict(B=6, T=17, per_seq_adv=True, spread=1.0),
}


def verl_cfg(*, clip_ratio=0.2, clip_ratio_low=None, clip_ratio_high=None, clip_ratio_c=3.0, tau_pos=1.0, tau_neg=1.05,
             dro_beta=None, **global_batch_info):  # fmt: skip
    """verl's ActorConfig with the modes' knobs (conftest.verl_config's, plus SAPO's and DRO's)."""
    cfg = ActorConfig(
        strategy="fsdp", clip_ratio=clip_ratio, clip_ratio_low=clip_ratio_low, clip_ratio_high=clip_ratio_high,
        clip_ratio_c=clip_ratio_c, ppo_micro_batch_size_per_gpu=1, rollout_n=1, tau_pos=tau_pos, tau_neg=tau_neg,
        policy_loss=PolicyLossConfig(dro_beta=dro_beta),
    )  # fmt: skip
    cfg.global_batch_info.update({k: v for k, v in global_batch_info.items() if v is not None})
    return cfg


def verl_fn(mode):
    if mode == "reinforce":  # bypass mode's REINFORCE loss, not in the registry by that name
        return verl_core_algos.compute_policy_loss_reinforce
    return verl_core_algos.get_policy_loss_fn(mode)


def verl_ref(mode, old, lp, adv, mask, agg, weights=None, **kw):
    """verl's own loss, gradient w.r.t. log_prob and metrics (``actor/`` dropped)."""
    x = lp.detach().clone().requires_grad_(True)
    loss, metrics = verl_fn(mode)(old, x, adv, mask, loss_agg_mode=agg, config=verl_cfg(**kw), rollout_is_weights=weights)
    loss.backward()
    return loss.detach(), x.grad, {k.removeprefix("actor/"): v for k, v in metrics.items()}


def ours(mode, old, lp, adv, mask, agg, weights=None, **kw):
    x = lp.detach().clone().requires_grad_(True)
    loss, metrics = luspo_rs.policy_loss(old, x, adv, mask, mode=mode, loss_agg_mode=agg, rollout_is_weights=weights, **kw)
    loss.backward()
    return loss.detach(), x.grad, metrics


def expand(t, B, T):
    return None if t is None else (t[:, None].expand(B, T) if t.dim() == 1 else t.expand(B, T))


def compare(mode, old, lp, adv, mask, agg, dtype, weights=None, **kw):
    """Ours against verl (per-row advantages / weights broadcast for verl):
    loss value and dtype, gradient, metric keys and values."""
    kw = {**CLIP, **KNOBS, **kw}
    B, T = lp.shape
    ref_loss, ref_grad, ref_metrics = verl_ref(mode, old, lp, expand(adv, B, T), mask, agg, expand(weights, B, T), **kw)
    loss, grad, metrics = ours(mode, old, lp, adv, mask, agg, weights, **kw)
    assert loss.dtype == ref_loss.dtype and grad.dtype == lp.dtype, (loss.dtype, ref_loss.dtype, grad.dtype)
    assert_close(loss, ref_loss, dtype=dtype, what="loss")
    assert_close(grad, ref_grad, dtype=dtype, what="grad")
    assert set(metrics) == set(ref_metrics) == VERL_KEYS[mode], (sorted(metrics), sorted(ref_metrics))
    for k, v in ref_metrics.items():
        assert metrics[k].item() == pytest.approx(v, abs=1e-6, nan_ok=True), k
    return loss, grad, metrics


def weights_for(B, T, dtype, seed=7):
    return (0.5 + torch.rand(B, T, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)).to(dtype)


def scattered_mask(B, T, seed):
    """A multi-turn mask: valid tokens in several runs, not a prefix."""
    g = torch.Generator().manual_seed(seed)
    m = torch.rand(B, T, generator=g) < 0.6
    m[:, 0] = False  # never a prefix
    return m


# --------------------------------------------------------------------------- parity grid


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("with_weights", [False, True], ids=["no_is", "is_weights"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("agg", AGG_MODES)
@pytest.mark.parametrize("mode", EXT_MODES)
def test_matches_verl(mode, agg, dtype, with_weights, case):
    spec = dict(CASES[case])
    B, T = spec.pop("B"), spec.pop("T")
    old, lp, adv, mask = make_batch(B, T, dtype=dtype, seed=stable_seed(mode, agg, case) % 1000, **spec)
    weights = weights_for(B, T, dtype) if with_weights else None
    compare(mode, old, lp, adv, mask, agg, dtype, weights)


@pytest.mark.parametrize("mode", EXT_MODES)
def test_the_grid_exercises_each_rule(mode):
    # the batches above reach every branch: CISPO clips, DPPO drops and
    # truncates tokens (with a truncation bound inside the ratios' range)
    old, lp, adv, mask = make_batch(8, 64, spread=3.0, seed=5)
    _, grad, metrics = compare(mode, old, lp, adv, mask, "token-mean", torch.float32, clip_ratio_c=1.5)
    assert grad.abs().sum() > 0
    if mode in ("cispo", "dppo_tv", "dppo_kl"):
        assert 0 < metrics["pg_clipfrac"].item() < 1, "some tokens clipped (dropped), not all"
    if mode.startswith("dppo"):
        assert metrics["pg_clipfrac_lower"].item() > 0, "some kept tokens truncated at clip_ratio_c"


@pytest.mark.parametrize("mode", EXT_MODES)
def test_metric_keys_follow_verl(mode):
    assert {name for name, _ in _core.policy_metrics(mode)} == VERL_KEYS[mode]
    old, lp, adv, mask = make_batch(3, 5)
    _, metrics = luspo_rs.policy_loss(old, lp, adv, mask, mode=mode, **KNOBS)
    assert set(metrics) == VERL_KEYS[mode]
    for v in metrics.values():
        assert v.dim() == 0 and v.dtype == torch.float64 and not v.requires_grad


# --------------------------------------------------------------------------- dtypes, masks, layouts


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("mode", EXT_MODES)
def test_half_precision_inputs(mode, dtype):
    # as test_policy_loss.test_half_precision_inputs: we compute in fp32 from
    # the half inputs and round only the outputs, so the reference is verl on
    # the same values upcast to fp32, at the rounding of the outputs
    old, lp, adv, mask = make_batch(6, 50, dtype=dtype, seed=10, spread=0.5)
    w = weights_for(6, 50, dtype)
    kw = {**CLIP, **KNOBS}
    for agg in AGG_MODES:
        ref_loss, ref_grad, ref_metrics = verl_ref(mode, old.float(), lp.float(), adv.float(), mask, agg, w.float(), **kw)
        loss, grad, metrics = ours(mode, old, lp, adv, mask, agg, w, **kw)
        assert loss.dtype == dtype and grad.dtype == dtype
        torch.testing.assert_close(loss.float(), ref_loss, rtol=8e-3, atol=1e-5)
        torch.testing.assert_close(grad.float(), ref_grad.to(dtype).float(), rtol=8e-3, atol=1e-7)
        assert set(metrics) == set(ref_metrics)
        for k, v in ref_metrics.items():
            assert metrics[k].item() == pytest.approx(v, abs=1e-6), k
        # verl computing in the half type itself lands near (it rounds every op)
        ref_half, _, _ = verl_ref(mode, old, lp, adv, mask, agg, w, **kw)
        torch.testing.assert_close(loss.float(), ref_half.float(), rtol=5e-2, atol=2e-3)


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.int64, torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("mode", EXT_MODES)
def test_mask_dtypes_match_verl(mode, mask_dtype):
    # a float64 mask promotes verl's loss to float64 (its token math stays
    # float32): ours too; values agree to float32's tolerance
    old, lp, adv, mask = make_batch(5, 23, seed=5, empty_rows=(1,), spread=0.8)
    for agg in AGG_MODES:
        compare(mode, old, lp, adv, mask.to(mask_dtype), agg, torch.float32)


@pytest.mark.parametrize("agg", AGG_MODES)
@pytest.mark.parametrize("mode", EXT_MODES)
def test_multi_turn_masks_match_verl(mode, agg):
    old, lp, adv, _ = make_batch(6, 41, seed=12, spread=1.0)
    mask = scattered_mask(6, 41, seed=13)
    mask[4] = False  # and an empty row
    compare(mode, old, lp, adv, mask, agg, torch.float32, weights_for(6, 41, torch.float32))


@pytest.mark.parametrize("adv_shape", ["B", "B1"])
@pytest.mark.parametrize("mode", EXT_MODES)
def test_per_row_advantages_and_is_weights_broadcast_like_verl(mode, adv_shape):
    old, lp, adv, mask = make_batch(6, 20, seed=4, per_seq_adv=True, spread=0.8)
    adv = adv if adv_shape == "B" else adv[:, None]
    w = torch.linspace(0.5, 1.5, 6)
    for agg in AGG_MODES:
        compare(mode, old, lp, adv, mask, agg, torch.float32, w if adv_shape == "B" else w[:, None])


@pytest.mark.parametrize("mode", EXT_MODES)
def test_mixed_float_dtypes_promote_like_verl(mode):
    # a float64 advantage (or IS weight, or old_log_prob) with float32
    # log-probs: verl's token math promotes to float64 from there on (SAPO's
    # temperatures take the advantages' dtype), and so does the loss; ours
    # gives the same dtype and verl's value to float32's tolerance
    old, lp, adv, mask = make_batch(6, 30, seed=34, spread=1.0, empty_rows=(5,))
    w = weights_for(6, 30, torch.float32)
    for o, a, ww in ((old, adv.double(), w), (old, adv, w.double()), (old.double(), adv, w), (old, adv, w.half())):
        for agg in ("token-mean", "seq-mean-token-mean"):
            compare(mode, o, lp, a, mask, agg, torch.float32, ww)


@pytest.mark.parametrize("mode", EXT_MODES)
def test_strided_inputs_match_verl(mode):
    old, lp, adv, mask = make_batch(7, 30, seed=14, spread=0.8)
    t = lambda x: x.t().contiguous().t()  # noqa: E731
    w = weights_for(7, 30, torch.float32)[:, ::1]
    compare(mode, t(old), t(lp), t(adv), t(mask), "seq-mean-token-mean", torch.float32, t(w))


# --------------------------------------------------------------------------- knobs


CLIP_KNOBS = {
    "defaults": dict(clip_ratio=0.2, clip_ratio_low=None, clip_ratio_high=None, clip_ratio_c=3.0),
    "asymmetric": dict(clip_ratio=0.2, clip_ratio_low=0.1, clip_ratio_high=0.5, clip_ratio_c=1.2),
    "only_low": dict(clip_ratio=0.3, clip_ratio_low=0.05, clip_ratio_high=None, clip_ratio_c=10.0),
    "zero": dict(clip_ratio=0.0, clip_ratio_low=0.0, clip_ratio_high=0.0, clip_ratio_c=1.0),
    "wide": dict(clip_ratio=0.9, clip_ratio_low=0.9, clip_ratio_high=2.0, clip_ratio_c=50.0),
}


@pytest.mark.parametrize("knobs", list(CLIP_KNOBS))
@pytest.mark.parametrize("mode", EXT_MODES)
def test_clip_knobs_match_verl(mode, knobs):
    # CISPO clips its ratio to [1 - low, 1 + high]; DPPO reads the same knobs
    # as its divergence bounds and clip_ratio_c as its truncation; the others
    # ignore them (verl's too)
    old, lp, adv, mask = make_batch(8, 40, dtype=torch.float64, seed=15, spread=1.5, empty_rows=(3,))
    for agg in ("token-mean", "seq-mean-token-sum"):
        compare(mode, old, lp, adv, mask, agg, torch.float64, **CLIP_KNOBS[knobs])


@pytest.mark.parametrize("taus", [(1.0, 1.05), (0.5, 2.0), (3.0, 0.25), (1e-3, 40.0)], ids=str)
def test_sapo_temperatures_match_verl(taus):
    old, lp, adv, mask = make_batch(8, 40, seed=16, spread=1.5)
    adv[0, :5] = 0.0  # A = 0 takes tau_neg, as verl's `advantages > 0`
    for dtype in (torch.float32, torch.float64):
        compare("sapo", old.to(dtype), lp.to(dtype), adv.to(dtype), mask, "token-mean", dtype, tau_pos=taus[0],
                tau_neg=taus[1])  # fmt: skip
    # and the temperatures matter
    a, _, _ = ours("sapo", old, lp, adv, mask, "token-mean", tau_pos=taus[0], tau_neg=taus[1])
    b, _, _ = ours("sapo", old, lp, adv, mask, "token-mean", tau_pos=taus[0] * 2, tau_neg=taus[1])
    c, _, _ = ours("sapo", old, lp, adv, mask, "token-mean", tau_pos=taus[0], tau_neg=taus[1] * 2)
    assert a.item() != b.item() and a.item() != c.item()


def test_sapo_always_aggregates_seq_mean_token_mean_like_verl():
    old, lp, adv, mask = make_batch(6, 30, seed=17, spread=1.0, empty_rows=(2,))
    losses = {agg: compare("sapo", old, lp, adv, mask, agg, torch.float32)[0].item() for agg in AGG_MODES}
    assert len(set(losses.values())) == 1, losses
    from luspo_rs.policy_loss import effective_agg_mode

    assert effective_agg_mode("sapo", "token-sum") == "seq-mean-token-mean"


@pytest.mark.parametrize("beta", [1e-3, 0.3, 1.0, 5.0])
def test_dro_beta_matches_verl(beta):
    old, lp, adv, mask = make_batch(8, 40, seed=18, spread=1.0)
    for agg in AGG_MODES:
        compare("dro", old.double(), lp.double(), adv.double(), mask, agg, torch.float64, dro_beta=beta)
        compare("dro", old, lp, adv, mask, agg, torch.float32, dro_beta=beta)


@pytest.mark.parametrize("agg", AGG_MODES)
@pytest.mark.parametrize("mode", EXT_MODES)
def test_global_batch_normalisers_match_verl(mode, agg):
    old, lp, adv, mask = make_batch(9, 40, seed=3, empty_rows=(4,))
    compare(mode, old, lp, adv, mask, agg, torch.float32,
            dp_size=4, batch_num_tokens=1234, global_batch_size=37, loss_scale_factor=512)  # fmt: skip


# --------------------------------------------------------------------------- edges


@pytest.mark.parametrize("agg", AGG_MODES)
@pytest.mark.parametrize("mode", EXT_MODES)
def test_all_rows_masked_matches_verl(mode, agg):
    # verl divides 0 by 0 (NaN) wherever its count comes from the mask; SAPO is
    # always seq-mean-token-mean
    old, lp, adv, mask = make_batch(3, 6, seed=6)
    loss, grad, _ = compare(mode, old, lp, adv, torch.zeros_like(mask), agg, torch.float32)
    assert grad.eq(0).all()
    if agg == "token-sum" and mode != "sapo":
        assert loss.item() == 0.0
    else:
        assert math.isnan(loss.item())


@pytest.mark.parametrize("agg", AGG_MODES)
@pytest.mark.parametrize("mode", EXT_MODES)
def test_nan_log_prob_at_a_valid_token_matches_verl(mode, agg):
    # the loss is NaN on both sides; the gradient is verl's everywhere, the
    # NaN token included: NaN where torch's chain gives NaN (the ratio's
    # exp, CISPO's detached clip(r) times log_prob, DPPO's truncation), and
    # where the token's gradient does not depend on log_prob (GPG, REINFORCE:
    # -A; DRO: -A + beta (lp - old), NaN) the same value as verl's
    old, lp, adv, mask = make_batch(4, 10, seed=8, full_rows=(1,))
    lp[1, 3] = float("nan")
    ref_loss, ref_grad, _ = verl_ref(mode, old, lp, adv, mask, agg, **CLIP, **KNOBS)
    loss, grad, _ = ours(mode, old, lp, adv, mask, agg, **CLIP, **KNOBS)
    assert math.isnan(loss.item()) and math.isnan(ref_loss.item())
    assert_close(grad, ref_grad, dtype=torch.float32, what="grad")


@pytest.mark.parametrize("agg", AGG_MODES)
@pytest.mark.parametrize("mode", EXT_MODES)
def test_nan_log_prob_at_a_masked_token(mode, agg):
    # The loss is verl's: the token modes drop the masked NaN (verl's
    # masked_sum), the sequence modes (and SAPO, always one) take it into the
    # row's sum (verl multiplies by the mask), so the loss is NaN.
    # Deliberate difference (docs/exactness.md, "NaN rules"): a masked position always gets a
    # zero gradient; verl's is NaN there where torch multiplies a NaN factor
    # by the zero it passes back (CISPO's and DPPO's detached ratio, SAPO's
    # and DRO's chain) and the row's other tokens keep verl's gradient.
    old, lp, adv, mask = make_batch(4, 10, seed=9, empty_rows=(3,))
    mask[0, -1] = False
    lp[0, -1] = float("nan")
    lp[3, 0] = float("nan")  # in a fully masked row
    ref_loss, ref_grad, _ = verl_ref(mode, old, lp, adv, mask, agg, **CLIP, **KNOBS)
    loss, grad, _ = ours(mode, old, lp, adv, mask, agg, **CLIP, **KNOBS)
    assert_close(loss, ref_loss, dtype=torch.float32, what="loss")
    seq = agg.startswith("seq-mean") or mode == "sapo"
    assert math.isnan(loss.item()) == seq
    assert grad[~mask].eq(0).all(), "masked positions get a zero gradient"
    assert_close(grad[mask], ref_grad[mask], dtype=torch.float32, what="grad at valid tokens")


@pytest.mark.parametrize("mode", EXT_MODES)
def test_nan_advantage_at_a_valid_token_matches_verl(mode):
    old, lp, adv, mask = make_batch(4, 10, seed=19, full_rows=(0,))
    adv[0, 2] = float("nan")
    for agg in AGG_MODES:
        ref_loss, ref_grad, _ = verl_ref(mode, old, lp, adv, mask, agg, **CLIP, **KNOBS)
        loss, grad, _ = ours(mode, old, lp, adv, mask, agg, **CLIP, **KNOBS)
        assert math.isnan(loss.item()) and math.isnan(ref_loss.item())
        assert_close(grad, ref_grad, dtype=torch.float32, what="grad")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("mode", EXT_MODES)
def test_log_ratios_past_the_clamp_match_verl(mode, dtype):
    # |lp - old| > 20: CISPO, SAPO and DPPO clamp the log-ratio at +-20 (no
    # gradient through the clamp), the others do not clamp
    old, lp, adv, mask = make_batch(5, 30, dtype=dtype, seed=22)
    lp[:, ::4] += 25.0
    lp[:, 1::4] -= 25.0
    for agg in ("token-mean", "seq-mean-token-mean"):
        compare(mode, old, lp, adv, mask, agg, dtype, weights_for(5, 30, dtype))


def test_dppo_tv_differs_from_verl_only_where_rounding_decides_the_drop():
    # As the clip-bound ties of vanilla / GSPO (test_policy_loss): DPPO keeps
    # or drops a token by comparing p - p_old (p = exp(lp)) with its bounds;
    # our exp and torch's may differ in the last bit, so a token whose
    # p - p_old lies within a few ulps of a bound may be kept on one side and
    # dropped on the other: its gradient is then 0 on one side, verl's (or
    # ours) on the other. Tokens are drawn there by the thousand; no other
    # difference may exist (the fuzz's known_tie for DPPO, tests/fuzz.py).
    g = torch.Generator().manual_seed(33)
    B, T = 64, 512
    low, high = 0.2, 0.28
    old = -torch.rand(B, T, generator=g, dtype=torch.float64) * 2 - 0.1
    po = old.exp()
    up = torch.rand(B, T, generator=g) < 0.5
    target = torch.where(up, po + high, po - low).clamp(1e-6, 1 - 1e-6)
    lp = target.log().float()
    steps = torch.randint(-4, 5, (B, T), generator=g)
    for k in range(1, 5):  # a few ulps either way
        lp = torch.where(steps >= k, torch.nextafter(lp, torch.tensor(0.0)), lp)
        lp = torch.where(steps <= -k, torch.nextafter(lp, torch.tensor(-math.inf)), lp)
    old = old.float()
    adv = torch.where(up, 1.0, -1.0) * (0.5 + torch.rand(B, T, generator=g))
    mask = torch.ones(B, T, dtype=torch.bool)
    kw = dict(clip_ratio=0.2, clip_ratio_low=low, clip_ratio_high=high, clip_ratio_c=3.0)
    _, ref_grad, _ = verl_ref("dppo_tv", old, lp, adv, mask, "token-mean", **kw)
    _, grad, _ = ours("dppo_tv", old, lp, adv, mask, "token-mean", **kw)
    moved = lp.exp() - old.exp()  # as verl computes it
    eps = torch.finfo(torch.float32).eps
    near = ((moved - high).abs() <= 4 * eps) | ((moved + low).abs() <= 4 * eps)
    assert near.sum() > 1000, "the draw must put many tokens at the bounds"
    off = ~torch.isclose(grad, ref_grad, atol=1e-9, rtol=1e-5)
    assert not (off & ~near).any(), f"{int((off & ~near).sum())} gradients differ away from a bound"
    assert ((grad[off] == 0) | (ref_grad[off] == 0)).all(), "a difference is a token kept on one side only"


@pytest.mark.parametrize("mode", ["dppo_tv", "dppo_kl"])
def test_dppo_drops_tokens_on_the_advantage_side_only(mode):
    # a token whose probability rose far (A > 0) is dropped; the same token
    # with A < 0 is kept, and symmetrically for a fall
    old = torch.log(torch.tensor([[0.3, 0.3, 0.9, 0.9]], dtype=torch.float64))
    lp = torch.log(torch.tensor([[0.95, 0.95, 0.05, 0.05]], dtype=torch.float64))
    adv = torch.tensor([[1.0, -1.0, 1.0, -1.0]], dtype=torch.float64)
    mask = torch.ones(1, 4, dtype=torch.bool)
    _, grad, metrics = compare(mode, old, lp, adv, mask, "token-sum", torch.float64, clip_ratio_c=1e9)
    assert grad[0, 0] == 0 and grad[0, 1] != 0 and grad[0, 2] != 0 and grad[0, 3] == 0
    assert metrics["pg_clipfrac"].item() == 0.5


# --------------------------------------------------------------------------- bad knobs, picks


def small():
    old, lp, adv, mask = make_batch(3, 5, seed=20)
    return old, lp, adv, mask


def test_dro_needs_a_positive_dro_beta_as_verl():
    old, lp, adv, mask = small()
    for beta in (None, 0.0, -1.0):
        with pytest.raises(ValueError, match="dro_beta"):
            luspo_rs.policy_loss(old, lp, adv, mask, mode="dro", dro_beta=beta)
        with pytest.raises(ValueError, match="dro_beta"):  # verl's own check
            verl_ref("dro", old, lp, adv, mask, "token-mean", dro_beta=beta)
    # not finite: verl computes NaN / inf losses; we refuse (deliberate)
    for beta in (math.nan, math.inf):
        with pytest.raises(ValueError, match="dro_beta"):
            luspo_rs.policy_loss(old, lp, adv, mask, mode="dro", dro_beta=beta)
    # the other modes ignore dro_beta, as verl does
    luspo_rs.policy_loss(old, lp, adv, mask, mode="gpg", dro_beta=None)


@pytest.mark.parametrize("name", ["tau_pos", "tau_neg"])
@pytest.mark.parametrize("bad", [0.0, -1.0, math.nan, math.inf])
def test_sapo_temperatures_must_be_positive(name, bad):
    # verl takes them as they are (tau = 0 divides by zero, a negative tau
    # flips the gate); we refuse them with a ValueError naming the knob
    old, lp, adv, mask = small()
    with pytest.raises(ValueError, match=name):
        luspo_rs.policy_loss(old, lp, adv, mask, mode="sapo", **{name: bad})
    luspo_rs.policy_loss(old, lp, adv, mask, mode="cispo", **{name: bad})  # read by SAPO only


@pytest.mark.parametrize("mode", ["dppo_tv", "dppo_kl"])
def test_dppo_nan_clip_ratio_c_is_refused(mode):
    # verl's torch.clamp(ratio, max=NaN) makes every token NaN; we refuse it.
    # Any other bound is a truncation (even <= 1, where vanilla asserts)
    old, lp, adv, mask = small()
    with pytest.raises(ValueError, match="clip_ratio_c"):
        luspo_rs.policy_loss(old, lp, adv, mask, mode=mode, clip_ratio_c=math.nan)
    compare(mode, old, lp, adv, mask, "token-mean", torch.float32, clip_ratio_c=0.5)
    compare(mode, old, lp, adv, mask, "token-mean", torch.float32, clip_ratio_c=math.inf)


@pytest.mark.parametrize("mode", EXT_MODES + ["vanilla", "gspo", "luspo"])
def test_picks_are_refused_by_the_modes_that_do_not_take_them(mode):
    old, lp, adv, mask = small()
    with pytest.raises(ValueError, match="picks"):
        luspo_rs.policy_loss(old, lp, adv, mask, mode=mode, picks=torch.zeros_like(mask), **KNOBS)


@pytest.mark.parametrize("shape", [(3,), (3, 4), (2, 5), (3, 5, 1), (15,)], ids=str)
@pytest.mark.parametrize("mode", ["clip_cov", "kl_cov"])
def test_picks_of_the_wrong_shape_are_a_value_error(mode, shape):
    old, lp, adv, mask = small()
    with pytest.raises(ValueError, match="picks"):
        luspo_rs.policy_loss(old, lp, adv, mask, mode=mode, picks=torch.zeros(shape, dtype=torch.bool))


@pytest.mark.parametrize("mode", ["clip_cov", "kl_cov"])
def test_picks_of_any_mask_dtype_choose_the_same_tokens(mode):
    old, lp, adv, mask = make_batch(4, 9, seed=21, spread=1.0)
    picks = torch.rand(4, 9, generator=torch.Generator().manual_seed(2)) < 0.3
    want = ours(mode, old, lp, adv, mask, "token-mean", picks=picks)
    none = ours(mode, old, lp, adv, mask, "token-mean", picks=torch.zeros_like(picks))
    assert not torch.equal(want[1], none[1]), "the picks change the gradient"
    for dt in (torch.uint8, torch.int64, torch.float32, torch.float64):
        got = ours(mode, old, lp, adv, mask, "token-mean", picks=picks.to(dt))
        torch.testing.assert_close(got[1], want[1], rtol=0, atol=0)
        assert got[0].item() == want[0].item()


def test_picks_on_another_device_or_not_a_tensor_are_a_value_error():
    old, lp, adv, mask = small()
    with pytest.raises((ValueError, TypeError), match="picks"):
        luspo_rs.policy_loss(old, lp, adv, mask, mode="clip_cov", picks=[[0] * 5] * 3)
    if torch.cuda.is_available():
        with pytest.raises(ValueError):
            luspo_rs.policy_loss(old, lp, adv, mask, mode="clip_cov", picks=torch.zeros(3, 5, device="cuda"))


def test_unknown_mode_names_every_mode():
    old, lp, adv, mask = small()
    with pytest.raises(ValueError, match="mode") as e:
        luspo_rs.policy_loss(old, lp, adv, mask, mode="bypass_mode")
    for m in EXT_MODES:
        assert f'"{m}"' in str(e.value)


@pytest.mark.parametrize("shape", [(0, 5), (3, 0)], ids=["empty_batch", "zero_length"])
@pytest.mark.parametrize("mode", EXT_MODES + ["clip_cov", "kl_cov"])
def test_empty_inputs_are_value_errors(mode, shape):
    t = torch.zeros(shape)
    picks = torch.zeros(shape, dtype=torch.bool) if mode.endswith("_cov") else None
    with pytest.raises(ValueError, match="log_prob: empty"):
        luspo_rs.policy_loss(t, t, t, t.bool(), mode=mode, picks=picks, **KNOBS)


@pytest.mark.parametrize("mode", EXT_MODES)
def test_knobs_of_the_wrong_type_are_errors_naming_them(mode):
    old, lp, adv, mask = small()
    with pytest.raises((TypeError, ValueError), match="tau_pos"):
        others = {k: v for k, v in KNOBS.items() if k != "tau_pos"}
        luspo_rs.policy_loss(old, lp, adv, mask, mode=mode, tau_pos="1.0", **others)
    with pytest.raises((TypeError, ValueError), match="dro_beta"):
        luspo_rs.policy_loss(old, lp, adv, mask, mode=mode, dro_beta=torch.ones(2))
