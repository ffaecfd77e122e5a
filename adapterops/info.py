"""`python -m adapterops.info`: versions, devices, and which backends can run here (and, for
each that cannot, why). Run it first when a backend is not picked as expected."""
import os
import platform
import sys

import torch

from . import __version__
from .backends import BACKENDS
from .backends.cuda import extension as cuda_extension


def _version(module_name: str) -> str:
    try:
        module = __import__(module_name)
    except Exception as exc:
        return f"not importable ({type(exc).__name__}: {exc})"
    return getattr(module, "__version__", "?")


def _probe_inputs(device: str, dtype: torch.dtype) -> dict:
    """Tiny inputs that ask a backend the support question of every op family (routed: 4 heads
    of rank 16) for `device` and `dtype`."""
    return {"x": torch.empty(1, 16, device=device, dtype=dtype),
            "weight": torch.empty(16, 16, device=device, dtype=dtype),  # the update's W too
            "lora_A": torch.empty(16, 16, device=device, dtype=dtype),
            "lora_B": torch.empty(4, 16, 16, device=device, dtype=dtype)}


def report() -> str:
    lines = [f"adapterops {__version__}",
             f"python {platform.python_version()} ({sys.executable})",
             f"torch {torch.__version__} (CUDA build: {torch.version.cuda or 'no'})",
             f"triton {_version('triton')}",
             f"numpy {_version('numpy')}",
             f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '')!r} "
             f"ADAPTEROPS_BACKEND={os.environ.get('ADAPTEROPS_BACKEND', '')!r} "
             f"ADAPTEROPS_AUTOTUNE={os.environ.get('ADAPTEROPS_AUTOTUNE', '')!r} "
             f"ADAPTEROPS_CSRC_ON_CPU={os.environ.get('ADAPTEROPS_CSRC_ON_CPU', '')!r} "
             f"ADAPTEROPS_JIT_BUILD={os.environ.get('ADAPTEROPS_JIT_BUILD', '')!r}"]
    devices = ["cpu"]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            lines.append(f"cuda:{i} {torch.cuda.get_device_name(i)} "
                         f"(compute capability {'.'.join(map(str, torch.cuda.get_device_capability(i)))})")
        devices.append("cuda")
    else:
        lines.append("no CUDA device")
    lines.append(f"CUDA C++ extension adapterops._C: {cuda_extension.describe()}")
    lines.append("backends, in priority order, with each op family's limits and verdicts:")
    for name, backend in BACKENDS.items():
        if name == "cuda" and cuda_extension.load_if_built() is None:
            lines.append("  cuda: not loaded (see adapterops._C above; info builds nothing)")
            continue
        reason = backend.unavailable_reason()
        if reason is not None:
            lines.append(f"  {name}: unavailable: {reason}")
            continue
        lines.append(f"  {name}: available")
        for op in backend.families:
            lines.append(f"    {op}: {backend.family(op).LIMITS}")
            for device in devices:
                for dtype in (torch.float32, torch.bfloat16):
                    why_not = backend.reasons(op, **_probe_inputs(device, dtype))
                    verdict = "serves" if not why_not else "declines: " + "; ".join(why_not)
                    lines.append(f"    {op} {device} {str(dtype).replace('torch.', '')}: {verdict}")
    return "\n".join(lines)


if __name__ == "__main__":
    print(report())
