"""The CPU kernels after ``fork()``: a forked child (``os.fork``,
``multiprocessing`` with the fork start method, DataLoader workers) gets
results, never a hang. The parent uses the kernels first, so its thread pool
exists when it forks.

torch's own OpenMP pool does not survive a fork either once the parent has
used it; a child calls ``torch.set_num_threads(1)`` first, as torch's
DataLoader workers do, so that what is tested here is luspo-rs's pool."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import sys
import time

import numpy as np
import pytest
import torch
from conftest import make_batch

import luspo_rs
from luspo_rs import core_algos as ours

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork() on this platform")

TIMEOUT_S = 60


def batch():
    old, lp, adv, mask = make_batch(256, 512, seed=3)
    rewards = torch.zeros(256, 512)
    rewards[:, -1] = torch.rand(256, generator=torch.Generator().manual_seed(1))
    return old, lp, adv, mask, rewards, np.repeat(np.arange(32), 8)


def work(old, lp, adv, mask, rewards, uid):
    """A policy loss and a group advantage, as a trainer's step would run them."""
    x = lp.clone().requires_grad_(True)
    loss, _ = luspo_rs.policy_loss(old, x, adv, mask, mode="gspo")
    loss.backward()
    out, _ = ours.compute_grpo_outcome_advantage(rewards, mask.float(), uid)
    return loss.item(), x.grad.double().sum().item(), out.double().sum().item()


def test_forked_child_computes_what_the_parent_does():
    inputs = batch()
    want = work(*inputs)
    pid = os.fork()
    if pid == 0:  # the child: report through the exit code only
        try:
            torch.set_num_threads(1)
            code = 0 if work(*inputs) == want else 3
        except BaseException:
            code = 4
        os._exit(code)
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, f"child status {status}"
            return
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    pytest.fail(f"the forked child did not finish in {TIMEOUT_S} s")


def _child(q, inputs):
    torch.set_num_threads(1)
    q.put(work(*inputs))


@pytest.mark.skipif(sys.platform != "linux", reason="the fork start method is Linux's default only")
def test_multiprocessing_fork_workers():
    inputs = batch()
    want = work(*inputs)
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    procs = [ctx.Process(target=_child, args=(q, inputs)) for _ in range(2)]
    for p in procs:
        p.start()
    try:
        got = [q.get(timeout=TIMEOUT_S) for _ in procs]
        for p in procs:
            p.join(TIMEOUT_S)
            assert p.exitcode == 0
    finally:
        for p in procs:  # a hung worker is killed, not left behind
            if p.is_alive():
                p.kill()
                p.join()
    assert got == [want, want]
