"""IR → Triton source: the paper's fixed tree for non-associative elementwise aggregators.

A tree-scan plan (PAPER.md §3) has no associative combine, so no `tl.associative_scan` can
serve it: the brackets must be the Blelloch tree's, bracket for bracket. These kernels walk the
tree as the stream does, one leaf at a time, which keeps its brackets by construction:

    leaf t (t = m+1 .. m+T, counting the state's m leaves):
      node = leaf;  for d below t's lowest set bit k:  node = Agg(root_d, node)
      P(t) = node when t is a power of two, else Agg(P(t - 2^k), node)

root_d is the tree that ended at leaf t - 2^d: this call's node of that leaf, or the state's
root at level d. P(t - 2^k) is this call's prefix there or the state's fold at that level.
One program owns one batch row and BLOCK_C lanes (every value of Agg is a scalar per lane; the
elements of vector fields, all of one shape, are lanes of their own):
each thread walks time for its own lanes, with two Agg per leaf on average, and reads the
roots and folds back from the node and prefix tensors it wrote (only its own lanes: no other
thread's writes are read). The backward walks the leaves in reverse with the adjoint of the
same counter: adjoints of roots and folds wait in per-level accumulators until the leaf that
made them, and the carry's inner nodes are recomputed (their count is k, amortised O(1)).

Lift and readout stay in torch (psmc.runtime.tree_kernels calls these kernels from the tree
scan only): they are elementwise and batched over the whole sequence already.
"""
from __future__ import annotations

from ..ir.nodes import OpIR, walk
from ..runtime import triton_abi
from .triton_layout import _triton_cannot, tree_reason
from .triton_printer import PREFIX, TritonBodyPrinter, compute_dtype
from .triton_vjp import VjpPrinter


def unsupported_reason(op: OpIR, plan) -> str | None:
    """Why a tree-scan op gets no Triton tree kernels, or None when it does (an exact scan is
    not this printer's: its block-scan kernels are psmc.codegen.triton_printer's)."""
    return tree_reason(op, plan, _triton_cannot, floats=TREE_FLOATS)


TREE_FLOATS = frozenset({"f32", "f16", "bf16"})  # computed in fp32, as every Triton kernel does


class _LaneVjp(VjpPrinter):
    """The VJP with every value a scalar per lane: a rank-0 operand of a vector field's value
    (a param, a constant) is per lane here too, so its adjoint is not summed over the columns
    of a tile (the kernel's columns are lanes; the runtime sums a shared param's adjoint)."""

    def unbroadcast(self, node, arg, contribution: str) -> str:
        return contribution


def kernel_names(op: OpIR) -> dict:
    base = PREFIX + "Op_" + op.name + "_tree"
    return {"agg": base + "_agg", "agg_vjp": base + "_agg_vjp", "forward": base + "_forward",
            "backward": base + "_backward", "step": base + "_step"}


