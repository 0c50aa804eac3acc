"""Packaging: what `pip install` of our artifacts gives a user.

* The abi3 wheel, built from this checkout by ``maturin build --release`` (it
  reuses the compilation ``make build`` left in ``target/``), installs with
  ``pip install --no-deps --no-index`` into a fresh virtualenv that sees only
  torch, numpy and torch's own runtime dependencies (symlinked from the dev
  venv, none of them reinstalled): ``import luspo_rs`` works there, a LUSPO step
  (forward + backward) gives the documented numbers, the ``verl.plugins``
  entry point and the typing files (``_core.pyi``, ``py.typed``) are installed.
* The sdist holds what a build needs (Cargo.lock, src/ with the kernel sources,
  python/, README, pyproject) and nothing built; unpacked outside the
  checkout, it builds a wheel on its own (pip's PEP 517 path, ``--locked``,
  cargo offline, a cold target dir), which passes the same checks.

The builds take tens of seconds (the sdist's cold release build most of it):
these tests are marked ``slow`` and run in ``make test``.
"""

from __future__ import annotations

import configparser
import json
import os
import shutil
import subprocess
import sys
import tarfile
import textwrap
import time
import zipfile
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "luspo_rs"
DIST = "luspo-rs"

# What the extension package must ship, in the wheel and once installed.
PACKAGE_FILES = {
    "__init__.py", "_alloc.py", "_cuda.py", "core_algos.py", "functional.py",
    "verl.py", "_core.pyi", "py.typed",
}  # fmt: skip
# Dev/test tools that must not leak into the fresh virtualenv.
NOT_IN_FRESH_VENV = ("verl", "maturin", "pytest", "pip", "ray", "transformers")


def _maturin() -> str:
    exe = Path(sys.executable).with_name("maturin")
    found = str(exe) if exe.exists() else shutil.which("maturin")
    if found is None:
        pytest.skip("maturin is not installed (requirements-test.txt; `make test` installs it)")
    if shutil.which("cargo") is None:
        pytest.skip("no `cargo` on PATH: building the wheel needs a Rust toolchain")
    return found


def _run(cmd, *, timeout=600, **kwargs) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.perf_counter()
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, **kwargs)
    took = time.perf_counter() - t0
    what = " ".join(map(str, cmd))
    assert r.returncode == 0, f"{what} failed ({r.returncode}):\nstdout:\n{r.stdout}\nstderr:\n{r.stderr}"
    return r, took


def _clean_env(**extra: str) -> dict[str, str]:
    drop = ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV", "CONDA_PREFIX", "PIP_REQUIRE_VIRTUALENV")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(extra)
    return env


def _only_wheel(directory: Path) -> Path:
    wheels = sorted(directory.glob("*.whl"))
    assert len(wheels) == 1, f"expected one wheel in {directory}, found {[w.name for w in wheels]}"
    return wheels[0]


# ---------------------------------------------------------------- artifacts


@pytest.fixture(scope="module")
def repo_wheel(tmp_path_factory) -> Path:
    """``maturin build --release`` of the checkout. CARGO_TARGET_DIR is left as
    ``make build`` had it, so cargo reuses that compilation (same profile,
    features and PyO3 config); only the wheel is written outside the repo."""
    maturin = _maturin()
    out = tmp_path_factory.mktemp("wheel")
    _, took = _run([maturin, "build", "--release", "--locked", "--out", out], cwd=REPO, env=_clean_env())
    print(f"\n[packaging] maturin build --release (checkout): {took:.1f} s")
    return _only_wheel(out)


@pytest.fixture(scope="module")
def sdist(tmp_path_factory) -> Path:
    maturin = _maturin()
    out = tmp_path_factory.mktemp("sdist")
    _, took = _run([maturin, "sdist", "--out", out], cwd=REPO, env=_clean_env())
    print(f"\n[packaging] maturin sdist: {took:.1f} s")
    archives = sorted(out.glob("*.tar.gz"))
    assert len(archives) == 1, [a.name for a in archives]
    return archives[0]


