"""GPU check-and-benchmark for the Triton backend (issue 5); one run fits in 10 minutes.

    python benchmarks/gpu.py              # on a CUDA machine: checks, then timings
    python benchmarks/gpu.py --dry-run    # anywhere: builds every case on CPU, runs nothing big

1. Check: every op with Triton kernels, forward and decode step, Triton == torch backend on
   CUDA, fp32 inputs (DESIGN.md fp32 tolerance) and bf16 inputs (relative RMS <= 5e-3).
2. Time forward and forward+backward (median of CUDA-event timings) for
   - the first-order recurrence (linear_recurrence.psm) at (B, D) = (8, 1536), T = 1K..64K:
     psmc triton, psmc torch, torch associative_scan (pointwise, compiled), accelerated-scan;
   - GLA-like ops at (B, T, H, D) = (2, 16384, 16, 128) and (8, 2048, 32, 64): psmc torch and
     psmc triton (gla, simple_gla; the Triton kernels are a token loop, not chunked), fla chunk_gla / fused_recurrent_gla / chunk_simple_gla.
   Prints a table with ratios to psmc and the achieved fraction of peak memory bandwidth
   (bytes of inputs read + outputs written, over time, over --peak-gbps).
Peers that are not installed are reported as such; a case that overruns its time budget is
skipped with a note, so the whole run stays bounded.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

EXAMPLES = ROOT / "examples"
MATRIX = ["gla", "simple_gla", "retention", "linear_attention", "mlstm", "rwkv6"]  # token-loop kernels
CHECKED = ["cumsum", "linear_recurrence", "logcumsumexp", "running_argmax", "welford", "segmented_sum",
           "selective_ssm", "softmax_pool"] + MATRIX
# V = 96: two column tiles of 64 in the forward, the second one masked
CHECK_DIMS = {"selective_ssm": {"N": 16}, "softmax_pool": {"V": 64}, **{n: {"K": 64, "V": 96} for n in MATRIX}}
RECURRENCE_T = [1024, 4096, 16384, 65536]
GLA_SHAPES = [(2, 16384, 16, 128), (8, 2048, 32, 64)]
CASE_BUDGET_S = 20.0  # per timed case: warm-up and repeats stop early past this


# ---------------------------------------------------------------------- loading layers
def load_layer_class(name: str):
    """The generated class for examples/<name>.psm through the real pipeline (analysis, plan,
    Triton kernels registered when the plan has them)."""
    import psmc
    return psmc.load(EXAMPLES / f"{name}.psm").__psmc_layers__[name]


def make_inputs(layer, B: int, T: int, lanes: tuple, device, dtype, seed: int = 0) -> dict:
    g = torch.Generator(device="cpu").manual_seed(seed)
    out = {}
    for slot in layer.spec.inputs:
        lane_shape = (1,) if slot.name == "B" else lanes
        shape = (B, T) + lane_shape + tuple(int(s) for s in slot.shape(dict(layer.dims)))
        if slot.dtype == "bool":
            x = torch.rand(shape, generator=g) > 0.9
        elif slot.name in ("log_a", "gk", "g", "f", "log_gamma"):
            x = -torch.rand(shape, generator=g) * 0.1
        elif slot.name == "delta":
            x = torch.rand(shape, generator=g) * 0.1
        elif slot.name == "A":
            x = -torch.rand(shape, generator=g)
        else:
            x = torch.randn(shape, generator=g)
        out[slot.name] = x.to(device=device, dtype=dtype if x.is_floating_point() else x.dtype)
    return out


# ---------------------------------------------------------------------- checks
def rel_rms(ref: torch.Tensor, out: torch.Tensor) -> float:
    ref, out = ref.double(), out.double()
    return ((ref - out).norm() / ref.norm().clamp_min(1e-30)).item()


def agree(ref, out, tol: float) -> bool:
    if not ref.is_floating_point():
        return torch.equal(ref, out)
    if torch.isnan(out).any():
        return False
    return (ref - out).abs().max().item() <= 1e-6 or rel_rms(ref, out) <= tol


def check(device, dry_run: bool) -> list[str]:
    from psmc.runtime import triton_support as ts
    failures = []
    for name in CHECKED:
        cls = load_layer_class(name)
        assert getattr(cls, "_triton_kernels", None) is not None, f"{name}: no Triton kernels"
        ref_layer = cls(backend="torch", **CHECK_DIMS.get(name, {})).to(device)
        tri_layer = cls(backend="triton", **CHECK_DIMS.get(name, {})).to(device)
        for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 5e-3)):
            B, T, lanes = (2, 5, (3,)) if dry_run else (4, 1000, (8,) if name in MATRIX else (64,))
            inputs = make_inputs(ref_layer, B, T, lanes, device, dtype)
            if dry_run:
                print(f"  built {name} {str(dtype)[6:]}: " + ", ".join(f"{k}{list(v.shape)}" for k, v in inputs.items()))
                continue
            with torch.no_grad():
                ref = ref_layer(**inputs)
                ref = ref if isinstance(ref, tuple) else (ref,)
                outs, _ = ts.forward(tri_layer, tri_layer._prepare(dict(inputs), step=False), None)
                state, steps = tri_layer.init_state(), []
                for t in range(8):
                    token = {k: v[:, t] for k, v in inputs.items()}
                    o, state = ts.step(tri_layer, tri_layer._prepare(token, step=True), state)
                    steps.append(o)
            ok_bwd = backward_agrees(ref_layer, tri_layer, inputs, tol)
            ok_fwd = all(agree(r, o, tol) for r, o in zip(ref, outs))
            ok_step = all(agree(r[:, t], s[i], tol) for t, s in enumerate(steps) for i, r in enumerate(ref))
            status = "ok" if ok_fwd and ok_step and ok_bwd else "MISMATCH"
            print(f"  {name:18s} {str(dtype)[6:]:9s} forward {'ok' if ok_fwd else 'FAIL'}  backward "
                  f"{'ok' if ok_bwd else 'FAIL'}  step "
                  f"{'ok' if ok_step else 'FAIL'}  rel-rms {max(rel_rms(r, o) for r, o in zip(ref, outs) if r.is_floating_point()) if any(r.is_floating_point() for r in ref) else 0.0:.2e}")
            if status != "ok":
                failures.append(f"{name} {dtype}")
    return failures


def backward_agrees(ref_layer, tri_layer, inputs: dict, tol: float) -> bool:
    """Gradients of every float input and param: the generated backward vs torch autograd."""
    grads = []
    for layer in (ref_layer, tri_layer):
        ins = {k: v.detach().requires_grad_(v.is_floating_point()) for k, v in inputs.items()}
        outs = layer(**ins)
        outs = outs if isinstance(outs, tuple) else (outs,)
        loss = sum(o.float().sum() for o in outs if o.is_floating_point())
        if not isinstance(loss, torch.Tensor):
            return True  # no float output (running_argmax): nothing to differentiate
        wrt = [x for x in ins.values() if x.requires_grad] + list(layer.parameters())
        grads.append(torch.autograd.grad(loss, wrt, allow_unused=True))
    return all((r is None) == (o is None) and (r is None or agree(r.float(), o.float(), tol))
               for r, o in zip(*grads))


def installed(module: str) -> str:
    try:
        found = importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        found = False
    return "installed (not imported in a dry run)" if found else "not installed"


# ---------------------------------------------------------------------- timing
@dataclass
class Case:
    group: str
    shape: str
    impl: str
    run: Callable | None  # forward
    run_bwd: Callable | None  # forward + backward
    nbytes: int
    note: str = ""


def cuda_time(fn: Callable, budget_s: float = CASE_BUDGET_S, repeats: int = 10) -> float | None:
    """Median milliseconds of fn(); None when one call alone overruns the budget."""
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    if time.perf_counter() - start > budget_s / 2:
        return None
    times = []
    for _ in range(repeats):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
        if time.perf_counter() - start > budget_s:
            break
    return statistics.median(times)


def recurrence_cases(device, dry_run: bool) -> list[Case]:
    from psmc.runtime import triton_support as ts
    cls = load_layer_class("linear_recurrence")
    cases = []
    for T in ([16] if dry_run else RECURRENCE_T):
        B, D = (2, 8) if dry_run else (8, 1536)
        shape = f"B={B} D={D} T={T}"
        x = torch.randn(B, T, D, device=device)
        log_a = -torch.rand(B, T, D, device=device) * 0.1
        nbytes = 3 * x.numel() * 4  # read x and log_a, write h
        torch_layer = cls(backend="torch")
        tri_layer = cls(backend="triton") if device.type == "cuda" or ts.interpreter_enabled() else None

        def fwd(layer=torch_layer):
            with torch.no_grad():
                return layer(x=x, log_a=log_a)

        def fwd_bwd(layer=torch_layer):
            xg, ag = x.detach().requires_grad_(), log_a.detach().requires_grad_()
            layer(x=xg, log_a=ag).sum().backward()

        cases.append(Case("first-order recurrence", shape, "psmc torch", fwd, fwd_bwd, nbytes))
        if tri_layer is not None:
            def fwd_triton(layer=tri_layer):  # explicit: independent of the layer's backend hook
                with torch.no_grad():
                    return ts.forward(layer, layer._prepare({"x": x, "log_a": log_a}, step=False), None)
            cases.append(Case("first-order recurrence", shape, "psmc triton", fwd_triton,
                              lambda layer=tri_layer: fwd_bwd(layer), nbytes))
        if dry_run:  # peers compile (torch.compile, CUDA extensions) when imported: only look them up
            for impl, module in (("torch associative_scan", "torch._higher_order_ops.associative_scan"),
                                 ("accelerated-scan", "accelerated_scan")):
                cases.append(Case("first-order recurrence", shape, impl, None, None, nbytes, installed(module)))
            continue
        cases.append(Case("first-order recurrence", shape, "torch associative_scan", *_torch_scan(x, log_a),
                          nbytes))
        cases.append(Case("first-order recurrence", shape, "accelerated-scan", *_accelerated(x, log_a), nbytes))
    return cases


def _torch_scan(x, log_a):
    try:
        from torch._higher_order_ops.associative_scan import associative_scan
    except ImportError:
        return None, None

    def combine(left, right):
        return left[0] * right[0], right[0] * left[1] + right[1]

    compiled = torch.compile(lambda a, b: associative_scan(combine, (a, b), dim=1, combine_mode="pointwise")[1])

    def fwd():
        with torch.no_grad():
            return compiled(log_a.exp(), x)

    def fwd_bwd():
        xg, ag = x.detach().requires_grad_(), log_a.detach().requires_grad_()
        compiled(ag.exp(), xg).sum().backward()
    return fwd, fwd_bwd


def _accelerated(x, log_a):
    try:
        from accelerated_scan.warp import scan
    except Exception as e:  # not installed, or its CUDA extension does not build here
        print(f"  accelerated-scan unavailable: {e}")
        return None, None
    gates, tokens = log_a.exp().transpose(1, 2).contiguous(), x.transpose(1, 2).contiguous()

    def fwd():
        with torch.no_grad():
            return scan(gates, tokens)

    def fwd_bwd():
        g, t = gates.detach().requires_grad_(), tokens.detach().requires_grad_()
        scan(g, t).sum().backward()
    return fwd, fwd_bwd


def gla_cases(device, dry_run: bool) -> list[Case]:
    from psmc.runtime import triton_support as ts
    gla, simple = load_layer_class("gla"), load_layer_class("simple_gla")
    cases = []
    for B, T, H, D in ([(1, 16, 2, 4)] if dry_run else GLA_SHAPES):
        shape = f"B={B} T={T} H={H} D={D}"
        q, k, v = (torch.randn(B, T, H, D, device=device) * 0.1 for _ in range(3))
        gk = -torch.rand(B, T, H, D, device=device) * 0.1
        g = gk[..., 0].contiguous()
        nbytes = 5 * q.numel() * 4
        for name, cls, gate in (("gla", gla, {"gk": gk}), ("simple_gla", simple, {"g": g})):
            for backend in ("torch", "triton"):
                if backend == "triton" and device.type != "cuda" and not ts.interpreter_enabled():
                    continue
                layer = cls(backend=backend, K=D, V=D)

                def fwd(layer=layer, gate=gate):
                    with torch.no_grad():
                        return layer(q=q, k=k, v=v, **gate)

                def fwd_bwd(layer=layer, gate=gate):
                    ins = {n: t.detach().requires_grad_() for n, t in dict(q=q, k=k, v=v, **gate).items()}
                    layer(**ins).sum().backward()
                note = "token loop (fused_recurrent-like), not chunked" if backend == "triton" else ""
                cases.append(Case(f"GLA-like ({name})", shape, f"psmc {backend}", fwd, fwd_bwd, nbytes, note))
        if dry_run:
            cases.append(Case("GLA-like", shape, "fla", None, None, nbytes, installed("fla")))
            continue
        for impl, fwd, fwd_bwd in _fla(q, k, v, gk, g):
            cases.append(Case(f"GLA-like ({'simple_gla' if 'simple' in impl else 'gla'})", shape, impl, fwd, fwd_bwd,
                              nbytes))
    return cases


def _fla(q, k, v, gk, g):
    try:
        from fla.ops.gla import chunk_gla, fused_recurrent_gla
        from fla.ops.simple_gla import chunk_simple_gla
    except Exception as e:
        print(f"  flash-linear-attention unavailable: {e}")
        return [("fla (unavailable)", None, None)]
    out = []
    for impl, fn, gate in (("fla chunk_gla", chunk_gla, gk), ("fla fused_recurrent_gla", fused_recurrent_gla, gk),
                           ("fla chunk_simple_gla", chunk_simple_gla, g)):
        def fwd(fn=fn, gate=gate):
            with torch.no_grad():
                return fn(q, k, v, gate)[0]

        def fwd_bwd(fn=fn, gate=gate):
            ins = [t.detach().requires_grad_() for t in (q, k, v, gate)]
            fn(*ins)[0].sum().backward()
        out.append((impl, fwd, fwd_bwd))
    return out


def report(cases: list[Case], peak_gbps: float, dry_run: bool):
    if dry_run:
        for c in cases:  # tiny shapes: run each psmc case once so the script is known to work
            if c.run is not None:
                c.run()
                if c.run_bwd is not None:
                    c.run_bwd()
            state = "ran" if c.run is not None else "peer"
            print(f"  {c.group:26s} {c.shape:24s} {c.impl:24s} {state}"
                  f"{' (fwd+bwd too)' if c.run_bwd is not None else ''}  {c.note}")
        return
    print(f"\n| group | shape | impl | fwd ms | fwd x psmc-torch | fwd+bwd ms | fwd+bwd x psmc-torch | "
          f"fwd % of {peak_gbps:.0f} GB/s | note |")
    print("|---|---|---|---|---|---|---|---|---|")
    base: dict = {}
    for c in cases:
        fwd = cuda_time(c.run) if c.run is not None else None
        both = cuda_time(c.run_bwd) if c.run_bwd is not None else None
        key = (c.group, c.shape)
        if c.impl == "psmc torch":
            base[key] = (fwd, both)
        ref_f, ref_b = base.get(key, (None, None))
        ratio = (lambda ref, t: f"{ref / t:.2f}" if ref and t else "-")
        frac = f"{100 * c.nbytes / (fwd * 1e-3) / (peak_gbps * 1e9):.1f}" if fwd else "-"
        note = c.note or ("not installed" if c.run is None else "")
        ms = (lambda t: f"{t:.3f}" if t else "-")
        print(f"| {c.group} | {c.shape} | {c.impl} | {ms(fwd)} | {ratio(ref_f, fwd)} | "
              f"{ms(both)} | {ratio(ref_b, both)} | {frac} | {note} |")
        sys.stdout.flush()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="build every case on CPU; time nothing")
    parser.add_argument("--peak-gbps", type=float, default=4800.0, help="peak memory bandwidth (H200: 4800)")
    parser.add_argument("--skip-check", action="store_true")
    args = parser.parse_args(argv)
    if args.dry_run:
        os.environ.setdefault("TRITON_INTERPRET", "1")
        device = torch.device("cpu")
    else:
        if not torch.cuda.is_available():
            print("no CUDA device: use --dry-run", file=sys.stderr)
            return 2
        device = torch.device("cuda")
        print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}")
    failures = [] if args.skip_check else check(device, args.dry_run)
    cases = recurrence_cases(device, args.dry_run) + gla_cases(device, args.dry_run)
    report(cases, args.peak_gbps, args.dry_run)
    if failures:
        print("CHECK FAILURES: " + ", ".join(failures))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
