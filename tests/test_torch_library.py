"""The ops registered with ``torch.library`` (issue 18): ``opcheck``, and
``torch.compile(fullgraph=True)`` over a step that calls them gives the eager
values and gradients without a graph break: ``luspo_rs::kl_penalty``,
``policy_loss``, ``value_loss``, ``agg_loss``, and the advantage estimators'
``luspo_rs::advantage`` (group estimators), ``luspo_rs::returns`` (scans) and
``luspo_rs::token_baseline`` (group labels as an integer tensor; verl's uid
strings are host data, a graph break by design)."""

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


@pytest.mark.parametrize("mode", ["clip_cov", "kl_cov"])
def test_cov_modes_compile_fullgraph_given_their_chosen_tokens(mode):
    # Clip-Cov / KL-Cov choose their tokens on the host, as verl does (a draw
    # from torch's CPU generator of a data-dependent count; a CPU topk): the
    # choice is made eagerly (`cov_select.choose_tokens`, what `policy_loss`
    # does when not given `picks`), and the loss given those tokens compiles
    # with fullgraph=True to the eager loss and gradient, bit for bit
    from luspo_rs.cov_select import choose_tokens

    old, lp, adv, mask = make_batch(6, 40, seed=2, spread=0.8)
    ratios = dict(clip_cov_ratio=0.05, clip_cov_lb=-10.0, clip_cov_ub=10.0, kl_cov_ratio=0.05)
    torch.manual_seed(0)
    picks = choose_tokens(mode, old, lp, adv, mask, clip_ratio=0.2, **ratios)
    assert picks is not None and picks.any()
    torch.manual_seed(0)
    want_loss, _ = luspo_rs.policy_loss(old, lp.clone().requires_grad_(), adv, mask, mode=mode, **ratios)

    def step(x):
        return luspo_rs.policy_loss(old, x, adv, mask, mode=mode, picks=picks, **ratios)

    def run(fn):
        x = lp.clone().requires_grad_()
        loss, _ = fn(x)
        (3.0 * loss).backward()
        return loss.detach(), x.grad

    torch._dynamo.reset()
    want = run(step)
    assert torch.equal(want[0], want_loss.detach()), "the same tokens as policy_loss's own choice"
    got = run(torch.compile(step, fullgraph=True))
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
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

# --------------------------------------------------------------------------- advantage

import sys  # noqa: E402

import numpy as np  # noqa: E402
from verl.trainer.config import AlgoConfig  # noqa: E402
from verl.trainer.ppo import core_algos as verl_ca  # noqa: E402

from luspo_rs import _core, _cuda  # noqa: E402
from luspo_rs import core_algos as ours  # noqa: E402
from luspo_rs.advantage import _advantage_op, _returns_op, _token_baseline_op, group_index  # noqa: E402

#: verl's estimator name -> its drop-in's (and verl's) function name, for the compiled steps
ADV_FNS = {
    **{name: f"compute_{name}_outcome_advantage" for name in (
        "grpo", "grpo_vectorized", "rloo", "rloo_vectorized", "reinforce_plus_plus_baseline", "opo", "gpg",
        "grpo_passk", "gdpo", "reinforce_plus_plus", "remax")},
    "gae": "compute_gae_advantage_return",
    "optimal_token_baseline": "compute_optimal_token_baseline_advantage",
    "tir_optimal_token_baseline": "compute_multi_turn_optimal_token_baseline_advantage",
}  # fmt: skip
SCAN_NAMES = ("gae", "reinforce_plus_plus", "remax")
TOKEN_BASELINE_NAMES = ("optimal_token_baseline", "tir_optimal_token_baseline")


