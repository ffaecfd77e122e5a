"""Backends, in the order the dispatcher tries them: `triton`, then the compiled `cuda` C++
backend, then `torch` (plain PyTorch, which serves everything)."""
from .base import Backend
from .cuda import CudaBackend
from .reference import TorchBackend
from .triton import TritonBackend

BACKENDS: dict[str, Backend] = {b.name: b for b in (TritonBackend(), CudaBackend(), TorchBackend())}

__all__ = ["Backend", "BACKENDS"]
