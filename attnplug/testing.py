"""Conformance checks for a backend: every slot it serves against attnplug's references.

A kernel author's backend gets the same checks attnplug's own backends get, without writing
them::

    attnplug check mybackend                                  # CPU, float32
    attnplug check triton --device cuda --dtype bfloat16 --json

    from attnplug.testing import check_backend
    results = check_backend("mybackend", device="cuda")
    assert all(r.ok for r in results), [r for r in results if not r.ok]

Each check runs one slot on fresh random inputs at a small shape (several per slot, awkward ones
included: a sequence length that is not a multiple of a chunk, grouped heads, one token, packed
sequences, keys beyond the queries) and compares the outputs and every gradient with attnplug's
reference computed in float64 from the same (rounded) inputs, as the relative error
``‖got − ref‖ / ‖ref‖``. Kernel slots (DESIGN §8) are compared with ``attnplug.ops``; module
slots are loaded with the ``local`` module's state dict (randomised) and compared with it run
in float64; a small hybrid model (Gated DeltaNet, softmax attention and DSA layers, dense and
MoE MLPs) is built with the backend and with ``local`` from the same weights (which also
covers ``activation_func``, a fixed function with nothing of its own to compare with, and
``column_parallel_layer_norm_linear``, whose parameters are the backend's own). A slot the
backend does not serve is reported as such with its reason, a module whose parameters are not
laid out as ``local``'s as not comparable; a slot that raises is an ``error`` row, never a
crash of the run.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import attrs
import torch
from torch import Tensor, nn

from attnplug._errors import BackendError
from attnplug.backends.base import BackendSpecProvider, SlotNotServed

if TYPE_CHECKING:
    from attnplug.config import TransformerConfig

__all__ = ["CheckResult", "check_backend", "CHECKED_SLOTS", "MODEL_MARGIN", "TOLERANCES",
           "relative_error"]

# Relative L2 error allowed per dtype. float32 leaves room for TF32 dots on a GPU (products
# rounded to 10-bit mantissas, 2^-11 ≈ 5e-4 each); on the CPU (local, and triton under the
# interpreter) the slot checks stay below 5e-6. The broken providers of tests/test_testing_kit.py
# (a missing gate or mask, a wrong scale, a ranking without the ReLU) are off by 0.7 to 4.
TOLERANCES = {torch.float32: 2e-3, torch.float16: 1e-2, torch.bfloat16: 2e-2}
CHECKED_SLOTS = ("core_attention", "gated_delta_rule", "dsa_indexer_topk", "sparse_attention",
                 "dsa_indexer_loss", "causal_conv1d", "layer_norm", "linear",
                 "column_parallel_linear", "row_parallel_linear", "grouped_mlp_modules",
                 "model")
STATUSES = ("passed", "FAILED", "error", "not served", "not comparable")


@attrs.frozen
class CheckResult:
    """One check: ``slot``, ``case`` (the shape and options), ``status`` (one of
    :data:`STATUSES`), ``errors`` (relative error per output and gradient), ``tolerance`` and
    ``detail`` (why it failed, erred, is not served or not comparable)."""

    slot: str
    case: str
    status: str
    errors: dict[str, float] = attrs.field(factory=dict)
    tolerance: float | None = None
    detail: str = ""

    @property
    def ok(self) -> bool:
        """False when the slot computed a wrong value or raised."""
        return self.status not in ("FAILED", "error")

    def to_json(self) -> dict[str, Any]:
        return {"slot": self.slot, "case": self.case, "status": self.status, "ok": self.ok,
                "errors": {k: (v if math.isfinite(v) else str(v)) for k, v in
                           self.errors.items()},
                "tolerance": self.tolerance, "detail": self.detail}


def relative_error(got: Tensor, ref: Tensor) -> float:
    """``‖got − ref‖ / ‖ref‖`` in float64 (the absolute norm when ``ref`` is zero); ``inf``
    when ``got`` is not finite or its shape differs."""
    if got.shape != ref.shape:
        return math.inf
    got, ref = got.detach().double().cpu(), ref.detach().double().cpu()
    if not torch.isfinite(got).all():
        return math.inf
    # both divided by the largest magnitude first: the squares inside a norm of values below
    # about 1e-154 fall into float64's subnormals and lose their digits
    peak = max(got.abs().max().item(), ref.abs().max().item()) if ref.numel() else 0.0
    unit = peak if 0 < peak < math.inf else 1.0
    got, ref = got / unit, ref / unit
    scale = ref.norm().item()
    diff = (got - ref).norm().item()
    return diff / scale if scale > 0 else diff * unit


# -- the harness ------------------------------------------------------------------------------
@attrs.define
class _Context:
    provider: BackendSpecProvider  # configured for the slot checks
    device: torch.device
    dtype: torch.dtype
    tolerance: float
    generator: torch.Generator
    overrides: dict[str, Any] = attrs.field(factory=dict)  # config fields the user set
    unconfigured: BackendSpecProvider | None = None  # configured again for the model

    def config(self, **fields: Any) -> TransformerConfig:
        """A config of the check's own ``fields`` over the user's ``overrides``."""
        from attnplug.config import TransformerConfig

        return TransformerConfig.from_dict({**self.overrides, **fields},
                                           source="check_backend(config=...)")

    def randn(self, *shape: int) -> Tensor:
        """Standard normal values rounded to the checked dtype, as float64 on the CPU."""
        x = torch.randn(shape, generator=self.generator, dtype=torch.float64)
        return x.to(self.dtype).double()

    def rand(self, *shape: int) -> Tensor:
        x = torch.rand(shape, generator=self.generator, dtype=torch.float64)
        return x.to(self.dtype).double()

    def round(self, x: Tensor) -> Tensor:
        """``x`` rounded to the checked dtype (float64), so both sides see the same values."""
        return x.to(self.dtype).double()

    def result(self, slot: str, case: str, errors: dict[str, float],
               detail: str = "") -> CheckResult:
        bad = [name for name, err in errors.items() if not err <= self.tolerance]
        status = "FAILED" if bad or detail else "passed"
        if bad and not detail:
            detail = "over the tolerance: " + ", ".join(bad)
        return CheckResult(slot, case, status, errors, self.tolerance, detail)


def _outputs(value: Any) -> list[Tensor | None]:
    return list(value) if isinstance(value, (tuple, list)) else [value]


class _WrongOutputs(Exception):
    """A slot returned another number of outputs than its contract says."""


def _forward(fn: Callable[..., Any], inputs: dict[str, Any], grad_names: Sequence[str],
             dtype: torch.dtype, device: torch.device) -> tuple[dict[str, Any], list]:
    """``fn(**inputs)`` with the float inputs in ``dtype`` on ``device``, those named in
    ``grad_names`` as leaves that require grad: the inputs as passed, and the outputs."""
    ready = {}
    for name, value in inputs.items():
        if isinstance(value, Tensor):
            value = value.to(device)
            if value.is_floating_point():
                value = value.to(dtype)
            if name in grad_names:
                value = value.detach().requires_grad_()
        ready[name] = value
    return ready, _outputs(fn(**ready))


def _backward(ready: dict[str, Any], outs: list[Tensor | None],
              cotangents: list[Tensor | None], grad_names: Sequence[str]) -> dict[str, Tensor]:
    """Backpropagate ``Σ out·cotangent`` (``.backward()``: module parameters get their
    ``.grad`` in the same pass); the gradients of the inputs named in ``grad_names`` that
    receive one, as ``d<name>``."""
    if len(outs) != len(cotangents):
        raise _WrongOutputs(f"returned {len(outs)} outputs, expected {len(cotangents)}")
    loss = None
    for out, cot in zip(outs, cotangents, strict=True):
        if out is None or cot is None:
            continue
        term = (out * cot.to(out.device, out.dtype)).sum()
        loss = term if loss is None else loss + term
    if not grad_names or loss is None:
        return {}
    loss.backward()
    return {f"d{n}": ready[n].grad for n in grad_names if ready[n].grad is not None}


def _compare_fn(ctx: _Context, slot: str, case: str, fn: Callable[..., Any],
                ref: Callable[..., Any], inputs: dict[str, Any], grad_names: Sequence[str],
                out_names: Sequence[str]) -> CheckResult:
    """The slot's ``fn`` against ``ref`` in float64 on the CPU, outputs and gradients (one
    random cotangent per output, the same on both sides)."""
    ref_ready, ref_outs = _forward(ref, inputs, grad_names, torch.float64, torch.device("cpu"))
    cots = [None if o is None or not o.is_floating_point() else ctx.randn(*o.shape)
            for o in ref_outs]
    ref_grads = _backward(ref_ready, ref_outs, cots, grad_names)
    try:
        ready, outs = _forward(fn, inputs, grad_names, ctx.dtype, ctx.device)
        grads = _backward(ready, outs, cots, grad_names)
    except _WrongOutputs as exc:
        return ctx.result(slot, case, {}, str(exc))
    errors = {}
    for name, got, want in zip(out_names, outs, ref_outs, strict=True):
        if want is None:
            if got is not None:
                return ctx.result(slot, case, errors, f"{name}: expected None, got a tensor")
            continue
        if got is None:
            return ctx.result(slot, case, errors, f"{name}: expected a tensor, got None")
        errors[name] = relative_error(got, want)
    for name, want in ref_grads.items():
        got = grads.get(name)
        if got is None:
            return ctx.result(slot, case, errors, f"{name}: no gradient flows to it")
        errors[name] = relative_error(got, want)
    return ctx.result(slot, case, errors)


# -- kernel slots -----------------------------------------------------------------------------
def _attention_config(ctx: _Context, H: int, Hkv: int, D: int) -> TransformerConfig:
    return ctx.config(num_layers=1, hidden_size=H * D, num_attention_heads=H,
                      num_query_groups=Hkv, kv_channels=D, params_dtype=_dtype_name(ctx.dtype))


def _check_core_attention(ctx: _Context) -> Iterator[CheckResult]:
    from attnplug.ops import naive_causal_attention

    cls = ctx.provider.core_attention()
    for B, T, S, H, Hkv, D, label in [(2, 17, 17, 4, 2, 16, "GQA"),
                                      (1, 1, 9, 2, 1, 16, "one query, MQA"),
                                      (1, 67, 80, 4, 4, 40, "MHA")]:
        case = f"{label} B={B} T={T} S={S} H={H}/{Hkv} D={D}"
        yield _guard(ctx, "core_attention", case, _compare_attention, ctx, cls, case, B, T, S,
                     H, Hkv, D, naive_causal_attention)


def _compare_attention(ctx: _Context, cls: type, case: str, B: int, T: int, S: int, H: int,
                       Hkv: int, D: int, ref: Callable[..., Tensor]) -> CheckResult:
    module = cls(_attention_config(ctx, H, Hkv, D), layer_number=1, softmax_scale=None)
    if isinstance(module, nn.Module):
        module = module.to(ctx.device)
    inputs = {"q": ctx.randn(B, T, H, D), "k": ctx.randn(B, S, Hkv, D),
              "v": ctx.randn(B, S, Hkv, D)}
    return _compare_fn(ctx, "core_attention", case, lambda q, k, v: module(q, k, v),
                       lambda q, k, v: ref(q, k, v), inputs, ("q", "k", "v"), ("o",))


def _gdn_inputs(ctx: _Context, B: int, T: int, H: int, HV: int, K: int, V: int, states: int,
                l2norm: bool) -> dict[str, Any]:
    q, k = ctx.randn(B, T, H, K), ctx.randn(B, T, H, K)
    if not l2norm:  # unit keys keep the delta rule stable without the norm
        k = ctx.round(k / k.norm(dim=-1, keepdim=True))
        q = ctx.round(q * K**-0.5)
    return {"q": q, "k": k, "v": ctx.randn(B, T, HV, V),
            "g": -0.5 * ctx.rand(B, T, HV),
            "beta": ctx.rand(B, T, HV),
            "initial_state": ctx.randn(states, HV, K, V) if states else None}


def _check_gated_delta_rule(ctx: _Context) -> Iterator[CheckResult]:
    from attnplug.ops import naive_recurrent_gated_delta_rule

    fn = ctx.provider.gated_delta_rule()
    cases = [  # B, T, H, HV, K, V, initial states, cu_seqlens, L2 norm, label
        (2, 70, 2, 4, 16, 16, 2, None, True, "grouped value heads, initial state, L2 norm"),
        (1, 1, 1, 1, 16, 32, 0, None, False, "one token, K != V"),
        (1, 100, 2, 2, 16, 16, 3, [0, 5, 70, 100], True, "packed sequences 5/65/30"),
    ]
    for B, T, H, HV, K, V, states, cu, l2, label in cases:
        case = f"{label}: B={B} T={T} H={H}/{HV} K={K} V={V}"

        def one(B=B, T=T, H=H, HV=HV, K=K, V=V, states=states, cu=cu, l2=l2,
                case=case) -> CheckResult:
            inputs = _gdn_inputs(ctx, B, T, H, HV, K, V, states, l2)
            inputs["cu_seqlens"] = None if cu is None else torch.tensor(cu, dtype=torch.int64)
            options = {"output_final_state": True, "use_qk_l2norm": l2}
            grads = ("q", "k", "v", "g", "beta") + (("initial_state",) if states else ())
            return _compare_fn(ctx, "gated_delta_rule", case,
                               lambda **kw: fn(**kw, **options),
                               lambda **kw: naive_recurrent_gated_delta_rule(**kw, **options),
                               inputs, grads, ("o", "final_state"))

        yield _guard(ctx, "gated_delta_rule", case, one)


def _check_causal_conv1d(ctx: _Context) -> Iterator[CheckResult]:
    from attnplug.ops import naive_causal_conv1d

    fn = ctx.provider.causal_conv1d()
    for B, T, C, K, state, act in [(2, 37, 24, 4, False, "silu"), (1, 1, 8, 4, True, "silu"),
                                   (1, 9, 16, 3, True, None)]:
        case = f"B={B} T={T} C={C} kernel {K}, initial state {state}, activation {act}"

        def one(B=B, T=T, C=C, K=K, state=state, act=act, case=case) -> CheckResult:
            inputs = {"x": ctx.randn(B, T, C), "weight": ctx.randn(C, K) * 0.5,
                      "initial_state": ctx.randn(B, K - 1, C) if state else None}
            grads = ("x", "weight") + (("initial_state",) if state else ())
            return _compare_fn(ctx, "causal_conv1d", case,
                               lambda **kw: fn(**kw, activation=act),
                               lambda **kw: naive_causal_conv1d(**kw, activation=act),
                               inputs, grads, ("y",))

        yield _guard(ctx, "causal_conv1d", case, one)


def _indexer_inputs(ctx: _Context, B: int, T: int, S: int, HI: int, DI: int) -> dict[str, Any]:
    return {"q": ctx.randn(B, T, HI, DI), "k": ctx.randn(B, S, DI),
            "weights": ctx.round(ctx.randn(B, T, HI) * HI**-0.5)}


def _check_dsa_indexer_topk(ctx: _Context) -> Iterator[CheckResult]:
    fn = ctx.provider.dsa_indexer_topk()
    for B, T, S, HI, DI, topk, causal, relu in [(2, 70, 70, 4, 16, 16, True, True),
                                                (1, 20, 50, 2, 32, 32, True, True),
                                                (1, 9, 40, 2, 16, 8, False, False)]:
        case = (f"B={B} T={T} S={S} {HI}x{DI} topk {topk}"
                f"{'' if causal else ', not causal'}{'' if relu else ', no relu'}")

        def one(B=B, T=T, S=S, HI=HI, DI=DI, topk=topk, causal=causal, relu=relu,
                case=case) -> CheckResult:
            inputs = _indexer_inputs(ctx, B, T, S, HI, DI)
            got = fn(*(inputs[n].to(ctx.device, ctx.dtype) for n in ("q", "k", "weights")),
                     topk=topk, causal=causal, relu=relu)
            return _judge_topk(ctx, case, got, inputs, topk, causal, relu)

        yield _guard(ctx, "dsa_indexer_topk", case, one)


def _judge_topk(ctx: _Context, case: str, got: Tensor, inputs: dict[str, Tensor], topk: int,
                causal: bool, relu: bool) -> CheckResult:
    """Indices are right when each row holds ``min(topk, visible keys)`` distinct visible keys
    (then −1) whose scores are the row's ``topk`` largest: the ``score gap`` is the largest
    difference between the sorted selected scores and the sorted true top scores, relative to
    the row's largest score (ties may pick either key)."""
    from attnplug.ops import indexer_scores

    B, T = inputs["q"].shape[:2]
    S = inputs["k"].shape[1]
    if tuple(got.shape) != (B, T, topk) or got.dtype != torch.int64:
        return ctx.result("dsa_indexer_topk", case, {}, f"indices: expected int64 "
                          f"{[B, T, topk]}, got {got.dtype} {list(got.shape)}")
    scores = indexer_scores(inputs["q"], inputs["k"], inputs["weights"], causal=causal,
                            relu=relu)  # [B, T, S], -inf where not visible
    got = got.cpu()
    valid = got >= 0
    expected = torch.isfinite(scores).sum(-1).clamp(max=topk)
    problems = []
    if (valid.sum(-1) != expected).any():
        problems.append("a row holds another number of keys than min(topk, visible keys)")
    if (got[valid] >= S).any() or (got[~valid] != -1).any():
        problems.append("an index is out of range (or a negative one other than -1)")
    picked = scores.gather(-1, got.clamp(min=0, max=S - 1)).masked_fill(~valid, -math.inf)
    if (valid & ~torch.isfinite(picked)).any():
        problems.append("a key the query cannot see was selected")
    ordered = got.masked_fill(~valid, S).sort(-1).values
    if ((ordered[..., 1:] == ordered[..., :-1]) & (ordered[..., 1:] < S)).any():
        problems.append("a key was selected twice in one row")
    if problems:
        return ctx.result("dsa_indexer_topk", case, {}, "; ".join(problems))
    best = scores.topk(topk, dim=-1).values
    mine = picked.sort(-1, descending=True).values
    finite = torch.isfinite(best)
    scale = best.masked_fill(~finite, 0).abs().amax(-1, keepdim=True).clamp(min=1e-12)
    gap = ((mine - best).masked_fill(~finite, 0).abs() / scale).max().item()
    return ctx.result("dsa_indexer_topk", case, {"score gap": gap})


