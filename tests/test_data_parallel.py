"""Data-parallel invariance across two real processes (torch.distributed, gloo).

verl's actor normalises every micro-batch loss by *global* counts so that the
gradient DDP/FSDP produces (each rank's gradient, all-reduced with SUM and
divided by the world size) does not depend on how the batch is split over
ranks. What verl 0.9.1 fills in (``FSDPEngine.forward_backward_batch`` and
``TrainingWorker.train_mini_batch`` -> ``ppo_loss``, which copies them into
``config.global_batch_info`` for the policy loss's ``agg_loss``):

* ``dp_size``: the data-parallel world size;
* ``batch_num_tokens``: ``loss_mask.sum()`` all-reduced (SUM) over the DP group,
  i.e. the global number of valid tokens;
* ``global_batch_size``: ``ppo_mini_batch_size * rollout.n``, the global number
  of *rows*, fully masked rows included;
* ``loss_scale_factor``: ``actor.loss_scale_factor`` (``None`` by default, then
  ``seq-mean-token-sum-norm`` divides by the local padded length ``T``).

Here a batch of B=12 rows with very unequal lengths (two fully masked rows, all
on rank 0) is split over 2 ranks. Each rank computes the loss on its shard,
calls ``backward()`` and embeds its ``d loss / d log_prob`` into a zero (B, T)
tensor (``log_prob`` playing the replicated parameter); the ranks all-reduce
these (SUM, then / world size, as DDP and FSDP do; like DDP's buckets, one flat
buffer per dtype holding every case). The result must equal the gradient of
the same function over the whole batch in one process, to 1e-6 absolute, for
every policy-loss mode of luspo_rs (vanilla, gspo, luspo, and the token rules
of issue 17: cispo, sapo, gpg, dro, dppo_tv, dppo_kl, reinforce), ``agg_loss`` and the
value loss (``compute_value_loss``: ``log_prob`` plays ``vpreds``; no IS weights), every
``loss_agg_mode``, with and without IS weights, in float64 and float32, in two
layouts and under two conventions for the normalisers.

Conventions:

* ``verl_actor``: exactly what verl's actor passes (above); the single-process
  reference is verl's actor on one rank (``dp_size=1``, ``batch_num_tokens`` =
  all valid tokens, ``global_batch_size`` = B);
* ``defaults``: the single-process reference is the plain function with no
  normaliser at all (``dp_size=1``, counts from the mask: valid tokens,
  non-empty rows, ``T``); the ranks pass ``dp_size=2`` and the global counts
  the defaults would take (valid tokens and *non-empty* rows, all-reduced).

The two references differ for the ``seq-mean-*`` modes when rows are fully
masked: verl's actor counts those rows in ``global_batch_size``, the default does
not. That is verl's convention; luspo_rs follows it.

Layouts: ``same_T`` (every shard keeps the batch's T columns) and ``own_T`` (each
rank pads its shard only to its own longest response, as verl's
``to_padded_tensor`` pads each micro-batch); with ``own_T`` the ranks pass a fixed
``loss_scale_factor = T``, as verl's ``agg_loss`` docstring asks for.

The same cases run through verl 0.9.1's own functions (``compute_policy_loss_vanilla``,
``compute_policy_loss_gspo``, LUSPO as verl's GSPO + ``agg_loss("seq-mean-token-sum")``,
``get_policy_loss_fn(mode)`` for the token rules and ``compute_policy_loss_reinforce``,
``agg_loss``), so the property is proved for verl and for luspo_rs, and the two
are compared with each other under DP as well. Two controls show the check can
fail: ranks that use their *local* counts (``dp_size=1``, no global normaliser)
give a different gradient, and so does ``seq-mean-token-sum-norm`` without a
fixed ``loss_scale_factor`` when ranks pad to different lengths (for verl and
ours alike).

Precision: the property is algebraic (which counts divide which sums), so float64
makes the 1e-6 bound a pure bookkeeping check (rounding is ~1e-16); a wrong
normaliser moves gradients by a factor such as 10/12 or 2, orders of magnitude
above 1e-6 for gradients of size 1e-3..1. float32, the trainer's dtype, is run
too with the same bound: splitting changes nothing but exact power-of-two scalings
(``* dp_size``, ``/ world``) and the order of the loss's sums, so its gradients also
agree to well under 1e-6 (they came out bitwise equal, for ours and verl's, in
both dtypes); the loss, a sum of up to 182 terms, is compared to
``1e-6 * (1 + |loss|)``.

Launch: one subprocess per rank, both started once for the whole file (they loop
over all cases), rendezvous through a ``TCPStore`` this process hosts on a port
the OS picks (port 0, held open for the whole run: nothing can take it in
between). The parent polls both ranks with a deadline; a crash of either rank
or the deadline kills both and fails with their stderr. It takes ~10 s on 2 cores.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from datetime import timedelta
from typing import Any

import pytest
import torch

WORLD = 2
B, T = 12, 40
# Responses per row; rows 0..5 go to rank 0 (long ones and both fully masked rows),
# rows 6..11 to rank 1 (short ones): 138 vs 44 valid tokens, 4 vs 6 non-empty rows.
LENGTHS = (40, 0, 33, 0, 27, 38, 3, 9, 1, 14, 6, 11)
MODES = ("vanilla", "gspo", "luspo")
#: The token-rule losses of issue 17, called through ``luspo_rs.policy_loss`` (ours)
#: and verl's ``get_policy_loss_fn(mode)`` / ``compute_policy_loss_reinforce``.
EXT_MODES = ("cispo", "sapo", "gpg", "dro", "dppo_tv", "dppo_kl", "reinforce")
EXT_KNOBS = dict(tau_pos=1.0, tau_neg=1.05, dro_beta=0.3)
#: The modes that aggregate one way whatever ``loss_agg_mode`` says.
FIXED_AGG = ("luspo", "sapo")
FNS = MODES + EXT_MODES + ("agg_loss", "value_loss")
AGG_MODES = ("token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")
IMPLS = ("ours", "verl")
DTYPES = {"float64": torch.float64, "float32": torch.float32}
CONVENTIONS = ("verl_actor", "defaults")
LAYOUTS = ("same_T", "own_T")
CLIP = dict(clip_ratio=0.2, clip_ratio_low=0.2, clip_ratio_high=0.28, clip_ratio_c=3.0)

TOL_GRAD = 1e-6  # absolute, on every gradient entry
TOL_LOSS = 1e-6  # absolute + relative, on the loss
DEADLINE_S = 120  # both ranks, imports included; a normal run takes ~10 s
COLLECTIVE_TIMEOUT = timedelta(seconds=60)


# --------------------------------------------------------------------------- cases


def dp_cases() -> list[tuple]:
    """Every (impl, fn, agg, dtype, convention, layout, weights) run on 2 ranks."""
    cases = []
    for impl in IMPLS:
        for fn in FNS:
            for agg in AGG_MODES:
                for dtype in DTYPES:
                    for weights in (False,) if fn == "value_loss" else (False, True):
                        for conv in CONVENTIONS:
                            for layout in LAYOUTS:
                                cases.append((impl, fn, agg, dtype, conv, layout, weights))
                    # control 1: local normalisers (what a trainer unaware of DP would pass)
                    cases.append((impl, fn, agg, dtype, "local", "same_T", False))
                # control 2: per-rank padding with verl's default loss_scale_factor (None -> local T)
                if agg == "seq-mean-token-sum-norm" and fn not in FIXED_AGG:
                    cases.append((impl, fn, agg, "float64", "verl_actor_unfixed_scale", "own_T", False))
    return cases


def reference_convention(conv: str) -> str:
    return "defaults" if conv in ("defaults", "local") else "verl_actor"


def make_batch(dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The global batch: right-padded responses of the lengths above, log-ratios
    of scale 0.6 (so ratios leave the clip range on both sides), token-level
    advantages (verl's losses take (B, T)), IS weights in [0.5, 1.5)."""
    g = torch.Generator().manual_seed(1234)
    old = -3.0 * torch.rand(B, T, generator=g, dtype=torch.float64)
    lp = old + 0.6 * torch.randn(B, T, generator=g, dtype=torch.float64)
    adv = torch.randn(B, 1, generator=g, dtype=torch.float64)
    adv = adv + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)
    weights = 0.5 + torch.rand(B, T, generator=g, dtype=torch.float64)
    mask = torch.arange(T)[None, :] < torch.tensor(LENGTHS)[:, None]
    batch = {k: v.to(dtype) for k, v in dict(old=old, lp=lp, adv=adv, weights=weights).items()}
    batch["mask"] = mask
    return batch


