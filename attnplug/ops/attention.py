"""Causal softmax attention, batch-first, with grouped-query heads (DESIGN §8).

Query ``t`` of ``T`` sees key ``s`` of ``S`` when ``s <= t + S - T``: the queries are the last ``T``
positions of the key sequence (prefill with a cache, or plain self-attention when ``S == T``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention.bias import causal_lower_right

__all__ = ["causal_attention", "naive_causal_attention", "causal_attention_probs", "causal_mask"]

# ``enable_gqa`` arrived in torch 2.5; older versions get the key/value heads repeated instead.
_SDPA_HAS_GQA = torch.torch_version.TorchVersion(torch.__version__) >= (2, 5)


def _check_attention_args(q: Tensor, k: Tensor, v: Tensor | None) -> None:
    """Raise ``ValueError`` unless q[B,T,H,D], k[B,S,Hkv,D] (and v[B,S,Hkv,Dv]) fit together."""
    tensors = {"q": q, "k": k} if v is None else {"q": q, "k": k, "v": v}
    for name, x in tensors.items():
        if x.dim() != 4:
            raise ValueError(
                f"{name} must be 4-D (batch, seq, heads, dim); got shape {tuple(x.shape)}"
            )
        if not x.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor; got {x.dtype}")
    B, T, H, D = q.shape
    _, S, Hkv, _ = k.shape
    if k.shape[0] != B or k.shape[3] != D:
        raise ValueError(
            f"k must be [B={B}, S, Hkv, D={D}] to match q {tuple(q.shape)}; got {tuple(k.shape)}"
        )
    if v is not None and v.shape[:3] != k.shape[:3]:
        raise ValueError(
            f"v must be [B, S, Hkv, Dv] with B, S, Hkv as in k {tuple(k.shape)}; "
            f"got {tuple(v.shape)}"
        )
    if Hkv == 0 or H % Hkv != 0:
        raise ValueError(
            f"the query heads H={H} (q) must be a multiple of the key/value heads Hkv={Hkv} (k, v)"
        )
    if S < T:
        raise ValueError(
            f"causal attention needs at least as many keys as queries: k has S={S} positions, "
            f"q has T={T}; pass S >= T (the queries are the last T positions)"
        )
    if v is not None and not q.dtype == k.dtype == v.dtype:
        raise ValueError(f"q, k and v must share one dtype; got {q.dtype}, {k.dtype}, {v.dtype}")


def causal_attention(
    q: Tensor, k: Tensor, v: Tensor, *, softmax_scale: float | None = None
) -> Tensor:
    """Causal softmax attention through ``torch.nn.functional.scaled_dot_product_attention``.

    Args:
        q: queries ``[B, T, H, D]``.
        k: keys ``[B, S, Hkv, D]`` with ``S >= T`` and ``H % Hkv == 0``.
        v: values ``[B, S, Hkv, Dv]`` (``Dv`` may differ from ``D``).
        softmax_scale: multiplies ``q·k``; default ``D ** -0.5``.

    Returns:
        ``o[B, T, H, Dv]`` in q's dtype; query head ``h`` uses key/value head ``h // (H // Hkv)``.

    Raises:
        ValueError: shapes or dtypes that do not fit together (named in the message).
    """
    _check_attention_args(q, k, v)
    T, H = q.shape[1], q.shape[2]
    S, Hkv = k.shape[1], k.shape[2]
    qh, kh, vh = (x.transpose(1, 2) for x in (q, k, v))  # (B, heads, seq, dim)
    gqa = {}
    if H != Hkv:
        if _SDPA_HAS_GQA:
            gqa = {"enable_gqa": True}
        else:
            kh = kh.repeat_interleave(H // Hkv, dim=1)  # (B, H, S, D)
            vh = vh.repeat_interleave(H // Hkv, dim=1)  # (B, H, S, Dv)
    if S == T:
        o = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=softmax_scale, **gqa)
    else:
        mask = causal_lower_right(T, S)
        o = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=softmax_scale, **gqa)
    return o.transpose(1, 2)  # (B, T, H, Dv)


def causal_mask(T: int, S: int, device: torch.device | str | None = None) -> Tensor:
    """Boolean ``[T, S]`` mask, True where query ``t`` may see key ``s`` (``s <= t + S - T``)."""
    t = torch.arange(T, device=device)[:, None]  # (T, 1)
    s = torch.arange(S, device=device)[None, :]  # (1, S)
    return s <= t + (S - T)  # (T, S)


def causal_attention_probs(q: Tensor, k: Tensor, *, softmax_scale: float | None = None) -> Tensor:
    """The causal attention probabilities, densely: ``p[B, T, H, S]`` (each row sums to 1).

    Computed in q's dtype with an explicit softmax; memory ``O(B·H·T·S)``. Used by
    :func:`naive_causal_attention` and as the target of the DSA indexer's KL loss.

    Raises:
        ValueError: as :func:`causal_attention`.
    """
    _check_attention_args(q, k, None)
    T, H, D = q.shape[1], q.shape[2], q.shape[3]
    S, Hkv = k.shape[1], k.shape[2]
    scale = D**-0.5 if softmax_scale is None else softmax_scale
    kh = k.repeat_interleave(H // Hkv, dim=2)  # (B, S, H, D)
    scores = torch.einsum("bthd,bshd->bths", q, kh) * scale  # (B, T, H, S)
    visible = causal_mask(T, S, q.device)[:, None, :]  # (T, 1, S)
    return scores.masked_fill(~visible, float("-inf")).softmax(dim=-1)  # (B, T, H, S)


def naive_causal_attention(
    q: Tensor, k: Tensor, v: Tensor, *, softmax_scale: float | None = None
) -> Tensor:
    """:func:`causal_attention` with an explicit softmax in the inputs' dtype (a test reference).

    Returns ``o[B, T, H, Dv]``; raises ``ValueError`` as :func:`causal_attention`.
    """
    _check_attention_args(q, k, v)
    H, Hkv = q.shape[2], k.shape[2]
    p = causal_attention_probs(q, k, softmax_scale=softmax_scale)  # (B, T, H, S)
    vh = v.repeat_interleave(H // Hkv, dim=2)  # (B, S, H, Dv)
    return torch.einsum("bths,bshe->bthe", p, vh)  # (B, T, H, Dv)
