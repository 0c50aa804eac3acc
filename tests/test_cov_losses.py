"""Clip-Cov, KL-Cov and bypass mode against verl 0.9.1's REAL functions.

Clip-Cov and KL-Cov choose tokens (``luspo_rs.cov_select``): Clip-Cov at
random among candidates, KL-Cov by the covariance's ``topk``. Seeding torch
identically before verl's call and ours must give the same tokens, hence the
same loss, gradient and metrics, and leave torch's default generator in the
same state (the same number of draws). Which tokens verl chose is read off
verl's own gradients, never recomputed:

* Clip-Cov: the valid tokens whose gradient is 0 in verl's run but not in
  verl's run that cannot choose (``clip_cov_lb == clip_cov_ub``: no candidate);
* KL-Cov: the tokens whose gradient differs from verl's run with
  ``ppo_kl_coef = 0`` (the same choice, a KL term of 0).

Every case runs on the CPU path and on the device: a GPU where torch sees
one, else the CUDA simulator (``src/cuda/sim.rs``, CPU tensors as the device).
"""

from __future__ import annotations

import inspect
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import AGG_MODES, make_batch
from verl.trainer.config.algorithm import RolloutCorrectionConfig
from verl.trainer.ppo import core_algos as verl_ca
from verl.workers.config import ActorConfig, PolicyLossConfig

import luspo_rs
from luspo_rs import _core
from luspo_rs import core_algos as ours
from luspo_rs.cov_select import choose_tokens

GPU = torch.cuda.is_available()
LEN_KEYS = {"actor/len_long_grad_share", "actor/len_long_clipfrac", "actor/len_short_clipfrac", "actor/len_adv_corr",
            "actor/len_net_push"}  # fmt: skip
CLIP = dict(clip_ratio=0.2, clip_ratio_low=0.2, clip_ratio_high=0.28)
DTYPES = [torch.float32, torch.float64, torch.bfloat16]
# float32: our sums run in f64 and our exp differs from torch's by <= 1 ulp;
# 16-bit: verl rounds every operation to the 16-bit type, we compute in f32 and round
# the outputs (the chosen tokens are the same: they are chosen in bf16, as
# verl does, and checked token by token): 3% relative, and in absolute terms
# 1/64 of the largest gradient (a term that nearly cancels, -A r + c sign(d),
# keeps verl's bf16 rounding of its parts) and 1e-3 for the loss (verl's bf16
# sums of terms of both signs)
TOL = {
    torch.float32: dict(atol=1e-6, rtol=1e-5),
    torch.float64: dict(atol=1e-12, rtol=1e-10),
    torch.float16: dict(atol=1e-4, rtol=5e-3),
    torch.bfloat16: dict(atol=1e-3, rtol=3e-2),
}
# metrics: verl's pg_clipfrac is float32 whatever the inputs' dtype
METRIC_TOL = {torch.float32: 1e-5, torch.float64: 1e-7, torch.float16: 5e-3, torch.bfloat16: 1e-2}


def grad_tol(dtype, want):
    if dtype.itemsize > 2:
        return TOL[dtype]
    return dict(rtol=TOL[dtype]["rtol"], atol=want.abs().max().item() / 64 + 1e-9)


@pytest.fixture(params=["cpu", "device"])
def device(request):
    """``"cpu"``: the CPU path; ``"device"``: CUDA tensors on a GPU, else
    the CUDA simulator (CPU tensors act as ``cuda:0``)."""
    if request.param == "cpu" or GPU:
        yield "cuda" if request.param == "device" else "cpu"
        return
    _core.sim_set_enabled(True)
    try:
        yield "cpu"
    finally:
        _core.sim_set_enabled(False)


def config(mode, global_batch_info=None, **policy_loss):
    cfg = ActorConfig(
        strategy="fsdp", ppo_micro_batch_size_per_gpu=1, rollout_n=1,
        policy_loss=PolicyLossConfig(loss_mode=mode, **policy_loss), **CLIP,
    )  # fmt: skip
    cfg.global_batch_info.update(global_batch_info or {})
    return cfg


def away_from_the_clip(old, lp, margin=0.03):
    """``old`` moved where ``exp(lp - old)`` (in ``lp``'s dtype) lies within
    ``margin`` of a clip bound: verl's bf16 arithmetic and our f32 one then
    clip the same tokens (this is about the fused pass, not the choice)."""
    for _ in range(8):
        r = torch.exp((lp - old).double())
        near = ((r / 0.8 - 1).abs() < margin) | ((r / 1.28 - 1).abs() < margin)
        if not near.any():
            return old
        old = torch.where(near, old - 0.1, old).to(old.dtype)
    raise AssertionError("could not move the ratios off the bounds")


