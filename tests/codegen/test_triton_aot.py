"""Every Triton kernel psmc launches for the examples compiles for real GPUs (sm_90, sm_80) at
the launch configurations the runtime computes, with no spills in forward and decode kernels
and at most SPILL_BUDGET bytes elsewhere (psmc.triton_aot; no GPU needed: Triton's
compiler and ptxas run on the CPU).

`pytest -m sm90` / `-m sm80` select one target. The launches are recorded once per run and
each target's kernels are compiled once (in worker processes, one per CPU), shared by the
tests below."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")

from psmc import triton_aot  # noqa: E402

DOCS = Path(__file__).resolve().parents[2] / "docs" / "triton.md"
_ROWS: dict = {}


def _rows(arch: int) -> list:
    """sm_90: every launch. sm_80: the forward and decode kernels (the matrix backward kernels
    take most of the compile time; `python -m psmc.triton_aot` compiles all of them for both
    targets and the docs table shows them)."""
    if arch not in _ROWS:
        passes = None if arch == 90 else ("forward", "forward (training)", "step", "step (cache)")
        _ROWS[arch] = triton_aot.compile_all((arch,), workers=min(2, os.cpu_count() or 1), passes=passes)
    return _ROWS[arch]


@pytest.mark.heavy
@pytest.mark.parametrize("arch", [pytest.param(90, marks=pytest.mark.sm90), pytest.param(80, marks=pytest.mark.sm80)])
def test_every_kernel_compiles_within_the_spill_budget(arch):
    rows = _rows(arch)
    examples = {r.example for r in rows}
    # the families: block scans, the first-order scan, matrix token loops (and any new one)
    # and the tree kernels of a non-associative op
    assert {"cumsum", "linear_recurrence", "selective_ssm", "softmax_pool", "gla", "rwkv6", "ema"} <= examples
    passes = {(r.example, r.passname) for r in rows}
    wanted = ("forward", "forward (training)", "backward", "step", "forward (packed)", "forward (packed, training)",
              "backward (packed)") if arch == 90 else ("forward", "step")
    for example in examples - {"running_argmax"}:  # running_argmax has no float output: no backward
        # a tree state's step is the torch counter push (O(log n) small ops): no step kernel; a
        # TreeCache's token is one launch of the tree step kernel
        want = [p for p in wanted if p != "step"] + ["step (cache)"] if example == "ema" else wanted
        assert {(example, p) for p in want} <= passes, example
    bad = triton_aot.failures(rows)
    assert not bad, "\n".join(b[:3000] for b in bad)


def test_the_docs_table_lists_every_launch():
    """docs/triton.md's table (`python -m psmc.triton_aot --write-docs`) has one row per
    recorded launch: the same examples, passes, kernels, grids and constexprs as the runtime
    launches now (register counts may differ between Triton versions and are not compared)."""
    text = DOCS.read_text(encoding="utf-8")
    assert triton_aot.START in text and triton_aot.END in text
    table = text.split(triton_aot.START)[1].split(triton_aot.END)[0]
    documented = {tuple(c.strip() for c in line.strip("|").split("|")[:5])
                  for line in table.strip().splitlines()[2:]}
    launched = {tuple(c.strip() for c in line.strip("|").split("|")[:5])
                for line in triton_aot.table([(r.launch_view(), {}) for r in _rows(90)]).splitlines()[2:]}
    assert documented == launched, (f"stale docs/triton.md table: missing {sorted(launched - documented)}, "
                                    f"extra {sorted(documented - launched)}; run python -m psmc.triton_aot "
                                    "--write-docs")


def test_a_compile_error_is_reported_not_raised():
    """A kernel that does not compile for the target (a loop-carried variable changing type, the
    bug the matrix backward kernels had) is a failed result with the compiler's message."""
    with triton_aot.clean_pool(1) as pool:
        result = pool.submit(triton_aot.compile_error_probe, 90).result()
    assert not result.ok and "Loop-carried variable r" in result.error, result.error


