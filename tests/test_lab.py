"""The length-bias lab (`make demo`): the task's reward on hand-made responses,
and a 2-step smoke run at tiny sizes that writes the CSV, the plot and the summary."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lab import train  # noqa: E402
from lab.__main__ import main, run  # noqa: E402
from lab.policy import response_mask  # noqa: E402
from lab.task import BLANK, EOS, EQ, PAD, SEP, Task, answer, demonstration, parse, render, reward  # noqa: E402

DIGITS = [3, 5, 9, 4]  # sum 21 -> answer 1; running sums 8, 7, 1


@pytest.mark.parametrize(
    "response, expected",
    [
        ([EQ, 1, EOS], 1.0),  # correct, at once
        ([8, 7, 1, EQ, 1, EOS], 1.0),  # correct, with the steps
        ([8, 7, 1, EQ, 1, EOS, PAD, PAD], 1.0),  # padding after EOS is ignored
        ([8, EQ, 1, EOS, 4, EQ], 1.0),  # so is anything after the first EOS
        ([0, 0, EQ, 1, EOS], 1.0),  # the steps are not checked, only the answer
        ([EQ, 2, EOS], 0.0),  # wrong, at once
        ([8, 7, 1, EQ, 7, EOS], 0.0),  # wrong, with the steps
        ([8, 7, 1, EQ, 1], 0.0),  # no EOS: cut at the cap
        ([8, 7, 1, 1, EOS], 0.0),  # no '='
        ([EQ, 1, 1, EOS], 0.0),  # two answer digits
        ([EQ, EOS], 0.0),  # no answer digit
        ([EQ, EQ, 1, EOS], 0.0),  # '=' among the steps
        ([1, EOS], 0.0),
        ([EOS], 0.0),
        ([], 0.0),
    ],
)
def test_reward(response, expected):
    assert answer(DIGITS) == 1
    assert reward(DIGITS, response) == expected


def test_parse_counts_steps():
    assert parse([EQ, 1, EOS]) == (1, 0)
    assert parse([8, 7, 1, EQ, 1, EOS]) == (1, 3)
    assert parse([8, 7, 1, EQ, 1]) is None


def test_demonstrations_are_rewarded():
    assert demonstration(DIGITS, steps=False) == [EQ, 1, EOS]
    assert demonstration(DIGITS, steps=True) == [8, 7, 1, EQ, 1, EOS]
    assert render(DIGITS, [8, 7, 1, EQ, 1, EOS, PAD]) == "3 5 9 4 ? 8 7 1 = 1 <eos>"
    task = Task(n_min=2, n_max=6)
    rng = __import__("numpy").random.default_rng(0)
    for digits in task.sample(rng, 200):
        assert 2 <= len(digits) <= 6
        for steps in (False, True):
            r = demonstration(digits, steps)
            assert reward(digits, r) == 1.0
            assert len(r) == (len(digits) + 2 if steps else 3) <= task.cap


def test_prompt_layout_and_mask():
    task = Task(n_min=2, n_max=4, cap=6)
    p = task.encode_prompts([[3, 5], [1, 2, 3, 4]])
    assert p.tolist() == [[3, 5, BLANK, BLANK, SEP], [1, 2, 3, 4, SEP]]
    with pytest.raises(ValueError):
        task.encode_prompts([[1]])
    r = task.pad_responses([[EQ, 8, EOS], [1, 2, 3, 4, 5, 6]])
    assert r.tolist() == [[EQ, 8, EOS, PAD, PAD, PAD], [1, 2, 3, 4, 5, 6]]
    assert response_mask(r).tolist() == [[1, 1, 1, 0, 0, 0], [1] * 6]


TINY = ["--steps", "2", "--seeds", "2", "--warm-steps", "2", "--prompts", "2", "--group", "4",
        "--d", "16", "--layers", "1", "--heads", "2", "--no-progress"]


def test_smoke_run(tmp_path, monkeypatch, capsys):
    """Two RL steps of each loss at tiny sizes: every output is written, every
    metric luspo_rs.policy_loss returns becomes a CSV column (stand-in extra
    metrics included: a scalar, and a vector logged element by element), and
    the plot can be redrawn from the CSV."""
    real = train.luspo_rs.policy_loss

    def with_extra_metric(*args, **kwargs):
        loss, metrics = real(*args, **kwargs)
        return loss, dict(metrics, extra_diagnostic=torch.tensor(0.25, dtype=torch.float64),
                          extra_by_bucket=torch.tensor([1.0, 2.0]))

    monkeypatch.setattr(train.luspo_rs, "policy_loss", with_extra_metric)
    main(TINY + ["--out", str(tmp_path)])
    printed = capsys.readouterr().out
    for name in ("steps.csv", "lab.png", "summary.txt", "config.json"):
        assert (tmp_path / name).stat().st_size > 0, name
    assert (tmp_path / "lab.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with open(tmp_path / "steps.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 * 2 * 2
    assert {r["loss"] for r in rows} == {"grpo", "gspo", "luspo"}
    assert {(r["seed"], r["step"]) for r in rows} == {(s, t) for s in "01" for t in "01"}
    for col in ("accuracy", "mean_length", "pg_loss", "pg_clipfrac", "ppo_kl", "pg_clipfrac_lower",
                "len_long_grad_share", "len_long_clipfrac", "len_short_clipfrac", "len_adv_corr", "extra_diagnostic"):
        assert col in rows[0], col
    assert all(float(r["extra_diagnostic"]) == 0.25 for r in rows)
    assert all((float(r["extra_by_bucket_0"]), float(r["extra_by_bucket_1"])) == (1.0, 2.0) for r in rows)
    assert all(1 <= float(r["mean_length"]) <= Task().cap for r in rows)
    summary = (tmp_path / "summary.txt").read_text()
    assert summary in printed
    for loss in ("grpo", "gspo", "luspo"):
        assert f"\n{loss} " in summary

    out2 = tmp_path / "replot"
    main(["--replot", str(tmp_path / "steps.csv"), "--out", str(out2), "--plot", "mean_length,extra_diagnostic"])
    assert (out2 / "lab.png").stat().st_size > 0


def test_losses_go_through_luspo_rs(monkeypatch, tmp_path):
    """Each loss calls luspo_rs.policy_loss with its mode and verl's aggregation
    for it, the length diagnostics on."""
    seen = []
    real = train.luspo_rs.policy_loss

    def spy(*args, **kwargs):
        seen.append((kwargs["mode"], kwargs["loss_agg_mode"], kwargs["diagnostics"]))
        return real(*args, **kwargs)

    monkeypatch.setattr(train.luspo_rs, "policy_loss", spy)
    cfg = train.Config(task=Task(n_max=3, cap=6), d=16, layers=1, heads=2, warm_steps=1, rl_steps=1, prompts=2, group=2)
    run(cfg, [0], ["grpo", "gspo", "luspo"], tmp_path, progress=False)
    k = cfg.epochs * cfg.minibatches
    assert seen == [("vanilla", "token-mean", True)] * k + [("gspo", "seq-mean-token-mean", True)] * k + \
        [("luspo", "seq-mean-token-sum", True)] * k
