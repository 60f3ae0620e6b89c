"""Softmax self-attention (GQA, RoPE, q/k norms, output gate) against a float64 reference."""

from __future__ import annotations

import math

import pytest
import torch

from attnplug import ConfigError, TransformerConfig
from attnplug.backends.local import LocalSpecProvider
from attnplug.layers.attention import DotProductAttention, SelfAttention
from attnplug.layers.linear import Linear
from attnplug.layers.submodules import SelfAttentionSubmodules
from attnplug.spec import build_module
from attnplug.specs import _get_self_attention_module_spec

LOCAL = LocalSpecProvider()


def make_config(**overrides: object) -> TransformerConfig:
    fields = dict(num_layers=2, hidden_size=16, num_attention_heads=4, params_dtype="float64",
                  backend="local")
    fields.update(overrides)
    return TransformerConfig(**fields)


def build_attention(cfg: TransformerConfig) -> SelfAttention:
    layer = build_module(_get_self_attention_module_spec(cfg, LOCAL), config=cfg, layer_number=1)
    with torch.no_grad():  # non-trivial norm weights, so a missing norm would show
        for name, p in layer.named_parameters():
            if "layernorm" in name:
                p.uniform_(0.5, 1.5)
    return layer


# -- the float64 reference, one head and one query at a time -----------------------------------
def ref_rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x / torch.sqrt((x * x).mean() + eps) * w


