"""The diagonal-plus-low-rank recurrence's parallel pass on chunked Triton kernels.

    S_t = diag(exp(lam_t)) S_{t-1} + b_t (a_t^T S_{t-1}) + k_t v_t^T,      o_t = scale * q_t^T S_t

the same contract and the same chunked WY algebra as `psmc.runtime.dplr.chunk_dplr` (its
module docstring derives it): inside a chunk entered with state S,

    U = W S + U0              W = (I - A_ab)^-1 Atil,   U0 = (I - A_ab)^-1 A_ak V
    O = scale (Qtil S + A_qb U + A_qk V)
    S' = diag(e^{G_L}) S + Btil^T U + Ktil^T V

Inference, two kernels (fla's chunk_dplr splits the same work into more):

* `_dplr_intra_kernel`, one program per (chunk, lane): the four L x L matrices, the unit lower
  triangular inverse (forward substitution), then W, U0, Qeff = Qtil + A_qb W, the outputs'
  chunk-local part A_qb U0 + A_qk V, Btil and Ktil (stored [K, L], as the next kernel reads
  them) and the chunk's decay e^{G_L}, all fp32 in scratch buffers; its small dots run in IEEE
  fp32;
* `_dplr_chain_kernel`, one program per (lane, block of value columns): the chunks in order
  with the state in fp32 registers, O = scale (Qeff S + local part), U = W S + U0 and
  S' = e^{G_L} S + Btil^T U + Ktil^T V; the entering states never reach HBM. Its dots take
  bf16/fp16 operands for bf16/fp16 inputs (fp32 accumulation, as fla's kernels) and tf32x3
  for fp32 inputs.

Chunks are 16 tokens (the smallest `tl.dot` tile) and the L x L matrices take the exact
per-element decay, one key column at a time, each exponent a masked cumsum over exactly the
tokens it spans (`triton_chunk._diag_weights`): no reference point, no overflow with decays
<= 1, and -inf log decays give exact zeros. Offsets are int64, the grids are one-dimensional,
T need not be a multiple of 16 (the tail is masked: identity tokens). Registers (sm_90,
Triton 3.9, K = V = 128, 8 warps): intra 215, chain 148 (bf16) / 255 (fp32), no spills; on
sm_80 the fp32 chain kernel spills (~1.1 KB; the tf32x3 operand splits), bf16 does not.
float64, K > 128 and explicit chunk sizes take the torch form (`takes`).

Training (`states` and `dstates`, which `psmc.runtime.dplr._chain`, a torch op, calls): the
chunk-local terms stay the torch form's (`dplr._terms`: batched products and triangular solves
over all chunks at once, differentiable by autograd), and the one sequential part, the chunks
in order, runs on two kernels instead of a loop of a [K, K] x [K, V] product per chunk (a
launch or two per chunk, each way):

* `_dplr_states_kernel`, one program per (lane row, block of value columns), walks the chunks
  with S' = e^{G_L} S + Btil^T (W S) + N (N = Btil^T U0 + Ktil^T V from torch; the [K, K]
  transition is never formed) and stores every entering state (the outputs' batched product
  reads them, and the backward pass);
* `_dplr_dstates_kernel` walks them in reverse with the transpose,
  dS <- (what the outputs send the entering state) + e^{G_L} dS + W^T (Btil dS), and stores
  each chunk's leaving-state gradient; the gradients of W, Btil, N and e^{G_L} are then
  batched products in torch (`dplr._chain_vjp`).

Both keep the state in fp32 registers; their dots take bf16/fp16 operands for bf16/fp16
inputs, tf32x3 for fp32 (16 value columns per program at K > 64 there: 194 registers on sm_90,
no spills). Packed sequences run in one call (`psmc.runtime.dplr._packed`): each padded with
identity tokens to whole chunks, one row in which no chunk crosses a sequence end, and the
chain kernels (`VARLEN`) walking each sequence's chunks from its own initial state.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

import triton
import triton.language as tl

from psmc.runtime.custom_ops import traced
from psmc.runtime.triton_chunk import _diag_weights, _logs, _mm, _pow2, _row, _tile, _to_end
from psmc.runtime.triton_delta import _unit_lower_inverse
from psmc.runtime.triton_delta_step import blocks

__all__ = ["triton_chunk_dplr", "takes", "states", "dstates", "chain_takes", "MAX_K", "CHUNK", "KERNELS"]

CHUNK = 16  # tokens per chunk: one tl.dot tile, every L x L entry with its exact decay
MAX_K = 128  # one K tile per program (the state [K, BV] and four [L, K] operands in registers)
KERNELS = ["_dplr_intra_kernel", "_dplr_chain_kernel", "_dplr_states_kernel", "_dplr_dstates_kernel"]
NUM_WARPS = 8  # 4 spill at K = 128 (sm_90, Triton 3.9: psmc.runtime.triton_chunk_aot)
_FLOATS = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _dot_ieee(x, y):
    """x @ y of small fp32 tiles in IEEE fp32 (no tensor-core operand splits: fewer registers)."""
    return tl.dot(x, y, input_precision="ieee")


@triton.jit
def _dplr_intra_kernel(
    q_ptr, sqb, sqt, sqh, sqd,
    k_ptr, skb, skt, skh, skd,
    a_ptr, sab, sat, sah, sad,
    b_ptr, sbb, sbt, sbh, sbd,
    v_ptr, svb, svt, svh, svd,
    g_ptr, sgb, sgt, sgh, sgd,
    w_ptr, u0_ptr, qe_ptr, ol_ptr, bt_ptr, kt_ptr, gate_ptr,
    T, H, K, V, NT,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, DECAY: tl.constexpr,
):
    """One chunk of one lane, into fp32 scratch: W, Qeff [L, K] and U0, the outputs' local part
    [L, V] (laid out [lanes, NT * L, width]), Btil, Ktil [K, L] and e^{G_L} [K] per chunk."""
    pid = tl.program_id(0).to(tl.int64)
    c = pid % NT
    bh = pid // NT
    b, hh = bh // H, bh % H
    cs = c * BT
    rows = tl.arange(0, BT)
    t = cs + rows
    ck = tl.arange(0, BK)
    q_off, k_off = b * sqb + hh * sqh, b * skb + hh * skh
    a_off, b_off = b * sab + hh * sah, b * sbb + hh * sbh
    v_off, g_off = b * svb + hh * svh, b * sgb + hh * sgh
    qi = _tile(q_ptr, q_off, t, cs, cs + BT, T, sqt, ck, K, sqd, 0).to(tl.float32)
    ki = _tile(k_ptr, k_off, t, cs, cs + BT, T, skt, ck, K, skd, 0).to(tl.float32)
    ai = _tile(a_ptr, a_off, t, cs, cs + BT, T, sat, ck, K, sad, 0).to(tl.float32)
    bi = _tile(b_ptr, b_off, t, cs, cs + BT, T, sbt, ck, K, sbd, 0).to(tl.float32)
    # log decays: g_t, g_{t-1} (0 at the chunk's first token), and the sum over the tokens after t
    after, g = _to_end(g_ptr, g_off, t, cs, cs + BT, T, sgt, ck, K, sgd, 0, 0, DECAY)
    g_prev = _logs(g_ptr, g_off, t - 1, cs, cs + BT, T, sgt, ck, K, sgd, 0, 0, DECAY)
    # the four matrices, one column s at a time: the a rows read the tokens strictly before them
    # (weights exp(sum over s < r < t)), the q rows those up to and including them (s < r <= t)
    a_ab = tl.zeros((BT, BT), dtype=tl.float32)
    a_ak = tl.zeros((BT, BT), dtype=tl.float32)
    a_qb = tl.zeros((BT, BT), dtype=tl.float32)
    a_qk = tl.zeros((BT, BT), dtype=tl.float32)
    for s in range(BT):
        bs = _row(b_ptr, b_off, cs + s, T, sbt, ck, K, sbd, 0).to(tl.float32)
        ks = _row(k_ptr, k_off, cs + s, T, skt, ck, K, skd, 0).to(tl.float32)
        a_in = ai * _diag_weights(g_prev, rows, s, 1)
        q_in = qi * _diag_weights(g, rows, s, 0)
        pick = rows[None, :] == s
        a_ab += tl.where(pick, tl.sum(a_in * bs[None, :], axis=1)[:, None], 0.0)
        a_ak += tl.where(pick, tl.sum(a_in * ks[None, :], axis=1)[:, None], 0.0)
        a_qb += tl.where(pick, tl.sum(q_in * bs[None, :], axis=1)[:, None], 0.0)
        a_qk += tl.where(pick, tl.sum(q_in * ks[None, :], axis=1)[:, None], 0.0)
    inverse = _unit_lower_inverse(-a_ab, rows, BT)  # (I - A_ab)^-1
    row_k = (bh * NT * BT + t)[:, None] * K + ck[None, :]
    k_mask = (rows < BT)[:, None] & (ck < K)[None, :]
    w = _dot_ieee(inverse, ai * tl.exp(tl.cumsum(g_prev, axis=0)))
    tl.store(w_ptr + row_k, w, mask=k_mask)
    # Qeff = Qtil + A_qb W: what the outputs read of the entering state
    tl.store(qe_ptr + row_k, qi * tl.exp(tl.cumsum(g, axis=0)) + _dot_ieee(a_qb, w), mask=k_mask)
    # Btil, Ktil stored transposed, [K, L] per chunk: the chain kernel's dot operands as they load
    col_k = (bh * NT + c) * K * BT + ck[None, :].to(tl.int64) * BT + rows[:, None]
    tl.store(bt_ptr + col_k, bi * tl.exp(after), mask=k_mask)
    tl.store(kt_ptr + col_k, ki * tl.exp(after), mask=k_mask)
    tl.store(gate_ptr + (bh * NT + c) * K + ck, tl.exp(tl.sum(g, axis=0)), mask=ck < K)
    solved = _dot_ieee(inverse, a_ak)  # (I - A_ab)^-1 A_ak
    for vb in range(tl.cdiv(V, BV)):
        cv = vb * BV + tl.arange(0, BV)
        vt = _tile(v_ptr, v_off, t, cs, cs + BT, T, svt, cv, V, svd, 0).to(tl.float32)
        row_v = (bh * NT * BT + t)[:, None] * V + cv[None, :]
        v_mask = (rows < BT)[:, None] & (cv < V)[None, :]
        u0 = _dot_ieee(solved, vt)
        tl.store(u0_ptr + row_v, u0, mask=v_mask)
        # the outputs' chunk-local part A_qb U0 + A_qk V
        tl.store(ol_ptr + row_v, _dot_ieee(a_qb, u0) + _dot_ieee(a_qk, vt), mask=v_mask)


@triton.jit
def _dplr_chain_kernel(
    v_ptr, svb, svt, svh, svd,
    w_ptr, u0_ptr, qe_ptr, ol_ptr, bt_ptr, kt_ptr, gate_ptr,
    h0_ptr, o_ptr, hT_ptr, scale, cu_ptr,
    T, H, K, V, NT,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, HAS_H0: tl.constexpr, IEEE: tl.constexpr,
    VARLEN: tl.constexpr,
):
    """The chunks of one lane in order for one block of BV value columns: outputs o [B, T, H, V]
    (v's dtype) and the final state hT [lanes, K, V] (fp32). VARLEN: packed sequences, each
    padded to whole chunks (B = 1); the program of state row n * H + h walks sequence n's chunks
    cu[n] .. cu[n + 1] - 1 from its initial state, and hT holds one state per sequence."""
    pid = tl.program_id(0).to(tl.int64)
    nv = tl.cdiv(V, BV)
    vb = pid % nv
    row = pid // nv  # the state's row
    if VARLEN:  # (bh: the lane whose chunks these are)
        seq = row // H
        b, hh, bh = seq * 0, row % H, row % H
        first, last = tl.load(cu_ptr + seq), tl.load(cu_ptr + seq + 1)
    else:
        b, hh, bh = row // H, row % H, row
        first, last = 0, NT
    rows = tl.arange(0, BT)
    ck = tl.arange(0, BK)
    cv = vb * BV + tl.arange(0, BV)
    kv = row * K * V + ck[:, None].to(tl.int64) * V + cv[None, :]
    kv_mask = (ck < K)[:, None] & (cv < V)[None, :]
    if HAS_H0:
        S = tl.load(h0_ptr + kv, mask=kv_mask, other=0.0)
    else:
        S = tl.zeros((BK, BV), dtype=tl.float32)
    k_mask = (rows < BT)[:, None] & (ck < K)[None, :]
    v_mask = (rows < BT)[:, None] & (cv < V)[None, :]
    v_off = b * svb + hh * svh
    DT = v_ptr.dtype.element_ty  # bf16/fp16 inputs: the dots take operands in that dtype (as fla's)
    for c in range(first, last):
        cs = c * BT
        t = cs + rows
        line = bh * NT * BT + t.to(tl.int64)
        row_k = line[:, None] * K + ck[None, :]
        row_v = line[:, None] * V + cv[None, :]
        o = _mm(tl.load(qe_ptr + row_k, mask=k_mask, other=0.0), S, IEEE, DT) + tl.load(ol_ptr + row_v, mask=v_mask)
        o_ptrs = o_ptr + ((b * T + t.to(tl.int64)) * H + hh)[:, None] * V + cv[None, :]
        tl.store(o_ptrs, (o * scale).to(o_ptr.dtype.element_ty), mask=(t < T)[:, None] & (cv < V)[None, :])
        u = _mm(tl.load(w_ptr + row_k, mask=k_mask, other=0.0), S, IEEE, DT) + tl.load(u0_ptr + row_v, mask=v_mask)
        vt = _tile(v_ptr, v_off, t, cs, cs + BT, T, svt, cv, V, svd, 0).to(tl.float32)
        gate = tl.load(gate_ptr + (bh * NT + c) * K + ck, mask=ck < K, other=0.0)
        col_k = (bh * NT + c) * K * BT + ck[:, None].to(tl.int64) * BT + rows[None, :]
        kt_mask = (ck < K)[:, None] & (rows < BT)[None, :]
        S = gate[:, None] * S + _mm(tl.load(bt_ptr + col_k, mask=kt_mask, other=0.0), u, IEEE, DT)
        S += _mm(tl.load(kt_ptr + col_k, mask=kt_mask, other=0.0), vt, IEEE, DT)
    tl.store(hT_ptr + kv, S, mask=kv_mask)


@triton.jit
def _chain_program(cu_ptr, BH, K, V, NT, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                   VARLEN: tl.constexpr):
    """A training-chain program's place: (its state row, the lane whose chunks it walks, the
    first chunk, one past the last, a chunk's token rows, the keys, the offsets and mask of its
    [K, BV] state slice). Lane row r walks chunks 0 .. NT - 1; with VARLEN (B = 1, BH = H) row
    n * H + h walks lane h's chunks of sequence n, cu[n] .. cu[n + 1] - 1."""
    pid = tl.program_id(0).to(tl.int64)
    nv = tl.cdiv(V, BV)
    row = pid // nv
    if VARLEN:
        seq = row // BH
        bh, first, last = row % BH, tl.load(cu_ptr + seq).to(tl.int64), tl.load(cu_ptr + seq + 1).to(tl.int64)
    else:
        bh, first, last = row, row * 0, row * 0 + NT
    ck = tl.arange(0, BK)
    cv = (pid % nv) * BV + tl.arange(0, BV)
    kv = ck[:, None].to(tl.int64) * V + cv[None, :]
    return row, bh, first, last, tl.arange(0, BT), ck, kv, (ck < K)[:, None] & (cv < V)[None, :]


