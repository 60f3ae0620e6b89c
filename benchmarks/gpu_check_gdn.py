"""Correctness of the triton backend's gated delta rule at real shapes on the GPU, against float64.

    python3 benchmarks/gpu_check_gdn.py            # all parts; JSON in $OUT when set
    python3 benchmarks/gpu_check_gdn.py --quick    # the project shape and the decoding kernel
    python3 benchmarks/gpu_check_gdn.py --parts configs
    python3 benchmarks/gpu_check_gdn.py --parts probe  # chunk_bwd configs, a process each

Each row prints the relative error ‖out − ref‖ / ‖ref‖ (and the largest absolute error) of the
output, the final state and every gradient (q, k, v, g, β, initial state), the reference being
attnplug's chunked op run in float64 on the GPU (exact in float64; the per-token reference is
too slow at these sizes). Parts:

1. ``shapes``: the project shape (B=8, T=4096, H=16, K=V=128, bf16, q/k L2 norm, initial and
   final state: the issue's "relative error ≤ 1e-2"), grouped value heads (Qwen3-Next's 16/32),
   packed sequences with odd lengths, K=V=256, K≠V with V not a power of two, float16, float32;
2. ``configs``: every autotuning configuration of every kernel, forced one at a time, in bf16 at
   K=V=128 and K=V=64 — the check for Triton 3.4–3.7.0's Hopper miscompilation of 64-wide
   blocks (shared/gpu/README.md), at every block size the autotuner may pick;
3. ``decode``: the token-by-token kernel against the step op, and the slot without autograd;
4. ``probe`` (not in the default parts): each configuration of a kernel family
   (``--probe-families``: chunk_bwd's three passes, chunk_h's three kernels, kkt_solve,
   chunk_o and chunk_dv (these two with ``--probe-variants``), or ``autotune``: nothing
   forced) at each ``--probe-dims``, in a process of its own, with ``CUDA_LAUNCH_BLOCKING=1``,
   eight processes at a time; with the served switches of ``chunk_gated_delta_rule``, or with
   ``--probe-variants NAME…`` only the named ones on (all of them when none is named). On
   the H200 with Triton 3.6 the backward faulted (illegal memory access, 2026-11-28;
   benchmarks/results) and a fault ends the CUDA context, so parts 1–2 stop at the first
   one; this part names every configuration that faults and checks the others.

A row fails when an error exceeds its dtype's tolerance (bf16 and fp16 1e-2, fp32 1e-4) or is
not finite. Exit status 1 when any row fails.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import finish_checks  # noqa: E402

TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 1e-2}
NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
INPUTS = ("q", "k", "v", "g", "beta", "h0")

# (label, B, T, H, HV, K, V, dtype, cu_seqlens or None, use_qk_l2norm)
SHAPES = [
    ("project shape", 8, 4096, 16, 16, 128, 128, torch.bfloat16, None, True),
    ("qwen3-next heads 16/32", 2, 4096, 16, 32, 128, 128, torch.bfloat16, None, True),
    ("packed odd lengths", 1, 3000, 4, 8, 128, 128, torch.bfloat16, [0, 1, 700, 2047, 3000],
     True),
    ("unit keys, no L2 norm", 2, 2048, 8, 8, 128, 128, torch.bfloat16, None, False),
    ("K=V=256", 2, 1000, 2, 4, 256, 256, torch.bfloat16, None, True),
    ("K=64 V=96", 2, 777, 4, 4, 64, 96, torch.float16, None, True),
    ("fp32", 2, 1000, 4, 8, 128, 128, torch.float32, None, True),
]
QUICK = {"project shape"}
_STARTED = time.time()


def make_inputs(B: int, T: int, H: int, HV: int, K: int, V: int, N: int,
                dtype: torch.dtype, l2norm: bool = True) -> dict[str, Tensor]:
    """Random inputs in the layer's form (q, k, v in ``dtype``, g, β float32) and output grads;
    unit-norm keys when the kernels do not normalise them."""
    dev = "cuda"
    k = torch.randn(B, T, H, K, device=dev, dtype=dtype)
    return {
        "q": torch.randn(B, T, H, K, device=dev, dtype=dtype),
        "k": k if l2norm else F.normalize(k.float(), dim=-1).to(dtype),
        "v": torch.randn(B, T, HV, V, device=dev, dtype=dtype),
        "g": F.logsigmoid(torch.rand(B, T, HV, device=dev)) / 4,
        "beta": torch.rand(B, T, HV, device=dev).sigmoid(),
        "h0": torch.randn(N, HV, K, V, device=dev),
        "do": torch.randn(B, T, HV, V, device=dev, dtype=dtype),
        "dht": torch.randn(N, HV, K, V, device=dev),
    }


def run(fn, x: dict[str, Tensor], cast, cu: Tensor | None,
        l2norm: bool = True) -> dict[str, Tensor]:
    """o, the final state and the gradients of ``Σ o·do + Σ final·dht`` (detached)."""
    leaves = {n: cast(x[n]).detach().requires_grad_() for n in INPUTS}
    o, final = fn(*(leaves[n] for n in INPUTS[:5]), initial_state=leaves["h0"],
                  output_final_state=True, cu_seqlens=cu, use_qk_l2norm=l2norm)
    ((o * cast(x["do"])).sum() + (final * cast(x["dht"])).sum()).backward()
    out = {"o": o.detach(), "final": final.detach()}
    out.update({f"d{n}": leaves[n].grad for n in INPUTS})
    return out


def reference(x: dict[str, Tensor], cu: Tensor | None, l2norm: bool = True) -> dict[str, Tensor]:
    from attnplug.ops import chunk_gated_delta_rule

    return run(chunk_gated_delta_rule, x, lambda t: t.double(), cu, l2norm)


def errors(outs: dict[str, Tensor], refs: dict[str, Tensor]) -> dict[str, dict[str, float]]:
    """Relative L2 error and largest absolute error of each output against its reference."""
    result = {}
    for name, ref in refs.items():
        diff = outs[name].double() - ref
        result[name] = {"rel": (diff.norm() / ref.norm().clamp_min(1e-30)).item(),
                        "max_abs": diff.abs().max().item()}
    return result


def row(part: str, label: str, dtype: torch.dtype, errs: dict) -> dict:
    tol = TOLERANCE[dtype]
    ok = all(e["rel"] == e["rel"] and e["rel"] <= tol for e in errs.values())  # NaN fails
    r = {"part": part, "case": label, "dtype": NAMES[dtype], "ok": bool(ok), "errors": errs}
    cells = "  ".join(f"{n} {e['rel']:.1e}" for n, e in errs.items())
    print(f"{time.time() - _STARTED:5.0f}s {'ok  ' if ok else 'FAIL'} {part:7} {NAMES[dtype]} "
          f"{label:48} {cells}", flush=True)
    return r


def failed_row(part: str, label: str, dtype: torch.dtype, exc: Exception) -> dict:
    print(f"{time.time() - _STARTED:5.0f}s FAIL {part:7} {NAMES[dtype]} {label:48} "
          f"{type(exc).__name__}: {str(exc)[:300]}", flush=True)
    return {"part": part, "case": label, "dtype": NAMES[dtype], "ok": False,
            "error": f"{type(exc).__name__}: {exc}"[:2000]}


def check_shapes(quick: bool, only: list[str] | None = None) -> list[dict]:
    """Part 1: the autotuned kernels at real shapes (those whose label contains one of
    ``only``, when given)."""
    from attnplug_triton.ops.gated_delta_rule.chunk import chunk_gated_delta_rule

    rows = []
    for label, B, T, H, HV, K, V, dtype, cu_list, l2norm in SHAPES:
        if (quick and label not in QUICK) or (only and not any(o in label for o in only)):
            continue
        cu = None if cu_list is None else torch.tensor(cu_list, device="cuda")
        N = B if cu_list is None else len(cu_list) - 1
        x = make_inputs(B, T, H, HV, K, V, N, dtype, l2norm)
        name = f"{label} B{B} T{T} H{H}/{HV} K{K} V{V}"
        try:
            refs = reference(x, cu, l2norm)
        except Exception as exc:  # an OOM is a failed row
            rows.append(failed_row("shapes", name, dtype, exc))
            continue
        # the defaults; on the project shape also the variants (split, kept states, dv from
        # dh, local dv) and the served switches with the lean state walk
        variants = [("", {})] + ([(" all variants", dict(split_output=True, keep_states=True,
                                                         dv_from_dh=True, local_dv=True)),
                                  (" lean walk", dict(lean_walk=True)),
                                  (" lean walk, tf32x3 inverse",
                                   dict(lean_walk=True, inverse_precision="tf32x3")),
                                  (" dm from y", dict(dm_from_y=True)),
                                  (" dm from y, one pass",
                                   dict(dm_from_y=True, split_dk=False))]
                                 if label in QUICK else [])
        for suffix, switches in variants:
            try:
                fn = functools.partial(chunk_gated_delta_rule, **switches)
                outs = run(fn, x, lambda t: t.clone(), cu, l2norm)
                rows.append(row("shapes", name + suffix, dtype, errors(outs, refs)))
            except Exception as exc:  # a compile failure or an OOM is a failed row
                rows.append(failed_row("shapes", name + suffix, dtype, exc))
        del x
        torch.cuda.empty_cache()
    return rows


def check_configs() -> list[dict]:
    """Part 2: every configuration of every kernel, forced while the others autotune."""
    from attnplug_triton.ops.gated_delta_rule import chunk_bwd, chunk_h, chunk_o, kkt_solve
    from attnplug_triton.ops.gated_delta_rule.chunk import chunk_gated_delta_rule
    from attnplug_triton.ops.gated_delta_rule.common import force_config

    kernels = {"kkt_solve": kkt_solve.CONFIGS, "chunk_fwd_h_o": chunk_h.CONFIGS,
               "chunk_fwd_h_h": chunk_h.CONFIGS, "chunk_bwd_dh": chunk_h.CONFIGS,
               "chunk_bwd_dq": chunk_bwd.CONFIGS, "chunk_bwd_dv": chunk_bwd.CONFIGS,
               "chunk_bwd_dk": chunk_bwd.CONFIGS, "chunk_bwd_dk_stats": chunk_bwd.CONFIGS,
               "chunk_bwd_dk_sum": chunk_bwd.CONFIGS, "chunk_bwd_dq_dp": chunk_bwd.CONFIGS,
               "chunk_bwd_wy_stats": chunk_bwd.CONFIGS, "chunk_bwd_wy_sum": chunk_bwd.CONFIGS,
               "chunk_bwd_wy": chunk_bwd.CONFIGS, "chunk_fwd_o": chunk_o.CONFIGS}
    rows = []
    dtype = torch.bfloat16
    for dim in (128, 64):
        B, T, H, HV = 2, 1000, 4, 8
        x = make_inputs(B, T, H, HV, dim, dim, B, dtype)
        refs = reference(x, None)
        for kernel, configs in kernels.items():
            for config in configs:
                label = (f"D{dim} {kernel} {config.kwargs} warps={config.num_warps} "
                         f"stages={config.num_stages}")
                # chunk_fwd_o runs in the split forward only, the dk stats/sum passes with
                # split_dk only, the dq pass with the dPᵀ terms and the WY passes with
                # dm_from_y only (the one-pass WY without split_dk)
                wy = kernel in ("chunk_bwd_dq_dp", "chunk_bwd_wy_stats", "chunk_bwd_wy_sum",
                                "chunk_bwd_wy")
                fn = functools.partial(chunk_gated_delta_rule,
                                       split_output=kernel == "chunk_fwd_o",
                                       split_dk=(kernel.startswith("chunk_bwd_dk_")
                                                 or (wy and kernel != "chunk_bwd_wy")),
                                       dm_from_y=wy)
                with force_config(kernel, config):
                    try:
                        outs = run(fn, x, lambda t: t.clone(), None)
                        rows.append(row("configs", label, dtype, errors(outs, refs)))
                    except Exception as exc:  # out of resources, compile failure
                        rows.append(failed_row("configs", label, dtype, exc))
    return rows


# Each probe process forces one kernel family's launches to one configuration (the other kernels
# at their first); "autotune" forces nothing, as a user's run.
PROBE_FAMILIES = {
    "chunk_bwd": ("chunk_bwd_dq", "chunk_bwd_dv", "chunk_bwd_dk", "chunk_bwd_dk_stats",
                  "chunk_bwd_dk_sum",  # these two with --probe-variants split_dk
                  "chunk_bwd_dq_dp", "chunk_bwd_wy_stats", "chunk_bwd_wy_sum",
                  "chunk_bwd_wy",  # these with dm_from_y (the last without split_dk)
                  "chunk_bwd_dq_dp_vn", "chunk_bwd_wy_stats_vn", "chunk_bwd_wy_sum_vn",
                  "chunk_bwd_wy_vn"),  # and with store_v_new
    "chunk_h": ("chunk_fwd_h_o", "chunk_fwd_h_h", "chunk_fwd_h_o_h", "chunk_fwd_h_h_vn",
                "chunk_bwd_dh", "chunk_bwd_dh_y", "chunk_bwd_dh_y_l"),
    "kkt_solve": ("kkt_solve",),
    "chunk_o": ("chunk_fwd_o",),  # runs with --probe-variants only (the split forward)
    "chunk_dv": ("chunk_bwd_dv_local",),  # likewise (local_dv)
    "autotune": (),
}


def probe_configs(family: str) -> list:
    """The configurations a probe of ``family`` forces (``[None]``: autotuning)."""
    from attnplug_triton.ops.gated_delta_rule import (
        chunk_bwd,
        chunk_dv,
        chunk_h,
        chunk_o,
        kkt_solve,
    )

    return {"chunk_bwd": chunk_bwd.CONFIGS, "chunk_h": chunk_h.CONFIGS,
            "kkt_solve": kkt_solve.CONFIGS, "chunk_o": chunk_o.CONFIGS,
            "chunk_dv": chunk_dv.CONFIGS, "autotune": [None]}[family]


VARIANTS = ("split_output", "keep_states", "dv_from_dh", "local_dv", "split_dk", "lean_walk",
            "dm_from_y", "store_v_new", "overlap_walks")


def probe_one(family: str, index: int, dim: int, variants: tuple[str, ...] = (),
              dtype: torch.dtype = torch.bfloat16) -> int:
    """One probe (in its own process): ``family``'s kernels forced to its ``index``-th
    configuration, every other kernel at its first (chunk_bwd: its first not pruned at this
    dim, chunk_o its first not pruned; none forced for ``autotune``), fwd+bwd in ``dtype``
    at B=2 T=1000 H=4/8 K=V=``dim`` (H=2/4 when ``dim`` ≤ 32, as the te GPU test's hybrid)
    against float64; ``variants`` names the switches of chunk_gated_delta_rule turned on (of
    VARIANTS: the split forward, kept states, dv from the dh kernel, the local dv kernel and
    the two-pass dk), the others off; none named: the served defaults.
    Prints one JSON line; a fault ends the process (the parent reports it)."""
    from contextlib import ExitStack

    from attnplug_triton.ops.gated_delta_rule import (
        chunk_bwd,
        chunk_dv,
        chunk_h,
        chunk_o,
        kkt_solve,
    )
    from attnplug_triton.ops.gated_delta_rule.chunk import chunk_gated_delta_rule
    from attnplug_triton.ops.gated_delta_rule.common import force_config

    H, HV = (2, 4) if dim <= 32 else (4, 8)
    x = make_inputs(2, 1000, H, HV, dim, dim, 2, dtype)
    refs = reference(x, None)
    forced = {}
    if family != "autotune":
        first = {"chunk_h": chunk_h.CONFIGS[0],
                 "kkt_solve": kkt_solve.CONFIGS[0],
                 "chunk_o": chunk_o.prune(chunk_o.CONFIGS, {}, DK=dim)[0],
                 "chunk_dv": chunk_dv.CONFIGS[0]}
        for fam, names in PROBE_FAMILIES.items():
            for name in names:
                if fam == family:
                    forced[name] = probe_configs(fam)[index]
                elif fam == "chunk_bwd":
                    # each pass at the first configuration its autotuner may pick at this
                    # dim (the passes prune differently: chunk_bwd.PASS_ARGS)
                    forced[name] = chunk_bwd.safe_configs(name, dim)[0]
                else:
                    forced[name] = first[fam]
    with ExitStack() as stack:
        for name, forced_config in forced.items():
            stack.enter_context(force_config(name, forced_config))
        switches = {name: name in variants for name in VARIANTS} if variants else {}
        fn = functools.partial(chunk_gated_delta_rule, **switches)
        outs = run(fn, x, lambda t: t.clone(), None)
    torch.cuda.synchronize()
    errs = errors(outs, refs)  # the parent judges them (row())
    print(json.dumps({"errors": {n: e["rel"] for n, e in errs.items()}}), flush=True)
    return 0


def pruned_for(family: str, index: int, dim: int, variants: tuple[str, ...]) -> str | None:
    """Why a probe's forced configuration is one the autotuner never picks at ``dim`` (its
    ``prune``: known miscompilations), or None: chunk_bwd and chunk_o prune."""
    from attnplug_triton.ops.gated_delta_rule import chunk, chunk_bwd, chunk_o

    if family == "chunk_o":
        config = chunk_o.CONFIGS[index]
        safe = chunk_o.prune(chunk_o.CONFIGS, {}, DK=dim)
        return None if config in safe else f"pruned at K={dim} for chunk_fwd_o"
    if family != "chunk_bwd":
        return None

    config = chunk_bwd.CONFIGS[index]
    if variants:
        on = lambda name: name in variants  # noqa: E731
        from_y, split = chunk.dk_passes(dim, dim, on("dm_from_y"), on("split_dk"))
    else:  # as served
        on = lambda name: getattr(chunk, name.upper())  # noqa: E731
        from_y, split = chunk.dk_passes(dim, dim, None, None)
    # the passes that run with these switches
    names = chunk_bwd.launch_names(from_y, split, not on("dv_from_dh"),
                                   on("store_v_new") and not on("keep_states"))
    pruned = [name for name in names if config not in chunk_bwd.safe_configs(name, dim)]
    return f"pruned at K={dim} for {', '.join(pruned)}" if pruned else None


def inverse_switches() -> list[str]:
    """kkt_solve's INVERSE_PRECISION and DIAGONAL_INVERSE in this process, as the arguments
    that hand them to the probe's processes."""
    from attnplug_triton.ops.gated_delta_rule import kkt_solve

    switches = ["--inverse-precision", kkt_solve.INVERSE_PRECISION]
    if kkt_solve.DIAGONAL_INVERSE is not None:  # None: chosen by the key dim, as served
        switches += ["--diagonal-inverse", kkt_solve.DIAGONAL_INVERSE]
    return switches


