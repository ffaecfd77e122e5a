"""Comparison helpers for kernel tests.

The rule (after flash-attention's tests): a kernel's error against the float64 reference may be
at most twice plain PyTorch's error in the same dtype, plus one unit of the dtype's rounding
at the reference's scale (so an exact baseline does not demand an exact kernel).
"""
import time

import pytest
import torch


def max_abs_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def assert_close_to_reference(name: str, actual: torch.Tensor, reference64: torch.Tensor,
                              baseline: torch.Tensor) -> None:
    """actual: the result under test; reference64: float64 reference; baseline: plain PyTorch
    (the torch backend) in actual's dtype, on the same inputs."""
    assert actual.shape == reference64.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(reference64.shape)}"
    assert actual.dtype == baseline.dtype, f"{name}: dtype {actual.dtype} != baseline's {baseline.dtype}"
    assert torch.isfinite(actual).all(), f"{name}: non-finite values"
    scale = reference64.abs().max().item() if reference64.numel() else 0.0
    ulp = torch.finfo(actual.dtype).eps * scale
    err = max_abs_err(actual, reference64)
    base_err = max_abs_err(baseline, reference64)
    bound = 2 * base_err + ulp
    assert err <= bound, (f"{name}: max abs error {err:.3e} vs float64 exceeds 2 x torch's "
                          f"{base_err:.3e} + 1 ulp {ulp:.3e} (reference scale {scale:.3e}, dtype {actual.dtype})")


def forbid_backend_calls(monkeypatch, method: str) -> None:
    """Makes every backend's `method` (e.g. "lowrank_forward") fail the test: a bad input must
    be rejected at the Python boundary, before dispatch."""
    from adapterops.backends import BACKENDS

    def reached(*args, **kwargs):
        raise AssertionError("a bad input reached a backend")

    for backend in BACKENDS.values():
        monkeypatch.setattr(backend, method, reached)


def join_or_kill(context, guard_s: float, what: str) -> None:
    """Waits for the workers of `torch.multiprocessing.spawn(..., join=False)`: a worker's
    exception fails the test with its traceback (join raises it); workers still alive after
    guard_s seconds are killed and the test fails, so nothing hangs."""
    deadline = time.monotonic() + guard_s
    while not context.join(timeout=0.5):
        if time.monotonic() > deadline:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
            pytest.fail(f"{what} did not finish within {guard_s} s")


class CountingKernel:
    """Stands in for a kernel and records (its name, the grid) of every launch in `log`."""

    def __init__(self, name, kernel, log):
        self.name, self.kernel, self.log = name, kernel, log

    def __getitem__(self, grid):
        self.log.append((self.name, grid))
        return self.kernel[grid]

    def __getattr__(self, name):
        return getattr(self.kernel, name)
