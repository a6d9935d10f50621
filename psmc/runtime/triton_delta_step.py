"""One decode token of the (gated) delta rule as one Triton kernel (GPU serving).

    S' = g S + beta k (v - g k^T S)^T,      o = scale * q^T S'

the same token as `psmc.runtime.delta.delta_rule_step` (whose torch form is ~8 kernel launches
per token on a GPU). One program per (lane row, block of BV value columns) holds its [K, BV]
slice of the state in registers: it reads the row's k^T S, writes the new state slice once
and reads q^T S' from it, so the state is read and written once per token. K (<= 256) is one
tile; V is cut into blocks so that a [K, BV] fp32 tile stays near 64 registers per thread.
Rows are grid axis 0 (up to 2^31 - 1), offsets are int64. Inputs may be fp32, bf16 or fp16;
the state is fp32 and the output is in v's dtype.

A product of r delta steps per token (DeltaProduct, `delta.delta_product_step`) is the same
launch with STEPS = r: k [.., r, K], v [.., r, V] and beta [.., r] are read step by step, the
gate applies before the first, and the state slice stays in registers through all r steps.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

import triton
import triton.language as tl

from psmc.runtime.custom_ops import traced

__all__ = ["triton_delta_step", "MAX_K"]

MAX_K = 256


@triton.jit
def _state_slice(K, V, BK: tl.constexpr, BV: tl.constexpr):
    """A decode program's lane row and [BK, BV] slice of its state: (row, key and value
    columns, their masks, the slice's int64 offsets in a [rows, K, V] state, its mask)."""
    row = tl.program_id(0).to(tl.int64)
    ck = tl.arange(0, BK)
    cv = tl.program_id(1) * BV + tl.arange(0, BV)
    mk, mv = ck < K, cv < V
    kv = row * K * V + ck[:, None].to(tl.int64) * V + cv[None, :]
    return row, ck, cv, mk, mv, kv, mk[:, None] & mv[None, :]


@triton.jit
def _delta_step_kernel(
    s_ptr, q_ptr, k_ptr, v_ptr, b_ptr, g_ptr, o_ptr, s_out_ptr, scale, K, V,
    BK: tl.constexpr, BV: tl.constexpr, HAS_S: tl.constexpr, GATED: tl.constexpr, STEPS: tl.constexpr = 1,
):
    row, ck, cv, mk, mv, kv, mask = _state_slice(K, V, BK, BV)
    if HAS_S:
        S = tl.load(s_ptr + kv, mask=mask, other=0.0).to(tl.float32)
    else:
        S = tl.zeros((BK, BV), dtype=tl.float32)
    q = tl.load(q_ptr + row * K + ck, mask=mk, other=0.0).to(tl.float32)
    for j in tl.static_range(STEPS):  # (one step unless a product of delta steps)
        step = row * STEPS + j
        k = tl.load(k_ptr + step * K + ck, mask=mk, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + step * V + cv, mask=mv, other=0.0).to(tl.float32)
        beta = tl.load(b_ptr + step).to(tl.float32)
        read = tl.sum(k[:, None] * S, axis=0)  # k^T S: [BV]
        if GATED:
            if j == 0:  # the gate applies once, before the token's first step
                gate = tl.exp(tl.load(g_ptr + row).to(tl.float32))
                S = gate * S
                read = gate * read
        S = S + (beta * k)[:, None] * (v - read)[None, :]
    o = tl.sum(q[:, None] * S, axis=0) * scale
    tl.store(s_out_ptr + kv, S, mask=mask)
    tl.store(o_ptr + row * V + cv, o.to(o_ptr.dtype.element_ty), mask=mv)


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _rows(x: Tensor, lead: tuple, width: tuple) -> Tensor:
    """x broadcast to [*lead, *width] as a contiguous [rows, *width] tensor (a copy only when it
    broadcasts or is strided)."""
    return x.expand(*lead, *width).reshape(-1, *width).contiguous()


def blocks(K: int, V: int) -> tuple[int, int]:
    """(BK, BV) of a program holding a [K, BV] fp32 state slice: K in one tile, V cut so that
    the slice stays near 64 registers per thread."""
    BK = max(16, _pow2(K))
    return BK, max(16, min(_pow2(V), 64 if BK <= 64 else 32))


def serves(S: Tensor | None, inputs: list, K: int) -> bool:
    """Whether a decode kernel serves this token: float32/bf16/fp16 inputs (None: absent), an
    fp32 state (or none), K <= MAX_K, no gradient wanted."""
    tensors = [t for t in (S, *inputs) if t is not None]
    if K > MAX_K:
        return False
    if S is not None and S.dtype != torch.float32:
        return False
    if any(t.dtype not in (torch.float32, torch.bfloat16, torch.float16) for t in tensors):
        return False
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))


