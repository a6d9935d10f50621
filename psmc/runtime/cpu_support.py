"""The op-independent half of the C++ CPU backend: building the generated kernels
(psmc.codegen.cpp_printer), choosing them, laying tensors out and calling them.

Build: `torch.utils.cpp_extension.load_inline` compiles one shared library per op source, pass
and float type (no torch headers, OpenMP for the work items), into
`<psmc cache dir>/cpu/<content hash>/`. An op's source holds both passes for float32 and
float64, each entry point behind its own macro (psmc.codegen.cpp_printer.export_macro); a build
defines one, so the compiler instantiates only what that library runs: inference in float32
builds its forward only (`python -m benchmarks.cpu_build`: over the examples, 0.24x the time of
one library with all four entry points). Training builds the backward library on the same call,
both builds at once (`passes`, `libraries`). The hash covers the source, the macro, the compiler flags, the compiler named by
$CXX and torch's version, so a changed kernel is a new directory and an unchanged one is reused
by every process. load_inline holds a file lock on the directory while
it builds, so two processes building the same op at once both get the library; an `ok` marker
written (atomically) after a successful build lets later processes load it without running
the build tool again.

No compiler, or a failed build: one warning (per op source, per process) and the torch backend
serves the call. Never an error.

Layout: every per-token tensor is seen as [B, T, L, *extent] (lanes flattened to L; the
extent is the value's role on the work-item grid: () for a scalar, (R,), (C,) or (R, C)) and
passed as a pointer plus four strides (batch, time, lane, declared axis), so broadcast inputs
are stride-0 views, never copies. Everything the kernels write is a fresh contiguous tensor.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import importlib.machinery
import importlib.util
import math
import os
import platform
import shutil
import sys
import warnings
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from . import torch_version
from .state import ScanState
from .varlen import cu_seqlens_bounds

# -fno-math-errno/-fno-trapping-math let exp / select loops vectorise; -march=native (on Linux
# x86-64 and arm64, where gcc and clang take it) lets them use this machine's widest vectors
# (AVX2/AVX-512: the recurrence forward runs 2x faster than with the SSE2 baseline), so the cache
# key covers the CPU model and its feature flags too
CFLAGS = ("-O3", "-fopenmp", "-fno-math-errno", "-fno-trapping-math") + \
    (("-march=native",) if sys.platform.startswith("linux") and platform.machine() in ("x86_64", "aarch64") else ())
LDFLAGS = ("-fopenmp",)
# backend='auto': a matrix-state op whose forward also has the chunkwise matmul form runs that
# form above this many tokens (the token loop does O(K V) work per token without matmuls)
MATRIX_FORWARD_MAX_T = 64

_FLOATS = ("f16", "bf16", "f32", "f64")


@dataclass(frozen=True)
class CpuKernels:
    """What the generated module registers on a layer class as `_cpu_kernels`."""

    source: str
    symbol: str
    mode: str  # 'lanes' | 'state' | 'matrix'
    rows: Callable | None
    cols: Callable | None
    inputs: tuple
    input_dtypes: tuple
    input_roles: tuple
    params: tuple
    param_roles: tuple
    field_dtypes: tuple
    field_roles: tuple
    output_dtypes: tuple
    output_roles: tuple
    dims: tuple
    lane_block: int
    param_dtypes: tuple = ()

    def compute_dtype(self, ctx) -> torch.dtype:
        """The kernel's one `scalar_t`: float64 when the op declares any f64 value (or its f32
        values compute in float64 this call), else float32. One scalar type serves every float,
        so an op mixing f32 and f64 computes wholly in float64, never an f64 value in float32."""
        declared = self.input_dtypes + self.field_dtypes + self.output_dtypes + self.param_dtypes
        return torch.float64 if "f64" in declared else ctx.dt["f32"]


# ---------------------------------------------------------------------- building
_LIBRARIES: dict = {}  # content key -> ctypes.CDLL, or None after a failed build
_LOADED: dict = {}  # (source, pass, 'f32' | 'f64') -> the content key of its loaded library (what a graph reads)
_WARNED: set = set()  # the sources whose failed build warned (once per op, per process)
PASSES = ("forward", "backward")


def suffix(dtype) -> str:
    """The float type a kernel computes in, as its entry points spell it."""
    return "f64" if dtype == torch.float64 else "f32"


def export_flag(kind: str, dtype) -> str:
    """The -D flag that compiles in pass `kind`'s entry point for `dtype` (the macro's name is
    psmc.codegen.cpp_printer.export_macro's)."""
    return f"-DPSM_EXPORT_{kind.upper()}_{suffix(dtype).upper()}"


def compiler() -> str | None:
    """The C++ compiler torch's extension loader will run ($CXX, else c++), if present."""
    return shutil.which(os.environ.get("CXX", "c++"))


def _key(source: str, flag: str = "") -> str:
    return _key_of(source, flag, os.environ.get("CXX", "c++"))


@functools.lru_cache(maxsize=256)
def _key_of(source: str, flag: str, cxx: str) -> str:
    """Memoised: a decode step asks for the library on every token (the source string's hash
    is cached by Python, so a hit costs a dict lookup, not a SHA-256 of the source)."""
    digest = hashlib.sha256()
    for part in (source, flag, " ".join(CFLAGS + LDFLAGS), cxx, torch.__version__, sys.platform, _machine()):
        digest.update(part.encode() + b"\0")
    return digest.hexdigest()[:20]


