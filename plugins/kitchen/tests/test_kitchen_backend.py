"""The ``kitchen`` backend: registration, configuration, slot delegation, plans, errors, and
a hybrid model over the ``local`` fallback (exactly local under ``bf16``; trains under fp8)."""

from __future__ import annotations

import sys

import attrs
import pytest
import torch
from attnplug_kitchen.layers import KitchenDotProductAttention
from attnplug_kitchen.provider import KITCHEN_LINEAR_SLOTS, KitchenSpecProvider

from attnplug import BackendError, ConfigError, TransformerConfig
from attnplug.backends import (
    SLOTS,
    LocalSpecProvider,
    SlotNotServed,
    get_provider,
    list_backends,
    reload_backends,
    resolve_backend,
)
from attnplug.layers.linear import LayerNormLinear
from attnplug.layers.model import GPTModel
from attnplug.ops.attention import naive_causal_attention
from attnplug.plan import describe_plan

VOCAB = 32


@pytest.fixture(autouse=True)
def fresh_registry(monkeypatch):
    """Discovery from the installed entry points, without stray plugin settings."""
    for name in ("ATTNPLUG_STRICT_PLUGINS", "ATTNPLUG_DISABLE_PLUGINS"):
        monkeypatch.delenv(name, raising=False)
    reload_backends()
    yield
    reload_backends()


def hybrid(**overrides) -> TransformerConfig:
    """A tiny hybrid: Gated DeltaNet then softmax attention, a dense MLP then an MoE with a
    shared expert, over the local fallback."""
    fields = dict(
        num_layers=2, hidden_size=32, num_attention_heads=2, num_query_groups=1,
        ffn_hidden_size=64, qk_layernorm=True, attention_output_gate=True,
        experimental_attention_variant="gdn", linear_attention_freq=2,
        linear_key_head_dim=16, linear_value_head_dim=16, linear_num_key_heads=1,
        linear_num_value_heads=2, num_moe_experts=4, moe_layer_freq=[0, 1],
        moe_ffn_hidden_size=32, moe_shared_expert_intermediate_size=32,
        backend="kitchen", kitchen_fallback_backend="local",
    )
    fields.update(overrides)
    return TransformerConfig(**fields)


def kitchen_for(config: TransformerConfig) -> KitchenSpecProvider:
    return get_provider("kitchen").configure(config)


def batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (2, 17), generator=gen)
    return ids[:, :-1], ids[:, 1:]


def train(model: GPTModel, steps: int, lr: float = 1e-2) -> list[float]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    inputs, targets = batch()
    losses = []
    for _ in range(steps):
        logits = model(inputs)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
        loss = loss + model.auxiliary_loss()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


# -- registration and configuration -------------------------------------------------------------
def test_kitchen_is_registered_available_and_never_chosen_by_auto():
    info = {i.name: i for i in list_backends()}["kitchen"]
    assert info.available and info.distribution == "attnplug-kitchen"
    assert info.priority < 0
    assert resolve_backend(hybrid(backend="auto")).name != "kitchen"
    assert resolve_backend(hybrid(backend="kitchen")).name == "kitchen"
    assert resolve_backend(hybrid(backend="auto", use_kitchen=True)).name == "kitchen"


def test_the_registry_instance_is_unconfigured_and_configure_reads_the_config():
    registered = get_provider("kitchen")
    assert isinstance(registered, KitchenSpecProvider) and not registered.configured
    with pytest.raises(BackendError, match="not configured.*configure"):
        registered.layer_norm()
    config = hybrid(kitchen_recipe="fp8_current", use_kitchen_attention=True)
    provider = registered.configure(config)
    assert provider is not registered and not registered.configured  # the singleton is kept
    assert provider.name == "kitchen" and provider.fallback.name == "local"
    assert (provider.recipe, provider.use_kitchen_attention,
            provider.kitchen_attention_backend) == ("fp8_current", True, "sdpa")
    assert provider.configure(config) is provider  # explicit settings stand
    explicit = KitchenSpecProvider(LocalSpecProvider(), recipe="fp8_current")
    assert explicit.configure(hybrid()).recipe == "fp8_current"


def test_bad_attention_or_recipe_names_are_config_errors_naming_the_field():
    with pytest.raises(ConfigError, match=r"kitchen_attention_backend='flash'.*'sdpa', 'fa'"):
        KitchenSpecProvider(LocalSpecProvider(), kitchen_attention_backend="flash")
    with pytest.raises(ConfigError, match=r"kitchen_recipe='fp8'.*'bf16', 'fp8_current'"):
        KitchenSpecProvider(LocalSpecProvider(), recipe="fp8")
    with pytest.raises(ConfigError, match="kitchen_attention_backend='flash'"):
        hybrid(kitchen_attention_backend="flash")
    with pytest.raises(ValueError, match="fallback"):
        KitchenSpecProvider("local")