def _check_sparse_attention(ctx: _Context) -> Iterator[CheckResult]:
    from attnplug.ops import dsa_indexer_topk, naive_sparse_attention

    fn = ctx.provider.sparse_attention()
    for B, T, S, H, Hkv, D, topk, label in [(2, 33, 33, 4, 1, 16, 8, "MQA, unused slots"),
                                            (1, 17, 40, 4, 2, 32, 12, "GQA, S > T")]:
        case = f"{label}: B={B} T={T} S={S} H={H}/{Hkv} D={D} topk {topk}"

        def one(B=B, T=T, S=S, H=H, Hkv=Hkv, D=D, topk=topk, case=case) -> CheckResult:
            index = _indexer_inputs(ctx, B, T, S, 2, 16)
            indices = dsa_indexer_topk(index["q"], index["k"], index["weights"], topk=topk)
            inputs = {"q": ctx.randn(B, T, H, D), "k": ctx.randn(B, S, Hkv, D),
                      "v": ctx.randn(B, S, Hkv, D), "indices": indices}
            return _compare_fn(ctx, "sparse_attention", case, fn, naive_sparse_attention,
                               inputs, ("q", "k", "v"), ("o",))

        yield _guard(ctx, "sparse_attention", case, one)


def _check_dsa_indexer_loss(ctx: _Context) -> Iterator[CheckResult]:
    from attnplug.ops import dsa_indexer_loss

    fn = ctx.provider.dsa_indexer_loss()
    for B, T, S, H, Hkv, D, HI, DI in [(2, 24, 24, 4, 1, 16, 2, 16), (1, 9, 20, 2, 2, 16, 4, 8)]:
        case = f"B={B} T={T} S={S} H={H}/{Hkv} D={D} indexer {HI}x{DI}"

        def one(B=B, T=T, S=S, H=H, Hkv=Hkv, D=D, HI=HI, DI=DI, case=case) -> CheckResult:
            index = _indexer_inputs(ctx, B, T, S, HI, DI)
            inputs = {"q": ctx.randn(B, T, H, D), "k": ctx.randn(B, S, Hkv, D),
                      "index_q": index["q"], "index_k": index["k"],
                      "index_weights": index["weights"]}
            return _compare_fn(ctx, "dsa_indexer_loss", case, fn, dsa_indexer_loss, inputs,
                               ("index_q", "index_k", "index_weights"), ("loss",))

        yield _guard(ctx, "dsa_indexer_loss", case, one)


