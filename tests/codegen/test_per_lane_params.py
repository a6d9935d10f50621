"""Per-lane params (issue 13 item 4): `Cls(lanes=(H,), per_lane=True)` builds each param as
`[*lanes, *declared]`, one learnable slice per lane. A layer built that way must equal H
independent single-lane layers whose params are the slices: forward, state, step and every
gradient, for a first-order op (Mamba's per-channel A), a GLA-family op (chunkwise path, a
per-head gate scale) and a tree-scan op (a per-head learned aggregator); on the torch paths, the
C++-kernel singles (backend='auto' on CPU) and the first-order Triton scan under the interpreter."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch.func import functional_call

import psmc
from param_ops import GLA_W, SSM_A

SOURCE = SSM_A + GLA_W + """op tree_w[D] {
  param W1: f32[D, D]; param W2: f32[D, D]; param b: f32[D] = normal(0.1);
  state (h: f32[D]);
  combine (l, r) { return tanh(l.h @ W1 + r.h @ W2 + b); }
}
op delta_p[K, V] {
  param w: f32 = uniform(0.5, 1.0);
  state (E: f32[K, K], S: f32[K, V]);
  lift (k: f32[K], v: f32[V], beta: f32) {
    return (eye(K) - (w * beta) * outer(k, k), (w * beta) * outer(k, v));
  }
  combine (l, r) { return (r.E @ l.E, r.E @ l.S + r.S); }
  identity = (eye(K), zeros);
  readout (s, q: f32[K]) { return q @ s.S; }
}
op plain[D] {
  state (y: f32[D]);
  lift (x: f32[D]) { return (x); }
  combine (l, r) { return (l.y + r.y); }
  readout (s) { return s.y; }
}
"""


@pytest.fixture(scope="module")
def ops(tmp_path_factory):
    path = tmp_path_factory.mktemp("per_lane") / "per_lane.psm"
    path.write_text(SOURCE)
    return psmc.load(path)


DIMS = {"ssm_a": {"N": 3}, "gla_w": {"K": 3, "V": 2}, "tree_w": {"D": 3}}


def _inputs(name: str, B: int, T: int, H: int, seed: int, dtype=torch.float32) -> dict:
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=dtype)
    if name == "ssm_a":  # u, delta per channel; B, C shared by the channels ([.., 1, N])
        return {"u": r(B, T, H), "delta": torch.rand(B, T, H, generator=g, dtype=dtype), "B": r(B, T, 1, 3),
                "C": r(B, T, 1, 3)}
    if name == "gla_w":
        return {"k": r(B, T, H, 3), "v": r(B, T, H, 2), "gk": torch.nn.functional.logsigmoid(r(B, T, H, 3)),
                "q": r(B, T, H, 3)}
    return {"h": r(B, T, H, 3)}


def _lane(inputs: dict, h: int) -> dict:
    """Lane h of every input as a one-lane input (a broadcast lane axis of size 1 stays)."""
    lane_axis = 2
    return {n: (x if x.shape[lane_axis] == 1 else x.narrow(lane_axis, h, 1)) for n, x in inputs.items()}


def _layers(ops, name: str, H: int, backend="torch", seed=0):
    cls = getattr(ops, name)
    torch.manual_seed(seed)
    layer = cls(lanes=(H,), per_lane=True, backend=backend, **DIMS[name])
    singles = []
    for h in range(H):
        single = cls(backend="auto", **DIMS[name])  # on CPU: the C++ kernels where the op has them
        with torch.no_grad():
            for n, p in layer.named_parameters():
                getattr(single, n).copy_(p[h])
        singles.append(single)
    return layer, singles


def _close(a, b, what):
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} vs {tuple(b.shape)}"
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=lambda m: f"{what}: {m}")


@settings(max_examples=4, deadline=None)
@given(name=st.sampled_from(sorted(DIMS)), B=st.integers(1, 2), T=st.integers(1, 9), H=st.integers(1, 3),
       seed=st.integers(0, 2**16))
def test_per_lane_equals_independent_layers(ops, name, B, T, H, seed):
    """Forward, final state, then two steps, then gradients of inputs and every param slice."""
    layer, singles = _layers(ops, name, H, seed=seed)
    x = {n: t.requires_grad_() for n, t in _inputs(name, B, T, H, seed).items()}
    out, state = layer(**x, return_state=True)
    assert state.op.startswith(f"{name}[") and " per_lane=" in state.op
    step_inputs = _inputs(name, B, 2, H, seed + 1)
    outs_step, s = [], state
    for t in range(2):
        o, s = layer.step(s, **{n: v[:, t] for n, v in step_inputs.items()})
        outs_step.append(o)
    loss = out.square().sum() + sum(o.square().sum() for o in outs_step)
    loss.backward()
    shared = {}
    for h in range(H):
        xh = {n: t.detach().clone().requires_grad_() for n, t in _lane(x, h).items()}
        want, sh = singles[h](**xh, return_state=True)
        _close(out.narrow(2, h, 1), want, f"{name} lane {h} forward")
        for got_field, want_field in zip(state.tensors(), sh.tensors()):
            _close(got_field.narrow(1, h, 1), want_field, f"{name} lane {h} state")
        step_h = _lane(step_inputs, h)
        want_steps = []
        for t in range(2):
            o, sh = singles[h].step(sh, **{n: v[:, t] for n, v in step_h.items()})
            want_steps.append(o)
            _close(outs_step[t].narrow(1, h, 1), o, f"{name} lane {h} step {t}")
        (want.square().sum() + sum(o.square().sum() for o in want_steps)).backward()
        for n, p in layer.named_parameters():
            _close(p.grad[h], getattr(singles[h], n).grad, f"{name} lane {h} gradient of {n}")
        for n, t in xh.items():
            if x[n].shape[2] == 1:  # shared by the lanes: its gradient is the sum over the lanes
                shared[n] = shared.get(n, 0) + t.grad
            else:
                _close(x[n].grad.narrow(2, h, 1), t.grad, f"{name} lane {h} gradient of input {n}")
    for n, total in shared.items():
        _close(x[n].grad, total, f"{name} gradient of the shared input {n}")


@pytest.mark.parametrize("name", sorted(DIMS))
def test_gradcheck_per_lane_params_float64(ops, name):
    """Each lane's slice gets its own gradient (float64 gradcheck through every param)."""
    torch.manual_seed(1)
    layer = getattr(ops, name)(lanes=(2,), per_lane=True, backend="torch", **DIMS[name]).double()
    inputs = _inputs(name, 1, 4, 2, 3, dtype=torch.float64)
    names = [n for n, _ in layer.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_() for _, p in layer.named_parameters())

    def f(*ps):
        return functional_call(layer, dict(zip(names, ps)), (), inputs)
    assert torch.autograd.gradcheck(f, params, eps=1e-6, atol=1e-5)


