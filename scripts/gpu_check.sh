#!/usr/bin/env bash
# The one prepared run for a lent GPU (the device tool's `run`; see the README's results section):
# the GPU tests, then GPT-2 small's training step at B=8, T=1024 and the fused-pattern rows at their
# large sizes, eager vs torch.compile vs lazygraph, fp32 and bf16. Writes seven files into $OUT
# (the device tool brings back at most eight, two folders down): device.txt, gpu_tests.txt,
# bench.log, step/results.{md,json}, rows/results.{md,json}. Commit them under
# benchmarks/results/<date>-<device>/. Each part has its own time limit (together 540 s, under one
# run's ten minutes), so a part that hangs still leaves the others' files.
#
#     run(command="OUT=$OUT bash scripts/gpu_check.sh", timeout_s=600)
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-benchmark-results/gpu}
mkdir -p "$out"
{
  date -u +%Y-%m-%dT%H:%MZ
  git rev-parse --short HEAD 2>/dev/null || echo "(no git)"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1
  python -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__,
'triton', triton.__version__)"
} > "$out/device.txt" 2>&1
timeout "${GPU_TESTS_S:-120}" python -m pytest -m gpu -p no:cacheprovider -rA \
  tests/test_gpu.py tests/test_lanes_gpu.py > "$out/gpu_tests.txt" 2>&1
echo "exit status $?" >> "$out/gpu_tests.txt"
{
  timeout "${STEP_S:-300}" python -m benchmarks --workloads gpt2_step --no-plots --out "$out/step"
  echo "gpt2_step: exit status $?"
  timeout "${ROWS_S:-120}" python -m benchmarks --workloads attn_scores,layernorm,bias_gelu,cross_entropy \
    --no-plots --out "$out/rows"
  echo "rows: exit status $?"
} > "$out/bench.log" 2>&1
