"""Gated DeltaNet's token mixer: attnplug's Triton kernels against the anchors and the memory floor.

    python3 benchmarks/bench_gated_delta_rule.py --out runs/bench-gdn
    python3 benchmarks/bench_gated_delta_rule.py --parts fwd fwd+bwd   # the project shape only

Three tables (kernels-notes §5.2 shape by default: B=8, T=4096, H=16, K=V=128, bf16; q and k
L2-normalised inside the kernels, g and β float32 as the GDN layer passes them):

- ``gdn_fwd``: forward, anchor flash-linear-attention 0.6's ``chunk_gated_delta_rule`` (install
  its wheel as shared/gpu/README.md says; without it the row says why);
- ``gdn_fwd_bwd``: forward+backward, anchor torch SDPA causal attention at the same shape
  (``sdpa``: the backend torch picks; ``sdpa-flash``: its flash backend), fla's too (it refuses
  its backward on Hopper with Triton 3.4–3.7.0; the table then records its error);
- ``gdn_scaling``: T from 1K to 64K with the tokens per step fixed (``--tokens``, B = tokens / T),
  forward and forward+backward, anchor SDPA, fla's forward alongside (by default the served
  triton kernels — which split the output below 128 sequence·value-head pairs — and
  ``triton-seq``, the output always on the sequential path; ``--scaling-impls`` picks other
  rows);
- ``stages`` (not by default): each kernel launch of one triton forward+backward with its GPU
  time (torch.profiler), to show which stage dominates.

attnplug's rows: ``triton`` (the defaults), ``triton-split`` / ``triton-seq`` (the forward's
output from stored chunk states in a parallel kernel / always in the sequential one),
``triton-keep`` (the backward reuses the forward's states), ``triton-dvpass`` (dv in a
backward pass of its own instead of from the dh kernel, the default since session 5),
``triton-localdv`` (the dh kernel's within-chunk term from a parallel kernel),
``triton-splitdk`` (the backward's dk pass as two passes with fewer live tiles),
``triton-localdv-splitdk`` (both), ``triton-lean`` (``LEAN_WALK``: the state walk's products
ordered to need less shared memory — two programs a SM at K = V = 128), ``triton-tf32inv``
(kkt_solve's inverse in three TF32 products, ``kkt_solve.INVERSE_PRECISION``) and
``triton-lean-tf32inv`` (both), ``triton-nolean`` (the walk's earlier ordering)
and ``triton-all`` (split, keep, dv from dh and local dv) — the choices of ``SPLIT_OUTPUT``,
``KEEP_STATES``, ``DV_FROM_DH`` and ``LOCAL_DV`` in ``attnplug_triton.ops.gated_delta_rule.chunk``,
measured side by side (keep and dvpass only with the backward).

Each table lists, per case, the memory floor: the bytes that must move (q, k, v, g, β read and o
written; the backward also reads dO and writes dq, dk, dv, dg, dβ) over the copy bandwidth
measured in the same run, and the bytes the kernels are designed to move (:func:`design_bytes`).
Before timing, the forward output is compared with fla's and the largest difference printed.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import Bench, add_common_args  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
GDN = Callable[..., tuple[Tensor, Tensor | None]]


# -- implementations --------------------------------------------------------------------------
def triton_gdn(split_output: bool | None = None, keep_states: bool | None = None,
               dv_from_dh: bool | None = None, local_dv: bool | None = None,
               split_dk: bool | None = None, lean_walk: bool | None = None,
               inverse_precision: str | None = None,
               dm_from_y: bool | None = None, store_v_new: bool | None = None,
               overlap_walks: bool | None = None,
               diagonal_inverse: str | None = None) -> GDN | str:
    """attnplug's chunked Triton kernels, each switch of ``chunk_gated_delta_rule`` forced when
    given and the served default when None (so ``triton_gdn()`` is what the backend runs):
    ``split_output`` (the forward's output from stored states in a parallel kernel),
    ``keep_states`` (the backward reuses the forward's states), ``dv_from_dh`` (the dh kernel
    writes dv), ``local_dv`` (the dh kernel's within-chunk term from a parallel kernel),
    ``split_dk`` (the dk pass as two), ``lean_walk`` (the state walk ordered to need less
    shared memory), ``inverse_precision`` (the WY inverse's float32 products), ``dm_from_y``
    (dk, dg, dβ from the stored Y, no dA), ``store_v_new`` (the backward's state walk stores
    V_new for the later passes), ``overlap_walks`` (the backward's state recomputation on a
    second CUDA stream alongside the dh walk), ``diagonal_inverse`` (how kkt_solve inverts the
    16 × 16 diagonal blocks); or why they cannot run here."""
    try:
        from attnplug_triton.ops.gated_delta_rule.chunk import chunk_gated_delta_rule
    except ImportError as exc:
        return f"attnplug_triton does not import ({exc})"

    def run(q, k, v, g, beta):
        return chunk_gated_delta_rule(q, k, v, g, beta, use_qk_l2norm=True,
                                      split_output=split_output, keep_states=keep_states,
                                      dv_from_dh=dv_from_dh, local_dv=local_dv,
                                      split_dk=split_dk, lean_walk=lean_walk,
                                      inverse_precision=inverse_precision,
                                      dm_from_y=dm_from_y, store_v_new=store_v_new,
                                      overlap_walks=overlap_walks,
                                      diagonal_inverse=diagonal_inverse)

    return run


def fla_gdn() -> GDN | str:
    """fla 0.6's ``chunk_gated_delta_rule`` (q/k L2 norm in its kernel), or why not."""
    try:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule
    except ImportError as exc:
        return (f"fla does not import ({type(exc).__name__}); install the fla-core 0.6.0 wheel "
                "(shared/gpu/README.md)")

    def run(q, k, v, g, beta):
        return chunk_gated_delta_rule(q, k, v, g, beta, use_qk_l2norm_in_kernel=True)

    return run


def sdpa(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Causal SDPA on ``[B, T, H, D]`` tensors, with the backend torch picks."""
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                          v.transpose(1, 2), is_causal=True).transpose(1, 2)


def sdpa_flash(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Causal SDPA forced to its flash backend."""
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        return sdpa(q, k, v)


# -- bytes ------------------------------------------------------------------------------------
def floor_bytes(B: int, T: int, H: int, K: int, V: int, elt: int, backward: bool) -> float:
    """Bytes any implementation must move: q, k, v, g, β in and o out (forward); the backward
    adds dO in and dq, dk, dv, dg, dβ out. g and β are float32."""
    qkv = B * T * H * (2 * K + V) * elt
    gates = 2 * B * T * H * 4
    out = B * T * H * V * elt
    fwd = qkv + gates + out
    return fwd + (out + qkv + gates if backward else 0)


def design_bytes(B: int, T: int, H: int, K: int, V: int, elt: int, backward: bool) -> float:
    """Bytes the attnplug kernels are designed to move (one value head per key head, q/k L2 norm
    in the kernels), each tile read once from HBM: re-reads of q, k and A by the value-block
    programs of one head, and the reloads inside a program, are assumed to hit L2. Per token
    and head, with a state of K·V values per 64 tokens and 8 bytes of inverse norms:

    forward: kkt_solve reads q, k, g, β, writes A (64 values) and the norms; chunk_fwd_h reads
    q, k, v, g, β, A, norms and writes o. Backward: chunk_fwd_h (states) reads k, v, g, β, A,
    norms and writes the states; chunk_bwd_dh reads q, k, g, β, A, norms, dO and writes dh;
    chunk_bwd's dq pass reads q, k, v, g, β, A, norms, dO, h and writes dq; its dk pass reads
    the same plus dh and writes dk, dv, dg, dβ.
    """
    k, v, a, gb, norms = K * elt, V * elt, 64 * elt, 8, 8
    state = K * V * elt / 64
    kkt = (2 * k + gb) + (a + norms)
    fwd_h = (2 * k + v + gb + a + norms) + v
    fwd = kkt + fwd_h
    if not backward:
        return B * T * H * fwd
    states = (k + v + gb + a + norms) + state
    dh = (2 * k + gb + a + norms + v) + state
    dq = (2 * k + v + gb + a + norms + v + state) + k
    dk = (2 * k + v + gb + a + norms + v + 2 * state) + (k + v + gb)
    return B * T * H * (fwd + states + dh + dq + dk)


def copy_bandwidth() -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write counted), 1 GiB copied."""
    from triton.testing import do_bench

    src = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), return_mode="median")
    return 2 * src.numel() / (ms * 1e-3)


# -- cases ------------------------------------------------------------------------------------
def gdn_inputs(B: int, T: int, H: int, D: int, dtype: torch.dtype,
               grad: bool) -> tuple[Tensor, ...]:
    """q, k, v ``[B, T, H, D]`` in ``dtype``; g (log decay), β ``[B, T, H]`` float32."""
    q, k, v = (torch.randn(B, T, H, D, device="cuda", dtype=dtype) for _ in range(3))
    g = F.logsigmoid(torch.rand(B, T, H, device="cuda")) / 4
    beta = torch.rand(B, T, H, device="cuda").sigmoid()
    return tuple(x.requires_grad_(grad) for x in (q, k, v, g, beta))


def max_difference(a: GDN, b: GDN, inputs: tuple[Tensor, ...]) -> str:
    """Largest |a − b| of the forward outputs, as text."""
    with torch.no_grad():
        return f"{(a(*inputs)[0].float() - b(*inputs)[0].float()).abs().max().item():.1e}"


def timed(fn: GDN | str, inputs: tuple[Tensor, ...], do: Tensor | None) -> Callable | str:
    """A zero-argument forward (``do`` None) or forward+backward of ``fn``, or why it can't."""
    if isinstance(fn, str):
        return fn
    if do is None:
        return lambda: fn(*inputs)
    return lambda: fn(*inputs)[0].backward(do)


def attention_timed(fn: Callable, inputs: tuple[Tensor, ...], do: Tensor | None) -> Callable:
    q, k, v = inputs
    if do is None:
        return lambda: fn(q, k, v)
    return lambda: fn(q, k, v).backward(do)


def run_case(bench: Bench, case: str, B: int, T: int, H: int, D: int, dtype: torch.dtype,
             backward: bool, impls: dict[str, GDN | str], bandwidth: float) -> None:
    """Measure one case: the GDN implementations and the attention anchors at the same shape."""
    inputs = gdn_inputs(B, T, H, D, dtype, backward)
    do = torch.randn(B, T, H, D, device="cuda", dtype=dtype) if backward else None
    timings: dict[str, Callable | str] = {}
    extra: dict[str, dict[str, str]] = {}
    attn: tuple[Tensor, ...] = ()
    if bench.anchor.startswith("sdpa"):
        attn = tuple(torch.randn(B, T, H, D, device="cuda", dtype=dtype).requires_grad_(backward)
                     for _ in range(3))
        timings["sdpa"] = attention_timed(sdpa, attn, do)
        timings["sdpa-flash"] = attention_timed(sdpa_flash, attn, do)
    for name, fn in impls.items():
        if backward and name == "fla" and bench.name == "gdn_scaling":
            continue  # fla's backward refuses on Hopper; the fwd+bwd table records that once
        if not backward and name in ("triton-keep", "triton-dvpass", "triton-localdv",
                                     "triton-splitdk", "triton-localdv-splitdk"):
            continue  # these change only the backward
        timings[name] = timed(fn, inputs, do)
    if "fla" in impls and not isinstance(impls["triton"], str) and not isinstance(impls["fla"],
                                                                                  str):
        try:
            extra["triton"] = {"max |Δo| vs fla": max_difference(impls["triton"], impls["fla"],
                                                                  inputs)}
        except Exception as exc:  # reported in the table, the run goes on
            extra["triton"] = {"max |Δo| vs fla": type(exc).__name__}
    elt = torch.finfo(dtype).bits // 8
    floor = floor_bytes(B, T, H, D, D, elt, backward)
    design = design_bytes(B, T, H, D, D, elt, backward)
    extra.setdefault("triton", {}).update({
        "floor ms": f"{floor / bandwidth * 1e3:.3f}",
        "design ms": f"{design / bandwidth * 1e3:.3f}",
    })
    rows = bench.measure(case, timings, grad_to_none=[*inputs, *attn] if backward else None,
                         extra=extra)
    ours = next(r for r in rows if r.impl == "triton")
    if ours.median_ms:
        moved = ours.median_ms * 1e-3 * bandwidth  # bytes the copy would move meanwhile
        bench.note(f"{case}: triton {ours.median_ms:.3f} ms = {moved / floor:.1f}× the memory "
                   f"floor ({floor / 1e9:.2f} GB), {moved / design:.1f}× the design traffic "
                   f"({design / 1e9:.2f} GB)")


# the stages part's runs: the served defaults, every variant on (triton-all), dk from Y in two
# passes (triton-wy), V_new stored (triton-vn) — each a label and triton_gdn's switches
STAGE_VARIANTS = {"default": (" (served defaults)", {}),
                  "all": (" (every variant on)", dict(split_output=True, keep_states=True,
                                                      dv_from_dh=True, local_dv=True)),
                  "wy": (" (dm_from_y)", dict(dm_from_y=True, split_dk=True)),
                  "vn": (" (store_v_new)", dict(store_v_new=True))}


def stage_times(B: int, T: int, H: int, D: int, dtype: torch.dtype, reps: int = 5,
                variant: str = "default") -> None:
    """Print each kernel launch of one triton forward+backward, in launch order, with its
    median GPU time over ``reps`` profiled iterations (after a warm-up that autotunes): which
    stage the next optimisation should go to. Repeated kernels (the backward's second state
    pass, chunk_bwd's three passes) are numbered in launch order."""
    from torch.profiler import ProfilerActivity, profile

    which, switches = STAGE_VARIANTS[variant]
    fn = triton_gdn(**switches)
    if isinstance(fn, str):
        print(f"stages: {fn}")
        return
    inputs = gdn_inputs(B, T, H, D, dtype, True)
    do = torch.randn(B, T, H, D, device="cuda", dtype=dtype)
    step = timed(fn, inputs, do)
    for _ in range(3):
        step()
        for x in inputs:
            x.grad = None
    torch.cuda.synchronize()
    runs: list[list[tuple[str, float]]] = []
    for _ in range(reps):
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            step()
            torch.cuda.synchronize()
        for x in inputs:
            x.grad = None
        kernels = sorted((e for e in prof.events() if e.device_type.name == "CUDA"),
                         key=lambda e: e.time_range.start)
        runs.append([(e.name, e.time_range.elapsed_us()) for e in kernels])
    total_us = [sum(us for _, us in run) for run in runs]
    print(f"\ntriton GDN forward+backward{which}, B={B} T={T} H={H} K=V={D} {dtype}: kernels "
          f"in launch order, median of {reps} profiled runs (GPU time "
          f"{sorted(total_us)[reps // 2] / 1e3:.3f} ms in all)")
    seen: dict[str, int] = defaultdict(int)
    for i, (name, _) in enumerate(runs[0]):
        seen[name] += 1
        times = sorted(run[i][1] for run in runs if len(run) > i)
        label = name if seen[name] == 1 else f"{name} #{seen[name]}"
        print(f"  {i:2d}  {times[len(times) // 2] / 1e3:8.3f} ms  {label[:100]}")


IMPL_NAMES = ("triton", "triton-split", "triton-seq", "triton-keep", "triton-dvpass",
              "triton-localdv", "triton-splitdk", "triton-localdv-splitdk", "triton-all",
              "triton-lean", "triton-nolean", "triton-tf32inv", "triton-lean-tf32inv",
              "triton-wy", "triton-wy1", "triton-da", "triton-vn", "triton-ovl",
              "triton-noovl", "triton-subst", "triton-series", "fla")


def main(argv: list[str] | None = None) -> int:
    parser = add_common_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seqlen", type=int, default=4096)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--tokens", type=int, default=65536,
                        help="tokens per step in the scaling table (default 64K)")
    parser.add_argument("--scaling-seqlens", type=int, nargs="+",
                        default=[1024, 2048, 4096, 8192, 16384, 32768, 65536])
    parser.add_argument("--scaling-impls", nargs="+", default=["triton", "triton-seq", "fla"],
                        choices=list(IMPL_NAMES),
                        help="rows of the scaling table (triton always)")
    parser.add_argument("--impls", nargs="+", choices=list(IMPL_NAMES),
                        help="rows of the fwd and fwd+bwd tables (triton always; default all)")
    parser.add_argument("--parts", nargs="+", choices=["fwd", "fwd+bwd", "scaling", "stages"],
                        default=["fwd", "fwd+bwd", "scaling"],
                        help="stages: each kernel's time in one forward+backward (profiler)")
    parser.add_argument("--stage-variants", nargs="+", choices=list(STAGE_VARIANTS),
                        default=["default", "all"],
                        help="the stages part's runs: served defaults, every variant on, "
                             "dm_from_y, store_v_new")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_gated_delta_rule: no CUDA device; nothing to measure", file=sys.stderr)
        return 1
    dtype = DTYPES[args.dtype]
    B, T, H, D = args.batch, args.seqlen, args.heads, args.head_dim
    # the variants of chunk.py (SPLIT_OUTPUT, KEEP_STATES, DV_FROM_DH, LOCAL_DV, SPLIT_DK) side
    # by side; "triton" is the served defaults
    impls = {"triton": triton_gdn(), "triton-split": triton_gdn(split_output=True),
             "triton-seq": triton_gdn(split_output=False),
             "triton-keep": triton_gdn(keep_states=True),
             "triton-dvpass": triton_gdn(dv_from_dh=False),
             "triton-localdv": triton_gdn(local_dv=True),
             "triton-splitdk": triton_gdn(split_dk=True),
             "triton-localdv-splitdk": triton_gdn(local_dv=True, split_dk=True),
             "triton-all": triton_gdn(split_output=True, keep_states=True, dv_from_dh=True,
                                      local_dv=True),
             "triton-lean": triton_gdn(lean_walk=True),
             "triton-nolean": triton_gdn(lean_walk=False),
             "triton-tf32inv": triton_gdn(inverse_precision="tf32x3"),
             "triton-lean-tf32inv": triton_gdn(lean_walk=True, inverse_precision="tf32x3"),
             "triton-wy": triton_gdn(dm_from_y=True, split_dk=True),
             "triton-wy1": triton_gdn(dm_from_y=True, split_dk=False),
             "triton-da": triton_gdn(dm_from_y=False, split_dk=True),  # served until session 12
             "triton-vn": triton_gdn(store_v_new=True),
             "triton-ovl": triton_gdn(overlap_walks=True),
             "triton-noovl": triton_gdn(overlap_walks=False),
             "triton-subst": triton_gdn(diagonal_inverse="substitution"),
             "triton-series": triton_gdn(diagonal_inverse="series"),
             "fla": fla_gdn()}
    if args.impls:  # the rows of the fwd / fwd+bwd tables ("triton" always)
        impls = {name: fn for name, fn in impls.items()
                 if name == "triton" or name in args.impls}
    common = {"out": args.out, "warmup": args.warmup, "rep": args.rep, "rounds": args.rounds}
    bandwidth = copy_bandwidth()
    print(f"copy bandwidth on {torch.cuda.get_device_name()}: {bandwidth / 1e12:.2f} TB/s "
          "(1 GiB device-to-device, read + write)")
    shape = f"B={B}, T={T}, H={H}, K=V={D}, {args.dtype}"
    benches = []
    if "fwd" in args.parts:
        bench = Bench("gdn_fwd", anchor="fla", **common)
        bench.note(f"{shape}; copy bandwidth {bandwidth / 1e12:.2f} TB/s")
        run_case(bench, f"T={T} fwd", B, T, H, D, dtype, False, impls, bandwidth)
        benches.append(bench)
    if "fwd+bwd" in args.parts:
        bench = Bench("gdn_fwd_bwd", anchor="sdpa", **common)
        bench.note(f"{shape}; SDPA is causal softmax attention on q, k, v of the same shape")
        run_case(bench, f"T={T} fwd+bwd", B, T, H, D, dtype, True, impls, bandwidth)
        benches.append(bench)
    if "scaling" in args.parts:
        bench = Bench("gdn_scaling", anchor="sdpa", **common)
        scaling_rows = dict.fromkeys(["triton", *args.scaling_impls])  # triton always, first
        bench.note(f"{args.tokens} tokens per step, B = tokens / T, H={H}, K=V={D}, "
                   f"{args.dtype}")
        for seqlen in args.scaling_seqlens:
            batch = max(1, args.tokens // seqlen)
            for backward in (False, True):
                mode = "fwd+bwd" if backward else "fwd"
                run_case(bench, f"T={seqlen} B={batch} {mode}", batch, seqlen, H, D, dtype,
                         backward,
                         {name: impls[name] for name in scaling_rows},
                         bandwidth)
                torch.cuda.empty_cache()
        benches.append(bench)
    if "stages" in args.parts:
        for variant in args.stage_variants:
            stage_times(B, T, H, D, dtype, variant=variant)
    from attnplug_triton.ops.gated_delta_rule.common import chosen_configs

    for bench in benches:
        for line in chosen_configs():
            bench.note(f"autotuned {line}")
        bench.report()
    return 0


if __name__ == "__main__":
    sys.exit(main())
