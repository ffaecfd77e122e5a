"""Tests of `adapterops.lowrank_linear` (adapterops/ops/lowrank.py) on every backend.

    y = x W^T + bias + s ((x A^T) S^T) B^T

1. The oracle: gradcheck of the torch backend in float64 (its backward formulas against
   numerical derivatives).
2. The triton and cuda backends against the float64 reference (the torch backend on float64 copies of
   the same inputs), forward and every gradient asked for, by the rule in tests/utils.py (whose
   baseline is the torch backend in the same dtype), over odd shapes, ranks 1-128, and
   non-contiguous x, parameters and upstream gradients (stride 0 included).
3. The memory contract: what backward saves, counted with saved_tensors_hooks.
4. A frozen lora_B: no lora_B.grad, and backward never computes dB.
5. The custom ops under `torch.library.opcheck` and `torch.compile(fullgraph=True)`.
6. Bad input raises at the Python boundary, naming the argument and the sizes.
7. Zero tokens.
8. Autotuning (pick_config): the fastest config, cached per key; ADAPTEROPS_AUTOTUNE=0; no tuning
   during a CUDA graph capture; configs that do not fit the device skipped.
9. Which GEMM kernel serves: the tensor-descriptor one exactly when TMA can address the operands.

Without a GPU the Triton kernels run under the interpreter on CPU tensors (tests/conftest.py);
with one, the same tests run on CUDA tensors through the `device` fixture.
"""
import dataclasses
import threading
from typing import Optional

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from adapterops import hdpissa_linear, lowrank_linear, lowrank_update_, routed_lowrank_linear
from adapterops.backends import BACKENDS
from utils import CountingKernel, assert_close_to_reference, forbid_backend_calls

BACKEND_NAMES = ("triton", "cuda", "torch")
# The backends judged against float64 by the rule in tests/utils.py (see
# test_matches_float64_reference for why not torch).
FUSED_BACKENDS = ("triton", "cuda")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
DTYPE_IDS = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}

# Which tensors train in each mode. x trains too unless a case says otherwise (the layer is
# not the first of the network).
MODES = {
    "lora": ("lora_A", "lora_B"),             # no S, weight frozen
    "lamda": ("lora_S", "lora_B"),            # A and weight frozen
    "lamda_frozen_b": ("lora_S",),            # LaMDA after its B-freezing step
}


@dataclasses.dataclass(frozen=True)
class Case:
    id: str
    lead: tuple          # x's leading dims; M = their product
    in_f: int
    out_f: int
    rank: int
    mode: str            # a key of MODES
    bias: bool = True
    layout: str = "contiguous"  # "transposed": 2-D x as a (in, M) tensor's .t() view;
                                # "sliced": 3-D x as every other row of a taller tensor
    train_base: bool = False    # weight and bias train too
    x_grad: bool = True
    scaling: float = 2.0
    seed: int = 0
    params: str = "contiguous"  # "strided": weight, lora_A, lora_B, lora_S as .t() views of
                                # transposed storage, bias as every other element of a 2N
                                # tensor; "strided-col": the same, bias a column of an (N, 3)
                                # matrix (stride 3)
    grad_y: str = "random"      # the upstream gradient: "random" (contiguous); "transposed"
                                # (an (out, *lead) tensor's movedim view: token stride 1);
                                # "expanded" (a random (out,) row expanded over the tokens:
                                # token stride 0); "sum" (backward of y.sum(): every stride 0)


# The test matrix. Each case below runs in every dtype (fp32, fp16, bf16) on the Triton backend
# (the torch backend is the baseline of the comparison; see test_matches_float64_reference);
# crossing dtypes is cheap (each Triton case takes well under a second under the interpreter),
# crossing the shape/mode features is not needed. Every item is covered at least once:
#   1 token ............................ one-token
#   sizes not divisible by 16 ........... every case but one-token: odd-* (in=70, out=50, M=37),
#                                         transposed (40, 36, 33), sliced (56, 44, 21), 3d (M=18)
#   ranks 1, 5, 16, 64, 128 ............ odd-lora-nobias, odd-lamda, one-token/sliced, 3d, transposed
#   ranks > 16, not multiples of 16 ..... strided-lamda-r40, strided-col-lora-r100,
#     (the rank is contracted in chunks    strided-frozenB-r100 (BLOCK_R 64 and 128, masked tails
#     of 16 with a masked tail)            of 8 and 4; with and without S)
#   rank 128 with dB, LoRA at rank 64 ... lamda-r128-dy-sum, lora-r64-dy-expanded
#   LoRA / LaMDA / LaMDA with B frozen .. odd-lora-nobias / odd-lamda / transposed
#   3-D x ............................... 3d-lamda (contiguous), 3d-sliced-lora (row stride 2*in)
#   non-contiguous x .................... transposed (column stride M), 3d-sliced-lora
#   non-contiguous parameters ........... strided-* (weight, lora_A, lora_B, lora_S as transposed
#                                         views; bias with stride 2, or 3 as a matrix column)
#   upstream gradient with stride 0 ..... lamda-r128-dy-sum (y.sum()), lora-r64-dy-expanded
#   non-contiguous upstream gradient .... strided-col-lora-r100, strided-frozenB-r100 (transposed)
#   scaling not a power of two .......... 0.7 and 5/3 (the rounding of s * h): strided-*, *-dy-*
#   bias=None ........................... odd-lora-nobias, strided-frozenB-r100
#   weight and bias gradients ........... 3d-sliced-lora, strided-lamda-r40 (strided W and bias)
#   x not trainable (dx not asked for) .. 3d-lamda
#   the sm_90 tensor-descriptor GEMM ..... 16-bit cases whose widths are multiples of 8 (one-token,
#     (the interpreter takes the device     3d-lamda, multitile; see test_gemm_path_follows_the_
#     for an sm_90)                        operands): multitile has 3 x 3 forward tiles and 3 x 2
#                                         dx tiles of 32 on 3 persistent programs, K = 40 and 72
#                                         ending in partial blocks; the rest take the pointer path
#   the shrink and grad pass split over ... every case of at most 2 row blocks of 32 tokens (the
#     K and N, with their finishing         interpreter's GPU has 3 SMs; see test_passes_split_
#     kernels                               for_few_row_blocks); multitile (70 tokens) runs unsplit
CASES = [
    Case("one-token-lora-r16", (1,), 64, 48, 16, "lora", seed=1),
    Case("odd-lamda-r5", (37,), 70, 50, 5, "lamda", seed=2),
    Case("odd-lora-r1-nobias", (37,), 70, 50, 1, "lora", bias=False, seed=3),
    Case("3d-lamda-r64-nodx", (2, 9), 48, 40, 64, "lamda", x_grad=False, seed=4),
    Case("transposed-lamda-frozenB-r128", (33,), 40, 36, 128, "lamda_frozen_b",
         layout="transposed", seed=5),
    Case("3d-sliced-lora-r16-trainbase", (3, 7), 56, 44, 16, "lora", layout="sliced",
         train_base=True, seed=6),
    Case("strided-lamda-r40-trainbase", (29,), 48, 36, 40, "lamda", params="strided",
         train_base=True, scaling=0.7, seed=7),
    Case("strided-col-lora-r100-dy-transposed", (2, 11), 40, 52, 100, "lora",
         params="strided-col", grad_y="transposed", scaling=5 / 3, seed=8),
    Case("strided-frozenB-r100-nobias-dy-transposed", (21,), 36, 44, 100, "lamda_frozen_b",
         params="strided", bias=False, grad_y="transposed", scaling=0.7, seed=9),
    Case("lamda-r128-dy-sum", (3, 15), 40, 48, 128, "lamda", grad_y="sum", scaling=0.7,
         seed=10),
    Case("lora-r64-dy-expanded", (37,), 56, 36, 64, "lora", grad_y="expanded",
         scaling=5 / 3, seed=11),
    Case("multitile-lamda-r24", (2, 35), 40, 72, 24, "lamda", seed=12),
]

