"""`PsmLayer`: the op-independent half of every generated layer.

A generated class subclasses `PsmLayer`, sets `spec` (what the op declares) and defines the
bodies `_lift`, `_combine`, `_readout` (and `_identity`). This module does everything else:
input validation, binding dims from shapes, lanes and broadcasting, chunking, the scan (exact
or the paper's tree), streaming states and the token-by-token `step`.

Layouts: an input declared `x: f32[K]` is passed as `[B, T, *lanes, K]` to `forward` and as
`[B, *lanes, K]` to `step`. For chunk ops the declared chunk axis is the time axis: an input
declared `x: f32[C, D]` is passed as `[B, T, *lanes, D]` (T any length).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
import ast
import contextlib
import functools
import math
from typing import Callable

import torch
from torch import Tensor, nn

from ..dtypes import DType
from .ops import DTYPES, broadcast_shapes, torch_dtypes
from .batch import RaggedState, _counts, at_one_count, cat_states, one_count
from . import compiled_step as _compiled
from .state import ChunkCache, ChunkStream, ScanCache, ScanState, StreamState, TreeCache, TreeState
from .strategy import strategy_for
from .varlen import Offsets, cu_seqlens_bounds, lengths

_HALVES = frozenset((torch.float16, torch.bfloat16))  # inputs computed in float32, outputs cast back
# the serving caches (fixed slots, each row at its own position) and the step that runs a token on each
_CACHES = {TreeCache: "_step_tree_cache", ChunkCache: "_step_chunk_cache"}

# (imported by name: a torch.compile'd step reads one global for it, not `torch` and two attributes)
_is_compiling = torch.compiler.is_compiling


@dataclass(frozen=True)
class Slot:
    """A declared value: a state field, an input or an output. `shape(dims)` gives the
    declared shape as ints."""

    name: str
    dtype: DType
    rank: int
    shape: Callable[[dict], tuple]
    dims: tuple = ()  # (axis, dim name) for axes that are a bare dim: bound from data

    def __post_init__(self):
        object.__setattr__(self, "dtype", DType.of(self.dtype))


@dataclass(frozen=True)
class ParamSpec:
    name: str
    dtype: DType
    shape: Callable[[dict], tuple]
    init: tuple
    dims: tuple = ()  # dim names the shape needs

    def __post_init__(self):
        object.__setattr__(self, "dtype", DType.of(self.dtype))


@dataclass(frozen=True)
class Spec:
    name: str
    dims: tuple
    chunk: Callable[[dict], int] | None
    fields: tuple
    lift_inputs: tuple
    readout_inputs: tuple  # readout inputs not already lift inputs
    readout_args: tuple  # names the readout body takes, in order
    outputs: tuple
    params: tuple
    scan: str  # 'exact' | 'tree'
    exclusive: bool
    has_identity: bool
    lift_index: bool
    readout_index: bool
    fast: str | None = None  # name of a runtime fast path for the parallel pass, if any
    # the fields a stream prefix keeps (psmc.plan's stream_fields; None: all of them). The others
    # are dead in a stream: they feed nothing the readout or the kept fields read once the
    # prefix is the left operand (psmc.analysis.liveness). `stream` and `dead` are the two
    # layouts of that one fact: see them.
    kept: tuple | None = None
    # True: a stream state holds the kept fields alone (the delta-rule fast path, whose states
    # hold S only); False: every field has a slot and the dead ones hold None
    compact: bool = False

    @property
    def inputs(self) -> tuple:
        return self.lift_inputs + self.readout_inputs

    @property
    def stream(self) -> tuple | None:
        """The compact layout: the names of the fields a stream state holds (the others are
        dropped and `_full_prefix` fills them back in), or None when every field has a slot."""
        return self.kept if self.compact and self.kept is not None else None

    @property
    def dead(self) -> tuple:
        """The slotted layout: the indices of the fields that hold None in a stream prefix
        (empty in the compact layout, where they have no slot)."""
        if self.compact or self.kept is None:
            return ()
        return tuple(i for i, f in enumerate(self.fields) if f.name not in self.kept)


@dataclass
class Ctx:
    """What a body needs besides its tensors: dims, device, and the dtype of each declared
    float type for this call (f32 computes in f64 when the inputs are f64, e.g. gradcheck)."""

    d: dict
    dev: torch.device
    dt: dict
    scan_kernel: str = "torch"  # the first-order fast path's scan: 'torch' or 'triton' (psmc.runtime.dispatch)


class PsmLayer(nn.Module):
    spec: Spec
    _decode = None  # (the default of a layer unpickled from before `step`'s decode lane existed)

    def __init__(self, backend: str = "auto", check_finite: bool | str | None = None, lanes: tuple | None = None,
                 per_lane=False, **dims):
        super().__init__()
        spec = self.spec
        if backend not in ("auto", "torch", "triton", "cpu"):
            raise ValueError(f"backend must be 'auto', 'torch', 'triton' or 'cpu', got {backend!r}")
        unknown = set(dims) - set(spec.dims)
        if unknown:
            raise TypeError(f"{spec.name}: unknown dim{'s' if len(unknown) > 1 else ''} "
                            f"{', '.join(sorted(unknown))}; the op's dims are: {', '.join(spec.dims) or 'none'}")
        for name, value in dims.items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{spec.name}: dim {name} must be a positive int, got {value!r}")
        self.dims = dict(dims)
        # how this op walks time and keeps its prefix (psmc/runtime/strategy.py): every
        # exact-vs-tree decision below, and the token-vs-chunk pass and step, goes through it
        self._strategy = strategy_for(spec)
        if lanes is not None:
            lanes = (lanes,) if isinstance(lanes, int) else tuple(lanes)
            if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in lanes):
                raise ValueError(f"{spec.name}: lanes must be a tuple of positive ints (e.g. lanes=(H,)), got {lanes!r}")
        self.lanes = lanes
        self.per_lane = _per_lane_names(spec, lanes, per_lane)
        self._step_cache: dict = {}
        self._decode = None  # the last C++ decode lane that served a token (see `step`)
        self.backend = backend
        self.check_finite = check_finite
        self.use_fast_path = True  # set False to force the generic scan (tests compare both)
        for p in spec.params:
            missing = [d for d in p.dims if d not in self.dims]
            if missing:
                raise TypeError(f"{spec.name}: param '{p.name}' needs dim{'s' if len(missing) > 1 else ''} "
                                f"{', '.join(missing)}; pass {', '.join(f'{m}=...' for m in missing)} to the constructor")
            shape = tuple(int(s) for s in p.shape(self.dims))
            if p.name in self.per_lane:  # one slice per lane, each initialised as the declared param
                slices = [_init(shape, p.init, DTYPES[p.dtype]) for _ in range(math.prod(lanes))]
                value = torch.stack(slices).reshape(lanes + shape) if slices else None
            else:
                value = _init(shape, p.init, DTYPES[p.dtype])
            self.register_parameter("p_" + p.name, nn.Parameter(value))
        self._check_backend_available()

    def _apply(self, fn, *args, **kwargs):
        """.to() / .double() / .cuda(): a cached step signature fixed the params' dtype and
        device into its compute dtype, so the cache starts over."""
        self._step_cache = {}
        self._decode = None
        return super()._apply(fn, *args, **kwargs)

    def __getstate__(self):
        state = super().__getstate__()
        state = dict(state)
        state["_step_cache"] = {}  # bound steps are closures: rebuilt on the next token
        state["_decode"] = None
        return state

    # ------------------------------------------------------------------ public API
    def forward(self, *args, state=None, return_state: bool = False, cu_seqlens=None, initial_state=None,
                output_final_state=None, cp_group=None, **inputs):
        """The parallel pass over `[B, T, *lanes, ...]` inputs (see the module docstring).

        cu_seqlens: fla's varlen convention: inputs `[1, total_T, ...]` hold N packed sequences
            with offsets `cu_seqlens` (int32/int64, `[N + 1]`, from 0 to total_T); each is
            scanned on its own and the state (return_state=True) has batch N.
        cp_group: a torch.distributed process group; every rank passes its own contiguous
            slice of the sequence (docs/context_parallel.md). With cu_seqlens, its slice
            `[1, T_r, ...]` of the packed sequence and the global cu_seqlens.
        initial_state / output_final_state: fla-style aliases of `state` / `return_state`; for
            an exact scan the state may be given and is returned as plain tensors (a tensor
            when the op's state has one field, else a tuple of one tensor per field).
        """
        spec = self.spec
        if type(state) in _CACHES:  # a prefill onto a serving cache: its rows, then a cache again
            return self._forward_cache(args, inputs, state, return_state, cu_seqlens, cp_group)
        if cp_group is not None:
            if initial_state is not None or output_final_state is not None:
                raise ValueError(f"{spec.name}: cp_group= does not combine with initial_state= or "
                                 "output_final_state= yet; pass state= and return_state=")
            from . import context_parallel
            return context_parallel.forward(self, args, inputs, state, return_state, cp_group, cu_seqlens)
        fla = output_final_state is not None
        if initial_state is not None:
            if state is not None:
                raise TypeError(f"{spec.name}: pass either state= or initial_state=, not both")
            state = self._import_state(initial_state)
        state = self._live_slots(state)
        return_state = bool(return_state or output_final_state)
        inputs = self._bind_positional(args, inputs)
        with _no_autocast(inputs):
            if cu_seqlens is not None:
                result, new_state = self._forward_varlen(inputs, cu_seqlens, state)
            elif isinstance(state, RaggedState):
                result, new_state = self._forward_ragged(inputs, state)
            else:
                result, new_state = self._forward_one(inputs, state, return_state)
        if fla:
            return result, (self._export_state(new_state) if output_final_state else None)
        return (result, new_state) if return_state else result

    def _forward_cache(self, args, inputs: dict, cache, return_state: bool, cu_seqlens, cp_group):
        """`forward` continuing a `TreeCache` or `ChunkCache`: its rows as stream states (a host
        read of the counts), the pass, and the rows' new states in a cache of the same capacity."""
        self._check_cache(cache)
        rows = None if cache.is_empty else cache.to_state()
        out, state = self.forward(*args, state=rows, return_state=True, cu_seqlens=cu_seqlens, cp_group=cp_group,
                                  **inputs)
        return (out, type(cache).of(state, cache.capacity)) if return_state else out

    def _cache_class(self):
        """The serving cache of this op's stream (`init_state(capacity=...)`), or None: a
        `TreeCache` for a token tree scan (its slots are a binary counter's levels), a
        `ChunkCache` for a chunk op (the per-row form of its scan's state over chunks, plus a
        partial chunk per row). An exact scan's token state has fixed slots already."""
        if self._strategy.chunked:
            return ChunkCache
        return TreeCache if self._strategy.state_class is TreeState else None

    def _check_cache(self, cache) -> None:
        mine = self._cache_class()
        inner = self._strategy.scan.cache_class  # (a ChunkCache's inner state: the scan's per-row form)
        if mine is type(cache) and (mine is not ChunkCache or type(cache.inner) is inner):
            return
        holds, what = _cache_holds(cache), self._op_kind()
        if mine is None:
            raise TypeError(f"{self.spec.name}: a {type(cache).__name__} holds {holds}, but this op's state is "
                            f"{_a(self._strategy.noun)}: use init_state() without capacity=")
        if mine is type(cache):  # a ChunkCache of the other scan kind
            raise TypeError(f"{self.spec.name}: this ChunkCache holds {holds}, but this op is {what}: use the "
                            "ChunkCache this layer makes (layer.init_state(batch, capacity=N))")
        raise TypeError(f"{self.spec.name}: a {type(cache).__name__} holds {holds}, but this op is {what}: use a "
                        f"{mine.__name__} (init_state(batch, capacity=N))")

    def _op_kind(self) -> str:
        """What this op is, in the cache errors of an op that has a cache."""
        if not self._strategy.chunked:
            return "a token tree scan"  # (a token exact scan has no cache)
        return "a chunk op on the tree" if self._strategy.state_class is TreeState else "a chunk op on an exact scan"

    def _forward_one(self, inputs: dict, state, return_state: bool):
        call = self._prepare_forward(inputs)
        if state is not None:
            self._check_state(state, call)
        return self._forward_local(call, state, return_state)

    def _remember(self, key, entry) -> None:
        """One per-signature entry of forward or step (a bounded cache: past 16 it starts over)."""
        if len(self._step_cache) > 16:
            self._step_cache.clear()
        self._step_cache[key] = entry

    def _prepare_forward(self, inputs: dict) -> "_Call":
        """`_prepare(inputs, step=False)` once per input signature (names, shapes, dtypes,
        devices, and the params' dtypes and devices): a later forward with the same signature
        only repeats the reshapes, casts and expands the first one did (~25 us of checks less
        per call at the delta rule's benchmark size)."""
        if _compiling():
            return self._prepare(inputs, step=False)
        try:
            key = ("forward", self.backend, *[(n, x.shape, x.dtype, x.device) for n, x in inputs.items()],
                   *[(p.dtype, p.device) for p in self._parameters.values() if p is not None])
            hit = self._step_cache.get(key)
        except AttributeError:  # not tensors: the full check says so
            return self._prepare(inputs, step=False)
        if hit is None:
            call = self._prepare(inputs, step=False)
            plan = []  # per input: the shape after the lane padding, the dtype, the shape after the expand
            for name, x in inputs.items():
                shape, dtype = call.inputs.described(name)
                lead_axes = 2
                padded = tuple(x.shape)
                if len(shape) != x.dim():
                    padded = padded[:lead_axes] + (1,) * (len(shape) - x.dim()) + padded[lead_axes:]
                plan.append((name, padded, dtype, shape))
            # (the template keeps no input tensor alive)
            self._remember(key, (_Call(call.ctx, {}, call.lead, False, call.tag, call.out_dtype), tuple(plan)))
            return call
        template, plan = hit
        aligned, raw = _Inputs(), {}
        for name, padded, dtype, shape in plan:
            x = inputs[name]
            if x.shape != padded:
                x = x.reshape(padded)
            if x.dtype in _HALVES:
                raw[name] = x
            aligned.put(name, x, dtype, shape)
        ctx = template.ctx
        return _Call(Ctx(ctx.d, ctx.dev, ctx.dt), aligned, template.lead, False, template.tag, template.out_dtype,
                     half=None if template.out_dtype is None else raw)

    def _forward_local(self, call, state, return_state: bool):
        outputs, new_state = self._strategy.forward(self, call, state, return_state)
        self._check_outputs(outputs, call)
        outputs = _in_dtype(outputs, call)
        if new_state is not None and return_state:  # (untagged when nobody receives it)
            new_state = _tagged(new_state, call.tag)
        result = outputs[0] if len(outputs) == 1 else outputs
        return result, new_state

    def step(self, state, *args, **inputs):
        """One token: inputs `[B, *lanes, *declared]`; returns (outputs, new state).

        The checks of `forward` run on the first token of a stream and whenever the inputs'
        shapes, dtypes or devices change, and choose what runs the token; later tokens look both
        up by the input signature (no host sync: the NaN check of `check_finite` is forward-only
        here unless check_finite='always') and, when nothing needs a cast, run the step bound to
        that signature directly (the decode lane)."""
        if args:
            inputs = self._bind_positional(args, inputs)
        if _is_compiling():
            traced = self._traced_step(state, inputs)
            if traced is not None:
                return traced
        elif type(state) is ScanState or type(state) is TreeState:
            # the C++ decode lane that served the last token checks the inputs' signature itself
            # (names, shapes, dtypes, CPU) as it reads their addresses: no key to build
            last = self._decode
            if last is not None and state.op == last[0] and last[1] == self.backend and \
                    last[2] == self.use_fast_path and not torch.is_autocast_enabled("cpu"):
                done = last[3](inputs, state, True)
                if done is not None:
                    outputs, state = done
                    return (outputs[0] if len(outputs) == 1 else outputs), state
            # the decode lane: a validated input signature, a state this op made (so it has the
            # stream layout), no casts, no autocast: one dict lookup, then the bound update
            try:
                hit = self._step_cache.get((self.backend, self.use_fast_path,
                                            *[(n, x.shape, x.dtype, x.device) for n, x in inputs.items()]))
            except AttributeError:  # not tensors: the full check below says so
                hit = None
            if hit is not None and hit[3] is not None and state.op == hit[0].tag and \
                    not torch.is_autocast_enabled(hit[4]):
                lane = hit[3]
                if getattr(lane, "strict", False) and (last is None or last[3] is not lane):
                    self._decode = (hit[0].tag, self.backend, self.use_fast_path, lane)
                outputs, state = lane(inputs, state)
                if state.op != hit[0].tag:
                    state = _tagged(state, hit[0].tag)
                return (outputs[0] if len(outputs) == 1 else outputs), state
        if state is None:
            raise ValueError(f"{self.spec.name}.step needs a state: use layer.init_state() or forward(..., "
                             "return_state=True)")
        if isinstance(state, RaggedState):
            return self._step_ragged(state, inputs)
        if self.spec.dead:
            state = self._live_slots(state)
        with _no_autocast(inputs):
            call, run = self._prepare_step(inputs, state)
            if type(state) in _CACHES:
                run = getattr(self, _CACHES[type(state)])
            outputs, state = run(call, state)
            if self.check_finite == "always":
                self._check_outputs(outputs, call)
            if call.out_dtype is not None:
                outputs = _in_dtype(outputs, call)
        if state.op != call.tag:
            state = _tagged(state, call.tag)
        return (outputs[0] if len(outputs) == 1 else outputs), state

    def _traced_step(self, state, inputs: dict):
        """`step` as torch.compile traces it (None: the fully traced step serves the call): the
        checks run at trace time as a constant of the graph (psmc/runtime/compiled_step.py), from
        literals that Dynamo guards cheaply, so the guards left are about those of the update."""
        if not isinstance(state, StreamState) or type(state) is RaggedState:
            return None  # a missing or ragged state: the full step says what to do
        sig = []
        for name, x in inputs.items():
            if not isinstance(x, Tensor):
                return None  # (the full check names it)
            shape = tuple(x.shape)
            if not all(n.__class__ is int for n in shape):  # (Dynamo answers type(n) with int for a SymInt)
                return None  # sizes Dynamo made symbolic: no literal signature
            sig.append((name, shape, x.dtype, x.device))
        params = tuple((n, p.dtype, p.device) for n, p in self._parameters.items() if p is not None)
        config = (tuple(self.dims.items()), self.lanes, self.per_lane, self.backend, self.use_fast_path,
                  self.check_finite, params)
        checked = _compiled.signature(type(self), config, tuple(sig))
        if checked is None:
            return None  # wrong inputs: the full check raises eager `step`'s error
        (d, dev, dt, kernel), lead, tag, out_dtype, plan, runner = checked
        if plan:
            inputs = dict(inputs)
            for n, shape, dtype in plan:
                inputs[n] = inputs[n].to(dtype).reshape(shape)
        call = _Call(Ctx({k: v for k, v in d}, dev, {k: v for k, v in dt}, kernel), inputs, lead, True, tag, out_dtype)
        if state.op != tag:  # untagged (init_state, from_tensors) or another op's: the full state check
            self._check_state(state, call)
            if self.spec.dead:
                state = self._live_slots(state)  # (a state this op made has the stream layout)
        run = self._step_runner(call) if runner is None else getattr(self, runner)
        if type(state) in _CACHES:
            run = getattr(self, _CACHES[type(state)])
        outputs, state = run(call, state)
        if out_dtype is not None:
            outputs = _in_dtype(outputs, call)
        if state.op != tag:
            state = _tagged(state, tag)
        return (outputs[0] if len(outputs) == 1 else outputs), state

    def step_function(self, *args, **example):
        """A functional decode step over plain tensors, bound to one example token's signature:
        `fn = layer.step_function(**token)` (or the inputs positionally, in the op's declared
        order) returns `fn(state_tensors, *inputs) -> (outputs, new_state_tensors)`, what serving
        engines compile (fla- and vLLM-style: no state object, no keyword inputs).

        `state_tensors` is the tuple `state.tensors()` gives and `ScanState.from_tensors` takes
        (the live fields, `[B, *lanes, *field]`), or `()` before the first token; `inputs` are
        `[B, *lanes, *declared]`, positional. Every check of `step` runs here, once; `fn` runs
        the update `step` runs for this signature (equal to `step` bit for bit in eager) after a
        cheap check that the inputs and state tensors have the example's shapes, dtypes and
        devices (else a ValueError naming the input). Under torch.compile the check runs when
        the call is traced, from literals Dynamo already guards: a call of another signature
        retraces and fails with the same message.

        Exact scans only, and only those whose bodies do not read the token's position: the
        state is then its prefix alone and no token count is carried. A tree scan (a binary
        counter), a chunk op (a partial chunk) and an op that reads `index` need the count:
        for them use `layer.step(state, ...)`; this refuses them and says so. Build it again
        after moving the layer or changing its dtype (`.to`, `.double`): it is bound to the
        compute dtype and device of the layer it was built from."""
        spec = self.spec
        what = None
        if self._strategy.chunked:
            what = "a chunk op: its state holds the partial chunk's tokens and their count"
        elif not self._strategy.plain_tensors:
            what = f"a {self._strategy.noun}: its state is a binary counter whose shape follows the token count"
        elif spec.lift_index or spec.readout_index:
            what = "an op that reads the token's position (index): its update needs the token count"
        if what is not None:
            serve = (f" (to serve it, `layer.init_state(batch, capacity=N)` makes a {self._cache_class().__name__}: "
                     "fixed-shape slots, "
                     "each row at its own count, one compiled `step` graph at every position)"
                     if self._cache_class() else "")
            raise TypeError(f"{spec.name}.step_function takes exact scans whose state is plain tensors; this is {what}. "
                            f"Use layer.step(state, ...), which carries the count in its state{serve}")
        if _is_compiling():
            raise RuntimeError(f"{spec.name}.step_function builds a step eagerly, once per stream signature: build it "
                               "outside torch.compile, then compile the function it returns")
        inputs = self._bind_positional(args, dict(example))
        call = self._prepare(inputs, step=True)  # every check of `step`, once
        names = tuple(s.name for s in spec.inputs)
        plan = tuple((n, call.inputs[n].shape, call.inputs[n].dtype) for n, x in inputs.items()
                     if x.dtype != call.inputs[n].dtype or x.shape != call.inputs[n].shape)
        run = self._step_runner(call)
        eager_lane = self._lane(call, run)  # what eager `step` runs for this signature
        ctx, lead, tag = call.ctx, call.lead, call.tag
        if getattr(self, "_bind_step", None) is not None and spec.fast and self.use_fast_path and \
                self.backend in ("auto", "torch") and ctx.dev.type == "cpu":
            traced_lane = self._bind_step(call, True)  # what a compiled `step` runs (`_step_runner`)
            bound = True
        else:
            bound = False

            def traced_lane(inputs, state):  # the runner a compiled `step` chooses, asked when traced
                return self._step_runner(call)(_Call(ctx, inputs, lead, True, tag), state)
        live = [f for i, f in enumerate(spec.fields)
                if i not in spec.dead and (spec.stream is None or f.name in spec.stream)]
        # the dead fields' slots (None) in a slotted layout; None: the tensors are the prefix as is
        slots = None if spec.stream is not None or not spec.dead else tuple(
            None if i in spec.dead else sum(1 for j in range(i) if j not in spec.dead) for i in range(len(spec.fields)))
        finite = self.check_finite == "always"  # (as `step`: a NaN check of every token is opt-in)
        expect = _compiled.StepSignature(
            op=spec.name, names=names,
            inputs=tuple((tuple(inputs[n].shape), inputs[n].dtype, inputs[n].device) for n in names),
            state=tuple((f.name, lead + tuple(int(s) for s in f.shape(ctx.d)), ctx.dt[f.dtype], ctx.dev) for f in live),
            constants=(names, tuple((n, tuple(shape), dtype) for n, shape, dtype in plan), slots, finite,
                       call.out_dtype))
        key = _compiled.register(expect)
        device_type = ctx.dev.type
        sizes = [(x.shape, x.dtype, x.device) for x in (inputs[n] for n in names)]
        state_sizes = [(torch.Size(shape), dtype, dev) for _, shape, dtype, dev in expect.state]
        n_inputs, n_state = len(sizes), len(state_sizes)

        def update(state_tensors, xs, lane, constants):
            names, plan, slots, finite, out_dtype = constants
            inputs = {n: x for n, x in zip(names, xs)}
            for n, shape, dtype in plan:  # (most signatures need no cast or reshape)
                x = inputs[n]
                inputs[n] = (x if x.dtype == dtype else x.to(dtype)).reshape(shape)
            prefix = None
            if state_tensors:
                prefix = tuple(state_tensors) if slots is None else \
                    tuple(None if j is None else state_tensors[j] for j in slots)
            # the count: no body reads the position, so `count + 1` is all an update does with it
            outputs, state = lane(inputs, ScanState.make(prefix, 0, tag))
            if finite:  # (a NaN that came in is not the op's doing: the check looks at these inputs)
                self._check_outputs(outputs, _Call(ctx, inputs, lead, True, tag))
            if out_dtype is not None:
                outputs = _in_dtype(outputs, call)
            return (outputs[0] if len(outputs) == 1 else outputs), state.tensors()

        def eager(state_tensors, xs):
            ok = len(xs) == n_inputs and (not state_tensors or len(state_tensors) == n_state)
            if ok:
                for x, (shape, dtype, dev) in zip(xs, sizes):
                    if x.__class__ is not Tensor and not isinstance(x, Tensor) or x.shape != shape or \
                            x.dtype != dtype or x.device != dev:
                        ok = False
                        break
                for t, (shape, dtype, dev) in zip(state_tensors, state_sizes):
                    if t.__class__ is not Tensor and not isinstance(t, Tensor) or t.shape != shape or \
                            t.dtype != dtype or t.device != dev:
                        ok = False
                        break
            if not ok:
                raise _compiled.mismatch_error(expect, _describe(state_tensors), _describe(xs))
            if torch.is_autocast_enabled(device_type):
                with torch.autocast(device_type, enabled=False):
                    return update(state_tensors, xs, eager_lane, expect.constants)
            return update(state_tensors, xs, eager_lane, expect.constants)

        doc = (f"One token of {tag}: ({', '.join(f.name for f in live)}) state tensors and the inputs "
               f"({', '.join(names)}) -> (outputs, new state tensors); see PsmLayer.step_function.")
        update_lines = getattr(type(self), "_STEP_UPDATE", None)
        if bound and update_lines is not None and not plan and not finite and call.out_dtype is None and \
                spec.stream is None:
            # the traced form as source, its constants literals (no closure cell; no global but
            # torch and three helpers): compiled, it costs the guards of its tensors and a few more
            # (compiled_step.literal_source; other forms: the closure below)
            element = type(self)._STEP_ELEMENT
            live_at = [i for i in range(len(spec.fields)) if i not in spec.dead]
            at = slots if slots is not None else range(len(live))  # each prefix slot's state tensor (None: dead)
            carry = "(" + ", ".join("None" if j is None else f"state_tensors[{j}]" for j in at) + ",)"
            result = "(" + ", ".join(element[i] for i in live_at) + ",)"
            if "None" not in (element[i] for i in live_at):
                def mismatch(state_tensors, xs):
                    raise _compiled.mismatch_error(expect, _describe(state_tensors), _describe(xs))

                name = f"{spec.name}_step"
                source = _compiled.literal_source(name, expect, update_lines, traced_lane,
                                                  f"{carry} if state_tensors else None", result)
                if source is not None:
                    fn = _compiled.literal_function(source, name, eager, mismatch)
                    fn.__doc__ = doc
                    return fn

        def step_fn(state_tensors, *inputs):
            if not _is_compiling():
                return eager(state_tensors, inputs)
            # traced: checked from literals the tensors' own guards pin; the constants (or the
            # error) are a graph constant of the key alone, one guard
            got_state, got = _describe(state_tensors), _describe(inputs)
            if all(d.__class__ is str or all(n.__class__ is int for n in d[0]) for d in got_state + got):
                error, constants = _compiled.step_constants(key, got_state, got)
            else:  # sizes Dynamo made symbolic (a call of another shape retraced): the check traced
                mismatch = _compiled.mismatch_error(expect, got_state, got, strict=False)
                if mismatch is not None:
                    raise mismatch
                error, constants = None, expect.constants
            if error is not None:
                raise ValueError(error)
            return update(state_tensors, inputs, traced_lane, constants)

        step_fn.__name__ = step_fn.__qualname__ = f"{spec.name}_step"
        step_fn.__doc__ = doc
        return step_fn

    def init_state(self, batch_shape=(), device=None, dtype=None, capacity: int | None = None):
        """An empty stream state. For chunk ops the partial-chunk buffer is created on the
        first `step` (its shape follows the inputs).

        capacity: a serving cache instead of a stream state, for a token op on the paper's tree
        and for every chunk op: fixed-shape slots for at least `capacity` tokens per row
        (`cache.capacity` says how many), `batch_shape` rows (an int; () takes the first token's
        batch), each row at its own position, one compiled graph at every position: a
        `TreeCache` for a token op, a `ChunkCache` for a chunk op (over a tree counter or an
        exact scan's per-row prefix; either checks the capacity) (psmc/runtime/state.py,
        docs/layers.md)."""
        if capacity is None:
            return self._strategy.empty(device)
        cache = self._cache_class()
        if cache is None:
            raise TypeError(f"{self.spec.name}: capacity= makes a serving cache for chunk ops and for token ops on the "
                            f"tree, whose state grows with the tokens; this op's state is {_a(self._strategy.noun)}, "
                            "whose slots do not: call init_state() without capacity=")
        shape = (batch_shape,) if isinstance(batch_shape, int) else tuple(batch_shape)
        if len(shape) > 1:
            raise ValueError(f"{self.spec.name}: a serving cache has one batch axis, got batch_shape={batch_shape!r}")
        batch = shape[0] if shape else None
        if cache is ChunkCache:
            return ChunkCache.empty(capacity, int(self.spec.chunk(self.dims)), batch=batch, device=device,
                                    inner=self._strategy.scan.cache_class)
        return TreeCache.empty(capacity, batch=batch, device=device)

    def extra_repr(self) -> str:
        dims = ", ".join(f"{k}={v}" for k, v in self.dims.items())
        lanes = f", lanes={self.lanes}" if self.lanes is not None else ""
        per_lane = f", per_lane={self.per_lane}" if self.per_lane else ""
        return f"{dims}{', ' if dims else ''}scan={self.spec.scan}, backend={self.backend!r}{lanes}{per_lane}"

    # ------------------------------------------------------------------ varlen and ragged batches
    def _forward_varlen(self, inputs: dict, cu_seqlens, state):
        """Each packed sequence on its own (its own scan, its own tree): exactly the outputs and
        state of running it alone; outputs are packed back as `[1, total_T, ...]`. Ops whose
        fast path takes packed sequences (the chunk kernels) run them all in one call."""
        spec = self.spec
        bounds = _check_cu_seqlens(spec.name, cu_seqlens, inputs)
        n = len(bounds) - 1
        if state is not None and _batch_rows(state) not in (0, n):
            raise ValueError(f"{spec.name}: cu_seqlens holds {n} sequences but the state has "
                             f"{_batch_rows(state)} batch rows; pass one row per sequence")
        if state is not None and _batch_rows(state) == 0:
            state = None
        packed = self._forward_packed(inputs, cu_seqlens, bounds, state)
        if packed is not None:
            return packed
        # otherwise sequences of one length (and, continuing, of one count unless the op is
        # count-free) run together as the rows of one batch: each row is what the sequence
        # gives alone (a tree scan's tree depends on the length only)
        rows = [None] * n if state is None else [state[i] for i in range(n)]
        rows = [r.row_states[0] if isinstance(r, RaggedState) else r for r in rows]
        groups: dict = {}
        free = self._count_free()  # (then rows of one length run together whatever their counts)
        for i in range(n):
            key = (bounds[i + 1] - bounds[i], None if rows[i] is None or free else _counts(rows[i]))
            groups.setdefault(key, []).append(i)
        outs, states = [None] * n, [None] * n
        for idx in groups.values():
            piece = {name: (x if x.shape[1] == 1 else
                            torch.cat([x[:, bounds[i]:bounds[i + 1]] for i in idx], dim=0) if len(idx) > 1 else
                            x[:, bounds[idx[0]]:bounds[idx[0] + 1]])
                     for name, x in inputs.items()}
            group = [rows[i] for i in idx]
            start = None if state is None else (group[0] if len(idx) == 1 else
                                                at_one_count(group)[0] if free else cat_states(group))
            out, new_state = self._forward_one(piece, start, True)
            out = out if isinstance(out, tuple) else (out,)
            length = bounds[idx[0] + 1] - bounds[idx[0]]
            for j, i in enumerate(idx):
                outs[i] = tuple(o[j:j + 1] if o.shape[0] == len(idx) else o for o in out)
                states[i] = new_state if len(idx) == 1 else new_state[j]
                if free and rows[i] is not None:  # (the group ran at its first row's count)
                    states[i] = dataclasses.replace(states[i], count=int(rows[i].count) + length)
        packed = tuple(torch.cat(parts, dim=1) for parts in zip(*outs))
        return (packed[0] if len(packed) == 1 else packed), self._packed_state(states)

    def _packed_state(self, rows: list):
        """The state of packed sequences (one row each): for a count-free op one batch state with
        each row's count beside it (RaggedState's compact form), else `cat_states` (rows of one
        count merge, the others stay one-row states)."""
        if self._count_free() and all(type(r) is ScanState for r in rows):
            return one_count(*at_one_count(rows))
        return cat_states(rows)

    def _forward_packed(self, inputs: dict, cu_seqlens, bounds: list, state):
        """All packed sequences in one pass that takes `call.cu_seqlens`, when that pass is what
        would run them one by one: a kernel path marked `packs` (the generated Triton kernels,
        the C++ kernels, the first-order scan kernel), or the op's own `_fast_forward` where it
        takes them (`_packs_sequences`, printed for the chunk and first-order fast paths). None
        otherwise (and when a NaN needs the causal rerun, which the loop over sequences does)."""
        trees = self._has_tree_kernels()
        if not self._strategy.token_kernels and not getattr(self, "_packs_sequences", False) and not trees:
            return None
        starts = None  # each row's count, when they differ
        if isinstance(state, RaggedState) and self._count_free():
            state, starts = self._as_one_batch(state)
        if state is not None and type(state) is not self._strategy.state_class:  # ragged rows: by length and count
            return None
        call = self._prepare_forward(inputs)
        if state is not None:
            self._check_state(state, call)
        run = self._token_route(call)
        if run is not None and not getattr(run, "packs", False):
            return None
        if len(bounds) - 1 > getattr(run, "most_sequences", math.inf):  # (a kernel's grid axis)
            return None
        if run is None and not (getattr(self, "_packs_sequences", False) and self.use_fast_path and self.spec.fast):
            return None
        call = dataclasses.replace(call, cu_seqlens=Offsets(cu_seqlens, tuple(bounds)))  # read once
        if run is not None:
            outputs, new_state = run(self, call, state)
        else:
            outputs, new_state = self._fast_forward(call, self._token_positions(call, state), state)
        if self._needs_causal_rerun(outputs, call):
            return None
        self._check_outputs(outputs, call)
        outputs = _in_dtype(outputs, call)
        starts = starts or [0 if state is None else state.size] * (len(bounds) - 1)
        counts = [seen + b - a for seen, a, b in zip(starts, bounds, bounds[1:])]  # each row's count after
        outputs = outputs[0] if len(outputs) == 1 else outputs
        if self._count_free():  # one batch state, each row's count beside it (RaggedState's compact form)
            return outputs, one_count(_tagged(new_state, call.tag), counts)
        if isinstance(new_state, list):  # the tree kernels: one counter per sequence, its count set
            return outputs, cat_states([_tagged(row, call.tag) for row in new_state])
        rows = [_tagged(dataclasses.replace(new_state[i], count=count), call.tag) for i, count in enumerate(counts)]
        return outputs, cat_states(rows)

    def _has_tree_kernels(self) -> bool:
        """Tree kernels (Triton or C++): they take packed sequences, one tree per sequence."""
        return getattr(self, "_tree_kernels", None) is not None or getattr(self, "_cpu_tree_kernels", None) is not None

    def _forward_ragged(self, inputs: dict, state: RaggedState):
        """Continue a ragged batch: rows with equal counts run together, each as it would alone."""
        return self._by_groups(state, inputs, lambda x, s: self._forward_one(x, s, True), time=True)

    def _step_ragged(self, state: RaggedState, inputs: dict):
        return self._by_groups(state, inputs, self.step, time=False)

    def _count_free(self) -> bool:
        """Whether a row's count (the tokens it has seen) changes nothing but the count itself:
        an exact scan (no tree, whose brackets follow the count; no chunk, whose fill does) whose
        bodies never read `index`. Then rows that have seen different numbers of tokens run as
        one batch, each keeping its own count."""
        spec = self.spec
        return (self._strategy.state_class is ScanState and not self._strategy.chunked
                and not (spec.lift_index or spec.readout_index))

    def _as_one_batch(self, state: RaggedState):
        """A count-free op's ragged rows as one batch state (the first row's count stands for
        all; the caller sets each row's own count again) and the rows' counts."""
        if state.batch is not None:  # (the compact form: already one batch)
            return state.batch, list(state.counts)
        return at_one_count(state.rows)

    def _by_groups(self, state: RaggedState, inputs: dict, run, time: bool):
        B = state.batch_size
        for name, x in inputs.items():
            if isinstance(x, Tensor) and x.dim() and x.shape[0] not in (1, B):
                raise ValueError(f"{self.spec.name}: input '{name}' has batch {x.shape[0]} but the state has {B} rows")
        # a count-free op runs every row in one call, each row keeping its own count; the new
        # state stays one batch (RaggedState's compact form), so decoding it token by token
        # never splits and merges the rows again
        if self._count_free():
            merged, counts = self._as_one_batch(state)
            out, new_state = run(inputs, merged) if time else run(merged, **inputs)
            # (a step is one token: no host read of the counts, which on a GPU is a sync per token)
            steps = int(new_state.count) - int(merged.count) if time else 1
            return out, one_count(new_state, [c + steps for c in counts])
        results, rows, order = [], [None] * B, []
        for idx, group in state.groups():
            index = torch.tensor(idx, dtype=torch.int64)
            part = {n: (x if x.shape[0] == 1 else x.index_select(0, index.to(x.device))) for n, x in inputs.items()}
            if time:
                out, new_state = run(part, group)
            else:
                out, new_state = run(group, **part)
            results.append(out if isinstance(out, tuple) else (out,))
            for j, i in enumerate(idx):
                rows[i] = new_state[j] if len(idx) > 1 else new_state
            order.extend(idx)
        inverse = torch.empty(B, dtype=torch.int64)
        inverse[torch.tensor(order)] = torch.arange(B)
        outputs = tuple(torch.cat(parts, dim=0).index_select(0, inverse.to(parts[0].device)) for parts in zip(*results))
        return (outputs[0] if len(outputs) == 1 else outputs), cat_states(rows)

    # ------------------------------------------------------------------ plain-tensor states (fla style)
    def _import_state(self, initial_state):
        if type(initial_state) in _CACHES:
            raise TypeError(f"{self.spec.name}: a {type(initial_state).__name__} continues as state=cache (forward(..., state=cache, "
                            "return_state=True) gives a cache back), not as initial_state=")
        if isinstance(initial_state, StreamState):
            return initial_state
        if not self._strategy.plain_tensors:
            raise TypeError(f"{self.spec.name}: initial_state as plain tensors needs an exact-scan token op; this op's "
                            f"state is a {self._strategy.noun}: pass the state "
                            "object from return_state=True (or TreeState.from_tensors(...))")
        tensors = (initial_state,) if isinstance(initial_state, Tensor) else tuple(initial_state)
        names = self._live_names()
        if len(tensors) != len(names) or not all(isinstance(t, Tensor) for t in tensors):
            dead = [f.name for f in self.spec.fields if f.name not in names]
            raise TypeError(f"{self.spec.name}: initial_state must be {len(names)} tensor{'s' if len(names) > 1 else ''} "
                            f"(the live fields {', '.join(names)}"
                            + (f"; {', '.join(dead)} {'is' if len(dead) == 1 else 'are'} dead in a stream and left out"
                               if dead else "") + f"), got {len(tensors)}")
        return self._live_slots(ScanState.from_tensors(tensors))

    def _live_names(self) -> list:
        """The fields a stream state holds (plain-tensor states: tensors(), initial_state)."""
        spec = self.spec
        if spec.stream is not None:
            return list(spec.stream)
        return [f.name for i, f in enumerate(spec.fields) if i not in spec.dead]

    def _live_slots(self, state):
        """A scan state built from the live fields only (ScanState.from_tensors, initial_state)
        gets None in the dead fields' slots, the layout every stream prefix has."""
        dead = self.spec.dead
        if (not dead or not isinstance(state, ScanState) or state.prefix is None
                or len(state.prefix) != len(self.spec.fields) - len(dead)):
            return state
        live = iter(state.prefix)
        prefix = tuple(None if i in dead else next(live) for i in range(len(self.spec.fields)))
        return dataclasses.replace(state, prefix=prefix)

    def _export_state(self, state):
        if isinstance(state, ScanState):
            tensors = state.tensors()
            return tensors[0] if len(tensors) == 1 else tensors
        return state

    # ------------------------------------------------------------------ validation
    def _check_backend_available(self):
        if self.backend == "triton" and not getattr(self, "_triton_kernels", None) and \
                not getattr(self, "_tree_kernels", None):
            raise ValueError(f"{self.spec.name}: backend='triton' is not available for this op: its plan has "
                             "no Triton kernels (see `psmc check`); use backend='torch' or 'auto'")
        if self.backend == "cpu" and getattr(self, "_cpu_kernels", None) is None and \
                getattr(self, "_cpu_tree_kernels", None) is None:
            raise ValueError(f"{self.spec.name}: backend='cpu' is not available for this op: its plan has no C++ "
                             "kernels (see `psmc check`); use backend='torch' or 'auto'")

    def _bind_positional(self, args, inputs) -> dict:
        names = [s.name for s in self.spec.inputs]
        if len(args) > len(names):
            raise TypeError(f"{self.spec.name} takes {len(names)} inputs ({', '.join(names)}), got {len(args)} "
                            "positional")
        for name, value in zip(names, args):
            if name in inputs:
                raise TypeError(f"{self.spec.name}: input '{name}' given twice")
            inputs[name] = value
        return inputs

    def _check_state(self, state, call):
        """The state must come from this op with these dims and lanes (or be untagged: from
        init_state or from_tensors, whose shapes are then checked)."""
        spec = self.spec
        want = self._strategy.state_class  # (flags read inline: fewer guards in a compiled step)
        inner = state.inner if isinstance(state, ChunkStream) else state
        if type(state) in _CACHES:
            self._check_cache(state)
            if state.op and state.op != call.tag:
                self._state_mismatch(state.op, call)
            return
        if not isinstance(inner, want) or (isinstance(state, ChunkStream) and not self._strategy.chunked):
            raise TypeError(f"{call.tag}: expected a {want.__name__} (from init_state or return_state=True), "
                            f"got {type(state).__name__}{' of ' + state.op if getattr(state, 'op', '') else ''}")
        if state.op:
            if state.op != call.tag:
                self._state_mismatch(state.op, call)
            return
        if isinstance(inner, ScanState) and inner.prefix is not None:
            fields = spec.fields
            if spec.stream is not None and len(inner.prefix) == len(spec.stream):  # the compact stream layout
                fields = [f for f in spec.fields if f.name in spec.stream]
            shapes = [tuple(int(s) for s in f.shape(call.ctx.d)) for f in fields]
            got = [None if t is None else tuple(t.shape) for t in inner.prefix]
            lead_rank = len(call.lead) - (0 if call.step else 1)
            ok = len(got) == len(shapes) and all(
                (i in spec.dead) if g is None else (len(g) == lead_rank + len(w) and g[lead_rank:] == w)
                for i, (g, w) in enumerate(zip(got, shapes)))
            if not ok:
                fields = ", ".join(f"{f.name}: {list(w)}" for f, w in zip(fields, shapes))
                raise ValueError(f"{call.tag}: the state does not fit this layer: its prefix holds {len(got)} "
                                 f"tensor{'s' if len(got) != 1 else ''} of shapes {[g and list(g) for g in got]}, but "
                                 f"{call.tag} takes [B, *lanes, ...] tensors for the fields {fields}")

    def _state_mismatch(self, made_by: str, call):
        name, _, lanes = made_by.partition(" lanes=")
        mine, _, my_lanes = call.tag.partition(" lanes=")
        if name == mine and lanes != my_lanes:
            theirs, ours = ast.literal_eval(lanes or "()"), ast.literal_eval(my_lanes or "()")
            if len(ours) == len(theirs) + 1:
                what = "step takes one token, [B, *lanes, ...declared]" if call.step else ""
                if call.step:
                    raise ValueError(f"{mine}: {what}, but the inputs have one leading axis more than the state "
                                     f"(lanes {theirs}, inputs {ours}): is there a time axis? For several tokens use "
                                     "layer(..., state=state, return_state=True)")
            if len(ours) + 1 == len(theirs) and not call.step:
                raise ValueError(f"{mine}: forward takes [B, T, *lanes, ...declared], but the inputs have one leading "
                                 f"axis fewer than the state (lanes {theirs}, inputs {ours}): is the time axis "
                                 "missing? For one token use layer.step(state, ...) or add a time axis of 1")
        raise ValueError(f"{call.tag} was given a state made by {made_by}: a state continues the op, dims and lanes "
                         "that made it")

    def _prepare(self, inputs: dict, step: bool) -> "_Call":
        spec = self.spec
        if not spec.inputs:  # (lift () and a readout without inputs: nothing sizes a call)
            raise TypeError(f"{spec.name} declares no inputs, so no call can give its batch and time axes: declare "
                            "an input in its lift or readout (e.g. `lift (x: f32)`)")
        expected = [s.name for s in spec.inputs]
        missing = [n for n in expected if n not in inputs]
        extra = [n for n in inputs if n not in expected]
        if missing or extra:
            parts = []
            if missing:
                parts.append(f"missing input{'s' if len(missing) > 1 else ''} {', '.join(missing)}")
            if extra:
                parts.append(f"unexpected input{'s' if len(extra) > 1 else ''} {', '.join(extra)}")
            raise TypeError(f"{spec.name}: {'; '.join(parts)}; it takes {', '.join(expected)}")
        dims = dict(self.dims)
        sources: dict = {}  # dim -> the input it was read from
        lead_axes = 1 if step else 2  # [B] or [B, T] before the lanes
        leads = {}
        devices = set()
        float_dtypes = set()
        for slot in spec.inputs:
            x = inputs[slot.name]
            if not isinstance(x, Tensor):
                raise TypeError(f"{spec.name}: input '{slot.name}' must be a torch.Tensor, got {type(x).__name__}")
            _check_dtype(spec.name, slot, x)
            devices.add(x.device)
            if x.is_floating_point() and slot.dtype == DType.F32:
                float_dtypes.add(x.dtype)
            rank = slot.rank - (1 if spec.chunk is not None else 0)
            if x.dim() < rank + lead_axes:
                want = "[B, *lanes, ...declared]" if step else "[B, T, *lanes, ...declared]"
                raise ValueError(f"{spec.name}: input '{slot.name}' has shape {tuple(x.shape)}; expected "
                                 f"{want} with {rank} declared ax{'is' if rank == 1 else 'es'} after the "
                                 f"leading axes")
            trailing = tuple(x.shape[x.dim() - rank:])
            offset = 1 if spec.chunk is not None else 0
            for axis, dim in slot.dims:
                if spec.chunk is not None and axis == 0:
                    continue
                size = trailing[axis - offset]
                if dims.setdefault(dim, size) != size:
                    want = [dims.get(d, "?") for a, d in slot.dims if not (spec.chunk is not None and a == 0)]
                    origin = "the constructor" if dim in self.dims else f"input '{sources[dim]}'"
                    raise ValueError(f"{spec.name}: input '{slot.name}' should end in shape {want}, got "
                                     f"{list(trailing)} (full shape {tuple(x.shape)}): {dim} = {dims[dim]} comes "
                                     f"from {origin}")
                sources.setdefault(dim, slot.name)
            leads[slot.name] = tuple(x.shape[: x.dim() - rank])
        if len(devices) > 1:
            raise ValueError(f"{spec.name}: inputs are on different devices: {sorted(map(str, devices))}")
        declared = {"p_" + p.name: p.dtype for p in spec.params}
        for name, p in self.named_parameters():
            devices.add(p.device)
            if p.dtype == torch.float64 and declared.get(name) == DType.F32:
                float_dtypes.add(torch.float64)  # an f32 param made float64 (layer.double())
        missing_dims = [d for d in spec.dims if d not in dims]
        if missing_dims:
            raise ValueError(f"{spec.name}: dim{'s' if len(missing_dims) > 1 else ''} {', '.join(missing_dims)} "
                             "cannot be read from the inputs; pass them to the constructor")
        for slot in spec.inputs:  # composite shapes (2*D) and dims fixed elsewhere
            x = inputs[slot.name]
            want = tuple(int(s) for s in slot.shape(dims))
            if spec.chunk is not None:
                want = want[1:]
            got = tuple(x.shape[x.dim() - len(want):]) if want else ()
            if got != want:
                raise ValueError(f"{spec.name}: input '{slot.name}' should end in shape {list(want)} "
                                 f"(declared {slot.dtype}[...]), got {list(got)} (full shape {tuple(x.shape)})")
        lead = self._common_lead(leads, lead_axes, step)
        device = next(iter(devices))
        compute = torch.float64 if torch.float64 in float_dtypes else torch.float32
        dt = torch_dtypes(compute)
        lazy = not step and not _compiling()  # (a step's one token: nothing to save)
        aligned, raw = (_Inputs() if lazy else {}), {}
        for slot in spec.inputs:
            x = inputs[slot.name]
            rank = x.dim() - len(leads[slot.name])
            lanes = len(leads[slot.name]) - lead_axes
            pad = (len(lead) - lead_axes) - lanes
            if pad:
                x = x.reshape(*x.shape[:lead_axes], *([1] * pad), *x.shape[lead_axes:])
            dtype = dt[slot.dtype] if x.is_floating_point() else None
            if x.dtype in _HALVES:
                raw[slot.name] = x
            shape = (lead[0], lead[1], *x.shape[2:]) if spec.chunk is not None and not step else None
            if lazy:  # (chunking reshapes time: no broadcast axes)
                aligned.put(slot.name, x, dtype, shape)
                continue
            x = x if dtype is None else x.to(dtype)
            aligned[slot.name] = x if shape is None else x.expand(shape)
        ctx = Ctx(d=dims, dev=device, dt=dt)
        lanes = tuple(lead[lead_axes:])
        if self.lanes is not None and (len(lanes) != len(self.lanes) or
                                       any(a not in (1, b) for a, b in zip(lanes, self.lanes))):
            want = "[B, *lanes, ...declared]" if step else "[B, T, *lanes, ...declared]"
            hint = ""
            if len(lanes) == len(self.lanes) + 1:
                hint = (": is there a time axis? For several tokens use layer(..., state=state, return_state=True)"
                        if step else "")
            elif len(lanes) + 1 == len(self.lanes) and not step:
                hint = ": is the time axis missing? For one token use layer.step(state, ...)"
            raise ValueError(f"{spec.name}: {'step' if step else 'forward'} takes {want} with lanes {self.lanes} "
                             f"(from the constructor), but the inputs' leading axes {list(lead)} give lanes "
                             f"{lanes}{hint}")
        if self.per_lane and lanes != self.lanes:  # inputs broadcast over the lanes; the per-lane params do not
            lead = tuple(lead[:lead_axes]) + self.lanes
            lanes = self.lanes
        shown = ", ".join(f"{k}={v}" for k, v in sorted(dims.items()))
        per_lane = f" per_lane={','.join(self.per_lane)}" if self.per_lane else ""
        tag = f"{spec.name}[{shown}]{per_lane} lanes={lanes}"
        halves = float_dtypes & _HALVES
        out_dtype = halves.pop() if len(halves) == 1 and float_dtypes <= _HALVES else None
        return _Call(ctx, aligned, lead, step, tag, out_dtype, half=None if out_dtype is None else raw)

    def _prepare_step(self, inputs: dict, state) -> "_Call":
        """`_prepare` once per input signature (shapes, dtypes, devices): later tokens of a
        stream only cast and reshape, and the state check is a tag comparison."""
        if _compiling():  # traced once per graph: the full check costs nothing per token there,
            call = self._prepare(inputs, step=True)  # and a dict lookup would only add guards
            self._check_state(state, call)
            return call, self._step_runner(call)
        try:
            key = (self.backend, self.use_fast_path, *[(n, x.shape, x.dtype, x.device) for n, x in inputs.items()])
            hit = self._step_cache.get(key)
        except AttributeError:  # not tensors: the full check says so
            key, hit = None, None
        if hit is None:
            call = self._prepare(inputs, step=True)
            self._check_state(state, call)
            # the inputs that need a cast or a reshape on later tokens (most need neither)
            plan = tuple((n, call.inputs[n].shape, call.inputs[n].dtype) for n, x in inputs.items()
                         if x.dtype != call.inputs[n].dtype or x.shape != call.inputs[n].shape)
            # (read by backend='auto' when it chooses the C++ step: it wants the bound decode lane)
            call.step_lean = not plan and call.out_dtype is None and self.check_finite != "always"
            run = self._step_runner(call)
            if key is not None:
                # the decode lane in `step` serves this signature when the inputs need no cast or
                # reshape, the outputs no cast, and no step checks its outputs
                lean = not plan and call.out_dtype is None and self.check_finite != "always"
                lane = self._lane(call, run) if lean else self._half_lane(call, run, plan, inputs)
                self._remember(key, (call, plan, run, lane, call.ctx.dev.type))
            return call, run
        template, plan, run = hit[:3]
        if state.op != template.tag:
            self._check_state(state, template)
        if plan:
            inputs = dict(inputs)
            for n, shape, dtype in plan:
                x = inputs[n]
                inputs[n] = (x if x.dtype == dtype else x.to(dtype)).reshape(shape)
        return _Call(template.ctx, inputs, template.lead, True, template.tag, template.out_dtype), run

    def _common_lead(self, leads: dict, lead_axes: int, step: bool) -> tuple:
        width = max(len(v) for v in leads.values())
        padded = {}
        for name, lead in leads.items():
            padded[name] = lead[:lead_axes] + (1,) * (width - len(lead)) + lead[lead_axes:]
        try:
            lead = broadcast_shapes(*padded.values())
        except RuntimeError:
            shown = ", ".join(f"{n}: {list(v)}" for n, v in leads.items())
            raise ValueError(f"{self.spec.name}: the inputs' leading axes ([B, {'' if step else 'T, '}*lanes]) do not "
                             f"broadcast: {shown}") from None
        if not step:
            times = {v[1] for v in leads.values()} - {1}  # T = 1 broadcasts (a per-sequence input)
            if len(times) > 1:
                shown = ", ".join(f"{n}: T={v[1]}" for n, v in leads.items())
                raise ValueError(f"{self.spec.name}: the inputs disagree on the time axis: {shown}")
            if lead[1] == 0:
                raise ValueError(f"{self.spec.name}: the sequence is empty (T = 0); pass at least one token")
        return tuple(lead)

    def _needs_causal_rerun(self, outputs, call) -> bool:
        if not (self.spec.fast and self.use_fast_path and self._checks_finite(call)) or _compiling():
            return False
        if self.backend != "torch" and call.ctx.dev.type == "cuda":
            return False  # the Triton kernels scan token by token: causal already
        if call.token_by_token:
            return False  # the C++ kernels scan token by token: causal already
        if any(o.is_floating_point() and _has_nan(o) for o in outputs):
            return True
        call.outputs_checked = True  # no NaN output: _check_outputs has nothing to find (one pass, not two)
        return False

    def _checks_finite(self, call) -> bool:
        """check_finite=None (the default) checks CPU tensors only: on a GPU the check needs a host
        sync per call, so it is opt-in there (check_finite=True or 'always')."""
        check = self.check_finite
        return call.ctx.dev.type == "cpu" if check is None else bool(check)

    def _check_outputs(self, outputs, call):
        """NaN outputs from finite inputs are an error that names the op (the inputs are only
        inspected once a NaN was found, so the common path costs one pass over the outputs)."""
        if not self._checks_finite(call) or _compiling() or call.outputs_checked:
            return  # (the C++ kernels check their outputs as they write them)
        for slot, out in zip(self.spec.outputs, outputs):
            if out.is_floating_point() and _has_nan(out):
                if any(not bool(torch.isfinite(x).all()) for x in call.inputs.values() if x.is_floating_point()):
                    return  # NaN/inf came in: not the op's doing
                raise FloatingPointError(
                    f"{self.spec.name}: output '{slot.name}' contains NaN although every input is finite: the "
                    "state overflowed or a body divided 0 by 0 (check gate ranges, or pass check_finite=False)")

    # ------------------------------------------------------------------ bodies, batched
    def _lift_batch(self, call, lead, tensors: dict, index) -> tuple:
        args = [tensors[s.name] for s in self.spec.lift_inputs]
        if self.spec.lift_index:
            args.append(index)
        return self._lift(call.ctx, lead, *args)

    def _readout_batch(self, call, lead, prefix: tuple, tensors: dict, index) -> tuple:
        args = [tensors[name] for name in self.spec.readout_args]
        if self.spec.readout_index:
            args.append(index)
        return self._readout(call.ctx, lead, *prefix, *args)

    def _combine_fn(self, call):
        n = len(self.spec.fields)

        def combine(left, right):
            return self._combine(call.ctx, *left, *right)[:n]
        return combine

    def _prefix_combine_fn(self, call):
        """combine(prefix, x) for a stream prefix on the left: its dead fields are None, never
        read and never computed (the generated `_combine_prefix` returns the live fields)."""
        dead = self.spec.dead
        if not dead:
            return self._combine_fn(call)
        live = [i for i in range(len(self.spec.fields)) if i not in dead]

        def combine(left, right):
            out = iter(self._combine_prefix(call.ctx, *left, *right))
            return tuple(None if i in dead else next(out) for i in range(len(self.spec.fields)))
        return combine

    def _without_dead(self, element):
        """The element as a stream prefix keeps it: None in the dead fields' slots."""
        dead = self.spec.dead
        return element if not dead else tuple(None if i in dead else t for i, t in enumerate(element))

    def _push(self, call, state, leaf):
        """The stream state after one more leaf (an exact scan's prefix keeps no dead field)."""
        return self._strategy.scan.push(self, call, state, leaf)

    def _identity_element(self, call):
        return tuple(self._identity(call.ctx))

    def _scan(self, call, leaves: tuple, inner, exclusive: bool):
        """Inclusive (and exclusive) prefixes of `leaves` continuing `inner`; new inner state."""
        return self._strategy.scan.scan(self, call, leaves, inner, exclusive)

    # ------------------------------------------------------------------ token-level ops
    def _token_positions(self, call, state) -> Tensor:
        """Each token's position in its stream, [*lead] broadcastable int64: the state's count
        onwards (for packed sequences, call.cu_seqlens, in each sequence: a packed call's state
        rows have all seen the same count)."""
        lead = call.lead
        start = 0 if state is None else state.size
        if call.cu_seqlens is None:
            return _positions(start, lead[1], lead, call.ctx.dev)
        bounds = cu_seqlens_bounds(self.spec.name, call.cu_seqlens)
        dev = call.ctx.dev
        starts = torch.tensor(bounds[:-1], dtype=torch.int64, device=dev).repeat_interleave(lengths(bounds, dev))
        shape = [1] * len(lead)
        shape[1] = bounds[-1]
        return (torch.arange(start, start + bounds[-1], dtype=torch.int64, device=dev) - starts).reshape(shape)

    def _token_route(self, call):
        """What runs this call's parallel pass: `cpu_support.forward` (the C++ kernels), a
        dispatch path's `run`, or None: the layer's own torch code (`_fast_forward` when the op
        has a fast path and it is on, else the generic scan)."""
        if self.backend in ("auto", "cpu") and self._strategy.token_kernels:
            from . import cpu_support
            if cpu_support.use_cpu(self, call, "forward"):
                return cpu_support.forward
        from . import dispatch
        return dispatch.choose(self, call, "forward").run

    def _forward_tokens(self, call, state, return_state):
        spec = self.spec
        run = self._token_route(call)
        if run is not None:
            return run(self, call, state)
        return self._forward_generic(call, state)

    def _forward_generic(self, call, state):
        """The torch pass of a token-level op: its fast path when it has one and it is on, else
        lift, scan (an exact scan, or the tree: `call.ctx.scan_kernel` 'triton' or 'cpu' runs
        its tree kernels, which also take packed sequences) and readout."""
        spec, lead = self.spec, call.lead
        index = self._token_positions(call, state)  # (packed sequences: each from its own start)
        if spec.fast and self.use_fast_path:
            return self._fast_forward(call, index, state)
        leaves = self._lift_batch(call, lead, call.inputs, index)
        incl, excl, new_state = self._scan(call, leaves, self._full_state(call, state), spec.exclusive)
        new_state = self._stream_state(new_state)
        prefix = excl if spec.exclusive else incl
        outputs = self._readout_batch(call, lead, prefix, call.inputs, index)
        return tuple(outputs), new_state

    def _step_runner(self, call):
        """What runs one token of this call (chosen once per input signature, see _prepare_step):
        (call, state) -> (outputs, new state). Reads the strategy's flags, no method of it: each
        lookup is a guard of a torch.compile'd step."""
        spec = self.spec
        if self._strategy.chunked:
            return self._step_chunked
        kernels = self._strategy.token_kernels  # C++ and dispatch-table steps (exact scans)
        fast_step = spec.fast and self.use_fast_path and hasattr(self, "_fast_step")
        # backend='cpu' steps with the C++ kernels; 'auto' too where its bound step beats the
        # torch step (cpu_support.auto_steps: float32 tokens on the decode lane, docs/cpu.md)
        if kernels and self.backend in ("cpu", "auto"):
            from . import cpu_support
            if (self.backend == "cpu" or cpu_support.auto_steps(self, call)) and cpu_support.use_cpu(self, call, "step"):
                return functools.partial(cpu_support.step, self)
        if fast_step and self.backend in ("auto", "torch") and call.ctx.dev.type == "cpu" and _compiling():
            # what dispatch would choose (a CPU step has no other torch path, and 'auto' runs
            # Triton on CUDA only), without tracing its table: 40-odd fewer guards per call
            return self._fast_step
        if kernels:
            from . import dispatch
            path = dispatch.choose(self, call, "step")
            if path.run is not None:
                return functools.partial(path.run, self)
        if fast_step:
            return self._fast_step
        return self._step_generic

    def _lane(self, call, run):
        """(inputs, state) -> (outputs, new state) for one validated signature: a generated
        fast step bound to it (`_bind_step`), else the runner given a `_Call` per token."""
        if getattr(self, "_bind_step", None) is not None and run == getattr(self, "_fast_step", None):
            return self._bind_step(call)
        ctx, lead, tag = call.ctx, call.lead, call.tag

        def lane(inputs, state):
            return run(_Call(ctx, inputs, lead, True, tag), state)
        if isinstance(run, functools.partial) and run.func.__module__ == "psmc.runtime.cpu_support":
            from . import cpu_support  # the C++ step bound to this signature (general: `lane`)
            return cpu_support.bind_step(self, call, lane)
        bind = getattr(getattr(run, "func", None), "bind", None)
        if bind is not None:  # a dispatch path's own step bound to this signature (the Triton step)
            return bind(self, call, lane)
        return lane

    def _half_lane(self, call, run, plan: tuple, inputs: dict):
        """The decode lane of a bf16/fp16 signature, or None: a runner that reads half inputs
        as given and writes the call's output dtype (`binds_half`: the Triton step kernels)
        binds the raw tokens. Tokens it hands back run as `step` runs them without a lane: the
        inputs cast, the outputs in the inputs' dtype."""
        bind = getattr(getattr(run, "func", None), "bind", None)
        if bind is None or not getattr(run.func, "binds_half", False) or call.half is None or \
                self.check_finite == "always" or any(inputs[n].shape != shape for n, shape, _ in plan):
            return None  # (a reshape per token, or a runner that needs float32 inputs)
        ctx, lead, tag, out_dtype = call.ctx, call.lead, call.tag, call.out_dtype

        def general(inputs, state):
            cast = dict(inputs)
            for n, _, dtype in plan:
                cast[n] = cast[n].to(dtype)
            token = _Call(ctx, cast, lead, True, tag, out_dtype)
            with _no_autocast(cast):
                outputs, state = run(token, state)
            return _in_dtype(outputs, token), state
        return bind(self, call, general)

    def _step_index(self, call, state):
        """The token's position [*lead] when a body reads `index` (else None), no host read."""
        spec = self.spec
        return _position(state, call.lead, call.ctx.dev) if (spec.lift_index or spec.readout_index) else None

    def _step_generic(self, call, state):
        spec = self.spec
        state = self._full_state(call, state)
        lead = call.lead
        index = self._step_index(call, state)
        leaf = self._lift_batch(call, lead, call.inputs, index)
        if spec.exclusive:
            before = state.prefix
            if before is None:
                before = self._identity_element(call)
            outputs = self._readout_batch(call, lead, before, call.inputs, index)
            return tuple(outputs), self._stream_state(self._push(call, state, leaf))
        state = self._push(call, state, leaf)
        prefix = state.prefix
        outputs = self._readout_batch(call, lead, prefix, call.inputs, index)
        return tuple(outputs), self._stream_state(state)

    def _step_tree_cache(self, call, cache: TreeCache):
        """One token for every row of a `TreeCache`, each at its own count: the generic tree step
        with `TreeCache.push` (one graph at every position) in place of `TreeState.push`."""
        spec = self.spec
        lead = call.lead
        index = _position(cache, lead, call.ctx.dev) if (spec.lift_index or spec.readout_index) else None
        leaf = self._lift_batch(call, lead, call.inputs, index)
        # (a lift output broadcast over the batch or lanes fills its slots at full size)
        leaf = tuple(x.expand(tuple(lead) + tuple(int(n) for n in f.shape(call.ctx.d)))
                     for x, f in zip(leaf, spec.fields))
        before = cache.before(self._identity_element(call)) if spec.exclusive else None
        kernels = self._tree_cache_kernels(call)
        if kernels is not None and not self._cache_needs_grad(leaf, cache):
            from . import tree_kernels
            cache, prefix = tree_kernels.cache_step(self, call, cache, leaf, kernels)
        else:
            cache, prefix = cache.push(leaf, self._combine_fn(call))
        outputs = self._readout_batch(call, lead, prefix if before is None else before, call.inputs, index)
        if cache.op != call.tag:
            cache = _tagged(cache, call.tag)
        return tuple(outputs), cache

    def _cache_needs_grad(self, leaf, cache: TreeCache) -> bool:
        """Whether autograd records this token (a decode step trained through): the step kernel
        has no backward, so the torch push runs it."""
        if not torch.is_grad_enabled():
            return False
        slots = () if cache.roots is None else (*cache.roots, *cache.folds)
        return any(t.requires_grad for t in (*leaf, *slots)) or any(p.requires_grad for p in self.parameters())

    def _tree_cache_kernels(self, call):
        """The tree kernels whose step kernel runs a TreeCache token (one call; each row walks
        only its own merges), or None for the torch push: the Triton ones for backend 'triton',
        or 'auto' on CUDA; the C++ ones for backend 'cpu', or 'auto' on CPU tensors."""
        from . import tree_kernels
        if self.backend in ("cpu", "auto") and tree_kernels.cache_unusable_reason(self, call) is None:
            return self._cpu_tree_kernels
        k = getattr(self, "_tree_kernels", None)
        if k is None or k.step is None or self.backend not in ("triton", "auto"):
            return None
        if self.backend == "auto" and call.ctx.dev.type != "cuda":
            return None
        return k if tree_kernels.unusable_reason(self, call) is None else None

    # ------------------------------------------------------------------ stream layout
    # The one place that knows the stream layout of an op whose plan drops dead fields
    # (spec.stream): a stream state holds the kept fields only; the generic scan gets the
    # dead ones back as zeros. They are never read: a dead field only feeds its own next
    # value, and the prefix of a stream is always the left operand.
    def _full_state(self, call, state):
        keep = self.spec.stream
        if keep is None or state is None or not isinstance(state, ScanState) or state.prefix is None \
                or len(state.prefix) == len(self.spec.fields):
            return state
        kept = dict(zip(keep, state.prefix))
        lead = None
        for f in self.spec.fields:
            if f.name in kept:
                lead = tuple(kept[f.name].shape[: kept[f.name].dim() - f.rank])
                like = kept[f.name]
        full = tuple(kept[f.name] if f.name in kept else
                     like.new_zeros(lead + tuple(int(s) for s in f.shape(call.ctx.d))) for f in self.spec.fields)
        return ScanState(prefix=full, count=state.count, op=state.op)

    def _stream_state(self, state):
        keep = self.spec.stream
        if keep is None or not isinstance(state, ScanState) or state.prefix is None:
            return state
        by_name = {f.name: t for f, t in zip(self.spec.fields, state.prefix)}
        return ScanState(prefix=tuple(by_name[n] for n in keep), count=state.count, op=state.op)

    # ------------------------------------------------------------------ chunk ops
    def _forward_chunked(self, call, state, return_state):
        spec = self.spec
        C = int(spec.chunk(call.ctx.d))
        inner, skip = None, 0
        tensors = dict(call.inputs)
        if state is not None:
            stream = state if isinstance(state, ChunkStream) else None
            inner = stream.inner if stream else state
            if stream is not None and stream.size:
                skip = stream.size  # re-run the buffered tokens of the partial chunk
                tensors = {n: torch.cat([_broadcast_time(stream.tokens(n), x), x], dim=1) for n, x in tensors.items()}
        T = next(iter(tensors.values())).shape[1]
        lead = (call.lead[0], T) + call.lead[2:]
        full, rest = divmod(T, C)
        n_chunks = full + (1 if rest else 0)
        chunks = {n: _to_chunks(x, C, n_chunks, len(lead)) for n, x in tensors.items()}
        chunk_lead = (lead[0], n_chunks) + lead[2:]
        start = 0 if inner is None else inner.size
        index = _positions(start, n_chunks, chunk_lead, call.ctx.dev)
        outputs = []
        if full:
            full_chunks = {n: x[:, :full] for n, x in chunks.items()}
            full_lead = (lead[0], full) + lead[2:]
            leaves = self._lift_batch(call, full_lead, full_chunks, index[:, :full])
            incl, excl, new_inner = self._scan(call, leaves, inner, exclusive=True)
        else:
            excl, new_inner = None, inner
        # exclusive prefix for every chunk, the partial one included: P(start + i)
        prefixes = excl
        if rest:
            step_lead = (lead[0],) + lead[2:]
            last = tuple(None if t is None else _as_step(t, f.rank, step_lead).unsqueeze(1)
                         for t, f in zip(self._prefix_of(call, new_inner), spec.fields))
            prefixes = last if excl is None else tuple(
                None if a is None or b is None else torch.cat([a, b], dim=1) for a, b in zip(excl, last))
        outputs = self._readout_batch(call, chunk_lead, prefixes, chunks, index)
        outputs = tuple(_from_chunks(o, T, len(lead))[:, skip:] for o in outputs)
        new_state = None
        if return_state:
            if new_inner is None:
                new_inner = self._strategy.empty(call.ctx.dev)
            token_like = {n: x[:, 0] for n, x in tensors.items()}
            new_state = ChunkStream.empty(new_inner, token_like, C)
            for i in range(full * C, T):
                new_state = new_state.append({n: x[:, i].expand(token_like[n].shape) for n, x in tensors.items()})
        return outputs, new_state

    def _prefix_of(self, call, inner):
        if inner is not None:
            p = inner.prefix
            if p is not None:
                return p
        return self._identity_element(call)

    def _step_chunked(self, call, state):
        spec = self.spec
        C = int(spec.chunk(call.ctx.d))
        token = {n: x for n, x in call.inputs.items()}
        lead = call.lead  # [B, *lanes]
        if not isinstance(state, ChunkStream):
            token_like = {n: x.expand(tuple(lead) + tuple(x.shape[len(lead):])) for n, x in token.items()}
            state = ChunkStream.empty(state, token_like, C)
        position = state.size
        state = state.append({n: x.expand(state.buffer[n].shape[:1] + state.buffer[n].shape[2:])
                              for n, x in token.items()})
        chunk_inputs = {n: state.buffer[n].movedim(1, len(lead)) for n in token}
        index = _position(state.inner, lead, call.ctx.dev)  # (no host read: a compiled step has no graph break)
        prefix = self._prefix_of(call, state.inner)
        outputs = self._readout_batch(call, lead, prefix, chunk_inputs, index)
        rows = len(lead)
        outputs = tuple(o.select(rows, position) for o in outputs)
        if state.is_complete:
            leaf = self._lift_batch(call, lead, chunk_inputs, index)
            state = state.restart(self._push(call, state.inner, leaf))
        return outputs, state

    def _step_chunk_cache(self, call, cache: ChunkCache):
        """One token for every row of a `ChunkCache`, each at its own position: `_step_chunked`
        with the token written at each row's slot, each row's prefix over its complete chunks,
        its output read at its slot, and a masked push of the rows whose chunk completes."""
        spec = self.spec
        lead = call.lead  # [B, *lanes]
        rows = len(lead)
        slot = cache.filled if cache.filled.numel() else None  # (None: the first token, at slot 0)
        cache = cache.append({n: x.expand(tuple(lead) + tuple(x.shape[len(lead):])) for n, x in call.inputs.items()})
        slot = torch.zeros_like(cache.filled) if slot is None else slot
        chunk_inputs = {n: cache.buffer[n].movedim(1, rows) for n in call.inputs}
        index = _position(cache.inner, lead, call.ctx.dev)
        prefix = cache.inner.before(self._identity_element(call))
        if prefix is not None:  # (the identity broadcasts; the slots are per row; a dead field is None)
            prefix = tuple(None if p is None else p.expand(tuple(lead) + tuple(p.shape[p.dim() - f.rank:]))
                           for p, f in zip(prefix, spec.fields))
        outputs = self._readout_batch(call, lead, prefix, chunk_inputs, index)
        outputs = tuple(_at_slot(o, slot, rows) for o in outputs)
        complete = cache.filled == cache.chunk
        if complete.device.type == "cpu" and not torch.compiler.is_compiling():
            # on CPU tensors outside a graph a host read is free: the completing rows alone push
            which = complete.nonzero().squeeze(1)
            if which.numel() == 0:
                inner = None
            elif which.numel() < complete.numel():
                picked = {n: x.index_select(0, which) for n, x in chunk_inputs.items()}
                inner = cache.inner.put_rows(which, self._push_chunks(call, cache.inner[which], picked,
                                                                      index.index_select(0, which), None))
            else:
                inner = self._push_chunks(call, cache.inner, chunk_inputs, index, None)
        else:  # one graph: every row lifts and pushes, masked to the rows that complete
            inner = self._push_chunks(call, cache.inner, chunk_inputs, index, complete)
        if inner is not None:
            cache = cache.restart(inner, complete)
        if cache.op != call.tag:
            cache = _tagged(cache, call.tag)
        return outputs, cache

    def _push_chunks(self, call, inner, chunk_inputs: dict, index, rows):
        """`inner` (a `TreeCache` or `ScanCache`) after its rows (`rows`, [B] bool; None: all)
        push their lifted chunks. The prefix combine: an exact scan's prefix keeps no dead field
        (a tree has none, and there it is the combine)."""
        lead = (index.shape[0],) + tuple(call.lead[1:])
        leaf = self._lift_batch(call, lead, chunk_inputs, index)
        leaf = tuple(x.expand(lead + tuple(int(n) for n in f.shape(call.ctx.d))) for x, f in zip(leaf, self.spec.fields))
        return inner.push(leaf, self._prefix_combine_fn(call), rows=rows)[0]


class _Inputs:
    """A forward call's inputs as the layer computes with them (compute dtype, lanes aligned).

    A bf16/fp16 input is cast to the compute dtype when it is first read, not before: a fast
    path that hands its kernels the tensor as given (`_Call.half`: the chunk kernels take
    bf16/fp16 q, k and v) never makes the float32 copy, which on a GPU is 6 bytes of HBM
    traffic per element and a float32 tensor per input alive until the call returns. Every
    other reader gets the cast tensor, made once. A mapping (`[name]`, `items`, `values`,
    iteration, `len`) in the inputs' declared order; under torch.compile `_prepare` builds a
    plain dict (the compiler drops a cast nobody reads)."""

    __slots__ = ("_names", "_ready", "_pending")

    def __init__(self):
        self._names: list = []
        self._ready: dict = {}
        self._pending: dict = {}  # name -> (tensor as given, dtype, shape after the cast or None)

    def put(self, name: str, x: Tensor, dtype=None, shape=None) -> None:
        """x, to be cast to `dtype` when first read (None: as it is) and then expanded to `shape`."""
        self._names.append(name)
        if dtype is None or x.dtype == dtype:
            self._ready[name] = x if shape is None or tuple(x.shape) == tuple(shape) else x.expand(shape)
        else:
            self._pending[name] = (x, dtype, shape)

    def described(self, name: str) -> tuple:
        """(shape, dtype) of `self[name]`, without casting it."""
        if name in self._pending:
            x, dtype, shape = self._pending[name]
            return (tuple(x.shape) if shape is None else tuple(shape)), dtype
        x = self._ready[name]
        return tuple(x.shape), x.dtype

    def __getitem__(self, name: str) -> Tensor:
        x = self._ready.get(name)
        if x is None:
            raw, dtype, shape = self._pending.pop(name)
            x = raw.to(dtype)
            if shape is not None and tuple(x.shape) != tuple(shape):
                x = x.expand(shape)
            self._ready[name] = x
        return x

    def __contains__(self, name) -> bool:
        return name in self._ready or name in self._pending

    def __iter__(self):
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def keys(self):
        return list(self._names)

    def values(self):
        return [self[n] for n in self._names]

    def items(self):
        return [(n, self[n]) for n in self._names]

    def get(self, name, default=None):
        return self[name] if name in self else default


@dataclass
class _Call:
    ctx: Ctx
    inputs: "dict | _Inputs"
    lead: tuple
    step: bool = False
    tag: str = ""  # "op[dims] lanes=(...)": what a state made by this call is tagged with
    out_dtype: torch.dtype | None = None  # half-precision inputs: outputs are cast back to it
    token_by_token: bool = False  # the pass that ran scanned time sequentially: a NaN at t reached nothing before t
    outputs_checked: bool = False  # the outputs are known to hold no NaN: the finite check has nothing to find
    # context parallelism asks a fast path for its full total (dead fields included) and for
    # what `_fast_carry` needs to add a carry-in afterwards; None (always, elsewhere): nothing extra
    carry_terms: dict | None = None
    # a step signature whose later tokens take the decode lane (no cast, no output check):
    # backend='auto' then steps with the C++ kernels (cpu_support.auto_steps)
    step_lean: bool = False
    # packed sequences (fla's offsets, read once) a fast path runs in one call (`_forward_packed`)
    cu_seqlens: Offsets | None = None
    # every float input bf16 (or every one fp16): those inputs as given, before the cast to the
    # compute dtype (the chunk fast paths hand them to their kernels uncast); None otherwise
    half: dict | None = None


def _compiling() -> bool:
    return torch.compiler.is_compiling()


def _describe(values) -> tuple:
    """(shape, dtype, device) of each tensor, the type's name for anything else (a step
    function's signature check): literals, so under torch.compile (static shapes) they cost no
    guard beyond the tensors' own."""
    return tuple((tuple(v.shape), v.dtype, v.device) if isinstance(v, Tensor) else type(v).__name__ for v in values)


def _has_nan(x: Tensor) -> bool:
    """Whether x holds a NaN. A NaN anywhere makes the sum NaN, so one reduction clears the
    common case (about 10x cheaper than isnan(x).any(), which writes a bool tensor the size of
    x); a NaN sum (a NaN, or +inf meeting -inf) is then looked at element by element."""
    return bool(torch.isnan(x.sum())) and bool(torch.isnan(x).any())


def _tagged(state, tag: str):
    if state.op == tag:
        return state
    import dataclasses
    if isinstance(state, ChunkStream):
        return dataclasses.replace(state, op=tag, inner=_tagged(state.inner, tag))
    return dataclasses.replace(state, op=tag)


def _in_dtype(outputs: tuple, call: _Call) -> tuple:
    """bf16/fp16 inputs give the outputs declared f32 in that dtype (computed and accumulated
    in fp32). Outputs declared f64 stay float64 (f64 values are float64 in every call), and
    ones declared f16/bf16 already have their dtype: only float32 outputs are cast (a call
    with half inputs computes f32 in float32)."""
    if call.out_dtype is None:
        return outputs
    return tuple(o.to(call.out_dtype) if o.dtype == torch.float32 else o for o in outputs)


def _no_autocast(inputs: dict):
    """The layer computes in its own dtypes (fp32 state and accumulation): autocast, if on,
    is switched off inside it (in-place GEMMs and fp32 state updates must not be recast)."""
    for x in inputs.values():
        if isinstance(x, Tensor):
            if torch.is_autocast_enabled(x.device.type):
                return torch.autocast(x.device.type, enabled=False)
            break
    return contextlib.nullcontext()


def _a(noun: str) -> str:
    return ("an " if noun[0] in "aeiou" else "a ") + noun


def _cache_holds(cache) -> str:
    """What a serving cache holds, in the cache errors."""
    if type(cache) is TreeCache:
        return "the counter of a token tree scan"
    if isinstance(cache.inner, ScanCache):
        return "the per-row prefix and partial chunks of a chunk op on an exact scan"
    return "the chunk counter and partial chunks of a chunk op on the tree"


def _batch_rows(state) -> int:
    return state.batch_size


def _check_cu_seqlens(op: str, cu, inputs: dict) -> list:
    """Validated offsets that cover the packed inputs `[1, total_T, ...]`."""
    bounds = cu_seqlens_bounds(op, cu)
    batches = {name: x.shape[0] for name, x in inputs.items() if isinstance(x, Tensor) and x.dim() >= 2}
    if any(b != 1 for b in batches.values()):
        raise ValueError(f"{op}: with cu_seqlens the inputs are packed as [1, total_T, ...]; got batch sizes {batches}")
    times = {x.shape[1] for x in inputs.values() if isinstance(x, Tensor) and x.dim() >= 2} - {1}
    total = times.pop() if len(times) == 1 else (1 if not times else None)
    if total is None:
        raise ValueError(f"{op}: the inputs disagree on total_T: {sorted(times)}")
    if bounds[-1] != total:
        raise ValueError(f"{op}: cu_seqlens must end at total_T = {total} (the inputs' time axis), got {bounds[-1]}: {bounds}")
    return bounds


def _position(state, lead: tuple, device) -> Tensor:
    """The position of a step's token, [*lead] int64, without a host read: a tree's size is its
    counter's structure, an exact scan's the count tensor."""
    if isinstance(state, TreeState):
        return torch.full(lead, state.size, dtype=torch.int64, device=device)
    if isinstance(state, (TreeCache, ScanCache)):  # each row at its own count
        if not state.count.numel():
            return torch.zeros(lead, dtype=torch.int64, device=device)
        return state.count.to(device).reshape((-1,) + (1,) * (len(lead) - 1)).expand(lead)
    return state.count.to(device).expand(lead)


def _at_slot(out: Tensor, slot: Tensor, axis: int) -> Tensor:
    """out[b, ..., slot[b], ...] along `axis` (the chunk axis after the lead): each row's
    output at its own token's slot."""
    out = out.expand((slot.shape[0],) + tuple(out.shape[1:]))
    index = slot.to(out.device).reshape((-1,) + (1,) * (out.dim() - 1))
    index = index.expand(tuple(out.shape[:axis]) + (1,) + tuple(out.shape[axis + 1:]))
    return out.gather(axis, index).squeeze(axis)


def _positions(start: int, count: int, lead: tuple, device) -> Tensor:
    shape = [1] * len(lead)
    shape[1] = count
    return torch.arange(start, start + count, dtype=torch.int64, device=device).reshape(shape)


def _to_chunks(x: Tensor, C: int, n_chunks: int, lead_rank: int) -> Tensor:
    """[B, T, *lanes, *rest] → [B, n_chunks, *lanes, C, *rest] (zero-padded at the end)."""
    T = x.shape[1]
    pad = n_chunks * C - T
    if pad:
        x = torch.cat([x, x.new_zeros((x.shape[0], pad) + tuple(x.shape[2:]))], dim=1)
    x = x.reshape(x.shape[0], n_chunks, C, *x.shape[2:])
    return x.movedim(2, lead_rank)


def _from_chunks(y: Tensor, T: int, lead_rank: int) -> Tensor:
    """[B, n_chunks, *lanes, C, *rest] → [B, T, *lanes, *rest]."""
    y = y.movedim(lead_rank, 2)
    y = y.reshape(y.shape[0], y.shape[1] * y.shape[2], *y.shape[3:])
    return y[:, :T]


def _broadcast_time(buffered: Tensor, x: Tensor) -> Tensor:
    shape = (x.shape[0], buffered.shape[1]) + tuple(x.shape[2:])
    return buffered.expand(shape).to(x.dtype)


def _as_step(t: Tensor, rank: int, step_lead: tuple) -> Tensor:
    """A field value with lead [] (an identity) or [B, *lanes] as a `[*step_lead, *field]` tensor."""
    missing = len(step_lead) - (t.dim() - rank)
    if missing > 0:
        t = t.reshape((1,) * missing + tuple(t.shape))
    return t.expand(tuple(step_lead) + tuple(t.shape[len(step_lead):]))


def _check_dtype(op: str, slot: Slot, x: Tensor):
    want = slot.dtype
    if want.is_float:
        ok = x.is_floating_point()
    elif want.is_int:
        ok = not x.is_floating_point() and x.dtype != torch.bool and not x.is_complex()
    else:
        ok = x.dtype == torch.bool
    if not ok:
        raise TypeError(f"{op}: input '{slot.name}' is declared {want} but got a {x.dtype} tensor")


def _per_lane_names(spec: Spec, lanes: tuple | None, per_lane) -> tuple:
    """The params built with one slice per lane (`per_lane=True`: all of them; or their names)."""
    if per_lane is False or per_lane is None or per_lane == ():
        return ()
    names = [p.name for p in spec.params]
    if per_lane is True:
        chosen = tuple(names)
    elif isinstance(per_lane, str):
        chosen = (per_lane,)
    else:
        chosen = tuple(per_lane)
    if not chosen:
        raise ValueError(f"{spec.name}: per_lane=True but the op declares no param; per-lane values that are not "
                         "learned are inputs ([B, T, *lanes, ...], or [1, 1, *lanes, ...] to broadcast)")
    unknown = [n for n in chosen if n not in names]
    if unknown or not all(isinstance(n, str) for n in chosen):
        raise ValueError(f"{spec.name}: per_lane names params, but {', '.join(map(repr, unknown))} "
                         f"{'is not one' if len(unknown) == 1 else 'are not'}; the op's params are: "
                         f"{', '.join(names) or 'none'} (per_lane=True makes all of them per lane)")
    if lanes is None:
        raise ValueError(f"{spec.name}: per-lane params ({', '.join(chosen)}) need the lanes at construction: pass "
                         f"lanes=(H,) (or the lane axes your inputs have between time and the declared shape), "
                         f"e.g. {spec.name}(lanes=(4,), per_lane=True)")
    return tuple(n for n in names if n in chosen)


def _init(shape: tuple, init: tuple, dtype) -> Tensor:
    kind = init[0]
    t = torch.empty(shape, dtype=dtype)
    if kind == "zeros":
        return nn.init.zeros_(t)
    if kind == "ones":
        return nn.init.ones_(t)
    if kind == "normal":
        return nn.init.normal_(t, std=init[1])
    if kind == "uniform":
        return nn.init.uniform_(t, init[1], init[2])
    if kind == "xavier":
        return nn.init.xavier_uniform_(t)
    raise ValueError(f"unknown init {kind!r}")