def check_probe(dims: tuple[int, ...], families: tuple[str, ...], jobs: int = 8,
                variants: tuple[str, ...] = (),
                dtype: torch.dtype = torch.bfloat16) -> list[dict]:
    """Part 4: every configuration of each kernel family, each in a process of its own
    (CUDA_LAUNCH_BLOCKING=1; ``jobs`` at a time on the one GPU), so that one that faults (an
    illegal memory access ends the CUDA context) is named and the others still run."""
    import subprocess
    from concurrent.futures import ThreadPoolExecutor

    env = dict(os.environ, CUDA_LAUNCH_BLOCKING="1")
    cases = []
    for dim in dims:
        for family in families:
            for index, config in enumerate(probe_configs(family)):
                what = "autotuned" if config is None else (
                    f"{config.kwargs} warps={config.num_warps} stages={config.num_stages}")
                on = f" ({'+'.join(variants)})" if variants else ""
                pruned = None if config is None else pruned_for(family, index, dim, variants)
                label = f"D{dim} {family}{on} {what}" + (f" [{pruned}]" if pruned else "")
                cases.append((family, index, dim, label, pruned))

    def one(case: tuple) -> dict:
        r = check(*case[:4])
        if case[4]:  # a failure here is a known one (finish_checks)
            r["pruned"] = case[4]
        return r

    def check(family: str, index: int, dim: int, label: str) -> dict:
        try:
            command = [sys.executable, __file__, "--probe-one", family, str(index), str(dim),
                       *inverse_switches(), "--probe-dtype", NAMES[dtype]]
            done = subprocess.run(command + ["--probe-variants", *variants] if variants
                                  else command, env=env,
                                  capture_output=True, text=True, timeout=240)
            last = (done.stdout.strip().splitlines() or [""])[-1]
            result = json.loads(last) if last.startswith("{") else None
        except subprocess.TimeoutExpired:
            done, result = None, None
        if result is not None:
            errs = {n: {"rel": e, "max_abs": float("nan")} for n, e in result["errors"].items()}
            return row("probe", label, dtype, errs)
        tail = "timeout" if done is None else " | ".join(
            (done.stdout + done.stderr).strip().splitlines()[-3:])
        return failed_row("probe", label, dtype, RuntimeError(tail))

    with ThreadPoolExecutor(jobs) as pool:
        return list(pool.map(one, cases))


