"""The ops registered with ``torch.library`` (issue 18): ``opcheck``, and
``torch.compile(fullgraph=True)`` over a step that calls them gives the eager
values and gradients without a graph break. So far: ``luspo_rs::kl_penalty``
(the other ops are ``autograd.Function``s that Dynamo graph-breaks on)."""

from __future__ import annotations

import pytest
import torch
from torch.library import opcheck

import luspo_rs
from luspo_rs.kl_penalty import _kl_penalty_op

DTYPES = [torch.float32, torch.float64, torch.bfloat16]


@pytest.mark.parametrize("with_grad", [True, False])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", ["k3", "abs+"])
def test_kl_penalty_op_passes_opcheck(mode, dtype, with_grad):
    g = torch.Generator().manual_seed(0)
    lp = torch.randn(5, 7, generator=g).to(dtype).requires_grad_(with_grad)
    ref = torch.randn(5, 7, generator=g).to(dtype)
    result = opcheck(_kl_penalty_op, (lp, ref, mode, False, with_grad))
    assert set(result.values()) == {"SUCCESS"}, result


@pytest.mark.parametrize("shape", [(4, 33), (65,), (2, 3, 17)], ids=str)
def test_kl_penalty_compiles_fullgraph_to_the_eager_values_and_gradients(shape):
    g = torch.Generator().manual_seed(1)
    lp = torch.randn(shape, generator=g, dtype=torch.float64)
    ref = torch.randn(shape, generator=g, dtype=torch.float64)
    w = torch.randn(shape, generator=g, dtype=torch.float64)

    def step(a, b):
        return luspo_rs.kl_penalty(a, b, "low_var_kl") * w

    def run(fn):
        a, b = lp.clone().requires_grad_(), ref.clone().requires_grad_()
        out = fn(a, b)
        out.sum().backward()
        return out.detach(), a.grad, b.grad

    torch._dynamo.reset()
    want = run(step)
    got = run(torch.compile(step, fullgraph=True))
    for x, y in zip(got, want):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    explained = torch._dynamo.explain(step)(lp, ref)
    assert explained.graph_break_count == 0 and explained.graph_count == 1


def test_kl_penalty_eager_calls_keep_the_autograd_function():
    # the dispatcher's host time is not paid eagerly: the op is for compiled graphs
    lp = torch.randn(3, 4, requires_grad=True)
    out = luspo_rs.kl_penalty(lp, torch.randn(3, 4), "k1")
    assert type(out.grad_fn).__name__ == "KlPenaltyFunctionBackward"


# --------------------------------------------------------------------------- policy_loss

from conftest import make_batch  # noqa: E402
from luspo_rs.policy_loss import _policy_loss_op  # noqa: E402

#: Every mode but Clip-Cov and KL-Cov, whose choice of tokens (as verl's)
#: reads the data on the host (`nonzero`, the candidate count): a graph break.
COMPILED_MODES = ["vanilla", "gspo", "luspo", "cispo", "sapo", "geo_mean", "gpg", "dppo_tv", "dppo_kl", "dro", "reinforce"]


def _op_args(mode, dtype, with_weights):
    old, lp, adv, mask = make_batch(5, 37, dtype=dtype, seed=3, spread=0.8)
    w = torch.rand(5, 37, generator=torch.Generator().manual_seed(4)).to(dtype) + 0.5 if with_weights else None
    return (
        old, lp.requires_grad_(), adv, mask, w, None, None, mode, "token-mean", 0.2, None, 0.28, 3.0, False, True,
        1.0, 1.05, 0.2, 0.1, 1.0, None, None, None, torch.float64 if dtype == torch.float64 else torch.float32,
    )  # fmt: skip


