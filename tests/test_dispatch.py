"""Tests of backend selection (adapterops/dispatch.py) through `lowrank_linear`.

Default order: triton first (CUDA tensors, or CPU tensors under the Triton interpreter that
tests/conftest.py turns on without a GPU), then cuda (the compiled C++: CUDA tensors, or CPU
tensors with ADAPTEROPS_CSRC_ON_CPU=1, which tests/conftest.py also sets without a GPU), then
torch. `backend=` and `ADAPTEROPS_BACKEND` force one; the argument wins.
"""
import pytest
import torch

from adapterops import dispatch, lowrank_linear
from adapterops.backends import BACKENDS
from adapterops.backends.cuda import extension as cuda_extension
from utils import assert_close_to_reference


@pytest.fixture(autouse=True)
def _no_env_backend(monkeypatch):
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)


def _inputs(device, dtype=torch.float32, M=9, K=20, N=12, r=4, seed=0):
    g = torch.Generator().manual_seed(seed)

    def p(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(device, dtype)

    return dict(x=p(M, K), weight=p(N, K, scale=K ** -0.5), bias=p(N),
                lora_A=p(r, K, scale=K ** -0.5), lora_B=p(N, r, scale=r ** -0.5), scaling=0.5,
                lora_S=p(r, r, scale=r ** -0.5))


def _select(args, backend=None):
    return dispatch.select("lowrank", backend, x=args["x"], weight=args["weight"],
                           lora_A=args["lora_A"]).name


def _spy(monkeypatch):
    """Records which backend's forward runs (the real forward still runs)."""
    calls = []
    for name, b in BACKENDS.items():
        def forward(*args, _name=name, _real=b.lowrank_forward):
            calls.append(_name)
            return _real(*args)
        monkeypatch.setattr(b, "lowrank_forward", forward)
    return calls


def test_default_picks_triton(device, monkeypatch):
    args = _inputs(device)
    assert dispatch.explain("lowrank", x=args["x"], weight=args["weight"],
                            lora_A=args["lora_A"]) == {"triton": [], "cuda": [], "torch": []}
    assert _select(args) == "triton"
    calls = _spy(monkeypatch)
    lowrank_linear(**args)
    assert calls == ["triton"]


def test_float64_falls_back_to_torch(device, monkeypatch):
    args = _inputs(device, torch.float64)
    why = dispatch.explain("lowrank", x=args["x"], weight=args["weight"], lora_A=args["lora_A"])
    assert why["torch"] == []
    assert len(why["triton"]) == 1 and "torch.float64" in why["triton"][0], why
    assert len(why["cuda"]) == 1 and "torch.float64" in why["cuda"][0], why
    assert _select(args) == "torch"
    calls = _spy(monkeypatch)
    lowrank_linear(**args)
    assert calls == ["torch"]


def test_backend_argument_forces_torch(device, monkeypatch):
    args = _inputs(device)
    assert _select(args, "torch") == "torch"
    calls = _spy(monkeypatch)
    lowrank_linear(**args, backend="torch")
    assert calls == ["torch"]


def test_env_var_forces_and_argument_wins(device, monkeypatch):
    args = _inputs(device)
    calls = _spy(monkeypatch)
    monkeypatch.setenv(dispatch.ENV_VAR, "torch")
    assert _select(args) == "torch"
    lowrank_linear(**args)
    assert calls == ["torch"]
    assert _select(args, "triton") == "triton"
    lowrank_linear(**args, backend="triton")
    assert calls == ["torch", "triton"]


def test_env_var_is_read_per_call(device, monkeypatch):
    args = _inputs(device)
    monkeypatch.setenv(dispatch.ENV_VAR, "torch")
    assert _select(args) == "torch"
    monkeypatch.delenv(dispatch.ENV_VAR)
    assert _select(args) == "triton"
    monkeypatch.setenv(dispatch.ENV_VAR, "")  # empty means unset
    assert _select(args) == "triton"


def test_unknown_backend_argument(device):
    with pytest.raises(ValueError, match=r"backend='cutlass' is not a known backend; "
                                         r"known backends: triton, cuda, torch"):
        lowrank_linear(**_inputs(device), backend="cutlass")


def test_unknown_backend_env_var(device, monkeypatch):
    monkeypatch.setenv(dispatch.ENV_VAR, "tirton")
    with pytest.raises(ValueError, match=r"ADAPTEROPS_BACKEND='tirton' is not a known backend; "
                                         r"known backends: triton, cuda, torch"):
        lowrank_linear(**_inputs(device))
    # A valid argument does not excuse a bad environment: the typo would silently hide
    # elsewhere.
    with pytest.raises(ValueError, match="tirton"):
        lowrank_linear(**_inputs(device), backend="torch")


def test_forcing_triton_on_float64_raises_with_reason(device, monkeypatch):
    args = _inputs(device, torch.float64)
    with pytest.raises(ValueError, match=r"backend 'triton' was forced .* not torch\.float64"):
        lowrank_linear(**args, backend="triton")
    monkeypatch.setenv(dispatch.ENV_VAR, "triton")
    with pytest.raises(ValueError, match=r"backend 'triton' was forced .* not torch\.float64"):
        lowrank_linear(**args)


def test_rank_above_triton_maximum_falls_back_to_cuda(device, monkeypatch):
    M, K, N, r = 5, 24, 16, 129
    args = _inputs(device, M=M, K=K, N=N, r=r, seed=3)
    why = dispatch.explain("lowrank", x=args["x"], weight=args["weight"], lora_A=args["lora_A"])
    assert why["cuda"] == [] and why["torch"] == []
    assert any("rank 129" in reason for reason in why["triton"]), why
    assert _select(args) == "cuda"
    with pytest.raises(ValueError, match=r"backend 'triton' was forced .*rank 129 exceeds"):
        lowrank_linear(**args, backend="triton")

    # Auto-dispatch still gives the right answer, forward and backward.
    def run(dtype, backend=None):
        t = {k: (v.to(dtype) if isinstance(v, torch.Tensor) else v) for k, v in args.items()}
        t["x"].requires_grad_()
        t["lora_S"].requires_grad_()
        t["lora_B"].requires_grad_()
        y = lowrank_linear(**t, backend=backend)
        grad_y = torch.randn(M, N, generator=torch.Generator().manual_seed(4),
                             dtype=torch.float64).to(device, dtype)
        return (y.detach(), *torch.autograd.grad(y, [t["x"], t["lora_S"], t["lora_B"]], grad_y))

    calls = _spy(monkeypatch)
    got = run(torch.float32)
    assert calls == ["cuda"]
    ref = run(torch.float64, "torch")
    base = run(torch.float32, "torch")
    for name, a, r64, b in zip(("y", "dx", "dS", "dB"), got, ref, base):
        assert_close_to_reference(f"rank 129 auto {name}", a, r64, b)


def test_cuda_backend_declines_cpu_tensors_unless_asked(monkeypatch):
    """CPU tensors reach the C++ only with ADAPTEROPS_CSRC_ON_CPU=1 (a test mode); otherwise the
    cuda backend declines them, naming the switch, and a rank the Triton kernels lack goes to
    torch."""
    monkeypatch.delenv(cuda_extension.ON_CPU_ENV, raising=False)
    args = _inputs("cpu", r=129)
    why = dispatch.explain("lowrank", x=args["x"], weight=args["weight"], lora_A=args["lora_A"])
    assert len(why["cuda"]) == 1 and "CUDA tensors, not cpu" in why["cuda"][0], why
    assert cuda_extension.ON_CPU_ENV in why["cuda"][0]
    assert _select(args) == "torch"


def test_cuda_backend_unavailable_gives_the_loaders_reason(device, monkeypatch):
    """When adapterops._C can be neither imported nor built, forcing cuda raises with the
    loader's reason and auto-dispatch goes on to torch."""
    failed = cuda_extension.Extension(None, "", "no prebuilt adapterops._C (test); the build failed")
    monkeypatch.setattr(cuda_extension, "_loaded", failed)
    args = _inputs(device, r=129)
    assert BACKENDS["cuda"].unavailable_reason() == f"adapterops._C is not available: {failed.reason}"
    with pytest.raises(ValueError, match=r"backend 'cuda' was forced .*the build failed"):
        lowrank_linear(**args, backend="cuda")
    assert _select(args) == "torch"


def test_jit_build_can_be_forbidden(monkeypatch):
    monkeypatch.setenv(cuda_extension.JIT_ENV, "0")
    variant, why = cuda_extension.jit_variant()
    assert variant is None and "ADAPTEROPS_JIT_BUILD=0" in why


def test_a_missing_extension_never_breaks_import_and_gives_a_reason(device, monkeypatch):
    """No importable adapterops._C and no build allowed: the backend declines with both reasons
    (the outcome is then kept for the process; monkeypatch restores it afterwards)."""
    monkeypatch.setattr(cuda_extension, "_import_prebuilt",
                        lambda: (None, "no prebuilt adapterops._C (test)"))
    monkeypatch.setenv(cuda_extension.JIT_ENV, "0")
    monkeypatch.setattr(cuda_extension, "_loaded", None)
    monkeypatch.setenv(cuda_extension.ON_CPU_ENV, "1")
    args = _inputs(device, r=129)  # beyond triton: the cuda backend would be next
    why = BACKENDS["cuda"].reasons("lowrank", x=args["x"], weight=args["weight"],
                                   lora_A=args["lora_A"])
    assert why == ["adapterops._C is not available: no prebuilt adapterops._C (test); "
                   "ADAPTEROPS_JIT_BUILD=0 forbids a just-in-time build"], why
    assert BACKENDS["cuda"].unavailable_reason() == why[0]
    assert cuda_extension.describe() == ("not loaded: no prebuilt adapterops._C (test); "
                                         "ADAPTEROPS_JIT_BUILD=0 forbids a just-in-time build")
    assert _select(args) == "torch"
