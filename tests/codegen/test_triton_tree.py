"""The tree-scan Triton kernels (psmc.codegen.triton_tree) under TRITON_INTERPRET=1: the paper's
fixed tree of non-associative elementwise ops in one forward and one backward launch, equal to
the torch tree (psmc.runtime.tree, whose brackets tests/codegen/test_bracketing.py checks).

Every case runs a sequence in three calls (11 leaves, 1, then 25), each continuing the state of
the one before, so the kernels start from counters of 11 and 12 leaves (roots at several
levels, folds read from the state) and cross levels 0-5 inside a call. Gradients flow through
the states into the earlier calls' kernels, so the adjoints of the entering counter are checked
too. The programs: the ema example, hand-written ones (two fields with a param, vector fields,
an exclusive readout) and programs of the fuzz generator whose plan gets the kernels."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import psmc
from psmc.codegen import triton_tree as printer
from psmc.compiler import compile_source
from psmc.runtime import triton_tree
from triton_helpers import close, layer_class

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "fuzz"))
from generator import generate  # noqa: E402

pytestmark = pytest.mark.triton

HAND_WRITTEN = {
    "blend": """op blend {
  param w: f32;
  state (a: f32, c: f32);
  lift (x: f32, z: f32) { return (x, z); }
  combine (l, r) { return (w * l.a + (1.0 - w) * tanh(r.a) * l.c, l.c * sigmoid(r.c) + r.a * w); }
  readout (s) { return s.a * s.c; }
}""",
    "vec": """op vec[D] {
  param g: f32 = ones;
  state (h: f32[D]);
  lift (x: f32[D]) { return x; }
  combine (l, r) { return tanh(g * l.h + r.h * D / 4.0); }
  readout (s, y: f32[D]) { return s.h * y; }
}""",
    "shifted": """op shifted {
  state (y: f32);
  lift (x: f32) { return x; }
  combine (l, r) { return 0.7 * l.y + 0.3 * r.y * r.y; }
  identity = 0.0;
  assume empty_prefix;
  readout exclusive (p, x: f32) { return p.y + x; }
}""",
}
DIMS = {"vec": {"D": 3}}
GENERATED = (4, 8, 15, 37, 141, 226)  # fuzz seeds whose plan gets the tree kernels (asserted below)
SPLITS = ((0, 11), (11, 12), (12, 37))


def _class(name: str, tmp_path: Path):
    if name == "ema":
        return layer_class("ema")
    if name in HAND_WRITTEN:
        path = tmp_path / f"{name}.psm"
        path.write_text(HAND_WRITTEN[name])
        return psmc.load(path).__psmc_layers__[name]
    program = generate(int(name))
    path = tmp_path / f"g{name}.psm"
    path.write_text(program.text)
    DIMS[name] = dict(program.dims)
    return psmc.load(path).__psmc_layers__[program.name]


def _pair(cls, name: str, **options):
    torch.manual_seed(0)
    ref = cls(backend="torch", **DIMS.get(name, {}), **options)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.3 * torch.randn_like(p))
    tri = cls(backend="triton", **DIMS.get(name, {}), **options)
    tri.load_state_dict(ref.state_dict())
    return ref, tri


def _inputs(layer, lanes: tuple, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for slot in layer.spec.inputs:
        shape = (2, SPLITS[-1][1]) + lanes + tuple(int(s) for s in slot.shape(dict(layer.dims)))
        if slot.dtype in ("i32", "i64"):
            out[slot.name] = torch.randint(0, 3, shape, generator=g)
        elif slot.dtype == "bool":
            out[slot.name] = torch.rand(shape, generator=g) > 0.5
        else:
            out[slot.name] = (torch.randn(shape, generator=g) * 0.5).requires_grad_()
    return out


def _chained(layer, inputs: dict) -> tuple:
    """The outputs of three calls, each continuing the state of the one before, joined."""
    state, parts = None, []
    for lo, hi in SPLITS:
        out, state = layer(**{n: x[:, lo:hi] for n, x in inputs.items()}, state=state, return_state=True)
        parts.append(out if isinstance(out, tuple) else (out,))
    return tuple(torch.cat(p, dim=1) for p in zip(*parts))


def _launches(monkeypatch) -> list:
    seen = []
    real = triton_tree._launch

    def spy(kernel, kind, *args):
        seen.append(kind)
        return real(kernel, kind, *args)

    monkeypatch.setattr(triton_tree, "_launch", spy)
    return seen


def _float_grads(outputs: tuple, wrt: list) -> list:
    loss = sum((o * torch.linspace(-1, 1, o.shape[1]).reshape(1, -1, *[1] * (o.dim() - 2))).sum()
               for o in outputs if o.is_floating_point())
    return list(torch.autograd.grad(loss, wrt, allow_unused=True))


@pytest.mark.parametrize("lanes", [(), (3,)])
@pytest.mark.parametrize("name", ["ema", *HAND_WRITTEN, *map(str, GENERATED)])
def test_tree_kernels_equal_the_torch_tree(name, lanes, tmp_path, monkeypatch):
    cls = _class(name, tmp_path)
    assert getattr(cls, "_tree_kernels", None) is not None, f"{name}: the plan should get the tree kernels"
    ref, tri = _pair(cls, name)
    inputs = _inputs(ref, lanes, seed=len(name))
    launches = _launches(monkeypatch)
    got, want = _chained(tri, inputs), _chained(ref, inputs)
    assert launches == ["forward"] * len(SPLITS)  # one launch per call: the kernels served every call
    for i, (g, w) in enumerate(zip(got, want)):
        close(w, g, f"{name} output {i}")
    wrt = [x for x in inputs.values() if x.requires_grad] + list(ref.parameters())
    mine = [x for x in inputs.values() if x.requires_grad] + list(tri.parameters())
    want_grads = _float_grads(want, wrt)
    got_grads = _float_grads(got, mine)
    # the leaves need a gradient when the lift reads a float input or the combine a param
    # (a lift of constants, with the gradient reaching readout inputs only, runs no backward)
    leaves_need = bool(cls._tree_kernels.params) or any(s.dtype in ("f32", "f64", "f16", "bf16")
                                                        for s in cls.spec.lift_inputs)
    assert launches.count("backward") == (len(SPLITS) if leaves_need else 0)
    for i, (g, w) in enumerate(zip(got_grads, want_grads)):
        if w is None:
            assert g is None or not g.any(), f"{name}: gradient {i} where torch has none"
            continue
        close(w, g, f"{name} gradient {i}")


def test_the_generated_programs_are_tree_plans_with_kernels():
    """GENERATED must keep meaning 'fuzz programs the kernels serve' if the generator changes."""
    for seed in GENERATED:
        compiled = compile_source(generate(seed).text, f"g{seed}.psm")
        op = compiled.ops[0]
        assert compiled.plans[op.name].scan == "tree-scan", seed
        assert printer.unsupported_reason(op, compiled.plans[op.name]) is None, seed


def test_per_lane_params_get_their_own_gradients(tmp_path):
    cls = _class("blend", tmp_path)
    ref, tri = _pair(cls, "blend", lanes=(3,), per_lane=True)
    with torch.no_grad():
        ref.p_w.copy_(torch.tensor([0.2, 0.5, 0.9]))
        tri.p_w.copy_(ref.p_w)
    inputs = _inputs(ref, (3,), seed=3)
    got, want = _chained(tri, inputs), _chained(ref, inputs)
    close(want[0], got[0], "per-lane output")
    (gw,) = _float_grads(got, [tri.p_w])
    (ww,) = _float_grads(want, [ref.p_w])
    assert gw.shape == (3,)
    close(ww, gw, "per-lane param gradient")


def test_auto_chooses_the_torch_tree_for_cpu_tensors(monkeypatch):
    """backend='auto' runs Triton kernels for CUDA tensors only (the dispatch rule)."""
    launches = _launches(monkeypatch)
    layer = layer_class("ema")()
    out = layer(y=torch.randn(2, 9, 4))
    assert out.shape == (2, 9, 4) and launches == []


def test_packed_sequences_run_one_tree_each(monkeypatch):
    """Each packed sequence has its own tree: one launch per length, outputs as each alone."""
    layer = layer_class("ema")(backend="triton")
    y = torch.randn(1, 9, 2)
    launches = _launches(monkeypatch)
    out = layer(y=y, cu_seqlens=torch.tensor([0, 4, 9]))
    assert launches == ["forward", "forward"]
    for lo, hi in ((0, 4), (4, 9)):
        close(layer_class("ema")(backend="torch")(y=y[:, lo:hi]), out[:, lo:hi], f"sequence {lo}:{hi}")


@pytest.mark.parametrize("source, words", [
    ("examples/tree_rnn.psm", "combine structure is 'general', not 'elementwise'"),
    ("examples/transformer_psm.psm", "chunk op: its Agg runs over whole chunks"),
    ("op m { state (a: f32, b: f32[D]); combine (l, r) { return (0.5 * l.a + r.a, l.b * r.b + r.b); } }",
     "state fields of different shapes"),
    ("op i { state (a: f32, n: i64); combine (l, r) { return (0.5 * l.a + r.a, l.n * r.n + 1); } }",
     "state field 'n' is i64: the tree kernel holds float fields"),
])
def test_ops_the_tree_kernels_do_not_serve_say_why(source, words):
    root = Path(__file__).resolve().parents[2]
    text = (root / source).read_text() if source.endswith(".psm") else source.replace("[D]", "[3]")
    compiled = compile_source(text, "t.psm")
    op = compiled.ops[0]
    plan = compiled.plans[op.name]
    assert plan.scan == "tree-scan"
    reason = printer.unsupported_reason(op, plan)
    assert reason is not None and reason.startswith(words), reason
    assert ("triton", reason) in plan.not_taken