@pytest.mark.parametrize("with_weights", [False, True], ids=["no_is", "is"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("mode", ["vanilla", "luspo", "geo_mean", "dppo_kl"])
def test_policy_loss_op_passes_opcheck(mode, dtype, with_weights):
    result = opcheck(_policy_loss_op, _op_args(mode, dtype, with_weights))
    assert set(result.values()) == {"SUCCESS"}, result


@pytest.mark.parametrize("mode", COMPILED_MODES)
def test_policy_loss_compiles_fullgraph_to_the_eager_loss_and_gradient(mode):
    old, lp, adv, mask = make_batch(6, 40, seed=2, spread=0.8)

    def step(x):
        return luspo_rs.policy_loss(
            old, x, adv, mask, mode=mode, loss_agg_mode="seq-mean-token-mean", clip_ratio=0.2, clip_ratio_high=0.28,
            dro_beta=0.2, diagnostics=True,
        )  # fmt: skip

    def run(fn):
        x = lp.clone().requires_grad_()
        loss, metrics = fn(x)
        (3.0 * loss).backward()  # a seed other than 1: the op's backward scales
        return loss.detach(), x.grad, {k: v.item() for k, v in metrics.items()}

    torch._dynamo.reset()
    want = run(step)
    got = run(torch.compile(step, fullgraph=True))
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), "the same kernels: the same bits"
    assert got[2].keys() == want[2].keys()
    for k, v in want[2].items():
        # len_net_push is a torch reduction of the gradient: compiled, its sum order may differ
        assert got[2][k] == pytest.approx(v, rel=1e-12, abs=1e-15, nan_ok=True), k
    explained = torch._dynamo.explain(step)(lp.clone().requires_grad_())
    assert explained.graph_break_count == 0, explained.break_reasons


def test_policy_loss_eager_calls_keep_the_autograd_function():
    old, lp, adv, mask = make_batch(3, 8, seed=1)
    loss, _ = luspo_rs.policy_loss(old, lp.requires_grad_(), adv, mask, mode="luspo")
    assert type(loss.grad_fn).__name__ == "PolicyLossFunctionBackward"


# --------------------------------------------------------------------------- value_loss

from luspo_rs.value_loss import _value_loss_op  # noqa: E402


def _value_inputs(dtype=torch.float32):
    g = torch.Generator().manual_seed(5)
    vp, v, r = (torch.randn(5, 23, generator=g).to(dtype) for _ in range(3))
    mask = torch.rand(5, 23, generator=g) > 0.3
    return vp, v, r, mask


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_value_loss_op_passes_opcheck(agg, dtype):
    vp, v, r, mask = _value_inputs(dtype)
    args = (vp.requires_grad_(), v, r, mask, None, 0.3, agg, 1.0, None, None, None, dtype)
    result = opcheck(_value_loss_op, args)
    assert set(result.values()) == {"SUCCESS"}, result


def test_value_loss_compiles_fullgraph_to_the_eager_loss_and_gradient():
    vp, v, r, mask = _value_inputs()

    def step(x):
        return luspo_rs.value_loss(x, v, r, mask, 0.3, "seq-mean-token-sum")

    def run(fn):
        x = vp.clone().requires_grad_()
        loss, clipfrac = fn(x)
        (2.0 * loss).backward()
        return loss.detach(), clipfrac, x.grad

    torch._dynamo.reset()
    want = run(step)
    got = run(torch.compile(step, fullgraph=True))
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    assert torch._dynamo.explain(step)(vp.clone().requires_grad_()).graph_break_count == 0


# --------------------------------------------------------------------------- agg_loss

from luspo_rs.agg_loss import _agg_loss_op  # noqa: E402


@pytest.mark.parametrize("agg", ["token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_agg_loss_op_passes_opcheck_and_compiles_fullgraph(agg):
    g = torch.Generator().manual_seed(6)
    lm = torch.randn(6, 29, generator=g)
    mask = torch.rand(6, 29, generator=g) > 0.4
    result = opcheck(_agg_loss_op, (lm.clone().requires_grad_(), mask, None, agg, 1.0, None, None, None, torch.float32))
    assert set(result.values()) == {"SUCCESS"}, result

    def step(x):
        return luspo_rs.agg_loss(x * x, mask, agg)  # a loss matrix computed in the graph

    def run(fn):
        x = lm.clone().requires_grad_()
        loss = fn(x)
        loss.backward()
        return loss.detach(), x.grad

    torch._dynamo.reset()
    want, got = run(step), run(torch.compile(step, fullgraph=True))
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)  # (x * x's gradient 2x is Inductor's)
    assert torch._dynamo.explain(step)(lm.clone().requires_grad_()).graph_break_count == 0


# --------------------------------------------------------------------------- the ops' backward

from luspo_rs._args import _grad_times_op  # noqa: E402


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [(3, 5), (300, 257)], ids=["inline", "pool"])  # under / over the inline size
@pytest.mark.parametrize("seed", [1.0, 3.0, 0.1234567, -2.5e-3])
def test_grad_times_rounds_as_torch_and_leaves_the_saved_gradient(dtype, shape, seed):
    # the losses' ops' backward: the native out-of-place scale, bit for bit torch's `grad * grad_output`
    g = torch.randn(shape, generator=torch.Generator().manual_seed(5)).to(dtype)
    kept = g.clone()
    for go in (torch.tensor(seed), torch.tensor(seed, dtype=torch.float64)):
        got = _grad_times_op(g, go)
        assert got.dtype == dtype and got.data_ptr() != g.data_ptr()
        assert torch.equal(got, (g * go).to(dtype))
    assert torch.equal(g, kept)


def test_grad_times_op_passes_opcheck():
    g = torch.randn(6, 9, dtype=torch.float64)
    result = opcheck(_grad_times_op, (g, torch.tensor(0.75, dtype=torch.float64)))
    assert set(result.values()) == {"SUCCESS"}, result
