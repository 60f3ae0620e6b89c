#!/usr/bin/env bash
# The GPU checks of the triton backend's gated delta rule and DSA kernels, two calls of under ten
# minutes (run from the repo root on the GPU machine; results under $OUT; send .whl/ along for
# the fla anchor):
#   bash benchmarks/gpu_experimental.sh gdn   the gated delta rule backward: each chunk_bwd
#       configuration in a process of its own, then the real shapes (fwd+bwd vs float64), the
#       forward / forward+backward benchmark and each kernel's share of it;
#   bash benchmarks/gpu_experimental.sh dsa   both top-k methods at real shapes vs float64,
#       then the benchmark at 4K and 32K (streaming vs blocked vs the local top-k, the DSA
#       totals against SDPA).
# Every step has its own time limit, so one that hangs or faults leaves the rest to run.
set -u
case ${1:-} in
  gdn | dsa) ;;
  *) echo "usage: bash benchmarks/gpu_experimental.sh gdn|dsa" >&2; exit 2 ;;
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
    step gdn_probe 170 python3 benchmarks/gpu_check_gdn.py --parts probe --probe-dims 32 64 128 \
      --probe-families chunk_bwd chunk_o --out "$OUT/gdn_probe"
    step gdn_shapes 150 python3 benchmarks/gpu_check_gdn.py --quick --out "$OUT/gdn_shapes"
    step gdn_bench 220 python3 benchmarks/bench_gated_delta_rule.py --parts fwd fwd+bwd stages
    ;;
  dsa)
    step dsa_check 150 python3 benchmarks/gpu_check_dsa.py --out "$OUT/dsa_check"
    step dsa_bench 300 python3 benchmarks/bench_dsa.py --seqlens 4096 32768 --out "$OUT/dsa_bench"
    ;;
esac
