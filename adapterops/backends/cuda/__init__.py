"""The `cuda` backend: the compiled CUDA C++ ops of csrc/ (adapterops._C), for GPUs and inputs
the Triton backend cannot serve (no Triton, an unsupported architecture, a shape outside its
configurations: rank > 128, more heads), ahead of eager PyTorch.

It serves CUDA tensors in fp32, fp16 and bf16, any rank and head count. With
ADAPTEROPS_CSRC_ON_CPU=1 it also serves CPU tensors through the same C++ (ATen's CPU GEMMs and
the host drivers of its kernels): that is how CI tests this code without a GPU, as the Triton
interpreter tests the Triton kernels. float64 is left to the torch backend (the tests' oracle).

The extension is loaded, or built just in time, at the first input this backend could serve
(see `extension.py`), never at `import adapterops`.
"""
from typing import Optional

import torch
from torch import Tensor

from ..base import Backend
from . import extension

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _ops():
    return torch.ops.adapterops


def _device_and_dtype_reasons(t: Tensor) -> list[str]:
    out = []
    if t.device.type == "cpu":
        if not extension.on_cpu_requested():
            out.append(f"the cuda backend serves CUDA tensors, not {t.device} "
                       f"({extension.ON_CPU_ENV}=1 runs its C++ on CPU tensors, for testing)")
    elif t.device.type != "cuda":
        out.append(f"the cuda backend serves CUDA tensors, not {t.device}")
    if t.dtype not in DTYPES:
        out.append(f"the cuda backend serves float32, float16 and bfloat16, not {t.dtype}")
    return out


def _not_available(ext: extension.Extension) -> Optional[str]:
    return f"adapterops._C is not available: {ext.reason}" if ext.reason is not None else None


class CudaBackend(Backend):
    name = "cuda"

    def unavailable_reason(self) -> Optional[str]:
        """Only what is known without loading: the extension loads at the first servable input."""
        ext = extension.loaded()
        return _not_available(ext) if ext is not None else None

    def _reasons(self, t: Tensor) -> list[str]:
        out = _device_and_dtype_reasons(t)
        if out:
            return out
        ext = extension.load()
        if ext.reason is not None:
            return [_not_available(ext)]
        if t.device.type == "cuda":
            if not ext.with_cuda:
                return ["the loaded adapterops._C is the host build (CPU tensors only)"]
            problem = extension.kernel_image_problem(t.device)
            if problem is not None:
                return [problem]
        return []

    def lowrank_reasons(self, x: Tensor, **_) -> list[str]:
        return self._reasons(x)

    def routed_reasons(self, x: Tensor, **_) -> list[str]:
        return self._reasons(x)

    def hdpissa_reasons(self, x: Tensor, **_) -> list[str]:
        return self._reasons(x)

    def update_reasons(self, weight: Tensor, copy: Optional[Tensor] = None, **_) -> list[str]:
        out = self._reasons(weight)
        if copy is not None and copy.dtype not in DTYPES:
            out.append(f"the cuda backend's update writes float32, float16 or bfloat16 copies, "
                       f"not {copy.dtype}")
        return out

    def lowrank_forward(self, x, weight, bias, lora_A, lora_B, lora_S, scaling):
        return _ops().lowrank_linear_fwd_cuda(x, weight, bias, lora_A, lora_B, lora_S, scaling)

    def lowrank_backward(self, grad_y, x, h1, h2, weight, lora_A, lora_B, lora_S, scaling,
                         need_x, need_A, need_B, need_S):
        return _ops().lowrank_linear_bwd_cuda(grad_y, x, h1, h2, weight, lora_A, lora_B, lora_S,
                                              scaling, need_x, need_A, need_B, need_S)

    def routed_forward(self, x, weight, bias, lora_A, lora_B, router_weight, scaling, top_k):
        return _ops().routed_lowrank_linear_fwd_cuda(x, weight, bias, lora_A, lora_B,
                                                     router_weight, scaling, top_k)

    def routed_backward(self, grad_y, grad_probs, x, h, hg, probs, gates, weight, lora_A, lora_B,
                        router_weight, scaling, need_x, need_A, need_B, need_router):
        return _ops().routed_lowrank_linear_bwd_cuda(
            grad_y, grad_probs, x, h, hg, probs, gates, weight, lora_A, lora_B, router_weight,
            scaling, need_x, need_A, need_B, need_router)

    def hdpissa_forward(self, x, weight, bias, lora_A, lora_B, scaling, need_h):
        return _ops().hdpissa_linear_fwd_cuda(x, weight, bias, lora_A, lora_B, scaling, need_h)

    def hdpissa_backward(self, grad_y, x, h, weight, lora_A, lora_B, scaling, need_x, need_A,
                         need_B):
        return _ops().hdpissa_linear_bwd_cuda(grad_y, x, h, weight, lora_A, lora_B, scaling,
                                              need_x, need_A, need_B)

    def update_(self, weight, P, Q, scale, copy):
        _ops().lowrank_update_cuda_(weight, P, Q, scale, copy)
