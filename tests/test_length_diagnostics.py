"""The length-bias diagnostics of ``policy_loss`` (``len_*`` metrics) against
a plain-torch computation of their documented formulas, over verl's own
gradient and clip decisions; and what they say about each loss."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import AGG_MODES, MODES, make_batch, verl_reference

import luspo_rs

CLIP = dict(clip_ratio=0.2, clip_ratio_low=0.2, clip_ratio_high=0.28, clip_ratio_c=3.0)


def clipped_tokens(mode, old, lp, adv, mask):
    """verl's ``pg_clipfrac`` condition ``-A clip(r) > -A r`` per token, in float64."""
    old, lp, adv, m = old.double(), lp.double(), adv.double(), mask.double()
    adv = adv[:, None].expand_as(lp) if adv.dim() == 1 else adv
    if mode == "vanilla":
        r = torch.exp(torch.clamp(lp - old, -20.0, 20.0))
    else:
        seq = ((lp - old) * m).sum(-1) / m.sum(-1).clamp(min=1)
        r = torch.exp(torch.clamp(seq, max=10.0))[:, None].expand_as(lp)
    rc = torch.clamp(r, 1 - CLIP["clip_ratio_low"], 1 + CLIP["clip_ratio_high"])
    return ((-adv * rc > -adv * r) & (m != 0)).double() * m


def reference_diagnostics(mode, old, lp, adv, mask, grad):
    """The formulas of ``luspo_rs.policy_loss``'s docstring, in plain torch."""
    m = mask.double()
    L = m.sum(-1)
    live = L > 0
    A = adv[:, None].expand_as(lp) if adv.dim() == 1 else adv
    mass = grad.double().abs().sum(-1)
    clipped = clipped_tokens(mode, old, lp, adv, mask).sum(-1)
    mean_adv = (A.double() * m).sum(-1) / L.clamp(min=1)
    Lbar = L[live].mean()
    long = live & (L > Lbar)
    short = live & ~long
    share = (mass[long].sum() / mass[live].sum()) / (L[long].sum() / L[live].sum())
    x, y = L[live] - Lbar, mean_adv[live] - mean_adv[live].mean()
    corr = (x * y).sum() / torch.sqrt((x * x).sum() * (y * y).sum())
    w = -(grad.double() * m).sum(-1)[live] / L[live]  # each row's log-likelihood weight
    return {
        "len_net_push": (w.sum() / w.abs().sum()).item(),
        "len_long_grad_share": share.item(),
        "len_long_clipfrac": (clipped[long].sum() / L[long].sum()).item(),
        "len_short_clipfrac": (clipped[short].sum() / L[short].sum()).item(),
        "len_adv_corr": corr.item(),
    }


