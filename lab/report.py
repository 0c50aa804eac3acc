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
