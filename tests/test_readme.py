"""The documentation's Python blocks run as written, and its relative links lead somewhere.

The documents are README.md and every docs/*.md. Each runs as its own program: its fenced
blocks whose info string is exactly ``python`` are executed in the document's order, in ONE
namespace per document (later blocks use the names earlier ones define; a page defines what it
uses, as a reader copying from that one page would need), in a process of its own, so that
global state (seeds, the Trainer's logging) leaks neither between documents nor into the other
tests, with a temporary directory as the working directory, so the files the blocks write land
there. A block fenced ```` ```python no-run ```` is a script that needs what a test machine
lacks (``torchrun``, several processes, NCCL): it is only compiled, not run. Any other info
string (``bash``, ...) is ignored. Every relative link must name an existing file, and its
``#anchor`` a heading of that file.

The documents' processes are forked, one per document, from one server subprocess (this file
run with ``--serve``) that has imported torch, adapterops and transformers' LLaMA once
(``PRELOAD``): that import is about 4 s of CPU, which a fresh interpreter per page would pay
again for every page. The server has the environment the tests have (``tests/conftest.py``
sets ``TRITON_INTERPRET=1`` on CPU, so the fused ops run the Triton kernels under the
interpreter) less ``ADAPTEROPS_CSRC_ON_CPU``, whose just-in-time C++ build is no part of what a
reader runs. A block that raises fails the test with the document's name, the block's number,
its line in the document and its first line; the traceback points at the document's own line
numbers.

    python tests/test_readme.py [FILE.md]     # one document, by hand, in the current directory
"""
import importlib
import os
import re
import select
import signal
import subprocess
import sys
import traceback
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCUMENTS = [README, *sorted((ROOT / "docs").glob("*.md"))]
RUN, NO_RUN = "python", "python no-run"
FENCE = re.compile(r"^```(?!`)(.*)$")   # an opening fence of exactly three backticks
# [text](target) or [text](target "title"); images too (the leading ! is not needed to match).
LINK = re.compile(r"\[[^\]]*\]\(\s*([^)\s]+)(?:\s+\"[^\"]*\")?\s*\)")
SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")   # https:, mailto:, ...
# What the server imports before it forks a document's process: what nearly every page imports.
PRELOAD = ("torch", "adapterops", "transformers.models.llama.modeling_llama")
TIMEOUT_S = 600   # per document


def _name(path: Path) -> str:
    return path.relative_to(ROOT).as_posix() if path.is_relative_to(ROOT) else path.name


def fenced_blocks(text: str, name: str) -> list[tuple[int, int, str]]:
    """(index of the opening fence's line, index of the closing fence's line, info string) of
    every fenced block, in order."""
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if opening is None:
            i += 1
            continue
        end = i + 1
        while end < len(lines) and lines[end].rstrip() != "```":
            end += 1
        if end == len(lines):
            raise ValueError(f"{name} line {i + 1}: the ```{opening.group(1).strip()} block is "
                             "never closed")
        blocks.append((i, end, opening.group(1).strip()))
        i = end + 1
    return blocks


def python_blocks(text: str, name: str = "README.md") -> list[tuple[int, str, str]]:
    """(line of the block's first code line in the file, info string, code) of every
    ```python and ```python no-run block, in order."""
    lines, blocks = text.splitlines(), []
    for opening, closing, info in fenced_blocks(text, name):
        if info in (RUN, NO_RUN):
            blocks.append((opening + 2, info, "\n".join(lines[opening + 1:closing]) + "\n"))
        elif info.startswith("python"):
            raise ValueError(f"{name} line {opening + 1}: unknown info string ```{info} "
                             f"(use ```{RUN} or ```{NO_RUN})")
    return blocks


def _first_line(code: str) -> str:
    return next((line.strip() for line in code.splitlines() if line.strip()), "")


def run_blocks(document: Path) -> int:
    """Runs the document's python blocks in one namespace in the current directory; returns
    the exit status (1 and a report on stderr for the first block that raises)."""
    name = _name(document.resolve())
    blocks = [b for b in python_blocks(document.read_text(), name) if b[1] == RUN]
    namespace = {"__name__": "__readme__"}
    for number, (line, _, code) in enumerate(blocks, 1):
        # Padded so that line numbers in tracebacks are the document's.
        source = compile("\n" * (line - 1) + code, str(document), "exec")
        try:
            exec(source, namespace)
        except BaseException:
            traceback.print_exc()
            print(f"{name} block {number} of {len(blocks)} (line {line}: {_first_line(code)!r}) "
                  "raised", file=sys.stderr)
            return 1
        print(f"{name} block {number} of {len(blocks)} (line {line}) ran", flush=True)
    return 0


def _runnable(document: Path) -> bool:
    return any(info == RUN for _, info, _ in python_blocks(document.read_text(), _name(document)))


@pytest.mark.parametrize("document", DOCUMENTS, ids=_name)
def test_blocks_are_marked(document):
    """Every python block is marked run or no-run (python_blocks raises otherwise), and the
    no-run ones are at least valid Python."""
    for line, info, code in python_blocks(document.read_text(), _name(document)):
        if info == NO_RUN:
            compile("\n" * (line - 1) + code, str(document), "exec")


def test_readme_has_a_quick_start_per_method():
    run = [b for b in python_blocks(README.read_text()) if b[1] == RUN]
    assert len(run) >= 5, f"only {len(run)} ```python blocks in README.md (a quick start per method)"
    no_run = [(_name(d), line) for d in DOCUMENTS
              for line, info, _ in python_blocks(d.read_text(), _name(d)) if info == NO_RUN]
    assert len(no_run) <= 2, f"keep the ```python no-run blocks few: {no_run}"


