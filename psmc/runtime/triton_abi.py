"""The launch contract of the generated Triton kernels: every argument by name, from here.

The printers (psmc.codegen.triton_printer, triton_backward, triton_matrix) write each kernel's
parameter list from `arguments` and `constexprs`; the runtime (psmc.runtime.triton_support)
launches with keyword arguments named by the helpers below and checks, before every launch,
that it names exactly the kernel's arguments (`check`). No argument order is shared by
position between printer and runtime: the order here is only the order a signature prints in.

Names: a per-token tensor seen as [B, (T,) L, S'] is `<kind><i>` with its strides
`_sb` (batch), `_st` (time, in passes over a sequence), `_sl` (lane), `_ss` (state axis; 0 for
scalars); kinds `in` (inputs), `out` (outputs), `dout` (output adjoints), `din` (input
adjoints). A param is `par<i>`, `par<i>_sl` and `par<i>_ss`. Per-lane states are `ini<i>` (the prefix
entering the call), `fin<i>` (the final prefix), `bnd<i>` (the carry entering each block),
`dfin<i>`, `dini<i>`, `dpar<i>` (adjoints) and `ws<i>` (the backward's scratch). Sizes are
T, L, S (SR, SC for a matrix tile), start (the stream position) and NB (blocks of BLOCK_T);
each dim of the op is `d_<name>`. Passes over a sequence also take `cu`, the offsets of packed
sequences (read when the constexpr VARLEN is set: program b then runs sequence b, tokens
cu[b] .. cu[b+1] - 1 of batch row 0).
"""
from __future__ import annotations

KINDS = ("forward", "step", "backward")
# the tile models (psmc.codegen.triton_layout.Layout.mode): 'lanes' (a block scan over lanes),
# 'state' (a token loop over [BLOCK_R lanes, BLOCK_C of the state axis S] tiles), 'matrix' (a
# token loop over [R, C] tiles of one lane's matrix state)
TILES = ("lanes", "state", "matrix")


def value(kind: str, i: int, time: bool) -> tuple[str, ...]:
    """A per-token tensor and its strides."""
    base = f"{kind}{i}"
    return (base, f"{base}_sb") + ((f"{base}_st",) if time else ()) + (f"{base}_sl", f"{base}_ss")


def param(i: int) -> tuple[str, str, str]:
    """A param, its lane stride (0 when the lanes share it; the slice size for a per-lane
    param) and its state-axis stride."""
    return (f"par{i}", f"par{i}_sl", f"par{i}_ss")


def sizes(tile: str, time: bool) -> tuple[str, ...]:
    return ("T", "L") + (("SR", "SC") if tile == "matrix" else ("S",)) + ("start",) + (("NB",) if time else ())


def dim(name: str) -> str:
    return "d_" + name


def arguments(kind: str, tile: str, inputs: int, params: int, fields: int, outputs: int,
              dims: tuple) -> tuple[tuple[str, ...], ...]:
    """The run-time arguments of a kernel, grouped as its signature prints them."""
    assert kind in KINDS and tile in TILES, (kind, tile)
    time = kind != "step"
    out = [value("in", i, time) for i in range(inputs)] + [param(i) for i in range(params)]
    out += [(f"ini{i}",) for i in range(fields)]
    if kind == "backward":
        out += [(f"bnd{i}",) for i in range(fields)]
        out += [value("dout", i, True) for i in range(outputs)]
        out += [(f"dfin{i}",) for i in range(fields)]
        out += [value("din", i, True) for i in range(inputs)]
        out += [(f"dpar{i}",) for i in range(params)]
        out += [(f"dini{i}",) for i in range(fields)] + [(f"ws{i}",) for i in range(fields)]
    else:
        out += [value("out", i, time) for i in range(outputs)]
        out += [(f"fin{i}",) for i in range(fields)]
        if time:
            out += [(f"bnd{i}",) for i in range(fields)]
    out.append(sizes(tile, time))
    if time:
        out.append(("cu",))
    out += [(dim(d),) for d in dims]
    return tuple(out)