@functools.lru_cache(maxsize=1)
def _machine() -> str:
    """What -march=native compiles for: the CPU's model and feature flags (a cache directory
    shared by two machines must not hand one the other's instructions)."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [line for line in f if line.startswith(("model name", "flags", "Features", "CPU part"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return platform.machine() + platform.processor()


def build_dir(source: str, flag: str = "") -> Path:
    """<psmc cache dir>/cpu/<key>: the same root as psmc.loader.cache_dir (the runtime imports
    no compiler stage, so the two lines are repeated here)."""
    env = os.environ.get("PSMC_CACHE_DIR")
    root = Path(env) if env else \
        Path(os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")) / "psmc"
    return root / "cpu" / _key(source, flag)


def library(kernels, kind: str = "forward", dtype=torch.float32):
    """The loaded library of pass `kind` of `kernels` (a CpuKernels or CpuTreeKernels) in
    `dtype`'s float type, building it on first use; None when it cannot be built (after one
    warning per op)."""
    flag = export_flag(kind, dtype)
    key = _key(kernels.source, flag)
    if key in _LIBRARIES:
        return _LIBRARIES[key]
    try:
        lib = _load_or_build(kernels.source, key, flag)
    except Exception as error:  # noqa: BLE001 - any build failure means: serve with torch
        lib = None
        if kernels.source not in _WARNED:
            _WARNED.add(kernels.source)
            first = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
            warnings.warn(f"psmc: could not build the C++ CPU kernels ({first}); the torch backend serves "
                          f"this op instead. Install a C++ compiler (or set CXX to one) for the fused CPU "
                          f"kernels, or pass backend='torch' to run without them.", RuntimeWarning, stacklevel=4)
    _LIBRARIES[key] = lib
    if lib is not None:
        global _GRAPH_THREADS
        _LOADED[(kernels.source, kind, suffix(dtype))] = key
        _GRAPH_THREADS = torch.get_num_threads()
    return lib


_GRAPH_THREADS = 1  # torch's thread count when a library was last loaded: what a graph uses


def _torch_threads() -> int:
    """torch's thread count; inside a graph, which cannot read it (torch.get_num_threads is not
    traceable), the count when the kernels were loaded (it sets the lane blocks and threads of a
    call, never its numbers)."""
    return _GRAPH_THREADS if torch.compiler.is_compiling() else torch.get_num_threads()


def libraries(kernels, kinds: tuple, dtype) -> bool:
    """Whether the libraries of passes `kinds` of `kernels` in `dtype`'s float type all load,
    building the missing ones at the same time (a compiler process each: a training call's
    first forward waits for the longer of its two builds, not for both)."""
    missing = [kind for kind in kinds if _key(kernels.source, export_flag(kind, dtype)) not in _LIBRARIES]
    if len(missing) > 1 and (os.cpu_count() or 1) > 1:
        import concurrent.futures
        with concurrent.futures.ThreadPoolExecutor(len(missing), thread_name_prefix="psmc-build") as pool:
            list(pool.map(lambda kind: library(kernels, kind, dtype), missing))
    return all(library(kernels, kind, dtype) is not None for kind in kinds)


def _load_or_build(source: str, key: str, flag: str):
    return ctypes.CDLL(str(_built(source, key, flag)))


def _built(source: str, key: str, flag: str = "") -> Path:
    """The shared library of `source` compiled with `flag` (content key `key`), built unless a
    build is cached. The `ok` marker names the library file: torch's loader names a library it
    has built before in this process (same name, another directory: a second cache dir)
    `<name>_v1.so`."""
    root = build_dir(source, flag)
    marker = root / "ok"
    if marker.exists():
        so = root / marker.read_text().strip()
        if so.suffix == ".so" and so.exists():
            return so
    if compiler() is None:
        raise RuntimeError(f"no C++ compiler found (CXX={os.environ.get('CXX', 'c++')!r})")
    from torch.utils import cpp_extension
    root.mkdir(parents=True, exist_ok=True)
    so = Path(cpp_extension.load_inline(f"psmc_cpu_{key}", [source], is_python_module=False,
                                        no_implicit_headers=True, build_directory=str(root),
                                        extra_cflags=list(CFLAGS) + ([flag] if flag else []),
                                        extra_ldflags=list(LDFLAGS), verbose=False))
    tmp = root / f"ok.{os.getpid()}"
    tmp.write_text(so.name)
    os.replace(tmp, marker)
    return so


_LANE_SOURCE = Path(__file__).with_name("cpu_lane.cpp")


@functools.lru_cache(maxsize=None)
def decode_lane():
    """The `_psmc_lane` module (psmc/runtime/cpu_lane.cpp: a bound step's per-token checks,
    allocations and kernel call in C++), built once per cache like the kernels (it includes
    torch's headers: ~10 s). None when it cannot be built, after one warning: bind_step then
    makes the same checks in Python (~4 µs more per token). PSMC_CPU_LANE=0 turns it off."""
    if os.environ.get("PSMC_CPU_LANE", "1") == "0":
        return None
    try:
        source = _LANE_SOURCE.read_text()
        path = _built(source, _key(source))  # (no flag: the lane is one module)
        loader = importlib.machinery.ExtensionFileLoader("_psmc_lane", str(path))
        spec = importlib.util.spec_from_file_location("_psmc_lane", path, loader=loader)
        module = importlib.util.module_from_spec(spec)
        loader.exec_module(module)
        return module
    except Exception as error:  # noqa: BLE001 - any failure means: the Python checks
        first = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
        warnings.warn(f"psmc: could not build the C++ decode lane ({first}); C++ steps check their inputs in "
                      "Python instead (slower per token, same results)", RuntimeWarning, stacklevel=3)
        return None


def _function(lib, kernels, kind: str, dtype):
    if lib is None:  # (use_cpu built both passes before the C++ route was taken: this is a
        # backward whose forward needed no gradient, e.g. of a state carried with one)
        raise RuntimeError(f"psmc: the C++ {kind} kernels of {kernels.symbol} could not be built (see the "
                           "warning above); run this layer with backend='torch'")
    return _typed(getattr(lib, _symbol(kernels, kind, dtype)))


def _symbol(kernels, kind: str, dtype) -> str:
    return f"{kernels.symbol}_{kind}_{suffix(dtype)}"


def passes(layer, call) -> tuple:
    """The passes a call's C++ route needs built before it is taken (so that a failed build
    falls back to torch for the whole call): the backward too when autograd will want it."""
    if not torch.is_grad_enabled():
        return ("forward",)
    inputs = call.inputs.values()
    if any(x.requires_grad for x in inputs) or any(p.requires_grad for p in layer.parameters()):
        return PASSES
    return ("forward",)


def _typed(fn):
    """A kernel's ctypes function with its signature: (pointers, ints, threads) -> void."""
    fn.restype = None
    # no argtypes: every call passes (a ctypes array of void *, a ctypes array of int64, a Python
    # int), which ctypes passes as two pointers and a C int without argtypes' per-call
    # conversion checks (0.5 -> 0.2 us a call: a decode step makes one per token)
    fn.argtypes = None
    return fn


