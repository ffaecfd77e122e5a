"""The `triton` backend: CUDA tensors on sm_80 or newer, or CPU tensors under the Triton
interpreter (`TRITON_INTERPRET=1` set before adapterops first imports its kernels).

Nothing here imports triton until a call needs it, so `import adapterops` stays light.
"""
import functools
from typing import Optional

from ..base import Backend


@functools.cache
def _triton_import_error() -> Optional[str]:
    try:
        import triton  # noqa: F401
    except Exception as exc:  # any failure to import is a reason, never a crash
        return f"triton is not importable ({type(exc).__name__}: {exc})"
    try:
        from ... import kernels  # noqa: F401
    except Exception as exc:
        return (f"adapterops.kernels is not importable ({type(exc).__name__}: {exc}); "
                "is adapterops installed (pip install -e .)?")
    return None


class TritonBackend(Backend):
    name = "triton"

    def unavailable_reason(self) -> Optional[str]:
        return _triton_import_error()

    def lowrank_reasons(self, **inputs) -> list[str]:
        from . import lowrank
        return lowrank.reasons(**inputs)

    def lowrank_forward(self, *args):
        from . import lowrank
        return lowrank.forward(*args)

    def lowrank_backward(self, *args):
        from . import lowrank
        return lowrank.backward(*args)

    def routed_reasons(self, **inputs) -> list[str]:
        from . import routed
        return routed.reasons(**inputs)

    def routed_forward(self, *args):
        from . import routed
        return routed.forward(*args)

    def routed_backward(self, *args):
        from . import routed
        return routed.backward(*args)

    def hdpissa_reasons(self, **inputs) -> list[str]:
        from . import hdpissa
        return hdpissa.reasons(**inputs)

    def hdpissa_forward(self, *args):
        from . import hdpissa
        return hdpissa.forward(*args)

    def hdpissa_backward(self, *args):
        from . import hdpissa
        return hdpissa.backward(*args)

    def update_reasons(self, **inputs) -> list[str]:
        from . import hdpissa
        return hdpissa.update_reasons(**inputs)

    def update_(self, *args):
        from . import hdpissa
        return hdpissa.update_(*args)


def kernel_configurations():
    """Every (kernel, dtype, tile configuration) the dispatcher can launch, for the kernel report.

    Returns a list of `KernelConfig`s; see `adapterops.backends.triton.common`.
    """
    from . import hdpissa, lowrank, routed
    return (lowrank.kernel_configurations() + routed.kernel_configurations()
            + hdpissa.kernel_configurations())
