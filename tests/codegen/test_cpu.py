"""The fused C++ CPU backend (psmc.codegen.cpp_printer, psmc.runtime.cpu_support).

Every example op the C++ printer covers runs with backend='cpu' and must agree with the
torch backend and with the reference interpreter (parallel pass, token-by-token steps,
continuing from a state), in float64; gradients are checked numerically (gradcheck) and
against the torch backend's autograd (inputs, params, initial state). Building: a missing
compiler or a failing build falls back to torch with one warning; two processes building the
same op at once both succeed. One extension per op, built once per session (the session's
PSMC_CACHE_DIR), so the whole file builds each covered example once.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

import psmc
from layer_cases import CASES
from param_ops import GLA_W
from layer_harness import as_tuple, assert_agree, layer_class, make_inputs, stream, time_slice
from layer_reference import op_ir, reference_outputs
from psmc.runtime import cpu_support



def _has_cpp_kernels(name: str) -> bool:
    """From the compiler, without importing the generated module: loading layers at collection
    time would import Triton before tests/codegen/test_triton.py sets TRITON_INTERPRET."""
    from psmc.codegen.cpp_printer import unsupported_reason
    from psmc.compiler import compile_source
    compiled = compile_source(CASES[name].path.read_text(), CASES[name].path.name)
    op = next(op for op in compiled.ops if op.name == name)
    return unsupported_reason(op, compiled.plans[name]) is None


COVERED = sorted(name for name in CASES if _has_cpp_kernels(name))
NOT_COVERED = sorted(set(CASES) - set(COVERED))
HAS_COMPILER = cpu_support.compiler() is not None
needs_compiler = pytest.mark.skipif(not HAS_COMPILER, reason="no C++ compiler on this machine")


def test_coverage_is_what_the_issue_asks():
    """Every elementwise-monoid and first-order example (scalar, vector, per-key decays) and
    the matrix-state GLA family; the tree scans (ema's tree kernels are separate:
    test_cpu_tree.py) and the affine (delta-rule, diagonal-plus-low-rank) combines are not."""
    for name in CASES:
        assert (getattr(layer_class(name), "_cpu_kernels", None) is not None) == (name in COVERED), name
    assert set(COVERED) == {"cumsum", "gla", "linear_attention", "linear_recurrence", "logcumsumexp", "mamba2",
                            "mlstm", "retention", "running_argmax", "rwkv6", "segmented_sum", "selective_ssm",
                            "simple_gla", "softmax_pool", "welford"}
    assert set(NOT_COVERED) == {"delta_rule", "gated_delta_product", "gated_delta_rule", "kda", "rwkv7", "ema",
                                "transformer_psm", "tree_rnn"}


class Spy:
    """Counts the calls that really ran the C++ kernels (a test that silently fell back to
    torch would otherwise pass)."""

    def __init__(self, monkeypatch):
        self.forward = 0
        original = cpu_support._call

        def counting(*args):
            self.forward += 1
            return original(*args)
        monkeypatch.setattr(cpu_support, "_call", counting)


def _layers(name, dims, seed):
    cls = layer_class(name)
    torch.manual_seed(seed)
    cpu = cls(backend="cpu", **dims).double()
    ref = cls(backend="torch", **dims).double()
    ref.load_state_dict(cpu.state_dict())
    return cls, cpu, ref


RUNS = [  # (batch, time, lanes, broadcast pattern, dim set, seed)
    (2, 13, (3,), (False, True), 0, 1),
    (1, 6, (2, 2), (True, False, False), -1, 2),
]


@needs_compiler
@pytest.mark.parametrize("name", COVERED)
@pytest.mark.parametrize("run", range(len(RUNS)))
def test_cpu_agrees_with_torch_and_reference(name, run, monkeypatch):
    batch, T, lanes, pattern, dim_set, seed = RUNS[run]
    case = CASES[name]
    dims = case.dim_sets[dim_set]
    cls, cpu, ref = _layers(name, dims, seed)
    broadcast = tuple(tuple(pattern[(i + j) % len(pattern)] for j in range(len(lanes))) for i in range(8))
    inputs = make_inputs(cls, dims, batch, T, lanes, broadcast, seed, case.kinds)
    spy = Spy(monkeypatch)
    full = as_tuple(cpu(**inputs))
    assert spy.forward == 1, "the parallel pass did not run the C++ kernels"
    want = as_tuple(ref(**inputs))
    assert_agree(full, want, "backend='cpu' vs backend='torch'")

    lead = torch.broadcast_shapes(*(x.shape[:2 + len(lanes)] for x in inputs.values()))
    streamed, end = stream(cpu, inputs, cpu.init_state(), 0, T)
    assert spy.forward == 1 + T, "step did not run the C++ kernels"
    assert_agree(streamed, full, "cpu steps vs the cpu parallel pass")
    _, ref_end = ref(**inputs, return_state=True)
    assert len(end.prefix) == len(ref_end.prefix)
    for got, exp in zip(end.prefix, ref_end.prefix):
        assert (got is None) == (exp is None), "the stream state keeps other fields than torch's"
        if exp is not None:
            torch.testing.assert_close(got.expand_as(exp), exp, rtol=1e-9, atol=1e-11)

    mid = T // 2
    first, state = cpu(**time_slice(inputs, 0, mid), return_state=True)
    rest = cpu(**time_slice(inputs, mid, T), state=state)
    assert_agree(tuple(torch.cat([a, b], 1) for a, b in zip(as_tuple(first), as_tuple(rest))), full,
                 f"cpu forward continued after {mid} tokens")

    op = op_ir(str(case.path), name)
    params = {p.name: getattr(cpu, "p_" + p.name).detach() for p in cls.spec.params}
    expanded = {n: torch.broadcast_to(x, (*lead, *x.shape[len(lead):])) for n, x in inputs.items()}
    for b in range(lead[0]):
        lane = tuple(size - 1 for size in lead[2:])  # the last lane of each batch row
        where = (b, slice(None), *lane)
        reference = reference_outputs(op, dims, params, {n: x[where] for n, x in expanded.items()}, False)
        assert_agree(tuple(o[where] for o in full), reference, f"cpu vs the reference interpreter, batch {b}")


def _float_inputs(cls, inputs):
    return {n: x.requires_grad_() if x.is_floating_point() else x for n, x in inputs.items()}


@needs_compiler
@pytest.mark.parametrize("name", COVERED)
def test_cpu_gradients(name, monkeypatch):
    """gradcheck (float64, tiny shapes) through inputs and the initial state, and every
    gradient (inputs, params, initial state) equal to the torch backend's autograd."""
    case = CASES[name]
    dims = case.dim_sets[-1]
    cls, cpu, ref = _layers(name, dims, 3)
    broadcast = ((False, True),) * 8
    inputs = make_inputs(cls, dims, 2, 5, (2,), broadcast, 3, case.kinds)
    floats = [n for n, x in inputs.items() if x.is_floating_point()]
    with torch.no_grad():
        _, state = ref(**time_slice(inputs, 0, 2), return_state=True)
    prefix = tuple(None if p is None else p.clone() for p in state.prefix)
    float_fields = [i for i, p in enumerate(prefix) if p is not None and p.is_floating_point()]
    rest = time_slice(inputs, 2, 5)

    def run(layer, *leaves):
        xs = dict(rest)
        xs.update(zip(floats, leaves[:len(floats)]))
        p = list(prefix)
        for i, t in zip(float_fields, leaves[len(floats):]):
            p[i] = t
        out, new = layer(**xs, state=type(state)(prefix=tuple(p), count=state.count), return_state=True)
        floats_out = tuple(o for o in as_tuple(out) if o.is_floating_point())
        return floats_out + tuple(f for f in new.prefix if f is not None and f.is_floating_point())

    leaves = [rest[n].detach().clone().requires_grad_() for n in floats] + \
        [prefix[i].detach().clone().requires_grad_() for i in float_fields]
    spy = Spy(monkeypatch)
    assert torch.autograd.gradcheck(lambda *ls: run(cpu, *ls), leaves, eps=1e-6, atol=1e-6)
    assert spy.forward > 0
    # the same gradients as torch's autograd of the torch backend, params included
    gen = torch.Generator().manual_seed(5)
    outs = run(cpu, *leaves)
    weights = [torch.randn(o.shape, generator=gen, dtype=o.dtype) for o in outs]
    got = torch.autograd.grad(sum((o * w).sum() for o, w in zip(outs, weights)), leaves + list(cpu.parameters()),
                              allow_unused=True)
    outs = run(ref, *leaves)
    want = torch.autograd.grad(sum((o * w).sum() for o, w in zip(outs, weights)), leaves + list(ref.parameters()),
                               allow_unused=True)
    for i, (g, w) in enumerate(zip(got, want)):
        if w is None:
            assert g is None or not g.abs().any(), f"gradient {i}: torch has none, cpu has {g}"
            continue
        torch.testing.assert_close(g, w, rtol=1e-8, atol=1e-10, msg=lambda m: f"gradient {i}: {m}")


