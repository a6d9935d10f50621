"""The generated backward kernel of an elementwise exact scan: a reverse scan of the adjoint.

Forward: e_t = lift(x_t), P_t = combine(P_{t-1}, e_t) (P_0 = e_0 for a fresh stream, else
combine(init, e_0)), y_t = readout(P_t, x_t). With G_t = dL/dP_t the adjoint runs backwards:

    G_t = readout_vjp_P(dy_t) + combine_vjp_left(P_t, e_{t+1})(G_{t+1}),  G_{T-1} starts at dL/dfinal
    dL/de_t = combine_vjp_right(P_{t-1}, e_t)(G_t)     (= G_t for the first token of a fresh stream)
    dx_t = lift_vjp_x(dL/de_t) + readout_vjp_x(dy_t),   dparams = sum_t of the same for params

Every VJP is printed from the IR (psmc.codegen.triton_vjp), never taken from the torch backend.
One program owns a batch row and a tile of lanes (the lanes tile model). It walks the blocks of the forward from last
to first: it recomputes the block's prefixes from the carry the forward saved at the block's
start (the same load → lift → scan → carry code as the forward), parks them in a per-program
scratch buffer (one block, so it stays in cache on a GPU), then steps the adjoint back through
the block token by token.
"""
from __future__ import annotations

from ..ir.nodes import OpIR
from .triton_layout import FLOATS
from .triton_printer import (KernelPrinter, TritonBodyPrinter, compute_dtype, kernel_names,
                             kernel_signature, sequence, token_pointer)
from .triton_vjp import VjpPrinter

_IN = ("arg", "param")


def backward_name(op: OpIR) -> str:
    return kernel_names(op)["backward"]


def _is_float(value) -> bool:
    return value.dtype in FLOATS


