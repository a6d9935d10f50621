"""The differential runner (issue 11 item 2): one generated program through every path psmc has.

`run_program(program, config, workdir)` raises `Failure(kind, message)` on the first
disagreement, and returns quietly when every check passes:

1. `psmc check` (text and --json) exits 0: no rejection of a valid program, no internal error;
2. the layer (float64) is built through `psmc.load`; its parallel pass is compared with
   - token-by-token `step` streaming,
   - `forward(return_state=True)` continued on a second segment,
   - decoding with `step` after a parallel prefill,
   - for a token tree scan, decoding a `TreeCache` (fixed slots, every row at its own count)
     against decoding its `TreeState`s, from the start and after a packed (varlen) prefill,
   - the IR reference interpreter (tests/codegen/layer_reference.py: left fold for exact
     scans, the paper's closed-form tree for the others) on a drawn batch row and lane,
   - the generic scan with the fast path disabled (when the plan has one);
3. float64 gradients of the parallel pass are finite and equal those through the stream;
4. the float32 layer is close to the float64 one (relative RMS error <= 1e-4 per output; integer
   outputs equal) and its own stream agrees with it at fp32 tolerances;
5. when the plan lists Triton kernels and the config asks for them: backend='triton' under
   TRITON_INTERPRET=1 equals backend='torch' in float32: the forward, the gradients of inputs
   and params, token-by-token `step` streaming, and a forward continued from a state; and when
   the fast path has hand-written chunked Triton kernels (decayed linear attention, the delta
   rule, the DPLR form: what CUDA tensors run), the float32 forward through them is close to
   the float64 layer as the torch float32 forward must be;
6. when the plan has C++ kernels and the config asks for them (a sample: a build costs
   seconds): backend='cpu' equals backend='torch' in float64 (forward, gradients, `step`
   streaming, a forward continued from a state, its forward and gradients compiled with
   fullgraph) and is close to it in float32;
7. when the config draws a half dtype (bf16 or f16): the layer fed bf16/f16 inputs returns its
   float outputs in that dtype (f64-declared ones stay float64) and they are within the half
   dtype's rounding of the float64 layer run on the same (rounded) inputs; its stream agrees;
8. when the config draws it (a tenth of the programs): torch.compile(layer, fullgraph=True)
   traces the forward and a `step` into graphs without a break, and they equal the eager layer.
Every layer is built with an explicit backend ('torch' for the reference paths), so what a
program is compared against never depends on the environment (PSMC_CPU, a compiler).
Tolerances follow the dtype the layer computes in: 1e-9 relative for float64 (both sides
compute in f64: any f32 rounding in between is a bug), fp32 tolerances for the float32 paths.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import itertools
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")  # before any generated module is imported

import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
for extra in (HERE, HERE.parent / "codegen"):
    if str(extra) not in sys.path:
        sys.path.insert(0, str(extra))

import psmc  # noqa: E402
from psmc.cli import main as psmc_main  # noqa: E402
from psmc.ir import ops_from_file, ops_from_source  # noqa: E402
from psmc.runtime import scan as scan_module  # noqa: E402
from psmc.runtime.state import ChunkCache, TreeCache  # noqa: E402

import conditioning  # noqa: E402
import ties  # noqa: E402
from layer_reference import Bodies, left_fold_prefixes, reference_outputs, tree_prefixes  # noqa: E402

RTOL64, ATOL64 = 1e-9, 1e-11
RTOL32, ATOL32 = 2e-4, 2e-5
RTOL, ATOL = RTOL64, ATOL64  # of the program being run (computes_in_float64)
F32_RMS = 1e-4
# the rounding amplification of the program being run (conditioning.py), on its float64 layer
# and inputs; a failed comparison of full outputs consults it before it fails
SPREAD: conditioning.Spread | None = None
UNIT64, UNIT32 = 4 * torch.finfo(torch.float64).eps, 4 * torch.finfo(torch.float32).eps
F32_TOP = torch.finfo(torch.float32).max  # a float32 value past this is an overflow


class Failure(Exception):
    def __init__(self, kind: str, message: str):
        super().__init__(f"{kind}: {message}")
        self.kind, self.message = kind, message


@dataclass(frozen=True)
class Config:
    """How one program is run: shapes, where the sequence splits, which paths."""

    batch: int = 1
    time: int = 5
    lanes: tuple = ()
    broadcast: tuple = ()  # input index -> tuple of bools per lane axis (size 1 there)
    block: int = 64  # the exact scan's block size (small: multi-level block totals at small T)
    split: float = 0.5
    grads: bool = True
    f32: bool = True
    triton: bool = False
    seed: int = 0
    cpp: bool = False  # compare backend='cpu' (the C++ kernels) when the plan has them
    half: str = ""  # '', 'bf16' or 'f16': also run the layer on inputs of that dtype
    varlen: tuple = ()  # per batch row, a length < time: the rows packed with cu_seqlens
    per_lane: bool = False  # params one slice per lane (when the op has params and the run lanes)
    compiled: bool = False  # also run torch.compile(layer, fullgraph=True): forward and one step


def draw_config(rng, *, triton_rate: float = 0.15, long_rate: float = 0.08) -> Config:
    """A config from a random.Random: mostly tiny, sometimes T well above the block size."""
    n_lanes = rng.choice([0, 0, 1, 1, 2])
    lanes = tuple(rng.choice([1, 2, 3]) for _ in range(n_lanes))
    broadcast = tuple(tuple(rng.random() < 0.3 for _ in lanes) for _ in range(8))
    long = rng.random() < long_rate
    time = rng.choice([150, 200, 300]) if long else rng.choice([1, 2, 3, 4, 5, 7, 9, 12, 17, 24])
    block = rng.choice([2, 4, 64]) if not long else 64
    return Config(batch=rng.choice([1, 2]), time=time, lanes=lanes, broadcast=broadcast, block=block,
                  split=rng.random(), grads=not long and rng.random() < 0.5, f32=rng.random() < 0.7,
                  triton=rng.random() < triton_rate and time <= 24, seed=rng.randrange(2**16))


HALF_DTYPES = {"bf16": torch.bfloat16, "f16": torch.float16}


def draw_half(rng, rate: float = 0.2) -> str:
    """The half-precision draw of a run, from its own random.Random (a separate salt: adding it
    changed no earlier draw of `draw_config`, so campaign seeds keep their meaning)."""
    return rng.choice(["bf16", "f16"]) if rng.random() < rate else ""


def draw_varlen(rng, config: Config, rate: float = 0.3) -> tuple:
    """The varlen draw of a run (its own random.Random, like draw_half): a length in
    1 .. time - 1 per batch row, or () for no varlen check."""
    if config.time < 2 or rng.random() >= rate:
        return ()
    return tuple(rng.randint(1, config.time - 1) for _ in range(config.batch))


def draw_per_lane(rng, rate: float = 0.3) -> bool:
    """The per-lane draw of a run (its own random.Random, like draw_half)."""
    return rng.random() < rate


def draw_compiled(rng, rate: float = 0.1) -> bool:
    """The torch.compile draw of a run (its own random.Random, like draw_half)."""
    return rng.random() < rate


def continued(layer, inputs: dict, want: tuple, config, words: tuple, rtol, atol):
    """A forward split at the run's split point and continued from its state, then the same
    prefix decoded token by token with step: both equal `want` (the one-pass outputs). `words`:
    (continued, decoded, reference) as the failure messages name them."""
    T = config.time
    mid = min(T - 1, max(1, round(config.split * T)))
    first, state = layer(**{n: x[:, :mid] for n, x in inputs.items()}, return_state=True)
    rest = as_tuple(layer(**{n: x[:, mid:] for n, x in inputs.items()}, state=state))
    agree(tuple(torch.cat([a, b], 1) for a, b in zip(as_tuple(first), rest)), want,
          f"{words[0]} after {mid} tokens {words[2]}", rtol, atol)
    decoded, _ = stream(layer, inputs, state, mid, T)
    agree(tuple(torch.cat([a, b], 1) for a, b in zip(as_tuple(first), decoded)), want,
          f"{words[1]} {mid} {words[2]}", rtol, atol)


# ============================================================================ psmc check
def check_stage(path: Path):
    for argv in (["check", str(path)], ["check", "--json", str(path)]):
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = psmc_main(argv)
        if rc == 2 or "internal error" in err.getvalue():
            raise Failure("check-internal", err.getvalue().strip().splitlines()[0])
        if rc != 0:
            raise Failure("check-rejects", err.getvalue().strip())


# ============================================================================ inputs
def draw(kind: str, shape: tuple, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    if dtype == torch.bool:
        return torch.rand(shape, generator=gen, dtype=torch.float64) < 0.3
    if not dtype.is_floating_point:
        return torch.randint(0, 5, shape, generator=gen, dtype=dtype)
    u = torch.rand(shape, generator=gen, dtype=torch.float64)
    x = {"signed": u - 0.5, "log_gate": -0.5 * u, "unit": u, "gate": 0.6 + 0.4 * u}.get(kind, u - 0.5)
    if kind == "unit_vector":  # a key l2-normalised along its last axis (the delta rule's)
        x = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-3)
    return x.to(dtype)


INT_DTYPES = {"i32": torch.int32, "i64": torch.int64, "bool": torch.bool}


def make_inputs(cls, program, config: Config, float_dtype) -> dict:
    gen = torch.Generator().manual_seed(config.seed)
    out = {}
    for i, slot in enumerate(cls.spec.inputs):
        shape = tuple(int(s) for s in slot.shape(program.dims))
        if cls.spec.chunk is not None:
            shape = shape[1:]
        mask = config.broadcast[i % len(config.broadcast)] if config.broadcast else ()
        lanes = tuple(1 if (j < len(mask) and mask[j]) else n for j, n in enumerate(config.lanes))
        dtype = INT_DTYPES.get(slot.dtype, float_dtype)
        out[slot.name] = draw(program.kinds.get(slot.name, "signed"), (config.batch, config.time, *lanes, *shape),
                              dtype, gen)
    return out


def lead_of(inputs: dict, config: Config, layer) -> tuple:
    """The outputs' leading axes [B, T, *lanes]: the inputs' broadcast, and the layer's lanes
    when it holds per-lane params (inputs of lane size 1 broadcast over those)."""
    shapes = [x.shape[:2 + len(config.lanes)] for x in inputs.values()]
    if layer.per_lane:
        shapes.append((1, 1, *layer.lanes))
    return tuple(torch.broadcast_shapes(*shapes))


def as_tuple(result) -> tuple:
    return result if isinstance(result, tuple) else (result,)


stream = conditioning.stream  # token-by-token `step` over [start, stop): (outputs, last state)


def agree(got: tuple, want: tuple, what: str, rtol: float, atol: float, view=None):
    """Outputs equal within tolerances; where not, forgiven only as far as the op amplifies
    rounding (_ill_conditioned; `view` maps a full [B, T, ...] output onto what is compared)."""
    if len(got) != len(want):
        raise Failure("mismatch", f"{what}: {len(got)} outputs, expected {len(want)}")
    for i, (g, w) in enumerate(zip(got, want)):
        if g.shape != w.shape:
            raise Failure("shape", f"{what}, output {i}: shape {tuple(g.shape)} != {tuple(w.shape)}")
        if g.dtype != w.dtype:
            raise Failure("dtype", f"{what}, output {i}: dtype {g.dtype} != {w.dtype}")
        if w.is_floating_point():
            if not torch.allclose(g, w, rtol=rtol, atol=atol, equal_nan=True) and \
                    not _ill_conditioned(g, w, i, rtol, atol, view):
                err = ((g - w).abs() / (atol + rtol * w.abs())).nan_to_num(float("inf")).max().item()
                raise Failure("mismatch", f"{what}, output {i}: off by {err:.3g}x the tolerance "
                                          f"(max |diff| {(g - w).abs().nan_to_num(float('inf')).max().item():.3g})")
        elif not torch.equal(g, w):
            raise Failure("mismatch", f"{what}, output {i}: integer outputs differ")


def _ill_conditioned(got, want, index: int, rtol: float, atol: float, view=None) -> bool:
    """Whether output `index` is off only as far as the op amplifies rounding on these inputs
    (conditioning.py): float64 tolerances are checked against the spread of float64-sized
    perturbations, float32 ones against float32-sized ones."""
    if SPREAD is None:
        return False
    spread = SPREAD.of(UNIT64 if rtol < 1e-6 else UNIT32)
    if index >= len(spread):
        return False
    mine = spread[index] if view is None else view(spread[index])
    if mine.shape != want.shape:
        return False  # (a slice of the outputs: the reference check on one lane)
    return conditioning.within((got,), (want,), (mine,), rtol, atol)


# ============================================================================ the run
def run_program(program, config: Config, workdir: Path) -> dict:
    """Every check for one program; returns what was checked (for coverage counts)."""
    path = Path(workdir) / f"{program.name}.psm"
    path.write_text(program.text, encoding="utf-8")
    check_stage(path)
    checked = {"check"}
    try:
        module = psmc.load(path)
    except psmc.PsmcError as err:
        raise Failure("load-rejects", str(err).splitlines()[0]) from None
    cls = module.__psmc_layers__[program.name]
    previous = scan_module.DEFAULT_BLOCK
    scan_module.DEFAULT_BLOCK = config.block
    try:
        _run_layers(program, config, cls, path, checked)
    except Failure:
        raise
    except Exception as err:  # a crash inside a layer: the most common failure
        raise Failure("crash", f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}") from err
    finally:
        scan_module.DEFAULT_BLOCK = previous
        global SPREAD
        SPREAD = None
    return {"checked": checked, "plan": cls.spec.scan, "fast": cls.spec.fast,
            "triton": _has_triton(cls)}


TREE_INTERPRETED_T = 64  # the longest sequence a program with tree kernels runs them under the interpreter


def _cpu_kernels_of(cls):
    """The generated C++ kernels: an exact scan's, or a tree scan's (psmc.codegen.cpp_tree)."""
    return getattr(cls, "_cpu_kernels", None) or getattr(cls, "_cpu_tree_kernels", None)


def _has_triton(cls) -> bool:
    """Generated Triton kernels: the block-scan / token-loop family, or a tree scan's."""
    return getattr(cls, "_triton_kernels", None) is not None or getattr(cls, "_tree_kernels", None) is not None


