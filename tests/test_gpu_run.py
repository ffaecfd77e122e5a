"""`benchmarks/gpu_run.sh` (the one command a borrowed GPU runs) in its CPU dry run: every step
runs, in order, within the budget, and writes what the GPU run will be read by. A GPU comes
rarely; a script that broke in between would waste it."""
import csv
import importlib.util
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STEPS = ("preflight", "kernel_check", "smoke", "headline", "headline-high", "tests-triton",
         "cuda_build", "smoke-cuda", "headline-cuda", "tests", "sweep")
HEADLINE_OPS = {"lamda", "lora", "lamda_dropout", "lora_dropout", "hydra", "hdpissa",
                "hdpissa_update"}

# The dry runs take minutes: slow, so not in `make quick` (pyproject.toml's `slow` marker).
pytestmark = pytest.mark.slow


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _dry_run(out: Path, expected_rc: int = 0, **env) -> None:
    """The script's exit status is 1 when a step failed, was cut or was skipped."""
    env = {**os.environ, "DRY_RUN": "1", "OUT": str(out), "PY": sys.executable, **env}
    done = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_run.sh")], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == expected_rc, done.stdout[-3000:] + done.stderr[-3000:]


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gpu-run")
    _dry_run(out)
    return out


def test_every_step_ran_and_exited_cleanly(dry_run):
    timeline = (dry_run / "timeline.txt").read_text().splitlines()
    names = [line.split(":")[0] for line in timeline]
    assert names[:-1] == list(STEPS) and names[-1].startswith("done in"), timeline
    for line in timeline[:-1]:
        assert line.endswith("exit 0"), line
    for name in ("env.txt", "install.log", "cuda_build.log"):
        assert (dry_run / name).stat().st_size > 0, name


def test_smoke_checked_every_op_and_passed(dry_run):
    for folder, backend in (("smoke", "triton"), ("smoke-cuda", "cuda")):
        rows = _rows(dry_run / folder / "smoke.csv")
        assert {row["backend"] for row in rows} == {backend}
        assert {row["status"] for row in rows} == {"ok"}, rows
        cases = {row["case"] for row in rows}
        assert cases == {"lamda", "lora", "lamda_dropout", "lora_dropout", "lamda_fp32_adapter",
                         "lora_fp32_adapter", "hydra", "hydra_top2", "hdpissa", "update_highest",
                         "update_high"}, cases
        # forward and every gradient: LaMDA trains x's consumer, S and B.
        assert {row["tensor"] for row in rows if row["case"] == "lamda"} == {
            "y", "dx", "dlora_S", "dlora_B"}


def test_headline_rows_and_profiles(dry_run):
    rows = _rows(dry_run / "headline" / "results.csv")
    assert {row["op"] for row in rows} == HEADLINE_OPS
    assert {row["fp32_precision"] for row in rows} == {"highest"}
    measured = {(row["op"], row["provider"], row["mode"]) for row in rows if not row["error"]}
    failed = [(row["op"], row["provider"], row["error"]) for row in rows
              if row["error"] and row["provider"] != "peft"]
    assert not failed, failed
    # peft is a test dependency, but the GPU image may lack it: its rows then carry the error.
    with_peft = {"peft"} if importlib.util.find_spec("peft") is not None else set()
    assert {provider for _, provider, _ in measured} == {
        "floor", "torch_eager", "addmm", "official", "triton", "triton_p0"} | with_peft
    profiled = {(row["op"], row["provider"], row["mode"])
                for row in _rows(dry_run / "headline" / "profile.csv")}
    assert profiled == measured
    profile_md = (dry_run / "headline" / "profile.md").read_text()
    assert "## lamda M=16 K=64 N=32 r=16 fwd triton" in profile_md

    high = _rows(dry_run / "headline-high" / "results.csv")
    assert {(row["op"], row["fp32_precision"]) for row in high} == {("hdpissa_update", "high")}
    cuda = _rows(dry_run / "headline-cuda" / "results.csv")
    assert {row["provider"] for row in cuda} == {"floor", "cuda"}
    assert not [row for row in cuda if row["error"]]


