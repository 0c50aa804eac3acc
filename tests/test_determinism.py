"""Same inputs give bitwise the same loss, gradient and metrics: run after
run, and whatever the number of rayon threads."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import pytest
import torch
from conftest import AGG_MODES, MODES, make_batch

import luspo_rs

SCRIPT = r"""
import hashlib, sys, torch, luspo_rs
sys.path.insert(0, {tests!r})
from conftest import make_batch
old, lp, adv, mask = make_batch(257, 301, seed=11, spread=1.0)
h = hashlib.sha256()
for mode in ["vanilla", "gspo", "luspo"]:
    for agg in ["token-mean", "seq-mean-token-mean"]:
        x = lp.clone().requires_grad_()
        loss, metrics = luspo_rs.policy_loss(old, x, adv, mask, mode=mode, loss_agg_mode=agg)
        loss.backward()
        for t in [loss.detach(), x.grad, *metrics.values()]:
            h.update(t.numpy().tobytes())
from value_cases import value_batch
vp, v, r, mask = value_batch(257, 301, seed=11, spread=1.0)
for agg in ["token-mean", "seq-mean-token-mean"]:
    x = vp.clone().requires_grad_()
    loss, clipfrac = luspo_rs.value_loss(x, v, r, mask, 0.2, agg)
    loss.backward()
    for t in [loss.detach(), x.grad, clipfrac]:
        h.update(t.numpy().tobytes())
print(luspo_rs.num_threads(), h.hexdigest())
"""


def digest(threads: int) -> tuple[int, str]:
    env = dict(os.environ, RAYON_NUM_THREADS=str(threads))
    script = SCRIPT.format(tests=os.path.dirname(__file__))
    out = subprocess.run([sys.executable, "-c", script], env=env, check=True, capture_output=True, text=True).stdout
    n, h = out.split()
    return int(n), h


def test_thread_count_does_not_change_a_single_bit():
    n1, h1 = digest(1)
    n3, h3 = digest(3)
    assert (n1, n3) == (1, 3)
    assert h1 == h3


@pytest.mark.parametrize("agg", AGG_MODES)
@pytest.mark.parametrize("mode", MODES)
def test_repeated_calls_are_bitwise_equal(mode, agg):
    old, lp, adv, mask = make_batch(64, 129, seed=12, spread=1.0)
    results = []
    for _ in range(3):
        x = lp.clone().requires_grad_()
        loss, metrics = luspo_rs.policy_loss(old, x, adv, mask, mode=mode, loss_agg_mode=agg)
        loss.backward()
        results.append(hashlib.sha256(b"".join(t.numpy().tobytes() for t in [loss.detach(), x.grad, *metrics.values()])).hexdigest())
    assert len(set(results)) == 1


@pytest.mark.parametrize("agg", AGG_MODES)
def test_repeated_value_loss_calls_are_bitwise_equal(agg):
    from value_cases import value_batch

    vp, v, r, mask = value_batch(64, 129, seed=12, spread=1.0)
    results = []
    for _ in range(3):
        x = vp.clone().requires_grad_()
        loss, clipfrac = luspo_rs.value_loss(x, v, r, mask, 0.2, agg)
        loss.backward()
        results.append(hashlib.sha256(b"".join(t.numpy().tobytes() for t in [loss.detach(), x.grad, clipfrac])).hexdigest())
    assert len(set(results)) == 1
