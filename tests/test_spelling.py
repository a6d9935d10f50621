"""Spelling invariance (issue 10, acceptance): every spelling of one recurrence in
tests/spellings/<family>.psm gets the same plan in `psmc check --json` (plan, structure,
class, fast_path, backends, implementations, stream state) and the same outputs.

Outputs are compared in float64 against the family's first spelling (rtol 1e-10: spellings
that canonicalise to one IR are bitwise equal; others may differ by reassociated roundings,
e.g. `/ sqrt(K)` against `* K ** -0.5`) and against the generic scan of the same layer."""
import json
from pathlib import Path

import pytest
import torch

import psmc
from psmc.cli import main

HERE = Path(__file__).resolve().parent / "spellings"
FAMILIES = sorted(p.stem for p in HERE.glob("*.psm"))
PLAN_KEYS = ("plan", "structure", "class", "fast_path", "backends", "implementations", "state_size", "triton", "cpu")
DIMS = {"K": 3, "V": 2, "N": 4}
B, T, H = 2, 11, 2


@pytest.fixture(scope="module")
def records():
    """`psmc check --json` over every spelling file, one run: family -> records."""
    import contextlib
    import io
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        status = main(["check", "--json", *map(str, sorted(HERE.glob("*.psm")))])
    assert status == 0
    by_family: dict = {}
    for r in json.loads(out.getvalue()):
        by_family.setdefault(Path(r["file"]).stem, []).append(r)
    return by_family


def test_the_families(records):
    assert set(FAMILIES) == {"gla", "simple_gla", "selective_ssm", "delta_rule", "gated_delta_rule",
                             "linear_attention", "rwkv6", "mlstm", "rwkv7", "kda"}
    for family in ("gla", "simple_gla", "selective_ssm", "delta_rule"):
        assert len(records[family]) >= 5, family
    assert all(len(records[f]) >= 5 for f in FAMILIES)


@pytest.mark.parametrize("family", FAMILIES)
def test_one_plan_per_family(records, family):
    first = records[family][0]
    for r in records[family][1:]:
        for key in PLAN_KEYS:
            assert r[key] == first[key], f"{family}: {r['op']} has {key} = {r[key]!r}, {first['op']} has {first[key]!r}"


def test_the_plans_are_the_fast_ones(records):
    """What each family is (so a regression to the generic scan cannot hide in 'all equal')."""
    want = {"gla": ("decayed-linear-attention", "chunkwise:key"),
            "simple_gla": ("decayed-linear-attention", "chunkwise:scalar"),
            "linear_attention": ("decayed-linear-attention", "chunkwise:none"),
            "selective_ssm": ("first-order", "first_order"),
            "rwkv6": ("decayed-linear-attention", "chunkwise:key"),  # the exclusive readout reads S_{t-1}
            "mlstm": ("decayed-linear-attention", "chunkwise:scalar"),  # C and n: one pass, the readout on the reads
            "delta_rule": ("identity-plus-low-rank", "delta_rule"),
            "gated_delta_rule": ("identity-plus-low-rank", "delta_rule"),
            "rwkv7": ("diagonal-plus-low-rank", "dplr"),
            "kda": ("diagonal-plus-low-rank", "dplr")}
    for family, (cls, fast) in want.items():
        r = records[family][0]
        assert (r["class"]["name"], r["fast_path"]) == (cls, fast), family
    assert records["delta_rule"][0]["state_size"] == "(K*V) floats"
    assert records["gla"][0]["backends"]["forward"] == ["torch", "triton"]


def _inputs(layer, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for slot in layer.spec.inputs:
        shape = tuple(int(s) for s in slot.shape(DIMS))
        x = torch.randn((B, T, H) + shape, generator=g, dtype=torch.float64)
        if slot.name in ("k",):
            x = torch.nn.functional.normalize(x, dim=-1)
        if slot.name in ("beta",):
            x = torch.sigmoid(x)
        if slot.name in ("a", "b"):  # (rank-one terms: 1 + a^T b stays near 1)
            x = 0.3 * x
        if slot.name in ("g", "gk", "delta", "w"):
            x = -torch.nn.functional.softplus(x) if slot.name != "delta" else torch.nn.functional.softplus(x)
        out[slot.name] = x
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_one_output_per_family(family):
    module = psmc.load(HERE / f"{family}.psm")
    names = list(module.__psmc_layers__)
    dims = {d: DIMS[d] for d in module.__psmc_layers__[names[0]].spec.dims}
    first = module.__psmc_layers__[names[0]](**dims)
    inputs = _inputs(first, 0)
    want = first(**inputs)
    for name in names:
        layer = module.__psmc_layers__[name](**dims)
        got = layer(**inputs)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12, msg=f"{family}: {name} != {names[0]}")
        layer.use_fast_path = False
        torch.testing.assert_close(layer(**inputs), want, rtol=1e-10, atol=1e-12,
                                   msg=f"{family}: {name}'s generic scan != {names[0]}")
