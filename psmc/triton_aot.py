"""Ahead-of-time compilation of every Triton kernel psmc launches, for real GPU targets, on a
machine without a GPU (issue 12 item 1).

The Triton interpreter (TRITON_INTERPRET=1) runs kernels as NumPy and cannot see what the GPU
compiler sees (loop-carried types, register pressure, spills). Triton's own compiler, `ptxas`
included, ships in its wheel and needs no GPU, so this module:

1. **records** the launches the runtime really makes: it drives each example's layer through the
   public API (`backend="triton"`: an inference forward, a training forward + backward, a decode
   step continuing a state) on CPU tensors while `triton_support.recording_launches()` holds.
   Inside it every `kernel[grid](*args, **kwargs)` (a JIT or an interpreted kernel, generated or
   hand-written) is captured instead of run, so grids, block sizes, `num_warps` and the other
   constexprs are exactly what the runtime computes (nothing here restates them);
2. **compiles** each recorded launch with `triton.compile(ASTSource(...), target=GPUTarget("cuda",
   arch, 32))`, binding the arguments with Triton's own binder (the same specialisation as a launch:
   integer 1 as a constexpr, 16-byte alignment), and reads registers, spill bytes (the `ptxas -v`
   log) and shared memory of the result.

`python -m psmc.triton_aot --write-docs` rewrites the table in docs/triton.md;
tests/codegen/test_triton_aot.py (markers `sm90`, `sm80`) fails on a compile error or on spills
above the budget (`SPILL_BUDGET`). Results are memoised per process, so each kernel
configuration compiles once per run and target.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import io
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from psmc.runtime import autotune
from psmc.runtime.state import TreeCache

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
ARCHS = (90, 80)

# The shapes the launches are recorded at: the benchmark's shapes where a kernel's
# configuration depends on them (K = V = 128 matrix tiles, 16 heads; 2048 channels), short
# sequences otherwise (nothing is computed, but the CPU tensors are allocated).
SHAPES = {
    "lanes": {"B": 2, "T": 256, "lanes": (2048,), "dims": {}},
    # mamba's layout: A a per-channel constant (every token reads it), B and C shared by the
    # channels: the state tile's backward sums their adjoints (TIME_SUM, LANE_SUM)
    "selective_ssm": {"B": 2, "T": 256, "lanes": (2048,), "dims": {"N": 16},
                      "broadcast": {"A": "tokens", "B": "lanes", "C": "lanes"}},
    "softmax_pool": {"B": 2, "T": 256, "lanes": (16,), "dims": {"V": 128}},
    # Mamba-2's sizes: state N = 128 per head of P = 64 channels; A and D per head
    "mamba2": {"B": 2, "T": 128, "lanes": (16,), "dims": {"N": 128, "P": 64},
               "broadcast": {"A": "tokens", "D": "tokens"}},
    "matrix": {"B": 2, "T": 128, "lanes": (16,), "dims": {"K": 128, "V": 128}},
}

# Spill bytes (stores) allowed per pass: none in a forward or a decode step (a spill there is a
# register tile that does not fit and costs HBM traffic on every token); the backward
# kernels of the matrix ops hold several [K, V] tiles at once and may spill a little.
SPILL_BUDGET = {"forward": 0, "forward (training)": 0, "step": 0, "step (cache)": 0, "backward": 2048,
                "forward (packed)": 0, "forward (packed, training)": 0, "backward (packed)": 2048}


@dataclass(frozen=True)
class Launch:
    example: str
    passname: str  # 'forward' | 'forward (training)' | 'backward' | 'step', and the packed passes
    kernel: str
    fn: object = field(compare=False, repr=False)  # the JITFunction / InterpretedFunction launched
    grid: tuple = ()
    args: tuple = field(default=(), compare=False, repr=False)
    kwargs: dict = field(default_factory=dict, compare=False, repr=False)

    def constexprs(self) -> dict:
        """The keyword constexprs and options of the launch (block sizes, flags, num_warps): the
        generated kernels get every argument by name (psmc.runtime.triton_abi), so the tensors,
        strides and sizes among the keywords are left out."""
        return _constexpr_kwargs(self.fn, self.kwargs)


@dataclass(frozen=True)
class Compiled:
    arch: int
    ok: bool
    error: str = ""
    registers: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    stack: int = 0
    shared: int = 0
    num_warps: int = 0
    seconds: float = 0.0
    layouts: tuple = ()  # the TTGIR blocked layouts (#blocked = ...): which threads and warps hold which axes


# ---------------------------------------------------------------------- recording
def examples_with_kernels() -> list:
    """(example, layer class) for every example whose generated module has Triton kernels, plus
    the runtime's hand-written kernel families (psmc.runtime.triton_support.families)."""
    import psmc
    found = []
    for path in sorted(EXAMPLES.glob("*.psm")):
        module = psmc.load(path)
        for name, cls in module.__psmc_layers__.items():
            if _has_kernels(cls):
                found.append((name, cls))
    return found


