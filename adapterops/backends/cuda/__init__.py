"""The `cuda` backend: the compiled CUDA C++ ops of csrc/ (adapterops._C), for GPUs and inputs
the Triton backend cannot serve (no Triton, an unsupported architecture, a shape outside its
configurations: rank > 128, more heads), ahead of eager PyTorch.

It serves CUDA tensors in fp32, fp16 and bf16, any rank and head count (each family module's
`LIMITS`). With ADAPTEROPS_CSRC_ON_CPU=1 it also serves CPU tensors through the same C++
(ATen's CPU GEMMs and the host drivers of its kernels): that is how CI tests this code without
a GPU, as the Triton interpreter tests the Triton kernels. float64 is left to the torch backend
(the tests' oracle).

The extension is loaded, or built just in time, at the first input this backend could serve
(see `extension.py`), never at `import adapterops`.
"""
from typing import Optional

import torch

from ..base import FAMILIES, Backend
from . import extension

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _not_available(ext: extension.Extension) -> Optional[str]:
    return f"adapterops._C is not available: {ext.reason}" if ext.reason is not None else None


class CudaBackend(Backend):
    name = "cuda"
    who = "the CUDA C++ kernels"
    # csrc/ has no 4-bit dequantization (yet): the Triton kernel or PyTorch serve it.
    families = tuple(f for f in FAMILIES if f != "dequant")

    def unavailable_reason(self) -> Optional[str]:
        """Only what is known without loading: the extension loads at the first servable input."""
        ext = extension.loaded()
        return _not_available(ext) if ext is not None else None

    def device_reasons(self, family: str, device: torch.device) -> list[str]:
        if device.type == "cpu" and not extension.on_cpu_requested():
            return [f"the cuda backend serves CUDA tensors, not {device} "
                    f"({extension.ON_CPU_ENV}=1 runs its C++ on CPU tensors, for testing)"]
        if device.type not in ("cpu", "cuda"):
            return [f"the cuda backend serves CUDA tensors, not {device}"]
        return []

    def loaded_reasons(self, device: torch.device) -> list[str]:
        ext = extension.load()
        if ext.reason is not None:
            return [_not_available(ext)]
        if device.type == "cuda":
            if not ext.with_cuda:
                return ["the loaded adapterops._C is the host build (CPU tensors only)"]
            problem = extension.kernel_image_problem(device)
            if problem is not None:
                return [problem]
        return []


def ops():
    """The extension's ops (`torch.ops.adapterops.*_cuda`), registered once it has loaded."""
    return torch.ops.adapterops
