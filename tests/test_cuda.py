"""The CUDA backend: parity with verl running on the same device and with
our CPU path, bitwise determinism, zero-copy, and on a GPU no host sync (CUDA
graph capture and ``torch.cuda.set_sync_debug_mode("error")``), for the
policy losses, the value loss, ``agg_loss``, ``kl_penalty``, the group advantage estimators and the
scan estimators (GAE, REINFORCE++, ReMax).

Where torch sees a GPU, the kernels run there. Everywhere else they run on
the CUDA simulator (``src/cuda/sim.rs``: the same kernels, launchers and
contract, with CPU tensors as the simulated ``cuda:0``): every test runs but
those that need a real GPU's streams, graphs or devices, which skip saying
so. ``make test`` runs every case on the simulator, the few large batches
at a smaller size; ``LUSPO_RS_SIM_FULL=1`` runs those at the GPU's size too.
"""

from __future__ import annotations

import contextlib
import os

import numpy as np
import pytest
import torch
from conftest import AGG_MODES, MODES, make_batch, stable_seed, verl_config, verl_reference
from test_advantage import ESTIMATORS, VERL_KW, WHITENED, group_layout, sizes_for
from test_advantage import make_batch as make_adv_batch
from test_kl_penalty import MODES as KL_MODES
from test_kl_penalty import inputs as kl_inputs
from test_policy_modes import EXT_MODES
from test_policy_modes import KNOBS as EXT_KNOBS
from test_policy_modes import verl_ref as ext_verl
from verl.trainer.ppo import core_algos as verl_ca

import luspo_rs
from luspo_rs.policy_loss import METRICS
from luspo_rs import _core
from luspo_rs import core_algos as ours

GPU = torch.cuda.is_available()
SIM = not GPU  # the kernels run on the simulator
DEV = "cuda" if GPU else "cpu"
BIG = GPU or os.environ.get("LUSPO_RS_SIM_FULL") == "1"  # the large batches at full size
needs_gpu = pytest.mark.skipif(SIM, reason="needs a GPU: the simulator has no streams, CUDA graphs or second device")


@pytest.fixture(autouse=True)
def simulated_device():
    """On the simulator, CPU tensors are the simulated device during each test."""
    if SIM:
        _core.sim_set_enabled(True)
        try:
            yield
        finally:
            _core.sim_set_enabled(False)
    else:
        yield


@contextlib.contextmanager
def host():
    """The CPU path, for references (on the simulator: with it off)."""
    if SIM:
        _core.sim_set_enabled(False)
        try:
            yield
        finally:
            _core.sim_set_enabled(True)
    else:
        yield


def on_device(t) -> bool:
    return t.is_cuda if GPU else t.device.type == "cpu"


def sync():
    if GPU:
        torch.cuda.synchronize()



CLIP = dict(clip_ratio=0.2, clip_ratio_low=0.2, clip_ratio_high=0.28, clip_ratio_c=3.0)
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
# Against our CPU path (same f32 math, same input values): a few ulp, plus
# one extra rounding of the gradient in 16-bit (it is scaled in backward).
TOL_CPU = {
    torch.float32: dict(atol=1e-6, rtol=1e-5),
    torch.float64: dict(atol=1e-12, rtol=1e-10),
    torch.bfloat16: dict(atol=1e-2, rtol=1.6e-2),
    torch.float16: dict(atol=1e-3, rtol=2e-3),
}


def run(mode, old, lp, adv, mask, agg, weights=None, **kw):
    x = lp.detach().clone().requires_grad_(True)
    loss, metrics = luspo_rs.policy_loss(old, x, adv, mask, mode=mode, loss_agg_mode=agg, rollout_is_weights=weights,
                                         diagnostics=True, **{**CLIP, **kw})
    loss.backward()
    # every metric, the length diagnostics included (NaN where undefined, on both devices)
    return loss.detach(), x.grad, torch.stack([metrics[k] for k in METRICS])


def cuda(*ts):
    """``ts`` on the device under test (on the simulator, as they are)."""
    return [None if t is None else t.to(DEV) for t in ts]


def close(a, b, tol, what):
    """``a`` and ``b`` (tensors on any device, or Python numbers as verl's
    metrics are) compared in float64 on the CPU."""
    as64 = lambda x: torch.as_tensor(x).to("cpu", torch.float64)  # noqa: E731
    torch.testing.assert_close(as64(a), as64(b), equal_nan=True, msg=lambda m: f"{what}: {m}", **tol)


