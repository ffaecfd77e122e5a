"""`benchmarks/gpu_run.sh` (the one command a borrowed GPU runs) in its CPU dry run: every step
runs, in order, within the budget, and writes what the GPU run will be read by. A GPU comes
rarely; a script that broke in between would waste it."""
import csv
import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STEPS = ("smoke", "headline", "headline-high", "cuda_build", "smoke-cuda", "headline-cuda",
         "tests", "sweep")
HEADLINE_OPS = {"lamda", "lora", "hydra", "hdpissa", "hdpissa_update"}


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _dry_run(out: Path, **env) -> None:
    env = {**os.environ, "DRY_RUN": "1", "OUT": str(out), "PY": sys.executable, **env}
    done = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_run.sh")], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


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
        assert cases == {"lamda", "lora", "hydra", "hydra_top2", "hdpissa", "update_highest",
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
        "floor", "torch_eager", "addmm", "official", "triton"} | with_peft
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


def test_the_budget_cuts_steps_short_and_skips_the_rest(tmp_path):
    budget = 12
    start = time.perf_counter()
    # No extension build here: one killed at the budget would leave torch's build lock behind.
    _dry_run(tmp_path, BUDGET_S=str(budget), ADAPTEROPS_JIT_BUILD="0")
    # the budget, plus the grace a step gets to exit after its time limit
    assert time.perf_counter() - start < budget + 15
    timeline = (tmp_path / "timeline.txt").read_text().splitlines()
    assert timeline[0].startswith("smoke:") and timeline[0].endswith("exit 0"), timeline
    assert any("skipped" in line for line in timeline), timeline
    assert timeline[-1].startswith("done in"), timeline
