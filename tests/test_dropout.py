"""Tests of the fused adapter dropout (adapterops/backends/reference/dropout.py: the mask;
`lowrank_linear(..., dropout=p)`: the op; the modules and PEFT's fused layers: its users).

1. The mask: the Triton helper draws exactly the host replica's mask for any tiling; the keep
   fraction lies within binomial bounds; masks of different seeds are independent.
2. The op on every backend: given the same seed, output and every gradient against the float64
   reference (the torch backend on float64 copies, the same mask) by the rule in tests/utils.py;
   the backends draw the same mask (fp32 results agree to rounding).
3. The memory contract with dropout: nothing mask- or x-sized is saved (LaMDA: 2 M r elements
   plus the 1-element seed; LoRA: x once).
4. The seed: drawn per call from torch's generator (`torch.manual_seed` replays it); activation
   checkpointing, reentrant and not, gives exactly the gradients of a run without it.
5. torch.compile(fullgraph=True) through the custom ops, equal to the eager door.
6. Bad dropout arguments raise before any kernel.
7. HydraLoRA (`routed_lowrank_linear(..., dropout=p)`, FusedHydraLoRALinear): one mask on A's
   input for every head, the router and base layer undropped; against float64 with the same
   mask (dense and top-2), the saved tensors, checkpointing, compile, the module's fused path.
"""
import pytest
import torch
import triton
import triton.language as tl
from torch.utils.checkpoint import checkpoint

from adapterops import lowrank_linear, routed_lowrank_linear
from adapterops.backends.reference import dropout as host_dropout
from adapterops.kernels.common import dropout_keep
from utils import assert_close_to_reference, forbid_backend_calls

BACKENDS = ("triton", "cuda", "torch")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


# 1. The mask.

@triton.jit
def _draw(seed_ptr, out_ptr, M, N, threshold, BM: tl.constexpr, BN: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BM + tl.arange(0, BM)
    col0 = tl.program_id(1) * BN
    keep = dropout_keep(tl.load(seed_ptr), threshold, rows, col0, BN)
    cols = col0 + tl.arange(0, BN)
    tl.store(out_ptr + rows[:, None] * N + cols[None, :], keep.to(tl.int8),
             mask=(rows[:, None] < M) & (cols[None, :] < N))


def _triton_mask(seed: torch.Tensor, rows: int, cols: int, p: float, block_rows: int,
                 block_cols: int) -> torch.Tensor:
    """The mask as the kernels draw it: `dropout_keep` over a grid of tiles."""
    out = torch.zeros(rows, cols, dtype=torch.int8, device=seed.device)
    _draw[(triton.cdiv(rows, block_rows), triton.cdiv(cols, block_cols))](
        seed, out, rows, cols, host_dropout.threshold(p), BM=block_rows, BN=block_cols)
    return out.bool()


@pytest.mark.parametrize("seed", [0, 12345, 2 ** 62 + 99, -5])
def test_triton_mask_is_the_host_replica_for_any_tiling(seed, device):
    s = torch.tensor([seed], dtype=torch.int64, device=device)
    expected = host_dropout.keep_mask(s, 37, 72, 0.3)
    for block_rows, block_cols in ((16, 16), (32, 8), (8, 64)):
        assert torch.equal(_triton_mask(s, 37, 72, 0.3, block_rows, block_cols), expected)


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5, 0.9])
def test_keep_fraction_within_binomial_bounds(p):
    n = 256 * 512
    for seed in range(4):
        kept = host_dropout.keep_mask(torch.tensor([seed]), 256, 512, p).float().mean().item()
        sigma = (p * (1 - p) / n) ** 0.5
        assert abs(kept - (1 - p)) < 5 * sigma, (p, seed, kept)


def test_masks_of_different_seeds_are_independent():
    """Two seeds (as two layers, two steps, or sibling calls draw): the masks agree on a
    fraction p^2 + (1-p)^2 of the elements, within binomial bounds; so do the rows and the
    columns of one mask (no structure along either axis)."""
    p, rows, cols = 0.5, 128, 512
    a = host_dropout.keep_mask(torch.tensor([1]), rows, cols, p)
    b = host_dropout.keep_mask(torch.tensor([2]), rows, cols, p)
    sigma = (0.25 / (rows * cols)) ** 0.5
    assert abs((a == b).float().mean().item() - 0.5) < 5 * sigma
    assert abs((a[1:] == a[:-1]).float().mean().item() - 0.5) < 5 * sigma
    assert abs((a[:, 1:] == a[:, :-1]).float().mean().item() - 0.5) < 5 * sigma
    assert abs((a[:, 8:] == a[:, :-8]).float().mean().item() - 0.5) < 5 * sigma


