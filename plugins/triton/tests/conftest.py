"""The triton backend's tests: with no CUDA device, Triton's CPU interpreter runs the kernels.

Triton decides whether a kernel is interpreted when the kernel is defined, and its own
``triton.language`` helpers when Triton is imported, so ``TRITON_INTERPRET=1`` is set here,
before anything imports Triton, and the kernel modules are imported at once. The variable is
then put back as it was and set again around each test of this folder only (an autouse
fixture): tests elsewhere in the same session must not see the interpreter, or the ``triton``
backend would pass its ``check()`` and win ``backend="auto"`` there.
"""

from __future__ import annotations

import importlib.util
import os
import sys

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
HAS_TRITON = importlib.util.find_spec("triton") is not None
INTERPRET = HAS_TRITON and not HAS_CUDA
# Why the kernel tests cannot run here, or None when they can.
SKIP_REASON: str | None = None if HAS_TRITON else (
    "triton is not importable: pip install triton (plus numpy for the CPU interpreter)"
)

if INTERPRET and os.environ.get("TRITON_INTERPRET") != "1":
    if "triton" in sys.modules:
        SKIP_REASON = ("triton was imported before plugins/triton/tests/conftest.py could set "
                       "TRITON_INTERPRET=1; run these tests in their own pytest session, or "
                       "export TRITON_INTERPRET=1")
    else:
        previous = os.environ.get("TRITON_INTERPRET")
        os.environ["TRITON_INTERPRET"] = "1"
        try:
            import attnplug_triton.ops.attention.fused  # noqa: F401
            import attnplug_triton.ops.conv.fused  # noqa: F401
            import attnplug_triton.ops.gated_delta_rule.chunk  # noqa: F401
            import attnplug_triton.ops.gated_delta_rule.fused_recurrent  # noqa: F401
            import attnplug_triton.ops.norms.fused  # noqa: F401
        finally:
            if previous is None:
                del os.environ["TRITON_INTERPRET"]
            else:
                os.environ["TRITON_INTERPRET"] = previous


@pytest.fixture(autouse=True)
def _triton_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    """Skip when the kernels cannot run; on a CPU-only machine, turn the interpreter on."""
    if SKIP_REASON is not None:
        pytest.skip(SKIP_REASON)
    if INTERPRET:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