def _adv_batch(seed, dtype=torch.float32, mask_dtype=torch.float32, B=12, T=21):
    """Rewards, values, baselines, token-baseline inputs and a mask with
    ragged lengths and an observation span; groups of 3 rows, interleaved,
    as an int64 label tensor (ids 10, 20, ...: not dense)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    lengths[0] = T
    mask = torch.arange(T)[None, :] < lengths[:, None]
    mask[0, 3:6] = False  # an observation span inside a response (multi-turn)
    p = torch.rand(B, T, generator=g, dtype=torch.float64) * 0.9 + 0.05
    return dict(
        rewards=torch.randn(B, T, generator=g, dtype=torch.float64).to(dtype),
        mask=mask.to(mask_dtype),
        values=torch.randn(B, T, generator=g, dtype=torch.float64).to(dtype),
        baselines=torch.randn(B, generator=g, dtype=torch.float64).to(dtype),
        old=p.log().to(dtype),
        sp=(p * p + torch.rand(B, T, generator=g, dtype=torch.float64) * (1 - p) ** 2).to(dtype),
        rho=(torch.rand(B, T, generator=g, dtype=torch.float64) + 0.5).to(dtype),
        index=10 * (torch.randperm(B, generator=g) % (B // 3)) + 10,
        scores=torch.randn(B, 2, generator=g),
    )


def _drop_in(impl, name, b, index, config):
    """The estimator ``name`` through ``impl``'s (verl's or ours) function, with verl's arguments."""
    fn = getattr(impl, ADV_FNS[name])
    r, m = b["rewards"], b["mask"]
    if name == "gae":
        return fn(r, b["values"], m, gamma=0.99, lam=0.95)
    if name == "reinforce_plus_plus":
        return fn(r, m, config=config)
    if name == "remax":
        return fn(r, b["baselines"], m, config=config)
    if name in TOKEN_BASELINE_NAMES:
        return fn(r, m, index, b["old"], b["sp"], b["rho"], True)
    if name == "gpg":
        return fn(r, m, index, f_norm=2.0)
    return fn(r, m, index, epsilon=1e-6, config=config)


#: The op behind each estimator, and its arguments for opcheck.
def _op_case(name, b):
    r, m, idx = b["rewards"], b["mask"], b["index"]
    if name in SCAN_NAMES:
        values = b["values"] if name == "gae" else None
        baselines = b["baselines"] if name == "remax" else None
        return _returns_op, (r, m, values, baselines, name, 0.99, 0.95)
    if name in TOKEN_BASELINE_NAMES:
        return _token_baseline_op, (r, m, idx, b["old"], b["sp"], b["rho"], name, True, 1e-8)
    scores = weights = None
    if name == "gdpo":
        scores, weights = b["scores"], torch.tensor([0.7, 1.3], dtype=torch.float64)
    return _advantage_op, (r, m, idx, scores, weights, name, True, 1e-6, 2.0)


#: (rewards dtype, mask dtype): one and mixed precisions, float / bool / integer masks
ADV_DTYPES = [
    (torch.float32, torch.float32), (torch.float32, torch.bool), (torch.float64, torch.int64),
    (torch.float32, torch.float64), (torch.bfloat16, torch.float32), (torch.bfloat16, torch.bool),
]  # fmt: skip


@pytest.mark.parametrize("dtype, mask_dtype", ADV_DTYPES, ids=str)
@pytest.mark.parametrize("name", sorted(ADV_FNS))
def test_advantage_ops_pass_opcheck(name, dtype, mask_dtype):
    b = _adv_batch(7, dtype, mask_dtype)
    op, args = _op_case(name, b)
    result = opcheck(op, args)
    assert set(result.values()) == {"SUCCESS"}, result
    # the fake kernel's outputs are exactly the eager ones' (shape, dtype, device, strides)
    real = op(*args)
    with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
        fake = op(*(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args))
    for x, y in zip(real if isinstance(real, tuple) else (real,), fake if isinstance(fake, tuple) else (fake,)):
        assert (x.shape, x.dtype, x.device, x.stride()) == (y.shape, y.dtype, y.device, y.stride())


def _eager_and_compiled(step, *args):
    torch._dynamo.reset()
    want = step(*args)
    got = torch.compile(step, fullgraph=True)(*args)
    explained = torch._dynamo.explain(step)(*args)
    assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons
    return got, want


