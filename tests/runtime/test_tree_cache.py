"""TreeCache: the tree counter in fixed-shape slots, each row at its own count, gives exactly the
paper's bracketing (the brackets of `TreeState.push`), and a layer decodes it as it decodes
tree states: bit for bit in eager code, one compiled graph at every position."""

from pathlib import Path

import pytest
import torch

import psmc
from psmc.runtime.batch import RaggedState, cat_states
from psmc.runtime.state import TreeCache, TreeState

from test_tree_scan import Symbolic, balanced, closed_form, push_all

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

# an exclusive readout, an identity, a vector field, and the position read by both bodies
EXCLUSIVE = """
op tex {
  state (y: f32, z: f32[2]);
  lift (x: f32, u: f32[2]) { return (x + 0.01 * index, u * x); }
  combine (l, r) { return (0.9 * l.y + 0.1 * r.y * r.z[0], 0.5 * l.z + r.z * l.y); }
  identity = (zeros, zeros);
  assume empty_prefix;
  readout exclusive (p, x: f32) { return p.y * x + index + p.z[1]; }
}
"""


def cache_of_counts(sym, counts, capacity):
    """A cache whose row b has pushed leaves 0 .. counts[b]-1 (ids = positions), built from
    each row's TreeState (one-row states of a RaggedState, as a packed prefill gives)."""
    rows = tuple(push_all(sym, n)[-1] if n else TreeState.empty() for n in counts)
    return TreeCache.of(RaggedState(rows=rows), capacity)


@pytest.mark.parametrize("capacity", [63, 100])
def test_cache_pushes_are_the_closed_form_at_every_row_count(capacity):
    counts = [0, 1, 2, 3, 5, 7, 8, 13, 31]
    steps = 24
    sym = Symbolic(max(counts) + steps + 1)
    cache = cache_of_counts(sym, counts, capacity)
    assert cache.sizes == counts and cache.capacity == {63: 63, 100: 127}[capacity]
    identity = (torch.tensor([Symbolic.IDENTITY]),)
    for _ in range(steps):
        n = cache.sizes
        before = cache.before(identity)
        assert sym.read(before[0]) == [closed_form(c) if c else "e" for c in n]
        cache, prefix = cache.push((torch.tensor(n),), sym)  # row b's next leaf is its position
        assert sym.read(prefix[0]) == [closed_form(c + 1) for c in n]
    assert cache.sizes == [c + steps for c in counts]
    # every occupied slot is the counter's root and fold (what to_state gives back)
    for b, n in enumerate(cache.sizes):
        for level in range(n.bit_length()):
            if (n >> level) & 1:
                end = (n >> level) << level
                assert sym.read(cache.roots[0][b, level]) == [balanced(end - (1 << level), end)]
                assert sym.read(cache.folds[0][b, level]) == [closed_form(end)]
    rows = cache.to_state()
    assert isinstance(rows, RaggedState) and rows.sizes == cache.sizes


def test_cache_push_computes_only_the_levels_some_row_merges_on_cpu():
    sym = Symbolic(40)
    cache = cache_of_counts(sym, [4, 4], 63)  # trailing ones of 4: none, so no merge
    calls = sym.calls
    cache, _ = cache.push((torch.tensor([4, 4]),), sym)
    assert sym.calls - calls == 1  # the fold only
    cache = cache_of_counts(sym, [7, 4], 63)  # 7 = 0b111: three merges for row 0
    calls = sym.calls
    cache.push((torch.tensor([7, 4]),), sym)
    assert sym.calls - calls == 3 + 1


def test_a_full_cache_is_an_error_that_says_what_to_do():
    sym = Symbolic(10)
    cache = cache_of_counts(sym, [3, 1], 3)
    with pytest.raises(ValueError, match=r"the tree cache is full: it holds 3 tokens per row \(2 levels\) and a row "
                                         r"would reach 4: build it with a larger capacity"):
        cache.push((torch.tensor([3, 1]),), sym)
    cache = cache.reset([0])
    assert cache.sizes == [0, 1]
    with pytest.raises(ValueError, match="more than a cache of capacity 3 holds"):
        TreeCache.of(push_all(Symbolic(4), 4)[-1], 3)
    with pytest.raises(ValueError, match="capacity is a positive number of tokens"):
        TreeCache.levels_for(0)


def steps_agree(layer, state, cache, tokens):
    for token in tokens:
        want, state = layer.step(state, **token)
        got, cache = layer.step(cache, **token)
        assert torch.equal(got, want)
    return state, cache


@pytest.mark.parametrize("lanes", [None, (3,)])
def test_layer_decodes_a_cache_as_its_tree_states_bit_for_bit(lanes):
    torch.manual_seed(0)
    ema = psmc.load(EXAMPLES / "ema.psm").ema(lanes=lanes)
    shape = (4,) + (lanes or ())
    state, cache = ema.init_state(), ema.init_state(4, capacity=40)
    assert type(cache) is TreeCache and cache.capacity == 63
    tokens = [{"y": torch.randn(shape)} for _ in range(37)]
    state, cache = steps_agree(ema, state, cache, tokens)
    assert cache.sizes == [37] * 4 and cache.op == state.op
    # a prefill onto the cache continues its rows, and gives a cache back
    x = torch.randn(4, 9, *shape[1:])
    want, state = ema(y=x, state=state, return_state=True)
    got, cache = ema(y=x, state=cache, return_state=True)
    assert torch.equal(got, want) and type(cache) is TreeCache and cache.sizes == [46] * 4
    assert torch.equal(ema(y=x, state=cache), ema(y=x, state=state))


