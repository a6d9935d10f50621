"""Analysis time per op: cold (nothing cached) and cached, against the 5 s budget per example.

    python -m benchmarks.analysis_time            # examples/*.psm
    python -m benchmarks.analysis_time --all      # also tests/analysis/ops/*.psm

Cold runs use a fresh PSMC_CACHE_DIR, so every op is analysed from scratch (table, random
search, SymPy, identity, commutativity, structure, causality); the cached run reads the
entries back. Imports and the first SymPy/torch calls are warmed up on a throwaway op first.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUDGET_S = 5.0
WARMUP = "op warmup { state (m: f32, i: i64); combine (l, r) { return (max(l.m, r.m), " \
         "if r.m > l.m then r.i else l.i); } }"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--all", action="store_true", help="also the test operators in tests/analysis/ops")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from psmc.analysis import analyse
    from psmc.errors import PsmcAnalysisError
    from psmc.ir import ops_from_file, ops_from_source

    paths = sorted((ROOT / "examples").glob("*.psm"))
    if args.all:
        paths += sorted((ROOT / "tests/analysis/ops").glob("*.psm"))
    with tempfile.TemporaryDirectory() as cache:
        os.environ["PSMC_CACHE_DIR"] = cache
        analyse(ops_from_source(WARMUP)[0])
        rows = []
        for path in paths:
            for op in ops_from_file(path):
                cold, verdict = _timed(analyse, op, PsmcAnalysisError)
                cached, _ = _timed(analyse, op, PsmcAnalysisError)
                rows.append((op.name, verdict, cold, cached))
    _print(rows)
    return 0 if all(cold < BUDGET_S for _, _, cold, _ in rows) else 1


def _timed(fn, op, error):
    start = time.perf_counter()
    try:
        verdict = fn(op).associativity
    except error:
        verdict = "error (refuted assume)"
    return time.perf_counter() - start, verdict


def _print(rows) -> None:
    width = max(len(r[0]) for r in rows)
    print(f"{'op'.ljust(width)}  {'associativity':<24} {'cold s':>7} {'cached s':>9}")
    for name, verdict, cold, cached in rows:
        flag = "" if cold < BUDGET_S else f"  over the {BUDGET_S:g} s budget"
        print(f"{name.ljust(width)}  {verdict:<24} {cold:7.2f} {cached:9.3f}{flag}")
    colds = sorted(r[2] for r in rows)
    print(f"\n{len(rows)} ops: cold median {colds[len(colds) // 2]:.2f} s, max {colds[-1]:.2f} s "
          f"(budget {BUDGET_S:g} s each); cached max {max(r[3] for r in rows):.3f} s")


if __name__ == "__main__":
    sys.exit(main())