def data(dtype=torch.float32, B=16, T=48, seed=0, spread=0.6, mask_kind="bool", device="cpu", **kw):
    old, lp, adv, mask = make_batch(B, T, dtype=dtype, seed=seed, spread=spread, **kw)
    if dtype == torch.bfloat16:
        old = away_from_the_clip(old, lp)
    # no lp == old: KL-Cov's term |lp - old| has a zero gradient there, and
    # verl_choice could not see that verl chose the token
    old = torch.where(old == lp, old - 0.05, old).to(dtype)
    mask = {"bool": mask, "int64": mask.long(), "float32": mask.float(), "float64": mask.double()}[mask_kind]
    return [t.to(device) for t in (old, lp, adv, mask)]


def call(fn, old, lp, adv, mask, agg, cfg, weights=None, seed=0):
    """``fn``'s loss, gradient w.r.t. ``log_prob`` and metrics, torch seeded
    with ``seed`` first; and the default generator's state after the call."""
    torch.manual_seed(seed)
    x = lp.clone().requires_grad_(True)
    loss, metrics = fn(old, x, adv, mask, loss_agg_mode=agg, config=cfg, rollout_is_weights=weights)
    state = torch.get_rng_state()
    loss.backward()
    return loss.detach(), x.grad, metrics, state


def verl_choice(mode, old, lp, adv, mask, agg, cfg_kw, weights=None, seed=0):
    """The tokens verl's own function chose in a run seeded with ``seed``,
    read off its gradients (see the module's doc)."""
    fn = getattr(verl_ca, f"compute_policy_loss_{mode}")
    _, g, _, _ = call(fn, old, lp, adv, mask, agg, config(mode, **cfg_kw), weights, seed)
    if mode == "clip_cov":
        nothing = dict(cfg_kw, clip_cov_lb=0.5, clip_cov_ub=0.5)
        _, g0, _, _ = call(fn, old, lp, adv, mask, agg, config(mode, **nothing), weights, seed)
        return (g == 0) & (g0 != 0) & (mask > 0)
    _, g0, _, _ = call(fn, old, lp, adv, mask, agg, config(mode, **dict(cfg_kw, ppo_kl_coef=0.0)), weights, seed)
    return (g != g0) & (mask > 0)  # (a NaN at a masked token: NaN != NaN)


def our_choice(mode, old, lp, adv, mask, cfg_kw, seed=0):
    torch.manual_seed(seed)
    picks = choose_tokens(mode, old, lp, adv, mask, **CLIP, **{k: v for k, v in cfg_kw.items() if k != "ppo_kl_coef"})
    return torch.zeros(lp.shape, dtype=torch.bool, device=lp.device) if picks is None else picks


def assert_parity(mode, old, lp, adv, mask, agg="token-mean", weights=None, seed=0, gbi=None, verl_adv=None, **cfg_kw):
    """Loss (value and dtype), gradient, metrics (exact keys) and the
    generator's state after the call, ours against verl's; returns the
    tokens both chose (checked equal)."""
    cfg = config(mode, gbi, **cfg_kw)
    dtype = lp.dtype
    va = adv if verl_adv is None else verl_adv
    lw, gw, mw, sw = call(getattr(verl_ca, f"compute_policy_loss_{mode}"), old, lp, va, mask, agg, cfg, weights, seed)
    lo, go, mo, so = call(getattr(ours, f"compute_policy_loss_{mode}"), old, lp, adv, mask, agg, cfg, weights, seed)
    assert torch.equal(so, sw), "the generator's state after the call differs from verl's (another number of draws)"
    # (for 16-bit inputs verl's sequence aggregations return float32, ours the
    # 16-bit type: documented in luspo_rs.policy_loss)
    assert go.dtype == gw.dtype and lo.dtype == (dtype if agg.startswith("seq") and dtype.itemsize == 2 else lw.dtype)
    tol = TOL[dtype]
    torch.testing.assert_close(lo.double().cpu(), lw.double().cpu(), equal_nan=True, **tol)
    torch.testing.assert_close(go.double().cpu(), gw.double().cpu(), equal_nan=True, **grad_tol(dtype, gw.double()))
    assert set(mo) == set(mw) | LEN_KEYS
    assert set(mw) == ({"actor/pg_clipfrac", "actor/ppo_kl"} if mode == "clip_cov" else {"actor/ppo_kl"})
    for k, v in mw.items():
        assert isinstance(mo[k], float)
        assert mo[k] == pytest.approx(v, rel=METRIC_TOL[dtype], abs=1e-9, nan_ok=True), k
    picks = our_choice(mode, old, lp, adv, mask, cfg_kw, seed)
    assert torch.equal(picks, verl_choice(mode, old, lp, va, mask, agg, cfg_kw, weights, seed))
    return picks


