"""The routed low-rank linear (HydraLoRA, methods.md §3) in plain PyTorch, in its fused form,
and the router math every layer above shares (re-exported by `adapterops.ops.routed`):

    p = softmax(x Wg^T) (softmax in fp32 or better), g = p or its top-k,
    h = x A^T,  hg = [g_0 h | ... | g_{E-1} h],  y = x W^T + bias + s hg Bcat^T
    u = s dY Bcat (block e: s dY B_e),  dBcat = s dY^T hg,  dg_e = <u_e, h>,  dh = Σ_e g_e u_e,
    dlogits = p * (dp - <p, dp>) with dp = dg (kept heads only) + dprobs,
    dx = dY W + [dh | dlogits] [A; Wg],  [dA; dWg] = [dh | dlogits]^T x

With dropout p > 0, x_d (`dropout.dropped`: the kernels' mask, one for every head) replaces x
in h and dA, and masks dx's low-rank term alone: dx = dY W + kept * (dh A) / (1 - p) +
dlogits Wg, dWg = dlogits^T x (the router sees x).

With fp32 adapters on a 16-bit x (lora_A, lora_B, router_weight fp32; PEFT's math) the adapter
path runs in fp32: x cast to fp32 for h and the logits, hg in fp32, y = (x W^T + bias, in x's
dtype, then in fp32 + s hg Bcat^T) rounded to x's dtype; backward from dY cast to fp32 (u, dB,
dh, dlogits, dA, dWg fp32), dx = (dY W in x's dtype) + [dh | dlogits] [A; Wg] in fp32, rounded
to x's dtype. When every tensor shares x's dtype the casts are no-ops: the same results.
"""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..base import Limits
from .dropout import dropped
from .lowrank import add_scaled_product

LIMITS = Limits()


def heads_side_by_side(lora_B: Tensor) -> Tensor:
    """Bcat = [B_0 | B_1 | ... | B_{E-1}] (out x E r, contiguous) from lora_B (E, out, r): the
    right operand of the routed sum as one GEMM. A copy of E out r elements (the heads' layout
    in lora_B has no 2-D strided view of this shape)."""
    E, N, r = lora_B.shape
    return lora_B.permute(1, 0, 2).reshape(N, E * r)


def top_k_gates(probs: Tensor, top_k: int) -> Tensor:
    """probs with all but the top_k largest of each row zeroed, not renormalised. Ties go to
    the lower head index (a stable descending sort keeps equal values in index order)."""
    kept = torch.sort(probs, dim=-1, descending=True, stable=True).indices[..., :top_k]
    return torch.zeros_like(probs).scatter_(-1, kept, probs.gather(-1, kept))


def router_probs(x: Tensor, router_weight: Tensor) -> Tensor:
    """softmax(x Wg^T) per token: logits in x's dtype (as F.linear gives them, and as the
    official HydraLoRA code computes them), the softmax in fp32, or float64 for float64 inputs.
    (The Triton kernels keep the logits in fp32, unrounded: in fp16/bf16 the two differ by the
    logits' rounding, which changes a top-k choice only where two logits nearly tie.)"""
    compute_dtype = torch.promote_types(x.dtype, torch.float32)
    return torch.softmax(F.linear(x, router_weight).to(compute_dtype), dim=-1)


def forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor,
            router_weight: Tensor, scaling: float, top_k: Optional[int], dropout: float,
            dropout_seed: Optional[Tensor]):
    """Returns (y, h, hg, probs, gates); gates is None for dense routing (then the
    gates are probs)."""
    M = x.shape[0]
    E, _, r = lora_B.shape
    x_adapter = x.to(lora_A.dtype)  # x itself unless the adapter is fp32 on a 16-bit x
    h = F.linear(dropped(x_adapter, dropout_seed, dropout) if dropout > 0 else x_adapter, lora_A)
    probs = router_probs(x_adapter, router_weight)
    gates = top_k_gates(probs, top_k) if top_k is not None else probs
    hg = (gates.unsqueeze(2) * h.unsqueeze(1).to(gates.dtype)).to(h.dtype).reshape(M, E * r)
    base = F.linear(x, weight, bias)
    y = add_scaled_product(base.to(hg.dtype), hg, heads_side_by_side(lora_B).t(),
                           scaling).to(x.dtype)
    return y, h, hg, probs, (gates if top_k is not None else None)


def backward(grad_y: Tensor, grad_probs: Tensor, x: Optional[Tensor], h: Optional[Tensor],
             hg: Optional[Tensor], probs: Optional[Tensor], gates: Optional[Tensor], weight: Tensor,
             lora_A: Tensor, lora_B: Tensor, router_weight: Tensor, dropout_seed: Optional[Tensor],
             scaling: float, dropout: float, need_x: bool, need_A: bool, need_B: bool,
             need_router: bool):
    """Returns (dx, dA, dB, dWg), each None when not asked for. gates is None for dense routing.

    Needs hg for dB; h and probs (and gates with top-k) for everything else; x for dA and dWg.
    """
    M = grad_y.shape[0]
    E, N, r = lora_B.shape
    dy = grad_y.to(lora_B.dtype)  # the adapter's dtype (fp32 adapters on a 16-bit base)
    dB = None
    if need_B:
        dB = torch.mm(dy.t(), hg).mul_(scaling).view(N, E, r).permute(1, 0, 2).contiguous()
    dx = dA = dWg = None
    if need_x or need_A or need_router:
        u = torch.mm(dy, heads_side_by_side(lora_B)).mul_(scaling)
        compute_dtype = probs.dtype
        u_heads = u.view(M, E, r).to(compute_dtype)
        g = gates if gates is not None else probs
        # Per-token products as bmm: torch.einsum's Python wrapper costs microseconds a call.
        dh = torch.bmm(g.unsqueeze(1), u_heads).squeeze(1)                         # (M, r)
        dg = torch.bmm(u_heads, h.to(compute_dtype).unsqueeze(2)).squeeze(2)       # (M, E)
        if gates is not None:
            dg = torch.where(gates != 0, dg, 0.0)  # dropped heads: constant zero gates
        dp = dg + grad_probs.to(compute_dtype)
        dlogits = probs * (dp - (probs * dp).sum(-1, keepdim=True))
        dh_dlogits = torch.cat([dh, dlogits], 1).to(lora_A.dtype)
        # The base product in x's dtype, then the adapter's terms in the adapter's dtype.
        base = torch.mm(grad_y, weight).to(lora_A.dtype) if need_x else None
        x_adapter = x.to(lora_A.dtype) if (need_A or need_router) else None
        if dropout > 0:
            dh, dlogits = dh_dlogits[:, :r], dh_dlogits[:, r:]
            if need_x:
                dx = torch.addmm(base, dlogits, router_weight)
                dx += dropped(torch.mm(dh, lora_A), dropout_seed, dropout)
                dx = dx.to(grad_y.dtype)
            if need_A:
                dA = torch.mm(dh.t(), dropped(x_adapter, dropout_seed, dropout))
            if need_router:
                dWg = torch.mm(dlogits.t(), x_adapter)
            return dx, dA, dB, dWg
        if need_x:
            dx = torch.addmm(base, dh_dlogits, torch.cat([lora_A, router_weight])).to(grad_y.dtype)
        if need_A:
            dA = torch.mm(dh_dlogits[:, :r].t(), x_adapter)
        if need_router:
            dWg = torch.mm(dh_dlogits[:, r:].t(), x_adapter)
    return dx, dA, dB, dWg
