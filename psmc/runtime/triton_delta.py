"""The (gated) delta rule on chunked Triton kernels, in the WY/UT form (forward).

    S_t = g_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,      o_t = scale * q_t @ S_t

with g_t = exp(log_decay_t) (1 without log_decay). Rewriting the update as
S_t = g_t S_{t-1} + k_t u_t^T with u_t = beta_t (v_t - g_t S_{t-1}^T k_t), a chunk of L tokens
entering with state S gives, with G_t the log decay from the chunk start to t and
A[t, s] = beta_t exp(G_t - G_s) (k_t . k_s) for s < t (strictly lower triangular):

    U = (I + A)^-1 (beta V) - (I + A)^-1 (beta exp(G) K) S  =  U~ - W S
    O = scale * [exp(G) Q S + (Q K^T (.) exp(G_t - G_s), s <= t) U]
    S' = exp(G_L) S + (K (.) exp(G_L - G_s))^T U

Kernels: `_wy_kernel` (one program per chunk and lane: the triangular solve by forward
substitution on a [L, L] tile, then W = T (beta e^G K) and U~ = T (beta V) as `tl.dot`s),
`_delta_state_kernel` (per lane and V block, chunks in order: U = U~ - W S, the state update,
storing the entering states and U), and the output is `triton_chunk._out_kernel` (the decayed
linear attention output with values U and a scalar decay). The decay exponents are sums over
exactly the tokens they span (a masked cumsum for the [L, L] mask), as in triton_chunk.

Backward: none yet. When gradients are needed (or for float64 inputs), the same WY form runs
as torch ops (`psmc.runtime.delta._chunk_delta_rule_torch`, the CPU path: differentiable by
autograd, on any device); HAS_BACKWARD says which.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

import triton
import triton.language as tl

from psmc.runtime import delta as _delta
from psmc.runtime import triton_chunk as _tc
from psmc.runtime.triton_chunk import _mm, _pow2, _tile

__all__ = ["triton_chunk_delta_rule", "HAS_BACKWARD", "KERNELS"]

HAS_BACKWARD = False  # the Triton kernels are forward only; training runs the torch WY form
KERNELS = ["_wy_kernel", "_delta_state_kernel"]  # and triton_chunk._out_kernel for the outputs


@triton.jit
def _gates(g_ptr, off, t, lo, hi, T, s_t, DECAY: tl.constexpr):
    """Log gates at times lo <= t < min(hi, T) as an fp32 vector, zero elsewhere (and without
    a gate). Vectors, not [R, 1] tiles: Triton 3.6 fails to lower a scan over [R, 1]."""
    if DECAY == 0:
        return (t * 0).to(tl.float32)
    else:
        ok = (t >= lo) & (t < hi) & (t < T)
        return tl.load(g_ptr + off + t.to(tl.int64) * s_t, mask=ok, other=0.0).to(tl.float32)


@triton.jit
def _wy_kernel(
    k_ptr, skb, skt, skh, skd,
    v_ptr, svb, svt, svh, svd,
    b_ptr, sbb, sbt, sbh,
    g_ptr, sgb, sgt, sgh,
    w_ptr, u_ptr,
    T, H, K, V, NT,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, DECAY: tl.constexpr, IEEE: tl.constexpr,
):
    """W = (I + A)^-1 (beta e^G K) [B, T, H, K] and U~ = (I + A)^-1 (beta V) [B, T, H, V] for one
    chunk of one lane."""
    pid = tl.program_id(0).to(tl.int64)
    c = pid % NT
    bh = pid // NT
    b = bh // H
    hh = bh % H
    DT = k_ptr.dtype.element_ty
    k_off = b * skb + hh * skh
    v_off = b * svb + hh * svh
    lo = (c * BT).to(tl.int32)
    rows = tl.arange(0, BT)
    t = lo + rows
    ok = t < T
    beta = tl.load(b_ptr + b * sbb + hh * sbh + t.to(tl.int64) * sbt, mask=ok, other=0.0).to(tl.float32)
    gl = _gates(g_ptr, b * sgb + hh * sgh, t, lo, lo + BT, T, sgt, DECAY)  # [BT]
    from_start = tl.cumsum(gl, axis=0)  # G_t, <= 0
    # span[t, s] = sum of the log decays over s < r <= t: a cumsum down each column, exact
    span = tl.cumsum(tl.where(rows[:, None] > rows[None, :], gl[:, None], 0.0), axis=0)
    kk = tl.zeros((BT, BT), dtype=tl.float32)
    for kb in range(tl.cdiv(K, BK)):
        ck = kb * BK + tl.arange(0, BK)
        kt = _tile(k_ptr, k_off, t, lo, lo + BT, T, skt, ck, K, skd, False)
        kk += _mm(kt, tl.trans(kt), IEEE, DT)
    lower = rows[:, None] > rows[None, :]
    a = tl.where(lower, beta[:, None] * tl.exp(tl.where(lower, span, 0.0)) * kk, 0.0)
    # (I + A)^-1 by forward substitution: row t = e_t - sum_{s<t} A[t, s] row s
    inv = tl.where(rows[:, None] == rows[None, :], 1.0, 0.0)
    for r in range(1, BT):
        a_row = tl.sum(tl.where(rows[:, None] == r, a, 0.0), axis=0)  # A[r, :]
        new = tl.where(rows == r, 1.0, 0.0) - tl.sum(a_row[:, None] * inv, axis=0)
        inv = tl.where(rows[:, None] == r, new[None, :], inv)
    wk = (beta * tl.exp(from_start))[:, None]  # [BT, 1]
    for kb in range(tl.cdiv(K, BK)):
        ck = kb * BK + tl.arange(0, BK)
        kt = _tile(k_ptr, k_off, t, lo, lo + BT, T, skt, ck, K, skd, False).to(tl.float32)
        w = _mm(inv, kt * wk, IEEE, DT)
        w_ptrs = w_ptr + ((b * T + t.to(tl.int64)[:, None]) * H + hh) * K + ck[None, :]
        tl.store(w_ptrs, w.to(w_ptr.dtype.element_ty), mask=ok[:, None] & (ck < K)[None, :])
    for vb in range(tl.cdiv(V, BV)):
        cv = vb * BV + tl.arange(0, BV)
        vt = _tile(v_ptr, v_off, t, lo, lo + BT, T, svt, cv, V, svd, False).to(tl.float32)
        u = _mm(inv, vt * beta[:, None], IEEE, DT)
        u_ptrs = u_ptr + ((b * T + t.to(tl.int64)[:, None]) * H + hh) * V + cv[None, :]
        tl.store(u_ptrs, u.to(u_ptr.dtype.element_ty), mask=ok[:, None] & (cv < V)[None, :])


@triton.jit
def _delta_state_kernel(
    k_ptr, skb, skt, skh, skd,
    g_ptr, sgb, sgt, sgh,
    w_ptr, u_ptr, h0_ptr, hs_ptr, hT_ptr,
    T, H, K, V, NT,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    DECAY: tl.constexpr, HAS_H0: tl.constexpr, IEEE: tl.constexpr,
):
    """Chunks in order for one lane and BV value columns (all K rows): store the entering state,
    U = U~ - W S (in place of U~), S <- e^{G_L} S + (K e^{G_L - G})^T U; the final state in fp32."""
    pid = tl.program_id(0).to(tl.int64)
    nv = tl.cdiv(V, BV)
    vb = pid % nv
    bh = pid // nv
    b = bh // H
    hh = bh % H
    DT = k_ptr.dtype.element_ty
    k_off = b * skb + hh * skh
    g_off = b * sgb + hh * sgh
    ck = tl.arange(0, BK)
    cv = vb * BV + tl.arange(0, BV)
    kv = ck[:, None].to(tl.int64) * V + cv[None, :]
    kv_mask = (ck < K)[:, None] & (cv < V)[None, :]
    if HAS_H0:
        h = tl.load(h0_ptr + bh * K * V + kv, mask=kv_mask, other=0.0).to(tl.float32)
    else:
        h = tl.zeros((BK, BV), dtype=tl.float32)
    rows = tl.arange(0, BT)
    for c in range(NT):
        tl.store(hs_ptr + (bh * NT + c) * K * V + kv, h.to(hs_ptr.dtype.element_ty), mask=kv_mask)
        lo = c * BT
        t = lo + rows
        ok = t < T
        rowsT = (b * T + t.to(tl.int64)) * H + hh
        w = tl.load(w_ptr + rowsT[:, None] * K + ck[None, :], mask=ok[:, None] & (ck < K)[None, :], other=0.0)
        u_ptrs = u_ptr + rowsT[:, None] * V + cv[None, :]
        u_mask = ok[:, None] & (cv < V)[None, :]
        u = tl.load(u_ptrs, mask=u_mask, other=0.0).to(tl.float32) - _mm(w, h, IEEE, DT)
        tl.store(u_ptrs, u.to(u_ptr.dtype.element_ty), mask=u_mask)
        kt = _tile(k_ptr, k_off, t, lo, lo + BT, T, skt, ck, K, skd, False).to(tl.float32)
        after = _gates(g_ptr, g_off, t + 1, lo, lo + BT, T, sgt, DECAY)
        here = _gates(g_ptr, g_off, t, lo, lo + BT, T, sgt, DECAY)
        kd = kt * tl.exp(tl.cumsum(after, axis=0, reverse=True))[:, None]
        h = h * tl.exp(tl.sum(here, axis=0)) + _mm(tl.trans(kd), u, IEEE, DT)
    tl.store(hT_ptr + bh * K * V + kv, h, mask=kv_mask)


def triton_chunk_delta_rule(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    beta: Tensor,
    log_decay: Tensor | None = None,
    *,
    scale: float = 1.0,
    initial_state: Tensor | None = None,
    chunk_size: int = 64,
) -> tuple[Tensor, Tensor]:
    """The (gated) delta rule, all positions at once: q, k [B, T, *lanes, K], v [B, T, *lanes, V],
    beta [B, T, *lanes], log_decay None or [B, T, *lanes] (lane axes may have size 1; time may be
    1 for beta and log_decay). Returns o [B, T, *lanes, V] in v's dtype and the final state
    [B, *lanes, K, V] in fp32 (fp64 for fp64 inputs). CUDA tensors (or CPU under
    TRITON_INTERPRET=1) of fp32/bf16/fp16 run the Triton kernels; when gradients are needed or
    for float64 the torch WY form runs instead (see HAS_BACKWARD)."""
    lanes = _delta._lanes(q, k, v, beta, log_decay)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    B, T, K, V = q.shape[0], q.shape[1], q.shape[-1], v.shape[-1]
    needs_grad = torch.is_grad_enabled() and any(
        x is not None and x.requires_grad for x in (q, k, v, beta, log_decay, initial_state))
    if (needs_grad or q.dtype == torch.float64 or T == 0 or len({q.dtype, k.dtype, v.dtype}) != 1
            or K > 256):
        return _delta._chunk_delta_rule_torch(q, k, v, beta, log_decay, scale, initial_state, chunk_size)
    H = math.prod(lanes)

    def flat(x: Tensor, width: tuple[int, ...]) -> Tensor:
        return x.expand(B, T, *lanes, *width).reshape(B, T, H, *width)

    q4, k4, v4, b4 = flat(q, (K,)), flat(k, (K,)), flat(v, (V,)), flat(beta, ())
    g4 = None if log_decay is None else flat(log_decay.float(), ())
    decay = 0 if g4 is None else 1
    BK = max(16, _pow2(K))
    BT = max(16, min(_pow2(chunk_size), _pow2(T)))
    if q.dtype == torch.float32 and BK > 64:
        BT = min(BT, 32)  # fp32 [BT, K] tiles of W and K: 32-token chunks keep them in registers
    NT = -(-T // BT)
    ieee = q.dtype == torch.float32
    # fp32 dots run on FMA units (IEEE, no tf32) and hold more registers: smaller V blocks
    BV = max(16, min(16 if ieee else 64, _pow2(V)))
    warps = 8 if (ieee or BK > 64) else 4
    w = torch.empty(B, T, H, K, device=q.device, dtype=k.dtype)
    u = torch.empty(B, T, H, V, device=q.device, dtype=v.dtype if not ieee else torch.float32)
    gs = (0, 0, 0) if g4 is None else g4.stride()
    _wy_kernel[(B * H * NT,)](
        k4, *k4.stride(), v4, *v4.stride(), b4, *b4.stride(), b4 if g4 is None else g4, *gs, w, u,
        T, H, K, V, NT, BT=BT, BK=min(BK, 64), BV=BV, DECAY=decay, IEEE=ieee, num_warps=8 if ieee else 4)
    state_dtype = torch.float32 if ieee else q.dtype
    hs = torch.empty(B * H, NT, K, V, device=q.device, dtype=state_dtype)
    hT = torch.empty(B * H, K, V, device=q.device, dtype=torch.float32)
    h0 = None
    if initial_state is not None:
        h0 = initial_state.float().expand(B, *lanes, K, V).reshape(B * H, K, V).contiguous()
    _delta_state_kernel[(B * H * triton.cdiv(V, BV),)](
        k4, *k4.stride(), b4 if g4 is None else g4, *gs, w, u, hT if h0 is None else h0, hs, hT,
        T, H, K, V, NT, BT=BT, BK=BK, BV=BV, DECAY=decay, HAS_H0=h0 is not None, IEEE=ieee, num_warps=warps,
        num_stages=1)
    o = torch.empty(B, T, H, V, device=q.device, dtype=v.dtype)
    _tc._outputs(q4, k4, u, g4, hs, o, scale, "none" if g4 is None else "scalar",
                 False, 0, False, BT)
    return o.reshape(B, T, *lanes, V), hT.reshape(B, *lanes, K, V)
