"""The chunked gated delta rule through Triton, forward and backward.

``chunk_gated_delta_rule`` computes the same function as
:func:`attnplug.ops.chunk_gated_delta_rule` (DESIGN §8, flash-linear-attention's conventions) with
chunks of 64 tokens and the WY representation inside a chunk. Five stages, each reading its
inputs once and writing only what a later stage cannot rebuild in registers:

1. ``kkt_solve_kernel`` (:mod:`.kkt_solve`), forward: k, g, β (and q) → ``A`` (64 values per
   token and value head, in the inputs' dtype) and, with ``use_qk_l2norm``, q's and k's inverse
   norms.
2. ``chunk_fwd_h_kernel`` (:mod:`.chunk_h`), forward: q, k, v, g, β, A → o and the final state.
3. ``chunk_fwd_h_kernel`` again in the backward (``STORE_H``): k, v, g, β, A → the state at the
   start of every chunk.
4. ``chunk_bwd_dh_kernel`` (:mod:`.chunk_h`), backward: q, k, g, β, A, dO → the gradient of the
   state after every chunk, and of the initial state.
5. ``chunk_bwd_kernel`` (:mod:`.chunk_bwd`), backward: q, k, v, g, β, A, dO and the states →
   dq (and the ``dPᵀ`` terms of dk and dg); then ``chunk_bwd_wy_kernel``
   (:mod:`.chunk_bwd_wy`) with the states' gradients and ``Y = Aᵀ dV_new`` (stored by stage 4)
   → dk, dg, dβ, the WY gradient taken as ``dM = −Y V_newᵀ`` (``dm_from_y``; without it, and
   above ``WY_MAX_DIM``, chunk_bwd's dk passes accumulate ``dA`` instead).

With ``split_output`` the forward's stage 2 only stores the chunk states (as stage 3 does) and
``chunk_fwd_o_kernel`` (:mod:`.chunk_o`) writes the output from them, all chunks in parallel;
``keep_states`` skips stage 3; ``dv_from_dh`` has stage 4 write dv (one pass of stage 5 fewer);
``local_dv`` moves stage 4's within-chunk term to a parallel kernel (:mod:`.chunk_dv`);
``overlap_walks`` runs stage 3 on a second CUDA stream alongside stage 4 (and the local dv),
which do not read the states.

Fused away compared with flash-linear-attention 0.6's eight-plus kernels: the q/k L2 norm (the
norms come from stage 1; q and k enter every dot as loaded and the norms scale rows and columns
of the products; the norm's backward is in stage 5), the gate cumsum (``tl.cumsum`` in each
kernel), ``w`` and ``u`` (``U − W h`` is computed as ``A(β⊙V − β⊙e^γ⊙K̂ h)``, never stored),
``v_new`` (never stored, unless ``store_v_new`` asks the backward's state walk to), the
per-chunk states in the forward (only the backward writes them) and
the separate output kernel (the state kernel writes o). Saved for the backward: the inputs,
``A`` and the norms; the per-chunk states are recomputed in the backward rather than kept from
the forward, which keeps activation memory at the inputs plus ``A`` (``keep_states`` keeps them
instead).

State ``h`` is float32 in registers; the per-chunk states stored for the backward and the dot
operands are in the inputs' dtype (float32 inputs: float32 with TF32×3 dots), except the
float32 tiles named below. float16, bfloat16 or float32 inputs; K and V up to 256; grouped value
heads (key head ``h`` serves value heads ``h·G … h·G + G − 1``); ``cu_seqlens`` packing (B = 1).

How the Hopper miscompilation of Triton 3.4–3.7.0 (a dot result cast to 16 bits and transposed
into another dot with 64-wide blocks, which broke fla's dk/dβ) is avoided: no kernel transposes a
16-bit dot result. The forward and the dh kernel transpose only tiles loaded from memory (and
build ``Pᵀ`` as ``K qᵀ`` instead of transposing ``P``); the backward's last kernels transpose
only float32 dot results (``dP``, the WY term ``S``; ``X`` for ``dA`` in the dA passes), which
feed float32 dots, and load ``Yᵀ`` transposed from memory. ``benchmarks/gpu_check_gdn.py``
checks every block configuration of every kernel on the GPU.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from attnplug_triton.ops.gated_delta_rule.chunk_bwd import chunk_bwd
from attnplug_triton.ops.gated_delta_rule.chunk_dv import chunk_bwd_dv_local
from attnplug_triton.ops.gated_delta_rule.chunk_h import FEW_PROGRAMS, chunk_bwd_dh, chunk_fwd_h
from attnplug_triton.ops.gated_delta_rule.chunk_o import chunk_fwd_o
from attnplug_triton.ops.gated_delta_rule.common import (
    Sequences,
    check_args,
    precision,
    token_major,
)
from attnplug_triton.ops.gated_delta_rule.kkt_solve import (
    DIAGONAL_INVERSES,
    INVERSE_PRECISIONS,
    kkt_solve,
)

__all__ = ["chunk_gated_delta_rule", "run_chunk", "ChunkGatedDeltaRuleFunction", "SPLIT_OUTPUT",
           "KEEP_STATES", "DV_FROM_DH", "LOCAL_DV", "FUSED_GROUP_GRADS", "SPLIT_DK",
           "LEAN_WALK", "DM_FROM_Y", "WY_MAX_DIM", "STORE_V_NEW", "OVERLAP_WALKS",
           "OVERLAP_MAX_PAIRS", "overlaps_walks",
           "splits_output", "dk_passes", "side_stream"]

# The forward's default: False writes the output inside the sequential state kernel (stage 2);
# True lets that kernel only store the chunk states and computes the output from them in a
# parallel kernel (:mod:`.chunk_o`); None (since session 7) splits when the launch has fewer
# than ``chunk_h.FEW_PROGRAMS`` sequence·value-head pairs. Same values. On the H200 (64K tokens,
# HV = 16, K = V = 128, bf16): split forward 2.54 vs 2.94 ms at B = 2 × T = 32K (32 pairs),
# 3.48 vs 5.13 at B = 1 × 64K (16 pairs); no gain at 128 pairs or more (1.083 vs 1.077 at
# B = 8 × 4K; 2.08 vs 2.00 at B = 32 × 2K) — bench_gated_delta_rule.py, rows triton and
# triton-split.
SPLIT_OUTPUT: bool | None = None
# The backward's default: False recomputes the chunk states (one more pass of the state kernel;
# activation memory stays the inputs plus A); True keeps the forward's, in the inputs' dtype —
# ``tokens / 64 · HV · K · V`` elements per call, more than q, k and v together at K = V = 128.
KEEP_STATES = False
# The backward's dv: False computes ``Aᵀ dV_new`` and dv in a pass of chunk_bwd_kernel of their
# own; True has the dh kernel (which computes ``Aᵀ dV_new`` on its way anyway) store them, and
# that pass is skipped. True since session 5: on the H200 it was right at every configuration
# of its kernels (K = V = 32 and 128) and at the project shape, and 2.8% faster forward and
# backward (5.205 → 5.060 ms), with no more memory (the same float32 scratch).
DV_FROM_DH = True
# The dh kernel's within-chunk term ``Pᵀ dO``: False computes it on the sequential path; True
# reads it from a parallel kernel (:mod:`.chunk_dv`), float32 ``[tokens, HV, V]`` in between.
# True since session 8, with SPLIT_DK (below): see there.
LOCAL_DV = True
# With grouped value heads (HV > H): False sums dq, dk over each group and applies the L2 norm's
# backward in torch (about a dozen passes over [tokens, H, K] float32 each); True does it in one
# kernel (:mod:`.group_grads`). True since session 6: right on the H200 at the GPU-sized
# example's heads (T=4096, H=16, HV=32, K=V=128, bf16 against float64).
FUSED_GROUP_GRADS = True
# The backward's dk: False in one pass of chunk_bwd_kernel (which spills 1–2 KB a thread on
# sm_90 at every configuration); True in two (dg, dβ and dk's closing terms, then dk's loop
# terms), each with fewer live tiles, V_new recomputed once more and a float32 [tokens, HV, K]
# scratch between them. True since session 8, with LOCAL_DV: on the H200 (Triton 3.6, bf16)
# both together were right at every configuration the autotuner may pick at K = V = 16, 32,
# 64 and 128 (gpu_check_gdn.py --parts probe --probe-variants local_dv split_dk; BV = 32 at
# K = 32 miscompiles in the split passes and is pruned, chunk_bwd._MISCOMPILED_SPLIT_DK), and
# faster forward and backward at 64K tokens a step, HV = 16, K = V = 128 (bench_gated_delta_rule
# --parts scaling): 9.53 vs 10.40 ms at B = 16 × 4K, 10.69 vs 12.26 at 2 × 32K, 13.67 vs 16.79
# at 1 × 64K (either alone: 10.13 / 9.81, 11.29 / 11.68, 14.26 / 16.11).
# None since session 13: one pass with DM_FROM_Y (below; one WY pass measured faster than two,
# 3.817 vs 3.877 ms), two without it.
SPLIT_DK: bool | None = None
# The state walk's formulation (chunk_h.chunk_fwd_h_kernel's LEAN): False as before; True
# orders the same products so that the walk needs 115,456 instead of 116,224 bytes of shared
# memory at K = V = 128, BV = 64, four warps, two stages — two programs a sm_90 SM instead of
# one, so 128 sequence·value-head pairs (B = 8, HV = 16) walk in one wave instead of two.
# Found on the CPU in session 11 (benchmarks/ptxas_report.py). True since session 12: on the
# H200 (Triton 3.6, bf16) right against float64 at the project shape and with every chunk_h
# configuration at K = V = 64 and 128 (gpu_check_gdn.py --parts probe --probe-variants
# lean_walk ...), the walk alone 0.366 instead of 0.631 ms (probe_gdn_walks.py), the forward
# at B = 8, T = 4096, H = 16, K = V = 128 0.695 instead of 1.010 ms (fla 1.002 ms) and
# forward+backward 4.453 instead of 4.745 ms (benchmarks/results/2026-11-28-h200-session12.md).
LEAN_WALK = True
# The backward's dk, dg and dβ: False through dA (``chunk_bwd``'s dk passes: dV_new rebuilt,
# dA accumulated, dM = −Aᵀ dA Aᵀ); True from the stored Y = Aᵀ dV_new as dM = −Y V_newᵀ
# (:mod:`.chunk_bwd_wy`; two passes with SPLIT_DK, else one), the dq pass adding the dPᵀ
# terms. Same values. True since session 13: on the H200 (Triton 3.6, bf16) right against
# float64 at the project shape (dg 4.3e-3, the rest as before) and at every configuration the
# autotuner may pick at K = V = 16, 32, 64, 128 (gpu_experimental.sh gdn-wy-probe; two at
# K = 32 miscompile and are pruned, chunk_bwd._MISCOMPILED_WY), and forward+backward at
# B = 8, T = 4096, H = 16, K = V = 128 in 3.817 ms in one pass, 3.877 in two, against 4.455
# through dA (SDPA's cuDNN attention 3.898; benchmarks/results/2026-11-28-h200-session13.md).
# Served up to WY_MAX_DIM: at K = V = 256 its kernels fault on the H200 (illegal memory
# access; the dA passes run right there), so larger head dims take the dA passes.
DM_FROM_Y = True
WY_MAX_DIM = 128
# With DM_FROM_Y and recomputed states: False has the dq and WY passes compute V_new = A X per
# value block again (two products in the dq pass, one in the WY pass); True has the backward's
# state walk, which computes it anyway, store it (the inputs' dtype, [tokens, HV, V], freed
# after the backward) and those passes read it. Same values to rounding. Found on the CPU in
# session 13 (ptxas, sm_90: the dq pass 228 → 120 B of spills at BV 64 / 4 warps and 88 → 64
# KB of shared memory, the one WY pass 356 → 232 B at BV 32 / 4 warps; the walk unchanged in
# shared memory, 247 → 254 registers). Off: on the H200 with Triton 3.6 (session 14,
# benchmarks/results/2026-11-28-h200-session14.md) at K = V = 128 the one WY pass reading it
# is wrong at BV 32 / 4 warps (dg 9e-2 against float64; the configuration it would be chosen
# for) and the walk storing it faults (illegal memory access) at 8 warps or 3 stages; right at
# K = V = 32 and 64 and under the interpreter.
STORE_V_NEW = False
# On CUDA, with recomputed states: True runs the backward's state recomputation (stage 3) on a
# second stream, concurrently with the local dv and the dh walk (stage 4), which do not read
# the states; the passes after them wait for both. The walks are latency-bound (one program per
# sequence·value head and value block), so with few pairs each leaves most of the GPU idle.
# Same kernels, same values (bit for bit on the H200 at the project shape, grouped heads and
# packed sequences). None (served) overlaps for at most OVERLAP_MAX_PAIRS sequence·value-head
# pairs (:func:`overlaps_walks`). Measured on the H200 (sessions 14–15,
# benchmarks/results/2026-11-29-h200-session15.md), forward+backward, H = 16, K = V = 128, bf16,
# 64K tokens a step, one stream against two: 16 pairs (T = 64K, B = 1) 13.81 → 11.52 ms; 32
# pairs (32K, B = 2) 9.34 → 9.58; 64 pairs (16K, B = 4) 8.42 → 8.58; 128 pairs (B = 8, T = 4K)
# 3.771 → 3.750; 1,024 pairs (1K, B = 64) 7.591 → 7.585.
OVERLAP_WALKS: bool | None = None
OVERLAP_MAX_PAIRS = 16
_SIDE_STREAMS: dict[int, torch.cuda.Stream] = {}


def side_stream(device: torch.device) -> torch.cuda.Stream:
    """The second CUDA stream of ``device`` for :data:`OVERLAP_WALKS` (made on first use)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SIDE_STREAMS:
        _SIDE_STREAMS[index] = torch.cuda.Stream(device=index)
    return _SIDE_STREAMS[index]


