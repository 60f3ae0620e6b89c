"""Float32 atomic accumulation two elements at a time (``red.global.add.v2.f32``, sm_90+).

Triton's ``tl.atomic_add`` issues one scalar reduction per element (``REDG.E.ADD.F32`` in the
SASS). A dot product's result tile holds each thread's elements in pairs of adjacent columns,
so two neighbouring float32 additions can go out as one 8-byte vector reduction
(``REDG.E.ADD.F32x2``): half the atomic instructions and L2 transactions. :func:`red_add_pairs`
does that with inline PTX and checks, pair by pair at run time, that the two addresses really
are adjacent and 8-byte aligned, falling back to two scalar reductions otherwise — correct for
any layout Triton gives the tile, fast for the usual one.

Not for the interpreter (no inline PTX there): callers keep ``tl.atomic_add`` behind a
``constexpr`` switch and use this on a GPU only.
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["red_add_pairs"]


@triton.jit
def red_add_pairs(ptrs, values, mask):
    """``*ptrs += values`` where ``mask`` (float32 destinations; relaxed, GPU scope), in pairs
    of consecutive elements. Returns a dummy int32 tensor (the reductions are the effect)."""
    return tl.inline_asm_elementwise(
        asm="""{
        .reg .pred m0, m1, vec, s0, s1;
        .reg .b64 gap, low;
        setp.ne.b32 m0, $6, 0;
        setp.ne.b32 m1, $7, 0;
        sub.s64 gap, $3, $2;
        and.b64 low, $2, 7;
        setp.eq.s64 vec, gap, 4;
        @vec setp.eq.s64 vec, low, 0;
        and.pred vec, vec, m0;
        and.pred vec, vec, m1;
        @vec red.relaxed.gpu.global.add.v2.f32 [$2], {$4, $5};
        not.pred vec, vec;
        and.pred s0, vec, m0;
        and.pred s1, vec, m1;
        @s0 red.relaxed.gpu.global.add.f32 [$2], $4;
        @s1 red.relaxed.gpu.global.add.f32 [$3], $5;
        mov.b32 $0, 0;
        mov.b32 $1, 0;
        }""",
        constraints="=r,=r,l,l,f,f,r,r",
        args=[ptrs.to(tl.uint64, bitcast=True), values.to(tl.float32), mask.to(tl.int32)],
        dtype=tl.int32, is_pure=False, pack=2)