@needs_compiler
def test_float32_cpu_is_close_to_float64_torch():
    cls = layer_class("selective_ssm")
    dims = {"N": 3}
    torch.manual_seed(0)
    cpu = cls(backend="cpu", **dims)
    ref = cls(backend="torch", **dims).double()
    ref.load_state_dict(cpu.state_dict())
    inputs = make_inputs(cls, dims, 2, 50, (5,), ((False,),) * 8, 1, CASES["selective_ssm"].kinds)
    got = cpu(**{n: x.float() for n, x in inputs.items()})
    want = ref(**inputs)
    assert got.dtype == torch.float32
    err = ((got.double() - want).pow(2).mean() / want.pow(2).mean()).sqrt()
    assert err < 1e-5, f"relative RMS error {err:.2e}"


@needs_compiler
def test_auto_uses_cpu_on_cpu_tensors(monkeypatch):
    monkeypatch.delenv("PSMC_CPU", raising=False)
    cls = layer_class("linear_recurrence")
    layer = cls()  # backend='auto'
    spy = Spy(monkeypatch)
    x, log_a = torch.randn(2, 9, 4), -torch.rand(2, 9, 4)
    y = layer(x, log_a)
    assert spy.forward == 1
    torch.testing.assert_close(y, cls(backend="torch")(x, log_a))
    monkeypatch.setenv("PSMC_CPU", "0")
    layer(x, log_a)
    assert spy.forward == 1, "PSMC_CPU=0 keeps backend='auto' on torch"


class KernelSpy:
    """Counts the kernel calls of the general path and of the bound step alike: the calls of
    the function `_function` returns, and the tokens the C++ decode lane ran (its `step` ran
    the kernel when it returned a result)."""

    def __init__(self, monkeypatch):
        self.calls = 0
        original, lane = cpu_support._function, cpu_support.decode_lane

        def counted(*args):
            fn = original(*args)

            def call(*a):
                self.calls += 1
                return fn(*a)
            return call

        class CountedLane:
            def __init__(self, module):
                self.make = module.make
                self._step = module.step

            def step(this, *args):
                done = this._step(*args)
                self.calls += done is not None
                return done

        module = lane()
        monkeypatch.setattr(cpu_support, "_function", counted)
        monkeypatch.setattr(cpu_support, "decode_lane", lambda: None if module is None else CountedLane(module))