def computes_in_float64(spec) -> bool:
    """Whether the float64 run computes every float value in float64: `f32` computes in
    float64 only when an f32-declared input or param is float64 (psmc.runtime.ops.torch_dtypes);
    an op with f32 fields or outputs but no f32 input or param computes those in float32."""
    f32 = [s for s in spec.inputs + spec.params if s.dtype == "f32"]
    declared = [s for s in spec.fields + spec.outputs if s.dtype in ("f32", "f16", "bf16")]
    return bool(f32) or not declared


def _run_layers(program, config: Config, cls, path: Path, checked: set):
    global RTOL, ATOL, SPREAD
    RTOL, ATOL = (RTOL64, ATOL64) if computes_in_float64(cls.spec) else (RTOL32, ATOL32)
    torch.manual_seed(config.seed)
    per_lane = bool(config.per_lane and cls.spec.params and config.lanes)
    if per_lane:
        layer = _per_lane_layer(cls, program, config)
    else:
        layer = cls(backend="torch", **program.dims).double()
    inputs = make_inputs(cls, program, config, torch.float64)
    T = config.time
    full = as_tuple(layer(**inputs))
    lead = lead_of(inputs, config, layer)
    batch_shape = (lead[0], *lead[2:])
    SPREAD = conditioning.Spread(layer, inputs, batch_shape, T)
    for out in full:
        if tuple(out.shape[:len(lead)]) != tuple(lead):
            raise Failure("shape", f"output shape {tuple(out.shape)} does not start with {tuple(lead)}")
        if out.is_floating_point() and not torch.isfinite(out).all():
            if _float32_holds_no_digit(program, cls, layer, inputs, lead, full, path):
                checked.add("f32-no-digit")
                return  # every other check compares these values too: nothing is left to compare
            raise Failure("non-finite", "the parallel pass gave a non-finite output from finite inputs")

    if "linear-attention" in program.features:  # decayed linear attention: the chunkwise form, misses not
        chunkwise = (cls.spec.fast or "").startswith("chunkwise:")
        if chunkwise == ("linear-attention-miss" in program.features):
            raise Failure("plan", f"decayed linear attention{' (a near miss)' if not chunkwise else ''} got fast "
                                  f"path {cls.spec.fast!r}")
        checked.add("linear-attention")
    if "low-rank-delta-product" in program.features:  # r delta steps per token: their fast path
        if cls.spec.fast != "delta_rule":
            raise Failure("plan", f"a product of delta steps got fast path {cls.spec.fast!r}, not the delta rule's")
        checked.add("delta-product")
    streamed, _ = stream(layer, inputs, layer.init_state(batch_shape=batch_shape), 0, T)
    agree(streamed, full, "stream vs parallel", RTOL, ATOL)
    checked.add("stream")
    if _token_tree(cls):  # the serving cache's fixed slots decode as the tree state does
        cached, _ = stream(layer, inputs, layer.init_state(lead[0], capacity=T), 0, T)
        agree(cached, streamed, "a TreeCache stream vs the TreeState stream", RTOL, ATOL)
        checked.add("tree-cache")
    elif _chunk_op(cls):  # a chunk op's serving cache: each row's chunks (a tree counter or an exact
        # scan's prefix) and partial chunk
        cached, _ = stream(layer, inputs, layer.init_state(lead[0], capacity=T), 0, T)
        agree(cached, streamed, f"a ChunkCache stream vs the ChunkStream stream ({cls.spec.scan} scan)", RTOL, ATOL)
        checked.add("chunk-cache")
        checked.add(f"chunk-cache-{cls.spec.scan}")

    if T >= 2:
        continued(layer, inputs, full, config, ("continued", "decode after a prefill of", "vs one pass"), RTOL, ATOL)
        checked.add("continued")

    if config.varlen:
        _check_varlen(layer, inputs, full, config)
        checked.add("varlen")

    if per_lane:
        _check_per_lane(cls, program, layer, inputs, full, config)
        checked.add("per-lane")

    if cls.spec.fast:
        layer.use_fast_path = False
        try:
            agree(as_tuple(layer(**inputs)), full, "generic scan vs fast path", RTOL, ATOL)
        finally:
            layer.use_fast_path = True
        checked.add("generic")

    if T <= 40:
        _check_reference(program, cls, layer, inputs, lead, full, path, config)
        checked.add("reference")

    if config.grads and any(x.is_floating_point() for x in inputs.values()) and \
            any(o.is_floating_point() for o in full):
        _check_gradients(layer, inputs, full, batch_shape, config)
        checked.add("grads")

    if config.f32:
        _check_float32(cls, program, layer, inputs, full, batch_shape, config)
        checked.add("f32")
        # (the tree kernels serve few programs: always compared, on sequences the interpreter runs quickly)
        tree = getattr(cls, "_tree_kernels", None) is not None and config.time <= TREE_INTERPRETED_T
        if (config.triton or tree) and _has_triton(cls):
            _check_triton(cls, program, layer, inputs, batch_shape, config, checked)
        if config.triton and cls.spec.fast:
            _check_fast_kernels(cls, program, layer, inputs, full, config, checked)

    # (a per-lane layer with C++ kernels is rare and reads its params its own way: always compared;
    # the C++ tree kernels serve few programs: every fifth of them, a build costs seconds)
    tree = getattr(cls, "_cpu_tree_kernels", None) is not None and program.seed % 5 == 0
    if (config.cpp or per_lane or tree) and _cpu_kernels_of(cls) is not None:
        _check_cpp(cls, program, layer, inputs, full, batch_shape, config, checked)

    if config.half:
        _check_half(cls, program, layer, batch_shape, config, checked)

    if config.compiled and T >= 2:
        _check_compiled(layer, inputs, full, batch_shape)
        checked.add("compiled")