def _has_kernels(cls) -> bool:
    from psmc.runtime import dispatch
    return dispatch.has_triton_path(cls)


def _shape_for(cls) -> dict:
    name = cls.spec.name
    if name in SHAPES:
        return SHAPES[name]
    k = getattr(cls, "_triton_kernels", None)
    if k is not None and k.mode == "matrix" or any(f.rank == 2 for f in cls.spec.fields):
        return SHAPES["matrix"]
    return SHAPES["lanes"]


def _inputs(layer, B: int, T: int | None, lanes: tuple, seed: int = 0, broadcast: dict | None = None) -> dict:
    """Inputs [B, (T,) *lanes, *declared]; `broadcast` names inputs of size 1 over batch and
    time ('tokens') or over the lanes ('lanes'), as the op's users lay them out."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    dims = dict(layer.dims)
    lead = (B,) if T is None else (B, T)
    for slot in layer.spec.inputs:
        how = (broadcast or {}).get(slot.name)
        shape = ((1,) * len(lead) if how == "tokens" else lead) + ((1,) * len(lanes) if how == "lanes" else lanes)
        shape += tuple(int(s) for s in slot.shape(dims))
        if slot.dtype == "bool":
            x = torch.rand(shape, generator=g) > 0.5
        elif slot.dtype in ("i32", "i64"):
            x = torch.randint(0, 3, shape, generator=g, dtype=torch.int64)
        else:
            x = torch.randn(shape, generator=g) * 0.1
        out[slot.name] = x
    return out


@contextlib.contextmanager
def recording_launches():
    """Inside: every Triton kernel launch appends (kernel, grid, args, kwargs) to the yielded
    list instead of running, and the runtime accepts CPU tensors for its Triton paths."""
    from triton.runtime.jit import JITFunction

    from psmc.runtime import triton_support as ts
    classes = [JITFunction]
    try:
        from triton.runtime.interpreter import InterpretedFunction
        classes.append(InterpretedFunction)
    except ImportError:
        pass
    log: list = []

    def run(self, *args, grid, warmup, **kwargs):
        log.append((self, grid, args, kwargs))

    saved = [(c, c.__dict__.get("run")) for c in classes]
    previous = ts.RECORDING
    try:
        for c in classes:
            c.run = run
        ts.RECORDING = True
        yield log
    finally:
        ts.RECORDING = previous
        for c, original in saved:
            if original is None:
                del c.run
            else:
                c.run = original


def record(example: str, cls) -> list:
    """The launches of an inference forward, a training forward + backward and a decode step
    continuing a state, through the public layer API with backend='triton'."""
    shape = _shape_for(cls)
    layer = cls(backend="triton", check_finite=False, **shape["dims"])
    B, T, lanes, wide = shape["B"], shape["T"], shape["lanes"], shape.get("broadcast")
    launches: list = []
    # every launch configuration the autotuner may pick (psmc.runtime.autotune), each a row
    with recording_launches() as log, autotune.every_candidate():
        def run(passname, fn):
            start = len(log)
            fn()
            launches.extend(Launch(example, passname, _kernel_name(k), k, tuple(grid), args, kwargs)
                            for (k, grid, args, kwargs) in log[start:])

        def passes(x: dict, kind: str = "", **kwargs):
            """An inference forward, then a training forward and its backward; `kind` names a
            variant of the calls (the pass names then read "forward (packed)", "forward (packed,
            training)", "backward (packed)")."""
            tag = f" ({kind})" if kind else ""
            with torch.no_grad():
                run(f"forward{tag}", lambda: layer(**x, **kwargs))
            leaves = {n: v.clone().requires_grad_(v.is_floating_point()) for n, v in x.items()}
            out = []
            run(f"forward ({kind + ', ' if kind else ''}training)", lambda: out.append(layer(**leaves, **kwargs)))
            outs = out[0] if isinstance(out[0], tuple) else (out[0],)
            loss = sum(o.float().sum() for o in outs if o.is_floating_point())
            if isinstance(loss, torch.Tensor) and loss.requires_grad:
                run(f"backward{tag}", loss.backward)

        passes(_inputs(layer, B, T, lanes, broadcast=wide))
        with torch.no_grad():
            _, state = layer(**_inputs(layer, B, 2, lanes), return_state=True)
            run("step", lambda: layer.step(state, **_inputs(layer, B, None, lanes, seed=1)))
            if getattr(getattr(layer, "_tree_kernels", None), "step", None) is not None:
                # a serving cache's decode token (the tree step kernel)
                cache = TreeCache.of(state, 1 << 16)
                run("step (cache)", lambda: layer.step(cache, **_inputs(layer, B, None, lanes, seed=1)))
        # packed sequences (VARLEN): uneven lengths, one of a single token, in one batch row
        passes(_inputs(layer, 1, T, lanes, seed=2, broadcast=wide), "packed", cu_seqlens=torch.tensor([0, T // 4, T // 4 + 1, T]))
    return _dedupe(launches)


def compile_half_forward(example: str, arch: int = 90) -> tuple:
    """An inference forward of `example`'s generated kernels with bf16 inputs (the layer hands
    them to the kernels as given and has them write bf16 outputs), compiled for sm_<arch>:
    (the dtypes of the input and output tensors the launch passed, Compiled). Run it in a
    process that never interpreted (`clean_pool`)."""
    cls = dict(examples_with_kernels())[example]
    shape = _shape_for(cls)
    layer = cls(backend="triton", check_finite=False, **shape["dims"])
    layer.use_fast_path = False  # the generated kernels (not a fast path's own kernel)
    x = _inputs(layer, shape["B"], shape["T"], shape["lanes"])
    launch = _one_launch(example, "forward (bf16)", layer,
                         {n: v.bfloat16() if v.is_floating_point() else v for n, v in x.items()})
    dtypes = {n: v.dtype for n, v in launch.kwargs.items() if isinstance(v, torch.Tensor) and n[:2] in ("in", "ou")
              and not n.startswith("ini")}
    return dtypes, compile_launch(launch, arch)


def _one_launch(example: str, passname: str, layer, x: dict) -> Launch:
    """The one kernel launch of an inference forward of `layer` on `x`, recorded."""
    with recording_launches() as log, torch.no_grad():
        layer(**x)
    (kernel, grid, args, kwargs), = log
    return Launch(example, passname, _kernel_name(kernel), kernel, tuple(grid), args, kwargs)


def compile_first_order_layouts(arch: int = 90) -> dict:
    """linear_recurrence's first-order scan kernel (psmc.runtime.triton_scan) as the runtime
    launches it at the AOT shape (B = 2, T = 256, 2048 channels; the layer's lift hands it fp32
    a and b), in each `triton_scan.LAYOUT`: layout -> (the launch's constexprs, Compiled). Run
    it in a process that never interpreted (`clean_pool`)."""
    from psmc.runtime import triton_scan
    cls = dict(examples_with_kernels())["linear_recurrence"]
    shape = _shape_for(cls)
    out = {}
    for layout in triton_scan.LAYOUTS:
        layer = cls(backend="triton", check_finite=False)
        previous, triton_scan.LAYOUT = triton_scan.LAYOUT, layout
        try:
            launch = _one_launch("linear_recurrence", f"forward ({layout})", layer,
                                 _inputs(layer, shape["B"], shape["T"], shape["lanes"]))
        finally:
            triton_scan.LAYOUT = previous
        out[layout] = (launch.constexprs(), compile_launch(launch, arch))
    return out


def compile_half_forwards(arch: int = 90) -> dict:
    """`compile_half_forward` for every example with generated kernels: example -> (dtypes, Compiled)."""
    from psmc.runtime import dispatch
    return {name: compile_half_forward(name, arch) for name, cls in examples_with_kernels()
            if any(p.name in ("triton-block-scan", "triton-state-loop", "triton-token-loop") and p.applies(cls) for p in dispatch.PATHS)}


def _constexpr_kwargs(kernel, kwargs: dict) -> dict:
    """The keywords that are a constexpr parameter of `kernel` or no parameter at all (options)."""
    import inspect
    fn = getattr(kernel, "fn", kernel)
    while hasattr(fn, "fn") and not inspect.isfunction(fn):
        fn = fn.fn
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return dict(kwargs)
    def constexpr(p) -> bool:
        return "constexpr" in str(p.annotation)
    return {k: v for k, v in kwargs.items() if k not in params or constexpr(params[k])}


def _kernel_name(k) -> str:
    fn = getattr(k, "fn", k)
    return getattr(fn, "__name__", str(fn))


def _dedupe(launches: list) -> list:
    seen, out = set(), []
    for launch in launches:
        key = (launch.kernel, launch.passname, tuple(sorted(launch.constexprs().items())))
        if key not in seen:
            seen.add(key)
            out.append(launch)
    return out


# ---------------------------------------------------------------------- compiling
def _as_jit(kernel):
    from triton.runtime.jit import JITFunction
    if not isinstance(kernel, JITFunction):
        raise RuntimeError(f"{kernel!r} is not a JIT kernel (TRITON_INTERPRET=1 in this process?): compile in a "
                           "process that never interpreted (clean_pool)")
    return kernel


_RESULTS: dict = {}


def compile_launch(launch: Launch, arch: int) -> Compiled:
    """Compile one recorded launch for sm_<arch> (memoised per process)."""
    import time

    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    jit = _as_jit(launch.fn)
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(jit.signature, jit.params, backend)
    bound, specialization, options = binder(*launch.args, **launch.kwargs)
    options, signature, constexprs, attrs = jit._pack_args(backend, dict(launch.kwargs), bound, specialization,
                                                           options)
    key = (hashlib.sha256(jit.src.encode()).hexdigest(), jit.__name__, arch, repr(sorted(signature.items())),
           repr(sorted(constexprs.items())), repr(sorted(attrs.items())), repr(sorted(options.__dict__.items())))
    if key in _RESULTS:
        return _RESULTS[key]
    log = io.StringIO()
    start = time.perf_counter()
    saved = (knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile)
    interpret = os.environ.pop("TRITON_INTERPRET", None)  # the code generator reads it too
    try:
        knobs.nvidia.dump_ptxas_log = True  # ptxas -v: registers and spills, printed to stdout
        knobs.compilation.always_compile = True  # a cache hit would skip ptxas and its log
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(ASTSource(jit, signature, constexprs, attrs), target=target,
                                      options=options.__dict__)
    except Exception as e:  # noqa: BLE001 - every compile error is a result to report
        result = Compiled(arch, False, error=_short_error(e), seconds=time.perf_counter() - start)
    else:
        result = _stats(arch, log.getvalue(), compiled, time.perf_counter() - start)
    finally:
        knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile = saved
        if interpret is not None:
            os.environ["TRITON_INTERPRET"] = interpret
    _RESULTS[key] = result
    return result


def _short_error(e: Exception) -> str:
    text = f"{type(e).__name__}: {e}"
    return text if len(text) < 4000 else text[:4000] + " ..."


def _stats(arch: int, log: str, compiled, seconds: float) -> Compiled:
    def grab(pattern: str) -> int:
        m = re.search(pattern, log)
        return int(m.group(1)) if m else 0
    if "Used" not in log:
        raise RuntimeError(f"no ptxas -v log for {compiled.metadata.name}: cannot read registers and spills")
    layouts = tuple(line.split(" = ", 1)[1] for line in compiled.asm.get("ttgir", "").splitlines()
                    if line.startswith("#blocked"))
    return Compiled(arch, True, registers=grab(r"Used (\d+) registers"), spill_stores=grab(r"(\d+) bytes spill stores"),
                    spill_loads=grab(r"(\d+) bytes spill loads"), stack=grab(r"(\d+) bytes stack frame"),
                    shared=int(compiled.metadata.shared), num_warps=int(compiled.metadata.num_warps),
                    seconds=seconds, layouts=layouts)


# Kernels allowed past their pass's budget, each with why. The packed training forwards of
# running_argmax (sm_90) and segmented_sum (sm_80): ptxas (Triton 3.9) keeps them at 128 and 80
# registers and spills 4 and 8 bytes, where the same kernels without VARLEN take 156 and 80
# registers and spill none (8 warps; nothing caps a thread below 255 registers there).
# softmax_pool's bf16 forward (compile_half_forward, sm_90): with a bf16 output store ptxas
# keeps it at 96 registers and spills 8 bytes; its float32 forward, 96 registers, spills none.
KNOWN_SPILLS = {("running_argmax", "forward (packed, training)"): 4, ("segmented_sum", "forward (packed, training)"): 8,
                ("softmax_pool", "forward (bf16)"): 8}


def spill_allowance(example: str, passname: str) -> int:
    """The spill-store bytes a kernel of `example`'s pass may have: its pass's budget, or its
    written allowance (KNOWN_SPILLS)."""
    return max(SPILL_BUDGET.get(passname, 0), KNOWN_SPILLS.get((example, passname), 0))


def over_budget(launch: Launch, result: Compiled) -> str | None:
    """Why a compiled kernel breaks the spill budget, or None."""
    budget = spill_allowance(launch.example, launch.passname)
    if result.ok and result.spill_stores > budget:
        return (f"{launch.example} {launch.passname} {launch.kernel} sm_{result.arch}: {result.spill_stores} bytes "
                f"of spill stores > budget {budget} ({result.registers} registers, num_warps {result.num_warps})")
    return None


# ---------------------------------------------------------------------- the docs table
def table(rows: list) -> str:
    """rows: (launch, {arch: Compiled})."""
    head = ("| example | pass | kernel | grid | constexprs | " +
            " | ".join(f"sm_{a} regs / spill B / smem B" for a in ARCHS) + " |")
    lines = [head, "|" + "---|" * (5 + len(ARCHS))]
    for launch, results in rows:
        consts = ", ".join(f"{k}={_show(v)}" for k, v in sorted(launch.constexprs().items()))
        cells = []
        for a in ARCHS:
            r = results.get(a)
            if r is None:
                cells.append("-")
            elif not r.ok:
                cells.append("**compile error**")
            else:
                cells.append(f"{r.registers} / {r.spill_stores} / {r.shared} (w{r.num_warps})")
        kernel = launch.kernel.replace("_psm_Op_", "")
        lines.append(f"| {launch.example} | {launch.passname} | `{kernel}` | {launch.grid} | {consts} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


def _show(v) -> str:
    return str(int(v)) if isinstance(v, bool) else str(v)


START, END = "<!-- aot-table:start -->", "<!-- aot-table:end -->"


def write_docs(path: Path, text: str):
    doc = path.read_text(encoding="utf-8")
    if START not in doc or END not in doc:
        raise SystemExit(f"{path}: no {START} ... {END} markers to write the table between")
    head, rest = doc.split(START, 1)
    _, tail = rest.split(END, 1)
    path.write_text(f"{head}{START}\n{text}\n{END}{tail}", encoding="utf-8")


@dataclass(frozen=True)
class Row:
    """One compiled launch, picklable (what worker processes send back)."""

    example: str
    passname: str
    kernel: str
    grid: tuple
    constexprs: tuple
    results: tuple  # Compiled per arch

    def launch_view(self) -> Launch:
        return Launch(self.example, self.passname, self.kernel, None, self.grid, (), dict(self.constexprs))


def compile_examples(names: list | None, archs=ARCHS, passes: tuple | None = None) -> list:
    """Record and compile the examples named (all with kernels when None), the passes named (all
    when None): a list of Rows."""
    rows = []
    for example, cls in examples_with_kernels():
        if names is not None and example not in names:
            continue
        for launch in record(example, cls):
            if passes is not None and launch.passname not in passes:
                continue
            results = tuple(compile_launch(launch, a) for a in archs)
            rows.append(Row(example, launch.passname, launch.kernel, launch.grid,
                            tuple(sorted(launch.constexprs().items())), results))
    return rows


def compile_source(source: str, name: str, arch: int = 90) -> list:
    """The launches of op `name` given as .psm source (an op no example has), recorded as
    `record` records an example's and compiled for sm_<arch>: [(pass name, Compiled)]. Run it
    in a process that never interpreted (`clean_pool`)."""
    import tempfile

    import psmc
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"{name}.psm"
        path.write_text(source, encoding="utf-8")
        cls = psmc.load(path).__psmc_layers__[name]
        return [(launch.passname, compile_launch(launch, arch)) for launch in record(name, cls)]


@contextlib.contextmanager
def clean_pool(workers: int):
    """Worker processes started without TRITON_INTERPRET: the interpreter patches triton.language
    in a process that uses it, so kernels are compiled for a GPU only in a process that never
    interpreted (the test suite sets TRITON_INTERPRET=1 for its other Triton tests)."""
    import concurrent.futures
    import multiprocessing
    saved = os.environ.pop("TRITON_INTERPRET", None)
    try:
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            yield pool
    finally:
        if saved is not None:
            os.environ["TRITON_INTERPRET"] = saved


def compile_all(archs=ARCHS, workers: int | None = None, passes: tuple | None = None) -> list:
    """Every example, split over worker processes (one per CPU by default): a list of Rows in a
    fixed order (example, then the order of the launches)."""
    names = [name for name, _ in examples_with_kernels()]
    workers = max(1, min(workers or os.cpu_count() or 1, len(names)))
    if workers == 1 and os.environ.get("TRITON_INTERPRET") != "1":
        return compile_examples(None, archs, passes)
    parts = [names[i::workers] for i in range(workers)]
    with clean_pool(workers) as pool:
        done = list(pool.map(compile_examples, parts, [archs] * workers, [passes] * workers))
    by_example: dict = {}
    for part in done:
        for row in part:
            by_example.setdefault(row.example, []).append(row)
    return [row for name in names for row in by_example.get(name, [])]


def compile_error_probe(arch: int = 90) -> Compiled:
    """Compile a kernel with the bug the matrix backward kernels had (a loop-carried variable
    that is an int32 scalar in one loop and a [1, 1] tensor in the next): a failed result with
    the compiler's message, never an exception (run it in a clean process, see clean_pool)."""
    import triton
    import triton.language as tl

    @triton.jit
    def _loop_carried_type_change(x_ptr, N: tl.constexpr):
        r = 0
        for i in range(0, N):
            r = tl.zeros((1, 1), tl.int32) + i
        tl.store(x_ptr + tl.arange(0, 1)[:, None], r)

    return compile_launch(Launch("probe", "forward", "probe", _loop_carried_type_change, (1,),
                                 (torch.empty(1, dtype=torch.int32),), {"N": 4}), arch)


def failures(rows: list) -> list:
    out = []
    for row in rows:
        for r in row.results:
            if not r.ok:
                out.append(f"{row.example} {row.passname} {row.kernel} sm_{r.arch}: {r.error}")
            else:
                why = over_budget(row.launch_view(), r)
                if why:
                    out.append(why)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="AOT-compile every psmc Triton kernel for sm_90 and sm_80")
    parser.add_argument("--write-docs", action="store_true", help="rewrite the table in docs/triton.md")
    parser.add_argument("--workers", type=int, default=None, help="compile processes (default: one per CPU)")
    parser.add_argument("--only", nargs="*", help="examples to compile (a check; --write-docs needs all)")
    args = parser.parse_args(argv)
    rows = compile_examples(args.only) if args.only else compile_all(ARCHS, args.workers)
    for row in rows:
        for r in row.results:
            print(f"{row.example:18s} {row.passname:20s} {row.kernel:40s} sm_{r.arch} "
                  f"{'ok' if r.ok else 'COMPILE ERROR'} regs {r.registers} spill {r.spill_stores} smem {r.shared} "
                  f"warps {r.num_warps} ({r.seconds:.1f}s)")
    text = table([(row.launch_view(), {r.arch: r for r in row.results}) for row in rows])
    print(text)
    if args.write_docs:
        write_docs(ROOT / "docs" / "triton.md", text)
    bad = failures(rows)
    for f in bad:
        print("FAIL:", f[:2000], file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