# -- slots --------------------------------------------------------------------------------------
@pytest.mark.parametrize("own_attention", [False, True])
def test_served_by_names_kitchen_for_its_slots_and_the_fallback_for_the_rest(own_attention):
    provider = kitchen_for(hybrid(use_kitchen_attention=own_attention))
    own = set(KITCHEN_LINEAR_SLOTS) | ({"core_attention"} if own_attention else set())
    assert {slot: provider.served_by(slot) for slot in SLOTS} == {
        slot: "kitchen" if slot in own else "local" for slot in SLOTS
    }
    assert provider.fuse_layernorm_and_linear() is False  # the fallback's topology
    assert provider.layer_norm(rms_norm=True) is LocalSpecProvider().layer_norm(rms_norm=True)
    attention = provider.core_attention()
    assert (attention is KitchenDotProductAttention) == own_attention
    with pytest.raises(ValueError, match="slot='attention'"):
        provider.served_by("attention")


def test_a_slot_neither_backend_serves_names_the_slot_and_both_backends():
    provider = kitchen_for(hybrid())
    with pytest.raises(SlotNotServed, match=r"slot 'layer_norm'.*'kitchen'.*fallback 'local'"):
        provider.layer_norm(rms_norm=True, has_residual=True)


def test_supports_combines_the_fallbacks_reasons():
    class Picky(LocalSpecProvider):
        name = "picky"

        def supports(self, config):
            return ["no Gated DeltaNet here"]

    provider = KitchenSpecProvider(Picky())
    assert provider.supports(hybrid()) == ["its fallback 'picky': no Gated DeltaNet here"]
    assert kitchen_for(hybrid()).supports(hybrid()) == []
    with pytest.raises(BackendError, match="no Gated DeltaNet here"):
        GPTModel(hybrid(), VOCAB, backend=provider)


def test_a_fusing_fallback_gets_kitchens_norm_fused_linear():
    class Fusing(LocalSpecProvider):
        name = "fusing"

        def fuse_layernorm_and_linear(self):
            return True

        def column_parallel_layer_norm_linear(self):
            return LayerNormLinear

    config = hybrid()
    torch.manual_seed(0)
    reference = GPTModel(config, VOCAB, backend=Fusing())
    torch.manual_seed(0)
    model = GPTModel(config, VOCAB, backend=KitchenSpecProvider(Fusing()))
    slots = model.slots[1]
    assert slots["self_attention.linear_qkv"] == {"class": "KitchenLayerNormLinear_bf16",
                                                  "backend": "kitchen"}
    assert slots["input_layernorm"] == {"class": "IdentityOp", "backend": "fused"}
    model.load_state_dict(reference.state_dict())
    inputs, _ = batch()
    assert torch.equal(model(inputs), reference(inputs))
    # and attnplug check compares it with local (whose norms are apart from the linears)
    from attnplug.testing import check_backend

    (row,) = check_backend(KitchenSpecProvider(Fusing()), slots=["model"])
    assert row.status == "passed", row.detail


def test_the_plan_shows_kitchen_and_fallback_slots():
    config = hybrid(use_kitchen_attention=True)
    plan = describe_plan(config, backend=kitchen_for(config))
    assert plan["backend"] == "kitchen"
    gdn, attention = plan["layers"][0]["slots"], plan["layers"][1]["slots"]
    assert gdn["self_attention.in_proj"] == {"class": "KitchenLinear_bf16", "backend": "kitchen"}
    assert gdn["self_attention.gated_delta_rule"]["backend"] == "local"
    assert gdn["mlp.linear_fc1"]["backend"] == "kitchen"
    assert attention["self_attention.core_attention"] == {
        "class": "KitchenDotProductAttention", "backend": "kitchen"}
    assert attention["self_attention.q_layernorm"] == {"class": "RMSNorm", "backend": "local"}
    assert attention["mlp.experts"] == {"class": "KitchenSequentialExperts_bf16",
                                        "backend": "kitchen"}
    assert plan["final_layernorm"] == {"class": "RMSNorm", "backend": "local"}


