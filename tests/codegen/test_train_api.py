"""What training and serving code needs from a layer: state operations (row selection for
beam search, concatenation, plain-tensor import/export, fla-style aliases), states checked
against the layer that is given them, half-precision inputs and autocast, clear errors for a
missing or extra time axis, and NaN causality."""
from __future__ import annotations

import math

import pytest
import torch

import psmc
from layer_cases import CASES
from layer_harness import Casts, as_tuple, assert_agree, layer_class, make_inputs, stream
from psmc.runtime.batch import RaggedState
from psmc.runtime.state import ScanState, TreeState


def build(name, batch=3, T=5, lanes=(2,), dtype=torch.float64, seed=1, dims=None):
    case = CASES[name]
    cls = layer_class(name)
    dims = case.dim_sets[-1] if dims is None else dims
    torch.manual_seed(0)
    layer = cls(**dims).to(dtype)
    broadcast = tuple((False,) * len(lanes) for _ in cls.spec.inputs)
    inputs = make_inputs(cls, dims, batch, T, lanes, broadcast, seed=seed, kinds=case.kinds)
    inputs = {n: (x.to(dtype) if x.is_floating_point() else x) for n, x in inputs.items()}
    return layer, inputs


def tokens(inputs, t):
    return {n: x[:, t] for n, x in inputs.items()}


# ---------------------------------------------------------------- state operations
@pytest.mark.parametrize("name", ["gla", "ema", "transformer_psm"])
def test_beam_reorder_continues_the_reordered_rows(name):
    layer, inputs = build(name, batch=3, T=6)
    _, state = layer(**{n: x[:, :4] for n, x in inputs.items()}, return_state=True)
    order = torch.tensor([2, 0, 0])  # beam search: row 2 first, row 0 twice
    reordered = state[order]
    assert reordered.batch_size == 3 and type(reordered) is type(state)
    rest = {n: x[order, 4:] for n, x in inputs.items()}
    got, _ = stream(layer, rest, reordered, 0, 2)
    want, _ = stream(layer, rest, _prefill(layer, inputs, order), 0, 2)
    assert_agree(got, want, f"{name}: reordered state")


def _prefill(layer, inputs, order):
    _, state = layer(**{n: x[order, :4] for n, x in inputs.items()}, return_state=True)
    return state


def test_indexing_forms_and_cat_states_round_trip():
    layer, inputs = build("ema", batch=4, T=5)
    _, state = layer(**inputs, return_state=True)
    assert state[1].batch_size == 1 and state[-1].batch_size == 1
    assert state[1:3].batch_size == 2
    assert state[torch.tensor([True, False, True, False])].batch_size == 2
    back = psmc.cat_states([state[0], state[1:3], state[3]])
    assert type(back) is TreeState and back.size == state.size
    for a, b in zip(back.tensors(), state.tensors(), strict=True):
        assert torch.equal(a, b)
    with pytest.raises(IndexError, match="out of range"):
        state[4]


def test_cat_states_of_different_counts_is_ragged_and_moves():
    layer, inputs = build("ema", batch=2, T=6)
    _, a = layer(**{n: x[:, :3] for n, x in inputs.items()}, return_state=True)
    _, b = layer(**{n: x[:, :5] for n, x in inputs.items()}, return_state=True)
    ragged = psmc.cat_states([a, b[1]])
    assert isinstance(ragged, RaggedState) and ragged.sizes == [3, 3, 5] and ragged.batch_size == 3
    moved = ragged.to(device="meta")
    assert all(t.device.type == "meta" for t in moved.tensors()) and moved.nbytes == ragged.nbytes > 0
    assert ragged[[2, 0]].sizes == [5, 3]
    same = ragged[[0, 1]]
    assert isinstance(same, TreeState) and same.batch_size == 2  # equal counts: one state again


@pytest.mark.parametrize("name", ["gla", "ema"])
def test_tensors_from_tensors_round_trip(name):
    layer, inputs = build(name, batch=2, T=6)
    _, state = layer(**{n: x[:, :5] for n, x in inputs.items()}, return_state=True)
    plain = state.tensors()
    assert all(type(t) is torch.Tensor for t in plain)
    rebuilt = type(state).from_tensors(plain, count=state.size)
    last = tokens(inputs, 5)
    assert_agree(as_tuple(layer.step(rebuilt, **last)[0]), as_tuple(layer.step(state, **last)[0]),
                 f"{name}: rebuilt state")


