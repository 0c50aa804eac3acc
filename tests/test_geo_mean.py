"""GMPO (``mode="geo_mean"``): parity with verl's own
``compute_policy_loss_geo_mean`` (loss, gradient w.r.t. ``log_prob``,
metrics) through :func:`luspo_rs.policy_loss`, over dtypes, mask kinds,
ragged and multi-turn masks, token-level and per-row advantages, ties on
the clip bounds, IS weights, empty rows, NaNs, and verl's disregard of
``loss_agg_mode`` and the global-batch normalisers. Where we differ from
verl (the gradient at masked tokens of a row holding a NaN), the test
says so and checks what we give.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import AGG_MODES, assert_close, make_batch, stable_seed, verl_config, verl_core_algos

import luspo_rs
from luspo_rs import _core
from luspo_rs._args import torch_clamp_closed
from luspo_rs.policy_loss import METRICS

CLIP = dict(clip_ratio=0.2, clip_ratio_low=0.2, clip_ratio_high=0.28)
VERL_METRICS = ("pg_clipfrac", "ppo_kl", "pg_clipfrac_lower")


def verl_geo(old, lp, adv, mask, weights=None, loss_agg_mode="token-mean", **kw):
    """verl's real GMPO loss, its gradient w.r.t. ``log_prob`` and its metrics."""
    cfg_kw = {k: v for k, v in {**CLIP, **kw}.items() if k.startswith("clip_ratio")}
    norms = {k: v for k, v in kw.items() if not k.startswith("clip_ratio")}
    cfg = verl_config(**cfg_kw, **norms)
    x = lp.detach().clone().requires_grad_(True)
    loss, metrics = verl_core_algos.compute_policy_loss_geo_mean(
        old, x, adv, mask, loss_agg_mode=loss_agg_mode, config=cfg, rollout_is_weights=weights
    )
    loss.backward()
    return loss.detach(), x.grad, {k.removeprefix("actor/"): v for k, v in metrics.items()}


def ours(old, lp, adv, mask, weights=None, seed=1.0, **kw):
    x = lp.detach().clone().requires_grad_(True)
    loss, metrics = luspo_rs.policy_loss(old, x, adv, mask, mode="geo_mean", rollout_is_weights=weights, **{**CLIP, **kw})
    (loss * seed if seed != 1.0 else loss).backward()
    return loss.detach(), x.grad, metrics


def compare(old, lp, adv, mask, dtype, weights=None, ref_adv=None, ref_weights=None, **kw):
    ref_loss, ref_grad, ref_metrics = verl_geo(
        old, lp, adv if ref_adv is None else ref_adv, mask, weights if ref_weights is None else ref_weights, **kw
    )
    loss, grad, metrics = ours(old, lp, adv, mask, weights, **kw)
    assert loss.dtype == ref_loss.dtype and grad.dtype == lp.dtype
    assert_close(loss, ref_loss, dtype=dtype, what="loss")
    assert_close(grad, ref_grad, dtype=dtype, what="grad")
    assert list(metrics) == list(VERL_METRICS) and sorted(ref_metrics) == sorted(VERL_METRICS)
    for k, v in ref_metrics.items():
        assert metrics[k].item() == pytest.approx(v, abs=1e-6, nan_ok=True), k
    return loss, grad, metrics