# Stands in for python in the budget test, so that what the budget does follows from the
# script's rule alone, not from how fast this machine starts python and imports torch (on a
# loaded machine `adapterops.info` alone took all of a 12 s budget and smoke was skipped, or
# smoke was cut at its limit). The checks (`-m benchmarks.<check>`) take a second and pass;
# the benchmarks and the tests run until they are cut; the rest (adapterops.info, the
# versions, the extension build) fails at once, so no CUDA step runs.
FAKE_PYTHON = """#!/usr/bin/env bash
case "$1 $2" in
  "-m benchmarks" | "-m pytest") exec sleep 600 ;;
  "-m benchmarks."*) sleep 1 ;;
  *) exit 1 ;;
esac
"""
STEP_RAN = re.compile(r"(?P<name>[\w-]+): started at (?P<start>\d+) s, took (?P<took>\d+) s "
                      r"\(limit (?P<limit>\d+) s\), exit (?P<rc>\d+)$")
STEP_SKIPPED = re.compile(r"(?P<name>[\w-]+): skipped, (?P<left>-?\d+) s of the budget left$")
# bash's SECONDS counts whole seconds: a step's start and length as it records them may each
# read up to a second past the real ones.
TICK_S = 2


def test_the_budget_cuts_steps_short_and_skips_the_rest(tmp_path):
    budget = 12
    fake_python = tmp_path / "python"
    fake_python.write_text(FAKE_PYTHON)
    fake_python.chmod(0o755)
    start = time.perf_counter()
    _dry_run(tmp_path / "out", expected_rc=1, BUDGET_S=str(budget), PY=str(fake_python))
    # the budget, plus the grace a step gets to exit after its time limit
    assert time.perf_counter() - start < budget + 15
    timeline = (tmp_path / "out" / "timeline.txt").read_text().splitlines()
    assert timeline[0].startswith(f"{STEPS[0]}:") and timeline[0].endswith("exit 0"), timeline
    assert any("skipped" in line for line in timeline), timeline
    assert timeline[-1].startswith("done in"), timeline
    # The script's rule: a step's limit is what is left of the budget at most, a step that
    # reaches it is cut there (exit 124), a step with under 5 s left is skipped.
    ran = [m.groupdict() for m in map(STEP_RAN.match, timeline) if m]
    skipped = [m.groupdict() for m in map(STEP_SKIPPED.match, timeline) if m]
    for step in ran:
        started, took, limit = int(step["start"]), int(step["took"]), int(step["limit"])
        assert limit <= budget - started + TICK_S, (step, timeline)
        assert started + took <= budget + TICK_S, (step, timeline)
    # The first benchmark is cut at the budget, and it is the last step that runs.
    cut = [step for step in ran if step["rc"] == "124"]
    assert len(cut) == 1 and cut[0] == ran[-1], timeline
    assert int(cut[0]["took"]) >= int(cut[0]["limit"]) - TICK_S, timeline
    assert all(int(step["left"]) < 5 for step in skipped), timeline
    assert int(timeline[-1].split()[2]) <= budget + TICK_S, timeline


def test_preflight_passed(dry_run):
    log = (dry_run / "preflight.log").read_text()
    assert "preflight ok on cpu" in log, log


def test_kernel_check_ran_every_check_and_passed(dry_run):
    sys.path.insert(0, str(REPO))
    from benchmarks.kernel_check import CHECKS
    rows = _rows(dry_run / "kernel_check" / "kernel_check.csv")
    assert {row["check"] for row in rows} == {check.name for check in CHECKS}
    assert {row["status"] for row in rows} == {"ok"}, rows
    for row in rows:
        assert row["kernels"] and set(row["kernels"].split()) == set(row["expected"].split()), row


def test_the_triton_tests_ran_before_the_extension_steps_without_building(dry_run):
    timeline = (dry_run / "timeline.txt").read_text()
    assert timeline.index("tests-triton:") < timeline.index("smoke-cuda:")
    assert " passed" in (dry_run / "tests-triton.log").read_text()
    assert " passed" in (dry_run / "tests.log").read_text()