@triton.jit
def _dplr_states_kernel(
    w_ptr, bt_ptr, n_ptr, gate_ptr, h0_ptr, hs_ptr, hT_ptr, cu_ptr,
    BH, K, V, NT,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, IEEE: tl.constexpr, DT: tl.constexpr,
    VARLEN: tl.constexpr,
):
    """Training's forward chain, one program per (lane row, block of BV value columns), over the
    torch form's chunk-major terms (chunk c of row h at c * BH + h; W, Btil [L, K],
    N = Btil^T U0 + Ktil^T V [K, V], e^{G_L} [K], fp32): the chunks in order,
    S' = e^{G_L} S + Btil^T (W S) + N, each entering state stored in hs [NT, BH, K, V] (the
    outputs' products read them, and the backward pass) and the final one in hT [BH, K, V].
    VARLEN: packed sequences (`_chain_program`): h0 and hT hold a state per (sequence, lane)."""
    row, bh, first, last, rows, ck, kv, kv_mask = _chain_program(cu_ptr, BH, K, V, NT, BT, BK, BV, VARLEN)
    S = tl.load(h0_ptr + row * K * V + kv, mask=kv_mask, other=0.0)
    for c in range(first, last):
        chunk = c * BH + bh
        tl.store(hs_ptr + chunk * K * V + kv, S, mask=kv_mask)
        w = tl.load(w_ptr + chunk * BT * K + rows[:, None] * K + ck[None, :], mask=(ck < K)[None, :], other=0.0)
        x = _mm(w, S, IEEE, DT)  # W S  [L, BV]
        # Btil^T [K, L], read transposed
        bt = tl.load(bt_ptr + chunk * BT * K + ck[:, None] + rows[None, :] * K, mask=(ck < K)[:, None], other=0.0)
        gate = tl.load(gate_ptr + chunk * K + ck, mask=ck < K, other=0.0)
        S = gate[:, None] * S + _mm(bt, x, IEEE, DT) + tl.load(n_ptr + chunk * K * V + kv, mask=kv_mask, other=0.0)
    tl.store(hT_ptr + row * K * V + kv, S, mask=kv_mask)


