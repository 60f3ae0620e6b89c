"""Correctness of the DSA Triton kernels on the GPU at T = 4096, topk = 2048, against float64.

    python3 benchmarks/gpu_check_dsa.py            # everything; JSON into $OUT when set
    python3 benchmarks/gpu_check_dsa.py --quick    # the default block configurations only

Three parts, each row printing its errors and a verdict; exit status 1 when any row fails:

1. ``topk``: ``dsa_indexer_topk_threshold`` (served), ``dsa_indexer_topk_blocked`` and the
   experimental ``dsa_indexer_topk_radix`` (bf16
   and fp32 inputs; indexers 4×64 and 64×128; causal with S > T and not causal) against the
   float64 scores of the same inputs: every row lists distinct visible keys, as many as it can,
   and its sorted float64 scores equal the true top-k's to within ``1e-5 × max |score|``
   (float32 scores may swap near-equal keys). Also all-equal scores (ties).
2. ``sparse``: ``sparse_attention`` forward and backward (bf16, MQA and GQA, D = 128 and 64,
   indices from the top-k with −1 slots, a row with none) against the dense float64 reference,
   with the reference computed in bf16 as the yardstick; then every block configuration of
   ``bench_dsa.SWEEP`` forced — the check for Triton's Hopper miscompilation (gpu/README.md).
3. ``kl``: ``indexer_kl_loss`` and its gradients against the dense float64 loss.

Relative errors are ‖out − ref‖ / ‖ref‖.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import finish_checks  # noqa: E402

TOLERANCE = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}
NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
_STARTED = time.time()


def rel(out: Tensor, ref: Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in float64 (NaN stays NaN)."""
    return ((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


def report(part: str, case: str, ok: bool, detail: str) -> dict:
    print(f"{time.time() - _STARTED:5.0f}s {'ok  ' if ok else 'FAIL'} {part:6} {case:52} {detail}",
          flush=True)
    return {"part": part, "case": case, "ok": bool(ok), "detail": detail}


# -- 1. top-k ---------------------------------------------------------------------------------
def selection_errors(indices: Tensor, scores: Tensor, topk: int, n_vis: Tensor) -> dict:
    """What is wrong with ``indices`` for the float64 ``scores`` (−inf where invisible)."""
    B, T, _ = indices.shape
    n = n_vis.clamp(max=topk)  # (T,) keys each row must list
    slots = torch.arange(topk, device=indices.device)
    used = slots < n[:, None]  # (T, topk)
    bad_fill = ((indices >= 0) != used).any(-1)  # (B, T): −1 exactly after the listed keys
    safe = indices.clamp(min=0)
    listed = indices.sort(-1).values
    repeats = ((listed[..., 1:] == listed[..., :-1]) & (listed[..., 1:] >= 0)).any(-1)
    got = scores.gather(-1, safe).masked_fill(~used, float("inf")).sort(-1).values
    best = scores.topk(topk, dim=-1).values.masked_fill(~used, float("inf")).sort(-1).values
    scale = scores[scores.isfinite()].abs().max().clamp_min(1e-30)
    gap = (got - best).masked_fill(~used, 0).abs()  # (B, T, topk)
    invisible = (~torch.isfinite(got) & used).any(-1)
    return {"bad_fill_rows": int(bad_fill.sum()), "repeat_rows": int(repeats.sum()),
            "invisible_rows": int(invisible.sum()),
            "max_score_gap": float((gap.nan_to_num(float("inf")).max() / scale).item())}


def check_topk(quick: bool) -> list[dict]:
    from attnplug_triton.ops.dsa.topk_blocked import (
        dsa_indexer_topk_blocked,
        dsa_indexer_topk_radix,
        dsa_indexer_topk_threshold,
    )

    from attnplug.ops.dsa import indexer_scores

    rows = []
    cases = [  # (label, B, T, S, HI, DI, dtype, causal)
        ("small bf16", 2, 4096, 4096, 4, 64, torch.bfloat16, True),
        ("deepseek bf16", 1, 4096, 4096, 64, 128, torch.bfloat16, True),
        ("small fp32 S>T", 1, 4000, 4100, 4, 64, torch.float32, True),
        ("small bf16 not causal", 1, 2048, 3000, 8, 64, torch.bfloat16, False),
        ("ties: all scores 0", 1, 4096, 4096, 4, 64, torch.bfloat16, True),
    ]
    for label, B, T, S, HI, DI, dtype, causal in cases[: 2 if quick else None]:
        q = torch.randn(B, T, HI, DI, device="cuda", dtype=dtype)
        k = torch.randn(B, S, DI, device="cuda", dtype=dtype)
        w = torch.randn(B, T, HI, device="cuda", dtype=dtype)
        if label.startswith("ties"):
            w = torch.zeros_like(w)
        topk = 2048
        scores = indexer_scores(q.double(), k.double(), w.double(), causal=causal)  # (B, T, S)
        t = torch.arange(T, device="cuda")
        n_vis = (t + S - T + 1).clamp(max=S) if causal else torch.full_like(t, S)
        # the keys method, the served threshold one (also with query blocks of 1000 rows, so
        # that causal blocks are narrower than full rows) and the experimental radix one
        methods = [("keys", dsa_indexer_topk_blocked, {}),
                   ("threshold", dsa_indexer_topk_threshold, {}),
                   ("threshold blocks", dsa_indexer_topk_threshold,
                    {"block_bytes": 1000 * B * S * 4}),
                   ("radix", dsa_indexer_topk_radix, {}),
                   ("radix blocks", dsa_indexer_topk_radix, {"block_bytes": 1000 * B * S * 4})]
        for method, fn, options in methods:
            torch.cuda.synchronize()
            start = time.time()
            indices = fn(q, k, w, topk=topk, causal=causal, **options)
            torch.cuda.synchronize()
            seconds = time.time() - start
            errs = selection_errors(indices, scores, topk, n_vis)
            ok = (errs["bad_fill_rows"] == errs["repeat_rows"] == errs["invisible_rows"] == 0
                  and errs["max_score_gap"] <= 1e-5)
            detail = " ".join(f"{key}={value:.1e}" if isinstance(value, float)
                              else f"{key}={value}" for key, value in errs.items())
            rows.append(report("topk", f"{method} {label} B{B} T{T} S{S} HI{HI} DI{DI}", ok,
                               f"{detail} ({seconds:.2f} s incl. compile)"))
        del scores
        torch.cuda.empty_cache()
    return rows


# -- 2. sparse attention ----------------------------------------------------------------------
def run_sparse(fn, q, k, v, indices, do, **kwargs) -> list[Tensor]:
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    o = fn(*leaves, indices, **kwargs)
    o.backward(do)
    return [o.detach()] + [x.grad for x in leaves]


def check_sparse(quick: bool) -> list[dict]:
    from attnplug_triton.ops.dsa import sparse as sp
    from attnplug_triton.ops.dsa.naive import naive_sparse_attention
    from attnplug_triton.ops.dsa.topk_blocked import dsa_indexer_topk_threshold
    from bench_dsa import SWEEP

    rows = []
    cases = [  # (label, B, T, H, Hkv, D)
        ("mqa d128", 1, 4096, 16, 1, 128),
        ("gqa d128", 1, 4096, 16, 2, 128),
        ("mha d64", 1, 2048, 4, 4, 64),
    ]
    dtype, topk = torch.bfloat16, 2048
    for label, B, T, H, Hkv, D in cases[: 1 if quick else None]:
        q = torch.randn(B, T, H, D, device="cuda", dtype=dtype)
        k = torch.randn(B, T, Hkv, D, device="cuda", dtype=dtype)
        v = torch.randn(B, T, Hkv, D, device="cuda", dtype=dtype)
        do = torch.randn(B, T, H, D, device="cuda", dtype=dtype)
        iq = torch.randn(B, T, 4, 64, device="cuda", dtype=dtype)
        ik = torch.randn(B, T, 64, device="cuda", dtype=dtype)
        iw = torch.randn(B, T, 4, device="cuda", dtype=dtype)
        indices = dsa_indexer_topk_threshold(iq, ik, iw, topk=topk)
        indices[:, T // 2] = -1  # a query with no key: zero output and gradient
        refs = run_sparse(naive_sparse_attention, q.double(), k.double(), v.double(), indices,
                          do.double())
        yard = [rel(a, b) for a, b in zip(run_sparse(naive_sparse_attention, q, k, v, indices,
                                                     do), refs, strict=True)]
        configs = [None]
        if not quick and D == 128:
            configs += [("fwd", sp.SparseConfig(*c)) for c in SWEEP["sparse fwd"]]
            configs += [("bwd", sp.SparseConfig(*c)) for c in SWEEP["sparse bwd"]]
        for forced in configs:
            kind, cfg = forced or ("default", None)
            try:
                o, lse = sp.sparse_forward(q, k, v, indices, D**-0.5,
                                           cfg if kind == "fwd" else None)
                grads = sp.sparse_backward(do, q, k, v, indices, o, lse, D**-0.5,
                                           cfg if kind == "bwd" else None)
                errs = [rel(a, b) for a, b in zip([o, *grads], refs, strict=True)]
                empty = o[:, T // 2].abs().max().item() + grads[0][:, T // 2].abs().max().item()
            except Exception as exc:  # a failed compile or launch is a failed row
                errs, empty = [float("nan")] * 4, float("nan")
                print(f"  {kind} {cfg}: {type(exc).__name__}: {exc}"[:300])
            tol = TOLERANCE[dtype]
            ok = empty == 0 and all(e <= min(tol, 4 * y + tol / 10)
                                    for e, y in zip(errs, yard, strict=True))
            detail = "  ".join(f"{n} {e:.1e} (bf16 ref {y:.1e})"
                               for n, e, y in zip(("o", "dq", "dk", "dv"), errs, yard,
                                                  strict=True))
            name = f"{label} B{B} T{T} H{H}/{Hkv} {kind} {tuple(cfg) if cfg else ''}"
            rows.append(report("sparse", name, ok, detail))
        del refs
        torch.cuda.empty_cache()
    return rows


# -- 3. KL loss -------------------------------------------------------------------------------
def check_kl(quick: bool) -> list[dict]:
    from attnplug_triton.ops.dsa.kl import indexer_kl_loss
    from attnplug_triton.ops.dsa.naive import naive_indexer_kl_loss

    rows = []
    cases = [  # (label, B, T, H, Hkv, D, HI, DI)
        ("mqa small indexer", 1, 4096, 16, 1, 128, 4, 64),
        ("mha deepseek indexer", 1, 2048, 8, 8, 128, 64, 128),
        ("gqa S=T small", 2, 1024, 16, 4, 64, 8, 32),
    ]
    dtype = torch.bfloat16
    for label, B, T, H, Hkv, D, HI, DI in cases[: 1 if quick else None]:
        q = torch.randn(B, T, H, D, device="cuda", dtype=dtype)
        k = torch.randn(B, T, Hkv, D, device="cuda", dtype=dtype)
        index = [torch.randn(B, T, HI, DI, device="cuda", dtype=dtype),
                 torch.randn(B, T, DI, device="cuda", dtype=dtype),
                 torch.randn(B, T, HI, device="cuda", dtype=dtype) * (HI * DI) ** -0.5]
        ours = [x.clone().requires_grad_() for x in index]
        refs = [x.double().requires_grad_() for x in index]
        loss = indexer_kl_loss(q, k, *ours)
        ref = naive_indexer_kl_loss(q.double(), k.double(), *refs)
        loss.backward()
        ref.backward()
        loss_err = abs(loss.item() - ref.item()) / max(abs(ref.item()), 1e-30)
        errs = [rel(a.grad, b.grad) for a, b in zip(ours, refs, strict=True)]
        ok = loss_err <= 1e-4 and all(e <= TOLERANCE[dtype] for e in errs)
        detail = f"loss {loss.item():.6f} vs {ref.item():.6f} (rel {loss_err:.1e})  " + "  ".join(
            f"{n} {e:.1e}" for n, e in zip(("d index_q", "d index_k", "d weights"), errs,
                                             strict=True))
        rows.append(report("kl", f"{label} B{B} T{T} H{H}/{Hkv} D{D} HI{HI}x{DI}", ok, detail))
        torch.cuda.empty_cache()
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer cases, default blocks only")
    parser.add_argument("--parts", nargs="+", choices=["topk", "sparse", "kl"],
                        default=["topk", "sparse", "kl"])
    parser.add_argument("--out", type=Path, default=Path(os.environ["OUT"])
                        if os.environ.get("OUT") else None, help="folder for the JSON "
                        "(default: $OUT when set)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_check_dsa: no CUDA device", file=sys.stderr)
        return 1
    torch.manual_seed(0)
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, "
          f"triton {__import__('triton').__version__}", flush=True)
    rows = []
    checks = {"topk": check_topk, "sparse": check_sparse, "kl": check_kl}
    for part in args.parts:
        try:
            rows += checks[part](args.quick)
        except Exception as exc:  # report and go on: the other parts still say something
            rows.append(report(part, "crashed", False, f"{type(exc).__name__}: {exc}"[:400]))
    return finish_checks("gpu_check_dsa", rows, _STARTED, args.out)


if __name__ == "__main__":
    sys.exit(main())
