"""One launch contract for the generated Triton kernels (psmc.runtime.triton_abi).

Every forward, step and backward kernel the printers write (one-axis lanes, one state axis,
matrix tiles; inputs, params, several fields, dims) takes exactly the contract's names, and a
launch whose names differ is refused with a message saying what is missing and what to do
(the runtime passes everything by name, so a mismatch can never bind a tensor to the wrong
parameter). The launches themselves are exercised by test_triton*.py."""
from __future__ import annotations

import ast

import pytest

from psmc.codegen.triton_kernels import generate
from psmc.ir import ops_from_source
from psmc.runtime import triton_abi

PROGRAMS = {
    "lanes": "op t { state (m: f32, i: i32); lift (x: f32, j: i32) { return (x, j); } "
             "combine (l, r) { return (max(l.m, r.m), where(r.m > l.m, r.i, l.i)); } readout (s) { return s.i; } }",
    "state": "op t[N] { param w: f32[N]; state (h: f32[N]); lift (x: f32[N]) { return x * w; } "
             "combine (l, r) { return l.h + r.h; } readout (s, c: f32[N]) { return sum(s.h * c); } }",
    "matrix": "op t[K, V] { state (a: f32[K], S: f32[K, V]); lift (g: f32[K], k: f32[K], v: f32[V]) "
              "{ return (g, outer(k, v)); } combine (l, r) { return (l.a * r.a, r.a[:, None] * l.S + r.S); } "
              "readout (s, q: f32[K]) { return q @ s.S; } }",
}


def _kernels(source: str) -> dict:
    """Kernel name -> parameter names, read from the generated source."""
    tree = ast.parse(source)
    return {f.name: [a.arg for a in f.args.args] for f in tree.body
            if isinstance(f, ast.FunctionDef) and f.name.endswith(("_forward", "_step", "_backward"))}


@pytest.mark.parametrize("mode", sorted(PROGRAMS))
def test_every_kernel_takes_exactly_the_contracts_names(mode):
    (op,) = ops_from_source(PROGRAMS[mode], "t.psm")
    source = generate(op, {"plan": "exact-scan", "structure": "elementwise"})
    assert source is not None
    kernels = _kernels(source)
    assert len(kernels) == 3, sorted(kernels)
    for name, params in kernels.items():
        kind = name.rsplit("_", 1)[1]
        want = [n for group in triton_abi.arguments(kind, mode, len(op.inputs), len(op.params),
                                                    len(op.state), len(op.outputs), tuple(op.dims)) for n in group]
        want += list(triton_abi.constexprs(kind, mode))
        assert params == want, (name, params, want)
        assert len(set(params)) == len(params)  # names are unique: binding by name is total
        args = dict.fromkeys(params, 0)
        triton_abi.check(args, kind, mode, len(op.inputs), len(op.params), len(op.state),
                         len(op.outputs), tuple(op.dims))


def test_a_launch_with_other_names_is_refused_with_what_to_do():
    names = [n for g in triton_abi.arguments("step", "state", 1, 0, 1, 1, ("N",)) for n in g]
    args = dict.fromkeys(names + list(triton_abi.constexprs("step", "state")), 0)
    del args["d_N"]
    args["d_M"] = 0
    with pytest.raises(RuntimeError) as err:
        triton_abi.check(args, "step", "state", 1, 0, 1, 1, ("N",))
    assert str(err.value) == ("the step Triton kernel and the runtime disagree on its arguments (missing ['d_N'], "
                              "unexpected ['d_M']): the generated module is from another psmc version; recompile "
                              "it with `psmc compile`")