def test_p_one_drops_everything_and_p_zero_nothing():
    x = torch.randn(5, 16)
    assert torch.equal(host_dropout.dropped(x, torch.tensor([3]), 1.0), torch.zeros_like(x))
    assert host_dropout.keep_mask(torch.tensor([3]), 5, 16, 0.0).all()


# 2. The op on every backend.

def _inputs(mode: str, dtype, device, M=37, K=40, N=24, r=5, lead=None):
    g = torch.Generator().manual_seed(7)

    def p(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype).to(device)

    x = p(*(lead or (M,)), K)
    t = dict(x=x, weight=p(N, K, scale=K ** -0.5), bias=p(N), lora_A=p(r, K, scale=K ** -0.5),
             lora_B=p(N, r), lora_S=p(r, r) if mode == "lamda" else None)
    trained = ("x", "lora_S", "lora_B") if mode == "lamda" else ("x", "lora_A", "lora_B")
    for name in trained:
        t[name].requires_grad_()
    grad_y = p(*x.shape[:-1], N)
    return t, grad_y


def _run(t: dict, grad_y, backend, p: float, seed, dtype=None):
    """(y, {name: grad}) of lowrank_linear with dropout p and `seed`, inputs cast to dtype."""
    leaves = {k: (v.detach().to(dtype or v.dtype).requires_grad_(v.requires_grad)
                  if v is not None else None) for k, v in t.items()}
    y = lowrank_linear(leaves["x"], leaves["weight"], leaves["bias"], leaves["lora_A"],
                       leaves["lora_B"], 0.75, leaves["lora_S"], dropout=p, dropout_seed=seed,
                       backend=backend)
    y.backward(grad_y.to(y.dtype))
    return y, {k: v.grad for k, v in leaves.items() if v is not None and v.grad is not None}


@pytest.mark.parametrize("mode", ["lora", "lamda"])
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_matches_float64_reference_with_the_same_mask(backend, dtype, mode, device):
    t, grad_y = _inputs(mode, dtype, device, lead=(3, 13))
    seed = torch.tensor([987654321], device=device)
    ref_y, ref_g = _run(t, grad_y.double(), "torch", 0.2, seed, torch.float64)
    base_y, base_g = _run(t, grad_y, "torch", 0.2, seed)
    y, grads = _run(t, grad_y, backend, 0.2, seed)
    assert_close_to_reference(f"{backend} y", y, ref_y, base_y)
    assert set(grads) == set(ref_g)
    for name in grads:
        assert_close_to_reference(f"{backend} d{name}", grads[name], ref_g[name], base_g[name])


@pytest.mark.parametrize("mode", ["lora", "lamda"])
def test_backends_draw_the_same_mask(mode, device):
    """In fp32 the backends differ by rounding only; a different mask would differ by O(1)."""
    t, grad_y = _inputs(mode, torch.float32, device)
    seed = torch.tensor([42], device=device)
    results = {b: _run(t, grad_y, b, 0.5, seed) for b in BACKENDS}
    other = _run(t, grad_y, "torch", 0.5, torch.tensor([43], device=device))
    for backend in ("triton", "cuda"):
        y, grads = results[backend]
        torch.testing.assert_close(y, results["torch"][0], rtol=1e-5, atol=1e-5)
        for name, g in grads.items():
            torch.testing.assert_close(g, results["torch"][1][name], rtol=1e-5, atol=1e-5)
    assert (other[0] - results["torch"][0]).abs().max() > 0.1


def test_dropout_applies_to_the_adapter_input_only(device):
    """With B = 0 the adapter adds nothing, whatever is dropped: y is the base layer's."""
    t, grad_y = _inputs("lora", torch.float32, device)
    t["lora_B"] = torch.zeros_like(t["lora_B"])
    for backend in BACKENDS:
        y = lowrank_linear(t["x"], t["weight"], t["bias"], t["lora_A"], t["lora_B"], 1.0,
                           dropout=0.9, backend=backend)
        torch.testing.assert_close(y, torch.nn.functional.linear(t["x"], t["weight"], t["bias"]))


