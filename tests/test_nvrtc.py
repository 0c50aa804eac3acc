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


@pytest.mark.parametrize("major,minor", [(8, 0), (9, 0)], ids=["sm_80", "sm_90"])
def test_kernels_compile_to_cubin(major, minor):
    _nvrtc()
    cubin = _core.cuda_compile(major, minor, "cubin")
    assert cubin[:4] == b"\x7fELF"


def test_bad_target_is_a_value_error():
    _nvrtc()
    with pytest.raises(ValueError, match="target"):
        _core.cuda_compile(8, 0, "sass")


def test_env_override_points_at_a_missing_library_falls_back(monkeypatch):
    # The override is tried first; a bad one is reported only if nothing else loads.
    _nvrtc()
    monkeypatch.setenv("LUSPO_RS_NVRTC", "/nonexistent/libnvrtc.so")
    assert _core.nvrtc_info()[0]