# Clip-Cov with more candidates than clip_num (the draw decides), with
# every candidate chosen, and with none; KL-Cov with a few and many tokens.
MANY = dict(clip_cov_ratio=0.02, clip_cov_lb=0.0, clip_cov_ub=5.0)  # ~8 of ~100 candidates
ALL = dict(clip_cov_ratio=0.5, clip_cov_lb=0.3, clip_cov_ub=5.0)
NONE = dict(clip_cov_ratio=0.02, clip_cov_lb=50.0, clip_cov_ub=60.0)
KL = dict(kl_cov_ratio=0.05, ppo_kl_coef=10.0)
KL_MANY = dict(kl_cov_ratio=0.6, ppo_kl_coef=0.3)
CASES = {"clip_cov_many": ("clip_cov", MANY), "clip_cov_all": ("clip_cov", ALL), "clip_cov_none": ("clip_cov", NONE),
         "kl_cov": ("kl_cov", KL), "kl_cov_many": ("kl_cov", KL_MANY)}  # fmt: skip


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("agg", AGG_MODES)
@pytest.mark.parametrize("case", CASES)
def test_matches_verl(case, agg, dtype, device):
    mode, kw = CASES[case]
    old, lp, adv, mask = data(dtype, seed=len(agg), device=device)
    picks = assert_parity(mode, old, lp, adv, mask, agg, seed=7, **kw)
    n = int(picks.sum())
    if case == "clip_cov_none":
        assert n == 0
    elif case == "clip_cov_many":
        assert n == max(int(0.02 * int(mask.sum())), 1)
    else:
        assert n > 0


def test_candidates_outnumber_clip_num_so_the_seed_decides(device):
    """The test above can fail: with more candidates than clip_num, another
    seed chooses other tokens, and then the gradient differs from verl's."""
    old, lp, adv, mask = data(device=device)
    cfg = config("clip_cov", **MANY)
    chosen = {s: our_choice("clip_cov", old, lp, adv, mask, MANY, seed=s) for s in (7, 8)}
    assert chosen[7].sum() == chosen[8].sum() and not torch.equal(chosen[7], chosen[8])
    _, gw, _, _ = call(verl_ca.compute_policy_loss_clip_cov, old, lp, adv, mask, "token-mean", cfg, seed=7)
    _, g7, _, _ = call(ours.compute_policy_loss_clip_cov, old, lp, adv, mask, "token-mean", cfg, seed=7)
    _, g8, _, _ = call(ours.compute_policy_loss_clip_cov, old, lp, adv, mask, "token-mean", cfg, seed=8)
    torch.testing.assert_close(g7, gw, **TOL[torch.float32])
    with pytest.raises(AssertionError):
        torch.testing.assert_close(g8, gw, **TOL[torch.float32])
    # and the candidate set really is larger than what is chosen
    everything = our_choice("clip_cov", old, lp, adv, mask, dict(MANY, clip_cov_ratio=1.0), seed=7)
    assert everything.sum() > 3 * chosen[7].sum()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64], ids=str)
