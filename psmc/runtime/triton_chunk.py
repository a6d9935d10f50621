"""Chunked tensor-core Triton kernels for decayed linear attention (forward and backward).

Same contract as `psmc.runtime.chunkwise.chunk_linear_attention`:

    S_t = decay_t (.) S_{t-1} + k_t v_t^T,      o_t = scale * q_t @ S_t   (or S_{t-1}: exclusive)

with log decays "none" | "scalar" | "key". Three kernels do all the work:

* `_state_kernel`: one program per (lane, K block, V block) walks the chunks in order, stores
  the state ENTERING each chunk ([B*H, NT, K, V], in the input dtype for bf16/fp16, else fp32)
  and the final state (fp32). Per chunk: h <- exp(total) (.) h + (k (.) exp(suffix))^T @ v,
  one `tl.dot` with fp32 accumulation.
* `_out_kernel`: one program per (lane, chunk, 16-token sub-chunk, V block):
  o_i = scale * [(q_i (.) exp(prefix)) @ h_c + sum_{j<i} A_ij @ v_j + diagonal block], where
  A_ij = (q_i (.) exp(P_i)) @ (k_j (.) exp(Q_j + M_ij))^T is a `tl.dot`, and the 16 x 16
  diagonal block uses the exact per-element decay (a masked cumsum per column).
* `_readout_kernel`: the same tiling for outputs along K: out_t = scale * sum_{s<=t}
  (a_t . b_s) (c_s (.) w_ts) + exp(prefix) (.) (h_c @ a_t); this is dq (a = do, b = v, c = k).

The backward reuses them: dq is `_readout_kernel` on the forward's saved states; dk and dv
are the same two kernels run on the time-reversed problem (keys q, values do, decays shifted
by one token, initial state dS_final), whose states one reversed `_state_kernel` pass gives;
d(initial_state) is that pass's final state; the log-decay gradient is the reverse cumsum of
q (.) dq - k (.) dk (the standard identity), done with torch ops.

Numerics (as in the CPU path): every exponent is a sum of log decays over exactly the tokens
it spans, computed as such a sum (cumsums from a sub-chunk start, suffix sums to a sub-chunk
end, totals of whole sub-chunks), never as the difference of two cumsums. All exponents are
<= 0, so nothing overflows; -inf log decays give exact zeros and no NaN. Offsets are int64;
the grid is one-dimensional (no 65,535 limit on lanes); tails are masked; bf16/fp16 inputs
stay in their dtype in HBM and feed `tl.dot` directly; fp32 inputs use IEEE fp32 dots.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

import triton
import triton.language as tl

from psmc.runtime import autotune
from psmc.runtime.custom_ops import traced
from psmc.runtime.varlen import Sequences, chunk_counts, packed_bounds, segment_reverse_cumsum, sequences

__all__ = ["triton_chunk_linear_attention", "CHUNK", "SUB", "BLOCK_K", "BLOCK_V", "NUM_WARPS", "NUM_WARPS_F32"]

SUB = 16  # tokens per sub-chunk (the smallest tl.dot tile)
CHUNK = 64  # default tokens per chunk
BLOCK_K = 64
BLOCK_V = 64
OUT_BLOCK_V = 128  # _out_kernel with bf16/fp16 inputs: all of V <= 128 in one program
NUM_WARPS = 4  # bf16/fp16 inputs
NUM_WARPS_F32 = 8  # fp32 operands take twice the registers: 8 warps keep the tiles unspilled
_KINDS = {"none": 0, "scalar": 1, "key": 2}


# ------------------------------------------------------------------------------ helpers


@triton.jit
def _phys(t, T, REV: tl.constexpr):
    """The physical time index of logical time t (reversed problems read time backwards)."""
    if REV:
        return T - 1 - t
    else:
        return t


@triton.jit
def _tile(ptr, off, t, lo, hi, T, s_t, cols, ncols, s_d, REV: tl.constexpr):
    """x[t, cols] as fp32 for logical times lo <= t < min(hi, T); zero elsewhere."""
    ok = (t >= lo) & (t < hi) & (t < T)
    p = _phys(t, T, REV).to(tl.int64)
    mask = ok[:, None] & (cols < ncols)[None, :]
    return tl.load(ptr + off + p[:, None] * s_t + cols[None, :].to(tl.int64) * s_d, mask=mask, other=0.0)


@triton.jit
def _row(ptr, off, t, T, s_t, cols, ncols, s_d, REV: tl.constexpr):
    """x[t, cols] for one logical time t (zero when t >= T)."""
    tt = cols * 0 + t
    p = _phys(tt, T, REV).to(tl.int64)
    return tl.load(ptr + off + p * s_t + cols.to(tl.int64) * s_d, mask=(cols < ncols) & (tt < T), other=0.0)


@triton.jit
def _logs(g_ptr, off, t, lo, hi, T, s_t, cols, ncols, s_d,
          REV: tl.constexpr, GS: tl.constexpr, DECAY: tl.constexpr):
    """Log decays at logical times t in [lo, min(hi, T)) as an fp32 [R, C] tile, zero elsewhere.
    GS shifts the physical index by one token (the reversed inclusive problem); a scalar decay
    has s_d = 0 and reads one value per row."""
    if DECAY == 0:
        return (t[:, None] * 0 + cols[None, :] * 0).to(tl.float32)
    else:
        ok = (t >= lo) & (t < hi) & (t < T)
        p = _phys(t, T, REV) + GS
        ok = ok & (p < T)
        mask = ok[:, None] & (cols < ncols)[None, :]
        ptrs = g_ptr + off + p.to(tl.int64)[:, None] * s_t + cols[None, :].to(tl.int64) * s_d
        return tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _to_end(g_ptr, off, t, lo, hi, T, s_t, cols, ncols, s_d,
            REV: tl.constexpr, GS: tl.constexpr, DECAY: tl.constexpr):
    """For the sub-chunk of logical times t in [lo, hi), as [R, C] tiles: (the log decay from each
    token to the sub-chunk end, a suffix sum of the tokens after it: what a key written at t has
    decayed by when the sub-chunk ends; the tokens' own log decays, whose column sums are what
    the state entering the sub-chunk decays by)."""
    after = _logs(g_ptr, off, t + 1, lo, hi, T, s_t, cols, ncols, s_d, REV, GS, DECAY)
    here = _logs(g_ptr, off, t, lo, hi, T, s_t, cols, ncols, s_d, REV, GS, DECAY)
    return tl.cumsum(after, axis=0, reverse=True), here


@triton.jit
def _program(pid, nb, NC: tl.constexpr, NT, H):
    """A program of the (lane, chunk, sub-chunk, block) grid, blocks fastest: (block, sub-chunk,
    chunk, lane, batch, head)."""
    blk = pid % nb
    i = ((pid // nb) % NC).to(tl.int32)
    c = (pid // (nb * NC)) % NT
    bh = pid // (nb * NC * NT)
    return blk, i, c, bh, bh // H, bh % H


@triton.jit
def _sequence(b, hh, H, T, NT, cu_ptr, cb_ptr, VARLEN: tl.constexpr):
    """Where lane (b, hh)'s sequence lies: (the time index of its first token, its length, the
    row of its first chunk in the [rows, K, V] buffer of entering states, the batch index of its
    tensors). Packed sequences (VARLEN): b is the sequence, its tokens are cu[b]:cu[b+1] of batch
    row 0, and its chunks are rows cb[b]:cb[b+1] of head hh's NT (all chunks)."""
    if VARLEN:
        bos = tl.load(cu_ptr + b).to(tl.int64)
        length = (tl.load(cu_ptr + b + 1) - tl.load(cu_ptr + b)).to(tl.int32)
        return bos, length, hh * NT + tl.load(cb_ptr + b).to(tl.int64), b * 0
    else:
        return b * 0, T, (b * H + hh) * NT, b


