"""Parity of ``luspo_rs.kl_penalty`` (also ``luspo_rs.core_algos.kl_penalty``,
the same function) with verl 0.9.1's ``kl_penalty``: values and gradients
(through torch autograd) in both inputs; bad input.

Tolerances: float32 1e-6 abs + 1e-5 rel; float64 1e-12 abs + 1e-12 rel.
"""

from __future__ import annotations

import pytest
import torch
from conftest import check_public_op
from verl.trainer.ppo import core_algos as verl_ca

import luspo_rs
from luspo_rs import core_algos as ours
from luspo_rs.kl_penalty import _kl_penalty_torch

MODES = ["kl", "k1", "abs", "mse", "k2", "low_var_kl", "k3"]
MODES += [m + "+" for m in MODES]
TOL = {torch.float32: dict(atol=1e-6, rtol=1e-5), torch.float64: dict(atol=1e-12, rtol=1e-12)}


def inputs(dtype, shape=(16, 40), seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    lp = -torch.rand(shape, generator=g, dtype=torch.float64) * scale
    ref = lp + torch.randn(shape, generator=g, dtype=torch.float64) * scale
    # exercise the clamps of low_var_kl: |ref - lp| > 20 and exp(k) - k - 1 > 10
    lp.view(-1)[:4] = torch.tensor([0.0, -30.0, -1.0, -4.0], dtype=torch.float64)
    ref.view(-1)[:4] = torch.tensor([-30.0, 0.0, 2.5, -4.0], dtype=torch.float64)
    return lp.to(dtype), ref.to(dtype)


def both(mode, lp, ref, grad_ref=True, ours_fn=ours.kl_penalty):
    out = {}
    w = torch.randn(lp.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64).to(lp.dtype)
    for name, fn in (("verl", verl_ca.kl_penalty), ("ours", ours_fn)):
        a = lp.clone().requires_grad_()
        b = ref.clone().requires_grad_(grad_ref)
        v = fn(a, b, mode)
        (v * w).sum().backward()
        out[name] = (v.detach(), a.grad, b.grad)
    return out["verl"], out["ours"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("mode", MODES)
def test_value_and_gradients_match_verl(mode, dtype):
    lp, ref = inputs(dtype)
    (v_want, dlp_want, dref_want), (v_got, dlp_got, dref_got) = both(mode, lp, ref)
    assert v_got.dtype == v_want.dtype and v_got.shape == v_want.shape
    torch.testing.assert_close(v_got, v_want, **TOL[dtype])
    torch.testing.assert_close(dlp_got, dlp_want, **TOL[dtype])
    torch.testing.assert_close(dref_got, dref_want, **TOL[dtype])


@pytest.mark.parametrize("shape", [(0, 40), (3, 0), (0,), (2, 0, 5)], ids=str)
@pytest.mark.parametrize("mode", MODES)
def test_empty_tensors_give_verls_empty_result(mode, shape):
    lp, ref = (torch.zeros(shape, dtype=torch.float32) for _ in range(2))
    (v_want, dlp_want, dref_want), (v_got, dlp_got, dref_got) = both(mode, lp, ref)
    assert v_got.shape == v_want.shape == shape and v_got.dtype == v_want.dtype
    assert dlp_got.shape == dlp_want.shape and dref_got.shape == dref_want.shape
    with pytest.raises(ValueError, match="kl_penalty"):
        ours.kl_penalty(lp, ref, "k4")


@pytest.mark.parametrize("shape", [(7,), (3, 4, 5), (3 * 16384 + 5,), (2, 16384 + 1)], ids=["1d", "3d", "long-1d", "long-rows"])
def test_any_rank(shape):
    # (a 1-D input is one row, split into column chunks of 16384 across the
    # threads: src/cpu/kl_penalty.rs `tasks`; the long shapes cross chunk borders)
    lp, ref = inputs(torch.float32, shape=shape, scale=1.0)
    (v_want, g_want, _), (v_got, g_got, _) = both("low_var_kl", lp, ref, grad_ref=False)
    assert v_got.shape == shape
    torch.testing.assert_close(v_got, v_want, **TOL[torch.float32])
    torch.testing.assert_close(g_got, g_want, **TOL[torch.float32])


def test_mixed_dtypes_promote_like_verl():
    lp, ref = inputs(torch.float32)
    (v_want, g_want, r_want), (v_got, g_got, r_got) = both("k3", lp, ref.double())
    assert v_got.dtype == v_want.dtype == torch.float64
    assert g_got.dtype == torch.float32 and r_got.dtype == torch.float64
    torch.testing.assert_close(v_got, v_want, **TOL[torch.float32])
    torch.testing.assert_close(g_got, g_want, **TOL[torch.float32])


def test_bfloat16_inputs():
    lp, ref = inputs(torch.bfloat16, scale=1.0)
    want = verl_ca.kl_penalty(lp, ref, "k3")
    got = ours.kl_penalty(lp, ref, "k3")
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=2e-2)


def test_no_gradient_buffer_without_grad():
    lp, ref = inputs(torch.float32)
    out = ours.kl_penalty(lp, ref, "k3")
    assert out.grad_fn is None


def test_bad_input_names_the_argument():
    lp, ref = inputs(torch.float32)
    with pytest.raises(ValueError, match="kl_penalty"):
        ours.kl_penalty(lp, ref, "full")
    with pytest.raises(ValueError, match="kl_penalty"):
        ours.kl_penalty(lp, ref, "k4")
    with pytest.raises(ValueError, match="ref_logprob"):
        ours.kl_penalty(lp, ref[:, :3], "k1")
    with pytest.raises(TypeError, match="logprob"):
        ours.kl_penalty(lp.to(torch.int64), ref, "k1")
    with pytest.raises(TypeError, match="ref_logprob"):
        ours.kl_penalty(lp, ref.numpy(), "k1")
    with pytest.raises(TypeError, match="logprob"):  # empty, but still not a float tensor
        ours.kl_penalty(lp[:0].to(torch.int64), ref[:0], "k1")


@pytest.mark.parametrize("mode", MODES)
def test_torch_path_for_other_devices_matches_verl(mode):
    """Tensors the native module has no kernel for (neither CPU nor CUDA, e.g.
    MPS) take a plain-torch path; run here on the CPU through the same function."""
    lp, ref = inputs(torch.float64)
    w = torch.randn(lp.shape, dtype=torch.float64)
    a, b = lp.clone().requires_grad_(), lp.clone().requires_grad_()
    want = verl_ca.kl_penalty(a, ref, mode)
    got = _kl_penalty_torch(b, ref, mode)
    (want * w).sum().backward()
    (got * w).sum().backward()
    torch.testing.assert_close(got, want, **TOL[torch.float64])
    torch.testing.assert_close(b.grad, a.grad, **TOL[torch.float64])


@pytest.mark.parametrize("mode", MODES)
def test_public_kl_penalty_matches_verl(mode):
    """``luspo_rs.kl_penalty``, called by keyword, on a 3-d batch with a float64 reference."""
    lp, ref = inputs(torch.float32, shape=(4, 5, 6), seed=3)
    ref = ref.double()

    def public(a, b, m):
        return luspo_rs.kl_penalty(logprob=a, ref_logprob=b, kl_penalty=m)

    (v_want, dlp_want, dref_want), (v_got, dlp_got, dref_got) = both(mode, lp, ref, ours_fn=public)
    assert v_got.dtype == v_want.dtype == torch.float64 and v_got.shape == v_want.shape
    assert dlp_got.dtype == torch.float32 and dref_got.dtype == torch.float64
    torch.testing.assert_close(v_got, v_want, **TOL[torch.float32])
    torch.testing.assert_close(dlp_got, dlp_want, **TOL[torch.float32])
    torch.testing.assert_close(dref_got, dref_want, **TOL[torch.float32])


def test_public_function_and_its_modes():
    check_public_op("kl_penalty", "KlMode", MODES)
    assert ours.kl_penalty is luspo_rs.kl_penalty  # verl's signature is the public one
    with pytest.raises(TypeError, match="^kl_penalty: expected a string"):
        luspo_rs.kl_penalty(torch.zeros(2), torch.zeros(2), None)
