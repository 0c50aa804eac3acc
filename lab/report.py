"""What a run leaves behind: the CSV of every step, the summary table and the plot.

Every key of a step's row becomes a CSV column (the union over all rows, in the
order first seen), so metrics that ``luspo_rs.policy_loss`` adds later are
logged without a change here, and ``--plot`` can draw any of them.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np

LEAD = ("loss", "seed", "step")
COLOURS = {"grpo": "#1f77b4", "gspo": "#d62728", "luspo": "#2ca02c"}
LABELS = {
    "mean_length": "mean response length (tokens, EOS included)",
    "accuracy": "accuracy (share of rewarded responses)",
    "relative_length": "length / length with every step written (n + 2)",
    "direct_share": "share of responses answering at once",
    "pg_clipfrac": "pg_clipfrac (luspo_rs metric)",
    "len_long_grad_share": "long responses' share of gradient mass / share of tokens\n(luspo_rs len_long_grad_share)",
}


def write_csv(rows: Sequence[dict], path: Path) -> None:
    cols = list(LEAD)
    for r in rows:
        cols += [k for k in r if k not in cols]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, restval="")
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})


def read_csv(path: Path) -> list[dict]:
    rows = []
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            row = {"loss": r["loss"], "seed": int(r["seed"]), "step": int(r["step"])}
            for k, v in r.items():
                if k not in row:
                    try:
                        row[k] = float(v) if v != "" else math.nan
                    except ValueError:
                        row[k] = v
            rows.append(row)
    return rows


def _curves(rows: Sequence[dict], key: str) -> dict[str, dict[int, np.ndarray]]:
    """``{loss: {seed: values by step}}``."""
    out: dict[str, dict[int, list]] = {}
    for r in sorted(rows, key=lambda r: r["step"]):
        out.setdefault(r["loss"], {}).setdefault(r["seed"], []).append(float(r.get(key, math.nan)))
    return {l: {s: np.array(v) for s, v in d.items()} for l, d in out.items()}


def final_values(rows: Sequence[dict], key: str, window: int) -> dict[str, list[float]]:
    """Per loss, one value per seed: the mean of ``key`` over the last ``window`` steps."""
    return {l: [float(np.nanmean(v[-window:])) for _, v in sorted(d.items())] for l, d in _curves(rows, key).items()}


SHORT = {"accuracy": "accuracy", "mean_length": "length", "relative_length": "relative length"}


def summary(rows: Sequence[dict], window: int,
            keys: Iterable[str] = ("accuracy", "mean_length", "relative_length")) -> str:
    """The end-of-run table: per loss and key, the value at the first step and the
    final value (mean over the last ``window`` steps): mean [min, max] over seeds."""
    keys = list(keys)
    losses = list(dict.fromkeys(r["loss"] for r in rows))
    first = {k: final_values([r for r in rows if r["step"] == 0], k, 1) for k in keys}
    final = {k: final_values(rows, k, window) for k in keys}
    nseeds = len({r["seed"] for r in rows})
    steps = max(r["step"] for r in rows) + 1
    w = 30
    head = f"{'loss':<6} " + " ".join(f"{SHORT.get(k, k) + ': start -> final':<{w}}" for k in keys)
    lines = [f"{len(losses)} losses x {nseeds} seeds, {steps} RL steps; final = mean of the last {window} steps; "
             "mean [min, max] over seeds", head, "-" * len(head.rstrip())]
    for l in losses:
        cells = []
        for k in keys:
            s, v = np.mean(first[k][l]), np.array(final[k][l])
            cells.append(f"{f'{s:.3f} -> {v.mean():.3f} [{v.min():.3f}, {v.max():.3f}]':<{w}}")
        lines.append((f"{l:<6} " + " ".join(cells)).rstrip())
    return "\n".join(lines) + "\n"


def _smooth(v: np.ndarray, k: int) -> np.ndarray:
    if k <= 1 or len(v) < k:
        return v
    c = np.cumsum(np.insert(np.nan_to_num(v), 0, 0.0))
    head = c[1:k] / np.arange(1, k)
    return np.concatenate([head, (c[k:] - c[:-k]) / k])


DEFAULT_PLOT = ("mean_length", "relative_length", "accuracy", "len_long_grad_share")


def plot(rows: Sequence[dict], path: Path, keys: Sequence[str] = DEFAULT_PLOT,
         smooth: int = 5, title: Optional[str] = None) -> None:
    """One panel per key against step: per loss, the mean over seeds (line) and the
    range over seeds (shaded), each seed's curve smoothed over ``smooth`` steps."""
    if title is None:
        nseeds = len({r["seed"] for r in rows})
        title = f"{nseeds} seeds per loss; lines: mean over seeds, shading: range ({smooth}-step moving average)"
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ncols = 2 if len(keys) == 4 else min(3, len(keys))
    nrows = -(-len(keys) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.2 * ncols, 3.6 * nrows), squeeze=False)
    for ax in axes.flat[len(keys):]:
        ax.set_visible(False)
    for ax, key in zip(axes.flat, keys):
        for loss, seeds in _curves(rows, key).items():
            n = min(len(v) for v in seeds.values())
            m = np.stack([_smooth(v[:n], smooth) for v in seeds.values()])
            x = np.arange(n)
            c = COLOURS.get(loss)
            ax.plot(x, m.mean(0), color=c, label=f"{loss} ({len(seeds)} seeds)", lw=1.6)
            ax.fill_between(x, m.min(0), m.max(0), color=c, alpha=0.18, lw=0)
        ax.set_xlabel("RL step")
        ax.set_title(LABELS.get(key, key), fontsize=10)
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------- the mechanism lab


