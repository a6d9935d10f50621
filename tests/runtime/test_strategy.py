"""Runtime strategies (psmc/runtime/strategy.py): picked once from the spec when a layer is built,
and the one place the runtime tells exact scans from trees and token ops from chunk ops. The
states they make share one read API (`prefix`, `count`, `size`)."""
from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest
import torch

import psmc
from psmc.runtime import strategy as strategies
from psmc.runtime.state import ChunkStream, ScanState, TreeState

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
RUNTIME = Path(strategies.__file__).resolve().parent

# chunk ops over both scans: a decayed chunk sum (associative: exact) and a squashed one (tree)
CHUNK_OPS = """
op chunk_exact[C] {
  chunk C;
  state (a: f32, h: f32);
  lift (x: f32[C], g: f32[C]) { return (exp(sum(g)), sum(x)); }
  combine (l, r) { return (l.a * r.a, r.a * l.h + r.h); }
  identity = (ones, zeros);
  readout exclusive (p, x: f32[C]) { return p.h + x; }
}
op chunk_tree[C] {
  chunk C;
  assume empty_prefix;
  state (h: f32);
  lift (x: f32[C], g: f32[C]) { return sum(x * exp(g)); }
  combine (l, r) { return tanh(0.5 * l.h + r.h); }
  identity = zeros;
  readout exclusive (p, x: f32[C]) { return p.h + x; }
}
"""


@pytest.fixture(scope="module")
def layers(tmp_path_factory):
    path = tmp_path_factory.mktemp("strategy") / "chunk_ops.psm"
    path.write_text(CHUNK_OPS)
    chunk = psmc.load(path)
    return {
        "tokens/exact": psmc.load(EXAMPLES / "linear_recurrence.psm").linear_recurrence,
        "tokens/tree": psmc.load(EXAMPLES / "ema.psm").ema,
        "chunks/exact": chunk.chunk_exact,
        "chunks/tree": chunk.chunk_tree,
    }


def inputs_for(cls, T, seed=0, batch=2, lanes=3):
    g = torch.Generator().manual_seed(seed)
    return {s.name: (-torch.rand(batch, T, lanes, generator=g) if s.name in ("log_a", "g")
                     else torch.randn(batch, T, lanes, generator=g)) for s in cls.spec.inputs}


@pytest.mark.parametrize("kind", ["tokens/exact", "tokens/tree", "chunks/exact", "chunks/tree"])
def test_the_strategy_follows_the_spec_and_its_states_share_one_read_api(layers, kind):
    stream, scan = kind.split("/")
    cls = layers[kind]
    C = 2 if stream == "chunks" else 1
    layer = cls(C=C) if stream == "chunks" else cls()
    want_stream = strategies.ChunkStreams if stream == "chunks" else strategies.TokenStream
    want_scan, want_state = ((strategies.ExactScan, ScanState) if scan == "exact"
                             else (strategies.TreeScan, TreeState))
    assert type(layer._strategy) is want_stream and type(layer._strategy.scan) is want_scan
    assert layer._strategy.state_class is want_state and layer._strategy.scan.name == cls.spec.scan
    empty = layer.init_state()
    assert type(empty) is want_state and empty.prefix is None and int(empty.count) == 0

    T = 7
    x = inputs_for(cls, T)
    out, state = layer(**x, return_state=True)
    assert isinstance(getattr(state, "inner", state), want_state)
    if stream == "chunks":
        assert type(state) is ChunkStream and state.size == T % C
        assert state.prefix is state.inner.prefix and state.count is state.inner.count
    assert int(state.count) == T // C and (stream == "chunks" or state.size == T)
    # the prefix reads the same way on every state: a tuple of [B, *lanes, *field] tensors
    # (an exact scan's dead fields are None), and it is what an exclusive readout of the next
    # leaf sees: continuing from it equals the uninterrupted pass
    assert isinstance(state.prefix, tuple) and any(t is not None for t in state.prefix)
    for t in state.prefix:
        assert t is None or t.shape[:2] == (2, 3)
    more = inputs_for(cls, 5, seed=1)
    cont = layer(**more, state=state)
    whole = layer(**{n: torch.cat([x[n], more[n]], dim=1) for n in x})
    torch.testing.assert_close(cont, whole[:, T:])
    # a continued call given the other scan's state is refused, naming what it expected
    other = TreeState.empty() if scan == "exact" else ScanState.empty()
    with pytest.raises(TypeError, match=f"expected a {want_state.__name__}"):
        layer(**more, state=other)


def tree_variant(cls):
    """The same op run by the tree strategy (no fast path, every field kept): the layer must take
    its route from the strategy its spec gives, not from anything else on the class."""
    spec = dataclasses.replace(cls.spec, scan="tree", fast=None, kept=None)
    return type(cls.__name__ + "_tree", (cls,), {"spec": spec})


@pytest.mark.parametrize("T,split", [(1, 1), (6, 3), (13, 8)])
def test_exact_and_tree_strategies_agree_on_an_associative_op(layers, T, split):
    cls = layers["tokens/exact"]
    exact, tree = cls().double(), tree_variant(cls)().double()
    assert type(tree._strategy.scan) is strategies.TreeScan
    x = {n: t.double() for n, t in inputs_for(cls, T + 2, seed=T).items()}
    head = {n: t[:, :split] for n, t in x.items()}
    got = {}
    for name, layer in (("exact", exact), ("tree", tree)):
        out, state = layer(**head, return_state=True)
        outs = [out]
        if split < T:
            out, state = layer(**{n: t[:, split:T] for n, t in x.items()}, state=state, return_state=True)
            outs.append(out)
        for t in range(T, T + 2):  # then token by token
            out, state = layer.step(state, **{n: v[:, t] for n, v in x.items()})
            outs.append(out.unsqueeze(1))
        got[name] = (torch.cat(outs, dim=1), state)
    (out_e, st_e), (out_t, st_t) = got["exact"], got["tree"]
    assert type(st_e) is ScanState and type(st_t) is TreeState
    assert int(st_e.count) == int(st_t.count) == T + 2
    torch.testing.assert_close(out_e, out_t, rtol=1e-10, atol=1e-12)
    h = [f.name for f in cls.spec.fields].index("h")
    torch.testing.assert_close(st_e.prefix[h], st_t.prefix[h], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out_e, exact(**x))


def test_the_runtime_leaves_exact_vs_tree_to_the_strategies():
    """No module of the runtime but strategy.py compares a scan kind (`spec.scan == "exact"`,
    `scan != 'tree'`, ...): such a branch belongs in ExactScan/TreeScan."""
    found = []
    for path in sorted(RUNTIME.glob("*.py")):
        if path.name == "strategy.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare):
                operands = [node.left, *node.comparators]
                if any(isinstance(o, ast.Attribute) and o.attr == "scan" for o in operands) or \
                        any(isinstance(o, ast.Constant) and o.value in ("exact", "tree") for o in operands):
                    found.append(f"{path.name}:{node.lineno}: {ast.unparse(node)}")
    assert not found, "scan-kind branches outside psmc/runtime/strategy.py:\n" + "\n".join(found)
