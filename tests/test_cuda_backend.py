"""What the `cuda` backend (csrc/, adapterops._C) runs here, said out loud.

The op-level correctness matrices (tests/test_lowrank.py, test_routed.py, test_hdpissa.py) run
the cuda backend beside triton. Without a GPU they exercise its C++ on CPU tensors (the host
build: ATen's CPU GEMMs, the host drivers of its kernels); its CUDA kernels are compiled and
linked by `make csrc-check` but never run. These tests pin down which of the two a run
exercised, so a green run on a GPU machine means the CUDA build really ran.
"""
import pytest
import torch

from adapterops import lowrank_linear, routed_lowrank_linear
from adapterops.backends import BACKENDS
from adapterops.backends.cuda import extension

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(),
                               reason="no CUDA device: the cuda backend's CUDA kernels cannot run "
                                      "here (its C++ runs on CPU tensors in the other tests)")


@needs_gpu
def test_the_cuda_build_serves_cuda_tensors():
    x = torch.randn(8, 32, device="cuda")
    assert BACKENDS["cuda"].reasons("lowrank", x=x, weight=None, lora_A=None) == []
    loaded = extension.load()
    assert loaded.with_cuda, loaded
    assert extension.kernel_image_problem(x.device) is None


@needs_gpu
def test_routed_gate_kernels_run_on_the_gpu_like_on_the_host():
    """The warp kernels against the same C++ on CPU tensors (ADAPTEROPS_CSRC_ON_CPU=1), beyond
    a warp's 32 heads and with top-k, forward and the gate gradients."""
    g = torch.Generator().manual_seed(3)
    M, K, N, r, E = 67, 48, 40, 24, 37
    cpu = [torch.randn(*s, generator=g) / 4 for s in ((M, K), (N, K), (N,), (r, K), (E, N, r), (E, K))]
    results = {}
    for device in ("cpu", "cuda"):
        t = [a.to(device).requires_grad_() for a in cpu]
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv(extension.ON_CPU_ENV, "1")
            y, p = routed_lowrank_linear(*t, 0.5, top_k=5, return_router_probs=True, backend="cuda")
            (y.square().sum() + p.square().sum()).backward()
        results[device] = [y, p] + [a.grad for a in t]
    for i, (a, b) in enumerate(zip(results["cuda"], results["cpu"])):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-4, atol=1e-5, msg=f"output {i}")


def test_the_host_build_serves_cpu_tensors_only_in_its_test_mode(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("a GPU machine loads the CUDA build (tested above)")
    x = torch.randn(4, 16)
    args = dict(weight=torch.randn(8, 16), bias=None, lora_A=torch.randn(2, 16),
                lora_B=torch.randn(8, 2), scaling=0.5)
    y = lowrank_linear(x, **args, backend="cuda")
    loaded = extension.load()
    assert loaded.module is not None and not loaded.with_cuda, loaded
    assert loaded.how in ("prebuilt", "just-in-time (host)")
    torch.testing.assert_close(y, lowrank_linear(x, **args, backend="torch"))
    monkeypatch.delenv(extension.ON_CPU_ENV)
    assert "CUDA tensors, not cpu" in BACKENDS["cuda"].reasons("lowrank", x=x)[0]
