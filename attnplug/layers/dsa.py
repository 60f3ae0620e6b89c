"""DeepSeek Sparse Attention (DSA) on a multi-head / grouped-query host attention.

``DSASelfAttention`` is :class:`~attnplug.layers.attention.SelfAttention` whose core attention,
``DSAttention``, also receives the layer's (normalised) input ``x``. There the lightning
indexer (``DSAIndexer``) scores every visible key for every query,

    I[t, s] = Σ_h w[t, h] · relu(q_I[t, h] · k_I[s])         (q_I: H_I heads of D_I; k_I: one head)

the ``dsa_indexer_topk`` kernel keeps the ``min(dsa_indexer_topk, S)`` best causal keys of each
query, and the ``sparse_attention`` kernel attends over only those.

The indexer reads ``x`` detached, so the language-model loss never trains it: it learns only from
its KL loss against the main attention (recorded as the auxiliary loss ``"dsa_indexer"`` in
training mode with grad enabled when ``dsa_indexer_loss_coeff`` > 0)::

    p[t]    = L1-normalise( Σ_heads softmax(q·kᵀ·scale) over causal keys )   (q, k detached)
    loss    = coeff · mean_t KL( p[t] ‖ softmax(I[t]) over causal keys )

(the dense form of DeepSeek-V3.2's alignment loss, computed over all causal keys).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from attnplug.layers._checks import check_layer_args, check_positive_int
from attnplug.layers.attention import SelfAttention
from attnplug.layers.aux_loss import AuxLossMixin
from attnplug.layers.rope import apply_rope
from attnplug.ops import dsa_indexer_loss
from attnplug.spec import build_module

if TYPE_CHECKING:
    from attnplug.config import TransformerConfig
    from attnplug.layers.submodules import DSAIndexerSubmodules, DSAttentionSubmodules

__all__ = ["DSAIndexer", "DSAttention", "DSASelfAttention", "DSA_INDEXER_LOSS"]

DSA_INDEXER_LOSS = "dsa_indexer"


class DSAIndexer(nn.Module):
    """The lightning indexer; ``forward(x[B,T,h]) -> indices[B,T,min(topk,T)]`` (−1 unused).

    Slots: ``linear_wq_b`` (hidden → H_I·D_I), ``linear_wk`` (hidden → D_I), ``k_norm`` (built
    ``(config=, hidden_size=D_I)``; LayerNorm in the spec), ``linear_weights_proj`` (hidden →
    H_I), all built ``(in, out, config=, bias=False)``; ``dsa_indexer_topk`` (a kernel).
    RoPE (non-interleaved) rotates the first ``config.indexer_rope_dim`` channels of q and k.
    """

    def __init__(self, config: TransformerConfig, submodules: DSAIndexerSubmodules,
                 layer_number: int = 1) -> None:
        super().__init__()
        owner = type(self).__name__
        self.layer_number = check_layer_args(
            owner, config, layer_number, submodules,
            ("linear_wq_b", "linear_wk", "k_norm", "linear_weights_proj", "dsa_indexer_topk"),
        )
        self.config = config
        self.n_heads = check_positive_int(owner, "dsa_indexer_n_heads", config.dsa_indexer_n_heads)
        self.head_dim = check_positive_int(owner, "dsa_indexer_head_dim",
                                           config.dsa_indexer_head_dim)
        self.topk = check_positive_int(owner, "dsa_indexer_topk", config.dsa_indexer_topk)
        self.rot_dim = config.indexer_rope_dim
        HI, DI, hidden = self.n_heads, self.head_dim, config.hidden_size
        self.linear_wq_b = build_module(submodules.linear_wq_b, hidden, HI * DI, config=config,
                                        bias=False)
        self.linear_wk = build_module(submodules.linear_wk, hidden, DI, config=config, bias=False)
        self.k_norm = build_module(submodules.k_norm, config=config, hidden_size=DI)
        self.linear_weights_proj = build_module(submodules.linear_weights_proj, hidden, HI,
                                                config=config, bias=False)
        self.topk_kernel = build_module(submodules.dsa_indexer_topk)

    def project(self, x: torch.Tensor, position_offset: int = 0
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q (B, T, HI, DI), k (B, T, DI) and head weights (B, T, HI) from x (B, T, h)."""
        B, T, _ = x.shape
        HI, DI = self.n_heads, self.head_dim
        base = self.config.rotary_base
        q = self.linear_wq_b(x).view(B, T, HI, DI)  # (B, T, HI, DI)
        k = self.k_norm(self.linear_wk(x)).view(B, T, 1, DI)  # (B, T, 1, DI)
        q = apply_rope(q, self.rot_dim, base=base, position_offset=position_offset)
        k = apply_rope(k, self.rot_dim, base=base, position_offset=position_offset)
        weights = self.linear_weights_proj(x) * (HI**-0.5 * DI**-0.5)  # (B, T, HI)
        return q, k.view(B, T, DI), weights

    def select(self, q: torch.Tensor, k: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """The kernel's causal top-``min(topk, S)`` keys per query: (B, T, topk) int64."""
        return self.topk_kernel(q, k, weights, topk=min(self.topk, k.shape[1]), causal=True,
                                relu=True)

    def forward(self, x: torch.Tensor, *, position_offset: int = 0) -> torch.Tensor:
        return self.select(*self.project(x, position_offset))


class DSAttention(AuxLossMixin, nn.Module):
    """DSA core attention: ``forward(q[B,T,H,D], k[B,T,G,D], v[B,T,G,Dv], x[B,T,h]) -> o``.

    Built ``(config, layer_number=1, softmax_scale=None)`` like any core attention. Slots:
    ``indexer`` (built ``(config, layer_number=)``), ``sparse_attention`` and
    ``dsa_indexer_loss`` (kernels; the loss is ``attnplug.ops.dsa_indexer_loss`` when unset).
    """

    def __init__(self, config: TransformerConfig, submodules: DSAttentionSubmodules,
                 layer_number: int = 1, softmax_scale: float | None = None) -> None:
        super().__init__()
        owner = type(self).__name__
        self.layer_number = check_layer_args(owner, config, layer_number, submodules,
                                             ("indexer", "sparse_attention"))
        self.config = config
        if softmax_scale is not None and not (isinstance(softmax_scale, (int, float))
                                              and softmax_scale > 0):
            raise ValueError(f"{owner}: softmax_scale={softmax_scale!r} is not accepted: "
                             "expected a number > 0 or None")
        self.softmax_scale = softmax_scale
        self.indexer = build_module(submodules.indexer, config, layer_number=layer_number)
        self.sparse_attention = build_module(submodules.sparse_attention)
        self.indexer_loss = (dsa_indexer_loss if submodules.dsa_indexer_loss is None
                             else build_module(submodules.dsa_indexer_loss))
        self.reset_aux_losses()

    def _wants_loss(self) -> bool:
        coeff = self.config.dsa_indexer_loss_coeff
        return bool(coeff) and self.training and torch.is_grad_enabled()

    def _indexer_loss(self, q: torch.Tensor, k: torch.Tensor, iq: torch.Tensor,
                      ik: torch.Tensor, iw: torch.Tensor) -> torch.Tensor:
        loss = self.indexer_loss(q.detach(), k.detach(), iq, ik, iw,
                                 softmax_scale=self.softmax_scale, causal=True, relu=True)
        return self.config.dsa_indexer_loss_coeff * loss

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, x: torch.Tensor, *,
                position_offset: int = 0) -> torch.Tensor:
        self.reset_aux_losses()
        if k.shape[1] != x.shape[1]:
            raise ValueError(
                f"{type(self).__name__}: the keys (S={k.shape[1]}) and the indexer input x "
                f"(T={x.shape[1]}) must cover the same positions"
            )
        iq, ik, iw = self.indexer.project(x.detach(), position_offset)
        indices = self.indexer.select(iq, ik, iw)  # (B, T, topk)
        o = self.sparse_attention(q, k, v, indices, scale=self.softmax_scale)  # (B, T, H, Dv)
        if self._wants_loss():
            self.record_aux_loss(DSA_INDEXER_LOSS, self._indexer_loss(q, k, iq, ik, iw))
        return o


class DSASelfAttention(SelfAttention):
    """:class:`SelfAttention` that also hands its input (the normalised hidden states) to the
    core attention: ``core_attention(q, k, v, hidden, position_offset=...)``."""

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               hidden: torch.Tensor, position_offset: int = 0) -> torch.Tensor:
        return self.core_attention(q, k, v, hidden, position_offset=position_offset)