@pytest.fixture(scope="module")
def sdist_wheel(sdist, tmp_path_factory) -> Path:
    """A wheel built from the unpacked sdist alone, as ``pip install`` of the
    sdist would: outside the checkout, a cold target dir, the shipped
    Cargo.lock (``--locked``) and no network (crates come from cargo's cache,
    which ``make build`` filled with exactly those versions)."""
    _maturin()  # same prerequisites
    unpack = tmp_path_factory.mktemp("sdist-src")
    with tarfile.open(sdist) as tar:
        if hasattr(tarfile, "data_filter"):
            tar.extractall(unpack, filter="data")
        else:  # Python < 3.11.4
            tar.extractall(unpack)
    (root,) = unpack.iterdir()
    out = tmp_path_factory.mktemp("sdist-wheel")
    target = tmp_path_factory.mktemp("sdist-target")
    env = _clean_env(CARGO_TARGET_DIR=str(target), CARGO_NET_OFFLINE="true", MATURIN_PEP517_ARGS="--locked")
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
           "--no-cache-dir", "--disable-pip-version-check", "-w", out, root]  # fmt: skip
    try:
        _, took = _run(cmd, cwd=unpack, env=env)
    finally:
        shutil.rmtree(target, ignore_errors=True)  # ~150 MB of build outputs
    print(f"\n[packaging] pip wheel from the unpacked sdist (cold release build): {took:.1f} s")
    return _only_wheel(out)


# ------------------------------------------------- a venv with torch + numpy


def _torch_numpy_closure() -> dict[str, metadata.Distribution]:
    """torch, numpy and everything they require on this platform (extras
    followed, markers evaluated), as installed in the dev venv."""
    found: dict[str, tuple[metadata.Distribution, frozenset]] = {}
    todo = [("torch", frozenset()), ("numpy", frozenset())]
    while todo:
        name, extras = todo.pop()
        key = canonicalize_name(name)
        if key in found and extras <= found[key][1]:
            continue
        dist = metadata.distribution(name)
        extras = extras | (found[key][1] if key in found else frozenset())
        found[key] = (dist, extras)
        for spec in dist.requires or ():
            req = Requirement(spec)
            if req.marker is None or any(req.marker.evaluate({"extra": e}) for e in extras | {""}):
                todo.append((req.name, frozenset(req.extras)))
    return {k: d for k, (d, _) in found.items()}


@pytest.fixture(scope="module")
def torch_numpy_dir(tmp_path_factory) -> Path:
    """A directory of symlinks to the top-level entries (packages, modules,
    .dist-info) of torch, numpy and their requirements in the dev venv."""
    shim = tmp_path_factory.mktemp("torch-numpy-only")
    for dist in _torch_numpy_closure().values():
        assert dist.files is not None, f"{dist.metadata['Name']} has no RECORD"
        site = Path(dist.locate_file(""))
        for top in {f.parts[0] for f in dist.files}:
            if top in ("..", "__pycache__") or (shim / top).exists():
                continue
            (shim / top).symlink_to(site / top)
    return shim


@pytest.fixture
def fresh_venv(tmp_path, torch_numpy_dir) -> Path:
    """A new venv without pip; its site-packages' only addition is a .pth
    putting the torch/numpy symlink directory on sys.path. Returns its python."""
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv], env=_clean_env())
    python = venv / "bin" / "python"
    if not python.exists():
        python = venv / "Scripts" / "python.exe"
    purelib = _run([python, "-I", "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"])[0].stdout.strip()
    Path(purelib, "torch_numpy_only.pth").write_text(f"{torch_numpy_dir}\n")
    return python


def _pip_install(python: Path, wheel: Path) -> float:
    """The dev venv's pip, installing into ``python``'s environment."""
    cmd = [sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index",
           "--no-cache-dir", "--disable-pip-version-check", "-q", wheel]  # fmt: skip
    return _run(cmd, env=_clean_env())[1]


