"""The op-independent half of the Triton backend: choosing it, laying tensors out for the
generated kernels (psmc.codegen.triton_printer), launching them and rebuilding stream states.

Kernel layout: every per-token tensor is seen as [B, T, L, S'] (lanes flattened to L; S' is
the value's one declared axis, 1 for scalars) and passed as a pointer plus strides, so
broadcast inputs (a size-1 batch, lane or state axis) are stride-0 views, never copies. Stream
states are contiguous [B, L, *declared] tensors. Each value has a role (the declared axes it
spans): '' a scalar, 'r' the state axis S (the rows R of a matrix state), 'c' the columns C of
a matrix state, 'rc' the matrix. The tile models (`_Geometry.tile`): 'lanes' (a block of lanes
per program, block scan over time), 'state' (a block of lanes x the state axis per program,
time walked token by token) and 'matrix' (one lane's [R, C] state per program, token by token).
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from typing import Callable

import torch

from . import autotune, triton_abi
from .custom_ops import traced
from .ops import torch_dtypes
from .state import ScanState

DEFAULT_BLOCK_T = 32  # [32, 64] lane tiles: about 8 values per thread at 8 warps, no spills (AOT table)
# the token loops (state and matrix tiles): the backward's scratch holds BLOCK_T prefixes of
# the tile per program
DEFAULT_MATRIX_BLOCK_T = 16
MAX_BLOCK_C = 64  # columns per program when the tile needs not hold the whole state axis
# the state tile: at most this many elements ([BLOCK_R lanes, BLOCK_C]) and lanes per program,
# and at least this many programs while a program keeps 16 lanes or more (two per SM of a
# 132-SM GPU: a guess until a GPU measures it; docs/triton.md)
STATE_TILE_ELEMENTS, STATE_MAX_LANES, STATE_MIN_PROGRAMS = 1024, 64, 256

# Set by psmc.triton_aot while it records launches: kernels are captured, not run, so the
# Triton paths accept CPU tensors (nothing else changes: the launch configurations are real).
RECORDING = False

_KERNEL_DTYPES = {"f32": torch.float32, "i32": torch.int32, "i64": torch.int64, "bool": torch.bool}


@dataclass(frozen=True)
class TritonKernels:
    """What the generated module registers on a layer class as `_triton_kernels`."""

    forward: object
    step: object
    backward: object
    mode: str  # 'lanes' | 'state'
    axis: Callable[[dict], int] | None  # the state axis S from the dims; None in lanes mode
    full_tile: bool
    inputs: tuple
    input_ranks: tuple
    input_dtypes: tuple
    params: tuple
    field_ranks: tuple
    field_dtypes: tuple
    output_ranks: tuple
    output_dtypes: tuple
    dims: tuple
    cols: Callable[[dict], int] | None = None  # matrix mode: the column axis C from the dims
    input_roles: tuple = ()
    param_roles: tuple = ()
    field_roles: tuple = ()
    output_roles: tuple = ()
    # the forward kernel's module and name, unique per generated module (content-hashed): what
    # the custom ops below look the kernels up by (KERNEL_SETS)
    name: str = dataclasses.field(init=False, default="")

    def __post_init__(self):
        fn = getattr(self.forward, "fn", self.forward)
        object.__setattr__(self, "name", f"{fn.__module__}.{fn.__qualname__}")
        KERNEL_SETS[self.name] = self


# Every registered kernel set by name: a torch custom op takes plain values, so the ops below
# name their kernels by a string and find them here.
KERNEL_SETS: dict[str, TritonKernels] = {}


@dataclass(frozen=True)
class _Dims:
    """A call's context as a launch reads it (psmc.runtime.layer.Ctx): dims, device, dtypes."""
    d: dict
    dev: torch.device
    dt: dict


@dataclass(frozen=True)
class LaunchCall:
    """What a launch reads of a layer call (psmc.runtime.layer._Call: `ctx.d`, `ctx.dev`,
    `ctx.dt`, `out_dtype`), rebuilt from the custom ops' plain arguments."""
    ctx: _Dims
    out_dtype: torch.dtype | None


def _launch_call(k: TritonKernels, device, dims: list[int], out_dtype) -> LaunchCall:
    # (the kernels compute in fp32: float64 calls never reach them, `unusable_reason`)
    return LaunchCall(_Dims(dict(zip(k.dims, dims)), device, torch_dtypes(torch.float32)), out_dtype)


def _interpreted(kernel) -> bool:
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:
        return False
    return isinstance(kernel, InterpretedFunction)


def _grad_needed(layer, call) -> bool:
    if not torch.is_grad_enabled():
        return False
    return any(x.requires_grad for x in _given_inputs(layer._triton_kernels, call)) or \
        any(p.requires_grad for p in layer.parameters())


def _given_inputs(k, call) -> list:
    """The kernels' inputs in the order they take them. A bf16/fp16 input declared f32 is passed
    as given (`call.half`): every kernel load widens a float to fp32 (`.to(tl.float32)`), which
    is the value the layer's cast would give, so the float32 copy is never made (`_Inputs`
    casts only what is read) and HBM holds the half-precision tensor only."""
    half = call.half or {}
    return [half[name] if name in half and dtype == "f32" else call.inputs[name]
            for name, dtype in zip(k.inputs, k.input_dtypes)]