@pytest.fixture(params=["C++", "Python"])
def checks(request, monkeypatch):
    """Which code checks a bound step's tokens: the C++ decode lane (cpu_lane.cpp) or, where
    it cannot be built, bind_step's Python closure; both must behave alike."""
    if request.param == "Python":
        monkeypatch.setattr(cpu_support, "decode_lane", lambda: None)
    elif cpu_support.decode_lane() is None:
        pytest.fail("the C++ decode lane did not build on a machine with a compiler")
    return request.param


def _lane(layer):
    """The decode lane PsmLayer.step bound for the (only) input signature so far."""
    (hit,) = layer._step_cache.values()
    return hit[3]


@needs_compiler
def test_auto_steps_with_the_kernels_where_they_win(checks, monkeypatch):
    """backend='auto' decodes float32 tokens with the C++ step bound to the signature (faster
    than the torch step for 13 of the 14 covered examples, docs/cpu.md), but a first-order
    recurrence of one number per lane with torch (one fused multiply-add there), and float64
    with torch; backend='cpu' always steps with the kernels; all agree."""
    monkeypatch.delenv("PSMC_CPU", raising=False)
    spy = KernelSpy(monkeypatch)
    cls = layer_class("linear_recurrence")
    auto, cpu = cls(), cls(backend="cpu")
    x, log_a = torch.randn(2, 4), -torch.rand(2, 4)
    y_auto, _ = auto.step(auto.init_state(), x, log_a)
    assert spy.calls == 0
    y_cpu, _ = cpu.step(cpu.init_state(), x, log_a)
    assert spy.calls == 1
    torch.testing.assert_close(y_auto, y_cpu)

    gla = layer_class("gla")
    torch.manual_seed(0)
    token = dict(k=torch.randn(1, 2, 8), v=torch.randn(1, 2, 8), gk=-torch.rand(1, 2, 8), q=torch.randn(1, 2, 8))
    for dtype, kernel_calls in ((torch.float32, 3), (torch.float64, 0)):
        spy.calls = 0
        layer, ref = gla(K=8, V=8), gla(backend="torch", K=8, V=8)
        tok = {n: t.to(dtype) for n, t in token.items()}
        s, r = layer.init_state(), ref.init_state()
        with torch.no_grad():
            for _ in range(3):
                (y, s), (w, r) = layer.step(s, **tok), ref.step(r, **tok)
                torch.testing.assert_close(y, w)
        assert spy.calls == kernel_calls, dtype
        assert getattr(_lane(layer), "checks", None) == (checks if dtype == torch.float32 else None)


BOUND = [("gla", {"K": 8, "V": 8}, (3,)), ("running_argmax", {}, (5,)), ("selective_ssm", {"N": 4}, (6,)),
         ("rwkv6", {"K": 4, "V": 4}, (2,))]


@needs_compiler
@pytest.mark.parametrize("name, dims, lanes", BOUND, ids=[b[0] for b in BOUND])
def test_the_bound_step_agrees_with_torch_and_hands_other_tokens_to_the_general_step(name, dims, lanes, checks,
                                                                                     monkeypatch):
    """The C++ step bound to a signature (one ctypes call per token, the state read where it
    lies): float32 streams equal the torch backend's token by token (a dead field, an exclusive
    readout, the token index); a token laid out differently (other strides) and a token in grad
    mode go to the general step, which agrees too and records the graph."""
    cls = layer_class(name)
    cpu, ref = cls(backend="cpu", **dims), cls(backend="torch", **dims)
    inputs = make_inputs(cls, dims, 2, 8, lanes, tuple((False,) * len(lanes) for _ in cls.spec.inputs), 5)
    inputs = {n: x.float() if x.is_floating_point() else x for n, x in inputs.items()}
    spy = KernelSpy(monkeypatch)
    with torch.no_grad():
        got, s_cpu = stream(cpu, inputs, cpu.init_state(), 0, 5)  # tokens x[:, t]: strided views
        want, s_ref = stream(ref, inputs, ref.init_state(), 0, 5)
    assert spy.calls == 5 and _lane(cpu).checks == checks
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    for g, w in zip(s_cpu.tensors(), s_ref.tensors()):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    general = Spy(monkeypatch)  # counts the general path's calls only
    with torch.no_grad():  # contiguous copies: other strides than the bound signature's
        token = {n: x[:, 5].contiguous() for n, x in inputs.items()}
        if all(x[:, 5].stride() == token[n].stride() for n, x in inputs.items()):
            token = {n: x[:, 5].t().contiguous().t() if x[:, 5].dim() == 2 else x[:, 5].transpose(0, 1)
                     .contiguous().transpose(0, 1) for n, x in inputs.items()}
        (y, s_cpu), (w, s_ref) = cpu.step(s_cpu, **token), ref.step(s_ref, **token)
    assert general.forward == 1
    for g, w in zip(as_tuple(y), as_tuple(w)):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    floats = [n for n, x in inputs.items() if x.is_floating_point()]
    token = {n: x[:, 6].clone().requires_grad_(n == floats[0]) for n, x in inputs.items()}
    (y, _), (w, _) = cpu.step(s_cpu, **token), ref.step(s_ref, **token)
    assert general.forward == 2
    y, w = as_tuple(y)[0], as_tuple(w)[0]
    if w.requires_grad:
        assert y.requires_grad
        got_grad, = torch.autograd.grad(y.sum(), token[floats[0]])
        want_grad, = torch.autograd.grad(w.sum(), token[floats[0]])
        torch.testing.assert_close(got_grad, want_grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y.detach(), w.detach(), rtol=1e-5, atol=1e-5)


