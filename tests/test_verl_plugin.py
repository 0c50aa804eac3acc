"""The verl plug-in: verl itself imports ``luspo_rs.verl`` when
``VERL_USE_EXTERNAL_MODULES=luspo_rs.verl`` is set, which registers ``luspo``;
``LUSPO_RS_TAKE_OVER=1`` (or ``take_over()``) swaps verl's own losses,
estimators and kl_penalty for ours. Each case runs in a fresh interpreter so
that the environment is the one verl sees at import time.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap



def run(*pieces: str, **env: str) -> str:
    code = "".join(textwrap.dedent(p) for p in pieces)
    drop = ("VERL_USE_EXTERNAL_MODULES", "VERL_USE_EXTERNAL_PLUGINS", "LUSPO_RS_TAKE_OVER")
    full_env = {k: v for k, v in os.environ.items() if k not in drop}
    full_env.update(env)
    r = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=full_env
    )
    assert r.returncode == 0, f"stdout:\n{r.stdout}\nstderr:\n{r.stderr}"
    return r.stdout.strip().splitlines()[-1]


LUSPO_NUMBERS = """
    import torch
    from verl.workers.config import ActorConfig
    cfg = ActorConfig(strategy="fsdp", clip_ratio=0.2, clip_ratio_low=0.2, clip_ratio_high=0.28,
                      ppo_micro_batch_size_per_gpu=1, rollout_n=1)
    g = torch.Generator().manual_seed(0)
    old = -torch.rand(6, 10, generator=g)
    lp = (old + 0.3 * torch.randn(6, 10, generator=g)).requires_grad_()
    adv = torch.randn(6, 1, generator=g).expand(6, 10)
    mask = torch.arange(10)[None, :] < torch.tensor([10, 3, 7, 1, 5, 9])[:, None]
    # documented LUSPO: J = 1/G sum_i L_i * min(s_i A_i, clip(s_i) A_i); loss = -J
    L = mask.sum(-1).double()
    s = torch.exp(((lp - old) * mask).sum(-1) / L).double()
    A = adv[:, 0].double()
    want = -(L * torch.minimum(s * A, s.clamp(0.8, 1.28) * A)).mean()
