"""The CUDA kernels compile with NVRTC — no GPU needed.

Runs wherever an NVRTC library is found (PyTorch's CUDA wheels bring one in
``site-packages/nvidia/*/lib``); it fails, not skips, when NVRTC is present
but the kernels do not compile.
"""

import os
import re

import pytest

import luspo_rs  # noqa: F401  (sets the NVRTC search hints)
from luspo_rs import _core, _cuda

KERNELS = (
    # the policy loss and agg_loss: row pass, and token pass per token rule, per storage variant
    *(f"loss_rows_{v}" for v in ("f32", "bf16", "f16", "f64", "any32", "any64")),
    *(
        f"loss_tokens_{v}_{rule}"
        for v in ("f32", "bf16", "f16", "f64", "any32", "any64")
        for rule in ("vanilla", "seq", "agg")
    ),
    "scale_grad",
    # kl_penalty
    "kl_penalty_f32",
    "kl_penalty_f64",
    # group advantages
    "advantage_scores_f32",
    "advantage_scores_f64",
    "advantage_groups",
    "advantage_batch",
    "advantage_write_f32",
    "advantage_write_f64",
)


def _nvrtc():
    try:
        return _core.nvrtc_info()
    except RuntimeError as e:
        pytest.skip(f"no NVRTC library on this machine: {e}")


def test_nvrtc_is_found_in_torch_wheels_when_they_ship_one():
    if not _cuda.nvrtc_dirs():
        pytest.skip("this torch build ships no nvidia-* NVRTC wheel")
    path, major, _minor = _nvrtc()
    assert os.path.exists(path)
    assert major >= 11


@pytest.mark.parametrize("major,minor", [(8, 0), (9, 0)], ids=["sm_80", "sm_90"])
def test_kernels_compile_to_ptx(major, minor):
    _nvrtc()
    ptx = _core.cuda_compile(major, minor, "ptx").decode()
    assert f".target sm_{major}{minor}" in ptx
    for k in KERNELS:
        assert f".entry {k}(" in ptx, f"{k} missing from the PTX"
    # Fixed-order reductions: no float atomics. The only atomics are the
    # integer tickets that pick the block doing a batch-wide sum.
    atomics = re.findall(r"^\s*((?:atom|red)\.\S+)", ptx, re.M)
    assert atomics, "the loss kernels' tickets are missing"
    assert all(a.endswith(".add.u32") for a in atomics), f"unexpected atomics: {sorted(set(atomics))}"


def test_kernels_compile_to_cubin():
    _nvrtc()
    cubin = _core.cuda_compile(8, 0, "cubin")
    assert cubin[:4] == b"\x7fELF"


#: Spill-store bytes per kernel on sm_90 (ptxas, NVRTC 13.2), where the loss
#: kernels sit at their 64-register cap (`__launch_bounds__(512, 2)`): a
#: ceiling that no change may raise. Every kernel not listed must not spill.
#: The vector kernels' token loop reads its runs without an element-wise
#: dtype switch (`load_vec`, `load_mask_vec` in kernels/loss.cu): their
#: token loops spill nothing (test_hot_token_loops_do_not_spill below; the
#: bytes left are outside the loop), where before the switch cost f32 vanilla
#: 184 bytes and 17 spill instructions in its loop; their `_ext` kernels run
#: a loop per set of rules (EXT_RATIO ...). The element-wise (`any`) kernels
#: keep the switch, and spill in their loops; so do the float64 kernels
#: (issue 20 E).
SPILL_STORES_SM90 = {
    **{f"loss_tokens_{v}_vanilla": n for v, n in (("f32", 40), ("bf16", 40), ("f16", 48), ("f64", 144), ("any32", 204), ("any64", 292))},
    **{f"loss_tokens_{v}_seq": n for v, n in (("bf16", 8), ("f16", 8), ("f64", 112), ("any32", 188), ("any64", 276))},
    **{f"loss_tokens_{v}_agg": n for v, n in (("any32", 40), ("any64", 8))},
    **{f"loss_tokens_{v}_value": n for v, n in (("f64", 48), ("any32", 180), ("any64", 92))},
    # GMPO's kernels (its row pass has its own, so the other modes' stays at 0)
    **{f"loss_rows_{v}_geo": n for v, n in (("f32", 324), ("any32", 660), ("bf16", 340), ("f16", 448), ("f64", 128), ("any64", 124))},
    **{f"loss_tokens_{v}_geo": n for v, n in (("f64", 12), ("any32", 12), ("any64", 100))},
    **{f"loss_tokens_{v}_ext": n for v, n in (("f32", 48), ("bf16", 48), ("f16", 48), ("f64", 280), ("any32", 220), ("any64", 402))},
}  # fmt: skip

#: The token kernels whose token loops must hold no spill instruction (STL /
#: LDL) on sm_90: the vector kernels of 32- and 16-bit floats, every rule
#: (`_ext` has a loop per rule).
SPILL_FREE_LOOPS = [f"loss_tokens_{v}_{r}" for v in ("f32", "bf16", "f16") for r in ("vanilla", "seq", "agg", "value", "geo", "ext")]


