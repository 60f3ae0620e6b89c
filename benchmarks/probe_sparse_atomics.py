"""How much of the sparse attention's backward is its dk/dv atomics? (a GPU probe, not a test)

    python3 benchmarks/probe_sparse_atomics.py --out runs/probe-atomics

The served backward (``attnplug_triton.ops.dsa.sparse.sparse_backward``) adds each query's
share of dk and dv into float32 buffers with one atomic per element: ``B·T·topk·(D + Dv)``
additions per key/value head group (17·10⁹ at T = 32K, topk 2048, D = Dv = 128). This probe
times, on the same selected indices and grid:

- ``sparse-bwd``: the served backward;
- ``atomics-only``: a kernel that walks the same index rows with the same blocks and adds a
  constant tile into the same buffers — no loads of q, k, v, no products: the floor the atomics
  alone set for this design;
- ``gather-only``: the same walk loading the gathered k and v rows and summing them into one
  register tile (stored once), no atomics: the cost of the gathers;
- ``sparse-fwd``: the served forward (anchor: gathers k, v once per query, no atomics).

Ratios are to ``sparse-fwd``. Shapes as ``bench_dsa.py``'s goal case: B = 1, T = 32K, H = 16,
one key/value head, D = 128, topk = 2048, bf16, indices from the served top-k with random
indexer inputs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import Bench, add_common_args  # noqa: E402


@triton.jit
def _walk_kernel(IDX, K, V, DK, DV, SINK, stride_it, stride_ks, stride_vs, stride_dks,
                 stride_dvs, S, TOPK, D: tl.constexpr, BLOCK_N: tl.constexpr,
                 ATOMICS: tl.constexpr):
    """One program per query: walk its index row ``BLOCK_N`` slots at a time, then either add a
    constant tile into DK/DV at the selected rows (``ATOMICS``) or load the selected k/v rows
    and fold them into a register tile stored once into SINK."""
    t = tl.program_id(0).to(tl.int64)
    offs_d = tl.arange(0, D).to(tl.int64)
    slots = tl.arange(0, BLOCK_N).to(tl.int64)
    acc = tl.zeros([BLOCK_N, D], dtype=tl.float32)
    for start in range(0, TOPK, BLOCK_N):
        slot = start + slots
        idx = tl.load(IDX + t * stride_it + slot, mask=slot < TOPK, other=-1).to(tl.int64)
        valid = (idx >= 0) & (idx < S)
        row = tl.where(valid, idx, 0)
        if ATOMICS:
            one = tl.full([BLOCK_N, D], 1.0, tl.float32)
            tl.atomic_add(DK + row[:, None] * stride_dks + offs_d[None, :], one,
                          mask=valid[:, None], sem="relaxed")
            tl.atomic_add(DV + row[:, None] * stride_dvs + offs_d[None, :], one,
                          mask=valid[:, None], sem="relaxed")
        else:
            k = tl.load(K + row[:, None] * stride_ks + offs_d[None, :], mask=valid[:, None],
                        other=0.0)
            v = tl.load(V + row[:, None] * stride_vs + offs_d[None, :], mask=valid[:, None],
                        other=0.0)
            acc += k.to(tl.float32) + v.to(tl.float32)
    if not ATOMICS:
        tl.store(SINK + t * D + offs_d, tl.sum(acc, 0))


def main(argv: list[str] | None = None) -> int:
    parser = add_common_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    parser.add_argument("--seqlen", type=int, default=32768)
    parser.add_argument("--topk", type=int, default=2048)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("probe_sparse_atomics: needs a CUDA GPU; nothing measured", file=sys.stderr)
        return 1
    from attnplug_triton.ops.dsa import sparse as sp
    from attnplug_triton.ops.dsa.topk_blocked import dsa_indexer_topk_threshold

    B, T, H, D, topk, dev, dtype = 1, args.seqlen, 16, 128, args.topk, "cuda", torch.bfloat16
    q = torch.randn(B, T, H, D, device=dev, dtype=dtype)
    k = torch.randn(B, T, 1, D, device=dev, dtype=dtype)
    v = torch.randn(B, T, 1, D, device=dev, dtype=dtype)
    do = torch.randn(B, T, H, D, device=dev, dtype=dtype)
    iq = torch.randn(B, T, 4, 64, device=dev, dtype=dtype)
    ik = torch.randn(B, T, 64, device=dev, dtype=dtype)
    iw = torch.randn(B, T, 4, device=dev, dtype=dtype)
    idx = dsa_indexer_topk_threshold(iq, ik, iw, topk=topk)
    scale = D**-0.5
    o, lse = sp.sparse_forward(q, k, v, idx, scale)
    cfg = sp.default_sparse_config(D, True, dtype)
    dk = torch.zeros(T, D, device=dev, dtype=torch.float32)
    dv = torch.zeros(T, D, device=dev, dtype=torch.float32)
    sink = torch.empty(T, D, device=dev, dtype=torch.float32)
    k2, v2 = k.view(T, D), v.view(T, D)

    def walk(atomics: bool) -> None:
        _walk_kernel[(T,)](idx[0], k2, v2, dk, dv, sink, idx.stride(1), k2.stride(0),
                           v2.stride(0), dk.stride(0), dv.stride(0), T, topk, D=D,
                           BLOCK_N=cfg.block_n, ATOMICS=atomics, num_warps=cfg.num_warps,
                           num_stages=cfg.num_stages)

    n_valid = int((idx >= 0).sum())
    bench = Bench("sparse_atomics", anchor="sparse-fwd", out=args.out, warmup=args.warmup,
                  rep=args.rep, rounds=args.rounds)
    bench.measure(f"T={T // 1024}K topk={topk} H={H}/1 D={D} ({n_valid / 1e6:.0f}M pairs)", {
        "sparse-fwd": lambda: sp.sparse_forward(q, k, v, idx, scale),
        "sparse-bwd": lambda: sp.sparse_backward(do, q, k, v, idx, o, lse, scale),
        "atomics-only": lambda: walk(True),
        "gather-only": lambda: walk(False),
    })
    bench.note(f"{2 * n_valid * D / 1e9:.1f}e9 float32 atomics a backward; block_n "
               f"{cfg.block_n}, {cfg.num_warps} warps")
    bench.report()
    return 0


if __name__ == "__main__":
    sys.exit(main())