PARAMS = ("weight", "bias", "lora_A", "lora_B", "lora_S")


def make_inputs(case: Case) -> dict:
    """Float64 CPU tensors with O(1) values: W, A ~ randn / sqrt(in), B, S ~ randn / sqrt(r).
    x is stored in the layout the case asks for (the parameters are stored by `run_case`);
    lora_B is random (not LoRA's zero init) so every gradient is non-trivial. Also the upstream
    gradient (random, not ones), stored as case.grad_y asks (None for "sum")."""
    g = torch.Generator().manual_seed(case.seed)
    K, N, r = case.in_f, case.out_f, case.rank

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, generator=g, dtype=torch.float64) * scale

    if case.layout == "transposed":
        assert len(case.lead) == 1
        x_storage = randn(K, case.lead[0])
    elif case.layout == "sliced":
        assert len(case.lead) == 2
        x_storage = randn(case.lead[0], 2 * case.lead[1], K)
    else:
        x_storage = randn(*case.lead, K)
    inputs = {
        "x": x_storage,
        "weight": randn(N, K, scale=K ** -0.5),
        "bias": randn(N) if case.bias else None,
        "lora_A": randn(r, K, scale=K ** -0.5),
        "lora_B": randn(N, r, scale=r ** -0.5),
        "lora_S": randn(r, r, scale=r ** -0.5) if case.mode != "lora" else None,
    }
    inputs["grad_y"] = {"random": lambda: randn(*case.lead, N),
                        "transposed": lambda: randn(N, *case.lead),
                        "expanded": lambda: randn(N),
                        "sum": lambda: None}[case.grad_y]()
    return inputs


def trainable(case: Case) -> tuple:
    names = (("x",) if case.x_grad else ()) + MODES[case.mode]
    if case.train_base:
        names += ("weight",) + (("bias",) if case.bias else ())
    return names


def _stored(name: str, t: torch.Tensor, case: Case):
    """(storage, view): `t` (x: as make_inputs stored it; a parameter: its logical value) in the
    case's layout. `view(storage)` is the argument lowrank_linear gets; applied to the
    storage's gradient it gives the gradient in the argument's own (logical) layout."""
    if name == "x":
        view = {"contiguous": lambda s: s, "transposed": lambda s: s.t(),
                "sliced": lambda s: s[:, ::2, :]}[case.layout]
        return t, view
    if case.params == "contiguous":
        return t, lambda s: s
    if name == "bias":
        # The other elements of the storage are junk that a kernel ignoring the stride reads.
        junk = torch.full_like(t, 7.0)
        if case.params == "strided":
            return torch.stack([t, junk], 1).reshape(-1), lambda s: s[::2]
        assert case.params == "strided-col"
        return torch.stack([junk, t, junk], 1), lambda s: s[:, 1]
    return t.t().contiguous(), lambda s: s.t()


def run_case(case: Case, inputs: dict, dtype: torch.dtype, device: str, backend: str):
    """(y, {name: grad}) of lowrank_linear on `inputs` cast to dtype/device."""
    names = trainable(case)
    leaves, args = {}, {}
    for name, t in inputs.items():
        if name == "grad_y" or t is None:
            continue
        storage, view = _stored(name, t.to(device=device, dtype=dtype), case)
        leaves[name] = (storage.requires_grad_(name in names), view)
        args[name] = view(storage)
    x = args["x"]
    assert x.shape == (*case.lead, case.in_f)
    assert (case.layout == "contiguous") == x.is_contiguous()
    for name in PARAMS:
        if name in args:
            assert (case.params == "contiguous") == args[name].is_contiguous(), name
    y = lowrank_linear(x, args["weight"], args.get("bias"), args["lora_A"], args["lora_B"],
                       case.scaling, args.get("lora_S"), backend=backend)
    wrt = [leaves[n][0] for n in names]
    if case.grad_y == "sum":
        grads = torch.autograd.grad(y.sum(), wrt)
    else:
        grad_y = inputs["grad_y"].to(device=device, dtype=dtype)
        grad_y = {"random": lambda g: g, "transposed": lambda g: g.movedim(0, -1),
                  "expanded": lambda g: g.expand(*case.lead, case.out_f)}[case.grad_y](grad_y)
        assert grad_y.shape == y.shape
        grads = torch.autograd.grad(y, wrt, grad_y)
    # Gradients live on the stored tensors; compare them in the arguments' own layout.
    grads = {n: leaves[n][1](grad) for n, grad in zip(names, grads)}
    return y.detach(), grads


def _spy_layouts(monkeypatch, backend: str) -> dict:
    """Records the forward's weight and bias and the backward's grad_y as `backend` receives
    them, so a case can check that the layout it built reached the backend (and was not copied
    on the way)."""
    seen = {}
    b = BACKENDS[backend]
    forward, backward = b.lowrank_forward, b.lowrank_backward

    def spy_forward(*args):
        seen["weight"], seen["bias"] = args[1], args[2]
        return forward(*args)

    def spy_backward(*args):
        seen["grad_y"] = args[0]
        return backward(*args)

    monkeypatch.setattr(b, "lowrank_forward", spy_forward)
    monkeypatch.setattr(b, "lowrank_backward", spy_backward)
    return seen


# Not "torch": the baseline of the rule in tests/utils.py IS the torch backend in the same
# dtype, so the torch backend would be compared with itself (err == base_err) and could not
# fail. The torch backend's own check is the float64 gradcheck below (the oracle).
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_matches_float64_reference(case, backend, dtype, device, monkeypatch):
    inputs = make_inputs(case)
    # The same values the low-precision run sees, in float64.
    rounded = {k: (v.to(dtype).double() if v is not None else None) for k, v in inputs.items()}
    ref_y, ref_grads = run_case(case, rounded, torch.float64, device, "torch")
    base_y, base_grads = run_case(case, inputs, dtype, device, "torch")
    seen = _spy_layouts(monkeypatch, backend)
    y, grads = run_case(case, inputs, dtype, device, backend)
    where = f"{case.id} {backend} {DTYPE_IDS[dtype]}"
    # The layouts under test reached the backend as built.
    if case.params != "contiguous":
        assert not seen["weight"].is_contiguous()
        assert seen["bias"] is None or seen["bias"].stride(0) != 1
    if case.grad_y in ("expanded", "sum"):
        assert seen["grad_y"].stride(0) == 0, seen["grad_y"].stride()
    elif case.grad_y == "transposed":
        assert seen["grad_y"].stride(0) == 1, seen["grad_y"].stride()
    assert y.dtype == dtype
    assert_close_to_reference(f"{where} y", y, ref_y, base_y)
    assert set(grads) == set(trainable(case))
    for name, grad in grads.items():
        assert_close_to_reference(f"{where} d{name}", grad, ref_grads[name], base_grads[name])