def _check_compiled(layer, inputs: dict, full: tuple, batch_shape: tuple):
    """torch.compile(fullgraph=True) (Dynamo's capture with backend 'eager': what is under test is
    that psmc's Python traces into one graph, not Inductor's builds): the forward equals the
    eager one, and a compiled `step` continuing an eager prefill of T - 1 tokens gives the last
    token's outputs. A graph break is an error under fullgraph."""
    T = next(iter(inputs.values())).shape[1]
    got = as_tuple(_compiled(layer, "forward", **inputs))
    agree(got, full, "torch.compile(fullgraph) forward vs eager", RTOL, ATOL)
    _, state = layer(**{n: x[:, :T - 1] for n, x in inputs.items()}, return_state=True)
    out, _ = _compiled(layer.step, "step", state, **{n: x[:, T - 1] for n, x in inputs.items()})
    agree(tuple(o.unsqueeze(1) for o in as_tuple(out)), tuple(f[:, T - 1:] for f in full),
          "torch.compile(fullgraph) step after an eager prefill vs one pass", RTOL, ATOL)
    if _token_tree(type(layer)) or _chunk_op(type(layer)):  # the serving cache's step: one graph too
        kind = TreeCache if _token_tree(type(layer)) else ChunkCache
        out, _ = _compiled(layer.step, f"step of a {kind.__name__}", kind.of(state, T),
                           **{n: x[:, T - 1] for n, x in inputs.items()})
        agree(tuple(o.unsqueeze(1) for o in as_tuple(out)), tuple(f[:, T - 1:] for f in full),
              f"torch.compile(fullgraph) {kind.__name__} step after an eager prefill vs one pass", RTOL, ATOL)


