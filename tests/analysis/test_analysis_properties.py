"""Property tests of the verdicts, in float64 with the reference interpreter only.

- every op the analysis calls proven (or assumed) is associative on random triples;
- every printed counterexample, parsed back and re-evaluated, really differs;
- every declared or inferred identity is an identity on both sides.
These use `psmc.ir.interp` and nothing of `psmc.analysis` but its results.
"""
import math

import pytest
import torch
from analysis_programs import all_ops
from expected import EXPECTED
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from psmc.analysis import compute
from psmc.analysis.dsl import parse_exact
from psmc.ir.interp import concrete_shape, evaluate, torch_dtype

OPS = all_ops()
# which test applies to which op comes from the hand-decided table; each test then checks
# the analysis agrees (so an op the analysis gets wrong fails here too)
PROVEN = sorted(n for n, e in EXPECTED.items() if e["associativity"] in ("proven", "assumed"))
REFUTED = sorted(n for n, e in EXPECTED.items() if e["associativity"] == "refuted")
WITH_IDENTITY = sorted(n for n, e in EXPECTED.items() if e["identity"] is not None)
SETTINGS = settings(max_examples=20, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


def small_dims(op) -> dict:
    return {d: 2 for d in op.dims}


def entries(dtype):
    if dtype == "bool":
        return st.booleans()
    if dtype in ("i32", "i64"):
        return st.integers(-3, 3)
    return st.integers(-12, 12).map(lambda k: k / 4)  # dyadic: float64 arithmetic is near exact


def draw_tensor(data, dtype, shape):
    n = math.prod(shape)
    values = data.draw(st.lists(entries(dtype), min_size=n, max_size=n))
    return torch.tensor(values, dtype=torch_dtype(dtype)).reshape(shape)


def draw_element(data, op, dims):
    return tuple(draw_tensor(data, f.dtype, concrete_shape(f.shape, dims)) for f in op.state)


def combiner(op, dims, params):
    def combine(l, r):
        env = dict(params)
        for f, a, b in zip(op.state, l, r):
            env[("field", "left", f.name)] = a
            env[("field", "right", f.name)] = b
        return evaluate(op.combine, env, dims)
    return combine


def assert_same(xs, ys, rtol=1e-9):
    for x, y in zip(xs, ys):
        if x.is_floating_point():
            assume(bool(torch.isfinite(x).all() and torch.isfinite(y).all()))
            assert torch.allclose(x, y, rtol=rtol, atol=rtol), (x, y)
        else:
            assert torch.equal(x, y), (x, y)


@pytest.mark.parametrize("name", PROVEN)
def test_proven_ops_are_associative_in_float64(analyses, name):
    assert analyses[name].associativity in ("proven", "assumed")
    op = OPS[name]
    dims = small_dims(op)
    combine = combiner(op, dims, {})

    @SETTINGS
    @given(st.data())
    def triples(data):
        a, b, c = (draw_element(data, op, dims) for _ in range(3))
        assert_same(combine(combine(a, b), c), combine(a, combine(b, c)))

    triples()


def _tensor_of(nested, dtype):
    def conv(v):
        if isinstance(v, list):
            return [conv(x) for x in v]
        value = parse_exact(v)
        return bool(value) if dtype == "bool" else float(value) if not dtype.startswith("i") else int(value)
    return torch.tensor(conv(nested), dtype=torch_dtype(dtype))


def _counterexample_of(name, analyses):
    result = analyses[name]
    if isinstance(result, Exception):  # assume refuted: the error carries text only; recompute
        result = compute(OPS[name])
    return result.counterexample


@pytest.mark.parametrize("name", REFUTED)
def test_printed_counterexamples_really_differ(analyses, name):
    ce = _counterexample_of(name, analyses)
    assert ce is not None
    op = OPS[name]
    dims = dict(ce.dims)
    dtypes = {p.name: p.dtype for p in op.params}
    params = {("param", p): _tensor_of(v, dtypes[p]) for p, v in ce.params}
    for p in op.params:  # params the combine does not use may take any value
        if ("param", p.name) not in params:
            params[("param", p.name)] = torch.zeros(concrete_shape(p.shape, dims), dtype=torch.float64)
    el = {n: tuple(_tensor_of(v, f.dtype) for (_, v), f in zip(fields, op.state)) for n, fields in ce.elements}
    combine = combiner(op, dims, params)
    lhs = combine(combine(el["a"], el["b"]), el["c"])
    rhs = combine(el["a"], combine(el["b"], el["c"]))
    gaps = [float((x.double() - y.double()).abs().max()) for x, y in zip(lhs, rhs)]
    assert max(gaps) > 1e-6, (ce.text, lhs, rhs)
    # the printed values are the values (exact ones exactly, rounded ones to their digits)
    if not ce.left.startswith("≈") and len(op.state) == 1:
        printed = _tensor_of(_parse_nested(ce.left), op.state[0].dtype)
        assert torch.allclose(printed.double(), lhs[0].double(), rtol=1e-12, atol=1e-12), ce.text


def _parse_nested(text):
    text = text.strip()
    if not text.startswith("["):
        return text
    depth, item, items = 0, "", []
    for ch in text[1:-1]:
        if ch == "," and depth == 0:
            items.append(item)
            item = ""
            continue
        depth += (ch == "[") - (ch == "]")
        item += ch
    items.append(item)
    return [_parse_nested(i) for i in items]


def _identity_tensors(op, text, dims):
    """The identity's DSL text (bare names and numbers per field) as tensors."""
    items = [t.strip() for t in (text[1:-1].split(",") if text.startswith("(") else [text])]
    out = []
    for f, t in zip(op.state, items):
        shape = concrete_shape(f.shape, dims)
        if t.startswith("eye("):
            out.append(torch.eye(shape[0], dtype=torch.float64))
            continue
        value = {"zeros": 0.0, "ones": 1.0, "true": True, "false": False}.get(t)
        value = float(t) if value is None else value
        out.append(torch.full(shape, value, dtype=torch_dtype(f.dtype)))
    return tuple(out)


@pytest.mark.parametrize("name", WITH_IDENTITY)
def test_identities_hold_on_both_sides(analyses, name):
    result = analyses[name]
    assert result.identity is not None
    op = OPS[name]
    dims = small_dims(op)
    e = _identity_tensors(op, result.identity, dims)
    if op.identity is not None and result.identity_kind.startswith("declared"):
        declared = evaluate(op.identity, {}, dims)
        assert all(torch.equal(a, b) for a, b in zip(e, declared)), (e, declared)  # text == value
    combine = combiner(op, dims, {})

    @SETTINGS
    @given(st.data())
    def both_sides(data):
        x = draw_element(data, op, dims)
        assert_same(combine(e, x), x)
        assert_same(combine(x, e), x)

    both_sides()
