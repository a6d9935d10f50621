"""Context parallelism: one sequence split across the ranks of a `torch.distributed` group.

`layer(**inputs, cp_group=group)`: every rank passes its own contiguous slice `[B, T_r, ...]`
of the sequence (rank order = sequence order, any lengths >= 1) and gets that slice's outputs,
equal to the matching slice of a single-process run over the whole sequence. `state=` is the
whole sequence's initial state (the same on every rank) and `return_state=True` returns the
whole sequence's final state on every rank. docs/context_parallel.md has the algorithm per plan
and the bytes each rank sends.

Leaves are tokens (chunk ops: chunks; a chunk that straddles a rank boundary belongs to the rank
holding its last token, which receives the chunk's earlier tokens, < C per rank). Rank r holds
the global leaves [a_r, b_r). Every call makes, in this order, the same collectives on every rank:

1. metadata: a small int64 vector per rank (op, dims, batch and lane shape, slice length,
   dtype, state, flags, or the text of a local input error) is all-gathered and validated on
   every rank, so a mismatch or a bad slice raises the same clear error everywhere, never a hang
   (the wait has a timeout, `TIMEOUT_S`, for a rank that never calls).
2. chunk ops only: every rank's last min(T_r, C - 1) tokens (the straddling chunks' heads).
3. summaries: exact scans send their slice's total (one state); tree scans send the aligned
   blocks of the fixed tree that lie inside their slice and that a later rank's counter (or the
   final counter) is made of: O(log T) states per rank.

Then each rank builds the stream state at its first leaf (exact: the carry, the fold of the
earlier totals; tree: the binary counter at a_r, bracket for bracket, its roots assembled from the
published blocks by the same Agg calls a single process makes) and runs the ordinary
single-process pass over its slice continuing from that state: the fixed-tree prefixes are then
the single-process P(t) at every position. Exact scans with a cheap carry (first-order and
chunkwise fast paths, `_fast_carry`) instead run their fast pass once, from zero, before the
exchange and add the carry afterwards by the op's algebra. Gradients flow back through the
gathers (their backward is an all-reduce of the state-sized gradients), so the reverse carry is
autograd's.

With cu_seqlens (varlen, `_Varlen`): sequences inside one rank run there alone, sequences that
span ranks run the schemes above as passes of their own.
"""
from __future__ import annotations

import dataclasses
import datetime
import math
import zlib
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from .element import at, with_time
from .scan import exact_scan
from .state import ChunkStream, ScanState, StreamState, TreeState

# Seconds a rank waits for the others in one exchange before it raises (a rank that never
# calls the layer, or that is stuck elsewhere). Tests lower it.
TIMEOUT_S = 300.0

# Bytes this process contributed to the exchanges (each all-gather counts its input once, each
# backward all-reduce its buffer once), per kind; the benchmark reads and resets it.
SENT_BYTES: dict[str, int] = {}

# How the exact scans over tokens of this process took their carry-in, counted per pass ('cheap
# carry': the fast path once, the carry added by its algebra; 'fast path twice': from zero for
# the total, again from the carry; 'generic scan'): the tests and the benchmark read it.
SCHEMES: dict[str, int] = {}

_MAX_LANES = 8
_MAX_DIMS = 8
_NAME_CHARS = 48
_MESSAGE_CHARS = 400
_HEAD = 24  # fixed slots before the lanes, dims, name and message
_META = _HEAD + _MAX_LANES + _MAX_DIMS + _NAME_CHARS + _MESSAGE_CHARS
_OK, _EMPTY, _FAILED = 0, 1, 2
_DTYPES = {torch.float32: 0, torch.float64: 1}


class ContextParallelError(ValueError):
    """Raised on every rank of the group when the ranks' calls do not fit together."""


