"""The MoE experts' grouped-GEMM path and a whole MoE layer on CUDA at a GPU size, in bfloat16,
against float64 (skipped without a GPU)."""

from __future__ import annotations

import pytest
import torch

from attnplug import TransformerConfig
from attnplug.backends.local import LocalSpecProvider
from attnplug.layers.moe import BatchedExperts, SequentialExperts
from attnplug.spec import build_module
from attnplug.specs import _get_moe_module_spec

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def config(**overrides: object) -> TransformerConfig:
    fields = dict(num_layers=1, hidden_size=2048, num_attention_heads=16, params_dtype="bfloat16",
                  backend="local", num_moe_experts=16, moe_router_topk=2,
                  moe_ffn_hidden_size=1024, moe_grouped_gemm=True)
    fields.update(overrides)
    return TransformerConfig(**fields)


def rel_rms(got: torch.Tensor, ref: torch.Tensor) -> float:
    got, ref = got.double(), ref.double()
    return ((got - ref).square().mean().sqrt() / ref.square().mean().sqrt()).item()


# uneven routings over 16 experts: group sizes that are and are not multiples of 16, empty
# experts, one expert holding most rows
ROUTINGS = {
    "uneven": [1037, 0, 3, 2048, 777, 1, 0, 1500, 2100, 999, 5, 1024, 3000, 1, 1290, 2599],
    "skewed": [14000, 1, 2, 3] + [0] * 11 + [2378],
}


@pytest.mark.parametrize("routing", sorted(ROUTINGS))
@pytest.mark.parametrize("gated", [True, False])
def test_grouped_experts_match_float64_at_a_gpu_size(routing: str, gated: bool) -> None:
    counts = torch.tensor(ROUTINGS[routing])
    cfg = config(gated_linear_unit=gated, activation_func="silu" if gated else "gelu")
    torch.manual_seed(0)
    experts = BatchedExperts(16, config=cfg).cuda()
    N = int(counts.sum())
    x = torch.randn(N, 2048, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    assert experts._grouped_mm_applies(x)
    dy = torch.randn(N, 2048, device="cuda", dtype=torch.bfloat16)
    y = experts(x, counts.cuda())
    y.backward(dy)
    ref = SequentialExperts(16, config=cfg).cuda().double()
    ref.load_state_dict(experts.state_dict())
    x64 = x.detach().double().requires_grad_()
    y64 = ref(x64, counts)
    y64.backward(dy.double())
    assert rel_rms(y, y64) < 1e-2
    assert rel_rms(x.grad, x64.grad) < 1e-2
    for (name, p), p64 in zip(experts.named_parameters(), ref.parameters(), strict=True):
        assert rel_rms(p.grad, p64.grad) < 1e-2, name
        for e, n in enumerate(ROUTINGS[routing]):
            assert n or not p.grad[e].any(), f"{name}: expert {e} has no tokens"


def test_moe_layer_matches_float64_at_a_gpu_size() -> None:
    cfg = config(moe_shared_expert_intermediate_size=1024)
    provider = LocalSpecProvider()
    torch.manual_seed(0)
    layer = build_module(_get_moe_module_spec(cfg, provider), config=cfg, layer_number=1).cuda()
    layer64 = build_module(_get_moe_module_spec(cfg, provider), config=cfg,
                           layer_number=1).cuda().double()
    layer64.load_state_dict(layer.state_dict())
    x = torch.randn(2, 4096, 2048, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    x64 = x.detach().double().requires_grad_()
    y, y64 = layer(x), layer64(x64)
    dy = torch.randn_like(y)
    y.backward(dy)
    y64.backward(dy.double())
    # bf16 routing can pick another expert where two logits nearly tie: a few tokens differ
    assert rel_rms(y, y64) < 3e-2
    assert rel_rms(x.grad, x64.grad) < 3e-2


@pytest.mark.parametrize("shared", [None, 512])
def test_experts_with_host_counts_get_them_on_the_host_and_the_same_result(shared) -> None:
    """Sequential experts (``host_counts``) on CUDA are handed the counts as a CPU tensor
    (copied while the GPU still has the shared expert queued); outputs and gradients equal
    those of the same layer handing them the device tensor."""
    cfg = config(hidden_size=256, moe_ffn_hidden_size=128, moe_grouped_gemm=False,
                 moe_shared_expert_intermediate_size=shared)
    provider = LocalSpecProvider()
    torch.manual_seed(0)
    layer = build_module(_get_moe_module_spec(cfg, provider), config=cfg, layer_number=1).cuda()
    assert isinstance(layer.experts, SequentialExperts) and layer.experts.host_counts
    devices = []
    layer.experts.register_forward_pre_hook(lambda m, args: devices.append(args[1].device.type))
    x = torch.randn(2, 300, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn_like(x)
    y = layer(x)
    y.backward(dy)
    assert devices == ["cpu"]
    grads = [x.grad.clone()] + [p.grad.clone() for p in layer.parameters()]
    layer.zero_grad(set_to_none=True)
    x.grad = None
    layer.experts.host_counts = False  # the device tensor instead
    y_device = layer(x)
    y_device.backward(dy)
    assert devices == ["cpu", "cuda"]
    assert torch.equal(y, y_device)
    for got, ref in zip(grads, [x.grad] + [p.grad for p in layer.parameters()], strict=True):
        assert torch.equal(got, ref)