@pytest.mark.parametrize("name", sorted(ADV_FNS))
def test_advantage_drop_ins_compile_fullgraph_to_the_eager_values(name):
    b = _adv_batch(11)
    config = AlgoConfig(gamma=0.99)
    index = b["index"]

    def step(rewards):
        # a step computing advantages from rewards computed in the graph, then using them
        adv, ret = _drop_in(ours, name, {**b, "rewards": rewards * 2.0}, index, config)
        return adv, ret, (adv * b["mask"]).sum()

    got, want = _eager_and_compiled(step, b["rewards"])
    for x, y in zip(got[:2], want[:2]):
        assert x.dtype == y.dtype and torch.equal(x, y), "the same kernels: the same bits"
    # (a reduction Inductor generates: its own summation order)
    torch.testing.assert_close(got[2], want[2], atol=1e-4, rtol=1e-6)
    # and verl's own numbers (its index: the uid labels as a numpy array, as verl passes them)
    verl_out = _drop_in(verl_ca, name, {**b, "rewards": b["rewards"] * 2.0}, index.numpy(), config)
    for x, y in zip(got[:2], verl_out):
        assert x.dtype == y.dtype
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["grpo", "gdpo", "optimal_token_baseline"])
def test_advantage_index_dtypes_compile_fullgraph(name):
    # int32, int16 and bool labels are traced into the graph as eager reads them (group_index)
    b = _adv_batch(12)
    for index in (b["index"].to(torch.int32), b["index"].to(torch.int16), b["index"] > 30):

        def step(rewards, mask, idx):
            kw = dict(old_log_probs=b["old"], sum_pi_squared=b["sp"]) if name in TOKEN_BASELINE_NAMES else {}
            if name == "gdpo":
                kw = dict(reward_scores=b["scores"], reward_weights=[0.5, 2.0])
            return luspo_rs.advantage(rewards, mask, idx, name, with_returns=True, **kw)

        got, want = _eager_and_compiled(step, b["rewards"], b["mask"], index)
        assert all(torch.equal(x, y) for x, y in zip(got, want))


def test_advantage_compiled_with_requires_grad_inputs_builds_no_graph():
    # advantages are data, as verl's (computed under no_grad): inputs that
    # require grad are detached as eagerly, under compile too
    b = _adv_batch(13)
    r, v, old = (b[k].clone().requires_grad_() for k in ("rewards", "values", "old"))

    def step(r, v):
        a1 = luspo_rs.advantage(r, b["mask"], None, "gae", values=v, gamma=0.9, lam=0.8)
        a2 = luspo_rs.advantage(r, b["mask"], b["index"], "grpo")
        a3 = luspo_rs.advantage(r, b["mask"], b["index"], "optimal_token_baseline", old_log_probs=old,
                                sum_pi_squared=b["sp"])  # fmt: skip
        return a1, a2, a3

    got, want = _eager_and_compiled(step, r, v)
    for x, y in zip(got, want):
        assert not x.requires_grad and not y.requires_grad and torch.equal(x, y)


def test_advantage_uid_labels_under_compile_are_a_graph_break_by_design():
    # verl's uid strings (a numpy object array) are host data: a default
    # compile runs the call eagerly (the same numbers); fullgraph=True refuses it
    b = _adv_batch(14)
    uid = np.array([f"uid-{int(i)}" for i in b["index"]], dtype=object)

    def step(rewards):
        return luspo_rs.advantage(rewards, b["mask"], uid, "grpo") * 3.0

    torch._dynamo.reset()
    assert torch.equal(torch.compile(step)(b["rewards"]), step(b["rewards"]))
    torch._dynamo.reset()
    with pytest.raises(Exception, match="numpy"):
        torch.compile(step, fullgraph=True)(b["rewards"])
    # the same labels as an integer tensor: one graph
    ids = group_index(uid)
    got, want = _eager_and_compiled(lambda r: luspo_rs.advantage(r, b["mask"], ids, "grpo") * 3.0, b["rewards"])
    assert torch.equal(got, want) and torch.equal(got, step(b["rewards"]))