def test_fused_loops_keep_dependences():
    """cpp_printer.fuse: loops over the same axes merge, across loops over other axes only
    when no value flows between them; a temporary read only inside its fused loop becomes a
    local of the loop body (scalarize)."""
    from psmc.codegen.cpp_printer import fuse, scalarize
    r, rc = "for (int64_t i = 0; i < R; ++i) ", "for (int64_t i = 0; i < R; ++i) for (int64_t k = 0; k < C; ++k) "
    lines = [r + "a[i] = x[i] * 2;", rc + "m[i * C + k] = a[i] * y[i * C + k];", r + "b[i] = a[i] + 1;",
             r + "c[i] = m[i * C] + b[i];"]
    assert fuse(lines) == [
        "PSM_IVDEP " + r + "{ a[i] = x[i] * 2; b[i] = a[i] + 1; }",  # b hops over m's loop: m neither reads b nor ...
        rc + "m[i * C + k] = a[i] * y[i * C + k];",
        r + "c[i] = m[i * C] + b[i];"]  # ... but c reads m: it stays after m's loop
    decl = "PsmBuf<scalar_t> a_v(R); scalar_t *__restrict__ a = a_v.data();"
    body = "PSM_IVDEP " + r + "{ a[i] = x[i] * 2; b[i] = a[i] + 1; }"
    assert scalarize([decl, body]) == ["PSM_IVDEP " + r + "{ scalar_t a_ = x[i] * 2; b[i] = a_ + 1; }"]
    assert scalarize([decl, body, "y = a[0];"]) == [decl, body, "y = a[0];"]  # read elsewhere: kept


def test_a_sum_after_a_loop_over_its_axis_accumulates_in_that_loop():
    """cpp_printer.fuse: a sum (or mean) over the axis of the fused loop just before it
    accumulates in that loop (an OpenMP simd reduction, as its own loop was); the loop then
    takes no later statement (they may read the sum), and scalarize still keeps the loop's
    temporaries in registers."""
    from psmc.codegen.cpp_printer import fuse, scalarize
    r = "for (int64_t i = 0; i < R; ++i) "
    total = ('scalar_t s; { scalar_t acc = 0; _Pragma("omp simd reduction(+:acc)") ' + r +
             "acc += p[i]; s = acc / scalar_t(R); }")
    lines = [r + "p[i] = x[i] * h[i];", total, r + "q[i] = h[i] * s;"]
    fused = fuse(lines)
    assert fused == ['scalar_t s_acc = 0; _Pragma("omp simd reduction(+:s_acc)") ' + r +
                     "{ p[i] = x[i] * h[i]; s_acc += p[i]; } scalar_t s = s_acc / scalar_t(R);",
                     r + "q[i] = h[i] * s;"]  # reads the sum: after the loop
    decl = "PsmBuf<scalar_t> p_v(R); scalar_t *__restrict__ p = p_v.data();"
    assert scalarize([decl] + fused)[0] == ('scalar_t s_acc = 0; _Pragma("omp simd reduction(+:s_acc)") ' + r +
                                            "{ scalar_t p_ = x[i] * h[i]; s_acc += p_; } scalar_t s = s_acc / "
                                            "scalar_t(R);")
    assert fuse([total]) == [total]  # no loop before it: its own loop


@needs_compiler
def test_the_decode_lane_checks_each_token_and_counts_every_state(checks, monkeypatch):
    """PsmLayer.step first runs the C++ lane that served the last token, which checks the
    token's signature itself (names, shapes, dtypes, CPU, strides) instead of a lookup key: a
    token that fails a check takes the full path, which agrees with the torch backend or
    raises the error it raises. The new states' counts (handed out from pre-made blocks) are
    right past a block, on a branch from an older state and on two streams stepped in turn."""
    cls = layer_class("selective_ssm")
    dims = {"N": 4}
    cpu, ref = cls(backend="cpu", **dims), cls(backend="torch", **dims)
    steps = cpu_support.COUNT_BLOCK + 6
    inputs = make_inputs(cls, dims, 2, steps + 2, (3,), tuple((False,) for _ in cls.spec.inputs), 7)
    inputs = {n: x.float() for n, x in inputs.items()}
    spy = KernelSpy(monkeypatch)
    states = []
    with torch.no_grad():
        s, r = cpu.init_state(), ref.init_state()
        for t in range(steps):
            token = {n: x[:, t] for n, x in inputs.items()}
            (y, s), (w, r) = cpu.step(s, **token), ref.step(r, **token)
            torch.testing.assert_close(y, w, rtol=1e-5, atol=1e-5)
            assert s.size == t + 1
            states.append(s)
        assert spy.calls == steps and cpu._decode is not None
        token = {n: x[:, steps] for n, x in inputs.items()}
        (_, b), (_, a) = cpu.step(states[9], **token), cpu.step(s, **token)  # a branch, then the stream
        assert (b.size, a.size) == (11, steps + 1)
        for _ in range(2):  # two streams in turn
            (_, a), (_, b) = cpu.step(a, **token), cpu.step(b, **token)
        assert (b.size, a.size) == (13, steps + 3)
        calls = spy.calls
        token = {n: x[:, steps + 1] for n, x in inputs.items()}
        others = {"another dtype": {n: x.double() for n, x in token.items()},
                  "an input broadcast over the lanes": {**token, "u": token["u"][:, :1]},
                  "another order": dict(reversed(list(token.items())))}
        for what, other in others.items():
            (y, _), (w, _) = cpu.step(s, **other), ref.step(r, **other)
            torch.testing.assert_close(y, w, rtol=1e-5, atol=1e-5, msg=what)
        assert spy.calls > calls  # (the general C++ path)
        for what, other in {"a missing input": dict(list(token.items())[1:]),
                            "an unknown input": {**token, "bogus": token["u"]},
                            "a number for a tensor": {**token, "u": 1.5}}.items():
            with pytest.raises(Exception) as want:
                ref.step(r, **other)
            with pytest.raises(type(want.value)) as got:
                cpu.step(s, **other)
            assert str(got.value).replace("'cpu'", "'torch'") == str(want.value), what
        cpu.backend = "torch"  # the lane is the C++ backend's: now the torch step serves
        calls = spy.calls
        y, _ = cpu.step(s, **token)
        assert spy.calls == calls
        torch.testing.assert_close(y, ref.step(r, **token)[0], rtol=1e-5, atol=1e-5)


