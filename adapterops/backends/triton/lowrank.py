"""Launchers of the fused low-rank linear kernels (`adapterops.kernels.lowrank`).

Forward: shrink pass (h1, h2), then the base GEMM with s h2 B^T added in its epilogue.
Backward: one pass over dY (g, dB, dS, gS), then the dx GEMM with (g S) A added likewise; dA
(LoRA mode only) is a plain cuBLAS/ATen GEMM (g S)^T x.
The GEMM has two paths: on sm_90 and newer, when a, b and the output can be described by TMA
descriptors (unit column stride, 16-byte aligned base and row stride: contiguous 16-bit tensors
whose width is a multiple of 8), the persistent tensor-descriptor kernel; otherwise (sm_80,
odd widths, strided views) the pointer kernel. Tile configurations are data below; the GEMM is
autotuned per (path, token-count bucket, N, K, dtype, bias): the rank is not part of the key,
since no compile-time value depends on it. The two memory-bound passes use one configuration
per numerics class.
"""
import functools
from typing import Optional

import torch
import triton
from torch import Tensor

from triton.tools.tensor_descriptor import TensorDescriptor

from ...kernels import lowrank as K
from ..base import Limits
from ..reference.dropout import keep_scale, threshold
from .common import (DTYPES, VARIANTS, KernelConfig, bucket, device_guard, device_reasons,
                     element_size, interpreting, kernel_config, launch, numerics_class,
                     numerics_flags, pick_config, rank_block, variant_label)

MAX_RANK = 128
LIMITS = Limits(dtypes=DTYPES, max_rank=MAX_RANK)
RANK_CHUNK = 16  # the width of every contraction over the rank (see adapterops.kernels.lowrank)

