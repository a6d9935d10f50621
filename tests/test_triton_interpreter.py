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
