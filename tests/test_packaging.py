"""The package installs and imports beside today's Hugging Face stack.

transformers >= 5.25 requires Hugging Face's `kernels` package. A top-level `kernels` folder of
ours (the Triton code sat in one until it moved to `adapterops/kernels/`) shadowed it whenever the
repository root was on `sys.path`, with two effects that these tests reproduce:
- the build: HF `kernels` registers a setuptools `egg_info.writers` entry point
  (`kernels._internals.locking`), so building from the root imported our folder and failed
  (`No module named 'kernels._internals'`): `pip install -e .`, `pip install .`, a wheel;
- the imports: from the root, `import peft` and transformers' models failed (`cannot import name
  'CUDAProperties' from 'kernels'`), and with them the PEFT tests, the README and the benchmarks.
The build runs on a copy of the checkout (it writes build/ and *.egg-info) with this test's
Python, which has the newest releases installed (make test installs them).
"""
import importlib.metadata
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# The folders a checkout puts on sys.path: the root (the working directory of `python -c`,
# `python -m`, setup.py), and the folders of the scripts and conftests run from it.
PATH_ENTRIES = (ROOT, ROOT / "tests", ROOT / "benchmarks")
NOT_SOURCES = (".git", ".venv", ".venv-cuda", "build", "__pycache__", "*.egg-info",
               ".pytest_cache", ".hypothesis", ".benchmarks", "results")
# Builds and installs a wheel: not in `make quick` (pyproject.toml's `slow` marker).
pytestmark = pytest.mark.slow


def _hf_kernels_installed() -> bool:
    try:
        importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


needs_hf_kernels = pytest.mark.skipif(
    not _hf_kernels_installed(),
    reason="Hugging Face's kernels package is not installed (transformers >= 5.25 requires it)")


def _run(args, cwd, **env):
    proc = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, **env})
    assert proc.returncode == 0, (f"{' '.join(map(str, args))} (in {cwd}) exited "
                                  f"{proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def test_nothing_in_the_checkout_is_a_top_level_kernels():
    found = [str(p.relative_to(ROOT)) for entry in PATH_ENTRIES
             for p in (entry / "kernels", entry / "kernels.py") if p.exists()]
    assert not found, (f"{found} would be imported as `kernels` from the checkout, shadowing "
                       "Hugging Face's kernels package: keep Triton code in adapterops/kernels/")


@needs_hf_kernels
def test_hf_stack_imports_from_the_repository_root():
    """`python -c` from the root puts the root first on sys.path, as README users and the
    benchmarks do."""
    code = ("import kernels, peft, adapterops.kernels\n"
            "from transformers import LlamaForCausalLM\n"
            "from pathlib import Path\n"
            "print(Path(kernels.__file__).resolve())\n")
    proc = _run([sys.executable, "-c", code], cwd=ROOT)
    hf_kernels = Path(proc.stdout.strip().splitlines()[-1])
    assert "site-packages" in hf_kernels.parts, f"`import kernels` found {hf_kernels}, not HF's"


@pytest.fixture
def source(tmp_path):
    """A copy of the checkout's sources (a build writes build/ and *.egg-info into its tree)."""
    copy = tmp_path / "source"
    shutil.copytree(ROOT, copy, ignore=shutil.ignore_patterns(*NOT_SOURCES))
    return copy


@needs_hf_kernels
def test_setup_py_runs_from_the_root_beside_hf_kernels(source, tmp_path):
    """setup.py's egg_info step with the root first on sys.path (setup.py run directly, or by
    setuptools' legacy backend, which pip uses without a pyproject.toml): it loads HF kernels'
    egg_info.writers entry point, which a root `kernels` folder shadowed."""
    _run([sys.executable, "setup.py", "-q", "egg_info", "--egg-base", str(tmp_path)], cwd=source,
         ADAPTEROPS_SKIP_CUDA="1")
    assert (tmp_path / "adapterops.egg-info" / "PKG-INFO").exists()


@needs_hf_kernels
def test_wheel_builds_and_installs_beside_hf_kernels(source, tmp_path):
    """The PEP 517 build that `pip install .` runs (pyproject.toml's setuptools backend), from the
    root of the sources; the wheel holds the Triton code and the C++
    sources inside the package and nothing top-level but `adapterops`; installed on its own it
    imports from outside the checkout."""
    wheels = tmp_path / "wheels"
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
          "--disable-pip-version-check", "-w", str(wheels), "."],
         cwd=source, ADAPTEROPS_SKIP_CUDA="1")
    (wheel,) = wheels.glob("adapterops-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert top_level == {"adapterops"}, f"the wheel installs top-level {sorted(top_level)}"
    for needed in ("adapterops/kernels/lowrank.py", "adapterops/kernels/routed.py",
                   "adapterops/kernels/hdpissa.py", "adapterops/csrc/library.cpp",
                   "adapterops/methods.md"):
        assert needed in names, f"{needed} is missing from the wheel"

    site = tmp_path / "site"
    _run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--disable-pip-version-check",
          "--target", str(site), str(wheel)], cwd=tmp_path)
    code = ("import sys; sys.path.insert(0, sys.argv[1])\n"
            "import adapterops, adapterops.kernels.lowrank, kernels, peft\n"
            "from adapterops.backends.cuda import build\n"
            "assert adapterops.__file__.startswith(sys.argv[1]), adapterops.__file__\n"
            "assert build.sources(with_cuda=False), 'no C++ sources for the just-in-time build'\n"
            "assert str(build.CSRC).startswith(sys.argv[1]), build.CSRC\n")
    _run([sys.executable, "-c", code, str(site)], cwd=tmp_path)