# Tiles by element size (2: fp16/bf16 on tensor cores; 4: fp32, FMAs or TF32).
# The pointer path (sm_80, or operands a TMA descriptor cannot address). fp32 GEMMs halve
# BLOCK_K so three stages fit in shared memory.
GEMM_CONFIGS = {
    2: [
        {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 8, "num_stages": 4},
        {"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 8, "num_stages": 3},
        {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 4, "num_stages": 4},
    ],
    4: [
        {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32, "GROUP_M": 8, "num_warps": 8, "num_stages": 3},
        {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 32, "GROUP_M": 8, "num_warps": 8, "num_stages": 4},
    ],
}
# The sm_90 tensor-descriptor path, by numerics class, first the default. 16-bit: the tiles
# known to be good for an 8192 x 4096 x 4096 bf16 GEMM on an H100 (Triton's persistent-matmul
# tutorial and cuBLAS's own choices run 128x256 and 256x128 tiles with 2 consumer warpgroups),
# then smaller ones for few tokens. Shared memory (sm_90 kernel report): 213 KB for the
# 128x256x64 and 256x128x64 three-stage pipelines with their output tile, 229 KB for
# 128x128x128 (the limit is 227 KiB). TF32 tiles are half as deep for the same bytes; a
# 128x256 fp32 output tile alone is 128 KiB (278 KB with three stages: over the limit). Full
# fp32 ("ieee") has no entry: it runs on FMAs, which TMA does not feed any faster, and its
# 128x128x32 tile spilled 3.5-29 KB on this path (the pointer kernel holds it in 254
# registers): it stays on the pointer path.
TMA_GEMM_CONFIGS = {
    "16bit": [
        {"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 8, "num_stages": 3},
        {"BLOCK_M": 256, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 8, "num_stages": 3},
        {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 128, "GROUP_M": 8, "num_warps": 8, "num_stages": 3},
        {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 8, "num_stages": 4},
        {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 4, "num_stages": 4},
    ],
    "tf32": [
        {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32, "GROUP_M": 8, "num_warps": 8, "num_stages": 3},
        {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32, "GROUP_M": 8, "num_warps": 8, "num_stages": 4},
        {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 32, "GROUP_M": 8, "num_warps": 4, "num_stages": 4},
    ],
}
# The dx GEMM of a layer with adapter dropout holds a second BLOCK_M x BLOCK_N fp32 tile, the
# low-rank term, which is masked before it joins the accumulator (`_add_lowrank_and_bias`):
# tiles whose two accumulators fit in registers beside the pipeline (a 128x256 tile's pair is
# 256 registers a thread on 8 warps). Only the dx GEMM takes dropout, and TF32's dx GEMM takes
# the pointer path (see tma_layout), so the descriptor path has 16-bit entries only.
DROPOUT_GEMM_CONFIGS = {
    2: [
        {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 8, "num_stages": 3},
        {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 4, "num_stages": 4},
    ],
    4: [
        {"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 8, "num_warps": 8, "num_stages": 3},
        {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 8, "num_warps": 4, "num_stages": 3},
    ],
}
DROPOUT_TMA_GEMM_CONFIGS = {
    "16bit": [
        {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 8, "num_stages": 4},
        {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 128, "GROUP_M": 8, "num_warps": 8, "num_stages": 3},
        {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 4, "num_stages": 4},
    ],
}
# The GEMMs with fp32 adapters on a 16-bit x: a 16-bit main loop and an fp32 term in the
# epilogue, whose full-fp32 FMAs hold operand rows in registers (sm_90 kernel report, triton
# 3.9): the 128x256 and 256x128 tiles spilled 184-360 bytes and overflowed shared memory
# (245,760 bytes), and with dropout's second accumulator every 128-row tile spilled (44-64
# bytes) and 64x128 too (36-112). These spill nowhere, at either precision of the term.
FP32_ADAPTER_GEMM_CONFIGS = {
    "pointer": [
        {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 8, "num_stages": 4},
        {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 4, "num_stages": 4},
    ],
    "tma": [
        {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 8, "num_stages": 4},
        {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 128, "GROUP_M": 8, "num_warps": 8, "num_stages": 3},
        {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 4, "num_stages": 4},
    ],
    "dropout pointer": [
        {"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 8, "num_stages": 3},
        {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 4, "num_stages": 3},
    ],
    "dropout tma": [
        {"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 8, "num_stages": 4},
        {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 4, "num_stages": 4},
    ],
}
TMA_MIN_CAPABILITY = (9, 0)
# Under the interpreter the persistent loop runs on a few programs, so each walks several
# tiles (as on a GPU with more tiles than SMs) and the last ones fewer.
INTERPRETER_PROGRAMS = 3
# The two memory-bound passes, per numerics class ("16bit": fp16/bf16 on tensor cores; "tf32";
# "ieee": full fp32 on FMAs, which hold whole operand rows in registers, hence the small
# tiles) and rank bucket: each entry is ((largest rank bucket, configuration), ...), the first
# whose bucket is large enough serves. Rank bucket 256 is the grad pass of the routed op alone
# (its rank is E r <= 256, without S). Chosen with the sm_90 kernel report on every Triton
# from 3.6 to 3.9 (M and R unspecialized, as launched), so that no default configuration
# spills or serializes its wgmma on any of them. ptxas's choices are neither monotonic in tile
# size or warps nor stable across versions; what the report showed:
# - TF32 shrink: 8 warps at rank bucket 32 without S serialized on 3.6 (the 16 columns split
#   between two warpgroups); 4 warps spilled 72-248 bytes at 128 with S on 3.7-3.9.
# - TF32 grad pass: BLOCK_N = 32 issued each k8 HGMMA of the g product alone and waited for it
#   (3.9); at 64, 8 warps serialized at rank bucket 32 without dB or dS on 3.6, and 4 warps
#   spilled 120-784 bytes at 128 on every version.
# - Full fp32 grad pass: 16 x 16 on 8 warps spills nowhere on 3.6-3.8 but 12 bytes at 128 on
#   3.9; 16 x 32 on 8 warps spills at 32 and 64 on 3.6-3.8 but not at 128; 16 x 16 on 4 warps
#   spilled at 64 on 3.8 and at 128 on 3.9.
# - 4 warps spilled the 16-bit grad pass at rank 128 with S (364 bytes, 3.9), and the 16-bit
#   shrink at rank 128 with S once it held both ends, the unsplit one and the split one's
#   partial store (128 bytes, 3.9; 8 warps: 147 registers). Below 128, 8 warps split each
#   16-wide wgmma between two warpgroups (64x8x16 HGMMAs), which ptxas serialized (C7514) in
#   the routed shrink at rank bucket 16.
# BLOCK_K = 32 keeps the TF32 shrink's pipeline inside an A100's shared memory (BLOCK_K = 128
# needed 196,608 bytes at rank 128). The full-fp32 shrink takes BLOCK_K = 16: at 32, once it
# held both the unsplit end and the split one's partial store, rank bucket 64 with S spilled 24
# bytes (3.9; 16: 80 registers, none; checked on 3.9 only). Re-run the report (with each
# Triton) after changing any.
SHRINK_CONFIGS = {
    "16bit": ((64, {"BLOCK_M": 64, "BLOCK_K": 128, "num_warps": 4, "num_stages": 3}),
              (128, {"BLOCK_M": 64, "BLOCK_K": 128, "num_warps": 8, "num_stages": 3})),
    "tf32": ((64, {"BLOCK_M": 64, "BLOCK_K": 32, "num_warps": 4, "num_stages": 3}),
             (128, {"BLOCK_M": 64, "BLOCK_K": 32, "num_warps": 8, "num_stages": 3})),
    "ieee": ((128, {"BLOCK_M": 32, "BLOCK_K": 16, "num_warps": 8, "num_stages": 3}),),
}
# The shrink with dropout, where it needs other tiles than SHRINK_CONFIGS: the full-fp32 one
# at rank bucket 128 without S spilled 32 bytes with 32 rows (3.9); 16 rows spill nowhere
# with dropout, but at 128 with S without it (16 bytes), so each keeps its own.
DROPOUT_SHRINK_CONFIGS = {
    **SHRINK_CONFIGS,
    "ieee": ((128, {"BLOCK_M": 16, "BLOCK_K": 16, "num_warps": 8, "num_stages": 3}),),
}
WIDE_RANK_BLOCK = 256
GRAD_PASS_CONFIGS = {
    "16bit": ((128, {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3}),
              (256, {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 8, "num_stages": 3})),
    "tf32": ((64, {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3}),
             (128, {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3}),
             (256, {"BLOCK_M": 32, "BLOCK_N": 32, "num_warps": 8, "num_stages": 3})),
    "ieee": ((64, {"BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 8, "num_stages": 3}),
             (128, {"BLOCK_M": 16, "BLOCK_N": 32, "num_warps": 8, "num_stages": 3}),
             (256, {"BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 8, "num_stages": 3})),
}
# The streamed dA pass (LoRA mode with dropout, or fp32 adapters on a 16-bit x): a
# [BLOCK_R, BLOCK_K] fp32 accumulator per program, contracted over BLOCK_M rows of x per step
# (the full-fp32 FMA path holds that contraction in registers, hence its small BLOCK_M); same
# table form as the two passes.
GRAD_A_CONFIGS = {
    "16bit": ((64, {"BLOCK_M": 64, "BLOCK_K": 128, "num_warps": 4, "num_stages": 3}),
              (128, {"BLOCK_M": 64, "BLOCK_K": 64, "num_warps": 8, "num_stages": 3})),
    "tf32": ((64, {"BLOCK_M": 32, "BLOCK_K": 64, "num_warps": 4, "num_stages": 3}),
             (128, {"BLOCK_M": 32, "BLOCK_K": 64, "num_warps": 8, "num_stages": 3})),
    "ieee": ((128, {"BLOCK_M": 16, "BLOCK_K": 32, "num_warps": 8, "num_stages": 3}),),
}
# The two passes split their K (shrink) or N (grad pass) loop when their row blocks are fewer
# than the GPU's SMs (see "Few tokens" in adapterops.kernels.lowrank), so that every SM gets a
# program, but never into splits of fewer than SPLIT_MIN_STEPS tiles each: a split's partial
# sums cost a write and a read of BLOCK_M x BLOCK_R fp32 values, worth it only against a few
# tiles of x or dY. Under the interpreter the GPU counts INTERPRETER_PROGRAMS SMs and a split
# may be one tile, so that the tests' small shapes run both forms.
SPLIT_MIN_STEPS = 4
# Under the interpreter every program runs serially in NumPy: small tiles keep tests fast.
INTERPRETER_CONFIGS = {
    "gemm": {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4},
    "shrink": {"BLOCK_M": 32, "BLOCK_K": 32},
    "grad_pass": {"BLOCK_M": 32, "BLOCK_N": 32},
    "grad_a": {"BLOCK_M": 32, "BLOCK_K": 32},
}


def reasons_on(device: torch.device) -> list[str]:
    """Why this family's kernels cannot run on `device` (empty when they can)."""
    return device_reasons(device, K.gemm_lowrank_kernel)


def bucket_config(table: dict, numerics: str, block_r: int) -> dict:
    """The configuration of a memory-bound pass's `table` for a numerics class and rank bucket."""
    return next(config for largest, config in table[numerics] if block_r <= largest)


def pass_config(kernel, dtype: torch.dtype, table: dict, block_r: int,
                interpreter_config: dict) -> tuple[dict, dict]:
    """(numerics flags, tile configuration) of a memory-bound pass for `dtype` and a rank
    bucket: from `table` on a GPU, `interpreter_config` under the interpreter."""
    flags = numerics_flags(dtype, kernel)
    if interpreting(kernel):
        return flags, interpreter_config
    return flags, bucket_config(table, numerics_class(dtype, flags), block_r)


@functools.cache
def _programs_and_tma(device: torch.device) -> tuple[int, bool]:
    """(SM count, whether the tensor-descriptor path runs) of a CUDA device."""
    properties = torch.cuda.get_device_properties(device)
    return properties.multi_processor_count, (properties.major, properties.minor) >= TMA_MIN_CAPABILITY


def _describable(t: Tensor) -> bool:
    """Whether a TMA descriptor can address 2-D `t`: unit column stride, 16-byte aligned base
    and row stride, no empty dimension, and rows that do not overlap (a row stride of at least
    a row: an expanded dY has row stride 0, and a descriptor has no way to say so)."""
    return (t.shape[0] > 0 and t.shape[1] > 0 and t.stride(1) == 1
            and t.stride(0) >= t.shape[1]
            and (t.stride(0) * t.element_size()) % 16 == 0 and t.data_ptr() % 16 == 0)


def tma_layout(a: Tensor, b: Tensor, out: Tensor, numerics: str, kernel) -> Optional[bool]:
    """B_TRANSPOSED for the tensor-descriptor path (b described through its row-major
    transpose), or None when that path cannot serve: before sm_90, full fp32 (see
    TMA_GEMM_CONFIGS), or an operand no descriptor can address. Under the interpreter the
    device is taken to be an sm_90.

    TF32 takes this path only with b described through its transpose (the forward's W^T): a
    TF32 wgmma reads its B operand K-major only, and with a row-major K x N b (the dx GEMM's
    W) every TF32 configuration compiled to a K-loop that waits for each MMA group (sm_90
    kernel report, triton 3.9: "per group"), where the pointer kernel's stays pipelined."""
    if numerics not in TMA_GEMM_CONFIGS:
        return None
    if not interpreting(kernel) and not _programs_and_tma(a.device)[1]:
        return None
    if not (_describable(a) and _describable(out)):
        return None
    if _describable(b) and numerics != "tf32":
        return False
    if _describable(b.t()):
        return True
    return None


def gemm_lowrank(a: Tensor, b: Tensor, h: Tensor, c: Tensor, bias: Optional[Tensor], scale: float,
                 dropout: float = 0.0, dropout_seed: Optional[Tensor] = None) -> Tensor:
    """out = a @ b + bias + scale * h @ c, with b and c given as (possibly transposed) views;
    with dropout p > 0 (the dx GEMM), out = a @ b + kept * (scale * h @ c), kept the mask of
    `dropout_seed` over out's rows and columns."""
    M, Kdim = a.shape
    N = b.shape[1]
    R = h.shape[1]
    out = torch.empty((M, N), dtype=a.dtype, device=a.device)
    if M == 0 or N == 0:
        return out
    flags = numerics_flags(a.dtype, K.gemm_lowrank_kernel)
    if h.dtype != a.dtype:  # fp32 adapters on a 16-bit GEMM: the term's fp32 numerics
        flags["INPUT_PRECISION"] = numerics_flags(h.dtype, K.gemm_lowrank_kernel)["INPUT_PRECISION"]
    # The kernels read bias with unit stride; a strided view (a column of a matrix) is copied.
    bias = bias.contiguous() if bias is not None else None
    bias_arg = bias if bias is not None else out  # a valid pointer; unread without HAS_BIAS
    has_dropout = dropout > 0
    seed_arg = dropout_seed if has_dropout else out  # likewise without DROPOUT
    drop_threshold = threshold(dropout) if has_dropout else 0
    constexprs = dict(HAS_BIAS=bias is not None, DROPOUT=has_dropout, R_CHUNK=RANK_CHUNK, **flags)
    numerics = numerics_class(a.dtype, flags)
    b_transposed = tma_layout(a, b, out, numerics, K.gemm_lowrank_tma_kernel)

    fp32_term = h.dtype != a.dtype
    if b_transposed is None:
        kernel = K.gemm_lowrank_kernel
        if fp32_term:
            configs = FP32_ADAPTER_GEMM_CONFIGS["dropout pointer" if has_dropout else "pointer"]
        else:
            configs = (DROPOUT_GEMM_CONFIGS if has_dropout else GEMM_CONFIGS)[element_size(a.dtype)]
        args = (a, b, h, c, bias_arg, out, seed_arg, M, N, Kdim, R, scale, drop_threshold,
                a.stride(0), a.stride(1), b.stride(0), b.stride(1), h.stride(0), h.stride(1),
                c.stride(0), c.stride(1), out.stride(0), out.stride(1))

        def launch_with(config):
            grid = (triton.cdiv(M, config["BLOCK_M"]) * triton.cdiv(N, config["BLOCK_N"]),)
            launch(kernel, grid, args, config, **constexprs)
    else:
        kernel = K.gemm_lowrank_tma_kernel
        if fp32_term:
            configs = FP32_ADAPTER_GEMM_CONFIGS["dropout tma" if has_dropout else "tma"]
        else:
            configs = (DROPOUT_TMA_GEMM_CONFIGS if has_dropout else TMA_GEMM_CONFIGS)[numerics]
        programs = (INTERPRETER_PROGRAMS if interpreting(kernel)
                    else _programs_and_tma(a.device)[0])
        b_stored = b.t() if b_transposed else b

        def launch_with(config):
            bm, bn, bk = config["BLOCK_M"], config["BLOCK_N"], config["BLOCK_K"]
            num_programs = min(programs, triton.cdiv(M, bm) * triton.cdiv(N, bn))
            descriptors = (TensorDescriptor.from_tensor(a, [bm, bk]),
                           TensorDescriptor.from_tensor(b_stored, [bn, bk] if b_transposed else [bk, bn]),
                           TensorDescriptor.from_tensor(out, [bm, bn]))
            launch(kernel, (num_programs,),
                   (*descriptors, h, c, bias_arg, seed_arg, M, N, Kdim, R, scale, drop_threshold,
                    num_programs,
                    h.stride(0), h.stride(1), c.stride(0), c.stride(1)),
                   config, B_TRANSPOSED=b_transposed, **constexprs)

    if interpreting(kernel):
        config = INTERPRETER_CONFIGS["gemm"]
    else:
        key = (kernel.__name__, b_transposed, bucket(M), N, Kdim, a.dtype, h.dtype,
               bias is not None, has_dropout, a.device)
        config = pick_config(key, configs, configs[0], launch_with, kernel)
    launch_with(config)
    return out


def split_loop(kernel, device: torch.device, row_blocks: int, size: int, block: int) -> tuple[int, int]:
    """(splits, columns per split) for a pass of `row_blocks` programs whose loop walks `size`
    columns `block` at a time: one split when the row blocks fill the GPU's SMs; else as many
    as give every SM a program, each walking at least SPLIT_MIN_STEPS tiles. The columns per
    split are whole tiles, and no split is empty."""
    if interpreting(kernel):
        programs, min_steps = INTERPRETER_PROGRAMS, 1
    else:
        programs, min_steps = _programs_and_tma(device)[0], SPLIT_MIN_STEPS
    steps = triton.cdiv(size, block)
    if row_blocks >= programs or steps < 2 * min_steps:
        return 1, size
    splits = min(triton.cdiv(programs, row_blocks), steps // min_steps)
    steps_per_split = triton.cdiv(steps, splits)
    return triton.cdiv(steps, steps_per_split), steps_per_split * block


def finish_config(config: dict) -> dict:
    """A split pass's finishing kernel runs on the pass's row blocks and warps; its loop over
    the splits has nothing worth pipelining."""
    return {**{k: v for k, v in config.items() if k in ("BLOCK_M", "num_warps")}, "num_stages": 1}


def partial_sums(splits: int, M: int, block_r: int, like: Tensor) -> Tensor:
    """The (splits, M, block_r) fp32 buffer of a split pass's partial sums; with one split,
    `like` (a valid pointer the kernel does not touch)."""
    if splits == 1:
        return like
    return torch.empty((splits, M, block_r), dtype=torch.float32, device=like.device)


def shrink(x: Tensor, lora_A: Tensor, lora_S: Optional[Tensor], dropout: float = 0.0,
           dropout_seed: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """(h1, h2) = (x A^T, h1 S^T) from one read of x (x_d A^T with dropout p > 0, the mask
    drawn as x is read); h2 is empty without S. Split over K (and finished by a second kernel)
    when the row blocks are too few for the GPU."""
    M, Kdim = x.shape
    R = lora_A.shape[0]
    # h1 and h2 in the adapter's dtype; with fp32 adapters on a 16-bit x the pass computes in
    # fp32 (its numerics and tiles are fp32's), x converted in registers.
    h1 = torch.empty((M, R), dtype=lora_A.dtype, device=x.device)
    h2 = (torch.empty((M, R), dtype=lora_A.dtype, device=x.device) if lora_S is not None
          else h1.new_empty(0))
    if M > 0:
        kernel = K.lowrank_shrink_kernel
        block_r = rank_block(R)
        has_dropout = dropout > 0
        flags, config = pass_config(kernel, lora_A.dtype,
                                    DROPOUT_SHRINK_CONFIGS if has_dropout else SHRINK_CONFIGS,
                                    block_r, INTERPRETER_CONFIGS["shrink"])
        row_blocks = triton.cdiv(M, config["BLOCK_M"])
        splits, k_per_split = split_loop(kernel, x.device, row_blocks, Kdim, config["BLOCK_K"])
        S = lora_S if lora_S is not None else lora_A  # a valid pointer; unread without HAS_S
        h2_arg = h2 if lora_S is not None else h1
        part = partial_sums(splits, M, block_r, h1)
        shapes = dict(HAS_S=lora_S is not None, BLOCK_R=block_r, R_CHUNK=RANK_CHUNK, **flags)
        launch(kernel, (row_blocks, splits),
               (x, lora_A, S, h1, h2_arg, part, dropout_seed if has_dropout else h1, M, Kdim, R,
                splits, k_per_split, threshold(dropout), keep_scale(dropout),
                x.stride(0), x.stride(1), lora_A.stride(0), lora_A.stride(1),
                S.stride(0), S.stride(1), h1.stride(0), R),
               config, DROPOUT=has_dropout, **shapes)
        if splits > 1:
            launch(K.lowrank_shrink_finish_kernel, (row_blocks,),
                   (part, S, h1, h2_arg, M, R, splits, S.stride(0), S.stride(1), h1.stride(0), R),
                   finish_config(config), **shapes)
    return h1, h2


@device_guard
def forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor,
            lora_S: Optional[Tensor], scaling: float, dropout: float,
            dropout_seed: Optional[Tensor]):
    """(y, h1, h2) for 2-D x; h2 is empty without S. See `adapterops.kernels.lowrank`."""
    h1, h2 = shrink(x, lora_A, lora_S, dropout, dropout_seed)
    h = h2 if lora_S is not None else h1
    # b = W^T and c = B^T as strided views: no copies.
    y = gemm_lowrank(x, weight.t(), h, lora_B.t(), bias, scaling)
    return y, h1, h2


def grad_pass(grad_y: Tensor, lora_B: Tensor, h1: Optional[Tensor], h2: Optional[Tensor],
              lora_S: Optional[Tensor], scaling: float, need_B: bool, need_S: bool):
    """(gS, dB, dS) from one pass over dY: gS = s dY B S (s dY B without S) in dY's dtype; dB
    = s dY^T h2 (N x R) and dS = (s dY B)^T h1 (R x R) in fp32, None when not asked for.
    Split over N (and finished by a second kernel) when the row blocks are too few for the GPU.

    The kernel sums dB and dS into buffers whose rows are padded to the rank bucket (a
    compile-time row stride lets its reductions vectorize); the padding is sliced off with a
    copy of N x R fp32 values (a custom op's outputs must have the strides of its fake)."""
    M, N = grad_y.shape
    R = lora_B.shape[1]
    block_r = rank_block(R)
    device = grad_y.device
    # gS in the adapter's dtype (fp32 adapters on a 16-bit dY: the pass computes in fp32).
    gS = torch.empty((M, R), dtype=lora_B.dtype, device=device)
    dB = torch.zeros((N, block_r), dtype=torch.float32, device=device) if need_B else None
    dS = torch.zeros((R, block_r), dtype=torch.float32, device=device) if need_S else None
    if M > 0:
        kernel = K.lowrank_grad_pass_kernel
        flags, config = pass_config(kernel, lora_B.dtype, GRAD_PASS_CONFIGS, block_r,
                                    INTERPRETER_CONFIGS["grad_pass"])
        row_blocks = triton.cdiv(M, config["BLOCK_M"])
        splits, n_per_split = split_loop(kernel, device, row_blocks, N, config["BLOCK_N"])
        S = lora_S if lora_S is not None else lora_B  # a valid pointer; unread without HAS_S
        h1_arg = h1 if h1 is not None else gS       # likewise when dS is not asked for
        h2_arg = h2 if h2 is not None else gS       # likewise when dB is not asked for
        ds_arg = dS if dS is not None else gS
        part = partial_sums(splits, M, block_r, gS)
        shapes = dict(HAS_S=lora_S is not None, COMPUTE_DS=need_S, BLOCK_R=block_r,
                      R_CHUNK=RANK_CHUNK, **flags)
        launch(kernel, (row_blocks, splits),
               (grad_y, lora_B, h1_arg, h2_arg, S, gS, dB if dB is not None else gS, ds_arg,
                part, M, N, R, splits, n_per_split, scaling, grad_y.stride(0),
                grad_y.stride(1), lora_B.stride(0), lora_B.stride(1), h1_arg.stride(0),
                h2_arg.stride(0), S.stride(0), S.stride(1), R),
               config, COMPUTE_DB=need_B, **shapes)
        if splits > 1:
            launch(K.lowrank_grad_pass_finish_kernel, (row_blocks,),
                   (part, h1_arg, S, gS, ds_arg, M, R, splits, scaling, h1_arg.stride(0),
                    S.stride(0), S.stride(1), R),
                   finish_config(config), **shapes)
    return (gS, dB[:, :R].contiguous() if need_B else None,
            dS[:, :R].contiguous() if need_S else None)


@device_guard
def backward(grad_y: Tensor, x: Optional[Tensor], h1: Optional[Tensor], h2: Optional[Tensor],
             weight: Tensor, lora_A: Tensor, lora_B: Tensor, lora_S: Optional[Tensor],
             dropout_seed: Optional[Tensor], scaling: float, dropout: float, need_x: bool,
             need_A: bool, need_B: bool, need_S: bool):
    """(dx, dA, dB, dS), None where not asked for. With dropout, the dx GEMM's epilogue and
    the dA kernel regenerate the forward's mask from the seed."""
    gS, dB, dS = grad_pass(grad_y, lora_B, h1, h2, lora_S, scaling, need_B, need_S)
    dx = (gemm_lowrank(grad_y, weight, gS, lora_A, None, keep_scale(dropout), dropout,
                       dropout_seed) if need_x else None)
    if need_A and (dropout > 0 or x.dtype != gS.dtype):
        dA = streamed_grad_A(gS, x, dropout, dropout_seed).to(lora_A.dtype)
    else:
        dA = torch.mm(gS.t(), x) if need_A else None
    return (dx, dA,
            dB.to(lora_B.dtype) if dB is not None else None,
            dS.to(lora_S.dtype) if dS is not None else None)


def streamed_grad_A(gS: Tensor, x: Tensor, dropout: float, dropout_seed: Optional[Tensor]) -> Tensor:
    """dA = (g S)^T x in fp32 (R x K), x read in its own dtype and, with dropout p > 0, x_d
    regenerated from the seed as x is read (`lowrank_grad_a_kernel`): a grid of K tiles x row
    splits, the splits as many as give every SM a program (but at least SPLIT_MIN_STEPS row
    blocks each). gS may be a column slice (unit column stride, any row stride: the routed
    backward's dh)."""
    M, Kdim = x.shape
    R = gS.shape[1]
    dA = torch.zeros((R, Kdim), dtype=torch.float32, device=x.device)
    if M == 0 or Kdim == 0:
        return dA
    kernel = K.lowrank_grad_a_kernel
    block_r = rank_block(R)
    # The numerics of the product's wider operand (gS: fp32 adapters on a 16-bit x).
    flags, config = pass_config(kernel, gS.dtype, GRAD_A_CONFIGS, block_r,
                                INTERPRETER_CONFIGS["grad_a"])
    column_tiles = triton.cdiv(Kdim, config["BLOCK_K"])
    splits, rows_per_split = split_loop(kernel, x.device, column_tiles, M, config["BLOCK_M"])
    has_dropout = dropout > 0
    launch(kernel, (column_tiles, splits),
           (x, gS, dA, dropout_seed if has_dropout else dA, M, Kdim, R, rows_per_split,
            threshold(dropout), keep_scale(dropout), x.stride(0), x.stride(1), gS.stride(0), Kdim),
           config, DROPOUT=has_dropout, BLOCK_R=block_r, **flags)
    return dA


# Strides that are 1 when the launchers above get contiguous tensors, per kernel and call path.
# A launch turns an integer argument equal to 1 into a compile-time constant, so these are
# constants in what a GPU compiles. As runtime strides they stop the loads from vectorizing:
# the bf16 128x128x64 GEMM then compiled for sm_90 to scalar loads, 255 registers and 84 bytes
# of spills; with them constant (and sizes multiples of 16) to cp.async and 132 registers.
UNIT_STRIDES = {
    # a = x, b = W^T, h = h2, c = B^T
    "gemm fwd": ("stride_ak", "stride_bk", "stride_hr", "stride_cr", "stride_on"),
    # a = dY, b = W, h = gS, c = A
    "gemm bwd": ("stride_ak", "stride_bn", "stride_hr", "stride_cn", "stride_on"),
    # The tensor-descriptor GEMM: only the low-rank term has strides.
    "tma fwd": ("stride_hr", "stride_cr"),
    "tma bwd": ("stride_hr", "stride_cn"),
    "shrink": ("stride_xk", "stride_ak", "stride_sj"),
    "grad_pass": ("stride_dyn", "stride_br", "stride_sj"),
    "finish": ("stride_sj",),
    "grad_a": ("stride_xk",),
}


def kernel_configurations() -> list[KernelConfig]:
    """Every configuration the launchers above can pick on a GPU: each tile configuration in
    each dtype (fp32 in full precision and in TF32, as torch's fp32 matmul setting selects)
    and rank bucket, with the feature flags and unit strides of every call path."""
    configs = []
    for dtype, precision in VARIANTS:
        d = variant_label(dtype, precision)
        numerics = numerics_class(dtype, {"INPUT_PRECISION": precision})

        # Called only within this iteration, so the loop variables it reads are current.
        def add(fn, label, config, default, unit_strides, fp32_ptrs=(), **flags):
            configs.append(kernel_config(fn, f"{d} {label}", config, default, dtype, precision,  # noqa: B023
                                         unit_strides, fp32_ptrs, R_CHUNK=RANK_CHUNK, **flags))

        # The backward (dx) GEMM never has a bias; only it has dropout, with its own tiles.
        gemm_paths = (("fwd", True, False), ("fwd", False, False), ("bwd", False, False))
        dropout_paths = (("bwd", False, True),)
        pointer_tables = ((GEMM_CONFIGS, gemm_paths), (DROPOUT_GEMM_CONFIGS, dropout_paths))
        for table, paths in pointer_tables:
            for i, config in enumerate(table[element_size(dtype)]):
                tiles = f"{config['BLOCK_M']}x{config['BLOCK_N']}x{config['BLOCK_K']}"
                for path, has_bias, dropout in paths:
                    add(K.gemm_lowrank_kernel,
                        f"{path} {tiles} bias={has_bias}" + (" dropout" if dropout else ""),
                        config, i == 0, UNIT_STRIDES[f"gemm {path}"], HAS_BIAS=has_bias,
                        DROPOUT=dropout)
        # TF32's dx GEMM takes the pointer path (see tma_layout).
        tma_tables = ((TMA_GEMM_CONFIGS, gemm_paths[:2] if numerics == "tf32" else gemm_paths),
                      (DROPOUT_TMA_GEMM_CONFIGS, dropout_paths))
        for table, paths in tma_tables:
            for i, config in enumerate(table.get(numerics, ())):
                bm, bn, bk = config["BLOCK_M"], config["BLOCK_N"], config["BLOCK_K"]
                for path, has_bias, dropout in paths:
                    # The forward's b = W^T is described through W's row-major storage.
                    transposed = path == "fwd"
                    configs.append(kernel_config(
                        K.gemm_lowrank_tma_kernel,
                        f"{d} {path} {bm}x{bn}x{bk} bias={has_bias}" + (" dropout" if dropout else ""),
                        config, i == 0, dtype, precision, UNIT_STRIDES[f"tma {path}"],
                        descriptor_blocks={"a_desc": (bm, bk), "out_desc": (bm, bn),
                                           "b_desc": (bn, bk) if transposed else (bk, bn)},
                        B_TRANSPOSED=transposed, HAS_BIAS=has_bias, DROPOUT=dropout,
                        R_CHUNK=RANK_CHUNK))
        for block_r in (16, 32, 64, 128, WIDE_RANK_BLOCK):
            # Rank bucket 256 is the routed op's grad pass alone: no S, no shrink.
            grad_config = bucket_config(GRAD_PASS_CONFIGS, numerics, block_r)
            for has_s in ((True, False) if block_r < WIDE_RANK_BLOCK else (False,)):
                shapes = dict(HAS_S=has_s, BLOCK_R=block_r)
                if block_r < WIDE_RANK_BLOCK:
                    finishes = []  # the finishing kernel runs on its shrink's rows and warps
                    for dropout, table in ((False, SHRINK_CONFIGS), (True, DROPOUT_SHRINK_CONFIGS)):
                        shrink_config = bucket_config(table, numerics, block_r)
                        add(K.lowrank_shrink_kernel,
                            f"R{block_r} S={has_s}" + (" dropout" if dropout else ""),
                            shrink_config, True, UNIT_STRIDES["shrink"], fp32_ptrs=("part_ptr",),
                            loop="stream", DROPOUT=dropout, **shapes)
                        if finish_config(shrink_config) not in finishes:
                            finishes.append(finish_config(shrink_config))
                    for finish in finishes:
                        add(K.lowrank_shrink_finish_kernel,
                            f"R{block_r} S={has_s} BLOCK_M={finish['BLOCK_M']}", finish, True,
                            UNIT_STRIDES["finish"], fp32_ptrs=("part_ptr",), loop="partials",
                            **shapes)
                for compute_ds in ((True, False) if has_s else (False,)):
                    for compute_db in (True, False):
                        add(K.lowrank_grad_pass_kernel,
                            f"R{block_r} S={has_s} dB={compute_db} dS={compute_ds}", grad_config,
                            True, UNIT_STRIDES["grad_pass"],
                            fp32_ptrs=("db_ptr", "ds_ptr", "part_ptr"), loop="stream",
                            COMPUTE_DB=compute_db, COMPUTE_DS=compute_ds, **shapes)
                    add(K.lowrank_grad_pass_finish_kernel, f"R{block_r} S={has_s} dS={compute_ds}",
                        finish_config(grad_config), True, UNIT_STRIDES["finish"],
                        fp32_ptrs=("ds_ptr", "part_ptr"), loop="partials", COMPUTE_DS=compute_ds,
                        **shapes)
            if block_r < WIDE_RANK_BLOCK:
                # (Its contraction runs over rows, not the rank: no R_CHUNK.) Same dtypes, it
                # serves dropout only (cuBLAS takes dA otherwise).
                configs.append(kernel_config(
                    K.lowrank_grad_a_kernel, f"{d} R{block_r} dropout",
                    bucket_config(GRAD_A_CONFIGS, numerics, block_r), True, dtype,
                    precision, UNIT_STRIDES["grad_a"], fp32_ptrs=("da_ptr",), loop="stream",
                    DROPOUT=True, BLOCK_R=block_r))
    return configs + fp32_adapter_configurations()


# fp32 adapters on a 16-bit x (PEFT's default on a 16-bit base): the pointers that hold the
# adapter's dtype, per kernel (x, dY, W, bias and the outputs y and dx keep x's dtype).
FP32_ADAPTER_PTRS = {
    "shrink": ("a_ptr", "s_ptr", "h1_ptr", "h2_ptr"),
    "grad_pass": ("b_ptr", "h1_ptr", "h2_ptr", "s_ptr", "gs_ptr"),
    "gemm": ("h_ptr", "c_ptr"),
    "grad_a": ("gs_ptr",),
}


def fp32_adapter_configurations() -> list[KernelConfig]:
    """The configurations launched with fp32 adapters on a bf16 x: the GEMMs (a 16-bit main
    loop, the fp32 term in the epilogue) at both fp32 precisions (the term's), and the passes
    that read x or dY (shrink, grad pass, dA) in full fp32, torch's default precision, on fp32
    tiles. Their finishing kernels see fp32 tensors only (the fp32 variants compile them); fp16
    and the TF32 passes differ from these in a load's dtype or an instruction's precision and
    are not compiled here (nor in CI)."""
    dtype, adapter = torch.bfloat16, torch.float32
    configs = []
    for precision in ("ieee", "tf32"):
        d = f"bf16+fp32-{precision}"
        numerics = numerics_class(adapter, {"INPUT_PRECISION": precision})

        # Called only within this iteration, so the loop variables it reads are current.
        def add(fn, label, config, default, unit_strides, pointers, fp32_ptrs=(), **flags):
            configs.append(kernel_config(
                fn, f"{d} {label}", config, default, dtype, precision, unit_strides, fp32_ptrs,  # noqa: B023
                pointer_dtypes=dict.fromkeys(FP32_ADAPTER_PTRS[pointers], adapter), **flags))

        gemm_paths = (("fwd", True, False), ("fwd", False, False), ("bwd", False, False),
                      ("bwd", False, True))
        for path, has_bias, dropout in gemm_paths:
            if dropout and precision == "tf32":
                continue  # the masked term runs in full fp32 whatever the precision: as ieee's
            prefix = "dropout " if dropout else ""
            for i, config in enumerate(FP32_ADAPTER_GEMM_CONFIGS[prefix + "pointer"]):
                tiles = f"{config['BLOCK_M']}x{config['BLOCK_N']}x{config['BLOCK_K']}"
                add(K.gemm_lowrank_kernel,
                    f"{path} {tiles} bias={has_bias}" + (" dropout" if dropout else ""), config,
                    i == 0, UNIT_STRIDES[f"gemm {path}"], "gemm", HAS_BIAS=has_bias,
                    DROPOUT=dropout, R_CHUNK=RANK_CHUNK)
            for i, config in enumerate(FP32_ADAPTER_GEMM_CONFIGS[prefix + "tma"]):
                bm, bn, bk = config["BLOCK_M"], config["BLOCK_N"], config["BLOCK_K"]
                transposed = path == "fwd"
                configs.append(kernel_config(
                    K.gemm_lowrank_tma_kernel,
                    f"{d} {path} {bm}x{bn}x{bk} bias={has_bias}" + (" dropout" if dropout else ""),
                    config, i == 0, dtype, precision, UNIT_STRIDES[f"tma {path}"],
                    pointer_dtypes=dict.fromkeys(FP32_ADAPTER_PTRS["gemm"], adapter),
                    descriptor_blocks={"a_desc": (bm, bk), "out_desc": (bm, bn),
                                       "b_desc": (bn, bk) if transposed else (bk, bn)},
                    B_TRANSPOSED=transposed, HAS_BIAS=has_bias, DROPOUT=dropout,
                    R_CHUNK=RANK_CHUNK))
        if precision != "ieee":
            continue
        for block_r in (16, 32, 64, 128):
            for has_s in (True, False):
                shapes = dict(HAS_S=has_s, BLOCK_R=block_r)
                for dropout, table in ((False, SHRINK_CONFIGS), (True, DROPOUT_SHRINK_CONFIGS)):
                    add(K.lowrank_shrink_kernel,
                        f"R{block_r} S={has_s}" + (" dropout" if dropout else ""),
                        bucket_config(table, numerics, block_r), True, UNIT_STRIDES["shrink"],
                        "shrink", fp32_ptrs=("part_ptr",), loop="stream", DROPOUT=dropout,
                        R_CHUNK=RANK_CHUNK, **shapes)
                for compute_ds in ((True, False) if has_s else (False,)):
                    for compute_db in (True, False):
                        add(K.lowrank_grad_pass_kernel,
                            f"R{block_r} S={has_s} dB={compute_db} dS={compute_ds}",
                            bucket_config(GRAD_PASS_CONFIGS, numerics, block_r), True,
                            UNIT_STRIDES["grad_pass"], "grad_pass",
                            fp32_ptrs=("db_ptr", "ds_ptr", "part_ptr"), loop="stream",
                            COMPUTE_DB=compute_db, COMPUTE_DS=compute_ds, R_CHUNK=RANK_CHUNK,
                            **shapes)
            for dropout in (False, True):
                add(K.lowrank_grad_a_kernel, f"R{block_r}" + (" dropout" if dropout else ""),
                    bucket_config(GRAD_A_CONFIGS, numerics, block_r), True,
                    UNIT_STRIDES["grad_a"], "grad_a", fp32_ptrs=("da_ptr",), loop="stream",
                    DROPOUT=dropout, BLOCK_R=block_r)
    return configs
