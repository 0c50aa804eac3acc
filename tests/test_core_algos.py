"""``luspo_rs.core_algos`` is a drop-in for verl's: same signatures, same
config fields, same return types and numbers (verl 0.9.1 functions are the
reference). Tolerances: float32 1e-6 abs + 1e-5 rel. Each op's own parity
tests (through the public functions and the drop-ins) are in
``test_policy_loss.py``, ``test_agg_loss.py``, ``test_kl_penalty.py`` and
``test_advantage.py``.
"""

from __future__ import annotations

import inspect
import subprocess
import sys
import textwrap

import pytest
import torch
from verl.trainer.ppo import core_algos as verl_ca
from verl.workers.config import ActorConfig

from luspo_rs import core_algos as ours

TOL = dict(atol=1e-6, rtol=1e-5)

DROP_INS = [
    "compute_policy_loss_vanilla",
    "compute_policy_loss_gspo",
    "agg_loss",
    "kl_penalty",
    "compute_value_loss",
    "compute_grpo_outcome_advantage",
    "compute_grpo_vectorized_outcome_advantage",
    "compute_rloo_outcome_advantage",
    "compute_rloo_vectorized_outcome_advantage",
    "compute_reinforce_plus_plus_baseline_outcome_advantage",
    "compute_opo_outcome_advantage",
    "compute_gpg_outcome_advantage",
    "compute_grpo_passk_outcome_advantage",
    "compute_gdpo_outcome_advantage",
]


def params(fn):
    return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]


@pytest.mark.parametrize("name", DROP_INS)
def test_signature_matches_verl(name):
    assert params(getattr(ours, name)) == params(getattr(verl_ca, name))


def test_luspo_signature_is_a_policy_loss_signature():
    luspo = params(ours.compute_policy_loss_luspo)
    gspo = params(verl_ca.compute_policy_loss_gspo)
    assert [p[:2] for p in luspo] == [p[:2] for p in gspo]
    assert dict((n, d) for n, _, d in luspo)["loss_agg_mode"] == "seq-mean-token-sum"


def actor_config(**global_batch_info):
    cfg = ActorConfig(
        strategy="fsdp", clip_ratio=0.2, clip_ratio_low=0.2, clip_ratio_high=0.28,
        ppo_micro_batch_size_per_gpu=1, rollout_n=1,
    )  # fmt: skip
    cfg.global_batch_info.update(global_batch_info)
    return cfg


def batch(B=12, T=20, seed=0, per_token_adv=False):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, T, generator=g) * 2
    lp = old + 0.3 * torch.randn(B, T, generator=g)
    adv = torch.randn(B, T if per_token_adv else 1, generator=g).expand(B, T).contiguous()
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = torch.arange(T)[None, :] < lengths[:, None]
    return old, lp, adv, mask


def loss_and_grad(fn, old, lp, adv, mask, **kw):
    x = lp.clone().requires_grad_()
    loss, metrics = fn(old, x, adv, mask, **kw)
    loss.backward()
    return loss.detach(), x.grad, metrics


def assert_same(want, got):
    (lw, gw, mw), (lg, gg, mg) = want, got
    torch.testing.assert_close(lg, lw, **TOL)
    torch.testing.assert_close(gg, gw, **TOL)
    # verl's metrics, equal; ours add the length diagnostics (tests/test_length_diagnostics.py)
    assert set(mw) == {"actor/pg_clipfrac", "actor/ppo_kl", "actor/pg_clipfrac_lower"}
    assert set(mg) == set(mw) | {"actor/len_long_grad_share", "actor/len_long_clipfrac", "actor/len_short_clipfrac",
                                 "actor/len_adv_corr", "actor/len_net_push"}
    assert all(isinstance(v, float) for v in mg.values())
    for k in mw:
        assert isinstance(mg[k], float)
        assert mg[k] == pytest.approx(mw[k], abs=1e-6, rel=1e-5), k


GLOBAL_INFOS = [
    {},
    dict(dp_size=1, batch_num_tokens=None, global_batch_size=None, loss_scale_factor=None),
    dict(dp_size=4, batch_num_tokens=517, global_batch_size=40, loss_scale_factor=64),
]