@triton.jit
def _place(c, b, hh, H, T, NT, cu_ptr, cb_ptr, cs_ptr, VARLEN: tl.constexpr):
    """A per-chunk program's chunk c (of all NT chunks when VARLEN) as (its index within its
    sequence, then `_sequence`'s four values)."""
    if VARLEN:
        n = tl.load(cs_ptr + c).to(tl.int64)
        bos, length, row0, bb = _sequence(n, hh, H, T, NT, cu_ptr, cb_ptr, VARLEN)
        return c - tl.load(cb_ptr + n).to(tl.int64), bos, length, row0, bb
    else:
        bos, length, row0, bb = _sequence(b, hh, H, T, NT, cu_ptr, cb_ptr, VARLEN)
        return c, bos, length, row0, bb


@triton.jit
def _mm(a, b, IEEE: tl.constexpr, DT: tl.constexpr):
    """a @ b with fp32 accumulation: IEEE fp32 for fp32 inputs, else DT (bf16/fp16) operands."""
    if IEEE:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="tf32x3")
    else:
        return tl.dot(a.to(DT), b.to(DT))


@triton.jit
def _diag_weights(gq, rows, s, EXCL: tl.constexpr):
    """exp(sum of the log decays strictly after token s up to row t) for every row t of a
    sub-chunk (up to t - 1 when EXCL; gq is then shifted by one token), zero for t < s (+1).
    A masked cumsum per column: exact for any decay, -inf included."""
    span = tl.cumsum(tl.where(rows[:, None] > s + EXCL, gq, 0.0), axis=0)
    return tl.where(rows[:, None] >= s + EXCL, tl.exp(span), 0.0)


# ------------------------------------------------------------------------------ kernels