@functools.lru_cache(maxsize=None)
def _named(key: str, name: str):
    """The kernel `name` (e.g. `op_forward_f32`) of the loaded library `key`."""
    if _LIBRARIES.get(key) is None:
        raise RuntimeError(f"psmc: the C++ kernel {name} was not loaded before this graph was traced; run the "
                           "layer once eagerly with the same inputs (or use backend='torch') first")
    return _typed(getattr(_LIBRARIES[key], name))


@torch.library.custom_op("psmc::cpu_kernel", mutates_args=("written",), tags=(torch.Tag.needs_exact_strides,))
def graph_kernel(key: str, name: str, read: list[torch.Tensor], written: list[torch.Tensor], ints: list[int],
                 threads: int, read_strides: list[int]) -> None:
    """A C++ kernel call as a torch op, which a torch.compile graph can hold (a ctypes call
    cannot be traced): the kernel reads `read` and writes `written`, whose addresses it gets
    in that order. The ints carry the inputs' strides as traced; an input that arrives laid
    out otherwise (on an axis longer than 1: a size-1 axis is read at index 0 whatever its
    stride) is an error, never a wrong read (the op asks Inductor for exact strides)."""
    got = [s for t in read for s in t.stride()]
    sizes = [n for t in read for n in t.shape]
    if any(a != b and n > 1 for a, b, n in zip(got, read_strides, sizes)):  # (a size-1 axis: any stride)
        raise RuntimeError(f"psmc: the C++ kernel {name} got inputs with strides {got}, traced with "
                           f"{list(read_strides)}; run the layer with backend='torch' under this compiler")
    _call(_named(key, name), [*read, *written], ints, threads)


@graph_kernel.register_fake
def _graph_kernel_fake(key, name, read, written, ints, threads, read_strides) -> None:
    return None


def _run(k: CpuKernels, kind: str, compute, read: list, written: list, ints: list, threads: int):
    """Run pass `kind` of the loaded kernels: a ctypes call, or in a torch.compile graph the
    `psmc::cpu_kernel` op (a graph cannot make the call itself)."""
    if torch.compiler.is_compiling():
        # a dict lookup, which Dynamo traces (it would trace _key's hashlib call and fail); the key
        # itself where the library is not loaded yet: a backward that only a state's gradient asks
        # for, traced by AOTAutograd (which runs this Python as is); `_named` then says to load it
        key = _LOADED.get((k.source, kind, suffix(compute))) or _key(k.source, export_flag(kind, compute))
        graph_kernel(key, _symbol(k, kind, compute), read, written, ints, threads,
                     [s for t in read for s in t.stride()])
    else:
        _call(_function(library(k, kind, compute), k, kind, compute), read + written, ints, threads)


def _call(fn, tensors: list, ints: list, threads: int):
    ptrs = (ctypes.c_void_p * max(len(tensors), 1))(*[t.data_ptr() for t in tensors])
    nums = (ctypes.c_int64 * len(ints))(*[int(i) for i in ints])
    fn(ptrs, nums, threads)


# a bound step hands out the counts of consecutive states this many at a time (see bind_step)
COUNT_BLOCK = 64

# below this many state elements times tokens a call runs on one thread: waking a second
# thread costs more than the work (and on a loaded machine can wait a scheduler tick);
# torch's own elementwise ops use the same bound (at::internal::GRAIN_SIZE)
GRAIN = 32768


def _threads(g) -> int:
    work = g.rows * max(g.T, 1) * g.L * g.R * g.C
    return 1 if work < GRAIN else max(1, min(_torch_threads(), g.items))


def _native_step(native_step, lane, layer, params: tuple, uses_index: bool, next_count, lock, general, buffers):
    """bind_step's closure over the C++ decode lane `lane`: `native_step` checks the token's
    inputs, state and params against the bound signature, allocates the outputs and the new
    state and runs the kernel, or returns None having run nothing (then the general step, or
    None under strict: see bind_step)."""
    is_grad_enabled, make = torch.is_grad_enabled, ScanState.make

    def step(inputs, state, strict=False):
        if is_grad_enabled():
            return None if strict else general(inputs, state)
        count = state.count
        done = native_step(lane, inputs, state.prefix, tuple(getattr(layer, a) for a in params) if params else (),
                           int(count) if uses_index else 0)
        if done is None:
            return None if strict else general(inputs, state)
        with lock:
            count = next_count(count)
        return done[0], make(done[1], count, state.op)

    step.buffers = buffers  # the lane holds their addresses: keep them alive
    step.strict = True
    step.checks = "C++"  # (which code checks a token: tests and benchmarks report it)
    return step


# ---------------------------------------------------------------------- choosing
# A torch.compile graph of a training pass through the C++ kernels (`_CpuScan` traced, its
# backward a `psmc::cpu_kernel` op) gave wrong gradients with torch 2.11 (off by up to 3x the
# gradient's size in tests/codegen/test_compile_fullgraph.py, with Dynamo's eager backend too;
# the forward was right) and right ones with 2.13. Before 2.13 a compiled training pass takes the
# torch path; eager calls and compiled inference keep the kernels.
COMPILED_BACKWARD_OK = torch_version.at_least(2, 13)


def unusable_reason(layer, call) -> str | None:
    """Why this call cannot run the C++ kernels (before building them), or None."""
    k = getattr(layer, "_cpu_kernels", None)
    if k is None:
        return "its plan has no C++ kernels (see `psmc check`)"
    if call.ctx.dev.type != "cpu":
        return f"the inputs are on {call.ctx.dev.type}: the C++ kernels run on CPU tensors"
    return None


