"""The reference interpreter on small cases computed by hand."""
import math

import pytest
import torch

from psmc.ir import ops_from_file, ops_from_source
from psmc.ir.interp import evaluate

EXAMPLES = __import__("pathlib").Path(__file__).resolve().parents[2] / "examples"


def readout(expr: str, inputs: dict, types: dict, dims: dict | None = None):
    """Evaluate `expr` as the readout of a throwaway op; inputs by name with their DSL types."""
    dim_names = sorted(dims or {})
    header = f"[{', '.join(dim_names)}]" if dim_names else ""
    params = ", ".join(f"{k}: {t}" for k, t in types.items())
    text = (f"op t{header} {{ state (z: f32); combine (l, r) {{ return l.z; }} "
            f"readout (s{', ' if params else ''}{params}) {{ return {expr}; }} }}")
    (op,) = ops_from_source(text)
    env = {("arg", k): torch.as_tensor(v) for k, v in inputs.items()}
    env[("field", "state", "z")] = torch.tensor(0.0)
    out = evaluate(op.readout, env, dims or {})
    return out if len(out) > 1 else out[0]


def test_gla_combine_by_hand():
    (op,) = ops_from_file(EXAMPLES / "gla.psm")
    env = {("field", "left", "a"): torch.tensor([2.0, 3.0]), ("field", "left", "S"): torch.ones(2, 3),
           ("field", "right", "a"): torch.tensor([5.0, 7.0]), ("field", "right", "S"): torch.arange(6.0).reshape(2, 3)}
    a, s = evaluate(op.combine, env, {"K": 2, "V": 3})
    assert a.tolist() == [10.0, 21.0]
    # r.a[:, None] * l.S + r.S: row 0 scaled by 5, row 1 by 7, plus r.S
    assert s.tolist() == [[5.0, 6.0, 7.0], [10.0, 11.0, 12.0]]
    assert a.dtype == torch.float64


def test_sign_of_zero_and_elementwise_functions():
    x = torch.tensor([-2.0, 0.0, 3.0])
    assert readout("sign(x)", {"x": x}, {"x": "f32[3]"}).tolist() == [-1.0, 0.0, 1.0]
    assert readout("relu(x)", {"x": x}, {"x": "f32[3]"}).tolist() == [0.0, 0.0, 3.0]
    assert readout("abs(x)", {"x": x}, {"x": "f32[3]"}).tolist() == [2.0, 0.0, 3.0]
    zero = torch.tensor(0.0)
    assert readout("softplus(x)", {"x": zero}, {"x": "f32"}).item() == pytest.approx(math.log(2))
    assert readout("logsigmoid(x)", {"x": zero}, {"x": "f32"}).item() == pytest.approx(-math.log(2))
    one = torch.tensor(1.0)
    # exact erf form: 0.5 (1 + erf(1 / sqrt 2)) = Phi(1)
    assert readout("gelu(x)", {"x": one}, {"x": "f32"}).item() == pytest.approx(0.8413447460685429, abs=1e-15)
    assert readout("silu(x)", {"x": one}, {"x": "f32"}).item() == pytest.approx(1 / (1 + math.exp(-1)))
    assert readout("rsqrt(x)", {"x": torch.tensor(4.0)}, {"x": "f32"}).item() == 0.5


def test_integer_arithmetic_stays_integer_and_division_is_true():
    a, b = torch.tensor(7), torch.tensor(2)
    types = {"a": "i64", "b": "i64"}
    p = readout("a ** b", {"a": a, "b": b}, types)
    assert p.dtype == torch.int64 and p.item() == 49
    q = readout("a / b", {"a": a, "b": b}, types)
    assert q.dtype == torch.float64 and q.item() == 3.5
    s = readout("a - b * 3", {"a": a, "b": b}, types)
    assert s.dtype == torch.int64 and s.item() == 1


def test_matmul_follows_numpy_1d_2d_rules():
    m = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    v = torch.tensor([1.0, -1.0])
    types = {"m": "f32[2, 2]", "v": "f32[2]"}
    assert readout("v @ m", {"m": m, "v": v}, types).tolist() == [-2.0, -2.0]
    assert readout("m @ v", {"m": m, "v": v}, types).tolist() == [-1.0, -1.0]
    assert readout("v @ v", {"m": m, "v": v}, types).item() == 2.0
    assert readout("m @ m", {"m": m, "v": v}, types).tolist() == [[7.0, 10.0], [15.0, 22.0]]
    assert readout("outer(v, v)", {"m": m, "v": v}, types).tolist() == [[1.0, -1.0], [-1.0, 1.0]]