@pytest.mark.parametrize("gbi", range(len(GLOBAL_INFOS)))
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
@pytest.mark.parametrize("name", ["compute_policy_loss_vanilla", "compute_policy_loss_gspo"])
def test_policy_loss_matches_verl(name, agg, gbi):
    cfg = actor_config(**GLOBAL_INFOS[gbi])
    data = batch(per_token_adv=name.endswith("vanilla"))
    want = loss_and_grad(getattr(verl_ca, name), *data, loss_agg_mode=agg, config=cfg)
    got = loss_and_grad(getattr(ours, name), *data, loss_agg_mode=agg, config=cfg)
    assert_same(want, got)


def test_policy_loss_with_rollout_is_weights():
    cfg = actor_config()
    old, lp, adv, mask = batch(seed=3)
    w = torch.rand(lp.shape)
    for name in ("compute_policy_loss_vanilla", "compute_policy_loss_gspo"):
        want = loss_and_grad(getattr(verl_ca, name), old, lp, adv, mask, config=cfg, rollout_is_weights=w)
        got = loss_and_grad(getattr(ours, name), old, lp, adv, mask, config=cfg, rollout_is_weights=w)
        assert_same(want, got)


@pytest.mark.parametrize("gbi", range(len(GLOBAL_INFOS)))
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_luspo_is_verl_gspo_aggregated_seq_mean_token_sum(agg, gbi):
    """LUSPO == verl's GSPO token loss + verl's agg_loss("seq-mean-token-sum"),
    whatever loss_agg_mode the config asks for."""
    cfg = actor_config(**GLOBAL_INFOS[gbi])
    data = batch(seed=1)
    want = loss_and_grad(verl_ca.compute_policy_loss_gspo, *data, loss_agg_mode="seq-mean-token-sum", config=cfg)
    got = loss_and_grad(ours.compute_policy_loss_luspo, *data, loss_agg_mode=agg, config=cfg)
    assert_same(want, got)


def test_policy_loss_reads_a_dict_config_too():
    from omegaconf import OmegaConf

    cfg = OmegaConf.create(dict(clip_ratio=0.2, clip_ratio_low=None, clip_ratio_high=0.3, clip_ratio_c=3.0,
                                global_batch_info={}))  # fmt: skip
    data = batch(seed=2, per_token_adv=True)
    want = loss_and_grad(verl_ca.compute_policy_loss_vanilla, *data, config=cfg)
    got = loss_and_grad(ours.compute_policy_loss_vanilla, *data, config=cfg)
    assert_same(want, got)


def test_policy_loss_without_config_is_a_value_error():
    with pytest.raises(ValueError, match="config"):
        ours.compute_policy_loss_luspo(*batch())


@pytest.mark.parametrize("agg", ["token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean",
                                 "seq-mean-token-sum-norm"])  # fmt: skip
def test_agg_loss_matches_verl(agg):
    _, loss_mat, _, mask = batch(seed=4)
    a, b = loss_mat.clone().requires_grad_(), loss_mat.clone().requires_grad_()
    want = verl_ca.agg_loss(a, mask, agg, dp_size=2, batch_num_tokens=300, global_batch_size=30)
    got = ours.agg_loss(b, mask, agg, dp_size=2, batch_num_tokens=300, global_batch_size=30)
    want.backward()
    got.backward()
    torch.testing.assert_close(got, want, **TOL)
    torch.testing.assert_close(b.grad, a.grad, **TOL)


def test_imports_without_verl():
    """luspo_rs.core_algos works with verl unimportable; luspo_rs.verl says what to install."""
    code = textwrap.dedent(
        """
        import sys
        sys.modules["verl"] = None  # makes `import verl...` raise ImportError
        import numpy as np, torch
        from luspo_rs import core_algos
        adv, _ = core_algos.compute_grpo_outcome_advantage(
            torch.ones(2, 3), torch.ones(2, 3), np.array(["a", "a"], dtype=object))
        assert adv.shape == (2, 3)
        try:
            import luspo_rs.verl
        except ImportError as e:
            assert "pip install verl" in str(e), e
            print("OK")
        """
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "OK"
