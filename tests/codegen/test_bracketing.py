"""The generated layer of a non-associative op brackets exactly like the paper's tree
(PAPER.md §3) for every n = 1..64: in the parallel pass, in streaming, and when a forward
continues from a mid-sequence state.

The probe op records its bracketing in its value: with Agg(l, r) = 2 l + 3 r and one-hot
leaves e_i, entry i of a result is 2^a 3^b where a and b count the left and right turns from
the root down to leaf i. Leaf depths a + b in order determine a binary tree, so equal values
mean equal bracketings; all entries are small integers, so float64 computes them exactly and
the comparisons are exact, whatever order the layer batches its calls in.
"""
from __future__ import annotations

import re

import pytest
import torch

from layer_harness import layer_class, stream, tree_roots
from layer_reference import left_fold_prefixes, tree_prefixes

N = 64
PROBE = """
op bracket_probe[N] {
  state (y: f32[N]);
  combine (l, r) { return 2.0 * l.y + 3.0 * r.y; }
}
"""


@pytest.fixture(scope="module")
def probe(tmp_path_factory):
    path = tmp_path_factory.mktemp("probe") / "bracket_probe.psm"
    path.write_text(PROBE, encoding="utf-8")
    return layer_class("bracket_probe", path)(N=N).double()


def one_hot_leaves(n: int) -> torch.Tensor:
    return torch.eye(N, dtype=torch.float64)[:n].unsqueeze(0)  # [B=1, T=n, N]


def expected_prefixes() -> torch.Tensor:
    """Row t: the closed-form P(t + 1) over the one-hot leaves."""
    leaves = list(torch.eye(N, dtype=torch.float64))
    return torch.stack(tree_prefixes(leaves, lambda l, r: 2.0 * l + 3.0 * r))


def bracketing(row: torch.Tensor) -> str:
    """Decode a recorded value back into its bracketing, e.g. '((x0.x1).x2)'."""
    depths = []
    for i, c in enumerate(row.tolist()):
        if c == 0:
            continue
        c, depth = int(c), 0
        while c % 2 == 0:
            c, depth = c // 2, depth + 1
        while c % 3 == 0:
            c, depth = c // 3, depth + 1
        assert c == 1, f"entry {i} = {row[i].item()} is not 2^a 3^b: no bracketing gives it"
        depths.append((i, depth))
    leaves = iter(depths)
    pending = [next(leaves)]

    def build(depth: int) -> str:
        if pending[0][1] == depth:
            i = pending[0][0]
            pending[0] = next(leaves, (None, -1))
            return f"x{i}"
        left = build(depth + 1)
        return f"({left}.{build(depth + 1)})"
    return build(0)


def assert_brackets(got: torch.Tensor, want: torch.Tensor, what: str):
    for t in range(want.shape[0]):
        if not torch.equal(got[t], want[t]):
            raise AssertionError(f"{what}: the prefix at position {t} is {bracketing(got[t])}, "
                                 f"the paper's tree is {bracketing(want[t])}")


def test_the_decoder_reads_the_papers_examples():
    want = expected_prefixes()
    assert bracketing(want[2]) == "((x0.x1).x2)"
    assert bracketing(want[3]) == "((x0.x1).(x2.x3))"
    assert bracketing(want[6]) == "((((x0.x1).(x2.x3)).(x4.x5)).x6)"


def test_a_left_fold_is_told_apart():
    """The probe can fail: a sequential fold brackets differently from P(3) on."""
    leaves = list(torch.eye(N, dtype=torch.float64))
    fold = torch.stack(left_fold_prefixes(leaves, lambda l, r: 2.0 * l + 3.0 * r))
    assert_brackets(fold[:3 - 1], expected_prefixes()[:2], "two leaves")
    message = "position 3 is (((x0.x1).x2).x3), the paper's tree is ((x0.x1).(x2.x3))"
    with pytest.raises(AssertionError, match=re.escape(message)):
        assert_brackets(fold[:4], expected_prefixes()[:4], "left fold")


def test_the_plan_is_the_tree(probe):
    assert probe.spec.scan == "tree"


def test_parallel_pass_for_every_length(probe):
    want = expected_prefixes()
    for n in range(1, N + 1):
        got = probe(y=one_hot_leaves(n))[0]
        assert_brackets(got, want[:n], f"parallel pass over {n} leaves")


def test_streaming_and_its_counter(probe):
    want = expected_prefixes()
    leaves = one_hot_leaves(N)
    state = probe.init_state(batch_shape=(1,))
    for t in range(N):
        (out,), state = stream(probe, {"y": leaves}, state, t, t + 1)
        assert_brackets(out[0], want[t:t + 1], f"step {t}")
        n = t + 1
        assert tree_roots(state) == bin(n).count("1"), f"{n} leaves: {tree_roots(state)} roots"


@pytest.mark.parametrize("n", [45, 64])
def test_forward_continued_from_every_split(probe, n):
    want = expected_prefixes()[:n]
    leaves = one_hot_leaves(n)
    for m in range(1, n):
        first, state = probe(y=leaves[:, :m], return_state=True)
        rest = probe(y=leaves[:, m:], state=state)
        assert_brackets(torch.cat([first, rest], dim=1)[0], want, f"{n} leaves split after {m}")


def test_three_segments(probe):
    want = expected_prefixes()[:50]
    leaves = one_hot_leaves(50)
    outs, state = [], None
    for lo, hi in ((0, 7), (7, 23), (23, 50)):
        out, state = probe(y=leaves[:, lo:hi], state=state, return_state=True)
        outs.append(out)
    assert_brackets(torch.cat(outs, dim=1)[0], want, "segments [0, 7), [7, 23), [23, 50)")
