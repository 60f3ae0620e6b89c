"""``attnplug.testing`` and ``attnplug check``: a backend's slots against the float64 references.

The kit must pass the ``local`` backend (in every dtype it takes) and catch what a plugin gets
wrong: a missing gate, a missing mask, a wrong scale, duplicate or wrong top-k keys, a gradient
that does not flow, NaN, a kernel that raises — each reported on its own row, the run going on.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from attnplug import ops
from attnplug.backends import LocalSpecProvider
from attnplug.backends.base import BackendSpecProvider
from attnplug.cli import main
from attnplug.layers.norms import RMSNorm
from attnplug.testing import (
    CHECKED_SLOTS,
    MODEL_MARGIN,
    CheckResult,
    check_backend,
    relative_error,
)


def by_slot(results: list[CheckResult], slot: str) -> list[CheckResult]:
    rows = [r for r in results if r.slot == slot]
    assert rows, f"no row for {slot}"
    return rows


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_local_passes_every_check(dtype: str) -> None:
    results = check_backend("local", dtype=dtype)
    assert {r.slot for r in results} == set(CHECKED_SLOTS)
    wrong = [r for r in results if not r.ok]
    assert not wrong, wrong
    assert {r.slot for r in results if r.status == "passed"} == set(CHECKED_SLOTS)
    for r in results:
        if r.status == "passed":
            assert r.errors and all(e <= r.tolerance for e in r.errors.values()), r


def test_local_errors_are_at_float32_rounding() -> None:
    """The comparison is sharp: local against its float64 self is off by float32 rounding."""
    results = check_backend("local", slots=["core_attention", "gated_delta_rule",
                                            "sparse_attention", "causal_conv1d", "layer_norm"])
    assert max(max(r.errors.values()) for r in results) < 5e-6


class NoGate(LocalSpecProvider):
    """A gated delta rule that forgets the decay."""

    def gated_delta_rule(self):
        def fn(q, k, v, g, beta, **kwargs):
            return ops.chunk_gated_delta_rule(q, k, v, g * 0, beta, **kwargs)
        return fn


class NoMask(LocalSpecProvider):
    """Attention that sees the future."""

    def core_attention(self):
        class Attention(torch.nn.Module):
            def __init__(self, config, layer_number=1, softmax_scale=None):
                super().__init__()

            def forward(self, q, k, v):
                g = q.shape[2] // k.shape[2]
                k, v = k.repeat_interleave(g, 2), v.repeat_interleave(g, 2)
                p = torch.einsum("bthd,bshd->bhts", q, k).mul(q.shape[-1] ** -0.5).softmax(-1)
                return torch.einsum("bhts,bshd->bthd", p, v)
        return Attention


class WrongScale(LocalSpecProvider):
    def sparse_attention(self):
        return lambda q, k, v, indices, scale=None: ops.sparse_attention(q, k, v, indices,
                                                                          scale=1.0)


class RepeatedKeys(LocalSpecProvider):
    """A top-k whose rows repeat their best key in the last slot."""

    def dsa_indexer_topk(self):
        def fn(q, k, weights, *, topk, causal=True, relu=True):
            idx = ops.dsa_indexer_topk(q, k, weights, topk=topk, causal=causal, relu=relu)
            idx = idx.clone()
            idx[..., -1] = idx[..., 0]
            return idx
        return fn


class NoRelu(LocalSpecProvider):
    """A top-k that ranks keys without the ReLU: valid-looking indices, wrong keys."""

    def dsa_indexer_topk(self):
        def fn(q, k, weights, *, topk, causal=True, relu=True):
            return ops.dsa_indexer_topk(q, k, weights, topk=topk, causal=causal, relu=False)
        return fn


class Detached(LocalSpecProvider):
    """A convolution whose weight gets no gradient."""

    def causal_conv1d(self):
        def fn(x, weight, *, initial_state=None, activation="silu"):
            return ops.causal_conv1d(x, weight.detach(), initial_state=initial_state,
                                     activation=activation)
        return fn


class Raising(LocalSpecProvider):
    def sparse_attention(self):
        def fn(*args, **kwargs):
            raise RuntimeError("kernel launch failed: out of shared memory")
        return fn

    def dsa_indexer_loss(self):
        raise ImportError("mybackend's loss kernel needs libfoo")


class NaNs(LocalSpecProvider):
    def dsa_indexer_loss(self):
        def fn(*args, **kwargs):
            return ops.dsa_indexer_loss(*args, **kwargs) * float("nan")
        return fn


class RenamedNorm(LocalSpecProvider):
    def layer_norm(self, rms_norm=False, for_qk=False, has_residual=False):
        class Norm(RMSNorm):
            def __init__(self, *, config, hidden_size, eps=None):
                super().__init__(config=config, hidden_size=hidden_size, eps=eps)
                self.gamma = self.weight
                del self.weight

            def forward(self, x):
                self.weight = self.gamma
                return super().forward(x)
        return Norm


@pytest.mark.parametrize("provider,slot,detail", [
    (NoGate(), "gated_delta_rule", "over the tolerance: o, final_state"),
    (NoMask(), "core_attention", "over the tolerance"),
    (WrongScale(), "sparse_attention", "over the tolerance"),
    (RepeatedKeys(), "dsa_indexer_topk", "selected twice"),
    (NoRelu(), "dsa_indexer_topk", "over the tolerance: score gap"),
    (Detached(), "causal_conv1d", "dweight: no gradient flows"),
    (NaNs(), "dsa_indexer_loss", "over the tolerance"),
])
def test_a_wrong_slot_fails_its_rows_and_no_other(provider, slot: str, detail: str) -> None:
    results = check_backend(provider, slots=[s for s in CHECKED_SLOTS if s != "model"])
    rows = by_slot(results, slot)
    # a case where the bug cannot show (one token without a state has nothing to decay, a
    # last query sees every key, a check without the ReLU) may pass; the others fail
    failed = [r for r in rows if r.status == "FAILED"]
    assert len(failed) >= len(rows) - 1 and failed, rows
    assert all(r.status in ("FAILED", "passed") for r in rows), rows
    assert any(detail in r.detail for r in failed), [r.detail for r in failed]
    others = [r for r in results if r.slot != slot]
    assert all(r.ok for r in others), [r for r in others if not r.ok]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("provider", [NoGate(), NoMask()])
def test_the_model_check_catches_a_wrong_mixer(provider, dtype: str) -> None:
    """Also in bfloat16, where the model's errors may reach MODEL_MARGIN times local's own."""
    (row,) = check_backend(provider, slots=["model"], dtype=dtype)
    assert row.status == "FAILED" and f"{MODEL_MARGIN}× local's" in row.detail, row
    assert row.errors["logits"] > 1e-2


def test_a_slot_that_raises_is_an_error_row_and_the_run_goes_on() -> None:
    results = check_backend(Raising(), slots=["sparse_attention", "dsa_indexer_loss",
                                              "core_attention"])
    sparse = by_slot(results, "sparse_attention")
    assert all(r.status == "error" and "out of shared memory" in r.detail for r in sparse)
    (loss,) = by_slot(results, "dsa_indexer_loss")
    assert loss.status == "error" and "ImportError: mybackend's loss kernel needs libfoo" in (
        loss.detail)
    assert all(r.status == "passed" for r in by_slot(results, "core_attention"))


def test_a_norm_with_its_own_parameter_names_is_not_comparable() -> None:
    rows = by_slot(check_backend(RenamedNorm(), slots=["layer_norm"]), "layer_norm")
    assert {r.status for r in rows} == {"not comparable"}
    assert all("not laid out as local's" in r.detail and r.ok for r in rows)


def test_a_backend_serving_nothing_is_reported_slot_by_slot() -> None:
    class Empty(BackendSpecProvider):
        name = "empty"

    results = check_backend(Empty())
    assert {r.slot for r in results} == set(CHECKED_SLOTS)
    assert all(r.ok for r in results)
    kernels = [r for r in results if r.slot in ("gated_delta_rule", "sparse_attention")]
    assert all(r.status == "not served" and "does not serve slot" in r.detail for r in kernels)
    (model,) = by_slot(results, "model")
    assert model.status == "not served" and "does not serve slot" in model.detail


@pytest.mark.parametrize("kwargs,named", [
    ({"dtype": "float64"}, "dtype"), ({"dtype": "int8"}, "dtype"),
    ({"slots": ["attention"]}, "slots"), ({"device": "nowhere"}, "device"),
    ({"tolerance": 0}, "tolerance"), ({"tolerance": "big"}, "tolerance"),
])
def test_bad_arguments_name_themselves(kwargs: dict, named: str) -> None:
    with pytest.raises(ValueError, match=f"^{named}: "):
        check_backend("local", **kwargs)


def test_an_unknown_backend_is_a_backend_error() -> None:
    from attnplug import BackendError

    with pytest.raises(BackendError, match="unknown backend 'nope'"):
        check_backend("nope")
    with pytest.raises(BackendError, match="backend: expected a backend name"):
        check_backend(42)  # type: ignore[arg-type]


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(-1e3, 1e3).filter(lambda v: v == 0.0 or abs(v) > 1e-300),
                min_size=1, max_size=20),  # got = ref * (1 + factor) must itself stay exact:
       st.floats(-1.0, 1.0).filter(lambda x: abs(x) > 1e-3))  # no subnormal values
@example([0.0, 9.069033192924733e-160], 0.5)  # squares below float64's normals (CI, session 10)
@example([0.0, 3.377842691497481e-184], 1.0)  # the norm itself underflows to 0 (CI, session 10)
@example([0.0, 0.0], 0.5)
def test_relative_error_is_a_relative_norm(values: list[float], factor: float) -> None:
    ref = torch.tensor(values, dtype=torch.float64)
    assert relative_error(ref.clone(), ref) == 0.0
    got = ref * (1 + factor)
    # not ref.norm() > 0: that norm underflows to 0 for values below ~1e-162
    expected = abs(factor) if any(v != 0.0 for v in values) else 0.0
    assert math.isclose(relative_error(got, ref), expected, rel_tol=1e-9, abs_tol=1e-12)
    assert relative_error(got[:-1], ref) == math.inf if len(values) > 1 else True
    assert relative_error(torch.full_like(ref, float("nan")), ref) == math.inf


def test_the_command_prints_json_and_exits_by_the_result(capsys, monkeypatch) -> None:
    assert main(["check", "local", "--json", "--slots", "core_attention", "causal_conv1d"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["backend"] == "local" and out["passed"] is True
    assert out["dtype"] == "float32" and out["device"] == "cpu"
    assert [c["slot"] for c in out["checks"]] == ["core_attention"] * 3 + ["causal_conv1d"] * 3
    assert set(out["checks"][0]) == {"slot", "case", "status", "ok", "errors", "tolerance",
                                      "detail"}

    import attnplug.backends

    monkeypatch.setattr(attnplug.backends, "get_provider", lambda name: NoMask())
    assert main(["check", "mine", "--slots", "core_attention"]) == 1
    table = capsys.readouterr().out
    assert "FAILED" in table and "2 of 3 checks wrong or raised" in table  # not the T=1 one


def test_the_command_reports_bad_arguments_in_one_line(capsys) -> None:
    assert main(["check", "local", "--slots", "attention"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("attnplug: error: slots: unknown ['attention']")
    assert main(["check", "nope"]) == 2
    assert "unknown backend 'nope'" in capsys.readouterr().err


def test_a_kernel_with_another_number_of_outputs_fails_with_the_count() -> None:
    class OnlyOutput(LocalSpecProvider):
        def gated_delta_rule(self):
            return lambda *args, **kwargs: ops.chunk_gated_delta_rule(*args, **kwargs)[0]

    rows = by_slot(check_backend(OnlyOutput(), slots=["gated_delta_rule"]), "gated_delta_rule")
    assert all(r.status == "FAILED" and r.detail == "returned 1 outputs, expected 2"
               for r in rows), rows


def test_state_of_its_own_that_is_not_a_parameter_still_compares() -> None:
    """A module with extra non-parameter state (a buffer, as Transformer Engine's FP8
    metadata) loads local's parameters and is compared; its parameter names must match."""
    from attnplug.layers.linear import Linear

    class ScaledLinear(Linear):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.register_buffer("amax_history", torch.zeros(4))

    class Extra(LocalSpecProvider):
        def linear(self):
            return ScaledLinear

    rows = by_slot(check_backend(Extra(), slots=["linear"]), "linear")
    assert [r.status for r in rows] == ["passed", "passed"]
    assert "dweight" in rows[0].errors and "dbias" in rows[0].errors


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 6), st.integers(1, 12), st.integers(0, 12), st.integers(1, 8),
       st.booleans(), st.integers(0, 2**31 - 1), st.data())
