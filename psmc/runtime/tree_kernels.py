"""The tree kernels at run time: the paper's fixed tree of a non-associative elementwise
aggregator in one kernel call forward and one backward, Triton (psmc.codegen.triton_tree, on
CUDA) or C++ (psmc.codegen.cpp_tree, on CPU).

`tree_scan` has the contract of psmc.runtime.tree.tree_scan (leaves in, inclusive and exclusive
prefixes and the new binary counter out) and computes the same brackets; the layer's torch lift
and readout run around it (the dispatch paths "triton-tree" and "cpu-tree"). Every value is a
scalar per lane, so leaves [B, T, *lanes, *field] are seen as [B, T, L], and a counter level's
roots and folds as [B, L].
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass

import torch

from . import triton_abi
from .element import Element, at
from .scan import exclusive_from_inclusive
from .state import TreeCache, TreeState
from .tree import counter_after
from .varlen import cu_seqlens_bounds

BLOCK_C = 128  # lanes per program at most: one per thread at 4 warps
# Every registered Triton kernel set by name: a torch custom op takes plain values, so the ops
# below name their kernels by a string and find them here.
TREE_KERNELS: dict = {}


def lane_block(L: int) -> int:
    """Lanes per program: one per thread, 32 to 128 (a warp to four), as few as cover L, so a
    call with few lanes spreads over more programs instead of idling threads."""
    block = 32
    while block < min(L, BLOCK_C):
        block *= 2
    return block


@dataclass(frozen=True)
class TreeKernels:
    """The Triton tree kernels of an op (`_tree_kernels` on its class)."""
    forward: object
    backward: object
    fields: tuple
    params: tuple  # the float scalar params the combine reads
    dims: tuple
    step: object = None  # a TreeCache's decode step (None in a module generated before it existed)
    # the forward kernel's module and name, unique per generated module (content-hashed): what
    # the custom ops look the kernels up by (TREE_KERNELS)
    name: str = dataclasses.field(init=False, default="")

    def __post_init__(self):
        fn = getattr(self.forward, "fn", self.forward)
        object.__setattr__(self, "name", f"{fn.__module__}.{fn.__qualname__}")
        TREE_KERNELS[self.name] = self

    def compute_dtype(self, call) -> torch.dtype:
        return torch.float32

    def launch(self, kind: str, args: dict, B: int, L: int) -> None:
        triton_abi.check_tree(args, kind, len(self.fields), len(self.params), tuple(self.dims))
        block = args["BLOCK_C"]
        grid = ((L + block - 1) // block, B)
        # num_stages=1: no software pipelining. A leaf reads the prefix and node the previous
        # leaf stored (one thread, one address): a load issued a loop iteration early would
        # read them before they are written.
        getattr(self, kind)[grid](**args, num_stages=1, num_warps=block // 32)  # (forward, backward or step)


@dataclass(frozen=True)
class CpuTreeKernels:
    """The C++ tree kernels of an op (`_cpu_tree_kernels`), built on first use like the exact
    scans' (psmc.runtime.cpu_support: cached by content, a warning and the torch tree without a
    compiler). Pointer and int layouts: psmc.codegen.cpp_tree."""
    source: str
    symbol: str
    fields: tuple
    field_dtypes: tuple
    params: tuple
    dims: tuple
    # whether the source has the TreeCache step (a module generated before it has not): read
    # once here, not on every decode token
    has_step: bool = dataclasses.field(init=False, default=False)

    def __post_init__(self):
        object.__setattr__(self, "has_step", f"{self.symbol}_step(" in self.source)

    def compute_dtype(self, call) -> torch.dtype:
        """float64 where the torch tree computes a field in float64 (an f64 field, or f32 ones
        in a float64 call), else float32."""
        wide = any(call.ctx.dt[d] == torch.float64 for d in self.field_dtypes)
        return torch.float64 if wide else torch.float32

    def launch(self, kind: str, args: dict, B: int, L: int) -> None:
        from . import cpu_support
        F, P = len(self.fields), len(self.params)
        if kind == "step":  # a TreeCache token (CpuTreeKernels' pointer and int layouts: psmc.codegen.cpp_tree)
            tensors = [args[f"{g}{i}"] for g in ("leaf", "root", "fold", "pre") for i in range(F)]
            tensors += [args[f"par{i}"] for i in range(P)]
            ints = [B, L, args["levels"]] + [args[f"par{i}_sl"] for i in range(P)]
            ints += [args[triton_abi.dim(d)] for d in self.dims] + args["count"].tolist()  # (CPU: no sync)
            dtype = tensors[0].dtype
            fn = cpu_support._function(cpu_support.library(self, "step", dtype), self, "step", dtype)
            cpu_support._call(fn, tensors, ints, _threads(B * L, B, L))
            return
        groups = ("leaf", "root", "fold", "pre", "node") + (
            ("gpre", "gnode", "dleaf", "groot", "gfold") if kind == "backward" else ())
        tensors = [args[f"{g}{i}"] for g in groups for i in range(F)] + [args[f"par{i}"] for i in range(P)]
        if kind == "backward":
            tensors += [args[f"dpar{i}"] for i in range(P)]
        ints = [args["m"], args["T"], B, L] + [args[f"par{i}_sl"] for i in range(P)]
        ints += [args[triton_abi.dim(d)] for d in self.dims]
        if kind == "backward":
            ints.append(int(args["HAS_GNODE"]))
        cu = args["cu"]  # packed sequences: 1 and the offsets (a CPU tensor: no device read), else 0
        ints += [1, *cu.tolist()] if cu is not None else [0]
        dtype = tensors[0].dtype
        fn = cpu_support._function(cpu_support.library(self, kind, dtype), self, kind, dtype)
        cpu_support._call(fn, tensors, ints, _threads(B * max(args["T"], 1) * L, B, L))


def _threads(work: int, B: int, L: int) -> int:
    """Threads for a C++ tree call: one below torch's grain, else one per work item (a row and
    64 lanes) up to torch's count."""
    from . import cpu_support
    return 1 if work < cpu_support.GRAIN else max(1, min(torch.get_num_threads(), B * ((L + 63) // 64)))


def cpu_unusable_reason(layer, call) -> str | None:
    """Why this call cannot run the C++ tree kernels, or None when it can."""
    from . import cpu_support
    k = getattr(layer, "_cpu_tree_kernels", None)
    if k is None:
        return "its plan has no C++ tree kernels (see `psmc check`)"
    if layer.backend == "torch":
        return "backend='torch'"
    reason = _cpu_placement_reason(layer, call, "the torch tree runs (the tree kernels are no graph op)")
    if reason is not None:
        return reason
    if not cpu_support.libraries(k, cpu_support.passes(layer, call), k.compute_dtype(call)):
        return "the C++ kernels could not be built (no compiler?)"
    return None


def _cpu_placement_reason(layer, call, in_graph: str) -> str | None:
    """Why this call's tensors, context or settings keep it off the C++ tree kernels, or None
    (`in_graph`: what runs inside a torch.compile graph instead)."""
    if call.ctx.dev.type != "cpu":
        return f"the inputs are on {call.ctx.dev.type}: the C++ kernels run on CPU tensors"
    if torch.compiler.is_compiling():
        return f"inside a torch.compile graph {in_graph}"
    if layer.backend == "auto" and os.environ.get("PSMC_CPU", "1") == "0":
        return "PSMC_CPU=0 keeps backend='auto' off the C++ kernels"
    return None


def unusable_reason(layer, call) -> str | None:
    """Why this call cannot run the Triton tree kernels, or None when it can."""
    from . import triton_support
    k = getattr(layer, "_tree_kernels", None)
    if k is None:
        return "its plan has no tree kernels (see `psmc check`)"
    if call.ctx.dev.type == "cpu" and not triton_support._interpreted(k.forward) and not triton_support.RECORDING:
        return ("the inputs are CPU tensors: Triton needs CUDA tensors, or TRITON_INTERPRET=1 set before the "
                "generated module is imported (the interpreter, for tests)")
    if call.ctx.dev.type not in ("cpu", "cuda"):
        return f"the inputs are on {call.ctx.dev.type}: Triton kernels need CUDA tensors"
    if call.ctx.dt["f32"] == torch.float64:
        return "float64 inputs or params: the kernels compute in fp32"
    if call.lead[0] > triton_support.MAX_GRID_BATCH:
        return (f"a batch of {call.lead[0]:,} rows: the batch grid axis holds at most "
                f"{triton_support.MAX_GRID_BATCH:,}")
    return None


def tree_scan(layer, call, leaves: Element, state: TreeState | None, identity: Element | None,
              exclusive: bool, k) -> tuple[Element, Element | None, TreeState]:
    """psmc.runtime.tree.tree_scan's result, from the kernels `k` (TreeKernels or CpuTreeKernels)."""
    lead = tuple(call.lead)
    T = lead[1]
    bounds = None if call.cu_seqlens is None else cu_seqlens_bounds(layer.spec.name, call.cu_seqlens)
    B = lead[0] if bounds is None else len(bounds) - 1  # rows of the counter: packed, one per sequence
    field, lanes, size, L, scalar = _lane_layout(layer, call, lead[2:])
    m = 0 if state is None else state.size
    n = m + T
    dev = call.ctx.dev
    full = lead + field
    dtype = k.compute_dtype(call)
    flat = [torch.broadcast_to(x[..., None] if one else x, full).reshape(lead[0], T, L).to(dtype).contiguous()
            for x, one in zip(leaves, scalar)]
    roots, folds = _counter_tensors(state, m, scalar, (B,) + full[2:], (B, L), dev, dtype)
    params = [_param(layer, name, lanes, size, dtype) for name in k.params]
    meta = (k, m, T, B, L, tuple(int(call.ctx.d[d]) for d in k.dims), bounds)
    out = _TreeScan.apply(meta, len(k.fields), *flat, *roots, *folds, *params)
    prefixes, nodes = out[:len(k.fields)], out[len(k.fields):]
    dtypes = [x.dtype for x in leaves]
    # (a scalar field's copies are equal: element 0 is its value)
    inclusive = tuple(_unflat(p, full, one).to(dt) for p, dt, one in zip(prefixes, dtypes, scalar))
    nodes = tuple(_unflat(x, full, one).to(dt) for x, dt, one in zip(nodes, dtypes, scalar))
    if bounds is None:
        new_state = _counter_of(nodes, inclusive, state, m, n, dev)
    else:  # one counter per sequence, each after its own leaves (a list: the layer joins the rows)
        new_state = [_counter_of(tuple(x[:, a:z] for x in nodes), tuple(x[:, a:z] for x in inclusive),
                                 None if state is None else _row(state, b), m, m + z - a, dev)
                     for b, (a, z) in enumerate(zip(bounds, bounds[1:]))]
    if not exclusive:
        return inclusive, None, new_state
    first = identity if m == 0 else state.prefix
    if bounds is None:
        return inclusive, exclusive_from_inclusive(inclusive, first), new_state
    return inclusive, _packed_exclusive(inclusive, first, bounds, B), new_state


def cache_unusable_reason(layer, call) -> str | None:
    """Why a TreeCache token of this call cannot run the C++ step kernel (backend 'cpu', or
    'auto' on CPU tensors), or None when it can; the library is built on first use."""
    from . import cpu_support
    k = getattr(layer, "_cpu_tree_kernels", None)
    if k is None:
        return "its plan has no C++ tree kernels (see `psmc check`)"
    if not k.has_step:
        return "its module was generated before the C++ step kernel existed (recompile it with `psmc compile`)"
    if layer.backend not in ("cpu", "auto"):
        return f"backend={layer.backend!r}"
    reason = _cpu_placement_reason(layer, call, "the torch push runs (the C++ step is no graph op)")
    if reason is not None:
        return reason
    if cpu_support.library(k, "step", k.compute_dtype(call)) is None:
        return "the C++ kernels could not be built (no compiler?)"
    return None


def cache_step(layer, call, cache: TreeCache, leaf: Element, k) -> tuple[TreeCache, Element]:
    """`TreeCache.push` of one token per row in one call of the step kernel of `k` (the Triton
    or the C++ tree kernels; each row walks only the levels it merges): (the new cache, each
    row's prefix after the token). The kernel updates copies of the slots, so the given cache
    stays as it was."""
    cache = cache.ready(leaf)
    cache.check_room()
    lead = tuple(call.lead)
    B, levels = lead[0], cache.levels
    field, lanes, size, L, scalar = _lane_layout(layer, call, lead[1:])
    full = lead + field
    dtype = k.compute_dtype(call)

    def flat(x, shape, one):  # [*shape] (a scalar field: [*shape[:-len(field)]]) as [..., L]
        flat_shape = shape[:len(shape) - len(full) + 1] + (L,)
        if not one and x.dtype == dtype and tuple(x.shape) == shape and x.is_contiguous():
            return x.view(flat_shape)  # (the step op copies the slots it writes)
        out = torch.empty(shape, dtype=dtype, device=x.device)
        out.copy_(torch.broadcast_to(x[..., None] if one else x, shape))
        return out.view(flat_shape)

    slots = (B, levels) + full[1:]
    leaves = [flat(x, full, one) for x, one in zip(leaf, scalar)]
    roots = [flat(x, slots, one) for x, one in zip(cache.roots, scalar)]
    folds = [flat(x, slots, one) for x, one in zip(cache.folds, scalar)]
    params = [_param(layer, name, lanes, size, dtype) for name in k.params]
    dims = [int(call.ctx.d[d]) for d in k.dims]
    out = _run_cache_step(k, leaves, roots, folds, params, cache.count, B, L, levels, dims)
    F = len(k.fields)
    new_roots, new_folds, pre = out[:F], out[F:2 * F], out[2 * F:]
    like = cache.roots

    def back(x, shape, one, dtype):
        x = x.reshape(shape)
        return (x[..., 0] if one else x).to(dtype)
    new = dataclasses.replace(
        cache, count=cache.count + 1,
        roots=tuple(back(x, slots, one, r.dtype) for x, one, r in zip(new_roots, scalar, like)),
        folds=tuple(back(x, slots, one, r.dtype) for x, one, r in zip(new_folds, scalar, like)))
    return new, tuple(back(x, full, one, r.dtype) for x, one, r in zip(pre, scalar, like))


def _cache_step(kernels, leaves: list[torch.Tensor], roots: list[torch.Tensor], folds: list[torch.Tensor],
                params: list[torch.Tensor], count: torch.Tensor, B: int, L: int, levels: int, dims: list[int],
                run: bool = True) -> list[torch.Tensor]:
    """The step kernel on copies of the slots: [*roots, *folds, *prefixes] (run=False: the
    custom op's fake, which allocates them and launches nothing)."""
    k = _kernels(kernels)
    roots = [r.clone() for r in roots]  # (the op returns new tensors; the kernel writes one slot of each)
    folds = [f.clone() for f in folds]
    pre = [torch.empty_like(x) for x in leaves]
    if run:
        args = _named("leaf", leaves) | _named("root", roots) | _named("fold", folds) | _named("pre", pre)
        args |= _param_args(params, L) | dict(count=count, B=B, L=L, levels=levels)
        args |= {triton_abi.dim(d): v for d, v in zip(k.dims, dims)}
        args["BLOCK_C"] = lane_block(L)
        _launch(k, "step", args, B, L)
    return roots + folds + pre


def _cache_step_launch(kernels: str, leaves: list[torch.Tensor], roots: list[torch.Tensor],
                       folds: list[torch.Tensor], params: list[torch.Tensor], count: torch.Tensor, B: int, L: int,
                       levels: int, dims: list[int]) -> list[torch.Tensor]:
    return _cache_step(kernels, leaves, roots, folds, params, count, B, L, levels, dims)


_cache_step_op = torch.library.custom_op("psmc::tree_cache_step", _cache_step_launch, mutates_args=())


@_cache_step_op.register_fake
def _cache_step_fake(kernels, leaves, roots, folds, params, count, B, L, levels, dims):
    return _cache_step(kernels, leaves, roots, folds, params, count, B, L, levels, dims, run=False)


def _run_cache_step(k, *args):
    """The step launch: the op inside a graph (by the kernels' name), else a direct call (the
    C++ kernels never run in a graph: `cache_unusable_reason`)."""
    if torch.compiler.is_compiling() and isinstance(k, TreeKernels):
        return _cache_step_op(k.name, *args)
    return _cache_step(k, *args)


def _lane_layout(layer, call, lane_axes: tuple) -> tuple:
    """How the kernels see an op's fields: every value a scalar per kernel lane, the lanes of
    the layer times the elements of the vector fields. (field, lanes, size, L, scalar):
    the vector fields' one shape (or ()), the layer's lanes, the elements of `field`, the
    kernel lanes, and per field whether it is a scalar beside vector ones (copied to each
    element; element 0 read back)."""
    shapes = [tuple(int(s) for s in f.shape(call.ctx.d)) for f in layer.spec.fields]
    field = max(shapes, key=len)
    lanes, size = math.prod([int(n) for n in lane_axes]), math.prod(field)
    return field, lanes, size, lanes * size, [not s and bool(field) for s in shapes]


def _counter_of(nodes: Element, inclusive: Element, state: TreeState | None, m: int, n: int, dev) -> TreeState:
    """The counter after n leaves: the tree that ends at a leaf past m is that leaf's node."""
    return counter_after(lambda level, end: at(nodes, end - m - 1), inclusive, state, m, n, dev)


def _row(state: TreeState, b: int) -> TreeState:
    """Row b of a counter (the entering state of packed sequence b)."""
    pick = (lambda e: None if e is None else tuple(x[b:b + 1] for x in e))
    return TreeState(count=state.count, roots=tuple(pick(e) for e in state.roots),
                     folds=tuple(pick(e) for e in state.folds), op=state.op)


def _packed_exclusive(inclusive: Element, first: Element, bounds: list, B: int) -> Element:
    """The exclusive prefixes of packed sequences: each token reads the inclusive prefix of the
    token before it, and each sequence's first token `first` (the identity, or that sequence's
    row of the entering prefix)."""
    starts = torch.tensor(bounds[:-1], dtype=torch.int64, device=inclusive[0].device)
    out = []
    for incl, f in zip(inclusive, first):
        shifted = incl.roll(1, dims=1)
        heads = torch.broadcast_to(f.to(incl.dtype), (B,) + tuple(incl.shape[2:])).unsqueeze(0)
        out.append(shifted.index_copy(1, starts, heads))
    return tuple(out)


def _unflat(x: torch.Tensor, full: tuple, scalar: bool) -> torch.Tensor:
    """A kernel output [B, T, L] as the field's [B, T, *lanes, *field] (a scalar field: element 0)."""
    x = x.reshape(full)
    return x[..., 0] if scalar else x


def _param(layer, name: str, lanes: int, size: int, dtype) -> torch.Tensor:
    """The param in the compute dtype, flat: one value for all kernel lanes, or one per kernel
    lane (a per-lane param's value for its layer lane, a vector param's for its element)."""
    p = getattr(layer, "p_" + name).to(dtype)
    rows = lanes if name in getattr(layer, "per_lane", ()) else 1
    elements = p.numel() // rows  # 1, or the fields' size
    if p.numel() == 1:
        return p.reshape(1)
    return p.reshape(rows, elements).expand(lanes, size).reshape(-1)


def _counter_tensors(state: TreeState | None, m: int, scalar: list, shape: tuple, flat: tuple, dev, dtype) -> tuple:
    """The entering counter's roots and folds, field by field, as [levels, B, L] (zeros at the
    levels that hold no tree: the kernels never read them). `shape`: a level's [B, *lanes,
    *field], `flat` its [B, L]; `scalar[i]`: field i is a scalar beside vector fields."""
    levels = max(m.bit_length(), 1)
    roots, folds = [], []
    for i, one in enumerate(scalar):
        for table, out in (("roots", roots), ("folds", folds)):
            held = () if state is None else getattr(state, table)
            rows = [torch.zeros(flat, device=dev, dtype=dtype) if lv >= len(held) or held[lv] is None
                    else torch.broadcast_to(held[lv][i][..., None] if one else held[lv][i], shape).reshape(flat).to(dtype)
                    for lv in range(levels)]
            out.append(torch.stack(rows))
    return roots, folds


def _sizes(k, m: int, T: int, B: int, L: int, dims: list[int], cu) -> dict:
    out = dict(m=m, T=T, B=B, L=L, cu=cu, VARLEN=cu is not None)
    out.update({triton_abi.dim(d): int(v) for d, v in zip(k.dims, dims)})
    return out


def _kernels(kernels) -> "TreeKernels | CpuTreeKernels":
    """A kernel set, or its name (what the custom ops carry: TREE_KERNELS)."""
    return TREE_KERNELS[kernels] if isinstance(kernels, str) else kernels


def _offsets(bounds: list[int] | None, device) -> torch.Tensor | None:
    return None if bounds is None else torch.tensor(bounds, dtype=torch.int32, device=device)


def _tree_forward(kernels, leaves: list[torch.Tensor], roots: list[torch.Tensor], folds: list[torch.Tensor],
                  params: list[torch.Tensor], m: int, T: int, B: int, L: int, dims: list[int],
                  bounds: list[int] | None, run: bool = True) -> list[torch.Tensor]:
    """The forward kernel: [*prefixes, *nodes], each [B, T, L] like the leaves. run=False
    allocates them and launches nothing (the custom op's fake)."""
    k = _kernels(kernels)
    pre = [torch.empty_like(x) for x in leaves]
    node = [torch.empty_like(x) for x in leaves]
    if run:
        args = _named("leaf", leaves) | _named("root", roots) | _named("fold", folds) | _named("pre", pre)
        args |= _named("node", node) | _param_args(params, L) | _sizes(k, m, T, B, L, dims,
                                                                        _offsets(bounds, leaves[0].device))
        args["BLOCK_C"] = lane_block(L)
        _launch(k, "forward", args, B, L)
    return pre + node


def _tree_backward(kernels, leaves: list[torch.Tensor], roots: list[torch.Tensor], folds: list[torch.Tensor],
                   pre: list[torch.Tensor], node: list[torch.Tensor], params: list[torch.Tensor],
                   grads: list[torch.Tensor | None], m: int, T: int, B: int, L: int, dims: list[int],
                   bounds: list[int] | None, run: bool = True) -> list[torch.Tensor]:
    """The backward kernel for the adjoints `grads` of [*prefixes, *nodes] (None: not sent):
    [*d leaves, *d entering roots, *d entering folds, *d params]."""
    k = _kernels(kernels)
    F = len(leaves)
    like = dict(device=leaves[0].device, dtype=leaves[0].dtype)
    gpre = _adjoints(grads[:F], leaves[0])
    has_gnode = any(g is not None for g in grads[F:])
    gnode = _adjoints(grads[F:], leaves[0]) if has_gnode else gpre  # (not read with HAS_GNODE off)
    levels = (m + T).bit_length()
    groot = [torch.zeros((levels, B, L), **like) for _ in range(F)]
    gfold = [torch.zeros((levels, B, L), **like) for _ in range(F)]
    dleaf = [torch.empty_like(x) for x in leaves]
    dpar = [torch.empty((B, L), **like) for _ in params]
    if run:
        args = _named("leaf", leaves) | _named("root", roots) | _named("fold", folds) | _named("pre", pre)
        args |= _named("node", node) | _named("gpre", gpre) | _named("gnode", gnode) | _named("dleaf", dleaf)
        args |= _named("groot", groot) | _named("gfold", gfold) | _named("dpar", dpar)
        args |= _param_args(params, L) | _sizes(k, m, T, B, L, dims, _offsets(bounds, leaves[0].device))
        args.update(BLOCK_C=lane_block(L), HAS_GNODE=has_gnode)
        _launch(k, "backward", args, B, L)
    held = roots[0].shape[0]  # the entering counter's levels; the accumulators end as their adjoints
    droots = [g[:held].clone() for g in groot]  # (held <= levels: the count only grows; an op returns no view)
    dfolds = [g[:held].clone() for g in gfold]
    dparams = [d.sum(0) if _lane_stride(p, L) else d.sum().reshape(p.shape) for p, d in zip(params, dpar)]
    return dleaf + droots + dfolds + dparams


def _tree_forward_launch(kernels: str, leaves: list[torch.Tensor], roots: list[torch.Tensor],
                         folds: list[torch.Tensor], params: list[torch.Tensor], m: int, T: int, B: int, L: int,
                         dims: list[int], bounds: list[int] | None) -> list[torch.Tensor]:
    return _tree_forward(kernels, leaves, roots, folds, params, m, T, B, L, dims, bounds)


def _tree_backward_launch(kernels: str, leaves: list[torch.Tensor], roots: list[torch.Tensor],
                          folds: list[torch.Tensor], pre: list[torch.Tensor], node: list[torch.Tensor],
                          params: list[torch.Tensor], grads: list[torch.Tensor | None], m: int, T: int, B: int,
                          L: int, dims: list[int], bounds: list[int] | None) -> list[torch.Tensor]:
    return _tree_backward(kernels, leaves, roots, folds, pre, node, params, grads, m, T, B, L, dims, bounds)


# Under torch.compile the Triton tree kernels are these ops (psmc.runtime.custom_ops); the C++
# tree kernels stay out of graphs (`cpu_unusable_reason`).
_forward_op = torch.library.custom_op("psmc::tree_scan", _tree_forward_launch, mutates_args=())
_backward_op = torch.library.custom_op("psmc::tree_scan_backward", _tree_backward_launch, mutates_args=())


@_forward_op.register_fake
def _forward_fake(kernels, leaves, roots, folds, params, m, T, B, L, dims, bounds):
    return _tree_forward(kernels, leaves, roots, folds, params, m, T, B, L, dims, bounds, run=False)


@_backward_op.register_fake
def _backward_fake(kernels, leaves, roots, folds, pre, node, params, grads, m, T, B, L, dims, bounds):
    return _tree_backward(kernels, leaves, roots, folds, pre, node, params, grads, m, T, B, L, dims, bounds,
                          run=False)


def _run_forward(k, *args):
    """The forward launch: the op inside a graph (by the kernels' name), else a direct call."""
    if torch.compiler.is_compiling():
        return _forward_op(k.name, *args)
    return _tree_forward(k, *args)


def _run_backward(k, *args):
    if torch.compiler.is_compiling():
        return _backward_op(k.name, *args)
    return _tree_backward(k, *args)


class _TreeScan(torch.autograd.Function):
    """(leaves, counter roots, counter folds, params) -> (prefixes P, nodes), each [B, T, L] in
    the leaves' (the compute) dtype. meta: (kernels, m, T, B, L, dims, bounds)."""

    @staticmethod
    def forward(ctx, meta, F, *tensors):
        k, m, T, B, L, dims, bounds = meta
        leaves, roots, folds = tensors[:F], tensors[F:2 * F], tensors[2 * F:3 * F]
        params = tensors[3 * F:]
        out = _run_forward(k, list(leaves), list(roots), list(folds), list(params), m, T, B, L, list(dims), bounds)
        ctx.meta, ctx.F = meta, F
        ctx.set_materialize_grads(False)  # an unread output (the nodes, mostly) sends None, not zeros
        ctx.save_for_backward(*leaves, *roots, *folds, *out, *params)
        return tuple(out)

    @staticmethod
    @torch.autograd.function.once_differentiable  # the kernels are not differentiable again
    def backward(ctx, *grads):
        k, m, T, B, L, dims, bounds = ctx.meta
        F = ctx.F
        saved = ctx.saved_tensors
        leaves, roots, folds = saved[:F], saved[F:2 * F], saved[2 * F:3 * F]
        pre, node, params = saved[3 * F:4 * F], saved[4 * F:5 * F], saved[5 * F:]
        out = _run_backward(k, list(leaves), list(roots), list(folds), list(pre), list(node), list(params),
                            list(grads), m, T, B, L, list(dims), bounds)
        return (None, None, *out)


def _named(kind: str, tensors) -> dict:
    return {f"{kind}{i}": t for i, t in enumerate(tensors)}


def _adjoints(grads, like: torch.Tensor) -> list:
    """Output adjoints as the kernels read them: contiguous, in the compute dtype; one zero
    tensor for those autograd did not send."""
    zeros = torch.zeros_like(like) if any(g is None for g in grads) else None
    return [zeros if g is None else g.contiguous().to(like.dtype) for g in grads]


def _lane_stride(p: torch.Tensor, L: int) -> int:
    """A flat param's stride over the kernel lanes: 1 with a value per lane, 0 with one for all."""
    return 1 if p.numel() == L and p.numel() > 1 else 0


def _param_args(params, L: int) -> dict:
    out = {}
    for i, p in enumerate(params):
        out[f"par{i}"] = p
        out[f"par{i}_sl"] = _lane_stride(p, L)
    return out


def _launch(k, kind: str, args: dict, B: int, L: int) -> None:
    """One kernel call (the tests spy on it)."""
    k.launch(kind, args, B, L)
