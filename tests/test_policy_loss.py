"""Parity of luspo_rs.policy_loss with verl 0.9.1's own policy losses: the
loss, the gradient through ``loss.backward()`` and the metrics, for every
mode x aggregation x dtype x IS weights x shape case. Bad input, layouts and
what backward keeps: ``test_policy_loss_inputs.py``; verl's signatures and
config handling (``luspo_rs.core_algos``): ``test_core_algos.py``."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import AGG_MODES, MODES, assert_close, check_public_op, make_batch, stable_seed, verl_core_algos, verl_reference

import luspo_rs

CASES = {
    "B1": dict(B=1, T=7),
    "T1": dict(B=5, T=1),
    "odd_T_with_empty_and_full_rows": dict(B=7, T=33, empty_rows=(2,), full_rows=(0, 5)),
    "far_from_1_clipped": dict(B=8, T=64, spread=3.0),
    "per_sequence_advantages": dict(B=6, T=17, per_seq_adv=True, spread=1.0),
}
CLIP = dict(clip_ratio=0.2, clip_ratio_low=0.2, clip_ratio_high=0.28, clip_ratio_c=3.0)


def ours(mode, old, lp, adv, mask, agg, weights=None, **kw):
    x = lp.detach().clone().requires_grad_(True)
    loss, metrics = luspo_rs.policy_loss(old, x, adv, mask, mode=mode, loss_agg_mode=agg, rollout_is_weights=weights, **kw)
    loss.backward()
    return loss.detach(), x.grad, metrics


def compare(mode, old, lp, adv, mask, agg, dtype, weights=None, ref_adv=None, ref_weights=None, **kw):
    kw = {**CLIP, **kw}
    ref_loss, ref_grad, ref_metrics = verl_reference(
        mode, old, lp, adv if ref_adv is None else ref_adv, mask, agg,
        weights if ref_weights is None else ref_weights, **kw
    )
    loss, grad, metrics = ours(mode, old, lp, adv, mask, agg, weights, **kw)
    assert loss.dtype == ref_loss.dtype and grad.dtype == lp.dtype  # verl promotes, e.g. with a float64 mask
    assert_close(loss, ref_loss, dtype=dtype, what="loss")
    assert_close(grad, ref_grad, dtype=dtype, what="grad")
    for k, v in ref_metrics.items():
        assert metrics[k].item() == pytest.approx(v, abs=1e-6, nan_ok=True), k
    return loss, grad


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("with_weights", [False, True], ids=["no_is", "is_weights"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("agg", AGG_MODES)
@pytest.mark.parametrize("mode", MODES)
def test_matches_verl(mode, agg, dtype, with_weights, case):
    spec = dict(CASES[case])
    B, T = spec.pop("B"), spec.pop("T")
    old, lp, adv, mask = make_batch(B, T, dtype=dtype, seed=stable_seed(mode, agg, case) % 1000, **spec)
    weights = None
    if with_weights:
        weights = (0.5 + torch.rand(B, T, generator=torch.Generator().manual_seed(7), dtype=torch.float64)).to(dtype)
    ref_adv = adv[:, None].expand(B, T) if adv.dim() == 1 else None
    compare(mode, old, lp, adv, mask, agg, dtype, weights, ref_adv=ref_adv)


@pytest.mark.parametrize("agg", AGG_MODES)
@pytest.mark.parametrize("mode", MODES)
def test_global_batch_normalisers_match_verl(mode, agg):
    old, lp, adv, mask = make_batch(9, 40, seed=3, empty_rows=(4,))
    compare(mode, old, lp, adv, mask, agg, torch.float32,
            dp_size=4, batch_num_tokens=1234, global_batch_size=37, loss_scale_factor=512)


@pytest.mark.parametrize("mode", MODES)
def test_per_sequence_is_weights_broadcast_like_verl(mode):
    old, lp, adv, mask = make_batch(6, 20, seed=4)
    w = torch.linspace(0.5, 1.5, 6)
    compare(mode, old, lp, adv, mask, "token-mean", torch.float32, w, ref_weights=w[:, None].expand(6, 20))


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.int64, torch.int32, torch.uint8, torch.float32, torch.float64])
@pytest.mark.parametrize("mode", MODES)
def test_mask_dtypes_match_verl(mode, mask_dtype):
    old, lp, adv, mask = make_batch(5, 23, seed=5, empty_rows=(1,))
    for agg in AGG_MODES:
        compare(mode, old, lp, adv, mask.to(mask_dtype), agg, torch.float32)


@pytest.mark.parametrize("mode", MODES)
def test_gradient_ties_on_the_clip_bound_split_like_torch(mode):
    # clip_ratio = 0: the clipped ratio equals the ratio exactly when lp == old,
    # so torch.maximum sees a tie and splits the gradient between its inputs.
    old = torch.zeros(3, 5, dtype=torch.float64)
    lp = old.clone()
    adv = torch.tensor([[1.0, -1.0, 0.5, -2.0, 3.0]] * 3, dtype=torch.float64)
    mask = torch.ones(3, 5, dtype=torch.bool)
    compare(mode, old, lp, adv, mask, "token-mean", torch.float64, clip_ratio=0.0, clip_ratio_low=0.0, clip_ratio_high=0.0)


def test_dual_clip_tie_splits_like_torch():
    # ratio == clip_ratio_c exactly (exp(1) in double on both sides) with A < 0.
    c = math.exp(1.0)
    old = torch.zeros(2, 3, dtype=torch.float64)
    lp = torch.ones(2, 3, dtype=torch.float64)
    adv = -torch.ones(2, 3, dtype=torch.float64)
    mask = torch.ones(2, 3, dtype=torch.bool)
    loss, grad = compare("vanilla", old, lp, adv, mask, "token-mean", torch.float64, clip_ratio_c=c)
    assert grad.abs().sum() > 0  # the tie gives half the gradient, not none


@pytest.mark.parametrize("agg", AGG_MODES)
@pytest.mark.parametrize("mode", MODES)
def test_all_rows_masked_matches_verl(mode, agg):
    # verl divides 0 by 0 here (NaN) in the modes without a given normaliser.
    old, lp, adv, mask = make_batch(3, 6, seed=6)
    loss, _ = compare(mode, old, lp, adv, torch.zeros_like(mask), agg, torch.float32)
    if agg == "token-sum" and mode != "luspo":
        assert loss.item() == 0.0
    else:
        assert math.isnan(loss.item())


@pytest.mark.parametrize("agg", AGG_MODES)
@pytest.mark.parametrize("mode", MODES)
def test_nan_in_valid_token_propagates_like_verl(mode, agg):
    old, lp, adv, mask = make_batch(4, 10, seed=8, full_rows=(1,))
    lp[1, 3] = float("nan")
    ref_loss, ref_grad, _ = verl_reference(mode, old, lp, adv, mask, agg, **CLIP)
    loss, grad, _ = ours(mode, old, lp, adv, mask, agg, **CLIP)
    assert math.isnan(loss.item()) and math.isnan(ref_loss.item())
    # rows without the NaN keep verl's gradient
    assert_close(grad[[0, 2, 3]], ref_grad[[0, 2, 3]], dtype=torch.float32, what="grad of clean rows")
    # and the NaN token's row gets verl's gradient too: the clamp on the
    # log-ratio (vanilla) or on the token ratio at 10 (GSPO, LUSPO: the whole
    # row's ratio is NaN) passes none to a NaN value, so it is 0, not NaN
    assert not ref_grad[1].isnan().any(), "the reference is what this test assumes"
    assert_close(grad[1], ref_grad[1], dtype=torch.float32, what="grad of the NaN row")


@pytest.mark.parametrize("agg", AGG_MODES)
@pytest.mark.parametrize("mode", MODES)
def test_nan_in_the_mask(mode, agg):
    # Our rule (docs/exactness.md, "NaN rules"): a NaN mask entry makes its row's mask sum NaN;
    # the sequence modes drop that row, as verl's `sum(m) > 0` does: verl's
    # loss, and a zero gradient for the row (verl's is NaN at the NaN entry
    # for vanilla, 0 for GSPO, whose clamp stops it, NaN on the whole row for
    # vanilla seq-mean-token-mean). In the token modes the token count is NaN:
    # the loss is NaN, as verl's.
    old, lp, adv, mask = make_batch(4, 10, seed=8, full_rows=(1,))
    mask = mask.float()
    mask[1, 3] = float("nan")
    ref_loss, ref_grad, _ = verl_reference(mode, old, lp, adv, mask, agg, **CLIP)
    loss, grad, _ = ours(mode, old, lp, adv, mask, agg, **CLIP)
    seq = agg.startswith("seq") or mode == "luspo"
    if seq:
        assert math.isfinite(ref_loss.item()), "the reference is what this test assumes"
        assert_close(loss, ref_loss, dtype=torch.float32, what="loss")
        assert grad[1].eq(0).all(), "the dropped row gets no gradient"
        assert_close(grad[[0, 2, 3]], ref_grad[[0, 2, 3]], dtype=torch.float32, what="grad of clean rows")
    else:
        assert math.isnan(loss.item()) and math.isnan(ref_loss.item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("agg", AGG_MODES)
@pytest.mark.parametrize("mode", MODES)
def test_nan_advantage_gives_verls_nan_gradient(mode, agg, dtype):
    # A NaN advantage makes the loss NaN; at clipped tokens (ratio e^0.5 is
    # past 1 + 0.28) the gradient must be NaN too, as verl's is: torch's
    # maximum passes the gradient to both operands when one is NaN. A finite
    # gradient there would slip past a trainer's non-finite-grad-norm guard.
    old = torch.zeros(2, 2, dtype=dtype)
    lp = torch.tensor([[0.5, -0.5], [0.0, 0.1]], dtype=dtype)
    adv = torch.ones(2, 2, dtype=dtype)
    adv[0] = float("nan")
    mask = torch.ones(2, 2, dtype=torch.bool)
    ref_loss, ref_grad, _ = verl_reference(mode, old, lp, adv, mask, agg, **CLIP)
    loss, grad, _ = ours(mode, old, lp, adv, mask, agg, **CLIP)
    assert torch.isnan(ref_grad[0]).all(), "the reference is what this test assumes"
    assert_close(loss, ref_loss, dtype=dtype, what="loss")
    assert_close(grad, ref_grad, dtype=dtype, what="grad")  # NaN exactly where verl's is


@pytest.mark.parametrize("agg", AGG_MODES)
@pytest.mark.parametrize("mode", MODES)
def test_nan_in_masked_position_matches_verl_loss(mode, agg):
    # verl's masked_sum drops masked NaNs (token modes); its row sums in
    # sequence modes multiply by the mask, so a masked NaN poisons the row.
    old, lp, adv, mask = make_batch(4, 10, seed=9, empty_rows=(3,))
    mask[0, -1] = False
    adv[0, -1] = float("nan")
    adv[3, 0] = float("nan")  # in a fully masked row
    ref_loss, _, _ = verl_reference(mode, old, lp, adv, mask, agg, **CLIP)
    loss, grad, _ = ours(mode, old, lp, adv, mask, agg, **CLIP)
    assert_close(loss, ref_loss, dtype=torch.float32, what="loss")
    assert grad[~mask].eq(0).all(), "masked positions get a zero gradient"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode", MODES)
def test_half_precision_inputs(mode, dtype):
    # We compute in fp32 from the half inputs and round only the outputs, so
    # the reference is verl on the same values upcast to fp32; the tolerance
    # is the rounding of the outputs to the half type (2^-8 for bf16).
    old, lp, adv, mask = make_batch(6, 50, dtype=dtype, seed=10, spread=0.5)
    for agg in AGG_MODES:
        ref_loss, ref_grad, ref_metrics = verl_reference(mode, old.float(), lp.float(), adv.float(), mask, agg, **CLIP)
        loss, grad, metrics = ours(mode, old, lp, adv, mask, agg, **CLIP)
        assert loss.dtype == dtype and grad.dtype == dtype
        torch.testing.assert_close(loss.float(), ref_loss, rtol=8e-3, atol=1e-5)
        torch.testing.assert_close(grad.float(), ref_grad.to(dtype).float(), rtol=8e-3, atol=1e-7)
        for k, v in ref_metrics.items():
            assert metrics[k].item() == pytest.approx(v, abs=1e-6), k
        # and verl computing in the half type itself lands near (it rounds every op)
        ref_half, _, _ = verl_reference(mode, old, lp, adv, mask, agg, **CLIP)
        torch.testing.assert_close(loss.float(), ref_half.float(), rtol=5e-2, atol=1e-3)


def test_luspo_ignores_loss_agg_mode_and_weights_sequences_by_length():
    # J = 1/G sum_i L_i * l_i for sequence-level advantages: scaling a row's
    # length scales its share of the loss, unlike GSPO seq-mean-token-mean.
    B, T = 2, 8
    old = torch.zeros(B, T)
    lp = torch.full((B, T), 0.05)
    adv = torch.tensor([1.0, 1.0])
    mask = torch.zeros(B, T, dtype=torch.bool)
    mask[0, :2] = True
    mask[1, :8] = True
    losses = {agg: luspo_rs.policy_loss(old, lp, adv, mask, mode="luspo", loss_agg_mode=agg)[0] for agg in AGG_MODES}
    assert len({v.item() for v in losses.values()}) == 1
    s = math.exp(0.05)  # inside [0.8, 1.2]: every token's loss is -A * s = -s
    assert losses["token-mean"].item() == pytest.approx((2 * -s + 8 * -s) / 2, rel=1e-6)


def test_metrics_are_float64_tensors_on_the_input_device():
    old, lp, adv, mask = make_batch(3, 5)
    _, metrics = luspo_rs.policy_loss(old, lp, adv, mask, mode="vanilla", diagnostics=True)
    assert list(metrics) == ["pg_clipfrac", "ppo_kl", "pg_clipfrac_lower", "len_long_grad_share",
                             "len_long_clipfrac", "len_short_clipfrac", "len_adv_corr", "len_net_push"]
    for v in metrics.values():
        assert v.dim() == 0 and v.dtype == torch.float64 and v.device == lp.device and not v.requires_grad


def test_clamp_convention_follows_the_installed_torch():
    # torch 2.11 passes clamp's gradient on the bounds, torch 2.15 does not;
    # the flag we send the kernels is measured from the torch in use.
    from luspo_rs.functional import torch_clamp_closed

    x = torch.tensor([0.8, 1.2], requires_grad=True)
    torch.clamp(x, 0.8, 1.2).sum().backward()
    assert torch_clamp_closed() == bool(x.grad.eq(1).all())


@pytest.mark.parametrize("mode", MODES)
def test_closed_clamp_convention_gives_the_full_gradient_on_the_bound(mode):
    # ratio == 1 == both clip bounds: with the closed convention both branches
    # of the maximum carry the gradient (tie -> full), with the open one only
    # the unclipped branch does (tie -> half).
    from luspo_rs import _core

    old = torch.zeros(2, 4, dtype=torch.float64)
    adv = torch.tensor([[1.0, -1.0, 2.0, -0.5]] * 2, dtype=torch.float64)
    mask = torch.ones(2, 4, dtype=torch.bool)
    grads = {}
    for closed in (False, True):
        g = torch.empty(2, 4, dtype=torch.float64)
        _core.policy_loss(old, old.clone(), adv, mask, g, torch.empty((), dtype=torch.float64),
                          torch.empty(_core.METRICS_LEN, dtype=torch.float64), mode=mode, loss_agg_mode="token-mean", clip_ratio=0.0,
                          clamp_closed=closed)
        grads[closed] = g
    torch.testing.assert_close(grads[True], 2 * grads[False], rtol=0, atol=0)
    assert grads[True].abs().min() > 0


@pytest.mark.parametrize("mode", ["vanilla", "gspo"])
def test_gradient_differs_from_verl_only_at_clip_bound_ties(mode):
    # The one documented exception to gradient parity (issue 8): where the
    # ratio lies within an ulp of a clip bound, our exp and torch's can round
    # to different sides of it, and that token's gradient is then verl's x2,
    # x0.5 or 0 (a tie split, or the clamp passing or stopping it). Log-ratios
    # are drawn at log(bound) plus a few f32 ulps, so ties are plentiful.
    g = torch.Generator().manual_seed(12)
    B, T = 64, 1024
    lo, hi = torch.tensor(1 - CLIP["clip_ratio_low"]), torch.tensor(1 + CLIP["clip_ratio_high"])
    bound = torch.where(torch.rand(B, T, generator=g) < 0.5, lo, hi).log()
    d = bound + torch.randint(-4, 5, (B, T), generator=g).float() * 6e-8
    if mode == "gspo":  # a sequence ratio at a bound: every token of the row carries the row mean
        d = d[:, :1].expand(B, T).contiguous()
    old = -torch.rand(B, T, generator=g)
    lp = old + d
    adv = torch.randn(B, T, generator=g)
    mask = torch.ones(B, T, dtype=torch.bool)
    _, ref_grad, _ = verl_reference(mode, old, lp, adv, mask, "token-mean", **CLIP)
    _, grad, _ = ours(mode, old, lp, adv, mask, "token-mean", **CLIP)
    off = ~torch.isclose(grad, ref_grad, atol=1e-9, rtol=1e-5)
    # torch's own ratio for each token (as verl computes it), against the f32 bounds
    r = torch.exp(lp - old) if mode == "vanilla" else torch.exp(((lp - old) * mask).sum(-1, keepdim=True) / T).expand(B, T)
    ulp = torch.finfo(torch.float32).eps
    near = ((r - lo).abs() <= 2 * ulp) | ((r - hi).abs() <= 2 * ulp)
    assert near.sum() > 100, "the draw must put many ratios at the bounds"
    assert not (off & ~near).any(), f"{int((off & ~near).sum())} gradients differ away from a clip bound"
    q = (grad[off] / ref_grad[off]).abs().tolist()  # inf where verl's is 0
    assert all(abs(x - 2) < 1e-4 or abs(x - 0.5) < 1e-4 or x == 0 or x == math.inf for x in q), (
        f"differences at ties are x2, x0.5, 0 or from 0, got {sorted(set(round(x, 4) for x in q))}"
    )


@pytest.mark.parametrize("mode", MODES)
def test_float64_mask_promotes_like_verl(mode):
    # verl's sequence mean sum(d * m) / sum(m) is float64 with a float64 mask,
    # and so are the GSPO ratio and the loss; float32 log-probs keep a float32
    # gradient. Ours follows: the loss is float64, and for GSPO / LUSPO agrees
    # to 1e-9 (computing the sequence mean in float32 is off by up to ~2e-8
    # here). Vanilla's token ratio is float32 in verl too, so its float64 loss
    # agrees to float32 rounding.
    old, lp, adv, mask = make_batch(6, 50, seed=11, empty_rows=(2,), spread=0.05)
    mask = mask.to(torch.float64)
    for agg in AGG_MODES:
        ref_loss, ref_grad, _ = verl_reference(mode, old, lp, adv, mask, agg, **CLIP)
        loss, grad, _ = ours(mode, old, lp, adv, mask, agg, **CLIP)
        assert loss.dtype == ref_loss.dtype == torch.float64 and grad.dtype == torch.float32
        tol = 1e-9 if mode != "vanilla" else 1e-6
        assert abs(loss.item() - ref_loss.item()) <= tol * max(1.0, abs(ref_loss.item())), (agg, loss, ref_loss)
        assert_close(grad, ref_grad, dtype=torch.float32, what="grad")


def test_public_function_and_its_modes():
    # every loss verl registers (bypass_mode dispatches to vanilla or
    # reinforce in Python), LUSPO, and the REINFORCE loss bypass mode runs
    every = set(verl_core_algos.POLICY_LOSS_REGISTRY) - {"bypass_mode"} | {"luspo", "reinforce"}
    check_public_op("policy_loss", "PolicyMode", sorted(every))
