"""attnplug.ops on CUDA against the float64 CPU references (skipped without a GPU)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from attnplug.ops import (
    causal_attention,
    chunk_gated_delta_rule,
    dsa_indexer_topk,
    gated_delta_rule_step,
    indexer_scores,
    naive_causal_attention,
    naive_recurrent_gated_delta_rule,
    naive_sparse_attention,
    sparse_attention,
)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def randn(gen, *shape):
    return torch.randn(*shape, generator=gen, dtype=torch.float64)


def rel_rms(got, ref):
    got = got.double().cpu()
    return ((got - ref).square().mean().sqrt() / ref.square().mean().sqrt()).item()


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float64, 1e-12), (torch.bfloat16, 1e-2)])
def test_causal_attention_on_cuda(dtype, tol):
    gen = torch.Generator().manual_seed(0)
    q, k, v = randn(gen, 2, 100, 8, 64), randn(gen, 2, 160, 2, 64), randn(gen, 2, 160, 2, 32)
    ref = naive_causal_attention(q, k, v)
    out = causal_attention(*(x.to("cuda", dtype) for x in (q, k, v)))
    assert out.dtype == dtype and out.is_cuda
    assert rel_rms(out, ref) < tol


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float64, 1e-12), (torch.bfloat16, 1e-2)])
def test_chunk_gated_delta_rule_on_cuda(dtype, tol):
    gen = torch.Generator().manual_seed(1)
    B, T, H, HV, K, V = 2, 150, 2, 4, 32, 16
    q, v = randn(gen, B, T, H, K), randn(gen, B, T, HV, V)
    k = F.normalize(randn(gen, B, T, H, K), dim=-1)
    g = F.logsigmoid(2 * randn(gen, B, T, HV))
    beta = torch.rand(B, T, HV, generator=gen, dtype=torch.float64)
    h0 = randn(gen, B, HV, K, V)
    inputs = [x.to(dtype).double() for x in (q, k, v, g, beta)]  # what the GPU will see
    o_ref, s_ref = naive_recurrent_gated_delta_rule(
        *inputs, initial_state=h0, output_final_state=True
    )
    cuda = [x.to("cuda", dtype) for x in inputs]
    state_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    h0c = h0.to("cuda", state_dtype)
    o, s = chunk_gated_delta_rule(*cuda, initial_state=h0c, output_final_state=True)
    assert o.dtype == dtype and s.dtype == state_dtype
    assert rel_rms(o, o_ref) < tol and rel_rms(s, s_ref) < max(tol, 1e-5)
    o_t, _ = gated_delta_rule_step(*(x[:, :1] for x in cuda), h0c)
    assert rel_rms(o_t, o_ref[:, :1]) < tol
    cu = torch.tensor([0, 70, 150], device="cuda")
    packed = [x.reshape(1, B * T, *x.shape[2:])[:, :T] for x in cuda]
    o_p, _ = chunk_gated_delta_rule(*packed, cu_seqlens=cu, initial_state=h0c)
    o_r, _ = naive_recurrent_gated_delta_rule(
        *(x.cpu().double() for x in packed), cu_seqlens=cu.cpu(), initial_state=h0
    )
    assert rel_rms(o_p, o_r) < tol


def test_gated_delta_rule_gradients_on_cuda():
    gen = torch.Generator().manual_seed(2)
    B, T, H, HV, K, V = 1, 70, 1, 2, 8, 8
    q, v = randn(gen, B, T, H, K), randn(gen, B, T, HV, V)
    k = F.normalize(randn(gen, B, T, H, K), dim=-1)
    g, beta = F.logsigmoid(randn(gen, B, T, HV)), torch.rand(B, T, HV, generator=gen).double()
    cpu = [x.requires_grad_() for x in (q, k, v, g, beta)]
    cuda = [x.detach().cuda().requires_grad_() for x in cpu]
    naive_recurrent_gated_delta_rule(*cpu)[0].square().sum().backward()
    chunk_gated_delta_rule(*cuda, chunk_size=16)[0].square().sum().backward()
    for a, b in zip(cpu, cuda, strict=True):
        torch.testing.assert_close(b.grad.cpu(), a.grad, rtol=0, atol=1e-9)


def test_dsa_on_cuda():
    gen = torch.Generator().manual_seed(3)
    B, T, S = 2, 90, 120
    iq, ik, iw = randn(gen, B, T, 4, 16), randn(gen, B, S, 16), randn(gen, B, T, 4)
    idx = dsa_indexer_topk(*(x.cuda() for x in (iq, ik, iw)), topk=32, query_block=32)
    ref = naive_dsa_indexer_topk_scores(iq, ik, iw, 32)
    got = indexer_scores(iq, ik, iw, causal=False).gather(-1, idx.cpu().clamp(min=0))
    got = got.masked_fill(idx.cpu() < 0, float("-inf")).sort(-1, descending=True).values
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-9)
    q, k, v = randn(gen, B, T, 4, 32), randn(gen, B, S, 2, 32), randn(gen, B, S, 2, 16)
    out = sparse_attention(*(x.cuda().float() for x in (q, k, v)), idx, query_block=64)
    assert rel_rms(out, naive_sparse_attention(q, k, v, idx.cpu())) < 1e-5


def naive_dsa_indexer_topk_scores(q, k, w, topk):
    """The top-k visible scores per row, descending, −inf padded."""
    scores = indexer_scores(q, k, w)  # (B, T, S), −inf where invisible
    return scores.sort(-1, descending=True).values[..., :topk]
