"""The op-independent half of the Triton backend: choosing it, laying tensors out for the
generated kernels (psmc.codegen.triton_printer), launching them and rebuilding stream states.

Kernel layout: every per-token tensor is seen as [B, T, L, S'] (lanes flattened to L; S' is
the state axis S for rank-1 values and 1 for scalars) and passed as a pointer plus strides, so
broadcast inputs (a size-1 batch, lane or state axis) are stride-0 views, never copies. Stream
states are contiguous [B, L, S'] tensors.
"""
from __future__ import annotations

import dataclasses
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
    backward: object
    mode: str  # 'lanes' | 'state'
    axis: Callable[[dict], int] | None  # the state axis S from the dims; None in lanes mode
    full_tile: bool
    inputs: tuple
    input_ranks: tuple
    input_dtypes: tuple
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


def _geometry(kernels: TritonKernels, call, lead: tuple, T: int, whole_axis: bool = False) -> _Geometry:
    """whole_axis: one program holds all of S (the backward sums a rank-0 field's adjoint over
    S, so a pass that will be differentiated is tiled the same way)."""
    B, lanes = lead[0], tuple(lead[2:]) if T else tuple(lead[1:])
    L = math.prod(lanes)
    if kernels.mode == "lanes":
        block_c = min(_pow2(L), MAX_BLOCK_C)
        return _Geometry(B, T, lanes, L, 1, block_c, (B, triton_cdiv(L, block_c)))
    S = int(kernels.axis(call.ctx.d))
    block_c = _pow2(S) if kernels.full_tile or whole_axis else min(_pow2(S), MAX_BLOCK_C)
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


def _input_args(tensors, ranks, g: _Geometry, time: bool) -> list:
    args = []
    for x, rank in zip(tensors, ranks):
        x, strides = _as_tile(x, g, rank, time)
        args += [x, *strides]
    return args


def _param_args(params) -> list:
    args = []
    for p in params:
        p = p.detach()
        args += [p.contiguous().to(torch.float32) if p.is_floating_point() else p.contiguous(),
                 p.stride(-1) if p.dim() else 0]
    return args


def _per_token(g: _Geometry, rank: int, dtype, dev, time: bool) -> tuple:
    """An empty [B, (T,) L, S'] tensor and its strides (stride 0 over S' for rank-0 values)."""
    lead = (g.B, g.T) if time else (g.B,)
    t = torch.empty(*lead, g.L, g.S if rank else 1, device=dev, dtype=dtype)
    strides = list(t.stride())
    if not rank:
        strides[-1] = 0
    return t, strides


def _per_lane(g: _Geometry, rank: int, dtype, dev, extra: tuple = ()) -> torch.Tensor:
    return torch.empty(g.B, g.L, *extra, *((g.S,) if rank else ()), device=dev, dtype=dtype)


def _launch(layer, call, kernel, g: _Geometry, inputs, params, state_prefix, start: int, time: bool,
            block_t: int, save: bool = False):
    """Run the forward (time=True) or step kernel: (outputs, finals, boundaries)."""
    k = layer._triton_kernels
    dev = call.ctx.dev
    args = _input_args(inputs, k.input_ranks, g, time) + _param_args(params)
    for i, (rank, dtype) in enumerate(zip(k.field_ranks, k.field_dtypes)):
        args.append(_state_tensor(state_prefix[i], g, rank, _field_dtype(dtype)) if state_prefix is not None
                    else torch.empty(0, device=dev, dtype=_field_dtype(dtype)))
    outputs = []
    for rank, dtype in zip(k.output_ranks, k.output_dtypes):
        out, strides = _per_token(g, rank, call.ctx.dt[dtype] if dtype in call.ctx.dt else torch.float32, dev, time)
        args += [out, *strides]
        outputs.append((out, rank))
    finals = [(_per_lane(g, rank, _field_dtype(dtype), dev), rank)
              for rank, dtype in zip(k.field_ranks, k.field_dtypes)]
    args += [f for f, _ in finals]
    n_blocks = triton_cdiv(g.T, block_t) if time else 0
    bounds = []
    if time:
        bounds = [_per_lane(g, rank, _field_dtype(dtype), dev, (n_blocks,)) if save else
                  torch.empty(0, device=dev, dtype=_field_dtype(dtype))
                  for rank, dtype in zip(k.field_ranks, k.field_dtypes)]
        args += bounds
    args += [g.T, g.L, g.S, start] + ([n_blocks] if time else [])
    args += [int(call.ctx.d[d]) for d in k.dims]
    extra = {"SAVE": save} if time else {}
    kernel[g.grid](*args, HAS_INIT=state_prefix is not None, BLOCK_T=block_t, BLOCK_C=g.block_c, **extra)
    return outputs, finals, bounds