@triton.jit
def _dplr_dstates_kernel(
    w_ptr, bt_ptr, gate_ptr, dhs_ptr, dhT_ptr, dn_ptr, dh0_ptr, cu_ptr,
    BH, K, V, NT,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, IEEE: tl.constexpr, DT: tl.constexpr,
    VARLEN: tl.constexpr,
):
    """Training's backward chain, the transpose of `_dplr_states_kernel`: the chunks in reverse
    with dS, the gradient of the state leaving the chunk, in fp32 registers: stores it in
    dn [NT, BH, K, V] (the per-chunk gradients are batched products of it in torch), then
    dS <- dhs[c] + e^{G_L} dS + W^T (Btil dS), where dhs [NT, BH, K, V] holds what the
    outputs send each entering state; writes the initial state's gradient, dh0 [BH, K, V]
    (VARLEN: dhT and dh0 per (sequence, lane), as `_dplr_states_kernel`)."""
    row, bh, first, last, rows, ck, kv, kv_mask = _chain_program(cu_ptr, BH, K, V, NT, BT, BK, BV, VARLEN)
    dS = tl.load(dhT_ptr + row * K * V + kv, mask=kv_mask, other=0.0)
    for i in range(last - first):
        chunk = (last - 1 - i) * BH + bh
        tl.store(dn_ptr + chunk * K * V + kv, dS, mask=kv_mask)
        bt = tl.load(bt_ptr + chunk * BT * K + rows[:, None] * K + ck[None, :], mask=(ck < K)[None, :], other=0.0)
        dx = _mm(bt, dS, IEEE, DT)  # Btil dS  [L, BV]
        # W^T [K, L], read transposed
        w = tl.load(w_ptr + chunk * BT * K + ck[:, None] + rows[None, :] * K, mask=(ck < K)[:, None], other=0.0)
        gate = tl.load(gate_ptr + chunk * K + ck, mask=ck < K, other=0.0)
        dS = gate[:, None] * dS + _mm(w, dx, IEEE, DT) + tl.load(dhs_ptr + chunk * K * V + kv, mask=kv_mask,
                                                                  other=0.0)
    tl.store(dh0_ptr + row * K * V + kv, dS, mask=kv_mask)


