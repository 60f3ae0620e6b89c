"""Gated DeltaNet against a float64 token-by-token reference, gradients and cached decoding."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from attnplug import ConfigError, TransformerConfig
from attnplug.backends.local import LocalSpecProvider
from attnplug.layers.gated_delta_net import GatedDeltaNet, GDNCache
from attnplug.layers.linear import Linear
from attnplug.layers.norms import RMSNorm
from attnplug.layers.submodules import GatedDeltaNetSubmodules
from attnplug.ops.gated_delta_rule import naive_recurrent_gated_delta_rule
from attnplug.spec import build_module
from attnplug.specs import get_gated_delta_net_module_spec

LOCAL = LocalSpecProvider()


def make_config(**overrides: object) -> TransformerConfig:
    fields = dict(num_layers=2, hidden_size=16, num_attention_heads=4, params_dtype="float64",
                  backend="local", experimental_attention_variant="gdn", linear_attention_freq=2,
                  linear_key_head_dim=4, linear_value_head_dim=6, linear_num_key_heads=2,
                  linear_num_value_heads=4, linear_conv_kernel_dim=3)
    fields.update(overrides)
    return TransformerConfig(**fields)


def build_gdn(cfg: TransformerConfig) -> GatedDeltaNet:
    layer = build_module(get_gated_delta_net_module_spec(cfg, LOCAL), config=cfg, layer_number=1)
    with torch.no_grad():
        layer.out_norm.weight.uniform_(0.5, 1.5)
        layer.dt_bias.normal_()
    return layer


def reference_gdn(layer: GatedDeltaNet, x: torch.Tensor) -> torch.Tensor:
    """The layer recomputed from its weights in float64, one token and one head at a time."""
    cfg = layer.config
    Hk, Hv = cfg.linear_num_key_heads, cfg.linear_num_value_heads
    Dk, Dv, K = cfg.linear_key_head_dim, cfg.linear_value_head_dim, cfg.linear_conv_kernel_dim
    B, T, _ = x.shape
    qk, vd = Hk * Dk, Hv * Dv
    proj = x @ layer.in_proj.weight.T  # (B, T, 2qk + 2vd + 2Hv)
    conv_in = proj[..., :2 * qk + vd]
    z = proj[..., 2 * qk + vd:2 * qk + 2 * vd]
    b_raw = proj[..., 2 * qk + 2 * vd:2 * qk + 2 * vd + Hv]
    a_raw = proj[..., 2 * qk + 2 * vd + Hv:]
    w = layer.conv1d.weight[:, 0, :]  # (C, K): tap j multiplies input t − (K − 1) + j
    conv = torch.zeros_like(conv_in)
    for t in range(T):
        for j in range(K):
            src = t - (K - 1) + j
            if src >= 0:
                conv[:, t] += w[:, j] * conv_in[:, src]
    conv = conv * torch.sigmoid(conv)
    q = conv[..., :qk].reshape(B, T, Hk, Dk)
    k = conv[..., qk:2 * qk].reshape(B, T, Hk, Dk)
    v = conv[..., 2 * qk:].reshape(B, T, Hv, Dv)
    out = torch.zeros(B, T, Hv, Dv, dtype=x.dtype)
    for b in range(B):
        for hv in range(Hv):
            hk = hv // (Hv // Hk)
            S = torch.zeros(Dv, Dk, dtype=x.dtype)  # paper orientation: V × K
            for t in range(T):
                qt, kt = q[b, t, hk], k[b, t, hk]
                qt = qt / torch.sqrt((qt * qt).sum() + 1e-6)
                kt = kt / torch.sqrt((kt * kt).sum() + 1e-6)
                g = -torch.exp(layer.A_log[hv]) * F.softplus(a_raw[b, t, hv] + layer.dt_bias[hv])
                beta = torch.sigmoid(b_raw[b, t, hv])
                S = torch.exp(g) * S @ (torch.eye(Dk, dtype=x.dtype) - beta * torch.outer(kt, kt))
                S = S + beta * torch.outer(v[b, t, hv], kt)
                o = S @ qt * Dk**-0.5
                o = o / torch.sqrt((o * o).mean() + cfg.layernorm_epsilon) * layer.out_norm.weight
                zz = z[b, t, hv * Dv:(hv + 1) * Dv]
                out[b, t, hv] = o * zz * torch.sigmoid(zz)
    return out.reshape(B, T, vd) @ layer.out_proj.weight.T


@pytest.mark.parametrize(
    ("overrides", "T"),
    [({}, 1), ({}, 70), ({"linear_num_value_heads": 2, "linear_conv_kernel_dim": 4}, 9),
     ({"linear_num_key_heads": 1, "linear_conv_kernel_dim": 1}, 5)],
)
def test_gdn_matches_float64_reference(overrides: dict, T: int) -> None:
    layer = build_gdn(make_config(**overrides))
    x = torch.randn(2, T, 16, dtype=torch.float64)
    assert torch.allclose(layer(x), reference_gdn(layer, x), atol=1e-10, rtol=1e-8)


def test_gdn_megatron_init_and_layout() -> None:
    layer = build_gdn(make_config())
    fresh = build_module(get_gated_delta_net_module_spec(make_config(), LOCAL),
                         config=make_config(), layer_number=3)
    assert layer.in_proj.weight.shape == (2 * 8 + 2 * 24 + 2 * 4, 16)
    assert layer.conv1d.weight.shape == (2 * 8 + 24, 1, 3) and layer.conv1d.bias is None
    assert torch.all(fresh.dt_bias == 1)
    A = fresh.A_log.exp()
    assert torch.all((A >= 1) & (A <= 16)) and fresh.layer_number == 3


def test_gdn_gradients_reach_every_parameter_and_the_input() -> None:
    layer = build_gdn(make_config())
    x = torch.randn(2, 11, 16, dtype=torch.float64, requires_grad=True)
    layer(x).square().sum().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert x.grad.abs().sum() > 0


@pytest.mark.parametrize("pieces", [[1] * 13, [5, 1, 7], [2, 11]])
def test_gdn_cached_decoding_equals_the_full_forward(pieces: list[int]) -> None:
    layer = build_gdn(make_config())
    x = torch.randn(2, sum(pieces), 16, dtype=torch.float64)
    full = layer(x)
    cache, outs, start = GDNCache(), [], 0
    with torch.no_grad():
        for n in pieces:
            outs.append(layer(x[:, start:start + n], cache=cache))
            start += n
    assert cache.seen == x.shape[1] and cache.recurrent_state.shape == (2, 4, 4, 6)
    assert torch.allclose(torch.cat(outs, dim=1), full, atol=1e-10)


def test_gdn_with_the_recurrent_kernel_matches_the_chunked_one() -> None:
    cfg = make_config()
    layer = build_gdn(cfg)
    spec = get_gated_delta_net_module_spec(cfg, LOCAL)
    spec.submodules.gated_delta_rule = naive_recurrent_gated_delta_rule
    other = build_module(spec, config=cfg)
    other.load_state_dict(layer.state_dict())
    x = torch.randn(1, 20, 16, dtype=torch.float64)
    assert torch.allclose(layer(x), other(x), atol=1e-10)


def test_gdn_in_float32_keeps_gates_in_float32() -> None:
    layer = build_gdn(make_config(params_dtype="float32"))
    assert layer.A_log.dtype == torch.float32 and layer.in_proj.weight.dtype == torch.float32
    y = layer(torch.randn(1, 4, 16))
    assert y.dtype == torch.float32


def test_gdn_bad_arguments_name_themselves() -> None:
    cfg = make_config()
    subs = GatedDeltaNetSubmodules(in_proj=Linear, out_norm=RMSNorm, out_proj=Linear)
    with pytest.raises(ValueError, match="gated_delta_rule"):
        GatedDeltaNet(cfg, subs)
    with pytest.raises(ConfigError, match="layer_number"):
        build_module(get_gated_delta_net_module_spec(cfg, LOCAL), config=cfg, layer_number=-1)
    with pytest.raises(ValueError, match="hidden_size=16"):
        build_gdn(cfg)(torch.randn(1, 2, 3, dtype=torch.float64))
