"""Runtime strategies: how a layer walks time and keeps its prefix, chosen once from the spec.

A layer's runtime behaviour varies along two independent axes, and each gets one small object:

- the scan (`ExactScan`, `TreeScan`): the stream-state class, an empty state, pushing one leaf,
  the continued pass over many leaves (carrying a state in), the start and final states of a
  context-parallel slice, and whether the token kernels (C++, the dispatch table's step paths)
  exist for it (they do for exact scans only);
- the stream (`TokenStream`, `ChunkStreams`): a leaf is one token, or one chunk of C tokens
  whose partial last chunk rides in a `ChunkStream`. The stream owns the parallel pass, the
  flags the step runner and the state check read (`chunked`, `token_kernels`, `state_class`:
  plain attributes, as a torch.compile'd step guards every lookup), whether the state may be
  given as plain tensors, and the context-parallel pass.

`strategy_for(spec)` picks one stream over one scan; `PsmLayer.__init__` calls it once and
every later decision is a method call on `layer._strategy` (no `spec.scan` test in the layer).
The strategies are stateless singletons (safe to pickle and deepcopy with the layer); the
states they make share one read API (`prefix`, `count`, `size`, `nbytes`, `tensors()`).
"""
from __future__ import annotations

from .element import with_time
from .scan import exact_scan, exclusive_from_inclusive
from .state import ScanCache, ScanState, TreeCache, TreeState
from .tree import tree_scan


class ScanStrategy:
    """What an exact scan and the paper's tree differ in. Methods take the layer (its generated
    bodies) and the call (dims, dtypes, device) explicitly: the strategy holds nothing."""

    name: str = ""  # the spec's spelling: 'exact' | 'tree'
    noun: str = ""  # in error messages: "this op's state is a ..."
    state_class: type = ScanState  # what `init_state` makes and a continued call must get
    cache_class: type = ScanCache  # its per-row form: a ChunkCache's inner state (a token tree's serving cache)
    token_kernels: bool = False  # C++ kernels and the dispatch table's step paths apply
    plain_tensors: bool = False  # `initial_state=` may be plain tensors (fla style)

    def empty(self, device=None):
        """The state before any leaf."""
        return self.state_class.empty(device)

    def push(self, layer, call, state, leaf):
        """The stream state after one more leaf (a step element)."""
        raise NotImplementedError

    def scan(self, layer, call, leaves, inner, exclusive: bool):
        """(inclusive, exclusive or None, new inner state) of `leaves` continuing `inner`."""
        raise NotImplementedError

    def context_parallel_states(self, run, leaves):
        """(this rank's start state, the final state) of a context-parallel slice of leaves."""
        raise NotImplementedError

    def context_parallel_tokens(self, run):
        """A context-parallel pass of a token op (the leaves are tokens)."""
        return run.run_leaves()

    def context_parallel_spanning(self, varlen, parts: list) -> list:
        """The final states of the varlen sequences that span ranks (`parts`: one `_Run` each)."""
        return varlen.one_pass_each(parts)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class ExactScan(ScanStrategy):
    """An associative combine: the inclusive prefix so far is the whole state (`ScanState`)."""

    name, noun, state_class, token_kernels, plain_tensors = "exact", "exact scan", ScanState, True, True

    def push(self, layer, call, state, leaf):
        pushed = state.push(leaf, layer._prefix_combine_fn(call))
        return ScanState(prefix=layer._without_dead(pushed.prefix), count=pushed.count)

    def scan(self, layer, call, leaves, inner, exclusive: bool):
        combine = layer._combine_fn(call)
        carry = None if inner is None else inner.prefix
        if carry is not None and layer.spec.dead:
            # the carry has no dead fields: scan the new leaves alone, then put the carry
            # in front of every step with one combine onto the prefix
            incl = layer._prefix_combine_fn(call)(with_time(carry), exact_scan(leaves, combine))
        else:
            incl = exact_scan(leaves, combine, carry=carry)
        excl = None
        if exclusive:
            first = carry if carry is not None else layer._identity_element(call)
            excl = exclusive_from_inclusive(incl, first)
        start = inner if inner is not None else ScanState.empty(call.ctx.dev)
        return incl, excl, start.advanced(layer._without_dead(incl))

    def context_parallel_states(self, run, leaves):
        return run.exact_states(leaves)

    def context_parallel_tokens(self, run):
        return run.run_exact_tokens()  # one exchange of totals; cheap carries where the algebra allows

    def context_parallel_spanning(self, varlen, parts: list) -> list:
        return varlen.exact_spanning(parts)