def test_advantage_compiled_errors_name_the_argument():
    b = _adv_batch(15)
    torch._dynamo.reset()
    lone = torch.arange(12) * 10 + 5  # grpo_passk: every group needs two rows (verl's ValueError), as eagerly
    for sim in (False, True):  # (host labels on the simulated device too: eager raises there as well)
        _core.sim_set_enabled(sim)
        try:
            torch._dynamo.reset()
            with pytest.raises(ValueError, match=r"index: grpo_passk .* got 1 for group 5 \(row 0\)"):
                step = torch.compile(lambda r: luspo_rs.advantage(r, b["mask"], lone, "grpo_passk"), fullgraph=True)
                step(b["rewards"])
        finally:
            _core.sim_set_enabled(False)
    torch._dynamo.reset()
    with pytest.raises(ValueError, match="token_level_rewards"):
        torch.compile(lambda r: luspo_rs.advantage(r, b["mask"], None, "gae", values=b["values"]),
                      fullgraph=True)(b["rewards"][:, :5])  # fmt: skip
    # checks made while tracing: a default compile raises them as eagerly
    # (with fullgraph=True Dynamo reports them as an "Observed exception" that quotes them)
    torch._dynamo.reset()
    with pytest.raises(ValueError, match="values: the gae estimator needs it"):
        torch.compile(lambda r: luspo_rs.advantage(r, b["mask"], None, "gae"))(b["rewards"])
    with pytest.raises(ValueError, match="index: the grpo estimator needs the group labels"):
        torch.compile(lambda r: luspo_rs.advantage(r, b["mask"], None, "grpo"))(b["rewards"])


def test_advantage_eager_calls_skip_the_dispatcher(monkeypatch):
    # the ops are for compiled graphs: eager calls go straight to the native module
    adv_mod = sys.modules["luspo_rs.advantage"]  # (the package's `advantage` is the function)

    def refuse(*args):
        raise AssertionError("an eager call went through the torch.library op")

    for op in ("_advantage_op", "_returns_op", "_token_baseline_op"):
        monkeypatch.setattr(adv_mod, op, refuse)
    b = _adv_batch(16)
    for name in ADV_FNS:
        _drop_in(ours, name, b, b["index"], AlgoConfig(gamma=0.99))


@pytest.mark.parametrize("name", ["grpo", "gdpo", "gae", "reinforce_plus_plus", "optimal_token_baseline"])
def test_advantage_compiled_on_the_device_path(name, monkeypatch):
    # the CUDA path: on a GPU with CUDA tensors, else on the kernel simulator
    # (LUSPO_RS_CUDA=sim's switch; CPU tensors act as the device), which
    # compiles the real .cu kernels and runs them through the real launchers
    gpu = torch.cuda.is_available()
    b = {k: v.cuda() if gpu else v for k, v in _adv_batch(17, B=15, T=70).items()}
    calls = []
    scratch_len = _core.returns_scratch_len if name in SCAN_NAMES else None
    if scratch_len is None:  # the group kernels' device inputs (labels, order, scratch, stream)
        real = _cuda.advantage_inputs
        monkeypatch.setattr(_cuda, "advantage_inputs", lambda *a: calls.append(1) or real(*a))
    else:
        real_len = _core.returns_scratch_len
        monkeypatch.setattr(_core, "returns_scratch_len", lambda rows: calls.append(1) or real_len(rows))
    config = AlgoConfig(gamma=0.97)

    def step(rewards):
        return _drop_in(ours, name, {**b, "rewards": rewards}, b["index"], config)

    if not gpu:
        _core.sim_set_enabled(True)
    try:
        got, want = _eager_and_compiled(step, b["rewards"])
        assert calls, "the device path ran"
    finally:
        if not gpu:
            _core.sim_set_enabled(False)
        torch._dynamo.reset()
    for x, y in zip(got, want):
        assert torch.equal(x, y)
    host = _drop_in(ours, name, {k: v.cpu() for k, v in b.items()}, b["index"].cpu(), config)  # the CPU kernels
    for x, y in zip(got, host):
        torch.testing.assert_close(x.cpu(), y, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["grpo", "gae", "tir_optimal_token_baseline"])
