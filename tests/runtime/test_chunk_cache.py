"""ChunkCache: a chunk op's serving state (the tree counter, or an exact scan's prefix, over
each row's complete chunks in fixed slots, and each row's partial chunk with its own fill)
decodes every row at its own position in one call per token, as the row's ChunkStream does: bit
for bit in eager code, one compiled graph at every position. The tests that hold for both kinds
run on `chunky` (the tree) and `chunky_exact` (an exact scan with a dead field), which take the
same inputs: one user code path."""

from pathlib import Path

import pytest
import torch

import psmc
from psmc.runtime.batch import RaggedState, cat_states
from psmc.runtime.state import ChunkCache, ChunkStream, ScanCache, ScanState, TreeCache, TreeState

from test_tree_scan import Symbolic, closed_form, push_all

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

# a chunk op on the tree with vector and scalar fields and the position read by both bodies
# (the compiler holds a chunk readout causal: output row j reads rows 0..j of the chunk)
CHUNKY = """
op chunky[C] {
  chunk C;
  assume empty_prefix;
  state (h: f32, z: f32[2]);
  lift (x: f32[C], u: f32[C, 2]) { return (tanh(sum(x)) + 0.01 * index, sum(u, axis=0)); }
  combine (l, r) { return (tanh(0.5 * l.h + r.h * r.z[0]), 0.5 * l.z + r.z * l.h); }
  identity = (zeros, zeros);
  readout exclusive (p, x: f32[C]) { return p.h * x + p.z[1] + index; }
}
op chunky_exact[C] {
  chunk C;
  assume empty_prefix;
  state (a: f32, h: f32, z: f32[2]);
  lift (x: f32[C], u: f32[C, 2]) { return (0.5 + 0.5 * sigmoid(sum(x)), tanh(sum(x)) + 0.01 * index, sum(u, axis=0)); }
  combine (l, r) { return (l.a * r.a, r.a * l.h + r.h, r.a * l.z + r.z); }
  identity = (1.0, zeros, zeros);
  readout exclusive (p, x: f32[C]) { return p.h * x + p.z[1] + index; }
}
op chunk_exact[C] {
  chunk C;
  state (h: f32);
  lift (x: f32[C]) { return sum(x); }
  combine (l, r) { return l.h + r.h; }
  identity = zeros;
  readout exclusive (p, x: f32[C]) { return p.h + x; }
}
"""


@pytest.fixture(scope="module")
def ops(tmp_path_factory):
    path = tmp_path_factory.mktemp("chunk_cache") / "chunky.psm"
    path.write_text(CHUNKY)
    return psmc.load(path)


BOTH = pytest.mark.parametrize("name", ["chunky", "chunky_exact"])  # on the tree, on an exact scan
INNER = {"chunky": TreeCache, "chunky_exact": ScanCache}


def test_the_exact_op_is_an_exact_scan_with_a_dead_field(ops):
    layer = ops.chunky_exact(C=2)
    assert layer.spec.scan == "exact" and layer.spec.dead == (0,)  # the decays' product `a`
    assert ops.chunky(C=2).spec.scan == "tree"


def tokens(n, batch, lanes=(), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"x": torch.randn(batch, *lanes, generator=g), "u": torch.randn(batch, *lanes, 2, generator=g)}
            for _ in range(n)]


def test_masked_push_moves_only_the_rows_asked_and_keeps_the_closed_form():
    sym = Symbolic(80)
    counts = [0, 3, 5, 7]
    rows = tuple(push_all(sym, n)[-1] if n else TreeState.empty() for n in counts)
    cache = TreeCache.of(RaggedState(rows=rows), 63)
    for step in range(12):
        n = cache.sizes
        pushing = torch.tensor([(step + b) % 3 == 0 for b in range(len(counts))])
        cache, prefix = cache.push((torch.tensor(n),), sym, rows=pushing)
        moved = [c + 1 if p else c for c, p in zip(n, pushing.tolist())]
        assert cache.sizes == moved
        assert [r for r, p in zip(sym.read(prefix[0]), pushing.tolist()) if p] == \
            [closed_form(c + 1) for c, p in zip(n, pushing.tolist()) if p]
    # the rows left alone read back as the counter they had (slots untouched)
    identity = (torch.tensor([Symbolic.IDENTITY]),)
    assert sym.read(cache.before(identity)[0]) == [closed_form(c) if c else "e" for c in cache.sizes]


