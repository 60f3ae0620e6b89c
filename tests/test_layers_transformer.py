"""TransformerLayer (pre-norm residual) and TransformerBlock (layer numbers, final norm)."""

from __future__ import annotations

import pytest
import torch

from attnplug import TransformerConfig
from attnplug.backends.local import LocalSpecProvider
from attnplug.layers.aux_loss import AuxLossMixin, clear_aux_losses, collect_aux_losses
from attnplug.layers.gated_delta_net import GDNCache
from attnplug.layers.transformer import TransformerBlock, TransformerLayer
from attnplug.spec import build_module
from attnplug.specs import get_transformer_block_with_experimental_attention_variant_spec

LOCAL = LocalSpecProvider()


def make_config(**overrides: object) -> TransformerConfig:
    fields = dict(num_layers=3, hidden_size=16, num_attention_heads=4, ffn_hidden_size=32,
                  params_dtype="float64", backend="local", experimental_attention_variant="gdn",
                  linear_attention_freq=3, linear_key_head_dim=4, linear_value_head_dim=4,
                  linear_num_key_heads=2, linear_num_value_heads=2, num_moe_experts=3,
                  moe_layer_freq=2, moe_ffn_hidden_size=8)
    fields.update(overrides)
    return TransformerConfig(**fields)


def block_spec(cfg: TransformerConfig):
    return get_transformer_block_with_experimental_attention_variant_spec(cfg, backend=LOCAL)


def test_layer_is_pre_norm_residual() -> None:
    cfg = make_config()
    for spec in block_spec(cfg).layer_specs:
        layer: TransformerLayer = build_module(spec, config=cfg, layer_number=2)
        x = torch.randn(2, 5, 16, dtype=torch.float64)
        h = x + layer.self_attention(layer.input_layernorm(x))
        expected = h + layer.mlp(layer.pre_mlp_layernorm(h))
        assert torch.allclose(layer(x), expected, atol=1e-12)
        assert layer.self_attention.layer_number == layer.mlp.layer_number == 2


def test_layer_passes_keyword_arguments_to_the_token_mixer() -> None:
    cfg = make_config()
    layer = build_module(block_spec(cfg).layer_specs[0], config=cfg, layer_number=1)
    x = torch.randn(1, 6, 16, dtype=torch.float64)
    cache = GDNCache()
    with torch.no_grad():
        pieces = [layer(x[:, :4], cache=cache), layer(x[:, 4:], cache=cache)]
        assert torch.allclose(torch.cat(pieces, 1), layer(x), atol=1e-10)


def test_block_numbers_layers_from_the_offset_and_applies_the_final_norm() -> None:
    cfg = make_config()
    spec = block_spec(cfg)
    block = TransformerBlock(cfg, spec, layer_offset=4)
    assert [layer.layer_number for layer in block.layers] == [5, 6, 7]
    x = torch.randn(2, 3, 16, dtype=torch.float64)
    h = x
    for layer in block.layers:
        h = layer(h)
    assert torch.allclose(block(x), block.final_layernorm(h), atol=1e-12)
    spec.layer_norm = None
    assert TransformerBlock(cfg, spec).final_layernorm is None
    with pytest.raises(ValueError, match="layer_offset"):
        TransformerBlock(cfg, spec, layer_offset=-1)


def test_aux_losses_are_collected_from_the_tree_and_cleared() -> None:
    cfg = make_config()
    block = TransformerBlock(cfg, block_spec(cfg))
    block(torch.randn(2, 5, 16, dtype=torch.float64))
    owners = [m for m in block.modules() if isinstance(m, AuxLossMixin)]
    assert len(owners) == 2  # the two MoE layers (layers 1 and 3)
    total = collect_aux_losses(block)["moe_load_balancing"]
    assert torch.allclose(total, sum(m.aux_losses["moe_load_balancing"] for m in owners))
    clear_aux_losses(block)
    assert collect_aux_losses(block) == {}