@needs_compiler
def test_auto_keeps_the_chunkwise_form_for_long_matrix_sequences(monkeypatch):
    monkeypatch.delenv("PSMC_CPU", raising=False)
    cls = layer_class("gla")
    layer = cls(K=4, V=3)
    spy = Spy(monkeypatch)
    make = lambda T, n: torch.randn(1, T, 2, n)  # noqa: E731
    long = cpu_support.MATRIX_FORWARD_MAX_T + 1
    layer(k=make(long, 4), v=make(long, 3), gk=-torch.rand(1, long, 2, 4), q=make(long, 4))
    assert spy.forward == 0
    layer(k=make(8, 4), v=make(8, 3), gk=-torch.rand(1, 8, 2, 4), q=make(8, 4))
    assert spy.forward == 1


def test_backend_cpu_on_an_op_without_kernels_is_a_clear_error():
    cls = layer_class("tree_rnn")  # (ema has C++ tree kernels: tests/codegen/test_cpu_tree.py)
    with pytest.raises(ValueError, match=r"tree_rnn: backend='cpu' is not available for this op: its plan has no C\+\+ "
                                         r"kernels \(see `psmc check`\); use backend='torch' or 'auto'"):
        cls(backend="cpu", D=4)


def _fresh_build(monkeypatch, tmp_path):
    monkeypatch.setenv("PSMC_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(cpu_support, "_LIBRARIES", {})
    monkeypatch.setattr(cpu_support, "_WARNED", set())


@pytest.mark.parametrize("how", ["missing compiler", "failing build"])
def test_no_compiler_or_failed_build_falls_back_with_one_warning(how, monkeypatch, tmp_path):
    cls = layer_class("cumsum")
    _fresh_build(monkeypatch, tmp_path)
    if how == "missing compiler":
        monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    else:
        from torch.utils import cpp_extension

        def broken(*args, **kwargs):
            raise RuntimeError("Error building extension 'psmc_cpu': c++: internal compiler error")
        monkeypatch.setattr(cpp_extension, "load_inline", broken)
    layer = cls(backend="cpu")
    x = torch.randn(2, 7, 3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y1 = layer(x)
        y2 = layer(x)
        _, state = layer.step(layer.init_state(), x[:, 0])
    ours = [w for w in caught if "psmc: could not build the C++ CPU kernels" in str(w.message)]
    assert len(ours) == 1, [str(w.message) for w in caught]
    message = str(ours[0].message)
    assert "the torch backend serves this op instead" in message and "backend='torch'" in message
    assert ("no C++ compiler found" in message) if how == "missing compiler" else ("internal compiler error" in message)
    torch.testing.assert_close(y1, cls(backend="torch")(x))
    torch.testing.assert_close(y2, y1)
    assert not list(tmp_path.glob("cpu/*/ok"))


@needs_compiler
def test_a_failed_decode_lane_build_leaves_the_python_lane_with_one_warning(monkeypatch):
    """The C++ decode lane (cpu_lane.cpp, with torch's headers) failing to build is not an
    error: one RuntimeWarning naming the reason, and the bound step checks tokens in Python,
    on the C++ kernels, with the same results."""
    monkeypatch.setattr(cpu_support, "decode_lane", cpu_support.decode_lane.__wrapped__)  # (uncached)
    built = cpu_support._built

    def failing_for_the_lane(source, key, flag=""):
        if source == cpu_support._LANE_SOURCE.read_text():
            raise RuntimeError("Error building extension: torch/csrc/Dtype.h: No such file or directory")
        return built(source, key, flag)
    monkeypatch.setattr(cpu_support, "_built", failing_for_the_lane)
    cls = layer_class("selective_ssm")
    cpu, ref = cls(backend="cpu", N=4), cls(backend="torch", N=4)
    inputs = make_inputs(cls, {"N": 4}, 2, 4, (3,), tuple((False,) for _ in cls.spec.inputs), 3)
    inputs = {n: x.float() for n, x in inputs.items()}
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        spy = KernelSpy(monkeypatch)  # (it asks for the lane: the build and its warning happen here)
        got, _ = stream(cpu, inputs, cpu.init_state(), 0, 4)
        want, _ = stream(ref, inputs, ref.init_state(), 0, 4)
    ours = [str(w.message) for w in caught if "psmc: could not build the C++ decode lane" in str(w.message)]
    assert len(ours) == 1 and "Dtype.h" in ours[0] and "check their inputs in Python" in ours[0], ours
    assert _lane(cpu).checks == "Python" and spy.calls == 4
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


ENTRY_POINTS = [f"{kind}_{t}" for kind in cpu_support.PASSES for t in ("f32", "f64")]


def _built_entry_points(cache, symbol: str) -> list:
    """The entry points of op `symbol` that each kernel library built under `cache` exports
    (one set per library; the decode lane's module is not one)."""
    import ctypes
    lane = cpu_support._key(cpu_support._LANE_SOURCE.read_text())
    found = [{e for e in ENTRY_POINTS if hasattr(ctypes.CDLL(str(so)), f"{symbol}_{e}")}
             for so in cache.glob("cpu/*/*.so") if so.parent.name != lane]
    return sorted(found, key=sorted)


def test_the_printer_and_the_runtime_spell_the_export_macros_alike():
    from psmc.codegen.cpp_printer import export_macro, exports
    for kind in cpu_support.PASSES:
        for dtype in (torch.float32, torch.float64):
            assert cpu_support.export_flag(kind, dtype) == "-D" + export_macro(kind, cpu_support.suffix(dtype))
    lines = exports("op")
    # every entry point sits alone inside the #ifdef of its own pass and type
    assert len(lines) == 3 * len(ENTRY_POINTS)
    for start, entry, end in zip(lines[::3], lines[1::3], lines[2::3]):
        kind, t = entry.split("void op_")[1].split("(")[0].split("_")
        assert (start, end) == (f"#ifdef {export_macro(kind, t)}", "#endif"), (start, entry, end)


@needs_compiler
def test_a_call_builds_only_the_pass_and_float_type_it_runs(monkeypatch, tmp_path):
    """One library per pass and float type: a float32 forward without gradients builds the
    float32 forward only (a quarter of the code), a call that will be differentiated builds
    the backward too before it runs, and float64 builds its own."""
    cls = layer_class("cumsum")
    _fresh_build(monkeypatch, tmp_path)
    symbol = cls._cpu_kernels.symbol
    layer, ref = cls(backend="cpu"), cls(backend="torch")
    x = torch.randn(2, 7, 3)
    spy = KernelSpy(monkeypatch)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), ref(x))
    assert _built_entry_points(tmp_path, symbol) == [{"forward_f32"}] and spy.calls == 1
    leaf = x.clone().requires_grad_()
    layer(leaf).sum().backward()
    assert _built_entry_points(tmp_path, symbol) == [{"backward_f32"}, {"forward_f32"}] and spy.calls == 3
    torch.testing.assert_close(leaf.grad, torch.ones_like(x).flip(1).cumsum(1).flip(1))
    with torch.no_grad():
        torch.testing.assert_close(layer(x.double()), ref(x.double()))
    assert _built_entry_points(tmp_path, symbol) == [{"backward_f32"}, {"forward_f32"}, {"forward_f64"}]