def unusable_reason(layer, call) -> str | None:
    """Why this call cannot run the Triton kernels, or None when it can."""
    kernels = getattr(layer, "_triton_kernels", None)
    if kernels is None:
        return "its plan has no Triton kernels (see `psmc check`)"
    if call.ctx.dev.type == "cpu" and not _interpreted(kernels.forward) and not RECORDING:
        return ("the inputs are CPU tensors: Triton needs CUDA tensors, or TRITON_INTERPRET=1 set before the "
                "generated module is imported (the interpreter, for tests)")
    if call.ctx.dev.type not in ("cpu", "cuda"):
        return f"the inputs are on {call.ctx.dev.type}: Triton kernels need CUDA tensors"
    if call.ctx.dt["f32"] == torch.float64:
        return "float64 inputs or params: the kernels accumulate in fp32"
    if call.lead[0] > MAX_GRID_BATCH:
        return f"a batch of {call.lead[0]:,} rows: the kernels' batch grid axis holds at most {MAX_GRID_BATCH:,}"
    if largest_tensor(layer, call) >= INT32_ELEMENTS:
        return (f"a tensor of this call holds {largest_tensor(layer, call):,} elements: the generated kernels "
                "index in 32 bits (up to 2**31 - 1)")
    return None


INT32_ELEMENTS = 2 ** 31
MAX_GRID_BATCH = 65_535  # the batch is grid axis 1 or 2 (lanes take axis 0, which holds 2**31 - 1)


def largest_tensor(layer, call) -> int:
    """An upper bound on the elements of any tensor a kernel of this call indexes: the inputs
    (as broadcast), and per token of every batch row and lane the largest declared field or
    output (the outputs, the saved carries and the backward's gradients are no larger)."""
    per_token = 1  # a plain loop: torch.compile traces no max(..., default=)
    for slot in (*layer.spec.fields, *layer.spec.outputs, *layer.spec.inputs):
        size = 1
        for s in slot.shape(call.ctx.d):
            size *= int(s)
        per_token = size if size > per_token else per_token
    lead = 1
    for n in call.lead:
        lead *= int(n)
    return lead * per_token


def use_triton(layer, call) -> bool:
    """Whether the forward pass of this call runs a Triton kernel (psmc.runtime.dispatch chooses:
    backend='auto' by cost, Triton only for CUDA tensors; 'triton': Triton or a clear error)."""
    from . import dispatch
    return dispatch.choose(layer, call, "forward").triton


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