def takes(q: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor, log_decay: Tensor | None,
          initial_state: Tensor | None, chunk_size: int | None) -> bool:
    """Whether the kernels serve this call: float32/bf16/fp16 inputs (a float32/bf16/fp16
    initial state or none), K <= MAX_K, the default chunk size, no gradient wanted."""
    tensors = [t for t in (q, k, v, a, b, log_decay, initial_state) if t is not None]
    if chunk_size is not None or q.shape[-1] > MAX_K:
        return False
    if any(t.dtype not in _FLOATS for t in tensors):
        return False
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))


def _lanes_flat(x: Tensor, B: int, T: int, lanes: tuple, width: int) -> Tensor:
    """x broadcast to [B, T, *lanes, width] as [B, T, H, width] (a view where the strides allow)."""
    return x.expand(B, T, *lanes, width).reshape(B, T, math.prod(lanes), width)


def _strides(x: Tensor) -> tuple:
    return tuple(x.stride())


def triton_chunk_dplr(q: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor, log_decay: Tensor | None,
                      *, scale: float, initial_state: Tensor | None, batch: int, steps: int,
                      lanes: tuple, cu_chunks: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """`chunk_dplr` on the kernels for inputs already brought to one rank by its `_shapes`
    (q, k, a, b [.., K], v [.., V], log_decay [.., K or 1]; leading axes broadcast to
    [batch, steps, *lanes]). Returns (o [B, T, *lanes, V] in v's dtype, the final state
    [B, *lanes, K, V] fp32). The caller checks `takes(...)` first.
    cu_chunks: packed sequences (B = 1), each padded with zero tokens to whole chunks of CHUNK
    tokens: sequence n is chunks cu_chunks[n] .. cu_chunks[n + 1] - 1 (int32 [N + 1] on the
    device), run from its own initial state (broadcastable to [N, *lanes, K, V]); the final
    state is then [N, *lanes, K, V]. Under torch.compile the launches are the op psmc::dplr_infer
    (psmc.runtime.custom_ops), so compiled inference runs the kernels too."""
    return _infer(q, k, v, a, b, log_decay, float(scale), initial_state, batch, steps, list(lanes), cu_chunks)


def _launch_infer(q: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor, log_decay: Tensor | None, scale: float,
           initial_state: Tensor | None, batch: int, steps: int, lanes: list[int],
           cu_chunks: Tensor | None) -> tuple[Tensor, Tensor]:
    """`triton_chunk_dplr`'s launches: `_dplr_intra_kernel`, then `_dplr_chain_kernel`."""
    K, V = q.shape[-1], v.shape[-1]
    B, T, H = batch, steps, math.prod(lanes)
    qs, ks, as_, bs = (_lanes_flat(x, B, T, lanes, K) for x in (q, k, a, b))
    vs = _lanes_flat(v, B, T, lanes, V)
    if log_decay is None:
        gs, g_strides = qs, (0, 0, 0, 0)
    else:
        width = log_decay.shape[-1]
        gs = _lanes_flat(log_decay, B, T, lanes, width)
        g_strides = _strides(gs)[:3] + ((0,) if width == 1 else (gs.stride(3),))  # a scalar: one per token
    device = q.device
    o = torch.empty(B, T, H, V, device=device, dtype=v.dtype)
    rows = B if cu_chunks is None else len(cu_chunks) - 1  # the states' rows: per sequence when packed
    final = torch.empty(rows * H, K, V, device=device, dtype=torch.float32)
    h0 = None
    if initial_state is not None:
        h0 = initial_state.to(torch.float32).expand(rows, *lanes, K, V).reshape(rows * H, K, V).contiguous()
    if B * H == 0 or T == 0:
        final.copy_(torch.zeros_like(final) if h0 is None else h0)
        return o.reshape(B, T, *lanes, V), final.reshape(rows, *lanes, K, V)
    BT, BK = CHUNK, max(16, _pow2(K))
    NT = -(-T // BT)
    lines = B * H * NT * BT

    def scratch(width):
        return torch.empty(lines, width, device=device, dtype=torch.float32)
    w, qe, bt, kt = scratch(K), scratch(K), scratch(K), scratch(K)
    u0, ol = scratch(V), scratch(V)
    gate = torch.empty(B * H * NT, K, device=device, dtype=torch.float32)
    BV_intra = 16  # U0 and the outputs' local part, 16 value columns at a time (wider spills at K = 128)
    _dplr_intra_kernel[(B * H * NT,)](
        qs, *_strides(qs), ks, *_strides(ks), as_, *_strides(as_), bs, *_strides(bs), vs, *_strides(vs),
        gs, *g_strides, w, u0, qe, ol, bt, kt, gate, T, H, K, V, NT,
        BT=BT, BK=BK, BV=BV_intra, DECAY=log_decay is not None, num_warps=NUM_WARPS)
    BV = blocks(K, V)[1]  # (the decode kernels' [K, BV] state slice)
    _dplr_chain_kernel[(rows * H * triton.cdiv(V, BV),)](
        vs, *_strides(vs), w, u0, qe, ol, bt, kt, gate, final if h0 is None else h0, o, final,
        float(scale), final if cu_chunks is None else cu_chunks, T, H, K, V, NT, BT=BT, BK=BK, BV=BV,
        HAS_H0=h0 is not None, IEEE=v.dtype == torch.float32, VARLEN=cu_chunks is not None, num_warps=NUM_WARPS)
    return o.reshape(B, T, *lanes, V), final.reshape(rows, *lanes, K, V)


_infer_op = torch.library.custom_op("psmc::dplr_infer", _launch_infer, mutates_args=())


@_infer_op.register_fake
def _infer_fake(q, k, v, a, b, log_decay, scale, initial_state, batch, steps, lanes, cu_chunks):
    rows = batch if cu_chunks is None else cu_chunks.shape[0] - 1
    K, V = q.shape[-1], v.shape[-1]
    return v.new_empty(batch, steps, *lanes, V), q.new_empty(rows, *lanes, K, V, dtype=torch.float32)


_infer = traced(_infer_op, _launch_infer)


_TL = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def chain_blocks(K: int, V: int, operands: torch.dtype) -> tuple[int, int, int]:
    """(BK, BV, num_warps) of the training chain's programs: the decode kernels' [K, BV] state
    slice, but 16 value columns for float32 at K > 64, whose tf32x3 products at 32 sat at 254
    registers on sm_90 (16: 194, no spills; psmc.runtime.triton_chunk_aot)."""
    BK, BV = blocks(K, V)
    if operands == torch.float32 and BK > 64:
        BV = 16
    return BK, BV, NUM_WARPS


CHAIN_LENGTHS = (16, 32)  # tokens per chunk the chain kernels take (64 in fp32: 0.4 KB spills, 144 KB smem)


def chain_takes(length: int, K: int) -> bool:
    """Whether `states` and `dstates` serve chunks of `length` tokens and K keys: 16 or 32 (the
    default; 16 is the smallest `tl.dot` tile), and K <= MAX_K."""
    return length in CHAIN_LENGTHS and K <= MAX_K


def states(w: Tensor, b_out: Tensor, written: Tensor, gate: Tensor, state: Tensor,
           operands: torch.dtype, cu_chunks: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """`psmc.runtime.dplr._chain` on `_dplr_states_kernel`: from the chunk-major terms (fp32,
    [count * BH, ...]: W, Btil [L, K], N = Btil^T U0 + Ktil^T V [K, V], e^{G_L} [K]) and the
    entering state [BH, K, V] fp32, the state entering every chunk [count, BH, K, V] and the
    final state [BH, K, V], fp32. `operands`: the dtype the dots take (bf16/fp16 with fp32
    accumulation; float32: tf32x3). cu_chunks: packed sequences (B = 1, so BH = H): sequence n
    is chunks cu_chunks[n] .. cu_chunks[n + 1] - 1, and `state` and the final state hold a row
    per (sequence, lane), [N * H, K, V]."""
    chunks, length, K = w.shape
    rows, _, V = state.shape
    BH = rows if cu_chunks is None else rows // (len(cu_chunks) - 1)
    w, b_out, written, gate, state = (x.contiguous() for x in (w, b_out, written, gate, state))
    entering = torch.empty(chunks // BH, BH, K, V, device=w.device, dtype=torch.float32)
    final = torch.empty(rows, K, V, device=w.device, dtype=torch.float32)
    BK, BV, warps = chain_blocks(K, V, operands)
    _dplr_states_kernel[(rows * triton.cdiv(V, BV),)](
        w, b_out, written, gate, state, entering, final, final if cu_chunks is None else cu_chunks,
        BH, K, V, chunks // BH, BT=length, BK=BK, BV=BV, IEEE=operands == torch.float32, DT=_TL[operands],
        VARLEN=cu_chunks is not None, num_warps=warps)
    return entering, final


def dstates(w: Tensor, b_out: Tensor, gate: Tensor, d_entering: Tensor, d_final: Tensor,
            operands: torch.dtype, cu_chunks: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """`psmc.runtime.dplr._chain_backward` on `_dplr_dstates_kernel`: from the terms, what the
    outputs send every entering state [count, BH, K, V] and the final state's gradient, the
    gradient of the state leaving every chunk [count, BH, K, V] and the initial state's, fp32
    (cu_chunks: as `states`; d_final and the initial state's gradient [N * H, K, V])."""
    count, BH, K, V = d_entering.shape
    length = w.shape[1]
    rows = d_final.shape[0]
    w, b_out, gate = (x.contiguous() for x in (w, b_out, gate))
    d_entering = d_entering.to(torch.float32).contiguous()
    d_final = d_final.to(torch.float32).contiguous()
    leaving = torch.empty_like(d_entering)
    d_state = torch.empty(rows, K, V, device=w.device, dtype=torch.float32)
    BK, BV, warps = chain_blocks(K, V, operands)
    _dplr_dstates_kernel[(rows * triton.cdiv(V, BV),)](
        w, b_out, gate, d_entering, d_final, leaving, d_state, d_final if cu_chunks is None else cu_chunks,
        BH, K, V, count, BT=length, BK=BK, BV=BV, IEEE=operands == torch.float32, DT=_TL[operands],
        VARLEN=cu_chunks is not None, num_warps=warps)
    return leaving, d_state
