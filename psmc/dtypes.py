"""The one dtype type of psmc, from lowering to the runtime.

`DType` is the dtype a `.psm` program declares or the IR infers (`f32`, `i64`, `bool`, ...).
Every IR node, value, param and runtime slot carries a `DType`; a `torch.dtype` exists only at
run time, where `psmc.runtime.ops.torch_dtypes(compute)` resolves each `DType` for one call
(`f32` computes in float64 when the call's inputs or params are float64). Nothing else
converts between the two, so no code can mistake one for the other.

A `DType` is a `str` enum: it prints, hashes and compares as its name (`DType.F32 == "f32"`),
so generated code, JSON output and cache keys spell dtypes exactly as the language does. This
module imports nothing: the IR, the analysis and the runtime of a generated layer share it.
"""
from __future__ import annotations

from enum import Enum


class DType(str, Enum):
    F16 = "f16"
    BF16 = "bf16"
    F32 = "f32"
    F64 = "f64"
    I32 = "i32"
    I64 = "i64"
    BOOL = "bool"

    # printed as the language spells it, in f-strings, str() and generated code (repr)
    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)

    def __repr__(self) -> str:
        return repr(self.value)

    def __reduce_ex__(self, protocol):  # pickles by name, like any enum
        return DType, (self.value,)

    @classmethod
    def of(cls, value) -> "DType":
        """A DType from itself or its name; anything else is a programming error."""
        if isinstance(value, cls):
            return value
        try:
            return cls(value)
        except ValueError:
            raise TypeError(f"not a psmc dtype: {value!r}") from None

    @property
    def is_float(self) -> bool:
        return self in _FLOATS

    @property
    def is_int(self) -> bool:
        return self in (DType.I32, DType.I64)

    @property
    def is_bool(self) -> bool:
        return self is DType.BOOL

    @property
    def category(self) -> int:
        """bool < int < float: a value can be stored in a slot of the same or a higher one."""
        return 2 if self.is_float else 1 if self.is_int else 0

    def python(self, value):
        """A Python number as this dtype's kind of number (bool, int or float)."""
        if self.is_bool:
            return bool(value)
        return float(value) if self.is_float else int(value)


_FLOATS = frozenset({DType.F16, DType.BF16, DType.F32, DType.F64})