# -- module slots -----------------------------------------------------------------------------
def _load_local(provider: BackendSpecProvider, module: nn.Module,
                local_module: nn.Module) -> tuple[str, list[tuple[str, str, int | None]]]:
    """Give the backend's ``module`` the weights of ``local_module`` through the provider's
    ``load_local_state`` and pair their parameters (``parameter_pairs``); the reason they
    cannot be compared, or ``""`` and the pairs."""
    try:
        provider.load_local_state(module, local_module)
        pairs = provider.parameter_pairs(module, local_module)
    except (ValueError, RuntimeError, KeyError) as exc:
        return (f"its parameters do not correspond to local's ({_first_line(exc)}; a backend "
                "with its own layout implements load_local_state and parameter_pairs)"), []
    return "", pairs


def _paired_grad_errors(pairs: list[tuple[str, str, int | None]], module: nn.Module,
                        local_module: nn.Module) -> dict[str, float]:
    """Relative error of each parameter's gradient against its local counterpart's."""
    own = dict(module.named_parameters())
    local = dict(local_module.named_parameters())
    errors = {}
    for name, local_name, index in pairs:
        want = local[local_name].grad
        if want is None:
            continue
        want = want if index is None else want[index]
        got = own[name].grad
        errors[name] = math.inf if got is None else relative_error(got, want)
    return errors


