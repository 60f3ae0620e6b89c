"""Does Triton's automatic warp specialization give working, faster attention kernels here?
(a probe, not a test)

    python3 benchmarks/probe_warp_specialize.py --compile-only   # any machine: sm_90 IR
    python3 benchmarks/probe_warp_specialize.py --out runs/probe-ws   # on the GPU

FlashAttention-3 and cuDNN reach their Hopper speed by warp specialization: producer warps
issue the TMA loads while consumer warpgroups run the products and the softmax. Triton asks
for it with ``tl.range(..., warp_specialize=True)``; Triton 3.5+ carries a Hopper pass for it
(``add_hopper_warpspec``). attnplug's served attention kernels (``attnplug_triton.ops.
attention``) cannot use it as they are — the pass fails on their two loops (unmasked, then
diagonal) and on pointer loads inside the loop — so this probe carries small kernels written
the way the pass accepts (one loop, the causal mask applied at every step, every loop tile
through 2-D tensor descriptors, 4 warps a group):

- ``fwd``: causal forward, ``o`` and the base-2 log-sum-exp;
- ``dkdv``: dK, dV of a key block, looping over query blocks (lse and delta through
  descriptors as well);
- ``dq``: dQ of a query block, looping over key blocks.

Same math as the served kernels (multi-head, D = 128, T a multiple of the blocks). Each is
tried with and without ``warp_specialize``, at a few block shapes, **each in a process of its
own with a time limit**, because a kernel miscompiled this way may never finish: a variant
ends ``ok`` (max error against float64 at B=2, T=1024, H=16 in bf16, within 2e-2 of the
outputs' scale), ``wrong`` (NaN or a larger error), ``hang`` (over the limit), or
``compile error``. With ``--time``, the ``ok`` ones are then timed against the served kernels
(and the forward against SDPA) at B=8, T=4096 (``benchmarks/harness.py``).

``--compile-only`` compiles every variant for sm_90 without a GPU and reports whether the pass
made warp-specialized regions (``ttg.warp_specialize`` ops) and ptxas's registers and spills.

Session 10 (Triton 3.6.0, H200; `benchmarks/results/2026-11-28-h200-session10.md`): the pass
forms regions (12 warps: a producer and two consumer groups) only at 4 warps, one loop, TMA
loads; at 8 warps it silently does nothing. Every variant with regions failed: the forward at
128×64 (2 and 3 stages) and 128×128 and the dK/dV at 64×128 and 32×128 **hang**; the 64×64
dK/dV and dQ give **NaN**; the 128×64 dQ does not compile. The same kernels without it are
right (errors 2.3e-3–4.5e-3 of the outputs' scale, as the served kernels'). Nothing is served
from this probe.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import triton
import triton.language as tl

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "benchmarks"), str(ROOT), str(ROOT / "plugins" / "triton")]

_LOG2_E = 1.4426950408889634


@triton.jit
def _query_block(T, H, D: tl.constexpr, BLOCK_M: tl.constexpr):
    """This program's query block (the longest rows first) of one (batch, head) in the
    ``[B·T, H·D]`` view: first row of the batch element, first column of the head, first
    query, the block's queries and the (batch, head) index."""
    pid_bh = tl.program_id(1)
    start_m = (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_M
    return ((pid_bh // H) * T, (pid_bh % H) * D, start_m, start_m + tl.arange(0, BLOCK_M),
            pid_bh)


@triton.jit
def ws_fwd_kernel(desc_q, desc_k, desc_v, O, LSE, T, H, qk_scale,
                  D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  WS: tl.constexpr):
    """o and lse of ``BLOCK_M`` queries of one (batch, head): one loop over every key block up
    to the diagonal, the causal mask at each step."""
    row0, col, start_m, offs_m, pid_bh = _query_block(T, H, D, BLOCK_M)
    q = desc_q.load([row0 + start_m, col])
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    for start_n in tl.range(0, start_m + BLOCK_M, BLOCK_N, warp_specialize=WS):
        k = desc_k.load([row0 + start_n, col])
        offs_n = start_n + tl.arange(0, BLOCK_N)
        qk = tl.dot(q, k.T) * qk_scale
        qk = tl.where(offs_m[:, None] >= offs_n[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))  # finite: key 0 is in the first block
        p = tl.math.exp2(qk - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = desc_v.load([row0 + start_n, col])
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
        m_i = m_new
    offs_d = tl.arange(0, D)
    o_ptrs = O + (row0 + offs_m)[:, None].to(tl.int64) * (H * D) + col + offs_d[None, :]
    tl.store(o_ptrs, (acc / l_i[:, None]).to(O.dtype.element_ty))
    tl.store(LSE + pid_bh.to(tl.int64) * T + offs_m, m_i + tl.math.log2(l_i))


@triton.jit
def ws_dkdv_kernel(desc_q, desc_do, desc_k, desc_v, desc_lse, desc_delta, DK, DV, T, H,
                   qk_scale, softmax_scale, D: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, WS: tl.constexpr):
    """dK and dV of ``BLOCK_N`` keys of one (batch, head), over the query blocks from the
    diagonal on (``Pᵀ`` and ``dSᵀ`` computed directly, as the served kernel does)."""
    pid_bh = tl.program_id(1)
    row0 = (pid_bh // H) * T
    col = (pid_bh % H) * D
    start_n = tl.program_id(0) * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    k = desc_k.load([row0 + start_n, col])
    v = desc_v.load([row0 + start_n, col])
    dk = tl.zeros([BLOCK_N, D], tl.float32)
    dv = tl.zeros([BLOCK_N, D], tl.float32)
    for start_m in tl.range(start_n // BLOCK_M * BLOCK_M, T, BLOCK_M, warp_specialize=WS):
        q = desc_q.load([row0 + start_m, col])
        do = desc_do.load([row0 + start_m, col])
        lse = desc_lse.load([pid_bh, start_m]).reshape(BLOCK_M)
        delta = desc_delta.load([pid_bh, start_m]).reshape(BLOCK_M)
        offs_m = start_m + tl.arange(0, BLOCK_M)
        p_t = tl.math.exp2(tl.dot(k, q.T) * qk_scale - lse[None, :])
        p_t = tl.where(offs_n[:, None] <= offs_m[None, :], p_t, 0.0)
        dv = tl.dot(p_t.to(do.dtype), do, dv)
        ds_t = p_t * (tl.dot(v, do.T) - delta[None, :])
        dk = tl.dot(ds_t.to(q.dtype), q, dk)
    offs_d = tl.arange(0, D)
    off = (row0 + offs_n)[:, None].to(tl.int64) * (H * D) + col + offs_d[None, :]
    tl.store(DK + off, (dk * softmax_scale).to(DK.dtype.element_ty))
    tl.store(DV + off, dv.to(DV.dtype.element_ty))


@triton.jit
def ws_dq_kernel(desc_q, desc_do, desc_k, desc_v, LSE, DELTA, DQ, T, H, qk_scale,
                 softmax_scale, D: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, WS: tl.constexpr):
    """dQ of ``BLOCK_M`` queries of one (batch, head), over the key blocks up to the
    diagonal."""
    row0, col, start_m, offs_m, pid_bh = _query_block(T, H, D, BLOCK_M)
    q = desc_q.load([row0 + start_m, col])
    do = desc_do.load([row0 + start_m, col])
    lse = tl.load(LSE + pid_bh.to(tl.int64) * T + offs_m)
    delta = tl.load(DELTA + pid_bh.to(tl.int64) * T + offs_m)
    dq = tl.zeros([BLOCK_M, D], tl.float32)
    for start_n in tl.range(0, start_m + BLOCK_M, BLOCK_N, warp_specialize=WS):
        k = desc_k.load([row0 + start_n, col])
        v = desc_v.load([row0 + start_n, col])
        offs_n = start_n + tl.arange(0, BLOCK_N)
        p = tl.math.exp2(tl.dot(q, k.T) * qk_scale - lse[:, None])
        p = tl.where(offs_m[:, None] >= offs_n[None, :], p, 0.0)
        ds = p * (tl.dot(do, v.T) - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq)
    offs_d = tl.arange(0, D)
    off = (row0 + offs_m)[:, None].to(tl.int64) * (H * D) + col + offs_d[None, :]
    tl.store(DQ + off, (dq * softmax_scale).to(DQ.dtype.element_ty))


# (kernel, BLOCK_M, BLOCK_N, warps, stages, warp_specialize); names are "kernel-MxN-wW-sS[-ws]"
SHAPES = {"fwd": [(128, 64, 4, 2), (128, 64, 4, 3), (128, 128, 4, 2), (128, 64, 8, 3)],
          "dkdv": [(64, 128, 4, 2), (32, 128, 4, 3), (64, 64, 4, 3), (64, 128, 8, 2)],
          "dq": [(128, 64, 4, 2), (64, 64, 4, 3), (128, 64, 8, 2)]}
# the served kernels' partners while one kernel is probed
PARTNER = {"dkdv": ("dq", (128, 64, 8, 2, False)), "dq": ("dkdv", (64, 128, 8, 2, False))}


def variant_name(kernel: str, cfg: tuple[int, int, int, int, bool]) -> str:
    bm, bn, w, s, ws = cfg
    return f"{kernel}-{bm}x{bn}-w{w}-s{s}" + ("-ws" if ws else "")


def variants() -> dict[str, tuple[str, tuple[int, int, int, int, bool]]]:
    return {variant_name(kern, (*shape, ws)): (kern, (*shape, ws))
            for kern, shapes in SHAPES.items() for shape in shapes for ws in (False, True)}


def parse_variant(name: str) -> tuple[str, tuple[int, int, int, int, bool]]:
    table = variants()
    if name not in table:
        raise SystemExit(f"probe_warp_specialize: unknown variant {name!r}; accepted: "
                         + ", ".join(sorted(table)))
    return table[name]


def _flat(x: Any) -> Any:
    B, T, H, D = x.shape
    return x.reshape(B * T, H * D)


def forward(q: Any, k: Any, v: Any, scale: float, cfg: tuple) -> tuple[Any, Any]:
    """``o [B,T,H,D]`` and ``lse [B·H, T]`` (base 2) through :func:`ws_fwd_kernel`."""
    import torch
    from triton.tools.tensor_descriptor import TensorDescriptor as Desc

    bm, bn, w, s, ws = cfg
    B, T, H, D = q.shape
    o = torch.empty_like(q)
    lse = torch.empty((B * H, T), dtype=torch.float32, device=q.device)
    ws_fwd_kernel[(T // bm, B * H)](
        Desc.from_tensor(_flat(q), [bm, D]), Desc.from_tensor(_flat(k), [bn, D]),
        Desc.from_tensor(_flat(v), [bn, D]), o, lse, T, H, scale * _LOG2_E, D=D, BLOCK_M=bm,
        BLOCK_N=bn, WS=ws, num_warps=w, num_stages=s)
    return o, lse


def backward(do: Any, q: Any, k: Any, v: Any, o: Any, lse: Any, scale: float, dkdv: tuple,
             dq_cfg: tuple) -> tuple[Any, Any, Any]:
    """``dq, dk, dv`` through :func:`ws_dkdv_kernel` and :func:`ws_dq_kernel`."""
    import torch
    from triton.tools.tensor_descriptor import TensorDescriptor as Desc

    B, T, H, D = q.shape
    delta = (o.float() * do.float()).sum(-1).transpose(1, 2).reshape(B * H, T).contiguous()
    dq, dk, dv = (torch.empty_like(x) for x in (q, k, v))
    bm, bn, w, s, ws = dkdv
    ws_dkdv_kernel[(T // bn, B * H)](
        Desc.from_tensor(_flat(q), [bm, D]), Desc.from_tensor(_flat(do), [bm, D]),
        Desc.from_tensor(_flat(k), [bn, D]), Desc.from_tensor(_flat(v), [bn, D]),
        Desc.from_tensor(lse, [1, bm]), Desc.from_tensor(delta, [1, bm]), dk, dv, T, H,
        scale * _LOG2_E, scale, D=D, BLOCK_M=bm, BLOCK_N=bn, WS=ws, num_warps=w, num_stages=s)
    bm, bn, w, s, ws = dq_cfg
    ws_dq_kernel[(T // bm, B * H)](
        Desc.from_tensor(_flat(q), [bm, D]), Desc.from_tensor(_flat(do), [bm, D]),
        Desc.from_tensor(_flat(k), [bn, D]), Desc.from_tensor(_flat(v), [bn, D]), lse, delta,
        dq, T, H, scale * _LOG2_E, scale, D=D, BLOCK_M=bm, BLOCK_N=bn, WS=ws, num_warps=w,
        num_stages=s)
    return dq, dk, dv


def reference(q: Any, k: Any, v: Any, do: Any) -> tuple[Any, ...]:
    """o, dq, dk, dv of causal attention in float64 (attnplug's test reference)."""
    from attnplug.ops.attention import naive_causal_attention

    leaves = [x.detach().double().requires_grad_() for x in (q, k, v)]
    o = naive_causal_attention(*leaves)
    o.backward(do.double())
    return (o.detach(), *(x.grad for x in leaves))


def run_variant(kernel: str, cfg: tuple, B: int, T: int, H: int, D: int, device: str,
                dtype: Any) -> dict[str, float]:
    """Largest error of the probed kernel's outputs against float64, relative to each
    reference's largest magnitude (the other kernels of the pass as ``PARTNER`` says)."""
    import torch

    gen = torch.Generator(device="cpu").manual_seed(0)
    q, k, v, do = (torch.randn(B, T, H, D, generator=gen).to(device, dtype) for _ in range(4))
    ref = dict(zip(("o", "dq", "dk", "dv"), reference(q, k, v, do), strict=True))
    scale = D ** -0.5
    fwd_cfg = cfg if kernel == "fwd" else (128, 64, 8, 3, False)
    o, lse = forward(q, k, v, scale, fwd_cfg)
    got = {"o": o}
    if kernel != "fwd":
        partner = PARTNER[kernel][1]
        dkdv, dq_cfg = (cfg, partner) if kernel == "dkdv" else (partner, cfg)
        got["dq"], got["dk"], got["dv"] = backward(do, q, k, v, o, lse, scale, dkdv, dq_cfg)
    if device == "cuda":
        torch.cuda.synchronize()
    return {name: ((x.double() - ref[name]).abs().max() / ref[name].abs().max()).item()
            for name, x in got.items()}


def compile_only(arch: int) -> list[dict[str, Any]]:
    """Compile every variant for ``sm_<arch>``: warp-specialized regions, registers, spills."""
    from ptxas_report import ptxas_info
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernels = {"fwd": ws_fwd_kernel, "dkdv": ws_dkdv_kernel, "dq": ws_dq_kernel}
    rows = []
    for name, (kern, (bm, bn, w, s, ws)) in variants().items():
        fn = kernels[kern]
        const = {"D": 128, "BLOCK_M": bm, "BLOCK_N": bn, "WS": ws}
        sig: dict[str, str] = {}
        for arg in fn.arg_names:
            if arg in const:
                sig[arg] = "constexpr"
            elif arg in ("desc_q", "desc_do"):
                sig[arg] = f"tensordesc<bf16[{bm}, 128]>"
            elif arg in ("desc_k", "desc_v"):
                sig[arg] = f"tensordesc<bf16[{bn}, 128]>"
            elif arg in ("desc_lse", "desc_delta"):
                sig[arg] = f"tensordesc<fp32[1, {bm}]>"
            elif arg in ("LSE", "DELTA"):
                sig[arg] = "*fp32"
            elif arg in ("T", "H"):
                sig[arg] = "i32"
            elif "scale" in arg:
                sig[arg] = "fp32"
            else:  # O, DK, DV, DQ
                sig[arg] = "*bf16"
        source = ASTSource(fn=fn, signature=sig, constexprs={
            (fn.arg_names.index(k),): v for k, v in const.items()})
        try:
            compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                                      options={"num_warps": w, "num_stages": s})
        except Exception as exc:  # the pass's failures are what this probe reports
            rows.append({"variant": name, "status": "compile error",
                         "detail": str(exc).strip().splitlines()[-1][:200]})
            continue
        regions = compiled.asm["ttgir"].count("ttg.warp_specialize(")
        rows.append({"variant": name, "status": "compiled", "regions": regions,
                     "warps": compiled.metadata.num_warps,
                     **ptxas_info(compiled.asm["ptx"], arch)})
    return rows


def probe(limit: float, out: Path | None) -> list[dict[str, Any]]:
    """Every variant in a process of its own with a time limit."""
    rows = []
    for name in variants():
        started = time.time()
        try:
            done = subprocess.run([sys.executable, __file__, "--one", name],
                                  capture_output=True, text=True, timeout=limit)
        except subprocess.TimeoutExpired:
            row = {"variant": name, "status": "hang", "detail": f"over {limit:.0f} s"}
        else:
            lines = done.stdout.strip().splitlines()
            if done.returncode == 0 and lines:
                errors = json.loads(lines[-1])
                bad = [k for k, e in errors.items() if not e <= 2e-2]  # NaN fails too
                row = {"variant": name, "status": "wrong" if bad else "ok", "errors": errors}
            else:
                tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
                row = {"variant": name, "status": "compile error" if "PassManager" in
                       done.stderr or "CompilationError" in done.stderr else "error",
                       "detail": tail[:200]}
        row["seconds"] = round(time.time() - started, 1)
        print(json.dumps(row), flush=True)
        rows.append(row)
        if out is not None:
            (out / "probe.json").write_text(json.dumps(rows, indent=1))
    return rows


def time_ok(rows: list[dict[str, Any]], out: Path | None) -> None:
    """The ``ok`` variants against the served kernels and SDPA at B=8, T=4096."""
    import torch
    import torch.nn.functional as F
    from attnplug_triton.ops.attention import fused
    from harness import Bench

    B, T, H, D = 8, 4096, 16, 128
    scale = D ** -0.5
    q, k, v, do = (torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16)
                   for _ in range(4))

    def sdpa() -> Any:
        return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                              v.transpose(1, 2), is_causal=True)

    o, lse = fused.attention_forward(q, k, v, scale)
    bench = Bench("probe-warp-specialize", anchor="served", out=out)
    good = [parse_variant(r["variant"]) + (r["variant"],) for r in rows if r["status"] == "ok"]
    fwd = {"served": lambda: fused.attention_forward(q, k, v, scale), "sdpa-default": sdpa}
    bwd = {"served": lambda: fused.attention_backward(do, q, k, v, o, lse, scale)}
    for kern, cfg, name in good:
        if kern == "fwd":
            fwd[name] = lambda cfg=cfg: forward(q, k, v, scale, cfg)
        else:
            partner = PARTNER[kern][1]
            pair = (cfg, partner) if kern == "dkdv" else (partner, cfg)
            bwd[name] = lambda pair=pair: backward(do, q, k, v, o, lse, scale, *pair)
    bench.measure(f"T={T} forward", fwd)
    bench.measure(f"T={T} backward", bwd)
    bench.report()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--compile-only", action="store_true",
                        help="compile for --arch without a GPU and report the IR")
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("--one", metavar="VARIANT", help=argparse.SUPPRESS)
    parser.add_argument("--limit", type=float, default=30.0,
                        help="seconds a variant's process may take (default 30)")
    parser.add_argument("--time", action="store_true", help="time the variants that are ok")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
    if args.compile_only:
        rows = compile_only(args.arch)
        for row in rows:
            print(json.dumps(row))
        if args.out is not None:
            (args.out / "compile.json").write_text(json.dumps(rows, indent=1))
        return 0
    if args.one:
        import torch

        kern, cfg = parse_variant(args.one)
        on_cpu = os.environ.get("TRITON_INTERPRET") == "1"
        device, dtype = ("cpu", torch.float16) if on_cpu else ("cuda", torch.bfloat16)
        T = 256 if on_cpu else 1024
        print(json.dumps(run_variant(kern, cfg, 1 if on_cpu else 2, T, 2 if on_cpu else 16,
                                     128, device, dtype)))
        return 0
    import torch

    if not torch.cuda.is_available():
        print("probe_warp_specialize: no CUDA device (use --compile-only)", file=sys.stderr)
        return 1
    rows = probe(args.limit, args.out)
    if args.time:
        time_ok(rows, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
