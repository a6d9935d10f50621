"""The matrix tile model under TRITON_INTERPRET=1: gla, simple_gla, retention, linear_attention,
mlstm and rwkv6 (exclusive readout) through the public layer API (`backend="triton"`):
forward, final state, continued stream, decode step and gradients equal `backend="torch"`
(fp32, DESIGN.md tolerances).

The layer classes come from `psmc.load`, so the real analysis plan decides that they get kernels.
K = 3 and V = 5 are not powers of two (masked rows and columns); two lanes; block sizes
below T so the carry between blocks is exercised. The interpreter runs a token loop slowly,
so T = 64 runs for gla (a vector gate) and T = 130 for rwkv6 (the exclusive readout), the other
ops at T = 1, 5 and 9 (a stream over column tiles): the token loop and the block carry are
the same generated code for every op."""
from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before any generated module is imported

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from psmc.codegen import triton_kernels as tk  # noqa: E402
from psmc.codegen import triton_printer as tp  # noqa: E402
from psmc.codegen.triton_matrix import role_of  # noqa: E402
from psmc.ir import ops_from_file, ops_from_source  # noqa: E402
from psmc.runtime import triton_support as ts  # noqa: E402
from triton_helpers import close as _close, layer_class  # noqa: E402

pytestmark = pytest.mark.triton

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
MATRIX = ["gla", "simple_gla", "retention", "linear_attention", "mlstm", "rwkv6"]
LONG = {"gla": (64,), "rwkv6": (130,)}  # longer sequences (slow under the interpreter)
DIMS = {"K": 3, "V": 5}
LANES = 2


def _pair(name: str):
    cls = layer_class(name)
    assert cls._triton_kernels is not None and cls._triton_kernels.mode == "matrix"
    return cls(backend="torch", **DIMS), cls(backend="triton", **DIMS)


def _inputs(layer, B: int, T: int, seed: int, grad: bool = False) -> tuple:
    """(inputs [B, T, lanes, *declared], the leaf tensors). Log gates are negative (decays
    below 1); rwkv6's bonus u is one per lane, expanded over batch and time (a stride-0 load
    whose gradient sums back)."""
    g = torch.Generator().manual_seed(seed)
    inputs, leaves = {}, []
    for slot in layer.spec.inputs:
        declared = tuple(int(s) for s in slot.shape(dict(layer.dims)))
        lead = (1, 1) if slot.name == "u" else (B, T)
        shape = lead + (LANES,) + declared
        if slot.name in ("gk", "g", "log_gamma", "f"):
            x = -torch.rand(shape, generator=g) * 0.5
        else:
            x = torch.randn(shape, generator=g)
        leaves.append(x.requires_grad_(grad))
        inputs[slot.name] = x.expand(B, T, *shape[2:])
    return inputs, leaves


def _tokens(inputs: dict, lo: int, hi: int | None = None) -> dict:
    """Time slice [lo, hi), or the single token lo when hi is None."""
    return {k: v[:, lo:hi] if hi is not None else v[:, lo] for k, v in inputs.items()}


def _loss(out: torch.Tensor) -> torch.Tensor:
    return (out * torch.linspace(0.5, 1.5, out.numel()).reshape(out.shape)).sum()


# ---------------------------------------------------------------------- what the model serves
def test_roles_and_reasons():
    op = ops_from_file(EXAMPLES / "gla.psm")[0]
    assert [role_of(v.shape, *_rows_cols(op)) for v in op.state] == ["r", "rc"]
    assert tp.value_roles(op, op.inputs) == ("r", "c", "r", "r")
    for name in MATRIX:
        op = ops_from_file(EXAMPLES / f"{name}.psm")[0]
        assert tp.unsupported_reason(op, {"plan": "exact-scan"}) is None, name
        assert "token loop over a [K, V] tile" in tk.describe(op, None)
    delta = ops_from_file(EXAMPLES / "delta_rule.psm")[0]
    assert "'eye'" in tp.unsupported_reason(delta, None) and tk.generate(delta, None) is None
    square = ops_from_source("op sq[K] { state (S: f32[K, K]); lift (k: f32[K]) { return outer(k, k); } "
                             "combine (l, r) { return l.S + r.S; } readout (s, q: f32[K]) { return q @ s.S; } }")[0]
    assert "square" in tp.unsupported_reason(square, None)
    contract = ops_from_source("op mm[K, V] { state (S: f32[K, V]); lift (k: f32[K], v: f32[V]) "
                               "{ return outer(k, v); } combine (l, r) { return l.S + r.S; } "
                               "readout (s, v: f32[V]) { return s.S @ v; } }")[0]
    assert tp.unsupported_reason(contract, None) is None  # matrix @ vector contracts the columns:
    assert tp.kernel_layout(contract).full_tile  # one program holds all of them