def _randomised_state(module: nn.Module, ctx: _Context) -> dict[str, Tensor]:
    """``module``'s state dict with every float tensor replaced by random values (rounded to
    the checked dtype, float64)."""
    state = {}
    for name, value in module.state_dict().items():
        if value.is_floating_point():
            centre = 1.0 if value.dim() == 1 and name.endswith("weight") else 0.0  # norm scales
            value = ctx.round(centre + 0.5 * ctx.randn(*value.shape))
        state[name] = value
    return state


def _compare_modules(ctx: _Context, slot: str, case: str, build: Callable[[], nn.Module],
                     build_local: Callable[[], nn.Module], inputs: dict[str, Any],
                     grad_names: Sequence[str], call: Callable[..., Any]) -> CheckResult:
    """The backend's module against ``local``'s with the same (random) parameters, the latter
    in float64 on the CPU: outputs, input gradients and parameter gradients (one pass each)."""
    local = build_local().double()
    state = _randomised_state(local, ctx)
    local.load_state_dict(state)
    module = build().to(ctx.device)
    why, pairs = _load_local(ctx.provider, module, local)
    if why:
        return CheckResult(slot, case, "not comparable", {}, ctx.tolerance, why)
    result = _compare_fn(ctx, slot, case, lambda **kw: call(module, **kw),
                         lambda **kw: call(local, **kw), inputs, grad_names, ("y",))
    if result.status != "passed":
        return result
    # the parameters' gradients, from the same backward pass
    errors = dict(result.errors)
    for name, err in _paired_grad_errors(pairs, module, local).items():
        errors[f"d{name}"] = err
    return ctx.result(slot, case, errors)