def _compiled(fn, what: str, *args, **kwargs):
    """fn(*args, **kwargs) through torch.compile(fullgraph=True) with Dynamo's 'eager' backend."""
    return _tracing(what, lambda compile_: compile_(fn)(*args, **kwargs))


def _tracing(what: str, run):
    """run(compile_) from a fresh Dynamo state, compile_ being torch.compile with fullgraph=True
    and the 'eager' backend; a failure to trace (a graph break) is a `compile` failure."""
    import torch._dynamo as dynamo
    dynamo.reset()
    try:
        return run(lambda fn: torch.compile(fn, fullgraph=True, backend="eager"))
    except Exception as err:
        raise Failure("compile", f"torch.compile(fullgraph) {what}: {type(err).__name__}: "
                                 f"{str(err).splitlines()[0] if str(err) else ''}") from err


def _check_varlen(layer, inputs: dict, full: tuple, config: Config, name: str = "", rtol=None, atol=None):
    """The batch rows cut to config.varlen tokens and packed as separate sequences with
    cu_seqlens (fla's convention): each row's outputs are its one-pass outputs (causal), and
    the returned state (batch = rows, each at its own length) steps to each row's next output
    (ragged streaming). `name`: a backend's layer (its kernels take packed sequences in one
    pass) checked against the torch layer's one pass `full` at tolerances rtol, atol."""
    rtol, atol = (RTOL if rtol is None else rtol), (ATOL if atol is None else atol)
    lengths = config.varlen
    rows = range(len(lengths))
    packed = {n: torch.cat([x[b:b + 1, :lengths[b]] for b in rows], dim=1) for n, x in inputs.items()}
    cu = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int64)
    what = f"{name} varlen" if name else "varlen"

    def pack(x):
        return torch.cat([x[b:b + 1, :lengths[b]] for b in rows], dim=1)
    out, state = layer(**packed, cu_seqlens=cu, return_state=True)
    agree(as_tuple(out), tuple(pack(w) for w in full), f"{what} (rows cut to {lengths}, packed) vs one pass",
          rtol, atol, view=pack)
    at = (torch.arange(len(lengths)), torch.tensor(lengths))

    def following(x):
        return x[at][:, None]
    stepped, _ = layer.step(state, **{n: x[at] for n, x in inputs.items()})
    agree(tuple(o[:, None] for o in as_tuple(stepped)), tuple(following(w) for w in full),
          f"a ragged step after the {what} prefill (rows at {lengths}) vs one pass", rtol, atol, view=following)
    if _token_tree(type(layer)) or _chunk_op(type(layer)):
        # the same rows in a serving cache, one call for every row, through the tokens every row
        # has left (a chunk cache's rows complete their chunks at different tokens)
        kind = TreeCache if _token_tree(type(layer)) else ChunkCache
        cache = kind.of(state, config.time)
        for j in range(config.time - max(lengths)):
            pos = (at[0], at[1] + j)
            cached, cache = layer.step(cache, **{n: x[pos] for n, x in inputs.items()})
            agree(tuple(o[:, None] for o in as_tuple(cached)), tuple(w[pos][:, None] for w in full),
                  f"a {kind.__name__} step {j + 1} after the {what} prefill (rows at {lengths}) vs one pass", rtol, atol,
                  view=lambda x, pos=pos: x[pos][:, None])


def _token_tree(cls) -> bool:
    """A token op on the paper's tree: its stream state can be a TreeCache."""
    return cls.spec.scan == "tree" and cls.spec.chunk is None


def _chunk_op(cls) -> bool:
    """A chunk op (on the paper's tree or on an exact scan): its stream state can be a ChunkCache."""
    return cls.spec.chunk is not None