def _rows_cols(op):
    layout = tp.kernel_layout(op)
    return layout.axis, layout.cols


# ---------------------------------------------------------------------- kernels vs torch
@pytest.mark.parametrize("name", MATRIX)
def test_forward_stream_and_step_equal_torch(name, monkeypatch):
    ref, tri = _pair(name)
    cases = ((1, 4, 2), (5, 2, 2)) + tuple((T, T // 4, 1) for T in LONG.get(name, ()))
    with torch.no_grad():
        for T, block_t, B in cases:
            tri.triton_block_t = block_t  # below T: the carry between blocks is exercised
            inputs, _ = _inputs(ref, B, T, seed=T)
            want, want_state = ref(**inputs, return_state=True)
            got, got_state = tri(**inputs, return_state=True)
            _close(want, got, f"T={T}")
            for r, o in zip(want_state.prefix, got_state.prefix):
                assert (r is None) == (o is None), f"state T={T}: a dead field is left out by both"
                if r is not None:
                    _close(r.expand_as(o), o, f"state T={T}")
        # columns in tiles of 2 (V = 5: three programs per lane, the last one masked)
        monkeypatch.setattr(ts, "MAX_BLOCK_C", 2)
        tri.triton_block_t = 4
        inputs, _ = _inputs(ref, 2, 9, seed=5)
        want = ref(**inputs)
        _, state = tri(**_tokens(inputs, 0, 5), return_state=True)
        rest, state = tri(**_tokens(inputs, 5, 9), state=state, return_state=True)
        _close(want[:, 5:], rest, "continued stream, column tiles")
        _, want_state = ref(**inputs, return_state=True)
        for r, o in zip(want_state.prefix, state.prefix):
            assert (r is None) == (o is None), "continued state: a dead field is left out by both"
            if r is not None:
                _close(r.expand_as(o), o, "continued state")
        state = tri.init_state()
        for t in range(3):
            out, state = tri.step(state, **_tokens(inputs, t))
            _close(want[:, t], out, f"step {t}")


@pytest.mark.parametrize("name", MATRIX)
def test_gradients_equal_torch(name, monkeypatch):
    """The second case tiles the differentiated forward's columns (MAX_BLOCK_C = 2: three tiles of
    V = 5) while the backward holds whole rows: the saved carries are tiling-independent."""
    ref, tri = _pair(name)
    for T, block_t, B in ((3, 2, 2), (7, 4, 1)):
        if T == 7:
            monkeypatch.setattr(ts, "MAX_BLOCK_C", 2)
        tri.triton_block_t = block_t
        inputs, wrt = _inputs(ref, B, T, seed=11 + T, grad=True)
        want = torch.autograd.grad(_loss(ref(**inputs)), wrt)
        got = torch.autograd.grad(_loss(tri(**inputs)), wrt)
        for i, (r, o) in enumerate(zip(want, got)):
            _close(r, o, f"T={T} gradient of {list(inputs)[i]}")


@pytest.mark.parametrize("name", ["gla", "rwkv6"])
def test_gradients_through_streams_and_steps(name):
    """The init state's adjoint crosses a continued stream and a differentiable step; the
    final state's adjoint enters the last pass."""
    ref, tri = _pair(name)
    tri.triton_block_t = 2
    inputs, wrt = _inputs(ref, 2, 7, seed=3, grad=True)

    def run(layer):
        _, state = layer(**_tokens(inputs, 0, 3), return_state=True)
        rest, state = layer(**_tokens(inputs, 3, 6), state=state, return_state=True)
        last, state = layer.step(state, **_tokens(inputs, 6))
        final = sum((i + 1.5) * f.mean() for i, f in enumerate(state.prefix) if f is not None)
        return _loss(rest) + _loss(last) + final

    for r, o in zip(torch.autograd.grad(run(ref), wrt), torch.autograd.grad(run(tri), wrt)):
        _close(r, o, "stream gradient")