def _module_config(ctx: _Context, **fields: Any) -> TransformerConfig:
    return ctx.config(**{"num_layers": 1, "hidden_size": 48, "num_attention_heads": 1,
                         **fields})


def _check_layer_norm(ctx: _Context) -> Iterator[CheckResult]:
    from attnplug.backends.local import LocalSpecProvider

    for rms in (True, False):
        name = "RMSNorm" if rms else "LayerNorm"
        try:
            cls = ctx.provider.layer_norm(rms_norm=rms)
        except SlotNotServed as exc:
            yield CheckResult("layer_norm", name, "not served", detail=str(exc))
            continue
        local_cls = LocalSpecProvider().layer_norm(rms_norm=rms)
        for shape in [(3, 5, 40), (1, 1, 96)]:
            C = shape[-1]
            config = _module_config(ctx, hidden_size=C, normalization=name,
                                    params_dtype=_dtype_name(ctx.dtype))
            config64 = _module_config(ctx, hidden_size=C, normalization=name,
                                      params_dtype="float64")
            case = f"{name} {list(shape)}"
            yield _guard(ctx, "layer_norm", case, _compare_modules, ctx, "layer_norm", case,
                         functools.partial(cls, config=config, hidden_size=C),
                         functools.partial(local_cls, config=config64, hidden_size=C),
                         {"x": ctx.randn(*shape)}, ("x",), _call_module)


