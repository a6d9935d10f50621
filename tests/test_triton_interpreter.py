"""tests/triton_interpreter.py: interpreted kernels compute what they did, and a helper called
inside a launch no longer re-patches triton.language."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

import triton_interpreter


@triton.jit
def _twice(x):
    return x + x


@triton.jit
def _square(x):
    return _twice(x) * x * 0.5  # a helper calling a helper


@triton.jit
def _kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    cols = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n
    x = tl.load(x_ptr + cols, mask=mask, other=0.0)
    for _ in range(3):
        x = _square(x) + _twice(x)
    tl.store(y_ptr + cols, tl.exp(-tl.abs(x)), mask=mask)


def _run(x: torch.Tensor) -> torch.Tensor:
    y = torch.empty_like(x)
    _kernel[(triton.cdiv(x.numel(), 16),)](x, y, x.numel(), BLOCK=16)
    return y


def _expected(x: torch.Tensor) -> torch.Tensor:
    for _ in range(3):
        x = x * x + 2 * x
    return torch.exp(-x.abs())


def test_the_fast_path_is_installed_and_kernels_compute_the_same():
    assert triton_interpreter.install(), "the interpreter's internals changed: update tests/triton_interpreter.py"
    x = torch.linspace(-1.5, 1.0, 37)
    before = dict(triton_interpreter.calls)
    torch.testing.assert_close(_run(x), _expected(x))
    patched = triton_interpreter.calls["patched"] - before.get("patched", 0)
    kept = triton_interpreter.calls["kept"] - before.get("kept", 0)
    # the launch patches once; each of its 3 programs calls _square (which calls _twice) and
    # _twice three times: 3 x 3 x 3 helper calls that keep the launch's patch
    assert (patched, kept) == (1, 27)


def test_a_launch_leaves_triton_language_as_it_found_it():
    before = (tl.exp, tl.load, tl.tensor.__add__)
    _run(torch.ones(5))
    assert (tl.exp, tl.load, tl.tensor.__add__) == before


@triton.jit
def _affine(a1, b1, a2, b2):  # x -> a x + b, composed: the first-order scan's combine
    return a1 * a2, b1 * a2 + b2


@triton.jit
def _softmax_pair(m1, s1, m2, s2):  # online softmax's (max, sum): a combine with exp and where
    m = tl.maximum(m1, m2)
    return m, s1 * tl.exp(m1 - m) + s2 * tl.exp(m2 - m)


@triton.jit
def _larger(x, y):
    return tl.where(x > y, x, y)


@triton.jit
def _scans_kernel(a_ptr, b_ptr, out_ptr, R: tl.constexpr, C: tl.constexpr):
    rows = tl.arange(0, R)[:, None]
    cols = tl.arange(0, C)[None, :]
    a = tl.load(a_ptr + rows * C + cols)
    b = tl.load(b_ptr + rows * C + cols)
    size = R * C
    p, q = tl.associative_scan((a, b), 0, _affine)
    tl.store(out_ptr + rows * C + cols, q)
    p, q = tl.associative_scan((a, b), 1, _affine, reverse=True)
    tl.store(out_ptr + size + rows * C + cols, p + q)
    m, s = tl.associative_scan((b, a), 1, _softmax_pair)
    tl.store(out_ptr + 2 * size + rows * C + cols, m + s)
    flat = tl.load(b_ptr + tl.arange(0, R * C))  # a 1-D scan: one element per position
    f, g = tl.associative_scan((flat, flat * 0.5), 0, _softmax_pair)
    tl.store(out_ptr + 3 * size + tl.arange(0, R * C), f * g)
    m, s = tl.reduce((b, a), 0, _softmax_pair)
    tl.store(out_ptr + 4 * size + tl.arange(0, C), m + s)
    m, s = tl.reduce((b, a), 1, _softmax_pair, keep_dims=True)
    tl.store(out_ptr + 4 * size + C + rows + cols * 0, m * s)
    tl.store(out_ptr + 4 * size + C + R, tl.reduce(a, None, _larger))


def _scans(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    R, C = a.shape
    out = torch.zeros(4 * R * C + C + R + 1)
    _scans_kernel[(1,)](a, b, out, R=R, C=C)
    return out


def test_scans_and_reductions_with_a_combine_compute_what_the_interpreter_did(monkeypatch):
    """The vectorised fallbacks of tl.associative_scan / tl.reduce (one combine call per
    position along the axis) give the interpreter's own results bit for bit: scans along either
    axis of a tile, reversed, of one axis, tuples of two, reductions along 0, 1 (keeping it) and all axes."""
    from triton.runtime import interpreter
    assert triton_interpreter.install() and triton_interpreter.ORIGINAL
    assert interpreter.ScanOps.generic_scan is triton_interpreter._scan
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(8, 16, generator=g) + 0.5, torch.randn(8, 16, generator=g)
    fast = _scans(a, b)
    monkeypatch.setattr(interpreter.ScanOps, "generic_scan", triton_interpreter.ORIGINAL["scan"])
    monkeypatch.setattr(interpreter.ReduceOps, "generic_reduce", triton_interpreter.ORIGINAL["reduce"])
    slow = _scans(a, b)
    assert torch.equal(fast, slow), (fast - slow).abs().max()
    # and they are the scans: the first block is the first-order recurrence down the rows
    want = torch.zeros(16)
    for r in range(8):
        want = want * a[r] + b[r]
    torch.testing.assert_close(fast[7 * 16:8 * 16], want)


def test_the_dtype_table_answers_what_the_interpreter_did():
    """`_get_np_dtype` from a table filled once: the interpreter's own answer for every scalar
    dtype, pointer and block of either."""
    from triton.runtime import interpreter
    assert triton_interpreter.install() and interpreter._get_np_dtype is not triton_interpreter.ORIGINAL["np_dtype"]
    real = triton_interpreter.ORIGINAL["np_dtype"]
    scalars = [tl.int1, tl.int8, tl.uint8, tl.int16, tl.uint16, tl.int32, tl.uint32, tl.int64, tl.uint64,
               tl.float16, tl.bfloat16, tl.float32, tl.float64, tl.float8e5, tl.float8e4nv]
    kinds = scalars + [tl.pointer_type(t) for t in scalars] + \
        [tl.block_type(t, [4, 8]) for t in scalars] + [tl.block_type(tl.pointer_type(t), [16]) for t in scalars]
    for kind in kinds * 2:  # (the second round reads the table)
        assert interpreter._get_np_dtype(kind) == real(kind), kind
