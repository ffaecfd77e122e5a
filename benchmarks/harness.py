"""The op-agnostic benchmark harness: timing, measurement, the CSV and the summary.

An op's benchmark file (`benchmarks/lowrank.py` is the model) declares one `OpBenchmark` per
op: its cases (shapes), its providers (the implementations timed side by side, the floor
first), its modes and, per provider, a `Workload`: the forward to run, the tensors backward
differentiates, the weights, and the op's FLOP and byte counts. The harness runs every
case x provider x mode and writes one long-format row per measurement (`COLUMNS`).

What each column measures:
- mode: `fwd` is the forward with autograd recording, as in training (it builds the graph and
  saves what backward needs); `bwd` is backward alone, `torch.autograd.grad(y, inputs, dy,
  retain_graph=True)` repeated on one retained graph; `fwdbwd` is one forward then its backward.
  These three are an op's modes by default (`MODES`). `update` (an op that declares it, such
  as HD-PiSSA's weight update) is the workload's call alone under `torch.no_grad()`: no graph,
  no backward; it may change the workload's tensors in place, every call.
- p20_ms, p50_ms, p80_ms: on CUDA from `triton.testing.do_bench` (it flushes the L2 cache
  before every call); on CPU from a timed loop: warm-up calls (at least one, for lazy
  initialisation and Triton's first-call work, up to `CPU_WARMUP_S`), then calls until
  `cpu_budget_s` has passed (at least `CPU_MIN_REPS`, at most `CPU_MAX_REPS`), each timed
  with `time.perf_counter`. An op may declare its own `timer` instead (benchmarks/overhead.py:
  host time per call, batched).
- tflops, gbps: the workload's FLOPs and minimum bytes (inputs read once, outputs written once;
  the op file documents its model) divided by the p50 time. fwdbwd counts fwd + bwd; update
  counts the workload's forward counts (its call is the update).
- peak_mem_mb: CUDA only: `torch.cuda.max_memory_allocated` during one call minus what was
  allocated before it, so inputs, weights and (for bwd) the retained graph are not counted.
- fp32_precision: `torch.get_float32_matmul_precision()` during the run ("highest": full fp32
  matmuls; "high": TF32 allowed, in cuBLAS and in our kernels alike).
- saved_mb: the bytes autograd saves for backward during one forward, counted with
  `torch.autograd.graph.saved_tensors_hooks` over distinct storages. The workload's weights are
  not counted (they live whether or not backward runs); its input activation x is, because in a
  network x is the previous layer's output, kept alive only if some layer saves it. Empty in
  an op without autograd modes (only `update`): nothing is recorded.
MB means 2^20 bytes throughout.

Launch profiles (`run(..., profile=[])`): after a (case, provider, mode) is timed, three more
calls run under `torch.profiler`, and every kernel they launch becomes one row of
`PROFILE_COLUMNS`: launches and device time per call, its share of the call's device time, and
the timed p50 beside it (device time well below p50 means the host, not the GPU, sets the
pace). On CPU the rows are the ATen ops with the most self time instead of kernels.

A provider that cannot run (an unsupported device, a missing package, out of memory) gives
rows whose `error` column says why, and the sweep goes on.
"""
import csv
import dataclasses
import datetime
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy
import torch
from torch import Tensor

MODES = ("fwd", "bwd", "fwdbwd")  # an op's modes unless it declares its own
UPDATE = "update"                   # the workload's call alone, without autograd
KNOWN_MODES = MODES + (UPDATE,)
QUANTILES = (0.2, 0.5, 0.8)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
MB = 2 ** 20
CPU_WARMUP_S = 0.05
CPU_MIN_REPS = 3
CPU_MAX_REPS = 100
COLUMNS = ("op", "provider", "mode", "M", "K", "N", "r", "heads", "world", "dtype", "device",
           "device_name", "fp32_precision", "p20_ms", "p50_ms", "p80_ms", "tflops", "gbps", "peak_mem_mb",
           "saved_mb", "error", "git_sha", "torch", "triton", "timestamp")
