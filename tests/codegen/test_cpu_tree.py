"""The C++ tree kernels (psmc.codegen.cpp_tree): the paper's fixed tree of a non-associative
elementwise op in one C++ call forward and one backward, equal to the torch tree in float64
(to roundoff: the same brackets, the same operations) and float32.

The cases are tree_cases.py's (three chained calls, gradients through the states into the
earlier calls); the C++ kernels also serve f64 fields (fuzz seeds 8 and 141), which the Triton
kernels leave to torch. Without a compiler the layer warns and the torch tree serves it
(backend='auto' quietly)."""
from __future__ import annotations

import pytest
import torch

from psmc.codegen import cpp_tree
from psmc.compiler import compile_source
from psmc.runtime import cpu_support, dispatch
from tree_cases import (CPU_SEEDS, HAND_WRITTEN, SPLITS, compare_cache_steps, compare_chained, compare_packed,
                        generate, inputs_of, launches, leaves_need_grads, pair, tree_class)
from triton_helpers import close, layer_class

needs_compiler = pytest.mark.skipif(cpu_support.compiler() is None, reason="no C++ compiler on this machine")


def _close64(ref, out, what=""):
    assert ref.shape == out.shape and ref.dtype == out.dtype, what
    assert torch.allclose(ref, out, rtol=1e-12, atol=1e-12, equal_nan=False), \
        f"{what}: max abs error {(ref - out).abs().max().item()}"


@needs_compiler
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name", ["ema", *HAND_WRITTEN, *map(str, CPU_SEEDS)])
def test_cpu_tree_kernels_equal_the_torch_tree(name, dtype, tmp_path, monkeypatch):
    cls = tree_class(name, tmp_path)
    assert getattr(cls, "_cpu_tree_kernels", None) is not None, f"{name}: the plan should get the C++ tree kernels"
    ref, cpu = pair(cls, name, "cpu")
    ref.to(dtype)
    cpu.to(dtype)
    seen = launches(monkeypatch)
    compare_chained(ref, cpu, inputs_of(ref, (5,), seed=len(name), dtype=dtype),
                    _close64 if dtype == torch.float64 else close, f"{name} {dtype}")
    assert seen.count("forward") == len(SPLITS)
    assert seen.count("backward") == (len(SPLITS) if leaves_need_grads(cls) else 0)


@needs_compiler
@pytest.mark.parametrize("name", ["ema", "blend", "shifted", "indexed", "vec", "mix"])
def test_packed_sequences_run_in_one_call(name, tmp_path, monkeypatch):
    ref, cpu = pair(tree_class(name, tmp_path), name, "cpu")
    compare_packed(ref, cpu, launches(monkeypatch), close, name)


@needs_compiler
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name", ["ema", "blend", "shifted", "indexed", "mix", "8"])
def test_a_tree_cache_decodes_in_one_step_call(name, dtype, tmp_path, monkeypatch):
    """backend='cpu' steps a TreeCache with the C++ step kernel (one call for every row), equal
    to the torch push; f64 fields too (fuzz seed 8)."""
    ref, cpu = pair(tree_class(name, tmp_path), name, "cpu")
    ref.to(dtype)
    cpu.to(dtype)
    compare_cache_steps(ref, cpu, launches(monkeypatch), _close64 if dtype == torch.float64 else close, name, dtype)


def test_the_generated_programs_get_cpu_tree_kernels():
    for seed in CPU_SEEDS:
        compiled = compile_source(generate(seed).text, f"g{seed}.psm")
        op = compiled.ops[0]
        assert compiled.plans[op.name].scan == "tree-scan", seed
        assert cpp_tree.unsupported_reason(op, compiled.plans[op.name]) is None, seed


@needs_compiler
def test_auto_runs_them_for_cpu_tensors(monkeypatch):
    """backend='auto' chooses the C++ tree (cost 20) over the torch tree (90) for CPU tensors;
    PSMC_CPU=0 (set for the rest of the suite) keeps it on torch."""
    layer = layer_class("ema")()
    y = torch.randn(2, 9, 4)
    monkeypatch.setenv("PSMC_CPU", "1")
    assert dispatch.choose(layer, layer._prepare({"y": y}, step=False), "forward").name == "cpu-tree"
    seen = launches(monkeypatch)
    out = layer(y=y)
    assert seen == ["forward"]
    close(layer_class("ema")(backend="torch")(y=y), out, "auto")
    monkeypatch.setenv("PSMC_CPU", "0")
    assert dispatch.choose(layer, layer._prepare({"y": y}, step=False), "forward").name == "torch-scan"


@needs_compiler
def test_torch_compile_runs_the_torch_tree_inside_a_graph(monkeypatch):
    layer = layer_class("ema")(backend="cpu")
    y = torch.randn(2, 9, 4)
    seen = launches(monkeypatch)
    compiled = torch.compile(layer, fullgraph=True)
    out = compiled(y=y)
    close(layer_class("ema")(backend="torch")(y=y), out, "compiled")
    assert seen == []


def test_psmc_check_lists_the_cpu_tree_kernels():
    from psmc.compiler import codegen_notes
    with open(_example("ema")) as f:
        compiled = compile_source(f.read(), "ema.psm")
    op = compiled.ops[0]
    assert codegen_notes(op, compiled.plans[op.name])["cpu"].startswith("cpu: fused C++ tree forward + backward")


def _example(name: str) -> str:
    from pathlib import Path
    return str(Path(__file__).resolve().parents[2] / "examples" / f"{name}.psm")
