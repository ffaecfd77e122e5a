"""Install adapterops.

`kernels/` (Triton code only) is installed as `adapterops.kernels`, never as a top-level
`kernels` package (that name belongs to another project on PyPI).

The CUDA C++ fallback in `csrc/` is built as `adapterops._C` only when a CUDA build of torch
and a CUDA toolchain are present; otherwise the install goes on without it and says so in one
line (the `cuda` backend can then build it just in time on first use). `ADAPTEROPS_SKIP_CUDA=1`
skips it on purpose; `TORCH_CUDA_ARCH_LIST` picks the GPU archs (default "8.0;9.0", sm_80 and
sm_90) and `MAX_JOBS` the parallel compile jobs. Sources and flags live in
adapterops/backends/cuda/build.py, which the just-in-time build shares.
"""
import importlib.util
import os
import sys

from setuptools import setup


def _load_build_settings():
    """adapterops/backends/cuda/build.py, loaded by path (the package is not installed yet)."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "adapterops", "backends",
                        "cuda", "build.py")
    spec = importlib.util.spec_from_file_location("adapterops_build_settings", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _cuda_extension_kwargs():
    """The `ext_modules`/`cmdclass` for adapterops._C, or {} when it cannot or must not be built."""
    build = _load_build_settings()
    sources = [os.path.relpath(p) for p in build.sources(with_cuda=True)]
    reason = None
    if os.environ.get("ADAPTEROPS_SKIP_CUDA") == "1":
        reason = "ADAPTEROPS_SKIP_CUDA=1"
    elif not sources:
        reason = "csrc/ has no sources yet"
    else:
        try:
            import torch
            from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
        except ImportError as exc:
            reason = f"torch is not importable at build time ({exc})"
        else:
            if torch.version.cuda is None:
                reason = f"torch {torch.__version__} is a CPU build"
            elif CUDA_HOME is None:
                reason = "no CUDA toolchain (CUDA_HOME/nvcc) found"
    if reason is not None:
        print(f"adapterops: skipping the CUDA extension adapterops._C: {reason}", file=sys.stderr)
        return {}
    build.default_arch_list()
    return {
        "ext_modules": [CUDAExtension("adapterops._C", sources,
                                      extra_compile_args=build.compile_args(with_cuda=True))],
        "cmdclass": {"build_ext": BuildExtension.with_options(use_ninja=True)},
    }


setup(
    name="adapterops",
    version="0.1.0",
    description="Fused Triton kernels for parameter-efficient fine-tuning adapters (LoRA, PiSSA, LaMDA)",
    long_description=open("README.md").read() if os.path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["adapterops", "adapterops.ops", "adapterops.backends", "adapterops.backends.triton",
              "adapterops.backends.cuda", "adapterops.modules", "adapterops.kernels"],
    package_dir={"adapterops.kernels": "kernels"},
    install_requires=["torch>=2.11", "numpy", "triton>=3.6; platform_system == 'Linux'"],
    extras_require={
        # ninja: torch's just-in-time C++ build (the tests build csrc for CPU tensors).
        "test": ["pytest", "pytest-benchmark", "hypothesis", "ninja"],
        "plot": ["matplotlib"],
    },
    **_cuda_extension_kwargs(),
)