SHAPE_COLUMNS = ("M", "K", "N", "r", "heads", "world")
PROFILE_COLUMNS = ("op", "provider", "mode", "case", "device", "fp32_precision", "kernel",
                   "launches_per_call", "device_us_per_call", "share", "call_device_us",
                   "p50_us")
PROFILE_CALLS = 3
CPU_PROFILE_TOP = 12  # on CPU: the ops with the most self time


@dataclasses.dataclass(frozen=True)
class Case:
    """One shape: M tokens, K = in_features, N = out_features, rank r; heads (HydraLoRA) and
    world (HD-PiSSA ranks) only for the ops that have them; M None for an op without tokens
    (HD-PiSSA's weight update)."""
    M: Optional[int]
    K: int
    N: int
    r: int
    heads: Optional[int] = None
    world: Optional[int] = None

    def label(self) -> str:
        return " ".join(f"{name}={getattr(self, name)}" for name in SHAPE_COLUMNS
                        if getattr(self, name) is not None)


@dataclasses.dataclass
class Workload:
    """One provider's computation on one case's freshly made tensors. For an `update` op,
    forward is the update call (its result is ignored), grad_inputs is empty and the fwd_
    counts are the update's."""
    forward: Callable[[], Tensor]   # returns the output y
    grad_inputs: tuple[Tensor, ...]  # what backward differentiates (x and the trainable weights)
    weights: tuple[Tensor, ...]      # every weight it reads: not counted in saved_mb
    fwd_flops: float
    bwd_flops: float
    fwd_bytes: float
    bwd_bytes: float

    def flops(self, mode: str) -> float:
        both = self.fwd_flops + self.bwd_flops
        by_mode = {"fwd": self.fwd_flops, UPDATE: self.fwd_flops, "bwd": self.bwd_flops}
        return by_mode.get(mode, both)

    def io_bytes(self, mode: str) -> float:
        both = self.fwd_bytes + self.bwd_bytes
        by_mode = {"fwd": self.fwd_bytes, UPDATE: self.fwd_bytes, "bwd": self.bwd_bytes}
        return by_mode.get(mode, both)


@dataclasses.dataclass(frozen=True)
class OpBenchmark:
    """What an op's benchmark file declares.

    cases(quick, device_type) lists the shapes; headline(device_type), when given, the one or
    two shapes the op's targets are stated at (on CPU: small stand-ins, for a dry run);
    workload(provider, case, dtype, device) makes
    fresh tensors and returns the provider's `Workload` (it raises when the provider cannot
    run: the message becomes the rows' error). `baseline` is the provider every other is
    divided by in the summary; `speedups` are the (fast, slow) pairs whose ratio it shows;
    `modes` are the modes timed, from `KNOWN_MODES` (default `MODES`); `dtype`, when set, is
    the dtype the op always runs in (its rows record it instead of the run's); `timer`, when
    set, replaces the default timing: timer(fn, device, cpu_budget_s) returns the p20, p50
    and p80 ms of one call of fn.
    """
    name: str
    cases: Callable[[bool, str], list[Case]]
    providers: tuple[str, ...]
    workload: Callable[[str, Case, torch.dtype, torch.device], Workload]
    baseline: str
    speedups: tuple[tuple[str, str], ...] = ()
    modes: tuple[str, ...] = MODES
    dtype: Optional[torch.dtype] = None  # an op whose tensors ignore the run's dtype (fp32 master weights)
    headline: Optional[Callable[[str], list[Case]]] = None
    timer: Optional[Callable[[Callable, torch.device, float], list[float]]] = None

    def __post_init__(self):
        unknown = [mode for mode in self.modes if mode not in KNOWN_MODES]
        if unknown or not self.modes:
            raise ValueError(f"{self.name}: modes {self.modes}; known: {KNOWN_MODES}")

    @property
    def uses_autograd(self) -> bool:
        return any(mode in MODES for mode in self.modes)