@pytest.mark.parametrize("with_weights", [False, True], ids=["no_is", "is_weights"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("agg", AGG_MODES)
@pytest.mark.parametrize("mode", MODES)
def test_matches_cpu_path_and_verl_on_the_gpu(mode, agg, dtype, with_weights):
    old, lp, adv, mask = make_batch(9, 300, dtype=dtype, spread=1.0, empty_rows=(3,), full_rows=(0,))
    w = torch.rand(9, 300, generator=torch.Generator().manual_seed(1)).to(dtype) + 0.5 if with_weights else None
    with host():
        c_loss, c_grad, c_met = run(mode, old, lp, adv, mask, agg, w)
    g_loss, g_grad, g_met = run(mode, *cuda(old, lp, adv, mask), agg, *cuda(w))
    assert on_device(g_loss) and on_device(g_grad) and g_grad.dtype == dtype
    tol = TOL_CPU[dtype]
    close(g_loss, c_loss, tol, "loss vs CPU")
    close(g_grad, c_grad, tol, "grad vs CPU")
    close(g_met, c_met, TOL_CPU[torch.float32], "metrics vs CPU")
    # verl on the same GPU, in f32 for 16-bit inputs (its own 16-bit math is coarser than ours)
    up = torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype
    r_loss, r_grad, r_met = verl_reference(mode, *[t.to(up) for t in cuda(old, lp, adv)], *cuda(mask), agg,
                                           None if w is None else cuda(w)[0].to(up), **CLIP)
    close(g_loss, r_loss, TOL_CPU[dtype], "loss vs verl")
    close(g_grad, r_grad, TOL_CPU[dtype], "grad vs verl")
    # every metric verl reports (Python floats), against ours
    ours_met = dict(zip(METRICS, g_met))
    assert r_met, "verl reported no metrics"
    for k, v in r_met.items():
        close(ours_met[k], v, TOL_CPU[torch.float32], f"{k} vs verl")


@pytest.mark.parametrize("agg", AGG_MODES)
@pytest.mark.parametrize("mode", MODES)
def test_all_rows_masked_matches_verl_on_the_gpu(mode, agg):
    # verl: NaN loss where it divides by a count taken from the mask, and a
    # zero gradient everywhere (not 0 * inf)
    old, lp, adv, mask = cuda(*make_batch(3, 6, seed=6))
    mask = torch.zeros_like(mask)
    ref_loss, ref_grad, _ = verl_reference(mode, old, lp, adv, mask, agg, **CLIP)
    loss, grad, _ = run(mode, old, lp, adv, mask, agg)
    close(loss, ref_loss, TOL_CPU[torch.float32], "loss")
    close(grad, ref_grad, TOL_CPU[torch.float32], "grad")


@pytest.mark.parametrize("what", ["log_prob", "mask"])
@pytest.mark.parametrize("agg", AGG_MODES)
@pytest.mark.parametrize("mode", MODES)
def test_nan_log_prob_and_nan_mask_give_the_cpu_results(mode, agg, what):
    # the NaN rules of docs/exactness.md (test_policy_loss.py checks them against verl):
    # a NaN log_prob's row gets the clamps' zero gradient, a NaN mask entry
    # drops its row in the sequence modes
    old, lp, adv, mask = make_batch(4, 300, seed=8, full_rows=(1,))
    mask = mask.float()
    (lp if what == "log_prob" else mask)[1, 3] = float("nan")
    with host():
        c_loss, c_grad, _ = run(mode, old, lp, adv, mask, agg)
    g_loss, g_grad, _ = run(mode, *cuda(old, lp, adv, mask), agg)
    close(g_loss, c_loss, TOL_CPU[torch.float32], "loss vs CPU")
    close(g_grad, c_grad, TOL_CPU[torch.float32], "grad vs CPU")
    if what == "log_prob" or agg.startswith("seq") or mode == "luspo":  # (token modes: a NaN count, all NaN)
        assert not c_grad[[0, 2, 3]].isnan().any()


@pytest.mark.parametrize("agg", AGG_MODES)
def test_agg_loss_matches_cpu(agg):
    g = torch.Generator().manual_seed(3)
    l = torch.randn(7, 129, generator=g)
    m = torch.rand(7, 129, generator=g) > 0.3
    m[2] = False
    out = []
    for dev, backend in (("cpu", host), (DEV, contextlib.nullcontext)):
        with backend():
            x = l.to(dev, copy=True).requires_grad_(True)  # a fresh leaf on each device
            loss = luspo_rs.agg_loss(x, m.to(dev), agg)
            loss.backward()
        out.append((loss.detach().cpu(), x.grad.cpu()))
    close(out[1][0], out[0][0], TOL_CPU[torch.float32], "loss")
    close(out[1][1], out[0][1], TOL_CPU[torch.float32], "grad")


@pytest.mark.parametrize("mode", MODES)
def test_bitwise_deterministic_over_runs(mode):
    # on the simulator every run also has its blocks and threads in another order
    old, lp, adv, mask = cuda(*(make_batch(64, 5000, spread=0.5) if BIG else make_batch(24, 1500, spread=0.5)))
    first = run(mode, old, lp, adv, mask, "token-mean")
    for k in range(5):
        if SIM:
            _core.sim_set_seed(1000 * k + 7)
        again = run(mode, old, lp, adv, mask, "token-mean")
        for a, b in zip(first, again):
            torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)  # bitwise, NaN == NaN


def test_writes_into_the_torch_buffers_without_copies():
    old, lp, adv, mask = cuda(*make_batch(4, 64))
    grad = torch.full_like(lp, float("nan"))
    loss = torch.full((), float("nan"), device=DEV)
    metrics = torch.full((_core.METRICS_LEN,), float("nan"), dtype=torch.float64, device=DEV)
    scratch = torch.full((_core.loss_scratch_len(4),), float("nan"), dtype=torch.float64, device=DEV)
    ptrs = (grad.data_ptr(), loss.data_ptr(), metrics.data_ptr(), scratch.data_ptr())
    _core.policy_loss(old, lp, adv, mask, grad, loss, metrics, mode="gspo", loss_agg_mode="token-mean", clip_ratio=0.2,
                      diagnostics=True, scratch=scratch, stream=torch.cuda.current_stream().cuda_stream if GPU else 0)
    sync()
    assert (grad.data_ptr(), loss.data_ptr(), metrics.data_ptr(), scratch.data_ptr()) == ptrs
    # every element written (the poison is gone), and equal to what the autograd path returns
    # (a length diagnostic may legitimately be NaN, so only verl's three are checked finite)
    assert torch.isfinite(grad).all() and torch.isfinite(loss) and torch.isfinite(metrics[:3]).all()
    want_loss, want_grad, want_met = run("gspo", old, lp, adv, mask, "token-mean", clip_ratio=0.2, clip_ratio_low=None,
                                         clip_ratio_high=None)
    assert torch.equal(loss, want_loss) and torch.equal(grad, want_grad)
    # (the native call writes all but len_net_push, which policy_loss reads off the gradient)
    torch.testing.assert_close(metrics, want_met[: _core.METRICS_LEN], rtol=0, atol=0, equal_nan=True)


def test_backward_scales_by_grad_output_in_place():
    old, lp, adv, mask = cuda(*make_batch(6, 333, spread=0.5))
    for mode in MODES:
        _, g1, _ = run(mode, old, lp, adv, mask, "token-mean")
        for seed in (0.5, -3.0, float("nan")):
            x = lp.detach().clone().requires_grad_(True)
            loss, _ = luspo_rs.policy_loss(old, x, adv, mask, mode=mode, loss_agg_mode="token-mean", **CLIP)
            (loss * seed).backward()
            close(x.grad, g1 * seed, TOL_CPU[torch.float32], f"{mode}: seed {seed}")
        # a later backward through the graph computes the gradient again and
        # leaves the one returned before as it was (issue 20, part A)
        x = lp.detach().clone().requires_grad_(True)
        loss, _ = luspo_rs.policy_loss(old, x, adv, mask, mode=mode, **CLIP)
        (g1,) = torch.autograd.grad(loss, x, retain_graph=True)
        first = g1.clone()
        (g3,) = torch.autograd.grad(loss, x, grad_outputs=torch.tensor(3.0, device=x.device), retain_graph=True)
        assert g1.data_ptr() != g3.data_ptr() and torch.equal(g1, first), f"{mode}: g1 changed"
        assert torch.equal(g3, first * 3.0), f"{mode}: g3 is not 3 g1"
        loss.backward(retain_graph=True)
        loss.backward()
        assert torch.equal(x.grad, first + first) and torch.equal(g1, first)


def test_strided_inputs_are_read_in_place():
    old, lp, adv, mask = cuda(*make_batch(16, 40, per_seq_adv=True))
    a = run("gspo", old, lp, adv, mask, "seq-mean-token-mean")
    # transposed storage, per-row advantages as (B, 1)
    t = lambda x: x.t().contiguous().t()  # noqa: E731
    b = run("gspo", t(old), t(lp), adv[:, None], t(mask), "seq-mean-token-mean")
    for x, y in zip(a, b):
        close(x, y, TOL_CPU[torch.float32], "strided")


@pytest.mark.parametrize("per_row", [False, True], ids=["full_rows", "per_row_adv_and_weights"])
@pytest.mark.parametrize("shape", [(1, 37), (1, 3), (9, 300)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("mask_dtype", [torch.int64, torch.bool, torch.float32, torch.int8, torch.int32, torch.float64],
                         ids=str)
def test_every_mask_dtype_ragged_row_ends_and_per_row_operands_match_the_cpu(mask_dtype, shape, per_row):
    # The vector kernels read int64 (verl's response_mask), float32 and 1-byte
    # masks in runs, a row's ragged end element by element (one row of 37 or 3
    # tokens: its runs need no row alignment), and per-row advantages and IS
    # weights once per row; int32 and float64 masks take the element-wise kernels.
    B, T = shape
    g = torch.Generator().manual_seed(12)
    old, lp, adv, mask = make_batch(B, T, seed=11, spread=1.0, per_seq_adv=per_row, full_rows=(0,))
    w = torch.rand(B, generator=g) + 0.5 if per_row else torch.rand(B, T, generator=g) + 0.5
    mask = mask.to(mask_dtype)
    for mode in MODES:
        for agg in ("token-mean", "seq-mean-token-mean"):
            with host():
                want = run(mode, old, lp, adv, mask, agg, w)
            got = run(mode, *cuda(old, lp, adv, mask), agg, *cuda(w))
            for x, y, what in zip(got, want, ("loss", "grad", "metrics")):
                close(x, y, TOL_CPU[torch.float32], f"{mode} {agg}: {what} vs CPU")


@needs_gpu
def test_no_host_sync_in_forward_and_backward():
    old, lp, adv, mask = cuda(*make_batch(32, 1000))
    bnt = mask.sum().double()  # a CUDA 0-d normaliser, as verl's actors pass it
    run("luspo", old, lp, adv, mask, "token-mean", batch_num_tokens=bnt)  # compile + load outside the check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for mode in MODES:
            run(mode, old, lp, adv, mask, "token-mean", batch_num_tokens=bnt)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    ref = run("vanilla", old, lp, adv, mask, "token-mean", batch_num_tokens=float(bnt))
    got = run("vanilla", old, lp, adv, mask, "token-mean", batch_num_tokens=bnt)
    for x, y in zip(got, ref):
        close(x, y, TOL_CPU[torch.float32], "device normaliser")


def test_device_normaliser_matches_a_host_one():
    old, lp, adv, mask = cuda(*make_batch(32, 1000))
    bnt = mask.sum().double()  # a device 0-d normaliser, as verl's actors pass it: never read back
    for mode in MODES:
        ref = run(mode, old, lp, adv, mask, "token-mean", batch_num_tokens=float(bnt))
        got = run(mode, old, lp, adv, mask, "token-mean", batch_num_tokens=bnt)
        for x, y in zip(got, ref):
            close(x, y, TOL_CPU[torch.float32], f"{mode}: device normaliser")


@needs_gpu
def test_captured_in_a_cuda_graph():
    old, lp, adv, mask = cuda(*make_batch(32, 512, spread=0.5))
    x = lp.clone().requires_grad_(True)

    def step():
        loss, metrics = luspo_rs.policy_loss(old, x, adv, mask, mode="luspo", **CLIP)
        (g,) = torch.autograd.grad(loss, x)
        return loss, g, metrics["pg_clipfrac"]

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = step()
    eager = step()
    graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(static, eager):
        assert torch.equal(a, b)


@needs_gpu
def test_mixed_devices_are_a_value_error():
    old, lp, adv, mask = make_batch(2, 8)
    with pytest.raises(ValueError, match="old_log_prob|device"):
        luspo_rs.policy_loss(old, lp.cuda(), adv.cuda(), mask.cuda(), mode="gspo")


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs (the simulator has one device)")
def test_tensors_on_two_gpus_are_a_value_error():
    old, lp, adv, mask = make_batch(2, 8)
    with pytest.raises(ValueError, match="device|cuda:1"):
        luspo_rs.policy_loss(old.to("cuda:1"), lp.cuda(), adv.cuda(), mask.cuda(), mode="gspo")


def test_second_gpu_runs_its_own_kernels():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs (the simulator has one device)")
    old, lp, adv, mask = make_batch(3, 50)
    a = run("gspo", *[t.to("cuda:1") for t in (old, lp, adv, mask)], "token-mean")
    b = run("gspo", *cuda(old, lp, adv, mask), "token-mean")
    for x, y in zip(a, b):
        torch.testing.assert_close(x.cpu(), y.cpu(), rtol=0, atol=0, equal_nan=True)


# --------------------------------------------------------------------------- token-rule modes (issue 17)
# CISPO, SAPO, GPG, DRO, DPPO-TV / KL, REINFORCE and Clip-Cov / KL-Cov given
# their picks: loss.cu's `_ext` kernels (ext_token_loss), against our CPU path
# and verl's own functions on the same device.

EXT_ALL = EXT_MODES + ["clip_cov", "kl_cov"]


def ext_run(mode, old, lp, adv, mask, agg="token-mean", weights=None, picks=None, **kw):
    """Loss, gradient and every metric (the mode's, then the length
    diagnostics, by sorted name) of ``luspo_rs.policy_loss``."""
    x = lp.detach().clone().requires_grad_(True)
    loss, metrics = luspo_rs.policy_loss(old, x, adv, mask, mode=mode, loss_agg_mode=agg, rollout_is_weights=weights,
                                         picks=picks, diagnostics=True, **{**CLIP, **EXT_KNOBS, **kw})  # fmt: skip
    loss.backward()
    names = sorted(metrics)
    return loss.detach(), x.grad, torch.stack([metrics[k] for k in names]), names


def ext_picks(B, T, seed=0):
    """Some chosen tokens (Clip-Cov: cut out; KL-Cov: given the KL term)."""
    return torch.rand(B, T, generator=torch.Generator().manual_seed(seed)) < 0.2


def ext_compare(got, want, tol, what):
    assert got[3] == want[3], f"{what}: metric names {got[3]} vs {want[3]}"
    close(got[0], want[0], tol, f"{what}: loss")
    close(got[1], want[1], tol, f"{what}: grad")
    close(got[2], want[2], TOL_CPU[torch.float32], f"{what}: metrics")


@pytest.mark.parametrize("with_weights", [False, True], ids=["no_is", "is_weights"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", EXT_ALL)
def test_ext_modes_match_cpu_path_and_verl_on_the_gpu(mode, dtype, with_weights):
    B, T = 9, 300
    old, lp, adv, mask = make_batch(B, T, dtype=dtype, spread=1.0, empty_rows=(3,), full_rows=(0,))
    w = torch.rand(B, T, generator=torch.Generator().manual_seed(1)).to(dtype) + 0.5 if with_weights else None
    picks = ext_picks(B, T) if mode in ("clip_cov", "kl_cov") else None
    up = torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype
    for agg in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"):
        with host():
            want = ext_run(mode, old, lp, adv, mask, agg, w, picks, clip_ratio_c=2.0)
        got = ext_run(mode, *cuda(old, lp, adv, mask), agg, *cuda(w, picks), clip_ratio_c=2.0)
        assert on_device(got[0]) and on_device(got[1]) and got[1].dtype == dtype and got[0].dtype == want[0].dtype
        ext_compare(got, want, TOL_CPU[dtype], f"{mode} {agg} vs CPU")
        if picks is not None:
            continue  # verl chooses Clip-Cov's / KL-Cov's tokens at random: the CPU path is the reference
        # verl on the same device, in f32 for 16-bit inputs (as the policy section above)
        ref = [t.to(up) for t in cuda(old, lp, adv)]
        r_loss, r_grad, r_met = ext_verl(mode, *ref, *cuda(mask), agg, None if w is None else cuda(w)[0].to(up),
                                         **{**CLIP, **EXT_KNOBS, "clip_ratio_c": 2.0})  # fmt: skip
        close(got[0], r_loss, TOL_CPU[dtype], f"{mode} {agg}: loss vs verl")
        close(got[1], r_grad, TOL_CPU[dtype], f"{mode} {agg}: grad vs verl")
        ours_met = dict(zip(got[3], got[2]))
        assert set(r_met) <= set(ours_met) and set(ours_met) - set(r_met) == set(METRICS[3:]), (sorted(r_met), got[3])
        for k, v in r_met.items():
            close(ours_met[k], v, TOL_CPU[torch.float32], f"{mode} {agg}: {k} vs verl")


@pytest.mark.parametrize("T", [1, 7, 2053])
@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.uint8, torch.int64, torch.float32, torch.float64], ids=str)
def test_ext_mask_kinds_and_lengths_match_cpu(mask_dtype, T):
    # 1-byte masks take the vector mask loads, the others element-wise loads;
    # T from one token to a team of 128+ threads with a ragged tail; a
    # multi-turn (non-prefix) mask in half the rows
    old, lp, adv, mask = make_batch(5, T, seed=23, spread=1.0, empty_rows=(1,))
    g = torch.Generator().manual_seed(24)
    mask[3:] = torch.rand(2, T, generator=g) < 0.6
    mask = mask.to(mask_dtype)
    picks = ext_picks(5, T, seed=25)
    for mode in EXT_ALL:
        pk = picks if mode in ("clip_cov", "kl_cov") else None
        for agg in ("token-mean", "seq-mean-token-sum"):
            with host():
                want = ext_run(mode, old, lp, adv, mask, agg, picks=pk)
            got = ext_run(mode, *cuda(old, lp, adv, mask), agg, picks=cuda(pk)[0])
            ext_compare(got, want, TOL_CPU[torch.float32], f"{mode} {agg}")


@pytest.mark.parametrize("mode", EXT_ALL)
def test_ext_per_row_advantages_weights_and_mixed_dtypes_match_cpu(mode):
    # (B,) and (B, 1) advantages and IS weights; mixed float dtypes take the
    # element-wise kernels (f32 and f64 math)
    old, lp, adv, mask = make_batch(8, 257, seed=26, spread=1.0, per_seq_adv=True, empty_rows=(2,))
    w = torch.linspace(0.5, 1.5, 8)
    picks = ext_picks(8, 257, seed=27) if mode in ("clip_cov", "kl_cov") else None
    cases = {
        "rows": (old, lp, adv, w),
        "rows1": (old, lp, adv[:, None], w[:, None]),
        "f64_adv": (old, lp, adv.double(), w),
        "f64_old": (old.double(), lp, adv, w),  # f64 math; GPG's and REINFORCE's loss stays f32
        "f64_old_bf16_lp": (old.double(), lp.bfloat16(), adv, w.double()),
    }
    for name, (o, l, a, ww) in cases.items():
        for agg in ("token-mean", "seq-mean-token-mean"):
            with host():
                want = ext_run(mode, o, l, a, mask, agg, ww, picks)
            got = ext_run(mode, *cuda(o, l, a, mask), agg, *cuda(ww, picks))
            tol = TOL_CPU[torch.bfloat16] if l.dtype == torch.bfloat16 else TOL_CPU[torch.float32]
            ext_compare(got, want, tol, f"{name} {agg}")
    # the rows' advantages reach verl as (B, T)
    if picks is None:
        B, T = lp.shape
        r = ext_verl(mode, *cuda(old, lp, adv[:, None].expand(B, T)), *cuda(mask), "token-mean",
                     cuda(w[:, None].expand(B, T))[0], **{**CLIP, **EXT_KNOBS})  # fmt: skip
        got = ext_run(mode, *cuda(old, lp, adv, mask), "token-mean", *cuda(w))
        close(got[0], r[0], TOL_CPU[torch.float32], "loss vs verl")
        close(got[1], r[1], TOL_CPU[torch.float32], "grad vs verl")


@pytest.mark.parametrize("mode", EXT_ALL)
def test_ext_strided_inputs_and_picks_are_read_in_place(mode):
    old, lp, adv, mask = make_batch(16, 40, seed=28, spread=1.0)
    picks = ext_picks(16, 40, seed=29).to(torch.uint8) if mode in ("clip_cov", "kl_cov") else None
    w = torch.rand(16, 40, generator=torch.Generator().manual_seed(30)) + 0.5
    a = ext_run(mode, *cuda(old, lp, adv, mask), "seq-mean-token-mean", *cuda(w, picks))
    t = lambda x: None if x is None else x.t().contiguous().t()  # noqa: E731
    s = lambda x: None if x is None else torch.zeros(16, 80, dtype=x.dtype)[:, ::2].copy_(x)  # noqa: E731
    b = ext_run(mode, *cuda(t(old), t(lp), s(adv), t(mask)), "seq-mean-token-mean", *cuda(s(w), t(picks)))
    ext_compare(b, a, TOL_CPU[torch.float32], "strided")


@pytest.mark.parametrize("mode", EXT_ALL)
def test_ext_all_masked_nan_far_ratios_and_picks_edges_match_cpu(mode):
    # all rows masked (verl's 0/0); NaN log_prob at a valid and at a masked
    # token; every token picked; log-ratios past the +-20 clamp (CISPO, SAPO,
    # DPPO stop the gradient there; in float64 too, where SAPO's gradient
    # beyond -20, of the order of exp(-20), is above the tolerance)
    old, lp, adv, mask = make_batch(4, 70, seed=31, spread=1.0, full_rows=(1,))
    lp_nan = lp.clone()
    lp_nan[1, 3] = float("nan")
    mask_nan = mask.clone()
    mask_nan[0, 0] = False
    lp_nan[0, 0] = float("nan")
    far = lp.clone()
    far[:, ::5] += 25.0
    far[:, 1::5] -= 25.0
    takes = mode in ("clip_cov", "kl_cov")
    pk = ext_picks(4, 70) if takes else None
    cases = [
        (old, lp, adv, torch.zeros_like(mask), pk),
        (old, lp_nan, adv, mask_nan, pk),
        (old, far, adv, mask, pk),
        (old.double(), far.double(), adv.double(), mask, pk),
    ]
    if takes:
        cases.append((old, lp, adv, mask, torch.ones_like(mask)))
    for o, l, a, m, p in cases:
        for agg in AGG_MODES:
            with host():
                want = ext_run(mode, o, l, a, m, agg, picks=p)
            got = ext_run(mode, *cuda(o, l, a, m), agg, picks=cuda(p)[0])
            ext_compare(got, want, TOL_CPU[l.dtype], f"{agg} {l.dtype}")


@pytest.mark.parametrize("mode", EXT_ALL)
def test_ext_bitwise_deterministic_over_runs(mode):
    # on the simulator every run also has its blocks and threads in another order
    B, T = (64, 5000) if BIG else (24, 1500)
    old, lp, adv, mask = cuda(*make_batch(B, T, spread=0.5))
    picks = cuda(ext_picks(B, T))[0] if mode in ("clip_cov", "kl_cov") else None
    first = ext_run(mode, old, lp, adv, mask, "token-mean", picks=picks)
    for k in range(3):
        if SIM:
            _core.sim_set_seed(1000 * k + 11)
        again = ext_run(mode, old, lp, adv, mask, "token-mean", picks=picks)
        for a, b in zip(first[:3], again[:3]):
            torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)  # bitwise, NaN == NaN


def test_ext_backward_scales_and_retained_backwards_on_the_gpu():
    old, lp, adv, mask = cuda(*make_batch(6, 333, spread=0.5))
    for mode in ("sapo", "dppo_kl"):
        _, g1, _, _ = ext_run(mode, old, lp, adv, mask)
        x = lp.detach().clone().requires_grad_(True)
        loss, _ = luspo_rs.policy_loss(old, x, adv, mask, mode=mode, **CLIP, **EXT_KNOBS)
        (loss * -3.0).backward(retain_graph=True)
        close(x.grad, g1 * -3.0, TOL_CPU[torch.float32], f"{mode}: seed -3")
        (g2,) = torch.autograd.grad(loss, x, grad_outputs=torch.tensor(2.0, device=x.device))
        assert g2.data_ptr() != x.grad.data_ptr()
        close(g2, g1 * 2.0, TOL_CPU[torch.float32], f"{mode}: retained seed 2")


# --------------------------------------------------------------------------- value loss


def vrun(vp, v, r, mask, agg="token-mean", c=0.2, **norm):
    x = vp.detach().clone().requires_grad_(True)
    loss, clipfrac = luspo_rs.value_loss(x, v, r, mask, c, agg, **norm)
    loss.backward()
    return loss.detach(), x.grad, clipfrac


def value_data(B, T, dtype=torch.float32, seed=0, **kw):
    from value_cases import value_batch

    return value_batch(B, T, dtype=dtype, seed=seed, spread=0.5, **kw)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("agg", AGG_MODES)
def test_value_loss_matches_cpu_path_and_verl_on_the_gpu(agg, dtype):
    from value_cases import verl_value

    vp, v, r, mask = value_data(9, 300, dtype, seed=21, empty_rows=(3,), full_rows=(0,))
    with host():
        c_loss, c_grad, c_cf = vrun(vp, v, r, mask, agg)
    g_loss, g_grad, g_cf = vrun(*cuda(vp, v, r, mask), agg)
    assert on_device(g_loss) and on_device(g_grad) and on_device(g_cf) and g_grad.dtype == dtype
    assert g_loss.dtype == c_loss.dtype
    tol = TOL_CPU[dtype]
    close(g_loss, c_loss, tol, "loss vs CPU")
    close(g_grad, c_grad, tol, "grad vs CPU")
    close(g_cf, c_cf, TOL_CPU[torch.float32], "vf_clipfrac vs CPU")
    assert g_cf.item() > 0.05, "the batch must clip"
    up = torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype
    r_loss, r_grad, r_cf = verl_value(*[t.to(up) for t in cuda(vp, v, r)], *cuda(mask), loss_agg_mode=agg)
    close(g_loss, r_loss, tol, "loss vs verl")
    close(g_grad, r_grad, tol, "grad vs verl")
    close(g_cf, r_cf, TOL_CPU[torch.float32], "vf_clipfrac vs verl")


@pytest.mark.parametrize("T", [1, 7, 2053])
@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.uint8, torch.int64, torch.float32, torch.float64], ids=str)
def test_value_loss_mask_kinds_and_lengths_match_cpu(mask_dtype, T):
    # 1-byte masks take the vector mask loads, the others element-wise loads;
    # T from one token to a team of 128+ threads with a ragged tail
    vp, v, r, mask = value_data(5, T, seed=22, empty_rows=(1,))
    mask = mask.to(mask_dtype)
    for agg in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"):
        with host():
            want = vrun(vp, v, r, mask, agg)
        got = vrun(*cuda(vp, v, r, mask), agg)
        for a, b, what in zip(got, want, ("loss", "grad", "vf_clipfrac")):
            close(a, b, TOL_CPU[torch.float32], f"{agg} {what}")


