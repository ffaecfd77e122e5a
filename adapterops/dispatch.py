"""Backend selection.

Per call, the first backend in priority order (`BACKENDS`' order) whose `reasons(op, ...)` is
empty serves. `backend="name"` on an op, or the `ADAPTEROPS_BACKEND` environment variable (read
per call; the argument wins), forces one; forcing an unknown backend, or one that cannot serve
the input, raises `ValueError` with the known backends and every reason.
"""
import os
from typing import Optional

from .backends import BACKENDS, Backend

ENV_VAR = "ADAPTEROPS_BACKEND"


def backend_names() -> tuple[str, ...]:
    return tuple(BACKENDS)


def check_backend_name(backend: Optional[str]) -> None:
    """Rejects an unknown backend name early (before any tensor work)."""
    for name, source in ((backend, "backend"), (os.environ.get(ENV_VAR) or None, ENV_VAR)):
        if name is not None and name not in BACKENDS:
            raise ValueError(f"{source}={name!r} is not a known backend; known backends: "
                             f"{', '.join(BACKENDS)}")


def explain(op: str, **inputs) -> dict[str, list[str]]:
    """For each backend, why it cannot serve `op` for these inputs (empty list: it can)."""
    return {name: b.reasons(op, **inputs) for name, b in BACKENDS.items()}


def select(op: str, backend: Optional[str] = None, **inputs) -> Backend:
    """The backend that serves `op` for these inputs (see the module docstring)."""
    check_backend_name(backend)
    forced = backend or os.environ.get(ENV_VAR) or None
    if forced is not None:
        chosen = BACKENDS[forced]
        reasons = chosen.reasons(op, **inputs)
        if reasons:
            raise ValueError(f"backend {forced!r} was forced for {op} but cannot serve this input: "
                             f"{'; '.join(reasons)} (known backends: {', '.join(BACKENDS)})")
        return chosen
    why_not = {}
    for name, candidate in BACKENDS.items():
        reasons = candidate.reasons(op, **inputs)
        if not reasons:
            return candidate
        why_not[name] = reasons
    raise ValueError(f"no backend can serve {op}: "
                     + "; ".join(f"{n}: {', '.join(r)}" for n, r in why_not.items()))
