"""Parity of luspo_rs.value_loss (and its verl-signature drop-in
``luspo_rs.core_algos.compute_value_loss``) with verl 0.9.1's own
``compute_value_loss``: the loss, the gradient w.r.t. ``vpreds`` through
``loss.backward()`` and ``vf_clipfrac``, for every aggregation, dtype, mask
kind, the global-batch normalisers, ties on the clip bounds, NaN, fully
masked rows; and bad input. The CUDA twin: ``test_cuda.py``."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import AGG_MODES, assert_close, stable_seed
from value_cases import CLIPRANGE, value_batch, verl_value

import luspo_rs
import luspo_rs.core_algos as core_algos

CASES = {
    "B1": dict(B=1, T=7),
    "T1": dict(B=5, T=1),
    "odd_T_with_empty_and_full_rows": dict(B=7, T=33, empty_rows=(2,), full_rows=(0, 5)),
    "mostly_clipped": dict(B=8, T=64, spread=2.0),
    "mostly_unclipped": dict(B=6, T=17, spread=0.05),
    "long_rows": dict(B=3, T=700, full_rows=(1,)),
}


def ours(vpreds, values, returns, mask, cliprange=CLIPRANGE, loss_agg_mode="token-mean", **norm):
    x = vpreds.detach().clone().requires_grad_(True)
    loss, clipfrac = luspo_rs.value_loss(x, values, returns, mask, cliprange, loss_agg_mode, **norm)
    loss.backward()
    return loss.detach(), x.grad, clipfrac


def compare(vpreds, values, returns, mask, dtype, cliprange=CLIPRANGE, loss_agg_mode="token-mean", **norm):
    ref_loss, ref_grad, ref_cf = verl_value(vpreds, values, returns, mask, cliprange, loss_agg_mode, **norm)
    loss, grad, cf = ours(vpreds, values, returns, mask, cliprange, loss_agg_mode, **norm)
    assert loss.dtype == ref_loss.dtype and grad.dtype == vpreds.dtype
    assert cf.dtype == torch.float64 and cf.dim() == 0 and not cf.requires_grad
    assert_close(loss, ref_loss, dtype=dtype, what="loss")
    assert_close(grad, ref_grad, dtype=dtype, what="grad")
    assert cf.item() == pytest.approx(ref_cf.item(), abs=1e-6, nan_ok=True), "vf_clipfrac"
    return loss, grad, cf


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("agg", AGG_MODES)
def test_matches_verl(agg, dtype, case):
    spec = dict(CASES[case])
    B, T = spec.pop("B"), spec.pop("T")
    batch = value_batch(B, T, dtype=dtype, seed=stable_seed("value", agg, case) % 1000, **spec)
    _, _, cf = compare(*batch, dtype, loss_agg_mode=agg)
    if case == "mostly_clipped":
        assert cf.item() > 0.1, "the case must clip"


@pytest.mark.parametrize("agg", AGG_MODES)
def test_global_batch_normalisers_match_verl(agg):
    batch = value_batch(9, 40, seed=3, empty_rows=(4,))
    compare(*batch, torch.float32, loss_agg_mode=agg,
            dp_size=4, batch_num_tokens=1234, global_batch_size=37, loss_scale_factor=512)  # fmt: skip


@pytest.mark.parametrize("agg", AGG_MODES)
def test_normalisers_as_0d_tensors_match_verl(agg):
    # verl's critic reads them from the batch (data["batch_num_tokens"], ...)
    batch = value_batch(6, 21, seed=13)
    compare(*batch, torch.float32, loss_agg_mode=agg, dp_size=2, batch_num_tokens=torch.tensor(90),
            global_batch_size=torch.tensor(11), loss_scale_factor=64)  # fmt: skip


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.int64, torch.int32, torch.uint8, torch.float32, torch.float64])
def test_mask_dtypes_match_verl(mask_dtype):
    vp, v, r, mask = value_batch(5, 23, seed=5, empty_rows=(1,))
    for agg in AGG_MODES:
        compare(vp, v, r, mask.to(mask_dtype), torch.float32, loss_agg_mode=agg)


def test_float64_mask_promotes_the_loss_like_verl():
    vp, v, r, mask = value_batch(6, 30, seed=14, empty_rows=(2,))
    for agg in AGG_MODES:
        loss, grad, _ = compare(vp, v, r, mask.double(), torch.float32, loss_agg_mode=agg)
        assert loss.dtype == torch.float64 and grad.dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs(dtype):
    # The project's half rule (as test_policy_loss): we compute in fp32 from
    # the half inputs and round only the outputs, so the reference is verl on
    # the same values upcast to fp32; verl in the half type rounds every op
    # (values -+ c, the squares) and lands near.
    vp, v, r, mask = value_batch(6, 50, dtype=dtype, seed=10, spread=0.5)
    for agg in AGG_MODES:
        ref_loss, ref_grad, ref_cf = verl_value(vp.float(), v.float(), r.float(), mask, loss_agg_mode=agg)
        loss, grad, cf = ours(vp, v, r, mask, loss_agg_mode=agg)
        assert loss.dtype == dtype and grad.dtype == dtype
        torch.testing.assert_close(loss.float(), ref_loss, rtol=8e-3, atol=1e-5)
        torch.testing.assert_close(grad.float(), ref_grad.to(dtype).float(), rtol=8e-3, atol=1e-7)
        assert cf.item() == pytest.approx(ref_cf.item(), abs=1e-6)
        ref_half, _, _ = verl_value(vp, v, r, mask, loss_agg_mode=agg)
        torch.testing.assert_close(loss.float(), ref_half.float(), rtol=5e-2, atol=1e-3)


def test_float16_gradient_seeded_past_the_range_does_not_overflow():
    # a float16 gradient is computed again with the seed applied before its
    # one rounding, as torch's chain rounds it, where forward's would overflow
    vp, v, r, mask = value_batch(3, 8, dtype=torch.float16, seed=15, spread=1.0)
    x = vp.clone().requires_grad_()
    loss, _ = luspo_rs.value_loss(x, v, r, mask, CLIPRANGE, "token-sum")
    loss.backward(torch.tensor(3e4, dtype=torch.float16))
    want = verl_value(vp.float(), v.float(), r.float(), mask, loss_agg_mode="token-sum")[1] * 3e4
    assert torch.isfinite(x.grad[want.abs() < 6e4]).all()
    torch.testing.assert_close(x.grad.float(), want.to(torch.float16).float(), rtol=8e-3, atol=1e-3)


@pytest.mark.parametrize("agg", AGG_MODES)
def test_ties_split_the_gradient_like_torch(agg):
    # Exactly representable bounds: predictions on values + c and values - c
    # (clip_by_value's torch.min / torch.max tie: half the gradient), inside
    # (l1 == l2: torch.max's tie splits between two equal derivatives), and
    # c = 0 with vpreds == values (both ties at once: a quarter).
    values = torch.tensor([[1.0, 1.0, 1.0, -2.0, 0.0, 3.0]] * 2, dtype=torch.float64)
    vpreds = torch.tensor([[1.5, 0.5, 1.25, -2.5, 0.0, 3.5]] * 2, dtype=torch.float64)
    returns = torch.tensor([[0.0, 2.0, 1.0, 1.0, -1.0, 0.25]] * 2, dtype=torch.float64)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, 3:] = False
    _, grad, _ = compare(vpreds, values, returns, mask, torch.float64, cliprange=0.5, loss_agg_mode=agg)
    assert grad[0, 0] != 0 and grad[0, 1] != 0, "on a bound the clipped branch passes half, not none"
    _, grad0, _ = compare(values.clone(), values, returns, mask, torch.float64, cliprange=0.0, loss_agg_mode=agg)
    assert grad0[mask & (returns != values)].ne(0).all()


def test_fp32_bounds_are_rounded_like_torchs():
    # values -+ c is rounded to float32 as torch rounds it; a prediction on
    # that rounded bound is a tie there, and the gradient says so
    values = torch.full((1, 4), 0.1, dtype=torch.float32)
    c = 0.3
    vpreds = torch.stack([values[0] + c, values[0] - c]).reshape(2, 4)[:1]
    returns = torch.full((1, 4), 5.0)
    compare(vpreds, values, returns, torch.ones(1, 4, dtype=torch.bool), torch.float32, cliprange=c)
    compare(vpreds, values, returns, torch.ones(1, 4, dtype=torch.bool), torch.float32, cliprange=c,
            loss_agg_mode="seq-mean-token-mean")  # fmt: skip


@pytest.mark.parametrize("what", ["vpreds", "values", "returns"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("agg", AGG_MODES)
def test_nan_in_a_valid_token_gives_verls_nan_loss_and_gradient(agg, dtype, what):
    # a NaN anywhere reaches the loss and, through torch's min / max (which
    # pass the gradient to both operands when one is NaN), the gradient:
    # exactly where verl's is NaN, so a non-finite-grad-norm guard sees it
    batch = dict(zip(["vpreds", "values", "returns", "mask"], value_batch(4, 10, dtype=dtype, seed=8, full_rows=(1,))))
    batch[what][1, 3] = float("nan")
    batch[what][2, 0] = float("nan")
    loss, grad, _ = compare(batch["vpreds"], batch["values"], batch["returns"], batch["mask"], dtype,
                            loss_agg_mode=agg)  # fmt: skip
    assert math.isnan(loss.item())
    assert torch.isnan(grad[1, 3])


@pytest.mark.parametrize("agg", AGG_MODES)
def test_nan_in_a_masked_position_matches_verl(agg):
    # verl's masked_sum drops masked NaNs (token modes); its row sums in
    # sequence modes multiply by the mask, so a masked NaN poisons the row
    vp, v, r, mask = value_batch(4, 10, seed=9, empty_rows=(3,))
    mask[0, -1] = False
    r[0, -1] = float("nan")
    vp[3, 0] = float("nan")  # in a fully masked row
    ref_loss, _, ref_cf = verl_value(vp, v, r, mask, loss_agg_mode=agg)
    loss, grad, cf = ours(vp, v, r, mask, loss_agg_mode=agg)
    assert_close(loss, ref_loss, dtype=torch.float32, what="loss")
    assert cf.item() == pytest.approx(ref_cf.item(), abs=1e-6)
    assert grad[~mask].eq(0).all(), "masked positions get a zero gradient"


@pytest.mark.parametrize("agg", AGG_MODES)
def test_all_rows_masked_matches_verl(agg):
    # verl divides 0 by 0 (NaN) in the modes without a given normaliser
    vp, v, r, mask = value_batch(3, 6, seed=6)
    loss, grad, cf = compare(vp, v, r, torch.zeros_like(mask), torch.float32, loss_agg_mode=agg)
    assert math.isnan(loss.item()) != (agg == "token-sum")
    assert grad.eq(0).all() and cf.item() == 0.0


def test_metric_only_and_no_grad_calls():
    vp, v, r, mask = value_batch(4, 9, seed=16)
    with torch.no_grad():
        loss, cf = luspo_rs.value_loss(vp, v, r, mask, CLIPRANGE)
    assert not loss.requires_grad
    x = vp.clone().requires_grad_()
    _, cf = luspo_rs.value_loss(x, v, r, mask, CLIPRANGE)
    assert cf.item() == pytest.approx(verl_value(vp, v, r, mask)[2].item(), abs=1e-6)


def test_backward_keeps_only_the_gradient():
    # nothing B x T is saved for backward beyond the gradient buffer
    vp, v, r, mask = value_batch(4, 9, seed=17)
    x = vp.clone().requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        loss, _ = luspo_rs.value_loss(x, v, r, mask, CLIPRANGE)
    assert len(saved) == 1 and saved[0].shape == vp.shape
    loss.backward()
    assert torch.equal(x.grad, saved[0]), "the saved buffer is the gradient"


def test_double_backward_is_refused():
    vp, v, r, mask = value_batch(3, 5, seed=18)
    x = vp.clone().requires_grad_()
    loss, _ = luspo_rs.value_loss(x, v, r, mask, CLIPRANGE)
    with pytest.raises(RuntimeError, match="create_graph=True"):
        torch.autograd.grad(loss, x, create_graph=True)


def _call(**over):
    vp, v, r, mask = value_batch(3, 5, seed=19)
    args = dict(vpreds=vp, values=v, returns=r, response_mask=mask, cliprange_value=CLIPRANGE)
    args.update(over)
    return luspo_rs.value_loss(**args)


@pytest.mark.parametrize(
    "over, exc, match",
    [
        (dict(values=torch.zeros(3, 4)), ValueError, "values"),
        (dict(returns=torch.zeros(3)), ValueError, "returns"),
        (dict(response_mask=torch.ones(2, 5, dtype=torch.bool)), ValueError, "response_mask"),
        (dict(vpreds=torch.zeros(15)), ValueError, "vpreds"),
        (dict(vpreds=torch.zeros(0, 5), values=torch.zeros(0, 5), returns=torch.zeros(0, 5),
              response_mask=torch.ones(0, 5, dtype=torch.bool)), ValueError, "vpreds: empty batch"),
        (dict(vpreds=torch.zeros(3, 0), values=torch.zeros(3, 0), returns=torch.zeros(3, 0),
              response_mask=torch.ones(3, 0, dtype=torch.bool)), ValueError, "vpreds: empty responses"),
        (dict(vpreds=torch.zeros(3, 5, dtype=torch.int32)), TypeError, "vpreds"),
        (dict(values=torch.zeros(3, 5, dtype=torch.int64)), TypeError, "values"),
        (dict(returns=torch.zeros(3, 5, dtype=torch.complex64)), TypeError, "returns"),
        (dict(vpreds=[[0.0] * 5] * 3), TypeError, "vpreds"),
        (dict(values="x"), TypeError, "values"),
        (dict(cliprange_value=-0.1), ValueError, "cliprange_value"),
        (dict(cliprange_value=float("nan")), ValueError, "cliprange_value"),
        (dict(cliprange_value=float("inf")), ValueError, "cliprange_value"),
        (dict(cliprange_value=None), TypeError, "cliprange_value"),
        (dict(cliprange_value="0.2"), TypeError, "cliprange_value"),
        (dict(loss_agg_mode="mean"), ValueError, "loss_agg_mode"),
        (dict(loss_agg_mode=3), TypeError, "loss_agg_mode"),
        (dict(dp_size=2), ValueError, "batch_num_tokens"),
        (dict(dp_size=2, loss_agg_mode="seq-mean-token-sum"), ValueError, "global_batch_size"),
        (dict(dp_size=0), ValueError, "dp_size"),
        (dict(batch_num_tokens=-3), ValueError, "batch_num_tokens"),
    ],
)  # fmt: skip
def test_bad_input_is_an_exception_naming_the_argument(over, exc, match):
    with pytest.raises(exc, match=match):
        _call(**over)


def test_drop_in_has_verls_signature_and_return_types():
    import inspect

    from conftest import verl_core_algos

    want = inspect.signature(verl_core_algos.compute_value_loss)
    got = inspect.signature(core_algos.compute_value_loss)
    assert list(got.parameters) == list(want.parameters)
    assert [p.default for p in got.parameters.values()] == [p.default for p in want.parameters.values()]
    vp, v, r, mask = value_batch(5, 12, seed=20, empty_rows=(3,))
    for m in (mask, mask.double()):
        for agg in AGG_MODES:
            x = vp.clone().requires_grad_()
            # verl's positional order: vpreds, returns, values
            loss, cf = core_algos.compute_value_loss(x, r, v, m, CLIPRANGE, agg, 1, None, None, None)
            loss.backward()
            ref_loss, ref_grad, ref_cf = verl_value(vp, v, r, m, loss_agg_mode=agg)
            assert isinstance(cf, torch.Tensor) and cf.dtype == ref_cf.dtype and cf.dim() == 0
            assert loss.dtype == ref_loss.dtype
            assert_close(loss, ref_loss, dtype=torch.float32, what="loss")
            assert_close(x.grad, ref_grad, dtype=torch.float32, what="grad")
            assert cf.item() == pytest.approx(ref_cf.item(), abs=1e-6)


def test_public_function():
    assert "value_loss" in luspo_rs.__all__ and luspo_rs.value_loss.__module__ == "luspo_rs.value_loss"
    assert "compute_value_loss" in core_algos.__all__