def constexprs(kind: str, tile: str) -> tuple[str, ...]:
    """The compile-time arguments (keyword constexprs) of a kernel. The state tile's backward
    sums the adjoints of broadcast inputs where they arise: bit i of LANE_SUM is set when the
    lanes share input i (its adjoint summed over a program's lanes: `din<i>` is [B, T, lane
    tiles, S']), bit i of TIME_SUM when every token reads the same input i (summed over the
    tokens: `din<i>` is [B, 1, L or lane tiles, S'] with a time stride of 0)."""
    flags = ("HAS_INIT",) + (("HAS_DFIN",) if kind == "backward" else ()) + ("BLOCK_T",)
    flags += (("BLOCK_R",) if tile != "lanes" else ()) + ("BLOCK_C",)
    flags += (("LANE_SUM", "TIME_SUM") if tile == "state" and kind == "backward" else ())
    return flags + (("SAVE",) if kind == "forward" else ()) + (("VARLEN",) if kind != "step" else ())


def check(args: dict, kind: str, tile: str, inputs: int, params: int, fields: int, outputs: int,
          dims: tuple) -> None:
    """Raise when `args` (names -> values, constexprs included) are not exactly the kernel's."""
    want = {n for group in arguments(kind, tile, inputs, params, fields, outputs, dims) for n in group}
    want |= set(constexprs(kind, tile))
    got = set(args)
    if got != want:
        raise RuntimeError(
            f"the {kind} Triton kernel and the runtime disagree on its arguments (missing "
            f"{sorted(want - got)}, unexpected {sorted(got - want)}): the generated module is from another "
            "psmc version; recompile it with `psmc compile`")


# The tree kernels of non-associative elementwise ops (psmc.codegen.triton_tree, launched by
# psmc.runtime.tree_kernels). Every tensor is contiguous fp32: per-token ones [B, T, L]
# (`leaf<i>` the lifted leaves, `pre<i>` the prefixes P, `node<i>` each leaf's tree node, and
# in the backward `gpre<i>`, `gnode<i>` their adjoints, `dleaf<i>` the leaves'), per-level ones
# [levels, B, L] (`root<i>`, `fold<i>`: the counter entering the call; in the backward
# `groot<i>`, `gfold<i>`: the per-level adjoint accumulators, which end as the adjoints of the
# entering counter), `dpar<i>` [B, L] (per program, summed by the runtime). m is the leaves the
# state holds, T this call's. With VARLEN set, B sequences are packed in one row of T tokens,
# sequence b at tokens cu[b] .. cu[b+1] - 1 (`cu`: int32 offsets), its counter at row b.
# The decode step of a `TreeCache` ('step') takes one token per row, `leaf<i>` and `pre<i>`
# [B, L], the cache's slots `root<i>`, `fold<i>` [B, levels, L] (updated in place: the runtime
# hands it copies) and `count` [B] int64, the tokens each row has seen.
TREE_CONSTEXPRS = ("BLOCK_C", "VARLEN", "HAS_GNODE")


def tree_arguments(kind: str, fields: int, params: int, dims: tuple) -> tuple[tuple[str, ...], ...]:
    """The run-time arguments of a tree kernel ('forward' or 'backward'), grouped as its
    signature prints them (the constexprs are TREE_CONSTEXPRS; the forward takes BLOCK_C only)."""
    assert kind in ("forward", "backward", "step"), kind
    if kind == "step":
        per_field = ("leaf", "root", "fold", "pre")
    else:
        per_field = ("leaf", "root", "fold", "pre", "node") + (("gpre", "gnode", "dleaf", "groot", "gfold")
                                                              if kind == "backward" else ())
    out = [tuple(f"{name}{i}" for i in range(fields)) for name in per_field]
    out.append(tuple(x for i in range(params) for x in (f"par{i}", f"par{i}_sl")))
    if kind == "backward":
        out.append(tuple(f"dpar{i}" for i in range(params)))
    out.append(("count", "B", "L", "levels") if kind == "step" else ("m", "T", "B", "L", "cu"))
    out.append(tuple(dim(d) for d in dims))
    return tuple(g for g in out if g)


def tree_constexprs(kind: str) -> tuple[str, ...]:
    return {"forward": TREE_CONSTEXPRS[:2], "backward": TREE_CONSTEXPRS, "step": TREE_CONSTEXPRS[:1]}[kind]


def check_tree(args: dict, kind: str, fields: int, params: int, dims: tuple) -> None:
    """Raise when `args` are not exactly a tree kernel's."""
    want = {n for group in tree_arguments(kind, fields, params, dims) for n in group} | set(tree_constexprs(kind))
    if set(args) != want:
        raise RuntimeError(
            f"the tree {kind} Triton kernel and the runtime disagree on its arguments (missing "
            f"{sorted(want - set(args))}, unexpected {sorted(set(args) - want)}): the generated module is from "
            "another psmc version; recompile it with `psmc compile`")