def test_a_failed_preflight_stops_the_run(tmp_path):
    """A broken dependency (here peft, shadowed by a package whose import fails) stops the run
    after the preflight: exit 1, the reason in timeline.txt and on stdout, no other step run."""
    shadow = tmp_path / "shadow" / "peft"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text(
        'raise ImportError("a broken peft (test_a_failed_preflight_stops_the_run)")\n')
    pythonpath = os.pathsep.join(filter(None, [str(shadow.parent), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "DRY_RUN": "1", "OUT": str(tmp_path / "out"), "PY": sys.executable,
           "PYTHONPATH": pythonpath, "ADAPTEROPS_JIT_BUILD": "0"}
    done = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_run.sh")], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    timeline = (tmp_path / "out" / "timeline.txt").read_text().splitlines()
    assert len(timeline) == 2 and timeline[0].startswith("preflight:"), timeline
    assert timeline[0].endswith("exit 1"), timeline
    assert timeline[1].startswith("STOPPED at") and "import peft failed" in timeline[1], timeline
    assert "STOPPED at" in done.stdout and "a broken peft" in done.stdout, done.stdout


def _gpu_test_selection() -> list[str]:
    """(files during the build, -k during, files after, -k after) of the GPU run, as the
    script sets them (its configuration block, run by bash with DRY_RUN=0)."""
    script = (REPO / "benchmarks" / "gpu_run.sh").read_text()
    block = script[script.index('if [ "$DRY_RUN" = 1 ]; then'):]
    block = block[:block.index("\n", block.index("TESTS_AFTER_BUILD_K="))]
    show = ('\nprintf "%s\\n" "${TESTS_DURING_BUILD[*]}" "$TESTS_DURING_BUILD_K" '
            '"${TESTS_AFTER_BUILD[*]}" "$TESTS_AFTER_BUILD_K"')
    done = subprocess.run(["bash", "-c", block + show], env={**os.environ, "DRY_RUN": "0"},
                          capture_output=True, text=True, check=True)
    return done.stdout.splitlines()


# Collects each selection (a JSON list of pytest arguments per line of stdin) in one process,
# so torch and the test modules import once; prints each selection's node ids as a JSON list.
COLLECT = """
import json, sys
import pytest

class Collected:
    def pytest_collection_finish(self, session):
        self.ids = [item.nodeid for item in session.items]

for line in sys.stdin:
    plugin = Collected()
    code = pytest.main(["--collect-only", "-q", "-p", "no:cacheprovider", *json.loads(line)],
                       plugins=[plugin])
    print("selection", int(code), json.dumps(getattr(plugin, "ids", [])), flush=True)
"""


def _collected(*selections: list) -> list[set]:
    done = subprocess.run([sys.executable, "-c", COLLECT], cwd=REPO, capture_output=True,
                          text=True, timeout=300,
                          input="".join(json.dumps(args) + "\n" for args in selections))
    lines = [line.split(" ", 2) for line in done.stdout.splitlines()
             if line.startswith("selection ")]
    assert len(lines) == len(selections) and all(code == "0" for _, code, _ in lines), \
        done.stdout[-3000:] + done.stderr[-3000:]
    return [set(json.loads(ids)) for _, _, ids in lines]


def test_the_gpu_tests_split_by_the_extension_run_every_test_once():
    """On a GPU the tests run in two steps around the extension's build (-k selections no dry
    run exercises): the kernel test files' tests split between them, none twice and none that
    needs the cuda backend before it is built; the second step also runs every other file
    (its -k keeps every test outside the kernel test files) but this one."""
    during_files, during_k, after_files, after_k = _gpu_test_selection()
    assert set(during_files.split()) < set(after_files.split()), (during_files, after_files)
    assert {"tests", "--ignore=tests/test_gpu_run.py"} < set(after_files.split()), after_files
    files = during_files.split()
    during, after, everything = _collected(["-k", during_k, *files], ["-k", after_k, *files],
                                           files)
    assert during and not during & after, sorted(during & after)[:10]
    assert during | after == everything, sorted(everything - during - after)[:10]
    assert not [test for test in during if "cuda" in test or "declines_beyond" in test]
    assert [test for test in after if "test_triton_declines_beyond_its_limits" in test]