# -- errors from what cannot run here -----------------------------------------------------------
def test_flash_attention_without_attnplug_triton_gives_the_pip_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "attnplug_triton", None)  # not importable
    config = hybrid(use_kitchen_attention=True, kitchen_attention_backend="fa")
    provider = kitchen_for(config)
    with pytest.raises(BackendError, match=r'attnplug-triton.*pip install "attnplug\[triton\]"'):
        provider.core_attention()
    assert any('pip install "attnplug[triton]"' in r for r in provider.supports(config))
    with pytest.raises(BackendError, match=r"attnplug\[triton\]"):
        GPTModel(config, VOCAB, backend="kitchen")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without "
                    "CUDA")
def test_flash_attention_without_a_gpu_says_to_use_sdpa():
    provider = kitchen_for(hybrid(use_kitchen_attention=True, kitchen_attention_backend="fa"))
    with pytest.raises(BackendError, match="kitchen_attention_backend = 'sdpa'"):
        provider.core_attention()


def test_a_fallback_that_cannot_run_names_it_and_says_how_to_fix():
    config = hybrid(kitchen_fallback_backend="te")
    try:
        get_provider("te").configure(config)
    except BackendError:
        pass
    else:
        pytest.skip("the te backend can run here")
    fix = r"kitchen_fallback_backend='te' cannot run here: .*kitchen_fallback_backend = 'local'"
    with pytest.raises(BackendError, match=fix):
        get_provider("kitchen").configure(config)
    with pytest.raises(BackendError, match=fix):
        GPTModel(config, VOCAB, backend="kitchen")
    reasons = get_provider("kitchen").supports(config)
    assert len(reasons) == 1 and "kitchen_fallback_backend = 'local'" in reasons[0]


# -- a hybrid model over the local fallback -----------------------------------------------------
def test_bf16_hybrid_matches_local_exactly_given_the_same_weights():
    config = hybrid(moe_aux_loss_coeff=0.01)
    torch.manual_seed(0)
    local = GPTModel(config, VOCAB, backend="local")
    torch.manual_seed(1)
    kitchen = GPTModel(config, VOCAB, backend="kitchen")
    assert kitchen.backend_name == "kitchen"
    assert kitchen.output_slots["output_layer"] == {"class": "KitchenLinear_bf16",
                                                    "backend": "kitchen"}
    assert list(kitchen.state_dict()) == list(local.state_dict())
    kitchen.load_state_dict(local.state_dict())
    assert train(kitchen, 3) == train(local, 3)
    for (name, a), b in zip(local.named_parameters(), kitchen.parameters(), strict=True):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("own_attention", [False, True])
def test_fp8_hybrid_builds_and_trains(own_attention):
    config = hybrid(kitchen_recipe="fp8_current", use_kitchen_attention=own_attention)
    torch.manual_seed(0)
    model = GPTModel(config, VOCAB, backend="kitchen")
    assert model.slots[1]["mlp.experts"]["class"] == "KitchenSequentialExperts_fp8_current"
    losses = train(model, 8)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.8 * losses[0], losses


def test_kitchen_sdpa_attention_matches_the_reference():
    config = hybrid()
    attention = KitchenDotProductAttention(config)
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 3, 4, 8, generator=gen, dtype=torch.float64)
    k = torch.randn(2, 5, 2, 8, generator=gen, dtype=torch.float64)  # S > T, grouped heads
    v = torch.randn(2, 5, 2, 6, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(attention(q, k, v), naive_causal_attention(q, k, v))
    with pytest.raises(ValueError, match="S >= T"):
        attention(k.repeat(1, 1, 2, 1), q[:, :2], q[:, :2])
    with pytest.raises(ValueError, match="softmax_scale"):
        KitchenDotProductAttention(config, softmax_scale=-1.0)


def test_the_config_alone_selects_a_configured_kitchen():
    config = hybrid(kitchen_recipe="fp8_current")
    provider = resolve_backend(config)
    assert isinstance(provider, KitchenSpecProvider) and provider.configured
    assert provider.recipe == "fp8_current" and provider.fallback.name == "local"
    model = GPTModel(config, VOCAB)
    assert model.slots[1]["mlp.experts"]["class"] == "KitchenSequentialExperts_fp8_current"
    assert describe_plan(config)["layers"][1]["slots"]["mlp.experts"]["backend"] == "kitchen"
    with pytest.raises(BackendError, match="kitchen_fallback_backend = 'local'"):
        resolve_backend(hybrid(kitchen_fallback_backend="no_such_backend"))


def test_the_config_path_builds_with_an_explicit_provider_too():
    config = attrs.evolve(hybrid(), backend="auto")
    model = GPTModel(config, VOCAB, backend=KitchenSpecProvider(LocalSpecProvider(),
                                                                recipe="fp8_current"))
    assert model.backend_name == "kitchen"
    assert model.slots[0]["self_attention.in_proj"]["class"] == "KitchenLinear_fp8_current"