def test_every_slice_initialised_as_declared(ops):
    torch.manual_seed(0)
    t = ops.tree_w(D=4, lanes=(3,), per_lane=("W1", "b"))
    assert t.p_W1.shape == (3, 4, 4) and t.p_b.shape == (3, 4) and t.p_W2.shape == (4, 4)  # W2 stays shared
    bound = math.sqrt(6 / (4 + 4))  # xavier over the declared [D, D], per slice
    assert t.p_W1.abs().max() <= bound and not torch.equal(t.p_W1[0], t.p_W1[1])
    a = ops.ssm_a(N=5, lanes=(2, 3), per_lane=True).p_A
    assert a.shape == (2, 3, 5) and bool((a >= -1).all() and (a <= -0.1).all())
    assert len({tuple(row.tolist()) for row in a.reshape(6, 5)}) == 6  # six independent draws


def test_varlen_and_ragged_steps(ops):
    """cu_seqlens with per-lane params: each sequence as it runs alone (per lane too)."""
    layer, _ = _layers(ops, "tree_w", 2)
    seqs = [_inputs("tree_w", 1, n, 2, 10 + n)["h"] for n in (3, 5)]
    cu = torch.tensor([0, 3, 8])
    out, state = layer(h=torch.cat(seqs, dim=1), cu_seqlens=cu, return_state=True)
    for i, s in enumerate(seqs):
        alone, sa = layer(h=s, return_state=True)
        assert torch.equal(out[:, cu[i]:cu[i + 1]], alone)
        y, _ = layer.step(sa, h=seqs[0][:, 0])
        y_all, _ = layer.step(state[i], h=seqs[0][:, 0])
        assert torch.equal(y, y_all)