class TreeScan(ScanStrategy):
    """A non-associative aggregator: the paper's fixed tree, carried as a binary counter (`TreeState`)."""

    name, noun, state_class, cache_class = "tree", "tree", TreeState, TreeCache

    def push(self, layer, call, state, leaf):
        return state.push(leaf, layer._combine_fn(call))

    def scan(self, layer, call, leaves, inner, exclusive: bool):
        identity = layer._identity_element(call) if layer.spec.has_identity else None
        if call.ctx.scan_kernel != "torch":  # the dispatch path "triton-tree" or "cpu-tree" chose its kernels
            from . import tree_kernels
            k = layer._tree_kernels if call.ctx.scan_kernel == "triton" else layer._cpu_tree_kernels
            return tree_kernels.tree_scan(layer, call, leaves, inner, identity, exclusive, k)
        return tree_scan(leaves, layer._combine_fn(call), state=inner, identity=identity, exclusive=exclusive)

    def context_parallel_states(self, run, leaves):
        return run.tree_states(leaves)


class StreamStrategy:
    """What token ops and chunk ops differ in, over one `ScanStrategy` (`scan`)."""

    chunked: bool = False

    def __init__(self, scan: ScanStrategy):
        # plain instance attributes, not properties: a torch.compile'd step reads them with
        # one guard each (a property costs a closure guard and a not-shadowed guard more)
        self.scan = scan
        self.chunked = type(self).chunked
        self.state_class = scan.state_class  # the inner state class a continued call must get
        self.token_kernels = scan.token_kernels
        self.plain_tensors = scan.plain_tensors and not self.chunked
        self.noun = "chunk stream" if self.chunked else scan.noun

    def empty(self, device=None):
        """`init_state`: the scan's empty state (a chunk op's buffer comes with the first step)."""
        return self.scan.empty(device)

    def forward(self, layer, call, state, return_state: bool):
        """The parallel pass with its checks: (outputs, new state or None)."""
        raise NotImplementedError

    def parallel_pass(self, layer, call, state, return_state: bool):
        """The parallel pass alone (context parallelism runs it on a rank's slice)."""
        raise NotImplementedError

    def context_parallel(self, run):
        """The context-parallel pass of one sequence (`run`: a `context_parallel._Run`)."""
        raise NotImplementedError

    def context_parallel_spanning(self, varlen, parts: list) -> list:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.scan!r})"


class TokenStream(StreamStrategy):
    """Every token is a leaf."""

    def forward(self, layer, call, state, return_state: bool):
        outputs, new_state = layer._forward_tokens(call, state, return_state)
        if layer._needs_causal_rerun(outputs, call):
            # a matmul over a chunk multiplies later NaNs by 0: rerun the token-by-token scan so a
            # NaN at t reaches no output before t (only taken when a NaN is already there)
            fast, layer.use_fast_path = layer.use_fast_path, False
            try:
                outputs, new_state = layer._forward_tokens(call, state, return_state)
            finally:
                layer.use_fast_path = fast
        return outputs, new_state

    def parallel_pass(self, layer, call, state, return_state: bool):
        return layer._forward_tokens(call, state, return_state)

    def context_parallel(self, run):
        return self.scan.context_parallel_tokens(run)

    def context_parallel_spanning(self, varlen, parts: list) -> list:
        return self.scan.context_parallel_spanning(varlen, parts)


class ChunkStreams(StreamStrategy):
    """Every complete chunk of C tokens (`chunk C;`) is a leaf; a stream keeps the partial chunk's
    tokens in a `ChunkStream` around the scan's state."""

    chunked = True

    def forward(self, layer, call, state, return_state: bool):
        return layer._forward_chunked(call, state, return_state)

    parallel_pass = forward

    def context_parallel(self, run):
        return run.run_leaves()

    def context_parallel_spanning(self, varlen, parts: list) -> list:
        return varlen.one_pass_each(parts)


SCANS = {"exact": ExactScan(), "tree": TreeScan()}
_STREAMS = {(name, chunked): (ChunkStreams if chunked else TokenStream)(scan)
            for name, scan in SCANS.items() for chunked in (False, True)}


def strategy_for(spec) -> StreamStrategy:
    """The strategy of a layer's spec (`spec.scan`, and `spec.chunk` for chunk ops)."""
    try:
        return _STREAMS[(spec.scan, spec.chunk is not None)]
    except KeyError:
        raise ValueError(f"{spec.name}: unknown scan kind {spec.scan!r}; the runtime has "
                         f"{', '.join(map(repr, SCANS))}") from None


__all__ = ["ScanStrategy", "ExactScan", "TreeScan", "StreamStrategy", "TokenStream", "ChunkStreams",
           "strategy_for", "SCANS"]
