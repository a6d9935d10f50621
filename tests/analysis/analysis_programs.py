"""The programs the analysis tests run on: every example and every test operator."""
from pathlib import Path

from psmc.ir import ops_from_file

ROOT = Path(__file__).resolve().parents[2]
PROGRAMS = sorted((ROOT / "examples").glob("*.psm")) + sorted((ROOT / "tests/analysis/ops").glob("*.psm"))


def all_ops() -> dict:
    """op name -> OpIR for every example and every test operator."""
    out = {}
    for path in PROGRAMS:
        for op in ops_from_file(path):
            out[op.name] = op
    return out
