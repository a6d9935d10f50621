"""Triton's interpreter (TRITON_INTERPRET=1) without its repeated patching: a third of the
interpreted tests' time.

Every call of a @triton.jit helper from inside an interpreted kernel runs
`interpreter._patch_lang(helper)`, which walks all of triton.language with inspect.getmembers
and re-installs the interpreter's version of every builtin, although the kernel's launch
installed the same ones moments before and keeps them until it returns (measured: 50,544 calls,
135 of 405 s in test_triton_tree.py). `install()` makes a helper's call skip that work when the
modules it sees (triton.language, triton.language.core) are already patched by the running
launch; a launch, and a helper that sees a module the launch did not patch, still patch as
before, so what runs is unchanged. If the interpreter's internals are not the ones this expects
(another Triton version), `install()` leaves it alone.
"""
from __future__ import annotations

import inspect
import os
from collections import Counter

calls: Counter = Counter()  # "patched" (the real work) and "kept" (a helper's call skipped it)


def install() -> bool:
    """Patch the interpreter once per process; True when the fast path is in place."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return False
    try:
        import triton.language as tl
        from triton.runtime import interpreter
    except ImportError:
        return False
    real_patch = getattr(interpreter, "_patch_lang", None)
    executor = getattr(interpreter, "GridExecutor", None)
    if real_patch is None or executor is None or not hasattr(interpreter, "_LangPatchScope"):
        return False
    if getattr(real_patch, "psmc_fast", False):
        return True
    if list(inspect.signature(real_patch).parameters) != ["fn"]:
        return False
    real_launch = executor.__call__
    launches = [0]  # launches in progress (the kernel's own _patch_lang runs inside)
    patched: set[int] = set()  # the language modules the running launch has patched (ids)
    seen: dict[int, frozenset] = {}

    def languages(fn) -> frozenset:
        key = id(fn.__globals__)
        if key not in seen:
            seen[key] = frozenset(id(v) for v in fn.__globals__.values() if v is tl or v is tl.core)
        return seen[key]

    def patch_lang(fn):
        wanted = languages(fn)
        if launches[0] and wanted <= patched:
            calls["kept"] += 1
            return interpreter._LangPatchScope()  # nothing to do: an empty scope restores nothing
        calls["patched"] += 1
        scope = real_patch(fn)
        if launches[0]:
            patched.update(wanted)
        return scope

    def launch(self, *args, **kwargs):
        launches[0] += 1
        try:
            return real_launch(self, *args, **kwargs)
        finally:
            launches[0] -= 1
            if not launches[0]:
                patched.clear()  # the launch restored its scope: the modules are unpatched

    patch_lang.psmc_fast = True
    interpreter._patch_lang = patch_lang
    executor.__call__ = launch
    return True
