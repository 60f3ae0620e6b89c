"""Shapes, dtypes and tolerances shared by the triton tests (CPU interpreter or GPU)."""

from __future__ import annotations

import torch

HAS_CUDA = torch.cuda.is_available()

DEVICE = "cuda" if HAS_CUDA else "cpu"
# The interpreter mis-reads bfloat16; on a GPU every dtype runs.
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if HAS_CUDA else [])
# Relative L2 error allowed against the float64 reference, and the largest absolute error as a
# fraction of the reference's largest magnitude (catches a few wrong elements). Both divide by at
# least 0.1 (RMS, resp. magnitude): a reference that is exactly zero (dq with a single key) is
# matched to within rounding, not relatively.
REL_L2 = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}
MAX_ABS = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 8e-2}


def assert_matches(name: str, out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    """Fail, naming ``name``, unless ``out`` is within ``dtype``'s tolerance of ``ref``."""
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    diff = out.detach().double() - ref.detach().double()
    assert torch.isfinite(diff).all(), f"{name}: non-finite values"
    floor = 0.1
    scale = ref.abs().max().clamp_min(floor)
    rel = (diff.norm() / ref.norm().clamp_min(floor * ref.numel() ** 0.5)).item()
    worst = (diff.abs().max() / scale).item()
    assert rel <= REL_L2[dtype], f"{name}: relative L2 error {rel:.2e} > {REL_L2[dtype]:.0e}"
    assert worst <= MAX_ABS[dtype], f"{name}: largest error {worst:.2e} of max |ref| > " \
        f"{MAX_ABS[dtype]:.0e}"