@BOTH
@pytest.mark.parametrize("lanes", [(), (3,)])
def test_one_position_decodes_as_the_chunk_stream_bit_for_bit(ops, lanes, name):
    torch.manual_seed(0)
    layer = getattr(ops, name)(C=4, lanes=lanes or None)
    state, cache = layer.init_state(), layer.init_state(2, capacity=40)
    assert type(cache) is ChunkCache and type(cache.inner) is INNER[name] and cache.chunk == 4
    # a tree counter's levels hold 63 tokens; an exact scan's 10 chunks and a partial one, 43
    assert cache.capacity == (63 if name == "chunky" else 43) and cache.is_empty
    for token in tokens(23, 2, lanes):
        want, state = layer.step(state, **token)
        got, cache = layer.step(cache, **token)
        assert torch.equal(got, want)
    assert cache.sizes == [23, 23] and cache.op == state.op
    # a prefill onto the cache continues each row (here the partial chunk of 3), and gives a cache
    x, u = torch.randn(2, 9, *lanes), torch.randn(2, 9, *lanes, 2)
    want, state = layer(x=x, u=u, state=state, return_state=True)
    got, cache = layer(x=x, u=u, state=cache, return_state=True)
    assert torch.equal(got, want) and type(cache) is ChunkCache and cache.sizes == [32, 32]
    assert torch.equal(layer(x=x, u=u, state=cache), layer(x=x, u=u, state=state))


def test_transformer_psm_decodes_rows_at_their_own_positions_in_one_call():
    torch.manual_seed(1)
    layer = psmc.load(EXAMPLES / "transformer_psm.psm").transformer_psm(C=4, D=8, H=2)
    lengths = [5, 1, 9, 4, 8]
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist())
    _, ragged = layer(x=torch.randn(1, sum(lengths), 8), cu_seqlens=cu, return_state=True)
    cache = ChunkCache.of(ragged, 100)
    assert cache.sizes == lengths and cache.filled.tolist() == [1, 1, 1, 0, 0]
    assert cache.inner.sizes == [1, 0, 2, 1, 2]
    for _ in range(13):  # every row completes a chunk at its own token
        x = torch.randn(5, 8)
        want, ragged = layer.step(ragged, x=x)
        got, cache = layer.step(cache, x=x)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert cache.sizes == ragged.sizes == [n + 13 for n in lengths]


