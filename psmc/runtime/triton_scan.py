"""The first-order scan h_t = a_t * h_{t-1} + b_t as a Triton kernel (forward and backward).

Layout: a program owns one batch row and BLOCK_C channels and walks the whole sequence in
tiles of BLOCK_T steps. Each tile is a [BLOCK_T, BLOCK_C] load (coalesced over the channels),
scanned over time (`tl.associative_scan` over axis 0); the carry from the earlier tiles is
applied as h = H_local + A_local * carry. The carry for the next tile is the tile's last row
(padded rows are the identity (1, 0), so it is always row BLOCK_T - 1).

Which threads hold which part of a tile is Triton's choice, and the compiled layout (TTGIR,
`python -m psmc.triton_aot`) shows it: Triton vectorises the channel axis (16-byte loads: 4
fp32 or 8 bf16 channels per thread) and gives the rest of the warps to time. So the tiling
`LAYOUT` picks decides where time goes (`tiles`):

- "split" (the default; BLOCK_T = 32, BLOCK_C = 128, 4 warps): for fp32 the 4 warps split the
  tile's time axis, and the scan combines them through 32 KB of shared memory per tile;
- "in-thread" (BLOCK_C = vector width x 32 x warps, BLOCK_T = 64 / vector width): every warp
  takes its own channels and each thread scans its channels' whole tile sequentially in
  registers (no shared memory, no shuffles: accelerated-scan's "time inside each thread"), at
  4x fewer threads per channel block and 64 elements per thread per tensor;
- "narrow" ([64, 32] tiles, 1 warp): 16x the programs of "in-thread" (512 at (B, C) =
  (8, 2048), against 32; "split" gives 128). The compiled layout (sm_90) gives each thread a
  16-byte vector of 4 channels and 16 steps; 8 threads span the channels and 4 split time (a
  scan through warp shuffles, 128 B of shared memory); 193 registers, no spills.

Timed on an H200 (2026-12-04, fp32, (B, C, T) = (8, 2048, 4096), docs/benchmarks.md): split
0.645 ms forward (30 % of the device's copy bandwidth) on 128 programs, in-thread 0.792 ms
on only 32 programs, accelerated-scan 0.249 ms. In-thread did 3x the work per program of
split, so "narrow" keeps most of its time inside each thread and gives it the programs it
lacked; it has not been timed yet. With LAYOUT None (the default) psmc.runtime.autotune
times every layout per shape on the GPU that runs the call, and `benchmarks/gpu.py` times
each fixed.

- dtypes: a and b are read in their own dtype (bf16/fp16/fp32), the state and the
  arithmetic are fp32, h is written in the output tensor's dtype (the inputs' dtype);
- offsets are int64 (batch, time and channel indices are widened before any multiply), so
  tensors above 2^31 elements are addressed correctly;
- the grid is one axis, (batch x channel blocks,): no lane axis on grid dimensions 1/2 and
  their 65,535 limit;
- the time tail (T not a multiple of BLOCK_T) and the channel tail are masked;
- the backward is the same kernel run in reverse time (REVERSE: step s reads token T-1-s and
  the decay of token T-s), which gives the adjoint x_t = dL/dh_t = g_t + a_{t+1} x_{t+1}.

Like the generated kernels, they are interpreted when TRITON_INTERPRET=1 is set before this
module is imported (tests on CPU), JIT-compiled for CUDA otherwise.
"""
from __future__ import annotations

import os

import torch

from . import autotune
from .custom_ops import traced

BLOCK_T = 32  # steps per tile ("split"): enough independent loads in flight per thread to hide latency
NUM_WARPS = 4
# "split" or "in-thread" (see the module docstring) for every launch; None: each shape takes the
# faster of the two on its GPU (psmc.runtime.autotune; "split" where nothing is timed)
LAYOUT: str | None = None
LAYOUTS = ("split", "in-thread", "narrow")  # the autotuner's candidates, the static choice first