def _call_module(module: nn.Module | Callable[..., Any], *args: Any, **kwargs: Any) -> Tensor:
    """A module's (or function's) output, from positional arguments (Megatron-style linears
    may return ``(y, bias)``)."""
    y = module(*args, *kwargs.values())
    return y[0] if isinstance(y, tuple) else y


def _check_linears(ctx: _Context, slot: str) -> Iterator[CheckResult]:
    from attnplug.layers.linear import Linear

    cls = getattr(ctx.provider, slot)()
    for n_in, n_out, bias in [(24, 40, True), (33, 8, False)]:
        case = f"{n_in} -> {n_out}{', bias' if bias else ''}"
        config = _module_config(ctx, params_dtype=_dtype_name(ctx.dtype))
        config64 = _module_config(ctx, params_dtype="float64")
        yield _guard(ctx, slot, case, _compare_modules, ctx, slot, case,
                     functools.partial(cls, n_in, n_out, config=config, bias=bias),
                     functools.partial(Linear, n_in, n_out, config=config64, bias=bias),
                     {"x": ctx.randn(2, 5, n_in)}, ("x",), _call_module)


def _check_experts(ctx: _Context) -> Iterator[CheckResult]:
    from attnplug.backends.local import LocalSpecProvider

    for grouped in (False, True):
        try:
            cls = ctx.provider.grouped_mlp_modules(grouped)
        except SlotNotServed as exc:
            yield CheckResult("grouped_mlp_modules", f"moe_use_grouped_gemm={grouped}",
                              "not served", detail=str(exc))
            continue
        local_cls = LocalSpecProvider().grouped_mlp_modules(False)
        for gated, counts in [(True, [3, 0, 5, 2]), (False, [1, 1, 0, 9])]:
            fields = {"hidden_size": 32, "num_moe_experts": 4, "moe_ffn_hidden_size": 24,
                      "gated_linear_unit": gated, "activation_func": "silu" if gated else "gelu"}
            config = _module_config(ctx, **fields, params_dtype=_dtype_name(ctx.dtype))
            config64 = _module_config(ctx, **fields, params_dtype="float64")
            case = (f"moe_use_grouped_gemm={grouped}, {'gated ' if gated else ''}experts, "
                    f"tokens per expert {counts}")
            tokens = torch.tensor(counts, dtype=torch.int64)
            yield _guard(ctx, "grouped_mlp_modules", case, _compare_modules, ctx,
                         "grouped_mlp_modules", case, functools.partial(cls, 4, config=config),
                         functools.partial(local_cls, 4, config=config64),
                         {"x": ctx.randn(sum(counts), 32)}, ("x",),
                         functools.partial(_call_experts, tokens=tokens))


def _call_experts(module: nn.Module, x: Tensor, tokens: Tensor) -> Tensor:
    """Experts on rows sorted by expert; the counts on the host where the module asks for
    them there (``host_counts``), else on the rows' device."""
    on_host = getattr(module, "host_counts", False) or x.device.type == "cpu"
    return _call_module(module, x, tokens if on_host else tokens.to(x.device))


# -- the model --------------------------------------------------------------------------------
MODEL_PATTERN = "GE*-DE"  # Gated DeltaNet + MoE, softmax attention + dense, DSA + MoE
# The DSA layer's top-k keeps every visible key of the T = 40 tokens: at random weights many
# indexer scores tie (at zero, through the ReLU), and which of the tied keys a backend keeps
# is its own choice (the dsa_indexer_topk checks judge selections tie-aware); the model check
# then still runs the sparse attention, its unused slots and the indexer's loss. For the same
# reason each token is routed to every expert: with 2 of 4, a token whose second and third
# router scores lie closer than one bf16 rounding goes to another expert in one run than in the
# other, and that expert's weight gradient moves by a token's share (on an H200 in session 10,
# triton's layer-5 fc2 gradient 7.8e-2 against float64, local's 9.1e-3). The router, the
# auxiliary loss and the experts still run; the grouped_mlp_modules checks take the experts
# alone.
MODEL_TOKENS = 40
MODEL_EXPERTS = 4


def _model_config(ctx: _Context, dtype: str) -> TransformerConfig:
    return ctx.config(
        num_layers=len(MODEL_PATTERN), hybrid_layer_pattern=MODEL_PATTERN, hidden_size=64,
        num_attention_heads=4, num_query_groups=2, normalization="RMSNorm",
        activation_func="silu", gated_linear_unit=True, qk_layernorm=True,
        linear_conv_kernel_dim=4, linear_key_head_dim=16, linear_value_head_dim=16,
        linear_num_key_heads=2, linear_num_value_heads=4,
        dsa_indexer_n_heads=2, dsa_indexer_head_dim=16, dsa_indexer_topk=MODEL_TOKENS,
        num_moe_experts=MODEL_EXPERTS, moe_router_topk=MODEL_EXPERTS, moe_ffn_hidden_size=32,
        params_dtype=dtype)


