"""Which state fields a stream prefix must keep: liveness over the dataflow of combine and readout.

A stream (or a continued parallel pass) only ever combines its prefix P as the LEFT operand:
P' = combine(P, x), with x a fresh element whose fields are all known. So a field f of P is
needed only if the readout reads it (`s.f`), or if some needed field's combine output reads
`l.f`. The dataflow is a directed graph with one node per field and the node `readout`:

    f -> g          combine's output for field g reads l.f
    f -> readout    the readout reads s.f

and the fields the prefix keeps are the ancestors of `readout`. The others are dead: S6's and
GLA's running product of decays `a` (it feeds only its own next value: `l.a * r.a`), the delta
rule's transition `E` (`r.E @ l.E`). Right operands (`r.f`) always come from lifted tokens, so
they never make a field live. Tree-scan roots are right operands too, so only exact scans drop
fields (`stream_dead_fields`).
"""
from __future__ import annotations

import networkx as nx

from ..ir.nodes import OpIR, leaves

READOUT = "readout"


def dataflow(op: OpIR) -> nx.DiGraph:
    """The field dataflow graph of `op` described in the module docstring."""
    graph = nx.DiGraph()
    graph.add_nodes_from(f.name for f in op.state)
    graph.add_node(READOUT)
    for field, output in zip(op.state, op.combine):
        for leaf in leaves((output,), "field"):
            role, name = leaf.attrs
            if role == "left":
                graph.add_edge(name, field.name)
    for leaf in leaves(op.readout, "field"):
        graph.add_edge(leaf.attrs[1], READOUT)
    return graph


def live_fields(op: OpIR) -> tuple[str, ...]:
    """The fields a left-operand prefix must keep, in state order."""
    needed = nx.ancestors(dataflow(op), READOUT)
    return tuple(f.name for f in op.state if f.name in needed)


def dead_fields(op: OpIR) -> tuple[str, ...]:
    """The fields nothing the readout reads depends on through a left-operand prefix."""
    live = set(live_fields(op))
    return tuple(f.name for f in op.state if f.name not in live)


def stream_dead_fields(op: OpIR, plan: str) -> tuple[int, ...]:
    """Indices of the fields a stream state of this op leaves out: the dead fields of an
    exact scan ('exact-scan'); none for a tree scan, whose roots are right operands too
    (nor when the readout reads no field at all: an element needs at least one tensor)."""
    dead = set(dead_fields(op))
    if plan != "exact-scan" or len(dead) == len(op.state):  # a readout of no field: keep them all
        return ()
    return tuple(i for i, f in enumerate(op.state) if f.name in dead)
