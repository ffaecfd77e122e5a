"""Compile every Triton kernel configuration the dispatcher can choose, without a GPU, and report
what ptxas made of each: registers, spills, shared memory, the matrix instruction, and what in
the compiled code makes a kernel slow (serialized wgmma, fenced atomics, missing TMA).

    python -m benchmarks.kernel_report --arch sm_90 [--arch sm_80] [--default-only | --quick]
        [--kernel SUBSTRING] [--sizes {aligned,odd,both}] [--jobs N] [--csv PATH]

The configurations are `adapterops.backends.triton.kernel_configurations()` (`--default-only`:
those used with ADAPTEROPS_AUTOTUNE=0; `--quick`: those and one other of each kernel and dtype),
each compiled as a launch specializes it: every pointer 16-byte aligned (torch allocations are)
and, per `--sizes`, either every runtime size and stride a multiple of 16 (`aligned`, the
default: hidden sizes, rank and token count like 4096, 16, 8192) or none of them (`odd`: 37
tokens, K = 70, rank 5; the tensor-descriptor GEMM, which needs 16-byte aligned strides and
sm_90, is compiled only for `aligned` sm_90). The two compile to different code: only aligned loads become cp.async
copies through a shared-memory pipeline, so `aligned` shows the shared memory a configuration
really needs (bf16 128x128x64 GEMM on sm_90: 135168 bytes, 132 registers), while `odd` loads
element by element with a 64-bit address each (32768 bytes, 255 registers and 216 bytes of
spills).

One row per (configuration, sizes, arch):
- loop: what the kernel's main loop is (`KernelConfig.loop`: gemm, stream, partials), which
  decides the wgmma rules below;
- registers, spills (bytes of spill stores + loads), shared memory bytes;
- mma: `wgmma` / `mma` / `none`, the PTX's matrix instruction;
- hgmma: how many HGMMA instructions the SASS has (sm_90's wgmma; 0 elsewhere);
- wgmma_serialized: `yes` when ptxas gave a C7515 advisory ("wgmma.mma_async instructions are
  serialized") or when, in the SASS, every HGMMA of the main loop (the loop with the most
  HGMMAs) is followed by `WARPGROUP.DEPBAR.LE gsb0, 0x0` before the next one: each waits for
  the one before, so the tensor cores idle for the MMA's latency at every step, where a
  pipelined loop keeps one group in flight (`DEPBAR.LE gsb0, 0x1`);
- wgmma_waits: how the main loop's MMAs wait (`_wgmma_waits`): `pipelined` (an MMA group left
  in flight into the next iteration), `per group` (the k16 HGMMAs of each `tl.dot` issue back
  to back, then the loop waits for all of them with `DEPBAR.LE gsb0, 0x0`: no MMA crosses an
  iteration), `per HGMMA` (serialized), `none`;
- advisories: the codes of every other ptxas "Potential Performance Loss" line;
- tma: `yes` when the PTX loads or stores tiles with `cp.async.bulk.tensor` (Hopper's tensor
  memory accelerator: one instruction moves a whole tile, no per-thread address arithmetic,
  hardware bounds checks);
- reductions: how global fp32 reductions compiled: `none`, `REDG` (fire-and-forget, relaxed),
  `ATOMG` (a returning atomic without a fence) or `fenced ATOMG` (`MEMBAR` before each atomic,
  the acq_rel default of `tl.atomic_add`: every reduction waits for all earlier memory traffic
  to become visible GPU-wide);
- compile seconds.
Exits 1 if any row has a problem (`_problems`, the one place the failure rules live): a compile
fails; shared memory over the arch's limit; or, for a default configuration (the one used with
ADAPTEROPS_AUTOTUNE=0 and before autotuning), spills, serialized wgmma, any ptxas performance
advisory, a fenced reduction, or no TMA where the configuration is the sm_90 tensor-descriptor
path (`KernelConfig.expects_tma`). The wgmma rules follow what the kernel's main loop is
(`KernelConfig.loop`): a GEMM (`gemm`) must keep its MMAs `pipelined`; a streaming pass over x
or dY (`stream`: the shrinks, the grad pass, the gate gradients) may wait `per group`, never
per HGMMA; a split pass's finishing kernel (`partials`) has no MMA loop to judge.

Why the streaming passes may wait per group (sm_90, triton 3.9). In every grad-pass
configuration, every rank bucket, the loop's `tl.dot`s (g += dY B, then the dB tile dY^T h2)
each issue their k16 HGMMAs back to back and are then waited for in full. At rank bucket 256
(the routed op's grad pass at E r > 128; BLOCK_N = 32) the g product is ONE group of two
HGMMAs followed by the wait: a full wait after the pair, not after each, so ptxas did not
serialize them (no C7515, and the first HGMMA issues without waiting). No MMA stays in flight
across iterations because the dB product's result feeds the reductions in the same iteration,
and a wgmma wait retires every group in flight (the variants without dB wait the same way;
we did not find what stops Triton's pipeliner there). What it costs is the MMAs' latency once
per iteration: at rank 16, a 64 x 64 tile, about 0.1-0.2 us of MMA and wait against 0.45 us to
stream the tile's 10 KB at a 132-SM share of 3 TB/s (an estimate, not yet measured on a GPU),
and the `cp.async` pipeline keeps the next (num_stages - 1) tiles of dY loading meanwhile. A
GEMM has no such slack (its MMAs are the work), so there the same pattern fails the report.

Compiles run in a process pool (`--jobs`, default: every CPU) against a fresh TRITON_CACHE_DIR,
so the times are real compiles, never cache hits. Kernels built under TRITON_INTERPRET=1 cannot
be compiled, so the report re-runs itself without that variable.
"""
import argparse
import concurrent.futures
import contextlib
import csv
import io
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time

