"""GPTModel: dense, GDN + MoE hybrid and DSA stacks built from the spec builders."""

from __future__ import annotations

import pytest
import torch

from attnplug import ConfigError, TransformerConfig
from attnplug.backends.base import BackendError
from attnplug.backends.local import LocalSpecProvider
from attnplug.layers.gated_delta_net import GatedDeltaNet
from attnplug.layers.model import GPTModel
from attnplug.layers.moe import MoELayer

VOCAB = 37


def make_config(**overrides: object) -> TransformerConfig:
    fields = dict(num_layers=2, hidden_size=16, num_attention_heads=4, num_query_groups=2,
                  ffn_hidden_size=32, params_dtype="float64", backend="local")
    fields.update(overrides)
    return TransformerConfig(**fields)


HYBRID = dict(num_layers=4, experimental_attention_variant="gdn", linear_attention_freq=2,
              linear_key_head_dim=4, linear_value_head_dim=4, linear_num_key_heads=2,
              linear_num_value_heads=4, num_moe_experts=4, moe_router_topk=2, moe_layer_freq=2,
              moe_ffn_hidden_size=8, moe_shared_expert_intermediate_size=8)
DSA = dict(experimental_attention_variant="dsa", dsa_indexer_n_heads=2, dsa_indexer_head_dim=8,
           dsa_indexer_topk=3, dsa_indexer_loss_coeff=0.5, qk_layernorm=True)
CONFIGS = {"dense": {}, "gdn_moe": HYBRID, "dsa": DSA}


def ids(B: int = 2, T: int = 9) -> torch.Tensor:
    return torch.randint(0, VOCAB, (B, T))


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_forward_backward_reaches_every_parameter(kind: str) -> None:
    model = GPTModel(make_config(**CONFIGS[kind]), VOCAB, max_sequence_length=16)
    logits = model(ids())
    assert logits.shape == (2, 9, VOCAB) and logits.dtype == torch.float64
    lm_loss = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), ids().reshape(-1))
    (lm_loss + model.auxiliary_loss()).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert model.backend_name == "local"


def test_hybrid_layout_and_slot_descriptions() -> None:
    model = GPTModel(make_config(**HYBRID), VOCAB)
    layers = model.decoder.layers
    assert [type(layer.self_attention).__name__ for layer in layers] == \
        ["GatedDeltaNet", "SelfAttention", "GatedDeltaNet", "SelfAttention"]
    assert [isinstance(layer.mlp, MoELayer) for layer in layers] == [True, False, True, False]
    assert [layer.layer_number for layer in layers] == [1, 2, 3, 4]
    assert len(model.slots) == 4
    assert model.slots[0]["self_attention.gated_delta_rule"]["backend"] == "local"
    assert model.output_slots["output_layer"] == {"class": "Linear", "backend": "local"}
    assert isinstance(layers[0].self_attention, GatedDeltaNet)


def test_auxiliary_losses_are_summed_over_layers_and_reset_each_forward() -> None:
    model = GPTModel(make_config(**HYBRID), VOCAB)
    model(ids())
    losses = model.auxiliary_losses()
    per_layer = [layer.mlp.aux_losses["moe_load_balancing"] for layer in model.decoder.layers
                 if isinstance(layer.mlp, MoELayer)]
    assert set(losses) == {"moe_load_balancing"}
    assert torch.allclose(losses["moe_load_balancing"], sum(per_layer))
    assert torch.allclose(model.auxiliary_loss(), sum(per_layer).float())
    model.eval()
    model(ids())
    assert model.auxiliary_losses() == {}
    total = model.auxiliary_loss()
    assert total.dim() == 0 and total.item() == 0.0


def test_dsa_model_records_the_indexer_loss() -> None:
    model = GPTModel(make_config(**DSA), VOCAB)
    model(ids())
    losses = model.auxiliary_losses()
    assert set(losses) == {"dsa_indexer"} and losses["dsa_indexer"].item() > 0


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_model_is_causal(kind: str) -> None:
    model = GPTModel(make_config(**CONFIGS[kind]), VOCAB).eval()
    a = ids(1, 10)
    b = a.clone()
    b[:, 6:] = (b[:, 6:] + 1) % VOCAB
    assert torch.allclose(model(a)[:, :6], model(b)[:, :6], atol=1e-12)


def test_pipeline_chunks_are_joined_in_layer_order() -> None:
    cfg = make_config(num_layers=4, pipeline_model_parallel_size=2, **{
        k: v for k, v in HYBRID.items() if k != "num_layers"})
    model = GPTModel(cfg, VOCAB)
    kinds = [type(layer.self_attention).__name__ for layer in model.decoder.layers]
    assert kinds == ["GatedDeltaNet", "SelfAttention", "GatedDeltaNet", "SelfAttention"]
    assert model.decoder.final_layernorm is not None


def test_backend_can_be_a_name_or_a_provider() -> None:
    assert GPTModel(make_config(), VOCAB, backend="local").backend_name == "local"
    assert GPTModel(make_config(), VOCAB, backend=LocalSpecProvider()).backend_name == "local"


def test_too_long_input_names_max_sequence_length() -> None:
    model = GPTModel(make_config(), VOCAB, max_sequence_length=8)
    with pytest.raises(ValueError, match="max_sequence_length=8"):
        model(ids(1, 9))


@pytest.mark.parametrize(
    ("kwargs", "error", "named"),
    [({"vocab_size": 0}, ConfigError, "vocab_size"),
     ({"max_sequence_length": -3}, ConfigError, "max_sequence_length"),
     ({"backend": 42}, ValueError, "backend"),
     ({"backend": "no-such-backend"}, BackendError, "no-such-backend")],
)
def test_bad_constructor_arguments_name_themselves(kwargs: dict, error: type,
                                                   named: str) -> None:
    args = {"vocab_size": VOCAB, **kwargs}
    with pytest.raises(error, match=named):
        GPTModel(make_config(), **args)


def test_bad_input_ids_are_rejected() -> None:
    model = GPTModel(make_config(), VOCAB)
    with pytest.raises(ValueError, match="input_ids"):
        model(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="input_ids"):
        model(torch.zeros(3, dtype=torch.long))
