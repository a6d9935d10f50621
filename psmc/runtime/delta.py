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
are then chained in order. Under autograd the loop keeps each chunk's entering state and U - W S
(functional ops) and the outputs take batched matmuls after it; without autograd one running
state is updated in place and each chunk's outputs are computed inside the loop while its
entering state is at hand (four [BH, L, K] x [K, V]-sized products per chunk, no store of the
entering states and no copy per product: ~15% faster at (2, 1024, 4, 64, 64), 1 thread).

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
import os
import threading
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from psmc.runtime import chunkwise as _chunkwise
from psmc.runtime import cpu_support
from psmc.runtime.chunkwise import by_sequence
from psmc.runtime.varlen import packed_bounds
from psmc.runtime.ops import broadcast_shapes

__all__ = ["chunk_delta_rule", "delta_rule_step", "delta_product_step"]

# tokens per chunk on the torch path, measured at (B, T, H, K, V) = (2, 1024, 4, 64, 64), 1 thread
# (docs/benchmarks.md): without autograd 32 beat 16, 64 and 128 (the [L, L] terms shrink with L,
# the sequential loop grows; remeasured for the in-place loop: 16 and 32 within 2%, 64 ~13%
# slower); under autograd, whose backward replays the loop, 64 beat 32
_CHUNK = 32
_CHUNK_AUTOGRAD = 64

