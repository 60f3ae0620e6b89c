"""DeepSeek Sparse Attention: indexer selection, sparse attention and the indexer's KL loss."""

from __future__ import annotations

import math

import pytest
import torch

from attnplug import ConfigError, TransformerConfig
from attnplug.backends.local import LocalSpecProvider
from attnplug.layers.dsa import DSAIndexer, DSASelfAttention
from attnplug.layers.submodules import DSAIndexerSubmodules
from attnplug.spec import build_module
from attnplug.specs import _get_self_attention_module_spec, get_dsa_module_spec_for_backend

LOCAL = LocalSpecProvider()


def make_config(**overrides: object) -> TransformerConfig:
    fields = dict(num_layers=2, hidden_size=16, num_attention_heads=4, num_query_groups=2,
                  params_dtype="float64", backend="local", experimental_attention_variant="dsa",
                  dsa_indexer_n_heads=3, dsa_indexer_head_dim=8, dsa_indexer_topk=4,
                  dsa_indexer_loss_coeff=0.3, dsa_indexer_rope_head_dim=4)
    fields.update(overrides)
    return TransformerConfig(**fields)


def build_dsa(cfg: TransformerConfig) -> DSASelfAttention:
    layer = build_module(get_dsa_module_spec_for_backend(cfg, LOCAL), config=cfg, layer_number=1)
    with torch.no_grad():
        layer.core_attention.indexer.k_norm.weight.uniform_(0.5, 1.5)
        layer.core_attention.indexer.k_norm.bias.normal_()
    return layer