# How far the model's error may exceed local's own in the same dtype. Both are one draw of a
# rounding error, and for a small gradient summed over every token (a GatedDeltaNet layer's
# dt_bias and A_log: one number per head) the draws spread widely: on an H200 in bf16 (session
# 9) the te and triton backends' errors there were 1.2–2.2× local's over three seeds, with
# every other gradient and the logits within the tolerance. A wrong backend (a wrong
# activation, a dropped term) is off by far more (tests/test_testing_kit.py).
MODEL_MARGIN = 4


def _check_model(ctx: _Context) -> Iterator[CheckResult]:
    case = (f"pattern {MODEL_PATTERN!r}, B=2 T={MODEL_TOKENS}, logits and every parameter's "
            "gradient")
    yield _guard(ctx, "model", case, _compare_models, ctx, case)


def _run_model(model: nn.Module, ids: Tensor, device: torch.device) -> tuple[Tensor, dict]:
    """Logits and every parameter's gradient of ``Σ logits·c + auxiliary losses`` (a fixed
    random ``c``)."""
    model.train()
    logits = model(ids.to(device))
    cot = torch.randn(logits.shape, generator=torch.Generator().manual_seed(1),
                      dtype=torch.float64)
    ((logits * cot.to(device, logits.dtype)).sum() + model.auxiliary_loss()).backward()
    return logits, {n: p.grad for n, p in model.named_parameters()}


def _compare_models(ctx: _Context, case: str) -> CheckResult:
    """The backend's model and ``local``'s in the checked dtype, each against ``local``'s in
    float64 from the same weights. Errors compound through six sublayers, a router's top-k and
    a DSA top-k, so the backend passes where its error is within the tolerance or within
    :data:`MODEL_MARGIN` times ``local``'s own error in the same dtype (``local in <dtype>``
    rows)."""
    from attnplug.backends.local import LocalSpecProvider
    from attnplug.layers.model import GPTModel

    vocab = 50
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=ctx.generator)))
    reference = GPTModel(_model_config(ctx, "float64"), vocab, backend=LocalSpecProvider())
    config = _model_config(ctx, _dtype_name(ctx.dtype))
    provider = (ctx.unconfigured or ctx.provider).configure(config)
    reasons = provider.supports(config)
    if reasons:
        return CheckResult("model", case, "not served", {}, ctx.tolerance, "; ".join(reasons))
    model = GPTModel(config, vocab, backend=provider).to(ctx.device)
    local = GPTModel(config, vocab, backend=LocalSpecProvider()).to(ctx.device)
    local.load_state_dict({n: v.to(ctx.dtype) if v.is_floating_point() else v
                           for n, v in reference.state_dict().items()})
    why, pairs = _load_local(provider, model, local)
    if why:
        return CheckResult("model", case, "not comparable", {}, ctx.tolerance, why)
    ids = torch.randint(0, vocab, (2, MODEL_TOKENS), generator=ctx.generator)
    want_logits, want = _run_model(reference, ids, torch.device("cpu"))
    got_logits, got = _run_model(model, ids, ctx.device)
    local_logits, local_grads = _run_model(local, ids, ctx.device)

    def part(grads: dict[str, Tensor | None], name: str, index: int | None) -> Tensor | None:
        grad = grads.get(name)
        return grad if grad is None or index is None else grad[index]

    # (label, the backend's error, local's error in the same dtype), the logits first
    rows = [("logits", relative_error(got_logits, want_logits),
             relative_error(local_logits, want_logits))]
    for name, local_name, index in pairs:
        ref = part(want, local_name, index)
        if ref is None:
            continue
        mine = got.get(name)
        label = local_name if index is None else f"{local_name}[{index}]"
        rows.append((f"grad {label}", math.inf if mine is None else relative_error(mine, ref),
                     relative_error(part(local_grads, local_name, index), ref)))
    worst = max(rows, key=lambda row: row[1] / max(ctx.tolerance, MODEL_MARGIN * row[2]))
    dtype = f"local in {_dtype_name(ctx.dtype)}"
    errors = {"logits": rows[0][1], f"logits, {dtype}": rows[0][2]}
    if worst is not rows[0]:
        errors.update({worst[0]: worst[1], f"{worst[0]}, {dtype}": worst[2]})
    if not worst[1] <= max(ctx.tolerance, MODEL_MARGIN * worst[2]):
        return CheckResult("model", case, "FAILED", errors, ctx.tolerance,
                           f"{worst[0]}: error over both the tolerance and {MODEL_MARGIN}× "
                           "local's in the same dtype")
    return CheckResult("model", case, "passed", errors, ctx.tolerance)


# -- running them -----------------------------------------------------------------------------
def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    first = text[0] if text else ""
    return f"{type(exc).__name__}: {first[:300]}"