@pytest.mark.parametrize("lanes", [(), (2,)])
def test_exact_scan_rows_decode_at_their_own_positions_as_their_streams_and_one_pass(ops, lanes):
    """A packed prefill (cu_seqlens) of rows of different lengths, then one call per token for
    every row: each row's outputs are its ChunkStream's bit for bit (the ragged state steps a
    group per position), and its one-pass forward's; a forward onto the cache continues every
    row at its own position and gives a cache again."""
    torch.manual_seed(5)
    layer = ops.chunky_exact(C=3, lanes=lanes or None)
    lengths, steps, more = [5, 1, 9, 3, 6], 8, 4
    T = max(lengths) + steps + more
    x, u = torch.randn(len(lengths), T, *lanes), torch.randn(len(lengths), T, *lanes, 2)
    full = layer(x=x, u=u)
    packed = {n: torch.cat([t[b:b + 1, :n_b] for b, n_b in enumerate(lengths)], dim=1) for n, t in (("x", x), ("u", u))}
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist())
    _, ragged = layer(**packed, cu_seqlens=cu, return_state=True)
    cache = ChunkCache.of(ragged, 64)
    assert type(cache.inner) is ScanCache and cache.sizes == lengths and cache.inner.sizes == [1, 0, 3, 1, 2]
    assert cache.filled.tolist() == [2, 1, 0, 0, 0] and cache.capacity == 3 * (64 // 3 + 1) - 1
    rows = torch.arange(len(lengths))
    at = torch.tensor(lengths)
    for j in range(steps):  # every row completes a chunk at its own token
        token = {"x": x[rows, at + j], "u": u[rows, at + j]}
        want, ragged = layer.step(ragged, **token)
        got, cache = layer.step(cache, **token)
        assert torch.equal(got, want)
        torch.testing.assert_close(got, full[rows, at + j], rtol=1e-5, atol=1e-5)
    assert cache.sizes == ragged.sizes == [n + steps for n in lengths]
    # a forward of `more` tokens onto the cache: every row from its own position
    chunk = {n: torch.stack([t[b, n_b + steps:n_b + steps + more] for b, n_b in enumerate(lengths)])
             for n, t in (("x", x), ("u", u))}
    got, cache = layer(**chunk, state=cache, return_state=True)
    assert type(cache) is ChunkCache and type(cache.inner) is ScanCache
    assert cache.sizes == [n + steps + more for n in lengths]
    want = torch.stack([full[b, n_b + steps:n_b + steps + more] for b, n_b in enumerate(lengths)])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # back to stream states: each row's ChunkStream over its ScanState, the dead field left out
    back = cache.to_state()
    assert isinstance(back, RaggedState) and back.sizes == cache.sizes
    assert all(type(r.inner) is ScanState and r.inner.prefix[0] is None for r in back.rows)


def test_exact_scan_cache_is_a_scan_state_per_row():
    """ScanCache alone: a masked push moves only the rows asked, a row's first leaf is the leaf
    itself (no combine with an identity), and each row reads back as a ScanState's push."""
    add = lambda left, right: (left[0] * 10 + right[0],)  # noqa: E731  (the order shows in the digits)
    cache = ScanCache.empty(8, batch=3)
    assert cache.is_empty and cache.before((torch.tensor(-1),))[0].tolist() == -1
    states = [ScanState.empty() for _ in range(3)]
    for step, pushing in enumerate([[1, 0, 1], [1, 1, 0], [0, 1, 1], [1, 1, 1]]):
        leaf = (torch.tensor([step + 1, step + 2, step + 3]),)
        pushing = torch.tensor(pushing, dtype=torch.bool)
        cache, _ = cache.push(leaf, add, rows=pushing)
        states = [s.push((leaf[0][b:b + 1],), add) if p else s
                  for b, (s, p) in enumerate(zip(states, pushing.tolist()))]
    assert cache.sizes == [int(s.count) for s in states] == [3, 3, 3]
    assert cache.before(None)[0].tolist() == [int(s.prefix[0]) for s in states] == [124, 345, 356]
    cache = cache.reset([1])
    assert cache.before((torch.tensor(0),))[0].tolist() == [124, 0, 356]
    with pytest.raises(ValueError, match=r"the scan cache is full: it holds 8 chunks per row \(an exact scan of 8 "
                                         r"chunks\) and a row would reach 9"):
        for _ in range(6):
            cache, _ = cache.push((torch.tensor([1, 1, 1]),), add)


@BOTH
def test_rows_move_like_any_state_and_a_reset_row_starts_clean(ops, name):
    torch.manual_seed(2)
    layer = getattr(ops, name)(C=3)
    lengths = [4, 2, 7]
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist())
    x, u = torch.randn(1, 13), torch.randn(1, 13, 2)
    _, ragged = layer(x=x, u=u, cu_seqlens=cu, return_state=True)
    cache = ChunkCache.of(ragged, 50)
    picked = cache[[2, 0]]
    assert picked.sizes == [7, 4]
    both = cat_states([picked, cache[1:2]])
    assert type(both) is ChunkCache and both.sizes == [7, 4, 2]
    fresh = both.reset(0)  # slot 0 held a partial chunk of one token: a new stream there
    token = tokens(1, 3, seed=3)[0]
    got, fresh = layer.step(fresh, **token)
    alone, _ = layer.step(layer.init_state(), **{k: v[:1] for k, v in token.items()})
    assert torch.equal(got[:1], alone) and fresh.sizes == [1, 5, 3]
    # a cache none of whose rows completed a chunk (no tree slots yet) joins one that has slots
    _, short = layer(x=x[:, :2], u=u[:, :2], return_state=True)
    young = ChunkCache.of(short, 50)
    assert young.inner.is_empty and young.sizes == [2]
    joined = cat_states([fresh, young])
    token = tokens(4, 4, seed=7)
    for t in token:
        got, joined = layer.step(joined, **t)
    _, alone = layer(x=x[:, :2], u=u[:, :2], return_state=True)
    for t in token:
        want, alone = layer.step(alone, **{k: v[3:] for k, v in t.items()})
    assert torch.equal(got[3:], want) and joined.sizes == [5, 9, 7, 6]
    # back to stream states: each row's ChunkStream
    rows = fresh.to_state()
    assert isinstance(rows, RaggedState) and rows.sizes == [1, 5, 3]
    assert all(isinstance(r, ChunkStream) for r in rows.rows)