"""


def test_env_var_registers_luspo_in_verls_registry():
    out = run(
        """
        import verl  # runs VERL_USE_EXTERNAL_MODULES
        from verl.trainer.ppo.core_algos import get_policy_loss_fn
        import luspo_rs.core_algos
        fn = get_policy_loss_fn("luspo")
        assert fn is luspo_rs.core_algos.compute_policy_loss_luspo
        """,
        LUSPO_NUMBERS,
        """
        loss, metrics = fn(old, lp, adv, mask, loss_agg_mode="token-mean", config=cfg)
        assert abs(loss.item() - want.item()) < 1e-5 * max(1.0, abs(want.item())), (loss.item(), want.item())
        # verl's metrics and the length diagnostics, all logged by verl as actor/...
        assert set(metrics) == {"actor/pg_clipfrac", "actor/ppo_kl", "actor/pg_clipfrac_lower",
                                "actor/len_long_grad_share", "actor/len_long_clipfrac",
                                "actor/len_short_clipfrac", "actor/len_adv_corr", "actor/len_net_push"}
        # opt-in not set: verl's own vanilla / grpo stay in place
        from verl.trainer.ppo import core_algos as ca
        assert ca.get_policy_loss_fn("vanilla").__module__ == "verl.trainer.ppo.core_algos"
        assert ca.compute_grpo_outcome_advantage.__module__ == "verl.trainer.ppo.core_algos"
        print("OK")
        """,
        VERL_USE_EXTERNAL_MODULES="luspo_rs.verl",
        # entry-point discovery off: only the variable can have registered it
        VERL_USE_EXTERNAL_PLUGINS="none",
    )
    assert out == "OK"


def test_installed_package_registers_luspo_through_verls_entry_points():
    # no VERL_USE_EXTERNAL_MODULES: verl finds luspo_rs.verl in the
    # "verl.plugins" entry points of the installed package
    out = run(
        """
        import verl
        from verl.trainer.ppo.core_algos import get_policy_loss_fn
        import luspo_rs.core_algos
        assert get_policy_loss_fn("luspo") is luspo_rs.core_algos.compute_policy_loss_luspo
        from verl.trainer.ppo import core_algos as ca
        assert ca.get_policy_loss_fn("vanilla").__module__ == "verl.trainer.ppo.core_algos"
        print("OK")
        """
    )
    assert out == "OK"


def test_entry_point_discovery_can_be_switched_off():
    out = run(
        """
        import verl
        from verl.trainer.ppo import core_algos as ca
        print("luspo" in ca.POLICY_LOSS_REGISTRY)
        """,
        VERL_USE_EXTERNAL_PLUGINS="none",
    )
    assert out == "False"


def test_take_over_env_var_replaces_verls_functions():
    out = run(
        """
        import verl
        import luspo_rs.core_algos as ours
        import luspo_rs.verl as plugin
        from verl.trainer.ppo import core_algos as ca
        import verl.workers.utils.losses as losses
        assert plugin.taken_over()
        assert ca.get_policy_loss_fn("vanilla") is ours.compute_policy_loss_vanilla
        assert ca.get_policy_loss_fn("gspo") is ours.compute_policy_loss_gspo
        for name, (attr, fn) in plugin.TAKEN_OVER_ESTIMATORS.items():
            assert ca.get_adv_estimator_fn(name) is fn, name
            assert getattr(ca, attr) is fn, attr
        assert ca.kl_penalty is ours.kl_penalty and losses.kl_penalty is ours.kl_penalty
        # estimators verl keeps (if any): untouched
        for name, fn in ca.ADV_ESTIMATOR_REGISTRY.items():
            if name not in plugin.TAKEN_OVER_ESTIMATORS:
                assert fn.__module__ == "verl.trainer.ppo.core_algos", name
        # restore() gives verl's originals back
        plugin.restore()
        assert ca.get_policy_loss_fn("vanilla").__module__ == "verl.trainer.ppo.core_algos"
        assert ca.compute_grpo_outcome_advantage.__module__ == "verl.trainer.ppo.core_algos"
        assert ca.get_adv_estimator_fn("rloo").__module__ == "verl.trainer.ppo.core_algos"
        assert losses.kl_penalty.__module__ == "verl.trainer.ppo.core_algos"
        assert not plugin.taken_over()
        assert ca.get_policy_loss_fn("luspo") is ours.compute_policy_loss_luspo
        print("OK")
        """,
        VERL_USE_EXTERNAL_MODULES="luspo_rs.verl",
        LUSPO_RS_TAKE_OVER="1",
    )
    assert out == "OK"


def test_take_over_replaces_all_twelve_policy_losses_with_verls_numbers():
    # every loss verl 0.9.1 registers (and compute_policy_loss_reinforce, which
    # bypass mode calls by name): the registry entry and the module attribute
    # are ours, and give verl's loss, gradient and metrics (Clip-Cov, KL-Cov
    # and bypass mode, whose numbers need a seeded choice and a rollout
    # correction config: tests/test_cov_losses.py)
    out = run(
        """
        import torch
        import verl
        import luspo_rs.core_algos as ours
        import luspo_rs.verl as plugin
        from verl.trainer.ppo import core_algos as ca
        from verl.workers.config import ActorConfig, PolicyLossConfig
        names = set(ca.POLICY_LOSS_REGISTRY) - {"luspo"}
        assert len(names) == 12, sorted(names)
        verls = {n: ca.get_policy_loss_fn(n) for n in names}
        cfg = ActorConfig(strategy="fsdp", clip_ratio=0.2, clip_ratio_high=0.28, ppo_micro_batch_size_per_gpu=1,
                          rollout_n=1, policy_loss=PolicyLossConfig(dro_beta=0.3))
        g = torch.Generator().manual_seed(1)
        old = -torch.rand(6, 40, generator=g) * 2
        lp = old + 0.3 * torch.randn(6, 40, generator=g)
        adv = torch.randn(6, 1, generator=g).expand(6, 40).contiguous()
        mask = torch.arange(40)[None, :] < torch.tensor([40, 3, 27, 1, 15, 39])[:, None]
        def run(fn):
            x = lp.clone().requires_grad_()
            loss, metrics = fn(old, x, adv, mask, loss_agg_mode="token-mean", config=cfg)
            loss.backward()
            return loss.detach(), x.grad, metrics
        plugin.take_over()
        checked = 0
        for n in sorted(names):
            fn = ca.get_policy_loss_fn(n)
            assert fn is ours.POLICY_LOSSES[n] and getattr(ca, fn.__name__) is fn, n
            if n in ("clip_cov", "kl_cov", "bypass_mode"):
                continue
            (l1, g1, m1), (l2, g2, m2) = run(verls[n]), run(fn)
            torch.testing.assert_close(l2, l1, atol=1e-6, rtol=1e-5)
            torch.testing.assert_close(g2, g1, atol=1e-6, rtol=1e-5)
            assert set(m1) <= set(m2), n
            for k, v in m1.items():
                assert abs(m2[k] - v) <= 1e-6 + 1e-5 * abs(v), (n, k)
            checked += 1
        assert ca.compute_policy_loss_reinforce is ours.compute_policy_loss_reinforce
        plugin.restore()
        for n in names:
            assert ca.get_policy_loss_fn(n) is verls[n], n
        assert ca.compute_policy_loss_reinforce.__module__ == "verl.trainer.ppo.core_algos"
        print("OK", checked)
        """,
        VERL_USE_EXTERNAL_MODULES="luspo_rs.verl",
    )
    assert out == "OK 9"


def test_take_over_by_call_and_reimport_is_harmless():
    out = run(
        """
        import importlib, sys
        from verl.trainer.ppo import core_algos as ca
        assert "luspo" not in ca.POLICY_LOSS_REGISTRY  # no env var, no entry points: nothing registered
        import luspo_rs.verl as plugin
        original = ca.get_policy_loss_fn("vanilla")
        assert not plugin.taken_over()
        plugin.take_over()
        plugin.take_over()
        importlib.reload(plugin)
        del sys.modules["luspo_rs.verl"]
        import luspo_rs.verl as plugin2
        plugin2.take_over()
        assert plugin2.taken_over()
        plugin.restore()  # the first module object still holds verl's originals
        assert ca.get_policy_loss_fn("vanilla") is original
        assert "luspo" in ca.POLICY_LOSS_REGISTRY
        print("OK")
        """,
        VERL_USE_EXTERNAL_PLUGINS="none",
    )
    assert out == "OK"


def test_taken_over_estimators_are_what_verls_trainer_calls():
    """verl's ray_trainer.compute_advantage calls core_algos.compute_gae_advantage_return
    for gae, core_algos.compute_grpo_outcome_advantage for grpo and
    get_adv_estimator_fn(name)(token_level_rewards=, response_mask=, config=, index=
    [, reward_baselines=] [, sum_pi_squared=, old_log_probs=, rollout_is_weights=]) for the others (ray_trainer itself needs torchdata, not a
    test dependency, so the three call forms are made here the same way)."""
    out = run(
        """
        import numpy as np, torch
        from verl.trainer.ppo import core_algos as ca
        from verl.trainer.config import AlgoConfig
        g = torch.Generator().manual_seed(0)
        B, T = 8, 5
        kw = dict(token_level_rewards=torch.randn(B, T, generator=g),
                  response_mask=torch.ones(B, T, dtype=torch.int64),
                  index=np.array([f"u{i // 2}" for i in range(B - 1)] + ["solo"], dtype=object))
        values, baselines = torch.randn(B, T, generator=g), torch.randn(B, generator=g)
        p = torch.rand(B, T, generator=g) * 0.9 + 0.05
        otb = dict(sum_pi_squared=p * p, old_log_probs=p.log(), rollout_is_weights=torch.rand(B, T, generator=g) + 0.5)
        names = ["grpo", "grpo_vectorized", "rloo", "rloo_vectorized", "reinforce_plus_plus_baseline", "opo", "gpg",
                 "grpo_passk", "gdpo", "gae", "reinforce_plus_plus", "remax",
                 "optimal_token_baseline", "tir_optimal_token_baseline"]
        config = AlgoConfig(gamma=0.99, lam=0.95, gdpo_reward_keys=["acc", "fmt"], gdpo_reward_weights=[1.0, 0.5])
        # gdpo: the trainer also passes the batch (per-key scores, prompts, attention mask)
        gdpo = dict(non_tensor_batch={"uid": kw["index"], "acc": np.arange(B) % 2 * 1.0, "fmt": list(np.linspace(0, 1, B))},
                    batch={"prompts": torch.zeros(B, 3, dtype=torch.int64),
                           "attention_mask": torch.ones(B, 3 + T, dtype=torch.int64)})
        pairs = np.array([f"u{i // 2}" for i in range(B)], dtype=object)  # Pass@k: no singleton
        def call(name):
            if name == "gae":
                return ca.compute_gae_advantage_return(token_level_rewards=kw["token_level_rewards"], values=values,
                                                       response_mask=kw["response_mask"], gamma=config.gamma,
                                                       lam=config.lam)
            if name == "grpo":
                return ca.compute_grpo_outcome_advantage(norm_adv_by_std_in_grpo=True, **kw)
            extra = dict(reward_baselines=baselines) if name == "remax" else gdpo if name == "gdpo" else {}
            if "optimal_token_baseline" in name:
                extra = otb
            if name == "grpo_passk":
                return ca.get_adv_estimator_fn(name)(config=config, **dict(kw, index=pairs))
            return ca.get_adv_estimator_fn(name)(config=config, **kw, **extra)
        want = {n: [t.clone() for t in call(n)] for n in names}
        import luspo_rs.verl as plugin
        plugin.take_over()
        for n in names:
            assert ca.get_adv_estimator_fn(n).__module__ == "luspo_rs.core_algos", n
            for got, w in zip(call(n), want[n]):
                torch.testing.assert_close(got, w, atol=1e-5, rtol=1e-5)
        print("OK")
        """
    )
    assert out == "OK"


def test_modules_that_imported_kl_penalty_by_name_are_taken_over_and_restored_by_identity():
    # issue 20 D1: verl/trainer/distillation/losses.py binds kl_penalty by name;
    # imported before take_over() it must be taken over, imported after it must be restored
    out = run(
        """
        import sys, types
        from verl.trainer.ppo import core_algos as ca
        import luspo_rs.core_algos as ours
        verl_kl = ca.kl_penalty
        import verl.trainer.distillation.losses as before
        assert before.kl_penalty is verl_kl
        import luspo_rs.verl as plugin
        plugin.take_over()
        assert before.kl_penalty is ours.kl_penalty, "a module imported before take_over() keeps verl's"
        after = types.ModuleType("verl._imported_after")
        from verl.trainer.ppo.core_algos import kl_penalty as bound_later
        after.kl_penalty = bound_later
        sys.modules["verl._imported_after"] = after
        assert after.kl_penalty is ours.kl_penalty
        plugin.restore()
        assert before.kl_penalty is verl_kl and ca.kl_penalty is verl_kl
        assert after.kl_penalty is verl_kl, "a module imported after take_over() keeps ours after restore()"
        print("OK")
        """,
        VERL_USE_EXTERNAL_PLUGINS="none",
    )
    assert out == "OK"


def test_restore_after_a_reimport_while_taken_over_and_for_entries_verl_never_had():
    # issue 20 D2: the originals survive `del sys.modules[...]` and a re-import;
    # an entry verl did not have is deleted again, not set to None
    out = run(
        """
        import sys
        from verl.trainer.ppo import core_algos as ca
        original = ca.get_policy_loss_fn("vanilla")
        original_grpo = ca.compute_grpo_outcome_advantage
        del ca.ADV_ESTIMATOR_REGISTRY["gpg"]
        import luspo_rs.verl as plugin
        plugin.take_over()
        assert ca.ADV_ESTIMATOR_REGISTRY["gpg"].__module__ == "luspo_rs.core_algos"
        del sys.modules["luspo_rs.verl"]
        import luspo_rs.verl as again
        assert again is not plugin and again.taken_over()
        again.restore()
        assert ca.get_policy_loss_fn("vanilla") is original
        assert ca.compute_grpo_outcome_advantage is original_grpo
        assert "gpg" not in ca.ADV_ESTIMATOR_REGISTRY, "restore() wrote back an entry verl never had"
        assert not again.taken_over()
        print("OK")
        """,
        VERL_USE_EXTERNAL_PLUGINS="none",
    )
    assert out == "OK"


def test_take_over_replaces_the_value_loss_verls_critic_calls():
    # verl.workers.utils.losses.value_loss, the critic's loss function, calls
    # compute_value_loss, imported by name from core_algos: taken over, verl's
    # own value_loss (padding a flat model output, its config, its normalisers)
    # runs our fused loss and gives verl's numbers; restore() undoes it
    out = run(
        """
        import torch
        from tensordict import TensorDict
        from verl.trainer.ppo import core_algos as ca
        from verl.utils import tensordict_utils as tu
        from verl.workers.config import CriticConfig
        import verl.workers.utils.losses as losses
        import luspo_rs.core_algos as ours
        verl_fn = ca.compute_value_loss
        assert losses.compute_value_loss is verl_fn
        B, P, R = 5, 3, 9
        g = torch.Generator().manual_seed(0)
        attn = torch.zeros(B, P + R, dtype=torch.int64)
        attn[:, :P] = 1
        for i, L in enumerate([9, 2, 0, 5, 1]):
            attn[i, P:P + L] = 1
        values = torch.randn(B, R, generator=g)
        returns = values + torch.randn(B, R, generator=g)
        flat = torch.randn(int(attn.sum()), generator=g)  # the critic's unpadded output
        cfg = CriticConfig(strategy="fsdp", ppo_micro_batch_size_per_gpu=1, cliprange_value=0.2,
                           loss_agg_mode="seq-mean-token-mean")
        def step():
            data = TensorDict(dict(prompts=torch.ones(B, P, dtype=torch.int64),
                                   responses=torch.ones(B, R, dtype=torch.int64), attention_mask=attn,
                                   values=values, returns=returns, response_mask=attn[:, P:].clone()),
                              batch_size=[B])
            tu.assign_non_tensor(data, dp_size=2, batch_num_tokens=40, global_batch_size=12)
            x = flat.clone().requires_grad_()
            loss, metrics = losses.value_loss(cfg, {"values": x}, data)
            loss.backward()
            return loss, x.grad, metrics["critic/vf_clipfrac"]
        want = step()
        assert 0 < want[2] < 1, want
        import luspo_rs.verl as plugin
        plugin.take_over()
        assert ca.compute_value_loss is ours.compute_value_loss
        assert losses.compute_value_loss is ours.compute_value_loss
        got = step()
        assert type(got[0].grad_fn).__name__ == "ValueLossFunctionBackward", got[0].grad_fn
        torch.testing.assert_close(got[0], want[0], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(got[1], want[1], atol=1e-6, rtol=1e-5)
        assert abs(got[2] - want[2]) < 1e-6
        plugin.restore()
        assert ca.compute_value_loss is verl_fn and losses.compute_value_loss is verl_fn
        assert type(step()[0].grad_fn).__name__ != "ValueLossFunctionBackward"
        print("OK")
        """,
        VERL_USE_EXTERNAL_PLUGINS="none",
    )
    assert out == "OK"
