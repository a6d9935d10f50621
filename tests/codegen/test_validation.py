"""Bad calls fail at the call with a clear ValueError/TypeError that names the input and shows
what was expected and what was given (issue 4, item 4)."""
from __future__ import annotations

import pytest
import torch

import psmc

from layer_harness import layer_class

B, T, H, K, V = 2, 5, 3, 2, 4


def shows(message: str, shape) -> bool:
    """Whether `message` shows `shape`, as a tuple or as a list."""
    shape = tuple(shape)
    return str(shape) in message or str(list(shape)) in message


def gla_inputs(**changes):
    g = torch.Generator().manual_seed(0)
    inputs = {
        "k": torch.rand(B, T, H, K, generator=g), "v": torch.rand(B, T, H, V, generator=g),
        "gk": -torch.rand(B, T, H, K, generator=g), "q": torch.rand(B, T, H, K, generator=g),
    }
    inputs.update(changes)
    return inputs


@pytest.fixture(scope="module")
def gla():
    return layer_class("gla")(K=K, V=V)


def test_missing_input_is_named(gla):
    inputs = gla_inputs()
    del inputs["q"]
    with pytest.raises(TypeError, match=r"missing input q\b") as err:
        gla(**inputs)
    assert "k, v, gk, q" in str(err.value)  # and what the op takes


def test_unexpected_input_is_named(gla):
    with pytest.raises(TypeError, match=r"unexpected input z\b"):
        gla(**gla_inputs(z=torch.zeros(B, T, H, K)))


def test_wrong_trailing_shape_names_the_input_and_both_shapes(gla):
    q = torch.rand(B, T, H, K + 1)
    with pytest.raises(ValueError, match=r"'q'") as err:
        gla(**gla_inputs(q=q))
    message = str(err.value)
    assert shows(message, q.shape) or shows(message, (K + 1,)), message
    assert shows(message, (K,)), message


def test_trailing_shapes_that_disagree_with_each_other(gla):
    """No constructor dims: K is bound from k, and q disagrees with it."""
    layer = layer_class("gla")()
    v = torch.rand(B, T, H, V + 2)
    inputs = gla_inputs(v=v)
    assert layer(**inputs).shape == (B, T, H, V + 2)  # V bound from v
    q = torch.rand(B, T, H, K + 2)
    with pytest.raises(ValueError, match=r"'q'") as err:
        layer(**gla_inputs(q=q))
    message = str(err.value)
    assert shows(message, q.shape) or shows(message, (K + 2,)), message
    assert shows(message, (K,)), message


def test_wrong_trailing_shape_of_a_chunk_input():
    layer = layer_class("transformer_psm")(C=2, D=4, H=2)
    x = torch.rand(1, 5, 3)
    with pytest.raises(ValueError, match=r"'x'") as err:
        layer(x=x)
    message = str(err.value)
    assert shows(message, x.shape) or shows(message, (3,)), message
    assert shows(message, (4,)), message


def test_too_few_axes_names_the_input_and_its_shape(gla):
    k = torch.rand(B, K)
    with pytest.raises(ValueError, match=r"'k'") as err:
        gla(**gla_inputs(k=k))
    assert shows(str(err.value), k.shape)


def test_mismatched_lanes_name_both_inputs_and_shapes(gla):
    v = torch.rand(B, T, H + 1, V)
    with pytest.raises(ValueError, match="broadcast") as err:
        gla(**gla_inputs(v=v))
    message = str(err.value)
    assert "k" in message and "v" in message
    assert shows(message, (B, T, H)) and shows(message, (B, T, H + 1)), message


def test_lanes_of_size_one_broadcast(gla):
    """The counterpart of the previous test: size 1 is not a mismatch."""
    inputs = gla_inputs(gk=-torch.rand(B, T, 1, K))
    full = gla_inputs(gk=inputs["gk"].expand(B, T, H, K))
    torch.testing.assert_close(gla(**inputs), gla(**full), rtol=0, atol=0)


