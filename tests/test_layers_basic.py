"""Linear, norms, RoPE, MLP, IdentityOp and the local backend's slots, against float64 math."""

from __future__ import annotations

import math

import pytest
import torch

from attnplug import ConfigError, TransformerConfig
from attnplug.backends.base import SlotNotServed
from attnplug.backends.local import LocalSpecProvider
from attnplug.layers.identity import IdentityOp
from attnplug.layers.linear import LayerNormLinear, Linear
from attnplug.layers.mlp import MLP
from attnplug.layers.norms import GatedRMSNorm, LayerNorm, RMSNorm
from attnplug.layers.rope import apply_rope
from attnplug.layers.submodules import MLPSubmodules
from attnplug.spec import ModuleSpec, build_module
from attnplug.specs import _get_dense_mlp_module_spec

LOCAL = LocalSpecProvider()


def make_config(**overrides: object) -> TransformerConfig:
    fields = dict(num_layers=2, hidden_size=16, num_attention_heads=4, ffn_hidden_size=24,
                  params_dtype="float64", backend="local")
    fields.update(overrides)
    return TransformerConfig(**fields)


def close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-10) -> bool:
    return torch.allclose(a, b, atol=tol, rtol=tol)


# -- IdentityOp -----------------------------------------------------------------------------------
def test_identity_ignores_constructor_args_and_returns_first_input() -> None:
    op = IdentityOp(1, "x", config=None, hidden_size=3)
    x = torch.randn(2, 3)
    assert op(x, 5, cache=None) is x


# -- Linear ---------------------------------------------------------------------------------------
def test_linear_matches_matmul_and_uses_config_dtype_and_std() -> None:
    cfg = make_config(init_method_std=0.5)
    layer = Linear(16, 300, config=cfg, bias=True)
    assert layer.weight.dtype == torch.float64 and layer.weight.shape == (300, 16)
    assert torch.all(layer.bias == 0)
    assert abs(layer.weight.std().item() - 0.5) < 0.05
    x = torch.randn(2, 3, 16, dtype=torch.float64)
    assert close(layer(x), x @ layer.weight.T + layer.bias)


def test_linear_init_method_fills_the_weight() -> None:
    layer = Linear(4, 5, config=make_config(), init_method=lambda w: torch.nn.init.ones_(w))
    assert torch.all(layer.weight == 1)


@pytest.mark.parametrize(
    ("args", "kwargs", "named"),
    [((0, 4), {}, "input_size"), ((4, -1), {}, "output_size"), ((4, 4.0), {}, "output_size"),
     ((4, 4), {"bias": "yes"}, "bias"), ((4, 4), {"init_method": 3}, "init_method")],
)
def test_linear_bad_args_name_the_argument(args: tuple, kwargs: dict, named: str) -> None:
    with pytest.raises(ValueError, match=named):
        Linear(*args, config=make_config(), **kwargs)


def test_linear_needs_a_transformer_config() -> None:
    with pytest.raises(ConfigError, match="config"):
        Linear(4, 4, config={"hidden_size": 4})


def test_layer_norm_linear_normalises_then_projects() -> None:
    cfg = make_config()
    layer = LayerNormLinear(16, 8, config=cfg)
    with torch.no_grad():
        layer.layer_norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(3, 16, dtype=torch.float64)
    rms = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + cfg.layernorm_epsilon)
    assert close(layer(x), (rms * layer.layer_norm.weight) @ layer.weight.T)


# -- norms ----------------------------------------------------------------------------------------
def test_rms_norm_and_layer_norm_match_their_formulas() -> None:
    cfg = make_config(layernorm_epsilon=1e-3)
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    rms, ln = RMSNorm(config=cfg, hidden_size=16), LayerNorm(config=cfg, hidden_size=16, eps=1e-2)
    with torch.no_grad():
        for p in (rms.weight, ln.weight, ln.bias):
            p.normal_()
    ref_rms = x / torch.sqrt((x**2).mean(-1, keepdim=True) + 1e-3) * rms.weight
    mean, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
    ref_ln = (x - mean) / torch.sqrt(var + 1e-2) * ln.weight + ln.bias
    assert close(rms(x), ref_rms) and close(ln(x), ref_ln)


def test_norms_compute_in_float32_and_return_the_input_dtype() -> None:
    norm = RMSNorm(config=make_config(params_dtype="bfloat16"), hidden_size=16)
    x = torch.randn(4, 16, dtype=torch.bfloat16) * 100
    y = norm(x)
    assert y.dtype == torch.bfloat16
    ref = x.float() / torch.sqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-5)
    assert torch.allclose(y.float(), ref, atol=2e-2, rtol=1e-2)


def test_gated_rms_norm_is_rms_norm_times_silu_gate() -> None:
    norm = GatedRMSNorm(config=make_config(), hidden_size=6)
    x, z = torch.randn(3, 6, dtype=torch.float64), torch.randn(3, 6, dtype=torch.float64)
    ref = x / torch.sqrt((x**2).mean(-1, keepdim=True) + 1e-5) * (z / (1 + torch.exp(-z)))
    assert close(norm(x, z), ref) and close(norm(x), RMSNorm.forward(norm, x))


@pytest.mark.parametrize(("kwargs", "named"), [({"hidden_size": 0}, "hidden_size"),
                                               ({"hidden_size": 4, "eps": -1.0}, "eps")])
def test_norm_bad_args_name_the_argument(kwargs: dict, named: str) -> None:
    with pytest.raises(ValueError, match=named):
        RMSNorm(config=make_config(), **kwargs)


