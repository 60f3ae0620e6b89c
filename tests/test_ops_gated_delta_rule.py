"""attnplug.ops.gated_delta_rule: chunked vs per-token vs an independent paper-form oracle."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from attnplug.ops import (
    chunk_gated_delta_rule,
    gated_delta_rule_step,
    naive_recurrent_gated_delta_rule,
)


def make_inputs(seed, B, T, H, HV, K, V, *, N=None, dtype=torch.float64, normalize_k=True):
    """q, k [B,T,H,K], v [B,T,HV,V], g (log decay) and beta [B,T,HV], h0 [N,HV,K,V].

    k is L2-normalised (an unnormalised k with beta near 1 makes the recurrence explode); g mixes
    mild and strong decays so that the within-chunk exponentials span a wide range.
    """
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    q = rand(B, T, H, K)
    k = rand(B, T, H, K)
    k = F.normalize(k, dim=-1) if normalize_k else k
    v = rand(B, T, HV, V)
    g = F.logsigmoid(2.0 * rand(B, T, HV))  # log decay in about (-7, 0)
    beta = torch.rand(B, T, HV, generator=gen, dtype=torch.float64)
    h0 = 0.5 * rand(B if N is None else N, HV, K, V)
    return [x.to(dtype) for x in (q, k, v, g, beta, h0)]


def paper_form(q, k, v, g, beta, h0, scale):
    """The paper's form, S (V × K): S_t = a_t S_{t-1}(I − b_t k kᵀ) + b_t v kᵀ; o_t = S_t q."""
    B, T, H, K = q.shape
    HV = v.shape[2]
    group = HV // H
    state = h0.transpose(-1, -2).clone()  # (B, HV, V, K)
    eye = torch.eye(K, dtype=torch.float64)
    o = torch.zeros(v.shape, dtype=torch.float64)
    for t in range(T):
        for hv in range(HV):
            kt, qt = k[:, t, hv // group], q[:, t, hv // group]  # (B, K)
            a = g[:, t, hv].exp()[:, None, None]
            b = beta[:, t, hv][:, None, None]
            outer_k = kt[:, :, None] * kt[:, None, :]  # (B, K, K)
            outer_vk = v[:, t, hv][:, :, None] * kt[:, None, :]  # (B, V, K)
            state[:, hv] = a * state[:, hv] @ (eye - b * outer_k) + b * outer_vk
            o[:, t, hv] = (state[:, hv] @ (scale * qt)[:, :, None]).squeeze(-1)
    return o, state.transpose(-1, -2)


def rel_rms(got, ref):
    return ((got.double() - ref).square().mean().sqrt() / ref.square().mean().sqrt()).item()


def assert_same(got, ref, atol=1e-10):
    torch.testing.assert_close(got, ref, rtol=0, atol=atol)


def test_naive_matches_the_paper_form_recurrence():
    q, k, v, g, beta, h0 = make_inputs(0, 2, 9, 2, 4, 5, 3)
    o, state = naive_recurrent_gated_delta_rule(
        q, k, v, g, beta, initial_state=h0, output_final_state=True
    )
    o_ref, state_ref = paper_form(q, k, v, g, beta, h0, scale=5**-0.5)
    assert_same(o, o_ref, atol=1e-12)
    assert_same(state, state_ref, atol=1e-12)


CHUNK_CASES = [  # B, T, H, HV, K, V, chunk_size
    (1, 1, 1, 1, 8, 8, 64),  # one token
    (2, 63, 2, 4, 16, 24, 64),  # grouped value heads, K != V
    (2, 64, 2, 2, 16, 16, 64),
    (1, 65, 1, 3, 16, 8, 64),
    (2, 130, 2, 4, 16, 8, 64),
    (1, 200, 2, 2, 32, 16, 64),
    (2, 37, 2, 4, 8, 8, 16),
    (1, 50, 1, 2, 8, 8, 7),  # odd chunk size
]


@pytest.mark.parametrize("case", CHUNK_CASES)
def test_chunked_matches_naive_in_float64(case):
    *shape, chunk_size = case
    q, k, v, g, beta, h0 = make_inputs(sum(case), *shape)
    o, state = chunk_gated_delta_rule(
        q, k, v, g, beta, initial_state=h0, output_final_state=True, chunk_size=chunk_size
    )
    o_ref, state_ref = naive_recurrent_gated_delta_rule(
        q, k, v, g, beta, initial_state=h0, output_final_state=True
    )
    assert o.shape == v.shape and state.shape == h0.shape
    assert o.dtype == state.dtype == torch.float64
    assert_same(o, o_ref)
    assert_same(state, state_ref)


def test_without_initial_state_starts_from_zeros():
    q, k, v, g, beta, h0 = make_inputs(1, 2, 70, 2, 2, 8, 8)
    o, state = chunk_gated_delta_rule(q, k, v, g, beta, output_final_state=True)
    o0, state0 = chunk_gated_delta_rule(
        q, k, v, g, beta, initial_state=torch.zeros_like(h0), output_final_state=True
    )
    assert_same(o, o0, atol=0)
    assert_same(state, state0, atol=0)
    assert chunk_gated_delta_rule(q, k, v, g, beta)[1] is None


def test_float32_inputs_are_close_to_the_float64_reference():
    q, k, v, g, beta, h0 = make_inputs(2, 2, 130, 2, 4, 32, 32)
    o_ref, state_ref = naive_recurrent_gated_delta_rule(
        q, k, v, g, beta, initial_state=h0, output_final_state=True
    )
    q32, k32, v32, g32, beta32, h0_32 = (x.float() for x in (q, k, v, g, beta, h0))
    o, state = chunk_gated_delta_rule(
        q32, k32, v32, g32, beta32, initial_state=h0_32, output_final_state=True
    )
    assert o.dtype == state.dtype == torch.float32
    assert rel_rms(o, o_ref) < 1e-5
    assert rel_rms(state, state_ref) < 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_compute_in_float32(dtype):
    q, k, v, g, beta, h0 = (x.to(dtype) for x in make_inputs(3, 1, 100, 2, 2, 16, 16))
    o_ref, state_ref = naive_recurrent_gated_delta_rule(
        *(x.double() for x in (q, k, v, g, beta)),
        initial_state=h0.double(),
        output_final_state=True,
    )
    o, state = chunk_gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True)
    assert o.dtype == dtype and state.dtype == torch.float32
    assert rel_rms(o, o_ref) < 1e-2  # the output is rounded to dtype
    assert rel_rms(state, state_ref) < 1e-5


