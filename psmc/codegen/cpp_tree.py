"""IR → C++ source: the tree kernels of a non-associative elementwise op on the CPU.

The same walk as the Triton tree kernels (psmc.codegen.triton_tree, whose docstring derives
it): leaf t merges the trees of equal size below its lowest set bit k (node = Agg(root_d, node)
for d < k), and P(t) = Agg(P(t - 2^k), node) unless t is a power of two. A work item is one
batch row and a block of LANE_BLOCK lanes, and every Agg of a leaf is one loop over that block
(the loop the compiler vectorises); work items run in parallel (OpenMP). Agg and its VJP are
printed once as scalar inline functions from the IR (psmc.codegen.cpp_printer's CppBody and
CppVjp, on a grid where every value is one number per lane).

Pointers (forward): leaf, root, fold, pre, node (one per field each), then the params.
Ints (forward): m, T, B, L, then each param's lane stride (0 shared, 1 per lane), then the dims,
then the packed sequences: 0, or 1 and the B + 1 token offsets of B sequences in one row of T.
Backward pointers: leaf, root, fold, pre, node, gpre, gnode, dleaf, groot, gfold, params, dpar;
ints: as the forward with has_gnode before the packed sequences. Tensors are the runtime's (psmc.runtime.tree_kernels):
per-token [B, T, L], per-level [levels, B, L], dpar [B, L], contiguous, in the compute dtype.
"""
from __future__ import annotations

from ..ir.nodes import OpIR, walk
from .cpp_printer import PRELUDE, CppBody, CppVjp, _cpp_cannot, exports, literal, source_section, symbol
from .triton_layout import tree_reason

LANE_BLOCK = 64  # lanes per work item


def unsupported_reason(op: OpIR, plan) -> str | None:
    return tree_reason(op, plan, _cpp_cannot)


class _ScalarGrid:
    """cpp_printer's Grid where every value is one number: an Agg's operands are one lane's."""

    mode = "lanes"

    def __init__(self, op: OpIR):
        self.op = op
        self.fields = {f.name: "" for f in op.state}

    def value_role(self, v) -> str:
        return ""

    def role(self, node) -> str:
        return ""

    def extent(self, role: str) -> str:
        return "1"

    def size(self, role: str) -> str:
        return "1"