def _unflatten(t: torch.Tensor, g: _Geometry, rank: int, time: bool) -> torch.Tensor:
    lead = (g.B, g.T) if time else (g.B,)
    return t.reshape(*lead, *g.lanes, *((g.S,) if rank else ()))


def _is_float(dtype: str) -> bool:
    return dtype in ("f16", "bf16", "f32", "f64")


class _ScanFunction(torch.autograd.Function):
    """The fused forward pass with the generated backward kernel as its gradient.

    apply(meta, *inputs, *params, *init_fields) -> (*outputs, *final_fields); `meta` holds what
    is not a tensor (layer, call, geometry, block size, stream start, whether init is given)."""

    @staticmethod
    def forward(ctx, meta, *flat):
        layer, call, g, block_t, start, has_init = meta
        k = layer._triton_kernels
        n_in, n_par = len(k.inputs), len(k.params)
        inputs, params = flat[:n_in], flat[n_in:n_in + n_par]
        prefix = flat[n_in + n_par:] if has_init else None
        outputs, finals, bounds = _launch(layer, call, k.forward, g, inputs, params, prefix, start, True,
                                          block_t, save=True)
        outs = [_unflatten(o, g, r, True) for o, r in outputs]
        fins = [_unflatten(f, g, r, False) for f, r in finals]
        ctx.meta = meta
        ctx.shapes = [x.shape for x in flat]
        ctx.save_for_backward(*flat, *bounds)
        ctx.mark_non_differentiable(*[o for o, dt in zip(outs, k.output_dtypes) if not _is_float(dt)],
                                    *[f for f, dt in zip(fins, k.field_dtypes) if not _is_float(dt)])
        return (*outs, *fins)

    @staticmethod
    def backward(ctx, *grads):
        layer, call, g, block_t, start, has_init = ctx.meta
        k = layer._triton_kernels
        dev = call.ctx.dev
        saved = ctx.saved_tensors
        n_in, n_par, n_f = len(k.inputs), len(k.params), len(k.field_dtypes)
        n_flat = len(ctx.shapes)
        inputs, params = saved[:n_in], saved[n_in:n_in + n_par]
        prefix = saved[n_in + n_par:n_flat] if has_init else None
        bounds = saved[n_flat:]
        out_grads, fin_grads = grads[:len(k.output_dtypes)], grads[len(k.output_dtypes):]
        f32 = torch.float32
        args = _input_args(inputs, k.input_ranks, g, True) + _param_args(params)
        for i, (rank, dtype) in enumerate(zip(k.field_ranks, k.field_dtypes)):
            args.append(_state_tensor(prefix[i], g, rank, _field_dtype(dtype)) if prefix is not None
                        else torch.empty(0, device=dev, dtype=_field_dtype(dtype)))
        args += list(bounds)
        for grad, rank in zip(out_grads, k.output_ranks):
            if grad is None or not grad.is_floating_point():
                grad = torch.zeros((), device=dev, dtype=f32)
            grad, strides = _as_tile(grad.expand(*_lead(g, True), *_declared(g, rank)), g, rank, True)
            args += [grad, *strides]
        has_dfin = any(gr is not None for gr, dt in zip(fin_grads, k.field_dtypes) if _is_float(dt))
        for grad, rank, dtype in zip(fin_grads, k.field_ranks, k.field_dtypes):
            if has_dfin and _is_float(dtype):
                grad = grad if grad is not None else torch.zeros((), device=dev, dtype=f32)
                args.append(_state_tensor(grad, g, rank, f32))
            else:
                args.append(torch.empty(0, device=dev, dtype=f32))
        din = []
        for rank in k.input_ranks:
            t, strides = _per_token(g, rank, f32, dev, True)
            args += [t, *strides]
            din.append((t, rank))
        dpar = [_per_lane(g, p.dim() > 0, f32, dev) for p in params]
        dini = [_per_lane(g, rank, f32, dev) for rank in k.field_ranks]
        scratch = [_per_lane(g, 1, _field_dtype(dtype), dev, (block_t,)) for dtype in k.field_dtypes]
        args += dpar + dini + scratch
        args += [g.T, g.L, g.S, start, triton_cdiv(g.T, block_t)] + [int(call.ctx.d[d]) for d in k.dims]
        k.backward[g.grid](*args, HAS_INIT=has_init, HAS_DFIN=has_dfin, BLOCK_T=block_t, BLOCK_C=g.block_c)
        result = [None]
        for (t, rank), x, dtype in zip(din, inputs, k.input_dtypes):
            grad = _unflatten(t, g, rank, True)
            result.append(grad.sum_to_size(x.shape).to(x.dtype) if _is_float(dtype) and x.is_floating_point()
                          else None)
        for t, p in zip(dpar, params):
            result.append(t.sum(dim=(0, 1)).reshape(p.shape).to(p.dtype) if p.is_floating_point() else None)
        if has_init:
            for t, rank, dtype, x in zip(dini, k.field_ranks, k.field_dtypes, prefix):
                grad = _unflatten(t, g, rank, False)
                result.append(grad.sum_to_size(x.shape).to(x.dtype) if _is_float(dtype) and x.is_floating_point()
                              else None)
        return tuple(result)