def tiles(C: int, element_size: int, layout: str | None = None) -> tuple:
    """(BLOCK_T, BLOCK_C, num_warps) for C channels of inputs of `element_size` bytes."""
    layout = layout or LAYOUT or LAYOUTS[0]
    if layout == "narrow":  # a warp per program: many programs (see the module docstring)
        return 64, 32 if C >= 32 else max(16, 1 << (C - 1).bit_length()), 1
    if layout == "in-thread":
        vector = max(1, 16 // element_size)  # channels per thread in a 16-byte load
        warps = NUM_WARPS
        while warps > 1 and vector * 32 * warps > C:  # fewer warps for few channels
            warps //= 2
        return max(1, 64 // vector), vector * 32 * warps, warps
    if layout != "split":
        raise ValueError(f"unknown first-order layout {layout!r}: one of {', '.join(map(repr, LAYOUTS))}")
    block_c = 32 * NUM_WARPS if C >= 32 * NUM_WARPS else max(16, 1 << (C - 1).bit_length())
    return BLOCK_T, block_c, NUM_WARPS


def unusable_reason(device) -> str | None:
    """Why the first-order Triton kernel cannot run on `device` (None when it can)."""
    from . import triton_support
    try:
        import triton  # noqa: F401
    except ImportError:
        return "Triton is not installed"
    if device.type == "cuda" or triton_support.RECORDING:
        return None
    if device.type == "cpu":
        if os.environ.get("TRITON_INTERPRET") == "1":
            return None
        return "the inputs are CPU tensors: Triton needs CUDA tensors (or TRITON_INTERPRET=1, for tests)"
    return f"the inputs are on {device.type}: Triton kernels need CUDA tensors"


try:
    import triton
    import triton.language as tl
except ImportError:  # the torch paths serve every call
    triton = None

if triton is not None:
    @triton.jit
    def _first_order_combine(a1, h1, a2, h2):
        return a1 * a2, a2 * h1 + h2

    @triton.jit
    def _first_order_scan(a_ptr, b_ptr, h0_ptr, out_ptr, last_ptr, T, C, n_cblocks,
                          s_ab, s_at, s_ac, s_bb, s_bt, s_bc, s_ob, s_ot, s_oc,
                          HAS_H0: tl.constexpr, REVERSE: tl.constexpr,
                          BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
        pid = tl.program_id(0)
        batch = (pid // n_cblocks).to(tl.int64)
        ch = (pid % n_cblocks).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C).to(tl.int64)
        c_ok = ch < C
        rows = tl.arange(0, BLOCK_T)
        if HAS_H0:
            carry = tl.load(h0_ptr + batch * C + ch, mask=c_ok, other=0.0).to(tl.float32)
        else:
            carry = tl.zeros((BLOCK_C,), tl.float32)
        a_base = a_ptr + batch * s_ab + ch[None, :] * s_ac
        b_base = b_ptr + batch * s_bb + ch[None, :] * s_bc
        o_base = out_ptr + batch * s_ob + ch[None, :] * s_oc
        for start in range(0, T, BLOCK_T):
            s = start + rows
            s_ok = s < T
            if REVERSE:
                t = (T - 1 - s).to(tl.int64)
                ta = t + 1  # the decay that carries x_{t+1} back to token t
                a_ok = s_ok & (s > 0)
            else:
                t = s.to(tl.int64)
                ta = t
                a_ok = s_ok
            ok = s_ok[:, None] & c_ok[None, :]
            a = tl.load(a_base + ta[:, None] * s_at, mask=a_ok[:, None] & c_ok[None, :], other=1.0).to(tl.float32)
            x = tl.load(b_base + t[:, None] * s_bt, mask=ok, other=0.0).to(tl.float32)
            a = tl.where(s_ok[:, None], a, 1.0)  # padded steps are the identity (1, 0)
            A, H = tl.associative_scan((a, x), 0, _first_order_combine)
            H = H + A * carry[None, :]
            tl.store(o_base + t[:, None] * s_ot, H.to(out_ptr.dtype.element_ty), mask=ok)
            carry = tl.sum(tl.where((rows == BLOCK_T - 1)[:, None], H, 0.0), axis=0)
        tl.store(last_ptr + batch * C + ch, carry, mask=c_ok)


def _as_bt_c(x: torch.Tensor, shape) -> torch.Tensor:
    """x broadcast to shape [B, T, *rest] as a [B, T, C] view (a copy only when the rest axes
    cannot be merged)."""
    x = x.expand(shape)
    return x.reshape(shape[0], shape[1], -1)


def launch(a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor | None, out: torch.Tensor, reverse: bool) -> torch.Tensor:
    """out[B, T, C] = the scan of (a, b) (reverse: the adjoint scan); returns the fp32 state
    that leaves the sequence [B, C]. The layout is LAYOUT, or the one tuned for this shape."""
    B, T, C = out.shape
    last = torch.empty(B, C, device=out.device, dtype=torch.float32)
    element_size = max(a.element_size(), b.element_size())
    h0_arg = h0 if h0 is not None else last  # unread without HAS_H0

    def run(layout: str) -> None:
        block_t, block_c, warps = tiles(C, element_size, layout)
        n_cblocks = -(-C // block_c)
        _first_order_scan[(B * n_cblocks,)](
            a, b, h0_arg, out, last, T, C, n_cblocks,
            a.stride(0), a.stride(1), a.stride(2), b.stride(0), b.stride(1), b.stride(2),
            out.stride(0), out.stride(1), out.stride(2),
            HAS_H0=h0 is not None, REVERSE=reverse, BLOCK_T=block_t, BLOCK_C=block_c, num_warps=warps)

    autotune.launch(tuning_key(a, b, out, reverse), (LAYOUT,) if LAYOUT else LAYOUTS, run, out.device)
    return last


def tuning_key(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, reverse: bool) -> tuple:
    """What the layout's speed depends on: the dtypes, the programs (batch x channel blocks,
    to a power of two) and the sequence length (to a power of two, 64K and up alike)."""
    B, T, C = out.shape
    return ("first-order", reverse, a.dtype, b.dtype, out.dtype, out.device,
            autotune.bucket(B), autotune.bucket(C), autotune.bucket(T, autotune.LONG), a.stride(1) == 0, b.stride(1) == 0)


def _launch_scan(a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor | None, dtype: torch.dtype,
                 reverse: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [B, T, C] in `dtype`, the fp32 state leaving the sequence [B, C]) of `launch` for
    a, b [B, T, C] (views, maybe stride 0) and h0 [B, C] fp32 contiguous or None."""
    out = torch.empty(b.shape[0], b.shape[1], b.shape[2], device=b.device, dtype=dtype)
    return out, launch(a, b, h0, out, reverse)


# Under torch.compile the launch is this op (psmc.runtime.custom_ops): a graph holds one node
# and Dynamo never traces the launch or its layout autotuner.
_scan_op = torch.library.custom_op("psmc::first_order_scan", _launch_scan, mutates_args=())


@_scan_op.register_fake
def _scan_fake(a, b, h0, dtype, reverse):
    B, T, C = b.shape
    return b.new_empty(B, T, C, dtype=dtype), b.new_empty(B, C, dtype=torch.float32)


_scan = traced(_scan_op, _launch_scan)


class FirstOrderScan(torch.autograd.Function):
    """(h [B, T, *rest], h_last [B, *rest]) from a, b [B, T, *rest] (broadcast to one shape,
    any float dtype) and h0 [B, *rest] fp32 or None. h is in the inputs' promoted dtype, h_last
    in fp32 (the carried state)."""

    @staticmethod
    def forward(ctx, a, b, h0):
        shape = torch.broadcast_shapes(a.shape, b.shape)
        dtype = torch.promote_types(a.dtype, b.dtype)
        a3, b3 = _as_bt_c(a, shape), _as_bt_c(b, shape)
        h03 = None if h0 is None else h0.expand(shape[0], *shape[2:]).reshape(shape[0], -1).float().contiguous()
        out, last = _scan(a3, b3, h03, dtype, False)
        ctx.save_for_backward(a, h0, out)
        ctx.shape, ctx.b_shape, ctx.b_dtype = shape, b.shape, b.dtype
        return out.reshape(shape), last.reshape(shape[0], *shape[2:])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_h, grad_last):
        a, h0, out = ctx.saved_tensors
        shape = ctx.shape
        B, T, C = out.shape
        g = grad_h if grad_h is not None else torch.zeros((), device=out.device, dtype=out.dtype)
        g = _as_bt_c(g, shape)
        if grad_last is not None:  # h_last = h_{T-1}: its gradient joins the last token's
            g = g.clone(memory_format=torch.contiguous_format)
            g[:, -1] += grad_last.reshape(B, C).to(g.dtype)
        a3 = _as_bt_c(a, shape)
        x, _ = _scan(a3, g, None, torch.float32, True)
        grad_a = grad_b = grad_h0 = None
        if ctx.needs_input_grad[0]:
            prev = torch.empty_like(x)
            prev[:, 1:] = out[:, :-1]
            prev[:, 0] = 0.0 if h0 is None else h0.expand(B, *shape[2:]).reshape(B, C)
            grad_a = (x * prev).reshape(shape).sum_to_size(a.shape).to(a.dtype)
        if ctx.needs_input_grad[1]:
            grad_b = x.reshape(shape).sum_to_size(ctx.b_shape).to(ctx.b_dtype)
        if h0 is not None and ctx.needs_input_grad[2]:
            grad_h0 = (a3[:, 0].float() * x[:, 0]).reshape(B, *shape[2:]).sum_to_size(h0.shape).to(h0.dtype)
        return grad_a, grad_b, grad_h0