def test_value_loss_strided_inputs_are_read_in_place():
    vp, v, r, mask = cuda(*value_data(16, 40, seed=23))
    a = vrun(vp, v, r, mask, "seq-mean-token-sum")
    t = lambda x: x.t().contiguous().t()  # noqa: E731
    b = vrun(t(vp), t(v), t(r), t(mask), "seq-mean-token-sum")
    for x, y in zip(a, b):
        close(x, y, TOL_CPU[torch.float32], "strided")


@pytest.mark.parametrize("agg", AGG_MODES)
def test_value_loss_ties_nan_and_masked_rows_match_verl_on_the_gpu(agg):
    from value_cases import verl_value

    # predictions exactly on the bounds values -+ c (torch.min / torch.max
    # ties: half the gradient), on l1 == l2, and c = 0 (both ties at once)
    values = torch.tensor([[1.0, 1.0, 1.0, -2.0, 0.0, 3.0]] * 2, dtype=torch.float64)
    vpreds = torch.tensor([[1.5, 0.5, 1.25, -2.5, 0.0, 3.5]] * 2, dtype=torch.float64)
    returns = torch.tensor([[0.0, 2.0, 1.0, 1.0, -1.0, 0.25]] * 2, dtype=torch.float64)
    mask = torch.ones(2, 6, dtype=torch.bool)
    for vp, c in ((vpreds, 0.5), (values, 0.0)):
        want = verl_value(*cuda(vp, values, returns, mask), c, agg)
        got = vrun(*cuda(vp, values, returns, mask), agg, c)
        for a, b, what in zip(got, want, ("loss", "grad", "vf_clipfrac")):
            close(a, b, TOL_CPU[torch.float64], f"c={c} {what}")
    # NaN in a valid token (the loss and that gradient NaN, as verl's), a
    # fully masked row, and a whole batch masked
    vp, v, r, mask = value_data(4, 10, seed=24, empty_rows=(3,), full_rows=(1,))
    r[1, 2] = float("nan")  # (masked positions get a zero gradient, verl's a NaN one there: docs/exactness.md)
    want = verl_value(*cuda(vp, v, r, mask), loss_agg_mode=agg)
    got = vrun(*cuda(vp, v, r, mask), agg)
    for a, b, what in zip(got, want, ("loss", "grad", "vf_clipfrac")):
        close(a, b, TOL_CPU[torch.float32], f"NaN {what}")
    r[1, 2] = 0.5
    none = torch.zeros_like(mask)
    want = verl_value(*cuda(vp, v, r, none), loss_agg_mode=agg)
    got = vrun(*cuda(vp, v, r, none), agg)
    for a, b, what in zip(got, want, ("loss", "grad", "vf_clipfrac")):
        close(a, b, TOL_CPU[torch.float32], f"all masked {what}")