def test_qk_l2norm_normalises_q_and_k_first():
    q, k, v, g, beta, h0 = make_inputs(4, 2, 80, 2, 4, 16, 8, normalize_k=False)
    o, state = chunk_gated_delta_rule(
        q, k, v, g, beta, initial_state=h0, output_final_state=True, use_qk_l2norm=True
    )
    o_ref, state_ref = naive_recurrent_gated_delta_rule(
        q, k, v, g, beta, initial_state=h0, output_final_state=True, use_qk_l2norm=True
    )
    assert_same(o, o_ref)
    assert_same(state, state_ref)
    qn, kn = (x / (x.square().sum(-1, keepdim=True) + 1e-6).sqrt() for x in (q, k))
    assert_same(o, chunk_gated_delta_rule(qn, kn, v, g, beta, initial_state=h0)[0])


def test_scale_multiplies_the_queries():
    q, k, v, g, beta, _ = make_inputs(5, 1, 40, 1, 2, 16, 8)
    o = chunk_gated_delta_rule(q, k, v, g, beta, scale=0.3)[0]
    assert_same(o, chunk_gated_delta_rule(q * 0.3 / 16**-0.5, k, v, g, beta)[0])
    assert_same(o, naive_recurrent_gated_delta_rule(q, k, v, g, beta, scale=0.3)[0])


