"""Quantized base weights in bitsandbytes' 4-bit layout: `NF4Weight`, the first piece of the
base-weight abstraction the fused ops will read (design.md: dense, NF4/FP4 or FP8; a quantized
W is never held as a dense copy between calls).

Layout (bitsandbytes `Params4bit` + `QuantState`, checked against bitsandbytes 0.50.2):
- `packed`: uint8, ceil(numel / 2) bytes of the row-major (out x in) W, two 4-bit codes per
  byte, the HIGH nibble first (element 2 i in byte i's bits 7..4, element 2 i + 1 in bits 3..0).
- `code`: the 16 fp32 values a nibble stands for (NF4's normal quantiles, or FP4's).
- blocks of `blocksize` consecutive elements of the flattened W share one scale, absmax[b].
- double quantization (bnb's `compress_statistics=True`): absmax is itself 8-bit: uint8 codes
  c[b], decoded as `absmax_code[c[b]] * absmax_scale[b // absmax_blocksize] + offset` in fp32.

    W[i] = code[nibble(i)] * absmax[i // blocksize]        (fp32 products, then W's dtype)

which reproduces `bitsandbytes.functional.dequantize_4bit` bit for bit (tests/test_base_weight.py).
`dequantize()` runs it on the `dequant` op family's backends: the Triton kernel
(`adapterops.kernels.dequant`; CUDA sm_80+, or CPU under the interpreter), else PyTorch (the
oracle); the cuda backend has none. Under double quantization the per-block scales are decoded
first by two small PyTorch ops, as bitsandbytes does (a fused multiply-add would round them
differently).
"""
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from .. import dispatch

# The blocksizes bitsandbytes quantizes 4-bit weights with.
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
FLOATING = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class NF4Weight:
    """A 4-bit (NF4 or FP4) weight of `shape` (out, in) in bitsandbytes' layout (see the
    module docstring). `dtype` is the dtype W dequantizes to (bitsandbytes' `quant_state.dtype`).
    With double quantization `absmax` holds uint8 codes and `absmax_code`, `absmax_scale`,
    `absmax_blocksize` and `offset` decode them; without, `absmax` is fp32 and they are None."""

    packed: Tensor
    absmax: Tensor
    code: Tensor
    shape: tuple[int, int]
    blocksize: int
    dtype: torch.dtype
    quant_type: str = "nf4"
    absmax_code: Optional[Tensor] = None
    absmax_scale: Optional[Tensor] = None
    absmax_blocksize: int = 256
    offset: float = 0.0

    def __post_init__(self):
        _check(self)

    @property
    def double_quant(self) -> bool:
        return self.absmax_code is not None

    @property
    def device(self) -> torch.device:
        return self.packed.device

    @classmethod
    def from_bnb(cls, weight) -> "NF4Weight":
        """The NF4Weight of a quantized bitsandbytes `Params4bit` (a `Linear4bit`'s weight),
        sharing its tensors (no copy). TypeError for anything else."""
        state = getattr(weight, "quant_state", None)
        if state is None or not isinstance(weight, Tensor) or weight.dtype != torch.uint8:
            raise TypeError(f"from_bnb takes a quantized bitsandbytes Params4bit (uint8, with a "
                            f"quant_state), got {type(weight).__name__}"
                            + (f" of dtype {weight.dtype}" if isinstance(weight, Tensor) else ""))
        nested = state.state2 if getattr(state, "nested", False) else None
        return cls(packed=weight.data.reshape(-1), absmax=state.absmax, code=state.code,
                   shape=tuple(state.shape), blocksize=state.blocksize, dtype=state.dtype,
                   quant_type=state.quant_type,
                   absmax_code=nested.code if nested is not None else None,
                   absmax_scale=nested.absmax if nested is not None else None,
                   absmax_blocksize=nested.blocksize if nested is not None else 256,
                   offset=float(state.offset) if nested is not None else 0.0)

    def block_scales(self) -> Tensor:
        """absmax in fp32, one per block (decoded from its 8-bit codes under double quant)."""
        if not self.double_quant:
            return self.absmax
        outer = torch.arange(self.absmax.numel(), device=self.device) // self.absmax_blocksize
        return self.absmax_code[self.absmax.long()] * self.absmax_scale[outer] + self.offset

    def dequantize(self, dtype: Optional[torch.dtype] = None, *, backend: Optional[str] = None) -> Tensor:
        """A new dense (out, in) W in `dtype` (default: `self.dtype`); `backend` forces one
        ("triton" or "torch"; None: dispatch picks)."""
        dtype = self.dtype if dtype is None else dtype
        if dtype not in FLOATING:
            raise ValueError(f"dequantize: dtype must be one of {FLOATING}, got {dtype}")
        dispatch.check_backend_name(backend)
        out = torch.empty(self.shape, dtype=dtype, device=self.device)
        chosen = dispatch.select("dequant", backend, weight=out, signature=(out.device, dtype))
        chosen.dequantize_nf4(self.packed, self.block_scales(), self.code, self.blocksize, out)
        return out


def _check(w: NF4Weight) -> None:
    """ValueError naming the field whose size or dtype does not fit the layout."""
    if len(w.shape) != 2 or min(w.shape) < 1:
        raise ValueError(f"NF4Weight: shape must be (out, in) with both >= 1, got {w.shape}")
    numel = w.shape[0] * w.shape[1]
    blocks = -(-numel // w.blocksize) if w.blocksize > 0 else 0
    expect = [("packed", w.packed, torch.uint8, (numel + 1) // 2), ("code", w.code, torch.float32, 16),
              ("absmax", w.absmax, torch.uint8 if w.absmax_code is not None else torch.float32, blocks)]
    if w.blocksize not in BLOCKSIZES:
        raise ValueError(f"NF4Weight: blocksize must be one of {BLOCKSIZES}, got {w.blocksize}")
    if w.quant_type not in ("nf4", "fp4"):
        raise ValueError(f"NF4Weight: quant_type must be 'nf4' or 'fp4', got {w.quant_type!r}")
    if w.dtype not in FLOATING:
        raise ValueError(f"NF4Weight: dtype must be one of {FLOATING}, got {w.dtype}")
    if (w.absmax_code is None) != (w.absmax_scale is None):
        raise ValueError("NF4Weight: double quantization needs both absmax_code and absmax_scale")
    if w.absmax_code is not None:
        expect += [("absmax_code", w.absmax_code, torch.float32, 256),
                   ("absmax_scale", w.absmax_scale, torch.float32, -(-blocks // w.absmax_blocksize))]
    for name, t, dtype, count in expect:
        if not isinstance(t, Tensor) or t.dtype != dtype or t.numel() != count:
            got = f"{t.dtype} with {t.numel()} elements" if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"NF4Weight: {name} must be {dtype} with {count} elements for shape "
                             f"{w.shape} and blocksize {w.blocksize}, got {got}")
        if t.device != w.packed.device:
            raise ValueError(f"NF4Weight: {name} is on {t.device}, packed on {w.packed.device}")
