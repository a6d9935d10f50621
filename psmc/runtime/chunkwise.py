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

Numerics: decays arrive as LOG decays. Cumulative sums run in float64 (an fp32 cumsum over a
chunk loses ~1e-4 in the exponent); every exponential is taken of a difference that is <= 0
where the value is used, or of a difference bounded by _MAX_SPREAD around a reference point, so
nothing overflows and strong decays underflow to an exact 0 instead of producing inf or NaN.
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from psmc.runtime.fastpaths import linear_recurrence

__all__ = ["DECAY_KINDS", "chunk_linear_attention"]

DecayKind = Literal["none", "scalar", "key"]
DECAY_KINDS: tuple[str, ...] = ("none", "scalar", "key")

# Largest |exponent| used when the per-key decay mask of a block is factorised around one
# reference: exp(40) ~ 2e17 keeps q~ k~ products far from fp32 overflow and loses < 4e-6.
_MAX_SPREAD = 40.0
# Blocks this small whose decays still spread too far get the exact elementwise mask.
_MIN_BLOCK = 8
# Log decays are clamped here so that -inf (a decay of exactly 0) cannot make inf - inf.
_LOG_DECAY_FLOOR = -1.0e6
EXP_DTYPE = None


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

    Returns:
        (o, final_state): o [B, T, *lanes, V] in v's dtype; final_state = S_{T-1}
        [B, *lanes, K, V], accumulated in float32 (float64 for float64 inputs). Both are
        differentiable in every tensor argument.
    """
    _check_kind(log_decay, decay)
    batch, steps, width_k, width_v = q.shape[0], q.shape[1], q.shape[-1], v.shape[-1]
    lanes = _lanes(q, k, v, log_decay, decay)
    heads = _prod(lanes)
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    length = min(chunk_size, _next_power_of_two(max(steps, 1)))
    layout = _Layout(batch, steps, lanes, length)
    qc = layout.chunks(q.to(dtype) * scale, (width_k,))
    kc = layout.chunks(k.to(dtype), (width_k,))
    vc = layout.chunks(v.to(dtype), (width_v,))
    s0 = None
    if initial_state is not None:
        s0 = initial_state.to(dtype).expand(batch, *lanes, width_k, width_v)
        s0 = s0.reshape(batch * heads, width_k, width_v)
    if decay == "none":
        o, final = _no_decay(qc, kc, vc, s0, exclusive)
    else:
        width = (width_k,) if decay == "key" else ()
        log_decay = log_decay.to(EXP_DTYPE or dtype).clamp(min=_LOG_DECAY_FLOOR)
        gc = layout.chunks(log_decay, width)
        o, final = _decayed(qc, kc, vc, gc, s0, exclusive, per_key=(decay == "key"))
    return layout.outputs(o).to(v.dtype), final.reshape(batch, *lanes, width_k, width_v)


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
    return tuple(torch.broadcast_shapes(*lane_shapes))


def _prod(sizes: tuple[int, ...]) -> int:
    out = 1
    for size in sizes:
        out *= size
    return out


def _next_power_of_two(n: int) -> int:
    return 1 << (n - 1).bit_length()


class _Layout:
    """Moves [B, T, *lanes, *width] to chunks [B*H, n, L, *width] and outputs back."""

    def __init__(self, batch: int, steps: int, lanes: tuple[int, ...], length: int):
        self.batch, self.steps, self.lanes, self.length = batch, steps, lanes, length
        self.heads = _prod(lanes)
        self.count = max(1, -(-steps // length))
        self.pad = self.count * length - steps

    def chunks(self, x: Tensor, width: tuple[int, ...]) -> Tensor:
        x = x.expand(self.batch, self.steps, *self.lanes, *width)
        x = x.reshape(self.batch, self.steps, self.heads, *width).movedim(2, 1)
        if self.pad:  # zero keys and a zero log decay: padded tokens leave the state alone
            x = F.pad(x, (0, 0) * len(width) + (0, self.pad))
        return x.reshape(self.batch * self.heads, self.count, self.length, *width)

    def outputs(self, o: Tensor) -> Tensor:
        o = o.reshape(self.batch, self.heads, self.count * self.length, o.shape[-1])
        o = o[:, :, : self.steps].movedim(1, 2)
        return o.reshape(self.batch, self.steps, *self.lanes, o.shape[-1])


def _causal_mask(length: int, strict: bool, device: torch.device) -> Tensor:
    return torch.ones(length, length, dtype=torch.bool, device=device).tril(-1 if strict else 0)


def _entering(states: Tensor, s0: Tensor | None) -> Tensor:
    """States entering each chunk [BH, n, K, V] from the states leaving them."""
    first = states.new_zeros(states[:, :1].shape) if s0 is None else s0[:, None]
    return torch.cat([first, states[:, :-1]], dim=1)


def _no_decay(q: Tensor, k: Tensor, v: Tensor, s0: Tensor | None, exclusive: bool) -> tuple[Tensor, Tensor]:
    """decay = 1: plain causal linear attention; chunk states are a cumulative sum."""
    mask = _causal_mask(q.shape[2], exclusive, q.device)
    scores = torch.where(mask, q @ k.transpose(-1, -2), 0.0)
    states = torch.cumsum(k.transpose(-1, -2) @ v, dim=1)
    if s0 is not None:
        states = states + s0[:, None]
    o = scores @ v + q @ _entering(states, s0)
    return o, states[:, -1]


def _decayed(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor, s0: Tensor | None, exclusive: bool, *, per_key: bool
) -> tuple[Tensor, Tensor]:
    """Scalar ([BH, n, L]) or per-key ([BH, n, L, K]) log decays g, in float64."""
    dtype = q.dtype
    cum_k = torch.cumsum(g, dim=2)  # decay from the chunk start through token t (inclusive)
    cum_q = cum_k - g if exclusive else cum_k  # what the readout of token t sees
    total = cum_k[:, :, -1:]  # whole-chunk log decay, keeps the L axis as size 1
    if not per_key:  # broadcast scalars over the feature axis
        cum_k, cum_q, total = cum_k[..., None], cum_q[..., None], total[..., None]
    intra = _scalar_intra if not per_key else _key_intra
    o = intra(q, k, v, cum_q, cum_k, exclusive)
    # chunk state update: one matmul of keys decayed to the chunk end (exponents <= 0)
    k_to_end = k * torch.exp((total - cum_k).to(dtype))
    updates = k_to_end.transpose(-1, -2) @ v
    chunk_decay = torch.exp(total.to(dtype)).transpose(-1, -2)  # [BH, n, K or 1, 1]
    states, final = linear_recurrence(chunk_decay, updates, s0)
    o = o + (q * torch.exp(cum_q.to(dtype))) @ _entering(states, s0)
    return o, final


def _scalar_intra(q: Tensor, k: Tensor, v: Tensor, cum_q: Tensor, cum_k: Tensor, strict: bool) -> Tensor:
    """(Q K^T (.) exp(cum_q_t - cum_k_s) masked) V for a scalar decay: an exact L x L mask."""
    mask = _causal_mask(q.shape[2], strict, q.device)
    diff = cum_q - cum_k.transpose(-1, -2)  # [BH, n, L, L], <= 0 on the causal part
    weights = torch.exp(torch.where(mask, diff, -torch.inf).to(q.dtype))
    return ((q @ k.transpose(-1, -2)) * weights) @ v


def _key_intra(q: Tensor, k: Tensor, v: Tensor, cum_q: Tensor, cum_k: Tensor, strict: bool) -> Tensor:
    """The per-key decayed intra-chunk term, all chunks flattened into one batch axis."""
    lead = q.shape[:2]
    flat = lambda x: x.flatten(0, 1)  # noqa: E731
    o = _key_block(flat(q), flat(k), flat(v), flat(cum_q), flat(cum_k), strict)
    return o.unflatten(0, lead)


def _key_block(q: Tensor, k: Tensor, v: Tensor, cq: Tensor, ck: Tensor, strict: bool) -> Tensor:
    """sum_s<=t (sum_k q_tk k_sk exp(cq_tk - ck_sk)) v_s over blocks [N, L, *] (exact).

    One reference point per (block, key) factorises the mask into two matmul operands when
    the exponents spread little; otherwise the block is halved: the lower-left quadrant uses
    the boundary between the halves as reference (both exponents <= 0, so it is exact for
    any decay), and the two diagonal halves recurse.
    """
    length = q.shape[1]
    if _spread(cq, ck) <= _MAX_SPREAD:
        return _factorised_block(q, k, v, cq, ck, strict)
    if length <= _MIN_BLOCK or length % 2:
        return _elementwise_block(q, k, v, cq, ck, strict)
    half = length // 2
    halves = lambda x: x.unflatten(1, (2, half)).flatten(0, 1)  # noqa: E731  [2N, L/2, *]
    diagonal = _key_block(halves(q), halves(k), halves(v), halves(cq), halves(ck), strict)
    diagonal = diagonal.unflatten(0, (-1, 2))  # [N, 2, L/2, V]
    boundary = ck[:, half - 1 : half].detach()  # the products below do not depend on it
    q_late = q[:, half:] * torch.exp((cq[:, half:] - boundary).to(q.dtype))
    k_early = k[:, :half] * torch.exp((boundary - ck[:, :half]).to(q.dtype))
    cross = (q_late @ k_early.transpose(-1, -2)) @ v[:, :half]
    return torch.cat([diagonal[:, 0], diagonal[:, 1] + cross], dim=1)


def _spread(cq: Tensor, ck: Tensor) -> float:
    """Largest half-range of the exponents in any (block, key): the factorisation's cost."""
    cq, ck = cq.detach(), ck.detach()
    high = torch.maximum(cq.amax(dim=1), ck.amax(dim=1))
    low = torch.minimum(cq.amin(dim=1), ck.amin(dim=1))
    return float(((high - low) * 0.5).max()) if high.numel() else 0.0


