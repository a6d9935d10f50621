"""The reference semantics of the IR: evaluate one position of one lane with torch.

Every backend (the torch and Triton printers, the runtime) must compute what this module
computes; the analysis uses it for float64 random testing. It is deliberately plain: one
torch call per node, no batching, no fusion.

`evaluate(outputs, env, dims)` takes
- `outputs`: a tuple of `Node`s (a body: lift, combine, readout or identity);
- `env`: the leaves' values, keyed ('field', role, name), ('arg', name), ('param', name) and
  ('index',); each tensor must have exactly the leaf's declared shape;
- `dims`: a concrete size for every dim the shapes mention, e.g. {'K': 2, 'V': 3}.

Exact semantics (printers must match them):
- floats are computed in float64 whatever the declared float dtype; i32/i64/bool keep their
  dtype, so integer `+ - * **` stay integer; `/` is true division (its result is a float);
- `sign(0) = 0`; `gelu` is the exact erf form; `softplus(x) = log1p(exp(x))` and `logsigmoid`
  are torch.nn.functional's (which switch to the asymptote where exp would overflow);
- `matmul` follows NumPy's 1-D/2-D rules; `outer(a, b)[i, j] = a[i] * b[j]`;
- `layernorm` normalises over the last axis with eps = 1e-5 and no affine;
- `attention(q, k, v, heads, causal)` splits the width of q/k and of v into `heads` equal
  parts, computes softmax(q_h k_h^T / sqrt(width_qk / heads)) v_h per head (query row i sees
  key rows j <= i when causal) and concatenates the heads along the width;
- reductions and `softmax` act on the declared axis stored in the node (never negative);
- `getitem` attrs cover every declared axis: ('slice', lo, hi) | ('index', k) | ('newaxis',).
"""
from __future__ import annotations

import functools
import math

import sympy
import torch
import torch.nn.functional as F

from ..dtypes import DType
from .nodes import Node, dim_symbol, walk
from .registry import BINARY_OPS, REDUCTIONS, SELECT, STRUCTURE_OPS, UNARY_MATH, UNARY_OPERATOR, UNARY_OPERATORS

LAYERNORM_EPS = 1e-5

_TORCH_DTYPES = {DType.F16: torch.float64, DType.BF16: torch.float64, DType.F32: torch.float64,
                 DType.F64: torch.float64, DType.I32: torch.int32, DType.I64: torch.int64, DType.BOOL: torch.bool}

def _reference(path: str):
    """'torch.exp' / 'F.softplus' (a registry row's reference function) as the function."""
    module, _, name = path.partition(".")
    return getattr({"torch": torch, "F": F}[module], name)


_UNARY = {
    "neg": _reference(UNARY_OPERATOR["neg"].interp),
    **{row.name: _reference(row.interp) for row in UNARY_MATH},  # psmc.ir.registry
    "not": _reference(UNARY_OPERATOR["not"].interp),
}
_BINARY = {row.name: _reference(row.interp) for row in BINARY_OPS}  # psmc.ir.registry
_WHERE = _reference(SELECT.interp)  # psmc.ir.registry
_REDUCE = {row.name: _reference(row.interp) for row in REDUCTIONS}  # torch.<fn>(x, axis): psmc.ir.registry
# operands computed in the node's dtype first (the float-valued reductions)
_REDUCE_IN_DTYPE = frozenset(row.name for row in REDUCTIONS if row.dtype == "float")
_NO_CAST = frozenset(row.name for row in UNARY_OPERATORS if row.kind == "logical")


def torch_dtype(dtype: str) -> torch.dtype:
    """The dtype the interpreter computes a value of IR dtype `dtype` in."""
    return _TORCH_DTYPES[dtype]


def concrete(expr, dims: dict) -> int:
    """A shape entry or static integer (a SymPy expression over dims) as a Python int."""
    if isinstance(expr, int) or getattr(expr, "is_Integer", False):
        return int(expr)
    return _concrete(expr, tuple(sorted(dims.items())))


@functools.lru_cache(maxsize=4096)
def _concrete(expr, dims: tuple) -> int:
    value = sympy.sympify(expr).subs({dim_symbol(k): v for k, v in dims})
    if not value.is_number or value != int(value):
        raise ValueError(f"cannot evaluate {expr} with dims {dict(dims)}")
    return int(value)


def concrete_shape(shape, dims: dict) -> tuple[int, ...]:
    out = tuple(concrete(d, dims) for d in shape)
    if any(d <= 0 for d in out):
        raise ValueError(f"shape {out} has an empty axis with dims {dims}")
    return out


def evaluate(outputs, env: dict, dims: dict) -> tuple[torch.Tensor, ...]:
    """Evaluate `outputs` (a tuple of Nodes) on one position; see the module docstring."""
    values: dict[Node, torch.Tensor] = {}
    for node in walk(outputs):
        out = _eval_node(node, [values[a] for a in node.args], env, dims)
        want = concrete_shape(node.shape, dims)
        if tuple(out.shape) != want:
            raise ValueError(f"{node.op} produced shape {tuple(out.shape)}, declared {want}")
        values[node] = out.to(torch_dtype(node.dtype))
    return tuple(values[o] for o in outputs)


