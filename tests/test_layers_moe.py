"""Mixture of Experts: routing, dispatch and combine against per-token float64 math; aux loss."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from attnplug import ConfigError, TransformerConfig
from attnplug.backends.local import LocalSpecProvider
from attnplug.layers.moe import BatchedExperts, MoELayer, SequentialExperts
from attnplug.layers.submodules import MoESubmodules
from attnplug.spec import build_module
from attnplug.specs import _get_moe_module_spec

LOCAL = LocalSpecProvider()


def make_config(**overrides: object) -> TransformerConfig:
    fields = dict(num_layers=2, hidden_size=8, num_attention_heads=2, params_dtype="float64",
                  backend="local", num_moe_experts=5, moe_router_topk=2, moe_ffn_hidden_size=6,
                  moe_aux_loss_coeff=0.1)
    fields.update(overrides)
    return TransformerConfig(**fields)


def build_moe(cfg: TransformerConfig) -> MoELayer:
    layer = build_module(_get_moe_module_spec(cfg, LOCAL), config=cfg, layer_number=1)
    with torch.no_grad():
        layer.router.weight.normal_()  # spread the routing out
    return layer


def expert_ref(layer: MoELayer, e: int, x: torch.Tensor) -> torch.Tensor:
    """Expert e on one token x (h,), from its weights."""
    ex = layer.experts
    h = ex.fc1_weight[e] @ x
    if ex.gated:
        n = h.shape[0] // 2
        h = F.silu(h[:n]) * h[n:]
    else:
        h = F.gelu(h)
    return ex.fc2_weight[e] @ h


def reference_moe(layer: MoELayer, x: torch.Tensor) -> torch.Tensor:
    cfg = layer.config
    out = torch.zeros_like(x)
    for b in range(x.shape[0]):
        for t in range(x.shape[1]):
            tok = x[b, t]
            logits = layer.router.weight @ tok  # (E,)
            if cfg.moe_router_pre_softmax:
                weights, chosen = torch.softmax(logits, 0).topk(cfg.moe_router_topk)
            else:
                top, chosen = logits.topk(cfg.moe_router_topk)
                weights = torch.softmax(top, 0)
            pairs = zip(weights, chosen, strict=True)
            out[b, t] = sum(w * expert_ref(layer, int(e), tok) for w, e in pairs)
            if layer.shared_experts is not None:
                s = layer.shared_experts
                h = s.linear_fc1.weight @ tok
                n = h.shape[0] // 2
                out[b, t] += s.linear_fc2.weight @ (F.silu(h[:n]) * h[n:])
    return out


@pytest.mark.parametrize(
    ("overrides", "T"),
    [({}, 7), ({"moe_router_pre_softmax": True}, 1),
     ({"moe_router_topk": 1, "gated_linear_unit": False, "activation_func": "gelu"}, 5),
     ({"moe_shared_expert_intermediate_size": 4, "moe_router_topk": 3}, 3)],
)
def test_moe_output_is_the_weighted_sum_of_its_top_k_experts(overrides: dict, T: int) -> None:
    layer = build_moe(make_config(**overrides))
    x = torch.randn(3, T, 8, dtype=torch.float64)
    assert torch.allclose(layer(x), reference_moe(layer, x), atol=1e-12)


def test_moe_aux_loss_matches_the_switch_formula() -> None:
    cfg = make_config(moe_router_topk=2)
    layer = build_moe(cfg)
    x = torch.randn(2, 9, 8, dtype=torch.float64)
    layer(x)
    tokens = x.reshape(-1, 8)
    logits = tokens @ layer.router.weight.T  # (N, E)
    counts = torch.zeros(5, dtype=torch.float64)
    for row in logits:
        for e in row.topk(2).indices:
            counts[e] += 1
    f = counts / (18 * 2)
    P = torch.softmax(logits, -1).mean(0)
    expected = 0.1 * 5 * (f * P).sum()
    assert torch.allclose(layer.aux_losses["moe_load_balancing"], expected, atol=1e-14)


def test_moe_aux_loss_only_in_training_with_grad_and_not_when_disabled() -> None:
    x = torch.randn(1, 4, 8, dtype=torch.float64)
    layer = build_moe(make_config())
    layer.eval()
    layer(x)
    assert layer.aux_losses == {}
    layer.train()
    with torch.no_grad():
        layer(x)
    assert layer.aux_losses == {}
    off = build_moe(make_config(moe_router_load_balancing_type="none"))
    off(x)
    assert off.aux_losses == {}


def test_moe_gradients_reach_router_experts_and_input() -> None:
    layer = build_moe(make_config(moe_shared_expert_intermediate_size=4))
    x = torch.randn(2, 16, 8, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    (y.square().sum() + layer.aux_losses["moe_load_balancing"]).backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert x.grad.abs().sum() > 0


def test_sequential_experts_run_contiguous_slices() -> None:
    cfg = make_config()
    experts = SequentialExperts(5, config=cfg)
    x = torch.randn(6, 8, dtype=torch.float64)
    counts = torch.tensor([2, 0, 3, 0, 1])
    y = experts(x, counts)
    owners = [0, 0, 2, 2, 2, 4]
    for i, e in enumerate(owners):
        assert torch.allclose(y[i], experts.expert_forward(e, x[i:i + 1])[0])
    with pytest.raises(ValueError, match="tokens_per_expert"):
        experts(x, torch.tensor([1, 1, 1, 1, 1]))


@pytest.mark.parametrize("cls", [SequentialExperts, BatchedExperts])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("counts", [[2, 0, 3, 0, 1], [0, 0, 7, 0, 0], [1, 1, 1, 1, 3],
                                    [2, 2, 2, 2, 2], [0, 0, 0, 0, 0]])
def test_experts_match_each_expert_run_alone(cls: type, bias: bool, gated: bool,
                                             counts: list[int]) -> None:
    """The output and every weight, bias and input gradient (float32) against the experts run
    one by one on their own float64 copies; an expert without tokens gets a zero gradient.
    ``[0, 0, 7, 0, 0]`` runs BatchedExperts one expert after another (too much padding)."""
    cfg = make_config(add_bias_linear=bias, gated_linear_unit=gated,
                      activation_func="silu" if gated else "gelu")
    experts = cls(5, config=cfg).float()
    with torch.no_grad():
        for p in experts.parameters():
            p.normal_()
    x = torch.randn(sum(counts), 8, requires_grad=True)
    dy = torch.randn(sum(counts), 8)
    y = experts(x, torch.tensor(counts))
    (y * dy).sum().backward()
    ref = SequentialExperts(5, config=cfg).double()
    ref.load_state_dict(experts.state_dict())
    x64 = x.detach().double().requires_grad_()
    start, outs = 0, []
    for e, n in enumerate(counts):
        outs.append(ref.expert_forward(e, x64[start:start + n]))
        (outs[-1] * dy[start:start + n].double()).sum().backward()
        start += n
    torch.testing.assert_close(y.detach().double(), torch.cat(outs).detach(), rtol=1e-4,
                               atol=1e-4)
    for (name, p), p64 in zip(experts.named_parameters(), ref.parameters(), strict=True):
        expected = p64.grad if p64.grad is not None else torch.zeros_like(p64)
        got = p.grad if p.grad is not None else torch.zeros_like(p)
        torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-4, msg=name)
        for e, n in enumerate(counts):
            assert n or not got[e].any(), f"{name}: expert {e} has no tokens"
    if sum(counts):
        torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-4, atol=1e-4)


@settings(max_examples=25, deadline=None)
@given(counts=st.lists(st.integers(0, 6), min_size=4, max_size=4))
def test_batched_and_sequential_experts_agree_for_any_routing(counts: list[int]) -> None:
    """Whatever the routing (padded, or uneven enough to run one by one), the batched experts
    give the sequential ones' output on the same parameters."""
    cfg = make_config(num_moe_experts=4)
    torch.manual_seed(sum(counts))
    batched = BatchedExperts(4, config=cfg)
    sequential = SequentialExperts(4, config=cfg)
    sequential.load_state_dict(batched.state_dict())
    x = torch.randn(sum(counts), 8, dtype=torch.float64)
    torch.testing.assert_close(batched(x, torch.tensor(counts)),
                               sequential(x, torch.tensor(counts)), rtol=1e-12, atol=1e-12)


def test_local_serves_batched_experts_for_grouped_gemm() -> None:
    assert LOCAL.grouped_mlp_modules(True) is BatchedExperts
    assert LOCAL.grouped_mlp_modules(False) is SequentialExperts
    layer = build_moe(make_config(moe_grouped_gemm=True))
    assert type(layer.experts) is BatchedExperts
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    assert torch.allclose(layer(x), reference_moe(layer, x), atol=1e-12)
    with pytest.raises(ValueError, match="tokens_per_expert must have 5 entries"):
        layer.experts(x[0], torch.tensor([5]))
    with pytest.raises(ValueError, match="sum to the 5 rows"):
        layer.experts(x[0], torch.tensor([1, 1, 1, 1, 2]))


def test_moe_bad_arguments_name_themselves() -> None:
    cfg = make_config()
    with pytest.raises(ValueError, match="submodules.experts"):
        MoELayer(cfg, MoESubmodules())
    with pytest.raises(ConfigError, match="num_local_experts"):
        SequentialExperts(0, config=cfg)
    with pytest.raises(ConfigError, match="num_moe_experts"):
        MoELayer(make_config(num_moe_experts=None), MoESubmodules(experts=SequentialExperts))