def serve() -> int:
    """``--serve``: imports PRELOAD, then, for each line ``document<TAB>directory`` on stdin,
    forks a process that runs the document's blocks (``run_blocks``) in ``directory/cwd``, with
    its stdout and stderr in ``directory/stdout`` and ``directory/stderr``, and answers the
    process's exit status on a line of its own. Ends at the end of stdin."""
    answers = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)   # stray output (a library printing at import) goes to the log, not the answers
    for module in PRELOAD:
        try:
            importlib.import_module(module)
        except ImportError:
            pass   # the page that imports it fails, saying so
    for request in iter(sys.stdin.readline, ""):
        document, directory = request.rstrip("\n").split("\t")
        pid = os.fork()
        if pid == 0:   # the document's process
            status = 1
            try:
                with open(f"{directory}/stdout", "w") as out, open(f"{directory}/stderr", "w") as err:
                    os.dup2(out.fileno(), 1)
                    os.dup2(err.fileno(), 2)
                    os.chdir(f"{directory}/cwd")
                    status = run_blocks(Path(document))
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(status)   # never back into the server's loop
        _, wait_status = os.waitpid(pid, 0)
        print(os.waitstatus_to_exitcode(wait_status), file=answers, flush=True)
    return 0


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    env = {k: v for k, v in os.environ.items() if k != "ADAPTEROPS_CSRC_ON_CPU"}
    env.setdefault("HF_HUB_OFFLINE", "1")   # nothing is downloaded: the models are built from configs
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    log = tmp_path_factory.mktemp("readme-server") / "stderr"
    with open(log, "w") as stderr:
        process = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--serve"],
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr,
                                   env=env, text=True, start_new_session=True)
    process.log = log
    yield process
    process.stdin.close()
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


@pytest.mark.parametrize("document", [d for d in DOCUMENTS if _runnable(d)], ids=_name)
def test_python_blocks_run(document, server, tmp_path):
    if server.poll() is not None:
        pytest.fail(f"the document server exited ({server.returncode}):\n{server.log.read_text()[-3000:]}")
    (tmp_path / "cwd").mkdir()
    server.stdin.write(f"{document}\t{tmp_path}\n")
    server.stdin.flush()
    if not select.select([server.stdout], [], [], TIMEOUT_S)[0]:
        os.killpg(server.pid, signal.SIGKILL)   # the server and the document's process
        pytest.fail(f"{_name(document)} ran for more than {TIMEOUT_S} s")
    answer = server.stdout.readline().strip()
    stdout, stderr = ((tmp_path / f).read_text() if (tmp_path / f).exists() else ""
                      for f in ("stdout", "stderr"))
    if answer != "0":
        report = stderr.strip().splitlines()
        summary = (report[-1] if report and answer else
                   f"{_name(document)}: exit status {answer or 'unknown: the server died'}")
        raise AssertionError(f"{summary}\n\n--- stderr ---\n{stderr[-6000:]}"
                             f"\n--- stdout ---\n{stdout[-3000:]}")


def _fenced_lines(text: str, name: str) -> set[int]:
    """Indices of the lines inside fenced blocks, fences included."""
    return {i for opening, closing, _ in fenced_blocks(text, name) for i in range(opening, closing + 1)}


def _prose(document: Path) -> str:
    """The document with its fenced blocks and inline code spans blanked, newlines kept (so
    offsets still give line numbers)."""
    text = document.read_text()
    fenced = _fenced_lines(text, _name(document))
    kept = "".join("\n" if i in fenced else line
                   for i, line in enumerate(text.splitlines(keepends=True)))
    return re.sub(r"`[^`]*`", lambda span: re.sub(r"[^\n]", " ", span.group()), kept)


def anchors(document: Path) -> set[str]:
    """The anchors GitHub gives the document's headings: lowercased, punctuation but hyphens
    and underscores dropped, spaces as hyphens; a repeated one gets -1, -2, ..."""
    text = document.read_text()
    fenced, seen, out = _fenced_lines(text, _name(document)), {}, set()
    for i, line in enumerate(text.splitlines()):
        heading = None if i in fenced else re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if heading is None:
            continue
        slug = re.sub(r"[^\w\- ]", "", heading.group(1).lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        out.add(slug if count == 0 else f"{slug}-{count}")
    return out


def broken_links(document: Path) -> list[str]:
    """Each relative link of the document whose file (or directory) does not exist, or whose
    #anchor names no heading of a markdown target."""
    broken, prose = [], _prose(document)
    for link in LINK.finditer(prose):
        target = link.group(1)
        if SCHEME.match(target):
            continue
        path, _, anchor = target.partition("#")
        resolved = (document.parent / path).resolve() if path else document
        where = f"{_name(document)} line {prose.count(chr(10), 0, link.start()) + 1}: ({target})"
        if not resolved.exists():
            broken.append(f"{where}: no such file {_name(resolved)}")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            broken.append(f"{where}: {_name(resolved)} has no heading #{anchor}")
    return broken


def test_relative_links_resolve():
    broken = [problem for document in DOCUMENTS for problem in broken_links(document)]
    assert not broken, "broken links:\n" + "\n".join(broken)


if __name__ == "__main__":
    if sys.argv[1:] == ["--serve"]:
        sys.exit(serve())
    sys.exit(run_blocks(Path(sys.argv[1]) if len(sys.argv) > 1 else README))