def test_fla_aliases_single_tensor_state():
    layer, inputs = build("linear_attention", batch=2, T=6)
    assert len(layer.spec.fields) == 1
    first = {n: x[:, :4] for n, x in inputs.items()}
    rest = {n: x[:, 4:] for n, x in inputs.items()}
    o, h = layer(**first, output_final_state=True)
    assert isinstance(h, torch.Tensor) and h.shape == (2, 2, *layer.spec.fields[0].shape(layer.dims | {"K": inputs["k"].shape[-1], "V": inputs["v"].shape[-1]}))
    o2, none = layer(**rest, initial_state=h, output_final_state=False)
    assert none is None
    full = layer(**inputs)
    torch.testing.assert_close(torch.cat([o, o2], 1), full, rtol=1e-9, atol=1e-11)


def test_fla_aliases_dead_fields_are_left_out():
    """gla's running decay product `a` is dead in a stream: the final state is S alone, the
    tensor fla's chunk_gla returns, and initial_state takes that one tensor back."""
    layer, inputs = build("gla", batch=2, T=6)
    assert [f.name for f in layer.spec.fields] == ["a", "S"] and layer.spec.dead == (0,)
    o, h = layer(**{n: x[:, :4] for n, x in inputs.items()}, output_final_state=True)
    assert isinstance(h, torch.Tensor) and h.shape[-2:] == (inputs["k"].shape[-1], inputs["v"].shape[-1])
    o2 = layer(**{n: x[:, 4:] for n, x in inputs.items()}, initial_state=h)
    torch.testing.assert_close(torch.cat([o, o2], 1), layer(**inputs), rtol=1e-9, atol=1e-11)
    _, state = layer(**{n: x[:, :4] for n, x in inputs.items()}, return_state=True)
    assert state.prefix[0] is None and state.tensors() == (state.prefix[1],)
    rebuilt = ScanState.from_tensors(state.tensors(), count=4)
    o3 = layer(**{n: x[:, 4:] for n, x in inputs.items()}, state=rebuilt)
    torch.testing.assert_close(o3, o2, rtol=0, atol=0)
    with pytest.raises(TypeError, match=r"1 tensor \(the live fields S; a is dead"):
        layer(**inputs, initial_state=(h, h))


def test_fla_aliases_multi_field_state_is_a_tuple():
    layer, inputs = build("welford", batch=2, T=6)
    assert layer.spec.dead == () and len(layer.spec.fields) == 3
    o, h = layer(**{n: x[:, :4] for n, x in inputs.items()}, output_final_state=True)
    assert isinstance(h, tuple) and len(h) == 3
    o2 = layer(**{n: x[:, 4:] for n, x in inputs.items()}, initial_state=h)
    full = layer(**inputs)
    torch.testing.assert_close(torch.cat([as_tuple(o)[0], as_tuple(o2)[0]], 1), as_tuple(full)[0],
                               rtol=1e-9, atol=1e-11)
    with pytest.raises(TypeError, match="3 tensors"):
        layer(**inputs, initial_state=h[1])


def test_a_state_from_another_op_or_other_dims_names_both():
    gla, gla_in = build("gla", batch=2, T=3)
    _, gla_state = gla(**gla_in, return_state=True)
    simple, simple_in = build("simple_gla", batch=2, T=3)
    with pytest.raises(ValueError, match=r"simple_gla\[K=3, V=2\] lanes=\(2,\) was given a state made by "
                                         r"gla\[K=3, V=2\] lanes=\(2,\)"):
        simple(**simple_in, state=gla_state)
    other, other_in = build("gla", batch=2, T=3, dims={"K": 2, "V": 1})
    with pytest.raises(ValueError, match=r"gla\[K=2, V=1\] lanes=\(2,\) was given a state made by gla\[K=3, V=2\]"):
        other.step(gla_state, **tokens(other_in, 0))
    ema, ema_in = build("ema", batch=2, T=3)
    with pytest.raises(TypeError, match="expected a TreeState .* got ScanState of gla"):
        ema(**ema_in, state=gla_state)
    untagged = ScanState.from_tensors((torch.zeros(2, 2, 5), torch.zeros(2, 2, 5, 2)))
    with pytest.raises(ValueError, match=r"state does not fit this layer.*\[2, 2, 5\].*a: \[3\], S: \[3, 2\]"):
        gla(**gla_in, state=untagged.to(dtype=torch.float64))


# ---------------------------------------------------------------- dtypes
PATHS = ["gla", "linear_recurrence", "ema", "transformer_psm", "cumsum", "delta_rule", "gated_delta_product"]