class ChunkGatedDeltaRuleFunction(torch.autograd.Function):
    """Autograd wrapper over token-major tensors: q, k ``[tokens, H, K]``, v ``[tokens, HV, V]``,
    float32 contiguous g, beta ``[tokens, HV]``, initial state ``[N, HV, K, V]`` or None."""

    @staticmethod
    def forward(ctx: Any, q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor,
                h0: Tensor | None, seqs: Sequences, scale: float, use_qk_l2norm: bool,
                output_final_state: bool, split_output: bool, keep_states: bool,
                dv_from_dh: bool, local_dv: bool,
                fused_group_grads: bool, split_dk: bool,
                lean_walk: bool, dm_from_y: bool, store_v_new: bool, overlap_walks: bool,
                inverse_precision: str | None,
                diagonal_inverse: str | None) -> tuple[Tensor, Tensor | None]:
        prec = precision(k.dtype)
        keep_states = keep_states and any(ctx.needs_input_grad[:6])
        a, rq, rk = kkt_solve(q, k, g, beta, seqs, use_qk_l2norm, prec, inverse_precision,
                              diagonal_inverse)
        o, states, final = chunk_fwd_h(q, k, v, g, beta, a, rq, rk, h0, seqs, scale,
                                       use_qk_l2norm, prec, output=not split_output,
                                       store_states=split_output or keep_states,
                                       final_state=output_final_state, lean=lean_walk)
        if split_output:
            o = chunk_fwd_o(q, k, v, g, beta, a, rq, rk, states, seqs, scale, use_qk_l2norm,
                            prec)
        ctx.save_for_backward(q, k, v, g, beta, a, rq, rk, h0,
                              states if keep_states else None)
        ctx.seqs, ctx.scale, ctx.use_qk_l2norm = seqs, scale, use_qk_l2norm
        ctx.dv_from_dh, ctx.local_dv = dv_from_dh, local_dv
        ctx.fused_group_grads = fused_group_grads
        ctx.split_dk, ctx.lean_walk, ctx.dm_from_y = split_dk, lean_walk, dm_from_y
        ctx.store_v_new, ctx.overlap_walks = store_v_new, overlap_walks
        ctx.set_materialize_grads(False)
        return o, final

    @staticmethod
    def backward(ctx: Any, do: Tensor | None, dht: Tensor | None) -> tuple[Tensor | None, ...]:
        q, k, v, g, beta, a, rq, rk, h0, states = ctx.saved_tensors
        seqs, scale, l2 = ctx.seqs, ctx.scale, ctx.use_qk_l2norm
        prec = precision(k.dtype)
        do = torch.zeros_like(v) if do is None else do.to(v.dtype).contiguous()
        dht = None if dht is None else dht.float().contiguous()
        v_new = None
        main = side = None
        if states is None and ctx.overlap_walks and q.is_cuda:
            # the recomputation on a second stream, once it has what the main one enqueued
            main = torch.cuda.current_stream(q.device)
            side = side_stream(q.device)
            side.wait_stream(main)
        if states is None:  # not kept by the forward: recompute them (and V_new, when wanted)
            with torch.cuda.stream(side):  # None: the current stream
                if ctx.store_v_new:
                    v_new = v.new_empty(v.shape)  # contiguous, as the kernels index it
                _, states, _ = chunk_fwd_h(q, k, v, g, beta, a, rq, rk, h0, seqs, scale, l2,
                                           prec, output=False, store_states=True,
                                           final_state=False, lean=ctx.lean_walk, v_new=v_new)
        initial_grad = h0 is not None and ctx.needs_input_grad[5]
        dv_local = (chunk_bwd_dv_local(q, k, g, beta, rq, rk, do, seqs, scale, l2, prec)
                    if ctx.local_dv else None)
        dstates, dh0, y, dv = chunk_bwd_dh(q, k, g, beta, a, rq, rk, do, dht, seqs, scale, l2,
                                           prec, initial_grad=initial_grad,
                                           store_y=ctx.dv_from_dh, dv_dtype=v.dtype,
                                           dv_local=dv_local)
        del dv_local
        if side is not None:  # join: the passes below read the states
            main.wait_stream(side)
            for t in (states, v_new):
                if t is not None:  # made on the side stream, used on the main one
                    t.record_stream(main)
        dq, dk, dv, dg, dbeta = chunk_bwd(q, k, v, g, beta, a, rq, rk, do, states, dstates,
                                          seqs, scale, l2, prec, y=y, dv=dv,
                                          fused_group_grads=ctx.fused_group_grads,
                                          split_dk=ctx.split_dk, dm_from_y=ctx.dm_from_y,
                                          v_new=v_new)
        dh0 = dh0.to(h0.dtype) if dh0 is not None else None
        return (dq, dk, dv, dg, dbeta, dh0, None, None, None, None, None, None, None, None,
                None, None, None, None, None, None, None, None)


