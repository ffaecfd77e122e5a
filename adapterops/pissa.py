"""PiSSA utilities (methods.md §1): principal-singular-vector init and conversion to LoRA.

    U, Σ, Vh = svd(W)   (fp32, or float64 for a float64 W)
    A = sqrt(Σ_r / s) Vh_r,   B = U_r sqrt(Σ_r / s),   W_res = W - s B A

so the layer's output is unchanged at init. The fast variant uses
`torch.svd_lowrank(W, q=r, niter=K)`, which is randomised: seed torch's generator to repeat it.
"""
from typing import Optional

import torch
from torch import Tensor


def factor_dtype(weight: Tensor) -> torch.dtype:
    """The dtype factorizations and merges of `weight` run in: fp32, or float64 for float64."""
    return torch.float64 if weight.dtype == torch.float64 else torch.float32


def top_singular_triplets(weight: Tensor, rank: int, niter: Optional[int] = None):
    """(U_r, Σ_r, Vh_r) of `weight` in fp32 (float64 for float64 weights); exact SVD when
    `niter` is None, else the randomised `torch.svd_lowrank` with `niter` subspace iterations."""
    if not 1 <= rank <= min(weight.shape):
        raise ValueError(f"rank must be in [1, min(weight.shape)] = [1, {min(weight.shape)}] "
                         f"for an SVD-based init of a weight of shape {tuple(weight.shape)}, got {rank}")
    w = weight.detach().to(factor_dtype(weight))
    if niter is None:
        U, sigma, Vh = torch.linalg.svd(w, full_matrices=False)
        return U[:, :rank], sigma[:rank], Vh[:rank]
    U, sigma, V = torch.svd_lowrank(w, q=rank, niter=niter)
    return U, sigma, V.t()


def pissa_factors(weight: Tensor, rank: int, scaling: float, niter: Optional[int] = None):
    """(A, B, W_res) in weight's dtype with s B A + W_res = W up to rounding."""
    if not scaling > 0:
        raise ValueError(f"PiSSA takes sqrt(sigma / scaling): scaling = alpha / rank must be > 0, got {scaling}")
    U, sigma, Vh = top_singular_triplets(weight, rank, niter)
    root = (sigma / scaling).sqrt()
    A = root[:, None] * Vh
    B = U * root[None, :]
    w_res = weight.detach().to(A.dtype) - scaling * (B @ A)
    return A.to(weight.dtype), B.to(weight.dtype), w_res.to(weight.dtype)


def to_lora(lora_A: Tensor, lora_B: Tensor, initial_A: Tensor, initial_B: Tensor):
    """A trained PiSSA adapter as a plain LoRA adapter on the ORIGINAL weight.

    With W = W_res + s B0 A0, the trained layer computes W_res + s B A = W + s (B A - B0 A0):
    `A' = [A; A0]`, `B' = [B | -B0]`. The rank doubles; use alpha' = 2 alpha so that
    s = alpha / r is unchanged. Returns (A', B').
    """
    if lora_A.shape != initial_A.shape or lora_B.shape != initial_B.shape:
        raise ValueError(f"the trained factors {tuple(lora_A.shape)}, {tuple(lora_B.shape)} and the "
                         f"initial ones {tuple(initial_A.shape)}, {tuple(initial_B.shape)} must match")
    return torch.cat([lora_A, initial_A], 0), torch.cat([lora_B, -initial_B], 1)