def use_cpu(layer, call, kind: str) -> bool:
    """backend='cpu': the C++ kernels whenever they can run (else a clear error for non-CPU
    tensors; a failed build warns and falls back to torch). backend='auto': the C++ kernels for
    CPU tensors when a compiler is present, except a long forward of a matrix-state op that
    has the chunkwise matmul form. PSMC_CPU=0 in the environment keeps backend='auto' off the
    C++ kernels (backend='cpu' still uses them).

    Inside a torch.compile graph the same choice holds for a forward (and its backward:
    `_CpuScan` traces, each pass a `psmc::cpu_kernel` op) once an eager call has loaded the
    library (a graph cannot build one); a traced step is the bound torch update (an op costs
    more per call than a one-token update)."""
    if layer.backend not in ("cpu", "auto"):
        return False
    compiling = torch.compiler.is_compiling()
    if compiling and kind != "forward":
        return False
    reason = unusable_reason(layer, call)
    if reason is not None:
        if layer.backend == "cpu" and getattr(layer, "_cpu_kernels", None) is not None:
            raise RuntimeError(f"{layer.spec.name}: backend='cpu' cannot run this call: {reason}; use "
                               "backend='auto' or 'torch'")
        return False
    k = layer._cpu_kernels
    compute = k.compute_dtype(call.ctx)
    needed = passes(layer, call)
    if layer.backend == "auto":
        if os.environ.get("PSMC_CPU", "1") == "0":
            return False
        flag = export_flag("forward", compute)
        if not compiling and _LIBRARIES.get(_key(k.source, flag)) is None and compiler() is None \
                and not build_dir(k.source, flag).joinpath("ok").exists():
            return False  # (a loaded library skips the compiler lookup and the file check)
        fast = getattr(layer.spec, "fast", None) or ""
        if kind == "forward" and k.mode == "matrix" and fast.startswith("chunkwise") and layer.use_fast_path \
                and call.lead[1] > MATRIX_FORWARD_MAX_T:
            return False
    if compiling:
        if "backward" in needed and not COMPILED_BACKWARD_OK:
            return False  # (torch before 2.13: see COMPILED_BACKWARD_OK; the torch path trains)
        return all((k.source, kind, suffix(compute)) in _LOADED for kind in needed)
    return libraries(k, needed, compute)


def auto_steps(layer, call) -> bool:
    """backend='auto' steps with the C++ kernels when the tokens will run the bound step
    (`bind_step`): a float32 kernel whose inputs and params are float32 already, the decode
    lane (no cast, no per-token output check: `call.step_lean`, set by PsmLayer._prepare_step),
    grad mode off. There it beats the torch step for 13 of the 14 covered examples (docs/cpu.md,
    B=1, one thread: 0.25x-0.62x); the 14th, a first-order recurrence of one number per lane
    (`linear_recurrence`, 'lanes' mode with the first-order fast path), steps faster with
    torch's one fused multiply-add (1.36x), so it stays there."""
    k = getattr(layer, "_cpu_kernels", None)
    if k is None or not getattr(call, "step_lean", False) or torch.is_grad_enabled():
        return False
    if k.compute_dtype(call.ctx) != torch.float32:
        return False
    if k.mode == "lanes" and (getattr(layer.spec, "fast", None) or "").startswith("first_order"):
        return False
    floats = [x for x in call.inputs.values() if x.is_floating_point()] + \
        [p for p in _params(layer) if p.is_floating_point()]
    return all(x.dtype == torch.float32 for x in floats)


# ---------------------------------------------------------------------- layout
@dataclass(frozen=True)
class _Geometry:
    B: int
    T: int
    lanes: tuple
    L: int
    R: int
    C: int
    items: int
    lane_mode: bool
    width: int = 1  # lanes per work item in 'lanes' mode
    # packed sequences: the B + 1 offsets (cu_seqlens) of B sequences packed along time in one
    # batch row of T tokens; the kernels' work items are then (sequence, lanes)
    bounds: tuple | None = None

    @property
    def rows(self) -> int:
        """Batch rows of the per-token tensors (inputs, outputs, saved prefixes): B, or 1 packed."""
        return 1 if self.bounds is not None else self.B

    def packing(self) -> list:
        """The kernels' last ints: 0, or (packed sequences) 1 and the offsets."""
        return [0] if self.bounds is None else [1, *self.bounds]

    def extent(self, role: str) -> tuple:
        if self.lane_mode:
            return ()
        return tuple({"r": self.R, "c": self.C}[ch] for ch in role)


