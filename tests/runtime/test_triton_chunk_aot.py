"""The chunked kernels (triton_chunk, triton_delta) compile for sm_90 at the launch
configurations the runtime uses (K = V = 128 and 64, bf16 and fp32), with no register spills.

Compiled ahead of time on this CPU-only machine (Triton's own compiler and ptxas, no GPU) in a
subprocess without TRITON_INTERPRET; see psmc/runtime/triton_chunk_aot.py."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_chunked_kernels_compile_for_sm90_without_spills():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, "-m", "psmc.runtime.triton_chunk_aot", "90", "--test"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    seen = {(r["config"], r["pass"], r["kernel"]) for r in rows}
    # every kernel of both passes, in both dtypes, for both operation families
    assert {("gla bfloat16 K=V=128", "forward", "_state_kernel"), ("gla bfloat16 K=V=128", "forward", "_out_kernel"),
            ("gla bfloat16 K=V=128", "backward", "_readout_kernel"), ("gla bfloat16 K=V=128", "backward", "_state_kernel"),
            ("gla bfloat16 K=V=128", "backward", "_out_kernel"), ("gla float32 K=V=64", "forward", "_out_kernel"),
            ("gated_delta_rule bfloat16 K=V=128", "forward", "_wy_kernel"),
            ("gated_delta_rule float32 K=V=128", "forward", "_delta_state_kernel")} <= seen, sorted(seen)
    failed = [r for r in rows if not r["ok"]]
    assert not failed, failed
    spilled = [(r["config"], r["pass"], r["kernel"], r["spills"], r["registers"]) for r in rows if r["spills"] != 0]
    assert not spilled, spilled