# 3. The memory contract.

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["lora", "lamda"])
def test_nothing_mask_sized_is_saved(backend, mode, device):
    t, grad_y = _inputs(mode, torch.float32, device, M=64, K=48, N=40, r=4)
    params = {v.data_ptr() for k, v in t.items() if k != "x" and v is not None}
    saved = []

    def pack(tensor):
        saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = lowrank_linear(t["x"], t["weight"], t["bias"], t["lora_A"], t["lora_B"], 0.5,
                           t["lora_S"], dropout=0.1, backend=backend)
    y.backward(grad_y)
    activations = sorted(s.numel() for s in saved if s.data_ptr() not in params)
    M, K, r = 64, 48, 4
    # LaMDA: h1 and h2 (M x r each) and the seed; LoRA: x once and the seed (dB reads h1).
    expected = [1, M * r, M * r] if mode == "lamda" else [1, M * r, M * K]
    assert activations == expected


# 4. The seed.

def test_seed_is_drawn_per_call_from_torchs_generator(device):
    t, _ = _inputs("lora", torch.float32, device)
    args = (t["x"], t["weight"], t["bias"], t["lora_A"], t["lora_B"], 1.0)
    torch.manual_seed(0)
    first, second = (lowrank_linear(*args, dropout=0.5) for _ in range(2))
    torch.manual_seed(0)
    again = lowrank_linear(*args, dropout=0.5)
    assert torch.equal(first, again)
    assert not torch.equal(first, second)


@pytest.mark.parametrize("use_reentrant", [True, False])
@pytest.mark.parametrize("backend", BACKENDS)
def test_checkpointing_replays_the_mask(backend, use_reentrant, device):
    t, grad_y = _inputs("lamda", torch.float32, device)

    N = t["weight"].shape[0]

    def layer(x, lora_S, lora_B):
        """Two adapted linears, each drawing its own seed."""
        h = lowrank_linear(x, t["weight"], t["bias"], t["lora_A"], lora_B, 0.5, lora_S,
                           dropout=0.3, backend=backend)
        return lowrank_linear(h, t["weight"][:, :N], None, t["lora_A"][:, :N], lora_B, 0.5,
                              lora_S, dropout=0.3, backend=backend)

    _assert_checkpointing_changes_nothing(layer, [t[n] for n in ("x", "lora_S", "lora_B")],
                                          use_reentrant)


def _assert_checkpointing_changes_nothing(layer, inputs, use_reentrant: bool) -> None:
    """layer(*inputs) and its gradients, from the same seed, equal bit for bit with and without
    torch.utils.checkpoint around it."""
    def run(checkpointed: bool):
        leaves = [t.detach().clone().requires_grad_() for t in inputs]
        torch.manual_seed(11)
        if checkpointed:
            y = checkpoint(layer, *leaves, use_reentrant=use_reentrant)
        else:
            y = layer(*leaves)
        y.backward(torch.ones_like(y))
        return [y] + [leaf.grad for leaf in leaves]

    for a, b in zip(run(False), run(True)):
        assert torch.equal(a, b)


# 5. torch.compile.

@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_equals_eager(backend, device):
    t, grad_y = _inputs("lora", torch.float32, device)
    seed = torch.tensor([5], device=device)

    def f(x, weight, bias, lora_A, lora_B):
        return lowrank_linear(x, weight, bias, lora_A, lora_B, 0.5, dropout=0.25,
                              dropout_seed=seed, backend=backend)

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (f, compiled):
        leaves = [t[n].detach().clone().requires_grad_()
                  for n in ("x", "weight", "bias", "lora_A", "lora_B")]
        leaves[1].requires_grad_(False)
        leaves[2].requires_grad_(False)
        y = fn(*leaves)
        y.backward(grad_y)
        results.append([y] + [leaves[i].grad for i in (0, 3, 4)])
    for a, b in zip(*results):
        assert torch.equal(a, b)


# 6. Bad input.

