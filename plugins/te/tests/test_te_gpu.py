"""The te backend on the GPU: every slot, and a whole hybrid model, against ``local``.

Skipped, with the reason, where Transformer Engine is not installed or no CUDA device is visible
(CI, laptops). On the GPU machine: ``bash plugins/te/gpu_check.sh``.

Each slot test copies the local module's weights into the TE one (``attnplug_te.convert``), runs
both on the same inputs and bounds the normalised error ``max|te − local| / max|local|`` of the
output and of every gradient:

- float32: 3e-3 — TE runs float32 GEMMs in TF32 (10-bit mantissa), the local layers in full fp32;
- bfloat16: 2e-2 — both round to bfloat16 (8-bit mantissa) at slightly different points.

The whole-model test measures both models against the local model in float64 (same weights):
TE's error ``‖te − ref‖ / ‖ref‖`` in logits, loss and each parameter's gradient must be at most
3× the local model's own error, or under 1e-2 (float32) / 5e-2 (bfloat16). Gradients that are
sums with heavy cancellation (GDN's ``A_log``) carry percent-level error in bfloat16 whatever the
backend, so a fixed bound would be either loose everywhere or flaky there; mapping or semantic
mistakes give errors of order 1.
"""

from __future__ import annotations

import importlib.util

import pytest


def _skip_reason() -> str | None:
    if importlib.util.find_spec("transformer_engine") is None:
        return ('transformer_engine not installed (pip install "attnplug[te]"); these tests run '
                "on the GPU machine: bash plugins/te/gpu_check.sh")
    import torch

    if not torch.cuda.is_available():
        return "no CUDA device: Transformer Engine runs only on NVIDIA GPUs"
    return None


SKIP_REASON = _skip_reason()
if SKIP_REASON is not None:
    pytest.skip(SKIP_REASON, allow_module_level=True)

import attnplug_te.modules as te_modules  # noqa: E402
import attrs  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from attnplug_te.convert import (  # noqa: E402
    load_local_state,
    paired_parameters,
    te_to_local_state_dict,
)
from attnplug_te.provider import TESpecProvider  # noqa: E402
from torch import nn  # noqa: E402

from attnplug import TransformerConfig  # noqa: E402
from attnplug.backends import (  # noqa: E402
    KERNEL_SLOTS,
    BackendError,
    LocalSpecProvider,
    SlotNotServed,
    get_provider,
)
from attnplug.layers.attention import DotProductAttention  # noqa: E402
from attnplug.layers.linear import LayerNormLinear, Linear  # noqa: E402
from attnplug.layers.model import GPTModel  # noqa: E402
from attnplug.layers.moe import SequentialExperts  # noqa: E402
from attnplug.layers.norms import LayerNorm, RMSNorm  # noqa: E402

CUDA = torch.device("cuda")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
TOLERANCE = {torch.float32: 3e-3, torch.bfloat16: 2e-2}
MODEL_RATIO, MODEL_FLOOR = 3.0, {torch.float32: 1e-2, torch.bfloat16: 5e-2}
LOCAL = LocalSpecProvider()


@pytest.fixture(scope="module")
def te() -> TESpecProvider:
    """The te provider with local kernels, so only TE's modules differ from the local model."""
    return TESpecProvider(kernel_backend="local")


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def make_config(dtype: str, **overrides: object) -> TransformerConfig:
    fields = dict(num_layers=2, hidden_size=64, num_attention_heads=8, num_query_groups=2,
                  kv_channels=32, ffn_hidden_size=96, num_moe_experts=4, moe_ffn_hidden_size=48,
                  params_dtype=dtype, backend="local")
    fields.update(overrides)
    return TransformerConfig(**fields)


def max_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``max|actual − expected| / max|expected|`` (0 when both are 0)."""
    diff = (actual.double() - expected.double()).abs().max().item()
    scale = expected.double().abs().max().item()
    return diff / scale if scale else diff


def norm_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``‖actual − expected‖ / ‖expected‖`` (0 when both are 0)."""
    diff = (actual.double() - expected.double()).norm().item()
    scale = expected.double().norm().item()
    return diff / scale if scale else diff


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str,
                 error=max_error) -> None:
    assert actual.shape == expected.shape, f"{what}: {actual.shape} != {expected.shape}"
    err, tol = error(actual, expected), TOLERANCE[dtype]
    assert err <= tol, f"{what}: normalised error {err:.2e} > {tol:.0e} ({dtype})"