def _geometry(k: CpuKernels, call, lead: tuple, per_lane: bool = False, bounds: tuple | None = None) -> _Geometry:
    """The kernels' grid for inputs [*lead, ...]; packed sequences (`bounds`, lead [1, T, ...]):
    one batch row per sequence (B = len(bounds) - 1)."""
    B, T, lanes = lead[0], lead[1], tuple(lead[2:])
    if bounds is not None:
        B = len(bounds) - 1
    L = math.prod(lanes)
    d = call.ctx.d
    R = int(k.rows(d)) if k.rows is not None else 1
    C = int(k.cols(d)) if k.cols is not None else 1
    lane_mode = k.mode == "lanes"
    # per-lane params: one lane per work item, which then reads one slice of each
    width = (1 if per_lane else _lane_width(k, B, L)) if lane_mode else 1
    items = B * (-(-L // width) if lane_mode else L)
    return _Geometry(B, T, lanes, L, R, C, items, lane_mode, width, bounds)


def _lane_width(k: CpuKernels, B: int, L: int) -> int:
    """Lanes per work item ('lanes' mode): as wide as the threads allow, so each token of a
    work item reads and writes whole contiguous rows (the hardware prefetcher streams them);
    narrow blocks would touch one cache line per token and page."""
    threads = max(1, _torch_threads())
    per_row = max(1, -(-2 * threads // max(B, 1)))  # work items wanted per batch row
    width = -(-L // per_row)
    width = -(-width // k.lane_block) * k.lane_block
    return max(k.lane_block, min(width, 4096))


def _storage_dtype(dtype: str, compute):
    if dtype in _FLOATS:
        return compute
    return torch.bool if dtype == "bool" else torch.int64


def _input_view(x: torch.Tensor, g: _Geometry, role: str, dtype):
    """x [B?, T?, *lanes?, *declared] → a [B, T, L, *extent] view (dtype converted) and its
    four strides."""
    extent = g.extent(role)
    rank = len(role) if not g.lane_mode else 0
    declared = tuple(x.shape[x.dim() - rank:]) if rank else ()
    x = x.to(dtype).expand(g.rows, g.T, *g.lanes, *declared).reshape(g.rows, g.T, g.L, *extent)
    strides = list(x.stride()[:3]) + [x.stride(3) if x.dim() > 3 else 0]
    return x, strides


def _state_tensor(t: torch.Tensor, g: _Geometry, role: str, dtype, declared: tuple) -> torch.Tensor:
    """A stream-state field [B?, *lanes?, *declared] as a contiguous [B, L, *extent] tensor."""
    return t.to(dtype).expand(g.B, *g.lanes, *declared).reshape(g.B, g.L, *g.extent(role)).contiguous()


def _unflatten(t: torch.Tensor, g: _Geometry, shape: tuple, time: bool) -> torch.Tensor:
    lead = (g.rows, g.T) if time else (g.B,)
    return t.reshape(*lead, *g.lanes, *shape)


def _declared(slots, call) -> list:
    return [tuple(int(s) for s in slot.shape(call.ctx.d)) for slot in slots]


def _params(layer) -> list:
    return [getattr(layer, "p_" + name) for name in layer._cpu_kernels.params]


def _leading_args(layer, call, g: _Geometry, inputs, params, prefix, compute) -> tuple[list, list]:
    """The kernel arguments both passes start with, for the kernel's scalar type `compute`: the
    inputs (views; their strides go in the second list), the params flattened, the initial
    fields (empty without a prefix)."""
    k = layer._cpu_kernels
    tensors, strides = [], []
    for x, role, dtype in zip(inputs, k.input_roles, k.input_dtypes):
        view, st = _input_view(x, g, role, _storage_dtype(dtype, compute))
        tensors.append(view)
        strides += st
    for name, p in zip(k.params, params):
        tensors.append(p.detach().to(compute if p.is_floating_point() else torch.int64).reshape(-1).contiguous())
        strides.append(p.numel() // g.L if name in getattr(layer, "per_lane", ()) else 0)
    fshapes = _declared(layer.spec.fields, call)
    for i, (role, dtype) in enumerate(zip(k.field_roles, k.field_dtypes)):
        st = _storage_dtype(dtype, compute)
        tensors.append(_state_tensor(prefix[i], g, role, st, fshapes[i]) if prefix is not None
                       else torch.empty(0, dtype=st))
    return tensors, strides


def _forward_raw(layer, call, g: _Geometry, inputs, params, prefix, start: int, save: bool):
    k = layer._cpu_kernels
    compute = k.compute_dtype(call.ctx)
    tensors, strides = _leading_args(layer, call, g, inputs, params, prefix, compute)
    dev = call.ctx.dev
    outs = [torch.empty(g.rows, g.T, g.L, *g.extent(role), dtype=_storage_dtype(dtype, compute), device=dev)
            for role, dtype in zip(k.output_roles, k.output_dtypes)]
    fins = [torch.empty(g.B, g.L, *g.extent(role), dtype=_storage_dtype(dtype, compute), device=dev)
            for role, dtype in zip(k.field_roles, k.field_dtypes)]
    saves = [torch.empty(g.rows, g.T, g.L, *g.extent(role), dtype=_storage_dtype(dtype, compute), device=dev)
             if save else torch.empty(0, dtype=_storage_dtype(dtype, compute))
             for role, dtype in zip(k.field_roles, k.field_dtypes)]
    nan = torch.zeros(g.items, dtype=torch.bool)
    written = outs + fins + saves + [nan]
    ints = [g.B, g.T, g.L, g.R, g.C, start, prefix is not None, save, g.width]
    ints += [int(call.ctx.d[d]) for d in k.dims] + strides + g.packing()
    call.token_by_token = True  # one sequential loop over time: a NaN at t reaches nothing before t
    _run(k, "forward", compute, tensors, written, ints, _threads(g))
    if torch.compiler.is_compiling():
        return outs, fins, saves  # (the NaN check does not run in a graph)
    # no NaN output: the layer's finite check has nothing to find. Set both ways: a call that runs
    # several passes (context parallelism: from zero, then from the carry) checks the last one's
    call.outputs_checked = not bool(nan.any())
    return outs, fins, saves


def _finish(layer, call, g: _Geometry, outs, fins, time: bool):
    spec = layer.spec
    dt = call.ctx.dt
    outputs = tuple(_unflatten(o, g, shape, time).to(dt[slot.dtype])
                    for o, shape, slot in zip(outs, _declared(spec.outputs, call), spec.outputs))
    finals = tuple(_unflatten(f, g, shape, False).to(dt[slot.dtype])
                   for f, shape, slot in zip(fins, _declared(spec.fields, call), spec.fields))
    return outputs, finals


class _CpuScan(torch.autograd.Function):
    """apply(meta, *inputs, *params, *init_fields) -> (*outputs, *final_fields); the backward
    is the generated reverse scan over the prefixes the forward saved."""

    @staticmethod
    def forward(ctx, meta, *flat):
        layer, call, g, start, has_init = meta
        k = layer._cpu_kernels
        n_in, n_par = len(k.inputs), len(k.params)
        inputs, params = flat[:n_in], flat[n_in:n_in + n_par]
        prefix = flat[n_in + n_par:] if has_init else None
        outs, fins, saves = _forward_raw(layer, call, g, inputs, params, prefix, start, save=True)
        outputs, finals = _finish(layer, call, g, outs, fins, time=True)
        ctx.meta = meta
        ctx.n_flat = len(flat)
        ctx.save_for_backward(*flat, *saves)
        ctx.mark_non_differentiable(*[o for o, dt in zip(outputs, k.output_dtypes) if dt not in _FLOATS],
                                    *[f for f, dt in zip(finals, k.field_dtypes) if dt not in _FLOATS])
        return (*outputs, *finals)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grads):
        layer, call, g, start, has_init = ctx.meta
        k = layer._cpu_kernels
        compute = k.compute_dtype(call.ctx)
        saved = ctx.saved_tensors
        n_in, n_par = len(k.inputs), len(k.params)
        flat, saves = saved[:ctx.n_flat], saved[ctx.n_flat:]
        inputs, params = flat[:n_in], flat[n_in:n_in + n_par]
        prefix = flat[n_in + n_par:] if has_init else None
        out_grads, fin_grads = grads[:len(k.output_dtypes)], grads[len(k.output_dtypes):]
        tensors, strides = _leading_args(layer, call, g, inputs, params, prefix, compute)
        fshapes = _declared(layer.spec.fields, call)
        tensors += list(saves)
        shapes = _declared(layer.spec.outputs, call)
        for grad, role, shape in zip(out_grads, k.output_roles, shapes):
            if grad is None or not grad.is_floating_point():
                grad = torch.zeros((), dtype=compute)
            tensors.append(grad.to(compute).expand(g.rows, g.T, *g.lanes, *shape)
                           .reshape(g.rows, g.T, g.L, *g.extent(role)).contiguous())
        has_dfin = any(gr is not None for gr, dt in zip(fin_grads, k.field_dtypes) if dt in _FLOATS)
        for grad, role, dtype, shape in zip(fin_grads, k.field_roles, k.field_dtypes, fshapes):
            if has_dfin and dtype in _FLOATS:
                grad = grad if grad is not None else torch.zeros((), dtype=compute)
                tensors.append(grad.to(compute).expand(g.B, *g.lanes, *shape)
                               .reshape(g.B, g.L, *g.extent(role)).contiguous())
            else:
                tensors.append(torch.empty(0, dtype=compute))
        # the kernel writes every element of a float input's gradient (no zero fill needed)
        din = [(torch.empty if dtype in _FLOATS else torch.zeros)(g.rows, g.T, g.L, *g.extent(role), dtype=compute)
               for role, dtype in zip(k.input_roles, k.input_dtypes)]
        dpar = [torch.zeros(g.items, *(g.extent(role) if not g.lane_mode else ()), dtype=compute)
                for role in k.param_roles]
        dini = [torch.zeros(g.B, g.L, *g.extent(role), dtype=compute) for role in k.field_roles]
        ints = [g.B, g.T, g.L, g.R, g.C, start, has_init, has_dfin, g.width]
        ints += [int(call.ctx.d[d]) for d in k.dims] + strides + g.packing()
        _run(k, "backward", compute, tensors, din + dpar + dini, ints, _threads(g))
        result = [None]
        in_shapes = []
        for x, role in zip(inputs, k.input_roles):
            rank = len(role) if not g.lane_mode else 0
            in_shapes.append(tuple(x.shape[x.dim() - rank:]) if rank else ())
        for t, x, dtype, shape in zip(din, inputs, k.input_dtypes, in_shapes):
            if dtype in _FLOATS and x.is_floating_point() and ctx.needs_input_grad[len(result)]:
                result.append(_unflatten(t, g, shape, True).sum_to_size(x.shape).to(x.dtype))
            else:
                result.append(None)
        for t, p, name in zip(dpar, params, k.params):
            if not p.is_floating_point():
                result.append(None)
            elif name in getattr(layer, "per_lane", ()):  # one item per (batch row, lane): sum the rows
                result.append(t.reshape(g.B, g.L, -1).sum(dim=0).reshape(p.shape).to(p.dtype))
            else:
                result.append(t.sum(dim=0).reshape(p.shape).to(p.dtype))
        if has_init:
            for t, x, dtype, shape in zip(dini, prefix, k.field_dtypes, fshapes):
                ok = dtype in _FLOATS and x.is_floating_point()
                result.append(_unflatten(t, g, shape, False).sum_to_size(x.shape).to(x.dtype) if ok else None)
        return tuple(result)


def _grad_needed(layer, call, prefix) -> bool:
    if not torch.is_grad_enabled():
        return False
    return any(x.requires_grad for x in call.inputs.values()) or \
        any(p.requires_grad for p in _params(layer)) or \
        (prefix is not None and any(t.requires_grad for t in prefix))


def forward(layer, call, state):
    """The fused pass over [B, T, ...]: (outputs, new ScanState).

    Packed sequences (`call.cu_seqlens`, inputs [1, total_T, ...]) run in the same one pass
    (and one backward): each sequence is a batch row of the kernels' work items, reading and
    writing its own tokens of the packed row, its positions from `start` and its carry from
    its row of `state` (batch N, every row at the same count) or from nothing. The outputs are
    [1, total_T, ...], the new state has one row per sequence (its count, start + total_T here,
    is set per sequence by the layer)."""
    k = layer._cpu_kernels
    bounds = None if call.cu_seqlens is None else tuple(cu_seqlens_bounds(layer.spec.name, call.cu_seqlens))
    g = _geometry(k, call, call.lead, bool(getattr(layer, "per_lane", ())), bounds)
    state = layer._full_state(call, state)  # a stream state may keep only the live fields
    prefix = state.prefix if state is not None else None
    if prefix is not None and any(t is None for t in prefix):
        # dead fields (spec.dead: None in a stream prefix) are never read: any value serves
        shapes = _declared(layer.spec.fields, call)
        prefix = tuple(torch.zeros(g.B, *g.lanes, *shape, dtype=call.ctx.dt[f.dtype]) if t is None else t
                       for t, shape, f in zip(prefix, shapes, layer.spec.fields))
    start = state.size if state is not None else 0
    inputs = [call.inputs[name] for name in k.inputs]
    if _grad_needed(layer, call, prefix):
        meta = (layer, call, g, start, prefix is not None)
        flat = _CpuScan.apply(meta, *inputs, *_params(layer), *(prefix or ()))
        outputs, finals = tuple(flat[:len(k.output_dtypes)]), tuple(flat[len(k.output_dtypes):])
    else:
        outs, fins, _ = _forward_raw(layer, call, g, inputs, _params(layer), prefix, start, save=False)
        outputs, finals = _finish(layer, call, g, outs, fins, time=True)
    count = (state.count if state is not None else torch.zeros((), dtype=torch.int64)) + g.T
    return outputs, layer._stream_state(ScanState(prefix=layer._without_dead(finals), count=count))


forward.packs = True  # takes call.cu_seqlens: every packed sequence in one pass (PsmLayer._forward_packed)


def step(layer, call, state):
    """One token [B, *lanes, ...]: the forward over a one-token sequence continuing `state`."""
    import dataclasses
    one = dataclasses.replace(call, inputs={n: x.unsqueeze(1) for n, x in call.inputs.items()},
                              lead=(call.lead[0], 1) + tuple(call.lead[1:]))
    outputs, new_state = forward(layer, one, state if state.prefix is not None else None)
    if getattr(one, "outputs_checked", False):
        call.outputs_checked = True
    new_state = ScanState(prefix=new_state.prefix, count=state.count + 1)
    return tuple(o.squeeze(1) for o in outputs), new_state


def _dead_ref():
    return None


def bind_step(layer, call, general):
    """The C++ step of one input signature, as a closure `(inputs, state) -> (outputs, new
    state)` (PsmLayer.step caches it per signature: its decode lane). Everything that depends
    only on shapes and dtypes is computed here once: the geometry, the integer arguments, the
    kernel function, the inputs' strides, scratch for the fields a stream state leaves out. A
    token then writes its tensors' addresses into one pointer array and makes one ctypes call:
    no view, cast, copy or dataclass per token; the kernel reads the state where it lies and
    writes the new state and the outputs straight into fresh tensors of their final shapes.

    `general(inputs, state)` (the layer's per-token `step`) serves the tokens this path does not
    cover: grad mode on (autograd records through `_CpuScan` there), an input, param or state
    laid out differently from what was bound (a cast or a copy would be needed), a state in
    another layout. Its NaN flags are not read: the decode lane checks no outputs (the layer
    binds it only when check_finite != 'always')."""
    k = layer._cpu_kernels
    spec = layer.spec
    ctx = call.ctx
    compute = k.compute_dtype(ctx)
    lib = library(k, "forward", compute)
    if lib is None:
        return general
    fn = _function(lib, k, "forward", compute)
    B, lanes = call.lead[0], tuple(call.lead[1:])
    g = _geometry(k, call, (B, 1) + lanes, bool(getattr(layer, "per_lane", ())))
    # inputs: the token's tensor itself when its [B, 1, L, *extent] view needs no copy or cast
    in_names, in_strides, ints_strides = [], [], []
    for name, role, dtype in zip(k.inputs, k.input_roles, k.input_dtypes):
        x = call.inputs[name]
        view, st = _input_view(x.unsqueeze(1), g, role, _storage_dtype(dtype, compute))
        if view.data_ptr() != x.data_ptr() or view.dtype != x.dtype:
            return general  # a layout that needs a copy or a cast each token: the general step
        in_names.append(name)
        in_strides.append(x.stride())
        ints_strides += st
    params = []
    for name in k.params:
        p = getattr(layer, "p_" + name)
        want = compute if p.is_floating_point() else torch.int64
        if p.dtype != want or not p.is_contiguous():
            return general
        params.append(("p_" + name, p, want))
        ints_strides.append(p.numel() // g.L if name in getattr(layer, "per_lane", ()) else 0)
    fshapes, oshapes = _declared(spec.fields, call), _declared(spec.outputs, call)
    fdtypes = [_storage_dtype(d, compute) for d in k.field_dtypes]
    odtypes = [_storage_dtype(d, compute) for d in k.output_dtypes]
    if any(st != ctx.dt[f.dtype] for st, f in zip(fdtypes, spec.fields)) or \
            any(st != ctx.dt[o.dtype] for st, o in zip(odtypes, spec.outputs)):
        return general  # (an f64 op's f32 values: casts per token)
    # where each field's carry comes from in a stream prefix (None: a field the stream leaves out,
    # which feeds only its own next value: any value serves, the kernel gets zeros)
    keep, dead = spec.stream, set(spec.dead)
    if keep is not None:
        source = [keep.index(f.name) if f.name in keep else None for f in spec.fields]
        width = len(keep)
    else:
        source = [None if i in dead else i for i in range(len(spec.fields))]
        width = len(spec.fields)
    fshape_full = [(B, *lanes, *s) for s in fshapes]
    scratch_in = [torch.zeros(s, dtype=d) if j is None else None for s, d, j in zip(fshape_full, fdtypes, source)]
    scratch_out = [torch.empty(s, dtype=d) if j is None else None for s, d, j in zip(fshape_full, fdtypes, source)]
    nan = torch.empty(g.items, dtype=torch.bool)  # (the lane checks no outputs: see above)
    empty = [torch.empty(0, dtype=d) for d in fdtypes]  # the saved prefixes: not saved
    ints = [g.B, 1, g.L, g.R, g.C, 0, 0, 0, g.width] + [int(ctx.d[d]) for d in k.dims] + ints_strides + g.packing()
    nums = (ctypes.c_int64 * len(ints))(*ints)
    n_in, n_par, n_f, n_out = len(in_names), len(params), len(fdtypes), len(odtypes)
    ptrs = (ctypes.c_void_p * (n_in + n_par + 3 * n_f + n_out + 1))()
    base_fin = n_in + n_par + n_f + n_out
    for i in range(n_f):
        ptrs[base_fin + n_f + i] = empty[i].data_ptr()
        if scratch_out[i] is not None:
            ptrs[base_fin + i] = scratch_out[i].data_ptr()
    ptrs[base_fin + 2 * n_f] = nan.data_ptr()
    uses_index = spec.lift_index or spec.readout_index
    threads = _threads(g)
    out_alloc = [((B, *lanes, *s), d) for s, d in zip(oshapes, odtypes)]
    one = torch.ones((), dtype=torch.int64)  # (a tensor + a tensor costs less than a tensor + an int)
    # the fields the new state holds, in its prefix's order (dead ones get None in their slots)
    keep_order = [source.index(j) for j in range(width)] if keep is not None else \
        [i for i in range(len(source)) if source[i] is not None]

    # per token only what changes: addresses, and the checks a token could fail
    base = n_in + n_par
    for i in range(n_f):
        if source[i] is None:
            ptrs[base + i] = scratch_in[i].data_ptr()
    inputs_plan = tuple((name, in_strides[j], j) for j, name in enumerate(in_names))
    # what `step(..., strict=True)` checks in place of PsmLayer.step's signature lookup: the
    # names, shapes, dtypes and device the signature was bound with (the key of that lookup)
    shapes = tuple((name, call.inputs[name].shape, call.inputs[name].dtype, stride, j)
                   for name, stride, j in inputs_plan)
    strict_ok = set(in_names) == set(call.inputs) and ctx.dev.type == "cpu"
    params_plan = tuple((attr, p, want, n_in + j) for j, (attr, p, want) in enumerate(params))
    fields_plan = tuple((source[i], base + i, fdtypes[i], fshape_full[i]) for i in range(n_f) if source[i] is not None)
    # fresh outputs and new-state tensors come from `torch.empty_like` of a contiguous template
    # of the right shape and dtype (one dispatch with fewer arguments to parse than torch.empty)
    outs_plan = tuple((torch.empty(s, dtype=d), base + n_f + j) for j, (s, d) in enumerate(out_alloc))
    # the new state's tensors: (template, pointer slot, position in its prefix)
    fins_plan = tuple((torch.empty(fshape_full[i], dtype=fdtypes[i]), base_fin + i, slot if keep is not None else i)
                      for slot, i in enumerate(keep_order))
    template = [None] * width  # a dead field's slot stays None
    made = [_dead_ref] * width  # the state tensors the last token made (weak): their checks passed then
    # ptrs and nums are shared by every call of this closure and ctypes releases the GIL for the
    # kernel: two threads stepping one layer must not interleave their addresses
    lock = threading.Lock()
    is_grad_enabled, empty_like, make, ref = torch.is_grad_enabled, torch.empty_like, ScanState.make, weakref.ref

    # the new states' counts: the tokens of one stream run through a block of pre-made count
    # tensors (views of one arange, made COUNT_BLOCK at a time) instead of a `count + 1` each;
    # chain = [the count this lane made last, the counts after it (last first)]
    chain = [None, []]

    def next_count(count):  # (under the lock)
        if count is chain[0]:  # the stream this lane stepped last: the next pre-made count
            if not chain[1]:
                n = int(count)
                chain[1] = list(torch.arange(n + COUNT_BLOCK, n, -1).unbind(0))
            count = chain[1].pop()
        else:  # another stream, or a state made elsewhere
            count = count + one
            chain[1] = []
        chain[0] = count
        return count

    native = decode_lane() if strict_ok else None
    if native is not None:  # the same checks and call, per token in C++ (cpu_lane.cpp)
        address = ctypes.cast(getattr(lib, _symbol(k, "forward", compute)), ctypes.c_void_p).value
        spec_of = native.make(
            address, threads, [p or 0 for p in ptrs], ints,
            [(name, j, call.inputs[name].dtype, tuple(call.inputs[name].shape), stride)
             for name, stride, j in inputs_plan],
            [(j, slot, dtype, shape) for j, slot, dtype, shape in fields_plan],
            [(i, slot, want, tuple(p.shape)) for i, (_, p, want, slot) in enumerate(params_plan)],
            [(slot, like.dtype, tuple(like.shape)) for like, slot in outs_plan],
            [(slot, pos, like.dtype, tuple(like.shape)) for like, slot, pos in fins_plan], width)
        return _native_step(native.step, spec_of, layer, tuple(attr for attr, *_ in params_plan), uses_index,
                            next_count, lock, general, (scratch_in, scratch_out, nan, empty))

    def step(inputs, state, strict=False):
        """strict: the caller has not matched the inputs' signature (names, shapes, dtypes,
        device) against this one: any mismatch, and any token this lane would hand to `general`,
        returns None (nothing run) for the caller's full path to handle."""
        if strict and len(inputs) != n_in:
            return None
        if is_grad_enabled():
            return None if strict else general(inputs, state)
        with lock:
            prefix = state.prefix
            if prefix is None:
                nums[6] = 0
            else:
                if len(prefix) != width:
                    return None if strict else general(inputs, state)
                for j, slot, dtype, shape in fields_plan:
                    t = prefix[j]
                    if t is None or (made[j]() is not t and (t.dtype != dtype or t.shape != shape or
                                                             not t.is_contiguous())):
                        return None if strict else general(inputs, state)
                    ptrs[slot] = t.data_ptr()
                nums[6] = 1
            if strict:
                for name, shape, dtype, stride, j in shapes:
                    x = inputs.get(name)
                    if type(x) is not Tensor or x.shape != shape or x.dtype != dtype or not x.is_cpu or \
                            x.stride() != stride:
                        return None
                    ptrs[j] = x.data_ptr()
            else:
                for name, stride, j in inputs_plan:
                    x = inputs[name]
                    if type(x) is not Tensor or x.stride() != stride:  # (a subclass: its own torch functions)
                        return general(inputs, state)
                    ptrs[j] = x.data_ptr()
            for attr, p, want, j in params_plan:  # (.double() or .to() after binding changes a param in place)
                if getattr(layer, attr) is not p or p.dtype != want or p.is_cuda or not p.is_contiguous():
                    return None if strict else general(inputs, state)
                ptrs[j] = p.data_ptr()
            count = state.count
            if uses_index:
                nums[5] = int(count)
            outs = []
            for like, j in outs_plan:
                o = empty_like(like)
                ptrs[j] = o.data_ptr()
                outs.append(o)
            new = template.copy()
            for like, j, pos in fins_plan:
                t = empty_like(like)
                ptrs[j] = t.data_ptr()
                new[pos] = t
                made[pos] = ref(t)
            fn(ptrs, nums, threads)
            count = next_count(count)
        return tuple(outs), make(tuple(new), count, state.op)

    step.buffers = (scratch_in, scratch_out, nan, empty)  # ptrs holds their addresses: keep them alive
    step.strict = strict_ok  # PsmLayer.step may call it with strict=True before any lookup
    step.checks = "Python"
    return step