@pytest.mark.parametrize("kwargs,error,words", [
    (dict(dropout=-0.1), ValueError, "dropout must be in [0, 1], got -0.1"),
    (dict(dropout=1.5), ValueError, "dropout must be in [0, 1], got 1.5"),
    (dict(dropout=True), TypeError, "dropout must be a float"),
    (dict(dropout="0.1"), TypeError, "dropout must be a float"),
    (dict(dropout=0.1, dropout_seed=torch.tensor([1.0])), TypeError, "1-element torch.int64"),
    (dict(dropout=0.1, dropout_seed=torch.tensor([1, 2])), TypeError, "shape (2,)"),
    (dict(dropout=0.1, dropout_seed=3), TypeError, "got int"),
    (dict(dropout=0.1, dropout_seed=torch.tensor([1], device="meta")), ValueError,
     "dropout_seed is on meta"),
])
def test_bad_dropout_arguments_raise_before_any_kernel(kwargs, error, words, monkeypatch):
    forbid_backend_calls(monkeypatch, "lowrank_forward")
    t, _ = _inputs("lora", torch.float32, "cpu")
    with pytest.raises(error) as info:
        lowrank_linear(t["x"], t["weight"], t["bias"], t["lora_A"], t["lora_B"], 1.0, **kwargs)
    assert words in str(info.value)


# 7. HydraLoRA: `routed_lowrank_linear(..., dropout=p)` and FusedHydraLoRALinear. One mask on
# A's input shared by every head; the router and the base GEMM see x.

def _hydra_inputs(dtype, device, lead=(3, 13), K=40, N=24, r=5, E=4, top_k=None):
    """Inputs in `dtype` (float64 draws rounded), every adapter tensor trained, and the output
    gradients (of y and of the probabilities). With top_k, tokens are redrawn until the k-th and
    (k+1)-th logits differ by >= 0.1 in bf16, so every dtype routes to the same heads."""
    g = torch.Generator().manual_seed(8)

    def p(*shape, scale=1.0):
        return torch.randn(*shape, generator=g, dtype=torch.float64) * scale

    t = dict(weight=p(N, K, scale=K ** -0.5), bias=p(N), lora_A=p(r, K, scale=K ** -0.5),
             lora_B=p(E, N, r, scale=r ** -0.5), router_weight=p(E, K, scale=2 * K ** -0.5))
    x = p(*lead, K)
    if top_k is not None:
        wg = t["router_weight"].to(torch.bfloat16).double()
        for _ in range(100):
            top = (x.to(torch.bfloat16).double() @ wg.t()).topk(top_k + 1, dim=-1).values
            small = top[..., top_k - 1] - top[..., top_k] < 0.1
            if not small.any():
                break
            x[small] = p(int(small.sum()), K)
        assert not small.any()
    t["x"] = x
    t = {k: v.to(dtype).to(device) for k, v in t.items()}
    for name in ("x", "lora_A", "lora_B", "router_weight"):
        t[name].requires_grad_()
    return t, p(*lead, N).to(dtype).to(device), p(*lead, E).to(device)


def _hydra_run(t: dict, grad_y, grad_probs, backend, p: float, seed, top_k, dtype=None):
    """(y, probs, {name: grad}) of routed_lowrank_linear with dropout p and `seed`, inputs cast
    to dtype; the loss is <y, grad_y> + <probs, grad_probs>."""
    leaves = {k: v.detach().to(dtype or v.dtype).requires_grad_(v.requires_grad)
              for k, v in t.items()}
    y, probs = routed_lowrank_linear(
        leaves["x"], leaves["weight"], leaves["bias"], leaves["lora_A"], leaves["lora_B"],
        leaves["router_weight"], 0.75, top_k=top_k, return_router_probs=True, dropout=p,
        dropout_seed=seed, backend=backend)
    ((y * grad_y.to(y.dtype)).sum() + (probs * grad_probs.to(probs.dtype)).sum()).backward()
    return y, probs, {k: v.grad for k, v in leaves.items() if v.grad is not None}


