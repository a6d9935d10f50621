"""The diagonal-plus-low-rank (DPLR) linear recurrence, without a K x K transition per token.

    S_t = diag(exp(lam_t)) S_{t-1} + b_t (a_t^T S_{t-1}) + k_t v_t^T,      o_t = scale * q_t^T S_t

S is K x V; the transition E_t = D_t + b_t a_t^T is a diagonal D_t = diag(exp(lam_t)) (lam the
per-key LOG decay, None: D = I) plus a rank-one term. It serves RWKV-7 (a = -kappa, b = kappa *
iclr), Kimi Delta Attention (E = (I - beta k k^T) diag(exp(g)): a = k exp(g), b = -beta k,
lam = g, written key beta k) and the gated delta rule with per-key gates. The generic
matrix-affine scan composes the K x K transitions; this module never forms one per token.

`dplr_step` is one token in O(K V): S <- exp(lam) (.) S + b (a^T S) + k v^T, a^T S of the
state before the token (CUDA tensors outside autograd: one Triton kernel,
psmc.runtime.triton_dplr_step). `chunk_dplr` on CUDA tensors outside autograd runs the same
chunked WY form on two Triton kernels (psmc.runtime.triton_dplr); under autograd it computes
the chunk-local terms here and chains the chunks on two other kernels of that module, one
forward and one backward (`_chain`, a torch op: one node each way, also in a torch.compile
graph).

`chunk_dplr` is the parallel pass in the chunked WY form (Yang et al. 2024, "Parallelizing
Linear Transformers with the Delta Rule over Sequence Length", generalised to a diagonal plus
rank one as in fla's generalized_delta_rule.dplr). Inside a chunk of L tokens entered with state
S_0, let G_t = sum_{r<=t} lam_r (per key, from the chunk start), Gex_t = G_{t-1} (Gex_0 = 0),
Gam_t = diag(exp(G_t)), and u_t = a_t^T S_{t-1} (a V-vector: what the rank-one term reads).
Unrolling the recurrence,

    S_t = Gam_t S_0 + sum_{s<=t} Gam_t Gam_s^-1 (b_s u_s^T + k_s v_s^T)

and reading it one token earlier with a_t,

    u_t = (a_t (.) e^{Gex_t})^T S_0 + sum_{s<t} A_ab[t,s] u_s + sum_{s<t} A_ak[t,s] v_s

with the strictly lower L x L matrices A_ab[t,s] = a_t^T diag(e^{Gex_t - G_s}) b_s and
A_ak[t,s] = a_t^T diag(e^{Gex_t - G_s}) k_s. So U (rows u_t) solves a unit lower triangular
system,

    (I - A_ab) U = Atil S_0 + A_ak V,     Atil = a (.) e^{Gex}
    U = W S_0 + U0,   W = (I - A_ab)^-1 Atil [L, K],   U0 = (I - A_ab)^-1 A_ak V [L, V]

and, with the inclusive lower A_qb[t,s] = q_t^T diag(e^{G_t - G_s}) b_s and A_qk likewise,
Qtil = q (.) e^G, Btil = b (.) e^{G_L - G_s}, Ktil likewise,

    O   = scale (Qtil S_0 + A_qb U + A_qk V)
    S_L = e^{G_L} (.) S_0 + Btil^T U + Ktil^T V

Substituting U = W S_0 + U0 makes both affine in S_0 with chunk-local coefficients:

    O   = Qeff S_0 + (A_qb U0 + A_qk V),          Qeff = Qtil + A_qb W          [L, K]
    S_L = P S_0 + (Btil^T U0 + Ktil^T V),         P = diag(e^{G_L}) + Btil^T W  [K, K]

(P is the product of the chunk's L transitions.) Everything but S_0 is computed for all chunks
at once in batched matmuls (one [2L, K] x [K, 2L] product of the rows [a; q] and columns [b; k]
gives all four L x L matrices; one unit triangular inverse per chunk); the chunks are then
chained in order, one [K, K] x [K, V] product each (in place on one buffer of chunk states
without autograd), and the outputs take one batched product after the loop, which also applies
`scale` (everything is linear in q). Padding tokens (T not a multiple of L) have
k = v = a = b = 0 and lam = 0: the identity map.

Numerics, as in psmc/runtime/chunkwise.py: every exponent of Qtil, Atil, Btil, Ktil and e^{G_L}
is a sum of log decays over exactly the tokens it spans (a cumsum from the chunk start, a suffix
sum to its end), so with decays <= 1 nothing exceeds 1 and a decay of 0 (lam = -inf) gives an
exact 0. The L x L matrices need e^{R_t - G_s} summed over keys (R = Gex or G): they factorise
around a mid-range reference m per (chunk, key), (x (.) e^{R - m}) (y (.) e^{m - G})^T, taken as
the decayed operands rescaled per (chunk, key), [Atil; Qtil] e^{-m} and [Btil; Ktil] e^{m - G_L}.
When the chunk's exponents (and 0) spread over at most 2 * chunkwise._MAX_SPREAD, every factor
and operand is a normal float bounded by e^{2 _MAX_SPREAD} (the factors by e^{_MAX_SPREAD}); the
entries above the diagonal (possibly inf) are dropped with masked_fill, never a product with a
mask. Chunks that spread further (very strong or -inf decays) take the exact elementwise
[L, L, K] mask, whose exponents are column cumsums over exactly the spanned tokens: only those
chunks, a bounded group at a time (recomputed in the backward pass under autograd, so that their
[L, L, K] tensors are never all kept). Inside a torch.compile graph the spread is not read on the
host: torch.cond picks the factorised form for all chunks when every chunk allows it and the
exact form for all chunks otherwise. Positive lam (growth) is legal and exact while its
exponentials stay in range.

Both functions are differentiable by autograd through these torch ops (per-chunk tensors are
O(T (L + K + V)) per lane; the saved chunk states O(T / L * K (K + V))), on any device.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable
from torch.utils.checkpoint import checkpoint

from psmc.runtime.chunkwise import (_MAX_SPREAD, _causal_mask, _ContiguousGrad, _shift_down, _spread_on_device,
                                    _suffix_sums, by_sequence)
from psmc.runtime.delta import _Layout, _triton_wanted
from psmc.runtime.custom_ops import traced
from psmc.runtime.ops import broadcast_shapes
from psmc.runtime.varlen import packed_bounds

__all__ = ["chunk_dplr", "dplr_step"]

# tokens per chunk, measured at (B, T, H, K, V) = (2, 1024, 4, 64, 64) fp32 with per-key decays
# (logsigmoid(normal + 3)), RWKV-7-like a, b, on the 2-core machine, median of 15 runs, L = 16 / 32 / 64:
#   2 threads: forward without autograd 14.8 / 13.8 / 15.9 ms, forward + backward 67.0 / 52.3 / 62.7 ms
#   1 thread:  forward without autograd 34.0 / 31.8 / 32.4 ms, forward + backward 101.7 / 89.3 / 95.0 ms
# (KDA-like gates logsigmoid(normal) ranked the same). 32 wins both modes: the [2L, 2L] blocks
# and the [K, K] chunk transitions grow with L, the sequential loop shrinks.
_CHUNK = 32
_CHUNK_AUTOGRAD = 32

# Chunks too spread for the factorised mask take the exact [L, L, K] elementwise form in groups
# of at most this many bytes per [L, L, K] tensor (and, under autograd, are recomputed in the
# backward pass rather than kept).
_EXACT_BYTES = 8 << 20


def chunk_dplr(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    a: Tensor,
    b: Tensor,
    log_decay: Tensor | None = None,
    *,
    scale: float = 1.0,
    initial_state: Tensor | None = None,
    chunk_size: int | None = None,
    cu_seqlens: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """The DPLR recurrence over all positions at once, in the chunked WY form.

    Computes S_t = diag(exp(lam_t)) S_{t-1} + b_t (a_t^T S_{t-1}) + k_t v_t^T from S_{-1} =
    initial_state (or 0), and o_t = scale * q_t^T S_t.

    Args:
        q, k, a, b: [B, T, *lanes, K]; v: [B, T, *lanes, V]. All leading axes broadcast (size-1
            axes expand: e.g. a per-lane constant vector [1, 1, H, K]).
        log_decay: None (no decay: D = I) or the log decay lam, broadcastable to
            [B, T, *lanes, K] (a last axis of 1: one decay per token and lane). <= 0 for a
            decay, -inf means an exact 0; positive values (growth) are legal.
        scale: multiplies every output.
        initial_state: optional S_{-1}, broadcastable to [B, *lanes, K, V].
        chunk_size: tokens per chunk (shorter inputs use the next power of two >= T); None:
            the measured best (32, with or without autograd).
        cu_seqlens: packed sequences (fla's convention): B = 1, and the N sequences are tokens
            cu_seqlens[n]:cu_seqlens[n + 1] of the time axis, each run from its own initial
            state (initial_state broadcastable to [N, *lanes, K, V]); the final state is then
            [N, *lanes, K, V]. On Triton's device they run in one call (each padded with
            identity tokens to whole chunks, the chain kernels walking each sequence's chunks:
            `_packed`); elsewhere one after another, or in padded groups of similar length
            (chunkwise.by_sequence).

    Returns:
        (o, final_state): o [B, T, *lanes, V] in v's dtype; final_state = S_{T-1}
        [B, *lanes, K, V] in float32 (float64 for float64 inputs; bf16/fp16 inputs are
        computed in float32).
    """
    q, k, v, a, b, log_decay, batch, steps, lanes = _shapes(q, k, v, a, b, log_decay)
    width_k, width_v = q.shape[-1], v.shape[-1]
    inputs = (q, k, v, a, b, log_decay, initial_state)
    wants_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs)
    if cu_seqlens is not None:
        bounds = packed_bounds("chunk_dplr", cu_seqlens, batch, steps)
        if chunk_size is None and _packed_kernels_take(q, k, v, a, b, log_decay, initial_state, bounds, wants_grad):
            return _packed(q, k, v, a, b, log_decay, scale, initial_state, bounds, lanes, wants_grad)

        def one(q, k, v, a, b, g, initial_state):
            return chunk_dplr(q, k, v, a, b, g, scale=scale, initial_state=initial_state, chunk_size=chunk_size)
        return by_sequence(one, bounds, (q, k, v, a, b, log_decay), initial_state, (*lanes, width_k, width_v))
    if not wants_grad and _triton_wanted(q):  # CUDA tensors, inference: psmc.runtime.triton_dplr (an op)
        from psmc.runtime import triton_dplr
        if triton_dplr.takes(q, k, v, a, b, log_decay, initial_state, chunk_size):
            return triton_dplr.triton_chunk_dplr(q, k, v, a, b, log_decay, scale=scale, initial_state=initial_state,
                                                 batch=batch, steps=steps, lanes=lanes)
    grad = torch.compiler.is_compiling() or wants_grad
    if chunk_size is None:
        chunk_size = _CHUNK_AUTOGRAD if grad else _CHUNK
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    wide = any(t is not None and t.dtype == torch.float64 for t in inputs)
    dtype = torch.float64 if wide else torch.float32
    heads = math.prod(lanes)
    state = torch.zeros(batch * heads, width_k, width_v, dtype=dtype, device=q.device)
    if initial_state is not None:
        state = initial_state.to(dtype).expand(batch, *lanes, width_k, width_v).reshape(state.shape)
    if steps == 0:
        return v.new_zeros(batch, 0, *lanes, width_v), state.reshape(batch, *lanes, width_k, width_v)
    length = min(chunk_size, 1 << max(steps - 1, 0).bit_length())
    # (delta's layout, functional form: grad=True packs with out-of-place ops whatever the mode)
    layout = _Layout(batch, steps, lanes, heads, length, -(-steps // length), dtype, True)
    o, state = _chunks(layout, q, k, v, a, b, log_decay, state, scale, grad)
    return layout.unpack(o, width_v, v.dtype), state.reshape(batch, *lanes, width_k, width_v)


def dplr_step(
    state: Tensor | None,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    a: Tensor,
    b: Tensor,
    log_decay: Tensor | None = None,
    *,
    scale: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """One token of the DPLR recurrence in O(K V), never forming the K x K transition.

    Args:
        state: the state before the token, [B, *lanes, K, V] (None: zeros); q, k, a, b:
            [B, *lanes, K]; v: [B, *lanes, V]; log_decay: None or broadcastable to
            [B, *lanes, K] (a last axis of 1: a scalar decay). Leading axes broadcast.
        scale: multiplies the output.

    Returns:
        (o, new_state): new_state = exp(lam) (.) S + b (a^T S) + k v^T [B, *lanes, K, V] in
        float32 (float64 if any input is float64); o = scale * q^T new_state [B, *lanes, V] in
        v's dtype.
    """
    if _triton_wanted(q):  # CUDA tensors: one Triton kernel (psmc.runtime.triton_dplr_step)
        from psmc.runtime import triton_dplr_step
        if triton_dplr_step.takes(state, q, k, v, a, b, log_decay):
            return triton_dplr_step.triton_dplr_step(state, q, k, v, a, b, log_decay, scale=scale)
    tensors = [t for t in (state, q, k, v, a, b, log_decay) if t is not None]
    dtype = torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
    out_dtype = v.dtype
    vectors = [q, k, a, b, v] + ([] if log_decay is None else [log_decay])
    try:
        lead = broadcast_shapes(*(t.shape[:-1] for t in vectors),
                                *(() if state is None else (state.shape[:-2],)))
    except RuntimeError:
        shown = ", ".join(f"{n} {tuple(t.shape)}" for n, t in zip(("q", "k", "a", "b", "v", "log_decay"), vectors))
        raise ValueError(f"dplr_step: leading axes do not broadcast: {shown}"
                         + ("" if state is None else f", state {tuple(state.shape)}")) from None
    width_k, width_v = q.shape[-1], v.shape[-1]
    q, k, v, a, b = (t.to(dtype) for t in (q, k, v, a, b))
    write = k.unsqueeze(-1) * v.unsqueeze(-2)  # k v^T
    if state is None:  # a stream's first token: nothing to decay or read
        new = write.expand(*lead, width_k, width_v)
    else:
        S = state.to(dtype)
        read = (a.unsqueeze(-2) @ S).squeeze(-2)  # a^T S  [.., V]
        kept = S if log_decay is None else torch.exp(log_decay.to(dtype)).unsqueeze(-1) * S
        new = kept + b.unsqueeze(-1) * read.unsqueeze(-2) + write
        new = new.expand(*lead, width_k, width_v)
    if not new.is_contiguous():
        new = new.contiguous()
    o = (q.unsqueeze(-2) @ new).squeeze(-2)
    if scale != 1.0:
        o = o * scale
    return o.to(out_dtype), new


def _packed_kernels_take(q, k, v, a, b, log_decay, initial_state, bounds: list, grad: bool) -> bool:
    """Whether packed sequences run in one call on the Triton kernels (`_packed`): Triton's device,
    not under tracing, some tokens, and the kernels of that mode take the inputs (inference:
    `triton_dplr.takes`; training: float32 terms and `triton_dplr.chain_takes`)."""
    if torch.compiler.is_compiling() or bounds[-1] == 0 or not _triton_wanted(q):
        return False
    from psmc.runtime import triton_dplr
    tensors = [t for t in (q, k, v, a, b, log_decay, initial_state) if t is not None]
    if not grad:
        return triton_dplr.takes(q, k, v, a, b, log_decay, initial_state, None)
    return all(t.dtype != torch.float64 for t in tensors) and triton_dplr.chain_takes(_CHUNK_AUTOGRAD, q.shape[-1])


def _packed(q: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor, log_decay: Tensor | None, scale: float,
            initial_state: Tensor | None, bounds: list, lanes: tuple, grad: bool) -> tuple[Tensor, Tensor]:
    """Packed sequences (B = 1) in one call on the kernels: each sequence padded with zero tokens
    (the identity map) to whole chunks, all of them one padded row in which no chunk crosses a
    sequence end, and the chain walking each sequence's chunks from its own initial state
    (`cu_chunks`). Outputs [1, total_T, *lanes, V] in the packed order, final states
    [N, *lanes, K, V] fp32. Differentiable (an index_copy in, an index_select out)."""
    from psmc.runtime import triton_dplr
    device = q.device
    length = _CHUNK_AUTOGRAD if grad else triton_dplr.CHUNK
    n, total = len(bounds) - 1, bounds[-1]
    sizes = [hi - lo for lo, hi in zip(bounds, bounds[1:])]
    firsts = [0]  # each sequence's first chunk (from the host's bounds: no device read)
    for size in sizes:
        firsts.append(firsts[-1] + -(-size // length))
    count = firsts[-1]
    cu_chunks = torch.tensor(firsts, dtype=torch.int32, device=device)
    # where each packed token sits in the padded row: its sequence's first chunk, plus its offset
    sequence = torch.repeat_interleave(torch.arange(n, device=device), torch.tensor(sizes, device=device),
                                       output_size=total)
    shift = torch.tensor([first * length - lo for first, lo in zip(firsts, bounds)], device=device)
    place = torch.arange(total, device=device) + shift[sequence]

    def padded(x):
        if x is None:
            return None
        x = x.expand(1, total, *x.shape[2:])  # (an input shared by every token: zero past each end too)
        return x.new_zeros(1, count * length, *x.shape[2:]).index_copy(1, place, x)
    q, k, v, a, b, log_decay = (padded(x) for x in (q, k, v, a, b, log_decay))
    width_k, width_v = q.shape[-1], v.shape[-1]
    if not grad:
        o, final = triton_dplr.triton_chunk_dplr(q, k, v, a, b, log_decay, scale=scale, initial_state=initial_state,
                                                 batch=1, steps=count * length, lanes=lanes, cu_chunks=cu_chunks)
        return o.index_select(1, place), final
    heads = math.prod(lanes)
    state = torch.zeros(n * heads, width_k, width_v, dtype=torch.float32, device=device)
    if initial_state is not None:
        state = initial_state.to(torch.float32).expand(n, *lanes, width_k, width_v).reshape(state.shape)
    layout = _Layout(1, count * length, lanes, heads, length, count, torch.float32, True)
    o, state = _chunks(layout, q, k, v, a, b, log_decay, state, scale, True, cu_chunks)
    return layout.unpack(o, width_v, v.dtype).index_select(1, place), state.reshape(n, *lanes, width_k, width_v)


def _chunks(layout: _Layout, q: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor, lam: Tensor | None,
            state: Tensor, scale: float, grad: bool, cu_chunks: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The outputs [count * BH, L, V] of every chunk entered with `state` [BH, K, V], and the
    state that leaves the last one (see the module docstring for the algebra): the chunk-local
    terms for all chunks at once (`_terms`), then the chunks in order: under autograd (or in a
    graph) as the op `_chain`, one node each way, which runs on two kernels on Triton's device
    (float32, K <= triton_dplr.MAX_K, chunks of 16 or 32 tokens) and elsewhere loops over the
    chunks; without autograd an in-place loop. cu_chunks (under autograd): packed sequences
    (`_packed`), sequence n the chunks cu_chunks[n] .. cu_chunks[n + 1] - 1, `state` and the
    final state a row per (sequence, lane)."""
    terms = _terms(layout, q, k, v, a, b, lam, grad)
    count, heads = layout.count, layout.batch * layout.heads
    width_k, width_v = q.shape[-1], v.shape[-1]
    chunks = count * heads
    b_out = terms.cols_out.view(chunks, 2, layout.length, width_k).unbind(1)[0]  # Btil
    free = torch.cat([terms.u0, terms.vc], dim=1)  # [U0; V]  [chunks, 2L, V]
    if grad:  # one graph node each way (psmc::dplr_chain): the kernels on Triton's device, else a loop
        written = torch.bmm(terms.cols_out.transpose(-1, -2), free)  # N = Btil^T U0 + Ktil^T V  [chunks, K, V]
        operands = v.dtype if v.dtype in (torch.bfloat16, torch.float16) else torch.float32
        entering, state = _Chain.apply(terms.w, b_out, written, terms.gate, state, operands,
                                       _chain_kernels_take(layout, q), cu_chunks)
    else:  # N_c written where S_{c+1} goes, then P_c S_c added in place: no copy in the loop
        transition = _transitions(terms.w, b_out, terms.gate, count)
        entering = torch.empty(count + 1, heads, width_k, width_v, dtype=layout.dtype, device=q.device)
        entering[0] = state
        torch.bmm(terms.cols_out.transpose(-1, -2), free, out=entering[1:].view(chunks, width_k, width_v))
        for c in range(count):
            entering[c + 1].baddbmm_(transition[c], entering[c])
        state, entering = entering[count].clone(), entering[:count]
    o = torch.baddbmm(terms.base, terms.q_eff, entering.view(chunks, width_k, width_v), beta=scale, alpha=scale)
    return o, state


