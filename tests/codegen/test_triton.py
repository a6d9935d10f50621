"""The Triton backend under TRITON_INTERPRET=1: every IR op has a rendering or a reason, and the
generated forward / step kernels equal the torch backend (fp32, DESIGN.md tolerances).

The interpreter runs tl.associative_scan as a sequential fold, so bracketing is tested by the
torch backend's tests, not here; block sizes below T exercise the carry between blocks."""
from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before any @triton.jit runs

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from psmc.codegen import triton_kernels as tk  # noqa: E402
from psmc.codegen import triton_printer as tp  # noqa: E402
from psmc.ir import ops_from_file, ops_from_source  # noqa: E402
from psmc.ir.ops import OPS  # noqa: E402
from psmc.runtime import triton_support as ts  # noqa: E402
from psmc.runtime.state import ScanState  # noqa: E402
from triton_helpers import close as _close, layer_class  # noqa: E402

pytestmark = pytest.mark.triton

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
SUPPORTED = ["cumsum", "linear_recurrence", "logcumsumexp", "running_argmax", "welford", "segmented_sum",
             "selective_ssm", "softmax_pool"]
LANES = (3,)
DIMS = {"selective_ssm": {"N": 4}, "softmax_pool": {"V": 5}}


def _inputs(layer, B: int, T: int | None, seed: int) -> dict:
    """Random inputs [B, (T,) *lanes, *declared] in ranges where every example is well-posed;
    selective_ssm's B is shared by the lanes (a size-1 lane axis: a stride-0 load)."""
    g = torch.Generator().manual_seed(seed)
    dims = dict(layer.dims)
    lead = (B,) if T is None else (B, T)
    out = {}
    for slot in layer.spec.inputs:
        lanes = (1,) if slot.name == "B" else LANES
        shape = lead + lanes + tuple(int(s) for s in slot.shape(dims))
        if slot.dtype == "bool":
            x = torch.rand(shape, generator=g) > 0.7
        elif slot.name == "log_a":
            x = -torch.rand(shape, generator=g) * 0.5
        elif slot.name == "delta":
            x = torch.rand(shape, generator=g) * 0.5
        elif slot.name == "A":
            x = -torch.rand(shape, generator=g)
        elif slot.name == "x" and layer.spec.name == "running_argmax":
            x = torch.randint(0, 4, shape, generator=g).float()  # ties: the earliest position wins
        else:
            x = torch.randn(shape, generator=g)
        out[slot.name] = x
    return out


def _outputs(result) -> tuple:
    return result if isinstance(result, tuple) else (result,)


# ---------------------------------------------------------------------- the op table
def test_every_ir_op_has_a_rendering_or_a_reason():
    assert set(tp.TRITON_OPS) == set(OPS)
    for op, rendering in tp.TRITON_OPS.items():
        assert rendering == "special" or isinstance(rendering, tp.Unsupported) or "{0}" in rendering, op
        if isinstance(rendering, tp.Unsupported):
            assert rendering.reason


def test_no_python_semantics_in_renderings():
    source = "op m { state (a: f32, b: f32); lift (x: f32) { return (x, x); } " \
             "combine (l, r) { return (max(l.a, r.a), if r.a > l.a then min(l.b, r.b) else l.b / 2); } }"
    op = ops_from_source(source)[0]
    text = tk.generate(op, {"plan": "exact-scan"})
    assert "tl.maximum(" in text and "tl.minimum(" in text and "tl.where(" in text
    assert " max(" not in text and " min(" not in text and " if " not in text.split("def _psm_Op_m_combine")[1] \
        .split("return")[0]
    assert tp.literal(float("-inf")) == "float('-inf')" and tp.literal(2.0) == "2.0" and tp.literal(True) == "True"