@pytest.mark.parametrize("fn", [chunk_gated_delta_rule, naive_recurrent_gated_delta_rule])
def test_packed_sequences_equal_separate_runs(fn):
    lengths = [5, 64, 0, 70, 1]  # includes an empty sequence
    T = sum(lengths)
    q, k, v, g, beta, h0 = make_inputs(6, 1, T, 2, 4, 8, 8, N=len(lengths))
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    o, state = fn(q, k, v, g, beta, initial_state=h0, output_final_state=True, cu_seqlens=cu)
    for i, (s, e) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True)):
        o_i, state_i = chunk_gated_delta_rule(
            *(x[:, s:e] for x in (q, k, v, g, beta)),
            initial_state=h0[i : i + 1],
            output_final_state=True,
        )
        assert_same(o[:, s:e], o_i)
        assert_same(state[i : i + 1], state_i)
    assert_same(state[2], h0[2], atol=0)  # the empty sequence keeps its initial state


def test_final_state_carries_a_split_sequence():
    q, k, v, g, beta, h0 = make_inputs(7, 2, 150, 2, 4, 16, 8)
    full, full_state = chunk_gated_delta_rule(
        q, k, v, g, beta, initial_state=h0, output_final_state=True
    )
    first, mid_state = chunk_gated_delta_rule(
        *(x[:, :77] for x in (q, k, v, g, beta)), initial_state=h0, output_final_state=True
    )
    second, end_state = chunk_gated_delta_rule(
        *(x[:, 77:] for x in (q, k, v, g, beta)), initial_state=mid_state, output_final_state=True
    )
    assert_same(torch.cat([first, second], dim=1), full)
    assert_same(end_state, full_state)


def test_decoding_step_by_step_equals_the_full_forward():
    q, k, v, g, beta, h0 = make_inputs(8, 2, 75, 2, 4, 16, 8)
    full, full_state = chunk_gated_delta_rule(
        q, k, v, g, beta, initial_state=h0, output_final_state=True, use_qk_l2norm=True
    )
    prefill = 70
    _, state = chunk_gated_delta_rule(
        *(x[:, :prefill] for x in (q, k, v, g, beta)),
        initial_state=h0,
        output_final_state=True,
        use_qk_l2norm=True,
    )
    for t in range(prefill, 75):
        o_t, state = gated_delta_rule_step(
            *(x[:, t : t + 1] for x in (q, k, v, g, beta)), state, use_qk_l2norm=True
        )
        assert o_t.shape == (2, 1, 4, 8)
        assert_same(o_t, full[:, t : t + 1])
    assert_same(state, full_state)
    first, _ = gated_delta_rule_step(*(x[:, :1] for x in (q, k, v, g, beta)), None)
    assert_same(first, chunk_gated_delta_rule(*(x[:, :1] for x in (q, k, v, g, beta)))[0])


def test_gradients_match_naive_in_float64():
    q, k, v, g, beta, h0 = make_inputs(9, 2, 70, 2, 4, 8, 6)
    inputs = [x.requires_grad_() for x in (q, k, v, g, beta, h0)]
    gen = torch.Generator().manual_seed(10)
    w_o = torch.randn(v.shape, generator=gen, dtype=torch.float64)
    w_s = torch.randn(h0.shape, generator=gen, dtype=torch.float64)

    def loss(fn, **kw):
        o, state = fn(*inputs[:5], initial_state=inputs[5], output_final_state=True, **kw)
        return (o * w_o).sum() + (state * w_s).sum()

    grads = torch.autograd.grad(loss(chunk_gated_delta_rule, chunk_size=32), inputs)
    refs = torch.autograd.grad(loss(naive_recurrent_gated_delta_rule), inputs)
    for name, got, ref in zip("q k v g beta h0".split(), grads, refs, strict=True):
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-9, msg=f"gradient of {name}")


def test_gradcheck_on_a_tiny_shape():
    q, k, v, g, beta, h0 = (
        x.requires_grad_() for x in make_inputs(11, 1, 5, 1, 2, 3, 2, normalize_k=False)
    )

    def fn(q, k, v, g, beta, h0):
        return chunk_gated_delta_rule(
            q,
            k,
            v,
            g,
            beta,
            initial_state=h0,
            output_final_state=True,
            chunk_size=2,
            use_qk_l2norm=True,
        )

    assert torch.autograd.gradcheck(fn, (q, k, v, g, beta, h0))


