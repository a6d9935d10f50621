"""One dtype type from lowering to the runtime (issue 10 item 2): `psmc.dtypes.DType`.

Every dtype the IR, the runtime specs and the generated code carry is a DType (never a bare
string or a torch.dtype); a torch.dtype exists only inside a call, resolved in one place
(`psmc.runtime.ops.torch_dtypes`). DTypes print as the language spells them, so generated code,
JSON and cache keys are unchanged by the type.
"""
import json
import pickle
from pathlib import Path

import pytest
import torch

import psmc
from psmc.dtypes import DType
from psmc.ir import ops_from_file
from psmc.ir.nodes import Node, Value, walk
from psmc.ir.types import can_store, float_of, promote
from psmc.runtime.layer import Slot
from psmc.runtime.ops import DTYPES, torch_dtypes

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "examples").glob("*.psm"))


def test_dtypes_print_as_the_language_spells_them():
    for d in DType:
        assert str(d) == f"{d}" == d.value and repr(d) == repr(d.value) and d == d.value
        assert json.dumps(d) == json.dumps(d.value) and pickle.loads(pickle.dumps(d)) is d
    assert {d.value for d in DType} == {"f16", "bf16", "f32", "f64", "i32", "i64", "bool"}


def test_anything_else_is_not_a_dtype():
    for bad in ("float", torch.float32, None, "F32"):
        with pytest.raises(TypeError):
            DType.of(bad)


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_every_ir_value_carries_a_dtype(path):
    for op in ops_from_file(path):
        bodies = op.lift + op.combine + op.readout + (op.identity or ())
        assert all(type(n.dtype) is DType for n in walk(bodies))
        values = op.state + op.inputs + op.outputs + op.params
        assert all(type(v.dtype) is DType for v in values)


def test_constructors_normalise_names():
    assert type(Node("const", (), (1.0,), "f64").dtype) is DType
    assert type(Value("x", "i32", ()).dtype) is DType
    assert type(Slot("x", "bool", 0, lambda d: ()).dtype) is DType


def test_promotion_is_closed_over_dtypes():
    for a in DType:
        assert type(float_of(a)) is DType and float_of(a).is_float
        for b in DType:
            for weak in (False, True):
                assert type(promote(a, b, weak, False)) is DType
            assert can_store(a, b) == (a.category <= b.category)
    assert promote("f16", "bf16") is DType.F32 and promote("i32", "f64") is DType.F64


def test_the_runtime_resolves_each_dtype_in_one_place():
    for compute in (torch.float32, torch.float64):
        table = torch_dtypes(compute)
        assert set(table) == set(DType) and table[DType.F32] == compute
        assert all(isinstance(t, torch.dtype) for t in table.values())
        assert table["f32"] == compute  # generated code spells cx.dt['f32']
    assert DTYPES[DType.F64] == torch.float64 and DTYPES[DType.BOOL] == torch.bool


def test_layer_specs_carry_dtypes():
    cls = psmc.load(EXAMPLES[0]).__psmc_layers__[EXAMPLES[0].stem]
    slots = cls.spec.fields + cls.spec.inputs + cls.spec.outputs + cls.spec.params
    assert slots and all(type(s.dtype) is DType for s in slots)
