"""The README's Python blocks run as written.

Every fenced block whose info string is exactly ``python`` is executed, in README order, in ONE
shared namespace (later blocks use the names earlier ones define), with a temporary directory
as the working directory, so the files the blocks write land there. A block fenced
```` ```python no-run ```` is a script that needs what a test machine lacks (``torchrun``,
several processes, NCCL): it is only compiled, not run. Any other info string (``bash``, ...)
is ignored.

The blocks run in a subprocess (this file run as a script), so that their global state (seeds,
imported modules, the Trainer's logging) does not leak into the other tests, with the
environment the tests have (``tests/conftest.py`` sets ``TRITON_INTERPRET=1`` on CPU, so the
fused ops run the Triton kernels under the interpreter) less ``ADAPTEROPS_CSRC_ON_CPU``, whose
just-in-time C++ build is no part of what a README reader runs. A block that raises fails the
test with its number, its line in README.md and its first line; the traceback points at
README.md's own line numbers.

    python tests/test_readme.py [README.md]     # the same run, by hand, in the current directory
"""
import os
import re
import subprocess
import sys
import traceback
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"
RUN, NO_RUN = "python", "python no-run"
FENCE = re.compile(r"^```(?!`)(.*)$")   # an opening fence of exactly three backticks


def python_blocks(text: str) -> list[tuple[int, str, str]]:
    """(line of the block's first code line in the file, info string, code) of every
    ```python and ```python no-run block, in order."""
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if opening is None:
            i += 1
            continue
        info, start = opening.group(1).strip(), i + 1
        end = start
        while end < len(lines) and lines[end].rstrip() != "```":
            end += 1
        if end == len(lines):
            raise ValueError(f"README.md line {i + 1}: the ```{info} block is never closed")
        if info in (RUN, NO_RUN):
            blocks.append((start + 1, info, "\n".join(lines[start:end]) + "\n"))
        elif info.startswith("python"):
            raise ValueError(f"README.md line {i + 1}: unknown info string ```{info} "
                             f"(use ```{RUN} or ```{NO_RUN})")
        i = end + 1
    return blocks


def _first_line(code: str) -> str:
    return next((line.strip() for line in code.splitlines() if line.strip()), "")


def run_blocks(readme: Path) -> int:
    """Runs the README's python blocks in one namespace in the current directory; returns the
    exit status (1 and a report on stderr for the first block that raises)."""
    blocks = [b for b in python_blocks(readme.read_text()) if b[1] == RUN]
    namespace = {"__name__": "__readme__"}
    for number, (line, _, code) in enumerate(blocks, 1):
        # Padded so that line numbers in tracebacks are README.md's.
        source = compile("\n" * (line - 1) + code, str(readme), "exec")
        try:
            exec(source, namespace)
        except BaseException:
            traceback.print_exc()
            print(f"README block {number} of {len(blocks)} ({readme.name} line {line}: "
                  f"{_first_line(code)!r}) raised", file=sys.stderr)
            return 1
        print(f"README block {number} of {len(blocks)} (line {line}) ran", flush=True)
    return 0


def test_readme_blocks_are_marked():
    blocks = python_blocks(README.read_text())
    run = [b for b in blocks if b[1] == RUN]
    no_run = [b for b in blocks if b[1] == NO_RUN]
    assert len(run) >= 10, f"only {len(run)} ```python blocks in README.md"
    assert len(no_run) <= 2, "keep the ```python no-run blocks few"
    for line, _, code in no_run:  # not run, but at least valid Python
        compile("\n" * (line - 1) + code, str(README), "exec")


def test_readme_python_blocks_run(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "ADAPTEROPS_CSRC_ON_CPU"}
    env.setdefault("HF_HUB_OFFLINE", "1")   # nothing is downloaded: the models are built from configs
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    result = subprocess.run([sys.executable, str(Path(__file__).resolve()), str(README)],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        report = result.stderr.strip().splitlines()
        summary = report[-1] if report else f"exit status {result.returncode}"
        raise AssertionError(f"{summary}\n\n--- stderr ---\n{result.stderr[-6000:]}"
                             f"\n--- stdout ---\n{result.stdout[-3000:]}")


if __name__ == "__main__":
    sys.exit(run_blocks(Path(sys.argv[1]) if len(sys.argv) > 1 else README))