def test_indexing_structure_and_reductions():
    m = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    t = {"m": "f32[2, 3]"}
    assert readout("m[1]", {"m": m}, t).tolist() == [4.0, 5.0, 6.0]
    assert readout("m[:, 1:]", {"m": m}, t).tolist() == [[2.0, 3.0], [5.0, 6.0]]
    assert readout("m[0][:, None]", {"m": m}, t).shape == (3, 1)
    assert readout("m.T", {"m": m}, t).tolist() == [[1.0, 4.0], [2.0, 5.0], [3.0, 6.0]]
    assert readout("concat(m, m, axis=0)", {"m": m}, t).shape == (4, 3)
    assert readout("reshape(m, (3, 2))", {"m": m}, t).tolist() == [[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]
    assert readout("sum(m, axis=0)", {"m": m}, t).tolist() == [5.0, 7.0, 9.0]
    assert readout("mean(m)", {"m": m}, t).tolist() == [2.0, 5.0]
    assert readout("amax(m, axis=0)", {"m": m}, t).tolist() == [4.0, 5.0, 6.0]
    assert readout("diag(m[0])", {"m": m}, t).tolist() == [[1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 3.0]]
    z = torch.zeros(2)
    assert readout("logsumexp(z)", {"z": z}, {"z": "f32[2]"}).item() == pytest.approx(math.log(2))
    assert readout("softmax(z)", {"z": z}, {"z": "f32[2]"}).tolist() == [0.5, 0.5]


def test_select_compare_logic_and_casts():
    x = torch.tensor([1.0, 5.0])
    y = torch.tensor([3.0, 2.0])
    t = {"x": "f32[2]", "y": "f32[2]"}
    assert readout("if x < y then x else y", {"x": x, "y": y}, t).tolist() == [1.0, 2.0]
    assert readout("max(x, y)", {"x": x, "y": y}, t).tolist() == [3.0, 5.0]
    assert readout("(x < y) and not (x == y)", {"x": x, "y": y}, t).tolist() == [True, False]
    assert readout("(x < y) or (x > 4.0)", {"x": x, "y": y}, t).tolist() == [True, True]
    # a bool stored into a float slot becomes 0/1: the readout output is the bool itself here
    out = readout("x != y", {"x": x, "y": y}, t)
    assert out.dtype == torch.bool and out.tolist() == [True, True]


def test_layernorm_no_affine_eps_1e5():
    x = torch.tensor([1.0, 3.0])
    out = readout("layernorm(x)", {"x": x}, {"x": "f32[2]"})
    # mean 2, variance 1: (x - 2) / sqrt(1 + 1e-5)
    expected = [-1 / math.sqrt(1 + 1e-5), 1 / math.sqrt(1 + 1e-5)]
    assert out.tolist() == pytest.approx(expected, abs=1e-15)


def test_attention_uniform_scores_average_the_values():
    q = torch.zeros(3, 2)
    v = torch.tensor([[1.0, 10.0], [2.0, 20.0], [6.0, 60.0]])
    t = {"q": "f32[3, 2]", "v": "f32[3, 2]"}
    full = readout("attention(q, q, v)", {"q": q, "v": v}, t)
    assert torch.allclose(full, torch.tensor([[3.0, 30.0]] * 3, dtype=torch.float64))
    causal = readout("attention(q, q, v, heads=2, causal=true)", {"q": q, "v": v}, t)
    # query i sees keys 0..i: running means
    assert torch.allclose(causal, torch.tensor([[1.0, 10.0], [1.5, 15.0], [3.0, 30.0]], dtype=torch.float64))


def test_attention_scale_and_heads_by_hand():
    # one query, two keys; head 0 uses column 0, head 1 column 1; width/heads = 1, scale 1
    q = torch.tensor([[1.0, 0.0]])
    k = torch.tensor([[0.0, 0.0], [math.log(3.0), 5.0]])
    v = torch.tensor([[0.0, 4.0], [1.0, 8.0]])
    t = {"q": "f32[1, 2]", "k": "f32[2, 2]", "v": "f32[2, 2]"}
    out = readout("attention(q, k, v, heads=2)", {"q": q, "k": k, "v": v}, t)
    # head 0: scores (0, log 3) -> weights (1/4, 3/4) -> 0.75; head 1: scores (0, 0) -> 6
    assert out[0].tolist() == pytest.approx([0.75, 6.0])
    single = readout("attention(q, k, v)", {"q": q, "k": k, "v": v}, t)
    # one head of width 2: scores (0, log 3) / sqrt 2
    w = math.exp(math.log(3) / math.sqrt(2))
    assert single[0].tolist() == pytest.approx([w / (1 + w), (4 + 8 * w) / (1 + w)])


def test_dims_index_and_constants():
    (op,) = ops_from_source("op t[K] { state (z: f32[K]); combine (l, r) { return l.z; } "
                            "readout (s) { return (s.z * K + index, eye(K), zeros(2, K)); } }")
    env = {("field", "state", "z"): torch.tensor([1.0, 2.0]), ("index",): torch.tensor(5)}
    scaled, eye, zeros = evaluate(op.readout, env, {"K": 2})
    assert scaled.tolist() == [7.0, 9.0]
    assert eye.tolist() == [[1.0, 0.0], [0.0, 1.0]]
    assert zeros.shape == (2, 2)


def test_wrong_input_shape_is_an_error():
    (op,) = ops_from_file(EXAMPLES / "gla.psm")
    env = {("field", "left", "a"): torch.ones(3), ("field", "left", "S"): torch.ones(2, 3),
           ("field", "right", "a"): torch.ones(2), ("field", "right", "S"): torch.ones(2, 3)}
    with pytest.raises(ValueError, match="shape"):
        evaluate(op.combine, env, {"K": 2, "V": 3})
