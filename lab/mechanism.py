"""The mechanism lab: a tabular stop-policy, where response length is the only
thing a policy can learn, trained by GRPO, GSPO and LUSPO through the library.

The policy has one stop logit per position, ``theta_t`` (t = 0 .. cap-1). A
response is a run of CONTINUE tokens closed by one STOP token: at position t
it stops with probability ``sigmoid(theta_t)``; a response that never stops is
cut at the cap (its ``cap`` tokens are all CONTINUE). Its length ``L`` counts
the STOP token. Every ``theta_t`` starts at ``logit(p_stop)``, so with
``p_stop = 0.1`` and a cap of 40 the mean length starts at
``(1 - 0.9**40) / 0.1 = 9.85``.

A batch is ``prompts`` groups of ``group`` responses (the groups are GRPO's;
the prompts share the one table). Each response earns a reward of 1 with
probability ``p(L)``, given by the reward family:

* ``neutral``: ``p(L) = 0.5``: length earns nothing, any drift is the loss's;
* ``saturating``: ``p(L) = 0.8 (1 - exp(-L / 8))``: longer is better, with
  diminishing returns.

One RL step samples a batch with the current table (its log-probs are
``old_log_prob``), takes ``luspo_rs.advantage(..., "grpo")``, then makes
``epochs x minibatches`` Adam steps on ``luspo_rs.policy_loss`` with the given
clip bounds. The lab has no loss formula: the loss, its gradient and its
metrics all come from the library (its length diagnostics on). From the gradient
the library returns the lab reads which tokens were clipped, split by the sign
of the advantage and by length (:func:`_grad_stats`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

import luspo_rs

from .train import _mean, _scalars

#: the three losses, as in the transformer lab (LUSPO's aggregation is fixed
#: by the library; the name is passed explicitly)
LOSSES = {
    "grpo": dict(mode="vanilla", loss_agg_mode="token-mean"),
    "gspo": dict(mode="gspo", loss_agg_mode="seq-mean-token-mean"),
    "luspo": dict(mode="luspo", loss_agg_mode="seq-mean-token-sum"),
}

#: reward families: the probability of a reward of 1 for a response of length L
REWARDS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "neutral": lambda L: np.full(L.shape, 0.5),
    "saturating": lambda L: 0.8 * (1.0 - np.exp(-L / 8.0)),
}
REWARD_TEXT = {"neutral": "length-neutral, p(right) = 0.5",
               "saturating": "saturating in length, p(right) = 0.8 (1 - exp(-L/8))"}

#: clip settings (clip_ratio_low, clip_ratio_high), each applied to all three
#: losses: to the token ratio in GRPO, to the sequence ratio in GSPO and LUSPO.
#: "paper" is the GSPO paper's sequence-level clip, which the LUSPO paper names
#: as the cause of GSPO's length shrinkage; the rest are its ablation.
CLIPS = {
    "paper": (3e-4, 4e-4),
    "symmetric-low": (3e-4, 3e-4),
    "symmetric-high": (4e-4, 4e-4),
    "reversed": (4e-4, 3e-4),
    "loose": (0.2, 0.2),
}


@dataclass
class MechConfig:
    cap: int = 40
    p_stop: float = 0.1
    prompts: int = 16
    group: int = 8
    lr: float = 1e-2
    epochs: int = 2
    minibatches: int = 2
    steps: int = 200

    def as_dict(self) -> dict:
        return asdict(self)


def initial_mean_length(cfg: MechConfig) -> float:
    """The exact mean length of the initial policy: ``sum_{t<cap} (1-p)^t``."""
    return (1.0 - (1.0 - cfg.p_stop) ** cfg.cap) / cfg.p_stop


class StopPolicy(torch.nn.Module):
    """One stop logit per position."""

    def __init__(self, cap: int, p_stop: float):
        super().__init__()
        self.theta = torch.nn.Parameter(torch.full((cap,), math.log(p_stop / (1.0 - p_stop))))

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` responses: their lengths (long, 1..cap) and whether each closed
        with STOP (False: cut at the cap, all CONTINUE)."""
        cap = self.theta.shape[0]
        stop = torch.rand(n, cap, generator=generator, dtype=torch.float64) < torch.sigmoid(self.theta.double())
        stopped = stop.any(1)
        lengths = torch.where(stopped, stop.int().argmax(1) + 1, torch.full((n,), cap))
        return lengths, stopped

    def log_probs(self, lengths: torch.Tensor, stopped: torch.Tensor) -> torch.Tensor:
        """``(n, cap)`` log-probability of each token: STOP at ``L - 1`` where
        the response stopped, CONTINUE everywhere else (positions past the end
        are masked out by the caller)."""
        pos = torch.arange(self.theta.shape[0])
        is_stop = (pos[None, :] == lengths[:, None] - 1) & stopped[:, None]
        return torch.where(is_stop, F.logsigmoid(self.theta), F.logsigmoid(-self.theta))

    def mean_length(self) -> float:
        """The exact mean length of the current policy: ``sum_t P(reach t)``."""
        with torch.no_grad():
            cont = torch.sigmoid(-self.theta.double())
            survive = torch.cat([torch.ones(1, dtype=torch.float64), torch.cumprod(cont, 0)[:-1]])
            return float(survive.sum())


