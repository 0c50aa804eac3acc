"""python -m lab [--only mechanism|transformer] [--long] [--out DIR] [...]

Two labs, in this order:

1. the mechanism lab (lab/mechanism.py): a tabular stop-policy trained with
   GRPO, GSPO and LUSPO under two reward families and five clip settings, 5
   seeds each; writes DIR/mechanism.csv, DIR/mechanism.png (the paper's clip
   bounds), DIR/mechanism_ablation.png (every clip setting) and
   DIR/mechanism_summary.txt;
2. the transformer lab (lab/train.py): warm-starts one small transformer per
   seed, then trains a copy of it with each loss; writes DIR/transformer.csv,
   DIR/transformer.png and DIR/transformer_summary.txt.

Both print their tables; DIR/summary.txt holds both, DIR/config.json the
settings."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from . import mechanism, report
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
    """The transformer lab; returns its summary text."""
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
    report.write_csv(rows, out / "transformer.csv")
    clips = ", ".join(f"{l} {report.bound(cfg.clip_bounds(l)[0])}/{report.bound(cfg.clip_bounds(l)[1])}" for l in losses)
    text = (f"transformer lab: {', '.join(losses)} x seeds {seeds}, {cfg.rl_steps} RL steps of {cfg.prompts} prompts "
            f"x {cfg.group} responses, {cfg.epochs * cfg.minibatches} optimiser steps each; clip (low/high): {clips}\n")
    text += report.summary(rows, window)
    text += f"wall time {elapsed:.0f} s; outputs in {out}/ (transformer.csv, transformer.png, transformer_summary.txt)\n"
    (out / "transformer_summary.txt").write_text(text)
    _config(out, transformer=dict(cfg.as_dict(), seeds=seeds, losses=losses,
                                  losses_spec={l: dict(LOSSES[l], bounds=cfg.clip_bounds(l)) for l in losses}))
    report.plot(rows, out / "transformer.png", plot_keys)
    return text


def _config(out: Path, **parts) -> None:
    """Merge ``parts`` into DIR/config.json."""
    path = out / "config.json"
    conf = json.loads(path.read_text()) if path.exists() else {}
    conf.update(parts)
    path.write_text(json.dumps(conf, indent=1))


def run_mechanism(cfg: mechanism.MechConfig, seeds: list[int], rewards: list[str], clips: list[str], out: Path, *,
                  jobs: int = 1, progress: bool = True) -> str:
    """The mechanism lab; returns its summary text."""
    out.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    runs = len(seeds) * len(rewards) * len(clips) * len(mechanism.LOSSES)
    bar = _Bar(runs, progress)
    try:
        rows = mechanism.run_all(cfg, seeds, rewards, clips, jobs=jobs,
                                 on_run=lambda what: bar.update(1, f"mechanism {what}"))
    finally:
        bar.close()
        torch.set_num_threads(threads)
    elapsed = time.perf_counter() - t0
    start = mechanism.initial_mean_length(cfg)
    report.write_csv(rows, out / "mechanism.csv")
    header = (f"mechanism lab: tabular stop-policy, {cfg.prompts} prompts x {cfg.group} responses, cap {cfg.cap}, "
              f"Adam lr {cfg.lr:g}, {cfg.epochs} epochs x {cfg.minibatches} minibatches, {cfg.steps} RL steps; "
              "each row's clip bounds apply to all three losses")
    text = report.mech_summary(rows, start, mechanism.CLIPS, header)
    text += (f"wall time {elapsed:.0f} s ({jobs} process{'es' if jobs > 1 else ''}); outputs in {out}/ "
             "(mechanism.csv, mechanism.png, mechanism_ablation.png, mechanism_summary.txt)\n")
    (out / "mechanism_summary.txt").write_text(text)
    _config(out, mechanism=dict(cfg.as_dict(), seeds=seeds, rewards=rewards,
                                clips={c: mechanism.CLIPS[c] for c in clips}, losses=mechanism.LOSSES))
    main_clip = "paper" if "paper" in clips else clips[0]
    report.mech_plot(rows, out / "mechanism.png", [main_clip], start, mechanism.REWARD_TEXT, mechanism.CLIPS)
    report.mech_plot(rows, out / "mechanism_ablation.png", clips, start, mechanism.REWARD_TEXT, mechanism.CLIPS)
    return text


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m lab", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=("mechanism", "transformer"), default=None,
                    help="run one lab (default: both, the mechanism lab first)")
    ap.add_argument("--out", type=Path, default=Path("lab_out"), help="output folder (default lab_out)")
    ap.add_argument("--no-progress", action="store_true")
    m = ap.add_argument_group("the mechanism lab (lab/mechanism.py)")
    md = mechanism.MechConfig()
    m.add_argument("--mech-seeds", type=int, default=5, help="seeds per run (default 5)")
    m.add_argument("--mech-steps", type=int, default=md.steps, help=f"RL steps per run (default {md.steps})")
    m.add_argument("--mech-prompts", type=int, default=md.prompts)
    m.add_argument("--mech-group", type=int, default=md.group)
    m.add_argument("--mech-rewards", default=",".join(mechanism.REWARDS),
                   help=f"comma-separated, from {','.join(mechanism.REWARDS)}")
    m.add_argument("--mech-clips", default=",".join(mechanism.CLIPS),
                   help="comma-separated clip settings, from " +
                        ", ".join(f"{k} ({report.bound(lo)}/{report.bound(hi)})" for k, (lo, hi) in mechanism.CLIPS.items()))
    m.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                   help="processes for the mechanism lab's runs (default: 2, or 1 on one core)")
    t = ap.add_argument_group("the transformer lab (lab/train.py)")
    t.add_argument("--long", action="store_true",
                   help="a longer, better-resolved run: 5 seeds, 400 RL steps, 32 prompts per batch")
    t.add_argument("--seeds", type=int, default=None, help="number of seeds (default 3, --long 5)")
    t.add_argument("--steps", type=int, default=None, help="RL steps per run (default 150, --long 400)")
    t.add_argument("--losses", default="grpo,gspo,luspo", help="comma-separated, from grpo,gspo,luspo")
    t.add_argument("--plot", default=",".join(report.DEFAULT_PLOT),
                   help="CSV columns to plot, one panel each (any metric, e.g. pg_clipfrac,direct_share)")
    t.add_argument("--replot", type=Path, default=None, metavar="CSV",
                   help="redraw --out/transformer.png from an existing transformer.csv and print its summary")
    # sizes and settings (the defaults are the demo's; the tests shrink them)
    d = Config()
    for name in ("warm_steps", "prompts", "group", "d", "layers", "heads", "epochs", "minibatches"):
        t.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(d, name))
    for name in ("lr", "warm_lr", "warm_steps_share"):
        t.add_argument("--" + name.replace("_", "-"), type=float, default=getattr(d, name))
    t.add_argument("--clip-low", type=float, default=d.clip_low,
                   help=f"GSPO's and LUSPO's sequence-ratio clip_ratio_low (default {d.clip_low:g}, the GSPO paper's)")
    t.add_argument("--clip-high", type=float, default=d.clip_high,
                   help=f"GSPO's and LUSPO's sequence-ratio clip_ratio_high (default {d.clip_high:g}, the GSPO paper's)")
    t.add_argument("--token-clip-low", type=float, default=d.token_clip_low,
                   help=f"GRPO's token-ratio clip_ratio_low (default {d.token_clip_low:g}, verl's)")
    t.add_argument("--token-clip-high", type=float, default=d.token_clip_high,
                   help=f"GRPO's token-ratio clip_ratio_high (default {d.token_clip_high:g}, verl's clip-higher)")
    t.add_argument("--warm-partial", action="store_true",
                   help="demonstrations with steps write the first k of them, k uniform in 1..n-1")
    t.add_argument("--n-min", type=int, default=d.task.n_min)
    t.add_argument("--n-max", type=int, default=d.task.n_max)
    t.add_argument("--cap", type=int, default=d.task.cap)
    a = ap.parse_args(argv)

    keys = [k for k in a.plot.split(",") if k]
    if a.replot is not None:
        rows = report.read_csv(a.replot)
        a.out.mkdir(parents=True, exist_ok=True)
        report.plot(rows, a.out / "transformer.png", keys)
        print(report.summary(rows, max(1, (max(r["step"] for r in rows) + 1) // 10)), end="")
        return

    def choose(text: str, known, what: str) -> list[str]:
        names = [x for x in text.split(",") if x]
        for x in names:
            if x not in known:
                ap.error(f"unknown {what} {x!r}; choose from {', '.join(known)}")
        return names

    losses = choose(a.losses, LOSSES, "loss")
    rewards = choose(a.mech_rewards, mechanism.REWARDS, "reward family")
    clips = choose(a.mech_clips, mechanism.CLIPS, "clip setting")
    texts = []
    if a.only in (None, "mechanism"):
        mcfg = mechanism.MechConfig(steps=a.mech_steps, prompts=a.mech_prompts, group=a.mech_group)
        texts.append(run_mechanism(mcfg, list(range(a.mech_seeds)), rewards, clips, a.out,
                                   jobs=a.jobs, progress=not a.no_progress))
        print(texts[-1])
    if a.only in (None, "transformer"):
        cfg = Config(
            task=Task(n_min=a.n_min, n_max=a.n_max, cap=a.cap),
            d=a.d, layers=a.layers, heads=a.heads,
            warm_steps=a.warm_steps, warm_lr=a.warm_lr, warm_steps_share=a.warm_steps_share,
            warm_partial=a.warm_partial,
            rl_steps=a.steps or (400 if a.long else d.rl_steps),
            prompts=a.prompts * (2 if a.long and a.prompts == d.prompts else 1), group=a.group,
            lr=a.lr, epochs=a.epochs, minibatches=a.minibatches,
            clip_low=a.clip_low, clip_high=a.clip_high, token_clip_low=a.token_clip_low,
            token_clip_high=a.token_clip_high,
        )
        seeds = list(range(a.seeds or (5 if a.long else 3)))
        texts.append(run(cfg, seeds, losses, a.out, progress=not a.no_progress, plot_keys=keys))
        print(texts[-1], end="")
    (a.out / "summary.txt").write_text("\n".join(texts))


if __name__ == "__main__":
    # tiny tensors: one thread is fastest, and leaves the other cores alone (set
    # here, not on import, so that importing the lab changes nothing for a caller;
    # luspo_rs reads it when its pool is first used)
    os.environ.setdefault("RAYON_NUM_THREADS", "1")
    main()