def test_ragged_prefill_then_one_call_per_token_for_every_row(tmp_path):
    torch.manual_seed(1)
    (tmp_path / "tex.psm").write_text(EXCLUSIVE)
    tex = psmc.load(tmp_path / "tex.psm").tex(lanes=(3,))
    lengths = [4, 1, 6, 2, 3]
    total = sum(lengths)
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist())
    _, ragged = tex(x=torch.randn(1, total, 3), u=torch.randn(1, total, 3, 2), cu_seqlens=cu, return_state=True)
    cache = TreeCache.of(ragged, 100)
    assert cache.sizes == lengths
    tokens = [{"x": torch.randn(5, 3), "u": torch.randn(5, 3, 2)} for _ in range(11)]
    ragged, cache = steps_agree(tex, ragged, cache, tokens)
    assert cache.sizes == [n + 11 for n in lengths] == ragged.sizes
    # rows move like any state's: reorder (beam search), select, concatenate, reset a slot
    picked = cache[[4, 0]]
    assert picked.sizes == [14, 15]
    both = cat_states([picked, cache[1:3]])
    assert both.sizes == [14, 15, 12, 17]
    fresh = both.reset(2)
    token = {"x": torch.randn(4, 3), "u": torch.randn(4, 3, 2)}
    got, fresh = tex.step(fresh, **token)
    alone, _ = tex.step(tex.init_state(), **{k: v[2:3] for k, v in token.items()})
    assert torch.equal(got[2:3], alone) and fresh.sizes == [15, 16, 1, 18]


def test_cache_saves_moves_and_reports_its_size(tmp_path):
    ema = psmc.load(EXAMPLES / "ema.psm").ema()
    _, cache = ema.step(ema.init_state(capacity=7), y=torch.randn(2, 5))
    assert cache.nbytes == 2 * (2 * 3 * 5 * 4) + 2 * 8  # roots and folds [2, 3, 5] f32, counts
    torch.save(cache, tmp_path / "c.pt")
    back = torch.load(tmp_path / "c.pt")
    assert type(back) is TreeCache and back.sizes == [1, 1] and torch.equal(back.folds[0], cache.folds[0])
    assert back.to(dtype=torch.float64).roots[0].dtype == torch.float64


def test_cache_errors_name_the_op_and_the_fix():
    ema = psmc.load(EXAMPLES / "ema.psm").ema()
    cumsum = psmc.load(EXAMPLES / "cumsum.psm").cumsum()
    with pytest.raises(TypeError, match=r"cumsum: capacity= makes a serving cache for chunk ops and for token ops "
                                        r"on the tree, whose state grows with the tokens; this op's state is an exact "
                                        r"scan, whose slots do not: call init_state\(\) without capacity="):
        cumsum.init_state(2, capacity=8)
    with pytest.raises(ValueError, match="the tree cache holds 3 rows but the token has batch 2"):
        ema.step(ema.init_state(3, capacity=8), y=torch.randn(2, 5))
    _, cache = ema.step(ema.init_state(capacity=8), y=torch.randn(2, 5))
    with pytest.raises(TypeError, match=r"cumsum: a TreeCache holds the counter of a token tree scan, but this op's "
                                        r"state is an exact scan: use init_state\(\) without capacity="):
        cumsum.step(cache, x=torch.randn(2, 5))
    with pytest.raises(TypeError, match=r"ema: a TreeCache continues as state=cache \(forward\(\.\.\., state=cache, "
                                        r"return_state=True\) gives a cache back\), not as initial_state="):
        ema(y=torch.randn(2, 3, 5), initial_state=cache)
    with pytest.raises(ValueError, match=r"ema\[\] lanes=\(4,\) was given a state made by ema\[\] lanes=\(5,\)"):
        ema.step(cache, y=torch.randn(2, 4))


def test_compiled_cache_step_is_one_graph_for_every_position():
    torch.manual_seed(2)
    tree_rnn = psmc.load(EXAMPLES / "tree_rnn.psm").tree_rnn(D=4)
    torch._dynamo.reset()
    step = torch.compile(tree_rnn.step, fullgraph=True)
    state, cache = tree_rnn.init_state(), tree_rnn.init_state(3, capacity=100)
    torch._dynamo.utils.counters.clear()
    for _ in range(20):  # past Dynamo's recompile limit (8), which a compiled TreeState step hits
        h = torch.randn(3, 4)
        want, state = tree_rnn.step(state, h=h)
        got, cache = step(cache, h=h)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    # one graph for the first token (which allocates the slots), one for every later position
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2
    cache = cache.reset([1])
    h = torch.randn(3, 4)
    got, cache = step(cache, h=h)
    alone, _ = tree_rnn.step(tree_rnn.init_state(), h=h[1:2])
    torch.testing.assert_close(got[1:2], alone, rtol=1e-6, atol=1e-6)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2



def test_a_prefill_continues_a_cache_whose_rows_were_reset():
    """forward(state=cache) runs each row from its own count, a reset row (count 0, no tensors
    in its tree state) from the start, and gives a cache of the same capacity back."""
    torch.manual_seed(3)
    ema = psmc.load(EXAMPLES / "ema.psm").ema()
    cache = ema.init_state(3, capacity=50)
    for _ in range(5):
        _, cache = ema.step(cache, y=torch.randn(3, 4))
    cache = cache.reset([1])
    x = torch.randn(3, 6, 4)
    out, cache = ema(y=x, state=cache, return_state=True)
    assert torch.equal(out[1:2], ema(y=x[1:2])) and cache.sizes == [11, 6, 11] and cache.capacity == 63
