"""What the layer tests need to know about each example op, as a table.

- dim_sets: the dims a test may build the layer with (small: the tests run on 2 shared cores).
- kinds: how to draw an input whose values must respect a range (gates, normalised keys);
  every other float input is uniform in [-0.5, 0.5], which keeps products of many tokens
  bounded, and every bool input is true with probability 0.3.
- tree: whether the op is not associative, so the layer must use the paper's fixed tree
  (PAPER.md §3) rather than an exact scan.
- sequence_broadcast: inputs the example's comment documents as broadcast over batch AND time
  (`[1, 1, *lanes, ...]`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

EXAMPLES_DIR = Path(__file__).resolve().parents[2] / "examples"

KV = ({"K": 1, "V": 2}, {"K": 2, "V": 1}, {"K": 3, "V": 2})


@dataclass(frozen=True)
class Case:
    name: str
    dim_sets: tuple = ({},)
    kinds: dict = field(default_factory=dict)
    tree: bool = False
    sequence_broadcast: tuple = ()

    @property
    def path(self) -> Path:
        return EXAMPLES_DIR / f"{self.name}.psm"


CASES = {c.name: c for c in (
    Case("cumsum"),
    Case("delta_rule", KV, {"k": "unit_vector", "beta": "unit"}),
    Case("ema", tree=True),
    Case("gated_delta_product", KV, {"k1": "unit_vector", "k2": "unit_vector", "b1": "unit", "b2": "unit",
                                     "g": "log_gate"}),
    Case("gated_delta_rule", KV, {"k": "unit_vector", "beta": "unit", "g": "log_gate"}),
    Case("gla", KV, {"gk": "log_gate"}),
    Case("kda", KV, {"k": "unit_vector", "beta": "unit", "g": "log_gate"}),
    Case("linear_attention", KV),
    Case("linear_recurrence", kinds={"log_a": "log_gate"}),
    Case("mamba2", ({"N": 1, "P": 2}, {"N": 3, "P": 1}), {"dt": "positive", "A": "negative"},
         sequence_broadcast=("A", "D")),
    Case("logcumsumexp"),
    Case("mlstm", KV, {"f": "log_gate"}),
    Case("retention", KV, {"log_gamma": "log_gate"}, sequence_broadcast=("log_gamma",)),
    Case("running_argmax"),
    Case("rwkv6", KV, sequence_broadcast=("u",)),
    Case("rwkv7", KV, {"w": "log_gate"}),
    Case("segmented_sum"),
    Case("selective_ssm", ({"N": 1}, {"N": 3}), {"delta": "positive", "A": "negative"},
         sequence_broadcast=("A",)),
    Case("simple_gla", KV, {"g": "log_gate"}),
    Case("softmax_pool", ({"V": 1}, {"V": 3})),
    # D must be a multiple of the head count H.
    Case("transformer_psm", ({"C": 1, "D": 2, "H": 1}, {"C": 2, "D": 4, "H": 2}, {"C": 3, "D": 4, "H": 1}),
         tree=True),
    Case("tree_rnn", ({"D": 1}, {"D": 3}), tree=True),
    Case("welford"),
)}


def draw_values(kind: str, shape: tuple, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """Values of one input; `gen` makes them a function of the test's seed."""
    if dtype == torch.bool:
        return torch.rand(shape, generator=gen, dtype=torch.float64) < 0.3
    if not dtype.is_floating_point:
        return torch.randint(0, 5, shape, generator=gen, dtype=dtype)
    u = torch.rand(shape, generator=gen, dtype=torch.float64)
    if kind == "signed":
        x = u - 0.5
    elif kind == "log_gate":  # log of a gate in (exp(-0.5), 1]
        x = -0.5 * u
    elif kind == "unit":
        x = u
    elif kind == "positive":
        x = 0.05 + 0.45 * u
    elif kind == "negative":
        x = -(0.05 + 0.45 * u)
    elif kind == "unit_vector":  # keys l2-normalised along the declared axis, as the ops expect
        x = u - 0.5
        x = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-3)
    else:
        raise ValueError(f"unknown value kind {kind!r}")
    return x.to(dtype)