def splits_output(pairs: int) -> bool:
    """Whether the forward computes its output in the parallel kernel by default, for a launch
    over ``pairs`` sequence·value-head pairs: :data:`SPLIT_OUTPUT` when set, else for fewer
    than ``FEW_PROGRAMS`` pairs (the sequential kernel then has too few programs to fill the
    GPU, and the parallel one has a program per chunk)."""
    return pairs < FEW_PROGRAMS if SPLIT_OUTPUT is None else bool(SPLIT_OUTPUT)


def overlaps_walks(pairs: int) -> bool:
    """Whether the backward recomputes the states on a second stream by default, for
    ``pairs`` sequence·value-head pairs: :data:`OVERLAP_WALKS` when set, else for at most
    :data:`OVERLAP_MAX_PAIRS` pairs (where the walks leave the most of the GPU idle)."""
    return pairs <= OVERLAP_MAX_PAIRS if OVERLAP_WALKS is None else bool(OVERLAP_WALKS)


def dk_passes(K: int, V: int, dm_from_y: bool | None,
              split_dk: bool | None) -> tuple[bool, bool]:
    """``(dm_from_y, split_dk)`` as the backward runs them at head dims ``K``, ``V``: the
    arguments when given, else :data:`DM_FROM_Y` up to :data:`WY_MAX_DIM` and :data:`SPLIT_DK`
    (whose ``None`` is one pass with ``dm_from_y``, two without)."""
    from_y = (DM_FROM_Y and max(K, V) <= WY_MAX_DIM) if dm_from_y is None else bool(dm_from_y)
    if split_dk is not None:
        return from_y, bool(split_dk)
    return from_y, (not from_y if SPLIT_DK is None else SPLIT_DK)


