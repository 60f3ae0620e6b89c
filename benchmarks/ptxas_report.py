"""Registers, spills and shared memory of attnplug's Triton kernels for a GPU, without one.

Triton compiles for any NVIDIA target on a machine without a GPU, and its wheel ships ``ptxas``;
``ptxas -v`` then says how many registers a kernel uses and how many bytes a thread spills to
local memory — the first thing to look at when a kernel is slower than its byte or FLOP count
says (session 4 found the flash attention forward's spills this way). Results depend on the
Triton version: match the GPU machine's (3.6 there; ``python -m venv /tmp/t36 &&
/tmp/t36/bin/pip install triton==3.6.0 numpy torch==2.13.0``).

    python benchmarks/ptxas_report.py                    # every kernel below, sm_90
    python benchmarks/ptxas_report.py --only attention   # names containing one of these
    python benchmarks/ptxas_report.py --arch 100         # another target

Each row: kernel, constexprs and launch configuration, registers per thread, spill stores /
loads (bytes per thread), shared memory (bytes per program), how many programs an sm_90
SM holds at once (:func:`programs_per_sm`), and a digest of the PTX without its debug lines
(:func:`ptx_digest`: the same before and after a refactor means the same kernel). Integer
arguments are compiled as Triton's launcher specialises them at the project shape (multiples
of 16; GROUP = 1): without that, session 4–10's reports showed row loads neither vectorised
nor pipelined, more spills and less shared memory than the GPU runs.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import inspect
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "plugins" / "triton")]

GDN = "attnplug_triton.ops.gated_delta_rule"
ATTN = "attnplug_triton.ops.attention.kernels"
CONV = "attnplug_triton.ops.conv.fused"
# pointers to float32 and int32 (every other pointer argument is bfloat16)
F32_PTRS = {"g_ptr", "beta_ptr", "rq_ptr", "rk_ptr", "y_ptr", "dg_ptr", "dbeta_ptr", "ht_ptr",
            "h0_ptr", "dht_ptr", "dh0_ptr", "dvl_ptr", "LSE", "DELTA", "dw_ptr", "dkp_ptr"}
I32_PTRS = {"chunk_seq", "cu", "chunk_off"}
FLOATS = {"scale", "qk_scale", "softmax_scale"}
ATTN_PTRS = {"Q", "K", "V", "O", "LSE", "DO", "DELTA", "DK", "DV_OUT", "DQ"}

# the short convolution's blocks (BT rows, BC channels) and warps (the autotuner's and 64 × 4,
# which spills)
CONV_BLOCKS = [(dict(BT=64, BC=bc), w, 3) for bc, w in ((128, 8), (64, 8), (64, 4), (32, 4))]
# GROUP (value heads per key head) is 1 at the project shape, and Triton's launcher turns an
# integer argument equal to 1 into a constant
GDN_DIMS = dict(DK=128, DV=128, BK=128, USE_L2NORM=True, PRECISION="tf32", GROUP=1)
ATTN_DIMS = dict(D=128, DV=128, BLOCK_D=128, BLOCK_DV=128, GROUP=1, PRECISION="tf32")
# (label, module, kernel, constexprs, [(meta, warps, stages), ...]): the configurations the
# autotuners choose from at head dim 128, bf16
CASES: list[tuple[str, str, str, dict[str, Any], list[tuple[dict[str, Any], int, int]]]] = [
    ("attention fwd", ATTN, "attention_fwd_kernel", ATTN_DIMS,
     [(dict(BLOCK_M=128, BLOCK_N=64), 8, 3), (dict(BLOCK_M=128, BLOCK_N=128), 8, 2),
      (dict(BLOCK_M=128, BLOCK_N=64), 4, 3), (dict(BLOCK_M=64, BLOCK_N=64), 4, 3)]),
    ("attention dkdv", ATTN, "attention_bwd_dkdv_kernel", ATTN_DIMS,
     [(dict(BLOCK_M=32, BLOCK_N=128), 4, 3), (dict(BLOCK_M=64, BLOCK_N=128), 8, 3),
      (dict(BLOCK_M=64, BLOCK_N=64), 4, 3), (dict(BLOCK_M=32, BLOCK_N=128), 8, 3)]),
    ("attention dq", ATTN, "attention_bwd_dq_kernel", ATTN_DIMS,
     [(dict(BLOCK_M=128, BLOCK_N=32), 4, 3), (dict(BLOCK_M=128, BLOCK_N=64), 8, 3),
      (dict(BLOCK_M=64, BLOCK_N=64), 4, 3)]),
    # the same kernels with their loop tiles through tensor descriptors (TENSOR_DESCRIPTORS)
    ("attention fwd desc", ATTN, "attention_fwd_kernel", {**ATTN_DIMS, "KV_DESC": True},
     [(dict(BLOCK_M=128, BLOCK_N=64), 8, 3), (dict(BLOCK_M=128, BLOCK_N=128), 8, 2)]),
    ("attention dkdv desc", ATTN, "attention_bwd_dkdv_kernel", {**ATTN_DIMS, "QO_DESC": True},
     [(dict(BLOCK_M=32, BLOCK_N=128), 4, 3), (dict(BLOCK_M=64, BLOCK_N=128), 8, 3),
      (dict(BLOCK_M=64, BLOCK_N=64), 4, 3), (dict(BLOCK_M=32, BLOCK_N=128), 8, 3)]),
    ("attention dq desc", ATTN, "attention_bwd_dq_kernel", {**ATTN_DIMS, "KV_DESC": True},
     [(dict(BLOCK_M=128, BLOCK_N=32), 4, 3), (dict(BLOCK_M=128, BLOCK_N=64), 8, 3),
      (dict(BLOCK_M=64, BLOCK_N=64), 4, 3)]),
    ("gdn kkt_solve", f"{GDN}.kkt_solve", "kkt_solve_kernel", GDN_DIMS,  # series (K > 128)
     [({}, w, s) for w in (2, 4) for s in (1, 2)]),
    ("gdn chunk_fwd_h", f"{GDN}.chunk_h", "chunk_fwd_h_kernel",
     {**GDN_DIMS, "HAS_H0": True, "OUTPUT": True, "STORE_H": False, "STORE_FINAL": True,
      "PARALLELISM": 1, "vn_ptr": None},
     [(dict(BV=bv), w, 2) for bv in (32, 64) for w in (4, 8)]),
    ("gdn chunk_fwd_h lean", f"{GDN}.chunk_h", "chunk_fwd_h_kernel",  # chunk.LEAN_WALK
     {**GDN_DIMS, "HAS_H0": True, "OUTPUT": True, "STORE_H": False, "STORE_FINAL": True,
      "PARALLELISM": 1, "LEAN": True, "vn_ptr": None},
     [(dict(BV=bv), w, 2) for bv in (32, 64) for w in (4, 8)]),
    *[(f"gdn chunk_fwd_h states lean{' vnew' if vn else ''}", f"{GDN}.chunk_h",
       "chunk_fwd_h_kernel",  # the backward's state walk
       {**GDN_DIMS, "HAS_H0": True, "OUTPUT": False, "STORE_H": True, "STORE_FINAL": False,
        "PARALLELISM": 1, "LEAN": True, "STORE_VNEW": vn, **({} if vn else {"vn_ptr": None})},
       [(dict(BV=bv), w, 2) for bv in (32, 64) for w in (4, 8)]) for vn in (False, True)],
    ("gdn kkt_solve tf32x3", f"{GDN}.kkt_solve", "kkt_solve_kernel",  # INVERSE_PRECISION
     {**GDN_DIMS, "INV_PRECISION": "tf32x3"}, [({}, w, s) for w in (2, 4) for s in (1, 2)]),
    ("gdn kkt_solve subst", f"{GDN}.kkt_solve", "kkt_solve_kernel",  # served up to K = 128
     {**GDN_DIMS, "SUBSTITUTION": True}, [({}, w, s) for w in (2, 4) for s in (1, 2)]),
    ("gdn chunk_bwd_dh", f"{GDN}.chunk_h", "chunk_bwd_dh_kernel",
     {**GDN_DIMS, "HAS_DHT": True, "STORE_DH0": True, "STORE_Y": True, "DV_LOCAL": True,
      "PARALLELISM": 1},  # as served (chunk.DV_FROM_DH, chunk.LOCAL_DV)
     [(dict(BV=bv), w, 2) for bv in (32, 64) for w in (4, 8)]),
    *[(f"gdn chunk_bwd pass {p}", f"{GDN}.chunk_bwd", "chunk_bwd_kernel",
       {**GDN_DIMS, "FINALIZE": True, "PASS": p, "CLOSE_DP": False, "vn_ptr": None},
       [(dict(BV=bv), w, 2) for bv in (32, 64) for w in (4, 8)]) for p in (0, 1, 2, 3, 4)],
    # chunk.DM_FROM_Y: the dq pass with the dPᵀ terms, then the WY passes (two, or one)
    *[(f"gdn chunk_bwd pass 0 close_dp{' vnew' if vn else ''}", f"{GDN}.chunk_bwd",
       "chunk_bwd_kernel", {**GDN_DIMS, "FINALIZE": True, "PASS": 0, "CLOSE_DP": True,
                            "VNEW": vn, **({} if vn else {"vn_ptr": None})},
       [(dict(BV=bv), w, 2) for bv in (32, 64) for w in (4, 8)]) for vn in (False, True)],
    *[(f"gdn chunk_bwd_wy {label}{' vnew' if vn else ''}", f"{GDN}.chunk_bwd_wy",
       "chunk_bwd_wy_kernel", {**GDN_DIMS, "FINALIZE": True, "STATS": stats, "SUM": total,
                               "VNEW": vn, **({} if vn else {"vn_ptr": None})},
       [(dict(BV=bv), w, 2) for bv in (32, 64) for w in (4, 8)])
      for label, stats, total in (("stats", True, False), ("sum", False, True),
                                  ("one pass", True, True)) for vn in (False, True)],
    ("conv fwd", CONV, "causal_conv1d_fwd_kernel", dict(K=4, HAS_STATE=False, SILU=True),
     CONV_BLOCKS),
    ("conv dpre", CONV, "causal_conv1d_dpre_kernel", dict(K=4, HAS_STATE=False), CONV_BLOCKS),
    ("conv bwd", CONV, "causal_conv1d_bwd_kernel", dict(K=4, HAS_STATE=False, SILU=True),
     [(dict(BT=16, BC=64), 4, 3)]),
    ("conv bwd 2nd pass", CONV, "causal_conv1d_bwd_kernel", dict(K=4, HAS_STATE=False,
                                                                 SILU=False), CONV_BLOCKS),
]


def signature(kernel: Any, constexprs: dict[str, Any]) -> tuple[dict, dict]:
    """Triton's signature and pointer-alignment attributes for ``kernel``'s arguments."""
    sig, attrs = {}, {}
    for i, name in enumerate(kernel.arg_names):
        if name in constexprs:
            sig[name] = "constexpr"
        elif constexprs.get("KV_DESC") and name in ("K", "V"):  # blocks of BLOCK_N keys
            width = constexprs["BLOCK_D" if name == "K" else "BLOCK_DV"]
            sig[name] = f"tensordesc<bf16[1, {constexprs['BLOCK_N']}, 1, {width}]>"
        elif constexprs.get("QO_DESC") and name in ("Q", "DO"):  # BLOCK_M packed rows
            width = constexprs["BLOCK_D" if name == "Q" else "BLOCK_DV"]
            group = constexprs["GROUP"]
            sig[name] = (f"tensordesc<bf16[1, {constexprs['BLOCK_M'] // group}, {group}, "
                         f"{width}]>")
        elif name in I32_PTRS or name in ATTN_PTRS or name.endswith("_ptr"):
            sig[name] = ("*i32" if name in I32_PTRS else "*fp32" if name in F32_PTRS
                         else "*bf16")
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in FLOATS:
            sig[name] = "fp32"
        else:  # as Triton's launcher specialises them: every integer at the project shape
            sig[name] = "i32"  # (strides, head counts) is a multiple of 16 — without it no
            attrs[(i,)] = [["tt.divisibility", 16]]  # row load is vectorised or pipelined
    return sig, attrs


def ptxas_info(ptx: str, arch: int) -> dict[str, int]:
    """Registers and spill bytes per thread from ``ptxas -v``."""
    import triton

    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.ptx")
        Path(path).write_text(ptx)
        target = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
        done = subprocess.run([str(ptxas), f"-arch={target}", "-v", path, "-o", os.devnull],
                              capture_output=True, text=True)
    text = done.stderr + done.stdout
    if not re.search(r"Used \d+ registers", text):
        raise RuntimeError(f"ptxas printed no register count: {text.strip()[:200]!r}")
    grab = lambda pattern: int(m.group(1)) if (m := re.search(pattern, text)) else 0  # noqa: E731
    return {"registers": grab(r"Used (\d+) registers"),
            "spill_stores": grab(r"(\d+) bytes spill stores"),
            "spill_loads": grab(r"(\d+) bytes spill loads")}


def ptx_digest(ptx: str) -> str:
    """A short hash of ``ptx`` without its debug information (``.loc``/``.file`` lines, comments,
    the debug sections), so that a change that moves source lines but compiles to the same
    instructions keeps it: print the report before and after a refactor of a served kernel and
    compare. Labels stay in: session 13's ``chunk_rows`` helper compiled to the same
    instructions but added a debug label, which moved ptxas's allocation of a served pass; its
    digest changes, as it should."""
    body = ptx.split(".section\t.debug")[0]
    kept = [line for line in body.splitlines()
            if not line.strip().startswith((".loc", ".file", "//"))]
    return hashlib.sha1("\n".join(kept).encode()).hexdigest()[:10]


def programs_per_sm(registers: int, shared: int, warps: int) -> int:
    """How many programs of a kernel an sm_90 SM holds at once: 64K registers (allocated per
    warp in units of 256), 228 KB of shared memory (1 KB of it reserved per program), 64
    warps. A sequential kernel whose grid is not a multiple of SMs × this runs in more waves
    than its programs need (the gated delta rule's state walks, session 11)."""
    by_registers = 65536 // (-(-registers * 32 // 256) * 256 * warps)
    by_shared = 233472 // (shared + 1024)
    return min(by_registers, by_shared, 64 // warps)


def compile_case(module: str, name: str, constexprs: dict[str, Any], meta: dict[str, Any],
                 warps: int, stages: int, arch: int) -> dict[str, int]:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel = getattr(importlib.import_module(module), name)
    const = {k: v for k, v in {**constexprs, **meta}.items() if k in kernel.arg_names}
    for param in inspect.signature(kernel.fn).parameters.values():  # left at their defaults:
        if param.name in const or param.default is inspect._empty:
            continue
        if param.default is None or "constexpr" in str(param.annotation):  # constexprs and
            const[param.name] = param.default  # optional tensors (None)
    sig, attrs = signature(kernel, const)
    source = ASTSource(fn=kernel, signature=sig, attrs=attrs,
                       constexprs={(kernel.arg_names.index(k),): v for k, v in const.items()})
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": warps, "num_stages": stages})
    return {**ptxas_info(compiled.asm["ptx"], arch), "shared": compiled.metadata.shared,
            "digest": ptx_digest(compiled.asm["ptx"])}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability ×10 (90)")
    parser.add_argument("--only", nargs="+", default=[], help="labels containing one of these")
    args = parser.parse_args(argv)
    os.environ.pop("TRITON_INTERPRET", None)  # compile, do not interpret
    import triton

    print(f"Triton {triton.__version__}, sm_{args.arch}; registers / spill stores / spill "
          f"loads per thread, shared memory per program")
    failed = False
    for label, module, name, constexprs, configs in CASES:
        if args.only and not any(word in label for word in args.only):
            continue
        for meta, warps, stages in configs:
            where = f"{label:22} {meta} warps={warps} stages={stages}"
            try:
                r = compile_case(module, name, constexprs, meta, warps, stages, args.arch)
            except Exception as exc:  # one kernel failing to compile must not stop the report
                failed = True
                print(f"{where}: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}")
                continue
            fit = programs_per_sm(r["registers"], r["shared"], warps)
            print(f"{where:60} {r['registers']:4d} regs  spills {r['spill_stores']:5d} / "
                  f"{r['spill_loads']:5d} B  shared {r['shared']:6d} B  {fit} a SM  "
                  f"ptx {r['digest']}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