@BOTH
def test_compiled_cache_step_is_one_graph_for_every_position(ops, name):
    torch.manual_seed(4)
    layer = getattr(ops, name)(C=4)
    torch._dynamo.reset()
    step = torch.compile(layer.step, fullgraph=True)
    state, cache = layer.init_state(), layer.init_state(3, capacity=100)
    torch._dynamo.utils.counters.clear()
    for token in tokens(14, 3, seed=5):  # past Dynamo's recompile limit: a ChunkStream is a graph per fill
        want, state = layer.step(state, **token)
        got, cache = step(cache, **token)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    # one graph for the first token (which allocates the buffers), one for every later position
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2
    cache = cache.reset([1])
    token = tokens(1, 3, seed=6)[0]
    got, cache = step(cache, **token)
    alone, _ = layer.step(layer.init_state(), **{k: v[1:2] for k, v in token.items()})
    torch.testing.assert_close(got[1:2], alone, rtol=1e-6, atol=1e-6)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2


@BOTH
def test_cache_saves_moves_and_reports_its_size(ops, tmp_path, name):
    layer = getattr(ops, name)(C=4)
    _, cache = layer.step(layer.init_state(capacity=7), **tokens(1, 2)[0])
    assert cache.capacity == 7 and cache.inner.capacity == 1 and not cache.is_empty
    # buffers x [2, 4] and u [2, 4, 2], fills, and no inner slots until a chunk completes
    assert cache.nbytes == (2 * 4 + 2 * 4 * 2) * 4 + 2 * 8 + 2 * 8
    torch.save(cache, tmp_path / "c.pt")
    back = torch.load(tmp_path / "c.pt", weights_only=True)
    assert type(back) is ChunkCache and back.sizes == [1, 1] and torch.equal(back.buffer["x"], cache.buffer["x"])
    assert back.to(dtype=torch.float64).buffer["u"].dtype == torch.float64
    for token in tokens(4, 2, seed=1):  # a chunk completes: the inner slots exist
        _, cache = layer.step(cache, **token)
    torch.save(cache, tmp_path / "c.pt")
    back = torch.load(tmp_path / "c.pt", weights_only=True)
    assert type(back.inner) is INNER[name] and back.sizes == [5, 5] and back.inner.sizes == [1, 1]
    token = tokens(1, 2, seed=2)[0]
    assert torch.equal(layer.step(back, **token)[0], layer.step(cache, **token)[0])
    if name == "chunky_exact":  # the prefix: [2] h and [2, 2] z; the dead field has no slot
        assert back.inner.prefix[0] is None and back.nbytes == cache.nbytes == \
            (2 * 4 + 2 * 4 * 2) * 4 + 2 * 8 + 2 * 8 + (2 + 2 * 2) * 4


