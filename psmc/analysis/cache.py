"""The analysis cache: results keyed by a content hash of the op's IR and of the code that
judges it (the sources of psmc.grammar, psmc.ir and psmc.analysis, and the psmc version), so
a change anywhere that could change a verdict is a new key: no schema number to bump by hand.

`ir_text(op)` renders everything the analysis reads, deterministically (nodes numbered in
topological order, with dtype, shape and attributes; no spans, no file names), so the same
op in another file or after a comment edit hits the same entry. Entries are JSON files under
$PSMC_CACHE_DIR (default: the platform's user cache directory + /psmc) in analysis/. A
missing, unreadable or malformed entry is recomputed and overwritten; a cache directory that
cannot be written is simply not used.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path

from .. import __version__
from ..ir.nodes import walk
from .result import Analysis

JUDGES = ("grammar", "ir", "analysis")  # the packages whose code can change a verdict


@functools.lru_cache(maxsize=1)
def code_fingerprint() -> str:
    """A hash of every source file that can change a verdict or what a record holds."""
    root = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256(__version__.encode())
    for package in JUDGES:
        for path in sorted((root / package).rglob("*")):
            if path.suffix in (".py", ".lark") and "__pycache__" not in path.parts:
                digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    for name in ("errors.py",):
        digest.update(name.encode() + b"\0" + (root / name).read_bytes())
    return digest.hexdigest()


def cache_dir() -> Path:
    env = os.environ.get("PSMC_CACHE_DIR")
    if env:
        return Path(env)
    if sys.platform == "win32":
        base = Path(os.environ.get("LOCALAPPDATA", Path.home() / "AppData" / "Local"))
    elif sys.platform == "darwin":
        base = Path.home() / "Library" / "Caches"
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "psmc"


def ir_text(op) -> str:
    """A deterministic rendering of the op's IR (everything the analysis depends on)."""
    lines = [f"op {op.name} dims={op.dims} chunk={op.chunk} exclusive={op.exclusive} "
             f"assumes={sorted(op.assumes)} lift={op.has_lift} readout={op.has_readout}"]
    for kind, values in (("param", op.params), ("state", op.state), ("lift_input", op.lift_inputs),
                         ("readout_input", op.readout_inputs), ("output", op.outputs)):
        for v in values:
            init = getattr(v, "init", None)
            lines.append(f"{kind} {v.name} {v.dtype} {tuple(map(str, v.shape))}" + (f" init={init}" if init else ""))
    bodies = (("lift", op.lift), ("combine", op.combine), ("identity", op.identity or ()), ("readout", op.readout))
    numbers: dict = {}
    for _, nodes in bodies:
        for n in walk(nodes):
            if n not in numbers:
                numbers[n] = len(numbers)
                args = ",".join(f"%{numbers[a]}" for a in n.args)
                lines.append(f"%{numbers[n]} = {n.op}({args}) attrs={_attrs(n.attrs)} {n.dtype} "
                             f"{tuple(map(str, n.shape))}")
    for name, nodes in bodies:
        lines.append(f"{name} -> " + ",".join(f"%{numbers[n]}" for n in nodes))
    return "\n".join(lines)


def _attrs(attrs) -> str:
    return repr(tuple(_attr(a) for a in attrs))


def _attr(a):
    if isinstance(a, tuple):
        return tuple(_attr(x) for x in a)
    if isinstance(a, (bool, int, float, str)) or a is None:
        return a
    return str(a)


def key(op) -> str:
    text = f"psmc analysis {code_fingerprint()}\n{ir_text(op)}"
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _path(k: str) -> Path:
    return cache_dir() / "analysis" / f"{k}.json"


def load(k: str) -> Analysis | None:
    try:
        record = json.loads(_path(k).read_text(encoding="utf-8"))
        return Analysis.from_record(record)
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return None


def store(k: str, analysis: Analysis) -> None:
    path = _path(k)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(analysis.to_record(), f, indent=1, sort_keys=True)
        os.replace(tmp, path)  # atomic: a concurrent reader sees the old or the new entry
    except OSError:
        return
