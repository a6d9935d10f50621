"""One exception hierarchy for everything a user can get wrong.

Every error carries a `Span` into the `.psm` source and renders Triton/rustc style::

    examples/bad.psm:3:27: unknown builtin 'foo'
        combine (l, r) { return foo(l.a); }
                                ^^^
    hint: the builtins are ...

Internal exceptions never reach the user: the CLI and `psmc.load` wrap them (set
PSMC_DEBUG=1 to see the original traceback).
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Source:
    """A `.psm` text and the name it was read from."""

    filename: str
    text: str = field(repr=False)

    def line(self, lineno: int) -> str:
        # Only '\n' ends a line, as for the lexer's line numbers; str.splitlines() would also
        # split at form feeds and U+2028 inside comments and show the wrong line.
        lines = self.text.split("\n")
        return lines[lineno - 1].rstrip("\r") if 1 <= lineno <= len(lines) else ""


@dataclass(frozen=True)
class Span:
    """1-based line/column range of a construct; end is exclusive."""

    source: Source = field(repr=False, compare=False)
    line: int
    col: int
    end_line: int
    end_col: int

    def render(self) -> str:
        # Control characters and surrogates are shown as U+FFFD: one column each, so the caret
        # stays aligned, and the report can always be printed.
        raw = "".join(ch if ch.isprintable() or ch == "\t" else "\ufffd" for ch in self.source.line(self.line))
        # Columns count characters; tabs are shown expanded, so measure the expanded prefixes.
        start = len(raw[: self.col - 1].expandtabs(4))
        end = len(raw[: self.end_col - 1].expandtabs(4)) if self.end_line == self.line else len(raw.expandtabs(4))
        caret = " " * start + "^" * max(1, end - start)
        return f"    {raw.expandtabs(4)}\n    {caret}"

    @property
    def where(self) -> str:
        return f"{self.source.filename}:{self.line}:{self.col}"


class PsmcError(Exception):
    """Base of every user-facing error. `str(err)` is the full rendered report."""

    kind = "error"

    def __init__(self, message: str, span: Span | None = None, hint: str | None = None,
                 notes: tuple[tuple[str, Span], ...] = ()):
        self.message = message
        self.span = span
        self.hint = hint
        self.notes = notes
        super().__init__(self.render())

    @property
    def filename(self) -> str | None:
        return self.span.source.filename if self.span else None

    @property
    def line(self) -> int | None:
        return self.span.line if self.span else None

    @property
    def col(self) -> int | None:
        return self.span.col if self.span else None

    def render(self) -> str:
        if self.span is None:
            out = f"error: {self.message}"
        else:
            out = f"{self.span.where}: {self.message}\n{self.span.render()}"
        for note, span in self.notes:
            out += f"\n{span.where}: note: {note}\n{span.render()}"
        if self.hint:
            out += f"\nhint: {self.hint}"
        return out

    def as_dict(self) -> dict:
        return {"file": self.filename, "line": self.line, "col": self.col,
                "message": self.message, "kind": type(self).__name__}


class PsmcSyntaxError(PsmcError):
    """The text does not follow the grammar."""


class PsmcNameError(PsmcError):
    """Unknown or duplicate name, field or builtin."""


class PsmcTypeError(PsmcError):
    """Shape or dtype mismatch, wrong arity or keyword."""


class PsmcDeclarationError(PsmcError):
    """An `op` is missing a part or its parts do not fit together."""


class PsmcAnalysisError(PsmcError):
    """The algebra contradicts the program (e.g. `assume associative` refuted)."""


class PsmcLimitError(PsmcError):
    """The program exceeds a size or nesting limit the compiler enforces."""
