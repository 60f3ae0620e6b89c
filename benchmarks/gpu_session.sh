#!/usr/bin/env bash
# The GPU checks of the core and the triton backend, one device call (under ten minutes) a part
# (run on the GPU machine from the repo root; results under $OUT):
#   bash benchmarks/gpu_session.sh tests   the local ops and MoE on CUDA, then the triton flash
#       attention against float64 at real shapes in bf16 (the descriptor kernels first);
#   bash benchmarks/gpu_session.sh check   the conformance kit on triton (`attnplug check triton
#       --device cuda --dtype bfloat16`: every slot it serves and the hybrid model against
#       float64; it compiles and autotunes every kernel at each shape, several minutes);
#   bash benchmarks/gpu_session.sh train   a hybrid trained with triton and with local (two
#       seeds, the example's 500 steps), losses and tokens/s side by side;
#   bash benchmarks/gpu_session.sh bench   the attention benchmark, anchors in the same run.
# The short convolution's tests (long to autotune) are in gpu_profile.sh. Every step has its own
# time limit, so one that hangs or faults leaves the rest to run.
set -u
case ${1:-} in
  tests | check | train | bench) ;;
  *) echo "usage: bash benchmarks/gpu_session.sh tests|check|train|bench" >&2
     exit 2 ;;
esac
OUT=${OUT:-runs/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation -e . -e plugins/triton -e plugins/kitchen \
  > "$OUT/install.log" 2>&1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/card.txt"
source benchmarks/gpu_step.sh
case $1 in
  tests)
    STEP_TAIL=3 step ops_cuda 100 python3 -m pytest -q -rs tests/test_ops_cuda.py \
      tests/test_moe_cuda.py
    STEP_GREP="PASSED|FAILED|passed|failed|^E " step attention_descriptors 200 python3 -m pytest \
      -v -rs --tb=short plugins/triton/tests/test_triton_attention.py -k "descriptor or served"
    STEP_GREP="FAILED|passed|failed|^E " step attention 260 python3 -m pytest -v -rs \
      --tb=short plugins/triton/tests/test_triton_attention.py -k "not descriptor and not served"
    ;;
  check)
    # one progress line a slot (with the seconds so far) goes into the log: a run cut short
    # shows how far it got
    STEP_GREP="checking|FAILED|error|checks" step check_triton 560 python3 -m attnplug check \
      triton --device cuda --dtype bfloat16
    ;;
  train)
    # the example's own 500 steps (its learning-rate schedule), seeds 0 and 1 (MQAR's loss falls
    # in a jump whose step varies from run to run: one seed cannot tell a backend's error from
    # that); the four runs at once, each printing its losses every 50 steps and its evaluations
    for seed in 0 1; do
      for backend in triton local; do
        timeout 400 python3 -m attnplug train examples/qwen3_next_hybrid.toml --device cuda \
          --backend "$backend" --seed "$seed" --json > "$OUT/train_${backend}_$seed.json" \
          2> "$OUT/train_${backend}_$seed.err" &
      done
    done
    wait
    for f in "$OUT"/train_*_[0-9].json; do
      python3 - "$f" <<'PY'
import json, sys
try:
    d = json.load(open(sys.argv[1]))
except (OSError, ValueError) as exc:
    print(f"{sys.argv[1]}: no result ({exc})")
else:
    print({k: d.get(k) for k in ("backend", "seed", "steps", "initial_loss", "final_loss",
                                 "accuracy", "tokens_per_second_steady")})
    print("  loss every 50 steps:", [round(x, 3) for x in d["losses"][::50]])
    print("  evaluations:", [(e["step"], round(e["loss"], 3), round(e["accuracy"], 3))
                             for e in d["evals"]])
PY
    done
    ;;
  bench)
    STEP_GREP="T=4096|T=16384|error" step bench_attention 500 python3 \
      benchmarks/bench_attention.py --seqlens 4096 16384 --out "$OUT/attention"
    ;;
esac