def shard(batch: dict[str, torch.Tensor], rank: int, layout: str) -> tuple[dict[str, torch.Tensor], slice]:
    rows = slice(rank * B // WORLD, (rank + 1) * B // WORLD)
    width = T if layout == "same_T" else max(int(batch["mask"][rows].sum(-1).max()), 1)
    return {k: v[rows, :width] for k, v in batch.items()}, rows


# --------------------------------------------------------------------------- the functions


def _actor_config(global_batch_info: dict[str, Any]):
    from verl.workers.config import ActorConfig, PolicyLossConfig

    knobs = dict(tau_pos=EXT_KNOBS["tau_pos"], tau_neg=EXT_KNOBS["tau_neg"])
    cfg = ActorConfig(strategy="fsdp", ppo_micro_batch_size_per_gpu=1, rollout_n=1, **CLIP, **knobs,
                      policy_loss=PolicyLossConfig(dro_beta=EXT_KNOBS["dro_beta"]))  # fmt: skip
    # as verl.workers.utils.losses.ppo_loss fills it before calling the policy loss
    cfg.global_batch_info.update(global_batch_info)
    return cfg


def loss_and_grad(impl: str, fn: str, agg: str, batch: dict[str, torch.Tensor], weights: bool,
                  global_batch_info: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """``(loss, d loss / d log_prob)`` of one implementation on one batch (or shard)."""
    import verl.trainer.ppo.core_algos as verl_ca

    import luspo_rs.core_algos as ours

    x = batch["lp"].detach().clone().requires_grad_(True)
    w = batch["weights"] if weights else None
    if fn == "value_loss":
        # the critic: old values, predictions 0.6 away (past the clip range
        # 0.2 on both sides), returns about 1 away; normalisers as verl's
        # workers.utils.losses.value_loss passes them
        value_fn = ours.compute_value_loss if impl == "ours" else verl_ca.compute_value_loss
        loss, _ = value_fn(x, batch["old"] + batch["adv"], batch["old"], batch["mask"], 0.2, agg, **global_batch_info)
    elif fn == "agg_loss":
        # any differentiable loss matrix: a REINFORCE-style ratio loss
        loss_mat = -batch["adv"] * torch.exp(x - batch["old"])
        if w is not None:
            loss_mat = loss_mat * w
        agg_fn = ours.agg_loss if impl == "ours" else verl_ca.agg_loss
        loss = agg_fn(loss_mat, batch["mask"], agg, **global_batch_info)
    elif fn in EXT_MODES and impl == "ours":
        import luspo_rs

        loss, _ = luspo_rs.policy_loss(batch["old"], x, batch["adv"], batch["mask"], mode=fn, loss_agg_mode=agg,
                                       rollout_is_weights=w, **CLIP, **EXT_KNOBS, **global_batch_info)  # fmt: skip
    else:
        if fn in EXT_MODES:
            # REINFORCE is bypass mode's loss, not registered under its name
            policy_fn = verl_ca.compute_policy_loss_reinforce if fn == "reinforce" else verl_ca.get_policy_loss_fn(fn)
        elif impl == "ours":
            policy_fn = getattr(ours, f"compute_policy_loss_{fn}")
        elif fn == "vanilla":
            policy_fn = verl_ca.compute_policy_loss_vanilla
        else:  # LUSPO is not in verl 0.9.1: verl's GSPO token loss aggregated seq-mean-token-sum
            policy_fn = verl_ca.compute_policy_loss_gspo
            agg = "seq-mean-token-sum" if fn == "luspo" else agg
        loss, _ = policy_fn(
            batch["old"], x, batch["adv"], batch["mask"], loss_agg_mode=agg,
            config=_actor_config(global_batch_info), rollout_is_weights=w,
        )  # fmt: skip
    loss.backward()
    return loss.detach().clone(), x.grad.detach().clone()


def single_process_info(conv: str, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
    if conv == "defaults":
        return {}
    # verl's actor on one rank
    return dict(dp_size=1, batch_num_tokens=int(batch["mask"].sum()), global_batch_size=B, loss_scale_factor=None)


def _check_verl_is_verl() -> None:
    """LUSPO_RS_TAKE_OVER would make verl's functions ours: the comparison would be void."""
    import verl.trainer.ppo.core_algos as verl_ca

    fns = [getattr(verl_ca, n) for n in ("compute_policy_loss_vanilla", "compute_policy_loss_gspo", "agg_loss",
                                         "compute_value_loss", "compute_policy_loss_reinforce")]  # fmt: skip
    fns += [verl_ca.get_policy_loss_fn(m) for m in EXT_MODES if m != "reinforce"]
    for fn in fns:
        name, module = fn.__name__, fn.__module__
        assert module.startswith("verl."), f"verl's {name} is replaced by {module}; unset LUSPO_RS_TAKE_OVER"


# --------------------------------------------------------------------------- one rank


def run_rank(rank: int, port: int, out_path: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    _check_verl_is_verl()
    store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=COLLECTIVE_TIMEOUT)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=WORLD, timeout=COLLECTIVE_TIMEOUT)

    def all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        return value

    batches = {name: make_batch(dtype) for name, dtype in DTYPES.items()}
    # the global counts, with collectives, as verl's engine computes batch_num_tokens
    # (the mask, hence every count, is the same for both dtypes)
    counts = {}
    for layout in LAYOUTS:
        mask = shard(batches["float64"], rank, layout)[0]["mask"]
        local_counts = torch.stack([mask.sum(), (mask.sum(-1) > 0).sum()]).to(torch.int64)
        counts[layout] = [int(c) for c in all_reduce_sum(local_counts)]
    local_results = {}
    for case in dp_cases():
        impl, fn, agg, dtype, conv, layout, weights = case
        part, rows = shard(batches[dtype], rank, layout)
        tokens, rows_nonempty = counts[layout]
        if conv in ("verl_actor", "verl_actor_unfixed_scale"):
            info = dict(dp_size=WORLD, batch_num_tokens=tokens, global_batch_size=B, loss_scale_factor=None)
        elif conv == "defaults":
            info = dict(dp_size=WORLD, batch_num_tokens=tokens, global_batch_size=rows_nonempty)
        else:  # "local": a trainer unaware of the split
            info = {}
        if layout == "own_T" and conv != "verl_actor_unfixed_scale":
            info["loss_scale_factor"] = T  # a fixed actor.loss_scale_factor
        loss, grad = loss_and_grad(impl, fn, agg, part, weights, info)
        # DDP/FSDP: every rank holds a (B, T) gradient for the replicated log_prob,
        # zero outside its shard
        full = torch.zeros(B, T, dtype=grad.dtype)
        full[rows, : grad.shape[1]] = grad
        local_results[case] = (loss, full)
    # ... all-reduced with SUM and divided by the world size; like DDP's buckets, one
    # flat buffer per dtype (the losses ride along, averaged the same way)
    results = {}
    for dtype in DTYPES:
        bucket = [c for c in local_results if c[3] == dtype]
        flat = torch.cat([torch.cat([local_results[c][0].reshape(1), local_results[c][1].reshape(-1)]) for c in bucket])
        flat = all_reduce_sum(flat) / WORLD
        for c, chunk in zip(bucket, flat.split(1 + B * T)):
            results[c] = (chunk[0].clone(), chunk[1:].reshape(B, T).clone())
    dist.barrier()
    if rank == 0:
        torch.save(results, out_path)
    dist.destroy_process_group()


# --------------------------------------------------------------------------- the launch


def _tail(path: str, n: int = 4000) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()[-n:]
    except OSError as e:
        return f"<{e}>"


def launch(tmp_dir: str) -> dict:
    """Runs both ranks as subprocesses; returns rank 0's results. Fails (never
    hangs) on a crash of either rank or past ``DEADLINE_S``."""
    import torch.distributed as dist

    # port 0: the OS picks a free port, and this store keeps it bound until the ranks are done
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=COLLECTIVE_TIMEOUT)
    out_path = os.path.join(tmp_dir, "dp_results.pt")
    env = {k: v for k, v in os.environ.items() if k != "LUSPO_RS_TAKE_OVER"}
    env.update(RAYON_NUM_THREADS="1", OMP_NUM_THREADS="1")
    if "GLOO_SOCKET_IFNAME" not in env and os.path.exists("/sys/class/net/lo"):
        env["GLOO_SOCKET_IFNAME"] = "lo"  # both ranks are on this host
    procs, logs = [], []
    try:
        for rank in range(WORLD):
            log = os.path.join(tmp_dir, f"rank{rank}.log")
            logs.append(log)
            with open(log, "w") as f:
                procs.append(subprocess.Popen(
                    [sys.executable, __file__, "--rank", str(rank), "--port", str(store.port), "--out", out_path],
                    stdout=f, stderr=subprocess.STDOUT, env=env, cwd=os.path.dirname(os.path.abspath(__file__)),
                ))  # fmt: skip
        start = time.monotonic()
        while True:
            codes = [p.poll() for p in procs]
            if all(c == 0 for c in codes):
                break
            failed = [r for r, c in enumerate(codes) if c not in (None, 0)]
            elapsed = time.monotonic() - start
            if failed or elapsed > DEADLINE_S:
                why = f"rank(s) {failed} exited with {[codes[r] for r in failed]}" if failed else (
                    f"timed out after {DEADLINE_S} s (a rank hangs in a collective or is starved)"
                )  # fmt: skip
                for p in procs:
                    if p.poll() is None:
                        p.kill()
                        p.wait(timeout=10)
                pytest.fail(f"data-parallel run failed: {why}\n" + "\n".join(
                    f"--- rank {r} output (tail) ---\n{_tail(log)}" for r, log in enumerate(logs)
                ))  # fmt: skip
            time.sleep(0.05)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=10)
        del store
    return torch.load(out_path, weights_only=True)