def randomise(module: nn.Module) -> None:
    """Random values in every parameter (norm weights near 1, biases near 0)."""
    with torch.no_grad():
        for name, param in module.named_parameters():
            noise = torch.randn_like(param, dtype=torch.float32)
            if name.endswith("bias"):
                param.copy_(0.1 * noise)
            elif param.dim() == 1:
                param.copy_(1.0 + 0.2 * noise)
            else:
                param.copy_(0.05 * noise)


def compare(te_module: nn.Module, local_module: nn.Module, inputs: list[torch.Tensor],
            dtype: torch.dtype, *, call=None) -> None:
    """Copy the local weights into ``te_module``; compare outputs and every gradient."""
    randomise(local_module)
    load_local_state(te_module, local_module)
    call = call or (lambda module, *xs: module(*xs))
    te_inputs = [x.detach().clone().requires_grad_(x.is_floating_point()) for x in inputs]
    local_inputs = [x.detach().clone().requires_grad_(x.is_floating_point()) for x in inputs]
    te_out, local_out = call(te_module, *te_inputs), call(local_module, *local_inputs)
    assert te_out.dtype == local_out.dtype
    assert_close(te_out, local_out, dtype, "output")
    grad = torch.randn_like(local_out)
    te_out.backward(grad)
    local_out.backward(grad)
    for i, (a, b) in enumerate(zip(te_inputs, local_inputs, strict=True)):
        if b.grad is not None:
            assert_close(a.grad, b.grad, dtype, f"grad of input {i}")
    for pair in paired_parameters(te_module, local_module):
        assert_close(pair.te_param.grad, pair.local_part(pair.local_param.grad), dtype,
                     f"grad of {pair.te_name}")


# -- linears ------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("slot", ["linear", "column_parallel_linear", "row_parallel_linear"])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_slots_match_local(te, dtype: str, slot: str, bias: bool) -> None:
    config = make_config(dtype)
    module = getattr(te, slot)()(48, 80, config=config, bias=bias)
    assert module.weight.device.type == "cuda" and module.weight.dtype == DTYPES[dtype]
    local = Linear(48, 80, config=config, bias=bias).to(CUDA)
    compare(module, local, [torch.randn(3, 5, 48, device=CUDA, dtype=DTYPES[dtype])],
            DTYPES[dtype])


def test_linear_uses_the_init_method_and_std(te) -> None:
    config = make_config("float32", init_method_std=0.5)
    module = te.linear()(64, 512, config=config, bias=True)
    assert abs(module.weight.std().item() - 0.5) < 0.02 and torch.all(module.bias == 0)
    filled = te.linear()(8, 8, config=config, init_method=lambda w: nn.init.constant_(w, 0.25))
    assert torch.all(filled.weight == 0.25)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("normalization", ["RMSNorm", "LayerNorm"])
@pytest.mark.parametrize("bias", [False, True])
def test_layer_norm_linear_matches_a_local_norm_then_linear(te, dtype: str, normalization: str,
                                                            bias: bool) -> None:
    config = make_config(dtype, normalization=normalization, layernorm_epsilon=1e-6)
    module = te.column_parallel_layer_norm_linear()(64, 96, config=config, bias=bias)
    local = LayerNormLinear(64, 96, config=config, bias=bias).to(CUDA)
    compare(module, local, [torch.randn(2, 7, 64, device=CUDA, dtype=DTYPES[dtype])],
            DTYPES[dtype])


# -- norms --------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rms_norm", [True, False])
@pytest.mark.parametrize("shape", [(4, 9, 64), (2, 5, 8, 32)], ids=["hidden", "per-head"])
def test_norms_match_local(te, dtype: str, rms_norm: bool, shape: tuple[int, ...]) -> None:
    config = make_config(dtype)
    cls = te.layer_norm(rms_norm=rms_norm, for_qk=len(shape) == 4)
    module = cls(config=config, hidden_size=shape[-1], eps=1e-5)
    local = (RMSNorm if rms_norm else LayerNorm)(config=config, hidden_size=shape[-1],
                                                 eps=1e-5).to(CUDA)
    compare(module, local, [3 * torch.randn(*shape, device=CUDA, dtype=DTYPES[dtype])],
            DTYPES[dtype])


def test_norm_returns_the_input_dtype_like_the_local_one(te) -> None:
    config = make_config("bfloat16")
    module = te.layer_norm(rms_norm=True)(config=config, hidden_size=32)
    local = RMSNorm(config=config, hidden_size=32).to(CUDA)
    x = torch.randn(6, 32, device=CUDA)  # float32 into bfloat16 weights (GDN's out_norm)
    assert module(x).dtype == local(x).dtype == torch.float32
    assert_close(module(x), local(x), torch.bfloat16, "float32 input")


