"""The triton backend's gated delta rule against the float64 reference: outputs, final states and
every gradient (q, k, v, g, beta, initial state), plus the decoding kernel against the step op.

On the CPU the kernels run in Triton's interpreter, which is slow: tiny head dims, few cases.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from triton_cases import DEVICE, HAS_CUDA, assert_matches

from attnplug.ops import (
    chunk_gated_delta_rule,
    gated_delta_rule_step,
    naive_recurrent_gated_delta_rule,
)


def _inputs(B: int, T: int, H: int, HV: int, K: int, V: int, N: int, l2norm: bool,
            dtype: torch.dtype, strided: bool = False) -> dict[str, torch.Tensor]:
    """Random q, k, v, g, beta, initial state, do, dht (k unit-norm unless normalised inside)."""
    if strided:  # q, k, v as views of one fused projection, like the GDN layer's
        qkv = torch.randn(B, T, 2 * H * K + HV * V, device=DEVICE, dtype=dtype)
        q, k, v = qkv.split([H * K, H * K, HV * V], dim=-1)
        q, k, v = q.view(B, T, H, K), k.view(B, T, H, K), v.view(B, T, HV, V)
    else:
        q = torch.randn(B, T, H, K, device=DEVICE, dtype=dtype)
        k = torch.randn(B, T, H, K, device=DEVICE, dtype=dtype)
        v = torch.randn(B, T, HV, V, device=DEVICE, dtype=dtype)
    if not l2norm:
        k = F.normalize(k.float(), dim=-1).to(dtype)
    return {
        "q": q, "k": k, "v": v,
        "g": F.logsigmoid(torch.rand(B, T, HV, device=DEVICE)) / 4,
        "beta": torch.rand(B, T, HV, device=DEVICE).sigmoid(),
        "h0": torch.randn(N, HV, K, V, device=DEVICE),
        "do": torch.randn(B, T, HV, V, device=DEVICE, dtype=dtype),
        "dht": torch.randn(N, HV, K, V, device=DEVICE),
    }


NAMES = ("q", "k", "v", "g", "beta", "h0")


def _run(fn, x: dict[str, torch.Tensor], cast, with_h0: bool, **kwargs) -> dict:
    """o, final state and the gradient of ``Σ o·do + Σ final·dht`` for every input."""
    leaves = {n: cast(x[n]).detach().requires_grad_() for n in NAMES}
    o, final = fn(*(leaves[n] for n in NAMES[:5]),
                  initial_state=leaves["h0"] if with_h0 else None, output_final_state=True,
                  **kwargs)
    ((o * cast(x["do"])).sum() + (final * cast(x["dht"])).sum()).backward()
    out = {"o": o, "final": final}
    out.update({f"d{n}": leaves[n].grad for n in NAMES if with_h0 or n != "h0"})
    return out


def _check(fn, x: dict, label: str, dtype: torch.dtype, with_h0: bool, **kwargs) -> dict:
    """Assert ``fn``'s outputs and gradients match float64; return them (as :func:`_run`)."""
    outs = _run(fn, x, lambda t: t.clone(), with_h0, **kwargs)
    refs = _run(naive_recurrent_gated_delta_rule, x, lambda t: t.double(), with_h0, **kwargs)
    assert outs["o"].dtype == x["v"].dtype and outs["final"].dtype == torch.float32
    for name, ref in refs.items():
        assert_matches(f"{label} {name}", outs[name], ref, dtype)
    return outs


def _check_against(fn, baseline, x: dict, label: str, with_h0: bool, **kwargs) -> None:
    """Assert a variant ``fn`` matches float64 in float32 (:func:`_check`) and the ``baseline``
    it replaces, every output and gradient, to float32 rounding."""
    got = _check(fn, x, label, torch.float32, with_h0, **kwargs)
    want = _run(baseline, x, lambda t: t.clone(), with_h0, **kwargs)
    for name, ref in want.items():
        torch.testing.assert_close(got[name], ref, rtol=1e-5, atol=1e-5, msg=name)


# (label, B, T, H, HV, K, V, initial state, use_qk_l2norm, cu_seqlens). HV = 2·H (grouped value
# heads) except where a case says otherwise; H = HV takes the path that finishes dq, dk in the
# kernel. K, V not powers of two pad the blocks; K = V = 256 is the largest head.
CASES = [
    ("T=1", 2, 1, 1, 2, 16, 32, True, True, None),
    ("T=37 strided", 2, 37, 1, 2, 16, 32, False, True, None),
    ("T=64+5 H=HV", 1, 69, 2, 2, 32, 16, True, False, None),
    ("T=130", 1, 130, 1, 2, 16, 32, True, True, None),
    ("cu_seqlens", 1, 100, 1, 2, 16, 32, True, True, [0, 5, 70, 70, 100]),
    ("HV=3H K=48 V=40", 1, 70, 1, 3, 48, 40, True, True, None),
    ("K=V=256 H=HV", 1, 20, 1, 1, 256, 256, True, True, None),
]


def _case_inputs(case: tuple, seed: int, l2norm: bool | None = None) -> tuple[dict, dict]:
    """A case's random inputs (float32) and its keyword arguments (``cu_seqlens``,
    ``use_qk_l2norm``: the case's unless ``l2norm`` is given)."""
    label, B, T, H, HV, K, V, _, case_l2norm, cu = case
    l2norm = case_l2norm if l2norm is None else l2norm
    torch.manual_seed(hash(label) % 2**31 + seed)
    cu_seqlens = None if cu is None else torch.tensor(cu, device=DEVICE)
    N = B if cu is None else len(cu) - 1
    x = _inputs(B, T, H, HV, K, V, N, l2norm, torch.float32, strided="strided" in label)
    return x, {"cu_seqlens": cu_seqlens, "use_qk_l2norm": l2norm}


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_chunk_matches_the_float64_reference(case) -> None:
    from attnplug_triton.ops.gated_delta_rule.chunk import chunk_gated_delta_rule as triton_gdr

    x, kwargs = _case_inputs(case, 0)
    _check(triton_gdr, x, case[0], torch.float32, case[7], **kwargs)


