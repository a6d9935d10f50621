"""The paper's fixed tree for non-associative aggregators, level-batched (PAPER.md §3).

Positions are global leaf counts: the state holds leaves [0, m), the new leaves are
m, ..., m+T-1, and P(t) is the closed-form prefix over the first t leaves:

    P(t) = Agg(P(t - low(t)), Block[t - low(t), t))     (P(t) = Block[0, t) when t = low(t))

where low(t) is t's lowest set bit and Block is the aligned balanced tree. That is the
Blelloch down-sweep's bracketing, prefix first (derived from the closed form; the tests check
it against the sweeps). Two phases, every Agg call batched over all nodes of a phase step:

1. up-sweep: level d holds Block[e - 2^d, e) for every multiple e of 2^d in (m, m+T]; its
   children are level d-1 nodes, except a left child ending at or before m, which is exactly
   the counter's root at level d-1. One Agg call per level.
2. prefixes: round r computes the P(t) whose chain t -> t - low(t) -> ... stays above m for
   r steps. Round 0 needs only a node (P(t) = Block) or a counter fold (P(t - low(t)) with
   t - low(t) <= m is the state's cached fold); round r > 0 takes its left operands from
   round r-1. One Agg call per round.

Agg calls: at most floor(log2(m+T)) up-sweep levels plus floor(log2(m+T)) + 1 rounds; when
m = 0 round 0 needs no Agg, so at most 2*floor(log2 T). Agg work: about 2T node evaluations.
The index bookkeeping is vectorised int64 arithmetic; Python loops only run over levels.
"""

from __future__ import annotations

import torch
from torch import Tensor

from psmc.runtime.element import (
    Combine,
    Element,
    at,
    clone_step,
    join,
    length,
    step_like,
    strided,
    take,
)
from psmc.runtime.scan import exclusive_from_inclusive
from psmc.runtime.state import TreeState


def tree_scan(
    x: Element,
    agg: Combine,
    *,
    state: TreeState | None = None,
    identity: Element | None = None,
    exclusive: bool = False,
) -> tuple[Element, Element | None, TreeState]:
    """Prefixes of the fixed tree over the leaves `x` (`[B, T, *lanes, *field]`), continuing
    the counter `state`. Returns (inclusive, exclusive or None, new_state): inclusive_j =
    P(m+j+1), exclusive_j = P(m+j). `identity` (lead []) is used only for P(0)."""
    m = 0 if state is None else state.size
    n = m + length(x)
    if exclusive and m == 0 and identity is None:
        raise ValueError("the exclusive prefix of the first leaf is the formal identity: pass identity=")
    levels = _up_sweep(x, agg, state, m)
    inclusive = _prefixes(levels, agg, state, m, n)
    new_state = _counter_after(levels, inclusive, state, m, n, x[0].device)
    if not exclusive:
        return inclusive, None, new_state
    first = identity if m == 0 else state.prefix
    return inclusive, exclusive_from_inclusive(inclusive, first), new_state


def _first_end(m: int, level: int) -> int:
    """The smallest multiple of 2^level greater than m: the first node end at that level."""
    return ((m >> level) + 1) << level


def _node_count(m: int, n: int, level: int) -> int:
    """Multiples of 2^level in (m, n]: the nodes of that level."""
    return (n >> level) - (m >> level)


def _old(state: TreeState | None, table: str, level: int) -> Element:
    held = None if state is None else getattr(state, table)[level]
    if held is None:
        raise ValueError(f"the tree state lacks its {table[:-1]} at level {level}: was it built by push/tree_scan?")
    return held


def _up_sweep(x: Element, agg: Combine, state: TreeState | None, m: int) -> list[Element]:
    n = m + length(x)
    levels = [x]
    level = 1
    while _node_count(m, n, level) > 0:
        below, count = levels[-1], _node_count(m, n, level)
        # The first right child is node 0 or 1 of the level below, and the rest alternate.
        first_right = (_first_end(m, level) - _first_end(m, level - 1)) >> (level - 1)
        right = strided(below, first_right, 2, count)
        if first_right == 1:
            left = strided(below, 0, 2, count)
        else:  # the first left child ends at or before m: it is the counter's root
            root = step_like(_old(state, "roots", level - 1), below)
            left = root if count == 1 else join([root, strided(below, 1, 2, count - 1)])
        levels.append(agg(left, right))
        level += 1
    return levels


def _low_level(values: Tensor) -> Tensor:
    """Index of the lowest set bit of each positive value."""
    low = values & -values
    return torch.log2(low.to(torch.float64)).round().to(torch.int64)


def _low(v: int) -> int:
    return (v & -v).bit_length() - 1


_PLANS: dict = {}


@torch._dynamo.assume_constant_result  # a torch.compile graph runs it at trace time: constants
def _plan_cached(m: int, n: int, lengths: tuple) -> tuple:
    key = (m, n, lengths)
    plan = _PLANS.get(key)
    if plan is None:
        if len(_PLANS) > 256:
            _PLANS.clear()
        plan = _PLANS[key] = _plan(m, n, lengths)
    return plan


