"""tree_scan and the binary counter give exactly the paper's bracketing (PAPER.md §3)."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from psmc.runtime.state import TreeState
from psmc.runtime.tree import tree_scan

SETTINGS = settings(max_examples=30, deadline=None, derandomize=True)


# ---- references written here, independent of the runtime ---------------------------------

E = "e"  # the formal identity of the paper's sweeps


def sym_agg(a, b):
    """Agg on bracketings; the formal identity is absorbed, never combined."""
    if a == E:
        return b
    if b == E:
        return a
    return (a, b)


def balanced(lo, hi):
    """The balanced tree over leaves [lo, hi), hi - lo a power of two."""
    if hi - lo == 1:
        return lo
    mid = (lo + hi) // 2
    return (balanced(lo, mid), balanced(mid, hi))


def closed_form(n):
    """P(n) = Agg(...Agg(B1, B2)..., Bm) over the binary decomposition of n, MSB first."""
    prefix, start = E, 0
    for k in reversed(range(n.bit_length())):
        if (n >> k) & 1:
            prefix = sym_agg(prefix, balanced(start, start + (1 << k)))
            start += 1 << k
    return prefix


def blelloch_sweeps(n):
    """The paper's up-sweep and down-sweep (prefix first) over n leaves padded with E.
    Returns the exclusive prefixes D[0..n)."""
    size = 1 << max(0, (n - 1).bit_length())
    tree = list(range(n)) + [E] * (size - n)
    for d in range(size.bit_length() - 1):
        for k in range(0, size, 2 << d):
            tree[k + (2 << d) - 1] = sym_agg(tree[k + (1 << d) - 1], tree[k + (2 << d) - 1])
    down = list(tree)
    down[size - 1] = E
    for d in reversed(range(size.bit_length() - 1)):
        for k in range(0, size, 2 << d):
            parent, left = down[k + (2 << d) - 1], down[k + (1 << d) - 1]
            down[k + (1 << d) - 1] = parent
            down[k + (2 << d) - 1] = sym_agg(parent, left)
    return down[:n]


@pytest.mark.parametrize("n", range(1, 66))
def test_closed_form_is_the_papers_sweeps(n):
    # D[i] = P(i); so the inclusive prefix of leaf i, P(i+1), is D[i+1] of a longer sequence.
    # (The padded up-sweep root is NOT P(n) in general: for n = 7 it is ((0,1),(2,3)).((4,5),6).)
    assert blelloch_sweeps(n) == [closed_form(i) for i in range(n)]


def test_closed_form_examples_from_the_paper():
    assert closed_form(3) == ((0, 1), 2)
    assert closed_form(4) == ((0, 1), (2, 3))
    assert closed_form(7) == ((((0, 1), (2, 3)), (4, 5)), 6)


# ---- a batched symbolic Agg: int64 ids standing for bracketings ---------------------------


class Symbolic:
    """Element = (int64 ids,). Leaf k has id k; Agg interns the pair (left, right) under a new
    id, so reading an id back gives the exact bracketing that produced it. Counts Agg calls
    and evaluated pairs; the formal identity (id -1) must never reach it."""

    IDENTITY = -1

    def __init__(self, leaves):
        self.trees = {k: k for k in range(leaves)}
        self.ids = {}
        self.calls = 0
        self.pairs = 0

    def __call__(self, l, r):
        self.calls += 1
        left, right = torch.broadcast_tensors(l[0], r[0])
        out = []
        for a, b in zip(left.flatten().tolist(), right.flatten().tolist()):
            assert a != self.IDENTITY and b != self.IDENTITY, "Agg saw the formal identity"
            key = (self.trees[a], self.trees[b])
            if key not in self.ids:
                self.ids[key] = len(self.trees)
                self.trees[self.ids[key]] = key
            out.append(self.ids[key])
            self.pairs += 1
        return (torch.tensor(out, dtype=torch.int64).reshape(left.shape),)

    def read(self, ids):
        return [self.trees[i] if i != self.IDENTITY else E for i in ids.flatten().tolist()]


def leaves(start, stop):
    return (torch.arange(start, stop).reshape(1, -1),)


def read_steps(sym, element):
    return sym.read(element[0][0])


@pytest.mark.parametrize("n", range(1, 65))
def test_tree_scan_is_the_closed_form(n):
    sym = Symbolic(n)
    identity = (torch.tensor(Symbolic.IDENTITY),)
    inclusive, exclusive, state = tree_scan(leaves(0, n), sym, identity=identity, exclusive=True)
    assert read_steps(sym, inclusive) == [closed_form(i + 1) for i in range(n)]
    assert read_steps(sym, exclusive) == [closed_form(i) for i in range(n)]
    assert sym.read(state.prefix[0]) == [closed_form(n)]
    # Level batching: floor(log2 n) up-sweep levels + floor(log2 n) prefix rounds.
    assert sym.calls <= 2 * int(math.log2(n))
    assert sym.pairs <= 2 * n


def push_all(sym, n, state=None):
    state = TreeState.empty() if state is None else state
    seen = []
    for k in range(state.size, n):
        state = state.push((torch.tensor([k]),), sym)
        seen.append(state)
    return seen


@pytest.mark.parametrize("n", range(1, 65))
def test_counter_pushes_are_the_closed_form(n):
    sym = Symbolic(n)
    for count, state in enumerate(push_all(sym, n), start=1):
        assert sym.read(state.prefix[0]) == [closed_form(count)]
        assert sum(root is not None for root in state.roots) <= math.ceil(math.log2(count + 1))
        for level, root in enumerate(state.roots):
            if root is not None:  # root j is the balanced tree of the j-th binary digit
                end = (count >> level) << level
                assert sym.read(root[0]) == [balanced(end - (1 << level), end)]
                assert sym.read(state.folds[level][0]) == [closed_form(end)]
    assert sym.calls <= 2 * n


def test_counter_calls_for_16_leaves():
    sym = Symbolic(16)
    push_all(sym, 16)
    # 15 merges (16 leaves fold into one root) + 11 fold updates (none when the new root is
    # the only one: after leaves 1, 2, 4, 8, 16). PAPER.md's 31 also counts those 5.
    print(f"Agg calls for 16 pushed leaves: {sym.calls}")
    assert sym.calls == 26


def assert_same_counter(sym, got, want):
    assert got.size == want.size
    assert len(got.roots) == len(want.roots)
    for table in ("roots", "folds"):
        for g, w in zip(getattr(got, table), getattr(want, table)):
            assert (g is None) == (w is None)
            if g is not None:
                assert sym.read(g[0]) == sym.read(w[0])


@pytest.mark.parametrize("n", [1, 2, 5, 8, 13, 16, 37])
def test_continuation_at_every_split(n):
    for split in range(n + 1):
        sym = Symbolic(n)
        head = tree_scan(leaves(0, split), sym)[2] if split else TreeState.empty()
        pushed = push_all(sym, n)[-1]
        if split == n:
            assert_same_counter(sym, head, pushed)
            continue
        inclusive, exclusive, state = tree_scan(leaves(split, n), sym, state=head, exclusive=split > 0)
        assert read_steps(sym, inclusive) == [closed_form(i + 1) for i in range(split, n)]
        if split > 0:  # the exclusive prefix comes from the state: no identity needed
            assert read_steps(sym, exclusive) == [closed_form(i) for i in range(split, n)]
        assert_same_counter(sym, state, pushed)


@SETTINGS
@given(cuts=st.lists(st.integers(1, 40), min_size=1, max_size=5))
def test_continuation_over_many_pieces(cuts):
    n = sum(cuts)
    sym = Symbolic(n)
    state, seen, start = None, [], 0
    for cut in cuts:
        before = sym.calls
        inclusive, _, state = tree_scan(leaves(start, start + cut), sym, state=state)
        # Batched calls with a state: floor(log2 N) levels + floor(log2 N) + 1 rounds.
        assert sym.calls - before <= 2 * int(math.log2(start + cut)) + 1
        seen += read_steps(sym, inclusive)
        start += cut
    assert seen == [closed_form(i + 1) for i in range(n)]
    assert_same_counter(sym, state, push_all(sym, n)[-1])


def test_exclusive_needs_identity_only_for_the_first_leaf():
    with pytest.raises(ValueError, match="identity"):
        tree_scan(leaves(0, 3), Symbolic(3), exclusive=True)
    with pytest.raises(ValueError, match="identity"):
        tree_scan(leaves(0, 3), Symbolic(3), state=TreeState.empty(), exclusive=True)
    sym = Symbolic(5)
    state = tree_scan(leaves(0, 2), sym)[2]
    _, exclusive, _ = tree_scan(leaves(2, 5), sym, state=state, exclusive=True)
    assert read_steps(sym, exclusive) == [closed_form(i) for i in range(2, 5)]


def test_state_from_another_source_is_rejected_when_a_root_is_missing():
    sym = Symbolic(4)
    broken = TreeState(count=3, roots=(None, None), folds=(None, None))
    with pytest.raises(ValueError, match="lacks"):
        tree_scan(leaves(3, 4), sym, state=broken)


# ---- a float, non-associative Agg with lanes, two fields and gradients --------------------


def float_agg(l, r):
    """Non-associative: every bracketing gives different numbers. Two fields of different
    ranks: a per-lane scalar and a per-lane vector of 2."""
    a = torch.tanh(1.3 * l[0] - 0.7 * r[0] + 0.1)
    v = torch.tanh(l[1] @ torch.tensor([[0.9, -0.4], [0.3, 0.8]], dtype=l[1].dtype) - 0.5 * r[1]) + a.unsqueeze(-1)
    return (a, v)


def float_closed_form(xs, n):
    """P(n) over step elements xs (reference recursion, one Agg at a time)."""

    def tree(lo, hi):
        if hi - lo == 1:
            return xs[lo]
        mid = (lo + hi) // 2
        return float_agg(tree(lo, mid), tree(mid, hi))

    prefix, start = None, 0
    for k in reversed(range(n.bit_length())):
        if (n >> k) & 1:
            block = tree(start, start + (1 << k))
            prefix = block if prefix is None else float_agg(prefix, block)
            start += 1 << k
    return prefix


def float_leaves(T, seed, lanes=(3,)):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(2, T, *lanes, generator=g, dtype=torch.float64),
        torch.randn(2, T, *lanes, 2, generator=g, dtype=torch.float64),
    )


@pytest.mark.parametrize("T,split", [(1, 0), (6, 0), (11, 0), (11, 3), (11, 8), (20, 16)])
def test_float_agg_matches_reference(T, split):
    x = float_leaves(T, T + split)
    xs = [tuple(f[:, i] for f in x) for i in range(T)]
    state = tree_scan(tuple(f[:, :split] for f in x), float_agg)[2] if split else None
    inclusive, _, _ = tree_scan(tuple(f[:, split:] for f in x), float_agg, state=state)
    for i in range(split, T):
        want = float_closed_form(xs, i + 1)
        for got_field, want_field in zip(inclusive, want):
            torch.testing.assert_close(got_field[:, i - split], want_field, rtol=1e-12, atol=1e-12)


def test_float_agg_is_not_associative():
    # Guards the test above: a bracketing bug would change these numbers.
    x = float_leaves(3, 0)
    a, b, c = (tuple(f[:, i] for f in x) for i in range(3))
    assert not torch.allclose(float_agg(float_agg(a, b), c)[0], float_agg(a, float_agg(b, c))[0])


def test_gradcheck_through_state_continuation():
    x = float_leaves(5, 1, lanes=())
    inputs = tuple(f.clone().requires_grad_() for f in x)
    identity = (torch.tensor(0.0, dtype=torch.float64), torch.zeros(2, dtype=torch.float64))

    def run(a, v):
        head = tree_scan((a[:, :3], v[:, :3]), float_agg)[2]
        inclusive, exclusive, state = tree_scan((a[:, 3:], v[:, 3:]), float_agg, state=head, exclusive=True)
        return (*inclusive, *exclusive, *state.prefix)

    assert torch.autograd.gradcheck(run, inputs)
    # and with the identity at P(0)
    assert torch.autograd.gradcheck(
        lambda a, v: tree_scan((a, v), float_agg, identity=identity, exclusive=True)[1], inputs
    )


def test_a_repeated_pass_reuses_its_index_tensors(monkeypatch):
    """The gathers' index tensors are made once per plan and device: a second pass over leaves
    of the same shape from the same counter makes none (on a GPU each would be a host-to-device
    copy, which a CUDA graph cannot hold), and gives the same prefixes."""
    from psmc.runtime import tree
    monkeypatch.setattr(tree, "_INDEXES", {})
    x = (torch.randn(2, 13, 3),)

    def agg(left, right):
        return (0.9 * left[0] + 0.1 * right[0],)

    _, _, state = tree_scan((torch.randn(2, 5, 3),), agg)
    first, _, _ = tree_scan(x, agg, state=state)
    made = dict(tree._INDEXES)
    assert made  # (a pass continuing 5 leaves gathers)
    made_tensor = torch.tensor
    calls = []
    monkeypatch.setattr(torch, "tensor", lambda *a, **k: calls.append(a) or made_tensor(*a, **k))
    second, _, _ = tree_scan(x, agg, state=state)
    assert all(tree._INDEXES[k] is v for k, v in made.items()) and len(tree._INDEXES) == len(made)
    assert not [a for a in calls if isinstance(a[0], list) and len(a[0]) > 1]  # no index list made again
    torch.testing.assert_close(second[0], first[0], rtol=0, atol=0)


def test_indexes_made_in_inference_mode_serve_a_later_pass_with_gradients(monkeypatch):
    """A pass under torch.inference_mode caches the plan's indexes; a training pass over the
    same shapes must be able to record autograd through them (examples/experiments/s5 evaluates
    in inference mode between training steps)."""
    from psmc.runtime import tree
    monkeypatch.setattr(tree, "_INDEXES", {})

    def agg(left, right):
        return (0.9 * left[0] + 0.1 * right[0],)

    with torch.inference_mode():
        _, _, state = tree_scan((torch.randn(2, 5, 3),), agg)
        tree_scan((torch.randn(2, 13, 3),), agg, state=state)
    x = torch.randn(2, 13, 3, requires_grad=True)
    _, _, state = tree_scan((torch.randn(2, 5, 3),), agg)
    out, _, _ = tree_scan((x,), agg, state=state)
    out[0].sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
