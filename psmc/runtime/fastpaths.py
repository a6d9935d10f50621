"""Fast path for the elementwise first-order linear recurrence h_t = a_t * h_{t-1} + b_t.

The code generator calls `linear_recurrence` for every op whose state is a pair (a, h) with
combine (l.a * r.a, r.a * l.h + r.h) applied elementwise: linear recurrences, selective SSMs per
channel x N, the decay part of many layers, and the chunk-state passing of the chunkwise
matmul form (psmc/runtime/chunkwise.py).

Why a two-level loop rather than a log-depth tree: on a CPU every torch op costs a few
microseconds of dispatch, and a tree scan makes O(log T) passes over the whole tensor. Splitting
time into n chunks (n ~ sqrt(T)) and looping over the position inside the chunk (all chunks at
once), then over the chunks (a tiny carry scan), then over the position again with the true
carried-in state, costs about 2 T / n + n small ops and three passes over the data, with no
extra full-size buffer. Short scans with big steps (the chunk states of chunkwise.py) use the
plain loop over time: one pass. The backward is the same scan run in reverse time, so it
needs no per-step autograd graph.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from psmc.runtime.ops import broadcast_shapes
from psmc.runtime.varlen import cu_seqlens_bounds, lengths, packed_bounds

__all__ = ["linear_recurrence"]


def linear_recurrence(
    a: Tensor,
    b: Tensor,
    initial: Tensor | None = None,
    *,
    log: bool = False,
    exclusive: bool = False,
    kernel: str = "torch",
    cu_seqlens: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """All states of h_t = a_t * h_{t-1} + b_t, elementwise, with h_{-1} = `initial` (or 0).

    Args:
        a: decays [B, T, *rest], or their logarithms when `log=True` (the lift was exp(...)).
            Any axis but time may have size 1 and is broadcast against `b`.
        b: inputs [B, T, *rest] (any axis but time may broadcast against `a`).
        initial: optional h_{-1}, broadcastable to [B, *rest].
        log: `a` holds log-decays; exp is applied here (differentiably).
        exclusive: return the states BEFORE each step, [h_{-1}, ..., h_{T-2}], instead of
            [h_0, ..., h_{T-1}] (no extra copy: both are views of one buffer).
        kernel: 'torch' (the blocked loop below) or 'triton' (psmc.runtime.triton_scan: one
            kernel, time inside each thread; the inputs keep their dtype, h is in it, h_last
            fp32). The dispatcher (psmc.runtime.dispatch) picks 'triton' for CUDA tensors.
        cu_seqlens: packed sequences (fla's convention, B = 1): each sequence restarts from its
            own initial state (`initial` broadcastable to [N, *rest]), h_last is [N, *rest]. One
            scan over the packed time axis: the decay at each sequence's first token is replaced
            by 0 and its initial state enters through b there (b += a * h_{-1}), which is exact
            and keeps every gradient.

    Returns:
        (h, h_last): h [B, T, *rest] (views of one buffer), h_last = h_{T-1} [B, *rest]
        (`initial` or zeros when T == 0). Differentiable in a, b and initial (autograd);
        computed in the promoted dtype of a and b.
    """
    if a.dim() < 2 or b.dim() < 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"a {tuple(a.shape)} and b {tuple(b.shape)} must be [B, T, ...] with one T")
    if log:
        a = torch.exp(a)
    if cu_seqlens is not None:
        return _packed(a, b, initial, cu_seqlens, exclusive, kernel)
    if kernel == "triton" and not exclusive:
        from .triton_scan import FirstOrderScan
        shape = broadcast_shapes(a.shape, b.shape)
        if a.dim() < len(shape):
            raise ValueError("a must have as many axes as the result (use size-1 axes to broadcast)")
        h, h_last = FirstOrderScan.apply(a, b, initial)
        return h, h_last.to(h.dtype)
    dtype = torch.promote_types(a.dtype, b.dtype)
    a, b = a.to(dtype), b.to(dtype)
    shape = broadcast_shapes(a.shape, b.shape)
    if a.dim() < len(shape):  # time must stay axis 1 for both
        raise ValueError("a must have as many axes as the result (use size-1 axes to broadcast)")
    b = b.expand(shape)
    state_shape = (shape[0],) + tuple(shape[2:])
    initial = b.new_zeros(state_shape) if initial is None else initial.to(dtype).expand(state_shape)
    if torch.compiler.is_compiling():  # in-place `out=` writes do not trace: an out-of-place form
        states = _functional_scan(a.expand(shape), b, initial)
    else:
        states = _LinearRecurrence.apply(a, b, initial)  # [B, T + 1, *rest], states[:, 0] = h_{-1}
    h = states[:, :-1] if exclusive else states[:, 1:]
    return h, states[:, -1]


def _packed(a: Tensor, b: Tensor, initial: Tensor | None, cu_seqlens: Tensor, exclusive: bool, kernel: str):
    """linear_recurrence over packed sequences as one scan (see its docstring)."""
    shape = broadcast_shapes(a.shape, b.shape)
    bounds = packed_bounds("linear_recurrence", cu_seqlens, shape[0], shape[1])
    if a.dim() < len(shape):
        raise ValueError("a must have as many axes as the result (use size-1 axes to broadcast)")
    a, b = a.expand(shape), b.expand(shape)
    starts = torch.tensor(bounds[:-1], device=b.device)
    ends = torch.tensor(bounds[1:], device=b.device) - 1
    first = b.new_zeros(len(starts), *shape[2:]) if initial is None else initial.expand(len(starts), *shape[2:])
    if initial is not None:  # the initial state enters through the first token: b += a * h_{-1}
        b = b.index_add(1, starts, (a.index_select(1, starts) * first.unsqueeze(0)).to(b.dtype))
    h, _ = linear_recurrence(a.index_fill(1, starts, 0), b, kernel=kernel)
    h_last = h[0].index_select(0, ends)
    if exclusive:  # h_{t-1}, with each sequence's own initial state before its first token
        h = torch.cat([h[:, :1], h[:, :-1]], dim=1).index_copy(1, starts, first.unsqueeze(0).to(h.dtype))
    return h, h_last.to(h.dtype)


def segment_cumprod(a: Tensor, cu_seqlens: Tensor | None = None) -> Tensor:
    """torch.cumprod(a, dim=1), restarted at every packed sequence's first token."""
    if cu_seqlens is None:
        return torch.cumprod(a, dim=1)
    bounds = cu_seqlens_bounds("segment_cumprod", cu_seqlens)
    starts = torch.tensor(bounds[:-1], device=a.device)
    only_starts = torch.zeros_like(a).index_copy(1, starts, a.index_select(1, starts))
    return linear_recurrence(a.index_fill(1, starts, 0), only_starts)[0]  # c_t = a_t c_{t-1}, restarted


def segment_prod(a: Tensor, cu_seqlens: Tensor | None = None) -> Tensor:
    """a.prod(dim=1): [B, ...], or per packed sequence: [N, ...]."""
    if cu_seqlens is None:
        return a.prod(dim=1)
    ends = torch.tensor(cu_seqlens_bounds("segment_prod", cu_seqlens)[1:], device=a.device) - 1
    return segment_cumprod(a, cu_seqlens)[0].index_select(0, ends)


def per_token(x: Tensor, cu_seqlens: Tensor | None = None) -> Tensor:
    """A per-row tensor [B, ...] as [B, 1, ...] against [B, T, ...]; per packed sequence [N, ...]
    as [1, T, ...], each sequence's row repeated over its tokens."""
    if cu_seqlens is None:
        return x.unsqueeze(1)
    bounds = cu_seqlens_bounds("per_token", cu_seqlens)
    return x.repeat_interleave(lengths(bounds, x.device), dim=0).unsqueeze(0)


class _LinearRecurrence(torch.autograd.Function):
    """states = [h0, scan(a, b, h0)]; the adjoint is the same scan in reverse time."""

    @staticmethod
    def forward(ctx, a: Tensor, b: Tensor, h0: Tensor) -> Tensor:
        states = b.new_empty((b.shape[0], b.shape[1] + 1) + tuple(b.shape[2:]))
        states[:, 0] = h0
        _scan_into(states[:, 1:], a, b, h0, reverse=False)
        ctx.save_for_backward(a, states)
        return states

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_states: Tensor):
        a, states = ctx.saved_tensors
        grad_states = grad_states.expand(states.shape)
        # x_t = dL/dh_t in total: x_t = grad_t + a_{t+1} x_{t+1}, a scan in reverse time that
        # also returns the message a_0 x_0 reaching h0 through the first step
        x = torch.empty_like(states[:, 1:])
        into_h0 = _scan_into(x, a, grad_states[:, 1:], None, reverse=True)
        grad_a = None
        if ctx.needs_input_grad[0]:
            grad_a = (x * states[:, :-1]).sum_to_size(a.shape)
        return grad_a, x, grad_states[:, 0] + into_h0