# -- attention ----------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("heads", "groups", "head_dim"), [(8, 2, 64), (4, 4, 128), (6, 1, 32)],
                         ids=["gqa", "mha", "mqa"])
@pytest.mark.parametrize(("T", "S"), [(128, 128), (37, 37), (37, 100), (1, 65)],
                         ids=["square", "odd", "S>T", "decode"])
def test_core_attention_matches_local(te, dtype: str, heads: int, groups: int, head_dim: int,
                                      T: int, S: int) -> None:
    config = make_config(dtype, num_attention_heads=heads, num_query_groups=groups,
                         kv_channels=head_dim)
    module = te.core_attention()(config, layer_number=1, softmax_scale=None)
    local = DotProductAttention(config)
    torch_dtype = DTYPES[dtype]
    q = torch.randn(2, T, heads, head_dim, device=CUDA, dtype=torch_dtype)
    k = torch.randn(2, S, groups, head_dim, device=CUDA, dtype=torch_dtype)
    v = torch.randn(2, S, groups, head_dim, device=CUDA, dtype=torch_dtype)
    compare(module, local, [q, k, v], torch_dtype)


def test_core_attention_honours_softmax_scale_and_rejects_bad_shapes(te) -> None:
    config = make_config("bfloat16")
    module = te.core_attention()(config, softmax_scale=0.05)
    local = DotProductAttention(config, softmax_scale=0.05)
    q, k, v = (torch.randn(1, 16, h, 32, device=CUDA, dtype=torch.bfloat16) for h in (8, 2, 2))
    assert_close(module(q, k, v), local(q, k, v), torch.bfloat16, "scaled")
    with pytest.raises(ValueError, match="from the config"):
        module(q, q, q)
    with pytest.raises(ValueError, match="S >= T"):
        module(q, k[:, :8], v[:, :8])


# -- experts ------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("gated", "activation"), [(True, "silu"), (False, "gelu")])
@pytest.mark.parametrize("bias", [False, True])
def test_grouped_experts_match_the_local_experts(te, dtype: str, gated: bool, activation: str,
                                                 bias: bool) -> None:
    config = make_config(dtype, gated_linear_unit=gated, activation_func=activation,
                         add_bias_linear=bias)
    module = te.grouped_mlp_modules(True)(4, config=config)
    local = SequentialExperts(4, config=config).to(CUDA)
    counts = torch.tensor([5, 0, 9, 3], device=CUDA)  # an expert with no tokens
    x = torch.randn(17, 64, device=CUDA, dtype=DTYPES[dtype])
    compare(module, local, [x, counts], DTYPES[dtype])


def test_grouped_experts_reject_counts_that_do_not_fit(te) -> None:
    module = te.grouped_mlp_modules(False)(4, config=make_config("bfloat16"))
    x = torch.randn(5, 64, device=CUDA, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="summing to the 5 rows"):
        module(x, torch.tensor([1, 1, 1, 1], device=CUDA))


# -- the rest of the slots ----------------------------------------------------------------------
def test_kernel_slots_and_activation_come_from_elsewhere(te) -> None:
    assert te.activation_func() is None
    assert te.fuse_layernorm_and_linear() is True
    for slot in KERNEL_SLOTS:
        assert te.served_by(slot) == "local"
    try:
        triton = get_provider("triton")
        triton.gated_delta_rule()
        expected = triton.served_by("gated_delta_rule")
    except (BackendError, SlotNotServed):
        expected = "local"
    assert TESpecProvider().served_by("gated_delta_rule") == expected


def test_the_registry_gives_a_working_te_backend() -> None:
    provider = get_provider("te")
    assert isinstance(provider, TESpecProvider) and provider.name == "te"
    model = GPTModel(hybrid_config("bfloat16"), 128, backend="te")
    gdn = model.slots[0]
    assert gdn["self_attention.in_proj"] == {"class": "TELayerNormLinear", "backend": "te"}
    assert gdn["input_layernorm"]["backend"] == "fused"
    assert gdn["self_attention.gated_delta_rule"]["backend"] == provider.served_by(
        "gated_delta_rule")
    assert isinstance(model.decoder.layers[1].self_attention.core_attention,
                      te_modules.TEDotProductAttention)


