"""PiSSA utilities (methods.md §1): principal-singular-vector init and conversion to LoRA.

    U, Σ, Vh = svd(W)   (fp32, or float64 for a float64 W)
    A = sqrt(Σ_r / s) Vh_r,   B = U_r sqrt(Σ_r / s),   W_res = W - s B A

so the layer's output is unchanged at init. The fast variant uses
`torch.svd_lowrank(W, q=r, niter=K)`, which is randomised: seed torch's generator to repeat it.
HD-PiSSA's per-rank slices of the principal components (`hdpissa_factors`) come from here too.
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


def pissa_factors(weight: Tensor, rank: int, scaling: float, niter: Optional[int] = None,
                  dtype: Optional[torch.dtype] = None):
    """(A, B, W_res) with s B A + W_res = W up to rounding: A and B in `dtype` (the adapter's;
    None: weight's), W_res in weight's dtype."""
    if not scaling > 0:
        raise ValueError(f"PiSSA takes sqrt(sigma / scaling): scaling = alpha / rank must be > 0, got {scaling}")
    U, sigma, Vh = top_singular_triplets(weight, rank, niter)
    root = (sigma / scaling).sqrt()
    A = (root[:, None] * Vh).to(dtype or weight.dtype)
    B = (U * root[None, :]).to(dtype or weight.dtype)
    return A, B, residual_weight(weight, scaling, B, A)


def residual_weight(weight: Tensor, scaling: float, B: Tensor, A: Tensor,
                    S: Optional[Tensor] = None) -> Tensor:
    """W_res = W - s B S A (S omitted: W - s B A), computed in fp32 or better from the factors
    as stored and rounded once to weight's dtype. **[ours]** Computing it from the stored
    (rounded) factors, not from the SVD itself, makes W_res + s B0 S0 A0 = W up to one
    rounding, and lets `load_adapters` rebuild the exact W_res from the original W and the
    saved initial factors."""
    dtype = factor_dtype(weight)
    B = B.detach().to(dtype)
    if S is not None:
        B = B @ S.detach().to(dtype)
    return (weight.detach().to(dtype) - scaling * (B @ A.detach().to(dtype))).to(weight.dtype)


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


# HD-PiSSA's factors (methods.md §4) are sliced from the same SVD. They live here, below the
# HDPiSSALinear that builds them: adapterops.hdpissa imports that layer, so it cannot hold them.
SVD_METHODS = ("full", "lowrank")


def check_rank_index(rank_index, world_size: int) -> None:
    if isinstance(rank_index, bool) or not isinstance(rank_index, int) or not 0 <= rank_index < world_size:
        raise ValueError(f"rank_index must be an int in [0, world_size) = [0, {world_size}), "
                         f"got {rank_index!r}")


def check_factor_args(rank, world_size, weight_shape: tuple, svd, niter) -> None:
    """ValueError unless rank, world_size and niter are positive ints, svd is known and the K r
    factors fit in a weight of `weight_shape` (out, in)."""
    if svd not in SVD_METHODS:
        raise ValueError(f"svd must be one of {', '.join(SVD_METHODS)}, got {svd!r}")
    for name, value in (("rank", rank), ("world_size", world_size), ("niter", niter)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if world_size * rank > min(weight_shape):
        raise ValueError(f"HD-PiSSA needs world_size * rank <= min(in_features, out_features): "
                         f"{world_size} * {rank} = {world_size * rank} > {min(weight_shape)} "
                         f"for a weight of shape {weight_shape}")


def hdpissa_factors(weight: Tensor, rank: int, world_size: int, svd: str = "full",
                    niter: int = 8) -> tuple[Tensor, Tensor]:
    """Every rank's HD-PiSSA factors (methods.md §4), fp32, from one SVD of `weight` (the
    ORIGINAL W, in fp32 or better): with U, Σ, Vh = svd(W), rank k owns the slice
    sl = [k r, (k+1) r) of the top K r triplets,

        A_k = sqrt(Σ_sl) Vh_sl  (r x in),    B_k = U_sl sqrt(Σ_sl)  (out x r).

    Returns (A_all, B_all) = ([A_0; ...; A_{K-1}] (K r x in), [B_0 | ... | B_{K-1}] (out x K r)).
    Every rank needs all of them: the W update is a sum over all ranks' factors.

    svd="lowrank" is a randomised SVD for large matrices (`_randomized_svd`, `niter` subspace
    iterations), drawn from its own generator seeded with 0: every rank computes the same
    factors (on the same kind of device), and torch's global generators are left alone.
    """
    check_factor_args(rank, world_size, tuple(weight.shape), svd, niter)
    total = world_size * rank
    if svd == "full":
        U, sigma, Vh = top_singular_triplets(weight, total)
    else:
        U, sigma, Vh = _randomized_svd(weight.detach().to(factor_dtype(weight)), total, niter)
    root = sigma.clamp_min(0).sqrt()
    return (root[:, None] * Vh).float(), (U * root[None, :]).float()


def _randomized_svd(w: Tensor, q: int, niter: int, oversample: int = 8):
    """Top-q (U, Σ, Vh) of w by randomised subspace iteration (Halko, Martinsson and Tropp,
    Algorithm 4.4), from a CPU generator seeded with 0: deterministic, and unlike
    `torch.svd_lowrank` it draws nothing from torch's global generators (which every rank
    would otherwise have to keep in step, and which the caller's training uses)."""
    generator = torch.Generator().manual_seed(0)
    width = min(q + oversample, *w.shape)
    sketch = torch.randn(w.shape[1], width, generator=generator, dtype=w.dtype).to(w.device)
    basis = torch.linalg.qr(w @ sketch).Q
    for _ in range(niter):
        basis = torch.linalg.qr(w @ torch.linalg.qr(w.t() @ basis).Q).Q
    U_small, sigma, Vh = torch.linalg.svd(basis.t() @ w, full_matrices=False)
    return (basis @ U_small)[:, :q], sigma[:q], Vh[:q]
