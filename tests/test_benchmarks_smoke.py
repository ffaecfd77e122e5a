"""Smoke test of the benchmark suite (benchmarks/harness.py, benchmarks/lowrank.py,
benchmarks/routed.py, benchmarks/hdpissa.py): one tiny case per op, every provider in every
mode the op declares, run in-process; checks the CSV's columns, that every row was measured,
and that the low-rank, routed and HD-PiSSA ops' memory contracts show in `saved_mb`."""
import csv
import dataclasses
import importlib.util
import sys
from pathlib import Path

import torch

# `benchmarks` is not an installed package (setup.py ships adapterops only): import it from the
# checkout, whichever way pytest was started.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import harness, hdpissa, lowrank, routed  # noqa: E402

CASE = harness.Case(M=16, K=64, N=32, r=16)
CASES = {"lamda": CASE, "lora": CASE, "lamda_dropout": CASE, "lora_dropout": CASE,
         "lamda_fp32_adapter": CASE, "lora_fp32_adapter": CASE,
         "hydra": harness.Case(M=16, K=64, N=32, r=8, heads=4),
         "hdpissa": harness.Case(M=16, K=64, N=32, r=8),
         "hdpissa_update": harness.Case(M=None, K=64, N=32, r=4, world=2)}
# A copy does no arithmetic: the update's floor is credited 0 FLOPs.
NO_FLOPS = {("hdpissa_update", "floor")}


