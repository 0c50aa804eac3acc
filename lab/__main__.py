"""python -m lab [--long] [--out DIR] [...]: warm-start one policy per seed, then
train a copy of it with each loss; write DIR/steps.csv, DIR/lab.png,
DIR/summary.txt and DIR/config.json, and print the summary."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from . import report
from .task import Task
from .train import LOSSES, Config, rl_run, warm_start

WARM_COST = 0.25


class _Bar:
    """tqdm if it is installed, else a one-line counter on stderr."""

    def __init__(self, total: float, enabled: bool):
        self.total, self.n, self.enabled, self._bar = total, 0.0, enabled, None
        self.t0 = self._shown = time.perf_counter()
        if enabled:
            try:
                from tqdm import tqdm

                self._bar = tqdm(total=total, dynamic_ncols=True,
                                 bar_format="{desc}{percentage:3.0f}%|{bar}| {elapsed}<{remaining}")
            except ImportError:
                pass

    def update(self, n: float = 1, text: str = "") -> None:
        self.n += n
        if not self.enabled:
            return
        if self._bar is not None:
            if text:
                self._bar.set_description(text, refresh=False)
            self._bar.update(n)
        elif time.perf_counter() - self._shown > 1.0 or self.n >= self.total:
            self._shown = time.perf_counter()
            el = self._shown - self.t0
            print(f"\r{text:<24} {100 * self.n / self.total:3.0f}%  {el:6.0f} s", end="", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        elif self.enabled:
            print(file=sys.stderr)


def run(cfg: Config, seeds: list[int], losses: list[str], out: Path, *, progress: bool = True,
        plot_keys=report.DEFAULT_PLOT, window: int | None = None) -> str:
    """The whole lab; returns the summary text."""
    out.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: one thread is fastest
    t0 = time.perf_counter()
    # the bar's unit is one RL step; a warm-start step costs about a quarter of one
    bar = _Bar(len(seeds) * (WARM_COST * cfg.warm_steps + len(losses) * cfg.rl_steps), progress)
    rows: list[dict] = []
    try:
        for seed in seeds:
            state = warm_start(cfg, seed, on_step=lambda: bar.update(WARM_COST, f"warm start  seed {seed}"))
            for loss in losses:
                rows += rl_run(cfg, loss, seed, state,
                               on_step=lambda r: bar.update(1, f"{loss:<5}       seed {seed}"))
    finally:
        bar.close()
        torch.set_num_threads(threads)
    elapsed = time.perf_counter() - t0
    window = window or max(1, cfg.rl_steps // 10)
    report.write_csv(rows, out / "steps.csv")
    text = report.summary(rows, window)
    text += f"wall time {elapsed:.0f} s; outputs in {out}/ (steps.csv, lab.png, summary.txt, config.json)\n"
    (out / "summary.txt").write_text(text)
    (out / "config.json").write_text(json.dumps(dict(cfg.as_dict(), seeds=seeds, losses=losses,
                                                     losses_spec={l: LOSSES[l] for l in losses}), indent=1))
    report.plot(rows, out / "lab.png", plot_keys)
    return text


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m lab", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--long", action="store_true",
                    help="a longer, better-resolved run: 5 seeds, 400 RL steps, 32 prompts per batch")
    ap.add_argument("--out", type=Path, default=Path("lab_out"), help="output folder (default lab_out)")
    ap.add_argument("--seeds", type=int, default=None, help="number of seeds (default 3, --long 5)")
    ap.add_argument("--steps", type=int, default=None, help="RL steps per run (default 150, --long 400)")
    ap.add_argument("--losses", default="grpo,gspo,luspo", help="comma-separated, from grpo,gspo,luspo")
    ap.add_argument("--plot", default=",".join(report.DEFAULT_PLOT),
                    help="CSV columns to plot, one panel each (any metric, e.g. pg_clipfrac,direct_share)")
    ap.add_argument("--replot", type=Path, default=None, metavar="CSV",
                    help="redraw --out/lab.png from an existing steps.csv and print its summary")
    ap.add_argument("--no-progress", action="store_true")
    # sizes and settings (the defaults are the demo's; the tests shrink them)
    d = Config()
    for name in ("warm_steps", "prompts", "group", "d", "layers", "heads", "epochs", "minibatches"):
        ap.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(d, name))
    for name in ("lr", "warm_lr", "clip_ratio", "warm_steps_share"):
        ap.add_argument("--" + name.replace("_", "-"), type=float, default=getattr(d, name))
    ap.add_argument("--warm-partial", action="store_true",
                    help="demonstrations with steps write the first k of them, k uniform in 1..n-1")
    ap.add_argument("--n-min", type=int, default=d.task.n_min)
    ap.add_argument("--n-max", type=int, default=d.task.n_max)
    ap.add_argument("--cap", type=int, default=d.task.cap)
    a = ap.parse_args(argv)

    keys = [k for k in a.plot.split(",") if k]
    if a.replot is not None:
        rows = report.read_csv(a.replot)
        a.out.mkdir(parents=True, exist_ok=True)
        report.plot(rows, a.out / "lab.png", keys)
        print(report.summary(rows, max(1, (max(r["step"] for r in rows) + 1) // 10)), end="")
        return

    losses = [l for l in a.losses.split(",") if l]
    for l in losses:
        if l not in LOSSES:
            ap.error(f"unknown loss {l!r}; choose from {', '.join(LOSSES)}")
    cfg = Config(
        task=Task(n_min=a.n_min, n_max=a.n_max, cap=a.cap),
        d=a.d, layers=a.layers, heads=a.heads,
        warm_steps=a.warm_steps, warm_lr=a.warm_lr, warm_steps_share=a.warm_steps_share,
        warm_partial=a.warm_partial,
        rl_steps=a.steps or (400 if a.long else d.rl_steps),
        prompts=a.prompts * (2 if a.long and a.prompts == d.prompts else 1), group=a.group,
        lr=a.lr, epochs=a.epochs, minibatches=a.minibatches, clip_ratio=a.clip_ratio,
    )
    seeds = list(range(a.seeds or (5 if a.long else 3)))
    print(f"length-bias lab: {', '.join(losses)} x seeds {seeds}, {cfg.rl_steps} RL steps of "
          f"{cfg.prompts} prompts x {cfg.group} responses, {cfg.epochs * cfg.minibatches} optimiser steps each")
    print(run(cfg, seeds, losses, a.out, progress=not a.no_progress, plot_keys=keys), end="")


if __name__ == "__main__":
    # tiny tensors: one thread is fastest, and leaves the other cores alone (set
    # here, not on import, so that importing the lab changes nothing for a caller;
    # luspo_rs reads it when its pool is first used)
    os.environ.setdefault("RAYON_NUM_THREADS", "1")
    main()
