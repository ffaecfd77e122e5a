"""The `triton` backend: CUDA tensors on sm_80 or newer, or CPU tensors under the Triton
interpreter (`TRITON_INTERPRET=1` set before adapterops first imports its kernels).

One module per op family (`lowrank`, `routed`, `hdpissa`, `update`, `dequant`), each with its
`LIMITS`, `reasons_on(device)`, its launchers and its tile configurations (data). Nothing here imports
triton until a call needs it, so `import adapterops` stays light.
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
    who = "the Triton kernels"

    def unavailable_reason(self) -> Optional[str]:
        return _triton_import_error()

    def device_reasons(self, family: str, device) -> list[str]:
        return self.family(family).reasons_on(device)


def kernel_configurations():
    """Every (kernel, dtype, tile configuration) the dispatcher can launch, for the kernel report.

    Returns a list of `KernelConfig`s; see `adapterops.backends.triton.common`.
    """
    from . import dequant, lowrank, routed, update
    return (lowrank.kernel_configurations() + routed.kernel_configurations()
            + update.kernel_configurations() + dequant.kernel_configurations())
