"""Stream states: pushes agree with the parallel passes; .to, nbytes, save/load, detach."""

import pytest
import torch

from psmc.runtime.scan import exact_scan
from psmc.runtime.state import ChunkStream, ScanState, TreeState
from psmc.runtime.tree import tree_scan


def affine(l, r):
    return (l[0] * r[0], r[0] * l[1] + r[1])


def agg(l, r):  # non-associative, two fields
    return (torch.tanh(1.3 * l[0] - 0.7 * r[0] + 0.1), torch.sin(l[1] - 2.0 * r[1]))


def leaves(T, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(2, T, 3, generator=g) + 0.5, torch.randn(2, T, 3, generator=g))


def step(x, t):
    return tuple(f[:, t] for f in x)


def pushed_scan(x, n):
    state = ScanState.empty()
    for t in range(n):
        state = state.push(step(x, t), affine)
    return state


def pushed_tree(x, n):
    state = TreeState.empty()
    for t in range(n):
        state = state.push(step(x, t), agg)
    return state


def assert_elements_close(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


def assert_same_tree(got, want):
    assert got.size == want.size
    for table in ("roots", "folds"):
        for g, w in zip(getattr(got, table), getattr(want, table), strict=True):
            assert (g is None) == (w is None)
            if g is not None:
                assert_elements_close(g, w)


def test_scan_state_push_matches_exact_scan():
    x = leaves(9)
    calls = []
    state = ScanState.empty()
    for t in range(9):
        state = state.push(step(x, t), lambda l, r: calls.append(1) or affine(l, r))
    assert len(calls) == 8 and state.size == 9
    assert_elements_close(state.prefix, step(exact_scan(x, affine), 8))
    # advanced(): the state after a parallel pass continues like pushing
    head = ScanState.empty().advanced(exact_scan(step_range(x, 0, 4), affine))
    tail = exact_scan(step_range(x, 4, 9), affine, carry=head.prefix)
    assert_elements_close(head.advanced(tail).prefix, state.prefix)
    assert head.advanced(tail).size == 9


def step_range(x, lo, hi):
    return tuple(f[:, lo:hi] for f in x)


def test_tree_state_push_matches_tree_scan_state():
    x = leaves(13)
    pushed = pushed_tree(x, 13)
    inclusive, _, scanned = tree_scan(x, agg)
    assert_same_tree(scanned, pushed)
    assert_elements_close(pushed.prefix, step(inclusive, 12))
    assert TreeState.empty().prefix is None


def test_tree_state_rejects_a_root_without_fold():
    root = (torch.zeros(1), torch.zeros(1))
    with pytest.raises(ValueError, match="fold"):
        TreeState(count=1, roots=(root,), folds=(None,))
    with pytest.raises(ValueError, match="levels"):
        TreeState(count=1, roots=(root,), folds=())


def chunk_stream(x, n_tree=5, filled=2):
    stream = ChunkStream.empty(pushed_tree(x, n_tree), {"k": torch.zeros(2, 3), "pos": torch.zeros(2, dtype=torch.int64)}, chunk=4)
    for t in range(filled):
        stream = stream.append({"k": x[1][:, t], "pos": torch.full((2,), t)})
    return stream


def all_states():
    x = leaves(6)
    return {"scan": pushed_scan(x, 6), "tree": pushed_tree(x, 6), "chunk": chunk_stream(x)}


def tensors_of(state):
    return state.tensors()


@pytest.mark.parametrize("kind", ["scan", "tree", "chunk"])
def test_to_moves_every_tensor_and_casts_only_floats(kind):
    state = all_states()[kind]
    doubled = state.to(dtype=torch.float64)
    assert type(doubled) is type(state) and doubled is not state
    for before, after in zip(tensors_of(state), tensors_of(doubled), strict=True):
        want = torch.float64 if before.is_floating_point() else before.dtype
        assert after.dtype == want
        torch.testing.assert_close(after, before.to(want))
    # meta tensors stand in for another device on a CPU-only machine
    moved = state.to(device="meta")
    assert all(t.device.type == "meta" for t in tensors_of(moved))
    assert moved.nbytes == state.nbytes


def test_nbytes_counts_each_tensor_once():
    x = leaves(6)  # fields are [2, 3] float32 steps: 24 bytes each
    assert ScanState.empty().nbytes == 8  # the int64 count
    assert pushed_scan(x, 6).nbytes == 8 + 2 * 24
    # 6 = 0b110: roots at levels 1 and 2. Level 2's fold IS its root (nothing older to fold),
    # so it is held once: roots 2 x 2 fields + one distinct fold x 2 fields.
    tree = pushed_tree(x, 6)
    assert tree.folds[2] is tree.roots[2]
    assert tree.nbytes == 8 + 6 * 24
    stream = chunk_stream(x)
    assert stream.nbytes == tree.nbytes + 2 * 4 * 3 * 4 + 2 * 4 * 8 + 8


@pytest.mark.parametrize("kind", ["scan", "tree", "chunk"])
def test_save_load_round_trip(kind, tmp_path):
    state = all_states()[kind]
    path = tmp_path / f"{kind}.pt"
    torch.save(state, path)
    loaded = torch.load(path, weights_only=False)
    assert type(loaded) is type(state)
    for before, after in zip(tensors_of(state), tensors_of(loaded), strict=True):
        assert torch.equal(before, after) and before.dtype == after.dtype
    assert loaded.nbytes == state.nbytes


def test_loaded_tree_state_continues_like_the_original(tmp_path):
    x = leaves(11)
    torch.save(pushed_tree(x, 6), tmp_path / "tree.pt")
    loaded = torch.load(tmp_path / "tree.pt", weights_only=False)
    _, _, continued = tree_scan(step_range(x, 6, 11), agg, state=loaded)
    assert_same_tree(continued, pushed_tree(x, 11))


@pytest.mark.parametrize("kind", ["scan", "tree", "chunk"])
def test_detach_cuts_the_graph(kind):
    x = tuple(f.clone().requires_grad_() for f in leaves(6))
    state = {"scan": pushed_scan(x, 6), "tree": pushed_tree(x, 6), "chunk": chunk_stream(x)}[kind]
    assert any(t.requires_grad for t in tensors_of(state))
    detached = state.detach()
    assert not any(t.requires_grad for t in tensors_of(detached))
    assert any(t.requires_grad for t in tensors_of(state))  # the original is untouched


def test_chunk_stream_fills_completes_and_restarts():
    x = leaves(6)
    stream = chunk_stream(x, filled=0)
    assert stream.chunk == 4 and stream.size == 0 and not stream.is_complete
    for t in range(4):
        stream = stream.append({"k": x[1][:, t], "pos": torch.full((2,), t)})
        assert stream.size == t + 1
        torch.testing.assert_close(stream.tokens("k"), x[1][:, : t + 1])
    assert stream.is_complete
    assert torch.equal(stream.tokens("pos"), torch.arange(4).expand(2, 4))
    with pytest.raises(ValueError, match="complete"):
        stream.append({"k": x[1][:, 0], "pos": torch.zeros(2, dtype=torch.int64)})
    pushed = stream.inner.push(step(x, 0), agg)
    fresh = stream.restart(pushed)
    assert fresh.inner is pushed and fresh.size == 0 and fresh.chunk == 4
    assert not any(t.any() for t in fresh.buffer.values())


def test_chunk_stream_append_keeps_gradients_and_checks_names():
    k = torch.randn(2, 3, requires_grad=True)
    stream = ChunkStream.empty(ScanState.empty(), {"k": torch.zeros(2, 3)}, chunk=2).append({"k": k})
    stream.tokens("k").sum().backward()
    torch.testing.assert_close(k.grad, torch.ones(2, 3))
    with pytest.raises(ValueError, match="names"):
        stream.append({"q": k})
