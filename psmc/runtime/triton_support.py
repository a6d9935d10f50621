"""The op-independent half of the Triton backend: choosing it, laying tensors out for the
generated kernels (psmc.codegen.triton_printer), launching them and rebuilding stream states.

Kernel layout: every per-token tensor is seen as [B, T, L, S'] (lanes flattened to L; S' is
the state axis S for rank-1 values and 1 for scalars) and passed as a pointer plus strides, so
broadcast inputs (a size-1 batch, lane or state axis) are stride-0 views, never copies. Stream
states are contiguous [B, L, S'] tensors.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Callable

import torch

from .state import ScanState

DEFAULT_BLOCK_T = 64
MAX_BLOCK_C = 64  # columns per program when the tile needs not hold the whole state axis

_KERNEL_DTYPES = {"f32": torch.float32, "i32": torch.int32, "i64": torch.int64, "bool": torch.bool}


@dataclass(frozen=True)
class TritonKernels:
    """What the generated module registers on a layer class as `_triton_kernels`."""

    forward: object
    step: object
    mode: str  # 'lanes' | 'state'
    axis: Callable[[dict], int] | None  # the state axis S from the dims; None in lanes mode
    full_tile: bool
    inputs: tuple
    input_ranks: tuple
    params: tuple
    field_ranks: tuple
    field_dtypes: tuple
    output_ranks: tuple
    output_dtypes: tuple
    dims: tuple


def _interpreted(kernel) -> bool:
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:
        return False
    return isinstance(kernel, InterpretedFunction)


def _grad_needed(layer, call) -> bool:
    if not torch.is_grad_enabled():
        return False
    return any(x.requires_grad for x in call.inputs.values()) or any(p.requires_grad for p in layer.parameters())


def unusable_reason(layer, call) -> str | None:
    """Why this call cannot run the Triton kernels, or None when it can."""
    kernels = getattr(layer, "_triton_kernels", None)
    if kernels is None:
        return "its plan has no Triton kernels (see `psmc check`)"
    if call.ctx.dev.type == "cpu" and not _interpreted(kernels.forward):
        return ("the inputs are CPU tensors: Triton needs CUDA tensors, or TRITON_INTERPRET=1 set before the "
                "generated module is imported (the interpreter, for tests)")
    if call.ctx.dev.type not in ("cpu", "cuda"):
        return f"the inputs are on {call.ctx.dev.type}: Triton kernels need CUDA tensors"
    if call.ctx.dt["f32"] == torch.float64:
        return "float64 inputs or params: the kernels accumulate in fp32"
    if _grad_needed(layer, call):
        return "a gradient is needed and the Triton backward is not generated yet"
    return None


def use_triton(layer, call) -> bool:
    """backend='auto': Triton for CUDA tensors when usable; 'triton': Triton or a clear error."""
    if layer.backend == "torch":
        return False
    reason = unusable_reason(layer, call)
    if layer.backend == "triton" and reason is not None:
        raise RuntimeError(f"{layer.spec.name}: backend='triton' cannot run this call: {reason}; "
                           "use backend='auto' or 'torch'")
    if layer.backend == "auto":
        return reason is None and call.ctx.dev.type == "cuda"
    return reason is None


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


@dataclass(frozen=True)
class _Geometry:
    B: int
    T: int
    lanes: tuple
    L: int
    S: int
    block_c: int
    grid: tuple


def _geometry(kernels: TritonKernels, call, lead: tuple, T: int) -> _Geometry:
    B, lanes = lead[0], tuple(lead[2:]) if T else tuple(lead[1:])
    L = math.prod(lanes)
    if kernels.mode == "lanes":
        block_c = min(_pow2(L), MAX_BLOCK_C)
        return _Geometry(B, T, lanes, L, 1, block_c, (B, triton_cdiv(L, block_c)))
    S = int(kernels.axis(call.ctx.d))
    block_c = _pow2(S) if kernels.full_tile else min(_pow2(S), MAX_BLOCK_C)
    return _Geometry(B, T, lanes, L, S, block_c, (B, L, triton_cdiv(S, block_c)))


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _as_tile(x: torch.Tensor, g: _Geometry, rank: int, time: bool) -> tuple:
    """x [B?, (T,) *lanes?, *declared] → a [B, (T,) L, S'] view and its strides (S' = 1 and
    stride 0 for scalars, so one offset formula serves both)."""
    lead = (g.B, g.T) if time else (g.B,)
    declared = tuple(x.shape[x.dim() - rank:]) if rank else ()
    x = x.expand(*lead, *g.lanes, *declared)
    x = x.reshape(*lead, g.L, *(declared if rank else (1,)))
    strides = list(x.stride())
    if not rank:
        strides[-1] = 0
    return x, strides


def _state_tensor(t: torch.Tensor, g: _Geometry, rank: int, dtype) -> torch.Tensor:
    declared = tuple(t.shape[t.dim() - rank:]) if rank else ()
    t = t.expand(g.B, *g.lanes, *declared).to(dtype)
    return t.reshape(g.B, g.L, *(declared if rank else ())).contiguous()


def _field_dtype(dtype: str):
    return _KERNEL_DTYPES.get(dtype, torch.float32)


def _launch(layer, call, kernel, g: _Geometry, state_prefix, start: int, time: bool, block_t: int):
    k = layer._triton_kernels
    args = []
    for name, rank in zip(k.inputs, k.input_ranks):
        x, strides = _as_tile(call.inputs[name], g, rank, time)
        args += [x, *strides]
    for name in k.params:
        p = getattr(layer, "p_" + name).detach()
        args += [p.contiguous().to(torch.float32) if p.is_floating_point() else p.contiguous(),
                 p.stride(-1) if p.dim() else 0]
    dev = call.ctx.dev
    for i, (rank, dtype) in enumerate(zip(k.field_ranks, k.field_dtypes)):
        args.append(_state_tensor(state_prefix[i], g, rank, _field_dtype(dtype)) if state_prefix is not None
                    else torch.empty(0, device=dev, dtype=_field_dtype(dtype)))
    outputs = []
    lead = (g.B, g.T) if time else (g.B,)
    for rank, dtype in zip(k.output_ranks, k.output_dtypes):
        out = torch.empty(*lead, g.L, g.S if rank else 1, device=dev,
                          dtype=call.ctx.dt[dtype] if dtype in call.ctx.dt else torch.float32)
        strides = list(out.stride())
        if not rank:
            strides[-1] = 0
        args += [out, *strides]
        outputs.append((out, rank))
    finals = []
    for rank, dtype in zip(k.field_ranks, k.field_dtypes):
        fin = torch.empty(g.B, g.L, *((g.S,) if rank else ()), device=dev, dtype=_field_dtype(dtype))
        args.append(fin)
        finals.append((fin, rank))
    args += [g.T, g.L, g.S, start]
    args += [int(call.ctx.d[d]) for d in k.dims]
    kernel[g.grid](*args, HAS_INIT=state_prefix is not None, BLOCK_T=block_t, BLOCK_C=g.block_c)
    return outputs, finals


def _unflatten(t: torch.Tensor, g: _Geometry, rank: int, time: bool) -> torch.Tensor:
    lead = (g.B, g.T) if time else (g.B,)
    return t.reshape(*lead, *g.lanes, *((g.S,) if rank else ()))


def forward(layer, call, state, block_t: int | None = None):
    """The fused parallel pass: (outputs, new ScanState)."""
    k = layer._triton_kernels
    lead = call.lead
    g = _geometry(k, call, lead, lead[1])
    block_t = block_t or getattr(layer, "triton_block_t", None) or min(_pow2(g.T), DEFAULT_BLOCK_T)
    prefix = state.prefix if state is not None else None
    start = state.size if state is not None else 0
    outputs, finals = _launch(layer, call, k.forward, g, prefix, start, time=True, block_t=block_t)
    outs = tuple(_unflatten(o, g, r, True) for o, r in outputs)
    new_prefix = tuple(_unflatten(f, g, r, False) for f, r in finals)
    count = (state.count if state is not None else torch.zeros((), dtype=torch.int64, device=call.ctx.dev)) + g.T
    return outs, ScanState(prefix=new_prefix, count=count)


def step(layer, call, state):
    """The fused decode step for one token: (outputs, new ScanState)."""
    k = layer._triton_kernels
    g = _geometry(k, call, call.lead, 0)
    outputs, finals = _launch(layer, call, k.step, g, state.prefix, state.size, time=False, block_t=1)
    outs = tuple(_unflatten(o, g, r, False) for o, r in outputs)
    new_prefix = tuple(_unflatten(f, g, r, False) for f, r in finals)
    return outs, ScanState(prefix=new_prefix, count=state.count + 1)


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"