def check_decode() -> list[dict]:
    """Part 3: the token-by-token kernel (decoding, short prompts without autograd)."""
    from attnplug_triton.ops.gated_delta_rule import gated_delta_rule
    from attnplug_triton.ops.gated_delta_rule.fused_recurrent import (
        fused_recurrent_gated_delta_rule,
    )

    from attnplug.ops import gated_delta_rule_step, naive_recurrent_gated_delta_rule

    rows = []
    dtype = torch.bfloat16
    x = make_inputs(64, 1, 16, 32, 128, 128, 64, dtype)
    args = [x[n] for n in INPUTS[:5]]
    o, state = fused_recurrent_gated_delta_rule(*args, initial_state=x["h0"],
                                                output_final_state=True, use_qk_l2norm=True)
    o_ref, state_ref = gated_delta_rule_step(*(a.double() for a in args), x["h0"].double(),
                                             use_qk_l2norm=True)
    rows.append(row("decode", "step B64 H16/32 K128 V128", dtype,
                    errors({"o": o, "final": state}, {"o": o_ref, "final": state_ref})))
    cu = torch.tensor([0, 1, 17, 60, 64], device="cuda")
    x = make_inputs(1, 64, 16, 32, 128, 128, 4, dtype)
    args = [x[n] for n in INPUTS[:5]]
    kwargs = {"output_final_state": True, "cu_seqlens": cu, "use_qk_l2norm": True}
    with torch.no_grad():
        o, final = gated_delta_rule(*args, initial_state=x["h0"], **kwargs)
    o_ref, final_ref = naive_recurrent_gated_delta_rule(
        *(a.double() for a in args), initial_state=x["h0"].double(), **kwargs)
    rows.append(row("decode", "slot, no grad, packed 1/16/43/4", dtype,
                    errors({"o": o, "final": final}, {"o": o_ref, "final": final_ref})))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="the project shape and the decoding kernel only")
    parser.add_argument("--parts", nargs="+", choices=["shapes", "configs", "decode", "probe"],
                        default=["shapes", "configs", "decode"],
                        help="which checks to run (probe: each chunk_bwd configuration in a "
                        "process of its own)")
    parser.add_argument("--shapes", nargs="+", metavar="TEXT",
                        help="shapes: only the cases whose label contains one of these")
    parser.add_argument("--probe-dims", nargs="+", type=int, default=[128],
                        help="probe: head dims K=V to probe at (default 128)")
    parser.add_argument("--probe-families", nargs="+", choices=list(PROBE_FAMILIES),
                        default=["chunk_bwd"], help="probe: kernel families to probe")
    parser.add_argument("--probe-variants", nargs="*", choices=VARIANTS, default=None,
                        help="probe: with these kernel variants on, the others off (none "
                        "named: all of them; without the flag: the served defaults)")
    parser.add_argument("--probe-dtype", choices=sorted(NAMES.values()), default="bf16",
                        help="probe: the inputs' dtype (default bf16)")
    parser.add_argument("--diagonal-inverse", choices=["series", "substitution"], default=None,
                        help="kkt_solve.DIAGONAL_INVERSE for the whole run (default: served)")
    parser.add_argument("--inverse-precision", choices=["ieee", "tf32x3"], default=None,
                        help="kkt_solve.INVERSE_PRECISION for the whole run (default: served)")
    parser.add_argument("--probe-one", nargs=3, metavar=("FAMILY", "INDEX", "DIM"),
                        help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=Path(os.environ["OUT"])
                        if os.environ.get("OUT") else None,
                        help="folder for gpu_check_gdn.json (default: $OUT when set)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_check_gdn: no CUDA device", file=sys.stderr)
        return 1
    torch.manual_seed(0)
    from attnplug_triton.ops.gated_delta_rule import kkt_solve

    if args.inverse_precision is not None:
        kkt_solve.INVERSE_PRECISION = args.inverse_precision
    if args.diagonal_inverse is not None:
        kkt_solve.DIAGONAL_INVERSE = args.diagonal_inverse
    variants = (() if args.probe_variants is None
                else tuple(args.probe_variants) or VARIANTS)
    probe_dtype = {name: dtype for dtype, name in NAMES.items()}[args.probe_dtype]
    if args.probe_one is not None:
        family, index, dim = args.probe_one
        return probe_one(family, int(index), int(dim), variants, probe_dtype)
    import triton

    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, triton "
          f"{triton.__version__}; relative L2 error per output", flush=True)
    rows = []
    if "shapes" in args.parts:
        rows += check_shapes(args.quick, args.shapes)
    if "configs" in args.parts and not args.quick:
        rows += check_configs()
    if "decode" in args.parts:
        rows += check_decode()
    if "probe" in args.parts:
        rows += check_probe(tuple(args.probe_dims), tuple(args.probe_families),
                            variants=variants, dtype=probe_dtype)
    from attnplug_triton.ops.gated_delta_rule.common import chosen_configs

    for line in chosen_configs():
        print(f"autotuned {line}")
    return finish_checks("gpu_check_gdn", rows, _STARTED, args.out, autotuned=chosen_configs())


if __name__ == "__main__":
    sys.exit(main())
