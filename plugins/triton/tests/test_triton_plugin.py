"""The triton plugin and its provider: registration, availability, slots (no GPTModel)."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import subprocess
import sys

import pytest
import torch
from triton_cases import DEVICE, assert_matches

from attnplug import TransformerConfig
from attnplug.backends import KERNEL_SLOTS, LocalSpecProvider, SlotNotServed


def _config(**overrides) -> TransformerConfig:
    return TransformerConfig(num_layers=1, hidden_size=64, num_attention_heads=4, **overrides)


def test_loading_the_plugin_imports_neither_triton_nor_torch() -> None:
    code = ("import sys, attnplug_triton.plugin as p; p.attnplug_backends(); "
            "print(sorted(m for m in ('torch', 'triton') if m in sys.modules))")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, check=True)
    assert done.stdout.strip() == "[]"


def test_the_hook_registers_triton_above_local() -> None:
    from attnplug_triton.plugin import attnplug_backends, check

    (backend,) = attnplug_backends()
    assert backend.name == "triton"
    assert backend.priority > 0  # local's
    assert backend.provider == "attnplug_triton.provider:TritonSpecProvider"
    assert backend.check is check


def test_check_says_when_triton_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    from attnplug_triton import plugin

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == "triton" else find_spec(name, *args))
    (reason,) = plugin.check()
    assert "Triton is not installed" in reason and "pip install" in reason


def test_check_needs_a_cuda_device_or_the_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    from attnplug_triton import plugin

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    (reason,) = plugin.check()
    assert "no CUDA device" in reason and "TRITON_INTERPRET=1" in reason
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert plugin.check() == []


@pytest.fixture
def fresh_registry():
    """Discovery forgotten before and after (this folder's interpreter setting is test-local)."""
    from attnplug.backends import reload_backends

    reload_backends()
    yield
    reload_backends()


def test_get_provider_finds_the_installed_backend(fresh_registry) -> None:
    try:
        importlib.metadata.distribution("attnplug-triton")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("attnplug-triton is not installed (pip install -e plugins/triton), so its "
                    "entry point is not registered")
    from attnplug_triton.provider import TritonSpecProvider

    from attnplug.backends import get_provider, list_backends

    provider = get_provider("triton")
    assert isinstance(provider, TritonSpecProvider)
    assert provider.name == "triton"
    info = next(i for i in list_backends() if i.name == "triton")
    assert (info.available, info.distribution, info.priority) == (True, "attnplug-triton", 10)


def test_provider_serves_attention_and_norms_and_inherits_the_rest() -> None:
    from attnplug_triton.layers import FlashAttention, LayerNorm, RMSNorm
    from attnplug_triton.provider import TritonSpecProvider

    provider = TritonSpecProvider()
    assert provider.core_attention() is FlashAttention
    assert provider.layer_norm(rms_norm=True) is RMSNorm
    assert provider.layer_norm(rms_norm=True, for_qk=True) is RMSNorm
    assert provider.layer_norm() is LayerNorm
    assert RMSNorm.accepts_gate and LayerNorm.accepts_gate
    with pytest.raises(SlotNotServed, match="has_residual"):
        provider.layer_norm(rms_norm=True, has_residual=True)
    local = LocalSpecProvider()
    assert provider.linear() is local.linear()
    from attnplug_triton.ops.conv.fused import causal_conv1d
    from attnplug_triton.ops.gated_delta_rule import gated_delta_rule

    assert provider.gated_delta_rule() is gated_delta_rule
    assert provider.causal_conv1d() is causal_conv1d
    assert TritonSpecProvider(experimental_kernels=True).causal_conv1d() is causal_conv1d
    assert provider.served_by("gated_delta_rule") == provider.served_by("causal_conv1d") == "triton"
    for slot in set(KERNEL_SLOTS) - {"gated_delta_rule", "causal_conv1d"}:  # the DSA kernels
        assert getattr(provider, slot)() is not getattr(local, slot)()
        assert provider.served_by(slot) == "triton"
        assert TritonSpecProvider(experimental_kernels=True).served_by(slot) == "triton"
    assert provider.served_by("core_attention") == provider.served_by("layer_norm") == "triton"
    assert provider.served_by("linear") == "local"


def test_gdn_head_dims_not_verified_on_a_gpu_take_local_unless_experimental(monkeypatch) -> None:
    from attnplug_triton.provider import GPU_VERIFIED_GDN_DIM, TritonSpecProvider

    from attnplug.specs import (
        describe_layer_spec,
        get_transformer_layer_with_experimental_attention_variant_spec,
    )

    monkeypatch.delenv("ATTNPLUG_TRITON_EXPERIMENTAL", raising=False)
    provider = TritonSpecProvider()
    verified = _config(experimental_attention_variant="gdn", linear_attention_freq=[1],
                       linear_key_head_dim=128,
                       linear_value_head_dim=GPU_VERIFIED_GDN_DIM)
    assert provider.configure(verified) is provider
    for k, v in ((256, 128), (128, 256)):
        wide = _config(experimental_attention_variant="gdn", linear_attention_freq=[1],
                       linear_key_head_dim=k,
                       linear_value_head_dim=v)
        configured = provider.configure(wide)
        assert configured.served_by("gated_delta_rule") == "local"
        assert configured.served_by("core_attention") == "triton"
        (spec,) = get_transformer_layer_with_experimental_attention_variant_spec(wide, configured)
        assert describe_layer_spec(spec)["self_attention.gated_delta_rule"]["backend"] == "local"
        experimental = TritonSpecProvider(experimental_kernels=True)
        assert experimental.configure(wide) is experimental
        assert experimental.served_by("gated_delta_rule") == "triton"
    monkeypatch.setenv("ATTNPLUG_TRITON_EXPERIMENTAL", "1")
    assert TritonSpecProvider().configure(wide).served_by("gated_delta_rule") == "triton"


def test_supports_names_what_the_kernels_cannot_take() -> None:
    from attnplug_triton.provider import TritonSpecProvider

    provider = TritonSpecProvider()
    assert provider.supports(_config()) == []
    (reason,) = provider.supports(_config(params_dtype="float64"))
    assert "float64" in reason
    (reason,) = provider.supports(_config(kv_channels=512))
    assert "head_dim=512" in reason


@pytest.mark.parametrize("rms", [True, False])
def test_norm_loads_the_local_state_dict_and_matches_it(rms: bool) -> None:
    from attnplug_triton import layers

    from attnplug.layers import norms as local_norms

    config = _config()
    local_cls, ours_cls = ((local_norms.RMSNorm, layers.RMSNorm) if rms
                           else (local_norms.LayerNorm, layers.LayerNorm))
    local = local_cls(config=config, hidden_size=40, eps=1e-6).to(DEVICE)
    with torch.no_grad():
        for p in local.parameters():
            p.add_(0.1 * torch.randn_like(p))
    ours = ours_cls(config=config, hidden_size=40, eps=1e-6).to(DEVICE)
    ours.load_state_dict(local.state_dict())
    x = torch.randn(3, 5, 40, device=DEVICE)
    gate = torch.randn(3, 5, 40, device=DEVICE)
    assert_matches("y", ours(x), local(x), torch.float32)
    assert_matches("gated y", ours(x, gate=gate), local_norms.gated_norm(local, x, gate),
                   torch.float32)


def test_flash_attention_module_matches_the_local_core_attention() -> None:
    from attnplug_triton.layers import FlashAttention

    from attnplug.layers.attention import DotProductAttention

    config = _config()
    q = torch.randn(2, 9, 4, 16, device=DEVICE)
    k = torch.randn(2, 12, 2, 16, device=DEVICE)
    v = torch.randn(2, 12, 2, 16, device=DEVICE)
    ours = FlashAttention(config, layer_number=2, softmax_scale=0.5)
    local = DotProductAttention(config, layer_number=2, softmax_scale=0.5)
    assert_matches("o", ours(q, k, v), local(q, k, v), torch.float32)


def test_the_conformance_kit_passes_the_triton_backend() -> None:
    """``attnplug check triton`` (``attnplug.testing``): every slot the kernels serve against
    the float64 references, and the small hybrid model against local's, on this machine's
    device (the interpreter here, float32; ``--device cuda --dtype bfloat16`` on a GPU)."""
    from attnplug_triton.provider import TritonSpecProvider

    from attnplug.testing import check_backend

    dtype = torch.float32 if torch.device(DEVICE).type == "cpu" else torch.bfloat16
    results = check_backend(TritonSpecProvider(), device=DEVICE, dtype=dtype)
    assert not [r for r in results if not r.ok]
    passed = {r.slot for r in results if r.status == "passed"}
    assert {"core_attention", "layer_norm", "model", *KERNEL_SLOTS} <= passed
