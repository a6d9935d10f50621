"""The delta rule (DeltaNet) and the gated delta rule, without a K x K transition in sight.

    S_t = g_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,      o_t = scale * q_t @ S_t

S is K x V; g_t = exp(log_decay_t) is a scalar gate per (batch, time, lane) (1 when log_decay
is None: the plain delta rule). The generic matrix-affine scan composes the K x K transitions
(O(K^3) per combine, K^2 + K V floats of state); this module never forms them.

`delta_rule_step` is one token in O(K V): S <- g S + beta k (v - g k^T S)^T, the same as
g (S - beta k (k^T S)) + beta k v^T.

`chunk_delta_rule` is the parallel pass in the chunked WY/UT form (Yang et al. 2024,
"Parallelizing Linear Transformers with the Delta Rule over Sequence Length"; the gated form as
in Yang, Kautz & Hatamizadeh 2025). Inside a chunk of L tokens with entering state S_0, let
gamma_i be the product of the gates from the chunk start through token i. The product of the
chunk's transitions up to token t is gamma_t (I - sum_{i<=t} k_i w_i^T / gamma_i) and the
state is

    S_t = gamma_t S_0 + sum_{i<=t} (gamma_t / gamma_i) k_i (u_i - S_0^T w_i)^T

where W = A^-1 diag(beta gamma) K and U = A^-1 diag(beta) V share one unit lower triangular
A = I + strict_tril(diag(beta) (K K^T (.) Gamma)), Gamma_ij = gamma_i / gamma_j: one
triangular solve per chunk (torch.linalg.solve_triangular). Hence, per chunk,

    O     = (Q (.) gamma) S_0 + tril(Q K^T (.) Gamma) (U - W S_0)
    S_L   = gamma_L S_0 + (K (.) gamma_L / gamma)^T (U - W S_0)

Everything but the S_0 terms is computed for all chunks at once (batched matmuls); the chunks
are then chained by S_{c+1} = M_c S_c + D_c (one K x K by K x V matmul per chunk, M_c = gamma_L
I - K_d^T W, D_c = K_d^T U) and the outputs take one more batched matmul with the entering
states.

Numerics, as in psmc/runtime/chunkwise.py: gates arrive as LOG gates and every exponent is a
sum of log gates over exactly the tokens it spans (a cumsum from the chunk start, a suffix sum
to its end, or a column cumsum of the L x L span), never a difference of two cumsums, so with
gates <= 1 every exponential is of a value <= 0: nothing overflows and a gate of 0 (log -inf)
gives an exact 0. Padding tokens (T not a multiple of L) have k = v = beta = 0 and log gate 0:
the identity map.

Both functions are differentiable by autograd through these torch ops (the per-chunk tensors
are O(T (L + K + V)) per lane; the saved chunk states O(T / L * K V)).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from psmc.runtime.ops import broadcast_shapes

__all__ = ["chunk_delta_rule", "delta_rule_step"]

# Chunks are processed in groups whose [G, BH, L, L] operands stay below this many bytes per
# torch thread (a core's L2 share), as in psmc/runtime/chunkwise.py.
_GROUP_BYTES = 512 * 1024


def chunk_delta_rule(
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
    """The (gated) delta rule over all positions at once, in the chunked WY/UT form.

    Args:
        q, k: [B, T, *lanes, K]; v: [B, T, *lanes, V]; beta: [B, T, *lanes] (the write
            strength); log_decay: None (plain delta rule) or [B, T, *lanes], the log of the
            gate g_t (<= 0 for a decay; -inf means 0). Lane axes may have size 1 in some
            inputs and are broadcast; batch and time axes must agree (time may be 1 for beta
            and log_decay: a per-sequence constant).
        scale: multiplies every output (e.g. K ** -0.5).
        initial_state: optional S_{-1}, broadcastable to [B, *lanes, K, V].
        chunk_size: tokens per chunk (shorter inputs use the next power of two >= T).

    Returns:
        (o, final_state): o [B, T, *lanes, V] in v's dtype; final_state = S_{T-1}
        [B, *lanes, K, V] in float32 (float64 for float64 inputs).
    """
    if q.is_cuda:
        try:
            from psmc.runtime.triton_delta import triton_chunk_delta_rule
        except ImportError:
            pass
        else:
            return triton_chunk_delta_rule(q, k, v, beta, log_decay, scale=scale, initial_state=initial_state,
                                           chunk_size=chunk_size)
    return _chunk_delta_rule_torch(q, k, v, beta, log_decay, scale, initial_state, chunk_size)


def _chunk_delta_rule_torch(q: Tensor, k: Tensor, v: Tensor, beta: Tensor, log_decay: Tensor | None,
                            scale: float, initial_state: Tensor | None, chunk_size: int) -> tuple[Tensor, Tensor]:
    """chunk_delta_rule as torch ops (differentiable by autograd; any device): the CPU path, and
    the Triton path's fallback for training, float64 and shapes its kernels do not take."""
    batch, steps, width_k, width_v = q.shape[0], q.shape[1], q.shape[-1], v.shape[-1]
    lanes = _lanes(q, k, v, beta, log_decay)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    length = min(chunk_size, 1 << max(steps - 1, 0).bit_length())
    count = -(-steps // length)
    heads = math.prod(lanes)

    def chunks(x: Tensor, width: tuple[int, ...], first: int, number: int) -> Tensor:
        """Chunks first .. first + number - 1 of x [B, T, *lanes, *width] as [G, B*H, L, *width]
        (one copy; zero-padded past T; a size-1 time axis broadcasts)."""
        start, stop = first * length, (first + number) * length
        present = min(stop, steps) - start
        x = x if x.shape[1] == 1 else x[:, start:start + present]
        x = x.to(dtype).expand(batch, present, *lanes, *width).reshape(batch, present, heads, *width)
        if present < stop - start:
            x = F.pad(x, (0, 0) * (len(width) + 1) + (0, stop - start - present))
        x = x.reshape(batch, number, length, heads, *width).permute(1, 0, 3, 2, *range(4, 4 + len(width)))
        return x.reshape(number, batch * heads, length, *width)

    state = torch.zeros(batch * heads, width_k, width_v, dtype=dtype, device=q.device)
    if initial_state is not None:
        state = initial_state.to(dtype).expand(batch, *lanes, width_k, width_v).reshape(state.shape)
    # groups of chunks keep the [G, BH, L, L] operands cache-resident (as in chunkwise.py)
    group = max(1, _GROUP_BYTES * torch.get_num_threads() // (batch * heads * length * length * dtype.itemsize))
    if steps == 0:
        return v.new_zeros(batch, 0, *lanes, width_v), state.reshape(batch, *lanes, width_k, width_v)
    pieces = []
    for first in range(0, count, group):
        number = min(group, count - first)
        keys = chunks(k, (width_k,), first, number)
        o, state = _chunk_group(
            chunks(q, (width_k,), first, number), keys, chunks(v, (width_v,), first, number),
            chunks(beta, (), first, number), None if log_decay is None else chunks(log_decay, (), first, number),
            state, scale)
        pieces.append(o.reshape(number, batch, heads, length, width_v).permute(1, 0, 3, 2, 4))  # [B, G, L, H, V]
    o = torch.cat(pieces, dim=1) if len(pieces) > 1 else pieces[0].contiguous()
    o = o.reshape(batch, count * length, *lanes, width_v)[:, :steps]
    return o.to(v.dtype), state.reshape(batch, *lanes, width_k, width_v)


def delta_rule_step(
    S: Tensor | None,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    beta: Tensor,
    log_decay: Tensor | None = None,
    *,
    scale: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """One token of the (gated) delta rule in O(K V), never forming the K x K transition.

    Args:
        S: the state before the token, [B, *lanes, K, V] (None: zeros); q, k: [B, *lanes, K]; v: [B, *lanes, V];
            beta, log_decay (or None): [B, *lanes]. Lane axes broadcast.
        scale: multiplies the output.

    Returns:
        (o, new_S): o = scale * q @ new_S [B, *lanes, V] in v's dtype; new_S =
        g (S - beta k (k^T S)) + beta k v^T in S's dtype (at least float32).
    """
    if S is None:  # a stream's first token
        S = q.new_zeros(*torch.broadcast_shapes(q.shape, k.shape), v.shape[-1])
    dtype = torch.promote_types(S.dtype, torch.float32)
    out_dtype = v.dtype
    S = S.to(dtype)
    q, k, v, beta = q.to(dtype), k.to(dtype), v.to(dtype), beta.to(dtype)[..., None]
    read = (k.unsqueeze(-2) @ S).squeeze(-2)  # k^T S  [.., V]
    if log_decay is None:
        new_S = S + (beta * k).unsqueeze(-1) * (v - read).unsqueeze(-2)
    else:
        gate = torch.exp(log_decay.to(dtype))[..., None]
        new_S = gate[..., None] * S + (beta * k).unsqueeze(-1) * (v - gate * read).unsqueeze(-2)
    o = (q.unsqueeze(-2) @ new_S).squeeze(-2)
    if scale != 1.0:
        o = o * scale
    return o.to(out_dtype), new_S


def _chunk_group(q: Tensor, k: Tensor, v: Tensor, beta: Tensor, g: Tensor | None, state: Tensor,
                 scale: float) -> tuple[Tensor, Tensor]:
    """scale * outputs [G * BH, L, V] of G consecutive chunks entered with `state` [BH, K, V],
    and the state that leaves them; q, k [G, BH, L, K], v [G, BH, L, V], beta and g [G, BH, L]."""
    chunks, heads, length = q.shape[:3]
    causal = torch.ones(length, length, dtype=torch.bool, device=q.device).tril()
    flat = lambda x: x.flatten(0, 1)  # noqa: E731  [G * BH, ...] for bmm
    keys, queries = flat(k), flat(q)
    scores, attn = keys @ keys.transpose(-1, -2), queries @ keys.transpose(-1, -2)  # K K^T, Q K^T
    if g is not None:
        g = flat(g)
        from_start = torch.cumsum(g, dim=-1)  # log gamma_i
        gamma = torch.exp(from_start)[..., None]
        # span[i, j] = sum of g over j < r <= i: a cumsum down each column, exact for any gates
        span = torch.cumsum(torch.where(causal.tril(-1), g[..., :, None], 0.0), dim=-2)
        ratio = span.masked_fill_(~causal, -torch.inf).exp_()  # Gamma_ij = gamma_i / gamma_j, 0 above
        scores, attn = scores * ratio, attn * ratio
        queries = queries * gamma  # they read the entering state decayed to each position
        written_keys = keys * gamma
        keys = keys * torch.exp(_suffix_sums(g))[..., None]  # they write decayed to the chunk end
        gate = gamma[:, -1:].unflatten(0, (chunks, heads))  # [G, BH, 1, 1]
    else:
        written_keys, gate = keys, None
        attn = attn.masked_fill_(~causal, 0.0)
    # T = A^-1 with A = I + strict_tril(diag(beta) (K K^T (.) Gamma)); U = T diag(beta) V and
    # W = T diag(beta) (gamma (.) K): an inverse and two products beat one solve with K + V
    # right-hand sides (LAPACK's batched trsm is slow at this size)
    eye = torch.eye(length, dtype=q.dtype, device=q.device)
    b = flat(beta)[..., None]
    lower = (b * scores).tril_(-1) + eye
    inverse = torch.linalg.solve_triangular(lower, eye.expand_as(lower), upper=False, unitriangular=True)
    inverse = inverse * b.transpose(-1, -2)
    u = (inverse @ flat(v)).unflatten(0, (chunks, heads))
    w = (inverse @ written_keys).unflatten(0, (chunks, heads))
    keys_t = keys.transpose(-1, -2).contiguous().unflatten(0, (chunks, heads))  # [G, BH, K, L]
    # the chunks in order: what a chunk writes, U - W S, depends on the state entering it
    entering, written = [], []
    for c in range(chunks):
        entering.append(state)
        new = torch.baddbmm(u[c], w[c], state, alpha=-1.0)
        written.append(new)
        decayed = state if gate is None else gate[c] * state
        state = torch.baddbmm(decayed, keys_t[c], new)
    o = attn @ torch.cat(written)
    o = o.baddbmm_(queries, torch.cat(entering), beta=scale, alpha=scale)
    return o, state


def _suffix_sums(g: Tensor) -> Tensor:
    """Sum of g over the positions strictly after each one, along the last axis."""
    total = torch.cumsum(g.flip(-1), dim=-1).flip(-1)
    return F.pad(total[..., 1:], (0, 1))


def _lanes(q: Tensor, k: Tensor, v: Tensor, beta: Tensor, log_decay: Tensor | None) -> tuple[int, ...]:
    """The broadcast lane shape; batch, time, K and the number of lane axes must agree."""
    shapes = {"q": q.shape[2:-1], "k": k.shape[2:-1], "v": v.shape[2:-1], "beta": beta.shape[2:]}
    if log_decay is not None:
        shapes["log_decay"] = log_decay.shape[2:]
    if len({len(s) for s in shapes.values()}) != 1:
        shown = ", ".join(f"{n} {list(s)}" for n, s in shapes.items())
        raise ValueError(f"chunk_delta_rule: inputs disagree on the number of lane axes: {shown}")
    tensors = {"q": q, "k": k, "v": v, "beta": beta, **({"log_decay": log_decay} if log_decay is not None else {})}
    if q.shape[:2] != k.shape[:2] or q.shape[:2] != v.shape[:2] or q.shape[-1] != k.shape[-1] or any(
            t.shape[0] != q.shape[0] or t.shape[1] not in (1, q.shape[1]) for t in tensors.values()):
        shown = ", ".join(f"{n} {tuple(t.shape)}" for n, t in tensors.items())
        raise ValueError(f"chunk_delta_rule: shapes do not match [B, T, *lanes, ...]: {shown}")
    try:
        return broadcast_shapes(*shapes.values())
    except RuntimeError:
        shown = ", ".join(f"{n} {list(s)}" for n, s in shapes.items())
        raise ValueError(f"chunk_delta_rule: lane axes do not broadcast: {shown}") from None