def test_time_axes_that_disagree(gla):
    with pytest.raises(ValueError, match=r"\bv\b") as err:
        gla(**gla_inputs(v=torch.rand(B, T - 1, H, V)))
    message = str(err.value)
    assert (shows(message, (B, T, H)) and shows(message, (B, T - 1, H))) or \
        ("T=5" in message and "T=4" in message), message


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool])
def test_wrong_dtype_names_the_input_and_both_types(gla, dtype):
    k = torch.zeros(B, T, H, K, dtype=dtype)
    with pytest.raises(TypeError, match=r"'k'") as err:
        gla(**gla_inputs(k=k))
    assert "f32" in str(err.value) and str(dtype) in str(err.value)


def test_float_for_a_bool_input():
    layer = layer_class("segmented_sum")()
    x = torch.rand(B, T)
    with pytest.raises(TypeError, match=r"'start'") as err:
        layer(x=x, start=torch.rand(B, T))
    assert "bool" in str(err.value) and "float32" in str(err.value)


def test_not_a_tensor(gla):
    with pytest.raises(TypeError, match=r"'q'.*list"):
        gla(**gla_inputs(q=[[0.0] * K]))


def test_empty_sequence(gla):
    inputs = {n: x[:, :0] for n, x in gla_inputs().items()}
    with pytest.raises(ValueError, match=r"T = 0"):
        gla(**inputs)


def test_state_of_another_kind_of_scan(gla):
    tree_state = layer_class("tree_rnn")(D=2).init_state()
    with pytest.raises(TypeError, match="gla"):
        gla(**gla_inputs(), state=tree_state)


def test_nan_from_finite_inputs_is_reported_with_the_op_name(gla):
    """exp(gk) overflows to inf and meets a zero key: inf * 0 = NaN inside the state."""
    inputs = gla_inputs(gk=torch.full((B, T, H, K), 1000.0), k=torch.zeros(B, T, H, K))
    with pytest.raises((FloatingPointError, ValueError), match="gla"):
        gla(**inputs)


def test_a_repeated_signature_runs_the_same_checks_and_casts():
    """forward prepares each input signature once (`_prepare_forward`): later calls with that
    signature give what a fresh layer gives (lane padding, broadcast lanes, float64, half
    inputs), and a bad call after good ones is still refused with the full message."""
    layer, fresh = layer_class("gla")(K=K, V=V), layer_class("gla")(K=K, V=V)
    g = torch.Generator().manual_seed(1)
    calls = [gla_inputs(gk=-torch.rand(B, T, 1, K, generator=g)),  # a lane of size 1
             gla_inputs(),
             {n: x.double() for n, x in gla_inputs().items()},  # computes in float64
             {n: x.to(torch.bfloat16) for n, x in gla_inputs().items()},  # fp32 inside, bf16 out
             {n: x[:, :, 0] for n, x in gla_inputs().items()}]  # no lane axis: padded to one lane
    for _ in range(2):
        for inputs in calls:
            inputs = {n: x + 0.01 * torch.rand(x.shape, generator=g).to(x.dtype) for n, x in inputs.items()}
            got = layer(**inputs)
            fresh._step_cache.clear()  # (a layer that prepares every call afresh)
            want = fresh(**inputs)
            assert got.dtype == want.dtype and got.shape == want.shape
            torch.testing.assert_close(got, want, rtol=0, atol=0)
    bad = gla_inputs()
    bad["q"] = torch.rand(B, T, H, K + 1)
    with pytest.raises(ValueError, match=r"input 'q' should end in shape"):
        layer(**bad)
    with pytest.raises(TypeError, match=r"missing input q\b"):
        layer(**{n: x for n, x in gla_inputs().items() if n != "q"})



def test_an_op_without_inputs_says_so_instead_of_crashing(tmp_path):
    """An op whose lift and readout take no inputs compiles, but nothing gives a call's batch
    and time axes (a fuzz reduction crashed with `max() arg is an empty sequence`)."""
    path = tmp_path / "no_inputs.psm"
    path.write_text("op no_inputs[K] { state (E: f32[K, K]); lift () { return eye(K); } "
                    "combine (l, r) { return r.E @ l.E; } }")
    layer = psmc.load(path).no_inputs(K=2)
    for call in (lambda: layer(), lambda: layer.step(layer.init_state())):
        with pytest.raises(TypeError, match=r"no_inputs declares no inputs, so no call can give its batch and time "
                                            r"axes: declare an input in its lift or readout"):
            call()
