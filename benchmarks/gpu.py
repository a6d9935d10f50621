"""GPU check and benchmark (issue 12 item 5): psmc against its peers on one GPU, bounded in time.

    python benchmarks/gpu.py                 # on a CUDA machine
    python benchmarks/gpu.py --dry-run       # anywhere: every case built and run once at tiny shapes on CPU
    benchmarks/gpu_check.sh                  # install from .whl/, GPU tests, then this script

Cases (each with its own time budget; a case that fails or overruns is a row that says so, the
rest still run; rows are printed as they finish and the table is written to $OUT when set):

- decayed linear attention at (B, T, H, K, V) = (8, 4096, 16, 128, 128), bf16 and fp32: psmc
  gla / simple_gla (every path the dispatcher has for the op, psmc.runtime.dispatch: the torch
  chunkwise form, the Triton token loop, and any chunked kernel family registered there) against
  fla chunk_gla, fused_recurrent_gla, chunk_simple_gla, fused_recurrent_simple_gla;
- the delta rule at the same shape: psmc delta_rule against fla chunk_delta_rule;
- Gated DeltaProduct (two delta steps per token) at the same shape: psmc gated_delta_product
  (the delta-rule kernels over the interleaved steps) against fla chunk_gated_delta_product;
- RWKV-7 and KDA at the same shape (the diagonal-plus-low-rank class, psmc's chunked WY form:
  inference on psmc.runtime.triton_dplr's kernels, training with the chunk-local terms in torch
  and the chunks chained on its kernels): psmc rwkv7 / kda against fla chunk_rwkv7,
  fused_recurrent_rwkv7, chunk_kda, fused_recurrent_kda;
- the first-order scan at (B, D, T) = (8, 2048, 4096): psmc (each path) against accelerated-scan's
  Triton scan (its [B, D, T] layout) and torch's associative_scan under torch.compile;
- packed sequences: GLA and RWKV-7 over 32 sequences of uneven lengths packed into B x T tokens
  (cu_seqlens), psmc in one call and one call per sequence, against fla chunk_gla / chunk_rwkv7
  with the same offsets; the first-order scan over the same packing, one call against a call
  per sequence;
- decode: one token at batch 1, microseconds per token, psmc step against fla fused_recurrent
  with T = 1 and a carried state;
- serving a tree scan (ema): 32 rows at different positions decode 64 tokens, a RaggedState of
  tree states against a TreeCache (torch push, compiled push, the Triton step kernel);
- correctness: each psmc output against the peer's at the benchmark shape (relative RMS; psmc's
  reference is its torch path where no peer computes the same function);
- the memory bandwidth a device copy reaches in this run, so the first-order rows show the
  fraction of it they reach.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import signal
import statistics
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

EXAMPLES = ROOT / "examples"
FULL = {"attn": (8, 4096, 16, 128, 128), "first_order": (8, 2048, 4096), "ssm": (8, 2048, 2048, 16),
        "decode_steps": 64}
TINY = {"attn": (1, 16, 2, 8, 8), "first_order": (1, 8, 16), "ssm": (1, 8, 16, 4), "decode_steps": 3}
CASE_BUDGET_S = 15.0  # per row: compile, warm-up and repeats (SIGALRM ends a row that overruns)
CHECK_BUDGET_S = 30.0  # per row's correctness check
TOTAL_BUDGET_S = 200.0  # the whole benchmark; rows past it are reported as skipped


# ---------------------------------------------------------------------- output
class Report:
    def __init__(self, out_dir: str | None):
        self.rows: list = []
        self.lines: list = []
        self.out = Path(out_dir) if out_dir else None

    def say(self, text: str = ""):
        print(text, flush=True)
        self.lines.append(text)
        self._flush()

    def row(self, group, shape, dtype, impl, fwd, both, check, note):
        self.rows.append((group, shape, dtype, impl, fwd, both, check, note))
        self.say(f"  {group} | {shape} | {dtype} | {impl} | fwd {_ms(fwd)} | fwd+bwd {_ms(both)} | {check} | {note}")

    def table(self) -> str:
        head = "| case | shape | dtype | impl | fwd ms | fwd+bwd ms | vs best peer fwd | vs best peer fwd+bwd | check | note |"
        lines = [head, "|" + "---|" * 10]
        best: dict = {}
        for g, s, d, impl, fwd, both, *_ in self.rows:
            if not impl.startswith("psmc"):
                key = (g, s, d)
                f0, b0 = best.get(key, (None, None))
                best[key] = (_min(f0, fwd), _min(b0, both))
        for g, s, d, impl, fwd, both, check, note in self.rows:
            f0, b0 = best.get((g, s, d), (None, None))
            lines.append(f"| {g} | {s} | {d} | {impl} | {_ms(fwd)} | {_ms(both)} | {_ratio(fwd, f0)} | "
                         f"{_ratio(both, b0)} | {check} | {note} |")
        return "\n".join(lines)

    def case_started(self, group, shape, dtype, impl, budget: float):
        """A row begins (the isolated child tells its parent; see benchmarks/isolate.py)."""

    def case_ended(self):
        """The row that began is done."""

    def fatal(self, error: Exception):
        """A row failed in a way that leaves the process unusable (the isolated child exits)."""

    def rows_changed(self):
        """Rewrite the files after a row was replaced (isolate: a note added to a row)."""
        self._flush()

    def _flush(self):
        if self.out is None:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "gpu_bench.log").write_text("\n".join(self.lines) + "\n")
        (self.out / "gpu_bench.md").write_text(self.table() + "\n")


class ChildReport(Report):
    """gpu.py --child: rows and lines go to the parent as events (benchmarks/isolate.py)."""

    def __init__(self, events_path: str):
        super().__init__(None)
        from benchmarks.isolate import EventLog
        self.log = EventLog(events_path)
        self.sent: list = []

    def say(self, text: str = ""):
        self.lines.append(text)
        self.log.emit("say", text=text)

    def row(self, group, shape, dtype, impl, fwd, both, check, note):
        self.rows.append((group, shape, dtype, impl, fwd, both, check, note))
        self.sync()

    def sync(self):
        """Send the rows not sent yet, and those changed since (a note added after the row)."""
        for i, row in enumerate(self.rows):
            if i >= len(self.sent) or self.sent[i] != row:
                self.log.emit("row", index=i, row=list(row))
                self.sent[i:i + 1] = [row]

    def group(self, index: int):
        self.sync()
        self.log.emit("group", index=index)

    def case_started(self, group, shape, dtype, impl, budget: float):
        self.sync()
        self.log.emit("case", row=[group, shape, dtype, impl], budget=budget)

    def case_ended(self):
        self.log.emit("case-end")

    def fatal(self, error: Exception):
        text = str(error)
        if any(m in text for m in ("CUDA error", "illegal memory access", "device-side assert")):
            self.sync()
            self.log.emit("say", text="  (a CUDA error leaves this process's context unusable: a new one goes on)")
            self.log.emit("case-end")
            os._exit(3)

    def done(self):
        self.sync()
        self.log.emit("done")


def _inject_fault(impl: str):
    """PSMC_BENCH_FAULT=hang:TEXT or exit:TEXT, for the tests of the isolation: the row whose impl
    contains TEXT blocks SIGALRM and sleeps (a call that never returns to Python), or exits."""
    fault = os.environ.get("PSMC_BENCH_FAULT", "")
    kind, _, text = fault.partition(":")
    if not text or text not in impl:
        return
    if kind == "hang":
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM, signal.SIGINT})
        time.sleep(3600)
    elif kind == "exit":
        os._exit(9)


def _min(a, b):
    return b if a is None else a if b is None else min(a, b)


def _ms(t) -> str:
    return "-" if not isinstance(t, (int, float)) else f"{t:.3f}"


def _ratio(t, ref) -> str:
    return f"{t / ref:.2f}x" if isinstance(t, (int, float)) and isinstance(ref, (int, float)) and ref > 0 else "-"


# ---------------------------------------------------------------------- time limits
class Overrun(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds: float):
    """SIGALRM ends the block with Overrun (main thread, POSIX); a no-op elsewhere."""
    if not hasattr(signal, "SIGALRM") or seconds <= 0:
        yield
        return

    def fire(signum, frame):
        raise Overrun(f"over its {seconds:.0f} s budget")
    previous = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable, device, budget_s: float, repeats: int = 10) -> float:
    """Median milliseconds of fn() after one warm-up call (which compiles); stops repeating when
    the budget is half spent."""
    start = time.perf_counter()
    fn()
    sync(device)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t0))
        if time.perf_counter() - start > budget_s / 2:
            break
    return statistics.median(times)


# ---------------------------------------------------------------------- checks
def rel_rms(ref: torch.Tensor, out: torch.Tensor) -> float:
    ref, out = ref.double(), out.double()
    return ((ref - out).norm() / ref.norm().clamp_min(1e-30)).item()


def verdict(err: float, dtype) -> str:
    tol = 1e-4 if dtype == torch.float32 else 2e-2  # fp32: chunked sums reorder; bf16: 8-bit mantissa I/O
    return f"{'ok' if err <= tol else 'MISMATCH'} rel-rms {err:.1e}"


# ---------------------------------------------------------------------- psmc
def load(name: str):
    import psmc
    return psmc.load(EXAMPLES / f"{name}.psm").__psmc_layers__[name]


def psmc_paths(layer, inputs: dict, kind: str = "forward") -> list:
    """(path name, reason or None) for every path the dispatcher has for this op and pass,
    whatever the layer's backend (a 'triton' and a 'torch' twin are asked)."""
    from psmc.runtime import dispatch
    seen = {}
    for backend in ("triton", "torch"):
        twin = type(layer)(backend="torch", check_finite=False, **layer.dims)
        twin.load_state_dict(layer.state_dict())
        twin.to(next(iter(inputs.values())).device)
        twin.backend = backend
        call = twin._prepare(dict(inputs), step=kind == "step")
        for path, reason in dispatch.candidates(twin, call, kind):
            seen.setdefault(path.name, (path, reason, twin))
    out = []
    for name, (path, reason, twin) in sorted(seen.items()):
        if SKIP_TRITON[0] and path.triton:
            reason = "--skip-triton"
        for variant in _variants(path, twin, next(iter(inputs.values())).device):
            out.append((name + (f"[{variant}]" if variant else ""), _Variant(path, variant), reason, twin))
    return out


