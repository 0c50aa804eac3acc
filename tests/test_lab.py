"""The length-bias labs (`make demo`).

The mechanism lab: its reward families, its stop-policy's sampling and
log-probabilities, the clip split it reads off the gradient, a smoke run of
every reward and clip setting at tiny sizes, and the effect it exists to show
(GSPO shortens under the paper's clip bounds and lengthens under reversed
ones). The transformer lab: the task's reward on hand-made responses, and a
2-step smoke run at tiny sizes that writes the CSV, the plot and the summary."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from lab import mechanism, train  # noqa: E402
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
    main(TINY + ["--only", "transformer", "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    for name in ("transformer.csv", "transformer.png", "transformer_summary.txt", "summary.txt", "config.json"):
        assert (tmp_path / name).stat().st_size > 0, name
    assert (tmp_path / "transformer.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with open(tmp_path / "transformer.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 * 2 * 2
    assert {r["loss"] for r in rows} == {"grpo", "gspo", "luspo"}
    assert {(r["seed"], r["step"]) for r in rows} == {(s, t) for s in "01" for t in "01"}
    for col in ("accuracy", "mean_length", "pg_loss", "pg_clipfrac", "ppo_kl", "pg_clipfrac_lower",
                "len_long_grad_share", "len_long_clipfrac", "len_short_clipfrac", "len_adv_corr", "len_net_push",
                "extra_diagnostic"):
        assert col in rows[0], col
    assert all(float(r["extra_diagnostic"]) == 0.25 for r in rows)
    assert all((float(r["extra_by_bucket_0"]), float(r["extra_by_bucket_1"])) == (1.0, 2.0) for r in rows)
    assert all(1 <= float(r["mean_length"]) <= Task().cap for r in rows)
    summary = (tmp_path / "transformer_summary.txt").read_text()
    assert summary in printed and summary == (tmp_path / "summary.txt").read_text()
    for loss in ("grpo", "gspo", "luspo"):
        assert f"\n{loss} " in summary

    out2 = tmp_path / "replot"
    main(["--replot", str(tmp_path / "transformer.csv"), "--out", str(out2), "--plot", "mean_length,extra_diagnostic"])
    assert (out2 / "transformer.png").stat().st_size > 0


def test_losses_go_through_luspo_rs(monkeypatch, tmp_path):
    """Each loss calls luspo_rs.policy_loss with its mode and verl's aggregation
    for it, the length diagnostics on, and its clip bounds: verl's token-level
    0.2 / 0.28 for GRPO, the GSPO paper's sequence-level 3e-4 / 4e-4 for GSPO
    and LUSPO (or what the command line says)."""
    seen = []
    real = train.luspo_rs.policy_loss

    def spy(*args, **kwargs):
        seen.append((kwargs["mode"], kwargs["loss_agg_mode"], kwargs["diagnostics"],
                     kwargs["clip_ratio_low"], kwargs["clip_ratio_high"]))
        return real(*args, **kwargs)

    monkeypatch.setattr(train.luspo_rs, "policy_loss", spy)
    cfg = train.Config(task=Task(n_max=3, cap=6), d=16, layers=1, heads=2, warm_steps=1, rl_steps=1, prompts=2, group=2)
    run(cfg, [0], ["grpo", "gspo", "luspo"], tmp_path, progress=False)
    k = cfg.epochs * cfg.minibatches
    assert seen == [("vanilla", "token-mean", True, 0.2, 0.28)] * k + \
        [("gspo", "seq-mean-token-mean", True, 3e-4, 4e-4)] * k + [("luspo", "seq-mean-token-sum", True, 3e-4, 4e-4)] * k
    seen.clear()
    main(TINY + ["--only", "transformer", "--steps", "1", "--seeds", "1", "--losses", "grpo,gspo",
                 "--clip-low", "0.1", "--clip-high", "0.3", "--token-clip-low", "0.15", "--token-clip-high", "0.25",
                 "--out", str(tmp_path)])
    assert {s[0]: s[3:] for s in seen} == {"vanilla": (0.15, 0.25), "gspo": (0.1, 0.3)}


# --------------------------------------------------------------------------- the mechanism lab


def test_reward_families():
    L = np.arange(1, 41, dtype=float)
    assert np.all(mechanism.REWARDS["neutral"](L) == 0.5)
    p = mechanism.REWARDS["saturating"](L)
    assert p[0] == pytest.approx(0.8 * (1 - np.exp(-1 / 8)), rel=1e-12)
    assert p[7] == pytest.approx(0.8 * (1 - np.exp(-1.0)), rel=1e-12)
    assert np.all(np.diff(p) > 0) and np.all(p < 0.8)


def test_stop_policy_samples_and_scores_its_responses():
    cfg = mechanism.MechConfig()
    policy = mechanism.StopPolicy(cfg.cap, cfg.p_stop)
    # (1 - 0.9^40) / 0.1, the mean length the runs started from
    assert mechanism.initial_mean_length(cfg) == pytest.approx(9.852191, abs=1e-6)
    assert policy.mean_length() == pytest.approx(mechanism.initial_mean_length(cfg), rel=1e-6)  # float32 logits
    lengths, stopped = policy.sample(200_000, torch.Generator().manual_seed(0))
    assert lengths.min() >= 1 and lengths.max() == cfg.cap
    assert float(lengths.double().mean()) == pytest.approx(9.852, abs=0.05)
    assert not stopped[lengths < cfg.cap].logical_not().any()  # short responses all stopped
    assert float((~stopped).double().mean()) == pytest.approx(0.9 ** 40, abs=0.002)  # cut at the cap
    # log-probabilities: STOP at L - 1 after L - 1 CONTINUE tokens; a cut response is all CONTINUE
    lp = policy.log_probs(torch.tensor([3, cfg.cap, cfg.cap]), torch.tensor([True, True, False]))
    mask = mechanism.response_mask(torch.tensor([3, cfg.cap, cfg.cap]), cfg.cap)
    total = (lp * mask).sum(1).double()
    assert total[0].item() == pytest.approx(2 * np.log(0.9) + np.log(0.1), rel=1e-6)
    assert total[1].item() == pytest.approx(39 * np.log(0.9) + np.log(0.1), rel=1e-6)
    assert total[2].item() == pytest.approx(40 * np.log(0.9), rel=1e-6)


def test_grad_stats_read_the_clip_off_the_gradient():
    # rows: long positive (1 of 4 tokens clipped: its STOP), short negative (all
    # clipped), short positive (none); one cut row, negative, none clipped
    g = torch.tensor([[-1.0, -1.0, -1.0, 0.0, 0.0],
                      [0.0, 0.0, 0.0, 0.0, 0.0],
                      [-1.0, -1.0, 0.0, 0.0, 0.0],
                      [1.0, 1.0, 1.0, 1.0, 1.0]])
    lengths = torch.tensor([4, 2, 2, 5])
    stopped = torch.tensor([True, True, True, False])
    adv = torch.tensor([[1.0], [-1.0], [1.0], [-1.0]]).expand(4, 5)
    s = mechanism._grad_stats(g, adv, lengths, stopped)
    assert s["clip_pos"] == pytest.approx(1 / 6) and s["clip_neg"] == pytest.approx(2 / 7)
    assert s["clip_long_pos"] == pytest.approx(1 / 4) and s["clip_long_neg"] == 0.0
    assert s["clip_short_pos"] == 0.0 and s["clip_short_neg"] == 1.0
    assert s["clip_stop"] == pytest.approx(2 / 3) and s["clip_continue"] == pytest.approx(1 / 10)


MECH_TINY = ["--only", "mechanism", "--mech-seeds", "2", "--mech-steps", "3", "--mech-prompts", "2",
             "--mech-group", "4", "--no-progress"]


def test_mechanism_smoke_run(tmp_path, capsys, monkeypatch):
    """Every reward family and clip setting at tiny sizes, through the library
    with each loss's mode, aggregation and the setting's bounds: the CSV, both
    plots and the tables are written; one process or two give the same rows."""
    seen = set()
    real = mechanism.luspo_rs.policy_loss

    def spy(*args, **kwargs):
        seen.add((kwargs["mode"], kwargs["loss_agg_mode"], kwargs["clip_ratio_low"], kwargs["clip_ratio_high"],
                  kwargs["diagnostics"]))
        return real(*args, **kwargs)

    monkeypatch.setattr(mechanism.luspo_rs, "policy_loss", spy)
    main(MECH_TINY + ["--jobs", "1", "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    assert seen == {(spec["mode"], spec["loss_agg_mode"], lo, hi, True)
                    for spec in mechanism.LOSSES.values() for lo, hi in mechanism.CLIPS.values()}
    for name in ("mechanism.csv", "mechanism.png", "mechanism_ablation.png", "mechanism_summary.txt",
                 "summary.txt", "config.json"):
        assert (tmp_path / name).stat().st_size > 0, name
    with open(tmp_path / "mechanism.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(mechanism.REWARDS) * len(mechanism.CLIPS) * 3 * 2 * 3
    for col in ("policy_length", "mean_length", "accuracy", "pg_clipfrac", "len_net_push", "len_long_grad_share",
                "clip_pos", "clip_neg", "clip_stop", "clip_continue"):
        assert col in rows[0], col
    summary = (tmp_path / "mechanism_summary.txt").read_text()
    assert summary in printed
    for reward in mechanism.REWARDS:
        for clip in mechanism.CLIPS:
            assert f"{reward:<11}{clip} (" in summary, (reward, clip)

    monkeypatch.setattr(mechanism.luspo_rs, "policy_loss", real)
    out2 = tmp_path / "two"
    main(MECH_TINY + ["--jobs", "2", "--mech-clips", "paper,reversed", "--out", str(out2)])
    with open(out2 / "mechanism.csv") as f:
        two = list(csv.DictReader(f))
    one = [r for r in rows if r["clip"] in ("paper", "reversed")]
    key = lambda r: (r["reward"], r["clip"], r["loss"], r["seed"], r["step"])  # noqa: E731
    assert sorted(map(key, one)) == sorted(map(key, two))
    assert {key(r): r["policy_length"] for r in one} == {key(r): r["policy_length"] for r in two}


def test_gspo_shortens_under_the_paper_clip_and_lengthens_under_the_reversed_one():
    """The effect the mechanism lab exists to show, at its own settings (3
    seeds): with a length-neutral reward, GSPO's clip 3e-4 / 4e-4 shortens
    responses in every seed and 4e-4 / 3e-4 lengthens them, with a net push
    of the matching sign in every run (about 8 s)."""
    cfg = mechanism.MechConfig()
    start = mechanism.initial_mean_length(cfg)
    for clip, sign in (("paper", -1), ("reversed", 1)):
        for seed in range(3):
            rows = mechanism.run(cfg, "gspo", "neutral", clip, seed)
            assert sign * (rows[-1]["policy_length"] - start) > 0.2, (clip, seed)
            net = np.nanmean([r["len_net_push"] for r in rows])
            assert -sign * net > 0.003, (clip, seed)
