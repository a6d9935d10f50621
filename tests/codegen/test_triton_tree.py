"""The tree-scan Triton kernels (psmc.codegen.triton_tree) under TRITON_INTERPRET=1: the paper's
fixed tree of non-associative elementwise ops in one forward and one backward launch, equal to
the torch tree (psmc.runtime.tree, whose brackets tests/codegen/test_bracketing.py checks).

Every case (tree_cases.py) runs a sequence in three calls (11 leaves, 1, then 25), each
continuing the state of the one before, so the kernels start from counters of 11 and 12 leaves
(roots at several levels, folds read from the state) and cross levels 0-5 inside a call.
Gradients flow through the states into the earlier calls' kernels, so the adjoints of the
entering counter are checked too."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from psmc.codegen import triton_tree as printer
from psmc.compiler import compile_source
from tree_cases import (HAND_WRITTEN, SPLITS, TRITON_SEEDS, chained, compare_cache_steps, compare_chained,
                        compare_packed, float_grads, generate, inputs_of, launches, leaves_need_grads, pair, tree_class)
from triton_helpers import close, layer_class

pytestmark = pytest.mark.triton


@pytest.mark.parametrize("lanes", [(), (3,)])
@pytest.mark.parametrize("name", ["ema", *HAND_WRITTEN, *map(str, TRITON_SEEDS)])
def test_tree_kernels_equal_the_torch_tree(name, lanes, tmp_path, monkeypatch):
    cls = tree_class(name, tmp_path)
    assert getattr(cls, "_tree_kernels", None) is not None, f"{name}: the plan should get the tree kernels"
    ref, tri = pair(cls, name, "triton")
    seen = launches(monkeypatch)
    compare_chained(ref, tri, inputs_of(ref, lanes, seed=len(name)), close, name)
    # one launch per call and pass: the kernels served every call
    assert seen.count("forward") == len(SPLITS)
    assert seen.count("backward") == (len(SPLITS) if leaves_need_grads(cls) else 0)


def test_the_generated_programs_are_tree_plans_with_kernels():
    """TRITON_SEEDS must keep meaning 'fuzz programs the kernels serve' if the generator changes."""
    for seed in TRITON_SEEDS:
        compiled = compile_source(generate(seed).text, f"g{seed}.psm")
        op = compiled.ops[0]
        assert compiled.plans[op.name].scan == "tree-scan", seed
        assert printer.unsupported_reason(op, compiled.plans[op.name]) is None, seed


def test_per_lane_params_get_their_own_gradients(tmp_path):
    cls = tree_class("blend", tmp_path)
    ref, tri = pair(cls, "blend", "triton", lanes=(3,), per_lane=True)
    with torch.no_grad():
        ref.p_w.copy_(torch.tensor([0.2, 0.5, 0.9]))
        tri.p_w.copy_(ref.p_w)
    inputs = inputs_of(ref, (3,), seed=3)
    got, want = chained(tri, inputs), chained(ref, inputs)
    close(want[0], got[0], "per-lane output")
    (gw,) = float_grads(got, [tri.p_w])
    (ww,) = float_grads(want, [ref.p_w])
    assert gw.shape == (3,)
    close(ww, gw, "per-lane param gradient")


def test_auto_chooses_the_torch_tree_for_cpu_tensors(monkeypatch):
    """backend='auto' runs Triton kernels for CUDA tensors only (the dispatch rule; PSMC_CPU=0 in
    the suite keeps the C++ tree kernels out too)."""
    seen = launches(monkeypatch)
    layer = layer_class("ema")()
    out = layer(y=torch.randn(2, 9, 4))
    assert out.shape == (2, 9, 4) and seen == []


@pytest.mark.parametrize("name", ["ema", "blend", "shifted", "indexed", "vec", "mix"])
def test_packed_sequences_run_in_one_launch(name, tmp_path, monkeypatch):
    """Each packed sequence has its own tree, all in one launch (program b runs sequence b)."""
    ref, tri = pair(tree_class(name, tmp_path), name, "triton")
    compare_packed(ref, tri, launches(monkeypatch), close, name)


@pytest.mark.parametrize("source, words", [
    ("examples/tree_rnn.psm", "combine structure is 'general', not 'elementwise'"),
    ("examples/transformer_psm.psm", "chunk op: its Agg runs over whole chunks"),
    ("op m { state (a: f32[D], b: f32[E]); combine (l, r) { return (0.5 * l.a + r.a, l.b * r.b + r.b); } }",
     "vector fields of different shapes"),
    ("op q { state (a: f32[D, D]); combine (l, r) { return 0.5 * l.a + r.a * r.a; } }",
     "state field 'a' has rank 2: the tree kernel holds scalar or vector fields"),
    ("op i { state (a: f32, n: i64); combine (l, r) { return (0.5 * l.a + r.a, l.n * r.n + 1); } }",
     "state field 'n' is i64: the tree kernel holds bf16/f16/f32 fields"),
    ("op w { state (a: f64); combine (l, r) { return 0.5 * l.a + r.a * r.a; } }",
     "state field 'a' is f64: the tree kernel holds bf16/f16/f32 fields"),
])
def test_ops_the_tree_kernels_do_not_serve_say_why(source, words):
    root = Path(__file__).resolve().parents[2]
    text = (root / source).read_text() if source.endswith(".psm") else \
        source.replace("[D]", "[3]").replace("[E]", "[4]").replace("[D, D]", "[3, 3]")
    compiled = compile_source(text, "t.psm")
    op = compiled.ops[0]
    plan = compiled.plans[op.name]
    assert plan.scan == "tree-scan"
    reason = printer.unsupported_reason(op, plan)
    assert reason is not None and reason.startswith(words), reason
    assert ("triton", reason) in plan.not_taken


def test_few_lanes_get_smaller_programs(monkeypatch):
    """A program holds one lane per thread, 32 to 128 of them (a warp to four): few lanes
    spread over more, smaller programs instead of idling threads."""
    from psmc.runtime import tree_kernels
    assert [tree_kernels.lane_block(n) for n in (1, 32, 33, 100, 128, 5000)] == [32, 32, 64, 128, 128, 128]
    seen = []
    real = tree_kernels.TreeKernels.launch

    def spy(self, kind, args, B, L):
        seen.append((args["BLOCK_C"], L))
        return real(self, kind, args, B, L)

    monkeypatch.setattr(tree_kernels.TreeKernels, "launch", spy)
    y = torch.randn(2, 7, 3)
    close(layer_class("ema")(backend="torch")(y=y), layer_class("ema")(backend="triton")(y=y), "few lanes")
    assert seen == [(32, 3)]


@pytest.mark.parametrize("name", ["ema", *HAND_WRITTEN, *map(str, TRITON_SEEDS)])
def test_a_tree_cache_decodes_in_one_step_launch(name, tmp_path, monkeypatch):
    ref, tri = pair(tree_class(name, tmp_path), name, "triton")
    compare_cache_steps(ref, tri, launches(monkeypatch), close, name)


def test_a_tree_cache_token_autograd_records_runs_the_torch_push(tmp_path, monkeypatch):
    """The step kernel has no backward: a token stepped with gradients on (a param that
    requires grad, or inputs that do) runs the torch push, so the gradients are torch's."""
    from psmc.runtime.state import TreeCache
    ref, tri = pair(tree_class("blend", tmp_path), "blend", "triton")
    seen = launches(monkeypatch)
    x = {n: torch.randn(3, 2, requires_grad=True) for n in ("x", "z")}
    outs = []
    for layer in (ref, tri):
        cache = layer.init_state(3, capacity=15)
        for _ in range(5):
            y, cache = layer.step(cache, **x)
        outs.append(torch.autograd.grad(y.sum(), [*x.values(), layer.p_w]))
    assert seen == []
    for a, b in zip(*outs):
        close(a, b, "blend cache gradient")
    with torch.no_grad():
        tri.step(TreeCache.of(tri(**{n: v.detach()[:, None] for n, v in x.items()}, return_state=True)[1], 15),
                 **x)
    assert seen == ["forward", "step"]