def _without_backward_builds(monkeypatch, tmp_path):
    """A fresh cache in which every backward library's build fails (forwards build)."""
    _fresh_build(monkeypatch, tmp_path)
    built = cpu_support._built

    def no_backward(source, key, flag=""):
        if "BACKWARD" in flag:
            raise RuntimeError("Error building extension: internal compiler error in the backward")
        return built(source, key, flag)
    monkeypatch.setattr(cpu_support, "_built", no_backward)


@needs_compiler
def test_a_failed_backward_build_falls_back_to_torch_for_the_whole_call(monkeypatch, tmp_path):
    """The backward library is built before a differentiated call takes the C++ route, so a
    build that fails there leaves the whole call (forward and backward) to torch, with the
    one warning; calls without gradients keep the C++ forward."""
    cls = layer_class("cumsum")
    _without_backward_builds(monkeypatch, tmp_path)
    layer, ref = cls(backend="cpu"), cls(backend="torch")
    x = torch.randn(2, 7, 3)
    spy = KernelSpy(monkeypatch)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        leaf = x.clone().requires_grad_()
        layer(leaf).sum().backward()
        with torch.no_grad():
            y = layer(x)
    ours = [str(w.message) for w in caught if "psmc: could not build the C++ CPU kernels" in str(w.message)]
    assert len(ours) == 1 and "in the backward" in ours[0], ours
    assert spy.calls == 1  # the forward without gradients, on the kernels
    torch.testing.assert_close(leaf.grad, torch.ones_like(x).flip(1).cumsum(1).flip(1))
    torch.testing.assert_close(y, ref(x))


@needs_compiler
def test_a_backward_that_cannot_be_built_later_is_a_clear_error(monkeypatch, tmp_path):
    """A gradient that reaches the kernels only through the state (inputs without grad: the
    call built its forward only) builds the backward when autograd asks for it; if that build
    fails, the backward raises an error that says so and what to do, never an AttributeError."""
    cls = layer_class("cumsum")
    _without_backward_builds(monkeypatch, tmp_path)
    x0 = torch.randn(2, 3, 3, requires_grad=True)
    _, state = cls(backend="torch")(x0, return_state=True)  # a state that carries a gradient
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        y = cls(backend="cpu")(torch.randn(2, 4, 3), state=state)
        with pytest.raises(RuntimeError, match=r"psmc: the C\+\+ backward kernels of psm_cumsum\w* could not be "
                                               r"built \(see the warning above\); run this layer with backend='torch'"):
            y.sum().backward()