def _lead(g: _Geometry, time: bool) -> tuple:
    return ((g.B, g.T) if time else (g.B,)) + g.lanes


def _declared(g: _Geometry, rank: int) -> tuple:
    return (g.S,) if rank else ()


def _params(layer) -> list:
    return [getattr(layer, "p_" + name) for name in layer._triton_kernels.params]


def forward(layer, call, state, block_t: int | None = None):
    """The fused parallel pass: (outputs, new ScanState). Differentiable: when a gradient is
    needed it runs through `_ScanFunction`, whose backward is the generated reverse scan."""
    k = layer._triton_kernels
    lead = call.lead
    grad = _grad_needed(layer, call) or (state is not None and state.prefix is not None and
                                        any(t.requires_grad for t in state.prefix) and torch.is_grad_enabled())
    g = _geometry(k, call, lead, lead[1], whole_axis=grad)
    block_t = block_t or getattr(layer, "triton_block_t", None) or min(_pow2(g.T), DEFAULT_BLOCK_T)
    prefix = state.prefix if state is not None else None
    start = state.size if state is not None else 0
    inputs = [call.inputs[name] for name in k.inputs]
    if grad:
        meta = (layer, call, g, block_t, start, prefix is not None)
        flat = _ScanFunction.apply(meta, *inputs, *_params(layer), *(prefix or ()))
        outs, new_prefix = tuple(flat[:len(k.output_dtypes)]), tuple(flat[len(k.output_dtypes):])
    else:
        outputs, finals, _ = _launch(layer, call, k.forward, g, inputs, _params(layer), prefix, start,
                                     time=True, block_t=block_t)
        outs = tuple(_unflatten(o, g, r, True) for o, r in outputs)
        new_prefix = tuple(_unflatten(f, g, r, False) for f, r in finals)
    count = (state.count if state is not None else torch.zeros((), dtype=torch.int64, device=call.ctx.dev)) + g.T
    return outs, ScanState(prefix=new_prefix, count=count)


def step(layer, call, state):
    """The fused decode step for one token: (outputs, new ScanState). When a gradient is
    needed the token runs as a one-token differentiable forward pass continuing `state`."""
    k = layer._triton_kernels
    if _grad_needed(layer, call) or (state.prefix is not None and torch.is_grad_enabled() and
                                     any(t.requires_grad for t in state.prefix)):
        one = dataclasses.replace(call, inputs={n: x.unsqueeze(1) for n, x in call.inputs.items()},
                                  lead=(call.lead[0], 1) + tuple(call.lead[1:]))
        outs, new_state = forward(layer, one, state if state.prefix is not None else None, block_t=1)
        if state.prefix is None:
            new_state = ScanState(prefix=new_state.prefix, count=state.count + 1)
        return tuple(o.squeeze(1) for o in outs), new_state
    g = _geometry(k, call, call.lead, 0)
    inputs = [call.inputs[name] for name in k.inputs]
    outputs, finals, _ = _launch(layer, call, k.step, g, inputs, _params(layer), state.prefix, state.size,
                                 time=False, block_t=1)
    outs = tuple(_unflatten(o, g, r, False) for o, r in outputs)
    new_prefix = tuple(_unflatten(f, g, r, False) for f, r in finals)
    return outs, ScanState(prefix=new_prefix, count=state.count + 1)


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"