def test_value_loss_bitwise_deterministic_and_backward_scales():
    vp, v, r, mask = cuda(*(value_data(64, 5000, seed=25) if BIG else value_data(24, 1500, seed=25)))
    first = vrun(vp, v, r, mask, "seq-mean-token-mean")
    for k in range(3):
        if SIM:
            _core.sim_set_seed(1000 * k + 11)
        again = vrun(vp, v, r, mask, "seq-mean-token-mean")
        for a, b in zip(first, again):
            torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
    # seeds, and a later backward through a retained graph leaves the first gradient alone
    x = vp.detach().clone().requires_grad_(True)
    loss, _ = luspo_rs.value_loss(x, v, r, mask, 0.2, "seq-mean-token-mean")
    (g1,) = torch.autograd.grad(loss, x, retain_graph=True)
    g0 = g1.clone()
    (g3,) = torch.autograd.grad(loss, x, grad_outputs=torch.tensor(-3.0, device=x.device), retain_graph=True)
    assert g1.data_ptr() != g3.data_ptr() and torch.equal(g1, g0) and torch.equal(g0, first[1])
    assert torch.equal(g3, g0 * -3.0)


def test_value_loss_device_normalisers_match_host_ones():
    vp, v, r, mask = cuda(*value_data(32, 400, seed=26))
    bnt = mask.sum().double()  # a device 0-d normaliser, as verl's critic passes it: never read back
    gbs = torch.tensor(40.0, dtype=torch.float64, device=bnt.device)
    for agg in AGG_MODES:
        ref = vrun(vp, v, r, mask, agg, dp_size=2, batch_num_tokens=float(bnt), global_batch_size=40.0)
        got = vrun(vp, v, r, mask, agg, dp_size=2, batch_num_tokens=bnt, global_batch_size=gbs)
        for x, y in zip(got, ref):
            close(x, y, TOL_CPU[torch.float32], f"{agg}: device normaliser")


