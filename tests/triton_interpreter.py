"""Triton's interpreter (TRITON_INTERPRET=1) without its repeated patching: a third of the
interpreted tests' time.

Every call of a @triton.jit helper from inside an interpreted kernel runs
`interpreter._patch_lang(helper)`, which walks all of triton.language with inspect.getmembers
and re-installs the interpreter's version of every builtin, although the kernel's launch
installed the same ones moments before and keeps them until it returns (measured: 50,544 calls,
135 of 405 s in test_triton_tree.py). `install()` makes a helper's call skip that work when the
modules it sees (triton.language, triton.language.core) are already patched by the running
launch; a launch, and a helper that sees a module the launch did not patch, still patch as
before, so what runs is unchanged.

`_get_np_dtype` (every tensor the interpreter makes asks it) rebuilt a table of 19 dtypes on
each call (30 of 385 s of test_triton_tree.py's tree kernels); `install()` answers from a table
filled once with the interpreter's own answers.

It also replaces the interpreter's fallback for `tl.associative_scan` and `tl.reduce` with a
combine function of their own (every scan psmc generates): the interpreter calls the combine
once per element, on scalars (measured: 190 of 200 s of the first-order autotune test, 1.46
million calls). `_scan` and `_reduce` call it once per position along the axis, on the whole
slice across the other axes: every element sees the same combines in the same order (a
sequential fold from index 0, as the interpreter's), only vectorised.

If the interpreter's internals are not the ones this expects (another Triton version),
`install()` leaves it alone.
"""
from __future__ import annotations

import inspect
import os
from collections import Counter

calls: Counter = Counter()  # "patched" (the real work) and "kept" (a helper's call skipped it)
ORIGINAL: dict = {}  # the interpreter's own scan and reduce fallbacks (tests compare against them)


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
    _install_scans(interpreter)
    _install_dtypes(interpreter)
    return True


def _install_dtypes(interpreter) -> None:
    import triton.language as tl
    real = getattr(interpreter, "_get_np_dtype", None)
    if real is None or getattr(real, "psmc_fast", False):
        return
    pointer = real(tl.pointer_type(tl.float32))
    table: dict = {}  # element dtype -> the interpreter's numpy dtype for it

    def get_np_dtype(tt_dtype):
        """interpreter._get_np_dtype: a block's element type, a pointer's uint64, else the
        interpreter's answer for that dtype, computed once."""
        if isinstance(tt_dtype, tl.block_type):
            tt_dtype = tt_dtype.element_ty
        if isinstance(tt_dtype, tl.pointer_type):
            return pointer
        found = table.get(tt_dtype)
        if found is None:
            found = table[tt_dtype] = real(tt_dtype)
        return found

    get_np_dtype.psmc_fast = True
    ORIGINAL.setdefault("np_dtype", real)
    interpreter._get_np_dtype = get_np_dtype


def _install_scans(interpreter) -> None:
    scans, reduces = getattr(interpreter, "ScanOps", None), getattr(interpreter, "ReduceOps", None)
    if not (hasattr(scans, "generic_scan") and hasattr(reduces, "generic_reduce") and hasattr(reduces, "unravel")):
        return
    ORIGINAL.setdefault("scan", scans.generic_scan)
    ORIGINAL.setdefault("reduce", reduces.generic_reduce)
    scans.generic_scan = _scan
    reduces.generic_reduce = _reduce


def _fold(ops, datas: list, dtypes: list, axis: int, each=None) -> list:
    """acc = combine(acc, x[k]) for k = 1 .. n-1 along `axis` of every array in `datas` (the
    combine's operands are the slices at k: every other axis at once); `each(k, acc)` sees the
    accumulators after position k. Returns the last ones."""
    import numpy as np
    import triton.language as tl

    def at(d, k):
        return np.take(d, k, axis=axis)

    acc = [at(d, 0) for d in datas]
    if each is not None:
        each(0, acc)
    for k in range(1, datas[0].shape[axis]):
        left = tuple(ops.to_tensor(a, t) for a, t in zip(acc, dtypes))
        right = tuple(ops.to_tensor(at(d, k), t) for d, t in zip(datas, dtypes))
        got = ops.combine_fn.fn(*left, *right)
        got = got if isinstance(got, tuple) else (got,)
        shape = np.shape(acc[0])
        acc = [np.broadcast_to(g.handle.data if isinstance(g, tl.core.tensor) else np.asarray(g), np.shape(a) or (1,))
               .reshape(shape).astype(a.dtype if hasattr(a, "dtype") else d.dtype)
               for g, a, d in zip(got, acc, datas)]
        if each is not None:
            each(k, acc)
    return acc


def _scan(self, input):
    """ScanOps.generic_scan, one combine call per position along the axis."""
    import numpy as np
    datas = [arg.handle.data for arg in input]
    dtypes = [arg.dtype for arg in input]
    outs = [np.zeros(d.shape, dtype=d.dtype) for d in datas]
    axis = self.axis

    def store(k, acc):
        for o, a in zip(outs, acc):
            index = [slice(None)] * o.ndim
            index[axis] = k
            o[tuple(index)] = a

    _fold(self, datas, dtypes, axis, store)
    return [self.to_tensor(o, t) for o, t in zip(outs, dtypes)]


def _reduce(self, input):
    """ReduceOps.generic_reduce, one combine call per position along the axis."""
    import numpy as np
    original_axis = self.axis
    axis = 0 if original_axis is None else original_axis
    # (axis None: every input flattened; the interpreter's `unravel` flattens only the first)
    datas = [arg.handle.data.reshape(-1) if original_axis is None else arg.handle.data for arg in input]
    dtypes = [arg.dtype for arg in input]
    acc = _fold(self, datas, dtypes, axis)
    ret = []
    for a, d, t in zip(acc, datas, dtypes):
        a = np.asarray(a, dtype=d.dtype)
        if self.keep_dims:
            a = np.expand_dims(a, axis) if original_axis is not None else a.reshape((1,) * d.ndim)
        elif original_axis is None:
            a = a.item()
        ret.append(self.to_tensor(a, t))
    return ret
