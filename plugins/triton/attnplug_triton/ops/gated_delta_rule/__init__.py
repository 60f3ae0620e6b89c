"""The gated delta rule (DESIGN §8) through Triton: ``gated_delta_rule`` picks the kernel.

- ``chunk.chunk_gated_delta_rule``: chunked (64 tokens, WY form), forward and backward; the
  kernels are in ``kkt_solve.py``, ``chunk_h.py`` and ``chunk_bwd.py``.
- ``fused_recurrent.fused_recurrent_gated_delta_rule``: token by token, forward only (decoding).

Nothing is imported here until :func:`gated_delta_rule` is called (the kernel modules import
Triton).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["RECURRENT_MAX_TOKENS", "EXPERIMENTAL_CHUNK_OPTIONS", "gated_delta_rule",
           "experimental_gated_delta_rule"]

# Without autograd, sequences up to this long go token by token (fla's layer does the same
# below 64 tokens); longer ones, or any call that needs gradients, go through the chunked kernels.
RECURRENT_MAX_TOKENS = 64


def gated_delta_rule(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, *, scale: float | None = None,
    initial_state: Tensor | None = None, output_final_state: bool = False,
    cu_seqlens: Tensor | None = None, use_qk_l2norm: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """The ``triton`` backend's ``gated_delta_rule`` slot: same function as
    :func:`attnplug.ops.chunk_gated_delta_rule` (DESIGN §8).

    Runs the chunked kernels (differentiable) when a gradient is needed or a sequence is longer
    than :data:`RECURRENT_MAX_TOKENS`, and the token-by-token kernel otherwise (decoding).

    Returns:
        ``(o[B, T, HV, V]`` in v's dtype, ``final_state[N, HV, K, V]`` float32 or None``)``.

    Raises:
        ValueError: shapes, dtypes, devices or ``cu_seqlens`` the kernels do not take (named).
    """
    return _gated_delta_rule(q, k, v, g, beta, scale=scale, initial_state=initial_state,
                             output_final_state=output_final_state, cu_seqlens=cu_seqlens,
                             use_qk_l2norm=use_qk_l2norm)


# The chunked kernels' variants not yet checked on a GPU, which the experimental slot turns on.
# None now: the two of session 11 were checked on the H200 in session 12
# (benchmarks/results/2026-11-28-h200-session12.md) — the lean state walk was right and faster
# and is served (chunk.LEAN_WALK); the WY inverse in TF32×3 products was right but slower (the
# forward 1.43× the served one's time), so it stays an argument (inverse_precision="tf32x3").
EXPERIMENTAL_CHUNK_OPTIONS: dict[str, bool | str] = {}


def experimental_gated_delta_rule(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, *, scale: float | None = None,
    initial_state: Tensor | None = None, output_final_state: bool = False,
    cu_seqlens: Tensor | None = None, use_qk_l2norm: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """:func:`gated_delta_rule` with the chunked kernels' variants not yet checked on a GPU
    (:data:`EXPERIMENTAL_CHUNK_OPTIONS`): the slot of ``TritonSpecProvider(
    experimental_kernels=True)`` (``ATTNPLUG_TRITON_EXPERIMENTAL=1``). Same function, same
    arguments; right against float64 under the interpreter."""
    return _gated_delta_rule(q, k, v, g, beta, scale=scale, initial_state=initial_state,
                             output_final_state=output_final_state, cu_seqlens=cu_seqlens,
                             use_qk_l2norm=use_qk_l2norm, **EXPERIMENTAL_CHUNK_OPTIONS)


def _gated_delta_rule(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, *,
                      scale: float | None, initial_state: Tensor | None,
                      output_final_state: bool, cu_seqlens: Tensor | None,
                      use_qk_l2norm: bool, **chunk_options: bool | str,
                      ) -> tuple[Tensor, Tensor | None]:
    from attnplug_triton.ops.gated_delta_rule.common import check_args

    seqs = check_args("gated_delta_rule", q, k, v, g, beta, initial_state, cu_seqlens, scale)
    kwargs = {"scale": scale, "initial_state": initial_state,
              "output_final_state": output_final_state, "use_qk_l2norm": use_qk_l2norm}
    tensors = [x for x in (q, k, v, g, beta, initial_state) if x is not None]
    training = torch.is_grad_enabled() and any(x.requires_grad for x in tensors)
    if not training and seqs.longest <= RECURRENT_MAX_TOKENS:
        from attnplug_triton.ops.gated_delta_rule.fused_recurrent import run_fused_recurrent

        return run_fused_recurrent(q, k, v, g, beta, seqs, **kwargs)
    from attnplug_triton.ops.gated_delta_rule.chunk import run_chunk

    return run_chunk(q, k, v, g, beta, seqs, **kwargs, **chunk_options)