@pytest.mark.parametrize("split", [False, True], ids=["sequential o", "split o"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_both_forward_outputs_match_the_float64_reference(case, split: bool) -> None:
    """Output and final state of either forward, forced: the sequential kernel writing o (the
    default with many sequence·value-head pairs) and the parallel output kernel (the default
    with few, as every test shape here has)."""
    from attnplug_triton.ops.gated_delta_rule.chunk import chunk_gated_delta_rule as triton_gdr

    x, kwargs = _case_inputs(case, 2)
    with_h0 = case[7]
    with torch.no_grad():
        got = triton_gdr(*(x[n] for n in NAMES[:5]), initial_state=x["h0"] if with_h0 else None,
                         output_final_state=True, split_output=split, **kwargs)
        want = naive_recurrent_gated_delta_rule(
            *(x[n].double() for n in NAMES[:5]),
            initial_state=x["h0"].double() if with_h0 else None, output_final_state=True,
            **kwargs)
    for name, out, ref in zip(("o", "final"), got, want, strict=True):
        assert_matches(f"split={split} {case[0]} {name}", out, ref, torch.float32)


def test_the_output_is_split_by_default_only_with_few_pairs(monkeypatch) -> None:
    from attnplug_triton.ops.gated_delta_rule import chunk
    from attnplug_triton.ops.gated_delta_rule.chunk_h import FEW_PROGRAMS

    assert chunk.SPLIT_OUTPUT is None
    assert chunk.splits_output(1) and chunk.splits_output(FEW_PROGRAMS - 1)
    assert not chunk.splits_output(FEW_PROGRAMS) and not chunk.splits_output(4 * FEW_PROGRAMS)
    for forced in (False, True):
        monkeypatch.setattr(chunk, "SPLIT_OUTPUT", forced)
        assert chunk.splits_output(1) is forced and chunk.splits_output(10**6) is forced


def test_the_walks_overlap_by_default_only_with_few_pairs(monkeypatch) -> None:
    from attnplug_triton.ops.gated_delta_rule import chunk

    assert chunk.OVERLAP_WALKS is None and chunk.OVERLAP_MAX_PAIRS == 16
    assert chunk.overlaps_walks(1) and chunk.overlaps_walks(16)
    assert not chunk.overlaps_walks(17) and not chunk.overlaps_walks(128)
    for forced in (False, True):
        monkeypatch.setattr(chunk, "OVERLAP_WALKS", forced)
        assert chunk.overlaps_walks(1) is forced and chunk.overlaps_walks(10**6) is forced


LEAN_CASES = [c for c in CASES if c[0] in ("T=37 strided", "T=64+5 H=HV", "T=130", "cu_seqlens",
                                           "HV=3H K=48 V=40")]


@pytest.mark.parametrize("case", LEAN_CASES, ids=[c[0] for c in LEAN_CASES])
def test_the_lean_walk_matches_float64_and_the_served_walk(case) -> None:
    """The state walk's LEAN ordering (less shared memory, the same products), in the forward
    writing o and in the backward's state recomputation: outputs and every gradient against
    float64, and against the served ordering to float32 rounding."""
    from attnplug_triton.ops.gated_delta_rule.chunk import chunk_gated_delta_rule as triton_gdr

    x, kwargs = _case_inputs(case, 4)
    _check_against(functools.partial(triton_gdr, lean_walk=True, split_output=False),
                   functools.partial(triton_gdr, lean_walk=False, split_output=False), x,
                   f"lean {case[0]}", case[7], **kwargs)


@pytest.mark.parametrize("case", LEAN_CASES[:3], ids=[c[0] for c in LEAN_CASES[:3]])
def test_the_tf32x3_inverse_matches_float64(case, monkeypatch) -> None:
    """kkt_solve's inverse with its float32 products as three TF32 products (the interpreter
    multiplies in float32 either way: this checks the path, the GPU checks the precision),
    with the lean walk too: outputs and every gradient against float64."""
    from attnplug_triton.ops.gated_delta_rule import kkt_solve
    from attnplug_triton.ops.gated_delta_rule.chunk import chunk_gated_delta_rule as triton_gdr

    x, kwargs = _case_inputs(case, 5)
    _check(functools.partial(triton_gdr, lean_walk=True, inverse_precision="tf32x3"), x,
           f"tf32x3 inverse {case[0]}", torch.float32, case[7], **kwargs)
    monkeypatch.setattr(kkt_solve, "INVERSE_PRECISION", "tf32x3")  # the module's default
    _check(triton_gdr, x, f"tf32x3 inverse by default {case[0]}", torch.float32, case[7],
           **kwargs)


@pytest.mark.parametrize("case", LEAN_CASES, ids=[c[0] for c in LEAN_CASES])
def test_the_substitution_matches_float64_and_the_series(case) -> None:
    """kkt_solve's diagonal blocks by forward substitution (served up to K = 128): outputs and
    every gradient against float64, and against the series (served above; at K = 256 the
    CASES row checks it against float64 itself) to float32 rounding."""
    from attnplug_triton.ops.gated_delta_rule.chunk import chunk_gated_delta_rule as triton_gdr

    x, kwargs = _case_inputs(case, 8)
    _check_against(functools.partial(triton_gdr, diagonal_inverse="substitution"),
                   functools.partial(triton_gdr, diagonal_inverse="series"), x,
                   f"substitution {case[0]}", case[7], **kwargs)


def test_the_substitution_inverts_nearly_equal_keys_to_float32_accuracy() -> None:
    """Nearly equal keys, β ≈ 1, no decay: ``M`` close to all ones below the diagonal, where
    the series' partial products reach the thousands and cancel to entries of at most 1 (it is
    5.6e-4 off here in float32); the substitution, served at this key dim, never forms them.
    ``A`` in float32 against the float64 inverse of ``I + M`` built from the same keys."""
    from attnplug_triton.ops.gated_delta_rule import kkt_solve
    from attnplug_triton.ops.gated_delta_rule.common import check_args

    torch.manual_seed(0)
    T, K = 64, 32
    k = torch.ones(1, T, 1, K, device=DEVICE) + 0.05 * torch.randn(1, T, 1, K, device=DEVICE)
    g = torch.zeros(1, T, 1, device=DEVICE)
    beta = torch.full((1, T, 1), 0.999, device=DEVICE)
    seqs = check_args("kkt_solve", k, k, k, g, beta, None, None, None)
    assert kkt_solve.diagonal_inverse_for(K) == "substitution"
    a, _, _ = kkt_solve.kkt_solve(k[0], k[0], g[0], beta[0], seqs, True, "ieee")
    k_hat = k[0, :, 0].double().cpu()
    k_hat = k_hat / (k_hat.square().sum(-1, keepdim=True) + 1e-6).sqrt()
    m = torch.tril(0.999 * k_hat @ k_hat.T, -1)
    want = torch.linalg.inv(torch.eye(T, dtype=torch.float64) + m)
    torch.testing.assert_close(a[:, 0].double().cpu(), want, rtol=0, atol=1e-5)


def test_the_diagonal_inverse_is_the_substitution_up_to_k_128(monkeypatch) -> None:
    """The served choice (``DIAGONAL_INVERSE = None``): substitution up to
    ``SUBSTITUTION_MAX_DIM`` (checked on the H200 there), the series above; the module switch
    forces one for every K, and a call's ``diagonal_inverse`` overrides both."""
    from attnplug_triton.ops.gated_delta_rule import kkt_solve

    assert kkt_solve.DIAGONAL_INVERSE is None and kkt_solve.SUBSTITUTION_MAX_DIM == 128
    assert [kkt_solve.diagonal_inverse_for(k) for k in (1, 16, 48, 128, 129, 256)] == [
        "substitution"] * 4 + ["series"] * 2
    for forced in kkt_solve.DIAGONAL_INVERSES:
        monkeypatch.setattr(kkt_solve, "DIAGONAL_INVERSE", forced)
        assert kkt_solve.diagonal_inverse_for(16) == kkt_solve.diagonal_inverse_for(256) == forced
        other = next(m for m in kkt_solve.DIAGONAL_INVERSES if m != forced)
        assert kkt_solve.diagonal_inverse_for(16, other) == other


# (argument, a value it refuses, kkt_solve's module switch, a value it refuses, the two errors)
UNKNOWN_INVERSE_SWITCHES = [
    ("diagonal_inverse", "lu", "DIAGONAL_INVERSE", "cholesky",
     r"chunk_gated_delta_rule: diagonal_inverse='lu' is not accepted: expected None or one of "
     r"\['series', 'substitution'\]",
     r"kkt_solve.DIAGONAL_INVERSE='cholesky' is not accepted: expected None or one of "
     r"\['series', 'substitution'\]"),
    ("inverse_precision", "tf32", "INVERSE_PRECISION", "tf32x2",
     r"chunk_gated_delta_rule: inverse_precision='tf32' is not accepted: expected None or one "
     r"of \['ieee', 'tf32x3'\]",
     r"kkt_solve.INVERSE_PRECISION='tf32x2' is not accepted: expected one of "
     r"\['ieee', 'tf32x3'\]"),
]


@pytest.mark.parametrize(("argument", "bad", "switch", "bad_switch", "error", "switch_error"),
                         UNKNOWN_INVERSE_SWITCHES, ids=[c[0] for c in UNKNOWN_INVERSE_SWITCHES])
def test_an_unknown_inverse_switch_is_named(argument, bad, switch, bad_switch, error,
                                            switch_error, monkeypatch) -> None:
    """A refused value of the per-call argument, and of kkt_solve's module switch behind it,
    each named in the error with what is accepted."""
    from attnplug_triton.ops.gated_delta_rule import kkt_solve
    from attnplug_triton.ops.gated_delta_rule.chunk import chunk_gated_delta_rule as triton_gdr

    x, kwargs = _case_inputs(CASES[1], 0)
    args = [x[n] for n in NAMES[:5]]
    with pytest.raises(ValueError, match=error):
        triton_gdr(*args, **{argument: bad}, **kwargs)
    monkeypatch.setattr(kkt_solve, switch, bad_switch)
    with pytest.raises(ValueError, match=switch_error):
        triton_gdr(*args, **kwargs)


# every case with y from the dh kernel (the default); three with y from the dv pass
SPLIT_DK_CASES = [(c, True) for c in CASES] + [
    (c, False) for c in CASES if c[0] in ("T=37 strided", "cu_seqlens", "HV=3H K=48 V=40")]


@pytest.mark.parametrize(("case", "dv_from_dh"), SPLIT_DK_CASES,
                         ids=[f"{c[0]}-{'dh' if dh else 'dv pass'}" for c, dh in SPLIT_DK_CASES])
def test_split_dk_matches_float64_and_the_single_dk_pass(case, dv_from_dh: bool) -> None:
    """The dk pass as two (stats, then sum through a float32 scratch): every output and
    gradient against float64, and against the single pass's to float32 rounding."""
    from attnplug_triton.ops.gated_delta_rule.chunk import chunk_gated_delta_rule as triton_gdr

    x, kwargs = _case_inputs(case, 3)
    _check_against(functools.partial(triton_gdr, split_dk=True, dv_from_dh=dv_from_dh,
                                     dm_from_y=False),
                   functools.partial(triton_gdr, split_dk=False, dv_from_dh=dv_from_dh,
                                     dm_from_y=False), x,
                   f"split_dk {case[0]}", case[7], **kwargs)


# every case in two passes with y from the dh kernel; the one-pass form and y from the dv pass
# at three
DM_CASES = [(c, True, True) for c in CASES] + [
    (c, split, False) for c in CASES if c[0] in ("T=37 strided", "cu_seqlens", "HV=3H K=48 V=40")
    for split in (True, False)] + [
    (c, False, True) for c in CASES if c[0] in ("T=64+5 H=HV", "K=V=256 H=HV", "T=130")]


@pytest.mark.parametrize(("case", "split", "dv_from_dh"), DM_CASES,
                         ids=[f"{c[0]}-{'two' if s else 'one'}-{'dh' if dh else 'dv pass'}"
                              for c, s, dh in DM_CASES])
def test_dm_from_y_matches_float64_and_the_da_passes(case, split: bool, dv_from_dh: bool) -> None:
    """dk, dg and dβ from the stored Y (dM = −Y V_newᵀ, the dPᵀ terms in the dq pass), in two
    passes or one: every output and gradient against float64, and against the dA passes'
    to float32 rounding."""
    from attnplug_triton.ops.gated_delta_rule.chunk import chunk_gated_delta_rule as triton_gdr

    x, kwargs = _case_inputs(case, 4)
    _check_against(functools.partial(triton_gdr, dm_from_y=True, split_dk=split,
                                     dv_from_dh=dv_from_dh),
                   functools.partial(triton_gdr, dm_from_y=False, split_dk=True,
                                     dv_from_dh=dv_from_dh), x,
                   f"dm_from_y {case[0]}", case[7], **kwargs)


# V_new from the backward's state walk: two cases in two passes, three in one
VN_CASES = [(c, True) for c in CASES if c[0] in ("T=37 strided", "HV=3H K=48 V=40")] + [
    (c, False) for c in CASES if c[0] in ("T=64+5 H=HV", "cu_seqlens", "T=130")]


@pytest.mark.parametrize(("case", "split"), VN_CASES,
                         ids=[f"{c[0]}-{'two' if s else 'one'}" for c, s in VN_CASES])
def test_v_new_from_the_state_walk_matches_float64_and_recomputing_it(monkeypatch, case,
                                                                      split: bool) -> None:
    """``store_v_new``: the backward's state walk stores ``U − W h`` and the dq and WY passes
    read it (their ``_vn`` launches): every output and gradient against float64, and against
    the passes that compute it, to float32 rounding."""
    from attnplug_triton.ops.gated_delta_rule import chunk_bwd, chunk_h
    from attnplug_triton.ops.gated_delta_rule.chunk import chunk_gated_delta_rule as triton_gdr

    launched = []
    for module in (chunk_bwd, chunk_h):
        real = module.launch
        monkeypatch.setattr(module, "launch", lambda name, *a, real=real, **kw:
                            launched.append(name) or real(name, *a, **kw))
    x, kwargs = _case_inputs(case, 6)
    _check_against(functools.partial(triton_gdr, dm_from_y=True, split_dk=split,
                                     store_v_new=True),
                   functools.partial(triton_gdr, dm_from_y=True, split_dk=split,
                                     store_v_new=False), x,
                   f"store_v_new {case[0]}", case[7], **kwargs)
    wy = ["chunk_bwd_wy_stats_vn", "chunk_bwd_wy_sum_vn"] if split else ["chunk_bwd_wy_vn"]
    assert {"chunk_fwd_h_h_vn", "chunk_bwd_dq_dp_vn", *wy} <= set(launched)


def test_v_new_is_not_stored_without_dm_from_y_or_with_kept_states(monkeypatch) -> None:
    """Only the WY path reads V_new, and kept states skip the walk that would store it."""
    from attnplug_triton.ops.gated_delta_rule import chunk_h
    from attnplug_triton.ops.gated_delta_rule.chunk import chunk_gated_delta_rule as triton_gdr

    launched = []
    real = chunk_h.launch
    monkeypatch.setattr(chunk_h, "launch", lambda name, *a, **kw: launched.append(name)
                        or real(name, *a, **kw))
    torch.manual_seed(0)
    x = _inputs(1, 20, 1, 1, 16, 16, 1, True, torch.float32)
    for switches in (dict(dm_from_y=False), dict(keep_states=True)):
        _run(functools.partial(triton_gdr, store_v_new=True, **switches), x,
             lambda t: t.clone(), False, use_qk_l2norm=True)
    assert launched and not any(name.endswith("_vn") for name in launched)


@pytest.mark.parametrize("split", [True, False], ids=["two passes", "one pass"])
def test_every_backward_launch_survives_the_autotuners_repeated_runs(monkeypatch,
                                                                     split: bool) -> None:
    """On a GPU the autotuner runs a kernel once per configuration it times, restoring only
    the arguments its launch names in ``restore``: a pass that reads a buffer it overwrites
    and does not name it computes garbage there (session 13: dg NaN on the H200, right under
    the interpreter). Here every backward launch runs twice, as timed, with that restore."""
    from attnplug_triton.ops.gated_delta_rule import chunk_bwd
    from attnplug_triton.ops.gated_delta_rule.chunk import chunk_gated_delta_rule as triton_gdr

    original = chunk_bwd.launch
    timed = []

    def as_timed(name, kernel, *args, restore=(), **meta):
        names = kernel.arg_names
        params = args[4:]  # after configs, interpreter config, key and grid
        saved = {n: params[names.index(n)].clone() for n in restore}
        original(name, kernel, *args, restore=restore, **meta)
        for n, value in saved.items():
            params[names.index(n)].copy_(value)
        original(name, kernel, *args, restore=restore, **meta)
        timed.append(name)

    monkeypatch.setattr(chunk_bwd, "launch", as_timed)
    case = next(c for c in CASES if c[0] == "cu_seqlens")
    x, kwargs = _case_inputs(case, 5)
    _check(functools.partial(triton_gdr, dm_from_y=True, split_dk=split), x, "timed twice",
           torch.float32, case[7], **kwargs)
    assert ("chunk_bwd_wy_sum" in timed) == split and "chunk_bwd_dq_dp" in timed


SPLIT_CASES = [c for c in CASES if c[0] in ("T=64+5 H=HV", "cu_seqlens", "HV=3H K=48 V=40")]


@pytest.mark.parametrize(("split", "keep", "dv_dh", "local"),
                         [(True, False, False, True), (False, True, True, False),
                          (True, True, True, True)],
                         ids=["split+local_dv", "keep+dv_from_dh", "all"])
@pytest.mark.parametrize("case", SPLIT_CASES, ids=[c[0] for c in SPLIT_CASES])
def test_kernel_variants_match_float64_and_the_default_output(case, split: bool, keep: bool,
                                                              dv_dh: bool, local: bool) -> None:
    """The split forward (states stored, output from them in a parallel kernel), the states
    kept for the backward instead of recomputed, dv from the dh kernel, and the dh kernel's
    within-chunk term from a parallel kernel: outputs and every gradient against float64, and
    the output against the default forward's."""
    from attnplug_triton.ops.gated_delta_rule.chunk import chunk_gated_delta_rule as triton_gdr

    label, with_h0 = case[0], case[7]
    x, kwargs = _case_inputs(case, 1)
    variant = functools.partial(triton_gdr, split_output=split, keep_states=keep,
                                dv_from_dh=dv_dh, local_dv=local)
    _check(variant, x, f"split={split} keep={keep} dv_from_dh={dv_dh} local_dv={local} "
           f"{label}", torch.float32, with_h0, **kwargs)
    args = [x[n] for n in NAMES[:5]]
    h0 = x["h0"] if with_h0 else None
    with torch.no_grad():
        out = variant(*args, initial_state=h0, **kwargs)[0]
        default = triton_gdr(*args, initial_state=h0, split_output=False, keep_states=False,
                             **kwargs)[0]
    torch.testing.assert_close(out, default, rtol=1e-5, atol=1e-5)


GROUPED_CASES = [c for c in CASES if c[4] > c[3]]


@pytest.mark.parametrize("l2norm", [True, False])
@pytest.mark.parametrize("case", GROUPED_CASES[:3], ids=[c[0] for c in GROUPED_CASES[:3]])
def test_fused_group_grads_match_float64_and_the_torch_finish(case, l2norm: bool) -> None:
    """Grouped value heads with dq, dk finished in one kernel (group sum, the L2 norm's
    backward, the cast): every gradient against float64, and dq, dk against the torch finish."""
    from attnplug_triton.ops.gated_delta_rule.chunk import chunk_gated_delta_rule as triton_gdr

    label, with_h0 = case[0], case[7]
    x, kwargs = _case_inputs(case, 2, l2norm)
    fused = functools.partial(triton_gdr, fused_group_grads=True)
    got = _check(fused, x, f"fused group grads {label}", torch.float32, with_h0, **kwargs)
    torch_finish = _run(functools.partial(triton_gdr, fused_group_grads=False), x,
                        lambda t: t.clone(), with_h0, **kwargs)
    for name in ("dq", "dk"):
        torch.testing.assert_close(got[name], torch_finish[name], rtol=1e-5, atol=1e-6)


def test_finish_group_grads_in_half_precision_and_bad_shapes() -> None:
    from attnplug_triton.ops.gated_delta_rule.group_grads import finish_group_grads

    torch.manual_seed(3)
    tokens, H, group, K = 37, 3, 2, 24
    wide = torch.randn(tokens, H, K + 5, device=DEVICE, dtype=torch.float16)
    x = wide[..., 2:2 + K]  # rows strided like a slice of the projection
    part = torch.randn(tokens, H * group, K, device=DEVICE)
    x64, part64 = x.double(), part.double().view(tokens, H, group, K).sum(2)
    y = x64 / torch.sqrt(x64.square().sum(-1, keepdim=True) + 1e-6)
    r = torch.rsqrt(x64.square().sum(-1, keepdim=True) + 1e-6)
    want = (part64 - y * (y * part64).sum(-1, keepdim=True)) * r
    got = finish_group_grads(part, x, group, True)
    assert got.dtype == torch.float16 and got.shape == (tokens, H, K)
    assert_matches("finish_group_grads l2norm", got, want, torch.float16)
    assert_matches("finish_group_grads sum", finish_group_grads(part, x, group, False),
                   part64, torch.float16)
    with pytest.raises(ValueError, match="part must be contiguous"):
        finish_group_grads(part[:, :H], x, group, True)


def test_float16_inputs_and_a_custom_scale() -> None:
    from attnplug_triton.ops.gated_delta_rule.chunk import chunk_gated_delta_rule as triton_gdr

    torch.manual_seed(0)
    x = _inputs(1, 69, 1, 2, 16, 32, 1, True, torch.float16)
    _check(triton_gdr, x, "fp16", torch.float16, True, use_qk_l2norm=True, scale=0.3)


def test_decoding_kernel_matches_the_step_op() -> None:
    from attnplug_triton.ops.gated_delta_rule.fused_recurrent import (
        fused_recurrent_gated_delta_rule,
    )

    torch.manual_seed(1)
    x = _inputs(3, 1, 1, 2, 16, 32, 3, True, torch.float32)
    args = [x[n] for n in NAMES[:5]]
    o, state = fused_recurrent_gated_delta_rule(*args, initial_state=x["h0"],
                                                output_final_state=True, use_qk_l2norm=True)
    o_ref, state_ref = gated_delta_rule_step(*(a.double() for a in args), x["h0"].double(),
                                             use_qk_l2norm=True)
    assert_matches("o", o, o_ref, torch.float32)
    assert_matches("state", state, state_ref, torch.float32)


@pytest.mark.parametrize("case", LEAN_CASES[1:4], ids=[c[0] for c in LEAN_CASES[1:4]])
def test_the_experimental_slot_runs_the_unchecked_variants_and_matches_float64(
        case, monkeypatch) -> None:
    """``TritonSpecProvider(experimental_kernels=True)``'s slot: the chunked kernels with
    EXPERIMENTAL_CHUNK_OPTIONS (empty since session 12; here set to the TF32×3 inverse and the
    served walk's ordering, seen through the calls they make), every output and gradient
    against float64."""
    from attnplug_triton.ops import gated_delta_rule as gdr
    from attnplug_triton.ops.gated_delta_rule import chunk
    from attnplug_triton.provider import TritonSpecProvider

    monkeypatch.setattr(gdr, "EXPERIMENTAL_CHUNK_OPTIONS",
                        {"lean_walk": False, "inverse_precision": "tf32x3"})
    slot = TritonSpecProvider(experimental_kernels=True).gated_delta_rule()
    assert slot is gdr.experimental_gated_delta_rule
    seen = []
    real = chunk.run_chunk

    def spy(*args, **kwargs):
        seen.append({k: kwargs.get(k) for k in gdr.EXPERIMENTAL_CHUNK_OPTIONS})
        return real(*args, **kwargs)

    monkeypatch.setattr(chunk, "run_chunk", spy)
    x, kwargs = _case_inputs(case, 6)
    _check(slot, x, f"experimental slot {case[0]}", torch.float32, case[7], **kwargs)
    assert seen == [gdr.EXPERIMENTAL_CHUNK_OPTIONS]


def test_the_slot_goes_token_by_token_without_autograd_and_chunked_with_it() -> None:
    from attnplug_triton.ops.gated_delta_rule import gated_delta_rule
    from attnplug_triton.ops.gated_delta_rule.fused_recurrent import (
        fused_recurrent_gated_delta_rule,
    )
    from attnplug_triton.provider import TritonSpecProvider

    assert TritonSpecProvider(experimental_kernels=False).gated_delta_rule() is gated_delta_rule
    provider = TritonSpecProvider(experimental_kernels=True)
    assert provider.served_by("gated_delta_rule") == "triton"
    torch.manual_seed(2)
    cu = torch.tensor([0, 3, 40, 41], device=DEVICE)
    x = _inputs(1, 41, 1, 2, 16, 16, 3, True, torch.float32)
    args = [x[n] for n in NAMES[:5]]
    kwargs = {"initial_state": x["h0"], "output_final_state": True, "cu_seqlens": cu,
              "use_qk_l2norm": True}
    with torch.no_grad():
        o, final = gated_delta_rule(*args, **kwargs)
    o_ref, final_ref = naive_recurrent_gated_delta_rule(
        *(a.double() for a in args), **{**kwargs, "initial_state": x["h0"].double()})
    assert_matches("o", o, o_ref, torch.float32)
    assert_matches("final", final, final_ref, torch.float32)
    q = args[0].clone().requires_grad_()
    with pytest.raises(ValueError, match="forward only"):
        fused_recurrent_gated_delta_rule(q, *args[1:], **kwargs)
    o, _ = gated_delta_rule(q, *args[1:], **kwargs)
    assert o.grad_fn is not None


@pytest.mark.parametrize("bad,message", [
    (lambda a: {**a, "q": a["q"].repeat(1, 1, 3, 1), "k": a["k"].repeat(1, 1, 3, 1)},
     "multiple of the key heads"),
    (lambda a: {**a, "v": a["v"].repeat(1, 1, 1, 17)}, "head dims"),
    (lambda a: {**a, "q": a["q"].double(), "k": a["k"].double()}, "float64"),
    (lambda a: {**a, "g": a["g"][..., :1]}, "g must be"),
    (lambda a: {**a, "initial_state": a["initial_state"][:1]}, "initial_state must be"),
    (lambda a: {**a, "cu_seqlens": torch.tensor([0, 3, 5])}, "B == 1"),
])
def test_bad_arguments_are_named(bad, message) -> None:
    from attnplug_triton.ops.gated_delta_rule import gated_delta_rule

    x = _inputs(2, 5, 1, 2, 16, 16, 2, True, torch.float32)
    args = {n: x[n] for n in NAMES[:5]} | {"initial_state": x["h0"]}
    with pytest.raises(ValueError, match=message):
        gated_delta_rule(**bad(args))


@pytest.mark.skipif(not HAS_CUDA, reason="real shapes in bfloat16 need a CUDA device")
@pytest.mark.parametrize(("B", "HV", "fused"), [(8, 16, False), (2, 32, False), (2, 32, True)],
                         ids=["project", "grouped", "grouped fused grads"])
def test_real_shape_in_bfloat16_on_the_gpu(B: int, HV: int, fused: bool) -> None:
    """T=4096, H=16, K=V=128, bf16 — the project shape (B=8, HV=H) and the GPU-sized example's
    grouped value heads (B=2, HV=2H; dq, dk finished in torch or in one kernel): relative error
    <= 1e-2 against float64 (the chunked reference, exact in float64 and cheaper than the
    per-token one at this size)."""
    from attnplug_triton.ops.gated_delta_rule.chunk import chunk_gated_delta_rule as triton_gdr

    torch.manual_seed(3)
    x = _inputs(B, 4096, 16, HV, 128, 128, B, True, torch.bfloat16)
    outs = _run(functools.partial(triton_gdr, fused_group_grads=fused), x, lambda t: t.clone(),
                True, use_qk_l2norm=True)
    refs = _run(chunk_gated_delta_rule, x, lambda t: t.double(), True, use_qk_l2norm=True)
    for name, ref in refs.items():
        rel = ((outs[name].double() - ref).norm() / ref.norm()).item()
        assert rel <= 1e-2, f"{name}: relative error {rel:.2e} > 1e-2"


@pytest.mark.skipif(not HAS_CUDA, reason="a second CUDA stream needs a CUDA device")
@pytest.mark.parametrize(("B", "T", "HV", "cu"), [(8, 4096, 16, None), (2, 4096, 32, None),
                                                  (1, 3000, 8, (0, 1, 700, 2047, 3000))],
                         ids=["project", "grouped", "packed"])
def test_overlapped_walks_match_float64_and_the_one_stream_backward(B: int, T: int, HV: int,
                                                                    cu) -> None:
    """``overlap_walks``: the backward's state recomputation on a second stream while the dh
    walk runs on the first — bf16 within 1e-2 of float64, and the same bits as one stream (same
    kernels, same configurations; a missing join would read states not yet written)."""
    from attnplug_triton.ops.gated_delta_rule.chunk import chunk_gated_delta_rule as triton_gdr

    torch.manual_seed(5)
    H = 16 if HV % 16 == 0 else HV
    N = B if cu is None else len(cu) - 1
    x = _inputs(B, T, H, HV, 128, 128, N, True, torch.bfloat16)
    kwargs = {"use_qk_l2norm": True}
    if cu is not None:
        kwargs["cu_seqlens"] = torch.tensor(cu, device=DEVICE)
    one = _run(functools.partial(triton_gdr, overlap_walks=False), x, lambda t: t.clone(), True,
               **kwargs)
    two = _run(functools.partial(triton_gdr, overlap_walks=True), x, lambda t: t.clone(), True,
               **kwargs)
    refs = _run(chunk_gated_delta_rule, x, lambda t: t.double(), True, **kwargs)
    for name, ref in refs.items():
        rel = ((two[name].double() - ref).norm() / ref.norm()).item()
        assert rel <= 1e-2, f"{name}: relative error {rel:.2e} > 1e-2"
        assert torch.equal(two[name], one[name]), f"{name}: differs from the one-stream run"


def test_overlapped_walks_match_float64_and_the_one_stream_backward_at_a_small_case() -> None:
    """``overlap_walks`` in float32 at a small packed case: every output and gradient against
    float64 and the one-stream backward. Off CUDA (the interpreter) there is no second stream
    and the launches run in order; on a GPU this is the second stream at K = 16 (session 14:
    it found chunk_fwd_o faulting there in float32 at 8 warps, now pruned)."""
    from attnplug_triton.ops.gated_delta_rule.chunk import chunk_gated_delta_rule as triton_gdr

    case = next(c for c in CASES if c[0] == "cu_seqlens")
    x, kwargs = _case_inputs(case, 7)
    _check_against(functools.partial(triton_gdr, overlap_walks=True),
                   functools.partial(triton_gdr, overlap_walks=False), x,
                   f"overlap_walks {case[0]}", case[7], **kwargs)


@pytest.mark.parametrize("dk", [1, 16, 24, 32, 64, 128, 256])
def test_the_split_forwards_output_kernel_never_runs_8_warps_at_key_block_16(dk: int) -> None:
    """``chunk_o.prune``: at the key block 16 no 8-warp configuration (they faulted on the H200
    in float32); at every other block all of them."""
    from attnplug_triton.ops.gated_delta_rule import chunk_o
    from attnplug_triton.ops.gated_delta_rule.common import block

    kept = chunk_o.prune(chunk_o.CONFIGS, {}, DK=dk)
    assert chunk_o.prune(chunk_o.CONFIGS, {"DK": dk}) == kept  # DK positional or keyword
    if block(dk) == 16:
        assert kept and {c.num_warps for c in kept} == {4}
    else:
        assert kept == chunk_o.CONFIGS


@pytest.mark.parametrize("dk", [1, 16, 24, 32, 48, 64, 128, 256])
def test_the_autotuner_never_sees_a_configuration_miscompiled_at_that_key_dim(dk: int) -> None:
    """``chunk_bwd.prune`` (the autotuner's ``early_config_prune``) drops exactly the
    configurations the H200 probes found wrong at the key block of ``dk``, and keeps some."""
    from attnplug_triton.ops.gated_delta_rule import chunk_bwd
    from attnplug_triton.ops.gated_delta_rule.common import block

    kept = chunk_bwd.prune(chunk_bwd.CONFIGS, {}, DK=dk)
    assert kept, "at least one configuration must stay"
    assert chunk_bwd.prune(chunk_bwd.CONFIGS, {"DK": dk}) == kept  # DK positional or keyword
    dropped = [c for c in chunk_bwd.CONFIGS if c not in kept]
    if block(dk) == 16:
        assert {c.num_warps for c in kept} == {4} and len(dropped) == 4
    elif block(dk) == 32:
        assert [(c.kwargs["BV"], c.num_warps) for c in dropped] == [(32, 4), (32, 4)]
    else:
        assert dropped == []
    # the split dk's two passes (PASS 3, 4) also drop BV = 32 at K = 32, every warp count; the
    # other passes keep what they kept
    for which in range(5):
        split = chunk_bwd.prune(chunk_bwd.CONFIGS, {}, DK=dk, PASS=which)
        assert split, f"pass {which} at DK={dk}: at least one configuration must stay"
        if which in (3, 4) and block(dk) == 32:
            assert [c for c in kept if c not in split] == [
                c for c in kept if c.kwargs["BV"] == 32]
        else:
            assert split == kept
    # dm_from_y's passes keep only BV = 64 with 8 warps at K = 32
    for name in ("chunk_bwd_dq_dp", "chunk_bwd_wy_stats", "chunk_bwd_wy_sum", "chunk_bwd_wy"):
        wy = chunk_bwd.safe_configs(name, dk)
        if block(dk) == 32:
            assert {(c.kwargs["BV"], c.num_warps) for c in wy} == {(64, 8)}, name
        else:
            assert wy == kept, name
    for name in ("chunk_bwd_dq", "chunk_bwd_dv", "chunk_bwd_dk"):
        assert chunk_bwd.safe_configs(name, dk) == kept, name


@pytest.mark.parametrize("keep", [False, True])
def test_kept_states_spare_the_backward_its_state_pass(monkeypatch, keep: bool) -> None:
    """With ``keep_states`` the state kernel runs once (forward), without it twice; with no
    gradient wanted nothing is kept (the output written by the state kernel, not split)."""
    from attnplug_triton.ops.gated_delta_rule import chunk

    calls = []
    real = chunk.chunk_fwd_h
    monkeypatch.setattr(chunk, "chunk_fwd_h",
                        lambda *a, **kw: calls.append(kw["store_states"]) or real(*a, **kw))
    torch.manual_seed(0)
    x = _inputs(1, 70, 1, 2, 16, 16, 1, True, torch.float32)
    _run(functools.partial(chunk.chunk_gated_delta_rule, keep_states=keep, split_output=False), x,
         lambda t: t.clone(), True, use_qk_l2norm=True)
    assert calls == ([True] if keep else [False, True])
    calls.clear()
    with torch.no_grad():
        chunk.chunk_gated_delta_rule(*(x[n] for n in NAMES[:5]), keep_states=keep,
                                     split_output=False)
    assert calls == [False]


@pytest.mark.parametrize("from_y", [False, True], ids=["dA", "dm from y"])
@pytest.mark.parametrize("dv_dh", [False, True])
def test_dv_from_the_dh_kernel_spares_the_dv_pass(monkeypatch, dv_dh: bool,
                                                  from_y: bool) -> None:
    from attnplug_triton.ops.gated_delta_rule import chunk, chunk_bwd, chunk_dv, chunk_h

    launched = []
    for module in (chunk_bwd, chunk_h, chunk_dv):
        real = module.launch
        monkeypatch.setattr(module, "launch",
                            lambda name, *a, real=real, **kw: launched.append(name)
                            or real(name, *a, **kw))
    torch.manual_seed(0)
    x = _inputs(1, 70, 1, 2, 16, 16, 1, True, torch.float32)
    _run(functools.partial(chunk.chunk_gated_delta_rule, dv_from_dh=dv_dh, local_dv=dv_dh,
                           split_dk=False, dm_from_y=from_y), x,
         lambda t: t.clone(), True, use_qk_l2norm=True)
    backward = [n for n in launched if n.startswith("chunk_bwd")]
    dq, dk = ("chunk_bwd_dq_dp", "chunk_bwd_wy") if from_y else ("chunk_bwd_dq", "chunk_bwd_dk")
    if dv_dh:  # with local_dv too: its kernel first, then the dh kernel that reads it
        assert backward == ["chunk_bwd_dv_local", "chunk_bwd_dh_y_l", dq, dk]
    else:
        assert backward == ["chunk_bwd_dh", dq, "chunk_bwd_dv", dk]


@pytest.mark.parametrize(("K", "V", "served"), [(16, 16, ["chunk_bwd_dq_dp", "chunk_bwd_wy"]),
                                               (128, 40, ["chunk_bwd_dq_dp", "chunk_bwd_wy"]),
                                               (129, 16, ["chunk_bwd_dq", "chunk_bwd_dk_stats",
                                                          "chunk_bwd_dk_sum"]),
                                               (16, 256, ["chunk_bwd_dq", "chunk_bwd_dk_stats",
                                                          "chunk_bwd_dk_sum"])])
def test_the_backward_takes_the_wy_passes_up_to_their_largest_head_dim(
        monkeypatch, K: int, V: int, served: list[str]) -> None:
    """By default dk, dg and dβ come from the WY passes (one) while K and V are at most
    ``chunk.WY_MAX_DIM`` (they faulted on the H200 at 256), else from the dA passes (two)."""
    from attnplug_triton.ops.gated_delta_rule import chunk, chunk_bwd

    launched = []
    real = chunk_bwd.launch
    monkeypatch.setattr(chunk_bwd, "launch", lambda name, *a, **kw: launched.append(name)
                        or real(name, *a, **kw))
    torch.manual_seed(0)
    x = _inputs(1, 20, 1, 1, K, V, 1, True, torch.float32)
    _run(chunk.chunk_gated_delta_rule, x, lambda t: t.clone(), False, use_qk_l2norm=True)
    assert launched == served


@pytest.mark.parametrize("B,HV,bucket", [(1, 2, 0), (2, 2, 1), (3, 1, 0), (1, 4, 1)])
def test_the_state_kernels_are_tuned_per_parallelism_bucket(B: int, HV: int, bucket: int,
                                                            monkeypatch) -> None:
    """Both state walks (forward, and the backward's dh) are launched with the PARALLELISM
    bucket of their sequence·value-head pairs, which the autotuner keys on (the threshold
    lowered to 4 pairs here, to keep the interpreter quick)."""
    from attnplug_triton.ops.gated_delta_rule import chunk_h
    from attnplug_triton.ops.gated_delta_rule.chunk import chunk_gated_delta_rule as triton_gdr

    assert "PARALLELISM" in chunk_h._KEY
    seen: dict[str, int] = {}
    real_launch = chunk_h.launch

    def spy(name, kernel, *args, **meta):
        seen[kernel.__name__] = meta["PARALLELISM"]
        return real_launch(name, kernel, *args, **meta)

    monkeypatch.setattr(chunk_h, "launch", spy)
    monkeypatch.setattr(chunk_h, "FEW_PROGRAMS", 4)
    x = _inputs(B, 3, 1, HV, 16, 16, B, False, torch.float32)
    outs = _run(triton_gdr, x, lambda t: t.clone(), True)
    assert outs  # forward and backward ran
    assert seen == {"chunk_fwd_h_kernel": bucket, "chunk_bwd_dh_kernel": bucket}