def _is_auto(pname: str, chosen: str) -> bool:
    return pname == chosen or pname == f"{chosen}[triton kernels]"


def _variants(path, layer, device) -> list:
    """chunk_linear_attention has its own switch between chunked Triton kernels and the torch
    form (psmc.runtime.chunkwise.BACKEND, where the runtime has it): time both on a GPU."""
    from psmc.runtime import chunkwise
    if path.name == "chunkwise" and hasattr(chunkwise, "BACKEND") and device.type == "cuda":
        return ["triton kernels", "torch"]
    return [None]


class _Variant:
    """A dispatcher path, with chunkwise.BACKEND set while it runs (forward and backward: the
    autograd function is chosen in the forward)."""

    def __init__(self, path, variant):
        self.path, self.variant = path, variant
        self.name, self.run, self.triton, self.cost = path.name, path.run, path.triton, path.cost

    @contextlib.contextmanager
    def switch(self):
        if self.variant is None:
            yield
            return
        from psmc.runtime import chunkwise
        saved = chunkwise.BACKEND
        chunkwise.BACKEND = "auto" if self.variant == "triton kernels" else "torch"
        try:
            yield
        finally:
            chunkwise.BACKEND = saved


SKIP_TRITON = [False]


def run_path(path, layer, inputs: dict):
    """The outputs of one pass through one dispatcher path (torch paths: the layer's own code)."""
    call = layer._prepare(dict(inputs), step=False)
    with path.switch() if isinstance(path, _Variant) else contextlib.nullcontext():
        if path.run is not None:
            outs, _ = path.run(layer, call, None)
        else:
            layer.use_fast_path = path.name != "torch-scan"
            outs, _ = layer._forward_tokens(call, None, False)
    return outs[0]


def attn_inputs(name: str, shape, device, dtype, seed=0) -> dict:
    B, T, H, K, V = shape
    g = torch.Generator(device="cpu").manual_seed(seed)

    def rnd(*s, scale=1.0):
        return (torch.randn(*s, generator=g) * scale).to(device=device, dtype=dtype)
    q, k, v = rnd(B, T, H, K, scale=K ** -0.5), rnd(B, T, H, K, scale=K ** -0.5), rnd(B, T, H, V)
    if name == "gla":
        gk = (-torch.rand(B, T, H, K, generator=g) * 0.1).to(device=device, dtype=dtype)
        return {"q": q, "k": k, "v": v, "gk": gk}
    if name == "simple_gla":
        gate = (-torch.rand(B, T, H, generator=g) * 0.1).to(device=device, dtype=dtype)
        return {"q": q, "k": k, "v": v, "g": gate}
    if name == "mlstm":  # examples/mlstm.psm: f the log forget gate, i the input gate's pre-activation
        f = torch.nn.functional.logsigmoid(torch.randn(B, T, H, generator=g) + 3).to(device=device, dtype=dtype)
        i = (torch.randn(B, T, H, generator=g) * 0.5).to(device=device, dtype=dtype)
        return {"q": q, "k": k, "v": v, "f": f, "i": i}
    if name == "rwkv6":  # examples/rwkv6.psm: decay exp(-exp(w)), the bonus u one [H, K] for every token
        w = (torch.randn(B, T, H, K, generator=g) * 0.5 - 1.0).to(device=device, dtype=dtype)
        u = rnd(1, 1, H, K)
        return {"r": q, "k": k, "v": v, "w": w, "u": u}
    if name == "rwkv7":  # RWKV-7's inputs: log decays -e^-0.5 sigmoid, a = -kappa, b = kappa * iclr
        w = (-0.6065 * torch.sigmoid(torch.randn(B, T, H, K, generator=g))).to(device=device, dtype=dtype)
        kappa = torch.nn.functional.normalize(torch.randn(B, T, H, K, generator=g), dim=-1)
        iclr = torch.sigmoid(torch.randn(B, T, H, K, generator=g))
        return {"r": q, "w": w, "k": k, "v": v, "a": (-kappa).to(device=device, dtype=dtype),
                "b": (kappa * iclr).to(device=device, dtype=dtype)}
    k = torch.nn.functional.normalize(k.float(), dim=-1).to(dtype)  # delta rules: unit keys
    if name == "gated_delta_product":  # fla's layout: the two steps' k, v, beta interleaved [B, 2T, H, ...]
        keys = torch.nn.functional.normalize(torch.randn(B, 2 * T, H, K, generator=g), dim=-1).to(device=device,
                                                                                                   dtype=dtype)
        values = rnd(B, 2 * T, H, V)
        beta = torch.rand(B, 2 * T, H, generator=g).to(device=device, dtype=dtype)
        gate = torch.nn.functional.logsigmoid(torch.randn(B, T, H, generator=g)).to(device=device, dtype=dtype)
        steps = {f"{n}{j + 1}": t[:, j::2] for j in (0, 1) for n, t in (("k", keys), ("v", values), ("b", beta))}
        return {"q": q, **steps, "g": gate}  # (the steps: strided views of the interleaved tensors)
    if name == "kda":
        gate = torch.nn.functional.logsigmoid(torch.randn(B, T, H, K, generator=g)).to(device=device, dtype=dtype)
        beta = torch.rand(B, T, H, generator=g).to(device=device, dtype=dtype)
        return {"q": q, "k": k, "v": v, "beta": beta, "g": gate}
    beta = torch.rand(B, T, H, generator=g).to(device=device, dtype=dtype)
    return {"q": q, "k": k, "v": v, "beta": beta}


