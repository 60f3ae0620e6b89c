"""Hybrid layer pattern strings (Megatron HybridModel's ``"G-G-G-*E"``): the grammar, the config
field, sublayer specs and layers, pipeline stage markers, ``plan``, and equivalence with the
frequency form (same structure, same parameters, same logits)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import attrs
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from attnplug import ConfigError, TransformerConfig, cli
from attnplug.backends.local import LocalSpecProvider
from attnplug.layers.identity import IdentityOp
from attnplug.layers.linear import LayerNormLinear
from attnplug.layers.model import GPTModel
from attnplug.layers.submodules import IDENTITY, TransformerLayerSubmodules
from attnplug.layers.transformer import TransformerLayer
from attnplug.patterns import (
    from_hybrid_pattern,
    get_linear_attention_pattern,
    get_moe_layer_pattern,
    hybrid_pattern_stages,
    normalize_hybrid_pattern,
    parse_hybrid_pattern,
    render_hybrid_pattern,
    to_hybrid_pattern,
    to_hybrid_pattern_config,
)
from attnplug.pipeline import get_layer_ids
from attnplug.spec import build_module, spec_name
from attnplug.specs import (
    describe_layer_spec,
    get_transformer_layer_with_experimental_attention_variant_spec,
)

VOCAB = 23
HALVES = (("input_layernorm", "self_attention"), ("pre_mlp_layernorm", "mlp"))
TINY = dict(hidden_size=8, num_attention_heads=2, num_query_groups=1, ffn_hidden_size=12,
            params_dtype="float64", backend="local", linear_key_head_dim=4,
            linear_value_head_dim=4, linear_num_key_heads=1, linear_num_value_heads=2,
            moe_ffn_hidden_size=6)
DSA_SIZES = dict(dsa_indexer_n_heads=1, dsa_indexer_head_dim=4, dsa_indexer_topk=2)


class FusedLocal(LocalSpecProvider):
    """The local backend, but fusing input norms into the next column linear (like TE)."""

    name = "fused-local"

    def fuse_layernorm_and_linear(self) -> bool:
        return True

    def column_parallel_layer_norm_linear(self) -> type:
        return LayerNormLinear


def pattern_config(pattern: str, **fields: object) -> TransformerConfig:
    return TransformerConfig(**{**TINY, "hybrid_layer_pattern": pattern, **fields})


def refused(pattern: str, **fields: object) -> str:
    with pytest.raises(ConfigError) as info:
        pattern_config(pattern, **fields)
    return str(info.value)


# -- the grammar --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "stages"),
    [
        ("G-G-G-*E", [list("G-G-G-*E")]),
        ("(G-G-G-*E)*2", [list("G-G-G-*E" * 2)]),
        (" G - \n* E ", [list("G-*E")]),
        ("(G-)*2|*E", [list("G-G-"), list("*E")]),
        ("(G-|)*2*E", [list("G-"), list("G-"), list("*E")]),
        ("((G-)*2*-)*2", [list("G-G-*-" * 2)]),
        ("(G-)*-*", [list("G-*-*")]),  # "*" without a number after it is softmax attention
        ("(G-)* 2 *E", [list("G-G-*E")]),
        ("(D-)*0 *-", [list("*-")]),
        ("|*-", [[], list("*-")]),
    ],
)
def test_patterns_parse_into_stages_of_sublayer_symbols(text, stages):
    assert parse_hybrid_pattern(text) == stages
    assert from_hybrid_pattern(text) == [symbol for stage in stages for symbol in stage]


@pytest.mark.parametrize(
    ("text", "column", "problem"),
    [
        ("G-x-", 3, r"unexpected 'x'; expected '\*' \(softmax attention\), 'G'"),
        ("G-M-", 3, r"'M' \(Mamba\) is not implemented by attnplug"),
        ("G-*-/G-", 5, r"'/' \(multi-token prediction layers\) is not supported"),
        ("g-", 1, r"case-sensitive: did you mean 'G'\?"),
        ("G-G*3", 4, r"a repeat count '\*N' may follow only a parenthesised group"),
        ("*3", 1, r"may follow only a parenthesised group"),
        ("G-3", 3, r"a number may only follow '\*' after a '\)' group"),
        ("(G-", 4, r"expected '\)' to close the '\(' at column 1"),
        ("G-)", 3, r"unbalanced '\)'"),
        ("(G-)*99999999999", 6, r"repeat count is larger"),
        ("((G-)*1000)*1000", 12, r"the pattern expands to more than 1000000 symbols"),
        ("G-,*-", 3, r"unexpected ','"),
    ],
)
def test_malformed_patterns_name_the_column_with_a_caret(text, column, problem):
    for check in (parse_hybrid_pattern, lambda t: pattern_config(t)):
        with pytest.raises(ConfigError) as info:
            check(text)
        message = str(info.value)
        assert message.startswith(f"hybrid_layer_pattern={text!r} is not accepted: at column "
                                  f"{column},"), message
        assert re.search(problem, message), message
        assert message.splitlines()[-1] == " " * (4 + column - 1) + "^", message


@pytest.mark.parametrize("text", ["", "   ", "|", "(G-)*0"])
def test_a_pattern_without_sublayers_is_refused(text):
    with pytest.raises(ConfigError, match="hybrid_layer_pattern=.* it has no sublayers"):
        from_hybrid_pattern(text)


def test_deep_nesting_and_non_strings_are_refused():
    with pytest.raises(ConfigError, match="nest deeper"):
        from_hybrid_pattern("(" * 500 + "G-" + ")" * 500)
    with pytest.raises(ConfigError, match=r"hybrid_layer_pattern=\['G'\] is not accepted"):
        from_hybrid_pattern(["G"])  # type: ignore[arg-type]


symbol_lists = st.lists(st.sampled_from(list("*GD-E|")), min_size=1, max_size=40).filter(
    lambda items: any(item != "|" for item in items))


@settings(max_examples=60, deadline=None)
@given(symbol_lists)
def test_rendering_round_trips_and_is_normal(symbols):
    text = render_hybrid_pattern(symbols)
    assert "".join(sum(parse_hybrid_pattern(text), [])) == "".join(symbols).replace("|", "")
    assert text.count("|") == symbols.count("|")
    assert len(text) <= len(symbols)
    assert normalize_hybrid_pattern(text) == text


def test_render_examples_and_errors():
    assert render_hybrid_pattern(list("G-G-G-*E" * 6)) == "(G-G-G-*E)*6"
    assert render_hybrid_pattern(list("G-G-|G-*E")) == "G-G-|G-*E"
    assert normalize_hybrid_pattern(" G- G- G- G- G- *E ") == "(G-)*5*E"
    with pytest.raises(ConfigError, match=r"symbols\[1\]='M' is not accepted"):
        render_hybrid_pattern(["G", "M"])
    with pytest.raises(ConfigError, match="symbols='G-' is not accepted"):
        render_hybrid_pattern("G-")  # type: ignore[arg-type]


# -- the config field ---------------------------------------------------------------------------


def test_num_layers_is_derived_from_the_pattern_or_must_match_it():
    config = pattern_config("(G-G-G-*E)*6", num_moe_experts=2)
    assert config.num_layers == 48 and config.residual_branches == 48
    assert pattern_config("G-*-", num_layers=4).num_layers == 4
    message = refused("G-*-", num_layers=2)
    assert "num_layers=2 is not accepted" in message and "has 4 sublayers" in message
    assert "leave num_layers out" in message
    with pytest.raises(ConfigError, match="num_layers=True"):
        pattern_config("G-*-", num_layers=True)
    with pytest.raises(ConfigError, match="num_layers=None is not accepted"):
        TransformerConfig(**TINY)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("experimental_attention_variant", "gdn"),
        ("experimental_attention_variant", "dsa"),
        ("linear_attention_freq", 4),
        ("linear_attention_freq", "[1,0]*2"),
        ("moe_layer_freq", 2),
        ("moe_layer_freq", [1, 1, 1, 1]),
    ],
)
def test_the_fields_a_pattern_replaces_are_refused_with_it(field, value):
    fields = dict(DSA_SIZES) if value == "dsa" else {}
    message = refused("G-*E", num_moe_experts=2, **{field: value, **fields})
    assert message.startswith(f"{field}=")
    assert "together with hybrid_layer_pattern='G-*E'" in message
    assert "leave" in message and "default" in message


def test_moe_layer_freq_at_its_default_is_accepted():
    assert pattern_config("G-*E", num_moe_experts=2, moe_layer_freq=1).num_layers == 4


@pytest.mark.parametrize(
    ("pattern", "fields", "expected"),
    [
        ("G-*E", {}, r"num_moe_experts=None is not accepted with hybrid_layer_pattern='G-\*E', "
                     r"which has MoE sublayers 'E' \(the first at column 4\)"),
        ("*-D-", {}, r"dsa_indexer_n_heads=None is not accepted .* DSA sublayers 'D' \(the first "
                     r"at column 3\)"),
        ("*-D-", dict(DSA_SIZES, dsa_indexer_topk=0), r"dsa_indexer_topk=0"),
        ("G-", dict(linear_num_key_heads=0), r"linear_num_key_heads=0"),
        ("G-", dict(linear_num_key_heads=2, linear_num_value_heads=3),
         r"linear_num_value_heads=3 must be a multiple of linear_num_key_heads=2"),
    ],
)
def test_size_fields_are_required_and_checked_when_the_pattern_uses_them(pattern, fields,
                                                                         expected):
    assert re.search(expected, refused(pattern, **fields))


def test_size_fields_of_unused_symbols_are_not_needed():
    config = pattern_config("*-", linear_num_key_heads=0, num_moe_experts=None)
    assert config.num_layers == 2


def test_toml_and_dict_round_trip(tmp_path):
    path = tmp_path / "p.toml"
    path.write_text('[model]\nhybrid_layer_pattern = "(G-)*3 *E"\nhidden_size = 16\n'
                    'num_attention_heads = 2\nnum_moe_experts = 2\n')
    config = TransformerConfig.from_toml(path)
    assert config.num_layers == 8 and config.hybrid_layer_pattern == "(G-)*3 *E"
    assert TransformerConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ConfigError, match=r"missing required field\(s\) num_layers \(or "
                                          r"hybrid_layer_pattern\)"):
        TransformerConfig.from_dict({"hidden_size": 16, "num_attention_heads": 2})


def test_evolving_the_pattern_needs_num_layers_left_out():
    config = pattern_config("G-*-")
    with pytest.raises(ConfigError, match="leave num_layers out"):
        attrs.evolve(config, hybrid_layer_pattern="G-G-*-")
    assert attrs.evolve(config, hybrid_layer_pattern="G-G-*-", num_layers=None).num_layers == 6


def test_the_per_layer_patterns_follow_the_sublayers():
    config = pattern_config("G-*EG-", num_moe_experts=2)
    assert get_linear_attention_pattern(config) == [1, 0, 0, 0, 1, 0]
    assert get_moe_layer_pattern(config) == [0, 0, 0, 1, 0, 0]


# -- pipeline stage markers ---------------------------------------------------------------------


def test_stage_markers_split_the_sublayers_like_a_layout():
    fields = dict(pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=2)
    marked = pattern_config("G-|G-G-|*-|(G-)*3", **fields)
    layout = pattern_config("G-G-G-*-G-G-G-", pipeline_model_parallel_layout="Ett|tttt|tt|ttttttL",
                            **fields)
    for rank, stage in [(0, 0), (1, 0), (0, 1), (1, 1)]:
        assert get_layer_ids(marked, rank, stage) == get_layer_ids(layout, rank, stage)
    assert get_layer_ids(marked, 1, 0) == [2, 3, 4, 5]


def test_without_markers_the_sublayers_split_evenly():
    config = pattern_config("(G-G-G-*-)*2", pipeline_model_parallel_size=2)
    assert get_layer_ids(config, 0) == list(range(8))
    message = refused("G-G-*-", pipeline_model_parallel_size=4)
    assert "num_layers=6" in message and "'|' in the pattern can mark the stages" in message


@pytest.mark.parametrize(
    ("pattern", "pp", "vp", "column", "found"),
    [
        ("G-|*-|G-", 2, None, 6, 3),  # the surplus '|'
        ("G-|*-", 4, None, 6, 2),  # stages missing: the end of the text
        ("(G-|)*4*-", 2, 2, 4, 5),
        ("G-|*-", 2, 2, 6, 2),
    ],
)
def test_stage_markers_must_match_the_pipeline_size(pattern, pp, vp, column, found):
    message = refused(pattern, pipeline_model_parallel_size=pp,
                      virtual_pipeline_model_parallel_size=vp)
    assert message.startswith(f"hybrid_layer_pattern={pattern!r} is not accepted: at column "
                              f"{column}, the pattern marks {found} pipeline stage(s)"), message
    assert f"= {pp} * {vp or 1} = {pp * (vp or 1)}" in message


@pytest.mark.parametrize(
    "fields",
    [
        dict(pipeline_model_parallel_layout="Et|tL"),
        dict(num_layers_in_first_pipeline_stage=2),
        dict(account_for_loss_in_pipeline_split=True),
    ],
)
def test_stage_markers_split_alone(fields):
    message = refused("G-|*-", pipeline_model_parallel_size=2, **fields)
    assert "the '|' stage markers of hybrid_layer_pattern" in message


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 3), st.integers(1, 2), st.data())
def test_marked_stages_partition_the_sublayers(pp, vp, data):
    vp = vp if pp > 1 else 1
    stages = data.draw(st.lists(st.lists(st.sampled_from(list("*G-")), max_size=5),
                                min_size=pp * vp, max_size=pp * vp)
                       .filter(lambda s: any(s)))
    text = "|".join("".join(stage) for stage in stages)
    config = pattern_config(text, pipeline_model_parallel_size=pp,
                            virtual_pipeline_model_parallel_size=vp if pp > 1 else None)
    marked = hybrid_pattern_stages(text, pp, vp if pp > 1 else None)
    assert marked == (stages if len(stages) > 1 else None)
    start = 0
    for index, stage in enumerate(stages):
        ids = get_layer_ids(config, index % pp, index // pp if pp > 1 else None)
        assert ids == list(range(start, start + len(stage)))
        start += len(stage)


# -- sublayer specs and layers ------------------------------------------------------------------


@pytest.mark.parametrize("backend", [LocalSpecProvider(), FusedLocal()], ids=["plain", "fused"])
def test_one_spec_per_sublayer_with_the_other_half_identity(backend):
    config = pattern_config("G-*E", num_moe_experts=2)
    specs = get_transformer_layer_with_experimental_attention_variant_spec(config, backend)
    assert [(s.metainfo["attention"], s.metainfo["mlp"]) for s in specs] == [
        ("gdn", "-"), ("-", "dense"), ("sdpa", "-"), ("-", "moe")]
    for spec in specs:
        sub = spec.submodules
        if spec.metainfo["mlp"] == "-":
            assert sub.pre_mlp_layernorm == IDENTITY and sub.mlp == IDENTITY
            assert spec_name(sub.self_attention) in ("GatedDeltaNet", "SelfAttention")
        else:
            assert sub.input_layernorm == IDENTITY and sub.self_attention == IDENTITY
            assert spec_name(sub.mlp) in ("MLP", "MoELayer")
    fused = isinstance(backend, FusedLocal)
    assert (specs[0].submodules.input_layernorm == IDENTITY) is fused  # a norm fused into in_proj
    slots = describe_layer_spec(specs[0])
    assert "mlp" not in slots and "pre_mlp_layernorm" not in slots
    assert slots["input_layernorm"]["backend"] == ("fused" if fused else "local")
    assert set(describe_layer_spec(specs[1])) >= {"pre_mlp_layernorm", "mlp", "mlp.linear_fc1"}
    assert not any(path.startswith(("self_attention", "input_layernorm"))
                   for path in describe_layer_spec(specs[1]))


def test_a_skipped_half_is_not_added_as_x_plus_x():
    config = pattern_config("*-")
    mixer, mlp = (build_module(spec, config=config, layer_number=1) for spec in
                  get_transformer_layer_with_experimental_attention_variant_spec(
                      config, LocalSpecProvider()))
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    assert (mixer.has_self_attention, mixer.has_mlp) == (True, False)
    assert torch.equal(mixer(x), x + mixer.self_attention(mixer.input_layernorm(x)))
    assert (mlp.has_self_attention, mlp.has_mlp) == (False, True)
    assert torch.equal(mlp(x), x + mlp.mlp(mlp.pre_mlp_layernorm(x)))


def test_a_layer_refuses_a_lone_norm_or_no_halves():
    config = pattern_config("*-")
    with pytest.raises(ConfigError, match="both IdentityOp"):
        TransformerLayer(config, TransformerLayerSubmodules())
    norm = "attnplug.layers.norms:RMSNorm"
    with pytest.raises(ConfigError, match="input_layernorm=RMSNorm is not accepted with "
                                          "self_attention=IdentityOp"):
        TransformerLayer(config, TransformerLayerSubmodules(input_layernorm=norm, mlp=(
            get_transformer_layer_with_experimental_attention_variant_spec(
                config, LocalSpecProvider())[1].submodules.mlp)))


# -- the frequency form and its pattern ---------------------------------------------------------


def frequency_config(**fields: object) -> TransformerConfig:
    return TransformerConfig(**{**TINY, **fields})


@pytest.mark.parametrize(
    ("fields", "pattern"),
    [
        (dict(num_layers=8, experimental_attention_variant="gdn", linear_attention_freq=4,
              num_moe_experts=2), "(GEGEGE*E)*2"),
        (dict(num_layers=4, experimental_attention_variant="gdn", linear_attention_freq=2,
              num_moe_experts=2, moe_layer_freq=2), "GE*-GE*-"),
        (dict(num_layers=3), "*-*-*-"),
        (dict(num_layers=3, num_moe_experts=2, moe_layer_freq=[0, 0, 0]), "*-*-*-"),
        (dict(num_layers=2, experimental_attention_variant="dsa", **DSA_SIZES), "D-D-"),
        (dict(num_layers=4, pipeline_model_parallel_size=2), "*-*-|*-*-"),
        (dict(num_layers=4, pipeline_model_parallel_size=2,
              num_layers_in_first_pipeline_stage=1, num_layers_in_last_pipeline_stage=3),
         "*-|*-*-*-"),
        (dict(num_layers=4, pipeline_model_parallel_size=2,
              virtual_pipeline_model_parallel_size=2), "*-|*-|*-|*-"),
    ],
)
def test_to_hybrid_pattern_of_frequency_configs(fields, pattern):
    config = frequency_config(**fields)
    assert to_hybrid_pattern(config) == pattern
    again = to_hybrid_pattern_config(config)
    assert again.hybrid_layer_pattern == pattern and again.num_layers == 2 * config.num_layers
    assert to_hybrid_pattern(again) == pattern and to_hybrid_pattern_config(again) is again
    for rank in range(config.pipeline_model_parallel_size):
        stages = [None] if config.virtual_pipeline_model_parallel_size is None else [0, 1]
        for stage in stages:
            ids = get_layer_ids(config, rank, stage)
            assert get_layer_ids(again, rank, stage) == [j for i in ids for j in (2 * i, 2 * i + 1)]


def test_to_hybrid_pattern_of_a_pattern_config_is_itself_normalised():
    assert to_hybrid_pattern(pattern_config(" G- G- G- G- G- *- ")) == "(G-)*5*-"
    assert to_hybrid_pattern(pattern_config("(G-)*3*-")) == "G-G-G-*-"  # a tie: written out
    with pytest.raises(ConfigError, match="expected an attnplug.TransformerConfig"):
        to_hybrid_pattern_config(object())  # type: ignore[arg-type]


@st.composite
def frequency_fields(draw) -> dict:
    """A random tiny frequency-form config: variant, per-layer patterns, experts, pipeline."""
    num_layers = draw(st.integers(1, 4))
    binary = st.lists(st.integers(0, 1), min_size=num_layers, max_size=num_layers)
    fields: dict = {"num_layers": num_layers}
    variant = draw(st.sampled_from([None, "gdn", "dsa"]))
    if variant == "gdn":
        fields.update(experimental_attention_variant="gdn",
                      linear_attention_freq=draw(st.one_of(st.integers(1, 4), binary)))
    elif variant == "dsa":
        fields.update(experimental_attention_variant="dsa", **DSA_SIZES)
    experts = draw(st.sampled_from([None, 2, 3]))
    if experts is not None:
        fields.update(num_moe_experts=experts, moe_router_topk=draw(st.integers(1, 2)),
                      moe_layer_freq=draw(st.one_of(st.integers(1, 3), binary)))
        if draw(st.booleans()):
            fields["moe_shared_expert_intermediate_size"] = 4
    if num_layers % 2 == 0 and draw(st.booleans()):
        fields["pipeline_model_parallel_size"] = 2
    fields["normalization"] = draw(st.sampled_from(["RMSNorm", "LayerNorm"]))
    return fields


def sublayer_key(name: str) -> str:
    """The name of a frequency model's parameter in the equivalent pattern model: frequency
    layer ``i`` is sublayers ``2i`` (mixer half) and ``2i + 1`` (MLP half)."""
    match = re.fullmatch(r"decoder\.layers\.(\d+)\.(\w+)\.(.*)", name)
    if match is None:
        return name
    index, half, rest = int(match[1]), match[2], match[3]
    sublayer = 2 * index + (half in ("pre_mlp_layernorm", "mlp"))
    return f"decoder.layers.{sublayer}.{half}.{rest}"


def halves(model: GPTModel) -> list[tuple[str, list[tuple[str, str]]]]:
    """The structure of every half that runs: its modules' names and classes, in order."""
    out = []
    for layer in model.decoder.layers:
        for norm, main in HALVES:
            if isinstance(getattr(layer, main), IdentityOp):
                continue
            modules = [(f"{part}.{name}".rstrip("."), type(module).__name__)
                       for part in (norm, main)
                       for name, module in getattr(layer, part).named_modules()]
            out.append((main, modules))
    return out