def make_tensor(*shape: int, fan_in: int, dtype: torch.dtype, device: torch.device,
                trainable: bool = False) -> Tensor:
    """A benchmark tensor: standard normal scaled by 1/sqrt(fan_in), so that a layer's output
    stays O(1) and finite in bf16 (fan_in=1 for activations and biases)."""
    t = torch.randn(*shape, dtype=dtype, device=device) / fan_in ** 0.5
    return t.requires_grad_(trainable)


def _time_cuda(fn: Callable) -> list[float]:
    from triton.testing import do_bench
    return list(do_bench(fn, quantiles=list(QUANTILES)))


def _time_cpu(fn: Callable, budget_s: float) -> list[float]:
    start = time.perf_counter()
    fn()
    while time.perf_counter() - start < CPU_WARMUP_S:
        fn()
    times_ms = []
    start = time.perf_counter()
    while len(times_ms) < CPU_MIN_REPS or (len(times_ms) < CPU_MAX_REPS
                                          and time.perf_counter() - start < budget_s):
        t0 = time.perf_counter()
        fn()
        times_ms.append((time.perf_counter() - t0) * 1e3)
    return [float(q) for q in numpy.quantile(times_ms, QUANTILES)]


def _peak_mem_mb(fn: Callable) -> float:
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / MB


def profile_launches(fn: Callable, device: torch.device) -> list[tuple[str, float, float]]:
    """(kernel, launches per call, device us per call) of everything `PROFILE_CALLS` calls of
    fn launch, most time first; on CPU the `CPU_PROFILE_TOP` ATen ops with the most self CPU
    time instead. fn is called once before, so that first-call work (compiles, autotuning,
    allocator growth) is not profiled."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    on_cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if on_cuda else (lambda: None)
    fn()
    sync()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(PROFILE_CALLS):
            fn()
        sync()
    launches = []
    for event in prof.key_averages():
        if on_cuda:
            if event.device_type != DeviceType.CUDA:
                continue
            # torch >= 2.4 names it self_device_time_total; self_cuda_time_total before.
            total_us = getattr(event, "self_device_time_total", None)
            if total_us is None:
                total_us = event.self_cuda_time_total
        else:
            total_us = event.self_cpu_time_total
        if total_us > 0:
            launches.append((event.key, event.count / PROFILE_CALLS, total_us / PROFILE_CALLS))
    launches.sort(key=lambda launch: -launch[2])
    return launches if on_cuda else launches[:CPU_PROFILE_TOP]


def _forward_saving(workload: Workload) -> tuple[Tensor, int]:
    """Runs one forward; returns its output (graph attached) and the bytes autograd saved."""
    weights = {w.untyped_storage().data_ptr() for w in workload.weights}
    saved: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = workload.forward()
    return y, sum(saved.values())


@dataclasses.dataclass
class Prepared:
    """A provider's workload on one case after one recorded forward (or, for an op without
    autograd modes, one call): what every mode times."""
    workload: Workload
    y: Optional[Tensor]          # the recorded forward's output, its graph retained for `bwd`
    dy: Optional[Tensor]         # the output gradient backward is given
    saved_bytes: Optional[int]   # what that forward saved for backward (see saved_mb)

    def mode_fn(self, mode: str) -> Callable:
        """The call that `mode` times."""
        workload, y, dy = self.workload, self.y, self.dy
        if mode == "fwd":
            return workload.forward
        if mode == UPDATE:
            return torch.no_grad()(workload.forward)
        if mode == "bwd":
            return lambda: torch.autograd.grad(y, workload.grad_inputs, dy, retain_graph=True)
        return lambda: torch.autograd.grad(workload.forward(), workload.grad_inputs, dy)


def prepare(bench: OpBenchmark, provider: str, case: Case, dtype: torch.dtype,
            device: torch.device) -> Prepared:
    """Makes the provider's workload from the same seed every provider gets and runs one
    forward (recorded, or for an op without autograd modes one `update` call); raises whatever
    stops the provider from running."""
    torch.manual_seed(0)
    workload = bench.workload(provider, case, dtype, device)
    if not bench.uses_autograd:
        with torch.no_grad():
            workload.forward()
        return Prepared(workload, None, None, None)
    y, saved = _forward_saving(workload)
    return Prepared(workload, y, torch.randn_like(y), saved)


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".replace("\n", " ")


def _git_sha() -> str:
    repo = Path(__file__).resolve().parents[1]
    try:
        sha = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short=12", "HEAD"],
                             capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo), "diff", "--quiet", "HEAD"]).returncode != 0
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return sha + ("-dirty" if dirty else "")


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _dtype_name(dtype: torch.dtype) -> str:
    return next(k for k, v in DTYPES.items() if v == dtype)


def _environment(device: torch.device, dtype: torch.dtype) -> dict:
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = ""
    if device.type == "cuda":
        device_name = torch.cuda.get_device_name(device)
    else:
        device_name = _cpu_name()
    return {"dtype": _dtype_name(dtype), "device": device.type,
            "device_name": device_name,
            "fp32_precision": torch.get_float32_matmul_precision(), "git_sha": _git_sha(), "torch": torch.__version__,
            "triton": triton_version,
            "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def _measure(bench: OpBenchmark, provider: str, case: Case, dtype: torch.dtype,
             device: torch.device, cpu_budget_s: float, base_row: dict,
             profile: Optional[list]) -> list[dict]:
    """The rows of one (case, provider): one per mode; with a `profile` list, each timed
    mode's launch rows are appended to it."""
    rows = [{**base_row, "provider": provider, "mode": mode} for mode in bench.modes]
    # Any exception is a reason to record, not a crash: a sweep over many cases must finish,
    # and a provider that cannot serve a case must still show up in the table.
    try:
        prepared = prepare(bench, provider, case, dtype, device)
    except Exception as exc:
        for row in rows:
            row["error"] = _describe(exc)
        return rows
    for row in rows:
        mode = row["mode"]
        if prepared.saved_bytes is not None:
            row["saved_mb"] = prepared.saved_bytes / MB
        try:
            fn = prepared.mode_fn(mode)
            if bench.timer is not None:
                p20, p50, p80 = bench.timer(fn, device, cpu_budget_s)
            elif device.type == "cuda":
                p20, p50, p80 = _time_cuda(fn)
            else:
                p20, p50, p80 = _time_cpu(fn, cpu_budget_s)
            if device.type == "cuda":
                row["peak_mem_mb"] = _peak_mem_mb(fn)
        except Exception as exc:
            row["error"] = _describe(exc)
            continue
        row.update(p20_ms=p20, p50_ms=p50, p80_ms=p80,
                   tflops=prepared.workload.flops(mode) / (p50 * 1e-3) / 1e12,
                   gbps=prepared.workload.io_bytes(mode) / (p50 * 1e-3) / 1e9)
        if profile is not None:
            profile += _profile_rows(row, case, fn, device)
    return rows


