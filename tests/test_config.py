"""TransformerConfig: defaults, derived sizes, TOML, and a clear ConfigError for every bad value."""

from __future__ import annotations

import warnings

import attrs
import pytest

from attnplug import ConfigError, TransformerConfig

BASE = dict(num_layers=4, hidden_size=64, num_attention_heads=4)
GDN = dict(
    BASE,
    experimental_attention_variant="gdn",
    linear_attention_freq=4,
    linear_key_head_dim=16,
    linear_value_head_dim=16,
    linear_num_key_heads=2,
    linear_num_value_heads=4,
)
DSA = dict(
    BASE,
    experimental_attention_variant="dsa",
    dsa_indexer_n_heads=2,
    dsa_indexer_head_dim=16,
    dsa_indexer_topk=8,
)


def test_derived_sizes_follow_megatron_defaults():
    config = TransformerConfig(**BASE)
    assert config.query_groups == 4
    assert config.head_dim == 16
    assert config.ffn_size == 256
    assert config.moe_ffn_size == 256
    assert config.backend == "auto"


def test_config_is_frozen_and_evolve_revalidates():
    config = TransformerConfig(**BASE)
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        config.num_layers = 8
    with pytest.raises(ConfigError, match="num_layers"):
        attrs.evolve(config, num_layers=0)


def test_keyword_only():
    with pytest.raises(TypeError):
        TransformerConfig(4, 64, 4)  # type: ignore[misc]


@pytest.mark.parametrize(
    "field, value",
    [
        ("num_layers", 0),
        ("num_layers", -3),
        ("num_layers", 2.5),
        ("num_layers", True),
        ("num_layers", "4"),
        ("hidden_size", None),
        ("num_query_groups", 0),
        ("kv_channels", 0),
        ("ffn_hidden_size", -1),
        ("normalization", "BatchNorm"),
        ("layernorm_epsilon", 0.0),
        ("layernorm_epsilon", float("nan")),
        ("activation_func", "tanh"),
        ("gated_linear_unit", "yes"),
        ("position_embedding_type", "alibi"),
        ("rotary_percent", 0.0),
        ("rotary_percent", 1.5),
        ("rotary_base", -1.0),
        ("init_method_std", -0.1),
        ("params_dtype", "int8"),
        ("experimental_attention_variant", "mamba"),
        ("experimental_attention_variant", "GDN"),
        ("num_moe_experts", 0),
        ("moe_router_topk", 0),
        ("moe_aux_loss_coeff", -1.0),
        ("moe_router_load_balancing_type", "sinkhorn"),
        ("moe_layer_freq", 0),
        ("moe_layer_freq", -2),
        ("moe_layer_freq", [1, 0]),
        ("moe_layer_freq", [1, 2, 0, 1]),
        ("moe_layer_freq", "[1]*3"),
        ("moe_layer_freq", "__import__('os')"),
        ("moe_layer_freq", 1.5),
        ("linear_attention_freq", 0),
        ("linear_attention_freq", [1, 1, 1]),
        ("kitchen_attention_backend", "xformers"),
        ("backend", ""),
        ("pipeline_model_parallel_size", 0),
        ("pipeline_model_parallel_size", 3),
    ],
)
def test_bad_value_names_the_field(field, value):
    with pytest.raises(ConfigError) as info:
        TransformerConfig(**{**BASE, field: value})
    assert field in str(info.value)


def test_head_divisibility():
    with pytest.raises(ConfigError, match="num_query_groups"):
        TransformerConfig(**BASE, num_query_groups=3)
    with pytest.raises(ConfigError, match="linear_num_key_heads"):
        TransformerConfig(**{**GDN, "linear_num_value_heads": 5})
    with pytest.raises(ConfigError, match="kv_channels"):
        TransformerConfig(num_layers=2, hidden_size=70, num_attention_heads=4)
    # explicit kv_channels frees head_dim from hidden_size
    assert TransformerConfig(num_layers=2, hidden_size=70, num_attention_heads=4,
                             kv_channels=16).head_dim == 16


def test_topk_must_not_exceed_experts():
    with pytest.raises(ConfigError, match="moe_router_topk"):
        TransformerConfig(**BASE, num_moe_experts=2, moe_router_topk=3)
    TransformerConfig(**BASE, num_moe_experts=2, moe_router_topk=2)


