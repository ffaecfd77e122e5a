"""What the Triton launchers of every op family share: device support, numerics flags,
autotuning and the description of kernel configurations for the kernel report."""
import dataclasses
import functools
import os
import threading
from typing import Any, Callable, Optional

import torch
import triton

MIN_CAPABILITY = (8, 0)
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
TRITON_DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32",
                      torch.int64: "i64", torch.uint8: "u8"}


def interpreting(kernel) -> bool:
    """True when `kernel` was built by the Triton interpreter (TRITON_INTERPRET=1 at import)."""
    return not isinstance(kernel, triton.runtime.JITFunction)


def device_reasons(device: torch.device, kernel) -> list[str]:
    """Why Triton cannot run `kernel` on `device`; empty when it can."""
    if device.type == "cuda":
        if interpreting(kernel):
            return []
        capability = torch.cuda.get_device_capability(device)
        if capability < MIN_CAPABILITY:
            return [f"the Triton kernels need compute capability >= {MIN_CAPABILITY}, "
                    f"{device} has {capability}"]
        return []
    if device.type == "cpu":
        if interpreting(kernel):
            return []
        return ["CPU tensors run Triton only under TRITON_INTERPRET=1, set before adapterops "
                "first imports its kernels"]
    return [f"the Triton kernels do not run on {device.type} tensors"]


def rank_block(rank: int) -> int:
    """The rank's tile size: a power of two >= 16 (a GPU `tl.dot` needs tiles of at least 16).

    Only this bucket is compile-time; the rank itself is a runtime size, so ranks 1..16 share
    one compiled kernel, 17..32 the next, and so on.
    """
    return max(16, triton.next_power_of_2(rank))


def numerics_flags(dtype: torch.dtype, kernel) -> dict:
    """UPCAST and INPUT_PRECISION for `kernels.common.mma` (see its docstring)."""
    interp = interpreting(kernel)
    if dtype == torch.float32 and not interp and torch.get_float32_matmul_precision() != "highest":
        precision = "tf32"  # the user allowed TF32 for fp32 matmuls; follow torch's setting
    elif dtype == torch.float32:
        precision = "ieee"
    else:
        precision = "tf32"  # Triton's default; it only affects fp32 tiles
    return {"UPCAST": interp and dtype == torch.bfloat16, "INPUT_PRECISION": precision}


def device_guard(launcher):
    """Runs `launcher(first_tensor, ...)` with that tensor's CUDA device current: Triton
    launches on the current device, which need not be the one holding the tensors."""
    @functools.wraps(launcher)
    def guarded(first, *args):
        if first.device.type != "cuda":
            return launcher(first, *args)
        with torch.cuda.device(first.device):
            return launcher(first, *args)
    return guarded


def element_size(dtype: torch.dtype) -> int:
    return torch.finfo(dtype).bits // 8


def numerics_class(dtype: torch.dtype, flags: dict) -> str:
    """The key of the memory-bound passes' configuration tables for a dtype and its
    `numerics_flags`: "16bit" (fp16/bf16 on tensor cores), "tf32" or "ieee" (fp32)."""
    return "16bit" if dtype != torch.float32 else flags["INPUT_PRECISION"]


LAUNCH_OPTIONS = ("num_warps", "num_stages")


def split_config(config: dict) -> tuple[dict, dict]:
    """(tile sizes, passed as constexprs; launch options) of a configuration."""
    return ({k: v for k, v in config.items() if k not in LAUNCH_OPTIONS},
            {k: config[k] for k in LAUNCH_OPTIONS if k in config})


# The Triton interpreter (TRITON_INTERPRET=1) is not thread-safe: it patches triton.language
# process-wide while a kernel runs, so two threads interpreting at once fail with
# InterpreterError. Interpreted launches are serialized by this lock; compiled ones take none.
_INTERPRETER_LOCK = threading.Lock()


def launch(kernel, grid, args, config: dict, **constexprs):
    meta, launch_options = split_config(config)
    if interpreting(kernel):
        with _INTERPRETER_LOCK:
            kernel[grid](*args, **meta, **constexprs, **launch_options)
        return
    kernel[grid](*args, **meta, **constexprs, **launch_options)


def autotune_enabled() -> bool:
    return os.environ.get("ADAPTEROPS_AUTOTUNE", "1") != "0"


_best_configs: dict[tuple, dict] = {}


def pick_config(key: tuple, configs: list[dict], default: dict, launch: Callable[[dict], Any],
                kernel) -> dict:
    """The fastest of `configs` for `key`, timed once per key with `launch(config)`.

    Pinned to `default` when ADAPTEROPS_AUTOTUNE=0 or under the interpreter (timing a CPU
    emulation says nothing about a GPU). While a CUDA graph is being captured, a key tuned by
    an earlier eager call keeps its config and an untuned one gets `default` (timing
    synchronizes, which a capture forbids; the next eager call tunes). A config that does not
    fit the device (shared memory, registers) is skipped.
    """
    if not autotune_enabled() or interpreting(kernel):
        return default
    if key in _best_configs:
        return _best_configs[key]
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        return default
    timings = {}
    for index, config in enumerate(configs):
        try:
            timings[index] = triton.testing.do_bench(lambda config=config: launch(config), warmup=5, rep=20)
        except triton.runtime.errors.OutOfResources:
            continue
    _best_configs[key] = configs[min(timings, key=timings.get)] if timings else default
    return _best_configs[key]


