"""luspo_rs.agg_loss against verl's own agg_loss: value and gradient for
every mode, with and without the global-batch normalisers."""

from __future__ import annotations

import pytest
import torch
from conftest import AGG_MODES, assert_close, check_public_op, verl_core_algos

import luspo_rs


def batch(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    loss_mat = torch.randn(7, 19, generator=g, dtype=torch.float64).to(dtype)
    lengths = torch.tensor([0, 1, 19, 5, 11, 19, 2])
    mask = torch.arange(19)[None, :] < lengths[:, None]
    return loss_mat, mask


@pytest.mark.parametrize("norm", [{}, dict(dp_size=2, batch_num_tokens=100, global_batch_size=13, loss_scale_factor=64)],
                         ids=["local", "global"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("agg", AGG_MODES)
def test_agg_loss_matches_verl(agg, dtype, norm):
    loss_mat, mask = batch(dtype)
    x = loss_mat.clone().requires_grad_()
    ref = verl_core_algos.agg_loss(x, mask, agg, **norm)
    ref.backward()
    y = loss_mat.clone().requires_grad_()
    ours = luspo_rs.agg_loss(y, mask, agg, **norm)
    ours.backward()
    assert ours.dtype == dtype
    assert_close(ours.detach(), ref.detach(), dtype=dtype, what="loss")
    assert_close(y.grad, x.grad, dtype=dtype, what="grad")


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.int64, torch.float32, torch.float64])
@pytest.mark.parametrize("agg", AGG_MODES)
def test_agg_loss_dtype_is_verls_promotion(agg, mask_dtype):
    # verl's loss_mat * mask promotes float32 to float64 with a float64 mask
    loss_mat, mask = batch(torch.float32, seed=1)
    mask = mask.to(mask_dtype)
    x = loss_mat.clone().requires_grad_()
    ref = verl_core_algos.agg_loss(x, mask, agg)
    ref.backward()
    y = loss_mat.clone().requires_grad_()
    ours = luspo_rs.agg_loss(y, mask, agg)
    ours.backward()
    assert ours.dtype == ref.dtype and y.grad.dtype == x.grad.dtype == torch.float32
    assert_close(ours.detach(), ref.detach(), dtype=torch.float32, what="loss")
    assert_close(y.grad, x.grad, dtype=torch.float32, what="grad")


def test_agg_loss_bad_input_names_the_argument():
    loss_mat, mask = batch(torch.float32)
    with pytest.raises(ValueError, match="loss_agg_mode"):
        luspo_rs.agg_loss(loss_mat, mask, "bogus")
    with pytest.raises(ValueError, match="loss_mask"):
        luspo_rs.agg_loss(loss_mat, mask[:, :3], "token-mean")
    with pytest.raises(TypeError, match="loss_mat"):
        luspo_rs.agg_loss(loss_mat.long(), mask, "token-mean")
    with pytest.raises(ValueError, match="loss_mat: empty"):
        luspo_rs.agg_loss(torch.zeros(0, 4), torch.zeros(0, 4), "token-mean")


def test_public_function_and_its_modes():
    check_public_op("agg_loss", "AggMode", AGG_MODES)
