"""The closeness bar of the runtime tests against float64 references (DESIGN.md: fp32 paths
<= 1e-5 relative RMS), shared by test_chunkwise.py and test_delta.py."""
from __future__ import annotations

import torch

# relative RMS error allowed against the float64 loop (DESIGN.md: fp32 paths <= 1e-5)
RTOL = {torch.float32: 1e-5, torch.float64: 1e-10}


def assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    """max abs error <= 1e-6 (1e-12 in float64), else relative RMS <= RTOL; NaN never passes."""
    assert out.shape == ref.shape, (out.shape, ref.shape)
    assert torch.isfinite(out).all(), "non-finite output"
    err = out.double() - ref.double()
    if err.abs().max() <= (1e-12 if dtype == torch.float64 else 1e-6):
        return
    rel = err.norm() / ref.double().norm()
    assert rel <= RTOL[dtype], f"relative RMS error {rel:.3g} > {RTOL[dtype]:.0e}"
