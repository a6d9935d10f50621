"""`python -m tests.fuzz`: a campaign writes its summary (counts, next seeds, failing seeds per
class), also when stopped early by SIGTERM, which ends it after the batch in flight."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _campaign(out: Path, minutes: float) -> subprocess.Popen:
    env = dict(os.environ, PSMC_CPU="0")
    return subprocess.Popen([sys.executable, "-m", "tests.fuzz", "--minutes", str(minutes), "--seed", "7",
                             "--jobs", "1", "--batch", "2", "--out", str(out)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_a_campaign_stopped_by_sigterm_finishes_its_batch_and_writes_the_summary(tmp_path):
    run = _campaign(tmp_path, minutes=10)
    first = run.stdout.readline()  # the first batch's progress line
    assert "programs 2" in first, first
    run.send_signal(signal.SIGTERM)
    rest, _ = run.communicate(timeout=240)
    assert run.returncode == 0, first + rest
    assert "stopped early (SIGTERM)" in rest
    summary = json.loads((tmp_path / "summary.json").read_text())
    done = summary["programs"]
    assert done >= 2 and done % 2 == 0 and summary["mutants"] == done  # whole batches only
    assert summary["program_failures"] == 0 and summary["classes"] == {}
    assert summary["next_program_seed"] == 7 + done


def test_the_summary_lists_every_failing_seed_per_class(tmp_path, monkeypatch):
    sys.path.insert(0, str(ROOT / "tests" / "fuzz"))
    import campaign
    import importlib
    main = importlib.import_module("tests.fuzz.__main__")

    def failing(seed):
        time.sleep(0.25)  # one batch of 4 + 4 outlasts the deadline: exactly one batch runs
        return campaign.Outcome("program", seed, "crash: X" if seed % 2 else None, "boom", "op t {}", "",
                                frozenset(), frozenset())
    monkeypatch.setattr(campaign, "program_task", failing)
    monkeypatch.setattr(campaign, "mutant_task", lambda seed: dataclasses_replace(failing(2 * seed), "mutant"))
    monkeypatch.setattr(campaign, "pool", lambda jobs: None)
    started = time.time()
    assert main.main(["--minutes", "0.01", "--seed", "10", "--jobs", "1", "--batch", "4",
                      "--out", str(tmp_path)]) == 1
    assert time.time() - started < 60
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["classes"]["crash: X"]["seeds"] == [11, 13]
    assert summary["program_failures"] == 2 and summary["mutant_failures"] == 0


def dataclasses_replace(outcome, kind):
    import dataclasses
    return dataclasses.replace(outcome, kind=kind)


def test_a_focused_sweep_runs_matching_programs_on_triton(tmp_path):
    """`python -m tests.fuzz.focus`: generated programs with an exclusive readout of scalar
    states, each with the Triton checks on; it reports how many ran there and exits 0."""
    env = dict(os.environ, PSMC_CPU="0", TRITON_INTERPRET="1")
    run = subprocess.run([sys.executable, "-m", "tests.fuzz.focus", "--seed", "3800000", "--scalar-states",
                          "--programs", "8", "--seconds", "300"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    line = next(x for x in run.stdout.splitlines() if x.startswith("seeds "))  # (the tree checks may follow)
    assert "8 programs with 'exclusive' and scalar states" in line and "0 failed" in line, line
    on_triton = int(line.split(", ")[1].split()[0])
    assert on_triton >= 1, line


def test_a_focused_sweep_crosses_the_wy_chunks_of_low_rank_programs():
    """`--feature low-rank --no-triton --wy-chunk 2`: generated low-rank programs with their
    campaign configs, the delta-rule and DPLR fast paths cut into chunks of 2 tokens."""
    env = dict(os.environ, PSMC_CPU="0", TRITON_INTERPRET="1")
    run = subprocess.run([sys.executable, "-m", "tests.fuzz.focus", "--seed", "4140000", "--feature", "low-rank",
                          "--no-triton", "--wy-chunk", "2", "--programs", "6", "--seconds", "300"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    line = next(x for x in run.stdout.splitlines() if x.startswith("seeds "))
    assert "6 programs with 'low-rank'" in line and "0 checked on Triton" in line and "0 failed" in line, line
