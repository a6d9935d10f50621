"""Stream states of generated layers: saved and loaded mid-stream they continue identically;
`.nbytes` counts what they hold; a tree-scan state holds one root per set bit of the leaf
count, so at most ceil(log2(n + 1)) of them; `.to()` converts float tensors only."""
from __future__ import annotations

import io
import math

import pytest
import torch

from layer_cases import CASES
from layer_harness import as_tuple, layer_class, make_inputs, stream, time_slice, tree_roots

# op, dims, T, split: an exact scan, a tree scan and a chunk op split inside a chunk.
MID_STREAM = [
    ("gla", {"K": 2, "V": 3}, 11, 6),
    ("tree_rnn", {"D": 3}, 11, 6),
    ("transformer_psm", {"C": 3, "D": 4, "H": 2}, 11, 7),
]


def layer_and_inputs(name, dims, T, lanes=(2,)):
    cls = layer_class(name)
    torch.manual_seed(0)
    layer = cls(**dims).double()
    broadcast = tuple((False,) for _ in cls.spec.inputs)
    return layer, make_inputs(cls, dims, 2, T, lanes, broadcast, seed=3, kinds=CASES[name].kinds)


def saved_and_loaded(state, **load_options):
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, **load_options)


@pytest.mark.parametrize("name, dims, T, mid", MID_STREAM)
def test_a_saved_state_continues_identically(name, dims, T, mid):
    layer, inputs = layer_and_inputs(name, dims, T)
    _, state = layer(**time_slice(inputs, 0, mid), return_state=True)
    loaded = saved_and_loaded(state, weights_only=False)
    assert type(loaded) is type(state) and loaded.size == state.size and loaded.nbytes == state.nbytes
    rest = time_slice(inputs, mid, T)
    for got, want in zip(as_tuple(layer(**rest, state=loaded)), as_tuple(layer(**rest, state=state))):
        assert torch.equal(got, want)
    stepped, _ = stream(layer, inputs, loaded, mid, T)
    for got, want in zip(stepped, stream(layer, inputs, state, mid, T)[0]):
        assert torch.equal(got, want)


@pytest.mark.parametrize("name, dims, T, mid", MID_STREAM)
def test_a_state_loads_with_torch_load_defaults(name, dims, T, mid):
    """torch.load's default (weights_only=True since torch 2.6) must accept a psmc state: a
    user saving a stream and loading it back writes exactly this."""
    layer, inputs = layer_and_inputs(name, dims, T)
    _, state = layer(**time_slice(inputs, 0, mid), return_state=True)
    loaded = saved_and_loaded(state)
    rest = time_slice(inputs, mid, T)
    for got, want in zip(as_tuple(layer(**rest, state=loaded)), as_tuple(layer(**rest, state=state))):
        assert torch.equal(got, want)


@pytest.mark.parametrize("T", [3, 40])
def test_exact_scan_state_bytes_do_not_grow_with_the_sequence(T):
    B, H, K, V = 2, 2, 2, 3
    layer, inputs = layer_and_inputs("gla", {"K": K, "V": V}, T, lanes=(H,))
    _, state = layer(**inputs, return_state=True)
    # the prefix's S: [B, H, K, V] in float64 (the decay product `a` is dead in a stream), and
    # the int64 token count
    assert state.nbytes == 8 * (B * H * K * V) + 8
    assert state.to(dtype=torch.float32).nbytes == 4 * (B * H * K * V) + 8


def test_to_converts_floats_and_keeps_the_count():
    layer, inputs = layer_and_inputs("tree_rnn", {"D": 3}, 7)
    _, state = layer(**inputs, return_state=True)
    moved = state.to(dtype=torch.float32)
    tensors = moved.tensors()
    assert tensors and all(t.dtype in (torch.float32, torch.int64) for t in tensors)
    assert moved.size == 7 and tree_roots(moved) == tree_roots(state) == 3


def test_tree_state_roots_and_bytes_for_every_length():
    B, D = 2, 3
    layer, inputs = layer_and_inputs("tree_rnn", {"D": D}, 70, lanes=())
    state = layer.init_state(batch_shape=(B,))
    root_bytes = B * D * 8
    for n in range(1, 71):
        _, state = stream(layer, inputs, state, n - 1, n)
        _, parallel = layer(**time_slice(inputs, 0, n), return_state=True)
        for s, how in ((state, "streamed"), (parallel, "parallel")):
            roots = tree_roots(s)
            assert roots == bin(n).count("1") <= math.ceil(math.log2(n + 1)), f"{how}, n={n}: {roots} roots"
            # each root, its cached fold (possibly the same tensor), and the int64 count
            assert roots * root_bytes + 8 <= s.nbytes <= 2 * roots * root_bytes + 8, f"{how}, n={n}"


def test_chunk_state_holds_complete_chunks_in_the_tree_and_the_rest_in_a_buffer():
    C, D = 3, 4
    layer, inputs = layer_and_inputs("transformer_psm", {"C": C, "D": D, "H": 2}, 11, lanes=())
    _, state = layer(**inputs, return_state=True)
    assert state.inner.size == 11 // C and state.size == 11 % C
    assert tree_roots(state) == bin(11 // C).count("1")
    buffer_bytes = 2 * C * D * 8  # [B, C, D] float64, whatever is filled
    assert state.nbytes >= buffer_bytes + tree_roots(state) * 2 * C * D * 8
