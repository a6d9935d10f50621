"""Shared by the Triton test files: the DESIGN.md tolerance check, and the generated layer
class of an example through the real pipeline (`psmc.load`: analysis, plan, Triton section).

Import this after setting TRITON_INTERPRET=1 (the test modules do that first)."""
from __future__ import annotations

from pathlib import Path

import torch

import psmc

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def close(ref: torch.Tensor, out: torch.Tensor, what: str = ""):
    """DESIGN.md: max abs error <= 1e-6, else relative RMS error <= 1e-5 on fp32 paths;
    integer and bool outputs must be equal; NaN never passes."""
    assert ref.shape == out.shape and ref.dtype == out.dtype, (what, ref.shape, out.shape, ref.dtype, out.dtype)
    if not ref.is_floating_point():
        assert torch.equal(ref, out), what
        return
    assert not torch.isnan(out).any(), what
    err = (ref - out).abs().max().item()
    if err <= 1e-6:
        return
    rel = ((ref - out).norm() / ref.norm()).item()
    assert rel <= 1e-5, f"{what}: max abs error {err}, relative RMS error {rel}"


def layer_class(name: str):
    """The generated class of examples/<name>.psm, Triton kernels registered when its plan has them."""
    return psmc.load(EXAMPLES / f"{name}.psm").__psmc_layers__[name]


def example_inputs(layer, B: int, T: int | None, seed: int, grad: bool = False) -> dict:
    """[B, (T,) 3 lanes, *declared], in ranges where every example is well-posed; selective_ssm's
    B is shared by the lanes (a size-1 lane axis, whose gradient sums over the lanes)."""
    g = torch.Generator().manual_seed(seed)
    lead = (B,) if T is None else (B, T)
    out = {}
    for slot in layer.spec.inputs:
        lanes = (1,) if slot.name == "B" else (3,)
        shape = lead + lanes + tuple(int(s) for s in slot.shape(dict(layer.dims)))
        if slot.dtype == "bool":
            x = torch.rand(shape, generator=g) > 0.7
        elif slot.name in ("log_a", "A", "gk"):
            x = -torch.rand(shape, generator=g) * 0.5
        elif slot.name == "delta":
            x = torch.rand(shape, generator=g) * 0.5
        elif slot.name == "x" and layer.spec.name == "running_argmax":
            x = torch.randint(0, 4, shape, generator=g).float()
        else:
            x = torch.randn(shape, generator=g)
        out[slot.name] = x.requires_grad_(grad and x.is_floating_point())
    return out
