"""`psmc check` and `psmc compile`.

Exit status: 0 when every file is valid, 1 when any has an error (reported as
file:line:col with a caret), 2 on an internal error (set PSMC_DEBUG=1 for the traceback).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import sympy

from . import __version__
from .errors import PsmcError
from .analysis.result import EXACT_NOTE
from .ir.nodes import OpIR, type_str


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="psmc", description="Compiler for prefix-scannable sequence layers.")
    parser.add_argument("--version", action="version", version=f"psmc {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="check .psm files: types, algebra verdicts and the plan")
    check.add_argument("files", nargs="+")
    check.add_argument("--json", action="store_true", help="print a JSON list, one object per op")
    check.add_argument("--dim", action="append", default=[], metavar="NAME=INT",
                       help="bind a dim to count parameters (repeatable)")
    comp = sub.add_parser("compile", help="compile a .psm file to a standalone Python module")
    comp.add_argument("file")
    comp.add_argument("-o", "--output", help="output .py path (default: FILE's name with .py, here)")
    args = parser.parse_args(argv)
    try:
        if args.command == "check":
            return _check(args.files, args.json, _parse_dims(args.dim, parser))
        return _compile(args.file, args.output)
    except PsmcError as err:  # errors outside a file's own checks
        print(err.render(), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # e.g. `psmc check ... | head`
        sys.stderr.close()
        return 0
    except Exception as err:  # never a traceback for the user
        if os.environ.get("PSMC_DEBUG"):
            raise
        print(f"psmc: internal error: {type(err).__name__}: {err}\n"
              "This is a bug in psmc; set PSMC_DEBUG=1 to see the traceback and please report it.",
              file=sys.stderr)
        return 2


def _parse_dims(items, parser) -> dict:
    dims = {}
    for item in items:
        name, _, value = item.partition("=")
        if not name or not value.isdigit() or int(value) < 1:
            parser.error(f"--dim expects NAME=POSITIVE_INT, got {item!r}")
        dims[name] = int(value)
    return dims


def _read(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PsmcError(f"{path}: no such file") from None
    except UnicodeDecodeError as err:
        raise PsmcError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    except OSError as err:
        raise PsmcError(f"{path}: cannot read: {err.strerror}") from None


def _check(files: list[str], as_json: bool, dims: dict) -> int:
    from .compiler import analyse_op, codegen_notes, plan_op
    from .ir import ops_from_source

    failed = False
    records = []
    for path in files:
        try:
            ops = ops_from_source(_read(path), path)
            analyses = [analyse_op(op) for op in ops]
            planned = [plan_op(op, a) for op, a in zip(ops, analyses)]  # (canonical op, plan)
        except PsmcError as err:
            failed = True
            if as_json:
                record = err.as_dict()
                record["file"] = record["file"] or path  # errors without a span (unreadable file)
                records.append({"file": path, "errors": [record]})
            else:
                print(err.render(), file=sys.stderr)
            continue
        for op, analysis, (canonical, plan) in zip(ops, analyses, planned):
            notes = codegen_notes(canonical, plan)  # what the generated module is printed from
            if as_json:
                records.append({**_op_record(path, op, analysis, dims), **plan.as_dict(), **notes})
            else:
                print(_op_text(path, op, analysis, plan, dims, notes))
                print()
    if as_json:
        print(json.dumps(records, indent=2, default=str))
    return 1 if failed else 0


def _param_count(op: OpIR, dims: dict):
    total = sum((sympy.prod(p.shape) if p.shape else sympy.Integer(1)) for p in op.params)
    total = sympy.expand(sympy.sympify(total))
    bound = total.subs({sympy.Symbol(k, integer=True, positive=True): v for k, v in dims.items()})
    return total, (int(bound) if bound.is_number else None)


def _op_record(path: str, op: OpIR, analysis, dims: dict) -> dict:
    def slots(values):
        return [{"name": v.name, "dtype": v.dtype, "shape": [str(d) for d in v.shape]} for v in values]
    formula, count = _param_count(op, dims)
    record = {
        "file": path, "op": op.name, "dims": list(op.dims), "state": slots(op.state),
        "inputs": slots(op.inputs), "outputs": slots(op.outputs),
        "chunk": None if op.chunk is None else str(op.chunk),
        "params": [dict(name=p.name, dtype=p.dtype, shape=[str(d) for d in p.shape], init=list(p.init))
                   for p in op.params],
        "param_count": str(formula) if count is None else count,
        "readout": "exclusive" if op.exclusive else "inclusive",
    }
    record.update(analysis.as_dict())
    record["op"] = op.name
    return record


def _op_text(path: str, op: OpIR, analysis, plan, dims: dict, notes: dict) -> str:
    from .plan import FAST_PATH_GPU, FAST_PATH_WORDS, STATE_LOOP_GPU

    dims_text = f"[{', '.join(op.dims)}]" if op.dims else ""
    lines = [f"{path}: op {op.name}{dims_text}"]

    def row(label, value):
        lines.append(f"  {label:<15}{value}")
    row("state", ", ".join(str(v) for v in op.state))
    row("inputs", ", ".join(str(v) for v in op.inputs) or "none")
    row("outputs", ", ".join(f"{type_str(v.dtype, v.shape)}" for v in op.outputs)
        + ("  (from the exclusive prefix)" if op.exclusive else ""))
    row("chunk", "none (token level)" if op.chunk is None else str(op.chunk))
    if op.params:
        formula, count = _param_count(op, dims)
        shown = ", ".join(f"{p.name}: {type_str(p.dtype, p.shape)}" for p in op.params)
        total = f"{count:,}" if count is not None else f"{formula} (pass --dim to count)"
        row("params", f"{shown}  = {total} parameters")
    else:
        row("params", "none")
    for label, text in analysis.rows(algebra_only=True):  # (in this block's columns)
        row(label, text)
    row("structure", plan.structure)
    row("plan", f"{plan.scan}; " + ", ".join(f"{p} {'+'.join(b)}" for p, b in plan.backends.items()))
    for label, text in plan.rows():
        row(label, text)
    row("stream state", f"{plan.state_size}: the inclusive prefix ({', '.join(plan.stream_fields)})"
        if plan.scan == "exact-scan" and op.chunk is None else f"{plan.state_size}: {analysis.state}")
    fast = plan.fast_path
    row("fast path", FAST_PATH_WORDS.get(fast, fast) + " (torch)" if fast else "none: the generic scan")
    if fast == "first_order" and any(f.shape for f in op.state) and not notes["triton"].startswith("triton: none"):
        # dispatch's costs: the fused state loop before a scan with the lift and readout in torch
        row("on a GPU", STATE_LOOP_GPU + " (backend='auto', CUDA tensors)")
    elif fast in FAST_PATH_GPU:
        row("on a GPU", FAST_PATH_GPU[fast] + " (backend='auto', CUDA tensors)")
    row("kernels", notes["triton"])
    row("", notes["cpu"])
    row("note", EXACT_NOTE)
    return "\n".join(lines)


def _compile(path: str, output: str | None) -> int:
    from .compiler import compile_source

    text = _read(path)
    try:
        compiled = compile_source(text, path)
    except PsmcError as err:
        print(err.render(), file=sys.stderr)
        return 1
    out = Path(output) if output else Path(Path(path).stem + ".py")
    out.write_text(compiled.source, encoding="utf-8")
    names = ", ".join(op.name for op in compiled.ops)
    print(f"wrote {out} ({names})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
