"""The te plugin and provider without Transformer Engine: registration, check() reasons, which
backend serves which slot. Runs for real on the CPU (TE's modules are stood in by dummies)."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import attnplug_te.plugin as plugin
import attnplug_te.provider as provider_module
import pytest
from attnplug_te.provider import TESpecProvider

from attnplug import TransformerConfig
from attnplug.backends import (
    KERNEL_SLOTS,
    BackendError,
    LocalSpecProvider,
    SlotNotServed,
    get_provider,
    list_backends,
    reload_backends,
)
from attnplug.specs import (
    describe_layer_spec,
    get_transformer_layer_with_experimental_attention_variant_spec,
)

ROOT = Path(__file__).resolve().parents[3]
PIP_LINE = 'pip install "attnplug[te]"'


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                          timeout=300)


# -- the plugin ---------------------------------------------------------------------------------
def test_loading_the_plugin_imports_neither_te_nor_torch() -> None:
    result = run_python(
        "import sys\n"
        "import attnplug_te.plugin as plugin\n"
        "(backend,) = plugin.attnplug_backends()\n"
        "print(backend.name, backend.priority, backend.provider)\n"
        "print(sorted({'torch', 'transformer_engine'} & set(sys.modules)))\n"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[:2] == ["te 20 attnplug_te.provider:TESpecProvider", "[]"]


def test_check_without_te_names_the_pip_line_and_imports_no_torch() -> None:
    result = run_python(
        "import importlib.util, sys\n"
        "real = importlib.util.find_spec\n"
        "importlib.util.find_spec = lambda name, *a: (None if name == 'transformer_engine'\n"
        "                                             else real(name, *a))\n"
        "from attnplug_te.plugin import check\n"
        "print(check())\n"
        "print(sorted({'torch', 'transformer_engine'} & set(sys.modules)))\n"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[:2] == [
        f"['transformer_engine is not installed: {PIP_LINE}']", "[]"]


def test_check_with_te_but_no_gpu_says_there_is_no_cuda_device(monkeypatch) -> None:
    import torch

    monkeypatch.setattr(plugin, "_te_is_installed", lambda: True)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    (reason,) = plugin.check()
    assert reason.startswith("no CUDA device is visible")


def test_check_with_te_and_a_cpu_only_torch_says_so(monkeypatch) -> None:
    import torch

    monkeypatch.setattr(plugin, "_te_is_installed", lambda: True)
    monkeypatch.setattr(torch.version, "cuda", None)
    (reason,) = plugin.check()
    assert "CPU-only build" in reason and "CUDA build of torch" in reason


def test_check_passes_with_te_and_a_gpu(monkeypatch) -> None:
    import torch

    monkeypatch.setattr(plugin, "_te_is_installed", lambda: True)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert plugin.check() == []


@pytest.fixture
def registry(monkeypatch):
    """A fresh registry (the entry points installed in this environment), cleaned up after."""
    try:
        importlib.metadata.distribution("attnplug-te")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("attnplug-te is not installed, so its entry point is not registered: "
                    "pip install --no-deps -e plugins/te")
    for name in ("ATTNPLUG_STRICT_PLUGINS", "ATTNPLUG_DISABLE_PLUGINS"):
        monkeypatch.delenv(name, raising=False)
    reload_backends()
    yield
    reload_backends()


def test_te_is_listed_through_its_entry_point(registry) -> None:
    (info,) = [info for info in list_backends() if info.name == "te"]
    assert (info.distribution, info.priority, info.error) == ("attnplug-te", 20, None)
    assert info.available == (plugin.check() == [])


def test_get_provider_without_te_is_an_error_with_the_pip_line(registry, monkeypatch) -> None:
    monkeypatch.setattr(plugin, "_te_is_installed", lambda: False)
    reload_backends()
    with pytest.raises(BackendError, match=r"'te'.*cannot run here.*attnplug\[te\]"):
        get_provider("te")


def test_provider_without_an_importable_te_raises_import_error_with_the_pip_line(
        monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "transformer_engine.pytorch", None)  # import fails
    monkeypatch.delitem(sys.modules, "attnplug_te.modules", raising=False)
    with pytest.raises(ImportError, match=r"cannot import Transformer Engine.*attnplug\[te\]"):
        TESpecProvider()


# -- the provider, with dummy TE modules --------------------------------------------------------
DUMMY_MODULES = SimpleNamespace(**{
    name: type(name, (), {})
    for name in ("TELinear", "TELayerNormLinear", "TERMSNorm", "TELayerNorm",
                 "TEDotProductAttention", "TEGroupedExperts")
})


def kernel(name: str):
    def run(*args, **kwargs):
        raise AssertionError(f"{name} is a dummy kernel")

    run.__name__ = run.__qualname__ = name
    return run


class GdnOnlyTriton(LocalSpecProvider):
    """Plays a triton backend that serves only the gated delta rule (and refuses float16)."""

    name = "triton"

    def supports(self, config) -> list[str]:
        return ["it refuses float16"] if config.params_dtype == "float16" else []

    def configure(self, config):
        return NoGdnTriton() if config.linear_key_head_dim > 16 else self

    def gated_delta_rule(self):
        return kernel("triton_gdr")

    def dsa_indexer_topk(self):
        raise self._not_served("dsa_indexer_topk")

    def sparse_attention(self):
        raise self._not_served("sparse_attention")


class NoGdnTriton(GdnOnlyTriton):
    """What ``GdnOnlyTriton.configure`` gives for head dims above 16: no kernels at all."""

    def gated_delta_rule(self):
        raise self._not_served("gated_delta_rule")


class KernelLocal(LocalSpecProvider):
    """The local backend with dummy kernels (the test does not depend on attnplug.ops)."""

    def gated_delta_rule(self):
        return kernel("local_gdr")

    def dsa_indexer_topk(self):
        return kernel("local_topk")

    def sparse_attention(self):
        return kernel("local_sparse")


def make_provider(monkeypatch, triton: bool, kernel_backend: str | None = None) -> TESpecProvider:
    fallbacks = {"triton": GdnOnlyTriton() if triton else None, "local": KernelLocal()}
    monkeypatch.setattr(provider_module, "_te_modules", lambda: DUMMY_MODULES)
    monkeypatch.setattr(provider_module, "_fallback_provider", fallbacks.get)
    return TESpecProvider(kernel_backend=kernel_backend)


def hybrid_config(**overrides) -> TransformerConfig:
    fields = dict(num_layers=4, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                  experimental_attention_variant="gdn", linear_attention_freq=[1, 0, 1, 0],
                  linear_key_head_dim=16, linear_value_head_dim=16, linear_num_key_heads=2,
                  linear_num_value_heads=4, num_moe_experts=4, moe_layer_freq=[1, 1, 0, 0],
                  qk_layernorm=True, params_dtype="bfloat16", backend="local")
    fields.update(overrides)
    return TransformerConfig(**fields)


def test_module_slots_are_te_modules_and_norms_fuse_into_linears(monkeypatch) -> None:
    te = make_provider(monkeypatch, triton=False)
    assert te.linear() is te.column_parallel_linear() is te.row_parallel_linear() \
        is DUMMY_MODULES.TELinear
    assert te.fuse_layernorm_and_linear() is True
    assert te.column_parallel_layer_norm_linear() is DUMMY_MODULES.TELayerNormLinear
    assert te.layer_norm(rms_norm=True, for_qk=True) is DUMMY_MODULES.TERMSNorm
    assert te.layer_norm(rms_norm=False) is DUMMY_MODULES.TELayerNorm
    assert te.core_attention() is DUMMY_MODULES.TEDotProductAttention
    assert te.grouped_mlp_modules(False) is te.grouped_mlp_modules(True) \
        is DUMMY_MODULES.TEGroupedExperts
    assert te.activation_func() is None
    assert all(te.served_by(slot) == "te" for slot in ("linear", "layer_norm", "core_attention"))


def test_a_norm_fused_with_the_residual_is_not_served(monkeypatch) -> None:
    te = make_provider(monkeypatch, triton=False)
    with pytest.raises(SlotNotServed, match="has_residual"):
        te.layer_norm(rms_norm=True, has_residual=True)


def test_kernels_come_from_local_when_triton_cannot_run(monkeypatch) -> None:
    te = make_provider(monkeypatch, triton=False)
    assert te.gated_delta_rule().__name__ == "local_gdr"
    assert {te.served_by(s) for s in KERNEL_SLOTS} == {"local"}
    assert te.dsa_indexer_loss() is LocalSpecProvider().dsa_indexer_loss()


def test_kernels_come_from_triton_where_it_serves_them_else_local(monkeypatch) -> None:
    te = make_provider(monkeypatch, triton=True)
    assert (te.served_by("gated_delta_rule"), te.gated_delta_rule().__name__) == (
        "triton", "triton_gdr")
    assert (te.served_by("dsa_indexer_topk"), te.dsa_indexer_topk().__name__) == (
        "local", "local_topk")
    assert te.served_by("sparse_attention") == "local"


def test_kernel_backend_local_skips_triton(monkeypatch) -> None:
    te = make_provider(monkeypatch, triton=True, kernel_backend="local")
    assert te.served_by("gated_delta_rule") == "local"


def test_configure_takes_local_kernels_when_triton_refuses_the_config(monkeypatch) -> None:
    te = make_provider(monkeypatch, triton=True)
    assert te.configure(hybrid_config()) is te
    refused = te.configure(hybrid_config(params_dtype="float16"))
    assert refused.served_by("gated_delta_rule") == "local"


def test_configure_passes_the_config_to_the_kernel_backend(monkeypatch) -> None:
    te = make_provider(monkeypatch, triton=True)
    configured = te.configure(hybrid_config(linear_key_head_dim=32))
    assert configured is not te and isinstance(configured, TESpecProvider)
    assert [p.name for p in configured._kernel_providers()] == ["triton", "local"]
    assert (configured.served_by("gated_delta_rule"),
            configured.gated_delta_rule().__name__) == ("local", "local_gdr")
    assert te.served_by("gated_delta_rule") == "triton"  # te itself is unchanged


def test_float64_is_not_supported(monkeypatch) -> None:
    te = make_provider(monkeypatch, triton=False)
    assert te.supports(hybrid_config()) == []
    (reason,) = te.supports(hybrid_config(params_dtype="float64"))
    assert "float64" in reason and "backend='local'" in reason


def test_the_plan_names_te_modules_and_the_kernel_backend(monkeypatch) -> None:
    te = make_provider(monkeypatch, triton=True)
    layers = get_transformer_layer_with_experimental_attention_variant_spec(hybrid_config(), te)
    gdn_moe, sdpa_moe, gdn_dense, sdpa_dense = (describe_layer_spec(spec) for spec in layers)
    assert gdn_moe["self_attention.in_proj"] == {"class": "TELayerNormLinear", "backend": "te"}
    assert gdn_moe["self_attention.gated_delta_rule"] == {"class": "triton_gdr",
                                                          "backend": "triton"}
    assert gdn_moe["input_layernorm"]["backend"] == "fused"
    assert gdn_moe["pre_mlp_layernorm"] == {"class": "TERMSNorm", "backend": "te"}
    assert gdn_moe["mlp.experts"] == {"class": "TEGroupedExperts", "backend": "te"}
    assert sdpa_moe["self_attention.linear_qkv"]["class"] == "TELayerNormLinear"
    assert sdpa_moe["self_attention.core_attention"]["class"] == "TEDotProductAttention"
    assert sdpa_moe["self_attention.q_layernorm"]["class"] == "TERMSNorm"
    assert gdn_dense["mlp.linear_fc1"]["class"] == "TELayerNormLinear"
    assert gdn_dense["pre_mlp_layernorm"]["backend"] == "fused"
    assert sdpa_dense["mlp.linear_fc2"]["class"] == "TELinear"