def bound(x: float) -> str:
    """A clip bound as people write it: 0.2, 3e-4."""
    return f"{x:g}" if x >= 1e-3 else f"{x:.0e}".replace("e-0", "e-")


def _runs(rows: Sequence[dict], reward: str, clip: str) -> list[dict]:
    return [r for r in rows if r["reward"] == reward and r["clip"] == clip]


def _per_seed(rows: Sequence[dict], key: str, last: bool) -> dict[str, np.ndarray]:
    """Per loss, one value per seed: ``key`` at the last step, or its mean over
    all steps (NaN skipped)."""
    out = {}
    for loss, seeds in _curves(rows, key).items():
        out[loss] = np.array([v[-1] if last else np.nanmean(v) for _, v in sorted(seeds.items())])
    return out


def _separate(ranges: dict[str, np.ndarray], loss: str) -> bool:
    """Whether ``loss``'s seed range is disjoint from every other loss's."""
    lo, hi = ranges[loss].min(), ranges[loss].max()
    return all(hi < v.min() or lo > v.max() for l, v in ranges.items() if l != loss)


def _settings(rows: Sequence[dict], rewards: Sequence[str], clip_names: Sequence[str]):
    """``(reward, clip, its rows, final length per loss and seed)`` for each
    setting that has rows."""
    for reward in rewards:
        for c in clip_names:
            sub = _runs(rows, reward, c)
            if sub:
                yield reward, c, sub, _per_seed(sub, "policy_length", last=True)


