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

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn

from ..dtypes import DType
from .element import with_time
from .ops import DTYPES, torch_dtypes
from .scan import exact_scan, exclusive_from_inclusive
from .state import ChunkStream, ScanState, TreeState
from .tree import tree_scan


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
    # the fields a stream state of the fast path keeps (None: all); the others are dead in a
    # stream (they only feed their own next value) and `_full_prefix` fills them back in
    stream: tuple | None = None
    # fields a stream prefix leaves out (exact scans): they feed nothing the readout reads once
    # the prefix is the left operand (psmc.analysis.liveness); None in their slots
    dead: tuple = ()

    @property
    def inputs(self) -> tuple:
        return self.lift_inputs + self.readout_inputs


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

    def __init__(self, backend: str = "auto", check_finite: bool | None = None, **dims):
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
        self.backend = backend
        self.check_finite = check_finite
        self.use_fast_path = True  # set False to force the generic scan (tests compare both)
        for p in spec.params:
            missing = [d for d in p.dims if d not in self.dims]
            if missing:
                raise TypeError(f"{spec.name}: param '{p.name}' needs dim{'s' if len(missing) > 1 else ''} "
                                f"{', '.join(missing)}; pass {', '.join(f'{m}=...' for m in missing)} to the constructor")
            shape = tuple(int(s) for s in p.shape(self.dims))
            self.register_parameter("p_" + p.name, nn.Parameter(_init(shape, p.init, DTYPES[p.dtype])))
        self._check_backend_available()

    # ------------------------------------------------------------------ public API
    def forward(self, *args, state=None, return_state: bool = False, cp_group=None, **inputs):
        """`cp_group`: a torch.distributed process group; every rank passes its own contiguous
        slice of the sequence (docs/context_parallel.md)."""
        if cp_group is not None:
            from . import context_parallel
            return context_parallel.forward(self, args, inputs, state, return_state, cp_group)
        inputs = self._bind_positional(args, inputs)
        call = self._prepare(inputs, step=False)
        if state is not None:
            self._check_state(state)
        return self._forward_local(call, state, return_state)

    def _forward_local(self, call, state, return_state: bool):
        spec = self.spec
        if spec.chunk is not None:
            outputs, new_state = self._forward_chunked(call, state, return_state)
        else:
            outputs, new_state = self._forward_tokens(call, state, return_state)
        self._check_outputs(outputs, call)
        result = outputs[0] if len(outputs) == 1 else outputs
        return (result, new_state) if return_state else result

    def step(self, state, *args, **inputs):
        """One token: inputs `[B, *lanes, *declared]`; returns (outputs, new state)."""
        spec = self.spec
        inputs = self._bind_positional(args, inputs)
        if state is None:
            raise ValueError(f"{spec.name}.step needs a state: use layer.init_state(batch_shape=...)")
        self._check_state(state)
        call = self._prepare(inputs, step=True)
        if spec.chunk is not None:
            outputs, state = self._step_chunked(call, state)
        else:
            outputs, state = self._step_token(call, state)
        self._check_outputs(outputs, call)
        return (outputs[0] if len(outputs) == 1 else outputs), state

    def init_state(self, batch_shape=(), device=None, dtype=None):
        """An empty stream state. For chunk ops the partial-chunk buffer is created on the
        first `step` (its shape follows the inputs)."""
        inner = ScanState.empty(device) if self.spec.scan == "exact" else TreeState.empty(device)
        return inner

    def extra_repr(self) -> str:
        dims = ", ".join(f"{k}={v}" for k, v in self.dims.items())
        return f"{dims}{', ' if dims else ''}scan={self.spec.scan}, backend={self.backend!r}"

    # ------------------------------------------------------------------ validation
    def _check_backend_available(self):
        if self.backend == "triton" and not getattr(self, "_triton_kernels", None):
            raise ValueError(f"{self.spec.name}: backend='triton' is not available for this op: its plan has "
                             "no Triton kernels (see `psmc check`); use backend='torch' or 'auto'")
        if self.backend == "cpu" and getattr(self, "_cpu_kernels", None) is None:
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

    def _check_state(self, state):
        want = ScanState if self.spec.scan == "exact" else TreeState
        inner = state.inner if isinstance(state, ChunkStream) else state
        if not isinstance(inner, want):
            raise TypeError(f"{self.spec.name}: expected a {want.__name__} (from init_state or "
                            f"return_state=True), got {type(state).__name__}")

    def _prepare(self, inputs: dict, step: bool) -> "_Call":
        spec = self.spec
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
        aligned = {}
        for slot in spec.inputs:
            x = inputs[slot.name]
            rank = x.dim() - len(leads[slot.name])
            lanes = len(leads[slot.name]) - lead_axes
            pad = (len(lead) - lead_axes) - lanes
            if pad:
                x = x.reshape(*x.shape[:lead_axes], *([1] * pad), *x.shape[lead_axes:])
            if x.is_floating_point():
                x = x.to(dt[slot.dtype])
            if spec.chunk is not None and not step:  # chunking reshapes time: no broadcast axes
                x = x.expand(lead[0], lead[1], *x.shape[2:])
            aligned[slot.name] = x
        ctx = Ctx(d=dims, dev=device, dt=dt)
        return _Call(ctx, aligned, lead)

    def _common_lead(self, leads: dict, lead_axes: int, step: bool) -> tuple:
        width = max(len(v) for v in leads.values())
        padded = {}
        for name, lead in leads.items():
            padded[name] = lead[:lead_axes] + (1,) * (width - len(lead)) + lead[lead_axes:]
        try:
            lead = torch.broadcast_shapes(*padded.values())
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

    def _check_outputs(self, outputs, call):
        """NaN outputs from finite inputs are an error that names the op (the inputs are only
        inspected once a NaN was found, so the common path costs one pass over the outputs).

        check_finite=None (the default) checks CPU tensors only: on a GPU the check needs a host
        sync per call, so it is opt-in there (check_finite=True)."""
        check = self.check_finite
        if check is None:
            check = call.ctx.dev.type == "cpu"
        if not check or getattr(call, "outputs_checked", False):
            return  # (the C++ kernels check their outputs as they write them)
        for slot, out in zip(self.spec.outputs, outputs):
            if out.is_floating_point() and torch.isnan(out).any():
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
        """The stream state after one more leaf (the prefix keeps no dead field)."""
        if self.spec.scan != "exact":
            return state.push(leaf, self._combine_fn(call))
        pushed = state.push(leaf, self._prefix_combine_fn(call))
        return ScanState(prefix=self._without_dead(pushed.prefix), count=pushed.count)

    def _identity_element(self, call):
        return tuple(self._identity(call.ctx))

    def _scan(self, call, leaves: tuple, inner, exclusive: bool):
        """Inclusive (and exclusive) prefixes of `leaves` continuing `inner`; new inner state."""
        combine = self._combine_fn(call)
        if self.spec.scan == "exact":
            carry = None if inner is None else inner.prefix
            if carry is not None and self.spec.dead:
                # the carry has no dead fields: scan the new leaves alone, then put the carry
                # in front of every step with one combine onto the prefix
                incl = self._prefix_combine_fn(call)(with_time(carry), exact_scan(leaves, combine))
            else:
                incl = exact_scan(leaves, combine, carry=carry)
            excl = None
            if exclusive:
                first = carry if carry is not None else self._identity_element(call)
                excl = exclusive_from_inclusive(incl, first)
            start = inner if inner is not None else ScanState.empty(call.ctx.dev)
            return incl, excl, start.advanced(self._without_dead(incl))
        identity = self._identity_element(call) if self.spec.has_identity else None
        return tree_scan(leaves, combine, state=inner, identity=identity, exclusive=exclusive)

    # ------------------------------------------------------------------ token-level ops
    def _forward_tokens(self, call, state, return_state):
        spec = self.spec
        if self.backend in ("auto", "cpu") and spec.scan == "exact":
            from . import cpu_support
            if cpu_support.use_cpu(self, call, "forward"):
                return cpu_support.forward(self, call, state)
        from . import dispatch
        path = dispatch.choose(self, call, "forward")
        if path.run is not None:
            return path.run(self, call, state)
        lead = call.lead
        T = lead[1]
        start = 0 if state is None else state.size
        index = _positions(start, T, lead, call.ctx.dev)
        if spec.fast and self.use_fast_path:
            return self._fast_forward(call, index, state)
        leaves = self._lift_batch(call, lead, call.inputs, index)
        incl, excl, new_state = self._scan(call, leaves, self._full_state(call, state), spec.exclusive)
        new_state = self._stream_state(new_state)
        prefix = excl if spec.exclusive else incl
        outputs = self._readout_batch(call, lead, prefix, call.inputs, index)
        return tuple(outputs), new_state

    def _step_token(self, call, state):
        spec = self.spec
        if self.backend in ("auto", "cpu") and spec.scan == "exact":
            from . import cpu_support
            if cpu_support.use_cpu(self, call, "step"):
                return cpu_support.step(self, call, state)
        if spec.scan == "exact":
            from . import dispatch
            path = dispatch.choose(self, call, "step")
            if path.run is not None:
                return path.run(self, call, state)
        if spec.fast and self.use_fast_path and hasattr(self, "_fast_step"):
            return self._fast_step(call, state)
        state = self._full_state(call, state)
        lead = call.lead
        index = torch.full(lead, state.size, dtype=torch.int64, device=call.ctx.dev) if \
            (spec.lift_index or spec.readout_index) else None
        leaf = self._lift_batch(call, lead, call.inputs, index)
        if spec.exclusive:
            before = state.prefix if spec.scan == "exact" else state.prefix()
            if before is None:
                before = self._identity_element(call)
            outputs = self._readout_batch(call, lead, before, call.inputs, index)
            return tuple(outputs), self._stream_state(self._push(call, state, leaf))
        state = self._push(call, state, leaf)
        prefix = state.prefix if spec.scan == "exact" else state.prefix()
        outputs = self._readout_batch(call, lead, prefix, call.inputs, index)
        return tuple(outputs), self._stream_state(state)

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
        return ScanState(prefix=full, count=state.count)

    def _stream_state(self, state):
        keep = self.spec.stream
        if keep is None or not isinstance(state, ScanState) or state.prefix is None:
            return state
        by_name = {f.name: t for f, t in zip(self.spec.fields, state.prefix)}
        return ScanState(prefix=tuple(by_name[n] for n in keep), count=state.count)

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
                new_inner = ScanState.empty(call.ctx.dev) if spec.scan == "exact" else TreeState.empty(call.ctx.dev)
            token_like = {n: x[:, 0] for n, x in tensors.items()}
            new_state = ChunkStream.empty(new_inner, token_like, C)
            for i in range(full * C, T):
                new_state = new_state.append({n: x[:, i].expand(token_like[n].shape) for n, x in tensors.items()})
        return outputs, new_state

    def _prefix_of(self, call, inner):
        if inner is not None:
            p = inner.prefix if self.spec.scan == "exact" else inner.prefix()
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
        index = torch.full(lead, state.inner.size, dtype=torch.int64, device=call.ctx.dev)
        prefix = self._prefix_of(call, state.inner)
        outputs = self._readout_batch(call, lead, prefix, chunk_inputs, index)
        rows = len(lead)
        outputs = tuple(o.select(rows, position) for o in outputs)
        if state.is_complete:
            leaf = self._lift_batch(call, lead, chunk_inputs, index)
            state = state.restart(self._push(call, state.inner, leaf))
        return outputs, state


@dataclass
class _Call:
    ctx: Ctx
    inputs: dict
    lead: tuple


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