def _common_dtype(*tensors: Tensor) -> torch.dtype:
    dtypes = {x.dtype for x in tensors}
    return dtypes.pop() if len(dtypes) == 1 else torch.float32


def run_chunk(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, seqs: Sequences, *,
              scale: float | None, initial_state: Tensor | None, output_final_state: bool,
              use_qk_l2norm: bool, split_output: bool | None = None,
              keep_states: bool | None = None, dv_from_dh: bool | None = None,
              local_dv: bool | None = None, fused_group_grads: bool | None = None,
              split_dk: bool | None = None, lean_walk: bool | None = None,
              dm_from_y: bool | None = None, store_v_new: bool | None = None,
              overlap_walks: bool | None = None,
              inverse_precision: str | None = None,
              diagonal_inverse: str | None = None) -> tuple[Tensor, Tensor | None]:
    """:func:`chunk_gated_delta_rule` on arguments already checked (``seqs`` from
    :func:`~attnplug_triton.ops.gated_delta_rule.common.check_args`)."""
    B, T, H, K = q.shape
    HV, V = v.shape[2:]
    scale = K**-0.5 if scale is None else float(scale)
    if B * T == 0:
        o = v.new_zeros((B, T, HV, V))
        if not output_final_state:
            return o, None
        if initial_state is None:
            return o, q.new_zeros((seqs.num_seqs, HV, K, V), dtype=torch.float32)
        return o, initial_state.float().clone()
    dtype = _common_dtype(q, k, v)
    qt, kt, vt = (token_major(x.to(dtype)) for x in (q, k, v))  # (B·T, heads, dim)
    gt, bt = (token_major(x.float()).contiguous() for x in (g, beta))  # (B·T, HV)
    h0 = None if initial_state is None else initial_state.contiguous()
    split = (splits_output(seqs.num_seqs * HV) if split_output is None
             else bool(split_output))
    keep = KEEP_STATES if keep_states is None else bool(keep_states)
    dv_dh = DV_FROM_DH if dv_from_dh is None else bool(dv_from_dh)
    local = LOCAL_DV if local_dv is None else bool(local_dv)
    fused = FUSED_GROUP_GRADS if fused_group_grads is None else bool(fused_group_grads)
    lean = LEAN_WALK if lean_walk is None else bool(lean_walk)
    from_y, two_dk = dk_passes(K, V, dm_from_y, split_dk)
    vn = from_y and (STORE_V_NEW if store_v_new is None else bool(store_v_new))
    overlap = (overlaps_walks(seqs.num_seqs * HV) if overlap_walks is None
               else bool(overlap_walks))
    if inverse_precision is not None and inverse_precision not in INVERSE_PRECISIONS:
        raise ValueError(f"chunk_gated_delta_rule: inverse_precision={inverse_precision!r} is "
                         f"not accepted: expected None or one of {list(INVERSE_PRECISIONS)}")
    if diagonal_inverse is not None and diagonal_inverse not in DIAGONAL_INVERSES:
        raise ValueError(f"chunk_gated_delta_rule: diagonal_inverse={diagonal_inverse!r} is "
                         f"not accepted: expected None or one of {list(DIAGONAL_INVERSES)}")
    o, final = ChunkGatedDeltaRuleFunction.apply(qt, kt, vt, gt, bt, h0, seqs, scale,
                                                 use_qk_l2norm, output_final_state, split, keep,
                                                 dv_dh, local, fused, two_dk, lean, from_y,
                                                 vn, overlap, inverse_precision,
                                                 diagonal_inverse)
    return o.view(B, T, HV, V).to(v.dtype), final


