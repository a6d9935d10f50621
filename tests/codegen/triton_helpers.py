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