# What runs inside the fresh venv: facts as JSON, asserted on by the parent.
PROBE = textwrap.dedent(
    """
    import importlib.metadata as md, importlib.util, json, os, sysconfig

    import torch
    import luspo_rs

    facts = {"purelib": sysconfig.get_path("purelib"),
             "site_packages": sorted(os.listdir(sysconfig.get_path("purelib"))),
             "luspo_rs": luspo_rs.__file__, "core": luspo_rs._core.__file__, "torch": torch.__file__,
             "package_files": sorted(os.listdir(os.path.dirname(luspo_rs.__file__))),
             "version": luspo_rs.__version__}
    facts["importable"] = {m: importlib.util.find_spec(m) is not None for m in MODULES}
    dist = md.distribution("luspo-rs")
    facts["dist_version"] = dist.version
    facts["requires"] = dist.requires
    eps = md.entry_points()
    group = eps.select(group="verl.plugins") if hasattr(eps, "select") else eps.get("verl.plugins", [])
    facts["verl_plugins"] = sorted([ep.name, ep.value] for ep in group)
    try:  # verl is absent here: the plug-in must say what to install
        [ep for ep in group if ep.name == "luspo"][0].load()
        facts["plugin_load"] = "imported without verl?"
    except ImportError as e:
        facts["plugin_load"] = str(e)

    # One LUSPO step, against the documented objective
    # J = 1/G sum_i L_i min(s_i A_i, clip(s_i) A_i), loss = -J, s_i = exp(mean_t log-ratio).
    g = torch.Generator().manual_seed(0)
    B, T = 5, 9
    old = -torch.rand(B, T, generator=g, dtype=torch.float64)
    lp = (old + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)).requires_grad_()
    adv = torch.randn(B, 1, generator=g, dtype=torch.float64)
    mask = torch.arange(T)[None, :] < torch.tensor([9, 3, 7, 1, 5])[:, None]
    loss, metrics = luspo_rs.policy_loss(old, lp, adv, mask, mode="luspo")
    loss.backward()
    x = lp.detach().clone().requires_grad_()
    L = mask.sum(-1).double()
    s = torch.exp(((x - old) * mask).sum(-1) / L)
    want = -(L * torch.minimum(s * adv[:, 0], s.clamp(0.8, 1.2) * adv[:, 0])).mean()
    want.backward()
    facts["loss"], facts["want"] = loss.item(), want.item()
    facts["grad_finite"] = bool(torch.isfinite(lp.grad).all())
    facts["grad_err"] = (lp.grad - x.grad).abs().max().item()
    facts["grad_max"] = lp.grad.abs().max().item()
    facts["grad_on_padding"] = lp.grad[~mask].abs().max().item()
    facts["metrics"] = sorted(metrics)
    facts["clipped_rows"] = int(((s < 0.8) | (s > 1.2)).sum())
    print(json.dumps(facts))
    """
).replace("MODULES", repr(NOT_IN_FRESH_VENV + ("torch", "numpy", "luspo_rs")))


def _probe(python: Path, cwd: Path) -> dict:
    # -I: no PYTHONPATH, user site or cwd on sys.path (python/ of the checkout
    # cannot shadow the installed package); site-packages' .pth files still apply.
    r, took = _run([python, "-I", "-c", PROBE], cwd=cwd, env=_clean_env(), timeout=300)
    print(f"[packaging] import + LUSPO step in the fresh venv: {took:.1f} s")
    return json.loads(r.stdout.strip().splitlines()[-1])


def _check_installed(facts: dict, wheel: Path, torch_numpy_dir: Path) -> None:
    purelib = Path(facts["purelib"])
    version = facts["dist_version"]
    # Installed from the wheel into the fresh venv, and nothing else there.
    assert Path(facts["luspo_rs"]).parent == purelib / PACKAGE, facts["luspo_rs"]
    assert Path(facts["core"]).parent == purelib / PACKAGE and Path(facts["core"]).name == "_core.abi3.so"
    assert set(facts["site_packages"]) == {PACKAGE, f"{PACKAGE}-{version}.dist-info", "torch_numpy_only.pth"}
    assert Path(facts["torch"]).parent == torch_numpy_dir / "torch"
    assert facts["version"] == facts["dist_version"] == parse_wheel_filename(wheel.name)[1].public
    # Isolation: the dev/test tools are not importable, torch and numpy are.
    leaked = [m for m in NOT_IN_FRESH_VENV if facts["importable"][m]]
    assert not leaked, f"the fresh venv can import {leaked}"
    assert facts["importable"]["torch"] and facts["importable"]["numpy"]
    # Metadata: the plug-in entry point, the declared requirements, typing files.
    assert facts["verl_plugins"] == [["luspo", "luspo_rs.verl"]]
    assert "pip install verl" in facts["plugin_load"], facts["plugin_load"]
    assert sorted(canonicalize_name(Requirement(r).name) for r in facts["requires"]) == ["numpy", "torch"]
    assert PACKAGE_FILES <= set(facts["package_files"]), facts["package_files"]
    # The loss step: finite, and the documented LUSPO loss and gradient
    # (float64: agreement to rounding; the batch has clipped sequences on both sides).
    assert facts["clipped_rows"] >= 2
    assert abs(facts["loss"] - facts["want"]) <= 1e-12 * max(1.0, abs(facts["want"])), facts
    assert facts["grad_finite"] and facts["grad_max"] > 0 and facts["grad_on_padding"] == 0
    assert facts["grad_err"] <= 1e-12, facts
    assert facts["metrics"] == ["pg_clipfrac", "pg_clipfrac_lower", "ppo_kl"]