@needs_gpu
def test_value_loss_no_host_sync_and_cuda_graph():
    vp, v, r, mask = cuda(*value_data(32, 1000, seed=27))
    bnt = mask.sum().double()
    vrun(vp, v, r, mask, "token-mean", batch_num_tokens=bnt)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for agg in AGG_MODES:
            vrun(vp, v, r, mask, agg, batch_num_tokens=bnt)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    x = vp.clone().requires_grad_(True)

    def step():
        loss, clipfrac = luspo_rs.value_loss(x, v, r, mask, 0.2)
        (g,) = torch.autograd.grad(loss, x)
        return loss, g, clipfrac

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = step()
    eager = step()
    graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(static, eager):
        assert torch.equal(a, b)


@needs_gpu
def test_value_loss_mixed_devices_are_a_value_error():
    vp, v, r, mask = value_data(2, 8)
    with pytest.raises(ValueError, match="values|device"):
        luspo_rs.value_loss(vp.cuda(), v, r.cuda(), mask.cuda(), 0.2)


# --------------------------------------------------------------------------- kl_penalty


def kl_weights(lp):
    return torch.randn(lp.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64).to(lp.dtype).to(lp.device)


def kl_run(fn, mode, lp, ref, w=None):
    """Value and the gradients in both inputs of ``(fn(lp, ref, mode) * w).sum()``."""
    w = kl_weights(lp) if w is None else w
    a = lp.detach().clone().requires_grad_()
    b = ref.detach().clone().requires_grad_()
    v = fn(a, b, mode)
    (v * w).sum().backward()
    return v.detach(), a.grad, b.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("mode", KL_MODES)
def test_kl_penalty_matches_verl_and_cpu_on_the_gpu(mode, dtype):
    lp, ref = kl_inputs(dtype)
    got = kl_run(ours.kl_penalty, mode, *cuda(lp, ref))
    assert all(on_device(t) and t.dtype == dtype for t in got)
    with host():
        cpu = kl_run(ours.kl_penalty, mode, lp, ref)
    for what, g, c in zip(("value", "d logprob", "d ref_logprob"), got, cpu):
        close(g, c, TOL_CPU[dtype], f"{what} vs CPU")
    # verl on the same GPU, in f32 for 16-bit inputs
    up = torch.float32 if dtype == torch.bfloat16 else dtype
    want = kl_run(verl_ca.kl_penalty, mode, *[t.to(up) for t in cuda(lp, ref)])
    for what, g, w in zip(("value", "d logprob", "d ref_logprob"), got, want):
        close(g, w, TOL_CPU[dtype], f"{what} vs verl")


def test_kl_penalty_any_rank_and_strided():
    lp, ref = kl_inputs(torch.float32, shape=(4, 6, 10))
    got = kl_run(ours.kl_penalty, "k3", *cuda(lp, ref))
    with host():
        want = kl_run(ours.kl_penalty, "k3", lp, ref)
    for g, w in zip(got, want):
        close(g, w, TOL_CPU[torch.float32], "3-D")
    lp, ref = kl_inputs(torch.float32, shape=(30, 20))
    t = lambda x: x.t().contiguous().t()  # noqa: E731
    dlp, dref = cuda(lp, ref)
    a = kl_run(ours.kl_penalty, "mse", t(dlp), dref[:, :])
    with host():
        b = kl_run(ours.kl_penalty, "mse", lp, ref)
    for g, w in zip(a, b):
        close(g, w, TOL_CPU[torch.float32], "strided")


@pytest.mark.parametrize("shape", [(3 * 4096 + 5,), (2, 4096 * 2 + 1)], ids=["long-1d", "long-rows"])
def test_kl_penalty_long_rows_take_several_blocks(shape):
    # a block per 4096 columns of a row (src/cuda/kl_penalty.rs `geometry`):
    # the chunk borders must cover every element once
    lp, ref = kl_inputs(torch.float32, shape=shape)
    got = kl_run(ours.kl_penalty, "k3", *cuda(lp, ref))
    want = kl_run(verl_ca.kl_penalty, "k3", lp, ref)
    for g, w in zip(got, want):
        close(g, w, TOL_CPU[torch.float32], f"{shape}")


def test_kl_penalty_bitwise_deterministic():
    lp, ref = cuda(*kl_inputs(torch.float32, shape=(64, 3000)))
    first = kl_run(ours.kl_penalty, "k3", lp, ref)
    for _ in range(3):
        assert all(torch.equal(a, b) for a, b in zip(first, kl_run(ours.kl_penalty, "k3", lp, ref)))


@needs_gpu
def test_kl_penalty_mixed_devices_are_a_value_error():
    lp, ref = kl_inputs(torch.float32)
    with pytest.raises(ValueError, match="ref_logprob"):
        ours.kl_penalty(lp.cuda(), ref, "k1")


# --------------------------------------------------------------------------- advantages

ADV_TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float64: dict(atol=1e-10, rtol=1e-10)}


def adv(fn_owner, name, rewards, mask, index, **kw):
    kw = {**VERL_KW.get(name, {}), **kw}
    out, ret = getattr(fn_owner, ESTIMATORS[name])(token_level_rewards=rewards.clone(), response_mask=mask, index=index, **kw)
    return out, ret


def as_index(index, kind):
    """The uid array as verl passes it, int labels as numpy, or int labels as a CUDA tensor."""
    if kind == "cuda_tensor":
        return torch.from_numpy(np.unique(index, return_inverse=True)[1].astype(np.int64) * 13 - 5).to(DEV)
    if kind == "int":
        return np.unique(index, return_inverse=True)[1].astype(np.int64) * 7919 + 3
    return index


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("index_kind", ["uid", "int", "cuda_tensor"])
@pytest.mark.parametrize("layout", ["1", "16", "mixed"])
@pytest.mark.parametrize("name", sorted(ESTIMATORS))
def test_estimator_matches_verl_and_cpu_on_the_gpu(name, layout, index_kind, dtype):
    rng = np.random.default_rng(stable_seed(name, layout, index_kind, str(dtype)))
    rewards, mask, uid = make_adv_batch(sizes_for(name, group_layout(layout, rng)), "uid", rng, dtype=dtype, T=40)
    index = as_index(uid, index_kind)
    got, got_ret = adv(ours, name, *cuda(rewards, mask), index)
    assert on_device(got) and got.dtype == dtype and got_ret is got
    with host():
        cpu, _ = adv(ours, name, rewards, mask, uid)
    close(got, cpu, ADV_TOL[dtype], "vs CPU")
    want, _ = adv(verl_ca, name, *cuda(rewards, mask), uid)
    # verl's grpo_vectorized has float32 group statistics whatever the dtype
    # (test_advantage.float64_tol): float32 precision only.
    close(got, want, ADV_TOL[torch.float32] if name == "grpo_vectorized" else ADV_TOL[dtype], "vs verl")


@pytest.mark.parametrize("name", sorted(ESTIMATORS))
def test_estimator_bitwise_equal_to_cpu_on_exact_scores(name):
    # 0/1 outcome rewards (one per row, tied groups): the row scores are exact, the group
    # statistics run in row order in f64 with the same operations as the CPU, so every
    # value is bitwise the CPU's (reinforce_plus_plus_baseline's batch whitening sums in
    # another order: close only).
    rng = np.random.default_rng(5)
    rewards, mask, uid = make_adv_batch(sizes_for(name, group_layout("mixed", rng)), "uid", rng, binary=True, mask_dtype=torch.int64)
    got, _ = adv(ours, name, *cuda(rewards, mask), uid)
    with host():
        cpu, _ = adv(ours, name, rewards, mask, uid)
    if name in WHITENED:
        close(got, cpu, ADV_TOL[torch.float32], "vs CPU")
    else:
        assert torch.equal(got.cpu(), cpu)


@pytest.mark.parametrize("name", ["grpo", "opo", "reinforce_plus_plus_baseline", "grpo_passk", "gdpo"])
@pytest.mark.parametrize(
    "rdtype,mdtype",
    [(torch.bfloat16, torch.bool), (torch.float16, torch.float32), (torch.float32, torch.bool), (torch.float64, torch.int64)],
    ids=str,
)
def test_estimator_dtypes_match_cpu(name, rdtype, mdtype):
    rng = np.random.default_rng(8)
    rewards, mask, uid = make_adv_batch(sizes_for(name, group_layout("mixed", rng)), "uid", rng, dtype=rdtype, mask_dtype=mdtype)
    got, _ = adv(ours, name, *cuda(rewards, mask), uid)
    with host():
        cpu, _ = adv(ours, name, rewards, mask, uid)
    assert got.dtype == cpu.dtype
    close(got, cpu, TOL_CPU[cpu.dtype], f"{rdtype} rewards, {mdtype} mask")