def mech_summary(rows: Sequence[dict], start: float, clips: dict[str, tuple[float, float]],
                 header: str) -> str:
    """The mechanism lab's two tables: the final length of each (reward, clip,
    loss), and the quantities that explain it."""
    rewards = list(dict.fromkeys(r["reward"] for r in rows))
    clip_names = list(dict.fromkeys(r["clip"] for r in rows))
    losses = list(dict.fromkeys(r["loss"] for r in rows))
    nseeds = len({r["seed"] for r in rows})

    def clip_text(c: str) -> str:
        lo, hi = clips[c]
        return f"{c} ({bound(lo)}/{bound(hi)})"

    w = 24
    lines = [header,
             f"final mean length (exact, of the policy after the last step): mean [min, max] over {nseeds} seeds; "
             f"start {start:.2f}", "* : this loss's seed range is disjoint from both others'",
             "luspo/gspo: LUSPO's final length over GSPO's"]
    head = f"{'reward':<11}{'clip (low/high)':<32}" + "".join(f"{l:<{w}}" for l in losses) + "luspo/gspo"
    lines += [head, "-" * len(head)]
    for reward, c, sub, fin in _settings(rows, rewards, clip_names):
        cells = []
        for l in losses:
            v = fin[l]
            mark = "*" if len(losses) > 1 and _separate(fin, l) else " "
            cells.append(f"{f'{v.mean():.2f} [{v.min():.2f}, {v.max():.2f}]{mark}':<{w}}")
        ratio = f"{fin['luspo'].mean() / fin['gspo'].mean():.2f}" if "luspo" in fin and "gspo" in fin else ""
        lines.append(f"{reward:<11}{clip_text(c):<32}" + "".join(cells) + ratio)
    lines += ["",
              "why: means over all optimiser steps; [min, max] over seeds of each run's mean",
              "clip A>0, A<0: share of the tokens of rows with a positive / negative advantage that the clip removed",
              "clip STOP, CONT: share of the STOP / CONTINUE tokens the clip removed (GRPO clips token by token)",
              "net push: luspo_rs len_net_push (> 0: the update raises the batch's likelihood on balance)",
              "grad share: luspo_rs len_long_grad_share (< 1: short rows weigh more per token)",
              "push x lever: net push x (grad share - 1), for length-neutral rewards only: the drift a loss",
              "  makes on its own; < 0 predicts shorter, > 0 longer (where the reward pays for length, the push",
              "  itself depends on length and the product predicts nothing)",
              "drift: final - start length"]
    head = (f"{'reward':<11}{'clip':<16}{'loss':<6}{'clip A>0':>9}{'clip A<0':>9}{'clip STOP':>10}{'CONT':>7}  "
            f"{'net push':<26}{'grad share':>10}{'push x lever':>14}{'drift':>8}")
    lines += [head, "-" * len(head)]
    for reward, c, sub, fin in _settings(rows, rewards, clip_names):
        pos, neg = _per_seed(sub, "clip_pos", False), _per_seed(sub, "clip_neg", False)
        stop, cont = _per_seed(sub, "clip_stop", False), _per_seed(sub, "clip_continue", False)
        net, share = _per_seed(sub, "len_net_push", False), _per_seed(sub, "len_long_grad_share", False)
        for l in losses:
            n = net[l]
            lever = f"{n.mean() * (share[l].mean() - 1):>+14.5f}" if reward == "neutral" else f"{'':>14}"
            lines.append(
                f"{reward:<11}{c:<16}{l:<6}{np.nanmean(pos[l]):>9.3f}{np.nanmean(neg[l]):>9.3f}"
                f"{np.nanmean(stop[l]):>10.3f}{np.nanmean(cont[l]):>7.3f}  "
                f"{f'{n.mean():+.4f} [{n.min():+.4f}, {n.max():+.4f}]':<26}{share[l].mean():>10.3f}"
                f"{lever}{fin[l].mean() - start:>+8.2f}")
    return "\n".join(lines) + "\n"


def mech_plot(rows: Sequence[dict], path: Path, clips: Sequence[str], start: float,
              reward_text: Optional[dict] = None, clip_bounds: Optional[dict] = None, smooth: int = 1) -> None:
    """Mean length (exact) against step: one panel per reward family (rows)
    and clip setting (columns); per loss the mean over seeds (line) and their
    range (shaded)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rewards = list(dict.fromkeys(r["reward"] for r in rows))
    clips = [c for c in clips if any(r["clip"] == c for r in rows)]
    one_col = len(clips) == 1
    nr, nc = (1, len(rewards)) if one_col else (len(rewards), len(clips))
    fig, axes = plt.subplots(nr, nc, figsize=(5.2 * nc if one_col else 3.6 * nc, 3.8 * nr), squeeze=False)
    for i, reward in enumerate(rewards):
        for j, c in enumerate(clips):
            ax = axes[0, i] if one_col else axes[i, j]
            for loss, seeds in _curves(_runs(rows, reward, c), "policy_length").items():
                n = min(len(v) for v in seeds.values())
                m = np.stack([_smooth(np.insert(v[:n], 0, start), smooth) for v in seeds.values()])
                x = np.arange(n + 1)
                col = COLOURS.get(loss)
                ax.plot(x, m.mean(0), color=col, label=f"{loss} ({len(seeds)} seeds)", lw=1.5)
                ax.fill_between(x, m.min(0), m.max(0), color=col, alpha=0.2, lw=0)
            bounds = (clip_bounds or {}).get(c)
            ctext = f"clip {bound(bounds[0])} / {bound(bounds[1])}" if bounds else c
            rtext = (reward_text or {}).get(reward, reward)
            ax.set_title(f"{rtext}\n{ctext}" if one_col else f"{reward}, {ctext}", fontsize=9)
            ax.axhline(start, color="grey", lw=0.6, ls=":")
            ax.set_xlabel("RL step")
            ax.set_ylabel("mean length (exact)")
            ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
