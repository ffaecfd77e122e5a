"""Backends, in the order the dispatcher tries them (the `cuda` C++ backend joins between
`triton` and `torch` when csrc/ lands)."""
from .base import Backend
from .reference import TorchBackend
from .triton import TritonBackend

BACKENDS: dict[str, Backend] = {b.name: b for b in (TritonBackend(), TorchBackend())}

__all__ = ["Backend", "BACKENDS"]