def response_mask(lengths: torch.Tensor, cap: int) -> torch.Tensor:
    """``(n, cap)`` float mask: 1 on each response's ``L`` tokens."""
    return (torch.arange(cap)[None, :] < lengths[:, None]).float()


def _grad_stats(g: torch.Tensor, adv: torch.Tensor, lengths: torch.Tensor, stopped: torch.Tensor) -> dict:
    """Which tokens the clip removed, read off the library's gradient ``g = d
    loss / d log_prob``: a valid token with a nonzero advantage whose gradient
    is exactly 0 was clipped. ``clip_pos`` / ``clip_neg``: the share of the
    valid tokens of the rows with a positive / negative advantage that were
    clipped; ``clip_<long|short>_<pos|neg>`` the same within the long / short
    rows (long: ``L > mean L``, as in the library's ``len_*`` diagnostics);
    ``clip_stop`` / ``clip_continue``: the share of the STOP / CONTINUE tokens
    (with a nonzero advantage) that were clipped. GSPO and LUSPO clip a whole
    row or none of it; GRPO clips token by token."""
    g = g.numpy()
    L = lengths.numpy().astype(np.float64)
    a = adv[:, 0].numpy()
    mask = np.arange(g.shape[1])[None, :] < L[:, None]
    zero = ((g == 0) & mask).sum(1)  # clipped tokens per row
    long = L > L.mean()
    out = {}
    for lname, lsel in (("", np.ones_like(long)), ("long_", long), ("short_", ~long)):
        for sname, ssel in (("pos", a > 0), ("neg", a < 0)):
            rows = lsel & ssel
            n = L[rows].sum()
            out[f"clip_{lname}{sname}"] = float(zero[rows].sum() / n) if n > 0 else math.nan
    live = mask & (a != 0)[:, None]
    is_stop = (np.arange(g.shape[1])[None, :] == L[:, None] - 1) & stopped.numpy()[:, None]
    for name, sel in (("stop", live & is_stop), ("continue", live & ~is_stop)):
        n = sel.sum()
        out[f"clip_{name}"] = float((sel & (g == 0)).sum() / n) if n > 0 else math.nan
    return out


