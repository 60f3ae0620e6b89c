"""Weight conversion between a ``local`` and a TE-shaped model, on the CPU.

A stand-in backend gives CPU modules TE's parameter layout (``layer_norm_weight`` in a fused
norm+linear, ``linear_fc1.weight{e}`` in grouped experts) and the local math, so a converted model
must compute exactly what the local one does (float64).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from attnplug_te.convert import (
    load_local_state,
    local_to_te_state_dict,
    paired_parameters,
    te_key_sources,
    te_to_local_state_dict,
)
from torch import nn

from attnplug import TransformerConfig
from attnplug.backends import LocalSpecProvider
from attnplug.layers.linear import LayerNormLinear, Linear, init_normal
from attnplug.layers.mlp import activation_function, glu
from attnplug.layers.model import GPTModel
from attnplug.layers.moe import SequentialExperts
from attnplug.layers.norms import LayerNorm, RMSNorm


class TEShapedLayerNormLinear(Linear):
    """The local norm then linear, with ``TELayerNormLinear``'s parameter names."""

    def __init__(self, input_size: int, output_size: int, *, config, bias: bool = False,
                 init_method=None) -> None:
        super().__init__(input_size, output_size, config=config, bias=bias,
                         init_method=init_method)
        self.rms = config.normalization == "RMSNorm"
        self.eps = config.layernorm_epsilon
        self.layer_norm_weight = nn.Parameter(torch.ones(input_size, dtype=config.torch_dtype))
        self.layer_norm_bias = None if self.rms else nn.Parameter(
            torch.zeros(input_size, dtype=config.torch_dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rms:
            y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.layer_norm_weight
        else:
            y = F.layer_norm(x, x.shape[-1:], self.layer_norm_weight, self.layer_norm_bias,
                             self.eps)
        return super().forward(y)


class TEShapedGroupedLinear(nn.Module):
    """``weight{e}`` / ``bias{e}`` per expert, as ``te.pytorch.GroupedLinear`` names them."""

    def __init__(self, num_gemms: int, in_features: int, out_features: int, bias: bool,
                 dtype: torch.dtype) -> None:
        super().__init__()
        self.num_gemms = num_gemms
        for e in range(num_gemms):
            self.register_parameter(f"weight{e}", nn.Parameter(
                torch.empty(out_features, in_features, dtype=dtype)))
            init_normal(0.02)(getattr(self, f"weight{e}"))
            self.register_parameter(f"bias{e}", nn.Parameter(
                torch.zeros(out_features, dtype=dtype)) if bias else None)

    def forward(self, x: torch.Tensor, splits: list[int]) -> torch.Tensor:
        parts = torch.split(x, splits)
        return torch.cat([F.linear(p, getattr(self, f"weight{e}"), getattr(self, f"bias{e}"))
                          for e, p in enumerate(parts)])


class TEShapedExperts(nn.Module):
    """Local expert math with ``TEGroupedExperts``' parameter names."""

    def __init__(self, num_local_experts: int, *, config) -> None:
        super().__init__()
        ffn, hidden, bias = config.moe_ffn_size, config.hidden_size, config.add_bias_linear
        self.gated = config.gated_linear_unit
        self.act = activation_function(config.activation_func)
        fc1 = 2 * ffn if self.gated else ffn
        self.linear_fc1 = TEShapedGroupedLinear(num_local_experts, hidden, fc1, bias,
                                                config.torch_dtype)
        self.linear_fc2 = TEShapedGroupedLinear(num_local_experts, ffn, hidden, bias,
                                                config.torch_dtype)

    def forward(self, x: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        splits = tokens_per_expert.tolist()
        h = self.linear_fc1(x, splits)
        h = glu(h, self.act) if self.gated else self.act(h)
        return self.linear_fc2(h, splits)


class TEShapedProvider(LocalSpecProvider):
    """Fuses norms into linears and groups experts the way the te backend does."""

    name = "te_shaped"

    def fuse_layernorm_and_linear(self) -> bool:
        return True

    def column_parallel_layer_norm_linear(self) -> type:
        return TEShapedLayerNormLinear

    def grouped_mlp_modules(self, moe_use_grouped_gemm: bool) -> type:
        return TEShapedExperts


def hybrid_config(**overrides) -> TransformerConfig:
    """GDN + MoE, softmax attention + MoE, GDN + dense, softmax attention + dense."""
    fields = dict(num_layers=4, hidden_size=32, num_attention_heads=4, num_query_groups=2,
                  kv_channels=8, ffn_hidden_size=48, experimental_attention_variant="gdn",
                  linear_attention_freq=[1, 0, 1, 0], linear_key_head_dim=8,
                  linear_value_head_dim=8, linear_num_key_heads=2, linear_num_value_heads=4,
                  num_moe_experts=4, moe_layer_freq=[1, 1, 0, 0], moe_ffn_hidden_size=16,
                  moe_shared_expert_intermediate_size=16, qk_layernorm=True,
                  attention_output_gate=True, params_dtype="float64", backend="local")
    fields.update(overrides)
    return TransformerConfig(**fields)


def randomise(module: nn.Module) -> None:
    """Every parameter random (norm weights and biases too), so a wrong mapping shows."""
    torch.manual_seed(1)
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(torch.randn_like(param) * 0.3 + (1.0 if param.dim() == 1 else 0.0))


def build_pair(**overrides) -> tuple[GPTModel, GPTModel]:
    config = hybrid_config(**overrides)
    torch.manual_seed(0)
    local = GPTModel(config, 64, backend=LocalSpecProvider())
    shaped = GPTModel(config, 64, backend=TEShapedProvider())
    randomise(local)
    return local, shaped


@pytest.mark.parametrize("normalization", ["RMSNorm", "LayerNorm"])
@pytest.mark.parametrize("bias", [False, True])
def test_converted_model_computes_what_the_local_one_does(normalization: str, bias: bool) -> None:
    local, shaped = build_pair(normalization=normalization, add_bias_linear=bias)
    load_local_state(shaped, local)
    ids = torch.randint(0, 64, (2, 11))
    local_logits, shaped_logits = local(ids), shaped(ids)
    torch.testing.assert_close(shaped_logits, local_logits, rtol=1e-10, atol=1e-10)
    (local_logits.square().mean() + local.auxiliary_loss()).backward()
    (shaped_logits.square().mean() + shaped.auxiliary_loss()).backward()
    pairs = paired_parameters(shaped, local)
    assert len(pairs) == len(list(shaped.parameters()))
    for pair in pairs:
        torch.testing.assert_close(pair.te_param.grad, pair.local_part(pair.local_param.grad),
                                   rtol=1e-9, atol=1e-10, msg=pair.te_name)


def test_fused_norms_and_grouped_experts_map_to_the_layer_norms_and_stacked_weights() -> None:
    local, shaped = build_pair(normalization="LayerNorm")
    sources = te_key_sources(shaped.state_dict(), local.state_dict())
    layer0, layer2 = "decoder.layers.0.", "decoder.layers.2."
    assert sources[layer0 + "self_attention.in_proj.layer_norm_weight"] == (
        layer0 + "input_layernorm.weight", None)
    assert sources[layer0 + "self_attention.in_proj.layer_norm_bias"] == (
        layer0 + "input_layernorm.bias", None)
    assert sources["decoder.layers.1.self_attention.linear_qkv.layer_norm_weight"] == (
        "decoder.layers.1.input_layernorm.weight", None)
    assert sources[layer2 + "mlp.linear_fc1.layer_norm_weight"] == (
        layer2 + "pre_mlp_layernorm.weight", None)
    assert sources[layer0 + "mlp.experts.linear_fc2.weight3"] == (
        layer0 + "mlp.experts.fc2_weight", 3)
    assert sources[layer0 + "pre_mlp_layernorm.weight"] == (layer0 + "pre_mlp_layernorm.weight",
                                                            None)


def test_te_to_local_is_the_inverse() -> None:
    local, shaped = build_pair()
    load_local_state(shaped, local)
    back = te_to_local_state_dict(shaped.state_dict(), local.state_dict())
    assert back.keys() == local.state_dict().keys()
    for key, value in local.state_dict().items():
        assert torch.equal(back[key], value), key


def test_a_lone_layer_norm_linear_converts_from_the_local_one() -> None:
    config = hybrid_config(normalization="LayerNorm")
    local = LayerNormLinear(32, 24, config=config, bias=True)
    randomise(local)
    shaped = TEShapedLayerNormLinear(32, 24, config=config, bias=True)
    load_local_state(shaped, local)
    x = torch.randn(3, 32, dtype=torch.float64)
    torch.testing.assert_close(shaped(x), local(x), rtol=1e-12, atol=1e-12)


def test_lone_experts_convert_from_the_local_ones() -> None:
    config = hybrid_config(add_bias_linear=True)
    local = SequentialExperts(4, config=config)
    randomise(local)
    shaped = TEShapedExperts(4, config=config)
    load_local_state(shaped, local)
    x, counts = torch.randn(9, 32, dtype=torch.float64), torch.tensor([3, 0, 4, 2])
    torch.testing.assert_close(shaped(x, counts), local(x, counts), rtol=1e-12, atol=1e-12)


def test_different_architectures_are_an_error_naming_the_keys() -> None:
    local = GPTModel(hybrid_config(), 64, backend=LocalSpecProvider())
    shaped = GPTModel(hybrid_config(num_layers=2, linear_attention_freq=[1, 0],
                                    moe_layer_freq=[1, 1]), 64, backend=TEShapedProvider())
    with pytest.raises(ValueError, match="local keys no TE key reads: decoder.layers.2"):
        load_local_state(shaped, local)


def test_a_shape_mismatch_is_an_error_naming_both_keys() -> None:
    local = {"weight": torch.zeros(3, 4)}
    with pytest.raises(ValueError, match=r"local weight for te weight: shape \(3, 4\) where "
                                         r"\(4, 3\)"):
        local_to_te_state_dict(local, {"weight": torch.zeros(4, 3), "_extra_state": None})


def test_te_extra_state_is_kept_and_needs_no_local_source() -> None:
    local = {"norm.weight": torch.ones(2)}
    te_state = {"norm.weight": torch.zeros(2), "norm._extra_state": "fp8 meta", "_extra_state": 1}
    out = local_to_te_state_dict(local, te_state)
    assert out["norm._extra_state"] == "fp8 meta" and out["_extra_state"] == 1
    assert torch.equal(out["norm.weight"], torch.ones(2))


def test_lone_norms_keep_the_local_names() -> None:
    config = hybrid_config()
    for cls in (RMSNorm, LayerNorm):
        module = cls(config=config, hidden_size=8)
        keys = module.state_dict().keys()
        assert te_key_sources(keys, keys) == {k: (k, None) for k in keys}


def test_a_single_grouped_te_parameter_maps_to_the_whole_stacked_tensor() -> None:
    local = {"experts.fc1_weight": torch.zeros(4, 6, 8), "experts.fc2_weight": torch.zeros(4, 8, 3)}
    te_keys = ["experts.linear_fc1.weight", "experts.linear_fc2.weight0",
               "experts.linear_fc2.weight1", "experts.linear_fc2.weight2",
               "experts.linear_fc2.weight3"]
    sources = te_key_sources(te_keys, local)
    assert sources["experts.linear_fc1.weight"] == ("experts.fc1_weight", None)
    assert sources["experts.linear_fc2.weight2"] == ("experts.fc2_weight", 2)


def test_the_conformance_kit_compares_a_te_shaped_backend_through_the_te_mapping() -> None:
    """``attnplug check`` gives a backend's experts and model local's weights through the
    provider's ``load_local_state`` / ``parameter_pairs``: with te's (the mapping here), the
    TE-shaped experts and hybrid model are compared with local's and pass; with the default
    (same names) they are reported as not comparable, not as wrong."""
    from attnplug_te.provider import TESpecProvider

    from attnplug.testing import check_backend

    class Mapped(TEShapedProvider):
        load_local_state = TESpecProvider.load_local_state
        parameter_pairs = TESpecProvider.parameter_pairs

    slots = ["grouped_mlp_modules", "model"]
    mapped = check_backend(Mapped(), slots=slots)
    assert [r.status for r in mapped] == ["passed"] * 5, mapped
    experts = mapped[0]
    assert {"dlinear_fc1.weight0", "dlinear_fc2.weight3"} <= set(experts.errors)
    plain = check_backend(TEShapedProvider(), slots=slots)
    assert {r.status for r in plain} == {"not comparable"}, plain
    assert all("load_local_state" in r.detail for r in plain)