@pytest.mark.parametrize("norm", [True, False], ids=["grpo", "dr_grpo"])
def test_grpo_options_and_gpg_f_norm_on_the_gpu(norm):
    rng = np.random.default_rng(4)
    rewards, mask, uid = make_adv_batch(group_layout("mixed", rng), "uid", rng)
    kw = dict(norm_adv_by_std_in_grpo=norm, epsilon=1e-3)
    close(adv(ours, "grpo", *cuda(rewards, mask), uid, **kw)[0],
          adv(verl_ca, "grpo", *cuda(rewards, mask), uid, **kw)[0], ADV_TOL[torch.float32], "grpo options")
    close(adv(ours, "gpg", *cuda(rewards, mask), uid, f_norm=2.5)[0],
          adv(verl_ca, "gpg", *cuda(rewards, mask), uid, f_norm=2.5)[0], ADV_TOL[torch.float32], "gpg f_norm")


def test_passk_ties_nan_and_epsilon_bitwise_equal_to_cpu_on_the_gpu():
    # integer scores with tied maxima, a NaN score, an all-equal group under
    # epsilon=0 (NaN on its first row): the first tied row is the best on both
    rng = np.random.default_rng(12)
    sizes = [2, 3, 4, 5, 8, 16, 2, 3]
    B = sum(sizes)
    labels = rng.permutation(np.repeat(np.arange(len(sizes)), sizes))
    rewards = torch.zeros(B, 6, dtype=torch.float64)
    rewards[:, 2] = torch.from_numpy(rng.integers(0, 3, size=B).astype(np.float64))
    rewards[labels == 0, 2] = 1.0
    rewards[np.flatnonzero(labels == 1)[1], 4] = float("nan")
    mask = torch.ones(B, 6, dtype=torch.bool)
    for norm, eps in ((True, 1e-6), (False, 1e-6), (True, 0.0)):
        kw = dict(norm_adv_by_std_in_grpo=norm, epsilon=eps)
        got = luspo_rs.advantage(*cuda(rewards, mask), labels, "grpo_passk", **kw)
        with host():
            cpu = luspo_rs.advantage(rewards, mask, labels, "grpo_passk", **kw)
        assert torch.equal(got.cpu().isnan(), cpu.isnan()) and torch.equal(got.cpu().nan_to_num(), cpu.nan_to_num())
        rows0 = np.flatnonzero(labels == 0)  # the all-equal group: NaN on its first row under epsilon=0
        assert bool(got[rows0[0]].isnan().all()) == (eps == 0) and not got[rows0[1:]].isnan().any()
        assert got[np.flatnonzero(labels == 1)[1]].isnan().all()  # the NaN score is the best
        if norm and eps:
            want, _ = adv(verl_ca, "grpo_passk", *cuda(rewards, mask), labels)
            close(got, want, ADV_TOL[torch.float64], "vs verl")  # (no NaN row of verl's differs: groups of 3)


def test_passk_group_of_one_row_on_the_gpu():
    # labels on the host: verl's ValueError before any launch; labels already on
    # the device: no sync to raise, the lone row gets NaN (documented)
    rng = np.random.default_rng(13)
    rewards, mask, uid = make_adv_batch([2, 1, 3], "uid", rng)
    rewards, mask = cuda(rewards, mask)
    with pytest.raises(ValueError, match="^index: grpo_passk"):
        luspo_rs.advantage(rewards, mask, uid, "grpo_passk")
    labels = torch.from_numpy(np.unique(uid, return_inverse=True)[1]).to(DEV)
    if GPU:
        got = luspo_rs.advantage(rewards, mask, labels, "grpo_passk")
    else:  # (the simulator's device tensors are host tensors, which the host check sees: the kernel directly)
        from luspo_rs import _cuda

        got = torch.empty_like(rewards)
        gid, extra = _cuda.advantage_inputs(rewards, labels)
        _core.advantage(rewards, mask, gid, got, estimator="grpo_passk", **extra)
    lone = (labels[:, None] == labels[None, :]).sum(1).cpu() == 1
    assert torch.isnan(got.cpu()[lone]).all() and not torch.isnan(got.cpu()[~lone]).any()


@pytest.mark.parametrize("mdtype", [torch.int64, torch.float64], ids=str)
@pytest.mark.parametrize("norm", [True, False], ids=["std", "no_std"])
def test_gdpo_reward_keys_match_verl_and_cpu_on_the_gpu(norm, mdtype):
    from test_passk_gdpo import keyed_batch
    from verl.trainer.config import AlgoConfig

    rng = np.random.default_rng(14)
    rewards, mask, uid, non_tensor, batch = keyed_batch(rng, [int(s) for s in rng.choice([1, 2, 4, 8], 12)], mask_dtype=mdtype)
    config = AlgoConfig(gdpo_reward_keys=["accuracy", "format", "length"], gdpo_reward_weights=[1.0, 0.3, -0.25])
    kw = dict(norm_adv_by_std_in_grpo=norm, config=config, non_tensor_batch=non_tensor)
    got, _ = adv(ours, "gdpo", *cuda(rewards, mask), uid, batch={k: v.to(DEV) for k, v in batch.items()}, **kw)
    assert on_device(got) and got.dtype == (torch.float64 if mdtype == torch.float64 else torch.float32)
    with host():
        cpu, _ = adv(ours, "gdpo", rewards, mask, uid, batch=batch, **kw)
    close(got, cpu, ADV_TOL[torch.float32], "vs CPU")
    want, _ = adv(verl_ca, "gdpo", *cuda(rewards, mask), uid, batch={k: v.to(DEV) for k, v in batch.items()}, **kw)
    close(got, want, ADV_TOL[torch.float32], "vs verl")


@pytest.mark.parametrize("name", sorted(ESTIMATORS))
def test_estimator_bitwise_deterministic_and_stream_ordered(name):
    rng = np.random.default_rng(6)
    rewards, mask, uid = make_adv_batch([8] * 256 if BIG else [8] * 24, "uid", rng, T=700 if BIG else 200)
    rewards, mask = cuda(rewards, mask)
    first, _ = adv(ours, name, rewards, mask, uid)
    for k in range(3):
        if SIM:
            _core.sim_set_seed(100 * k + 3)
        assert torch.equal(adv(ours, name, rewards, mask, uid)[0], first)
    if SIM:
        return  # (the simulator has one stream)
    # on a side stream: queued there, correct once that stream is done
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        side, _ = adv(ours, name, rewards, mask, uid)
    s.synchronize()
    assert torch.equal(side, first)


@needs_gpu
def test_estimator_mixed_devices_are_a_value_error():
    rng = np.random.default_rng(1)
    rewards, mask, uid = make_adv_batch([2, 3], "uid", rng)
    with pytest.raises(ValueError, match="response_mask"):
        ours.compute_grpo_outcome_advantage(rewards.cuda(), mask, uid)


@needs_gpu
def test_kl_and_estimators_do_not_sync_the_host():
    rng = np.random.default_rng(2)
    rewards, mask, uid = make_adv_batch([4] * 64, "uid", rng, T=300)
    rewards, mask = rewards.cuda(), mask.cuda()
    ints = as_index(uid, "int")
    lp, ref = (t.cuda() for t in kl_inputs(torch.float32))
    w = kl_weights(lp)  # a host-to-device copy: outside the check
    kl_run(ours.kl_penalty, "k3", lp, ref, w)  # compile + load outside the check
    adv(ours, "grpo", rewards, mask, uid)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for mode in ("k1", "abs", "k2", "k3", "k3+"):
            kl_run(ours.kl_penalty, mode, lp, ref, w)
        for name in sorted(ESTIMATORS):
            adv(ours, name, rewards, mask, uid)
            adv(ours, name, rewards, mask, ints)
    finally:
        torch.cuda.set_sync_debug_mode("default")


# --------------------------------------------------------------------------- scan estimators


from test_returns import SCANS, SETTINGS  # noqa: E402
from test_returns import call as scan_call  # noqa: E402
from test_returns import make as make_scan_batch  # noqa: E402

# vs the CPU path: the chunks' incoming states come from maps composed in
# float64, the walk is verl's arithmetic in the compute type (a few ulps)
SCAN_TOL = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float64: dict(atol=1e-12, rtol=1e-10),
    torch.bfloat16: dict(atol=1e-2, rtol=1.6e-2),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
}