def test_unsupported_ops_are_reported_not_generated():
    for name, words in (("delta_rule", "'eye'"), ("tree_rnn", "tree-scan")):
        op = ops_from_file(EXAMPLES / f"{name}.psm")[0]
        plan = {"plan": "tree-scan" if name == "tree_rnn" else "exact-scan"}
        assert words in tp.unsupported_reason(op, plan)
        assert tk.generate(op, plan) is None
    # a tree scan gets no block scan, but an elementwise one gets the tree kernels (test_triton_tree.py)
    op = ops_from_file(EXAMPLES / "ema.psm")[0]
    assert "tree-scan" in tp.unsupported_reason(op, {"plan": "tree-scan"})
    assert "_psm_Op_ema_tree_forward" in tk.generate(op, {"plan": "tree-scan"})
    # an exclusive readout of scalar states: no block scan, the state tile of one column
    # instead (test_triton_state.py)
    op = ops_from_source("op ex { state (a: f32); lift (x: f32) { return x; } combine (l, r) { return l.a + r.a; } "
                         "identity = zeros; readout exclusive (p, x: f32) { return p.a + x; } }")[0]
    assert tp.unsupported_reason(op, {"plan": "exact-scan"}) is None
    assert "BLOCK_R" in tk.generate(op, {"plan": "exact-scan"})
    op = ops_from_file(EXAMPLES / "cumsum.psm")[0]
    assert "not 'elementwise'" in tp.unsupported_reason(op, {"plan": "exact-scan", "structure": "affine"})


def test_generation_is_deterministic():
    op = ops_from_file(EXAMPLES / "softmax_pool.psm")[0]
    assert tk.generate(op, None) == tk.generate(op, None)


# ---------------------------------------------------------------------- kernels vs torch
@pytest.mark.parametrize("name", SUPPORTED)
def test_forward_and_stream_equal_torch(name):
    cls = layer_class(name)
    layer = cls(backend="torch", **DIMS.get(name, {}))
    assert cls._triton_kernels is not None
    with torch.no_grad():
        for T, block_t in ((1, 4), (5, 2), (64, 16), (130, 32)):
            inputs = _inputs(layer, 2, T, seed=T)
            ref, ref_state = layer(**inputs, return_state=True)
            call = layer._prepare(dict(inputs), step=False)
            outs, state = ts.forward(layer, call, None, block_t=block_t)
            for r, o in zip(_outputs(ref), outs):
                _close(r, o)
            for r, o in zip(ref_state.prefix, state.prefix):
                assert (r is None) == (o is None)  # a dead field is left out by both
                if r is not None:
                    _close(r.expand_as(o), o)
            assert state.size == T
        # a stream continued from a state equals the whole sequence in one pass
        inputs = _inputs(layer, 2, 37, seed=7)
        ref = _outputs(layer(**inputs))
        first = {k: v[:, :20] for k, v in inputs.items()}
        rest = {k: v[:, 20:] for k, v in inputs.items()}
        _, state = ts.forward(layer, layer._prepare(dict(first), step=False), None, block_t=8)
        outs, state = ts.forward(layer, layer._prepare(dict(rest), step=False), state, block_t=8)
        for r, o in zip(ref, outs):
            _close(r[:, 20:], o)
        assert state.size == 37


@pytest.mark.parametrize("name", SUPPORTED)
def test_step_kernel_equals_torch(name):
    cls = layer_class(name)
    layer = cls(backend="torch", **DIMS.get(name, {}))
    inputs = _inputs(layer, 2, 5, seed=3)
    with torch.no_grad():
        ref = _outputs(layer(**inputs))
        state = layer.init_state()
        for t in range(5):
            token = {k: v[:, t] for k, v in inputs.items()}
            outs, state = ts.step(layer, layer._prepare(dict(token), step=True), state)
            for r, o in zip(ref, outs):
                _close(r[:, t], o)
        assert isinstance(state, ScanState) and state.size == 5


# ---------------------------------------------------------------------- backend choice
def test_backend_choice():
    cls = layer_class("cumsum")
    inputs = {"x": torch.randn(2, 5, 3)}
    auto = cls(backend="auto")
    assert not ts.use_triton(auto, auto._prepare(dict(inputs), step=False))  # CPU tensors: torch
    forced = cls(backend="triton")
    with torch.no_grad():
        assert ts.use_triton(forced, forced._prepare(dict(inputs), step=False))  # the interpreter
    wants_grad = {"x": torch.randn(2, 5, 3, requires_grad=True)}
    assert ts.use_triton(forced, forced._prepare(dict(wants_grad), step=False))  # the generated backward
    doubles = {"x": torch.randn(2, 5, 3, dtype=torch.float64)}
    with torch.no_grad(), pytest.raises(RuntimeError, match="float64"):
        ts.use_triton(forced, forced._prepare(dict(doubles), step=False))
    assert not ts.use_triton(cls(backend="torch"), auto._prepare(dict(inputs), step=False))