def build(config: TransformerConfig, backend: LocalSpecProvider) -> GPTModel:
    torch.manual_seed(1234)
    return GPTModel(config, VOCAB, backend=backend)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(frequency_fields(), st.sampled_from([LocalSpecProvider(), FusedLocal()]))
def test_the_pattern_form_builds_the_same_model_as_the_frequency_form(fields, backend):
    config = frequency_config(**fields)
    pattern = to_hybrid_pattern_config(config)
    assert len(pattern.hybrid_layer_pattern) <= 4 * config.num_layers
    frequency_model, pattern_model = build(config, backend), build(pattern, backend)
    assert len(pattern_model.decoder.layers) == 2 * len(frequency_model.decoder.layers)
    assert halves(pattern_model) == halves(frequency_model)
    for i, slots in enumerate(frequency_model.slots):
        assert slots == {**pattern_model.slots[2 * i], **pattern_model.slots[2 * i + 1]}
    frequency_params = dict(frequency_model.named_parameters())
    pattern_params = dict(pattern_model.named_parameters())
    assert len(frequency_params) == len(pattern_params)
    assert sum(p.numel() for p in frequency_params.values()) == sum(
        p.numel() for p in pattern_params.values())
    for name, tensor in frequency_params.items():
        assert torch.equal(tensor, pattern_params[sublayer_key(name)]), name
    ids = torch.randint(0, VOCAB, (2, 5), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        assert torch.equal(frequency_model(ids), pattern_model(ids))
        aux = frequency_model.auxiliary_losses(), pattern_model.auxiliary_losses()
    assert aux[0].keys() == aux[1].keys()
    assert all(torch.equal(aux[0][key], aux[1][key]) for key in aux[0])


def test_pattern_only_stacks_build_and_train():
    config = pattern_config("(G-)*2|D**E", num_moe_experts=2, pipeline_model_parallel_size=2,
                            dsa_indexer_loss_coeff=0.5, **DSA_SIZES)
    model = GPTModel(config, VOCAB)
    assert [type(layer.self_attention).__name__ for layer in model.decoder.layers[:4]] == [
        "GatedDeltaNet", "IdentityOp", "GatedDeltaNet", "IdentityOp"]
    ids = torch.randint(0, VOCAB, (2, 6))
    loss = torch.nn.functional.cross_entropy(model(ids).reshape(-1, VOCAB), ids.reshape(-1))
    (loss + model.auxiliary_loss()).backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name


# -- attnplug plan ------------------------------------------------------------------------------


def write(tmp_path: Path, model: str) -> str:
    path = tmp_path / "run.toml"
    path.write_text("[model]\nhidden_size = 16\nnum_attention_heads = 2\n" + model)
    return str(path)


def run(capsys, *argv: str) -> tuple[int, str, str]:
    status = cli.main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


def test_plan_as_pattern_prints_the_equivalent_pattern(tmp_path, capsys):
    frequency = write(tmp_path, 'num_layers = 8\nexperimental_attention_variant = "gdn"\n'
                                "linear_attention_freq = 4\nnum_moe_experts = 2\n")
    assert run(capsys, "plan", frequency, "--as-pattern") == (0, "(GEGEGE*E)*2\n", "")
    status, out, _ = run(capsys, "plan", frequency, "--as-pattern", "--json")
    assert status == 0 and json.loads(out) == {"hybrid_layer_pattern": "(GEGEGE*E)*2"}
    pattern = write(tmp_path, 'hybrid_layer_pattern = "G- G- G- G- *-"\n')
    assert run(capsys, "plan", pattern, "--as-pattern") == (0, "(G-)*4*-\n", "")
    status, _, err = run(capsys, "plan", pattern, "--as-pattern", "--pp-rank", "0")
    assert status == 2 and "--as-pattern prints the whole model" in err


def test_plan_of_a_pattern_config_has_a_row_per_sublayer(tmp_path, capsys):
    path = write(tmp_path, 'hybrid_layer_pattern = "G-|*E"\nnum_moe_experts = 2\n'
                           "pipeline_model_parallel_size = 2\n")
    status, out, err = run(capsys, "plan", path, "--json")
    assert status == 0, err
    plan = json.loads(out)
    assert plan["hybrid_layer_pattern"] == "G-|*E"
    assert [(row["index"], row["attention"], row["mlp"], row["pp_rank"])
            for row in plan["layers"]] == [
        (0, "gdn", "-", 0), (1, "-", "dense", 0), (2, "sdpa", "-", 1), (3, "-", "moe", 1)]
    assert "mlp" not in plan["layers"][0]["slots"]
    status, out, _ = run(capsys, "plan", path)
    assert status == 0 and "hybrid_layer_pattern: G-|*E" in out
    rows = [line for line in out.splitlines() if line.startswith("│ 1 ")]
    assert rows and rows[0].split("│")[3].strip() == "-"  # the attention column


def test_plan_of_a_frequency_config_shows_the_equivalent_pattern(tmp_path, capsys):
    status, out, _ = run(capsys, "plan", write(tmp_path, "num_layers = 2\n"))
    assert status == 0 and "as a hybrid_layer_pattern: *-*-" in out
    status, out, _ = run(capsys, "plan", write(tmp_path, "num_layers = 2\n"), "--json")
    assert json.loads(out)["hybrid_layer_pattern"] is None


def test_plan_reports_a_bad_pattern_with_its_column(tmp_path, capsys):
    status, _, err = run(capsys, "plan", write(tmp_path, 'hybrid_layer_pattern = "G-M-"\n'))
    assert status == 2
    assert err.startswith("attnplug: error: hybrid_layer_pattern='G-M-' is not accepted: at "
                          "column 3, 'M' (Mamba)")
    assert err.splitlines()[-1] == "      ^"
