"""exact_scan equals a plain left fold for associative combines, at any length and block."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from psmc.runtime.scan import DEFAULT_BLOCK, exact_scan, exclusive_from_inclusive

SETTINGS = settings(max_examples=40, deadline=None, derandomize=True)


# Combines written the way generated code is: batched over any leading axes, fields last.
def add(l, r):
    return (l[0] + r[0],)


def maximum(l, r):
    return (torch.maximum(l[0], r[0]),)


def affine(l, r):  # s -> a*s + b, earlier map applied first
    return (l[0] * r[0], r[0] * l[1] + r[1])


def matmul(l, r):  # 2x2 matrices, field shape [2, 2]
    return (l[0] @ r[0],)


def _broadcast_pick(keep, other):
    return torch.broadcast_to(keep, torch.broadcast_shapes(keep.shape, other.shape))


def first(l, r):
    return (_broadcast_pick(l[0], r[0]),)


def last(l, r):
    return (_broadcast_pick(r[0], l[0]),)


def sum_and_count(l, r):  # a float field and an int64 field
    return (l[0] + r[0], l[1] + r[1])


def _leaves(name, lead, seed):
    g = torch.Generator().manual_seed(seed)

    def rand(*field, low=-1.0, high=1.0):
        return torch.rand(*lead, *field, generator=g, dtype=torch.float64) * (high - low) + low

    if name == "affine":
        return (rand(low=0.8, high=1.2), rand())
    if name == "matmul":
        return (torch.eye(2, dtype=torch.float64) + 0.2 * rand(2, 2),)
    if name == "sum_and_count":
        return (rand(3), torch.randint(0, 5, lead, generator=g))
    return (rand(),)


COMBINES = {
    "add": add,
    "max": maximum,
    "affine": affine,
    "matmul": matmul,
    "first": first,
    "last": last,
    "sum_and_count": sum_and_count,
}


def left_fold(x, combine, carry=None):
    """The reference: a Python loop over time, one step at a time."""
    acc = carry
    out = []
    for t in range(x[0].shape[1]):
        step = tuple(f[:, t] for f in x)
        acc = step if acc is None else combine(acc, step)
        out.append(acc)
    return tuple(torch.stack(fields, dim=1) for fields in zip(*out))


def assert_same(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == w.dtype
        assert not torch.isnan(g).any()
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


class Counting:
    """Wraps a combine and counts its calls."""

    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, l, r):
        self.calls += 1
        return self.fn(l, r)


@SETTINGS
@given(
    name=st.sampled_from(sorted(COMBINES)),
    T=st.integers(1, 150),
    block=st.sampled_from([2, 4, 8, 16, DEFAULT_BLOCK]),
    lanes=st.lists(st.integers(1, 3), max_size=2),
    batch=st.integers(1, 2),
    with_carry=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_exact_scan_equals_left_fold(name, T, block, lanes, batch, with_carry, seed):
    combine = COMBINES[name]
    x = _leaves(name, (batch, T, *lanes), seed)
    carry = _leaves(name, (batch, *lanes), seed + 1) if with_carry else None
    counted = Counting(combine)
    got = exact_scan(x, counted, carry=carry, block=block)
    assert_same(got, left_fold(x, combine, carry))
    # O(log T) calls: <= 2*log2(block) per level of blocks, one more for the carry.
    block_levels = max(1, math.ceil(math.log(T, block) - 1e-9))
    assert counted.calls <= 2 * int(math.log2(block)) * block_levels + 1


@pytest.mark.parametrize("T", [1, 63, 64, 65, 129])
def test_default_block_edges(T):
    x = _leaves("affine", (2, T, 3), T)
    carry = _leaves("affine", (2, 3), 7)
    assert_same(exact_scan(x, affine), left_fold(x, affine))
    assert_same(exact_scan(x, affine, carry=carry), left_fold(x, affine, carry))


def test_calls_grow_logarithmically():
    counted = Counting(add)
    exact_scan((torch.ones(1, 4096),), counted)
    # 11 calls inside the 64-blocks (6 pairings, 5 fills: the fill at block 2 is empty),
    # 10 for the 63 block totals (5 halvings of one short block), 1 to apply them.
    assert counted.calls == 22


def test_carry_broadcasts_over_batch():
    x = _leaves("add", (3, 10, 2), 0)
    carry = (torch.ones(1, 2, dtype=torch.float64),)
    assert_same(exact_scan(x, add, carry=carry, block=4), left_fold(x, add, (carry[0].expand(3, 2),)))


def test_gradcheck_through_blocks_and_carry():
    x = _leaves("affine", (1, 7, 2), 3)
    carry = _leaves("affine", (1, 2), 4)
    inputs = tuple(t.clone().requires_grad_() for t in (*x, *carry))

    def run(a, b, ca, cb):
        return exact_scan((a, b), affine, carry=(ca, cb), block=2)

    assert torch.autograd.gradcheck(run, inputs)


def test_exclusive_from_inclusive():
    x = _leaves("affine", (2, 5, 3), 11)
    carry = _leaves("affine", (2, 3), 12)
    incl = exact_scan(x, affine, carry=carry)
    excl = exclusive_from_inclusive(incl, carry)
    for f_excl, f_incl, f_carry in zip(excl, incl, carry):
        assert torch.equal(f_excl[:, 0], f_carry)
        assert torch.equal(f_excl[:, 1:], f_incl[:, :-1])
    identity = (torch.tensor(1.0), torch.tensor(0.0))  # lead []: broadcast to every lane
    excl = exclusive_from_inclusive(exact_scan(x, affine), identity)
    assert torch.equal(excl[0][:, 0], torch.ones(2, 3, dtype=torch.float64))
    assert torch.equal(excl[1][:, 0], torch.zeros(2, 3, dtype=torch.float64))
    assert excl[0].dtype == torch.float64


@pytest.mark.parametrize("block", [0, 1, 3, 48])
def test_block_must_be_power_of_two(block):
    with pytest.raises(ValueError, match="power of two"):
        exact_scan((torch.ones(1, 4),), add, block=block)