def chunk_gated_delta_rule(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, *, scale: float | None = None,
    initial_state: Tensor | None = None, output_final_state: bool = False,
    cu_seqlens: Tensor | None = None, use_qk_l2norm: bool = False,
    split_output: bool | None = None, keep_states: bool | None = None,
    dv_from_dh: bool | None = None, local_dv: bool | None = None,
    fused_group_grads: bool | None = None, split_dk: bool | None = None,
    lean_walk: bool | None = None, dm_from_y: bool | None = None,
    store_v_new: bool | None = None, overlap_walks: bool | None = None,
    inverse_precision: str | None = None, diagonal_inverse: str | None = None,
) -> tuple[Tensor, Tensor | None]:
    """The gated delta rule, chunked, through Triton kernels; differentiable.

    Args:
        q, k: ``[B, T, H, K]``.
        v: ``[B, T, HV, V]`` with ``HV % H == 0``; K, V <= 256.
        g: log decays ``[B, T, HV]`` (``<= 0``); beta: write strengths ``[B, T, HV]``.
        scale: multiplies q; default ``K ** -0.5``.
        initial_state: ``[N, HV, K, V]`` or None (zeros); N = B, or the number of sequences.
        output_final_state: also return each sequence's state after its last token.
        cu_seqlens: ``[N + 1]`` integer offsets of packed sequences; requires B == 1.
        use_qk_l2norm: L2-normalise q and k per head (``x / sqrt(Σx² + 1e-6)``) first.
        split_output: compute the output in a parallel kernel from stored chunk states
            instead of in the sequential one; ``None`` takes :data:`SPLIT_OUTPUT` (whose
            ``None`` splits when fewer than ``FEW_PROGRAMS`` sequence·value-head pairs).
        keep_states: keep the forward's chunk states for the backward instead of recomputing
            them (memory for time); ``None`` takes :data:`KEEP_STATES`.
        dv_from_dh: the backward's dh kernel stores ``Aᵀ dV_new`` and dv, sparing a pass;
            ``None`` takes :data:`DV_FROM_DH`.
        local_dv: the dh kernel reads the within-chunk ``Pᵀ dO`` from a parallel kernel;
            ``None`` takes :data:`LOCAL_DV`.
        fused_group_grads: with grouped value heads, finish dq and dk (group sum, L2 norm's
            backward, cast) in one kernel; ``None`` takes :data:`FUSED_GROUP_GRADS`.
        split_dk: the backward's dk pass as two passes with fewer live tiles (with
            ``dm_from_y``: the WY passes); ``None`` takes :data:`SPLIT_DK` (whose ``None`` is
            one pass with ``dm_from_y``, two without).
        lean_walk: the state walk's products ordered to need less shared memory (two
            programs a GPU SM at K = V = 128); ``None`` takes :data:`LEAN_WALK`.
        dm_from_y: the backward's dk, dg and dβ from the stored ``Aᵀ dV_new`` (no dA);
            ``None`` takes :data:`DM_FROM_Y` for K, V up to :data:`WY_MAX_DIM` (beyond it its
            kernels faulted on the H200; ``True`` still runs them there).
        store_v_new: with ``dm_from_y`` and recomputed states, the backward's state walk
            stores ``U − W h`` for the later passes to read; ``None`` takes
            :data:`STORE_V_NEW`.
        overlap_walks: on CUDA, the backward recomputes the chunk states on a second stream
            while the dh walk runs; ``None`` takes :data:`OVERLAP_WALKS` (whose ``None``
            overlaps for at most ``OVERLAP_MAX_PAIRS`` sequence·value-head pairs).
        inverse_precision: the WY inverse's float32 products, ``"ieee"`` or ``"tf32x3"``;
            ``None`` takes ``kkt_solve.INVERSE_PRECISION``.
        diagonal_inverse: how the WY inverse's 16 × 16 diagonal blocks are inverted,
            ``"substitution"`` (row by row, float32-accurate even for nearly equal keys) or
            ``"series"``; ``None`` takes ``kkt_solve.DIAGONAL_INVERSE`` (whose ``None`` is the
            substitution up to ``kkt_solve.SUBSTITUTION_MAX_DIM``, the series above).

    Returns:
        ``(o[B, T, HV, V]`` in v's dtype, ``final_state[N, HV, K, V]`` float32 or None``)``.
        Gradients reach q, k, v, g, beta and initial_state.

    Raises:
        ValueError: shapes, dtypes, devices or ``cu_seqlens`` the kernels do not take (named).
    """
    seqs = check_args("chunk_gated_delta_rule", q, k, v, g, beta, initial_state, cu_seqlens,
                      scale)
    return run_chunk(q, k, v, g, beta, seqs, scale=scale, initial_state=initial_state,
                     output_final_state=output_final_state, use_qk_l2norm=use_qk_l2norm,
                     split_output=split_output, keep_states=keep_states,
                     dv_from_dh=dv_from_dh, local_dv=local_dv,
                     fused_group_grads=fused_group_grads, split_dk=split_dk,
                     lean_walk=lean_walk, dm_from_y=dm_from_y, store_v_new=store_v_new,
                     overlap_walks=overlap_walks, inverse_precision=inverse_precision,
                     diagonal_inverse=diagonal_inverse)