@pytest.mark.parametrize("name, gamma, lam", SETTINGS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("B, T", [(6, 37), (3, 1), (4, 300), (2, 1000)])
def test_scan_matches_verl_and_cpu_on_the_gpu(name, gamma, lam, dtype, B, T):
    # T from 1 (most chunks empty) to several tokens per chunk of the 128-thread row block
    rng = np.random.default_rng(stable_seed(name, gamma, lam, str(dtype), B, T))
    r, v, b, m = make_scan_batch(B, T, rng, dtype, dtype, "holes")
    m[:2, 0] = 1  # two valid tokens at least: verl's whitening needs them
    got = scan_call(ours, name, *cuda(r, v, b, m), gamma, lam)
    assert all(on_device(g) for g in got)
    with host():
        cpu = scan_call(ours, name, r, v, b, m, gamma, lam)
    want = scan_call(verl_ca, name, *cuda(r, v, b, m), gamma, lam)
    for g, c, w, what in zip(got, cpu, want, ("advantages", "returns")):
        assert g.dtype == c.dtype == w.dtype, what
        close(g, c, SCAN_TOL[dtype], f"{what} vs CPU")
        close(g, w, SCAN_TOL[dtype], f"{what} vs verl")


@pytest.mark.parametrize("name", sorted(SCANS))
@pytest.mark.parametrize(
    "dtype,mdtype", [(torch.bfloat16, torch.int64), (torch.float16, torch.float32), (torch.float32, torch.bool),
                     (torch.float32, torch.float64)], ids=str)  # fmt: skip
def test_scan_dtypes_match_cpu(name, dtype, mdtype):
    rng = np.random.default_rng(stable_seed(name, str(dtype), str(mdtype)))
    r, v, b, m = make_scan_batch(5, 90, rng, dtype, mdtype)
    got = scan_call(ours, name, *cuda(r, v, b, m), 0.95, 0.9)
    with host():
        cpu = scan_call(ours, name, r, v, b, m, 0.95, 0.9)
    for g, c in zip(got, cpu):
        assert g.dtype == c.dtype
        close(g, c, SCAN_TOL[c.dtype], f"{dtype} inputs, {mdtype} mask")


@pytest.mark.parametrize("name", ["gae", "reinforce_plus_plus"])
def test_scan_fewer_than_two_valid_tokens_gives_nan_advantages_on_the_gpu(name):
    r, v, b, m = make_scan_batch(3, 6, np.random.default_rng(1), layout="prefix")
    m = torch.zeros_like(m)
    m[2, 4] = 1.0
    adv_, ret = scan_call(ours, name, *cuda(r, v, b, m), 0.9, 0.9)
    with host():
        _, cpu_ret = scan_call(ours, name, r, v, b, m, 0.9, 0.9)
    assert torch.isnan(adv_).all()
    close(ret, cpu_ret, SCAN_TOL[torch.float32], "returns")


@pytest.mark.parametrize("name", sorted(SCANS))
def test_scan_bitwise_deterministic_over_runs(name):
    rng = np.random.default_rng(9)
    B, T = (256, 4096) if BIG else (16, 700)
    r, v, b, m = cuda(*make_scan_batch(B, T, rng))
    first = scan_call(ours, name, r, v, b, m, 0.99, 0.95)
    for k in range(3):
        if SIM:
            _core.sim_set_seed(100 * k + 7)
        again = scan_call(ours, name, r, v, b, m, 0.99, 0.95)
        assert all(torch.equal(a, f) for a, f in zip(again, first))


@needs_gpu
def test_scans_do_not_sync_the_host():
    r, v, b, m = cuda(*make_scan_batch(64, 300, np.random.default_rng(2)))
    for name in SCANS:  # compile + load outside the check
        scan_call(ours, name, r, v, b, m, 0.99, 0.95)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for name in SCANS:
            scan_call(ours, name, r, v, b, m, 0.99, 0.95)
    finally:
        torch.cuda.set_sync_debug_mode("default")


# --------------------------------------------------------------------------- optimal token baselines


from test_token_baseline import FNS as TB_FNS  # noqa: E402
from test_token_baseline import call as tb_call  # noqa: E402
from test_token_baseline import make as make_tb_batch  # noqa: E402

# vs the CPU path: W's float64 running sums go through block scans (a few
# float64 ulps), so float32 results are bitwise as a rule and float64 ones
# agree to a few ulps of the returns
TB_TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float64: dict(atol=1e-11, rtol=1e-10)}


def tb_cuda(b):
    return {k: (v.to(DEV) if isinstance(v, torch.Tensor) else v) for k, v in b.items()}


