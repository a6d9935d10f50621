"""The Triton decode lane: the generated step kernel bound to one input signature.

At batch 1 a decode token's GPU work is a few microseconds, so the host decides the rate.
`PsmLayer.step` checks a signature once and then runs the step bound to it (its decode lane);
for the generated Triton step kernels that is `bind_step` here: everything that depends only on
the signature is computed once, and a token checks what it could get wrong, binds its tensors
and launches. docs/triton.md, "The decode lane", has the host times.
"""
from __future__ import annotations

import threading
import weakref

import torch

from . import triton_abi
from .state import ScanState
from .triton_support import _field_dtype, _geometry, _given_inputs, _launch_args, roles

COUNT_BLOCK = 64  # new-state counts made at a time by a bound step (views of one arange)


def bind_step(layer, call, general):
    """The Triton step of one input signature, as a closure `(inputs, state) -> (outputs, new
    state)` (PsmLayer.step caches it per signature: its decode lane). The geometry, the kernel's
    arguments (sizes, dims, strides, params, constexprs), the warps and the shapes of what it
    writes are computed here once; a token checks what it could get wrong, binds its tensors
    and launches:
    - no view, cast, copy or argument check per token: the token's inputs and the state's
      tensors are handed to the kernel where they lie, the outputs and the new state are
      allocated in their final shapes;
    - no host read of the count: the stream position (which only an op reading `index` passes)
      is known on the host for a state this lane made (read once for any other), and the new
      states' counts are views of one arange made COUNT_BLOCK at a time, not a `count + 1`
      launch per token (`_Counts`).
    `general(inputs, state)` (the per-token step) serves what this does not cover: grad mode on,
    a state without a prefix or in another layout, an input whose strides differ from the
    bound ones, a param that is not a contiguous fp32 tensor or was replaced."""
    k = layer._triton_kernels
    spec = layer.spec
    if spec.stream is not None:
        return general
    g = _geometry(k, call, call.lead, 0)
    dev = call.ctx.dev
    field_roles = roles(k, "field")
    field_dtypes = [_field_dtype(d) for d in k.field_dtypes]
    field_shapes = [(g.B, *g.lanes, *g.extent(r)) for r in field_roles]
    params = [getattr(layer, "p_" + name) for name in k.params]
    if any(not p.is_contiguous() or (p.is_floating_point() and p.dtype != torch.float32) for p in params):
        return general  # (a per-token cast: the general step makes it)
    zeros = [torch.zeros(shape, device=dev, dtype=dt) for shape, dt in zip(field_shapes, field_dtypes)]
    inputs = _given_inputs(k, call)  # (bf16/fp16 ones as given: the tokens' own tensors)
    half = call.half or {}
    if any(x.is_floating_point() and x.dtype != call.ctx.dt[d] and half.get(n) is not x
           for n, d, x in zip(k.inputs, k.input_dtypes, inputs)):
        return general  # an input the layer casts: a token's own tensor is not the kernel's
    args, outputs, _, _ = _launch_args(k, [name in layer.per_lane for name in k.params], call, g, inputs, params,
                                       zeros, 0, False, 1)
    triton_abi.check(args, "step", g.tile, len(k.inputs), len(k.params), len(k.field_dtypes), len(k.output_dtypes),
                     tuple(k.dims))
    for i, x in enumerate(inputs):
        if args[f"in{i}"].data_ptr() != x.data_ptr() or args[f"in{i}"].dtype != x.dtype:
            return general  # its kernel view is a copy: the general step makes it per token
    inputs_plan = tuple((name, f"in{i}", x.stride()) for i, (name, x) in enumerate(zip(k.inputs, inputs)))
    params_plan = tuple(("p_" + name, p) for name, p in zip(k.params, params))
    dead = spec.dead
    # (ini, fin, shape, dtype, zeros read for a dead field, the buffer its new value goes to: a
    # dead field's is written each token and never read, so one buffer serves every token)
    fields_plan = tuple((f"ini{i}", f"fin{i}", shape, dt, zero, torch.empty_like(zero) if i in dead else None)
                        for i, (shape, dt, zero) in enumerate(zip(field_shapes, field_dtypes, zeros)))
    outs_plan = tuple((f"out{i}", (g.B, *g.lanes, *g.extent(role)), out.dtype)
                      for i, (out, role) in enumerate(outputs))
    uses_index = bool(spec.lift_index or spec.readout_index)
    kernel, grid, warps = k.step, g.grid, g.num_warps(1)
    is_grad_enabled, empty = torch.is_grad_enabled, torch.empty
    counts = _Counts()

    def step(token: dict, state):
        prefix = state.prefix
        if is_grad_enabled() or type(state) is not ScanState or prefix is None or len(prefix) != len(fields_plan):
            return general(token, state)
        a = dict(args)
        for name, slot, stride in inputs_plan:
            x = token[name]  # (names, shapes, dtypes and device: the caller matched the signature)
            if x.stride() != stride:
                return general(token, state)
            a[slot] = x
        for attr, p in params_plan:
            if getattr(layer, attr) is not p:
                return general(token, state)
        for (ini, _, shape, dt, zero, _), t in zip(fields_plan, prefix):
            if t is None:
                t = zero  # a dead field: the kernel reads it, nothing uses what it gives
            elif t.shape != shape or t.dtype != dt or t.device != dev or not t.is_contiguous():
                return general(token, state)
            a[ini] = t
        outs = []
        for slot, shape, dt in outs_plan:
            outs.append(empty(shape, device=dev, dtype=dt))
            a[slot] = outs[-1]
        fins = []
        for _, fin, shape, dt, _, scratch in fields_plan:
            a[fin] = scratch if scratch is not None else empty(shape, device=dev, dtype=dt)
            fins.append(None if scratch is not None else a[fin])
        count, position = counts.after(state.count)
        if uses_index:
            a["start"] = position
        kernel[grid](**a, num_warps=warps)
        return tuple(outs), ScanState(prefix=tuple(fins), count=count, op=state.op)
    return step