def _factorised_block(q: Tensor, k: Tensor, v: Tensor, cq: Tensor, ck: Tensor, strict: bool) -> Tensor:
    """exp(cq - ck) = exp(cq - m) exp(m - ck) with m mid-range, so both factors stay bounded."""
    middle = ((torch.maximum(cq.amax(1, True), ck.amax(1, True)) + torch.minimum(cq.amin(1, True), ck.amin(1, True))) * 0.5).detach()
    q_ref = q * torch.exp((cq - middle).to(q.dtype))
    k_ref = k * torch.exp((middle - ck).to(q.dtype))
    mask = _causal_mask(q.shape[1], strict, q.device)
    # entries above the diagonal may be huge or inf: `where` drops them (and their gradient)
    return torch.where(mask, q_ref @ k_ref.transpose(-1, -2), 0.0) @ v


def _elementwise_block(q: Tensor, k: Tensor, v: Tensor, cq: Tensor, ck: Tensor, strict: bool) -> Tensor:
    """The exact [N, L, L, K] mask for small blocks whose decays are too strong to factorise."""
    mask = _causal_mask(q.shape[1], strict, q.device)[..., None]
    diff = cq[:, :, None, :] - ck[:, None, :, :]
    weights = torch.exp(torch.where(mask, diff, -torch.inf).to(q.dtype))
    scores = (q[:, :, None, :] * k[:, None, :, :] * weights).sum(-1)
    return scores @ v
