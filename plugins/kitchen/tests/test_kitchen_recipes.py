"""Kitchen's recipes and recipe-driven layers, against local and against a float64 model of fp8.

The float64 model below rounds to e4m3 / e5m2 from the formats' definitions (sign, ``mbits``
mantissa bits, smallest normal exponent ``emin``, largest value ``fmax``), not through torch's
float8 casts, so it checks the emulation independently.
"""

from __future__ import annotations

import pytest
import torch
from attnplug_kitchen.layers import (
    KitchenLayerNormLinear,
    KitchenLinear,
    KitchenSequentialExperts,
    recipe_class,
)
from attnplug_kitchen.recipes import (
    E4M3,
    E5M2,
    check_recipe,
    fp8_current_linear,
    quantize,
    recipe_linear,
)

from attnplug import ConfigError, TransformerConfig
from attnplug.layers.linear import LayerNormLinear, Linear
from attnplug.layers.moe import SequentialExperts

E4M3_SPEC = (3, -6, 448.0)  # mantissa bits, smallest normal exponent, largest finite value
E5M2_SPEC = (2, -14, 57344.0)


def fp8_round(v: torch.Tensor, spec: tuple[int, int, float]) -> torch.Tensor:
    """Round float64 ``v`` to the nearest value of the fp8 format (ties to even), saturating."""
    mbits, emin, fmax = spec
    exponent = torch.floor(torch.log2(v.abs().clamp_min(2.0**-200))).clamp_min(emin)
    ulp = torch.exp2(exponent - mbits)
    return (torch.round(v / ulp) * ulp).clamp(-fmax, fmax)


def fp8_model(t: torch.Tensor, spec: tuple[int, int, float]) -> torch.Tensor:
    """Per-tensor current scaling in float64: ``round(t / s) · s`` with ``s = amax / fmax``."""
    t = t.double()
    scale = t.abs().max() / spec[2]
    return fp8_round(t / scale, spec) * scale


def reference_linear(x, w, b, grad_y, grad_spec=E5M2_SPEC):
    """The fp8_current recipe in float64: (y, dx, dw, db)."""
    x2 = x.double().reshape(-1, x.shape[-1])
    xq, wq = fp8_model(x2, E4M3_SPEC), fp8_model(w, E4M3_SPEC)
    y = xq @ wq.T + b.double()
    g = grad_y.double().reshape(-1, w.shape[0])
    gq = fp8_model(g, grad_spec) if grad_spec is not None else g
    return (y.reshape(*x.shape[:-1], w.shape[0]), (gq @ wq).reshape(x.shape), gq.T @ xq,
            g.sum(0))


def run_fp8(x, w, b, grad_y):
    x, w, b = (t.clone().requires_grad_() for t in (x, w, b))
    y = fp8_current_linear(x, w, b)
    y.backward(grad_y)
    return y.detach(), x.grad, w.grad, b.grad


def inputs(dtype, seed=0, rows=(3, 5)):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*rows, 48, generator=gen, dtype=dtype)
    x[0, 0, 0] = 7.0  # an outlier sets the scale
    w = torch.randn(32, 48, generator=gen, dtype=dtype) * 0.05
    b = torch.randn(32, generator=gen, dtype=dtype)
    grad_y = torch.randn(*rows, 32, generator=gen, dtype=dtype) * 1e-3
    return x, w, b, grad_y


def close(actual, expected, rel):
    actual, expected = actual.detach(), expected.detach().to(actual.dtype)
    torch.testing.assert_close(actual, expected, rtol=rel, atol=rel * expected.abs().max())


@pytest.mark.parametrize(("dtype", "rel"), [(torch.float32, 2e-5), (torch.float64, 1e-12)])
def test_fp8_emulation_matches_a_float64_model_of_the_recipe(dtype, rel):
    x, w, b, grad_y = inputs(dtype)
    for got, want in zip(run_fp8(x, w, b, grad_y), reference_linear(x, w, b, grad_y),
                         strict=True):
        close(got, want, rel)


def test_fp8_gradients_are_quantised_to_e5m2_and_really_quantised():
    x, w, b, grad_y = inputs(torch.float64, seed=1)
    _, dx, dw, _ = run_fp8(x, w, b, grad_y)
    for grad_spec in (None, E4M3_SPEC):  # unquantised grads, or e4m3 grads: both differ
        _, ref_dx, ref_dw, _ = reference_linear(x, w, b, grad_y, grad_spec=grad_spec)
        assert not torch.allclose(dx, ref_dx, rtol=1e-6, atol=0)
        assert not torch.allclose(dw, ref_dw, rtol=1e-6, atol=0)
    y = fp8_current_linear(x, w, b)
    plain = torch.nn.functional.linear(x, w, b)
    assert (y - plain).abs().max() > 1e-4 * plain.abs().max()  # fp8 is not a no-op


def test_quantize_scales_by_amax_saturates_and_handles_zeros():
    t = torch.tensor([[-3.0, 0.5], [1.0, 2.0]])
    q, scale = quantize(t, E4M3)
    assert q.dtype == torch.float8_e4m3fn and scale.dtype == torch.float32
    assert scale.item() == pytest.approx(3.0 / 448)
    assert q.float().abs().max().item() == 448.0
    g, gscale = quantize(t, E5M2)
    assert g.dtype == torch.float8_e5m2 and gscale.item() == pytest.approx(3.0 / 57344)
    zq, zscale = quantize(torch.zeros(4, 4), E4M3)
    assert zscale.item() == 1.0 and not zq.float().isnan().any()
    y = fp8_current_linear(torch.zeros(2, 8, requires_grad=True), torch.zeros(4, 8))
    assert torch.equal(y, torch.zeros(2, 4))


