#!/usr/bin/env bash
# Where the GPU time goes, one call (run on the GPU machine from the repo root after TE is
# installed there if the te rows are wanted; results under $OUT):
#   1. benchmarks/profile_step.py: each layer part's forward/backward share of a training step
#      of the GPU-sized example hybrid, per backend, and the top CUDA kernels;
#   2. benchmarks/bench_conv.py: the GDN layer's depthwise causal conv, conv1d vs two rewrites;
#   3. benchmarks/bench_gated_delta_rule.py --parts stages: each triton GDN kernel's time.
set -u
OUT=${OUT:-runs/profile}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export PYTHONPATH=/tmp/te-site${PYTHONPATH:+:$PYTHONPATH}  # TE, where install-te.sh put it
python3 -m pip install -q --no-deps --no-build-isolation -e . -e plugins/triton -e plugins/te \
  > "$OUT/install.log" 2>&1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/card.txt"
source benchmarks/gpu_step.sh
step profile_step 300 python3 benchmarks/profile_step.py --top 20 --json "$OUT/profile_step.json"
STEP_TAIL=20 step bench_conv 90 python3 benchmarks/bench_conv.py --out "$OUT/conv"
STEP_TAIL=30 step gdn_stages 120 python3 benchmarks/bench_gated_delta_rule.py --parts stages