class _Counts:
    """The counts of the states a bound step makes, with no launch and no host read per token.

    Every count it makes is remembered with its host value and its chain: the pre-made counts
    that follow it (views of one device arange, made COUNT_BLOCK at a time). Stepping the newest
    count of a chain takes the next pre-made one; stepping an older one (a second branch from
    the same state, as in beam search) starts a chain of its own. A count made elsewhere (a
    parallel pass, a state built from tensors) is read once (a host sync for a GPU tensor) and
    stepped by `count + 1`."""

    def __init__(self):
        self.known: dict = {}  # id(count) -> (weak reference, host value, chain)
        self.limit = 4 * COUNT_BLOCK  # entries before the dead ones are dropped (doubles with the live ones)
        # two threads stepping one state (branches) must not both take the chain's next count
        self.lock = threading.Lock()

    def after(self, count) -> tuple:
        """(the count one token later, the host value of `count`)."""
        if not isinstance(count, torch.Tensor):  # a plain int (step_function's states): nothing to keep
            return count + 1, count
        with self.lock:
            return self._after(count)

    def _after(self, count) -> tuple:
        held = self.known.get(id(count))
        if held is None or held[0]() is not count:
            value, chain = int(count), _Chain()
            new = count + 1
        else:
            value, chain = held[1], held[2]
            if chain.tip() is not count:  # a branch off an older state of the chain
                chain = _Chain()
            if not chain.rest:
                chain.rest = list(torch.arange(value + COUNT_BLOCK, value, -1, device=count.device).unbind(0))
            new = chain.rest.pop()
        chain.tip = ref = weakref.ref(new)  # (weak: the table must not keep a dropped state's count alive)
        if len(self.known) >= self.limit:  # forget the counts no state holds any more
            self.known = {key: entry for key, entry in self.known.items() if entry[0]() is not None}
            self.limit = max(4 * COUNT_BLOCK, 2 * len(self.known))
        self.known[id(new)] = (ref, value + 1, chain)
        return new, value


class _Chain:
    __slots__ = ("tip", "rest")

    def __init__(self):
        self.tip = _nothing  # a weak reference to the newest count of the chain
        self.rest: list = []  # the pre-made counts after it, the next one last


def _nothing():
    return None
