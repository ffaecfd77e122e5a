"""How adapterops._C is compiled: its sources and flags, shared by setup.py (the prebuilt
extension) and `extension.py` (the just-in-time build). setup.py loads this file by path, so it
imports nothing from adapterops.

Two variants of the same C++ (csrc/common.h says why):
- the CUDA build: every csrc/*.cpp and *.cu with ADAPTEROPS_WITH_CUDA, for the archs in
  TORCH_CUDA_ARCH_LIST (prebuilt default: sm_80 and sm_90, plus sm_90 PTX);
- the host build: csrc/*.cpp only, against any torch (the CPU build included); its ops run on
  CPU tensors, for testing the backend's C++ without a GPU (ADAPTEROPS_CSRC_ON_CPU=1).
"""
import os
from pathlib import Path

# csrc/ beside the package in a source checkout (editable installs, CI), or installed inside it
# as adapterops/csrc (setup.py ships the sources as package data for just-in-time builds).
_CHECKOUT_CSRC = Path(__file__).resolve().parents[3] / "csrc"
_INSTALLED_CSRC = Path(__file__).resolve().parents[2] / "csrc"
CSRC = _CHECKOUT_CSRC if (_CHECKOUT_CSRC / "library.cpp").exists() else _INSTALLED_CSRC
# sm_80 and sm_90 cubins, plus sm_90 PTX that newer GPUs compile at load time.
DEFAULT_ARCHS = "8.0;9.0+PTX"
WITH_CUDA_DEFINE = "-DADAPTEROPS_WITH_CUDA"


def sources(with_cuda: bool) -> list[str]:
    """csrc's translation units (sorted; .cu only for the CUDA build); empty when csrc/ is absent."""
    patterns = ("*.cpp", "*.cu") if with_cuda else ("*.cpp",)
    return sorted(str(p) for pattern in patterns for p in CSRC.glob(pattern))


def compile_args(with_cuda: bool) -> dict[str, list[str]]:
    """Compiler flags per compiler ("cxx", and "nvcc" for the CUDA build)."""
    define = [WITH_CUDA_DEFINE] if with_cuda else []
    args = {"cxx": ["-O3", *define]}
    if with_cuda:
        args["nvcc"] = ["-O3", *define]
    return args


def default_arch_list() -> None:
    """For a prebuilt extension (setup.py, often on a machine without a GPU),
    TORCH_CUDA_ARCH_LIST defaults to DEFAULT_ARCHS. (A just-in-time build keeps torch's
    default: the GPUs of the machine it runs on.)"""
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCHS)