def multi_turn_mask(B, T, seed):
    """Non-prefix masks: a few response spans per row separated by tool /
    user turns (masked), and one row with no span at all."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(B, T, dtype=torch.bool)
    for i in range(B - 1):
        t = int(torch.randint(0, 4, (1,), generator=g))
        while t < T:
            span = int(torch.randint(1, 9, (1,), generator=g))
            mask[i, t : t + span] = True
            t += span + int(torch.randint(1, 7, (1,), generator=g))
    return mask


CASES = {
    "ragged": dict(B=8, T=40),
    "odd_T_with_empty_and_full_rows": dict(B=7, T=33, empty_rows=(2,), full_rows=(0, 5)),
    "far_from_1_clipped": dict(B=8, T=64, spread=3.0),
    "per_sequence_advantages": dict(B=6, T=17, per_seq_adv=True, spread=1.0),
    "long_rows": dict(B=3, T=1500, spread=0.5),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("with_weights", [False, True], ids=["no_is", "is_weights"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_matches_verl(dtype, with_weights, case):
    spec = dict(CASES[case])
    B, T = spec.pop("B"), spec.pop("T")
    old, lp, adv, mask = make_batch(B, T, dtype=dtype, seed=stable_seed("geo", case) % 1000, **spec)
    weights = None
    if with_weights:
        weights = (0.5 + torch.rand(B, T, generator=torch.Generator().manual_seed(7), dtype=torch.float64)).to(dtype)
    ref_adv = adv[:, None].expand(B, T) if adv.dim() == 1 else None  # (B,): verl takes (B, T)
    _, _, metrics = compare(old, lp, adv, mask, dtype, weights, ref_adv=ref_adv)
    if case == "far_from_1_clipped":
        assert metrics["pg_clipfrac"] > 0.1 and metrics["pg_clipfrac_lower"] > 0.1, "the batch must clip both ways"


def test_multi_turn_masks_match_verl():
    B, T = 9, 120
    old, lp, adv, _ = make_batch(B, T, seed=3, spread=0.8)
    mask = multi_turn_mask(B, T, seed=4)
    assert not mask[-1].any() and (mask[:-1].int().diff(dim=1) == 1).sum() > 2 * (B - 1), "spans, not prefixes"
    w = 0.5 + torch.rand(B, T, generator=torch.Generator().manual_seed(5))
    compare(old, lp, adv, mask, torch.float32)
    compare(old, lp, adv, mask, torch.float32, weights=w)


def test_rows_longer_than_a_piece_match_verl():
    # rows over the CPU kernel's piece (65536 tokens) are summed piece by
    # piece before their token pass
    B, T = 2, 70_001
    old, lp, adv, mask = make_batch(B, T, seed=12, spread=0.3, full_rows=(0,))
    w = 0.5 + torch.rand(B, T, generator=torch.Generator().manual_seed(2))
    compare(old, lp, adv, mask, torch.float32, weights=w)


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.uint8, torch.int32, torch.int64, torch.float32, torch.float64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_mask_dtypes_match_verl(dtype, mask_dtype):
    # a float64 mask promotes verl's row means, ratio and loss to float64
    # (the gradient keeps log_prob's dtype); the comparison's tolerance is
    # the inputs' (the token math is float32 on both sides)
    old, lp, adv, mask = make_batch(6, 50, dtype=dtype, seed=11, empty_rows=(2,), spread=0.6)
    loss, _, _ = compare(old, lp, adv, mask.to(mask_dtype), dtype)
    assert loss.dtype == (torch.float64 if torch.float64 in (dtype, mask_dtype) else torch.float32)


@pytest.mark.parametrize("adv_shape", ["B", "B1"])
def test_per_row_advantages_and_is_weights_broadcast_like_verl(adv_shape):
    # verl's GMPO takes (B, T) tensors; ours also reads (B,) / (B, 1) per-row
    # ones, which must give what verl gives on their expansion
    B, T = 6, 30
    old, lp, adv, mask = make_batch(B, T, seed=13, per_seq_adv=True, empty_rows=(4,), spread=0.7)
    w = 0.5 + torch.rand(B, generator=torch.Generator().manual_seed(3))
    shape = (B,) if adv_shape == "B" else (B, 1)
    compare(old, lp, adv.reshape(shape), mask, torch.float32, weights=w.reshape(shape),
            ref_adv=adv[:, None].expand(B, T), ref_weights=w[:, None].expand(B, T).contiguous())  # fmt: skip


def test_zero_advantage_tokens_get_no_gradient_like_verl():
    # sign(A) = 0: the token adds 0 to the row's log-ratio sum but counts
    # in L_i; its gradient is 0 (sA * sA); it is never a clipped token
    old, lp, adv, mask = make_batch(5, 24, seed=14, spread=1.0, full_rows=(0, 1))
    adv[:, ::3] = 0.0
    adv[2] = 0.0  # a whole row: pg_i = 0, no gradient
    _, grad, _ = compare(old, lp, adv, mask, torch.float32)
    assert grad[:, ::3].eq(0).all() and grad[2].eq(0).all()
    assert grad[mask & (adv != 0)].ne(0).any()


def on_bound_batch(dtype=torch.float64):
    """Log-ratios exactly on both clip bounds (0.25 and -0.25 are exact), inside and outside."""
    old = torch.zeros(3, 6, dtype=dtype)
    lp = torch.tensor([[0.25, -0.25, 0.1, 0.25, -0.25, 0.5]] * 3, dtype=dtype)
    adv = torch.tensor([[2.0, 1.0, 1.0, -1.0, -1.0, -1.0], [1.0] * 6, [-2.0] * 6], dtype=dtype)
    return old, lp, adv, torch.ones(3, 6, dtype=torch.bool)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_log_ratio_exactly_on_a_clip_bound_matches_verl(dtype):
    # on a bound d == dc: min ties (each side half the gradient) and the
    # clamp passes its half or not as the installed torch's clamp does
    old, lp, adv, mask = on_bound_batch(dtype)
    _, grad, metrics = compare(old, lp, adv, mask, dtype, clip_ratio_low=0.25, clip_ratio_high=0.25)
    assert metrics["pg_clipfrac"].item() > 0  # the 0.5 token, not the ones on the bounds


def test_closed_clamp_gives_the_full_gradient_on_the_bound():
    # torch 2.11's closed clamp: a token on the bound gets the whole gradient
    # (tie: half through d, half through the clamp); 2.15's open one: half.
    old, lp, adv, mask = on_bound_batch()
    grads = {}
    for closed in (False, True):
        g = torch.empty_like(lp)
        _core.policy_loss(old, lp, adv, mask, g, torch.empty((), dtype=torch.float64),
                          torch.empty(_core.METRICS_LEN, dtype=torch.float64), mode="geo_mean", loss_agg_mode="token-mean",
                          clip_ratio=0.25, clamp_closed=closed)  # fmt: skip
        grads[closed] = g
    on = lp.abs() == 0.25
    torch.testing.assert_close(grads[True][on], 2 * grads[False][on], rtol=0, atol=0)
    torch.testing.assert_close(grads[True][~on], grads[False][~on], rtol=0, atol=0)
    assert grads[True][on].abs().min() > 0
    assert grads[torch_clamp_closed()].equal(verl_geo(old, lp, adv, mask, clip_ratio=0.25, clip_ratio_low=None,
                                                      clip_ratio_high=None)[1])  # fmt: skip


def test_clip_ratio_defaults_to_low_and_high_like_verl():
    old, lp, adv, mask = make_batch(5, 20, seed=15, spread=1.0)
    for kw in (dict(clip_ratio_low=None, clip_ratio_high=None), dict(clip_ratio_low=0.1, clip_ratio_high=None),
               dict(clip_ratio=0.3, clip_ratio_low=None, clip_ratio_high=0.05)):  # fmt: skip
        compare(old, lp, adv, mask, torch.float32, **kw)


def test_empty_rows_count_in_the_mean_and_an_all_masked_batch_is_zero():
    # torch.mean over all B rows: an empty row's pg_i is -0 but it counts;
    # a batch with no valid token gives 0 (not NaN), a zero gradient and
    # zero metrics, as verl's
    old, lp, adv, mask = make_batch(6, 20, seed=16, empty_rows=(1, 4))
    loss, _, _ = compare(old, lp, adv, mask, torch.float32)
    keep = [0, 2, 3, 5]
    sub, _, _ = verl_geo(old[keep], lp[keep], adv[keep], mask[keep])
    assert loss.item() == pytest.approx(sub.item() * 4 / 6, rel=1e-6)
    loss, grad, metrics = compare(old, lp, adv, torch.zeros_like(mask), torch.float32)
    assert loss.item() == 0.0 and grad.eq(0).all() and all(v.item() == 0.0 for v in metrics.values())


def test_nan_in_a_valid_token_propagates_like_verl():
    # the row's pg_i is NaN, so the loss is; the row's valid tokens get verl's
    # gradient: NaN, but an exact 0 where torch's min / clamp backward cuts
    # the branch off (a token clipped on its advantage's side); the other rows
    # verl's. Known deviation: at the row's masked tokens verl's gradient is
    # NaN too (NaN * 0 in its backward, but where cut off), ours is 0, as for
    # every mode (masked positions get a zero gradient).
    old, lp, adv, mask = make_batch(4, 12, seed=8, full_rows=(1,), empty_rows=(3,), spread=1.0)
    mask[2, 7:] = True
    mask[2, 9:] = False
    lp[2, 2] = float("nan")
    ref_loss, ref_grad, ref_metrics = verl_geo(old, lp, adv, mask)
    loss, grad, metrics = ours(old, lp, adv, mask)
    assert math.isnan(loss.item()) and math.isnan(ref_loss.item())
    clean = [0, 1, 3]
    assert_close(grad[clean], ref_grad[clean], dtype=torch.float32, what="grad of clean rows")
    valid = mask[2]
    cut = ref_grad[2][valid].eq(0)
    assert cut.any() and torch.isnan(ref_grad[2][valid][~cut]).all(), "the reference is what this test assumes"
    assert_close(grad[2][valid], ref_grad[2][valid], dtype=torch.float32, what="grad of the NaN row")
    assert torch.isnan(ref_grad[2][~valid]).any() and grad[2][~valid].eq(0).all()
    for k, v in ref_metrics.items():  # a NaN log-ratio counts as clipped (NaN != NaN), as verl's
        assert metrics[k].item() == pytest.approx(v, abs=1e-6, nan_ok=True), k


def test_nan_in_a_masked_token_poisons_its_row_like_verl():
    # verl's row sums multiply by the mask, so a masked NaN makes the row's
    # pg_i (and the loss) NaN; the masked-out NaN is not in the metrics
    old, lp, adv, mask = make_batch(4, 10, seed=9, empty_rows=(3,))
    mask[0, -1] = False
    lp[0, -1] = float("nan")
    ref_loss, ref_grad, ref_metrics = verl_geo(old, lp, adv, mask)
    loss, grad, metrics = ours(old, lp, adv, mask)
    assert math.isnan(loss.item()) and math.isnan(ref_loss.item())
    assert_close(grad[1:], ref_grad[1:], dtype=torch.float32, what="grad of clean rows")
    assert_close(grad[0][mask[0]], ref_grad[0][mask[0]], dtype=torch.float32, what="grad of the NaN row")
    assert torch.isnan(grad[0][mask[0]]).any() and grad[0][~mask[0]].eq(0).all()
    for k, v in ref_metrics.items():
        assert metrics[k].item() == pytest.approx(v, abs=1e-6), k


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.float32])
def test_half_precision_inputs(dtype, mask_dtype):
    # We compute in f32 from the half inputs, so the reference is verl on the
    # same values upcast to f32. The loss dtype is verl's on the half inputs:
    # float32 (its row means divide by sum(mask) + 1e-8, float32 for a bool
    # mask); the gradient is log_prob's dtype.
    old, lp, adv, mask = make_batch(6, 50, dtype=dtype, seed=10, spread=0.5, empty_rows=(4,))
    mask = mask.to(mask_dtype)
    w = (0.5 + torch.rand(6, 50, generator=torch.Generator().manual_seed(9))).to(dtype)
    for weights in (None, w):
        up = None if weights is None else weights.float()
        ref_loss, ref_grad, ref_metrics = verl_geo(old.float(), lp.float(), adv.float(), mask, up)
        loss, grad, metrics = ours(old, lp, adv, mask, weights)
        ref_half, _, _ = verl_geo(old, lp, adv, mask, weights)
        assert loss.dtype == ref_half.dtype == torch.float32 and grad.dtype == dtype
        torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grad.float(), ref_grad.to(dtype).float(), rtol=8e-3, atol=1e-7)
        for k, v in ref_metrics.items():
            assert metrics[k].item() == pytest.approx(v, abs=1e-6), k
        # and verl computing in the half type itself lands near (it rounds every op)
        torch.testing.assert_close(loss, ref_half, rtol=5e-2, atol=1e-2)


def test_loss_agg_mode_and_global_batch_normalisers_are_ignored_like_verl():
    # verl's GMPO is torch.mean(pg) whatever loss_agg_mode and
    # global_batch_info say; ours too: the same bits for every setting, and
    # no "dp_size > 1 needs batch_num_tokens" refusal
    old, lp, adv, mask = make_batch(5, 30, seed=17, empty_rows=(2,), spread=0.8)
    base = ours(old, lp, adv, mask)
    settings = [dict(loss_agg_mode=agg) for agg in AGG_MODES] + [
        dict(dp_size=4), dict(dp_size=2, batch_num_tokens=1000, global_batch_size=64, loss_scale_factor=7),
        dict(loss_agg_mode="seq-mean-token-sum-norm", dp_size=8, global_batch_size=3),
    ]  # fmt: skip
    for kw in settings:
        got = ours(old, lp, adv, mask, **kw)
        assert got[0].equal(base[0]) and got[1].equal(base[1]), kw
        verl_kw = {k: v for k, v in kw.items() if k != "loss_agg_mode"}
        ref_loss, ref_grad, _ = verl_geo(old, lp, adv, mask, loss_agg_mode=kw.get("loss_agg_mode", "token-mean"),
                                         **verl_kw)  # fmt: skip
        assert_close(got[0], ref_loss, dtype=torch.float32, what=f"loss {kw}")
        assert_close(got[1], ref_grad, dtype=torch.float32, what=f"grad {kw}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_backward_seed_and_retained_graph_scale_the_gradient(dtype):
    # the factor argument (a seed other than 1, a second backward through a
    # retained graph, float16's recomputed gradient) multiplies GMPO's
    # gradient as every mode's
    old, lp, adv, mask = make_batch(4, 40, dtype=dtype, seed=18, spread=0.5)
    _, g1, _ = ours(old, lp, adv, mask)
    _, g3, _ = ours(old, lp, adv, mask, seed=3.0)
    torch.testing.assert_close(g3.double(), 3 * g1.double(), rtol=4e-3 if dtype == torch.float16 else 1e-6, atol=0)
    x = lp.detach().clone().requires_grad_(True)
    loss, _ = luspo_rs.policy_loss(old, x, adv, mask, mode="geo_mean", **CLIP)
    (first,) = torch.autograd.grad(loss, x, retain_graph=True)
    first = first.clone()
    (again,) = torch.autograd.grad(loss * 2.0, x)
    torch.testing.assert_close(again.double(), 2 * first.double(), rtol=4e-3 if dtype == torch.float16 else 0, atol=0)
    ref = verl_geo(old.float(), lp.float(), adv.float(), mask)[1]
    torch.testing.assert_close(first.float(), ref.to(dtype).float(), rtol=8e-3, atol=1e-7)


def test_length_diagnostics_follow_the_gradient_and_the_clip_flags():
    # computed as for the token modes: the gradient's mass per row (from the
    # gradient written), the pg_clipfrac flags (d != dc where A > 0)
    B, T = 8, 60
    old, lp, adv, mask = make_batch(B, T, seed=19, spread=1.0, empty_rows=(6,))
    x = lp.clone().requires_grad_(True)
    loss, metrics = luspo_rs.policy_loss(old, x, adv, mask, mode="geo_mean", diagnostics=True, **CLIP)
    loss.backward()
    assert list(metrics) == list(VERL_METRICS) + list(METRICS[3:])
    L = mask.sum(-1).double()
    live = L > 0
    long = live & (L > L[live].mean())
    mass = (x.grad.double().abs() * mask).sum(-1)
    want_share = (mass[long].sum() / mass[live].sum()) / (L[long].sum() / L[live].sum())
    clipped = ((lp - old) != (lp - old).clamp(-0.2, 0.28)) & (adv > 0) & mask
    want_long_clip = clipped[long].sum() / L[long].sum()
    want_short_clip = clipped[live & ~long].sum() / L[live & ~long].sum()
    row_adv = (adv.double() * mask).sum(-1)[live] / L[live]
    want_corr = torch.corrcoef(torch.stack([L[live], row_adv]))[0, 1]
    assert metrics["len_long_grad_share"].item() == pytest.approx(want_share.item(), rel=1e-5)
    assert metrics["len_long_clipfrac"].item() == pytest.approx(want_long_clip.item(), rel=1e-9)
    assert metrics["len_short_clipfrac"].item() == pytest.approx(want_short_clip.item(), rel=1e-9)
    assert metrics["len_adv_corr"].item() == pytest.approx(want_corr.item(), rel=1e-5)
    assert math.isfinite(metrics["len_net_push"].item())


def test_bad_inputs_name_the_argument():
    old, lp, adv, mask = make_batch(3, 8, seed=20)
    with pytest.raises(ValueError, match="advantages"):
        luspo_rs.policy_loss(old, lp, adv[:, :5], mask, mode="geo_mean")
    with pytest.raises(ValueError, match="rollout_is_weights"):
        luspo_rs.policy_loss(old, lp, adv, mask, mode="geo_mean", rollout_is_weights=torch.ones(3, 7))
    with pytest.raises(ValueError, match="clip_ratio_high"):
        luspo_rs.policy_loss(old, lp, adv, mask, mode="geo_mean", clip_ratio_high=float("nan"))
    with pytest.raises(ValueError, match="log_prob"):
        luspo_rs.policy_loss(old[:0], lp[:0], adv[:0], mask[:0], mode="geo_mean")
