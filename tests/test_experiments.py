"""Smoke tests for examples/experiments: data generators, model budgets, and the quick modes of
the S5 and streaming experiments (marked slow; together well under three minutes)."""
import itertools
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # examples/ is not an installed package; it lives next to tests/
    sys.path.insert(0, str(ROOT))

from examples.experiments import data, models, s5, streaming  # noqa: E402
from examples.experiments.train import TrainConfig, train  # noqa: E402


def compose(perms):
    """Apply the permutations left to right, by hand (independent of data.S5_TABLE)."""
    state = list(range(5))
    for perm in perms:
        state = [perm[state[p]] for p in range(5)]
    return tuple(state)


def test_s5_labels_are_running_compositions():
    tokens, labels = data.group_batch(data.S5, 4, 9, torch.Generator().manual_seed(3))
    for row in range(4):
        perms = [data.S5.elements[t] for t in tokens[row].tolist()]
        for t in range(9):
            assert data.S5.elements[labels[row, t]] == compose(perms[:t + 1])


@pytest.mark.parametrize("group", [data.S5, data.S3])
def test_group_tables_are_non_abelian_group_products(group):
    table, n = group.table, group.size
    identity = group.elements.index(tuple(range(len(group.elements[0]))))
    assert torch.equal(table[identity], torch.arange(n)) and torch.equal(table[:, identity], torch.arange(n))
    assert not torch.equal(table, table.T)
    for a, b, c in itertools.islice(itertools.product(range(0, n, max(1, n // 17)), repeat=3), 500):
        assert table[table[a, b], c] == table[a, table[b, c]]


def test_mqar_queries_ask_for_the_bound_values():
    spec = data.MQARSpec(vocab=64, pairs=4)
    tokens, labels = data.mqar_batch(spec, 3, 40, torch.Generator().manual_seed(0))
    for row in range(3):
        keys, values = tokens[row, 0:8:2].tolist(), tokens[row, 1:8:2].tolist()
        assert len(set(keys)) == 4 and all(1 <= k < 32 for k in keys) and all(32 <= v < 64 for v in values)
        asked = (labels[row] != data.IGNORE).nonzero().flatten().tolist()
        assert len(asked) == 4 and min(asked) >= 8
        assert sorted(tokens[row, asked].tolist()) == sorted(keys)
        for position in asked:
            assert labels[row, position] == values[keys.index(tokens[row, position].item())]


def test_mqar_rejects_a_length_with_no_room_for_queries():
    with pytest.raises(ValueError):
        data.mqar_batch(data.MQARSpec(pairs=8), 1, 20, torch.Generator())


def test_text_batches_predict_the_next_byte():
    stream = torch.arange(1000) % 256
    tokens, labels = data.text_batch(stream, 5, 32, torch.Generator().manual_seed(1))
    assert tokens.shape == labels.shape == (5, 32)
    assert torch.equal(labels[:, :-1], tokens[:, 1:]) and torch.equal(labels[:, -1], (tokens[:, -1] + 1) % 256)


def test_stdlib_corpus_is_found_and_split():
    corpus = data.load_text(300_000)
    assert len(corpus.train) > 100_000 and len(corpus.valid) > 5_000
    assert corpus.train.max() < 256 and corpus.ascii_fraction > 0.9


def test_models_share_one_parameter_budget():
    counts = {kind: models.non_embedding_params(models.build_model(kind, 256, **({"C": 8} if kind == "tpsm" else {})))
              for kind in models.MODEL_CONFIGS}
    reference = counts["tpsm"]
    for kind, count in counts.items():
        assert abs(count / reference - 1) <= 0.2, (kind, count, reference)
    for config in models.MODEL_CONFIGS.values():
        assert 64 <= config["D"] <= 128 and 1 <= config["layers"] <= 2


@pytest.mark.parametrize("kind", ["tpsm", "transformer", "gla", "mamba"])
def test_models_are_causal(kind):
    torch.manual_seed(0)
    model = models.build_model(kind, 50, **({"C": 4} if kind == "tpsm" else {})).eval()
    tokens = torch.randint(0, 50, (2, 11))
    changed = tokens.clone()
    changed[:, 7:] = (changed[:, 7:] + 1) % 50
    with torch.no_grad():
        assert torch.allclose(model(tokens)[:, :7], model(changed)[:, :7], atol=1e-5)
        assert not torch.allclose(model(tokens)[:, 7:], model(changed)[:, 7:], atol=1e-3)


@pytest.mark.parametrize("name", ["tpsm_c1", "tpsm_c3", "transformer"])
def test_briefly_trained_model_streams_its_parallel_logits(name):
    torch.manual_seed(0)
    model = streaming.build(name).train()
    gen = torch.Generator().manual_seed(0)
    train(model, lambda step: data.text_batch(torch.randint(0, 256, (4000,), generator=gen), 4, 16, gen),
          TrainConfig(steps=8, lr=3e-3, warmup=2), desc=f"train {name}")
    model.eval()
    # 23 tokens: seven full chunks of 3 plus a partial one; 23 = 0b10111 exercises four counter levels.
    mismatch = streaming.check_stream(model, 23, torch.Generator().manual_seed(1))
    assert mismatch < 1e-4


@pytest.mark.slow
def test_s5_quick_mode_learns(tmp_path):
    results = s5.main(["--quick", "--out", str(tmp_path)])["S5"]
    assert set(results) == {"tpsm", "transformer", "mamba"}
    for kind, result in results.items():
        losses = result["losses"]
        assert sum(losses[-20:]) / 20 < sum(losses[:20]) / 20 - 0.05, kind
    assert (tmp_path / "s5.md").exists() and (tmp_path / "s5_accuracy.png").stat().st_size > 1000


@pytest.mark.slow
def test_streaming_quick_mode(tmp_path):
    results = streaming.main(["--quick", "--out", str(tmp_path)])
    kv_bytes = results["transformer"]["nbytes"]
    for name, result in results.items():
        assert result["max_abs_step_vs_parallel"] < 1e-4, name
    # The KV cache grows with every token; the Transformer-PSM state holds O(log n) chunk roots.
    assert kv_bytes[-1] == len(kv_bytes) * kv_bytes[0]
    for name in ("tpsm_c1", "tpsm_c32"):
        assert max(results[name]["nbytes"]) < kv_bytes[-1] / 4
    assert (tmp_path / "streaming_latency.png").exists() and "max abs diff" in (tmp_path / "streaming.md").read_text()