def _eval_node(node: Node, args: list, env: dict, dims: dict) -> torch.Tensor:
    op = node.op
    if not args:
        return _leaf(node, env, dims)
    if op in _UNARY:
        return _UNARY[op](args[0].to(torch_dtype(node.dtype)) if op not in _NO_CAST else args[0])
    if op in _BINARY:
        a, b = args
        if node.info.kind == "binary":
            a, b = a.to(torch_dtype(node.dtype)), b.to(torch_dtype(node.dtype))
        elif node.info.kind == "compare" and (a.is_floating_point() or b.is_floating_point()):
            a, b = a.to(torch.float64), b.to(torch.float64)
        return _BINARY[op](a, b)
    if op == SELECT.name:
        cond, a, b = args
        return _WHERE(cond, a.to(torch_dtype(node.dtype)), b.to(torch_dtype(node.dtype)))
    if op in _REDUCE:
        x = args[0].to(torch_dtype(node.dtype)) if op in _REDUCE_IN_DTYPE else args[0]
        return _REDUCE[op](x, node.attrs[0])
    return _STRUCTURE[op](node, args, dims)


def env_key(node: Node) -> tuple:
    """The environment key of an input leaf: ('field', role, name), ('arg', name),
    ('param', name) or ('index',)."""
    if node.op == "index":
        return ("index",)
    if node.op == "field":
        return ("field",) + tuple(node.attrs)
    return (node.op, node.attrs[0])


def _leaf(node: Node, env: dict, dims: dict) -> torch.Tensor:
    op = node.op
    dtype = torch_dtype(node.dtype)
    if op == "const":
        return torch.tensor(node.attrs[0], dtype=dtype)
    if op == "dim":
        return torch.tensor(dims[node.attrs[0]], dtype=dtype)
    if op == "fill":
        return torch.full(concrete_shape(node.shape, dims), node.attrs[0], dtype=dtype)
    if op in _STRUCTURE:  # eye: psmc.ir.registry
        return _STRUCTURE[op](node, (), dims)
    key = env_key(node)
    if key not in env:
        raise KeyError(f"no value for {key} in the environment")
    value = torch.as_tensor(env[key])
    want = concrete_shape(node.shape, dims)
    if tuple(value.shape) != want:
        raise ValueError(f"{key} has shape {tuple(value.shape)}, declared {want}")
    return value.to(dtype)


def _getitem(node: Node, args, dims):
    index = []
    for item in node.attrs:
        if item[0] == "slice":
            index.append(slice(concrete(item[1], dims), concrete(item[2], dims)))
        elif item[0] == "index":
            index.append(concrete(item[1], dims))
        else:
            index.append(None)
    return args[0][tuple(index)]


def _attention(node: Node, args, dims):
    q, k, v = (a.to(torch.float64) for a in args)
    heads, causal = concrete(node.attrs[0], dims), bool(node.attrs[1])
    width_qk, width_v = q.shape[-1], v.shape[-1]
    if width_qk % heads or width_v % heads:
        raise ValueError(f"attention: widths {width_qk}, {width_v} are not divisible by {heads} heads")
    dq, dv = width_qk // heads, width_v // heads
    outs = []
    for h in range(heads):
        qh, kh, vh = q[:, h * dq:(h + 1) * dq], k[:, h * dq:(h + 1) * dq], v[:, h * dv:(h + 1) * dv]
        scores = qh @ kh.T / math.sqrt(dq)
        if causal:
            rows = torch.arange(scores.shape[0])[:, None]
            cols = torch.arange(scores.shape[1])[None, :]
            scores = scores.masked_fill(cols > rows, float("-inf"))
        outs.append(torch.softmax(scores, dim=-1) @ vh)
    return torch.cat(outs, dim=-1)


def _eye(node: Node, args, dims):
    return torch.eye(concrete(node.shape[0], dims), dtype=torch_dtype(node.dtype))


# the rules the rows of psmc.ir.registry.STRUCTURE_OPS name (`interp`): (node, args, dims) -> tensor
RULES = {
    "cast": lambda n, a, d: a[0].to(torch_dtype(n.dtype)),
    "broadcast": lambda n, a, d: torch.broadcast_to(a[0], concrete_shape(n.shape, d)),
    "eye": _eye,
    "softmax": lambda n, a, d: torch.softmax(a[0].to(torch.float64), dim=n.attrs[0]),
    "matmul": lambda n, a, d: torch.matmul(a[0].to(torch_dtype(n.dtype)), a[1].to(torch_dtype(n.dtype))),
    "outer": lambda n, a, d: torch.outer(a[0].to(torch_dtype(n.dtype)), a[1].to(torch_dtype(n.dtype))),
    "transpose": lambda n, a, d: a[0].transpose(-1, -2),
    "getitem": _getitem,
    "concat": lambda n, a, d: torch.cat([x.to(torch_dtype(n.dtype)) for x in a], dim=n.attrs[0]),
    "diag": lambda n, a, d: torch.diag(a[0]),
    "reshape": lambda n, a, d: a[0].reshape(concrete_shape(n.shape, d)),
    "layernorm": lambda n, a, d: F.layer_norm(a[0].to(torch.float64), (a[0].shape[-1],), eps=LAYERNORM_EPS),
    "attention": _attention,
}
_STRUCTURE = {row.name: RULES[row.interp] for row in STRUCTURE_OPS}  # psmc.ir.registry
