"""The native edge refuses what it cannot handle safely (issue 20, part B):
outputs that overlap themselves or another argument, misaligned pointers,
unsupported dtypes; and takes empty tensors without forming a slice of a null
pointer. Each case runs on the CPU path and on the CUDA simulator, which
share the import (``src/python/args.rs``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import luspo_rs
from luspo_rs import _core

B, T = 4, 8


@pytest.fixture(params=["cpu", "sim"])
def backend(request):
    _core.sim_set_enabled(request.param == "sim")
    yield request.param
    _core.sim_set_enabled(False)


def batch():
    g = torch.Generator().manual_seed(0)
    return torch.zeros(B, T), torch.randn(B, T, generator=g), torch.randn(B, T, generator=g), torch.ones(B, T, dtype=torch.bool)


def native_loss(old, lp, adv, mask, grad, **kw):
    loss = torch.empty(())
    metrics = torch.empty(_core.METRICS_LEN, dtype=torch.float64)
    scratch = torch.empty(_core.loss_scratch_len(B), dtype=torch.float64) if _core.sim_enabled() else None
    _core.policy_loss(old, lp, adv, mask, grad, loss, metrics, mode="gspo", loss_agg_mode="token-mean", clip_ratio=0.2,
                      scratch=scratch, stream=0 if _core.sim_enabled() else None, **kw)  # fmt: skip
    return loss, metrics


def test_a_contiguous_output_is_accepted(backend):
    old, lp, adv, mask = batch()
    grad = torch.empty(B, T)
    loss, _ = native_loss(old, lp, adv, mask, grad)
    want, _ = luspo_rs.policy_loss(old, lp, adv, mask, mode="gspo")
    torch.testing.assert_close(loss, want)


@pytest.mark.parametrize(
    "make_grad, why",
    [
        (lambda lp: torch.empty(B, 1).expand(B, T), "unit stride in its last dimension"),  # the OOB write
        (lambda lp: torch.empty(2 * B, T)[::2].t().contiguous().t(), "unit stride in its last dimension"),
        (lambda lp: torch.empty(B * T).as_strided((B, T), (T // 2, 1)), "no two elements in one place"),
        (lambda lp: lp, "shares memory with the input `log_prob`"),
        (lambda lp: torch.empty(B, T)[:, :], None),
    ],
    ids=["expanded", "transposed", "overlapping_rows", "an_input", "plain_view"],
)
def test_outputs_that_overlap_are_a_value_error_naming_them(backend, make_grad, why):
    old, lp, adv, mask = batch()
    grad = make_grad(lp)
    if why is None:
        native_loss(old, lp, adv, mask, grad)
        return
    before = lp.clone()
    with pytest.raises(ValueError, match=f"grad: .*{why}"):
        native_loss(old, lp, adv, mask, grad)
    assert torch.equal(lp, before), "nothing was written"


def test_two_outputs_in_one_buffer_are_a_value_error(backend):
    old, lp, adv, mask = batch()
    buf = torch.empty(B * T)
    with pytest.raises(ValueError, match="shares memory with the output `grad`"):
        _core.policy_loss(old, lp, adv, mask, buf.view(B, T), buf[3:4].view(()),
                          torch.empty(_core.METRICS_LEN, dtype=torch.float64), mode="gspo", loss_agg_mode="token-mean",
                          clip_ratio=0.2, scratch=torch.empty(_core.loss_scratch_len(B), dtype=torch.float64),
                          stream=0)  # fmt: skip


def test_a_misaligned_pointer_is_a_value_error(backend):
    old, lp, adv, mask = batch()
    raw = np.zeros(B * T * 4 + 1, dtype=np.uint8)
    odd = np.frombuffer(raw.data, dtype=np.float32, offset=1, count=B * T).reshape(B, T)
    assert odd.ctypes.data % 4 != 0
    with pytest.raises(ValueError, match="old_log_prob: the data pointer .* not aligned to its 4-byte float32 elements"):
        native_loss(odd, lp, adv, mask, torch.empty(B, T))


def test_empty_tensors_form_no_slice_of_a_null_pointer(backend):
    assert torch.empty(0).data_ptr() == 0
    assert _core.group_ids([], torch.empty(0, dtype=torch.int64)) == 0
    assert _core.scale_grad(torch.empty(0), torch.tensor(2.0), stream=0) is True


@pytest.mark.parametrize("arg", ["log_prob", "old_log_prob", "advantages", "rollout_is_weights"])
def test_float8_inputs_are_a_type_error_naming_the_argument(arg):
    old, lp, adv, mask = batch()
    args = dict(old_log_prob=old, log_prob=lp, advantages=adv, rollout_is_weights=torch.ones(B, T))
    args[arg] = args[arg].to(torch.float8_e4m3fn)
    with pytest.raises(TypeError, match=f"{arg}: unsupported dtype float8_e4m3fn"):
        luspo_rs.policy_loss(args["old_log_prob"], args["log_prob"], args["advantages"], mask, mode="vanilla",
                             rollout_is_weights=args["rollout_is_weights"])  # fmt: skip
    with pytest.raises(TypeError, match="loss_mat: unsupported dtype float8_e5m2"):
        luspo_rs.agg_loss(lp.to(torch.float8_e5m2), mask)


def native_value_loss(vp, v, r, mask, grad):
    loss = torch.empty(())
    metrics = torch.empty(_core.METRICS_LEN, dtype=torch.float64)
    scratch = torch.empty(_core.loss_scratch_len(B), dtype=torch.float64) if _core.sim_enabled() else None
    _core.value_loss(vp, v, r, mask, grad, loss, metrics, cliprange_value=0.2, loss_agg_mode="token-mean",
                     scratch=scratch, stream=0 if _core.sim_enabled() else None)  # fmt: skip
    return loss, metrics


def test_value_loss_refuses_outputs_that_overlap(backend):
    v, vp, r, mask = batch()
    loss, _ = native_value_loss(vp, v, r, mask, torch.empty(B, T))
    torch.testing.assert_close(loss, luspo_rs.value_loss(vp, v, r, mask, 0.2)[0])
    before = vp.clone()
    with pytest.raises(ValueError, match="grad: .*shares memory with the input `vpreds`"):
        native_value_loss(vp, v, r, mask, vp)
    with pytest.raises(ValueError, match="grad: .*unit stride in its last dimension"):
        native_value_loss(vp, v, r, mask, torch.empty(B, 1).expand(B, T))
    assert torch.equal(vp, before), "nothing was written"


@pytest.mark.parametrize("arg", ["vpreds", "values", "returns"])
def test_value_loss_float8_inputs_are_a_type_error_naming_the_argument(arg):
    v, vp, r, mask = batch()
    args = dict(vpreds=vp, values=v, returns=r)
    args[arg] = args[arg].to(torch.float8_e4m3fn)
    with pytest.raises(TypeError, match=f"{arg}: unsupported dtype float8_e4m3fn"):
        luspo_rs.value_loss(args["vpreds"], args["values"], args["returns"], mask, 0.2)