@pytest.fixture(scope="module")
def dp_results(tmp_path_factory) -> dict:
    return launch(str(tmp_path_factory.mktemp("dp")))


@pytest.fixture(scope="module")
def single_results() -> dict:
    """The single-process references, keyed (impl, fn, agg, dtype, convention, weights)."""
    _check_verl_is_verl()
    batches = {name: make_batch(dtype) for name, dtype in DTYPES.items()}
    refs = {}
    for impl, fn, agg, dtype, conv, _layout, weights in dp_cases():
        key = (impl, fn, agg, dtype, reference_convention(conv), weights)
        if key not in refs:
            batch = batches[dtype]
            refs[key] = loss_and_grad(impl, fn, agg, batch, weights, single_process_info(key[4], batch))
    return refs


def _differences(dp: tuple, ref: tuple) -> tuple[float, float, float]:
    (loss, grad), (ref_loss, ref_grad) = dp, ref
    d_loss = (loss.double() - ref_loss.double()).abs().item()
    d_grad = (grad.double() - ref_grad.double()).abs().max().item()
    return d_loss, d_grad, ref_grad.double().abs().max().item()


def _ref(single_results: dict, case: tuple) -> tuple:
    impl, fn, agg, dtype, conv, _layout, weights = case
    return single_results[(impl, fn, agg, dtype, reference_convention(conv), weights)]


