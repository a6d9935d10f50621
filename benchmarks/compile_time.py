"""Case `compile`: psmc.load time per example, cold (analysis + codegen) and cached.

Cold: each example's text with a fresh comment line on top (so its content hash, and with it
psmc's cache key, is new) is loaded in a fresh Python process. Cached: the same files loaded
again in a second fresh process (the on-disk cache; no in-process memo can help). Each child
first loads one throwaway op, untimed, so imports are not counted as compile time.
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from . import peers
from .cases import Settings
from .report import CaseResult, Row, Verdict
from .timing import Timing

QUICK_EXAMPLES = ("linear_recurrence", "gla", "simple_gla", "transformer_psm")
WARMUP_OP = "op warmup_{tag} {{ state (y: f32); combine (l, r) {{ return l + r; }} }}\n"
CACHED_LIMIT_S = 0.3


def child(paths: list[str]) -> None:
    """In a fresh process: load a throwaway op, then time psmc.load of each path; print JSON."""
    import psmc

    with tempfile.TemporaryDirectory() as tmp:
        warm = Path(tmp) / "warmup.psm"
        warm.write_text(WARMUP_OP.format(tag=uuid.uuid4().hex[:8]), encoding="utf-8")
        psmc.load(str(warm))
    seconds = {}
    for path in paths:
        start = time.perf_counter()
        try:
            psmc.load(path)
            seconds[path] = time.perf_counter() - start
        except Exception as exc:
            seconds[path] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
    print(json.dumps(seconds))


def _run_child(paths: list[str]) -> dict:
    done = subprocess.run([sys.executable, "-m", "benchmarks.compile_time", *paths], cwd=peers.REPO,
                          capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "child failed")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _row(name: str, measure_name: str, value) -> Row:
    if isinstance(value, str):
        return Row("compile", measure_name, name, f"examples/{name}.psm", None, True, value)
    timing = Timing(value * 1e3, value * 1e3, 1)
    return Row("compile", measure_name, name, f"examples/{name}.psm", timing, True)


def run(settings: Settings) -> CaseResult:
    names = sorted(p.stem for p in peers.EXAMPLES.glob("*.psm"))
    if settings.quick:
        names = [n for n in names if n in QUICK_EXAMPLES]
    title = "Compile time per example: psmc.load, cold and cached (seconds shown as ms)"
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for name in names:
            fresh = Path(tmp) / f"{name}.psm"
            source = (peers.EXAMPLES / f"{name}.psm").read_text(encoding="utf-8")
            fresh.write_text(f"# benchmark cold compile {uuid.uuid4().hex}\n{source}", encoding="utf-8")
            paths.append(str(fresh))
        try:
            cold, cached = _run_child(paths), _run_child(paths)
        except Exception as exc:
            return CaseResult("compile", title, notes=(f"skipped: psmc.load unavailable ({exc})",))
    rows = []
    for name, path in zip(names, paths):
        rows.append(_row(name, "cold", cold[path]))
        rows.append(_row(name, "cached", cached[path]))
    rows.sort(key=lambda r: (r.measure != "cold", r.impl))
    cached_s = [cached[p] for p in paths if not isinstance(cached[p], str)]
    verdicts = ()
    if cached_s:
        worst = max(cached_s)
        verdicts = (Verdict(f"cached load < {CACHED_LIMIT_S} s for every example", worst < CACHED_LIMIT_S,
                            f"slowest {worst:.3f} s"),)
    notes = ("Single measurements (a cold compile happens once); 'vs best peer' does not apply.",)
    return CaseResult("compile", title, tuple(rows), verdicts, notes)


if __name__ == "__main__":
    child(sys.argv[1:])
