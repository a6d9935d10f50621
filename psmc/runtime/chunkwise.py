"""The chunkwise matmul form of decayed linear attention (op-independent runtime).

The code generator calls `chunk_linear_attention` for `affine` ops whose lift adds an outer
product and whose readout is linear in the state:

    S_t = decay_t (.) S_{t-1} + k_t v_t^T,      o_t = scale * q_t @ S_t   (or S_{t-1}: exclusive)

with decay_t = 1 ("none": linear attention), a scalar per (batch, time, lane) ("scalar":
simple GLA, Mamba-2, RetNet, mLSTM's forget gate) or a diagonal over the key axis ("key": GLA,
RWKV-6). Time is cut into chunks of L tokens. Inside a chunk the outputs are
(Q K^T (.) causal decay mask) V + (Q (.) cumulative decay) S_entering; each chunk's state update
is one matmul, and the states between chunks are one short linear recurrence over the chunk
index. No per-token K x V state is ever formed, and autograd sees only per-chunk tensors.

Numerics: decays arrive as LOG decays. Every exponent is a sum of log decays over exactly the
tokens it spans (a cumsum from the chunk start or a suffix sum to its end), never a difference
of two long cumsums, and every exponential is of a value that is <= 0 where it is used, or is
bounded by _MAX_SPREAD around a reference point: nothing overflows, strong decays (even -inf)
underflow to an exact 0, and float32 results stay within ~1e-6 relative RMS of float64.
"""
from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from psmc.runtime.fastpaths import linear_recurrence
from psmc.runtime.ops import broadcast_shapes
from psmc.runtime.varlen import cu_seqlens_bounds, lengths, packed_bounds

__all__ = ["DECAY_KINDS", "chunk_linear_attention"]

DecayKind = Literal["none", "scalar", "key"]
DECAY_KINDS: tuple[str, ...] = ("none", "scalar", "key")

# Largest |exponent| of a factorised decay mask exp(a - b) = exp(a - m) exp(m - b): exp(40)
# ~ 2e17 keeps the operands far from fp32 overflow and costs < 4e-6 relative error.
_MAX_SPREAD = 40.0
# Blocks this small whose decays still spread too far get the exact elementwise mask.
_MIN_BLOCK = 8
# Chunks are processed in groups whose [G, BH, L, D] operands stay below this many bytes per
# torch thread (a core's L2 share), so that batched GEMMs and elementwise passes run from
# cache. Measured on the 2-core benchmark machine, 1 thread: a batched 64x64x64 GEMM runs at
# ~87 GFLOP/s for 32 matrices, 65 for 128, 39 for 256; GLA forward 16 ms grouped vs 21 ms not.
_GROUP_BYTES = 512 * 1024


# Which implementation chunk_linear_attention runs: "auto" (Triton kernels for CUDA tensors of
# fp32/bf16/fp16, the torch path otherwise), "triton" (also CPU tensors: tests, under
# TRITON_INTERPRET=1) or "torch". Set PSMC_CHUNK_BACKEND, or assign this at run time.
BACKEND = os.environ.get("PSMC_CHUNK_BACKEND", "auto")