class TreeCppPrinter:
    def __init__(self, op: OpIR):
        self.op = op
        self.name = symbol(op) + "_tree"
        self.fields = [f.name for f in op.state]
        read = {n.attrs[0] for n in walk(tuple(op.combine)) if n.op == "param"}
        self.params = [p for p in op.params if p.name in read]
        self.grid = _ScalarGrid(op)

    def _extras(self, typed: bool) -> list[str]:
        return [("scalar_t " if typed else "") + f"p_{p.name}" for p in self.params] + \
            [("int64_t " if typed else "") + f"dim_{d}" for d in self.op.dims]

    def agg_function(self) -> list[str]:
        body = CppBody(self.grid, tuple(self.op.combine), "k")
        lines = body.run()
        args = [f"scalar_t l_{f}" for f in self.fields] + [f"scalar_t r_{f}" for f in self.fields]
        args += self._extras(True) + [f"scalar_t &out_{f}" for f in self.fields]
        out = ["template <typename scalar_t>", f"static inline void {self.name}_agg({', '.join(args)}) {{"]
        out += ["  " + x for x in lines]
        out += [f"  out_{f} = {self._ref(body, node)};" for f, node in zip(self.fields, self.op.combine)]
        return out + ["}"]

    def _ref(self, body: CppBody, node) -> str:
        name = body.names[node]
        return name if node.op not in ("const", "fill") else literal(node.attrs[0], node.dtype)

    def agg_vjp_function(self) -> list[str]:
        """Adds the adjoints of l's and r's fields and of the params to gl_, gr_, gp_."""
        vjp = CppVjp(self.grid, tuple(self.op.combine), tuple((f"g_{f}", "") for f in self.fields),
                     lambda n: n.op in ("field", "param"), "co")
        lines = vjp.run()
        args = [f"scalar_t l_{f}" for f in self.fields] + [f"scalar_t r_{f}" for f in self.fields]
        args += [f"scalar_t g_{f}" for f in self.fields] + self._extras(True)
        args += [f"scalar_t &gl_{f}" for f in self.fields] + [f"scalar_t &gr_{f}" for f in self.fields]
        args += [f"scalar_t &gp_{p.name}" for p in self.params]
        out = ["template <typename scalar_t>", f"static inline void {self.name}_agg_vjp({', '.join(args)}) {{"]
        out += ["  " + x for x in lines]
        for side, prefix in (("left", "gl_"), ("right", "gr_")):
            for f in self.fields:
                got = vjp.leaf_adjoints.get(("field", (side, f)))
                if got:
                    out.append(f"  {prefix}{f} += {got[0]};")
        for p in self.params:
            got = vjp.leaf_adjoints.get(("param", p.name))
            if got:
                out.append(f"  gp_{p.name} += {got[0]};")
        return out + ["}"]

    # -- the kernels
    def _header(self, groups: list, backward: bool) -> list[str]:
        """The forward's and the backward's arguments: `_arguments`, then the packed sequences."""
        lines, base = self._arguments(groups, ("m", "T", "B", "L"))
        if backward:
            lines.append(f"const bool has_gnode = N[{base}] != 0;")
            base += 1
        lines.append("// packed sequences (cu_seqlens): B sequences in one row of T tokens, sequence b its tokens "
                     "bos[b] .. bos[b + 1] - 1")
        lines.append(f"const int64_t *bos = N[{base}] != 0 ? N + {base + 1} : nullptr;")
        lines.append(f"const int64_t W = {LANE_BLOCK}, NL = (L + W - 1) / W;")
        return lines

    def _arguments(self, groups: list, sizes: tuple) -> tuple[list[str], int]:
        """(the declarations of the pointers `groups` ((name, const) each: one per field, per
        param for par/dpar) and of the ints `sizes`, the params' lane strides and the dims; the
        index of the next int)."""
        n = len(self.fields)
        lines, p = [], 0
        for group, const in groups:
            for i in range(n if group not in ("par", "dpar") else len(self.params)):
                q = "const " if const else ""
                lines.append(f"{q}scalar_t *__restrict__ {group}{i} = ({q}scalar_t *)P[{p}];")
                p += 1
        lines.append("const int64_t " + ", ".join(f"{name} = N[{i}]" for i, name in enumerate(sizes)) + ";")
        base = len(sizes)
        for i, _ in enumerate(self.params):
            lines.append(f"const int64_t par{i}_sl = N[{base + i}];")
        base += len(self.params)
        for j, d in enumerate(self.op.dims):
            lines.append(f"const int64_t dim_{d} = N[{base + j}]; (void)dim_{d};")
        return lines, base + len(self.op.dims)

    def _params_at(self) -> str:
        return "".join(f", par{i}[(l + c) * par{i}_sl]" for i in range(len(self.params))) + \
            "".join(f", dim_{d}" for d in self.op.dims)

    def _ptrs(self, target: str, kind: str, s: str, lv: str, table: str) -> list[str]:
        """`target`<i>: the row of C lanes of this call's `kind` tensor at leaf `s` when it is
        past m, else of the state's `table` at level `lv`."""
        return [f"const scalar_t *{target}{i} = {s} > m ? {kind}{i} + (first + ({s} - m - 1)) * L + l : "
                f"{table}{i} + ({lv} * B + b) * L + l;" for i in range(len(self.fields))]

    def _agg_loop(self, left: str, right: str, out: str) -> str:
        n = len(self.fields)
        ls = ", ".join(f"{left}{i}[c]" for i in range(n))
        rs = ", ".join(f"{right}{i}[c]" for i in range(n))
        os_ = ", ".join(f"{out}{i}[c]" for i in range(n))
        return f"PSM_IVDEP for (int64_t c = 0; c < C; ++c) {self.name}_agg<scalar_t>({ls}, {rs}{self._params_at()}, {os_});"

    def _function(self, kind: str, header: list, decls: list, item: list) -> list[str]:
        lines = ["template <typename scalar_t>", f"static void {self.name}_{kind}(void **P, const int64_t *N, int threads) {{"]
        lines += ["  " + x for x in header]
        lines += ["  #pragma omp parallel num_threads(threads)", "  {",
                  "    PsmFlushSubnormals<scalar_t> flush;"]
        lines += ["    " + x for x in decls]
        lines += ["    #pragma omp for schedule(static)", "    for (int64_t item = 0; item < B * NL; ++item) {",
                  "      const int64_t b = item / NL, l = (item % NL) * W, C = std::min<int64_t>(W, L - l);",
                  "      // its tokens: `steps` of them from token `first` of the [B * T] (packed: [T]) tokens",
                  "      const int64_t first = bos ? bos[b] : b * T, steps = bos ? bos[b + 1] - bos[b] : T;"]
        lines += ["      " + x for x in item]
        return lines + ["    }", "  }", "}"]

    def forward(self) -> list[str]:
        n = len(self.fields)
        header = self._header([("leaf", True), ("root", True), ("fold", True), ("pre", False), ("node", False),
                               ("par", True)], backward=False)
        item = ["for (int64_t j = 0; j < steps; ++j) {",
                "  const int64_t t = m + j + 1, at = (first + j) * L + l;  // leaves so far, this one included"]
        item += [f"  scalar_t *n{i} = node{i} + at, *q{i} = pre{i} + at;" for i in range(n)]
        item += [f"  for (int64_t c = 0; c < C; ++c) n{i}[c] = leaf{i}[at + c];" for i in range(n)]
        item += ["  int64_t k = 0;",
                 "  for (; !((t >> k) & 1); ++k) {  // the binary carry: merge the trees of equal size"]
        item += ["    " + x for x in self._ptrs("r", "node", "t - (int64_t(1) << k)", "k", "root")]
        item += ["    " + self._agg_loop("r", "n", "n"), "  }"]
        item += ["  const int64_t rest = t - (int64_t(1) << k);  // P(t) = Agg(P(rest), node), the node when rest is 0",
                 "  if (rest == 0) {"]
        item += [f"    for (int64_t c = 0; c < C; ++c) q{i}[c] = n{i}[c];" for i in range(n)]
        item += ["  } else {", "    int64_t lv = k + 1;", "    while (!((rest >> lv) & 1)) ++lv;"]
        item += ["    " + x for x in self._ptrs("f", "pre", "rest", "lv", "fold")]
        item += ["    " + self._agg_loop("f", "n", "q"), "  }", "}"]
        return self._function("forward", header, [], item)

    def backward(self) -> list[str]:
        n, np_ = len(self.fields), len(self.params)
        header = self._header([("leaf", True), ("root", True), ("fold", True), ("pre", True), ("node", True),
                               ("gpre", True), ("gnode", True), ("dleaf", False), ("groot", False), ("gfold", False),
                               ("par", True), ("dpar", False)], backward=True)
        decls = [f"PsmBuf<scalar_t> gq{i}_v(W), gn{i}_v(W), st{i}_v(64 * W), gl{i}_v(W), gr{i}_v(W);" for i in range(n)]
        decls += [f"PsmBuf<scalar_t> dp{i}_v(W);" for i in range(np_)]
        item = [f"scalar_t *gq{i} = gq{i}_v.data(), *gn{i} = gn{i}_v.data(), *st{i} = st{i}_v.data(), "
                f"*gl{i} = gl{i}_v.data(), *gr{i} = gr{i}_v.data();" for i in range(n)]
        item += [f"scalar_t *dp{i} = dp{i}_v.data(); for (int64_t c = 0; c < C; ++c) dp{i}[c] = 0;" for i in range(np_)]
        gps = "".join(f", dp{i}[c]" for i in range(np_))
        item += ["for (int64_t jr = 0; jr < steps; ++jr) {",
                 "  const int64_t j = steps - 1 - jr, t = m + j + 1, at = (first + j) * L + l;",
                 "  int64_t k = 0;", "  while (!((t >> k) & 1)) ++k;"]
        for i in range(n):
            item += [f"  {{ scalar_t *f = gfold{i} + (k * B + b) * L + l, *r = groot{i} + (k * B + b) * L + l;",
                     f"    for (int64_t c = 0; c < C; ++c) {{ gq{i}[c] = gpre{i}[at + c] + f[c]; f[c] = 0; "
                     f"gn{i}[c] = r[c] + (has_gnode ? gnode{i}[at + c] : scalar_t(0)); r[c] = 0; }} }}"]
        item += ["  const int64_t rest = t - (int64_t(1) << k);", "  if (rest == 0) {"]
        item += [f"    for (int64_t c = 0; c < C; ++c) gn{i}[c] += gq{i}[c];" for i in range(n)]
        item += ["  } else {", "    int64_t lv = k + 1;", "    while (!((rest >> lv) & 1)) ++lv;"]
        item += ["    " + x for x in self._ptrs("f", "pre", "rest", "lv", "fold")]
        item += [f"    const scalar_t *n{i} = node{i} + at;" for i in range(n)]
        item += ["    " + x for x in self._vjp_step("f", "n", "gq", gps, "gfold", "lv", "+=")]
        item += ["  }",
                 "  // the carry's inputs node_0 = the leaf, node_{d+1} = Agg(root_d, node_d), recomputed once into",
                 "  // a stack (levels x C), then its VJP in reverse"]
        item += [f"  for (int64_t c = 0; c < C; ++c) st{i}[c] = leaf{i}[at + c];" for i in range(n)]
        item.append("  for (int64_t e = 0; e + 1 < k; ++e) {")
        item += ["    " + x for x in self._ptrs("r", "node", "t - (int64_t(1) << e)", "e", "root")]
        item += [f"    const scalar_t *cc{i} = st{i} + e * W; scalar_t *nx{i} = st{i} + (e + 1) * W;" for i in range(n)]
        item += ["    " + self._agg_loop("r", "cc", "nx"), "  }"]
        item += ["  for (int64_t dd = 0; dd < k; ++dd) {", "    const int64_t d = k - 1 - dd;"]
        item += ["    " + x for x in self._ptrs("r", "node", "t - (int64_t(1) << d)", "d", "root")]
        item += [f"    const scalar_t *cc{i} = st{i} + d * W;" for i in range(n)]
        item += ["    " + x for x in self._vjp_step("r", "cc", "gn", gps, "groot", "d", "=")]
        item.append("  }")
        item += [f"  for (int64_t c = 0; c < C; ++c) dleaf{i}[at + c] = gn{i}[c];" for i in range(n)]
        item.append("}")
        item += [f"for (int64_t c = 0; c < C; ++c) dpar{i}[b * L + l + c] = dp{i}[c];" for i in range(np_)]
        return self._function("backward", header, decls, item)

    def step(self) -> list[str]:
        """A TreeCache token per row (the Triton step kernel's walk, psmc.codegen.triton_tree):
        row b's carry merges the roots while bit k of its count is set, lands at level k, and
        Agg(the fold at the next set bit above k, carry) is the fold there and the row's prefix.
        Pointers: leaf, root, fold, pre, params; slots [B, levels, L] updated in place (the
        runtime passes copies). Ints: B, L, levels, the params' lane strides, the dims, then
        each row's count."""
        n = len(self.fields)
        lines = ["template <typename scalar_t>",
                 f"static void {self.name}_step(void **P, const int64_t *N, int threads) {{"]
        header, base = self._arguments([("leaf", True), ("root", False), ("fold", False), ("pre", False),
                                        ("par", True)], ("B", "L", "levels"))
        lines += ["  " + x for x in header]
        lines += [f"  const int64_t *count = N + {base};  // the tokens each row has seen",
                  f"  const int64_t W = {LANE_BLOCK}, NL = (L + W - 1) / W;",
                  "  #pragma omp parallel num_threads(threads)", "  {",
                  "    PsmFlushSubnormals<scalar_t> flush;"]
        lines += [f"    PsmBuf<scalar_t> n{i}_v(W), q{i}_v(W);" for i in range(n)]
        item = ["const int64_t b = item / NL, l = (item % NL) * W, C = std::min<int64_t>(W, L - l);",
                "const int64_t c_b = count[b], at = b * L + l, row = b * levels * L + l;"]
        item += [f"scalar_t *n{i} = n{i}_v.data(), *q{i} = q{i}_v.data();" for i in range(n)]
        item += [f"for (int64_t c = 0; c < C; ++c) n{i}[c] = leaf{i}[at + c];" for i in range(n)]
        item += ["int64_t k = 0;", "for (; (c_b >> k) & 1; ++k) {  // the binary carry: merge the trees of equal size"]
        item += [f"  const scalar_t *r{i} = root{i} + row + k * L;" for i in range(n)]
        item += ["  " + self._agg_loop("r", "n", "n"), "}"]
        item += [f"for (int64_t c = 0; c < C; ++c) root{i}[row + k * L + c] = n{i}[c];" for i in range(n)]
        item += ["const int64_t rest = c_b + 1 - (int64_t(1) << k);  // the set bits above k: P = Agg(P(rest), node)",
                 "if (rest == 0) {"]
        item += [f"  for (int64_t c = 0; c < C; ++c) q{i}[c] = n{i}[c];" for i in range(n)]
        item += ["} else {", "  int64_t lv = k + 1;", "  while (!((rest >> lv) & 1)) ++lv;"]
        item += [f"  const scalar_t *f{i} = fold{i} + row + lv * L;" for i in range(n)]
        item += ["  " + self._agg_loop("f", "n", "q"), "}"]
        item += [f"for (int64_t c = 0; c < C; ++c) {{ fold{i}[row + k * L + c] = q{i}[c]; pre{i}[at + c] = q{i}[c]; }}"
                 for i in range(n)]
        lines += ["    #pragma omp for schedule(static)", "    for (int64_t item = 0; item < B * NL; ++item) {"]
        lines += ["      " + x for x in item]
        return lines + ["    }", "  }", "}"]

    def _vjp_step(self, left: str, right: str, grads: str, gps: str, table: str, level: str, node_op: str) -> list:
        """Agg's VJP at (`left`, `right`) for the adjoints `grads`: the left operand's adjoint adds
        into the accumulator `table` at `level`, the right one's goes to the node's adjoint gn
        (`node_op`: '+=' beside what it holds, '=' in place of it)."""
        n = len(self.fields)
        lines = [f"for (int64_t c = 0; c < C; ++c) {{ gl{i}[c] = 0; gr{i}[c] = 0; }}" for i in range(n)]
        lines.append(self._vjp_loop(left, right, grads, gps))
        return lines + [f"{{ scalar_t *a = {table}{i} + ({level} * B + b) * L + l; "
                         f"for (int64_t c = 0; c < C; ++c) {{ a[c] += gl{i}[c]; gn{i}[c] {node_op} gr{i}[c]; }} }}"
                         for i in range(n)]

    def _vjp_loop(self, left: str, right: str, grads: str, gps: str) -> str:
        n = len(self.fields)
        ls = ", ".join(f"{left}{i}[c]" for i in range(n))
        rs = ", ".join(f"{right}{i}[c]" for i in range(n))
        gs = ", ".join(f"{grads}{i}[c]" for i in range(n))
        outs = ", ".join([f"gl{i}[c]" for i in range(n)] + [f"gr{i}[c]" for i in range(n)])
        return (f"for (int64_t c = 0; c < C; ++c) {self.name}_agg_vjp<scalar_t>({ls}, {rs}, {gs}{self._params_at()}, "
                f"{outs}{gps});")

    def exports(self) -> list[str]:
        return exports(self.name, ("forward", "backward", "step"))