# torch runs an elementwise op on one thread below this many elements (at::internal::
# GRAIN_SIZE) and wakes its thread pool above. On a small shared machine each wake-up can stall
# for a scheduler tick when the other core is busy, so the scan keeps its per-step slices
# below it: fewer, longer chunks instead of ~sqrt(T) chunks of ~sqrt(T) steps.
_GRAIN = 32768


def _chunk_count(steps: int, elements: int) -> int:
    """Chunks of the two-level scan for T steps of `elements` each; 0 means a plain loop.

    sqrt(T) chunks balance the in-chunk loop (T / n ops) against the carry loop (n ops); fewer
    when a slice of n steps would cross _GRAIN. Short scans (chunk states) loop plainly.
    """
    count = min(math.isqrt(steps), max(1, (_GRAIN - 1) // max(elements, 1)))
    return count if count >= 4 and steps // count >= 4 else 0


def _scan_into(out: Tensor, a: Tensor, b: Tensor, h0: Tensor | None, *, reverse: bool) -> Tensor:
    """Write the scan into `out` [B, T, *rest]; returns the state that leaves the sequence.

    Forward:  out_t = a_t * out_{t-1} + b_t, out_{-1} = h0; returns out_{T-1}.
    Reverse:  out_t = a_{t+1} * out_{t+1} + b_t, out_T = 0; returns a_0 * out_0 (the adjoint
              that reaches h0).
    """
    steps = out.shape[1]
    state_shape = (out.shape[0],) + tuple(out.shape[2:])
    chunks = _chunk_count(steps, math.prod(state_shape))
    length = steps // chunks if chunks else steps
    body = chunks * length
    zero = out.new_zeros(state_shape)
    if reverse:
        carry = _step_range(out, a, b, zero, range(steps - 1, body - 1, -1), reverse=True)
        return _chunked(out, a, b, carry, length, chunks, reverse=True) if chunks else carry
    carry = zero if h0 is None else h0
    if chunks:
        carry = _chunked(out, a, b, carry, length, chunks, reverse=False)
    return _step_range(out, a, b, carry, range(body, steps), reverse=False)


def _step_range(out: Tensor, a: Tensor, b: Tensor, carry: Tensor, times: range, *, reverse: bool) -> Tensor:
    """Plain sequential steps over `times` (a whole short scan, or the remainder of chunks).

    Forward: carry is h_{t-1}; returns the last h. Reverse: carry is the message
    a_{t+1} x_{t+1} from the right; returns the message a_t x_t of the last step.
    """
    previous = None
    for t in times:
        if previous is None:
            if reverse:
                torch.add(b[:, t], carry, out=out[:, t])
            else:
                torch.addcmul(b[:, t], a[:, t], carry, out=out[:, t])
        else:
            decay = a[:, t + 1] if reverse else a[:, t]
            torch.addcmul(b[:, t], decay, out[:, previous], out=out[:, t])
        previous = t
    if previous is None:
        return carry
    return a[:, previous] * out[:, previous] if reverse else out[:, previous]


def _chunked(out: Tensor, a: Tensor, b: Tensor, carry: Tensor, length: int, chunks: int, *, reverse: bool) -> Tensor:
    """Two-level scan over the first chunks * length steps; returns the carry that leaves them."""
    body = chunks * length
    a_c, b_c, out_c = (x[:, :body].unflatten(1, (chunks, length)) for x in (a, b, out))  # views
    # pass 1: every chunk from a zero state at once; keep only what leaves each chunk
    local_exit = _local_scan(a_c, b_c, None, None, reverse=reverse)
    total = torch.prod(a_c, dim=2)
    # the carries between chunks: a short sequential scan over the chunk index
    entries = out.new_empty((out.shape[0], chunks) + tuple(out.shape[2:]))
    for i in range(chunks - 1, -1, -1) if reverse else range(chunks):
        entries[:, i] = carry
        carry = torch.addcmul(local_exit[:, i], total[:, i], carry)
    # pass 2: rerun every chunk from its true entry state, now writing each position
    _local_scan(a_c, b_c, entries, out_c, reverse=reverse)
    return carry


def _local_scan(a_c: Tensor, b_c: Tensor, entries: Tensor | None, out_c: Tensor | None, *, reverse: bool) -> Tensor:
    """Scan all chunks at once along axis 2, each from its entry (None: from zero).

    Writes every position into out_c, or keeps one running buffer when out_c is None.
    Returns what leaves each chunk: forward, its last state; reverse, a_0 * (its first
    state), so that exits compose as exit_i = local_exit_i + prod(a over chunk i) * entry_i.
    In reverse the entries are messages that already carry the neighbour's decay.
    """
    length = a_c.shape[2]
    positions = range(length - 1, -1, -1) if reverse else range(length)
    buffer = b_c.new_empty(b_c[:, :, 0].shape) if out_c is None else None
    prev = entries
    for step, j in enumerate(positions):
        target = out_c[:, :, j] if out_c is not None else buffer
        if reverse:
            decay = None if step == 0 else a_c[:, :, j + 1]
        else:
            decay = a_c[:, :, j]
        if prev is None:
            target.copy_(b_c[:, :, j])
        elif decay is None:
            torch.add(b_c[:, :, j], prev, out=target)
        else:
            torch.addcmul(b_c[:, :, j], decay, prev, out=target)
        prev = target
    return a_c[:, :, 0] * prev if reverse else prev


def _functional_scan(a: Tensor, b: Tensor, h0: Tensor) -> Tensor:
    """The two-level scan of `_scan_into`, out of place (for torch.compile graphs; autograd
    differentiates it): [h0, h_0, ..., h_{T-1}] as [B, T + 1, *rest]."""
    steps = a.shape[1]
    length = max(1, math.isqrt(steps))
    chunks = -(-steps // length)
    pad = chunks * length - steps
    if pad:  # a = 1, b = 0 keeps the state: the padded tail changes nothing that is read
        a = torch.cat([a, a.new_ones((a.shape[0], pad) + tuple(a.shape[2:]))], dim=1)
        b = torch.cat([b, b.new_zeros((b.shape[0], pad) + tuple(b.shape[2:]))], dim=1)
    a_c, b_c = a.unflatten(1, (chunks, length)), b.unflatten(1, (chunks, length))
    local = b_c[:, :, 0]
    for j in range(1, length):  # every chunk from zero at once: what leaves each chunk
        local = a_c[:, :, j] * local + b_c[:, :, j]
    total = torch.prod(a_c, dim=2)
    entries, carry = [], h0
    for i in range(chunks):
        entries.append(carry)
        carry = local[:, i] + total[:, i] * carry
    h = torch.stack(entries, dim=1)
    out = []
    for j in range(length):  # rerun every chunk from its true entry
        h = a_c[:, :, j] * h + b_c[:, :, j]
        out.append(h)
    states = torch.stack(out, dim=2).flatten(1, 2)[:, :steps]
    return torch.cat([h0.unsqueeze(1), states], dim=1)
