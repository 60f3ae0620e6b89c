#!/usr/bin/env bash
# One GPU call's worth of checks (run on the GPU machine from the repo root; results under $OUT):
# the local ops and MoE on CUDA, the triton attention kernels at real shapes, the conformance
# kit on triton (attnplug check), a
# hybrid trained with triton and with local (losses side by side), and the attention benchmark
# with the anchors measured in the same run.
set -u
OUT=${OUT:-runs/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation -e . -e plugins/triton -e plugins/kitchen \
  > "$OUT/install.log" 2>&1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/card.txt"
timeout 120 python3 -m pytest -q -rs tests/test_ops_cuda.py tests/test_moe_cuda.py > "$OUT/ops_cuda.txt" 2>&1
tail -n 3 "$OUT/ops_cuda.txt"
# the triton flash attention against float64 at real shapes (bf16); the short convolution's
# tests (long to autotune) are in gpu_profile.sh
# the experimental kernels first (tensor descriptors, the one-kernel backward), then the rest
timeout 240 python3 -m pytest -q -rs plugins/triton/tests/test_triton_attention.py \
  -k "fused or descriptor" > "$OUT/triton_attention_experimental.txt" 2>&1
tail -n 3 "$OUT/triton_attention_experimental.txt"
timeout 300 python3 -m pytest -q -rs plugins/triton/tests/test_triton_attention.py \
  -k "not fused and not descriptor" > "$OUT/triton_kernels.txt" 2>&1
tail -n 3 "$OUT/triton_kernels.txt"
# the conformance kit: every slot triton serves and the hybrid model, bf16, against float64
timeout 200 python3 -m attnplug check triton --device cuda --dtype bfloat16 \
  > "$OUT/check_triton.txt" 2>&1
echo "attnplug check triton: exit $?"; grep -E "FAILED|error|checks" "$OUT/check_triton.txt" | head
for backend in triton local; do
  timeout 170 python3 -m attnplug train examples/qwen3_next_hybrid.toml --device cuda \
    --backend "$backend" --steps 150 --json > "$OUT/train_$backend.json" 2> "$OUT/train_$backend.err"
  python3 - "$OUT/train_$backend.json" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
print({k: d.get(k) for k in ("backend", "steps", "initial_loss", "final_loss", "accuracy",
                             "tokens_per_second", "tokens_per_second_steady")})
PY
done
timeout 240 python3 benchmarks/bench_attention.py --seqlens 4096 16384 --out "$OUT/attention" \
  > "$OUT/bench_attention.txt" 2>&1
tail -n 20 "$OUT/bench_attention.txt"
