"""Shared helpers: verl's reference (the installed package, pinned in the
Makefile) and synthetic rollout batches."""

from __future__ import annotations

import ast
import atexit
import os
import shutil
import tempfile
import typing
import zlib
from pathlib import Path

# torch.compile's caches key a graph that calls one of our custom ops by the
# graph, not by the op's autograd formula or fake kernel: a cache left by an
# older build would replay that build's backward. The compile tests get a
# cache of their own run.
_inductor_cache = tempfile.mkdtemp(prefix="luspo_rs_test_inductor_")
os.environ["TORCHINDUCTOR_CACHE_DIR"] = _inductor_cache
atexit.register(shutil.rmtree, _inductor_cache, ignore_errors=True)

import pytest  # noqa: E402
import torch  # noqa: E402

verl_core_algos = pytest.importorskip(
    "verl.trainer.ppo.core_algos", reason="verl==0.9.1 is installed by `make test`; run through make"
)
from verl.workers.config import ActorConfig  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "slow: builds wheels or virtualenvs (tens of seconds); part of `make test`, skip with -m 'not slow'"
    )


MODES = ["vanilla", "gspo", "luspo"]
AGG_MODES = ["token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"]


def verl_config(clip_ratio=0.2, clip_ratio_low=None, clip_ratio_high=None, clip_ratio_c=3.0, **global_batch_info):
    cfg = ActorConfig(
        strategy="fsdp",
        clip_ratio=clip_ratio,
        clip_ratio_low=clip_ratio_low,
        clip_ratio_high=clip_ratio_high,
        clip_ratio_c=clip_ratio_c,
        ppo_micro_batch_size_per_gpu=1,
        rollout_n=1,
    )
    cfg.global_batch_info.update({k: v for k, v in global_batch_info.items() if v is not None})
    return cfg


def verl_reference(mode, old, lp, adv, mask, loss_agg_mode, weights=None, **cfg_kwargs):
    """verl's own loss, gradient w.r.t. log_prob and metrics.

    LUSPO is not in verl 0.9.1; its reference is built from verl's own
    pieces: the GSPO per-token loss aggregated ``seq-mean-token-sum``.
    """
    cfg = verl_config(**cfg_kwargs)
    x = lp.detach().clone().requires_grad_(True)
    if mode == "vanilla":
        fn, agg = verl_core_algos.compute_policy_loss_vanilla, loss_agg_mode
    else:
        fn = verl_core_algos.compute_policy_loss_gspo
        agg = "seq-mean-token-sum" if mode == "luspo" else loss_agg_mode
    loss, metrics = fn(old, x, adv, mask, loss_agg_mode=agg, config=cfg, rollout_is_weights=weights)
    loss.backward()
    return loss.detach(), x.grad, {k.removeprefix("actor/"): v for k, v in metrics.items()}


def make_batch(B, T, *, dtype=torch.float32, spread=0.3, per_seq_adv=False, seed=0, empty_rows=(), full_rows=()):
    """A synthetic rollout batch: right-padded responses of varied length,
    log-ratios of scale ``spread`` (large spread drives ratios far outside
    the clip range), group-like advantages."""
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    lp = old + spread * torch.randn(B, T, generator=g, dtype=torch.float64)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    for i in full_rows:
        lengths[i] = T
    for i in empty_rows:
        lengths[i] = 0
    mask = torch.arange(T)[None, :] < lengths[:, None]
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    adv = adv if per_seq_adv else adv[:, None] + 0.1 * torch.randn(B, T, generator=g, dtype=torch.float64)
    return old.to(dtype), lp.to(dtype), adv.to(dtype), mask


def assert_close(actual, expected, *, dtype, what):
    tol = TOLERANCES[dtype]
    torch.testing.assert_close(
        actual.to(torch.float64), expected.to(torch.float64), equal_nan=True, msg=lambda m: f"{what}: {m}", **tol
    )


# fp32: our per-token math is fp32 like verl's, but sums run in f64 and the
# exp differs from torch's by <= 1 ulp, so loss/gradients agree to a few ulp
# of the largest term: 1e-6 absolute / 1e-5 relative.
# fp64: both sides compute in double; only summation order differs.
TOLERANCES = {
    torch.float32: dict(atol=1e-6, rtol=1e-5),
    torch.float64: dict(atol=1e-12, rtol=1e-10),
}


def stable_seed(*parts) -> int:
    """A seed from test parameters that is the same in every process
    (``hash()`` of strings is salted per interpreter, so it is not)."""
    return zlib.crc32(repr(parts).encode())


def stub_literal(name: str) -> tuple[str, ...]:
    """The strings of ``name = Literal[...]`` in the native module's stubs
    (``luspo_rs/_core.pyi``, next to the module that is imported)."""
    import luspo_rs

    tree = ast.parse(Path(luspo_rs.__file__).with_name("_core.pyi").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and [t.id for t in node.targets if isinstance(t, ast.Name)] == [name]:
            return tuple(ast.literal_eval(e) for e in node.value.slice.elts)
    raise AssertionError(f"_core.pyi has no {name} = Literal[...]")


def check_public_op(op: str, modes_alias: str, modes) -> None:
    """``luspo_rs.<op>`` is the public function of module ``luspo_rs.<op>``
    (not shadowed by the submodule once everything is imported), and its
    mode literal lists ``modes``, as the native stubs do."""
    import importlib
    import sys

    import luspo_rs
    import luspo_rs.core_algos  # noqa: F401  (its imports must leave the public names alone)
    import luspo_rs.functional  # noqa: F401

    fn = getattr(luspo_rs, op)
    assert callable(fn) and fn.__module__ == f"luspo_rs.{op}" and op in luspo_rs.__all__
    module = sys.modules[f"luspo_rs.{op}"]
    assert importlib.import_module(f"luspo_rs.{op}") is module and getattr(module, op) is fn
    alias = getattr(module, modes_alias)
    assert tuple(typing.get_args(alias)) == stub_literal(modes_alias)
    assert sorted(typing.get_args(alias)) == sorted(modes)