@pytest.mark.sm90
def test_half_precision_launches_compile_within_the_spill_budget():
    """A call with bf16 inputs hands them to the generated kernels as given and has them write
    bf16 outputs (psmc.runtime.triton_support._given_inputs, _output_dtype): those launches
    compile for sm_90 too, with bf16 pointers where the inputs and outputs are (the loads widen
    to fp32), for every example with generated kernels."""
    import torch
    with triton_aot.clean_pool(1) as pool:
        results = pool.submit(triton_aot.compile_half_forwards, 90).result()
    assert {"cumsum", "selective_ssm", "softmax_pool", "gla", "rwkv6"} <= set(results)
    for example, (dtypes, result) in results.items():
        floats = {n: d for n, d in dtypes.items() if d.is_floating_point}
        assert floats and set(floats.values()) == {torch.bfloat16}, (example, dtypes)
        assert result.ok, (example, result.error)
        assert result.spill_stores <= triton_aot.spill_allowance(example, "forward (bf16)"), (example, result)


def _warps_per_cta(layout: str) -> list:
    return [int(n) for n in layout.split("warpsPerCTA = [")[1].split("]")[0].split(",")]


@pytest.mark.sm90
def test_first_order_layouts_where_time_goes():
    """The first-order scan kernel's tilings as compiled for sm_90 (the TTGIR layouts): in
    'in-thread' every warp takes channels and no tile axis of time is split across warps or
    threads, so the scan needs no shared memory; in 'split' (the default until a GPU times both:
    benchmarks/gpu.py) the warps split the tile's time axis and the scan goes through shared
    memory; 'narrow' is one warp per tile. None spills."""
    with triton_aot.clean_pool(1) as pool:
        results = pool.submit(triton_aot.compile_first_order_layouts, 90).result()
    consts, inthread = results["in-thread"]
    assert inthread.ok and inthread.spill_stores == 0, inthread
    tiles = [l for l in inthread.layouts if "threadsPerWarp = [1, 32]" in l]  # the [BLOCK_T, BLOCK_C] tiles
    assert tiles and all(_warps_per_cta(l) == [1, consts["num_warps"]] for l in tiles), inthread.layouts
    assert inthread.shared == 0, inthread
    consts, split = results["split"]
    assert split.ok and split.spill_stores == 0, split
    assert any(_warps_per_cta(l)[0] > 1 for l in split.layouts) and split.shared > 0, split
    # narrow: one warp per [64, 32] tile; 4-channel vectors over 8 threads, time over the other 4
    # (warp shuffles: no tile axis across warps)
    consts, narrow = results["narrow"]
    assert narrow.ok and narrow.spill_stores == 0 and consts["num_warps"] == 1, narrow
    assert any("sizePerThread = [1, 4], threadsPerWarp = [4, 8]" in l for l in narrow.layouts), narrow.layouts


EXCLUSIVE_SCALAR = """
op excl_sum {
  state (h: f32);
  lift (x: f32) { return x; }
  combine (l, r) { return l.h + r.h; }
  identity = (zeros);
  readout exclusive (p, x: f32) { return p.h * x; }
}
"""


@pytest.mark.sm90
def test_an_exclusive_readout_of_scalar_states_compiles_on_the_state_tile():
    """No example has one: its state tile of one column ([lanes, 1]) is compiled from source,
    every pass, within the spill budget."""
    with triton_aot.clean_pool(1) as pool:
        results = pool.submit(triton_aot.compile_source, EXCLUSIVE_SCALAR, "excl_sum", 90).result()
    passes = {p for p, _ in results}
    assert {"forward", "forward (training)", "backward", "step", "forward (packed)"} <= passes, passes
    for passname, result in results:
        assert result.ok, (passname, result.error)
        assert result.spill_stores <= triton_aot.SPILL_BUDGET[passname], (passname, result)


LOGADDEXP = """
op lae {
  state (y: f32);
  lift (x: f32) { return x; }
  combine (l, r) { return log(exp(l.y) + exp(r.y)); }
  identity = (-inf);
  readout (s) { return s.y; }
}
"""


@pytest.mark.sm90
def test_logaddexp_kernels_compile():
    """No example uses logaddexp (the naive spelling above is rewritten to it): its block-scan
    kernels, every pass, compile for sm_90 within the spill budget."""
    with triton_aot.clean_pool(1) as pool:
        results = pool.submit(triton_aot.compile_source, LOGADDEXP, "lae", 90).result()
    passes = {p for p, _ in results}
    assert {"forward", "forward (training)", "backward", "step"} <= passes, passes
    for passname, result in results:
        assert result.ok, (passname, result.error)
        assert result.spill_stores <= triton_aot.SPILL_BUDGET[passname], (passname, result)
