"""LUSPO inside verl's own actor update, on the CPU.

verl 0.9.1 no longer has ``DataParallelPPOActor`` (``verl.workers.actor`` was
removed after 0.7.x). Its replacement — what ``RayPPOTrainer._update_actor``
drives — is the engine stack: ``TrainingWorker.train_mini_batch`` ->
``FSDPEngineWithLMHead.train_batch`` -> ``verl.workers.utils.losses.ppo_loss``
-> ``core_algos.get_policy_loss_fn(config.policy_loss.loss_mode)``. This test
runs that real stack (verl's classes, FSDP2 over a 1-rank gloo group) around a
tiny randomly initialised Qwen2 built from a transformers config (nothing is
downloaded), with ``policy_loss.loss_mode=luspo`` registered by
``VERL_USE_EXTERNAL_MODULES=luspo_rs.verl``, and compares the parameter update
with the one a reference LUSPO built from verl's own building blocks gives
(verl's GSPO token loss aggregated by verl's ``agg_loss("seq-mean-token-sum")``).

What it takes to run verl's actor on a CPU, all in this test, none in luspo_rs:

* a CPU platform registered through verl's own extension point
  (``verl.plugin.platform.PlatformRegistry``) and selected with
  ``VERL_PLATFORM=cpu``: verl otherwise falls back to its "nvidia" platform and
  calls ``torch.cuda.current_device()``; its device module answers verl's memory
  and RNG queries with zeros / the CPU RNG;
* ``VERL_ENGINE_DEVICE=cuda``: the FSDP engine is registered for cuda/npu only;
  this documented override lets the real ``FSDPEngineWithLMHead`` be picked;
* the 1-rank gloo process group initialised by the test (verl would build the
  backend string ``"cpu:gloo,cpu:gloo"`` on a CPU platform, which torch rejects);
* config only: sdpa attention, no remove-padding, no torch.compile, fp32 mixed
  precision, SGD without gradient clipping (so the update is ``-lr * grad`` and
  compares gradients, scale included).

The step runs in a subprocess (it sets process-wide environment variables and a
process group). It takes ~15 s on 2 cores.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("transformers")

LR = 0.01


def run_actor_steps() -> dict:  # noqa: C901 - a script, run in a subprocess
    os.environ.update(
        RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
        VERL_PLATFORM="cpu", VERL_ENGINE_DEVICE="cuda", VERL_USE_EXTERNAL_MODULES="luspo_rs.verl",
    )  # fmt: skip
    import tempfile
    from contextlib import contextmanager
    from functools import partial
    from types import SimpleNamespace

    import numpy as np
    import torch
    import torch.distributed

    # The process group's rendezvous: a TCPStore on port 0, i.e. a free port the OS
    # picks when the store binds it and that the store holds for the whole run (no
    # fixed port another run or service could hold, no window between picking and
    # binding). verl's Worker reads MASTER_PORT, so it gets the real one.
    store = torch.distributed.TCPStore("127.0.0.1", 0, world_size=1, is_master=True, wait_for_workers=False)
    os.environ["MASTER_PORT"] = str(store.port)
    from verl.plugin.platform.platform_base import PlatformBase
    from verl.plugin.platform.platform_manager import PlatformRegistry

    class CpuDeviceModule(SimpleNamespace):
        """What verl asks ``torch.<device>`` for, answered for a CPU."""

        def __getattr__(self, name):
            if name.startswith("__"):
                raise AttributeError(name)
            if name == "mem_get_info":
                return lambda *a, **k: (0, 0)
            if "memory" in name:
                return lambda *a, **k: 0
            if name == "is_available":
                return lambda: True
            if name == "get_device_name":
                return lambda *a, **k: "CPU"
            if name == "device_count":
                return lambda: 1
            if name == "current_device":
                return lambda: "cpu"
            if name in ("get_rng_state", "get_rng_state_all"):
                return lambda *a, **k: torch.get_rng_state()
            return lambda *a, **k: None

    @PlatformRegistry.register(platform="cpu")
    class CpuPlatform(PlatformBase):
        device_name = "cpu"
        vendor_name = "cpu"
        device_module = CpuDeviceModule()

        def is_available(self):
            return True

        def current_device(self):
            return "cpu"

        def device_count(self):
            return 1

        def set_device(self, device_index):
            pass

        def synchronize(self, device_index=None):
            pass

        def manual_seed(self, seed):
            torch.manual_seed(seed)

        def manual_seed_all(self, seed):
            torch.manual_seed(seed)

        def set_allocator_settings(self, settings):
            pass

        def empty_cache(self):
            pass

        def get_device_capability(self, device_index=0):
            return (None, None)

        def communication_backend_name(self):
            return "gloo"

        def visible_devices_envvar(self):
            return "CUDA_VISIBLE_DEVICES"

        @contextmanager
        def nvtx_range(self, msg):
            yield

        def profiler_start(self):
            pass

        def profiler_stop(self):
            pass

        def ray_resource_name(self):
            return "CPU"

        def ray_noset_envvars(self):
            return []

        def is_ipc_supported(self):
            return False

        def cudart(self):
            return None

    from transformers import Qwen2Config, Qwen2ForCausalLM

    import verl.trainer.ppo.core_algos as core_algos
    from verl import DataProto
    from verl.utils import tensordict_utils as tu
    from verl.workers.config import (
        FSDPActorConfig,
        FSDPEngineConfig,
        FSDPOptimizerConfig,
        HFModelConfig,
        PolicyLossConfig,
        TrainingWorkerConfig,
    )
    from verl.workers.engine_workers import TrainingWorker
    from verl.workers.utils.losses import ppo_loss
    from verl.workers.utils.padding import left_right_2_no_padding, no_padding_2_padding

    import luspo_rs.core_algos as ours

    # --- the plug-in registered by verl itself, via VERL_USE_EXTERNAL_MODULES ---------------
    registered = core_algos.get_policy_loss_fn("luspo") is ours.compute_policy_loss_luspo
    calls = {"luspo": 0, "reference": 0}

    def spy(*args, **kwargs):
        calls["luspo"] += 1
        return ours.compute_policy_loss_luspo(*args, **kwargs)

    core_algos.POLICY_LOSS_REGISTRY["luspo"] = spy

    @core_algos.register_policy_loss("luspo_reference")
    def luspo_reference(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean",
                        config=None, rollout_is_weights=None):  # fmt: skip
        """LUSPO from verl's building blocks: GSPO token loss + agg_loss seq-mean-token-sum."""
        calls["reference"] += 1
        return core_algos.compute_policy_loss_gspo(
            old_log_prob, log_prob, advantages, response_mask, "seq-mean-token-sum", config, rollout_is_weights
        )

    torch.manual_seed(0)
    vocab = 128
    model_dir = tempfile.mkdtemp(prefix="luspo_tiny_qwen2_")
    hf_cfg = Qwen2Config(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )  # fmt: skip
    hf_cfg.architectures = ["Qwen2ForCausalLM"]
    Qwen2ForCausalLM(hf_cfg).save_pretrained(model_dir)
    model_config = HFModelConfig(
        path=model_dir, load_tokenizer=False, override_config={"attn_implementation": "sdpa"},
        use_remove_padding=False, enable_gradient_checkpointing=False,
    )  # fmt: skip

    rollout_n, n_prompts = 4, 2
    bsz = rollout_n * n_prompts

    def make_worker(loss_mode):
        actor_cfg = FSDPActorConfig(
            strategy="fsdp2", rollout_n=rollout_n, ppo_mini_batch_size=n_prompts, ppo_micro_batch_size_per_gpu=2,
            use_dynamic_bsz=False, clip_ratio=0.2, clip_ratio_low=0.2, clip_ratio_high=0.28,
            # LUSPO ignores loss_agg_mode: a token-mean config must not change it
            loss_agg_mode="token-mean", policy_loss=PolicyLossConfig(loss_mode=loss_mode),
            entropy_coeff=0.0, use_kl_loss=False, use_torch_compile=False,
            fsdp_config=FSDPEngineConfig(
                strategy="fsdp2", use_torch_compile=False,
                mixed_precision={"param_dtype": "fp32", "reduce_dtype": "fp32", "buffer_dtype": "fp32"},
            ),
            optim=FSDPOptimizerConfig(optimizer="SGD", optimizer_impl="torch.optim", lr=LR, weight_decay=0.0,
                                      clip_grad=1e9, total_training_steps=10),
            model_config=model_config,
        )  # fmt: skip
        train_cfg = TrainingWorkerConfig(
            model_type="language_model", model_config=model_config, engine_config=actor_cfg.engine,
            optimizer_config=actor_cfg.optim, checkpoint_config=actor_cfg.checkpoint,
        )  # fmt: skip
        # what ActorRolloutRefWorker.init_model copies from the actor config
        train_cfg.engine_config.use_dynamic_bsz = actor_cfg.use_dynamic_bsz
        train_cfg.engine_config.micro_batch_size_per_gpu = actor_cfg.ppo_micro_batch_size_per_gpu
        train_cfg.engine_config.max_token_len_per_gpu = actor_cfg.ppo_max_token_len_per_gpu
        train_cfg.engine_config.infer_micro_batch_size_per_gpu = actor_cfg.ppo_micro_batch_size_per_gpu
        train_cfg.engine_config.use_remove_padding = False
        worker = TrainingWorker(config=train_cfg)
        worker.reset()
        worker.set_loss_fn(partial(ppo_loss, config=actor_cfg))
        return worker, actor_cfg

    def params(worker):
        out = {}
        for name, p in worker.engine.module.named_parameters():
            p = p.full_tensor() if hasattr(p, "full_tensor") else p
            out[name] = p.detach().clone()
        return out

    # --- one synthetic rollout batch (left-padded prompts, right-padded responses) -------------
    g = torch.Generator().manual_seed(1)
    P, R = 5, 8
    prompt_lens = torch.randint(2, P + 1, (bsz,), generator=g)
    resp_lens = torch.randint(1, R + 1, (bsz,), generator=g)
    prompt_mask = (torch.arange(P)[None, :] >= (P - prompt_lens)[:, None]).long()
    response_mask = (torch.arange(R)[None, :] < resp_lens[:, None]).long()
    prompts = torch.randint(3, vocab, (bsz, P), generator=g) * prompt_mask
    responses = torch.randint(3, vocab, (bsz, R), generator=g) * response_mask
    attention_mask = torch.cat([prompt_mask, response_mask], dim=1)
    uid = np.array([f"prompt-{i // rollout_n}" for i in range(bsz)], dtype=object)
    token_level_rewards = torch.zeros(bsz, R)
    token_level_rewards[torch.arange(bsz), resp_lens - 1] = torch.randint(0, 2, (bsz,), generator=g).float()
    token_level_rewards[0, resp_lens[0] - 1] = 1.0
    token_level_rewards[1, resp_lens[1] - 1] = 0.0  # each group has a non-zero advantage
    advantages, returns = ours.compute_grpo_outcome_advantage(token_level_rewards, response_mask, uid)

    def batch_for(worker):
        batch = DataProto.from_dict(
            tensors={
                "prompts": prompts, "responses": responses, "attention_mask": attention_mask,
                "input_ids": torch.cat([prompts, responses], dim=1),
                "position_ids": torch.clamp(torch.cumsum(attention_mask, dim=-1) - 1, min=0),
                "response_mask": response_mask, "advantages": advantages, "returns": returns,
            },
            non_tensors={"uid": uid},
            meta_info={"temperature": 1.0, "multi_turn": False},
        )  # fmt: skip
        # old log-probs from the actor itself, as RayPPOTrainer._compute_old_log_prob does; a
        # fixed perturbation makes the sequence ratios differ from 1 so that clipping happens
        td = left_right_2_no_padding(batch.to_tensordict())
        tu.assign_non_tensor(td, calculate_entropy=False, calculate_sum_pi_squared=False, compute_loss=False)
        old = no_padding_2_padding(tu.get(worker.infer_batch(td), "log_probs"), td).float()
        noise = torch.randn(old.shape, generator=torch.Generator().manual_seed(2)) * 0.3
        batch.batch["old_log_probs"] = old + noise * response_mask
        return batch

    def update(worker, actor_cfg):
        td = left_right_2_no_padding(batch_for(worker).to_tensordict())
        mini = actor_cfg.ppo_mini_batch_size * rollout_n
        tu.assign_non_tensor(
            td, calculate_entropy=False, distillation_use_topk=False, distillation_only=False,
            global_batch_size=mini, mini_batch_size=mini, epochs=1, seed=actor_cfg.data_loader_seed,
            dataloader_kwargs={"shuffle": False}, compute_loss=True,
        )  # fmt: skip
        before = params(worker)
        metrics = tu.get(worker.train_mini_batch(td), "metrics")
        after = params(worker)
        return {k: after[k] - before[k] for k in before}, metrics

    torch.distributed.init_process_group(backend="gloo", store=store, rank=0, world_size=1)
    results = {"registered": registered}
    deltas = {}
    for mode in ("luspo", "luspo_reference", "gspo"):
        torch.manual_seed(0)
        worker, cfg = make_worker(mode)
        deltas[mode], metrics = update(worker, cfg)
        results[mode] = {k: [float(x) for x in (v if isinstance(v, list) else [v])] for k, v in metrics.items()}
    results["calls"] = calls
    diff = max((deltas["luspo"][k] - deltas["luspo_reference"][k]).abs().max().item() for k in deltas["luspo"])
    scale = max(deltas["luspo_reference"][k].abs().max().item() for k in deltas["luspo"])
    results["max_abs_update_diff"] = diff
    # verl's GSPO with the config's token-mean: what LUSPO must differ from
    results["max_abs_update_diff_vs_gspo_token_mean"] = max(
        (deltas["luspo"][k] - deltas["gspo"][k]).abs().max().item() for k in deltas["luspo"]
    )
    results["max_abs_update"] = scale
    results["all_finite"] = all(torch.isfinite(d).all().item() for d in deltas["luspo"].values())
    torch.distributed.destroy_process_group()
    return results


