"""The typed IR of `.psm` operators and the checks that produce it."""
from __future__ import annotations

from pathlib import Path

from ..grammar.parser import parse
from .lower import lower_module
from .nodes import Node, OpIR, Param, Value, leaves, render, walk


def ops_from_source(text: str, filename: str = "<string>") -> list[OpIR]:
    """Parse and check `.psm` text; returns one OpIR per op or raises a PsmcError."""
    return lower_module(parse(text, filename))


def ops_from_file(path) -> list[OpIR]:
    path = Path(path)
    return ops_from_source(path.read_text(encoding="utf-8"), str(path))


__all__ = ["Node", "OpIR", "Param", "Value", "leaves", "render", "walk", "ops_from_source", "ops_from_file"]