def _profile_rows(row: dict, case: Case, fn: Callable, device: torch.device) -> list[dict]:
    """`PROFILE_COLUMNS` rows of one timed (case, provider, mode); one row with the error in
    `kernel` when profiling fails (the timing stands)."""
    common = {"op": row["op"], "provider": row["provider"], "mode": row["mode"],
              "case": case.label(), "device": row["device"],
              "fp32_precision": row["fp32_precision"], "p50_us": row["p50_ms"] * 1e3}
    try:
        launches = profile_launches(fn, device)
    except Exception as exc:
        return [{**common, "kernel": f"profiling failed: {_describe(exc)}"}]
    call_us = sum(us for _, _, us in launches)
    return [{**common, "kernel": name, "launches_per_call": count, "device_us_per_call": us,
             "share": us / call_us, "call_device_us": call_us} for name, count, us in launches]


def run(benchmarks: Sequence[OpBenchmark], *, device: str, dtype: torch.dtype, quick: bool,
        cpu_budget_s: float = 0.3, headline: bool = False,
        providers: Optional[Sequence[str]] = None, profile: Optional[list] = None,
        after_case: Optional[Callable[[list[dict]], None]] = None) -> list[dict]:
    """Measures every case of every benchmark (with `headline`, its headline cases instead)
    with every provider (or those of `providers` it has) in every mode; prints one progress
    line per case ([i/n], its time, the total so far and an ETA that assumes the remaining
    cases take the mean time of those done), calls `after_case(rows so far)` after each case,
    and returns the rows (dicts keyed by `COLUMNS`). With a `profile` list, the launch rows of
    every timed mode (`PROFILE_COLUMNS`) are appended to it as they are measured."""
    device = torch.device(device)
    env = _environment(device, dtype)
    plan = [(bench, case) for bench in benchmarks
            for case in (bench.headline(device.type) if headline and bench.headline
                         else [] if headline else bench.cases(quick, device.type))]
    print(f"{len(plan)} cases on {env['device']} ({env['device_name']}), {env['dtype']}, torch "
          f"{env['torch']}, triton {env['triton'] or '-'}, TRITON_INTERPRET="
          f"{os.environ.get('TRITON_INTERPRET', '')!r}, ADAPTEROPS_CSRC_ON_CPU="
          f"{os.environ.get('ADAPTEROPS_CSRC_ON_CPU', '')!r}", flush=True)
    rows = []
    run_start = time.perf_counter()
    for index, (bench, case) in enumerate(plan, 1):
        start = time.perf_counter()
        base_row = {column: None for column in COLUMNS}
        op_dtype = bench.dtype or dtype
        base_row.update(env, op=bench.name, dtype=_dtype_name(op_dtype), **dataclasses.asdict(case))
        case_rows = []
        for provider in bench.providers:
            if providers is not None and provider not in providers:
                continue
            case_rows += _measure(bench, provider, case, op_dtype, device, cpu_budget_s, base_row,
                                  profile)
            if device.type == "cuda":
                torch.cuda.empty_cache()  # the next provider's tensors start from a clean pool
        errors = sum(row["error"] is not None for row in case_rows)
        now = time.perf_counter()
        elapsed = now - run_start
        eta = elapsed / index * (len(plan) - index)
        print(f"[{index}/{len(plan)}] {bench.name} {case.label()}: {len(case_rows)} rows, "
              f"{errors} errors, {now - start:.1f} s; elapsed {_duration(elapsed)}, "
              f"ETA {_duration(eta)}", flush=True)
        rows += case_rows
        if after_case is not None:
            after_case(rows)
    return rows


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(round(seconds), 60)
    return f"{minutes}:{seconds:02d}"


