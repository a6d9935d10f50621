"""The Triton section of a generated module: every op's kernels, or why it gets none.

The entry point of the Triton printers: it imports the lanes printer and its backward
(psmc.codegen.triton_printer, triton_backward) and the token-loop tile models (triton_matrix:
matrix and state tiles), which build on triton_layout and import nothing above them: no
import cycle among them.
"""
from __future__ import annotations

from ..ir.nodes import OpIR
from .triton_backward import BackwardPrinter
from .triton_layout import kernel_layout, unsupported_reason
from .triton_matrix import MatrixPrinter, StatePrinter
from .triton_printer import PRELUDE, registration
from . import triton_tree


def generate(op: OpIR, plan: dict | None) -> str | None:
    """Module-level source (combine function, kernels, registration on the op's class) for
    one op, to be placed after the class and after PRELUDE; None when the op gets none."""
    if triton_tree.unsupported_reason(op, plan) is None:  # a tree-scan plan's own kernels
        return triton_tree.generate(op, plan)
    if unsupported_reason(op, plan) is not None:
        return None
    mode = kernel_layout(op).mode
    if mode in ("matrix", "state"):  # token loops over [R, C] or [lanes, S] tiles
        printer = MatrixPrinter(op) if mode == "matrix" else StatePrinter(op)
        lines = printer.forward_kernel() + ["", ""] + printer.step_kernel() + ["", ""]
        lines += printer.backward_kernel() + ["", ""] + registration(op)
        return "\n".join(lines) + "\n"
    printer = BackwardPrinter(op)
    lines = printer.combine_function() + ["", ""] + printer.forward_kernel() + ["", ""]
    lines += printer.step_kernel() + ["", ""] + printer.backward_kernel() + ["", ""] + registration(op)
    return "\n".join(lines) + "\n"


def generate_section(ops, plans: dict) -> list[str]:
    """The whole Triton part of a generated module: PRELUDE plus every op's kernels; empty
    when no op gets kernels. module.py appends these lines after the classes."""
    parts = [generate(op, plans.get(op.name)) for op in ops]
    parts = [p for p in parts if p is not None]
    if not parts:
        return []
    lines = list(PRELUDE)
    if any("_ttree." in part for part in parts):
        lines.append("from psmc.runtime import tree_kernels as _ttree  # noqa: E402")
    lines += ["", ""]
    for part in parts:
        lines += part.rstrip("\n").split("\n") + ["", ""]
    return lines


def describe(op: OpIR, plan: dict | None) -> str:
    """One line for `psmc check`: which passes run as Triton kernels."""
    tree = triton_tree.describe(op, plan)
    if tree is not None:
        return tree
    reason = unsupported_reason(op, plan)
    if reason is not None:
        return f"triton: none ({reason})"
    layout = kernel_layout(op)
    if layout.mode == "matrix":
        cols = f"all of {layout.cols}" if layout.full_tile else f"tiles of {layout.cols}"
        return (f"triton: forward + backward + step kernels, token loop over a [{layout.axis}, {layout.cols}] "
                f"tile (all of {layout.axis} x {cols})" + (", exclusive readout" if op.exclusive else "")
                + "; packed sequences in one launch")
    if layout.mode == "state":
        cols = f"all of {layout.axis}" if layout.full_tile else f"tiles of {layout.axis}"
        if layout.axis == 1:
            cols = "one column: scalar states"
        return (f"triton: forward + backward + step kernels, token loop over [lanes, {layout.axis}] tiles "
                f"(a block of lanes x {cols})" + (", exclusive readout" if op.exclusive else "")
                + "; packed sequences in one launch")
    return "triton: forward + backward + step kernels, tiled over lanes; packed sequences in one launch"
