"""Loading adapterops._C, the `cuda` backend's compiled ops, once per process.

In order: the prebuilt extension (`setup.py` builds it when a CUDA build of torch and nvcc are
present); else a just-in-time build of csrc/ with `torch.utils.cpp_extension.load` (ninja),
cached on disk per torch version, variant, source directory and (CUDA) arch list, so only the
first use in an environment pays for the compile. The CUDA variant is built when torch is a
CUDA build and a CUDA toolchain is found;
the host variant (CPU tensors only, for testing without a GPU; see build.py) when
ADAPTEROPS_CSRC_ON_CPU=1. ADAPTEROPS_JIT_BUILD=0 forbids building. Nothing here raises: every
failure becomes the reason the backend gives, shown by the dispatcher and
`python -m adapterops.info`.
"""
import dataclasses
import hashlib
import importlib
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import Optional

import torch

from . import build

ON_CPU_ENV = "ADAPTEROPS_CSRC_ON_CPU"
JIT_ENV = "ADAPTEROPS_JIT_BUILD"
# One op per family is enough to tell that the library registered.
PROBE_OP = "lowrank_linear_fwd_cuda"


@dataclasses.dataclass(frozen=True)
class Extension:
    module: Optional[ModuleType]   # None when it could not be loaded
    how: str                       # "prebuilt", "just-in-time (cuda)", "just-in-time (host)", or ""
    reason: Optional[str]          # why it is not loaded (None when it is)

    @property
    def with_cuda(self) -> bool:
        return self.module is not None and bool(self.module.with_cuda)


def on_cpu_requested() -> bool:
    return os.environ.get(ON_CPU_ENV) == "1"


def _registered() -> bool:
    return hasattr(torch.ops.adapterops, PROBE_OP)


def _import_prebuilt() -> tuple[Optional[ModuleType], str]:
    try:
        _C = importlib.import_module("adapterops._C")
    except ModuleNotFoundError as exc:
        return None, f"no prebuilt adapterops._C ({exc})"
    except Exception as exc:  # a broken build (ABI mismatch, missing library) is a reason too
        return None, f"the prebuilt adapterops._C failed to load ({type(exc).__name__}: {exc})"
    return _C, ""


def jit_variant() -> tuple[Optional[str], str]:
    """("cuda" or "host", "") when a just-in-time build is possible here, else (None, why not)."""
    if os.environ.get(JIT_ENV) == "0":
        return None, f"{JIT_ENV}=0 forbids a just-in-time build"
    if not build.sources(with_cuda=False):
        return None, f"the csrc/ sources are not there to build from ({build.CSRC})"
    from torch.utils.cpp_extension import CUDA_HOME, is_ninja_available
    if not is_ninja_available():
        return None, "a just-in-time build needs ninja (pip install ninja)"
    if torch.version.cuda is not None and CUDA_HOME is not None:
        return "cuda", ""
    if on_cpu_requested():
        return "host", ""
    if torch.version.cuda is None:
        return None, (f"torch {torch.__version__} is a CPU build, so the CUDA extension cannot "
                      f"be built ({ON_CPU_ENV}=1 builds its host variant for CPU tensors)")
    return None, "no CUDA toolchain (CUDA_HOME/nvcc) to build the CUDA extension with"


def _arch_tag() -> str:
    """The GPU archs a CUDA build targets, for its cache directory's name (torch's build cache
    does not notice a changed arch list): TORCH_CUDA_ARCH_LIST, or torch's default, the
    visible GPUs' compute capabilities."""
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if not archs:
        archs = "local-" + "-".join(sorted({"{}.{}".format(*torch.cuda.get_device_capability(i))
                                            for i in range(torch.cuda.device_count())}))
    return "".join(c if c.isalnum() or c in ".-" else "_" for c in archs)


def _build_directory(variant: str) -> Path:
    """Per torch version, variant and (CUDA) arch list, under torch's extension cache
    (TORCH_EXTENSIONS_DIR)."""
    from torch.utils.cpp_extension import _get_build_directory
    root = Path(_get_build_directory("adapterops", verbose=False))
    # The sources' directory too: two checkouts must not keep rebuilding over each other.
    sources = hashlib.sha256(str(build.CSRC).encode()).hexdigest()[:8]
    tag = (f"torch-{torch.__version__}-{variant}-{sources}"
           + (f"-{_arch_tag()}" if variant == "cuda" else ""))
    path = root / tag
    path.mkdir(parents=True, exist_ok=True)
    return path