@pytest.mark.parametrize("name", PATHS)
@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16])
def test_half_inputs_give_half_outputs_and_fp32_state(name, half):
    layer, inputs = build(name, batch=2, T=5, dtype=torch.float32)
    ref, _ = layer(**inputs, return_state=True)
    low = {n: (x.to(half) if x.is_floating_point() else x) for n, x in inputs.items()}
    out, state = layer(**low, return_state=True)
    for o, r in zip(as_tuple(out), as_tuple(ref)):
        if r.is_floating_point():
            assert o.dtype == half
            torch.testing.assert_close(o.float(), r, rtol=0.05, atol=0.02)
    assert all(t.dtype == torch.float32 for t in state.tensors() if t.is_floating_point())
    o_t, state = layer.step(state, **{n: x[:, -1] for n, x in low.items()})
    assert all(o.dtype == half for o in as_tuple(o_t) if o.is_floating_point())
    assert all(t.dtype == torch.float32 for t in state.tensors() if t.is_floating_point())


@pytest.mark.parametrize("name", PATHS)
def test_autocast_runs_every_path(name):
    layer, inputs = build(name, batch=2, T=5, dtype=torch.float32)
    ref = as_tuple(layer(**inputs))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, state = layer(**inputs, return_state=True)
        o_t, _ = layer.step(state, **tokens(inputs, 0))
        varlen = layer(**{n: x[:1] for n, x in inputs.items()}, cu_seqlens=torch.tensor([0, 2, 5]))
    for o, r in zip(as_tuple(out), ref):
        assert o.dtype == r.dtype
        if r.is_floating_point():
            torch.testing.assert_close(o, r, rtol=1e-5, atol=1e-6)
    assert all(o.dtype == r.dtype for o, r in zip(as_tuple(varlen), ref))


# ---------------------------------------------------------------- clear errors
def test_step_given_a_time_axis_is_an_error():
    layer, inputs = build("gla", batch=2, T=4)
    _, state = layer(**inputs, return_state=True)
    with pytest.raises(ValueError, match="step takes one token.*is there a time axis"):
        layer.step(state, **inputs)
    declared = layer_class("gla")(lanes=(2,)).double()
    with pytest.raises(ValueError, match="is there a time axis"):
        declared.step(declared.init_state(), **inputs)


def test_forward_given_no_time_axis_is_an_error():
    layer, inputs = build("gla", batch=2, T=4)
    _, state = layer(**inputs, return_state=True)
    with pytest.raises(ValueError, match="forward takes .* is the time axis missing"):
        layer(**tokens(inputs, 0), state=state)
    declared = layer_class("gla")(lanes=(2,)).double()
    with pytest.raises(ValueError, match="is the time axis missing"):
        declared(**tokens(inputs, 0))
    assert_agree(as_tuple(declared(**inputs)), as_tuple(layer(**inputs)), "lanes= changes nothing else")


# ---------------------------------------------------------------- NaN causality
@pytest.mark.parametrize("name", sorted(CASES))
def test_a_nan_at_t_reaches_no_output_before_t(name):
    layer, inputs = build(name, batch=1, T=9, dtype=torch.float32)
    t = 6
    for slot in layer.spec.inputs:
        x = inputs[slot.name]
        if not x.is_floating_point() or x.shape[1] == 1:
            continue
        poisoned = dict(inputs)
        poisoned[slot.name] = x.clone()
        poisoned[slot.name][:, t] = math.nan
        for out in as_tuple(layer(**poisoned)):
            if out.is_floating_point():
                assert torch.isfinite(out[:, :t]).all(), f"{name}: a NaN in '{slot.name}' at {t} reached earlier outputs"


@pytest.mark.parametrize("name", ["gla", "simple_gla", "gated_delta_rule"])
@pytest.mark.parametrize("repeat", [1, 2])
def test_half_inputs_reach_the_chunk_kernels_without_a_float32_copy(name, repeat, monkeypatch):
    """bf16 q, k and v go to the chunk kernels without the layer ever casting them to float32
    first (on a GPU such a copy is 6 bytes of HBM traffic per element, and a float32 tensor per
    input): `_Inputs` casts an input when it is first read, and the chunk fast path reads q, k
    and v as given. The chunk function is a stub here, so any float32 copy of their storage
    would be the layer's. The first call of a signature and a cached one (`_prepare_forward`)."""
    from psmc.runtime import chunkwise, delta

    def stub(q, k, v, *args, **kwargs):
        initial = kwargs.get("initial_state")
        lead, K, V = q.shape[:-1], k.shape[-1], v.shape[-1]
        state = torch.zeros(lead[0], *lead[2:], K, V) if initial is None else initial
        return torch.zeros(*lead, V), state
    monkeypatch.setattr(chunkwise, "chunk_linear_attention", stub)
    monkeypatch.setattr(delta, "chunk_delta_rule", stub)
    layer, inputs = build(name, batch=2, T=9, dtype=torch.float32)
    layer.backend = "torch"
    low = {n: (x.to(torch.bfloat16) if x.is_floating_point() else x) for n, x in inputs.items()}
    for _ in range(repeat):
        with Casts({n: low[n] for n in ("q", "k", "v")}) as casts:
            out = as_tuple(layer(**low))[0]
        assert out.dtype == torch.bfloat16
        assert casts.copies == [], casts.copies
    # the watch sees a cast where one is made: reading call.inputs casts
    with Casts({"q": low["q"]}) as casts:
        layer._prepare(low, step=False).inputs["q"]
    assert casts.copies == [("q", torch.float32)]