def _interleaved(first_step: torch.Tensor) -> torch.Tensor:
    """The interleaved [B, 2T, ...] tensor that the first step's view [:, 0::2] was taken from
    (attn_inputs): fla's layout, handed over without a copy."""
    base = first_step._base
    assert base is not None and base.shape[1] == 2 * first_step.shape[1] and base.data_ptr() == first_step.data_ptr()
    return base


def fla_peers(name: str) -> list:
    """(impl, fn(inputs) -> output) for fla's kernels of this op; empty when fla is missing."""
    if name == "mlstm":
        return []  # (fla has no mLSTM kernel; psmc's paths are compared with each other)
    try:
        if name == "gla":
            from fla.ops.gla import chunk_gla, fused_recurrent_gla
            return [("fla chunk_gla", lambda x: chunk_gla(x["q"], x["k"], x["v"], x["gk"])[0]),
                    ("fla fused_recurrent_gla", lambda x: fused_recurrent_gla(x["q"], x["k"], x["v"], x["gk"])[0])]
        if name == "simple_gla":
            from fla.ops.simple_gla import chunk_simple_gla, fused_recurrent_simple_gla
            return [("fla chunk_simple_gla", lambda x: chunk_simple_gla(x["q"], x["k"], x["v"], x["g"])[0]),
                    ("fla fused_recurrent_simple_gla",
                     lambda x: fused_recurrent_simple_gla(x["q"], x["k"], x["v"], x["g"])[0])]
        if name == "rwkv6":  # scale 1; fla takes the log decay, -exp(w) (one elementwise op in its timing)
            from fla.ops.rwkv6 import chunk_rwkv6, fused_recurrent_rwkv6
            return [("fla chunk_rwkv6", lambda x: chunk_rwkv6(x["r"], x["k"], x["v"], -x["w"].float().exp(),
                                                              x["u"][0, 0], scale=1.0)[0]),
                    ("fla fused_recurrent_rwkv6", lambda x: fused_recurrent_rwkv6(
                        x["r"], x["k"], x["v"], -x["w"].float().exp(), x["u"][0, 0], scale=1.0)[0])]
        if name == "rwkv7":  # examples/rwkv7.psm: scale 1, w the log decay, as fla's
            from fla.ops.rwkv7 import chunk_rwkv7, fused_recurrent_rwkv7
            return [("fla chunk_rwkv7", lambda x: chunk_rwkv7(x["r"], x["w"], x["k"], x["v"], x["a"], x["b"],
                                                              scale=1.0)[0]),
                    ("fla fused_recurrent_rwkv7", lambda x: fused_recurrent_rwkv7(
                        x["r"], x["w"], x["k"], x["v"], x["a"], x["b"], scale=1.0)[0])]
        if name == "kda":  # examples/kda.psm: scale K ** -0.5, fla's default
            from fla.ops.kda import chunk_kda, fused_recurrent_kda
            return [("fla chunk_kda", lambda x: chunk_kda(x["q"], x["k"], x["v"], x["g"], x["beta"])[0]),
                    ("fla fused_recurrent_kda",
                     lambda x: fused_recurrent_kda(x["q"], x["k"], x["v"], x["g"], x["beta"])[0])]
        if name == "gated_delta_product":  # examples/gated_delta_product.psm: scale K ** -0.5, fla's default
            from fla.ops.gated_delta_product import chunk_gated_delta_product
            return [("fla chunk_gated_delta_product", lambda x: chunk_gated_delta_product(
                x["q"], _interleaved(x["k1"]), _interleaved(x["v1"]), x["g"], _interleaved(x["b1"]),
                num_householder=2)[0])]
        from fla.ops.delta_rule import chunk_delta_rule
        # psmc's delta_rule does not scale q (examples/delta_rule.psm): fla with scale = 1
        return [("fla chunk_delta_rule", lambda x: chunk_delta_rule(x["q"], x["k"], x["v"], x["beta"], scale=1.0)[0])]
    except Exception as e:  # noqa: BLE001
        return [(f"fla ({type(e).__name__}: {str(e)[:80]})", None)]


# ---------------------------------------------------------------------- the cases
@dataclass
class Bench:
    device: torch.device
    dry: bool
    report: Report
    deadline: float
    case_budget: float = CASE_BUDGET_S
    skip_triton: bool = False
    warm: bool = False  # --warm: each row's calls run once, untimed and unchecked (fills the caches)
    skip: int = 0  # --skip-cases: the first rows are not run (an isolated child restarted after them)
    cases: int = 0

    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def case(self, group, shape, dtype, impl, fwd: Callable | None, both: Callable | None, check: Callable | None,
             note: str = ""):
        """One row: forward and forward+backward timings and a correctness check, each guarded.
        Every row gets twice the budget where the first call tunes: fla's autotuner, and psmc's
        (psmc.runtime.autotune; the fixed-layout rows tune nothing)."""
        self.cases += 1
        if self.cases <= self.skip:
            return
        dname = str(dtype).replace("torch.", "")
        self.report.case_started(group, shape, dname, impl, min(self.case_budget * 2, max(self.left(), 0)) + CHECK_BUDGET_S)
        try:
            self._case(group, shape, dname, impl, fwd, both, check, note)
        finally:
            self.report.case_ended()

    def _case(self, group, shape, dname, impl, fwd, both, check, note):
        _inject_fault(impl)
        if fwd is None:
            self.report.row(group, shape, dname, impl, None, None, "-", note or "unavailable")
            return
        if self.left() < 5:
            self.report.row(group, shape, dname, impl, None, None, "-", "skipped: out of total time")
            return
        if self.warm:
            self._warm(f"{group} | {shape} | {dname} | {impl}", fwd, both)
            return
        results, notes = [], [note] if note else []
        fatal = None
        budget = min(self.case_budget * 2, self.left())
        start = time.perf_counter()
        for label, fn in (("fwd", fwd), ("fwd+bwd", both)):
            if fn is None:
                results.append(None)
                continue
            remaining = budget - (time.perf_counter() - start)
            if remaining < 1:
                results.append(None)
                notes.append(f"{label}: not timed, the row's budget is spent")
                continue
            try:
                with time_limit(remaining):
                    results.append(timed(fn, self.device, remaining, repeats=1 if self.dry else 10))
            except Exception as e:  # noqa: BLE001 - a failing case is a row, never the end of the run
                results.append(None)
                notes.append(f"{label}: {type(e).__name__}: {_first_line(e)}")
                fatal = e
                _clear(self.device)
        verdict_text = "-"
        if check is not None:
            try:
                with time_limit(max(5.0, min(CHECK_BUDGET_S, self.left()))):
                    verdict_text = check()
            except Exception as e:  # noqa: BLE001
                verdict_text = f"check failed: {type(e).__name__}: {_first_line(e)}"
                fatal = e
                _clear(self.device)
        self.report.row(group, shape, dname, impl, results[0], results[1], verdict_text, "; ".join(notes))
        if fatal is not None:
            self.report.fatal(fatal)


    def _warm(self, what: str, fwd: Callable, both: Callable | None):
        """One call of each pass, to compile psmc's kernels and tune the peers' (fla's autotuner
        keeps its choices on disk, Triton its binaries, Inductor its graphs): a later timed run in
        another process with the same caches then measures kernels, not compilers."""
        start = time.perf_counter()
        outcome, fatal = [], None
        for label, fn in (("fwd", fwd), ("fwd+bwd", both)):
            if fn is None:
                continue
            try:
                with time_limit(min(self.case_budget * 2, self.left())):
                    fn()
                    sync(self.device)
                outcome.append(f"{label} ok")
            except Exception as e:  # noqa: BLE001 - warming never stops the rest
                outcome.append(f"{label} {type(e).__name__}: {_first_line(e)}")
                _clear(self.device)
                fatal = e
        self.report.say(f"  warm {what}: {', '.join(outcome)} ({time.perf_counter() - start:.1f} s)")
        if fatal is not None:
            self.report.fatal(fatal)


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else "")[:160]