def _cell(value: Optional[float], fmt: str = ".4g") -> str:
    return "" if value is None else format(value, fmt)


def summary_markdown(rows: Sequence[dict], benchmarks: Sequence[OpBenchmark]) -> str:
    """One table per (op, mode): per shape, each provider's p50 ms and its ratio to the
    baseline, the declared speed-ups, and each provider's saved MB (in an `update` table, where
    nothing is saved, its GB/s instead: the bandwidth an update's target is stated in)."""
    if not rows:
        return "# Benchmark summary\n\nNo rows.\n"
    first = rows[0]
    lines = ["# Benchmark summary", "",
             f"{first['device']} ({first['device_name']}), {first['dtype']}, "
             f"fp32 matmul precision {first['fp32_precision']}, torch {first['torch']}, "
             f"triton {first['triton'] or '-'}, git {first['git_sha']}, {first['timestamp']}", "",
             "Cells: p50 ms (ratio to the baseline). 'a vs b': p50 of b / p50 of a (above 1: a is "
             "faster). saved MB: activations autograd keeps for backward. GB/s (update tables): "
             "the op's byte model over p50.", ""]
    for bench in benchmarks:
        for mode in bench.modes:
            table = [row for row in rows if row["op"] == bench.name and row["mode"] == mode]
            if not table:
                continue
            shape_columns = [c for c in SHAPE_COLUMNS if any(row[c] is not None for row in table)]
            extra, extra_title, extra_fmt = (("gbps", "GB/s", ".4g") if mode == UPDATE
                                             else ("saved_mb", "saved MB", ".3g"))
            by_shape: dict[tuple, dict[str, dict]] = {}
            for row in table:
                by_shape.setdefault(tuple(row[c] for c in shape_columns), {})[row["provider"]] = row
            header = (shape_columns + list(bench.providers)
                      + [f"{fast} vs {slow}" for fast, slow in bench.speedups]
                      + [f"{extra_title} {p}" for p in bench.providers])
            lines += [f"## {bench.name} {mode}", "", "| " + " | ".join(header) + " |",
                      "|" + "---|" * len(header)]
            for shape, by_provider in by_shape.items():
                p50 = {p: by_provider[p]["p50_ms"] for p in bench.providers if p in by_provider}
                base = p50.get(bench.baseline)
                cells = [str(v) for v in shape]
                for provider in bench.providers:
                    if provider not in by_provider:
                        cells.append("")
                    elif p50[provider] is None:
                        cells.append("error")
                    elif provider == bench.baseline or base is None:
                        cells.append(_cell(p50[provider]))
                    else:
                        cells.append(f"{_cell(p50[provider])} ({p50[provider] / base:.3g}x)")
                for fast, slow in bench.speedups:
                    ok = p50.get(fast) is not None and p50.get(slow) is not None
                    cells.append(f"{p50[slow] / p50[fast]:.3g}x" if ok else "")
                cells += [_cell(by_provider.get(p, {}).get(extra), extra_fmt)
                          for p in bench.providers]
                lines.append("| " + " | ".join(cells) + " |")
            lines.append("")
    errors: dict[tuple, int] = {}
    for row in rows:
        if row["error"] is not None:
            key = (row["op"], row["provider"], row["error"])
            errors[key] = errors.get(key, 0) + 1
    if errors:
        lines += ["## Errors", ""]
        lines += [f"- {op} / {provider} ({count} rows): {error}"
                  for (op, provider, error), count in errors.items()]
        lines.append("")
    return "\n".join(lines)