ARCHS = {  # name -> (compute capability, most shared memory one block can use, in bytes)
    "sm_90": (90, 232448),
    "sm_80": (80, 166912),
}
SIZES = ("aligned", "odd")
COLUMNS = ("kernel", "label", "dtype", "sizes", "arch", "default", "loop", "num_warps", "num_stages",
           "registers", "spills", "shared", "mma", "hgmma", "wgmma_serialized", "wgmma_waits",
           "advisories", "tma", "reductions", "seconds", "error")
FENCED = "fenced ATOMG"

_configs = None  # each worker's kernel_configurations(), indexed by the jobs it is sent


def _load_configs():
    from adapterops.backends.triton import kernel_configurations
    return kernel_configurations()


def _init_worker():
    global _configs
    _configs = _load_configs()


def _attrs(cfg, sizes: str) -> dict:
    """Triton's launch-time specialization of `cfg`'s runtime arguments (see `JITFunction`'s
    `_pack_args`): pointers, and for `aligned` integers, known divisible by 16, except the
    kernel's `do_not_specialize` arguments, which a launch never specializes."""
    hinted = ("*", "i") if sizes == "aligned" else ("*",)
    unspecialized = {cfg.fn.arg_names[p.num] for p in cfg.fn.params if p.do_not_specialize}
    return {(cfg.fn.arg_names.index(name),): [["tt.divisibility", 16]]
            for name, ty in cfg.signature.items() if ty.startswith(hinted) and name not in unspecialized}


def _ptxas_stats(log: str) -> tuple:
    """(registers, spill bytes) from a `ptxas -v` log; "?" for what it does not say."""
    regs = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    return (int(regs.group(1)) if regs else "?",
            int(spills.group(1)) + int(spills.group(2)) if spills else "?")


def _advisories(log: str) -> list[str]:
    """The codes of ptxas's "Potential Performance Loss" advisories (C7515 and its kin)."""
    return sorted(set(re.findall(r"\((C\d+)\) Potential Performance Loss", log)))


_SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")


def _sass_instructions(sass: str) -> list[tuple[int, str]]:
    """(address, instruction text without the predicate's leading spaces) of a cuobjdump listing."""
    return [(int(m.group(1), 16), m.group(2)) for m in map(_SASS_LINE.search, sass.splitlines())
            if m]


def _is_hgmma(text: str) -> bool:
    return re.search(r"\bHGMMA\.", text) is not None


def _main_loop_waits(instructions: list[tuple[int, str]]) -> list[bool]:
    """Per HGMMA of the main loop, in order, whether a `WARPGROUP.DEPBAR.LE gsb0, 0x0` (a wait
    for every MMA in flight) follows it before the next HGMMA or the loop's end; empty without
    HGMMAs.

    Loops are the spans of backward branches (`BRA` to a lower address); the main loop is,
    among the innermost loops holding HGMMAs (those with no such loop inside), the one holding
    the most (the shortest on ties): a persistent GEMM's tile loop holds its K-loop and its
    epilogue's MMAs, and the K-loop is what must pipeline. Without a loop holding an HGMMA, the
    whole kernel is the span.
    """
    hgmma = [addr for addr, text in instructions if _is_hgmma(text)]
    if not hgmma:
        return []
    loops = []
    for addr, text in instructions:
        target = re.search(r"\bBRA\s+(?:`?\(?)0x([0-9a-f]+)", text)
        if target and int(target.group(1), 16) < addr:
            start = int(target.group(1), 16)
            count = sum(start <= a <= addr for a in hgmma)
            if count:
                loops.append((count, -(addr - start), start, addr))
    innermost = [loop for loop in loops
                 if not any(other is not loop and loop[2] <= other[2] and other[3] <= loop[3]
                            for other in loops)]
    start, end = (max(innermost)[2:] if innermost else (instructions[0][0], instructions[-1][0]))
    body = [(addr, text) for addr, text in instructions if start <= addr <= end]
    waited = []  # per HGMMA of the loop, whether a full wait follows it
    for _, text in body:
        if _is_hgmma(text):
            waited.append(False)
        elif waited and re.search(r"WARPGROUP\.DEPBAR\.LE\s+gsb0,\s*0x0\b", text):
            waited[-1] = True
    return waited


def _wgmma_serialized_in_sass(instructions: list[tuple[int, str]]) -> bool:
    """True when every HGMMA of the main loop waits for all earlier ones before the next issues
    (see `_main_loop_waits`)."""
    waited = _main_loop_waits(instructions)
    return bool(waited) and all(waited)


def _wgmma_waits(instructions: list[tuple[int, str]]) -> str:
    """How the main loop's MMAs wait, from the SASS (see `_main_loop_waits`):
    - "pipelined": some HGMMA is left in flight when the next one issues (`gsb0, 0x1`, or no
      wait in the loop): MMAs of one iteration overlap the next iteration's;
    - "per group": the HGMMAs of one `tl.dot` issue back to back (one k16 step each), but every
      such group is waited for before the loop goes on: no MMA crosses an iteration;
    - "per HGMMA": every HGMMA waits for the one before (serialized);
    - "none": no HGMMA.
    """
    waited = _main_loop_waits(instructions)
    if not waited:
        return "none"
    if all(waited):
        return "per HGMMA"
    # A group ends at the HGMMA that a full wait follows; "per group" when the loop's last
    # HGMMA is waited for (nothing carried into the next iteration).
    return "per group" if waited[-1] else "pipelined"