def _check_wheel_contents(wheel: Path) -> None:
    name, version, _, tags = parse_wheel_filename(wheel.name)
    assert name == canonicalize_name(DIST)
    # One wheel for every CPython >= 3.9 (pyo3's abi3-py39), on this platform.
    assert {(t.interpreter, t.abi) for t in tags} == {("cp39", "abi3")}, wheel.name
    assert all(t.platform.startswith(("manylinux", "linux", "musllinux", "macosx", "win")) for t in tags)
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        entry_points = configparser.ConfigParser(delimiters=("=",), interpolation=None)
        entry_points.read_string(z.read(f"{PACKAGE}-{version}.dist-info/entry_points.txt").decode())
    assert len(names) == len(set(names)), "duplicate entries in the wheel"
    files = {n.split("/", 1)[1] for n in names if n.startswith(f"{PACKAGE}/")}
    assert PACKAGE_FILES | {"_core.abi3.so"} <= files, sorted(files)
    assert not [n for n in files if n.endswith(".so") and n != "_core.abi3.so"], sorted(files)
    plugins = dict(entry_points["verl.plugins"]) if entry_points.has_section("verl.plugins") else {}
    assert plugins == {"luspo": "luspo_rs.verl"}, plugins


# ------------------------------------------------------------------- tests


def test_wheel_is_abi3_with_extension_and_typing_files(repo_wheel):
    _check_wheel_contents(repo_wheel)


def test_wheel_installs_and_runs_in_a_venv_with_only_torch_and_numpy(repo_wheel, fresh_venv, torch_numpy_dir, tmp_path):
    took = _pip_install(fresh_venv, repo_wheel)
    print(f"[packaging] pip install --no-deps --no-index (wheel): {took:.1f} s")
    _check_installed(_probe(fresh_venv, tmp_path), repo_wheel, torch_numpy_dir)


def _source_files() -> set[str]:
    """Every file of the crate (src/) and of the python package (python/): the
    tracked ones, or where there is no git checkout, those not built."""
    if shutil.which("git") and (REPO / ".git").exists():
        r = subprocess.run(["git", "ls-files", "-z", "src", "python"], cwd=REPO, capture_output=True, text=True)
        if r.returncode == 0 and r.stdout:
            return {f for f in r.stdout.split("\0") if f and (REPO / f).is_file()}
    return {
        p.relative_to(REPO).as_posix()
        for sub in ("src", "python")
        for p in (REPO / sub).rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and p.suffix not in (".so", ".pyd", ".dylib", ".pyc")
    }


def test_sdist_has_the_sources_and_nothing_built(sdist):
    with tarfile.open(sdist) as tar:
        members = [m.name for m in tar.getmembers() if m.isfile()]
    (top,) = {m.split("/", 1)[0] for m in members}
    files = {m.split("/", 1)[1] for m in members}
    required = {"PKG-INFO", "pyproject.toml", "Cargo.toml", "Cargo.lock", "README.md"}
    required |= {f"src/cuda/kernels/{k}" for k in ("common.cuh", "loss.cu", "kl_penalty.cu", "advantage.cu")}
    required |= _source_files()
    missing = sorted(required - files)
    assert not missing, f"{sdist.name} lacks {missing}"
    built = sorted(f for f in files if f.endswith((".so", ".pyd", ".dylib", ".whl", ".pyc")))
    assert not built, f"{sdist.name} ships build outputs {built}"
    stray = sorted(f for f in files if f.split("/", 1)[0] in ("target", ".venv", ".gpu", "dist", ".git"))
    assert not stray, f"{sdist.name} ships {stray}"
    assert top == sdist.name.removesuffix(".tar.gz")


def test_sdist_builds_a_working_wheel_on_its_own(sdist_wheel, fresh_venv, torch_numpy_dir, tmp_path):
    _check_wheel_contents(sdist_wheel)
    _pip_install(fresh_venv, sdist_wheel)
    _check_installed(_probe(fresh_venv, tmp_path), sdist_wheel, torch_numpy_dir)