def test_gdn_needs_linear_attention_freq():
    with pytest.raises(ConfigError, match="linear_attention_freq"):
        TransformerConfig(**{**GDN, "linear_attention_freq": None})


@pytest.mark.parametrize(
    "field", ["dsa_indexer_n_heads", "dsa_indexer_head_dim", "dsa_indexer_topk"]
)
def test_dsa_fields_required(field):
    with pytest.raises(ConfigError, match=field):
        TransformerConfig(**{**DSA, field: None})


def test_dsa_rope_dims_bounded_by_indexer_head_dim():
    with pytest.raises(ConfigError, match="dsa_indexer_rope_head_dim"):
        TransformerConfig(**DSA, dsa_indexer_rope_head_dim=32)
    assert TransformerConfig(**DSA).indexer_rope_dim == 16


def test_deprecated_alias_maps_to_gdn_with_warning():
    with pytest.warns(DeprecationWarning, match="gated_delta_net"):
        config = TransformerConfig(**{**GDN, "experimental_attention_variant": "gated_delta_net"})
    assert config.experimental_attention_variant == "gdn"


def test_pattern_fields_accept_string_list_and_int():
    config = TransformerConfig(**{**GDN, "num_layers": 8, "linear_attention_freq": "([1]*3+[0])*2"})
    assert list(config.linear_attention_freq) == [1, 1, 1, 0, 1, 1, 1, 0]
    config = TransformerConfig(**BASE, num_moe_experts=4, moe_layer_freq=[1, 0, 1, 0])
    assert list(config.moe_layer_freq) == [1, 0, 1, 0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert TransformerConfig(**BASE, moe_layer_freq=2).moe_layer_freq == 2


def test_kitchen_attention_needs_kitchen():
    with pytest.raises(ConfigError, match="use_kitchen"):
        TransformerConfig(**BASE, use_kitchen_attention=True)


def test_from_toml_reads_model_table(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[model]\nnum_layers = 2\nhidden_size = 32\nnum_attention_heads = 2\n'
                    'moe_layer_freq = "[1,0]"\nnum_moe_experts = 2\n')
    config = TransformerConfig.from_toml(path)
    assert config.num_layers == 2 and list(config.moe_layer_freq) == [1, 0]


@pytest.mark.parametrize(
    "text, message",
    [
        ("[model]\nnum_layer = 2\nhidden_size = 32\nnum_attention_heads = 2\n", "num_layers"),
        ("[model]\nhidden_size = 32\nnum_attention_heads = 2\n", "num_layers"),
        ("[train]\nsteps = 3\n", r"\[model\]"),
        ("[model\nnum_layers = 2\n", "not valid TOML"),
        ("model = 3\n", r"\[model\]"),
    ],
)
def test_from_toml_errors_are_clear(tmp_path, text, message):
    path = tmp_path / "c.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        TransformerConfig.from_toml(path)


def test_from_toml_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        TransformerConfig.from_toml(tmp_path / "nope.toml")


def test_unknown_field_suggests_the_close_one():
    with pytest.raises(ConfigError, match="did you mean 'moe_router_topk'"):
        TransformerConfig.from_dict({**BASE, "moe_router_top_k": 2})


def test_to_dict_round_trips():
    config = TransformerConfig(**{**GDN, "linear_attention_freq": [1, 1, 1, 0]})
    again = TransformerConfig.from_dict(config.to_dict())
    assert again == config


def test_examples_parse():
    from pathlib import Path

    for path in sorted(Path(__file__).parent.parent.glob("examples/*.toml")):
        TransformerConfig.from_toml(path)


@pytest.mark.parametrize("text,expected", [
    ("num_layers=8", ("num_layers", 8)), (" qk_layernorm = true", ("qk_layernorm", True)),
    ("moe_layer_freq=[1, 0]", ("moe_layer_freq", [1, 0])),
    ("kitchen_fallback_backend=local", ("kitchen_fallback_backend", "local")),
    ('backend="te"', ("backend", "te")), ("x=a=b", ("x", "a=b")),
])
def test_a_set_option_parses_its_value_as_toml_else_as_text(text: str, expected) -> None:
    from attnplug.config import parse_override

    assert parse_override(text) == expected


@pytest.mark.parametrize("text", ["num_layers", "=8", " =8"])
def test_a_set_option_without_a_field_is_a_config_error(text: str) -> None:
    from attnplug.config import parse_override

    with pytest.raises(ConfigError, match="expected FIELD=VALUE"):
        parse_override(text)
