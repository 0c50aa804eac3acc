"""A gradient, once returned, never changes (issue 20, part A): backward
hands forward's gradient buffer over once; every later backward through the
same graph (``retain_graph=True``) returns a new tensor, with any seed, as
plain torch and verl do. On every device the tests run on (the CPU here;
``test_cuda.py`` repeats the issue's case on CUDA and on the simulator)."""

from __future__ import annotations

import pytest
import torch
from conftest import AGG_MODES, MODES, make_batch, verl_core_algos, verl_reference
from value_cases import CLIPRANGE, value_batch, verl_value

import luspo_rs

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def policy(mode, dtype):
    old, lp, adv, mask = make_batch(5, 37, dtype=dtype, spread=0.4, seed=3)
    x = lp.clone().requires_grad_()
    loss, _ = luspo_rs.policy_loss(old, x, adv, mask, mode=mode, loss_agg_mode="token-mean")
    return x, loss, (old, lp, adv, mask)


def aggregate(agg, dtype):
    g = torch.Generator().manual_seed(4)
    lm = torch.randn(5, 37, generator=g, dtype=torch.float64).to(dtype)
    mask = torch.rand(5, 37, generator=g) > 0.3
    x = lm.clone().requires_grad_()
    return x, luspo_rs.agg_loss(x, mask, agg)


def value(agg, dtype):
    vp, v, r, mask = value_batch(5, 37, dtype=dtype, spread=0.4, seed=5)
    x = vp.clone().requires_grad_()
    loss, _ = luspo_rs.value_loss(x, v, r, mask, CLIPRANGE, agg)
    return x, loss


def seeded(dtype, v):
    return torch.tensor(v, dtype=dtype)


def check_retained_backwards(x, loss, seeded_rounding=False):
    """The issue's sequence: seed-1 ``autograd.grad`` twice, then seed 3,
    then ``loss.backward`` with 2 and with 1; every result keeps its value,
    none shares storage with another, each is its seed times the first
    (bitwise, except with ``seeded_rounding``: a float16 policy-loss
    gradient is computed with its seed applied before the one rounding)."""
    dt = loss.dtype

    def times(a, k):
        want = first * seeded(dt, k).to(first.dtype)
        if seeded_rounding:
            torch.testing.assert_close(a, want, rtol=1e-3, atol=1e-7)
        else:
            assert torch.equal(a, want), f"not {k} times the first gradient, as torch rounds it"

    (g1,) = torch.autograd.grad(loss, x, retain_graph=True)
    first = g1.clone()
    (g1b,) = torch.autograd.grad(loss, x, retain_graph=True)
    assert g1b.data_ptr() != g1.data_ptr(), "two seed-1 backwards returned one storage"
    assert torch.equal(g1b, first)
    (g3,) = torch.autograd.grad(loss, x, grad_outputs=seeded(dt, 3.0), retain_graph=True)
    assert torch.equal(g1, first), "a later seed-3 backward changed the gradient returned before"
    times(g3, 3.0)
    loss.backward(seeded(dt, 2.0), retain_graph=True)
    loss.backward(retain_graph=True)
    for g in (g1, g1b):
        assert torch.equal(g, first)
    times(g3, 3.0)
    times(x.grad, 3.0)
    # changing a returned gradient in place changes nothing the graph computes later
    g1.zero_()
    (again,) = torch.autograd.grad(loss, x)
    assert torch.equal(again, first)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", MODES)
def test_policy_loss_gradient_never_changes_after_it_is_returned(mode, dtype):
    check_retained_backwards(*policy(mode, dtype)[:2], seeded_rounding=dtype == torch.float16)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("agg", AGG_MODES)