# 1. The oracle against numerical derivatives.

def _gradcheck_inputs(mode: str, device: str, train_all: bool = False):
    g = torch.Generator().manual_seed(11)
    M, K, N, r = 5, 7, 6, 3

    def p(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(device)

    x = p(M, K)
    weight, bias = p(N, K, scale=K ** -0.5), p(N)
    lora_A, lora_B = p(r, K, scale=K ** -0.5), p(N, r, scale=r ** -0.5)
    lora_S = p(r, r, scale=r ** -0.5) if mode == "lamda" else None
    train = {"x", "lora_B"} | ({"lora_A"} if mode == "lora" else {"lora_S"})
    if train_all:
        train |= {"weight", "bias", "lora_A"}
    named = dict(x=x, weight=weight, bias=bias, lora_A=lora_A, lora_B=lora_B, lora_S=lora_S)
    for name, t in named.items():
        if t is not None:
            t.requires_grad_(name in train)
    return named


@pytest.mark.parametrize("mode,train_all", [("lora", False), ("lamda", False), ("lamda", True)],
                         ids=["lora", "lamda", "lamda-all-trainable"])
def test_reference_gradcheck(mode, train_all, device):
    t = _gradcheck_inputs(mode, device, train_all)

    def f(x, weight, bias, lora_A, lora_B, lora_S):
        return lowrank_linear(x, weight, bias, lora_A, lora_B, 0.75, lora_S, backend="torch")

    args = tuple(t[n] for n in ("x", "weight", "bias", "lora_A", "lora_B", "lora_S"))
    assert torch.autograd.gradcheck(f, args)


# 3. The memory contract.

def _saved_activations(backend: str, mode: str, device: str):
    """Runs forward and backward with saved_tensors_hooks; returns (every saved tensor, the
    activations among them, x, sizes). Activations are the saved tensors that are not one of
    the parameters (identified by data_ptr). The sizes are chosen so that no parameter has
    M x in elements."""
    M, K, N, r = 40, 56, 48, 8
    g = torch.Generator().manual_seed(21)
    x = torch.randn(M, K, generator=g).to(device).requires_grad_()
    weight = (torch.randn(N, K, generator=g) / K ** 0.5).to(device)
    bias = torch.randn(N, generator=g).to(device)
    lora_A = (torch.randn(r, K, generator=g) / K ** 0.5).to(device)
    lora_B = (torch.randn(N, r, generator=g) / r ** 0.5).to(device)
    lora_S = (torch.randn(r, r, generator=g) / r ** 0.5).to(device) if mode != "lora" else None
    named = dict(lora_A=lora_A, lora_B=lora_B, lora_S=lora_S)
    for name in MODES[mode]:
        named[name].requires_grad_()
    params = {t.data_ptr() for t in (weight, bias, lora_A, lora_B, lora_S) if t is not None}
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = lowrank_linear(x, weight, bias, lora_A, lora_B, 0.5, lora_S, backend=backend)
    y.backward(torch.randn_like(y))  # the saved tensors suffice for backward
    activations = [t for t in saved if t.data_ptr() not in params]
    assert all(t.shape[0] == M for t in activations), [tuple(t.shape) for t in activations]
    return saved, activations, x, (M, K, N, r)


@pytest.mark.parametrize("backend", BACKEND_NAMES)
def test_memory_lamda_saves_no_x(backend, device):
    saved, activations, x, (M, K, N, r) = _saved_activations(backend, "lamda", device)
    shapes = sorted(tuple(t.shape) for t in activations)
    assert shapes == [(M, r), (M, r)], f"LaMDA saved activations {shapes}, expected h1 and h2 (M x r)"
    big = [tuple(t.shape) for t in saved if t.numel() == M * K or tuple(t.shape) == (M, K)]
    assert not big, f"LaMDA saved {big}: M x in = {M} x {K} elements"
    total = sum(t.numel() for t in activations)
    assert total <= 2 * M * r, f"LaMDA saved {total} activation elements > 2 M r = {2 * M * r}"


@pytest.mark.parametrize("backend", BACKEND_NAMES)
def test_memory_lamda_frozen_b_saves_only_h1(backend, device):
    _, activations, x, (M, K, N, r) = _saved_activations(backend, "lamda_frozen_b", device)
    shapes = [tuple(t.shape) for t in activations]
    assert shapes == [(M, r)], f"LaMDA with B frozen saved {shapes}, expected only h1 (M x r)"


@pytest.mark.parametrize("backend", BACKEND_NAMES)
def test_memory_lora_saves_x(backend, device):
    # The other direction: the hook does see x when dA needs it, so the LaMDA checks above
    # are not vacuous.
    _, activations, x, (M, K, N, r) = _saved_activations(backend, "lora", device)
    shapes = [tuple(t.shape) for t in activations]
    assert (M, K) in shapes, f"LoRA saved {shapes}: x (M x in) is missing"
    assert any(t.data_ptr() == x.data_ptr() for t in activations), "LoRA did not save x itself"


# 4. A frozen lora_B.

@pytest.mark.parametrize("backend", BACKEND_NAMES)
def test_frozen_b_gets_no_gradient(backend, device):
    case = Case("frozen-b", (29,), 45, 38, 16, "lamda_frozen_b", seed=31)
    inputs = make_inputs(case)
    leaves = {n: t.float().to(device) for n, t in inputs.items() if t is not None}
    for n in ("x", "lora_S"):
        leaves[n].requires_grad_()
    y = lowrank_linear(leaves["x"], leaves["weight"], leaves["bias"], leaves["lora_A"],
                       leaves["lora_B"], case.scaling, leaves["lora_S"], backend=backend)
    y.backward(leaves["grad_y"])
    assert leaves["lora_B"].grad is None
    assert leaves["lora_A"].grad is None and leaves["weight"].grad is None
    ref_y, ref_grads = run_case(case, {k: v.double() if v is not None else None
                                       for k, v in inputs.items()}, torch.float64, device, "torch")
    base_y, base_grads = run_case(case, inputs, torch.float32, device, "torch")
    for name in ("x", "lora_S"):
        assert_close_to_reference(f"{backend} d{name}", leaves[name].grad, ref_grads[name],
                                  base_grads[name])

    # The backward op itself, given only what the contract saves (no h2, no x): dB comes back
    # empty, so it was not computed (there was nothing to compute it from).
    s = case.scaling
    _, h1, _ = torch.ops.adapterops.lowrank_linear_fwd(
        leaves["x"].detach(), leaves["weight"], leaves["bias"], leaves["lora_A"],
        leaves["lora_B"], leaves["lora_S"].detach(), s, 0.0, None, backend)
    dx, dA, dB, dS = torch.ops.adapterops.lowrank_linear_bwd(
        leaves["grad_y"], None, h1, None, leaves["weight"], leaves["lora_A"], leaves["lora_B"],
        leaves["lora_S"].detach(), None, s, 0.0, True, False, False, True, backend)
    assert dA.numel() == 0 and dB.numel() == 0
    assert_close_to_reference(f"{backend} bwd-op dx", dx, ref_grads["x"], base_grads["x"])
    assert_close_to_reference(f"{backend} bwd-op dS", dS, ref_grads["lora_S"], base_grads["lora_S"])


# 5. Custom ops: opcheck and torch.compile.

def _op_samples(device: str, with_s: bool, with_bias: bool, requires_grad: bool):
    g = torch.Generator().manual_seed(41)
    M, K, N, r = 19, 24, 20, 4

    def p(*shape):
        return torch.randn(*shape, generator=g).to(device)

    x, weight, lora_A, lora_B = p(M, K), p(N, K) / K ** 0.5, p(r, K) / K ** 0.5, p(N, r)
    bias = p(N) if with_bias else None
    lora_S = p(r, r) if with_s else None
    if requires_grad:
        for t in (x, lora_B, lora_S if with_s else lora_A):
            t.requires_grad_()
    return x, weight, bias, lora_A, lora_B, lora_S


def _dropout_args(dropout: float, device) -> tuple:
    """(dropout, dropout_seed) as the custom ops take them."""
    return (dropout, torch.tensor([20261207], device=device) if dropout else None)


@pytest.mark.parametrize("backend,with_s,with_bias,dropout", [
    ("torch", True, True, 0.0), ("torch", False, False, 0.0), ("torch", True, False, 0.25),
    ("triton", True, False, 0.0), ("triton", False, True, 0.0), ("triton", False, True, 0.25),
    ("cuda", True, False, 0.0), ("cuda", False, True, 0.0), ("cuda", True, True, 0.25)])
def test_opcheck_forward(backend, with_s, with_bias, dropout, device):
    x, weight, bias, lora_A, lora_B, lora_S = _op_samples(device, with_s, with_bias, True)
    torch.library.opcheck(torch.ops.adapterops.lowrank_linear_fwd.default,
                          (x, weight, bias, lora_A, lora_B, lora_S, 0.5,
                           *_dropout_args(dropout, device), backend))


@pytest.mark.parametrize("backend,with_s,needs,dropout", [
    ("torch", True, (True, False, True, True), 0.0),    # LaMDA
    ("torch", True, (False, False, False, True), 0.0),  # LaMDA, B frozen, first layer
    ("torch", False, (True, True, True, False), 0.0),   # LoRA
    ("torch", False, (True, True, True, False), 0.25),  # LoRA with dropout
    ("triton", True, (True, False, True, True), 0.0),   # LaMDA
    ("triton", False, (True, True, True, False), 0.0),  # LoRA: dA from x
    ("triton", True, (True, False, True, True), 0.25),  # LaMDA with dropout: the dx epilogue
    ("triton", False, (True, True, True, False), 0.25),  # LoRA with dropout: the dA kernel
    ("cuda", True, (True, False, True, True), 0.0),     # LaMDA
    ("cuda", False, (True, True, True, False), 0.0),    # LoRA: dA from x
    ("cuda", False, (True, True, True, False), 0.25),   # LoRA with dropout
])
def test_opcheck_backward(backend, with_s, needs, dropout, device):
    x, weight, bias, lora_A, lora_B, lora_S = _op_samples(device, with_s, False, False)
    drop = _dropout_args(dropout, device)
    _, h1, h2 = torch.ops.adapterops.lowrank_linear_fwd(x, weight, bias, lora_A, lora_B, lora_S,
                                                        0.5, *drop, "torch")
    if not with_s:
        h2 = h1
    need_x, need_A, need_B, need_S = needs
    grad_y = torch.randn(x.shape[0], weight.shape[0], device=device)
    torch.library.opcheck(torch.ops.adapterops.lowrank_linear_bwd.default,
                          (grad_y, x if need_A else None, h1 if need_S else None,
                           h2 if need_B else None, weight, lora_A, lora_B, lora_S, drop[1], 0.5,
                           drop[0], need_x, need_A, need_B, need_S, backend))


@pytest.mark.parametrize("backend", BACKEND_NAMES)
@pytest.mark.parametrize("with_s", [True, False])
def test_eager_door_and_custom_op_agree_bit_for_bit(backend, with_s, device):
    """lowrank_linear runs eagerly through a torch.autograd.Function and under torch.compile
    through the custom ops: the same forward and backward functions behind two doors, so the
    results and every gradient are identical."""
    def run(door):
        x, weight, bias, lora_A, lora_B, lora_S = _op_samples(device, with_s, True, True)
        if not with_s:
            lora_A.requires_grad_()
        y = door(x, weight, bias, lora_A, lora_B, lora_S)
        # A contiguous output gradient: the custom op's autograd makes every gradient
        # contiguous, the eager door hands the backends the layout autograd has (they take any).
        y.backward(torch.ones_like(y))
        return [y] + [t.grad for t in (x, lora_A, lora_B, lora_S) if t is not None and t.requires_grad]

    eager = run(lambda *t: lowrank_linear(*t[:5], 0.5, t[5], backend=backend))
    custom = run(lambda *t: torch.ops.adapterops.lowrank_linear_fwd(*t, 0.5, 0.0, None, backend)[0])
    assert len(eager) == len(custom) == 4
    for i, (a, b) in enumerate(zip(eager, custom)):
        assert torch.equal(a, b), f"{backend} output/grad {i}: max difference {(a - b).abs().max()}"


class _Adapter(torch.nn.Module):
    def __init__(self, in_f: int, out_f: int, rank: int, backend: Optional[str]):
        super().__init__()
        g = torch.Generator().manual_seed(51)
        self.backend = backend
        self.weight = torch.nn.Parameter(torch.randn(out_f, in_f, generator=g) / in_f ** 0.5,
                                         requires_grad=False)
        self.bias = torch.nn.Parameter(torch.randn(out_f, generator=g), requires_grad=False)
        self.lora_A = torch.nn.Parameter(torch.randn(rank, in_f, generator=g) / in_f ** 0.5,
                                         requires_grad=False)
        self.lora_S = torch.nn.Parameter(torch.randn(rank, rank, generator=g) / rank ** 0.5)
        self.lora_B = torch.nn.Parameter(torch.randn(out_f, rank, generator=g) / rank ** 0.5)

    def forward(self, x):
        y = lowrank_linear(x, self.weight, self.bias, self.lora_A, self.lora_B, 0.5, self.lora_S,
                           backend=self.backend)
        return torch.nn.functional.gelu(y)


@pytest.mark.parametrize("backend", BACKEND_NAMES)
def test_torch_compile_fullgraph_matches_eager(backend, device):
    torch._dynamo.reset()
    model = _Adapter(24, 20, 8, backend).to(device)
    x = torch.randn(2, 7, 24, device=device)
    grad_y = torch.randn(2, 7, 20, device=device)

    def run(fn, m, dtype):
        for p in m.parameters():
            p.grad = None
        xi = x.to(dtype).clone().requires_grad_()
        y = fn(xi)
        y.backward(grad_y.to(dtype))
        return y.detach(), xi.grad, m.lora_S.grad, m.lora_B.grad

    compiled = torch.compile(model, fullgraph=True)
    got = run(compiled, model, torch.float32)
    eager = run(model, model, torch.float32)
    model64 = _Adapter(24, 20, 8, "torch").to(device).double()
    ref = run(model64, model64, torch.float64)
    for name, a, r, b in zip(("y", "dx", "dS", "dB"), got, ref, eager):
        assert_close_to_reference(f"compiled {backend} {name}", a, r, b)


# 6. Bad input.

@pytest.fixture
def no_kernels(monkeypatch):
    forbid_backend_calls(monkeypatch, "lowrank_forward")


def _good(device, M=6, K=10, N=8, r=4):
    return dict(x=torch.randn(M, K, device=device), weight=torch.randn(N, K, device=device),
                bias=torch.randn(N, device=device), lora_A=torch.randn(r, K, device=device),
                lora_B=torch.randn(N, r, device=device), scaling=0.5,
                lora_S=torch.randn(r, r, device=device))


BAD_INPUTS = [
    # (id, changes to the good arguments, exception, message pattern)
    ("x-in-features", lambda d: {"x": torch.randn(6, 11, device=d)}, ValueError,
     r"x has shape \(6, 11\).*11.*in_features.*= 10"),
    ("A-in-dim", lambda d: {"lora_A": torch.randn(4, 9, device=d)}, ValueError,
     r"lora_A has shape \(4, 9\).*9.*= 10"),
    ("B-out-dim", lambda d: {"lora_B": torch.randn(7, 4, device=d)}, ValueError,
     r"lora_B has shape \(7, 4\).*7.*out_features.*= 8"),
    ("B-rank", lambda d: {"lora_B": torch.randn(8, 5, device=d)}, ValueError,
     r"lora_B has shape \(8, 5\).*5.*rank.*= 4"),
    ("S-shape", lambda d: {"lora_S": torch.randn(4, 3, device=d)}, ValueError,
     r"lora_S has shape \(4, 3\).*3.*rank.*= 4"),
    ("S-square-wrong-rank", lambda d: {"lora_S": torch.randn(5, 5, device=d)}, ValueError,
     r"lora_S has shape \(5, 5\).*rank.*= 4"),
    ("bias-size", lambda d: {"bias": torch.randn(9, device=d)}, ValueError,
     r"bias has shape \(9,\).*9.*out_features.*= 8"),
    ("rank-0", lambda d: {"lora_A": torch.randn(0, 10, device=d), "lora_B": torch.randn(8, 0, device=d),
                          "lora_S": None}, ValueError, r"lora_A has shape \(0, 10\).*rank"),
    ("mixed-dtypes", lambda d: {"weight": torch.randn(8, 10, device=d, dtype=torch.float16)}, TypeError,
     r"weight has dtype torch.float16 but x has torch.float32"),
    # Adapters in fp32 on a 16-bit base are taken; no other pairing is.
    ("bf16-adapter-on-fp32", lambda d: {k: torch.randn(*s, device=d, dtype=torch.bfloat16)
                                        for k, s in (("lora_A", (4, 10)), ("lora_B", (8, 4)),
                                                     ("lora_S", (4, 4)))},
     TypeError, r"lora_A has dtype torch.bfloat16 but x has torch.float32"),
    ("fp16-adapter-on-bf16", lambda d: {"x": torch.randn(6, 10, device=d, dtype=torch.bfloat16),
                                        "weight": torch.randn(8, 10, device=d, dtype=torch.bfloat16),
                                        "bias": torch.randn(8, device=d, dtype=torch.bfloat16),
                                        **{k: torch.randn(*s, device=d, dtype=torch.float16)
                                           for k, s in (("lora_A", (4, 10)), ("lora_B", (8, 4)),
                                                        ("lora_S", (4, 4)))}},
     TypeError, r"lora_A has dtype torch.float16 but x has torch.bfloat16"),
    ("fp32-A-bf16-B", lambda d: {"x": torch.randn(6, 10, device=d, dtype=torch.bfloat16),
                                 "weight": torch.randn(8, 10, device=d, dtype=torch.bfloat16),
                                 "bias": torch.randn(8, device=d, dtype=torch.bfloat16),
                                 "lora_B": torch.randn(8, 4, device=d, dtype=torch.bfloat16)},
     TypeError, r"lora_B has dtype torch.bfloat16 but lora_A has torch.float32"),
    ("int-x", lambda d: {"x": torch.ones(6, 10, device=d, dtype=torch.int64)}, TypeError,
     r"x must be a floating-point tensor.*int64"),
    ("weight-not-tensor", lambda d: {"weight": [[0.0] * 10] * 8}, TypeError,
     r"weight must be a torch.Tensor, got list"),
    ("scaling-str", lambda d: {"scaling": "0.5"}, TypeError, r"scaling must be a Python float, got str"),
    # A 0-d tensor is a real scalar and is taken; a 1-D one is not.
    ("scaling-tensor", lambda d: {"scaling": torch.tensor([0.5])}, TypeError,
     r"scaling must be a Python float, got a tensor of shape \(1,\)"),
    ("scaling-huge", lambda d: {"scaling": 1e300}, ValueError, r"scaling must be within float32's range"),
    ("scaling-nan", lambda d: {"scaling": float("nan")}, ValueError, r"scaling must be finite"),
]


@pytest.mark.parametrize("change,exc,match", [b[1:] for b in BAD_INPUTS], ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_raises(change, exc, match, device, no_kernels):
    args = {**_good(device), **change(device)}
    with pytest.raises(exc, match=match):
        lowrank_linear(**args)


def test_good_input_reaches_backend(device, no_kernels):
    # The `no_kernels` fixture is not vacuous: the unchanged arguments do reach a backend.
    with pytest.raises(AssertionError, match="reached a backend"):
        lowrank_linear(**_good(device))


def test_mixed_devices_raise_meta(device, no_kernels):
    # Runs without a GPU: the device check fires at the Python boundary, before any kernel
    # could touch the meta tensor's (absent) data.
    args = _good(device)
    args["weight"] = args["weight"].to("meta")
    with pytest.raises(ValueError, match=rf"weight is on meta but x is on {device}"):
        lowrank_linear(**args)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="mixed devices need a CUDA device")
def test_mixed_devices_raise(no_kernels):
    args = _good("cuda")
    args["lora_B"] = args["lora_B"].cpu()
    with pytest.raises(ValueError, match=r"lora_B is on cpu but x is on cuda"):
        lowrank_linear(**args)


# 7. Zero tokens.

@pytest.mark.parametrize("backend", BACKEND_NAMES)
@pytest.mark.parametrize("lead", [(0,), (3, 0)], ids=["2d", "3d"])
def test_zero_tokens(lead, backend, device):
    K, N, r = 20, 12, 4
    x = torch.randn(*lead, K, device=device, requires_grad=True)
    weight, bias = torch.randn(N, K, device=device), torch.randn(N, device=device)
    lora_A = torch.randn(r, K, device=device)
    lora_B = torch.randn(N, r, device=device, requires_grad=True)
    lora_S = torch.randn(r, r, device=device, requires_grad=True)
    y = lowrank_linear(x, weight, bias, lora_A, lora_B, 0.5, lora_S, backend=backend)
    assert y.shape == (*lead, N) and y.dtype == x.dtype
    y.backward(torch.randn_like(y))
    assert x.grad.shape == x.shape
    # Sums over no tokens: exactly zero.
    assert lora_B.grad.shape == (N, r) and not lora_B.grad.any()
    assert lora_S.grad.shape == (r, r) and not lora_S.grad.any()


# 8. Autotuning (adapterops.backends.triton.common.pick_config), as on a GPU: `interpreting`
# patched to say no, a fake launch and a fake timer. No kernel runs.

@pytest.fixture
def tuner(monkeypatch):
    """(pick, log): pick(key, configs, default) calls pick_config with a fake launch; each
    config is a dict with a "name", the "ms" the fake `triton.testing.do_bench` reports for it,
    and optionally "oom" (its launch raises OutOfResources). log["launched"] and log["timed"]
    record config names. Keys are private to the test (pick_config caches per key)."""
    import triton.testing
    from triton.runtime.errors import OutOfResources
    from adapterops.backends.triton import common

    monkeypatch.setattr(common, "interpreting", lambda kernel: False)
    # The tuner may skip timing while a CUDA graph is captured; on a CPU-only build
    # torch.cuda.is_current_stream_capturing raises, so pin it to "not capturing".
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.delenv("ADAPTEROPS_AUTOTUNE", raising=False)
    log = {"launched": [], "timed": []}
    configs_seen = []

    def launch(config):
        log["launched"].append(config["name"])
        if config.get("oom"):
            raise OutOfResources(232448, 101376, "shared memory")

    def do_bench(fn, *args, **kwargs):
        before = len(log["launched"])
        fn()
        assert len(log["launched"]) == before + 1, "the timed function did not launch once"
        name = log["launched"][-1]
        log["timed"].append(name)
        return next(c["ms"] for c in configs_seen if c["name"] == name)

    monkeypatch.setattr(triton.testing, "do_bench", do_bench)
    private = object()

    def pick(key, configs, default):
        configs_seen.extend(configs)
        return common.pick_config((private, key), configs, default, launch, None)

    return pick, log


def _configs(*specs):
    return [dict(name=name, ms=ms, **({"oom": True} if oom else {})) for name, ms, oom in specs]


def test_autotune_picks_fastest_and_caches_per_key(tuner):
    pick, log = tuner
    configs = _configs(("a", 3.0, False), ("b", 1.0, False), ("c", 2.0, False))
    assert pick("k1", configs, configs[0]) is configs[1]
    assert log["timed"] == ["a", "b", "c"]
    # Cached: the same key is not timed again.
    assert pick("k1", configs, configs[0]) is configs[1]
    assert log["timed"] == ["a", "b", "c"] and log["launched"] == ["a", "b", "c"]
    # Another key is timed on its own.
    other = _configs(("d", 3.0, False), ("e", 2.0, False), ("f", 1.0, False))
    assert pick("k2", other, other[0]) is other[2]
    assert log["timed"] == ["a", "b", "c", "d", "e", "f"]


def test_autotune_off_returns_default_untimed(tuner, monkeypatch):
    pick, log = tuner
    configs = _configs(("a", 3.0, False), ("b", 1.0, False))
    monkeypatch.setenv("ADAPTEROPS_AUTOTUNE", "0")
    assert pick("k1", configs, configs[0]) is configs[0]
    assert log["launched"] == [] and log["timed"] == []
    # Pinned to the default even for a key that was tuned before.
    monkeypatch.setenv("ADAPTEROPS_AUTOTUNE", "1")
    assert pick("k2", configs, configs[0]) is configs[1]
    monkeypatch.setenv("ADAPTEROPS_AUTOTUNE", "0")
    assert pick("k2", configs, configs[0]) is configs[0]
    assert log["timed"] == ["a", "b"]


def test_autotune_skips_out_of_resources(tuner):
    pick, log = tuner
    # "a" would be the fastest, but it does not fit the device.
    configs = _configs(("a", 0.5, True), ("b", 2.0, False), ("c", 1.0, False))
    assert pick("k1", configs, configs[0]) is configs[2]
    assert log["launched"] == ["a", "b", "c"] and log["timed"] == ["b", "c"]
    # None fits: the default.
    none_fit = _configs(("d", 1.0, True), ("e", 2.0, True))
    assert pick("k2", none_fit, none_fit[1]) is none_fit[1]


def test_autotune_not_while_capturing_a_cuda_graph(tuner, monkeypatch):
    # Timing synchronizes, which a CUDA graph capture forbids: an untuned key gets the default,
    # untimed and not cached, so the next eager call tunes; a tuned key keeps its config.
    pick, log = tuner
    configs = _configs(("a", 3.0, False), ("b", 1.0, False))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert pick("k1", configs, configs[0]) is configs[0]
    assert log["launched"] == [] and log["timed"] == []
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    assert pick("k1", configs, configs[0]) is configs[1]
    assert log["timed"] == ["a", "b"]
    # Warm up eagerly, then capture: the tuned config is kept, with no timing.
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert pick("k1", configs, configs[0]) is configs[1]
    assert log["timed"] == ["a", "b"]


# 9. The GEMM path. Under the interpreter the device counts as an sm_90: the tensor-descriptor
# kernel must serve every 16-bit GEMM whose operands a descriptor can address (unit column
# stride, 16-byte aligned rows) and the pointer kernel every other, forward and dx alike.

TMA, POINTER = "gemm_lowrank_tma_kernel", "gemm_lowrank_kernel"


@pytest.mark.parametrize("what,dtype,in_f,layout,grad_y,forward,dx", [
    ("bf16 widths multiple of 8", torch.bfloat16, 40, "contiguous", "random", TMA, TMA),
    ("fp16 widths multiple of 8", torch.float16, 40, "contiguous", "random", TMA, TMA),
    # x's rows (and so dx's) are 140 bytes.
    ("bf16 in_features 70", torch.bfloat16, 70, "contiguous", "random", POINTER, POINTER),
    # x has column stride M; dY, W and dx are contiguous.
    ("bf16 transposed x", torch.bfloat16, 40, "transposed", "random", POINTER, TMA),
    # dY's rows all alias one row (row stride 0): a descriptor cannot describe overlapping rows.
    ("bf16 expanded dY", torch.bfloat16, 40, "contiguous", "expanded", TMA, POINTER),
    ("full fp32", torch.float32, 40, "contiguous", "random", POINTER, POINTER),
    # TF32 wgmma reads B K-major only: the forward's W^T is, the dx GEMM's W is not.
    ("TF32", torch.float32, 40, "contiguous", "random", TMA, POINTER),
])
def test_gemm_path_follows_the_operands(what, dtype, in_f, layout, grad_y, forward, dx, device,
                                        monkeypatch):
    if device != "cpu":
        pytest.skip("the stand-in kernels run under the interpreter only; on a GPU the kernel "
                    "report and the profiler table show the path")
    import adapterops.kernels.lowrank as kernels
    if what == "TF32":
        # The interpreter always computes fp32 in full precision; here the launchers choose
        # as for a GPU under torch.set_float32_matmul_precision("high").
        from adapterops.backends.triton import lowrank as launchers
        monkeypatch.setattr(launchers, "numerics_flags",
                            lambda dtype, kernel: {"UPCAST": False, "INPUT_PRECISION": "tf32"})
    log = []
    for name in (TMA, POINTER):
        monkeypatch.setattr(kernels, name, CountingKernel(name, getattr(kernels, name), log))
    case = Case("path", (70,), in_f, 72, 24, "lamda", layout=layout, grad_y=grad_y, seed=13)
    run_case(case, make_inputs(case), dtype, device, "triton")
    assert [name for name, _ in log] == [forward, dx], f"{what}: launches {log}"
    # Persistent: no more programs than tiles, and here fewer (9 forward, 6 dx tiles of 32).
    assert all(grid == (3,) for name, grid in log if name == TMA), f"{what}: launches {log}"


PASSES = ("lowrank_shrink_kernel", "lowrank_shrink_finish_kernel", "lowrank_grad_pass_kernel",
          "lowrank_grad_pass_finish_kernel")


@pytest.mark.parametrize("mode", ["lamda", "lora"])
@pytest.mark.parametrize("tokens,in_f,out_f,shrink_grid,grad_grid", [
    # 1 row block of 32 on the interpreter's 3 SMs: K = 100 is 4 tiles of 32, in 2 splits of
    # 2 tiles (3 splits would leave one empty), the last ending in a partial tile; N = 72 is 3
    # tiles, in 3 splits of 1.
    (21, 100, 72, (1, 2), (1, 3)),
    # 2 row blocks: 2 splits each, every split whole tiles but the last.
    (40, 100, 72, (2, 2), (2, 2)),
    # 1 tile of K or N: nothing to split.
    (21, 24, 20, (1, 1), (1, 1)),
    # 3 row blocks fill the 3 SMs: unsplit.
    (70, 100, 72, (3, 1), (3, 1)),
])
def test_passes_split_for_few_row_blocks(mode, tokens, in_f, out_f, shrink_grid, grad_grid,
                                        device, monkeypatch):
    """With fewer row blocks than SMs the shrink splits K and the grad pass N (then each
    finishing kernel runs once per row block), and the results stay those of the float64
    reference by the usual rule."""
    if device != "cpu":
        pytest.skip("the stand-in kernels run under the interpreter only; on a GPU the profiler "
                    "table shows the launches")
    import adapterops.kernels.lowrank as kernels
    log = []
    for name in PASSES:
        monkeypatch.setattr(kernels, name, CountingKernel(name, getattr(kernels, name), log))
    case = Case("split", (tokens,), in_f, out_f, 16, mode, seed=14)
    inputs = make_inputs(case)
    rounded = {k: (v.to(torch.float16).double() if v is not None else None)
               for k, v in inputs.items()}
    ref_y, ref_grads = run_case(case, rounded, torch.float64, device, "torch")
    base_y, base_grads = run_case(case, inputs, torch.float16, device, "torch")
    y, grads = run_case(case, inputs, torch.float16, device, "triton")
    where = f"{mode} {tokens} tokens"
    assert_close_to_reference(f"{where} y", y, ref_y, base_y)
    for name, grad in grads.items():
        assert_close_to_reference(f"{where} d{name}", grad, ref_grads[name], base_grads[name])
    split_shrink, split_grad = shrink_grid[1] > 1, grad_grid[1] > 1
    expected = ([("lowrank_shrink_kernel", shrink_grid)]
                + [("lowrank_shrink_finish_kernel", shrink_grid[:1])] * split_shrink
                + [("lowrank_grad_pass_kernel", grad_grid)]
                + [("lowrank_grad_pass_finish_kernel", grad_grid[:1])] * split_grad)
    assert log == expected, f"{where}: launches {log}"


# 10. The scalar arguments (shared with hdpissa_linear, lowrank_update_ and
# routed_lowrank_linear, which check them alike), NaN at scaling 0, and threads.

def _small(device):
    """x, weight, lora_A, lora_B of `_good` with 5 tokens, 8 -> 6 features, rank 2."""
    args = _good(device, M=5, K=8, N=6, r=2)
    return args["x"], args["weight"], args["lora_A"], args["lora_B"]


@pytest.mark.parametrize("backend", BACKEND_NAMES)
@pytest.mark.parametrize("scaling", [1e300, -1e39, 3.5e38])
def test_scaling_outside_float32_range_is_rejected_up_front(backend, scaling, device):
    x, weight, lora_A, lora_B = _small(device)
    with pytest.raises(ValueError, match=r"scaling must be within float32's range"):
        lowrank_linear(x, weight, None, lora_A, lora_B, scaling, backend=backend)
    with pytest.raises(ValueError, match=r"scaling must be within float32's range"):
        hdpissa_linear(x, weight, None, lora_A, lora_B, scaling, backend=backend)
    with pytest.raises(ValueError, match=r"scale must be within float32's range"):
        lowrank_update_(weight.clone(), lora_B, lora_A, scaling, backend=backend)


@pytest.mark.parametrize("scaling", [np.float32(0.5), np.float64(0.5), np.int64(2), torch.tensor(0.5),
                                     torch.tensor(2, dtype=torch.int32), 0.5])
def test_scaling_accepts_every_exact_real_scalar(scaling):
    x, weight, lora_A, lora_B = _small("cpu")
    expected = lowrank_linear(x, weight, None, lora_A, lora_B, float(scaling), backend="torch")
    torch.testing.assert_close(lowrank_linear(x, weight, None, lora_A, lora_B, scaling,
                                              backend="torch"), expected, rtol=0, atol=0)
    torch.testing.assert_close(hdpissa_linear(x, weight, None, lora_A, lora_B, scaling,
                                              backend="torch"), F.linear(x, weight), rtol=0, atol=0)


@pytest.mark.parametrize("scaling", [True, np.bool_(True), torch.tensor([0.5]), torch.tensor(1j),
                                     "0.5", 2 ** 60 + 1, torch.tensor(0.5, requires_grad=True)])
def test_scaling_rejects_what_is_not_an_exact_real_scalar(scaling):
    x, weight, lora_A, lora_B = _small("cpu")
    with pytest.raises((TypeError, ValueError), match="scaling"):
        lowrank_linear(x, weight, None, lora_A, lora_B, scaling, backend="torch")


def _nan_masks(outputs):
    return [t.isnan() for t in outputs]


# PyTorch's composition propagates a NaN of lora_B at scaling 0 (0 * NaN = NaN): so does every
# backend, in the output and every gradient, for LoRA, LaMDA and the routed op alike.
@pytest.mark.parametrize("backend", BACKEND_NAMES)
@pytest.mark.parametrize("op", ["lora", "lamda", "routed"])
def test_nan_in_lora_B_propagates_at_scaling_zero(backend, op, device):
    x, weight, lora_A, lora_B = _small(device)
    lora_S = torch.randn(2, 2, device=device) if op == "lamda" else None
    if op == "routed":
        lora_B = torch.stack([lora_B, -lora_B, 2 * lora_B])
        lora_B[1, 3, 0] = float("nan")
        router = torch.randn(3, x.shape[1], device=device)
    else:
        lora_B[3, 0] = float("nan")

    def run(fn):
        leaves = [t.detach().clone().requires_grad_() for t in (x, lora_A, lora_B)]
        S = lora_S.detach().clone().requires_grad_() if lora_S is not None else None
        y = fn(*leaves, S)
        y.sum().backward()
        return [y] + [t.grad for t in leaves] + ([S.grad] if S is not None else [])

    if op == "routed":
        def ours(x_, A, B, _):
            return routed_lowrank_linear(x_, weight, None, A, B, router, 0.0, backend=backend)

        def composition(x_, A, B, _):
            gates = torch.softmax(F.linear(x_, router), dim=-1)
            h = F.linear(x_, A)
            heads = sum(gates[:, e:e + 1] * F.linear(h, B[e]) for e in range(3))
            return F.linear(x_, weight) + 0.0 * heads
    else:
        def ours(x_, A, B, S):
            return lowrank_linear(x_, weight, None, A, B, 0.0, S, backend=backend)

        def composition(x_, A, B, S):
            h = F.linear(x_, A)
            h = F.linear(h, S) if S is not None else h
            return F.linear(x_, weight) + 0.0 * F.linear(h, B)

    got, expected = run(ours), run(composition)
    assert expected[0].isnan().any()  # the composition does propagate it
    for i, (a, b) in enumerate(zip(_nan_masks(got), _nan_masks(expected))):
        assert torch.equal(a, b), f"{backend} {op}: output/grad {i} has NaN at {a.nonzero().tolist()}, " \
                                  f"the composition at {b.nonzero().tolist()}"


# The Triton interpreter patches triton.language process-wide while a kernel runs:
# adapterops.backends.triton.common serializes interpreted launches with a lock.
@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter runs on CPU tensors")
def test_interpreted_triton_calls_from_two_threads_all_succeed():
    x, weight, lora_A, lora_B = _small("cpu")
    expected = lowrank_linear(x, weight, None, lora_A, lora_B, 0.5, backend="triton")
    failures, results = [], []

    def calls():
        for _ in range(12):
            try:
                results.append(lowrank_linear(x, weight, None, lora_A, lora_B, 0.5, backend="triton"))
            except Exception as exc:  # noqa: BLE001 (every failure is counted and reported)
                failures.append(repr(exc))

    threads = [threading.Thread(target=calls) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not failures, f"{len(failures)} of 24 calls failed: {failures[0]}"
    assert len(results) == 24
    for y in results:
        torch.testing.assert_close(y, expected, rtol=0, atol=0)


# 11. fp32 adapters on a 16-bit base (PEFT's default): the low-rank path in fp32, as PEFT
# computes it, against a float64 reference of that math (the torch backend on float64 copies)
# by the rule in tests/utils.py, whose baseline is the torch backend on the same mixed dtypes.

@pytest.mark.parametrize("dropout", [0.0, 0.2])
@pytest.mark.parametrize("mode", ["lora", "lamda"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_fp32_adapters_on_a_16bit_base(backend, dtype, mode, dropout, device):
    g = torch.Generator().manual_seed(3)
    M, K, N, r = 37, 45, 29, 6

    def p(*shape, scale=1.0):
        return torch.randn(*shape, generator=g, dtype=torch.float64) * scale

    base = {"x": p(3, M // 3 + 1, K), "weight": p(N, K, scale=K ** -0.5), "bias": p(N)}
    adapter = {"lora_A": p(r, K, scale=K ** -0.5), "lora_B": p(N, r),
               "lora_S": p(r, r) if mode == "lamda" else None}
    trained = {"x", "lora_B"} | ({"lora_S"} if mode == "lamda" else {"lora_A"})
    grad_y = p(3, M // 3 + 1, N)
    seed = torch.tensor([11], device=device)

    def run(backend_name, base_dtype, adapter_dtype):
        leaves = {k: v.detach().to(device, base_dtype) for k, v in base.items()}
        leaves.update({k: v.detach().to(device, adapter_dtype) if v is not None else None
                       for k, v in adapter.items()})
        for name in trained:
            leaves[name].requires_grad_()
        y = lowrank_linear(leaves["x"], leaves["weight"], leaves["bias"], leaves["lora_A"],
                           leaves["lora_B"], 0.75, leaves["lora_S"], dropout=dropout,
                           dropout_seed=seed, backend=backend_name)
        y.backward(grad_y.to(device, y.dtype))
        return y, {k: leaves[k].grad for k in trained}

    ref_y, ref_grads = run("torch", torch.float64, torch.float64)
    base_y, base_grads = run("torch", dtype, torch.float32)
    y, grads = run(backend, dtype, torch.float32)
    assert y.dtype == dtype and grads["x"].dtype == dtype
    assert all(grads[k].dtype == torch.float32 for k in trained - {"x"})
    assert_close_to_reference(f"{backend} y", y, ref_y, base_y)
    for name in trained:
        assert_close_to_reference(f"{backend} d{name}", grads[name], ref_grads[name], base_grads[name])


@pytest.mark.parametrize("backend", BACKEND_NAMES)
def test_fp32_adapters_opcheck_and_compile(backend, device):
    """The custom ops' fakes give h1, h2 and the adapters' gradients in fp32, as the backends
    do: opcheck passes and torch.compile(fullgraph=True) equals the eager door."""
    x, weight, bias, lora_A, lora_B, lora_S = _op_samples(device, True, True, False)
    x, weight, bias = (t.to(torch.bfloat16) for t in (x, weight, bias))
    torch.library.opcheck(torch.ops.adapterops.lowrank_linear_fwd.default,
                          (x.requires_grad_(), weight, bias, lora_A, lora_B.requires_grad_(),
                           lora_S.requires_grad_(), 0.5, 0.0, None, backend))

    def f(x, lora_B, lora_S):
        return lowrank_linear(x, weight, bias, lora_A, lora_B, 0.5, lora_S, backend=backend)

    torch._dynamo.reset()
    results = []
    for fn in (f, torch.compile(f, fullgraph=True, backend="aot_eager")):
        leaves = [t.detach().clone().requires_grad_() for t in (x, lora_B, lora_S)]
        y = fn(*leaves)
        y.float().sum().backward()
        results.append([y] + [leaf.grad for leaf in leaves])
    for a, b in zip(*results):
        assert a.dtype == b.dtype and torch.equal(a, b)