def test_cache_errors_name_the_op_and_the_fix(ops):
    chunky, exact = ops.chunky(C=2), ops.chunk_exact(C=2)
    ema = psmc.load(EXAMPLES / "ema.psm").ema()
    cache = chunky.init_state(2, capacity=3)
    for token in tokens(3, 2):
        _, cache = chunky.step(cache, **token)
    with pytest.raises(ValueError, match=r"the chunk cache is full: it holds 3 tokens per row \(1 levels of chunks of "
                                         r"2\) and a row would reach 4: build it with a larger capacity"):
        chunky.step(cache, **tokens(1, 2)[0])
    with pytest.raises(ValueError, match="the chunk cache holds 2 rows but the token has batch 3"):
        chunky.step(chunky.init_state(2, capacity=8), **tokens(1, 3)[0])
    with pytest.raises(TypeError, match=r"ema: a ChunkCache holds the chunk counter and partial chunks of a chunk op "
                                        r"on the tree, but this op is a token tree scan: use a TreeCache "
                                        r"\(init_state\(batch, capacity=N\)\)"):
        ema.step(cache, y=torch.randn(2, 3))
    with pytest.raises(TypeError, match=r"chunky: a TreeCache holds the counter of a token tree scan, but this op "
                                        r"is a chunk op on the tree: use a ChunkCache \(init_state\(batch, capacity=N\)\)"):
        chunky.step(ema.init_state(2, capacity=8), **tokens(1, 2)[0])
    with pytest.raises(TypeError, match=r"chunky: a ChunkCache continues as state=cache"):
        chunky(x=torch.randn(2, 3), u=torch.randn(2, 3, 2), initial_state=cache)
    with pytest.raises(ValueError, match=r"the state has seen 9 tokens, more than a chunk cache of capacity 5 holds "
                                         r"\(7 tokens per row\)"):
        _, long = chunky(x=torch.randn(1, 9), u=torch.randn(1, 9, 2), return_state=True)
        ChunkCache.of(long, 5)
    # over an exact scan: the capacity rounded up to the end of its chunk, checked as the tree's
    mine = exact.init_state(2, capacity=4)
    assert mine.capacity == 5 and mine.inner.capacity == 2
    for _ in range(5):
        _, mine = exact.step(mine, x=torch.randn(2))
    with pytest.raises(ValueError, match=r"the chunk cache is full: it holds 5 tokens per row \(2 chunks of 2 and a "
                                         r"partial one\) and a row would reach 6: build it with a larger capacity"):
        exact.step(mine, x=torch.randn(2))
    with pytest.raises(ValueError, match=r"the state has seen 9 tokens, more than a chunk cache of capacity 5 holds "
                                         r"\(5 tokens per row\)"):
        _, long = exact(x=torch.randn(1, 9), return_state=True)
        ChunkCache.of(long, 5)
    with pytest.raises(TypeError, match=r"chunk_exact: this ChunkCache holds the chunk counter and partial chunks of a "
                                        r"chunk op on the tree, but this op is a chunk op on an exact scan: use the "
                                        r"ChunkCache this layer makes \(layer.init_state\(batch, capacity=N\)\)"):
        exact.step(chunky.init_state(2, capacity=8), x=torch.randn(2))
    with pytest.raises(TypeError, match=r"chunky: this ChunkCache holds the per-row prefix and partial chunks of a "
                                        r"chunk op on an exact scan, but this op is a chunk op on the tree: use the "
                                        r"ChunkCache this layer makes"):
        chunky.step(mine, **tokens(1, 2)[0])
    with pytest.raises(TypeError, match=r"ema: a ChunkCache holds the per-row prefix and partial chunks of a chunk op "
                                        r"on an exact scan, but this op is a token tree scan: use a TreeCache"):
        ema.step(mine, y=torch.randn(2, 3))
