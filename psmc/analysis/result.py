"""The analysis of one op as data: `Analysis` (what `psmc check` prints) and `Counterexample`.

Both are frozen dataclasses that round-trip through JSON (`to_record` / `from_record`), so
the cache can store them; `Analysis.as_dict()` gives exactly the keys of `psmc check --json`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .budget import ran_out

EXACT_NOTE = ("float ops are judged in exact arithmetic (real numbers; literals are the decimals "
              "they spell; rational functions agree where their denominators are nonzero), not in "
              "floating point")


@dataclass(frozen=True)
class Counterexample:
    """Concrete elements where the two sides of a law differ (entries as exact DSL text)."""

    law: str
    lhs_text: str  # e.g. combine(combine(a, b), c)
    rhs_text: str
    elements: tuple  # ((element name, ((field name, nested entry text), ...)), ...)
    left: str  # the value of lhs_text, DSL text
    right: str
    dims: tuple = ()  # ((dim, size), ...)
    params: tuple = ()  # ((param, nested entry text), ...)

    def element_text(self, name: str) -> str:
        fields = dict(self.elements)[name]
        return "(" + ", ".join(f"{f} = {_nested(v)}" for f, v in fields) + ")"

    @property
    def text(self) -> str:
        names = [name for name, _ in self.elements]
        where = ", ".join(f"{n} = {self.element_text(n)}" for n in names)
        out = f"{self.lhs_text} {_is(self.left)} but {self.rhs_text} {_is(self.right)} for {where}"
        extras = []
        if self.dims:
            extras.append(", ".join(f"{d} = {n}" for d, n in self.dims))
        if self.params:
            extras.append("params " + ", ".join(f"{p} = {_nested(v)}" for p, v in self.params))
        if extras:
            out += " (" + "; ".join(extras) + ")"
        return out

    def as_dict(self) -> dict:
        out = {name: self.element_text(name) for name, _ in self.elements}
        out.update(left=self.left, right=self.right)
        return out

    def to_record(self) -> dict:
        return _plain(dataclasses.asdict(self))

    @staticmethod
    def from_record(record: dict) -> "Counterexample":
        r = dict(record)
        r["elements"] = tuple((n, tuple((f, v) for f, v in fields)) for n, fields in r["elements"])
        r["dims"] = tuple((d, int(n)) for d, n in r["dims"])
        r["params"] = tuple((p, v) for p, v in r["params"])
        return Counterexample(**r)


def _nested(v) -> str:
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_nested(x) for x in v) + "]"
    return str(v)


def _is(value: str) -> str:
    """`= 0.19`, or `≈ 0.7616` for a rounded irrational value (already marked)."""
    return value if value.startswith("≈") else f"= {value}"


def _plain(value):
    """Tuples to lists, recursively (JSON's shape)."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


_CHOICES = {
    "associativity": ("proven", "refuted", "unknown", "assumed"),
    "structure": ("elementwise", "affine", "general"),
    "plan": ("exact-scan", "tree-scan"),
    "commutative": (True, False, None),
    "causal": (True, False, None),
}
_STRINGS = ("op", "method", "reason", "identity_kind", "identity_note", "commutative_note", "state_size", "state")


def _validate(r: dict) -> None:
    """Reject a cached record that does not have the shape of an Analysis."""
    for key, allowed in _CHOICES.items():
        # `is` for True/False/None (1 == True would pass), == for strings
        if not any(r[key] == a if isinstance(a, str) else r[key] is a for a in allowed):
            raise ValueError(f"bad {key}: {r[key]!r}")
    for key in _STRINGS:
        if not isinstance(r[key], str):
            raise ValueError(f"bad {key}: {r[key]!r}")
    if r["identity"] is not None and not isinstance(r["identity"], str):
        raise ValueError("bad identity")
    if r["associativity"] == "refuted" and r["counterexample"] is None:
        raise ValueError("a refutation without its counterexample")


@dataclass(frozen=True)
class Analysis:
    op: str
    associativity: str  # 'proven' | 'refuted' | 'unknown' | 'assumed'
    method: str  # how the verdict was reached (for refuted: how the counterexample was found)
    reason: str  # for unknown: why; else ''
    counterexample: Counterexample | None
    identity: str | None  # the two-sided identity, DSL text
    identity_kind: str  # declared | declared, unverified | inferred | left-only | right-only | none
    identity_note: str
    commutative: bool | None
    commutative_note: str
    structure: str  # 'elementwise' | 'affine' | 'general'
    elementwise_fields: tuple  # ((field, bool), ...): per-field elementwise-ness, for codegen
    causal: bool | None  # chunk ops: is the readout causal within the chunk; else None
    causal_violation: tuple | None  # (input, output row, later input row) when not causal
    plan: str  # 'exact-scan' | 'tree-scan'
    backends: tuple  # ((pass, (backend, ...)), ...)
    state_size: str
    state: str  # what the streaming state holds
    assumes: tuple = ()  # the op's `assume` properties

    def as_dict(self) -> dict:
        """The keys of `psmc check --json` (issue 3)."""
        return {
            "op": self.op,
            "associativity": self.associativity,
            "method": self.method if self.associativity != "unknown" else self.reason,
            "counterexample": self.counterexample.as_dict() if self.counterexample else None,
            "identity": self.identity,
            "commutative": self.commutative,
            "structure": self.structure,
            "causal": self.causal,
            "plan": self.plan,
            "backends": {p: list(b) for p, b in self.backends},
            "state_size": self.state_size,
        }

    def to_record(self) -> dict:
        record = _plain(dataclasses.asdict(self))
        record["counterexample"] = self.counterexample.to_record() if self.counterexample else None
        return record

    @staticmethod
    def from_record(record: dict) -> "Analysis":
        r = dict(record)
        names = {f.name for f in dataclasses.fields(Analysis)}
        if set(r) != names:
            raise ValueError("record keys do not match Analysis")
        r["counterexample"] = Counterexample.from_record(r["counterexample"]) if r["counterexample"] else None
        r["elementwise_fields"] = tuple((f, bool(v)) for f, v in r["elementwise_fields"])
        r["causal_violation"] = tuple(r["causal_violation"]) if r["causal_violation"] else None
        r["backends"] = tuple((p, tuple(b)) for p, b in r["backends"])
        r["assumes"] = tuple(r["assumes"])
        _validate(r)
        return Analysis(**r)

    def report(self, algebra_only: bool = False) -> str:
        """A readable block for `psmc check` (the caller prints the op's name above it).
        algebra_only: the verdicts only (the caller prints the plan, psmc.plan, itself)."""
        rows = self.rows(algebra_only)
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)

    def rows(self, algebra_only: bool = False) -> list:
        """(label, text) of each line of `report` (a caller that lays out its own columns)."""
        rows = [("associativity", self._associativity_text())]
        if self.identity is not None:
            rows.append(("identity", f"{self.identity}  ({self.identity_note or self.identity_kind})"))
        else:
            rows.append(("identity", f"none ({self.identity_note or 'a formal identity is used'})"))
        comm = {True: "yes", False: "no", None: "unknown"}[self.commutative]
        rows.append(("commutative", comm + (f"  ({self.commutative_note})" if self.commutative_note else "")))
        if not algebra_only:
            rows.append(("structure", self._structure_text()))
        if self.causal is not None:
            rows.append(("causal readout", "yes" if self.causal else "NO"))
        if not algebra_only:
            passes = ", ".join(f"{p} {'+'.join(b)}" for p, b in self.backends)
            rows.append(("plan", f"{self.plan}; {passes}"))
            rows.append(("stream state", f"{self.state_size}: {self.state}"))
            rows.append(("note", EXACT_NOTE))
        return rows

    def _associativity_text(self) -> str:
        if self.associativity == "refuted":
            return f"refuted: {self.counterexample.text}" if self.counterexample else "refuted"
        if self.associativity == "unknown":
            text = f"unknown (treated as not associative): {self.reason}"
            if ran_out(self.reason):
                text += ("; at the limit a verdict can differ between machines and loads (the first one is "
                         "cached): if combine is associative, `assume associative;` gives the exact scan")
            return text
        return f"{self.associativity}: {self.method}"

    def _structure_text(self) -> str:
        if self.structure == "elementwise":
            return "elementwise"
        flat = [f for f, ok in self.elementwise_fields if not ok]
        detail = {"affine": "linear in the earlier element", "general": "not linear in the earlier element"}
        return f"{self.structure} ({detail[self.structure]}; not elementwise in {', '.join(flat)})"
