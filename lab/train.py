"""Warm start and RL. The lab computes no loss of its own for RL: advantages come
from ``luspo_rs.advantage(..., "grpo")`` and the policy loss, its gradient and
its metrics from ``luspo_rs.policy_loss``."""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import numpy as np
import torch

import luspo_rs

from .policy import Policy, response_mask
from .task import EOS, Task, demonstration, parse, reward

#: the three losses, each with verl's aggregation for it (LUSPO's is fixed by the
#: library: seq-mean-token-sum whatever is passed; we pass that name explicitly)
#: and the clip bounds it takes from the config: GRPO clips its token ratio
#: (verl's token-level bounds), GSPO and LUSPO their sequence ratio (the GSPO
#: paper's bounds)
LOSSES = {
    "grpo": dict(mode="vanilla", loss_agg_mode="token-mean", clip="token"),
    "gspo": dict(mode="gspo", loss_agg_mode="seq-mean-token-mean", clip="sequence"),
    "luspo": dict(mode="luspo", loss_agg_mode="seq-mean-token-sum", clip="sequence"),
}


@dataclass
class Config:
    task: Task = field(default_factory=Task)
    # policy
    d: int = 64
    layers: int = 2
    heads: int = 4
    # supervised warm start on mixed demonstrations
    warm_steps: int = 600
    warm_batch: int = 128
    warm_lr: float = 2e-3
    warm_steps_share: float = 0.5  # share of demonstrations that write the steps
    warm_partial: bool = False  # those write k of the n - 1 steps, k uniform in 1..n-1 (else all)
    # RL: the same for every loss
    rl_steps: int = 150
    prompts: int = 16  # prompts per batch
    group: int = 8  # responses per prompt
    lr: float = 3e-4
    epochs: int = 2  # passes over each batch
    minibatches: int = 2  # optimiser steps per pass
    # clip bounds (low, high): the sequence ratio's in GSPO and LUSPO (the GSPO
    # paper's 3e-4 / 4e-4), the token ratio's in GRPO (verl's clip_ratio_low 0.2
    # and the clip-higher 0.28 verl's recipes use)
    clip_low: float = 3e-4
    clip_high: float = 4e-4
    token_clip_low: float = 0.2
    token_clip_high: float = 0.28
    grad_clip: float = 1.0

    def clip_bounds(self, loss: str) -> tuple[float, float]:
        """``(clip_ratio_low, clip_ratio_high)`` for the named loss."""
        if LOSSES[loss]["clip"] == "token":
            return self.token_clip_low, self.token_clip_high
        return self.clip_low, self.clip_high

    def as_dict(self) -> dict:
        d = asdict(self)
        d["task"] = asdict(self.task)
        return d


def new_policy(cfg: Config) -> Policy:
    return Policy(cfg.task.prompt_len + cfg.task.cap, d=cfg.d, layers=cfg.layers, heads=cfg.heads)


def warm_start(cfg: Config, seed: int, on_step: Optional[Callable[[], None]] = None) -> dict:
    """Cross-entropy on demonstrations, each writing its steps with probability
    ``warm_steps_share`` (all of them, or with ``warm_partial`` the first k, k
    uniform in 1..n-1), else answering at once. Returns the state dict."""
    torch.manual_seed(seed)
    rng = np.random.default_rng([seed, 0])
    task = cfg.task
    policy = new_policy(cfg)
    opt = torch.optim.Adam(policy.parameters(), lr=cfg.warm_lr)
    for _ in range(cfg.warm_steps):
        problems = task.sample(rng, cfg.warm_batch)
        write = rng.random(cfg.warm_batch) < cfg.warm_steps_share
        if cfg.warm_partial:
            k = [int(rng.integers(1, len(p))) if w else 0 for p, w in zip(problems, write)]
        else:
            k = [bool(w) for w in write]
        resp = task.pad_responses([demonstration(p, s) for p, s in zip(problems, k)])
        logp = policy.log_probs(task.encode_prompts(problems), resp)
        mask = response_mask(resp)
        loss = -(logp * mask).sum() / mask.sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if on_step is not None:
            on_step()
    return {k: v.detach().clone() for k, v in policy.state_dict().items()}


def _batch_stats(problems, responses: torch.Tensor, mask: torch.Tensor, rewards: np.ndarray) -> dict:
    lengths = mask.sum(1).numpy()
    parsed = [parse(r.tolist()) for r in responses]
    ok = np.array([p is not None for p in parsed])
    nsteps = np.array([p[1] if p is not None else -1 for p in parsed])
    direct = nsteps == 0
    stepped = nsteps > 0
    correct = rewards > 0.5

    def mean(x, where):
        return float(x[where].mean()) if where.any() else float("nan")

    return dict(
        accuracy=float(rewards.mean()),
        mean_length=float(lengths.mean()),
        # 1.0: every step written out (the long demonstration, n + 2 tokens); 3/(n+2): the answer at once
        relative_length=float(np.mean(lengths / (np.array([len(p) for p in problems]) + 2))),
        malformed=float((~ok).mean()),
        truncated=float((~(responses == EOS).any(1)).float().mean()),
        direct_share=float(direct.mean()),
        direct_accuracy=mean(correct, direct),
        steps_accuracy=mean(correct, stepped),
        mean_steps=mean(nsteps.astype(float), ok),
        length_correct=mean(lengths, correct),
        length_wrong=mean(lengths, ~correct),
        mean_digits=float(np.mean([len(p) for p in problems])),
    )