def _reductions(instructions: list[tuple[int, str]]) -> str:
    """How global atomics compiled: "none", "REDG", "ATOMG" or "fenced ATOMG" (a MEMBAR before
    an atomic, the acq_rel default of `tl.atomic_add`)."""
    texts = [text for _, text in instructions]
    atomics = [i for i, t in enumerate(texts) if re.search(r"\b(ATOMG|REDG|RED)\.", t)]
    if not atomics:
        return "none"
    if any(re.search(r"\bMEMBAR\b", texts[j]) for i in atomics for j in range(max(0, i - 8), i)):
        return FENCED
    return "ATOMG" if any("ATOMG" in texts[i] for i in atomics) else "REDG"


def _sass(cubin: bytes) -> str:
    """cuobjdump -sass of a cubin, with the cuobjdump that ships in Triton's wheel."""
    import triton
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        done = subprocess.run([tool, "-sass", f.name], capture_output=True, text=True, check=True)
    return done.stdout


def _matrix_instruction(ptx: str) -> str:
    if "wgmma.mma_async" in ptx:
        return "wgmma"
    if "mma.sync" in ptx:
        return "mma"
    return "none"


def _compile(job: tuple) -> dict:
    """One row: compile configuration `index` for `arch` with the `sizes` specialization."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    index, sizes, arch = job
    cfg = _configs[index]
    row = {"kernel": cfg.kernel, "label": cfg.label, "dtype": str(cfg.dtype).replace("torch.", ""),
           "sizes": sizes, "arch": arch, "default": cfg.default, "num_warps": cfg.num_warps,
           "num_stages": cfg.num_stages, "registers": "?", "spills": "?", "shared": "?",
           "mma": "?", "hgmma": "?", "wgmma_serialized": "?", "wgmma_waits": "?", "advisories": "?",
           "tma": "?", "reductions": "?", "expects_tma": cfg.expects_tma, "loop": cfg.loop,
           "seconds": "?", "error": ""}
    if not isinstance(cfg.fn, triton.runtime.JITFunction):
        row["error"] = "the kernel was built by the Triton interpreter (TRITON_INTERPRET is set)"
        return row
    source = ASTSource(fn=cfg.fn, signature=cfg.signature, constexprs=cfg.constexprs,
                       attrs=_attrs(cfg, sizes))
    log = io.StringIO()
    start = time.perf_counter()
    try:
        # TRITON_DUMP_PTXAS_LOG makes Triton print its own `ptxas -v` log: the registers and
        # spills of exactly this cubin, at no extra compile. A failing ptxas prints its whole
        # PTX here too, which the exception's message already summarises.
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(source, target=GPUTarget("cuda", ARCHS[arch][0], 32),
                                      options={"num_warps": cfg.num_warps,
                                               "num_stages": cfg.num_stages})
    except Exception as exc:  # a failed compile is a row of the report, never its end
        row["seconds"] = round(time.perf_counter() - start, 2)
        row["error"] = f"{type(exc).__name__}: {exc}".strip()
        return row
    row["seconds"] = round(time.perf_counter() - start, 2)
    ptxas_log, ptx = log.getvalue(), compiled.asm["ptx"]
    row["registers"], row["spills"] = _ptxas_stats(ptxas_log)
    row["shared"] = compiled.metadata.shared
    row["mma"] = _matrix_instruction(ptx)
    instructions = _sass_instructions(_sass(compiled.asm["cubin"]))
    advisories = _advisories(ptxas_log)
    row["hgmma"] = sum(_is_hgmma(text) for _, text in instructions)
    row["wgmma_serialized"] = ("yes" if "C7515" in advisories or _wgmma_serialized_in_sass(instructions)
                               else "no")
    row["wgmma_waits"] = _wgmma_waits(instructions)
    row["advisories"] = " ".join(code for code in advisories if code != "C7515") or "none"
    row["tma"] = "yes" if "cp.async.bulk.tensor" in ptx else "no"
    row["reductions"] = _reductions(instructions)
    return row


def _problems(row: dict) -> list[str]:
    """Why `row` fails the report; empty when it passes."""
    if row["error"]:
        return ["compile failed"]
    out = []
    limit = ARCHS[row["arch"]][1]
    if row["shared"] > limit:
        out.append(f"shared memory {row['shared']} > {limit}")
    if not row["default"]:
        return out
    # Unknown values ("?") fail too: a check must not pass by not looking.
    if row["spills"] != 0:
        out.append(f"default configuration spills ({row['spills']} bytes)")
    # The wgmma rules judge a main loop of MMAs (`KernelConfig.loop`): a GEMM's must keep MMAs
    # in flight across iterations; a streaming pass's may wait for each iteration's MMAs (its
    # loads in flight hide them), never for each HGMMA; a finishing kernel's loop has none.
    if row["loop"] != "partials" and row["wgmma_serialized"] != "no":
        out.append("wgmma serialized (each HGMMA of the main loop waits for the one before)")
    if row["loop"] == "gemm" and row["wgmma_waits"] not in ("pipelined", "none"):
        out.append(f"GEMM main loop waits for its MMAs {row['wgmma_waits']} (no MMA in flight "
                   "across iterations: the tensor cores idle for each step's latency)")
    if row["advisories"] != "none":
        out.append(f"ptxas performance advisories {row['advisories']}")
    if row["reductions"] not in ("none", "REDG", "ATOMG"):
        out.append(f"fp32 reductions compiled to {row['reductions']}")
    if row["expects_tma"] and row["arch"] == "sm_90" and row["tma"] != "yes":
        out.append("no TMA (cp.async.bulk.tensor) in the sm_90 tensor-descriptor path")
    return out


def _print_row(row: dict, widths: dict):
    cells = [str(row[c]).ljust(widths[c]) for c in COLUMNS if c != "error"]
    line = "  ".join(cells)
    problems = _problems(row)
    if problems:
        line += "  FAIL: " + "; ".join(problems)
    print(line, flush=True)
    if row["error"]:
        print("    " + row["error"].replace("\n", "\n    "), flush=True)


def _rerun_without_interpreter(argv: list[str]) -> int:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    print("kernel_report: TRITON_INTERPRET is set, which builds the kernels for the interpreter; "
          "re-running without it", file=sys.stderr, flush=True)
    return subprocess.run([sys.executable, "-m", "benchmarks.kernel_report", *argv],
                          env=env).returncode


def _jobs(configs, chosen, sizes, archs) -> list[tuple[int, str, str]]:
    """(configuration index, sizes, arch) of every compile. The tensor-descriptor GEMM runs only
    on sm_90 with 16-byte aligned strides: the dispatcher never launches it for sm_80 or for
    `odd` sizes, so neither is compiled."""
    return [(i, s, arch) for i in chosen for s in sizes for arch in archs
            if not configs[i].expects_tma or (arch == "sm_90" and s == "aligned")]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m benchmarks.kernel_report",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", action="append", choices=sorted(ARCHS),
                        help="target architecture, repeatable (default: sm_90)")
    subset = parser.add_mutually_exclusive_group()
    subset.add_argument("--default-only", action="store_true",
                        help="only the configurations used with ADAPTEROPS_AUTOTUNE=0")
    subset.add_argument("--quick", action="store_true",
                        help="the default configurations and one other of each kernel and dtype")
    parser.add_argument("--kernel", default="", help="only kernels whose name contains this")
    parser.add_argument("--sizes", choices=(*SIZES, "both"), default="aligned",
                        help="size and stride specialization to compile (default: aligned)")
    parser.add_argument("--jobs", type=int, default=len(os.sched_getaffinity(0)),
                        help="compiles in parallel (default: every CPU)")
    parser.add_argument("--csv", help="also write the rows to this CSV file")
    args = parser.parse_args(argv)
    if "TRITON_INTERPRET" in os.environ:
        return _rerun_without_interpreter(argv)

    archs = args.arch or ["sm_90"]
    sizes = SIZES if args.sizes == "both" else (args.sizes,)
    configs = _load_configs()
    chosen = [i for i, cfg in enumerate(configs)
              if args.kernel in cfg.kernel and (cfg.default or not args.default_only)]
    if args.quick:
        first_other = {}
        for i in chosen:
            if not configs[i].default:
                first_other.setdefault((configs[i].kernel, configs[i].dtype), i)
        chosen = [i for i in chosen if configs[i].default or i in first_other.values()]
    jobs = _jobs(configs, chosen, sizes, archs)
    if not jobs:
        print(f"no configuration matches --kernel {args.kernel!r}", file=sys.stderr)
        return 2

    import triton
    print(f"triton {triton.__version__}: {len(jobs)} compiles with {args.jobs} jobs", flush=True)
    widths = {c: len(c) for c in COLUMNS}
    widths.update(loop=len("partials"), kernel=max(len(configs[i].kernel) for i, _, _ in jobs),
                  label=max(len(configs[i].label) for i, _, _ in jobs),
                  dtype=len("bfloat16"), sizes=len("aligned"), mma=len("wgmma"), shared=6,
                  reductions=len(FENCED))
    print("  ".join(c.ljust(widths[c]) for c in COLUMNS if c != "error"), flush=True)

    rows = []
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="kernel_report_cache_") as cache:
        # The workers inherit this environment. A fresh cache makes every compile a real one
        # (a warm cache answered in 0.5 s a compile that took 2 s); fp fusion on is Triton 3.9's
        # default, set to silence its warning that the default will change.
        os.environ["TRITON_CACHE_DIR"] = cache
        os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
        os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
        # spawn, not fork: the parent has imported torch and triton, whose threads and
        # compiler state a forked child must not inherit.
        with concurrent.futures.ProcessPoolExecutor(
                args.jobs, mp_context=multiprocessing.get_context("spawn"),
                initializer=_init_worker) as pool:
            futures = [pool.submit(_compile, job) for job in jobs]
            for job, future in zip(jobs, futures):
                try:
                    row = future.result()
                except Exception as exc:  # a worker that died (e.g. a crashing compiler)
                    i, s, arch = job
                    row = {c: "?" for c in COLUMNS}
                    row.update(kernel=configs[i].kernel, label=configs[i].label, sizes=s,
                               arch=arch, default=configs[i].default,
                               expects_tma=configs[i].expects_tma, loop=configs[i].loop,
                               error=f"{type(exc).__name__}: {exc}")
                _print_row(row, widths)
                rows.append(row)
    wall = time.perf_counter() - start

    if args.csv:
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)

    compiled = [r for r in rows if not r["error"]]
    failing = [r for r in rows if _problems(r)]
    compile_seconds = sum(r["seconds"] for r in compiled)

    def counted(matching) -> str:
        """'n (d default)' for the compiled rows that match."""
        chosen = [r for r in compiled if matching(r)]
        return f"{len(chosen)} ({sum(r['default'] for r in chosen)} default)"

    print(f"{len(compiled)} compiled, {len(rows) - len(compiled)} failed, "
          f"{counted(lambda r: r['spills'] != 0)} spilling, "
          f"{sum(r['shared'] > ARCHS[r['arch']][1] for r in compiled)} over the shared-memory "
          f"limit, {sum(r['mma'] == 'wgmma' for r in compiled)} wgmma, "
          f"{counted(lambda r: r['wgmma_serialized'] != 'no')} wgmma-serialized, "
          f"{counted(lambda r: r['advisories'] != 'none')} with other advisories, "
          f"{counted(lambda r: r['reductions'] == FENCED)} with fenced reductions, "
          f"{counted(lambda r: r['tma'] == 'yes')} with TMA; "
          f"{len(failing)} failing; "
          f"{wall:.1f} s total with {args.jobs} jobs ({compile_seconds:.1f} s of compiles)")
    return 1 if failing else 0


if __name__ == "__main__":
    sys.exit(main())
