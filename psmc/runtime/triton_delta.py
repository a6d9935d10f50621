"""The (gated) delta rule on chunked Triton kernels, in the WY/UT form (forward and backward).

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

Backward (`_ChunkDeltaRule`, when an input requires grad): the training forward also keeps each
chunk's T = (I + A)^-1 (`_wy_kernel` with STORE_INV) besides W, U and the entering states; then
four launches: `_delta_dv_local_kernel` (the outputs' share of dU), `_delta_dstate_kernel` (chunks
in reverse carrying dS in fp32: the rest of dU, dS per chunk, d initial state),
`_delta_dqk_kernel` (dq; the outputs' and the state update's shares of dk and of dG, the gradient
of the chunk-local log cumsums G) and `_delta_wy_bwd_kernel` (dv, dbeta, the WY form's share of
dk, and d log gate as the in-chunk reverse cumsum of dG). float64, mixed dtypes and K > 256 run
the same WY form as torch ops (`psmc.runtime.delta._chunk_delta_rule_torch`, differentiable by
autograd, on any device).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

import triton
import triton.language as tl

from psmc.runtime import delta as _delta
from psmc.runtime import triton_chunk as _tc
from psmc.runtime.triton_chunk import _mm, _place, _pow2, _sequence, _tile
from psmc.runtime.custom_ops import traced
from psmc.runtime.varlen import packed_bounds

__all__ = ["triton_chunk_delta_rule", "HAS_BACKWARD", "KERNELS"]

HAS_BACKWARD = True  # forward and backward are Triton kernels (tests/runtime/test_triton_delta.py)
KERNELS = ["_wy_kernel", "_delta_state_kernel", "_delta_dv_local_kernel", "_delta_dstate_kernel",
           "_delta_dqk_kernel", "_delta_wy_bwd_kernel"]  # and triton_chunk._out_kernel for the outputs


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
def _chunk_count(T, NT, BT: tl.constexpr, VARLEN: tl.constexpr):
    """The chunks of a pass over one sequence: NT (a regular batch), or those of its length T."""
    if VARLEN:
        return tl.cdiv(T, BT)
    else:
        return NT


@triton.jit
def _first_row(bh, NT, row0, VARLEN: tl.constexpr):
    """The row of a lane's first chunk in the entering-state buffer: `_sequence`'s row0 for packed
    sequences, bh * NT (as row0 is, but in fewer registers) for a regular batch."""
    if VARLEN:
        return row0
    else:
        return bh * NT


@triton.jit
def _unit_lower_inverse(a, rows, BT: tl.constexpr):
    """(I + A)^-1 for a strictly lower triangular [BT, BT] A, by forward substitution:
    row t = e_t - sum_{s<t} A[t, s] row s."""
    inv = tl.where(rows[:, None] == rows[None, :], 1.0, 0.0)
    for r in range(1, BT):
        a_row = tl.sum(tl.where(rows[:, None] == r, a, 0.0), axis=0)  # A[r, :]
        new = tl.where(rows == r, 1.0, 0.0) - tl.sum(a_row[:, None] * inv, axis=0)
        inv = tl.where(rows[:, None] == r, new[None, :], inv)
    return inv


@triton.jit
def _wy_kernel(
    k_ptr, skb, skt, skh, skd,
    v_ptr, svb, svt, svh, svd,
    b_ptr, sbb, sbt, sbh,
    g_ptr, sgb, sgt, sgh,
    w_ptr, u_ptr, inv_ptr,
    T, H, K, V, NT, cu_ptr, cb_ptr, cs_ptr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, DECAY: tl.constexpr, IEEE: tl.constexpr,
    STORE_INV: tl.constexpr, VARLEN: tl.constexpr,
):
    """W = (I + A)^-1 (beta e^G K) [B, T, H, K] and U~ = (I + A)^-1 (beta V) [B, T, H, V] for one
    chunk of one lane; with STORE_INV (training) also (I + A)^-1 itself, row t of the chunk's
    [BT, BT] inverse at [B, T, H, BT] (the backward's). Packed sequences (VARLEN): chunk c of
    all NT, placed in its sequence (T is then that sequence's length, from its first token bos)."""
    pid = tl.program_id(0).to(tl.int64)
    c = pid % NT
    bh = pid // NT
    b = bh // H
    hh = bh % H
    c, bos, T, row0, b = _place(c, b, hh, H, T, NT, cu_ptr, cb_ptr, cs_ptr, VARLEN)
    DT = k_ptr.dtype.element_ty
    k_off = b * skb + bos * skt + hh * skh
    v_off = b * svb + bos * svt + hh * svh
    lo = (c * BT).to(tl.int32)
    rows = tl.arange(0, BT)
    t = lo + rows
    ok = t < T
    beta = tl.load(b_ptr + b * sbb + hh * sbh + (bos + t.to(tl.int64)) * sbt, mask=ok, other=0.0).to(tl.float32)
    gl = _gates(g_ptr, b * sgb + bos * sgt + hh * sgh, t, lo, lo + BT, T, sgt, DECAY)  # [BT]
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
    inv = _unit_lower_inverse(a, rows, BT)
    if STORE_INV:
        inv_ptrs = inv_ptr + ((b * T + bos + t.to(tl.int64)[:, None]) * H + hh) * BT + rows[None, :]
        tl.store(inv_ptrs, inv.to(inv_ptr.dtype.element_ty), mask=ok[:, None])
    wk = (beta * tl.exp(from_start))[:, None]  # [BT, 1]
    for kb in range(tl.cdiv(K, BK)):
        ck = kb * BK + tl.arange(0, BK)
        kt = _tile(k_ptr, k_off, t, lo, lo + BT, T, skt, ck, K, skd, False).to(tl.float32)
        w = _mm(inv, kt * wk, IEEE, DT)
        w_ptrs = w_ptr + ((b * T + bos + t.to(tl.int64)[:, None]) * H + hh) * K + ck[None, :]
        tl.store(w_ptrs, w.to(w_ptr.dtype.element_ty), mask=ok[:, None] & (ck < K)[None, :])
    for vb in range(tl.cdiv(V, BV)):
        cv = vb * BV + tl.arange(0, BV)
        vt = _tile(v_ptr, v_off, t, lo, lo + BT, T, svt, cv, V, svd, False).to(tl.float32)
        u = _mm(inv, vt * beta[:, None], IEEE, DT)
        u_ptrs = u_ptr + ((b * T + bos + t.to(tl.int64)[:, None]) * H + hh) * V + cv[None, :]
        tl.store(u_ptrs, u.to(u_ptr.dtype.element_ty), mask=ok[:, None] & (cv < V)[None, :])


@triton.jit
def _state_block(pid, H, K, V, BK: tl.constexpr, BV: tl.constexpr):
    """Program `pid` of a pass over chunks: its lane bh (batch row b, head hh) and BV value
    columns, with the offsets and mask of its [BK, BV] block of a [K, V] state."""
    nv = tl.cdiv(V, BV)
    bh = pid // nv
    ck = tl.arange(0, BK)
    cv = (pid % nv) * BV + tl.arange(0, BV)
    kv = ck[:, None].to(tl.int64) * V + cv[None, :]
    kv_mask = (ck < K)[:, None] & (cv < V)[None, :]
    return bh, bh // H, bh % H, ck, cv, kv, kv_mask


@triton.jit
def _load_state(ptr, bh, kv, kv_mask, K, V, HAS: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    """Lane bh's block of a [BH, K, V] state in fp32, or zeros when there is none."""
    if HAS:
        state = tl.load(ptr + bh * K * V + kv, mask=kv_mask, other=0.0).to(tl.float32)
    else:
        state = tl.zeros((BK, BV), dtype=tl.float32)
    return state


@triton.jit
def _delta_state_kernel(
    k_ptr, skb, skt, skh, skd,
    g_ptr, sgb, sgt, sgh,
    w_ptr, u_ptr, h0_ptr, hs_ptr, hT_ptr,
    T, H, K, V, NT, cu_ptr, cb_ptr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    DECAY: tl.constexpr, HAS_H0: tl.constexpr, IEEE: tl.constexpr, VARLEN: tl.constexpr,
):
    """Chunks in order for one lane and BV value columns (all K rows): store the entering state,
    U = U~ - W S (in place of U~), S <- e^{G_L} S + (K e^{G_L - G})^T U; the final state in fp32.
    Packed sequences (VARLEN): lane bh is (sequence, head), over that sequence's chunks."""
    bh, b, hh, ck, cv, kv, kv_mask = _state_block(tl.program_id(0).to(tl.int64), H, K, V, BK, BV)
    bos, T, row0, b = _sequence(b, hh, H, T, NT, cu_ptr, cb_ptr, VARLEN)
    row0 = _first_row(bh, NT, row0, VARLEN)
    DT = k_ptr.dtype.element_ty
    k_off = b * skb + bos * skt + hh * skh
    g_off = b * sgb + bos * sgt + hh * sgh
    h = _load_state(h0_ptr, bh, kv, kv_mask, K, V, HAS_H0, BK, BV)
    rows = tl.arange(0, BT)
    for c in range(_chunk_count(T, NT, BT, VARLEN)):
        tl.store(hs_ptr + (row0 + c) * K * V + kv, h.to(hs_ptr.dtype.element_ty), mask=kv_mask)
        lo = c * BT
        t = lo + rows
        ok = t < T
        rowsT = (b * T + bos + t.to(tl.int64)) * H + hh
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


@triton.jit
def _delta_dv_local_kernel(
    q_ptr, sqb, sqt, sqh, sqd,
    k_ptr, skb, skt, skh, skd,
    g_ptr, sgb, sgt, sgh,
    do_ptr, sdb, sdt, sdh, sdd,
    du_ptr, scale,
    T, H, K, V, NT, cu_ptr, cb_ptr, cs_ptr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, DECAY: tl.constexpr, IEEE: tl.constexpr,
    VARLEN: tl.constexpr,
):
    """The outputs' share of dU for one chunk, lane and V block:
    scale (Q K^T (.) e^{G_t - G_s}, s <= t)^T dO, fp32 into du [B, T, H, V]."""
    pid = tl.program_id(0).to(tl.int64)
    nv = tl.cdiv(V, BV)
    vb = pid % nv
    c = (pid // nv) % NT
    bh = pid // (nv * NT)
    b = bh // H
    hh = bh % H
    c, bos, T, row0, b = _place(c, b, hh, H, T, NT, cu_ptr, cb_ptr, cs_ptr, VARLEN)
    DT = k_ptr.dtype.element_ty
    q_off = b * sqb + bos * sqt + hh * sqh
    k_off = b * skb + bos * skt + hh * skh
    lo = (c * BT).to(tl.int32)
    rows = tl.arange(0, BT)
    t = lo + rows
    ok = t < T
    qk = tl.zeros((BT, BT), dtype=tl.float32)
    for kb in range(tl.cdiv(K, BK)):
        ck = kb * BK + tl.arange(0, BK)
        qt = _tile(q_ptr, q_off, t, lo, lo + BT, T, sqt, ck, K, sqd, False)
        kt = _tile(k_ptr, k_off, t, lo, lo + BT, T, skt, ck, K, skd, False)
        qk += _mm(qt, tl.trans(kt), IEEE, DT)
    here = _gates(g_ptr, b * sgb + bos * sgt + hh * sgh, t, lo, lo + BT, T, sgt, DECAY)
    span = tl.cumsum(tl.where(rows[:, None] > rows[None, :], here[:, None], 0.0), axis=0)
    causal = rows[:, None] >= rows[None, :]
    p = tl.where(causal, qk * tl.exp(tl.where(causal, span, 0.0)), 0.0) * scale
    cv = vb * BV + tl.arange(0, BV)
    dot = _tile(do_ptr, b * sdb + bos * sdt + hh * sdh, t, lo, lo + BT, T, sdt, cv, V, sdd, False)
    du = _mm(tl.trans(p), dot, IEEE, DT)
    rowsT = (b * T + bos + t.to(tl.int64)) * H + hh
    tl.store(du_ptr + rowsT[:, None] * V + cv[None, :], du, mask=ok[:, None] & (cv < V)[None, :])


@triton.jit
def _delta_dstate_kernel(
    q_ptr, sqb, sqt, sqh, sqd,
    k_ptr, skb, skt, skh, skd,
    g_ptr, sgb, sgt, sgh,
    do_ptr, sdb, sdt, sdh, sdd,
    w_ptr, dhT_ptr, dhs_ptr, dh0_ptr, du_ptr, scale,
    T, H, K, V, NT, cu_ptr, cb_ptr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    DECAY: tl.constexpr, HAS_DHT: tl.constexpr, IEEE: tl.constexpr, VARLEN: tl.constexpr,
):
    """The reverse pass over chunks for one lane and BV value columns (all K rows), carrying dS
    (the gradient of the state leaving the chunk, fp32). Per chunk, last first: store dS, then
    dU += (K e^{G_L - G}) dS (in place, completing the gradient of U = U~ - W S), and
    dS <- e^{G_L} dS + scale (Q e^G)^T dO - W^T dU. The last dS is d(initial state). Packed
    sequences (VARLEN): lane bh is (sequence, head), over that sequence's chunks."""
    bh, b, hh, ck, cv, kv, kv_mask = _state_block(tl.program_id(0).to(tl.int64), H, K, V, BK, BV)
    bos, T, row0, b = _sequence(b, hh, H, T, NT, cu_ptr, cb_ptr, VARLEN)
    row0 = _first_row(bh, NT, row0, VARLEN)
    DT = k_ptr.dtype.element_ty
    q_off = b * sqb + bos * sqt + hh * sqh
    k_off = b * skb + bos * skt + hh * skh
    g_off = b * sgb + bos * sgt + hh * sgh
    do_off = b * sdb + bos * sdt + hh * sdh
    dh = _load_state(dhT_ptr, bh, kv, kv_mask, K, V, HAS_DHT, BK, BV)
    rows = tl.arange(0, BT)
    n = _chunk_count(T, NT, BT, VARLEN)
    for cc in range(n):
        c = n - 1 - cc
        tl.store(dhs_ptr + (row0 + c) * K * V + kv, dh.to(dhs_ptr.dtype.element_ty), mask=kv_mask)
        lo = c * BT
        t = lo + rows
        ok = t < T
        rowsT = (b * T + bos + t.to(tl.int64)) * H + hh
        kt = _tile(k_ptr, k_off, t, lo, lo + BT, T, skt, ck, K, skd, False)
        here = _gates(g_ptr, g_off, t, lo, lo + BT, T, sgt, DECAY)
        after = _gates(g_ptr, g_off, t + 1, lo, lo + BT, T, sgt, DECAY)
        kd = kt.to(tl.float32) * tl.exp(tl.cumsum(after, axis=0, reverse=True))[:, None]
        du_ptrs = du_ptr + rowsT[:, None] * V + cv[None, :]
        du_mask = ok[:, None] & (cv < V)[None, :]
        du = tl.load(du_ptrs, mask=du_mask, other=0.0) + _mm(kd, dh, IEEE, DT)
        tl.store(du_ptrs, du, mask=du_mask)
        w = tl.load(w_ptr + rowsT[:, None] * K + ck[None, :], mask=ok[:, None] & (ck < K)[None, :], other=0.0)
        dh = dh * tl.exp(tl.sum(here, axis=0)) - _mm(tl.trans(w), du, IEEE, DT)
        qt = _tile(q_ptr, q_off, t, lo, lo + BT, T, sqt, ck, K, sqd, False)
        qg = qt.to(tl.float32) * (scale * tl.exp(tl.cumsum(here, axis=0)))[:, None]
        dot = _tile(do_ptr, do_off, t, lo, lo + BT, T, sdt, cv, V, sdd, False)
        dh += _mm(tl.trans(qg), dot, IEEE, DT)
    tl.store(dh0_ptr + bh * K * V + kv, dh, mask=kv_mask)


@triton.jit
def _delta_dqk_kernel(
    q_ptr, sqb, sqt, sqh, sqd,
    k_ptr, skb, skt, skh, skd,
    g_ptr, sgb, sgt, sgh,
    do_ptr, sdb, sdt, sdh, sdd,
    u_ptr, hs_ptr, dhs_ptr, dq_ptr, dk_ptr, dG_ptr, scale,
    T, H, K, V, NT, cu_ptr, cb_ptr, cs_ptr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, DECAY: tl.constexpr, IEEE: tl.constexpr,
    VARLEN: tl.constexpr,
):
    """The outputs' and the state update's shares of the gradients for one chunk of one lane,
    with U = U~ - W S held fixed: dq = scale [e^G (.) dO S^T + M K] (final), dk = M^T Q +
    e^{G_L - G} (.) U dS^T (the WY kernel adds the rest), M = scale (dO U^T) (.) e^{G_t - G_s}
    (s <= t); and their share of dG, the gradient of the chunk-local log cumsum G_t."""
    pid = tl.program_id(0).to(tl.int64)
    c = pid % NT
    bh = pid // NT
    b = bh // H
    hh = bh % H
    c, bos, T, row0, b = _place(c, b, hh, H, T, NT, cu_ptr, cb_ptr, cs_ptr, VARLEN)
    row0 = _first_row(bh, NT, row0, VARLEN)
    DT = k_ptr.dtype.element_ty
    q_off = b * sqb + bos * sqt + hh * sqh
    k_off = b * skb + bos * skt + hh * skh
    g_off = b * sgb + bos * sgt + hh * sgh
    do_off = b * sdb + bos * sdt + hh * sdh
    lo = (c * BT).to(tl.int32)
    rows = tl.arange(0, BT)
    t = lo + rows
    ok = t < T
    rowsT = (b * T + bos + t.to(tl.int64)) * H + hh  # rows of the contiguous [B, T, H, *] buffers
    hs_off = (row0 + c) * K * V
    gl = _gates(g_ptr, g_off, t, lo, lo + BT, T, sgt, DECAY)
    after = _gates(g_ptr, g_off, t + 1, lo, lo + BT, T, sgt, DECAY)
    eg = tl.exp(tl.cumsum(gl, axis=0))  # e^{G_t}
    eend = tl.exp(tl.cumsum(after, axis=0, reverse=True))  # e^{G_L - G_t}
    causal = rows[:, None] >= rows[None, :]
    span = tl.cumsum(tl.where(rows[:, None] > rows[None, :], gl[:, None], 0.0), axis=0)
    nk = tl.cdiv(K, BK)
    nv = tl.cdiv(V, BV)
    dou = tl.zeros((BT, BT), dtype=tl.float32)
    for vb in range(nv):
        cv = vb * BV + tl.arange(0, BV)
        dot = _tile(do_ptr, do_off, t, lo, lo + BT, T, sdt, cv, V, sdd, False)
        ut = tl.load(u_ptr + rowsT[:, None] * V + cv[None, :], mask=ok[:, None] & (cv < V)[None, :], other=0.0)
        dou += _mm(dot, tl.trans(ut), IEEE, DT)
    mo = tl.where(causal, scale * dou * tl.exp(tl.where(causal, span, 0.0)), 0.0)  # d(q_t . k_s)
    dG = tl.zeros((BT,), dtype=tl.float32)
    zero = tl.sum(tl.zeros((BT,), dtype=tl.float32), axis=0)
    sds = zero  # <S, dS>
    dgl = zero  # G_L's share through e^{G_L - G_s}
    for kb in range(nk):
        ck = kb * BK + tl.arange(0, BK)
        dqi = tl.zeros((BT, BK), dtype=tl.float32)
        dks = tl.zeros((BT, BK), dtype=tl.float32)
        for vb in range(nv):
            cv = vb * BV + tl.arange(0, BV)
            vmask = ok[:, None] & (cv < V)[None, :]
            skv = hs_off + ck[:, None].to(tl.int64) * V + cv[None, :]
            smask = (ck < K)[:, None] & (cv < V)[None, :]
            h = tl.load(hs_ptr + skv, mask=smask, other=0.0)
            dh = tl.load(dhs_ptr + skv, mask=smask, other=0.0)
            ut = tl.load(u_ptr + rowsT[:, None] * V + cv[None, :], mask=vmask, other=0.0)
            dot = _tile(do_ptr, do_off, t, lo, lo + BT, T, sdt, cv, V, sdd, False)
            dqi += _mm(dot, tl.trans(h), IEEE, DT)
            dks += _mm(ut, tl.trans(dh), IEEE, DT)
            if DECAY:
                sds += tl.sum(tl.sum(h.to(tl.float32) * dh.to(tl.float32), axis=1), axis=0)
        kt = _tile(k_ptr, k_off, t, lo, lo + BT, T, skt, ck, K, skd, False).to(tl.float32)
        qt = _tile(q_ptr, q_off, t, lo, lo + BT, T, sqt, ck, K, sqd, False).to(tl.float32)
        krow = rowsT[:, None] * K + ck[None, :]
        kmask = ok[:, None] & (ck < K)[None, :]
        tl.store(dq_ptr + krow, (scale * eg)[:, None] * dqi + _mm(mo, kt, IEEE, DT), mask=kmask)
        tl.store(dk_ptr + krow, _mm(tl.trans(mo), qt, IEEE, DT) + eend[:, None] * dks, mask=kmask)
        if DECAY:
            ked = tl.sum(kt * dks, axis=1) * eend
            dG += scale * eg * tl.sum(dqi * qt, axis=1) - ked
            dgl += tl.sum(ked, axis=0)
    if DECAY:
        qk = tl.zeros((BT, BT), dtype=tl.float32)
        for kb in range(nk):
            ck = kb * BK + tl.arange(0, BK)
            qt = _tile(q_ptr, q_off, t, lo, lo + BT, T, sqt, ck, K, sqd, False)
            kt = _tile(k_ptr, k_off, t, lo, lo + BT, T, skt, ck, K, skd, False)
            qk += _mm(qt, tl.trans(kt), IEEE, DT)
        mq = mo * qk
        dG += tl.sum(mq, axis=1) - tl.sum(mq, axis=0)
        # G_L is G at the chunk's last real token (padding has log gate 0)
        last = tl.minimum(T - 1 - lo, BT - 1)
        dG += tl.where(rows == last, dgl + tl.exp(tl.sum(gl, axis=0)) * sds, 0.0)
        tl.store(dG_ptr + rowsT, dG, mask=ok)


@triton.jit
def _inv_t(inv_ptrs, ok):
    """T^T for the chunk's saved T = (I + A)^-1 (rows past the sequence end read as zero)."""
    return tl.trans(tl.load(inv_ptrs, mask=ok[:, None], other=0.0))


@triton.jit
def _delta_wy_bwd_kernel(
    k_ptr, skb, skt, skh, skd,
    v_ptr, svb, svt, svh, svd,
    b_ptr, sbb, sbt, sbh,
    g_ptr, sgb, sgt, sgh,
    inv_ptr, du_ptr, hs_ptr, dk_ptr, dv_ptr, db_ptr, dG_ptr, dg_ptr,
    T, H, K, V, NT, cu_ptr, cb_ptr, cs_ptr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, DECAY: tl.constexpr, IEEE: tl.constexpr,
    VARLEN: tl.constexpr,
):
    """The WY form's gradients for one chunk of one lane, from the saved T = (I + A)^-1 and dU
    (the gradient of U~ as of U = U~ - W S): with dW = -dU S^T,
        dV = beta (.) T^T dU,   d(beta e^G K) = T^T dW,
        dA = -T^T (dU (beta V)^T + dW (beta e^G K)^T) T^T   (kept strictly lower),
    A = beta_t e^{G_t - G_s} (k_t . k_s): dk += (dA (.) beta_t e^{G_t - G_s}) K + (...)^T K, and
    dbeta, dG. dk and dG arrive with the outputs' shares; the log gates' gradient is the reverse
    cumsum of dG over the chunk."""
    pid = tl.program_id(0).to(tl.int64)
    c = pid % NT
    bh = pid // NT
    b = bh // H
    hh = bh % H
    c, bos, T, row0, b = _place(c, b, hh, H, T, NT, cu_ptr, cb_ptr, cs_ptr, VARLEN)
    row0 = _first_row(bh, NT, row0, VARLEN)
    DT = k_ptr.dtype.element_ty
    k_off = b * skb + bos * skt + hh * skh
    v_off = b * svb + bos * svt + hh * svh
    g_off = b * sgb + bos * sgt + hh * sgh
    lo = (c * BT).to(tl.int32)
    rows = tl.arange(0, BT)
    t = lo + rows
    ok = t < T
    rowsT = (b * T + bos + t.to(tl.int64)) * H + hh
    hs_off = (row0 + c) * K * V
    beta = tl.load(b_ptr + b * sbb + hh * sbh + (bos + t.to(tl.int64)) * sbt, mask=ok, other=0.0).to(tl.float32)
    gl = _gates(g_ptr, g_off, t, lo, lo + BT, T, sgt, DECAY)
    eg = tl.exp(tl.cumsum(gl, axis=0))
    bg = beta * eg
    lower = rows[:, None] > rows[None, :]
    span = tl.cumsum(tl.where(lower, gl[:, None], 0.0), axis=0)
    gam = tl.where(lower, tl.exp(tl.where(lower, span, 0.0)), 0.0)  # e^{G_t - G_s}, s < t
    # T = (I + A)^-1, read again at each use (a [BT, BT] tile held through the loops spilled)
    inv_ptrs = inv_ptr + rowsT[:, None] * BT + rows[None, :]
    nk = tl.cdiv(K, BK)
    nv = tl.cdiv(V, BV)
    # the value side: dv, beta's share through beta V, and dU V^T
    duv = tl.zeros((BT, BT), dtype=tl.float32)
    dbeta = tl.zeros((BT,), dtype=tl.float32)
    for vb in range(nv):
        cv = vb * BV + tl.arange(0, BV)
        vmask = ok[:, None] & (cv < V)[None, :]
        vrow = rowsT[:, None] * V + cv[None, :]
        dut = tl.load(du_ptr + vrow, mask=vmask, other=0.0)
        vt = _tile(v_ptr, v_off, t, lo, lo + BT, T, svt, cv, V, svd, False)
        duv += _mm(dut, tl.trans(vt), IEEE, DT)
        tdu = _mm(_inv_t(inv_ptrs, ok), dut, IEEE, DT)
        tl.store(dv_ptr + vrow, beta[:, None] * tdu, mask=vmask)
        dbeta += tl.sum(vt.to(tl.float32) * tdu, axis=1)
    # pass 1 over K blocks: dW K^T (for dA), K K^T, and the shares through beta e^G K
    dwk = tl.zeros((BT, BT), dtype=tl.float32)
    kk = tl.zeros((BT, BT), dtype=tl.float32)
    dG = tl.zeros((BT,), dtype=tl.float32)
    for kb in range(nk):
        ck = kb * BK + tl.arange(0, BK)
        dw = tl.zeros((BT, BK), dtype=tl.float32)
        for vb in range(nv):
            cv = vb * BV + tl.arange(0, BV)
            dut = tl.load(du_ptr + rowsT[:, None] * V + cv[None, :], mask=ok[:, None] & (cv < V)[None, :], other=0.0)
            h = tl.load(hs_ptr + hs_off + ck[:, None].to(tl.int64) * V + cv[None, :],
                        mask=(ck < K)[:, None] & (cv < V)[None, :], other=0.0)
            dw -= _mm(dut, tl.trans(h), IEEE, DT)
        kt = _tile(k_ptr, k_off, t, lo, lo + BT, T, skt, ck, K, skd, False)
        kk += _mm(kt, tl.trans(kt), IEEE, DT)
        kf = kt.to(tl.float32)
        dwk += _mm(dw, tl.trans(kf), IEEE, DT)
        tdw = tl.sum(kf * _mm(_inv_t(inv_ptrs, ok), dw, IEEE, DT), axis=1)
        dbeta += eg * tdw
        dG += bg * tdw
    dt = (duv + dwk * eg[None, :]) * beta[None, :]
    da = tl.where(lower, -_mm(_mm(_inv_t(inv_ptrs, ok), dt, IEEE, DT), _inv_t(inv_ptrs, ok), IEEE, DT), 0.0)
    dag = da * gam * kk  # dA (.) A / beta_t
    dbeta += tl.sum(dag, axis=1)
    tl.store(db_ptr + rowsT, dbeta, mask=ok)
    dkk = da * gam * beta[:, None]  # d(k_t . k_s)
    # pass 2 over K blocks: dk += bg (.) T^T dW + dkk K + dkk^T K (dW recomputed)
    for kb in range(nk):
        ck = kb * BK + tl.arange(0, BK)
        dw = tl.zeros((BT, BK), dtype=tl.float32)
        for vb in range(nv):
            cv = vb * BV + tl.arange(0, BV)
            dut = tl.load(du_ptr + rowsT[:, None] * V + cv[None, :], mask=ok[:, None] & (cv < V)[None, :], other=0.0)
            h = tl.load(hs_ptr + hs_off + ck[:, None].to(tl.int64) * V + cv[None, :],
                        mask=(ck < K)[:, None] & (cv < V)[None, :], other=0.0)
            dw -= _mm(dut, tl.trans(h), IEEE, DT)
        kt = _tile(k_ptr, k_off, t, lo, lo + BT, T, skt, ck, K, skd, False).to(tl.float32)
        dk_ptrs = dk_ptr + rowsT[:, None] * K + ck[None, :]
        kmask = ok[:, None] & (ck < K)[None, :]
        dk = (tl.load(dk_ptrs, mask=kmask, other=0.0) + bg[:, None] * _mm(_inv_t(inv_ptrs, ok), dw, IEEE, DT)
              + _mm(dkk, kt, IEEE, DT) + _mm(tl.trans(dkk), kt, IEEE, DT))
        tl.store(dk_ptrs, dk, mask=kmask)
    if DECAY:
        dG += beta * tl.sum(dag, axis=1) - tl.sum(beta[:, None] * dag, axis=0)
        dG += tl.load(dG_ptr + rowsT, mask=ok, other=0.0)
        tl.store(dg_ptr + rowsT, tl.cumsum(dG, axis=0, reverse=True), mask=ok)


def _plan(dtype: torch.dtype, T: int, K: int, V: int, chunk_size: int) -> dict:
    """Block sizes and warps of the forward and the backward, which uses the forward's chunks
    (the same with or without autograd)."""
    ieee = dtype == torch.float32
    BK = max(16, _pow2(K))
    BT = max(16, min(_pow2(chunk_size), _pow2(T)))
    if ieee:
        # fp32 [BT, K] tiles of W and K: 32-token chunks keep them in registers (the backward's
        # [BT, BT] tf32x3 products too; with 64, `_wy_kernel` spilled 724 B on sm_80 at K = 64),
        # and inference then brackets its chunks as training does
        BT = min(BT, 32)
    # fp32 dots (tf32x3) hold more registers: smaller V blocks
    BV = max(16, min(16 if ieee else 64, _pow2(V)))
    # the backward's per-chunk kernels take K in blocks of BKc
    return dict(BT=BT, BK=BK, BV=BV, ieee=ieee, warps=8 if (ieee or BK > 64) else 4,
                BKc=64, warps_c=8, stages_c=1, BVs=min(BV, 32))


def _forward(q4, k4, v4, b4, g4, h0, scale, plan, keep_inv=False, seqs=None):
    """o [B, T, H, V], the final state [BH, K, V] fp32, W, U = U~ - W S, the entering states
    and (keep_inv) the chunks' (I + A)^-1 [B, T, H, BT] (else None). Packed sequences (`seqs`,
    B = 1, chunks of seqs.chunk = plan["BT"] tokens): BH is sequences x heads and the entering
    states are [H, all chunks, K, V]."""
    B, T, H, K = q4.shape
    V = v4.shape[-1]
    BT, BK, BV, ieee = plan["BT"], plan["BK"], plan["BV"], plan["ieee"]
    lanes, rows, NT = _tc.state_rows(B, H, T, BT, None if seqs is None else seqs.bounds)
    decay = 0 if g4 is None else 1
    w = torch.empty(B, T, H, K, device=q4.device, dtype=k4.dtype)
    u = torch.empty(B, T, H, V, device=q4.device, dtype=v4.dtype if not ieee else torch.float32)
    inv = torch.empty(B, T, H, BT, device=q4.device, dtype=k4.dtype) if keep_inv else None
    gs = (0, 0, 0) if g4 is None else g4.stride()
    _wy_kernel[(B * H * NT,)](
        k4, *k4.stride(), v4, *v4.stride(), b4, *b4.stride(), b4 if g4 is None else g4, *gs, w, u,
        w if inv is None else inv, T, H, K, V, NT, *_tc.packed(seqs, w), BT=BT, BK=min(BK, 64), BV=BV,
        DECAY=decay, IEEE=ieee, STORE_INV=keep_inv, VARLEN=seqs is not None, num_warps=8 if ieee else 4)
    state_dtype = torch.float32 if ieee else q4.dtype
    hs = torch.empty(rows, NT, K, V, device=q4.device, dtype=state_dtype)
    hT = torch.empty(lanes, K, V, device=q4.device, dtype=torch.float32)
    _delta_state_kernel[(lanes * triton.cdiv(V, BV),)](
        k4, *k4.stride(), b4 if g4 is None else g4, *gs, w, u, hT if h0 is None else h0, hs, hT,
        T, H, K, V, NT, *_tc.packed(seqs, hT)[:2], BT=BT, BK=BK, BV=BV, DECAY=decay, HAS_H0=h0 is not None,
        IEEE=ieee, VARLEN=seqs is not None, num_warps=plan["warps"], num_stages=1)
    o = torch.empty(B, T, H, V, device=q4.device, dtype=v4.dtype)
    _tc._outputs(q4, k4, u, g4, hs, o, scale, "none" if g4 is None else "scalar", False, 0, False, BT, seqs)
    return o, hT, w, u, hs, inv


def _backward(q4, k4, v4, b4, g4, w, u, hs, inv, do, dhT, scale, plan, seqs=None):
    """(dq, dk, dv, dbeta, d log gate or None, d initial state), all fp32; dhT None or [BH, K, V].
    Four launches: the outputs' share of dU (per chunk and V block), the reverse chunk pass
    (dS, the rest of dU, d initial state), dq and the outputs' share of dk and dG (per chunk),
    the WY form's gradients (per chunk: dv, dbeta, the rest of dk, d log gate). Packed
    sequences (`seqs`) as in _forward: every chunk lies in one sequence, so the gate gradient's
    in-chunk reverse cumsum never crosses a sequence end."""
    B, T, H, K = q4.shape
    V = v4.shape[-1]
    BT, BK, BV, ieee = plan["BT"], plan["BK"], plan["BV"], plan["ieee"]
    lanes, _, NT = _tc.state_rows(B, H, T, BT, None if seqs is None else seqs.bounds)
    tables = _tc.packed(seqs, hs)
    varlen = seqs is not None
    decay = 0 if g4 is None else 1
    gs = (0, 0, 0) if g4 is None else g4.stride()
    gp = b4 if g4 is None else g4
    dev = q4.device
    BKc = min(BK, plan["BKc"])
    du = torch.empty(B, T, H, V, device=dev, dtype=torch.float32)
    _delta_dv_local_kernel[(B * H * NT * triton.cdiv(V, BV),)](
        q4, *q4.stride(), k4, *k4.stride(), gp, *gs, do, *do.stride(), du, float(scale),
        T, H, K, V, NT, *tables, BT=BT, BK=BKc, BV=BV, DECAY=decay, IEEE=ieee, VARLEN=varlen,
        num_warps=plan["warps_c"], num_stages=plan["stages_c"])
    dhs = torch.empty_like(hs)
    dh0 = torch.empty(lanes, K, V, device=dev, dtype=torch.float32)
    BVs = plan["BVs"]
    _delta_dstate_kernel[(lanes * triton.cdiv(V, BVs),)](
        q4, *q4.stride(), k4, *k4.stride(), gp, *gs, do, *do.stride(), w, dh0 if dhT is None else dhT,
        dhs, dh0, du, float(scale), T, H, K, V, NT, *tables[:2], BT=BT, BK=BK, BV=BVs, DECAY=decay,
        HAS_DHT=dhT is not None, IEEE=ieee, VARLEN=varlen, num_warps=plan["warps"], num_stages=1)
    dq = torch.empty(B, T, H, K, device=dev, dtype=torch.float32)
    dk = torch.empty_like(dq)
    dv = torch.empty(B, T, H, V, device=dev, dtype=torch.float32)
    db = torch.empty(B, T, H, device=dev, dtype=torch.float32)
    dG = torch.empty_like(db) if g4 is not None else db
    dg = torch.empty_like(db) if g4 is not None else None
    _delta_dqk_kernel[(B * H * NT,)](
        q4, *q4.stride(), k4, *k4.stride(), gp, *gs, do, *do.stride(), u, hs, dhs, dq, dk, dG,
        float(scale), T, H, K, V, NT, *tables, BT=BT, BK=BKc, BV=BV, DECAY=decay, IEEE=ieee, VARLEN=varlen,
        num_warps=plan["warps_c"], num_stages=plan["stages_c"])
    _delta_wy_bwd_kernel[(B * H * NT,)](
        k4, *k4.stride(), v4, *v4.stride(), b4, *b4.stride(), gp, *gs, inv, du, hs, dk, dv, db, dG,
        db if dg is None else dg, T, H, K, V, NT, *tables, BT=BT, BK=BKc, BV=BV, DECAY=decay, IEEE=ieee,
        VARLEN=varlen, num_warps=plan["warps_c"], num_stages=plan["stages_c"])
    return dq, dk, dv, db, dg, dh0


def _launch_forward(q4: Tensor, k4: Tensor, v4: Tensor, b4: Tensor, g4: Tensor | None, h0: Tensor | None,
                    scale: float, chunk_size: int, longest: int,
                    training: bool, bounds: list[int] | None) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """q4, k4 [B, T, H, K], v4 [B, T, H, V], b4 [B, T, H], g4 None | [B, T, H] fp32 (views, maybe
    stride 0), h0 None | [BH, K, V] fp32 contiguous: `_forward`'s (o, final state, W, U, entering
    states, inverses), the inverses empty unless `training`, on the chunks `_plan` gives for the
    longest sequence. With packed sequences (`bounds`, B = 1) BH is sequences x heads."""
    plan = _plan(q4.dtype, longest, q4.shape[-1], v4.shape[-1], chunk_size)
    seqs = _tc.packed_sequences(bounds, plan["BT"], q4.device)
    o, hT, w, u, hs, inv = _forward(q4, k4, v4, b4, g4, h0, scale, plan, keep_inv=training, seqs=seqs)
    return o, hT, w, u, hs, w.new_empty(0) if inv is None else inv


def _launch_backward(q4: Tensor, k4: Tensor, v4: Tensor, b4: Tensor, g4: Tensor | None, w: Tensor, u: Tensor,
                     hs: Tensor, inv: Tensor, do: Tensor, dhT: Tensor | None, scale: float, chunk_size: int,
                     longest: int, bounds: list[int] | None) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """`_backward`'s (dq, dk, dv, dbeta, d log gate, d initial state) in the inputs' dtypes (d log
    gate empty without a gate) for the gradients `do`, `dhT` (None: zero) of `_launch_forward`."""
    plan = _plan(q4.dtype, longest, q4.shape[-1], v4.shape[-1], chunk_size)
    seqs = _tc.packed_sequences(bounds, plan["BT"], q4.device)
    dhT = None if dhT is None else dhT.float().contiguous()
    dq, dk, dv, db, dg, dh0 = _backward(q4, k4, v4, b4, g4, w, u, hs, inv, do.to(v4.dtype), dhT, scale, plan, seqs)
    return (dq.to(q4.dtype), dk.to(k4.dtype), dv.to(v4.dtype), db.to(b4.dtype),
            db.new_empty(0) if dg is None else dg.to(g4.dtype), dh0)


_forward_op = torch.library.custom_op("psmc::chunk_delta_rule", _launch_forward, mutates_args=())
_backward_op = torch.library.custom_op("psmc::chunk_delta_rule_backward", _launch_backward, mutates_args=())


@_forward_op.register_fake
def _forward_fake(q4, k4, v4, b4, g4, h0, scale, chunk_size, longest, training, bounds):
    B, T, H, K = q4.shape
    V = v4.shape[-1]
    plan = _plan(q4.dtype, longest, K, V, chunk_size)
    lanes, rows, NT = _tc.state_rows(B, H, T, plan["BT"], bounds)
    fp32 = plan["ieee"]  # (U and the entering states in fp32 for fp32 inputs, else in the inputs' dtype)
    return (q4.new_empty(B, T, H, V, dtype=v4.dtype), q4.new_empty(lanes, K, V, dtype=torch.float32),
            q4.new_empty(B, T, H, K, dtype=k4.dtype), q4.new_empty(B, T, H, V, dtype=torch.float32 if fp32 else v4.dtype),
            q4.new_empty(rows, NT, K, V, dtype=torch.float32 if fp32 else q4.dtype),
            q4.new_empty(B, T, H, plan["BT"], dtype=k4.dtype) if training else q4.new_empty(0, dtype=k4.dtype))


@_backward_op.register_fake
def _backward_fake(q4, k4, v4, b4, g4, w, u, hs, inv, do, dhT, scale, chunk_size, longest, bounds):
    B, T, H, K = q4.shape
    lanes = _tc.state_rows(B, H, T, 1, bounds)[0]
    # (new_empty: dense like the real gradients, whatever the inputs' strides; a broadcast input is a stride-0 view)
    return (q4.new_empty(q4.shape), k4.new_empty(k4.shape), v4.new_empty(v4.shape), b4.new_empty(b4.shape),
            b4.new_empty(0, dtype=torch.float32) if g4 is None else g4.new_empty(g4.shape),
            q4.new_empty(lanes, K, v4.shape[-1], dtype=torch.float32))


_run_forward, _run_backward = traced(_forward_op, _launch_forward), traced(_backward_op, _launch_backward)


class _ChunkDeltaRule(torch.autograd.Function):
    """`_launch_forward` with its gradient, the Triton kernels above on the saved W, U and
    entering states: returns o [B, T, H, V] and the final state [BH, K, V] fp32. Under
    torch.compile the launches are the ops above (psmc.runtime.custom_ops)."""

    @staticmethod
    def forward(ctx, q4, k4, v4, b4, g4, h0, scale, chunk_size, longest, bounds):
        ctx.set_materialize_grads(False)  # an unused output's gradient arrives as None: not read
        o, hT, w, u, hs, inv = _run_forward(q4, k4, v4, b4, g4, h0, scale, chunk_size, longest, True, bounds)
        ctx.save_for_backward(q4, k4, v4, b4, g4, w, u, hs, inv)
        ctx.args = (scale, chunk_size, longest, bounds, h0 is not None)
        return o, hT

    @staticmethod
    @once_differentiable  # the kernels are not differentiable again: a clear error, not zeros
    def backward(ctx, do, dhT):
        q4, k4, v4, b4, g4, w, u, hs, inv = ctx.saved_tensors
        scale, chunk_size, longest, bounds, has_h0 = ctx.args
        if do is None:
            do = torch.zeros(v4.shape, device=v4.device, dtype=v4.dtype)
        dq, dk, dv, db, dg, dh0 = _run_backward(q4, k4, v4, b4, g4, w, u, hs, inv, do, dhT, scale, chunk_size,
                                                longest, bounds)
        return dq, dk, dv, db, None if g4 is None else dg, dh0 if has_h0 else None, None, None, None, None


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
    cu_seqlens: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """The (gated) delta rule, all positions at once: q, k [B, T, *lanes, K], v [B, T, *lanes, V],
    beta [B, T, *lanes], log_decay None or [B, T, *lanes] (lane axes may have size 1; time may be
    1 for beta and log_decay). Returns o [B, T, *lanes, V] in v's dtype and the final state
    [B, *lanes, K, V] in fp32 (fp64 for fp64 inputs). CUDA tensors (or CPU under
    TRITON_INTERPRET=1) of fp32/bf16/fp16 run the Triton kernels, forward and (when gradients
    are needed and HAS_BACKWARD) backward; float64, mixed dtypes and K > 256 run the torch WY form.
    cu_seqlens: packed sequences as in `psmc.runtime.delta.chunk_delta_rule` (inputs [1, total_T,
    ...], initial_state broadcastable to [N, *lanes, K, V], final state [N, *lanes, K, V]); the
    N sequences run in the same launches as one batch row would (no loop over sequences), with
    chunks sized for the longest."""
    lanes = _delta._lanes(q, k, v, beta, log_decay)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    B, T, K, V = q.shape[0], q.shape[1], q.shape[-1], v.shape[-1]
    needs_grad = torch.is_grad_enabled() and any(
        x is not None and x.requires_grad for x in (q, k, v, beta, log_decay, initial_state))
    if ((needs_grad and not HAS_BACKWARD) or q.dtype == torch.float64 or T == 0
            or len({q.dtype, k.dtype, v.dtype}) != 1 or K > 256):
        return _delta._chunk_delta_rule_torch(q, k, v, beta, log_decay, scale, initial_state, chunk_size,
                                              cu_seqlens=cu_seqlens)
    H = math.prod(lanes)
    bounds, rows, longest = None, B, T
    if cu_seqlens is not None:
        bounds = packed_bounds("chunk_delta_rule", cu_seqlens, B, T)
        rows, longest = len(bounds) - 1, max(b - a for a, b in zip(bounds, bounds[1:]))

    def flat(x: Tensor, width: tuple[int, ...]) -> Tensor:
        return x.expand(B, T, *lanes, *width).reshape(B, T, H, *width)

    q4, k4, v4, b4 = flat(q, (K,)), flat(k, (K,)), flat(v, (V,)), flat(beta, ())
    g4 = None if log_decay is None else flat(log_decay.float(), ())
    h0 = None
    if initial_state is not None:
        h0 = initial_state.float().expand(rows, *lanes, K, V).reshape(rows * H, K, V).contiguous()
    bounds = None if bounds is None else list(bounds)
    if needs_grad:
        o, hT = _ChunkDeltaRule.apply(q4, k4, v4, b4, g4, h0, float(scale), chunk_size, longest, bounds)
    else:
        o, hT = _run_forward(q4, k4, v4, b4, g4, h0, float(scale), chunk_size, longest, False, bounds)[:2]
    return o.reshape(B, T, *lanes, V), hT.reshape(rows, *lanes, K, V)