@pytest.mark.parametrize("name", sorted(TB_FNS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("layout", ["prefix", "holes"])
@pytest.mark.parametrize("tail", [True, False], ids=["zero_tail", "keep_tail"])
@pytest.mark.parametrize("B, T", [(12, 17), (3, 1), (9, 300), (4, 700)])
def test_token_baseline_matches_verl_and_cpu_on_the_gpu(name, dtype, layout, tail, B, T):
    # T from 1 to several column tiles of the 128-thread block (and, with holes,
    # rank tiles that end inside a column tile)
    rng = np.random.default_rng(stable_seed(name, str(dtype), layout, tail, B, T))
    groups = [0, 1, 0, 2, 1, 1, 2, 3, 4, 4, 4, 4][:B] if B > 4 else [0, 0, 1, 0][:B]
    b = make_tb_batch(B, T, rng, dtype, layout, groups=groups)
    m = b["response_mask"]
    got = tb_call(ours, name, tb_cuda(b), m.to(DEV), True, tail)
    assert all(on_device(g) for g in got)
    with host():
        cpu = tb_call(ours, name, b, m, True, tail)
    want = tb_call(verl_ca, name, b, m, True, tail)
    for g, c, w, what in zip(got, cpu, want, ("advantages", "returns")):
        assert g.dtype == c.dtype == w.dtype, what
        close(g, c, TB_TOL[dtype], f"{what} vs CPU")
        close(g, w, TB_TOL[dtype], f"{what} vs verl")


@pytest.mark.parametrize("name", sorted(TB_FNS))
def test_token_baseline_long_rank_tiles_and_singletons_on_the_gpu(name):
    # rows with a few hundred valid tokens scattered over 900 columns: rank tiles
    # end mid column tile and a singleton walks its own; empty rows and an empty group
    rng = np.random.default_rng(stable_seed(name, "ranks"))
    B, T = 7, 900
    b = make_tb_batch(B, T, rng, torch.float32, "prefix", groups=[0, 0, 0, 1, 2, 2, 3])
    m = torch.from_numpy(rng.random((B, T)) < 0.4)
    m[2, 500:] = False
    m[4] = m[5] = False  # group 2: no valid token at all
    m[6, :3] = False
    got = tb_call(ours, name, tb_cuda(b), m.to(DEV), True, True)
    with host():
        cpu = tb_call(ours, name, b, m, True, True)
    want = tb_call(verl_ca, name, b, m, True, True)
    for g, c, w, what in zip(got, cpu, want, ("advantages", "returns")):
        close(g, c, TB_TOL[torch.float32], f"{what} vs CPU")
        close(g, w, TB_TOL[torch.float32], f"{what} vs verl")


@pytest.mark.parametrize("name", sorted(TB_FNS))
@pytest.mark.parametrize(
    "dtypes", [dict(old_log_probs=torch.float64), dict(token_level_rewards=torch.float64),
               dict(response_mask=torch.float64), dict(all=torch.bfloat16), dict(response_mask=torch.int64)],
    ids=lambda d: "+".join(f"{k}:{str(v).removeprefix('torch.')}" for k, v in d.items()))  # fmt: skip
def test_token_baseline_dtypes_match_cpu(name, dtypes):
    rng = np.random.default_rng(stable_seed(name, *map(str, dtypes.items())))
    b = make_tb_batch(8, 90, rng, torch.float32, "holes", groups=[0, 0, 1, 1, 1, 2, 3, 3])
    b["response_mask"] = b["response_mask"].float()
    for k, dt in dtypes.items():
        for key in b if k == "all" else [k]:
            if isinstance(b[key], torch.Tensor) and (k != "all" or key != "response_mask"):
                b[key] = b[key].to(dt)
    got = tb_call(ours, name, tb_cuda(b), b["response_mask"].to(DEV), True)
    with host():
        cpu = tb_call(ours, name, b, b["response_mask"], True)
    for g, c in zip(got, cpu):
        assert g.dtype == c.dtype
        tol = dict(atol=1e-2, rtol=1.6e-2) if c.dtype == torch.bfloat16 else TB_TOL[torch.float32]
        close(g, c, tol, f"{dtypes}")


@pytest.mark.parametrize("name", sorted(TB_FNS))
def test_token_baseline_bitwise_deterministic_over_runs(name):
    rng = np.random.default_rng(9)
    B, T = (256, 4096) if BIG else (24, 500)
    b = tb_cuda(make_tb_batch(B, T, rng, torch.float32, "holes"))
    first = tb_call(ours, name, b, b["response_mask"], True)
    for k in range(3):
        if SIM:
            _core.sim_set_seed(100 * k + 7)
        again = tb_call(ours, name, b, b["response_mask"], True)
        assert all(torch.equal(a, f) for a, f in zip(again, first))


@needs_gpu
def test_token_baseline_mixed_devices_are_a_value_error():
    b = make_tb_batch(4, 9, np.random.default_rng(1))
    dev = tb_cuda(b)
    dev["sum_pi_squared"] = b["sum_pi_squared"]  # left on the CPU
    with pytest.raises(ValueError, match="sum_pi_squared"):
        tb_call(ours, "optimal_token_baseline", dev, dev["response_mask"])


@needs_gpu
def test_token_baselines_do_not_sync_the_host():
    b = tb_cuda(make_tb_batch(64, 300, np.random.default_rng(2)))
    b["index"] = torch.from_numpy(b["index"]).to(DEV)  # labels already on the device
    for name in TB_FNS:  # compile + load outside the check
        tb_call(ours, name, b, b["response_mask"], True)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for name in TB_FNS:
            tb_call(ours, name, b, b["response_mask"], True)
    finally:
        torch.cuda.set_sync_debug_mode("default")


# --------------------------------------------------------------------------- GMPO (geo_mean)
#
# loss_rows sums GMPO's rows (L, dmin m, A m, ln(w + 1e-10) m) and writes pg_i
# and its coefficient; loss_tokens_*_geo writes the gradient and the metric
# sums, its last block the mean of pg_i. Against our CPU path and verl's own
# compute_policy_loss_geo_mean on the same device.

from test_geo_mean import multi_turn_mask, verl_geo  # noqa: E402


def geo_run(old, lp, adv, mask, weights=None, **kw):
    return run("geo_mean", old, lp, adv, mask, "token-mean", weights, **kw)


def geo_batch(B, T, dtype, seed, mask_dtype=torch.bool, **kw):
    old, lp, adv, mask = make_batch(B, T, dtype=dtype, seed=seed, **kw)
    mask[1] = multi_turn_mask(1, T, seed)[0] if B > 1 else mask[1]  # (multi_turn_mask's last row is empty)
    return old, lp, adv, mask.to(mask_dtype)


def geo_compare(old, lp, adv, mask, w, dtype, verl=True):
    with host():
        c = geo_run(old, lp, adv, mask, w)
    g = geo_run(*cuda(old, lp, adv, mask), *cuda(w))
    assert on_device(g[0]) and on_device(g[1]) and g[1].dtype == lp.dtype and g[0].dtype == c[0].dtype
    tol = TOL_CPU[dtype]
    close(g[0], c[0], tol, "loss vs CPU")
    close(g[1], c[1], tol, "grad vs CPU")
    close(g[2], c[2], TOL_CPU[torch.float32], "metrics vs CPU")
    if verl:  # verl on the same device, in f32 for 16-bit inputs (its own 16-bit math is coarser than ours)
        up = torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype
        rw = None if w is None else cuda(w)[0].to(up)
        ref_adv = adv if adv.dim() == 2 else adv.reshape(-1, 1).expand(lp.shape)
        r_loss, r_grad, r_met = verl_geo(*[t.to(up) for t in cuda(old, lp, ref_adv)], *cuda(mask), rw, **CLIP)
        close(g[0], r_loss, tol, "loss vs verl")
        close(g[1], r_grad, tol, "grad vs verl")
        ours_met = dict(zip(METRICS, g[2]))
        for k, v in r_met.items():
            close(ours_met[k], v, TOL_CPU[torch.float32], f"{k} vs verl")
    return g


@pytest.mark.parametrize("with_weights", [False, True], ids=["no_is", "is_weights"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_geo_mean_matches_cpu_path_and_verl_on_the_gpu(dtype, with_weights):
    old, lp, adv, mask = geo_batch(9, 300, dtype, seed=31, spread=1.0, empty_rows=(3,), full_rows=(0,))
    w = torch.rand(9, 300, generator=torch.Generator().manual_seed(1)).to(dtype) + 0.5 if with_weights else None
    g = geo_compare(old, lp, adv, mask, w, dtype)
    assert g[2][0] > 0.05 and g[2][2] > 0.05, "the batch must clip on both sides"


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.uint8, torch.int64, torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_geo_mean_mask_kinds_match_cpu_and_verl(dtype, mask_dtype):
    # 1-byte masks load in runs (and T = 301 leaves a tail); a float64 mask
    # makes the row means, ratio and loss float64, on both devices
    old, lp, adv, mask = geo_batch(6, 301, dtype, seed=32, mask_dtype=mask_dtype, spread=0.7, empty_rows=(4,))
    g = geo_compare(old, lp, adv, mask, None, dtype)
    assert g[0].dtype == (torch.float64 if mask_dtype == torch.float64 else torch.float32)


def test_geo_mean_rows_ties_zero_advantages_nan_and_empty_batches_match_cpu_on_the_gpu():
    # per-row advantages and IS weights, A == 0 tokens, log-ratios exactly on
    # the clip bounds, long rows (512-thread teams), NaN in valid and masked
    # tokens, and a batch with no valid token
    B, T = 5, 3000
    old, lp, adv, mask = geo_batch(B, T, torch.float32, seed=33, spread=0.6, empty_rows=(2,))
    geo_compare(old, lp, adv[:, :1].contiguous(), mask, (adv[:, 0].abs() + 0.5), torch.float32, verl=False)
    adv[:, ::5] = 0.0
    lp[:, 7::11] = old[:, 7::11] + 0.28  # on the upper bound, as the f32 subtraction rounds it or not
    lp[:, 3::13] = old[:, 3::13] - 0.25
    geo_compare(old, lp, adv, mask, None, torch.float32)
    g = geo_compare(old, lp, adv, torch.zeros_like(mask), None, torch.float32)
    assert g[0].item() == 0.0 and g[1].eq(0).all()
    lp[0, 4] = float("nan")  # valid
    mask[3, -1] = False
    lp[3, -1] = float("nan")  # masked
    g = geo_compare(old, lp, adv, mask, None, torch.float32, verl=False)
    assert torch.isnan(g[0]) and g[1][3][~mask[3]].eq(0).all()


def test_geo_mean_ignores_normalisers_and_scales_by_the_seed_on_the_gpu():
    old, lp, adv, mask = cuda(*geo_batch(7, 200, torch.float32, seed=34, spread=0.8))
    base = geo_run(old, lp, adv, mask)
    other = run("geo_mean", old, lp, adv, mask, "seq-mean-token-sum", None, dp_size=4, global_batch_size=3)
    for a, b in zip(base, other):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
    x = lp.detach().clone().requires_grad_(True)
    loss, _ = luspo_rs.policy_loss(old, x, adv, mask, mode="geo_mean", **CLIP)
    (g1,) = torch.autograd.grad(loss, x, retain_graph=True)
    g1 = g1.clone()
    (g3,) = torch.autograd.grad(loss, x, grad_outputs=torch.tensor(-3.0, device=x.device))
    assert torch.equal(g1, base[1]) and torch.equal(g3, g1 * -3.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_geo_mean_bitwise_deterministic_over_runs(dtype):
    # on the simulator every run also has its blocks and threads in another order
    B, T = (64, 5000) if BIG else (24, 1500)
    old, lp, adv, mask = cuda(*geo_batch(B, T, dtype, seed=35, spread=0.5))
    w = cuda(torch.rand(B, T, generator=torch.Generator().manual_seed(2)).to(dtype) + 0.5)[0]
    first = geo_run(old, lp, adv, mask, w)
    for k in range(4):
        if SIM:
            _core.sim_set_seed(1000 * k + 17)
        again = geo_run(old, lp, adv, mask, w)
        for a, b in zip(first, again):
            torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


def test_geo_mean_strided_inputs_are_read_in_place():
    old, lp, adv, mask = cuda(*geo_batch(16, 40, torch.float32, seed=36, spread=0.8))
    w = cuda(torch.rand(16, 40, generator=torch.Generator().manual_seed(3)) + 0.5)[0]
    a = geo_run(old, lp, adv, mask, w)
    t = lambda x: x.t().contiguous().t()  # noqa: E731  (transposed storage)
    b = geo_run(t(old), t(lp), t(adv), t(mask), t(w))
    for x, y in zip(a, b):
        close(x, y, TOL_CPU[torch.float32], "strided")


def test_geo_mean_with_a_float64_mask_decides_its_clamp_in_float32_on_the_gpu():
    # the fuzz's finding (test_fuzz.py): d = lp - old and its bounds in the
    # log-probs' float32 although the math is float64, as verl; on the device
    # too (LossArgs.vec's VEC_NARROW)
    from test_fuzz import _geo_f64_mask_case

    x = _geo_f64_mask_case().inputs
    kw = dict(mode="geo_mean", clip_ratio=0.2, clip_ratio_low=0.5885, clip_ratio_high=0.2599)
    cfg = verl_config(clip_ratio=0.2, clip_ratio_low=0.5885, clip_ratio_high=0.2599)
    args = cuda(x["old_log_prob"], x["log_prob"], x["advantages"], x["response_mask"])
    lp = args[1].clone().requires_grad_()
    want, want_m = verl_ca.compute_policy_loss_geo_mean(args[0], lp, args[2], args[3], config=cfg)
    want.backward()
    y = args[1].clone().requires_grad_()
    got, got_m = luspo_rs.policy_loss(args[0], y, args[2], args[3], **kw)
    got.backward()
    close(got, want, TOL_CPU[torch.float64], "loss")
    close(y.grad, lp.grad, TOL_CPU[torch.float32], "grad")
    for k in ("pg_clipfrac", "pg_clipfrac_lower"):
        close(got_m[k], want_m[f"actor/{k}"], TOL_CPU[torch.float32], k)