def test_every_provider_and_mode_measured_and_saved_bytes_follow_the_contract(device, tmp_path):
    benchmarks = [dataclasses.replace(bench, cases=lambda quick, device_type,
                                      case=CASES[bench.name]: [case])
                  for bench in lowrank.BENCHMARKS + routed.BENCHMARKS + hdpissa.BENCHMARKS]
    # fp32: under the interpreter, bf16 dots go through an upcast and only cost time here.
    seen = []  # the row count each after_case call saw: one call per case, rows so far
    rows = harness.run(benchmarks, device=device, dtype=torch.float32, quick=True,
                       cpu_budget_s=0.0, after_case=lambda so_far: seen.append(len(so_far)))
    per_case = [len(b.providers) * len(b.modes) for b in benchmarks]
    assert seen == [sum(per_case[:i + 1]) for i in range(len(per_case))], seen
    summary = harness.summary_markdown(rows, benchmarks)
    harness.write_results(rows, summary, tmp_path)

    with open(tmp_path / "results.csv", newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == harness.COLUMNS, f"CSV header: {reader.fieldnames}"
        table = list(reader)
    expected = {(b.name, p, m) for b in benchmarks for p in b.providers for m in b.modes}
    assert {m for b in benchmarks for m in b.modes} == set(harness.KNOWN_MODES), \
        "some mode is not exercised"
    got = [(row["op"], row["provider"], row["mode"]) for row in table]
    assert sorted(got) == sorted(expected), f"rows: {got}"
    # peft is optional: without it, its rows must say so (and only they may fail).
    if importlib.util.find_spec("peft") is None:
        for key, row in zip(got, table):
            if key[1] == "peft":
                assert "No module named 'peft'" in row["error"], f"{key}: {row['error']!r}"
        got, table = zip(*[(key, row) for key, row in zip(got, table) if key[1] != "peft"])
    errors = [(key, row["error"]) for key, row in zip(got, table) if row["error"]]
    assert not errors, f"providers that failed: {errors}"
    for key, row in zip(got, table):
        p20, p50, p80 = (float(row[c]) for c in ("p20_ms", "p50_ms", "p80_ms"))
        assert 0 < p20 <= p50 <= p80, f"{key}: percentiles {p20}, {p50}, {p80}"
        assert float(row["gbps"]) > 0, f"{key}: {row}"
        assert (float(row["tflops"]) == 0) == (key[:2] in NO_FLOPS), f"{key}: {row}"
        case = CASES[row["op"]]
        assert tuple(row[c] for c in harness.SHAPE_COLUMNS) == tuple(
            "" if getattr(case, c) is None else str(getattr(case, c))
            for c in harness.SHAPE_COLUMNS), f"{key}: shape columns"

    # The update runs without autograd: nothing is recorded, the column stays empty.
    for key, row in zip(got, table):
        assert (row["saved_mb"] == "") == (key[2] == harness.UPDATE), f"{key}: {row['saved_mb']!r}"
    saved = {(row["op"], row["provider"]): round(float(row["saved_mb"]) * harness.MB)
             for row in table if row["saved_mb"]}
    M, K, r, size = CASE.M, CASE.K, CASE.r, 4
    h_bytes, x_bytes = M * r * size, M * K * size
    for op in ("lamda", "lora", "hydra", "hdpissa"):
        assert saved[op, "floor"] == 0, f"{op}: the frozen base layer saved {saved[op, 'floor']} B"
    # LaMDA (W and A frozen): our op saves h1 and h2 (M x r each), never x (M x in) ...
    for provider in ("torch", "triton"):
        assert saved["lamda", provider] == 2 * h_bytes, \
            f"lamda/{provider} saved {saved['lamda', provider]} B, want h1 + h2 = {2 * h_bytes} B"
    # ... never more than the unfused composition ...
    assert saved["lamda", "triton"] <= saved["lamda", "torch_eager"], saved
    # ... while LoRA (A trainable) must keep x for dA: LaMDA's saving is the difference.
    for provider in ("torch", "triton"):
        assert saved["lora", provider] == x_bytes + h_bytes, \
            f"lora/{provider} saved {saved['lora', provider]} B, want x + h1 = " \
            f"{x_bytes + h_bytes} B"
    assert saved["lora", "torch_eager"] >= x_bytes, saved
    if ("lora", "peft") in saved:  # the same composition as torch_eager, inside a PEFT layer
        assert saved["lora", "peft"] == saved["lora", "torch_eager"], saved
    # Fused dropout saves what the op saves without it plus the 8-byte seed, nothing mask- or
    # x_d-sized; the compositions keep the dropped x (and PEFT its mask) besides.
    for op in ("lamda", "lora"):
        for provider in ("torch", "triton", "cuda"):
            assert saved[f"{op}_dropout", provider] == saved[op, "triton"] + 8, (op, provider, saved)
        assert saved[f"{op}_dropout", "torch_eager"] >= saved[op, "torch_eager"] + x_bytes, saved
    if ("lora_dropout", "peft") in saved:  # x_d besides x and h1
        assert saved["lora_dropout", "peft"] >= saved["lora", "triton"] + x_bytes, saved
    # HydraLoRA (A and the router trainable): x for dA and dWg, h, hg = [g_e h] for dB and the
    # fp32 probabilities; never more than the unfused composition or the official loop.
    hydra = CASES["hydra"]
    want = (hydra.M * (hydra.K + hydra.r + hydra.heads * hydra.r) * size
            + hydra.M * hydra.heads * 4)
    for provider in ("torch", "triton"):
        assert saved["hydra", provider] == want, \
            f"hydra/{provider} saved {saved['hydra', provider]} B, want x + h + hg + probs = " \
            f"{want} B"
    assert saved["hydra", "triton"] <= saved["hydra", "torch_eager"], saved
    assert saved["hydra", "triton"] < saved["hydra", "official"], saved
    # HD-PiSSA (W frozen, A and B trainable): x for gA and h = x A^T (M x r) for gB; the cuBLAS
    # alternative saves x alone (it recomputes h), the published scheme x and the out x in
    # W + s (B A - B0 A0) it multiplies x by.
    layer = CASES["hdpissa"]
    x_bytes, h_bytes = layer.M * layer.K * size, layer.M * layer.r * size
    for provider in ("torch", "triton", "torch_eager"):
        assert saved["hdpissa", provider] == x_bytes + h_bytes, \
            f"hdpissa/{provider} saved {saved['hdpissa', provider]} B, want x + h = " \
            f"{x_bytes + h_bytes} B"
    assert saved["hdpissa", "addmm"] == x_bytes, saved
    assert saved["hdpissa", "official"] == x_bytes + layer.N * layer.K * size, saved

    assert (tmp_path / "summary.md").read_text() == summary
    for bench in benchmarks:
        for mode in bench.modes:
            assert f"## {bench.name} {mode}" in summary, \
                f"summary lacks the {bench.name} {mode} table"
    assert "GB/s triton" in summary.split("## hdpissa_update update")[1], \
        "the update table lacks its GB/s columns"


def test_an_op_with_a_fixed_dtype_records_it(device):
    """HD-PiSSA's update runs on fp32 master weights whatever the run's dtype: its rows say fp32
    while the other ops' rows say the run's dtype."""
    update = dataclasses.replace(hdpissa.BENCHMARKS[1], providers=("floor", "torch"),
                                 cases=lambda quick, device_type: [CASES["hdpissa_update"]])
    assert update.name == "hdpissa_update" and update.dtype == torch.float32
    rows = harness.run([update], device=device, dtype=torch.bfloat16, quick=True, cpu_budget_s=0.0)
    assert {row["dtype"] for row in rows} == {"fp32"} and not any(row["error"] for row in rows), rows


# benchmarks/smoke.py: a backend asked for that cannot serve is never counted as a pass.
SIMULATED_REASON = "triton is not importable (ImportError: simulated by test_benchmarks_smoke)"


def _triton_unavailable(monkeypatch):
    from adapterops import dispatch
    from adapterops.backends import BACKENDS
    monkeypatch.setattr(BACKENDS["triton"], "unavailable_reason", lambda: SIMULATED_REASON)
    dispatch.clear_cache()


def _smoke_rows(out: Path) -> list[dict]:
    with open(out / "smoke.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_smoke_off_cuda_reports_an_unavailable_backend_and_never_says_0_failed(
        monkeypatch, tmp_path, capsys):
    from benchmarks import smoke
    _triton_unavailable(monkeypatch)
    assert smoke.main(["--device", "cpu", "--backends", "triton", "--cases", "lora,update_high",
                       "--out", str(tmp_path)]) == 0
    rows = _smoke_rows(tmp_path)
    assert [(row["case"], row["status"]) for row in rows] == [
        ("lora", "unavailable"), ("update_high", "unavailable")], rows
    assert all(SIMULATED_REASON in row["detail"] for row in rows), rows
    report = (tmp_path / "smoke.md").read_text()
    assert "NOTHING WAS CHECKED" in report and "2 case(s) unavailable" in report, report
    assert "0 failed" not in report and "0 wrong" not in report, report
    assert "smoke: NOTHING WAS CHECKED" in capsys.readouterr().out


def test_smoke_on_cuda_an_unavailable_backend_fails_naming_its_reasons(
        monkeypatch, tmp_path, capsys):
    """The CUDA rule, simulated here: the status smoke gives an unservable case on a CUDA device
    (`unavailable_status("cuda")`) for a run whose tensors are on the CPU."""
    from benchmarks import smoke
    assert smoke.unavailable_status("cuda") == "UNAVAILABLE" and "UNAVAILABLE" in smoke.FAILED
    assert smoke.unavailable_status("cpu") == "unavailable" not in smoke.FAILED
    on_cuda = smoke.unavailable_status
    monkeypatch.setattr(smoke, "unavailable_status", lambda device_type: on_cuda("cuda"))
    _triton_unavailable(monkeypatch)
    assert smoke.main(["--device", "cpu", "--backends", "triton", "--cases", "lora",
                       "--out", str(tmp_path)]) == 1
    assert [row["status"] for row in _smoke_rows(tmp_path)] == ["UNAVAILABLE"]
    report = (tmp_path / "smoke.md").read_text()
    assert "FAILED: nothing was checked; 1 case(s) UNAVAILABLE" in report, report
    captured = capsys.readouterr()
    assert "smoke: UNAVAILABLE lora triton" in captured.err and SIMULATED_REASON in captured.err, \
        captured.err
    assert "smoke: FAILED" in captured.out, captured.out


def test_smoke_verdict_counts_checks_and_failures_apart():
    from benchmarks.smoke import verdict
    ok = {"status": "ok"}
    assert verdict([ok, ok]) == "passed: 2 tensors checked, 0 wrong"
    assert verdict([ok, {"status": "FAIL"}]).startswith("FAILED: 2 tensors checked, 1 wrong")
    assert verdict([ok, {"status": "unavailable"}]).startswith("passed: 1 tensors checked, 0 wrong; "
                                                               "1 case(s) unavailable")
    assert verdict([{"status": "error"}]) == "FAILED: nothing was checked; 1 case(s) errored"
