"""The routed multi-head low-rank linear: HydraLoRA (methods.md §3).

    p = softmax(x Wg^T)                 per token, in fp32 (see below for the logits)
    g = p, or with top_k = k: p with all but its k largest entries zeroed (not renormalised;
        ties go to the lower head index) **[ours, from the multimodal variant]**
    h = x A^T                           (M x r), one A shared by every head
    y = x W^T + bias + s Σ_e g_e h B_e^T
      = x W^T + bias + s [g_0 h | ... | g_{E-1} h] [B_0 | ... | B_{E-1}]^T   one GEMM, inner E r

with x (..., in), weight W (out, in), bias (out,), lora_A A (r, in), lora_B (E, out, r) holding
the heads B_e, router_weight Wg (E, in) and s = scaling. x is flattened to M tokens; y is
(..., out) in x's dtype (fp32, fp16 or bf16); the probabilities p are (..., E) in fp32 (float64
for float64 inputs). Gradients (u_e = s dY B_e):

    dB_e = s (g_e dY)^T h,  dg_e = <u_e, h>,  dh = Σ_e g_e u_e,  dA = dh^T x,
    dlogits = p * (dp - <p, dp>),  dp = dg on the kept heads + the gradient of the returned p,
    dWg = dlogits^T x,  dx = dY W + dh A + dlogits Wg,  dW = dY^T x,  dbias = Σ_tokens dY

Dropout (`dropout` = p > 0, PEFT's semantics: on the adapter's input only, ONE mask shared by
every head **[ours; the official code draws one per head]**; the router and the base GEMM see
x): x_d = x * kept / (1 - p) replaces x in h = x_d A^T and dA = dh^T x_d, and masks dx's
low-rank term alone: dx = dY W + kept * (dh A) / (1 - p) + dlogits Wg, dWg = dlogits^T x.
The mask is a pure function of (seed, row, column) (`adapterops.backends.reference.dropout`),
which every backend draws the same and regenerates where it needs it: nothing mask- or
x_d-sized is saved, only the 1-element seed. The seed is drawn from torch's generator per call
unless `dropout_seed` is given.

Adapters in fp32 on a 16-bit base (PEFT's default, `autocast_adapter_dtype=True`): lora_A,
lora_B and router_weight may share fp32 while x, weight and bias share fp16 or bf16. The
adapter path is then computed in fp32, as PEFT computes it: x cast to fp32 as it is read for
h = x_d A^T and for the router logits x Wg^T (the softmax in fp32 as always); h, hg and every
adapter-side gradient (u = s dY B_e from dY cast to fp32, dh, dlogits, dA, dB, dWg) in fp32;
the base product in x's dtype, its sum with the fp32 term s hg Bcat^T rounded once to x's
dtype (y), and dx = dY W (x's dtype) + dh A (masked with dropout) + dlogits Wg, in fp32 and
rounded to x's dtype. The gradients of A, B and Wg are fp32; dx is in x's dtype.

Router logits **[ours]**: the Triton kernels accumulate x Wg^T in fp32 and apply the softmax to
that accumulator; the torch backend takes the logits from F.linear in x's dtype (as the
official code does). In fp32 they agree; in fp16/bf16 the Triton probabilities are the more
accurate, and a top-k choice can differ between the two backends only where two logits tie to
within the dtype's rounding (ties at equal values go to the lower head index in both).

Memory contract (decided here): backward saves x only when lora_A, router_weight or weight
needs a gradient (HydraLoRA trains A and Wg, so in training it does), hg = [g_e h] (M x E r)
only for dB, and h (M x r) with p (M x E, plus the gates with top-k) for everything else; with
dropout, the 1-element seed (the mask is regenerated from it).

Backends: `triton` (CUDA sm_80+, or CPU under TRITON_INTERPRET=1; fp32, fp16, bf16; r <= 128,
E <= 16, E r <= 256), `cuda` (the compiled C++ of csrc/: CUDA tensors in fp32, fp16, bf16, any
r and E; its logits are rounded to x's dtype, as the torch backend's are) and `torch`
(everything else); see `adapterops.dispatch`. Under `torch.autocast` the op runs in the
autocast dtype.

Declared once (`adapterops.ops.declare`): custom ops `adapterops::routed_lowrank_linear_fwd`
and `_bwd` for `torch.compile`, and an eager autograd Function onto the same functions.
"""
from typing import Optional