@dataclass(frozen=True)
class _Geometry:
    B: int
    T: int
    lanes: tuple
    L: int
    S: int
    block_c: int
    grid: tuple
    C: int = 1  # matrix mode: the columns (S is then the rows)
    block_r: int = 1  # rows per program: the matrix's rows R, or the state tile's lanes
    tile: str = "lanes"  # the tile model (psmc.runtime.triton_abi.TILES)
    # packed sequences: B of them (programs, states) in one batch row of `tokens` tokens, T
    # the longest; `cu` the offsets on the device (int32). tokens = 0: B rows of T tokens
    tokens: int = 0
    cu: object = None

    @property
    def matrix(self) -> bool:
        return self.tile == "matrix"

    def time_lead(self) -> tuple:
        """The leading axes of a per-token tensor: [B, T], or [1, tokens] when packed."""
        return (1, self.tokens) if self.tokens else (self.B, self.T)

    def extent(self, role: str) -> tuple:
        """The declared shape of a value with this role."""
        return tuple({"r": self.S, "c": self.C}[a] for a in role)

    def sizes(self, start: int) -> list:
        """The kernel's size arguments: T, L, S (SR, SC in matrix mode), start."""
        return [self.T, self.L, self.S] + ([self.C] if self.matrix else []) + [start]

    def blocks(self) -> dict:
        return {"BLOCK_C": self.block_c, **({"BLOCK_R": self.block_r} if self.tile != "lanes" else {})}

    def num_warps(self, block_t: int, backward: bool = False) -> int:
        """Warps per program from the register tile: a token loop's forward or step (matrix and
        state tiles) holds [BLOCK_R, BLOCK_C] tiles (about 1024 elements per warp, at most 8
        warps, so a thread may use up to 255 registers), its backward several whole-row tiles
        (512 per warp, up to 16), a block scan [BLOCK_T, BLOCK_C] ones (about 256, at most 8
        warps): docs/triton.md's AOT table shows the registers and spills that result."""
        if self.tile != "lanes":  # the backward holds several whole-row tiles: more warps, fewer registers each
            per_warp, most = (512, 16) if backward else (1024, 8)
            return max(4, min(most, _pow2(self.block_r * self.block_c // per_warp)))
        # a block scan keeps several [BLOCK_T, BLOCK_C] values (lifted, scanned, carried) live;
        # more than 8 warps caps a thread at 128 (or fewer) registers, and they spill
        return max(4, min(8, _pow2(block_t * self.block_c // 256)))

    def warp_choices(self, block_t: int, backward: bool = False) -> tuple:
        """The autotuner's candidates (psmc.runtime.autotune): the static choice above, then
        twice its warps (half the values per thread, twice the loads in flight per program)
        while every thread keeps a value of the tile and a program has at most 8 warps (16 in a
        token loop's backward, whose static choice goes there too): at 16 a forward thread is
        held to 64-128 registers and the AOT test saw spills (block scans on sm_90, rwkv6's
        token loop on sm_80)."""
        warps = self.num_warps(block_t, backward)
        elements = self.block_r * self.block_c if self.tile != "lanes" else block_t * self.block_c
        most = 16 if self.tile != "lanes" and backward else 8
        return (warps,) + ((2 * warps,) if 2 * warps <= most and elements >= 2 * warps * 32 else ())

    def launch_choices(self, block_t: int, kind: str) -> tuple:
        """The autotuner's candidates as (lanes per program, warps) pairs, the static choice
        first: the warps of `warp_choices`; a state tile's forward also half and twice its
        lanes per program, each at its own warps (`state_lanes` guesses a floor of programs per
        GPU: the tuner measures it). Its saved carries are indexed by the global lane, so the
        backward keeps its own tiling whatever the forward ran."""
        if kind == "step":
            return ((self.block_r, self.num_warps(1)),)
        choices = tuple((self.block_r, w) for w in self.warp_choices(block_t, kind == "backward"))
        if kind == "forward" and self.tile == "state":
            for lanes in (self.block_r // 2, self.block_r * 2):
                if 1 <= lanes <= most_lanes(self.L, self.block_c):
                    choices += ((lanes, self.with_lanes(lanes).num_warps(block_t)),)
        return choices

    def with_lanes(self, lanes: int) -> "_Geometry":
        """This state tile with `lanes` lanes per program (the grid's lane tiles follow)."""
        return dataclasses.replace(self, block_r=lanes, grid=(triton_cdiv(self.L, lanes),) + self.grid[1:])


def _geometry(kernels: TritonKernels, call, lead: tuple, T: int, whole_axis: bool = False) -> _Geometry:
    """whole_axis: one program holds all of S (the backward sums a rank-0 field's adjoint over
    S, so a pass that will be differentiated is tiled the same way)."""
    B, lanes = lead[0], tuple(lead[2:]) if T else tuple(lead[1:])
    L = math.prod(lanes)
    if kernels.mode == "lanes":
        block_c = min(_pow2(L), MAX_BLOCK_C)
        return _Geometry(B, T, lanes, L, 1, block_c, (triton_cdiv(L, block_c), B))
    S = int(kernels.axis(call.ctx.d))
    if kernels.mode == "matrix":  # all rows per program, the columns tiled
        C = int(kernels.cols(call.ctx.d))
        block_c = _pow2(C) if kernels.full_tile or whole_axis else min(_pow2(C), MAX_BLOCK_C)
        return _Geometry(B, T, lanes, L, S, block_c, (L, triton_cdiv(C, block_c), B), C, _pow2(S), "matrix")
    block_c = _pow2(S) if kernels.full_tile or whole_axis else min(_pow2(S), MAX_BLOCK_C)
    col_tiles = triton_cdiv(S, block_c)
    block_r = state_lanes(L, block_c, B * col_tiles)
    return _Geometry(B, T, lanes, L, S, block_c, (triton_cdiv(L, block_r), col_tiles, B), block_r=block_r,
                     tile="state")


def most_lanes(L: int, block_c: int) -> int:
    """The most lanes a state tile of `block_c` columns holds: no more than L needs, at most
    STATE_MAX_LANES (128 for a tile of one column, a scalar state's: a lane per thread at 4
    warps) and STATE_TILE_ELEMENTS elements."""
    return min(_pow2(L), max(STATE_MAX_LANES, 128 // block_c), STATE_TILE_ELEMENTS // block_c)


def state_lanes(L: int, block_c: int, others: int) -> int:
    """Lanes per program of a state tile: a power of two up to STATE_MAX_LANES with the tile at
    most STATE_TILE_ELEMENTS, halved (down to 16) while fewer than STATE_MIN_PROGRAMS programs
    would run (`others`: programs per lane tile, i.e. batch x column tiles)."""
    lanes = max(1, most_lanes(L, block_c))
    while lanes > 16 and others * triton_cdiv(L, lanes) < STATE_MIN_PROGRAMS:
        lanes //= 2
    return lanes


def _forward_tiles(kernels: TritonKernels, g: _Geometry) -> _Geometry:
    """The forward of a differentiated matrix pass may still tile the columns: its saved
    carries are indexed by the global column, so the backward (which holds whole rows of
    columns) reads them whatever the forward's tiling; a [K, V] tile of 128 x 128 would not fit
    in registers. Other modes keep the backward's tiling (a rank-0 field's adjoint sums over S)."""
    if not g.matrix or kernels.full_tile:
        return g
    block_c = min(_pow2(g.C), MAX_BLOCK_C)
    return dataclasses.replace(g, block_c=block_c, grid=(g.L, triton_cdiv(g.C, block_c), g.B))


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def roles(k: TritonKernels, kind: str) -> tuple:
    """The roles of the inputs / params / fields / outputs (from the ranks for kernels
    registered before roles were)."""
    given = getattr(k, kind + "_roles")
    if given:
        return given
    ranks = {"input": k.input_ranks, "field": k.field_ranks, "output": k.output_ranks}.get(kind)
    return tuple("r" if r else "" for r in ranks) if ranks is not None else ()


def _as_tile(x: torch.Tensor, g: _Geometry, role: str, time: bool) -> tuple:
    """x [B?, (T,) *lanes?, *declared] → a [B, (T,) L, S'] view and its strides (S' = 1 and
    stride 0 for scalars, so one offset formula serves both)."""
    rank = len(role)
    lead = g.time_lead() if time else (g.B,)
    declared = tuple(x.shape[x.dim() - rank:]) if rank else ()
    x = x.expand(*lead, *g.lanes, *declared)
    x = x.reshape(*lead, g.L, *(declared if rank else (1,)))
    strides = list(x.stride())
    if not rank:
        strides[-1] = 0
    return x, strides


def _state_tensor(t: torch.Tensor, g: _Geometry, role: str, dtype) -> torch.Tensor:
    rank = len(role)
    declared = tuple(t.shape[t.dim() - rank:]) if rank else ()
    t = t.expand(g.B, *g.lanes, *declared).to(dtype)
    return t.reshape(g.B, g.L, *(declared if rank else ())).contiguous()


def _field_dtype(dtype: str):
    return _KERNEL_DTYPES.get(dtype, torch.float32)


def _named(names: tuple, values: list) -> dict:
    assert len(names) == len(values), (names, len(values))
    return dict(zip(names, values))


def _input_args(tensors, roles_, g: _Geometry, time: bool, kind: str = "in") -> dict:
    """Per-token tensors as [B, (T,) L, S'] views, each with its strides, by name."""
    args = {}
    for i, (x, role) in enumerate(zip(tensors, roles_)):
        x, strides = _as_tile(x, g, role, time)
        args.update(_named(triton_abi.value(kind, i, time), [x, *strides]))
    return args


def _param_args(params, per_lane: list[bool], lanes: int = 1) -> dict:
    """Each param (contiguous) with its lane stride: 0 when the lanes share it, its slice size
    (numel / lanes) when it holds one slice per lane (the layer's per-lane params,
    `[*lanes, *declared]`)."""
    args = {}
    for i, (p, sliced) in enumerate(zip(params, per_lane)):
        p = p.detach()
        lane_stride = p.numel() // lanes if sliced else 0
        args.update(_named(triton_abi.param(i), [p.contiguous().to(torch.float32) if p.is_floating_point()
                                                 else p.contiguous(), lane_stride, p.stride(-1) if p.dim() else 0]))
    return args


def _per_lane_args(kind: str, tensors) -> dict:
    return {f"{kind}{i}": t for i, t in enumerate(tensors)}


def _size_args(g: _Geometry, k, call, start: int, n_blocks: int | None) -> dict:
    time = n_blocks is not None
    args = _named(triton_abi.sizes(g.tile, time), g.sizes(start) + ([n_blocks] if time else []))
    if time:  # (None when not packed: the kernel never reads it)
        args.update(cu=g.cu, VARLEN=g.cu is not None)
    args.update({triton_abi.dim(d): int(call.ctx.d[d]) for d in k.dims})
    return args


def _run(kernel, kind: str, g: _Geometry, k, args: dict, block_t: int):
    """Launch `kernel` by name, after checking the names are exactly its arguments, with the
    (lanes per program, warps) the autotuner keeps for this shape (`_Geometry.launch_choices`)."""
    triton_abi.check(args, kind, g.tile, len(k.inputs), len(k.params), len(k.field_dtypes), len(k.output_dtypes),
                     tuple(k.dims))
    choices = g.launch_choices(block_t, kind)

    def launch(choice):
        lanes, warps = choice
        if lanes == g.block_r:
            kernel[g.grid](**args, num_warps=warps)
        else:
            tile = g.with_lanes(lanes)
            kernel[tile.grid](**{**args, **tile.blocks()}, num_warps=warps)
    if len(choices) == 1:  # nothing to tune (a decode step): no key to build
        launch(choices[0])
        return
    device = next(v.device for v in args.values() if isinstance(v, torch.Tensor))
    autotune.launch(_tuning_key(kernel, kind, g, args), choices, launch, device)


def _tuning_key(kernel, kind: str, g: _Geometry, args: dict) -> tuple:
    """What a launch's best (lanes, warps) depend on: the kernel and its constexprs, the dims,
    the tensors' dtypes and devices, and the grid and the length to powers of two (so packed
    batches of other sizes share a choice)."""
    constants = tuple((n, v) for n, v in args.items()
                      if not isinstance(v, torch.Tensor) and (n.isupper() or n.startswith("d_")))
    dtypes = tuple((v.dtype, v.device) for v in args.values() if isinstance(v, torch.Tensor))
    return (kernel, kind, g.tile, tuple(autotune.bucket(n) for n in g.grid), autotune.bucket(g.T, autotune.LONG), g.tokens > 0,
            constants, dtypes)


def _per_token(g: _Geometry, role: str, dtype, dev, time: bool, lanes: int | None = None) -> tuple:
    """An empty [B, (T,) L, S'] tensor and its strides (stride 0 over S' for scalars); `lanes`
    in place of L (the lane tiles of an adjoint summed per tile)."""
    lead = g.time_lead() if time else (g.B,)
    t = torch.empty(*lead, lanes or g.L, *(g.extent(role) or (1,)), device=dev, dtype=dtype)
    strides = list(t.stride())
    if not role:
        strides[-1] = 0
    return t, strides


def _per_lane(g: _Geometry, role: str, dtype, dev, extra: tuple = ()) -> torch.Tensor:
    return torch.empty(g.B, g.L, *extra, *g.extent(role), device=dev, dtype=dtype)


def _launch(k: TritonKernels, per_lane: list[bool], call, kernel, g: _Geometry, inputs, params, state_prefix,
            start: int, time: bool, block_t: int, save: bool = False, run: bool = True):
    """Run the forward (time=True) or step kernel: (outputs, finals, boundaries). run=False
    allocates what it would write and launches nothing (the custom ops' fakes)."""
    args, outputs, finals, bounds = _launch_args(k, per_lane, call, g, inputs, params, state_prefix, start, time,
                                                 block_t, save)
    if run:
        _run(kernel, "forward" if time else "step", g, k, args, block_t)
    return outputs, finals, bounds


def _launch_args(k: TritonKernels, per_lane: list[bool], call, g: _Geometry, inputs, params, state_prefix,
                 start: int, time: bool, block_t: int, save: bool = False):
    """The forward or step kernel's arguments by name, and what it writes: (args, outputs,
    finals, boundaries). per_lane: whether each param holds one slice per lane."""
    dev = call.ctx.dev
    args = {**_input_args(inputs, roles(k, "input"), g, time), **_param_args(params, per_lane, g.L)}
    args.update(_per_lane_args("ini", [
        _state_tensor(state_prefix[i], g, role, _field_dtype(dtype)) if state_prefix is not None
        else torch.empty(0, device=dev, dtype=_field_dtype(dtype))
        for i, (role, dtype) in enumerate(zip(roles(k, "field"), k.field_dtypes))]))
    outputs = []
    for i, (role, dtype) in enumerate(zip(roles(k, "output"), k.output_dtypes)):
        out, strides = _per_token(g, role, _output_dtype(call, dtype), dev, time)
        args.update(_named(triton_abi.value("out", i, time), [out, *strides]))
        outputs.append((out, role))
    finals = [(_per_lane(g, role, _field_dtype(dtype), dev), role)
              for role, dtype in zip(roles(k, "field"), k.field_dtypes)]
    args.update(_per_lane_args("fin", [f for f, _ in finals]))
    n_blocks = triton_cdiv(g.T, block_t) if time else 0
    bounds = []
    if time:
        bounds = [_per_lane(g, role, _field_dtype(dtype), dev, (n_blocks,)) if save else
                  torch.empty(0, device=dev, dtype=_field_dtype(dtype))
                  for role, dtype in zip(roles(k, "field"), k.field_dtypes)]
        args.update(_per_lane_args("bnd", bounds))
    args.update(_size_args(g, k, call, start, n_blocks if time else None))
    args.update(HAS_INIT=state_prefix is not None, BLOCK_T=block_t, **g.blocks(), **({"SAVE": save} if time else {}))
    return args, outputs, finals, bounds


def _output_dtype(call, dtype: str) -> torch.dtype:
    """What a kernel writes an output in: an f32 output of a call with bf16/fp16 inputs in that
    dtype (the stores round the fp32 value once, as the layer's cast would; one pass less),
    else the declared dtype as the call computes it."""
    if dtype == "f32" and call.out_dtype is not None:
        return call.out_dtype
    return call.ctx.dt[dtype] if dtype in call.ctx.dt else torch.float32


def _unflatten(t: torch.Tensor, g: _Geometry, role: str, time: bool) -> torch.Tensor:
    lead = g.time_lead() if time else (g.B,)
    return t.reshape(*lead, *g.lanes, *g.extent(role))


def _is_float(dtype: str) -> bool:
    return dtype in ("f16", "bf16", "f32", "f64")


def _geometry_of(k: TritonKernels, call, lead: list[int], time: bool, whole_axis: bool, bounds: list[int] | None,
                 save: bool) -> _Geometry:
    """A launch's tiling from plain values: `lead` [B, (T,) *lanes] (packed: [N, longest, *lanes]
    with `bounds` the N + 1 offsets), whole_axis as in `_geometry`; a pass that saves its
    carries for the backward may tile a matrix's columns (`_forward_tiles`)."""
    if not time:
        return _geometry(k, call, tuple(lead), 0)
    g = _geometry(k, call, tuple(lead), lead[1], whole_axis=whole_axis)
    if bounds is not None:
        g = dataclasses.replace(g, tokens=bounds[-1],
                                cu=torch.tensor(bounds, dtype=torch.int32, device=call.ctx.dev))
    return _forward_tiles(k, g) if save else g


def _scan_tensors(kernels: str, time: bool, inputs: list[torch.Tensor], params: list[torch.Tensor],
                  prefix: list[torch.Tensor], dims: list[int], lead: list[int], per_lane: list[bool], block_t: int,
                  start: int, whole_axis: bool, save: bool, out_dtype: torch.dtype | None,
                  bounds: list[int] | None, run: bool = True) -> list[torch.Tensor]:
    """The forward (time=True) or step kernel of the kernel set named `kernels` on plain values:
    [*outputs, *finals, *saved carries] as the kernels' [B, (T,) L, S'] tiles (the carries only
    when `save`). prefix: the entering state's fields, or empty; dims: the op's dims in the
    order of `TritonKernels.dims`; start: the stream position (ops that read `index`)."""
    k = KERNEL_SETS[kernels]
    call = _launch_call(k, inputs[0].device, dims, out_dtype)
    g = _geometry_of(k, call, lead, time, whole_axis, bounds, save)
    outputs, finals, carries = _launch(k, per_lane, call, k.forward if time else k.step, g, inputs, params,
                                       prefix or None, start, time, block_t, save, run)
    return [o for o, _ in outputs] + [f for f, _ in finals] + list(carries)


# (the ops' signatures: what `_scan_tensors` takes without its `run`, which only the fakes set)
def _launch_scan(kernels: str, time: bool, inputs: list[torch.Tensor], params: list[torch.Tensor],
                 prefix: list[torch.Tensor], dims: list[int], lead: list[int], per_lane: list[bool], block_t: int,
                 start: int, whole_axis: bool, save: bool, out_dtype: torch.dtype | None,
                 bounds: list[int] | None) -> list[torch.Tensor]:
    return _scan_tensors(kernels, time, inputs, params, prefix, dims, lead, per_lane, block_t, start, whole_axis,
                         save, out_dtype, bounds)


def _placeholder(x: torch.Tensor) -> torch.Tensor:
    """What the backward op returns for an adjoint that is None (an op returns no None)."""
    return x.new_empty(0, dtype=torch.float32)


def _backward_tensors(kernels: str, inputs: list[torch.Tensor], params: list[torch.Tensor],
                      prefix: list[torch.Tensor], carries: list[torch.Tensor], out_grads: list[torch.Tensor | None],
                      fin_grads: list[torch.Tensor | None], dims: list[int], lead: list[int], per_lane: list[bool],
                      block_t: int, start: int, bounds: list[int] | None, run: bool = True) -> list[torch.Tensor]:
    """The generated backward kernel of a differentiated forward pass (`_scan_tensors` with
    whole_axis and save): the adjoints of the inputs, the params and the entering state's
    fields (when given), each in its value's shape and dtype; an integer value's is
    `_placeholder`."""
    k = KERNEL_SETS[kernels]
    dev = inputs[0].device
    call = _launch_call(k, dev, dims, None)
    g = _geometry_of(k, call, lead, True, True, bounds, False)
    has_init = bool(prefix)
    f32 = torch.float32
    args = {**_input_args(inputs, roles(k, "input"), g, True), **_param_args(params, per_lane, g.L)}
    args.update(_per_lane_args("ini", [
        _state_tensor(prefix[i], g, role, _field_dtype(dtype)) if has_init
        else torch.empty(0, device=dev, dtype=_field_dtype(dtype))
        for i, (role, dtype) in enumerate(zip(roles(k, "field"), k.field_dtypes))]))
    args.update(_per_lane_args("bnd", carries))
    for i, (grad, role) in enumerate(zip(out_grads, roles(k, "output"))):
        if grad is None or not grad.is_floating_point():
            grad = torch.zeros((), device=dev, dtype=f32)
        grad, strides = _as_tile(grad.expand(*_lead(g, True), *g.extent(role)), g, role, True)
        args.update(_named(triton_abi.value("dout", i, True), [grad, *strides]))
    has_dfin = any(gr is not None for gr, dt in zip(fin_grads, k.field_dtypes) if _is_float(dt))
    dfin = []
    for grad, role, dtype in zip(fin_grads, roles(k, "field"), k.field_dtypes):
        if has_dfin and _is_float(dtype):
            grad = grad if grad is not None else torch.zeros((), device=dev, dtype=f32)
            dfin.append(_state_tensor(grad, g, role, f32))
        else:
            dfin.append(torch.empty(0, device=dev, dtype=f32))
    args.update(_per_lane_args("dfin", dfin))
    din, lane_sum, time_sum = [], 0, 0
    for i, role in enumerate(roles(k, "input")):
        shared, constant = _broadcast(inputs[i], g, role) if g.tile == "state" else (False, False)
        t, strides = _input_grad(g, role, dev, shared, constant)
        args.update(_named(triton_abi.value("din", i, True), [t, *strides]))
        din.append((t, role, shared, constant))
        lane_sum, time_sum = lane_sum | shared << i, time_sum | constant << i
    if g.tile == "state":
        args.update(LANE_SUM=lane_sum, TIME_SUM=time_sum)
    param_roles = roles(k, "param") or tuple("r" if p.dim() else "" for p in params)
    dpar = [_per_lane(g, role, f32, dev) for role in param_roles]
    dini = [_per_lane(g, role, f32, dev) for role in roles(k, "field")]
    # the scratch of BLOCK_T prefixes: each field's own shape in matrix mode; the one-axis
    # block scan parks full [BLOCK_T, S] tiles
    scratch = [_per_lane(g, role if g.tile != "lanes" else "r", _field_dtype(dtype), dev, (block_t,))
               for role, dtype in zip(roles(k, "field"), k.field_dtypes)]
    args.update({**_per_lane_args("dpar", dpar), **_per_lane_args("dini", dini), **_per_lane_args("ws", scratch)})
    args.update(_size_args(g, k, call, start, triton_cdiv(g.T, block_t)))
    args.update(HAS_INIT=has_init, HAS_DFIN=has_dfin, BLOCK_T=block_t, **g.blocks())
    if run:
        _run(k.backward, "backward", g, k, args, block_t)
    result = []
    for (t, role, shared, constant), x, dtype in zip(din, inputs, k.input_dtypes):
        # a broadcast input's adjoint, summed by the kernel per lane tile or over the tokens
        lead_ = (g.B, 1) if constant else g.time_lead()
        t = t.sum(dim=2, keepdim=True) if shared else t
        grad = t.reshape(*lead_, *((1,) * len(g.lanes) if shared else g.lanes), *g.extent(role))
        result.append(grad.sum_to_size(x.shape).to(x.dtype) if _is_float(dtype) and x.is_floating_point()
                      else _placeholder(x))
    for t, p, sliced in zip(dpar, params, per_lane):  # [B, L, ...]: per-lane params keep their lanes
        total = t.sum(dim=0) if sliced else t.sum(dim=(0, 1))
        result.append(total.reshape(p.shape).to(p.dtype) if p.is_floating_point() else _placeholder(p))
    for t, role, dtype, x in zip(dini, roles(k, "field"), k.field_dtypes, prefix):
        grad = _unflatten(t, g, role, False)
        result.append(grad.sum_to_size(x.shape).to(x.dtype) if _is_float(dtype) and x.is_floating_point()
                      else _placeholder(x))
    return result


def _launch_backward(kernels: str, inputs: list[torch.Tensor], params: list[torch.Tensor],
                     prefix: list[torch.Tensor], carries: list[torch.Tensor], out_grads: list[torch.Tensor | None],
                     fin_grads: list[torch.Tensor | None], dims: list[int], lead: list[int], per_lane: list[bool],
                     block_t: int, start: int, bounds: list[int] | None) -> list[torch.Tensor]:
    return _backward_tensors(kernels, inputs, params, prefix, carries, out_grads, fin_grads, dims, lead, per_lane,
                             block_t, start, bounds)


# Under torch.compile the launches are these ops (psmc.runtime.custom_ops); their fakes run the
# same code, allocating what a launch writes and launching nothing.
_scan_op = torch.library.custom_op("psmc::generated_scan", _launch_scan, mutates_args=())
_backward_op = torch.library.custom_op("psmc::generated_scan_backward", _launch_backward, mutates_args=())


@_scan_op.register_fake
def _scan_fake(kernels, time, inputs, params, prefix, dims, lead, per_lane, block_t, start, whole_axis, save,
               out_dtype, bounds):
    return _scan_tensors(kernels, time, inputs, params, prefix, dims, lead, per_lane, block_t, start, whole_axis,
                         save, out_dtype, bounds, run=False)


@_backward_op.register_fake
def _backward_fake(kernels, inputs, params, prefix, carries, out_grads, fin_grads, dims, lead, per_lane, block_t,
                   start, bounds):
    return _backward_tensors(kernels, inputs, params, prefix, carries, out_grads, fin_grads, dims, lead, per_lane,
                             block_t, start, bounds, run=False)


_scan, _scan_backward = traced(_scan_op, _launch_scan), traced(_backward_op, _launch_backward)


@dataclass(frozen=True)
class _ScanArgs:
    """What a differentiated pass's launches take besides its tensors (plain values)."""
    kernels: str
    dims: tuple
    lead: tuple
    per_lane: tuple
    block_t: int
    start: int
    bounds: tuple | None
    out_dtype: torch.dtype | None
    n_inputs: int
    n_params: int
    g: _Geometry  # (without the packed offsets' device table: the shapes of what the pass returns)


class _ScanFunction(torch.autograd.Function):
    """The fused forward pass with the generated backward kernel as its gradient.

    apply(args, *inputs, *params, *init_fields) -> (*outputs, *final_fields); `args` a
    `_ScanArgs`. Its forward and backward launch through the custom ops above under
    torch.compile."""

    @staticmethod
    def forward(ctx, args, *flat):
        k = KERNEL_SETS[args.kernels]
        n_in, n_par = args.n_inputs, args.n_params
        inputs, params, prefix = list(flat[:n_in]), list(flat[n_in:n_in + n_par]), list(flat[n_in + n_par:])
        bounds = list(args.bounds) if args.bounds is not None else None
        result = _scan(args.kernels, True, inputs, params, prefix, list(args.dims), list(args.lead),
                       list(args.per_lane), args.block_t, args.start, True, True, args.out_dtype, bounds)
        n_out, n_f = len(k.output_dtypes), len(k.field_dtypes)
        g = args.g
        outs = [_unflatten(o, g, r, True) for o, r in zip(result[:n_out], roles(k, "output"))]
        fins = [_unflatten(f, g, r, False) for f, r in zip(result[n_out:n_out + n_f], roles(k, "field"))]
        ctx.args = args
        ctx.save_for_backward(*flat, *result[n_out + n_f:])
        ctx.mark_non_differentiable(*[o for o, dt in zip(outs, k.output_dtypes) if not _is_float(dt)],
                                    *[f for f, dt in zip(fins, k.field_dtypes) if not _is_float(dt)])
        return (*outs, *fins)

    @staticmethod
    @torch.autograd.function.once_differentiable  # the kernels are not differentiable again
    def backward(ctx, *grads):
        args = ctx.args
        k = KERNEL_SETS[args.kernels]
        saved = ctx.saved_tensors
        n_in, n_par = args.n_inputs, args.n_params
        n_flat = len(saved) - len(k.field_dtypes)
        inputs, params = list(saved[:n_in]), list(saved[n_in:n_in + n_par])
        prefix, carries = list(saved[n_in + n_par:n_flat]), list(saved[n_flat:])
        n_out = len(k.output_dtypes)
        bounds = list(args.bounds) if args.bounds is not None else None
        result = _scan_backward(args.kernels, inputs, params, prefix, carries, list(grads[:n_out]),
                                list(grads[n_out:]), list(args.dims), list(args.lead), list(args.per_lane),
                                args.block_t, args.start, bounds)
        # the placeholders of integer values back to None
        floats = [_is_float(dt) and x.is_floating_point() for x, dt in zip(inputs, k.input_dtypes)]
        floats += [p.is_floating_point() for p in params]
        floats += [_is_float(dt) and x.is_floating_point() for x, dt in zip(prefix, k.field_dtypes)]
        return (None, *[t if f else None for t, f in zip(result, floats)])


def _broadcast(x: torch.Tensor, g: _Geometry, role: str) -> tuple[bool, bool]:
    """Whether every lane reads the same values of input `x`, and whether every token does
    (a stride-0 lane or time axis in the kernel's [B, T, L, S'] view)."""
    _, strides = _as_tile(x, g, role, True)
    return g.L > 1 and strides[2] == 0, strides[1] == 0


def _input_grad(g: _Geometry, role: str, dev, shared: bool, constant: bool) -> tuple:
    """The buffer the backward writes input adjoints to, and its strides: [B, T, L, S'], with
    the lane tiles for L when the lanes share the input (LANE_SUM), one token per program
    (batch row or sequence) and a time stride of 0 when the tokens do (TIME_SUM)."""
    if not constant:
        return _per_token(g, role, torch.float32, dev, True, lanes=g.grid[0] if shared else None)
    t = torch.empty(g.B, 1, g.grid[0] if shared else g.L, *(g.extent(role) or (1,)), device=dev,
                    dtype=torch.float32)
    strides = list(t.stride())
    strides[1] = 0  # packed sequences move each pointer by its first token: this one stays
    if not role:
        strides[-1] = 0
    return t, strides


def _lead(g: _Geometry, time: bool) -> tuple:
    return (g.time_lead() if time else (g.B,)) + g.lanes




def _params(layer) -> list:
    return [getattr(layer, "p_" + name) for name in layer._triton_kernels.params]


def _prefix_requires_grad(prefix) -> bool:
    return any(t is not None and t.requires_grad for t in prefix)


def _filled(k, g: _Geometry, prefix, dev):
    """A stream prefix for the kernels, which read every field: a field the prefix leaves out
    (dead: it feeds only outputs that are dropped again) becomes zeros."""
    if prefix is None or all(t is not None for t in prefix):
        return prefix
    return tuple(torch.zeros(g.extent(role), device=dev, dtype=_field_dtype(dtype)) if t is None else t
                 for t, role, dtype in zip(prefix, roles(k, "field"), k.field_dtypes))


def _start(layer, state) -> int:
    """The stream position the kernels start at: read off the state's count only for an op
    that reads `index` (the kernels use it for nothing else), since on a GPU the read is a host
    sync per call."""
    if state is None or not (layer.spec.lift_index or layer.spec.readout_index):
        return 0
    return state.size


def forward(layer, call, state, block_t: int | None = None):
    """The fused parallel pass: (outputs, new ScanState). Differentiable: when a gradient is
    needed it runs through `_ScanFunction`, whose backward is the generated reverse scan."""
    k = layer._triton_kernels
    lead = call.lead
    grad = _grad_needed(layer, call) or (state is not None and state.prefix is not None and
                                        _prefix_requires_grad(state.prefix) and torch.is_grad_enabled())
    packed = call.cu_seqlens
    bounds = None
    if packed is not None:  # one program per sequence and lane (tile): every sequence in this launch
        bounds = list(packed.bounds)
        longest = max(b - a for a, b in zip(bounds, bounds[1:]))
        lead = (len(bounds) - 1, longest, *lead[2:])
    g = _geometry(k, call, lead, lead[1], whole_axis=grad)
    if packed is not None:
        g = dataclasses.replace(g, tokens=bounds[-1])
    default = DEFAULT_MATRIX_BLOCK_T if g.tile != "lanes" else DEFAULT_BLOCK_T
    block_t = block_t or getattr(layer, "triton_block_t", None) or min(_pow2(g.T), default)
    prefix = _filled(k, g, state.prefix, call.ctx.dev) if state is not None else None
    start = _start(layer, state)
    inputs, params = _given_inputs(k, call), _params(layer)
    dims = [int(call.ctx.d[d]) for d in k.dims]
    per_lane = [name in layer.per_lane for name in k.params]
    n_out = len(k.output_dtypes)
    if grad:
        args = _ScanArgs(k.name, tuple(dims), tuple(lead), tuple(per_lane), block_t, start,
                         None if bounds is None else tuple(bounds), call.out_dtype, len(inputs), len(params), g)
        flat = _ScanFunction.apply(args, *inputs, *params, *(prefix or ()))
        outs, new_prefix = tuple(flat[:n_out]), tuple(flat[n_out:])
    else:
        flat = _scan(k.name, True, inputs, params, list(prefix or ()), dims, list(lead), per_lane, block_t, start,
                     False, False, call.out_dtype, bounds)
        outs = tuple(_unflatten(o, g, r, True) for o, r in zip(flat[:n_out], roles(k, "output")))
        new_prefix = tuple(_unflatten(f, g, r, False) for f, r in zip(flat[n_out:], roles(k, "field")))
    count = (state.count if state is not None else torch.zeros((), dtype=torch.int64, device=call.ctx.dev)) + g.T
    return outs, ScanState(prefix=layer._without_dead(new_prefix), count=count)


def step(layer, call, state):
    """The fused decode step for one token: (outputs, new ScanState). When a gradient is
    needed the token runs as a one-token differentiable forward pass continuing `state`."""
    k = layer._triton_kernels
    if _grad_needed(layer, call) or (state.prefix is not None and torch.is_grad_enabled() and
                                     _prefix_requires_grad(state.prefix)):
        one = dataclasses.replace(call, inputs={n: x.unsqueeze(1) for n, x in call.inputs.items()},
                                  lead=(call.lead[0], 1) + tuple(call.lead[1:]))
        outs, new_state = forward(layer, one, state if state.prefix is not None else None, block_t=1)
        if state.prefix is None:
            new_state = ScanState(prefix=layer._without_dead(new_state.prefix), count=state.count + 1)
        return tuple(o.squeeze(1) for o in outs), new_state
    g = _geometry(k, call, call.lead, 0)
    inputs = [call.inputs[name] for name in k.inputs]
    prefix = _filled(k, g, state.prefix, call.ctx.dev)
    flat = _scan(k.name, False, inputs, _params(layer), list(prefix or ()), [int(call.ctx.d[d]) for d in k.dims],
                 list(call.lead), [name in layer.per_lane for name in k.params], 1, _start(layer, state), False, False,
                 call.out_dtype, None)
    n_out = len(k.output_dtypes)
    outs = tuple(_unflatten(o, g, r, False) for o, r in zip(flat[:n_out], roles(k, "output")))
    new_prefix = tuple(_unflatten(f, g, r, False) for f, r in zip(flat[n_out:], roles(k, "field")))
    return outs, ScanState(prefix=layer._without_dead(new_prefix), count=state.count + 1)


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"