@settings(max_examples=12, deadline=None)
@given(
    B=st.integers(1, 2),
    T=st.integers(1, 90),
    H=st.integers(1, 2),
    group=st.integers(1, 2),
    K=st.sampled_from([1, 4, 8]),
    V=st.sampled_from([1, 3, 8]),
    chunk_size=st.sampled_from([1, 5, 16, 64]),
    seed=st.integers(0, 2**16),
)
def test_chunked_matches_naive_on_random_shapes(B, T, H, group, K, V, chunk_size, seed):
    q, k, v, g, beta, h0 = make_inputs(seed, B, T, H, H * group, K, V)
    got = chunk_gated_delta_rule(
        q, k, v, g, beta, initial_state=h0, output_final_state=True, chunk_size=chunk_size
    )
    ref = naive_recurrent_gated_delta_rule(
        q, k, v, g, beta, initial_state=h0, output_final_state=True
    )
    assert_same(got[0], ref[0])
    assert_same(got[1], ref[1])


def _bad(**changes):
    """Valid arguments (B=1, T=4, H=2, HV=4, K=3, V=5) with some replaced."""
    q, k, v, g, beta, _ = make_inputs(12, 1, 4, 2, 4, 3, 5)
    args = dict(q=q, k=k, v=v, g=g, beta=beta)
    args.update(changes)
    return args


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"v": torch.zeros(1, 4, 3, 5)}, "HV=3"),  # value heads not a multiple of key heads
        ({"k": torch.zeros(1, 4, 2, 4)}, "k must"),
        ({"v": torch.zeros(1, 5, 4, 5)}, "v must"),
        ({"g": torch.zeros(1, 4, 2)}, "g must"),
        ({"beta": torch.zeros(1, 4)}, "beta must"),
        ({"q": torch.zeros(1, 4, 2, 3, dtype=torch.long)}, "q must be a floating"),
        ({"initial_state": torch.zeros(1, 4, 5, 3)}, "initial_state must"),
        ({"initial_state": torch.zeros(2, 4, 3, 5)}, "initial_state must"),
        (
            {
                "q": torch.zeros(2, 4, 2, 3),
                "k": torch.zeros(2, 4, 2, 3),
                "v": torch.zeros(2, 4, 4, 5),
                "g": torch.zeros(2, 4, 4),
                "beta": torch.zeros(2, 4, 4),
                "cu_seqlens": torch.tensor([0, 4]),
            },
            "B == 1",
        ),
        ({"cu_seqlens": torch.tensor([0, 3])}, "end at T=4"),
        ({"cu_seqlens": torch.tensor([0, 3, 2, 4])}, "never decrease"),
        ({"cu_seqlens": torch.tensor([0.0, 4.0])}, "cu_seqlens must be"),
        (
            {"cu_seqlens": torch.tensor([0, 2, 4]), "initial_state": torch.zeros(1, 4, 3, 5)},
            r"initial_state must be \[N, HV, K, V\] = \(2,",
        ),
        ({"chunk_size": 0}, "chunk_size"),
        ({"scale": "big"}, "scale"),
    ],
)
def test_bad_arguments_raise_value_error_naming_them(changes, match):
    with pytest.raises(ValueError, match=match):
        chunk_gated_delta_rule(**_bad(**changes))
    naive_changes = {key: value for key, value in changes.items() if key != "chunk_size"}
    if naive_changes:
        with pytest.raises(ValueError, match=match):
            naive_recurrent_gated_delta_rule(**_bad(**naive_changes))


def test_step_rejects_more_than_one_token_and_a_bad_state():
    q, k, v, g, beta, _ = make_inputs(13, 1, 2, 1, 1, 3, 3)
    with pytest.raises(ValueError, match="T=2"):
        gated_delta_rule_step(q, k, v, g, beta, None)
    with pytest.raises(ValueError, match="state must"):
        gated_delta_rule_step(*(x[:, :1] for x in (q, k, v, g, beta)), torch.zeros(1, 1, 3, 4))