def _clear(device):
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _grad_fn(fn: Callable, inputs: dict, float_only=True) -> Callable:
    def both():
        leaves = {n: t.detach().requires_grad_(t.is_floating_point()) for n, t in inputs.items()}
        fn(leaves).float().sum().backward()
    return both


def _path_calls(path, layer, inputs: dict) -> tuple[Callable, Callable]:
    """(forward without gradients, forward + backward) of one psmc path on these inputs."""
    def fwd():
        with torch.no_grad():
            return run_path(path, layer, inputs)
    return fwd, _grad_fn(lambda leaves: run_path(path, layer, leaves), inputs)


def attention_cases(b: Bench, name: str, dtype):
    shape = TINY["attn"] if b.dry else FULL["attn"]
    label = "B={} T={} H={} K={} V={}".format(*shape)
    group = {"gla": "GLA", "simple_gla": "simple GLA", "delta_rule": "delta rule", "rwkv6": "RWKV-6", "mlstm": "mLSTM", "rwkv7": "RWKV-7",
             "kda": "KDA", "gated_delta_product": "DeltaProduct"}[name]
    try:
        cls = load(name)
        x = attn_inputs(name, shape, b.device, dtype)
        layer = cls(backend="auto", check_finite=False, K=shape[3], V=shape[4]).to(b.device)
        paths = psmc_paths(layer, x)
    except Exception as e:  # noqa: BLE001
        b.case(group, label, dtype, f"psmc {name}", None, None, None, f"{type(e).__name__}: {_first_line(e)}")
        return
    peers = fla_peers(name)
    reference = {}

    def peer_out():
        """(reference output, its name): the first fla kernel that runs, else psmc's cheapest torch
        path that is not the generic scan (in a dry run: any torch path; fla needs a GPU)."""
        if "out" not in reference:
            reference["out"] = (None, "")
            for impl, fn in peers:
                try:
                    with torch.no_grad():
                        reference["out"] = (fn(x), impl)
                    break
                except Exception:  # noqa: BLE001 - try the next reference
                    continue
            if reference["out"][0] is None:
                torch_paths = [(p.cost(t, t._prepare(dict(x), step=False)), n, p, t) for n, p, r, t in paths
                               if r is None and not p.triton]
                torch_paths = [c for c in sorted(torch_paths, key=lambda c: c[:2]) if b.dry or c[0] < 90]
                if torch_paths:
                    _, n, p, t = torch_paths[0]
                    with torch.no_grad():
                        reference["out"] = (run_path(p, t, x), f"psmc {n}")
        return reference["out"]

    from psmc.runtime import dispatch
    chosen = dispatch.choose(layer, layer._prepare(dict(x), step=False), "forward").name
    for pname, path, reason, twin in paths:
        impl = f"psmc {pname}" + (" (auto)" if _is_auto(pname, chosen) else "")
        if reason is None and not b.dry and path.cost(twin, twin._prepare(dict(x), step=False)) >= 90:
            reason = "the generic scan holds a [K, V] state per token (gigabytes here): not timed"
        if reason is not None:
            b.case(group, label, dtype, impl, None, None, None, f"not run: {reason}")
            continue

        fwd, both = _path_calls(path, twin, x)

        def check(fwd=fwd):
            ref, against = peer_out()
            if ref is None:
                return "-"
            return verdict(rel_rms(ref.float(), fwd().float()), dtype) + f" vs {against}"
        b.case(group, label, dtype, impl, fwd, both, check)
    for impl, fn in peers:
        b.case(group, label, dtype, impl, (lambda fn=fn: _no_grad(fn, x)) if fn else None,
               _grad_fn(fn, x) if fn else None, None)


def packed_lengths(total: int, count: int, seed: int = 0) -> list:
    """`count` sequence lengths (each >= 1) that sum to `total`, uneven as in a packed batch."""
    g = torch.Generator().manual_seed(seed)
    weights = torch.rand(count, generator=g) + 0.1
    lengths = [max(1, int(w)) for w in (weights / weights.sum() * total).tolist()]
    lengths[-1] += total - sum(lengths)
    return lengths


def packed_cases(b: Bench, dtype, name: str = "gla"):
    """GLA (or RWKV-7) over packed sequences (cu_seqlens, B = 1): psmc in one call (the chunk
    kernels take all sequences in the same launches; RWKV-7's DPLR kernels pad each to whole
    chunks) and one call per sequence, against fla's chunk kernel with the same offsets."""
    B, T, H, K, V = TINY["attn"] if b.dry else FULL["attn"]
    total = B * T
    lengths = packed_lengths(total, 4 if b.dry else 32)
    label = f"N={len(lengths)} total_T={total} H={H} K={K} V={V}"
    group = {"gla": "GLA packed", "rwkv7": "RWKV-7 packed"}[name]
    fla_name = {"gla": "chunk_gla", "rwkv7": "chunk_rwkv7"}[name]
    x = attn_inputs(name, (1, total, H, K, V), b.device, dtype)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=b.device)
    try:
        one_call, by_sequence = _packed_calls(b, name, cu, K=K, V=V)
    except Exception as e:  # noqa: BLE001
        b.case(group, label, dtype, f"psmc {name}", None, None, None, f"{type(e).__name__}: {_first_line(e)}")
        return
    peer = None
    try:
        if name == "gla":
            from fla.ops.gla import chunk_gla
            peer = lambda leaves: chunk_gla(leaves["q"], leaves["k"], leaves["v"], leaves["gk"], cu_seqlens=cu)[0]  # noqa: E731
        else:
            from fla.ops.rwkv7 import chunk_rwkv7
            peer = lambda x: chunk_rwkv7(x["r"], x["w"], x["k"], x["v"], x["a"], x["b"], scale=1.0,  # noqa: E731
                                         cu_seqlens=cu)[0]
    except Exception as e:  # noqa: BLE001
        peer_note = f"{type(e).__name__}: {_first_line(e)}"

    def check(mine, other):
        """Against fla where it runs, else against psmc's other way (a dry run: both on CPU)."""
        ref, against = other if peer is None or b.dry else (peer, f"fla {fla_name}")
        return verdict(rel_rms(_no_grad(ref, x).float(), _no_grad(mine, x).float()), dtype) + f" vs {against}"
    b.case(group, label, dtype, f"psmc {name}, one call (auto)", lambda: _no_grad(one_call, x),
           _grad_fn(one_call, x), lambda: check(one_call, (by_sequence, "psmc per sequence")))
    b.case(group, label, dtype, f"psmc {name}, a call per sequence", lambda: _no_grad(by_sequence, x),
           _grad_fn(by_sequence, x), lambda: check(by_sequence, (one_call, "psmc one call")))
    if peer is None:
        b.case(group, label, dtype, f"fla {fla_name} (cu_seqlens)", None, None, None, peer_note)
    else:
        b.case(group, label, dtype, f"fla {fla_name} (cu_seqlens)", lambda: _no_grad(peer, x), _grad_fn(peer, x), None)
    if name == "gla":
        packed_first_order(b, dtype, lengths)