def _packed_lengths(config: Config) -> tuple:
    """The rows' lengths for a backend's packed check: the drawn cut, else distinct lengths of
    its own (a Triton or C++ run is rare; each should pack)."""
    return config.varlen or tuple(max(1, config.time * (b + 1) // (config.batch + 1)) for b in range(config.batch))


def _per_lane_layer(cls, program, config: Config):
    """The float64 layer with every param one slice per lane, the slices made distinct (each
    scaled by its own factor in [0.75, 1.25]: signs, zeros and ones-patterns kept, so a param
    that feeds a log or a sqrt stays in its domain)."""
    layer = cls(backend="torch", lanes=config.lanes, per_lane=True, **program.dims).double()
    lanes = math.prod(config.lanes)
    with torch.no_grad():
        for p in layer.parameters():
            factors = torch.linspace(0.75, 1.25, lanes, dtype=torch.float64) if lanes > 1 else torch.ones(1)
            p.mul_(factors.reshape(*config.lanes, *[1] * (p.dim() - len(config.lanes))).to(p.dtype))
    return layer


def _lane_choice(lead: tuple, seed: int) -> tuple:
    """(batch row, lane index tuple) drawn for a per-lane look at the outputs."""
    gen = torch.Generator().manual_seed(seed)
    lanes = list(itertools.product(*(range(n) for n in lead[2:])))
    b = int(torch.randint(0, lead[0], (), generator=gen))
    return b, lanes[int(torch.randint(0, len(lanes), (), generator=gen))]


def _check_per_lane(cls, program, layer, inputs: dict, full: tuple, config: Config):
    """Per-lane params: one lane of the outputs equals a plain layer (no lanes) holding that
    lane's param slices, run on that lane of the inputs (a size-1 lane axis broadcasts)."""
    lead = lead_of(inputs, config, layer)
    _, lane = _lane_choice(lead, config.seed + 1)
    plain = cls(backend="torch", **program.dims).double()
    with torch.no_grad():
        for name, p in layer.named_parameters():
            getattr(plain, name).copy_(p[lane])

    def at_lane(x):
        return x[(slice(None), slice(None), *(i if n > 1 else 0 for i, n in zip(lane, x.shape[2:])))]
    got = as_tuple(plain(**{n: at_lane(x) for n, x in inputs.items()}))
    want = tuple(w[(slice(None), slice(None), *lane)] for w in full)
    agree(got, want, f"a plain layer with lane {lane}'s params vs the per-lane layer at that lane", RTOL, ATOL,
          view=lambda s: s[(slice(None), slice(None), *lane)])


def _lane_params(params: dict, per_lane: tuple, lane: tuple) -> dict:
    """The params one lane of a per-lane layer sees."""
    return {n: (v[lane] if n in per_lane else v) for n, v in params.items()}


def _float32_holds_no_digit(program, cls, layer, inputs, lead, full, path) -> bool:
    """Whether every non-finite element of the reference run (`full`) is one float32 holds to no
    digit (`conditioning.no_digit`), in an op that computes its f32 values in float32 (no
    float64 input reaches them, so the runner's reference is a float32 computation too, and
    its stream is no float64 truth): by the IR bodies in float64, combined as the plan does
    (a left fold, or the paper's tree) with every combine's result shaken at float32's
    roundoff, or because the float64 value itself is non-finite. Seed
    1900800: a product of 300 rank-one updates whose f32 state is ~1e29 where float32's
    roundoff, grown along a direction the updates amplify, passes float32's range in the
    stream and the parallel pass alike."""
    if computes_in_float64(cls.spec) or cls.spec.chunk is not None:
        return False
    op = next(op for op in ops_from_file(path) if op.name == program.name)
    expanded = {n: torch.broadcast_to(x, (*lead, *x.shape[len(lead):])) for n, x in inputs.items()}
    params = {p.name: getattr(layer, "p_" + p.name).detach().double() for p in cls.spec.params}
    bad_lanes = set()
    for out in full:
        if out.is_floating_point():
            bad = ~out.isfinite()
            bad = bad.reshape(*bad.shape[:len(lead)], -1).any(-1).any(1)  # [B, *lanes]
            bad_lanes |= {tuple(i) for i in bad.nonzero().tolist()}
    for b, *lane in sorted(bad_lanes):
        where = (b, slice(None), *lane)
        lane_params = _lane_params(params, layer.per_lane, tuple(lane)) if layer.per_lane else params
        bodies = Bodies(op, dict(program.dims), lane_params)
        lane_inputs = {n: x[where] for n, x in expanded.items()}
        steps = [{n: x[t] for n, x in lane_inputs.items()} for t in range(lead[1])]
        scan = tree_prefixes if cls.spec.scan == "tree" else left_fold_prefixes
        wants, spreads = conditioning.fold_spread(bodies, steps, UNIT32, scan)
        for out, want, spread in zip(full, wants, spreads):
            if not out.is_floating_point():
                continue
            got = out[where]
            bad = ~got.isfinite()
            held = conditioning.no_digit(want, spread, F32_TOP) | ~want.isfinite()
            if not bool(held[bad].all()):
                return False
    return True


def _check_reference(program, cls, layer, inputs, lead, full, path, config):
    op = next(op for op in ops_from_file(path) if op.name == program.name)
    expanded = {n: torch.broadcast_to(x, (*lead, *x.shape[len(lead):])) for n, x in inputs.items()}
    b, lane = _lane_choice(lead, config.seed)
    params = {p.name: getattr(layer, "p_" + p.name).detach() for p in cls.spec.params}
    if layer.per_lane:  # that lane's slices
        params = _lane_params(params, layer.per_lane, lane)
    where = (b, slice(None), *lane)
    want = reference_outputs(op, dict(program.dims), params, {n: x[where] for n, x in expanded.items()},
                             cls.spec.scan == "tree")
    got = tuple(o[where] for o in full)
    want = tuple(w.to(g.dtype) if g.is_floating_point() and w.is_floating_point() else w for g, w in zip(got, want))
    try:
        agree(got, want, f"parallel vs the IR reference at batch {b}, lanes {lane}", RTOL * 10, ATOL * 10)
    except Failure:  # forgiven only for a comparison at a tie decided by the canonical IR's rounding
        lane_inputs = {n: x[where] for n, x in expanded.items()}
        if RTOL == RTOL32 and ties.float32_reference_at_a_tie(op, dict(program.dims), params, lane_inputs,
                                                               cls.spec.scan == "tree"):
            return  # (or by float32's: the layer computes in float32, the interpreter in float64)

        def canonical(want):
            want = tuple(w.to(g.dtype) if g.is_floating_point() and w.is_floating_point() else w
                         for g, w in zip(got, want))
            agree(got, want, f"parallel vs the canonical IR's reference at batch {b}, lanes {lane}",
                  RTOL * 10, ATOL * 10)
        if not ties.reference_at_a_tie(op, dict(program.dims), params, lane_inputs, cls.spec.scan == "tree",
                                       canonical):
            raise


def _loss(outputs: tuple, seed: int):
    gen = torch.Generator().manual_seed(seed + 1)
    total = 0
    for o in outputs:
        if o.is_floating_point():
            total = total + (o * torch.rand(o.shape, generator=gen, dtype=o.dtype)).sum()
    return total


def _grads(loss, wrt) -> list:
    """d loss / d wrt, zeros where the loss does not depend on a tensor (or on none at all)."""
    if not isinstance(loss, torch.Tensor) or not loss.requires_grad:
        return [torch.zeros_like(w) for w in wrt]
    grads = torch.autograd.grad(loss, wrt, allow_unused=True)
    return [torch.zeros_like(w) if g is None else g for g, w in zip(grads, wrt)]


def _check_gradients(layer, inputs, full, batch_shape, config):
    leaves = {n: x.clone().requires_grad_(x.is_floating_point()) for n, x in inputs.items()}
    wrt = [x for x in leaves.values() if x.requires_grad] + list(layer.parameters())
    parallel = _grads(_loss(as_tuple(layer(**leaves)), config.seed), wrt)
    streamed_out, _ = stream(layer, leaves, layer.init_state(batch_shape=batch_shape), 0, config.time)
    streamed = _grads(_loss(streamed_out, config.seed), wrt)
    rtol, atol = (1e-7, 1e-9) if RTOL == RTOL64 else (1e-3, 1e-4)
    for i, (g, s) in enumerate(zip(parallel, streamed)):
        if not torch.isfinite(g).all():
            raise Failure("grad-non-finite", f"gradient {i} of the parallel pass is not finite")
        if not torch.allclose(g, s, rtol=rtol, atol=atol):
            raise Failure("grad-mismatch", f"gradient {i}: parallel vs streamed differ by "
                                           f"{(g - s).abs().max().item():.3g}")


def _check_float32(cls, program, layer64, inputs, full, batch_shape, config, backend: str = "torch"):
    layer = _twin(cls, program, layer64, backend, torch.float32)
    single = {n: x.float() if x.is_floating_point() else x for n, x in inputs.items()}
    got = as_tuple(layer(**single))
    try:
        _float32_values(cls, got, full)
    except Failure as failure:  # forgiven only where the lanes that are off met a comparison at a
        # tie, or where float32-sized perturbations of the inputs and states spread as far
        if failure.kind != "f32-mismatch" or not (
                _at_ties(program, cls, layer64, inputs, got, full, config, F32_RMS)
                or _rms_ill_conditioned(got, full, SPREAD, F32_RMS, inputs_too=True)):
            raise
    streamed, _ = stream(layer, single, layer.init_state(batch_shape=batch_shape), 0, config.time)
    if not all(torch.isfinite(g).all() for g in got if g.is_floating_point()):
        # (the value check above passed: every non-finite element is one float32 holds to no
        # digit) such elements are compared by neither float32 run
        spreads = SPREAD.of(UNIT32, inputs_too=True)
        streamed, got = zip(*(_outside_range_zeroed(a, b, s, w) for a, b, s, w in zip(streamed, got, spreads, full)))
    agree(streamed, got, f"float32 stream vs float32 parallel{'' if backend == 'torch' else ' (' + backend + ')'}",
          RTOL32, ATOL32)


def _outside_range_zeroed(a, b, spread, want):
    """Both float32 runs with the elements float32 holds to no digit (conditioning.no_digit)
    zeroed: neither run's value there is compared."""
    if not b.is_floating_point():
        return a, b
    past = conditioning.no_digit(want.double(), spread.double(), F32_TOP).to(b.device)
    return a.masked_fill(past, 0), b.masked_fill(past, 0)


def _at_ties(program, cls, layer64, inputs, got, want, config, rms: float) -> bool:
    """Whether every lane where an fp32-computed run (`got`) misses the float64 one (`want`, on
    the float64 `inputs`) met a float comparison at a tie (tests/fuzz/ties.py)."""
    op = next(op for op in ops_from_source(program.text, f"{program.name}.psm") if op.name == program.name)
    params = {p.name: getattr(layer64, "p_" + p.name).detach() for p in cls.spec.params}
    if layer64.per_lane:
        params = functools.partial(_lane_params, params, layer64.per_lane)
    lead = lead_of(inputs, config, layer64)
    expanded = {n: torch.broadcast_to(x, (*lead, *x.shape[len(lead):])) for n, x in inputs.items()}
    return ties.float32_at_ties(op, dict(program.dims), params, expanded, got, want, tuple(lead),
                                cls.spec.scan == "tree", rms)


def _rms_ill_conditioned(got: tuple, want: tuple, spread, bound: float, inputs_too: bool) -> bool:
    """The relative-RMS checks' form of _ill_conditioned: every float output within `bound` plus
    the spread of float32-sized perturbations (of the inputs too when both sides did not
    start from the same rounded inputs); an overflow is excused only where that spread itself
    leaves float32's range (conditioning.rms_within)."""
    spreads = spread.of(UNIT32, inputs_too=inputs_too)
    return all(conditioning.rms_within(g, w, s, bound, F32_TOP) if w.is_floating_point() else torch.equal(g, w)
               for g, w, s in zip(got, want, spreads))


def _float32_values(cls, got, full):
    """Dtypes first (never forgiven), then values (forgiven at a tie, see _check_float32)."""
    fields64 = all(f.dtype == "f64" for f in cls.spec.outputs if f.dtype.startswith("f"))
    for i, (g, w) in enumerate(zip(got, full)):
        want_dtype = w.dtype if not w.is_floating_point() else \
            torch.float64 if cls.spec.outputs[i].dtype == "f64" else torch.float32
        if g.dtype != want_dtype and (not w.is_floating_point() or not fields64):
            raise Failure("dtype", f"float32 run: output {i} is {g.dtype}, expected {want_dtype}")
    for i, (g, w) in enumerate(zip(got, full)):
        if not w.is_floating_point():
            if not torch.equal(g, w):
                raise Failure("f32-mismatch", f"integer output {i} differs between float32 and float64 inputs")
            continue
        err = (g.double() - w).norm() / w.norm().clamp_min(1e-6)
        if not err <= F32_RMS:
            raise Failure("f32-mismatch", f"output {i}: relative RMS error {err:.3g} against float64")


def _floats(inputs: dict, dtype) -> dict:
    return {n: x.to(dtype) if x.is_floating_point() else x for n, x in inputs.items()}


def _twin(cls, program, layer64, backend: str, dtype):
    """A layer of `cls` on `backend` with layer64's parameters (per lane where layer64's are):
    a float64 twin made `.double()` as layer64 was; a float32 one keeps the declared dtypes
    (load_state_dict copies into them: f32-declared params round to float32)."""
    layer = cls(backend=backend, lanes=layer64.lanes, per_lane=layer64.per_lane or False, **program.dims)
    if dtype == torch.float64:
        layer = layer.double()
    layer.load_state_dict({k: v.to(dtype) for k, v in layer64.state_dict().items()})
    return layer


def _compare_grads(got: list, want: list, what: str, rtol: float, atol: float):
    for i, (g, w) in enumerate(zip(got, want)):
        if not torch.isfinite(g).all():
            raise Failure("grad-non-finite", f"{what}: gradient {i} is not finite")
        if g.dtype != w.dtype or g.shape != w.shape:
            raise Failure("grad-mismatch", f"{what}: gradient {i} is {g.dtype} {tuple(g.shape)}, expected "
                                           f"{w.dtype} {tuple(w.shape)}")
        if not torch.allclose(g, w, rtol=rtol, atol=atol):
            raise Failure("grad-mismatch", f"{what}: gradient {i} differs by {(g - w).abs().max().item():.3g}")


def _grads_of(layer, inputs: dict, seed: int) -> list:
    """d loss / d (float inputs, params) of the parallel pass of `layer`."""
    leaves = {n: x.clone().requires_grad_(x.is_floating_point()) for n, x in inputs.items()}
    wrt = [x for x in leaves.values() if x.requires_grad] + list(layer.parameters())
    return _grads(_loss(as_tuple(layer(**leaves)), seed), wrt)


def _wants_grads(inputs: dict, outputs: tuple) -> bool:
    return any(x.is_floating_point() for x in inputs.values()) and any(o.is_floating_point() for o in outputs)


def _check_backend_paths(other, inputs: dict, want: tuple, batch_shape, config, name: str, rtol, atol,
                         checked: set):
    """`other` (a backend's layer) against `want` (the torch layer's parallel pass on the same
    inputs): token-by-token step streaming, and a forward continued from a state at the split
    (itself then decoded with step). Both start from other's own init_state."""
    T = config.time
    streamed, _ = stream(other, inputs, other.init_state(batch_shape=batch_shape), 0, T)
    agree(streamed, want, f"{name} step stream vs torch parallel", rtol, atol)
    checked.add(f"{name}-step")
    if T >= 2:
        continued(other, inputs, want, config, (f"{name} forward continued", f"{name} decode after a prefill of",
                                                "vs torch one pass"), rtol, atol)
        checked.add(f"{name}-continued")


def _tree_launches(run) -> list:
    """The kinds of the tree kernel calls ('forward', 'backward', 'step') that `run()` makes."""
    from psmc.runtime import tree_kernels
    kinds, original = [], tree_kernels._launch

    def spy(*args):
        kinds.append(args[1])
        return original(*args)
    tree_kernels._launch = spy
    try:
        run()
    finally:
        tree_kernels._launch = original
    return kinds


def _check_triton(cls, program, layer64, inputs, batch_shape, config, checked: set):
    """backend='triton' (interpreted) against backend='torch', both in float32."""
    ref = _twin(cls, program, layer64, "torch", torch.float32)
    tri = _twin(cls, program, layer64, "triton", torch.float32)
    single = _floats(inputs, torch.float32)
    tree = getattr(cls, "_tree_kernels", None) is not None
    # (the tree kernels' calls prove they ran: the torch tree would compare torch with itself)
    launches = _tree_launches(lambda: _compare_triton(tri, ref, single, batch_shape, config, checked))
    if tree:
        if "forward" not in launches:
            raise Failure("tree-not-run", "backend='triton' served a plan with tree kernels without them")
        checked.add("triton-tree")
        if "backward" in launches:  # (not when no leaf needs a gradient: a lift of constants)
            checked.add("triton-tree-grads")
        if config.time >= 2:  # _check_varlen stepped a TreeCache of the packed rows on the twin
            if "step" not in launches:
                raise Failure("tree-not-run", "a TreeCache token on backend='triton' ran without the tree step kernel")
            checked.add("triton-tree-cache")


def _compare_triton(tri, ref, single: dict, batch_shape, config, checked: set):
    """Forward, step, continued, packed and gradients."""
    with torch.no_grad():
        want = as_tuple(ref(**single))
        agree(as_tuple(tri(**single)), want, "triton vs torch", RTOL32, ATOL32)
        checked.add("triton")
        _check_backend_paths(tri, single, want, batch_shape, config, "triton", RTOL32, ATOL32, checked)
        if config.time >= 2:  # every sequence in one launch (the generated kernels, the first-order scan)
            _check_varlen(tri, single, want, dataclasses.replace(config, varlen=_packed_lengths(config)), "triton",
                          RTOL32, ATOL32)
            checked.add("triton-varlen")
    eager_grads = None
    if _wants_grads(single, want):  # (every Triton run: the config keeps them short)
        # the generated backward kernels (or the first-order scan run in reverse) against
        # torch's autograd through the torch backend, both float32: fp32 tolerances
        eager_grads = _grads_of(tri, single, config.seed)
        _compare_grads(eager_grads, _grads_of(ref, single, config.seed), "triton vs torch", 1e-3, 1e-4)
        checked.add("triton-grads")
    if config.compiled and config.time >= 2:
        # in a graph the kernels are custom ops (psmc::generated_scan, psmc::first_order_scan,
        # the chunked ones): the same launches, so the eager Triton numbers
        with torch.no_grad():
            eager = as_tuple(tri(**single))
            traced = as_tuple(_compiled(tri, "forward of backend='triton'", **single))
        agree(traced, eager, "torch.compile(fullgraph) triton forward vs eager triton", RTOL32, ATOL32)
        checked.add("triton-compiled")
        if eager_grads is not None:
            traced = _tracing("gradients of backend='triton'", lambda compile_: _grads_of(compile_(tri), single,
                                                                                          config.seed))
            _compare_grads(traced, eager_grads, "torch.compile(fullgraph) triton vs eager triton", 1e-5, 1e-6)
            checked.add("triton-compiled-grads")


# a fast path's hand-written chunked Triton kernels: (module, launcher, the check's name, what
# autograd's forward calls: the DPLR form runs its torch terms and chains the chunks on `states`)
FAST_KERNELS = {"chunkwise": ("triton_chunk", "triton_chunk_linear_attention", "triton-fast-chunkwise",
                              "triton_chunk_linear_attention"),
                "delta_rule": ("triton_delta", "triton_chunk_delta_rule", "triton-fast-delta_rule",
                               "triton_chunk_delta_rule"),
                "dplr": ("triton_dplr", "triton_chunk_dplr", "triton-fast-dplr", "states")}


def _check_fast_kernels(cls, program, layer64, inputs, full, config, checked: set):
    """The fast path on its chunked Triton kernels (interpreted: chunkwise.BACKEND = 'triton'
    sends CPU tensors where CUDA tensors go), float32 without autograd, against the float64
    layer as the float32 check compares the torch path (forgiven where that one is); packed
    sequences on them against their own one pass; then the gradients of a float32 training
    pass on them against the torch form's. A spy proves the
    kernels ran; where they decline (K past their limit, a chunk size asked for) there is
    nothing of theirs to compare."""
    import importlib

    entry = FAST_KERNELS.get(cls.spec.fast.split(":")[0])
    if entry is None:
        return
    module = importlib.import_module(f"psmc.runtime.{entry[0]}")
    layer = _twin(cls, program, layer64, "torch", torch.float32)
    single = {n: x.float() if x.is_floating_point() else x for n, x in inputs.items()}
    with torch.no_grad():
        got, calls = _on_the_kernels(module, entry[1], lambda: as_tuple(layer(**single)))
    if not calls:
        return
    try:
        _float32_values(cls, got, full)
    except Failure as failure:
        if failure.kind != "f32-mismatch" or not (
                _at_ties(program, cls, layer64, inputs, got, full, config, F32_RMS)
                or _rms_ill_conditioned(got, full, SPREAD, F32_RMS, inputs_too=True)):
            raise Failure("triton-fast", f"{entry[1]} (interpreted) vs the float64 layer: {failure}") from failure
    checked.add(entry[2])
    if config.time >= 2:  # packed sequences on the kernels (in one call) against their one pass
        varlen = dataclasses.replace(config, varlen=_packed_lengths(config))
        try:
            with torch.no_grad():
                _, calls = _on_the_kernels(module, entry[1], lambda: _check_varlen(
                    layer, single, got, varlen, f"{entry[1]} (interpreted)", RTOL32, ATOL32))
        except Failure as failure:
            raise Failure("triton-fast", str(failure)) from failure
        if calls:
            checked.add(entry[2] + "-varlen")
    if _wants_grads(single, got):
        # training on the kernels (their backward kernels; the DPLR form's chain) against
        # autograd through the torch form, both float32: the tolerances of the triton-grads check
        from psmc.runtime import dplr
        chunk, dplr._CHUNK_AUTOGRAD = dplr._CHUNK_AUTOGRAD, 16  # (Triton runs' <= 24 tokens span two chunks)
        try:
            grads, calls = _on_the_kernels(module, entry[3], lambda: _grads_of(layer, single, config.seed))
            want = _grads_of(layer, single, config.seed) if calls else []
        finally:
            dplr._CHUNK_AUTOGRAD = chunk
        if calls:
            try:
                _compare_grads(grads, want, f"{entry[3]} (interpreted) vs torch", 1e-3, 1e-4)
            except Failure as failure:
                raise Failure("triton-fast", str(failure)) from failure
            checked.add(entry[2] + "-grads")


def _on_the_kernels(module, launcher: str, run):
    """run() with chunkwise.BACKEND = 'triton' (CPU tensors go where CUDA tensors would) and a
    spy on module.launcher: (its result, the spy's calls; none where the kernels declined)."""
    from psmc.runtime import chunkwise
    original, calls = getattr(module, launcher), []

    def spy(*args, **kwargs):  # (float64 inputs: the launcher itself hands them to the torch form)
        if not any(isinstance(x, torch.Tensor) and x.dtype == torch.float64 for x in args):
            calls.append(1)
        return original(*args, **kwargs)

    backend, chunkwise.BACKEND = chunkwise.BACKEND, "triton"
    setattr(module, launcher, spy)
    try:
        return run(), calls
    finally:
        chunkwise.BACKEND = backend
        setattr(module, launcher, original)


def _check_cpp(cls, program, layer64, inputs, full, batch_shape, config, checked: set):
    """backend='cpu' (the generated C++ kernels) against backend='torch': float64 forward,
    gradients, step and continued forwards at the float64 tolerances, float32 close to float64."""
    from psmc.runtime import cpu_support
    if cpu_support.library(_cpu_kernels_of(cls), "forward", torch.float64) is None:  # it warned; the layer would fall back to torch
        raise Failure("cpp-build", "the C++ kernels of a plan that lists them did not build")
    cpp = _twin(cls, program, layer64, "cpu", torch.float64)
    calls = []
    original = cpu_support._call

    def spy(*args):  # proves the C++ kernels ran (a silent fallback to torch would compare torch with itself)
        calls.append(1)
        return original(*args)

    cpu_support._call = spy
    try:
        with torch.no_grad():
            eager = as_tuple(cpp(**inputs))
            agree(eager, full, "cpu vs torch", RTOL, ATOL)
            if not calls:
                raise Failure("cpp-not-run", "backend='cpu' served a forward without calling its C++ kernels")
            checked.add("cpp")
            if getattr(cls, "_cpu_tree_kernels", None) is not None:
                checked.add("cpp-tree")  # (the C++ tree kernels, psmc.codegen.cpp_tree)
            # in a torch.compile graph the loaded kernel is one op (psmc::cpu_kernel): the same numbers
            traced = as_tuple(_compiled(cpp, "forward of backend='cpu'", **inputs))
            agree(traced, eager, "torch.compile(fullgraph) cpu forward vs eager cpu", RTOL, ATOL)
            checked.add("cpp-compiled")
            _check_backend_paths(cpp, inputs, full, batch_shape, config, "cpp", RTOL, ATOL, checked)
            if config.time >= 2:  # every sequence in one kernel call
                before = len(calls)
                kinds = _tree_launches(lambda: _check_varlen(cpp, inputs, full, dataclasses.replace(
                    config, varlen=_packed_lengths(config)), "cpp"))
                if len(calls) == before:
                    raise Failure("cpp-not-run", "backend='cpu' served packed sequences without its C++ kernels")
                checked.add("cpp-varlen")
                if getattr(cls, "_cpu_tree_kernels", None) is not None:  # its TreeCache token: the C++ step
                    if "step" not in kinds:
                        raise Failure("tree-not-run", "a TreeCache token on backend='cpu' ran without the C++ step")
                    checked.add("cpp-tree-cache")
        if config.time <= 40 and _wants_grads(inputs, full):
            rtol, atol = (1e-7, 1e-9) if RTOL == RTOL64 else (1e-3, 1e-4)
            eager = _grads_of(cpp, inputs, config.seed)
            _compare_grads(eager, _grads_of(layer64, inputs, config.seed), "cpu vs torch (float64)", rtol, atol)
            checked.add("cpp-grads")
            # compiled, the forward and the backward kernels are graph ops (psmc::cpu_kernel)
            traced = _tracing("gradients of backend='cpu'", lambda compile_: _grads_of(compile_(cpp), inputs, config.seed))
            _compare_grads(traced, eager, "torch.compile(fullgraph) cpu vs eager cpu", rtol, atol)
            checked.add("cpp-compiled-grads")
        # the float32 kernels (FTZ, a polynomial exp) through the float32 check of the torch
        # layer: dtypes as declared, 1e-4 relative RMS of float64 (forgiven only at a tie), and
        # their own step stream equal to their parallel pass
        try:
            _check_float32(cls, program, layer64, inputs, full, batch_shape, config, backend="cpu")
        except Failure as failure:
            raise Failure(failure.kind, f"backend='cpu': {failure.message}") from None
        checked.add("cpp-f32")
    finally:
        cpu_support._call = original


# bf16 keeps 8 significant bits (unit roundoff 2^-8 = 3.9e-3), f16 11 (2^-11 = 4.9e-4). The half
# run is compared with the float64 layer on the *same* rounded inputs, so the input rounding
# cancels; what remains is the rounding of each output to the half dtype (at most one unit
# roundoff per element, so at most that in relative RMS) plus the fp32 compute (<= F32_RMS =
# 1e-4, checked above). The bounds are about 5x the output rounding: 2e-2 (bf16), 3e-3 (f16).
HALF_RMS = {"bf16": 2e-2, "f16": 3e-3}


def _check_half(cls, program, layer64, batch_shape, config, checked: set):
    """bf16 / f16 inputs: outputs in that dtype, close to the float64 layer on the same values."""
    half = HALF_DTYPES[config.half]
    layer = _twin(cls, program, layer64, "torch", torch.float32)
    inputs = _floats(make_inputs(cls, program, config, torch.float64), half)  # rounded once
    with torch.no_grad():
        got = as_tuple(layer(**inputs))
        want = as_tuple(layer64(**_floats(inputs, torch.float64)))
    f32_inputs = [s for s in cls.spec.inputs if s.dtype == "f32"]
    for i, (g, w, slot) in enumerate(zip(got, want, cls.spec.outputs)):  # dtypes first: never forgiven
        expected = w.dtype if not w.is_floating_point() else torch.float64 if slot.dtype == "f64" else \
            half if f32_inputs else HALF_DTYPES.get(str(slot.dtype), torch.float32)
        if g.dtype != expected:
            raise Failure("dtype", f"{config.half} inputs: output {i} (declared {slot.dtype}) is {g.dtype}, "
                                   f"expected {expected}")
    rounded = _floats(inputs, torch.float64)
    spread = conditioning.Spread(layer64, rounded, batch_shape, config.time)
    try:
        _half_values(config.half, got, want)
    except Failure as failure:  # the compute is fp32 on the same inputs: forgiven only at a tie, as for
        # float32, or where fp32-sized rounding spreads as far (past float32's range: an overflow)
        if failure.kind not in ("half-mismatch", "half-non-finite") or not (
                _at_ties(program, cls, layer64, rounded, got, want, config, HALF_RMS[config.half])
                or _rms_ill_conditioned(got, want, spread, HALF_RMS[config.half], inputs_too=False)):
            raise
    checked.add(f"half-{config.half}")
    with torch.no_grad():
        streamed, _ = stream(layer, inputs, layer.init_state(batch_shape=batch_shape), 0, config.time)
    if not all(torch.isfinite(g).all() for g in got if g.is_floating_point()):  # (excused above)
        streamed, got = zip(*(_outside_range_zeroed(a, b, s, w)
                              for a, b, s, w in zip(streamed, got, spread.of(UNIT32, inputs_too=False), want)))
    # both round an fp32 result to the half dtype: fp32 tolerances plus one unit in the last
    # place of the half dtype, where the two fp32 results straddle a rounding boundary
    agree(streamed, got, f"{config.half} stream vs {config.half} parallel", torch.finfo(half).eps + RTOL32, ATOL32)


def _half_values(name: str, got: tuple, want: tuple):
    half = HALF_DTYPES[name]
    tiny = torch.finfo(half).tiny
    for i, (g, w) in enumerate(zip(got, want)):
        if not w.is_floating_point():
            if not torch.equal(g, w):
                raise Failure("half-mismatch", f"{name} inputs: integer output {i} differs from float64")
            continue
        if w.numel() and w.abs().max() > torch.finfo(half).max / 2:
            continue  # near or past the top of the half dtype's range (f16: 65504): its overflow, no bug
        if not torch.isfinite(g).all():
            raise Failure("half-non-finite", f"{name} inputs: output {i} is not finite")
        err = (g.double() - w).norm() / (w.norm() + tiny * w.numel() ** 0.5)
        if not err <= HALF_RMS[name]:
            raise Failure("half-mismatch", f"{name} inputs: output {i}: relative RMS error {err:.3g} "
                                           f"against float64 (bound {HALF_RMS[name]})")


def failure_class(err: Failure) -> str:
    """A failure's class: its kind and message with numbers and names abstracted."""
    import re
    text = re.sub(r"\b[gW]\d+\b|\b[a-zA-Z]+\d+\b", "N", err.message)
    text = re.sub(r"-?\d+(\.\d+)?(e-?\d+)?", "#", text)
    return f"{err.kind}: {text[:160]}"
