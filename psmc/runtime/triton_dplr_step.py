"""One decode token of the diagonal-plus-low-rank recurrence as one Triton kernel (GPU serving).

    S' = exp(lam) (.) S + b (a^T S) + k v^T,      o = scale * q^T S'

the same token as `psmc.runtime.dplr.dplr_step` (RWKV-7, KDA; whose torch form is ~10 kernel
launches per token on a GPU). One program per (lane row, block of BV value columns) holds its
[K, BV] slice of the state in registers: it reads the row's a^T S, writes the new state slice
once and reads q^T S' from it, so the state is read and written once per token. K (<= 256) is
one tile; V is cut into blocks so that a [K, BV] fp32 tile stays near 64 registers per thread.
Rows are grid axis 0 (up to 2^31 - 1), offsets are int64. Inputs may be fp32, bf16 or fp16;
the state is fp32 and the output is in v's dtype.
"""
from __future__ import annotations

import torch
from torch import Tensor

import triton
import triton.language as tl

from psmc.runtime.custom_ops import traced
from psmc.runtime.triton_delta_step import MAX_K, _state_slice, blocks, decode_lead, decode_rows, serves

__all__ = ["triton_dplr_step", "takes", "MAX_K"]


@triton.jit
def _dplr_step_kernel(
    s_ptr, q_ptr, k_ptr, v_ptr, a_ptr, b_ptr, g_ptr, o_ptr, s_out_ptr, scale, K, V,
    BK: tl.constexpr, BV: tl.constexpr, HAS_S: tl.constexpr, DECAY: tl.constexpr,
):
    row, ck, cv, mk, mv, kv, mask = _state_slice(K, V, BK, BV)
    q = tl.load(q_ptr + row * K + ck, mask=mk, other=0.0).to(tl.float32)
    k = tl.load(k_ptr + row * K + ck, mask=mk, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + row * V + cv, mask=mv, other=0.0).to(tl.float32)
    S = k[:, None] * v[None, :]  # the write k v^T
    if HAS_S:
        old = tl.load(s_ptr + kv, mask=mask, other=0.0).to(tl.float32)
        a = tl.load(a_ptr + row * K + ck, mask=mk, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + row * K + ck, mask=mk, other=0.0).to(tl.float32)
        read = tl.sum(a[:, None] * old, axis=0)  # a^T S, of the state before the token: [BV]
        if DECAY:
            old = tl.exp(tl.load(g_ptr + row * K + ck, mask=mk, other=0.0).to(tl.float32))[:, None] * old
        S += old + b[:, None] * read[None, :]
    o = tl.sum(q[:, None] * S, axis=0) * scale
    tl.store(s_out_ptr + kv, S, mask=mask)
    tl.store(o_ptr + row * V + cv, o.to(o_ptr.dtype.element_ty), mask=mv)


def takes(S: Tensor | None, q: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor, log_decay: Tensor | None) -> bool:
    """Whether the kernel serves this token (`triton_delta_step.serves`: float32/bf16/fp16
    inputs, an fp32 state or none, K <= MAX_K, no gradient wanted)."""
    return serves(S, [q, k, v, a, b, log_decay], q.shape[-1])


def _widths(q, k, v, a, b, log_decay) -> list:
    K, V = q.shape[-1], v.shape[-1]
    # log_decay's last axis may be 1: _rows expands it to K
    return [(q, (K,)), (k, (K,)), (v, (V,)), (a, (K,)), (b, (K,)), (log_decay, (K,))]


def _launch(S: Tensor | None, q: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor, log_decay: Tensor | None,
            scale: float) -> tuple[Tensor, Tensor]:
    """One decode token on `_dplr_step_kernel` (`triton_dplr_step`)."""
    K, V = q.shape[-1], v.shape[-1]
    lead, (qs, ks, vs, as_, bs, gs), s_in, o, s_out = decode_rows(S, _widths(q, k, v, a, b, log_decay), V, v.dtype)
    if o.shape[0]:
        BK, BV = blocks(K, V)
        _dplr_step_kernel[(o.shape[0], triton.cdiv(V, BV))](
            s_out if s_in is None else s_in, qs, ks, vs, as_, bs, qs if gs is None else gs, o, s_out,
            float(scale), K, V, BK=BK, BV=BV, HAS_S=s_in is not None, DECAY=gs is not None, num_warps=4)
    return o.reshape(*lead, V), s_out.reshape(*lead, K, V)


_dplr_step = torch.library.custom_op("psmc::dplr_step", _launch, mutates_args=())


@_dplr_step.register_fake
def _dplr_step_fake(S, q, k, v, a, b, log_decay, scale):
    lead = decode_lead(S, _widths(q, k, v, a, b, log_decay))
    K, V = q.shape[-1], v.shape[-1]
    return v.new_empty(*lead, V), q.new_empty(*lead, K, V, dtype=torch.float32)


_step = traced(_dplr_step, _launch)


def triton_dplr_step(S: Tensor | None, q: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor,
                     log_decay: Tensor | None = None, *, scale: float = 1.0) -> tuple[Tensor, Tensor]:
    """`dplr_step` as one kernel launch: S [B, *lanes, K, V] fp32 or None (zeros), q, k, a, b
    [B, *lanes, K], v [B, *lanes, V], log_decay None or [B, *lanes, K or 1] (leading axes
    broadcast). Returns (o [B, *lanes, V] in v's dtype, the new state [B, *lanes, K, V] fp32).
    The caller checks `takes(...)` first. Under torch.compile the launch is the op psmc::dplr_step."""
    return _step(S, q, k, v, a, b, log_decay, float(scale))
