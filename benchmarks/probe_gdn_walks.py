"""Which launch of the gated delta rule's two state walks is fastest on the GPU, and why
(a probe, not a test).

    python3 benchmarks/probe_gdn_walks.py --compile-only   # any machine: occupancy on sm_90
    python3 benchmarks/probe_gdn_walks.py --out runs/probe-walks   # on the GPU

The walks (``attnplug_triton.ops.gated_delta_rule.chunk_h``) have one program per (sequence ·
value head, value block) and step through the chunks in order, so their time is the number of
waves times 64 steps' latency. At the project shape (B = 8, HV = 16: 128 pairs, K = V = 128)
and BV = 64 that is 256 programs; an sm_90 SM holds two of them only when each needs at most
115,712 bytes of shared memory, and at two pipeline stages the served forward walk needs
116,224 and the dh walk 132,096 (``ptxas_report.py``, session 11): one program a SM, two waves.
This probe puts each candidate launch side by side — the autotuner's configurations, ones it
does not try (one stage: no pipelining but half the shared memory; BV = 128 with 8 warps: one
program per pair, 128 programs, one wave) and, for the forward, the ``LEAN`` ordering (115,456
bytes at BV = 64) — with:

- what the compiled kernel needs and gets (registers, spills, shared memory, programs a SM,
  waves at the probed shape), compiled for sm_90 with ptxas (also without a GPU:
  ``--compile-only``);
- whether it is right: each candidate in a process of its own with a time limit (a kernel
  miscompiled on Hopper may fault and end the CUDA context, or hang), its outputs against the
  walk at the autotuner's first configuration, served ordering (right on the H200 since
  session 3), every output within ``--tolerance`` (relative L2, default 1e-2 as bf16);
- how long the walk alone takes (``benchmarks/harness.py``: rounds, the served autotuned walk
  as the anchor in the same run) for the candidates that were right.

The forward walk is timed writing the output and the final state (``chunk_fwd_h_o``); the
backward's dh walk as served (it stores ``Aᵀ dV_new`` and dv and reads the within-chunk term
from ``chunk_dv``: ``chunk_bwd_dh_y_l``). Nothing here changes what is served; a candidate
that is right and faster becomes a configuration (``chunk_h.CONFIGS``) or a default
(``chunk.LEAN_WALK``) only after ``gpu_check_gdn.py`` checks it at every shape.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "benchmarks"), str(ROOT), str(ROOT / "plugins" / "triton")]

TOLERANCE = 1e-2


class Candidate(NamedTuple):
    walk: str  # "fwd" or "dh"
    bv: int
    warps: int
    stages: int
    lean: bool = False

    @property
    def label(self) -> str:
        return (f"{self.walk} BV={self.bv} w{self.warps} s{self.stages}"
                f"{' lean' if self.lean else ''}")


def candidates(walks: list[str], every: bool = False) -> list[Candidate]:
    """The launches to probe: the autotuner's (``chunk_h.CONFIGS``; those with three stages
    only with ``every`` — they need more shared memory still) and the ones it does not try,
    for each walk; the forward's also with the LEAN ordering."""
    from attnplug_triton.ops.gated_delta_rule.chunk_h import CONFIGS

    served = [(c.kwargs["BV"], c.num_warps, c.num_stages) for c in CONFIGS
              if every or c.num_stages <= 2]
    extra = [(64, 4, 1), (32, 4, 1), (128, 8, 1), (128, 8, 2)]
    out = []
    for walk in walks:
        for bv, warps, stages in served + [e for e in extra if e not in served]:
            out.append(Candidate(walk, bv, warps, stages))
            if walk == "fwd":
                out.append(Candidate(walk, bv, warps, stages, lean=True))
    return out


def kernel_name(walk: str) -> str:
    """The name the walk's launches are forced and autotuned under (common.launch)."""
    return {"fwd": "chunk_fwd_h_o", "dh": "chunk_bwd_dh_y_l"}[walk]