@triton.jit
def _state_kernel(
    k_ptr, skb, skt, skh, skd,
    v_ptr, svb, svt, svh, svd,
    g_ptr, sgb, sgt, sgh, sgd,
    h0_ptr, h0_scale, hs_ptr, hT_ptr,
    T, H, K, V, NT, cu_ptr, cb_ptr,
    BT: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    DECAY: tl.constexpr, REV: tl.constexpr, GS: tl.constexpr, HAS_H0: tl.constexpr, IEEE: tl.constexpr,
    VARLEN: tl.constexpr,
):
    """States entering every chunk (hs [BH, NT, K, V]; [H, all chunks, K, V] for packed
    sequences) and the final state (hT [BH, K, V], fp32; BH = sequences x heads when packed)."""
    pid = tl.program_id(0).to(tl.int64)
    nk = tl.cdiv(K, BK)
    nv = tl.cdiv(V, BV)
    vb = pid % nv
    kb = (pid // nv) % nk
    bh = pid // (nv * nk)
    hh = bh % H
    bos, T, row0, b = _sequence(bh // H, hh, H, T, NT, cu_ptr, cb_ptr, VARLEN)
    DT = k_ptr.dtype.element_ty
    k_off = b * skb + bos * skt + hh * skh
    v_off = b * svb + bos * svt + hh * svh
    g_off = b * sgb + bos * sgt + hh * sgh
    ck = kb * BK + tl.arange(0, BK)
    cv = vb * BV + tl.arange(0, BV)
    kv = ck[:, None].to(tl.int64) * V + cv[None, :]
    kv_mask = (ck < K)[:, None] & (cv < V)[None, :]
    if HAS_H0:
        h = tl.load(h0_ptr + bh * K * V + kv, mask=kv_mask, other=0.0).to(tl.float32) * h0_scale
    else:
        h = tl.zeros((BK, BV), dtype=tl.float32)
    rows = tl.arange(0, BC)
    NC: tl.constexpr = BT // BC
    if VARLEN:
        NT = tl.cdiv(T, BT)  # this sequence's chunks (a regular batch: every row's NT)
    for c in range(NT):
        tl.store(hs_ptr + (row0 + c) * K * V + kv, h.to(hs_ptr.dtype.element_ty), mask=kv_mask)
        # the same recurrence one sub-chunk of BC tokens at a time (smaller tiles, no spills)
        for i in range(NC):
            lo = c * BT + i * BC
            t = lo + rows
            kt = _tile(k_ptr, k_off, t, lo, lo + BC, T, skt, ck, K, skd, REV)
            vt = _tile(v_ptr, v_off, t, lo, lo + BC, T, svt, cv, V, svd, REV)
            to_end, here = _to_end(g_ptr, g_off, t, lo, lo + BC, T, sgt, ck, K, sgd, REV, GS, DECAY)
            kd = kt.to(tl.float32) * tl.exp(to_end)
            h = h * tl.exp(tl.sum(here, axis=0))[:, None] + _mm(tl.trans(kd), vt, IEEE, DT)
    tl.store(hT_ptr + bh * K * V + kv, h, mask=kv_mask)


@triton.jit
def _out_kernel(
    q_ptr, sqb, sqt, sqh, sqd,
    k_ptr, skb, skt, skh, skd,
    v_ptr, svb, svt, svh, svd,
    g_ptr, sgb, sgt, sgh, sgd,
    hs_ptr, o_ptr, sob, sot, soh, sod, scale,
    T, H, K, V, NT, cu_ptr, cb_ptr, cs_ptr,
    BT: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    DECAY: tl.constexpr, REV: tl.constexpr, GS: tl.constexpr, EXCL: tl.constexpr, IEEE: tl.constexpr,
    VARLEN: tl.constexpr,
):
    """o = scale * (q @ S) for one sub-chunk of BC tokens and one block of BV value columns."""
    nk = tl.cdiv(K, BK)
    NC: tl.constexpr = BT // BC
    vb, i, c, bh, b, hh = _program(tl.program_id(0).to(tl.int64), tl.cdiv(V, BV), NC, NT, H)
    c, bos, T, row0, b = _place(c, b, hh, H, T, NT, cu_ptr, cb_ptr, cs_ptr, VARLEN)
    DT = q_ptr.dtype.element_ty
    q_off = b * sqb + bos * sqt + hh * sqh
    k_off = b * skb + bos * skt + hh * skh
    v_off = b * svb + bos * svt + hh * svh
    g_off = b * sgb + bos * sgt + hh * sgh
    cs = (c * BT).to(tl.int32)
    ss = cs + i * BC
    rows = tl.arange(0, BC)
    t = ss + rows
    cv = vb * BV + tl.arange(0, BV)
    o = tl.zeros((BC, BV), dtype=tl.float32)
    for kb in range(nk):
        ck = kb * BK + tl.arange(0, BK)
        qi = _tile(q_ptr, q_off, t, ss, ss + BC, T, sqt, ck, K, sqd, REV).to(tl.float32)
        # the sub-chunk's queries decayed from its start (from the token before when exclusive)
        gq = _logs(g_ptr, g_off, t - EXCL, ss, ss + BC, T, sgt, ck, K, sgd, REV, GS, DECAY)
        qin = qi * tl.exp(tl.cumsum(gq, axis=0))
        # earlier sub-chunks j < i: decay = exp(P_i(t)) exp(M_ij) exp(Q_j(s)), each factor <= 1
        between = tl.zeros((BK,), dtype=tl.float32)  # log decay of the sub-chunks between j and i
        for jj in range(i):
            sj = ss - (jj + 1) * BC
            tj = sj + rows
            kj = _tile(k_ptr, k_off, tj, sj, sj + BC, T, skt, ck, K, skd, REV).to(tl.float32)
            to_end, here = _to_end(g_ptr, g_off, tj, sj, sj + BC, T, sgt, ck, K, sgd, REV, GS, DECAY)
            kd = kj * tl.exp(to_end + between[None, :])
            a = _mm(qin, tl.trans(kd), IEEE, DT)
            vj = _tile(v_ptr, v_off, tj, sj, sj + BC, T, svt, cv, V, svd, REV)
            o += _mm(a, vj, IEEE, DT)
            between += tl.sum(here, axis=0)
        # the entering state, read by the queries decayed from the chunk start (`between` now
        # sums the log decays of all earlier sub-chunks)
        kv = (row0 + c) * K * V + ck[:, None].to(tl.int64) * V + cv[None, :]
        h = tl.load(hs_ptr + kv, mask=(ck < K)[:, None] & (cv < V)[None, :], other=0.0)
        o += _mm(qin * tl.exp(between)[None, :], h, IEEE, DT)
        # the diagonal sub-chunk, one key column at a time with its exact decay weights
        for s in range(BC):
            ks = _row(k_ptr, k_off, ss + s, T, skt, ck, K, skd, REV).to(tl.float32)
            vs = _row(v_ptr, v_off, ss + s, T, svt, cv, V, svd, REV).to(tl.float32)
            w = _diag_weights(gq, rows, s, EXCL)
            score = tl.sum(qi * w * ks[None, :], axis=1)
            o += score[:, None] * vs[None, :]
    p = _phys(t, T, REV).to(tl.int64)
    o_ptrs = o_ptr + b * sob + bos * sot + hh * soh + p[:, None] * sot + cv[None, :].to(tl.int64) * sod
    tl.store(o_ptrs, (o * scale).to(o_ptr.dtype.element_ty), mask=(t < T)[:, None] & (cv < V)[None, :])


@triton.jit
def _readout_kernel(
    a_ptr, sab, sat, sah, sad,
    b_ptr, sbb, sbt, sbh, sbd,
    c_ptr, scb, sct, sch, scd,
    g_ptr, sgb, sgt, sgh, sgd,
    hs_ptr, o_ptr, sob, sot, soh, sod, scale,
    T, H, K, V, NT, cu_ptr, cb_ptr, cs_ptr,
    BT: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    DECAY: tl.constexpr, REV: tl.constexpr, GS: tl.constexpr, EXCL: tl.constexpr, IEEE: tl.constexpr,
    VARLEN: tl.constexpr,
):
    """out_t = scale * (S_t @ a_t) along K (dq: a = do, b = v, c = k), for one sub-chunk and one
    K block; out is an fp32 [B, T, H, K] tensor."""
    nv = tl.cdiv(V, BV)
    NC: tl.constexpr = BT // BC
    kb, i, c, bh, b, hh = _program(tl.program_id(0).to(tl.int64), tl.cdiv(K, BK), NC, NT, H)
    c, bos, T, row0, b = _place(c, b, hh, H, T, NT, cu_ptr, cb_ptr, cs_ptr, VARLEN)
    DT = a_ptr.dtype.element_ty
    a_off = b * sab + bos * sat + hh * sah
    b_off = b * sbb + bos * sbt + hh * sbh
    c_off = b * scb + bos * sct + hh * sch
    g_off = b * sgb + bos * sgt + hh * sgh
    cs = (c * BT).to(tl.int32)
    ss = cs + i * BC
    rows = tl.arange(0, BC)
    t = ss + rows
    ck = kb * BK + tl.arange(0, BK)
    gq = _logs(g_ptr, g_off, t - EXCL, ss, ss + BC, T, sgt, ck, K, sgd, REV, GS, DECAY)
    pin = tl.cumsum(gq, axis=0)
    inter = tl.zeros((BC, BK), dtype=tl.float32)
    for vb in range(nv):
        cv = vb * BV + tl.arange(0, BV)
        ai = _tile(a_ptr, a_off, t, ss, ss + BC, T, sat, cv, V, sad, REV)
        kv = (row0 + c) * K * V + ck[:, None].to(tl.int64) * V + cv[None, :]
        h = tl.load(hs_ptr + kv, mask=(ck < K)[:, None] & (cv < V)[None, :], other=0.0)
        inter += _mm(ai, tl.trans(h), IEEE, DT)
    out = tl.zeros((BC, BK), dtype=tl.float32)
    between = tl.zeros((BK,), dtype=tl.float32)
    for jj in range(i):
        sj = ss - (jj + 1) * BC
        tj = sj + rows
        scores = tl.zeros((BC, BC), dtype=tl.float32)
        for vb in range(nv):
            cv = vb * BV + tl.arange(0, BV)
            ai = _tile(a_ptr, a_off, t, ss, ss + BC, T, sat, cv, V, sad, REV)
            bj = _tile(b_ptr, b_off, tj, sj, sj + BC, T, sbt, cv, V, sbd, REV)
            scores += _mm(ai, tl.trans(bj), IEEE, DT)
        cj = _tile(c_ptr, c_off, tj, sj, sj + BC, T, sct, ck, K, scd, REV).to(tl.float32)
        to_end, here = _to_end(g_ptr, g_off, tj, sj, sj + BC, T, sgt, ck, K, sgd, REV, GS, DECAY)
        cd = cj * tl.exp(to_end + between[None, :])
        out += _mm(scores, cd, IEEE, DT)
        between += tl.sum(here, axis=0)
    # `between` now sums the log decays of all earlier sub-chunks of the chunk
    out = tl.exp(pin) * out + inter * tl.exp(pin + between[None, :])
    scores = tl.zeros((BC, BC), dtype=tl.float32)
    for vb in range(nv):
        cv = vb * BV + tl.arange(0, BV)
        ai = _tile(a_ptr, a_off, t, ss, ss + BC, T, sat, cv, V, sad, REV)
        bi = _tile(b_ptr, b_off, t, ss, ss + BC, T, sbt, cv, V, sbd, REV)
        scores += _mm(ai, tl.trans(bi), IEEE, DT)
    for s in range(BC):
        col = tl.sum(tl.where(rows[None, :] == s, scores, 0.0), axis=1)
        cs_row = _row(c_ptr, c_off, ss + s, T, sct, ck, K, scd, REV).to(tl.float32)
        w = _diag_weights(gq, rows, s, EXCL)
        out += col[:, None] * cs_row[None, :] * w
    p = _phys(t, T, REV).to(tl.int64)
    o_ptrs = o_ptr + b * sob + bos * sot + hh * soh + p[:, None] * sot + ck[None, :].to(tl.int64) * sod
    tl.store(o_ptrs, out * scale, mask=(t < T)[:, None] & (ck < K)[None, :])


# ------------------------------------------------------------------------------ launchers


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _strides(x: Tensor | None) -> tuple:
    """(batch, time, lane, width) strides; a scalar decay [B, T, H] reads one value per width."""
    if x is None:
        return (0, 0, 0, 0)
    return tuple(x.stride()) + (0,) * (4 - x.dim())


def _blocks(K: int, V: int, wide_v: int = 0) -> tuple[int, int]:
    """(BK, BV); wide_v > 0 lets BV grow to it (one V block: the intra-chunk work once)."""
    return max(16, min(BLOCK_K, _pow2(K))), max(16, min(wide_v or BLOCK_V, _pow2(V)))


def _warps(x: Tensor) -> int:
    return NUM_WARPS_F32 if x.dtype == torch.float32 else NUM_WARPS


def warp_choices(x: Tensor) -> tuple:
    """The autotuner's candidates: fp32 operands keep NUM_WARPS_F32 (fewer spill), bf16/fp16
    ones try NUM_WARPS and twice as many (psmc.runtime.autotune)."""
    warps = _warps(x)
    return (warps,) if x.dtype == torch.float32 else (warps, 2 * warps)


def _tuned(kernel, grid: tuple, x: Tensor, spec: tuple, launch) -> None:
    """launch(warps) at the warps kept for this kernel, operand dtype, grid size (to a power of
    two, so packed batches of other lengths share the choice) and `spec` (its constexprs)."""
    key = ("chunk", kernel, x.dtype, x.device, autotune.bucket(grid[0]), spec)
    autotune.launch(key, warp_choices(x), launch, x.device)


def _chunk(T: int, chunk_size: int) -> int:
    return max(SUB, min(_pow2(chunk_size), _pow2(T)))


def packed(seqs: Sequences | None, dummy: Tensor) -> tuple:
    """The packed-sequence tables a kernel reads (cu_ptr, cb_ptr, cs_ptr): `dummy` three times
    when the batch is regular (VARLEN=0 never reads them)."""
    if seqs is None:
        return dummy, dummy, dummy
    return seqs.offsets, seqs.first_chunk, seqs.chunk_sequence


def state_rows(B: int, H: int, T: int, BT: int, bounds) -> tuple[int, int, int]:
    """(lanes of final states, rows x chunks of the entering-state buffer): [B * H] and
    [B * H, ceil(T / BT)] for a regular batch (bounds None), [N * H] and [H, all chunks] for
    the N packed sequences of offsets `bounds`."""
    if bounds is None:
        return B * H, B * H, -(-T // BT)
    return (len(bounds) - 1) * H, H, sum(chunk_counts(bounds, BT))


def _states(k, v, g, h0, h0_scale, decay, rev, shift, BT, state_dtype, seqs=None):
    """Run _state_kernel: (states entering each chunk [BH, NT, K, V], final state fp32)."""
    B, T, H, K = k.shape
    V = v.shape[-1]
    lanes, rows, NT = state_rows(B, H, T, BT, None if seqs is None else seqs.bounds)
    BK, BV = _blocks(K, V)
    hs = torch.empty(rows, NT, K, V, device=k.device, dtype=state_dtype)
    hT = torch.empty(lanes, K, V, device=k.device, dtype=torch.float32)
    grid = (lanes * triton.cdiv(K, BK) * triton.cdiv(V, BV),)
    _tuned(_state_kernel, grid, k, (BT, BK, BV, decay, rev, h0 is None), lambda warps: _state_kernel[grid](
        k, *k.stride(), v, *v.stride(), k if g is None else g, *_strides(g),
        hT if h0 is None else h0, float(h0_scale), hs, hT, T, H, K, V, NT, *packed(seqs, hT)[:2],
        BT=BT, BC=SUB, BK=BK, BV=BV, DECAY=_KINDS[decay], REV=rev, GS=shift, HAS_H0=h0 is not None,
        IEEE=k.dtype == torch.float32, VARLEN=seqs is not None, num_warps=warps,
    ))
    return hs, hT


def _outputs(q, k, v, g, hs, out, scale, decay, rev, shift, exclusive, BT, seqs=None):
    B, T, H, K = q.shape
    V = v.shape[-1]
    NT = hs.shape[1]
    BK, BV = _blocks(K, V, OUT_BLOCK_V if q.dtype != torch.float32 else 0)
    grid = (B * H * NT * (BT // SUB) * triton.cdiv(V, BV),)
    _tuned(_out_kernel, grid, q, (BT, BK, BV, decay, rev, exclusive), lambda warps: _out_kernel[grid](
        q, *q.stride(), k, *k.stride(), v, *v.stride(), q if g is None else g, *_strides(g),
        hs, out, *out.stride(), float(scale), T, H, K, V, NT, *packed(seqs, hs),
        BT=BT, BC=SUB, BK=BK, BV=BV, DECAY=_KINDS[decay], REV=rev, GS=shift, EXCL=int(exclusive),
        IEEE=q.dtype == torch.float32, VARLEN=seqs is not None, num_warps=warps,
    ))
    return out


def _readout(a, b, c, g, hs, scale, decay, rev, shift, exclusive, BT, seqs=None):
    B, T, H, V = a.shape
    K = c.shape[-1]
    NT = hs.shape[1]
    BK, BV = _blocks(K, V)
    out = torch.empty(B, T, H, K, device=a.device, dtype=torch.float32)
    grid = (B * H * NT * (BT // SUB) * triton.cdiv(K, BK),)
    _tuned(_readout_kernel, grid, a, (BT, BK, BV, decay, rev, exclusive), lambda warps: _readout_kernel[grid](
        a, *a.stride(), b, *b.stride(), c, *c.stride(), a if g is None else g, *_strides(g),
        hs, out, *out.stride(), float(scale), T, H, K, V, NT, *packed(seqs, hs),
        BT=BT, BC=SUB, BK=BK, BV=BV, DECAY=_KINDS[decay], REV=rev, GS=shift, EXCL=int(exclusive),
        IEEE=a.dtype == torch.float32, VARLEN=seqs is not None, num_warps=warps,
    ))
    return out


def _state_dtype(x: Tensor) -> torch.dtype:
    return x.dtype if x.dtype in (torch.bfloat16, torch.float16) else torch.float32


# The device tables of the last few packings: a training step's forward op and backward op
# (and a delta rule's passes) each need them, and an op takes the offsets as a list, not the
# tables (read-only int32 tensors of a few KB)
_TABLES: dict = {}
_TABLES_KEPT = 4


def packed_sequences(bounds: list[int] | None, BT: int, device) -> Sequences | None:
    """The device tables of packed sequences of offsets `bounds` in chunks of BT tokens (None:
    a regular batch), built once for the last few (bounds, BT, device)."""
    if bounds is None:
        return None
    key = (tuple(bounds), BT, torch.device(device))
    seqs = _TABLES.pop(key, None)
    if seqs is None:
        seqs = sequences(bounds, BT, device)
        while len(_TABLES) >= _TABLES_KEPT:
            del _TABLES[next(iter(_TABLES))]  # the least recently used (a dict keeps its order)
    _TABLES[key] = seqs
    return seqs


def _launch_forward(q: Tensor, k: Tensor, v: Tensor, g: Tensor | None, h0: Tensor | None, decay: str, scale: float,
                    exclusive: bool, BT: int, bounds: list[int] | None) -> tuple[Tensor, Tensor, Tensor]:
    """q, k [B, T, H, K], v [B, T, H, V], g None | [B, T, H] | [B, T, H, K] (views, maybe stride
    0), h0 None | [BH, K, V] fp32 contiguous: (o [B, T, H, V], the final state [BH, K, V] fp32,
    the states entering every chunk, which the backward reads). With packed sequences (`bounds`,
    B = 1) BH is sequences x heads."""
    seqs = packed_sequences(bounds, BT, q.device)
    hs, hT = _states(k, v, g, h0, 1.0, decay, False, 0, BT, _state_dtype(k), seqs)
    o = torch.empty(*q.shape[:3], v.shape[-1], device=q.device, dtype=v.dtype)
    _outputs(q, k, v, g, hs, o, scale, decay, False, 0, exclusive, BT, seqs)
    return o, hT, hs


def _launch_backward(q: Tensor, k: Tensor, v: Tensor, g: Tensor | None, hs: Tensor, hT: Tensor, do: Tensor,
                     dhT: Tensor, decay: str, scale: float, exclusive: bool, BT: int, bounds: list[int] | None,
                     has_h0: bool, wants_dg: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dq, dk, dv, d log decay, d initial state) of `_launch_forward` for the gradients `do`,
    `dhT` of its outputs; d log decay is empty unless `wants_dg`, d initial state unless `has_h0`."""
    seqs = packed_sequences(bounds, BT, q.device)
    B, T, H, K = q.shape
    do, dhT = do.to(v.dtype), dhT.float().contiguous()
    shift = 0 if exclusive else 1  # the reversed inclusive problem sees decays one token later
    dq = _readout(do, v, k, g, hs, scale, decay, False, 0, exclusive, BT, seqs)
    # the time-reversed problem: keys q, values do, initial state dS_final (its outputs are
    # scaled by `scale`, its initial state must not be: it enters divided by scale)
    hs_r, hT_r = _states(q, do, g, dhT, 1.0 / scale, decay, True, shift, BT, _state_dtype(q), seqs)
    dv = torch.empty(B, T, H, v.shape[-1], device=q.device, dtype=torch.float32)
    _outputs(k, q, do, g, hs_r, dv, scale, decay, True, shift, exclusive, BT, seqs)
    dk = _readout(v, do, q, g, hs_r, scale, decay, True, shift, exclusive, BT, seqs)
    # each sequence's first and last token: [0] and [T - 1] of every row, or the packed offsets
    starts = [0] if seqs is None else list(seqs.bounds[:-1])
    ends = [T - 1] if seqs is None else [b - 1 for b in seqs.bounds[1:]]
    dh0 = hT.new_empty(0)
    if has_h0:
        dh0 = hT_r * scale
        if not exclusive and g is not None:  # the reversed pass never saw a first token's decay
            first = _at_times(g.float(), starts)  # [rows, H] or [rows, H, K], rows = B or N
            first = first.expand(*first.shape[:2], K) if decay == "key" else first[..., None]
            dh0 = dh0 * torch.exp(first).reshape(-1, first.shape[-1], 1)
    dg = hT.new_empty(0)
    if g is not None and wants_dg:
        # d log-cumsum at t: q_t . dq_t (q_{t+1} . dq_{t+1} when exclusive, within the same
        # sequence) - k_t . dk_t, plus the final state's share at each sequence's last token;
        # the log decays get its reverse cumsum over each sequence
        read = q.float() * dq
        dlog = -(k.float() * dk)
        if exclusive:
            if seqs is not None:
                read[:, starts[1:]] = 0  # a sequence's first read is no share of the one before
            dlog[:, :-1] += read[:, 1:]
        else:
            dlog += read
        final = (hT * dhT).sum(-1).reshape(-1, H, K)  # [rows, H, K]
        if seqs is None:
            dlog[:, -1] += final
            dg = dlog.flip(1).cumsum(1).flip(1)
        else:
            dlog[0, ends] += final
            dg = segment_reverse_cumsum(dlog, seqs.bounds)
        if decay == "scalar":
            dg = dg.sum(-1)
        dg = dg.to(g.dtype)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dg, dh0


_forward_op = torch.library.custom_op("psmc::chunk_linear_attention", _launch_forward, mutates_args=())
_backward_op = torch.library.custom_op("psmc::chunk_linear_attention_backward", _launch_backward, mutates_args=())


@_forward_op.register_fake
def _forward_fake(q, k, v, g, h0, decay, scale, exclusive, BT, bounds):
    B, T, H, K = q.shape
    lanes, rows, NT = state_rows(B, H, T, BT, bounds)
    return (q.new_empty(B, T, H, v.shape[-1], dtype=v.dtype), q.new_empty(lanes, K, v.shape[-1], dtype=torch.float32),
            q.new_empty(rows, NT, K, v.shape[-1], dtype=_state_dtype(k)))


@_backward_op.register_fake
def _backward_fake(q, k, v, g, hs, hT, do, dhT, decay, scale, exclusive, BT, bounds, has_h0, wants_dg):
    dg = g.new_empty(g.shape) if g is not None and wants_dg else hT.new_empty(0)
    # (new_empty: dense like the real gradients, whatever the inputs' strides; a broadcast input is a stride-0 view)
    return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dg,
            hT.new_empty(hT.shape) if has_h0 else hT.new_empty(0))


_forward, _backward = traced(_forward_op, _launch_forward), traced(_backward_op, _launch_backward)


class _ChunkLinearAttention(torch.autograd.Function):
    """`_launch_forward` with its gradient: o and the final state (the entering states are saved,
    not returned). Under torch.compile the launches are the ops above (psmc.runtime.custom_ops)."""

    @staticmethod
    def forward(ctx, q, k, v, g, h0, decay, scale, exclusive, BT, bounds):
        o, hT, hs = _forward(q, k, v, g, h0, decay, scale, exclusive, BT, bounds)
        ctx.save_for_backward(q, k, v, g, hs, hT)
        ctx.args = (decay, scale, exclusive, BT, bounds, h0 is not None)
        return o, hT

    @staticmethod
    @once_differentiable  # the kernels are not differentiable again: a clear error, not zeros
    def backward(ctx, do, dhT):
        q, k, v, g, hs, hT = ctx.saved_tensors
        decay, scale, exclusive, BT, bounds, has_h0 = ctx.args
        do = torch.zeros_like(v) if do is None else do
        dhT = torch.zeros_like(hT) if dhT is None else dhT
        wants_dg = g is not None and ctx.needs_input_grad[3]
        dq, dk, dv, dg, dh0 = _backward(q, k, v, g, hs, hT, do, dhT, decay, scale, exclusive, BT, bounds, has_h0,
                                        wants_dg)
        return dq, dk, dv, dg if wants_dg else None, dh0 if has_h0 else None, None, None, None, None, None


def _at_times(x: Tensor, times: list) -> Tensor:
    """x[:, t] for a regular batch (times == [0]: [B, ...]), x[0, times] for packed sequences
    ([N, ...]); `x` may be a stride-0 view along time or batch."""
    if times == [0]:
        return x[:, 0]
    return x[0, times]


def triton_chunk_linear_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    log_decay: Tensor | None = None,
    *,
    decay: str = "none",
    scale: float = 1.0,
    initial_state: Tensor | None = None,
    exclusive: bool = False,
    chunk_size: int = 64,
    cu_seqlens: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """`psmc.runtime.chunkwise.chunk_linear_attention` on Triton kernels (same arguments, shapes,
    broadcasting, dtypes and gradients; see its docstring). Inputs must be CUDA tensors, or CPU
    tensors under TRITON_INTERPRET=1. float64 inputs, empty sequences and scale == 0 run the
    torch chunkwise path instead. With `cu_seqlens` the N packed sequences run in the same
    launches as one batch row would (no loop over sequences)."""
    from psmc.runtime import chunkwise

    chunkwise._check_kind(log_decay, decay)
    lanes = chunkwise._lanes(q, k, v, log_decay, decay)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    B, T, K, V = q.shape[0], q.shape[1], q.shape[-1], v.shape[-1]
    if q.dtype == torch.float64 or T == 0 or scale == 0 or q.dtype != k.dtype or q.dtype != v.dtype:
        return chunkwise._chunk_linear_attention_torch(
            q, k, v, log_decay, decay=decay, scale=scale, initial_state=initial_state,
            exclusive=exclusive, chunk_size=chunk_size, cu_seqlens=cu_seqlens)
    H = chunkwise._prod(lanes)
    bounds, rows, BT = None, B, _chunk(T, chunk_size)
    if cu_seqlens is not None:
        bounds = list(packed_bounds("chunk_linear_attention", cu_seqlens, B, T))
        BT = _chunk(max(b - a for a, b in zip(bounds, bounds[1:])), chunk_size)
        rows = len(bounds) - 1

    def flat(x: Tensor, width: tuple[int, ...]) -> Tensor:
        # a stride-0 view when the lane axes broadcast (a copy only for multi-axis broadcasts)
        return x.expand(B, x.shape[1], *lanes, *width).reshape(B, x.shape[1], H, *width)

    q4, k4, v4 = flat(q, (K,)), flat(k, (K,)), flat(v, (V,))
    g4 = None
    if log_decay is not None:
        g4 = flat(log_decay.float(), (K,) if decay == "key" else ())
        if g4.shape[1] != T:
            g4 = g4.expand(B, T, *g4.shape[2:])
    h0 = None
    if initial_state is not None:
        h0 = initial_state.float().expand(rows, *lanes, K, V).reshape(rows * H, K, V).contiguous()
    o, hT = _ChunkLinearAttention.apply(q4, k4, v4, g4, h0, decay, float(scale), bool(exclusive), BT, bounds)
    return o.reshape(B, T, *lanes, V), hT.reshape(rows, *lanes, K, V)