class TreePrinter:
    def __init__(self, op: OpIR):
        self.op = op
        self.names = kernel_names(op)
        self.fields = [f.name for f in op.state]
        # the params the combine reads (a scalar per lane, or one for all lanes)
        read = {n.attrs[0] for n in walk(tuple(op.combine)) if n.op == "param"}
        self.params = [p for p in op.params if p.name in read]  # float scalars (unsupported_reason)

    # -- the two helpers: Agg and its vector-Jacobian product
    def _extras(self) -> list[str]:
        """What an Agg body may read besides its operands: params, dims, the column mask."""
        return [f"p_{p.name}" for p in self.params] + [f"dim_{d}" for d in self.op.dims] + ["col_ok"]

    def agg_function(self) -> list[str]:
        args = [f"l_{f}" for f in self.fields] + [f"r_{f}" for f in self.fields] + self._extras()
        printer = TritonBodyPrinter(tuple(self.op.combine), "k")
        body = printer.run()
        results = [f"({printer.names[node]}).to(tl.float32)" for node in self.op.combine]
        lines = ["@_psm_jit", f"def {self.names['agg']}({', '.join(args)}):", "    # Agg(l, r): the op's combine"]
        lines += ["    " + line for line in body]
        return lines + ["    return " + ", ".join(results)]

    def agg_vjp_function(self) -> list[str]:
        """(adjoints of l's fields, of r's fields, of the float params) given those of Agg's
        outputs `g_<field>`."""
        op = self.op
        args = [f"l_{f}" for f in self.fields] + [f"r_{f}" for f in self.fields] + \
            [f"g_{f}" for f in self.fields] + self._extras()
        vjp = _LaneVjp(tuple(op.combine), tuple(f"g_{f}" for f in self.fields),
                         lambda n: n.op == "field" or n.op == "param", "co")
        body = vjp.run()
        found = {(n.op, n.attrs[:2] if n.op == "field" else n.attrs[0]): name for n, name in vjp.leaf_adjoints.items()}
        zero = "tl.zeros_like(g_{})".format(self.fields[0])
        results = [found.get(("field", ("left", f)), zero) for f in self.fields]
        results += [found.get(("field", ("right", f)), zero) for f in self.fields]
        results += [found.get(("param", p.name), zero) for p in self.params]
        lines = ["@_psm_jit", f"def {self.names['agg_vjp']}({', '.join(args)}):",
                 "    # the vector-Jacobian product of Agg at (l, r) for the adjoints g"]
        lines += ["    " + line for line in body]
        return lines + ["    return " + ", ".join(f"({r}) + tl.zeros_like(g_{self.fields[0]})" for r in results)]

    # -- pieces of both kernels
    def _signature(self, kind: str) -> list[str]:
        groups = triton_abi.tree_arguments(kind, len(self.fields), len(self.params), tuple(self.op.dims))
        lines = ["    " + ", ".join(g) + "," for g in groups]
        return lines + ["    " + ", ".join(f"{c}: tl.constexpr" for c in triton_abi.tree_constexprs(kind)) + ","]

    def _prologue(self) -> list[str]:
        lines = ["lane = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)[None, :]",
                 "b = tl.program_id(1)",
                 "col_ok = lane < L",
                 "# token j of this program's sequence and lane is at tokens + j * L; level d of the counter at counter + d * B * L",
                 "Lw = (b * 0 + L).to(tl.int64)  # offsets in 64 bits: B * T * L may pass 2**31",
                 "if VARLEN:  # packed sequences: program b runs sequence b, tokens cu[b] .. cu[b+1] - 1 of row 0",
                 "    seq0 = tl.load(cu + b)",
                 "    T_b = tl.load(cu + b + 1) - seq0",
                 "    tokens = seq0.to(tl.int64) * Lw + lane",
                 "else:",
                 "    T_b = T",
                 "    tokens = b * T * Lw + lane",
                 "counter = b * Lw + lane",
                 "level = (b * 0 + B) * Lw"]
        return lines + self._dims_and_params()

    def _dims_and_params(self) -> list[str]:
        lines = [f"dim_{d} = d_{d} + tl.zeros((1, 1), tl.int32)" for d in self.op.dims]
        for i, p in enumerate(self.params):
            lines.append(f"p_{p.name} = tl.load(par{i} + lane * par{i}_sl, mask=col_ok, other=0)"
                         f".to({compute_dtype(p.dtype)})")
        return lines

    def _args(self, left: str, right: str, grads: str | None = None) -> str:
        """The arguments of the Agg helper (or, with `grads`, of its VJP): the fields of the
        operands named `left`<i>, `right`<i> (and the adjoints `grads`<i>), then the extras."""
        names = [left, right] + ([grads] if grads else [])
        return ", ".join([f"{x}{i}" for x in names for i in range(len(self.fields))] + self._extras())

    def _earlier(self, target: str, ours: str, theirs: str, s: str, level: str, some: str = "") -> list[str]:
        """`target`<i> = the value at leaf `s`: this call's `ours` tensor there when s is past m,
        else the state's `theirs` table at `level` (`some`: a condition for reading at all)."""
        # (tiles, not scalars, so the interpreter takes `col_ok & new` as a mask too)
        lines = [f"new = (lane * 0 + {s}) > m", f"old = {some}(new == 0)"]
        for i, _ in enumerate(self.fields):
            lines.append(f"{target}{i} = tl.where(new, tl.load({ours}{i} + tokens + ({s} - m - 1) * Lw, "
                         f"mask=col_ok & new, other=0.0), tl.load({theirs}{i} + counter + {level} * level, "
                         f"mask=col_ok & old, other=0.0))")
        return lines

    def _root(self, target: str, d: str, s: str) -> list[str]:
        """`target`<i> = the root at level `d`: the tree that ended at leaf `s` (this call's
        node there, or the state's root)."""
        return self._earlier(target, "node", "root", s, d)

    def _fold(self) -> list[str]:
        """f<i> = P(rest) (rest = t - 2^k > 0): this call's prefix there, or the state's fold at
        rest's lowest set bit `lv`."""
        lines = ["lv = k + 1",
                 "while (rest > 0) & (((rest >> lv) & 1) == 0):",
                 "    lv += 1"]
        return lines + self._earlier("f", "pre", "fold", "rest", "lv", some="((lane * 0 + rest) > 0) & ")

    def _lowest_bit(self) -> list[str]:
        return ["k = t * 0  # t's lowest set bit", "while ((t >> k) & 1) == 0:", "    k += 1"]

    def _call(self, results: str, fn: str, args: str) -> str:
        return f"{results} = {self.names[fn]}({args})"

    def _fields(self, name: str) -> str:
        return ", ".join(f"{name}{i}" for i in range(len(self.fields)))

    # -- the kernels
    def forward_kernel(self) -> list[str]:
        n = len(self.fields)
        lines = ["@_psm_jit", f"def {self.names['forward']}("] + self._signature("forward") + ["):"]
        body = self._prologue()
        body.append("for j in range(0, T_b):")
        loop = ["t = b * 0 + m + j + 1  # leaves so far, this one included (a tensor, also in the interpreter)"]
        loop += [f"n{i} = tl.load(leaf{i} + tokens + j * Lw, mask=col_ok, other=0.0).to(tl.float32)"
                 for i in range(n)]
        loop += ["k = t * 0",
                 "while ((t >> k) & 1) == 0:  # the binary carry: merge the trees of equal size below t's lowest bit"]
        carry = self._root("r", "k", "t - (1 << k)")
        carry.append(self._call(self._fields("n"), "agg", self._args("r", "n")))
        carry.append("k += 1")
        loop += ["    " + x for x in carry]
        loop += [f"tl.store(node{i} + tokens + j * Lw, n{i}, mask=col_ok)" for i in range(n)]
        loop.append("rest = t - (1 << k)  # P(t) = Agg(P(rest), node), or the node alone when rest is 0")
        loop += self._fold()
        loop.append(self._call(self._fields("q"), "agg", self._args("f", "n")))
        loop += [f"tl.store(pre{i} + tokens + j * Lw, tl.where(rest > 0, q{i}, n{i}), mask=col_ok)"
                 for i in range(n)]
        body += ["    " + x for x in loop]
        return lines + ["    " + x for x in body]

    def backward_kernel(self) -> list[str]:
        n, np_ = len(self.fields), len(self.params)
        lines = ["@_psm_jit", f"def {self.names['backward']}("] + self._signature("backward") + ["):"]
        body = self._prologue()
        body += [f"dp{i} = tl.zeros((1, BLOCK_C), tl.float32)" for i in range(np_)]
        body.append("for jr in range(0, T_b):")
        loop = ["j = T_b - 1 - jr", "t = b * 0 + m + j + 1", "at = tokens + j * Lw"]
        loop += self._lowest_bit()
        # the adjoint reaching P(t): its own, plus what the later leaves that folded it sent
        # to the fold at level k; the node's: what the leaf that merged it sent to root k
        for i in range(n):
            loop += [f"gq{i} = tl.load(gpre{i} + at, mask=col_ok, other=0.0) + "
                     f"tl.load(gfold{i} + counter + k * level, mask=col_ok, other=0.0)",
                     f"gn{i} = tl.load(groot{i} + counter + k * level, mask=col_ok, other=0.0)",
                     f"if HAS_GNODE:",
                     f"    gn{i} += tl.load(gnode{i} + at, mask=col_ok, other=0.0)",
                     f"tl.store(gfold{i} + counter + k * level, tl.zeros_like(gq{i}), mask=col_ok)",
                     f"tl.store(groot{i} + counter + k * level, tl.zeros_like(gn{i}), mask=col_ok)",
                     f"n{i} = tl.load(node{i} + at, mask=col_ok, other=0.0)"]
        loop.append("rest = t - (1 << k)")
        loop += self._fold()
        grads = self._fields("gl") + ", " + self._fields("gr") + "".join(f", gp{i}" for i in range(np_))
        loop.append(self._call(grads, "agg_vjp", self._args("f", "n", "gq")))
        loop.append("folded = col_ok & ((lane * 0 + rest) > 0)")
        for i in range(n):
            loop += [f"gn{i} += tl.where(rest > 0, gr{i}, gq{i})",
                     f"tl.store(gfold{i} + counter + lv * level, tl.load(gfold{i} + counter + lv * level, mask=folded, "
                     f"other=0.0) + gl{i}, mask=folded)"]
        loop += [f"dp{i} += tl.where(rest > 0, gp{i}, 0.0)" for i in range(np_)]
        # the carry in reverse: node_{d+1} = Agg(root_d, node_d), node_0 the leaf; node_d is
        # recomputed from the leaf (d Agg: k^2 / 2 in all, a constant on average)
        loop.append("for dd in range(0, k):")
        inner = ["d = k - 1 - dd"]
        inner += [f"c{i} = tl.load(leaf{i} + at, mask=col_ok, other=0.0).to(tl.float32)" for i in range(n)]
        inner.append("for e in range(0, d):")
        redo = self._root("r", "e", "t - (1 << e)")
        redo.append(self._call(self._fields("c"), "agg", self._args("r", "c")))
        inner += ["    " + x for x in redo]
        inner += self._root("r", "d", "t - (1 << d)")
        inner.append(self._call(grads, "agg_vjp", self._args("r", "c", "gn")))
        for i in range(n):
            inner += [f"tl.store(groot{i} + counter + d * level, tl.load(groot{i} + counter + d * level, mask=col_ok, "
                      f"other=0.0) + gl{i}, mask=col_ok)",
                      f"gn{i} = gr{i}"]
        inner += [f"dp{i} += gp{i}" for i in range(np_)]
        loop += ["    " + x for x in inner]
        loop += [f"tl.store(dleaf{i} + at, gn{i}, mask=col_ok)" for i in range(n)]
        body += ["    " + x for x in loop]
        body += [f"tl.store(dpar{i} + counter, dp{i}, mask=col_ok)" for i in range(np_)]
        return lines + ["    " + x for x in body]


    def cache_step_kernel(self) -> list[str]:
        """One token per row of a `TreeCache` (psmc.runtime.state): the push of `TreeState.push`
        for row b's count, each thread for its lanes. The carry merges the roots below the
        count's lowest clear bit k (a loop as long as this row needs, where the torch push
        computes every level), lands at level k, and its fold is Agg(the fold at the next set
        bit above k, carry), the row's new prefix."""
        n = len(self.fields)
        lines = ["@_psm_jit", f"def {self.names['step']}("] + self._signature("step") + ["):"]
        body = ["lane = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)[None, :]",
                "b = tl.program_id(1)",
                "col_ok = lane < L",
                "# row b's token at token; level d of its counter at slots + d * L",
                "Lw = (b * 0 + L).to(tl.int64)  # offsets in 64 bits: B * levels * L may pass 2**31",
                "token = b * Lw + lane",
                "slots = b * levels * Lw + lane"]
        body += self._dims_and_params()
        body.append("c = tl.load(count + b)  # the tokens row b has seen")
        body += [f"n{i} = tl.load(leaf{i} + token, mask=col_ok, other=0.0).to(tl.float32)" for i in range(n)]
        body += ["k = c * 0",
                 "while ((c >> k) & 1) == 1:  # the binary carry: merge the trees of equal size below c + 1's lowest bit"]
        carry = [f"r{i} = tl.load(root{i} + slots + k * Lw, mask=col_ok, other=0.0)" for i in range(n)]
        carry.append(self._call(self._fields("n"), "agg", self._args("r", "n")))
        carry.append("k += 1")
        body += ["    " + x for x in carry]
        body += [f"tl.store(root{i} + slots + k * Lw, n{i}, mask=col_ok)" for i in range(n)]
        body += ["rest = c + 1 - (1 << k)  # the count's set bits above k: the prefix is Agg(P(rest), node)",
                 "lv = k + 1",
                 "while (rest > 0) & (((rest >> lv) & 1) == 0):",
                 "    lv += 1",
                 "older = col_ok & ((lane * 0 + rest) > 0)"]
        body += [f"f{i} = tl.load(fold{i} + slots + lv * Lw, mask=older, other=0.0)" for i in range(n)]
        body.append(self._call(self._fields("q"), "agg", self._args("f", "n")))
        for i in range(n):
            body += [f"q{i} = tl.where(rest > 0, q{i}, n{i})",
                     f"tl.store(fold{i} + slots + k * Lw, q{i}, mask=col_ok)",
                     f"tl.store(pre{i} + token, q{i}, mask=col_ok)"]
        return lines + ["    " + x for x in body]