def ptxas_report(log):
    """``{kernel: (stack frame, spill stores, spill loads, registers)}`` from ptxas's verbose log."""
    out, cur = {}, None
    for line in log.splitlines():
        m = re.search(r"Function properties for (\S+)", line)
        if m:
            cur = m.group(1)
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m and cur:
            out[cur] = tuple(map(int, m.groups()))
        m = re.search(r"Used (\d+) registers", line)
        if m and cur in out:
            out[cur] += (int(m.group(1)),)
    return out


#: The NVRTC the budget was measured with (another ptxas allocates registers its own way).
SPILL_BUDGET_NVRTC = (13, 2)


@pytest.fixture(scope="module")
def sm90():
    """The suite's one sm_90 compile: ``(cubin, ptxas's --verbose log)``."""
    _nvrtc()
    return _core.cuda_ptxas_log(9, 0)


def test_kernels_compile_to_cubin_for_sm90_within_their_spill_budget(sm90):
    _, major, minor = _nvrtc()
    report = ptxas_report(sm90[1])
    for k in KERNELS:
        assert k in report, f"{k} missing from ptxas's report"
    if (major, minor) != SPILL_BUDGET_NVRTC:
        pytest.skip(f"the spill budget was measured with NVRTC {SPILL_BUDGET_NVRTC}; this is NVRTC {major}.{minor}")
    over = {k: (v[1], SPILL_STORES_SM90.get(k, 0)) for k, v in report.items() if v[1] > SPILL_STORES_SM90.get(k, 0)}
    assert not over, f"spill stores above budget (bytes, budget): {over}"


def test_bad_target_is_a_value_error():
    _nvrtc()
    with pytest.raises(ValueError, match="target"):
        _core.cuda_compile(8, 0, "sass")


def test_env_override_points_at_a_missing_library_falls_back(monkeypatch):
    # The override is tried first; a bad one is reported only if nothing else loads.
    _nvrtc()
    monkeypatch.setenv("LUSPO_RS_NVRTC", "/nonexistent/libnvrtc.so")
    assert _core.nvrtc_info()[0]


def nvdisasm():
    """The path of ``nvdisasm``: from the ``nvidia-cuda-nvdisasm`` wheel (a test
    dependency), else a CUDA toolkit's (on the GPU machines)."""
    import importlib.util
    import shutil

    spec = importlib.util.find_spec("nvidia")
    for base in spec.submodule_search_locations if spec else []:
        for sub in sorted(os.listdir(base)):
            p = os.path.join(base, sub, "bin", "nvdisasm")
            if os.path.isfile(p):
                return p
    p = shutil.which("nvdisasm") or os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvdisasm")
    if os.path.isfile(p):
        return p
    raise AssertionError("nvdisasm not found: `pip install nvidia-cuda-nvdisasm` (requirements-test.txt)")


def sass_loops(sass, kernel):
    """``[(instructions of the loop)]`` of ``kernel`` in nvdisasm's listing: each
    backward branch with the instructions from its target to it."""
    start = sass.index(f"\n.text.{kernel}:")
    end = sass.find("\n//---", start)
    addr_of, code, pending = {}, [], []
    for line in sass[start:end].splitlines():
        label = re.match(r"^(\.L_x_\d+):", line.strip())
        if label:
            pending.append(label.group(1))
            continue
        ins = re.match(r"\s*/\*([0-9a-f]+)\*/\s+(.*?)\s*;?\s*(\(\*.*)?$", line)
        if ins:
            a = int(ins.group(1), 16)
            addr_of.update((p, a) for p in pending)
            pending = []
            code.append((a, ins.group(2)))
    loops = []
    for a, text in code:
        br = re.search(r"\bBRA\b.*`\((\.L_x_\d+)\)", text)
        if br and br.group(1) in addr_of and addr_of[br.group(1)] <= a:
            lo = addr_of[br.group(1)]
            loops.append([t for b, t in code if lo <= b <= a])
    return loops


def test_hot_token_loops_do_not_spill(sm90):
    # The token loops (the loops of ten global loads or more: one in each
    # kernel, four in `_ext`) of each hot kernel, in its sm_90 SASS: no
    # local-memory spill or refill in them. (Before load_vec / load_mask_vec
    # and `_ext`'s loops per set of rules, f32 vanilla's loop had 17, seq's
    # 17, the one loop of `_ext` 36.)
    _, major, minor = _nvrtc()
    if (major, minor) != SPILL_BUDGET_NVRTC:
        pytest.skip(f"the loops were checked with NVRTC {SPILL_BUDGET_NVRTC}; this is NVRTC {major}.{minor}")
    import subprocess
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(sm90[0])
        f.flush()
        sass = subprocess.run([nvdisasm(), "-c", f.name], capture_output=True, text=True, check=True).stdout
    spilled = {}
    for k in SPILL_FREE_LOOPS:
        hot = [body for body in sass_loops(sass, k) if sum("LDG" in t for t in body) >= 10]
        assert len(hot) == (4 if k.endswith("_ext") else 1), f"{k}: {len(hot)} token loops found"
        n = sum(bool(re.match(r"(@!?P\d+\s+)?(STL|LDL)\b", t)) for body in hot for t in body)
        if n:
            spilled[k] = n
    assert not spilled, f"spill instructions in the token loop: {spilled}"