def test_agg_loss_gradient_never_changes_after_it_is_returned(agg, dtype):
    check_retained_backwards(*aggregate(agg, dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("agg", AGG_MODES)
def test_value_loss_gradient_never_changes_after_it_is_returned(agg, dtype):
    check_retained_backwards(*value(agg, dtype), seeded_rounding=dtype == torch.float16)


def test_value_loss_retained_backwards_with_mixed_seeds_accumulate_like_verl():
    vp, v, r, mask = value_batch(6, 29, spread=0.5, seed=8)
    seeds = (1.0, 0.5, -2.0, 1.0, 3.0)
    x = vp.clone().requires_grad_()
    loss, _ = luspo_rs.value_loss(x, v, r, mask, CLIPRANGE, "seq-mean-token-mean")
    for k, s in enumerate(seeds):
        loss.backward(torch.tensor(s), retain_graph=k < len(seeds) - 1)
    _, want, _ = verl_value(vp, v, r, mask, loss_agg_mode="seq-mean-token-mean")
    torch.testing.assert_close(x.grad, sum(seeds) * want, atol=1e-5, rtol=1e-5)


def test_the_issues_example_matches_verl():
    # the issue's repro, and verl's own loss through the same sequence
    old, lp, adv, mask = make_batch(5, 37, spread=0.4, seed=3)

    def grads(fn):
        x = lp.clone().requires_grad_()
        loss = fn(x)
        (g1,) = torch.autograd.grad(loss, x, retain_graph=True)
        (g3,) = torch.autograd.grad(loss, x, grad_outputs=torch.tensor(3.0))
        return g1, g3

    ours = grads(lambda x: luspo_rs.policy_loss(old, x, adv, mask, mode="vanilla")[0])
    _, verl_grad, _ = verl_reference("vanilla", old, lp, adv, mask, "token-mean")
    assert ours[0].data_ptr() != ours[1].data_ptr()
    torch.testing.assert_close(ours[0], verl_grad, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(ours[1], 3 * verl_grad, atol=3e-6, rtol=1e-5)


@pytest.mark.parametrize("mode", MODES)
def test_many_retained_backwards_with_mixed_seeds_accumulate_like_verl(mode):
    old, lp, adv, mask = make_batch(6, 29, spread=0.5, seed=8)
    seeds = (1.0, 0.5, -2.0, 1.0, 3.0)
    x = lp.clone().requires_grad_()
    loss, _ = luspo_rs.policy_loss(old, x, adv, mask, mode=mode, loss_agg_mode="seq-mean-token-mean")
    for k, s in enumerate(seeds):
        loss.backward(torch.tensor(s), retain_graph=k < len(seeds) - 1)
    _, want, _ = verl_reference(mode, old, lp, adv, mask, "seq-mean-token-mean")
    torch.testing.assert_close(x.grad, sum(seeds) * want, atol=1e-5, rtol=1e-5)


def test_agg_loss_retained_backwards_match_verl():
    g = torch.Generator().manual_seed(2)
    lm = torch.randn(4, 11, generator=g, dtype=torch.float64)
    mask = torch.rand(4, 11, generator=g) > 0.4

    def run(fn):
        x = lm.clone().requires_grad_()
        loss = fn(x, mask)
        loss.backward(torch.tensor(2.0, dtype=torch.float64), retain_graph=True)
        loss.backward(torch.tensor(-1.0, dtype=torch.float64), retain_graph=True)
        (h,) = torch.autograd.grad(loss, x, create_graph=True)  # after the buffer was handed over
        return x.grad, h

    ours = run(lambda m, k: luspo_rs.agg_loss(m, k, "seq-mean-token-mean"))
    want = run(lambda m, k: verl_core_algos.agg_loss(m, k, "seq-mean-token-mean"))
    for o, w in zip(ours, want):
        torch.testing.assert_close(o, w, atol=1e-12, rtol=1e-10)


def test_an_input_changed_in_place_is_refused_by_a_later_backward_only():
    # the first backward needs no input; a later one computes the gradient
    # from them, so it refuses a modified input as autograd refuses a saved one
    old, lp, adv, mask = make_batch(3, 8, seed=1)
    x = lp.clone().requires_grad_()
    loss, _ = luspo_rs.policy_loss(old, x, adv, mask, mode="gspo")
    adv.mul_(2.0)
    (g,) = torch.autograd.grad(loss, x, retain_graph=True)
    assert torch.isfinite(g).all()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        torch.autograd.grad(loss, x)


# the token-rule modes of issue 17 (the same autograd Function; SAPO's fixed
# aggregation, DPPO's dropped tokens and DRO's knob on the second pass)
EXT = ("sapo", "dppo_kl", "dro")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", EXT)
def test_token_rule_gradient_never_changes_after_it_is_returned(mode, dtype):
    from test_policy_modes import CLIP, KNOBS

    old, lp, adv, mask = make_batch(5, 37, dtype=dtype, spread=0.8, seed=3)
    x = lp.clone().requires_grad_()
    loss, _ = luspo_rs.policy_loss(old, x, adv, mask, mode=mode, loss_agg_mode="token-mean", **CLIP, **KNOBS)
    check_retained_backwards(x, loss, seeded_rounding=dtype == torch.float16)


@pytest.mark.parametrize("mode", EXT)
def test_token_rule_retained_backwards_with_mixed_seeds_accumulate_like_verl(mode):
    from test_policy_modes import CLIP, KNOBS, verl_ref

    old, lp, adv, mask = make_batch(6, 29, spread=0.8, seed=8)
    seeds = (1.0, 0.5, -2.0, 1.0, 3.0)
    x = lp.clone().requires_grad_()
    loss, _ = luspo_rs.policy_loss(old, x, adv, mask, mode=mode, loss_agg_mode="seq-mean-token-sum", **CLIP, **KNOBS)
    for k, s in enumerate(seeds):
        loss.backward(torch.tensor(s), retain_graph=k < len(seeds) - 1)
    _, want, _ = verl_ref(mode, old, lp, adv, mask, "seq-mean-token-sum", **CLIP, **KNOBS)
    assert want.abs().max() > 0
    torch.testing.assert_close(x.grad, sum(seeds) * want, atol=1e-5, rtol=1e-5)
