"""The ops' eager door (`adapterops.ops.declare.eager_door`) calls the autograd.Function's
C-level apply itself, skipping the Python `Function.apply`; these tests hold it to what that
`apply` does beyond the call: unwrap dead functorch wrappers, and defer under a transform."""
import pytest
import torch
import torch.nn.functional as F

from adapterops import hdpissa_linear, lowrank_linear, routed_lowrank_linear

M, K, N, R, HEADS = 5, 8, 6, 2, 3


def _factors():
    g = torch.Generator().manual_seed(7)
    weight = torch.randn(N, K, generator=g, dtype=torch.float64) / K ** 0.5
    lora_A = torch.randn(R, K, generator=g, dtype=torch.float64).requires_grad_()
    lora_B = torch.randn(N, R, generator=g, dtype=torch.float64).requires_grad_()
    return weight, lora_A, lora_B


def _lowrank(x, weight, lora_A, lora_B):
    return lowrank_linear(x, weight, None, lora_A, lora_B, 0.5, backend="torch")


def _routed(x, weight, lora_A, lora_B):
    # HEADS heads (E, out, r), scaled copies of lora_B; a fixed router (E, in).
    heads = torch.stack([lora_B * (e + 1) for e in range(HEADS)])
    router = torch.linspace(-1, 1, HEADS * K, dtype=x.dtype).reshape(HEADS, K)
    return routed_lowrank_linear(x, weight, None, lora_A, heads, router, 0.5, backend="torch")


def _hdpissa(x, weight, lora_A, lora_B):
    return hdpissa_linear(x, weight, None, lora_A, lora_B, 0.5, backend="torch")


OPS = {"lowrank": _lowrank, "routed": _routed, "hdpissa": _hdpissa}


@pytest.mark.parametrize("op", OPS)
def test_dead_functorch_wrapper_passes_its_gradient_on(op):
    """A tensor that escaped a finished `torch.func.vjp` is a dead wrapper: the op must send
    the gradient through it to the tensor it wraps, as for any PyTorch op (here F.linear
    composed with the op's own output on the unwrapped tensor). Calling the C-level apply
    without unwrapping loses x0's gradient (it stays None)."""
    weight, lora_A, lora_B = _factors()
    x0 = torch.randn(M, K, dtype=torch.float64, requires_grad=True)
    leaked = []

    def keep(x):
        leaked.append(x)
        return x * 2

    torch.func.vjp(keep, x0)
    dead = leaked[0]
    assert torch._C._functorch.is_functorch_wrapped_tensor(dead)
    OPS[op](dead, weight, lora_A, lora_B).sum().backward()
    through_dead = x0.grad
    assert through_dead is not None, "the gradient did not reach the wrapped tensor"

    x1 = x0.detach().clone().requires_grad_()
    OPS[op](x1, weight, lora_A, lora_B).sum().backward()
    torch.testing.assert_close(through_dead, x1.grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("transform", ["vmap", "grad"])
def test_functorch_transform_gets_pytorchs_error(op, transform):
    """Under a functorch transform the door defers to `Function.apply`, which refuses (the ops
    define no vmap or forward-mode rule) with PyTorch's own message, instead of computing on
    wrapped tensors without the transform seeing it."""
    weight, lora_A, lora_B = _factors()
    x = torch.randn(3, M, K, dtype=torch.float64)
    if transform == "vmap":
        run = torch.func.vmap(lambda xi: OPS[op](xi, weight, lora_A, lora_B))
    else:
        run = torch.func.grad(lambda xi: OPS[op](xi, weight, lora_A, lora_B).sum())
    with pytest.raises(RuntimeError, match="functorch transforms"):
        run(x)
    # The door is unchanged afterwards: a plain call still matches the plain composition.
    y = _lowrank(x[0], weight, lora_A, lora_B)
    expected = F.linear(x[0], weight) + 0.5 * F.linear(F.linear(x[0], lora_A), lora_B)
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)