def _generated_kernels():
    from psmc.compiler import compile_source
    for path in sorted(EXAMPLES.glob("*.psm")):
        source = compile_source(path.read_text(), path.name).source
        for chunk in source.split("@_psm_jit\ndef ")[1:]:
            name = chunk.split("(", 1)[0]
            if name.endswith(("_forward", "_step", "_backward")):
                yield path.stem, name, chunk


def test_generated_kernels_put_the_lanes_on_grid_axis_0():
    """Grid axes 1 and 2 hold at most 65,535 programs, axis 0 up to 2**31 - 1: every generated
    forward / step / backward kernel takes its lane (or lane tile) from axis 0 and its batch row
    from the last axis."""
    kernels = list(_generated_kernels())
    assert len({name for _, name, _ in kernels}) >= 20, [name for _, name, _ in kernels]
    for example, name, body in kernels:
        assert "lane = tl.program_id(0)" in body, (example, name)
        assert "b = tl.program_id(1)" in body or "b = tl.program_id(2)" in body, (example, name)


def test_calls_past_32_bit_offsets_go_to_torch(monkeypatch):
    """The generated kernels index in 32 bits: a call with a tensor of 2**31 elements or more is
    not theirs (auto takes the torch path; backend='triton' says why). The limit is lowered here
    so that small tensors cross it."""
    cls = layer_class("running_argmax")  # the generated block-scan kernels (no first-order scan)
    layer = cls(backend="triton")
    inputs = _inputs(layer, 2, 7, 0)
    want = cls(backend="torch")(**inputs)
    bound = 2 * 7 * 3  # B * T * lanes: the largest tensor of this call
    monkeypatch.setattr(ts, "INT32_ELEMENTS", bound + 1)
    _close(layer(**inputs), want)
    monkeypatch.setattr(ts, "INT32_ELEMENTS", bound)
    with pytest.raises(RuntimeError, match=r"holds 42 elements: the generated kernels index in 32 bits"):
        layer(**inputs)
    _close(cls(backend="auto")(**inputs), want)


@pytest.mark.parametrize("mode", ["lanes", "state", "matrix"])
def test_the_launch_grid_puts_any_lane_count_on_axis_0(mode):
    """70,000 lanes (more than a grid axis 1 or 2 may hold) go on axis 0; the column tiles and
    the batch on the others."""
    class Kernels:
        full_tile = False
        axis = staticmethod(lambda d: 40)
        cols = staticmethod(lambda d: 300)

    Kernels.mode = mode

    class Call:
        class ctx:
            d = {}
    g = ts._geometry(Kernels, Call, (3, 5, 70_000), T=5)
    if mode == "lanes":
        assert g.grid == (ts.triton_cdiv(70_000, g.block_c), 3)
    elif mode == "state":  # blocks of lanes (the tile's rows) x column tiles of S
        assert g.grid == (ts.triton_cdiv(70_000, g.block_r), ts.triton_cdiv(40, g.block_c), 3)
        assert g.block_r * g.block_c <= ts.STATE_TILE_ELEMENTS and g.block_r > 1
    else:
        assert g.grid == (70_000, ts.triton_cdiv(300, g.block_c), 3)


def test_a_batch_beyond_the_grid_goes_to_torch(monkeypatch):
    cls = layer_class("running_argmax")
    inputs = _inputs(cls(backend="triton"), 2, 7, 0)
    monkeypatch.setattr(ts, "MAX_GRID_BATCH", 1)
    with pytest.raises(RuntimeError, match=r"a batch of 2 rows: the kernels' batch grid axis holds at most 1"):
        cls(backend="triton")(**inputs)
    _close(cls(backend="auto")(**inputs), cls(backend="torch")(**inputs))