@needs_compiler
def test_two_processes_building_the_same_op_at_once_both_succeed(tmp_path):
    script = textwrap.dedent(f"""
        import sys, torch, psmc
        from psmc.runtime import cpu_support
        m = psmc.load({str(CASES['cumsum'].path)!r})
        layer = m.__psmc_layers__['cumsum'](backend='cpu')
        x = torch.arange(12.0).reshape(1, 4, 3)
        calls = []
        original = cpu_support._call
        cpu_support._call = lambda *a: (calls.append(1), original(*a))[1]
        y = layer(x)
        assert calls, 'the C++ kernels did not run'
        assert torch.equal(y, x.cumsum(1)), y
        print('ok')
    """)
    env = dict(os.environ, PSMC_CACHE_DIR=str(tmp_path), PYTHONPATH=os.pathsep.join(sys.path))
    procs = [subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, results):
        assert p.returncode == 0 and out.strip() == "ok", err[-2000:]
    assert len(list(tmp_path.glob("cpu/*/ok"))) == 1
    assert len(list(tmp_path.glob("cpu/*/*.so"))) == 1


def test_psmc_check_names_the_cpu_kernels():
    from psmc.compiler import compile_source
    compiled = compile_source(CASES["gla"].path.read_text(), "gla.psm")
    from psmc.compiler import codegen_notes
    notes = codegen_notes(compiled.ops[0], compiled.plans["gla"])
    assert notes["cpu"] == ("cpu: fused C++ forward + backward + step, one loop over time per batch row x a [K, V] "
                           "state; packed sequences in one call")
    compiled = compile_source(CASES["tree_rnn"].path.read_text(), "tree_rnn.psm")
    assert codegen_notes(compiled.ops[0], compiled.plans["tree_rnn"])["cpu"] == (
        "cpu: none (tree scan: combine structure is 'general', not 'elementwise'; the torch tree serves it)")
    compiled = compile_source(CASES["ema"].path.read_text(), "ema.psm")
    assert codegen_notes(compiled.ops[0], compiled.plans["ema"])["cpu"].startswith("cpu: fused C++ tree forward")


def test_generated_cpp_is_deterministic_and_names_no_user_text_outside_identifiers():
    from psmc.codegen.cpp_printer import generate
    from psmc.compiler import compile_source
    text = CASES["selective_ssm"].path.read_text()
    a = compile_source(text, "a.psm")
    b = compile_source(text, "b.psm")
    src = generate(a.ops[0], a.plans["selective_ssm"])
    assert src == generate(b.ops[0], b.plans["selective_ssm"])
    assert "#include <torch" not in src  # builds in about a second: no torch headers


@needs_compiler
def test_nan_from_finite_inputs_is_still_an_error(monkeypatch):
    """The kernels flag NaN outputs as they write them (the layer then skips its own pass);
    a flagged NaN from finite inputs raises as on the torch backend, NaN inputs do not."""
    cls = layer_class("linear_recurrence")
    x = torch.zeros(1, 3, 2)
    log_a = torch.full((1, 3, 2), 100.0)  # exp overflows to inf in float32; inf * 0 = NaN
    for backend in ("cpu", "torch"):
        with pytest.raises(FloatingPointError, match="linear_recurrence: output 'out' contains NaN although every "
                                                     "input is finite"):
            cls(backend=backend)(x, log_a)
    spy = Spy(monkeypatch)
    y = cls(backend="cpu")(torch.full((1, 3, 2), float("nan")), torch.zeros(1, 3, 2))
    assert spy.forward == 1 and torch.isnan(y).all()
    ok = cls(backend="cpu")(torch.ones(1, 3, 2), torch.zeros(1, 3, 2))
    torch.testing.assert_close(ok, torch.tensor([1.0, 2.0, 3.0]).reshape(1, 3, 1).expand(1, 3, 2))


F64_SOURCES = {
    "f64 sum with an f64 readout input": """
op wide_sum {
  state (s: f64);
  lift (x: f64) { return tanh(x); }
  combine (l, r) { return r.s + l.s; }
  readout (s, x: f64) { return s.s + x; }
}
""",
    "i32 count beside an f64 output": """
op wide_count {
  state (n: i32);
  lift () { return 1; }
  combine (l, r) { return l.n + r.n; }
  identity = 0;
  readout (s, y: f64) { return (s.n, tanh(y)); }
}
""",
    "f32 input into an f64 state": """
op mixed_sum {
  state (s: f64);
  lift (x: f32) { return x; }
  combine (l, r) { return l.s + r.s; }
  identity = zeros;
  readout (s) { return s.s; }
}
""",
}


@needs_compiler
@pytest.mark.parametrize("what", sorted(F64_SOURCES))
def test_f64_declared_values_compute_in_float64(what, tmp_path):
    """Regression (found by the fuzz campaign with backend='auto' picking C++): the kernel's
    scalar type followed the f32 values' compute dtype, so an op declaring only f64 values ran
    in float32 (1e-8 off the reference)."""
    path = tmp_path / "wide.psm"
    path.write_text(F64_SOURCES[what])
    module = psmc.load(path)
    cls = next(getattr(module, n) for n in ("wide_sum", "wide_count", "mixed_sum") if hasattr(module, n))
    torch.manual_seed(0)
    x = torch.randn(2, 33, dtype=torch.float64)
    inputs = {slot.name: x.to(torch.float32) if slot.dtype == "f32" else x for slot in cls.spec.inputs}
    got, want = as_tuple(cls(backend="cpu")(**inputs)), as_tuple(cls(backend="torch")(**inputs))
    for g, w in zip(got, want):
        assert g.dtype == w.dtype
        torch.testing.assert_close(g, w, rtol=1e-13, atol=1e-13)