def _packed_calls(b: Bench, name: str, cu, fast: bool = True, **dims):
    """(one call, a call per sequence): example `name` over packed inputs, the layer's packed path
    and the same layer made to loop (its one-pass route switched off, so the sequences run by
    length: one pass per distinct length). fast=False: the generated kernels instead of the
    op's fast path. A dry run uses backend='torch' (its CPU 'auto' takes the C++ kernels)."""
    cls = load(name)
    backend = "torch" if b.dry else "auto"
    layer = cls(backend=backend, check_finite=False, **dims).to(b.device)
    looped = cls(backend=backend, check_finite=False, **dims).to(b.device)
    layer.use_fast_path = looped.use_fast_path = fast
    looped._forward_packed = lambda *args, **kwargs: None  # (the layer then groups by length)
    return (lambda leaves: layer(**leaves, cu_seqlens=cu)), (lambda leaves: looped(**leaves, cu_seqlens=cu))


def packed_first_order(b: Bench, dtype, lengths: list):
    """The first-order scan over the same packing ((B, D, T)'s D channels): one call (one scan of
    the packed time axis) against a call per sequence; no peer takes packed first-order scans."""
    D = (TINY["first_order"] if b.dry else FULL["first_order"])[1]
    total = sum(lengths)
    label = f"N={len(lengths)} total_T={total} D={D}"
    group = "first-order packed"
    g = torch.Generator(device="cpu").manual_seed(1)
    x = {"x": torch.randn(1, total, D, generator=g).to(b.device, dtype),
         "log_a": (-torch.rand(1, total, D, generator=g) * 0.1).to(b.device, dtype)}
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=b.device)
    try:
        one_call, by_sequence = _packed_calls(b, "linear_recurrence", cu)
    except Exception as e:  # noqa: BLE001
        b.case(group, label, dtype, "psmc linear_recurrence", None, None, None, f"{type(e).__name__}: {_first_line(e)}")
        return

    def check(mine, other, against):
        return verdict(rel_rms(_no_grad(other, x).float(), _no_grad(mine, x).float()), dtype) + f" vs {against}"
    b.case(group, label, dtype, "psmc linear_recurrence, one call (auto)", lambda: _no_grad(one_call, x),
           _grad_fn(one_call, x), lambda: check(one_call, by_sequence, "psmc per sequence"))
    b.case(group, label, dtype, "psmc linear_recurrence, a call per sequence", lambda: _no_grad(by_sequence, x),
           _grad_fn(by_sequence, x), lambda: check(by_sequence, one_call, "psmc one call"))
    # the generated block-scan kernels (every exact scan without a fast path takes them on a GPU)
    try:
        kernels, kernels_by_length = _packed_calls(b, "linear_recurrence", cu, fast=False)
    except Exception as e:  # noqa: BLE001
        b.case(group, label, dtype, "psmc generated kernels", None, None, None, f"{type(e).__name__}: {_first_line(e)}")
        return
    b.case(group, label, dtype, "psmc generated kernels, one launch", lambda: _no_grad(kernels, x),
           _grad_fn(kernels, x), lambda: check(kernels, one_call, "psmc first-order one call"))
    b.case(group, label, dtype, "psmc generated kernels, by length", lambda: _no_grad(kernels_by_length, x),
           _grad_fn(kernels_by_length, x), lambda: check(kernels_by_length, kernels, "one launch"))


def _no_grad(fn, x):
    with torch.no_grad():
        return fn(x)


def first_order_cases(b: Bench, dtype, peak_gbps: float | None):
    B, D, T = TINY["first_order"] if b.dry else FULL["first_order"]
    label = f"B={B} D={D} T={T}"
    group = "first-order scan"
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(B, T, D, generator=g).to(b.device, dtype)
    log_a = (-torch.rand(B, T, D, generator=g) * 0.1).to(b.device, dtype)
    nbytes = 3 * x.numel() * x.element_size()
    note_bw = (lambda ms: f"{100 * nbytes / (ms * 1e-3) / (peak_gbps * 1e9):.0f}% of copy bandwidth"
               if peak_gbps and ms else "")
    inputs = {"x": x, "log_a": log_a}
    try:
        cls = load("linear_recurrence")
        layer = cls(backend="auto", check_finite=False).to(b.device)
        paths = psmc_paths(layer, inputs)
    except Exception as e:  # noqa: BLE001
        b.case(group, label, dtype, "psmc linear_recurrence", None, None, None, f"{type(e).__name__}: {_first_line(e)}")
        return
    gates, tokens = log_a.float().exp().to(dtype).transpose(1, 2).contiguous(), x.transpose(1, 2).contiguous()
    reference = {}

    def peer_out():
        """accelerated-scan's output where it is installed, else h = a*h + x run token by token in
        float64 (the check must not depend on an optional peer)."""
        if "out" not in reference:
            scan = _accelerated(b.dry) or _sequential_first_order
            with torch.no_grad():
                reference["out"] = scan(gates, tokens).transpose(1, 2)
        return reference["out"]

    for pname, impl, fwd, both in _runnable(b, (group, label, dtype), layer, paths, inputs):

        def check(fwd=fwd):
            ref = peer_out()
            return "-" if ref is None else verdict(rel_rms(ref.float(), fwd().float()), dtype)
        before = len(b.report.rows)
        b.case(group, label, dtype, impl, fwd, both, check)
        _annotate(b.report, before, note_bw)
        ms = b.report.rows[before][4] if before < len(b.report.rows) else None
        if isinstance(ms, float) and ms > 100 and b.left() > 20:  # a torch path in seconds: say where it goes
            profile(b, fwd, impl)
        if pname == "triton-first-order":  # each tiling of the same kernel fixed (psmc.runtime.triton_scan)
            _layout_cases(b, group, label, dtype, fwd, both, check, note_bw)
    scan = _accelerated(b.dry)
    before = len(b.report.rows)
    b.case(group, label, dtype, "accelerated-scan (torch reference, dry run)" if b.dry else "accelerated-scan (triton)", (lambda: _no_grad(lambda _: scan(gates, tokens), None))
           if scan else None, _grad_fn(lambda t: scan(t["g"], t["x"]), {"g": gates, "x": tokens}) if scan else None,
           None, "" if scan else "accelerated_scan.scalar not importable")
    _annotate(b.report, before, note_bw)
    compiled = _torch_associative_scan(b.device)
    before = len(b.report.rows)
    b.case(group, label, dtype, "torch associative_scan (compiled)",
           (lambda: _no_grad(lambda _: compiled(log_a.exp(), x), None)) if compiled else None,
           _grad_fn(lambda t: compiled(t["a"].exp(), t["x"]), {"a": log_a, "x": x}) if compiled else None, None,
           "" if compiled else "associative_scan not available")
    _annotate(b.report, before, note_bw)


