"""Concrete points the analysis tests laws at, held exactly.

A `Point` is a choice of dims, of elements (a, b, c, x, e: one Grid per state field) and of
param values. Entries are exact: `Fraction` for floats (short decimals, so that float64 is
exact or nearly so), `int` for integer fields, `bool`, and the floats ±inf. The same point
is evaluated in float64 by `psmc.ir.interp` (fast search) and exactly by `symbolic`
(confirmation), and printed in DSL syntax by `dsl.py`.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from fractions import Fraction

import sympy
import torch

from ..ir.interp import concrete_shape, torch_dtype
from ..ir.types import is_float, is_int
from .grid import Grid

# Samplers for float entries: small integers first (readable counterexamples), then the
# shapes of values that expose other failures (halves, positives, tenths for saturating ops).
FLOAT_STYLES = (
    lambda rng: Fraction(rng.randint(-2, 2)),
    lambda rng: Fraction(rng.randint(0, 3)),
    lambda rng: Fraction(rng.randint(-6, 6), 2),
    lambda rng: Fraction(rng.randint(1, 6), 2),
    lambda rng: Fraction(rng.randint(-15, 15), 10),
)
PARAM_STYLE = lambda rng: Fraction(rng.randint(-10, 10), 10)  # noqa: E731


@dataclass
class Point:
    dims: dict
    elements: dict  # name -> tuple[Grid, ...] in state field order
    params: dict = field(default_factory=dict)  # name -> Grid

    def copy(self) -> "Point":
        return Point(dict(self.dims), {k: tuple(v) for k, v in self.elements.items()}, dict(self.params))


def random_entry(dtype: str, rng: random.Random, style):
    if dtype == "bool":
        return rng.random() < 0.5
    if is_int(dtype):
        return rng.randint(-3, 3)
    return style(rng)


def random_grid(dtype: str, shape, dims: dict, rng, style) -> Grid:
    return Grid.build(concrete_shape(shape, dims), lambda i: random_entry(dtype, rng, style))


def random_element(op, dims: dict, rng, style) -> tuple[Grid, ...]:
    return tuple(random_grid(f.dtype, f.shape, dims, rng, style) for f in op.state)


def random_params(op, dims: dict, rng) -> dict:
    return {p.name: random_grid(p.dtype, p.shape, dims, rng, PARAM_STYLE) for p in op.params}


# ---------------------------------------------------------------------------- conversions
def to_tensor(grid: Grid, dtype: str) -> torch.Tensor:
    def conv(v):
        if isinstance(v, bool) or dtype == "bool":
            return bool(v)
        if is_int(dtype):
            return int(v)
        return float(v)
    return torch.tensor(grid.map(conv).to_nested(), dtype=torch_dtype(dtype))


def to_sympy(value, precise_floats: bool = False):
    """An exact entry as a SymPy value; Floats of 60 digits when `precise_floats`."""
    if isinstance(value, bool):
        return value
    if isinstance(value, float):
        if math.isinf(value):
            return sympy.oo if value > 0 else -sympy.oo
        value = Fraction(value)
    if isinstance(value, int):
        return sympy.Integer(value)
    rational = sympy.Rational(value.numerator, value.denominator)
    return sympy.Float(rational, 60) if precise_floats else rational


def sympy_grid(grid: Grid, precise_floats: bool = False) -> Grid:
    return grid.map(lambda v: to_sympy(v, precise_floats))


def simpler(value) -> tuple:
    """Sort key: smaller keys read better in a counterexample."""
    if isinstance(value, bool):
        return (0, int(value))
    if isinstance(value, float):
        return (9, 0)
    v = Fraction(value)
    return (v.denominator, abs(v), v < 0)


def shrink_candidates(dtype: str) -> tuple:
    if dtype == "bool":
        return (False, True)
    if is_int(dtype):
        return (0, 1, -1, 2)
    assert is_float(dtype)
    return (Fraction(0), Fraction(1), Fraction(-1), Fraction(2), Fraction(-2), Fraction(1, 2), Fraction(3))
