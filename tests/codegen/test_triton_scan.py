"""The first-order Triton scan (psmc.runtime.triton_scan) under TRITON_INTERPRET=1 against the
torch blocked loop (psmc.runtime.fastpaths.linear_recurrence, kernel='torch'): forward, final
state, gradients of a, b and h0, ragged time and channel tails, broadcast decays, bf16 I/O;
and the dispatcher's choice of it."""
from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are built

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import given, strategies as st  # noqa: E402

from psmc.runtime import dispatch, triton_scan  # noqa: E402
from psmc.runtime.fastpaths import linear_recurrence  # noqa: E402
from triton_helpers import close, layer_class  # noqa: E402

pytestmark = pytest.mark.triton


def _data(B, T, rest, seed, a_rest=None, initial=False, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    a_rest = rest if a_rest is None else a_rest
    a = (torch.rand(B, T, *a_rest, generator=g) * 0.5 + 0.5).to(dtype)
    b = torch.randn(B, T, *rest, generator=g).to(dtype)
    h0 = torch.randn(B, *rest, generator=g) if initial else None
    return a, b, h0


@given(B=st.integers(1, 2), T=st.sampled_from([1, 5, 16, 17, 32, 33, 70]), C=st.sampled_from([1, 3, 130, 520]),
       initial=st.booleans(), seed=st.integers(0, 99), layout=st.sampled_from(triton_scan.LAYOUTS))
def test_forward_and_gradients_equal_the_torch_loop(B, T, C, initial, seed, layout):
    """T around the tiles (32 split, 16 in-thread, 64 narrow) and C around the channel blocks (128, 512, 32):
    both tails masked, in both layouts."""
    triton_scan.LAYOUT = layout
    try:
        _forward_and_gradients(B, T, C, initial, seed)
    finally:
        triton_scan.LAYOUT = None


@pytest.mark.parametrize("layout", triton_scan.LAYOUTS)
def test_every_layout_past_its_tiles(layout):
    """T = 70 and C = 33 pass one tile of every layout on both axes (64 x 32 the largest of
    narrow): forward, final state and gradients against the torch loop, with an initial state."""
    triton_scan.LAYOUT = layout
    try:
        _forward_and_gradients(2, 70, 33, True, 3)
    finally:
        triton_scan.LAYOUT = None


def test_tiles_per_layout():
    """split: [32, 128] tiles at 4 warps (fewer channels: a smaller block); in-thread: a block of
    16-byte vectors x 32 threads x warps channels, 64 elements per thread per tensor, fewer warps
    for few channels; narrow: [64, 32] tiles, one warp."""
    assert triton_scan.tiles(2048, 4, "split") == (32, 128, 4)
    assert triton_scan.tiles(3, 4, "split") == (32, 16, 4)
    assert triton_scan.tiles(2048, 4, "in-thread") == (16, 512, 4)
    assert triton_scan.tiles(2048, 2, "in-thread") == (8, 1024, 4)
    assert triton_scan.tiles(200, 4, "in-thread") == (16, 128, 1)
    # narrow: [64, 32] on one warp: 16x the programs of in-thread
    assert triton_scan.tiles(2048, 4, "narrow") == (64, 32, 1)
    assert triton_scan.tiles(2048, 2, "narrow") == (64, 32, 1)
    assert triton_scan.tiles(5, 4, "narrow") == (64, 16, 1)
    with pytest.raises(ValueError, match="unknown first-order layout 'x'"):
        triton_scan.tiles(8, 4, "x")


def _forward_and_gradients(B, T, C, initial, seed):
    a, b, h0 = _data(B, T, (C,), seed, initial=initial)
    results = []
    for kernel in ("torch", "triton"):
        leaves = [t.clone().requires_grad_() for t in (a, b) + ((h0,) if initial else ())]
        h, last = linear_recurrence(leaves[0], leaves[1], leaves[2] if initial else None, kernel=kernel)
        w = torch.randn(h.shape, generator=torch.Generator().manual_seed(1))
        ((h * w).sum() + (last * 0.5).sum()).backward()
        results.append((h.detach(), last.detach(), [t.grad for t in leaves]))
    (h_ref, last_ref, g_ref), (h, last, grads) = results
    close(h_ref, h, "h")
    close(last_ref, last, "h_last")
    for i, (r, o) in enumerate(zip(g_ref, grads)):
        close(r, o, f"grad {i}")


def test_broadcast_decay_and_lanes():
    """a shared by the channels of a lane group ([B, T, 2, 1] against b [B, T, 2, 3]): a stride-0
    load, and the gradient of a sums over the broadcast axis."""
    a, b, _ = _data(2, 9, (2, 3), 4, a_rest=(2, 1))
    results = []
    for kernel in ("torch", "triton"):
        la, lb = a.clone().requires_grad_(), b.clone().requires_grad_()
        h, _ = linear_recurrence(la, lb, None, kernel=kernel)
        h.square().sum().backward()
        results.append((h.detach(), la.grad, lb.grad))
    for r, o in zip(*results):
        close(r, o)


def test_bf16_in_bf16_out_fp32_state():
    """bf16 inputs are read as bf16 (no copy) and h is written as bf16; the scan runs in fp32, so
    the result is the fp32 scan of the same bf16 values, rounded once."""
    a, b, _ = _data(1, 40, (5,), 7, dtype=torch.bfloat16)
    h, last = linear_recurrence(a, b, None, kernel="triton")
    assert h.dtype == torch.bfloat16
    ref, _ = linear_recurrence(a.float(), b.float(), None, kernel="torch")
    assert torch.equal(h, ref.to(torch.bfloat16)) or (h.float() - ref).abs().max() <= 2 ** -7 * ref.abs().max()


def test_int64_offsets_and_flat_grid_in_the_kernel_source():
    """Golden properties of the kernel text: indices widened to int64 before any multiply by a
    stride, and one grid axis (no lane axis on grid dims 1/2)."""
    import inspect
    fn = triton_scan._first_order_scan
    src = inspect.getsource(getattr(fn, "fn", fn))
    assert "tl.program_id(1)" not in src and "tl.program_id(2)" not in src
    assert ".to(tl.int64)" in src
    for line in src.splitlines():
        if "* s_" in line:  # every stride product is taken on an int64 index
            assert any(name in line for name in ("batch *", "ch[None, :] *", "t[:, None] *", "ta[:, None] *")), line


def test_auto_chooses_the_cheapest_path():
    """CPU tensors: backend='auto' runs torch paths only; backend='triton' on a first-order op
    takes the first-order kernel (cost 10) over the generated block scan (cost 20); a matrix op's
    long forward prefers torch chunkwise over the Triton token loop."""
    lin = layer_class("linear_recurrence")
    x = {"x": torch.randn(1, 8, 3), "log_a": -torch.rand(1, 8, 3)}
    auto = lin(backend="auto")
    assert dispatch.choose(auto, auto._prepare(dict(x), step=False), "forward").name == "torch-first-order"
    forced = lin(backend="triton")
    assert dispatch.choose(forced, forced._prepare(dict(x), step=False), "forward").name == "triton-first-order"
    doubles = {n: t.double() for n, t in x.items()}
    with pytest.raises(RuntimeError, match="triton-first-order: float64 inputs or params: the kernels accumulate in fp32"):
        dispatch.choose(forced, forced._prepare(dict(doubles), step=False), "forward")
    forced.use_fast_path = False
    assert dispatch.choose(forced, forced._prepare(dict(x), step=False), "forward").name == "triton-block-scan"
    gla = layer_class("gla")(backend="auto", K=4, V=4)
    q = {n: torch.randn(1, 100, 2, 4) for n in ("q", "k", "v", "gk")}
    names = {p.name: p.cost(gla, gla._prepare(dict(q), step=False)) for p, _ in
             dispatch.candidates(gla, gla._prepare(dict(q), step=False), "forward")}
    assert names["chunkwise"] < names["triton-token-loop"] < names["torch-scan"]
    torch_only = lin(backend="torch")
    assert not any(p.triton for p, _ in dispatch.candidates(torch_only, torch_only._prepare(dict(x), step=False),
                                                             "forward"))