@pytest.mark.parametrize("name, fast", [("ssm_a", True), ("ssm_a", False), ("gla_w", True)])
def test_triton_kernels_read_each_lanes_slice(ops, name, fast, monkeypatch):
    """backend='triton' under the interpreter with per-lane params: the first-order scan (it
    scans the lifted values; ssm_a with the cheaper state loop taken out), the generated state
    loop (ssm_a with its fast path off), the matrix token loop (gla_w) and the generated step
    kernel equal backend='torch': forward, a step from the returned state, and every param's
    gradient (summed over batch rows only)."""
    from psmc.runtime import dispatch
    if fast and name == "ssm_a":
        monkeypatch.setattr(dispatch, "PATHS", [p for p in dispatch.PATHS if p.name != "triton-state-loop"])
    torch.manual_seed(0)
    tri = getattr(ops, name)(lanes=(3,), per_lane=True, backend="triton", **DIMS[name])
    ref = getattr(ops, name)(lanes=(3,), per_lane=True, backend="torch", **DIMS[name])
    ref.load_state_dict(tri.state_dict())
    tri.use_fast_path = ref.use_fast_path = fast
    x = _inputs(name, 2, 9, 3, 4)
    paths = {kind: dispatch.choose(tri, tri._prepare(dict(x if kind == "forward" else
                                                          {n: v[:, 0] for n, v in x.items()}),
                                                     step=kind == "step"), kind).name
             for kind in ("forward", "step")}
    assert paths["forward"] == {"ssm_a": "triton-first-order" if fast else "triton-state-loop",
                                "gla_w": "triton-token-loop"}[name] and paths["step"] == "triton-step", paths
    results = []
    for layer in (tri, ref):
        xs = {n: v.clone().requires_grad_() for n, v in x.items()}
        out, state = layer(**xs, return_state=True)
        out.square().sum().backward()
        y, _ = layer.step(state, **{n: v[:, 0] for n, v in x.items()})
        results.append((out.detach(), y, [p.grad for p in layer.parameters()]))
    (out_t, y_t, g_t), (out_r, y_r, g_r) = results
    _close(out_t, out_r, f"{name} triton forward")
    _close(y_t, y_r, f"{name} triton step")
    for a, b in zip(g_t, g_r):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)


def test_errors(ops):
    with pytest.raises(ValueError, match=r"tree_w: per-lane params \(W1, W2, b\) need the lanes at construction: "
                                         r"pass lanes=\(H,\)"):
        ops.tree_w(D=3, per_lane=True)
    with pytest.raises(ValueError, match=r"per_lane names params, but 'W3' is not one; the op's params are: W1, W2, b"):
        ops.tree_w(D=3, lanes=(2,), per_lane=("W3",))
    with pytest.raises(ValueError, match="per_lane=True but the op declares no param"):
        ops.plain(lanes=(2,), per_lane=True)
    layer = ops.tree_w(D=3, lanes=(2,), per_lane=True)
    with pytest.raises(ValueError, match=r"forward takes \[B, T, \*lanes, ...declared\] with lanes \(2,\)"):
        layer(h=torch.randn(1, 4, 3, 3))
    shared = ops.tree_w(D=3, lanes=(2,))
    _, state = shared(h=torch.randn(1, 4, 2, 3), return_state=True)
    with pytest.raises(ValueError, match=r"tree_w\[D=3\] per_lane=W1,W2,b lanes=\(2,\) was given a state made by "
                                         r"tree_w\[D=3\] lanes=\(2,\)"):
        layer.step(state, h=torch.randn(1, 2, 3))


def test_inputs_broadcast_over_per_lane_params(ops):
    """Inputs with a lane axis of 1 broadcast against the params' lanes: [B, T, H] outputs."""
    layer, singles = _layers(ops, "ssm_a", 3)
    x = _inputs("ssm_a", 2, 5, 1, 7)  # u, delta: [2, 5, 1]
    out, state = layer(**x, return_state=True)
    assert out.shape == (2, 5, 3) and state.op.endswith("lanes=(3,)")
    for h in range(3):
        _close(out.narrow(2, h, 1), singles[h](**x), f"broadcast lane {h}")
    y, _ = layer.step(state, **{n: v[:, 0] for n, v in x.items()})
    assert y.shape == (2, 3)


