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
