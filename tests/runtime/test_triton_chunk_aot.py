"""The chunked kernels (triton_chunk, triton_delta, triton_dplr) compile for sm_90 (and the delta
rule's and the DPLR form's for sm_80 in bf16, the delta rule's in fp32 at K = 64 too) at the launch
configurations the runtime uses (K = V = 128 and 64, bf16 and fp32, inference, training forward
and backward; the DPLR form's training chain too), within the spill budget.

Compiled ahead of time on this CPU-only machine (Triton's own compiler and ptxas, no GPU) in a
subprocess without TRITON_INTERPRET; see psmc/runtime/triton_chunk_aot.py.

Spill budget: none in any forward kernel, none in any bf16 kernel on sm_90; the delta rule's
backward kernels in fp32 (tf32x3 products) or on sm_80 (register-operand mma) may spill up to
2 KB, the budget tests/codegen/test_triton_aot.py gives backward kernels."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BACKWARD_SPILL_BUDGET = 2048


def compile_rows(arch: int, only: str = "") -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env["PSMC_AOT_ONLY"] = only
    done = subprocess.run([sys.executable, "-m", "psmc.runtime.triton_chunk_aot", str(arch), "--test"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    failed = [r for r in rows if not r["ok"]]
    assert not failed, failed
    return rows


def over_budget(rows: list[dict]) -> list:
    def budget(r: dict) -> int:
        relaxed = r["pass"] == "backward" and "delta" in r["config"] and (r["arch"] != 90 or "float32" in r["config"])
        return BACKWARD_SPILL_BUDGET if relaxed else 0

    return [(r["arch"], r["config"], r["pass"], r["kernel"], r["spills"], r["registers"]) for r in rows
            if r["spills"] < 0 or r["spills"] > budget(r)]


@pytest.mark.heavy
def test_chunked_kernels_compile_for_sm90_within_the_spill_budget():
    rows = compile_rows(90)
    seen = {(r["config"], r["pass"], r["kernel"]) for r in rows}
    # every kernel of both passes, in both dtypes, for both operation families
    delta_bwd = ["_delta_dv_local_kernel", "_delta_dstate_kernel", "_delta_dqk_kernel", "_delta_wy_bwd_kernel"]
    bf16, delta = "gla bfloat16 K=V=128", "gated_delta_rule bfloat16 K=V=128"
    packed = bf16 + " packed"  # cu_seqlens: VARLEN=1
    expected = {(bf16, "forward", "_state_kernel"), (bf16, "forward", "_out_kernel"),
                (bf16, "backward", "_readout_kernel"), (bf16, "backward", "_state_kernel"),
                (bf16, "backward", "_out_kernel"), ("gla float32 K=V=64", "forward", "_out_kernel"),
                (packed, "forward", "_state_kernel"), (packed, "forward", "_out_kernel"),
                (packed, "backward", "_readout_kernel"), (packed, "backward", "_state_kernel"),
                (packed, "backward", "_out_kernel"),
                (delta, "forward", "_wy_kernel"), (delta, "training forward", "_wy_kernel"),
                ("gated_delta_rule float32 K=V=128", "forward", "_delta_state_kernel")}
    expected |= {("gated_delta_rule bfloat16 K=V=128", "backward", k) for k in delta_bwd}
    # fp32: a launch compiles once, under the first config that makes it (the K-blocked backward
    # kernels of K = 128 are the same launches as those of K = 64, which comes first)
    fp32_backward = {k for c, phase, k in seen if c.startswith("gated_delta_rule float32") and phase == "backward"}
    assert set(delta_bwd) <= fp32_backward, sorted(set(delta_bwd) - fp32_backward)
    # the decode token's kernel (psmc.runtime.triton_delta_step)
    expected |= {(f"gated_delta_{op} step {dt} K=V=128", "step", "_delta_step_kernel") for dt in ("bfloat16", "float32")
                 for op in ("rule", "product")}
    # the diagonal-plus-low-rank parallel pass (psmc.runtime.triton_dplr, inference)
    expected |= {(f"dplr {c}", "forward", k) for c in ("bfloat16 K=V=128", "float32 K=V=128", "float32 K=V=64 no decay")
                 for k in ("_dplr_intra_kernel", "_dplr_chain_kernel")}
    # its training chain (psmc.runtime.triton_dplr.chain)
    expected |= {(f"dplr {c} training", phase, k) for c in ("bfloat16 K=V=128", "float32 K=V=128",
                                                          "float32 K=V=64 no decay")
                 for phase, k in (("training forward", "_dplr_states_kernel"), ("backward", "_dplr_dstates_kernel"))}
    # packed sequences in one call (VARLEN=1), inference and training
    dplr_packed = "dplr bfloat16 K=V=128 packed"
    expected |= {(dplr_packed, "forward", "_dplr_chain_kernel"),
                 (dplr_packed + " training", "training forward", "_dplr_states_kernel"),
                 (dplr_packed + " training", "backward", "_dplr_dstates_kernel")}
    # the diagonal-plus-low-rank decode token's (psmc.runtime.triton_dplr_step)
    expected |= {(f"rwkv7 step {dt} K=V={w}", "step", "_dplr_step_kernel") for dt, w in
                 (("bfloat16", 128), ("float32", 128), ("float32", 256))}
    # the delta rule's packed-sequence kernels (cu_seqlens, VARLEN=1): training forward and backward
    packed = "gated_delta_rule bfloat16 K=V=128 varlen 3 seqs"
    expected |= {(packed, "training forward", k) for k in ("_wy_kernel", "_delta_state_kernel")}
    expected |= {(packed, "backward", k) for k in delta_bwd}
    assert expected <= seen, sorted(expected - seen)
    assert not over_budget(rows), over_budget(rows)


def test_dplr_kernels_compile_for_sm80_without_spills_in_bf16():
    rows = compile_rows(80, "dplr bfloat16")
    assert {r["kernel"] for r in rows} == {"_dplr_intra_kernel", "_dplr_chain_kernel", "_dplr_states_kernel",
                                           "_dplr_dstates_kernel"}
    assert not over_budget(rows), over_budget(rows)


@pytest.mark.heavy
def test_delta_rule_kernels_compile_for_sm80_within_the_spill_budget():
    rows = compile_rows(80, "gated_delta_rule bfloat16")
    assert {r["kernel"] for r in rows if r["pass"] == "backward"} == {
        "_delta_dv_local_kernel", "_delta_dstate_kernel", "_delta_dqk_kernel", "_delta_wy_bwd_kernel"}
    assert not over_budget(rows), over_budget(rows)


def test_delta_rule_fp32_kernels_compile_for_sm80_without_forward_spills():
    """fp32 takes 32-token chunks with or without autograd: with 64, the inference `_wy_kernel`
    spilled 724 B on sm_80 at K = 64 (255 registers)."""
    rows = compile_rows(80, "gated_delta_rule float32 K=V=64")
    forward = [r for r in rows if r["pass"] != "backward"]
    assert {r["kernel"] for r in forward} >= {"_wy_kernel", "_delta_state_kernel", "_out_kernel"}
    assert {r["constexprs"]["BT"] for r in forward} == {32}
    assert not [r for r in forward if r["spills"]], forward
    assert not over_budget(rows), over_budget(rows)