def write_csv(rows: Sequence[dict], out_dir: Path) -> None:
    """Writes `results.csv` (one row per measurement, `COLUMNS`, empty for None) into out_dir,
    replacing an earlier one."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows({k: ("" if v is None else v) for k, v in row.items()} for row in rows)


def write_profile(profile: Sequence[dict], out_dir: Path) -> None:
    """Writes `profile.csv` (`PROFILE_COLUMNS`) and `profile.md` (one table per timed case,
    provider and mode) into out_dir, replacing earlier ones."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "profile.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=PROFILE_COLUMNS)
        writer.writeheader()
        writer.writerows({k: ("" if v is None else v) for k, v in row.items()} for row in profile)
    lines = ["# Launch profile", "",
             f"Every kernel {PROFILE_CALLS} calls launched (after one unprofiled call), per call: "
             "launches, device time and its share of the call's device time. 'device' below "
             "each title: the sum of the call's kernel times, next to the timed p50 (on CUDA "
             "the p50 flushes L2 before each call, the profiled calls do not). On CPU: the "
             "ATen ops with the most self time.", ""]
    groups: dict[tuple, list[dict]] = {}
    for row in profile:
        key = tuple(row[c] for c in ("op", "case", "mode", "provider", "fp32_precision"))
        groups.setdefault(key, []).append(row)
    for (op, case, mode, provider, precision), group in groups.items():
        first = group[0]
        lines.append(f"## {op} {case} {mode} {provider} (fp32 {precision})")
        lines.append("")
        if first.get("call_device_us") is None:
            lines += [first["kernel"], ""]
            continue
        lines += [f"device {first['call_device_us']:.1f} us per call, p50 {first['p50_us']:.1f} us",
                  "", "| kernel | launches | us | share |", "|---|---|---|---|"]
        lines += [f"| `{row['kernel'][:90]}` | {row['launches_per_call']:.3g} | "
                  f"{row['device_us_per_call']:.1f} | {row['share']:.1%} |" for row in group]
        lines.append("")
    (out_dir / "profile.md").write_text("\n".join(lines))


def write_results(rows: Sequence[dict], summary: str, out_dir: Path) -> None:
    """Writes `results.csv` and `summary.md` into out_dir, replacing earlier ones."""
    write_csv(rows, out_dir)
    (out_dir / "summary.md").write_text(summary)