# ---------------------------------------------------------------------------- entry point
def forward(layer, args: tuple, inputs: dict, state, return_state: bool, group, cu_seqlens=None):
    """`layer.forward(*args, **inputs, state=state, return_state=..., cp_group=group,
    cu_seqlens=cu_seqlens)`."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    spec = layer.spec
    call, code, message, bounds = None, _OK, "", None
    try:
        inputs = layer._bind_positional(args, dict(inputs))
        call = layer._prepare(inputs, step=False)
        if cu_seqlens is not None:
            bounds = _check_global_cu_seqlens(spec.name, cu_seqlens, call)
            if state is not None:
                rows = _batch_rows(state)
                if rows not in (0, len(bounds) - 1):
                    raise ValueError(f"{spec.name}: cu_seqlens holds {len(bounds) - 1} sequences but the state has "
                                     f"{rows} batch rows; pass one row per sequence")
                for i in range(len(bounds) - 1):
                    row = _row_state(state, i)
                    if row is not None:
                        layer._check_state(row, call)
        elif state is not None:
            layer._check_state(state, call)
    except (TypeError, ValueError) as error:
        empty = any(isinstance(x, Tensor) and x.dim() >= 2 and x.shape[1] == 0 for x in inputs.values())
        code, message = (_EMPTY, "") if empty else (_FAILED, str(error))
        call = None
    grad = torch.is_grad_enabled() and (
        any(p.requires_grad for p in layer.parameters())
        or any(isinstance(x, Tensor) and x.requires_grad for x in inputs.values())
        or (state is not None and any(t.requires_grad for t in state.tensors())))
    mine = _metadata(layer, call, state, return_state, grad, code, message, bounds)
    device = call.ctx.dev if call is not None else _device_of(inputs)
    table = _exchange_metadata(mine, group, world, device)
    plan = _validate(layer, table, rank, world, bounds)
    if bounds is not None:
        from .layer import _no_autocast
        with _no_autocast(inputs):
            if world == 1:
                return layer._forward_varlen(inputs, cu_seqlens, state) if return_state else \
                    layer._forward_varlen(inputs, cu_seqlens, state)[0]
            return _Varlen(layer, call, state, return_state, group, rank, world, plan, grad, bounds).run()
    if world == 1:
        result = layer._forward_local(call, state, return_state)
        if not return_state:  # (outputs, state) -> outputs, as forward without cp_group returns
            result = result[0]
    else:
        result = _Run(layer, call, state, return_state, group, rank, world, plan, grad).run()
    if return_state:  # the whole sequence's state, tagged like any state this layer returns
        from .layer import _tagged
        outputs, new_state = result
        result = (outputs, _tagged(new_state, call.tag))
    return result


def _device_of(inputs: dict) -> torch.device:
    for x in inputs.values():
        if isinstance(x, Tensor):
            return x.device
    return torch.device("cpu")


# ---------------------------------------------------------------------------- metadata
def _op_signature(layer) -> int:
    spec = layer.spec
    text = repr((spec.name, spec.scan, spec.exclusive, [(f.name, f.dtype, f.rank) for f in spec.fields],
                 [(s.name, s.dtype, s.rank) for s in spec.inputs], [(s.name, s.dtype) for s in spec.outputs],
                 spec.fast))
    return zlib.crc32(text.encode())


def _put_text(row: Tensor, start: int, width: int, text: str):
    data = text.encode("utf-8", "replace")[:width]
    row[start:start + len(data)] = torch.tensor(list(data), dtype=torch.int64)


def _get_text(row: Tensor, start: int, width: int) -> str:
    data = bytes(int(v) for v in row[start:start + width].tolist() if v > 0)
    return data.decode("utf-8", "replace")


def _state_counts(state) -> tuple[int, int]:
    """(leaves in the inner state, tokens buffered in a chunk op's partial chunk)."""
    if state is None:
        return 0, 0
    if isinstance(state, ChunkStream):
        return state.inner.size, state.size
    return state.size, 0


def _metadata(layer, call, state, return_state, grad, code, message, bounds=None) -> Tensor:
    spec = layer.spec
    row = torch.zeros(_META, dtype=torch.int64)
    row[0] = code
    row[1] = _op_signature(layer)
    varlen = bounds is not None and code == _OK
    m0, s0 = _state_counts(state) if code == _OK and not varlen else (0, 0)
    row[2:8] = torch.tensor([int(state is not None), m0, s0, int(bool(return_state)), int(grad),
                             len(bounds) - 1 if varlen else -1])
    if varlen:  # every rank passes the same global cu_seqlens (and the same per-sequence state)
        row[12] = zlib.crc32(repr(bounds).encode())
        if state is not None:
            sizes = [_state_counts(_row_state(state, i)) for i in range(len(bounds) - 1)]
            row[14] = zlib.crc32(repr(sizes).encode())
    if call is not None:
        lead = call.lead
        if len(lead) - 2 > _MAX_LANES:
            row[0], message = _FAILED, f"{spec.name}: context parallelism supports at most {_MAX_LANES} lane axes"
        else:
            row[8], row[9], row[10] = lead[0], lead[1], len(lead) - 2
            row[11] = _DTYPES.get(call.ctx.dt["f32"], 9)
            row[_HEAD:_HEAD + len(lead) - 2] = torch.tensor(lead[2:], dtype=torch.int64)
            dims = [int(call.ctx.d[d]) for d in spec.dims][:_MAX_DIMS]
            if dims:
                row[_HEAD + _MAX_LANES:_HEAD + _MAX_LANES + len(dims)] = torch.tensor(dims)
    _put_text(row, _HEAD + _MAX_LANES + _MAX_DIMS, _NAME_CHARS, spec.name)
    _put_text(row, _HEAD + _MAX_LANES + _MAX_DIMS + _NAME_CHARS, _MESSAGE_CHARS, message)
    return row


def _exchange_metadata(row: Tensor, group, world: int, device) -> Tensor:
    if dist.get_backend(group) == "nccl":
        row = row.to(device)
    return _all_gather(row, group, world, "metadata").cpu()


@dataclass
class _Plan:
    """What every rank knows after the metadata exchange, identical on every rank."""

    lengths: list[int]  # T_r per rank
    has_state: bool
    m0: int  # leaves in the initial (inner) state
    s0: int  # tokens buffered in the initial partial chunk (chunk ops)
    return_state: bool


def _validate(layer, table: Tensor, rank: int, world: int, bounds=None) -> _Plan:
    spec = layer.spec
    names = [_get_text(table[r], _HEAD + _MAX_LANES + _MAX_DIMS, _NAME_CHARS) for r in range(world)]
    where = f"{spec.name} (context parallel, rank {rank} of {world})"

    def fail(text: str):
        raise ContextParallelError(f"{where}: {text}")

    codes = table[:, 0].tolist()
    empty = [r for r in range(world) if codes[r] == _EMPTY]
    if empty:
        fail(f"rank{'s' if len(empty) > 1 else ''} {', '.join(map(str, empty))} passed an empty slice (T = 0): "
             "every rank of the group needs at least one token of the sequence (use fewer ranks for short "
             "sequences)")
    failed = [r for r in range(world) if codes[r] == _FAILED]
    if failed:
        first = failed[0]
        text = _get_text(table[first], _HEAD + _MAX_LANES + _MAX_DIMS + _NAME_CHARS, _MESSAGE_CHARS)
        plural = len(failed) > 1
        fail(f"rank{'s' if plural else ''} {', '.join(map(str, failed))} rejected {'their' if plural else 'its'} "
             f"inputs; rank {first} says: {text}")
    signatures = table[:, 1].tolist()
    if len(set(signatures)) > 1 or len(set(names)) > 1:
        shown = ", ".join(f"rank {r}: {names[r]!r}" for r in range(world))
        fail(f"the ranks call different ops ({shown}): every rank of cp_group must call the same layer")

    def differ(what: str, values: list, hint: str):
        if len(set(map(str, values))) > 1:
            shown = ", ".join(f"rank {r}: {values[r]}" for r in range(world))
            fail(f"the ranks disagree on {what} ({shown}); {hint}")

    differ("the batch size B", table[:, 8].tolist(), "every rank passes the same batch, split along time only")
    lanes = [table[r, _HEAD:_HEAD + int(table[r, 10])].tolist() for r in range(world)]
    differ("the lane axes [B, T, *lanes]", lanes, "every rank passes the same lane shape")
    dims = [table[r, _HEAD + _MAX_LANES:_HEAD + _MAX_LANES + min(len(spec.dims), _MAX_DIMS)].tolist()
            for r in range(world)]
    differ(f"the dims ({', '.join(spec.dims)})", dims, "every rank builds the layer with the same dims")
    differ("the compute dtype (0 = float32, 1 = float64)", table[:, 11].tolist(),
           "every rank passes inputs of the same dtypes")
    differ("whether a state= is given", table[:, 2].tolist(),
           "pass the whole sequence's initial state on every rank, or on none")
    differ("the initial state's size (leaves, buffered tokens)", [table[r, 3:5].tolist() for r in range(world)],
           "pass the same initial state on every rank")
    differ("return_state", table[:, 5].tolist(), "pass the same return_state on every rank")
    differ("whether cu_seqlens is given (its sequence count N, -1 for none)", table[:, 7].tolist(),
           "pass the same global cu_seqlens on every rank, or none")

    def same(what: str, values: list, hint: str):  # values too long for the metadata: compared by checksum
        kinds = list(dict.fromkeys(values))
        if len(kinds) > 1:
            shown = "; ".join(f"rank{'s' if values.count(v) > 1 else ''} "
                              f"{', '.join(str(r) for r in range(world) if values[r] == v)}"
                              f"{' pass' if values.count(v) > 1 else ' passes'} {'one' if k == 0 else 'another'}"
                              for k, v in enumerate(kinds))
            fail(f"the ranks pass different {what} ({shown}); {hint}")

    same("cu_seqlens", table[:, 12].tolist(),
         "pass the same global cu_seqlens (offsets into the whole packed sequence) on every rank")
    same("initial states (their rows' token counts differ)", table[:, 14].tolist(),
         "pass the same initial state (one row per sequence) on every rank")
    if bounds is not None:
        total = sum(table[:, 9].tolist())
        if bounds[-1] != total:
            fail(f"cu_seqlens ends at {bounds[-1]} but the ranks' slices hold {total} tokens in all "
                 f"(T_r = {table[:, 9].tolist()}); cu_seqlens holds the offsets of the whole packed sequence, "
                 "the same tensor on every rank")
    differ("whether gradients are recorded", table[:, 6].tolist(),
           "run every rank under the same torch.no_grad()/requires_grad setting")
    return _Plan(lengths=table[:, 9].tolist(), has_state=bool(table[0, 2]), m0=int(table[0, 3]),
                 s0=int(table[0, 4]), return_state=bool(table[0, 5]))


# ---------------------------------------------------------------------------- collectives
def _wait(work, what: str):
    try:
        work.wait(timeout=datetime.timedelta(seconds=TIMEOUT_S))
    except RuntimeError as error:
        raise ContextParallelError(
            f"context parallel exchange '{what}' did not complete within {TIMEOUT_S:g} s ({error}): every rank "
            "of cp_group must call the layer, in the same order (a rank that skipped the call, failed before "
            "it, or is stuck elsewhere)") from None


def _scheme(name: str):
    SCHEMES[name] = SCHEMES.get(name, 0) + 1


def _count(kind: str, t: Tensor):
    SENT_BYTES[kind] = SENT_BYTES.get(kind, 0) + t.numel() * t.element_size()


def _all_gather(t: Tensor, group, world: int, kind: str) -> Tensor:
    """[world, *t.shape]: every rank's t, in rank order."""
    t = t.contiguous()
    wire = t.to(torch.uint8) if t.dtype == torch.bool else t
    out = [torch.empty_like(wire) for _ in range(world)]
    _count(kind, wire)
    _wait(dist.all_gather(out, wire, group=group, async_op=True), kind)
    stacked = torch.stack(out)
    return stacked.to(torch.bool) if t.dtype == torch.bool else stacked


class _Gather(torch.autograd.Function):
    """All-gather of several tensors; the backward all-reduces the gradients of the gathered
    stacks and keeps this rank's slot (the gradient of a rank's input is the sum over all ranks
    of what flowed into its copy)."""

    @staticmethod
    def forward(ctx, group, world, rank, kind, *tensors):
        ctx.group, ctx.world, ctx.rank, ctx.kind = group, world, rank, kind
        ctx.floating = [t.is_floating_point() for t in tensors]
        outs = tuple(_all_gather(t, group, world, kind) for t in tensors)
        for out, floating in zip(outs, ctx.floating):
            if not floating:
                ctx.mark_non_differentiable(out)
        return outs

    @staticmethod
    def backward(ctx, *grads):
        result = []
        for g, floating in zip(grads, ctx.floating):
            if not floating:
                result.append(None)
                continue
            g = g.contiguous().clone()
            _count(ctx.kind + " (backward)", g)
            _wait(dist.all_reduce(g, group=ctx.group, async_op=True), ctx.kind + " (backward)")
            result.append(g[ctx.rank])
        return (None, None, None, None, *result)


class _Tie(torch.autograd.Function):
    """x, unchanged, made to depend on `anchors` (zero gradient), so that every rank's backward
    reaches the gathers in the same order even where its outputs do not use their data."""

    @staticmethod
    def forward(ctx, x, *anchors):
        ctx.anchors = [(a.shape, a.dtype, a.device) for a in anchors]
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return (grad, *[torch.zeros(s, dtype=d, device=v) for s, d, v in ctx.anchors])


def _tie(x: Tensor, anchors: list[Tensor]) -> Tensor:
    anchors = [a for a in anchors if a.requires_grad]
    if not anchors or not x.is_floating_point():
        return x
    return _Tie.apply(x, *anchors)


# ---------------------------------------------------------------------------- the run
class _Exchanges:
    """The all-gather both passes (`_Run`, `_Varlen`) make: differentiable when `grad`, each
    gather chained after the last (`anchors`) so the backward all-reduces run in one order on
    every rank. Uses the instance's group, world, rank, grad and anchors."""

    def gather(self, tensors: list[Tensor], kind: str) -> list[Tensor]:
        if self.grad:
            tensors = [_tie(t, self.anchors) for t in tensors]  # chain this gather after the last one
            if not any(t.requires_grad for t in tensors):
                # this rank sends nothing differentiable (padding only), but its backward must
                # still join the all-reduce that the other ranks' backward makes
                tensors = [t.detach().requires_grad_() if t.is_floating_point() else t for t in tensors]
            outs = list(_Gather.apply(self.group, self.world, self.rank, kind, *tensors))
            self.anchors = [o for o in outs if o.requires_grad]
            return outs
        return [_all_gather(t, self.group, self.world, kind) for t in tensors]


class _Run(_Exchanges):
    def __init__(self, layer, call, state, return_state, group, rank, world, plan: _Plan, grad: bool):
        self.layer, self.call, self.state, self.return_state = layer, call, state, return_state
        self.group, self.rank, self.world, self.plan, self.grad = group, rank, world, plan, grad
        spec = layer.spec
        self.spec = spec
        self.combine = layer._combine_fn(call)
        self.chunk = None if spec.chunk is None else int(spec.chunk(call.ctx.d))
        self.stream = state if isinstance(state, ChunkStream) else None
        self.inner = self.stream.inner if self.stream is not None else state
        offsets = [0]
        for length in plan.lengths:
            offsets.append(offsets[-1] + length)
        self.offsets = offsets  # token offsets of the slices in the new tokens
        # leaf ranges: starts[r] .. starts[r + 1]; starts[world] = the final leaf count
        if self.chunk is None:
            self.starts = [plan.m0 + o for o in offsets]
        else:
            self.starts = [plan.m0 + (plan.s0 + o) // self.chunk for o in offsets]
        self.anchors: list[Tensor] = []
        self.raw = False  # varlen: (outputs, state) as computed, outputs None for an empty piece
        self.tails: dict = {}
        self.step_lead = (call.lead[0],) + tuple(call.lead[2:])

    # -- helpers
    def full_step(self, element) -> tuple:
        """A step element expanded to [B, *lanes, *field] in the fields' compute dtypes."""
        out = []
        for t, f in zip(element, self.spec.fields):
            dtype = self.call.ctx.dt[f.dtype]
            shape = tuple(int(s) for s in _field_shape(f, self.call.ctx.d))
            t = t.to(dtype)
            missing = len(self.step_lead) + len(shape) - t.dim()
            if missing > 0:
                t = t.reshape((1,) * missing + tuple(t.shape))
            out.append(t.expand(*self.step_lead, *shape).contiguous())
        return tuple(out)

    def zero_step(self) -> tuple:
        return tuple(torch.zeros(*self.step_lead, *_field_shape(f, self.call.ctx.d), dtype=self.call.ctx.dt[f.dtype],
                                 device=self.call.ctx.dev) for f in self.spec.fields)

    def agg(self, left, right):
        return at(self.combine(with_time(left), with_time(right)), 0)

    # -- main
    def run(self):
        """The pass the layer's strategy picks: `run_exact_tokens` (exact token ops) or `run_leaves`."""
        return self.layer._strategy.context_parallel(self)

    def run_leaves(self):
        """Tree scans and chunk ops: this rank's leaves (lifted tokens or chunks) and the start and
        final states the scan strategy builds from the ranks' exchange, then the local pass."""
        layer, strategy = self.layer, self.layer._strategy
        pre = self.straddling_tokens() if self.chunk is not None else None
        leaves = self.local_leaves(pre)
        start, final = strategy.scan.context_parallel_states(self, leaves)
        own_stream = start
        if self.chunk is not None and pre is not None and pre[next(iter(pre))].shape[1] > 0:
            own_stream = _chunk_stream(start, pre, self.chunk)
        if self.call.lead[1] == 0:  # a varlen sequence this rank holds no token of
            outputs = None
        else:
            outputs, _ = strategy.parallel_pass(layer, self.call, own_stream, False)
        new_state = None
        if self.return_state:
            new_state = final
            if self.chunk is not None:
                tail = self.tokens_before(self.offsets[-1])
                new_state = final if tail[next(iter(tail))].shape[1] == 0 else _chunk_stream(final, tail, self.chunk)
                if isinstance(new_state, (ScanState, TreeState)):
                    token_like = {n: x.new_zeros((x.shape[0],) + tuple(x.shape[2:]))
                                  for n, x in self.call.inputs.items()}
                    new_state = ChunkStream.empty(new_state, token_like, self.chunk)
        return self.finish(outputs, new_state)

    def finish(self, outputs, new_state):
        if self.raw:
            return outputs, new_state
        from .layer import _in_dtype
        outputs = tuple(_tie(o, self.anchors) for o in outputs)
        self.layer._check_outputs(outputs, self.call)
        outputs = _in_dtype(outputs, self.call)  # bf16/fp16 inputs: outputs in that dtype, as in one process
        result = outputs[0] if len(outputs) == 1 else outputs
        return (result, new_state) if self.return_state else result

    def run_exact_tokens(self):
        """Exact scans over tokens.

        Cheap carry (first-order recurrences, chunkwise decayed linear attention: the op has a
        `_fast_carry`): the fast path runs once from zero and returns the slice's full total
        (its decay product included, dead in a stream or not) and, after the exchange, the
        carry-in enters by its algebra (h_t += (prod of decays up to t) * carry; o_t +=
        scale * (q_t * decays) S0): no second scan. Other fast paths (the delta rule) and
        Triton kernels run twice where a carry comes in: once from zero for the slice's total,
        once continuing from the carry (their carry-in is their initial_state). The generic scan
        runs once: its local inclusive scan gets the carry in one batched combine."""
        layer = self.layer
        if self.call.lead[1] == 0:  # a varlen sequence this rank holds no token of: it only takes part in the exchange
            _, final = self.carries(self.zero_step())
            return self.finish(None, _stream_state(layer, final))
        passing = self.exact_pass()
        start, final = self.carries(next(passing))
        return self.finish(_resume(passing, (start, final)), _stream_state(layer, final))

    def exact_pass(self):
        """The local work of `run_exact_tokens`, as a generator: it yields the slice's total (a
        full step element), is sent (start state, final state) and returns the outputs."""
        from .layer import _positions
        from .scan import exclusive_from_inclusive
        layer, spec, call = self.layer, self.spec, self.call
        a, T = self.starts[self.rank], call.lead[1]
        index = _positions(a, T, call.lead, call.ctx.dev)
        cheap = self.cheap_carry_path()
        if cheap is not None:
            call = dataclasses.replace(call, carry_terms={})
            if cheap == "triton-first-order":
                call.ctx.scan_kernel = "triton"
            outputs, local_state = layer._fast_forward(call, index, ScanState(prefix=None, count=a))
            start, _ = yield self.full_step(local_state.prefix)
            if start.prefix is not None:
                outputs = layer._fast_carry(call, outputs, start.prefix)
            _scheme("cheap carry")
            return tuple(outputs)
        kernel = spec.fast is not None and layer.use_fast_path
        if not kernel and layer.backend != "torch":
            from . import triton_support
            kernel = triton_support.use_triton(layer, call)
        local_outputs = None
        total = None
        if kernel and spec.stream is None:
            local_outputs, local_state = layer._forward_tokens(call, ScanState(prefix=None, count=a), True)
            total, incl = local_state.prefix, None
            if any(t is None for t in total):  # a field dead in streams left out: the carry needs it
                total = None
        if total is None:
            # the generic scan; also the total of a fast path whose stream state drops fields
            # (the delta rule keeps S only): the carry's right operand needs them all (E too)
            incl = exact_scan(layer._lift_batch(call, call.lead, call.inputs, index), self.combine)
            total = at(incl, T - 1)
        start, _ = yield self.full_step(total)
        carry = start.prefix
        if kernel:
            outputs = local_outputs
            if outputs is None or carry is not None:
                outputs = layer._forward_tokens(call, _stream_state(layer, start), False)[0]
                _scheme("fast path twice")
            else:
                _scheme("fast path once")
        else:
            _scheme("generic scan")
            if carry is not None:
                incl = self.combine(with_time(carry), incl)
            prefix = incl
            if spec.exclusive:
                first = carry if carry is not None else layer._identity_element(call)
                prefix = exclusive_from_inclusive(incl, first)
            outputs = tuple(layer._readout_batch(call, call.lead, prefix, call.inputs, index))
        return tuple(outputs)

    def cheap_carry_path(self) -> str | None:
        """The dispatch path name when this call's forward is a fast path with a cheap carry
        (`_fast_carry`, an exclusive readout's too: it adds the carry as decayed up to the token
        before), else None. backend='cpu' keeps its C++ kernels (two passes)."""
        layer = self.layer
        if not (self.spec.fast and layer.use_fast_path and hasattr(layer, "_fast_carry")) or layer.backend == "cpu":
            return None
        from . import dispatch
        name = dispatch.choose(layer, self.call, "forward").name
        return name if name in ("chunkwise", "torch-first-order", "triton-first-order", "torch-fast") else None

    # -- chunk ops: the tokens of chunks that straddle a rank boundary
    def straddling_tokens(self) -> dict:
        C, call = self.chunk, self.call
        self.tails = {}
        if C > 1:
            names = list(call.inputs)
            tails = []
            for n in names:
                x = call.inputs[n]
                x = x.expand(*call.lead, *x.shape[len(call.lead):])
                keep = min(x.shape[1], C - 1)
                pad = x.new_zeros((x.shape[0], C - 1 - keep) + tuple(x.shape[2:]))
                tails.append(torch.cat([pad, x[:, x.shape[1] - keep:]], dim=1))
            self.tails = dict(zip(names, self.gather(tails, "chunk heads")))
        return self.tokens_before(self.offsets[self.rank])

    def tokens_before(self, offset: int) -> dict:
        """The new tokens' inputs at global token positions [chunk start, s0 + offset): the
        partial chunk that position s0 + offset falls in, up to it (from the initial state's
        buffer and the ranks' gathered tails)."""
        C, s0, call = self.chunk, self.plan.s0, self.call
        end = s0 + offset
        begin = (end // C) * C
        out = {}
        for n, x in call.inputs.items():
            full_shape = tuple(call.lead) + tuple(x.shape[len(call.lead):])
            pieces = []
            for g in range(begin, end):
                if g < s0:
                    buffered = self.stream.tokens(n)[:, g]
                    pieces.append(buffered.expand(full_shape[:1] + full_shape[2:]).to(x.dtype))
                else:
                    q = next(r for r in range(self.world) if self.offsets[r] <= g - s0 < self.offsets[r + 1])
                    back = self.offsets[q + 1] - (g - s0)  # 1 for the rank's last token
                    pieces.append(self.tails[n][q][:, C - 1 - back])
            if pieces:
                out[n] = torch.stack(pieces, dim=1)
            else:
                out[n] = x.new_zeros((full_shape[0], 0) + full_shape[2:])
        return out

    def local_leaves(self, pre):
        """This rank's leaves (lifted tokens, or lifted complete chunks), global positions."""
        layer, call = self.layer, self.call
        from .layer import _positions, _to_chunks
        a, b = self.starts[self.rank], self.starts[self.rank + 1]
        if b == a:
            return None
        if self.chunk is None:
            index = _positions(a, b - a, call.lead, call.ctx.dev)
            return layer._lift_batch(call, call.lead, call.inputs, index)
        C, n = self.chunk, b - a
        lead_rank = len(call.lead)
        chunks = {}
        for name, x in call.inputs.items():
            x = x.expand(*call.lead, *x.shape[lead_rank:])
            tokens = torch.cat([pre[name].to(x.dtype), x], dim=1)[:, :n * C]
            chunks[name] = _to_chunks(tokens, C, n, lead_rank)
        chunk_lead = (call.lead[0], n) + tuple(call.lead[2:])
        index = _positions(a, n, chunk_lead, call.ctx.dev)
        return layer._lift_batch(call, chunk_lead, chunks, index)

    # -- exact scans: totals
    def exact_states(self, leaves):
        if leaves is not None:
            total = self.full_step(at(exact_scan(leaves, self.combine), leaves[0].shape[1] - 1))
        else:
            total = self.zero_step()
        return self.carries(total)

    def carries(self, total):
        """(this rank's start state, the final state) from the ranks' gathered totals."""
        totals = self.gather(list(total), "totals")
        return self.carries_from([tuple(t[r] for t in totals) if self.starts[r + 1] > self.starts[r] else None
                                  for r in range(self.world)])

    def carries_from(self, totals: list):
        """(this rank's start state, the final state) from every rank's total (None: no leaf)."""
        inner = self.inner
        if inner is not None and hasattr(self.layer, "_full_state"):
            inner = self.layer._full_state(self.call, inner)  # a stream state may hold live fields only
        initial = None if inner is None else inner.prefix
        if initial is not None and any(t is None for t in initial):  # dead in a stream: never read
            initial = tuple(z if t is None else t for t, z in zip(initial, self.zero_step()))
        carry = None if initial is None else tuple(initial)
        carries = []
        for r in range(self.world):
            carries.append(carry)
            if totals[r] is not None:
                carry = totals[r] if carry is None else self.agg(carry, totals[r])
        dev = self.call.ctx.dev
        start = ScanState(prefix=carries[self.rank], count=torch.tensor(self.starts[self.rank], device=dev))
        final = ScanState(prefix=carry, count=torch.tensor(self.starts[-1], device=dev))
        if self.chunk is not None:
            final = _stream_state(self.layer, final)
        return start, final

    # -- tree scans: the fixed tree's blocks, bracket for bracket
    def tree_states(self, leaves):
        m0 = self.plan.m0
        targets = [self.starts[r] for r in range(1, self.world)]
        if self.return_state:
            targets.append(self.starts[-1])
        owner = self.block_owner
        published: list[list[tuple[int, int]]] = [[] for _ in range(self.world)]
        composite: dict[tuple[int, int], None] = {}

        def decompose(s: int, j: int):
            if (s, j) in composite or any((s, j) in p for p in published):
                return
            q = owner(s, j)
            if q is not None:
                published[q].append((s, j))
            elif s + (1 << j) <= m0:
                self.initial_root(s, j)  # checks it is one
            else:
                decompose(s, j - 1)
                decompose(s + (1 << (j - 1)), j - 1)
                composite[(s, j)] = None

        for t in targets:
            for j in reversed(range(t.bit_length())):
                if (t >> j) & 1 and ((t >> j) << j) > m0:
                    decompose(((t >> (j + 1)) << (j + 1)), j)
        # this rank's blocks, from its local up-sweep over the aligned blocks inside its slice
        mine = published[self.rank]
        width = max(len(p) for p in published)
        blocks: dict[tuple[int, int], tuple] = {}
        if width:
            levels, firsts = self.local_up_sweep(leaves, max((j for _, j in mine), default=-1))
            rows = [self.full_step(at(levels[j], (s - firsts[j]) >> j)) for s, j in mine]
            rows += [self.zero_step()] * (width - len(mine))
            stacked = [torch.stack(fields) for fields in zip(*rows)]  # [width, B, *lanes, *field]
            gathered = self.gather(stacked, "tree blocks")
            for q in range(self.world):
                for k, (s, j) in enumerate(published[q]):
                    blocks[(s, j)] = tuple(t[q, k] for t in gathered)

        def block(s: int, j: int):
            if (s, j) not in blocks:
                if s + (1 << j) <= m0:
                    blocks[(s, j)] = self.initial_root(s, j)
                else:
                    half = 1 << (j - 1)
                    blocks[(s, j)] = self.agg(block(s, j - 1), block(s + half, j - 1))
            return blocks[(s, j)]

        def counter(t: int) -> TreeState | None:
            if t == m0:
                return self.inner
            roots, folds = [None] * t.bit_length(), [None] * t.bit_length()
            older = None
            for j in reversed(range(t.bit_length())):
                if not (t >> j) & 1:
                    continue
                end = (t >> j) << j
                if end <= m0:
                    roots[j], folds[j] = self.inner.roots[j], self.inner.folds[j]
                else:
                    roots[j] = block(end - (1 << j), j)
                    folds[j] = roots[j] if older is None else self.agg(older, roots[j])
                older = folds[j]
            return TreeState(count=torch.tensor(t, device=self.call.ctx.dev), roots=tuple(roots), folds=tuple(folds))

        start = counter(self.starts[self.rank])
        final = counter(self.starts[-1]) if self.return_state else None
        if start is None:
            start = TreeState.empty(self.call.ctx.dev)
        if self.return_state and final is None:
            final = TreeState.empty(self.call.ctx.dev)
        return start, final

    def block_owner(self, s: int, j: int) -> int | None:
        """The rank whose leaves hold the whole block [s, s + 2^j), if one does."""
        e = s + (1 << j)
        for r in range(self.world):
            if self.starts[r] <= s and e <= self.starts[r + 1]:
                return r
        return None

    def initial_root(self, s: int, j: int):
        m0 = self.plan.m0
        if not ((m0 >> j) & 1 and ((m0 >> (j + 1)) << (j + 1)) == s):
            raise AssertionError(f"block [{s}, {s + (1 << j)}) is inside the initial state but not one of its roots")
        return self.inner.roots[j]

    def local_up_sweep(self, leaves, top: int):
        """levels[d]: the aligned blocks of 2^d leaves inside [a, b), in order; firsts[d]: the
        global leaf where the first of them starts. One Agg call per level."""
        a, b = self.starts[self.rank], self.starts[self.rank + 1]
        levels, firsts = [leaves], [a]
        for d in range(1, top + 1):
            size = 1 << d
            first = -(-a // size) * size
            count = max(0, (b - first) // size)
            if count == 0:
                break
            below, below_first = levels[-1], firsts[-1]
            offset = (first - below_first) >> (d - 1)
            left = tuple(t[:, offset:offset + 2 * count:2] for t in below)
            right = tuple(t[:, offset + 1:offset + 2 * count:2] for t in below)
            levels.append(self.combine(left, right))
            firsts.append(first)
        return levels, firsts


# ---------------------------------------------------------------------------- varlen (cu_seqlens)
class _Varlen(_Exchanges):
    """cp_group with cu_seqlens (fla's cp varlen convention): every rank passes its slice
    `[1, T_r, ...]` of the packed sequence and the global cu_seqlens. A sequence that lies
    inside one rank runs there alone (as a single-process varlen call runs it); a sequence that
    spans ranks runs as a context-parallel pass of its own (`_Run`), the ranks' pieces of it
    being their slices. Exact scans over tokens exchange all spanning sequences' totals at once
    (at most two per rank: its first and last piece); trees and chunk ops make one pass per
    spanning sequence, in which the ranks holding none of it send only padding (at most W - 1
    sequences span a boundary). With return_state the final states of the sequences that lie
    inside one rank are all-gathered once (every rank returns all N)."""

    def __init__(self, layer, call, state, return_state, group, rank, world, plan: _Plan, grad: bool, bounds):
        self.layer, self.call, self.state, self.return_state = layer, call, state, return_state
        self.group, self.rank, self.world, self.plan, self.grad = group, rank, world, plan, grad
        self.bounds, self.spec = bounds, layer.spec
        offsets = [0]
        for length in plan.lengths:
            offsets.append(offsets[-1] + length)
        self.offsets = offsets
        self.anchors: list[Tensor] = []

    def piece(self, start: int, stop: int):
        """This rank's call restricted to its local tokens [start, stop) (stop == start: none)."""
        call = self.call
        # an input with T = 1 on a slice of several tokens is broadcast over time: every piece takes it whole
        inputs = {n: (x if x.shape[1] == 1 and call.lead[1] != 1 else x[:, start:stop]) for n, x in call.inputs.items()}
        lead = (call.lead[0], stop - start) + tuple(call.lead[2:])
        return dataclasses.replace(call, inputs=inputs, lead=lead)

    def run(self):
        from .layer import _tagged
        layer, call, rank, world = self.layer, self.call, self.rank, self.world
        lo, hi = self.offsets[rank], self.offsets[rank + 1]
        n = len(self.bounds) - 1
        self.pieces: dict[int, tuple] = {}  # local start -> this rank's outputs there
        finals: list = [None] * n
        local_finals: list[tuple[int, object]] = []
        spanning = []
        for i in range(n):
            s, e = self.bounds[i], self.bounds[i + 1]
            lengths = [max(0, min(e, self.offsets[r + 1]) - max(s, self.offsets[r])) for r in range(world)]
            holders = [r for r in range(world) if lengths[r]]
            row = _row_state(self.state, i)
            if len(holders) > 1:
                spanning.append((i, lengths, row))
            elif holders[0] == rank:  # inside this rank: it runs the sequence alone
                result, new_state = layer._forward_local(self.piece(s - lo, e - lo), row, self.return_state)
                self.pieces[s - lo] = result if isinstance(result, tuple) else (result,)
                if self.return_state:
                    local_finals.append((i, new_state))
        parts = [self.part(i, lengths, row) for i, lengths, row in spanning]
        # exact token ops: one exchange for all (exact_spanning); else one pass each (one_pass_each)
        new_states = layer._strategy.context_parallel_spanning(self, parts)
        if self.return_state:
            for (i, _, _), new_state in zip(spanning, new_states):
                finals[i] = _tagged(new_state, call.tag)
            for i, new_state in self.gather_states(local_finals):
                finals[i] = new_state
        outputs = tuple(torch.cat(parts, dim=1) for parts in zip(*(self.pieces[k] for k in sorted(self.pieces))))
        outputs = tuple(_tie(o, self.anchors) for o in outputs)
        result = outputs[0] if len(outputs) == 1 else outputs
        if not self.return_state:
            return result
        anchors = self.anchors
        new_state = layer._packed_state([f._map(lambda t: _tie(t, anchors)) for f in finals])
        return result, new_state

    def part(self, i: int, lengths: list, row) -> "_Run":
        """Sequence i's context-parallel pass: the ranks' pieces of it are their slices."""
        lo, hi = self.offsets[self.rank], self.offsets[self.rank + 1]
        s, e = self.bounds[i], self.bounds[i + 1]
        m0, s0 = _state_counts(row)
        plan = _Plan(lengths=lengths, has_state=row is not None, m0=m0, s0=s0, return_state=self.return_state)
        start, stop = min(max(s, lo), hi) - lo, max(min(e, hi), lo) - lo
        part = _Run(self.layer, self.piece(start, stop), row, self.return_state, self.group, self.rank, self.world,
                    plan, self.grad)
        part.raw, part.local_start, part.sequence = True, start, (s, e)
        return part

    def keep(self, part: "_Run", outputs):
        from .layer import _in_dtype
        if outputs is not None:
            self.layer._check_outputs(outputs, part.call)
            self.pieces[part.local_start] = _in_dtype(outputs, self.call)

    def one_pass_each(self, parts: list) -> list:
        """Trees and chunk ops: one context-parallel pass per spanning sequence, in order."""
        new_states = []
        for part in parts:
            part.anchors = self.anchors
            outputs, new_state = part.run()
            self.anchors = part.anchors
            self.keep(part, outputs)
            new_states.append(new_state)
        return new_states

    def exact_spanning(self, parts: list) -> list:
        """Exact scans over tokens: the spanning sequences' totals in ONE exchange. A spanning
        sequence holds a rank's first or its last piece (or its whole slice), so a rank holds at
        most two pieces of spanning sequences; each rank sends their totals in that order, padded
        to the most any rank holds (1 or 2 state slots per rank however many sequences span),
        and every rank folds each spanning sequence's carries from its holders' slots."""
        if not parts:
            return []
        world = self.world
        held = [[k for k, part in enumerate(parts) if part.plan.lengths[q]] for q in range(world)]
        width = max(len(h) for h in held)
        passes, slots = {}, []
        for k in held[self.rank]:
            passes[k] = parts[k].exact_pass()
            slots.append(next(passes[k]))
        zero = parts[0].zero_step()
        slots += [zero] * (width - len(slots))
        gathered = self.gather([torch.stack([slot[f] for slot in slots]) for f in range(len(zero))], "totals")
        new_states = []
        for k, part in enumerate(parts):
            totals = [tuple(t[q, held[q].index(k)] for t in gathered) if k in held[q] else None for q in range(world)]
            start, final = part.carries_from(totals)
            if k in passes:
                self.keep(part, _resume(passes[k], (start, final)))
            new_states.append(_stream_state(self.layer, final))
        return new_states

    def gather_states(self, mine: list) -> list:
        """Every rank's (sequence index, final state) pairs, on every rank. The states' layout
        (a small picklable skeleton with shapes and dtypes) goes by all_gather_object, their
        tensors in one differentiable all-gather of floats (and one of integers, if any)."""
        float_dtype = self.call.ctx.dt["f32"]
        tensors: list[Tensor] = []
        skeleton = [(i, _skeleton(st, tensors)) for i, st in mine]
        meta = [(tuple(t.shape), str(t.dtype).removeprefix("torch."), t.is_floating_point()) for t in tensors]
        layouts = [None] * self.world
        dist.all_gather_object(layouts, (skeleton, meta), group=self.group)
        floats = [sum(math.prod(shape) for shape, _, f in m if f) for _, m in layouts]
        ints = [sum(math.prod(shape) for shape, _, f in m if not f) for _, m in layouts]
        dev = self.call.ctx.dev

        def flat(want_float: bool, width: int, dtype) -> Tensor:
            parts = [t.reshape(-1).to(dtype) for t in tensors if t.is_floating_point() == want_float]
            parts.append(torch.zeros(width - sum(p.numel() for p in parts), dtype=dtype, device=dev))
            return torch.cat(parts)

        if not max(floats) and not max(ints):  # no rank holds a whole sequence with a state
            return []
        wires = [flat(True, max(floats), float_dtype)]
        if max(ints):
            wires.append(flat(False, max(ints), torch.int64))
        gathered = self.gather(wires, "final states")
        out = []
        for q, (skel, m) in enumerate(layouts):
            cursor = {True: 0, False: 0}
            rebuilt = []
            for shape, dtype, floating in m:
                size = math.prod(shape)
                source = gathered[0] if floating else gathered[1]
                piece = source[q, cursor[floating]:cursor[floating] + size]
                cursor[floating] += size
                rebuilt.append(piece.reshape(shape).to(getattr(torch, dtype)))
            out += [(i, _unskeleton(sk, rebuilt)) for i, sk in skel]
        return out


def _check_global_cu_seqlens(op: str, cu, call) -> list:
    """The global offsets as Python ints; their end is checked against the ranks' slices later."""
    from .varlen import cu_seqlens_bounds
    bounds = cu_seqlens_bounds(op, cu)
    if call.lead[0] != 1:
        raise ValueError(f"{op}: with cu_seqlens each rank passes its slice of the packed sequence as [1, T_r, ...]; "
                         f"got batch size {call.lead[0]}")
    return bounds


def _batch_rows(state) -> int:
    return state.batch_size


def _row_state(state, i: int):
    """Row i of a per-sequence initial state (None: no state, or an empty one)."""
    if state is None or _batch_rows(state) == 0:
        return None
    from .batch import RaggedState
    row = state[i]
    return row.row_states[0] if isinstance(row, RaggedState) else row


def _state_classes() -> dict:
    from .batch import RaggedState
    return {c.__name__: c for c in (ScanState, TreeState, ChunkStream, RaggedState)}


def _skeleton(value, tensors: list):
    """value with every tensor replaced by its index in `tensors` (appended), picklable."""
    if isinstance(value, Tensor):
        tensors.append(value)
        return ("T", len(tensors) - 1)
    if isinstance(value, StreamState):
        return ("S", type(value).__name__,
                tuple((f.name, _skeleton(getattr(value, f.name), tensors)) for f in dataclasses.fields(value)))
    if isinstance(value, tuple):
        return ("t", tuple(_skeleton(v, tensors) for v in value))
    if isinstance(value, dict):
        return ("d", tuple((k, _skeleton(v, tensors)) for k, v in value.items()))
    return ("v", value)


def _unskeleton(skeleton, tensors: list):
    kind, *rest = skeleton
    if kind == "T":
        return tensors[rest[0]]
    if kind == "S":
        name, fields = rest
        return _state_classes()[name](**{k: _unskeleton(v, tensors) for k, v in fields})
    if kind == "t":
        return tuple(_unskeleton(v, tensors) for v in rest[0])
    if kind == "d":
        return {k: _unskeleton(v, tensors) for k, v in rest[0]}
    return rest[0]


def _resume(generator, value):
    """Send `value` into a generator that then returns: its return value."""
    try:
        generator.send(value)
    except StopIteration as stop:
        return stop.value
    raise AssertionError("the generator yielded twice")


def _stream_state(layer, state):
    """A state in the layout the op's streams use (fields dead in a stream None or dropped)."""
    if isinstance(state, ScanState) and state.prefix is not None and hasattr(layer, "_without_dead"):
        state = ScanState(prefix=layer._without_dead(state.prefix), count=state.count)
    return layer._stream_state(state) if hasattr(layer, "_stream_state") else state


def _field_shape(field, dims: dict) -> tuple:
    return tuple(int(s) for s in field.shape(dims))


def _chunk_stream(inner, tokens: dict, C: int) -> ChunkStream:
    """A chunk stream whose partial chunk holds `tokens[name]` ([B, n, ...], n < C)."""
    buffer = {}
    for name, t in tokens.items():
        pad = t.new_zeros((t.shape[0], C - t.shape[1]) + tuple(t.shape[2:]))
        buffer[name] = torch.cat([t, pad], dim=1)
    count = next(iter(tokens.values())).shape[1]
    device = next(iter(buffer.values())).device
    return ChunkStream(inner=inner, buffer=buffer, filled=torch.tensor(count, device=device))


__all__ = ["ContextParallelError", "SCHEMES", "SENT_BYTES", "TIMEOUT_S", "forward"]
