"""The triton backend's GDN short convolution against the float64 reference: outputs and the
gradients of x, the weight and the initial state."""

from __future__ import annotations

import pytest
import torch
from triton_cases import DEVICE, DTYPES, HAS_CUDA, assert_matches

from attnplug.ops import naive_causal_conv1d

# (B, T, C, K, with_state, strided x): awkward sizes (T below K, C not a block multiple, one
# channel), x as a slice of a wider projection like the GDN layer passes it.
SHAPES = [
    (1, 1, 1, 4, False, False),
    (2, 2, 5, 4, True, False),
    (2, 37, 70, 4, False, True),
    (1, 50, 33, 3, True, True),
    (3, 20, 64, 1, False, False),
    (1, 19, 40, 5, True, False),
]
GPU_SHAPES = [(2, 4096, 8192, 4, False, True), (8, 1, 8192, 4, True, False)]
CASES = [(s, dtype) for s in SHAPES for dtype in DTYPES] + (
    [(s, torch.bfloat16) for s in GPU_SHAPES] if HAS_CUDA else [])


def _run(fn, x, w, s, dy, activation):
    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in (x, w, s)]
    y = fn(leaves[0], leaves[1], initial_state=leaves[2], activation=activation)
    y.backward(dy)
    return [y] + [t.grad for t in leaves if t is not None]


def _function(name: str):
    """The served kernels (``two_pass`` backward) or the earlier ``one_pass`` ones."""
    from attnplug_triton.ops.conv import fused

    return fused.causal_conv1d if name == "two_pass" else fused.causal_conv1d_one_pass


@pytest.mark.parametrize("backward", ["one_pass", "two_pass"])
@pytest.mark.parametrize("activation", ["silu", None])
@pytest.mark.parametrize("case,dtype", CASES, ids=lambda x: str(x))
def test_causal_conv1d_matches_float64_reference(case, dtype, activation, backward) -> None:
    causal_conv1d = _function(backward)

    B, T, C, K, with_state, strided = case
    torch.manual_seed(B + T + C + K)
    wide = torch.randn(B, T, C + (9 if strided else 0), device=DEVICE, dtype=dtype)
    x = wide[..., 3:3 + C] if strided else wide
    w = (torch.randn(C, K, device=DEVICE, dtype=dtype) / K ** 0.5)
    s = torch.randn(B, K - 1, C, device=DEVICE, dtype=dtype) if with_state else None
    dy = torch.randn(B, T, C, device=DEVICE, dtype=dtype)
    outs = _run(causal_conv1d, x, w, s, dy, activation)
    refs = _run(naive_causal_conv1d, *(None if t is None else t.double() for t in (x, w, s)),
                dy.double(), activation)
    names = ["y", "dx", "dw"] + (["dstate"] if with_state else [])
    for name, out, ref in zip(names, outs, refs, strict=True):
        assert out.dtype == dtype, name
        assert_matches(f"{name} {case} {dtype} {activation}", out, ref, dtype)


@pytest.mark.parametrize("backward", ["one_pass", "two_pass"])
def test_empty_sequence_gives_empty_output_and_zero_weight_gradient(backward) -> None:
    causal_conv1d = _function(backward)

    x = torch.zeros(2, 0, 8, device=DEVICE, requires_grad=True)
    w = torch.randn(8, 4, device=DEVICE, requires_grad=True)
    y = causal_conv1d(x, w)
    assert y.shape == (2, 0, 8)
    y.sum().backward()
    assert torch.equal(w.grad, torch.zeros_like(w))


def test_bad_arguments_are_named() -> None:
    from attnplug_triton.ops.conv.fused import causal_conv1d

    with pytest.raises(ValueError, match="triton causal_conv1d: weight must be \\[C, K\\]"):
        causal_conv1d(torch.zeros(1, 4, 8, device=DEVICE), torch.zeros(7, 4, device=DEVICE))
    with pytest.raises(ValueError, match="triton causal_conv1d: x is torch.float64"):
        causal_conv1d(torch.zeros(1, 4, 8, dtype=torch.float64, device=DEVICE),
                      torch.zeros(8, 4, dtype=torch.float64, device=DEVICE))


@pytest.mark.parametrize("backward", ["two_pass", "one_pass"])
def test_gdn_layer_with_the_kernel_matches_local_in_training_and_decoding(backward) -> None:
    """A GatedDeltaNet whose short convolution (only) is the triton kernel gives local's
    outputs and gradients, and decodes token by token to the same outputs."""
    from attnplug_triton.provider import TritonSpecProvider

    from attnplug import TransformerConfig
    from attnplug.backends import LocalSpecProvider
    from attnplug.layers.gated_delta_net import GDNCache
    from attnplug.spec import build_module
    from attnplug.specs import get_gated_delta_net_module_spec

    config = TransformerConfig(num_layers=1, hidden_size=32, num_attention_heads=2,
                               experimental_attention_variant="gdn", linear_key_head_dim=8,
                               linear_value_head_dim=8, linear_num_key_heads=2,
                               linear_num_value_heads=4, linear_conv_kernel_dim=4,
                               linear_attention_freq=[1])
    local_spec = get_gated_delta_net_module_spec(config, LocalSpecProvider())
    triton_spec = get_gated_delta_net_module_spec(config, TritonSpecProvider())
    assert triton_spec.submodules.causal_conv1d.module is _function("two_pass")  # served
    causal_conv1d = _function(backward)
    torch.manual_seed(0)
    ref = build_module(local_spec, config)
    # the rest of the layer from local, so that only the convolution differs
    ours = build_module(local_spec, config)
    ours.causal_conv1d = causal_conv1d
    ours.load_state_dict(ref.state_dict())
    ref.to(DEVICE), ours.to(DEVICE)
    x = torch.randn(2, 13, 32, device=DEVICE)
    outs = []
    for layer in (ref, ours):
        xi = x.clone().requires_grad_()
        y = layer(xi)
        y.square().sum().backward()
        outs.append((y, xi.grad, layer.conv1d.weight.grad))
    for name, a, b in zip(("y", "dx", "dconv"), *outs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
    cache = GDNCache()
    with torch.no_grad():
        steps = torch.cat([ours(x[:, t:t + 1], cache=cache) for t in range(x.shape[1])], 1)
    torch.testing.assert_close(steps, outs[0][0].detach(), rtol=1e-4, atol=1e-5)