def generate(op: OpIR, plan) -> str | None:
    if unsupported_reason(op, plan) is not None:
        return None
    printer = TreeCppPrinter(op)
    lines = PRELUDE.split("\n") + printer.agg_function() + [""] + printer.agg_vjp_function() + [""]
    lines += printer.forward() + [""] + printer.backward() + [""] + printer.step() + [""] + printer.exports()
    return "\n".join(lines) + "\n"


def registration(op: OpIR, source_name: str) -> list[str]:
    printer = TreeCppPrinter(op)
    return [
        f"__psmc_layers__[{op.name!r}]._cpu_tree_kernels = _ttree.CpuTreeKernels(",
        f"    source={source_name},",
        f"    symbol={printer.name!r},",
        f"    fields={tuple(printer.fields)!r},",
        f"    field_dtypes={tuple(f.dtype for f in op.state)!r},",
        f"    params={tuple(p.name for p in printer.params)!r},",
        f"    dims={tuple(op.dims)!r},",
        ")",
    ]


def describe(op: OpIR, plan) -> str | None:
    reason = unsupported_reason(op, plan)
    if reason == "not a tree-scan plan":
        return None
    if reason is not None:
        return f"cpu: none (tree scan: {reason}; the torch tree serves it)"
    return (f"cpu: fused C++ tree forward + backward, one walk over the leaves per batch row x a block of "
            f"{LANE_BLOCK} lanes (the stream's bracketing); lift and readout in torch; packed sequences in one "
            "call, one tree each; a TreeCache's decode step in one call")


def generate_section(ops, plans: dict) -> list[str]:
    """The C++ tree kernels of a generated module: each tree op's source as a string constant
    and its registration; empty when no op gets them."""
    return source_section(ops, plans, generate, registration, "_PSM_CPP_TREE_", [
        "# ---- C++ tree kernels (psmc.codegen.cpp_tree), built on first use by psmc.runtime.cpu_support",
        "from psmc.runtime import tree_kernels as _ttree  # noqa: E402"])