class BackwardPrinter(KernelPrinter):
    """The backward kernel of one op (reuses the forward's prologue and block recompute)."""

    def signature_backward(self) -> list[str]:
        return kernel_signature(self.op, "backward", "lanes")

    def scratch_offset(self, row: str) -> str:
        return f"((b * L + lane) * BLOCK_T + {row}) * S + sidx"

    def zeros_row(self) -> str:
        return "tl.zeros((1, BLOCK_C), tl.float32)"

    # -- the per-token adjoint step
    def token_loads(self) -> list[str]:
        lines = []
        for i, v in enumerate(self.op.inputs):
            ptr = token_pointer("in", i, "t", f"lane * in{i}_sl + sidx * in{i}_ss")
            lines.append(f"xt_{v.name} = tl.load({ptr}, mask=okr, other=0).to({compute_dtype(v.dtype)})")
        lines.append("indext = (start + t).to(tl.int64)")
        for i, f in enumerate(self.fields):
            dt = compute_dtype(f.dtype)
            lines.append(f"s_{f.name} = tl.load(ws{i} + {self.scratch_offset('r')}, mask=col_ok, other=0).to({dt})")
            prev = f"tl.load(ws{i} + {self.scratch_offset('tl.maximum(r - 1, 0)')}, mask=col_ok, other=0).to({dt})"
            lines.append(f"l_{f.name} = tl.where(r > 0, {prev}, c{i})")
        for i, out in enumerate(self.op.outputs):
            if _is_float(out):
                ptr = token_pointer("dout", i, "t", f"lane * dout{i}_sl + sidx * dout{i}_ss")
                lines.append(f"dy{i} = tl.load({ptr}, mask=okr, other=0).to(tl.float32)")
        return lines

    def token_adjoint(self) -> list[str]:
        op = self.op
        lines = self.token_loads()
        # readout: dy -> adjoints of the state P_t, the readout inputs and the params
        adjoints = tuple(f"dy{i}" if _is_float(o) else None for i, o in enumerate(op.outputs))
        readout = VjpPrinter(tuple(op.readout), adjoints, lambda n: n.op in ("field",) + _IN, "ro", "t")
        lines += readout.run()
        found = {(n.op, n.attrs[-1] if n.op == "field" else n.attrs[0]): name
                 for n, name in readout.leaf_adjoints.items()}
        for i, f in enumerate(self.fields):
            if _is_float(f):
                extra = found.get(("field", f.name))
                lines.append(f"gt{i} = gc{i}" + (f" + {extra}" if extra else ""))
        # the lift's values e_t, as the combine's right operand
        lift = TritonBodyPrinter(tuple(op.lift), "ut", "t")
        lines += lift.run()
        for f, node in zip(self.fields, op.lift):
            lines.append(f"r_{f.name} = {self.tile(lift.names[node], f.dtype, '(1, BLOCK_C)')}")
        # combine: G_t -> adjoints of the left (G_{t-1}) and right (dL/de_t) operands
        adj = tuple(f"gt{i}" if _is_float(f) else None for i, f in enumerate(self.fields))
        combine = VjpPrinter(tuple(op.combine), adj, lambda n: n.op == "field", "co", "t")
        lines += combine.run()
        sides = {(n.attrs[0], n.attrs[1]): name for n, name in combine.leaf_adjoints.items()}
        for i, f in enumerate(self.fields):
            if not _is_float(f):
                continue
            left = sides.get(("left", f.name), self.zeros_row())
            right = sides.get(("right", f.name), self.zeros_row())
            lines.append(f"ge{i} = tl.where(has_left, {right}, gt{i})")
            lines.append(f"gc{i} = tl.where(valid, tl.where(has_left, {left}, 0.0) + {self.zeros_row()}, gc{i})")
        # lift: dL/de_t -> adjoints of the lift inputs and the params
        adj = tuple(f"ge{i}" if _is_float(f) else None for i, f in enumerate(self.fields))
        lifted = VjpPrinter(tuple(op.lift), adj, lambda n: n.op in _IN, "li", "t")
        lines += lifted.run()
        for n, name in lifted.leaf_adjoints.items():
            key = (n.op, n.attrs[0])
            found[key] = f"{found[key]} + {name}" if key in found else name
        lines += self.store_input_grads(found)
        for i, p in enumerate(op.params):
            grad = found.get(("param", p.name))
            if grad is not None and _is_float(p):
                lines.append(f"dp{i} = dp{i} + tl.where(okr, {grad}, 0.0)")
        return lines

    def store_input_grads(self, found: dict) -> list[str]:
        lines = []
        for i, v in enumerate(self.op.inputs):
            if not _is_float(v):
                continue
            grad = found.get(("arg", v.name))
            value = f"({grad}) + {self.zeros_row()}" if grad else self.zeros_row()
            ptr = token_pointer("din", i, "t", f"lane * din{i}_sl + sidx * din{i}_ss")
            lines.append(f"tl.store({ptr}, {value}, mask=okr)")
        return lines

    # -- the kernel
    def backward_kernel(self) -> list[str]:
        op = self.op
        n = len(self.fields)
        lines = ["@_psm_jit", f"def {backward_name(op)}("] + self.signature_backward() + ["):"]
        body = self.prologue() + sequence(self.op, "backward")
        body.append("rows0 = tl.arange(0, BLOCK_T)[:, None]")
        for i, f in enumerate(self.fields):
            if _is_float(f):
                body.append("if HAS_DFIN:")
                body.append(f"    gc{i} = tl.load(dfin{i} + {self.state_offset(f)}, mask=col_ok, other=0.0) + "
                            f"{self.zeros_row()}")
                body.append("else:")
                body.append(f"    gc{i} = {self.zeros_row()}")
        body += [f"dp{i} = {self.zeros_row()}" for i in range(len(op.params))]
        body.append("n_blocks = tl.cdiv(T_b, BLOCK_T)")
        body.append("for bi in range(0, n_blocks):")
        loop = ["blk = n_blocks - 1 - bi", "rows = blk * BLOCK_T + rows0", "ok = (rows < T_b) & col_ok"]
        for i, f in enumerate(self.fields):
            dt = compute_dtype(f.dtype)
            loop.append(f"c{i} = tl.load(bnd{i} + {self.boundary_offset(f)}, mask=col_ok, other=0).to({dt})")
        loop += self.block_prefixes()
        loop.append("tl.debug_barrier()  # the previous block's reads of the scratch are done")
        loop += [f"tl.store(ws{i} + {self.scratch_offset('rows0')}, f{i}, mask=col_ok)" for i in range(n)]
        loop.append("tl.debug_barrier()  # the scratch is written before any thread reads it")
        loop.append("for ri in range(0, BLOCK_T):")
        # t and r as [1, BLOCK_C] tiles: the loop counters may be plain ints (interpreter)
        token = ["r = BLOCK_T - 1 - ri + sidx * 0", "t = blk * BLOCK_T + r", "valid = t < T_b", "okr = valid & col_ok",
                 "if HAS_INIT:", "    has_left = t >= 0", "else:", "    has_left = t > 0"]
        token += self.token_adjoint()
        loop += ["    " + line for line in token]
        body += ["    " + line for line in loop]
        for i, f in enumerate(self.fields):
            if _is_float(f):
                body.append("if HAS_INIT:")
                body.append(f"    tl.store(dini{i} + {self.state_offset(f)}, gc{i}, mask={self.state_mask(f)})")
        for i, p in enumerate(op.params):
            if _is_float(p):
                body.append(f"tl.store(dpar{i} + {self.state_offset(p)}, dp{i}, mask={self.state_mask(p)})")
        return lines + ["    " + line for line in body]
