"""Install adapterops.

The Triton code lives in `adapterops/kernels/`. Nothing in this repository may be importable as a
top-level `kernels`: that is Hugging Face's `kernels` package, which transformers >= 5.25
requires (tests/test_packaging.py checks both the install and the imports beside it).

The CUDA C++ fallback in `csrc/` is built as `adapterops._C` only when a CUDA build of torch
and a CUDA toolchain are present; otherwise the install goes on without it and says so in one
line (the `cuda` backend can then build it just in time on first use). A compile that fails
does not fail the install either: it says why and goes on without the extension, unless
`ADAPTEROPS_REQUIRE_CUDA=1` (CI's compile check) makes it an error. `ADAPTEROPS_SKIP_CUDA=1`
skips it on purpose; `TORCH_CUDA_ARCH_LIST` picks the GPU archs (default "8.0;9.0+PTX": sm_80
and sm_90 cubins, sm_90 PTX) and `MAX_JOBS` the parallel compile jobs. setup.py must see torch:
install with `--no-build-isolation` (under pip's build isolation torch is absent and the
extension is skipped). Sources and flags live in adapterops/backends/cuda/build.py, which the
just-in-time build shares; the csrc/ sources are installed as adapterops/csrc for it.
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
        reason = "the csrc/ sources are missing"
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

    class BuildExtensionOrSayWhy(BuildExtension.with_options(use_ninja=True)):
        """A failed compile installs the package without adapterops._C, saying why (the cuda
        backend then declines or builds just in time), unless ADAPTEROPS_REQUIRE_CUDA=1."""

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as exc:
                if os.environ.get("ADAPTEROPS_REQUIRE_CUDA") == "1":
                    raise
                print(f"adapterops: building the CUDA extension adapterops._C failed; installing "
                      f"without it ({type(exc).__name__}: {exc}). Set ADAPTEROPS_REQUIRE_CUDA=1 "
                      "to make this an error.", file=sys.stderr)

    return {
        "ext_modules": [CUDAExtension("adapterops._C", sources,
                                      extra_compile_args=build.compile_args(with_cuda=True))],
        "cmdclass": {"build_ext": BuildExtensionOrSayWhy},
    }


# Lower bounds: the oldest releases the test suite has passed with (transformers 5.24 and peft
# 0.21 on 2026-12-02; CI installs the newest: transformers 5.25.0, peft 0.22.0 on 2026-12-07).
HF = ["transformers>=5.24", "peft>=0.21", "safetensors>=0.8"]

setup(
    name="adapterops",
    version="0.1.0",
    description=("Fused Triton kernels for parameter-efficient fine-tuning adapters (LoRA, PiSSA, "
                 "LaMDA, HydraLoRA, HD-PiSSA)"),
    long_description=open("README.md").read() if os.path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["adapterops", "adapterops.ops", "adapterops.backends", "adapterops.backends.reference",
              "adapterops.backends.triton", "adapterops.backends.cuda", "adapterops.modules",
              "adapterops.integrations", "adapterops.kernels", "adapterops.csrc"],
    # csrc/ ships as data (no Python in it): the just-in-time build compiles it from there.
    package_dir={"adapterops.csrc": "csrc"},
    package_data={"adapterops.csrc": ["*.cpp", "*.cu", "*.h"], "adapterops": ["methods.md"]},
    install_requires=["torch>=2.11", "numpy", "triton>=3.6; platform_system == 'Linux'"],
    extras_require={
        # save_adapters / load_adapters write safetensors files; adapterops.peft talks to PEFT;
        # Conv1D (GPT-2) layers come from transformers.
        "hf": HF,
        # ninja: torch's just-in-time C++ build (the tests build csrc for CPU tensors); ruff: the
        # linter make test runs; the HF stack: the model-level tests build tiny transformers
        # models and PEFT adapters; trl and accelerate: tests/test_trainers.py checkpoints and
        # resumes under TRL's SFTTrainer and accelerate (oldest passed: 1.16 and 1.16, 2026-12-08);
        # bitsandbytes: tests/test_base_weight.py decodes its 4-bit layout and builds real
        # Linear4bit layers on CPU (0.50.2 on 2026-12-08).
        "test": ["pytest", "pytest-benchmark", "hypothesis", "ninja", "ruff", "trl>=1.16",
                 "accelerate>=1.16", "bitsandbytes>=0.50"] + HF,
        "plot": ["matplotlib"],
    },
    **_cuda_extension_kwargs(),
)