# -- float64 references ------------------------------------------------------------------------
def ref_rope(x: torch.Tensor, pos: int, rot: int, base: float) -> torch.Tensor:
    out = x.clone()
    for i in range(rot // 2):
        theta = pos * base ** (-2 * i / rot)
        a, b = x[i], x[i + rot // 2]
        out[i] = a * math.cos(theta) - b * math.sin(theta)
        out[i + rot // 2] = b * math.cos(theta) + a * math.sin(theta)
    return out


def reference_index_scores(indexer: DSAIndexer, x: torch.Tensor) -> torch.Tensor:
    """I[b, t, s] = Σ_h w[t,h]·relu(q[t,h]·k[s]) for s ≤ t, −inf above the diagonal."""
    cfg = indexer.config
    HI, DI, rot = cfg.dsa_indexer_n_heads, cfg.dsa_indexer_head_dim, cfg.indexer_rope_dim
    B, T, _ = x.shape
    norm = indexer.k_norm
    scores = torch.full((B, T, T), float("-inf"), dtype=x.dtype)
    for b in range(B):
        keys = []
        for s in range(T):
            k = indexer.linear_wk.weight @ x[b, s]
            k = (k - k.mean()) / torch.sqrt(k.var(unbiased=False) + cfg.layernorm_epsilon)
            keys.append(ref_rope(k * norm.weight + norm.bias, s, rot, cfg.rotary_base))
        for t in range(T):
            q = (indexer.linear_wq_b.weight @ x[b, t]).view(HI, DI)
            w = indexer.linear_weights_proj.weight @ x[b, t] / math.sqrt(HI * DI)
            for s in range(t + 1):
                scores[b, t, s] = sum(
                    w[h] * torch.relu(ref_rope(q[h], t, rot, cfg.rotary_base) @ keys[s])
                    for h in range(HI)
                )
    return scores


def attention_over(layer: DSASelfAttention, x: torch.Tensor,
                   keys_of: list[list[list[int]]]) -> torch.Tensor:
    """The layer's output when query (b, t) attends only to keys ``keys_of[b][t]``."""
    q, k, v, _ = layer.project_qkv(x)  # (B,T,H,D), (B,T,G,D), (B,T,G,D): checked elsewhere
    B, T, H, D = q.shape
    R = H // k.shape[2]
    o = torch.zeros(B, T, H, D, dtype=x.dtype)
    for b in range(B):
        for t in range(T):
            sel = keys_of[b][t]
            for h in range(H):
                p = torch.softmax(torch.stack([q[b, t, h] @ k[b, s, h // R] for s in sel])
                                  / math.sqrt(D), 0)
                o[b, t, h] = sum(p[i] * v[b, s, h // R] for i, s in enumerate(sel))
    return o.reshape(B, T, H * D) @ layer.linear_proj.weight.T


# -- tests -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(("topk", "T"), [(8, 8), (50, 5), (1, 1)])
def test_with_topk_at_least_T_dsa_equals_dense_causal_attention(topk: int, T: int) -> None:
    cfg = make_config(dsa_indexer_topk=topk, qk_layernorm=True)
    layer = build_dsa(cfg)
    dense = build_module(_get_self_attention_module_spec(cfg, LOCAL), config=cfg)
    missing, _ = dense.load_state_dict(layer.state_dict(), strict=False)
    assert missing == []
    x = torch.randn(2, T, 16, dtype=torch.float64)
    assert torch.allclose(layer(x), dense(x), atol=1e-10)


@pytest.mark.parametrize("T", [6, 67])
def test_sparse_path_attends_over_a_true_top_k_of_the_indexer_scores(T: int) -> None:
    cfg = make_config(dsa_indexer_topk=4)
    layer = build_dsa(cfg).eval()
    x = torch.randn(1 if T > 10 else 2, T, 16, dtype=torch.float64)
    indexer = layer.core_attention.indexer
    scores = reference_index_scores(indexer, x)  # (B, T, T)
    indices = indexer(x)  # (B, T, 4)
    keys_of = []
    for b in range(x.shape[0]):
        rows = []
        for t in range(T):
            chosen = sorted(int(i) for i in indices[b, t] if i >= 0)
            assert len(chosen) == min(4, t + 1) and len(set(chosen)) == len(chosen)
            assert all(s <= t for s in chosen)
            others = [scores[b, t, s] for s in range(t + 1) if s not in chosen]
            if others:
                assert min(scores[b, t, s] for s in chosen) >= max(others) - 1e-12
            rows.append(chosen)
        keys_of.append(rows)
    assert torch.allclose(layer(x), attention_over(layer, x, keys_of), atol=1e-10)


def test_indexer_loss_matches_the_kl_formula() -> None:
    cfg = make_config()
    layer = build_dsa(cfg)
    x = torch.randn(2, 7, 16, dtype=torch.float64)
    layer(x)
    loss = layer.core_attention.aux_losses["dsa_indexer"]
    q, k, _, _ = layer.project_qkv(x)
    B, T, H, D = q.shape
    R = H // k.shape[2]
    scores = reference_index_scores(layer.core_attention.indexer, x)
    total = 0.0
    for b in range(B):
        for t in range(T):
            p = torch.zeros(t + 1, dtype=torch.float64)
            for h in range(H):
                logits = torch.stack([q[b, t, h] @ k[b, s, h // R] for s in range(t + 1)])
                p += torch.softmax(logits / math.sqrt(D), 0)
            p = p / p.sum()
            log_pred = torch.log_softmax(scores[b, t, :t + 1], 0)
            total += (p * (p.log() - log_pred)).sum()
    assert torch.allclose(loss, 0.3 * total / (B * T), atol=1e-10)


def test_indexer_loss_trains_only_the_indexer_and_lm_loss_never_does() -> None:
    layer = build_dsa(make_config(qk_layernorm=True))
    x = torch.randn(2, 9, 16, dtype=torch.float64, requires_grad=True)
    out = layer(x)
    loss = layer.core_attention.aux_losses["dsa_indexer"]
    names, params = zip(*layer.named_parameters(), strict=True)
    grads = torch.autograd.grad(loss, [x, *params], retain_graph=True, allow_unused=True)
    assert grads[0] is None
    for name, grad in zip(names, grads[1:], strict=True):
        if ".indexer." in name:
            assert grad is not None and grad.abs().sum() > 0, name
        else:
            assert grad is None or torch.all(grad == 0), name
    lm_grads = torch.autograd.grad(out.square().sum(), params, allow_unused=True)
    for name, grad in zip(names, lm_grads, strict=True):
        if ".indexer." in name:
            assert grad is None, name
        else:
            assert grad is not None and grad.abs().sum() > 0, name


@pytest.mark.parametrize("coeff", [None, 0.0])
def test_no_indexer_loss_without_a_coefficient(coeff: float | None) -> None:
    layer = build_dsa(make_config(dsa_indexer_loss_coeff=coeff))
    layer(torch.randn(1, 5, 16, dtype=torch.float64))
    assert layer.core_attention.aux_losses == {}


def test_no_indexer_loss_in_eval_or_without_grad() -> None:
    layer = build_dsa(make_config())
    x = torch.randn(1, 5, 16, dtype=torch.float64)
    with torch.no_grad():
        layer(x)
    assert layer.core_attention.aux_losses == {}
    layer.eval()
    layer(x)
    assert layer.core_attention.aux_losses == {}


def test_indexer_uses_a_layernorm_key_and_one_key_head() -> None:
    indexer = build_dsa(make_config()).core_attention.indexer
    assert type(indexer.k_norm).__name__ == "LayerNorm"
    assert indexer.linear_wk.weight.shape == (8, 16)
    assert indexer.linear_wq_b.weight.shape == (3 * 8, 16)
    assert indexer.linear_weights_proj.weight.shape == (3, 16)


def test_dsa_bad_arguments_name_themselves() -> None:
    cfg = make_config()
    with pytest.raises(ValueError, match="dsa_indexer_topk"):
        DSAIndexer(cfg, DSAIndexerSubmodules(linear_wq_b=object, linear_wk=object,
                                             k_norm=object, linear_weights_proj=object))
    with pytest.raises(ConfigError, match="dsa_indexer_n_heads"):
        DSAIndexer(make_config(experimental_attention_variant=None, dsa_indexer_n_heads=None),
                   get_dsa_module_spec_for_backend(cfg, LOCAL).submodules.core_attention
                   .submodules.indexer.submodules)
