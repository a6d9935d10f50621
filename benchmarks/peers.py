"""Optional peers and the two ways psmc is reached (public API, or the runtime it calls).

Nothing here installs anything: a peer that does not import is skipped and named.
"""
from __future__ import annotations

import importlib
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"

# how the benchmark reaches psmc: "auto" (the public API when it loads, else the runtime),
# "api" (only the public API) or "runtime" (only the runtime functions); set by --psmc-path
PSMC_PATH = {"mode": "auto"}


def optional(module: str, attribute: str) -> tuple[Callable | None, str]:
    """(the peer's callable, "") or (None, why it is skipped)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # fla warns that Triton has no GPU here
            found = importlib.import_module(module)
    except Exception as exc:  # ImportError, or a peer that breaks on import on this machine
        return None, f"{module} not installed ({type(exc).__name__}: {exc}); `pip install -e .[bench]`"
    target = found
    for name in attribute.split("."):
        target = getattr(target, name, None)
        if target is None:
            return None, f"{module}.{attribute} not found (peer version changed?)"
    return target, ""


@dataclass(frozen=True)
class PsmcOp:
    """A layer class from examples/<name>.psm through psmc.load, or why it is unavailable."""

    cls: type | None
    reason: str


def example_op(name: str) -> PsmcOp:
    """psmc.load("examples/<name>.psm").<name>: the public API the benchmarks prefer."""
    if PSMC_PATH["mode"] == "runtime":
        return PsmcOp(None, "--psmc-path runtime")
    try:
        import psmc

        module = psmc.load(str(EXAMPLES / f"{name}.psm"))
        return PsmcOp(getattr(module, name), "")
    except Exception as exc:  # the API is young: any failure falls back, and says why
        return PsmcOp(None, f"psmc.load failed: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}")


@dataclass(frozen=True)
class PsmcCall:
    impl: str  # "psmc" (what users get), or "psmc runtime" beside it
    path: str  # how it is reached, for the table
    call: Callable[[], object]


def psmc_calls(api: Callable[[type], Callable[[], object]], name: str,
               runtime: tuple[str, Callable[[], object]]) -> tuple[list[PsmcCall], str]:
    """The psmc rows of a case, and why the public API is missing (or "").

    The public API (`api` builds the timed call from the layer class) is the "psmc" row when
    it works; the op-independent runtime function the generated layer calls is timed beside it
    as "psmc runtime", so that the wrapper's own cost shows. Without the API the runtime call
    is the "psmc" row, and its path says why.
    """
    reason = ""
    op = example_op(name)
    if op.cls is not None:
        try:
            call = api(op.cls)
            call()  # fails here, not in the middle of the timing
        except Exception as exc:
            reason = f"api call failed: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
        else:
            found = [PsmcCall("psmc", f"api: psmc.load('examples/{name}.psm').{name}", call)]
            if PSMC_PATH["mode"] == "auto":
                found.append(PsmcCall("psmc runtime", f"runtime: {runtime[0]}", runtime[1]))
            return found, ""
    else:
        reason = op.reason
    if PSMC_PATH["mode"] == "api":
        return [], reason
    return [PsmcCall("psmc", f"runtime: {runtime[0]}" + (f" ({reason})" if reason else ""), runtime[1])], reason