def test_context_parallel_with_per_lane_params(ops, tmp_path):
    """cp_group= over 2 gloo ranks with per-lane params: outputs, the final state and every
    gradient (params summed over the ranks) equal one process over the whole sequence; the
    tree op bit for bit. (One spawn for both ops: process start-up is most of the cost.)"""
    import cp_worker
    from spawning import spawn_ranks
    from test_context_parallel import _compare

    jobs, references = [], []
    for i, name in enumerate(("ssm_a", "tree_w")):
        dims = {**DIMS[name], "lanes": (2,), "per_lane": True}
        torch.manual_seed(i)
        layer = getattr(ops, name)(**dims).double()
        inputs = _inputs(name, 2, 9, 2, 20 + i, dtype=torch.float64)
        _, state = layer(**cp_worker.split(inputs, 0, 3), return_state=True)
        rest = cp_worker.split(inputs, 3, 9)
        leaves = {n: x.clone().requires_grad_() for n, x in rest.items()}
        want, want_state = layer(**leaves, state=state.detach(), return_state=True)
        weights = (torch.rand(want.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(i)) - 0.5,)
        cp_worker.loss_of((want,), weights, want_state, 1.0).backward()
        jobs.append({"module": ops.__file__, "op": name,
                     "dims": dims, "lengths": (2, 4), "params": {n: t.detach().clone() for n, t in
                                                                  layer.state_dict().items()},
                     "inputs": rest, "state": state.detach(), "weights": weights, "return_state": True,
                     "cu": None})
        references.append({"outputs": [want.detach()], "state": want_state.detach(),
                           "input_grads": {n: x.grad for n, x in leaves.items()},
                           "param_grads": {n: p.grad for n, p in layer.named_parameters()}})
    out = spawn_ranks(cp_worker.run_jobs, 2, lambda port, out: (2, port, jobs, out), tmp_path)
    per_rank = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]
    failures = []
    for k, job in enumerate(jobs):
        failures += _compare(job, references[k], [per_rank[r][k] for r in range(2)], exact=job["op"] == "tree_w")
    assert not failures, "\n".join(failures)


def test_cached_step_follows_the_layer(ops):
    """The bound step cached per input signature belongs to its layer: `.double()` starts the
    cache over (the params' dtype sets the compute dtype), a deep copy steps with its own params."""
    import copy
    layer = ops.gla_w(K=3, V=2, lanes=(2,), per_lane=True)
    x = {n: v[:, 0] for n, v in _inputs("gla_w", 1, 1, 2, 3).items()}
    _, state = layer.step(layer.init_state(), **x)
    y, _ = layer.step(state, **x)  # the decode lane, cached
    twin = copy.deepcopy(layer)
    with torch.no_grad():
        twin.p_w.mul_(2.0)
    y_twin, _ = twin.step(state, **x)
    y_again, _ = layer.step(state, **x)
    assert torch.equal(y, y_again) and not torch.allclose(y_twin, y)
    layer.double()
    y64, _ = layer.step(state.to(dtype=torch.float64), **x)
    assert y64.dtype == torch.float64
    torch.testing.assert_close(y64.float(), y, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["delta_p", "transformer_psm"])
def test_delta_rule_and_chunk_op(ops, name):
    """The delta rule's fast path (a per-lane scale of beta) and a chunk tree op (the paper's
    Transformer-PSM, every block weight per head): forward, state and a step per lane."""
    from pathlib import Path
    if name == "delta_p":
        cls, dims = ops.delta_p, {"K": 4, "V": 3}
        g = torch.Generator().manual_seed(4)
        k = torch.nn.functional.normalize(torch.randn(2, 7, 3, 4, generator=g), dim=-1)
        x = {"k": k, "v": torch.randn(2, 7, 3, 3, generator=g), "beta": torch.rand(2, 7, 3, generator=g),
             "q": torch.randn(2, 7, 3, 4, generator=g)}
    else:
        examples = Path(__file__).resolve().parents[2] / "examples"
        cls, dims = psmc.load(examples / "transformer_psm.psm").transformer_psm, {"C": 2, "D": 4, "H": 1}
        x = {"x": torch.randn(2, 7, 3, 4, generator=torch.Generator().manual_seed(5))}
    torch.manual_seed(6)
    layer = cls(lanes=(3,), per_lane=True, **dims)
    out, state = layer(**x, return_state=True)
    y, _ = layer.step(state, **{n: v[:, 0] for n, v in x.items()})
    for h in range(3):
        single = cls(**dims)
        with torch.no_grad():
            for n, p in layer.named_parameters():
                getattr(single, n).copy_(p[h])
        want, sh = single(**_lane(x, h), return_state=True)
        _close(out.narrow(2, h, 1), want, f"{name} lane {h} forward")
        y_h, _ = single.step(sh, **{n: v[:, 0] for n, v in _lane(x, h).items()})
        _close(y.narrow(1, h, 1), y_h, f"{name} lane {h} step")


