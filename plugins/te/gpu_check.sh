#!/usr/bin/env bash
# The te backend's checks on the GPU machine. Run from the project root, after Transformer Engine
# is installed there (shared/gpu/README.md: copy the parts of .gpu-te/ into /tmp/te, then
# `bash .gpu-te/small/install-te.sh`; this script runs that installer itself when it finds it).
#
#   bash plugins/te/gpu_check.sh            # install the project, report TE, run the te tests
#   bash plugins/te/gpu_check.sh --bench    # ... then benchmarks/bench_backends.py as well
#
# Writes into $OUT (default /tmp/te-check): te-env.txt (versions, `attnplug backends`, which
# attention backend TE picks), te-tests.log (pytest -v), te-junit.xml, te-summary.txt (the
# pytest summary lines), te-check.txt (`attnplug check te --device cuda --dtype bfloat16`, TE's slots) and,
# with --bench, bench_backends.txt/.json. Exit status: pytest's.
set -uo pipefail
out=${OUT:-/tmp/te-check}
mkdir -p "$out"
export PYTHONPATH=/tmp/te-site${PYTHONPATH:+:$PYTHONPATH}  # where install-te.sh puts TE
export PYTHONUNBUFFERED=1

if [ -f .gpu-te/small/install-te.sh ]; then
  bash .gpu-te/small/install-te.sh || { echo "installing TE failed" | tee "$out/te-summary.txt"; exit 1; }
fi
python3 -m pip install -q --no-deps --no-build-isolation -e . -e plugins/te -e plugins/triton \
  || { echo "pip install -e failed" | tee "$out/te-summary.txt"; exit 1; }

{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 - <<'PY'
import torch
import transformer_engine
import transformer_engine.pytorch as te

print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), transformer_engine "
      f"{transformer_engine.__version__}, cuDNN {te.get_cudnn_version()}, "
      f"device {torch.cuda.get_device_name()}")
# Whether GroupedLinear could take the experts' row counts on the device (TE's grouped-tensor
# path: no host synchronisation per MoE layer; needs cuBLASLt >= 13.4 on Hopper), which would
# let TEGroupedExperts drop host_counts.
try:
    import transformer_engine_torch as tex
    from transformer_engine.pytorch.module.grouped_linear import (
        is_module_grouped_tensor_path_supported,
    )

    print(f"cuBLASLt {tex.get_cublasLt_version()}; GroupedLinear grouped-tensor path (device "
          f"m_splits) for bf16: {is_module_grouped_tensor_path_supported(None, torch.bfloat16)}")
except (ImportError, AttributeError) as exc:
    print(f"GroupedLinear grouped-tensor path: not in this TE ({exc})")
PY
  python3 -m attnplug backends
  # Which DotProductAttention backend TE picks for the tests' bf16 causal case (NVTE_DEBUG log).
  NVTE_DEBUG=1 NVTE_DEBUG_LEVEL=2 python3 - <<'PY' 2>&1 | grep -iE "selected backend|available backends" | head -4
import torch
import transformer_engine.pytorch as te

attention = te.DotProductAttention(8, 64, num_gqa_groups=2, qkv_format="bshd")
q = torch.randn(2, 128, 8, 64, device="cuda", dtype=torch.bfloat16)
k = torch.randn(2, 128, 2, 64, device="cuda", dtype=torch.bfloat16)
attention(q, k, k.clone(), attn_mask_type="causal")
attention(q[:, :37], k, k.clone(), attn_mask_type="causal_bottom_right")
PY
} 2>&1 | tee "$out/te-env.txt"

python3 -m pytest -v -ra plugins/te/tests --junitxml="$out/te-junit.xml" 2>&1 | tee "$out/te-tests.log"
status=${PIPESTATUS[0]}
grep -E "^(FAILED|ERROR|SKIPPED)|passed|failed" "$out/te-tests.log" | tail -40 > "$out/te-summary.txt"
echo "pytest exit status: $status" >> "$out/te-summary.txt"
cat "$out/te-summary.txt"
# the conformance kit on the te backend: the slots TE serves and the hybrid model against
# float64 (the kernel slots come from the triton backend, whose check compiles and autotunes
# every kernel: `attnplug check triton`, several minutes on the GPU; te's whole check did not
# finish in 200 s on the H200, its module slots took 19 s and the model 29 s)
timeout 200 python3 -m attnplug check te --device cuda --dtype bfloat16 --slots core_attention \
  layer_norm linear column_parallel_linear row_parallel_linear grouped_mlp_modules model \
  > "$out/te-check.txt" 2>&1
echo "attnplug check te: exit $?" | tee -a "$out/te-summary.txt"
grep -E "FAILED|error|not comparable|checks" "$out/te-check.txt" | head -20

if [ "${1:-}" = "--bench" ]; then
  python3 benchmarks/bench_backends.py --json "$out/bench_backends.json" 2>&1 \
    | tee "$out/bench_backends.txt"
fi
exit "$status"