def chunk_delta_rule(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    beta: Tensor,
    log_decay: Tensor | None = None,
    *,
    scale: float = 1.0,
    initial_state: Tensor | None = None,
    chunk_size: int | None = None,
    cu_seqlens: Tensor | None = None,
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
        chunk_size: tokens per chunk (shorter inputs use the next power of two >= T); None:
            the measured best of the path taken (torch: 32, or 64 under autograd; the Triton
            kernels' own default on GPU).
        cu_seqlens: packed sequences (fla's convention): B = 1, and the N sequences are
            tokens cu_seqlens[n]:cu_seqlens[n + 1] of the time axis, each run from its own
            initial state (initial_state broadcastable to [N, *lanes, K, V]); the final
            state is then [N, *lanes, K, V]. CUDA runs them in the same Triton launches;
            the torch path runs them one after another.

    Returns:
        (o, final_state): o [B, T, *lanes, V] in v's dtype; final_state = S_{T-1}
        [B, *lanes, K, V] in float32 (float64 for float64 inputs).
    """
    if _triton_wanted(q):
        try:
            from psmc.runtime.triton_delta import triton_chunk_delta_rule
        except ImportError:
            pass
        else:
            sizing = {} if chunk_size is None else {"chunk_size": chunk_size}
            return triton_chunk_delta_rule(q, k, v, beta, log_decay, scale=scale, initial_state=initial_state,
                                           cu_seqlens=cu_seqlens, **sizing)
    return _chunk_delta_rule_torch(q, k, v, beta, log_decay, scale, initial_state, chunk_size, cu_seqlens=cu_seqlens)


def _chunk_delta_rule_torch(q: Tensor, k: Tensor, v: Tensor, beta: Tensor, log_decay: Tensor | None,
                            scale: float, initial_state: Tensor | None,
                            chunk_size: int | None, cu_seqlens: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """chunk_delta_rule as torch ops (differentiable by autograd; any device): the CPU path, and
    the Triton path's fallback for training, float64 and shapes its kernels do not take.

    Without autograd (no input requires grad, or grad mode is off) the inputs are copied once
    into chunk-major buffers (scale and beta applied in the same pass) and the chunk loop writes
    into preallocated outputs; with autograd the same algebra runs on functional ops. Packed
    sequences (cu_seqlens) run one after another (`chunkwise.by_sequence`)."""
    batch, steps, width_k, width_v = q.shape[0], q.shape[1], q.shape[-1], v.shape[-1]
    lanes = _lanes(q, k, v, beta, log_decay)
    if cu_seqlens is not None:
        bounds = packed_bounds("chunk_delta_rule", cu_seqlens, batch, steps)

        def one(q, k, v, beta, g, initial_state):
            return _chunk_delta_rule_torch(q, k, v, beta, g, scale, initial_state, chunk_size)
        return by_sequence(one, bounds, (q, k, v, beta, log_decay), initial_state, (*lanes, width_k, width_v))
    inputs = (q, k, v, beta, log_decay, initial_state)
    # (inside a torch.compile graph the functional form serves: Inductor plans the buffers, and
    # a thread-local scratch is nothing a graph can hold)
    grad = torch.compiler.is_compiling() or \
        (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs))
    if chunk_size is None:
        chunk_size = _CHUNK_AUTOGRAD if grad else _CHUNK
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    length = min(chunk_size, 1 << max(steps - 1, 0).bit_length())
    count = -(-steps // length)
    heads = math.prod(lanes)
    state = torch.zeros(batch * heads, width_k, width_v, dtype=dtype, device=q.device)
    if initial_state is not None:
        state = initial_state.to(dtype).expand(batch, *lanes, width_k, width_v).reshape(state.shape)
    if steps == 0:
        return v.new_zeros(batch, 0, *lanes, width_v), state.reshape(batch, *lanes, width_k, width_v)
    layout = _Layout(batch, steps, lanes, heads, length, count, dtype, grad)
    o, state = _chunks(layout, q, k, v, beta, log_decay, state, scale)
    o = layout.unpack(o, width_v, v.dtype)
    return o, state.reshape(batch, *lanes, width_k, width_v)


class _Layout:
    """[B, T, *lanes, *width] <-> chunk-major [count, B * H, L, *width] (zero past T)."""

    def __init__(self, batch: int, steps: int, lanes: tuple[int, ...], heads: int, length: int, count: int,
                 dtype: torch.dtype, grad: bool):
        self.batch, self.steps, self.lanes, self.heads = batch, steps, lanes, heads
        self.length, self.count, self.dtype, self.grad = length, count, dtype, grad

    def _heads(self, x: Tensor, width: tuple[int, ...]) -> Tensor:
        """x [B, T or 1, *lanes, *width] as [B, T, H, *width] (a view when the lanes allow)."""
        x = x.expand(self.batch, self.steps, *self.lanes, *width)
        return x.reshape(self.batch, self.steps, self.heads, *width)

    def pack(self, x: Tensor, width: tuple[int, ...], factor: Tensor | float | None = None,
             out: Tensor | None = None) -> Tensor:
        """x (times factor: a float, or [B, T or 1, *lanes] per token) in the chunk-major layout,
        written into `out` ([count, B, H, L, *width], any strides) when given and not under
        autograd; returns [count, B, H, L, *width]."""
        batch, steps, length, count = self.batch, self.steps, self.length, self.count
        x = self._heads(x, width)
        if isinstance(factor, Tensor):
            factor = self._heads(factor, ()).reshape(batch, steps, self.heads, *(1,) * len(width))
        axes = (1, 0, 3, 2, *range(4, 4 + len(width)))  # [count, B, H, L, ...] <-> [B, count, L, H, ...]
        if self.grad:
            x = x.to(self.dtype)
            if factor is not None:
                x = x * (factor.to(self.dtype) if isinstance(factor, Tensor) else factor)
            if count * length > steps:
                x = F.pad(x, (0, 0) * (len(width) + 1) + (0, count * length - steps))
            return x.reshape(batch, count, length, self.heads, *width).permute(axes)
        if out is None:
            out = torch.empty(count, batch, self.heads, length, *width, dtype=self.dtype, device=x.device)
        if x.dtype != self.dtype:
            x = x.to(self.dtype)
        if isinstance(factor, Tensor) and factor.dtype != self.dtype:
            factor = factor.to(self.dtype)
        target = out.permute(axes)  # [B, count, L, H, ...]
        full = steps // length
        pieces = [(target[:, :full], slice(0, full * length), (batch, full, length))] if full else []
        if full < count:  # the last chunk: steps - full * length tokens, zeros after them
            rest = steps - full * length
            pieces.append((target[:, full, :rest], slice(full * length, steps), (batch, rest)))
            target[:, full, rest:].zero_()
        for dst, span, shape in pieces:
            src = x[:, span].reshape(*shape, self.heads, *width)
            if factor is None:
                dst.copy_(src)
            elif isinstance(factor, Tensor):
                torch.mul(src, factor[:, span].reshape(*shape, self.heads, *(1,) * len(width)), out=dst)
            else:
                torch.mul(src, factor, out=dst)
        return out

    def tokens(self, x: Tensor) -> Tensor:
        """x [count * B * H, L, 1] (per token, chunk-major) back as [B, T, *lanes]."""
        x = x.reshape(self.count, self.batch, self.heads, self.length).permute(1, 0, 3, 2)
        x = x.reshape(self.batch, self.count * self.length, *self.lanes)
        return x[:, :self.steps]

    def unpack(self, o: Tensor, width: int, dtype: torch.dtype) -> Tensor:
        """o [count * B * H, L, width] as [B, T, *lanes, width] in dtype."""
        batch, steps, length, count, heads = self.batch, self.steps, self.length, self.count, self.heads
        o = o.view(count, batch, heads, length, width).permute(1, 0, 3, 2, 4)  # [B, count, L, H, V]
        if self.grad:
            o = o.reshape(batch, count * length, *self.lanes, width)[:, :steps]
            return o.to(dtype)
        out = torch.empty(batch, steps, heads, width, dtype=dtype, device=o.device)
        full = steps // length
        if full:
            out[:, :full * length].view(batch, full, length, heads, width).copy_(o[:, :full])
        if full < count:
            out[:, full * length:].copy_(o[:, full, :steps - full * length])
        return out.view(batch, steps, *self.lanes, width)


def _triton_wanted(q: Tensor) -> bool:
    """CUDA tensors run the Triton kernels where Triton is installed (psmc.runtime.triton_delta,
    triton_delta_step, triton_dplr, triton_dplr_step); `chunkwise.BACKEND = "triton"` also
    sends CPU tensors there (the interpreter tests), "torch" none (as for chunkwise)."""
    if _chunkwise.BACKEND == "torch" or (_chunkwise.BACKEND != "triton" and not q.is_cuda):
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def native_for(backend: str) -> bool:
    """Whether a layer on `backend` steps the delta rule with the fused C++ token
    (`delta_rule_step(native=True)`): backend='cpu', or 'auto' unless PSMC_CPU=0 (the switch
    that keeps 'auto' off the generated C++ kernels too)."""
    return backend == "cpu" or (backend == "auto" and os.environ.get("PSMC_CPU", "1") != "0")


def delta_rule_step(
    S: Tensor | None,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    beta: Tensor,
    log_decay: Tensor | None = None,
    *,
    scale: float = 1.0,
    native: bool = False,
) -> tuple[Tensor, Tensor]:
    """One token of the (gated) delta rule in O(K V), never forming the K x K transition.

    Args:
        S: the state before the token, [B, *lanes, K, V] (None: zeros); q, k: [B, *lanes, K]; v: [B, *lanes, V];
            beta, log_decay (or None): [B, *lanes]. Lane axes broadcast.
        scale: multiplies the output.
        native: run the token as one fused C++ loop (`_psmc_lane.delta_step`, cpu_lane.cpp) when
            it can: grad mode off, not tracing, CPU tensors of one float dtype with the same
            leading axes (strided ones are copied), the module built. Otherwise (and always with native=False)
            the torch code below, which gives the same values up to summation order.

    Returns:
        (o, new_S): o = scale * q @ new_S [B, *lanes, V] in v's dtype; new_S =
        g (S - beta k (k^T S)) + beta k v^T in S's dtype (at least float32).
    """
    if _triton_wanted(q):
        from psmc.runtime import triton_delta_step
        if triton_delta_step.takes(S, q, k, v, beta, log_decay):
            return triton_delta_step.triton_delta_step(S, q, k, v, beta, log_decay, scale=scale)
    if native and not torch.is_grad_enabled() and not torch.compiler.is_compiling():
        lane = cpu_support.decode_lane()
        done = None if lane is None else lane.delta_step(
            S if S is None else S.contiguous(), q.contiguous(), k.contiguous(), v.contiguous(), beta.contiguous(),
            log_decay if log_decay is None else log_decay.contiguous(), float(scale))
        if done is not None:
            return done
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


def delta_product_step(
    S: Tensor | None,
    q: Tensor,
    keys: Sequence[Tensor],
    values: Sequence[Tensor],
    betas: Sequence[Tensor],
    log_decay: Tensor | None = None,
    *,
    scale: float = 1.0,
    native: bool = False,
) -> tuple[Tensor, Tensor]:
    """One token of r delta steps (DeltaProduct): `delta_rule_step` with (keys[j], values[j],
    betas[j]) for j = 0 .. r - 1 in order, the gate before the first, and the output after the
    last. Shapes as `delta_rule_step`'s, per step (lane axes broadcast).

    CUDA tensors run the r steps in one kernel launch (`triton_delta_step` with `steps` = r:
    the state read and written once per token, not once per step); with `native`, CPU tensors
    run them in one fused C++ token (`_psmc_lane.delta_step` given the steps as tuples: one new
    state, updated in place by the later steps, and one output); elsewhere the steps are r
    `delta_rule_step` calls."""
    if _triton_wanted(q):
        from psmc.runtime import triton_delta_step
        if triton_delta_step.serves(S, [q, *keys, *values, *betas, log_decay], q.shape[-1]):  # (before stacking)
            k, v, beta = _stacked_steps(keys, values, betas)
            return triton_delta_step.triton_delta_step(S, q, k, v, beta, log_decay, scale=scale, steps=len(keys))
    if native and not torch.is_grad_enabled() and not torch.compiler.is_compiling() and len(keys) > 1:
        lane = cpu_support.decode_lane()
        if lane is not None:  # (the steps as tuples: no stacking copy)
            done = lane.delta_step(S if S is None else S.contiguous(), q.contiguous(),
                                   *(tuple(t.contiguous() for t in ts) for ts in (keys, values, betas)),
                                   log_decay if log_decay is None else log_decay.contiguous(), float(scale))
            if done is not None:
                return done
    o = None
    for j, (k, v, beta) in enumerate(zip(keys, values, betas)):
        o, S = delta_rule_step(S, q, k, v, beta, log_decay if j == 0 else None, scale=scale, native=native)
    return o, S


def _stacked_steps(keys: Sequence[Tensor], values: Sequence[Tensor], betas: Sequence[Tensor]) -> tuple:
    """The r steps' keys [..., r, K], values [..., r, V] and strengths [..., r], stacked after the
    lane axes (each broadcast to the others' shape first)."""
    return (torch.stack(torch.broadcast_tensors(*keys), dim=-2), torch.stack(torch.broadcast_tensors(*values), dim=-2),
            torch.stack(torch.broadcast_tensors(*betas), dim=-1))


def _chunks(layout: _Layout, q: Tensor, k: Tensor, v: Tensor, beta: Tensor, g: Tensor | None,
            state: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """scale * outputs [count * BH, L, V] of every chunk entered with `state` [BH, K, V], and
    the state that leaves the last one.

    Work per chunk and head (L = chunk length): one [2L, K] x [K, L] product for K K^T and
    Q K^T together, one unit triangular inverse, [L, L] x [L, V + K] for U and W, two
    [L, K] x [K, V] products in the sequential loop (U - W S and the state update) and two for
    the outputs (Q S and the attention term: batched after the loop under autograd, inside it
    without).

    Without autograd the per-token factors go where they cost least: beta (and beta gamma)
    scale the columns of the [L, L] inverse rather than V and K (U = (T diag beta) V, W =
    (T diag beta gamma) K, with K the packed keys), and the loop runs in place on one running
    state, each chunk's outputs computed while its entering state is at hand (no [count, BH,
    K, V] store of entering states, no copy per baddbmm)."""
    count, length, grad = layout.count, layout.length, layout.grad
    width_k, width_v = k.shape[-1], v.shape[-1]
    heads = layout.batch * layout.heads
    chunks = count * heads
    if not grad:
        return _chunks_inplace(layout, q, k, v, beta, g, state, scale)

    b = layout.pack(beta, ()).reshape(chunks, length, 1)
    written = beta  # the per-token factor of the W columns: beta, or beta gamma when gated
    if g is not None:
        g = layout.pack(g, ()).reshape(chunks, length)
        gamma = torch.exp(torch.cumsum(g, dim=-1))[..., None]  # gamma_i: the gates from the chunk start to i
        written = layout.tokens(b * gamma)
    # rows [K; scale Q] (one product gives K K^T and Q K^T) and columns [beta V | beta gamma K]
    # (one product gives U and W), packed straight from the inputs
    stacked = torch.cat([layout.pack(k, (width_k,)), layout.pack(q, (width_k,), scale)], dim=-2)
    right = torch.cat([layout.pack(v, (width_v,), beta), layout.pack(k, (width_k,), written)], dim=-1)
    stacked = stacked.reshape(chunks, 2 * length, width_k)
    right = right.reshape(chunks, length, width_v + width_k)
    keys, queries = stacked[:, :length], stacked[:, length:]
    scores = torch.bmm(stacked, keys.transpose(-1, -2))  # [K K^T; scale Q K^T]  [chunks, 2L, L]
    if g is not None:
        pairs = scores.view(chunks, 2, length, length)
        scores = (pairs * _gate_ratio(g, length, inplace=False)[:, None]).view(chunks, 2 * length, length)
        # queries read the entering state decayed to each position; keys write decayed to the chunk end
        queries = queries * gamma
        decayed = keys * torch.exp(_suffix_sums(g))[..., None]
        gate = gamma[:, -1:].view(count, heads, 1, 1)  # gamma_L per chunk and head
    else:
        decayed, gate = keys, None
    attn = scores[:, length:]
    if g is None:  # causal (the gated ratio is already 0 above the diagonal)
        attn = attn.tril()
    # T = A^-1, A = I + strict_tril(diag(beta) (K K^T (.) Gamma)): solve_triangular reads only the
    # strict lower triangle of `lower` (unit diagonal); an inverse and one product beat one solve
    # with K + V right-hand sides (LAPACK's batched trsm is slow at this size)
    eye = torch.eye(length, dtype=layout.dtype, device=q.device)
    lower = b * scores[:, :length]
    inverse = torch.linalg.solve_triangular(lower, eye.expand_as(lower), upper=False, unitriangular=True)
    uw = torch.bmm(inverse, right).view(count, heads, length, width_v + width_k)  # [U | W]
    u, w = uw[..., :width_v], uw[..., width_v:]
    keys_t = decayed.view(count, heads, length, width_k).transpose(-1, -2)  # [count, BH, K, L]
    # the chunks in order: what a chunk writes, U - W S, depends on the state entering it
    entering, new = [], []
    for c in range(count):
        entering.append(state)
        new.append(torch.baddbmm(u[c], w[c], state, alpha=-1.0))
        state = torch.baddbmm(state if gate is None else gate[c] * state, keys_t[c], new[-1])
    entering, new = torch.cat(entering), torch.cat(new)
    o = torch.bmm(queries, entering.reshape(chunks, width_k, width_v))
    o = o.baddbmm(attn, new.reshape(chunks, length, width_v))
    return o, state


def _gate_ratio(g: Tensor, length: int, inplace: bool = True) -> Tensor:
    """Gamma [chunks, L, L] from the chunk-major log gates g [chunks, L]: exp of the sum of g
    over j < r <= i on and below the diagonal (gamma_i / gamma_j), 0 above it.

    A cumsum down each column, exact for any gates (tril after the exp: an exp of -inf is ~10x
    slower than of a number on this CPU, so no -inf fill before it)."""
    strict = torch.ones(length, length, dtype=torch.bool, device=g.device).tril(-1)
    span = torch.cumsum(torch.where(strict, g[..., :, None], 0.0), dim=-2)
    return span.exp_().tril_() if inplace else span.exp().tril()


def _chunks_inplace(layout: _Layout, q: Tensor, k: Tensor, v: Tensor, beta: Tensor, g: Tensor | None,
                    state: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """`_chunks` without autograd: the same algebra on reused scratch buffers, in place."""
    count, length = layout.count, layout.length
    width_k, width_v = k.shape[-1], v.shape[-1]
    heads = layout.batch * layout.heads
    chunks = count * heads
    scratch = _Scratch(q.device, layout.dtype)
    split = (count, layout.batch, layout.heads, length)
    b = layout.pack(beta, (), out=scratch.get("b", split)).view(chunks, length, 1)
    # rows [K; scale Q]: one product gives K K^T and Q K^T; V on its own (beta goes into T)
    stacked = scratch.get("stacked", (count, layout.batch, layout.heads, 2 * length, width_k))
    layout.pack(k, (width_k,), out=stacked[..., :length, :])
    layout.pack(q, (width_k,), scale, out=stacked[..., length:, :])
    values = layout.pack(v, (width_v,), out=scratch.get("values", (*split, width_v))).view(chunks, length, width_v)
    stacked = stacked.view(chunks, 2 * length, width_k)
    keys, queries = stacked[:, :length], stacked[:, length:]
    scores = torch.bmm(stacked, keys.transpose(-1, -2), out=scratch.get("scores", (chunks, 2 * length, length)))
    if g is not None:
        g = layout.pack(g, (), out=scratch.get("g", split)).view(chunks, length)
        gamma = torch.exp(torch.cumsum(g, dim=-1))[..., None]  # gamma_i: the gates from the chunk start to i
        scores.view(chunks, 2, length, length).mul_(_gate_ratio(g, length)[:, None])
        # queries read the entering state decayed to each position; keys write decayed to the chunk end
        queries = torch.mul(queries, gamma, out=scratch.get("queries", (chunks, length, width_k)))
        decayed = torch.mul(keys, torch.exp(_suffix_sums(g))[..., None],
                            out=scratch.get("decayed", (chunks, length, width_k)))
        gate = gamma[:, -1:].view(count, heads, 1, 1)  # gamma_L per chunk and head
    else:
        decayed, gate = keys, None
        scores[:, length:].tril_()  # causal (the gated ratio is already 0 above the diagonal)
    attn = scores[:, length:]
    # T = A^-1 (see _chunks), then its columns scaled: U = (T diag beta) V, W = (T diag beta gamma) K
    eye = torch.eye(length, dtype=layout.dtype, device=q.device)
    lower = torch.mul(b, scores[:, :length], out=scratch.get("lower", (chunks, length, length)))
    inverse = torch.linalg.solve_triangular(lower, eye.expand_as(lower), upper=False, unitriangular=True,
                                            out=scratch.get("inverse", (chunks, length, length)))
    inverse.mul_(b.view(chunks, 1, length))
    new = torch.bmm(inverse, values, out=scratch.get("new", (chunks, length, width_v)))
    if g is not None:
        inverse.mul_(gamma.view(chunks, 1, length))
    w = torch.bmm(inverse, keys, out=scratch.get("w", (chunks, length, width_k)))
    keys_t = decayed.view(count, heads, length, width_k).transpose(-1, -2)  # [count, BH, K, L]
    # the chunks in order on one running state S: new = U - W S (in place in U); the outputs
    # Q S + attn new while S is the entering state; then S <- gate S + K_d^T new
    running = scratch.get("running", (heads, width_k, width_v))
    running.copy_(state)
    o = scratch.get("o", (count, heads, length, width_v))
    rows = zip(new.view(count, heads, length, width_v).unbind(0), w.view(count, heads, length, width_k).unbind(0),
               keys_t.unbind(0), queries.view(count, heads, length, width_k).unbind(0),
               attn.view(count, heads, length, length).unbind(0), o.unbind(0))
    for c, (u_c, w_c, k_c, q_c, attn_c, o_c) in enumerate(rows):
        u_c.baddbmm_(w_c, running, alpha=-1.0)
        torch.bmm(q_c, running, out=o_c).baddbmm_(attn_c, u_c)
        if gate is not None:
            running.mul_(gate[c])
        running.baddbmm_(k_c, u_c)
    return o.view(chunks, length, width_v), running.clone()


class _Scratch:
    """The buffer path's scratch tensors, kept for the next call in this thread.

    A fresh multi-MB tensor comes from new pages (glibc serves it by mmap, or after trimming its
    heap), so a call that allocates its scratch afresh pays a page fault per 4 KiB: at (B, T, H,
    K, V) = (2, 1024, 4, 64, 64) ~6000 faults and ~18 ms instead of ~9 ms (1 thread; which of the
    two a process gets depended on what it had freed before). Kept: CPU tensors only (no stream
    order to mind), at most _SCRATCH_BYTES per thread, one set per (device, dtype, inference mode)
    at a time; a tensor of another shape replaces its predecessor. Nothing a call returns lives
    here, and nothing here outlives the call's use of it (calls in one thread do not overlap)."""

    def __init__(self, device: torch.device, dtype: torch.dtype):
        self.device, self.dtype = device, dtype
        key = (device, dtype, torch.is_inference_mode_enabled())
        kept = getattr(_SCRATCH, "kept", None)
        if device.type != "cpu":
            self.tensors = {}
        elif kept is not None and kept[0] == key:
            self.tensors = kept[1]
        else:
            self.tensors = {}
            _SCRATCH.kept = (key, self.tensors)

    def get(self, name: str, shape: tuple[int, ...]) -> Tensor:
        found = self.tensors.get(name)
        if found is not None and found.shape == shape:
            return found
        self.tensors.pop(name, None)
        made = torch.empty(shape, dtype=self.dtype, device=self.device)
        if self.device.type == "cpu" and made.nbytes + sum(t.nbytes for t in self.tensors.values()) <= _SCRATCH_BYTES:
            self.tensors[name] = made
        return made


_SCRATCH = threading.local()
_SCRATCH_BYTES = 64 << 20


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
