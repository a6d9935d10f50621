"""benchmarks/gpu.py --dry-run on CPU: every group of the GPU check builds its cases at tiny shapes
and runs them (psmc's torch paths; peers as far as they run on a CPU), each row reported, the
markdown table printed and written to $OUT. The Triton paths are skipped here (the interpreter
runs them for minutes; tests/codegen/test_triton*.py cover them)."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _gpu_module():
    spec = importlib.util.spec_from_file_location("psmc_bench_gpu", ROOT / "benchmarks" / "gpu.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_dry_run_reports_every_group(tmp_path, monkeypatch, capsys):
    gpu = _gpu_module()
    monkeypatch.setenv("OUT", str(tmp_path))
    assert gpu.main(["--dry-run", "--skip-triton", "--case-budget", "20", "--budget", "150"]) == 0
    table = (tmp_path / "gpu_bench.md").read_text()
    rows = [line.split("|")[1:-1] for line in table.splitlines()[2:]]
    groups = {r[0].strip() for r in rows}
    assert {"first-order scan", "GLA", "simple GLA", "delta rule", "RWKV-6", "mLSTM", "RWKV-7", "KDA", "DeltaProduct", "decode gla",
            "decode simple_gla", "GLA packed", "RWKV-7 packed"} <= groups
    impls = {(r[0].strip(), r[3].strip()) for r in rows}
    # every dispatcher path is a row (Triton ones skipped, saying why); the auto choice is marked
    assert ("first-order scan", "psmc triton-first-order") in impls
    assert ("first-order scan", "psmc torch-first-order (auto)") in impls
    assert ("GLA", "psmc chunkwise (auto)") in impls
    assert ("RWKV-6", "psmc chunkwise (auto)") in impls  # its exclusive readout: the chunked kernels on a GPU
    assert ("mLSTM", "psmc chunkwise (auto)") in impls  # C and n read in one chunked pass
    assert ("decode rwkv7", "psmc step (auto)") in impls  # the DPLR token (Triton kernel on a GPU)
    assert ("decode rwkv7", "fla fused_recurrent (rwkv7, T=1 per call)") in impls
    cache = [r for r in rows if (r[0].strip(), r[3].strip()) == ("decode tree (ema)", "psmc TreeCache, torch push")]
    assert cache and cache[0][8].strip().startswith("ok rel-rms"), cache  # against the ragged tree states
    assert ("GLA packed", "psmc gla, one call (auto)") in impls
    assert ("RWKV-7 packed", "psmc rwkv7, one call (auto)") in impls
    assert ("first-order packed", "psmc linear_recurrence, one call (auto)") in impls
    for group in ("GLA", "simple GLA", "RWKV-6", "mLSTM", "RWKV-7", "KDA", "DeltaProduct", "first-order scan", "GLA packed", "RWKV-7 packed",
                  "first-order packed"):
        checked = [r for r in rows if r[0].strip() == group and r[3].strip().startswith("psmc")
                   and "triton" not in r[3]]
        assert checked and all(r[8].strip().startswith("ok rel-rms") for r in checked), checked
    skipped = [r for r in rows if "triton" in r[3] and r[3].strip().startswith("psmc")]
    assert skipped and all("--skip-triton" in r[9] for r in skipped)
    assert (tmp_path / "gpu_bench.log").read_text().count("|") > 0
    assert "benchmark wall time" in capsys.readouterr().out


def test_a_failing_case_is_a_row_not_the_end(monkeypatch):
    """A case that raises, and one that overruns its budget, are rows with the reason."""
    gpu = _gpu_module()
    import torch
    report = gpu.Report(None)
    import time
    b = gpu.Bench(torch.device("cpu"), True, report, time.perf_counter() + 60, case_budget=3.0)

    def boom():
        raise ValueError("no kernel for this shape")

    def slow():
        time.sleep(10)
    b.case("g", "s", torch.float32, "boom", boom, None, None)
    b.case("g", "s", torch.float32, "slow", slow, None, None)
    b.case("g", "s", torch.float32, "fine", lambda: None, None, lambda: "ok")
    (_, _, _, _, f1, _, _, n1), (_, _, _, _, f2, _, _, n2), (_, _, _, _, f3, _, c3, _) = report.rows
    assert f1 is None and "ValueError: no kernel for this shape" in n1
    assert f2 is None and "Overrun" in n2
    assert isinstance(f3, float) and c3 == "ok"


@pytest.mark.parametrize("fault, row, note", [
    # a call that never returns to Python (SIGALRM blocked: a compile inside C++, a hung kernel)
    ("hang:fla chunk_simple_gla", "fla chunk_simple_gla", "killed: the call did not return within its budget"),
    ("exit:psmc torch-scan", "psmc torch-scan", "the child process exited with code 9 in this row"),
])
def test_isolated_rows_survive_a_row_that_hangs_or_kills_its_process(tmp_path, monkeypatch, fault, row, note):
    """--isolate (benchmarks/isolate.py): the row that hangs or exits is a row that says so, and
    the rows after it still run, in a new child started after it (none is run twice)."""
    gpu = _gpu_module()
    import benchmarks.isolate as isolate
    monkeypatch.setattr(isolate, "GRACE_S", 2.0)
    monkeypatch.setenv("PSMC_BENCH_FAULT", fault)
    monkeypatch.setenv("OUT", str(tmp_path))
    assert gpu.main(["--dry-run", "--skip-triton", "--isolate", "--case-budget", "3", "--budget", "120",
                     "--only", "simple_gla"]) == 0
    table = (tmp_path / "gpu_bench.md").read_text()
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in table.splitlines()[2:]]
    impls = [r[3] for r in rows]
    assert impls == ["psmc chunkwise (auto)", "psmc torch-scan", "psmc triton-token-loop", "fla chunk_simple_gla",
                     "fla fused_recurrent_simple_gla"], impls
    broken = rows[impls.index(row)]
    assert broken[4] == "-" and broken[9].startswith(note), broken
    assert rows[0][4] != "-" and rows[0][8].startswith("ok rel-rms")  # a row before it, timed and checked
    if row.startswith("psmc"):  # a row after it ran in the new child, timed (fla's need a GPU)
        assert rows[1][9].startswith(note) and "--skip-triton" in rows[2][9]


def test_isolated_rows_keep_the_notes_added_after_them(tmp_path, monkeypatch):
    """A note added to a row after it was written (decode's microseconds per token) reaches the
    parent's table: the child sends the row again."""
    gpu = _gpu_module()
    monkeypatch.setenv("OUT", str(tmp_path))
    assert gpu.main(["--dry-run", "--skip-triton", "--isolate", "--budget", "100", "--only", "decode"]) == 0
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in (tmp_path / "gpu_bench.md").read_text().splitlines()[2:]]
    timed = [r for r in rows if r[0] == "decode gla" and r[3] == "psmc torch-scan"]
    assert timed and timed[0][4] != "-" and timed[0][9].endswith("us/token"), timed