def _transitions(w: Tensor, b_out: Tensor, gate: Tensor, count: int) -> Tensor:
    """Every chunk's transition P = diag(e^{G_L}) + Btil^T W, [count, BH, K, K]."""
    transition = torch.bmm(b_out.transpose(-1, -2), w)
    transition.diagonal(dim1=-2, dim2=-1).add_(gate)
    return transition.view(count, -1, *transition.shape[1:])


def _launch_chain(w: Tensor, b_out: Tensor, written: Tensor, gate: Tensor, state: Tensor, operands: torch.dtype,
                  kernels: bool, cu_chunks: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The chunks in order, S_{c+1} = (diag(gate_c) + Btil_c^T W_c) S_c + N_c, from the chunk-major
    terms (chunk c of lane row h at c * BH + h: W, Btil [chunks, L, K], N [chunks, K, V], e^{G_L}
    [chunks, K]) and the entering state [BH, K, V]: (the state entering every chunk
    [count, BH, K, V], the final state [BH, K, V]). `kernels`: on psmc.runtime.triton_dplr's
    (their dots on `operands`), else a loop of one product per chunk. `_Chain` gives it its
    gradient; under torch.compile it is the op psmc::dplr_chain, one node. cu_chunks:
    packed sequences, sequence n the chunks cu_chunks[n] .. cu_chunks[n + 1] - 1, `state` and
    the final state [N * BH, K, V], a row per (sequence, lane)."""
    if kernels:
        from psmc.runtime import triton_dplr
        return triton_dplr.states(w, b_out, written, gate, state, operands, cu_chunks)
    spans, lanes = _spans(cu_chunks, w.shape[0], state.shape[0])
    transition = _transitions(w, b_out, gate, w.shape[0] // lanes)
    entering = state.new_empty(w.shape[0] // lanes, lanes, *state.shape[1:])
    finals = []
    for n, (first, last) in enumerate(spans):
        S = state[n * lanes:(n + 1) * lanes]
        for c in range(first, last):
            entering[c] = S
            S = torch.baddbmm(written[c * lanes:(c + 1) * lanes], transition[c], S)
        finals.append(S)
    return entering, torch.cat(finals) if len(finals) > 1 else finals[0].clone()


_chain_op = torch.library.custom_op("psmc::dplr_chain", _launch_chain, mutates_args=())


def _spans(cu_chunks: Tensor | None, chunks: int, rows: int) -> tuple[list, int]:
    """([(first chunk, one past the last)] per sequence, the lanes a chunk index spans)."""
    if cu_chunks is None:
        return [(0, chunks // rows)], rows
    cu = cu_chunks.tolist()
    return list(zip(cu, cu[1:])), rows // (len(cu) - 1)


@_chain_op.register_fake
def _chain_fake(w, b_out, written, gate, state, operands, kernels, cu_chunks=None):
    lanes = state.shape[0] if cu_chunks is None else state.shape[0] // (cu_chunks.shape[0] - 1)
    return state.new_empty(w.shape[0] // lanes, lanes, *state.shape[1:]), state.new_empty(state.shape)


def _launch_chain_backward(w: Tensor, b_out: Tensor, gate: Tensor, entering: Tensor, d_entering: Tensor,
                           d_final: Tensor, operands: torch.dtype, kernels: bool,
                           cu_chunks: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The chain's transpose in reverse, dS <- d_entering[c] + P_c^T dS from dS = d_final: (the
    gradient of the state leaving every chunk [count, BH, K, V], the entering state's)."""
    if kernels:
        from psmc.runtime import triton_dplr
        return triton_dplr.dstates(w, b_out, gate, d_entering, d_final, operands, cu_chunks)
    spans, lanes = _spans(cu_chunks, w.shape[0], d_final.shape[0])
    transition = _transitions(w, b_out, gate, entering.shape[0]).transpose(-1, -2)
    leaving = torch.empty_like(entering)
    starts = []
    for n, (first, last) in enumerate(spans):
        d_state = d_final[n * lanes:(n + 1) * lanes]
        for c in reversed(range(first, last)):
            leaving[c] = d_state
            d_state = torch.baddbmm(d_entering[c], transition[c], d_state)
        starts.append(d_state)
    return leaving, torch.cat(starts) if len(starts) > 1 else starts[0].clone()


_chain_backward_op = torch.library.custom_op("psmc::dplr_chain_backward", _launch_chain_backward, mutates_args=())


@_chain_backward_op.register_fake
def _chain_backward_fake(w, b_out, gate, entering, d_entering, d_final, operands, kernels, cu_chunks=None):
    return torch.empty_like(entering), torch.empty_like(d_final)


_chain, _chain_backward = traced(_chain_op, _launch_chain), traced(_chain_backward_op, _launch_chain_backward)


class _Chain(torch.autograd.Function):
    """`_launch_chain` with its gradient (`_launch_chain_backward`, then batched products).
    Under torch.compile the two are the ops psmc::dplr_chain and psmc::dplr_chain_backward
    (psmc.runtime.custom_ops)."""

    @staticmethod
    def forward(ctx, w, b_out, written, gate, state, operands, kernels, cu_chunks):
        entering, final = _chain(w, b_out, written, gate, state, operands, kernels, cu_chunks)
        ctx.save_for_backward(w, b_out, gate, entering)
        ctx.operands, ctx.kernels, ctx.cu_chunks, ctx.rows = operands, kernels, cu_chunks, state.shape[0]
        return entering, final

    @staticmethod
    @once_differentiable  # the chain's backward is not differentiable again: a clear error, not zeros
    def backward(ctx, d_entering, d_final):
        """Given the entering states S_c and the leaving states' gradients dSn_c, every chunk's
        gradients are independent batched products: dW = (Btil dSn) S^T, dBtil = (W S) dSn^T,
        dN = dSn, d e^{G_L} = rowsum(S * dSn)."""
        w, b_out, gate, entering = ctx.saved_tensors
        d_entering = torch.zeros_like(entering) if d_entering is None else d_entering.contiguous()
        if d_final is None:
            d_final = entering.new_zeros(ctx.rows, *entering.shape[2:])
        leaving, d_state = _chain_backward(w, b_out, gate, entering, d_entering, d_final.contiguous(), ctx.operands,
                                           ctx.kernels, ctx.cu_chunks)
        S, dSn = entering.flatten(0, 1), leaving.flatten(0, 1)
        d_w = torch.bmm(torch.bmm(b_out, dSn), S.transpose(-1, -2))
        d_b_out = torch.bmm(torch.bmm(w, S), dSn.transpose(-1, -2))
        return d_w, d_b_out, dSn, (S * dSn).sum(-1), d_state, None, None, None


def _chain_kernels_take(layout: _Layout, q: Tensor) -> bool:
    """Whether training's chain runs on psmc.runtime.triton_dplr's kernels: Triton's device,
    float32 terms, chunks of 16 or 32 tokens, K <= its MAX_K (`chain_takes`)."""
    if layout.dtype != torch.float32 or layout.batch * layout.heads == 0 or not _triton_wanted(q):
        return False
    from psmc.runtime import triton_dplr
    return triton_dplr.chain_takes(layout.length, q.shape[-1])


class _Terms(NamedTuple):
    """A chunk's coefficients of the state that enters it, for all chunks at once (chunk-major:
    chunk c of lane row h at c * BH + h): U = W S + U0, O = scale (Qeff S + base),
    S' = diag(gate) S + Btil^T U + Ktil^T V."""
    w: Tensor  # W = (I - A_ab)^-1 Atil  [chunks, L, K]
    u0: Tensor  # U0 = (I - A_ab)^-1 A_ak V  [chunks, L, V]
    q_eff: Tensor  # Qeff = Qtil + A_qb W  [chunks, L, K]
    base: Tensor  # the outputs' chunk-local part A_qb U0 + A_qk V  [chunks, L, V]
    cols_out: Tensor  # [Btil; Ktil]  [chunks, 2L, K]
    vc: Tensor  # V  [chunks, L, V]
    gate: Tensor  # e^{G_L}  [chunks, K]


def _terms(layout: _Layout, q: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor, lam: Tensor | None,
           grad: bool) -> _Terms:
    """Every chunk's `_Terms`. Per chunk the rows [a; q] and the columns [b; k] are packed as one
    [2L, K] tensor each (one copy from the inputs), so that one product gives the four L x L
    matrices; everything is linear in q, so `scale` is left to the chain."""
    count, length = layout.count, layout.length
    width_k, width_v = q.shape[-1], v.shape[-1]
    heads = layout.batch * layout.heads
    chunks = count * heads
    dtype, device = layout.dtype, q.device

    def pair(top: Tensor, bottom: Tensor) -> Tensor:
        """[top; bottom] per chunk, [chunks, 2L, K], copied once from the inputs."""
        both = torch.empty(count, layout.batch, layout.heads, 2 * length, width_k, dtype=dtype, device=device)
        both[..., :length, :] = layout.pack(top, (width_k,))
        both[..., length:, :] = layout.pack(bottom, (width_k,))
        return both.view(chunks, 2 * length, width_k)

    rows, cols = pair(a, q), pair(b, k)
    vc = layout.pack(v, (width_v,)).reshape(chunks, length, width_v)
    if lam is None:
        g = exponents = None
        rows_in, cols_out = rows, cols
        gate = torch.ones(chunks, width_k, dtype=dtype, device=device)
    else:
        g = layout.pack(lam, (width_k,)).reshape(chunks, length, width_k)  # (a last axis of 1: over the keys)
        padded = F.pad(g, (0, 0, 1, 1))  # 0, g_0 .. g_{L-1}, 0
        exponents = torch.cumsum(padded[:, :-1], dim=1)  # [0, G_0 .. G_{L-1}]: Gex_t = [t], G_t = [t + 1]
        # e^{G_L - G_s}: the exact suffix sums, sum of g over r > s
        to_end = torch.exp(torch.cumsum(padded[:, 1:].flip(1), dim=1).flip(1)[:, 1:])
        decayed = torch.exp(exponents)
        # [Atil; Qtil]: a decayed from the chunk start to just before t (Gex), q to t (G): the two
        # length-L windows of e^[0, G] (a view)
        windows = decayed.unfold(1, length, 1).transpose(-1, -2)  # [chunks, 2, L, K]
        rows_in = (rows.view(chunks, 2, length, width_k) * windows).view(chunks, 2 * length, width_k)
        # [Btil; Ktil]: b and k decayed from s to the chunk end
        cols_out = (cols.view(chunks, 2, length, width_k) * to_end[:, None]).view(chunks, 2 * length, width_k)
        gate = decayed[:, -1]  # e^{G_L}  [chunks, K]
    scores = _scores(rows, cols, g, exponents, rows_in, cols_out, grad)
    # the blocks as views (unbound: a slice's gradient would be a full-size zero tensor each)
    (ab, ak), (qb, qk) = (block.unbind(2) for block in scores.view(chunks, 2, length, 2, length).unbind(1))
    a_in, q_in = rows_in.view(chunks, 2, length, width_k).unbind(1)  # Atil, Qtil
    # (I - A_ab)^-1: solve_triangular reads only the strict lower triangle of -A_ab (unit diagonal);
    # an inverse and one product beat one solve with K + V right-hand sides (as in delta.py)
    eye = torch.eye(length, dtype=dtype, device=device)
    lower = -ab
    inverse = torch.linalg.solve_triangular(lower, eye.expand_as(lower), upper=False, unitriangular=True)
    u0 = torch.bmm(inverse, torch.bmm(ak, vc))  # (I - A_ab)^-1 A_ak V
    w = torch.bmm(inverse, a_in)  # (I - A_ab)^-1 Atil
    base = torch.baddbmm(torch.bmm(qk, vc), qb, u0)  # A_qb U0 + A_qk V
    q_eff = torch.baddbmm(q_in, qb, w)  # Qtil + A_qb W
    return _Terms(w, u0, q_eff, base, cols_out, vc, gate)


def _scores(rows: Tensor, cols: Tensor, g: Tensor | None, exponents: Tensor | None, rows_in: Tensor,
            cols_out: Tensor, grad: bool) -> Tensor:
    """[[A_ab, A_ak], [A_qb, A_qk]] [chunks, 2L, 2L] from the chunk-major rows [a; q] and columns
    [b; k] [chunks, 2L, K], the log decays g [chunks, L, K] (None: no decay), their cumsums
    exponents = [0, G_0 .. G_{L-1}], the decayed rows [Atil; Qtil] and columns [Btil; Ktil]."""
    length = rows.shape[1] // 2
    if g is None:
        return _masked(torch.bmm(rows, cols.transpose(-1, -2)), length)
    if torch.compiler.is_compiling():
        # no host read in a graph: one form for all chunks, chosen on the device. The branches
        # compute everything from the chunk views (see chunkwise._decayed_terms on cond operands)
        spread, _ = _spread_on_device((exponents,), dim=1, include_zero=True)
        return torch.cond(spread <= _MAX_SPREAD, _factorised_branch, _exact_branch, (rows, cols, g))
    spread, middle = _spread_on_device((exponents,), dim=1, include_zero=True)
    # the factor that moves the columns' reference from the chunk end to the mid-range: m - G_L
    shift = middle - exponents[:, -1:]
    if float(spread) <= _MAX_SPREAD:  # (NaN is not)
        return _factorised(rows_in, cols_out, middle, shift)
    # the chunks too spread to factorise: exact, a group at a time; the factorised form runs on
    # all chunks with those chunks' references zeroed (finite, and replaced)
    low, high = exponents.amin(dim=1).clamp(max=0.0), exponents.amax(dim=1).clamp(min=0.0)
    bad = ~(((high - low) * 0.5).amax(dim=-1) <= _MAX_SPREAD)  # [chunks]
    which = bad.nonzero().squeeze(1)
    bad = bad[:, None, None]
    scores = _factorised(rows_in, cols_out, middle.masked_fill(bad, 0.0), shift.masked_fill(bad, 0.0))
    group = max(1, _EXACT_BYTES // (length * length * g.shape[-1] * g.element_size()))
    exact = []
    for first in range(0, which.numel(), group):
        pieces = tuple(x.index_select(0, which[first:first + group]) for x in (rows, cols, g))
        if grad:  # recomputed in the backward pass: the [n, L, L, K] tensors are not kept
            exact.append(checkpoint(_exact, *pieces, use_reentrant=False))
        else:
            exact.append(_exact(*pieces))
    return scores.index_copy(0, which, torch.cat(exact))


def _masked(scores: Tensor, length: int) -> Tensor:
    """scores [chunks, 2L, 2L] with the entries outside the support set to 0: the a rows see the
    tokens strictly before them, the q rows the tokens up to and including them. A fill, never a
    product: a factorised entry above the diagonal may be inf."""
    strict, inclusive = _causal_mask(length, True, scores.device), _causal_mask(length, False, scores.device)
    keep = torch.cat([strict.repeat(1, 2), inclusive.repeat(1, 2)], dim=0)
    if torch.compiler.is_compiling():
        return scores.masked_fill(~keep, 0.0)
    return scores.masked_fill_(~keep, 0.0)


def _factorised(rows_in: Tensor, cols_out: Tensor, middle: Tensor, shift: Tensor) -> Tensor:
    """The four matrices as one product, e^{R_t - G_s} = e^{R_t - m} e^{m - G_s} around the
    mid-range m [chunks, 1, K] of the chunk's exponents (R = Gex for the a rows, G for the q
    rows): the decayed rows times e^{-m}, the decayed columns times e^{m - G_L} (`shift`). In a
    chunk whose exponents spread at most 2 * _MAX_SPREAD both factors are bounded by
    e^{_MAX_SPREAD} and the decayed operands by e^{2 _MAX_SPREAD}: normal floats, whose
    products keep full relative precision."""
    scores = torch.bmm(rows_in * torch.exp(-middle), (cols_out * torch.exp(shift)).transpose(-1, -2))
    return _masked(scores, rows_in.shape[1] // 2)


def _exact(rows: Tensor, cols: Tensor, g: Tensor) -> Tensor:
    """The four matrices with the exact [n, L, L, K] mask from the undecayed rows [a; q] and
    columns [b; k]: span[t, s] = sum of g over s < r <= t is a cumsum down each column (exact for
    any decay, -inf included); the a rows take span[t - 1, s] (s < r < t)."""
    count, length = g.shape[0], g.shape[1]
    later = _causal_mask(length, True, g.device)[..., None]  # t > s
    span = torch.cumsum(torch.where(later, g[:, :, None, :], 0.0), dim=1)
    inclusive = torch.exp(span.masked_fill(~_causal_mask(length, False, g.device)[..., None], -torch.inf))
    strict = torch.exp(_shift_down(span, dim=1).masked_fill(~later, -torch.inf))
    weights = torch.stack([strict, inclusive], dim=1)  # [n, 2, t, s, K]
    out = torch.einsum("nitsk,njsk->nitjs", rows.view(count, 2, length, 1, -1) * weights,
                       cols.view(count, 2, length, -1))
    return out.reshape(count, 2 * length, 2 * length)


def _factorised_branch(rows: Tensor, cols: Tensor, g: Tensor) -> Tensor:
    rows, cols, g = (_ContiguousGrad.apply(x) for x in (rows, cols, g))
    count, length, width = g.shape
    from_start = torch.cumsum(g, dim=1)
    _, middle = _spread_on_device((from_start,), dim=1, include_zero=True)
    decayed = torch.exp(torch.cat([_shift_down(from_start, dim=1), from_start], dim=1))
    cols_out = (cols.view(count, 2, length, width) * torch.exp(_suffix_sums(g, dim=1))[:, None])
    return _factorised(rows * decayed, cols_out.view(count, 2 * length, width), middle,
                       middle - from_start[:, -1:])


def _exact_branch(rows: Tensor, cols: Tensor, g: Tensor) -> Tensor:
    rows, cols, g = (_ContiguousGrad.apply(x) for x in (rows, cols, g))
    return _exact(rows, cols, g)


_NAMES = ("q", "k", "v", "a", "b", "log_decay")


def _shapes(q: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor, log_decay: Tensor | None):
    """The inputs with leading size-1 axes added to one rank (views), and the broadcast batch,
    time and lane shape."""
    tensors = dict(zip(_NAMES, (q, k, v, a, b, log_decay)))
    present = {n: t for n, t in tensors.items() if t is not None}
    shown = lambda: ", ".join(f"{n} {tuple(t.shape)}" for n, t in present.items())  # noqa: E731
    width_k = q.shape[-1] if q.dim() else 0
    if any(t.dim() < 1 for t in present.values()) or any(t.shape[-1] != width_k for t in (k, a, b)) or \
            (log_decay is not None and log_decay.shape[-1] not in (1, width_k)):
        raise ValueError(f"chunk_dplr: q, k, a, b must end in the same K and log_decay in K or 1: {shown()}")
    try:
        lead = broadcast_shapes(*(t.shape[:-1] for t in present.values()))
    except RuntimeError:
        raise ValueError(f"chunk_dplr: leading axes do not broadcast to [B, T, *lanes]: {shown()}") from None
    if len(lead) < 2:
        raise ValueError(f"chunk_dplr: inputs need [B, T, *lanes, ...] axes: {shown()}")
    rank = len(lead) + 1
    out = [None if t is None else t.reshape((1,) * (rank - t.dim()) + tuple(t.shape)) for t in tensors.values()]
    return (*out, lead[0], lead[1], tuple(lead[2:]))
