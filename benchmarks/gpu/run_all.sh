#!/usr/bin/env bash
# Every GPU measurement of the project in one run (issue 34), in order, each step under its own time
# limit and writing its JSON under benchmarks/gpu/results/ the moment it has numbers, so a later
# failure loses nothing earlier. From the project's root, on the GPU machine (wheels in .whl/,
# runs/cache carried: ../shared/gpu/README.md):
#   bash benchmarks/gpu/run_all.sh              # the device run
#   bash benchmarks/gpu/run_all.sh --dry-run    # the same steps on CPU at toy shapes (results/dry-run/)
# A step that needs what this checkout lacks (CUDA, --fp8 torch, train.precision, launch.calibrate,
# benchmarks/fp8_gemm.py) prints `skip: <step>: <why>`. Exit status: the number of failed steps.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
dry=""
case "${1:-}" in
  --dry-run) dry="--dry-run" ;;
  "") ;;
  *) echo "usage: bash benchmarks/gpu/run_all.sh [--dry-run]" >&2; exit 2 ;;
esac
if [ -z "$dry" ]; then
  [ -d .whl ] || { echo "error: .whl/ is missing: run bash ../shared/gpu/wheels.sh on your machine and carry .whl" >&2; exit 2; }
  bash .whl/on-device.sh || true   # installs the wheels into /tmp/site and prints the versions
  export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH} PATH=/tmp/site/bin:$PATH
  export WANDB_MODE=${WANDB_MODE:-disabled} PYTHONUNBUFFERED=1
else
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
fi
failed=0
step() {  # step NAME LIMIT_S COMMAND...
  local name=$1 limit=$2 started=$SECONDS
  shift 2
  echo "== $name (limit ${limit} s)"
  timeout --kill-after=10 "$limit" "$@"
  local rc=$?
  if [ $rc -ne 0 ]; then
    failed=$((failed + 1))
    if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then echo "FAILED: $name: over its ${limit} s"; else echo "FAILED: $name: exit $rc"; fi
  fi
  echo "-- $name: $((SECONDS - started)) s"
}
optional() {  # optional NAME CHECK_COMMAND WHY LIMIT_S COMMAND...: the step, or a skip line saying why
  local name=$1 check=$2 why=$3
  shift 3
  if eval "$check" >/dev/null 2>&1; then step "$name" "$@"; else echo "skip: $name: $why"; fi
}
py=python3
step "versions and GPU" 30 $py benchmarks/gpu/env.py $dry
step "tiny recipe, bf16, 50 steps + resume" 120 $py benchmarks/gpu/tiny_run.py $dry
step "--fp8 torch vs emulated" 45 $py benchmarks/gpu/fp8_torch.py $dry
if [ -z "$dry" ]; then
  optional "FP8 vs BF16 GEMMs" "[ -f benchmarks/fp8_gemm.py ]" "benchmarks/fp8_gemm.py not present" \
    60 $py benchmarks/fp8_gemm.py --out benchmarks/gpu/results/fp8_gemm.json
else
  echo "skip: FP8 vs BF16 GEMMs: needs CUDA (block-scaled torch._scaled_mm)"
fi
step "16B-shaped blocks at 4096: bf16/fp8 x compile off/on" 180 $py benchmarks/gpu/blocks.py $dry
step "F&B on two streams vs F then B" 60 $py benchmarks/gpu/fb_streams.py $dry
if [ -n "$dry" ]; then
  step "launch.calibrate (CPU, 2 gloo ranks)" 120 $py -m launch.calibrate --device cpu \
    --output benchmarks/gpu/results/dry-run/calibrate.yaml
else
  optional "launch.calibrate" "$py -c 'import torch; assert torch.cuda.device_count() >= 2'" \
    "its collectives need 2 GPUs on this machine" 120 $py -m launch.calibrate --output benchmarks/gpu/results/calibrate.yaml
fi
echo "run_all: $failed step(s) failed; results under benchmarks/gpu/results/${dry:+dry-run/}"
exit $failed