@pytest.mark.parametrize("agg", AGG_MODES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("per_seq", [True, False], ids=["seq_adv", "token_adv"])
def test_diagnostics_match_their_formulas_over_verls_gradient(mode, agg, per_seq):
    old, lp, adv, mask = make_batch(12, 40, dtype=torch.float64, seed=31, spread=0.4, per_seq_adv=per_seq,
                                    empty_rows=(3,), full_rows=(0,))
    ref_adv = adv[:, None].expand_as(lp) if adv.dim() == 1 else adv
    _, ref_grad, _ = verl_reference(mode, old, lp, ref_adv, mask, agg, **CLIP)
    x = lp.clone().requires_grad_()
    _, metrics = luspo_rs.policy_loss(old, x, adv, mask, mode=mode, loss_agg_mode=agg, diagnostics=True, **CLIP)
    want = reference_diagnostics(mode, old, lp, adv, mask, ref_grad)
    for k, v in want.items():
        assert metrics[k].item() == pytest.approx(v, rel=1e-9, abs=1e-12), k


def test_what_the_diagnostics_say_about_each_loss():
    # One advantage per sequence, ratios inside the clip range, lengths from 1
    # to 40: GSPO's seq-mean-token-mean weighs a long response's tokens by
    # 1/L_i (share < 1), LUSPO and vanilla token-mean weigh every token alike.
    B, T = 16, 40
    old = torch.zeros(B, T, dtype=torch.float64)
    lp = torch.full((B, T), 0.01, dtype=torch.float64)
    lengths = torch.arange(1, B + 1) * 40 // B
    mask = torch.arange(T)[None, :] < lengths[:, None]
    adv = torch.ones(B, dtype=torch.float64)
    shares = {}
    for mode, agg in (("vanilla", "token-mean"), ("gspo", "seq-mean-token-mean"), ("luspo", "token-mean")):
        _, m = luspo_rs.policy_loss(old, lp.clone().requires_grad_(), adv, mask, mode=mode, loss_agg_mode=agg,
                                    diagnostics=True, **CLIP)
        shares[mode] = m["len_long_grad_share"].item()
        assert m["len_long_clipfrac"].item() == m["len_short_clipfrac"].item() == 0.0
        assert math.isnan(m["len_adv_corr"].item())  # constant advantages: undefined
    assert shares["vanilla"] == pytest.approx(1.0, rel=1e-12)
    assert shares["luspo"] == pytest.approx(1.0, rel=1e-12)
    # GSPO: every row carries the same mass, so the share is the long rows'
    # share of rows over their share of tokens
    L = lengths.double()
    long = L > L.mean()
    assert shares["gspo"] == pytest.approx((long.sum() / len(L) / (L[long].sum() / L.sum())).item(), rel=1e-9)
    assert shares["gspo"] < 0.7
    # rewarding length: a positive correlation
    _, m = luspo_rs.policy_loss(old, lp, lengths.double(), mask, mode="luspo", diagnostics=True, **CLIP)
    assert m["len_adv_corr"].item() == pytest.approx(1.0, rel=1e-12)


def test_undefined_diagnostics_are_nan():
    old, lp, adv, mask = make_batch(4, 8, seed=2)
    full = torch.ones_like(mask)  # equal lengths: no row is longer than the mean
    _, m = luspo_rs.policy_loss(old, lp, adv, full, mode="gspo", diagnostics=True)
    assert math.isnan(m["len_long_grad_share"].item()) and math.isnan(m["len_long_clipfrac"].item())
    assert not math.isnan(m["len_short_clipfrac"].item())
    _, m = luspo_rs.policy_loss(old, lp, adv, torch.zeros_like(mask), mode="gspo", diagnostics=True)  # all empty
    assert all(math.isnan(m[k].item()) for k in m if k.startswith("len_"))


def test_diagnostics_are_off_by_default_and_change_nothing_else():
    old, lp, adv, mask = make_batch(6, 30, seed=4, spread=0.5)
    outs = {}
    for diag in (False, True):
        x = lp.clone().requires_grad_()
        loss, m = luspo_rs.policy_loss(old, x, adv, mask, mode="gspo", diagnostics=diag)
        loss.backward()
        outs[diag] = (loss, x.grad, m)
    assert list(outs[False][2]) == ["pg_clipfrac", "ppo_kl", "pg_clipfrac_lower"]
    assert list(outs[True][2])[:3] == list(outs[False][2]) and len(outs[True][2]) == 8
    assert torch.equal(outs[True][0], outs[False][0]) and torch.equal(outs[True][1], outs[False][1])
    for k, v in outs[False][2].items():
        assert torch.equal(outs[True][2][k], v)


def test_net_push_reads_the_clip_imbalance():
    # One advantage per sequence, half the rows positive and half negative in
    # each length, every ratio moved up by 1e-3 (outside a 3e-4 / 4e-4 clip):
    # an unclipped step pushes up and down in balance (LUSPO, token-mean), a
    # clip that cuts only the rows it has moved far enough leaves the rest.
    B, T = 16, 20
    lengths = (torch.arange(B) // 2) * 2 + 4
    mask = torch.arange(T)[None, :] < lengths[:, None]
    adv = torch.tensor([1.0, -1.0] * (B // 2), dtype=torch.float64)
    old = torch.zeros(B, T, dtype=torch.float64)
    for mode, agg in (("vanilla", "token-mean"), ("luspo", "token-mean")):
        _, m = luspo_rs.policy_loss(old, old.clone(), adv, mask, mode=mode, loss_agg_mode=agg, diagnostics=True)
        assert abs(m["len_net_push"].item()) < 1e-12, mode  # on-policy: balanced
    up = torch.full((B, T), 1e-3, dtype=torch.float64)  # every ratio 1.001
    for mode in ("vanilla", "gspo", "luspo"):
        _, m = luspo_rs.policy_loss(old, up, adv, mask, mode=mode, diagnostics=True,
                                    clip_ratio_low=3e-4, clip_ratio_high=4e-4)
        # ratio 1.001 > 1 + 4e-4: the positive rows are clipped, only the
        # negative ones (their ratio is above the low bound) push: -1
        assert m["len_net_push"].item() == pytest.approx(-1.0, rel=1e-12), mode
    down = -up  # every ratio 0.999 < 1 - 3e-4: the negative rows are clipped
    _, m = luspo_rs.policy_loss(old, down, adv, mask, mode="gspo", diagnostics=True,
                                clip_ratio_low=3e-4, clip_ratio_high=4e-4)
    assert m["len_net_push"].item() == pytest.approx(1.0, rel=1e-12)
    _, m = luspo_rs.policy_loss(old, old, adv, torch.zeros_like(mask), mode="gspo", diagnostics=True)
    assert math.isnan(m["len_net_push"].item())  # no row: undefined