# --------------------------------------------------------------------------- the tests


@pytest.mark.parametrize("agg", AGG_MODES)
@pytest.mark.parametrize("fn", FNS)
@pytest.mark.parametrize("impl", IMPLS)
def test_dp_gradient_equals_single_process(dp_results, single_results, impl, fn, agg):
    checked, failures = 0, []
    for case in dp_cases():
        if case[:3] != (impl, fn, agg) or case[4] not in CONVENTIONS:
            continue
        (loss, grad), (ref_loss, ref_grad) = dp_results[case], _ref(single_results, case)
        assert grad.shape == ref_grad.shape == (B, T) and grad.dtype == ref_grad.dtype == DTYPES[case[3]]
        assert torch.isfinite(grad).all() and torch.isfinite(ref_grad).all(), case
        assert ref_grad.abs().max() > 0, case
        d_loss, d_grad, _ = _differences(dp_results[case], (ref_loss, ref_grad))
        if d_grad > TOL_GRAD or d_loss > TOL_LOSS * (1 + ref_loss.double().abs().item()):
            failures.append(
                f"{case}: max |grad diff| {d_grad:.3e}, |loss diff| {d_loss:.3e} (loss {ref_loss.item():.6g})"
            )
        checked += 1
    assert checked == len(DTYPES) * (1 if fn == "value_loss" else 2) * len(CONVENTIONS) * len(LAYOUTS)
    assert not failures, "DP gradient != single-process gradient:\n" + "\n".join(failures)