def registration(op: OpIR) -> list[str]:
    names = kernel_names(op)
    printer = TreePrinter(op)
    cls = f"__psmc_layers__[{op.name!r}]"
    return [
        "if _triton is not None:",
        f"    {cls}._tree_kernels = _ttree.TreeKernels(",
        f"        forward={names['forward']},",
        f"        backward={names['backward']},",
        f"        step={names['step']},",
        f"        fields={tuple(printer.fields)!r},",
        f"        params={tuple(p.name for p in printer.params)!r},",
        f"        dims={tuple(op.dims)!r},",
        "    )",
    ]


def generate(op: OpIR, plan) -> str | None:
    if unsupported_reason(op, plan) is not None:
        return None
    printer = TreePrinter(op)
    lines = printer.agg_function() + ["", ""] + printer.agg_vjp_function() + ["", ""]
    lines += printer.forward_kernel() + ["", ""] + printer.backward_kernel() + ["", ""]
    lines += printer.cache_step_kernel() + ["", ""] + registration(op)
    return "\n".join(lines) + "\n"


def describe(op: OpIR, plan) -> str | None:
    """The `psmc check` line of a tree-scan op's kernels (None for other plans)."""
    if unsupported_reason(op, plan) == "not a tree-scan plan":
        return None
    reason = unsupported_reason(op, plan)
    if reason is not None:
        return f"triton: none (tree scan: {reason}; the torch tree serves it)"
    return ("triton: tree forward + backward kernels, each thread walks the fixed tree's leaves for its lanes "
            "(the stream's bracketing, two Agg per leaf on average); lift and readout in torch; packed sequences "
            "in one launch, one tree each; a TreeCache's decode step in one launch")