def test_clip_cov_choice_on_the_edges(dtype, device):
    """Where a rounding decides: ratios within a few ulp of the clip bounds
    (verl's clip test, in the inputs' dtype), and ``clip_cov_lb`` /
    ``clip_cov_ub`` set to covariance values the tokens have (verl's strict
    inequalities). Every candidate is chosen (``clip_cov_ratio=1``), so the
    chosen set is the candidate set, compared with verl's token by token."""
    B, T = 16, 48
    g = torch.Generator().manual_seed(31)
    lp = -torch.randint(1, 12, (B, T), generator=g).double() / 4
    bound = torch.tensor([0.8, 1.28, 1.0]).double()[torch.randint(0, 3, (B, T), generator=g)]
    d = bound.log() + 1e-3 * torch.randn(B, T, generator=g, dtype=torch.float64) * (bound != 1.0)
    old = (lp - d).to(dtype)
    lp = lp.to(dtype)
    old = torch.where(old == lp, old - 0.125, old)
    adv = torch.tensor([-1.0, -0.5, 0.5, 1.0], dtype=dtype)[torch.randint(0, 4, (B, 1), generator=g)].expand(B, T)
    mask = torch.arange(T)[None, :] < torch.randint(T // 3, T + 1, (B,), generator=g)[:, None]
    old, lp, adv, mask = (t.to(device) for t in (old, lp, adv, mask))
    # (for choosing the bounds only: the covariances roughly, in float64)
    a, x = adv.double().expand(B, T), lp.double()
    cov = (a - a[mask].mean()) * (x - x[mask].mean())
    values = cov[mask].unique()
    edges = [(-1e9, float(v)) for v in values[:: max(1, len(values) // 8)]]
    edges += [(float(v), 1e9) for v in values[:: max(1, len(values) // 8)]]
    sizes = set()
    for lb, ub in edges:
        kw = dict(clip_cov_ratio=1.0, clip_cov_lb=lb, clip_cov_ub=ub)
        ours_ = our_choice("clip_cov", old, lp, adv, mask, kw, seed=1)
        assert torch.equal(ours_, verl_choice("clip_cov", old, lp, adv, mask, "token-mean", kw, seed=1)), (lb, ub)
        sizes.add(int(ours_.sum()))
    assert len(sizes) > 4


def test_draws_as_many_as_verl(device):
    """One randperm of the candidates (n draws, not clip_num), none when
    there is no candidate, none for KL-Cov: the generator's state after our
    call is verl's (and differs from the state before, where verl draws)."""
    old, lp, adv, mask = data(device=device)
    for mode, kw, draws in (("clip_cov", MANY, True), ("clip_cov", NONE, False), ("kl_cov", KL, False)):
        torch.manual_seed(3)
        before = torch.get_rng_state()
        _, _, _, sw = call(getattr(verl_ca, f"compute_policy_loss_{mode}"), old, lp, adv, mask, "token-mean",
                           config(mode, **kw), seed=3)  # fmt: skip
        _, _, _, so = call(getattr(ours, f"compute_policy_loss_{mode}"), old, lp, adv, mask, "token-mean",
                           config(mode, **kw), seed=3)  # fmt: skip
        assert torch.equal(so, sw)
        assert torch.equal(so, before) != draws


@pytest.mark.parametrize("mask_kind", ["bool", "int64", "float32", "float64"])
@pytest.mark.parametrize("case", ["clip_cov_many", "kl_cov"])
def test_mask_kinds(case, mask_kind, device):
    mode, kw = CASES[case]
    old, lp, adv, mask = data(mask_kind=mask_kind, seed=11, device=device)
    assert_parity(mode, old, lp, adv, mask, "seq-mean-token-mean", seed=2, **kw)


def test_non_binary_float_mask(device):
    """A float mask of weights (not 0/1): verl's masked means multiply by it
    and count ``m > 0``; ours does the same arithmetic."""
    old, lp, adv, mask = data(mask_kind="float32", seed=12, device=device)
    mask = mask * torch.linspace(0.5, 2.0, mask.shape[1], device=mask.device)
    for case in ("clip_cov_many", "kl_cov"):
        mode, kw = CASES[case]
        assert_parity(mode, old, lp, adv, mask, "token-mean", seed=4, **kw)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", ["clip_cov_many", "kl_cov"])
def test_is_weights_and_global_batch_info(case, dtype, device):
    mode, kw = CASES[case]
    old, lp, adv, mask = data(dtype, seed=5, device=device)
    w = (torch.rand(lp.shape, generator=torch.Generator().manual_seed(1)) + 0.5).to(dtype).to(lp.device)
    gbi = dict(dp_size=4, batch_num_tokens=517, global_batch_size=40, loss_scale_factor=64)
    for agg in ("token-mean", "seq-mean-token-sum-norm"):
        assert_parity(mode, old, lp, adv, mask, agg, weights=w, seed=9, gbi=gbi, **kw)


@pytest.mark.parametrize("case", ["clip_cov_many", "kl_cov"])
def test_per_row_advantages(case, device):
    """verl takes only (B, T) advantages here; ours also (B,) and (B, 1),
    choosing as verl does from them expanded."""
    mode, kw = CASES[case]
    old, lp, adv, mask = data(seed=6, per_seq_adv=True, device=device)
    full = adv[:, None].expand(lp.shape).contiguous()
    for a in (adv, adv[:, None]):
        assert_parity(mode, old, lp, a, mask, "token-mean", seed=1, verl_adv=full, **kw)


def test_strided_inputs(device):
    """Column-major inputs (what verl gets, we get: the same reductions);
    with every candidate chosen the candidate mask, column-major too, is
    handed to the fused pass as it is."""
    old, lp, adv, mask = data(seed=3, device=device)
    col = lambda t: t.t().contiguous().t()  # noqa: E731
    for case in ("clip_cov_all", "clip_cov_many", "kl_cov"):
        mode, kw = CASES[case]
        picks = assert_parity(mode, col(old), col(lp), col(adv), col(mask), "token-mean", seed=2, **kw)
        assert torch.equal(picks, our_choice(mode, old, lp, adv, mask, kw, seed=2))


@pytest.mark.parametrize("case", ["clip_cov_many", "clip_cov_all", "kl_cov", "kl_cov_many"])
def test_empty_rows_and_all_masked_batch(case, device):
    mode, kw = CASES[case]
    old, lp, adv, mask = data(seed=8, empty_rows=(0, 5, 15), device=device)
    for agg in ("token-mean", "seq-mean-token-mean"):
        assert_parity(mode, old, lp, adv, mask, agg, seed=5, **kw)
    # nothing valid: no candidate (no draw), no valid token for KL-Cov
    none = torch.zeros_like(mask)
    for agg in AGG_MODES:
        picks = assert_parity(mode, old, lp, adv, none, agg, seed=5, **kw)
        assert not picks.any()
    knobs = {k: v for k, v in kw.items() if k != "ppo_kl_coef"}
    assert choose_tokens(mode, old, lp, adv, none, **CLIP, **knobs) is None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_kl_cov_ties(dtype, device):
    """Log-probs on a coarse grid and per-row advantages make many equal
    covariances; k falls inside a run of ties, which the CPU topk breaks as
    it broke them for verl (the same values, the same call)."""
    B, T = 12, 40
    g = torch.Generator().manual_seed(4)
    lp = (torch.randint(-6, 1, (B, T), generator=g) / 4.0).to(dtype)
    old = (lp.double() - 0.1 * torch.randn(B, T, generator=g, dtype=torch.float64)).to(dtype)
    old = torch.where(old == lp, old - 0.125, old)  # (see data())
    adv = torch.randint(-1, 2, (B, 1), generator=g).to(dtype).expand(B, T).contiguous()
    mask = torch.arange(T)[None, :] < torch.randint(T // 2, T + 1, (B,), generator=g)[:, None]
    old, lp, adv, mask = (t.to(device) for t in (old, lp, adv, mask))
    n = int(mask.sum())
    for ratio in (0.1, 0.25, 0.5):
        k = max(1, int(n * ratio))
        # the premise: the k-th and (k+1)-th largest covariances are equal
        a, x = adv[mask > 0].cpu(), lp[mask > 0].cpu()
        cov = ((a - a.mean()) * (x - x.mean())).sort(descending=True).values
        assert cov[k - 1] == cov[k], "no tie at k: the data does not test tie-breaking"
        picks = assert_parity("kl_cov", old, lp, adv, mask, "token-mean", seed=0, kl_cov_ratio=ratio, ppo_kl_coef=5.0)
        assert int(picks.sum()) == k


def test_nan_inputs_choose_as_verl(device):
    """A NaN log-prob at a valid token makes every covariance NaN: Clip-Cov
    then chooses nothing, KL-Cov's topk takes what it takes of the NaNs (both
    as verl); a NaN at a masked token (log-prob or advantage) changes nothing
    (verl's masked means skip it)."""
    old, lp, adv, mask = data(seed=13, device=device)
    masked_nan_lp, masked_nan_adv, valid_nan = lp.clone(), adv.clone(), lp.clone()
    masked_nan_lp[~mask] = float("nan")
    masked_nan_adv[~mask] = float("nan")
    valid_nan[1, 0] = float("nan")
    for case in ("clip_cov_many", "kl_cov"):
        mode, kw = CASES[case]
        clean = our_choice(mode, old, lp, adv, mask, kw, seed=3)
        assert torch.equal(our_choice(mode, old, masked_nan_lp, adv, mask, kw, seed=3), clean)
        assert torch.equal(our_choice(mode, old, lp, masked_nan_adv, mask, kw, seed=3), clean)
        assert torch.equal(clean, verl_choice(mode, old, masked_nan_lp, adv, mask, "token-mean", kw, seed=3))
        # the numbers: verl's gradient is NaN at the masked NaN (0 * NaN), ours
        # 0 there (documented in test_policy_loss.py); equal everywhere else
        cfg = config(mode, **kw)
        for lp_, adv_ in ((masked_nan_lp, adv), (lp, masked_nan_adv)):
            lw, gw, _, sw = call(getattr(verl_ca, f"compute_policy_loss_{mode}"), old, lp_, adv_, mask, "token-mean",
                                 cfg, seed=3)  # fmt: skip
            lo, go, _, so = call(getattr(ours, f"compute_policy_loss_{mode}"), old, lp_, adv_, mask, "token-mean",
                                 cfg, seed=3)  # fmt: skip
            assert torch.equal(so, sw)
            torch.testing.assert_close(lo, lw, **TOL[torch.float32])
            torch.testing.assert_close(go[mask], gw[mask], **TOL[torch.float32])
            assert go[~mask].eq(0).all()
        # a NaN at a valid token: the loss is NaN in both; the choice is verl's
        cfg = config(mode, **kw)
        lw, _, _, sw = call(getattr(verl_ca, f"compute_policy_loss_{mode}"), old, valid_nan, adv, mask, "token-mean",
                            cfg, seed=3)  # fmt: skip
        lo, _, _, so = call(getattr(ours, f"compute_policy_loss_{mode}"), old, valid_nan, adv, mask, "token-mean",
                            cfg, seed=3)  # fmt: skip
        assert lw.isnan() and lo.isnan() and torch.equal(so, sw)
        picks = our_choice(mode, old, valid_nan, adv, mask, kw, seed=3)
        assert int(picks.sum()) == (0 if mode == "clip_cov" else max(1, int(int(mask.sum()) * KL["kl_cov_ratio"])))


def test_public_api_chooses_unless_picks_are_given(device):
    """``luspo_rs.policy_loss`` chooses when ``picks`` is None; explicit
    ``picks`` are used as given, without a draw."""
    old, lp, adv, mask = data(seed=14, device=device)
    torch.manual_seed(1)
    loss, metrics = luspo_rs.policy_loss(old, lp, adv, mask, mode="clip_cov", **CLIP, **MANY)
    chosen = our_choice("clip_cov", old, lp, adv, mask, MANY, seed=1)
    assert metrics["pg_clipfrac"].item() == pytest.approx(chosen.sum().item() / mask.sum().item())
    torch.manual_seed(1)
    before = torch.get_rng_state()
    loss2, _ = luspo_rs.policy_loss(old, lp, adv, mask, mode="clip_cov", picks=chosen, **CLIP, **MANY)
    assert torch.equal(torch.get_rng_state(), before)
    assert loss2.item() == loss.item()


@pytest.mark.parametrize("mode", ["clip_cov", "kl_cov"])
def test_bad_knobs_and_inputs_are_clear_errors(mode):
    old, lp, adv, mask = data(seed=15)
    name = f"{mode}_ratio"
    run = lambda **kw: luspo_rs.policy_loss(old, lp, adv, mask, mode=mode, **kw)  # noqa: E731
    for bad in (0.0, -0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match=name):
            run(**{name: bad})
    with pytest.raises(TypeError, match=name):
        run(**{name: "0.1"})
    # verl asserts these too (its drop-in raises AssertionError, ours ValueError)
    with pytest.raises(AssertionError):
        verl_ca.get_policy_loss_fn(mode)(old, lp, adv, mask, config=config(mode, **{name: 0.0}))
    with pytest.raises(ValueError, match=name):
        getattr(ours, f"compute_policy_loss_{mode}")(old, lp, adv, mask, config=config(mode, **{name: -1.0}))
    if mode == "clip_cov":
        for bound in ("clip_cov_lb", "clip_cov_ub"):
            with pytest.raises(ValueError, match=bound):
                run(**{bound: float("nan")})
        # verl: int(nan) raises ValueError, int(inf) OverflowError
        for bad in (float("nan"), float("inf")):
            m = mask.float()
            m[0, 0] = bad
            with pytest.raises((ValueError, OverflowError)):
                verl_ca.compute_policy_loss_clip_cov(old, lp, adv, m, config=config(mode))
            with pytest.raises(ValueError, match="response_mask"):
                luspo_rs.policy_loss(old, lp, adv, m, mode=mode)
    else:
        with pytest.raises(ValueError, match="kl_cov_ratio"):
            run(kl_cov_ratio=2.0)
    # shapes torch would refuse without naming the argument
    with pytest.raises(ValueError, match="log_prob"):
        luspo_rs.policy_loss(old[0], lp[0], adv[0], mask[0], mode=mode)
    with pytest.raises(ValueError, match="response_mask"):
        luspo_rs.policy_loss(old, lp, adv, mask[:, :-1], mode=mode)
    with pytest.raises(ValueError, match="old_log_prob"):
        luspo_rs.policy_loss(old[:-1], lp, adv, mask, mode=mode)
    with pytest.raises(ValueError, match="advantages"):
        luspo_rs.policy_loss(old, lp, adv[:, :3], mask, mode=mode)
    with pytest.raises(ValueError, match="log_prob"):
        luspo_rs.policy_loss(old[:0], lp[:0], adv[:0], mask[:0], mode=mode)
    with pytest.raises(TypeError, match="old_log_prob"):
        luspo_rs.policy_loss(old.long(), lp, adv, mask, mode=mode)
    with pytest.raises(TypeError, match="advantages"):
        luspo_rs.policy_loss(old, lp, adv.to(torch.complex64), mask, mode=mode)


def test_choose_tokens_refuses_other_modes():
    old, lp, adv, mask = data(seed=16)
    with pytest.raises(ValueError, match="mode"):
        choose_tokens("vanilla", old, lp, adv, mask, clip_ratio=0.2)


# --------------------------------------------------------------------------- bypass mode


def bypass_config(**rollout_correction):
    return ActorConfig(
        strategy="fsdp", ppo_micro_batch_size_per_gpu=1, rollout_n=1, **CLIP,
        policy_loss=PolicyLossConfig(loss_mode="bypass_mode",
                                     rollout_correction=RolloutCorrectionConfig(**rollout_correction)),
    )  # fmt: skip


CORRECTIONS = {
    "is_token": dict(rollout_is="token", rollout_is_threshold=1.5),
    "is_sequence_normalised": dict(rollout_is="sequence", rollout_is_threshold=3.0, rollout_is_batch_normalize=True),
    "icepop_and_token_rs": dict(rollout_is="token", rollout_is_threshold="0.8_1.25", rollout_rs="token_k1",
                                rollout_rs_threshold="0.7_1.4"),
    "seq_rs_only": dict(rollout_is=None, rollout_rs="seq_mean_k3", rollout_rs_threshold=0.02),
}  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("correction", CORRECTIONS)
@pytest.mark.parametrize("loss_type", ["reinforce", "ppo_clip"])
def test_bypass_mode_matches_verl(loss_type, correction, dtype, device):
    old, lp, adv, mask = data(dtype, seed=21, spread=0.3, device=device)
    cfg = bypass_config(loss_type=loss_type, **CORRECTIONS[correction])
    for agg in ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean"):
        ignored = torch.full(lp.shape, 7.0, dtype=dtype, device=lp.device)  # both ignore rollout_is_weights
        lw, gw, mw, _ = call(verl_ca.compute_policy_loss_bypass_mode, old, lp, adv, mask, agg, cfg, ignored)
        lo, go, mo, _ = call(ours.compute_policy_loss_bypass_mode, old, lp, adv, mask, agg, cfg, ignored)
        assert lo.dtype == lw.dtype
        torch.testing.assert_close(lo.cpu(), lw.cpu(), **TOL[dtype])
        torch.testing.assert_close(go.cpu(), gw.cpu(), **TOL[dtype])
        assert set(mo) == set(mw) | LEN_KEYS
        assert any(k.startswith("rollout_corr/") for k in mw)
        for k, v in mw.items():
            if k.startswith("rollout_corr/"):
                assert mo[k] == v, k  # verl's own numbers, computed by verl's helper
            else:
                assert mo[k] == pytest.approx(v, rel=METRIC_TOL[dtype], abs=1e-9), k


def test_bypass_mode_is_sensitive_to_the_correction():
    """The parity above can fail: the IS weights (reinforce) and the
    rejection mask (both loss types) change the numbers."""
    old, lp, adv, mask = data(seed=22, spread=0.3)
    for loss_type in ("reinforce", "ppo_clip"):
        plain = bypass_config(loss_type=loss_type, rollout_is=None)
        rs = bypass_config(loss_type=loss_type, rollout_is="token", rollout_rs="token_k1",
                           rollout_rs_threshold="0.8_1.25")
        _, gp, _, _ = call(ours.compute_policy_loss_bypass_mode, old, lp, adv, mask, "token-mean", plain)
        _, gr, _, _ = call(ours.compute_policy_loss_bypass_mode, old, lp, adv, mask, "token-mean", rs)
        assert not torch.allclose(gp, gr)
        if loss_type == "reinforce":
            tis = bypass_config(loss_type=loss_type, rollout_is="token", rollout_is_threshold=1.1)
            _, gt, _, _ = call(ours.compute_policy_loss_bypass_mode, old, lp, adv, mask, "token-mean", tis)
            assert not torch.allclose(gp, gt)


def test_bypass_mode_errors_as_verl():
    old, lp, adv, mask = data(seed=23)
    no_rc = ActorConfig(strategy="fsdp", ppo_micro_batch_size_per_gpu=1, rollout_n=1, **CLIP,
                        policy_loss=PolicyLossConfig(loss_mode="bypass_mode", rollout_correction=None))  # fmt: skip
    bad_type = bypass_config(loss_type="ppo")
    for cfg, match in ((no_rc, "rollout_correction"), (bad_type, "loss_type")):
        with pytest.raises(ValueError):
            verl_ca.compute_policy_loss_bypass_mode(old, lp, adv, mask, config=cfg)
        with pytest.raises(ValueError, match=match):
            ours.compute_policy_loss_bypass_mode(old, lp, adv, mask, config=cfg)
    with pytest.raises(AssertionError):
        verl_ca.compute_policy_loss_bypass_mode(old, lp, adv, mask, config=None)
    with pytest.raises(ValueError, match="config"):
        ours.compute_policy_loss_bypass_mode(old, lp, adv, mask, config=None)
    # verl's helper's own errors come through unchanged
    for fn in (verl_ca.compute_policy_loss_bypass_mode, ours.compute_policy_loss_bypass_mode):
        with pytest.raises(ValueError, match="at least one valid token"):
            fn(old, lp, adv, torch.zeros_like(mask), config=bypass_config())


@pytest.mark.parametrize("name", ["compute_policy_loss_clip_cov", "compute_policy_loss_kl_cov",
                                  "compute_policy_loss_bypass_mode"])  # fmt: skip
def test_signature_matches_verl(name):
    sig = lambda fn: [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]  # noqa: E731
    assert sig(getattr(ours, name)) == sig(getattr(verl_ca, name))
    registered = {"compute_policy_loss_clip_cov": "clip_cov", "compute_policy_loss_kl_cov": "kl_cov",
                  "compute_policy_loss_bypass_mode": "bypass_mode"}[name]  # fmt: skip
    assert ours.POLICY_LOSSES[registered] is getattr(ours, name)


def test_take_over_gives_verls_numbers_through_verls_registry():
    """After ``take_over()``, verl's registry entries (and module attributes)
    for clip_cov, kl_cov and bypass_mode are ours, and give the numbers and
    the generator state verl's own gave for the same seed."""
    code = textwrap.dedent(
        """
        import torch
        from verl.trainer.ppo import core_algos as ca
        from verl.trainer.config.algorithm import RolloutCorrectionConfig
        from verl.workers.config import ActorConfig, PolicyLossConfig
        g = torch.Generator().manual_seed(0)
        B, T = 10, 30
        old = -torch.rand(B, T, generator=g) * 3
        lp = old + 0.6 * torch.randn(B, T, generator=g)
        adv = torch.randn(B, T, generator=g)
        mask = torch.arange(T)[None, :] < torch.randint(1, T + 1, (B,), generator=g)[:, None]
        def cfg(mode, **kw):
            return ActorConfig(strategy="fsdp", clip_ratio=0.2, ppo_micro_batch_size_per_gpu=1, rollout_n=1,
                               policy_loss=PolicyLossConfig(loss_mode=mode, **kw))
        cases = {
            "clip_cov": cfg("clip_cov", clip_cov_ratio=0.03, clip_cov_lb=0.0, clip_cov_ub=5.0),
            "kl_cov": cfg("kl_cov", kl_cov_ratio=0.1, ppo_kl_coef=2.0),
            "bypass_mode": cfg("bypass_mode", rollout_correction=RolloutCorrectionConfig(
                loss_type="reinforce", rollout_is="token", rollout_rs="token_k1", rollout_rs_threshold="0.7_1.4")),
        }
        def run(name):
            torch.manual_seed(5)
            x = lp.clone().requires_grad_()
            loss, metrics = ca.get_policy_loss_fn(name)(old, x, adv, mask, loss_agg_mode="token-mean",
                                                        config=cases[name])
            state = torch.get_rng_state()
            loss.backward()
            return loss.detach(), x.grad, metrics, state
        want = {n: run(n) for n in cases}
        import luspo_rs.core_algos as ours
        import luspo_rs.verl as plugin
        plugin.take_over()
        for n in cases:
            fn = ca.get_policy_loss_fn(n)
            assert fn is ours.POLICY_LOSSES[n], n
            assert getattr(ca, fn.__name__) is fn, n
            loss, grad, metrics, state = run(n)
            wl, wg, wm, ws = want[n]
            torch.testing.assert_close(loss, wl, atol=1e-6, rtol=1e-5)
            torch.testing.assert_close(grad, wg, atol=1e-6, rtol=1e-5)
            assert torch.equal(state, ws), n
            assert set(wm) <= set(metrics), n
            for k, v in wm.items():
                assert abs(metrics[k] - v) <= 1e-6 + 1e-5 * abs(v), (n, k)
        plugin.restore()
        assert ca.get_policy_loss_fn("bypass_mode").__module__ == "verl.trainer.ppo.core_algos"
        print("OK")
        """
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("OK"), r.stderr


def test_bypass_mode_without_verl_says_what_is_missing():
    """core_algos imports without verl; only calling bypass_mode needs it."""
    code = textwrap.dedent(
        """
        import sys
        sys.modules["verl"] = None  # makes `import verl...` raise ImportError
        import torch
        from luspo_rs import core_algos
        cfg = {"policy_loss": {"rollout_correction": {"loss_type": "reinforce"}}}
        x = torch.zeros(2, 3)
        try:
            core_algos.compute_policy_loss_bypass_mode(x, x, x, torch.ones(2, 3), config=cfg)
        except ImportError as e:
            assert "rollout correction" in str(e) and "verl==0.9.1" in str(e), e
            print("OK")
        """
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "OK", r.stderr
