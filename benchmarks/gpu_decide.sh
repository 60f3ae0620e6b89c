#!/usr/bin/env bash
# One GPU call (under ten minutes) that decides the triton backend's experimental kernels for
# issue 7's training step (run from the repo root on the GPU machine; results under $OUT):
#   1. right at GPU shapes: the short convolution's tests (both backwards) and the gated delta
#      rule's real-shape tests (incl. the one-kernel dq/dk finish for grouped value heads);
#   2. fast: bench_conv.py (one-pass vs two-pass backward) and bench_backends.py's training step,
#      triton as served and with ATTNPLUG_TRITON_EXPERIMENTAL=1, local alongside in each run;
#   3. where the rest goes: profile_step.py for triton with the top kernels and the ops behind
#      them, grouped by input shapes.
set -u
OUT=${OUT:-runs/decide}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation -e . -e plugins/triton > "$OUT/install.log" 2>&1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/card.txt"
source benchmarks/gpu_step.sh
STEP_TAIL=4 step conv_tests 120 python3 -m pytest -q -rs plugins/triton/tests/test_triton_causal_conv1d.py
STEP_TAIL=6 step gdn_real_shapes 150 python3 -m pytest -q -rs \
  plugins/triton/tests/test_triton_gated_delta_rule.py -k real_shape
STEP_TAIL=24 step bench_conv 90 python3 benchmarks/bench_conv.py --out "$OUT/conv"
STEP_TAIL=8 step backends 150 python3 benchmarks/bench_backends.py --backends triton local \
  --steps 5 --json "$OUT/backends.json"
STEP_TAIL=8 step backends_experimental 150 env ATTNPLUG_TRITON_EXPERIMENTAL=1 \
  python3 benchmarks/bench_backends.py --backends triton local --steps 5 \
  --json "$OUT/backends_experimental.json"
STEP_TAIL=30 step profile 120 python3 benchmarks/profile_step.py --backends triton --top 30 \
  --json "$OUT/profile.json"
