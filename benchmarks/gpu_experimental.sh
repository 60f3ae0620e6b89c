#!/usr/bin/env bash
# The GPU checks of the triton backend's gated delta rule and DSA kernels, calls of under ten
# minutes (run from the repo root on the GPU machine; results under $OUT; send .whl/ along for
# the fla anchor):
#   bash benchmarks/gpu_experimental.sh gdn   the gated delta rule: each chunk_bwd configuration
#       in a process of its own at K=V 32/64/128, the same for chunk_o, chunk_dv and chunk_h
#       with the kernel variants on (split forward, kept states, dv from dh, local dv), then
#       the project shape
#       (fwd+bwd vs float64, defaults and variants);
#   bash benchmarks/gpu_experimental.sh gdn-bench   the forward / forward+backward benchmark
#       (every variant side by side, fla and SDPA anchors) and each kernel's share of it;
#   bash benchmarks/gpu_experimental.sh gdn-scaling   issue 5's scaling table: T from 1K to 64K
#       with 64K tokens a step, forward and forward+backward, SDPA and fla's forward alongside;
#   bash benchmarks/gpu_experimental.sh gdn-few   the scaling table's few-pairs cases (T = 32K
#       at B = 2, 64K at B = 1) with every backward variant, to choose the backward there;
#   bash benchmarks/gpu_experimental.sh gdn-walks   the state walks' launches (run in session
#       12): probe_gdn_walks.py (each walk's candidate launches — the autotuner's,
#       one stage, BV = 128 with 8 warps, the forward's LEAN ordering — with their occupancy,
#       checked a process each, then the walks alone timed against the served one), then the
#       project shape (served, and with the lean walk) against float64;
#   bash benchmarks/gpu_experimental.sh gdn-lean   the forward's LEAN ordering (chunk.LEAN_WALK)
#       and kkt_solve's inverse in TF32×3 (kkt_solve.INVERSE_PRECISION): every chunk_h and
#       kkt_solve configuration with both and the served switches, a process each, at K=V
#       32/64/128; then the forward and forward+backward benchmark, triton against
#       triton-lean, triton-tf32inv, both, fla and SDPA;
#   bash benchmarks/gpu_experimental.sh gdn-step   a training step of the GPU-sized example
#       hybrid (bench_backends.py) with the triton backend as served, then with
#       ATTNPLUG_TRITON_EXPERIMENTAL=1 (EXPERIMENTAL_CHUNK_OPTIONS: none since session 12);
#   bash benchmarks/gpu_experimental.sh gdn-served   after a change of the served switches
#       (session 12: the lean walk): every chunk_h configuration as served at K=V 16 and 32
#       (64 and 128 were checked with the variant on), the forward and forward+backward
#       benchmark (served triton, fla, SDPA), then the example hybrid's training step;
#   bash benchmarks/gpu_experimental.sh gdn-wy   dk, dg and dβ from the stored Y (chunk.DM_FROM_Y,
#       session 13): the forward+backward benchmark (served, dm_from_y in two passes and in
#       one, SDPA) and each kernel's share, then the project shape and the quick shapes with
#       it against float64;
#   bash benchmarks/gpu_experimental.sh gdn-wy-probe   every chunk_bwd configuration with
#       dm_from_y, a process each, at K=V 32/64/128 (two passes) and 16/32/64/128 (one pass);
#   bash benchmarks/gpu_experimental.sh gdn-wy-served   after serving dm_from_y (session 13): the
#       forward and forward+backward benchmark (served, two WY passes, the dA passes, fla,
#       SDPA) and each kernel's share, then the project shape against float64;
#   bash benchmarks/gpu_experimental.sh gdn-shapes   every shape of gpu_check_gdn.py against
#       float64 as served but fp32 (about seven minutes: session 14's call, with fp32, ran out
#       during it), then fp32 in a step of its own;
#   bash benchmarks/gpu_experimental.sh gdn-wy-scaling   the scaling table's T = 1K, 16K, 64K
#       rows, served against the dA passes, fla and SDPA;
#   bash benchmarks/gpu_experimental.sh gdn-vn   V_new stored by the backward's state walk
#       (chunk.STORE_V_NEW, session 13, not yet on a GPU): every chunk_bwd and chunk_h
#       configuration with it, a process each, at K=V 32/64/128; then the forward+backward
#       benchmark (served against triton-vn, SDPA) and each kernel's share with it;
#   bash benchmarks/gpu_experimental.sh gdn-ovl   the backward's state recomputation on a second
#       stream beside the dh walk (chunk.OVERLAP_WALKS, session 14): the forward+backward
#       benchmark (served against triton-ovl, SDPA; session 14: 0.6% at B = 8, T = 4096), the
#       scaling table's few-pairs rows (T = 16K, 64K: walks of 64 and 16 sequence·head pairs,
#       where a second stream has more idle GPU to use; not yet measured), then the GPU tests
#       of it (float64 and the one-stream run at the project shape, grouped heads, packed
#       sequences);
#   bash benchmarks/gpu_experimental.sh gdn-dtypes   float32 and float16 inputs at small head
#       dims (session 14 found chunk_fwd_o faulting at K = 16 with 8 warps in float32, now
#       pruned; the probes had only run bf16 there): every chunk_o, chunk_h, chunk_bwd,
#       chunk_dv and kkt_solve configuration in float32 at K=V 16/32/64 and in float16 at
#       16/32, a process each, with the split forward, local dv, dv from dh, dm_from_y and the
#       lean walk on;
#   bash benchmarks/gpu_experimental.sh gdn-subst   kkt_solve's diagonal blocks by forward
#       substitution (kkt_solve.DIAGONAL_INVERSE, session 14, not yet on a GPU): every kkt_solve
#       configuration with it, a process each, at K=V 32/64/128 in bf16 and 16/64 in fp32; the
#       project shape and the quick shapes with it against float64; the forward benchmark
#       (served against triton-subst, fla);
#   bash benchmarks/gpu_experimental.sh gdn-s15   what session 15 could not finish after serving
#       the substitution (up to K = 128) and the overlap for few pairs: every kkt_solve
#       configuration in float16 at K=V 16/32 (ran: 8 of 8), the K=V=256 shape against float64
#       with the substitution forced (the condition for serving it there), then the overlap's
#       GPU tests (session 14 ran them before the serving rule);
#   bash benchmarks/gpu_experimental.sh gdn-s15-bench   the served forward and forward+backward
#       at the project shape (against the series, fla, SDPA), then the T = 64K row as served
#       (two streams at 16 pairs) against one stream;
#   bash benchmarks/gpu_experimental.sh dsa   the DSA kernels at real shapes vs float64, then
#       the benchmark at 4K and 32K (the triton vs the local top-k, the DSA totals against
#       SDPA), and how much of the sparse backward its dk/dv atomics take
#       (probe_sparse_atomics.py);
#   bash benchmarks/gpu_experimental.sh dsa-step   a training step of a DSA model (examples/
#       dsa.toml at bench_backends.py's GPU size: 16 layers, hidden 2048, T = 4096, topk 2048,
#       MoE everywhere), triton (its DSA kernels served by default since session 7) against
#       local;
#   bash benchmarks/gpu_experimental.sh attention   the flash attention's kernels on tensor
#       descriptors against float64 and the pointer kernels, then bench_attention.py at 4K and
#       16K with a row per choice of kernels on descriptors and the anchors;
# Every step has its own time limit, so one that hangs or faults leaves the rest to run.
set -u
case ${1:-} in
  gdn | gdn-bench | gdn-scaling | gdn-few | gdn-walks | gdn-lean | gdn-step | gdn-served | gdn-wy | gdn-wy-probe | gdn-wy-served | gdn-shapes | gdn-wy-scaling | gdn-vn | gdn-ovl | gdn-dtypes | gdn-subst | gdn-s15 | gdn-s15-bench | dsa | dsa-step | attention) ;;
  *) echo "usage: bash benchmarks/gpu_experimental.sh gdn|gdn-bench|gdn-scaling|gdn-few|gdn-walks|gdn-lean|gdn-step|gdn-served|gdn-wy|gdn-wy-probe|gdn-wy-served|gdn-shapes|gdn-wy-scaling|gdn-vn|gdn-ovl|gdn-dtypes|gdn-subst|gdn-s15|gdn-s15-bench|dsa|dsa-step|attention" >&2
     exit 2 ;;