def test_the_top_k_judge_accepts_any_tie_break_and_rejects_a_worse_key(
        T: int, extra: int, topk: int, levels: int, causal: bool, seed: int, data) -> None:
    """On scores with many ties (few distinct values), every selection of the top keys passes
    however its ties are broken and in whatever slot order; swapping a selected key for a
    visible one of lower score fails with a score gap; repeating a key fails."""
    from attnplug.testing import _Context, _judge_topk

    S = T + extra
    topk = max(1, min(topk, S))
    gen = torch.Generator().manual_seed(seed)
    # indexer inputs whose scores take few values: one head, one dim, integer levels
    q = torch.ones(1, T, 1, 1, dtype=torch.float64)
    k = torch.randint(0, levels, (1, S, 1), generator=gen).double()
    weights = torch.ones(1, T, 1, dtype=torch.float64)
    inputs = {"q": q, "k": k, "weights": weights}
    scores = ops.indexer_scores(q, k, weights, causal=causal)[0]  # (T, S)
    ctx = _Context(LocalSpecProvider(), torch.device("cpu"), torch.float32, 2e-3, gen)
    # a random tie break: rank by score, then by a random key; slots shuffled
    noise = torch.rand(S, generator=gen, dtype=torch.float64) * 1e-3
    chosen = torch.full((1, T, topk), -1, dtype=torch.int64)
    for t in range(T):
        visible = torch.isfinite(scores[t]).nonzero().flatten()
        order = sorted(visible.tolist(), key=lambda s: (-scores[t, s].item(), noise[s].item()))
        picked = order[:topk]
        slots = torch.randperm(topk, generator=gen)[:len(picked)]
        chosen[0, t, slots] = torch.tensor(picked, dtype=torch.int64)
    row = _judge_topk(ctx, "ties", chosen, inputs, topk, causal, True)
    assert row.status == "passed", row
    # a worse key in place of a selected one, where a row has one left out
    candidates = []
    for t in range(T):
        kept = set(chosen[0, t][chosen[0, t] >= 0].tolist())
        left = [s for s in torch.isfinite(scores[t]).nonzero().flatten().tolist()
                if s not in kept]
        worst_kept = min(kept, key=lambda s: scores[t, s].item())
        lower = [s for s in left if scores[t, s] < scores[t, worst_kept]]
        if lower:
            candidates.append((t, worst_kept, lower[0]))
    if candidates:
        t, old, new = data.draw(st.sampled_from(candidates))
        worse = chosen.clone()
        worse[0, t][worse[0, t] == old] = new
        row = _judge_topk(ctx, "worse", worse, inputs, topk, causal, True)
        assert row.status == "FAILED" and row.errors["score gap"] > 0, row
    full = [t for t in range(T) if (chosen[0, t] >= 0).sum() >= 2]
    if full:
        t = data.draw(st.sampled_from(full))
        repeated = chosen.clone()
        valid = (repeated[0, t] >= 0).nonzero().flatten()
        repeated[0, t, valid[1]] = repeated[0, t, valid[0]]
        row = _judge_topk(ctx, "repeat", repeated, inputs, topk, causal, True)
        assert row.status == "FAILED" and "twice" in row.detail, row


