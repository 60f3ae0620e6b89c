"""The seed's spec builders with any backend: structure, fusion, patterns, slicing, reports."""

from __future__ import annotations

import pytest

from attnplug import ConfigError, TransformerConfig
from attnplug.backends.base import BackendSpecProvider, SlotNotServed
from attnplug.layers.submodules import IDENTITY
from attnplug.spec import spec_name
from attnplug.specs import (
    _get_dense_mlp_module_spec,
    _get_moe_module_spec,
    _get_self_attention_module_spec,
    describe_layer_spec,
    get_dsa_module_spec_for_backend,
    get_experimental_attention_variant_module_spec,
    get_gated_delta_net_module_spec,
    get_transformer_block_with_experimental_attention_variant_spec,
    get_transformer_layer_with_experimental_attention_variant_spec,
)


def _cls(name):
    return type(name, (), {})


class Plain(BackendSpecProvider):
    """A backend that does not fuse norms into linears (like local)."""

    name = "plain"
    Col, Row, Lin, LN, RMS, Attn, Experts = map(
        _cls, ["Col", "Row", "Lin", "LN", "RMS", "Attn", "Experts"]
    )

    def linear(self):
        return self.Lin

    def column_parallel_linear(self):
        return self.Col

    def row_parallel_linear(self):
        return self.Row

    def fuse_layernorm_and_linear(self):
        return False

    def column_parallel_layer_norm_linear(self):
        return None

    def layer_norm(self, rms_norm=False, for_qk=False, has_residual=False):
        return self.RMS if rms_norm else self.LN

    def core_attention(self):
        return self.Attn

    def grouped_mlp_modules(self, moe_use_grouped_gemm):
        return self.Experts

    def activation_func(self):
        return None

    def gated_delta_rule(self):
        return gdr_kernel

    def dsa_indexer_topk(self):
        return topk_kernel

    def sparse_attention(self):
        return sparse_kernel


def gdr_kernel(*args, **kwargs):
    raise NotImplementedError


def topk_kernel(*args, **kwargs):
    raise NotImplementedError


def sparse_kernel(*args, **kwargs):
    raise NotImplementedError


class Fused(Plain):
    """A backend that fuses the input norm into the next column linear (like TE)."""

    name = "fused"
    LNLinear = _cls("LNLinear")

    def fuse_layernorm_and_linear(self):
        return True

    def column_parallel_layer_norm_linear(self):
        return self.LNLinear


class Wrapper(Fused):
    """Serves linears itself and says everything else comes from 'fused'."""

    name = "wrapper"

    def served_by(self, slot):
        return "wrapper" if "linear" in slot else "fused"


def hybrid(**overrides):
    values = dict(
        num_layers=8,
        hidden_size=64,
        num_attention_heads=4,
        experimental_attention_variant="gdn",
        linear_attention_freq=4,
        linear_key_head_dim=16,
        linear_value_head_dim=16,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        num_moe_experts=4,
        moe_layer_freq=2,
    )
    values.update(overrides)
    return TransformerConfig(**values)


def dsa(**overrides):
    values = dict(
        num_layers=2,
        hidden_size=64,
        num_attention_heads=4,
        experimental_attention_variant="dsa",
        dsa_indexer_n_heads=2,
        dsa_indexer_head_dim=16,
        dsa_indexer_topk=8,
    )
    values.update(overrides)
    return TransformerConfig(**values)


def test_gdn_spec_on_a_fusing_backend_absorbs_the_input_norm():
    spec = get_gated_delta_net_module_spec(hybrid(), Fused())
    assert spec_name(spec) == "GatedDeltaNet"
    assert spec.metainfo["fuse_input_layernorm"] is True
    assert spec.submodules.in_proj.module is Fused.LNLinear
    assert spec.submodules.out_proj.module is Fused.Row
    assert spec.submodules.out_norm.module is Fused.RMS
    assert spec.submodules.gated_delta_rule.module is gdr_kernel
    # causal_conv1d is optional: a backend that does not serve it gets local's, shown as such
    from attnplug.ops import causal_conv1d

    assert spec.submodules.causal_conv1d.module is causal_conv1d
    assert spec.submodules.causal_conv1d.metainfo == {"slot": "causal_conv1d",
                                                      "backend": "local"}


def test_gdn_spec_on_a_plain_backend_keeps_a_separate_norm():
    spec = get_gated_delta_net_module_spec(hybrid(), Plain())
    assert spec.metainfo["fuse_input_layernorm"] is False
    assert spec.submodules.in_proj.module is Plain.Col
    layers = get_transformer_layer_with_experimental_attention_variant_spec(hybrid(), Plain())
    assert layers[0].submodules.input_layernorm.module is Plain.RMS
    fused = get_transformer_layer_with_experimental_attention_variant_spec(hybrid(), Fused())
    assert fused[0].submodules.input_layernorm == IDENTITY


def test_dsa_spec_structure():
    spec = get_dsa_module_spec_for_backend(dsa(qk_layernorm=True), Fused())
    assert spec_name(spec) == "DSASelfAttention"
    assert spec.metainfo["fuse_input_layernorm"] is False
    core = spec.submodules.core_attention
    assert spec_name(core) == "DSAttention"
    assert core.submodules.sparse_attention.module is sparse_kernel
    indexer = core.submodules.indexer.submodules
    assert indexer.k_norm.module is Fused.LN  # the indexer's key norm is always LayerNorm
    assert indexer.dsa_indexer_topk.module is topk_kernel
    # dsa_indexer_loss is optional: a backend that does not serve it gets local's, shown as such
    from attnplug.ops import dsa_indexer_loss

    assert core.submodules.dsa_indexer_loss.module is dsa_indexer_loss
    assert core.submodules.dsa_indexer_loss.metainfo == {"slot": "dsa_indexer_loss",
                                                         "backend": "local"}
    assert spec.submodules.q_layernorm.module is Fused.RMS
    # the host's QKV projection is never norm-fused: the indexer reads the normalised input
    assert spec.submodules.linear_qkv.module is Fused.Col