@pytest.fixture(scope="module")
def actor_results():
    env = {k: v for k, v in os.environ.items() if k != "LUSPO_RS_TAKE_OVER"}
    r = subprocess.run([sys.executable, __file__], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, f"stdout:\n{r.stdout[-4000:]}\nstderr:\n{r.stderr[-8000:]}"
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_luspo_is_registered_by_verl_itself(actor_results):
    assert actor_results["registered"]


def test_actor_step_ran_through_our_loss(actor_results):
    # one mini-batch of 8 responses (2 prompts x 4) in micro-batches of 2: one call per micro-batch
    assert actor_results["calls"]["luspo"] == 4
    assert actor_results["calls"]["luspo"] == actor_results["calls"]["reference"]


def test_actor_step_metrics_are_finite_and_match_the_reference(actor_results):
    ours, ref = actor_results["luspo"], actor_results["luspo_reference"]
    for key in ("actor/pg_loss", "actor/pg_clipfrac", "actor/ppo_kl", "grad_norm"):
        assert key in ours, sorted(ours)
        assert all(x == x and abs(x) != float("inf") for x in ours[key]), key
        assert sum(ours[key]) == pytest.approx(sum(ref[key]), rel=1e-4, abs=1e-6), key
    assert sum(ours["actor/pg_clipfrac"]) > 0  # the perturbed old log-probs make clipping happen
    assert actor_results["all_finite"]


def test_actor_step_parameter_update_equals_the_reference(actor_results):
    """SGD, no clipping: the update is -lr * grad; equal to 1e-4 of its largest entry."""
    assert actor_results["max_abs_update"] > 0
    assert actor_results["max_abs_update_diff"] <= 1e-4 * actor_results["max_abs_update"]
    # and the comparison can tell: verl's GSPO aggregated token-mean moves the weights differently
    assert actor_results["max_abs_update_diff_vs_gspo_token_mean"] > 0.1 * actor_results["max_abs_update"]


if __name__ == "__main__":
    print(json.dumps(run_actor_steps()))
