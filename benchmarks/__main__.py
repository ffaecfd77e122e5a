"""`python -m benchmarks [--quick | --headline] [--ops lamda,lora,hydra,hdpissa,hdpissa_update]
[--providers P,...] [--profile] [--fp32-precision highest|high] [--out DIR] [--device cuda|cpu]
[--dtype bf16|fp16|fp32]`: runs the microbenchmarks (ops: lamda and lora in
benchmarks/lowrank.py, hydra in benchmarks/routed.py, hdpissa and hdpissa_update in
benchmarks/hdpissa.py), writes DIR/results.csv, DIR/summary.md and, when matplotlib is
installed, PNG plots (benchmarks/plots.py) into DIR (default:
benchmarks/results/<device>-<YYYY-MM-DD>/) and prints the summary. `--headline` runs only the
shapes the targets (docs/performance.md) are stated at (small stand-ins on CPU); `--profile` also writes
DIR/profile.csv and DIR/profile.md, every kernel each timed call launches (harness.py).

On a machine without a GPU the run sets TRITON_INTERPRET=1 and ADAPTEROPS_CSRC_ON_CPU=1 (unless
already set), so the `triton` provider runs under the Triton interpreter and the `cuda` provider
runs the host build of its C++ on CPU tensors: their times measure the emulator and ATen's CPU
GEMMs, not the GPU kernels. A provider that cannot run gives rows with the reason in `error`.
"""
import argparse
import datetime
import importlib.util
import os
from pathlib import Path

import torch

from . import harness, hdpissa, lowrank, overhead, routed

# Adding an op: write its benchmark file (see lowrank.py) and list its BENCHMARKS here.
BENCHMARKS = {bench.name: bench
              for bench in (lowrank.BENCHMARKS + routed.BENCHMARKS + hdpissa.BENCHMARKS
                            + overhead.BENCHMARKS)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks",
                                     description=__doc__.split("\n\n")[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true",
                      help="a few small cases (seconds on a GPU, minutes on a CPU)")
    size.add_argument("--headline", action="store_true",
                      help="only the shapes the targets are stated at (tiny stand-ins on CPU)")
    parser.add_argument("--ops", default=",".join(BENCHMARKS),
                        help=f"comma-separated, from {', '.join(BENCHMARKS)} (default: all)")
    providers = sorted({p for bench in BENCHMARKS.values() for p in bench.providers})
    parser.add_argument("--providers",
                        help=f"comma-separated, from {', '.join(providers)} (default: each op's "
                             "own; an op skips those it does not have)")
    parser.add_argument("--profile", action="store_true",
                        help="also profile every timed call's launches (profile.csv, profile.md)")
    parser.add_argument("--fp32-precision", choices=("highest", "high"),
                        help="torch.set_float32_matmul_precision for the run (default: leave "
                             "torch's setting); recorded in every row")
    parser.add_argument("--cpu-budget-s", type=float, default=0.3,
                        help="CPU only: seconds of timed calls per measurement (at least "
                             f"{harness.CPU_MIN_REPS} calls)")
    parser.add_argument("--out", type=Path, help="output folder")
    parser.add_argument("--device", choices=("cuda", "cpu"),
                        default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=tuple(harness.DTYPES), default="bf16")
    args = parser.parse_args(argv)
    names = [name for name in args.ops.split(",") if name]
    unknown = [name for name in names if name not in BENCHMARKS]
    if unknown or not names:
        parser.error(f"--ops: unknown {', '.join(unknown) or '(none given)'}; "
                     f"known: {', '.join(BENCHMARKS)}")
    chosen = None
    if args.providers is not None:
        chosen = [name for name in args.providers.split(",") if name]
        unknown = [name for name in chosen if name not in providers]
        if unknown or not chosen:
            parser.error(f"--providers: unknown {', '.join(unknown) or '(none given)'}; "
                         f"known: {', '.join(providers)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    if args.device == "cpu" and not torch.cuda.is_available():
        # Without a GPU the triton provider can only run under the interpreter, set before
        # adapterops first imports its kernels (here, before any case runs). Its times measure
        # the emulator, not the kernels; they show the provider works end to end. Likewise the
        # cuda provider runs its C++ on CPU tensors (the host build, compiled on first use).
        os.environ.setdefault("TRITON_INTERPRET", "1")
        os.environ.setdefault("ADAPTEROPS_CSRC_ON_CPU", "1")
    out_dir = args.out or (Path(__file__).parent / "results"
                           / f"{args.device}-{datetime.date.today().isoformat()}")
    if args.fp32_precision is not None:
        torch.set_float32_matmul_precision(args.fp32_precision)
    benchmarks = [BENCHMARKS[name] for name in names]
    profile = [] if args.profile else None

    def after_case(rows_so_far):
        # results.csv (and profile.*) are rewritten after every case, so a run cut short (a
        # time limit on a borrowed GPU) keeps what it measured; summary and plots come last.
        harness.write_csv(rows_so_far, out_dir)
        if profile is not None:
            harness.write_profile(profile, out_dir)

    rows = harness.run(benchmarks, device=args.device, dtype=harness.DTYPES[args.dtype],
                       quick=args.quick, headline=args.headline, providers=chosen,
                       profile=profile, cpu_budget_s=args.cpu_budget_s, after_case=after_case)
    summary = harness.summary_markdown(rows, benchmarks)
    harness.write_results(rows, summary, out_dir)
    print()
    print(summary)
    print(f"Wrote {out_dir / 'results.csv'} and {out_dir / 'summary.md'}")
    _plot(out_dir)


def _plot(out_dir: Path) -> None:
    """The PNGs, or one line saying why there are none: plots never fail a finished run."""
    if importlib.util.find_spec("matplotlib") is None:
        print("Plots skipped: matplotlib is not installed (pip install -e '.[plot]'; then "
              f"python -m benchmarks.plots {out_dir})")
        return
    from . import plots
    try:
        written = plots.plot_results(out_dir / "results.csv", out_dir)
    except Exception as exc:  # the CSV and summary are written; report and keep them
        print(f"Plots failed ({type(exc).__name__}: {exc}); results.csv and summary.md are "
              "complete")
        return
    print(f"Wrote {len(written)} plots: {', '.join(path.name for path in written)}")


if __name__ == "__main__":
    main()