LOWER_RANK = """
op low_rank_param[D] {
  param w: f64 = uniform(0.5, 1.5);
  param M: f64[D, D] = normal(0.3);
  state (h: f64[D]);
  lift (x: f64[D]) { return x; }
  combine (l, r) { return tanh(l.h * w + r.h - sum(M) * 0.1 + (M @ ones(D)) * 0.1); }
  readout (s, y: f64[D]) { return s.h * w + y; }
}
"""


@pytest.mark.parametrize("D", [2, 3])
def test_a_per_lane_param_of_lower_rank_than_the_values_it_meets(tmp_path, D):
    # found by the fuzzer (program seed 236): a per-lane scalar param [H] beside a [D] value was
    # right-aligned onto D: a crash when H != D, silently another lane's value when H == D
    path = tmp_path / "low_rank.psm"
    path.write_text(LOWER_RANK)
    cls = psmc.load(path).low_rank_param
    torch.manual_seed(0)
    layer = cls(lanes=(3,), per_lane=True, D=D).double()
    with torch.no_grad():
        layer.p_w.copy_(torch.tensor([0.6, 1.0, 1.4], dtype=torch.float64))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 7, 3, D, generator=g, dtype=torch.float64)
    y = torch.randn(2, 7, 3, D, generator=g, dtype=torch.float64)
    out = layer(x=x, y=y)
    for h in range(3):
        single = cls(D=D).double()
        with torch.no_grad():
            single.p_w.copy_(layer.p_w[h])
            single.p_M.copy_(layer.p_M[h])
        torch.testing.assert_close(out[:, :, h], single(x=x[:, :, h], y=y[:, :, h]), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ["ssm_a", "gla_w"])
def test_cpp_kernels_read_each_lanes_slice(ops, name):
    """backend='cpu' with per-lane params: the C++ kernels (a 'lanes' kernel for ssm_a, one lane
    per work item; a 'matrix' kernel for gla_w) equal the torch backend: forward, the final
    state, a step, and every gradient (a param's summed over the batch rows only)."""
    from psmc.runtime import cpu_support
    torch.manual_seed(3)
    cpu = getattr(ops, name)(lanes=(3,), per_lane=True, backend="cpu", **DIMS[name]).double()
    ref = getattr(ops, name)(lanes=(3,), per_lane=True, backend="torch", **DIMS[name]).double()
    ref.load_state_dict(cpu.state_dict())
    if cpu_support.library(cpu._cpu_kernels, "forward", torch.float64) is None:
        pytest.fail("the C++ kernels did not build")
    x = {n: v.double() for n, v in _inputs(name, 2, 6, 3, 9).items()}
    grads = []
    for layer in (cpu, ref):
        xs = {n: v.clone().requires_grad_() for n, v in x.items()}
        out, state = layer(**xs, return_state=True)
        y, _ = layer.step(state, **{n: v[:, 0] for n, v in x.items()})
        (out.square().sum() + y.square().sum()).backward()
        grads.append((out.detach(), y.detach(), state.tensors(), [p.grad for p in layer.parameters()],
                      [v.grad for v in xs.values()]))
    (out_c, y_c, st_c, gp_c, gx_c), (out_r, y_r, st_r, gp_r, gx_r) = grads
    torch.testing.assert_close(out_c, out_r, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(y_c, y_r, rtol=1e-10, atol=1e-12)
    for a, b in zip(st_c, st_r):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    for a, b in zip(gp_c + gx_c, gp_r + gx_r):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