def _guard(ctx: _Context, slot: str, case: str, check: Callable[..., CheckResult],
           *args: Any) -> CheckResult:
    """``check(*args)``; a slot that raises gives an ``error`` row, not a crash."""
    try:
        return check(*args)
    except SlotNotServed as exc:
        return CheckResult(slot, case, "not served", {}, ctx.tolerance, str(exc))
    except Exception as exc:  # noqa: BLE001 - a plugin's failure is reported, not raised
        return CheckResult(slot, case, "error", {}, ctx.tolerance, _first_line(exc))


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


_CHECKS: dict[str, Callable[[_Context], Iterator[CheckResult]]] = {
    "core_attention": _check_core_attention,
    "gated_delta_rule": _check_gated_delta_rule,
    "dsa_indexer_topk": _check_dsa_indexer_topk,
    "sparse_attention": _check_sparse_attention,
    "dsa_indexer_loss": _check_dsa_indexer_loss,
    "causal_conv1d": _check_causal_conv1d,
    "layer_norm": _check_layer_norm,
    "linear": lambda ctx: _check_linears(ctx, "linear"),
    "column_parallel_linear": lambda ctx: _check_linears(ctx, "column_parallel_linear"),
    "row_parallel_linear": lambda ctx: _check_linears(ctx, "row_parallel_linear"),
    "grouped_mlp_modules": _check_experts,
    "model": _check_model,
}


def check_backend(backend: str | BackendSpecProvider, *, device: str | torch.device = "cpu",
                  dtype: str | torch.dtype = torch.float32, slots: Sequence[str] | None = None,
                  seed: int = 0, tolerance: float | None = None,
                  config: dict[str, Any] | None = None,
                  progress: Callable[[str], None] | None = None) -> list[CheckResult]:
    """Check ``backend`` (a registered name or a provider) slot by slot; see the module doc.

    Args:
        backend: the name of an installed backend (``attnplug backends`` lists them) or a
            :class:`~attnplug.backends.BackendSpecProvider`.
        device: where the backend's slots run (``"cpu"``, ``"cuda"``); references run in
            float64 on the CPU.
        dtype: the inputs' and parameters' dtype: float32, float16 or bfloat16.
        slots: which of :data:`CHECKED_SLOTS` to check (default: all of them).
        seed: the random inputs' seed.
        tolerance: the largest relative error accepted (default: :data:`TOLERANCES`).
        config: ``TransformerConfig`` fields for every config the checks build, where the
            checks do not set the field themselves (the shapes): a backend's own fields
            (``kitchen_fallback_backend``), ``add_bias_linear``, ``moe_grouped_gemm``, ...
        progress: called with each slot's name before its checks run (a GPU run compiles and
            autotunes every kernel at each new shape: minutes, not seconds).

    Returns one :class:`CheckResult` per case. The provider is configured once
    (``provider.configure``) with a small config for the slot checks, and again with the
    model's. Raises ``BackendError`` when the backend cannot be used here (or its configure
    refuses), ``ConfigError`` for a bad ``config`` field and ``ValueError`` naming the argument
    for a bad device, dtype, slot or tolerance.
    """
    if isinstance(dtype, str):
        named = getattr(torch, dtype.removeprefix("torch."), None)
        if not isinstance(named, torch.dtype):
            raise ValueError(f"dtype: expected one of float32, float16, bfloat16, got {dtype!r}")
        dtype = named
    if dtype not in TOLERANCES:
        raise ValueError(f"dtype: expected one of float32, float16, bfloat16, got {dtype}")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device: {device!r} is not a torch device ({exc})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {device} asked for, but torch sees no CUDA device")
    chosen = list(CHECKED_SLOTS if slots is None else slots)
    unknown = [s for s in chosen if s not in CHECKED_SLOTS]
    if unknown:
        raise ValueError(f"slots: unknown {unknown}; expected some of {list(CHECKED_SLOTS)}")
    if tolerance is not None and not (isinstance(tolerance, (int, float)) and tolerance > 0):
        raise ValueError(f"tolerance: expected a number > 0, got {tolerance!r}")
    if isinstance(backend, str):
        from attnplug.backends import get_provider

        provider = get_provider(backend)
    elif isinstance(backend, BackendSpecProvider):
        provider = backend
    else:
        raise BackendError(f"backend: expected a backend name or a BackendSpecProvider, got "
                           f"{type(backend).__name__}")
    if config is not None and not isinstance(config, dict):
        raise ValueError(f"config: expected a dict of TransformerConfig fields, got "
                         f"{type(config).__name__}")
    ctx = _Context(provider, device, dtype,
                   TOLERANCES[dtype] if tolerance is None else float(tolerance),
                   torch.Generator().manual_seed(seed), dict(config or {}), provider)
    ctx.provider = provider.configure(_module_config(ctx, params_dtype=_dtype_name(dtype)))
    results = []
    for slot in chosen:
        if progress is not None:
            progress(slot)
        try:
            results.extend(_CHECKS[slot](ctx))
        except SlotNotServed as exc:
            results.append(CheckResult(slot, "-", "not served", detail=str(exc)))
        except Exception as exc:  # noqa: BLE001 - a plugin's failure is reported, not raised
            results.append(CheckResult(slot, "-", "error", {}, ctx.tolerance, _first_line(exc)))
    return results