def _jit_build(variant: str) -> ModuleType:
    from torch.utils.cpp_extension import load
    with_cuda = variant == "cuda"
    directory = _build_directory(variant)
    name = f"adapterops_C_{variant}"
    sources = build.sources(with_cuda)
    # torch's loader decides; the message is for the case it will most likely compile (no
    # library yet, or older than a source), so a cached load stays quiet.
    library = directory / f"{name}.so"
    newest_source = max(p.stat().st_mtime for p in build.CSRC.iterdir())
    if not library.exists() or library.stat().st_mtime < newest_source:
        print(f"adapterops: building the {variant} variant of the C++ extension just in time "
              f"(once per environment and source change; a few minutes; cached in {directory})",
              file=sys.stderr, flush=True)
    flags = build.compile_args(with_cuda)
    return load(name=name, sources=sources,
                extra_cflags=flags["cxx"], extra_cuda_cflags=flags.get("nvcc"),
                build_directory=str(directory), with_cuda=with_cuda, verbose=False)


_loaded: Optional[Extension] = None  # the outcome of the first `load()`, kept for the process


def load() -> Extension:
    """The extension, loaded (or built) at the first call; the outcome is kept for the process."""
    global _loaded
    if _loaded is None:
        _loaded = _load()
    return _loaded


def loaded() -> Optional[Extension]:
    """What `load()` gave, or None when nothing has asked yet (loads nothing)."""
    return _loaded


def load_if_built() -> Optional[Extension]:
    """`load()` when that builds nothing (already loaded, or a prebuilt extension to import);
    None when loading would need a just-in-time build."""
    if _loaded is None and _import_prebuilt()[0] is None:
        return None
    return load()


def _load() -> Extension:
    module, prebuilt_reason = _import_prebuilt()
    if module is not None:
        return _checked(module, "prebuilt")
    variant, jit_reason = jit_variant()
    if variant is None:
        return Extension(None, "", f"{prebuilt_reason}; {jit_reason}")
    try:
        module = _jit_build(variant)
    except Exception as exc:
        return Extension(None, "", f"{prebuilt_reason}; the just-in-time {variant} build failed: "
                                   f"{type(exc).__name__}: {str(exc).strip()[-2000:]}")
    return _checked(module, f"just-in-time ({variant})")


def _checked(module: ModuleType, how: str) -> Extension:
    if not _registered():
        return Extension(None, how, f"{how} adapterops._C loaded but registered no "
                                    f"torch.ops.adapterops.{PROBE_OP}")
    return Extension(module, how, None)


def kernel_image_problem(device: torch.device) -> Optional[str]:
    """Why the loaded CUDA build's kernels cannot run on `device` (no cubin for its architecture
    and no PTX it can compile), or None when they can. Asked once per device."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _kernel_image_problems:
        problem = load().module.kernel_image_problem(index)
        _kernel_image_problems[index] = problem and (
            f"adapterops._C has no kernel image for cuda:{index} (compute capability "
            f"{'.'.join(map(str, torch.cuda.get_device_capability(index)))}): {problem}; rebuild "
            f"it for this GPU (TORCH_CUDA_ARCH_LIST, see docs/backends.md)")
    return _kernel_image_problems[index] or None


_kernel_image_problems: dict[int, str] = {}


def describe() -> str:
    """One line for `python -m adapterops.info`; builds nothing (a prebuilt extension is loaded)."""
    ext = load_if_built()
    if ext is not None:
        if ext.module is None:
            return f"not loaded: {ext.reason}"
        kernels = "CUDA and host" if ext.with_cuda else "host only: CPU tensors"
        return f"loaded ({ext.how}; {kernels})"
    prebuilt_reason = _import_prebuilt()[1]
    variant, jit_reason = jit_variant()
    if variant is not None:
        return (f"not prebuilt ({prebuilt_reason}); the {variant} variant is built just in time "
                "(or loaded from torch's extension cache) at the first input it could serve")
    return f"not available: {prebuilt_reason}; {jit_reason}"