def takes(S: Tensor | None, q: Tensor, k: Tensor, v: Tensor, beta: Tensor, log_decay: Tensor | None) -> bool:
    """Whether the kernel serves this token (`serves`)."""
    return serves(S, [q, k, v, beta, log_decay], q.shape[-1])


def decode_lead(S: Tensor | None, inputs: list) -> tuple:
    """The lane axes every input of a decode token (a list of (tensor or None, width)) and the
    state broadcast to."""
    shapes = [t.shape[:t.dim() - len(width)] for t, width in inputs if t is not None]
    shapes += [] if S is None else [S.shape[:-2]]
    return tuple(torch.broadcast_shapes(*shapes))


def decode_rows(S: Tensor | None, inputs: list, V: int, out_dtype: torch.dtype):
    """A decode launch's buffers: the lane axes `lead` every input broadcasts to, each input
    [*lanes, *width] as a contiguous [rows, *width] tensor (None stays None), the state as
    [rows, K, V] (or None), the output [rows, V] and the new state [rows, K, V] fp32.
    `inputs` is a list of (tensor or None, width): the trailing axes that are not lanes."""
    lead = decode_lead(S, inputs)
    rows = math.prod(lead)
    flat = [None if t is None else _rows(t, lead, width) for t, width in inputs]
    K = inputs[0][1][0]
    s_in = None if S is None else _rows(S, lead, (K, V))
    device = inputs[0][0].device
    o = torch.empty(rows, V, device=device, dtype=out_dtype)
    s_out = torch.empty(rows, K, V, device=device, dtype=torch.float32)
    return lead, flat, s_in, o, s_out


def _launch(S: Tensor | None, q: Tensor, k: Tensor, v: Tensor, beta: Tensor, log_decay: Tensor | None,
            scale: float, steps: int = 1) -> tuple[Tensor, Tensor]:
    """One decode token on `_delta_step_kernel` (`triton_delta_step`)."""
    K, V = q.shape[-1], v.shape[-1]
    lead, (qs, ks, vs, bs, gs), s_in, o, s_out = decode_rows(S, _widths(q, k, v, beta, log_decay, steps), V, v.dtype)
    if o.shape[0]:
        BK, BV = blocks(K, V)
        _delta_step_kernel[(o.shape[0], triton.cdiv(V, BV))](
            s_out if s_in is None else s_in, qs, ks, vs, bs, bs if gs is None else gs, o, s_out,
            float(scale), K, V, BK=BK, BV=BV, HAS_S=s_in is not None, GATED=gs is not None, STEPS=steps,
            num_warps=4)
    return o.reshape(*lead, V), s_out.reshape(*lead, K, V)


def _widths(q, k, v, beta, log_decay, steps: int = 1) -> list:
    """The trailing (non-lane) axes of each input: a product of delta steps has a steps axis
    before k's and v's width and as beta's last."""
    K, V = q.shape[-1], v.shape[-1]
    per_step = () if steps == 1 else (steps,)
    return [(q, (K,)), (k, (*per_step, K)), (v, (*per_step, V)), (beta, per_step), (log_decay, ())]


_delta_step = torch.library.custom_op("psmc::delta_step", _launch, mutates_args=())


@_delta_step.register_fake
def _delta_step_fake(S, q, k, v, beta, log_decay, scale, steps=1):
    lead = decode_lead(S, _widths(q, k, v, beta, log_decay, steps))
    K, V = q.shape[-1], v.shape[-1]
    return v.new_empty(*lead, V), q.new_empty(*lead, K, V, dtype=torch.float32)


_step = traced(_delta_step, _launch)


def triton_delta_step(S: Tensor | None, q: Tensor, k: Tensor, v: Tensor, beta: Tensor,
                      log_decay: Tensor | None = None, *, scale: float = 1.0, steps: int = 1) -> tuple[Tensor, Tensor]:
    """`delta_rule_step` as one kernel launch: S [B, *lanes, K, V] fp32 or None (zeros), q, k
    [B, *lanes, K], v [B, *lanes, V], beta and log_decay [B, *lanes] (lane axes broadcast).
    Returns (o [B, *lanes, V] in v's dtype, the new state [B, *lanes, K, V] fp32). With
    `steps` = r > 1 (`delta_product_step`): k [B, *lanes, r, K], v [B, *lanes, r, V] and beta
    [B, *lanes, r], the token's r delta steps in order. The caller checks `takes(...)` first.
    Under torch.compile the launch is the op psmc::delta_step."""
    return _step(S, q, k, v, beta, log_decay, float(scale), int(steps))
