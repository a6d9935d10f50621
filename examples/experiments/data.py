"""Synthetic and real-text data for the experiments. Every generator takes a torch.Generator
so a run is reproducible from its seed."""
from __future__ import annotations

import itertools
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch

IGNORE = -100  # label value that the loss and the accuracy skip

# ---------------------------------------------------------------- S5 (and S3) state tracking

@dataclass(frozen=True)
class PermutationGroup:
    """The symmetric group on `items` items: token id = index into `elements`."""

    name: str
    elements: tuple[tuple[int, ...], ...]
    table: torch.Tensor  # table[a, b] = the permutation 'apply a, then b'

    @property
    def size(self) -> int:
        return len(self.elements)

    @staticmethod
    def symmetric(items: int) -> "PermutationGroup":
        elements = tuple(itertools.permutations(range(items)))
        index = {perm: i for i, perm in enumerate(elements)}
        table = torch.tensor([[index[tuple(b[a[p]] for p in range(items))] for b in elements] for a in elements])
        return PermutationGroup(f"S{items}", elements, table)


S5 = PermutationGroup.symmetric(5)  # 120 elements, the paper's task
S3 = PermutationGroup.symmetric(3)  # 6 elements: the smallest non-abelian group, a scaled-down proxy


def group_batch(group: PermutationGroup, batch: int, length: int, gen: torch.Generator):
    """Random group elements and, at every position, the composition of all of them so far
    (so labels fold left to right)."""
    tokens = torch.randint(0, group.size, (batch, length), generator=gen)
    labels = torch.empty_like(tokens)
    labels[:, 0] = tokens[:, 0]
    for t in range(1, length):
        labels[:, t] = group.table[labels[:, t - 1], tokens[:, t]]
    return tokens, labels


# ---------------------------------------------------------------- MQAR (Zoology-style)

@dataclass(frozen=True)
class MQARSpec:
    vocab: int = 512  # token 0 is the filler; keys from [1, vocab/2), values from [vocab/2, vocab)
    pairs: int = 8


def mqar_batch(spec: MQARSpec, batch: int, length: int, gen: torch.Generator):
    """k key-value pairs, then filler with every key asked once at uniformly placed positions.
    The label at a query position is the value bound to that key; all other labels are IGNORE."""
    half, k = spec.vocab // 2, spec.pairs
    if length < 3 * k:
        raise ValueError(f"length {length} leaves no room for {k} pairs and {k} queries")
    keys = torch.stack([torch.randperm(half - 1, generator=gen)[:k] + 1 for _ in range(batch)])
    values = torch.randint(half, spec.vocab, (batch, k), generator=gen)
    tokens = torch.zeros(batch, length, dtype=torch.long)
    labels = torch.full((batch, length), IGNORE, dtype=torch.long)
    tokens[:, 0:2 * k:2], tokens[:, 1:2 * k:2] = keys, values
    gap = length - 2 * k
    for row in range(batch):
        slots = torch.randperm(gap, generator=gen)[:k] + 2 * k
        order = torch.randperm(k, generator=gen)
        tokens[row, slots] = keys[row, order]
        labels[row, slots] = values[row, order]
    return tokens, labels


# ---------------------------------------------------------------- real text (bytes)

def stdlib_source_files() -> list[Path]:
    """The Python standard library's own .py files: real text nobody here wrote, always offline."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts)


@dataclass(frozen=True)
class TextCorpus:
    train: torch.Tensor  # 1-D long tensor of byte values
    valid: torch.Tensor
    source: str
    ascii_fraction: float

    VOCAB = 256


def load_text(max_bytes: int, text_file: Path | None = None) -> TextCorpus:
    """Bytes of `text_file`, or of stdlib sources; every 10th file (or the last 10 %) is held out."""
    if text_file is not None:
        data = text_file.read_bytes()[:max_bytes]
        cut = int(len(data) * 0.9)
        train, valid, source = data[:cut], data[cut:], str(text_file.name)
    else:
        train_parts, valid_parts, total = [], [], 0
        for i, path in enumerate(stdlib_source_files()):
            blob = path.read_bytes()
            (valid_parts if i % 10 == 9 else train_parts).append(blob)
            total += len(blob)
            if total >= max_bytes:
                break
        train, valid = b"\n".join(train_parts), b"\n".join(valid_parts)
        source = "Python standard library sources (sysconfig stdlib path)"
    as_tensor = lambda b: torch.frombuffer(bytearray(b), dtype=torch.uint8).long()
    ascii_fraction = sum(byte < 128 for byte in train[:200_000]) / max(1, min(len(train), 200_000))
    return TextCorpus(as_tensor(train), as_tensor(valid), source, ascii_fraction)


def text_batch(stream: torch.Tensor, batch: int, length: int, gen: torch.Generator):
    """Random windows: inputs are bytes t..t+L-1, labels the next bytes."""
    starts = torch.randint(0, len(stream) - length - 1, (batch,), generator=gen)
    windows = torch.stack([stream[s:s + length + 1] for s in starts.tolist()])
    return windows[:, :-1], windows[:, 1:]