def constexprs(c: Candidate, dim: int) -> dict[str, Any]:
    """The walk's constexprs as the served call passes them (q/k L2 norm, an initial state or
    its gradient, bf16's TF32 dots)."""
    common = dict(DK=dim, DV=dim, BK=dim, USE_L2NORM=True, PRECISION="tf32", GROUP=1,
                  PARALLELISM=1, BV=c.bv)
    if c.walk == "fwd":
        return {**common, "HAS_H0": True, "OUTPUT": True, "STORE_H": False,
                "STORE_FINAL": True, "LEAN": c.lean}
    return {**common, "HAS_DHT": True, "STORE_DH0": True, "STORE_Y": True, "DV_LOCAL": True}


def occupancy(c: Candidate, dim: int, pairs: int, sms: int) -> dict[str, Any]:
    """Registers, spills, shared memory, programs a SM and waves of a candidate, compiled for
    sm_90 (ptxas_report); the error instead when it does not compile."""
    from ptxas_report import compile_case, programs_per_sm

    module = "attnplug_triton.ops.gated_delta_rule.chunk_h"
    name = {"fwd": "chunk_fwd_h_kernel", "dh": "chunk_bwd_dh_kernel"}[c.walk]
    const = constexprs(c, dim)
    meta = {"BV": const.pop("BV")}
    try:
        r = compile_case(module, name, const, meta, c.warps, c.stages, 90)
    except Exception as exc:  # reported in the table; the others go on
        return {"compile": f"{type(exc).__name__}: {str(exc).splitlines()[0][:150]}"}
    fit = programs_per_sm(r["registers"], r["shared"], c.warps)
    programs = pairs * -(-dim // c.bv)
    return {**r, "per_sm": fit, "programs": programs,
            "waves": -(-programs // (fit * sms)) if fit else None}


# -- on the GPU --------------------------------------------------------------------------------
def walk_inputs(B: int, T: int, H: int, dim: int, seed: int = 0, device: str = "cuda",
                dtype: Any = None) -> dict[str, Any]:
    """Inputs in the walks' token-major form (bf16 unless ``dtype``), with what the kernels
    before them make (A and the norms from kkt_solve; the within-chunk dV term from
    chunk_dv)."""
    import torch
    import torch.nn.functional as F
    from attnplug_triton.ops.gated_delta_rule.chunk_dv import chunk_bwd_dv_local
    from attnplug_triton.ops.gated_delta_rule.common import precision, sequences
    from attnplug_triton.ops.gated_delta_rule.kkt_solve import kkt_solve

    gen = torch.Generator(device=device).manual_seed(seed)
    low = dtype or torch.bfloat16

    def randn(*shape: int, dtype: torch.dtype = low) -> torch.Tensor:
        return torch.randn(*shape, device=device, generator=gen).to(dtype)

    tokens = B * T
    q, k, v = randn(tokens, H, dim), randn(tokens, H, dim), randn(tokens, H, dim)
    g = F.logsigmoid(torch.rand(tokens, H, device=device, generator=gen)) / 4
    beta = torch.rand(tokens, H, device=device, generator=gen).sigmoid()
    seqs = sequences("probe_gdn_walks", B, T, None, torch.device(device))
    prec = precision(k.dtype)
    a, rq, rk = kkt_solve(q, k, g, beta, seqs, True, prec)
    do = randn(tokens, H, dim)
    scale = dim ** -0.5
    return {"q": q, "k": k, "v": v, "g": g, "beta": beta, "a": a, "rq": rq, "rk": rk,
            "seqs": seqs, "scale": scale, "prec": prec, "do": do,
            "h0": randn(B, H, dim, dim, dtype=torch.float32),
            "dht": randn(B, H, dim, dim, dtype=torch.float32),
            "dv_local": chunk_bwd_dv_local(q, k, g, beta, rq, rk, do, seqs, scale, True, prec)}


def run_walk(walk: str, x: dict[str, Any], lean: bool = False) -> dict[str, Any]:
    """One walk launch as the served call makes it; its outputs by name."""
    from attnplug_triton.ops.gated_delta_rule.chunk_h import chunk_bwd_dh, chunk_fwd_h

    if walk == "fwd":
        o, _, final = chunk_fwd_h(x["q"], x["k"], x["v"], x["g"], x["beta"], x["a"], x["rq"],
                                  x["rk"], x["h0"], x["seqs"], x["scale"], True, x["prec"],
                                  output=True, store_states=False, final_state=True,
                                  lean=lean)
        return {"o": o, "final": final}
    dstates, dh0, y, dv = chunk_bwd_dh(x["q"], x["k"], x["g"], x["beta"], x["a"], x["rq"],
                                       x["rk"], x["do"], x["dht"], x["seqs"], x["scale"], True,
                                       x["prec"], initial_grad=True, store_y=True,
                                       dv_dtype=x["v"].dtype, dv_local=x["dv_local"])
    return {"dstates": dstates, "dh0": dh0, "y": y, "dv": dv}


def forced(c: Candidate):
    import triton
    from attnplug_triton.ops.gated_delta_rule.common import force_config

    return force_config(kernel_name(c.walk), triton.Config({"BV": c.bv}, num_warps=c.warps,
                                                           num_stages=c.stages))


def check_one(c: Candidate, B: int, T: int, H: int, dim: int, device: str = "cuda",
              dtype: Any = None) -> dict[str, Any]:
    """In a process of its own: the candidate's outputs against the walk at the autotuner's
    first configuration (served ordering), relative L2 error per output."""
    import torch
    from attnplug_triton.ops.gated_delta_rule.chunk_h import CONFIGS
    from attnplug_triton.ops.gated_delta_rule.common import force_config

    x = walk_inputs(B, T, H, dim, device=device, dtype=dtype)
    with force_config(kernel_name(c.walk), CONFIGS[0]):
        want = run_walk(c.walk, x)
    with forced(c):
        got = run_walk(c.walk, x, c.lean)
    if device == "cuda":
        torch.cuda.synchronize()
    errors = {}
    for name, ref in want.items():
        diff = (got[name].double() - ref.double()).norm()
        errors[name] = (diff / ref.double().norm().clamp_min(1e-30)).item()
    return {"errors": errors}


def time_walks(ok: list[Candidate], B: int, T: int, H: int, dim: int, out: Path | None,
               rounds: int, rep: float) -> None:
    """The walks alone, each candidate forced, against the served (autotuned) walk."""
    from harness import Bench

    x = walk_inputs(B, T, H, dim)
    for walk in ("fwd", "dh"):
        mine = [c for c in ok if c.walk == walk]
        if not mine:
            continue
        impls: dict[str, Any] = {"served": lambda w=walk: run_walk(w, x)}
        for c in mine:
            def call(c: Candidate = c) -> None:
                with forced(c):
                    run_walk(c.walk, x, c.lean)
            impls[c.label] = call
        bench = Bench(f"gdn_walk_{walk}", anchor="served", out=out, rounds=rounds, rep=rep)
        bench.note(f"B={B} T={T} HV=H={H} K=V={dim} bf16; the {walk} walk alone "
                   f"({kernel_name(walk)}); served = autotuned among chunk_h.CONFIGS")
        bench.measure(f"{walk} walk", impls)
        bench.report()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seqlen", type=int, default=4096)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--walks", nargs="+", choices=["fwd", "dh"], default=["fwd", "dh"])
    parser.add_argument("--sms", type=int, default=132, help="SMs of the card (H100/H200: 132)")
    parser.add_argument("--limit", type=float, default=120.0,
                        help="seconds a candidate's check may take in its process")
    parser.add_argument("--tolerance", type=float, default=TOLERANCE)
    parser.add_argument("--every", action="store_true",
                        help="also the autotuner's three-stage configurations")
    parser.add_argument("--jobs", type=int, default=4,
                        help="candidate checks at a time (each its own process)")
    parser.add_argument("--compile-only", action="store_true",
                        help="only the sm_90 occupancy table (no GPU needed)")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--rep", type=float, default=100.0)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--one", help=argparse.SUPPRESS)  # a candidate's check, as JSON
    parser.add_argument("--device", default="cuda", help=argparse.SUPPRESS)  # --one's (tests)
    args = parser.parse_args(argv)
    shape = (args.batch, args.seqlen, args.heads, args.head_dim)
    if args.one:
        import torch

        c = Candidate(**json.loads(args.one))
        dtype = torch.float32 if args.device == "cpu" else None  # the interpreter: no bf16
        print("RESULT " + json.dumps(check_one(c, *shape, device=args.device, dtype=dtype)),
              flush=True)
        return 0
    todo = candidates(args.walks, args.every)
    pairs = args.batch * args.heads
    print(f"{len(todo)} candidates; B={args.batch} T={args.seqlen} H=HV={args.heads} "
          f"K=V={args.head_dim}: {pairs} sequence·value-head pairs, {args.sms} SMs", flush=True)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    shape_args = ["--batch", str(args.batch), "--seqlen", str(args.seqlen), "--heads",
                  str(args.heads), "--head-dim", str(args.head_dim)]

    def check(c: Candidate) -> dict[str, Any]:
        """The candidate's check in a process of its own: its verdict and errors."""
        started = time.time()
        try:
            done = subprocess.run([sys.executable, __file__, "--one", json.dumps(c._asdict()),
                                   *shape_args], capture_output=True, text=True,
                                  timeout=args.limit, env={**env, "CUDA_LAUNCH_BLOCKING": "1"})
        except subprocess.TimeoutExpired:
            return {"verdict": f"hang (over {args.limit:.0f} s)", "check_s": args.limit}
        found = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
        took = round(time.time() - started, 1)
        if not found:
            tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["?"]
            return {"verdict": f"failed (exit {done.returncode}): {tail[0][:150]}",
                    "check_s": took}
        errors = json.loads(found[-1][7:])["errors"]
        bad = [n for n, e in errors.items() if not e <= args.tolerance]  # NaN too
        return {"errors": errors, "verdict": "wrong" if bad else "ok", "check_s": took}

    checks: dict[Candidate, Any] = {}
    if not args.compile_only:
        from concurrent.futures import ThreadPoolExecutor

        pool = ThreadPoolExecutor(max_workers=max(1, args.jobs))
        checks = {c: pool.submit(check, c) for c in todo}
    rows = []
    for c in todo:  # in order, as the checks finish
        occ = occupancy(c, args.head_dim, pairs, args.sms)
        row: dict[str, Any] = {"candidate": c._asdict(), "label": c.label, **occ}
        if c in checks:
            row.update(checks[c].result())
        rows.append(row)
        stats = (f"{occ['registers']:3d} regs, spills {occ['spill_stores']:4d} B, shared "
                 f"{occ['shared']:6d} B, {occ['per_sm']} a SM, {occ['programs']} programs, "
                 f"{occ['waves']} waves" if "compile" not in occ else occ["compile"])
        errs = " ".join(f"{n} {e:.1e}" for n, e in row.get("errors", {}).items())
        print(f"{c.label:26} {stats}  {row.get('verdict', '')} {errs}", flush=True)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "probe_gdn_walks.json").write_text(json.dumps(rows, indent=1))
    if args.compile_only:
        return 0
    ok = [Candidate(**r["candidate"]) for r in rows if r.get("verdict") == "ok"]
    time_walks(ok, *shape, args.out, args.rounds, args.rep)
    return 0


if __name__ == "__main__":
    sys.exit(main())
