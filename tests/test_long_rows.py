"""Very long rows: the CPU kernels hold at most a bounded piece of a row
(65536 tokens per input, per thread) and work through longer rows in pieces,
so memory does not grow with the row length; a working buffer that cannot be
allocated raises ``MemoryError`` instead of aborting the process.

* parity with verl on rows several pieces long, for every op;
* the abort reported in issue 8 (one row of 2**28 tokens, stride-0 inputs,
  under a 6 GiB address-space limit), now a normal result;
* an allocation that fails under an address-space limit is a ``MemoryError``
  naming the argument.

The memory-limited cases run in a subprocess (``RLIMIT_AS`` is per process).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from conftest import AGG_MODES, MODES, assert_close, make_batch, verl_core_algos, verl_reference

import luspo_rs
from luspo_rs import core_algos as ours

# The kernels' piece is 65536 tokens (src/tensor.rs, PIECE); these rows span
# three pieces, the last one partial and not a multiple of the 64-token block.
T_LONG = 2 * 65536 + 4099
CLIP = dict(clip_ratio=0.2, clip_ratio_low=0.2, clip_ratio_high=0.28, clip_ratio_c=3.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("mode", MODES)
def test_policy_loss_on_rows_longer_than_a_piece_matches_verl(mode, dtype):
    old, lp, adv, mask = make_batch(3, T_LONG, seed=21, spread=0.3)
    old, lp, adv = old.to(dtype), lp.to(dtype), adv.to(dtype)
    w = (0.5 + torch.rand(3, T_LONG, generator=torch.Generator().manual_seed(3))).to(dtype)
    for agg in ("token-mean", "seq-mean-token-mean"):
        # half inputs: we compute in fp32 and round only the outputs, so the
        # reference is verl on the upcast values (as test_half_precision_inputs)
        up = [t.float() for t in (old, lp, adv, w)]
        ref_loss, ref_grad, ref_metrics = verl_reference(mode, up[0], up[1], up[2], mask, agg, up[3], **CLIP)
        x = lp.clone().requires_grad_(True)
        loss, metrics = luspo_rs.policy_loss(old, x, adv, mask, mode=mode, loss_agg_mode=agg, rollout_is_weights=w, **CLIP)
        loss.backward()
        assert loss.dtype == x.grad.dtype == dtype
        if dtype == torch.float32:
            assert_close(loss.detach(), ref_loss, dtype=dtype, what="loss")
            assert_close(x.grad, ref_grad, dtype=dtype, what="grad")
        else:
            torch.testing.assert_close(loss.float(), ref_loss, rtol=8e-3, atol=1e-5)
            torch.testing.assert_close(x.grad.float(), ref_grad.to(dtype).float(), rtol=8e-3, atol=1e-7)
        for k, v in ref_metrics.items():
            assert metrics[k].item() == pytest.approx(float(v), abs=1e-6), k


def test_agg_loss_on_long_rows_matches_verl():
    g = torch.Generator().manual_seed(5)
    loss_mat = torch.randn(3, T_LONG, generator=g)
    _, _, _, mask = make_batch(3, T_LONG, seed=22)
    mask = mask.to(torch.int64)  # converted piece by piece
    for agg in AGG_MODES:
        x = loss_mat.clone().requires_grad_()
        ref = verl_core_algos.agg_loss(x, mask, agg)
        ref.backward()
        y = loss_mat.clone().requires_grad_()
        got = luspo_rs.agg_loss(y, mask, agg)
        got.backward()
        assert_close(got.detach(), ref.detach(), dtype=torch.float32, what=agg)
        assert_close(y.grad, x.grad, dtype=torch.float32, what=agg)


def test_kl_penalty_on_long_rows_matches_verl():
    g = torch.Generator().manual_seed(6)
    lp = -torch.rand(2, T_LONG, generator=g)
    ref = lp + torch.randn(2, T_LONG, generator=g)
    for mode in ("k1", "abs", "k2", "low_var_kl"):
        # a strided view: no row is borrowed, every piece is converted
        a, b = lp.t().contiguous().t().requires_grad_(), ref.clone().requires_grad_()
        want = verl_core_algos.kl_penalty(a, b, mode)
        want.sum().backward()
        c, d = lp.t().contiguous().t().requires_grad_(), ref.clone().requires_grad_()
        got = ours.kl_penalty(c, d, mode)
        got.sum().backward()
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(c.grad, a.grad, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(d.grad, b.grad, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("fn", ["compute_grpo_outcome_advantage", "compute_reinforce_plus_plus_baseline_outcome_advantage",
                                "compute_opo_outcome_advantage"])
def test_advantages_on_long_rows_match_verl(fn):
    g = torch.Generator().manual_seed(7)
    rewards = torch.randn(4, T_LONG, generator=g, dtype=torch.float64)
    _, _, _, mask = make_batch(4, T_LONG, seed=23)
    index = np.array([0, 1, 0, 1])
    want, _ = getattr(verl_core_algos, fn)(token_level_rewards=rewards.clone(), response_mask=mask, index=index)
    got, _ = getattr(ours, fn)(token_level_rewards=rewards.clone(), response_mask=mask, index=index)
    torch.testing.assert_close(got, want, atol=1e-9, rtol=1e-9)


def run_limited(code: str, limit_gib: int) -> subprocess.CompletedProcess:
    """Runs ``code`` in a fresh interpreter whose address space is capped."""
    prelude = f"import resource\nresource.setrlimit(resource.RLIMIT_AS, ({limit_gib} << 30, {limit_gib} << 30))\n"
    return subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(code)], capture_output=True, text=True, timeout=300
    )


def test_one_row_of_2_28_tokens_under_6_gib_does_not_abort():
    # issue 8: per-thread scratch of whole rows (6 x 1 GiB here) aborted with
    # "memory allocation of 2147483648 bytes failed". The only large buffers
    # now are log_prob and its gradient (1 GiB each).
    r = run_limited(
        """
        import torch, luspo_rs
        T = 1 << 28
        def row(v):
            return torch.full((1, 1), v).expand(1, T)
        lp = row(-1.0).clone().requires_grad_(True)
        mask = torch.ones(1, 1, dtype=torch.bool).expand(1, T)
        loss, m = luspo_rs.policy_loss(row(-1.1), lp, row(1.0), mask, mode="gspo", loss_agg_mode="token-mean")
        loss.backward()
        # every token: ratio exp(0.1) inside [0.8, 1.28], loss -A * ratio
        print(loss.item(), lp.grad[0, 0].item(), lp.grad[0, -1].item(), m["ppo_kl"].item())
        """,
        limit_gib=6,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    loss, g0, g1, kl = map(float, r.stdout.split())
    s = float(torch.tensor(0.1).exp())
    assert loss == pytest.approx(-s, rel=1e-6)
    assert g0 == g1 == pytest.approx(-s / 2**28, rel=1e-6)
    assert kl == pytest.approx(-0.1, rel=1e-6)


def test_allocation_failure_is_a_memory_error_naming_the_argument():
    # 2**27 rows of one token (stride-0 inputs): a few numbers per row for the
    # group statistics do not fit under the cap; the output itself does.
    r = run_limited(
        """
        import torch
        from luspo_rs import _core
        B = 1 << 27
        rewards = torch.ones(1, 1).expand(B, 1)
        mask = torch.ones(1, 1, dtype=torch.bool).expand(B, 1)
        index = torch.zeros(1, dtype=torch.int64).expand(B)
        out = torch.empty(B, 1)
        try:
            _core.advantage(rewards, mask, index, out, estimator="grpo")
        except MemoryError as e:
            print("MemoryError", e)
        """,
        limit_gib=4,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.startswith("MemoryError token_level_rewards:"), r.stdout