def _mean(values: list[float]) -> float:
    """Mean over the optimiser steps of a batch, skipping NaN (a length diagnostic
    is NaN in a minibatch whose responses all have one length)."""
    v = [x for x in values if not math.isnan(x)]
    return sum(v) / len(v) if v else math.nan


def _scalars(metrics: dict):
    """``(name, float)`` for each metric: a scalar as it is, a tensor of several
    values element by element (``name_0``, ``name_1``, ...)."""
    for key, val in metrics.items():
        t = torch.as_tensor(val).detach().reshape(-1).double()
        if t.numel() == 1:
            yield key, float(t[0])
        else:
            yield from ((f"{key}_{i}", float(x)) for i, x in enumerate(t.tolist()))


def rl_run(
    cfg: Config,
    loss: str,
    seed: int,
    init_state: dict,
    on_step: Optional[Callable[[dict], None]] = None,
) -> list[dict]:
    """RL from ``init_state`` with the named loss; one row of metrics per step.

    Each step samples ``group`` responses for each of ``prompts`` prompts with the
    current policy (whose log-probs are ``old_log_prob``), scores them, takes
    GRPO advantages, then makes ``epochs * minibatches`` optimiser steps on
    ``luspo_rs.policy_loss`` (with its length diagnostics on); every metric it
    returns is logged, averaged over those steps. The prompt stream and the sampling seed depend on
    ``seed`` only, so the three losses of a seed see the same prompts.
    """
    spec = LOSSES[loss]
    clip_low, clip_high = cfg.clip_bounds(loss)
    task = cfg.task
    torch.manual_seed(seed)
    policy = new_policy(cfg)
    policy.load_state_dict(init_state)
    opt = torch.optim.Adam(policy.parameters(), lr=cfg.lr)
    rng = np.random.default_rng([seed, 1])
    gen = torch.Generator().manual_seed(seed * 7919 + 1)
    perm_gen = torch.Generator().manual_seed(seed * 7919 + 2)
    B = cfg.prompts * cfg.group
    rows = []
    for step in range(cfg.rl_steps):
        t0 = time.perf_counter()
        base = task.sample(rng, cfg.prompts)
        problems = [p for p in base for _ in range(cfg.group)]
        prompts = task.encode_prompts(problems)
        policy.eval()
        responses = policy.sample(prompts, task.cap, gen)
        mask = response_mask(responses)
        with torch.no_grad():
            logits = policy.response_logits(prompts, responses)
            logp_all = torch.log_softmax(logits, -1)
            p_all = logp_all.exp()
            entropy = -(p_all * logp_all.masked_fill(p_all == 0, 0.0)).sum(-1)
            old_log_prob = policy.log_probs(prompts, responses)
        rewards = np.array([reward(p, r.tolist()) for p, r in zip(problems, responses)])
        # verl's convention: the sequence reward sits on the last valid token
        token_rewards = torch.zeros(responses.shape)
        last = mask.sum(1).long() - 1
        token_rewards[torch.arange(B), last] = torch.from_numpy(rewards).float()
        index = np.repeat(np.arange(cfg.prompts), cfg.group)
        adv = luspo_rs.advantage(token_rewards, mask, index, "grpo")

        row = dict(loss=loss, seed=seed, step=step)
        row.update(_batch_stats(problems, responses, mask, rewards))
        row["entropy"] = float((entropy * mask).sum() / mask.sum())
        row["adv_abs_mean"] = float((adv.abs() * mask).sum() / mask.sum())

        policy.train()
        acc: dict[str, list[float]] = {}
        mb = B // cfg.minibatches
        for _ in range(cfg.epochs):
            order = torch.randperm(B, generator=perm_gen)
            for k in range(cfg.minibatches):
                idx = order[k * mb : (k + 1) * mb]
                log_prob = policy.log_probs(prompts[idx], responses[idx])
                pg_loss, metrics = luspo_rs.policy_loss(
                    old_log_prob[idx], log_prob, adv[idx], mask[idx],
                    mode=spec["mode"], loss_agg_mode=spec["loss_agg_mode"],
                    clip_ratio_low=clip_low, clip_ratio_high=clip_high,
                    diagnostics=True,  # the length-bias metrics (len_*), computed in the same pass
                )
                opt.zero_grad()
                pg_loss.backward()
                gn = torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.grad_clip)
                opt.step()
                acc.setdefault("pg_loss", []).append(float(pg_loss.detach()))
                acc.setdefault("grad_norm", []).append(float(gn))
                # every metric the library returns, whatever it is named
                for key, val in _scalars(metrics):
                    acc.setdefault(key, []).append(val)
        row.update({k: _mean(v) for k, v in acc.items()})
        row["step_seconds"] = time.perf_counter() - t0
        rows.append(row)
        if on_step is not None:
            on_step(row)
    return rows