@pytest.mark.parametrize("agg", AGG_MODES)
@pytest.mark.parametrize("fn", FNS)
def test_dp_ours_equals_verl(dp_results, fn, agg):
    """Under DP too (every convention, the controls included), ours and verl agree
    to the parity suite's tolerances (fp32 1e-6 abs + 1e-5 rel, fp64 1e-12 + 1e-10)."""
    tol = {"float32": dict(atol=1e-6, rtol=1e-5), "float64": dict(atol=1e-12, rtol=1e-10)}
    for case in dp_cases():
        if case[:3] != ("ours", fn, agg):
            continue
        verl_case = ("verl",) + case[1:]
        for what, a, b in zip(("loss", "grad"), dp_results[case], dp_results[verl_case]):
            torch.testing.assert_close(a, b, **tol[case[3]], msg=lambda m, c=case, w=what: f"{c} {w}: {m}")


def test_local_normalisers_break_invariance(dp_results, single_results):
    """Control: ranks normalising by their own counts (dp_size=1, nothing global)
    give a different averaged gradient for every mode and aggregation (the shards
    hold 138 vs 44 tokens, 4 vs 6 non-empty rows), so the checks above can fail."""
    for case in dp_cases():
        if case[4] != "local":
            continue
        _, d_grad, scale = _differences(dp_results[case], _ref(single_results, case))
        assert d_grad > 1e-2 * scale, f"{case}: local normalisers unexpectedly invariant ({d_grad:.3e})"


def test_norm_mode_needs_a_fixed_loss_scale_factor_when_ranks_pad_differently(dp_results, single_results):
    """verl's caveat, reproduced by ours: ``seq-mean-token-sum-norm`` with the default
    ``loss_scale_factor`` divides by each rank's padded length, so ranks padded to
    their own longest response (40 and 14 here) break the invariance; a fixed
    ``loss_scale_factor`` (the ``own_T`` cases above) restores it."""
    seen = 0
    for case in dp_cases():
        if case[4] != "verl_actor_unfixed_scale":
            continue
        _, d_grad, scale = _differences(dp_results[case], _ref(single_results, case))
        assert d_grad > 1e-2 * scale, case
        seen += 1
    # vanilla, gspo, the token rules but SAPO, agg_loss, value_loss (LUSPO and SAPO ignore loss_agg_mode)
    assert seen == len(IMPLS) * (len(FNS) - len(FIXED_AGG))


if __name__ == "__main__":  # one rank, started by launch()
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    run_rank(args.rank, args.port, args.out)