esac
OUT=${OUT:-runs/experimental}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation -e . -e plugins/triton > "$OUT/install.log" 2>&1
if ls .whl/*.whl > /dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl >> "$OUT/install.log" 2>&1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/card.txt"
source benchmarks/gpu_step.sh
export STEP_GREP="ok |FAIL|passed|goal|T=32K|T=4096|error"
case ${1:-} in
  gdn)
    step gdn_probe 130 python3 benchmarks/gpu_check_gdn.py --parts probe --probe-dims 32 64 128 \
      --probe-families chunk_bwd --out "$OUT/gdn_probe"
    step gdn_probe_variants 220 python3 benchmarks/gpu_check_gdn.py --parts probe --probe-variants \
      --probe-dims 32 128 --probe-families chunk_o chunk_dv chunk_h \
      --out "$OUT/gdn_probe_variants"
    step gdn_shapes 180 python3 benchmarks/gpu_check_gdn.py --quick --out "$OUT/gdn_shapes"
    ;;
  gdn-bench)
    step gdn_bench 400 python3 benchmarks/bench_gated_delta_rule.py --parts fwd fwd+bwd stages
    ;;
  gdn-scaling)
    step gdn_scaling 540 python3 benchmarks/bench_gated_delta_rule.py --parts scaling \
      --out "$OUT/gdn_scaling"
    ;;
  gdn-few)
    step gdn_few 400 python3 benchmarks/bench_gated_delta_rule.py --parts scaling \
      --scaling-seqlens 32768 65536 --scaling-impls triton triton-seq triton-keep \
      triton-localdv triton-splitdk triton-all fla --out "$OUT/gdn_few"
    ;;
  gdn-walks)
    STEP_GREP="ok|wrong|failed|hang|walk" step gdn_walks 300 python3 benchmarks/probe_gdn_walks.py \
      --limit 90 --out "$OUT/gdn_walks"
    step gdn_lean_shapes 180 python3 benchmarks/gpu_check_gdn.py --quick --out "$OUT/gdn_lean_shapes"
    ;;
  gdn-lean)
    step gdn_lean_probe 240 python3 benchmarks/gpu_check_gdn.py --parts probe --probe-variants \
      lean_walk dv_from_dh local_dv split_dk --probe-dims 32 64 128 --probe-families chunk_h \
      kkt_solve --inverse-precision tf32x3 --out "$OUT/gdn_lean_probe"
    step gdn_lean_bench 300 python3 benchmarks/bench_gated_delta_rule.py --parts fwd fwd+bwd \
      --impls triton-lean triton-tf32inv triton-lean-tf32inv fla --rounds 4 \
      --out "$OUT/gdn_lean_bench"
    ;;
  gdn-step)
    STEP_GREP="ms/step|skipped|Error" step gdn_step_served 270 python3 benchmarks/bench_backends.py \
      --backends triton --steps 8 --warmup 3 --json "$OUT/gdn_step_served.json"
    ATTNPLUG_TRITON_EXPERIMENTAL=1 STEP_GREP="ms/step|skipped|Error" step gdn_step_experimental \
      270 python3 benchmarks/bench_backends.py --backends triton --steps 8 --warmup 3 \
      --json "$OUT/gdn_step_experimental.json"
    ;;
  gdn-served)
    step gdn_served_probe 150 python3 benchmarks/gpu_check_gdn.py --parts probe --probe-dims 16 32 \
      --probe-families chunk_h --out "$OUT/gdn_served_probe"
    step gdn_served_bench 240 python3 benchmarks/bench_gated_delta_rule.py --parts fwd fwd+bwd \
      --impls triton fla --rounds 4 --out "$OUT/gdn_served_bench"
    STEP_GREP="ms/step|skipped|Error" step gdn_served_step 170 python3 benchmarks/bench_backends.py \
      --backends triton --steps 8 --warmup 3 --json "$OUT/gdn_served_step.json"
    ;;
  gdn-wy)
    STEP_GREP="ok |FAIL|passed|goal|T=4096|error|ms  |GPU time" step gdn_wy_bench 330 python3 \
      benchmarks/bench_gated_delta_rule.py --parts fwd+bwd stages --impls triton-wy triton-wy1 \
      --stage-variants default wy --rounds 4 --out "$OUT/gdn_wy_bench"
    step gdn_wy_shapes 200 python3 benchmarks/gpu_check_gdn.py --quick --out "$OUT/gdn_wy_shapes"
    ;;
  gdn-wy-probe)
    step gdn_wy_probe 200 python3 benchmarks/gpu_check_gdn.py --parts probe --probe-variants \
      dm_from_y split_dk dv_from_dh local_dv lean_walk --probe-dims 32 64 128 \
      --probe-families chunk_bwd --out "$OUT/gdn_wy_probe"
    step gdn_wy1_probe 230 python3 benchmarks/gpu_check_gdn.py --parts probe --probe-variants \
      dm_from_y dv_from_dh local_dv lean_walk --probe-dims 16 32 64 128 \
      --probe-families chunk_bwd --out "$OUT/gdn_wy1_probe"
    ;;
  gdn-wy-served)
    STEP_GREP="ok |FAIL|passed|goal|T=4096|error|ms  |GPU time" step gdn_wys_bench 330 python3 \
      benchmarks/bench_gated_delta_rule.py --parts fwd fwd+bwd stages --impls triton-wy \
      triton-da fla --stage-variants default --rounds 4 --out "$OUT/gdn_wys_bench"
    step gdn_wys_shapes 200 python3 benchmarks/gpu_check_gdn.py --quick \
      --out "$OUT/gdn_wys_shapes"
    ;;
  gdn-shapes)
    step gdn_shapes 450 python3 benchmarks/gpu_check_gdn.py --parts shapes --shapes "project" \
      "qwen3" "packed" "unit keys" "K=V=256" "K=64" --out "$OUT/gdn_shapes"
    step gdn_shapes_fp32 120 python3 benchmarks/gpu_check_gdn.py --parts shapes --shapes fp32 \
      --out "$OUT/gdn_shapes_fp32"
    ;;
  gdn-wy-scaling)
    step gdn_wys_scaling 540 python3 benchmarks/bench_gated_delta_rule.py --parts scaling \
      --scaling-seqlens 1024 16384 65536 --scaling-impls triton triton-da fla \
      --out "$OUT/gdn_wys_scaling"
    ;;
  gdn-vn)
    step gdn_vn_probe 230 python3 benchmarks/gpu_check_gdn.py --parts probe --probe-variants \
      dm_from_y store_v_new dv_from_dh local_dv lean_walk --probe-dims 32 64 128 \
      --probe-families chunk_bwd chunk_h --out "$OUT/gdn_vn_probe"
    STEP_GREP="ok |FAIL|passed|goal|T=4096|error|ms  |GPU time" step gdn_vn_bench 300 python3 \
      benchmarks/bench_gated_delta_rule.py --parts fwd+bwd stages --impls triton-vn \
      --stage-variants default vn --rounds 4 --out "$OUT/gdn_vn_bench"
    ;;
  gdn-ovl)
    STEP_GREP="ok |FAIL|passed|goal|T=4096|error|ms  " step gdn_ovl_bench 200 python3 \
      benchmarks/bench_gated_delta_rule.py --parts fwd+bwd --impls triton-ovl --rounds 4 \
      --out "$OUT/gdn_ovl_bench"
    step gdn_ovl_scaling 200 python3 benchmarks/bench_gated_delta_rule.py --parts scaling \
      --scaling-seqlens 16384 65536 --scaling-impls triton-ovl --out "$OUT/gdn_ovl_scaling"
    STEP_GREP="PASSED|FAILED|passed|failed|^E " step gdn_ovl_tests 150 python3 -m pytest -v -rs \
      --tb=short plugins/triton/tests/test_triton_gated_delta_rule.py -k overlap
    ;;
  gdn-dtypes)
    step gdn_fp32_probe 300 python3 benchmarks/gpu_check_gdn.py --parts probe --probe-dtype fp32 \
      --probe-variants split_output local_dv dv_from_dh dm_from_y lean_walk --probe-dims 16 32 \
      64 --probe-families chunk_o chunk_h chunk_bwd chunk_dv kkt_solve --out "$OUT/gdn_fp32"
    step gdn_fp16_probe 220 python3 benchmarks/gpu_check_gdn.py --parts probe --probe-dtype fp16 \
      --probe-variants split_output local_dv dv_from_dh dm_from_y lean_walk --probe-dims 16 32 \
      --probe-families chunk_o chunk_h chunk_bwd chunk_dv kkt_solve --out "$OUT/gdn_fp16"
    ;;
  gdn-subst)
    step gdn_subst_probe 150 python3 benchmarks/gpu_check_gdn.py --parts probe \
      --diagonal-inverse substitution --probe-dims 32 64 128 --probe-families kkt_solve \
      --out "$OUT/gdn_subst_probe"
    step gdn_subst_probe32 120 python3 benchmarks/gpu_check_gdn.py --parts probe \
      --diagonal-inverse substitution --probe-dtype fp32 --probe-dims 16 64 \
      --probe-families kkt_solve --out "$OUT/gdn_subst_probe32"
    step gdn_subst_shapes 150 python3 benchmarks/gpu_check_gdn.py --quick \
      --diagonal-inverse substitution --out "$OUT/gdn_subst_shapes"
    STEP_GREP="ok |FAIL|passed|goal|T=4096|error|ms  |GPU time" step gdn_subst_bench 150 \
      python3 benchmarks/bench_gated_delta_rule.py --parts fwd --impls triton-subst fla \
      --rounds 4 --out "$OUT/gdn_subst_bench"
    ;;
  gdn-s15)
    step gdn_s15_probe16 60 python3 benchmarks/gpu_check_gdn.py --parts probe --probe-dtype fp16 \
      --probe-dims 16 32 --probe-families kkt_solve --out "$OUT/gdn_s15_probe16"
    step gdn_s15_k256 200 python3 benchmarks/gpu_check_gdn.py --parts shapes --shapes K=V=256 \
      --diagonal-inverse substitution --out "$OUT/gdn_s15_k256"
    STEP_GREP="PASSED|FAILED|passed|failed|^E " step gdn_s15_tests 200 python3 -m pytest -v -rs \
      --tb=short plugins/triton/tests/test_triton_gated_delta_rule.py -k overlap
    ;;
  gdn-s15-bench)
    STEP_GREP="ok |FAIL|passed|goal|T=4096|error|ms  " step gdn_s15_bench 300 python3 \
      benchmarks/bench_gated_delta_rule.py --parts fwd fwd+bwd --impls triton-series fla \
      --rounds 3 --out "$OUT/gdn_s15_bench"
    STEP_GREP="fwd\+bwd" step gdn_s15_scaling 200 python3 benchmarks/bench_gated_delta_rule.py \
      --parts scaling --scaling-seqlens 65536 --scaling-impls triton-noovl --out \
      "$OUT/gdn_s15_scaling"
    ;;
  dsa)
    step dsa_check 150 python3 benchmarks/gpu_check_dsa.py --out "$OUT/dsa_check"
    step dsa_bench 300 python3 benchmarks/bench_dsa.py --seqlens 4096 32768 --out "$OUT/dsa_bench"
    STEP_GREP= step dsa_atomics 90 python3 benchmarks/probe_sparse_atomics.py \
      --out "$OUT/dsa_atomics"
    ;;
  attention)
    STEP_GREP="PASSED|FAILED|passed|failed|^E " step attention_tests 240 python3 -m pytest -v \
      -rs --tb=short plugins/triton/tests/test_triton_attention.py -k "descriptor or served"
    STEP_GREP="T=4096|T=16384|error" step attention_bench 300 python3 \
      benchmarks/bench_attention.py --seqlens 4096 16384 \
      --out "$OUT/attention"
    ;;
  dsa-step)
    STEP_GREP="ms/step|local|skipped|Error" step dsa_step 400 python3 \
      benchmarks/bench_backends.py --config examples/dsa.toml --set dsa_indexer_topk=2048 \
      --set dsa_indexer_head_dim=64 --set moe_layer_freq=1 --steps 4 --backends triton local \
      --json "$OUT/dsa_step.json"
    ;;
esac