def ref_rope(x: torch.Tensor, pos: int, rot: int, base: float) -> torch.Tensor:
    """Rotate vector x (D,): channel i with channel i + rot/2 at angle pos·base^(−2i/rot)."""
    out = x.clone()
    for i in range(rot // 2):
        theta = pos * base ** (-2 * i / rot)
        a, b = x[i], x[i + rot // 2]
        out[i], out[i + rot // 2] = a * math.cos(theta) - b * math.sin(theta), \
            b * math.cos(theta) + a * math.sin(theta)
    return out


def reference_attention(layer: SelfAttention, x: torch.Tensor, offset: int = 0) -> torch.Tensor:
    cfg = layer.config
    B, T, _ = x.shape
    H, G, D = cfg.num_attention_heads, cfg.query_groups, cfg.head_dim
    R = H // G
    gated = cfg.attention_output_gate
    rot = int(D * cfg.rotary_percent) if cfg.position_embedding_type == "rope" else 0
    width = (R * (1 + gated) + 2) * D  # per group: [q heads | gate heads | k | v]
    mixed = x @ layer.linear_qkv.weight.T  # (B, T, G·width)
    out = torch.zeros(B, T, H * D, dtype=x.dtype)
    for b in range(B):
        q, k, v, gate = {}, {}, {}, {}
        for t in range(T):
            for g in range(G):
                row = mixed[b, t, g * width:(g + 1) * width]
                kk, vv = row[-2 * D:-D], row[-D:]
                if layer.k_layernorm is not None:
                    kk = ref_rms(kk, layer.k_layernorm.weight, cfg.layernorm_epsilon)
                k[t, g], v[t, g] = ref_rope(kk, offset + t, rot, cfg.rotary_base), vv
                for r in range(R):
                    h = g * R + r
                    qq = row[r * D:(r + 1) * D]
                    if layer.q_layernorm is not None:
                        qq = ref_rms(qq, layer.q_layernorm.weight, cfg.layernorm_epsilon)
                    q[t, h] = ref_rope(qq, offset + t, rot, cfg.rotary_base)
                    if gated:
                        gate[t, h] = row[(R + r) * D:(R + r + 1) * D]
        for t in range(T):
            for h in range(H):
                g = h // R
                scores = torch.stack([q[t, h] @ k[s, g] for s in range(t + 1)]) / math.sqrt(D)
                p = torch.softmax(scores, 0)
                o = sum(p[s] * v[s, g] for s in range(t + 1))
                if gated:
                    o = o * torch.sigmoid(gate[t, h])
                out[b, t, h * D:(h + 1) * D] = o
    return out @ layer.linear_proj.weight.T


CASES = [
    pytest.param({}, 5, id="mha"),
    pytest.param({"num_query_groups": 2}, 1, id="gqa-one-token"),
    pytest.param({"num_query_groups": 1, "qk_layernorm": True}, 67, id="mqa-qknorm-T67"),
    pytest.param({"num_query_groups": 2, "attention_output_gate": True, "rotary_percent": 0.5},
                 9, id="gqa-gate-partial-rope"),
    pytest.param({"position_embedding_type": "none", "kv_channels": 6}, 4, id="no-rope-kv6"),
]


@pytest.mark.parametrize(("overrides", "T"), CASES)
def test_self_attention_matches_float64_reference(overrides: dict, T: int) -> None:
    cfg = make_config(**overrides)
    layer = build_attention(cfg)
    x = torch.randn(2, T, 16, dtype=torch.float64)
    assert torch.allclose(layer(x), reference_attention(layer, x), atol=1e-10, rtol=1e-9)


def test_self_attention_position_offset_shifts_rope() -> None:
    cfg = make_config(num_query_groups=2)
    layer = build_attention(cfg)
    x = torch.randn(1, 3, 16, dtype=torch.float64)
    y = layer(x, position_offset=5)
    assert torch.allclose(y, reference_attention(layer, x, offset=5), atol=1e-10)


def test_self_attention_gradients_reach_every_parameter_and_the_input() -> None:
    cfg = make_config(num_query_groups=2, qk_layernorm=True, attention_output_gate=True,
                      add_bias_linear=True)
    layer = build_attention(cfg)
    x = torch.randn(2, 6, 16, dtype=torch.float64, requires_grad=True)
    layer(x).square().sum().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert x.grad.abs().sum() > 0


def test_self_attention_is_causal() -> None:
    layer = build_attention(make_config(num_query_groups=2))
    x = torch.randn(1, 8, 16, dtype=torch.float64)
    y1 = layer(x)
    x2 = x.clone()
    x2[:, 5:] = torch.randn(1, 3, 16, dtype=torch.float64)
    assert torch.allclose(layer(x2)[:, :5], y1[:, :5], atol=1e-12)


def test_output_projection_init_is_scaled_by_depth() -> None:
    cfg = make_config(hidden_size=64, num_layers=8, init_method_std=0.1)
    layer = build_attention(cfg)
    assert abs(layer.linear_proj.weight.std().item() - 0.1 / 4) < 0.004
    assert abs(layer.linear_qkv.weight.std().item() - 0.1) < 0.01


def test_dot_product_attention_default_and_custom_scale() -> None:
    cfg = make_config()
    q, k, v = (torch.randn(1, 3, 2, 4, dtype=torch.float64) for _ in range(3))
    a = DotProductAttention(cfg)(q, k, v)
    b = DotProductAttention(cfg, softmax_scale=0.25)(2 * q, k, v)  # default is 4 ** -0.5
    assert torch.allclose(a, b, atol=1e-12)


def test_bad_arguments_name_themselves() -> None:
    cfg = make_config()
    subs = SelfAttentionSubmodules(linear_qkv=Linear, core_attention=DotProductAttention,
                                   linear_proj=Linear)
    with pytest.raises(ConfigError, match="layer_number"):
        SelfAttention(cfg, subs, layer_number=0)
    with pytest.raises(ValueError, match="core_attention"):
        SelfAttention(cfg, SelfAttentionSubmodules(linear_qkv=Linear, linear_proj=Linear))
    with pytest.raises(ValueError, match="softmax_scale"):
        DotProductAttention(cfg, softmax_scale=-1.0)
    with pytest.raises(ValueError, match="hidden_size=16"):
        SelfAttention(cfg, subs)(torch.randn(1, 3, 8, dtype=torch.float64))