KEY_GATE = """
op key_gate[K, V] {
  state (a: f32[K], S: f32[K, V]);
  lift (k: f32[K], v: f32[V]) { return (exp(-(k * k)), outer(k, v)); }
  combine (l, r) { return (l.a * r.a, r.a[:, None] * l.S + r.S); }
  identity = (ones, zeros);
  readout (s, q: f32[K]) { return q @ s.S / sqrt(K); }
}
"""


def test_a_gate_computed_from_k_reads_k_cast_and_the_kernels_get_it_as_given(tmp_path, monkeypatch):
    """When the decay is computed from k too, the gate's body reads k cast to float32 (a bf16
    gate would lose digits), while the chunk kernels still get q, k and v as given: the only
    float32 copy among them is k's, and the output is the float32 computation rounded once."""
    from psmc.runtime import chunkwise
    path = tmp_path / "key_gate.psm"
    path.write_text(KEY_GATE)
    layer = psmc.load(path).__psmc_layers__["key_gate"](backend="torch")
    seen, before = [], []  # what reaches the chunk function; the copies made before it runs
    real = chunkwise.chunk_linear_attention
    monkeypatch.setattr(chunkwise, "chunk_linear_attention", lambda *a, **k: seen.append([t.dtype for t in a[:4]])
                        or before.append(list(casts.copies)) or real(*a, **k))
    gen = torch.Generator().manual_seed(3)
    wide = {"k": torch.randn(2, 7, 3, 4, generator=gen), "v": torch.randn(2, 7, 3, 5, generator=gen),
            "q": torch.randn(2, 7, 3, 4, generator=gen)}
    low = {n: x.to(torch.bfloat16) for n, x in wide.items()}
    with Casts(low) as casts:
        out = layer(**low)
    assert before[-1] == [("k", torch.float32)]
    assert seen[-1] == [torch.bfloat16] * 3 + [torch.float32]
    ref = layer(**{n: x.float() for n, x in low.items()})
    assert torch.equal(out, ref.to(torch.bfloat16))


@pytest.mark.parametrize("name", ["gla", "simple_gla", "gated_delta_rule"])
@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16])
def test_half_inputs_reach_the_chunk_kernels_uncast(name, half, monkeypatch):
    """The chunk fast paths hand bf16/fp16 q, k, v to chunk_linear_attention / chunk_delta_rule
    as they are (on a GPU: tensor-core dots on half operands, fp32 accumulation), decays and
    write strengths in fp32; the outputs are exactly the fp32 computation rounded once, and
    the gradients arrive in the inputs' dtype, close to fp32's."""
    from psmc.runtime import chunkwise, delta
    seen = []
    for module, fn in ((chunkwise, "chunk_linear_attention"), (delta, "chunk_delta_rule")):
        real = getattr(module, fn)
        monkeypatch.setattr(module, fn, lambda *a, real=real, **k: seen.append([t.dtype for t in a[:4]
                                                                                 if t is not None]) or real(*a, **k))
    layer, inputs = build(name, batch=2, T=9, dtype=torch.float32)
    layer.backend = "torch"
    low = {n: (x.to(half).requires_grad_() if x.is_floating_point() else x) for n, x in inputs.items()}
    out = as_tuple(layer(**low))[0]
    assert seen[-1][:3] == [half] * 3 and seen[-1][3:] == [torch.float32] * len(seen[-1][3:])
    wide = {n: (x.detach().float().requires_grad_() if x.is_floating_point() else x) for n, x in low.items()}
    ref = as_tuple(layer(**wide))[0]
    assert seen[-1] == [torch.float32] * len(seen[-1])
    assert out.dtype == half and torch.equal(out, ref.to(half))
    w = torch.randn(ref.shape)
    (out.float() * w).sum().backward()
    (ref * w).sum().backward()
    for n, x in low.items():
        if x.is_floating_point():
            assert x.grad.dtype == half, n
            torch.testing.assert_close(x.grad.float(), wide[n].grad, rtol=0.02, atol=0.02, msg=lambda m: f"d/d{n}: {m}")