def test_advantage_compiled_with_dynamic_shapes(name):
    # one graph with symbolic B and T (the fake kernels' shapes), over batches of several sizes
    config = AlgoConfig(gamma=0.99)
    step = lambda b: _drop_in(ours, name, b, b["index"], config)  # noqa: E731
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, dynamic=True)
    for seed, (B, T) in enumerate([(12, 21), (9, 33), (15, 8)]):
        b = _adv_batch(20 + seed, B=B, T=T)
        with torch._dynamo.config.patch(error_on_recompile=seed > 0):
            got = compiled(b)
        want = step(b)
        assert all(x.shape == (B, T) and torch.equal(x, y) for x, y in zip(got, want))


def test_advantage_list_labels_under_compile_break_the_graph_at_the_host_mapping():
    # a list of labels is held by Dynamo: the graph breaks at the host mapping
    # only (the op is still traced), and fullgraph=True says what to pass instead
    b = _adv_batch(18)
    labels = [f"uid-{int(i)}" for i in b["index"]]

    def step(rewards):
        return luspo_rs.advantage(rewards * 2.0, b["mask"], labels, "rloo") + 1.0

    torch._dynamo.reset()
    assert torch.equal(torch.compile(step)(b["rewards"]), step(b["rewards"]))
    explained = torch._dynamo.explain(step)(b["rewards"])
    # (each enclosing frame counts the one break, at the host mapping)
    assert explained.break_reasons and all("mapped to ids on the host" in str(r.reason) for r in explained.break_reasons)
    assert any("torch.ops.luspo_rs.advantage.default" in g.code for g in explained.graphs)
    torch._dynamo.reset()
    with pytest.raises(Exception, match="pass index as an int64 tensor of group ids"):
        torch.compile(step, fullgraph=True)(b["rewards"])


# --------------------------------------------------------------------------- compile caches


def test_every_op_call_under_compile_carries_the_build_tag():
    # torch's compile caches key a graph by its code, not by a custom op's
    # autograd formula or fake kernel: each op call passes `build=BUILD` (a
    # digest of this installation) so a cache left by another build misses
    from luspo_rs._args import BUILD, _build_tag

    assert BUILD == _build_tag() and len(BUILD) == 16 and int(BUILD, 16) >= 0
    old, lp, adv, mask = make_batch(4, 9, seed=7, spread=0.5)
    gid = torch.tensor([0, 0, 1, 1])
    steps = {
        "policy_loss": lambda x: luspo_rs.policy_loss(old, x, adv, mask, mode="luspo")[0],
        "value_loss": lambda x: luspo_rs.value_loss(x, old, adv, mask, cliprange_value=0.5)[0],
        "agg_loss": lambda x: luspo_rs.agg_loss(x, mask),
        "kl_penalty": lambda x: luspo_rs.kl_penalty(x, old, "k3").sum(),
        "advantage": lambda x: luspo_rs.advantage(adv, mask, gid, "grpo").sum() + x.sum(),
        "returns": lambda x: ours.compute_gae_advantage_return(adv, old, mask, 1.0, 0.95)[0].sum() + x.sum(),
        "token_baseline": lambda x: ours.compute_optimal_token_baseline_advantage(
            adv, mask, gid, old_log_probs=old, sum_pi_squared=torch.ones_like(old)
        )[0].sum() + x.sum(),
    }  # fmt: skip
    for name, step in steps.items():
        torch._dynamo.reset()
        explained = torch._dynamo.explain(step)(lp.clone().requires_grad_())
        code = "".join(g.code for g in explained.graphs)
        assert f"luspo_rs.{name}.default" in code, name
        assert f"build = '{BUILD}'" in code, name
