"""Second derivatives: the fused kernels return a gradient, not a graph of
it, so double backward through ``policy_loss`` or ``kl_penalty`` is refused
loudly (never a silent 0); ``agg_loss`` is linear in ``loss_mat`` and gives
verl's Hessian-vector products exactly."""

from __future__ import annotations

import pytest
import torch
from conftest import AGG_MODES, MODES, verl_core_algos

import luspo_rs
from luspo_rs import core_algos as ours


@pytest.mark.parametrize("mode", MODES)
def test_policy_loss_refuses_create_graph(mode):
    # issue 8's example: verl's Hessian-vector product of policy_loss + 0.5 |lp|^2
    # has the loss's own curvature; ours used to return the diagonal [1, 1, 1]
    old = torch.zeros(1, 3)
    lp = torch.tensor([[0.05, -0.05, 0.1]], requires_grad=True)
    adv = torch.ones(1, 3)
    mask = torch.ones(1, 3, dtype=torch.bool)
    loss, _ = luspo_rs.policy_loss(old, lp, adv, mask, mode=mode, loss_agg_mode="token-sum")
    total = loss + 0.5 * (lp * lp).sum()
    with pytest.raises(RuntimeError, match="create_graph=True .* not supported"):
        torch.autograd.grad(total, lp, create_graph=True)
    # first order is unaffected
    (g,) = torch.autograd.grad(total, lp)
    assert torch.isfinite(g).all()


@pytest.mark.parametrize("mode", ["k1", "k3", "mse", "k3+"])
def test_kl_penalty_refuses_create_graph(mode):
    lp = torch.tensor([0.05, -0.05, 0.1], requires_grad=True)
    ref = torch.zeros(3)
    with pytest.raises(RuntimeError, match="create_graph=True .* not supported"):
        torch.autograd.grad(ours.kl_penalty(lp, ref, mode).sum(), lp, create_graph=True)


@pytest.mark.parametrize("agg", AGG_MODES)
def test_agg_loss_hessian_vector_product_matches_verl(agg):
    g = torch.Generator().manual_seed(11)
    x0 = torch.randn(4, 7, generator=g, dtype=torch.float64)
    mask = torch.rand(4, 7, generator=g) > 0.3
    v = torch.randn(4, 7, generator=g, dtype=torch.float64)

    def hvp(agg_fn):
        x = x0.clone().requires_grad_(True)
        loss = agg_fn(x.pow(3) + x.sin(), mask)  # a nonlinear loss matrix
        (gx,) = torch.autograd.grad(loss, x, create_graph=True)
        (h,) = torch.autograd.grad((gx * v).sum(), x)
        return gx.detach(), h

    want = hvp(lambda m, k: verl_core_algos.agg_loss(m, k, agg))
    got = hvp(lambda m, k: luspo_rs.agg_loss(m, k, agg))
    for w, o in zip(want, got):
        torch.testing.assert_close(o, w, atol=1e-12, rtol=1e-10)