def _plan(m: int, n: int, lengths: tuple) -> tuple:
    """The index bookkeeping of `_prefixes` for leaves m+1..n, in Python ints (it depends only
    on m, n and the level sizes: cached in eager mode, and constant in a torch.compile graph).

    Returns (direct, folded, fold_levels, rounds, order): node indices of the round-0 prefixes
    that are a node, (fold level, node) of those that fold the state's cache in, for each later
    round (left slots in the previous round's output, node indices), and the permutation that
    puts the produced prefixes in the order of t (None when they already are)."""
    offsets = [0]
    for size in lengths[:-1]:
        offsets.append(offsets[-1] + size)
    node_of, rest_of, rounds_of = {}, {}, {}
    for t in range(m + 1, n + 1):
        level = _low(t)
        rest = t - (t & -t)
        node_of[t] = offsets[level] + ((t - _first_end(m, level)) >> level)
        rest_of[t] = rest
        r, chain = 0, rest
        while chain > m:
            r += 1
            chain -= chain & -chain
        rounds_of[t] = r
    ts = range(m + 1, n + 1)
    direct = [t for t in ts if rounds_of[t] == 0 and rest_of[t] == 0]
    folded = [t for t in ts if rounds_of[t] == 0 and rest_of[t] > 0]
    members = direct + folded
    plan_rounds = []
    for r in range(1, max(rounds_of.values(), default=0) + 1):
        these = [t for t in ts if rounds_of[t] == r]
        slot = {t: i for i, t in enumerate(members)}
        plan_rounds.append(([slot[rest_of[t]] for t in these], [node_of[t] for t in these]))
        members = these
    produced = direct + folded + [t for r in range(1, len(plan_rounds) + 1) for t in ts if rounds_of[t] == r]
    order = None
    if produced != list(ts):
        position = {t: i for i, t in enumerate(produced)}
        order = [position[t] for t in ts]
    return ([node_of[t] for t in direct], [(_low(rest_of[t]), node_of[t]) for t in folded],
            tuple(plan_rounds), order)


_INDEXES: dict = {}


def _indexer(key: tuple, device):
    """index(name, values): an int64 tensor of `values` on `device`, made once per plan `key`,
    name and device in eager mode. A pass over the same leaves then copies no index to the
    device (on a GPU each copy is a host-to-device transfer, which a CUDA graph cannot hold);
    in a torch.compile graph the plan is constant and so are the tensors."""
    if torch.compiler.is_compiling():
        return lambda name, values: torch.tensor(values, dtype=torch.int64, device=device)

    def index(name, values):
        full = key + (name, str(device))
        found = _INDEXES.get(full)
        if found is None:
            if len(_INDEXES) > 512:  # (a few plans: an entry holds up to T int64)
                _INDEXES.clear()
            with torch.inference_mode(False):  # (a normal tensor: a later pass may record autograd)
                found = _INDEXES[full] = torch.tensor(values, dtype=torch.int64, device=device)
        return found
    return index


def _prefixes(levels: list[Element], agg: Combine, state: TreeState | None, m: int, n: int) -> Element:
    lengths = tuple(length(lv) for lv in levels)
    plan = _plan_cached(m, n, lengths)
    direct, folded, rounds, order = plan
    _index = _indexer((m, n, lengths), next(t for t in levels[0] if t is not None).device)
    nodes = join(levels)
    # Round 0: P(t) is a node (rest == 0) or Agg(state's fold, node) (0 < rest <= m).
    parts = []
    if direct:
        parts.append(take(nodes, _index("direct", direct)))
    if folded:
        fold_left = _gather_folds(state, [lvl for lvl, _ in folded], nodes, _index)
        parts.append(agg(fold_left, take(nodes, _index("folded", [node for _, node in folded]))))
    outputs = [join(parts)]
    for r, (left_slots, node_ids) in enumerate(rounds):  # round r takes its left operands from round r-1
        outputs.append(agg(take(outputs[-1], _index(("left", r), left_slots)), take(nodes, _index(("node", r), node_ids))))
    if order is None:
        return join(outputs)
    return take(join(outputs), _index("order", order))


def _gather_folds(state: TreeState | None, fold_levels: list, like: Element, _index) -> Element:
    """The state's cached folds at `fold_levels`, one per step (broadcast when all agree)."""
    distinct = sorted(set(fold_levels))
    pool = join([step_like(_old(state, "folds", lvl), like) for lvl in distinct])
    if len(distinct) == 1:
        return pool  # one step; Agg broadcasts it over the time axis
    slot_of = {lvl: i for i, lvl in enumerate(distinct)}
    return take(pool, _index("folds", [slot_of[lvl] for lvl in fold_levels]))


def _counter_after(
    levels: list[Element], inclusive: Element, state: TreeState | None, m: int, n: int, device: torch.device
) -> TreeState:
    """The counter after the up-sweep `levels` (level d: its nodes in order of their ends)."""
    return counter_after(lambda level, end: at(levels[level], (end - _first_end(m, level)) >> level),
                         inclusive, state, m, n, device)


def counter_after(root_at, inclusive: Element, state: TreeState | None, m: int, n: int,
                  device: torch.device) -> TreeState:
    """The counter after n leaves: root d ends at n with bits below d cleared; its fold is
    P(that end). Ends past m were just computed (`root_at(d, end)`: that tree, `inclusive`: the
    prefixes of leaves m+1..); the others are the old counter's."""
    roots: list[Element | None] = []
    folds: list[Element | None] = []
    for level in range(n.bit_length()):
        end = (n >> level) << level
        if not (n >> level) & 1:
            roots.append(None)
            folds.append(None)
        elif end > m:
            roots.append(clone_step(root_at(level, end)))
            folds.append(clone_step(at(inclusive, end - m - 1)))
        else:
            roots.append(_old(state, "roots", level))
            folds.append(_old(state, "folds", level))
    return TreeState(count=torch.tensor(n, dtype=torch.int64, device=device), roots=tuple(roots), folds=tuple(folds))