def _runnable(b: Bench, row: tuple, layer, paths: list, inputs: dict):
    """(path name, row label, forward, forward + backward) of every psmc path that can run on
    these inputs; the others get their "not run" row (`row`: the case's group, shape, dtype)."""
    from psmc.runtime import dispatch
    chosen = dispatch.choose(layer, layer._prepare(dict(inputs), step=False), "forward").name
    for pname, path, reason, twin in paths:
        impl = f"psmc {pname}" + (" (auto)" if _is_auto(pname, chosen) else "")
        if reason is not None:
            b.case(*row, impl, None, None, None, f"not run: {reason}")
            continue
        yield (pname, impl, *_path_calls(path, twin, inputs))


def tree_cases(b: Bench, dtype, peak_gbps: float | None):
    """The paper's fixed tree of a non-associative op (examples/ema.psm) at the first-order
    shape: the tree kernels (dispatch path triton-tree, one launch) against the torch tree
    (about 2 log2(T) rounds of batched Agg calls and gathers). The check compares them (the
    same brackets: equal to fp32 roundoff). Bandwidth: the kernel reads the leaves and writes
    the prefixes and the nodes (3 passes); the lift and readout around it are torch's."""
    B, D, T = TINY["first_order"] if b.dry else FULL["first_order"]
    label = f"B={B} D={D} T={T}"
    group = "tree scan (ema)"
    y = torch.randn(B, T, D, generator=torch.Generator(device="cpu").manual_seed(0)).to(b.device, dtype)
    nbytes = 3 * y.numel() * 4
    note_bw = (lambda ms: f"{100 * nbytes / (ms * 1e-3) / (peak_gbps * 1e9):.0f}% of copy bandwidth"
               if peak_gbps and ms else "")
    _every_path(b, group, label, dtype, "ema", {}, {"y": y}, note_bw)


def tree_decode_cases(b: Bench, dtype):
    """Serving a tree scan (examples/ema.psm): B rows at different positions decode `steps`
    tokens. A RaggedState of TreeStates steps each count group on its own (a call per row
    here); a TreeCache steps every row in one call: the torch push (every level computed and
    selected), that push compiled (one graph at every position), and the Triton step kernel
    (one launch; each row walks its own merges). Checked against the ragged states' outputs."""
    import itertools

    from psmc.runtime.state import TreeCache
    steps = TINY["decode_steps"] if b.dry else FULL["decode_steps"]
    B, D = (4, 16) if b.dry else (32, 2048)
    lengths = [5 + 3 * i for i in range(B)] if b.dry else [100 + 97 * i for i in range(B)]
    group = "decode tree (ema)"
    label = f"B={B} D={D}, rows at {lengths[0]}..{lengths[-1]} tokens (ms for {steps} tokens)"

    def per_token(ms):
        return f"{1e3 * ms / steps:.1f} us/token (all rows)" if ms else ""
    try:
        cls = load("ema")
        gen = torch.Generator().manual_seed(0)
        prompt = torch.randn(1, sum(lengths), D, generator=gen).to(b.device, dtype)
        tokens = torch.randn(steps, B, D, generator=gen).to(b.device, dtype)
        ref = cls(backend="torch", check_finite=False).to(b.device)
        with torch.no_grad():
            _, ragged = ref(y=prompt, cu_seqlens=torch.tensor([0, *itertools.accumulate(lengths)]), return_state=True)
        cache = TreeCache.of(ragged, max(lengths) + steps)
    except Exception as e:  # noqa: BLE001
        b.case(group, label, dtype, "psmc ema", None, None, None, f"{type(e).__name__}: {_first_line(e)}")
        return
    last: dict = {}

    def decode(step, state, key):
        def run():
            with torch.no_grad():
                s = state
                for t in range(steps):
                    y, s = step(s, y=tokens[t])
                last[key] = y
        return run

    def check(key):
        return lambda: verdict(rel_rms(last["ragged"], last[key]), dtype)
    tri = cls(backend="triton", check_finite=False).to(b.device)
    rows = [("ragged", "psmc RaggedState (a call per count group)", ref.step, ragged, None),
            ("push", "psmc TreeCache, torch push", ref.step, cache, None),
            ("compiled", "psmc TreeCache, torch push compiled", None, cache,
             "the dry run (Inductor's CPU build takes minutes)" if b.dry else None),
            ("kernel", "psmc TreeCache, Triton step kernel (auto on CUDA)", tri.step, cache,
             "--skip-triton" if SKIP_TRITON[0] else None)]
    for key, impl, step, state, reason in rows:
        if reason is not None:
            b.case(group, label, dtype, impl, None, None, None, f"not run: {reason}")
            continue
        if step is None:
            step = torch.compile(ref.step, fullgraph=True)
        before = len(b.report.rows)
        b.case(group, label, dtype, impl, decode(step, state, key), None, None if key == "ragged" else check(key))
        _annotate(b.report, before, per_token)


def _every_path(b: Bench, group: str, label: str, dtype, name: str, dims: dict, inputs: dict, note_bw):
    """A row per psmc path of examples/<name>.psm on `inputs`, each checked against the
    generic torch scan (torch-scan)."""
    try:
        layer = load(name)(backend="auto", check_finite=False, **dims).to(b.device)
        paths = psmc_paths(layer, inputs)
    except Exception as e:  # noqa: BLE001
        b.case(group, label, dtype, f"psmc {name}", None, None, None, f"{type(e).__name__}: {_first_line(e)}")
        return
    reference = {}
    for pname, impl, fwd, both in _runnable(b, (group, label, dtype), layer, paths, inputs):
        if pname == "torch-scan":
            reference["fwd"] = fwd

        def check(fwd=fwd):
            if "out" not in reference and "fwd" in reference:
                reference["out"] = reference["fwd"]().float()
            return verdict(rel_rms(reference["out"], fwd().float()), dtype) if "out" in reference else "-"
        before = len(b.report.rows)
        b.case(group, label, dtype, impl, fwd, both, check)
        _annotate(b.report, before, note_bw)
        if pname in TUNED_PATHS:  # the same kernels at their static launch configuration
            before = len(b.report.rows)
            b.case(group, label, dtype, f"{impl}, static launch (PSMC_AUTOTUNE=0)", _static(fwd), _static(both),
                   _static(check))
            _annotate(b.report, before, note_bw)


# the paths whose launches psmc.runtime.autotune tunes beyond what a row of their own shows
# (the first-order scan's two tilings have fixed rows: `_layout_cases`)
TUNED_PATHS = ("triton-state-loop", "triton-block-scan", "triton-token-loop")


def _static(fn: Callable | None) -> Callable | None:
    """fn with the autotuner off (psmc.runtime.autotune.off): the rows beside the tuned ones
    measure what tuning gained."""
    if fn is None:
        return None

    def run(*args):
        previous = os.environ.get("PSMC_AUTOTUNE")
        os.environ["PSMC_AUTOTUNE"] = "0"
        try:
            return fn(*args)
        finally:
            if previous is None:
                del os.environ["PSMC_AUTOTUNE"]
            else:
                os.environ["PSMC_AUTOTUNE"] = previous
    return run