@needs_compiler
def test_the_bound_step_reads_params_and_sees_them_change(tmp_path, checks, monkeypatch):
    """A param is read where it lies (its address per token: an in-place update is seen); a
    param whose data is swapped for float64 after binding (`p.data = ...`: no `_apply`, so the
    step cache survives) sends the token to the general step, never a float32 read of float64
    memory."""
    path = tmp_path / "gla_w.psm"
    path.write_text(GLA_W)
    cls = psmc.load(path).gla_w
    torch.manual_seed(0)
    cpu, ref = cls(backend="cpu", K=4, V=4), cls(backend="torch", K=4, V=4)
    ref.load_state_dict(cpu.state_dict())
    tokens = [dict(k=torch.randn(2, 4), v=torch.randn(2, 4), gk=-torch.rand(2, 4), q=torch.randn(2, 4)) for _ in range(4)]
    general = Spy(monkeypatch)
    s, r = cpu.init_state(), ref.init_state()
    with torch.no_grad():
        for i, tok in enumerate(tokens):
            if i == 2:  # an in-place update: the bound step reads the new values
                cpu.p_w.mul_(0.5)
                ref.p_w.mul_(0.5)
            (y, s), (w, r) = cpu.step(s, **tok), ref.step(r, **tok)
            torch.testing.assert_close(y, w, rtol=1e-5, atol=1e-5)
        assert general.forward == 1 and _lane(cpu).checks == checks
        cpu.p_w.data = cpu.p_w.data.double()
        ref.p_w.data = ref.p_w.data.double()
        (y, s), (w, r) = cpu.step(s, **tokens[0]), ref.step(r, **tokens[0])
    assert general.forward == 2  # the general step served it
    torch.testing.assert_close(y, w, rtol=1e-5, atol=1e-5, check_dtype=False)


@needs_compiler
def test_threads_stepping_one_bound_step_keep_their_own_streams(checks):
    """The bound step writes each token's addresses into arrays its closure owns, and ctypes
    releases the GIL for the kernel: threads that step one layer (one signature) at once must
    each get their own stream's outputs, exactly as when they run one after another."""
    import threading

    import sys
    import threading

    cls = layer_class("gla")
    dims = {"K": 32, "V": 32}
    layer = cls(backend="cpu", **dims)
    streams = []
    for seed in range(4):
        x = make_inputs(cls, dims, 1, 200, (4,), tuple((False,) for _ in cls.spec.inputs), seed)
        streams.append({n: t.float() for n, t in x.items()})
    with torch.no_grad():
        alone = [stream(layer, x, layer.init_state(), 0, 200)[0] for x in streams]
        together = [None] * len(streams)

        def run(i):
            with torch.no_grad():  # (grad mode is per thread)
                together[i] = stream(layer, streams[i], layer.init_state(), 0, 200)[0]

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(streams))]
        interval = sys.getswitchinterval()
        sys.setswitchinterval(1e-6)  # switch threads between almost every two bytecodes
        try:
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        finally:
            sys.setswitchinterval(interval)
    assert _lane(layer).checks == checks
    for want, got in zip(alone, together):
        for w, g in zip(want, got):
            assert torch.equal(w, g)


@needs_compiler
def test_the_decode_lane_reads_only_states_and_inputs_laid_out_as_bound(checks, monkeypatch):
    """A bound step runs its kernel only on tensors exactly as it was bound to: a state whose
    tensors are transposed views (same values, other strides), a state of another dtype or
    batch, and an input of a tensor subclass go to the general step, which agrees with the
    torch backend; the lane itself never reads them."""
    from psmc.runtime.state import ScanState

    class Tagged(torch.Tensor):  # a subclass: its data may not be where a plain tensor's is
        pass

    cls = layer_class("gla")
    dims = {"K": 4, "V": 4}
    cpu, ref = cls(backend="cpu", **dims), cls(backend="torch", **dims)
    torch.manual_seed(3)
    token = dict(k=torch.randn(2, 3, 4), v=torch.randn(2, 3, 4), gk=-torch.rand(2, 3, 4), q=torch.randn(2, 3, 4))
    spy, general = KernelSpy(monkeypatch), Spy(monkeypatch)
    with torch.no_grad():
        _, s = cpu.step(cpu.init_state(), **token)
        _, s = cpu.step(s, **token)
        assert _lane(cpu).checks == checks and spy.calls == 2 and general.forward == 1
        (S,) = s.tensors()
        want, _ = ref.step(ScanState.from_tensors((S,), count=2), **token)
        transposed = ScanState.from_tensors((S.transpose(-1, -2).contiguous().transpose(-1, -2),), count=2)
        y, _ = cpu.step(transposed, **token)
        torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
        assert general.forward == 2
        y, _ = cpu.step(s, **{**token, "q": token["q"].as_subclass(Tagged)})
        torch.testing.assert_close(y.as_subclass(torch.Tensor), want, rtol=1e-5, atol=1e-5)
        assert general.forward == 3
        # another dtype (the general step casts it) and a batch of one (broadcast over the batch)
        for other in (ScanState.from_tensors((S.double(),), count=2), ScanState.from_tensors((S[:1],), count=2)):
            y, _ = cpu.step(other, **token)
            w, _ = ref.step(ScanState.from_tensors((other.prefix[0].float(),), count=2), **token)
            torch.testing.assert_close(y, w, rtol=1e-5, atol=1e-5)
        assert general.forward == 5
        calls = spy.calls
        y, _ = cpu.step(s, **token)  # the lane still serves its own signature
        torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
        assert spy.calls == calls + 1 and general.forward == 5