def run(cfg: MechConfig, loss: str, reward: str, clip_name: str, seed: int) -> list[dict]:
    """One run: ``cfg.steps`` RL steps with the clip bounds ``CLIPS[clip_name]``;
    one row of metrics per step.

    The sampling and reward streams depend on ``seed`` only, so the three losses
    of a seed start from the same draws."""
    spec = LOSSES[loss]
    p_right = REWARDS[reward]
    clip = CLIPS[clip_name]
    torch.manual_seed(seed)
    policy = StopPolicy(cfg.cap, cfg.p_stop)
    opt = torch.optim.Adam(policy.parameters(), lr=cfg.lr)
    gen = torch.Generator().manual_seed(seed * 7919 + 11)
    perm_gen = torch.Generator().manual_seed(seed * 7919 + 12)
    rng = np.random.default_rng([seed, 2])
    B = cfg.prompts * cfg.group
    mb = B // cfg.minibatches
    index = np.repeat(np.arange(cfg.prompts), cfg.group)
    rows = []
    for step in range(cfg.steps):
        lengths, stopped = policy.sample(B, gen)
        mask = response_mask(lengths, cfg.cap)
        with torch.no_grad():
            old_log_prob = policy.log_probs(lengths, stopped)
        Ln = lengths.numpy()
        rewards = (rng.random(B) < p_right(Ln.astype(float))).astype(np.float32)
        token_rewards = torch.zeros(B, cfg.cap)
        token_rewards[torch.arange(B), lengths - 1] = torch.from_numpy(rewards)
        adv = luspo_rs.advantage(token_rewards, mask, index, "grpo")
        row = dict(loss=loss, reward=reward, clip=clip_name, seed=seed, step=step,
                   mean_length=float(Ln.mean()),
                   accuracy=float(rewards.mean()), truncated=float((~stopped).float().mean()))
        acc: dict[str, list[float]] = {}
        for _ in range(cfg.epochs):
            order = torch.randperm(B, generator=perm_gen)
            for k in range(cfg.minibatches):
                idx = order[k * mb:(k + 1) * mb]
                log_prob = policy.log_probs(lengths[idx], stopped[idx])
                log_prob.retain_grad()
                pg_loss, metrics = luspo_rs.policy_loss(
                    old_log_prob[idx], log_prob, adv[idx], mask[idx],
                    mode=spec["mode"], loss_agg_mode=spec["loss_agg_mode"],
                    clip_ratio_low=clip[0], clip_ratio_high=clip[1], diagnostics=True)
                opt.zero_grad()
                pg_loss.backward()
                opt.step()
                for key, val in _scalars(metrics):
                    acc.setdefault(key, []).append(val)
                for key, val in _grad_stats(log_prob.grad, adv[idx], lengths[idx], stopped[idx]).items():
                    acc.setdefault(key, []).append(val)
        row.update({k: _mean(v) for k, v in acc.items()})
        # the exact mean length of the policy after this step's updates
        row["policy_length"] = policy.mean_length()
        rows.append(row)
    return rows


def _job(args) -> list[dict]:
    cfg, loss, reward, clip, seed = args
    return run(cfg, loss, reward, clip, seed)


def run_all(cfg: MechConfig, seeds: list[int], rewards: list[str], clips: list[str],
            losses: Optional[list[str]] = None, jobs: int = 1,
            on_run: Optional[Callable[[str], None]] = None) -> list[dict]:
    """Every (reward, clip, loss, seed) run, in that order, on ``jobs``
    processes (each run is seeded on its own, so the result does not depend
    on ``jobs``); ``on_run`` is called as each run ends."""
    work = [(cfg, loss, reward, clip, seed) for reward in rewards for clip in clips
            for loss in (losses or list(LOSSES)) for seed in seeds]
    done: list[list[dict]] = []
    if jobs <= 1:
        for w in work:
            done.append(_job(w))
            if on_run is not None:
                on_run(f"{w[2]} {w[3]}")
    else:
        import multiprocessing as mp

        ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
        with ctx.Pool(jobs, initializer=_one_thread) as pool:
            for w, rows in zip(work, pool.imap(_job, work, chunksize=1)):
                done.append(rows)
                if on_run is not None:
                    on_run(f"{w[2]} {w[3]}")
    return [r for rows in done for r in rows]


def _one_thread() -> None:
    torch.set_num_threads(1)