@pytest.mark.parametrize("top_k", [None, 2], ids=["dense", "top2"])
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_hydra_matches_float64_reference_with_the_same_mask(backend, dtype, top_k, device):
    """Dense: 39 tokens (the Triton shrink splits K under the interpreter); top-2: 100 tokens
    (unsplit)."""
    lead = (3, 13) if top_k is None else (100,)
    t, grad_y, grad_probs = _hydra_inputs(dtype, device, lead=lead, top_k=top_k)
    seed = torch.tensor([987654321], device=device)
    ref = _hydra_run(t, grad_y, grad_probs, "torch", 0.2, seed, top_k, torch.float64)
    base = _hydra_run(t, grad_y, grad_probs, "torch", 0.2, seed, top_k)
    y, probs, grads = _hydra_run(t, grad_y, grad_probs, backend, 0.2, seed, top_k)
    assert_close_to_reference(f"{backend} y", y, ref[0], base[0])
    assert_close_to_reference(f"{backend} probs", probs, ref[1], base[1])
    assert set(grads) == set(ref[2]) == {"x", "lora_A", "lora_B", "router_weight"}
    for name in grads:
        assert_close_to_reference(f"{backend} d{name}", grads[name], ref[2][name], base[2][name])


def test_hydra_backends_draw_the_same_mask(device):
    """In fp32 the backends differ by rounding only; another seed differs by O(1)."""
    t, grad_y, grad_probs = _hydra_inputs(torch.float32, device, top_k=2)
    seed = torch.tensor([42], device=device)
    results = {b: _hydra_run(t, grad_y, grad_probs, b, 0.5, seed, 2) for b in BACKENDS}
    for backend in ("triton", "cuda"):
        y, probs, grads = results[backend]
        torch.testing.assert_close(y, results["torch"][0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(probs, results["torch"][1], rtol=1e-5, atol=1e-5)
        for name, g in grads.items():
            torch.testing.assert_close(g, results["torch"][2][name], rtol=1e-5, atol=1e-4)
    other = _hydra_run(t, grad_y, grad_probs, "torch", 0.5, torch.tensor([43], device=device), 2)
    assert (other[0] - results["torch"][0]).abs().max() > 0.1


@pytest.mark.parametrize("backend", BACKENDS)
def test_hydra_dropout_spares_the_router_and_the_base_layer(backend, device):
    """The probabilities are those without dropout (the router sees x; to rounding: the cuda
    backend's logits are then their own GEMM, not columns of x [A; Wg]^T; a dropped x would
    move them by O(1)), and with every head B_e = 0 y is the base layer's, whatever is
    dropped."""
    t, _, _ = _hydra_inputs(torch.float32, device, top_k=2)
    args = [t[n].detach() for n in ("x", "weight", "bias", "lora_A", "lora_B", "router_weight")]
    _, plain = routed_lowrank_linear(*args, 1.0, top_k=2, return_router_probs=True,
                                     backend=backend)
    y, dropped = routed_lowrank_linear(*args, 1.0, top_k=2, return_router_probs=True,
                                       dropout=0.9, backend=backend)
    torch.testing.assert_close(dropped, plain)
    args[4] = torch.zeros_like(args[4])
    y = routed_lowrank_linear(*args, 1.0, top_k=2, dropout=0.9, backend=backend)
    torch.testing.assert_close(y, torch.nn.functional.linear(args[0], args[1], args[2]))


def _hydra_saved(backend, device, top_k, dropout):
    """Sorted shapes of the activations the op saves (the parameters left out), all trained."""
    t, grad_y, _ = _hydra_inputs(torch.float32, device, lead=(64,), K=48, N=40, r=4, E=3)
    params = {v.data_ptr() for k, v in t.items() if k != "x"}
    saved = []

    def pack(tensor):
        saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda s: s):
        y = routed_lowrank_linear(t["x"], t["weight"], t["bias"], t["lora_A"], t["lora_B"],
                                  t["router_weight"], 0.5, top_k=top_k, dropout=dropout,
                                  backend=backend)
    y.backward(grad_y)
    return sorted(tuple(s.shape) for s in saved if s.data_ptr() not in params)


@pytest.mark.parametrize("top_k", [None, 2], ids=["dense", "top2"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_hydra_nothing_mask_sized_is_saved(backend, top_k, device):
    """With dropout: what the contract saves without it (x, h, hg, p and the gates with top-k)
    plus the 1-element seed; no x_d, no mask."""
    M, K, r, E = 64, 48, 4, 3
    without = _hydra_saved(backend, device, top_k, 0.0)
    assert without == sorted([(M, K), (M, r), (M, E * r), (M, E)]
                             + ([(M, E)] if top_k is not None else []))
    assert _hydra_saved(backend, device, top_k, 0.1) == sorted(without + [(1,)])


@pytest.mark.parametrize("use_reentrant", [True, False])
@pytest.mark.parametrize("backend", BACKENDS)
def test_hydra_checkpointing_replays_the_mask(backend, use_reentrant, device):
    t, _, _ = _hydra_inputs(torch.float32, device)
    N = t["weight"].shape[0]

    def layer(x, lora_A, lora_B, router_weight):
        """Two routed layers, each drawing its own seed."""
        h = routed_lowrank_linear(x, t["weight"], t["bias"], lora_A, lora_B, router_weight, 0.5,
                                  top_k=2, dropout=0.3, backend=backend)
        return routed_lowrank_linear(h, t["weight"][:, :N], None, lora_A[:, :N], lora_B,
                                     router_weight[:, :N], 0.5, dropout=0.3, backend=backend)

    _assert_checkpointing_changes_nothing(
        layer, [t[n] for n in ("x", "lora_A", "lora_B", "router_weight")], use_reentrant)


@pytest.mark.parametrize("backend", BACKENDS)
def test_hydra_compiled_equals_eager(backend, device):
    t, grad_y, grad_probs = _hydra_inputs(torch.float32, device, top_k=2)
    seed = torch.tensor([5], device=device)
    names = ("x", "weight", "bias", "lora_A", "lora_B", "router_weight")

    def f(x, weight, bias, lora_A, lora_B, router_weight):
        return routed_lowrank_linear(x, weight, bias, lora_A, lora_B, router_weight, 0.5,
                                     top_k=2, return_router_probs=True, dropout=0.25,
                                     dropout_seed=seed, backend=backend)

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (f, compiled):
        leaves = {n: t[n].detach().clone().requires_grad_(t[n].requires_grad) for n in names}
        y, probs = fn(*leaves.values())
        ((y * grad_y).sum() + (probs * grad_probs.float()).sum()).backward()
        results.append([y, probs] + [leaves[n].grad for n in names if leaves[n].requires_grad])
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_hydra_module_runs_the_fused_op_with_dropout(monkeypatch, device):
    """FusedHydraLoRALinear(dropout=0.1) in training calls the fused op with dropout=0.1 (the
    seed drawn from torch's generator, as a direct call draws it); in eval mode it passes no
    dropout and is deterministic."""
    from adapterops import FusedHydraLoRALinear
    from adapterops.backends import BACKENDS as ALL_BACKENDS

    layer = FusedHydraLoRALinear(40, 24, rank=5, num_heads=4, alpha=10.0, top_k=2, dropout=0.1,
                                 device=device)
    with torch.no_grad():
        layer.lora_B.normal_()
    assert isinstance(layer.dropout, torch.nn.Dropout) and layer.dropout.p == 0.1
    calls = []
    for backend in ALL_BACKENDS.values():
        def counting(*args, _forward=backend.routed_forward, _name=backend.name):
            calls.append((_name, args[8], args[9]))  # (backend, dropout, dropout_seed)
            return _forward(*args)
        monkeypatch.setattr(backend, "routed_forward", counting)
    x = torch.randn(2, 9, 40, device=device, requires_grad=True)
    layer.train()
    torch.manual_seed(3)
    y = layer(x)
    y.sum().backward()
    assert len(calls) == 1 and calls[0][1] == 0.1 and calls[0][2].shape == (1,)
    assert x.grad is not None and layer.lora_A.grad is not None and layer.lora_router.grad is not None
    args = (x.detach(), layer.weight, layer.bias, layer.lora_A, layer.lora_B, layer.lora_router,
            layer.scaling)
    torch.manual_seed(3)
    assert torch.equal(y, routed_lowrank_linear(*args, top_k=2, dropout=0.1))
    layer.eval()
    calls.clear()
    with torch.no_grad():
        first, second = layer(x), layer(x)
    assert [c[1:] for c in calls] == [(0.0, None), (0.0, None)]
    assert torch.equal(first, second)
    assert torch.equal(first, routed_lowrank_linear(*args, top_k=2))
    assert not torch.equal(first, y.detach())
