#!/usr/bin/env bash
# Issue 9 on a 2-GPU machine (run from the repo root; results under $OUT): the example hybrid at a
# GPU size (benchmarks/configs/hybrid_gpu*.toml) trained on one GPU, with FSDP2 over two GPUs and
# as two pipeline stages (1F1B), NCCL; prints tokens/s of each (whole run, and over the second
# half of the steps) and the second-half rate against the one-GPU run's.
#   OUT=runs/dist bash benchmarks/gpu_distributed.sh [backend] [steps]
set -u
OUT=${OUT:-runs/dist}
backend=${1:-local}
steps=${2:-40}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
python3 -m pip install -q --no-deps --no-build-isolation -e . -e plugins/triton > "$OUT/install.log" 2>&1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/card.txt"
run() {  # name, nproc, config
  if [ "$2" = 1 ]; then
    cmd=(python3 -m attnplug train)
  else
    cmd=(torchrun --standalone --nproc-per-node "$2" -m attnplug train)
  fi
  timeout 200 "${cmd[@]}" "benchmarks/configs/$3" --device cuda --backend "$backend" \
    --steps "$steps" --json > "$OUT/$1.json" 2> "$OUT/$1.err"
  echo "$1: exit $?"
  tail -n 3 "$OUT/$1.err"
}
run one_gpu 1 hybrid_gpu.toml
run fsdp2_2gpu 2 hybrid_gpu_fsdp.toml
run pp2_2gpu 2 hybrid_gpu_pp2.toml
python3 - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
rows = {}
for name in ("one_gpu", "fsdp2_2gpu", "pp2_2gpu"):
    try:
        rows[name] = json.loads((out / f"{name}.json").read_text())
    except (OSError, ValueError) as exc:
        print(f"{name}: no result ({exc.__class__.__name__})")
base = rows.get("one_gpu", {}).get("tokens_per_second_steady")
print(f"{'run':12} {'tokens/s':>10} {'2nd half':>10} {'vs 1 GPU':>9} {'initial':>8} {'final':>8}")
for name, d in rows.items():
    tps, steady = d.get("tokens_per_second"), d.get("tokens_per_second_steady")
    ratio = f"{steady / base:.2f}x" if steady and base else "-"
    print(f"{name:12} {tps:10.0f} {steady or 0:10.0f} {ratio:>9} {d['initial_loss']:8.4f} "
          f"{d['final_loss']:8.4f}")
PY