def ssm_cases(b: Bench, dtype, peak_gbps: float | None):
    """The selective SSM (examples/selective_ssm.psm) at mamba's layout: u, delta [B, T, D], A
    [1, 1, D, N] per channel, B and C [B, T, 1, N] shared by the channels. Every psmc path:
    the state loop (triton-state-loop: lift, recurrence and readout in one kernel), the
    first-order scan (torch lift and readout over [B, T, D, N] tensors around the scan
    kernel) and the torch paths, checked against the generic torch scan. Bandwidth: the
    state loop reads u and delta and writes y (3 passes of [B, T, D]; B and C are D times
    smaller)."""
    B, T, D, N = TINY["ssm"] if b.dry else FULL["ssm"]
    label = f"B={B} T={T} D={D} N={N}"
    g = torch.Generator(device="cpu").manual_seed(0)
    inputs = {"u": torch.randn(B, T, D, generator=g), "delta": torch.rand(B, T, D, generator=g) * 0.1,
              "A": -torch.rand(1, 1, D, N, generator=g), "B": torch.randn(B, T, 1, N, generator=g),
              "C": torch.randn(B, T, 1, N, generator=g)}
    inputs = {n: x.to(b.device, dtype) for n, x in inputs.items()}
    nbytes = 3 * B * T * D * inputs["u"].element_size()
    note_bw = (lambda ms: f"{100 * nbytes / (ms * 1e-3) / (peak_gbps * 1e9):.0f}% of copy bandwidth"
               if peak_gbps and ms else "")
    _every_path(b, "selective SSM", label, dtype, "selective_ssm", {"N": N}, inputs, note_bw)


def _layout_cases(b: Bench, group, label, dtype, fwd: Callable, both: Callable, check: Callable, note_bw):
    """The first-order kernel with each tiling fixed (triton_scan.LAYOUT: 'split', the warps
    splitting a tile's time axis; 'in-thread', each thread scanning its channels' tile in
    registers) beside the row above, where the autotuner picks one per shape: a tuned row slower
    than both says the tuner chose badly."""
    from psmc.runtime import triton_scan

    def fixed(fn, layout):
        def run(*args):
            previous, triton_scan.LAYOUT = triton_scan.LAYOUT, layout
            try:
                return fn(*args)
            finally:
                triton_scan.LAYOUT = previous
        return run
    for layout in triton_scan.LAYOUTS:
        before = len(b.report.rows)
        b.case(group, label, dtype, f"psmc triton-first-order, {layout} layout", fixed(fwd, layout),
               fixed(both, layout), fixed(check, layout))
        _annotate(b.report, before, note_bw)


def profile(b: Bench, fn: Callable, what: str):
    """The five ops that take the most CPU time in one call of a slow path."""
    try:
        from torch.profiler import profile as _profile
        with time_limit(15), _profile() as prof:
            fn()
            sync(b.device)
        table = prof.key_averages().table(sort_by="cpu_time_total", row_limit=5)
        b.report.say(f"  profile of one call of {what}:\n" + table)
    except Exception as e:  # noqa: BLE001
        b.report.say(f"  profile of {what} failed: {type(e).__name__}: {_first_line(e)}")


def _annotate(report: Report, index: int, note: Callable):
    """Add the bandwidth fraction to the row just written (forward time)."""
    if index < len(report.rows):
        row = list(report.rows[index])
        extra = note(row[4])
        if extra:
            row[7] = "; ".join(x for x in (row[7], extra) if x)
            report.rows[index] = tuple(row)


