"""Install adapterops.

`kernels/` (Triton code only) is installed as `adapterops.kernels`, never as a top-level
`kernels` package (that name belongs to another project on PyPI).

The CUDA C++ fallback in `csrc/` is built as `adapterops._C` only when a CUDA build of torch
and a CUDA toolchain are present; otherwise the install goes on without it and says so in one
line. `ADAPTEROPS_SKIP_CUDA=1` skips it on purpose.
"""
import glob
import os
import sys

from setuptools import setup


def _cuda_extension_kwargs():
    """The `ext_modules`/`cmdclass` for adapterops._C, or {} when it cannot or must not be built."""
    sources = sorted(glob.glob(os.path.join("csrc", "**", "*.cu"), recursive=True)
                     + glob.glob(os.path.join("csrc", "**", "*.cpp"), recursive=True))
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
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    return {
        "ext_modules": [CUDAExtension("adapterops._C", sources,
                                      extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3"]})],
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
              "adapterops.modules", "adapterops.kernels"],
    package_dir={"adapterops.kernels": "kernels"},
    install_requires=["torch>=2.11", "numpy", "triton>=3.6; platform_system == 'Linux'"],
    extras_require={
        "test": ["pytest", "pytest-benchmark", "hypothesis"],
        "plot": ["matplotlib"],
    },
    **_cuda_extension_kwargs(),
)