def test_bf16_recipe_is_the_local_linear_exactly():
    cfg = TransformerConfig(num_layers=2, hidden_size=16, num_attention_heads=2)
    torch.manual_seed(0)
    local = Linear(16, 24, config=cfg, bias=True)
    torch.manual_seed(0)
    kitchen = recipe_class(KitchenLinear, "bf16")(16, 24, config=cfg, bias=True)
    assert list(kitchen.state_dict()) == list(local.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(kitchen.parameters(), local.parameters(),
                                                 strict=True))
    x = torch.randn(2, 5, 16)
    y_local, y_kitchen = local(x), kitchen(x)
    assert torch.equal(y_local, y_kitchen)
    y_local.square().sum().backward()
    y_kitchen.square().sum().backward()
    assert torch.equal(local.weight.grad, kitchen.weight.grad)
    assert torch.equal(local.bias.grad, kitchen.bias.grad)


def test_layer_norm_linear_has_local_names_and_recipe_forward():
    cfg = TransformerConfig(num_layers=2, hidden_size=16, num_attention_heads=2,
                            normalization="LayerNorm")
    torch.manual_seed(0)
    local = LayerNormLinear(16, 32, config=cfg)
    for recipe in ("bf16", "fp8_current"):
        torch.manual_seed(0)
        kitchen = recipe_class(KitchenLayerNormLinear, recipe)(16, 32, config=cfg)
        assert list(kitchen.state_dict()) == list(local.state_dict())
        x = torch.randn(4, 16)
        expected = recipe_linear(local.layer_norm(x), local.weight, None, recipe)
        assert torch.equal(kitchen(x), expected)
    assert torch.equal(kitchen.layer_norm(x), local.layer_norm(x))


def test_experts_run_each_expert_through_the_recipe():
    cfg = TransformerConfig(num_layers=2, hidden_size=16, num_attention_heads=2,
                            num_moe_experts=3, moe_ffn_hidden_size=16, add_bias_linear=True)
    torch.manual_seed(0)
    local = SequentialExperts(3, config=cfg)
    torch.manual_seed(0)
    bf16 = recipe_class(KitchenSequentialExperts, "bf16")(3, config=cfg)
    fp8 = recipe_class(KitchenSequentialExperts, "fp8_current")(3, config=cfg)
    fp8.load_state_dict(local.state_dict())
    x = torch.randn(7, 16, dtype=torch.float32)
    counts = torch.tensor([2, 0, 5])
    assert torch.equal(bf16(x, counts), local(x, counts))
    # the float64 model, expert by expert: fc1 -> SwiGLU -> fc2, each matmul quantised
    out, start = [], 0
    for e, n in enumerate(counts.tolist()):
        if n:
            rows = x[start:start + n].double()
            h = fp8_model(rows, E4M3_SPEC) @ fp8_model(local.fc1_weight[e], E4M3_SPEC).T
            h = h + local.fc1_bias[e].double()
            gate, up = h.chunk(2, dim=-1)
            h = torch.nn.functional.silu(gate) * up
            y = fp8_model(h, E4M3_SPEC) @ fp8_model(local.fc2_weight[e], E4M3_SPEC).T
            out.append(y + local.fc2_bias[e].double())
        start += n
    close(fp8(x, counts).detach(), torch.cat(out), 1e-5)


def test_an_unknown_recipe_names_the_field():
    with pytest.raises(ConfigError, match=r"kitchen_recipe='fp4'.*'bf16', 'fp8_current'"):
        check_recipe("fp4")
    with pytest.raises(ConfigError, match="kitchen_recipe='fp4'"):
        recipe_class(KitchenLinear, "fp4")
    with pytest.raises(ConfigError, match="kitchen_recipe='fp4'"):
        recipe_linear(torch.ones(1, 2), torch.ones(2, 2), None, "fp4")
    with pytest.raises(ConfigError, match="kitchen_recipe='fp4'"):
        TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=1,
                          kitchen_recipe="fp4")


def test_unbound_classes_read_the_recipe_from_the_config():
    cfg = TransformerConfig(num_layers=2, hidden_size=16, num_attention_heads=2,
                            kitchen_recipe="fp8_current")
    assert KitchenLinear(16, 16, config=cfg).kitchen_recipe == "fp8_current"
    assert recipe_class(KitchenLinear, "bf16")(16, 16, config=cfg).kitchen_recipe == "bf16"


HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (9, 0)


@pytest.mark.skipif(not HOPPER, reason="torch._scaled_mm needs a Hopper GPU (capability >= 9.0)")
@pytest.mark.parametrize(("dtype", "rel"), [(torch.float32, 5e-4), (torch.bfloat16, 2e-2)])
def test_scaled_mm_on_hopper_matches_the_emulation(monkeypatch, dtype, rel):
    """Same fp8 values and scales on both paths; Hopper's fp8 tensor cores accumulate with
    less than float32 precision (seen: ~1e-4 of the largest output on an H200), hence ``rel``."""
    from attnplug_kitchen.recipes import EMULATE_ENV, uses_scaled_mm

    assert uses_scaled_mm("cuda")
    results = {}
    for emulate in ("", "1"):
        monkeypatch.setenv(EMULATE_ENV, emulate)
        assert uses_scaled_mm("cuda") == (not emulate)
        # 15 rows: the weight gradient's contraction is not a multiple of 16, so it is emulated;
        # 4 x 60 rows: every matmul can go through _scaled_mm
        results[emulate] = [
            t.float() for rows in ((3, 5), (4, 60))
            for t in run_fp8(*(t.cuda().to(dtype) for t in inputs(torch.float32, 2, rows)))
        ]
    for got, want in zip(results[""], results["1"], strict=True):
        close(got, want, rel)