def _sequential_first_order(gates: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """h_t = gates_t * h_{t-1} + tokens_t over the last axis, in float64: the oracle of last resort."""
    g, x = gates.double(), tokens.double()
    h, out = torch.zeros_like(x[..., 0]), torch.empty_like(x)
    for t in range(x.shape[-1]):
        h = g[..., t] * h + x[..., t]
        out[..., t] = h
    return out


def _accelerated(dry: bool = False):
    """accelerated-scan's Triton scan; in a dry run its torch reference (same API: its Triton
    kernel takes minutes under the interpreter)."""
    try:
        if dry:
            from accelerated_scan.ref import scan
        else:
            from accelerated_scan.scalar import scan
        return scan
    except Exception:  # noqa: BLE001
        return None


def _torch_associative_scan(device):
    try:
        from torch._higher_order_ops.associative_scan import associative_scan
    except ImportError:
        return None

    def combine(left, right):
        return left[0] * right[0], right[0] * left[1] + right[1]
    if device.type != "cuda":  # pointwise needs CUDA; inductor's CPU compile takes minutes: eager
        return lambda a, b: associative_scan(combine, (a, b), dim=1, combine_mode="generic")[1]
    return torch.compile(lambda a, b: associative_scan(combine, (a, b), dim=1, combine_mode="pointwise")[1])


def decode_cases(b: Bench, dtype):
    """Microseconds per token at batch 1: psmc step (every step path) vs fla fused_recurrent with a
    carried state."""
    steps = TINY["decode_steps"] if b.dry else FULL["decode_steps"]

    def per_token(ms):
        return f"{1e3 * ms / steps:.1f} us/token" if ms else ""
    _, _, H, K, V = TINY["attn"] if b.dry else FULL["attn"]
    label = f"B=1 H={H} K={K} V={V}"
    for name in ("gla", "simple_gla", "delta_rule", "rwkv7", "linear_recurrence"):
        group = f"decode {name}"
        try:
            cls = load(name)
            if name == "linear_recurrence":
                D = (TINY if b.dry else FULL)["first_order"][1]
                xs = {"x": torch.randn(1, steps, D), "log_a": -torch.rand(1, steps, D) * 0.1}
                layer = cls(backend="auto", check_finite=False)
            else:
                xs = attn_inputs(name, (1, steps, H, K, V), "cpu", torch.float32)
                layer = cls(backend="auto", check_finite=False, K=K, V=V)
            xs = {n: t.to(b.device, dtype) for n, t in xs.items()}
            layer = layer.to(b.device)
            paths = psmc_paths(layer, {n: t[:, 0] for n, t in xs.items()}, kind="step")
        except Exception as e:  # noqa: BLE001
            b.case(group, label, dtype, f"psmc {name} step", None, None, None, f"{type(e).__name__}: {_first_line(e)}")
            continue
        for pname, path, reason, twin in paths:
            if reason is not None:
                b.case(group, label, dtype, f"psmc {pname}", None, None, None, f"not run: {reason}")
                continue

            def decode(twin=twin):
                with torch.no_grad():
                    state = twin.init_state()
                    for t in range(steps):
                        _, state = twin.step(state, **{n: v[:, t] for n, v in xs.items()})
            before = len(b.report.rows)
            # the delta rule and RWKV-7 have no dispatch step path: their step is the fast step (one
            # Triton token kernel for CUDA tensors, psmc.runtime.triton_delta_step / triton_dplr_step)
            impl = "psmc step (auto)" if name in ("delta_rule", "rwkv7") else f"psmc {pname}"
            b.case(group, label + " (ms for %d tokens)" % steps, dtype, impl, decode, None, None)
            _annotate(b.report, before, per_token)
        if name == "linear_recurrence":
            continue
        peer = _fla_decode(name, xs, steps, H, K, V)
        before = len(b.report.rows)
        b.case(group, label + " (ms for %d tokens)" % steps, dtype, peer[0], peer[1], None, None, peer[2])
        _annotate(b.report, before, per_token)


def _fla_decode(name, xs, steps, H, K, V):
    try:
        if name == "rwkv7":
            from fla.ops.rwkv7 import fused_recurrent_rwkv7
            fn = lambda r, w, k, v, a, b, **kw: fused_recurrent_rwkv7(r, w, k, v, a, b, scale=1.0, **kw)  # noqa: E731
            gates = ("r", "w", "k", "v", "a", "b")
        elif name == "delta_rule":
            from fla.ops.delta_rule import fused_recurrent_delta_rule as fn
            gate = "beta"
        elif name == "gla":
            from fla.ops.gla import fused_recurrent_gla as fn
            gate = "gk"
        else:
            from fla.ops.simple_gla import fused_recurrent_simple_gla as fn
            gate = "g"
        if name != "rwkv7":
            gates = ("q", "k", "v", gate)
    except Exception as e:  # noqa: BLE001
        return ("fla fused_recurrent", None, f"{type(e).__name__}: {_first_line(e)}")
    state0 = torch.zeros(1, H, K, V, device=xs["k"].device, dtype=torch.float32)

    def decode():
        with torch.no_grad():
            state = state0
            for t in range(steps):
                sl = slice(t, t + 1)
                _, state = fn(*(xs[n][:, sl] for n in gates), initial_state=state, output_final_state=True)
    return (f"fla fused_recurrent ({name}, T=1 per call)", decode, "")


def copy_bandwidth(device) -> float | None:
    """GB/s of a 1 GiB device-to-device copy (read + write), measured now."""
    if device.type != "cuda":
        return None
    x = torch.empty(1 << 28, device=device, dtype=torch.float32)
    y = torch.empty_like(x)
    ms = timed(lambda: y.copy_(x), device, 5.0)
    del x, y
    return 2 * (1 << 30) / (ms * 1e-3) / 1e9


# ---------------------------------------------------------------------- main
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes on CPU (Triton paths interpreted)")
    parser.add_argument("--budget", type=float, default=TOTAL_BUDGET_S, help="seconds for all the cases")
    parser.add_argument("--case-budget", type=float, default=CASE_BUDGET_S, help="seconds per row")
    parser.add_argument("--skip-triton", action="store_true",
                        help="do not run psmc's Triton paths (CI's dry run: the interpreter is slow)")
    parser.add_argument("--warm", action="store_true",
                        help="run each row's calls once, untimed and unchecked, to fill the compile and "
                             "autotune caches for a timed run that follows (gpu_check.sh runs it beside the tests)")
    parser.add_argument("--only", nargs="*", default=None,
                        help="groups to run: gla simple_gla delta_rule rwkv6 mlstm rwkv7 kda first_order ssm decode tree tree_decode packed "
                             "packed_rwkv7")
    parser.add_argument("--isolate", action="store_true",
                        help="run the rows in a child process that is killed (and restarted at the next row) when a "
                             "row outlives its budget in a call that never returns to Python "
                             "(benchmarks/isolate.py); gpu_check.sh uses it")
    parser.add_argument("--child", metavar="EVENTS", help=argparse.SUPPRESS)  # (isolate's child: events to this file)
    parser.add_argument("--start-group", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--skip-cases", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--peak", type=float, default=None, help=argparse.SUPPRESS)
    raw = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(raw)
    if args.dry_run:
        os.environ.setdefault("TRITON_INTERPRET", "1")
        device = torch.device("cpu")
    elif not torch.cuda.is_available():
        print("no CUDA device: use --dry-run", file=sys.stderr)
        return 2
    else:
        device = torch.device("cuda")
    report = ChildReport(args.child) if args.child else Report(os.environ.get("OUT"))
    start = time.perf_counter()
    b = Bench(device, args.dry_run, report, start + args.budget, args.case_budget, skip_triton=args.skip_triton,
              warm=args.warm, skip=args.skip_cases)
    if device.type == "cuda" and not args.child:
        report.say(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  "
                   f"triton {_version('triton')}  fla {_version('fla')}  accelerated-scan "
                   f"{_version('accelerated_scan')}")
    peak = args.peak
    try:
        if not (args.warm or args.child):
            peak = copy_bandwidth(device)
        if peak and not args.child:
            report.say(f"device copy bandwidth in this run: {peak:.0f} GB/s")
    except Exception as e:  # noqa: BLE001
        report.say(f"copy bandwidth not measured: {type(e).__name__}: {_first_line(e)}")
    SKIP_TRITON[0] = args.skip_triton
    # the most informative rows first, so that a run cut by its budget still has them
    bf16, fp32 = torch.bfloat16, torch.float32
    order = [("first_order", fp32), ("gla", bf16), ("simple_gla", bf16), ("delta_rule", bf16), ("decode", fp32),
             ("ssm", bf16), ("tree", fp32), ("tree_decode", fp32), ("packed", bf16), ("rwkv7", bf16), ("kda", bf16), ("packed_rwkv7", bf16),
             ("gated_delta_product", bf16), ("rwkv6", bf16), ("mlstm", bf16),
             ("ssm", fp32), ("first_order", bf16), ("gla", fp32), ("simple_gla", fp32), ("delta_rule", fp32),
             ("packed", fp32), ("rwkv7", fp32), ("kda", fp32), ("packed_rwkv7", fp32), ("gated_delta_product", fp32),
             ("rwkv6", fp32), ("mlstm", fp32)]
    if args.dry_run:
        order = [(g, fp32) for g, d in order if d == fp32]
    plan = []
    for group, dtype in order:
        if args.only and group not in args.only:
            continue
        if group == "first_order":
            plan.append((group, lambda dtype=dtype: first_order_cases(b, dtype, peak)))
        elif group == "tree":
            plan.append((group, lambda dtype=dtype: tree_cases(b, dtype, peak)))
        elif group == "tree_decode":  # launch-bound: one dtype
            plan.append((group, lambda dtype=dtype: tree_decode_cases(b, dtype)))
        elif group == "ssm":
            plan.append((group, lambda dtype=dtype: ssm_cases(b, dtype, peak)))
        elif group == "decode":  # launch-bound: one dtype
            plan.append((group, lambda dtype=dtype: decode_cases(b, dtype)))
        elif group == "packed":
            plan.append((group, lambda dtype=dtype: packed_cases(b, dtype)))
        elif group == "packed_rwkv7":
            plan.append((group, lambda dtype=dtype: packed_cases(b, dtype, "rwkv7")))
        else:
            plan.append((group, lambda group=group, dtype=dtype: attention_cases(b, group, dtype)))
    if args.isolate and not args.child:
        from benchmarks.isolate import supervise
        child_argv = [a for a in raw if a != "--isolate"]
        child_argv = _without_option(child_argv, "--budget") + (["--peak", f"{peak}"] if peak else [])
        supervise(child_argv, len(plan), report, start + args.budget, args.warm)
    else:
        for index, (group, run) in enumerate(plan):
            if index < args.start_group:
                continue
            if args.child:
                report.group(index)
            try:
                run()
            except Exception as e:  # noqa: BLE001 - never let one group stop the rest
                report.say(f"{group}: {type(e).__name__}: {_first_line(e)}")
                traceback.print_exc()
                _clear(device)
                report.fatal(e)
        if args.child:
            report.done()
            return 0
    report.say("")
    report.say(report.table())
    report.say(f"\nbenchmark wall time: {time.perf_counter() - start:.0f} s")
    return 0


def _without_option(argv: list, name: str) -> list:
    """argv without `name VALUE` / `name=VALUE` (the supervisor gives each child its own)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == name:
            skip = True
        elif not a.startswith(name + "="):
            out.append(a)
    return out


def _version(module: str) -> str:
    try:
        import importlib.metadata as md
        return md.version({"fla": "fla-core", "accelerated_scan": "accelerated-scan"}.get(module, module))
    except Exception:  # noqa: BLE001
        return "not installed"


if __name__ == "__main__":
    sys.exit(main())