def _triton_wanted(q: Tensor) -> bool:
    if BACKEND == "torch" or q.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False
    if BACKEND != "triton" and not q.is_cuda:
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def chunk_linear_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    log_decay: Tensor | None = None,
    *,
    decay: DecayKind = "none",
    scale: float = 1.0,
    initial_state: Tensor | None = None,
    exclusive: bool = False,
    chunk_size: int = 64,
    cu_seqlens: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Decayed linear attention, all positions at once, in the chunkwise matmul form.

    Computes S_t = decay_t (.) S_{t-1} + outer(k_t, v_t) with S_{-1} = initial_state (or 0) and
    o_t = scale * q_t @ S_t, or scale * q_t @ S_{t-1} when `exclusive` (RWKV-style readouts).

    Args:
        q, k: [B, T, *lanes, K]; v: [B, T, *lanes, V]. Lane axes (heads, ...) may have size 1
            in some inputs and are broadcast.
        log_decay: log of the decay, <= 0 for a decay (any magnitude; -inf means 0).
            decay="none": must be None. decay="scalar": [B, T, *lanes].
            decay="key": [B, T, *lanes, K]. Batch, time and lane axes may have size 1
            (a constant decay such as RetNet's gamma is [1, 1, H]).
        decay: "none" | "scalar" | "key", the decay kind the compiler recognised.
        scale: multiplies every output (e.g. K ** -0.5).
        initial_state: optional S_{-1}, broadcastable to [B, *lanes, K, V].
        exclusive: read S_{t-1} instead of S_t.
        chunk_size: tokens per chunk (a power of two works best; shorter inputs use less).
        cu_seqlens: packed sequences (fla's convention): B = 1, and the N sequences are
            tokens cu_seqlens[n]:cu_seqlens[n + 1] of the time axis, each run from its own
            initial state (initial_state broadcastable to [N, *lanes, K, V]); the final
            state is then [N, *lanes, K, V].

    Returns:
        (o, final_state): o [B, T, *lanes, V] in v's dtype; final_state = S_{T-1}
        [B, *lanes, K, V], accumulated in float32 (float64 for float64 inputs). Both are
        differentiable in every tensor argument.

    CUDA tensors run `psmc.runtime.triton_chunk` (chunked tensor-core kernels; see BACKEND),
    packed sequences included in the same launches; the torch path runs packed sequences one
    after another.
    """
    if _triton_wanted(q):
        from psmc.runtime.triton_chunk import triton_chunk_linear_attention

        return triton_chunk_linear_attention(
            q, k, v, log_decay, decay=decay, scale=scale, initial_state=initial_state,
            exclusive=exclusive, chunk_size=chunk_size, cu_seqlens=cu_seqlens)
    return _chunk_linear_attention_torch(
        q, k, v, log_decay, decay=decay, scale=scale, initial_state=initial_state,
        exclusive=exclusive, chunk_size=chunk_size, cu_seqlens=cu_seqlens)


def decay_total(log_decay: Tensor, cu_seqlens: Tensor | None = None) -> Tensor:
    """exp of the log decays summed over time: [B, ...] for a batch, [N, ...] per packed sequence."""
    if cu_seqlens is None:
        return torch.exp(log_decay.sum(dim=1))
    bounds = cu_seqlens_bounds("decay_total", cu_seqlens)
    dev = log_decay.device
    owner = torch.arange(len(bounds) - 1, device=dev).repeat_interleave(lengths(bounds, dev))
    per_token = log_decay[0].expand(bounds[-1], *log_decay.shape[2:])
    sums = per_token.new_zeros(len(bounds) - 1, *log_decay.shape[2:]).index_add_(0, owner, per_token)
    return torch.exp(sums)


# How the torch paths run packed sequences (`by_sequence`): "cuda" (the default) batches them
# in padded groups on a GPU, where a call per sequence costs its launches, and runs them one
# by one on a CPU, where the per-sequence operands stay in cache (measured on the 2-core
# machine, 1 thread, 32 sequences of 16-256 tokens, H = 4, K = V = 64: one by one 52 ms for the
# DPLR form, padded groups 117 ms, its large batched products running from memory; the delta
# rule and GLA 10% faster padded); "always" or "never" force one way (tests).
PACKED = "cuda"
# A group grows while its padded size stays within this factor of its tokens.
_PAD_WASTE = 1.25


def by_sequence(run, bounds: list, per_token: tuple, initial_state: Tensor | None, state_shape: tuple):
    """Packed sequences through `run(*pieces, initial_state=s0)`, a batched pass: one call per
    sequence, or (on a GPU, see PACKED) one call per group of sequences of similar length,
    longest first (a group's padded size stays within _PAD_WASTE of its tokens), each sequence
    padded at its end with zero tokens to the group's longest. A zero token is the identity
    map of every op that calls this (no write: k = v = beta = a = b = 0; log decay 0), so a
    padded sequence's final state is its own and so are its outputs up to its length; inputs
    with time 1 (shared by every token) are padded with zeros too. Returns (o [1, total_T, ...],
    final [N, ...]) in the packed order."""
    n = len(bounds) - 1
    if initial_state is not None:
        initial_state = initial_state.expand(n, *state_shape)
    device = next(x for x in per_token if x is not None).device
    if PACKED == "never" or (PACKED == "cuda" and device.type != "cuda"):
        groups = [[i] for i in range(n)]
    else:
        groups = _length_groups([hi - lo for lo, hi in zip(bounds, bounds[1:])])
    outs, finals = [None] * n, [None] * n
    for group in groups:
        if len(group) == 1:  # a slice of each input, no copy
            lo, hi = bounds[group[0]], bounds[group[0] + 1]
            pieces = [x if x is None or x.shape[1] == 1 else x[:, lo:hi] for x in per_token]
        else:
            pieces = _padded(per_token, [bounds[i] for i in group], [bounds[i + 1] for i in group])
        start = None if initial_state is None else initial_state[group[0]:group[0] + 1] if len(group) == 1 else \
            initial_state[torch.tensor(group, device=initial_state.device)]
        o, s = run(*pieces, initial_state=start)
        for j, i in enumerate(group):
            outs[i] = o[j:j + 1, :bounds[i + 1] - bounds[i]]
            finals[i] = s[j:j + 1]
    return torch.cat(outs, dim=1), torch.cat(finals, dim=0)


def _padded(per_token: tuple, starts: list, ends: list) -> list:
    """The packed tokens starts[j]:ends[j] of each input as row j of a [G, longest, ...] batch,
    zero past each sequence's end (inputs with time 1 expanded first: their padding is zero
    too). Differentiable (an index_select and a masked_fill)."""
    longest = max(e - s for s, e in zip(starts, ends))
    device = next(x for x in per_token if x is not None).device
    steps = torch.arange(longest, device=device)
    first = torch.tensor(starts, device=device)[:, None]
    last = torch.tensor(ends, device=device)[:, None] - 1
    position = first + steps  # [G, longest]
    past = position > last
    index = torch.minimum(position, last).flatten()
    total = max(ends)
    pieces = []
    for x in per_token:
        if x is None:
            pieces.append(None)
            continue
        rows = x.expand(1, max(total, x.shape[1]), *x.shape[2:])[0].index_select(0, index)
        rows = rows.unflatten(0, tuple(past.shape))
        pieces.append(rows.masked_fill(past.view(*past.shape, *(1,) * (rows.dim() - 2)), 0.0))
    return pieces


def _length_groups(sizes: list) -> list:
    """Sequence indices, longest first, in groups whose padded size (count x longest) stays
    within _PAD_WASTE of their summed lengths."""
    groups, tokens = [], 0
    for i in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        if groups and sizes[groups[-1][0]] * (len(groups[-1]) + 1) <= _PAD_WASTE * (tokens + sizes[i]):
            groups[-1].append(i)
            tokens += sizes[i]
        else:
            groups.append([i])
            tokens = sizes[i]
    return groups


def _chunk_linear_attention_torch(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    log_decay: Tensor | None = None,
    *,
    decay: DecayKind = "none",
    scale: float = 1.0,
    initial_state: Tensor | None = None,
    exclusive: bool = False,
    chunk_size: int = 64,
    cu_seqlens: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """The torch chunkwise implementation of chunk_linear_attention (CPU, float64, fallback)."""
    _check_kind(log_decay, decay)
    if cu_seqlens is not None:
        bounds = packed_bounds("chunk_linear_attention", cu_seqlens, q.shape[0], q.shape[1])
        lanes = _lanes(q, k, v, log_decay, decay)

        def one(q, k, v, g, initial_state):
            return _chunk_linear_attention_torch(q, k, v, g, decay=decay, scale=scale, initial_state=initial_state,
                                                 exclusive=exclusive, chunk_size=chunk_size)
        return by_sequence(one, bounds, (q, k, v, log_decay), initial_state, (*lanes, q.shape[-1], v.shape[-1]))
    batch, steps, width_k, width_v = q.shape[0], q.shape[1], q.shape[-1], v.shape[-1]
    lanes = _lanes(q, k, v, log_decay, decay)
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    layout = _Layout(batch, steps, lanes, min(chunk_size, _next_power_of_two(max(steps, 1))))
    state = None
    if initial_state is not None:
        state = initial_state.to(dtype).expand(batch, *lanes, width_k, width_v)
        state = state.reshape(1, batch * layout.heads, width_k, width_v)
    out_dtype = v.dtype
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    log_decay = None if log_decay is None else log_decay.to(dtype)
    outputs = []
    for first, count in layout.groups(dtype.itemsize * max(width_k, width_v)):
        # a group of chunks at a time keeps every operand cache-resident (see _GROUP_BYTES)
        qc, kc = layout.chunks(q, (width_k,), first, count), layout.chunks(k, (width_k,), first, count)
        vc = layout.chunks(v, (width_v,), first, count)
        if decay == "none":
            terms = _undecayed_terms(qc, kc, exclusive)
        else:
            g = layout.chunks(log_decay, (width_k,) if decay == "key" else (), first, count)
            terms = _decayed_terms(qc, kc, vc, g, exclusive, per_key=(decay == "key"))
        # the chunk-to-chunk state passing: one matmul per chunk, then a short linear recurrence
        updates = terms.k_update.transpose(-1, -2) @ vc  # [G, BH, K, V]
        entering, state = linear_recurrence(terms.chunk_decay[None], updates[None], state, exclusive=True)
        outputs.append(_combine(terms, vc, entering[0], scale).unflatten(0, vc.shape[:2]))
    final = state[0].reshape(batch, *lanes, width_k, width_v)
    return layout.outputs(outputs).to(out_dtype), final


@dataclass(frozen=True)
class _ChunkTerms:
    """What a decay kind contributes to each chunk of a group; tensors are [G, BH, ...]."""

    q_inter: Tensor  # queries decayed from the chunk start: they read the entering state
    k_update: Tensor  # keys decayed to the chunk end: they write the leaving state
    chunk_decay: Tensor  # the whole chunk's decay [G, BH, K or 1, 1]
    scores: Tensor | None = None  # masked, decayed Q K^T [G, BH, L, L]: intra = scores @ V
    intra: Tensor | None = None  # or the intra-chunk output itself [G, BH, L, V]


def _combine(terms: _ChunkTerms, v: Tensor, entering: Tensor, scale: float) -> Tensor:
    """scale * (intra + q_inter @ entering) as [G * BH, L, V]; the add and the scale ride in
    the beta/alpha of an in-place GEMM (no extra pass over the output)."""
    flat = lambda x: x.flatten(0, 1)  # noqa: E731
    if terms.scores is not None:
        o = flat(terms.q_inter) @ flat(entering)
        return o.baddbmm_(flat(terms.scores), flat(v), beta=scale, alpha=scale)
    return flat(terms.intra).baddbmm_(flat(terms.q_inter), flat(entering), beta=scale, alpha=scale)


def _check_kind(log_decay: Tensor | None, decay: str) -> None:
    if decay not in DECAY_KINDS:
        raise ValueError(f"decay must be one of {DECAY_KINDS}, got {decay!r}")
    if (log_decay is None) != (decay == "none"):
        raise ValueError(f"decay={decay!r} needs log_decay {'None' if decay == 'none' else 'given'}")


def _lanes(q: Tensor, k: Tensor, v: Tensor, log_decay: Tensor | None, decay: str) -> tuple[int, ...]:
    """The broadcast lane shape; every input must agree on batch/time and lane count."""
    lane_shapes = [q.shape[2:-1], k.shape[2:-1], v.shape[2:-1]]
    if log_decay is not None:
        lane_shapes.append(log_decay.shape[2:-1] if decay == "key" else log_decay.shape[2:])
    if len({len(s) for s in lane_shapes}) != 1:
        raise ValueError(f"inputs disagree on the number of lane axes: {lane_shapes}")
    if q.shape[:2] != k.shape[:2] or q.shape[:2] != v.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} do not match")
    if decay == "key" and log_decay.shape[-1] not in (1, q.shape[-1]):
        raise ValueError(f"per-key log_decay must end in K={q.shape[-1]}, got {tuple(log_decay.shape)}")
    return broadcast_shapes(*lane_shapes)


def _prod(sizes: tuple[int, ...]) -> int:
    out = 1
    for size in sizes:
        out *= size
    return out


def _next_power_of_two(n: int) -> int:
    return 1 << (n - 1).bit_length()


class _Layout:
    """Moves [B, T, *lanes, *width] to chunk-major [G, B*H, L, *width] groups and back.

    Chunk-major, so that the chunk states of a linear recurrence over the chunks come out as
    [G, B*H, K, V] views that feed a batched matmul without a copy.
    """

    def __init__(self, batch: int, steps: int, lanes: tuple[int, ...], length: int):
        self.batch, self.steps, self.lanes, self.length = batch, steps, lanes, length
        self.heads = _prod(lanes)
        self.count = max(1, -(-steps // length))

    def groups(self, row_bytes: int) -> list[tuple[int, int]]:
        """(first chunk, number of chunks) of each group; row_bytes per token and lane."""
        per_chunk = self.batch * self.heads * self.length * row_bytes
        threads = 1 if torch.compiler.is_compiling() else torch.get_num_threads()  # a graph has no thread count
        size = max(1, _GROUP_BYTES * threads // max(per_chunk, 1))
        return [(first, min(size, self.count - first)) for first in range(0, self.count, size)]

    def chunks(self, x: Tensor, width: tuple[int, ...], first: int, count: int) -> Tensor:
        """Chunks first .. first + count - 1 of x as [count, B*H, L, *width] (one copy)."""
        start, stop = first * self.length, (first + count) * self.length
        present = min(stop, self.steps) - start
        x = x if x.shape[1] == 1 else x[:, start : start + present]  # a size-1 time axis broadcasts
        x = x.expand(self.batch, present, *self.lanes, *width)
        x = x.reshape(self.batch, x.shape[1], self.heads, *width)
        if x.shape[1] < stop - start:  # zero keys and a zero log decay: padding leaves the state alone
            x = F.pad(x, (0, 0) * (len(width) + 1) + (0, stop - start - x.shape[1]))
        x = x.reshape(self.batch, count, self.length, self.heads, *width)
        x = x.permute(1, 0, 3, 2, *range(4, x.dim()))  # [count, B, H, L, *width]
        return x.reshape(count, self.batch * self.heads, self.length, *width)

    def outputs(self, groups: list[Tensor]) -> Tensor:
        """[G, B*H, L, V] groups back to [B, T, *lanes, V] (one copy, in the concatenation)."""
        width = groups[0].shape[-1]
        views = [o.reshape(o.shape[0], self.batch, self.heads, self.length, width).permute(1, 0, 3, 2, 4)
                 for o in groups]
        o = torch.cat(views, dim=1) if len(views) > 1 else views[0].contiguous()
        return o.reshape(self.batch, self.count * self.length, *self.lanes, width)[:, : self.steps]


def _causal_mask(length: int, strict: bool, device: torch.device) -> Tensor:
    return torch.ones(length, length, dtype=torch.bool, device=device).tril(-1 if strict else 0)


def _undecayed_terms(q: Tensor, k: Tensor, exclusive: bool) -> _ChunkTerms:
    """decay = 1: plain causal linear attention."""
    scores = (q @ k.transpose(-1, -2)).masked_fill_(~_causal_mask(q.shape[2], exclusive, q.device), 0.0)
    return _ChunkTerms(q, k, q.new_ones(q.shape[0], 1, 1, 1), scores=scores)


# Every exponent below is a sum of log decays over exactly the tokens it spans (a cumsum from
# the chunk start, or a suffix sum to its end), never a difference of two long cumsums: such
# a difference cancels catastrophically after one strong decay.


def _decayed_terms(q: Tensor, k: Tensor, v: Tensor, g: Tensor, exclusive: bool, per_key: bool) -> _ChunkTerms:
    """Scalar [G, BH, L] or per-key [G, BH, L, K] log decays g.

    When every exponent of a chunk stays within 2 * _MAX_SPREAD of the chunk start (the usual
    case: fla-style gates over 64 tokens), the intra-chunk mask factorises around one mid-range
    reference per (chunk, key), and both factors are the inter-chunk operands rescaled by a
    bounded constant: scores = (q_inter e^-m)(k_update e^(m - total))^T, no L x L exponentials.
    Otherwise: the exact L x L mask (scalar decay) or recursive halving (per-key decay).
    Eager code reads the spread on the host and runs one form; inside a torch.compile graph
    (no host read there) `torch.cond` chooses on the device, so a graph runs the factorised
    form wherever eager code would.
    """
    compiling = torch.compiler.is_compiling()

    def exponents(q, g):
        """(from_start, seen_by_q, q_inter, spread, middle) of chunk views q and g."""
        from_start = torch.cumsum(g if per_key else g[..., None], dim=2)  # (a scalar decay: over keys)
        seen_by_q = _shift_down(from_start, dim=2) if exclusive else from_start
        spread, middle = _spread_on_device((seen_by_q, from_start), dim=2, include_zero=True)
        return from_start, seen_by_q, q * torch.exp(seen_by_q), spread, middle

    def factorised(q, k, v, g, known=None):
        from_start, seen_by_q, q_inter, _, middle = known or exponents(q, g)
        total = from_start[:, :, -1:]
        # every cumsum is within 2 * _MAX_SPREAD of 0 here, so total - from_start loses at most
        # an ulp of 80 (~8e-6): the exact suffix sums (4 passes) are not needed
        k_update = k * torch.exp(total - from_start)
        q_ref = q_inter * torch.exp(-middle)
        k_ref = k_update * torch.exp(middle - total)
        above = ~_causal_mask(q.shape[2], exclusive, q.device)  # may be huge there: dropped
        scores = q_ref @ k_ref.transpose(-1, -2)
        # (in place eager; in a cond's branch a new tensor, for Inductor)
        return k_update, scores.masked_fill(above, 0.0) if compiling else scores.masked_fill_(above, 0.0)

    def exact(q, k, v, g):
        g_k = g if per_key else g[..., None]
        k_update = k * torch.exp(_suffix_sums(g_k, dim=2))
        if per_key:
            return k_update, _key_block(*(x.flatten(0, 1) for x in (q, k, v, g)), exclusive).unflatten(0, q.shape[:2])
        return k_update, _scalar_scores(q, k, g, exclusive)

    known = exponents(q, g)
    from_start, _, q_inter, spread, _ = known
    chunk_decay = torch.exp(from_start[:, :, -1:]).transpose(-1, -2)  # [G, BH, K or 1, 1]
    if compiling:
        # a cond's branches return alike: both give the intra-chunk output itself. Its operands
        # are the chunk views alone, everything else is computed inside the branches: Inductor
        # (torch 2.13) lowers a cond's operands without pinning their strides, so a computed
        # operand (a cumsum, a .contiguous()) can reach a branch in another layout than traced
        def factorised_intra(q, k, v, g):
            q, k, v, g = (_ContiguousGrad.apply(x) for x in (q, k, v, g))
            k_update, scores = factorised(q, k, v, g)
            return k_update, scores @ v

        def exact_intra(q, k, v, g):
            q, k, v, g = (_ContiguousGrad.apply(x) for x in (q, k, v, g))
            k_update, terms = exact(q, k, v, g)
            return k_update, terms if per_key else terms @ v

        k_update, intra = torch.cond(spread <= _MAX_SPREAD, factorised_intra, exact_intra, (q, k, v, g))
        return _ChunkTerms(q_inter, k_update, chunk_decay, intra=intra)
    if float(spread) <= _MAX_SPREAD:
        k_update, scores = factorised(q, k, v, g, known)
        return _ChunkTerms(q_inter, k_update, chunk_decay, scores=scores)
    k_update, terms = exact(q, k, v, g)
    return _ChunkTerms(q_inter, k_update, chunk_decay, **{"intra" if per_key else "scores": terms})


class _ContiguousGrad(torch.autograd.Function):
    """The identity, whose gradient is made contiguous."""

    @staticmethod
    def forward(x):
        return x.view_as(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


def _scalar_scores(q: Tensor, k: Tensor, g: Tensor, strict: bool) -> Tensor:
    """Q K^T (.) the exact L x L decay mask for a scalar decay g [G, BH, L].

    span[t, s] = sum of g over s < r <= t is a cumsum down each column, exact however strong
    the decays are; the exclusive readout sees span[t - 1, s].
    """
    length = q.shape[2]
    span = torch.cumsum(torch.where(_causal_mask(length, True, q.device), g[..., :, None], 0.0), dim=-2)
    if strict:
        span = _shift_down(span, dim=-2)
    weights = span.masked_fill_(~_causal_mask(length, strict, q.device), -torch.inf).exp_()
    return (q @ k.transpose(-1, -2)) * weights


def _shift_down(x: Tensor, dim: int) -> Tensor:
    """x moved one step later along dim, zero first: an inclusive cumsum made exclusive."""
    first = torch.zeros_like(x.narrow(dim, 0, 1))
    return torch.cat([first, x.narrow(dim, 0, x.shape[dim] - 1)], dim=dim)


def _suffix_sums(g: Tensor, dim: int) -> Tensor:
    """sum of g over the positions strictly after each one, along dim."""
    return _shift_down(torch.cumsum(g.flip(dim), dim=dim), dim=dim).flip(dim)


def _key_block(q: Tensor, k: Tensor, v: Tensor, g: Tensor, strict: bool) -> Tensor:
    """sum_{s<=t} (sum_k q_tk k_sk exp(span_tsk)) v_s over blocks [N, L, *], exactly.

    span_tsk sums g[:, r, k] over s < r <= t (s < r < t when strict). One reference point per
    (block, key) splits exp(span) into a query and a key factor, i.e. two matmul operands,
    when the exponents spread little; otherwise the block is halved: the lower-left quadrant
    uses the boundary between the halves as reference (both exponents <= 0: exact for any
    decay) and the two diagonal halves recurse.
    """
    length = q.shape[1]
    from_start = torch.cumsum(g, dim=1)
    seen_by_q = _shift_down(from_start, dim=1) if strict else from_start
    spread, middle = _spread((seen_by_q, from_start), dim=1, include_zero=False)
    if spread <= _MAX_SPREAD:
        return _factorised_block(q, k, v, seen_by_q - middle, middle - from_start, strict)
    if length <= _MIN_BLOCK or length % 2:
        return _elementwise_block(q, k, v, g, strict)
    half = length // 2
    halves = lambda x: x.unflatten(1, (2, half)).flatten(0, 1)  # noqa: E731  [2N, L/2, *]
    o = _key_block(halves(q), halves(k), halves(v), halves(g), strict).unflatten(0, (-1, 2))
    late_from_boundary = torch.cumsum(g[:, half:], dim=1)
    if strict:
        late_from_boundary = _shift_down(late_from_boundary, dim=1)
    q_late = q[:, half:] * torch.exp(late_from_boundary)
    k_early = k[:, :half] * torch.exp(_suffix_sums(g[:, :half], dim=1))
    o[:, 1] += (q_late @ k_early.transpose(-1, -2)) @ v[:, :half]
    return o.flatten(1, 2)


def _spread_on_device(exponents: tuple[Tensor, ...], dim: int, include_zero: bool) -> tuple[Tensor, Tensor]:
    """(largest half-range of the exponents of any block and key along dim, as a 0-d tensor;
    the mid-ranges).

    Factorising exp(a - b) as exp(a - m) exp(m - b) around the mid-range m bounds both factors
    by exp(spread). include_zero adds the block start (exponent 0) to the range.
    """
    if torch.compiler.is_compiling():
        # (Dynamo before torch 2.13 cannot trace id() of a tensor made in the graph: a repeated
        # operand there costs one more reduction, nothing else)
        unique = [x.detach() for x in exponents]
    else:
        unique = list({id(x): x.detach() for x in exponents}.values())  # a reference, not a value
    high = functools.reduce(torch.maximum, [x.amax(dim, keepdim=True) for x in unique])
    low = functools.reduce(torch.minimum, [x.amin(dim, keepdim=True) for x in unique])
    if include_zero:
        high, low = high.clamp(min=0.0), low.clamp(max=0.0)
    spread = ((high - low) * 0.5).amax() if high.numel() else high.new_zeros(())
    return spread, (high + low) * 0.5


def _spread(exponents: tuple[Tensor, ...], dim: int, include_zero: bool) -> tuple[float, Tensor]:
    """_spread_on_device's spread read on the host. In a graph (no host read) it is infinite:
    the recursive halving of _key_block then takes the path that is exact for any decay."""
    spread, middle = _spread_on_device(exponents, dim, include_zero)
    return math.inf if torch.compiler.is_compiling() else float(spread), middle


def _factorised_block(q: Tensor, k: Tensor, v: Tensor, q_exp: Tensor, k_exp: Tensor, strict: bool) -> Tensor:
    """exp(span) = exp(q_exp_t) exp(k_exp_s), both exponents bounded by the spread."""
    scores = (q * torch.exp(q_exp)) @ (k * torch.exp(k_exp)).transpose(-1, -2)
    # entries above the diagonal may be huge or inf: the fill drops them (and their gradient)
    return scores.masked_fill_(~_causal_mask(q.shape[1], strict, q.device), 0.0) @ v


def _elementwise_block(q: Tensor, k: Tensor, v: Tensor, g: Tensor, strict: bool) -> Tensor:
    """The exact [N, L, L, K] mask, for small blocks whose decays are too strong to factorise."""
    length = q.shape[1]
    later = _causal_mask(length, True, q.device)[..., None]  # t > s
    span = torch.cumsum(torch.where(later, g[:, :, None, :], 0.0), dim=1)
    if strict:
        span = _shift_down(span, dim=1)
    mask = _causal_mask(length, strict, q.device)[..., None]
    weights = torch.exp(torch.where(mask, span, -torch.inf))
    scores = (q[:, :, None, :] * k[:, None, :, :] * weights).sum(-1)
    return scores @ v
