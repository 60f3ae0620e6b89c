#!/usr/bin/env bash
# Where the GPU time goes, one call (run on the GPU machine from the repo root after TE is
# installed there if the te rows are wanted; results under $OUT):
#   1. the triton short-convolution kernel's tests on the GPU (real shapes, bf16; the served
#      two-pass backward and the earlier one-pass one) and the gated delta rule's real-shape
#      tests (the project's shape and the example's grouped value heads), then
#      benchmarks/bench_conv.py: the GDN layer's depthwise causal conv, conv1d vs two rewrites
#      vs the kernels;
#   2. benchmarks/profile_step.py: each layer part's forward/backward share of a training step
#      of the GPU-sized example hybrid (grouped experts), per backend, the top CUDA kernels
#      and the torch ops behind them, grouped by input shapes.
# Each step has its own time limit; together under the 10-minute call (each GDN kernel's time:
# `bench_gated_delta_rule.py --parts stages`, in `gpu_experimental.sh gdn-bench`). Many files
# come back from $OUT: tar them into one (`cd $OUT && tar czf /tmp/o.tgz . && ...`).
set -u
OUT=${OUT:-runs/profile}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export PYTHONPATH=/tmp/te-site${PYTHONPATH:+:$PYTHONPATH}  # TE, where install-te.sh put it
python3 -m pip install -q --no-deps --no-build-isolation -e . -e plugins/triton -e plugins/te \
  > "$OUT/install.log" 2>&1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/card.txt"
source benchmarks/gpu_step.sh
# autotuning every small shape makes this the slow step (about 170 s for 85 tests on an H200)
STEP_TAIL=5 step conv_tests 200 python3 -m pytest -q plugins/triton/tests/test_triton_causal_conv1d.py
STEP_TAIL=5 step gdn_real_shapes 150 python3 -m pytest -q -rs \
  plugins/triton/tests/test_triton_gated_delta_rule.py -k real_shape
STEP_TAIL=24 step bench_conv 90 python3 benchmarks/bench_conv.py --out "$OUT/conv"
step profile_step 150 python3 benchmarks/profile_step.py --backends triton local --top 30 \
  --json "$OUT/profile_step.json"
