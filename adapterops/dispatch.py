"""Backend selection.

Per call, the first backend in priority order (`BACKENDS`' order) whose `reasons(op, ...)` is
empty serves; the choice is cached per input signature (`select`). `backend="name"` on an op,
or the `ADAPTEROPS_BACKEND` environment variable (read per call; the argument wins), forces one;
forcing an unknown backend, or one that cannot serve the input, raises `ValueError` with the
known backends and every reason.
"""
import os
from typing import Optional

from .backends import BACKENDS, Backend

ENV_VAR = "ADAPTEROPS_BACKEND"
# ADAPTEROPS_BACKEND's raw value, for the cache key: os.environ's own dict, read directly, costs
# 0.04 us where os.environ.get costs 0.7 us per op call (CPython raises and catches a KeyError
# when the variable is unset). os.environ keeps that dict current; select reads os.environ.
_ENVIRON = getattr(os.environ, "_data", os.environ)
_ENV_KEY = os.environ.encodekey(ENV_VAR) if _ENVIRON is not os.environ else ENV_VAR


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


# select's answers, per (op, backend argument, ADAPTEROPS_BACKEND, the op's signature of its
# inputs). Each op's signature holds everything its backends' reasons depend on (device, dtype,
# and the weight sizes with limits: rank, head count), never the token count, so a hit skips
# the reasons and varying batch sizes share one entry.
_SELECTED: dict = {}
_SELECTED_LIMIT = 4096


def clear_cache() -> None:
    """Forgets every cached selection (after changing what a backend's reasons read, such as
    the loaded extension or ADAPTEROPS_CSRC_ON_CPU; ADAPTEROPS_BACKEND is part of the key)."""
    _SELECTED.clear()


def _signature(inputs: dict) -> tuple:
    """The generic signature: every input's device, dtype and shape (x's without its token
    count)."""
    return tuple(None if t is None else (t.device, t.dtype, t.shape[1:] if name == "x" else t.shape)
                 for name, t in inputs.items())


def cached(op: str, backend: Optional[str], signature: tuple) -> Optional[Backend]:
    """select's cached answer for `signature`, or None (then call `select`): the ops' hot path,
    one dictionary lookup."""
    return _SELECTED.get((op, backend, _ENVIRON.get(_ENV_KEY), signature))


def select(op: str, backend: Optional[str] = None, *, signature: Optional[tuple] = None,
           **inputs) -> Backend:
    """The backend that serves `op` for these inputs (see the module docstring). The answer is
    cached per `signature`: the op's own, cheaper summary of what its backends' reasons depend
    on (see `_SELECTED`), or by default every input's device, dtype and shape."""
    if signature is None:
        signature = _signature(inputs)
    key = (op, backend, _ENVIRON.get(_ENV_KEY), signature)
    chosen = _SELECTED.get(key)
    if chosen is None:
        chosen = _select(op, backend, inputs)
        if len(_SELECTED) >= _SELECTED_LIMIT:
            _SELECTED.clear()
        _SELECTED[key] = chosen
    return chosen


def _select(op: str, backend: Optional[str], inputs: dict) -> Backend:
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
