"""Plain-PyTorch references for the DSA kernels (pass float64 inputs for exact ones).

The top-k and sparse-attention references are ``attnplug.ops.dsa``'s dense forms, re-exported;
:func:`naive_indexer_kl_loss` builds the dense ``[B, T, H, S]`` probabilities and ``[B, T, S]``
scores and hands them to ``attnplug.ops.dsa.dsa_indexer_kl_loss``, as ``DSAttention`` does.
"""

from __future__ import annotations

import torch
from torch import Tensor

from attnplug.ops.dsa import (
    dsa_indexer_kl_loss,
    indexer_scores,
    naive_dsa_indexer_topk,
    naive_sparse_attention,
)

__all__ = ["naive_dsa_indexer_topk", "naive_sparse_attention", "naive_indexer_kl_loss"]


def naive_indexer_kl_loss(q: Tensor, k: Tensor, index_q: Tensor, index_k: Tensor,
                          index_weights: Tensor, *, softmax_scale: float | None = None,
                          causal: bool = True, relu: bool = True) -> Tensor:
    """:func:`attnplug_triton.ops.dsa.kl.indexer_kl_loss` densely, in the inputs' dtype.

    Memory ``O(B·H·T·S)``; differentiable in the index inputs only (q and k are detached).
    """
    B, T, H, D = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    scale = D**-0.5 if softmax_scale is None else softmax_scale
    with torch.no_grad():
        kh = k.repeat_interleave(H // Hkv, dim=2)  # (B, S, H, D)
        logits = torch.einsum("bthd,bshd->bths", q, kh) * scale  # (B, T, H, S)
        if causal:
            t = torch.arange(T, device=q.device)[:, None, None]  # (T, 1, 1)
            s = torch.arange(S, device=q.device)  # (S,)
            logits = logits.masked_fill(s > t + (S - T), float("-inf"))
        probs = logits.softmax(dim=-1)  # (B, T, H, S)
    scores = indexer_scores(index_q, index_k, index_weights, causal=False, relu=relu)  # (B, T, S)
    return dsa_indexer_kl_loss(scores, probs, causal=causal)