def test_config_fields_reach_the_provider_and_the_modules(capsys) -> None:
    """``config=`` (``--set``): the backend's own fields reach its ``configure`` (kitchen with
    a local fallback is checked on a CPU), shared fields reach both models (biases on every
    linear), and a bad field is a ConfigError naming it."""
    from attnplug import ConfigError

    results = check_backend("kitchen", config={"kitchen_fallback_backend": "local"},
                            slots=["core_attention", "linear", "model"])
    assert [r.status for r in results] == ["passed"] * 6, results
    # both models get the field (biases on every linear), so they still load and compare
    (row,) = check_backend("local", slots=["model"], config={"add_bias_linear": True})
    assert row.status == "passed", row
    with pytest.raises(ConfigError, match="kitchen_fallbak_backend"):
        check_backend("local", config={"kitchen_fallbak_backend": "local"})
    assert main(["check", "kitchen", "--set", "kitchen_fallback_backend=local", "--slots",
                 "core_attention", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["passed"] is True
    assert main(["check", "local", "--set", "nothing"]) == 2
    assert "expected FIELD=VALUE" in capsys.readouterr().err


def test_progress_hears_each_slot_before_its_checks() -> None:
    seen: list[str] = []
    results = check_backend("local", slots=["layer_norm", "causal_conv1d"],
                            progress=seen.append)
    assert seen == ["layer_norm", "causal_conv1d"]
    assert [r.slot for r in results] == ["layer_norm"] * 4 + ["causal_conv1d"] * 3


def test_the_command_logs_one_line_a_slot_when_stderr_is_not_a_terminal(capsys) -> None:
    """Into a file or pipe (a GPU job's log) the command says which slot it is on, so a run
    that is cut short shows how far it got; the table still goes to stdout."""
    assert main(["check", "local", "--slots", "layer_norm", "linear"]) == 0
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.startswith("attnplug check")]
    assert [line.split(" (")[0] for line in lines] == [
        "attnplug check local: checking layer_norm", "attnplug check local: checking linear"]
    assert "every check passed" in captured.out


class FusingLocal(LocalSpecProvider):
    """local, but fusing each layer's input norm into its first linear with attnplug's own
    ``LayerNormLinear`` (kitchen builds these over a fusing fallback such as te)."""

    def fuse_layernorm_and_linear(self) -> bool:
        return True

    def column_parallel_layer_norm_linear(self):
        from attnplug.layers.linear import LayerNormLinear

        return LayerNormLinear


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_model_with_attnplugs_norm_fused_linears_is_compared(dtype: str) -> None:
    """The fused linears' norms take local's input_layernorm / pre_mlp_layernorm, and their
    gradients are judged against those norms' (the default load_local_state and
    parameter_pairs)."""
    (row,) = check_backend(FusingLocal(), slots=["model"], dtype=dtype)
    assert row.status == "passed", row.detail
    assert row.errors["logits"] < 1e-5 if dtype == "float32" else row.ok


def test_local_sources_map_fused_norms_to_the_norms_local_keeps_apart() -> None:
    from attnplug.backends.base import local_sources

    local = ["layers.0.input_layernorm.weight", "layers.0.self_attention.in_proj.weight",
             "layers.0.pre_mlp_layernorm.weight", "layers.0.mlp.linear_fc1.weight",
             "layers.0.mlp.linear_fc2.weight"]
    fused = ["layers.0.self_attention.in_proj.layer_norm.weight",
             "layers.0.self_attention.in_proj.weight",
             "layers.0.mlp.linear_fc1.layer_norm.weight", "layers.0.mlp.linear_fc1.weight",
             "layers.0.mlp.linear_fc2.weight"]
    assert local_sources(fused, local) == {
        "layers.0.self_attention.in_proj.layer_norm.weight": "layers.0.input_layernorm.weight",
        "layers.0.self_attention.in_proj.weight": "layers.0.self_attention.in_proj.weight",
        "layers.0.mlp.linear_fc1.layer_norm.weight": "layers.0.pre_mlp_layernorm.weight",
        "layers.0.mlp.linear_fc1.weight": "layers.0.mlp.linear_fc1.weight",
        "layers.0.mlp.linear_fc2.weight": "layers.0.mlp.linear_fc2.weight",
    }


@pytest.mark.parametrize("names,message", [
    # a norm inside the MLP's second linear absorbed nothing local keeps apart
    (["layers.0.mlp.linear_fc2.layer_norm.weight"], "without a local counterpart"),
    (["layers.0.gamma"], "without a local counterpart: ['layers.0.gamma']"),
    # two linears of one mixer that absorbed the same input norm
    (["layers.0.self_attention.linear_q.layer_norm.weight",
      "layers.0.self_attention.linear_kv.layer_norm.weight"],
     "local's layers.0.input_layernorm.weight would be absorbed by more than one"),
])
def test_local_sources_name_what_does_not_correspond(names: list[str], message: str) -> None:
    from attnplug.backends.base import local_sources

    local = ["layers.0.input_layernorm.weight", "layers.0.pre_mlp_layernorm.weight"]
    with pytest.raises(ValueError, match="not laid out as local's") as info:
        local_sources(names, local)
    assert message in str(info.value)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.from_regex(r"[a-z]{1,6}(\.[a-z0-9_]{1,8}){0,4}", fullmatch=True),
                unique=True, max_size=12), st.data())
def test_local_sources_is_the_identity_on_local_names(local: list[str], data) -> None:
    """Names local has map to themselves, whatever they are."""
    from attnplug.backends.base import local_sources

    names = data.draw(st.lists(st.sampled_from(local), unique=True) if local else st.just([]))
    assert local_sources(names, local) == {name: name for name in names}