# -- a whole hybrid model -----------------------------------------------------------------------
def hybrid_config(dtype: str, **overrides: object) -> TransformerConfig:
    """GDN + MoE, softmax attention + MoE, GDN + dense, softmax attention + dense."""
    fields = dict(num_layers=4, hidden_size=128, num_attention_heads=4, num_query_groups=2,
                  kv_channels=32, ffn_hidden_size=256, experimental_attention_variant="gdn",
                  linear_attention_freq=[1, 0, 1, 0], linear_key_head_dim=32,
                  linear_value_head_dim=32, linear_num_key_heads=2, linear_num_value_heads=4,
                  num_moe_experts=4, moe_layer_freq=[1, 1, 0, 0], moe_router_topk=2,
                  moe_ffn_hidden_size=64, moe_shared_expert_intermediate_size=64,
                  qk_layernorm=True, attention_output_gate=True, rotary_percent=0.5,
                  params_dtype=dtype, backend="local")
    fields.update(overrides)
    return TransformerConfig(**fields)


def build_models(dtype: str, provider: TESpecProvider) -> tuple[GPTModel, GPTModel, GPTModel]:
    """The hybrid built with ``provider``, with ``local``, and with ``local`` in float64 — the
    reference — all three with the same weights."""
    config = hybrid_config(dtype)
    local = GPTModel(config, 256, backend=LOCAL).to(CUDA)
    reference = GPTModel(attrs.evolve(config, params_dtype="float64"), 256,
                         backend=LOCAL).to(CUDA)
    reference.load_state_dict(local.state_dict())
    model = GPTModel(config, 256, backend=provider).to(CUDA)
    load_local_state(model, local)
    return model, local, reference


def loss_of(model: GPTModel, ids: torch.Tensor) -> torch.Tensor:
    logits = model(ids[:, :-1])  # (B, T-1, vocab)
    loss = F.cross_entropy(logits.double().flatten(0, 1), ids[:, 1:].flatten())
    return loss + model.auxiliary_loss()


def assert_as_accurate(te_value: torch.Tensor, local_value: torch.Tensor,
                       reference: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    """TE's error against the float64 reference is at most ``MODEL_RATIO`` times the local
    model's own error, or under ``MODEL_FLOOR[dtype]``."""
    te_err, local_err = norm_error(te_value, reference), norm_error(local_value, reference)
    bound = max(MODEL_RATIO * local_err, MODEL_FLOOR[dtype])
    assert te_err <= bound, (f"{what}: te's error {te_err:.2e} against float64 > {bound:.1e} "
                             f"(local's error: {local_err:.2e}; {dtype})")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kernels", ["local", "default"])
def test_hybrid_model_matches_local_in_logits_and_gradients(dtype: str, kernels: str) -> None:
    provider = TESpecProvider(kernel_backend="local" if kernels == "local" else None)
    if kernels == "default" and provider.served_by("gated_delta_rule") == "local":
        pytest.skip("no other backend serves the kernel slots here: same as kernels='local'")
    model, local, reference = build_models(dtype, provider)
    ids = torch.randint(0, 256, (2, 65), device=CUDA)
    torch_dtype = DTYPES[dtype]
    assert_as_accurate(model(ids), local(ids), reference(ids), torch_dtype, "logits")
    losses = [loss_of(m, ids) for m in (model, local, reference)]
    assert_as_accurate(*(loss.detach().reshape(1) for loss in losses), torch_dtype, "loss")
    for loss in losses:
        loss.backward()
    reference_grads = dict(reference.named_parameters())
    pairs = paired_parameters(model, local)
    assert len(pairs) == len(list(model.parameters()))
    for pair in pairs:
        expected = pair.local_part(reference_grads[pair.local_name].grad)
        assert_as_accurate(pair.te_param.grad, pair.local_part(pair.local_param.grad), expected,
                           torch_dtype, f"grad of {pair.te_name}")


def test_weights_go_back_to_the_local_model(te) -> None:
    model, local, _ = build_models("float32", te)
    back = te_to_local_state_dict(model.state_dict(), local.state_dict())
    for key, value in local.state_dict().items():
        assert torch.equal(back[key], value), key


def test_hybrid_model_trains_with_decreasing_loss(te) -> None:
    model = GPTModel(hybrid_config("bfloat16"), 256, backend=te).to(CUDA)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ids = torch.randint(0, 256, (4, 65), device=CUDA)
    losses = []
    for _ in range(8):
        optimizer.zero_grad(set_to_none=True)
        loss = loss_of(model, ids)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))), losses
    assert losses[-1] < losses[0] - 0.5, losses