# -- RoPE -----------------------------------------------------------------------------------------
def naive_rope(x: torch.Tensor, rot: int, base: float, offset: int) -> torch.Tensor:
    """Pair channel i with i + rot/2, angle (offset + t)·base^(−2i/rot), one scalar at a time."""
    out = x.clone()
    half = rot // 2
    for t in range(x.shape[1]):
        for i in range(half):
            theta = (offset + t) * base ** (-2 * i / rot)
            c, s = math.cos(theta), math.sin(theta)
            a, b = x[:, t, :, i], x[:, t, :, i + half]
            out[:, t, :, i], out[:, t, :, i + half] = a * c - b * s, b * c + a * s
    return out


@pytest.mark.parametrize(("rot", "offset"), [(8, 0), (4, 3), (0, 0)])
def test_rope_matches_the_pairwise_rotation(rot: int, offset: int) -> None:
    x = torch.randn(2, 5, 3, 8, dtype=torch.float64)
    y = apply_rope(x, rot, base=100.0, position_offset=offset)
    assert close(y, naive_rope(x, rot, 100.0, offset))


# -- MLP ------------------------------------------------------------------------------------------
def naive_mlp(layer: MLP, x: torch.Tensor, act: str, gated: bool) -> torch.Tensor:
    acts = {"silu": lambda a: a * torch.sigmoid(a), "relu": lambda a: a.clamp_min(0),
            "gelu": lambda a: 0.5 * a * (1 + torch.erf(a / math.sqrt(2))),
            "squared_relu": lambda a: a.clamp_min(0) ** 2}
    h = x @ layer.linear_fc1.weight.T
    if gated:
        n = h.shape[-1] // 2
        h = acts[act](h[..., :n]) * h[..., n:]
    else:
        h = acts[act](h)
    return h @ layer.linear_fc2.weight.T


@pytest.mark.parametrize(("act", "gated"), [("silu", True), ("gelu", False), ("relu", True),
                                            ("squared_relu", False)])
def test_mlp_matches_float64_reference(act: str, gated: bool) -> None:
    cfg = make_config(activation_func=act, gated_linear_unit=gated)
    layer = build_module(_get_dense_mlp_module_spec(cfg, LOCAL), config=cfg, layer_number=1)
    assert layer.linear_fc1.weight.shape == ((48 if gated else 24), 16)
    x = torch.randn(2, 7, 16, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    assert close(y, naive_mlp(layer, x, act, gated))
    y.square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in layer.parameters())
    assert x.grad is not None


def test_mlp_ffn_hidden_size_and_activation_slot_override_the_config() -> None:
    cfg = make_config(activation_func="silu", gated_linear_unit=False)
    subs = MLPSubmodules(linear_fc1=Linear, linear_fc2=Linear,
                         activation_func=ModuleSpec(torch.tanh))
    layer = MLP(cfg, subs, ffn_hidden_size=10)
    x = torch.randn(3, 16, dtype=torch.float64)
    ref = torch.tanh(x @ layer.linear_fc1.weight.T) @ layer.linear_fc2.weight.T
    assert layer.linear_fc1.weight.shape == (10, 16) and close(layer(x), ref)


def test_mlp_bad_args_name_the_argument() -> None:
    subs = MLPSubmodules(linear_fc1=Linear, linear_fc2=Linear)
    with pytest.raises(ValueError, match="ffn_hidden_size"):
        MLP(make_config(), subs, ffn_hidden_size=0)
    with pytest.raises(ValueError, match="linear_fc2"):
        MLP(make_config(), MLPSubmodules(linear_fc1=Linear))
    with pytest.raises(ConfigError, match="MLP: layer_number"):
        build_module(ModuleSpec(MLP, submodules=subs), config=make_config(), layer_number=0)


# -- the local backend ----------------------------------------------------------------------------
def test_local_provider_slots() -> None:
    from attnplug.layers.attention import DotProductAttention
    from attnplug.layers.moe import BatchedExperts, SequentialExperts
    from attnplug.ops.gated_delta_rule import chunk_gated_delta_rule

    assert LOCAL.name == "local"
    assert LOCAL.linear() is LOCAL.column_parallel_linear() is LOCAL.row_parallel_linear() is Linear
    assert LOCAL.fuse_layernorm_and_linear() is False
    assert LOCAL.column_parallel_layer_norm_linear() is None
    assert LOCAL.layer_norm(rms_norm=True) is RMSNorm
    assert LOCAL.layer_norm(rms_norm=False, for_qk=True) is LayerNorm
    assert LOCAL.core_attention() is DotProductAttention
    assert LOCAL.grouped_mlp_modules(True) is BatchedExperts
    assert LOCAL.grouped_mlp_modules(False) is SequentialExperts
    assert LOCAL.activation_func() is None
    assert LOCAL.gated_delta_rule() is chunk_gated_delta_rule
    assert callable(LOCAL.dsa_indexer_topk()) and callable(LOCAL.sparse_attention())


def test_local_provider_refuses_residual_norm_with_a_reason() -> None:
    with pytest.raises(SlotNotServed, match="has_residual"):
        LOCAL.layer_norm(rms_norm=True, has_residual=True)


def test_local_provider_subclass_replaces_one_slot() -> None:
    class Faster(LocalSpecProvider):
        name = "faster"

        def core_attention(self) -> type:
            return IdentityOp

    assert Faster().core_attention() is IdentityOp and Faster().linear() is Linear


def test_importing_layers_package_does_not_import_torch() -> None:
    import subprocess
    import sys

    code = ("import sys, attnplug.layers.submodules, attnplug.layers; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
