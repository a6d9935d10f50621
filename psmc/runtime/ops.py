"""Torch renderings of the IR operations that are more than one torch call.

Generated code calls these with tensors laid out as `[*lead, *declared]`: the leading axes
(batch, time or tree nodes, lanes) come first and are shared by every batched value; the
trailing `rank` axes are the value's declared shape. Unbatched values (params, constants) have
no leading axes. Every helper here is differentiable and indifferent to the number of leading
axes. The semantics match `psmc.ir.interp` (the reference interpreter).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ..dtypes import DType

# The storage dtype of each DType (params, and fields outside a call).
DTYPES = {DType.F16: torch.float16, DType.BF16: torch.bfloat16, DType.F32: torch.float32,
          DType.F64: torch.float64, DType.I32: torch.int32, DType.I64: torch.int64, DType.BOOL: torch.bool}


def torch_dtypes(compute: torch.dtype) -> dict:
    """DType -> torch.dtype for one call: `f32` computes in `compute` (float64 when the call's
    inputs or params are float64, e.g. gradcheck), every other dtype as declared. The only
    place a DType becomes a torch.dtype inside a call; generated code reads it as `cx.dt`."""
    return {**DTYPES, DType.F32: compute}


def lift_rank(x, rank: int, target: int):
    """Insert singleton axes just after the leading axes so a batched value of declared rank
    `rank` broadcasts against one of rank `target` (NumPy alignment on the declared shape)."""
    if not isinstance(x, Tensor) or rank >= target:
        return x
    index = (Ellipsis,) + (None,) * (target - rank) + (slice(None),) * rank
    return x[index]


def _extreme(a, b, python_fn, torch_fn, bound: str):
    """max/min where either side may be a Python number (a literal or a dim): two numbers stay
    numbers, a number against a tensor is a clamp, two tensors the torch elementwise op."""
    if not isinstance(a, Tensor) and not isinstance(b, Tensor):
        return python_fn(a, b)
    if not isinstance(a, Tensor):
        a, b = b, a
    return torch.clamp(a, **{bound: b}) if not isinstance(b, Tensor) else torch_fn(a, b)


def maximum(a, b):
    return _extreme(a, b, max, torch.maximum, "min")


def minimum(a, b):
    return _extreme(a, b, min, torch.minimum, "max")


def logaddexp(a, b):
    """log(exp(a) + exp(b)) where either side may be a Python number (a literal or a dim) or an
    integer tensor (torch.logaddexp takes float tensors only; ints become the default float)."""
    if not isinstance(a, Tensor) and not isinstance(b, Tensor):
        return a + math.log(2.0) if a == b else max(a, b) + math.log1p(math.exp(-abs(a - b)))
    ref = a if isinstance(a, Tensor) else b
    dtype = ref.dtype if ref.is_floating_point() else torch.get_default_dtype()
    a, b = (x.to(dtype) if isinstance(x, Tensor) else torch.tensor(x, dtype=dtype, device=ref.device) for x in (a, b))
    return torch.logaddexp(a, b)


def where(cond, a, b, dtype: torch.dtype | None = None, device=None):
    """`where` / `if`. A Python condition (known when the layer was built) picks a branch; a
    Python number picked or passed for a value that is a tensor at run time is materialised in
    `dtype`, the call's compute dtype for the node (never torch's default float32). Without
    `dtype` (a node that is a Python number itself) numbers stay numbers."""
    if not isinstance(cond, Tensor):
        x = a if cond else b
        if dtype is None:
            return x
        return x.to(dtype) if isinstance(x, Tensor) else torch.tensor(x, dtype=dtype, device=device)
    if dtype is not None:
        a = a.to(dtype) if isinstance(a, Tensor) else torch.tensor(a, dtype=dtype, device=cond.device)
        b = b.to(dtype) if isinstance(b, Tensor) else torch.tensor(b, dtype=dtype, device=cond.device)
    return torch.where(cond, a, b)


def to(x, dtype: torch.dtype):
    """An operand in the dtype its operation computes in: tensors are converted, Python
    numbers (literals and dims, weak in torch's promotion) are left to adapt."""
    return x.to(dtype) if isinstance(x, Tensor) and x.dtype != dtype else x


def unary(fn, x):
    """Apply a torch function to a value that may be a Python number (literals and dims):
    numbers use `math` where it has the function, so no tensor (or graph break) is made."""
    if isinstance(x, Tensor):
        return fn(x)
    if fn is torch.sqrt:  # the common one (a scale 1 / sqrt(K)): no lookup
        return math.sqrt(x)
    exact = getattr(math, getattr(fn, "__name__", ""), None)
    if exact is not None:
        return exact(x)
    return fn(torch.tensor(x, dtype=torch.float64)).item()


def matmul(a: Tensor, b: Tensor, rank_a: int, rank_b: int) -> Tensor:
    """NumPy 1-D/2-D matmul rules on the declared axes, broadcasting the leading axes."""
    if rank_a == 1 and rank_b == 1:
        return (a * b).sum(-1)
    if rank_a == 1:
        return (a.unsqueeze(-2) @ b).squeeze(-2)
    if rank_b == 1:
        return (a @ b.unsqueeze(-1)).squeeze(-1)
    return a @ b


def outer(a: Tensor, b: Tensor) -> Tensor:
    return a.unsqueeze(-1) * b.unsqueeze(-2)


def full(shape: tuple, value, dtype: torch.dtype, device) -> Tensor:
    return torch.full(tuple(int(s) for s in shape), value, dtype=dtype, device=device)


def eye(n: int, dtype: torch.dtype, device) -> Tensor:
    return torch.eye(int(n), dtype=dtype, device=device)


def cast(x, dtype: torch.dtype):
    """A value stored in a slot of another dtype: tensors convert; a Python number becomes the
    Python number of that kind (it is materialised in `dtype` by `as_field`)."""
    if isinstance(x, Tensor):
        return x.to(dtype)
    if dtype == torch.bool:
        return bool(x)
    return float(x) if dtype.is_floating_point else int(x)


def broadcast_to(x, rank: int, shape: tuple):
    """Broadcast the declared part of `x` (rank `rank`) to `shape`, keeping leading axes."""
    shape = tuple(int(s) for s in shape)
    if not isinstance(x, Tensor):
        return x  # a scalar broadcasts by itself; `as_field` materialises it
    x = lift_rank(x, rank, len(shape))
    lead = x.shape[: x.dim() - len(shape)]
    return x.expand((*lead, *shape))  # a tuple: expand() of no sizes is an error


def as_field(x, lead: tuple, shape: tuple, dtype: torch.dtype, device) -> Tensor:
    """Materialise a body result as a full `[*lead, *shape]` tensor of the slot's dtype."""
    if isinstance(x, Tensor) and x.dtype == dtype and x.shape == (*lead, *shape):
        return x  # already a full field (the common case in a step): no checks, no view
    shape = tuple(int(s) for s in shape)
    if not isinstance(x, Tensor):
        x = torch.tensor(x, dtype=dtype, device=device)
    x = x.to(dtype)
    if x.dim() < len(shape):
        x = x.reshape((1,) * (len(shape) - x.dim()) + tuple(x.shape))
    xlead = tuple(x.shape[: x.dim() - len(shape)])
    lead = tuple(lead)
    if len(xlead) < len(lead):
        x = x.reshape((1,) * (len(lead) - len(xlead)) + tuple(x.shape))
    return x.expand((*lead, *shape)) if lead or shape else x  # a tuple: expand() of no sizes is an error


def reduce_axis(axis: int, rank: int) -> int:
    return axis - rank


def concat(xs: list, axis: int, rank: int) -> Tensor:
    """Concatenate along declared axis `axis` of values of declared rank `rank`, broadcasting
    the leading axes (unbatched operands are expanded)."""
    xs = [x for x in xs]
    lead_rank = max(x.dim() - rank for x in xs)
    xs = [x.reshape((1,) * (lead_rank - (x.dim() - rank)) + tuple(x.shape)) for x in xs]
    lead = broadcast_shapes(*(tuple(x.shape[:lead_rank]) for x in xs))
    xs = [x.expand(*lead, *x.shape[lead_rank:]) for x in xs]
    return torch.cat(xs, dim=axis - rank)


def reshape(x: Tensor, rank: int, shape: tuple) -> Tensor:
    lead = tuple(x.shape[: x.dim() - rank])
    return x.reshape(*lead, *(int(s) for s in shape))


def diag(x: Tensor) -> Tensor:
    return torch.diag_embed(x)


def layernorm(x: Tensor) -> Tensor:
    return F.layer_norm(x, (x.shape[-1],), eps=1e-5)


def attention(q: Tensor, k: Tensor, v: Tensor, heads: int, causal: bool) -> Tensor:
    """softmax(q_h k_h^T / sqrt(width/heads)) v_h per head over the first declared axis;
    `causal`: query i sees keys j <= i. Leading axes broadcast."""
    heads = int(heads)
    lead = broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2])
    q, k, v = (t.expand(*lead, *t.shape[-2:]) for t in (q, k, v))
    n, m = q.shape[-2], k.shape[-2]

    def split(t):
        # the leading axes as one, [batch, heads, tokens, width]: inductor's lowering of a 5-D
        # or wider SDPA call failed (torch 2.13, CPU), so torch.compile of a chunk op did
        return t.reshape(-1, t.shape[-2], heads, t.shape[-1] // heads).transpose(1, 2)

    # is_causal (torch's top-left aligned mask, the same as ones(n, m).tril()) rather than an
    # explicit mask: a boolean attn_mask rules out the flash-attention kernels on a GPU
    out = F.scaled_dot_product_attention(split(q), split(k), split(v), is_causal=bool(causal),
                                         scale=1.0 / math.sqrt(q.shape[-1] // heads))
    out = out.transpose(1, 2)
    return out.reshape(*lead, n, v.shape[-1])


def logical_not(x):
    return torch.logical_not(x) if isinstance(x, Tensor) else not x


def broadcast_shapes(*shapes) -> tuple:
    """torch.broadcast_shapes of shapes of Python ints, in plain Python: torch's goes through its
    symbolic-shape machinery (~70 us a call, on every forward's validation). Under torch.compile
    (symbolic sizes) torch's own. A mismatch is a RuntimeError, as there."""
    if torch.compiler.is_compiling():
        return tuple(torch.broadcast_shapes(*shapes))
    rank = max((len(s) for s in shapes), default=0)
    out = [1] * rank
    for shape in shapes:
        for i, n in enumerate(shape, rank - len(shape)):
            if n != 1 and out[i] != n:
                if out[i] != 1:
                    raise RuntimeError(f"shapes {[tuple(s) for s in shapes]} do not broadcast: size {out[i]} "
                                       f"against {n} at axis {i - rank}")
                out[i] = n
    return tuple(out)


def lead_of(pairs) -> tuple:
    """The broadcast leading shape of batched values given as (tensor, declared rank)."""
    shapes = [tuple(t.shape[: t.dim() - rank]) for t, rank in pairs if isinstance(t, Tensor)]
    if not shapes:
        return ()
    first = shapes[0]
    if all(s == first for s in shapes):
        return first  # one lead for all (the common case): no broadcast computation
    width = max(len(s) for s in shapes)
    return broadcast_shapes(*((1,) * (width - len(s)) + s for s in shapes))