def test_dsa_spec_without_indexer_fields_is_a_config_error():
    with pytest.raises(ConfigError, match="dsa_indexer_n_heads"):
        get_dsa_module_spec_for_backend(hybrid(), Plain())


def test_variant_dispatch_rejects_none():
    with pytest.raises(ConfigError, match="experimental_attention_variant=None"):
        get_experimental_attention_variant_module_spec(
            TransformerConfig(num_layers=2, hidden_size=32, num_attention_heads=2), Plain()
        )
    assert spec_name(get_experimental_attention_variant_module_spec(dsa(), Plain())) == (
        "DSASelfAttention"
    )


def test_self_attention_and_mlp_fuse_flags_follow_the_backend():
    assert _get_self_attention_module_spec(hybrid(), Fused()).metainfo["fuse_input_layernorm"]
    assert not _get_self_attention_module_spec(hybrid(), Plain()).metainfo["fuse_input_layernorm"]
    dense = _get_dense_mlp_module_spec(hybrid(), Fused())
    assert dense.metainfo["fuse_pre_mlp_layernorm"] and dense.submodules.linear_fc1.module is (
        Fused.LNLinear
    )
    moe = _get_moe_module_spec(hybrid(moe_shared_expert_intermediate_size=32), Fused())
    assert moe.metainfo["fuse_pre_mlp_layernorm"] is False
    assert moe.submodules.experts.module is Fused.Experts
    assert moe.submodules.shared_experts.params == {"ffn_hidden_size": 32}


def test_layers_follow_the_patterns():
    layers = get_transformer_layer_with_experimental_attention_variant_spec(hybrid(), Plain())
    kinds = [(s.metainfo["attention"], s.metainfo["mlp"]) for s in layers]
    assert [a for a, _ in kinds] == ["gdn", "gdn", "gdn", "sdpa"] * 2
    assert [m for _, m in kinds] == ["moe", "dense"] * 4
    assert [s.metainfo["layer_id"] for s in layers] == list(range(8))
    for spec in layers:
        expected = "GatedDeltaNet" if spec.metainfo["attention"] == "gdn" else "SelfAttention"
        assert spec_name(spec.submodules.self_attention) == expected
        expected = "MoELayer" if spec.metainfo["mlp"] == "moe" else "MLP"
        assert spec_name(spec.submodules.mlp) == expected


def test_dsa_makes_every_layer_dsa_and_no_experts_means_dense():
    layers = get_transformer_layer_with_experimental_attention_variant_spec(dsa(), Plain())
    assert [s.metainfo["attention"] for s in layers] == ["dsa", "dsa"]
    assert [s.metainfo["mlp"] for s in layers] == ["dense", "dense"]


@pytest.mark.parametrize(
    "overrides, chunks",
    [
        (dict(pipeline_model_parallel_size=2), {(0, None): [0, 1, 2, 3], (1, None): [4, 5, 6, 7]}),
        (
            dict(pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=2),
            {(0, 0): [0, 1], (1, 0): [2, 3], (0, 1): [4, 5], (1, 1): [6, 7]},
        ),
    ],
)
def test_block_is_the_pipeline_slice_with_the_final_norm_on_the_last_chunk(overrides, chunks):
    config = hybrid(**overrides)
    last = max(chunks, key=lambda c: (c[1] or 0, c[0]))
    for (rank, stage), ids in chunks.items():
        block = get_transformer_block_with_experimental_attention_variant_spec(
            config, vp_stage=stage, pp_rank=rank, backend=Plain()
        )
        assert [s.metainfo["layer_id"] for s in block.layer_specs] == ids
        assert (block.layer_norm is not None) == ((rank, stage) == last)


def test_describe_reports_class_and_backend_of_every_slot():
    layer = get_transformer_layer_with_experimental_attention_variant_spec(hybrid(), Wrapper())[0]
    slots = describe_layer_spec(layer)
    assert slots["input_layernorm"] == {"class": "IdentityOp", "backend": "fused"}
    assert slots["self_attention"] == {"class": "GatedDeltaNet", "backend": "attnplug"}
    assert slots["self_attention.in_proj"] == {"class": "LNLinear", "backend": "wrapper"}
    assert slots["self_attention.out_norm"] == {"class": "RMS", "backend": "fused"}
    assert slots["self_attention.gated_delta_rule"] == {"class": "gdr_kernel", "backend": "fused"}
    assert slots["mlp.experts"] == {"class": "Experts", "backend": "fused"}
    assert slots["pre_mlp_layernorm"]["class"] == "RMS"


def test_a_missing_slot_surfaces_with_its_reason():
    class NoGDN(Plain):
        def gated_delta_rule(self):
            raise self._not_served("gated_delta_rule", "no kernel for it yet")

    with pytest.raises(SlotNotServed, match="'plain' does not serve slot 'gated_delta_rule'"):
        get_gated_delta_net_module_spec(hybrid(), NoGDN())