def bucket(n: int) -> int:
    """Autotuning key for a size that varies call to call (token counts): its power of two."""
    return triton.next_power_of_2(max(n, 1))


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """One compilable kernel configuration, as the kernel report compiles it."""
    kernel: str                    # the kernel's name in adapterops.kernels
    fn: Any                        # the @triton.jit function
    label: str                     # a short human description (dtype, tiles, flags)
    signature: dict                # arg name -> Triton type string ("*bf16", "i32", "fp32", "constexpr")
    constexprs: dict               # constexpr arg name -> value
    num_warps: int
    num_stages: int
    default: bool                  # the configuration used with ADAPTEROPS_AUTOTUNE=0
    dtype: Optional[torch.dtype] = None
    expects_tma: bool = False      # the sm_90 tensor-descriptor path: its PTX must use TMA
    # What the kernel's main loop is, for the kernel report's wgmma rules: "gemm" (compute-bound:
    # its MMAs must stay in flight across iterations), "stream" (a memory-bound pass over x or
    # dY: each iteration may wait for its MMAs, which the loads in flight hide), "partials" (a
    # split pass's finishing kernel: its loop sums partials; its MMAs are the r x r tail the
    # unsplit pass ends with too).
    loop: str = "gemm"


# The (dtype, fp32 matmul precision) pairs the kernel report compiles: fp32 in full precision
# and in TF32, as torch's fp32 matmul setting selects (the precision flag is inert for 16-bit).
VARIANTS = ((torch.float16, "tf32"), (torch.bfloat16, "tf32"),
            (torch.float32, "ieee"), (torch.float32, "tf32"))


def variant_label(dtype: torch.dtype, precision: str) -> str:
    return TRITON_DTYPE_NAMES[dtype] + ("-tf32" if dtype == torch.float32 and precision == "tf32" else "")


def triton_signature(fn, dtype: torch.dtype, constexprs: dict, fp32_ptrs=(),
                     pointer_dtypes: Optional[dict] = None,
                     descriptor_blocks: Optional[dict] = None) -> dict:
    """Triton types of `fn`'s arguments, for the kernel report: pointers in `dtype` (fp32 for
    `fp32_ptrs`, the given dtype for those in `pointer_dtypes`, int64 for the dropout seed),
    tensor descriptors (the arguments in `descriptor_blocks`, arg name -> block shape) over
    `dtype`, `scale` and `keep_scale` in fp32, every other runtime argument (sizes, strides,
    the dropout threshold) i32."""
    name = TRITON_DTYPE_NAMES[dtype]
    pointer_dtypes = {"seed_ptr": torch.int64, **(pointer_dtypes or {})}
    descriptor_blocks = descriptor_blocks or {}
    signature = {}
    for arg in fn.arg_names:
        if arg in constexprs:
            signature[arg] = "constexpr"
        elif arg in descriptor_blocks:
            signature[arg] = f"tensordesc<{name}[{', '.join(map(str, descriptor_blocks[arg]))}]>"
        elif arg in pointer_dtypes:
            signature[arg] = f"*{TRITON_DTYPE_NAMES[pointer_dtypes[arg]]}"
        elif arg.endswith("_ptr"):
            signature[arg] = "*fp32" if arg in fp32_ptrs else f"*{name}"
        elif arg in ("scale", "keep_scale"):
            signature[arg] = "fp32"
        else:
            signature[arg] = "i32"
    return signature


def kernel_config(fn, label: str, config: dict, default: bool, dtype: torch.dtype,
                  precision: str, unit_strides=(), fp32_ptrs=(), pointer_dtypes=None,
                  descriptor_blocks=None, loop="gemm", **flags) -> KernelConfig:
    """The `KernelConfig` of `fn` launched with tile configuration `config`, feature flags
    `flags` and the strides in `unit_strides` equal to 1 (a launch makes an integer argument
    equal to 1 a compile-time constant). UPCAST is off (a GPU never sets it) and
    INPUT_PRECISION is `precision`, for the kernels that take them. A kernel with tensor
    descriptors (`descriptor_blocks`) is the sm_90 path: the report expects TMA in it."""
    meta, options = split_config(config)
    numerics = {"UPCAST": False, "INPUT_PRECISION": precision}
    constexprs = {**meta, **flags, **dict.fromkeys(unit_strides, 1),
                  **{k: v for k, v in numerics.items() if k in fn.arg_names}}
    signature = triton_signature(fn, dtype, constexprs, fp32_ptrs, pointer_dtypes,
                                 descriptor_blocks)
    return KernelConfig(fn.__name__, fn, label, signature, constexprs, options["num_warps"],
                        options["num_stages"], default, dtype, expects_tma=bool(descriptor_blocks),
                        loop=loop)
