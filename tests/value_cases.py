"""Critic batches and verl 0.9.1's own ``compute_value_loss`` as the
reference, shared by the value-loss tests (``test_value_loss.py`` and the
generic ones that enumerate ops)."""

from __future__ import annotations

import torch
from conftest import verl_core_algos

CLIPRANGE = 0.2


def value_batch(B, T, *, dtype=torch.float32, spread=0.3, seed=0, empty_rows=(), full_rows=()):
    """``(vpreds, values, returns, mask)``: right-padded responses of varied
    length; predictions ``spread`` away from the old values (past the clip
    range ``CLIPRANGE`` for many tokens at the default), returns about 1 away."""
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(B, T, generator=g, dtype=torch.float64)
    vpreds = values + spread * torch.randn(B, T, generator=g, dtype=torch.float64)
    returns = values + torch.randn(B, T, generator=g, dtype=torch.float64)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    for i in full_rows:
        lengths[i] = T
    for i in empty_rows:
        lengths[i] = 0
    mask = torch.arange(T)[None, :] < lengths[:, None]
    return vpreds.to(dtype), values.to(dtype), returns.to(dtype), mask


def verl_value(vpreds, values, returns, mask, cliprange=CLIPRANGE, loss_agg_mode="token-mean", **norm):
    """verl's loss, gradient w.r.t. ``vpreds`` and ``vf_clipfrac``."""
    x = vpreds.detach().clone().requires_grad_(True)
    loss, clipfrac = verl_core_algos.compute_value_loss(
        x, returns, values, mask, cliprange, loss_agg_mode=loss_agg_mode, **norm
    )
    loss.backward()
    return loss.detach(), x.grad, clipfrac