import torch
from torch import Tensor

from .. import dispatch
from ..backends.reference.routed import heads_side_by_side, router_probs, top_k_gates
from .checks import (all_plain, autocast_on, cast_for_autocast, check_base_and_A, check_dim,
                     check_dropout, check_scaling, check_tensor, check_top_k, plain_scaling)
from .declare import DeclaredOp

# The router math, defined once by the oracle, for the layers above (which reach it through
# the op, never the backends).
__all__ = ["routed_lowrank_linear", "check_routed_args", "heads_side_by_side", "router_probs",
           "top_k_gates"]


def _backend(backend, x, lora_B):
    # What the backends' reasons depend on: device, dtypes (x's and the adapter's), heads and
    # rank.
    signature = (x.device, x.dtype, lora_B.dtype, lora_B.shape)
    return (dispatch.cached("routed", backend, signature)
            or dispatch.select("routed", backend, signature=signature, x=x, lora_B=lora_B))


def _forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor,
             router_weight: Tensor, scaling: float, top_k: Optional[int], dropout: float,
             dropout_seed: Optional[Tensor],
             backend: Optional[str]) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(y, h, hg, probs, gates) for 2-D x; gates is None or empty for dense routing (gates = probs)."""
    return _backend(backend, x, lora_B).routed_forward(x, weight, bias, lora_A, lora_B,
                                                       router_weight, scaling, top_k, dropout,
                                                       dropout_seed)


def _gradients(grad_y: Tensor, grad_probs: Tensor, x: Optional[Tensor], h: Optional[Tensor],
               hg: Optional[Tensor], probs: Optional[Tensor], gates: Optional[Tensor],
               weight: Tensor, lora_A: Tensor, lora_B: Tensor, router_weight: Tensor,
               dropout_seed: Optional[Tensor], scaling: float, dropout: float, need_x: bool,
               need_A: bool, need_B: bool, need_router: bool, backend: Optional[str]) -> tuple:
    """(dx, dA, dB, dWg), None where not asked for; gates is None for dense routing."""
    return _backend(backend, grad_y, lora_B).routed_backward(
        grad_y, grad_probs, x, h, hg, probs, gates, weight, lora_A, lora_B, router_weight,
        dropout_seed, scaling, dropout, need_x, need_A, need_B, need_router)


def _save(inputs, output, needs) -> tuple:
    """The memory contract: x only for dA, dWg or dW; hg only for dB; h, p (and the gates with
    top-k) for the gate gradients that dx, dA and dWg need; with dropout, the 1-element seed
    (the mask is regenerated from it)."""
    x, weight, bias, lora_A, lora_B, router_weight, scaling, top_k, dropout, dropout_seed = inputs[:10]
    _, h, hg, probs, gates = output
    need_x, need_W, _, need_A, need_B, need_router = needs[:6]
    need_gate_grads = need_x or need_A or need_router
    return (x if (need_A or need_router or need_W) else None, h if need_gate_grads else None,
            hg if need_B else None, probs if need_gate_grads else None,
            gates if (need_gate_grads and top_k is not None) else None,
            weight, lora_A, lora_B, router_weight, dropout_seed)


def _fake(x, weight, bias, lora_A, lora_B, router_weight, scaling, top_k, dropout, dropout_seed,
          backend):
    M = x.shape[0]
    E, N, r = lora_B.shape
    probs_dtype = torch.promote_types(x.dtype, torch.float32)
    # h and hg in the adapter's dtype (fp32 adapters on a 16-bit x: fp32); p in fp32 or better.
    return (x.new_empty((M, N)), lora_A.new_empty((M, r)), lora_A.new_empty((M, E * r)),
            x.new_empty((M, E), dtype=probs_dtype),
            x.new_empty((M, E) if top_k is not None else 0, dtype=probs_dtype))


# y and the probabilities are differentiable outputs; h, hg and the gates are internals.
_routed_op = DeclaredOp("routed_lowrank_linear", forward=_forward, gradients=_gradients,
                        save=_save, fake=_fake, trained=("x", "lora_A", "lora_B", "router_weight"),
                        reads={"x": ("h", "probs"), "lora_A": ("x", "h", "probs"), "lora_B": ("hg",),
                               "router_weight": ("x", "h", "probs")},
                        differentiable_outputs=(0, 3), options=("scaling", "dropout"))


def _plain_args(x, weight, bias, lora_A, lora_B, router_weight, scaling, top_k) -> bool:
    """The common case in one pass: arguments `check_routed_args` accepts as they are."""
    if not (all_plain(x, weight, bias, lora_A, lora_B, router_weight) and lora_B.dim() == 3
            and weight.dim() == lora_A.dim() == router_weight.dim() == 2 and plain_scaling(scaling)):
        return False
    (out_features, in_features), (rank, a_in), (heads, b_out, b_rank), (g_heads, g_in) = (
        weight.shape, lora_A.shape, lora_B.shape, router_weight.shape)
    return (x.shape[-1] == in_features == a_in == g_in and b_out == out_features
            and b_rank == rank >= 1 and g_heads == heads >= 1
            and (bias is None or bias.shape == (out_features,))
            and (top_k is None or (type(top_k) is int and 1 <= top_k <= heads)))


def check_routed_args(x, weight, bias, lora_A, lora_B, router_weight, scaling,
                      top_k) -> tuple[float, Optional[int]]:
    """Validates every argument of `routed_lowrank_linear`; returns (scaling as a float, top_k
    as an int or None)."""
    if _plain_args(x, weight, bias, lora_A, lora_B, router_weight, scaling, top_k):
        return float(scaling), top_k
    check_tensor("lora_B", lora_B, ndim=3)
    check_tensor("router_weight", router_weight, ndim=2)
    out_features, in_features, rank = check_base_and_A(x, weight, bias, lora_A, lora_B=lora_B,
                                                       router_weight=router_weight,
                                                       fp32_adapter_allowed=True)
    num_heads = lora_B.shape[0]
    if num_heads == 0:
        raise ValueError(f"lora_B has shape {tuple(lora_B.shape)}: the head count (lora_B.shape[0]) "
                         "must be >= 1")
    check_dim("lora_B", lora_B, 1, out_features, "out_features (weight.shape[0])")
    check_dim("lora_B", lora_B, 2, rank, "the rank (lora_A.shape[0])")
    check_dim("router_weight", router_weight, 0, num_heads, "the head count (lora_B.shape[0])")
    check_dim("router_weight", router_weight, 1, in_features, "in_features (weight.shape[1])")
    top_k = check_top_k(top_k, num_heads, "lora_B.shape[0]")
    return check_scaling(scaling), top_k


def routed_lowrank_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor,
                          lora_B: Tensor, router_weight: Tensor, scaling: float, *,
                          top_k: Optional[int] = None, return_router_probs: bool = False,
                          dropout: float = 0.0, dropout_seed: Optional[Tensor] = None,
                          backend: Optional[str] = None):
    """y = x W^T + bias + scaling * Σ_e g_e (x_d A^T) B_e^T with g = softmax(x Wg^T) (top_k: its
    k largest entries); see this module's docstring.

    return_router_probs: also return the per-token softmax probabilities p (..., E) (before
    top-k; fp32, float64 for float64 inputs; differentiable), e.g. for
    `adapterops.hydra.balance_loss`.
    dropout: the probability p of dropping an element of the adapter's input x_d (one mask for
    every head; the router and the base GEMM see x); pass it in training only, as `nn.Dropout`
    drops in training only. dropout_seed: a 1-element int64 tensor on x's device that fixes the
    mask; None draws one per call from torch's generator.

    backend: None picks the first backend that supports the input (`ADAPTEROPS_BACKEND`
    overrides); "triton", "cuda" or "torch" forces one, and raises ValueError if it cannot serve.
    """
    if autocast_on(x):
        x, weight, bias, lora_A, lora_B, router_weight = cast_for_autocast(
            x, weight, bias, lora_A, lora_B, router_weight)
    scaling, top_k = check_routed_args(x, weight, bias, lora_A, lora_B, router_weight, scaling,
                                       top_k)
    if not isinstance(return_router_probs, bool):
        raise TypeError(f"return_router_probs must be a bool, got {type(return_router_probs).__name__}")
    if not (type(dropout) is float and dropout == 0.0 and dropout_seed is None):
        dropout, dropout_seed = check_dropout(dropout, dropout_seed, x)
    # (A bad backend name raises in dispatch, before any kernel.)
    y, probs = _routed_op(x, weight, bias, lora_A, lora_B, router_weight, scaling, top_k, dropout,
                          dropout_seed, backend)
    return (y, probs) if return_router_probs else y
